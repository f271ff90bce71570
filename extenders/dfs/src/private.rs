//! Client-side sealing for private storage, sans IO over `Read`/`Write`:
//! the building block of `qdfs store` / `qdfs fetch` ([`crate::owner`]
//! places the shares on holders and keeps the owner's index).
//!
//! A file is encrypted on the client in segments of [`SEGMENT`] bytes with
//! XChaCha20-Poly1305 under a random per-file key; segment `i`'s nonce is
//! the file's random 16-byte prefix followed by `i`, and the associated data
//! says whether it is the last segment, so segments cannot be reordered,
//! dropped or the file cut short without the opening failing. Each sealed
//! segment is then erasure-coded k-of-n with `reed-solomon-simd`: share `j`
//! of the file is share `j` of every segment, one after another, so any `k`
//! of the `n` share files give the file back, and a holder sees only
//! ciphertext. Shares carry no header: the file's [`SealedFile`] (key,
//! scheme, size) is what the owner keeps.

use std::io::{self, Read, Write};
use std::str::FromStr;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Plaintext bytes per segment.
pub const SEGMENT: usize = 1 << 20;
/// AEAD tag bytes per segment.
const TAG: usize = 16;

/// A k-of-n erasure-coding scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    /// Shares needed to read.
    pub k: u16,
    /// Shares made.
    pub n: u16,
}

impl Default for Scheme {
    /// 3-of-6: any three losses survived at twice the size.
    fn default() -> Scheme {
        Scheme { k: 3, n: 6 }
    }
}

/// Why a scheme, a sealing or an opening failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    /// Not "K-of-N" with 1 ≤ K < N ≤ 256.
    #[error("shares must be \"K-of-N\" with 1 <= K < N <= 256")]
    BadScheme,
    /// Fewer than k shares given.
    #[error("{have} shares given, {need} needed")]
    TooFewShares {
        /// Shares given.
        have: usize,
        /// Shares needed.
        need: usize,
    },
    /// The shares do not decrypt: damaged, from another file, or the wrong key.
    #[error("segment {0} does not decrypt (damaged share, other file, or wrong key)")]
    Open(u64),
    /// Erasure coding failed.
    #[error("erasure coding: {0}")]
    Coding(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl FromStr for Scheme {
    type Err = PrivateError;
    fn from_str(s: &str) -> Result<Scheme, PrivateError> {
        let (k, n) = s.split_once("-of-").ok_or(PrivateError::BadScheme)?;
        let k: u16 = k.trim().parse().map_err(|_| PrivateError::BadScheme)?;
        let n: u16 = n.trim().parse().map_err(|_| PrivateError::BadScheme)?;
        if k == 0 || k >= n || n > 256 {
            return Err(PrivateError::BadScheme);
        }
        Ok(Scheme { k, n })
    }
}

/// What the owner keeps to read a sealed file back.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedFile {
    /// The file's key.
    pub key: [u8; 32],
    /// The nonce prefix.
    pub prefix: [u8; 16],
    /// The scheme its shares were made with.
    pub scheme: Scheme,
    /// Plaintext size.
    pub size: u64,
}

impl std::fmt::Debug for SealedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SealedFile")
            .field("scheme", &self.scheme)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn segments(size: u64) -> u64 {
    size.div_ceil(SEGMENT as u64).max(1)
}

fn plain_len(size: u64, i: u64) -> usize {
    (size - i * SEGMENT as u64).min(SEGMENT as u64) as usize
}

/// Bytes of one share of a sealed segment of `sealed` bytes: an even
/// number (the coder's unit), at least 2.
fn shard_len(sealed: usize, k: usize) -> usize {
    sealed.div_ceil(k).div_ceil(2).max(1) * 2
}

/// Bytes of each share file of a sealed file of `size` bytes (closed
/// form: every segment but the last is full, so a hostile size costs no
/// time).
pub fn share_size(size: u64, scheme: Scheme) -> u64 {
    let k = scheme.k.max(1) as usize;
    let count = segments(size);
    let last = plain_len(size, count - 1);
    (count - 1)
        .saturating_mul(shard_len(SEGMENT + TAG, k) as u64)
        .saturating_add(shard_len(last + TAG, k) as u64)
}

fn aead(f: &SealedFile) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new((&f.key).into())
}

fn nonce(prefix: &[u8; 16], i: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(prefix);
    n[16..].copy_from_slice(&i.to_be_bytes());
    n.into()
}

/// Seals `size` bytes from `data` into `shares.len() == n` share streams.
/// `key` and `prefix` must be fresh random values for every file.
pub fn seal(
    mut data: impl Read,
    size: u64,
    scheme: Scheme,
    key: [u8; 32],
    prefix: [u8; 16],
    shares: &mut [&mut dyn Write],
) -> Result<SealedFile, PrivateError> {
    if shares.len() != scheme.n as usize {
        return Err(PrivateError::BadScheme);
    }
    let f = SealedFile {
        key,
        prefix,
        scheme,
        size,
    };
    let cipher = aead(&f);
    let (k, n) = (scheme.k as usize, scheme.n as usize);
    let count = segments(size);
    let mut plain = vec![0u8; SEGMENT];
    for i in 0..count {
        let len = plain_len(size, i);
        data.read_exact(&mut plain[..len])?;
        let last = [(i + 1 == count) as u8];
        let sealed = cipher
            .encrypt(
                &nonce(&prefix, i),
                Payload {
                    msg: &plain[..len],
                    aad: &last,
                },
            )
            .map_err(|_| PrivateError::Coding("encryption failed".into()))?;
        let shard = shard_len(sealed.len(), k);
        let mut padded = sealed;
        padded.resize(shard * k, 0);
        let originals: Vec<&[u8]> = padded.chunks(shard).collect();
        let recovery = reed_solomon_simd::encode(k, n - k, &originals)
            .map_err(|e| PrivateError::Coding(e.to_string()))?;
        for (j, out) in shares.iter_mut().enumerate() {
            let piece = if j < k {
                originals[j]
            } else {
                &recovery[j - k]
            };
            out.write_all(piece)?;
        }
    }
    Ok(f)
}

/// Opens a sealed file from any `k` of its share streams (`shares[j]` is
/// share `j`, `None` where lost), writing the plaintext to `out`.
pub fn open(
    f: &SealedFile,
    shares: &mut [Option<&mut dyn Read>],
    mut out: impl Write,
) -> Result<(), PrivateError> {
    let (k, n) = (f.scheme.k as usize, f.scheme.n as usize);
    let have = shares.iter().filter(|s| s.is_some()).count();
    if shares.len() != n || have < k {
        return Err(PrivateError::TooFewShares { have, need: k });
    }
    let cipher = aead(f);
    let count = segments(f.size);
    let mut buf: Vec<Vec<u8>> = vec![Vec::new(); n];
    for i in 0..count {
        let len = plain_len(f.size, i);
        let shard = shard_len(len + TAG, k);
        let originals = segment_originals(shares, &mut buf, k, shard, i)?;
        let mut sealed = Vec::with_capacity(shard * k);
        for o in &originals {
            sealed.extend_from_slice(o);
        }
        sealed.truncate(len + TAG);
        let last = [(i + 1 == count) as u8];
        let plain = cipher
            .decrypt(
                &nonce(&f.prefix, i),
                Payload {
                    msg: &sealed,
                    aad: &last,
                },
            )
            .map_err(|_| PrivateError::Open(i))?;
        out.write_all(&plain)?;
    }
    Ok(())
}

/// Segment `seg`'s `k` original shards: its piece (`shard` bytes) of the
/// first `k` shares present is read (the others are left unread: reading
/// them could only fail), and missing originals are rebuilt from
/// recovery shards.
fn segment_originals(
    shares: &mut [Option<&mut dyn Read>],
    buf: &mut [Vec<u8>],
    k: usize,
    shard: usize,
    seg: u64,
) -> Result<Vec<Vec<u8>>, PrivateError> {
    let n = shares.len();
    let mut used = Vec::with_capacity(k);
    for (j, s) in shares.iter_mut().enumerate() {
        if used.len() == k {
            break;
        }
        if let Some(r) = s {
            buf[j].resize(shard, 0);
            r.read_exact(&mut buf[j])?;
            used.push(j);
        }
    }
    let mut originals: Vec<Option<Vec<u8>>> = vec![None; k];
    let mut recovery = Vec::new();
    for &j in &used {
        if j < k {
            originals[j] = Some(buf[j].clone());
        } else {
            recovery.push((j - k, buf[j].as_slice()));
        }
    }
    if originals.iter().any(Option::is_none) {
        let present = originals
            .iter()
            .enumerate()
            .filter_map(|(j, o)| o.as_deref().map(|d| (j, d)));
        let restored = reed_solomon_simd::decode(k, n - k, present, recovery)
            .map_err(|e| PrivateError::Coding(e.to_string()))?;
        for (j, d) in restored {
            if j < k {
                originals[j] = Some(d);
            }
        }
    }
    originals
        .into_iter()
        .map(|o| o.ok_or(PrivateError::Open(seg)))
        .collect()
}

/// Re-creates lost shares from any `k` present ones, without the key:
/// `shares[j]` is share `j` (`None` where lost), `outs[j]` receives share
/// `j` where `Some`. Only the size and scheme of `f` are used. Erasure
/// coding is deterministic, so a re-created share is byte for byte the
/// lost one (same root, same ID).
pub fn regenerate(
    f: &SealedFile,
    shares: &mut [Option<&mut dyn Read>],
    outs: &mut [Option<&mut dyn Write>],
) -> Result<(), PrivateError> {
    let (k, n) = (f.scheme.k as usize, f.scheme.n as usize);
    let have = shares.iter().filter(|s| s.is_some()).count();
    if shares.len() != n || outs.len() != n || have < k {
        return Err(PrivateError::TooFewShares { have, need: k });
    }
    let mut buf: Vec<Vec<u8>> = vec![Vec::new(); n];
    for i in 0..segments(f.size) {
        let shard = shard_len(plain_len(f.size, i) + TAG, k);
        let originals = segment_originals(shares, &mut buf, k, shard, i)?;
        let rec = reed_solomon_simd::encode(k, n - k, &originals)
            .map_err(|e| PrivateError::Coding(e.to_string()))?;
        for (j, out) in outs.iter_mut().enumerate() {
            if let Some(w) = out {
                w.write_all(if j < k { &originals[j] } else { &rec[j - k] })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 977) as u8).collect()
    }

    fn seal_vec(d: &[u8], scheme: Scheme) -> (SealedFile, Vec<Vec<u8>>) {
        let mut outs: Vec<Vec<u8>> = vec![Vec::new(); scheme.n as usize];
        let mut ws: Vec<&mut dyn Write> = outs.iter_mut().map(|v| v as &mut dyn Write).collect();
        let f = seal(d, d.len() as u64, scheme, [7; 32], [9; 16], &mut ws).unwrap();
        (f, outs)
    }

    fn open_vec(f: &SealedFile, shares: &[Option<Vec<u8>>]) -> Result<Vec<u8>, PrivateError> {
        let mut readers: Vec<&[u8]> = shares.iter().map(|s| s.as_deref().unwrap_or(&[])).collect();
        let mut rs: Vec<Option<&mut dyn Read>> = readers
            .iter_mut()
            .zip(shares)
            .map(|(r, s)| s.as_ref().map(|_| r as &mut dyn Read))
            .collect();
        let mut out = Vec::new();
        open(f, &mut rs, &mut out)?;
        Ok(out)
    }

    #[test]
    fn regenerated_shares_are_identical() {
        let d = data(2 * SEGMENT + 777);
        let (f, shares) = seal_vec(&d, Scheme::default());
        let mut readers: Vec<&[u8]> = shares.iter().map(|s| s.as_slice()).collect();
        let mut rs: Vec<Option<&mut dyn Read>> = readers
            .iter_mut()
            .enumerate()
            .map(|(j, r)| (j % 2 == 1).then_some(r as &mut dyn Read))
            .collect();
        let mut outs: Vec<Vec<u8>> = vec![Vec::new(); 6];
        let mut ws: Vec<Option<&mut dyn Write>> = outs
            .iter_mut()
            .enumerate()
            .map(|(j, o)| (j % 2 == 0).then_some(o as &mut dyn Write))
            .collect();
        regenerate(&f, &mut rs, &mut ws).unwrap();
        for j in [0, 2, 4] {
            assert!(outs[j] == shares[j], "share {j}");
        }
    }

    #[test]
    fn scheme_parse() {
        assert_eq!("3-of-6".parse::<Scheme>().unwrap(), Scheme { k: 3, n: 6 });
        for bad in ["3of6", "0-of-2", "4-of-4", "5-of-3", "1-of-999", "a-of-b"] {
            assert!(bad.parse::<Scheme>().is_err(), "{bad}");
        }
    }

    #[test]
    fn any_k_of_n_shares_give_the_file_back() {
        let scheme = Scheme::default();
        for size in [
            0,
            1,
            1000,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            2 * SEGMENT + 12345,
        ] {
            let d = data(size);
            let (f, shares) = seal_vec(&d, scheme);
            for s in &shares {
                assert_eq!(s.len() as u64, share_size(size as u64, scheme));
            }
            let by_segment: u64 = (0..segments(size as u64))
                .map(|i| shard_len(plain_len(size as u64, i) + TAG, 3) as u64)
                .sum();
            assert_eq!(by_segment, share_size(size as u64, scheme));
            // Every way of losing three of six (small files), or three
            // of them (big ones, to keep the test quick unoptimised).
            let patterns: Vec<u32> = if size <= SEGMENT {
                (0u32..64).filter(|l| l.count_ones() == 3).collect()
            } else {
                vec![0b000111, 0b111000, 0b101010]
            };
            for lost in patterns {
                let kept: Vec<Option<Vec<u8>>> = shares
                    .iter()
                    .enumerate()
                    .map(|(j, s)| (lost & (1 << j) == 0).then(|| s.clone()))
                    .collect();
                assert_eq!(
                    open_vec(&f, &kept).unwrap(),
                    d,
                    "size {size} lost {lost:06b}"
                );
            }
            // Four lost is too many.
            let few: Vec<Option<Vec<u8>>> = shares
                .iter()
                .enumerate()
                .map(|(j, s)| (j < 2).then(|| s.clone()))
                .collect();
            assert!(matches!(
                open_vec(&f, &few),
                Err(PrivateError::TooFewShares { have: 2, need: 3 })
            ));
        }
    }

    #[test]
    fn shares_hold_no_plaintext_and_tampering_is_caught() {
        let d = b"attack at dawn, attack at dawn, attack at dawn!".repeat(100);
        let (f, shares) = seal_vec(&d, Scheme::default());
        for s in &shares {
            assert!(!s.windows(14).any(|w| w == b"attack at dawn"));
        }
        let mut bad: Vec<Option<Vec<u8>>> = shares.iter().cloned().map(Some).collect();
        bad[1].as_mut().unwrap()[10] ^= 1;
        assert!(matches!(open_vec(&f, &bad), Err(PrivateError::Open(0))));
        let wrong = SealedFile {
            key: [8; 32],
            ..f.clone()
        };
        let all: Vec<Option<Vec<u8>>> = shares.iter().cloned().map(Some).collect();
        assert!(matches!(open_vec(&wrong, &all), Err(PrivateError::Open(0))));
        // A file cut short: its last segment is not marked last.
        let (f2, shares2) = seal_vec(&data(2 * SEGMENT), Scheme::default());
        let short = SealedFile {
            size: SEGMENT as u64,
            ..f2
        };
        let all2: Vec<Option<Vec<u8>>> = shares2.into_iter().map(Some).collect();
        assert!(open_vec(&short, &all2).is_err());
        assert!(!format!("{f:?}").contains("7, 7"));
    }
}
