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

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::QDFS;
use serde_json::Value;

#[test]
fn fetch_through_the_dht_between_nodes() {
    let Some((mut lab, sw)) = common::lab_with_bridge() else {
        return;
    };
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
        let cfg = lab.dfs_config(i, name, "");
        id = common::dfs_add(&src, &cfg);
        lab.dfs_serve(i, name, &cfg);
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
    // What each store records about the provided file (its path) is
    // sealed under the node's key for QuantumDFS.
    for name in ["a", "b"] {
        let dir = lab.dir.join(format!("dfs-{name}/sources"));
        let mut n = 0;
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let b = fs::read(e.path()).unwrap();
            assert!(b.starts_with(b"QDS1"), "{} not sealed", e.path().display());
            assert!(
                !b.windows(10).any(|w| w == b"shared.bin"),
                "path in the clear"
            );
            n += 1;
        }
        assert_eq!(n, 1, "{name}: one source record");
    }
    eprintln!(
        "6 MiB found through the DHT and fetched over the overlay from {addrs:?} in {:.2} s (found after {:.1} s)",
        f["seconds"].as_f64().unwrap(),
        started.elapsed().as_secs_f64()
    );
}
