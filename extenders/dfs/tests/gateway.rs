//! Caching gateways and the HTTP gateway with real `qdfs` processes on
//! loopback (127.0.0.1 only): a provider, a `role = "cache-gateway"` with
//! the provider as `upstream`, and clients fetching through it with
//! `--gateway`; HTTP requests (raw, over a TcpStream) to a gateway's
//! `http` address.

mod common;

use common::{test_data, QDFS};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const GROUP: usize = 16 * 1024;

/// One `qdfs serve`, killed when dropped.
struct Serve {
    child: Child,
    addr: SocketAddr,
    http: Option<SocketAddr>,
    dir: PathBuf,
}

impl Serve {
    /// Serves `dir/store` with `extra` config lines, after adding `add`.
    fn start(dir: &Path, add: &[&Path], extra: &str) -> Serve {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("qdfs.toml");
        std::fs::write(
            &cfg,
            format!("data_dir = \"store\"\nlisten = \"127.0.0.1:0\"\nannounce = false\n{extra}"),
        )
        .unwrap();
        for p in add {
            let out = Command::new(QDFS)
                .args(["add", p.to_str().unwrap(), "--config"])
                .arg(&cfg)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let mut child = Command::new(QDFS)
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut r = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected {line:?}"))
            .parse()
            .unwrap();
        let mut http = None;
        if extra.contains("http =") {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            http = Some(
                line.trim()
                    .strip_prefix("http on ")
                    .unwrap_or_else(|| panic!("unexpected {line:?}"))
                    .parse()
                    .unwrap(),
            );
        }
        Serve {
            child,
            addr,
            http,
            dir: dir.into(),
        }
    }

    /// The stats file, once it reflects the last request (it is rewritten
    /// twice a second).
    fn stats(&self) -> Value {
        std::thread::sleep(Duration::from_millis(1100));
        let b = std::fs::read(self.dir.join("store/stats.json")).unwrap();
        serde_json::from_slice(&b).unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn add_id(dir: &Path, path: &Path) -> String {
    let out = Command::new(QDFS)
        .args(["add", path.to_str().unwrap(), "--data-dir"])
        .arg(dir.join("store"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn get(id: &str, out: &Path, gateways: &[SocketAddr], providers: &[SocketAddr]) -> Output {
    let mut c = Command::new(QDFS);
    c.args(["get", id, "-o", out.to_str().unwrap()])
        .args(["--json", "--no-dht", "--no-provide"]);
    for g in gateways {
        c.args(["--gateway", &g.to_string()]);
    }
    for p in providers {
        c.args(["--provider", &p.to_string()]);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "get failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn gw_counter(stats: &Value, path: &[&str]) -> u64 {
    let mut v = &stats["gateway"];
    for p in path {
        v = &v[*p];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("no {path:?} in {stats}"))
}

#[test]
fn second_client_is_served_from_the_cache_and_upstream_carries_each_group_once() {
    let t = tempfile::tempdir().unwrap();
    // 193 groups: six whole pieces of 32 and a short one.
    let len = 192 * GROUP + 1000;
    let data = test_data(len, 11);
    let file = t.path().join("video.bin");
    std::fs::write(&file, &data).unwrap();
    let provider = Serve::start(&t.path().join("p"), &[&file], "");
    let id = add_id(&t.path().join("p"), &file);
    let gw = Serve::start(
        &t.path().join("g"),
        &[],
        &format!(
            "role = \"cache-gateway\"\ncache = \"64 MiB\"\nupstream = [\"{}\"]\n",
            provider.addr
        ),
    );

    let out1 = t.path().join("c1.bin");
    get(&id, &out1, &[gw.addr], &[]);
    assert!(std::fs::read(&out1).unwrap() == data);
    let s1 = gw.stats();
    assert_eq!(gw_counter(&s1, &["cache", "misses"]), 7);
    assert_eq!(gw_counter(&s1, &["cache", "hits"]), 0);
    assert_eq!(gw_counter(&s1, &["upstream_groups"]), 193);

    let out2 = t.path().join("c2.bin");
    get(&id, &out2, &[gw.addr], &[]);
    assert!(std::fs::read(&out2).unwrap() == data);
    let s2 = gw.stats();
    // The second client: every piece a hit, nothing more from upstream.
    assert_eq!(gw_counter(&s2, &["cache", "hits"]), 7);
    assert_eq!(gw_counter(&s2, &["cache", "misses"]), 7);
    assert_eq!(gw_counter(&s2, &["upstream_groups"]), 193);
    assert_eq!(gw_counter(&s2, &["served_groups"]), 2 * 193);
    let size = gw_counter(&s2, &["cache", "size"]);
    assert!(size > len as u64 && size < len as u64 * 101 / 100, "{size}");
    // The provider served each group exactly once, to the gateway.
    let ps = provider.stats();
    assert_eq!(ps["groups_served"].as_u64(), Some(193), "{ps}");

    // `qdfs status --json` on the gateway shows the cache.
    let st = Command::new(QDFS)
        .args(["status", "--json", "--data-dir"])
        .arg(gw.dir.join("store"))
        .output()
        .unwrap();
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["cache"]["hits"].as_u64(), Some(7), "{st}");
    assert_eq!(st["cache"]["limit"].as_u64(), Some(64 << 20), "{st}");
}

#[test]
fn pieces_spread_over_gateways_and_fall_back_when_one_fails() {
    let t = tempfile::tempdir().unwrap();
    let len = 640 * GROUP;
    let data = test_data(len, 12);
    let file = t.path().join("f.bin");
    std::fs::write(&file, &data).unwrap();
    let provider = Serve::start(&t.path().join("p"), &[&file], "");
    let id = add_id(&t.path().join("p"), &file);
    let up = format!(
        "role = \"cache-gateway\"\nupstream = [\"{}\"]\n",
        provider.addr
    );
    let g1 = Serve::start(&t.path().join("g1"), &[], &up);
    let g2 = Serve::start(&t.path().join("g2"), &[], &up);

    // Both gateways work: each serves a part, the parts add up, and the
    // provider serves every group once.
    let out = t.path().join("o1.bin");
    get(&id, &out, &[g1.addr, g2.addr], &[]);
    assert!(std::fs::read(&out).unwrap() == data);
    let (a, b) = (g1.stats(), g2.stats());
    let (na, nb) = (
        gw_counter(&a, &["served_groups"]),
        gw_counter(&b, &["served_groups"]),
    );
    assert!(na > 0 && nb > 0, "{na} {nb}");
    assert_eq!(na + nb, 640);
    assert_eq!(provider.stats()["groups_served"].as_u64(), Some(640));

    // One gateway dead: the other takes its pieces.
    drop(g2);
    let out = t.path().join("o2.bin");
    get(&id, &out, &[g1.addr, "127.0.0.1:1".parse().unwrap()], &[]);
    assert!(std::fs::read(&out).unwrap() == data);

    // Every gateway dead: the providers.
    drop(g1);
    let out = t.path().join("o3.bin");
    let o = get(
        &id,
        &out,
        &["127.0.0.1:1".parse().unwrap()],
        &[provider.addr],
    );
    assert!(std::fs::read(&out).unwrap() == data, "{o:?}");
}

/// A raw HTTP/1.1 request; returns the status, the headers (lowercase
/// names) and the body.
fn http(addr: SocketAddr, method: &str, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let mut buf = [0u8; 65536];
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
        }
    }
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&resp[..split]).to_lowercase();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, resp[split + 4..].to_vec())
}

#[test]
fn http_ranges_types_listings_and_refusals() {
    let t = tempfile::tempdir().unwrap();
    let folder = t.path().join("share");
    std::fs::create_dir_all(folder.join("sub dir")).unwrap();
    let video = test_data(100 * GROUP + 77, 13);
    std::fs::write(folder.join("movie.mp4"), &video).unwrap();
    std::fs::write(folder.join("sub dir/a<b>.txt"), b"hello\n").unwrap();
    let provider = Serve::start(&t.path().join("p"), &[&folder], "");
    let id = add_id(&t.path().join("p"), &folder);
    // The gateway does not have the folder: everything comes through its
    // cache from upstream.
    let gw = Serve::start(
        &t.path().join("g"),
        &[],
        &format!(
            "role = \"cache-gateway\"\nupstream = [\"{}\"]\nhttp = \"127.0.0.1:0\"\n",
            provider.addr
        ),
    );
    let h = gw.http.unwrap();

    // A range across a piece boundary (piece = 512 KiB).
    let (a, b) = (512 * 1024 - 100, 512 * 1024 + 5000);
    let (st, head, body) = http(
        h,
        "GET",
        &format!("/dfs/{id}/movie.mp4"),
        &format!("Range: bytes={a}-{b}\r\n"),
    );
    assert_eq!(st, 206, "{head}");
    assert_eq!(body, &video[a..=b]);
    assert!(
        head.contains(&format!("content-range: bytes {a}-{b}/{}", video.len())),
        "{head}"
    );
    assert!(head.contains("content-type: video/mp4"), "{head}");
    // The whole file, and a suffix range.
    let (st, head, body) = http(h, "GET", &format!("/dfs/{id}/movie.mp4"), "");
    assert_eq!((st, body.len()), (200, video.len()), "{head}");
    assert!(body == video);
    let (st, _, body) = http(
        h,
        "GET",
        &format!("/dfs/{id}/movie.mp4"),
        "Range: bytes=-10\r\n",
    );
    assert_eq!((st, &body[..]), (206, &video[video.len() - 10..]));
    // HEAD: the length, no body.
    let (st, head, body) = http(h, "HEAD", &format!("/dfs/{id}/movie.mp4"), "");
    assert_eq!(st, 200);
    assert!(
        head.contains(&format!("content-length: {}", video.len())),
        "{head}"
    );
    assert!(body.is_empty());
    // Unsatisfiable.
    let (st, head, _) = http(
        h,
        "GET",
        &format!("/dfs/{id}/movie.mp4"),
        "Range: bytes=99999999-\r\n",
    );
    assert_eq!(st, 416);
    assert!(
        head.contains(&format!("content-range: bytes */{}", video.len())),
        "{head}"
    );

    // Listings, names escaped.
    let (st, head, body) = http(h, "GET", &format!("/dfs/{id}/"), "");
    assert_eq!(st, 200);
    assert!(head.contains("content-type: text/html"));
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains("movie.mp4") && body.contains("sub dir/"),
        "{body}"
    );
    let (st, _, body) = http(h, "GET", &format!("/dfs/{id}/sub%20dir"), "");
    let body = String::from_utf8(body).unwrap();
    assert_eq!(st, 200);
    assert!(
        body.contains("a&lt;b&gt;.txt") && !body.contains("a<b>"),
        "{body}"
    );
    assert!(body.contains("sub%20dir/a%3Cb%3E.txt"), "{body}");
    let (st, head, body) = http(h, "GET", &format!("/dfs/{id}/sub%20dir/a%3Cb%3E.txt"), "");
    assert_eq!((st, &body[..]), (200, &b"hello\n"[..]));
    assert!(head.contains("content-type: text/plain"), "{head}");

    // Refusals: never a panic, the server carries on.
    let zero = "0".repeat(64);
    for (path, want) in [
        ("/dfs/nothex".to_string(), 400),
        (format!("/dfs/{zero}"), 404),
        (format!("/dfs/{id}/../etc"), 400),
        (format!("/dfs/{id}/%2e%2e/x"), 400),
        (format!("/dfs/{id}/a%2Fb"), 400),
        (format!("/dfs/{id}/nope"), 404),
        (format!("/dfs/{id}/movie.mp4/x"), 404),
        ("/etc/passwd".to_string(), 404),
    ] {
        let (st, _, _) = http(h, "GET", &path, "");
        assert_eq!(st, want, "{path}");
    }
    let (st, _, _) = http(h, "POST", &format!("/dfs/{id}/"), "");
    assert_eq!(st, 405);
    let (st, _, _) = http(
        h,
        "GET",
        &format!("/dfs/{id}/movie.mp4"),
        "Range: bytes=0-0\r\n",
    );
    assert_eq!(st, 206);

    // Connections are bounded: eight idle ones from one address, then the
    // ninth is told 503 at once; garbage and an oversized head are 400/431.
    // The server frees a served connection's slot just after its reply, so
    // on a loaded machine the previous request may still hold one when the
    // idle ones arrive (the eighth is then refused and the ninth let in):
    // such a round is dropped and tried again, a few times at most.
    let mut resp = String::new();
    for _ in 0..5 {
        let idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(h).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut s = TcpStream::connect(h).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        resp.clear();
        let _ = s.read_to_string(&mut resp);
        drop(idle);
        if resp.starts_with("HTTP/1.1 503") {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    std::thread::sleep(Duration::from_millis(200));
    let mut s = TcpStream::connect(h).unwrap();
    s.write_all(b"\x00\x01 garbage\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let mut s = TcpStream::connect(h).unwrap();
    let _ = s.write_all(&vec![b'a'; 17_000]);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // Still serving.
    let (st, _, body) = http(
        h,
        "GET",
        &format!("/dfs/{id}/movie.mp4"),
        "Range: bytes=5-9\r\n",
    );
    assert_eq!((st, &body[..]), (206, &video[5..10]));
}

#[test]
fn concurrent_misses_for_the_same_piece_are_fetched_once() {
    let t = tempfile::tempdir().unwrap();
    let len = 192 * GROUP + 1000;
    let data = test_data(len, 14);
    let file = t.path().join("hot.bin");
    std::fs::write(&file, &data).unwrap();
    // Slow upstream (4 MB/s), so the two clients overlap.
    let provider = Serve::start(&t.path().join("p"), &[&file], "peer_rate = 4000000\n");
    let id = add_id(&t.path().join("p"), &file);
    let gw = Serve::start(
        &t.path().join("g"),
        &[],
        &format!(
            "role = \"cache-gateway\"\nupstream = [\"{}\"]\n",
            provider.addr
        ),
    );
    let spawn = |out: &Path| {
        Command::new(QDFS)
            .args(["get", &id, "-o", out.to_str().unwrap()])
            .args(["--json", "--no-dht", "--no-provide", "--gateway"])
            .arg(gw.addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (o1, o2) = (t.path().join("a.bin"), t.path().join("b.bin"));
    let (mut c1, mut c2) = (spawn(&o1), spawn(&o2));
    assert!(c1.wait().unwrap().success() && c2.wait().unwrap().success());
    assert!(std::fs::read(&o1).unwrap() == data && std::fs::read(&o2).unwrap() == data);
    let s = gw.stats();
    assert_eq!(gw_counter(&s, &["upstream_groups"]), 193, "{s}");
    assert_eq!(gw_counter(&s, &["served_groups"]), 2 * 193, "{s}");
    assert_eq!(provider.stats()["groups_served"].as_u64(), Some(193));
}
