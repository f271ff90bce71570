//! Least privilege and the inbound filter, with real processes in network
//! namespaces: node b runs as an unprivileged user with every capability
//! cleared, yet its TUN and inbound filter work; only the allowed port is
//! reachable from the overlay; its own outbound connections work; the
//! control socket refuses strangers; the nftables table goes away when b
//! stops, even by SIGKILL. Needs root, nft, setpriv, socat, python3, curl
//! (see harness/mod.rs for the run-book). Creates the system user
//! `qgate-test` if it is missing (so does `.ci/run`).

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{qgate_bin, wait_until, Lab};

const UP: Duration = Duration::from_secs(20);
const USER: &str = "qgate-test";

fn ensure_user() -> (u32, u32) {
    harness::ensure_test_user(USER)
}

/// The fields of /proc/PID/status named `key` (e.g. "Uid"), split.
fn proc_field(pid: u32, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// PIDs whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The parent is the second field after the parenthesised name.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        if after.split_whitespace().nth(1) == Some(&pid.to_string()) {
            out.push(p);
        }
    }
    out
}

fn tables(lab: &Lab, ns: &str) -> String {
    lab.sh_ok(ns, "nft list tables")
}

/// `qgate status` as another user; returns (success, stderr).
fn status_as(lab: &Lab, config: &std::path::Path, regid: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            &format!("--regid={regid}"),
            "--clear-groups",
        ])
        .arg(qgate_bin())
        .args(["status", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let _ = lab;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Two nodes a and b on one veth pair (198.18.`net`.1 and .2), a
/// configured with b; b runs as the test user and lets in only `allow`,
/// its state directory handed to that user. Nothing started yet.
fn user_pair(tag: &str, net: u8, allow: &str) -> (Lab, String, String, usize, usize) {
    let mut lab = Lab::new(tag);
    let na = lab.add_ns("a");
    let nb = lab.add_ns("b");
    lab.veth(&na, "eth0", &nb, "eth0", 1500);
    lab.sh_ok(&na, &format!("ip addr add 198.18.{net}.1/24 dev eth0"));
    lab.sh_ok(&nb, &format!("ip addr add 198.18.{net}.2/24 dev eth0"));
    let a = lab.add_node("a", &na, &format!("198.18.{net}.1:7300"));
    let b = lab.add_node("b", &nb, &format!("198.18.{net}.2:7300"));
    let ub = lab.nodes[b].uri.clone();
    lab.nodes[a].set_peers(&[&ub]);
    lab.nodes[b].edit_config(|t| {
        t.replacen("# user = \"qgate\"", &format!("user = \"{USER}\""), 1)
            .replacen("allow = [\"all\"]", &format!("allow = [\"{allow}\"]"), 1)
    });
    qgate::shell::privilege::hand_over(&lab.nodes[b].dir, USER).unwrap();
    (lab, na, nb, a, b)
}

#[test]
fn unprivileged_node_with_inbound_filter() {
    let (uid, gid) = ensure_user();
    let (mut lab, na, nb, a, b) = user_pair("v", 30, "tcp/8080");
    let cfg = std::fs::read_to_string(&lab.nodes[b].config).unwrap();
    assert!(cfg.contains("user = \"qgate-test\"") && cfg.contains("allow = [\"tcp/8080\"]"));
    lab.start(a);
    lab.start(b);

    // The daemon: the test user's ids, no capability, no-new-privileges,
    // in every thread.
    let pid = lab.nodes[b].pid().unwrap();
    let mut tasks = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        for cap in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(field(cap), ["0000000000000000"], "{cap} of {:?}", t.path());
        }
        assert_eq!(field("Uid"), vec![uid.to_string(); 4], "{:?}", t.path());
        assert_eq!(field("Gid"), vec![gid.to_string(); 4], "{:?}", t.path());
        assert_eq!(field("NoNewPrivs"), ["1"]);
        // Started as root: the bounding set could be emptied too.
        assert_eq!(field("CapBnd"), ["0000000000000000"]);
        tasks += 1;
    }
    assert!(
        tasks >= 2,
        "the data-plane thread runs too ({tasks} threads)"
    );
    assert!(lab.nodes[b]
        .log()
        .contains("with no capabilities and no-new-privileges"));

    // Its watcher: CAP_NET_ADMIN and nothing else.
    let guards: Vec<u32> = children(pid)
        .into_iter()
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/cmdline"))
                .unwrap_or_default()
                .contains("__filter-guard")
        })
        .collect();
    assert_eq!(guards.len(), 1, "one filter watcher under the daemon");
    for cap in ["CapEff", "CapPrm"] {
        assert_eq!(proc_field(guards[0], cap), ["0000000000001000"], "{cap}");
    }
    assert_eq!(proc_field(guards[0], "NoNewPrivs"), ["1"]);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", guards[0]))
        .unwrap()
        .count();
    assert_eq!(fds, 3, "the watcher holds stdin, stdout and stderr only");

    // The filter is there in b's namespace, none in a's (allow = ["all"]).
    assert!(tables(&lab, &nb).contains("table inet qgate_qg0"));
    assert!(!tables(&lab, &na).contains("qgate_"));

    // ping a -> b works through the filter, over the unprivileged TUN.
    assert!(lab.wait_ping(a, b, UP), "ping a -> b");
    let (aa, ab) = (lab.nodes[a].address.clone(), lab.nodes[b].address.clone());

    // Listeners on b: 8080 allowed, 9090 not.
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "allowed port\n").unwrap();
    for port in [8080, 9090] {
        lab.spawn(
            &nb,
            &format!(
                "python3 -m http.server {port} --bind {ab} --directory {}",
                www.display()
            ),
        );
    }
    // Both listen (b reaches both itself: the filter looks at the TUN only).
    for port in [8080, 9090] {
        assert!(
            wait_until(UP, || lab
                .sh(&nb, &format!("curl -sf -m 2 http://[{ab}]:{port}/"))
                .status
                .success()),
            "b's listener on {port} is up"
        );
    }
    assert!(
        wait_until(UP, || lab
            .sh(&na, &format!("curl -sf -m 2 http://[{ab}]:8080/"))
            .status
            .success()),
        "a reaches b's allowed port 8080"
    );
    assert_eq!(
        lab.sh_ok(&na, &format!("curl -sf -m 5 http://[{ab}]:8080/")),
        "allowed port\n"
    );
    let t = Instant::now();
    let out = lab.sh(&na, &format!("curl -s -m 3 http://[{ab}]:9090/"));
    assert!(!out.status.success(), "a reached b's port 9090: {out:?}");
    assert!(t.elapsed() < Duration::from_secs(6));

    // b's own outbound connection to a, and the data coming back.
    lab.spawn(
        &na,
        &format!("socat TCP6-LISTEN:7070,bind=[{aa}],reuseaddr,fork EXEC:cat"),
    );
    assert!(
        wait_until(UP, || lab
            .sh(
                &nb,
                &format!("echo hello-from-b | socat -t 3 - TCP6:[{aa}]:7070")
            )
            .stdout
            .starts_with(b"hello-from-b")),
        "b's outbound TCP connection to a works both ways"
    );

    // The control socket: root may, the node's group may, strangers not.
    let st = lab.nodes[b].status();
    assert_eq!(st["address"], ab.as_str());
    let sock = lab.nodes[b].dir.join("control.sock");
    let meta = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    // A copy of the config others can read (the state dir is private).
    let public = lab.dir.join("b-public.toml");
    std::fs::copy(&lab.nodes[b].config, &public).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = lab.nodes[b].dir.clone();
    let set_mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set_mode(&dir, 0o710);
    let (ok, err) = status_as(&lab, &public, USER);
    assert!(ok, "a member of the node's group is refused: {err}");
    let (ok, err) = status_as(&lab, &public, "nogroup");
    assert!(!ok, "nobody got an answer");
    assert!(err.contains("connecting to control socket"), "{err}");
    // With the file permissions opened up, the daemon's own check
    // (SO_PEERCRED) still refuses.
    set_mode(&dir, 0o711);
    set_mode(&sock, 0o666);
    let (ok, err) = status_as(&lab, &public, "nogroup");
    assert!(!ok, "nobody got an answer past SO_PEERCRED");
    assert!(err.contains("permission denied: uid 65534"), "{err}");
    set_mode(&sock, 0o660);
    set_mode(&dir, 0o700);

    // SIGTERM: b exits, its socket file and its table are gone.
    lab.stop(b, false);
    assert!(
        !sock.exists(),
        "the unprivileged node removed its control socket"
    );
    assert!(
        !tables(&lab, &nb).contains("qgate_"),
        "table left after SIGTERM"
    );
    assert!(lab.nodes[b].log().contains("terminated, shutting down"));
    // b's peer store and record number were saved as the test user.
    assert!(!lab.nodes[b].log().contains("saving the peer store"));

    // Again, and SIGKILL: the watcher removes the table.
    lab.start(b);
    assert!(tables(&lab, &nb).contains("table inet qgate_qg0"));
    assert!(lab.wait_ping(a, b, UP), "ping a -> b after the restart");
    lab.stop(b, true);
    assert!(
        wait_until(Duration::from_secs(2), || !tables(&lab, &nb)
            .contains("qgate_")),
        "table left 2 s after SIGKILL"
    );
}

/// The systemd unit's way: the process starts as the configured user with
/// CAP_NET_ADMIN as an ambient capability (User=, AmbientCapabilities=), so
/// only the capabilities go — the same code path, no setuid.
#[test]
fn started_as_the_user_with_ambient_cap_net_admin() {
    let (uid, gid) = ensure_user();
    let (mut lab, _, _, a, b) = user_pair("w", 31, "udp/5353");
    // It reads its key file as that user, as under systemd.
    let key = lab.dir.join(format!("{}.key", lab.nodes[b].name));
    qgate::shell::privilege::hand_over(&key, USER).unwrap();
    lab.start(a);
    let (u, g) = (format!("--reuid={uid}"), format!("--regid={gid}"));
    lab.start_wrapped(
        b,
        &[
            "setpriv",
            &u,
            &g,
            "--init-groups",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
        ],
        &[],
    );
    let pid = lab.nodes[b].pid().unwrap();
    for cap in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(proc_field(pid, cap), ["0000000000000000"], "{cap}");
    }
    assert_eq!(proc_field(pid, "Uid"), vec![uid.to_string(); 4]);
    assert_eq!(proc_field(pid, "Gid"), vec![gid.to_string(); 4]);
    assert_eq!(proc_field(pid, "NoNewPrivs"), ["1"]);
    let log = lab.nodes[b].log();
    assert!(log.contains("kept (no CAP_SETPCAP)"), "{log}");
    let nb = lab.nodes[b].ns.clone();
    assert!(tables(&lab, &nb).contains("table inet qgate_qg0"));
    assert!(lab.wait_ping(a, b, UP), "ping a -> b");
    assert_eq!(
        lab.nodes[b].status()["address"],
        lab.nodes[b].address.as_str()
    );
    lab.stop(b, false);
    assert!(
        !tables(&lab, &nb).contains("qgate_"),
        "table left after SIGTERM"
    );
    assert!(!lab.nodes[b].dir.join("control.sock").exists());
}

/// No working `nft`: the node refuses to start with one clear line and
/// leaves no TUN behind; with `allow = ["all"]` it needs no nft at all.
#[test]
fn failing_nft_refuses_to_start() {
    let mut lab = Lab::new("x");
    let ns = lab.add_ns("a");
    let a = lab.add_node("a", &ns, "[::1]:7300");
    let fake = lab.dir.join("fakebin");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(
        fake.join("nft"),
        "#!/bin/sh\necho 'Error: Could not process rule: Operation not supported' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(fake.join("nft"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap());
    let run = |lab: &Lab| {
        Command::new("ip")
            .args(["netns", "exec", &ns, "env", &format!("PATH={path}")])
            .args([qgate_bin(), "run", "--config"])
            .arg(&lab.nodes[a].config)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    lab.nodes[a].edit_config(|t| t.replacen("allow = [\"all\"]", "allow = []", 1));
    let out = run(&lab);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.starts_with("qgate: installing the inbound filter (nftables table inet qgate_qg0): ")
            && last.contains("Operation not supported"),
        "{err}"
    );
    assert!(
        !lab.sh_ok(&ns, "ip link").contains("qg0"),
        "TUN left behind"
    );
    assert!(!lab.nodes[a].dir.join("control.sock").exists());
    // allow = ["all"] runs without calling nft (the fake one would fail).
    lab.nodes[a].edit_config(|t| t.replacen("allow = []", "allow = [\"all\"]", 1));
    lab.start_wrapped(a, &["env", &format!("PATH={path}")], &[]);
    assert!(lab.nodes[a].log().contains("no inbound filter"));
    assert!(!tables(&lab, &ns).contains("qgate_"));
}

/// Puts /dev/net/tun back to the mode it had, also when the test fails.
struct TunMode(u32);

impl Drop for TunMode {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(self.0));
    }
}

/// A machine whose /dev/net/tun is 0600 (some minimal systems; udev makes
/// it 0666): a node started as an unprivileged user with CAP_NET_ADMIN, as
/// systemd starts it, can't open it and says so in one line with the fix,
/// before it makes anything.
#[test]
fn unopenable_tun_device_is_named_with_the_fix() {
    let (uid, gid) = ensure_user();
    let mut lab = Lab::new("t");
    let ns = lab.add_ns("a");
    let a = lab.add_node("a", &ns, "[::1]:7300");
    lab.nodes[a]
        .edit_config(|t| t.replacen("# user = \"qgate\"", &format!("user = \"{USER}\""), 1));
    qgate::shell::privilege::hand_over(&lab.nodes[a].dir, USER).unwrap();
    let key = lab.dir.join("a.key");
    qgate::shell::privilege::hand_over(&key, USER).unwrap();
    let mode = std::fs::metadata("/dev/net/tun")
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    let _restore = TunMode(mode);
    std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(0o600)).unwrap();
    let (u, g) = (format!("--reuid={uid}"), format!("--regid={gid}"));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "setpriv", &u, &g, "--init-groups"])
        .args([
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
        ])
        .args([qgate_bin(), "run", "--config"])
        .arg(&lab.nodes[a].config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    drop(_restore);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.starts_with(&format!(
            "qgate: cannot open /dev/net/tun as uid {uid}: it is mode 0600 owned by uid 0; make it 0666"
        )) && last.contains("chmod 0666 /dev/net/tun"),
        "{err}"
    );
    assert!(!lab.sh_ok(&ns, "ip link").contains("qg0"), "TUN made");
    assert!(!lab.nodes[a].dir.join("control.sock").exists());
}
