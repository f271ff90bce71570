//! The route presets with real nodes in network namespaces: the default
//! (`balanced`, relays whenever possible) takes circuits on a network that
//! has relays, and `private` never falls back to a direct link: with too few
//! relays the program hears "unreachable" and the log says why, once. (Two
//! nodes on the default going direct, with `qgate status` saying why, is
//! tests/readme.rs.) One bridge, one /24, so the subnet rule is off, as
//! any test network of a few subnets needs. Needs root; see harness/mod.rs.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{qgate_bin, wait_until, Lab};
use serde_json::Value;

fn json(config: &Path, cmd: &str) -> Value {
    let out = Command::new(qgate_bin())
        .args([cmd, "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "qgate {cmd}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A lab of `names.len()` nodes on 198.18.`net`.0/24, every one configured
/// with the first as its bootstrap peer, on `preset` (None: the default);
/// the nodes `two_workers` lists run two data threads.
fn lab(tag: &str, net: u8, names: &[&str], preset: Option<&str>, two_workers: &[usize]) -> Lab {
    let mut lab = Lab::new(tag);
    for (i, name) in names.iter().enumerate() {
        let ip = format!("198.18.{net}.{}", i + 1);
        let ns = lab.add_host(name, &[&format!("{ip}/24")]);
        let n = lab.add_node(name, &ns, &format!("{ip}:7300"));
        lab.nodes[n].edit_config(|t| {
            // The harness pins "fast"; these tests want the preset's own.
            assert!(t.contains("preset = \"fast\"\n") && t.contains("\n[relay]\n"));
            let line = preset
                .map(|p| format!("preset = \"{p}\"\n"))
                .unwrap_or_default();
            let workers = if two_workers.contains(&i) { 2 } else { 1 };
            assert!(t.contains("# workers = 1\n"));
            t.replacen("preset = \"fast\"\n", &line, 1)
                .replacen("\n[relay]\n", "\n[relay]\ndistinct_subnets = false\n", 1)
                .replacen("# workers = 1\n", &format!("workers = {workers}\n"), 1)
        });
    }
    let boot = lab.nodes[0].uri.clone();
    for i in 1..lab.nodes.len() {
        lab.nodes[i].set_peers(&[&boot]);
    }
    lab.start_all();
    lab
}

#[test]
fn seven_nodes_on_the_default_preset_talk_through_circuits() {
    let names = ["n0", "a", "n2", "n3", "n4", "n5", "g"];
    let (a, g) = (1, 6);
    // The circuit's ends run two data threads each (`link.workers`): the
    // source's route and the destination's end sit on the thread that
    // holds the circuit's link.
    let mut lab = lab("pb", 32, &names, None, &[a, g]);
    let config = lab.nodes[a].config.clone();
    let st = json(&config, "status");
    assert_eq!(st["preset"], "balanced");
    assert_eq!(st["routing"]["default"], "1..2 or direct");
    let dst = lab.nodes[g].address.clone();
    let ns = lab.nodes[a].ns.clone();
    // Ping until a circuit to g carries it: the first packets may go
    // direct while a's relay pool fills (it counts again every 10 s).
    let mut circuits = Value::Null;
    let through = wait_until(Duration::from_secs(60), || {
        lab.sh(&ns, &format!("ping -6 -c 1 -W 1 {dst}"));
        circuits = json(&config, "circuits");
        circuits["circuits"].as_array().is_some_and(|l| {
            l.iter().any(|c| {
                c["destination"] == dst.as_str()
                    && c["state"] == "ready"
                    && c["tx_bytes"].as_u64() > Some(0)
                    && c["rx_bytes"].as_u64() > Some(0)
            })
        })
    });
    assert!(through, "no circuit carried a's pings to g:\n{circuits:#}");
    let c = circuits["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["destination"] == dst.as_str() && c["state"] == "ready")
        .unwrap()
        .clone();
    let hops = c["hops"].as_array().unwrap().len();
    assert!((1..=2).contains(&hops), "{c:#}");
    let summary = json(&config, "status")["routing"]["summary"].clone();
    assert!(
        summary.as_str().unwrap().contains("through relays"),
        "{summary}"
    );
    // A relay on the circuit carried it.
    let carried: u64 = (0..names.len())
        .filter(|&i| i != a && i != g)
        .map(|i| {
            json(&lab.nodes[i].config.clone(), "circuits")["relayed"]
                .as_array()
                .map_or(0, |l| l.len() as u64)
        })
        .sum();
    assert!(carried > 0, "no relay carries a circuit");
    // And its data thread passes the circuit's cells on, not its node
    // (handed over with the first cell after both links were).
    let relays: Vec<usize> = (0..names.len()).filter(|&i| i != a && i != g).collect();
    let mut on_plane = 0;
    let handed = wait_until(Duration::from_secs(10), || {
        lab.sh(&ns, &format!("ping -6 -c 1 -W 1 {dst}"));
        on_plane = relays
            .iter()
            .map(|&i| {
                json(&lab.nodes[i].config.clone(), "status")["data_path"]["plane_circuits"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum();
        on_plane > 0
    });
    assert!(handed, "no relay's data thread passes the circuit on");
    lab.stop(a, false);
}

#[test]
fn private_never_goes_direct_and_says_why_once() {
    let names = ["b", "a", "c"];
    let lab = lab("pp", 33, &names, Some("private"), &[]);
    let (a, c) = (1, 2);
    let config = lab.nodes[a].config.clone();
    let dst = lab.nodes[c].address.clone();
    let ns = lab.nodes[a].ns.clone();
    // a knows c (through b) and links to b, but with one relay besides the
    // ends there is no 2-relay path, and private does not go direct.
    for _ in 0..5 {
        let out = lab.sh(&ns, &format!("ping -6 -c 1 -W 1 {dst}"));
        assert!(!out.status.success(), "a reached c: {out:?}");
        std::thread::sleep(Duration::from_millis(1100));
    }
    let out = lab.sh(&ns, &format!("ping -6 -c 1 -W 2 {dst}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Destination unreachable"), "{text}");
    let st = json(&config, "status");
    assert_eq!(st["routing"]["default"], "2..3");
    let summary = st["routing"]["summary"].as_str().unwrap().to_string();
    assert!(summary.starts_with("unreachable: "), "{summary}");
    assert!(
        summary.ends_with("2 needed; this policy never goes direct"),
        "{summary}"
    );
    let v = json(&config, "circuits");
    let notes = v["no_circuit"].as_array().unwrap();
    assert_eq!(notes.len(), 1, "{v:#}");
    assert_eq!(notes[0]["destination"], dst.as_str());
    assert_eq!(notes[0]["outcome"], "unreachable");
    // The log said it once, at info.
    let log = lab.nodes[a].log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("destination unreachable:"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains(" INFO "), "{}", lines[0]);
    assert!(lines[0].contains("this route never goes direct"));
}
