#![no_main]
//! Node records as they arrive in hellos: what parses re-encodes to the
//! same bytes.
//! The body lives in `qgate::fuzzing::record`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/record/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::record(data));
