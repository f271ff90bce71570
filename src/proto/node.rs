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
//!
//! This file holds the configuration and report types, the `Node` itself,
//! the TUN side (framing, compression, ICMPv6), the inner packets of a link
//! and the timers. Its other parts are `impl Node` blocks in child modules
//! over the same fields: `links` (link table, handshake gate, datagrams in),
//! `hello` (records between neighbours, control framing), `lookups`
//! (address resolution, links on demand, DHT operations), `report`
//! (status, peers), `circuits` (onion circuits), and `own_record` and
//! `tally`, which keep state of their own.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519;
use serde::Serialize;

use super::access::AccessConfig;
use super::batch::SendBatch;
use super::compress::Governor;
use super::dht::{Contact, Dht, DhtStats, Goal, LookupDone, Outcome, Refresh, Source, ValueInfo};
use super::identity::{is_overlay_address, Identity, NodeId, NodeRecord};
use super::limit::Limit;
use super::message::{self, Reassembler, Segmenter};
use super::records::{node_info, value_target, RsaRecords, SignedValue};
use super::route::{Policy, RoutePolicy};
use super::uri::PeerUri;
use super::wire::{self, Ipv6View, IPV6_MIN_MTU, MAX_PACKET};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

mod channel;
mod circuits;
mod control;
mod gate;
mod handoff;
mod hello;
pub mod host;
mod links;
mod lookups;
mod own_record;
pub mod plane;
mod report;
mod resolve;
mod table;
mod tally;

use channel::{Delivery, Fit, Sealed};
pub use circuits::{
    CellDrops, CircuitView, CircuitsReport, InboundView, RelayConfig, RelayStats, RelayedView,
    RouteNoteView, RouteOutcome, RoutingSummary, SignJob, Signing, TrafficConfig, CIRCUIT_MTU,
    CREATE_LIMIT,
};
pub use host::Host;
use table::{Link, LinkTable, Verified};
pub use tally::ClosedLinks;

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
/// The core's timer grid: [`Node::poll_timeout`] is this long after the last tick.
pub const TICK: Duration = Duration::from_millis(250);

/// Whether a timer sweep is done ([`Node::handle_timeout_some`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Every link was visited, and the DHT's and circuits' timers ran.
    Done,
    /// Links are left: call again.
    More,
}

/// What a link's timers decided ([`Node::link_timers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkFate {
    Keep,
    Remove,
}
/// DHT messages waiting for a link to come up, per link.
const MAX_PENDING_CTL: usize = 32;
/// Results of control-API lookups kept for collection.
const MAX_API_RESULTS: usize = 64;

/// Least time between two initiations sent at once for a cookie reply.
const COOKIE_RETRY: Duration = Duration::from_secs(1);
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
/// Links from unconfigured nodes whose record has not been verified yet:
/// at least this many, else a quarter of `max_links`.
const MIN_UNVERIFIED_LINKS: usize = 64;
/// An unverified link this young is not pushed out for a newer one: its
/// record exchange (a round trip, or a hello repeated after
/// [`hello::HELLO_INTERVAL`]) is likely still under way, and pushing it out would
/// make its node start over. A new link is refused instead.
const UNVERIFIED_GRACE: Duration = Duration::from_secs(3);
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
    /// Pause compression while the data path, not the link, is the limit
    /// (see `compress::Governor`); false compresses whenever it saves bytes.
    pub adaptive: bool,
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

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    /// Where to.
    pub dst: SocketAddr,
    /// What.
    pub payload: Vec<u8>,
}

/// Where a packet read from the TUN went, inside the node: sealed into the
/// send batch, answered, or nowhere.
enum Routed {
    /// Sealed into the send batch ([`Node::take_output`]), as its last
    /// datagram.
    Queued,
    /// Write `bufs.b[..n]` back to the TUN (an ICMPv6 error for the sender).
    Reply(usize),
    /// Nothing to send now (dropped and counted, or queued behind a handshake).
    Nothing,
}

/// What to do with a packet read from the TUN ([`Node::handle_tun_packet`]).
#[derive(Debug)]
pub enum TunOutcome<'a> {
    /// Send this datagram.
    Send(SocketAddr, &'a [u8]),
    /// Write this packet back to the TUN (an ICMPv6 error for the sender).
    Reply(&'a [u8]),
    /// Nothing to send now (dropped and counted, or queued behind a handshake).
    Nothing,
}

/// Where the packet for the TUN that a datagram carried lies
/// ([`Node::receive`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered<'a> {
    /// In the caller's buffer, `buf[..n]`: decrypted there and used as it
    /// is (an uncompressed packet from a neighbour, the common case).
    InPlace(usize),
    /// Rebuilt by the node (decompressed, unwrapped from a raw frame, or a
    /// circuit's DATA): copy it.
    Rebuilt(&'a [u8]),
}

/// [`Delivered`] without the borrow: a rebuilt packet is `bufs.b[..n]`.
#[derive(Clone, Copy)]
enum Inner {
    InPlace(usize),
    Rebuilt(usize),
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
    /// How busy the data path is, and whether that paused compression.
    pub data_path: DataPathStatus,
}

/// The data path's load as the shell reported it ([`Node::report_data_path_busy`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DataPathStatus {
    /// Share of recent time the data path spent working rather than
    /// waiting for packets, in per cent (smoothed).
    pub busy_percent: u16,
    /// Compression is paused: the data path, not the link, is the limit.
    pub compression_paused: bool,
    /// Times compression paused since start.
    pub compression_pauses: u64,
    /// Times since start the data path waited over [`LONG_LOCK_WAIT`] for
    /// the node (held by the timer, a control request, ...), as the shell
    /// reported them ([`Node::note_data_lock_wait`]).
    pub long_lock_waits: u64,
    /// The longest such wait since start, in microseconds.
    pub longest_lock_wait_us: u64,
    /// Links handed to the data plane (none when the node uses none).
    pub plane_links: u64,
    /// Circuits this node relays or ends whose cells the data plane
    /// passes on or opens.
    pub plane_circuits: u64,
    /// Handed links per data plane (data thread), when there are planes.
    pub worker_links: Vec<u64>,
}

/// A wait of the data path for the node counted in
/// [`DataPathStatus::long_lock_waits`].
pub const LONG_LOCK_WAIT: Duration = Duration::from_millis(1);

/// The node's scratch buffers, kept apart from the links so both can be
/// borrowed at once.
struct Buffers {
    a: Vec<u8>,
    b: Vec<u8>,
    ctl: Vec<u8>,
    /// A cell being built, or one that ends here.
    cell: Vec<u8>,
    /// Where [`Node::handle_datagram`] (the simulator's and the tests'
    /// entry, which pass no buffer) has a datagram decrypted: the caller's
    /// buffer of [`Node::receive`].
    alt: Vec<u8>,
    /// lz4's hash table, reused for every packet compressed.
    lz4: wire::Lz4Table,
}

/// The protocol core of one node.
pub struct Node {
    /// Identity, the record we present, endpoint reports, re-signing.
    own: own_record::OwnRecord,
    address: Ipv6Addr,
    config: NodeConfig,
    /// Links by session index, key and address.
    links: LinkTable,
    /// Per-source budgets, MAC and cookie checks for unauthenticated work.
    gate: gate::Gate,
    transmits: VecDeque<Transmit>,
    /// Datagrams sealed straight into a GSO batch: packets from the TUN,
    /// cells. The data path swaps it out ([`Node::take_output`]).
    out: SendBatch,
    /// Payload buffers of transmits the shell sent and handed back
    /// ([`Node::recycle`]): a relayed cell reuses one instead of allocating.
    spare: Vec<Vec<u8>>,
    drops: Drops,
    /// Whether compression pays now (paused while the data path is the limit).
    compression: Governor,
    /// What removed links had counted.
    bufs: Buffers,
    last_icmp: Option<Instant>,
    /// The `now` of the last [`Node::handle_timeout`], or of [`Node::new`].
    last_timer: Instant,
    /// The data path's waits for the node ([`Node::note_data_lock_wait`]):
    /// those over [`LONG_LOCK_WAIT`], and the longest.
    long_lock_waits: u64,
    longest_lock_wait: Duration,
    /// A timer sweep is under way ([`Node::handle_timeout_some`]), and the
    /// links it has still to visit.
    sweeping: bool,
    sweep: Vec<u32>,
    segmenter: Segmenter,
    fragment_id: u32,
    dht: Dht<RsaRecords>,
    /// Address resolution: lookups under way and their packets, failures,
    /// stale records, the lookup rate.
    resolver: resolve::Resolver,
    purposes: HashMap<u64, Purpose>,
    api_results: HashMap<u64, LookupDone>,
    /// Packets for the TUN produced outside a TUN read (ICMPv6 errors for
    /// failed lookups), drained with [`Node::poll_tun_write`].
    tun_out: VecDeque<Vec<u8>>,
    /// What goes to the data plane, if the node uses one.
    handoff: handoff::Handoff,
    joined: bool,
    value_seq: u64,
    last_lan: Option<Instant>,
    rng: ChaCha20Rng,
    circ: circuits::Circuits,
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

/// Spare payload buffers kept for reuse.
pub const MAX_SPARE: usize = 256;
/// Largest buffer kept (a full datagram and then some).
const SPARE_CAPACITY: usize = 4096;

/// `data` in a buffer from `spare` (or a new one when none is left).
fn reuse(spare: &mut Vec<Vec<u8>>, data: &[u8]) -> Vec<u8> {
    let mut v = spare.pop().unwrap_or_default();
    v.clear();
    v.extend_from_slice(data);
    v
}

/// The next of `transmits`, or once they are sent, every datagram of `out`
/// copied into buffers from `spare` (see [`Node::poll_transmit`]).
fn next_transmit(
    transmits: &mut VecDeque<Transmit>,
    out: &mut SendBatch,
    spare: &mut Vec<Vec<u8>>,
) -> Option<Transmit> {
    if transmits.is_empty() && !out.is_empty() {
        for (dst, d) in out.datagrams() {
            let payload = reuse(spare, d);
            transmits.push_back(Transmit { dst, payload });
        }
        out.clear();
    }
    transmits.pop_front()
}

/// Appends `transmits` to `others` and swaps the sealed batch `out` with
/// the empty `batch` (see [`Node::take_output`]).
fn swap_output(
    transmits: &mut VecDeque<Transmit>,
    out: &mut SendBatch,
    batch: &mut SendBatch,
    others: &mut Vec<Transmit>,
) {
    others.extend(transmits.drain(..));
    let max = batch.max_segments();
    batch.clear();
    std::mem::swap(out, batch);
    out.set_max_segments(max);
    batch.set_max_segments(max);
}

/// What boringtun adds to a packet it seals (header and tag).
const SEAL_OVERHEAD: usize = 32;
/// The largest message boringtun writes that is not sealed data (a
/// handshake initiation, sent when the link has no session).
const SEAL_MIN_OUT: usize = 148;

/// Most bytes the node's send batch holds between two takes by the data
/// path (the simulator and the tests drain it through `poll_transmit`).
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Why [`Node::dht_put`] refused a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PutError {
    /// Out of the value limits (namespace, key, size, lifetime).
    #[error(transparent)]
    Value(#[from] super::records::ValueError),
    /// The DHT refused the signed record (e.g. storage full for the key).
    #[error(transparent)]
    Record(#[from] super::dht::RecordError),
}

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
        let circ = circuits::Circuits::new(&mut rng, now, config.relay.bandwidth);
        let address = identity.overlay_address();
        let public = x25519::PublicKey::from(identity.link_secret());
        let own = own_record::OwnRecord::new(
            identity,
            record_seq,
            config.unix_time,
            config.advertise.clone(),
            own_record::Fixed {
                roles: config.roles,
                onion_key: circ.onion_public(),
            },
        );
        let dht = Dht::new(
            own_contact(own.record(), own.bytes()),
            RsaRecords::default(),
            now,
            config.unix_time,
            dht_seed,
        );
        let mut node = Node {
            dht,
            own,
            resolver: resolve::Resolver::new(now),
            purposes: HashMap::new(),
            api_results: HashMap::new(),
            tun_out: VecDeque::new(),
            handoff: handoff::Handoff::default(),
            joined: false,
            value_seq: 0,
            last_lan: None,
            rng,
            circ,
            address,
            links: LinkTable::new(index_seed),
            gate: gate::Gate::new(&public, (rng_key.0, rng_key.1)),
            transmits: VecDeque::new(),
            out: SendBatch::default(),
            spare: Vec::new(),
            drops: Drops::default(),
            compression: Governor::default(),
            bufs: Buffers {
                a: vec![0u8; 2 * MAX_PACKET + 1024],
                b: vec![0u8; 2 * MAX_PACKET + 1024],
                ctl: Vec::with_capacity(2048),
                cell: vec![0u8; onion_cell_max()],
                alt: vec![0u8; 2 * MAX_PACKET + 1024],
                lz4: wire::Lz4Table::default(),
            },
            last_icmp: None,
            last_timer: now,
            long_lock_waits: 0,
            longest_lock_wait: Duration::ZERO,
            sweeping: false,
            sweep: Vec::new(),
            segmenter: Segmenter::new(index_seed),
            fragment_id: index_seed,
            config,
        };
        let peers = node.config.peers.clone();
        for p in peers {
            if p.uri.node_id == node.own.record().node_id() {
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
                node.links.name_addr(p.uri.node_id.overlay_address(), idx);
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
        self.own.record().node_id()
    }

    /// The record this node presents to its neighbours.
    pub fn record(&self) -> &NodeRecord {
        self.own.record()
    }

    /// Next datagram to send, one at a time (the simulator, the tests, and
    /// the shell's threads other than the data path): what the node queued
    /// on its own (handshakes, cookie replies), then what it sealed into
    /// its send batch (cells, hellos, packets), each copied into a buffer
    /// of its own. Hand its payload back with [`Node::recycle`] once it is
    /// sent. The data path takes the batch whole ([`Node::take_output`]).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        next_transmit(&mut self.transmits, &mut self.out, &mut self.spare)
    }

    /// Takes back a sent transmit's payload buffer for reuse (at most
    /// [`MAX_SPARE`] are kept).
    pub fn recycle(&mut self, payload: Vec<u8>) {
        if self.spare.len() < MAX_SPARE && payload.capacity() <= SPARE_CAPACITY {
            self.spare.push(payload);
        }
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
        self.own.seq_wanted(self.dht.unix(now))
    }

    /// Tells the node that record sequence numbers up to `limit` are stored
    /// durably and may be used.
    pub fn reserve_record_seq(&mut self, limit: u64) {
        self.own.reserve_seq(limit);
    }

    /// Tells the node the kernel's path MTU towards an endpoint.
    pub fn set_path_mtu(&mut self, endpoint: SocketAddr, underlay_mtu: usize) {
        let inner = link_mtu(underlay_mtu, ipv6_underlay(&endpoint));
        let mtu = inner.min(self.config.mtu);
        self.plane_tell(plane::ToPlane::SetMtu(endpoint, mtu));
        for link in self.links.values_mut() {
            if link.chan.endpoint == Some(endpoint) {
                let mtu = inner.min(self.config.mtu);
                if mtu != link.chan.mtu {
                    tracing::info!(%endpoint, underlay_mtu, link_mtu = mtu, "path MTU changed");
                    link.chan.mtu = mtu;
                }
            }
        }
    }

    /// Handles one packet read from the TUN and returns the datagram it
    /// became, if any (one at a time: what the simulator and the tests
    /// use). The data path uses [`Node::send_tun_packet`].
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) -> TunOutcome<'_> {
        match self.route_tun(now, packet) {
            Routed::Queued => match self.out.pop_last() {
                Some((dst, d)) => TunOutcome::Send(dst, d),
                None => TunOutcome::Nothing,
            },
            Routed::Reply(n) => TunOutcome::Reply(&self.bufs.b[..n]),
            Routed::Nothing => TunOutcome::Nothing,
        }
    }

    /// Handles one packet read from the TUN on the data path: the datagram
    /// it becomes is sealed straight into the send batch
    /// ([`Node::take_output`]). Returns a packet to write back to the TUN
    /// (an ICMPv6 error), if any.
    pub fn send_tun_packet(&mut self, now: Instant, packet: &[u8]) -> Option<&[u8]> {
        match self.route_tun(now, packet) {
            Routed::Reply(n) => Some(&self.bufs.b[..n]),
            Routed::Queued | Routed::Nothing => None,
        }
    }

    /// What the data path sends after a batch of input, in the order to
    /// send it: appended to `others`, the datagrams the node queued on
    /// their own (boringtun's handshake responses and the packets that
    /// waited for a handshake, such as the initiator's first hello; hand
    /// their payloads back with [`Node::recycle`]); swapped into `batch`
    /// (which must be empty, i.e. sent), what it sealed into its send
    /// batch (packets from the TUN, cells, hellos and other control
    /// messages). The node's next batch takes `batch`'s run limit. Call it
    /// in the same lock hold as the input: between two such calls,
    /// [`Node::poll_transmit`] would hand the batch out one datagram at a
    /// time.
    pub fn take_output(&mut self, batch: &mut SendBatch, others: &mut Vec<Transmit>) {
        swap_output(&mut self.transmits, &mut self.out, batch, others);
    }

    fn route_tun(&mut self, now: Instant, packet: &[u8]) -> Routed {
        let Ok(view) = Ipv6View::new_checked(packet) else {
            self.drops.tun_malformed += 1;
            return Routed::Nothing;
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
        let Some(link) = self.links.for_addr_mut(&dst) else {
            return self.tun_miss(now, view);
        };
        link.chan.last_used = now;
        match link.chan.fit(packet.len(), link.verified.is_some()) {
            Fit::Fits => {}
            Fit::Fragment(mtu) => {
                self.fragment_id = self.fragment_id.wrapping_add(1);
                let id = self.fragment_id;
                let mut frags = Vec::new();
                if wire::fragment(view, mtu, id, |f| frags.push(f.to_vec())) {
                    // Each fragment is sealed into the batch.
                    for f in frags {
                        let _ = self.route_tun(now, &f);
                    }
                } else if let Some(l) = self.links.for_addr_mut(&dst) {
                    l.drops.too_big += 1;
                }
                return Routed::Nothing;
            }
            Fit::TooBig(mtu) => {
                link.drops.too_big += 1;
                return self.icmp_reply(now, view, wire::ICMPV6_PACKET_TOO_BIG, 0, mtu);
            }
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
            return Routed::Nothing;
        }
        if link.chan.handed() {
            let index = link.index;
            self.plane_send(now, index, dst, packet);
            return Routed::Nothing;
        }
        let paused = self.config.compression.adaptive && self.compression.paused();
        let lz4 = (!paused).then_some(&mut self.bufs.lz4);
        match link
            .chan
            .seal_app(view, lz4, &mut self.bufs.b, &mut self.out)
        {
            Sealed::Queued => Routed::Queued,
            Sealed::Held => Routed::Nothing,
            Sealed::Failed => {
                link.drops.send_failed += 1;
                Routed::Nothing
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
    ) -> Routed {
        if let Some(t) = self.last_icmp {
            if now.saturating_duration_since(t) < ICMP_INTERVAL {
                return Routed::Nothing;
            }
        }
        match wire::icmpv6_error(view, ty, code, param, &mut self.bufs.b) {
            Some(n) => {
                self.last_icmp = Some(now);
                Routed::Reply(n)
            }
            None => Routed::Nothing,
        }
    }

    /// What a link brought, decrypted into `buf[..n]`: a cell, a control
    /// message or an application packet for the TUN.
    fn handle_inner(
        &mut self,
        now: Instant,
        index: u32,
        buf: &mut [u8],
        n: usize,
    ) -> Option<Inner> {
        if let Ok(view) = Ipv6View::new_checked(&buf[..n]) {
            if let Some((MSG_CELL, body)) = wire::control_of(view) {
                // Cells are fixed-size and never segmented: the hot path.
                // A relay peels or adds its layer where the cell was
                // decrypted and sends it on from there (no copy).
                let len = body.len();
                if len > self.bufs.cell.len() {
                    self.circ_bad_size();
                    return None;
                }
                let link = self.links.get_mut(&index)?;
                link.chan.last_used = now;
                let out = self.handle_cell(now, index, &mut buf[..wire::CONTROL_BODY + len]);
                return out.map(Inner::Rebuilt);
            }
        }
        let control = match Ipv6View::new_checked(&buf[..n]) {
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
        let link = self.links.get_mut(&index)?;
        let peer = link.verified.as_ref().map(|v| v.address);
        match link
            .chan
            .deliver(now, &buf[..n], peer, self.address, &mut self.bufs.b)
        {
            Delivery::InPlace(n) => Some(Inner::InPlace(n)),
            Delivery::Rebuilt(n) => Some(Inner::Rebuilt(n)),
            Delivery::Control => None,
            Delivery::Dropped(why) => {
                why.count(&mut link.drops);
                None
            }
        }
    }

    /// Runs timers: WireGuard's (rekey, keepalive, retries), hello repeats,
    /// reconnects of configured peers, pruning of idle unknown links; then
    /// the DHT's and the circuits'. The whole sweep in one call: see
    /// [`Node::handle_timeout_some`] for one in steps.
    pub fn handle_timeout(&mut self, now: Instant) {
        while self.handle_timeout_some(now, usize::MAX) == Sweep::More {}
    }

    /// Runs the timers as [`Node::handle_timeout`] does, visiting at most
    /// `links` links per call, so that the shell can let go of the node
    /// between calls: a sweep over thousands of links takes a millisecond
    /// or more, and packets would wait for all of it. Returns
    /// [`Sweep::More`] until the sweep is done; the DHT's and circuits'
    /// timers run in the call that finishes it. A link made during a sweep
    /// waits for the next one; one removed is skipped.
    pub fn handle_timeout_some(&mut self, now: Instant, links: usize) -> Sweep {
        if !self.sweeping {
            self.sweeping = true;
            self.last_timer = now;
            self.gate.tick();
            self.sweep.clear();
            self.sweep.extend(self.links.indices());
        }
        let mut remove = Vec::new();
        for _ in 0..links.max(1) {
            let Some(index) = self.sweep.pop() else {
                break;
            };
            if self.link_timers(now, index) == LinkFate::Remove {
                remove.push(index);
            }
        }
        for i in remove {
            self.remove_link(now, i);
        }
        if !self.sweep.is_empty() {
            return Sweep::More;
        }
        self.sweeping = false;
        self.dht_timers(now);
        self.circuit_timers(now);
        Sweep::Done
    }

    // ---- discovery: DHT, on-demand links, our record -------------------

    /// A packet for the TUN produced outside a TUN read.
    pub fn poll_tun_write(&mut self) -> Option<Vec<u8>> {
        self.tun_out.pop_front()
    }

    /// The shell's data path says how long it waited for the node before
    /// this call (the node's lock); shown in `status` and the metrics, so
    /// that an operator sees whether control work holds up packets.
    pub fn note_data_lock_wait(&mut self, waited: Duration) {
        if waited > LONG_LOCK_WAIT {
            self.long_lock_waits += 1;
        }
        self.longest_lock_wait = self.longest_lock_wait.max(waited);
    }

    /// The shell reports how busy its data path was over a window (per
    /// mille of the window spent working, not waiting for packets); while
    /// it is the limit, compression pauses (see [`Governor`]).
    pub fn report_data_path_busy(&mut self, busy_permille: u16) {
        let was = self.compression.paused();
        self.compression.report(busy_permille);
        if self.compression.paused() != was {
            let paused = self.config.compression.adaptive && self.compression.paused();
            self.plane_tell(plane::ToPlane::Pause(paused));
            let busy = self.compression.busy_permille() / 10;
            if was {
                tracing::debug!(
                    busy_percent = busy,
                    "compression resumed: the data path waits for packets again"
                );
            } else {
                tracing::debug!(
                    busy_percent = busy,
                    "compression paused: the data path, not the link, is the limit"
                );
            }
        }
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
mod tests;
