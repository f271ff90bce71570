#![no_main]
//! Onion cells as a relay, a destination and a source see them: the header
//! parser, the CREATE handshake, and the layer operations on arbitrary
//! bytes. Nothing may panic; the sealed paths must refuse what they can't
//! authenticate.
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qgate::proto::onion::{
    self, cmd, parse_cell, server_handshake, ClientHandshake, HopKeys, OnionKey, CELL_HEADER,
    CREATE_LEN,
};
use qgate::proto::NodeId;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Keys {
    onion: OnionKey,
    client: HopKeys,
    server: HopKeys,
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let onion = OnionKey::generate(&mut rng);
        let id = NodeId([1; 32]);
        let (c, create) = ClientHandshake::start(&mut rng, id, onion.public);
        let (created, server) = server_handshake(&mut rng, &id, &[&onion], &create).unwrap();
        let client = c.finish(&created).unwrap();
        Keys {
            onion,
            client,
            server,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    let mut rng = ChaCha20Rng::seed_from_u64(data.len() as u64);
    if data.len() >= CREATE_LEN {
        let id = NodeId([1; 32]);
        let _ = server_handshake(&mut rng, &id, &[&k.onion], data);
    }
    let Ok(h) = parse_cell(data) else {
        return;
    };
    let mut body = data[CELL_HEADER..].to_vec();
    let mut nonce = h.nonce;
    if let Ok(onion::Forward::Mine(_, c, r)) = k.server.forward(&mut nonce, &mut body) {
        assert!(r.end <= body.len());
        let _ = c == cmd::DATA;
    }
    let mut body = data[CELL_HEADER..].to_vec();
    if let Ok(u) = onion::unwrap(&[&k.client], h.nonce, &mut body) {
        assert!(u.data.end <= body.len());
    }
    let mut body = data[CELL_HEADER..].to_vec();
    let mut nonce = h.nonce;
    k.server.backward(&mut nonce, &mut body);
});
