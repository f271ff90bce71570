//! `qdfs serve`: the provider side, one thread per connection (bounded by
//! the [`Budgets`]), each driving a sans-IO [`ServerSession`].
//!
//! What a peer can make this server do is bounded: connections in all and
//! per peer address, requests per connection, 4 KiB per request frame,
//! 4 MiB of file data per request, an idle timeout, and optionally a rate
//! per peer. Data is sent through bao-tree's validating encoder, so bytes
//! that no longer match the tree (a provided file edited in place) end the
//! response instead of going out.

use std::io::{self, BufRead, BufWriter, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::budget::{Budgets, Limits, Refusal};
use crate::gateway::Gateway;
use crate::id::Id;
use crate::store::{ServedFile, Store};
use crate::tree;
use crate::wire::{
    self, Action, ErrorCode, GroupRanges, ReadFrameError, Response, ServerSession,
    MAX_REQUEST_FRAME,
};

/// Requests one connection may make before it must reconnect.
pub const MAX_REQUESTS_PER_CONNECTION: u64 = 100_000;
/// A connection idle this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A peer that reads nothing for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A new connection must say Hello within this time.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A request, once its first byte is here, must be whole within this time
/// (a peer trickling a byte now and then does not keep its slot).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection idle this long may be closed to admit a new one when
/// every slot is taken.
pub const EVICT_IDLE: Duration = Duration::from_secs(2);

/// The connections being served: each one's socket, whether it is in the
/// middle of a request, and since when it has waited for the next.
#[derive(Debug, Default)]
struct Live {
    next: u64,
    conns: std::collections::HashMap<u64, LiveConn>,
}

#[derive(Debug)]
struct LiveConn {
    stream: TcpStream,
    busy: bool,
    idle_since: Instant,
}

impl Live {
    fn add(&mut self, conn: &TcpStream) -> u64 {
        self.next += 1;
        if let Ok(stream) = conn.try_clone() {
            self.conns.insert(
                self.next,
                LiveConn {
                    stream,
                    busy: false,
                    idle_since: Instant::now(),
                },
            );
        }
        self.next
    }

    fn remove(&mut self, id: u64) {
        self.conns.remove(&id);
    }

    fn mark(&mut self, id: u64, busy: bool) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.busy = busy;
            c.idle_since = Instant::now();
        }
    }

    /// The connection idle longest, if it has been idle `min` or more.
    fn longest_idle(&self, now: Instant, min: Duration) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.busy && now.saturating_duration_since(c.idle_since) >= min)
            .min_by_key(|(_, c)| c.idle_since)
            .map(|(id, _)| *id)
    }
}

/// Time a gateway's answer may spend fetching upstream, besides sending.
const UPSTREAM_ALLOWANCE: Duration = Duration::from_secs(60);
/// Slowest rate (bytes/s) a peer may read an answer at, once
/// [`WRITE_TIMEOUT`] has passed.
pub const MIN_READ_RATE: u64 = 16 * 1024;

/// Counters, as `qdfs status` shows them.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections refused by a budget.
    pub refused: AtomicU64,
    /// Idle connections closed to admit a new one (all slots taken).
    pub evicted: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Manifests sent.
    pub manifests_served: AtomicU64,
    /// Chunk groups sent.
    pub groups_served: AtomicU64,
    /// Bytes of verified stream sent (data and tree hashes).
    pub bytes_served: AtomicU64,
    /// Requests for something not provided here.
    pub not_found: AtomicU64,
    /// Responses cut short (the data failed its check, or the peer left).
    pub aborted: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted.
    pub connections: u64,
    /// Connections refused by a budget.
    pub refused: u64,
    /// Idle connections closed to admit a new one.
    pub evicted: u64,
    /// Requests answered.
    pub requests: u64,
    /// Manifests sent.
    pub manifests_served: u64,
    /// Chunk groups sent.
    pub groups_served: u64,
    /// Bytes of verified stream sent.
    pub bytes_served: u64,
    /// Requests for something not provided here.
    pub not_found: u64,
    /// Responses cut short.
    pub aborted: u64,
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: g(&self.connections),
            refused: g(&self.refused),
            evicted: g(&self.evicted),
            requests: g(&self.requests),
            manifests_served: g(&self.manifests_served),
            groups_served: g(&self.groups_served),
            bytes_served: g(&self.bytes_served),
            not_found: g(&self.not_found),
            aborted: g(&self.aborted),
        }
    }
}

/// The provider: a store, budgets and counters shared by every connection.
#[derive(Debug)]
pub struct Server {
    store: Store,
    budgets: Mutex<Budgets>,
    /// Counters.
    pub stats: Stats,
    stop: AtomicBool,
    /// Set for `role = "cache-gateway"`: answers for IDs not in the store.
    gateway: Option<Arc<Gateway>>,
    /// Private storage: where others' shares go (`None`: none are kept).
    holder: Option<Arc<crate::holder::Holder>>,
    /// Connections being served, so that an idle one can give way.
    live: Mutex<Live>,
    /// Test hook: which chunk groups to corrupt in everything served.
    #[cfg(feature = "test-hooks")]
    corrupt: Option<hooks::CorruptAt>,
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Server {
    /// A server for `store` under `limits`.
    pub fn new(store: Store, limits: Limits) -> Server {
        Server {
            store,
            budgets: Mutex::new(Budgets::new(limits)),
            stats: Stats::default(),
            stop: AtomicBool::new(false),
            gateway: None,
            holder: None,
            live: Mutex::new(Live::default()),
            #[cfg(feature = "test-hooks")]
            corrupt: hooks::CorruptAt::from_env(),
        }
    }

    /// Answers requests for IDs not in the store through `gateway` (the
    /// cache, then upstream): `role = "cache-gateway"`.
    pub fn with_gateway(mut self, gateway: Arc<Gateway>) -> Server {
        self.gateway = Some(gateway);
        self
    }

    /// Keeps others' private shares with `holder` (answers `PutShare`).
    pub fn with_holder(mut self, holder: Arc<crate::holder::Holder>) -> Server {
        self.holder = Some(holder);
        self
    }

    /// The store served.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Makes [`Server::run`] return after its next accept.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// With every slot taken, closes the connection that has waited
    /// longest for its next request (at least [`EVICT_IDLE`]), so peers
    /// that hold slots without using them give way to one that asks.
    fn evict_idle(&self) -> bool {
        let mut live = self.live();
        let Some(id) = live.longest_idle(Instant::now(), EVICT_IDLE) else {
            return false;
        };
        if let Some(c) = live.conns.remove(&id) {
            tracing::debug!("closing the longest idle connection to admit a new one");
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            bump(&self.stats.evicted, 1);
        }
        true
    }

    fn budgets(&self) -> std::sync::MutexGuard<'_, Budgets> {
        // A panicking connection thread must not stop the server: the
        // budgets stay usable (their worst state is a leaked slot).
        self.budgets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts connections until stopped, one thread each.
    pub fn run(self: &Arc<Server>, listener: TcpListener) {
        for conn in listener.incoming() {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let Ok(peer) = conn.peer_addr() else { continue };
            let mut admitted = self.budgets().admit(peer.ip(), Instant::now());
            if admitted == Err(Refusal::Full) && self.evict_idle() {
                // The evicted connection's thread gives its slot back as
                // soon as its read fails; wait for that briefly.
                for _ in 0..20 {
                    std::thread::sleep(Duration::from_millis(10));
                    admitted = self.budgets().admit(peer.ip(), Instant::now());
                    if admitted != Err(Refusal::Full) {
                        break;
                    }
                }
            }
            if let Err(why) = admitted {
                bump(&self.stats.refused, 1);
                tracing::debug!(%peer, "refused: {why}");
                let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = (&conn).write_all(
                    &Response::Error {
                        code: ErrorCode::Busy,
                    }
                    .encode(),
                );
                continue;
            }
            bump(&self.stats.connections, 1);
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("qdfs-conn".into())
                .spawn(move || {
                    let id = me.live().add(&conn);
                    if let Err(e) = me.serve_connection(&conn, peer, id) {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    me.live().remove(id);
                    me.budgets().release(peer.ip());
                });
            if spawned.is_err() {
                self.budgets().release(peer.ip());
            }
        }
    }

    fn serve_connection(&self, conn: &TcpStream, peer: SocketAddr, id: u64) -> io::Result<()> {
        conn.set_read_timeout(Some(IDLE_TIMEOUT))?;
        conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
        conn.set_nodelay(true)?;
        let mut session = ServerSession::new(MAX_REQUESTS_PER_CONNECTION);
        let hello_by = Instant::now() + HELLO_TIMEOUT;
        let mut reader = io::BufReader::with_capacity(
            8192,
            Timed {
                conn,
                deadline: hello_by,
            },
        );
        let mut out = BufWriter::with_capacity(
            64 * 1024,
            Throttle {
                conn,
                server: self,
                peer: peer.ip(),
                deadline: None,
            },
        );
        let mut said_hello = false;
        loop {
            // Waiting for the next request may take up to the idle time
            // (the Hello, less); once it has begun, it must be whole soon.
            if reader.buffer().is_empty() {
                if said_hello {
                    reader.get_mut().deadline = Instant::now() + IDLE_TIMEOUT;
                }
                if reader.fill_buf()?.is_empty() {
                    return Ok(());
                }
            }
            reader.get_mut().deadline = if said_hello {
                Instant::now() + FRAME_TIMEOUT
            } else {
                hello_by
            };
            said_hello = true;
            // Busy from the first byte of a request until its answer is
            // sent: never the one to give way.
            self.live().mark(id, true);
            let body = match wire::read_frame(&mut reader, MAX_REQUEST_FRAME) {
                Ok(b) => b,
                Err(ReadFrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(ReadFrameError::Io(e)) => return Err(e),
                Err(ReadFrameError::Wire(e)) => {
                    tracing::debug!(%peer, "bad frame: {e}");
                    let r = Response::Error {
                        code: ErrorCode::BadRequest,
                    };
                    out.write_all(&r.encode())?;
                    return out.flush();
                }
            };
            match session.on_frame(&body) {
                Action::Reply(r) => out.write_all(&r.encode())?,
                Action::Close(r) => {
                    if let Some(r) = r {
                        out.write_all(&r.encode())?;
                    }
                    return out.flush();
                }
                Action::SendManifest(id) => {
                    bump(&self.stats.requests, 1);
                    let r = match self.store.manifest_bytes(&id) {
                        Ok(Some(bytes)) => {
                            bump(&self.stats.manifests_served, 1);
                            Response::Manifest { bytes }
                        }
                        Ok(None) => match &self.gateway {
                            Some(g) => g.manifest_response(&id),
                            None => {
                                bump(&self.stats.not_found, 1);
                                Response::Error {
                                    code: ErrorCode::NotFound,
                                }
                            }
                        },
                        Err(e) => {
                            tracing::warn!(%id, "store: {e}");
                            Response::Error {
                                code: ErrorCode::Unavailable,
                            }
                        }
                    };
                    out.write_all(&r.encode())?;
                }
                Action::SendRanges(id, groups) => {
                    bump(&self.stats.requests, 1);
                    self.send_ranges(&mut out, &id, &groups)?;
                }
                Action::ReceiveShare(m) => {
                    bump(&self.stats.requests, 1);
                    match &self.holder {
                        Some(h) => {
                            // The share's bytes follow on this reader: they
                            // get the holder's budget (a minute plus one
                            // second per 16 KiB), not one request's 10 s.
                            let budget =
                                Duration::from_secs(60 + m.size / crate::holder::MIN_PUT_RATE + 5);
                            reader.get_mut().deadline = Instant::now() + budget;
                            h.receive(&self.store, &mut reader, &mut out, m, peer.ip())?
                        }
                        None => {
                            let r = Response::Error {
                                code: ErrorCode::QuotaExceeded,
                            };
                            out.write_all(&r.encode())?;
                        }
                    }
                }
            }
            // Answer now unless the next request is already here (then
            // the answers go out together).
            if reader.buffer().is_empty() {
                out.flush()?;
            }
            self.live().mark(id, false);
        }
    }

    fn send_ranges(
        &self,
        out: &mut BufWriter<Throttle<'_>>,
        id: &Id,
        groups: &GroupRanges,
    ) -> io::Result<()> {
        let refuse = |out: &mut dyn Write, code| out.write_all(&Response::Error { code }.encode());
        let file = match self.store.open_file(id) {
            Ok(Some(f)) => f,
            Ok(None) => {
                if let Some(g) = &self.gateway {
                    // Bounded like any answer (the largest one at the
                    // minimum read rate), plus a minute for upstream.
                    let most = groups.groups() * crate::manifest::GROUP_BYTES;
                    let allowed = WRITE_TIMEOUT.max(Duration::from_secs(most / MIN_READ_RATE));
                    out.get_mut().deadline = Some(Instant::now() + allowed + UPSTREAM_ALLOWANCE);
                    let r = g.serve_ranges(out, id, groups);
                    out.get_mut().deadline = None;
                    return r;
                }
                bump(&self.stats.not_found, 1);
                return refuse(out, ErrorCode::NotFound);
            }
            Err(e) => {
                tracing::warn!(%id, "store: {e}");
                return refuse(out, ErrorCode::Unavailable);
            }
        };
        let size = file.manifest.size;
        if groups.end() > tree::group_count(size) {
            return refuse(out, ErrorCode::BadRequest);
        }
        let encoded_len = tree::encoded_len(size, groups.ranges());
        let allowed = WRITE_TIMEOUT.max(Duration::from_secs(encoded_len / MIN_READ_RATE));
        out.get_mut().deadline = Some(Instant::now() + allowed);
        let r = self.send_encoded(out, id, &file, groups, encoded_len);
        out.get_mut().deadline = None;
        r
    }

    fn send_encoded(
        &self,
        out: &mut BufWriter<Throttle<'_>>,
        id: &Id,
        file: &ServedFile,
        groups: &GroupRanges,
        encoded_len: u64,
    ) -> io::Result<()> {
        out.write_all(&Response::Ranges { encoded_len }.encode())?;
        let ranges = tree::chunk_ranges(groups.ranges());
        let mut counted = Counted { inner: out, n: 0 };
        let result = self.encode(file, &ranges, &mut counted);
        bump(&self.stats.bytes_served, counted.n);
        match result {
            Ok(()) => {
                bump(&self.stats.groups_served, groups.groups());
                Ok(())
            }
            Err(e) => {
                // The stream is cut mid-way: the client sees a short
                // response and asks elsewhere.
                bump(&self.stats.aborted, 1);
                tracing::warn!(%id, "response aborted: {e}");
                Err(io::Error::other(e.to_string()))
            }
        }
    }

    fn encode(
        &self,
        file: &ServedFile,
        ranges: &bao_tree::ChunkRanges,
        out: &mut impl Write,
    ) -> Result<(), bao_tree::io::EncodeError> {
        #[cfg(feature = "test-hooks")]
        if let Some(at) = self.corrupt {
            let data = hooks::Corrupt {
                inner: &file.data,
                at,
                size: file.manifest.size,
            };
            return bao_tree::io::sync::encode_ranges(data, &file.outboard, ranges, out);
        }
        bao_tree::io::sync::encode_ranges_validated(&file.data, &file.outboard, ranges, out)
    }
}

/// Counts bytes written through it.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How long until `deadline`, or a timed-out error when it has passed.
fn remaining(deadline: Instant, what: &'static str) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, what));
    }
    Ok(left)
}

/// The socket's reading side, bounded by a deadline.
struct Timed<'a> {
    conn: &'a TcpStream,
    deadline: Instant,
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = remaining(self.deadline, "request not received in time")?;
        self.conn.set_read_timeout(Some(left))?;
        self.conn.read(buf)
    }
}

/// The socket, slowed to the peer's rate, with a deadline for the answer
/// being sent.
struct Throttle<'a> {
    conn: &'a TcpStream,
    server: &'a Server,
    peer: IpAddr,
    deadline: Option<Instant>,
}

impl Write for Throttle<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let wait = self
            .server
            .budgets()
            .spend(self.peer, buf.len() as u64, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if let Some(d) = self.deadline {
            let left = remaining(d, "peer reads the answer too slowly")?;
            self.conn.set_write_timeout(Some(left.min(WRITE_TIMEOUT)))?;
        }
        self.conn.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

#[cfg(feature = "test-hooks")]
mod hooks {
    use std::fs::File;
    use std::io;

    use bao_tree::io::sync::{ReadAt, Size};

    use crate::manifest::GROUP_BYTES;

    /// Which groups a test provider corrupts: `QDFS_TEST_CORRUPT_GROUP=N`
    /// for group N, `=all` for every group.
    #[derive(Debug, Clone, Copy)]
    pub enum CorruptAt {
        Group(u64),
        Every,
    }

    impl CorruptAt {
        pub fn from_env() -> Option<CorruptAt> {
            match std::env::var("QDFS_TEST_CORRUPT_GROUP").ok()?.as_str() {
                "all" => Some(CorruptAt::Every),
                n => n.parse().ok().map(CorruptAt::Group),
            }
        }
    }

    /// The data with the first byte of some groups flipped.
    pub struct Corrupt<'a> {
        pub inner: &'a File,
        pub at: CorruptAt,
        pub size: u64,
    }

    impl ReadAt for Corrupt<'_> {
        fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read_at(pos, buf)?;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                let off = pos + i as u64;
                let hit = match self.at {
                    CorruptAt::Group(g) => off == g * GROUP_BYTES,
                    CorruptAt::Every => off % GROUP_BYTES == 0,
                };
                if hit {
                    *b ^= 0x5a;
                }
            }
            Ok(n)
        }
    }

    impl Size for Corrupt<'_> {
        fn size(&self) -> io::Result<Option<u64>> {
            Ok(Some(self.size))
        }
    }
}
