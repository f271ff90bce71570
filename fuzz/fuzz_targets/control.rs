#![no_main]
//! Control API requests: a request line parsed and validated as the control
//! socket does before any handler runs. What is accepted re-encodes to a
//! request that parses to the same thing.
//! The body lives in `qgate::fuzzing::control`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/control/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::control(data));
