#![no_main]
//! Node-protocol messages (hello, DHT, segments, cells) as a verified
//! neighbour sends them over a link: the input's first byte is the message
//! type, the rest its body. Checked on the way: the message layer cuts any
//! body into segments that put back together (in any order) give the body
//! again, and a control frame decodes to the type and body it was built
//! from. Then the frame, and the raw input as an inner packet, go into a node.
//! The body lives in `qgate::fuzzing::message`, which `tests/fuzz_corpus.rs`
//! also runs on every file of `fuzz/corpus/message/`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qgate::fuzzing::message(data));
