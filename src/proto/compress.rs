//! When to try compressing.
//!
//! lz4 on incompressible data still costs about as much as the AES of the
//! packet, so a flow whose packets don't shrink stops being tried for a while:
//! each failure doubles how many packets of that flow skip compression (up to
//! [`MAX_SKIP`]), each success resets it. Flows are told apart by a small hash
//! of (protocol, ports) into [`BUCKETS`] slots per link; collisions only make
//! the guess coarser.
//!
//! Whether compressing pays at all is a second, node-wide question that
//! [`Governor`] answers: see there.

use super::wire::{self, Encoded, Ipv6View, Lz4Table, IPV6_HEADER_LEN};

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

/// Frames an application packet for a link or a circuit
/// ([`wire::encode_app`]), trying lz4 when `compress` is given and the
/// flow's [`Adaptive`] slot says so, and reporting the outcome to it.
/// Returns the frame (the packet itself, or its frame in `scratch`) and
/// whether it was compressed.
pub fn encode<'a>(
    view: Ipv6View<'a>,
    compress: Option<(&mut Adaptive, &mut Lz4Table)>,
    scratch: &'a mut [u8],
) -> (&'a [u8], bool) {
    let (slot, table) = match compress {
        Some((a, t)) => match a.should_try(&view) {
            Some(s) => (Some((a, s)), Some(t)),
            None => (None, None),
        },
        None => (None, None),
    };
    let encoded = wire::encode_app(view, table, scratch);
    let compressed = matches!(encoded, Encoded::Compressed(_));
    if let Some((a, s)) = slot {
        a.report(s, compressed);
    }
    match encoded {
        Encoded::AsIs => (view.bytes(), false),
        Encoded::Compressed(n) | Encoded::Wrapped(n) => (&scratch[..n], compressed),
    }
}

/// Busy share (per mille) of the data path above which compression pauses.
/// (A data thread that is the limit is rarely 100 % busy: on the 2-core
/// bench machine, sharing the cores with both iperf3s and the other node,
/// it measured 76–87 % while saturated, so 90 % paused too late.)
pub const BUSY_PAUSE: u16 = 750;
/// Busy share (per mille) under which a paused compression resumes.
pub const BUSY_RESUME: u16 = 500;

/// Whether compressing pays now, in the manner of `zstd --adapt`.
///
/// Compression spends the data path's time to save the link's bytes. That
/// pays while the link is the limit and loses while the data path is: lz4
/// runs at about 0.5 GB/s, a fast link carries more than that, and a thread
/// busy compressing moves fewer packets. The shell reports how busy the data
/// path was (the share of each window it spent working rather than waiting
/// for packets). A data path that never waits is the limit, so compression
/// pauses; once it waits again (the link, or the application, is the limit)
/// compression resumes. The shares are smoothed (half of each new window)
/// and the two thresholds apart, so one busy window does not flip it.
#[derive(Clone, Debug, Default)]
pub struct Governor {
    /// Smoothed busy share, per mille.
    busy: u16,
    paused: bool,
    /// Times compression paused since start.
    pauses: u64,
}

impl Governor {
    /// Reports the busy share (per mille, 0..=1000) of the last window.
    pub fn report(&mut self, busy_permille: u16) {
        let b = busy_permille.min(1000);
        self.busy = ((u32::from(self.busy) + u32::from(b)) / 2) as u16;
        if !self.paused && self.busy > BUSY_PAUSE {
            self.paused = true;
            self.pauses += 1;
        } else if self.paused && self.busy < BUSY_RESUME {
            self.paused = false;
        }
    }

    /// Whether compression is paused because the data path is the limit.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The smoothed busy share, per mille.
    pub fn busy_permille(&self) -> u16 {
        self.busy
    }

    /// Times compression paused since start.
    pub fn pauses(&self) -> u64 {
        self.pauses
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

    #[test]
    fn governor_pauses_only_while_the_data_path_is_the_limit() {
        let mut g = Governor::default();
        // Light load: compression stays on.
        for _ in 0..20 {
            g.report(300);
        }
        assert!(!g.paused());
        // One saturated window alone does not flip it.
        g.report(1000);
        assert!(!g.paused(), "busy {}", g.busy_permille());
        // A run of them does.
        for _ in 0..5 {
            g.report(1000);
        }
        assert!(g.paused());
        assert_eq!(g.pauses(), 1);
        // Between the thresholds it stays as it is.
        for _ in 0..20 {
            g.report(800);
        }
        assert!(g.paused());
        // Waiting for packets again: it resumes.
        for _ in 0..5 {
            g.report(100);
        }
        assert!(!g.paused());
        // Out-of-range reports are clamped, not trusted.
        for _ in 0..20 {
            g.report(u16::MAX);
        }
        assert!(g.busy_permille() <= 1000 && g.paused());
        assert_eq!(g.pauses(), 2);
    }
}
