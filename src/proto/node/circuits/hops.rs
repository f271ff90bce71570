//! The circuits this node carries as a relay or ends as a destination (hop
//! circuits), with the indexes kept consistent with them: circuits per
//! neighbour, each neighbour's CREATE budget, and which inbound circuit
//! carries replies to an authenticated source. A part of its own: the node
//! asks it whether a CREATE may be served ([`Admit`]), hands it the
//! circuits it builds, and is handed back what it removes; the circuit IDs
//! on links (shared with the circuits this node builds) stay with the node.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use super::{CellCounter, CREATE_LIMIT, EXTEND_TIMEOUT, HOP_IDLE, INBOUND_FRESH};
use crate::proto::compress::Adaptive;
use crate::proto::limit::Rate;
use crate::proto::onion::{Cmd, Forward, HopKeys, OnionError, ReplayWindow, CELL_HEADER};

/// A circuit this node carries (a relay) or ends (the destination).
pub(super) struct HopCirc {
    /// The link and circuit ID towards the source (fixed at creation: the
    /// table's per-neighbour count follows it).
    prev: (u32, u32),
    /// The link and circuit ID towards the next hop, once extended.
    pub(super) next: Option<(u32, u32)>,
    /// Shared with the data plane while it passes the circuit's cells on
    /// (the keys are read-only).
    pub(super) keys: Arc<HopKeys>,
    /// Whether the data plane passes this circuit's cells on
    /// (`Circuits::maybe_hand_hop`, the relay side's).
    pub(super) in_plane: bool,
    pub(super) replay: Arc<ReplayWindow>,
    /// Counter of the cells this hop originated towards the source, shared
    /// with the data plane while it sends the replies to the circuit's
    /// source.
    pub(super) ctr: CellCounter,
    pub(super) created: Instant,
    pub(super) last_used: Instant,
    /// An EXTEND waits for the next hop's CREATED since then.
    pub(super) extending: Option<Instant>,
    /// Destination: the source the circuit authenticated (set only by
    /// [`HopTable::carries_replies`], which keeps the reply index with it).
    auth: Option<Ipv6Addr>,
    /// Destination: an AUTH came (see [`HopTable::first_auth`]).
    auth_tried: bool,
    pub(super) fwd_bytes: u64,
    pub(super) bwd_bytes: u64,
    pub(super) rx_bytes: u64,
    pub(super) tx_bytes: u64,
    /// Destination: when it last brought DATA (the node's or a plane's),
    /// which decides the circuit replies go back on.
    pub(super) last_data: Option<Instant>,
    /// Destination: which flows back are worth compressing.
    pub(super) adaptive: Adaptive,
}

impl HopCirc {
    /// The link and circuit ID towards the source.
    pub(super) fn prev(&self) -> (u32, u32) {
        self.prev
    }

    /// Destination: the source the circuit authenticated.
    pub(super) fn auth(&self) -> Option<Ipv6Addr> {
        self.auth
    }

    /// A circuit just created by a CREATE from `prev`, keyed by `keys`.
    pub(super) fn new(now: Instant, prev: (u32, u32), keys: HopKeys) -> HopCirc {
        HopCirc {
            prev,
            next: None,
            keys: Arc::new(keys),
            in_plane: false,
            replay: Arc::default(),
            ctr: CellCounter::default(),
            created: now,
            last_used: now,
            extending: None,
            auth: None,
            auth_tried: false,
            fwd_bytes: 0,
            bwd_bytes: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            last_data: None,
            adaptive: Adaptive::default(),
        }
    }
}

/// Whether a CREATE from a neighbour may be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admit {
    Yes,
    /// The neighbour is over its CREATE budget ([`CREATE_LIMIT`]): drop it
    /// before any handshake work.
    Limited,
    /// The relay carries as many circuits as it may, in all or for this
    /// neighbour: refuse.
    Full,
}

/// What this hop made of a forward cell ([`HopTable::peel`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Peeled {
    /// Not for this hop: its layer is off, pass it on to `(link, circ)`.
    Pass((u32, u32)),
    /// Not for this hop, and the circuit goes no further: a cell no hop
    /// recognised.
    Unrecognised,
    /// Addressed to this hop (and not a replay): the command, and where
    /// its data lies in the body.
    Mine(Cmd, Range<usize>),
}

/// Hop circuits by the node's own ID for them, and their indexes.
pub(super) struct HopTable {
    hops: HashMap<u64, HopCirc>,
    per_neighbour: HashMap<u32, usize>,
    /// CREATE budget per neighbour link (gone with the link).
    create_rate: HashMap<u32, Rate>,
    /// Which circuit carries replies to an authenticated source.
    inbound_by_src: HashMap<Ipv6Addr, u64>,
    /// Most circuits in all, and per neighbour.
    max: usize,
    max_per_neighbour: usize,
}

impl HopTable {
    pub(super) fn new(max: usize, max_per_neighbour: usize) -> HopTable {
        HopTable {
            hops: HashMap::new(),
            per_neighbour: HashMap::new(),
            create_rate: HashMap::new(),
            inbound_by_src: HashMap::new(),
            max,
            max_per_neighbour,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.hops.len()
    }

    pub(super) fn get(&self, h: u64) -> Option<&HopCirc> {
        self.hops.get(&h)
    }

    pub(super) fn get_mut(&mut self, h: u64) -> Option<&mut HopCirc> {
        self.hops.get_mut(&h)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &HopCirc> {
        self.hops.values()
    }

    /// Whether a CREATE from the neighbour on `link` may be served now; a
    /// CREATE within the budget spends it, even when the relay is full.
    pub(super) fn admit(&mut self, now: Instant, link: u32) -> Admit {
        let rate = self
            .create_rate
            .entry(link)
            .or_insert_with(|| Rate::new(now));
        if !rate.allow(now, CREATE_LIMIT) {
            return Admit::Limited;
        }
        let mine = self.per_neighbour.get(&link).copied().unwrap_or(0);
        if self.hops.len() >= self.max || mine >= self.max_per_neighbour {
            return Admit::Full;
        }
        Admit::Yes
    }

    /// Takes in circuit `h`, created by a CREATE.
    pub(super) fn insert(&mut self, h: u64, hc: HopCirc) {
        *self.per_neighbour.entry(hc.prev.0).or_default() += 1;
        if let Some(old) = self.hops.insert(h, hc) {
            // IDs are never reused; keep the count true regardless.
            self.forget(&old, h);
        }
    }

    /// Removes circuit `h` and hands it back (its link-side IDs are the
    /// caller's to release). If it carried replies to its source, the
    /// newest other circuit from that source (its replacement) does now.
    pub(super) fn remove(&mut self, h: u64) -> Option<HopCirc> {
        let hc = self.hops.remove(&h)?;
        self.forget(&hc, h);
        Some(hc)
    }

    fn forget(&mut self, hc: &HopCirc, h: u64) {
        if let Some(n) = self.per_neighbour.get_mut(&hc.prev.0) {
            *n = n.saturating_sub(1);
        }
        if let Some(a) = hc.auth {
            if self.inbound_by_src.get(&a) == Some(&h) {
                let other = self
                    .hops
                    .iter()
                    .filter(|(_, o)| o.auth == Some(a))
                    .max_by_key(|(_, o)| o.last_used)
                    .map(|(k, _)| *k);
                match other {
                    Some(o) => self.inbound_by_src.insert(a, o),
                    None => self.inbound_by_src.remove(&a),
                };
            }
        }
    }

    /// A forward cell on circuit `h` (its nonce, and its body after the
    /// cell header): peels this hop's layer in place, or opens a cell
    /// addressed to this hop and checks it is no replay. None when there
    /// is no such circuit.
    pub(super) fn peel(
        &mut self,
        now: Instant,
        h: u64,
        nonce: &mut [u8; 16],
        body: &mut [u8],
    ) -> Option<Result<Peeled, OnionError>> {
        let hc = self.hops.get_mut(&h)?;
        hc.last_used = now;
        Some(match hc.keys.forward(nonce, body) {
            Err(e) => Err(e),
            Ok(Forward::Pass) => match hc.next {
                Some(next) => {
                    hc.fwd_bytes += (CELL_HEADER + body.len()) as u64;
                    Ok(Peeled::Pass(next))
                }
                None => Ok(Peeled::Unrecognised),
            },
            Ok(Forward::Mine(counter, command, range)) => hc
                .replay
                .check(counter)
                .map(|()| Peeled::Mine(command, range)),
        })
    }

    /// A backward cell on circuit `h`: adds this hop's layer in place.
    /// Returns where it goes, `(link, circ)` towards the source; None when
    /// there is no such circuit.
    pub(super) fn wrap_back(
        &mut self,
        now: Instant,
        h: u64,
        nonce: &mut [u8; 16],
        body: &mut [u8],
    ) -> Option<(u32, u32)> {
        let hc = self.hops.get_mut(&h)?;
        hc.last_used = now;
        hc.keys.backward(nonce, body);
        Some(hc.prev)
    }

    /// Counts a backward cell of `size` bytes passed on by circuit `h`.
    pub(super) fn count_backward(&mut self, h: u64, size: usize) {
        if let Some(hc) = self.hops.get_mut(&h) {
            hc.bwd_bytes += size as u64;
        }
    }

    /// Whether circuit `h` may take an AUTH now: once per circuit, whatever
    /// came of the first. An honest source sends one and closes the
    /// circuit if it is refused; a second one could only move another
    /// identity's reply route onto the circuit, or make this node verify
    /// signature after signature. A yes marks the circuit.
    pub(super) fn first_auth(&mut self, h: u64) -> bool {
        let Some(hc) = self.hops.get_mut(&h) else {
            return false;
        };
        !std::mem::replace(&mut hc.auth_tried, true)
    }

    /// Circuit `h` authenticated its source `src` (AUTH), or brought a
    /// packet from it: replies to `src` go back on it.
    pub(super) fn carries_replies(&mut self, h: u64, src: Ipv6Addr) {
        if let Some(hc) = self.hops.get_mut(&h) {
            hc.auth = Some(src);
            self.inbound_by_src.insert(src, h);
        }
    }

    /// The circuit replies to `src` go back on, fresh or not.
    pub(super) fn replies_on(&self, src: &Ipv6Addr) -> Option<u64> {
        self.inbound_by_src.get(src).copied()
    }

    /// The inbound circuit that carries packets back to `dst`, if one
    /// brought traffic lately, or at all when this node has no circuit of
    /// its own to `dst` (`own_circuit`).
    pub(super) fn inbound_route(
        &self,
        now: Instant,
        dst: &Ipv6Addr,
        own_circuit: bool,
    ) -> Option<u64> {
        let h = *self.inbound_by_src.get(dst)?;
        let hc = self.hops.get(&h)?;
        let fresh = now.saturating_duration_since(hc.last_used) <= INBOUND_FRESH;
        (fresh || !own_circuit).then_some(h)
    }

    /// Circuits idle past [`HOP_IDLE`], or whose EXTEND is past
    /// [`EXTEND_TIMEOUT`] (then the flag is true).
    pub(super) fn stale(&self, now: Instant) -> Vec<(u64, bool)> {
        self.hops
            .iter()
            .filter_map(|(k, h)| {
                let extend_late = h
                    .extending
                    .is_some_and(|t| now.saturating_duration_since(t) > EXTEND_TIMEOUT);
                let idle = now.saturating_duration_since(h.last_used) > HOP_IDLE;
                (idle || extend_late).then_some((*k, h.extending.is_some()))
            })
            .collect()
    }

    /// The link to a neighbour is gone: its counts and budget go too (its
    /// circuits are removed one by one by the caller).
    pub(super) fn link_gone(&mut self, link: u32) {
        self.per_neighbour.remove(&link);
        self.create_rate.remove(&link);
    }
}

/// Test helper: the source's and the hop's keys of one handshake.
#[cfg(test)]
#[allow(clippy::disallowed_types)] // tests use OsRng
pub(in crate::proto::node) fn pair() -> (HopKeys, HopKeys) {
    use crate::proto::identity::NodeId;
    use crate::proto::onion::{server_handshake, ClientHandshake, OnionKey};
    use rand_core::OsRng;
    let relay = OnionKey::generate(&mut OsRng);
    let id = NodeId([1; 32]);
    let (hs, create) = ClientHandshake::start(&mut OsRng, id, relay.public);
    let (created, hop) = server_handshake(&mut OsRng, &id, &[&relay], &create).unwrap();
    (hs.finish(&created).unwrap(), hop)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock and OsRng
mod tests {
    use super::*;
    use crate::proto::onion::{wrap, CELL_SMALL};

    fn keys() -> HopKeys {
        pair().1
    }

    #[test]
    fn a_hop_opens_its_cells_once_and_passes_the_others_on() {
        let t0 = Instant::now();
        let (src0, hop0) = pair();
        let (src1, _) = pair();
        let path = [src0, src1];
        let mut t = HopTable::new(10, 10);
        let mut hc = HopCirc::new(t0, (1, 5), hop0);
        hc.next = Some((2, 6));
        t.insert(1, hc);
        // A cell for this hop: opened, its data where the range says.
        let mut body = [0u8; CELL_SMALL - CELL_HEADER];
        let mut nonce = wrap(&path, 0, 1, Cmd::Probe, b"ping", &mut body);
        let cell = (nonce, body);
        let Some(Ok(Peeled::Mine(Cmd::Probe, range))) = t.peel(t0, 1, &mut nonce, &mut body) else {
            panic!("not opened");
        };
        assert_eq!(&body[range], b"ping");
        // The same cell again: a replay.
        let (mut nonce, mut body) = cell;
        assert_eq!(
            t.peel(t0, 1, &mut nonce, &mut body),
            Some(Err(OnionError::Replay))
        );
        // A cell for the next hop: passed on, counted.
        let mut body = [0u8; CELL_SMALL - CELL_HEADER];
        let mut nonce = wrap(&path, 1, 1, Cmd::Probe, b"on", &mut body);
        assert_eq!(
            t.peel(t0, 1, &mut nonce, &mut body),
            Some(Ok(Peeled::Pass((2, 6))))
        );
        assert_eq!(t.get(1).unwrap().fwd_bytes, CELL_SMALL as u64);
        // The same on a circuit that ends here: nobody recognises it.
        t.get_mut(1).unwrap().next = None;
        let mut nonce = wrap(&path, 1, 2, Cmd::Probe, b"on", &mut body);
        assert_eq!(
            t.peel(t0, 1, &mut nonce, &mut body),
            Some(Ok(Peeled::Unrecognised))
        );
        assert_eq!(
            t.get(1).unwrap().fwd_bytes,
            CELL_SMALL as u64,
            "not counted"
        );
        assert_eq!(t.peel(t0, 9, &mut nonce, &mut body), None);
        // Backward: towards the source, last used now.
        let later = t0 + std::time::Duration::from_secs(1);
        assert_eq!(t.wrap_back(later, 1, &mut nonce, &mut body), Some((1, 5)));
        assert_eq!(t.get(1).unwrap().last_used, later);
    }

    #[test]
    fn creates_are_admitted_within_the_caps_and_the_budget() {
        let t0 = Instant::now();
        let mut t = HopTable::new(3, 2);
        for h in 0..2 {
            assert_eq!(t.admit(t0, 7), Admit::Yes);
            t.insert(h, HopCirc::new(t0, (7, h as u32), keys()));
        }
        // The neighbour's share is used up; another neighbour still fits.
        assert_eq!(t.admit(t0, 7), Admit::Full);
        // A refused CREATE still spends the budget (a full relay is no
        // cheaper to knock at).
        let spent = (0..1_000)
            .take_while(|_| t.admit(t0, 7) == Admit::Full)
            .count();
        assert_eq!(spent as u32, CREATE_LIMIT.burst - 3);
        assert_eq!(t.admit(t0, 7), Admit::Limited);
        assert_eq!(t.admit(t0, 8), Admit::Yes);
        t.insert(2, HopCirc::new(t0, (8, 0), keys()));
        assert_eq!(t.admit(t0, 9), Admit::Full, "the relay is full");
        // Removing one frees its neighbour's share (link 8 has budget left).
        assert!(t.remove(2).is_some());
        assert!(t.remove(2).is_none());
        assert_eq!(t.admit(t0, 8), Admit::Yes);
        // A link gone: its count goes too.
        t.link_gone(7);
        assert_eq!(t.per_neighbour.get(&7), None);
        // The budget: a burst, then nothing until it refills.
        let mut t = HopTable::new(10_000, 10_000);
        let burst = (0..1_000)
            .take_while(|_| t.admit(t0, 1) == Admit::Yes)
            .count();
        assert_eq!(burst as u32, CREATE_LIMIT.burst);
        assert_eq!(t.admit(t0, 1), Admit::Limited);
        assert_eq!(t.admit(t0, 2), Admit::Yes, "budgets are per neighbour");
        t.link_gone(1);
        assert_eq!(t.admit(t0, 1), Admit::Yes, "a new link starts afresh");
    }

    #[test]
    fn replies_move_to_the_newest_circuit_from_the_same_source() {
        let t0 = Instant::now();
        let src: Ipv6Addr = "fc00::1".parse().unwrap();
        let mut t = HopTable::new(10, 10);
        for h in 1..=3 {
            let mut hc = HopCirc::new(t0, (1, h as u32), keys());
            hc.last_used = t0 + std::time::Duration::from_secs(h);
            t.insert(h, hc);
        }
        // One AUTH per circuit, whatever came of it.
        assert!(t.first_auth(1));
        assert!(!t.first_auth(1));
        assert!(!t.first_auth(99), "no such circuit");
        t.carries_replies(1, src);
        t.carries_replies(2, src);
        t.carries_replies(3, src);
        assert_eq!(t.inbound_route(t0, &src, false), Some(3));
        // Removing a circuit that does not carry the replies changes nothing.
        t.remove(1);
        assert_eq!(t.inbound_route(t0, &src, false), Some(3));
        assert_eq!(t.inbound_by_src.get(&src), Some(&3));
        t.remove(3);
        assert_eq!(t.inbound_route(t0, &src, false), Some(2));
        // Not fresh, and this node has a circuit of its own to src.
        let later = t0 + INBOUND_FRESH + std::time::Duration::from_secs(5);
        assert_eq!(t.inbound_route(later, &src, true), None);
        assert_eq!(t.inbound_route(later, &src, false), Some(2));
        t.remove(2);
        assert_eq!(t.inbound_route(t0, &src, false), None);
        assert!(t.inbound_by_src.is_empty(), "no dangling reply route");
    }

    #[test]
    fn idle_circuits_and_late_extends_are_stale() {
        let t0 = Instant::now();
        let mut t = HopTable::new(10, 10);
        t.insert(1, HopCirc::new(t0, (1, 1), keys()));
        let mut ext = HopCirc::new(t0, (1, 2), keys());
        ext.extending = Some(t0);
        t.insert(2, ext);
        assert!(t.stale(t0).is_empty());
        assert_eq!(t.stale(t0 + EXTEND_TIMEOUT * 2), vec![(2, true)]);
        let mut all = t.stale(t0 + HOP_IDLE * 2);
        all.sort();
        assert_eq!(all, vec![(1, false), (2, true)]);
    }
}
