//! The circuits this node builds (out-circuits), with the index kept
//! consistent with them: which circuit carries packets to a destination
//! now, and how often builds to a destination failed lately; and the
//! per-cell step on a circuit's own state, opening a reply cell
//! ([`OutTable::open_reply`]). A part of its own: the node's source side
//! (`source.rs`) drives each circuit's build and asks this table which
//! circuit to use and whether to give up on a destination for a while.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use super::{OutCirc, STEP_TIMEOUT};
use crate::proto::onion::{self, OnionError, Unwrapped};

/// Failed builds in a row before packets to a destination get ICMPv6 ...
const MAX_BUILD_FAILS: u32 = 3;
/// ... for this long.
const FAILED_FOR: Duration = Duration::from_secs(30);
/// Builds in a row that failed at a relay (which leaves the pool each time,
/// see `RelayPool::blame`) before the destination is given up on as well.
/// A dead or refusing relay says nothing about the destination, so a fresh
/// path is tried at once, but not without end.
const MAX_RELAY_FAILS: u32 = 8;
/// A CREATE or EXTEND step times out after this many times the 90th
/// percentile of the last steps ...
const STEP_MARGIN: u32 = 3;
/// ... and never sooner than this (nor later than `STEP_TIMEOUT`): a step
/// over a new link is a handshake, a hello each way and the CREATE, and a
/// lost hello is resent after a second. A step that times out counts as
/// having taken the limit, so a few of them raise it.
const MIN_EXTEND_TIMEOUT: Duration = Duration::from_millis(2000);
/// Steps remembered for that ...
const STEP_SAMPLES: usize = 32;
/// ... and how many it takes before they count (until then a step gets
/// the whole `STEP_TIMEOUT`).
const MIN_STEP_SAMPLES: usize = 3;

/// Whom a failed build is blamed on ([`OutTable::failed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// One of the circuit's relays (not the destination).
    Relay,
    /// The destination, or nobody in particular.
    Other,
}

/// Failed builds in a row to one destination.
#[derive(Clone, Copy, Debug)]
struct Fails {
    /// Not a relay's fault ([`MAX_BUILD_FAILS`]).
    other: u32,
    /// A relay's ([`MAX_RELAY_FAILS`]).
    relay: u32,
    /// When the last one failed.
    last: Instant,
}

impl Fails {
    fn too_many(&self) -> bool {
        self.other >= MAX_BUILD_FAILS || self.relay >= MAX_RELAY_FAILS
    }
}

/// Out-circuits by the node's ID for them.
#[derive(Default)]
pub(super) struct OutTable {
    circuits: HashMap<u64, OutCirc>,
    /// The circuit packets to a destination take (a replacement takes over
    /// when it is ready).
    by_dst: HashMap<Ipv6Addr, u64>,
    /// Failed builds in a row per destination.
    fails: HashMap<Ipv6Addr, Fails>,
    /// How long the last CREATE and EXTEND steps took (a timed-out one as
    /// its limit), the newest last: what a step may take before it counts
    /// as failed ([`OutTable::extend_timeout`]).
    steps: VecDeque<Duration>,
    /// Test hook: every failure [`OutTable::failed`] counted.
    #[cfg(test)]
    history: Vec<(Ipv6Addr, Fault)>,
}

impl OutTable {
    pub(super) fn len(&self) -> usize {
        self.circuits.len()
    }

    pub(super) fn get(&self, id: u64) -> Option<&OutCirc> {
        self.circuits.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut OutCirc> {
        self.circuits.get_mut(&id)
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.circuits.contains_key(&id)
    }

    /// Every circuit's ID (a snapshot: the caller may change the table).
    pub(super) fn ids(&self) -> Vec<u64> {
        self.circuits.keys().copied().collect()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &OutCirc)> {
        self.circuits.iter().map(|(k, c)| (*k, c))
    }

    /// A backward cell on circuit `id` (its nonce, and its body after the
    /// cell header): peels the hops' layers in place until one recognises
    /// it, checks it is no replay and notes that hop answered. None when
    /// there is no such circuit.
    pub(super) fn open_reply(
        &mut self,
        now: Instant,
        id: u64,
        nonce: [u8; 16],
        body: &mut [u8],
    ) -> Option<Result<Unwrapped, OnionError>> {
        let c = self.circuits.get_mut(&id)?;
        Some(onion::unwrap(&c.hops, nonce, body).and_then(|u| {
            let hop = &mut c.hops[u.hop];
            hop.replay.check(u.counter)?;
            hop.last_reply = now;
            Ok(u)
        }))
    }

    /// The circuit packets to `dst` take now.
    pub(super) fn current(&self, dst: &Ipv6Addr) -> Option<u64> {
        self.by_dst.get(dst).copied()
    }

    /// Takes in a circuit being built; it carries packets to its
    /// destination unless another circuit does already.
    pub(super) fn insert(&mut self, id: u64, c: OutCirc) {
        self.by_dst.entry(c.dst).or_insert(id);
        self.circuits.insert(id, c);
    }

    /// Makes circuit `id` (ready) the one packets to `dst` take; returns
    /// the one it replaces, if another.
    pub(super) fn make_current(&mut self, dst: Ipv6Addr, id: u64) -> Option<u64> {
        self.by_dst.insert(dst, id).filter(|o| *o != id)
    }

    /// Removes circuit `id` and hands it back (its link-side ID is the
    /// caller's to release); its destination then has no current circuit
    /// if it was this one.
    pub(super) fn remove(&mut self, id: u64) -> Option<OutCirc> {
        let c = self.circuits.remove(&id)?;
        if self.by_dst.get(&c.dst) == Some(&id) {
            self.by_dst.remove(&c.dst);
        }
        Some(c)
    }

    /// Whether builds to `dst` failed too often lately.
    pub(super) fn failing(&self, now: Instant, dst: &Ipv6Addr) -> bool {
        self.fails
            .get(dst)
            .is_some_and(|f| f.too_many() && now.saturating_duration_since(f.last) < FAILED_FOR)
    }

    /// A circuit to `dst` failed, by `fault`: counts it (the count starts
    /// over after [`FAILED_FOR`] without failure) and says whether it is
    /// worth building another.
    pub(super) fn failed(&mut self, now: Instant, dst: Ipv6Addr, fault: Fault) -> bool {
        let f = self.fails.entry(dst).or_insert(Fails {
            other: 0,
            relay: 0,
            last: now,
        });
        if now.saturating_duration_since(f.last) >= FAILED_FOR {
            (f.other, f.relay) = (0, 0);
        }
        match fault {
            Fault::Relay => f.relay += 1,
            Fault::Other => f.other += 1,
        }
        #[cfg(test)]
        self.history.push((dst, fault));
        f.last = now;
        !f.too_many()
    }

    /// Gives up on `dst` for [`FAILED_FOR`] (its destination refused us or
    /// can't be found).
    pub(super) fn give_up(&mut self, now: Instant, dst: Ipv6Addr) {
        let f = Fails {
            other: MAX_BUILD_FAILS,
            relay: 0,
            last: now,
        };
        self.fails.insert(dst, f);
    }

    /// A circuit to `dst` is ready: the failures are forgotten.
    pub(super) fn succeeded(&mut self, dst: &Ipv6Addr) {
        self.fails.remove(dst);
    }

    /// Forgets failures older than [`FAILED_FOR`].
    pub(super) fn sweep(&mut self, now: Instant) {
        self.fails
            .retain(|_, f| now.saturating_duration_since(f.last) < FAILED_FOR);
    }

    /// Test hook: every failure counted so far to `dst`, not a relay's
    /// fault and a relay's.
    #[cfg(test)]
    pub(super) fn fails_of(&self, dst: &Ipv6Addr) -> (u32, u32) {
        let of = |fault| {
            self.history
                .iter()
                .filter(|(d, f)| d == dst && *f == fault)
                .count() as u32
        };
        (of(Fault::Other), of(Fault::Relay))
    }

    /// A CREATE or EXTEND step took `took` (succeeded then, or timed out at
    /// that limit).
    pub(super) fn step_took(&mut self, took: Duration) {
        if self.steps.len() >= STEP_SAMPLES {
            self.steps.pop_front();
        }
        self.steps.push_back(took);
    }

    /// How long a CREATE or EXTEND step may take before the circuit counts
    /// as failed and the relay it waits on is blamed: a few times what the
    /// last steps took, within [`MIN_EXTEND_TIMEOUT`] and
    /// [`STEP_TIMEOUT`]. After a churn, each dead relay a new path draws
    /// costs this long, so it should not be the full timeout when steps
    /// usually take milliseconds. (Tor learns its circuit build timeout
    /// from the build times it sees in the same spirit.)
    pub(super) fn extend_timeout(&self) -> Duration {
        if self.steps.len() < MIN_STEP_SAMPLES {
            return STEP_TIMEOUT;
        }
        let mut sorted: Vec<Duration> = self.steps.iter().copied().collect();
        sorted.sort_unstable();
        let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
        (p90 * STEP_MARGIN).clamp(MIN_EXTEND_TIMEOUT, STEP_TIMEOUT)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the clock
mod tests {
    use super::*;

    #[test]
    fn a_ready_replacement_takes_over_its_destination() {
        let t0 = Instant::now();
        let dst: Ipv6Addr = "fc00::7".parse().unwrap();
        let other: Ipv6Addr = "fc00::8".parse().unwrap();
        let circ = |dst| OutCirc::new(t0, dst, Vec::new(), None, None, None, (1, 1));
        let mut t = OutTable::default();
        t.insert(1, circ(dst));
        t.insert(2, circ(dst));
        t.insert(3, circ(other));
        // The first circuit to a destination carries its packets until a
        // replacement is ready.
        assert_eq!(t.current(&dst), Some(1));
        assert_eq!(t.make_current(dst, 1), None);
        assert_eq!(t.make_current(dst, 2), Some(1));
        assert_eq!(t.current(&dst), Some(2));
        // Removing the old one leaves the replacement in place; removing
        // the current one leaves the destination without one.
        assert!(t.remove(1).is_some());
        assert_eq!(t.current(&dst), Some(2));
        assert!(t.remove(2).is_some() && t.remove(2).is_none());
        assert_eq!(t.current(&dst), None);
        assert_eq!((t.len(), t.current(&other)), (1, Some(3)));
    }

    #[test]
    fn a_reply_is_opened_for_the_hop_that_sent_it_and_only_once() {
        use super::super::hops::pair;
        use super::super::{BuiltHop, CellCounter};
        use crate::proto::identity::NodeId;
        use crate::proto::onion::{Cmd, CELL_HEADER, CELL_SMALL};
        use std::sync::Arc;
        let t0 = Instant::now();
        let dst: Ipv6Addr = "fc00::7".parse().unwrap();
        let ((src0, hop0), (src1, hop1)) = (pair(), pair());
        let mut c = OutCirc::new(t0, dst, Vec::new(), None, None, None, (1, 1));
        for keys in [src0, src1] {
            c.hops.push(BuiltHop {
                id: NodeId([2; 32]),
                keys: Arc::new(keys),
                ctr: CellCounter::default(),
                replay: Arc::default(),
                last_reply: t0,
            });
        }
        let mut t = OutTable::default();
        t.insert(1, c);
        // The second hop answers; the first adds its layer on the way.
        let mut body = [0u8; CELL_SMALL - CELL_HEADER];
        let mut nonce = hop1.originate(1, Cmd::ProbeReply, b"pong", &mut body);
        hop0.backward(&mut nonce, &mut body);
        let cell = body;
        let later = t0 + Duration::from_secs(1);
        let u = t.open_reply(later, 1, nonce, &mut body).unwrap().unwrap();
        assert_eq!((u.hop, u.command), (1, Cmd::ProbeReply));
        assert_eq!(&body[u.data], b"pong");
        let c = t.get(1).unwrap();
        assert_eq!((c.hops[0].last_reply, c.hops[1].last_reply), (t0, later));
        // The same cell again is a replay; no such circuit, no answer.
        let mut body = cell;
        assert!(matches!(
            t.open_reply(later, 1, nonce, &mut body),
            Some(Err(OnionError::Replay))
        ));
        assert!(t.open_reply(later, 2, nonce, &mut body).is_none());
    }

    #[test]
    fn three_failures_in_a_row_give_up_on_a_destination_for_a_while() {
        let t0 = Instant::now();
        let dst: Ipv6Addr = "fc00::7".parse().unwrap();
        let mut t = OutTable::default();
        assert!(!t.failing(t0, &dst));
        assert!(t.failed(t0, dst, Fault::Other));
        assert!(t.failed(t0, dst, Fault::Other));
        assert!(
            !t.failed(t0, dst, Fault::Other),
            "the third failure gives up"
        );
        assert!(t.failing(t0, &dst));
        assert!(!t.failing(t0 + FAILED_FOR, &dst));
        // A failure after a quiet spell counts from one again.
        assert!(t.failed(t0 + FAILED_FOR, dst, Fault::Other));
        assert!(!t.failing(t0 + FAILED_FOR, &dst));
        // Given up outright, then a success forgets it.
        t.give_up(t0, dst);
        assert!(t.failing(t0, &dst));
        t.succeeded(&dst);
        assert!(!t.failing(t0, &dst));
        // Old failures are swept.
        t.failed(t0, dst, Fault::Other);
        t.sweep(t0 + FAILED_FOR);
        assert!(t.fails.is_empty());
    }

    #[test]
    fn failures_at_relays_give_up_only_after_many() {
        let t0 = Instant::now();
        let dst: Ipv6Addr = "fc00::7".parse().unwrap();
        let mut t = OutTable::default();
        // Dead relays on the way: each failure is worth another path ...
        for _ in 1..MAX_RELAY_FAILS {
            assert!(t.failed(t0, dst, Fault::Relay));
            assert!(!t.failing(t0, &dst));
        }
        // ... but not without end.
        assert!(!t.failed(t0, dst, Fault::Relay));
        assert!(t.failing(t0, &dst));
        assert!(!t.failing(t0 + FAILED_FOR, &dst));
        // The destination's own failures still count on their own: relay
        // failures in between neither hide them nor add to them.
        t.succeeded(&dst);
        assert!(t.failed(t0, dst, Fault::Other));
        assert!(t.failed(t0, dst, Fault::Relay));
        assert!(t.failed(t0, dst, Fault::Other));
        assert!(!t.failed(t0, dst, Fault::Other));
        assert!(t.failing(t0, &dst));
    }

    #[test]
    fn the_extend_timeout_follows_the_steps_that_succeeded() {
        let ms = Duration::from_millis;
        let mut t = OutTable::default();
        // Too few samples: the whole timeout.
        for _ in 1..MIN_STEP_SAMPLES {
            t.step_took(ms(20));
        }
        assert_eq!(t.extend_timeout(), STEP_TIMEOUT);
        // Fast steps: the floor.
        t.step_took(ms(20));
        assert_eq!(t.extend_timeout(), MIN_EXTEND_TIMEOUT);
        // Slower steps: a few times their 90th percentile ...
        for _ in 0..STEP_SAMPLES {
            t.step_took(ms(900));
        }
        assert_eq!(t.extend_timeout(), ms(2700));
        // ... one slow outlier in ten does not move it; many do, up to the
        // ceiling.
        for _ in 0..3 {
            t.step_took(ms(4000));
        }
        assert_eq!(t.extend_timeout(), ms(2700));
        for _ in 0..STEP_SAMPLES {
            t.step_took(ms(4000));
        }
        assert_eq!(t.extend_timeout(), STEP_TIMEOUT);
        assert_eq!(t.steps.len(), STEP_SAMPLES);
        // A step that timed out counts as taking the limit: steps that got
        // slower raise it at once rather than fail every build.
        let mut t = OutTable::default();
        for _ in 0..MIN_STEP_SAMPLES {
            t.step_took(ms(20));
        }
        assert_eq!(t.extend_timeout(), MIN_EXTEND_TIMEOUT);
        t.step_took(t.extend_timeout());
        assert_eq!(t.extend_timeout(), STEP_TIMEOUT);
    }
}
