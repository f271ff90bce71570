//! The bodies of the fuzz targets in `fuzz/`, one function per target, so
//! that `tests/fuzz_corpus.rs` replays the committed corpora through exactly
//! the code the fuzzer runs. Every function takes arbitrary bytes, must never
//! panic on them, and asserts round trips wherever an encoder exists.
//!
//! Not an API: hidden from the docs and free to change.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::proto::access::AccessConfig;
use crate::proto::dht::{Contact, Dht, Msg, RecordInfo};
use crate::proto::identity::{RecordExt, ROLE_RELAY};
use crate::proto::message::{
    parse_segment, Reassembler, Segmenter, MAX_MESSAGE, MAX_PARTIAL_BYTES, MSG_SEGMENT,
    SEGMENT_HEADER, SEGMENT_PAYLOAD,
};
use crate::proto::node::{
    CompressionPolicy, LinkState, NodeConfig, RelayConfig, TrafficConfig, MSG_HELLO,
};
use crate::proto::onion::{
    self, body, parse_cell, server_handshake, ClientHandshake, Cmd, HopKeys, OnionKey, CELL_HEADER,
    CREATE_LEN,
};
use crate::proto::records::{RsaRecords, SignedValue};
use crate::proto::route::RoutePolicy;
use crate::proto::wire::{self, Encoded, Incoming, Ipv6View};
use crate::proto::{Identity, Node, NodeId, NodeRecord, PeerUri};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets, by name, as `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/` know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("cell", cell),
    ("datagram", datagram),
    ("dht", dht),
    ("frame", frame),
    ("message", message),
    ("record", record),
    ("segment", segment),
    ("uri", uri),
    #[cfg(feature = "shell")]
    ("control", control),
    #[cfg(feature = "shell")]
    ("config", config),
];

const GOLDEN_PEM: &str = include_str!("../tests/fixtures/identity-golden.pem");
const UNIX_TIME: u64 = 1_800_000_000;

fn node_config(seed: u8) -> NodeConfig {
    NodeConfig {
        peers: vec![],
        compression: CompressionPolicy {
            enabled: true,
            ..Default::default()
        },
        keepalive: 10,
        mtu: 1440,
        max_links: 64,
        advertise: vec![],
        roles: ROLE_RELAY,
        unix_time: UNIX_TIME,
        routes: RoutePolicy::default(),
        relay: RelayConfig::default(),
        traffic: TrafficConfig::default(),
        has_tun: true,
        rng_seed: [seed; 32],
        access: AccessConfig::default(),
    }
}

/// Node records as they arrive in hellos: what parses re-encodes to the
/// same bytes.
pub fn record(data: &[u8]) {
    if let Ok(rec) = NodeRecord::parse_unverified(data) {
        assert_eq!(rec.to_bytes(), data);
        if let Ok(f) = rec.fields() {
            // The extension fields re-encode to what was parsed.
            assert_eq!(RecordExt::parse(&f.to_bytes()).ok(), Some(f));
        }
        let _ = rec.verify();
    }
}

/// Peer URIs from configuration files and command lines.
pub fn uri(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = s.parse::<PeerUri>() {
            assert_eq!(u.to_string().parse::<PeerUri>().unwrap(), u);
        }
    }
}

/// What a link carries after decryption: IPv6 packets and QuantumGate
/// frames. Framing an application packet and decoding the frame gives the
/// packet back; fragments put together give the payload back.
pub fn frame(data: &[u8]) {
    let mut scratch = vec![0u8; 2 * wire::MAX_PACKET];
    let Ok(v) = Ipv6View::new_checked(data) else {
        return;
    };
    let _ = wire::control_of(v);
    let _ = wire::decode(v, &mut scratch);
    let mut out = vec![0u8; 2 * wire::MAX_PACKET];
    for compress in [true, false] {
        match wire::encode_app(v, compress.then(wire::Lz4Table::default).as_mut(), &mut out) {
            Encoded::AsIs => {
                assert_ne!(v.next_header(), wire::NH_QGATE);
                match wire::decode(v, &mut scratch) {
                    Ok((Incoming::App(p), false)) => assert_eq!(p, v.bytes()),
                    other => panic!("an app packet sent as it is decodes to {other:?}"),
                }
            }
            Encoded::Compressed(n) | Encoded::Wrapped(n) => {
                let framed = Ipv6View::new_checked(&out[..n]).expect("a frame is IPv6");
                assert_eq!(framed.next_header(), wire::NH_QGATE);
                match wire::decode(framed, &mut scratch) {
                    Ok((Incoming::App(p), _)) => assert_eq!(p, v.bytes()),
                    other => panic!("a framed app packet decodes to {other:?}"),
                }
            }
        }
    }
    let _ = wire::icmpv6_error(v, wire::ICMPV6_PACKET_TOO_BIG, 0, 1280, &mut out);
    let mtu = 48 + (data.len() % 1300);
    let mut joined = Vec::new();
    let mut next_offset = 0usize;
    let whole = wire::fragment(v, mtu, 1, |f| {
        assert!(f.len() <= mtu.max(56));
        let fv = Ipv6View::new_checked(f).expect("a fragment is IPv6");
        assert_eq!(fv.next_header(), wire::NH_FRAGMENT);
        let p = fv.payload();
        assert_eq!(p[0], v.next_header());
        let off = (u16::from_be_bytes([p[2], p[3]]) >> 3) as usize * 8;
        assert_eq!(off, next_offset);
        next_offset += p.len() - wire::FRAGMENT_HEADER_LEN;
        joined.extend_from_slice(&p[wire::FRAGMENT_HEADER_LEN..]);
    });
    if whole {
        assert_eq!(joined, v.payload());
    }
}

/// Whole UDP datagrams into a node, the way the network delivers them (and
/// the same bytes as a TUN packet).
pub fn datagram(data: &[u8]) {
    static NODE: OnceLock<Mutex<Node>> = OnceLock::new();
    let node = NODE.get_or_init(|| {
        let id = Identity::from_pem(GOLDEN_PEM, [7u8; 32]).expect("golden identity");
        Mutex::new(Node::new(id, 1, node_config(1), Instant::now()))
    });
    let mut node = node.lock().unwrap_or_else(|e| e.into_inner());
    let from = "198.18.0.2:7300".parse().unwrap();
    let _ = node.handle_datagram(Instant::now(), from, data);
    while node.poll_transmit().is_some() {}
    let _ = node.handle_tun_packet(Instant::now(), data);
    while node.poll_transmit().is_some() {}
}

/// Segments of the message layer, several per input, into one reassembler.
/// Input: `[len u8][segment bytes]` repeated; each step advances time 100 ms.
pub fn segment(data: &[u8]) {
    let start = Instant::now();
    let mut r = Reassembler::default();
    let mut rest = data;
    let mut step = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize * 8).min(tail.len());
        let (seg, more) = tail.split_at(n);
        rest = more;
        step += 1;
        if let Ok((h, payload)) = parse_segment(seg) {
            assert!(payload.len() <= SEGMENT_PAYLOAD && h.index < h.count);
        }
        if let Ok(Some((_, body))) = r.push(start + Duration::from_millis(100 * step), seg) {
            assert!(body.len() <= MAX_MESSAGE);
        }
        assert!(r.buffered() <= MAX_PARTIAL_BYTES);
    }
}

struct MessageLab {
    node: Node,
    peer_key: [u8; 32],
    peer_addr: std::net::Ipv6Addr,
    our_addr: std::net::Ipv6Addr,
    from: SocketAddr,
    start: Instant,
    step: u64,
}

/// Node-protocol messages (hello, DHT, segments, cells) as a verified
/// neighbour sends them over a link: the input's first byte is the message
/// type, the rest its body. Checked on the way: the message layer cuts any
/// body into segments that put back together (in any order) give the body
/// again, and a control frame decodes to the type and body it was built
/// from. Then the frame, and the raw input as an inner packet, go into a node.
pub fn message(data: &[u8]) {
    let Some((&ty, body)) = data.split_first() else {
        return;
    };
    if ty != MSG_SEGMENT && body.len() <= MAX_MESSAGE {
        let mut segs = Segmenter::new(u32::from(ty))
            .segment(ty, body)
            .expect("within MAX_MESSAGE");
        assert!(segs
            .iter()
            .all(|s| s.len() <= SEGMENT_HEADER + SEGMENT_PAYLOAD));
        let k = data.len() % segs.len();
        segs.rotate_left(k);
        if data.len() % 2 == 1 {
            segs.reverse();
        }
        let now = Instant::now();
        let mut r = Reassembler::default();
        let mut got = None;
        for s in &segs {
            if let Some(m) = r.push(now, s).expect("own segments parse") {
                assert!(got.is_none(), "a message completed twice");
                got = Some(m);
            }
        }
        assert_eq!(got.as_ref().map(|(t, b)| (*t, &b[..])), Some((ty, body)));
    }

    static LAB: OnceLock<Mutex<MessageLab>> = OnceLock::new();
    let lab = LAB.get_or_init(|| {
        let start = Instant::now();
        let ours = Identity::from_pem(GOLDEN_PEM, [7u8; 32]).expect("golden identity");
        let peer = Identity::generate(&mut ChaCha20Rng::seed_from_u64(11)).expect("peer identity");
        let mut node = Node::new(ours, 1, node_config(2), start);
        let ext = RecordExt {
            expires: Some(UNIX_TIME + 24 * 3600),
            endpoints: vec!["198.18.0.3:7300".parse().unwrap()],
            roles: ROLE_RELAY,
            onion_key: None,
        };
        let rec = peer.sign_record_with(1, &ext).to_bytes();
        let mut hello = vec![0u8];
        hello.extend_from_slice(&rec);
        let mut pkt = Vec::new();
        let (peer_addr, our_addr) = (peer.overlay_address(), node.address());
        wire::encode_control(peer_addr, our_addr, MSG_HELLO, &hello, &mut pkt);
        let from = "198.18.0.3:7300".parse().unwrap();
        node.inject_inner(start, peer.link_public(), from, &pkt);
        while node.poll_transmit().is_some() {}
        // The neighbour is verified: its messages reach the DHT and relay.
        assert!(node
            .status()
            .links
            .iter()
            .any(|l| l.address == Some(peer_addr) && l.state == LinkState::Up));
        Mutex::new(MessageLab {
            node,
            peer_key: peer.link_public(),
            peer_addr,
            our_addr,
            from,
            start,
            step: 0,
        })
    });
    let mut lab = lab.lock().unwrap_or_else(|e| e.into_inner());
    lab.step += 1;
    let now = lab.start + Duration::from_millis(50 * lab.step);
    let mut pkt = Vec::new();
    let n = wire::encode_control(lab.peer_addr, lab.our_addr, ty, body, &mut pkt);
    let v = Ipv6View::new_checked(&pkt[..n]);
    if body.len() + wire::FRAME_HEADER_LEN <= usize::from(u16::MAX) {
        let v = v.expect("a control frame is IPv6");
        assert_eq!(wire::control_of(v), Some((ty, body)));
    }
    let (key, from) = (lab.peer_key, lab.from);
    let node = &mut lab.node;
    node.inject_inner(now, key, from, &pkt);
    node.inject_inner(now, key, from, data);
    while node.poll_transmit().is_some() {}
    node.handle_timeout(now);
    while node.poll_transmit().is_some() {}
    while node.poll_tun_write().is_some() {}
}

/// DHT messages and value records: parsed, and fed to a DHT as if from a
/// verified neighbour (records then go through the real RSA checks).
pub fn dht(data: &[u8]) {
    if let Ok(m) = Msg::parse(data) {
        assert_eq!(Msg::parse(&m.to_bytes()).unwrap(), m);
    }
    if let Ok(v) = SignedValue::parse(data) {
        assert_eq!(SignedValue::parse(&v.to_bytes()).ok(), Some(v));
    }
    let now = Instant::now();
    let contact = |b: u8| Contact {
        info: RecordInfo {
            id: NodeId([b; 32]),
            seq: 1,
            expires: u64::MAX,
            roles: 0,
            ip: None,
        },
        record: Arc::from(&[b][..]),
    };
    let mut d = Dht::new(contact(1), RsaRecords::default(), now, UNIX_TIME, 7);
    d.handle_message(now, &contact(2), data);
    while d.poll_transmit().is_some() {}
}

struct CellKeys {
    onion: OnionKey,
    client: HopKeys,
    server: HopKeys,
}

/// Onion cells as a relay, a destination and a source see them: the header
/// parser, the CREATE handshake, and the layer operations on arbitrary
/// bytes. A layer added by one side is removed by the other.
pub fn cell(data: &[u8]) {
    static K: OnceLock<CellKeys> = OnceLock::new();
    let k = K.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let onion = OnionKey::generate(&mut rng);
        let id = NodeId([1; 32]);
        let (c, create) = ClientHandshake::start(&mut rng, id, onion.public);
        let (created, server) = server_handshake(&mut rng, &id, &[&onion], &create).unwrap();
        let client = c.finish(&created).unwrap();
        CellKeys {
            onion,
            client,
            server,
        }
    });
    let mut rng = ChaCha20Rng::seed_from_u64(data.len() as u64);
    if data.len() >= CREATE_LEN {
        let id = NodeId([1; 32]);
        let _ = server_handshake(&mut rng, &id, &[&k.onion], data);
    }
    // The command bodies a hop parses once a cell is opened.
    let _ = body::Extend::parse(data);
    let _ = body::Auth::parse(data);
    let _ = body::Lookup::parse(data);
    let _ = body::ExtendRefusal::parse(data);
    let Ok(h) = parse_cell(data) else {
        return;
    };
    let mut body = data[CELL_HEADER..].to_vec();
    let mut nonce = h.nonce;
    if let Ok(onion::Forward::Mine(_, c, r)) = k.server.forward(&mut nonce, &mut body) {
        assert!(r.end <= body.len());
        let _ = c == Cmd::Data;
    }
    let mut body = data[CELL_HEADER..].to_vec();
    if let Ok(u) = onion::unwrap(&[&k.client], h.nonce, &mut body) {
        assert!(u.data.end <= body.len());
    }
    let mut body = data[CELL_HEADER..].to_vec();
    let mut nonce = h.nonce;
    k.server.backward(&mut nonce, &mut body);
    // What a hop seals, the other end opens: same command, same data.
    let size = body.len();
    let payload = &data[..data.len().min(size - onion::TAG_LEN - onion::RELAY_HEADER)];
    let counter = u64::from(h.circ);
    let command = Cmd::try_from(data[CELL_HEADER - 1]).unwrap_or(Cmd::Data);
    let mut body = vec![0u8; size];
    let n = k.server.originate(counter, command, payload, &mut body);
    let u = onion::unwrap(&[&k.client], n, &mut body).expect("a hop's own cell opens");
    assert_eq!((u.counter, u.command), (counter, command));
    assert_eq!(&body[u.data], payload);
    let mut body = vec![0u8; size];
    let mut n = onion::wrap(&[&k.client], 0, counter, command, payload, &mut body);
    match k.server.forward(&mut n, &mut body) {
        Ok(onion::Forward::Mine(c, cm, r)) => {
            assert_eq!((c, cm), (counter, command));
            assert_eq!(&body[r], payload);
        }
        _ => panic!("a source's cell to the hop is not the hop's"),
    }
}

/// Control API requests: a request line parsed as the control socket does
/// (`qgate_api::Request::parse`: shape, command, argument types, limits).
/// What is accepted re-encodes to a request that parses to the same thing;
/// every refusal is one line. The same bytes as a service record (a DHT
/// value `service_lookup` reads).
#[cfg(feature = "shell")]
pub fn control(data: &[u8]) {
    use qgate_api::Request;
    match Request::parse(data) {
        Ok(r) => {
            let again = serde_json::to_string(&r).expect("a request encodes");
            assert_eq!(Request::parse(again.as_bytes()).as_ref(), Ok(&r));
        }
        Err(e) => {
            // One line for the client.
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
    // Service records are other nodes' DHT values (service_lookup).
    if let Ok(r) = qgate_api::ServiceRecord::decode(data) {
        assert_eq!(qgate_api::ServiceRecord::decode(&r.encode()), Ok(r));
    }
}

/// The TOML configuration: parsed and validated, or refused with one line
/// that names the file.
#[cfg(feature = "shell")]
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/etc/qgate/fuzz.toml");
    match crate::shell::config::parse(text, path) {
        Ok(c) => {
            // Parsing is a function of the text: the same text, the same result.
            let again = crate::shell::config::parse(text, path).expect("parses twice");
            assert_eq!(format!("{c:?}"), format!("{again:?}"));
            assert!(c.mtu >= wire::IPV6_MIN_MTU);
        }
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(line.starts_with("/etc/qgate/fuzz.toml: "), "{line}");
        }
    }
}
