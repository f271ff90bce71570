//! Serving files this node does not provide: from the chunk cache
//! ([`crate::cache`]), else from providers upstream, verified, kept in the
//! cache and served. `role = "cache-gateway"` answers `GetManifest` and
//! `GetRanges` for any ID this way ([`crate::server`] asks here when its
//! store has nothing); the HTTP gateway ([`crate::http`]) reads files
//! through it whatever the role.
//!
//! Design: a gateway holds no outboard of a cached file. Its cache unit is
//! the verified stream of one aligned piece ([`PIECE_GROUPS`] groups) as a
//! provider encodes it, so a request for exactly one aligned piece (what
//! clients configured with `gateways` ask for) is answered from the cache
//! byte for byte, and each piece crosses the upstream once however many
//! clients ask, concurrent misses included (one fill per piece). Any other
//! request (unaligned, several pieces: a client resuming mid-piece, or
//! one that does not know the gateway) is fetched from upstream as asked,
//! verified, and passed on without being cached. Manifests are kept in
//! memory (16 MiB by size, LRU-ish through moka).
//!
//! Everything from upstream is hostile until checked: a manifest must hash
//! to its ID; a ranges answer must have the exact length computed here
//! (at most 4 MiB of data plus the tree) and every group must verify
//! against the file's root before any of it is cached or sent on.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bao_tree::io::sync::DecodeResponseIter;
use bao_tree::io::BaoContentItem;
use moka::sync::Cache;
use serde::Serialize;

use crate::cache::{CacheError, CacheSnapshot, PieceCache, PieceKey, PIECE_GROUPS};
use crate::id::Id;
use crate::manifest::{FileManifest, Manifest, GROUP_BYTES};
use crate::store::Store;
use crate::tree;
use crate::wire::{
    read_frame, ErrorCode, GroupRanges, Request, Response, MAX_RESPONSE_FRAME, PROTOCOL_VERSION,
};

/// Finds providers of an ID (the node's DHT, in `qdfs serve`).
pub type Lookup = Box<dyn Fn(&Id) -> Vec<SocketAddr> + Send + Sync>;

/// Idle upstream connections kept for reuse.
const POOL: usize = 16;
/// Bytes of manifests kept in memory.
const MANIFEST_CACHE_BYTES: u64 = 16 << 20;

/// Why something could not be served from here.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Not in the store, and no provider upstream has it.
    #[error("not found")]
    NotFound,
    /// The request does not fit the file.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Every provider upstream failed.
    #[error("upstream: {0}")]
    Upstream(String),
    /// Local data could not be read.
    #[error("local: {0}")]
    Local(String),
}

impl GatewayError {
    /// The wire error code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            GatewayError::NotFound => ErrorCode::NotFound,
            GatewayError::BadRequest(_) => ErrorCode::BadRequest,
            GatewayError::Upstream(_) | GatewayError::Local(_) => ErrorCode::Unavailable,
        }
    }
}

/// Counters of the gateway's upstream and what it served.
#[derive(Debug, Default)]
struct Counters {
    upstream_bytes: AtomicU64,
    upstream_groups: AtomicU64,
    upstream_failures: AtomicU64,
    served_groups: AtomicU64,
    served_bytes: AtomicU64,
    passed_through: AtomicU64,
}

/// The gateway's state for `qdfs status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GatewaySnapshot {
    /// The chunk cache.
    pub cache: CacheSnapshot,
    /// Verified-stream bytes fetched from upstream.
    pub upstream_bytes: u64,
    /// Chunk groups fetched from upstream.
    pub upstream_groups: u64,
    /// Upstream requests that failed (the next provider was asked).
    pub upstream_failures: u64,
    /// Chunk groups served for IDs not in the store.
    pub served_groups: u64,
    /// Bytes of verified stream served for IDs not in the store.
    pub served_bytes: u64,
    /// Requests served without the cache (not one aligned piece).
    pub passed_through: u64,
}

/// One connection to a provider upstream.
struct UpConn {
    addr: SocketAddr,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl UpConn {
    fn open(addr: SocketAddr) -> io::Result<UpConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        let reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
        let mut c = UpConn {
            addr,
            stream,
            reader,
        };
        c.send(&Request::Hello {
            version: PROTOCOL_VERSION,
        })?;
        match c.recv()? {
            Response::Hello { version } if version == PROTOCOL_VERSION => Ok(c),
            _ => Err(io::Error::other("no hello")),
        }
    }

    fn send(&mut self, r: &Request) -> io::Result<()> {
        self.stream.write_all(&r.encode())
    }

    fn recv(&mut self) -> io::Result<Response> {
        let body = read_frame(&mut self.reader, MAX_RESPONSE_FRAME)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Response::parse(&body).map_err(|e| io::Error::other(e.to_string()))
    }
}

/// Checks a verified stream of `groups` of file `m` against its root,
/// handing each verified group's bytes and offset to `sink`. The stream
/// must hold exactly those groups and nothing more.
pub fn decode(
    m: &FileManifest,
    groups: &[Range<u64>],
    bytes: &[u8],
    mut sink: impl FnMut(u64, &[u8]),
) -> Result<(), &'static str> {
    if bytes.len() as u64 != tree::encoded_len(m.size, groups) {
        return Err("wrong length");
    }
    let want: u64 = groups
        .iter()
        .flat_map(|r| r.clone())
        .map(|g| tree::group_len(m.size, g))
        .sum();
    let root = blake3::Hash::from_bytes(m.root);
    let ranges = tree::chunk_ranges(groups);
    let mut got = 0u64;
    for item in DecodeResponseIter::new(root, tree::tree(m.size), bytes, &ranges) {
        match item {
            Ok(BaoContentItem::Parent(_)) => {}
            Ok(BaoContentItem::Leaf(leaf)) => {
                let g = leaf.offset / GROUP_BYTES;
                if leaf.offset % GROUP_BYTES != 0
                    || leaf.data.len() as u64 != tree::group_len(m.size, g)
                {
                    return Err("leaf not a whole chunk group");
                }
                got += leaf.data.len() as u64;
                sink(leaf.offset, &leaf.data);
            }
            Err(_) => return Err("failed verification"),
        }
    }
    if got != want {
        return Err("groups missing");
    }
    Ok(())
}

/// The aligned piece `k` of a file of `size` bytes, as a group range.
pub fn piece_range(size: u64, k: u64) -> Range<u64> {
    let n = tree::group_count(size);
    let at = |k: u64| k.saturating_mul(PIECE_GROUPS).min(n);
    at(k)..at(k.saturating_add(1))
}

/// The piece `groups` is exactly, if it is one aligned piece.
fn as_piece(size: u64, groups: &GroupRanges) -> Option<u64> {
    match groups.ranges() {
        [r] if r.start % PIECE_GROUPS == 0 => {
            let k = r.start / PIECE_GROUPS;
            (piece_range(size, k) == *r).then_some(k)
        }
        _ => None,
    }
}

/// The store, the cache and the way upstream.
pub struct Gateway {
    store: Store,
    cache: PieceCache,
    manifests: Cache<Id, Arc<Vec<u8>>>,
    upstream: Vec<SocketAddr>,
    lookup: Option<Lookup>,
    found: Cache<Id, Arc<Vec<SocketAddr>>>,
    /// IDs a lookup found no provider for, remembered briefly.
    missing: Cache<Id, ()>,
    /// DHT lookups running now (each costs the node a search).
    lookups: std::sync::atomic::AtomicUsize,
    pool: Mutex<Vec<UpConn>>,
    counters: Counters,
}

/// Most DHT lookups a gateway runs at once: requests for unknown IDs
/// beyond that get the configured upstream only.
const MAX_LOOKUPS: usize = 4;

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("cache", &self.cache)
            .field("upstream", &self.upstream)
            .finish()
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Gateway {
    /// A gateway over `store` and `cache`, asking `upstream` (and, if
    /// given, the providers `lookup` finds) for what neither has.
    pub fn new(
        store: Store,
        cache: PieceCache,
        upstream: Vec<SocketAddr>,
        lookup: Option<Lookup>,
    ) -> Gateway {
        Gateway {
            store,
            cache,
            manifests: Cache::builder()
                .max_capacity(MANIFEST_CACHE_BYTES)
                .weigher(|_: &Id, v: &Arc<Vec<u8>>| v.len().try_into().unwrap_or(u32::MAX))
                .build(),
            upstream,
            lookup,
            found: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            missing: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(10))
                .build(),
            lookups: std::sync::atomic::AtomicUsize::new(0),
            pool: Mutex::new(Vec::new()),
            counters: Counters::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// State and counters now.
    pub fn snapshot(&self) -> GatewaySnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        GatewaySnapshot {
            cache: self.cache.snapshot(),
            upstream_bytes: g(&c.upstream_bytes),
            upstream_groups: g(&c.upstream_groups),
            upstream_failures: g(&c.upstream_failures),
            served_groups: g(&c.served_groups),
            served_bytes: g(&c.served_bytes),
            passed_through: g(&c.passed_through),
        }
    }

    fn providers(&self, id: &Id) -> Vec<SocketAddr> {
        let mut out = self.upstream.clone();
        if let Some(lookup) = &self.lookup {
            // An empty answer is remembered for 10 s only (the provider's
            // record may be seconds from landing in the DHT), and at most
            // MAX_LOOKUPS run at once: IDs nobody provides must not turn
            // into a stream of DHT searches.
            let found = match self.found.get(id) {
                Some(f) => f,
                None if self.missing.contains_key(id) => Arc::new(Vec::new()),
                None => {
                    use std::sync::atomic::Ordering::SeqCst;
                    if self.lookups.fetch_add(1, SeqCst) >= MAX_LOOKUPS {
                        self.lookups.fetch_sub(1, SeqCst);
                        return out;
                    }
                    let f = Arc::new(lookup(id));
                    self.lookups.fetch_sub(1, SeqCst);
                    if f.is_empty() {
                        self.missing.insert(*id, ());
                    } else {
                        self.found.insert(*id, Arc::clone(&f));
                    }
                    f
                }
            };
            for p in found.iter() {
                if !out.contains(p) {
                    out.push(*p);
                }
            }
        }
        out
    }

    fn conn(&self, addr: SocketAddr) -> io::Result<UpConn> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pool.iter().position(|c| c.addr == addr) {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        UpConn::open(addr)
    }

    fn give_back(&self, c: UpConn) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() >= POOL {
            pool.remove(0);
        }
        pool.push(c);
    }

    /// A manifest's bytes: the store's, else the cache's, else upstream's
    /// (checked against the ID).
    pub fn manifest_bytes(&self, id: &Id) -> Result<Arc<Vec<u8>>, GatewayError> {
        match self.store.manifest_bytes(id) {
            Ok(Some(b)) => return Ok(Arc::new(b)),
            Ok(None) => {}
            Err(e) => return Err(GatewayError::Local(e.to_string())),
        }
        if let Some(b) = self.manifests.get(id) {
            return Ok(b);
        }
        let mut last = GatewayError::NotFound;
        for addr in self.providers(id) {
            let attempt = || -> io::Result<Option<Vec<u8>>> {
                let mut c = self.conn(addr)?;
                c.send(&Request::GetManifest { id: *id })?;
                let r = match c.recv()? {
                    Response::Manifest { bytes }
                        if Id::of_manifest(&bytes) == *id && Manifest::parse(&bytes).is_ok() =>
                    {
                        Some(bytes)
                    }
                    Response::Error {
                        code: ErrorCode::NotFound,
                    } => None,
                    _ => return Err(io::Error::other("bad manifest answer")),
                };
                self.give_back(c);
                Ok(r)
            };
            match attempt() {
                Ok(Some(b)) => {
                    let b = Arc::new(b);
                    self.manifests.insert(*id, Arc::clone(&b));
                    return Ok(b);
                }
                Ok(None) => {}
                Err(e) => {
                    bump(&self.counters.upstream_failures, 1);
                    tracing::debug!(%addr, %id, "upstream manifest: {e}");
                    last = GatewayError::Upstream(format!("{addr}: {e}"));
                }
            }
        }
        Err(last)
    }

    /// A parsed manifest (store, cache or upstream).
    pub fn manifest(&self, id: &Id) -> Result<Manifest, GatewayError> {
        let b = self.manifest_bytes(id)?;
        Manifest::parse(&b).map_err(|e| GatewayError::Local(e.to_string()))
    }

    /// The verified stream of `groups` of file `id` fetched from upstream
    /// (the first provider that delivers a stream that verifies).
    fn fetch_upstream(
        &self,
        id: &Id,
        m: &FileManifest,
        groups: &[Range<u64>],
    ) -> Result<Vec<u8>, GatewayError> {
        let ranges =
            GroupRanges::new(groups.to_vec()).map_err(|_| GatewayError::BadRequest("ranges"))?;
        let expected = tree::encoded_len(m.size, groups);
        let mut last = GatewayError::NotFound;
        for addr in self.providers(id) {
            let attempt = || -> io::Result<Option<Vec<u8>>> {
                let mut c = self.conn(addr)?;
                c.send(&Request::GetRanges {
                    id: *id,
                    groups: ranges.clone(),
                })?;
                match c.recv()? {
                    Response::Ranges { encoded_len } if encoded_len == expected => {}
                    Response::Error {
                        code: ErrorCode::NotFound,
                    } => {
                        self.give_back(c);
                        return Ok(None);
                    }
                    _ => return Err(io::Error::other("bad ranges answer")),
                }
                // `expected` is computed here: at most 4 MiB of data
                // plus the tree above it.
                let mut b = vec![0u8; expected as usize];
                c.reader.read_exact(&mut b)?;
                decode(m, groups, &b, |_, _| {}).map_err(io::Error::other)?;
                self.give_back(c);
                Ok(Some(b))
            };
            match attempt() {
                Ok(Some(b)) => {
                    bump(&self.counters.upstream_bytes, b.len() as u64);
                    bump(
                        &self.counters.upstream_groups,
                        groups.iter().map(|r| r.end - r.start).sum(),
                    );
                    return Ok(b);
                }
                Ok(None) => {}
                Err(e) => {
                    bump(&self.counters.upstream_failures, 1);
                    tracing::debug!(%addr, %id, "upstream ranges: {e}");
                    last = GatewayError::Upstream(format!("{addr}: {e}"));
                }
            }
        }
        Err(last)
    }

    /// The verified stream of aligned piece `k` of file `id`: encoded from
    /// the store if it provides the file, else from the cache, else
    /// fetched upstream (and offered to the cache).
    pub fn piece(&self, id: &Id, m: &FileManifest, k: u64) -> Result<Vec<u8>, GatewayError> {
        let r = piece_range(m.size, k);
        if r.is_empty() {
            return Err(GatewayError::BadRequest("no such piece"));
        }
        if let Some(b) = self.encode_from_store(id, &r)? {
            return Ok(b);
        }
        let key = PieceKey { id: *id, piece: k };
        self.cache
            .get_or_fill(key, || self.fetch_upstream(id, m, std::slice::from_ref(&r)))
            .map_err(|CacheError::Fill(e)| match &*e {
                GatewayError::NotFound => GatewayError::NotFound,
                other => GatewayError::Upstream(other.to_string()),
            })
    }

    fn encode_from_store(&self, id: &Id, r: &Range<u64>) -> Result<Option<Vec<u8>>, GatewayError> {
        let f = match self.store.open_file(id) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(e) => return Err(GatewayError::Local(e.to_string())),
        };
        let mut out = Vec::new();
        let ranges = tree::chunk_ranges(std::slice::from_ref(r));
        bao_tree::io::sync::encode_ranges_validated(&f.data, &f.outboard, &ranges, &mut out)
            .map_err(|e| GatewayError::Local(e.to_string()))?;
        Ok(Some(out))
    }

    /// The verified bytes of aligned piece `k` (data only).
    pub fn piece_data(&self, id: &Id, m: &FileManifest, k: u64) -> Result<Vec<u8>, GatewayError> {
        let r = piece_range(m.size, k);
        let blob = self.piece(id, m, k)?;
        let start = r.start * GROUP_BYTES;
        let len = (r.end * GROUP_BYTES).min(m.size) - start;
        let mut data = vec![0u8; len as usize];
        decode(m, std::slice::from_ref(&r), &blob, |off, d| {
            // Leaves are within the piece (the decoder yields only the
            // ranges asked for); checked all the same, never a panic.
            let at = off.saturating_sub(start) as usize;
            if let Some(dst) = data.get_mut(at..at + d.len()) {
                dst.copy_from_slice(d);
            }
        })
        .map_err(|e| GatewayError::Local(format!("piece {k}: {e}")))?;
        Ok(data)
    }

    /// Answers a `GetManifest` for an ID the store does not have.
    pub fn manifest_response(&self, id: &Id) -> Response {
        match self.manifest_bytes(id) {
            Ok(b) => Response::Manifest {
                bytes: b.as_ref().clone(),
            },
            Err(e) => Response::Error { code: e.code() },
        }
    }

    /// Answers a `GetRanges` for an ID the store does not have: one aligned
    /// piece from the cache (or upstream, then cached), anything else
    /// straight from upstream, always verified here first.
    pub fn serve_ranges(
        &self,
        out: &mut impl Write,
        id: &Id,
        groups: &GroupRanges,
    ) -> io::Result<()> {
        let answer = (|| {
            let Manifest::File(m) = self.manifest(id)? else {
                return Err(GatewayError::BadRequest("a folder has no ranges"));
            };
            if groups.end() > tree::group_count(m.size) {
                return Err(GatewayError::BadRequest("past the end"));
            }
            match as_piece(m.size, groups) {
                Some(k) => self.piece(id, &m, k),
                None => {
                    bump(&self.counters.passed_through, 1);
                    self.fetch_upstream(id, &m, groups.ranges())
                }
            }
        })();
        match answer {
            Ok(b) => {
                out.write_all(
                    &Response::Ranges {
                        encoded_len: b.len() as u64,
                    }
                    .encode(),
                )?;
                out.write_all(&b)?;
                bump(&self.counters.served_groups, groups.groups());
                bump(&self.counters.served_bytes, b.len() as u64);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(%id, "gateway: {e}");
                out.write_all(&Response::Error { code: e.code() }.encode())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn pieces_and_decoding() {
        let size = 40 * GROUP_BYTES + 100;
        assert_eq!(piece_range(size, 0), 0..32);
        assert_eq!(piece_range(size, 1), 32..41);
        assert!(piece_range(size, 2).is_empty());
        let g = |v: Vec<Range<u64>>| GroupRanges::new(v).unwrap();
        assert_eq!(as_piece(size, &g(vec![0..32])), Some(0));
        assert_eq!(as_piece(size, &g(vec![32..41])), Some(1));
        assert_eq!(as_piece(size, &g(vec![32..40])), None);
        assert_eq!(as_piece(size, &g(vec![1..32])), None);
        assert_eq!(as_piece(size, &g(vec![0..1, 2..32])), None);

        let data: Vec<u8> = (0..size).map(|i| (i * 31 / 7) as u8).collect();
        let mut ob = Vec::new();
        let m = tree::hash_stream(&data[..], size, &mut ob).unwrap();
        let outboard = bao_tree::io::outboard::PostOrderMemOutboard {
            root: blake3::Hash::from_bytes(m.root),
            tree: tree::tree(size),
            data: ob,
        };
        let r = piece_range(size, 1);
        let mut enc = Vec::new();
        bao_tree::io::sync::encode_ranges_validated(
            &data[..],
            &outboard,
            &tree::chunk_ranges(std::slice::from_ref(&r)),
            &mut enc,
        )
        .unwrap();
        let mut got = Vec::new();
        decode(&m, std::slice::from_ref(&r), &enc, |_, d| {
            got.extend_from_slice(d)
        })
        .unwrap();
        assert_eq!(got, &data[(32 * GROUP_BYTES) as usize..]);
        // One flipped bit anywhere: refused.
        for i in [0, enc.len() / 2, enc.len() - 1] {
            let mut bad = enc.clone();
            bad[i] ^= 1;
            assert!(decode(&m, std::slice::from_ref(&r), &bad, |_, _| {}).is_err());
        }
        // Short or long: refused.
        assert!(decode(&m, std::slice::from_ref(&r), &enc[1..], |_, _| {}).is_err());
        let mut long = enc.clone();
        long.push(0);
        assert!(decode(&m, std::slice::from_ref(&r), &long, |_, _| {}).is_err());
    }
}
