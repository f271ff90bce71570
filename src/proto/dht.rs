//! The Kademlia DHT over node IDs, sans-IO.
//!
//! A [`Dht`] is fed messages from neighbours (already authenticated by the
//! link they came on, so `from` is a verified [`Contact`]) and `now`; it
//! queues messages to send with [`Dht::poll_transmit`] and reports finished
//! lookups with [`Dht::poll_event`]. It never touches sockets or clocks, so
//! the simulator (tests/sim) runs ten thousand of them in one thread.
//!
//! Hardening, after S/Kademlia:
//! - every record is checked (signature, ID bound to key, expiry, size)
//!   before it is stored, forwarded or used; the check is the [`Records`]
//!   seam, RSA in the node and a cheap oracle in the simulator;
//! - lookups run along [`PATHS`] disjoint paths: no node is asked by two
//!   paths, so a path that strays among liars can't spoil the others;
//! - buckets prefer long-lived nodes: a full bucket keeps its entries and
//!   puts newcomers in a small replacement cache, used only when an entry
//!   fails repeatedly. Many fresh IDs generated near a target can't push
//!   out the nodes that were there first;
//! - per-peer request budgets, bounded buckets, bounded value storage
//!   (per key and in total), bounded concurrent lookups.
//!
//! Messages (inside one node-protocol message, so at most
//! [`MAX_MESSAGE`](crate::proto::message::MAX_MESSAGE) bytes; big-endian):
//!
//! ```text
//! FIND    1 | txid u32 | flags u8 (1 = values too) | target [32]
//! REPLY   2 | txid u32 | nvalues u8 | (len u16 | value record)* |
//!                        nnodes u8  | (len u16 | node record)*
//! STORE   3 | txid u32 | kind u8 (1 node record, 2 value record) | record
//! STORED  4 | txid u32 | ok u8
//! PING    5 | txid u32
//! PONG    6 | txid u32
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::identity::NodeId;

/// A position in the ID space.
pub type Key = [u8; 32];

/// Bucket size.
pub const K: usize = 16;
/// Contacts in one reply.
pub const REPLY_CONTACTS: usize = 8;
/// Disjoint lookup paths.
pub const PATHS: usize = 3;
/// Queries in flight per path.
pub const PATH_ALPHA: usize = 1;
/// Nodes a record or value is stored at.
pub const REPLICATION: usize = 8;
/// An unanswered request counts as failed after this long.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// A lookup gives up after this many queries.
pub const MAX_LOOKUP_QUERIES: usize = 60;
/// A lookup gives up after this long.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(20);
/// Lookups running at once (further ones are refused).
pub const MAX_LOOKUPS: usize = 64;
/// Buckets are refreshed when no lookup went through them for this long.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(3600);
/// Own record and own values are stored again this often.
pub const REPUBLISH_INTERVAL: Duration = Duration::from_secs(1800);
/// Replacement candidates kept per bucket.
pub const REPLACEMENTS: usize = 4;
/// Failed requests in a row after which an entry is dropped.
pub const MAX_FAILS: u8 = 2;
/// Entries per bucket sharing one IP address (sim contacts have none).
pub const MAX_PER_IP: usize = 2;
/// Requests a peer may send per second, on average.
pub const REQUEST_RATE: f64 = 20.0;
/// Requests a peer may send in a burst.
pub const REQUEST_BURST: f64 = 60.0;
/// Peers tracked for rate limiting before the table is reset.
const MAX_RATE_PEERS: usize = 8192;
/// Largest value in a value record.
pub const MAX_VALUE_LEN: usize = 1024;
/// Entries (publishers) kept under one key.
pub const MAX_VALUES_PER_KEY: usize = 20;
/// Value entries one publisher may have here.
pub const MAX_VALUES_PER_PUBLISHER: usize = 64;
/// Value entries kept in total.
pub const MAX_VALUES: usize = 8192;
/// Node records stored for others (STORE of node records) in total.
pub const MAX_STORED_RECORDS: usize = 2048;
/// Largest record of either kind accepted in a message.
pub const MAX_RECORD_BYTES: usize = 2048;
/// Bytes of values put into one reply (the rest wait for another node).
const REPLY_VALUE_BUDGET: usize = 20 * 1024;

const T_FIND: u8 = 1;
const T_REPLY: u8 = 2;
const T_STORE: u8 = 3;
const T_STORED: u8 = 4;
const T_PING: u8 = 5;
const T_PONG: u8 = 6;
const STORE_NODE: u8 = 1;
const STORE_VALUE: u8 = 2;

/// What the DHT needs to know of a node record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    /// Whose record.
    pub id: NodeId,
    /// Sequence number (higher replaces lower).
    pub seq: u64,
    /// Unix time it expires.
    pub expires: u64,
    /// Role bits.
    pub roles: u8,
    /// First endpoint's IP, for bucket diversity.
    pub ip: Option<IpAddr>,
}

/// What the DHT needs to know of a value record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueInfo {
    /// Where it lives in the ID space (hash of namespace and key).
    pub target: Key,
    /// Who signed it.
    pub publisher: NodeId,
    /// Sequence number per (target, publisher).
    pub seq: u64,
    /// Unix time it expires.
    pub expires: u64,
}

/// Why a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Bad format or signature, or the ID is not the key's.
    #[error("forged or malformed record")]
    Forged,
    /// Past its expiry (or no expiry at all).
    #[error("expired record")]
    Expired,
    /// Larger than allowed.
    #[error("oversized record")]
    Oversized,
}

/// The seam between the DHT and record signatures: RSA in the node
/// ([`crate::proto::records::RsaRecords`]), a cheap oracle in the simulator.
pub trait Records {
    /// Checks a node record; `now_unix` for its expiry.
    fn check_node(&mut self, bytes: &[u8], now_unix: u64) -> Result<RecordInfo, RecordError>;
    /// Checks a value record.
    fn check_value(&mut self, bytes: &[u8], now_unix: u64) -> Result<ValueInfo, RecordError>;
}

/// A node as the DHT knows it: its checked record.
#[derive(Clone, Debug)]
pub struct Contact {
    /// The record's facts.
    pub info: RecordInfo,
    /// The record itself.
    pub record: Arc<[u8]>,
}

/// Where a routing-table entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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

/// A DHT message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Asks for the nodes closest to `target` (and values stored there).
    Find {
        /// Transaction.
        txid: u32,
        /// Where.
        target: Key,
        /// Whether values are wanted too.
        values: bool,
    },
    /// Answers a FIND.
    Reply {
        /// Transaction.
        txid: u32,
        /// Value records.
        values: Vec<Vec<u8>>,
        /// Node records.
        nodes: Vec<Vec<u8>>,
    },
    /// Asks to store a node record (`node`) or a value record.
    Store {
        /// Transaction.
        txid: u32,
        /// Node record if true, else value record.
        node: bool,
        /// The record.
        record: Vec<u8>,
    },
    /// Answers a STORE.
    Stored {
        /// Transaction.
        txid: u32,
        /// Whether it was kept.
        ok: bool,
    },
    /// Liveness check.
    Ping {
        /// Transaction.
        txid: u32,
    },
    /// Answers a PING.
    Pong {
        /// Transaction.
        txid: u32,
    },
}

/// A DHT message that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed DHT message")]
pub struct BadMessage;

struct Rd<'a>(&'a [u8]);
impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadMessage> {
        if self.0.len() < n {
            return Err(BadMessage);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BadMessage> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BadMessage> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, BadMessage> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn records(&mut self) -> Result<Vec<Vec<u8>>, BadMessage> {
        let n = self.u8()? as usize;
        let mut out = Vec::with_capacity(n.min(32));
        for _ in 0..n {
            let len = self.u16()? as usize;
            if len > MAX_RECORD_BYTES {
                return Err(BadMessage);
            }
            out.push(self.take(len)?.to_vec());
        }
        Ok(out)
    }
}

fn put_records(out: &mut Vec<u8>, recs: &[Vec<u8>]) {
    out.push(recs.len() as u8);
    for r in recs {
        out.extend_from_slice(&(r.len() as u16).to_be_bytes());
        out.extend_from_slice(r);
    }
}

impl Msg {
    /// Encodes the message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Msg::Find {
                txid,
                target,
                values,
            } => {
                out.push(T_FIND);
                out.extend_from_slice(&txid.to_be_bytes());
                out.push(*values as u8);
                out.extend_from_slice(target);
            }
            Msg::Reply {
                txid,
                values,
                nodes,
            } => {
                out.push(T_REPLY);
                out.extend_from_slice(&txid.to_be_bytes());
                put_records(&mut out, values);
                put_records(&mut out, nodes);
            }
            Msg::Store { txid, node, record } => {
                out.push(T_STORE);
                out.extend_from_slice(&txid.to_be_bytes());
                out.push(if *node { STORE_NODE } else { STORE_VALUE });
                out.extend_from_slice(record);
            }
            Msg::Stored { txid, ok } => {
                out.push(T_STORED);
                out.extend_from_slice(&txid.to_be_bytes());
                out.push(*ok as u8);
            }
            Msg::Ping { txid } => {
                out.push(T_PING);
                out.extend_from_slice(&txid.to_be_bytes());
            }
            Msg::Pong { txid } => {
                out.push(T_PONG);
                out.extend_from_slice(&txid.to_be_bytes());
            }
        }
        out
    }

    /// Decodes a message; never panics.
    pub fn parse(bytes: &[u8]) -> Result<Msg, BadMessage> {
        let mut r = Rd(bytes);
        let ty = r.u8()?;
        let txid = r.u32()?;
        let msg = match ty {
            T_FIND => {
                let values = r.u8()? & 1 != 0;
                let target = r.take(32)?.try_into().expect("32");
                Msg::Find {
                    txid,
                    target,
                    values,
                }
            }
            T_REPLY => {
                let values = r.records()?;
                let nodes = r.records()?;
                Msg::Reply {
                    txid,
                    values,
                    nodes,
                }
            }
            T_STORE => {
                let node = match r.u8()? {
                    STORE_NODE => true,
                    STORE_VALUE => false,
                    _ => return Err(BadMessage),
                };
                let record = std::mem::take(&mut r.0).to_vec();
                if record.len() > MAX_RECORD_BYTES {
                    return Err(BadMessage);
                }
                Msg::Store { txid, node, record }
            }
            T_STORED => Msg::Stored {
                txid,
                ok: r.u8()? != 0,
            },
            T_PING => Msg::Ping { txid },
            T_PONG => Msg::Pong { txid },
            _ => return Err(BadMessage),
        };
        if !r.0.is_empty() {
            return Err(BadMessage);
        }
        Ok(msg)
    }
}

/// XOR distance.
pub fn distance(a: &Key, b: &Key) -> Key {
    let mut d = [0u8; 32];
    for i in 0..32 {
        d[i] = a[i] ^ b[i];
    }
    d
}

/// Number of leading bits `a` and `b` share (256 if equal).
pub fn common_prefix(a: &Key, b: &Key) -> usize {
    for i in 0..32 {
        let x = a[i] ^ b[i];
        if x != 0 {
            return i * 8 + x.leading_zeros() as usize;
        }
    }
    256
}

/// What a lookup is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goal {
    /// One node: the record whose ID starts with `prefix` (32 bytes for a
    /// node ID, 15 for an overlay address), with a sequence number of at
    /// least `min_seq` (to skip a record known to be stale).
    Node {
        /// ID or ID prefix.
        prefix: Vec<u8>,
        /// Lowest acceptable sequence number.
        min_seq: u64,
        /// Only a record with an endpoint will do (to link to the node; a
        /// node that has not learnt its endpoint yet publishes none).
        reachable: bool,
    },
    /// The nodes closest to a key (bucket refresh, join).
    Closest(Key),
    /// Value records stored under a key.
    Values(Key),
}

impl Goal {
    fn target(&self) -> Key {
        match self {
            Goal::Node { prefix, .. } => {
                let mut k = [0u8; 32];
                let n = prefix.len().min(32);
                k[..n].copy_from_slice(&prefix[..n]);
                k
            }
            Goal::Closest(k) | Goal::Values(k) => *k,
        }
    }
    fn matches(&self, c: &Contact) -> bool {
        match self {
            Goal::Node {
                prefix,
                min_seq,
                reachable,
            } => {
                c.info.id.0.starts_with(prefix)
                    && c.info.seq >= *min_seq
                    && (!*reachable || c.info.ip.is_some())
            }
            _ => false,
        }
    }
}

/// Which buckets [`Dht::refresh`] refreshes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Those no lookup went through for [`REFRESH_INTERVAL`].
    Due,
    /// Those not full, each until it is (after joining).
    Join,
    /// All of them (after a mass failure, or on demand).
    All,
}

/// What happens when a lookup for the closest nodes ends.
#[derive(Clone, Debug)]
enum Then {
    Nothing,
    StoreNode(Arc<[u8]>),
    StoreValue(Arc<[u8]>),
}

/// How a lookup ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The node was found.
    Found(Contact),
    /// Not found (or, for [`Goal::Closest`], the closest nodes that answered).
    Closest(Vec<Contact>),
    /// Value records found (checked, newest per publisher).
    Values(Vec<Arc<[u8]>>),
    /// A store finished: how many nodes took the record.
    Stored(usize),
}

/// Something the DHT reports.
#[derive(Clone, Debug)]
pub struct LookupDone {
    /// The id [`Dht::lookup`] returned.
    pub id: u64,
    /// The goal.
    pub goal: Goal,
    /// The result.
    pub outcome: Outcome,
    /// Hops: the query depth at which the answer came (0 = known locally).
    pub hops: u32,
    /// Queries sent.
    pub queries: usize,
    /// How long it took.
    pub elapsed: Duration,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DhtStats {
    /// Requests answered.
    pub requests_in: u64,
    /// Replies received and matched.
    pub replies_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Bytes sent (DHT messages, before link framing).
    pub bytes_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Messages that did not parse.
    pub malformed: u64,
    /// Requests over a peer's budget.
    pub rate_limited: u64,
    /// Replies nobody asked for (or from someone else).
    pub unexpected: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Records refused: forged or malformed.
    pub forged_records: u64,
    /// Records refused: expired.
    pub expired_records: u64,
    /// Records refused: older than one we hold (replayed).
    pub stale_records: u64,
    /// Records refused: too large.
    pub oversized_records: u64,
    /// Values refused: storage full for that key.
    pub store_full: u64,
    /// Lookups started.
    pub lookups: u64,
    /// Lookups that found what they looked for.
    pub lookups_found: u64,
    /// Lookups refused (too many running).
    pub lookups_refused: u64,
    /// Nodes caught passing on forged records (and evicted).
    pub liars: u64,
}

/// A routing-table entry.
#[derive(Clone, Debug)]
struct Entry {
    contact: Contact,
    source: Source,
    added: Instant,
    last_seen: Instant,
    fails: u8,
    /// Has answered or asked us directly. Unproven entries (learned from
    /// replies, the configuration or the store) fill empty slots only,
    /// give way to proven nodes when the bucket is full, and go at their
    /// first failure.
    proven: bool,
}

#[derive(Clone, Debug, Default)]
struct Bucket {
    entries: Vec<Entry>,
    replacements: VecDeque<(Contact, Source)>,
    last_lookup: Option<Instant>,
}

/// A routing-table entry as reported.
#[derive(Clone, Debug, Serialize)]
pub struct EntryView {
    /// Bucket index (bits shared with our ID).
    pub bucket: usize,
    /// Node ID.
    pub id: NodeId,
    /// Record sequence number.
    pub seq: u64,
    /// Record expiry (unix seconds).
    pub expires: u64,
    /// Role bits.
    pub roles: u8,
    /// Where it came from.
    pub source: Source,
    /// Seconds since we heard from it (None: never, in this run).
    pub last_seen_secs: Option<f64>,
    /// Seconds in the table.
    pub age_secs: f64,
    /// Failed requests in a row.
    pub fails: u8,
    /// Whether it waits in the replacement cache.
    pub replacement: bool,
    /// Whether it has talked to us directly.
    pub proven: bool,
    /// The record.
    #[serde(skip)]
    pub record: Arc<[u8]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CandState {
    New,
    Asked,
    Answered,
    Failed,
}

#[derive(Clone, Debug)]
struct Cand {
    contact: Contact,
    dist: Key,
    state: CandState,
    depth: u32,
}

#[derive(Debug)]
struct Lookup {
    goal: Goal,
    target: Key,
    then: Then,
    started: Instant,
    paths: Vec<Vec<Cand>>,
    /// Every candidate ever placed, and its path: a node belongs to one
    /// path only (disjoint paths).
    owner: HashMap<NodeId, usize>,
    /// Stop once this bucket is full (a joining node's refresh).
    fill: Option<usize>,
    queries: usize,
    found: Option<(Contact, u32)>,
    values: HashMap<NodeId, (u64, Arc<[u8]>)>,
    /// Stores in flight, and how many succeeded.
    storing: Option<(usize, usize)>,
}

#[derive(Debug)]
enum Pending {
    Find { lookup: u64, path: usize },
    Store { lookup: u64 },
    Ping,
}

#[derive(Debug)]
struct Inflight {
    to: NodeId,
    sent: Instant,
    what: Pending,
}

struct StoredValue {
    info: ValueInfo,
    record: Arc<[u8]>,
}

/// A tiny deterministic generator (splitmix64) for transaction ids and
/// refresh targets: nothing here needs to be unpredictable, since DHT
/// messages travel inside authenticated links.
#[derive(Debug, Clone)]
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A value this node published: its expiry and the record.
type OwnValue = (u64, Arc<[u8]>);

/// One node's DHT.
pub struct Dht<R: Records> {
    own: Contact,
    records: R,
    buckets: Vec<Bucket>,
    lookups: HashMap<u64, Lookup>,
    inflight: HashMap<u32, Inflight>,
    transmits: VecDeque<(Contact, Vec<u8>)>,
    events: VecDeque<LookupDone>,
    stored_records: HashMap<NodeId, Contact>,
    values: HashMap<Key, Vec<StoredValue>>,
    value_count: usize,
    /// Values we published: (key, us) → (expiry, record).
    own_values: HashMap<(Key, NodeId), OwnValue>,
    budgets: HashMap<NodeId, (f64, Instant)>,
    next_lookup: u64,
    rng: Rng,
    start: Instant,
    start_unix: u64,
    last_publish: Option<Instant>,
    stats: DhtStats,
}

impl<R: Records> Dht<R> {
    /// A DHT for the node `own`. `now_unix` is the wall clock at `now`;
    /// `seed` varies transaction ids between nodes.
    pub fn new(own: Contact, records: R, now: Instant, now_unix: u64, seed: u64) -> Dht<R> {
        Dht {
            own,
            records,
            buckets: Vec::new(),
            lookups: HashMap::new(),
            inflight: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stored_records: HashMap::new(),
            values: HashMap::new(),
            value_count: 0,
            own_values: HashMap::new(),
            budgets: HashMap::new(),
            next_lookup: 1,
            rng: Rng(seed),
            start: now,
            start_unix: now_unix,
            last_publish: None,
            stats: DhtStats::default(),
        }
    }

    /// Our own contact.
    pub fn own(&self) -> &Contact {
        &self.own
    }

    /// Replaces our own record (new endpoints, new expiry): published at once.
    pub fn set_own(&mut self, now: Instant, own: Contact) {
        self.own = own;
        self.publish(now);
    }

    /// Replaces our own record without publishing it (not joined yet).
    pub fn set_own_quietly(&mut self, own: Contact) {
        self.own = own;
    }

    /// The record checker.
    pub fn records(&mut self) -> &mut R {
        &mut self.records
    }

    /// Counters.
    pub fn stats(&self) -> DhtStats {
        self.stats
    }

    /// Unix milliseconds at `now`.
    pub fn unix_millis(&self, now: Instant) -> u64 {
        self.start_unix * 1000 + now.saturating_duration_since(self.start).as_millis() as u64
    }

    /// Unix seconds at `now`.
    pub fn unix(&self, now: Instant) -> u64 {
        self.start_unix + now.saturating_duration_since(self.start).as_secs()
    }

    fn id(&self) -> Key {
        self.own.info.id.0
    }

    fn txid(&mut self) -> u32 {
        loop {
            let t = self.rng.next() as u32;
            if !self.inflight.contains_key(&t) {
                return t;
            }
        }
    }

    fn send(&mut self, to: &Contact, msg: &Msg) {
        let bytes = msg.to_bytes();
        self.stats.messages_out += 1;
        self.stats.bytes_out += bytes.len() as u64;
        self.transmits.push_back((to.clone(), bytes));
    }

    /// Next message to send, and to whom.
    pub fn poll_transmit(&mut self) -> Option<(Contact, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// Next finished lookup.
    pub fn poll_event(&mut self) -> Option<LookupDone> {
        self.events.pop_front()
    }

    // ---- routing table -------------------------------------------------

    fn bucket_of(&self, id: &NodeId) -> Option<usize> {
        let cp = common_prefix(&self.id(), &id.0);
        (cp < 256).then_some(cp)
    }

    /// Adds a contact we were told about (configuration, store, LAN) as if
    /// heard from, but without a liveness claim.
    pub fn add_contact(&mut self, now: Instant, contact: Contact, source: Source) {
        self.insert(now, contact, source, false);
    }

    /// Notes a node that proved itself to us directly (a verified link).
    pub fn heard_from(&mut self, now: Instant, contact: Contact, source: Source) {
        self.insert(now, contact, source, true);
    }

    /// Checks a record's bytes and makes a contact of it.
    pub fn contact_from(&mut self, now: Instant, record: &[u8]) -> Result<Contact, RecordError> {
        let unix = self.unix(now);
        let r = self.records.check_node(record, unix);
        self.count_record(r.as_ref().err());
        Ok(Contact {
            info: r?,
            record: Arc::from(record),
        })
    }

    fn count_record(&mut self, e: Option<&RecordError>) {
        match e {
            Some(RecordError::Forged) => self.stats.forged_records += 1,
            Some(RecordError::Expired) => self.stats.expired_records += 1,
            Some(RecordError::Oversized) => self.stats.oversized_records += 1,
            None => {}
        }
    }

    fn insert(&mut self, now: Instant, contact: Contact, source: Source, live: bool) {
        let Some(b) = self.bucket_of(&contact.info.id) else {
            return;
        };
        if self.buckets.len() <= b {
            self.buckets.resize_with(b + 1, Bucket::default);
        }
        let bucket = &mut self.buckets[b];
        if let Some(e) = bucket
            .entries
            .iter_mut()
            .find(|e| e.contact.info.id == contact.info.id)
        {
            if live {
                e.last_seen = now;
                e.fails = 0;
                e.proven = true;
            }
            // A configured peer stays "config" however it was first
            // learnt (after a restart, the peer store names it first).
            if source == Source::Config {
                e.source = Source::Config;
            }
            if contact.info.seq > e.contact.info.seq {
                e.contact = contact;
            }
            return;
        }
        let same_ip = contact.info.ip.is_some()
            && bucket
                .entries
                .iter()
                .filter(|e| e.contact.info.ip == contact.info.ip)
                .count()
                >= MAX_PER_IP;
        if bucket.entries.len() >= K && live && !same_ip {
            // A proven node takes the place of an unproven one.
            if let Some(pos) = bucket.entries.iter().position(|e| !e.proven) {
                bucket.entries.remove(pos);
            }
        }
        if bucket.entries.len() < K && !same_ip {
            bucket
                .replacements
                .retain(|(c, _)| c.info.id != contact.info.id);
            bucket.entries.push(Entry {
                contact,
                source,
                added: now,
                last_seen: now,
                fails: 0,
                proven: live,
            });
            return;
        }
        if !live {
            return;
        }
        // Full of proven nodes: they stay (long-lived nodes are the
        // likeliest to stay, and an attacker's fresh IDs can't displace
        // them); the newcomer waits in the replacement cache.
        if let Some(pos) = bucket
            .replacements
            .iter()
            .position(|(c, _)| c.info.id == contact.info.id)
        {
            bucket.replacements.remove(pos);
        }
        bucket.replacements.push_back((contact, source));
        if bucket.replacements.len() > REPLACEMENTS {
            bucket.replacements.pop_front();
        }
    }

    /// Drops a node from the table (it lied to us).
    fn evict(&mut self, id: &NodeId) {
        if let Some(b) = self.bucket_of(id) {
            if let Some(bucket) = self.buckets.get_mut(b) {
                bucket.entries.retain(|e| e.contact.info.id != *id);
                bucket.replacements.retain(|(c, _)| c.info.id != *id);
            }
        }
    }

    fn failed(&mut self, id: &NodeId) {
        let Some(b) = self.bucket_of(id) else {
            return;
        };
        let Some(bucket) = self.buckets.get_mut(b) else {
            return;
        };
        if let Some(pos) = bucket.entries.iter().position(|e| e.contact.info.id == *id) {
            let e = &mut bucket.entries[pos];
            e.fails = e.fails.saturating_add(1);
            if e.fails >= MAX_FAILS || !e.proven {
                bucket.entries.remove(pos);
                if let Some((c, s)) = bucket.replacements.pop_back() {
                    // It was heard from directly, but not lately.
                    let now = self.start;
                    bucket.entries.push(Entry {
                        contact: c,
                        source: s,
                        added: now,
                        last_seen: now,
                        fails: 0,
                        proven: false,
                    });
                }
            }
        } else {
            bucket.replacements.retain(|(c, _)| c.info.id != *id);
        }
    }

    /// The `n` contacts closest to `target`.
    pub fn closest(&self, target: &Key, n: usize) -> Vec<Contact> {
        // Entries of the bucket `target` falls in share more leading bits
        // with it than any other; then come the deeper buckets, then the
        // shallower ones, deepest first. So only a few buckets are read.
        let t = common_prefix(&self.id(), target).min(self.buckets.len());
        let mut all: Vec<(Key, &Contact)> = Vec::with_capacity(2 * K);
        fn take<'a>(all: &mut Vec<(Key, &'a Contact)>, b: &'a Bucket, target: &Key) {
            for e in &b.entries {
                all.push((distance(&e.contact.info.id.0, target), &e.contact));
            }
        }
        if let Some(b) = self.buckets.get(t) {
            take(&mut all, b, target);
        }
        if all.len() < n {
            for b in self.buckets.iter().skip(t + 1) {
                take(&mut all, b, target);
            }
        }
        for b in self.buckets[..t].iter().rev() {
            if all.len() >= n {
                break;
            }
            take(&mut all, b, target);
        }
        if all.len() > n {
            all.select_nth_unstable_by(n, |a, b| a.0.cmp(&b.0));
            all.truncate(n);
        }
        all.sort_by_key(|a| a.0);
        all.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// A known contact whose ID starts with `prefix` (table, replacements
    /// or records stored for others).
    pub fn find_local(&self, prefix: &[u8]) -> Option<Contact> {
        let mut best: Option<&Contact> = None;
        let table = self.buckets.iter().flat_map(|b| {
            b.entries
                .iter()
                .map(|e| &e.contact)
                .chain(b.replacements.iter().map(|(c, _)| c))
        });
        for c in table.chain(self.stored_records.values()) {
            if c.info.id.0.starts_with(prefix) && best.is_none_or(|b| c.info.seq > b.info.seq) {
                best = Some(c);
            }
        }
        best.cloned()
    }

    /// Forgets a node entirely (tests: a node that was never heard of).
    #[cfg(test)]
    pub(crate) fn forget(&mut self, id: &NodeId) {
        for b in &mut self.buckets {
            b.entries.retain(|e| e.contact.info.id != *id);
            b.replacements.retain(|(c, _)| c.info.id != *id);
        }
        self.stored_records.retain(|_, c| c.info.id != *id);
    }

    /// Entries of the routing table.
    pub fn table(&self, now: Instant) -> Vec<EntryView> {
        let mut out = Vec::new();
        for (i, b) in self.buckets.iter().enumerate() {
            for e in &b.entries {
                out.push(EntryView {
                    bucket: i,
                    id: e.contact.info.id,
                    seq: e.contact.info.seq,
                    expires: e.contact.info.expires,
                    roles: e.contact.info.roles,
                    source: e.source,
                    last_seen_secs: e
                        .proven
                        .then(|| now.saturating_duration_since(e.last_seen).as_secs_f64()),
                    age_secs: now.saturating_duration_since(e.added).as_secs_f64(),
                    fails: e.fails,
                    replacement: false,
                    proven: e.proven,
                    record: e.contact.record.clone(),
                });
            }
            for (c, s) in &b.replacements {
                out.push(EntryView {
                    bucket: i,
                    id: c.info.id,
                    seq: c.info.seq,
                    expires: c.info.expires,
                    roles: c.info.roles,
                    source: *s,
                    last_seen_secs: None,
                    age_secs: 0.0,
                    fails: 0,
                    replacement: true,
                    proven: true,
                    record: c.record.clone(),
                });
            }
        }
        out
    }

    /// Entries in the table (not counting replacements).
    pub fn table_len(&self) -> usize {
        self.buckets.iter().map(|b| b.entries.len()).sum()
    }

    /// Bytes this DHT holds: records (each counted once per place it is
    /// kept) plus the bookkeeping around them.
    pub fn state_bytes(&self) -> usize {
        let entry = std::mem::size_of::<Entry>();
        let mut n =
            std::mem::size_of::<Self>() + self.buckets.len() * std::mem::size_of::<Bucket>();
        for b in &self.buckets {
            n += b.entries.capacity() * entry;
            n += b
                .entries
                .iter()
                .map(|e| e.contact.record.len())
                .sum::<usize>();
            n += b.replacements.len() * (std::mem::size_of::<(Contact, Source)>());
            n += b
                .replacements
                .iter()
                .map(|(c, _)| c.record.len())
                .sum::<usize>();
        }
        for c in self.stored_records.values() {
            n += std::mem::size_of::<Contact>() + 32 + c.record.len();
        }
        for v in self.values.values().flatten() {
            n += std::mem::size_of::<StoredValue>() + v.record.len();
        }
        n += self.budgets.len() * 64;
        n
    }

    // ---- messages ------------------------------------------------------

    /// Handles a message from `from` (whose record the link verified).
    pub fn handle_message(&mut self, now: Instant, from: &Contact, bytes: &[u8]) {
        self.stats.bytes_in += bytes.len() as u64;
        let msg = match Msg::parse(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        match msg {
            Msg::Reply {
                txid,
                values,
                nodes,
            } => self.on_reply(now, from, txid, values, nodes),
            Msg::Stored { txid, ok } => self.on_stored(now, from, txid, ok),
            Msg::Pong { txid } => {
                if self.take_inflight(from, txid).is_some() {
                    self.insert(now, from.clone(), Source::Network, true);
                }
            }
            req => {
                if !self.budget(now, &from.info.id) {
                    self.stats.rate_limited += 1;
                    return;
                }
                self.stats.requests_in += 1;
                self.insert(now, from.clone(), Source::Network, true);
                self.on_request(now, from, req);
            }
        }
    }

    fn budget(&mut self, now: Instant, id: &NodeId) -> bool {
        if self.budgets.len() >= MAX_RATE_PEERS && !self.budgets.contains_key(id) {
            self.budgets.clear();
        }
        let (tokens, last) = self.budgets.entry(*id).or_insert((REQUEST_BURST, now));
        let dt = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + dt * REQUEST_RATE).min(REQUEST_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn on_request(&mut self, now: Instant, from: &Contact, req: Msg) {
        match req {
            Msg::Find {
                txid,
                target,
                values,
            } => {
                let mut nodes = self.closest(&target, REPLY_CONTACTS);
                // The exact node, if we know it, goes first: it is what an
                // address or ID lookup wants.
                if nodes.first().is_none_or(|c| c.info.id.0 != target) {
                    if let Some(c) = self.stored_records.get(&NodeId(target)) {
                        nodes.insert(0, c.clone());
                        nodes.truncate(REPLY_CONTACTS);
                    }
                }
                let mut vals = Vec::new();
                if values {
                    let unix = self.unix(now);
                    let mut budget = REPLY_VALUE_BUDGET;
                    if let Some(list) = self.values.get(&target) {
                        for v in list.iter().filter(|v| v.info.expires > unix) {
                            if v.record.len() > budget {
                                break;
                            }
                            budget -= v.record.len();
                            vals.push(v.record.to_vec());
                        }
                    }
                }
                let nodes = nodes
                    .into_iter()
                    .filter(|c| c.info.id != from.info.id)
                    .map(|c| c.record.to_vec())
                    .collect();
                self.send(
                    from,
                    &Msg::Reply {
                        txid,
                        values: vals,
                        nodes,
                    },
                );
            }
            Msg::Store { txid, node, record } => {
                let ok = if node {
                    self.store_node(now, &record)
                } else {
                    self.store_value(now, &record)
                };
                self.send(from, &Msg::Stored { txid, ok });
            }
            Msg::Ping { txid } => self.send(from, &Msg::Pong { txid }),
            _ => {}
        }
    }

    fn store_node(&mut self, now: Instant, record: &[u8]) -> bool {
        let Ok(c) = self.contact_from(now, record) else {
            return false;
        };
        if c.info.id == self.own.info.id {
            return false;
        }
        // A newer record replaces the table's copy too (a node that came
        // back on a new port says so this way).
        if let Some(b) = self.bucket_of(&c.info.id) {
            if let Some(bucket) = self.buckets.get_mut(b) {
                for e in bucket.entries.iter_mut() {
                    if e.contact.info.id == c.info.id && e.contact.info.seq < c.info.seq {
                        e.contact = c.clone();
                    }
                }
            }
        }
        match self.stored_records.get(&c.info.id) {
            Some(old) if old.info.seq >= c.info.seq => {
                if old.info.seq > c.info.seq {
                    self.stats.stale_records += 1;
                    return false;
                }
                true
            }
            _ => {
                if self.stored_records.len() >= MAX_STORED_RECORDS
                    && !self.stored_records.contains_key(&c.info.id)
                {
                    // Keep the records closest to us: those are the ones
                    // lookups will ask us for.
                    let own = self.id();
                    let far = self
                        .stored_records
                        .keys()
                        .max_by_key(|k| distance(&k.0, &own))
                        .copied();
                    match far {
                        Some(f) if distance(&f.0, &own) > distance(&c.info.id.0, &own) => {
                            self.stored_records.remove(&f);
                        }
                        _ => {
                            self.stats.store_full += 1;
                            return false;
                        }
                    }
                }
                self.stored_records.insert(c.info.id, c);
                true
            }
        }
    }

    fn store_value(&mut self, now: Instant, record: &[u8]) -> bool {
        let unix = self.unix(now);
        let info = match self.records.check_value(record, unix) {
            Ok(i) => i,
            Err(e) => {
                self.count_record(Some(&e));
                return false;
            }
        };
        let list = self.values.entry(info.target).or_default();
        let before = list.len();
        list.retain(|v| v.info.expires > unix);
        self.value_count -= before - list.len();
        if let Some(v) = list.iter_mut().find(|v| v.info.publisher == info.publisher) {
            if v.info.seq > info.seq {
                self.stats.stale_records += 1;
                return false;
            }
            v.info = info;
            v.record = Arc::from(record);
            return true;
        }
        if list.len() >= MAX_VALUES_PER_KEY {
            // Full: the entry expiring first makes room if it expires
            // before the newcomer, else the newcomer is refused.
            let (pos, soonest) = list
                .iter()
                .enumerate()
                .map(|(i, v)| (i, v.info.expires))
                .min_by_key(|x| x.1)
                .expect("non-empty");
            if soonest >= info.expires {
                self.stats.store_full += 1;
                return false;
            }
            list.remove(pos);
            self.value_count -= 1;
        }
        let per_publisher = self
            .values
            .values()
            .flatten()
            .filter(|v| v.info.publisher == info.publisher)
            .count();
        if per_publisher >= MAX_VALUES_PER_PUBLISHER {
            self.stats.store_full += 1;
            return false;
        }
        if self.value_count >= MAX_VALUES {
            // Full: keep the keys closest to us (those are the ones lookups
            // ask us for); the farthest goes if the newcomer is closer.
            let own = self.id();
            let far = self
                .values
                .keys()
                .max_by_key(|k| distance(k, &own))
                .copied();
            match far {
                Some(f) if distance(&f, &own) > distance(&info.target, &own) => {
                    if let Some(l) = self.values.get_mut(&f) {
                        l.pop();
                        self.value_count -= 1;
                        if l.is_empty() {
                            self.values.remove(&f);
                        }
                    }
                }
                _ => {
                    self.stats.store_full += 1;
                    return false;
                }
            }
        }
        let list = self.values.entry(info.target).or_default();
        list.push(StoredValue {
            info,
            record: Arc::from(record),
        });
        self.value_count += 1;
        true
    }

    fn take_inflight(&mut self, from: &Contact, txid: u32) -> Option<Inflight> {
        match self.inflight.get(&txid) {
            Some(i) if i.to == from.info.id => {
                self.stats.replies_in += 1;
                self.inflight.remove(&txid)
            }
            _ => {
                self.stats.unexpected += 1;
                None
            }
        }
    }

    fn on_stored(&mut self, now: Instant, from: &Contact, txid: u32, ok: bool) {
        let Some(inf) = self.take_inflight(from, txid) else {
            return;
        };
        self.insert(now, from.clone(), Source::Network, true);
        if let Pending::Store { lookup } = inf.what {
            self.store_answered(now, lookup, ok);
        }
    }

    fn store_answered(&mut self, now: Instant, lookup: u64, ok: bool) {
        let Some(l) = self.lookups.get_mut(&lookup) else {
            return;
        };
        if let Some((left, good)) = l.storing.as_mut() {
            *left = left.saturating_sub(1);
            *good += ok as usize;
            if *left == 0 {
                let good = *good;
                self.finish(now, lookup, Some(Outcome::Stored(good)));
            }
        }
    }

    fn on_reply(
        &mut self,
        now: Instant,
        from: &Contact,
        txid: u32,
        values: Vec<Vec<u8>>,
        nodes: Vec<Vec<u8>>,
    ) {
        let Some(inf) = self.take_inflight(from, txid) else {
            return;
        };
        let Pending::Find { lookup, path } = inf.what else {
            return;
        };
        let unix = self.unix(now);
        let wants_values = self
            .lookups
            .get(&lookup)
            .is_some_and(|l| matches!(l.goal, Goal::Values(_)));
        let mut checked = Vec::with_capacity(nodes.len());
        let mut forged = false;
        for n in nodes.iter().take(2 * REPLY_CONTACTS) {
            match self.records.check_node(n, unix) {
                Ok(info) => checked.push(Contact {
                    info,
                    record: Arc::from(n.as_slice()),
                }),
                Err(e) => {
                    forged |= e == RecordError::Forged;
                    self.count_record(Some(&e));
                    if forged {
                        break;
                    }
                }
            }
        }
        let mut vals = Vec::new();
        // Values cost an RSA check each: only for a lookup that wants them,
        // and no more than a key can hold.
        let take = if wants_values && !forged {
            MAX_VALUES_PER_KEY
        } else {
            0
        };
        for v in values.iter().take(take) {
            match self.records.check_value(v, unix) {
                Ok(info) => vals.push((info, v)),
                Err(e) => {
                    forged |= e == RecordError::Forged;
                    self.count_record(Some(&e));
                    if forged {
                        break;
                    }
                }
            }
        }
        if forged {
            // Honest nodes pass on only records they checked, so a forgery
            // convicts the sender: its whole answer is ignored and it leaves
            // our table.
            self.stats.liars += 1;
            self.evict(&from.info.id);
            if let Some(c) = self.lookups.get_mut(&lookup).and_then(|l| {
                l.paths
                    .get_mut(path)
                    .and_then(|p| p.iter_mut().find(|c| c.contact.info.id == from.info.id))
            }) {
                c.state = CandState::Failed;
            }
            self.step(now, lookup);
            return;
        }
        self.insert(now, from.clone(), Source::Network, true);
        let own = self.own.info.id;
        // Learned contacts may fill empty slots of our table.
        for c in &checked {
            if c.info.id != own {
                self.insert(now, c.clone(), Source::Network, false);
            }
        }
        let Some(l) = self.lookups.get_mut(&lookup) else {
            return;
        };
        let Some(p) = l.paths.get_mut(path) else {
            return;
        };
        let mut depth = 1;
        if let Some(c) = p.iter_mut().find(|c| c.contact.info.id == from.info.id) {
            c.state = CandState::Answered;
            depth = c.depth;
        }
        for (info, bytes) in vals {
            if info.target != l.target {
                continue;
            }
            let newer = l
                .values
                .get(&info.publisher)
                .is_none_or(|(s, _)| info.seq > *s);
            if newer {
                l.values
                    .insert(info.publisher, (info.seq, Arc::from(bytes.as_slice())));
            }
        }
        for c in checked {
            if c.info.id == own {
                continue;
            }
            if l.goal.matches(&c)
                && l.found
                    .as_ref()
                    .is_none_or(|(f, _)| c.info.seq > f.info.seq)
            {
                l.found = Some((c.clone(), depth));
            }
            // Disjoint paths: a node already placed stays where it is.
            if l.owner.contains_key(&c.info.id) {
                continue;
            }
            l.owner.insert(c.info.id, path);
            let p = &mut l.paths[path];
            let dist = distance(&c.info.id.0, &l.target);
            let pos = p.partition_point(|x| x.dist < dist);
            p.insert(
                pos,
                Cand {
                    contact: c,
                    dist,
                    state: CandState::New,
                    depth: depth + 1,
                },
            );
            // Keep the shortlist bounded: drop the farthest unasked.
            if p.len() > 4 * K {
                if let Some(i) = p.iter().rposition(|x| x.state == CandState::New) {
                    p.remove(i);
                }
            }
        }
        self.step(now, lookup);
    }

    // ---- lookups -------------------------------------------------------

    /// Starts a lookup; its result comes as a [`LookupDone`] event with the
    /// returned id. Refused (None) when too many run already.
    pub fn lookup(&mut self, now: Instant, goal: Goal) -> Option<u64> {
        self.start_lookup(now, goal, Then::Nothing)
    }

    fn start_lookup(&mut self, now: Instant, goal: Goal, then: Then) -> Option<u64> {
        if self.lookups.len() >= MAX_LOOKUPS {
            self.stats.lookups_refused += 1;
            return None;
        }
        self.stats.lookups += 1;
        // Refreshes only gather contacts, which are checked one by one as
        // they are used: one path will do. Everything whose answer is
        // trusted (a node, values, where to store) takes disjoint paths.
        let paths = if matches!((&goal, &then), (Goal::Closest(_), Then::Nothing)) {
            1
        } else {
            PATHS
        };
        let id = self.next_lookup;
        self.next_lookup += 1;
        let target = goal.target();
        if let Some(b) = self.bucket_of(&NodeId(target)) {
            if let Some(bucket) = self.buckets.get_mut(b) {
                bucket.last_lookup = Some(now);
            }
        }
        let mut l = Lookup {
            goal,
            target,
            then,
            started: now,
            paths: vec![Vec::new(); paths],
            owner: HashMap::new(),
            fill: None,
            queries: 0,
            found: None,
            values: HashMap::new(),
            storing: None,
        };
        if let Goal::Node { prefix, .. } = &l.goal {
            if let Some(c) = self.find_local(prefix).filter(|c| l.goal.matches(c)) {
                l.found = Some((c, 0));
            }
        }
        // Seeds: the closest we know, dealt round-robin to the paths.
        for (i, c) in self.closest(&target, K).into_iter().enumerate() {
            let dist = distance(&c.info.id.0, &target);
            l.owner.insert(c.info.id, i % paths);
            l.paths[i % paths].push(Cand {
                contact: c,
                dist,
                state: CandState::New,
                depth: 1,
            });
        }
        self.lookups.insert(id, l);
        self.step(now, id);
        Some(id)
    }

    /// Sends the next queries of a lookup, or finishes it.
    ///
    /// A path asks its closest unasked candidate. A path looking for the
    /// closest nodes is done when its [`REPLICATION`] closest live
    /// candidates have answered; a path looking for one node or for values
    /// goes on through farther candidates until the query budget is spent,
    /// since liars may have filled the closest places with each other.
    fn step(&mut self, now: Instant, id: u64) {
        let Some(l) = self.lookups.get_mut(&id) else {
            return;
        };
        if l.storing.is_some() {
            return;
        }
        let filled = l
            .fill
            .is_some_and(|b| self.buckets.get(b).is_some_and(|b| b.entries.len() >= K));
        if l.found.is_some()
            || filled
            || l.queries >= MAX_LOOKUP_QUERIES
            || now.saturating_duration_since(l.started) >= LOOKUP_DEADLINE
        {
            self.finish(now, id, None);
            return;
        }
        let window = match l.goal {
            Goal::Closest(_) => REPLICATION,
            _ => usize::MAX,
        };
        let mut sends: Vec<(usize, Contact)> = Vec::new();
        let mut all_done = true;
        for (pi, p) in l.paths.iter_mut().enumerate() {
            let mut inflight = p.iter().filter(|c| c.state == CandState::Asked).count();
            let mut live = 0;
            let mut pending_new = false;
            for c in p.iter_mut() {
                if c.state == CandState::Failed {
                    continue;
                }
                live += 1;
                if live > window {
                    break;
                }
                if c.state == CandState::New {
                    if inflight < PATH_ALPHA && l.queries + sends.len() < MAX_LOOKUP_QUERIES {
                        c.state = CandState::Asked;
                        inflight += 1;
                        sends.push((pi, c.contact.clone()));
                    } else {
                        pending_new = true;
                    }
                }
            }
            if inflight > 0 || pending_new {
                all_done = false;
            }
        }
        l.queries += sends.len();
        let values = matches!(l.goal, Goal::Values(_));
        let target = l.target;
        if all_done && sends.is_empty() {
            self.finish(now, id, None);
            return;
        }
        for (path, c) in sends {
            let what = Pending::Find { lookup: id, path };
            self.request(now, &c, what, |txid| Msg::Find {
                txid,
                target,
                values,
            });
        }
    }

    /// Sends a request and remembers it until its answer or timeout.
    fn request(&mut self, now: Instant, to: &Contact, what: Pending, msg: impl FnOnce(u32) -> Msg) {
        let txid = self.txid();
        let m = msg(txid);
        self.inflight.insert(
            txid,
            Inflight {
                to: to.info.id,
                sent: now,
                what,
            },
        );
        self.send(to, &m);
    }

    fn finish(&mut self, now: Instant, id: u64, outcome: Option<Outcome>) {
        let Some(mut l) = self.lookups.remove(&id) else {
            return;
        };
        let elapsed = now.saturating_duration_since(l.started);
        let mut answered: Vec<&Cand> = l
            .paths
            .iter()
            .flatten()
            .filter(|c| c.state == CandState::Answered)
            .collect();
        answered.sort_by_key(|a| a.dist);
        let hops = l
            .found
            .as_ref()
            .map(|f| f.1)
            .unwrap_or_else(|| answered.iter().map(|c| c.depth).max().unwrap_or(0));
        let closest: Vec<Contact> = answered.iter().map(|c| c.contact.clone()).collect();
        if outcome.is_none() {
            let record = match &l.then {
                Then::Nothing => None,
                Then::StoreNode(r) => Some((true, r.clone())),
                Then::StoreValue(r) => Some((false, r.clone())),
            };
            if let Some((node, record)) = record {
                // Store at the closest that answered, then report.
                let targets: Vec<Contact> = closest.iter().take(REPLICATION).cloned().collect();
                if !targets.is_empty() {
                    l.storing = Some((targets.len(), 0));
                    self.lookups.insert(id, l);
                    for c in targets {
                        let what = Pending::Store { lookup: id };
                        let record = record.to_vec();
                        self.request(now, &c, what, |txid| Msg::Store { txid, node, record });
                    }
                    return;
                }
            }
        }
        let outcome = match outcome {
            Some(o) => o,
            None => match (&l.goal, l.found.take()) {
                (_, Some((c, _))) => Outcome::Found(c),
                (Goal::Values(_), None) => {
                    let mut v: Vec<Arc<[u8]>> = l.values.into_values().map(|x| x.1).collect();
                    v.sort();
                    Outcome::Values(v)
                }
                (_, None) if matches!(l.then, Then::Nothing) => Outcome::Closest(closest),
                _ => Outcome::Stored(0),
            },
        };
        if matches!(outcome, Outcome::Found(_)) {
            self.stats.lookups_found += 1;
        }
        let queries = l.queries;
        self.events.push_back(LookupDone {
            id,
            goal: l.goal,
            outcome,
            hops,
            queries,
            elapsed,
        });
    }

    /// Joins (or rejoins) the network: looks up our own ID, which fills the
    /// buckets near us and tells our neighbours we are here, then stores
    /// our record with the closest.
    pub fn publish(&mut self, now: Instant) {
        let rec = self.own.record.clone();
        let own = self.id();
        self.last_publish = Some(
            if self
                .start_lookup(now, Goal::Closest(own), Then::StoreNode(rec))
                .is_some()
            {
                now
            } else {
                // No lookup slot free: try again in a minute.
                now.checked_sub(REPUBLISH_INTERVAL - Duration::from_secs(60))
                    .unwrap_or(now)
            },
        );
        let values: Vec<Arc<[u8]>> = self.own_values.values().map(|v| v.1.clone()).collect();
        for v in values {
            self.put_checked(now, v);
        }
    }

    /// Stores a value record (already signed by this node) at the nodes
    /// closest to its key, and again every [`REPUBLISH_INTERVAL`] until it
    /// expires. Refused records return the reason.
    pub fn put(&mut self, now: Instant, record: &[u8]) -> Result<Option<u64>, RecordError> {
        let unix = self.unix(now);
        let info = self.records.check_value(record, unix)?;
        if record.len() > MAX_RECORD_BYTES {
            return Err(RecordError::Oversized);
        }
        let rec: Arc<[u8]> = Arc::from(record);
        self.own_values
            .insert((info.target, info.publisher), (info.expires, rec.clone()));
        self.store_value(now, record);
        Ok(self.put_checked(now, rec))
    }

    fn put_checked(&mut self, now: Instant, rec: Arc<[u8]>) -> Option<u64> {
        let unix = self.unix(now);
        let info = self.records.check_value(&rec, unix).ok()?;
        self.start_lookup(now, Goal::Closest(info.target), Then::StoreValue(rec))
    }

    /// Values stored here under `target` (for a get that this node can
    /// answer itself).
    pub fn local_values(&self, now: Instant, target: &Key) -> Vec<Arc<[u8]>> {
        let unix = self.unix(now);
        self.values
            .get(target)
            .map(|l| {
                l.iter()
                    .filter(|v| v.info.expires > unix)
                    .map(|v| v.record.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every unexpired value record this node keeps, once each: those it
    /// published (so a restart can publish them again) and those it holds
    /// for others. For the node's store; [`Dht::restore_value`] takes them
    /// back.
    pub fn value_records(&self, now: Instant) -> Vec<Arc<[u8]>> {
        let unix = self.unix(now);
        let mut out: Vec<Arc<[u8]>> = self
            .own_values
            .values()
            .filter(|v| v.0 > unix)
            .map(|v| v.1.clone())
            .collect();
        let own = self.own.info.id;
        out.extend(
            self.values
                .values()
                .flatten()
                .filter(|v| v.info.expires > unix && v.info.publisher != own)
                .map(|v| v.record.clone()),
        );
        out
    }

    /// Takes back a value record kept by an earlier run. It is checked like
    /// one arriving from the network (signature, expiry, limits); one this
    /// node signed is also published again with the next [`Dht::publish`].
    pub fn restore_value(&mut self, now: Instant, record: &[u8]) -> bool {
        let unix = self.unix(now);
        let Ok(info) = self.records.check_value(record, unix) else {
            return false;
        };
        if record.len() > MAX_RECORD_BYTES {
            return false;
        }
        if info.publisher == self.own.info.id {
            // A value put in this run is newer than any kept one.
            self.own_values
                .entry((info.target, info.publisher))
                .or_insert_with(|| (info.expires, Arc::from(record)));
        }
        self.store_value(now, record)
    }

    /// When [`Dht::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let rpc = self.inflight.values().map(|i| i.sent + RPC_TIMEOUT).min();
        let lookup = self
            .lookups
            .values()
            .filter(|l| l.storing.is_none())
            .map(|l| l.started + LOOKUP_DEADLINE)
            .min();
        let refresh = self
            .buckets
            .iter()
            .map(|b| b.last_lookup.unwrap_or(self.start) + REFRESH_INTERVAL)
            .min();
        let publish = self.last_publish.map(|t| t + REPUBLISH_INTERVAL);
        [rpc, lookup, refresh, publish].into_iter().flatten().min()
    }

    /// Fails at once every request in flight to `id` (the transport can't
    /// reach it), as a timeout would later.
    pub fn unreachable(&mut self, now: Instant, id: &NodeId) {
        let dead: Vec<u32> = self
            .inflight
            .iter()
            .filter(|(_, i)| i.to == *id)
            .map(|(t, _)| *t)
            .collect();
        self.fail_requests(now, dead);
    }

    fn fail_requests(&mut self, now: Instant, txids: Vec<u32>) {
        for t in txids {
            let Some(inf) = self.inflight.remove(&t) else {
                continue;
            };
            self.stats.timeouts += 1;
            self.failed(&inf.to);
            match inf.what {
                Pending::Find { lookup, path } => {
                    if let Some(l) = self.lookups.get_mut(&lookup) {
                        if let Some(c) = l
                            .paths
                            .get_mut(path)
                            .and_then(|p| p.iter_mut().find(|c| c.contact.info.id == inf.to))
                        {
                            c.state = CandState::Failed;
                        }
                    }
                    self.step(now, lookup);
                }
                Pending::Store { lookup } => self.store_answered(now, lookup, false),
                Pending::Ping => {}
            }
        }
    }

    /// Runs timers: request timeouts, bucket refreshes, republishing,
    /// expiry of stored records and values.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<u32> = self
            .inflight
            .iter()
            .filter(|(_, i)| now.saturating_duration_since(i.sent) >= RPC_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        self.fail_requests(now, expired);
        let late: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, l)| {
                l.storing.is_none() && now.saturating_duration_since(l.started) >= LOOKUP_DEADLINE
            })
            .map(|(i, _)| *i)
            .collect();
        for id in late {
            self.finish(now, id, None);
        }
        if self
            .last_publish
            .is_some_and(|t| now.saturating_duration_since(t) >= REPUBLISH_INTERVAL)
        {
            self.publish(now);
        }
        self.refresh(now, Refresh::Due);
        // Expiry.
        let unix = self.unix(now);
        let mut count = 0;
        self.values.retain(|_, l| {
            l.retain(|v| v.info.expires > unix);
            count += l.len();
            !l.is_empty()
        });
        self.value_count = count;
        self.stored_records.retain(|_, c| c.info.expires > unix);
        self.own_values.retain(|_, v| v.0 > unix);
        for b in &mut self.buckets {
            b.entries.retain(|e| e.contact.info.expires > unix);
            b.replacements.retain(|(c, _)| c.info.expires > unix);
        }
    }

    /// Refreshes buckets (up to the deepest non-empty one) with a lookup
    /// for a random ID in each.
    pub fn refresh(&mut self, now: Instant, mode: Refresh) {
        let all = mode != Refresh::Due;
        let join = mode == Refresh::Join;
        let deepest = self
            .buckets
            .iter()
            .rposition(|b| !b.entries.is_empty())
            .unwrap_or(0);
        for i in 0..=deepest.min(255) {
            let due = all
                || self
                    .buckets
                    .get(i)
                    .and_then(|b| b.last_lookup)
                    .unwrap_or(self.start)
                    + REFRESH_INTERVAL
                    <= now;
            if !due {
                continue;
            }
            if join && self.buckets.get(i).is_some_and(|b| b.entries.len() >= K) {
                continue;
            }
            let target = self.random_in_bucket(i);
            let Some(id) = self.lookup(now, Goal::Closest(target)) else {
                break;
            };
            if join {
                if let Some(l) = self.lookups.get_mut(&id) {
                    l.fill = Some(i);
                }
            }
            if let Some(b) = self.buckets.get_mut(i) {
                b.last_lookup = Some(now);
            } else {
                self.buckets.resize_with(i + 1, Bucket::default);
                self.buckets[i].last_lookup = Some(now);
            }
        }
    }

    fn random_in_bucket(&mut self, i: usize) -> Key {
        let mut k = [0u8; 32];
        for chunk in k.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next().to_be_bytes()[..chunk.len()]);
        }
        let own = self.id();
        // Share the first i bits with us, differ at bit i.
        for bit in 0..=i.min(255) {
            let (byte, mask) = (bit / 8, 0x80u8 >> (bit % 8));
            let ours = own[byte] & mask;
            let want = if bit == i { ours ^ mask } else { ours };
            k[byte] = (k[byte] & !mask) | want;
        }
        k
    }

    /// Sends a liveness check (its answer refreshes the entry; silence
    /// counts as a failure).
    pub fn ping(&mut self, now: Instant, to: &Contact) {
        self.request(now, to, Pending::Ping, |txid| Msg::Ping { txid });
    }

    /// Lookups running.
    pub fn running(&self) -> usize {
        self.lookups.len()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock
mod tests {
    use super::*;

    /// Records are `id [32] | seq u64 | expires u64 | ok u8`, valid when
    /// `ok` is 1: enough to test the DHT's logic without RSA.
    struct Plain;
    impl Records for Plain {
        fn check_node(&mut self, b: &[u8], now: u64) -> Result<RecordInfo, RecordError> {
            if b.len() != 49 || b[48] != 1 {
                return Err(RecordError::Forged);
            }
            let expires = u64::from_be_bytes(b[40..48].try_into().unwrap());
            if expires <= now {
                return Err(RecordError::Expired);
            }
            Ok(RecordInfo {
                id: NodeId(b[..32].try_into().unwrap()),
                seq: u64::from_be_bytes(b[32..40].try_into().unwrap()),
                expires,
                roles: 0,
                ip: None,
            })
        }
        fn check_value(&mut self, b: &[u8], now: u64) -> Result<ValueInfo, RecordError> {
            // target [32] | publisher [32] | seq | expires | value
            if b.len() < 80 {
                return Err(RecordError::Forged);
            }
            if b.len() > 80 + MAX_VALUE_LEN {
                return Err(RecordError::Oversized);
            }
            let expires = u64::from_be_bytes(b[72..80].try_into().unwrap());
            if expires <= now {
                return Err(RecordError::Expired);
            }
            Ok(ValueInfo {
                target: b[..32].try_into().unwrap(),
                publisher: NodeId(b[32..64].try_into().unwrap()),
                seq: u64::from_be_bytes(b[64..72].try_into().unwrap()),
                expires,
            })
        }
    }

    fn rec(id: u8, seq: u64) -> Vec<u8> {
        let mut b = vec![id; 32];
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&2_000_000_000u64.to_be_bytes());
        b.push(1);
        b
    }

    fn contact(id: u8, seq: u64) -> Contact {
        let r = rec(id, seq);
        Contact {
            info: Plain.check_node(&r, 0).unwrap(),
            record: Arc::from(r),
        }
    }

    /// A few DHTs wired directly, messages delivered in order.
    struct Mesh {
        nodes: Vec<Dht<Plain>>,
        now: Instant,
    }
    impl Mesh {
        fn new(ids: &[u8]) -> Mesh {
            let now = Instant::now();
            let nodes = ids
                .iter()
                .map(|i| Dht::new(contact(*i, 1), Plain, now, 1_700_000_000, *i as u64))
                .collect();
            Mesh { nodes, now }
        }
        fn run(&mut self) {
            for _ in 0..10_000 {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    while let Some((to, bytes)) = self.nodes[i].poll_transmit() {
                        moved = true;
                        let from = self.nodes[i].own().clone();
                        if let Some(j) = self
                            .nodes
                            .iter()
                            .position(|n| n.own().info.id == to.info.id)
                        {
                            let now = self.now;
                            self.nodes[j].handle_message(now, &from, &bytes);
                        }
                    }
                }
                if !moved {
                    return;
                }
            }
        }
    }

    #[test]
    fn messages_roundtrip_and_never_panic() {
        let msgs = [
            Msg::Find {
                txid: 7,
                target: [3; 32],
                values: true,
            },
            Msg::Reply {
                txid: 8,
                values: vec![vec![1, 2, 3]],
                nodes: vec![rec(1, 1), rec(2, 2)],
            },
            Msg::Store {
                txid: 9,
                node: false,
                record: vec![5; 100],
            },
            Msg::Stored { txid: 1, ok: true },
            Msg::Ping { txid: 2 },
            Msg::Pong { txid: 3 },
        ];
        for m in msgs {
            let b = m.to_bytes();
            assert_eq!(Msg::parse(&b).unwrap(), m);
            for n in 0..b.len() {
                let _ = Msg::parse(&b[..n]);
            }
        }
    }

    #[test]
    fn lookup_finds_a_node_through_others() {
        let ids: Vec<u8> = (1..=40).collect();
        let mut m = Mesh::new(&ids);
        let now = m.now;
        // A chain: each knows the next few only.
        for i in 0..m.nodes.len() {
            for d in 1..=3 {
                let j = (i + d) % m.nodes.len();
                let c = m.nodes[j].own().clone();
                m.nodes[i].add_contact(now, c, Source::Config);
            }
        }
        for i in 0..m.nodes.len() {
            m.nodes[i].publish(now);
        }
        m.run();
        let target = m.nodes[25].own().info.id;
        let id = m.nodes[0]
            .lookup(
                now,
                Goal::Node {
                    prefix: target.0.to_vec(),
                    min_seq: 0,
                    reachable: false,
                },
            )
            .unwrap();
        m.run();
        let ev = std::iter::from_fn(|| m.nodes[0].poll_event())
            .find(|e| e.id == id)
            .unwrap();
        match ev.outcome {
            Outcome::Found(c) => assert_eq!(c.info.id, target),
            o => panic!("not found: {o:?}"),
        }
    }

    #[test]
    fn full_bucket_keeps_its_old_entries() {
        let now = Instant::now();
        let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
        // IDs 0x80.. all land in bucket 0 of node 0x00... Unproven
        // entries give way to nodes that talk to us; those then stay.
        for i in 0..K as u8 {
            d.add_contact(now, contact(0xa0 + i, 1), Source::Store);
        }
        for i in 0..K as u8 {
            let c = contact(0x80 + i, 1);
            d.handle_message(now, &c, &Msg::Ping { txid: 1 }.to_bytes());
        }
        for i in 0..50u8 {
            let c = contact(0xc0 + i, 1);
            d.handle_message(now, &c, &Msg::Ping { txid: 1 }.to_bytes());
        }
        let table = d.table(now);
        let live: Vec<_> = table.iter().filter(|e| !e.replacement).collect();
        assert_eq!(live.len(), K);
        assert!(live.iter().all(|e| e.id.0[0] < 0xa0 && e.proven));
        assert_eq!(table.len() - live.len(), REPLACEMENTS);
    }

    #[test]
    fn records_are_checked_and_counted() {
        let mut m = Mesh::new(&[1, 2]);
        let now = m.now;
        let a = m.nodes[0].own().clone();
        // Forged, expired, stale.
        let mut forged = rec(9, 5);
        forged[48] = 0;
        let mut expired = rec(9, 5);
        expired[40..48].copy_from_slice(&5u64.to_be_bytes());
        for (r, ok) in [
            (rec(9, 5), true),
            (forged, false),
            (expired, false),
            (rec(9, 4), false),
        ] {
            let msg = Msg::Store {
                txid: 1,
                node: true,
                record: r,
            };
            m.nodes[1].handle_message(now, &a, &msg.to_bytes());
            let (_, reply) = m.nodes[1].poll_transmit().unwrap();
            assert_eq!(Msg::parse(&reply).unwrap(), Msg::Stored { txid: 1, ok });
        }
        let s = m.nodes[1].stats();
        assert_eq!(
            (s.forged_records, s.expired_records, s.stale_records),
            (1, 1, 1)
        );
        // Oversized values are refused.
        let mut big = vec![0u8; 80 + MAX_VALUE_LEN + 1];
        big[72..80].copy_from_slice(&2_000_000_000u64.to_be_bytes());
        let msg = Msg::Store {
            txid: 2,
            node: false,
            record: big,
        };
        m.nodes[1].handle_message(now, &a, &msg.to_bytes());
        assert_eq!(m.nodes[1].stats().oversized_records, 1);
    }

    #[test]
    fn values_are_bounded_per_key() {
        let now = Instant::now();
        let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
        let from = contact(5, 1);
        let mut stored = 0;
        for p in 0..(MAX_VALUES_PER_KEY + 10) as u8 {
            let mut v = vec![7u8; 32];
            v.extend_from_slice(&[p; 32]);
            v.extend_from_slice(&1u64.to_be_bytes());
            v.extend_from_slice(&2_000_000_000u64.to_be_bytes());
            v.extend_from_slice(b"provider");
            let msg = Msg::Store {
                txid: p as u32,
                node: false,
                record: v,
            };
            d.handle_message(now, &from, &msg.to_bytes());
            if let Some((_, r)) = d.poll_transmit() {
                if Msg::parse(&r).unwrap()
                    == (Msg::Stored {
                        txid: p as u32,
                        ok: true,
                    })
                {
                    stored += 1;
                }
            }
        }
        assert_eq!(stored, MAX_VALUES_PER_KEY);
        assert_eq!(d.local_values(now, &[7; 32]).len(), MAX_VALUES_PER_KEY);
    }

    #[test]
    fn requests_over_budget_are_dropped() {
        let now = Instant::now();
        let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
        let from = contact(5, 1);
        for _ in 0..200 {
            d.handle_message(now, &from, &Msg::Ping { txid: 1 }.to_bytes());
        }
        assert_eq!(d.stats().requests_in, REQUEST_BURST as u64);
        assert_eq!(d.stats().rate_limited, 200 - REQUEST_BURST as u64);
    }

    #[test]
    fn kept_values_come_back_after_a_restart() {
        let value = |target: u8, publisher: u8, expires: u64, text: &[u8]| {
            let mut v = vec![target; 32];
            v.extend_from_slice(&[publisher; 32]);
            v.extend_from_slice(&1u64.to_be_bytes());
            v.extend_from_slice(&expires.to_be_bytes());
            v.extend_from_slice(text);
            v
        };
        let now = Instant::now();
        let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
        d.put(now, &value(7, 0, 2_000_000_000, b"mine")).unwrap();
        let from = contact(5, 1);
        for (txid, v) in [
            (1, value(7, 5, 2_000_000_000, b"held")),
            (2, value(8, 5, 1_700_000_100, b"soon gone")),
        ] {
            let msg = Msg::Store {
                txid,
                node: false,
                record: v,
            };
            d.handle_message(now, &from, &msg.to_bytes());
        }
        let kept = d.value_records(now);
        // Our own value is both published and stored here: kept once.
        assert_eq!(kept.len(), 3, "{kept:?}");

        // The next run, 200 s later: the short-lived value has expired,
        // and a damaged record is refused like one from the network.
        let later = now + Duration::from_secs(200);
        let mut d2 = Dht::new(contact(0, 2), Plain, later, 1_700_000_200, 2);
        let back: Vec<bool> = kept.iter().map(|r| d2.restore_value(later, r)).collect();
        assert_eq!(back.iter().filter(|b| **b).count(), 2, "{back:?}");
        assert!(!d2.restore_value(later, &kept[0][..40]));
        let mut texts: Vec<Vec<u8>> = d2
            .local_values(later, &[7; 32])
            .iter()
            .map(|r| r[80..].to_vec())
            .collect();
        texts.sort();
        assert_eq!(texts, [b"held".to_vec(), b"mine".to_vec()]);
        assert!(d2.local_values(later, &[8; 32]).is_empty());
        // Only our own is published again.
        assert_eq!(d2.own_values.len(), 1);
        assert_eq!(d2.value_records(later).len(), 2);
    }
}
