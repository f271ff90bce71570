//! QuantumDFS between real `qgate` nodes in network namespaces.
//!
//! Run-book: needs root (namespaces, veth, TUN), `ip` and `nft`, and the
//! `qgate` binary next to `qdfs` in the target directory (a workspace test
//! run builds both: `cargo test --workspace`, as scripts/test does). Without
//! root or without that binary the test says so and passes without running.
//!
//! Three nodes a, b, c on a bridge (underlay 198.18.40.0/24, the
//! benchmarking range); b and c know only a. `qdfs serve` runs on a and on
//! b, bound to their overlay addresses with only tcp/7400 open in the
//! nodes' inbound filters, and announces the file in the DHT through the
//! node's control socket. On c, `qdfs get` with no `--provider` finds both
//! through the DHT and fetches from both over the overlay. Everything the
//! test made (processes by PID, namespaces, files) is removed when it ends,
//! also when it fails.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const QDFS: &str = env!("CARGO_BIN_EXE_qdfs");

fn qgate_bin() -> PathBuf {
    Path::new(QDFS).with_file_name("qgate")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn must(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    must(Command::new("ip").args(args));
}

/// Makes a spawned process die with the test, even one killed outright.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

struct NodeInfo {
    ns: String,
    dir: PathBuf,
    address: String,
    uri: String,
}

/// Namespaces and processes, removed on drop.
struct Lab {
    prefix: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<Child>,
    nodes: Vec<NodeInfo>,
}

impl Lab {
    fn new() -> Lab {
        let prefix = format!("qd{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("qdfs-lab-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Lab {
            prefix,
            dir,
            namespaces: Vec::new(),
            children: Vec::new(),
            nodes: Vec::new(),
        }
    }

    fn add_ns(&mut self, name: &str) -> String {
        let ns = format!("{}{}", self.prefix, name);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A host namespace on the bridge in `sw` with one underlay address.
    fn add_host(&mut self, sw: &str, name: &str, addr: &str) -> String {
        let ns = self.add_ns(name);
        let tmp = format!("{}t{}", self.prefix, name);
        let port = format!("p{name}");
        ip(&[
            "link", "add", &tmp, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &tmp, "netns", sw]);
        ip(&["-n", sw, "link", "set", &tmp, "name", &port]);
        ip(&["-n", sw, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"]);
        ns
    }

    fn spawn(&mut self, ns: &str, program: &Path, args: &[&str], log: &str) -> usize {
        let log = fs::File::create(self.dir.join(log)).unwrap();
        let child = die_with_parent(&mut Command::new("ip"))
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    /// Creates and starts a qgate node listening on `listen` in `ns`.
    fn add_node(&mut self, name: &str, ns: &str, listen: &str, peers: &[String]) {
        let dir = self.dir.join(name);
        let q = qgate_bin();
        must(
            Command::new(&q)
                .args(["init", "--listen", listen, "--state-dir"])
                .arg(&dir),
        );
        let out = must(
            Command::new(&q)
                .args(["id", "--json", "--state-dir"])
                .arg(&dir),
        );
        let id: Value = serde_json::from_slice(&out.stdout).unwrap();
        let config = dir.join("qgate.toml");
        let list: Vec<String> = peers.iter().map(|u| format!("\"{u}\",")).collect();
        let text = fs::read_to_string(&config)
            .unwrap()
            .replace("# log = \"info\"", "log = \"debug\"\npreset = \"fast\"")
            // Only the DFS port is open to the overlay.
            .replacen("# allow = []", "allow = [\"tcp/7400\"]", 1)
            .replacen(
                "peers = [\n",
                &format!("peers = [\n{}\n", list.join("\n")),
                1,
            );
        assert!(text.contains("allow = [\"tcp/7400\"]"));
        fs::write(&config, text).unwrap();
        let cfg = config.to_str().unwrap().to_string();
        self.spawn(ns, &q, &["run", "--config", &cfg], &format!("{name}.log"));
        must(Command::new(&q).args(["status", "--wait", "15", "--config", &cfg]));
        self.nodes.push(NodeInfo {
            ns: ns.into(),
            dir,
            address: id["address"].as_str().unwrap().into(),
            uri: id["uri"].as_str().unwrap().into(),
        });
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for name in ["a.log", "b.log", "c.log", "serve-a.log", "serve-b.log"] {
                let log = self.log(name);
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("---- {name} (last 30 lines) ----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn fetch_through_the_dht_between_nodes() {
    if !is_root() {
        eprintln!("SKIPPED: namespace test needs root");
        return;
    }
    if !qgate_bin().exists() {
        eprintln!(
            "SKIPPED: {} not built (run the workspace's tests)",
            qgate_bin().display()
        );
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.add_ns("sw");
    ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &sw, "link", "set", "br0", "up"]);
    let na = lab.add_host(&sw, "a", "198.18.40.1/24");
    let nb = lab.add_host(&sw, "b", "198.18.40.2/24");
    let nc = lab.add_host(&sw, "c", "198.18.40.3/24");
    lab.add_node("a", &na, "198.18.40.1:7300", &[]);
    let a_uri = lab.nodes[0].uri.clone();
    lab.add_node("b", &nb, "198.18.40.2:7300", std::slice::from_ref(&a_uri));
    lab.add_node("c", &nc, "198.18.40.3:7300", &[a_uri]);

    // A 6 MiB file provided by a and b.
    let src = lab.dir.join("shared.bin");
    let data: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&src, &data).unwrap();
    let mut id = String::new();
    for (i, name) in [(0, "a"), (1, "b")] {
        let node = &lab.nodes[i];
        let cfg = lab.dir.join(format!("dfs-{name}.toml"));
        fs::write(
            &cfg,
            format!(
                "data_dir = \"dfs-{name}\"\nport = 7400\ncontrol_socket = \"{}\"\n",
                node.dir.join("control.sock").display()
            ),
        )
        .unwrap();
        let out = must(
            Command::new(QDFS)
                .args(["add", src.to_str().unwrap(), "--config"])
                .arg(&cfg),
        );
        id = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let ns = node.ns.clone();
        let cfg = cfg.to_str().unwrap().to_string();
        lab.spawn(
            &ns,
            Path::new(QDFS),
            &["serve", "--config", &cfg],
            &format!("serve-{name}.log"),
        );
    }

    // c knows neither provider: it finds them in the DHT (the providers
    // announce within seconds of starting) and fetches over the overlay.
    let c = &lab.nodes[2];
    let out = lab.dir.join("fetched.bin");
    let sock = c.dir.join("control.sock");
    let started = Instant::now();
    let mut last = String::new();
    let mut done: Option<Value> = None;
    while started.elapsed() < Duration::from_secs(60) {
        let r = Command::new("ip")
            .args(["netns", "exec", &c.ns])
            .arg(QDFS)
            .args([
                "get",
                &id,
                "-o",
                out.to_str().unwrap(),
                "--json",
                "--no-provide",
            ])
            .arg("--control-socket")
            .arg(&sock)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&r.stdout).into_owned();
        let event = stdout
            .lines()
            .find(|l| l.contains("\"event\":\"done\""))
            .and_then(|l| serde_json::from_str::<Value>(l).ok());
        // Wait until both providers are announced, not just the first.
        if let Some(ev) =
            event.filter(|e| e["files"][0]["providers"].as_array().map_or(0, |p| p.len()) == 2)
        {
            done = Some(ev);
            break;
        }
        last = String::from_utf8_lossy(&r.stderr).into_owned();
        let _ = fs::remove_file(&out);
        std::thread::sleep(Duration::from_secs(1));
    }
    let done = done.unwrap_or_else(|| panic!("no fetch through the DHT within 60 s; last: {last}"));
    assert_eq!(fs::read(&out).unwrap(), data, "fetched bytes differ");
    let f = &done["files"][0];
    let addrs: Vec<String> = f["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["addr"].as_str().unwrap().to_string())
        .collect();
    for n in &lab.nodes[..2] {
        assert!(
            addrs.contains(&format!("[{}]:7400", n.address)),
            "{addrs:?} lacks {}",
            n.address
        );
    }
    let served: u64 = f["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["groups"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 384, "{f}");
    eprintln!(
        "6 MiB found through the DHT and fetched over the overlay from {addrs:?} in {:.2} s (found after {:.1} s)",
        f["seconds"].as_f64().unwrap(),
        started.elapsed().as_secs_f64()
    );
}
