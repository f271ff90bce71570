//! Datagrams sealed for sending, laid end to end in one buffer and grouped
//! for UDP segmentation offload (GSO): a run is a series of datagrams to
//! one destination, all of one size but the last, which the shell hands the
//! kernel in one `sendmsg`.
//!
//! A link seals a packet straight into the batch ([`SendBatch::space`],
//! then [`SendBatch::commit`]), so nothing is copied between the encryption
//! and the kernel. The node fills one batch while it handles packets; the
//! data path swaps it for an empty one
//! ([`crate::proto::node::Node::take_output`]) and sends it after the
//! node's lock is released.

use std::net::SocketAddr;

/// Most bytes in one run (one GSO send); the kernel takes up to 64 KiB.
pub const GSO_BYTES: usize = 60 * 1024;

/// One GSO send: datagrams to `dst` of `segment` bytes each (the last may
/// be shorter), in the batch's bytes `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    dst: SocketAddr,
    start: usize,
    end: usize,
    segment: usize,
}

/// Sealed datagrams grouped into GSO runs.
#[derive(Debug)]
pub struct SendBatch {
    /// The datagrams, end to end, in `data[..used]`. The vector only grows
    /// (its length is its high-water mark), so space handed out is never
    /// zeroed again.
    data: Vec<u8>,
    used: usize,
    runs: Vec<Run>,
    /// Whether the last run may take another datagram.
    open: bool,
    max_segments: usize,
}

impl Default for SendBatch {
    fn default() -> SendBatch {
        SendBatch::new(1)
    }
}

impl SendBatch {
    /// An empty batch whose runs hold at most `max_segments` datagrams.
    pub fn new(max_segments: usize) -> SendBatch {
        SendBatch {
            data: Vec::new(),
            used: 0,
            runs: Vec::new(),
            open: false,
            max_segments: max_segments.max(1),
        }
    }

    /// At most this many datagrams per run from now on (the kernel may
    /// refuse GSO, and then this is 1).
    pub fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n.max(1);
    }

    /// The largest run this batch makes.
    pub fn max_segments(&self) -> usize {
        self.max_segments
    }

    /// Bytes of datagrams held.
    pub fn bytes(&self) -> usize {
        self.used
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// `len` bytes at the end of the batch to seal the next datagram into;
    /// [`SendBatch::commit`] then says how many it took.
    pub fn space(&mut self, len: usize) -> &mut [u8] {
        let end = self.used + len;
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        &mut self.data[self.used..end]
    }

    /// Adds the `len` bytes just written at the start of [`SendBatch::space`]
    /// as a datagram to `dst`.
    pub fn commit(&mut self, dst: SocketAddr, len: usize) {
        if len == 0 {
            // No datagram (and a run of 0-byte segments would not divide).
            return;
        }
        let start = self.used;
        let end = start + len;
        debug_assert!(end <= self.data.len());
        self.used = end;
        if self.open {
            if let Some(r) = self.runs.last_mut() {
                let count = (r.end - r.start) / r.segment;
                if r.dst == dst
                    && len <= r.segment
                    && end - r.start <= GSO_BYTES
                    && count < self.max_segments
                {
                    r.end = end;
                    // A shorter datagram must be the last of its run.
                    self.open = len == r.segment;
                    return;
                }
            }
        }
        self.runs.push(Run {
            dst,
            start,
            end,
            segment: len,
        });
        self.open = true;
    }

    /// Copies `d` in as a datagram to `dst` (what was not sealed here).
    pub fn push(&mut self, dst: SocketAddr, d: &[u8]) {
        self.space(d.len()).copy_from_slice(d);
        self.commit(dst, d.len());
    }

    /// The runs: (destination, datagrams end to end, segment size).
    pub fn runs(&self) -> impl Iterator<Item = (SocketAddr, &[u8], usize)> {
        self.runs
            .iter()
            .map(|r| (r.dst, &self.data[r.start..r.end], r.segment))
    }

    /// Each datagram on its own, in order.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.runs()
            .flat_map(|(dst, bytes, seg)| bytes.chunks(seg).map(move |d| (dst, d)))
    }

    /// Takes the last datagram back out; it stays readable, as returned,
    /// until the batch is next written.
    pub fn pop_last(&mut self) -> Option<(SocketAddr, &[u8])> {
        let r = self.runs.last_mut()?;
        let dst = r.dst;
        // Every datagram of a run but the last is `segment` long.
        let last_len = match (r.end - r.start) % r.segment {
            0 => r.segment,
            n => n,
        };
        let (start, end) = (r.end - last_len, r.end);
        if start == r.start {
            self.runs.pop();
            self.open = false;
        } else {
            r.end = start;
            // The run's datagrams are now all full-sized again.
            self.open = true;
        }
        self.used = start;
        Some((dst, &self.data[start..end]))
    }

    /// Forgets every datagram. The buffer is kept up to `keep` bytes, so
    /// one burst does not hold its memory for good.
    pub fn clear_keeping(&mut self, keep: usize) {
        self.clear();
        if self.data.len() > keep {
            self.data.truncate(keep);
            self.data.shrink_to(keep);
        }
    }

    /// Forgets every datagram (the buffer is kept).
    pub fn clear(&mut self) {
        self.used = 0;
        self.runs.clear();
        self.open = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 1], port))
    }

    fn add(b: &mut SendBatch, dst: SocketAddr, len: usize, fill: u8) {
        let s = b.space(len + 100);
        s[..len].fill(fill);
        b.commit(dst, len);
    }

    #[test]
    fn runs_group_equal_datagrams_to_one_destination() {
        let mut b = SendBatch::new(3);
        add(&mut b, ep(1), 100, 1);
        add(&mut b, ep(1), 100, 2);
        add(&mut b, ep(1), 60, 3); // shorter: ends the run
        add(&mut b, ep(1), 100, 4);
        add(&mut b, ep(2), 100, 5); // another destination
        add(&mut b, ep(2), 100, 6);
        add(&mut b, ep(2), 100, 7);
        add(&mut b, ep(2), 100, 8); // fourth segment: a new run
        add(&mut b, ep(2), 120, 9); // longer: a new run
        let runs: Vec<(SocketAddr, usize, usize)> =
            b.runs().map(|(d, bytes, s)| (d, bytes.len(), s)).collect();
        assert_eq!(
            runs,
            vec![
                (ep(1), 260, 100),
                (ep(1), 100, 100),
                (ep(2), 300, 100),
                (ep(2), 100, 100),
                (ep(2), 120, 120),
            ]
        );
        let firsts: Vec<u8> = b.datagrams().map(|(_, d)| d[0]).collect();
        assert_eq!(firsts, (1..=9).collect::<Vec<u8>>());
        assert!(b.datagrams().all(|(_, d)| d.iter().all(|&x| x == d[0])));
        assert_eq!(b.bytes(), 9 * 100 - 40 + 20);
    }

    #[test]
    fn a_run_stays_under_the_gso_limit() {
        let mut b = SendBatch::new(1000);
        for _ in 0..100 {
            add(&mut b, ep(1), 1400, 7);
        }
        assert!(b.runs().all(|(_, bytes, _)| bytes.len() <= GSO_BYTES));
        assert_eq!(b.datagrams().count(), 100);
    }

    #[test]
    fn the_last_datagram_comes_back_out() {
        let mut b = SendBatch::new(8);
        add(&mut b, ep(1), 100, 1);
        add(&mut b, ep(1), 100, 2);
        add(&mut b, ep(1), 40, 3);
        assert_eq!(b.pop_last(), Some((ep(1), &[3u8; 40][..])));
        // The run is open again for full-sized datagrams.
        add(&mut b, ep(1), 100, 4);
        assert_eq!(b.runs().count(), 1);
        assert_eq!(b.pop_last().map(|(_, d)| d[0]), Some(4));
        assert_eq!(b.pop_last().map(|(_, d)| d[0]), Some(2));
        assert_eq!(b.pop_last().map(|(_, d)| d[0]), Some(1));
        assert_eq!(b.pop_last(), None);
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn an_empty_datagram_is_not_added() {
        let mut b = SendBatch::new(8);
        b.push(ep(1), &[]);
        assert!(b.is_empty());
        assert_eq!(b.pop_last(), None);
        add(&mut b, ep(1), 10, 1);
        b.commit(ep(1), 0);
        assert_eq!(b.datagrams().count(), 1);
    }

    #[test]
    fn a_burst_does_not_keep_its_memory() {
        let mut b = SendBatch::new(8);
        for _ in 0..100 {
            add(&mut b, ep(1), 1000, 1);
        }
        b.clear_keeping(10_000);
        assert!(b.data.capacity() <= 20_000);
        add(&mut b, ep(1), 1000, 2);
        assert_eq!(b.datagrams().count(), 1);
    }

    #[test]
    fn space_is_reused_after_a_clear() {
        let mut b = SendBatch::new(8);
        add(&mut b, ep(1), 1000, 1);
        b.push(ep(2), &[9; 10]);
        let cap = b.data.capacity();
        b.clear();
        assert!(b.is_empty());
        add(&mut b, ep(1), 1000, 2);
        assert_eq!(b.data.capacity(), cap);
        assert_eq!(b.datagrams().count(), 1);
    }
}
