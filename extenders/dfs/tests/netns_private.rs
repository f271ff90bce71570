//! Private storage between real `qgate` nodes in network namespaces.
//!
//! Run-book: needs root (namespaces, veth, TUN), `ip` and `nft`, and the
//! `qgate` binary next to `qdfs` in the target directory (`cargo build -p
//! qgate` once). Without root or without that binary the test says so and
//! passes without running.
//!
//! Eight nodes on a bridge (underlay 198.18.41.0/24): a to f run `qdfs
//! serve` with a quota and announce themselves as holders in the DHT, with
//! only tcp/7400 open in their inbound filters; o (the owner) runs `qdfs
//! store` (3-of-6) with no `--holder`: it finds the six holders in the DHT
//! and places one share on each over the overlay, then publishes its index
//! pointer. No holder's files contain the plaintext. Two holders are
//! stopped; r, a fresh install with only a copy of the owner key, lists the
//! owner's files and fetches one, byte-identical. Everything the test made
//! is removed when it ends, also when it fails.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::QDFS;

const MARKER: &[u8] = b"NETNS-PLAINTEXT-MARKER-k2P9";

fn qdfs_in(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(QDFS)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn holders_from_the_dht_and_a_fresh_node_with_only_the_key() {
    let Some((mut lab, sw)) = common::lab_with_bridge() else {
        return;
    };
    let names = ["a", "b", "c", "d", "e", "f", "o", "r"];
    const HOLDERS: usize = 6;
    let mut nss = Vec::new();
    for (i, n) in names.iter().enumerate() {
        nss.push(lab.add_host(&sw, n, &format!("198.18.41.{}/24", i + 1)));
    }
    lab.add_node("a", &nss[0], "198.18.41.1:7300", &[]);
    let a_uri = lab.nodes[0].uri.clone();
    for (i, n) in names.iter().enumerate().skip(1) {
        lab.add_node(
            n,
            &nss[i],
            &format!("198.18.41.{}:7300", i + 1),
            std::slice::from_ref(&a_uri),
        );
    }
    let mut serves = Vec::new();
    for (i, name) in names.iter().enumerate().take(HOLDERS) {
        let node = &lab.nodes[i];
        let cfg = lab.dir.join(format!("dfs-{name}.toml"));
        fs::write(
            &cfg,
            format!(
                "data_dir = \"dfs-{name}\"\nport = 7400\nquota = \"64 MiB\"\ncontrol_socket = \"{}\"\n",
                node.dir.join("control.sock").display()
            ),
        )
        .unwrap();
        let ns = node.ns.clone();
        let cfg = cfg.to_str().unwrap().to_string();
        serves.push(lab.spawn(
            &ns,
            Path::new(QDFS),
            &["serve", "--config", &cfg],
            &format!("serve-{name}.log"),
        ));
    }

    // The owner: holders only from the DHT (they announce within seconds).
    let mut data = Vec::new();
    let mut x: u64 = 77;
    while data.len() < 2 << 20 {
        if data.len() % 4096 == 0 {
            data.extend_from_slice(MARKER);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let src = lab.dir.join("private.bin");
    fs::write(&src, &data).unwrap();
    let o = &lab.nodes[HOLDERS];
    let o_sock = o.dir.join("control.sock");
    let o_dir = lab.dir.join("owner");
    let started = Instant::now();
    let mut id = None;
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(90) && id.is_none() {
        let out = qdfs_in(
            &o.ns,
            &[
                "store",
                src.to_str().unwrap(),
                "--control-socket",
                o_sock.to_str().unwrap(),
                "--data-dir",
                o_dir.to_str().unwrap(),
            ],
        );
        if out.status.success() {
            id = Some(String::from_utf8(out.stdout).unwrap().trim().to_string());
        } else {
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let id = id.unwrap_or_else(|| panic!("no store within 90 s; last: {last}"));
    eprintln!(
        "stored 3-of-6 on holders found in the DHT after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for name in &names[..HOLDERS] {
        let dir = lab.dir.join(format!("dfs-{name}"));
        let mut todo = vec![dir];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    let b = fs::read(&p).unwrap_or_default();
                    assert!(
                        !b.windows(MARKER.len()).any(|w| w == MARKER),
                        "plaintext in {}",
                        p.display()
                    );
                }
            }
        }
    }

    // Two holders gone (their qdfs stopped), then a fresh node with only a
    // copy of the owner key.
    for &child in &serves[..2] {
        let _ = lab.children[child].kill();
        let _ = lab.children[child].wait();
    }
    let r = &lab.nodes[HOLDERS + 1];
    let r_sock = r.dir.join("control.sock");
    let fresh = lab.dir.join("fresh");
    fs::create_dir_all(&fresh).unwrap();
    // On the owner's node the key is sealed under that node's key for
    // QuantumDFS; the copy for the USB stick is exported from it.
    let sealed = fs::read(o_dir.join("owner.key")).unwrap();
    assert!(
        sealed.starts_with(b"QDS1") && sealed.len() > 32,
        "the owner key is not sealed at rest"
    );
    let stick = lab.dir.join("stick.key");
    let out = qdfs_in(
        &o.ns,
        &[
            "key",
            "export",
            "-o",
            stick.to_str().unwrap(),
            "--control-socket",
            o_sock.to_str().unwrap(),
            "--data-dir",
            o_dir.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read(&stick).unwrap().len(), 32);
    let common = [
        "--control-socket",
        r_sock.to_str().unwrap(),
        "--data-dir",
        fresh.to_str().unwrap(),
        "--owner-key",
        stick.to_str().unwrap(),
    ];
    let mut listing = String::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let mut args = vec!["ls"];
        args.extend(common);
        let out = qdfs_in(&r.ns, &args);
        listing = String::from_utf8_lossy(&out.stdout).into_owned();
        if listing.contains(&id) {
            break;
        }
        listing.push_str(&String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        listing.contains(&id) && listing.contains("private.bin"),
        "{listing}"
    );
    let got = lab.dir.join("got.bin");
    let mut args = vec!["fetch", id.as_str(), "-o", got.to_str().unwrap()];
    args.extend(common);
    let out = qdfs_in(&r.ns, &args);
    assert!(out.status.success(), "{out:?}");
    assert!(fs::read(&got).unwrap() == data, "fetched bytes differ");
    eprintln!("a fresh node with only the owner key listed and fetched the file");
}
