#![no_main]
//! Segments of the message layer, several per input, into one reassembler.
//! Input: `[len u8][segment bytes]` repeated; each step advances time 100 ms.
//! The body lives in `qgate::fuzzing::segment`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/segment/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::segment(data));
