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
//!
//! This file holds the shared state (`Circuits` and the circuit types), the
//! constants and the types the node exports. Three parts have state of
//! their own: [`pool`] (the relays paths are drawn from), [`outbound`] (the
//! circuits this node builds, the one per destination packets take, failed
//! builds, opening reply cells) and [`hops`] (the circuits this node carries or ends, and their
//! indexes). The `impl Node`
//! parts are in [`cells`] (link plumbing and the entry for arriving cells),
//! [`source`] (circuits this node builds), [`relay`] (cells for circuits it
//! carries or ends), [`timers`] (upkeep, feeding the pool), [`routing`]
//! (relays or direct) and [`report`] (what `qgate circuits` and
//! `qgate status` show).

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;
use serde::Serialize;

use crate::proto::compress::Adaptive;
use crate::proto::identity::{NodeId, NodeRecord, RecordExt};
use crate::proto::limit::{ByteBucket, Limit};
use crate::proto::onion::{
    self, auth_message, wrap, CellKind, ClientHandshake, Cmd, HopKeys, OnionError, OnionKey,
    ReplayWindow, CELL_HEADER, CELL_LARGE, MAX_DATA,
};

mod cells;
mod hops;
mod outbound;
mod pool;
mod relay;
mod report;
mod routing;
mod source;
mod timers;
#[cfg(test)]
pub(in crate::proto::node) use hops::pair;
use hops::{HopCirc, HopTable};
use outbound::OutTable;
use pool::RelayPool;
pub use report::{CircuitView, CircuitsReport, InboundView, RelayedView};
use routing::RouteNotes;
pub use routing::{RouteNoteView, RouteOutcome, RoutingSummary};

/// The relay bandwidth cap's budget at `rate` bytes a second: a burst of a
/// tenth of a second's worth, at least a few large cells.
pub(super) fn relay_bucket(rate: u64) -> ByteBucket {
    ByteBucket::new(rate, 4 * CELL_LARGE as u64)
}

/// Largest packet a circuit carries (as is; compressed ones may be larger
/// before compression, but the kernel is told this).
pub const CIRCUIT_MTU: usize = MAX_DATA;
/// How often a ready circuit probes each of its hops.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A hop silent this long (probes unanswered) fails the circuit.
const PROBE_DEAD: Duration = Duration::from_millis(3500);
/// A node that heard nothing on any link for this long (and since a build
/// step began) is cut off: the relay that step waits on is not blamed.
/// Longer than a WireGuard keepalive (10 s by default), since idle links
/// are that quiet.
const LIVENESS: Duration = Duration::from_secs(15);
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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
    /// Shared with the data plane when it sends on the circuit (read-only).
    keys: Arc<HopKeys>,
    ctr: CellCounter,
    replay: Arc<ReplayWindow>,
    last_reply: Instant,
}

/// The count of the cells a source sent to one hop of its circuit, or a
/// hop sent back to the source, each numbered by it. Shared with the data
/// plane, which numbers the DATA it sends on the circuit from the same
/// count; the receiving end's replay window takes
/// the numbers in any order within its width (2,048). A number the node
/// took reaches the wire behind at most what the plane sends meanwhile: a
/// TUN read (`TSO_SEGMENTS` packets, 1,366) and the rest of one hold of
/// the node, so the window covers it; longer holds or larger reads would
/// have the destination refuse the node's probes as replays.
#[derive(Clone, Debug, Default)]
pub(in crate::proto::node) struct CellCounter(Arc<AtomicU64>);

impl CellCounter {
    /// The next cell's number (the first is 1).
    pub(in crate::proto::node) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A signature the node needs and does not make itself: RSA signing takes
/// milliseconds, and packets must not wait behind it. The node hands the
/// job out ([`Node::poll_sign`]); whoever drives it signs `message` with
/// [`Node::signer`], away from the data path, and hands the signature back
/// ([`Node::signed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignJob {
    /// What the signature is for.
    pub what: Signing,
    /// What to sign.
    pub message: Vec<u8>,
}

/// What a [`SignJob`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signing {
    /// A circuit's AUTH: the source proving its identity to the
    /// destination.
    Auth { circuit: u64 },
    /// The node's own record, with this sequence number.
    Record { seq: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// CREATE or EXTEND sent for hop `hops.len()`.
    Extending,
    /// LOOKUP sent to the last relay.
    Looking,
    /// The destination is built; AUTH waits for its signature (a
    /// [`SignJob`] out).
    Signing,
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
    /// Which of its flows are worth compressing (as on a link).
    adaptive: Adaptive,
}

impl OutCirc {
    /// A circuit to `dst` being built through `relays`: CREATE sent to the
    /// first (`pending`: its handshake) on `(link, circ)`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        now: Instant,
        dst: Ipv6Addr,
        relays: Vec<Peer>,
        dest_record: Option<Vec<u8>>,
        dest: Option<Peer>,
        pending: Option<ClientHandshake>,
        (link, circ): (u32, u32),
    ) -> OutCirc {
        OutCirc {
            dst,
            relays,
            dest,
            dest_record,
            hops: Vec::new(),
            pending,
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
            adaptive: Adaptive::default(),
        }
    }

    /// The relay the build waits on while extending (None when the next
    /// hop is the destination).
    fn next_relay(&self) -> Option<NodeId> {
        self.relays.get(self.hops.len()).map(|p| p.id)
    }

    /// What the source signs to authenticate to the destination: bound to
    /// the destination and to the last hop's handshake. None before that
    /// hop is built.
    fn auth_message(&self) -> Option<Vec<u8>> {
        let dest = self.dest.as_ref()?.id;
        Some(auth_message(&dest, &self.hops.last()?.keys.bind))
    }
}

impl AsRef<HopKeys> for BuiltHop {
    fn as_ref(&self) -> &HopKeys {
        &self.keys
    }
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
    /// Circuits this node builds, the one per destination packets take,
    /// failed builds per destination.
    out: OutTable,
    /// Circuits this node carries or ends.
    hops: HopTable,
    /// Circuit IDs on links: of circuits built here and carried here.
    /// Ordered, so that a link's circuits are one range when it goes (a
    /// relay holds thousands; the cells that still reach the node pay a
    /// logarithm for it, those the plane handles nothing).
    on_link: BTreeMap<(u32, u32), CircRef>,
    next_id: u64,
    onion: OnionKey,
    prev_onion: Option<OnionKey>,
    onion_since: Instant,
    /// Relays paths are drawn from, and relays blamed lately.
    pool: RelayPool,
    /// Destinations without a circuit for want of relays, and why.
    notes: RouteNotes,
    stats: RelayStats,
    /// The relay bandwidth cap's budget, for the cells this node passes
    /// on itself (a data plane keeps its own, [`relay_bucket`]).
    bandwidth: Option<ByteBucket>,
    /// AUTH signatures to make (see [`SignJob`]).
    to_sign: VecDeque<SignJob>,
    /// Where cover traffic's random bytes are made, reused (`noise`).
    noise_buf: Vec<u8>,
    /// The circuits' own randomness (the relay's handshakes, plain cells'
    /// nonces and padding, circuit IDs), seeded from the node's.
    rng: ChaCha20Rng,
    /// What the relay's side asks the node to do ([`relay::HopAction`]).
    actions: VecDeque<relay::HopAction>,
    /// Frames of sent [`relay::HopAction::Send`]s, to reuse.
    frames: Vec<Vec<u8>>,
    /// Cells forwarded as relay, as (forward?, in, out), for the test hook.
    #[cfg(feature = "test-hooks")]
    pub(super) cell_log: Vec<(bool, Vec<u8>, Vec<u8>)>,
    /// Whether the cell log records (off unless the shell turns it on).
    #[cfg(feature = "test-hooks")]
    cell_log_on: bool,
}

impl Circuits {
    /// `bandwidth`: the relay bandwidth cap, bytes a second.
    pub(super) fn new(
        rng: &mut (impl RngCore + rand_core::CryptoRng),
        now: Instant,
        bandwidth: Option<u64>,
    ) -> Circuits {
        Circuits {
            out: OutTable::default(),
            hops: HopTable::new(MAX_HOP_CIRCUITS, MAX_PER_NEIGHBOUR),
            on_link: BTreeMap::new(),
            next_id: 1,
            to_sign: VecDeque::new(),
            noise_buf: Vec::new(),
            rng: ChaCha20Rng::from_seed({
                let mut seed = [0u8; 32];
                rng.fill_bytes(&mut seed);
                seed
            }),
            actions: VecDeque::new(),
            frames: Vec::new(),
            onion: OnionKey::generate(rng),
            prev_onion: None,
            onion_since: now,
            pool: RelayPool::default(),
            notes: RouteNotes::default(),
            stats: RelayStats::default(),
            bandwidth: bandwidth.map(relay_bucket),
            #[cfg(feature = "test-hooks")]
            cell_log: Vec::new(),
            #[cfg(feature = "test-hooks")]
            cell_log_on: false,
        }
    }

    pub(super) fn onion_public(&self) -> [u8; 32] {
        self.onion.public
    }

    /// The circuit IDs on `link` and whose they are.
    fn on_link_of(&self, link: u32) -> Vec<((u32, u32), CircRef)> {
        self.on_link
            .range((link, 0)..=(link, u32::MAX))
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// Forgets a circuit ID on a link.
    fn forget(&mut self, key: (u32, u32)) {
        self.on_link.remove(&key);
    }
}

/// Builds a forward cell for hop `target` of circuit `c` in `cell`;
/// returns (first link, cell length).
fn wrap_into(
    c: &mut OutCirc,
    target: usize,
    command: Cmd,
    data: &[u8],
    cell: &mut [u8],
    always_large: bool,
) -> Option<(u32, usize)> {
    let size = onion::cell_size_for(data.len(), always_large).unwrap_or(CELL_LARGE);
    let counter = c.hops.get(target)?.ctr.next();
    let (head, body) = cell.get_mut(..size)?.split_at_mut(CELL_HEADER);
    let n = wrap(&c.hops, target, counter, command, data, body);
    onion::write_header(head, c.circ, CellKind::Relay, &n);
    Some((c.link, size))
}

/// Counts a cell dropped for `e`.
pub(in crate::proto::node) fn count(d: &mut CellDrops, e: OnionError) {
    match e {
        OnionError::BadSize => d.bad_size += 1,
        OnionError::BadKind | OnionError::BadCommand => d.bad_kind += 1,
        OnionError::Forged | OnionError::BadAuth => d.forged += 1,
        OnionError::Replay => d.replay += 1,
        OnionError::Unrecognised => d.unrecognised += 1,
        _ => d.malformed += 1,
    }
}
