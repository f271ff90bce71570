//! Which chunk groups to ask which provider for, sans IO.
//!
//! The file is handed out in pieces of up to `piece` consecutive groups,
//! in order (sequential writes, and the front of a file is usable first),
//! skipping groups already verified or in flight. A provider that fails
//! gives its unfinished groups back and others pick them up.

use std::ops::Range;

/// One bit per chunk group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i` (false past the end).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets or clears bit `i` (ignored past the end).
    pub fn set(&mut self, i: u64, on: bool) {
        if i >= self.len {
            return;
        }
        let w = &mut self.words[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// The bits as bytes, bit `i` in byte `i / 8`, bit `i % 8`.
    pub fn to_bytes(&self) -> Vec<u8> {
        (0..self.len.div_ceil(8))
            .map(|b| (self.words[(b / 8) as usize] >> ((b % 8) * 8)) as u8)
            .collect()
    }

    /// The inverse of [`Bitmap::to_bytes`]; `None` if the length is wrong
    /// or bits past `len` are set.
    pub fn from_bytes(bytes: &[u8], len: u64) -> Option<Bitmap> {
        if bytes.len() as u64 != len.div_ceil(8) {
            return None;
        }
        let mut m = Bitmap::new(len);
        for (i, b) in bytes.iter().enumerate() {
            m.words[i / 8] |= (*b as u64) << ((i % 8) * 8);
        }
        let tail = len % 64;
        if tail != 0 && m.words.last().is_some_and(|w| w >> tail != 0) {
            return None;
        }
        Some(m)
    }
}

/// The fetch plan of one file.
#[derive(Debug)]
pub struct Schedule {
    done: Bitmap,
    taken: Bitmap,
    done_count: u64,
    piece: u64,
    cursor: u64,
    /// Groups handed out a second time in the endgame.
    doubled: Bitmap,
}

impl Schedule {
    /// A plan for the groups not set in `done`, in pieces of `piece` groups.
    pub fn new(done: Bitmap, piece: u64) -> Schedule {
        let len = done.len();
        Schedule {
            done_count: done.count(),
            done,
            taken: Bitmap::new(len),
            piece: piece.max(1),
            cursor: 0,
            doubled: Bitmap::new(len),
        }
    }

    fn free(&self, g: u64) -> bool {
        !self.done.get(g) && !self.taken.get(g)
    }

    /// The next piece to ask for, now marked in flight; `None` when every
    /// group is verified or in flight.
    pub fn next_piece(&mut self) -> Option<Range<u64>> {
        let n = self.done.len();
        let start = (self.cursor..n)
            .chain(0..self.cursor.min(n))
            .find(|g| self.free(*g))?;
        let mut end = start + 1;
        while end < n && end - start < self.piece && self.free(end) {
            end += 1;
        }
        for g in start..end {
            self.taken.set(g, true);
        }
        self.cursor = end;
        Some(start..end)
    }

    /// The next piece within one aligned block of `align` groups (block
    /// `k` is groups `k * align ..`) for which `owns(k)` holds, now marked
    /// in flight: the free groups at the start of the first such block
    /// with any. Pieces never cross a block boundary, so a whole free block
    /// is asked for exactly as a cache keeps it.
    pub fn next_piece_in(
        &mut self,
        align: u64,
        mut owns: impl FnMut(u64) -> bool,
    ) -> Option<Range<u64>> {
        let align = align.max(1);
        let n = self.done.len();
        for k in 0..n.div_ceil(align) {
            let (lo, hi) = (k * align, ((k + 1) * align).min(n));
            let Some(start) = (lo..hi).find(|g| self.free(*g)) else {
                continue;
            };
            if !owns(k) {
                continue;
            }
            let mut end = start + 1;
            while end < hi && self.free(end) {
                end += 1;
            }
            for g in start..end {
                self.taken.set(g, true);
            }
            return Some(start..end);
        }
        None
    }

    /// The endgame: when nothing is free, a piece already in flight
    /// elsewhere, asked for a second time so that one slow or stalled
    /// provider cannot hold the end of a file. Each group is handed out
    /// twice at most; whichever answer verifies first counts, the other is
    /// the same verified bytes again.
    pub fn double_piece(&mut self) -> Option<Range<u64>> {
        let n = self.done.len();
        let doublable =
            |s: &Schedule, g: u64| s.taken.get(g) && !s.doubled.get(g) && !s.done.get(g);
        let start = (0..n).find(|g| doublable(self, *g))?;
        let mut end = start + 1;
        while end < n && end - start < self.piece && doublable(self, end) {
            end += 1;
        }
        for g in start..end {
            self.doubled.set(g, true);
        }
        Some(start..end)
    }

    /// Records group `g` as verified and written; whether it was new.
    pub fn complete(&mut self, g: u64) -> bool {
        let new = g < self.done.len() && !self.done.get(g);
        if new {
            self.done.set(g, true);
            self.done_count += 1;
        }
        self.taken.set(g, false);
        new
    }

    /// Gives back the unfinished groups of a piece.
    pub fn release(&mut self, r: Range<u64>) {
        for g in r.clone() {
            self.taken.set(g, false);
        }
        self.cursor = self.cursor.min(r.start);
    }

    /// Whether every group is verified.
    pub fn is_complete(&self) -> bool {
        self.done_count == self.done.len()
    }

    /// Groups verified.
    pub fn done_count(&self) -> u64 {
        self.done_count
    }

    /// The verified groups.
    pub fn done(&self) -> &Bitmap {
        &self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bytes_round_trip() {
        let mut b = Bitmap::new(70);
        for i in [0, 9, 63, 64, 69, 70] {
            b.set(i, true);
        }
        assert_eq!(b.count(), 5);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 9);
        assert_eq!(Bitmap::from_bytes(&bytes, 70), Some(b));
        assert!(Bitmap::from_bytes(&bytes, 71).is_some());
        assert!(Bitmap::from_bytes(&[0x80], 7).is_none());
        assert!(Bitmap::from_bytes(&[0, 0], 7).is_none());
    }

    #[test]
    fn pieces_skip_done_and_taken_and_come_back_on_release() {
        let mut done = Bitmap::new(10);
        done.set(2, true);
        let mut s = Schedule::new(done, 4);
        assert_eq!(s.next_piece(), Some(0..2));
        assert_eq!(s.next_piece(), Some(3..7));
        assert_eq!(s.next_piece(), Some(7..10));
        assert_eq!(s.next_piece(), None);
        s.complete(3);
        s.complete(4);
        s.release(3..7);
        assert_eq!(s.next_piece(), Some(5..7));
        for g in [0, 1, 5, 6, 7, 8] {
            s.complete(g);
        }
        assert!(!s.is_complete());
        s.complete(9);
        s.complete(9);
        assert!(s.is_complete());
        assert_eq!(s.done_count(), 10);
        assert_eq!(s.next_piece(), None);
        let mut empty = Schedule::new(Bitmap::new(0), 4);
        assert_eq!(empty.next_piece_in(4, |_| true), None);
        assert!(empty.is_complete());
        assert_eq!(empty.next_piece(), None);
    }

    #[test]
    fn endgame_doubles_each_piece_in_flight_once() {
        let mut s = Schedule::new(Bitmap::new(10), 4);
        assert_eq!(s.double_piece(), None, "nothing in flight yet");
        assert_eq!(s.next_piece(), Some(0..4));
        assert_eq!(s.next_piece(), Some(4..8));
        assert_eq!(s.next_piece(), Some(8..10));
        assert!(s.complete(0));
        assert_eq!(s.double_piece(), Some(1..5));
        assert_eq!(s.double_piece(), Some(5..9));
        assert_eq!(s.double_piece(), Some(9..10));
        assert_eq!(s.double_piece(), None, "each group at most twice");
        assert!(s.complete(1));
        assert!(!s.complete(1), "the second answer is not new");
        assert_eq!(s.done_count(), 2);
    }

    #[test]
    fn aligned_pieces_by_owner() {
        let mut done = Bitmap::new(10);
        done.set(1, true);
        let mut s = Schedule::new(done, 4);
        // Only odd blocks: 4..8.
        assert_eq!(s.next_piece_in(4, |k| k % 2 == 1), Some(4..8));
        assert_eq!(s.next_piece_in(4, |k| k % 2 == 1), None);
        // Block 0 has group 1 done: the free run at its start first.
        assert_eq!(s.next_piece_in(4, |_| true), Some(0..1));
        assert_eq!(s.next_piece_in(4, |_| true), Some(2..4));
        assert_eq!(s.next_piece_in(4, |_| true), Some(8..10));
        assert_eq!(s.next_piece_in(4, |_| true), None);
    }
}
