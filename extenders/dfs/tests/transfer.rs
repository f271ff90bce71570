//! Real `qdfs` processes on loopback (127.0.0.1 and ::1 only): three
//! providers serving a multi-MiB file, one killed mid-transfer, the fetch
//! interrupted with SIGINT and resumed, and providers serving corrupted
//! chunk groups (the `test-hooks` feature; `cargo test -p qdfs --features
//! test-hooks`, as scripts/test runs it).
//!
//! Providers are slowed with `peer_rate` so that "mid-transfer" lasts long
//! enough to act in, whatever the machine: 12 MiB from three providers at
//! 2 MB/s each takes at least 2 s, and the fetch is interrupted well before.

mod common;

use common::{test_data, QDFS};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Provider {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Provider {
    /// Adds `file` to a new store in `dir` and serves it on `listen`.
    fn start(dir: &Path, file: &Path, listen: &str, rate: u64, corrupt: Option<&str>) -> Provider {
        Provider::start_with(dir, file, listen, rate, corrupt, "")
    }

    /// As [`Provider::start`], with `extra` lines in its configuration.
    fn start_with(
        dir: &Path,
        file: &Path,
        listen: &str,
        rate: u64,
        corrupt: Option<&str>,
        extra: &str,
    ) -> Provider {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("qdfs.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = \"store\"\nlisten = \"{listen}\"\nannounce = false\npeer_rate = {rate}\n{extra}"
            ),
        )
        .unwrap();
        let add = Command::new(QDFS)
            .args([
                "add",
                file.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(add.status.success(), "{add:?}");
        let mut cmd = Command::new(QDFS);
        cmd.args(["serve", "--config", cfg.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(c) = corrupt {
            cmd.env("QDFS_TEST_CORRUPT_GROUP", c);
        }
        let mut child = cmd.spawn().unwrap();
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
        Provider {
            child,
            addr,
            dir: dir.into(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Bytes this provider has served, from its stats file.
    fn bytes_served(&self) -> u64 {
        let b = std::fs::read(self.dir.join("store/stats.json")).unwrap_or_default();
        serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null)["bytes_served"]
            .as_u64()
            .unwrap_or(0)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.kill();
    }
}

fn get_cmd(id: &str, out: &Path, providers: &[&Provider]) -> Command {
    let mut c = Command::new(QDFS);
    c.args([
        "get",
        id,
        "-o",
        out.to_str().unwrap(),
        "--json",
        "--no-dht",
        "--no-provide",
    ]);
    for p in providers {
        c.args(["--provider", &p.addr.to_string()]);
    }
    c
}

/// The final `{"event":"done",...}` line of a `qdfs get --json`.
fn done_event(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.contains("\"event\":\"done\""))
        .unwrap_or_else(|| {
            panic!(
                "no done event; stdout {stdout} stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

fn add_id(file: &Path, dir: &Path) -> String {
    let out = Command::new(QDFS)
        .args(["add", file.to_str().unwrap(), "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn three_providers_one_killed_interrupted_and_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 12 << 20;
    let data = test_data(size, 1);
    let src = tmp.path().join("source.bin");
    std::fs::write(&src, &data).unwrap();
    let id = add_id(&src, &tmp.path().join("idstore"));
    assert_eq!(id.len(), 64);

    // 2 MB/s each: 6 MB/s from three, so the file takes about 2 s.
    let rate = 2_000_000;
    let mut a = Provider::start(&tmp.path().join("a"), &src, "127.0.0.1:0", rate, None);
    let b = Provider::start(&tmp.path().join("b"), &src, "[::1]:0", rate, None);
    let c = Provider::start(&tmp.path().join("c"), &src, "127.0.0.1:0", rate, None);
    let out = tmp.path().join("fetched.bin");

    let started = Instant::now();
    let first = get_cmd(&id, &out, &[&a, &b, &c])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill a once its counters show it serving (its stats are written
    // twice a second), then interrupt the fetch a little later.
    let serving = qdfs_wait(Duration::from_secs(10), || a.bytes_served() > 0);
    let a_served = a.bytes_served();
    a.kill();
    std::thread::sleep(Duration::from_millis(400));
    sigint(first.id());
    let first = first.wait_with_output().unwrap();
    assert_eq!(
        first.status.code(),
        Some(130),
        "interrupted fetch: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        serving && a_served > 0,
        "the killed provider served before it died"
    );
    assert!(!out.exists(), "no output before it is whole");

    let second = get_cmd(&id, &out, &[&a, &b, &c]).output().unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let elapsed = started.elapsed();
    assert_eq!(std::fs::read(&out).unwrap(), data, "fetched bytes differ");
    let done = done_event(&second);
    let f = &done["files"][0];
    let already = f["already"].as_u64().unwrap();
    let total = f["received_total"].as_u64().unwrap();
    assert!(already > 0, "the second run resumed: {f}");
    assert!(
        (total as f64) < size as f64 * 1.05,
        "received {total} bytes over both runs for {size}"
    );
    let providers = f["providers"].as_array().unwrap();
    assert_eq!(providers[0]["outcome"]["state"], "failed", "{f}");
    assert!(b.bytes_served() > 0 && c.bytes_served() > 0);
    for p in &providers[1..] {
        assert_eq!(p["outcome"]["state"], "finished", "{f}");
        assert!(p["groups"].as_u64().unwrap() > 0, "{f}");
    }
    eprintln!(
        "12 MiB from 3 rate-limited providers, one killed, interrupted and resumed in {:.2} s; \
         {already} bytes kept across the interruption, {total} bytes received in all ({:.2} % over the size)",
        elapsed.as_secs_f64(),
        (total as f64 / size as f64 - 1.0) * 100.0
    );
}

fn sigint(pid: u32) {
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn unreachable_and_unknown_are_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("small.bin");
    std::fs::write(&src, test_data(100_000, 2)).unwrap();
    let p = Provider::start(&tmp.path().join("p"), &src, "127.0.0.1:0", 0, None);
    let out = tmp.path().join("x");
    let unknown = "ab".repeat(32);
    let r = get_cmd(&unknown, &out, &[&p]).output().unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("no provider had"));
    let r = Command::new(QDFS)
        .args(["get", "nothex", "-o", "/tmp/nowhere", "--no-dht"])
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(!out.exists());
    // With room for one provider at a time, a dead first provider is
    // replaced by the next one given.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let id = add_id(&src, &tmp.path().join("idstore"));
    let mut cmd = get_cmd(&id, &out, &[]);
    cmd.args(["--max-providers", "1", "--provider", &dead.to_string()]);
    cmd.args(["--provider", &p.addr.to_string()]);
    let r = cmd.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    let f = &done_event(&r)["files"][0];
    assert_eq!(f["providers"][0]["outcome"]["state"], "failed", "{f}");
    assert_eq!(f["providers"][1]["outcome"]["state"], "finished", "{f}");
    std::fs::remove_file(&out).unwrap();

    // Bad configuration: one line naming the problem, before anything starts.
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "data_dir = \"x\"\nmax_connections = 0\n").unwrap();
    let r = Command::new(QDFS)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("max_connections"), "{stderr}");
}

#[test]
fn folder_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("folder");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("a.bin"), test_data(70_000, 3)).unwrap();
    std::fs::write(src.join("sub/b.txt"), b"hello").unwrap();
    std::fs::write(src.join("sub/deeper/empty"), b"").unwrap();
    let p = Provider::start(&tmp.path().join("p"), &src, "[::1]:0", 0, None);
    let id = add_id(&src, &tmp.path().join("idstore"));
    let out = tmp.path().join("copy");
    let client = tmp.path().join("client");
    let r = get_cmd(&id, &out, &[&p])
        .args(["--data-dir"])
        .arg(&client)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for f in ["a.bin", "sub/b.txt", "sub/deeper/empty"] {
        assert_eq!(
            std::fs::read(src.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(done_event(&r)["files"].as_array().unwrap().len(), 3);
}

#[cfg(feature = "test-hooks")]
#[test]
fn corrupt_provider_is_caught_and_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let data = test_data(size, 4);
    let src = tmp.path().join("source.bin");
    std::fs::write(&src, &data).unwrap();
    let id = add_id(&src, &tmp.path().join("idstore"));

    // Alone, a provider corrupting group 40 is caught exactly there:
    // nothing from group 40 on is kept, the groups before it are.
    let bad = Provider::start(&tmp.path().join("bad"), &src, "127.0.0.1:0", 0, Some("40"));
    let out = tmp.path().join("fetched.bin");
    let r = get_cmd(&id, &out, &[&bad]).output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("corrupt chunk group 40"), "{stderr}");
    assert!(!out.exists());
    let part = std::fs::read(tmp.path().join("fetched.bin.qdfs-part")).unwrap();
    let group = 16 * 1024;
    assert_eq!(&part[..40 * group], &data[..40 * group]);
    assert!(
        part[40 * group..].iter().all(|&b| b == 0),
        "nothing from the corrupt group on reached the disk"
    );

    // Among good providers, one corrupting everything is dropped at its
    // first group; the others finish, only missing groups are fetched. The
    // good one is slowed (4 MB/s, ~0.9 s for the rest): unlimited, it once
    // fetched everything in 60 ms, before the bad one's first group was
    // checked, which then ended "finished" with nothing kept.
    let worse = Provider::start(&tmp.path().join("worse"), &src, "[::1]:0", 0, Some("all"));
    let good = Provider::start(
        &tmp.path().join("good"),
        &src,
        "127.0.0.1:0",
        4_000_000,
        None,
    );
    let r = get_cmd(&id, &out, &[&worse, &good]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let done = done_event(&r);
    let f = &done["files"][0];
    assert_eq!(f["already"].as_u64().unwrap(), 40 * group as u64, "{f}");
    assert_eq!(f["providers"][0]["outcome"]["state"], "dropped", "{f}");
    assert_eq!(f["providers"][0]["groups"], 0, "{f}");
    assert_eq!(f["providers"][1]["outcome"]["state"], "finished", "{f}");
}

/// A provider that speaks the protocol but sends garbage in place of the
/// verified stream (right length, wrong bytes).
fn hostile_provider(manifest: Vec<u8>, size: u64) -> (SocketAddr, std::thread::JoinHandle<()>) {
    use qdfs::wire::{read_frame, Request, Response, MAX_REQUEST_FRAME};
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while Instant::now() < end && served < 3 {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            served += 1;
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut junk = test_data(1 << 20, 99).into_iter().cycle();
            while let Ok(body) = read_frame(&mut s, MAX_REQUEST_FRAME) {
                let reply = match Request::parse(&body) {
                    Ok(Request::Hello { version }) => Response::Hello { version }.encode(),
                    Ok(Request::GetManifest { .. }) => Response::Manifest {
                        bytes: manifest.clone(),
                    }
                    .encode(),
                    Ok(Request::GetRanges { groups, .. }) => {
                        let n = qdfs::tree::encoded_len(size, groups.ranges());
                        let mut r = Response::Ranges { encoded_len: n }.encode();
                        r.extend(junk.by_ref().take(n as usize));
                        r
                    }
                    Ok(Request::PutShare { .. }) | Err(_) => break,
                };
                if s.write_all(&reply).is_err() {
                    break;
                }
            }
        }
    });
    (addr, handle)
}

#[test]
fn hostile_provider_and_clients_do_no_harm() {
    use qdfs::wire::{read_frame, Request, Response, MAX_RESPONSE_FRAME};
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let size = 2 << 20;
    let data = test_data(size, 5);
    let src = tmp.path().join("source.bin");
    std::fs::write(&src, &data).unwrap();
    // Slowed, so that the hostile provider surely gets pieces to send.
    let good = Provider::start(
        &tmp.path().join("good"),
        &src,
        "127.0.0.1:0",
        2_000_000,
        None,
    );
    let id = add_id(&src, &tmp.path().join("idstore"));
    let manifest = std::fs::read(tmp.path().join("idstore/manifests").join(&id)).unwrap();

    // Garbage where the verified stream should be: caught at the first
    // group, the provider dropped, the good one finishes.
    // Its thread ends by itself within 20 s (or with the test).
    let (bad_addr, _bad) = hostile_provider(manifest, size as u64);
    let out = tmp.path().join("fetched.bin");
    let mut cmd = get_cmd(&id, &out, &[]);
    cmd.args(["--provider", &bad_addr.to_string()]);
    cmd.args(["--provider", &good.addr.to_string()]);
    let r = cmd.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let done = done_event(&r);
    assert_eq!(
        done["files"][0]["providers"][0]["outcome"]["state"],
        "dropped"
    );
    assert_eq!(done["files"][0]["providers"][0]["groups"], 0);

    // Clients breaking the protocol get an error and a closed connection;
    // the server carries on.
    let expect_refusal = |bytes: &[u8]| {
        let mut s = std::net::TcpStream::connect(good.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let body = read_frame(&mut s, MAX_RESPONSE_FRAME).unwrap();
        assert!(
            matches!(Response::parse(&body), Ok(Response::Error { .. })),
            "{body:?}"
        );
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut rest);
        assert!(rest.is_empty(), "connection not closed");
    };
    expect_refusal(&[0xff, 0xff, 0xff, 0xff]); // a 4 GiB frame
    expect_refusal(
        &Request::GetManifest {
            id: qdfs::Id([0; 32]),
        }
        .encode(),
    ); // no hello
    expect_refusal(&Request::Hello { version: 77 }.encode());
    expect_refusal(&[0, 0, 0, 3, 0x03, 0, 0]); // short GetRanges

    // Eight connections from one address are the limit; a ninth is
    // refused as busy; once they close, fetching works again.
    let hold: Vec<_> = (0..8)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(good.addr).unwrap();
            s.write_all(&Request::Hello { version: 1 }.encode())
                .unwrap();
            read_frame(&mut s, MAX_RESPONSE_FRAME).unwrap();
            s
        })
        .collect();
    let mut ninth = std::net::TcpStream::connect(good.addr).unwrap();
    ninth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let body = read_frame(&mut ninth, MAX_RESPONSE_FRAME).unwrap();
    assert_eq!(
        Response::parse(&body),
        Ok(Response::Error {
            code: qdfs::wire::ErrorCode::Busy
        })
    );
    drop(hold);
    std::fs::remove_file(&out).unwrap();
    let ok = qdfs_wait(Duration::from_secs(5), || {
        get_cmd(&id, &out, &[&good])
            .output()
            .unwrap()
            .status
            .success()
    });
    assert!(ok, "server did not recover");
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

fn qdfs_wait(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn folder_fetch_entry_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("folder");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for f in ["a", "b", "sub/c"] {
        std::fs::write(src.join(f), f.as_bytes()).unwrap();
    }
    let p = Provider::start(&tmp.path().join("p"), &src, "127.0.0.1:0", 0, None);
    let id: qdfs::id::Id = add_id(&src, &tmp.path().join("idstore")).parse().unwrap();
    let mut opts = qdfs::fetch::Options::new(vec![p.addr]);
    assert_eq!(opts.max_entries, qdfs::fetch::MAX_FETCH_ENTRIES);
    // a, b, sub, sub/c: four entries.
    opts.max_entries = 3;
    let r = qdfs::fetch::get(
        &id,
        &tmp.path().join("capped"),
        &opts,
        &qdfs::progress::Silent,
    );
    assert!(
        matches!(r, Err(qdfs::fetch::FetchError::TooManyEntries(3))),
        "{r:?}"
    );
    opts.max_entries = 4;
    let r = qdfs::fetch::get(
        &id,
        &tmp.path().join("fits"),
        &opts,
        &qdfs::progress::Silent,
    );
    assert_eq!(r.unwrap().len(), 3);
}

#[test]
fn planted_part_link_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("f.bin");
    std::fs::write(&src, test_data(50_000, 8)).unwrap();
    let p = Provider::start(&tmp.path().join("p"), &src, "127.0.0.1:0", 0, None);
    let id = add_id(&src, &tmp.path().join("idstore"));
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let out = tmp.path().join("out.bin");
    std::os::unix::fs::symlink(&victim, tmp.path().join("out.bin.qdfs-part")).unwrap();
    let r = get_cmd(&id, &out, &[&p]).output().unwrap();
    assert!(!r.status.success());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!out.exists());
}

/// A folder with a `.bashrc` and a `.ssh/authorized_keys`, served.
fn hostile_folder(tmp: &Path) -> (Provider, String) {
    let src = tmp.join("folder");
    std::fs::create_dir_all(src.join(".ssh")).unwrap();
    std::fs::write(src.join(".bashrc"), b"evil\n").unwrap();
    std::fs::write(src.join(".ssh/authorized_keys"), b"ssh-ed25519 evil\n").unwrap();
    let p = Provider::start(&tmp.join("p"), &src, "127.0.0.1:0", 0, None);
    let id = add_id(&src, &tmp.join("idstore"));
    (p, id)
}

#[test]
fn existing_output_is_refused_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, id) = hostile_folder(tmp.path());
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join(".bashrc"), b"mine\n").unwrap();
    let r = get_cmd(&id, &home, &[&p]).output().unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(home.join(".bashrc")).unwrap(), b"mine\n");
    assert!(!home.join(".ssh").exists());
    // With --force it merges.
    let r = get_cmd(&id, &home, &[&p]).arg("--force").output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(home.join(".bashrc")).unwrap(), b"evil\n");

    // A file output that holds something else.
    let src = tmp.path().join("one.bin");
    std::fs::write(&src, test_data(20_000, 4)).unwrap();
    let fp = Provider::start(&tmp.path().join("fp"), &src, "127.0.0.1:0", 0, None);
    let fid = add_id(&src, &tmp.path().join("idstore"));
    let out = tmp.path().join("existing.bin");
    std::fs::write(&out, b"mine").unwrap();
    let r = get_cmd(&fid, &out, &[&fp]).output().unwrap();
    assert!(!r.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), b"mine");
    let r = get_cmd(&fid, &out, &[&fp]).arg("--force").output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // Complete already: running again keeps it without --force.
    let r = get_cmd(&fid, &out, &[&fp]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn symlinks_in_the_output_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, id) = hostile_folder(tmp.path());
    let victim = tmp.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    // The output itself a link: refused even with --force.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let r = get_cmd(&id, &link, &[&p]).arg("--force").output().unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("symbolic link"), "{err}");
    // A link where a folder entry goes, merged with --force.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&victim, out.join(".ssh")).unwrap();
    let r = get_cmd(&id, &out, &[&p]).arg("--force").output().unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("symbolic links are never followed"), "{err}");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
}

#[test]
fn interrupted_folder_fetch_resumes_into_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, id) = hostile_folder(tmp.path());
    let id: qdfs::id::Id = id.parse().unwrap();
    let out = tmp.path().join("copy");
    let opts = qdfs::fetch::Options::new(vec![p.addr]);
    opts.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = qdfs::fetch::get(&id, &out, &opts, &qdfs::progress::Silent);
    assert!(
        matches!(r, Err(qdfs::fetch::FetchError::Interrupted { .. })),
        "{r:?}"
    );
    assert!(std::fs::read_dir(&out).unwrap().next().is_some());
    opts.stop.store(false, std::sync::atomic::Ordering::Relaxed);
    let r = qdfs::fetch::get(&id, &out, &opts, &qdfs::progress::Silent);
    assert_eq!(r.unwrap().len(), 2);
    assert_eq!(std::fs::read(out.join(".bashrc")).unwrap(), b"evil\n");
    assert!(!tmp.path().join("copy.qdfs-state").exists());
    // Complete and no longer marked: running it again is refused.
    assert!(qdfs::fetch::get(&id, &out, &opts, &qdfs::progress::Silent).is_err());
}

#[test]
fn a_trickling_provider_cannot_hold_the_fetch() {
    // One provider sends 2 KB/s: it takes a piece (512 KiB) at the start
    // and would need minutes for it. The fast provider does the rest and
    // then asks for the slow one's piece too (the endgame), so the fetch
    // ends in about the time the fast provider alone needs.
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let data = test_data(size, 7);
    let src = tmp.path().join("source.bin");
    std::fs::write(&src, &data).unwrap();
    let id = add_id(&src, &tmp.path().join("idstore"));
    let slow = Provider::start(&tmp.path().join("slow"), &src, "127.0.0.1:0", 2_000, None);
    let fast = Provider::start(&tmp.path().join("fast"), &src, "[::1]:0", 0, None);
    let out = tmp.path().join("fetched.bin");
    let started = Instant::now();
    let r = get_cmd(&id, &out, &[&slow, &fast]).output().unwrap();
    let elapsed = started.elapsed();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let done = done_event(&r);
    let groups: Vec<u64> = done["files"][0]["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["groups"].as_u64().unwrap())
        .collect();
    assert_eq!(
        groups.iter().sum::<u64>(),
        256,
        "each group counted once: {done}"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "the slow provider held the fetch for {elapsed:?}"
    );
}

#[test]
fn a_silent_or_trickling_client_loses_its_slot() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("source.bin");
    std::fs::write(&src, test_data(1 << 16, 3)).unwrap();
    let p = Provider::start(&tmp.path().join("p"), &src, "127.0.0.1:0", 0, None);
    let started = Instant::now();
    // One says nothing; one sends its Hello a byte every 3 s.
    let mut silent = std::net::TcpStream::connect(p.addr).unwrap();
    let mut trickle = std::net::TcpStream::connect(p.addr).unwrap();
    let hello = [0u8, 0, 0, 2, 1, 1];
    let t = std::thread::spawn(move || {
        for b in hello {
            if trickle.write_all(&[b]).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_secs(3));
        }
        let mut buf = [0u8; 64];
        trickle
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        // Closed by the server: end of stream or a reset, never a Hello.
        !matches!(trickle.read(&mut buf), Ok(n) if n > 0)
    });
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the silent client got an answer");
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_secs(9) && closed_after < Duration::from_secs(20),
        "silent client closed after {closed_after:?}"
    );
    assert!(t.join().unwrap(), "the trickling client was still served");
}

#[test]
fn two_fetches_to_one_output_do_not_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let data = test_data(size, 9);
    let src = tmp.path().join("source.bin");
    std::fs::write(&src, &data).unwrap();
    let id = add_id(&src, &tmp.path().join("idstore"));
    // Slow enough (1 MB/s) that the first is still running.
    let p = Provider::start(&tmp.path().join("p"), &src, "127.0.0.1:0", 1_000_000, None);
    let out = tmp.path().join("fetched.bin");
    let first = get_cmd(&id, &out, &[&p])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(qdfs_wait(Duration::from_secs(10), || p.bytes_served() > 0));
    let second = get_cmd(&id, &out, &[&p]).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another qdfs get is writing"), "{stderr}");
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[test]
fn idle_connections_give_way_when_every_slot_is_taken() {
    use std::io::Write;
    // Four slots, all held by connections that said Hello and then
    // nothing (eight Sybil IDs would do this to the default 64): a real
    // fetch still gets in, the longest idle giving way.
    let tmp = tempfile::tempdir().unwrap();
    let data = test_data(1 << 20, 11);
    let src = tmp.path().join("source.bin");
    std::fs::write(&src, &data).unwrap();
    let id = add_id(&src, &tmp.path().join("idstore"));
    let p = Provider::start_with(
        &tmp.path().join("p"),
        &src,
        "127.0.0.1:0",
        0,
        None,
        "max_connections = 4\nmax_connections_per_peer = 8\n",
    );
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut s = std::net::TcpStream::connect(p.addr).unwrap();
        s.write_all(&[0, 0, 0, 2, 1, 1]).unwrap();
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(2500));
    let out = tmp.path().join("fetched.bin");
    let r = get_cmd(&id, &out, &[&p]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(qdfs_wait(Duration::from_secs(5), || {
        let b = std::fs::read(p.dir.join("store/stats.json")).unwrap_or_default();
        serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null)["evicted"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    }));
}
