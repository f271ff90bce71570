//! The node's lock, and who held it how long.
//!
//! Every thread of the daemon takes the node through [`NodeLock::lock`],
//! naming itself ([`Holder`]). A hold over [`LONG_HOLD`] is counted per
//! holder, with the longest, and `status` shows them
//! (`data_path.long_holds`): the data path's long waits
//! (`long_lock_waits`) say that packets waited, these say behind whom.
//!
//! What they showed (`BENCH_ONLY=storm scripts/bench`, 2 cores): during a
//! storm of `dht put`s, control requests held the lock over 1 ms hundreds
//! of times, up to 8.6 ms, while the work they did under it took 50–170 µs
//! of CPU (read from the thread's CPU clock in a trial build): a thread
//! holding the lock lost its core to other work and the data path waited
//! for it. Handing the node to the data thread instead (a mailbox, commit
//! b752832) measured no better and was reverted; see docs/ARCHITECTURE.md,
//! known gap 2.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
pub(super) use qgate_api::LockHolder as Holder;
use qgate_api::LockHolds;

use crate::proto::Node;

/// A hold counted in [`LockHolds`] (the same bar as the data path's
/// `long_lock_waits`).
const LONG_HOLD: Duration = Duration::from_millis(1);

/// Every holder, in the order `status` lists them.
const HOLDERS: [Holder; 8] = [
    Holder::Data,
    Holder::Timer,
    Holder::Control,
    Holder::Sign,
    Holder::Store,
    Holder::Lan,
    Holder::PathMtu,
    Holder::Metrics,
];

fn slot(who: Holder) -> usize {
    HOLDERS.iter().position(|h| *h == who).unwrap_or(0)
}

#[derive(Default)]
struct Tally {
    count: AtomicU64,
    longest_us: AtomicU64,
}

/// What runs on the node as each hold ends, still under the lock.
pub(super) type Release<T> = Box<dyn Fn(&mut T) + Send + Sync>;

/// The node behind a mutex, with its holds tallied (generic for the tests
/// only).
pub(super) struct NodeLock<T = Node> {
    node: Mutex<T>,
    holds: [Tally; HOLDERS.len()],
    release: Option<Release<T>>,
}

impl<T> NodeLock<T> {
    /// `release` runs on the node as each hold ends (the daemon passes the
    /// node's messages for the data plane on there).
    pub(super) fn new(node: T, release: Option<Release<T>>) -> Self {
        NodeLock {
            node: Mutex::new(node),
            holds: Default::default(),
            release,
        }
    }

    /// Takes the node for `who`, waiting as long as it takes.
    pub(super) fn lock(&self, who: Holder) -> Held<'_, T> {
        self.held(self.node.lock(), who)
    }

    /// Takes the node for `who` if nobody holds it.
    pub(super) fn try_lock(&self, who: Holder) -> Option<Held<'_, T>> {
        self.node.try_lock().map(|g| self.held(g, who))
    }

    fn held<'a>(&'a self, guard: MutexGuard<'a, T>, who: Holder) -> Held<'a, T> {
        Held {
            guard: Some(guard),
            since: Instant::now(),
            tally: &self.holds[slot(who)],
            release: self.release.as_deref(),
        }
    }

    /// The holds over [`LONG_HOLD`] since start, holders that had none left
    /// out.
    pub(super) fn long_holds(&self) -> Vec<LockHolds> {
        HOLDERS
            .iter()
            .zip(&self.holds)
            .filter_map(|(&holder, t)| {
                let count = t.count.load(Ordering::Relaxed);
                (count > 0).then(|| LockHolds {
                    holder,
                    count,
                    longest_us: t.longest_us.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

/// The node while held; the hold is measured when it ends.
pub(super) struct Held<'a, T = Node> {
    /// Present until `unlock_fair` or drop, which end the hold.
    guard: Option<MutexGuard<'a, T>>,
    since: Instant,
    tally: &'a Tally,
    release: Option<&'a (dyn Fn(&mut T) + Send + Sync)>,
}

impl<T> Held<'_, T> {
    /// Lets go with a fair unlock: a thread waiting for the node (the data
    /// thread, with packets) gets it before this one can take it back.
    pub(super) fn unlock_fair(mut self) {
        if let Some(mut g) = self.guard.take() {
            if let Some(f) = self.release {
                f(&mut g);
            }
            MutexGuard::unlock_fair(g);
        }
        self.note();
    }

    fn note(&self) {
        let held = self.since.elapsed();
        if held > LONG_HOLD {
            let us = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
            self.tally.count.fetch_add(1, Ordering::Relaxed);
            self.tally.longest_us.fetch_max(us, Ordering::Relaxed);
        }
    }
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            if let Some(f) = self.release {
                f(&mut g);
            }
            drop(g);
            self.note();
        }
    }
}

impl<T> Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_deref().expect("held until unlocked")
    }
}

impl<T> DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_deref_mut().expect("held until unlocked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_hold_is_counted_for_its_holder_and_a_short_one_is_not() {
        let lock = NodeLock::new(0u8, None);
        drop(lock.lock(Holder::Data));
        let mut held = lock.lock(Holder::Control);
        *held += 1;
        std::thread::sleep(Duration::from_millis(3));
        drop(held);
        let held = lock.lock(Holder::Timer);
        std::thread::sleep(Duration::from_millis(2));
        held.unlock_fair();
        let holds = lock.long_holds();
        assert_eq!(holds.len(), 2, "{holds:?}");
        assert_eq!((holds[0].holder, holds[0].count), (Holder::Timer, 1));
        assert_eq!((holds[1].holder, holds[1].count), (Holder::Control, 1));
        assert!(holds[1].longest_us >= 3_000, "{holds:?}");
        // Unlocked after each: the node is free, and kept what was done.
        assert_eq!(lock.try_lock(Holder::Data).map(|n| *n), Some(1));
    }

    #[test]
    fn the_release_hook_runs_as_every_hold_ends_still_holding() {
        use std::sync::atomic::AtomicU8;
        use std::sync::Arc;
        let seen = Arc::new(AtomicU8::new(0));
        let s = seen.clone();
        // Each hold adds 1; the hook moves the count out, under the lock.
        let lock = NodeLock::new(
            0u8,
            Some(Box::new(move |n: &mut u8| {
                s.fetch_add(std::mem::take(n), Ordering::Relaxed);
            })),
        );
        *lock.lock(Holder::Data) += 1;
        *lock.try_lock(Holder::Timer).unwrap() += 1;
        let mut held = lock.lock(Holder::Control);
        *held += 1;
        held.unlock_fair();
        assert_eq!(seen.load(Ordering::Relaxed), 3);
        assert_eq!(
            *lock.lock(Holder::Data),
            0,
            "the hook ran before the unlock"
        );
    }
}
