//! Encode and decode rates of private storage's sealing (`qdfs::private`),
//! for `scripts/bench-dfs`:
//!
//! ```sh
//! cargo run --release -p qdfs --example erasure_rate -- [--mib 256] [--reps 3]
//! ```
//!
//! Seals `--mib` MiB of deterministic data 3-of-6 into six in-memory shares
//! (XChaCha20-Poly1305 per 1 MiB segment, then Reed-Solomon), opens it again
//! from three of the six (0,1,2: the data shares, no Reed-Solomon decoding;
//! 3,4,5: only recovery shares, every segment reconstructed), checks the
//! result is the input, and, to tell the coding from the cipher, runs
//! `reed-solomon-simd` alone on segments of the same shape. Each figure is
//! the median of `--reps` runs, in MB/s (10^6 bytes of plaintext a second).
//! One line per figure: `NAME: RATE MB/s (DETAIL)`.

use std::io::{Read, Write};
use std::time::Instant;

use qdfs::private::{open, seal, Scheme, SealedFile};

fn usage() -> ! {
    eprintln!(
        "usage: erasure_rate [--mib N (1..=4096, default 256)] [--reps N (1..=20, default 3)]"
    );
    std::process::exit(2);
}

fn parse_args() -> (usize, usize) {
    let (mut mib, mut reps) = (256usize, 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse::<usize>().ok());
        match (a.as_str(), v) {
            ("--mib", Some(v)) if (1..=4096).contains(&v) => mib = v,
            ("--reps", Some(v)) if (1..=20).contains(&v) => reps = v,
            _ => usage(),
        }
    }
    (mib, reps)
}

/// Deterministic, incompressible-looking bytes (splitmix64).
fn data(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x: u64 = 0x5153_4446_5f62_656e;
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seals `d` into `outs` (cleared first; buffers are reused across runs so
/// the figure is not one of first-touch page faults).
fn seal_once(d: &[u8], scheme: Scheme, outs: &mut [Vec<u8>]) -> (SealedFile, f64) {
    outs.iter_mut().for_each(Vec::clear);
    let mut ws: Vec<&mut dyn Write> = outs.iter_mut().map(|v| v as &mut dyn Write).collect();
    let t = Instant::now();
    let f = seal(d, d.len() as u64, scheme, [0x42; 32], [0x17; 16], &mut ws).expect("seal");
    (f, t.elapsed().as_secs_f64())
}

fn open_once(
    f: &SealedFile,
    shares: &[Vec<u8>],
    use_: &[usize],
    out: &mut Vec<u8>,
    expect: &[u8],
) -> f64 {
    let mut readers: Vec<&[u8]> = shares.iter().map(Vec::as_slice).collect();
    let mut rs: Vec<Option<&mut dyn Read>> = readers
        .iter_mut()
        .enumerate()
        .map(|(j, r)| use_.contains(&j).then_some(r as &mut dyn Read))
        .collect();
    out.clear();
    let t = Instant::now();
    open(f, &mut rs, &mut *out).expect("open");
    let secs = t.elapsed().as_secs_f64();
    assert!(out[..] == expect[..], "opened bytes differ from the input");
    secs
}

/// Touches every page of a buffer of `cap` bytes, then empties it.
fn warm(cap: usize) -> Vec<u8> {
    let mut v = vec![1u8; cap];
    v.clear();
    v
}

/// Reed-Solomon alone: `len` bytes in 1 MiB segments split k ways, n-k
/// recovery shards made per segment; then as many segments rebuilt from
/// recovery shards only (the worst case; the first segment's shards each
/// time: decoding costs the same whatever the bytes). Returns (encode
/// seconds, decode seconds).
fn rs_only(d: &[u8], k: usize, n: usize) -> (f64, f64) {
    let seg = 1 << 20;
    let shard = (seg / k).div_ceil(64) * 64;
    let mut padded = vec![0u8; shard * k];
    let mut first = None;
    let t = Instant::now();
    for s in d.chunks(seg) {
        padded[..s.len()].copy_from_slice(s);
        padded[s.len()..].fill(0);
        let originals: Vec<&[u8]> = padded.chunks(shard).collect();
        let rec = reed_solomon_simd::encode(k, n - k, &originals).expect("encode");
        first.get_or_insert(rec);
    }
    let enc = t.elapsed().as_secs_f64();
    let rec = first.expect("at least one segment");
    let t = Instant::now();
    for _ in d.chunks(seg) {
        // Every original lost: k of the n-k recovery shards rebuild them.
        let present = std::iter::empty::<(usize, &[u8])>();
        let recovery = rec
            .iter()
            .take(k)
            .enumerate()
            .map(|(j, r)| (j, r.as_slice()));
        let restored = reed_solomon_simd::decode(k, n - k, present, recovery).expect("decode");
        assert_eq!(restored.len(), k);
    }
    let dec = t.elapsed().as_secs_f64();
    (enc, dec)
}

fn main() {
    let (mib, reps) = parse_args();
    let scheme: Scheme = "3-of-6".parse().expect("scheme");
    let len = mib << 20;
    let d = data(len);
    let mb = len as f64 / 1e6;
    let (mut seal_s, mut open_sys, mut open_rec, mut rs_enc, mut rs_dec) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut shares: Vec<Vec<u8>> = (0..scheme.n)
        .map(|_| warm(len / scheme.k as usize + (1 << 20)))
        .collect();
    let mut out = warm(len);
    for _ in 0..reps {
        let (f, s) = seal_once(&d, scheme, &mut shares);
        seal_s.push(s);
        open_sys.push(open_once(&f, &shares, &[0, 1, 2], &mut out, &d));
        open_rec.push(open_once(&f, &shares, &[3, 4, 5], &mut out, &d));
        let (e, dd) = rs_only(&d, scheme.k as usize, scheme.n as usize);
        rs_enc.push(e);
        rs_dec.push(dd);
    }
    let line = |name: &str, secs: Vec<f64>, what: &str| {
        let s = median(secs);
        println!(
            "{name}: {:.0} MB/s ({mib} MiB in {s:.3} s, median of {reps}; {what})",
            mb / s
        );
    };
    line(
        "seal",
        seal_s,
        "encrypt XChaCha20-Poly1305 + Reed-Solomon 3-of-6 encode",
    );
    line(
        "open_data_shares",
        open_sys,
        "from shares 0,1,2: decrypt only, no Reed-Solomon decoding",
    );
    line(
        "open_recovery_shares",
        open_rec,
        "from shares 3,4,5: every segment reconstructed, then decrypted",
    );
    line(
        "rs_encode",
        rs_enc,
        "reed-solomon-simd alone, 3 data + 3 recovery shards per 1 MiB",
    );
    line(
        "rs_decode",
        rs_dec,
        "reed-solomon-simd alone, 3 originals rebuilt from 3 recovery shards",
    );
}
