//! The node protocol's message layer: control messages larger than one
//! packet (a DHT reply full of ~600-byte records) cut into segments that
//! each fit any link, and put back together within fixed bounds.
//!
//! A segment is a control frame of type [`MSG_SEGMENT`] whose body is
//!
//! ```text
//! msg_id u32 | index u16 | count u16 | inner_type u8 | payload
//! ```
//!
//! (big-endian). Every segment's payload is at most [`SEGMENT_PAYLOAD`]
//! bytes, chosen so a segment fits the IPv6 minimum MTU of 1280 with room to
//! spare: the inner packet is never larger than a link carries, so the
//! underlay never fragments. A message is at most [`MAX_MESSAGE`] bytes.
//!
//! Reassembly is bounded per link: at most [`MAX_PARTIAL`] messages in
//! progress and [`MAX_PARTIAL_BYTES`] buffered; the oldest partial message
//! is dropped to make room, and partial messages expire after
//! [`PARTIAL_TIMEOUT`]. Duplicated segments are ignored; a segment that
//! contradicts earlier ones (other count or type) drops the message.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Control message type of a segment.
pub const MSG_SEGMENT: u8 = 2;
/// Segment header length.
pub const SEGMENT_HEADER: usize = 9;
/// Payload bytes per segment: 40 (IPv6) + 2 (frame) + 9 (segment) + 1200 =
/// 1251 bytes on the link, below the IPv6 minimum MTU of 1280.
pub const SEGMENT_PAYLOAD: usize = 1200;
/// Largest message: 32 KiB (28 segments).
pub const MAX_MESSAGE: usize = 32 * 1024;
/// Most segments in one message.
pub const MAX_SEGMENTS: usize = MAX_MESSAGE.div_ceil(SEGMENT_PAYLOAD);
/// Messages in reassembly at once, per link.
pub const MAX_PARTIAL: usize = 8;
/// Bytes buffered for reassembly, per link.
pub const MAX_PARTIAL_BYTES: usize = 2 * MAX_MESSAGE;
/// A message not complete after this long is dropped.
pub const PARTIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a message or segment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The message exceeds [`MAX_MESSAGE`].
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// The segment is shorter than its header or its fields are impossible.
    #[error("malformed segment")]
    Malformed,
    /// The segment contradicts earlier segments of its message.
    #[error("inconsistent segment")]
    Inconsistent,
}

/// Cuts messages into segment bodies.
#[derive(Debug, Default)]
pub struct Segmenter {
    next_id: u32,
}

impl Segmenter {
    /// Starts message ids at `seed` (so ids from before a restart are not reused at once).
    pub fn new(seed: u32) -> Segmenter {
        Segmenter { next_id: seed }
    }

    /// The segment bodies (each to be sent as a [`MSG_SEGMENT`] control
    /// frame) carrying a message of `inner_type`.
    pub fn segment(&mut self, inner_type: u8, body: &[u8]) -> Result<Vec<Vec<u8>>, MessageError> {
        if body.len() > MAX_MESSAGE {
            return Err(MessageError::TooLarge);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let chunks: Vec<&[u8]> = if body.is_empty() {
            vec![&[][..]]
        } else {
            body.chunks(SEGMENT_PAYLOAD).collect()
        };
        let count = chunks.len() as u16;
        Ok(chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut s = Vec::with_capacity(SEGMENT_HEADER + c.len());
                s.extend_from_slice(&id.to_be_bytes());
                s.extend_from_slice(&(i as u16).to_be_bytes());
                s.extend_from_slice(&count.to_be_bytes());
                s.push(inner_type);
                s.extend_from_slice(c);
                s
            })
            .collect())
    }
}

/// A parsed segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Message id (per sender).
    pub msg_id: u32,
    /// This segment's position.
    pub index: u16,
    /// Segments in the message.
    pub count: u16,
    /// The message's control type.
    pub inner_type: u8,
}

/// Parses a segment body into its header and payload.
pub fn parse_segment(body: &[u8]) -> Result<(SegmentHeader, &[u8]), MessageError> {
    if body.len() < SEGMENT_HEADER {
        return Err(MessageError::Malformed);
    }
    let h = SegmentHeader {
        msg_id: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        index: u16::from_be_bytes([body[4], body[5]]),
        count: u16::from_be_bytes([body[6], body[7]]),
        inner_type: body[8],
    };
    let payload = &body[SEGMENT_HEADER..];
    let count = h.count as usize;
    if count == 0
        || count > MAX_SEGMENTS
        || h.index >= h.count
        || payload.len() > SEGMENT_PAYLOAD
        // Every segment but the last is full.
        || ((h.index as usize) < count - 1 && payload.len() != SEGMENT_PAYLOAD)
        || h.inner_type == MSG_SEGMENT
    {
        return Err(MessageError::Malformed);
    }
    Ok((h, payload))
}

struct Partial {
    msg_id: u32,
    inner_type: u8,
    count: u16,
    started: Instant,
    got: u32,
    received: usize,
    data: Vec<u8>,
    last_len: usize,
}

/// Puts one link's segments back together.
#[derive(Default)]
pub struct Reassembler {
    partial: VecDeque<Partial>,
    bytes: usize,
    /// Messages dropped unfinished (evicted, expired or inconsistent).
    pub dropped: u64,
}

impl Reassembler {
    /// Bytes currently buffered.
    pub fn buffered(&self) -> usize {
        self.bytes
    }

    /// Takes one segment body. Returns the whole message, (type, body),
    /// when this segment completes it.
    pub fn push(
        &mut self,
        now: Instant,
        body: &[u8],
    ) -> Result<Option<(u8, Vec<u8>)>, MessageError> {
        self.expire(now);
        let (h, payload) = parse_segment(body)?;
        if h.count == 1 {
            return Ok(Some((h.inner_type, payload.to_vec())));
        }
        let pos = match self.partial.iter().position(|p| p.msg_id == h.msg_id) {
            Some(pos) => pos,
            None => {
                let size = h.count as usize * SEGMENT_PAYLOAD;
                while !self.partial.is_empty()
                    && (self.partial.len() >= MAX_PARTIAL || self.bytes + size > MAX_PARTIAL_BYTES)
                {
                    self.evict(0);
                }
                self.bytes += size;
                self.partial.push_back(Partial {
                    msg_id: h.msg_id,
                    inner_type: h.inner_type,
                    count: h.count,
                    started: now,
                    got: 0,
                    received: 0,
                    data: vec![0u8; size],
                    last_len: 0,
                });
                self.partial.len() - 1
            }
        };
        let p = &mut self.partial[pos];
        if p.count != h.count || p.inner_type != h.inner_type {
            self.evict(pos);
            return Err(MessageError::Inconsistent);
        }
        let bit = 1u32 << h.index;
        if p.got & bit != 0 {
            return Ok(None);
        }
        p.got |= bit;
        p.received += 1;
        let at = h.index as usize * SEGMENT_PAYLOAD;
        p.data[at..at + payload.len()].copy_from_slice(payload);
        if h.index + 1 == h.count {
            p.last_len = payload.len();
        }
        if p.received < p.count as usize {
            return Ok(None);
        }
        let mut done = self.partial.remove(pos).expect("index from position");
        self.bytes -= done.count as usize * SEGMENT_PAYLOAD;
        done.data
            .truncate((done.count as usize - 1) * SEGMENT_PAYLOAD + done.last_len);
        Ok(Some((done.inner_type, done.data)))
    }

    fn evict(&mut self, pos: usize) {
        if let Some(p) = self.partial.remove(pos) {
            self.bytes -= p.count as usize * SEGMENT_PAYLOAD;
            self.dropped += 1;
        }
    }

    /// Drops partial messages older than [`PARTIAL_TIMEOUT`].
    pub fn expire(&mut self, now: Instant) {
        while let Some(p) = self.partial.front() {
            if now.saturating_duration_since(p.started) < PARTIAL_TIMEOUT {
                break;
            }
            self.evict(0);
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock
mod tests {
    use super::*;

    fn body(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 256) as u8).collect()
    }

    #[test]
    fn roundtrip_sizes_and_orders() {
        let now = Instant::now();
        let mut s = Segmenter::new(1);
        for n in [
            0,
            1,
            SEGMENT_PAYLOAD - 1,
            SEGMENT_PAYLOAD,
            SEGMENT_PAYLOAD + 1,
            12_345,
            MAX_MESSAGE,
        ] {
            let msg = body(n);
            let mut segs = s.segment(9, &msg).unwrap();
            assert!(segs
                .iter()
                .all(|x| x.len() <= SEGMENT_HEADER + SEGMENT_PAYLOAD));
            // Reverse order, with a duplicate.
            segs.reverse();
            if segs.len() > 1 {
                let d = segs[0].clone();
                segs.insert(1, d);
            }
            let mut r = Reassembler::default();
            let mut out = None;
            for x in &segs {
                if let Some(m) = r.push(now, x).unwrap() {
                    assert!(out.is_none(), "completed twice");
                    out = Some(m);
                }
            }
            assert_eq!(out, Some((9, msg)), "size {n}");
            assert_eq!(r.buffered(), 0);
        }
        assert_eq!(
            s.segment(1, &body(MAX_MESSAGE + 1)),
            Err(MessageError::TooLarge)
        );
    }

    #[test]
    fn bounded_and_expiring() {
        let now = Instant::now();
        let mut s = Segmenter::new(1);
        let mut r = Reassembler::default();
        // Many messages, each missing its last segment.
        for _ in 0..100 {
            let segs = s.segment(9, &body(MAX_MESSAGE)).unwrap();
            for x in &segs[..segs.len() - 1] {
                assert!(r.push(now, x).unwrap().is_none());
            }
            assert!(r.buffered() <= MAX_PARTIAL_BYTES);
            assert!(r.partial.len() <= MAX_PARTIAL);
        }
        assert!(r.dropped >= 90);
        r.expire(now + PARTIAL_TIMEOUT);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn refuses_malformed_and_inconsistent() {
        let now = Instant::now();
        let mut r = Reassembler::default();
        let mut s = Segmenter::new(7);
        let segs = s.segment(9, &body(3000)).unwrap();
        assert!(r.push(now, &segs[0]).unwrap().is_none());
        // Same id, other type.
        let mut bad = segs[1].clone();
        bad[8] = 10;
        assert_eq!(r.push(now, &bad), Err(MessageError::Inconsistent));
        for b in [
            vec![],
            vec![0; 8],
            // count 0
            vec![0, 0, 0, 1, 0, 0, 0, 0, 9],
            // index >= count
            vec![0, 0, 0, 1, 0, 2, 0, 2, 9],
            // too many segments
            vec![0, 0, 0, 1, 0, 0, 0xff, 0xff, 9],
            // a short segment that is not the last
            vec![0, 0, 0, 1, 0, 0, 0, 2, 9, 1, 2, 3],
            // nested segment type
            vec![0, 0, 0, 1, 0, 0, 0, 1, MSG_SEGMENT],
        ] {
            assert!(r.push(now, &b).is_err(), "{b:?}");
        }
    }
}
