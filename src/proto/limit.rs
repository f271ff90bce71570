//! Rate limits on work that anyone on the network can ask of a node before
//! it knows who they are: handshake initiations (X25519 work and a new link),
//! datagrams that match no established session, circuit builds.
//!
//! [`Rate`] is a token bucket kept as one instant (the generic cell rate
//! algorithm: the "theoretical arrival time" of the next packet), so a table
//! of them is small. [`SourceTable`] holds one per source — an IPv4 address
//! or an IPv6 /64, since one host owns a whole /64 — in a fixed-size
//! set-associative table: a spray of source addresses can't grow it, it only
//! pushes out the entries of the sources that sent least recently (those
//! whose bucket has refilled; a source being limited has the latest
//! arrival time and stays). Time is the caller's `now`; the table's hash is
//! keyed from the caller's RNG, so nobody can aim a spray at one set.

use std::hash::Hasher;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token bucket: `per_sec` tokens a second, at most `burst` saved up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Sustained rate.
    pub per_sec: u32,
    /// Most tokens at once.
    pub burst: u32,
}

impl Limit {
    /// The time one token takes to come back.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.per_sec.max(1)))
    }

    fn tolerance(&self) -> Duration {
        self.interval() * self.burst.max(1).saturating_sub(1)
    }
}

/// One bucket's state: when the bucket is next full (GCRA's theoretical
/// arrival time; a token is there from that instant minus the tolerance,
/// [`Rate::ready_at`]). A fresh bucket is full.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    tat: Instant,
}

impl Rate {
    /// A full bucket.
    pub fn new(now: Instant) -> Rate {
        Rate { tat: now }
    }

    /// When [`Rate::allow`] next says yes: `now` or earlier if it would
    /// now.
    pub fn ready_at(&self, limit: Limit) -> Instant {
        self.tat.checked_sub(limit.tolerance()).unwrap_or(self.tat)
    }

    /// Whether the bucket is full (nothing to remember of it).
    pub fn is_full(&self, now: Instant) -> bool {
        self.tat <= now
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant, limit: Limit) -> bool {
        let tat = self.tat.max(now);
        if tat.saturating_duration_since(now) > limit.tolerance() {
            return false;
        }
        self.tat = tat + limit.interval();
        true
    }

    /// Takes one token whether there is one or not: work that can't wait
    /// still delays what can. It empties the bucket at most (no debt), so
    /// what waits then gets tokens at the usual rate.
    pub fn charge(&mut self, now: Instant, limit: Limit) {
        let most = now + limit.tolerance() + limit.interval();
        self.tat = (self.tat.max(now) + limit.interval()).min(most);
    }
}

/// A budget in bytes a second (the relay bandwidth cap): it saves up a
/// tenth of a second's worth, and at least `min_burst` bytes. A fresh
/// bucket is full.
#[derive(Clone, Copy, Debug)]
pub struct ByteBucket {
    per_sec: u64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl ByteBucket {
    /// A full bucket of `per_sec` bytes a second.
    pub fn new(per_sec: u64, min_burst: u64) -> ByteBucket {
        let burst = (per_sec as f64 / 10.0).max(min_burst as f64);
        ByteBucket {
            per_sec,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes `bytes` if they are there.
    pub fn take(&mut self, now: Instant, bytes: usize) -> bool {
        let dt = self
            .last
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.last = Some(now);
        self.tokens = (self.tokens + dt * self.per_sec as f64).min(self.burst);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

/// Which source a datagram counts against: an IPv4 address or an IPv6 /64
/// (IPv4-mapped IPv6 addresses count as IPv4).
pub fn source_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) | 1 << 64,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => source_key(IpAddr::V4(v4)),
            None => (u128::from(v6) >> 64) | 2 << 64,
        },
    }
}

const WAYS: usize = 4;

#[derive(Clone, Copy)]
struct Slot {
    key: u128,
    rate: Rate,
}

/// Per-source buckets in a fixed number of slots.
pub struct SourceTable {
    sets: Vec<[Option<Slot>; WAYS]>,
    nsets: usize,
    hash_key: (u64, u64),
    /// Entries pushed out to make room for a new source.
    pub evicted: u64,
}

impl SourceTable {
    /// A table of `slots` entries (rounded up to a multiple of 4); memory is
    /// taken on first use. `hash_key` should be random.
    pub fn new(slots: usize, hash_key: (u64, u64)) -> SourceTable {
        SourceTable {
            sets: Vec::new(),
            nsets: slots.div_ceil(WAYS).max(1),
            hash_key,
            evicted: 0,
        }
    }

    /// Most entries it ever holds.
    pub fn capacity(&self) -> usize {
        self.nsets * WAYS
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.sets.iter().flatten().filter(|s| s.is_some()).count()
    }

    /// Whether no entry is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the table takes (once allocated).
    pub fn memory(&self) -> usize {
        self.sets.capacity() * std::mem::size_of::<[Option<Slot>; WAYS]>()
    }

    fn set_of(&self, key: u128) -> usize {
        #[allow(deprecated)] // SipHash-2-4 with our key; std has no other keyed hash
        let mut h = std::hash::SipHasher::new_with_keys(self.hash_key.0, self.hash_key.1);
        h.write_u128(key);
        (h.finish() % self.nsets as u64) as usize
    }

    /// Takes a token from `ip`'s bucket (a new source starts full).
    pub fn allow(&mut self, now: Instant, ip: IpAddr, limit: Limit) -> bool {
        if self.sets.is_empty() {
            self.sets = vec![[None; WAYS]; self.nsets];
        }
        let key = source_key(ip);
        let set = self.set_of(key);
        let ways = &mut self.sets[set];
        if let Some(slot) = ways.iter_mut().flatten().find(|s| s.key == key) {
            return slot.rate.allow(now, limit);
        }
        // A free way, else the one whose bucket refilled earliest: it has
        // been quiet longest, and a source being limited is never it while
        // a quieter one is there.
        let way = ways.iter().position(Option::is_none).unwrap_or_else(|| {
            self.evicted += 1;
            (0..WAYS)
                .min_by_key(|&i| ways[i].map(|s| s.rate.tat))
                .expect("WAYS > 0")
        });
        let mut rate = Rate::new(now);
        let ok = rate.allow(now, limit);
        ways[way] = Some(Slot { key, rate });
        ok
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock
mod tests {
    use super::*;

    #[test]
    fn a_byte_bucket_spends_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        // 10,000 bytes a second: a burst of 1,000 (a tenth of a second).
        let mut b = ByteBucket::new(10_000, 0);
        assert!(b.take(t0, 600));
        assert!(b.take(t0, 400));
        assert!(!b.take(t0, 1), "the burst is spent");
        let later = t0 + Duration::from_millis(50);
        assert!(b.take(later, 500), "50 ms bring 500 bytes");
        assert!(!b.take(later, 1));
        // Never more than the burst saved up, however long it waited.
        let much_later = later + Duration::from_secs(60);
        assert!(!b.take(much_later, 1_001));
        assert!(b.take(much_later, 1_000));
        // A floor on the burst, for slow caps.
        let mut b = ByteBucket::new(100, 5_000);
        assert!(b.take(t0, 5_000));
        assert!(!b.take(t0, 1));
    }

    const L: Limit = Limit {
        per_sec: 10,
        burst: 5,
    };

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut r = Rate::new(t0);
        let burst = (0..100).filter(|_| r.allow(t0, L)).count();
        assert_eq!(burst, 5);
        // 10 s of one attempt per millisecond: 10 a second get through.
        let mut ok = 0;
        for ms in 1..=10_000u64 {
            ok += r.allow(t0 + Duration::from_millis(ms), L) as usize;
        }
        assert!((100..=101).contains(&ok), "{ok}");
        // Quiet for a second: full again, no more.
        let later = t0 + Duration::from_secs(12);
        assert_eq!((0..100).filter(|_| r.allow(later, L)).count(), 5);
    }

    #[test]
    fn charges_take_tokens_and_never_go_into_debt() {
        let t0 = Instant::now();
        let mut r = Rate::new(t0);
        r.charge(t0, L);
        r.charge(t0, L);
        assert_eq!((0..100).filter(|_| r.allow(t0, L)).count(), 3);
        // However much is charged, the bucket is only empty: the next
        // token comes after an interval (0.1 s at 10/s), then one an
        // interval.
        for _ in 0..1000 {
            r.charge(t0, L);
        }
        assert!(!r.allow(t0 + Duration::from_millis(50), L));
        assert!(r.allow(t0 + Duration::from_millis(100), L));
        assert!(!r.allow(t0 + Duration::from_millis(150), L));
        assert!(r.allow(t0 + Duration::from_millis(200), L));
    }

    #[test]
    fn sources_are_apart_and_v6_counts_per_64() {
        let t0 = Instant::now();
        let mut t = SourceTable::new(64, (1, 2));
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!((0..50).filter(|_| t.allow(t0, a, L)).count(), 5);
        assert_eq!((0..50).filter(|_| t.allow(t0, b, L)).count(), 5);
        let v1: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v2: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v3: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!((0..50).filter(|_| t.allow(t0, v1, L)).count(), 5);
        assert_eq!((0..50).filter(|_| t.allow(t0, v2, L)).count(), 0);
        assert_eq!((0..50).filter(|_| t.allow(t0, v3, L)).count(), 5);
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert!(!t.allow(t0, mapped, L));
    }

    #[test]
    fn bounded_under_a_spray_and_the_flooder_stays_limited() {
        let t0 = Instant::now();
        let mut t = SourceTable::new(4096, (3, 4));
        let flooder: IpAddr = "198.18.9.9".parse().unwrap();
        let mut passed = 0;
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 10);
            let spoofed = IpAddr::V4((0x0a00_0000 + i).into());
            t.allow(now, spoofed, L);
            passed += t.allow(now, flooder, L) as usize;
        }
        assert!(t.len() <= t.capacity() && t.capacity() == 4096);
        assert!(t.memory() < 256 * 1024, "{}", t.memory());
        assert!(t.evicted > 90_000);
        // One second of flooding: the burst and ten a second, no more.
        assert!(passed <= 5 + 10 + 1, "{passed}");
    }
}
