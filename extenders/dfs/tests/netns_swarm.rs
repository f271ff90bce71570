//! A swarm of eight real `qgate` nodes in network namespaces: a 200 MB
//! file provided by four of them is fetched on a fifth through the DHT,
//! from several providers at once, while one provider is killed and the
//! fetch itself is interrupted (SIGINT) and started again.
//!
//! Run-book as in tests/netns.rs: root, `ip`, `nft`, and the `qgate`
//! binary next to `qdfs` (a workspace test run builds both); otherwise the
//! test says SKIPPED and passes without running. Underlay 198.18.44.0/24.
//! Everything it made is removed when it ends, also when it fails.

mod common;

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{die_with_parent, Lab, QDFS};
use serde_json::Value;

const SIZE: u64 = 200_000_000;
/// Bytes/s each provider serves to one peer: four together take about
/// 6 s for the file, long enough to kill one and interrupt the fetch.
const RATE: u64 = 8_000_000;

/// Writes `len` incompressible bytes (xorshift) and returns their BLAKE3.
fn write_data(path: &Path, len: u64) -> blake3::Hash {
    let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(path).unwrap());
    let mut h = blake3::Hasher::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    w.flush().unwrap();
    h.finalize()
}

fn served(lab: &Lab, name: &str) -> u64 {
    let b = fs::read(lab.dir.join(format!("dfs-{name}/stats.json"))).unwrap_or_default();
    serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null)["bytes_served"]
        .as_u64()
        .unwrap_or(0)
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[test]
fn swarm_of_eight_200_mb_from_several_providers_killed_and_resumed() {
    let Some((mut lab, sw)) = common::lab_with_bridge() else {
        return;
    };
    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let mut a_uri = String::new();
    for (i, name) in names.iter().enumerate() {
        let ns = lab.add_host(&sw, name, &format!("198.18.44.{}/24", i + 1));
        let peers = if i == 0 { vec![] } else { vec![a_uri.clone()] };
        lab.add_node(name, &ns, &format!("198.18.44.{}:7300", i + 1), &peers);
        if i == 0 {
            a_uri = lab.nodes[0].uri.clone();
        }
    }

    let src = lab.dir.join("big.bin");
    let want = write_data(&src, SIZE);
    // a adds the file; b, c and d hold the same bytes (as if they had
    // fetched it before) and provide it too.
    let mut id = String::new();
    let mut serve = Vec::new();
    for (i, name) in names[..4].iter().enumerate() {
        let cfg = lab.dfs_config(i, name, &format!("peer_rate = {RATE}\n"));
        id = common::dfs_add(&src, &cfg);
        serve.push(lab.dfs_serve(i, name, &cfg));
    }
    // Each provider's record stored somewhere before f looks.
    for name in &names[..4] {
        let log = format!("serve-{name}.log");
        assert!(
            wait_for(Duration::from_secs(60), || lab
                .log(&log)
                .contains("announced")),
            "{name} never announced"
        );
    }

    let f = &lab.nodes[5];
    let out = lab.dir.join("fetched.bin");
    let get = |f: &common::NodeInfo| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &f.ns])
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
            .arg(f.dir.join("control.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut c);
        c
    };
    let started = Instant::now();
    let first = get(f).spawn().unwrap();
    // Kill b once its counters show it serving, then interrupt.
    let b_serving = wait_for(Duration::from_secs(30), || served(&lab, "b") > 0);
    let i = serve[1];
    let _ = lab.children[i].kill();
    let _ = lab.children[i].wait();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status();
    let first = first.wait_with_output().unwrap();
    assert!(b_serving, "b never served");
    assert_eq!(
        first.status.code(),
        Some(130),
        "the first fetch was to be interrupted: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!out.exists(), "no output before it is whole");

    let second = get(f).output().unwrap();
    let elapsed = started.elapsed();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let stdout = String::from_utf8_lossy(&second.stdout);
    let done: Value = stdout
        .lines()
        .rev()
        .find(|l| l.contains("\"event\":\"done\""))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no done event in {stdout}"));
    let file = &done["files"][0];
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(&out).unwrap()).unwrap();
    assert_eq!(h.finalize(), want, "fetched bytes differ");

    // At least three providers at once, each with its own counters showing
    // it served; b only before it died.
    let working: Vec<&Value> = file["providers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["groups"].as_u64().unwrap_or(0) > 0)
        .collect();
    assert!(working.len() >= 3, "fewer than three providers: {file}");
    for name in &names[..4] {
        assert!(
            served(&lab, name) > 0,
            "{name}'s counters show nothing served"
        );
    }
    let already = file["already"].as_u64().unwrap();
    let total = file["received_total"].as_u64().unwrap();
    assert!(already > 0, "the second run resumed: {file}");
    assert!(
        (total as f64) < SIZE as f64 * 1.05,
        "received {total} bytes over both runs for {SIZE}"
    );
    eprintln!(
        "200 MB on 8 nodes: {} providers in the last run, b killed, interrupted and resumed; \
         {already} bytes kept, {total} received in all ({:+.2} % of the size), {:.1} s in all \
         (served: a {} b {} c {} d {})",
        working.len(),
        (total as f64 / SIZE as f64 - 1.0) * 100.0,
        elapsed.as_secs_f64(),
        served(&lab, "a"),
        served(&lab, "b"),
        served(&lab, "c"),
        served(&lab, "d"),
    );
}
