//! When to try compressing.
//!
//! lz4 on incompressible data still costs about as much as the AES of the
//! packet, so a flow whose packets don't shrink stops being tried for a while:
//! each failure doubles how many packets of that flow skip compression (up to
//! [`MAX_SKIP`]), each success resets it. Flows are told apart by a small hash
//! of (protocol, ports) into [`BUCKETS`] slots per link; collisions only make
//! the guess coarser.

use super::wire::{Ipv6View, IPV6_HEADER_LEN};

/// Slots per link.
pub const BUCKETS: usize = 16;
/// Longest run of packets skipped after repeated failures.
pub const MAX_SKIP: u16 = 256;

#[derive(Clone, Copy, Default)]
struct Slot {
    skip_left: u16,
    penalty: u16,
}

/// Per-link adaptive compression state.
#[derive(Clone, Default)]
pub struct Adaptive {
    slots: [Slot; BUCKETS],
}

fn bucket(p: &Ipv6View<'_>) -> usize {
    let payload = p.payload();
    let nh = p.next_header() as usize;
    let ports = if (nh == 6 || nh == 17) && payload.len() >= 4 {
        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize
    } else {
        0
    };
    let h = ports.wrapping_mul(0x9E37_79B1) ^ nh;
    (h ^ (h >> 16)) % BUCKETS
}

impl Adaptive {
    /// Whether to try compressing this packet; returns the slot to report to.
    pub fn should_try(&mut self, p: &Ipv6View<'_>) -> Option<usize> {
        if p.bytes().len() <= IPV6_HEADER_LEN + super::wire::MIN_COMPRESS_PAYLOAD {
            return None;
        }
        let b = bucket(p);
        let s = &mut self.slots[b];
        if s.skip_left > 0 {
            s.skip_left -= 1;
            None
        } else {
            Some(b)
        }
    }

    /// Reports whether the attempt in slot `b` saved bytes.
    pub fn report(&mut self, b: usize, shrank: bool) {
        let s = &mut self.slots[b % BUCKETS];
        if shrank {
            s.penalty = 0;
        } else {
            s.penalty = (s.penalty * 2).clamp(1, MAX_SKIP);
            s.skip_left = s.penalty;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::write_ipv6_header;

    #[test]
    fn backs_off_and_recovers() {
        let mut p = vec![0u8; 1000];
        write_ipv6_header(
            &mut p,
            960,
            17,
            64,
            "fc::1".parse().unwrap(),
            "fc::2".parse().unwrap(),
        );
        let v = Ipv6View::new_checked(&p).unwrap();
        let mut a = Adaptive::default();
        let mut tried = 0;
        for _ in 0..10_000 {
            if let Some(b) = a.should_try(&v) {
                tried += 1;
                a.report(b, false);
            }
        }
        // Failing forever: tried about once per MAX_SKIP packets.
        assert!(tried < 10_000 / (MAX_SKIP as usize / 2), "tried {tried}");
        // One success brings back trying every packet.
        let b = loop {
            if let Some(b) = a.should_try(&v) {
                break b;
            }
        };
        a.report(b, true);
        assert!(a.should_try(&v).is_some());
    }
}
