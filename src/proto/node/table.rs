//! The link table: every link by session index, with the indexes by link
//! key and by overlay address kept consistent with it, the counters of
//! links removed, and the decisions of who must make room when the table
//! or its share for links not yet verified is full. The node acts on those
//! decisions ([`Room`]): it removes the link and tells the circuits.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::hello::HelloState;
use super::tally::ClosedLinks;
use super::{Drops, LinkCounters, LinkState};
use crate::proto::access::link_subnet;
use crate::proto::dht::{Contact, Source};
use crate::proto::identity::{NodeId, NodeRecord};
use crate::proto::message::Reassembler;

/// A neighbour's verified identity.
pub(super) struct Verified {
    pub(super) record: NodeRecord,
    pub(super) record_bytes: Vec<u8>,
    pub(super) address: Ipv6Addr,
    /// The record as the DHT knows it (None: the record has no expiry, as
    /// from an older node, so the DHT won't use it).
    pub(super) contact: Option<Contact>,
}

pub(super) struct Link {
    pub(super) index: u32,
    /// The session, endpoint, MTU, compression and counters.
    pub(super) chan: Channel,
    pub(super) peer_key: [u8; 32],
    /// The node this link must turn out to be (configured peers and links
    /// made to a known record).
    pub(super) configured: Option<NodeId>,
    /// Configured: kept up and retried, never closed for idleness.
    pub(super) persistent: bool,
    /// How we came to know the neighbour.
    pub(super) source: Source,
    /// DHT messages waiting for the neighbour's record to verify.
    pub(super) pending_ctl: VecDeque<(u8, Vec<u8>)>,
    pub(super) verified: Option<Verified>,
    /// Who holds whose record, when to say hello again, the RSA budget.
    pub(super) hello: HelloState,
    pub(super) last_reconnect: Option<Instant>,
    /// When a cookie reply last made us send a new initiation at once.
    pub(super) last_cookie_retry: Option<Instant>,
    pub(super) reconnect_attempts: u32,
    /// Application packets waiting for the neighbour's record to verify.
    pub(super) pending: VecDeque<Vec<u8>>,
    pub(super) reassembler: Reassembler,
    pub(super) session_up: bool,
    pub(super) expired: bool,
    pub(super) created: Instant,
    pub(super) drops: Drops,
}

impl Link {
    /// Opened by this node to a record it looked up (not configured, not
    /// inbound).
    pub(super) fn opened_on_demand(&self) -> bool {
        self.configured.is_some() && !self.persistent
    }

    pub(super) fn state(&self) -> LinkState {
        if self.expired {
            LinkState::Down
        } else if !self.session_up {
            LinkState::Connecting
        } else if self.verified.is_none() {
            LinkState::Verifying
        } else {
            LinkState::Up
        }
    }

    pub(super) fn node_id(&self) -> Option<NodeId> {
        self.verified
            .as_ref()
            .map(|v| v.record.node_id())
            .or(self.configured)
    }
}

/// Whether a new link fits, and what must go first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Room {
    /// It fits.
    Free,
    /// It fits once this link is removed.
    Evict(u32),
    /// It doesn't fit.
    Full,
}

/// Session indices are 24 bits (boringtun keeps the low 8 for itself).
const INDEX_MASK: u32 = 0x00ff_ffff;

/// Every link, by session index, with indexes by link key and by address.
pub(super) struct LinkTable {
    links: HashMap<u32, Link>,
    by_key: HashMap<[u8; 32], u32>,
    by_addr: HashMap<Ipv6Addr, u32>,
    next_index: u32,
    /// What removed links had counted.
    closed: ClosedLinks,
}

impl std::ops::Index<&u32> for LinkTable {
    type Output = Link;
    fn index(&self, index: &u32) -> &Link {
        &self.links[index]
    }
}

impl LinkTable {
    /// An empty table whose first session index comes from `seed`.
    pub(super) fn new(seed: u32) -> LinkTable {
        LinkTable {
            links: HashMap::new(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            next_index: seed & INDEX_MASK,
            closed: ClosedLinks::default(),
        }
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.links.len()
    }

    pub(super) fn get(&self, index: &u32) -> Option<&Link> {
        self.links.get(index)
    }

    pub(super) fn get_mut(&mut self, index: &u32) -> Option<&mut Link> {
        self.links.get_mut(index)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Link> {
        self.links.values()
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Link> {
        self.links.values_mut()
    }

    /// The session indices of all links.
    pub(super) fn indices(&self) -> Vec<u32> {
        self.links.keys().copied().collect()
    }

    /// The link to the holder of link key `key`.
    pub(super) fn index_of_key(&self, key: &[u8; 32]) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The link that carries traffic for overlay address `addr`.
    pub(super) fn index_of_addr(&self, addr: &Ipv6Addr) -> Option<u32> {
        self.by_addr.get(addr).copied()
    }

    pub(super) fn for_key(&self, key: &[u8; 32]) -> Option<&Link> {
        self.by_key.get(key).and_then(|i| self.links.get(i))
    }

    pub(super) fn for_addr(&self, addr: &Ipv6Addr) -> Option<&Link> {
        self.by_addr.get(addr).and_then(|i| self.links.get(i))
    }

    pub(super) fn for_addr_mut(&mut self, addr: &Ipv6Addr) -> Option<&mut Link> {
        self.by_addr.get(addr).and_then(|i| self.links.get_mut(i))
    }

    /// The overlay addresses routed over some link.
    pub(super) fn addrs(&self) -> impl Iterator<Item = &Ipv6Addr> {
        self.by_addr.keys()
    }

    /// Routes overlay address `addr` over link `index` (which must exist).
    pub(super) fn name_addr(&mut self, addr: Ipv6Addr, index: u32) {
        debug_assert!(self.links.contains_key(&index), "naming a missing link");
        if self.links.contains_key(&index) {
            self.by_addr.insert(addr, index);
        }
    }

    /// Stops routing `addr` (tests: a route that goes stale).
    #[cfg(test)]
    pub(super) fn unname_addr(&mut self, addr: &Ipv6Addr) {
        self.by_addr.remove(addr);
    }

    /// Adds the link `make` builds for a free session index; returns the
    /// index, or the existing link's if the key has one already.
    pub(super) fn insert(&mut self, peer_key: [u8; 32], make: impl FnOnce(u32) -> Link) -> u32 {
        if let Some(&index) = self.by_key.get(&peer_key) {
            return index;
        }
        let mut index = self.next_index;
        while self.links.contains_key(&index) {
            index = (index + 1) & INDEX_MASK;
        }
        self.next_index = (index + 1) & INDEX_MASK;
        let mut link = make(index);
        // The table's names hold only if the link is what it was filed as.
        link.index = index;
        link.peer_key = peer_key;
        self.by_key.insert(peer_key, index);
        self.links.insert(index, link);
        index
    }

    /// Removes link `index` with its names, adding its counters to the
    /// closed links'.
    pub(super) fn remove(&mut self, index: u32) -> Option<Link> {
        let link = self.links.remove(&index)?;
        self.closed.close(&link.chan.counters, &link.drops);
        self.by_key.remove(&link.peer_key);
        self.by_addr.retain(|_, i| *i != index);
        Some(link)
    }

    /// Adds what a removed link counted after it was removed.
    pub(super) fn settle(&mut self, counters: &LinkCounters, drops: &Drops) {
        self.closed.settle(counters, drops);
    }

    /// What removed links had counted.
    pub(super) fn closed(&self) -> ClosedLinks {
        self.closed
    }

    /// Room for one more link in a table of at most `max` links: the link
    /// unused longest makes room, once it has been idle for `idle`.
    ///
    /// Links from nodes that linked to us (`inbound`) may take all but an
    /// eighth of the table: the rest is kept for links this node opens
    /// itself (its lookups, its own traffic), so that many busy neighbours
    /// can't keep it from reaching anyone else. An inbound newcomer over
    /// that share can only take an idle inbound link's place.
    pub(super) fn room(&self, now: Instant, max: usize, idle: Duration, inbound: bool) -> Room {
        let is_inbound = |l: &Link| !l.persistent && l.configured.is_none();
        let lru = |only_inbound: bool| {
            self.links
                .values()
                .filter(|l| !l.persistent && (!only_inbound || is_inbound(l)))
                .filter(|l| now.saturating_duration_since(l.chan.last_used) > idle)
                .min_by_key(|l| l.chan.last_used)
                .map_or(Room::Full, |l| Room::Evict(l.index))
        };
        if inbound {
            let share = max - max / 8;
            if self.links.values().filter(|l| is_inbound(l)).count() >= share {
                return lru(true);
            }
        }
        if self.links.len() < max {
            return Room::Free;
        }
        lru(false)
    }

    /// Room for one more inbound link not yet verified from `endpoint`,
    /// with at most `cap` of them.
    ///
    /// Such links are cheap to make (one initiation from a fresh key), so
    /// they are capped. At the cap, the oldest gives way once it has had
    /// `grace` to show a record; otherwise the newcomer is refused (its
    /// node retries), unless the newcomer's subnet (/24, /48) holds fewer
    /// of these links than the subnet holding most: then that subnet's
    /// oldest gives way, so a flood from a few subnets can't keep everyone
    /// else out. Links this node opened itself (lookups, LAN) are neither
    /// counted nor refused here: they are limited where they are made.
    pub(super) fn room_unverified(
        &self,
        endpoint: Option<SocketAddr>,
        now: Instant,
        cap: usize,
        grace: Duration,
    ) -> Room {
        let inbound = |l: &&Link| !l.persistent && l.verified.is_none() && l.configured.is_none();
        let count = self.links.values().filter(inbound).count();
        if count < cap {
            return Room::Free;
        }
        let oldest = self
            .links
            .values()
            .filter(inbound)
            .map(|l| (l.created, l.index))
            .min();
        if let Some((created, i)) = oldest {
            if now.saturating_duration_since(created) >= grace {
                return Room::Evict(i);
            }
        }
        let subnet = |ep: Option<SocketAddr>| ep.map(|e| link_subnet(e.ip()));
        let mut per_subnet: HashMap<Option<IpAddr>, (usize, Instant, u32)> = HashMap::new();
        for l in self.links.values().filter(inbound) {
            let e = per_subnet
                .entry(subnet(l.chan.endpoint))
                .or_insert((0, l.created, l.index));
            e.0 += 1;
            if l.created < e.1 {
                (e.1, e.2) = (l.created, l.index);
            }
        }
        let mine = per_subnet.get(&subnet(endpoint)).map_or(0, |e| e.0);
        let most = per_subnet
            .values()
            .max_by_key(|e| (e.0, std::cmp::Reverse(e.1)));
        match most {
            Some(&(n, _, i)) if n > mine + 1 => Room::Evict(i),
            _ => Room::Full,
        }
    }

    /// Links whose endpoint is in `ip`'s subnet (IPv4 /24, IPv6 /48).
    pub(super) fn in_subnet(&self, ip: IpAddr) -> usize {
        let net = link_subnet(ip);
        self.links
            .values()
            .filter(|l| l.chan.endpoint.is_some_and(|e| link_subnet(e.ip()) == net))
            .count()
    }
}
