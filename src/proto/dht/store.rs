//! What this node stores and publishes: node records and value records kept
//! for others (bounded, and which go when full), and its own record and
//! values, stored at the closest nodes and republished.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lookup::Then;
use super::{
    distance, Dht, Goal, Key, NodeId, RecordError, Records, ValueInfo, MAX_OWN_VALUES,
    MAX_RECORD_BYTES, MAX_STORED_RECORDS, MAX_VALUES, MAX_VALUES_PER_KEY, MAX_VALUES_PER_PUBLISHER,
    REPUBLISH_INTERVAL, REPUBLISH_LOOKUPS, REPUBLISH_RATE,
};

pub(super) struct StoredValue {
    pub(super) info: ValueInfo,
    pub(super) record: Arc<[u8]>,
}

/// A value this node published: its expiry and the record.
pub(super) type OwnValue = (u64, Arc<[u8]>);

/// Own values waiting to be stored again, each at most once, in order.
#[derive(Default)]
pub(super) struct Republish {
    order: VecDeque<(Key, NodeId)>,
    queued: HashSet<(Key, NodeId)>,
}

impl Republish {
    fn push_back(&mut self, key: (Key, NodeId)) {
        if self.queued.insert(key) {
            self.order.push_back(key);
        }
    }

    fn push_front(&mut self, key: (Key, NodeId)) {
        if self.queued.insert(key) {
            self.order.push_front(key);
        }
    }

    fn pop(&mut self) -> Option<(Key, NodeId)> {
        let key = self.order.pop_front()?;
        self.queued.remove(&key);
        Some(key)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    #[cfg(test)]
    pub(super) fn front(&self) -> Option<&(Key, NodeId)> {
        self.order.front()
    }
}

impl<R: Records> Dht<R> {
    pub(super) fn store_node(&mut self, now: Instant, record: &[u8]) -> bool {
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

    pub(super) fn store_value(&mut self, now: Instant, record: &[u8]) -> bool {
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
        // Our values follow, paced: a node that has put thousands must
        // not take every lookup slot (nor the node's time) at once. Those
        // still queued keep their place, so a publish every few seconds
        // (a new endpoint) doesn't starve the end of the queue.
        let keys: Vec<(Key, NodeId)> = self.own_values.keys().copied().collect();
        for key in keys {
            self.republish.push_back(key);
        }
        self.republish_some(now);
    }

    /// Stores queued own values again while fewer than
    /// [`REPUBLISH_LOOKUPS`] lookups run, at most [`REPUBLISH_RATE`].
    /// Called from the timers and [`Dht::publish`]. Each was checked when
    /// it was put or restored, and its key says where it goes: no signature
    /// is verified again. With no contacts the queue waits (a lookup would
    /// end at once, storing nowhere).
    pub(super) fn republish_some(&mut self, now: Instant) {
        if self.table_len() == 0 {
            return;
        }
        let unix = self.unix(now);
        while self.lookups.len() < REPUBLISH_LOOKUPS
            && self.republish_rate.ready_at(REPUBLISH_RATE) <= now
        {
            let Some(key) = self.republish.pop() else {
                return;
            };
            let Some((expires, rec)) = self.own_values.get(&key) else {
                continue; // replaced by a newer put, which went out itself
            };
            if *expires <= unix {
                continue;
            }
            let rec = rec.clone();
            self.republish_rate.allow(now, REPUBLISH_RATE);
            self.start_lookup(now, Goal::Closest(key.0), Then::StoreValue(rec));
        }
    }

    /// Stores a value record (already signed by this node) at the nodes
    /// closest to its key, and again every [`REPUBLISH_INTERVAL`] until it
    /// expires. Refused records return the reason. With every lookup slot
    /// taken, it is queued to go out as slots free up (`Ok(None)`).
    pub fn put(&mut self, now: Instant, record: &[u8]) -> Result<Option<u64>, RecordError> {
        let unix = self.unix(now);
        let info = self.records.check_value(record, unix)?;
        if record.len() > MAX_RECORD_BYTES {
            return Err(RecordError::Oversized);
        }
        self.own_value_fits(now, &info.target)?;
        let rec: Arc<[u8]> = Arc::from(record);
        let key = (info.target, info.publisher);
        self.own_values.insert(key, (info.expires, rec.clone()));
        self.store_value(now, record);
        let id = self.start_lookup(now, Goal::Closest(info.target), Then::StoreValue(rec));
        // First in line: a put is news, a republication is upkeep.
        if id.is_none() {
            self.republish.push_front(key);
        }
        Ok(id)
    }

    /// Whether a value of ours under `target` would fit
    /// [`MAX_OWN_VALUES`]: asked before a value is signed, so a storm of
    /// puts over the bound costs no RSA work.
    pub fn own_value_fits(&mut self, now: Instant, target: &Key) -> Result<(), RecordError> {
        let key = (*target, self.own.info.id);
        if self.own_room(now, &key) {
            Ok(())
        } else {
            Err(RecordError::TooManyOwn)
        }
    }

    /// Whether an own value under `key` fits [`MAX_OWN_VALUES`] (a new
    /// one for a key already ours always does); expired ones go first.
    fn own_room(&mut self, now: Instant, key: &(Key, NodeId)) -> bool {
        if self.own_values.len() < MAX_OWN_VALUES || self.own_values.contains_key(key) {
            return true;
        }
        let unix = self.unix(now);
        self.own_values.retain(|_, (expires, _)| *expires > unix);
        self.own_values.len() < MAX_OWN_VALUES
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
            // The newest of our own per key is published again: the store
            // may hold more than one (a put's record beside the last full
            // set), in no particular order. A value put in this run is
            // newer than any kept one.
            let key = (info.target, info.publisher);
            let newer = match self.own_values.get(&key) {
                Some((_, kept)) => self
                    .records
                    .check_value(kept, unix)
                    .map_or(true, |k| info.seq > k.seq),
                None => true,
            };
            if newer && self.own_room(now, &key) {
                self.own_values
                    .insert(key, (info.expires, Arc::from(record)));
            } else if newer && !self.own_over_bound_logged {
                self.own_over_bound_logged = true;
                tracing::warn!(
                    max = MAX_OWN_VALUES,
                    "more of this node's own values in the store than it may publish: the rest are kept here but not published again"
                );
            }
        }
        self.store_value(now, record)
    }
}
