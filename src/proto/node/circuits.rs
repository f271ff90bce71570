//! Circuits in the node: building them as a source, carrying them as a
//! relay, ending them as a destination. The cell format and the crypto are
//! in [`crate::proto::onion`]; path choice in [`crate::proto::route`].
//!
//! A circuit is built hop by hop (telescoping): CREATE to the first relay
//! over our link to it, then EXTEND cells addressed to the last hop built,
//! which links to the next node and sends it a CREATE of its own. When the
//! destination's record is not known locally, the last relay looks it up in
//! the DHT for us (LOOKUP), so the source never links to the destination or
//! to the nodes nearest it. Then the source authenticates to the
//! destination (AUTH: its record and an RSA signature over the circuit's
//! binding), and packets flow as DATA cells addressed to the destination.
//!
//! A relay holds, per circuit: the link and circuit ID on each side and its
//! layer keys. It learns its neighbours on the circuit and nothing else.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand_core::RngCore;
use serde::Serialize;

use super::{Node, Purpose, TunOutcome, MSG_CELL};
use crate::proto::dht::{Contact, Goal};
use crate::proto::identity::{
    put_endpoint, verify_signature, NodeId, NodeRecord, RecordExt, ROLE_RELAY,
};
use crate::proto::limit::{Limit, Rate};
use crate::proto::onion::{
    self, auth_message, cmd, parse_cell, server_handshake, wrap, ClientHandshake, Forward, HopKeys,
    OnionError, OnionKey, ReplayWindow, CELL_HEADER, CELL_LARGE, CELL_SMALL, CREATED_LEN,
    CREATE_LEN, KIND_CREATE, KIND_CREATED, KIND_DESTROY, KIND_RELAY, MAX_DATA,
};
use crate::proto::route;
use crate::proto::wire::{self, Encoded, Incoming, Ipv6View, IPV6_MIN_MTU};

mod routing;
use routing::{PathInputs, RouteNotes};
pub use routing::{RouteNoteView, RouteOutcome, RoutingSummary};

/// Largest packet a circuit carries (as is; compressed ones may be larger
/// before compression, but the kernel is told this).
pub const CIRCUIT_MTU: usize = MAX_DATA;
/// How often a ready circuit probes each of its hops.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A hop silent this long (probes unanswered) fails the circuit.
const PROBE_DEAD: Duration = Duration::from_millis(3500);
/// A build step (CREATE, EXTEND, LOOKUP, AUTH) that takes longer fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A relay gives an EXTEND this long to complete.
const EXTEND_TIMEOUT: Duration = Duration::from_secs(8);
/// Circuits are replaced after this long (make before break).
const CIRCUIT_LIFETIME: Duration = Duration::from_secs(600);
/// An outbound circuit unused this long is closed.
const OUT_IDLE: Duration = Duration::from_secs(120);
/// A circuit a relay carries with no cell this long is dropped.
const HOP_IDLE: Duration = Duration::from_secs(300);
/// An inbound circuit this quiet no longer carries our replies.
const INBOUND_FRESH: Duration = Duration::from_secs(10);
/// A relay that failed a circuit is avoided this long.
const BAD_FOR: Duration = Duration::from_secs(60);
/// Onion keys rotate this often; the previous one stays valid as long
/// again (records live 24 h, so every live record names one of the two).
const ONION_ROTATE: Duration = Duration::from_secs(24 * 3600);
/// Packets waiting for a circuit to a destination.
const QUEUE: usize = 64;
/// Most circuits this node builds at once (one per destination).
const MAX_OUT: usize = 256;
/// Most circuits a relay carries (each ~2.5 KiB of keys and state: ≤ 10 MiB).
pub const MAX_HOP_CIRCUITS: usize = 4096;
/// Most circuits a relay carries for one neighbour.
pub const MAX_PER_NEIGHBOUR: usize = 512;
/// CREATE cells a relay takes from one neighbour (each costs two X25519
/// operations): a source builds a few circuits every ten minutes, a
/// neighbouring relay passes on the builds of many sources.
pub const CREATE_LIMIT: Limit = Limit {
    per_sec: 20,
    burst: 64,
};
/// Relays kept in the pool.
const POOL_MAX: usize = 256;
/// How often the pool is topped up by a random lookup (faster while small).
const POOL_INTERVAL: Duration = Duration::from_secs(300);
const POOL_INTERVAL_SMALL: Duration = Duration::from_secs(10);
/// Below this the pool counts as small.
const POOL_SMALL: usize = 16;
/// Failed builds in a row before packets to a destination get ICMPv6 ...
const MAX_BUILD_FAILS: u32 = 3;
/// ... for this long.
const FAILED_FOR: Duration = Duration::from_secs(30);

/// Why no circuit was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BuildError {
    /// Too few usable relays for a path.
    NoPath,
    /// This node builds [`MAX_OUT`] circuits already.
    Limit,
    /// No link to the first relay could be made.
    NoLink,
}

/// Relay settings.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Carry circuits for others.
    pub enabled: bool,
    /// Cap on forwarded bytes per second (None: no cap).
    pub bandwidth: Option<u64>,
    /// No two hops (nor a hop and an end) in one IPv4 /16 or IPv6 /48.
    pub distinct_subnets: bool,
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        RelayConfig {
            enabled: true,
            bandwidth: None,
            distinct_subnets: true,
        }
    }
}

/// Traffic shaping on circuits this node builds.
#[derive(Clone, Debug)]
pub struct TrafficConfig {
    /// Noise cells per second per ready circuit (0: none).
    pub noise_rate: f64,
    /// Noise payload sizes, bytes (a small or large cell each).
    pub noise_size: (usize, usize),
    /// Every cell large (no small cells: sizes say nothing).
    pub always_large: bool,
    /// lz4 on circuit payloads.
    pub compress: bool,
}

impl Default for TrafficConfig {
    fn default() -> TrafficConfig {
        TrafficConfig {
            noise_rate: 0.0,
            noise_size: (64, 1200),
            always_large: false,
            compress: true,
        }
    }
}

/// Why cells were dropped (a relay's and an end's view).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CellDrops {
    /// Not one of the cell sizes.
    pub bad_size: u64,
    /// Unknown kind, or a kind that makes no sense where it arrived.
    pub bad_kind: u64,
    /// No such circuit on that link.
    pub unknown_circuit: u64,
    /// GCM tag failed.
    pub forged: u64,
    /// Counter replayed or too old.
    pub replay: u64,
    /// A cell no hop recognised (at the source), or one at a circuit's end
    /// that was not for it.
    pub unrecognised: u64,
    /// Malformed body.
    pub malformed: u64,
    /// DATA whose inner source is not the authenticated source (or not
    /// the destination, on the way back), or not for our address.
    pub spoofed_source: u64,
    /// DATA before authentication.
    pub unauthenticated: u64,
    /// Over the relay bandwidth cap.
    pub over_bandwidth: u64,
    /// Cover traffic (dropped by design).
    pub noise: u64,
    /// CREATE from a neighbour over its build budget ([`CREATE_LIMIT`]),
    /// dropped before any handshake work.
    pub create_limited: u64,
    /// Cells to a link that could not take them.
    pub send_failed: u64,
}

/// Relay counters, as `qgate status` shows them.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RelayStats {
    /// Relaying for others.
    pub enabled: bool,
    /// Circuits carried now (as relay or destination).
    pub circuits: usize,
    /// Circuits carried since start.
    pub circuits_total: u64,
    /// Bytes of cells forwarded as relay.
    pub bytes_forwarded: u64,
    /// Cells forwarded as relay.
    pub cells_forwarded: u64,
    /// CREATE or EXTEND refused (limits, relaying off, unknown onion key).
    pub refused: u64,
    /// Drops.
    pub drops: CellDrops,
}

/// One circuit this node built, as `qgate circuits` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CircuitView {
    /// Local handle.
    pub id: u64,
    /// Destination overlay address.
    pub destination: Ipv6Addr,
    /// Destination node ID, once known.
    pub destination_node: Option<NodeId>,
    /// Relays in order (node IDs).
    pub hops: Vec<NodeId>,
    /// building | ready
    pub state: &'static str,
    /// Seconds since the build began.
    pub age_secs: f64,
    /// Application bytes sent / received.
    pub tx_bytes: u64,
    /// Application bytes received.
    pub rx_bytes: u64,
    /// Largest packet it carries.
    pub mtu: usize,
}

/// A circuit this node carries as relay.
#[derive(Clone, Debug, Serialize)]
pub struct RelayedView {
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
#[derive(Clone, Debug, Serialize)]
pub struct InboundView {
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

/// What `qgate circuits` reports.
#[derive(Clone, Debug, Serialize)]
pub struct CircuitsReport {
    /// Built here.
    pub circuits: Vec<CircuitView>,
    /// Carried as relay.
    pub relayed: Vec<RelayedView>,
    /// Ending here.
    pub inbound: Vec<InboundView>,
    /// Relays known (the pool paths are drawn from).
    pub pool: usize,
    /// What the default route policy does now and why.
    pub routing: RoutingSummary,
    /// Destinations without a circuit for want of relays: sent direct or
    /// unreachable.
    pub no_circuit: Vec<RouteNoteView>,
}

/// A node a circuit may go through or to.
#[derive(Clone, Debug)]
struct Peer {
    id: NodeId,
    link_key: [u8; 32],
    endpoint: SocketAddr,
    ips: Vec<IpAddr>,
    onion: [u8; 32],
}

impl Peer {
    /// From a record that carries an endpoint and an onion key.
    fn from_record(bytes: &[u8]) -> Option<Peer> {
        let rec = NodeRecord::parse_unverified(bytes).ok()?;
        let f: RecordExt = rec.fields().ok()?;
        Some(Peer {
            id: rec.node_id(),
            link_key: rec.link_key,
            endpoint: *f.endpoints.first()?,
            ips: f.endpoints.iter().map(|e| e.ip()).collect(),
            onion: f.onion_key?,
        })
    }
}

struct BuiltHop {
    id: NodeId,
    keys: HopKeys,
    ctr: u64,
    replay: ReplayWindow,
    last_reply: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// CREATE or EXTEND sent for hop `hops.len()`.
    Extending,
    /// LOOKUP sent to the last relay.
    Looking,
    /// AUTH sent to the destination.
    Authing,
    /// Data flows.
    Ready,
}

struct OutCirc {
    dst: Ipv6Addr,
    relays: Vec<Peer>,
    dest: Option<Peer>,
    dest_record: Option<Vec<u8>>,
    hops: Vec<BuiltHop>,
    pending: Option<ClientHandshake>,
    link: u32,
    circ: u32,
    stage: Stage,
    created: Instant,
    step_started: Instant,
    last_used: Instant,
    last_probe: Instant,
    next_noise: Option<Instant>,
    queue: VecDeque<Vec<u8>>,
    tx_bytes: u64,
    rx_bytes: u64,
    /// A newer circuit to the same destination replaces this one when ready.
    replaced_by: Option<u64>,
}

impl OutCirc {
    fn keys(&self) -> Vec<&HopKeys> {
        self.hops.iter().map(|h| &h.keys).collect()
    }
}

struct HopCirc {
    prev: (u32, u32),
    next: Option<(u32, u32)>,
    keys: HopKeys,
    replay: ReplayWindow,
    ctr: u64,
    created: Instant,
    last_used: Instant,
    extending: Option<Instant>,
    /// Destination: the source the circuit authenticated.
    auth: Option<Ipv6Addr>,
    fwd_bytes: u64,
    bwd_bytes: u64,
    rx_bytes: u64,
    tx_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CircRef {
    /// A circuit this node built (the link to its first hop).
    Out(u64),
    /// The previous side of a circuit this node carries.
    Prev(u64),
    /// The next side of a circuit this node carries.
    Next(u64),
}

/// All circuit state of a node.
pub(super) struct Circuits {
    out: HashMap<u64, OutCirc>,
    by_dst: HashMap<Ipv6Addr, u64>,
    hops: HashMap<u64, HopCirc>,
    on_link: HashMap<(u32, u32), CircRef>,
    inbound_by_src: HashMap<Ipv6Addr, u64>,
    per_neighbour: HashMap<u32, usize>,
    /// CREATE budget per neighbour link (gone with the link).
    create_rate: HashMap<u32, Rate>,
    next_id: u64,
    onion: OnionKey,
    prev_onion: Option<OnionKey>,
    onion_since: Instant,
    /// Relays paths are drawn from: (how to reach it, record seq, expiry).
    pool: HashMap<NodeId, (Peer, u64, u64)>,
    last_pool_fill: Option<Instant>,
    bad: HashMap<NodeId, Instant>,
    /// Failed builds in a row per destination, and when the last failed.
    build_fails: HashMap<Ipv6Addr, (u32, Instant)>,
    /// Destinations without a circuit for want of relays, and why.
    notes: RouteNotes,
    stats: RelayStats,
    bandwidth: (f64, Instant),
    /// Cells forwarded as relay, as (forward?, in, out), for the test hook.
    #[cfg(feature = "test-hooks")]
    pub(super) cell_log: Vec<(bool, Vec<u8>, Vec<u8>)>,
}

impl Circuits {
    pub(super) fn new(rng: &mut (impl RngCore + rand_core::CryptoRng), now: Instant) -> Circuits {
        Circuits {
            out: HashMap::new(),
            by_dst: HashMap::new(),
            hops: HashMap::new(),
            on_link: HashMap::new(),
            inbound_by_src: HashMap::new(),
            per_neighbour: HashMap::new(),
            create_rate: HashMap::new(),
            next_id: 1,
            onion: OnionKey::generate(rng),
            prev_onion: None,
            onion_since: now,
            pool: HashMap::new(),
            last_pool_fill: None,
            bad: HashMap::new(),
            build_fails: HashMap::new(),
            notes: RouteNotes::default(),
            stats: RelayStats::default(),
            bandwidth: (0.0, now),
            #[cfg(feature = "test-hooks")]
            cell_log: Vec::new(),
        }
    }

    pub(super) fn onion_public(&self) -> [u8; 32] {
        self.onion.public
    }
}

fn cmd_name(c: u8) -> &'static str {
    match c {
        cmd::EXTEND => "extend",
        cmd::AUTH => "auth",
        cmd::DATA => "data",
        cmd::PROBE => "probe",
        cmd::NOISE => "noise",
        cmd::LOOKUP => "lookup",
        cmd::EXTENDED => "extended",
        cmd::EXTEND_FAILED => "extend_failed",
        cmd::READY => "ready",
        cmd::REFUSED => "refused",
        cmd::PROBE_REPLY => "probe_reply",
        cmd::LOOKUP_REPLY => "lookup_reply",
        _ => "unknown",
    }
}

fn count(d: &mut CellDrops, e: OnionError) {
    match e {
        OnionError::BadSize => d.bad_size += 1,
        OnionError::BadKind => d.bad_kind += 1,
        OnionError::Forged | OnionError::BadAuth => d.forged += 1,
        OnionError::Replay => d.replay += 1,
        OnionError::Unrecognised => d.unrecognised += 1,
        _ => d.malformed += 1,
    }
}

impl Node {
    // ---- plumbing -------------------------------------------------------

    fn neighbour(&self, link: u32) -> Option<NodeId> {
        self.links
            .get(&link)
            .and_then(|l| l.verified.as_ref())
            .map(|v| v.record.node_id())
    }

    /// A free circuit ID on a link. The side whose node ID is lower sets
    /// the top bit, so the two sides never pick the same one.
    fn alloc_circ(&mut self, link: u32) -> u32 {
        let high = match self.links.get(&link).and_then(|l| l.node_id()) {
            Some(id) if self.node_id() < id => 0x8000_0000,
            _ => 0,
        };
        loop {
            let c = (self.rng.next_u32() & 0x7fff_ffff) | high;
            if c != 0 && !self.circ.on_link.contains_key(&(link, c)) {
                return c;
            }
        }
    }

    /// Encrypts `self.bufs.cell[..len]` for `link`; the datagram is left in
    /// `self.bufs.a`. Returns (endpoint, datagram length).
    fn encap_cell(&mut self, link: u32, len: usize) -> Option<(SocketAddr, usize)> {
        let l = self.links.get_mut(&link)?;
        let dst = l.verified.as_ref()?.address;
        let ep = l.endpoint?;
        let n = wire::encode_control(
            self.address,
            dst,
            MSG_CELL,
            &self.bufs.cell[..len],
            &mut self.bufs.ctl,
        );
        match l.tunn.encapsulate(&self.bufs.ctl[..n], &mut self.bufs.a) {
            boringtun::noise::TunnResult::WriteToNetwork(out) => Some((ep, out.len())),
            _ => None,
        }
    }

    /// Sends `self.bufs.cell[..len]` on `link` (queued until the link's
    /// neighbour is verified).
    pub(super) fn send_cell(&mut self, now: Instant, link: u32, len: usize) {
        let Some(l) = self.links.get_mut(&link) else {
            self.circ.stats.drops.send_failed += 1;
            return;
        };
        l.last_used = now;
        if l.verified.is_none() {
            if l.pending_ctl.len() >= super::MAX_PENDING_CTL {
                l.pending_ctl.pop_front();
            }
            l.pending_ctl
                .push_back((MSG_CELL, self.bufs.cell[..len].to_vec()));
            return;
        }
        match self.encap_cell(link, len) {
            Some((dst, n)) => self.transmits.push_back(super::Transmit {
                dst,
                payload: self.bufs.a[..n].to_vec(),
            }),
            None => self.circ.stats.drops.send_failed += 1,
        }
    }

    /// A link-level cell with a plain body (CREATE, CREATED, DESTROY).
    fn send_plain(&mut self, now: Instant, link: u32, circ: u32, kind: u8, body: &[u8]) {
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let cell = &mut self.bufs.cell[..CELL_SMALL];
        onion::write_header(cell, circ, kind, &nonce);
        cell[CELL_HEADER..CELL_HEADER + body.len()].copy_from_slice(body);
        let rest = CELL_HEADER + body.len();
        self.rng.fill_bytes(&mut self.bufs.cell[rest..CELL_SMALL]);
        self.send_cell(now, link, CELL_SMALL);
    }

    fn cell_size(&self, data: usize) -> usize {
        onion::cell_size_for(data, self.config.traffic.always_large).unwrap_or(CELL_LARGE)
    }

    /// Builds a forward cell for hop `target` of out-circuit `id` in
    /// `self.bufs.cell`; returns (first link, length).
    fn wrap_out(
        &mut self,
        id: u64,
        target: usize,
        command: u8,
        data: &[u8],
    ) -> Option<(u32, usize)> {
        let size = self.cell_size(data.len());
        let c = self.circ.out.get_mut(&id)?;
        let hop = c.hops.get_mut(target)?;
        hop.ctr += 1;
        let counter = hop.ctr;
        let keys = c.keys();
        let (head, body) = self.bufs.cell[..size].split_at_mut(CELL_HEADER);
        let n = wrap(&keys, target, counter, command, data, body);
        onion::write_header(head, c.circ, KIND_RELAY, &n);
        Some((c.link, size))
    }

    fn send_out(&mut self, now: Instant, id: u64, target: usize, command: u8, data: &[u8]) {
        if let Some((link, len)) = self.wrap_out(id, target, command, data) {
            self.send_cell(now, link, len);
        }
    }

    /// Builds a backward cell from hop circuit `h` into `self.bufs.cell`.
    fn originate(&mut self, now: Instant, h: u64, command: u8, data: &[u8]) {
        let size = self.cell_size(data.len());
        let Some(hc) = self.circ.hops.get_mut(&h) else {
            return;
        };
        hc.ctr += 1;
        let (link, circ) = hc.prev;
        let (head, body) = self.bufs.cell[..size].split_at_mut(CELL_HEADER);
        let n = hc.keys.originate(hc.ctr, command, data, body);
        onion::write_header(head, circ, KIND_RELAY, &n);
        self.send_cell(now, link, size);
    }

    #[cfg(feature = "test-hooks")]
    fn log_cell(&mut self, forward: bool, cell_in: &[u8], len: usize) {
        if self.circ.cell_log.len() < 100_000 {
            let out = self.bufs.cell[..len].to_vec();
            self.circ.cell_log.push((forward, cell_in.to_vec(), out));
        }
    }

    /// Whether the relay bandwidth cap lets `bytes` more through.
    fn bandwidth_ok(&mut self, now: Instant, bytes: usize) -> bool {
        let Some(rate) = self.config.relay.bandwidth else {
            return true;
        };
        let (tokens, last) = &mut self.circ.bandwidth;
        let dt = now.saturating_duration_since(*last).as_secs_f64();
        *last = now;
        // Burst: a tenth of a second's worth, at least a few large cells.
        let burst = (rate as f64 / 10.0).max(4.0 * CELL_LARGE as f64);
        *tokens = (*tokens + dt * rate as f64).min(burst);
        if *tokens >= bytes as f64 {
            *tokens -= bytes as f64;
            true
        } else {
            false
        }
    }

    // ---- cells arriving on a link ----------------------------------------

    /// Handles a cell from a link (a control frame of type `MSG_CELL`).
    /// Returns a packet for the TUN when it was DATA for us.
    pub(super) fn handle_cell(
        &mut self,
        now: Instant,
        link: u32,
        cell_len: usize,
    ) -> Option<usize> {
        // The cell was copied to `self.bufs.cell_in[..cell_len]`.
        let cell_in = std::mem::take(&mut self.bufs.cell_in);
        let out = self.handle_cell_inner(now, link, &cell_in[..cell_len]);
        self.bufs.cell_in = cell_in;
        out
    }

    fn handle_cell_inner(&mut self, now: Instant, link: u32, cell: &[u8]) -> Option<usize> {
        let hdr = match parse_cell(cell) {
            Ok(h) => h,
            Err(e) => {
                count(&mut self.circ.stats.drops, e);
                return None;
            }
        };
        self.neighbour(link)?;
        let key = (link, hdr.circ);
        let body = &cell[CELL_HEADER..];
        match hdr.kind {
            KIND_CREATE => {
                self.on_create(now, link, hdr.circ, body);
                None
            }
            KIND_DESTROY => {
                self.on_destroy(now, key);
                None
            }
            KIND_CREATED => {
                match self.circ.on_link.get(&key).copied() {
                    Some(CircRef::Out(id)) => self.out_created(now, id, body),
                    Some(CircRef::Next(h)) => {
                        let ok = self.circ.hops.get_mut(&h).is_some_and(|hc| {
                            hc.last_used = now;
                            hc.extending.take().is_some()
                        });
                        if ok {
                            let created = body[..CREATED_LEN].to_vec();
                            self.originate(now, h, cmd::EXTENDED, &created);
                        } else {
                            self.circ.stats.drops.bad_kind += 1;
                        }
                    }
                    _ => self.circ.stats.drops.unknown_circuit += 1,
                }
                None
            }
            _ => {
                let Some(r) = self.circ.on_link.get(&key).copied() else {
                    self.circ.stats.drops.unknown_circuit += 1;
                    return None;
                };
                let size = cell.len();
                self.bufs.cell[..size].copy_from_slice(cell);
                let mut nonce = hdr.nonce;
                match r {
                    CircRef::Prev(h) => self.hop_forward(now, h, nonce, size, cell),
                    CircRef::Next(h) => {
                        let hc = self.circ.hops.get_mut(&h)?;
                        hc.last_used = now;
                        let (link, circ) = hc.prev;
                        hc.keys
                            .backward(&mut nonce, &mut self.bufs.cell[CELL_HEADER..size]);
                        if !self.bandwidth_ok(now, size) {
                            self.circ.stats.drops.over_bandwidth += 1;
                            return None;
                        }
                        if let Some(hc) = self.circ.hops.get_mut(&h) {
                            hc.bwd_bytes += size as u64;
                        }
                        onion::write_header(&mut self.bufs.cell, circ, KIND_RELAY, &nonce);
                        self.circ.stats.cells_forwarded += 1;
                        self.circ.stats.bytes_forwarded += size as u64;
                        #[cfg(feature = "test-hooks")]
                        self.log_cell(false, cell, size);
                        self.send_cell(now, link, size);
                        None
                    }
                    CircRef::Out(id) => self.out_cell(now, id, nonce, size),
                }
            }
        }
    }

    fn on_create(&mut self, now: Instant, link: u32, circ: u32, body: &[u8]) {
        if self.circ.on_link.contains_key(&(link, circ)) {
            self.circ.stats.drops.bad_kind += 1;
            return;
        }
        if !self.config.access.relay.is_open() {
            // Only a verified neighbour can be checked against the lists.
            let who = self.links.get(&link).and_then(|l| {
                let v = l.verified.as_ref()?;
                Some((l.endpoint.map(|e| e.ip()), v.record.node_id()))
            });
            let admitted = who.is_some_and(|(ip, id)| self.config.access.relay.admits(ip, &id));
            if !admitted {
                self.circ.stats.refused += 1;
                self.drops.access_denied += 1;
                tracing::debug!(
                    link,
                    "circuit refused: neighbour not allowed to relay through here"
                );
                self.send_plain(now, link, circ, KIND_DESTROY, &[3]);
                return;
            }
        }
        if !self
            .circ
            .create_rate
            .entry(link)
            .or_insert_with(|| Rate::new(now))
            .allow(now, CREATE_LIMIT)
        {
            self.circ.stats.drops.create_limited += 1;
            return;
        }
        let mine = self.circ.per_neighbour.get(&link).copied().unwrap_or(0);
        if self.circ.hops.len() >= MAX_HOP_CIRCUITS || mine >= MAX_PER_NEIGHBOUR {
            self.circ.stats.refused += 1;
            tracing::debug!(link, "circuit refused: relay at its limit");
            self.send_plain(now, link, circ, KIND_DESTROY, &[1]);
            return;
        }
        let id = self.node_id();
        let keys: Vec<&OnionKey> = std::iter::once(&self.circ.onion)
            .chain(self.circ.prev_onion.as_ref())
            .collect();
        let res = server_handshake(&mut self.rng, &id, &keys, &body[..CREATE_LEN]);
        let (created, keys) = match res {
            Ok(x) => x,
            Err(e) => {
                self.circ.stats.refused += 1;
                tracing::debug!(link, "circuit refused: {e}");
                self.send_plain(now, link, circ, KIND_DESTROY, &[2]);
                return;
            }
        };
        let h = self.circ.next_id;
        self.circ.next_id += 1;
        self.circ.hops.insert(
            h,
            HopCirc {
                prev: (link, circ),
                next: None,
                keys,
                replay: ReplayWindow::default(),
                ctr: 0,
                created: now,
                last_used: now,
                extending: None,
                auth: None,
                fwd_bytes: 0,
                bwd_bytes: 0,
                rx_bytes: 0,
                tx_bytes: 0,
            },
        );
        self.circ.on_link.insert((link, circ), CircRef::Prev(h));
        *self.circ.per_neighbour.entry(link).or_default() += 1;
        self.circ.stats.circuits_total += 1;
        self.send_plain(now, link, circ, KIND_CREATED, &created);
    }

    /// Removes hop circuit `h`, telling the side it did not hear it from.
    fn drop_hop(&mut self, now: Instant, h: u64, tell_prev: bool, tell_next: bool) {
        let Some(hc) = self.circ.hops.remove(&h) else {
            return;
        };
        self.circ.on_link.remove(&hc.prev);
        if let Some(n) = self.circ.per_neighbour.get_mut(&hc.prev.0) {
            *n = n.saturating_sub(1);
        }
        if let Some(a) = hc.auth {
            if self.circ.inbound_by_src.get(&a) == Some(&h) {
                // Another circuit from the same source (its replacement)
                // carries the replies from now on.
                let other = self
                    .circ
                    .hops
                    .iter()
                    .filter(|(_, o)| o.auth == Some(a))
                    .max_by_key(|(_, o)| o.last_used)
                    .map(|(k, _)| *k);
                match other {
                    Some(o) => self.circ.inbound_by_src.insert(a, o),
                    None => self.circ.inbound_by_src.remove(&a),
                };
            }
        }
        if tell_prev {
            self.send_plain(now, hc.prev.0, hc.prev.1, KIND_DESTROY, &[0]);
        }
        if let Some(next) = hc.next {
            self.circ.on_link.remove(&next);
            if tell_next {
                self.send_plain(now, next.0, next.1, KIND_DESTROY, &[0]);
            }
        }
    }

    fn on_destroy(&mut self, now: Instant, key: (u32, u32)) {
        match self.circ.on_link.get(&key).copied() {
            Some(CircRef::Prev(h)) => self.drop_hop(now, h, false, true),
            Some(CircRef::Next(h)) => self.drop_hop(now, h, true, false),
            Some(CircRef::Out(id)) => self.out_failed(now, id, None, "destroyed by a hop"),
            None => {}
        }
    }

    /// A forward cell at a hop: ours, or pass it on.
    fn hop_forward(
        &mut self,
        now: Instant,
        h: u64,
        mut nonce: [u8; 16],
        size: usize,
        #[allow(unused_variables)] cell_in: &[u8],
    ) -> Option<usize> {
        let hc = self.circ.hops.get_mut(&h)?;
        hc.last_used = now;
        let res = hc
            .keys
            .forward(&mut nonce, &mut self.bufs.cell[CELL_HEADER..size]);
        match res {
            Err(e) => {
                count(&mut self.circ.stats.drops, e);
                None
            }
            Ok(Forward::Pass) => {
                let Some((link, circ)) = hc.next else {
                    self.circ.stats.drops.unrecognised += 1;
                    return None;
                };
                hc.fwd_bytes += size as u64;
                if !self.bandwidth_ok(now, size) {
                    self.circ.stats.drops.over_bandwidth += 1;
                    return None;
                }
                onion::write_header(&mut self.bufs.cell, circ, KIND_RELAY, &nonce);
                self.circ.stats.cells_forwarded += 1;
                self.circ.stats.bytes_forwarded += size as u64;
                #[cfg(feature = "test-hooks")]
                self.log_cell(true, cell_in, size);
                self.send_cell(now, link, size);
                None
            }
            Ok(Forward::Mine(counter, command, range)) => {
                if let Err(e) = hc.replay.check(counter) {
                    count(&mut self.circ.stats.drops, e);
                    return None;
                }
                let start = CELL_HEADER + range.start;
                let end = CELL_HEADER + range.end;
                self.hop_command(now, h, command, start, end)
            }
        }
    }

    /// A command addressed to this node as a hop; the data is in
    /// `self.bufs.cell[start..end]`.
    fn hop_command(
        &mut self,
        now: Instant,
        h: u64,
        command: u8,
        start: usize,
        end: usize,
    ) -> Option<usize> {
        tracing::trace!(circuit = h, command = cmd_name(command), "cell for us");
        match command {
            cmd::DATA => return self.hop_data(now, h, start, end),
            cmd::PROBE => {
                let data = self.bufs.cell[start..end].to_vec();
                self.originate(now, h, cmd::PROBE_REPLY, &data);
            }
            cmd::NOISE => self.circ.stats.drops.noise += 1,
            cmd::EXTEND => {
                let data = self.bufs.cell[start..end].to_vec();
                self.hop_extend(now, h, &data);
            }
            cmd::AUTH => {
                let data = self.bufs.cell[start..end].to_vec();
                self.hop_auth(now, h, &data);
            }
            cmd::LOOKUP => {
                let data = &self.bufs.cell[start..end];
                let Ok(octets) = <[u8; 16]>::try_from(data) else {
                    self.circ.stats.drops.malformed += 1;
                    return None;
                };
                let addr = Ipv6Addr::from(octets);
                self.hop_lookup(now, h, addr);
            }
            _ => self.circ.stats.drops.bad_kind += 1,
        }
        None
    }

    fn hop_data(&mut self, _now: Instant, h: u64, start: usize, end: usize) -> Option<usize> {
        let hc = self.circ.hops.get_mut(&h)?;
        let Some(src) = hc.auth else {
            self.circ.stats.drops.unauthenticated += 1;
            return None;
        };
        let Ok(view) = Ipv6View::new_checked(&self.bufs.cell[start..end]) else {
            self.circ.stats.drops.malformed += 1;
            return None;
        };
        // The packet's source must be the node that authenticated this
        // circuit; anything else is someone speaking in another's name.
        if view.src() != src || view.dst() != self.address {
            self.circ.stats.drops.spoofed_source += 1;
            return None;
        }
        let (p, _) = match wire::decode(view, &mut self.bufs.b) {
            Ok((Incoming::App(p), c)) => (p.len(), c),
            _ => {
                self.circ.stats.drops.malformed += 1;
                return None;
            }
        };
        hc.rx_bytes += p as u64;
        // Replies go back on the circuit that last brought traffic.
        self.circ.inbound_by_src.insert(src, h);
        // decode() returned either the cell's bytes (as is) or a rebuilt
        // packet in bufs.b: put the result in bufs.b either way.
        if !matches!(view.next_header(), wire::NH_QGATE) {
            self.bufs.b[..p].copy_from_slice(&self.bufs.cell[start..start + p]);
        }
        Some(p)
    }

    fn hop_extend(&mut self, now: Instant, h: u64, data: &[u8]) {
        let fail = |node: &mut Node, why: u8| {
            node.circ.stats.refused += 1;
            node.originate(now, h, cmd::EXTEND_FAILED, &[why]);
        };
        if !self.config.relay.enabled {
            return fail(self, 1);
        }
        let Some(hc) = self.circ.hops.get(&h) else {
            return;
        };
        if hc.next.is_some() || hc.auth.is_some() {
            return fail(self, 2);
        }
        // node ID 32 | link key 32 | endpoint | CREATE 64
        if data.len() < 64 + 7 + CREATE_LEN {
            self.circ.stats.drops.malformed += 1;
            return;
        }
        let id = NodeId(data[..32].try_into().expect("32 bytes"));
        let link_key: [u8; 32] = data[32..64].try_into().expect("32 bytes");
        let Some((ep, rest)) = super::parse_endpoint(&data[64..]) else {
            self.circ.stats.drops.malformed += 1;
            return;
        };
        if rest.len() < CREATE_LEN || id == self.node_id() {
            return fail(self, 3);
        }
        let create = rest[..CREATE_LEN].to_vec();
        let Some(link) = self.connect_to(now, id, link_key, ep) else {
            return fail(self, 4);
        };
        if self.circ.hops.get(&h).map(|hc| hc.prev.0) == Some(link) {
            return fail(self, 3);
        }
        let circ = self.alloc_circ(link);
        self.circ.on_link.insert((link, circ), CircRef::Next(h));
        if let Some(hc) = self.circ.hops.get_mut(&h) {
            hc.next = Some((link, circ));
            hc.extending = Some(now);
        }
        self.send_plain(now, link, circ, KIND_CREATE, &create);
    }

    /// A link to a node named by ID, link key and endpoint (an EXTEND).
    fn connect_to(
        &mut self,
        now: Instant,
        id: NodeId,
        key: [u8; 32],
        ep: SocketAddr,
    ) -> Option<u32> {
        if let Some(&i) = self.by_addr.get(&id.overlay_address()) {
            return Some(i);
        }
        if let Some(l) = self.by_key.get(&key).and_then(|i| self.links.get(i)) {
            if l.node_id().is_some_and(|x| x != id) {
                return None;
            }
        }
        let idx = self.add_link(key, Some(ep), Some(id), now)?;
        self.by_addr.insert(id.overlay_address(), idx);
        self.send_hello(idx, now);
        Some(idx)
    }

    fn hop_auth(&mut self, now: Instant, h: u64, data: &[u8]) {
        let refuse = |node: &mut Node| node.originate(now, h, cmd::REFUSED, &[]);
        if !self.config.has_tun {
            return refuse(self);
        }
        if data.len() < 2 {
            return refuse(self);
        }
        let rlen = u16::from_be_bytes([data[0], data[1]]) as usize;
        if data.len() < 2 + rlen {
            return refuse(self);
        }
        let (record, sig) = (&data[2..2 + rlen], &data[2 + rlen..]);
        let Ok(rec) = NodeRecord::parse_verified(record) else {
            return refuse(self);
        };
        let Some(hc) = self.circ.hops.get(&h) else {
            return;
        };
        let msg = auth_message(&self.node_id(), &hc.keys.bind);
        if verify_signature(&rec.public_der, &msg, sig).ok() != Some(rec.node_id())
            || rec.node_id() == self.node_id()
        {
            self.circ.stats.drops.forged += 1;
            return refuse(self);
        }
        let src = rec.overlay_address();
        if let Some(hc) = self.circ.hops.get_mut(&h) {
            hc.auth = Some(src);
        }
        self.circ.inbound_by_src.insert(src, h);
        tracing::debug!(circuit = h, source = %src, "inbound circuit authenticated");
        self.originate(now, h, cmd::READY, &[]);
    }

    fn hop_lookup(&mut self, now: Instant, h: u64, addr: Ipv6Addr) {
        if !self.config.relay.enabled {
            self.originate(now, h, cmd::LOOKUP_REPLY, &[]);
            return;
        }
        // Known already (a link, or the routing table)?
        if let Some(rec) = self.local_record(&addr) {
            self.originate(now, h, cmd::LOOKUP_REPLY, &rec);
            return;
        }
        let goal = Goal::Node {
            prefix: addr.octets()[1..16].to_vec(),
            min_seq: 0,
            reachable: true,
        };
        match self.dht.lookup(now, goal) {
            Some(id) => {
                self.purposes.insert(id, Purpose::Circuit(h, addr));
                self.pump_dht(now);
            }
            None => self.originate(now, h, cmd::LOOKUP_REPLY, &[]),
        }
    }

    /// A DHT lookup a circuit asked for has finished.
    pub(super) fn circuit_lookup_done(
        &mut self,
        now: Instant,
        h: u64,
        addr: Ipv6Addr,
        found: Option<Contact>,
    ) {
        let rec = found
            .filter(|c| c.info.id.overlay_address() == addr)
            .map(|c| c.record.to_vec())
            .unwrap_or_default();
        self.originate(now, h, cmd::LOOKUP_REPLY, &rec);
    }

    /// A record for an address we already hold: a neighbour's, the DHT's
    /// table, or one a circuit looked up.
    pub(super) fn local_record(&self, addr: &Ipv6Addr) -> Option<Vec<u8>> {
        if let Some(v) = self
            .by_addr
            .get(addr)
            .and_then(|i| self.links.get(i))
            .and_then(|l| l.verified.as_ref())
        {
            return Some(v.record_bytes.clone());
        }
        let c = self.dht.find_local(&addr.octets()[1..16])?;
        (c.info.id.overlay_address() == *addr).then(|| c.record.to_vec())
    }

    // ---- the source's side --------------------------------------------------

    /// Whether builds to `dst` failed too often lately.
    fn build_failing(&self, now: Instant, dst: &Ipv6Addr) -> bool {
        self.circ.build_fails.get(dst).is_some_and(|(n, t)| {
            *n >= MAX_BUILD_FAILS && now.saturating_duration_since(*t) < FAILED_FOR
        })
    }

    /// Sends an application packet to `dst` through a circuit, building one
    /// if needed.
    pub(super) fn circuit_send(
        &mut self,
        now: Instant,
        view: Ipv6View<'_>,
        min: u8,
        max: u8,
    ) -> TunOutcome<'_> {
        let dst = view.dst();
        if view.bytes().len() > CIRCUIT_MTU {
            self.drops.too_big += 1;
            return self.icmp_reply(
                now,
                view,
                wire::ICMPV6_PACKET_TOO_BIG,
                0,
                CIRCUIT_MTU.max(IPV6_MIN_MTU) as u32,
            );
        }
        let id = match self.circ.by_dst.get(&dst) {
            Some(&id) => id,
            None => {
                if self.build_failing(now, &dst) || self.noted_unreachable(now, &dst) {
                    self.drops.unreachable += 1;
                    return self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0);
                }
                match self.build_circuit(now, dst, min, max) {
                    Ok(id) => id,
                    Err(e) => {
                        if e == BuildError::NoPath {
                            self.note_unreachable(now, dst, min);
                        }
                        self.drops.no_route += 1;
                        return self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0);
                    }
                }
            }
        };
        let Some(c) = self.circ.out.get_mut(&id) else {
            return TunOutcome::Nothing;
        };
        c.last_used = now;
        if c.stage != Stage::Ready {
            if c.queue.len() >= QUEUE {
                c.queue.pop_front();
                self.drops.send_failed += 1;
            }
            c.queue.push_back(view.bytes().to_vec());
            return TunOutcome::Nothing;
        }
        match self.out_data(id, view) {
            Some((link, len)) => match self.encap_cell(link, len) {
                Some((ep, n)) => TunOutcome::Send(ep, &self.bufs.a[..n]),
                None => {
                    self.drops.send_failed += 1;
                    TunOutcome::Nothing
                }
            },
            None => TunOutcome::Nothing,
        }
    }

    /// An application packet as a circuit carries it: a link frame,
    /// compressed when the traffic settings allow and it shrinks.
    fn circuit_frame(&mut self, view: Ipv6View<'_>) -> Vec<u8> {
        let compress = self.config.traffic.compress && self.config.compression.enabled;
        match wire::encode_app(view, compress, &mut self.bufs.b) {
            Encoded::AsIs => view.bytes().to_vec(),
            Encoded::Compressed(n) | Encoded::Wrapped(n) => self.bufs.b[..n].to_vec(),
        }
    }

    /// Wraps an application packet as DATA for circuit `id`'s destination.
    fn out_data(&mut self, id: u64, view: Ipv6View<'_>) -> Option<(u32, usize)> {
        let len = view.bytes().len();
        let frame = self.circuit_frame(view);
        if frame.len() > MAX_DATA {
            self.drops.too_big += 1;
            return None;
        }
        let c = self.circ.out.get_mut(&id)?;
        c.tx_bytes += len as u64;
        let target = c.hops.len().checked_sub(1)?;
        self.wrap_out(id, target, cmd::DATA, &frame)
    }

    /// The destination's record and what it says, when known here.
    fn local_peer(&self, dst: &Ipv6Addr) -> Option<Peer> {
        self.local_record(dst)
            .as_deref()
            .and_then(Peer::from_record)
    }

    /// Picks relays and starts a circuit to `dst`: as many as drawn from
    /// MIN..=MAX, or fewer (not below MIN) when the pool can't give that
    /// many.
    fn build_circuit(
        &mut self,
        now: Instant,
        dst: Ipv6Addr,
        min: u8,
        max: u8,
    ) -> Result<u64, BuildError> {
        if self.circ.out.len() >= MAX_OUT {
            return Err(BuildError::Limit);
        }
        self.fill_pool_from_table(now);
        let dest_record = self.local_record(&dst);
        let dest = dest_record.as_deref().and_then(Peer::from_record);
        let drawn = route::draw_len(&mut self.rng, min, max);
        let PathInputs {
            pool,
            exclude,
            ends,
        } = self.path_inputs(&dst);
        let distinct = self.config.relay.distinct_subnets;
        let path = (min..=drawn).rev().find_map(|len| {
            route::select(&mut self.rng, &pool, len.into(), &exclude, &ends, distinct)
        });
        let Some(path) = path else {
            tracing::debug!(%dst, pool = pool.len(), "no path: too few usable relays");
            return Err(BuildError::NoPath);
        };
        let relays: Vec<Peer> = path
            .iter()
            .filter_map(|id| self.circ.pool.get(id).map(|(p, _, _)| p.clone()))
            .collect();
        let first = relays.first().ok_or(BuildError::NoPath)?.clone();
        let link = self
            .connect_to(now, first.id, first.link_key, first.endpoint)
            .ok_or(BuildError::NoLink)?;
        let circ = self.alloc_circ(link);
        let id = self.circ.next_id;
        self.circ.next_id += 1;
        let (hs, create) = ClientHandshake::start(&mut self.rng, first.id, first.onion);
        tracing::debug!(circuit = id, %dst, relays = relays.len(), "building a circuit");
        self.circ.out.insert(
            id,
            OutCirc {
                dst,
                relays,
                dest,
                dest_record,
                hops: Vec::new(),
                pending: Some(hs),
                link,
                circ,
                stage: Stage::Extending,
                created: now,
                step_started: now,
                last_used: now,
                last_probe: now,
                next_noise: None,
                queue: VecDeque::new(),
                tx_bytes: 0,
                rx_bytes: 0,
                replaced_by: None,
            },
        );
        self.circ.on_link.insert((link, circ), CircRef::Out(id));
        self.circ.by_dst.entry(dst).or_insert(id);
        self.send_plain(now, link, circ, KIND_CREATE, &create);
        Ok(id)
    }

    /// CREATED from the first hop.
    fn out_created(&mut self, now: Instant, id: u64, body: &[u8]) {
        let Some(c) = self.circ.out.get_mut(&id) else {
            return;
        };
        let Some(hs) = c.pending.take() else {
            self.circ.stats.drops.bad_kind += 1;
            return;
        };
        match hs.finish(&body[..CREATED_LEN]) {
            Ok(keys) => {
                let hop_id = c.relays[0].id;
                c.hops.push(BuiltHop {
                    id: hop_id,
                    keys,
                    ctr: 0,
                    replay: ReplayWindow::default(),
                    last_reply: now,
                });
                self.advance(now, id);
            }
            Err(e) => {
                let bad = c.relays.first().map(|p| p.id);
                self.out_failed(now, id, bad, &e.to_string());
            }
        }
    }

    /// A backward cell on a circuit we built (in `self.bufs.cell[..size]`).
    fn out_cell(&mut self, now: Instant, id: u64, nonce: [u8; 16], size: usize) -> Option<usize> {
        let c = self.circ.out.get_mut(&id)?;
        let keys = c.keys();
        let res = onion::unwrap(&keys, nonce, &mut self.bufs.cell[CELL_HEADER..size]);
        let u = match res {
            Ok(u) => u,
            Err(e) => {
                count(&mut self.circ.stats.drops, e);
                return None;
            }
        };
        let hop = &mut c.hops[u.hop];
        if let Err(e) = hop.replay.check(u.counter) {
            count(&mut self.circ.stats.drops, e);
            return None;
        }
        hop.last_reply = now;
        let last = u.hop + 1 == c.hops.len();
        let (start, end) = (CELL_HEADER + u.data.start, CELL_HEADER + u.data.end);
        let is_dest = last && c.dest.is_some() && c.hops.len() == c.relays.len() + 1;
        tracing::trace!(
            circuit = id,
            hop = u.hop,
            command = cmd_name(u.command),
            "cell from hop"
        );
        match u.command {
            cmd::DATA if is_dest => {
                let Ok(view) = Ipv6View::new_checked(&self.bufs.cell[start..end]) else {
                    self.circ.stats.drops.malformed += 1;
                    return None;
                };
                if view.src() != c.dst || view.dst() != self.address {
                    self.circ.stats.drops.spoofed_source += 1;
                    return None;
                }
                let p = match wire::decode(view, &mut self.bufs.b) {
                    Ok((Incoming::App(p), _)) => p.len(),
                    _ => {
                        self.circ.stats.drops.malformed += 1;
                        return None;
                    }
                };
                c.rx_bytes += p as u64;
                if view.next_header() != wire::NH_QGATE {
                    self.bufs.b[..p].copy_from_slice(&self.bufs.cell[start..start + p]);
                }
                return Some(p);
            }
            cmd::PROBE_REPLY => {}
            cmd::EXTENDED if last && c.pending.is_some() => {
                let hs = c.pending.take()?;
                let next = if c.hops.len() < c.relays.len() {
                    c.relays[c.hops.len()].clone()
                } else {
                    c.dest.clone()?
                };
                match hs.finish(&self.bufs.cell[start..end]) {
                    Ok(keys) => {
                        c.hops.push(BuiltHop {
                            id: next.id,
                            keys,
                            ctr: 0,
                            replay: ReplayWindow::default(),
                            last_reply: now,
                        });
                        self.advance(now, id);
                    }
                    Err(e) => self.out_failed(now, id, Some(next.id), &e.to_string()),
                }
            }
            cmd::EXTEND_FAILED if last => {
                let next = if c.hops.len() < c.relays.len() {
                    Some(c.relays[c.hops.len()].id)
                } else {
                    None
                };
                self.out_failed(now, id, next, "extend failed");
            }
            cmd::LOOKUP_REPLY if last && c.stage == Stage::Looking => {
                let rec = self.bufs.cell[start..end].to_vec();
                let dst = c.dst;
                let ok = NodeRecord::parse_verified(&rec)
                    .ok()
                    .filter(|r| r.overlay_address() == dst)
                    .and_then(|_| Peer::from_record(&rec));
                match ok {
                    Some(p) => {
                        let clash = self.config.relay.distinct_subnets
                            && c.relays.iter().any(|r| {
                                r.ips.iter().any(|a| {
                                    p.ips.iter().any(|b| route::subnet(a) == route::subnet(b))
                                })
                            });
                        c.dest = Some(p);
                        c.dest_record = Some(rec);
                        if clash {
                            // Now that the destination's subnet is known, a
                            // fresh path can avoid it.
                            self.out_failed(now, id, None, "relay shares the destination's subnet");
                        } else {
                            self.advance(now, id);
                        }
                    }
                    None => {
                        self.circ.stats.drops.malformed += 1;
                        self.circ.build_fails.insert(dst, (MAX_BUILD_FAILS, now));
                        self.out_failed(now, id, None, "destination not found");
                    }
                }
            }
            cmd::READY if is_dest && c.stage == Stage::Authing => {
                c.stage = Stage::Ready;
                c.step_started = now;
                let dst = c.dst;
                tracing::info!(
                    circuit = id,
                    relays = c.relays.len(),
                    ms = now.saturating_duration_since(c.created).as_millis() as u64,
                    "circuit ready"
                );
                tracing::debug!(circuit = id, %dst, "circuit ready");
                self.circ.build_fails.remove(&dst);
                // The replacement takes over from the circuit it replaces.
                let old = self.circ.by_dst.insert(dst, id);
                if let Some(old) = old.filter(|o| *o != id) {
                    self.close_out(now, old);
                }
                let queue = std::mem::take(&mut self.circ.out.get_mut(&id)?.queue);
                for p in queue {
                    if let Ok(view) = Ipv6View::new_checked(&p) {
                        if let Some((link, len)) = self.out_data(id, view) {
                            self.send_cell(now, link, len);
                        }
                    }
                }
            }
            cmd::REFUSED if is_dest => {
                let dst = c.dst;
                self.circ.build_fails.insert(dst, (MAX_BUILD_FAILS, now));
                self.out_failed(now, id, None, "destination refused us");
            }
            _ => self.circ.stats.drops.bad_kind += 1,
        }
        None
    }

    /// Takes the next build step of circuit `id`.
    fn advance(&mut self, now: Instant, id: u64) {
        let Some(c) = self.circ.out.get_mut(&id) else {
            return;
        };
        c.step_started = now;
        let built = c.hops.len();
        let target = built - 1;
        let next = if built < c.relays.len() {
            Some(c.relays[built].clone())
        } else if built == c.relays.len() {
            match &c.dest {
                Some(d) => Some(d.clone()),
                None => {
                    c.stage = Stage::Looking;
                    let addr = c.dst.octets();
                    self.send_out(now, id, target, cmd::LOOKUP, &addr);
                    return;
                }
            }
        } else {
            None
        };
        match next {
            Some(p) => {
                let (hs, create) = ClientHandshake::start(&mut self.rng, p.id, p.onion);
                c.pending = Some(hs);
                c.stage = Stage::Extending;
                let mut data = Vec::with_capacity(64 + 19 + CREATE_LEN);
                data.extend_from_slice(&p.id.0);
                data.extend_from_slice(&p.link_key);
                put_endpoint(&mut data, p.endpoint);
                data.extend_from_slice(&create);
                self.send_out(now, id, target, cmd::EXTEND, &data);
            }
            None => {
                // The destination is the last hop: prove who we are to it.
                c.stage = Stage::Authing;
                let Some(dest) = c.dest.as_ref().map(|d| d.id) else {
                    return;
                };
                let msg = auth_message(&dest, &c.hops[target].keys.bind);
                let sig = self.identity.sign(&msg);
                let rec = &self.record_bytes;
                let mut data = Vec::with_capacity(2 + rec.len() + sig.len());
                data.extend_from_slice(&(rec.len() as u16).to_be_bytes());
                data.extend_from_slice(rec);
                data.extend_from_slice(&sig);
                if data.len() > MAX_DATA {
                    tracing::warn!("our record is too large to authenticate on a circuit");
                    return;
                }
                self.send_out(now, id, target, cmd::AUTH, &data);
            }
        }
    }

    /// Ends circuit `id` (telling its first hop).
    fn close_out(&mut self, now: Instant, id: u64) {
        if let Some(c) = self.circ.out.remove(&id) {
            self.circ.on_link.remove(&(c.link, c.circ));
            if self.circ.by_dst.get(&c.dst) == Some(&id) {
                self.circ.by_dst.remove(&c.dst);
            }
            self.send_plain(now, c.link, c.circ, KIND_DESTROY, &[0]);
        }
    }

    /// Circuit `id` failed (`bad`: the hop to blame, if known); a new one
    /// is built at once for the packets waiting, if it was in use.
    fn out_failed(&mut self, now: Instant, id: u64, bad: Option<NodeId>, why: &str) {
        let Some(c) = self.circ.out.get_mut(&id) else {
            return;
        };
        let (dst, in_use) = (c.dst, now.saturating_duration_since(c.last_used) < OUT_IDLE);
        let queue = std::mem::take(&mut c.queue);
        let replaced_by = c.replaced_by;
        tracing::info!(circuit = id, "circuit failed: {why}");
        tracing::debug!(circuit = id, %dst, "circuit failed");
        if let Some(b) = bad {
            // Out of the pool (it comes back from the DHT if it lives) and
            // not picked again for a while.
            self.circ.bad.insert(b, now);
            self.circ.pool.remove(&b);
        }
        self.close_out(now, id);
        let fails = self.circ.build_fails.entry(dst).or_insert((0, now));
        if now.saturating_duration_since(fails.1) >= FAILED_FOR {
            fails.0 = 0;
        }
        fails.0 += 1;
        fails.1 = now;
        if fails.0 >= MAX_BUILD_FAILS || !in_use {
            return;
        }
        if replaced_by.is_some_and(|r| self.circ.out.contains_key(&r)) {
            return;
        }
        if let Some((min, max)) = self.config.routes.for_addr(&dst).relays() {
            if let Ok(new) = self.build_circuit(now, dst, min, max) {
                if let Some(n) = self.circ.out.get_mut(&new) {
                    n.queue = queue;
                }
            }
        }
    }

    /// A link went away: every circuit using it ends, and the other side
    /// of each is told.
    pub(super) fn circuits_link_gone(&mut self, now: Instant, link: u32) {
        let on: Vec<((u32, u32), CircRef)> = self
            .circ
            .on_link
            .iter()
            .filter(|((l, _), _)| *l == link)
            .map(|(k, v)| (*k, *v))
            .collect();
        for (key, r) in on {
            self.circ.on_link.remove(&key);
            match r {
                CircRef::Prev(h) => self.drop_hop(now, h, false, true),
                CircRef::Next(h) => self.drop_hop(now, h, true, false),
                CircRef::Out(id) => {
                    let bad = self
                        .circ
                        .out
                        .get(&id)
                        .and_then(|c| c.relays.first().map(|p| p.id));
                    self.out_failed(now, id, bad, "link to the first hop is gone")
                }
            }
        }
        self.circ.per_neighbour.remove(&link);
        self.circ.create_rate.remove(&link);
    }

    // ---- sending on inbound circuits --------------------------------------

    /// If a circuit from `dst` brought traffic lately, the packet goes back
    /// on it. Returns None when there is no such circuit.
    pub(super) fn inbound_route(&self, now: Instant, dst: &Ipv6Addr) -> Option<u64> {
        let h = *self.circ.inbound_by_src.get(dst)?;
        let hc = self.circ.hops.get(&h)?;
        let fresh = now.saturating_duration_since(hc.last_used) <= INBOUND_FRESH;
        (fresh || !self.circ.by_dst.contains_key(dst)).then_some(h)
    }

    /// Sends a packet back on inbound circuit `h` (see [`Node::inbound_route`]).
    pub(super) fn inbound_send(
        &mut self,
        now: Instant,
        view: Ipv6View<'_>,
        h: u64,
    ) -> TunOutcome<'_> {
        if view.bytes().len() > CIRCUIT_MTU {
            self.drops.too_big += 1;
            return self.icmp_reply(
                now,
                view,
                wire::ICMPV6_PACKET_TOO_BIG,
                0,
                CIRCUIT_MTU as u32,
            );
        }
        let frame = self.circuit_frame(view);
        if frame.len() > MAX_DATA {
            return TunOutcome::Nothing;
        }
        let size = self.cell_size(frame.len());
        let Some(hc) = self.circ.hops.get_mut(&h) else {
            return TunOutcome::Nothing;
        };
        hc.ctr += 1;
        hc.tx_bytes += view.bytes().len() as u64;
        let (link, circ) = hc.prev;
        let (head, body) = self.bufs.cell[..size].split_at_mut(CELL_HEADER);
        let n = hc.keys.originate(hc.ctr, cmd::DATA, &frame, body);
        onion::write_header(head, circ, KIND_RELAY, &n);
        if let Some(l) = self.links.get_mut(&link) {
            l.last_used = now;
        }
        match self.encap_cell(link, size) {
            Some((ep, n)) => TunOutcome::Send(ep, &self.bufs.a[..n]),
            None => TunOutcome::Nothing,
        }
    }

    /// Circuits this node built.
    pub(super) fn out_circuits(&self) -> usize {
        self.circ.out.len()
    }

    /// A cell frame of a size no cell has.
    pub(super) fn circ_bad_size(&mut self) {
        self.circ.stats.drops.bad_size += 1;
    }

    // ---- timers, pool, keys -------------------------------------------------

    /// Relays from the routing table go into the pool.
    fn fill_pool_from_table(&mut self, now: Instant) {
        let mut key = [0u8; 32];
        self.rng.fill_bytes(&mut key);
        let contacts = self.dht.closest(&key, 64);
        self.add_to_pool(now, &contacts);
    }

    pub(super) fn add_to_pool(&mut self, now: Instant, contacts: &[Contact]) {
        let unix = self.dht.unix(now);
        for c in contacts {
            if c.info.roles & ROLE_RELAY == 0 || c.info.id == self.node_id() {
                continue;
            }
            if self.circ.pool.len() >= POOL_MAX && !self.circ.pool.contains_key(&c.info.id) {
                break;
            }
            if let Some(p) = Peer::from_record(&c.record) {
                let newer = self
                    .circ
                    .pool
                    .get(&p.id)
                    .is_none_or(|(_, seq, _)| *seq < c.info.seq);
                if newer && c.info.expires > unix {
                    self.circ.pool.insert(p.id, (p, c.info.seq, c.info.expires));
                }
            }
        }
    }

    /// Circuit timers: probes, build and idle timeouts, replacement, noise,
    /// onion key rotation, the relay pool.
    pub(super) fn circuit_timers(&mut self, now: Instant) {
        // Onion key rotation (the record is re-signed with the new key).
        if now.saturating_duration_since(self.circ.onion_since) >= ONION_ROTATE {
            let new = OnionKey::generate(&mut self.rng);
            self.circ.prev_onion = Some(std::mem::replace(&mut self.circ.onion, new));
            self.circ.onion_since = now;
            let eps = self.ext.endpoints.clone();
            self.resign(now, eps);
        }
        self.circ
            .bad
            .retain(|_, t| now.saturating_duration_since(*t) < BAD_FOR);
        self.circ
            .build_fails
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < FAILED_FOR);
        self.circ.notes.sweep(now);
        // The pool: from the table, and random lookups further afield.
        let interval = if self.circ.pool.len() < POOL_SMALL {
            POOL_INTERVAL_SMALL
        } else {
            POOL_INTERVAL
        };
        let wants_pool = self.config.has_tun
            && (self.config.routes.default.relays().is_some()
                || self
                    .config
                    .routes
                    .routes
                    .iter()
                    .any(|r| r.policy.relays().is_some()));
        let unix = self.dht.unix(now);
        self.circ.pool.retain(|_, (_, _, expires)| *expires > unix);
        if wants_pool
            && self.dht.table_len() > 0
            && self
                .circ
                .last_pool_fill
                .is_none_or(|t| now.saturating_duration_since(t) >= interval)
        {
            self.circ.last_pool_fill = Some(now);
            self.fill_pool_from_table(now);
            let mut key = [0u8; 32];
            self.rng.fill_bytes(&mut key);
            if let Some(id) = self.dht.lookup(now, Goal::Closest(key)) {
                self.purposes.insert(id, Purpose::Pool);
            }
        }
        // Circuits we built.
        let ids: Vec<u64> = self.circ.out.keys().copied().collect();
        for id in ids {
            let Some(c) = self.circ.out.get(&id) else {
                continue;
            };
            if c.stage != Stage::Ready {
                if now.saturating_duration_since(c.step_started) > STEP_TIMEOUT {
                    let blame = match c.stage {
                        Stage::Extending => c
                            .relays
                            .get(c.hops.len())
                            .map(|p| p.id)
                            .or(c.dest.as_ref().map(|d| d.id)),
                        _ => None,
                    };
                    self.out_failed(now, id, blame, "build step timed out");
                }
                continue;
            }
            if now.saturating_duration_since(c.last_used) > OUT_IDLE {
                tracing::debug!(circuit = id, "closing an idle circuit");
                self.close_out(now, id);
                continue;
            }
            // A hop that stopped answering probes fails the circuit.
            let dead = c
                .hops
                .iter()
                .position(|h| now.saturating_duration_since(h.last_reply) > PROBE_DEAD);
            if let Some(i) = dead {
                // The first silent hop is to blame (later ones can't answer
                // through it).
                let blame = c.hops[i].id;
                self.out_failed(now, id, Some(blame), "a hop stopped answering probes");
                continue;
            }
            if now.saturating_duration_since(c.last_probe) >= PROBE_INTERVAL {
                let n = c.hops.len();
                if let Some(c) = self.circ.out.get_mut(&id) {
                    c.last_probe = now;
                }
                for target in 0..n {
                    let mut nonce = [0u8; 8];
                    self.rng.fill_bytes(&mut nonce);
                    self.send_out(now, id, target, cmd::PROBE, &nonce);
                }
            }
            // Make before break: a replacement after the circuit's lifetime.
            let Some(c) = self.circ.out.get(&id) else {
                continue;
            };
            if now.saturating_duration_since(c.created) > CIRCUIT_LIFETIME
                && c.replaced_by
                    .is_none_or(|r| !self.circ.out.contains_key(&r))
            {
                let dst = c.dst;
                if let Some((min, max)) = self.config.routes.for_addr(&dst).relays() {
                    let new = self.build_circuit(now, dst, min, max).ok();
                    if let Some(c) = self.circ.out.get_mut(&id) {
                        c.replaced_by = new;
                    }
                }
            }
            self.noise(now, id);
        }
        // Circuits we carry.
        let stale: Vec<u64> = self
            .circ
            .hops
            .iter()
            .filter(|(_, h)| {
                now.saturating_duration_since(h.last_used) > HOP_IDLE
                    || h.extending
                        .is_some_and(|t| now.saturating_duration_since(t) > EXTEND_TIMEOUT)
            })
            .map(|(k, _)| *k)
            .collect();
        for h in stale {
            let extending = self.circ.hops.get(&h).and_then(|hc| hc.extending);
            if extending.is_some() {
                self.originate(now, h, cmd::EXTEND_FAILED, &[5]);
            }
            self.drop_hop(now, h, true, true);
        }
        self.circ.stats.circuits = self.circ.hops.len();
    }

    /// Cover traffic on a ready circuit: NOISE cells for the destination,
    /// which look like DATA to every relay.
    fn noise(&mut self, now: Instant, id: u64) {
        let rate = self.config.traffic.noise_rate;
        if rate <= 0.0 {
            return;
        }
        let (lo, hi) = self.config.traffic.noise_size;
        loop {
            let Some(c) = self.circ.out.get_mut(&id) else {
                return;
            };
            let due = *c.next_noise.get_or_insert(now);
            if due > now {
                return;
            }
            // Exponential gaps (a Poisson process) at the configured rate.
            let u = (self.rng.next_u32() as f64 + 1.0) / (u32::MAX as f64 + 2.0);
            let gap = (-u.ln() / rate).min(60.0);
            c.next_noise = Some(due + Duration::from_secs_f64(gap));
            let target = c.hops.len() - 1;
            let span = hi.saturating_sub(lo) as u32 + 1;
            let size = (lo + (self.rng.next_u32() % span) as usize).min(MAX_DATA);
            let mut junk = vec![0u8; size];
            self.rng.fill_bytes(&mut junk);
            self.send_out(now, id, target, cmd::NOISE, &junk);
            if now.saturating_duration_since(due) > Duration::from_secs(1) {
                // Don't catch up on a backlog after a stall.
                if let Some(c) = self.circ.out.get_mut(&id) {
                    c.next_noise = Some(now);
                }
                return;
            }
        }
    }

    /// Relay counters.
    pub(super) fn relay_stats(&self) -> RelayStats {
        let mut s = self.circ.stats;
        s.enabled = self.config.relay.enabled;
        s.circuits = self.circ.hops.len();
        s
    }

    /// Circuits built here, carried, and ending here.
    pub fn circuits(&self, now: Instant) -> CircuitsReport {
        let mut circuits: Vec<CircuitView> = self
            .circ
            .out
            .iter()
            .map(|(id, c)| CircuitView {
                id: *id,
                destination: c.dst,
                destination_node: c.dest.as_ref().map(|d| d.id),
                hops: c.relays.iter().map(|p| p.id).collect(),
                state: if c.stage == Stage::Ready {
                    "ready"
                } else {
                    "building"
                },
                age_secs: now.saturating_duration_since(c.created).as_secs_f64(),
                tx_bytes: c.tx_bytes,
                rx_bytes: c.rx_bytes,
                mtu: CIRCUIT_MTU,
            })
            .collect();
        circuits.sort_by_key(|c| c.id);
        let mut relayed = Vec::new();
        let mut inbound = Vec::new();
        for hc in self.circ.hops.values() {
            let prev = self.neighbour(hc.prev.0);
            let age_secs = now.saturating_duration_since(hc.created).as_secs_f64();
            if hc.next.is_some() {
                relayed.push(RelayedView {
                    prev,
                    next: hc.next.and_then(|(l, _)| self.neighbour(l)),
                    age_secs,
                    fwd_bytes: hc.fwd_bytes,
                    bwd_bytes: hc.bwd_bytes,
                });
            } else {
                inbound.push(InboundView {
                    source: hc.auth,
                    prev,
                    age_secs,
                    rx_bytes: hc.rx_bytes,
                    tx_bytes: hc.tx_bytes,
                });
            }
        }
        CircuitsReport {
            circuits,
            relayed,
            inbound,
            pool: self.circ.pool.len(),
            routing: self.routing_summary(),
            no_circuit: self.route_notes(now),
        }
    }

    /// Test hook: injects an application packet into circuit `id` as DATA,
    /// whatever its source address says (to show the destination's check).
    #[cfg(test)]
    pub(super) fn inject_data(&mut self, now: Instant, dst: Ipv6Addr, packet: &[u8]) -> bool {
        let Some(&id) = self.circ.by_dst.get(&dst) else {
            return false;
        };
        let Ok(view) = Ipv6View::new_checked(packet) else {
            return false;
        };
        match self.out_data(id, view) {
            Some((link, len)) => {
                self.send_cell(now, link, len);
                true
            }
            None => false,
        }
    }

    /// Test hook: the cells forwarded since the last call.
    #[cfg(feature = "test-hooks")]
    pub fn take_cell_log(&mut self) -> Vec<(bool, Vec<u8>, Vec<u8>)> {
        std::mem::take(&mut self.circ.cell_log)
    }

    /// Whether a ready circuit to `dst` exists (tests).
    pub fn circuit_ready(&self, dst: &Ipv6Addr) -> bool {
        self.circ
            .by_dst
            .get(dst)
            .and_then(|id| self.circ.out.get(id))
            .is_some_and(|c| c.stage == Stage::Ready)
    }
}
