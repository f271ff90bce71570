//! The extender contract between real `qgate` nodes in network namespaces:
//! the typed control API (`qgate-api`), service records, extender keys, and
//! the DFS port opening in the node's inbound filter only when the DFS is
//! enabled.
//!
//! Run-book: needs root (namespaces, veth, TUN), `ip`, `nft` and `python3`,
//! and the `qgate` binary next to `qdfs` in the target directory (`cargo
//! build -p qgate` first). Without root or without that binary the test
//! says so and passes without running.
//!
//! Three nodes on a bridge (underlay 198.18.43.0/24); b and c know only a.
//! Node a has the DFS enabled the way `scripts/install --with-dfs` enables
//! it: `inbound.d/qdfs.toml` beside its qgate.toml, `[inbound] allow` left
//! empty. Node b has no drop-in (DFS not enabled) but runs `qdfs serve`
//! anyway. Both announce the qdfs service. From c: `identity` and
//! `extender_key` through the API client; `service_lookup` finds both
//! servers; a TCP connection over the overlay reaches a's port and not b's
//! (which b itself reaches locally: the server is there, the filter stops
//! it).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::QDFS;

/// Connects to [addr]:port from inside `ns` (3 s timeout): "open",
/// "refused" or "timeout".
fn probe(ns: &str, addr: &str, port: u16) -> String {
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET6)\ns.settimeout(3)\n\
         try:\n  s.connect(('{addr}',{port})); print('open')\n\
         except ConnectionRefusedError: print('refused')\n\
         except OSError: print('timeout')\n"
    );
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "timeout", "10", "python3", "-c", &script,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn service_records_keys_and_the_dfs_port() {
    let Some((mut lab, sw)) = common::lab_with_bridge() else {
        return;
    };
    let na = lab.add_host(&sw, "a", "198.18.43.1/24");
    let nb = lab.add_host(&sw, "b", "198.18.43.2/24");
    let nc = lab.add_host(&sw, "c", "198.18.43.3/24");
    // a: DFS enabled through the drop-in only.
    lab.add_node_with("a", &na, "198.18.43.1:7300", &[], &[], |dir| {
        fs::create_dir_all(dir.join("inbound.d")).unwrap();
        fs::write(dir.join("inbound.d/qdfs.toml"), "allow = [\"tcp/7400\"]\n").unwrap();
    });
    let a_uri = lab.nodes[0].uri.clone();
    lab.add_node_with(
        "b",
        &nb,
        "198.18.43.2:7300",
        std::slice::from_ref(&a_uri),
        &[],
        |_| {},
    );
    lab.add_node_with("c", &nc, "198.18.43.3:7300", &[a_uri], &[], |_| {});
    assert!(
        lab.log("a.log").contains("tcp/7400"),
        "a's filter does not list the drop-in's port:\n{}",
        lab.log("a.log")
    );

    for (i, name) in [(0, "a"), (1, "b")] {
        let node = &lab.nodes[i];
        let cfg = lab.dir.join(format!("dfs-{name}.toml"));
        fs::write(
            &cfg,
            format!(
                "data_dir = \"dfs-{name}\"\nport = 7400\ncontrol_socket = \"{}\"\n",
                node.dir.join("control.sock").display()
            ),
        )
        .unwrap();
        let ns = node.ns.clone();
        let cfg = cfg.to_str().unwrap().to_string();
        lab.spawn(
            &ns,
            Path::new(QDFS),
            &["serve", "--config", &cfg],
            &format!("serve-{name}.log"),
        );
    }

    // The typed API on c's socket.
    let (a, b, c) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    let api_c = qgate_api::Client::new(c.dir.join("control.sock"));
    let api_a = qgate_api::Client::new(a.dir.join("control.sock"));
    let id = api_c.identity().unwrap();
    assert_eq!(id.api, qgate_api::API_VERSION);
    assert_eq!(id.address.to_string(), c.address);
    assert_eq!(id.node_id.overlay_address(), id.address);
    assert_eq!(api_c.require_current_api().unwrap(), qgate_api::API_VERSION);
    let k1 = api_c.extender_key("qdfs").unwrap();
    assert_eq!(api_c.extender_key("qdfs").unwrap(), k1, "keys are stable");
    assert_ne!(api_c.extender_key("other").unwrap().key, k1.key);
    assert_ne!(api_a.extender_key("qdfs").unwrap().key, k1.key);
    let e = api_c.extender_key("../etc").unwrap_err();
    assert!(matches!(e, qgate_api::Error::Invalid { .. }), "{e}");

    // Both servers announce; c finds them by service name.
    let started = Instant::now();
    let mut found = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        found = api_c.service_lookup("qdfs").unwrap_or_default();
        if found.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut addrs: Vec<(String, u16, u32)> = found
        .iter()
        .map(|p| (p.address.to_string(), p.port, p.version))
        .collect();
    addrs.sort();
    let mut want = vec![(a.address.clone(), 7400, 1), (b.address.clone(), 7400, 1)];
    want.sort();
    assert_eq!(addrs, want, "service lookup from c");
    eprintln!(
        "service lookup found {} servers after {:.1} s",
        found.len(),
        started.elapsed().as_secs_f64()
    );

    // The DFS port: open on a (enabled), filtered on b (not enabled), and
    // b's server is really there (reached from b itself, not through the
    // TUN).
    assert_eq!(
        probe(&c.ns, &a.address, 7400),
        "open",
        "a's DFS port from c"
    );
    assert_eq!(
        probe(&c.ns, &b.address, 7400),
        "timeout",
        "b's DFS port from c"
    );
    assert_eq!(probe(&b.ns, &b.address, 7400), "open", "b's server locally");
    // Ports the drop-in does not name stay closed on a.
    assert_eq!(probe(&c.ns, &a.address, 7401), "timeout", "a's port 7401");
}
