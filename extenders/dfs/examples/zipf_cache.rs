//! Cache hit ratio on a Zipf (s = 1.0) request trace: the policy of the
//! chunk cache (moka's W-TinyLFU, as `src/cache.rs` builds it, with
//! uniform weights) against a plain LRU of the same capacity.
//!
//! ```sh
//! cargo run --release -p qdfs --example zipf_cache
//! ```
//! Deterministic: a fixed seed for the trace (moka's own sketch is seeded
//! per process, so its figure can move in the last digit between runs).

use std::collections::{BTreeMap, HashMap};

use moka::sync::Cache;

/// Items requested (pieces of content).
const ITEMS: usize = 100_000;
/// Requests in the trace.
const REQUESTS: usize = 1_000_000;
/// Zipf exponent.
const S: f64 = 1.0;

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A Zipf trace over `ITEMS` items; item ranks are scrambled so that
/// popularity has nothing to do with the item number.
fn trace(seed: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(ITEMS);
    let mut sum = 0.0;
    for k in 1..=ITEMS {
        sum += 1.0 / (k as f64).powf(S);
        cdf.push(sum);
    }
    let mut rng = Rng(seed);
    (0..REQUESTS)
        .map(|_| {
            let u = rng.next_f64() * sum;
            let rank = cdf.partition_point(|c| *c < u) as u64;
            rank.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20
        })
        .collect()
}

/// A plain LRU: on a miss the least recently used item leaves.
struct Lru {
    cap: usize,
    clock: u64,
    stamp: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
}

impl Lru {
    fn new(cap: usize) -> Lru {
        Lru {
            cap,
            clock: 0,
            stamp: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Whether `k` was cached; it is cached afterwards.
    fn access(&mut self, k: u64) -> bool {
        self.clock += 1;
        let hit = match self.stamp.insert(k, self.clock) {
            Some(old) => {
                self.order.remove(&old);
                true
            }
            None => false,
        };
        self.order.insert(self.clock, k);
        if self.stamp.len() > self.cap {
            if let Some((_, victim)) = self.order.pop_first() {
                self.stamp.remove(&victim);
            }
        }
        hit
    }
}

fn tinylfu_ratio(t: &[u64], cap: u64) -> f64 {
    let c: Cache<u64, ()> = Cache::builder().max_capacity(cap).weigher(|_, _| 1).build();
    let mut hits = 0;
    for (i, k) in t.iter().enumerate() {
        if c.get(k).is_some() {
            hits += 1;
        } else {
            c.insert(*k, ());
        }
        if i % 64 == 0 {
            c.run_pending_tasks();
        }
    }
    hits as f64 / t.len() as f64
}

fn lru_ratio(t: &[u64], cap: usize) -> f64 {
    let mut l = Lru::new(cap);
    let hits = t.iter().filter(|k| l.access(**k)).count();
    hits as f64 / t.len() as f64
}

fn main() {
    let t = trace(0x5eed_cafe_f00d_1234);
    println!("Zipf s = {S}, {ITEMS} items, {REQUESTS} requests");
    println!("| capacity | W-TinyLFU (moka) | LRU | ratio |");
    println!("|---|---|---|---|");
    for cap in [100usize, 1_000, 10_000] {
        let a = tinylfu_ratio(&t, cap as u64);
        let b = lru_ratio(&t, cap);
        println!(
            "| {cap} ({:.1} %) | {:.3} | {:.3} | {:.2}x |",
            cap as f64 * 100.0 / ITEMS as f64,
            a,
            b,
            a / b
        );
    }
}
