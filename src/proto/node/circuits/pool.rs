//! The relay pool: the relays a source draws circuit paths from (learnt
//! from the DHT: its routing table and random lookups), the relays it
//! blamed for a failed circuit and avoids for a while, and when to look for
//! more. A part of its own: the node offers it contacts, asks it for path
//! candidates and tells it whom to blame; it never reaches into the node.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use super::Peer;
use crate::proto::dht::Contact;
use crate::proto::identity::{NodeId, ROLE_RELAY};
use crate::proto::route::Candidate;

/// Relays kept in the pool.
pub(super) const POOL_MAX: usize = 256;
/// How often the pool is topped up by a random lookup (faster while small).
const POOL_INTERVAL: Duration = Duration::from_secs(300);
const POOL_INTERVAL_SMALL: Duration = Duration::from_secs(10);
/// Below this the pool counts as small.
const POOL_SMALL: usize = 16;
/// A relay that failed a circuit is avoided this long.
pub(super) const BAD_FOR: Duration = Duration::from_secs(60);

/// A relay in the pool: how to reach it, and its record's sequence number
/// and expiry (unix seconds).
struct Entry {
    peer: Peer,
    seq: u64,
    expires: u64,
}

/// Relays to draw paths from, and relays to avoid.
#[derive(Default)]
pub(super) struct RelayPool {
    relays: HashMap<NodeId, Entry>,
    /// Relays blamed for a failed circuit, and when.
    bad: HashMap<NodeId, Instant>,
    last_fill: Option<Instant>,
}

impl RelayPool {
    /// Relays in the pool.
    pub(super) fn len(&self) -> usize {
        self.relays.len()
    }

    /// A relay in the pool.
    pub(super) fn peer(&self, id: &NodeId) -> Option<&Peer> {
        self.relays.get(id).map(|e| &e.peer)
    }

    /// Takes in the relays among verified DHT contacts (`unix`: the wall
    /// clock now; `own`: this node, never its own relay) whose records
    /// carry what a path needs and are newer than what the pool holds.
    pub(super) fn offer(&mut self, unix: u64, own: NodeId, contacts: &[Contact]) {
        for c in contacts {
            if c.info.roles & ROLE_RELAY == 0 || c.info.id == own {
                continue;
            }
            if self.relays.len() >= POOL_MAX && !self.relays.contains_key(&c.info.id) {
                break;
            }
            let Some(peer) = Peer::from_record(&c.record) else {
                continue;
            };
            let newer = self.relays.get(&peer.id).is_none_or(|e| e.seq < c.info.seq);
            if newer && c.info.expires > unix {
                let entry = Entry {
                    peer,
                    seq: c.info.seq,
                    expires: c.info.expires,
                };
                self.relays.insert(entry.peer.id, entry);
            }
        }
    }

    /// A relay failed a circuit: out of the pool (it comes back from the
    /// DHT if it lives) and not picked again for [`BAD_FOR`].
    pub(super) fn blame(&mut self, now: Instant, id: NodeId) {
        self.bad.insert(id, now);
        self.relays.remove(&id);
    }

    /// Forgets expired records and old blame.
    pub(super) fn sweep(&mut self, now: Instant, unix: u64) {
        self.bad
            .retain(|_, t| now.saturating_duration_since(*t) < BAD_FOR);
        self.relays.retain(|_, e| e.expires > unix);
    }

    /// Whether to look for more relays now (more often while the pool is
    /// small); a yes counts as the look.
    pub(super) fn fill_due(&mut self, now: Instant) -> bool {
        let interval = if self.relays.len() < POOL_SMALL {
            POOL_INTERVAL_SMALL
        } else {
            POOL_INTERVAL
        };
        let due = self
            .last_fill
            .is_none_or(|t| now.saturating_duration_since(t) >= interval);
        if due {
            self.last_fill = Some(now);
        }
        due
    }

    /// The relays a path toward `dst` may use (not `dst` itself, nor a
    /// node sharing its address prefix), sorted by ID so that path choice
    /// depends on the seeded RNG alone, not on the hash map's order.
    pub(super) fn candidates(&self, dst: &Ipv6Addr) -> Vec<Candidate> {
        let dst_prefix = &dst.octets()[1..16];
        let mut pool: Vec<Candidate> = self
            .relays
            .values()
            .filter(|e| e.peer.id.0[..15] != *dst_prefix)
            .map(|e| Candidate {
                id: e.peer.id,
                ips: e.peer.ips.clone(),
            })
            .collect();
        pool.sort_unstable_by_key(|c| c.id);
        pool
    }

    /// Relays blamed lately.
    pub(super) fn blamed(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.bad.keys().copied()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock and OsRng
mod tests {
    use super::*;
    use crate::proto::identity::{Identity, RecordExt};
    use crate::proto::records::node_info;

    /// A relay's contact: its record (signed, with an endpoint and an
    /// onion key) and the facts the DHT read from it.
    fn relay(seq: u64, expires: u64) -> (NodeId, Contact) {
        let id = Identity::generate(&mut rand_core::OsRng).unwrap();
        let ext = RecordExt {
            endpoints: vec!["198.18.0.9:7300".parse().unwrap()],
            onion_key: Some([3; 32]),
            roles: ROLE_RELAY,
            expires: Some(expires),
        };
        let rec = id.sign_record_with(seq, &ext);
        let info = node_info(&rec).unwrap();
        let contact = Contact {
            info,
            record: rec.to_bytes().into(),
        };
        (id.node_id(), contact)
    }

    #[test]
    fn the_pool_takes_fresh_relays_and_forgets_blamed_and_expired_ones() {
        let t0 = Instant::now();
        let own = NodeId([0; 32]);
        let (a, ca) = relay(1, 1_000);
        let (b, cb) = relay(1, 2_000);
        // Only relays, only live records, never this node.
        let mut not_relay = cb.clone();
        not_relay.info.roles = 0;
        let mut expired = cb.clone();
        expired.info.expires = 400;
        let mut pool = RelayPool::default();
        pool.offer(500, own, &[not_relay, expired]);
        pool.offer(500, b, std::slice::from_ref(&cb));
        assert_eq!(pool.len(), 0);
        pool.offer(500, own, &[ca.clone(), cb.clone()]);
        assert_eq!(pool.len(), 2);
        assert!(pool.peer(&a).is_some() && pool.peer(&b).is_some());
        // Candidates: sorted by ID, and never the destination itself.
        let all = pool.candidates(&Ipv6Addr::LOCALHOST);
        assert_eq!(all.len(), 2);
        assert!(all[0].id < all[1].id);
        let toward_a = pool.candidates(&a.overlay_address());
        assert_eq!(toward_a.len(), 1);
        assert_eq!(toward_a[0].id, b);
        // Blame: out, and remembered for BAD_FOR.
        pool.blame(t0, b);
        assert!(pool.peer(&b).is_none());
        assert_eq!(pool.blamed().collect::<Vec<_>>(), vec![b]);
        pool.sweep(t0 + BAD_FOR / 2, 500);
        assert_eq!(pool.blamed().count(), 1);
        pool.sweep(t0 + BAD_FOR, 500);
        assert_eq!(pool.blamed().count(), 0);
        // Expiry: a's record ends at 1,000.
        pool.sweep(t0, 1_000);
        assert_eq!(pool.len(), 0);
        // A newer record replaces an older one; an older one never does.
        pool.offer(500, own, std::slice::from_ref(&cb));
        let mut newer = cb.clone();
        newer.info.seq = 2;
        newer.info.expires = 3_000;
        pool.offer(500, own, &[newer]);
        pool.offer(500, own, &[cb]);
        pool.sweep(t0, 2_500);
        assert_eq!(pool.len(), 1, "the record expiring at 3,000 is kept");
    }

    #[test]
    fn the_pool_looks_for_more_often_while_small() {
        let t0 = Instant::now();
        let mut pool = RelayPool::default();
        assert!(pool.fill_due(t0));
        assert!(!pool.fill_due(t0 + POOL_INTERVAL_SMALL / 2));
        assert!(pool.fill_due(t0 + POOL_INTERVAL_SMALL));
        assert!(!pool.fill_due(t0 + POOL_INTERVAL_SMALL + POOL_INTERVAL_SMALL / 2));
    }

    #[test]
    fn a_pool_of_many_relays_looks_for_more_rarely() {
        let t0 = Instant::now();
        let (_, c) = relay(1, 2_000);
        let mut pool = RelayPool::default();
        // The same relay under POOL_SMALL identities (the pool keys by the
        // record's node ID, so fill it directly).
        for i in 0..POOL_SMALL {
            let mut peer = Peer::from_record(&c.record).unwrap();
            peer.id = NodeId([i as u8 + 1; 32]);
            let entry = Entry {
                peer,
                seq: 1,
                expires: 2_000,
            };
            pool.relays.insert(entry.peer.id, entry);
        }
        assert!(pool.fill_due(t0));
        assert!(!pool.fill_due(t0 + POOL_INTERVAL_SMALL));
        assert!(pool.fill_due(t0 + POOL_INTERVAL));
        // Full: nobody new is taken in.
        for i in POOL_SMALL..POOL_MAX {
            let mut peer = Peer::from_record(&c.record).unwrap();
            peer.id = NodeId([
                0xee,
                (i >> 8) as u8,
                i as u8,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                1,
            ]);
            let entry = Entry {
                peer,
                seq: 1,
                expires: 2_000,
            };
            pool.relays.insert(entry.peer.id, entry);
        }
        assert_eq!(pool.len(), POOL_MAX);
        pool.offer(500, NodeId([0; 32]), &[c]);
        assert_eq!(pool.len(), POOL_MAX);
    }
}
