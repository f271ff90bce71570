#![no_main]
//! Whole UDP datagrams into a node, the way the network delivers them (and
//! the same bytes as a TUN packet).
//! The body lives in `qgate::fuzzing::datagram`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/datagram/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::datagram(data));
