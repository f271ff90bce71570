#![no_main]
//! What a link carries after decryption: IPv6 packets and QuantumGate frames.
use libfuzzer_sys::fuzz_target;
use qgate::proto::wire::{self, Ipv6View};

fuzz_target!(|data: &[u8]| {
    let mut scratch = vec![0u8; 2 * wire::MAX_PACKET];
    if let Ok(v) = Ipv6View::new_checked(data) {
        let _ = wire::control_of(v);
        let _ = wire::decode(v, &mut scratch);
        let mut out = vec![0u8; 2 * wire::MAX_PACKET];
        let _ = wire::encode_app(v, true, &mut out);
        let _ = wire::icmpv6_error(v, wire::ICMPV6_PACKET_TOO_BIG, 0, 1280, &mut out);
        let mtu = 48 + (data.len() % 1300);
        let _ = wire::fragment(v, mtu, 1, |f| assert!(f.len() <= mtu.max(56)));
    }
});
