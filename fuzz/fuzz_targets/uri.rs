#![no_main]
//! Peer URIs from configuration files and command lines.
use libfuzzer_sys::fuzz_target;
use qgate::proto::PeerUri;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = s.parse::<PeerUri>() {
            assert_eq!(u.to_string().parse::<PeerUri>().unwrap(), u);
        }
    }
});
