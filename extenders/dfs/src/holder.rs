//! The holder side of private storage: keeping other owners' shares within
//! a quota.
//!
//! A share is an ordinary content-addressed file (its ID is the ID of a
//! plain file manifest of its bytes), so once held it is served by the
//! normal `GetManifest`/`GetRanges` protocol and announced like any
//! provided file. What is new is `PutShare` (see [`crate::wire`]):
//!
//! 1. the share's size (data plus outboard) is reserved against the quota
//!    in the [`Ledger`] *before* any byte is read (atomic across concurrent
//!    puts; at most [`MAX_PUTS_PER_PEER`] puts and half the quota in flight
//!    at once per peer address, [`MAX_PUTS`] puts in all);
//! 2. the bytes are hashed while they arrive, into a new temporary data
//!    file under `DIR/shares/` and a new temporary outboard;
//! 3. only when the root matches are they renamed into place and recorded
//!    in the store; on any failure both temporaries are removed and the
//!    reservation released, so nothing is left behind.
//!
//! Held shares count against `quota` only (never against the files this
//! node provides publicly). Holders publish a [`HolderRecord`] under
//! `holders/<shard>` in the DHT so owners can find them.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::announce::{MAX_RECORD, SHARDS};
use crate::manifest::{FileManifest, Manifest};
use crate::node::DhtValue;
use crate::store::{create_temp, Store};
use crate::tree;
use crate::wire::{ErrorCode, Response};

/// Share puts in progress at once from one peer address.
pub const MAX_PUTS_PER_PEER: usize = 2;
/// Share puts in progress at once in all.
pub const MAX_PUTS: usize = 16;
/// Slowest a share's bytes may arrive on average (after a minute's grace):
/// a peer trickling bytes cannot hold a reservation for long.
pub const MIN_PUT_RATE: u64 = 16 * 1024;

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The share does not fit in what is left of the quota.
    #[error("quota exceeded")]
    Quota,
    /// Too many puts in progress (from this peer or in all).
    #[error("too many share puts in progress")]
    Busy,
}

impl Refusal {
    /// The wire error code for this refusal.
    pub fn code(self) -> ErrorCode {
        match self {
            Refusal::Quota => ErrorCode::QuotaExceeded,
            Refusal::Busy => ErrorCode::Busy,
        }
    }
}

/// Quota accounting, sans IO: bytes held, bytes reserved by puts in
/// progress, and puts in progress per peer.
#[derive(Debug)]
pub struct Ledger {
    quota: u64,
    used: u64,
    reserved: u64,
    puts: usize,
    /// Puts in progress and bytes they reserved, per peer address.
    per_peer: HashMap<IpAddr, (usize, u64)>,
}

impl Ledger {
    /// A ledger for `quota` bytes of which `used` are already held.
    pub fn new(quota: u64, used: u64) -> Ledger {
        Ledger {
            quota,
            used,
            reserved: 0,
            puts: 0,
            per_peer: HashMap::new(),
        }
    }

    /// Reserves `bytes` for a put from `peer`.
    pub fn reserve(&mut self, peer: IpAddr, bytes: u64) -> Result<(), Refusal> {
        let committed = self.used.saturating_add(self.reserved);
        if committed.saturating_add(bytes) > self.quota {
            return Err(Refusal::Quota);
        }
        let (n, inflight) = self.per_peer.get(&peer).copied().unwrap_or((0, 0));
        // One peer may have at most half the quota in flight (any one share
        // that fits is still taken when it has nothing else in flight).
        let over_half = n > 0 && inflight.saturating_add(bytes) > self.quota / 2;
        if n >= MAX_PUTS_PER_PEER || self.puts >= MAX_PUTS || over_half {
            return Err(Refusal::Busy);
        }
        self.per_peer.insert(peer, (n + 1, inflight + bytes));
        self.puts += 1;
        self.reserved += bytes;
        Ok(())
    }

    fn end(&mut self, peer: IpAddr, bytes: u64) {
        self.reserved = self.reserved.saturating_sub(bytes);
        self.puts = self.puts.saturating_sub(1);
        if let Some((n, inflight)) = self.per_peer.get_mut(&peer) {
            *n = n.saturating_sub(1);
            *inflight = inflight.saturating_sub(bytes);
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    /// A reserved put succeeded: its bytes are now held.
    pub fn commit(&mut self, peer: IpAddr, bytes: u64) {
        self.end(peer, bytes);
        self.used = self.used.saturating_add(bytes);
    }

    /// A reserved put failed: its reservation is returned.
    pub fn release(&mut self, peer: IpAddr, bytes: u64) {
        self.end(peer, bytes);
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes neither held nor reserved.
    pub fn free(&self) -> u64 {
        self.quota.saturating_sub(self.used + self.reserved)
    }
}

/// Quota a share of `size` bytes takes: data and outboard, rounded up to
/// whole 4 KiB blocks and at least one block each (so tiny or empty shares
/// cannot fill the disk with entries at no cost).
pub fn cost(size: u64) -> u64 {
    let block = |n: u64| n.div_ceil(4096).max(1).saturating_mul(4096);
    block(size).saturating_add(block(tree::tree(size).outboard_size()))
}

/// Holder counters, as `qdfs status` shows them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct HolderSnapshot {
    /// Bytes given to others' shares.
    pub quota: u64,
    /// Bytes of it used.
    pub quota_used: u64,
    /// Shares held.
    pub shares_held: u64,
    /// Shares received and kept since start.
    pub shares_stored: u64,
    /// Puts refused (quota or busy).
    pub shares_refused: u64,
    /// Puts whose bytes did not match their root, or broke off.
    pub shares_failed: u64,
}

/// The holder: where shares go and the quota ledger.
#[derive(Debug)]
pub struct Holder {
    dir: PathBuf,
    quota: u64,
    ledger: Mutex<Ledger>,
    /// Shares being received now (a second put of one is refused as busy,
    /// so one share is never counted twice).
    receiving: Mutex<std::collections::HashSet<crate::Id>>,
    held: AtomicU64,
    stored: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

fn io_other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Holder {
    /// Opens the shares area of `store` with `quota` bytes; counts what is
    /// held already and removes temporaries a crash left behind.
    pub fn open(store: &Store, quota: u64) -> io::Result<Holder> {
        let dir = store.dir().join("shares");
        fs::create_dir_all(&dir)?;
        // Outboards of puts a crash interrupted.
        if let Ok(rd) = fs::read_dir(store.dir().join("outboards")) {
            for item in rd.flatten() {
                if item.file_name().to_string_lossy().starts_with(".share.tmp") {
                    let _ = fs::remove_file(item.path());
                }
            }
        }
        let (mut used, mut held) = (0, 0);
        for item in fs::read_dir(&dir)? {
            let item = item?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name.contains(".tmp") {
                let _ = fs::remove_file(item.path());
                continue;
            }
            let meta = item.metadata()?;
            if meta.is_file() {
                used += cost(meta.len());
                held += 1;
            }
        }
        Ok(Holder {
            dir,
            quota,
            ledger: Mutex::new(Ledger::new(quota, used)),
            receiving: Mutex::new(Default::default()),
            held: AtomicU64::new(held),
            stored: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of quota neither used nor reserved.
    pub fn free(&self) -> u64 {
        self.ledger().free()
    }

    /// The counters now.
    pub fn snapshot(&self) -> HolderSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HolderSnapshot {
            quota: self.quota,
            quota_used: self.ledger().used(),
            shares_held: g(&self.held),
            shares_stored: g(&self.stored),
            shares_refused: g(&self.refused),
            shares_failed: g(&self.failed),
        }
    }

    fn share_path(&self, m: &FileManifest) -> PathBuf {
        self.dir.join(Manifest::File(*m).id().to_hex())
    }

    /// Answers one `PutShare`: refuses, or accepts and reads exactly
    /// `m.size` bytes from `input`, keeping them only if they hash to
    /// `m.root`. An `Err` means the connection must close (the stream is
    /// no longer at a frame boundary).
    pub fn receive(
        &self,
        store: &Store,
        input: &mut impl Read,
        out: &mut impl Write,
        m: FileManifest,
        peer: IpAddr,
    ) -> io::Result<()> {
        let id = Manifest::File(m).id();
        let path = self.share_path(&m);
        let bytes = cost(m.size);
        let busy = !self
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
        // Checked after claiming the ID, so a put that just finished is seen.
        if !busy && path.exists() && store.manifest_bytes(&id).ok().flatten().is_some() {
            self.done_receiving(&id);
            out.write_all(&Response::Stored.encode())?;
            return Ok(());
        }
        let reserved = if busy {
            Err(Refusal::Busy)
        } else {
            self.ledger().reserve(peer, bytes)
        };
        if let Err(why) = reserved {
            if !busy {
                self.done_receiving(&id);
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, %id, size = m.size, "share refused: {why}");
            out.write_all(&Response::Error { code: why.code() }.encode())?;
            return Ok(());
        }
        let taken = out
            .write_all(&Response::Accept.encode())
            .and_then(|()| out.flush())
            .and_then(|()| self.take(store, input, &m, &path));
        self.done_receiving(&id);
        match taken {
            Ok(()) => {
                self.ledger().commit(peer, bytes);
                self.held.fetch_add(1, Ordering::Relaxed);
                self.stored.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, %id, size = m.size, "share stored");
                out.write_all(&Response::Stored.encode())
            }
            Err(e) => {
                self.ledger().release(peer, bytes);
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, %id, "share not stored: {e}");
                if e.kind() == io::ErrorKind::InvalidData {
                    let r = Response::Error {
                        code: ErrorCode::BadRequest,
                    };
                    out.write_all(&r.encode())?;
                    out.flush()?;
                }
                Err(e)
            }
        }
    }

    fn done_receiving(&self, id: &crate::Id) {
        self.receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Receives the bytes into temporaries and moves them into place if
    /// they match; on error nothing is left.
    fn take(
        &self,
        store: &Store,
        input: &mut impl Read,
        m: &FileManifest,
        path: &Path,
    ) -> io::Result<()> {
        let (data_tmp, data) = create_temp(path).map_err(io_other)?;
        let (ob_tmp, ob) = match store.temp_outboard("share") {
            Ok(x) => x,
            Err(e) => {
                let _ = fs::remove_file(&data_tmp);
                return Err(io_other(e));
            }
        };
        let result = (|| {
            let budget = Duration::from_secs(60 + m.size / MIN_PUT_RATE);
            let mut tee = Tee {
                inner: input.take(m.size),
                copy: io::BufWriter::with_capacity(1 << 16, &data),
                deadline: Instant::now() + budget,
            };
            let got = tree::hash_stream(&mut tee, m.size, &ob).map_err(io_other)?;
            tee.copy.flush()?;
            drop(tee);
            if got != *m {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "share bytes do not match their root",
                ));
            }
            data.sync_all()?;
            ob.sync_all()?;
            fs::rename(&data_tmp, path)?;
            if let Err(e) = store.finish_file(path, *m, &ob_tmp) {
                let _ = fs::remove_file(path);
                return Err(io_other(e));
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&data_tmp);
            let _ = fs::remove_file(&ob_tmp);
        }
        result
    }
}

/// A reader that copies what it reads to a writer, and gives up after a
/// deadline.
struct Tee<R: Read, W: Write> {
    inner: R,
    copy: W,
    deadline: Instant,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() > self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "share bytes arrive too slowly",
            ));
        }
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// The DHT key holders of shard `shard` publish under.
pub fn holders_key(shard: u8) -> String {
    format!("holders/{shard}")
}

/// A holder's record in the DHT: where it listens and how much quota is
/// free. Like a provider record it holds no address: the holder is its
/// publisher's overlay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HolderRecord {
    /// The port `qdfs serve` listens on.
    pub port: u16,
    /// Free quota in bytes when published.
    pub free: u64,
}

impl HolderRecord {
    /// The value to publish.
    pub fn encode(&self) -> Vec<u8> {
        json!({"v": 1, "port": self.port, "free": self.free})
            .to_string()
            .into_bytes()
    }

    /// Parses a value read from the DHT.
    pub fn parse(data: &[u8]) -> Option<HolderRecord> {
        if data.len() > MAX_RECORD {
            return None;
        }
        let v: Value = serde_json::from_slice(data).ok()?;
        if v.get("v")?.as_u64()? != 1 {
            return None;
        }
        let port = u16::try_from(v.get("port")?.as_u64()?)
            .ok()
            .filter(|p| *p != 0)?;
        let free = v.get("free")?.as_u64()?;
        Some(HolderRecord { port, free })
    }
}

/// Holders named by DHT values (malformed ones skipped), with their free
/// quota.
pub fn holders(values: &[DhtValue]) -> Vec<(SocketAddr, u64)> {
    let mut out: Vec<(SocketAddr, u64)> = values
        .iter()
        .filter_map(|v| {
            let addr: Ipv6Addr = v.publisher.overlay_address();
            let rec = HolderRecord::parse(&v.value)?;
            Some((
                SocketAddr::V6(SocketAddrV6::new(addr, rec.port, 0, 0)),
                rec.free,
            ))
        })
        .collect();
    out.sort();
    // One entry per node (the address is derived from the publisher, so a
    // node publishing several ports under several shards is still one).
    out.dedup_by_key(|x| x.0.ip());
    out
}

/// Every holder shard key.
pub fn all_holder_keys() -> Vec<String> {
    (0..SHARDS).map(holders_key).collect()
}

/// Opens a held share's file, for a test or a status listing.
pub fn open_share(store: &Store, m: &FileManifest) -> io::Result<File> {
    File::open(
        store
            .dir()
            .join("shares")
            .join(Manifest::File(*m).id().to_hex()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_reserves_before_and_releases_on_failure() {
        let a: IpAddr = "::1".parse().unwrap();
        let b: IpAddr = "::2".parse().unwrap();
        let mut l = Ledger::new(100, 10);
        assert_eq!(l.reserve(a, 91), Err(Refusal::Quota));
        assert_eq!(l.reserve(a, 60), Ok(()));
        // Over half the quota in flight from one peer.
        assert_eq!(l.reserve(a, 10), Err(Refusal::Busy));
        l.release(a, 60);
        assert_eq!(l.reserve(a, 40), Ok(()));
        assert_eq!(l.reserve(a, 10), Ok(()));
        // Over the per-peer count, then over the quota with what is reserved.
        assert_eq!(l.reserve(a, 1), Err(Refusal::Busy));
        assert_eq!(l.reserve(b, 41), Err(Refusal::Quota));
        assert_eq!(l.free(), 40);
        l.release(a, 10);
        l.commit(a, 40);
        assert_eq!(l.used(), 50);
        assert_eq!(l.free(), 50);
        assert_eq!(l.reserve(b, 50), Ok(()));
        // Quota 0 holds nothing.
        assert_eq!(Ledger::new(0, 0).reserve(a, 0), Ok(()));
        assert_eq!(Ledger::new(0, 0).reserve(a, 1), Err(Refusal::Quota));
    }

    #[test]
    fn holder_record_round_trip() {
        let r = HolderRecord { port: 7, free: 99 };
        assert_eq!(HolderRecord::parse(&r.encode()), Some(r));
        for bad in [&b"{}"[..], b"{\"v\":1,\"port\":0,\"free\":1}", b"\xff"] {
            assert!(HolderRecord::parse(bad).is_none());
        }
    }

    #[test]
    fn receive_keeps_matching_bytes_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let h = Holder::open(&store, 1 << 20).unwrap();
        let data = vec![5u8; 40_000];
        let m = tree::hash_stream(&data[..], 40_000, io::sink()).unwrap();
        let peer: IpAddr = "::1".parse().unwrap();
        // Wrong bytes: refused, nothing left, reservation returned.
        let mut out = Vec::new();
        let bad = vec![6u8; 40_000];
        assert!(h.receive(&store, &mut &bad[..], &mut out, m, peer).is_err());
        assert_eq!(fs::read_dir(tmp.path().join("shares")).unwrap().count(), 0);
        assert_eq!(h.free(), 1 << 20);
        // Short: likewise.
        assert!(h
            .receive(&store, &mut &data[..100], &mut Vec::new(), m, peer)
            .is_err());
        assert_eq!(fs::read_dir(tmp.path().join("shares")).unwrap().count(), 0);
        // Right bytes: held and served like any file.
        let mut out = Vec::new();
        h.receive(&store, &mut &data[..], &mut out, m, peer)
            .unwrap();
        assert!(out.ends_with(&Response::Stored.encode()));
        let id = Manifest::File(m).id();
        assert!(store.open_file(&id).unwrap().is_some());
        assert_eq!(h.snapshot().shares_held, 1);
        assert_eq!(h.snapshot().quota_used, cost(40_000));
        // Over quota: refused before any byte is read.
        let small = Holder::open(&store, 10).unwrap();
        let m2 = tree::hash_stream(&bad[..], 40_000, io::sink()).unwrap();
        let mut out = Vec::new();
        let mut input: &[u8] = &bad;
        small
            .receive(&store, &mut input, &mut out, m2, peer)
            .unwrap();
        assert_eq!(input.len(), 40_000);
        assert_eq!(
            out,
            Response::Error {
                code: ErrorCode::QuotaExceeded
            }
            .encode()
        );
        // Outboards directory holds no temporaries.
        // A crash's leftovers are removed on the next start.
        fs::write(tmp.path().join("shares/abc.tmp0123"), b"x").unwrap();
        fs::write(tmp.path().join("outboards/.share.tmp0123"), b"x").unwrap();
        let again = Holder::open(&store, 1 << 20).unwrap();
        assert_eq!(again.snapshot().shares_held, 1);
        let obs: Vec<_> = fs::read_dir(tmp.path().join("outboards"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(obs.iter().all(|n| !n.contains(".tmp")), "{obs:?}");
    }
}
