//! Real RSA-2048 identities for the whole-node simulator, made fast.
//!
//! `Identity::generate` searches two 1024-bit primes per key (~60 ms to a
//! few hundred, one core): a thousand keys would take a minute or more on
//! two cores. Here a small pool of primes is searched instead (half a key's
//! work per prime, spread over the machine's cores) and every node gets a
//! distinct *pair* from the pool: 46 primes give 1,035 moduli. Keys that
//! share a prime are breakable by anyone who sees both (a gcd), which
//! matters nowhere in a simulation: the nodes still sign and verify real
//! PKCS#1 signatures with real 2048-bit keys. Everything follows from the
//! seed.

use std::thread;

use boringtun::x25519;
use qgate::proto::Identity;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{BigUint, RsaPrivateKey};

fn rng(seed: u64, stream: u64) -> ChaCha20Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&stream.to_le_bytes());
    s[16..24].copy_from_slice(b"sim keys");
    ChaCha20Rng::from_seed(s)
}

/// `f` over `items` on every core, results in the items' order.
fn on_all_cores<T: Sync, R: Send>(items: &[T], f: impl Fn(usize, &T) -> R + Sync) -> Vec<R> {
    let workers = thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = items.len().div_ceil(workers).max(1);
    let f = &f;
    thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(o, item)| f(c * chunk + o, item))
                        .collect::<Vec<R>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker thread"))
            .collect()
    })
}

/// `n` distinct identities, the same ones for the same seed.
pub fn identities(n: usize, seed: u64) -> Vec<Identity> {
    let mut primes_needed = 2;
    while primes_needed * (primes_needed - 1) / 2 < n {
        primes_needed += 1;
    }
    // Key k comes from its own seeded stream, whichever thread makes it.
    let ks: Vec<u64> = (0..primes_needed.div_ceil(2) as u64).collect();
    let made = on_all_cores(&ks, |_, &k| {
        RsaPrivateKey::new(&mut rng(seed, k), 2048).expect("RSA key generation")
    });
    let e = made[0].e().clone();
    let primes: Vec<BigUint> = made.iter().flat_map(|k| k.primes().to_vec()).collect();
    let mut pairs = Vec::with_capacity(n);
    'outer: for i in 0..primes.len() {
        for j in i + 1..primes.len() {
            if pairs.len() == n {
                break 'outer;
            }
            pairs.push((i, j));
        }
    }
    // Assembling a key (the private exponent, CRT values) takes a
    // millisecond or two: also on every core.
    on_all_cores(&pairs, |t, &(i, j)| {
        let rsa = RsaPrivateKey::from_p_q(primes[i].clone(), primes[j].clone(), e.clone())
            .expect("RSA key from primes");
        let mut link = [0u8; 32];
        rng(seed, (1 << 32) + t as u64).fill_bytes(&mut link);
        Identity::from_parts(rsa, x25519::StaticSecret::from(link)).expect("a 2048-bit modulus")
    })
}
