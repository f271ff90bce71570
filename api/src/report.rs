//! The node's reports: the answers to `status`, `peers`, `circuits` and
//! `lookup`, field for field as the node writes them. Groups of counters
//! (drops by reason, DHT counters) are maps, so a counter a newer node adds
//! shows up without a new API version.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{NodeId, Preset};

/// Counters by name (`"no_route": 3`, ...), sorted by name.
pub type Counters = BTreeMap<String, u64>;

/// Answer to [`crate::Request::Status`]: the node's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The node's API version (0 from nodes before version 1).
    #[serde(default)]
    pub api: u32,
    /// The node's ID.
    pub node_id: NodeId,
    /// The node's overlay address.
    pub address: Ipv6Addr,
    /// The node's program version.
    pub version: String,
    /// Seconds since the node started.
    pub uptime_secs: f64,
    /// The UDP address it listens on.
    pub listen: SocketAddr,
    /// Its TUN device (None: a relay, which has none).
    pub tun: Option<Tun>,
    /// `node` or `relay`.
    pub role: Role,
    /// The configured security preset.
    pub preset: Preset,
    /// Sequence number of the record in use.
    pub record_seq: u64,
    /// Endpoints published in its record.
    pub endpoints: Vec<SocketAddr>,
    /// DHT counters (`lookups`, `lookups_found`, `forged_records`, ...).
    pub dht: Counters,
    /// Routing-table entries.
    pub table_entries: u64,
    /// Drops not attributable to a link, by reason.
    pub drops: Counters,
    /// Circuits this node built.
    pub circuits: u64,
    /// Relay and circuit-end counters.
    pub relay: RelayStats,
    /// What the default route policy does now and why.
    pub routing: Routing,
    /// Links to neighbours.
    pub links: Vec<Link>,
    /// How busy the data path is, and whether that paused compression
    /// (absent from nodes before it was added).
    #[serde(default)]
    pub data_path: DataPath,
    /// Fields this version of the API does not know (from a newer node).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// A node's TUN device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tun {
    /// Interface name.
    pub name: String,
    /// Its MTU.
    pub mtu: u64,
}

/// What a node is configured as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A full node with a TUN device.
    Node,
    /// A relay: forwards only, no TUN.
    Relay,
}

/// Relay counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStats {
    /// Relaying for others.
    pub enabled: bool,
    /// Circuits carried now (as relay or destination).
    pub circuits: u64,
    /// Circuits carried since start.
    pub circuits_total: u64,
    /// Bytes of cells forwarded as relay.
    pub bytes_forwarded: u64,
    /// Cells forwarded as relay.
    pub cells_forwarded: u64,
    /// CREATE or EXTEND refused.
    pub refused: u64,
    /// Cells dropped, by reason.
    pub drops: Counters,
}

/// The data path's load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPath {
    /// Share of recent time the data path spent working rather than
    /// waiting for packets, in per cent (smoothed).
    pub busy_percent: u16,
    /// Compression is paused: the data path, not the link, is the limit.
    pub compression_paused: bool,
    /// Times compression paused since start.
    pub compression_pauses: u64,
    /// Times since start the data path waited over 1 ms for the node's
    /// lock (held by the timer, a control request, ...).
    #[serde(default)]
    pub long_lock_waits: u64,
    /// The longest such wait since start, in microseconds.
    #[serde(default)]
    pub longest_lock_wait_us: u64,
    /// Links whose packets the data thread seals and opens without the
    /// node (0 from older nodes).
    #[serde(default)]
    pub plane_links: u64,
    /// Circuits this node relays or ends whose cells the data thread
    /// passes on or opens without the node (0 from older nodes).
    #[serde(default)]
    pub plane_circuits: u64,
    /// Links per data thread (`link.workers`): one entry per thread
    /// (empty from older nodes).
    #[serde(default)]
    pub worker_links: Vec<u64>,
    /// Who held the node's lock over 1 ms since start, and how often: the
    /// holds a packet may have waited behind (empty from older nodes).
    #[serde(default)]
    pub long_holds: Vec<LockHolds>,
}

/// Which part of the daemon held the node's lock ([`LockHolds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LockHolder {
    /// The data path, with a batch of packets.
    Data,
    /// The timer: link and circuit timers, the DHT's, re-signing the record.
    Timer,
    /// A control request (`status`, `dht put`, `lookup`, ...).
    Control,
    /// The signing thread, handing a signature back.
    Sign,
    /// Saving the peer store and the DHT values (the snapshot only; the
    /// disk write runs without the lock).
    Store,
    /// LAN discovery.
    Lan,
    /// A path MTU the kernel reported.
    PathMtu,
    /// A metrics scrape.
    Metrics,
}

impl LockHolder {
    /// As `status` and the CLI name it.
    pub fn as_str(self) -> &'static str {
        match self {
            LockHolder::Data => "data",
            LockHolder::Timer => "timer",
            LockHolder::Control => "control",
            LockHolder::Sign => "sign",
            LockHolder::Store => "store",
            LockHolder::Lan => "lan",
            LockHolder::PathMtu => "path_mtu",
            LockHolder::Metrics => "metrics",
        }
    }
}

/// Holds of the node's lock over 1 ms by one holder, since start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolds {
    /// Who held it.
    pub holder: LockHolder,
    /// How many holds lasted over 1 ms.
    pub count: u64,
    /// The longest hold, in microseconds.
    pub longest_us: u64,
}

/// The route policy at work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    /// The default policy (`direct`, `1..2 or direct`, `2..3`).
    pub default: String,
    /// Relays known (the pool paths are drawn from).
    pub pool: u64,
    /// Usable relays as last counted.
    pub usable_relays: u64,
    /// Relays the default policy needs at least (0 for direct).
    pub needed: u8,
    /// Destinations sent direct.
    pub direct_fallbacks: u64,
    /// Destinations unreachable for want of relays.
    pub unreachable: u64,
    /// One line: what the default does now and why.
    pub summary: String,
}

/// The state of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Handshaking or waiting.
    Connecting,
    /// Session up, records not yet exchanged.
    Verifying,
    /// Record verified: traffic flows.
    Up,
    /// Session expired; a configured peer is being retried.
    Down,
}

impl LinkState {
    /// The state's name on the wire (`up`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Verifying => "verifying",
            LinkState::Up => "up",
            LinkState::Down => "down",
        }
    }
}

/// One link to a neighbour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// The link's local index (as in logs).
    pub link: u32,
    /// The neighbour's node ID, once known.
    pub node_id: Option<NodeId>,
    /// The neighbour's overlay address, once known.
    pub address: Option<Ipv6Addr>,
    /// State.
    pub state: LinkState,
    /// Whether it came from the configuration.
    pub configured: bool,
    /// Last known UDP endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last completed handshake.
    pub last_handshake_secs: Option<f64>,
    /// Path MTU.
    pub mtu: u64,
    /// Whether compression is allowed on this link.
    pub compression: bool,
    /// Wire bytes / application bytes sent (1.0: no gain).
    pub tx_compression_ratio: f64,
    /// Wire bytes / application bytes received.
    pub rx_compression_ratio: f64,
    /// Application packets sent.
    pub tx_packets: u64,
    /// Application bytes sent, before compression.
    pub tx_bytes: u64,
    /// Bytes those took after compression.
    pub tx_wire_bytes: u64,
    /// Application packets received.
    pub rx_packets: u64,
    /// Application bytes received, after decompression.
    pub rx_bytes: u64,
    /// Bytes those took on the link.
    pub rx_wire_bytes: u64,
    /// Packets sent compressed.
    pub tx_compressed: u64,
    /// Packets received compressed.
    pub rx_compressed: u64,
    /// Drops on this link, by reason.
    pub drops: Counters,
}

/// Answer to [`crate::Request::Peers`]: the routing table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peers {
    /// The node's API version.
    #[serde(default)]
    pub api: u32,
    /// The node's ID.
    pub node_id: NodeId,
    /// Routing-table entries (replacements included, marked).
    pub entries: Vec<Peer>,
    /// Non-empty buckets.
    pub buckets: u64,
    /// DHT counters.
    pub dht: Counters,
}

/// Where a routing-table entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A configured (bootstrap) peer.
    Config,
    /// The peer store of an earlier run.
    Store,
    /// Heard from on the network.
    Network,
    /// Found by LAN discovery.
    Lan,
}

impl Source {
    /// The source's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Store => "store",
            Source::Network => "network",
            Source::Lan => "lan",
        }
    }
}

/// One routing-table entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    /// Bucket (bits shared with the node's ID).
    pub bucket: u64,
    /// Node ID.
    pub node_id: NodeId,
    /// Overlay address.
    pub address: Ipv6Addr,
    /// Endpoints in its record.
    pub endpoints: Vec<SocketAddr>,
    /// Record sequence number.
    pub seq: u64,
    /// Record expiry, Unix seconds.
    pub expires: u64,
    /// Role bits.
    pub roles: u8,
    /// Where the entry came from.
    pub source: Source,
    /// Seconds since it last talked to the node (None: not in this run).
    pub last_seen_secs: Option<f64>,
    /// Failed requests in a row.
    pub fails: u8,
    /// Waiting in the bucket's replacement cache.
    pub replacement: bool,
    /// State of the node's link to it, if any.
    pub link: Option<LinkState>,
}

/// Answer to [`crate::Request::Circuits`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Circuits {
    /// The node's API version.
    #[serde(default)]
    pub api: u32,
    /// Built here.
    pub circuits: Vec<Circuit>,
    /// Carried as relay.
    pub relayed: Vec<Relayed>,
    /// Ending here.
    pub inbound: Vec<Inbound>,
    /// Relays known.
    pub pool: u64,
    /// What the default route policy does now and why.
    pub routing: Routing,
    /// Destinations without a circuit for want of relays.
    pub no_circuit: Vec<NoCircuit>,
}

/// The state of a circuit built here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Being extended hop by hop.
    Building,
    /// Carrying traffic.
    Ready,
}

/// One circuit built here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Circuit {
    /// Local handle.
    pub id: u64,
    /// Destination overlay address.
    pub destination: Ipv6Addr,
    /// Destination node ID, once known.
    pub destination_node: Option<NodeId>,
    /// Relays in order.
    pub hops: Vec<NodeId>,
    /// Building or ready.
    pub state: CircuitState,
    /// Seconds since the build began.
    pub age_secs: f64,
    /// Application bytes sent.
    pub tx_bytes: u64,
    /// Application bytes received.
    pub rx_bytes: u64,
    /// Largest packet it carries.
    pub mtu: u64,
}

/// A circuit carried as relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relayed {
    /// Previous neighbour.
    pub prev: Option<NodeId>,
    /// Next neighbour (None: not extended).
    pub next: Option<NodeId>,
    /// Seconds since CREATE.
    pub age_secs: f64,
    /// Cell bytes forwarded towards the destination.
    pub fwd_bytes: u64,
    /// Cell bytes forwarded towards the source.
    pub bwd_bytes: u64,
}

/// A circuit ending here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    /// The authenticated source.
    pub source: Option<Ipv6Addr>,
    /// Previous neighbour (the last relay).
    pub prev: Option<NodeId>,
    /// Seconds since CREATE.
    pub age_secs: f64,
    /// Application bytes received.
    pub rx_bytes: u64,
    /// Application bytes sent back.
    pub tx_bytes: u64,
}

/// What happens to packets for a destination without a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOutcome {
    /// Sent direct: too few usable relays.
    Direct,
    /// Sent direct: the destination talks to this node directly.
    DirectReply,
    /// Answered unreachable: too few usable relays.
    Unreachable,
}

/// A destination without a circuit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoCircuit {
    /// Destination overlay address.
    pub destination: Ipv6Addr,
    /// What happens to its packets.
    pub outcome: RouteOutcome,
    /// Usable relays when last counted.
    pub usable_relays: u64,
    /// Relays the policy needs at least.
    pub needed: u8,
    /// Seconds since a packet last went this way.
    pub idle_secs: f64,
}

/// Answer to [`crate::Request::Lookup`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lookup {
    /// Whether the record was found.
    pub found: bool,
    /// Query depth at which the answer came (0: known here).
    pub hops: u32,
    /// Queries sent.
    pub queries: u64,
    /// How long it took, in milliseconds.
    pub elapsed_ms: f64,
    /// Answered from what the node held: no query went out.
    pub already_known: bool,
    /// Not found without asking anyone: nobody to ask.
    pub no_contacts: bool,
    /// The record, when found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<LookupRecord>,
}

/// A node's record as a lookup found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupRecord {
    /// Node ID.
    pub node_id: NodeId,
    /// Overlay address.
    pub address: Ipv6Addr,
    /// Its link (X25519) key, base64url without padding.
    pub link_key: String,
    /// Record sequence number.
    pub seq: u64,
    /// Record expiry, Unix seconds (None: a record without one).
    pub expires: Option<u64>,
    /// Its endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Role bits.
    pub roles: u8,
}
