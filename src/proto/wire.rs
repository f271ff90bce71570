//! What a link carries, in one place.
//!
//! boringtun's `Tunn` carries IP packets only, so everything on a link is an
//! IPv6 packet:
//! - an application's packet as it is (its payload sent uncompressed), or
//! - a QuantumGate frame: an IPv6 header whose next-header is
//!   [`NH_QGATE`] (253, reserved for experiments by RFC 3692), followed by
//!   a two-byte frame header and a body:
//!
//! ```text
//! byte 0: version (high 4 bits, = 1) | kind (low 4 bits)
//! byte 1: kind APP_LZ4 / APP_RAW: the application packet's own next-header
//!         kind CONTROL:           the control message type
//! body:   APP_LZ4: the application payload, lz4 block-compressed
//!         APP_RAW: the application payload as it is (only used when the
//!                  application itself used next-header 253)
//!         CONTROL: the control message
//! ```
//! The frame header is the "flag" that says a payload was compressed; an
//! uncompressed application packet costs no byte at all.

use std::net::Ipv6Addr;

/// IPv6 next-header value marking a QuantumGate frame (RFC 3692 experimental).
pub const NH_QGATE: u8 = 253;
/// Frame format version.
pub const FRAME_VERSION: u8 = 1;

/// What a frame carries: the low nibble of its first byte (the high one is
/// [`FRAME_VERSION`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A control message between the two neighbours.
    Control = 0,
    /// An application packet whose payload is lz4-compressed.
    AppLz4 = 1,
    /// An application packet carried as it is inside a frame.
    AppRaw = 2,
}

impl FrameKind {
    /// The frame's first byte: version and kind.
    pub fn first_byte(self) -> u8 {
        FRAME_VERSION << 4 | self as u8
    }
}

// A match by hand: a derive crate (num_enum) would bring a proc macro into
// the protocol core for a few lines, and this keeps the error type ours.
impl TryFrom<u8> for FrameKind {
    type Error = WireError;

    /// The kind in a frame's low nibble; [`WireError::FrameKind`] for the
    /// values no kind has.
    fn try_from(v: u8) -> Result<FrameKind, WireError> {
        match v {
            0 => Ok(FrameKind::Control),
            1 => Ok(FrameKind::AppLz4),
            2 => Ok(FrameKind::AppRaw),
            _ => Err(WireError::FrameKind),
        }
    }
}
/// IPv6 fixed header length.
pub const IPV6_HEADER_LEN: usize = 40;
/// Frame header length.
pub const FRAME_HEADER_LEN: usize = 2;
/// Largest IPv6 packet (without jumbograms) we handle anywhere.
pub const MAX_PACKET: usize = 65535;
/// The minimum IPv6 MTU.
pub const IPV6_MIN_MTU: usize = 1280;

/// Why a packet did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not an IPv6 packet.
    #[error("not IPv6")]
    NotIpv6,
    /// Shorter than its headers or its length field says.
    #[error("truncated")]
    Truncated,
    /// A frame of a version we do not speak.
    #[error("unknown frame version")]
    FrameVersion,
    /// A frame of an unknown kind.
    #[error("unknown frame kind")]
    FrameKind,
    /// The compressed payload does not decompress within bounds.
    #[error("bad compressed payload")]
    Decompress,
}

/// A checked view of an IPv6 packet: after [`Ipv6View::new_checked`] no
/// accessor can panic.
#[derive(Clone, Copy)]
pub struct Ipv6View<'a> {
    buf: &'a [u8],
}

impl<'a> Ipv6View<'a> {
    /// Checks version and lengths. The returned view covers exactly the
    /// header plus the payload length it announces.
    pub fn new_checked(buf: &'a [u8]) -> Result<Ipv6View<'a>, WireError> {
        if buf.is_empty() || buf[0] >> 4 != 6 {
            return Err(WireError::NotIpv6);
        }
        if buf.len() < IPV6_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let plen = u16::from_be_bytes([buf[4], buf[5]]) as usize;
        if buf.len() < IPV6_HEADER_LEN + plen {
            return Err(WireError::Truncated);
        }
        Ok(Ipv6View {
            buf: &buf[..IPV6_HEADER_LEN + plen],
        })
    }
    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        addr_at(self.buf, 8)
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        addr_at(self.buf, 24)
    }
    /// Next-header field.
    pub fn next_header(&self) -> u8 {
        self.buf[6]
    }
    /// The payload after the fixed header.
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[IPV6_HEADER_LEN..]
    }
    /// The whole packet.
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }
}

fn addr_at(buf: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&buf[at..at + 16]);
    Ipv6Addr::from(a)
}

/// Writes an IPv6 fixed header into `out[..40]`.
pub fn write_ipv6_header(
    out: &mut [u8],
    payload_len: usize,
    next_header: u8,
    hop_limit: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
) {
    out[0] = 0x60;
    out[1] = 0;
    out[2] = 0;
    out[3] = 0;
    out[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    out[6] = next_header;
    out[7] = hop_limit;
    out[8..24].copy_from_slice(&src.octets());
    out[24..40].copy_from_slice(&dst.octets());
}

/// A decoded frame arriving on a link.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// An application packet, ready for the TUN (in the input or in `scratch`).
    App(&'a [u8]),
    /// A control message from the neighbour: (type, body).
    Control(u8, &'a [u8]),
}

/// Decodes what arrived on a link. `scratch` must hold [`MAX_PACKET`] bytes;
/// a decompressed packet is rebuilt there.
pub fn decode<'a>(
    packet: Ipv6View<'a>,
    scratch: &'a mut [u8],
) -> Result<(Incoming<'a>, bool), WireError> {
    if packet.next_header() != NH_QGATE {
        return Ok((Incoming::App(packet.bytes()), false));
    }
    let p = packet.payload();
    if p.len() < FRAME_HEADER_LEN {
        return Err(WireError::Truncated);
    }
    if p[0] >> 4 != FRAME_VERSION {
        return Err(WireError::FrameVersion);
    }
    let body = &p[FRAME_HEADER_LEN..];
    match FrameKind::try_from(p[0] & 0x0f)? {
        FrameKind::Control => Ok((Incoming::Control(p[1], body), false)),
        FrameKind::AppLz4 => {
            let cap = scratch.len().min(MAX_PACKET);
            let n = lz4_flex::block::decompress_into(body, &mut scratch[IPV6_HEADER_LEN..cap])
                .map_err(|_| WireError::Decompress)?;
            rebuild_header(packet, p[1], n, scratch);
            Ok((Incoming::App(&scratch[..IPV6_HEADER_LEN + n]), true))
        }
        FrameKind::AppRaw => {
            let n = body.len();
            scratch[IPV6_HEADER_LEN..IPV6_HEADER_LEN + n].copy_from_slice(body);
            rebuild_header(packet, p[1], n, scratch);
            Ok((Incoming::App(&scratch[..IPV6_HEADER_LEN + n]), false))
        }
    }
}

fn rebuild_header(packet: Ipv6View<'_>, nh: u8, payload_len: usize, out: &mut [u8]) {
    out[..IPV6_HEADER_LEN].copy_from_slice(&packet.bytes()[..IPV6_HEADER_LEN]);
    out[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    out[6] = nh;
}

/// If `packet` is a well-formed control frame: its (type, body).
pub fn control_of(packet: Ipv6View<'_>) -> Option<(u8, &[u8])> {
    let p = packet.payload();
    if packet.next_header() == NH_QGATE
        && p.len() >= FRAME_HEADER_LEN
        && p[0] == FrameKind::Control.first_byte()
    {
        Some((p[1], &p[FRAME_HEADER_LEN..]))
    } else {
        None
    }
}

/// Outcome of [`encode_app`].
#[derive(Debug, PartialEq, Eq)]
pub enum Encoded {
    /// Send the application packet as it is.
    AsIs,
    /// Send `out[..n]`, which holds a compressed frame.
    Compressed(usize),
    /// Send `out[..n]`, which holds a raw frame.
    Wrapped(usize),
}

/// Payloads shorter than this are never worth compressing (TCP ACKs etc.).
pub const MIN_COMPRESS_PAYLOAD: usize = 96;

/// lz4's hash table, kept from one packet to the next: without it
/// lz4_flex allocates (and zeroes) a fresh one for every packet.
#[derive(Default)]
pub struct Lz4Table(lz4_flex::block::CompressTable);

/// Frames an application packet for a link, compressing its payload with
/// `compress`'s table when given and compression saves bytes. `out` must
/// hold [`MAX_PACKET`] + 1024 bytes (lz4's worst case for the largest packet).
pub fn encode_app(
    packet: Ipv6View<'_>,
    compress: Option<&mut Lz4Table>,
    out: &mut [u8],
) -> Encoded {
    let payload = packet.payload();
    let nh = packet.next_header();
    let compress = compress.filter(|_| payload.len() >= MIN_COMPRESS_PAYLOAD);
    if let Some(table) = compress {
        // Only worth it if the frame comes out strictly smaller than the
        // packet. (lz4_flex wants room for its worst case, so it cannot be
        // told to give up early; the adaptive skip in `compress` does that.)
        let limit = payload.len() - FRAME_HEADER_LEN - 1;
        let start = IPV6_HEADER_LEN + FRAME_HEADER_LEN;
        let room = lz4_flex::block::get_maximum_output_size(payload.len());
        let dst = &mut out[start..start + room];
        if let Ok(n) = lz4_flex::block::compress_into_with_table(payload, dst, &mut table.0) {
            if n < limit {
                out[..IPV6_HEADER_LEN].copy_from_slice(&packet.bytes()[..IPV6_HEADER_LEN]);
                out[4..6].copy_from_slice(&((n + FRAME_HEADER_LEN) as u16).to_be_bytes());
                out[6] = NH_QGATE;
                out[IPV6_HEADER_LEN] = FrameKind::AppLz4.first_byte();
                out[IPV6_HEADER_LEN + 1] = nh;
                return Encoded::Compressed(start + n);
            }
        }
    }
    if nh != NH_QGATE {
        return Encoded::AsIs;
    }
    let n = payload.len();
    out[..IPV6_HEADER_LEN].copy_from_slice(&packet.bytes()[..IPV6_HEADER_LEN]);
    out[4..6].copy_from_slice(&((n + FRAME_HEADER_LEN) as u16).to_be_bytes());
    out[IPV6_HEADER_LEN] = FrameKind::AppRaw.first_byte();
    out[IPV6_HEADER_LEN + 1] = nh;
    out[IPV6_HEADER_LEN + FRAME_HEADER_LEN..IPV6_HEADER_LEN + FRAME_HEADER_LEN + n]
        .copy_from_slice(payload);
    Encoded::Wrapped(IPV6_HEADER_LEN + FRAME_HEADER_LEN + n)
}

/// Writes a control frame into `out` and returns its length.
pub fn encode_control(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    msg_type: u8,
    body: &[u8],
    out: &mut Vec<u8>,
) -> usize {
    out.clear();
    out.resize(CONTROL_BODY + body.len(), 0);
    out[CONTROL_BODY..].copy_from_slice(body);
    write_control_header(out, src, dst, msg_type);
    out.len()
}

/// Where a control frame's body starts in its packet ([`control_of`]
/// returns the rest of the packet from here).
pub const CONTROL_BODY: usize = IPV6_HEADER_LEN + FRAME_HEADER_LEN;

/// Makes `packet` a control frame of type `msg_type` around the body
/// already in `packet[CONTROL_BODY..]`: writes only the headers, so a relay
/// re-sends a cell where it was decrypted and peeled, without copying it.
/// `packet` is at least `CONTROL_BODY` long and at most an IPv6 packet
/// without jumbogram (callers pass a cell behind its headers).
pub fn write_control_header(packet: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, msg_type: u8) {
    debug_assert!(packet.len() >= CONTROL_BODY && packet.len() - IPV6_HEADER_LEN <= 0xffff);
    let body = packet.len() - CONTROL_BODY;
    write_ipv6_header(packet, FRAME_HEADER_LEN + body, NH_QGATE, 255, src, dst);
    packet[IPV6_HEADER_LEN] = FrameKind::Control.first_byte();
    packet[IPV6_HEADER_LEN + 1] = msg_type;
}

/// IPv6 next-header value of the fragment header.
pub const NH_FRAGMENT: u8 = 44;
/// Length of the IPv6 fragment header.
pub const FRAGMENT_HEADER_LEN: usize = 8;

/// Cuts an IPv6 packet into fragments of at most `mtu` bytes each, as a
/// source would (RFC 8200 §4.5), calling `out` with each fragment. Used for
/// links whose path MTU is below the IPv6 minimum of 1280: programs are never
/// told to send less than 1280, so the node fragments what they send.
/// Returns false (and emits nothing) when the packet can't be fragmented
/// here: it carries hop-by-hop or routing headers (which belong in the
/// unfragmentable part), is already a fragment, or `mtu` is too small.
pub fn fragment(packet: Ipv6View<'_>, mtu: usize, id: u32, mut out: impl FnMut(&[u8])) -> bool {
    let nh = packet.next_header();
    if matches!(nh, 0 | 43 | NH_FRAGMENT) {
        return false;
    }
    let per = mtu.saturating_sub(IPV6_HEADER_LEN + FRAGMENT_HEADER_LEN) & !7;
    if per == 0 {
        return false;
    }
    let payload = packet.payload();
    let mut buf = [0u8; IPV6_MIN_MTU];
    let header = &packet.bytes()[..IPV6_HEADER_LEN];
    let mut offset = 0;
    while offset < payload.len() {
        let n = per
            .min(payload.len() - offset)
            .min(IPV6_MIN_MTU - IPV6_HEADER_LEN - FRAGMENT_HEADER_LEN);
        let more = offset + n < payload.len();
        let total = IPV6_HEADER_LEN + FRAGMENT_HEADER_LEN + n;
        buf[..IPV6_HEADER_LEN].copy_from_slice(header);
        buf[4..6].copy_from_slice(&((FRAGMENT_HEADER_LEN + n) as u16).to_be_bytes());
        buf[6] = NH_FRAGMENT;
        let f = &mut buf[IPV6_HEADER_LEN..IPV6_HEADER_LEN + FRAGMENT_HEADER_LEN];
        f[0] = nh;
        f[1] = 0;
        let off_field = ((offset / 8) as u16) << 3 | more as u16;
        f[2..4].copy_from_slice(&off_field.to_be_bytes());
        f[4..8].copy_from_slice(&id.to_be_bytes());
        buf[IPV6_HEADER_LEN + FRAGMENT_HEADER_LEN..total]
            .copy_from_slice(&payload[offset..offset + n]);
        out(&buf[..total]);
        offset += n;
    }
    true
}

/// ICMPv6 next-header value.
pub const NH_ICMPV6: u8 = 58;

/// Builds an ICMPv6 error about `offending` into `out`, addressed back to its
/// source and sent from its destination (the node answers "for" the path
/// towards that destination). Returns `None` when no error may be sent: the
/// offending packet is itself an ICMPv6 error, or is not from a unicast
/// source. `out` must hold at least [`IPV6_MIN_MTU`] bytes.
pub fn icmpv6_error(
    offending: Ipv6View<'_>,
    icmp_type: u8,
    code: u8,
    param: u32,
    out: &mut [u8],
) -> Option<usize> {
    if offending.next_header() == NH_ICMPV6 {
        match offending.payload().first() {
            Some(t) if *t >= 128 => {}
            _ => return None,
        }
    }
    let src = offending.src();
    if src.is_unspecified() || src.is_multicast() {
        return None;
    }
    // As much of the offending packet as keeps the error within the minimum MTU.
    let quote = offending
        .bytes()
        .len()
        .min(IPV6_MIN_MTU - IPV6_HEADER_LEN - 8);
    let icmp_len = 8 + quote;
    write_ipv6_header(out, icmp_len, NH_ICMPV6, 64, offending.dst(), src);
    let icmp = &mut out[IPV6_HEADER_LEN..IPV6_HEADER_LEN + icmp_len];
    icmp[0] = icmp_type;
    icmp[1] = code;
    icmp[2] = 0;
    icmp[3] = 0;
    icmp[4..8].copy_from_slice(&param.to_be_bytes());
    icmp[8..].copy_from_slice(&offending.bytes()[..quote]);
    let ck = icmpv6_checksum(offending.dst(), src, icmp);
    icmp[2..4].copy_from_slice(&ck.to_be_bytes());
    Some(IPV6_HEADER_LEN + icmp_len)
}

/// ICMPv6 type: destination unreachable.
pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
/// ICMPv6 type: packet too big.
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;

fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        let mut chunks = b.chunks_exact(2);
        for c in &mut chunks {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        if let [last] = chunks.remainder() {
            sum += (*last as u32) << 8;
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, NH_ICMPV6]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(nh: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER_LEN + payload.len()];
        write_ipv6_header(
            &mut p,
            payload.len(),
            nh,
            64,
            "fc00::1".parse().unwrap(),
            "fc00::2".parse().unwrap(),
        );
        p[IPV6_HEADER_LEN..].copy_from_slice(payload);
        p
    }

    #[test]
    fn compressible_roundtrip() {
        let p = packet(6, &[b'a'; 1000]);
        let mut out = vec![0u8; 2 * MAX_PACKET];
        let n = match encode_app(
            Ipv6View::new_checked(&p).unwrap(),
            Some(&mut Lz4Table::default()),
            &mut out,
        ) {
            Encoded::Compressed(n) => n,
            other => panic!("{other:?}"),
        };
        assert!(n < p.len());
        let mut scratch = vec![0u8; MAX_PACKET];
        let (inc, compressed) =
            decode(Ipv6View::new_checked(&out[..n]).unwrap(), &mut scratch).unwrap();
        assert!(compressed);
        assert_eq!(inc, Incoming::App(&p[..]));
    }

    #[test]
    fn incompressible_goes_as_is_and_253_is_wrapped() {
        let mut x: u32 = 12345;
        let random: Vec<u8> = (0..1200)
            .map(|_| {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let p = packet(17, &random);
        let mut out = vec![0u8; 2 * MAX_PACKET];
        assert_eq!(
            encode_app(
                Ipv6View::new_checked(&p).unwrap(),
                Some(&mut Lz4Table::default()),
                &mut out
            ),
            Encoded::AsIs
        );
        let p = packet(NH_QGATE, &random);
        let n = match encode_app(Ipv6View::new_checked(&p).unwrap(), None, &mut out) {
            Encoded::Wrapped(n) => n,
            other => panic!("{other:?}"),
        };
        let mut scratch = vec![0u8; MAX_PACKET];
        let (inc, _) = decode(Ipv6View::new_checked(&out[..n]).unwrap(), &mut scratch).unwrap();
        assert_eq!(inc, Incoming::App(&p[..]));
    }

    #[test]
    fn icmp_checksum_verifies() {
        let p = packet(6, &[1u8; 1400]);
        let mut out = vec![0u8; 2000];
        let n = icmpv6_error(
            Ipv6View::new_checked(&p).unwrap(),
            ICMPV6_PACKET_TOO_BIG,
            0,
            1300,
            &mut out,
        )
        .unwrap();
        assert_eq!(n, IPV6_MIN_MTU);
        let v = Ipv6View::new_checked(&out[..n]).unwrap();
        // Summing over a packet including its checksum gives zero.
        let mut icmp = v.payload().to_vec();
        let ck = u16::from_be_bytes([icmp[2], icmp[3]]);
        icmp[2] = 0;
        icmp[3] = 0;
        assert_eq!(icmpv6_checksum(v.src(), v.dst(), &icmp), ck);
        // Never an error about an error.
        assert!(icmpv6_error(v, ICMPV6_PACKET_TOO_BIG, 0, 1300, &mut vec![0; 2000]).is_none());
    }

    #[test]
    fn fragments_reassemble() {
        let payload: Vec<u8> = (0..1240u32).map(|i| i as u8).collect();
        let p = packet(17, &payload);
        let mut frags = Vec::new();
        assert!(fragment(Ipv6View::new_checked(&p).unwrap(), 1200, 9, |f| {
            frags.push(f.to_vec())
        }));
        assert_eq!(frags.len(), 2);
        let mut got = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= 1200);
            let v = Ipv6View::new_checked(f).unwrap();
            assert_eq!(v.next_header(), NH_FRAGMENT);
            let h = &v.payload()[..8];
            assert_eq!(h[0], 17);
            let off = u16::from_be_bytes([h[2], h[3]]);
            assert_eq!(((off >> 3) * 8) as usize, got.len());
            assert_eq!(off & 1 == 1, i == 0, "more-fragments flag");
            assert_eq!(u32::from_be_bytes([h[4], h[5], h[6], h[7]]), 9);
            got.extend_from_slice(&v.payload()[8..]);
        }
        assert_eq!(got, payload);
        // Not with a hop-by-hop header, not below 56 bytes.
        assert!(!fragment(
            Ipv6View::new_checked(&packet(0, &payload)).unwrap(),
            1200,
            1,
            |_| {}
        ));
        assert!(!fragment(Ipv6View::new_checked(&p).unwrap(), 50, 1, |_| {}));
    }

    #[test]
    fn random_input_never_panics() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut scratch = vec![0u8; MAX_PACKET];
        for i in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 300) as usize;
            let mut buf: Vec<u8> = (0..len).map(|j| (x >> (j % 56)) as u8).collect();
            if len > 0 {
                buf[0] = 0x60;
            }
            if len > 6 && i % 2 == 0 {
                buf[6] = NH_QGATE;
                if len > 5 {
                    let pl = (len.saturating_sub(40)) as u16;
                    buf[4..6].copy_from_slice(&pl.to_be_bytes());
                }
            }
            if let Ok(v) = Ipv6View::new_checked(&buf) {
                let _ = decode(v, &mut scratch);
            }
        }
    }

    #[test]
    fn frame_kinds_round_trip_and_unknown_ones_are_refused() {
        for k in [FrameKind::Control, FrameKind::AppLz4, FrameKind::AppRaw] {
            assert_eq!(FrameKind::try_from(k as u8), Ok(k));
            assert_eq!(k.first_byte() >> 4, FRAME_VERSION);
        }
        for v in 3..=u8::MAX {
            assert_eq!(FrameKind::try_from(v), Err(WireError::FrameKind));
        }
    }
}
