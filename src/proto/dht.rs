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
use super::limit::{Limit, Rate};

mod lookup;
mod store;
mod table;
mod wire;

pub use lookup::{Goal, LookupDone, Outcome};
pub use table::{common_prefix, distance, EntryView, Refresh};
pub use wire::{BadMessage, Msg};

use lookup::{CandState, Lookup};
use store::{OwnValue, Republish, StoredValue};
use table::{Bucket, Entry};

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
/// Lookups that storing our own values again may hold at once: the rest of
/// [`MAX_LOOKUPS`] stays free for our record, puts, gets and addresses, however
/// many values this node has published (they wait in a queue).
pub const REPUBLISH_LOOKUPS: usize = MAX_LOOKUPS / 2;
/// How fast those lookups start: each asks a few peers and stores at up to
/// [`REPLICATION`], and in a small network the same few peers answer them
/// all. At 4 a second a peer of a 2-node network gets ~8 requests a second
/// from republishing, well inside [`REQUEST_RATE`]; faster, peers drop the
/// requests, they time out, and after [`MAX_FAILS`] the peers are dropped
/// from the table. 4 a second still stores 7,200 values every
/// [`REPUBLISH_INTERVAL`].
pub const REPUBLISH_RATE: Limit = Limit {
    per_sec: 4,
    burst: 8,
};
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
/// What this node asks of one peer: its own budget at that peer
/// ([`REQUEST_RATE`], [`REQUEST_BURST`]) with a fifth to spare. A lookup
/// whose next query would exceed it waits; a burst of lookups (gets, puts,
/// republishing) to the few peers of a small network would otherwise be
/// refused by them, time out, and get the peers dropped after
/// [`MAX_FAILS`]. Stores and pings are counted but never wait (stores
/// follow a lookup that waited already).
pub const REQUEST_OUT: Limit = Limit {
    per_sec: 16,
    burst: 48,
};
const _: () = assert!(
    (REQUEST_OUT.per_sec as f64) < REQUEST_RATE && (REQUEST_OUT.burst as f64) < REQUEST_BURST
);
/// Unexpired values this node publishes at once (its own puts): each is
/// kept in memory and in the vault and stored again every
/// [`REPUBLISH_INTERVAL`] at [`REPUBLISH_RATE`] (7,200 a round at best),
/// and each other node keeps at most [`MAX_VALUES_PER_PUBLISHER`] of one
/// publisher's. As many as this node holds for others ([`MAX_VALUES`]).
pub const MAX_OWN_VALUES: usize = 8192;
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
    /// This node publishes [`MAX_OWN_VALUES`] unexpired values already.
    #[error(
        "this node publishes {max} unexpired values of its own already, the most it may at once (each goes out again every 30 min until it expires): let some expire, or put again under an existing key (a short ttl frees its slot soon)",
        max = MAX_OWN_VALUES
    )]
    TooManyOwn,
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
    /// Own values waiting to be stored again (see [`REPUBLISH_LOOKUPS`]).
    republish: Republish,
    /// Paces the republishing lookups ([`REPUBLISH_RATE`]).
    republish_rate: Rate,
    /// A restore found more own values than [`MAX_OWN_VALUES`] (said once).
    own_over_bound_logged: bool,
    budgets: HashMap<NodeId, (f64, Instant)>,
    /// What we asked of each peer lately ([`REQUEST_OUT`]).
    out_rates: HashMap<NodeId, Rate>,
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
            republish: Republish::default(),
            republish_rate: Rate::new(now),
            own_over_bound_logged: false,
            budgets: HashMap::new(),
            out_rates: HashMap::new(),
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
        n += self.out_rates.len() * 64;
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

    /// Sends a request and remembers it until its answer or timeout. A
    /// lookup's query has taken from `to`'s budget already
    /// ([`take_out`]); anything else is charged here.
    fn request(&mut self, now: Instant, to: &Contact, what: Pending, msg: impl FnOnce(u32) -> Msg) {
        if !matches!(what, Pending::Find { .. }) {
            charge_out(&mut self.out_rates, now, &to.info.id);
        }
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
        // Lookups waiting for a peer's budget.
        let waiting = self
            .lookups
            .values()
            .filter(|l| l.storing.is_none())
            .filter_map(|l| l.waiting)
            .min();
        // Queued own values that a free slot could take: due when the
        // pace allows the next (now, if it does already).
        let republish = (!self.republish.is_empty()
            && self.lookups.len() < REPUBLISH_LOOKUPS
            && self.table_len() > 0)
            .then(|| self.republish_rate.ready_at(REPUBLISH_RATE));
        [rpc, lookup, refresh, publish, republish, waiting]
            .into_iter()
            .flatten()
            .min()
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
        let ready: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, l)| l.storing.is_none() && l.waiting.is_some_and(|w| w <= now))
            .map(|(i, _)| *i)
            .collect();
        for id in ready {
            self.step(now, id);
        }
        // A peer whose budget is whole again needs no entry.
        self.out_rates.retain(|_, r| !r.is_full(now));
        if self
            .last_publish
            .is_some_and(|t| now.saturating_duration_since(t) >= REPUBLISH_INTERVAL)
        {
            self.publish(now);
        }
        self.republish_some(now);
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

    /// Sends a liveness check (its answer refreshes the entry; silence
    /// counts as a failure).
    pub fn ping(&mut self, now: Instant, to: &Contact) {
        self.request(now, to, Pending::Ping, |txid| Msg::Ping { txid });
    }
}

/// Takes a token from what we may ask of `id` ([`REQUEST_OUT`]), or says
/// when there is one.
fn take_out(rates: &mut HashMap<NodeId, Rate>, now: Instant, id: &NodeId) -> Result<(), Instant> {
    let Some(rate) = out_rate(rates, now, id) else {
        // No room to remember another peer: wait for some to fill up.
        return Err(now + REQUEST_OUT.interval());
    };
    if rate.allow(now, REQUEST_OUT) {
        Ok(())
    } else {
        Err(rate.ready_at(REQUEST_OUT))
    }
}

/// Counts a request to `id` that does not wait.
fn charge_out(rates: &mut HashMap<NodeId, Rate>, now: Instant, id: &NodeId) {
    if let Some(rate) = out_rate(rates, now, id) {
        rate.charge(now, REQUEST_OUT);
    }
}

/// `id`'s entry. At [`MAX_RATE_PEERS`] entries, those whose bucket is full
/// again make room; if none is, a new peer gets no entry (and its queries
/// wait) rather than the table being wiped: a wipe would hand every peer
/// still being paced a whole burst again, which a swarm of fresh contacts
/// could use to get our real peers to refuse us.
fn out_rate<'a>(
    rates: &'a mut HashMap<NodeId, Rate>,
    now: Instant,
    id: &NodeId,
) -> Option<&'a mut Rate> {
    if rates.len() >= MAX_RATE_PEERS && !rates.contains_key(id) {
        rates.retain(|_, r| !r.is_full(now));
        if rates.len() >= MAX_RATE_PEERS {
            return None;
        }
    }
    Some(rates.entry(*id).or_insert_with(|| Rate::new(now)))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock
mod tests;
