//! The node: links to neighbours and what flows over them, as a sans-IO state
//! machine.
//!
//! Inputs: packets from the TUN ([`Node::handle_tun_packet`]), datagrams from
//! the UDP socket ([`Node::handle_datagram`]), the passing of time
//! ([`Node::handle_timeout`]) and what the shell learns from the kernel
//! ([`Node::set_path_mtu`]). Outputs: the return values (a datagram to send or
//! a packet for the TUN, borrowed from the node's own buffers so the hot path
//! allocates nothing) and queued control datagrams drained with
//! [`Node::poll_transmit`].
//!
//! One caveat of the sans-IO shape: boringtun's `Tunn` reads the clock
//! itself, so `now` drives only our own timers.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use serde::Serialize;

use super::access::{link_subnet, AccessConfig};
use super::compress::Adaptive;
use super::dht::{Contact, Dht, DhtStats, Goal, LookupDone, Outcome, Refresh, Source};
use super::identity::{is_overlay_address, put_endpoint, Identity, NodeId, NodeRecord, RecordExt};
use super::limit::{Limit, SourceTable};
use super::message::{self, Reassembler, Segmenter};
use super::records::{node_info, value_target, RsaRecords, SignedValue};
use super::route::{Policy, RoutePolicy};
use super::uri::PeerUri;
use super::wire::{self, Encoded, Incoming, Ipv6View, IPV6_MIN_MTU, MAX_PACKET};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

mod circuits;
pub use circuits::{
    CellDrops, CircuitView, CircuitsReport, InboundView, RelayConfig, RelayStats, RelayedView,
    RouteNoteView, RouteOutcome, RoutingSummary, TrafficConfig, CIRCUIT_MTU, CREATE_LIMIT,
};

/// WireGuard's data-message overhead: type, receiver, counter, tag.
pub const WG_OVERHEAD: usize = 32;
/// Outer UDP header.
pub const UDP_HEADER: usize = 8;
/// Outer IPv4 header.
pub const IPV4_HEADER: usize = 20;
/// Outer IPv6 header.
pub const IPV6_HEADER: usize = 40;

/// The MTU budget of a direct link.
///
/// A link carries IPv6 packets inside WireGuard inside UDP. With a 1500-byte
/// underlay: 1500 - 20 (IPv4) - 8 (UDP) - 32 (WireGuard) = 1440 bytes, or
/// 1500 - 40 (IPv6) - 8 - 32 = 1420 over an IPv6 underlay. Our own framing
/// costs nothing here: an uncompressed application packet goes as it is, and
/// a compressed one is only sent when frame header plus compressed payload
/// come out smaller than the original packet. (The one exception, an
/// application packet that itself uses next-header 253, is wrapped with two
/// extra bytes and may be refused by the MTU check.)
pub fn link_mtu(underlay_mtu: usize, ipv6_underlay: bool) -> usize {
    let outer = if ipv6_underlay {
        IPV6_HEADER
    } else {
        IPV4_HEADER
    };
    underlay_mtu.saturating_sub(outer + UDP_HEADER + WG_OVERHEAD)
}

/// Control message: a node record, with flags saying whether the sender
/// holds a verified record of the receiver (ACK) and whether it wants an
/// answer (REPLY, set while it has no ACK from the receiver). Each side
/// repeats its hello every second until it has the other's record and an
/// ACK, so a lost hello costs a second, never a link.
pub const MSG_HELLO: u8 = 1;
/// Control message type: a DHT message (see [`super::dht`]).
pub const MSG_DHT: u8 = 3;
/// Control message type: an onion cell (see `onion`).
pub const MSG_CELL: u8 = 4;
/// Hello flag: an observed-endpoint field follows the flags.
const HELLO_FLAG_OBSERVED: u8 = 4;
/// A link made on demand (not configured) closes after this long unused.
const ON_DEMAND_IDLE: Duration = Duration::from_secs(120);
/// A link made to a looked-up record that is not up after this long is
/// given up (the record may be stale: the next lookup wants a newer one).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(6);
/// An on-demand link whose session is down and that heard nothing for this
/// long is dropped.
const GONE_AFTER: Duration = Duration::from_secs(30);
/// An on-demand link idle this long may be closed to make room for a new one.
const LRU_IDLE: Duration = Duration::from_secs(10);
/// LAN announcements acted on at most this often.
const LAN_INTERVAL: Duration = Duration::from_secs(1);
/// A neighbour's report of our endpoint counts this long.
const OBSERVED_FOR: Duration = Duration::from_secs(600);
/// How long a record judged stale is passed over.
const STALE_FOR: Duration = Duration::from_secs(60);
/// Packets waiting for an address lookup, per address.
const WANT_QUEUE: usize = 16;
/// Addresses being looked up at once (half the DHT's lookup slots, so
/// address lookups never starve its own upkeep).
const MAX_WANTED: usize = super::dht::MAX_LOOKUPS / 2;
/// A failed address lookup is not repeated for this long (its packets get
/// ICMPv6 address unreachable).
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);
/// Address lookups per second, on average, and in a burst: a program
/// scanning fc00::/8 must not turn into a flood of lookups.
const LOOKUP_RATE: f64 = 5.0;
const LOOKUP_BURST: f64 = 20.0;
/// Lifetime of our record; it is signed anew when half is left.
const RECORD_TTL: u64 = 24 * 3600;
/// Records are not re-signed more often than this.
const RESIGN_INTERVAL: Duration = Duration::from_secs(10);
/// The core's timer grid: [`Node::poll_timeout`] is this long after the last tick.
pub const TICK: Duration = Duration::from_millis(250);
/// How far ahead of the record sequence number in use the stored limit is
/// kept (seconds of re-signing, which follows the wall clock).
const SEQ_MARGIN: u64 = 3600;
/// DHT messages waiting for a link to come up, per link.
const MAX_PENDING_CTL: usize = 32;
/// Results of control-API lookups kept for collection.
const MAX_API_RESULTS: usize = 64;
/// Observed endpoints remembered.
const MAX_OBSERVED: usize = 16;
const HELLO_FLAG_ACK: u8 = 1;
/// Hello flag: "I don't know that you have my record: answer".
const HELLO_FLAG_REPLY: u8 = 2;

/// How often an unconfirmed hello is repeated.
const HELLO_INTERVAL: Duration = Duration::from_secs(1);
/// How often a configured peer without a session is retried.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(5);
/// Retry spacing for the first [`QUICK_RECONNECTS`] attempts.
const QUICK_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// How many quick retries before settling to [`RECONNECT_INTERVAL`].
const QUICK_RECONNECTS: u32 = 10;
/// Silence beyond the keepalive period after which a neighbour is re-handshaked.
const SILENCE_GRACE: Duration = Duration::from_secs(5);
/// A link from an unknown node that has not shown a valid record by then is dropped.
const UNVERIFIED_TIMEOUT: Duration = Duration::from_secs(30);
/// A link from an unconfigured node that has been silent this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Minimum spacing of ICMPv6 errors the node generates.
const ICMP_INTERVAL: Duration = Duration::from_millis(20);
/// Application packets held per link while its neighbour is being verified.
const MAX_PENDING: usize = 64;
/// Least time between two record verifications on one link (RSA work).
const VERIFY_INTERVAL: Duration = Duration::from_secs(1);
/// Links from unconfigured nodes whose record has not been verified yet.
const MAX_UNVERIFIED_LINKS: usize = 64;
/// Datagrams a source (IPv4 address or IPv6 /64) may send that no
/// established session from its known endpoint accounts for: handshake
/// initiations, packets for unknown sessions, garbage. A node needs one
/// initiation per link every two minutes; many nodes behind one NAT share
/// the budget.
pub const SOURCE_LIMIT: Limit = Limit {
    per_sec: 20,
    burst: 40,
};
/// Handshake initiations over [`SOURCE_LIMIT`] that prove with a cookie
/// (WireGuard's mac2) that their source receives at its address, and cookie
/// replies sent to sources over the limit, per source.
pub const PROVEN_LIMIT: Limit = Limit {
    per_sec: 10,
    burst: 10,
};
/// Sources tracked at once (a fixed table, ~160 KiB).
pub const SOURCE_SLOTS: usize = 4096;
/// Largest datagram handed to boringtun (its output buffer is larger).
const MAX_DATAGRAM: usize = MAX_PACKET + WG_OVERHEAD;

/// A peer named in the configuration.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Who and where.
    pub uri: PeerUri,
}

/// Where compression is switched off.
#[derive(Clone, Debug, Default)]
pub struct CompressionPolicy {
    /// Compression on at all.
    pub enabled: bool,
    /// Overlay prefixes (address, length) whose traffic is never compressed.
    pub off_prefixes: Vec<(Ipv6Addr, u8)>,
    /// Nodes whose links are never compressed.
    pub off_nodes: Vec<NodeId>,
}

impl CompressionPolicy {
    fn allows(&self, node: &NodeId) -> bool {
        if !self.enabled || self.off_nodes.contains(node) {
            return false;
        }
        let addr = u128::from(node.overlay_address());
        !self.off_prefixes.iter().any(|(p, len)| {
            let mask = if *len == 0 {
                0
            } else {
                u128::MAX << (128 - *len as u32)
            };
            addr & mask == u128::from(*p) & mask
        })
    }
}

/// Node settings that the protocol core needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Configured peers: linked at start, kept up, retried.
    pub peers: Vec<PeerConfig>,
    /// Compression policy.
    pub compression: CompressionPolicy,
    /// WireGuard persistent keepalive, seconds (0 = off).
    pub keepalive: u16,
    /// The TUN MTU: the largest packet a link carries before path MTU says less.
    pub mtu: usize,
    /// Most links at once (configured ones included).
    pub max_links: usize,
    /// Endpoints to publish in our record; empty = what neighbours observe.
    pub advertise: Vec<SocketAddr>,
    /// Role bits published in our record.
    pub roles: u8,
    /// The wall clock (unix seconds) at the `now` given to [`Node::new`].
    pub unix_time: u64,
    /// Which destinations go through circuits.
    pub routes: RoutePolicy,
    /// Relaying for others.
    pub relay: RelayConfig,
    /// Traffic shaping on circuits.
    pub traffic: TrafficConfig,
    /// Whether there is a TUN (a dedicated relay has none and ends no
    /// circuits).
    pub has_tun: bool,
    /// Seed of the core's CSPRNG (circuit keys, IDs, paths, noise).
    pub rng_seed: [u8; 32],
    /// Who may link to this node and use it as a relay.
    pub access: AccessConfig,
}

/// Why packets or datagrams were dropped. Every drop is counted somewhere here.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Drops {
    /// Datagram that is not a WireGuard message, or too large.
    pub malformed: u64,
    /// Datagram for a session index we don't have.
    pub unknown_session: u64,
    /// Handshake that failed to authenticate or was rate limited.
    pub handshake_rejected: u64,
    /// Data that failed to decrypt or authenticate.
    pub auth_failed: u64,
    /// Replayed data message.
    pub replay: u64,
    /// Decrypted packet that is not a valid IPv6 packet or frame.
    pub bad_inner: u64,
    /// Packet from a neighbour whose record we have not verified.
    pub unverified: u64,
    /// Inner source address is not the neighbour's address.
    pub spoofed_source: u64,
    /// Inner destination is not our address.
    pub wrong_destination: u64,
    /// Record rejected (bad signature, wrong key, wrong ID).
    pub bad_record: u64,
    /// Hello with a new record within a second of the last verification on
    /// its link: not checked (RSA work is budgeted); a later hello brings
    /// the record again.
    pub hello_limited: u64,
    /// Record no newer than the one another link to the same node proved
    /// already (that link stays).
    pub stale_record: u64,
    /// TUN packet to an address with no link.
    pub no_route: u64,
    /// TUN packet that is not IPv6 or not well formed.
    pub tun_malformed: u64,
    /// TUN packet larger than the link's path MTU (answered with Packet Too Big).
    pub too_big: u64,
    /// New link refused: too many links.
    pub link_limit: u64,
    /// Other send failures (no endpoint, encryption error).
    pub send_failed: u64,
    /// TUN packet to an unknown address refused: lookups rate-limited.
    pub lookup_limited: u64,
    /// TUN packet to an address whose lookup failed (answered with ICMPv6).
    pub unreachable: u64,
    /// Link refused or closed by the access lists (`[access]`).
    pub access_denied: u64,
    /// New link refused: its subnet holds `links_per_subnet` links already.
    pub subnet_limit: u64,
    /// Datagram from a source over its budget for unauthenticated work
    /// (handshake initiations, unknown sessions, garbage): dropped unread.
    pub rate_limited: u64,
}

/// Per-link counters.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LinkCounters {
    /// Application packets sent.
    pub tx_packets: u64,
    /// Application bytes sent, before compression.
    pub tx_bytes: u64,
    /// Bytes those packets took after compression (what was encrypted).
    pub tx_wire_bytes: u64,
    /// Application packets received.
    pub rx_packets: u64,
    /// Application bytes received, after decompression.
    pub rx_bytes: u64,
    /// Bytes those packets took on the link.
    pub rx_wire_bytes: u64,
    /// Packets sent compressed.
    pub tx_compressed: u64,
    /// Packets received compressed.
    pub rx_compressed: u64,
}

/// The state of a link, as reported.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// No WireGuard session yet (handshaking or waiting).
    Connecting,
    /// Session up, records not yet exchanged.
    Verifying,
    /// Session up and the neighbour's record verified: traffic flows.
    Up,
    /// Session expired; a configured peer is being retried.
    Down,
}

/// A neighbour's verified identity.
struct Verified {
    record: NodeRecord,
    record_bytes: Vec<u8>,
    address: Ipv6Addr,
    /// The record as the DHT knows it (None: the record has no expiry, as
    /// from an older node, so the DHT won't use it).
    contact: Option<Contact>,
}

struct Link {
    index: u32,
    tunn: Tunn,
    peer_key: [u8; 32],
    endpoint: Option<SocketAddr>,
    /// The node this link must turn out to be (configured peers and links
    /// made to a known record).
    configured: Option<NodeId>,
    /// Configured: kept up and retried, never closed for idleness.
    persistent: bool,
    /// How we came to know the neighbour.
    source: Source,
    /// Last application packet or DHT message either way.
    last_used: Instant,
    /// DHT messages waiting for the neighbour's record to verify.
    pending_ctl: VecDeque<(u8, Vec<u8>)>,
    verified: Option<Verified>,
    they_have_ours: bool,
    last_hello: Option<Instant>,
    last_reconnect: Option<Instant>,
    reconnect_attempts: u32,
    /// Application packets waiting for the neighbour's record to verify.
    pending: VecDeque<Vec<u8>>,
    last_verify: Option<Instant>,
    reassembler: Reassembler,
    session_up: bool,
    expired: bool,
    created: Instant,
    last_rx: Instant,
    /// When the neighbour last sent us an application packet over this
    /// link (a node that talks to us directly is answered directly).
    last_app_rx: Option<Instant>,
    mtu: usize,
    compress: bool,
    adaptive: Adaptive,
    counters: LinkCounters,
    drops: Drops,
}

impl Link {
    /// Opened by this node to a record it looked up (not configured, not
    /// inbound).
    fn opened_on_demand(&self) -> bool {
        self.configured.is_some() && !self.persistent
    }

    fn state(&self) -> LinkState {
        if self.expired {
            LinkState::Down
        } else if !self.session_up {
            LinkState::Connecting
        } else if self.verified.is_none() {
            LinkState::Verifying
        } else {
            LinkState::Up
        }
    }

    fn node_id(&self) -> Option<NodeId> {
        self.verified
            .as_ref()
            .map(|v| v.record.node_id())
            .or(self.configured)
    }
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    /// Where to.
    pub dst: SocketAddr,
    /// What.
    pub payload: Vec<u8>,
}

/// What to do with a packet read from the TUN.
#[derive(Debug)]
pub enum TunOutcome<'a> {
    /// Send this datagram.
    Send(SocketAddr, &'a [u8]),
    /// Write this packet back to the TUN (an ICMPv6 error for the sender).
    Reply(&'a [u8]),
    /// Nothing to send now (dropped and counted, or queued behind a handshake).
    Nothing,
}

/// A report on one link.
#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    /// The link's local index (as in logs).
    pub link: u32,
    /// Neighbour's node ID, when known.
    pub node_id: Option<String>,
    /// Neighbour's overlay address, when known.
    pub address: Option<Ipv6Addr>,
    /// State.
    pub state: LinkState,
    /// Whether it came from the configuration.
    pub configured: bool,
    /// Last known UDP endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last completed handshake.
    pub last_handshake_secs: Option<f64>,
    /// Largest packet the link carries now (path MTU).
    pub mtu: usize,
    /// Whether compression is allowed on this link.
    pub compression: bool,
    /// Wire bytes / application bytes sent (1.0 = no gain).
    pub tx_compression_ratio: f64,
    /// Wire bytes / application bytes received.
    pub rx_compression_ratio: f64,
    /// Counters.
    #[serde(flatten)]
    pub counters: LinkCounters,
    /// Drops on this link.
    pub drops: Drops,
}

/// A report on the node.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// Node ID.
    pub node_id: String,
    /// Overlay address.
    pub address: Ipv6Addr,
    /// Record sequence number in use.
    pub record_seq: u64,
    /// Endpoints published in our record.
    pub endpoints: Vec<SocketAddr>,
    /// DHT counters.
    pub dht: DhtStats,
    /// Routing-table entries.
    pub table_entries: usize,
    /// Drops not attributable to a link.
    pub drops: Drops,
    /// Circuits this node built.
    pub circuits: usize,
    /// Relay and circuit-end counters.
    pub relay: RelayStats,
    /// What the default route policy does now and why.
    pub routing: RoutingSummary,
    /// Links.
    pub links: Vec<LinkStatus>,
}

/// The node's scratch buffers, kept apart from the links so both can be
/// borrowed at once.
struct Buffers {
    a: Vec<u8>,
    b: Vec<u8>,
    ctl: Vec<u8>,
    /// A cell being built or forwarded.
    cell: Vec<u8>,
    /// A cell as it arrived.
    cell_in: Vec<u8>,
}

/// The protocol core of one node.
pub struct Node {
    /// Shared with the shell, which signs DHT values outside the node (RSA
    /// signing takes milliseconds; packets must not wait for it).
    identity: Arc<Identity>,
    record: NodeRecord,
    record_bytes: Vec<u8>,
    address: Ipv6Addr,
    config: NodeConfig,
    links: HashMap<u32, Link>,
    by_key: HashMap<[u8; 32], u32>,
    by_addr: HashMap<Ipv6Addr, u32>,
    next_index: u32,
    rate_limiter: RateLimiter,
    /// The limiter the links' `Tunn`s check handshakes with again: MACs
    /// only, never under load, since the two gates above decided that (and
    /// a cookie from either gate must not be asked for again).
    link_gate: Arc<RateLimiter>,
    /// Cookie check for sources over their handshake budget.
    cookie_gate: RateLimiter,
    transmits: VecDeque<Transmit>,
    drops: Drops,
    bufs: Buffers,
    last_icmp: Option<Instant>,
    /// The `now` of the last [`Node::handle_timeout`], or of [`Node::new`].
    last_timer: Instant,
    /// Highest record sequence number the shell has stored durably: no
    /// record with a higher one is signed (a crash must never let a restart
    /// reuse a number that was published).
    seq_limit: u64,
    /// Handshake initiations per source IP in the current second: boringtun's
    /// rate limiter is one global counter, so one noisy source could starve
    /// everyone else's handshakes without a per-source limit in front of it.
    /// Budgets of unauthenticated work per source.
    sources: SourceTable,
    /// The second budget, for sources proven by a cookie and cookie replies.
    proven: SourceTable,
    segmenter: Segmenter,
    fragment_id: u32,
    dht: Dht<RsaRecords>,
    ext: RecordExt,
    /// Our endpoint as neighbours see it: reporter → (its latest report, when).
    observed: HashMap<NodeId, (SocketAddr, Instant)>,
    last_resign: Option<Instant>,
    /// Addresses being looked up, with the packets waiting for them.
    wanted: HashMap<Ipv6Addr, Want>,
    /// Addresses whose lookup failed, and when.
    unreachable: HashMap<Ipv6Addr, Instant>,
    /// Lowest record sequence number worth connecting to, per address
    /// (set when a looked-up record led nowhere).
    stale: HashMap<Ipv6Addr, (u64, Instant)>,
    lookup_tokens: (f64, Instant),
    purposes: HashMap<u64, Purpose>,
    api_results: HashMap<u64, LookupDone>,
    /// Packets for the TUN produced outside a TUN read (ICMPv6 errors for
    /// failed lookups), drained with [`Node::poll_tun_write`].
    tun_out: VecDeque<Vec<u8>>,
    joined: bool,
    value_seq: u64,
    last_lan: Option<Instant>,
    rng: ChaCha20Rng,
    circ: circuits::Circuits,
}

/// Packets waiting for an address lookup.
struct Want {
    queue: VecDeque<Vec<u8>>,
    started: Instant,
}

/// Why a lookup was started.
#[derive(Clone, Copy, Debug)]
enum Purpose {
    /// Packets to this address wait for it.
    Address(Ipv6Addr),
    /// The control API wants the result.
    Api,
    /// Filling the relay pool.
    Pool,
    /// A circuit we carry asked (hop circuit, address).
    Circuit(u64, Ipv6Addr),
}

/// A routing-table entry as `qgate peers` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    /// Bucket (bits shared with our ID).
    pub bucket: usize,
    /// Node ID.
    pub node_id: NodeId,
    /// Overlay address.
    pub address: Ipv6Addr,
    /// Endpoints in its record.
    pub endpoints: Vec<SocketAddr>,
    /// Record sequence number.
    pub seq: u64,
    /// Record expiry, unix seconds.
    pub expires: u64,
    /// Role bits.
    pub roles: u8,
    /// Where the entry came from.
    pub source: Source,
    /// Seconds since it last talked to us (None: not in this run).
    pub last_seen_secs: Option<f64>,
    /// Failed requests in a row.
    pub fails: u8,
    /// Waiting in the bucket's replacement cache.
    pub replacement: bool,
    /// State of our link to it, if any.
    pub link: Option<LinkState>,
}

/// What `qgate peers` reports.
#[derive(Clone, Debug, Serialize)]
pub struct PeersReport {
    /// Our node ID.
    pub node_id: NodeId,
    /// Routing-table entries.
    pub entries: Vec<PeerView>,
    /// Non-empty buckets.
    pub buckets: usize,
    /// DHT counters.
    pub dht: DhtStats,
}

/// A peer-store row: node ID, record, source, last seen (unix seconds).
pub type StoredPeerRow = ([u8; 32], Vec<u8>, Source, u64);

/// A parsed lookup target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupTarget {
    /// A node ID.
    Id(NodeId),
    /// An overlay address.
    Address(Ipv6Addr),
}

fn ratio(wire: u64, app: u64) -> f64 {
    if app == 0 {
        1.0
    } else {
        wire as f64 / app as f64
    }
}

fn ipv6_underlay(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(_) => false,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_none(),
    }
}

impl Node {
    /// Creates a node. `record_seq` must be higher than any record this
    /// identity published before (the shell uses the wall clock and the
    /// last stored value) and at most the reserved limit (see
    /// [`Node::reserve_record_seq`]). All of the node's randomness (session
    /// indices, DHT, circuits, padding) comes from `config.rng_seed`, and all
    /// of its time from the `now`s it is given and `config.unix_time`: two
    /// nodes built alike and fed alike behave alike.
    pub fn new(identity: Identity, record_seq: u64, config: NodeConfig, now: Instant) -> Node {
        let mut rng = ChaCha20Rng::from_seed(config.rng_seed);
        let (rng_key, index_seed, dht_seed) = {
            use rand_chacha::rand_core::RngCore;
            (
                (rng.next_u64(), rng.next_u64()),
                rng.next_u32(),
                rng.next_u64(),
            )
        };
        let circ = circuits::Circuits::new(&mut rng, now);
        let ext = RecordExt {
            expires: Some(config.unix_time + RECORD_TTL),
            endpoints: config.advertise.clone(),
            roles: config.roles,
            onion_key: Some(circ.onion_public()),
        };
        let record = identity.sign_record_with(record_seq, &ext);
        let record_bytes = record.to_bytes();
        let address = identity.overlay_address();
        let public = x25519::PublicKey::from(identity.link_secret());
        let own = own_contact(&record, &record_bytes);
        let dht = Dht::new(own, RsaRecords::default(), now, config.unix_time, dht_seed);
        let mut node = Node {
            dht,
            ext,
            observed: HashMap::new(),
            last_resign: None,
            wanted: HashMap::new(),
            unreachable: HashMap::new(),
            stale: HashMap::new(),
            lookup_tokens: (LOOKUP_BURST, now),
            purposes: HashMap::new(),
            api_results: HashMap::new(),
            tun_out: VecDeque::new(),
            joined: false,
            value_seq: 0,
            last_lan: None,
            rng,
            circ,
            address,
            record,
            record_bytes,
            links: HashMap::new(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            next_index: index_seed & 0x00ff_ffff,
            rate_limiter: RateLimiter::new(&public, 64),
            link_gate: Arc::new(RateLimiter::new(&public, u64::MAX)),
            // A limit of 0 makes it demand a valid cookie of every packet.
            cookie_gate: RateLimiter::new(&public, 0),
            transmits: VecDeque::new(),
            drops: Drops::default(),
            bufs: Buffers {
                a: vec![0u8; 2 * MAX_PACKET + 1024],
                b: vec![0u8; 2 * MAX_PACKET + 1024],
                ctl: Vec::with_capacity(2048),
                cell: vec![0u8; onion_cell_max()],
                cell_in: vec![0u8; onion_cell_max()],
            },
            last_icmp: None,
            last_timer: now,
            seq_limit: record_seq,
            sources: SourceTable::new(SOURCE_SLOTS, (rng_key.0, rng_key.1)),
            proven: SourceTable::new(SOURCE_SLOTS, (rng_key.1, rng_key.0)),
            segmenter: Segmenter::new(index_seed),
            fragment_id: index_seed,
            identity: Arc::new(identity),
            config,
        };
        let peers = node.config.peers.clone();
        for p in peers {
            if p.uri.node_id == node.identity.node_id() {
                continue;
            }
            if let Some(idx) =
                node.add_link(p.uri.link_key, p.uri.endpoint, Some(p.uri.node_id), now)
            {
                if let Some(l) = node.links.get_mut(&idx) {
                    l.persistent = true;
                    l.source = Source::Config;
                }
                // A configured peer's address is known before it is verified,
                // so packets to it can wait in the tunnel's handshake queue.
                node.by_addr.insert(p.uri.node_id.overlay_address(), idx);
                node.send_hello(idx, now);
            }
        }
        node
    }

    /// This node's overlay address.
    pub fn address(&self) -> Ipv6Addr {
        self.address
    }

    /// This node's ID.
    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// The record this node presents to its neighbours.
    pub fn record(&self) -> &NodeRecord {
        &self.record
    }

    fn add_link(
        &mut self,
        peer_key: [u8; 32],
        endpoint: Option<SocketAddr>,
        configured: Option<NodeId>,
        now: Instant,
    ) -> Option<u32> {
        if let Some(idx) = self.by_key.get(&peer_key) {
            return Some(*idx);
        }
        {
            // Links to or from nodes not yet verified are cheap to make:
            // keep them few, and let a new one push out the oldest.
            let oldest = self
                .links
                .values()
                .filter(|l| !l.persistent && l.verified.is_none())
                .map(|l| (l.created, l.index));
            let count = oldest.clone().count();
            if count >= MAX_UNVERIFIED_LINKS {
                if let Some((_, i)) = oldest.min() {
                    self.drops.link_limit += 1;
                    self.remove_link_quietly(i);
                }
            }
        }
        if self.links.len() >= self.config.max_links {
            // Full: the on-demand link unused longest makes room, if it has
            // been idle a while; else the new one is refused.
            let lru = self
                .links
                .values()
                .filter(|l| !l.persistent && now.saturating_duration_since(l.last_used) > LRU_IDLE)
                .min_by_key(|l| l.last_used)
                .map(|l| l.index);
            self.drops.link_limit += 1;
            match lru {
                Some(i) => self.remove_link(i),
                None => return None,
            }
        }
        let mut index = self.next_index;
        while self.links.contains_key(&index) {
            index = (index + 1) & 0x00ff_ffff;
        }
        self.next_index = (index + 1) & 0x00ff_ffff;
        let keepalive = (self.config.keepalive > 0).then_some(self.config.keepalive);
        let tunn = Tunn::new(
            self.identity.link_secret().clone(),
            x25519::PublicKey::from(peer_key),
            None,
            keepalive,
            index,
            Some(self.link_gate.clone()),
        );
        let compress = configured
            .map(|id| self.config.compression.allows(&id))
            .unwrap_or(self.config.compression.enabled);
        self.links.insert(
            index,
            Link {
                index,
                tunn,
                peer_key,
                endpoint,
                configured,
                persistent: false,
                source: Source::Network,
                last_used: now,
                pending_ctl: VecDeque::new(),
                verified: None,
                they_have_ours: false,
                last_hello: None,
                last_reconnect: None,
                reconnect_attempts: 0,
                pending: VecDeque::new(),
                last_verify: None,
                reassembler: Reassembler::default(),
                session_up: false,
                expired: false,
                created: now,
                last_rx: now,
                last_app_rx: None,
                mtu: self.config.mtu,
                compress,
                adaptive: Adaptive::default(),
                counters: LinkCounters::default(),
                drops: Drops::default(),
            },
        );
        self.by_key.insert(peer_key, index);
        Some(index)
    }

    fn remove_link_quietly(&mut self, index: u32) {
        if let Some(link) = self.links.remove(&index) {
            self.by_key.remove(&link.peer_key);
            self.by_addr.retain(|_, i| *i != index);
            let now = link.last_rx.max(link.last_used);
            self.circuits_link_gone(now, index);
        }
    }

    fn remove_link(&mut self, index: u32) {
        if let Some(link) = self.links.remove(&index) {
            self.by_key.remove(&link.peer_key);
            self.by_addr.retain(|_, i| *i != index);
            tracing::info!(link = index, node = ?link.node_id(), "link removed");
            let now = link.last_rx.max(link.last_used);
            self.circuits_link_gone(now, index);
        }
    }

    /// Next queued control datagram (handshakes, hellos, cookie replies).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Node::handle_timeout`] wants to run next: [`TICK`] after the
    /// last run. The work it does (WireGuard's session timers, hellos,
    /// lookups' deadlines, circuit probes, the DHT's upkeep) is all due on
    /// that grid; the shell sleeps until this instant.
    pub fn poll_timeout(&self) -> Instant {
        self.last_timer + TICK
    }

    /// The record sequence number the shell should store durably before the
    /// node may sign further records, when the stored limit runs short
    /// (within an hour of the wall clock, which re-signing follows). Store
    /// it (off the data path), then call [`Node::reserve_record_seq`].
    pub fn record_seq_wanted(&self, now: Instant) -> Option<u64> {
        let next = self.record.seq.saturating_add(1).max(self.dht.unix(now));
        (next.saturating_add(SEQ_MARGIN / 2) > self.seq_limit)
            .then(|| next.saturating_add(SEQ_MARGIN))
    }

    /// Tells the node that record sequence numbers up to `limit` are stored
    /// durably and may be used.
    pub fn reserve_record_seq(&mut self, limit: u64) {
        self.seq_limit = self.seq_limit.max(limit);
    }

    /// Tells the node the kernel's path MTU towards an endpoint.
    pub fn set_path_mtu(&mut self, endpoint: SocketAddr, underlay_mtu: usize) {
        let inner = link_mtu(underlay_mtu, ipv6_underlay(&endpoint));
        for link in self.links.values_mut() {
            if link.endpoint == Some(endpoint) {
                let mtu = inner.min(self.config.mtu);
                if mtu != link.mtu {
                    tracing::info!(%endpoint, underlay_mtu, link_mtu = mtu, "path MTU changed");
                    link.mtu = mtu;
                }
            }
        }
    }

    /// Handles one packet read from the TUN.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) -> TunOutcome<'_> {
        let Ok(view) = Ipv6View::new_checked(packet) else {
            self.drops.tun_malformed += 1;
            return TunOutcome::Nothing;
        };
        let dst = view.dst();
        // A node that talks to us over a circuit hears back on it.
        if let Some(h) = self.inbound_route(now, &dst) {
            return self.inbound_send(now, view, h);
        }
        if is_overlay_address(&dst) && dst != self.address {
            match self.config.routes.for_addr(&dst) {
                Policy::Hops(min, max) => return self.circuit_send(now, view, min, max),
                Policy::Prefer(min, max) if self.relays_for(now, dst, min, max) => {
                    return self.circuit_send(now, view, min, max)
                }
                Policy::Prefer(..) | Policy::Direct => {}
            }
        }
        let Some(link) = self.by_addr.get(&dst).and_then(|i| self.links.get_mut(i)) else {
            return self.tun_miss(now, view);
        };
        link.last_used = now;
        if packet.len() > link.mtu {
            if link.mtu < IPV6_MIN_MTU && packet.len() <= IPV6_MIN_MTU && link.verified.is_some() {
                // Programs never send less than 1280, so below that the node
                // fragments for them (the receiving kernel reassembles).
                self.fragment_id = self.fragment_id.wrapping_add(1);
                let (id, mtu) = (self.fragment_id, link.mtu);
                let mut frags = Vec::new();
                if wire::fragment(view, mtu, id, |f| frags.push(f.to_vec())) {
                    for f in frags {
                        if let TunOutcome::Send(dst, d) = self.handle_tun_packet(now, &f) {
                            let payload = d.to_vec();
                            self.transmits.push_back(Transmit { dst, payload });
                        }
                    }
                    return TunOutcome::Nothing;
                }
                let link = self.by_addr.get(&dst).and_then(|i| self.links.get_mut(i));
                if let Some(l) = link {
                    l.drops.too_big += 1;
                }
                return TunOutcome::Nothing;
            }
            link.drops.too_big += 1;
            let mtu = link.mtu.max(IPV6_MIN_MTU) as u32;
            return self.icmp_reply(now, view, wire::ICMPV6_PACKET_TOO_BIG, 0, mtu);
        }
        if link.verified.is_none() {
            // Not before the neighbour proved who it is: a configured URI
            // names a node ID, but only its signed record proves that the
            // link key belongs to that node.
            if link.pending.len() >= MAX_PENDING {
                link.pending.pop_front();
                link.drops.send_failed += 1;
            }
            link.pending.push_back(packet.to_vec());
            return TunOutcome::Nothing;
        }
        let Some(endpoint) = link.endpoint else {
            link.drops.send_failed += 1;
            return TunOutcome::Nothing;
        };
        let (frame, compressed) = {
            let slot = if link.compress {
                link.adaptive.should_try(&view)
            } else {
                None
            };
            match wire::encode_app(view, slot.is_some(), &mut self.bufs.b) {
                Encoded::AsIs => {
                    if let Some(s) = slot {
                        link.adaptive.report(s, false);
                    }
                    (view.bytes(), false)
                }
                Encoded::Compressed(n) => {
                    if let Some(s) = slot {
                        link.adaptive.report(s, true);
                    }
                    (&self.bufs.b[..n], true)
                }
                Encoded::Wrapped(n) => (&self.bufs.b[..n], false),
            }
        };
        link.counters.tx_packets += 1;
        link.counters.tx_bytes += packet.len() as u64;
        link.counters.tx_wire_bytes += frame.len() as u64;
        link.counters.tx_compressed += compressed as u64;
        match link.tunn.encapsulate(frame, &mut self.bufs.a) {
            TunnResult::WriteToNetwork(out) => TunOutcome::Send(endpoint, out),
            TunnResult::Done => TunOutcome::Nothing,
            _ => {
                link.drops.send_failed += 1;
                TunOutcome::Nothing
            }
        }
    }

    fn icmp_reply(
        &mut self,
        now: Instant,
        view: Ipv6View<'_>,
        ty: u8,
        code: u8,
        param: u32,
    ) -> TunOutcome<'_> {
        if let Some(t) = self.last_icmp {
            if now.saturating_duration_since(t) < ICMP_INTERVAL {
                return TunOutcome::Nothing;
            }
        }
        match wire::icmpv6_error(view, ty, code, param, &mut self.bufs.b) {
            Some(n) => {
                self.last_icmp = Some(now);
                TunOutcome::Reply(&self.bufs.b[..n])
            }
            None => TunOutcome::Nothing,
        }
    }

    /// Handles one datagram from the UDP socket. Returns a packet to write
    /// to the TUN, if the datagram carried one. Queued replies (handshake
    /// responses, hellos) are drained with [`Node::poll_transmit`].
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Option<&[u8]> {
        // boringtun panics if its output buffer is shorter than the
        // datagram: ours holds MAX_DATAGRAM, so refuse anything larger.
        if datagram.len() > MAX_DATAGRAM {
            self.drops.malformed += 1;
            return None;
        }
        let from = normalize(from);
        let index = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => {
                // Garbage costs its source budget too, so a source that
                // sends it is throttled in everything it sends.
                if self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
                    self.drops.malformed += 1;
                } else {
                    self.drops.rate_limited += 1;
                }
                return None;
            }
            Ok(Packet::HandshakeInit(init)) => {
                self.rate_limiter_check_and_index(now, from, datagram, &init)?
            }
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketData(p)) => p.receiver_idx >> 8,
        };
        let Some(link) = self.links.get_mut(&index) else {
            if self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
                self.drops.unknown_session += 1;
            } else {
                self.drops.rate_limited += 1;
            }
            return None;
        };
        // Session traffic from where the neighbour is known to be costs no
        // budget (so established links keep working through a flood); from
        // anywhere else it is unauthenticated work like a handshake. (An
        // initiation was charged in `rate_limiter_check_and_index`, and its
        // link's endpoint is where it came from.)
        if link.endpoint != Some(from) && !self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
            self.drops.rate_limited += 1;
            return None;
        }
        let link = self.links.get_mut(&index)?;
        // A link created for this very handshake (see
        // `rate_limiter_check_and_index`) is kept only if the handshake holds.
        let fresh = link.configured.is_none() && link.verified.is_none() && !link.session_up;
        let mut res = link
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.bufs.a);
        let mut authenticated = false;
        let mut inner_len = None;
        loop {
            match res {
                TunnResult::Done => {
                    authenticated = true;
                    break;
                }
                TunnResult::WriteToNetwork(out) if is_cookie_reply(out) => {
                    // Under load boringtun answers an unauthenticated
                    // handshake with a cookie: that proves nothing about the
                    // sender, so the link is left as it is.
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: out.to_vec(),
                    });
                    break;
                }
                TunnResult::WriteToNetwork(out) => {
                    authenticated = true;
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: out.to_vec(),
                    });
                    // Flush packets that waited for this handshake.
                    res = link.tunn.decapsulate(None, &[], &mut self.bufs.a);
                }
                TunnResult::WriteToTunnelV6(p, _) => {
                    authenticated = true;
                    inner_len = Some(p.len());
                    break;
                }
                TunnResult::WriteToTunnelV4(..) => {
                    authenticated = true;
                    link.drops.bad_inner += 1;
                    break;
                }
                TunnResult::Err(e) => {
                    match e {
                        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
                            link.drops.replay += 1
                        }
                        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
                            link.drops.unknown_session += 1
                        }
                        WireGuardError::InvalidMac
                        | WireGuardError::WrongKey
                        | WireGuardError::InvalidTai64nTimestamp
                        | WireGuardError::WrongTai64nTimestamp
                        | WireGuardError::UnderLoad
                        | WireGuardError::UnexpectedPacket => link.drops.handshake_rejected += 1,
                        _ => link.drops.auth_failed += 1,
                    }
                    break;
                }
            }
        }
        if !authenticated {
            if fresh && link.tunn.time_since_last_handshake().is_none() {
                self.remove_link_quietly(index);
            }
            return None;
        }
        let was_up = link.session_up;
        link.session_up = link.tunn.time_since_last_handshake().is_some();
        link.expired = false;
        link.last_rx = now;
        if link.endpoint != Some(from) {
            if link.endpoint.is_some() {
                tracing::info!(link = index, old = ?link.endpoint, new = %from, "neighbour moved to a new endpoint");
            }
            link.endpoint = Some(from);
            link.mtu = self.config.mtu;
        }
        if !was_up && link.session_up {
            link.reconnect_attempts = 0;
            // No hello here: a responder can't send before the initiator's
            // first data message, and the initiator's queued hello is that
            // message. A restarted neighbour says so with an un-acked hello.
            // A link this node opened on demand carries its own traffic:
            // its far end is a destination, named at debug only (README,
            // *Logs*); configured and inbound links are logged at info.
            if link.opened_on_demand() {
                tracing::debug!(link = index, endpoint = %from, node = ?link.node_id(), "link session established");
            } else {
                tracing::info!(link = index, endpoint = %from, node = ?link.node_id(), "link session established");
            }
        }
        let n = inner_len?;
        self.handle_inner(now, index, n)
    }

    /// Fuzzing and test hook (feature `test-hooks`): handles `packet` as if it had arrived,
    /// decrypted, on the link to the holder of link key `peer_key` (made if
    /// there is none, as for a handshake from `from`). Returns the length of
    /// a packet for the TUN, as [`Node::handle_datagram`] would.
    #[doc(hidden)]
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn inject_inner(
        &mut self,
        now: Instant,
        peer_key: [u8; 32],
        from: SocketAddr,
        packet: &[u8],
    ) -> Option<usize> {
        let index = self.add_link(peer_key, Some(from), None, now)?;
        if let Some(l) = self.links.get_mut(&index) {
            l.session_up = true;
        }
        let n = packet.len().min(self.bufs.a.len());
        self.bufs.a[..n].copy_from_slice(&packet[..n]);
        self.handle_inner(now, index, n).map(<[u8]>::len)
    }

    /// Whether `ip`'s subnet (IPv4 /24, IPv6 /48) holds its share of links.
    fn subnet_full(&self, ip: IpAddr) -> bool {
        let limit = self.config.access.links_per_subnet;
        if limit == 0 {
            return false;
        }
        let net = link_subnet(ip);
        self.links
            .values()
            .filter(|l| l.endpoint.is_some_and(|e| link_subnet(e.ip()) == net))
            .count()
            >= limit
    }

    /// Checks a handshake initiation's MAC and load, finds who sent it, and
    /// returns the link index (creating a link for an unknown node).
    fn rate_limiter_check_and_index(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        init: &boringtun::noise::HandshakeInit<'_>,
    ) -> Option<u32> {
        // Cheap checks first, in order of cost: the source's budget (a
        // table lookup), boringtun's MAC and global load check (a hash,
        // which also throws out random bytes), and only then the
        // Diffie-Hellman work.
        if !self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
            // Over budget. A source that proves with a cookie (WireGuard's
            // mac2) that it receives at its address gets a second, smaller
            // budget: else anyone who forges a neighbour's address could
            // lock that neighbour out. Cookie replies come out of that
            // budget too, so a flood gets few answers.
            let mut cookie = [0u8; 64];
            match self
                .cookie_gate
                .verify_packet(Some(from.ip()), datagram, &mut cookie)
            {
                Ok(_) if self.proven.allow(now, from.ip(), PROVEN_LIMIT) => {}
                Err(TunnResult::WriteToNetwork(c))
                    if self.proven.allow(now, from.ip(), PROVEN_LIMIT) =>
                {
                    self.drops.rate_limited += 1;
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: c.to_vec(),
                    });
                    return None;
                }
                _ => {
                    self.drops.rate_limited += 1;
                    return None;
                }
            }
        } else if !pass_gate(
            &self.rate_limiter,
            from,
            datagram,
            &mut self.transmits,
            &mut self.drops,
        ) {
            return None;
        }
        // A denied network costs no Diffie-Hellman work.
        if !self.config.access.link.admits_addr(from.ip()) {
            self.drops.access_denied += 1;
            return None;
        }
        let public = x25519::PublicKey::from(self.identity.link_secret());
        let half = match parse_handshake_anon(self.identity.link_secret(), &public, init) {
            Ok(h) => h,
            Err(_) => {
                self.drops.handshake_rejected += 1;
                return None;
            }
        };
        if !self.by_key.contains_key(&half.peer_static_public) && self.subnet_full(from.ip()) {
            self.drops.subnet_limit += 1;
            return None;
        }
        let idx = self.add_link(half.peer_static_public, Some(from), None, now);
        if let Some(i) = idx {
            if self.links[&i].configured.is_none() && self.links[&i].verified.is_none() {
                tracing::debug!(link = i, %from, "handshake from an unknown node");
            }
        }
        idx
    }

    fn handle_inner(&mut self, now: Instant, index: u32, n: usize) -> Option<&[u8]> {
        if let Ok(view) = Ipv6View::new_checked(&self.bufs.a[..n]) {
            if let Some((MSG_CELL, body)) = wire::control_of(view) {
                // Cells are fixed-size and never segmented: the hot path,
                // copied once into the cell buffer and handled in place.
                let len = body.len().min(self.bufs.cell_in.len());
                self.bufs.cell_in[..len].copy_from_slice(&body[..len]);
                if body.len() != len {
                    self.circ_bad_size();
                    return None;
                }
                let link = self.links.get_mut(&index)?;
                link.last_used = now;
                return self.handle_cell(now, index, len).map(|p| &self.bufs.b[..p]);
            }
        }
        let control = match Ipv6View::new_checked(&self.bufs.a[..n]) {
            Ok(view) => wire::control_of(view).map(|(ty, body)| (view.src(), ty, body.to_vec())),
            Err(_) => {
                self.links.get_mut(&index)?.drops.bad_inner += 1;
                return None;
            }
        };
        if let Some((src, ty, body)) = control {
            self.handle_control(now, index, src, ty, &body);
            return None;
        }
        let view = Ipv6View::new_checked(&self.bufs.a[..n]).ok()?;
        let link = self.links.get_mut(&index)?;
        let (incoming, compressed) = match wire::decode(view, &mut self.bufs.b) {
            Ok(x) => x,
            Err(_) => {
                link.drops.bad_inner += 1;
                return None;
            }
        };
        match incoming {
            Incoming::Control(..) => None,
            Incoming::App(p) => {
                let Some(v) = &link.verified else {
                    link.drops.unverified += 1;
                    return None;
                };
                if view.src() != v.address {
                    link.drops.spoofed_source += 1;
                    return None;
                }
                if view.dst() != self.address {
                    link.drops.wrong_destination += 1;
                    return None;
                }
                link.last_used = now;
                link.last_app_rx = Some(now);
                link.counters.rx_packets += 1;
                link.counters.rx_bytes += p.len() as u64;
                link.counters.rx_wire_bytes += n as u64;
                link.counters.rx_compressed += compressed as u64;
                Some(p)
            }
        }
    }

    fn handle_control(&mut self, now: Instant, index: u32, src: Ipv6Addr, ty: u8, body: &[u8]) {
        if ty == message::MSG_SEGMENT {
            let Some(link) = self.links.get_mut(&index) else {
                return;
            };
            match link.reassembler.push(now, body) {
                // The inner type is never a segment (parse_segment refuses
                // that), so this recursion is one level deep.
                Ok(Some((inner, whole))) => self.handle_control(now, index, src, inner, &whole),
                Ok(None) => {}
                Err(_) => link.drops.bad_inner += 1,
            }
            return;
        }
        if ty == MSG_DHT {
            let Some(link) = self.links.get_mut(&index) else {
                return;
            };
            let Some(c) = link.verified.as_ref().and_then(|v| v.contact.clone()) else {
                link.drops.unverified += 1;
                return;
            };
            link.last_used = now;
            self.dht.handle_message(now, &c, body);
            self.pump_dht(now);
            return;
        }
        if ty != MSG_HELLO || body.is_empty() {
            if let Some(l) = self.links.get_mut(&index) {
                l.drops.bad_inner += 1;
            }
            return;
        }
        let ack = body[0] & HELLO_FLAG_ACK != 0;
        let (observed, rec_bytes) = if body[0] & HELLO_FLAG_OBSERVED != 0 {
            match parse_endpoint(&body[1..]) {
                Some((ep, rest)) => (Some(ep), rest),
                None => {
                    if let Some(l) = self.links.get_mut(&index) {
                        l.drops.bad_inner += 1;
                    }
                    return;
                }
            }
        } else {
            (None, &body[1..])
        };
        let link = match self.links.get_mut(&index) {
            Some(l) => l,
            None => return,
        };
        let known = link
            .verified
            .as_ref()
            .is_some_and(|v| v.record_bytes == rec_bytes);
        if !known {
            // A verification costs RSA work: at most one per second per link.
            if link
                .last_verify
                .is_some_and(|t| now.saturating_duration_since(t) < VERIFY_INTERVAL)
            {
                link.drops.hello_limited += 1;
                return;
            }
            link.last_verify = Some(now);
            match self.verify_hello(index, src, rec_bytes) {
                Ok(v) => {
                    let addr = v.address;
                    let id = v.record.node_id();
                    let ip = self
                        .links
                        .get(&index)
                        .and_then(|l| l.endpoint)
                        .map(|e| e.ip());
                    if !self.config.access.link.admits(ip, &id) {
                        tracing::debug!(link = index, node = %id.short(), "link closed: denied by [access]");
                        self.drops.access_denied += 1;
                        self.remove_link(index);
                        return;
                    }
                    // Another link already speaking for this address: the
                    // newer record wins (a node may have replaced its link key).
                    if let Some(&other) = self.by_addr.get(&addr) {
                        if other != index {
                            let other_seq = self
                                .links
                                .get(&other)
                                .and_then(|l| l.verified.as_ref())
                                .map(|v| v.record.seq);
                            match other_seq {
                                Some(s) if s >= v.record.seq => {
                                    if let Some(l) = self.links.get_mut(&index) {
                                        l.drops.stale_record += 1;
                                    }
                                    return;
                                }
                                _ => {
                                    let configured =
                                        self.links.get(&other).and_then(|l| l.configured);
                                    self.remove_link(other);
                                    if let Some(l) = self.links.get_mut(&index) {
                                        l.configured = l.configured.or(configured);
                                    }
                                }
                            }
                        }
                    }
                    let compress = self.config.compression.allows(&id);
                    let mut v = v;
                    v.contact = self.dht.contact_from(now, rec_bytes).ok();
                    let contact = v.contact.clone();
                    let Some(link) = self.links.get_mut(&index) else {
                        return;
                    };
                    let first = link.verified.is_none();
                    link.verified = Some(v);
                    link.compress = compress;
                    let source = link.source;
                    let on_demand = link.opened_on_demand();
                    self.by_addr.insert(addr, index);
                    self.stale.remove(&addr);
                    if let Some(c) = contact {
                        // A node that proved its record over a live link
                        // is the best kind of routing-table entry.
                        self.dht.heard_from(now, c, source);
                    }
                    if first {
                        if on_demand {
                            tracing::debug!(link = index, node = %id.short(), %addr, "neighbour verified");
                        } else {
                            tracing::info!(link = index, node = %id.short(), %addr, "neighbour verified");
                        }
                        self.flush_pending(now, index);
                    }
                }
                Err(why) => {
                    tracing::warn!(link = index, "rejected neighbour record: {why}");
                    if let Some(l) = self.links.get_mut(&index) {
                        l.drops.bad_record += 1;
                    }
                    return;
                }
            }
        }
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        link.they_have_ours = ack;
        if let (Some(ep), Some(v)) = (observed, &link.verified) {
            let reporter = v.record.node_id();
            self.note_observed(now, ep, reporter);
        }
        if body[0] & HELLO_FLAG_REPLY != 0 {
            self.send_hello(index, now);
        }
    }

    fn verify_hello(
        &self,
        index: u32,
        src: Ipv6Addr,
        rec_bytes: &[u8],
    ) -> Result<Verified, String> {
        let link = &self.links[&index];
        let record = NodeRecord::parse_verified(rec_bytes).map_err(|e| e.to_string())?;
        // The record must name the very key the tunnel authenticated, or
        // anyone could replay someone else's public record.
        if record.link_key != link.peer_key {
            return Err("record's link key is not the key this link authenticated".into());
        }
        if let Some(id) = link.configured {
            if record.node_id() != id {
                return Err(format!(
                    "record is for node {}, configured {}",
                    record.node_id().short(),
                    id.short()
                ));
            }
        }
        if record.overlay_address() != src {
            return Err("hello sent from an address that is not the record's".into());
        }
        if record.node_id() == self.identity.node_id() {
            return Err("record is our own".into());
        }
        if let Some(v) = &link.verified {
            if record.node_id() != v.record.node_id() {
                return Err("link already speaks for another node".into());
            }
            if record.seq < v.record.seq {
                return Err("record is older than the one we hold".into());
            }
        }
        Ok(Verified {
            address: record.overlay_address(),
            record,
            record_bytes: rec_bytes.to_vec(),
            contact: None,
        })
    }

    fn send_hello(&mut self, index: u32, now: Instant) {
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        let mut body = Vec::with_capacity(20 + self.record_bytes.len());
        let mut flags = 0;
        if link.verified.is_some() {
            flags |= HELLO_FLAG_ACK;
        }
        if !link.they_have_ours {
            flags |= HELLO_FLAG_REPLY;
        }
        if link.endpoint.is_some() {
            flags |= HELLO_FLAG_OBSERVED;
        }
        body.push(flags);
        if let Some(ep) = link.endpoint {
            // Where we see the neighbour: how a node with no configured
            // endpoint learns what to publish in its record.
            put_endpoint(&mut body, ep);
        }
        body.extend_from_slice(&self.record_bytes);
        link.last_hello = Some(now);
        self.send_control(index, MSG_HELLO, &body, false);
    }

    /// Sends a control message to a neighbour: in one frame when it fits a
    /// segment, else (or when `segmented`) through the message layer.
    fn send_control(&mut self, index: u32, ty: u8, body: &[u8], segmented: bool) {
        let Some(link) = self.links.get(&index) else {
            return;
        };
        let dst = link
            .verified
            .as_ref()
            .map(|v| v.address)
            .or(link.configured.map(|id| id.overlay_address()))
            .unwrap_or(Ipv6Addr::UNSPECIFIED);
        let frames: Vec<(u8, Vec<u8>)> = if !segmented && body.len() <= message::SEGMENT_PAYLOAD {
            vec![(ty, body.to_vec())]
        } else {
            match self.segmenter.segment(ty, body) {
                Ok(segs) => segs
                    .into_iter()
                    .map(|s| (message::MSG_SEGMENT, s))
                    .collect(),
                Err(e) => {
                    tracing::warn!(link = index, "control message not sent: {e}");
                    return;
                }
            }
        };
        for (t, b) in frames {
            let n = wire::encode_control(self.address, dst, t, &b, &mut self.bufs.ctl);
            let Some(link) = self.links.get_mut(&index) else {
                return;
            };
            if let TunnResult::WriteToNetwork(out) =
                link.tunn.encapsulate(&self.bufs.ctl[..n], &mut self.bufs.a)
            {
                if let Some(ep) = link.endpoint {
                    self.transmits.push_back(Transmit {
                        dst: ep,
                        payload: out.to_vec(),
                    });
                }
            }
        }
    }

    /// Runs timers: WireGuard's (rekey, keepalive, retries), hello repeats,
    /// reconnects of configured peers, pruning of idle unknown links.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_timer = now;
        self.rate_limiter.reset_count();
        let indices: Vec<u32> = self.links.keys().copied().collect();
        let mut remove = Vec::new();
        for index in indices {
            let Some(link) = self.links.get_mut(&index) else {
                continue;
            };
            // update_timers emits at most one datagram per call.
            match link.tunn.update_timers(&mut self.bufs.a) {
                TunnResult::WriteToNetwork(out) => {
                    if let Some(ep) = link.endpoint {
                        self.transmits.push_back(Transmit {
                            dst: ep,
                            payload: out.to_vec(),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    if !link.expired {
                        tracing::info!(link = index, node = ?link.node_id(), "link session expired");
                    }
                    link.expired = true;
                    link.session_up = false;
                }
                _ => {}
            }
            link.reassembler.expire(now);
            let up = link.tunn.time_since_last_handshake().is_some() && !link.expired;
            if link.session_up && !up {
                link.session_up = false;
            }
            // A neighbour that restarted has forgotten our session and
            // silently drops what we send; WireGuard alone notices only when
            // data (not keepalives) goes unanswered, or at the next rekey two
            // minutes on. Keepalives make silence a signal: nothing heard for
            // a keepalive period plus grace means a new handshake.
            let silence = Duration::from_secs(self.config.keepalive as u64) + SILENCE_GRACE;
            if self.config.keepalive > 0
                && link.session_up
                && now.saturating_duration_since(link.last_rx) > silence
                && link
                    .last_reconnect
                    .is_none_or(|t| now.saturating_duration_since(t) >= silence)
            {
                if let Some(ep) = link.endpoint {
                    link.last_reconnect = Some(now);
                    tracing::debug!(link = index, "neighbour silent, handshaking again");
                    initiate(
                        &mut link.tunn,
                        ep,
                        false,
                        &mut self.bufs.a,
                        &mut self.transmits,
                    );
                }
            }
            if link.persistent && !link.session_up {
                // Quick retries first (a peer started a moment after us),
                // then WireGuard's own pace.
                let interval = if link.reconnect_attempts < QUICK_RECONNECTS {
                    QUICK_RECONNECT_INTERVAL
                } else {
                    RECONNECT_INTERVAL
                };
                let due = link
                    .last_reconnect
                    .is_some_and(|t| now.saturating_duration_since(t) >= interval);
                if link.last_reconnect.is_none() {
                    // The first initiation went out with the first hello.
                    link.last_reconnect = Some(now);
                }
                if let (true, Some(ep)) = (due, link.endpoint) {
                    link.last_reconnect = Some(now);
                    link.reconnect_attempts = link.reconnect_attempts.saturating_add(1);
                    initiate(
                        &mut link.tunn,
                        ep,
                        true,
                        &mut self.bufs.a,
                        &mut self.transmits,
                    );
                }
            }
            let hello_due = link.session_up
                && (link.verified.is_none() || !link.they_have_ours)
                && link
                    .last_hello
                    .is_none_or(|t| now.saturating_duration_since(t) >= HELLO_INTERVAL);
            if !link.persistent {
                let age = now.saturating_duration_since(link.created);
                let idle = now.saturating_duration_since(link.last_rx);
                let unused = now.saturating_duration_since(link.last_used);
                // A link we made to a looked-up record that never came up:
                // the record may be stale, so the next lookup wants a newer one.
                let failed_connect =
                    link.configured.is_some() && link.verified.is_none() && age > CONNECT_TIMEOUT;
                if failed_connect {
                    if let Some(id) = link.configured {
                        let seq = self.dht.find_local(&id.0).map(|c| c.info.seq).unwrap_or(0);
                        self.stale
                            .insert(id.overlay_address(), (seq.saturating_add(1), now));
                    }
                }
                // A neighbour gone quiet for good (it died, or came back
                // elsewhere): drop the link, so the next packet looks the
                // node up afresh rather than knocking at an old endpoint.
                let gone =
                    link.verified.is_some() && self.config.keepalive > 0 && idle > GONE_AFTER;
                if gone {
                    if let Some(v) = &link.verified {
                        self.stale
                            .insert(v.address, (v.record.seq.saturating_add(1), now));
                    }
                }
                if failed_connect
                    || gone
                    || (link.verified.is_none() && age > UNVERIFIED_TIMEOUT)
                    || idle > IDLE_TIMEOUT
                    || unused > ON_DEMAND_IDLE
                {
                    remove.push(index);
                    continue;
                }
            }
            if hello_due {
                self.send_hello(index, now);
            }
        }
        for i in remove {
            self.remove_link(i);
        }
        self.dht_timers(now);
        self.circuit_timers(now);
    }

    // ---- discovery: DHT, on-demand links, our record -------------------

    /// A TUN packet for an address we have no link to: find the node.
    fn tun_miss(&mut self, now: Instant, view: Ipv6View<'_>) -> TunOutcome<'_> {
        let dst = view.dst();
        if !is_overlay_address(&dst) || dst == self.address {
            self.drops.no_route += 1;
            return TunOutcome::Nothing;
        }
        if let Some(t) = self.unreachable.get(&dst) {
            if now.saturating_duration_since(*t) < UNREACHABLE_FOR {
                self.drops.unreachable += 1;
                return self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0);
            }
            self.unreachable.remove(&dst);
        }
        if let Some(w) = self.wanted.get_mut(&dst) {
            if w.queue.len() < WANT_QUEUE {
                w.queue.push_back(view.bytes().to_vec());
            } else {
                self.drops.send_failed += 1;
            }
            return TunOutcome::Nothing;
        }
        let prefix = dst.octets()[1..16].to_vec();
        let min_seq = self.stale.get(&dst).map(|s| s.0).unwrap_or(0);
        if let Some(c) = self.dht.find_local(&prefix).filter(|c| {
            c.info.seq >= min_seq && c.info.ip.is_some() && c.info.id.overlay_address() == dst
        }) {
            if let Some(idx) = self.connect(now, &c.record) {
                if let Some(l) = self.links.get_mut(&idx) {
                    l.pending.push_back(view.bytes().to_vec());
                }
                self.flush_pending(now, idx);
                return TunOutcome::Nothing;
            }
        }
        if self.wanted.len() >= MAX_WANTED || !self.take_lookup_token(now) {
            self.drops.lookup_limited += 1;
            return self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0);
        }
        let goal = Goal::Node {
            prefix,
            min_seq,
            reachable: true,
        };
        match self.dht.lookup(now, goal) {
            Some(id) => {
                tracing::debug!(%dst, "looking up an address");
                self.purposes.insert(id, Purpose::Address(dst));
                self.wanted.insert(
                    dst,
                    Want {
                        queue: VecDeque::from([view.bytes().to_vec()]),
                        started: now,
                    },
                );
                self.pump_dht(now);
                TunOutcome::Nothing
            }
            None => {
                self.drops.lookup_limited += 1;
                self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0)
            }
        }
    }

    fn take_lookup_token(&mut self, now: Instant) -> bool {
        let (tokens, last) = &mut self.lookup_tokens;
        let dt = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + dt * LOOKUP_RATE).min(LOOKUP_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Moves the DHT's messages onto links and handles its finished lookups.
    fn pump_dht(&mut self, now: Instant) {
        loop {
            let mut moved = false;
            while let Some((to, bytes)) = self.dht.poll_transmit() {
                moved = true;
                self.dht_send(now, &to, &bytes);
            }
            while let Some(ev) = self.dht.poll_event() {
                moved = true;
                self.on_lookup_done(now, ev);
            }
            if !moved {
                return;
            }
        }
    }

    fn dht_send(&mut self, now: Instant, to: &Contact, bytes: &[u8]) {
        let addr = to.info.id.overlay_address();
        let idx = match self.by_addr.get(&addr) {
            Some(i) => *i,
            None => match self.connect(now, &to.record) {
                Some(i) => i,
                // No endpoint or no room: the request fails now rather
                // than in two seconds.
                None => {
                    self.dht.unreachable(now, &to.info.id);
                    return;
                }
            },
        };
        let Some(link) = self.links.get_mut(&idx) else {
            return;
        };
        link.last_used = now;
        if link.verified.is_some() {
            self.send_control(idx, MSG_DHT, bytes, false);
        } else {
            if link.pending_ctl.len() >= MAX_PENDING_CTL {
                link.pending_ctl.pop_front();
            }
            link.pending_ctl.push_back((MSG_DHT, bytes.to_vec()));
        }
    }

    /// Makes an on-demand link to the node of a (checked) record, or
    /// returns the link we have.
    fn connect(&mut self, now: Instant, record: &[u8]) -> Option<u32> {
        let rec = NodeRecord::parse_unverified(record).ok()?;
        let id = rec.node_id();
        if id == self.node_id() {
            return None;
        }
        if let Some(i) = self.by_addr.get(&id.overlay_address()) {
            return Some(*i);
        }
        // A record may name someone else's link key: never let it borrow
        // (or be mapped onto) that node's link.
        if let Some(l) = self
            .by_key
            .get(&rec.link_key)
            .and_then(|i| self.links.get(i))
        {
            if l.node_id().is_some_and(|x| x != id) {
                return None;
            }
        }
        let fields = rec.fields().ok()?;
        let ipv6_ok =
            self.config.advertise.is_empty() || self.config.advertise.iter().any(|a| a.is_ipv6());
        let ep = fields
            .endpoints
            .iter()
            .find(|e| e.is_ipv4() || ipv6_ok)
            .copied()?;
        let idx = self.add_link(rec.link_key, Some(ep), Some(id), now)?;
        self.by_addr.insert(id.overlay_address(), idx);
        if let Some(l) = self.links.get_mut(&idx) {
            l.last_used = now;
        }
        tracing::debug!(link = idx, node = %id.short(), endpoint = %ep, "linking on demand");
        self.send_hello(idx, now);
        Some(idx)
    }

    /// Sends what waited for a link's neighbour to verify.
    fn flush_pending(&mut self, now: Instant, index: u32) {
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        if link.verified.is_none() {
            return;
        }
        let pending = std::mem::take(&mut link.pending);
        let ctl = std::mem::take(&mut link.pending_ctl);
        for (ty, m) in ctl {
            if ty == MSG_CELL {
                self.bufs.cell[..m.len()].copy_from_slice(&m);
                self.send_cell(now, index, m.len());
            } else {
                self.send_control(index, ty, &m, false);
            }
        }
        for p in pending {
            if let TunOutcome::Send(dst, d) = self.handle_tun_packet(now, &p) {
                let payload = d.to_vec();
                self.transmits.push_back(Transmit { dst, payload });
            }
        }
    }

    fn on_lookup_done(&mut self, now: Instant, ev: LookupDone) {
        match self.purposes.remove(&ev.id) {
            Some(Purpose::Address(addr)) => {
                let want = self.wanted.remove(&addr);
                let found = match &ev.outcome {
                    Outcome::Found(c) if c.info.id.overlay_address() == addr => Some(c.clone()),
                    _ => None,
                };
                let linked = found.and_then(|c| self.connect(now, &c.record));
                match (linked, want) {
                    (Some(idx), Some(w)) => {
                        tracing::debug!(%addr, hops = ev.hops, queries = ev.queries, "address found");
                        if let Some(l) = self.links.get_mut(&idx) {
                            for p in w.queue {
                                if l.pending.len() >= MAX_PENDING {
                                    l.pending.pop_front();
                                }
                                l.pending.push_back(p);
                            }
                        }
                        self.flush_pending(now, idx);
                    }
                    (None, w) => {
                        tracing::debug!(%addr, queries = ev.queries, "address not found");
                        if self.unreachable.len() >= 4 * MAX_WANTED {
                            self.unreachable.clear();
                        }
                        self.unreachable.insert(addr, now);
                        // Tell the program, not silence.
                        if let Some(p) = w.and_then(|w| w.queue.into_iter().next()) {
                            self.drops.unreachable += 1;
                            let mut buf = vec![0u8; IPV6_MIN_MTU];
                            if let Ok(view) = Ipv6View::new_checked(&p) {
                                let ty = wire::ICMPV6_DEST_UNREACHABLE;
                                if let Some(n) = wire::icmpv6_error(view, ty, 3, 0, &mut buf) {
                                    buf.truncate(n);
                                    self.tun_out.push_back(buf);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some(Purpose::Pool) => {
                if let Outcome::Closest(c) = &ev.outcome {
                    self.add_to_pool(now, c);
                }
            }
            Some(Purpose::Circuit(h, addr)) => {
                let found = match ev.outcome {
                    Outcome::Found(c) => Some(c),
                    _ => None,
                };
                self.circuit_lookup_done(now, h, addr, found);
            }
            Some(Purpose::Api) => {
                if self.api_results.len() >= MAX_API_RESULTS {
                    self.api_results.clear();
                }
                self.api_results.insert(ev.id, ev);
            }
            None => {}
        }
    }

    /// The DHT's timers, joining, and keeping our record fresh.
    fn dht_timers(&mut self, now: Instant) {
        self.dht.handle_timeout(now);
        if self.dht.table_len() == 0 {
            self.joined = false;
        } else if !self.joined {
            // First contact (a configured peer, the store, the LAN): join.
            self.joined = true;
            tracing::info!(entries = self.dht.table_len(), "joining the DHT");
            self.dht.publish(now);
            self.dht.refresh(now, Refresh::Join);
        }
        self.wanted.retain(|_, w| {
            now.saturating_duration_since(w.started) < super::dht::LOOKUP_DEADLINE * 2
        });
        self.unreachable
            .retain(|_, t| now.saturating_duration_since(*t) < UNREACHABLE_FOR);
        // A record judged stale may be all there is if the node never
        // comes back with a newer one: forget the judgement after a while.
        self.stale
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < STALE_FOR);
        let unix = self.dht.unix(now);
        let endpoints = self.desired_endpoints(now);
        let expiring = self.ext.expires.is_none_or(|e| e < unix + RECORD_TTL / 2);
        let due = self
            .last_resign
            .is_none_or(|t| now.saturating_duration_since(t) >= RESIGN_INTERVAL);
        if due && (expiring || endpoints != self.ext.endpoints) {
            self.resign(now, endpoints);
        }
        self.pump_dht(now);
    }

    fn note_observed(&mut self, now: Instant, ep: SocketAddr, reporter: NodeId) {
        if ep.port() == 0 || ep.ip().is_unspecified() {
            return;
        }
        if !self.observed.contains_key(&reporter) && self.observed.len() >= MAX_OBSERVED {
            if let Some(old) = self
                .observed
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(r, _)| *r)
            {
                self.observed.remove(&old);
            }
        }
        self.observed.insert(reporter, (ep, now));
    }

    /// Endpoints for our record: the configured ones, else per address
    /// family the one most neighbours report (one vote each, their latest,
    /// for ten minutes). A tie keeps the endpoint we publish, so two
    /// neighbours that see us differently can't make it flip back and forth.
    fn desired_endpoints(&self, now: Instant) -> Vec<SocketAddr> {
        if !self.config.advertise.is_empty() {
            return self.config.advertise.clone();
        }
        let mut votes: HashMap<SocketAddr, usize> = HashMap::new();
        for (ep, t) in self.observed.values() {
            let link_local =
                matches!(ep.ip(), IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80);
            if now.saturating_duration_since(*t) < OBSERVED_FOR && !link_local {
                *votes.entry(*ep).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for v4 in [true, false] {
            let current = self
                .ext
                .endpoints
                .iter()
                .find(|e| e.is_ipv4() == v4)
                .copied();
            let cur_votes = current.and_then(|c| votes.get(&c).copied()).unwrap_or(0);
            let best = votes
                .iter()
                .filter(|(e, _)| e.is_ipv4() == v4)
                .max_by_key(|(e, n)| (**n, **e))
                .map(|(e, n)| (*e, *n));
            match (current, best) {
                (Some(c), Some((_, n))) if cur_votes >= n => out.push(c),
                (_, Some((e, _))) => out.push(e),
                (Some(c), None) => out.push(c),
                (None, None) => {}
            }
        }
        out
    }

    /// Signs a new record (new endpoints or a later expiry) and spreads it.
    fn resign(&mut self, now: Instant, endpoints: Vec<SocketAddr>) {
        let unix = self.dht.unix(now);
        let seq = self.record.seq.saturating_add(1).max(unix);
        if seq > self.seq_limit {
            // Not stored yet: wait for the shell (record_seq_wanted) rather
            // than publish a number a crash could hand out again.
            tracing::debug!(
                seq,
                limit = self.seq_limit,
                "record re-signing waits for its sequence number to be stored"
            );
            return;
        }
        self.last_resign = Some(now);
        self.ext = RecordExt {
            expires: Some(unix + RECORD_TTL),
            endpoints,
            roles: self.config.roles,
            onion_key: Some(self.circ.onion_public()),
        };
        self.record = self.identity.sign_record_with(seq, &self.ext);
        self.record_bytes = self.record.to_bytes();
        tracing::info!(seq, endpoints = ?self.ext.endpoints, "record signed");
        let own = own_contact(&self.record, &self.record_bytes);
        if self.joined {
            self.dht.set_own(now, own);
        } else {
            self.dht.set_own_quietly(own);
        }
        let verified: Vec<u32> = self
            .links
            .values()
            .filter(|l| l.verified.is_some())
            .map(|l| l.index)
            .collect();
        for i in verified {
            if let Some(l) = self.links.get_mut(&i) {
                l.they_have_ours = false;
            }
            self.send_hello(i, now);
        }
    }

    /// Adds a node remembered from an earlier run (its record is checked;
    /// expired or forged ones are refused).
    pub fn add_stored_peer(&mut self, now: Instant, record: &[u8]) -> bool {
        match self.dht.contact_from(now, record) {
            Ok(c) if c.info.id != self.node_id() => {
                // A peer the config names is "config" whatever the store
                // remembered it as.
                let configured = self.config.peers.iter().any(|p| p.uri.node_id == c.info.id);
                let source = if configured {
                    Source::Config
                } else {
                    Source::Store
                };
                self.dht.add_contact(now, c, source);
                true
            }
            _ => false,
        }
    }

    /// Links to a node found on the LAN (not kept up like configured peers).
    pub fn add_lan_peer(&mut self, now: Instant, uri: &PeerUri, endpoint: SocketAddr) {
        let addr = uri.node_id.overlay_address();
        if uri.node_id == self.node_id() || self.by_addr.contains_key(&addr) {
            return;
        }
        // Announcements are unauthenticated: each costs us a handshake, so
        // act on one a second at most.
        if self
            .last_lan
            .is_some_and(|t| now.saturating_duration_since(t) < LAN_INTERVAL)
        {
            return;
        }
        self.last_lan = Some(now);
        if let Some(idx) = self.add_link(uri.link_key, Some(endpoint), Some(uri.node_id), now) {
            self.by_addr.insert(addr, idx);
            if let Some(l) = self.links.get_mut(&idx) {
                l.source = Source::Lan;
            }
            tracing::info!(node = %uri.node_id.short(), %endpoint, "node found on the LAN");
            self.send_hello(idx, now);
        }
    }

    /// What to keep in the peer store: the routing table with its records.
    pub fn peer_snapshot(&self, now: Instant) -> Vec<StoredPeerRow> {
        let unix = self.dht.unix(now);
        self.dht
            .table(now)
            .into_iter()
            .map(|e| {
                let ago = e.last_seen_secs.unwrap_or(0.0) as u64;
                (
                    e.id.0,
                    e.record.to_vec(),
                    e.source,
                    unix.saturating_sub(ago),
                )
            })
            .collect()
    }

    /// The routing table, for `qgate peers`.
    pub fn peers(&self, now: Instant) -> PeersReport {
        let entries: Vec<PeerView> = self
            .dht
            .table(now)
            .into_iter()
            .map(|e| {
                let endpoints = NodeRecord::parse_unverified(&e.record)
                    .ok()
                    .and_then(|r| r.fields().ok())
                    .map(|f| f.endpoints)
                    .unwrap_or_default();
                let address = e.id.overlay_address();
                PeerView {
                    bucket: e.bucket,
                    node_id: e.id,
                    address,
                    endpoints,
                    seq: e.seq,
                    expires: e.expires,
                    roles: e.roles,
                    source: e.source,
                    last_seen_secs: e.last_seen_secs,
                    fails: e.fails,
                    replacement: e.replacement,
                    link: self
                        .by_addr
                        .get(&address)
                        .and_then(|i| self.links.get(i))
                        .map(|l| l.state()),
                }
            })
            .collect();
        let mut buckets: Vec<usize> = entries.iter().map(|e| e.bucket).collect();
        buckets.dedup();
        PeersReport {
            node_id: self.node_id(),
            buckets: buckets.len(),
            entries,
            dht: self.dht.stats(),
        }
    }

    /// Starts a lookup for the control API; collect it with
    /// [`Node::take_api_result`].
    pub fn api_lookup(&mut self, now: Instant, target: &LookupTarget) -> Option<u64> {
        let prefix = match target {
            LookupTarget::Id(id) => id.0.to_vec(),
            LookupTarget::Address(a) => a.octets()[1..16].to_vec(),
        };
        let goal = Goal::Node {
            prefix,
            min_seq: 0,
            reachable: false,
        };
        self.api_start(now, goal)
    }

    fn api_start(&mut self, now: Instant, goal: Goal) -> Option<u64> {
        let id = self.dht.lookup(now, goal)?;
        self.purposes.insert(id, Purpose::Api);
        self.pump_dht(now);
        Some(id)
    }

    /// A finished control-API lookup, put or get.
    pub fn take_api_result(&mut self, id: u64) -> Option<LookupDone> {
        self.api_results.remove(&id)
    }

    /// Signs and publishes a value under (namespace, key) for `ttl`
    /// seconds: [`Node::value_stamp`], signing, [`Node::put_signed_value`]
    /// in one call, for callers that don't mind the node waiting on RSA.
    pub fn dht_put(
        &mut self,
        now: Instant,
        namespace: &[u8],
        key: &[u8],
        value: &[u8],
        ttl: u64,
    ) -> Result<Option<u64>, String> {
        let (seq, expires) = self.value_stamp(now, ttl).map_err(|e| e.to_string())?;
        let v = SignedValue::sign(&self.identity, namespace, key, value, seq, expires)
            .map_err(|e| e.to_string())?;
        self.put_signed_value(now, &v)
    }

    /// The signing key for [`SignedValue::sign`], so the shell can sign off
    /// the node (and off whatever lock guards it).
    pub fn signer(&self) -> Arc<Identity> {
        self.identity.clone()
    }

    /// The sequence number and expiry (unix seconds) of the next value this
    /// node publishes with a lifetime of `ttl` seconds.
    pub fn value_stamp(
        &mut self,
        now: Instant,
        ttl: u64,
    ) -> Result<(u64, u64), super::records::ValueError> {
        if ttl == 0 || ttl > super::records::MAX_VALUE_TTL {
            return Err(super::records::ValueError::Ttl);
        }
        // Milliseconds, so a burst of puts doesn't run ahead of the clock
        // (and a quick restart doesn't sign values older than those stored).
        self.value_seq = self
            .value_seq
            .saturating_add(1)
            .max(self.dht.unix_millis(now));
        Ok((self.value_seq, self.dht.unix(now) + ttl))
    }

    /// Stores and publishes a value this node signed (see
    /// [`Node::value_stamp`]); the lookup ID to wait on, if it went out.
    pub fn put_signed_value(
        &mut self,
        now: Instant,
        value: &SignedValue,
    ) -> Result<Option<u64>, String> {
        let id = self
            .dht
            .put(now, &value.to_bytes())
            .map_err(|e| e.to_string())?;
        if let Some(id) = id {
            self.purposes.insert(id, Purpose::Api);
        }
        self.pump_dht(now);
        Ok(id)
    }

    /// Looks up the values under (namespace, key).
    pub fn dht_get(&mut self, now: Instant, namespace: &[u8], key: &[u8]) -> Option<u64> {
        self.api_start(now, Goal::Values(value_target(namespace, key)))
    }

    /// Values stored on this node under (namespace, key).
    pub fn local_values(&self, now: Instant, namespace: &[u8], key: &[u8]) -> Vec<Arc<[u8]>> {
        self.dht.local_values(now, &value_target(namespace, key))
    }

    /// Every value record this node keeps (its own and those it holds for
    /// others), for the node's store.
    pub fn value_records(&self, now: Instant) -> Vec<Arc<[u8]>> {
        self.dht.value_records(now)
    }

    /// Takes back a value record kept by an earlier run (checked like one
    /// from the network; this node's own are published again on joining).
    pub fn restore_value(&mut self, now: Instant, record: &[u8]) -> bool {
        self.dht.restore_value(now, record)
    }

    /// A packet for the TUN produced outside a TUN read.
    pub fn poll_tun_write(&mut self) -> Option<Vec<u8>> {
        self.tun_out.pop_front()
    }

    /// Record checks done (signature verifications, not cache hits).
    pub fn record_verifications(&mut self) -> u64 {
        self.dht.records().verifications
    }

    /// A report for `qgate status`.
    pub fn status(&self) -> NodeStatus {
        let mut links: Vec<LinkStatus> = self
            .links
            .values()
            .map(|l| LinkStatus {
                link: l.index,
                node_id: l.node_id().map(|i| i.to_string()),
                address: l.node_id().map(|i| i.overlay_address()),
                state: l.state(),
                configured: l.persistent,
                endpoint: l.endpoint,
                last_handshake_secs: l.tunn.time_since_last_handshake().map(|d| d.as_secs_f64()),
                mtu: l.mtu,
                compression: l.compress,
                tx_compression_ratio: ratio(l.counters.tx_wire_bytes, l.counters.tx_bytes),
                rx_compression_ratio: ratio(l.counters.rx_wire_bytes, l.counters.rx_bytes),
                counters: l.counters,
                drops: l.drops,
            })
            .collect();
        links.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        NodeStatus {
            node_id: self.identity.node_id().to_string(),
            address: self.address,
            record_seq: self.record.seq,
            endpoints: self.ext.endpoints.clone(),
            dht: self.dht.stats(),
            table_entries: self.dht.table_len(),
            drops: self.drops,
            circuits: self.out_circuits(),
            relay: self.relay_stats(),
            routing: self.routing_summary(),
            links,
        }
    }

    /// Index of the link to a verified neighbour (for tests).
    pub fn link_up_to(&self, addr: &Ipv6Addr) -> bool {
        self.by_addr
            .get(addr)
            .and_then(|i| self.links.get(i))
            .is_some_and(|l| l.state() == LinkState::Up && l.they_have_ours)
    }
}

fn onion_cell_max() -> usize {
    super::onion::CELL_LARGE
}

fn own_contact(record: &NodeRecord, bytes: &[u8]) -> Contact {
    let info = node_info(record).expect("our own record's fields encode");
    Contact {
        info,
        record: Arc::from(bytes),
    }
}

/// Decodes what [`put_endpoint`] wrote; returns the rest.
fn parse_endpoint(b: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let (ip, rest): (IpAddr, &[u8]) = match *b.first()? {
        4 if b.len() >= 7 => (<[u8; 4]>::try_from(&b[1..5]).ok()?.into(), &b[5..]),
        6 if b.len() >= 19 => (<[u8; 16]>::try_from(&b[1..17]).ok()?.into(), &b[17..]),
        _ => return None,
    };
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    Some((SocketAddr::new(ip, port), &rest[2..]))
}

/// Runs a boringtun rate limiter's checks (MAC, and under load the cookie)
/// on a handshake message, queueing the cookie reply it may want sent.
/// Returns whether the handshake may go on; a refusal is counted.
fn pass_gate(
    limiter: &RateLimiter,
    from: SocketAddr,
    datagram: &[u8],
    transmits: &mut VecDeque<Transmit>,
    drops: &mut Drops,
) -> bool {
    let mut cookie = [0u8; 64];
    match limiter.verify_packet(Some(from.ip()), datagram, &mut cookie) {
        Ok(_) => true,
        Err(e) => {
            drops.handshake_rejected += 1;
            if let TunnResult::WriteToNetwork(c) = e {
                transmits.push_back(Transmit {
                    dst: from,
                    payload: c.to_vec(),
                });
            }
            false
        }
    }
}

/// Queues a handshake initiation to `ep` (a fresh one if `force`, else only
/// when none is in progress).
fn initiate(
    tunn: &mut Tunn,
    ep: SocketAddr,
    force: bool,
    buf: &mut [u8],
    transmits: &mut VecDeque<Transmit>,
) {
    if let TunnResult::WriteToNetwork(out) = tunn.format_handshake_initiation(buf, force) {
        transmits.push_back(Transmit {
            dst: ep,
            payload: out.to_vec(),
        });
    }
}

/// WireGuard cookie reply: message type 3, 64 bytes.
fn is_cookie_reply(d: &[u8]) -> bool {
    d.len() == 64 && d[0] == 3
}

/// Maps IPv4-mapped IPv6 socket addresses (from a dual-stack socket) to IPv4.
pub fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock
mod tests {
    use super::*;
    use crate::proto::identity::ROLE_RELAY as ROLE_RELAY_BIT;
    use crate::proto::onion;
    use rand_core::OsRng;

    struct Net {
        nodes: Vec<(Node, SocketAddr)>,
        now: Instant,
    }

    fn cfg(peers: Vec<PeerUri>) -> NodeConfig {
        NodeConfig {
            peers: peers.into_iter().map(|uri| PeerConfig { uri }).collect(),
            compression: CompressionPolicy {
                enabled: true,
                ..Default::default()
            },
            keepalive: 10,
            mtu: 1440,
            max_links: 16,
            advertise: vec![],
            roles: 0,
            unix_time: 1_800_000_000,
            routes: RoutePolicy::default(),
            relay: RelayConfig::default(),
            traffic: TrafficConfig::default(),
            has_tun: true,
            access: AccessConfig::default(),
            rng_seed: {
                let mut s = [0u8; 32];
                rand_core::RngCore::fill_bytes(&mut OsRng, &mut s);
                s
            },
        }
    }

    fn identities(n: usize) -> Vec<Identity> {
        (0..n)
            .map(|_| Identity::generate(&mut OsRng).unwrap())
            .collect()
    }

    fn endpoints(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| format!("198.18.0.{}:7300", i + 1).parse().unwrap())
            .collect()
    }

    fn uri(id: &Identity, ep: SocketAddr) -> PeerUri {
        PeerUri {
            node_id: id.node_id(),
            link_key: id.link_public(),
            endpoint: Some(ep),
        }
    }

    /// A (configured with B) and B (configured with nobody), the first two of
    /// `ids` at the first two of `eps`, run until their link is quiet.
    fn linked_pair(now: Instant, ids: Vec<Identity>, eps: &[SocketAddr]) -> Net {
        let peers_a = vec![uri(&ids[1], eps[1])];
        let mut it = ids.into_iter();
        let a = Node::new(it.next().unwrap(), 1, cfg(peers_a), now);
        let b = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
        let mut net = Net {
            nodes: vec![(a, eps[0]), (b, eps[1])],
            now,
        };
        net.run();
        net
    }

    impl Net {
        /// Delivers queued datagrams until the network is quiet; returns
        /// packets written to each node's TUN.
        fn run(&mut self) -> Vec<Vec<Vec<u8>>> {
            let mut tun = vec![Vec::new(); self.nodes.len()];
            let mut quiet = 0;
            for _ in 0..200 {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    while let Some(t) = self.nodes[i].0.poll_transmit() {
                        moved = true;
                        let from = self.nodes[i].1;
                        if let Some(j) = self.nodes.iter().position(|(_, a)| *a == t.dst) {
                            if let Some(p) =
                                self.nodes[j].0.handle_datagram(self.now, from, &t.payload)
                            {
                                tun[j].push(p.to_vec());
                            }
                        }
                    }
                }
                // Quiet for a while (timers such as hello repeats and
                // record re-signing run once a second or slower): done.
                quiet = if moved { 0 } else { quiet + 1 };
                if quiet > 8 {
                    break;
                }
                self.now += Duration::from_millis(300);
                for n in &mut self.nodes {
                    n.0.handle_timeout(self.now);

                    // As the shell does: store the sequence number, then allow it.

                    if let Some(s) = n.0.record_seq_wanted(self.now) {
                        n.0.reserve_record_seq(s);
                    }
                }
            }
            tun
        }

        /// Moves datagrams until none is left, running no timers.
        fn deliver(&mut self) {
            for _ in 0..100 {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    while let Some(t) = self.nodes[i].0.poll_transmit() {
                        moved = true;
                        let from = self.nodes[i].1;
                        if let Some(j) = self.nodes.iter().position(|(_, a)| *a == t.dst) {
                            self.nodes[j].0.handle_datagram(self.now, from, &t.payload);
                        }
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        fn send(&mut self, from: usize, packet: &[u8]) -> Option<Vec<u8>> {
            let src_ep = self.nodes[from].1;
            let (dst, data) = match self.nodes[from].0.handle_tun_packet(self.now, packet) {
                TunOutcome::Send(d, p) => (d, p.to_vec()),
                _ => return None,
            };
            let j = self.nodes.iter().position(|(_, a)| *a == dst)?;
            self.nodes[j]
                .0
                .handle_datagram(self.now, src_ep, &data)
                .map(|p| p.to_vec())
        }
    }

    fn udp_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload.len()];
        wire::write_ipv6_header(&mut p, payload.len(), 17, 64, src, dst);
        p[40..].copy_from_slice(payload);
        p
    }

    #[test]
    fn link_up_verify_forward_and_reject_spoofing() {
        let now = Instant::now();
        let ids = identities(3);
        let eps = endpoints(3);
        let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
        // A knows B; C knows B; B knows nobody (open network).
        let peers_a = vec![uri(&ids[1], eps[1])];
        let peers_c = vec![uri(&ids[1], eps[1])];
        let mut it = ids.into_iter();
        let a = Node::new(it.next().unwrap(), 1, cfg(peers_a), now);
        let b = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
        let c = Node::new(it.next().unwrap(), 1, cfg(peers_c), now);
        let mut net = Net {
            nodes: vec![(a, eps[0]), (b, eps[1]), (c, eps[2])],
            now,
        };
        net.run();
        assert!(net.nodes[0].0.link_up_to(&addrs[1]));
        assert!(net.nodes[1].0.link_up_to(&addrs[0]));
        assert!(net.nodes[1].0.link_up_to(&addrs[2]));

        // A -> B, compressible payload, arrives intact.
        let p = udp_packet(addrs[0], addrs[1], &[b'x'; 1000]);
        assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
        // B -> C over the link C opened.
        let p = udp_packet(addrs[1], addrs[2], b"hello from b, a short one");
        assert_eq!(net.send(1, &p).as_deref(), Some(&p[..]));
        // A claims C's address: B drops and counts it.
        let p = udp_packet(addrs[2], addrs[1], b"spoofed");
        assert_eq!(net.send(0, &p), None);
        let st = net.nodes[1].0.status();
        let spoofed: u64 = st.links.iter().map(|l| l.drops.spoofed_source).sum();
        assert_eq!(spoofed, 1);
        // A was configured with B only, yet reaches C: joining the DHT
        // through B made A learn C's record and link to C on demand.
        let p = udp_packet(addrs[0], addrs[2], b"no configured link to c");
        assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
        assert!(net.nodes[0].0.link_up_to(&addrs[2]));
        // An address nobody has: the lookup fails and the program gets
        // ICMPv6 address unreachable; at once, next time.
        let nobody = Ipv6Addr::new(0xfc00, 1, 2, 3, 4, 5, 6, 7);
        let p = udp_packet(addrs[0], nobody, b"anyone there?");
        let now = net.now;
        assert!(matches!(
            net.nodes[0].0.handle_tun_packet(now, &p),
            TunOutcome::Nothing
        ));
        net.run();
        let r = net.nodes[0]
            .0
            .poll_tun_write()
            .expect("ICMPv6 for the program");
        let v = Ipv6View::new_checked(&r).unwrap();
        assert_eq!(v.next_header(), wire::NH_ICMPV6);
        assert_eq!(v.payload()[0], wire::ICMPV6_DEST_UNREACHABLE);
        assert_eq!(v.dst(), addrs[0]);
        let now = net.now + Duration::from_secs(1);
        assert!(matches!(
            net.nodes[0].0.handle_tun_packet(now, &p),
            TunOutcome::Reply(_)
        ));
        // A misbehaving A routes C's traffic over its link to B: B drops it
        // as not addressed to B.
        let to_b = net.nodes[0].0.by_addr[&addrs[1]];
        net.nodes[0].0.by_addr.insert(addrs[2], to_b);
        let p = udp_packet(addrs[0], addrs[2], b"not for b");
        assert_eq!(net.send(0, &p), None);
        let wrong: u64 = net.nodes[1]
            .0
            .status()
            .links
            .iter()
            .map(|l| l.drops.wrong_destination)
            .sum();
        assert_eq!(wrong, 1);
        net.nodes[0].0.by_addr.remove(&addrs[2]);
        // A path below 1280 + overhead: programs still send 1280, and the
        // node fragments for them; B's kernel gets fragments it can join.
        net.nodes[0].0.set_path_mtu(eps[1], 1300);
        let p = udp_packet(addrs[0], addrs[1], &[9u8; 1240]);
        assert!(matches!(
            net.nodes[0].0.handle_tun_packet(now, &p),
            TunOutcome::Nothing
        ));
        let got = net.run();
        assert_eq!(got[1].len(), 2, "two fragments");
        for f in &got[1] {
            assert!(f.len() <= 1300 - 28 - 32);
            assert_eq!(
                Ipv6View::new_checked(f).unwrap().next_header(),
                wire::NH_FRAGMENT
            );
        }
        // Too big for a smaller path MTU: Packet Too Big back to the TUN.
        net.nodes[0].0.set_path_mtu(eps[1], 1400);
        let p = udp_packet(addrs[0], addrs[1], &[7u8; 1390]);
        match net.nodes[0]
            .0
            .handle_tun_packet(now + Duration::from_secs(1), &p)
        {
            TunOutcome::Reply(r) => {
                let v = Ipv6View::new_checked(r).unwrap();
                assert_eq!(v.payload()[0], wire::ICMPV6_PACKET_TOO_BIG);
                let mtu = u32::from_be_bytes(v.payload()[4..8].try_into().unwrap());
                assert_eq!(mtu as usize, 1400 - 28 - 32);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A handshake initiation to `to` from a fresh key, as a new node sends it.
    fn initiation(to: &Node, seed: u8) -> Vec<u8> {
        let mut t = Tunn::new(
            x25519::StaticSecret::from([seed; 32]),
            x25519::PublicKey::from(to.identity.link_public()),
            None,
            None,
            u32::from(seed),
            None,
        );
        let mut buf = vec![0u8; 256];
        match t.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    #[test]
    fn handshake_flood_is_limited_per_source() {
        let t0 = Instant::now();
        let mut v = Node::new(identities(1).pop().unwrap(), 1, cfg(vec![]), t0);
        let flooder: SocketAddr = "198.18.5.5:40000".parse().unwrap();
        let other: SocketAddr = "198.18.6.6:7300".parse().unwrap();
        // Valid initiations from one source, 2000 a second for 2 s: each
        // would cost Diffie-Hellman work and a link.
        let inits: Vec<Vec<u8>> = (0..8).map(|i| initiation(&v, 100 + i)).collect();
        let mut answered = 0;
        let mut now = t0;
        for i in 0..4000usize {
            now = t0 + Duration::from_micros(500 * i as u64);
            let from = SocketAddr::new(flooder.ip(), 40000 + (i % 1000) as u16);
            v.handle_datagram(now, from, &inits[i % inits.len()]);
            // Garbage from the same source shares its budget.
            v.handle_datagram(now, from, &[0x55; 100]);
            answered += std::iter::from_fn(|| v.poll_transmit())
                .filter(|t| t.dst.ip() == flooder.ip() && t.payload[0] == 2)
                .count();
            if i % 500 == 0 {
                v.handle_timeout(now);
            }
        }
        let limit = SOURCE_LIMIT.burst as usize + 2 * SOURCE_LIMIT.per_sec as usize + 1;
        let proven = PROVEN_LIMIT.burst as usize + 2 * PROVEN_LIMIT.per_sec as usize + 1;
        // Handshake responses: within the source budget (the flooder has no
        // cookies, so the proven budget gives it none).
        assert!(answered <= limit, "{answered} answered");
        let st = v.status();
        assert!(
            st.drops.rate_limited >= (8000 - limit - proven) as u64,
            "{:?}",
            st.drops
        );
        // Another source at the same moment is not limited: answered at
        // once (the flood may have put the node under load as a whole,
        // then the answer is a cookie, and the retry with it succeeds).
        let limited = st.drops.rate_limited;
        let mut t = Tunn::new(
            x25519::StaticSecret::from([99; 32]),
            x25519::PublicKey::from(v.identity.link_public()),
            None,
            None,
            99,
            None,
        );
        let mut buf = vec![0u8; 2048];
        let mut answer = None;
        for _ in 0..2 {
            let init = match t.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => panic!("no initiation"),
            };
            v.handle_datagram(now, other, &init);
            let to_other: Vec<Transmit> = std::iter::from_fn(|| v.poll_transmit())
                .filter(|t| t.dst == other)
                .collect();
            assert_eq!(to_other.len(), 1);
            if to_other[0].payload[0] == 2 {
                answer = Some(2);
                break;
            }
            assert_eq!(to_other[0].payload[0], 3, "a cookie");
            let _ = t.decapsulate(None, &to_other[0].payload, &mut buf);
        }
        assert_eq!(answer, Some(2), "a handshake response");
        assert_eq!(v.status().drops.rate_limited, limited);
    }

    #[test]
    fn established_link_passes_data_through_a_flood() {
        let now = Instant::now();
        let ids = identities(2);
        let eps = endpoints(2);
        let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
        let mut net = linked_pair(now, ids, &eps);
        assert!(net.nodes[1].0.link_up_to(&addrs[0]));
        let flooder: SocketAddr = "198.18.5.5:40000".parse().unwrap();
        let init = initiation(&net.nodes[1].0, 42);
        let mut delivered = 0;
        for i in 0..2000u64 {
            net.now += Duration::from_millis(1);
            let b = &mut net.nodes[1].0;
            for _ in 0..20 {
                b.handle_datagram(net.now, flooder, &init);
                b.handle_datagram(net.now, flooder, &[4, 0, 0, 0, 9, 9, 9, 9]);
            }
            while b.poll_transmit().is_some() {}
            if i % 10 == 0 {
                let p = udp_packet(addrs[0], addrs[1], format!("packet {i}").as_bytes());
                delivered += (net.send(0, &p).as_deref() == Some(&p[..])) as usize;
            }
        }
        assert_eq!(delivered, 200, "every packet of the established link");
        let d = net.nodes[1].0.status().drops;
        assert!(d.rate_limited > 70_000, "{d:?}");
    }

    #[test]
    fn source_table_stays_bounded_under_a_spray() {
        let t0 = Instant::now();
        let mut v = Node::new(identities(1).pop().unwrap(), 1, cfg(vec![]), t0);
        let junk = [1u8; 148];
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 20);
            let ip = std::net::Ipv4Addr::from(0xc612_0000 + i);
            v.handle_datagram(now, SocketAddr::new(ip.into(), 7300), &junk);
            if i % 12_500 == 0 {
                v.handle_timeout(now);
            }
            while v.poll_transmit().is_some() {}
        }
        assert!(v.sources.len() <= SOURCE_SLOTS);
        assert!(v.sources.memory() <= 256 * 1024, "{}", v.sources.memory());
        assert!(v.sources.evicted >= 100_000 - SOURCE_SLOTS as u64);
        assert!(v.links.is_empty(), "random bytes make no link");
    }

    #[test]
    fn create_floods_are_limited_per_neighbour() {
        let t0 = Instant::now();
        let ids = identities(3);
        let eps = endpoints(3);
        let keys: Vec<[u8; 32]> = ids.iter().map(|i| i.link_public()).collect();
        let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
        let v_uri = uri(&ids[0], eps[0]);
        let mut it = ids.into_iter();
        let v = Node::new(it.next().unwrap(), 1, cfg(vec![]), t0);
        let a = Node::new(it.next().unwrap(), 1, cfg(vec![v_uri.clone()]), t0);
        let b = Node::new(it.next().unwrap(), 1, cfg(vec![v_uri]), t0);
        let mut net = Net {
            nodes: vec![(v, eps[0]), (a, eps[1]), (b, eps[2])],
            now: t0,
        };
        net.run();
        let t0 = net.now;
        let v = &mut net.nodes[0].0;
        assert!(v.link_up_to(&addrs[1]) && v.link_up_to(&addrs[2]));
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (_c, create) =
            onion::ClientHandshake::start(&mut rng, v.node_id(), v.circ.onion_public());
        let cell_for = |circ: u32| {
            let mut cell = vec![0u8; onion::CELL_SMALL];
            onion::write_header(&mut cell, circ, onion::KIND_CREATE, &[0; 16]);
            cell[onion::CELL_HEADER..onion::CELL_HEADER + create.len()].copy_from_slice(&create);
            cell
        };
        let mut pkt = Vec::new();
        // 1000 CREATEs in one second from neighbour a.
        for i in 0..1000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            wire::encode_control(addrs[1], addrs[0], MSG_CELL, &cell_for(i + 1), &mut pkt);
            v.inject_inner(now, keys[1], eps[1], &pkt);
            while v.poll_transmit().is_some() {}
        }
        let st = v.status().relay;
        let allowed = CREATE_LIMIT.burst as u64 + CREATE_LIMIT.per_sec as u64 + 1;
        assert!(st.drops.create_limited >= 1000 - allowed, "{st:?}");
        assert!(st.circuits_total <= allowed, "{st:?}");
        assert!(st.circuits_total >= CREATE_LIMIT.burst as u64, "{st:?}");
        // Neighbour b still builds.
        let before = st.circuits_total;
        wire::encode_control(addrs[2], addrs[0], MSG_CELL, &cell_for(5), &mut pkt);
        v.inject_inner(t0 + Duration::from_secs(1), keys[2], eps[2], &pkt);
        assert_eq!(v.status().relay.circuits_total, before + 1);
    }

    #[test]
    fn control_messages_survive_segmentation() {
        let now = Instant::now();
        let ids = identities(2);
        let eps = endpoints(2);
        let mut net = linked_pair(now, ids, &eps);
        let addr_a = net.nodes[0].0.address();
        let idx = net.nodes[1].0.by_addr[&addr_a];
        // b re-sends its hello as segments; a takes it as any hello (a newer
        // record would replace the old one, the same one is simply known).
        net.nodes[0]
            .0
            .links
            .values_mut()
            .for_each(|l| l.they_have_ours = false);
        let body = {
            let n = &net.nodes[1].0;
            let mut v = vec![HELLO_FLAG_ACK | HELLO_FLAG_REPLY];
            v.extend_from_slice(&n.record_bytes);
            v
        };
        net.nodes[1].0.send_control(idx, MSG_HELLO, &body, true);
        assert!(!net.nodes[1].0.transmits.is_empty());
        net.run();
        let st = net.nodes[0].0.status();
        assert_eq!(st.links[0].drops.bad_inner, 0);
        assert!(net.nodes[0].0.link_up_to(&net.nodes[1].0.address()));
        // A 20 KB message of an unknown type arrives whole and is counted
        // as one bad message, not 17 bad segments.
        net.nodes[1]
            .0
            .send_control(idx, 77, &vec![5u8; 20_000], false);
        assert_eq!(net.nodes[1].0.transmits.len(), 17);
        net.run();
        assert_eq!(net.nodes[0].0.status().links[0].drops.bad_inner, 1);
    }

    /// A value put while the node was alone is kept (the shell writes
    /// `value_records` to the vault); restored in the next run, it reaches
    /// the node's peer once the node joins.
    #[test]
    fn a_kept_value_is_published_again_after_a_restart() {
        let now = Instant::now();
        let mut ids = identities(2);
        let eps = endpoints(2);
        let again = |id: &Identity| {
            Identity::from_pem(&id.rsa_pem().unwrap(), id.link_secret_bytes()).unwrap()
        };
        let mut alone = Node::new(again(&ids[0]), 1, cfg(vec![]), now);
        alone
            .dht_put(now, b"ns", b"k", b"kept value", 3600)
            .unwrap();
        let kept = alone.value_records(now);
        assert_eq!(kept.len(), 1);
        drop(alone);

        let later = now + Duration::from_secs(60);
        let b_id = ids.pop().unwrap();
        let mut a = Node::new(ids.pop().unwrap(), 2, cfg(vec![uri(&b_id, eps[1])]), later);
        assert!(a.restore_value(later, &kept[0]));
        let b = Node::new(b_id, 1, cfg(vec![]), later);
        let mut net = Net {
            nodes: vec![(a, eps[0]), (b, eps[1])],
            now: later,
        };
        net.run();
        advance(&mut net, 2.0);
        let at_b = net.nodes[1].0.local_values(net.now, b"ns", b"k");
        assert_eq!(at_b.len(), 1, "b stores a's kept value");
        assert_eq!(&at_b[0][..], &kept[0][..]);
    }

    #[test]
    fn packet_to_an_unlinked_address_waits_for_the_lookup_then_flows() {
        let now = Instant::now();
        let ids = identities(3);
        let eps = endpoints(3);
        let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
        let conf = |peers: Vec<PeerUri>, ep: SocketAddr| NodeConfig {
            advertise: vec![ep],
            ..cfg(peers)
        };
        let (pa, pc) = (vec![uri(&ids[1], eps[1])], vec![uri(&ids[1], eps[1])]);
        let mut it = ids.into_iter();
        let a = Node::new(it.next().unwrap(), 1, conf(pa, eps[0]), now);
        let b = Node::new(it.next().unwrap(), 1, conf(vec![], eps[1]), now);
        let c = Node::new(it.next().unwrap(), 1, conf(pc, eps[2]), now);
        let mut net = Net {
            nodes: vec![(a, eps[0]), (b, eps[1]), (c, eps[2])],
            now,
        };
        // Links A-B and C-B come up; no timer has run, so A has not joined
        // the DHT and knows nothing of C.
        net.deliver();
        assert!(net.nodes[0].0.link_up_to(&addrs[1]));
        assert!(!net.nodes[0].0.by_addr.contains_key(&addrs[2]));
        let p = udp_packet(addrs[0], addrs[2], b"waits for a lookup");
        let out = net.nodes[0].0.handle_tun_packet(now, &p);
        assert!(matches!(out, TunOutcome::Nothing), "{out:?}");
        let tun = net.run();
        assert!(tun[2].contains(&p), "the packet that waited reached C");
        assert!(net.nodes[0].0.link_up_to(&addrs[2]));
        assert_eq!(net.nodes[0].0.status().drops.unreachable, 0);
        // Nothing more to say: the on-demand link closes; the configured
        // one stays.
        for _ in 0..60 {
            net.now += Duration::from_secs(3);
            let now = net.now;
            for n in &mut net.nodes {
                n.0.handle_timeout(now);

                // As the shell does: store the sequence number, then allow it.

                if let Some(s) = n.0.record_seq_wanted(now) {
                    n.0.reserve_record_seq(s);
                }
            }
            net.deliver();
        }
        assert!(!net.nodes[0].0.by_addr.contains_key(&addrs[2]));
        assert!(net.nodes[0].0.by_addr.contains_key(&addrs[1]));
    }

    #[test]
    fn access_lists_and_subnet_limit_refuse_links() {
        use crate::proto::access::Rule;
        let now = Instant::now();
        let ids = identities(3);
        let eps = endpoints(3);
        let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
        let c_id = ids[2].node_id();
        // Three B configurations; A and C both configured with B.
        let deny_a_net = AccessConfig {
            link: crate::proto::access::AccessList {
                allow: vec![],
                deny: vec![Rule::Net(eps[0].ip(), 32)],
            },
            ..AccessConfig::default()
        };
        let allow_only_c = AccessConfig {
            link: crate::proto::access::AccessList {
                allow: vec![Rule::Node(c_id)],
                deny: vec![],
            },
            ..AccessConfig::default()
        };
        let one_per_subnet = AccessConfig {
            links_per_subnet: 1,
            ..AccessConfig::default()
        };
        for (case, access) in [deny_a_net, allow_only_c, one_per_subnet]
            .into_iter()
            .enumerate()
        {
            let (pa, pc) = (vec![uri(&ids[1], eps[1])], vec![uri(&ids[1], eps[1])]);
            let clone = |i: &Identity| {
                Identity::from_pem(&i.rsa_pem().unwrap(), i.link_secret_bytes()).unwrap()
            };
            let a = Node::new(clone(&ids[0]), 1, cfg(pa), now);
            let b = Node::new(
                clone(&ids[1]),
                1,
                NodeConfig {
                    access,
                    ..cfg(vec![])
                },
                now,
            );
            let c = Node::new(clone(&ids[2]), 1, cfg(pc), now);
            let mut net = Net {
                nodes: vec![(a, eps[0]), (b, eps[1]), (c, eps[2])],
                now,
            };
            // A starts first, so under the subnet limit it takes the slot.
            net.run();
            let st = net.nodes[1].0.status();
            match case {
                0 | 1 => {
                    assert!(
                        !net.nodes[1].0.link_up_to(&addrs[0]),
                        "case {case}: A linked"
                    );
                    assert!(
                        net.nodes[1].0.link_up_to(&addrs[2]),
                        "case {case}: C refused"
                    );
                    assert!(st.drops.access_denied > 0, "case {case}");
                }
                _ => {
                    let up = [0, 2].map(|i| net.nodes[1].0.link_up_to(&addrs[i]));
                    assert_eq!(up.iter().filter(|u| **u).count(), 1, "{up:?}");
                    assert!(st.drops.subnet_limit > 0);
                    assert_eq!(st.drops.access_denied, 0);
                }
            }
        }
    }

    #[test]
    fn relays_refuse_circuits_from_denied_nodes() {
        use crate::proto::access::Rule;
        let now = Instant::now();
        let (mut net, addrs, ids) = circuit_net(now);
        for r in 1..=4 {
            net.nodes[r].0.config.access.relay.deny = vec![Rule::Node(ids[0])];
        }
        let (a, e) = (0, 5);
        let p = udp_packet(addrs[a], addrs[e], b"through relays?");
        assert!(matches!(
            net.nodes[a].0.handle_tun_packet(net.now, &p),
            TunOutcome::Nothing
        ));
        let tun = advance(&mut net, 20.0);
        assert!(!tun[e].contains(&p), "a denied source got through");
        let refused: u64 = (1..=4).map(|r| net.nodes[r].0.status().relay.refused).sum();
        assert!(refused > 0);
        assert!(net.nodes[a]
            .0
            .circuits(net.now)
            .circuits
            .iter()
            .all(|c| c.state != "ready"));
        // Another source is still carried.
        let p = udp_packet(addrs[6], addrs[e], b"allowed source");
        net.nodes[6].0.config.routes.default = Policy::Hops(1, 2);
        assert!(matches!(
            net.nodes[6].0.handle_tun_packet(net.now, &p),
            TunOutcome::Nothing
        ));
        let tun = advance(&mut net, 5.0);
        assert!(tun[e].contains(&p), "an allowed source was refused");
    }

    #[test]
    fn relays_whenever_possible_else_direct_and_says_why() {
        // Two nodes, both relays, on the default "balanced" policy: the
        // only relay A knows is the destination itself, so A goes direct.
        let now = Instant::now();
        let ids = identities(2);
        let eps = endpoints(2);
        let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
        let mut net = linked_pair(now, ids, &eps);
        for n in &mut net.nodes {
            n.0.config.routes.default = Policy::Prefer(1, 2);
            n.0.config.roles = ROLE_RELAY_BIT;
        }
        let p = udp_packet(addrs[0], addrs[1], b"direct, for want of relays");
        assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
        let r = net.nodes[0].0.routing_summary();
        assert_eq!(r.default, "1..2 or direct");
        assert_eq!(r.summary, "direct: 0 usable relays, 1 needed");
        assert_eq!(r.direct_fallbacks, 1);
        let c = net.nodes[0].0.circuits(net.now);
        assert!(c.circuits.is_empty());
        assert_eq!(c.no_circuit.len(), 1);
        assert_eq!(c.no_circuit[0].destination, addrs[1]);
        assert_eq!(c.no_circuit[0].outcome, RouteOutcome::Direct);
        assert_eq!(
            (c.no_circuit[0].usable_relays, c.no_circuit[0].needed),
            (0, 1)
        );
        // The reply goes direct too (B's policy is the same).
        let back = udp_packet(addrs[1], addrs[0], b"and back");
        assert_eq!(net.send(1, &back).as_deref(), Some(&back[..]));

        // A strict policy ("private") never goes direct: unreachable.
        net.nodes[0].0.config.routes.default = Policy::Hops(2, 3);
        let now = net.now + Duration::from_secs(2);
        let out = net.nodes[0].0.handle_tun_packet(now, &p);
        let TunOutcome::Reply(icmp) = out else {
            panic!("expected ICMPv6 unreachable");
        };
        let v = Ipv6View::new_checked(icmp).unwrap();
        assert_eq!(v.payload()[0], wire::ICMPV6_DEST_UNREACHABLE);
        let r = net.nodes[0].0.routing_summary();
        assert!(
            r.summary
                .starts_with("unreachable: 0 usable relays, 2 needed"),
            "{}",
            r.summary
        );
        assert_eq!(r.unreachable, 1);
    }

    #[test]
    fn relays_whenever_possible_builds_circuits_when_relays_exist() {
        let now = Instant::now();
        let (mut net, addrs, _) = circuit_net(now);
        net.nodes[0].0.config.routes.default = Policy::Prefer(1, 2);
        let (a, e) = (0, 5);
        let p = udp_packet(addrs[a], addrs[e], b"through relays, by default");
        assert!(matches!(
            net.nodes[a].0.handle_tun_packet(net.now, &p),
            TunOutcome::Nothing
        ));
        let tun = advance(&mut net, 5.0);
        assert!(tun[e].contains(&p), "not delivered");
        let c = net.nodes[a].0.circuits(net.now);
        assert_eq!(c.circuits.len(), 1);
        assert!((1..=2).contains(&c.circuits[0].hops.len()));
        assert!(c.no_circuit.is_empty());
        let summary = net.nodes[a].0.routing_summary().summary;
        assert!(
            summary.starts_with("1 destination through relays"),
            "{summary}"
        );
    }

    #[test]
    fn relays_whenever_possible_answers_a_direct_sender_directly() {
        // E (5) talks to A over a direct link; A, on "relays whenever
        // possible" with relays to spare, answers over that link rather
        // than building a circuit back (which a NAT in front of E could
        // stop). A's own first packet to another node still takes relays.
        let now = Instant::now();
        let (mut net, addrs, _) = circuit_net(now);
        net.nodes[0].0.config.routes.default = Policy::Prefer(1, 2);
        let (a, e) = (0, 5);
        let hello = udp_packet(addrs[e], addrs[a], b"hello over a direct link");
        // Over the link E has to A, or one E makes after a lookup.
        let delivered = match net.send(e, &hello) {
            Some(p) => p == hello,
            None => advance(&mut net, 3.0)[a].contains(&hello),
        };
        assert!(delivered, "not delivered");
        let reply = udp_packet(addrs[a], addrs[e], b"and back the same way");
        assert_eq!(net.send(a, &reply).as_deref(), Some(&reply[..]));
        let c = net.nodes[a].0.circuits(net.now);
        assert!(c.circuits.is_empty(), "a circuit was built for a reply");
        assert_eq!(c.no_circuit.len(), 1);
        assert_eq!(c.no_circuit[0].outcome, RouteOutcome::DirectReply);
        assert_eq!(
            net.nodes[a].0.routing_summary().summary,
            "direct: answering a node that talks to us over a direct link"
        );
    }

    /// A circuit network in one process: A (0) and E (5), four relays
    /// (1..=4) and a node that does not relay (6), all configured with relay
    /// 1 only; A routes everything through 2..3 relays.
    fn circuit_net(now: Instant) -> (Net, Vec<Ipv6Addr>, Vec<NodeId>) {
        let ids = identities(7);
        let eps = endpoints(7);
        let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
        let node_ids: Vec<NodeId> = ids.iter().map(|i| i.node_id()).collect();
        let boot = vec![uri(&ids[1], eps[1])];
        let mut nodes = Vec::new();
        for (i, id) in ids.into_iter().enumerate() {
            let relay = (1..=4).contains(&i);
            let mut c = NodeConfig {
                advertise: vec![eps[i]],
                roles: if relay { ROLE_RELAY_BIT } else { 0 },
                ..cfg(if i == 1 { vec![] } else { boot.clone() })
            };
            c.relay.distinct_subnets = false;
            c.relay.enabled = relay;
            if i == 0 {
                c.routes.default = Policy::Hops(2, 3);
            }
            nodes.push((Node::new(id, 1, c, now), eps[i]));
        }
        let mut net = Net { nodes, now };
        net.run();
        (net, addrs, node_ids)
    }

    /// Runs timers and delivery for `secs` of virtual time.
    fn advance(net: &mut Net, secs: f64) -> Vec<Vec<Vec<u8>>> {
        let mut tun = vec![Vec::new(); net.nodes.len()];
        let steps = (secs / 0.25) as usize;
        for _ in 0..steps {
            net.now += Duration::from_millis(250);
            let now = net.now;
            // A node whose endpoint has port 1 is dead: it runs no timers
            // and what it would send is lost.
            for n in net.nodes.iter_mut().filter(|n| n.1.port() != 1) {
                n.0.handle_timeout(now);

                // As the shell does: store the sequence number, then allow it.

                if let Some(s) = n.0.record_seq_wanted(now) {
                    n.0.reserve_record_seq(s);
                }
            }
            for _ in 0..50 {
                let mut moved = false;
                for i in 0..net.nodes.len() {
                    while let Some(t) = net.nodes[i].0.poll_transmit() {
                        if net.nodes[i].1.port() == 1 {
                            continue;
                        }
                        moved = true;
                        let from = net.nodes[i].1;
                        if let Some(j) = net.nodes.iter().position(|(_, a)| *a == t.dst) {
                            if let Some(p) = net.nodes[j].0.handle_datagram(now, from, &t.payload) {
                                tun[j].push(p.to_vec());
                            }
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        tun
    }

    /// Sends from node `from`'s TUN: the datagram (if any) goes out at once.
    fn tun_send(net: &mut Net, from: usize, packet: &[u8]) -> Option<Vec<u8>> {
        let src_ep = net.nodes[from].1;
        let now = net.now;
        let (dst, data) = match net.nodes[from].0.handle_tun_packet(now, packet) {
            TunOutcome::Send(d, p) => (d, p.to_vec()),
            _ => return None,
        };
        let j = net.nodes.iter().position(|(_, a)| *a == dst)?;
        net.nodes[j]
            .0
            .handle_datagram(now, src_ep, &data)
            .map(|p| p.to_vec())
    }

    #[test]
    fn circuit_carries_both_ways_authenticates_the_source_and_heals() {
        let now = Instant::now();
        let (mut net, addrs, ids) = circuit_net(now);
        let (a, e) = (0, 5);
        let p = udp_packet(addrs[a], addrs[e], b"through relays");
        assert!(matches!(
            net.nodes[a].0.handle_tun_packet(net.now, &p),
            TunOutcome::Nothing
        ));
        let tun = advance(&mut net, 3.0);
        assert!(tun[e].contains(&p), "E got the packet through the circuit");
        let report = net.nodes[a].0.circuits(net.now);
        let c = &report.circuits[0];
        assert_eq!(c.state, "ready");
        assert!((2..=3).contains(&c.hops.len()), "{:?}", c.hops);
        assert!(!c.hops.contains(&ids[a]) && !c.hops.contains(&ids[e]));
        // Only nodes with the relay role: never the bystander, which A
        // knows as well as the relays.
        assert!(c.hops.iter().all(|h| ids[1..=4].contains(h)));
        assert!(net.nodes[a].0.dht.find_local(&ids[6].0).is_some());
        assert!(
            report.pool <= 4,
            "pool of {} holds a non-relay",
            report.pool
        );
        // Nothing went over a direct link between A and E (the DHT may
        // have made one while joining; application traffic never uses it).
        let direct = |net: &Net, from: usize, to: usize| {
            net.nodes[from]
                .0
                .status()
                .links
                .iter()
                .filter(|l| l.address == Some(addrs[to]))
                .map(|l| l.counters.tx_packets)
                .sum::<u64>()
        };
        assert_eq!(direct(&net, a, e), 0);
        // E knows who talks to it; replies go back on the circuit.
        let inbound = net.nodes[e].0.circuits(net.now).inbound;
        assert_eq!(inbound.len(), 1);
        assert_eq!(inbound[0].source, Some(addrs[a]));
        let reply = udp_packet(addrs[e], addrs[a], b"and back");
        assert!(tun_send(&mut net, e, &reply).is_none(), "not a direct link");
        let tun = advance(&mut net, 0.5);
        assert!(
            tun[a].contains(&reply),
            "the reply came back on the circuit"
        );
        assert_eq!(direct(&net, e, a), 0);
        assert!(net.nodes[a].0.circuits(net.now).circuits[0].rx_bytes > 0);
        // No relay holds both ends.
        for r in 1..=4 {
            for rel in net.nodes[r].0.circuits(net.now).relayed {
                let ends = [rel.prev, rel.next];
                assert!(
                    !(ends.contains(&Some(ids[a])) && ends.contains(&Some(ids[e]))),
                    "relay {r} saw both ends"
                );
            }
        }
        // A packet with a forged inner source is dropped at E.
        let forged = udp_packet(addrs[2], addrs[e], b"I am relay 2");
        assert!(net.nodes[a].0.inject_data(net.now, addrs[e], &forged));
        let tun = advance(&mut net, 0.5);
        assert!(!tun[e].contains(&forged));
        assert_eq!(net.nodes[e].0.status().relay.drops.spoofed_source, 1);
        // Kill the first relay of the circuit: probes notice, a new circuit
        // carries traffic again within 10 s.
        let dead = c.hops[0];
        let k = ids.iter().position(|i| *i == dead).unwrap();
        // Its datagrams now go nowhere, and nothing reaches it.
        net.nodes[k].1 = "198.18.9.9:1".parse().unwrap();
        let mut healed = None;
        for step in 0..40 {
            let p = udp_packet(addrs[a], addrs[e], format!("probe {step}").as_bytes());
            assert!(tun_send(&mut net, a, &p).is_none(), "never a direct link");
            let tun = advance(&mut net, 0.25);
            if step > 0 && tun[e].contains(&p) {
                healed = Some(step as f64 * 0.25);
                break;
            }
        }
        let healed = healed.expect("traffic resumed");
        println!("traffic resumed {healed} s after the relay died");
        assert!(healed <= 10.0, "resumed after {healed} s");
        let c2 = &net.nodes[a].0.circuits(net.now).circuits[0];
        assert!(
            !c2.hops.contains(&dead),
            "new circuit avoids the dead relay"
        );
    }

    /// A destination the source knows nothing of is looked up by the last
    /// relay of the circuit, never by the source itself.
    #[test]
    fn unknown_destination_is_looked_up_through_the_circuit() {
        let now = Instant::now();
        let (mut net, addrs, ids) = circuit_net(now);
        let (a, e) = (0, 5);
        // A forgets E and drops any link to it: only the relays know E.
        if let Some(&i) = net.nodes[a].0.by_addr.get(&addrs[e]) {
            net.nodes[a].0.remove_link(i);
        }
        net.nodes[a].0.dht.forget(&ids[e]);
        assert!(net.nodes[a].0.local_record(&addrs[e]).is_none());
        let p = udp_packet(addrs[a], addrs[e], b"who is E?");
        assert!(matches!(
            net.nodes[a].0.handle_tun_packet(net.now, &p),
            TunOutcome::Nothing
        ));
        let tun = advance(&mut net, 3.0);
        assert!(tun[e].contains(&p), "E got the packet");
        let c = &net.nodes[a].0.circuits(net.now).circuits[0];
        assert_eq!(c.destination_node, Some(ids[e]));
        // A held no record of E, so the last relay fetched it (above); no
        // application packet went over a direct link. (DHT upkeep may still
        // link the two: E's own refreshes can reach A.)
        let st = net.nodes[a].0.status();
        let direct: u64 = st
            .links
            .iter()
            .filter(|l| l.address == Some(addrs[e]))
            .map(|l| l.counters.tx_packets)
            .sum();
        assert_eq!(direct, 0);
    }

    #[test]
    fn forged_expired_replayed_and_oversized_records_are_refused_and_counted() {
        let now = Instant::now();
        let ids = identities(3);
        let eps = endpoints(2);
        let addr_b = ids[1].overlay_address();
        let x = &ids[2];
        let ext = |expires| RecordExt {
            expires: Some(expires),
            endpoints: vec![eps[0]],
            roles: 0,
            onion_key: None,
        };
        let good = x.sign_record_with(10, &ext(1_800_003_600)).to_bytes();
        let mut forged = good.clone();
        let n = forged.len();
        forged[n - 5] ^= 1;
        let expired = x.sign_record_with(11, &ext(1_799_000_000)).to_bytes();
        let replayed = x.sign_record_with(5, &ext(1_800_003_600)).to_bytes();
        let oversized = vec![1u8; crate::proto::identity::MAX_RECORD_LEN + 100];
        let mut net = linked_pair(now, ids, &eps);
        let idx = net.nodes[0].0.by_addr[&addr_b];
        for (i, r) in [good, forged, expired, replayed, oversized]
            .into_iter()
            .enumerate()
        {
            let m = super::super::dht::Msg::Store {
                txid: i as u32,
                node: true,
                record: r,
            };
            net.nodes[0]
                .0
                .send_control(idx, MSG_DHT, &m.to_bytes(), false);
            net.run();
        }
        let d = net.nodes[1].0.status().dht;
        assert_eq!(
            (
                d.forged_records,
                d.expired_records,
                d.stale_records,
                d.oversized_records
            ),
            (1, 1, 1, 1),
            "{d:?}"
        );
    }

    #[test]
    fn configured_uri_with_foreign_key_gets_no_traffic() {
        let now = Instant::now();
        let ids = identities(3);
        let eps = endpoints(2);
        let victim = ids[1].node_id();
        // A's URI names the victim's node ID but the attacker's link key.
        let forged = PeerUri {
            node_id: victim,
            link_key: ids[2].link_public(),
            endpoint: Some(eps[1]),
        };
        let mut it = ids.into_iter();
        let a = Node::new(it.next().unwrap(), 1, cfg(vec![forged]), now);
        let _victim = it.next();
        let attacker = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
        let mut net = Net {
            nodes: vec![(a, eps[0]), (attacker, eps[1])],
            now,
        };
        // A program on A sends to the victim's address before and after the
        // handshake with the attacker completes.
        let addr_a = net.nodes[0].0.address();
        let secret = udp_packet(addr_a, victim.overlay_address(), b"secret for the victim");
        let _ = net.nodes[0].0.handle_tun_packet(now, &secret);
        let delivered = net.run();
        let _ = net.nodes[0].0.handle_tun_packet(now, &secret);
        let delivered2 = net.run();
        assert!(
            delivered.iter().chain(&delivered2).all(|t| t.is_empty()),
            "nothing reaches the attacker"
        );
        let st = net.nodes[0].0.status();
        assert!(st.links.iter().all(|l| l.state != LinkState::Up));
        assert!(st.links.iter().map(|l| l.drops.bad_record).sum::<u64>() >= 1);
    }

    #[test]
    fn handshake_flood_from_one_source_is_capped() {
        let now = Instant::now();
        let target = Identity::generate(&mut OsRng).unwrap();
        let target_uri = uri(&target, "198.18.0.1:7300".parse().unwrap());
        let mut node = Node::new(target, 1, cfg(vec![]), now);
        // A real node's initiations, replayed many times from one address.
        let attacker = Identity::generate(&mut OsRng).unwrap();
        let mut a = Node::new(attacker, 1, cfg(vec![target_uri]), now);
        let init = a.poll_transmit().unwrap().payload;
        let from: SocketAddr = "198.18.0.66:1".parse().unwrap();
        let (mut responses, mut cookies) = (0, 0);
        for _ in 0..100 {
            node.handle_datagram(now, from, &init);
            while let Some(t) = node.poll_transmit() {
                match t.payload[0] {
                    2 => responses += 1,
                    3 => cookies += 1,
                    _ => {}
                }
            }
        }
        // At most the per-source budget reached the Diffie-Hellman work; the
        // rest were refused or asked for a cookie.
        let burst = SOURCE_LIMIT.burst as u64;
        assert!(responses <= burst, "{responses} responses");
        let d = node.status().drops;
        assert!(d.rate_limited >= 100 - burst, "{d:?} {cookies}");
    }

    #[test]
    fn over_budget_source_gets_through_with_a_cookie() {
        let now = Instant::now();
        let ids = identities(3);
        let ep_a: SocketAddr = "198.18.0.1:7300".parse().unwrap();
        let ep_b: SocketAddr = "198.18.0.2:7300".parse().unwrap();
        let b_uri = uri(&ids[1], ep_b);
        let mut it = ids.into_iter();
        let mut a = Node::new(it.next().unwrap(), 1, cfg(vec![b_uri.clone()]), now);
        let mut b = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
        let mut c = Node::new(it.next().unwrap(), 1, cfg(vec![b_uri]), now);
        // Someone forging a's address spends a's whole handshake budget.
        let forged = c.poll_transmit().unwrap().payload;
        for _ in 0..SOURCE_LIMIT.burst {
            b.handle_datagram(now, ep_a, &forged);
        }
        while b.poll_transmit().is_some() {}
        // a's own initiation now gets a cookie challenge, not a refusal...
        let init = a.poll_transmit().unwrap().payload;
        assert!(b.handle_datagram(now, ep_a, &init).is_none());
        let challenge = b.poll_transmit().unwrap();
        assert_eq!((challenge.dst, challenge.payload[0]), (ep_a, 3));
        assert!(a.handle_datagram(now, ep_b, &challenge.payload).is_none());
        // ...and its next initiation, carrying the cookie, is answered.
        let link = a.links.values_mut().next().unwrap();
        let retry = match link.tunn.format_handshake_initiation(&mut a.bufs.a, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        b.handle_datagram(now, ep_a, &retry);
        let answer = b.poll_transmit().unwrap();
        assert_eq!(answer.payload[0], 2, "handshake response");
    }

    #[test]
    fn no_record_is_signed_with_a_sequence_number_not_yet_stored() {
        let now = Instant::now();
        let mut n = Node::new(identities(1).pop().unwrap(), 5, cfg(vec![]), now);
        assert_eq!(n.record().seq, 5);
        // Only 5 is stored: the first re-signing (due at once: the record
        // carries no endpoints yet and expires within half its TTL once 13 h
        // pass) must wait for the shell.
        let later = now + Duration::from_secs(13 * 3600);
        n.handle_timeout(later);
        assert_eq!(n.record().seq, 5, "signed past the stored limit");
        let want = n.record_seq_wanted(later).expect("asks for a limit");
        assert!(want > 1_800_000_000 + 13 * 3600, "{want}");
        n.reserve_record_seq(want);
        let t = later + Duration::from_millis(250);
        n.handle_timeout(t);
        let seq = n.record().seq;
        assert!(seq > 5 && seq <= want, "seq {seq}, limit {want}");
        // With an hour of numbers in hand it asks for nothing more.
        assert_eq!(n.record_seq_wanted(t), None);
        assert_eq!(n.poll_timeout(), t + TICK);
    }

    #[test]
    fn garbage_datagrams_are_counted_not_fatal() {
        let now = Instant::now();
        let mut n = Node::new(Identity::generate(&mut OsRng).unwrap(), 1, cfg(vec![]), now);
        let from: SocketAddr = "198.18.0.9:1".parse().unwrap();
        let mut x: u64 = 88172645463325252;
        for i in 0..50_000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [0, 1, 4, 32, 64, 92, 148, 200, 1500][i % 9];
            let mut d: Vec<u8> = (0..len).map(|j| (x >> (j % 57)) as u8).collect();
            if len >= 4 {
                d[0] = (i % 5) as u8;
                d[1..4].fill(0);
            }
            assert!(n.handle_datagram(now, from, &d).is_none());
        }
        assert!(n
            .handle_datagram(now, from, &vec![4u8; MAX_DATAGRAM + 1])
            .is_none());
        let d = n.status().drops;
        assert!(
            d.malformed + d.unknown_session + d.handshake_rejected + d.rate_limited > 40_000,
            "{d:?}"
        );
        // One source: its budget, and then nothing more got any work.
        assert!(d.rate_limited > 49_000, "{d:?}");
    }
}
