//! The README's "Running a real node" steps, as a newcomer follows them, on
//! two hosts in network namespaces: `qgate init` with the README's options,
//! B's peer URI in A's `peers`, B's one port opened the README's way,
//! everything else the default (preset, inbound filter, user switch), then
//! `qgate run`, `qgate status`, ping and curl across the overlay.
//!
//! Every command below is checked to stand word for word in README.md
//! before it runs; only the state directory (a temp dir per host instead of
//! /var/lib/qgate, named through QGATE_CONFIG as the README says), the user
//! (`qgate-test` instead of `qgate`, which `scripts/install` would create),
//! the underlay addresses (198.18.30.0/24 instead of the README's example
//! 198.51.100.0/24) and the qgate binary (the one cargo built) are swapped.
//! If the README's steps change, this test fails until it follows them
//! again. Needs root, ping, curl, python3, nft; see harness/mod.rs.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use harness::{qgate_bin, wait_until, Lab};

const README: &str = include_str!("../README.md");
const USER: &str = "qgate-test";
/// The README's commands and snippets, in the order it gives them.
const INSTALL: &str = "scripts/install";
const INIT: &str = "qgate init --state-dir /var/lib/qgate --user qgate --listen 0.0.0.0:7300 --advertise 198.51.100.2:7300";
const PEERS: &str =
    "peers = [\n  \"qg://1/...B's node ID.../...B's link key.../198.51.100.2:7300\",\n]";
const ALLOW_OLD: &str = "# allow = []";
const ALLOW: &str = "allow = [\"tcp/8080\"]";
const RUN: &str = "qgate run";
const STATUS: &str = "qgate status";
const SERVER: &str = "python3 -m http.server 8080 --bind ::";
const PING: &str = "ping -6 -c 3 fc5f:0c...";
const CURL: &str = "curl http://[fc5f:0c...]:8080/";
/// The line `qgate status` shows for two nodes, as the README quotes it.
const ROUTING: &str = "direct: 0 usable relays, 1 needed";

struct Host {
    ns: String,
    /// Stands for /var/lib/qgate.
    state: PathBuf,
    /// The README's example address and ours.
    example_ip: &'static str,
    ip: &'static str,
}

impl Host {
    fn config(&self) -> PathBuf {
        self.state.join("qgate.toml")
    }

    /// A README command as it runs here.
    fn local(&self, cmd: &str) -> String {
        let cmd = cmd
            .replace("/var/lib/qgate", &self.state.display().to_string())
            .replace("--user qgate ", &format!("--user {USER} "))
            .replace("198.51.100.2", self.example_ip)
            .replace(self.example_ip, self.ip);
        match cmd.strip_prefix("qgate ") {
            Some(rest) => format!("{} {rest}", qgate_bin()),
            None => cmd,
        }
    }

    /// Runs a README command in this host's namespace, with QGATE_CONFIG
    /// pointing at this host's config.
    fn sh(&self, lab: &Lab, cmd: &str) -> Output {
        let _ = lab;
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "timeout", "60", "sh", "-c"])
            .arg(self.local(cmd))
            .env("QGATE_CONFIG", self.config())
            .output()
            .unwrap()
    }

    fn sh_ok(&self, lab: &Lab, cmd: &str) -> String {
        let out = self.sh(lab, cmd);
        assert!(
            out.status.success(),
            "in {}: {}\nstdout: {}\nstderr: {}",
            self.ns,
            self.local(cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn in_readme(what: &str) {
    assert!(
        README.contains(what),
        "README.md no longer says {what:?}: update tests/readme.rs with the README's steps"
    );
}

fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name:?} in {text}"))
        .trim()
        .to_string()
}

fn edit(path: &Path, old: &str, new: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains(old),
        "{old:?} not in {}:\n{text}",
        path.display()
    );
    std::fs::write(path, text.replacen(old, new, 1)).unwrap();
}

#[test]
fn the_readme_steps_give_ping_and_curl_between_two_machines() {
    for step in [
        INSTALL, INIT, PEERS, ALLOW_OLD, ALLOW, RUN, STATUS, SERVER, PING, CURL, ROUTING,
    ] {
        in_readme(step);
    }
    harness::ensure_test_user(USER);
    let mut lab = Lab::new("rd");
    let mut hosts = Vec::new();
    for (name, example_ip, ip) in [
        ("a", "198.51.100.1", "198.18.30.1"),
        ("b", "198.51.100.2", "198.18.30.2"),
    ] {
        let ns = lab.add_host(name, &[&format!("{ip}/24")]);
        hosts.push(Host {
            ns,
            state: lab.dir.join(name).join("var-lib-qgate"),
            example_ip,
            ip,
        });
    }
    let (a, b) = (&hosts[0], &hosts[1]);

    // `qgate init` on both; it prints the peer URI with the advertised
    // endpoint.
    let mut uris = Vec::new();
    for h in &hosts {
        std::fs::create_dir_all(h.state.parent().unwrap()).unwrap();
        let out = h.sh_ok(&lab, INIT);
        let uri = field(&out, "peer URI");
        assert!(uri.ends_with(&format!("/{}:7300", h.ip)), "{out}");
        let config = std::fs::read_to_string(h.config()).unwrap();
        assert!(config.contains(&format!("user = \"{USER}\"")), "{config}");
        uris.push(uri);
    }
    let b_address = field(&b.sh_ok(&lab, "qgate id"), "address");

    // On A, B's URI between the brackets of `peers`.
    let snippet = PEERS.replace(
        "qg://1/...B's node ID.../...B's link key.../198.51.100.2:7300",
        &uris[1],
    );
    edit(&a.config(), "peers = [\n]", &snippet);
    // On B, the one port.
    edit(&b.config(), ALLOW_OLD, ALLOW);

    // `qgate run` on both (the README's foreground start), kept by the lab.
    let mut pids = Vec::new();
    for h in &hosts {
        let cmd = format!("env QGATE_CONFIG={} {}", h.config().display(), h.local(RUN));
        pids.push(lab.spawn(&h.ns, &cmd));
    }
    for h in &hosts {
        h.sh_ok(&lab, "qgate status --wait 15");
    }
    // The link comes up, and status says how traffic goes and why.
    let linked = wait_until(Duration::from_secs(30), || {
        let out = a.sh(&lab, STATUS);
        String::from_utf8_lossy(&out.stdout).contains("links     1 up of 1")
    });
    let status = a.sh_ok(&lab, STATUS);
    assert!(linked, "A's link to B never came up:\n{status}");
    assert!(status.contains(&format!("routing   {ROUTING}")), "{status}");

    // A fresh, healthy link counts no rejected record (a hello that came
    // too soon after the last check is counted as hello_limited instead).
    for h in &hosts {
        let st: serde_json::Value =
            serde_json::from_str(&h.sh_ok(&lab, "qgate status --json")).unwrap();
        for l in st["links"].as_array().unwrap() {
            assert_eq!(l["drops"]["bad_record"], 0, "{l:#}");
        }
    }

    // B serves a page on the overlay; A pings and fetches it.
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from b, as the README says\n").unwrap();
    lab.spawn(
        &b.ns,
        &format!("sh -c 'cd {} && exec {SERVER}'", www.display()),
    );
    let ping = PING.replace("fc5f:0c...", &b_address);
    assert!(
        wait_until(Duration::from_secs(20), || a
            .sh(&lab, &ping)
            .status
            .success()),
        "ping from A to B failed: {}",
        String::from_utf8_lossy(&a.sh(&lab, &ping).stdout)
    );
    let curl = format!("{} -sS -m 5", CURL.replace("fc5f:0c...", &b_address));
    let mut page = String::new();
    let fetched = wait_until(Duration::from_secs(20), || {
        let out = a.sh(&lab, &curl);
        page = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success()
    });
    assert!(fetched, "curl from A to B failed");
    assert_eq!(page, "hello from b, as the README says\n");

    // The filter is really there: a port B did not open stays shut.
    lab.spawn(
        &b.ns,
        &format!(
            "sh -c 'cd {} && exec python3 -m http.server 9090 --bind ::'",
            www.display()
        ),
    );
    // It answers inside B (local traffic does not cross the filter)...
    let local = format!("curl -sS -m 2 -o /dev/null http://[{b_address}]:9090/");
    assert!(
        wait_until(Duration::from_secs(10), || b
            .sh(&lab, &local)
            .status
            .success()),
        "the 9090 server never came up in B"
    );
    // ... but not from A.
    let shut = a.sh(&lab, &format!("curl -sS -m 2 http://[{b_address}]:9090/"));
    assert!(!shut.status.success(), "port 9090 was reachable");

    // B answers A over the link A talks to it on, and says so; both
    // nodes run as the user `init --user` named (the config line it wrote).
    let status_b = b.sh_ok(&lab, STATUS);
    assert!(
        status_b.contains("routing   direct: answering a node that talks to us over a direct link"),
        "{status_b}"
    );
    let (uid, _) = qgate::shell::privilege::lookup_user(USER).unwrap();
    for pid in pids {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uids = field(&st, "Uid:");
        assert!(
            uids.split_whitespace().all(|u| u == uid.to_string()),
            "node {pid} runs as {uids}, not {USER}"
        );
    }
}
