#![no_main]
//! DHT messages and value records: parsed, and fed to a DHT as if from a
//! verified neighbour (records then go through the real RSA checks).
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use qgate::proto::dht::{Contact, Dht, Msg, RecordInfo};
use qgate::proto::records::{RsaRecords, SignedValue};
use qgate::proto::NodeId;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Msg::parse(data) {
        // What parses re-encodes to the same bytes.
        assert_eq!(Msg::parse(&m.to_bytes()).unwrap(), m);
    }
    let _ = SignedValue::parse(data);
    let now = Instant::now();
    let contact = |b: u8| Contact {
        info: RecordInfo {
            id: NodeId([b; 32]),
            seq: 1,
            expires: u64::MAX,
            roles: 0,
            ip: None,
        },
        record: Arc::from(&[b][..]),
    };
    let mut d = Dht::new(contact(1), RsaRecords::default(), now, 1_800_000_000, 7);
    d.handle_message(now, &contact(2), data);
    while d.poll_transmit().is_some() {}
});
