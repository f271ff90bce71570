//! A caching gateway between real `qgate` nodes in network namespaces.
//!
//! Run-book: as tests/netns.rs (root, `ip`, `nft`, and the `qgate` binary
//! next to `qdfs`; otherwise it says SKIPPED and passes). Four nodes on a
//! bridge (underlay 198.18.42.0/24): a provides a 6 MiB file and announces
//! it in the DHT; b runs `role = "cache-gateway"` with no `upstream`, so
//! it finds a through the DHT; c and d fetch with `--gateway` b only (no
//! DHT, no provider). The second fetch is served from b's cache, and a
//! served each chunk group exactly once, to b, over the overlay.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::QDFS;
use serde_json::Value;

fn stats(path: &Path) -> Value {
    std::thread::sleep(Duration::from_millis(1100));
    serde_json::from_slice(&fs::read(path).unwrap_or_default()).unwrap_or(Value::Null)
}

#[test]
fn gateway_finds_the_provider_in_the_dht_and_serves_the_second_client_from_its_cache() {
    let Some((mut lab, sw)) = common::lab_with_bridge() else {
        return;
    };
    let hosts: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, n)| lab.add_host(&sw, n, &format!("198.18.42.{}/24", i + 1)))
        .collect();
    lab.add_node("a", &hosts[0], "198.18.42.1:7300", &[]);
    let a_uri = lab.nodes[0].uri.clone();
    for (i, n) in ["b", "c", "d"].iter().enumerate() {
        let listen = format!("198.18.42.{}:7300", i + 2);
        lab.add_node(n, &hosts[i + 1], &listen, std::slice::from_ref(&a_uri));
    }

    let src = lab.dir.join("popular.bin");
    let data: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(&src, &data).unwrap();
    let mut id = String::new();
    for (i, name, extra) in [(0, "a", ""), (1, "b", "role = \"cache-gateway\"\n")] {
        let cfg = lab.dfs_config(i, name, extra);
        if name == "a" {
            id = common::dfs_add(&src, &cfg);
        }
        lab.dfs_serve(i, name, &cfg);
    }
    let gateway = format!("[{}]:7400", lab.nodes[1].address);

    let fetch = |node: usize, out: &Path| -> Option<Value> {
        let r = Command::new("ip")
            .args(["netns", "exec", &lab.nodes[node].ns])
            .arg(QDFS)
            .args(["get", &id, "-o", out.to_str().unwrap()])
            .args(["--json", "--no-provide", "--no-dht", "--gateway", &gateway])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&r.stdout).into_owned();
        if !r.status.success() {
            eprintln!("fetch: {}", String::from_utf8_lossy(&r.stderr));
        }
        stdout
            .lines()
            .find(|l| l.contains("\"event\":\"done\""))
            .and_then(|l| serde_json::from_str(l).ok())
    };

    // c: the gateway finds a once a's record is in the DHT.
    let out_c = lab.dir.join("c.bin");
    let started = Instant::now();
    let mut done = None;
    while done.is_none() && started.elapsed() < Duration::from_secs(60) {
        done = fetch(2, &out_c);
        if done.is_none() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    assert!(done.is_some(), "no fetch through the gateway within 60 s");
    assert!(fs::read(&out_c).unwrap() == data, "c's bytes differ");
    let first = started.elapsed();

    // d: served from the cache.
    let out_d = lab.dir.join("d.bin");
    let t = Instant::now();
    assert!(fetch(3, &out_d).is_some(), "d's fetch failed");
    assert!(fs::read(&out_d).unwrap() == data, "d's bytes differ");
    let second = t.elapsed();

    let g = stats(&lab.dir.join("dfs-b/stats.json"));
    let cache = &g["gateway"]["cache"];
    // d: 12 pieces, every one a hit.
    assert!(cache["hits"].as_u64().unwrap_or(0) >= 12, "{g}");
    assert_eq!(g["gateway"]["upstream_groups"].as_u64(), Some(384), "{g}");
    let a = stats(&lab.dir.join("dfs-a/stats.json"));
    assert_eq!(a["groups_served"].as_u64(), Some(384), "{a}");
    eprintln!(
        "6 MiB through the gateway: first client {:.2} s (including the DHT wait), second {:.2} s from the cache",
        first.as_secs_f64(),
        second.as_secs_f64()
    );
}
