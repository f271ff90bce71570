//! Lookups: what they look for, their disjoint paths of candidates, how
//! replies and store answers move them on, and how they end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::identity::NodeId;

use super::{
    distance, take_out, Contact, Dht, Key, Msg, Pending, RecordError, Records, Source, K,
    LOOKUP_DEADLINE, MAX_LOOKUPS, MAX_LOOKUP_QUERIES, MAX_VALUES_PER_KEY, PATHS, PATH_ALPHA,
    REPLICATION, REPLY_CONTACTS,
};

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

/// What happens when a lookup for the closest nodes ends.
#[derive(Clone, Debug)]
pub(super) enum Then {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CandState {
    New,
    Asked,
    Answered,
    Failed,
}

#[derive(Clone, Debug)]
pub(super) struct Cand {
    pub(super) contact: Contact,
    dist: Key,
    pub(super) state: CandState,
    depth: u32,
}

#[derive(Debug)]
pub(super) struct Lookup {
    goal: Goal,
    target: Key,
    then: Then,
    pub(super) started: Instant,
    pub(super) paths: Vec<Vec<Cand>>,
    /// Every candidate ever placed, and its path: a node belongs to one
    /// path only (disjoint paths).
    owner: HashMap<NodeId, usize>,
    /// Stop once this bucket is full (a joining node's refresh).
    pub(super) fill: Option<usize>,
    queries: usize,
    found: Option<(Contact, u32)>,
    values: HashMap<NodeId, (u64, Arc<[u8]>)>,
    /// Stores in flight, and how many succeeded.
    pub(super) storing: Option<(usize, usize)>,
    /// A path's next query waits until then for its peer's budget
    /// ([`REQUEST_OUT`](super::REQUEST_OUT)).
    pub(super) waiting: Option<Instant>,
}

impl<R: Records> Dht<R> {
    pub(super) fn on_stored(&mut self, now: Instant, from: &Contact, txid: u32, ok: bool) {
        let Some(inf) = self.take_inflight(from, txid) else {
            return;
        };
        self.insert(now, from.clone(), Source::Network, true);
        if let Pending::Store { lookup } = inf.what {
            self.store_answered(now, lookup, ok);
        }
    }

    pub(super) fn store_answered(&mut self, now: Instant, lookup: u64, ok: bool) {
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

    pub(super) fn on_reply(
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

    /// Starts a lookup; its result comes as a [`LookupDone`] event with the
    /// returned id. Refused (None) when too many run already.
    pub fn lookup(&mut self, now: Instant, goal: Goal) -> Option<u64> {
        self.start_lookup(now, goal, Then::Nothing)
    }

    pub(super) fn start_lookup(&mut self, now: Instant, goal: Goal, then: Then) -> Option<u64> {
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
            waiting: None,
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
    pub(super) fn step(&mut self, now: Instant, id: u64) {
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
        let mut waiting: Option<Instant> = None;
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
                        // The peer's budget for us is spent: the path waits
                        // for it rather than ask and be refused (or skip to
                        // a farther candidate).
                        if let Err(ready) = take_out(&mut self.out_rates, now, &c.contact.info.id) {
                            waiting = Some(waiting.map_or(ready, |w| w.min(ready)));
                            pending_new = true;
                            break;
                        }
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
        l.waiting = waiting;
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

    pub(super) fn finish(&mut self, now: Instant, id: u64, outcome: Option<Outcome>) {
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
                    l.waiting = None;
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

    /// Lookups running.
    pub fn running(&self) -> usize {
        self.lookups.len()
    }
}
