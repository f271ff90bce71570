//! The circuits this node builds (out-circuits), with the index kept
//! consistent with them: which circuit carries packets to a destination
//! now, and how often builds to a destination failed lately. A part of its
//! own: the node's source side (`source.rs`) drives each circuit's build
//! and asks this table which circuit to use and whether to give up on a
//! destination for a while.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use super::OutCirc;

/// Failed builds in a row before packets to a destination get ICMPv6 ...
pub(super) const MAX_BUILD_FAILS: u32 = 3;
/// ... for this long.
pub(super) const FAILED_FOR: Duration = Duration::from_secs(30);

/// Out-circuits by the node's ID for them.
#[derive(Default)]
pub(super) struct OutTable {
    circuits: HashMap<u64, OutCirc>,
    /// The circuit packets to a destination take (a replacement takes over
    /// when it is ready).
    by_dst: HashMap<Ipv6Addr, u64>,
    /// Failed builds in a row per destination, and when the last failed.
    fails: HashMap<Ipv6Addr, (u32, Instant)>,
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
        self.fails.get(dst).is_some_and(|(n, t)| {
            *n >= MAX_BUILD_FAILS && now.saturating_duration_since(*t) < FAILED_FOR
        })
    }

    /// A circuit to `dst` failed: counts it (the count starts over after
    /// [`FAILED_FOR`] without failure) and says whether it is worth
    /// building another.
    pub(super) fn failed(&mut self, now: Instant, dst: Ipv6Addr) -> bool {
        let fails = self.fails.entry(dst).or_insert((0, now));
        if now.saturating_duration_since(fails.1) >= FAILED_FOR {
            fails.0 = 0;
        }
        fails.0 += 1;
        fails.1 = now;
        fails.0 < MAX_BUILD_FAILS
    }

    /// Gives up on `dst` for [`FAILED_FOR`] (its destination refused us or
    /// can't be found).
    pub(super) fn give_up(&mut self, now: Instant, dst: Ipv6Addr) {
        self.fails.insert(dst, (MAX_BUILD_FAILS, now));
    }

    /// A circuit to `dst` is ready: the failures are forgotten.
    pub(super) fn succeeded(&mut self, dst: &Ipv6Addr) {
        self.fails.remove(dst);
    }

    /// Forgets failures older than [`FAILED_FOR`].
    pub(super) fn sweep(&mut self, now: Instant) {
        self.fails
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < FAILED_FOR);
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
    fn three_failures_in_a_row_give_up_on_a_destination_for_a_while() {
        let t0 = Instant::now();
        let dst: Ipv6Addr = "fc00::7".parse().unwrap();
        let mut t = OutTable::default();
        assert!(!t.failing(t0, &dst));
        assert!(t.failed(t0, dst));
        assert!(t.failed(t0, dst));
        assert!(!t.failed(t0, dst), "the third failure gives up");
        assert!(t.failing(t0, &dst));
        assert!(!t.failing(t0 + FAILED_FOR, &dst));
        // A failure after a quiet spell counts from one again.
        assert!(t.failed(t0 + FAILED_FOR, dst));
        assert!(!t.failing(t0 + FAILED_FOR, &dst));
        // Given up outright, then a success forgets it.
        t.give_up(t0, dst);
        assert!(t.failing(t0, &dst));
        t.succeeded(&dst);
        assert!(!t.failing(t0, &dst));
        // Old failures are swept.
        t.failed(t0, dst);
        t.sweep(t0 + FAILED_FOR);
        assert!(t.fails.is_empty());
    }
}
