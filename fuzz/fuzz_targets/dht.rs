#![no_main]
//! DHT messages and value records: parsed, and fed to a DHT as if from a
//! verified neighbour (records then go through the real RSA checks).
//! The body lives in `qgate::fuzzing::dht`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/dht/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::dht(data));
