//! The chunk cache: verified pieces of files this node does not provide,
//! on disk under `DATA_DIR/cache/`, bounded in bytes, admitted and evicted
//! by popularity (W-TinyLFU, through [`moka`]).
//!
//! The cache unit is a **piece**: [`PIECE_GROUPS`] consecutive chunk groups
//! (512 KiB) starting at a multiple of [`PIECE_GROUPS`], stored as the
//! BLAKE3 verified stream of exactly that range (bao-tree's encoding: the
//! parent hashes from the root down and the data; about 0.4 % over the
//! data). A request for exactly one piece is answered with those bytes as
//! they are, which is what a provider would send; the stream is checked
//! against the file's root before it is admitted, so only verified data
//! enters the cache.
//!
//! Memory per entry is the key (the file ID and the piece number) and a
//! 16-byte value (a generation number naming the file on disk, and the
//! length) plus moka's own bookkeeping (a few hundred bytes): a 100 GiB
//! cache holds at most 204,800 pieces, some tens of MiB of memory.
//!
//! The bound counts the bytes of the piece files actually on disk: room
//! is reserved before a piece file is written and given back when the
//! listener deletes it, so the total never exceeds the limit; a piece that
//! does not fit even after moka's pending evictions ran is served but not
//! kept. The cache directory is **wiped when the cache opens** (a restart
//! starts cold), so nothing left by an earlier run is uncounted.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use moka::sync::Cache;
use serde::Serialize;

use crate::id::Id;

/// Chunk groups per cache piece (512 KiB of data).
pub const PIECE_GROUPS: u64 = 32;
/// Default cache size when `cache` is not configured.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// One piece of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PieceKey {
    /// The file's manifest ID.
    pub id: Id,
    /// The piece number (groups `piece * PIECE_GROUPS ..`).
    pub piece: u64,
}

/// What the cache keeps in memory for a piece on disk.
#[derive(Debug, Clone, Copy)]
struct Entry {
    generation: u64,
    len: u32,
}

/// Counters, as `qdfs status` shows them.
#[derive(Debug, Default)]
pub struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    admitted: AtomicU64,
    not_kept: AtomicU64,
}

/// A snapshot of the cache's state and counters.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CacheSnapshot {
    /// Bytes of piece files on disk now.
    pub size: u64,
    /// The configured bound.
    pub limit: u64,
    /// Pieces cached now.
    pub entries: u64,
    /// Requests answered from the cache.
    pub hits: u64,
    /// Requests that had to be filled from elsewhere.
    pub misses: u64,
    /// Pieces written to the cache.
    pub admitted: u64,
    /// Pieces filled but not kept (no room even after evicting).
    pub not_kept: u64,
}

/// Why a piece could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CacheError<E: std::error::Error + Send + Sync + 'static> {
    /// Filling it failed.
    #[error("{0}")]
    Fill(Arc<E>),
}

/// Internal: why an insertion did not produce a cache entry.
#[derive(Debug)]
enum Insert<E> {
    Fill(E),
    /// Filled, but there is no room: the bytes are returned to the filler.
    NoRoom,
}

/// The piece cache of one node.
pub struct PieceCache {
    dir: PathBuf,
    limit: u64,
    cache: Option<Cache<PieceKey, Entry>>,
    disk: Arc<AtomicU64>,
    generation: AtomicU64,
    counters: CacheCounters,
}

impl std::fmt::Debug for PieceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceCache")
            .field("dir", &self.dir)
            .field("limit", &self.limit)
            .finish()
    }
}

fn piece_path(dir: &Path, key: &PieceKey, generation: u64) -> PathBuf {
    dir.join(format!("{}.{}.{}", key.id.to_hex(), key.piece, generation))
}

impl PieceCache {
    /// Opens (and empties) the cache in `dir`, bounded to `limit` bytes on
    /// disk; `limit` 0 turns it off (every request is filled, none kept).
    pub fn open(dir: &Path, limit: u64) -> io::Result<PieceCache> {
        match fs::symlink_metadata(dir) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(dir)?,
            // A link or a file in the way: removed, never followed.
            Ok(_) => fs::remove_file(dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let disk = Arc::new(AtomicU64::new(0));
        let cache = if limit == 0 {
            None
        } else {
            fs::create_dir_all(dir)?;
            let (ldir, ldisk) = (dir.to_path_buf(), Arc::clone(&disk));
            Some(
                Cache::builder()
                    .max_capacity(limit)
                    .weigher(|_k: &PieceKey, v: &Entry| v.len)
                    .eviction_listener(move |k: Arc<PieceKey>, v: Entry, _cause| {
                        // Every insertion has its own file name, so this
                        // never deletes a newer copy of the same piece.
                        let p = piece_path(&ldir, &k, v.generation);
                        if let Err(e) = fs::remove_file(&p) {
                            if e.kind() != io::ErrorKind::NotFound {
                                tracing::warn!("cache: removing {}: {e}", p.display());
                                return;
                            }
                        }
                        ldisk.fetch_sub(v.len as u64, Ordering::Relaxed);
                    })
                    .build(),
            )
        };
        Ok(PieceCache {
            dir: dir.into(),
            limit,
            cache,
            disk,
            generation: AtomicU64::new(0),
            counters: CacheCounters::default(),
        })
    }

    /// The state and counters now.
    pub fn snapshot(&self) -> CacheSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheSnapshot {
            size: g(&self.disk),
            limit: self.limit,
            entries: self.cache.as_ref().map_or(0, |c| c.entry_count()),
            hits: g(&self.counters.hits),
            misses: g(&self.counters.misses),
            admitted: g(&self.counters.admitted),
            not_kept: g(&self.counters.not_kept),
        }
    }

    /// Whether `key` is cached now (does not count as an access).
    pub fn contains(&self, key: &PieceKey) -> bool {
        self.cache.as_ref().is_some_and(|c| c.contains_key(key))
    }

    /// The piece's bytes from the cache, or from `fill` (which must return
    /// only verified bytes), then kept if the policy admits it and there is
    /// room. Concurrent calls for the same piece wait for one `fill`.
    pub fn get_or_fill<E, F>(&self, key: PieceKey, fill: F) -> Result<Vec<u8>, CacheError<E>>
    where
        E: std::error::Error + Send + Sync + 'static,
        F: Fn() -> Result<Vec<u8>, E>,
    {
        let Some(cache) = &self.cache else {
            bump(&self.counters.misses);
            return fill().map_err(|e| CacheError::Fill(Arc::new(e)));
        };
        if let Some(e) = cache.get(&key) {
            if let Ok(b) = self.read(&key, e) {
                bump(&self.counters.hits);
                return Ok(b);
            }
            cache.invalidate(&key);
        }
        bump(&self.counters.misses);
        // The filling caller keeps its bytes here; callers that waited for
        // it read them from disk.
        let mine: Mutex<Option<Vec<u8>>> = Mutex::new(None);
        let r = cache.try_get_with(key, || -> Result<Entry, Insert<E>> {
            let bytes = fill().map_err(Insert::Fill)?;
            let entry = self.write(&key, &bytes);
            *mine.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
            entry.ok_or(Insert::NoRoom)
        });
        // Deleting evicted files now keeps the disk under the bound.
        cache.run_pending_tasks();
        if let Some(b) = mine.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Ok(b);
        }
        match r {
            Ok(e) => match self.read(&key, e) {
                Ok(b) => Ok(b),
                // Not admitted, or evicted already: fill without the cache.
                Err(_) => fill().map_err(|e| CacheError::Fill(Arc::new(e))),
            },
            Err(e) => match Arc::try_unwrap(e) {
                Ok(Insert::Fill(e)) => Err(CacheError::Fill(Arc::new(e))),
                Ok(Insert::NoRoom) | Err(_) => fill().map_err(|e| CacheError::Fill(Arc::new(e))),
            },
        }
    }

    fn read(&self, key: &PieceKey, e: Entry) -> io::Result<Vec<u8>> {
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(piece_path(&self.dir, key, e.generation))?;
        let mut b = Vec::with_capacity(e.len as usize);
        (&mut f).take(e.len as u64 + 1).read_to_end(&mut b)?;
        if b.len() != e.len as usize {
            return Err(io::Error::other("cached piece changed on disk"));
        }
        Ok(b)
    }

    /// Reserves room and writes a piece file; `None` (nothing on disk) if
    /// there is no room or the write fails.
    fn write(&self, key: &PieceKey, bytes: &[u8]) -> Option<Entry> {
        let len = u32::try_from(bytes.len()).ok()?;
        if !self.reserve(len as u64) {
            if let Some(c) = &self.cache {
                c.run_pending_tasks();
            }
            if !self.reserve(len as u64) {
                bump(&self.counters.not_kept);
                return None;
            }
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let path = piece_path(&self.dir, key, generation);
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .and_then(|mut f| f.write_all(bytes));
        if let Err(e) = written {
            tracing::warn!("cache: writing {}: {e}", path.display());
            let _ = fs::remove_file(&path);
            self.disk.fetch_sub(len as u64, Ordering::Relaxed);
            bump(&self.counters.not_kept);
            return None;
        }
        bump(&self.counters.admitted);
        Some(Entry { generation, len })
    }

    fn reserve(&self, n: u64) -> bool {
        self.disk
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                d.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Parses a size like `268435456`, `"256 MiB"`, `"10 GiB"`, `"500 MB"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("no")]
    struct No;

    fn key(piece: u64) -> PieceKey {
        PieceKey {
            id: Id([7; 32]),
            piece,
        }
    }

    fn disk_bytes(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn hits_misses_and_the_bound() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("left-over"), [0u8; 5000]).unwrap();
        let c = PieceCache::open(&dir, 10_000).unwrap();
        // Wiped on open.
        assert_eq!(disk_bytes(&dir), 0);
        let fills = AtomicU64::new(0);
        let fill = |n: u8| {
            let fills = &fills;
            move || -> Result<Vec<u8>, No> {
                fills.fetch_add(1, Ordering::Relaxed);
                Ok(vec![n; 3000])
            }
        };
        assert_eq!(c.get_or_fill(key(1), fill(1)).unwrap(), vec![1; 3000]);
        assert_eq!(c.get_or_fill(key(1), fill(1)).unwrap(), vec![1; 3000]);
        assert_eq!(fills.load(Ordering::Relaxed), 1);
        let s = c.snapshot();
        assert_eq!((s.hits, s.misses, s.size), (1, 1, 3000));
        // Many more pieces than fit: the disk never holds more than the
        // limit, and what is on disk is what the cache counts.
        for p in 2..40 {
            let b = c.get_or_fill(key(p), fill(p as u8)).unwrap();
            assert_eq!(b, vec![p as u8; 3000]);
            let on_disk = disk_bytes(&dir);
            assert!(on_disk <= 10_000, "{on_disk}");
            assert_eq!(on_disk, c.snapshot().size);
        }
        // A failing fill is an error and caches nothing.
        assert!(c
            .get_or_fill(key(99), || -> Result<Vec<u8>, No> { Err(No) })
            .is_err());
        assert!(!c.contains(&key(99)));
    }

    #[test]
    fn popular_pieces_stay() {
        let t = tempfile::tempdir().unwrap();
        let c = PieceCache::open(&t.path().join("c"), 10 * 1000).unwrap();
        let fill = || -> Result<Vec<u8>, No> { Ok(vec![0; 1000]) };
        // Piece 0 is asked for often; a scan of one-off pieces follows.
        for _ in 0..20 {
            c.get_or_fill(key(0), fill).unwrap();
        }
        for p in 1..200 {
            c.get_or_fill(key(p), fill).unwrap();
        }
        assert!(c.contains(&key(0)));
        let before = c.snapshot().hits;
        c.get_or_fill(key(0), fill).unwrap();
        assert_eq!(c.snapshot().hits, before + 1);
    }

    #[test]
    fn off_keeps_nothing() {
        let t = tempfile::tempdir().unwrap();
        let c = PieceCache::open(&t.path().join("c"), 0).unwrap();
        let fill = || -> Result<Vec<u8>, No> { Ok(vec![1; 10]) };
        c.get_or_fill(key(0), fill).unwrap();
        c.get_or_fill(key(0), fill).unwrap();
        assert_eq!(c.snapshot().misses, 2);
        assert!(!t.path().join("c").exists());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10 GiB"), Some(10 << 30));
        assert_eq!(parse_size("256MiB"), Some(256 << 20));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("5 MB"), Some(5_000_000));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("1 XB"), None);
        assert_eq!(parse_size("99999999999 TiB"), None);
    }
}
