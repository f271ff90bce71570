#![no_main]
//! The TOML configuration: parsed and validated, or refused with one line
//! that names the file.
//! The body lives in `qgate::fuzzing::config`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/config/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::config(data));
