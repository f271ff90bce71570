//! Shared pieces of the namespace tests: a `Lab` of network namespaces on a
//! bridge with real `qgate` nodes and spawned processes, all removed on
//! drop (also when the test fails). Each `tests/netns*.rs` file includes it
//! with `mod common;`.
#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub const QDFS: &str = env!("CARGO_BIN_EXE_qdfs");

pub fn qgate_bin() -> PathBuf {
    Path::new(QDFS).with_file_name("qgate")
}

pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

pub fn must(cmd: &mut Command) -> Output {
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

pub fn ip(args: &[&str]) {
    must(Command::new("ip").args(args));
}

/// Makes a spawned process die with the test, even one killed outright.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

pub struct NodeInfo {
    pub ns: String,
    pub dir: PathBuf,
    pub address: String,
    pub uri: String,
}

/// Namespaces and processes, removed on drop.
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub namespaces: Vec<String>,
    pub children: Vec<Child>,
    pub nodes: Vec<NodeInfo>,
}

/// `qdfs add PATH --config CFG`; the ID it prints.
pub fn dfs_add(path: &Path, cfg: &Path) -> String {
    let out = must(
        Command::new(QDFS)
            .args(["add", path.to_str().unwrap(), "--config"])
            .arg(cfg),
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Deterministic, incompressible test data (xorshift).
pub fn test_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A lab with a bridge `br0` in its namespace "sw" (returned), or `None`
/// after saying SKIPPED when this is not root or the `qgate` binary was not
/// built (a workspace test run builds it).
pub fn lab_with_bridge() -> Option<(Lab, String)> {
    if !is_root() {
        eprintln!("SKIPPED: namespace test needs root");
        return None;
    }
    if !qgate_bin().exists() {
        eprintln!(
            "SKIPPED: {} not built (run the workspace's tests, or cargo build -p qgate)",
            qgate_bin().display()
        );
        return None;
    }
    let mut lab = Lab::new();
    let sw = lab.add_ns("sw");
    ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &sw, "link", "set", "br0", "up"]);
    Some((lab, sw))
}

impl Lab {
    pub fn new() -> Lab {
        // Unique per process and per lab, so tests may run in parallel
        // (interface names stay within 15 bytes: "qd" + 5 digits + a
        // letter + "t" + a short host name).
        static LABS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 26;
        let prefix = format!("qd{}{}", std::process::id() % 100_000, (b'a' + n) as char);
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

    pub fn add_ns(&mut self, name: &str) -> String {
        let ns = format!("{}{}", self.prefix, name);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A host namespace on the bridge in `sw` with one underlay address.
    pub fn add_host(&mut self, sw: &str, name: &str, addr: &str) -> String {
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

    pub fn spawn(&mut self, ns: &str, program: &Path, args: &[&str], log: &str) -> usize {
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

    /// Creates and starts a qgate node listening on `listen` in `ns`, with
    /// only the DFS port (tcp/7400) open to the overlay.
    pub fn add_node(&mut self, name: &str, ns: &str, listen: &str, peers: &[String]) {
        self.add_node_with(name, ns, listen, peers, &["tcp/7400"], |_| {});
    }

    /// Creates and starts a qgate node listening on `listen` in `ns`, with
    /// `allow` as its `[inbound] allow`; `prepare` gets the state directory
    /// (which holds qgate.toml) before the node starts.
    pub fn add_node_with(
        &mut self,
        name: &str,
        ns: &str,
        listen: &str,
        peers: &[String],
        allow: &[&str],
        prepare: impl FnOnce(&Path),
    ) {
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
        let quoted: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
        let allow_line = format!("allow = [{}]", quoted.join(", "));
        let text = fs::read_to_string(&config)
            .unwrap()
            .replace("# log = \"info\"", "log = \"debug\"\npreset = \"fast\"")
            .replacen("# allow = []", &allow_line, 1)
            .replacen(
                "peers = [\n",
                &format!("peers = [\n{}\n", list.join("\n")),
                1,
            );
        assert!(text.contains(&allow_line));
        fs::write(&config, text).unwrap();
        prepare(&dir);
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

    /// Writes `dfs-NAME.toml` for a `qdfs serve` beside node `node` (store
    /// `dfs-NAME`, port 7400, the node's control socket, then `extra`).
    pub fn dfs_config(&self, node: usize, name: &str, extra: &str) -> PathBuf {
        let cfg = self.dir.join(format!("dfs-{name}.toml"));
        fs::write(
            &cfg,
            format!(
                "data_dir = \"dfs-{name}\"\nport = 7400\ncontrol_socket = \"{}\"\n{extra}",
                self.nodes[node].dir.join("control.sock").display()
            ),
        )
        .unwrap();
        cfg
    }

    /// Starts `qdfs serve --config CFG` in node `node`'s namespace, logging
    /// to `serve-NAME.log`; returns its index in `children`.
    pub fn dfs_serve(&mut self, node: usize, name: &str, cfg: &Path) -> usize {
        let ns = self.nodes[node].ns.clone();
        let cfg = cfg.to_str().unwrap().to_string();
        self.spawn(
            &ns,
            Path::new(QDFS),
            &["serve", "--config", &cfg],
            &format!("serve-{name}.log"),
        )
    }

    pub fn log(&self, name: &str) -> String {
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
            let mut logs: Vec<PathBuf> = fs::read_dir(&self.dir)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.retain(|p| p.extension().is_some_and(|x| x == "log"));
            logs.sort();
            for path in logs {
                let log = fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("---- {} (last 30 lines) ----", path.display());
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
