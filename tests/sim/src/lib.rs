//! A simulator for the DHT: thousands of `qgate` protocol cores in one
//! thread, on a virtual clock, over an abstract message transport (no
//! sockets, no WireGuard).
//!
//! Identities are the simulation-only seam: generating 10,000 RSA keys
//! would take ten minutes, so a simulated node's ID is the SHA-256 of 32
//! random bytes and its records are "signed" by an [`Oracle`] that hands
//! out an unguessable 128-bit tag per (signer, sequence number) and checks
//! it later — unforgeable for anyone who doesn't ask the oracle as that
//! signer, which only the node itself does. The DHT sees the oracle
//! through the same [`Records`] trait as the node's RSA checks.
//!
//! [`net`] and [`scenario`] simulate whole nodes instead (real identities,
//! WireGuard links, circuits): see there.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qgate::proto::dht::{
    Contact, Dht, Goal, Key, LookupDone, Msg, Outcome, RecordError, RecordInfo, Records, Refresh,
    Source, ValueInfo,
};
use qgate::proto::NodeId;
use sha2::{Digest, Sha256};

pub mod keys;
pub mod net;
pub mod scenario;

/// Wall-clock time at the simulation's start (any fixed value will do).
pub const START_UNIX: u64 = 1_800_000_000;
/// Records live a day.
const TTL: u64 = 86_400;

/// A small deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);
impl Rng {
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// 32 random bytes.
    pub fn key(&mut self) -> Key {
        let mut k = [0u8; 32];
        for c in k.chunks_mut(8) {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        k
    }
}

/// The simulation's signature authority.
#[derive(Default)]
pub struct Oracle {
    tags: HashMap<(NodeId, u64), u128>,
    rng: u64,
    /// Checks made (each one a hash-map lookup).
    pub checks: u64,
}

impl Oracle {
    fn tag(&mut self, signer: NodeId, seq: u64) -> u128 {
        self.rng = self.rng.wrapping_add(1);
        let mut r = Rng(self.rng ^ u64::from_le_bytes(signer.0[..8].try_into().unwrap()));
        let t = ((r.next_u64() as u128) << 64) | r.next_u64() as u128;
        *self.tags.entry((signer, seq)).or_insert(t)
    }
}

/// Simulated node record: `b'S' | id [32] | seq u64 | expires u64 | tag u128`.
pub fn sim_record(oracle: &mut Oracle, id: NodeId, seq: u64) -> Vec<u8> {
    let tag = oracle.tag(id, seq);
    let mut b = Vec::with_capacity(65);
    b.push(b'S');
    b.extend_from_slice(&id.0);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&(START_UNIX + TTL).to_be_bytes());
    b.extend_from_slice(&tag.to_be_bytes());
    b
}

/// A record claiming `id` with a tag nobody issued.
pub fn forged_record(id: NodeId, rng: &mut Rng) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(&id.0);
    b.extend_from_slice(&99u64.to_be_bytes());
    b.extend_from_slice(&(START_UNIX + TTL).to_be_bytes());
    b.extend_from_slice(&(rng.next_u64() as u128).to_be_bytes());
    b
}

/// The oracle as the DHT's record checker.
#[derive(Clone)]
pub struct SimRecords(pub Rc<RefCell<Oracle>>);

impl Records for SimRecords {
    fn check_node(&mut self, b: &[u8], now: u64) -> Result<RecordInfo, RecordError> {
        if b.len() != 65 || b[0] != b'S' {
            return Err(RecordError::Forged);
        }
        let id = NodeId(b[1..33].try_into().unwrap());
        let seq = u64::from_be_bytes(b[33..41].try_into().unwrap());
        let expires = u64::from_be_bytes(b[41..49].try_into().unwrap());
        let tag = u128::from_be_bytes(b[49..65].try_into().unwrap());
        let mut o = self.0.borrow_mut();
        o.checks += 1;
        if o.tags.get(&(id, seq)) != Some(&tag) {
            return Err(RecordError::Forged);
        }
        if expires <= now {
            return Err(RecordError::Expired);
        }
        Ok(RecordInfo {
            id,
            seq,
            expires,
            roles: 0,
            ip: None,
        })
    }
    fn check_value(&mut self, _b: &[u8], _now: u64) -> Result<ValueInfo, RecordError> {
        // The simulation exercises node lookups; value records are tested
        // with real RSA records in the node's own tests.
        Err(RecordError::Forged)
    }
}

/// How a simulated node behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Follows the protocol.
    Honest,
    /// Answers lookups with forged records and with other liars, never
    /// with the nodes it should name; drops stores.
    Liar,
    /// One of a colluding group with IDs near a target: names only its
    /// accomplices, hides the target.
    Eclipser,
}

struct SimNode {
    dht: Dht<SimRecords>,
    alive: bool,
    behaviour: Behaviour,
    timer: Option<Instant>,
}

enum Event {
    Deliver {
        to: usize,
        from: usize,
        bytes: Vec<u8>,
    },
    Timer(usize),
    /// Join: publish now, refresh every bucket a few seconds later.
    Join(usize),
    /// Refresh every bucket.
    Refresh(usize),
    /// Refresh the buckets a join left short.
    JoinRefresh(usize),
}

/// An event in the queue, ordered by (time, order scheduled) alone.
struct Queued {
    at: Duration,
    seq: u64,
    ev: Event,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Results of a batch of lookups.
#[derive(Clone, Debug, Default)]
pub struct LookupStats {
    /// Lookups run.
    pub total: usize,
    /// Lookups that found their target.
    pub found: usize,
    /// Hops of the successful ones.
    pub hops: Vec<u32>,
    /// Queries per lookup.
    pub queries: Vec<usize>,
    /// Virtual time per lookup.
    pub elapsed: Vec<Duration>,
}

impl LookupStats {
    /// Found / total.
    pub fn success(&self) -> f64 {
        self.found as f64 / self.total.max(1) as f64
    }
    /// A percentile of hops.
    pub fn hops_pct(&self, p: f64) -> u32 {
        pct(&self.hops, p)
    }
    /// A percentile of queries.
    pub fn queries_pct(&self, p: f64) -> usize {
        pct(&self.queries, p)
    }
    /// Mean queries per lookup.
    pub fn queries_mean(&self) -> f64 {
        self.queries.iter().sum::<usize>() as f64 / self.queries.len().max(1) as f64
    }
    /// One line for the report.
    pub fn line(&self) -> String {
        let mut el = self.elapsed.clone();
        el.sort();
        format!(
            "{}/{} found ({:.2}%), hops median {} p99 {}, queries/lookup mean {:.1} p99 {}, virtual time median {:?}",
            self.found,
            self.total,
            100.0 * self.success(),
            self.hops_pct(0.5),
            self.hops_pct(0.99),
            self.queries_mean(),
            self.queries_pct(0.99),
            el.get(el.len() / 2).copied().unwrap_or_default(),
        )
    }
}

pub(crate) fn pct<T: Copy + Ord + Default>(v: &[T], p: f64) -> T {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return T::default();
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The simulated network.
pub struct Sim {
    nodes: Vec<SimNode>,
    by_id: HashMap<NodeId, usize>,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    base: Instant,
    now: Instant,
    /// Randomness of the simulation.
    pub rng: Rng,
    oracle: Rc<RefCell<Oracle>>,
    /// Messages delivered.
    pub delivered: u64,
    done: Vec<(usize, LookupDone)>,
}

impl Sim {
    /// An empty network.
    pub fn new(seed: u64) -> Sim {
        let base = Instant::now();
        Sim {
            nodes: Vec::new(),
            by_id: HashMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            base,
            now: base,
            rng: Rng(seed),
            oracle: Rc::new(RefCell::new(Oracle::default())),
            delivered: 0,
            done: Vec::new(),
        }
    }

    /// Nodes, alive or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A node's ID.
    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].dht.own().info.id
    }

    /// Whether a node is up.
    pub fn alive(&self, i: usize) -> bool {
        self.nodes[i].alive
    }

    /// Nodes that follow the protocol and are up.
    pub fn honest_alive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive && self.nodes[i].behaviour == Behaviour::Honest)
            .collect()
    }

    fn schedule(&mut self, after: Duration, ev: Event) {
        self.seq += 1;
        let at = self.now.duration_since(self.base) + after;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn latency(&mut self) -> Duration {
        Duration::from_millis(5 + self.rng.below(45) as u64)
    }

    /// Adds a node with this ID, joining through `bootstrap` after `delay`.
    pub fn add_node(
        &mut self,
        id: NodeId,
        behaviour: Behaviour,
        bootstrap: Option<usize>,
        delay: Duration,
    ) -> usize {
        let rec = sim_record(&mut self.oracle.borrow_mut(), id, 1);
        let mut records = SimRecords(self.oracle.clone());
        let info = records.check_node(&rec, START_UNIX).expect("own record");
        let own = Contact {
            info,
            record: Arc::from(rec),
        };
        let i = self.nodes.len();
        let seed = self.rng.next_u64();
        let dht = Dht::new(own, records, self.base, START_UNIX, seed);
        self.nodes.push(SimNode {
            dht,
            alive: true,
            behaviour,
            timer: None,
        });
        self.by_id.insert(id, i);
        if let Some(b) = bootstrap {
            let c = self.nodes[b].dht.own().clone();
            let now = self.now;
            self.nodes[i].dht.add_contact(now, c, Source::Config);
        }
        // Join: look up our own ID now (publish), refresh the buckets once
        // that has filled the ones near us.
        self.schedule(delay, Event::Join(i));
        i
    }

    /// A fresh random ID.
    pub fn random_id(&mut self) -> NodeId {
        NodeId(Sha256::digest(self.rng.key()).into())
    }

    /// An ID sharing at least `bits` leading bits with `target`, found by
    /// hashing random keys as an attacker would (2^bits tries on average).
    pub fn id_near(&mut self, target: &NodeId, bits: usize) -> NodeId {
        loop {
            let id: [u8; 32] = Sha256::digest(self.rng.key()).into();
            if qgate::proto::dht::common_prefix(&id, &target.0) >= bits {
                return NodeId(id);
            }
        }
    }

    /// Whether a node is one of the colluders.
    pub fn is_colluder(&self, i: usize) -> bool {
        self.nodes[i].behaviour == Behaviour::Eclipser
    }

    /// Takes a node down: messages to it vanish.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Runs a refresh of every bucket on every live node, spread over `over`.
    pub fn refresh_all(&mut self, over: Duration) {
        let n = self.nodes.len();
        for i in 0..n {
            if self.nodes[i].alive {
                let d = Duration::from_micros(self.rng.next_u64() % over.as_micros().max(1) as u64);
                self.schedule(d, Event::Refresh(i));
            }
        }
    }

    fn touch(&mut self, i: usize) {
        // Drain what the node wants sent, then make sure its timer is set.
        while let Some((to, bytes)) = self.nodes[i].dht.poll_transmit() {
            if let Some(&j) = self.by_id.get(&to.info.id) {
                let l = self.latency();
                self.schedule(
                    l,
                    Event::Deliver {
                        to: j,
                        from: i,
                        bytes,
                    },
                );
            }
        }
        while let Some(ev) = self.nodes[i].dht.poll_event() {
            self.done.push((i, ev));
        }
        if let Some(t) = self.nodes[i].dht.poll_timeout() {
            // A deadline already due is served a moment later, so a timer
            // that somehow stays due can't spin the simulation in place.
            let t = t.max(self.now + Duration::from_millis(1));
            if self.nodes[i].timer.is_none_or(|s| t < s || s < self.now) {
                self.nodes[i].timer = Some(t);
                let after = t - self.now;
                self.schedule(after, Event::Timer(i));
            }
        }
    }

    /// Runs events until none is left before `until` (virtual time from now).
    pub fn run_for(&mut self, until: Duration) {
        let end = self.now.duration_since(self.base) + until;
        while self.queue.peek().is_some_and(|Reverse(q)| q.at <= end) {
            let Some(Reverse(Queued { at, ev, .. })) = self.queue.pop() else {
                break;
            };
            self.now = self.base + at;
            let now = self.now;
            match ev {
                Event::Deliver { to, from, bytes } => {
                    if !self.nodes[to].alive {
                        continue;
                    }
                    self.delivered += 1;
                    let from_c = self.nodes[from].dht.own().clone();
                    if self.nodes[to].behaviour != Behaviour::Honest {
                        if let Some(reply) = self.misbehave(to, &bytes) {
                            let l = self.latency();
                            self.schedule(
                                l,
                                Event::Deliver {
                                    to: from,
                                    from: to,
                                    bytes: reply,
                                },
                            );
                            continue;
                        }
                    }
                    self.nodes[to].dht.handle_message(now, &from_c, &bytes);
                    self.touch(to);
                }
                Event::Timer(i) => {
                    if !self.nodes[i].alive {
                        continue;
                    }
                    if self.nodes[i].timer.is_some_and(|t| t <= now) {
                        self.nodes[i].timer = None;
                        self.nodes[i].dht.handle_timeout(now);
                    }
                    self.touch(i);
                }
                Event::Refresh(i) => {
                    if self.nodes[i].alive {
                        self.nodes[i].dht.refresh(now, Refresh::All);
                        self.touch(i);
                    }
                }
                Event::JoinRefresh(i) => {
                    if self.nodes[i].alive {
                        self.nodes[i].dht.refresh(now, Refresh::Join);
                        self.touch(i);
                    }
                }
                Event::Join(i) => {
                    self.nodes[i].dht.publish(now);
                    self.touch(i);
                    self.schedule(Duration::from_secs(3), Event::JoinRefresh(i));
                }
            }
        }
        self.now = self.base + end;
    }

    /// A misbehaving node's answer to a request (None: let its DHT handle
    /// the message, e.g. replies to its own lookups).
    fn misbehave(&mut self, i: usize, bytes: &[u8]) -> Option<Vec<u8>> {
        let behaviour = self.nodes[i].behaviour;
        match Msg::parse(bytes).ok()? {
            Msg::Find { txid, target, .. } => {
                // Eclipsers name only each other; liars any misbehaving node.
                let accomplice = |b: Behaviour| match behaviour {
                    Behaviour::Eclipser => b == Behaviour::Eclipser,
                    _ => b != Behaviour::Honest,
                };
                let accomplices: Vec<Contact> = self.nodes[i]
                    .dht
                    .closest(&target, 64)
                    .into_iter()
                    .filter(|c| {
                        self.by_id
                            .get(&c.info.id)
                            .is_some_and(|&j| accomplice(self.nodes[j].behaviour))
                    })
                    .collect();
                let mut nodes: Vec<Vec<u8>> = accomplices
                    .iter()
                    .take(6)
                    .map(|c| c.record.to_vec())
                    .collect();
                // Eclipsers add their own record (they want to be asked next).
                nodes.insert(0, self.nodes[i].dht.own().record.to_vec());
                if behaviour == Behaviour::Liar {
                    // Forgeries: the target itself (a lookup's prize) and a
                    // random node.
                    nodes.push(forged_record(NodeId(target), &mut self.rng));
                    let r = self.random_id();
                    nodes.push(forged_record(r, &mut self.rng));
                }
                Some(
                    Msg::Reply {
                        txid,
                        values: vec![],
                        nodes,
                    }
                    .to_bytes(),
                )
            }
            Msg::Store { txid, .. } => Some(Msg::Stored { txid, ok: true }.to_bytes()),
            _ => None,
        }
    }

    /// Builds a network of `n` nodes (a fraction `liars` of them liars),
    /// each joining through a random earlier honest node (bootstrap peers
    /// are chosen out of band: a node whose only bootstrap peer lies is cut
    /// off in any DHT), `gap` apart, and lets it settle.
    pub fn build(n: usize, liars: f64, gap: Duration, seed: u64) -> Sim {
        let mut sim = Sim::new(seed);
        let mut honest = Vec::new();
        for i in 0..n {
            let id = sim.random_id();
            let behaviour = if i > 10 && (sim.rng.next_u64() % 10_000) as f64 / 10_000.0 < liars {
                Behaviour::Liar
            } else {
                Behaviour::Honest
            };
            let boot = (!honest.is_empty()).then(|| honest[sim.rng.below(honest.len())]);
            let me = sim.add_node(id, behaviour, boot, gap * i as u32);
            if behaviour == Behaviour::Honest {
                honest.push(me);
            }
        }
        sim.run_for(gap * n as u32 + Duration::from_secs(60));
        sim
    }

    /// Looks up `count` targets from random honest live sources, `gap`
    /// apart; `target` picks each target.
    pub fn lookups(
        &mut self,
        count: usize,
        gap: Duration,
        mut target: impl FnMut(&mut Sim) -> usize,
    ) -> LookupStats {
        let sources = self.honest_alive();
        let mut want: HashMap<(usize, u64), NodeId> = HashMap::new();
        self.done.clear();
        for _ in 0..count {
            let t = target(self);
            let s = loop {
                let s = sources[self.rng.below(sources.len())];
                if s != t {
                    break s;
                }
            };
            let tid = self.id(t);
            let now = self.now;
            let goal = Goal::Node {
                prefix: tid.0.to_vec(),
                min_seq: 0,
                reachable: false,
            };
            if let Some(id) = self.nodes[s].dht.lookup(now, goal) {
                want.insert((s, id), tid);
            }
            self.touch(s);
            self.run_for(gap);
        }
        self.run_for(Duration::from_secs(60));
        let mut st = LookupStats {
            total: count,
            ..Default::default()
        };
        for (s, ev) in std::mem::take(&mut self.done) {
            let Some(tid) = want.get(&(s, ev.id)) else {
                continue;
            };
            st.queries.push(ev.queries);
            st.elapsed.push(ev.elapsed);
            if let Outcome::Found(c) = &ev.outcome {
                if c.info.id == *tid {
                    st.found += 1;
                    st.hops.push(ev.hops);
                }
            }
        }
        st
    }

    /// Mean and max DHT state per live node, in bytes.
    pub fn state_bytes(&self) -> (usize, usize) {
        let live: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.dht.state_bytes())
            .collect();
        (
            live.iter().sum::<usize>() / live.len().max(1),
            live.iter().copied().max().unwrap_or(0),
        )
    }

    /// Honest live nodes with fewer than `n` table entries.
    pub fn poor_tables(&self, n: usize) -> usize {
        self.nodes
            .iter()
            .filter(|x| x.alive && x.behaviour == Behaviour::Honest && x.dht.table_len() < n)
            .count()
    }

    /// Mean routing-table entries per live node.
    pub fn table_mean(&self) -> f64 {
        let live: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.dht.table_len())
            .collect();
        live.iter().sum::<usize>() as f64 / live.len().max(1) as f64
    }

    /// Sum of a DHT counter over all nodes.
    pub fn total_stats(&self) -> qgate::proto::dht::DhtStats {
        let mut t = qgate::proto::dht::DhtStats::default();
        for n in &self.nodes {
            let s = n.dht.stats();
            t.forged_records += s.forged_records;
            t.liars += s.liars;
            t.lookups += s.lookups;
            t.lookups_refused += s.lookups_refused;
            t.timeouts += s.timeouts;
            t.rate_limited += s.rate_limited;
            t.messages_out += s.messages_out;
            t.bytes_out += s.bytes_out;
        }
        t
    }
}
