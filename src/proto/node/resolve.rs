//! Address resolution's own state: the addresses being looked up with the
//! packets waiting for them, the addresses whose lookup failed lately, the
//! records judged stale, and the rate of new lookups. It answers what to do
//! with a packet for an address with no link ([`Miss`]) and keeps the
//! queues; the node runs the lookups (the DHT) and the links.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

/// How long a record judged stale is passed over.
const STALE_FOR: Duration = Duration::from_secs(60);
/// Packets waiting for an address lookup, per address.
const WANT_QUEUE: usize = 16;
/// Addresses being looked up at once (half the DHT's lookup slots, so
/// address lookups never starve its own upkeep).
const MAX_WANTED: usize = crate::proto::dht::MAX_LOOKUPS / 2;
/// A failed address lookup is not repeated for a while (its packets get
/// ICMPv6 address unreachable): this long after the first failure, twice
/// as long after each further one in a row, up to [`UNREACHABLE_MAX`].
/// Short at first because the commonest failure is a race of the first
/// minutes: two nodes started together, one looked the other up before its
/// record was published; a fixed 30 s hold made `ping` say "unreachable"
/// for half a minute.
const UNREACHABLE_FIRST: Duration = Duration::from_secs(4);
/// The longest hold after failed lookups in a row.
const UNREACHABLE_MAX: Duration = Duration::from_secs(30);
/// Address lookups per second, on average, and in a burst: a program
/// scanning fc00::/8 must not turn into a flood of lookups.
const LOOKUP_RATE: f64 = 5.0;
const LOOKUP_BURST: f64 = 20.0;

/// What to do with a packet for an address no link serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Miss {
    /// Its lookup failed lately: answer address unreachable.
    Unreachable,
    /// A lookup is under way and the packet waits for it.
    Queued,
    /// A lookup is under way and its queue is full: drop the packet.
    QueueFull,
    /// Resolve it: a known record with at least this sequence number may
    /// be used (lower ones led nowhere lately).
    Resolve { min_seq: u64 },
}

/// Packets waiting for an address lookup.
struct Want {
    queue: VecDeque<Vec<u8>>,
    started: Instant,
}

/// Failed lookups of one address, in a row.
#[derive(Clone, Copy)]
struct Failed {
    /// When the last one failed.
    at: Instant,
    /// How long its packets are answered unreachable from `at`.
    hold: Duration,
}

impl Failed {
    /// Remembered this long, so a failure soon after the hold doubles it.
    fn forgotten(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.at) >= self.hold + UNREACHABLE_MAX
    }
}

/// Address resolution's state (see the module comment).
pub(super) struct Resolver {
    wanted: HashMap<Ipv6Addr, Want>,
    unreachable: HashMap<Ipv6Addr, Failed>,
    /// Lowest record sequence number worth connecting to, per address
    /// (set when a looked-up record led nowhere).
    stale: HashMap<Ipv6Addr, (u64, Instant)>,
    tokens: (f64, Instant),
}

impl Resolver {
    pub(super) fn new(now: Instant) -> Resolver {
        Resolver {
            wanted: HashMap::new(),
            unreachable: HashMap::new(),
            stale: HashMap::new(),
            tokens: (LOOKUP_BURST, now),
        }
    }

    /// What to do with `packet`, for `dst`, which no link serves; a packet
    /// that can wait for a lookup under way is kept.
    pub(super) fn miss(&mut self, now: Instant, dst: Ipv6Addr, packet: &[u8]) -> Miss {
        if let Some(f) = self.unreachable.get(&dst) {
            if now.saturating_duration_since(f.at) < f.hold {
                return Miss::Unreachable;
            }
        }
        if let Some(w) = self.wanted.get_mut(&dst) {
            if w.queue.len() >= WANT_QUEUE {
                return Miss::QueueFull;
            }
            w.queue.push_back(packet.to_vec());
            return Miss::Queued;
        }
        Miss::Resolve {
            min_seq: self.min_seq(&dst),
        }
    }

    /// The lowest sequence number of `dst`'s record worth using.
    pub(super) fn min_seq(&self, dst: &Ipv6Addr) -> u64 {
        self.stale.get(dst).map_or(0, |s| s.0)
    }

    /// Whether a new lookup may start now: fewer than `MAX_WANTED` under
    /// way, and within the rate (a token is taken).
    pub(super) fn may_look_up(&mut self, now: Instant) -> bool {
        self.wanted.len() < MAX_WANTED && self.take_token(now)
    }

    fn take_token(&mut self, now: Instant) -> bool {
        let (tokens, last) = &mut self.tokens;
        let dt = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + dt * LOOKUP_RATE).min(LOOKUP_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A lookup for `dst` started; `packet` waits for it.
    pub(super) fn looking_up(&mut self, now: Instant, dst: Ipv6Addr, packet: &[u8]) {
        self.wanted.insert(
            dst,
            Want {
                queue: VecDeque::from([packet.to_vec()]),
                started: now,
            },
        );
    }

    /// The lookup for `dst` ended; returns the packets that waited for it.
    pub(super) fn done(&mut self, dst: &Ipv6Addr) -> VecDeque<Vec<u8>> {
        self.wanted.remove(dst).map(|w| w.queue).unwrap_or_default()
    }

    /// `dst` could not be found or reached: its packets are answered
    /// address unreachable for a while, longer after each failure in a row
    /// ([`UNREACHABLE_FIRST`]).
    pub(super) fn failed(&mut self, now: Instant, dst: Ipv6Addr) {
        let hold = match self.unreachable.get(&dst) {
            Some(f) if !f.forgotten(now) => (f.hold * 2).min(UNREACHABLE_MAX),
            _ => UNREACHABLE_FIRST,
        };
        if self.unreachable.len() >= 4 * MAX_WANTED && !self.unreachable.contains_key(&dst) {
            self.unreachable.clear();
        }
        self.unreachable.insert(dst, Failed { at: now, hold });
    }

    /// `dst`'s records below sequence number `below` led nowhere: pass
    /// over them for a while.
    pub(super) fn stale(&mut self, now: Instant, dst: Ipv6Addr, below: u64) {
        self.stale.insert(dst, (below, now));
    }

    /// `dst` proved a record over a live link: no record of it is stale.
    pub(super) fn fresh(&mut self, dst: &Ipv6Addr) {
        self.stale.remove(dst);
    }

    /// Forgets what has expired: lookups that will not answer any more,
    /// failures, and (since a record judged stale may be all there is if
    /// the node never comes back with a newer one) stale judgements.
    pub(super) fn expire(&mut self, now: Instant) {
        // Waiting packets are dropped once their lookup has had twice its
        // deadline.
        let want_for = crate::proto::dht::LOOKUP_DEADLINE * 2;
        self.wanted
            .retain(|_, w| now.saturating_duration_since(w.started) < want_for);
        self.unreachable.retain(|_, f| !f.forgotten(now));
        self.stale
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < STALE_FOR);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the clock
mod tests {
    use super::*;

    #[test]
    fn packets_wait_failures_hold_and_lookups_are_rated() {
        let t0 = Instant::now();
        let mut r = Resolver::new(t0);
        let a: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(r.miss(t0, a, b"p0"), Miss::Resolve { min_seq: 0 });
        assert!(r.may_look_up(t0));
        r.looking_up(t0, a, b"p0");
        for i in 1..WANT_QUEUE {
            assert_eq!(r.miss(t0, a, b"p"), Miss::Queued, "{i}");
        }
        assert_eq!(r.miss(t0, a, b"p"), Miss::QueueFull);
        assert_eq!(r.done(&a).len(), WANT_QUEUE);
        // Failed: unreachable for UNREACHABLE_FIRST, then tried again.
        r.failed(t0, a);
        assert_eq!(
            r.miss(t0 + UNREACHABLE_FIRST / 2, a, b"p"),
            Miss::Unreachable
        );
        r.stale(t0, a, 7);
        assert_eq!(
            r.miss(t0 + UNREACHABLE_FIRST, a, b"p"),
            Miss::Resolve { min_seq: 7 }
        );
        r.fresh(&a);
        assert_eq!(r.min_seq(&a), 0);
        // The burst, then the rate.
        let mut r = Resolver::new(t0);
        let started = (0..100).filter(|_| r.may_look_up(t0)).count();
        assert_eq!(started as f64, LOOKUP_BURST);
        assert!(!r.may_look_up(t0));
        assert!(r.may_look_up(t0 + Duration::from_secs_f64(1.0 / LOOKUP_RATE)));
        // Lookups under way are capped too.
        let mut r = Resolver::new(t0);
        for i in 0..MAX_WANTED {
            let dst = Ipv6Addr::from(0xfd00_u128 << 112 | i as u128);
            r.looking_up(t0, dst, b"p");
        }
        assert!(!r.may_look_up(t0 + Duration::from_secs(60)));
        // Expired lookups free their slots and drop their packets.
        r.expire(t0 + crate::proto::dht::LOOKUP_DEADLINE * 2);
        assert!(r.may_look_up(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn failures_in_a_row_hold_an_address_longer_and_are_forgotten() {
        let t0 = Instant::now();
        let a: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut r = Resolver::new(t0);
        let mut t = t0;
        // 4, 8, 16, 30, 30 s: each failure as soon as the last hold ends.
        for hold in [4, 8, 16, 30, 30] {
            r.failed(t, a);
            let hold = Duration::from_secs(hold);
            assert_eq!(
                r.miss(t + hold - Duration::from_millis(1), a, b"p"),
                Miss::Unreachable
            );
            t += hold;
            assert!(matches!(r.miss(t, a, b"p"), Miss::Resolve { .. }));
        }
        // Long after the last failure, the next one counts as the first.
        t += UNREACHABLE_MAX * 2;
        r.expire(t);
        r.failed(t, a);
        assert!(matches!(
            r.miss(t + UNREACHABLE_FIRST, a, b"p"),
            Miss::Resolve { .. }
        ));
    }
}
