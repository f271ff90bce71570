#![no_main]
//! Peer URIs from configuration files and command lines.
//! The body lives in `qgate::fuzzing::uri`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/uri/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::uri(data));
