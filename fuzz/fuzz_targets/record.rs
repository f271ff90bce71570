#![no_main]
//! Node records as they arrive in hellos.
use libfuzzer_sys::fuzz_target;
use qgate::proto::NodeRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = NodeRecord::parse_unverified(data) {
        // Re-encoding what parsed gives the same bytes.
        assert_eq!(rec.to_bytes(), data);
        let _ = rec.verify();
    }
});
