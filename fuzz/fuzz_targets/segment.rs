#![no_main]
//! Segments of the message layer, several per input, into one reassembler.
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use qgate::proto::message::{Reassembler, MAX_MESSAGE, MAX_PARTIAL_BYTES};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut r = Reassembler::default();
    // Input: [len u8][segment bytes] repeated; each step advances time 100 ms.
    let mut rest = data;
    let mut step = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize * 8).min(tail.len());
        let (seg, more) = tail.split_at(n);
        rest = more;
        step += 1;
        if let Ok(Some((_, body))) = r.push(start + Duration::from_millis(100 * step), seg) {
            assert!(body.len() <= MAX_MESSAGE);
        }
        assert!(r.buffered() <= MAX_PARTIAL_BYTES);
    }
});
