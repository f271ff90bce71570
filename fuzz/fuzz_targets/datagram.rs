#![no_main]
//! Whole UDP datagrams into a node, the way the network delivers them.
use std::sync::Mutex;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use qgate::proto::node::{CompressionPolicy, NodeConfig};
use qgate::proto::{Identity, Node};

static NODE: Mutex<Option<Node>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = NODE.lock().unwrap();
    let node = guard.get_or_insert_with(|| {
        let pem = include_str!("../../tests/fixtures/identity-golden.pem");
        let id = Identity::from_pem(pem, [7u8; 32]).unwrap();
        let cfg = NodeConfig {
            peers: vec![],
            compression: CompressionPolicy { enabled: true, ..Default::default() },
            keepalive: 10,
            mtu: 1440,
            max_links: 64,
        };
        Node::new(id, 1, cfg, Instant::now(), 1)
    });
    let from = "198.18.0.2:7300".parse().unwrap();
    let _ = node.handle_datagram(Instant::now(), from, data);
    while node.poll_transmit().is_some() {}
    let _ = node.handle_tun_packet(Instant::now(), data);
});
