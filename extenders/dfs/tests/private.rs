//! Private storage with real `qdfs` processes on loopback (127.0.0.1
//! only): holders are `qdfs serve` with a quota, given to the owner with
//! `--holder`; where the DHT matters (a fresh install that has only the
//! owner key) a stand-in for the node's control socket keeps DHT values
//! in memory.
//!
//! Run: `cargo test -p qdfs --test private`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use qdfs::cap::Capability;
use serde_json::{json, Value};

const QDFS: &str = env!("CARGO_BIN_EXE_qdfs");
const MARKER: &[u8] = b"PLAINTEXT-MARKER-q7Zr3";

/// Test data with a distinctive plaintext marker every 4 KiB.
fn test_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        if out.len() % 4096 == 0 {
            out.extend_from_slice(MARKER);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Serve {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Serve {
    /// `qdfs serve` in `dir` (store in `dir/store`) with extra config lines.
    fn start(dir: &Path, data_dir: &str, extra: &str) -> Serve {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("qdfs.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = \"{data_dir}\"\nlisten = \"127.0.0.1:0\"\nannounce = false\ncontrol_socket = \"no-node.sock\"\n{extra}\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("serve.log")).unwrap();
        let mut child = Command::new(QDFS)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", "qdfs=debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected serve output {line:?}"))
            .parse()
            .unwrap();
        Serve {
            child,
            addr,
            dir: dir.into(),
        }
    }

    fn holder(dir: &Path, quota: &str) -> Serve {
        Serve::start(dir, "store", &format!("quota = \"{quota}\""))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn status(&self) -> Value {
        let out = qdfs(&[
            "status",
            "--json",
            "--data-dir",
            self.dir.join("store").to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `qdfs ARGS`, killed after two minutes.
fn qdfs(args: &[&str]) -> Output {
    let mut child = Command::new(QDFS)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("qdfs {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `args` followed by `--holder A` for every holder.
fn with_holders<'a>(args: &[&'a str], holders: &'a [String]) -> Vec<&'a str> {
    let mut v: Vec<&str> = args.to_vec();
    for h in holders {
        v.push("--holder");
        v.push(h);
    }
    v
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout {}\nstderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn addrs(hs: &[&Serve]) -> Vec<String> {
    hs.iter().map(|h| h.addr.to_string()).collect()
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

fn contains_marker(dir: &Path) -> Option<PathBuf> {
    files_under(dir).into_iter().find(|p| {
        std::fs::read(p)
            .map(|b| b.windows(MARKER.len()).any(|w| w == MARKER))
            .unwrap_or(false)
    })
}

fn share_cap(owner: &Path, id: &str) -> Capability {
    let out = qdfs(&[
        "share",
        id,
        "--no-dht",
        "--data-dir",
        owner.to_str().unwrap(),
    ]);
    ok(&out).trim().parse().unwrap()
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

#[test]
fn store_lose_three_fetch_and_repair() {
    let tmp = tempfile::tempdir().unwrap();
    let mut holders: Vec<Serve> = (0..9)
        .map(|i| Serve::holder(&tmp.path().join(format!("h{i}")), "64 MiB"))
        .collect();
    let data = test_data(3 * 1024 * 1024 + 777, 11);
    let file = tmp.path().join("secret.bin");
    std::fs::write(&file, &data).unwrap();
    let owner = tmp.path().join("owner");
    let od = owner.to_str().unwrap();
    // Stored on seven of the nine (the other two are spares for repair).
    let first7 = addrs(&holders.iter().take(7).collect::<Vec<_>>());
    let out = qdfs(&with_holders(
        &[
            "store",
            file.to_str().unwrap(),
            "--no-dht",
            "--data-dir",
            od,
        ],
        &first7,
    ));
    let id = ok(&out).trim().to_string();
    assert_eq!(id.len(), 16, "{id}");
    let key = owner.join("owner.key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions())
            & 0o777,
        0o600
    );

    let listing = ok(&qdfs(&["ls", "--no-dht", "--data-dir", od]));
    assert!(
        listing.contains(&id) && listing.contains("secret.bin"),
        "{listing}"
    );

    // No holder has any plaintext.
    for h in &holders {
        assert_eq!(contains_marker(&h.dir), None);
    }
    assert!(contains_marker(tmp.path().join("h0").as_path()).is_none());

    // Six distinct holders, then three of them lost.
    let cap = share_cap(&owner, &id);
    let held: Vec<SocketAddr> = cap.shares.iter().map(|s| s.hints[0]).collect();
    assert_eq!(held.iter().collect::<HashSet<_>>().len(), 6);
    let mut killed = HashSet::new();
    for h in holders.iter_mut() {
        if killed.len() < 3 && held.contains(&h.addr) {
            h.kill();
            killed.insert(h.addr);
        }
    }
    let got = tmp.path().join("got.bin");
    ok(&qdfs(&[
        "fetch",
        &id,
        "-o",
        got.to_str().unwrap(),
        "--no-dht",
        "--data-dir",
        od,
    ]));
    assert!(std::fs::read(&got).unwrap() == data, "fetched file differs");

    // The owner's serve repairs: after the grace period every share is
    // held again on six distinct live holders.
    let all: Vec<String> = holders.iter().map(|h| format!("\"{}\"", h.addr)).collect();
    let repairer = Serve::start(
        &tmp.path().join("owner-serve"),
        od,
        &format!(
            "repair_grace = 2\nrepair_interval = 1\nholders = [{}]",
            all.join(",")
        ),
    );
    let repaired = wait_until(Duration::from_secs(90), || {
        let c = share_cap(&owner, &id);
        let hs: Vec<SocketAddr> = c.shares.iter().map(|s| s.hints[0]).collect();
        hs.iter().collect::<HashSet<_>>().len() == 6 && hs.iter().all(|h| !killed.contains(h))
    });
    assert!(
        repaired,
        "not repaired; log:\n{}",
        std::fs::read_to_string(tmp.path().join("owner-serve/serve.log")).unwrap_or_default()
    );
    let c = share_cap(&owner, &id);
    for (j, s) in c.shares.iter().enumerate() {
        qdfs::repair::challenge(
            s.hints[0],
            c.share_manifest(j).unwrap(),
            j as u64,
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("share {j} on {}: {e}", s.hints[0]));
    }
    let st: Value =
        serde_json::from_slice(&std::fs::read(owner.join("repair.json")).unwrap_or_default())
            .unwrap_or(Value::Null);
    assert!(st["repairs"].as_u64().unwrap_or(0) >= 3, "{st}");

    // Lose three more holders (of the repaired placement): still readable.
    let held: Vec<SocketAddr> = c.shares.iter().map(|s| s.hints[0]).collect();
    drop(repairer);
    let mut more = 0;
    for h in holders.iter_mut() {
        if more < 3 && held.contains(&h.addr) && !killed.contains(&h.addr) {
            h.kill();
            killed.insert(h.addr);
            more += 1;
        }
    }
    let got2 = tmp.path().join("got2.bin");
    ok(&qdfs(&[
        "fetch",
        &id,
        "-o",
        got2.to_str().unwrap(),
        "--no-dht",
        "--data-dir",
        od,
    ]));
    assert!(
        std::fs::read(&got2).unwrap() == data,
        "fetched file differs"
    );
    let st = holders
        .iter()
        .find(|h| !killed.contains(&h.addr))
        .unwrap()
        .status();
    assert!(
        st["private"]["holder"]["shares_held"].as_u64().unwrap() >= 1,
        "{st}"
    );
}

#[test]
fn other_owners_and_capabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let holders: Vec<Serve> = (0..6)
        .map(|i| Serve::holder(&tmp.path().join(format!("h{i}")), "64 MiB"))
        .collect();
    let hs = addrs(&holders.iter().collect::<Vec<_>>());
    let owner = tmp.path().join("owner");
    let od = owner.to_str().unwrap();
    let a = test_data(200_000, 1);
    let b = test_data(300_000, 2);
    let (fa, fb) = (tmp.path().join("a.bin"), tmp.path().join("b.bin"));
    std::fs::write(&fa, &a).unwrap();
    std::fs::write(&fb, &b).unwrap();
    let store = |f: &Path| {
        ok(&qdfs(&with_holders(
            &["store", f.to_str().unwrap(), "--no-dht", "--data-dir", od],
            &hs,
        )))
        .trim()
        .to_string()
    };
    let (ida, idb) = (store(&fa), store(&fb));
    let listing = ok(&qdfs(&["ls", "--no-dht", "--data-dir", od]));
    assert!(
        listing.contains(&ida) && listing.contains(&idb),
        "{listing}"
    );

    // Another owner's key, even with this owner's data directory: lists
    // nothing, reads nothing.
    let other = tmp.path().join("other");
    ok(&qdfs(&[
        "key",
        "new",
        "--data-dir",
        other.to_str().unwrap(),
    ]));
    let okey = other.join("owner.key");
    let ok_ = okey.to_str().unwrap();
    let listing = ok(&qdfs(&[
        "ls",
        "--no-dht",
        "--data-dir",
        od,
        "--owner-key",
        ok_,
    ]));
    assert_eq!(listing.trim(), "");
    let stolen = tmp.path().join("stolen");
    let out = qdfs(&[
        "fetch",
        &ida,
        "-o",
        stolen.to_str().unwrap(),
        "--no-dht",
        "--data-dir",
        od,
        "--owner-key",
        ok_,
    ]);
    assert!(!out.status.success());
    assert!(!stolen.exists());
    // `key new` never replaces a key.
    assert!(
        !qdfs(&["key", "new", "--data-dir", other.to_str().unwrap()])
            .status
            .success()
    );

    // A folder: each file its own entry, named by its path.
    let folder = tmp.path().join("album");
    std::fs::create_dir_all(folder.join("2024")).unwrap();
    std::fs::write(folder.join("top.txt"), b"top").unwrap();
    let deep = test_data(50_000, 4);
    std::fs::write(folder.join("2024/deep.bin"), &deep).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", folder.join("link")).unwrap();
    let out = ok(&qdfs(&with_holders(
        &[
            "store",
            folder.to_str().unwrap(),
            "--no-dht",
            "--data-dir",
            od,
        ],
        &hs,
    )));
    assert_eq!(out.lines().count(), 3, "two files and the folder: {out}");
    let listing = ok(&qdfs(&["ls", "--no-dht", "--data-dir", od]));
    assert!(listing.contains("album/2024/deep.bin") && listing.contains("album/top.txt"));
    assert!(!listing.contains("link"), "{listing}");
    let got_deep = tmp.path().join("deep.out");
    ok(&qdfs(&[
        "fetch",
        "album/2024/deep.bin",
        "-o",
        got_deep.to_str().unwrap(),
        "--no-dht",
        "--data-dir",
        od,
    ]));
    assert!(std::fs::read(&got_deep).unwrap() == deep);

    // The folder's capability reads exactly that folder, for anyone: a
    // directory with its two files, no owner key needed.
    let fcap = ok(&qdfs(&["share", "album/", "--no-dht", "--data-dir", od]))
        .trim()
        .to_string();
    assert!(fcap.starts_with("qdfs:folder:"), "{fcap}");
    let stranger = tmp.path().join("stranger");
    let got_dir = stranger.join("album.out");
    ok(&qdfs(&[
        "fetch",
        &fcap,
        "-o",
        got_dir.to_str().unwrap(),
        "--no-dht",
        "--data-dir",
        stranger.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(got_dir.join("top.txt")).unwrap(), b"top");
    assert!(std::fs::read(got_dir.join("2024/deep.bin")).unwrap() == deep);
    let names: Vec<_> = std::fs::read_dir(&got_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "exactly the folder's entries: {names:?}");
    assert!(!stranger.join("owner.key").exists());
    // A folder capability is not a file capability (and the other way).
    let as_file = fcap.replacen("qdfs:folder:", "qdfs:cap:", 1);
    let out = qdfs(&[
        "fetch",
        &as_file,
        "-o",
        stranger.join("listing.json").to_str().unwrap(),
        "--no-dht",
        "--data-dir",
        stranger.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "the listing itself is a sealed file");

    // A capability reads exactly its file, for anyone (no key at all).
    let cap_a = share_cap(&owner, &ida);
    let cap_b = share_cap(&owner, &idb);
    let anyone = tmp.path().join("anyone");
    let got = anyone.join("a.out");
    ok(&qdfs(&[
        "fetch",
        &cap_a.to_text(),
        "-o",
        got.to_str().unwrap(),
        "--no-dht",
        "--data-dir",
        anyone.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&got).unwrap() == a);
    assert!(!anyone.join("owner.key").exists());
    // A's key with B's shares opens nothing.
    let forged = Capability {
        file: qdfs::private::SealedFile {
            size: cap_b.file.size,
            ..cap_a.file.clone()
        },
        shares: cap_b.shares.clone(),
    };
    let bad = anyone.join("b.out");
    let out = qdfs(&[
        "fetch",
        &forged.to_text(),
        "-o",
        bad.to_str().unwrap(),
        "--no-dht",
        "--data-dir",
        anyone.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not decrypt"),
        "{out:?}"
    );
    assert!(!bad.exists());
    // A garbage capability is a clean error.
    let out = qdfs(&["fetch", "qdfs:cap:AAAA", "-o", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    for h in &holders {
        assert_eq!(contains_marker(&h.dir), None);
    }
}

#[test]
fn quota_refusal_is_clean_and_the_next_holder_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = Serve::holder(&tmp.path().join("tiny"), "10000");
    let none = Serve::holder(&tmp.path().join("none"), "0");
    let holders: Vec<Serve> = (0..6)
        .map(|i| Serve::holder(&tmp.path().join(format!("h{i}")), "64 MiB"))
        .collect();
    let owner = tmp.path().join("owner");
    let od = owner.to_str().unwrap();
    let data = test_data(1_000_000, 5);
    let f = tmp.path().join("big.bin");
    std::fs::write(&f, &data).unwrap();

    // Five that accept and two that refuse: not enough, a clear error.
    let mut five: Vec<&Serve> = holders.iter().take(5).collect();
    five.push(&tiny);
    five.push(&none);
    let out = qdfs(&with_holders(
        &["store", f.to_str().unwrap(), "--no-dht", "--data-dir", od],
        &addrs(&five),
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("placed 5 of 6") && err.contains("2 refused"),
        "{err}"
    );
    // Nothing half-written in the refusing holders.
    for h in [&tiny, &none] {
        let left: Vec<PathBuf> = files_under(&h.dir.join("store"))
            .into_iter()
            .filter(|p| !p.ends_with("stats.json") && !p.ends_with("holder.json"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
    assert!(wait_until(Duration::from_secs(5), || {
        tiny.status()["private"]["holder"]["shares_refused"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    }));

    // With a sixth that accepts, the store succeeds around the refusals.
    let mut all: Vec<&Serve> = holders.iter().collect();
    all.push(&tiny);
    all.push(&none);
    let id = ok(&qdfs(&with_holders(
        &["store", f.to_str().unwrap(), "--no-dht", "--data-dir", od],
        &addrs(&all),
    )))
    .trim()
    .to_string();
    let cap = share_cap(&owner, &id);
    for s in &cap.shares {
        assert!(s.hints[0] != tiny.addr && s.hints[0] != none.addr);
    }
    let st = tiny.status();
    assert!(
        st["private"]["holder"]["quota_used"].as_u64().unwrap() <= 10_000,
        "{st}"
    );
}

/// (namespace, key) → publisher → base64 value.
type Values = Arc<Mutex<HashMap<(String, String), HashMap<String, String>>>>;

/// A stand-in for the node's control socket: `status`, `dht_put` and
/// `dht_get` over an in-memory map (every caller publishes as one node).
struct FakeNode {
    path: PathBuf,
    values: Values,
}

impl FakeNode {
    fn start(path: &Path) -> FakeNode {
        let listener = UnixListener::bind(path).unwrap();
        let values: Values = Default::default();
        let v = Arc::clone(&values);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let Ok(req) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let s = |k: &str| req[k].as_str().unwrap_or("").to_string();
                let answer = match req["cmd"].as_str() {
                    Some("status") => json!({"ok": true, "status": {"address": "fc00::1"}}),
                    Some("dht_put") => {
                        v.lock()
                            .unwrap()
                            .entry((s("namespace"), s("key")))
                            .or_default()
                            .insert("11".repeat(32), s("value"));
                        json!({"ok": true, "status": {"stored_at": 1, "ttl": 3600}})
                    }
                    Some("dht_get") => {
                        let map = v.lock().unwrap();
                        let vals: Vec<Value> = map
                            .get(&(s("namespace"), s("key")))
                            .map(|m| {
                                m.iter()
                                    .map(|(p, v)| {
                                        json!({"publisher": p, "seq": 1,
                                               "expires": 4_000_000_000u64, "value": v})
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        json!({"ok": true, "status": {"values": vals}})
                    }
                    _ => json!({"ok": false, "error": "unknown"}),
                };
                let _ = writeln!(conn, "{answer}");
            }
        });
        FakeNode {
            path: path.into(),
            values,
        }
    }
}

#[test]
fn fresh_install_with_only_the_owner_key() {
    let tmp = tempfile::tempdir().unwrap();
    let node = FakeNode::start(&tmp.path().join("control.sock"));
    let sock = node.path.to_str().unwrap();
    let holders: Vec<Serve> = (0..6)
        .map(|i| Serve::holder(&tmp.path().join(format!("h{i}")), "64 MiB"))
        .collect();
    let hs = addrs(&holders.iter().collect::<Vec<_>>());
    let owner = tmp.path().join("owner");
    let data = test_data(500_000, 9);
    let f = tmp.path().join("doc.bin");
    std::fs::write(&f, &data).unwrap();
    let id = ok(&qdfs(&with_holders(
        &[
            "store",
            f.to_str().unwrap(),
            "--control-socket",
            sock,
            "--data-dir",
            owner.to_str().unwrap(),
        ],
        &hs,
    )))
    .trim()
    .to_string();

    // Someone else publishes junk under the owner's key: ignored.
    {
        let mut v = node.values.lock().unwrap();
        let keys: Vec<(String, String)> = v
            .keys()
            .filter(|(_, k)| k.starts_with("own/"))
            .cloned()
            .collect();
        assert_eq!(keys.len(), 1, "{keys:?}");
        v.get_mut(&keys[0]).unwrap().insert(
            "22".repeat(32),
            base64::engine::general_purpose::STANDARD.encode([0xffu8; 300]),
        );
    }

    // A fresh install: a new data directory with only a copy of the key
    // (the USB stick), no --holder.
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    let stick = tmp.path().join("stick.key");
    std::fs::copy(owner.join("owner.key"), &stick).unwrap();
    let common = [
        "--control-socket",
        sock,
        "--data-dir",
        fresh.to_str().unwrap(),
        "--owner-key",
        stick.to_str().unwrap(),
    ];
    let mut ls = vec!["ls"];
    ls.extend(common);
    let listing = ok(&qdfs(&ls));
    assert!(
        listing.contains(&id) && listing.contains("doc.bin"),
        "{listing}"
    );
    let got = tmp.path().join("doc.out");
    let mut fetch = vec!["fetch", id.as_str(), "-o", got.to_str().unwrap()];
    fetch.extend(common);
    ok(&qdfs(&fetch));
    assert!(std::fs::read(&got).unwrap() == data);
    // Without the DHT and without the local pointer: nothing to list.
    let mut ls = vec!["ls", "--no-dht"];
    ls.extend(&common[2..]);
    assert_eq!(ok(&qdfs(&ls)).trim(), "");
}

/// A holder that answers every `PutShare` with `Stored` and holds nothing.
fn lying_holder() -> SocketAddr {
    use qdfs::wire::{read_frame, ErrorCode, Request, Response, MAX_REQUEST_FRAME};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(100) {
            let Ok(mut s) = s else { return };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            while let Ok(body) = read_frame(&mut s, MAX_REQUEST_FRAME) {
                let r = match Request::parse(&body) {
                    Ok(Request::Hello { version }) => Response::Hello { version },
                    Ok(Request::PutShare { .. }) => Response::Stored,
                    Ok(_) => Response::Error {
                        code: ErrorCode::NotFound,
                    },
                    Err(_) => break,
                };
                if s.write_all(&r.encode()).is_err() {
                    break;
                }
            }
        }
    });
    addr
}

#[test]
fn a_holder_claiming_to_store_must_prove_it() {
    let tmp = tempfile::tempdir().unwrap();
    let holders: Vec<Serve> = (0..6)
        .map(|i| Serve::holder(&tmp.path().join(format!("h{i}")), "64 MiB"))
        .collect();
    let liar = lying_holder();
    let mut hs = vec![liar.to_string()];
    hs.extend(addrs(&holders.iter().collect::<Vec<_>>()));
    let owner = tmp.path().join("owner");
    let data = test_data(100_000, 3);
    let f = tmp.path().join("x.bin");
    std::fs::write(&f, &data).unwrap();
    let id = ok(&qdfs(&with_holders(
        &[
            "store",
            f.to_str().unwrap(),
            "--no-dht",
            "--data-dir",
            owner.to_str().unwrap(),
        ],
        &hs,
    )))
    .trim()
    .to_string();
    let cap = share_cap(&owner, &id);
    assert!(cap.shares.iter().all(|s| s.hints[0] != liar));
    // With the liar and only five honest holders the store is refused.
    let out = qdfs(&with_holders(
        &[
            "store",
            f.to_str().unwrap(),
            "--no-dht",
            "--data-dir",
            owner.to_str().unwrap(),
        ],
        &hs[..6],
    ));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("placed 5 of 6"),
        "{out:?}"
    );
}
