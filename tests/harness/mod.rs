//! A lab of network namespaces for multi-node tests.
//!
//! Run-book: these tests need root (namespaces, veth, TUN) and the programs
//! ip, ping, python3, curl, socat (`.ci/run` installs them). Run them with
//! `cargo test --test netns`; one lab at a time is enforced by a process-wide
//! lock, and every name carries a per-lab prefix, so nothing collides with a
//! second run. A [`Lab`] removes everything it made (processes it started,
//! by PID; namespaces, which takes their veths and TUNs with them; temp
//! dirs) when dropped, also when the test panics, and then prints the tail of
//! every node's log. Underlay addresses come from 198.18.0.0/15 and
//! 2001:2::/48 (the benchmarking ranges) only.

#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

static LOCK: Mutex<()> = Mutex::new(());
static SERIAL: AtomicU32 = AtomicU32::new(0);

/// Path of the qgate binary cargo built for these tests.
pub fn qgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qgate")
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Makes a spawned process die with the test that spawned it, so even a
/// test killed outright (no unwinding, no Drop) leaves no daemon behind.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn must(cmd: &mut Command) -> Output {
    let out = run(cmd);
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

/// One qgate node in a namespace.
pub struct Node {
    /// Short name.
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its state dir.
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Overlay address.
    pub address: String,
    /// Peer URI (with endpoint).
    pub uri: String,
    /// Node ID.
    pub node_id: String,
    child: Option<Child>,
    log: PathBuf,
    restarts: u32,
}

impl Node {
    /// Current status (JSON), or None if the node does not answer.
    pub fn try_status(&self) -> Option<Value> {
        let out = run(Command::new(qgate_bin())
            .args(["status", "--json", "--config"])
            .arg(&self.config));
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Current status (JSON).
    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("node {} does not answer status", self.name))
    }

    /// The status entry of the link to the node at `address`.
    pub fn link_to(&self, address: &str) -> Option<Value> {
        self.status()["links"]
            .as_array()?
            .iter()
            .find(|l| l["address"] == address)
            .cloned()
    }

    /// Sum of one drop counter over the node and all its links.
    pub fn drops(&self, reason: &str) -> u64 {
        let st = self.status();
        let mut n = st["drops"][reason].as_u64().unwrap_or(0);
        for l in st["links"].as_array().into_iter().flatten() {
            n += l["drops"][reason].as_u64().unwrap_or(0);
        }
        n
    }

    /// Replaces the `peers` list in the config.
    pub fn set_peers(&self, uris: &[&str]) {
        self.edit_config(|text| {
            let list: Vec<String> = uris.iter().map(|u| format!("\"{u}\",")).collect();
            text.replacen(
                "peers = [\n",
                &format!("peers = [\n{}\n", list.join("\n")),
                1,
            )
        });
    }

    /// Rewrites the config.
    pub fn edit_config(&self, f: impl FnOnce(&str) -> String) {
        let text = fs::read_to_string(&self.config).unwrap();
        fs::write(&self.config, f(&text)).unwrap();
    }

    /// Whether the process is running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The daemon's process ID while it runs (`ip netns exec` execs qgate,
    /// so the child is the daemon itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A set of namespaces, nodes and helper processes, removed on drop.
pub struct Lab {
    /// Prefix of every name this lab creates.
    pub prefix: String,
    /// Temp dir for state, configs, logs and files.
    pub dir: PathBuf,
    namespaces: Vec<String>,
    helpers: Vec<Child>,
    /// The nodes.
    pub nodes: Vec<Node>,
    switch: Option<String>,
    _guard: MutexGuard<'static, ()>,
}

impl Lab {
    /// A new, empty lab. Panics unless run as root.
    pub fn new(tag: &str) -> Lab {
        let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        assert!(
            nix_is_root(),
            "namespace tests need root (network namespaces and TUN devices)"
        );
        let n = SERIAL.fetch_add(1, Ordering::SeqCst);
        // Names stay short: interface names hold at most 15 bytes.
        let prefix = format!("qt{}{}{}", tag, std::process::id() % 10000, n);
        let dir = std::env::temp_dir().join(format!("qgate-lab-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Lab {
            prefix,
            dir,
            namespaces: Vec::new(),
            helpers: Vec::new(),
            nodes: Vec::new(),
            switch: None,
            _guard: guard,
        }
    }

    /// Creates namespace `{prefix}{name}` with loopback up; returns its name.
    pub fn add_ns(&mut self, name: &str) -> String {
        let ns = format!("{}{}", self.prefix, name);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Joins two namespaces with a veth pair (`if_a` in `a`, `if_b` in `b`).
    pub fn veth(&mut self, a: &str, if_a: &str, b: &str, if_b: &str, mtu: u32) {
        let tmp = format!("{}t{}", self.prefix, self.namespaces.len());
        ip(&[
            "link", "add", &tmp, "type", "veth", "peer", "name", if_b, "netns", b,
        ]);
        ip(&["link", "set", &tmp, "netns", a]);
        ip(&["-n", a, "link", "set", &tmp, "name", if_a]);
        let m = mtu.to_string();
        ip(&["-n", a, "link", "set", if_a, "mtu", &m, "up"]);
        ip(&["-n", b, "link", "set", if_b, "mtu", &m, "up"]);
    }

    /// Creates a host namespace attached to the lab's bridge, with the given
    /// underlay addresses (CIDR). Returns the namespace name.
    pub fn add_host(&mut self, name: &str, addrs: &[&str]) -> String {
        let sw = match &self.switch {
            Some(s) => s.clone(),
            None => {
                let s = self.add_ns("sw");
                ip(&["-n", &s, "link", "add", "br0", "type", "bridge"]);
                ip(&["-n", &s, "link", "set", "br0", "up"]);
                self.switch = Some(s.clone());
                s
            }
        };
        let ns = self.add_ns(name);
        let port = format!("p{name}");
        self.veth(&sw, &port, &ns, "eth0", 1500);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0"]);
        for a in addrs {
            if a.contains(':') {
                ip(&["-n", &ns, "addr", "add", a, "dev", "eth0", "nodad"]);
            } else {
                ip(&["-n", &ns, "addr", "add", a, "dev", "eth0"]);
            }
        }
        ns
    }

    /// Runs a shell command in a namespace (bounded by `timeout` seconds).
    pub fn sh(&self, ns: &str, cmd: &str) -> Output {
        run(Command::new("ip").args(["netns", "exec", ns, "timeout", "120", "sh", "-c", cmd]))
    }

    /// Runs a shell command in a namespace and asserts it succeeds; returns stdout.
    pub fn sh_ok(&self, ns: &str, cmd: &str) -> String {
        let out = self.sh(ns, cmd);
        assert!(
            out.status.success(),
            "in {ns}: {cmd}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a background program in a namespace; killed when the lab drops.
    pub fn spawn(&mut self, ns: &str, cmd: &str) -> u32 {
        let log =
            fs::File::create(self.dir.join(format!("helper-{}.log", self.helpers.len()))).unwrap();
        let child = die_with_parent(&mut Command::new("ip"))
            .args(["netns", "exec", ns, "sh", "-c", &format!("exec {cmd}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.helpers.push(child);
        pid
    }

    /// Creates a node's keys and config in namespace `ns`, listening on `listen`.
    pub fn add_node(&mut self, name: &str, ns: &str, listen: &str) -> usize {
        let dir = self.dir.join(name);
        must(
            Command::new(qgate_bin())
                .args(["init", "--listen", listen, "--state-dir"])
                .arg(&dir),
        );
        let out = must(
            Command::new(qgate_bin())
                .args(["id", "--json", "--state-dir"])
                .arg(&dir),
        );
        let id: Value = serde_json::from_slice(&out.stdout).unwrap();
        let config = dir.join("qgate.toml");
        // Keep a debug log for post-mortems.
        let text = fs::read_to_string(&config).unwrap();
        // Direct links unless a test asks for circuits (it replaces the
        // preset line or adds [[route]] entries).
        // No inbound filter unless a test asks for one (tests reach the
        // nodes' services over the overlay): it edits the `allow` line.
        let text = text
            .replace("# log = \"info\"", "log = \"debug\"\npreset = \"fast\"")
            .replacen("# allow = []", "allow = [\"all\"]", 1);
        assert!(
            text.contains("allow = [\"all\"]"),
            "no [inbound] allow in {text}"
        );
        fs::write(&config, text).unwrap();
        self.nodes.push(Node {
            name: name.into(),
            ns: ns.into(),
            log: self.dir.join(format!("{name}.log")),
            config,
            dir,
            address: id["address"].as_str().unwrap().into(),
            uri: id["uri"].as_str().unwrap().into(),
            node_id: id["node_id"].as_str().unwrap().into(),
            child: None,
            restarts: 0,
        });
        self.nodes.len() - 1
    }

    /// Starts node `i` and waits until its control socket answers.
    pub fn start(&mut self, i: usize) {
        self.start_with_env(i, &[]);
    }

    /// Stops node `i` (SIGTERM, or SIGKILL if `hard`) and reaps it.
    pub fn stop(&mut self, i: usize, hard: bool) {
        let node = &mut self.nodes[i];
        if let Some(mut c) = node.child.take() {
            let sig = if hard { "-KILL" } else { "-TERM" };
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts every node, then waits until each configured link is up.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// Waits until `ping -6` from node `from` to node `to` gets an answer.
    pub fn wait_ping(&self, from: usize, to: usize, timeout: Duration) -> bool {
        let (ns, addr) = (&self.nodes[from].ns, &self.nodes[to].address);
        wait_until(timeout, || {
            self.sh(ns, &format!("ping -6 -c 1 -W 1 {addr}"))
                .status
                .success()
        })
    }
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i, false);
        }
        for c in &mut self.helpers {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = n.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- log of node {} (last 40 lines) ----", n.name);
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

/// Writes `len` pseudo-random bytes to `path` and returns their SHA-256 (hex).
pub fn random_file(path: &Path, len: usize) -> String {
    let out = must(Command::new("sh").arg("-c").arg(format!(
        "head -c {len} /dev/urandom > {p} && sha256sum {p}",
        p = path.display()
    )));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

impl Lab {
    /// Starts node `i` like [`Lab::start`], with extra environment variables
    /// for the qgate process (e.g. `QGATE_CELL_LOG`).
    pub fn start_with_env(&mut self, i: usize, env: &[(&str, &str)]) {
        self.start_wrapped(i, &[], env);
    }

    /// Starts node `i` with `wrapper` (a program and its arguments that
    /// execs the rest, e.g. `setpriv ...`) between `ip netns exec NS` and
    /// qgate. The wrapper must exec, so the child stays the daemon itself.
    pub fn start_wrapped(&mut self, i: usize, wrapper: &[&str], env: &[(&str, &str)]) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {} already running", node.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        node.restarts += 1;
        // `ip netns exec` passes its environment on to the program.
        let child = die_with_parent(&mut Command::new("ip"))
            .args(["netns", "exec", &node.ns])
            .args(wrapper)
            .args([qgate_bin(), "run", "--config"])
            .arg(&node.config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
        let out = run(Command::new(qgate_bin())
            .args(["status", "--wait", "15", "--config"])
            .arg(&node.config));
        assert!(
            out.status.success(),
            "node {} did not come up: {}\nlog:\n{}",
            node.name,
            String::from_utf8_lossy(&out.stderr),
            node.log()
        );
    }
}

/// The texts of the values in a `qgate dht get --json` answer.
pub fn value_texts(answer: &Value) -> Vec<&str> {
    answer["values"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["text"].as_str()).collect())
        .unwrap_or_default()
}

/// The system user `name` (uid, gid), created when missing (`.ci/run` makes
/// `qgate-test` beforehand; a developer's machine may not have it).
pub fn ensure_test_user(name: &str) -> (u32, u32) {
    if qgate::shell::privilege::lookup_user(name).is_err() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .output()
            .expect("running useradd");
        assert!(
            out.status.success() || qgate::shell::privilege::lookup_user(name).is_ok(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    qgate::shell::privilege::lookup_user(name).unwrap()
}
