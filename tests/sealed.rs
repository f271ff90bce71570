//! The sealed state through the command line: refusals (no key, wrong key,
//! tampered vault), passphrases (on a file descriptor and on a terminal),
//! migration of a plaintext state, and key rotation interrupted after every
//! step by a real process exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use qgate::proto::Identity;
use qgate::shell::vault::{KeySource, StoredPeer, Vault};

fn qgate(args: &[&str]) -> Output {
    qgate_env(args, &[])
}

fn qgate_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs qgate through bash so a passphrase can be given on fd 3.
fn qgate_pass(args: &str, pass: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("exec \"$QGATE\" {args} 3<<'EOF'\n{pass}\nEOF"))
        .env("QGATE", env!("CARGO_BIN_EXE_qgate"))
        .output()
        .unwrap()
}

/// `qgate id --json` on a passphrase vault, the passphrase on fd 3.
fn id_by_passphrase(state: &str, pass: &str) -> Output {
    qgate_pass(
        &format!("id --json --state-dir {state} --passphrase-fd 3"),
        pass,
    )
}

/// Runs qgate on a terminal: `script` gives it a pty as its controlling
/// terminal. Each answer is typed once the next prompt has appeared (and
/// echo had time to go off). Returns the exit code and everything the
/// terminal showed. Bounded: 30 s in all, then the run is killed.
fn qgate_on_tty(args: &str, answers: &[&str]) -> (Option<i32>, String) {
    use std::io::{Read, Write};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let mut child = Command::new("script")
        .args([
            "-qefc",
            &format!("{} {args}", env!("CARGO_BIN_EXE_qgate")),
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    let shown = Arc::new(Mutex::new(String::new()));
    let mut out = child.stdout.take().unwrap();
    let sink = shown.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stdin = child.stdin.take().unwrap();
    for (i, answer) in answers.iter().enumerate() {
        while shown.lock().unwrap().matches("passphrase").count() <= i && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = writeln!(stdin, "{answer}");
    }
    drop(stdin);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    let text = shown.lock().unwrap().clone();
    (code, text)
}

/// A scratch directory holding state dirs and key files; removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("qgate-sealed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn p(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// A refusal: exit 1, one line on stderr containing `what`.
fn refused(o: &Output, what: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.lines().count(), 1, "not one line: {e}");
    assert!(e.contains(what), "expected {what:?} in: {e}");
}

fn node_id(o: &Output) -> String {
    assert!(o.status.success(), "{}", stderr(o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["node_id"].as_str().unwrap().to_string()
}

/// Every file under the vault, for "nothing was changed".
fn snapshot(state: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(state).join("vault");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "lock.mdb")
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

fn peers() -> Vec<([u8; 32], StoredPeer)> {
    (1..=5u8)
        .map(|i| {
            (
                [i; 32],
                StoredPeer {
                    record: format!("record of peer {i}").into_bytes(),
                    source: 1,
                    last_seen_unix: 1_700_000_000 + u64::from(i),
                },
            )
        })
        .collect()
}

#[test]
fn no_key_wrong_key_and_tampered_vault_are_refused() {
    let s = Scratch::new("refuse");
    let (state, key) = (s.p("node"), s.p("usb.key"));
    let init = qgate(&["init", "--state-dir", &state, "--key-file", &key]);
    assert!(init.status.success(), "{}", stderr(&init));
    let cfg = format!("{state}/qgate.toml");
    // The config names the key file init made.
    assert!(std::fs::read_to_string(&cfg).unwrap().contains("usb.key"));
    let id = node_id(&qgate(&[
        "id",
        "--json",
        "--state-dir",
        &state,
        "--key-file",
        &key,
    ]));
    let before = snapshot(&state);

    // No key: the "USB stick" is not there.
    std::fs::rename(&key, s.p("elsewhere.key")).unwrap();
    refused(&qgate(&["run", "--config", &cfg]), "not found");
    refused(
        &qgate(&["id", "--state-dir", &state, "--key-file", &key]),
        "not found",
    );
    // No key option: the config's key_file is used, and it is missing.
    refused(&qgate(&["id", "--state-dir", &state]), "not found");
    // Wrong key.
    let wrong = s.p("wrong.key");
    assert!(qgate(&["key", "new", "--key-file", &wrong])
        .status
        .success());
    refused(
        &qgate(&["run", "--config", &cfg, "--key-file", &wrong]),
        "wrong key",
    );
    // A passphrase is a wrong key for a key-file vault.
    refused(
        &qgate_pass(
            &format!("id --state-dir {state} --passphrase-fd 3"),
            "guess",
        ),
        "wrong key",
    );
    assert_eq!(snapshot(&state), before, "a refusal changed the vault");
    std::fs::rename(s.p("elsewhere.key"), &key).unwrap();

    // Tampered: a byte flipped inside a stored value (the probe is a test
    // hook: scripts/test builds with `test-hooks`).
    #[cfg(feature = "test-hooks")]
    {
        // Tampered: a byte flipped inside a stored value. The probe tells where
        // the value was sealed, so the flip cannot miss.
        let marker = b"VALUE-TO-TAMPER-WITH";
        {
            let v = Vault::open(Path::new(&state), &KeySource::File(key.clone().into())).unwrap();
            let mut p = peers();
            p[2].1.record = marker.to_vec();
            qgate::shell::vault::probe::start(marker);
            v.replace_all(&p).unwrap();
            let data = format!("{state}/vault/data.mdb");
            let at =
                qgate::shell::vault::probe::take(Path::new(&data)).expect("the marker was sealed");
            v.close();
            let mut bytes = std::fs::read(&data).unwrap();
            bytes[at as usize + 5] ^= 0x01;
            std::fs::write(&data, &bytes).unwrap();
        }
        let tampered = snapshot(&state);
        refused(&qgate(&["run", "--config", &cfg]), "failed authentication");
        refused(
            &qgate(&["id", "--state-dir", &state, "--key-file", &key]),
            "failed authentication",
        );
        assert_eq!(snapshot(&state), tampered, "a refusal changed the vault");
    }
    assert_eq!(id.len(), 64);
}

/// `--ask-passphrase` prompts on the terminal with echo off: twice at
/// init (and refuses two different answers, writing nothing), once to open.
#[test]
fn passphrase_asked_on_the_terminal() {
    let s = Scratch::new("tty");
    let state = s.p("node");
    let good = "tty horse battery staple";
    let (code, shown) = qgate_on_tty(
        &format!("init --state-dir {state} --ask-passphrase"),
        &[good, "tty horse battery stapler"],
    );
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("the passphrases differ"), "{shown}");
    assert!(!Path::new(&state).exists(), "a refused init wrote {state}");
    let (code, shown) = qgate_on_tty(
        &format!("init --state-dir {state} --ask-passphrase"),
        &[good, good],
    );
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("the same passphrase again"), "{shown}");
    assert!(!shown.contains(good), "the passphrase was echoed: {shown}");
    // The prompt opens what --passphrase-fd opens, and refuses a wrong one.
    let (code, shown) = qgate_on_tty(
        &format!("id --json --state-dir {state} --ask-passphrase"),
        &[good],
    );
    assert_eq!(code, Some(0), "{shown}");
    let by_fd = node_id(&id_by_passphrase(&state, good));
    assert!(shown.contains(&by_fd), "{shown}");
    let (code, shown) = qgate_on_tty(
        &format!("id --json --state-dir {state} --ask-passphrase"),
        &["tty horse"],
    );
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("wrong key"), "{shown}");
}

#[test]
fn passphrase_vault() {
    let s = Scratch::new("pass");
    let state = s.p("node");
    let init = qgate_pass(
        &format!("init --state-dir {state} --passphrase-fd 3"),
        "correct horse battery staple",
    );
    assert!(init.status.success(), "{}", stderr(&init));
    assert!(
        !Path::new(&format!("{state}.key")).exists(),
        "no key file for a passphrase vault"
    );
    let a = node_id(&id_by_passphrase(&state, "correct horse battery staple"));
    assert_eq!(a.len(), 64);
    refused(
        &id_by_passphrase(&state, "correct horse battery stapler"),
        "wrong key",
    );
    // Without a passphrase option: told to give one.
    refused(&qgate(&["id", "--state-dir", &state]), "passphrase");
    // Rotate from the passphrase to a key file.
    let k = s.p("new.key");
    let r = qgate_pass(
        &format!("key rotate --state-dir {state} --passphrase-fd 3 --new-key-file {k}"),
        "correct horse battery staple",
    );
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(
        node_id(&qgate(&[
            "id",
            "--json",
            "--state-dir",
            &state,
            "--key-file",
            &k
        ])),
        a
    );
}

#[test]
fn plaintext_state_is_sealed_on_first_start_with_a_key() {
    let s = Scratch::new("migrate");
    let state = s.p("node");
    let dir = Path::new(&state);
    std::fs::create_dir_all(dir).unwrap();
    let id = Identity::generate(&mut rand_core::OsRng).unwrap();
    let pem = id.rsa_pem().unwrap();
    std::fs::write(dir.join("identity.pem"), &pem).unwrap();
    let link = base64::engine::general_purpose::STANDARD.encode(id.link_secret_bytes());
    std::fs::write(dir.join("link.key"), format!("{link}\n")).unwrap();
    std::fs::write(dir.join("record.seq"), "77\n").unwrap();
    // Without a key: refused, with a line that says how to migrate.
    let o = qgate(&["id", "--state-dir", &state]);
    refused(&o, "seal it once");
    assert!(stderr(&o).contains("qgate key new"));
    assert!(
        dir.join("identity.pem").exists(),
        "the refusal removed keys"
    );
    // With a key: sealed once, plaintext gone, same identity.
    let k = s.p("node.key");
    assert!(qgate(&["key", "new", "--key-file", &k]).status.success());
    let got = node_id(&qgate(&[
        "id",
        "--json",
        "--state-dir",
        &state,
        "--key-file",
        &k,
    ]));
    assert_eq!(got, id.node_id().to_string());
    for f in ["identity.pem", "link.key", "record.seq"] {
        assert!(!dir.join(f).exists(), "{f} left in the clear");
    }
    // The default key file (DIR.key) is found without an option.
    let again = node_id(&qgate(&["id", "--json", "--state-dir", &state]));
    assert_eq!(again, got);
    let v = Vault::open(dir, &KeySource::File(k.into())).unwrap();
    assert_eq!(v.record_seq().unwrap(), 77);
    v.close();
}

#[test]
fn rotation_interrupted_after_each_step_loses_nothing() {
    for step in ["write", "sync", "swap", "cleanup"] {
        let s = Scratch::new(&format!("rotate-{step}"));
        let (state, old, new) = (s.p("node"), s.p("old.key"), s.p("new.key"));
        assert!(qgate(&["init", "--state-dir", &state, "--key-file", &old])
            .status
            .success());
        let id = node_id(&qgate(&[
            "id",
            "--json",
            "--state-dir",
            &state,
            "--key-file",
            &old,
        ]));
        {
            let v = Vault::open(Path::new(&state), &KeySource::File(old.clone().into())).unwrap();
            v.replace_all(&peers()).unwrap();
            v.close();
        }
        let o = qgate_env(
            &[
                "key",
                "rotate",
                "--state-dir",
                &state,
                "--key-file",
                &old,
                "--new-key-file",
                &new,
            ],
            &[("QGATE_FAULT", &format!("rotate-after-{step}"))],
        );
        assert_eq!(o.status.code(), Some(86), "{step}: {}", stderr(&o));
        let (opens, other) = if step == "write" || step == "sync" {
            (&old, &new)
        } else {
            (&new, &old)
        };
        // The other key gets one clear line and changes nothing ...
        let e = qgate(&["id", "--json", "--state-dir", &state, "--key-file", other]);
        assert_eq!(e.status.code(), Some(1), "{step}");
        let msg = stderr(&e);
        assert!(
            msg.contains("interrupted key rotation") || msg.contains("wrong key"),
            "{step}: {msg}"
        );
        // ... the right one opens everything.
        assert_eq!(
            node_id(&qgate(&[
                "id",
                "--json",
                "--state-dir",
                &state,
                "--key-file",
                opens
            ])),
            id,
            "{step}"
        );
        let v = Vault::open(Path::new(&state), &KeySource::File(opens.clone().into())).unwrap();
        assert_eq!(v.load().unwrap(), peers(), "{step}: peers lost");
        v.close();
    }
}

#[test]
fn init_hands_the_state_to_the_user() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new("user");
    let state = s.p("node");
    // An unknown user: refused before anything is written.
    let o = qgate(&["init", "--state-dir", &state, "--user", "no-such-user-qg"]);
    refused(&o, "does not exist");
    assert!(!Path::new(&state).exists());
    assert!(!Path::new(&format!("{state}.key")).exists());
    // `nobody` exists everywhere; handing over needs root.
    if !nix_root() {
        eprintln!("not root: skipping the handover half");
        return;
    }
    let o = qgate(&["init", "--state-dir", &state, "--user", "nobody"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let uid = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    for p in [
        state.clone(),
        format!("{state}/vault"),
        format!("{state}/vault/data.mdb"),
        format!("{state}/vault/header"),
        format!("{state}.key"),
    ] {
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), uid, "{p}");
    }
}

fn nix_root() -> bool {
    nix::unistd::geteuid().is_root()
}
