//! Read capabilities for privately stored files, sans IO.
//!
//! A capability is everything needed to read exactly one sealed file and
//! nothing else: its key and nonce prefix, its scheme and size, the root of
//! each of its `n` shares (with the share size this gives each share's
//! manifest, so its ID), and hints of which holders had each share when it
//! was written. Holders change after a repair but share IDs do not (a
//! repaired share is byte for byte the lost one), so an old capability
//! still finds the shares through the DHT's provider records.
//!
//! Binary form (integers big-endian), at most [`MAX_CAP`] bytes:
//!
//! ```text
//! version u8 = 1 | key [32] | prefix [16] | k u16 | n u16 | size u64
//! n × ( root [32] | hints u8 | hints × (4 | ipv4 [4] | port u16  or  6 | ipv6 [16] | port u16) )
//! ```
//! Text form: `qdfs:cap:` and the binary form in unpadded base64url.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use base64::Engine;

use crate::id::Id;
use crate::manifest::{FileManifest, Manifest, MAX_FILE_SIZE};
use crate::private::{share_size, Scheme, SealedFile};

/// Longest capability in binary form.
pub const MAX_CAP: usize = 32 * 1024;
/// Most holder hints kept per share.
pub const MAX_HINTS: usize = 8;
/// Text prefix.
pub const PREFIX: &str = "qdfs:cap:";
const VERSION: u8 = 1;

/// One share of a sealed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRef {
    /// The BLAKE3 root of the share's bytes.
    pub root: [u8; 32],
    /// Holders that had it (hints; the DHT is asked too).
    pub hints: Vec<SocketAddr>,
}

/// A read capability for one sealed file.
#[derive(Clone, PartialEq, Eq)]
pub struct Capability {
    /// Key, prefix, scheme and size.
    pub file: SealedFile,
    /// Its `n` shares, in share order.
    pub shares: Vec<ShareRef>,
}

impl std::fmt::Debug for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Capability")
            .field("file", &self.file)
            .field("shares", &self.shares)
            .finish()
    }
}

/// Why bytes or text are not a capability.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    /// Not `qdfs:cap:` and base64url.
    #[error("not a capability (qdfs:cap:...)")]
    NotACap,
    /// Too long, too short, or trailing bytes.
    #[error("capability has the wrong length")]
    BadLength,
    /// A version this build does not read.
    #[error("capability version {0} is not supported")]
    Version(u8),
    /// A bad scheme, size, hint count or address family.
    #[error("capability field {0} is invalid")]
    Field(&'static str),
}

impl Capability {
    /// The manifest of share `j` (its ID is what holders serve it under).
    pub fn share_manifest(&self, j: usize) -> Option<FileManifest> {
        let s = self.shares.get(j)?;
        Some(FileManifest {
            size: share_size(self.file.size, self.file.scheme),
            root: s.root,
        })
    }

    /// The ID of share `j`.
    pub fn share_id(&self, j: usize) -> Option<Id> {
        self.share_manifest(j).map(|m| Manifest::File(m).id())
    }

    /// A short public name for the file: the hash of its shares' roots
    /// (says nothing about the key).
    pub fn name(&self) -> String {
        let mut h = blake3::Hasher::new();
        for s in &self.shares {
            h.update(&s.root);
        }
        h.finalize().to_hex()[..16].to_string()
    }

    /// The binary form.
    pub fn encode(&self) -> Vec<u8> {
        let f = &self.file;
        let mut b = vec![VERSION];
        b.extend_from_slice(&f.key);
        b.extend_from_slice(&f.prefix);
        b.extend_from_slice(&f.scheme.k.to_be_bytes());
        b.extend_from_slice(&f.scheme.n.to_be_bytes());
        b.extend_from_slice(&f.size.to_be_bytes());
        for s in &self.shares {
            b.extend_from_slice(&s.root);
            let hints = &s.hints[..s.hints.len().min(MAX_HINTS)];
            b.push(hints.len() as u8);
            for h in hints {
                match h.ip() {
                    IpAddr::V4(a) => {
                        b.push(4);
                        b.extend_from_slice(&a.octets());
                    }
                    IpAddr::V6(a) => {
                        b.push(6);
                        b.extend_from_slice(&a.octets());
                    }
                }
                b.extend_from_slice(&h.port().to_be_bytes());
            }
        }
        b
    }

    /// Parses the binary form.
    pub fn parse(data: &[u8]) -> Result<Capability, CapError> {
        if data.len() > MAX_CAP {
            return Err(CapError::BadLength);
        }
        let mut r = Reader(data);
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(CapError::Version(version));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(r.take(32)?);
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(r.take(16)?);
        let k = r.u16()?;
        let n = r.u16()?;
        let scheme: Scheme = format!("{k}-of-{n}")
            .parse()
            .map_err(|_| CapError::Field("scheme"))?;
        let size = r.u64()?;
        if size > MAX_FILE_SIZE {
            return Err(CapError::Field("size"));
        }
        let mut shares = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut root = [0u8; 32];
            root.copy_from_slice(r.take(32)?);
            let count = r.take(1)?[0] as usize;
            if count > MAX_HINTS {
                return Err(CapError::Field("hints"));
            }
            let mut hints = Vec::with_capacity(count);
            for _ in 0..count {
                let ip = match r.take(1)?[0] {
                    4 => {
                        let mut a = [0u8; 4];
                        a.copy_from_slice(r.take(4)?);
                        IpAddr::V4(Ipv4Addr::from(a))
                    }
                    6 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(r.take(16)?);
                        IpAddr::V6(Ipv6Addr::from(a))
                    }
                    _ => return Err(CapError::Field("address family")),
                };
                hints.push(SocketAddr::new(ip, r.u16()?));
            }
            shares.push(ShareRef { root, hints });
        }
        if !r.0.is_empty() {
            return Err(CapError::BadLength);
        }
        Ok(Capability {
            file: SealedFile {
                key,
                prefix,
                scheme,
                size,
            },
            shares,
        })
    }

    /// The text form, `qdfs:cap:...`.
    pub fn to_text(&self) -> String {
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.encode())
        )
    }
}

impl FromStr for Capability {
    type Err = CapError;
    fn from_str(s: &str) -> Result<Capability, CapError> {
        let b = s.trim().strip_prefix(PREFIX).ok_or(CapError::NotACap)?;
        if b.len() > MAX_CAP * 2 {
            return Err(CapError::BadLength);
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b)
            .map_err(|_| CapError::NotACap)?;
        Capability::parse(&bytes)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CapError> {
        if self.0.len() < n {
            return Err(CapError::BadLength);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, CapError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, CapError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Capability {
        Capability {
            file: SealedFile {
                key: [0xab; 32],
                prefix: [2; 16],
                scheme: Scheme::default(),
                size: 5000,
            },
            shares: (0..6)
                .map(|j| ShareRef {
                    root: [j as u8; 32],
                    hints: vec![
                        format!("127.0.0.1:{}", 1000 + j).parse().unwrap(),
                        "[fc00::1]:7400".parse().unwrap(),
                    ],
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let c = sample();
        let t = c.to_text();
        assert!(t.starts_with(PREFIX));
        assert_eq!(t.parse::<Capability>().unwrap(), c);
        assert!(!format!("{c:?}").contains("171"));
        let b = c.encode();
        for cut in 0..b.len() {
            assert!(Capability::parse(&b[..cut]).is_err());
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(Capability::parse(&long), Err(CapError::BadLength));
        let mut v2 = b.clone();
        v2[0] = 2;
        assert_eq!(Capability::parse(&v2), Err(CapError::Version(2)));
        let mut bad_scheme = b.clone();
        bad_scheme[49..53].copy_from_slice(&[0, 6, 0, 3]);
        assert!(Capability::parse(&bad_scheme).is_err());
        assert!("qdfs:cap:!!".parse::<Capability>().is_err());
        assert!("cap".parse::<Capability>().is_err());
        assert_ne!(c.share_id(0), c.share_id(1));
        assert_eq!(c.share_id(6), None);
        // The largest size a capability may claim costs no time.
        let mut huge = c.clone();
        huge.file.size = MAX_FILE_SIZE;
        let t = std::time::Instant::now();
        let parsed = Capability::parse(&huge.encode()).unwrap();
        assert!(parsed.share_manifest(0).unwrap().size > MAX_FILE_SIZE / 3);
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = [
            sample().encode(),
            sample().to_text().into_bytes(),
            crate::holder::HolderRecord { port: 1, free: 2 }.encode(),
        ];
        for i in 0..20_000 {
            let mut b = seeds[i % seeds.len()].clone();
            for _ in 0..=(next() % 3) {
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
            }
            b.truncate((next() as usize) % (b.len() + 1));
            crate::fuzzing::fuzz_capability(&b);
            crate::fuzzing::fuzz_private_records(&b);
        }
    }
}
