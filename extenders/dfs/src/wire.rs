//! The QuantumDFS wire protocol, sans IO: frames, messages, and the
//! server's per-connection state machine. Nothing here touches a socket or
//! a clock; [`crate::server`] and [`crate::fetch`] move the bytes.
//!
//! A connection is a TCP stream of frames, `length u32 | body`, the body
//! starting with a message type. The client opens with `Hello`; the server
//! answers `Hello` (or `Error(VersionMismatch)` and closes). Then the
//! client sends requests, and may send the next before the previous answer
//! has arrived; answers come in order:
//!
//! ```text
//! 0x01 Hello       version u8
//! 0x02 GetManifest id [32]
//! 0x03 GetRanges   id [32] | count u16 | count × (start u64, end u64)   group numbers
//! 0x04 PutShare    file manifest bytes (asks a holder to keep a share; see below)
//! 0x81 Hello       version u8
//! 0x82 Manifest    manifest bytes
//! 0x83 Ranges      encoded length u64, then that many raw bytes (not framed):
//!                  the BLAKE3 verified stream of the requested groups
//! 0x84 Error       code u8
//! 0x85 Accept      send the share's bytes now (its size is reserved)
//! 0x86 Stored      the share is held (its bytes, if sent, matched the root)
//! ```
//! `PutShare` (private storage, [`crate::holder`]) is answered before any
//! share bytes move: `Accept` (the size is reserved against the holder's
//! quota; the client then sends exactly `size` raw bytes, unframed, and
//! the holder answers `Stored` or `Error(BadRequest)` if they do not hash
//! to the root), `Stored` at once (already held), or
//! `Error(QuotaExceeded | Busy)` (the client places the share elsewhere).
//! Integers are big-endian. Requests are at most [`MAX_REQUEST_FRAME`]
//! bytes, responses [`MAX_RESPONSE_FRAME`]; group ranges must be non-empty,
//! ascending and disjoint, at most [`MAX_RANGES`] of them and
//! [`MAX_GROUPS_PER_REQUEST`] groups in all. Anything else is an error
//! value, never a panic.

use std::io::{self, Read};
use std::ops::Range;

use crate::id::Id;
use crate::manifest::{FileManifest, Manifest, MAX_MANIFEST};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Longest request frame body.
pub const MAX_REQUEST_FRAME: usize = 4096;
/// Longest response frame body (a manifest and its type byte).
pub const MAX_RESPONSE_FRAME: usize = MAX_MANIFEST + 1;
/// Most group ranges in one request.
pub const MAX_RANGES: usize = 64;
/// Most chunk groups in one request (4 MiB).
pub const MAX_GROUPS_PER_REQUEST: u64 = 256;

/// Why bytes are not a valid frame or message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame longer than allowed.
    #[error("frame of {len} bytes (at most {max})")]
    FrameTooLong {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An empty frame (no message type).
    #[error("empty frame")]
    Empty,
    /// A message type this build does not know.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// A message whose body has the wrong length.
    #[error("message {kind} has a body of {len} bytes")]
    BadLength {
        /// Which message.
        kind: &'static str,
        /// Its length.
        len: usize,
    },
    /// Group ranges that break the rules.
    #[error("bad group ranges: {0}")]
    BadRanges(&'static str),
    /// An error code this build does not know.
    #[error("unknown error code {0}")]
    UnknownErrorCode(u8),
}

/// Non-empty, ascending, disjoint ranges of chunk-group numbers, within the
/// request limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRanges(Vec<Range<u64>>);

impl GroupRanges {
    /// Checks ranges against the rules.
    pub fn new(ranges: Vec<Range<u64>>) -> Result<GroupRanges, WireError> {
        if ranges.is_empty() {
            return Err(WireError::BadRanges("no ranges"));
        }
        if ranges.len() > MAX_RANGES {
            return Err(WireError::BadRanges("too many ranges"));
        }
        let mut total: u64 = 0;
        let mut prev_end: Option<u64> = None;
        for r in &ranges {
            if r.start >= r.end {
                return Err(WireError::BadRanges("empty or reversed range"));
            }
            if prev_end.is_some_and(|p| r.start < p) {
                return Err(WireError::BadRanges("ranges overlap or are out of order"));
            }
            prev_end = Some(r.end);
            total = total.saturating_add(r.end - r.start);
        }
        if total > MAX_GROUPS_PER_REQUEST {
            return Err(WireError::BadRanges("too many groups"));
        }
        Ok(GroupRanges(ranges))
    }

    /// The ranges.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.0
    }

    /// Number of groups covered.
    pub fn groups(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }

    /// The last group number plus one.
    pub fn end(&self) -> u64 {
        self.0.last().map_or(0, |r| r.end)
    }
}

/// A message from client to server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Opens the connection.
    Hello {
        /// The client's protocol version.
        version: u8,
    },
    /// Asks for a manifest.
    GetManifest {
        /// Its ID.
        id: Id,
    },
    /// Asks for the verified stream of some groups of a file.
    GetRanges {
        /// The file's manifest ID.
        id: Id,
        /// Which groups.
        groups: GroupRanges,
    },
    /// Asks a holder to keep a private share (a plain file manifest).
    PutShare {
        /// The share's manifest (its ID is the share's ID).
        manifest: FileManifest,
    },
}

/// Why a server refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not provided here.
    NotFound,
    /// The request broke the protocol.
    BadRequest,
    /// Too many connections or requests; try elsewhere or later.
    Busy,
    /// Provided, but cannot be served now (data changed or unreadable).
    Unavailable,
    /// The client's protocol version is not spoken here.
    VersionMismatch,
    /// A share does not fit in the holder's quota (or it holds none).
    QuotaExceeded,
}

impl ErrorCode {
    fn byte(self) -> u8 {
        match self {
            ErrorCode::NotFound => 1,
            ErrorCode::BadRequest => 2,
            ErrorCode::Busy => 3,
            ErrorCode::Unavailable => 4,
            ErrorCode::VersionMismatch => 5,
            ErrorCode::QuotaExceeded => 6,
        }
    }
    fn from_byte(b: u8) -> Result<ErrorCode, WireError> {
        Ok(match b {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::BadRequest,
            3 => ErrorCode::Busy,
            4 => ErrorCode::Unavailable,
            5 => ErrorCode::VersionMismatch,
            6 => ErrorCode::QuotaExceeded,
            other => return Err(WireError::UnknownErrorCode(other)),
        })
    }
}

/// A message from server to client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Accepts the connection.
    Hello {
        /// The server's protocol version.
        version: u8,
    },
    /// A manifest (the client checks it hashes to the ID it asked for).
    Manifest {
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// The verified stream follows: exactly this many raw bytes.
    Ranges {
        /// Length of the stream.
        encoded_len: u64,
    },
    /// The request was refused.
    Error {
        /// Why.
        code: ErrorCode,
    },
    /// A `PutShare` is accepted: send the bytes.
    Accept,
    /// A share is held.
    Stored,
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn id_at(body: &[u8], at: usize) -> Id {
    let mut a = [0u8; 32];
    a.copy_from_slice(&body[at..at + 32]);
    Id(a)
}

fn u64_at(body: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&body[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Request {
    /// The request as one frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Request::Hello { version } => b.extend_from_slice(&[0x01, *version]),
            Request::GetManifest { id } => {
                b.push(0x02);
                b.extend_from_slice(&id.0);
            }
            Request::GetRanges { id, groups } => {
                b.push(0x03);
                b.extend_from_slice(&id.0);
                b.extend_from_slice(&(groups.0.len() as u16).to_be_bytes());
                for r in &groups.0 {
                    b.extend_from_slice(&r.start.to_be_bytes());
                    b.extend_from_slice(&r.end.to_be_bytes());
                }
            }
            Request::PutShare { manifest } => {
                b.push(0x04);
                b.extend_from_slice(&Manifest::File(*manifest).encode());
            }
        }
        frame(b)
    }

    /// Parses a request frame body.
    pub fn parse(body: &[u8]) -> Result<Request, WireError> {
        if body.len() > MAX_REQUEST_FRAME {
            return Err(WireError::FrameTooLong {
                len: body.len(),
                max: MAX_REQUEST_FRAME,
            });
        }
        let (&ty, rest) = body.split_first().ok_or(WireError::Empty)?;
        let bad = |kind| WireError::BadLength {
            kind,
            len: rest.len(),
        };
        match ty {
            0x01 => match rest {
                [v] => Ok(Request::Hello { version: *v }),
                _ => Err(bad("Hello")),
            },
            0x02 if rest.len() == 32 => Ok(Request::GetManifest { id: id_at(rest, 0) }),
            0x02 => Err(bad("GetManifest")),
            0x03 => {
                if rest.len() < 34 {
                    return Err(bad("GetRanges"));
                }
                let count = u16::from_be_bytes([rest[32], rest[33]]) as usize;
                if rest.len() != 34 + count * 16 {
                    return Err(bad("GetRanges"));
                }
                let ranges = (0..count)
                    .map(|i| {
                        let at = 34 + i * 16;
                        u64_at(rest, at)..u64_at(rest, at + 8)
                    })
                    .collect();
                Ok(Request::GetRanges {
                    id: id_at(rest, 0),
                    groups: GroupRanges::new(ranges)?,
                })
            }
            0x04 => match Manifest::parse(rest) {
                Ok(Manifest::File(manifest)) => Ok(Request::PutShare { manifest }),
                _ => Err(bad("PutShare")),
            },
            other => Err(WireError::UnknownType(other)),
        }
    }
}

impl Response {
    /// The response as one frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Response::Hello { version } => b.extend_from_slice(&[0x81, *version]),
            Response::Manifest { bytes } => {
                b.push(0x82);
                b.extend_from_slice(bytes);
            }
            Response::Ranges { encoded_len } => {
                b.push(0x83);
                b.extend_from_slice(&encoded_len.to_be_bytes());
            }
            Response::Error { code } => b.extend_from_slice(&[0x84, code.byte()]),
            Response::Accept => b.push(0x85),
            Response::Stored => b.push(0x86),
        }
        frame(b)
    }

    /// Parses a response frame body.
    pub fn parse(body: &[u8]) -> Result<Response, WireError> {
        if body.len() > MAX_RESPONSE_FRAME {
            return Err(WireError::FrameTooLong {
                len: body.len(),
                max: MAX_RESPONSE_FRAME,
            });
        }
        let (&ty, rest) = body.split_first().ok_or(WireError::Empty)?;
        let bad = |kind| WireError::BadLength {
            kind,
            len: rest.len(),
        };
        match ty {
            0x81 => match rest {
                [v] => Ok(Response::Hello { version: *v }),
                _ => Err(bad("Hello")),
            },
            0x82 => Ok(Response::Manifest {
                bytes: rest.to_vec(),
            }),
            0x83 if rest.len() == 8 => Ok(Response::Ranges {
                encoded_len: u64_at(rest, 0),
            }),
            0x83 => Err(bad("Ranges")),
            0x84 => match rest {
                [c] => Ok(Response::Error {
                    code: ErrorCode::from_byte(*c)?,
                }),
                _ => Err(bad("Error")),
            },
            0x85 if rest.is_empty() => Ok(Response::Accept),
            0x85 => Err(bad("Accept")),
            0x86 if rest.is_empty() => Ok(Response::Stored),
            0x86 => Err(bad("Stored")),
            other => Err(WireError::UnknownType(other)),
        }
    }
}

/// Splits a byte stream into frame bodies, refusing frames over a limit
/// before buffering them.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder for frames of at most `max` bytes.
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(WireError::FrameTooLong { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }
}

/// Why a blocking frame read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The stream failed or ended.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The frame broke the rules.
    #[error("{0}")]
    Wire(#[from] WireError),
}

/// Reads exactly one frame body from a blocking stream (and nothing more,
/// so raw bytes that follow stay in the stream).
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Vec<u8>, ReadFrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(WireError::FrameTooLong { len, max }.into());
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Where a server connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Ready,
    Closed,
}

/// What the server's shell must do with one received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this response and carry on.
    Reply(Response),
    /// Look up this manifest and send it (or `Error(NotFound)`).
    SendManifest(Id),
    /// Look up this file and send the verified stream of these groups.
    SendRanges(Id, GroupRanges),
    /// Decide on keeping this share (and receive its bytes if accepted).
    ReceiveShare(FileManifest),
    /// Send this response, if any, then close the connection.
    Close(Option<Response>),
}

/// One server connection's protocol state: hello first, then requests;
/// any protocol error closes it.
#[derive(Debug)]
pub struct ServerSession {
    phase: Phase,
    requests: u64,
    max_requests: u64,
}

impl ServerSession {
    /// A new connection that will serve at most `max_requests` requests.
    pub fn new(max_requests: u64) -> ServerSession {
        ServerSession {
            phase: Phase::AwaitHello,
            requests: 0,
            max_requests,
        }
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Feeds one received frame body.
    pub fn on_frame(&mut self, body: &[u8]) -> Action {
        let close = |code| Action::Close(Some(Response::Error { code }));
        if self.phase == Phase::Closed {
            return Action::Close(None);
        }
        let req = match Request::parse(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("bad request: {e}");
                self.phase = Phase::Closed;
                return close(ErrorCode::BadRequest);
            }
        };
        match (self.phase, req) {
            (Phase::AwaitHello, Request::Hello { version }) if version == PROTOCOL_VERSION => {
                self.phase = Phase::Ready;
                Action::Reply(Response::Hello {
                    version: PROTOCOL_VERSION,
                })
            }
            (Phase::AwaitHello, Request::Hello { .. }) => {
                self.phase = Phase::Closed;
                close(ErrorCode::VersionMismatch)
            }
            (Phase::Ready, Request::GetManifest { id }) => self.count(Action::SendManifest(id)),
            (Phase::Ready, Request::GetRanges { id, groups }) => {
                self.count(Action::SendRanges(id, groups))
            }
            (Phase::Ready, Request::PutShare { manifest }) => {
                self.count(Action::ReceiveShare(manifest))
            }
            _ => {
                self.phase = Phase::Closed;
                close(ErrorCode::BadRequest)
            }
        }
    }

    fn count(&mut self, a: Action) -> Action {
        self.requests += 1;
        if self.requests > self.max_requests {
            self.phase = Phase::Closed;
            return Action::Close(Some(Response::Error {
                code: ErrorCode::Busy,
            }));
        }
        a
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> &[u8] {
        &frame[4..]
    }

    #[test]
    fn requests_round_trip() {
        let id = Id([9; 32]);
        for r in [
            Request::Hello { version: 1 },
            Request::GetManifest { id },
            Request::GetRanges {
                id,
                groups: GroupRanges::new(vec![0..3, 5..6]).unwrap(),
            },
            Request::PutShare {
                manifest: FileManifest {
                    size: 12345,
                    root: [4; 32],
                },
            },
        ] {
            assert_eq!(Request::parse(body(&r.encode())), Ok(r));
        }
        for r in [
            Response::Hello { version: 1 },
            Response::Manifest { bytes: vec![1, 2] },
            Response::Ranges { encoded_len: 77 },
            Response::Error {
                code: ErrorCode::Busy,
            },
            Response::Error {
                code: ErrorCode::QuotaExceeded,
            },
            Response::Accept,
            Response::Stored,
        ] {
            assert_eq!(Response::parse(body(&r.encode())), Ok(r));
        }
    }

    #[test]
    fn ranges_rules() {
        assert!(GroupRanges::new(vec![]).is_err());
        assert!(GroupRanges::new(vec![3..3]).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 4..2;
        assert!(GroupRanges::new(vec![reversed]).is_err());
        assert!(GroupRanges::new(vec![0..4, 2..6]).is_err());
        assert!(GroupRanges::new(vec![5..6, 0..1]).is_err());
        assert!(GroupRanges::new(vec![0..MAX_GROUPS_PER_REQUEST + 1]).is_err());
        assert!(GroupRanges::new(vec![0..u64::MAX, u64::MAX - 1..u64::MAX]).is_err());
        let many: Vec<_> = (0..MAX_RANGES as u64 + 1)
            .map(|i| i * 2..i * 2 + 1)
            .collect();
        assert!(GroupRanges::new(many).is_err());
        assert_eq!(GroupRanges::new(vec![0..2, 2..4]).unwrap().groups(), 4);
    }

    #[test]
    fn session_wants_hello_first_and_closes_on_errors() {
        let id = Id([1; 32]);
        let get = Request::GetManifest { id }.encode();
        let mut s = ServerSession::new(2);
        assert!(matches!(s.on_frame(body(&get)), Action::Close(Some(_))));
        assert_eq!(s.on_frame(body(&get)), Action::Close(None));

        let mut s = ServerSession::new(2);
        let hello = Request::Hello { version: 9 }.encode();
        assert_eq!(
            s.on_frame(body(&hello)),
            Action::Close(Some(Response::Error {
                code: ErrorCode::VersionMismatch
            }))
        );

        let mut s = ServerSession::new(2);
        let hello = Request::Hello { version: 1 }.encode();
        assert!(matches!(s.on_frame(body(&hello)), Action::Reply(_)));
        assert_eq!(s.on_frame(body(&get)), Action::SendManifest(id));
        assert_eq!(s.on_frame(body(&get)), Action::SendManifest(id));
        // Over the per-connection request budget.
        assert!(matches!(s.on_frame(body(&get)), Action::Close(Some(_))));

        let mut s = ServerSession::new(2);
        assert!(matches!(s.on_frame(body(&hello)), Action::Reply(_)));
        assert!(matches!(s.on_frame(&[0x03, 1, 2]), Action::Close(Some(_))));
    }

    #[test]
    fn frame_decoder_limits_and_splits() {
        let mut d = FrameDecoder::new(8);
        d.push(&[0, 0, 0, 2, 0xaa]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&[0xbb, 0, 0, 0, 9]);
        assert_eq!(d.next_frame(), Ok(Some(vec![0xaa, 0xbb])));
        assert!(d.next_frame().is_err());
        let mut r = &[0u8, 0, 1, 0][..];
        assert!(read_frame(&mut r, 16).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seed = Request::GetRanges {
            id: Id([3; 32]),
            groups: GroupRanges::new(vec![0..1, 4..9]).unwrap(),
        }
        .encode();
        for _ in 0..20_000 {
            let mut b = seed.clone();
            for _ in 0..=(next() % 3) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            b.truncate((next() as usize) % (b.len() + 1));
            crate::fuzzing::fuzz_wire(&b);
            if b.len() > 4 {
                crate::fuzzing::fuzz_wire(&b[4..]);
                let mut s = ServerSession::new(4);
                s.on_frame(&Request::Hello { version: 1 }.encode()[4..]);
                s.on_frame(&b[4..]);
            }
        }
    }
}
