//! The routing table: XOR distance, buckets of entries with their
//! replacement caches, what [`Dht::table`] reports, and bucket refresh.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::proto::identity::NodeId;

use super::{
    Contact, Dht, Goal, Key, RecordError, Records, Source, K, MAX_FAILS, MAX_PER_IP,
    REFRESH_INTERVAL, REPLACEMENTS,
};

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

/// A routing-table entry.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) contact: Contact,
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
pub(super) struct Bucket {
    pub(super) entries: Vec<Entry>,
    pub(super) replacements: VecDeque<(Contact, Source)>,
    pub(super) last_lookup: Option<Instant>,
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

impl<R: Records> Dht<R> {
    pub(super) fn bucket_of(&self, id: &NodeId) -> Option<usize> {
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

    pub(super) fn count_record(&mut self, e: Option<&RecordError>) {
        match e {
            Some(RecordError::Forged) => self.stats.forged_records += 1,
            Some(RecordError::Expired) => self.stats.expired_records += 1,
            Some(RecordError::Oversized) => self.stats.oversized_records += 1,
            // Only our own puts are refused this way, never a record
            // from the network.
            Some(RecordError::TooManyOwn) | None => {}
        }
    }

    pub(super) fn insert(&mut self, now: Instant, contact: Contact, source: Source, live: bool) {
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
    pub(super) fn evict(&mut self, id: &NodeId) {
        if let Some(b) = self.bucket_of(id) {
            if let Some(bucket) = self.buckets.get_mut(b) {
                bucket.entries.retain(|e| e.contact.info.id != *id);
                bucket.replacements.retain(|(c, _)| c.info.id != *id);
            }
        }
    }

    pub(super) fn failed(&mut self, id: &NodeId) {
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
}
