#![no_main]
//! What a link carries after decryption: IPv6 packets and QuantumGate
//! frames. Framing an application packet and decoding the frame gives the
//! packet back; fragments put together give the payload back.
//! The body lives in `qgate::fuzzing::frame`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/frame/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::frame(data));
