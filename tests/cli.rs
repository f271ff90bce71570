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
