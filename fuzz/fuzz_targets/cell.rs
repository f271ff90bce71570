#![no_main]
//! Onion cells as a relay, a destination and a source see them: the header
//! parser, the CREATE handshake, and the layer operations on arbitrary
//! bytes. A layer added by one side is removed by the other.
//! The body lives in `qgate::fuzzing::cell`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/cell/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::cell(data));
