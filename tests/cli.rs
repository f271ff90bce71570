//! The command line without a network: init, id, config errors, status of a
//! node that is not running.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn qgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .output()
        .unwrap()
}

/// Removes a state dir and its default key file (DIR.key) on drop, also
/// when the test fails.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let mut key = self.0.clone().into_os_string();
        key.push(".key");
        let _ = std::fs::remove_file(key);
    }
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qgate-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn init_then_id_and_never_overwrite() {
    let dir = tmp("init");
    let _cleanup = Cleanup(dir.clone());
    let d = dir.to_str().unwrap();
    let out = qgate(&["init", "--state-dir", d, "--listen", "198.18.0.7:7300"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let id: serde_json::Value =
        serde_json::from_slice(&qgate(&["id", "--json", "--state-dir", d]).stdout).unwrap();
    let uri = id["uri"].as_str().unwrap();
    let addr = id["address"].as_str().unwrap();
    assert!(text.contains(uri) && text.contains(addr), "{text}");
    assert!(
        uri.starts_with("qg://1/") && uri.ends_with("/198.18.0.7:7300"),
        "{uri}"
    );
    assert!(addr.starts_with("fc"));
    assert_eq!(&id["node_id"].as_str().unwrap()[..2], &addr[2..4]);
    // Sealed in DIR/vault; the key file beside DIR, named after it.
    let key_file = dir.with_file_name(format!(
        "{}.key",
        dir.file_name().unwrap().to_str().unwrap()
    ));
    assert!(text.contains(key_file.to_str().unwrap()), "{text}");
    for (f, mode) in [(dir.join("vault"), 0o700), (key_file.clone(), 0o600)] {
        let m = std::fs::metadata(&f).unwrap().permissions().mode();
        assert_eq!(m & 0o777, mode, "{f:?}");
    }
    assert!(!dir.join("identity.pem").exists());
    let data = std::fs::read(dir.join("vault/data.mdb")).unwrap();
    let key = std::fs::read(&key_file).unwrap();
    let again = qgate(&["init", "--state-dir", d]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(dir.join("vault/data.mdb")).unwrap(), data);
    assert_eq!(std::fs::read(&key_file).unwrap(), key);
    // A second state dir beside it gets its own key file; an existing
    // default key file is never overwritten.
    let other = tmp("init-other");
    let _cleanup_other = Cleanup(other.clone());
    let o = other.to_str().unwrap();
    let other_key = other.with_file_name(format!(
        "{}.key",
        other.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&other_key, "keep me").unwrap();
    let clash = qgate(&["init", "--state-dir", o]);
    assert_eq!(clash.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&clash.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&other_key).unwrap(), "keep me");
    assert!(!other.join("vault").exists());
    let _ = std::fs::remove_file(&other_key);
    let _ = std::fs::remove_dir_all(&other);
    let id2: serde_json::Value =
        serde_json::from_slice(&qgate(&["id", "--json", "--state-dir", d]).stdout).unwrap();
    assert_eq!(id, id2);

    // The written config is valid; status says the node is not running.
    let cfg = dir.join("qgate.toml");
    let st = qgate(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(st.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&st.stderr).contains("is the node running"));
    // A broken config is exit 2 with one line, for any command that reads it.
    std::fs::write(&cfg, "state_dir = 5\n").unwrap();
    let st = qgate(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(st.status.code(), Some(2));
    let err = String::from_utf8_lossy(&st.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("state_dir"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&key_file).unwrap();
}

#[test]
fn help_explains_commands() {
    let out = qgate(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["init", "id", "run", "status", "key"] {
        assert!(text.contains(cmd), "{text}");
    }
    let bad = qgate(&["run"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn run_refuses_a_missing_user_before_making_anything() {
    let dir = tmp("nouser");
    let _cleanup = Cleanup(dir.clone());
    let d = dir.to_str().unwrap();
    assert!(qgate(&["init", "--state-dir", d]).status.success());
    let cfg = dir.join("qgate.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("# user = \"qgate\""), "{text}");
    assert!(
        text.contains("[inbound]\n") && text.contains("# allow = []"),
        "{text}"
    );
    std::fs::write(
        &cfg,
        text.replace("# user = \"qgate\"", "user = \"qgate-no-such-user\""),
    )
    .unwrap();
    let out = qgate(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "user \"qgate-no-such-user\" does not exist: create it with `useradd --system"
        ),
        "{err}"
    );
    assert!(!dir.join("control.sock").exists());
    // A bad [inbound] entry is a config error naming the key.
    std::fs::write(&cfg, text.replace("# allow = []", "allow = [\"tcp/http\"]")).unwrap();
    let out = qgate(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inbound.allow[0]"), "{err}");
}

fn qgate_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .env_remove("QGATE_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `init --user` writes the `user` line, `--advertise` puts the reachable
/// endpoint in the config and the peer URI, and the commands find the
/// config through QGATE_CONFIG (or the install's path) without --config.
#[test]
fn init_user_and_advertise_and_config_without_flags() {
    let dir = tmp("adv");
    let _cleanup = Cleanup(dir.clone());
    let d = dir.to_str().unwrap();
    let out = qgate(&[
        "init",
        "--state-dir",
        d,
        "--listen",
        "0.0.0.0:7300",
        "--user",
        "root",
        "--advertise",
        "198.18.0.9:7300",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let cfg_path = dir.join("qgate.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(cfg.contains("\nuser = \"root\"\n"), "{cfg}");
    assert!(
        cfg.contains("\nadvertise = [\"198.18.0.9:7300\"]\n"),
        "{cfg}"
    );
    let uri_line = text.lines().find(|l| l.starts_with("peer URI")).unwrap();
    assert!(uri_line.ends_with("/198.18.0.9:7300"), "{text}");
    // `qgate id` without --state-dir or --config: QGATE_CONFIG names it.
    let c = cfg_path.to_str().unwrap();
    let id = qgate_env(&["id"], &[("QGATE_CONFIG", c)]);
    assert!(id.status.success(), "{id:?}");
    let id_text = String::from_utf8_lossy(&id.stdout);
    assert!(
        id_text.contains(&uri_line["peer URI ".len()..]),
        "{id_text}"
    );
    // No node runs: status says so, having found the config.
    let st = qgate_env(&["status"], &[("QGATE_CONFIG", c)]);
    assert_eq!(st.status.code(), Some(1), "{st:?}");
    assert!(String::from_utf8_lossy(&st.stderr).contains("is the node running?"));
    // Without any, the install's path is used when it exists, else one
    // line says what to do (exit 2).
    let none = qgate_env(&["status"], &[]);
    let err = String::from_utf8_lossy(&none.stderr);
    if std::path::Path::new("/var/lib/qgate/qgate.toml").exists() {
        assert!(!err.contains("no configuration file"), "{err}");
    } else {
        assert_eq!(none.status.code(), Some(2), "{none:?}");
        assert_eq!(
            err.trim(),
            "qgate: no configuration file: pass --config FILE or set QGATE_CONFIG (there is no /var/lib/qgate/qgate.toml; `qgate init --state-dir /var/lib/qgate` makes one)"
        );
    }
    // An advertised endpoint must be reachable: no wildcard, no port 0.
    let other = tmp("adv-bad");
    let _cleanup_other = Cleanup(other.clone());
    let bad = qgate(&[
        "init",
        "--state-dir",
        other.to_str().unwrap(),
        "--advertise",
        "0.0.0.0:7300",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(!other.exists(), "made a state dir for a refused init");
}

/// A peer URI with no endpoint is accepted (the DHT may know where that
/// node is) but warned about at start, saying what to append.
#[test]
fn endpointless_peer_uri_is_warned_about_at_start() {
    use std::io::Read;
    let (dir, other) = (tmp("noep"), tmp("noep-peer"));
    let _c1 = Cleanup(dir.clone());
    let _c2 = Cleanup(other.clone());
    let port = 40000 + (std::process::id() % 20000);
    let listen = format!("127.0.0.1:{port}");
    for (d, l) in [(&dir, listen.as_str()), (&other, "0.0.0.0:7300")] {
        let out = qgate(&["init", "--state-dir", d.to_str().unwrap(), "--listen", l]);
        assert!(out.status.success(), "{out:?}");
    }
    let id: serde_json::Value = serde_json::from_slice(
        &qgate(&["id", "--json", "--state-dir", other.to_str().unwrap()]).stdout,
    )
    .unwrap();
    let uri = id["uri"].as_str().unwrap().to_string();
    assert_eq!(uri.matches('/').count(), 4, "{uri} has an endpoint");
    let cfg = dir.join("qgate.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // A dedicated relay: no TUN, so this runs without privileges.
    let text = text
        .replacen("peers = [\n]", &format!("peers = [\"{uri}\"]"), 1)
        .replacen("# role = \"node\"", "role = \"relay\"", 1);
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Up once the control socket answers; then stop it.
    let up = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        qgate(&["status", "--config", cfg.to_str().unwrap()])
            .status
            .success()
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let log = reader.join().unwrap();
    assert!(up, "the relay did not come up: {log}");
    let short = &id["node_id"].as_str().unwrap()[..16];
    let line = log
        .lines()
        .find(|l| l.contains("has no endpoint"))
        .unwrap_or_else(|| panic!("no warning in {log}"));
    assert!(line.contains(" WARN ") && line.contains(short), "{line}");
    assert!(
        line.contains("append /IP:PORT") && line.contains(&format!("{uri}/198.18.0.2:7300")),
        "{line}"
    );
}

/// Stops a node started by a test, also when the test fails.
struct Stop(std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// The typed answers of qgate-api carry every field a node sends: each
/// `--json` answer read into its type and written again is the same JSON,
/// and the text commands render from the typed answers.
#[test]
fn typed_answers_carry_every_field_the_node_sends() {
    let dir = tmp("typed");
    let _c = Cleanup(dir.clone());
    let port = 40000 + ((std::process::id() + 7) % 20000);
    let listen = format!("127.0.0.1:{port}");
    let out = qgate(&[
        "init",
        "--state-dir",
        dir.to_str().unwrap(),
        "--listen",
        &listen,
    ]);
    assert!(out.status.success(), "{out:?}");
    let cfg = dir.join("qgate.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // A dedicated relay: no TUN, so this runs without privileges.
    std::fs::write(
        &cfg,
        text.replacen("# role = \"node\"", "role = \"relay\"", 1),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let _node = Stop(
        Command::new(env!("CARGO_BIN_EXE_qgate"))
            .args(["run", "--config", cfg])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let st = qgate(&["status", "--config", cfg, "--wait", "10"]);
    assert!(st.status.success(), "{st:?}");
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains(&format!(
            "listen    {listen}   role relay (no TUN: forwards only)\n"
        )),
        "{text}"
    );
    assert!(text.contains("links     0 up of 0\n"), "{text}");

    fn same<T: serde::de::DeserializeOwned + serde::Serialize>(cfg: &str, cmd: &str) -> T {
        let out = qgate(&[cmd, "--config", cfg, "--json"]);
        assert!(out.status.success(), "{out:?}");
        let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let typed: T = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), raw, "{cmd}");
        typed
    }
    let status: qgate_api::Status = same(cfg, "status");
    assert!(status.other.is_empty(), "{:?}", status.other);
    assert_eq!(status.api, qgate_api::API_VERSION);
    assert_eq!(status.role, qgate_api::Role::Relay);
    assert_eq!(status.preset, qgate_api::Preset::Balanced);
    assert!(status.tun.is_none());
    let peers: qgate_api::Peers = same(cfg, "peers");
    assert_eq!(peers.node_id, status.node_id);
    let _: qgate_api::Circuits = same(cfg, "circuits");
    let text = String::from_utf8_lossy(&qgate(&["circuits", "--config", cfg]).stdout).to_string();
    assert!(
        text.contains("built here: 0   (relay pool: 0 known relays)\n"),
        "{text}"
    );

    // A bad target is refused with the command and what is wrong.
    let out = qgate(&["lookup", "fd00::1", "--config", cfg]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lookup: fd00::1 is not an overlay address"),
        "{err}"
    );
}
