//! `qdfs get`: fetching a file or folder from several providers at once.
//!
//! Every provider gets its own connection and thread, asks the shared
//! [`Schedule`] for pieces of up to [`Options::piece_groups`] chunk groups,
//! keeps [`Options::pipeline`] requests in flight, and checks each 16 KiB
//! group against the BLAKE3 tree (bao-tree's decoder, rooted in the ID's
//! manifest) before writing it: nothing unverified reaches the disk. A
//! provider that sends a group that fails its check is dropped at that
//! group and its pieces go to the others; one that fails otherwise is
//! retried twice, then dropped the same way.
//!
//! Data goes to `<output>.qdfs-part` (written in place at its offsets, so
//! memory stays at a few groups per provider whatever the size) and the
//! verified groups to `<output>.qdfs-state` (see [`crate::resume`]) twice a
//! second and on interruption; a run started again with the same output
//! asks only for what is missing. At the end the whole file is hashed once
//! more, renamed to `<output>`, and (unless told not to) recorded in the
//! local store so this node provides it too.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bao_tree::io::sync::DecodeResponseIter;
use bao_tree::io::{BaoContentItem, DecodeError};
use serde::Serialize;

use crate::cache::PIECE_GROUPS;
use crate::id::Id;
use crate::manifest::{FileManifest, Kind, Manifest, GROUP_BYTES};
use crate::progress::{Progress, Sample};
use crate::resume::ResumeState;
use crate::route::Route;
use crate::schedule::{Bitmap, Schedule};
use crate::store::{write_atomic, Store, StoreError};
use crate::tree;
use crate::wire::{
    read_frame, ErrorCode, GroupRanges, ReadFrameError, Request, Response, WireError,
    MAX_RESPONSE_FRAME, PROTOCOL_VERSION,
};

/// How a fetch runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Providers to fetch from.
    pub providers: Vec<SocketAddr>,
    /// Most providers used at once for one file.
    pub max_providers: usize,
    /// Chunk groups per request.
    pub piece_groups: u64,
    /// Requests in flight per provider.
    pub pipeline: usize,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// A provider silent this long is dropped.
    pub io_timeout: Duration,
    /// Slowest rate (bytes/s) a piece may arrive at, once `io_timeout` has
    /// passed: a provider that trickles a piece slower is dropped, so one
    /// that sends a byte now and then cannot hold a fetch.
    pub min_rate: u64,
    /// Set (by SIGINT) to stop, keeping what is verified.
    pub stop: Arc<AtomicBool>,
    /// Record fetched files here so this node provides them.
    pub provide: Option<Store>,
    /// Most files and folders one folder fetch creates (counting every
    /// entry at every level).
    pub max_entries: u64,
    /// Replace an existing output that is not this fetch being resumed.
    pub force: bool,
    /// Caching gateways asked first, each for its share of the pieces
    /// ([`crate::route`]); what they fail to deliver comes from `providers`.
    pub gateways: Vec<SocketAddr>,
}

/// Default for [`Options::max_entries`].
pub const MAX_FETCH_ENTRIES: u64 = 100_000;
/// Most caching gateways one fetch uses (the first ones given).
pub const MAX_GATEWAYS: usize = 16;
/// Deepest folder nesting a fetch follows.
pub const MAX_FETCH_DEPTH: usize = 64;

impl Options {
    /// Defaults for these providers.
    pub fn new(providers: Vec<SocketAddr>) -> Options {
        Options {
            providers,
            max_providers: 8,
            piece_groups: 32,
            pipeline: 2,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(20),
            min_rate: 16 * 1024,
            stop: Arc::new(AtomicBool::new(false)),
            provide: None,
            max_entries: MAX_FETCH_ENTRIES,
            force: false,
            gateways: Vec::new(),
        }
    }
}

/// How one provider did.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderReport {
    /// Its address.
    pub addr: SocketAddr,
    /// Bytes received from it (protocol and data).
    pub received: u64,
    /// Chunk groups it delivered that verified.
    pub groups: u64,
    /// How it ended.
    pub outcome: ProviderOutcome,
}

/// How a provider's part of a fetch ended.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProviderOutcome {
    /// It served until nothing was left (or the fetch stopped).
    Finished,
    /// It failed (unreachable, refused, broke the protocol).
    Failed {
        /// Why.
        error: String,
    },
    /// It sent data that failed verification and was dropped.
    Dropped {
        /// The chunk group that failed.
        bad_group: u64,
    },
}

/// One fetched file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// Where it was written.
    pub path: PathBuf,
    /// Its manifest ID.
    pub id: Id,
    /// Its size.
    pub size: u64,
    /// Bytes already verified on disk when this run began.
    pub already: u64,
    /// Bytes received in this run.
    pub received: u64,
    /// Bytes received by every run of this fetch.
    pub received_total: u64,
    /// Seconds this run took.
    pub seconds: f64,
    /// The providers used.
    pub providers: Vec<ProviderReport>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nobody to ask.
    #[error("no providers known (give --provider ADDR:PORT, or run a node to search its DHT)")]
    NoProviders,
    /// No provider returned the manifest.
    #[error("no provider had {id} ({why})")]
    NotFound {
        /// The ID.
        id: Id,
        /// The last provider's answer.
        why: String,
    },
    /// A manifest that does not fit its parent folder.
    #[error("manifest of {id}: {why}")]
    BadManifest {
        /// The ID.
        id: Id,
        /// What is wrong.
        why: String,
    },
    /// The output exists and is not this fetch being resumed, or a path
    /// on the way is a symbolic link.
    #[error("{path} {why}")]
    OutputExists {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Another fetch is writing this output now.
    #[error("another qdfs get is writing {0} now")]
    Busy(PathBuf),
    /// A folder fetch that would create more entries than allowed.
    #[error("the folder holds more than {0} files and folders; refusing to create them")]
    TooManyEntries(u64),
    /// Stopped by the user.
    #[error("interrupted with {done} of {size} bytes of {path} verified on disk; run the same command again to resume")]
    Interrupted {
        /// The file.
        path: PathBuf,
        /// Verified bytes.
        done: u64,
        /// Its size.
        size: u64,
    },
    /// Every provider failed.
    #[error("every provider failed with {done} of {size} bytes of {path} verified (kept for a resume); last error: {last}")]
    ProvidersFailed {
        /// The file.
        path: PathBuf,
        /// Verified bytes.
        done: u64,
        /// Its size.
        size: u64,
        /// The last provider's error.
        last: String,
    },
    /// The assembled file does not hash to the root (the state file lied).
    #[error(
        "{0}: the finished file does not match its manifest; partial data discarded, fetch again"
    )]
    FinalMismatch(PathBuf),
    /// A local file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Recording the file in the store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Hashing the finished file failed.
    #[error("verifying {path}: {source}")]
    Hash {
        /// The file.
        path: PathBuf,
        /// Why.
        source: tree::HashError,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io { what, path, source }
}

/// Why one provider connection failed.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("refused: {0:?}")]
    Refused(ErrorCode),
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error("sent a chunk group that failed verification (group {0})")]
    Corrupt(u64),
    #[error("writing the output: {0}")]
    Local(io::Error),
}

impl From<ReadFrameError> for ConnError {
    fn from(e: ReadFrameError) -> ConnError {
        match e {
            ReadFrameError::Io(e) => ConnError::Io(e),
            ReadFrameError::Wire(e) => ConnError::Wire(e),
        }
    }
}

/// Counts the bytes read from a socket, and refuses to read past a
/// deadline (a piece that arrives too slowly).
struct Counting {
    stream: TcpStream,
    n: Arc<AtomicU64>,
    deadline: Option<Instant>,
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.deadline.is_some_and(|d| Instant::now() > d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "piece arriving slower than the minimum rate",
            ));
        }
        let n = self.stream.read(buf)?;
        self.n.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A client connection to one provider.
struct Conn {
    stream: TcpStream,
    reader: BufReader<Counting>,
}

impl Conn {
    fn open(addr: SocketAddr, opts: &Options, counter: Arc<AtomicU64>) -> Result<Conn, ConnError> {
        let stream = TcpStream::connect_timeout(&addr, opts.connect_timeout)?;
        stream.set_read_timeout(Some(opts.io_timeout))?;
        stream.set_write_timeout(Some(opts.io_timeout))?;
        stream.set_nodelay(true)?;
        let reader = BufReader::with_capacity(
            64 * 1024,
            Counting {
                stream: stream.try_clone()?,
                n: counter,
                deadline: None,
            },
        );
        let mut c = Conn { stream, reader };
        c.send(&Request::Hello {
            version: PROTOCOL_VERSION,
        })?;
        match c.recv_within(opts.io_timeout)? {
            Response::Hello { version } if version == PROTOCOL_VERSION => Ok(c),
            Response::Error { code } => Err(ConnError::Refused(code)),
            _ => Err(ConnError::Protocol("no hello")),
        }
    }

    /// One whole answer frame within `limit` (a peer trickling bytes just
    /// inside the socket timeout cannot stretch a small answer for ever).
    fn recv_within(&mut self, limit: Duration) -> Result<Response, ConnError> {
        self.reader.get_mut().deadline = Some(Instant::now() + limit);
        let r = self.recv();
        self.reader.get_mut().deadline = None;
        r
    }

    fn send(&mut self, r: &Request) -> Result<(), ConnError> {
        self.stream.write_all(&r.encode())?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Response, ConnError> {
        let body = read_frame(&mut self.reader, MAX_RESPONSE_FRAME)?;
        Ok(Response::parse(&body)?)
    }
}

/// Fetches a manifest from the first provider that has it, checked
/// against its ID.
pub fn fetch_manifest(id: &Id, opts: &Options) -> Result<Manifest, FetchError> {
    if opts.providers.is_empty() && opts.gateways.is_empty() {
        return Err(FetchError::NoProviders);
    }
    let mut why = String::from("no answer");
    for addr in opts.gateways.iter().chain(&opts.providers) {
        let attempt = || -> Result<Manifest, ConnError> {
            let mut c = Conn::open(*addr, opts, Arc::new(AtomicU64::new(0)))?;
            c.send(&Request::GetManifest { id: *id })?;
            match c.recv_within(opts.io_timeout)? {
                Response::Manifest { bytes } if Id::of_manifest(&bytes) == *id => {
                    Manifest::parse(&bytes).map_err(|_| ConnError::Protocol("bad manifest"))
                }
                Response::Manifest { .. } => Err(ConnError::Protocol("manifest does not match")),
                Response::Error { code } => Err(ConnError::Refused(code)),
                _ => Err(ConnError::Protocol("unexpected answer")),
            }
        };
        match attempt() {
            Ok(m) => return Ok(m),
            Err(e) => {
                tracing::debug!(%addr, %id, "manifest: {e}");
                why = format!("{addr}: {e}");
            }
        }
    }
    Err(FetchError::NotFound { id: *id, why })
}

/// Fetches `id` (a file or a folder) to `out`.
pub fn get(
    id: &Id,
    out: &Path,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Vec<FileReport>, FetchError> {
    let m = fetch_manifest(id, opts)?;
    check_output(id, &m, out, opts.force)?;
    let marker = sibling(out, ".qdfs-state");
    if let Manifest::Folder(_) = &m {
        // Marks `out` as this folder fetch's, so that running it again
        // resumes into the directory instead of refusing it.
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        write_atomic(&marker, &folder_marker(id))?;
    }
    let mut reports = Vec::new();
    let mut entries = 0;
    let mut walk = Walk {
        opts,
        progress,
        reports: &mut reports,
        entries: &mut entries,
    };
    let folder = matches!(m, Manifest::Folder(_));
    get_manifest(&mut walk, id, m, out, 0)?;
    if folder {
        match fs::remove_file(&marker) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("removing", &marker)(e));
            }
            _ => {}
        }
    }
    Ok(reports)
}

const FOLDER_MAGIC: &[u8; 8] = b"QDFSFD01";

/// What a folder fetch keeps at `<output>.qdfs-state` until it completes.
fn folder_marker(id: &Id) -> Vec<u8> {
    let mut v = FOLDER_MAGIC.to_vec();
    v.extend_from_slice(&id.0);
    v
}

/// Whether `out` is an interrupted fetch of folder `id`.
fn is_folder_fetch_of(out: &Path, id: &Id) -> bool {
    let mut bytes = Vec::new();
    open_nofollow(&sibling(out, ".qdfs-state"))
        .and_then(|f| f.take(64).read_to_end(&mut bytes))
        .is_ok()
        && bytes == folder_marker(id)
}

/// Whether `out` is a regular file (not a link) that already holds `m`.
fn is_complete(out: &Path, m: &FileManifest) -> bool {
    if !fs::symlink_metadata(out).is_ok_and(|md| md.is_file() && md.len() == m.size) {
        return false;
    }
    open_nofollow(out)
        .is_ok_and(|f| tree::hash_stream(f, m.size, io::sink()).is_ok_and(|h| h.root == m.root))
}

/// Refuses an output that exists and is not this fetch being resumed
/// (unless `force`), and a symbolic link always.
fn check_output(id: &Id, m: &Manifest, out: &Path, force: bool) -> Result<(), FetchError> {
    let md = match fs::symlink_metadata(out) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("checking", out)(e)),
    };
    let refuse = |why: &'static str| {
        Err(FetchError::OutputExists {
            path: out.into(),
            why,
        })
    };
    if md.file_type().is_symlink() {
        return refuse("is a symbolic link (never followed; remove it or choose another output)");
    }
    match m {
        Manifest::File(f) => {
            if md.is_dir() {
                return refuse("is a directory");
            }
            if !force && !is_complete(out, f) {
                return refuse("exists and is not this file (give --force to replace it)");
            }
        }
        Manifest::Folder(_) => {
            if !md.is_dir() {
                return refuse("exists and is not a directory");
            }
            let empty = fs::read_dir(out)
                .map_err(io_err("listing", out))?
                .next()
                .is_none();
            if !force && !empty && !is_folder_fetch_of(out, id) {
                return refuse(
                    "is a non-empty directory and not this folder's fetch being resumed \
                     (give --force to merge into it)",
                );
            }
        }
    }
    Ok(())
}

/// Creates one directory level, or accepts a real directory already there;
/// never follows a symbolic link.
fn make_dir(path: &Path) -> Result<(), FetchError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let md = fs::symlink_metadata(path).map_err(io_err("checking", path))?;
            if md.is_dir() {
                Ok(())
            } else {
                Err(FetchError::OutputExists {
                    path: path.into(),
                    why: "is in the way of a folder entry and is not a directory \
                          (symbolic links are never followed)",
                })
            }
        }
        Err(e) => Err(io_err("creating", path)(e)),
    }
}

/// What a folder fetch carries down the tree.
struct Walk<'a> {
    opts: &'a Options,
    progress: &'a dyn Progress,
    reports: &'a mut Vec<FileReport>,
    /// Entries seen so far, against [`Options::max_entries`].
    entries: &'a mut u64,
}

fn get_manifest(
    w: &mut Walk<'_>,
    id: &Id,
    m: Manifest,
    out: &Path,
    depth: usize,
) -> Result<(), FetchError> {
    let (opts, progress) = (w.opts, w.progress);
    match m {
        Manifest::File(f) => w
            .reports
            .push(fetch_file_routed(id, f, out, opts, progress)?),
        Manifest::Folder(folder) => {
            if depth > MAX_FETCH_DEPTH {
                return Err(FetchError::BadManifest {
                    id: *id,
                    why: format!("folders nested deeper than {MAX_FETCH_DEPTH}"),
                });
            }
            *w.entries = w.entries.saturating_add(folder.entries.len() as u64);
            if *w.entries > opts.max_entries {
                return Err(FetchError::TooManyEntries(opts.max_entries));
            }
            make_dir(out)?;
            for e in &folder.entries {
                let child = fetch_manifest(&e.id, opts)?;
                let fits = match (&child, e.kind) {
                    (Manifest::File(_), Kind::File) | (Manifest::Folder(_), Kind::Folder) => {
                        child.size() == e.size
                    }
                    _ => false,
                };
                if !fits {
                    return Err(FetchError::BadManifest {
                        id: e.id,
                        why: format!("does not match entry {:?} of its folder", e.name),
                    });
                }
                // Names were checked by the manifest parser: one plain
                // component each, so the path stays under `out`.
                let path = out.join(&e.name);
                get_manifest(w, &e.id, child, &path, depth + 1)?;
            }
            if let Some(store) = &opts.provide {
                store.put_manifest(&Manifest::Folder(folder))?;
            }
        }
    }
    Ok(())
}

/// Opens an existing file for reading, refusing a symbolic link.
fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    out.with_file_name(name)
}

/// A provider waiting for a worker thread: its place in the list given,
/// its address, its byte counter.
type Spare = (usize, SocketAddr, Arc<AtomicU64>);

/// Shared by the workers fetching one file.
struct Shared {
    id: Id,
    manifest: FileManifest,
    file: File,
    sched: Mutex<Schedule>,
    stop: Arc<AtomicBool>,
    streams: Mutex<Vec<TcpStream>>,
    done_bytes: AtomicU64,
    active: AtomicUsize,
    /// Set when fetching from caching gateways: who gets which piece.
    route: Option<Route>,
}

impl Shared {
    fn sched(&self) -> MutexGuard<'_, Schedule> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn done_bytes(size: u64, done: &Bitmap) -> u64 {
    (0..done.len())
        .filter(|g| done.get(*g))
        .map(|g| tree::group_len(size, g))
        .sum()
}

/// The resume state for `id` at `state_path`, if it fits this file and
/// its part file.
fn load_state(state_path: &Path, part: &Path, id: &Id, size: u64) -> Option<ResumeState> {
    let mut bytes = Vec::new();
    open_nofollow(state_path)
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    let st = ResumeState::parse(&bytes).ok()?;
    let part_len = fs::metadata(part).ok()?.len();
    (st.id == *id && st.size == size && part_len == size).then_some(st)
}

/// Fetches a file from the caching gateways first, if there are any, each
/// asked for the pieces it owns; what they fail to deliver comes from the
/// providers, resuming from the verified groups the gateways delivered.
fn fetch_file_routed(
    id: &Id,
    m: FileManifest,
    out: &Path,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<FileReport, FetchError> {
    if opts.gateways.is_empty() {
        return fetch_file(id, m, out, opts, progress, None);
    }
    let mut gw = opts.clone();
    gw.providers = opts.gateways.clone();
    gw.providers.truncate(MAX_GATEWAYS);
    // Every gateway needs its own worker, or its pieces wait forever.
    gw.max_providers = gw.providers.len();
    gw.piece_groups = PIECE_GROUPS;
    let route = Route::new(gw.providers.clone());
    match fetch_file(id, m, out, &gw, progress, Some(route)) {
        Err(FetchError::ProvidersFailed { .. }) if !opts.providers.is_empty() => {
            progress.note("the gateways failed; fetching the rest from providers");
            let r = fetch_file(id, m, out, opts, progress, None)?;
            Ok(r)
        }
        r => r,
    }
}

fn fetch_file(
    id: &Id,
    m: FileManifest,
    out: &Path,
    opts: &Options,
    progress: &dyn Progress,
    route: Option<Route>,
) -> Result<FileReport, FetchError> {
    let started = Instant::now();
    let part = sibling(out, ".qdfs-part");
    let state_path = sibling(out, ".qdfs-state");
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    // Already here from an earlier run: check it and keep it.
    if fs::symlink_metadata(&state_path).is_err() && is_complete(out, &m) {
        progress.begin(&name, m.size, m.size);
        progress.end();
        provide(opts, out, &m)?;
        return Ok(FileReport {
            path: out.into(),
            id: *id,
            size: m.size,
            already: m.size,
            received: 0,
            received_total: 0,
            seconds: started.elapsed().as_secs_f64(),
            providers: Vec::new(),
        });
    }

    let groups = tree::group_count(m.size);
    let resumed = load_state(&state_path, &part, id, m.size);
    // Never through a symbolic link: one planted at the part file's name
    // would redirect the write.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&part)
        .map_err(io_err("opening", &part))?;
    if !file.metadata().map_err(io_err("opening", &part))?.is_file() {
        return Err(io_err("opening", &part)(io::Error::other(
            "not a regular file",
        )));
    }
    // One fetch per output at a time: a second `qdfs get` to the same
    // path would write the same part file and state under the first.
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(FetchError::Busy(out.into()));
    }
    let (done, received_before) = match resumed {
        Some(st) => (st.done, st.received),
        None => {
            file.set_len(0).map_err(io_err("truncating", &part))?;
            file.set_len(m.size).map_err(io_err("sizing", &part))?;
            (Bitmap::new(groups), 0)
        }
    };
    let already = done_bytes(m.size, &done);
    progress.begin(&name, m.size, already);
    let sh = Arc::new(Shared {
        id: *id,
        manifest: m,
        file,
        sched: Mutex::new(Schedule::new(done, opts.piece_groups)),
        stop: Arc::clone(&opts.stop),
        streams: Mutex::new(Vec::new()),
        done_bytes: AtomicU64::new(already),
        active: AtomicUsize::new(0),
        route,
    });
    let persist = |received_now: u64| -> Result<(), FetchError> {
        let done = sh.sched().done().clone();
        sh.file.sync_data().map_err(io_err("syncing", &part))?;
        let st = ResumeState {
            id: *id,
            size: m.size,
            received: received_before + received_now,
            done,
        };
        write_atomic(&state_path, &st.encode())?;
        Ok(())
    };

    // One counter per provider; `max_providers` threads take providers
    // from the queue in order, and a thread whose provider failed takes
    // the next one (spares), so a dead provider early in the list costs
    // no capacity.
    let counters: Vec<Arc<AtomicU64>> = opts
        .providers
        .iter()
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let received = || {
        counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let queue: Arc<Mutex<VecDeque<Spare>>> = Arc::new(Mutex::new(
        opts.providers
            .iter()
            .zip(&counters)
            .enumerate()
            .map(|(i, (a, c))| (i, *a, Arc::clone(c)))
            .collect(),
    ));
    let mut workers = Vec::new();
    if !sh.sched().is_complete() {
        for _ in 0..opts.max_providers.max(1).min(opts.providers.len()) {
            let (sh, queue, o) = (Arc::clone(&sh), Arc::clone(&queue), opts.clone());
            workers.push(std::thread::spawn(move || {
                let mut reports = Vec::new();
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some((i, addr, counter)) = next else {
                        break;
                    };
                    let r = worker(&sh, addr, &o, counter);
                    let finished = r.outcome == ProviderOutcome::Finished;
                    if let (false, Some(route)) = (finished, &sh.route) {
                        route.mark_dead(&addr);
                    }
                    reports.push((i, r));
                    if finished || sh.stop.load(Ordering::Relaxed) || sh.sched().is_complete() {
                        break;
                    }
                }
                reports
            }));
        }
    }
    let mut last_persist = Instant::now();
    let mut stopping = false;
    while !workers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        progress.update(Sample {
            done: sh.done_bytes.load(Ordering::Relaxed),
            total: m.size,
            received: received(),
            providers: sh.active.load(Ordering::Relaxed),
        });
        // Stopped, or complete while a slow provider still holds a doubled
        // piece: unblock every connection.
        if (opts.stop.load(Ordering::Relaxed) || sh.sched().is_complete()) && !stopping {
            stopping = true;
            for s in sh.streams.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if last_persist.elapsed() >= Duration::from_millis(500) {
            persist(received())?;
            last_persist = Instant::now();
        }
    }
    let mut reports = Vec::new();
    for w in workers {
        if let Ok(r) = w.join() {
            reports.extend(r);
        }
    }
    // In the order the providers were given.
    reports.sort_by_key(|(i, _)| *i);
    let mut providers = Vec::new();
    for (_, r) in reports {
        if let ProviderOutcome::Failed { error } = &r.outcome {
            progress.note(&format!("provider {} failed: {error}", r.addr));
        }
        if let ProviderOutcome::Dropped { bad_group } = &r.outcome {
            progress.note(&format!(
                "provider {} sent chunk group {bad_group} that failed verification; dropped",
                r.addr
            ));
        }
        providers.push(r);
    }
    let received_now = received();
    persist(received_now)?;
    progress.update(Sample {
        done: sh.done_bytes.load(Ordering::Relaxed),
        total: m.size,
        received: received_now,
        providers: 0,
    });
    progress.end();
    let done = sh.done_bytes.load(Ordering::Relaxed);
    if !sh.sched().is_complete() {
        if opts.stop.load(Ordering::Relaxed) {
            return Err(FetchError::Interrupted {
                path: out.into(),
                done,
                size: m.size,
            });
        }
        let last = providers
            .iter()
            .rev()
            .find_map(|p| match &p.outcome {
                ProviderOutcome::Failed { error } => Some(error.clone()),
                ProviderOutcome::Dropped { bad_group } => {
                    Some(format!("corrupt chunk group {bad_group}"))
                }
                ProviderOutcome::Finished => None,
            })
            .unwrap_or_else(|| "no providers".into());
        return Err(FetchError::ProvidersFailed {
            path: out.into(),
            done,
            size: m.size,
            last,
        });
    }
    finish(&part, &state_path, out, &m, opts)?;
    Ok(FileReport {
        path: out.into(),
        id: *id,
        size: m.size,
        already,
        received: received_now,
        received_total: received_before + received_now,
        seconds: started.elapsed().as_secs_f64(),
        providers,
    })
}

/// Hashes the assembled file once more (building its outboard when it is
/// to be provided), then moves it into place.
fn finish(
    part: &Path,
    state_path: &Path,
    out: &Path,
    m: &FileManifest,
    opts: &Options,
) -> Result<(), FetchError> {
    let f = File::open(part).map_err(io_err("opening", part))?;
    let (ob_path, sink): (Option<PathBuf>, Box<dyn Write>) = match &opts.provide {
        Some(s) => {
            let (p, f) = s.temp_outboard("fetched")?;
            (Some(p), Box::new(f))
        }
        None => (None, Box::new(io::sink())),
    };
    let h = tree::hash_stream(f, m.size, sink).map_err(|source| FetchError::Hash {
        path: part.into(),
        source,
    })?;
    if h.root != m.root {
        let _ = fs::remove_file(part);
        let _ = fs::remove_file(state_path);
        return Err(FetchError::FinalMismatch(out.into()));
    }
    fs::rename(part, out).map_err(io_err("renaming", part))?;
    match fs::remove_file(state_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("removing", state_path)(e));
        }
        _ => {}
    }
    if let (Some(store), Some(ob)) = (&opts.provide, ob_path) {
        let abs = fs::canonicalize(out).map_err(io_err("resolving", out))?;
        store.finish_file(&abs, *m, &ob)?;
    }
    Ok(())
}

fn provide(opts: &Options, out: &Path, m: &FileManifest) -> Result<(), FetchError> {
    if let Some(store) = &opts.provide {
        let abs = fs::canonicalize(out).map_err(io_err("resolving", out))?;
        let (ob, w) = store.temp_outboard("fetched")?;
        let f = File::open(&abs).map_err(io_err("opening", &abs))?;
        tree::hash_stream(f, m.size, w).map_err(|source| FetchError::Hash {
            path: abs.clone(),
            source,
        })?;
        store.finish_file(&abs, *m, &ob)?;
    }
    Ok(())
}

/// One provider's thread: fetch pieces until none are left, retrying a
/// broken connection twice.
fn worker(
    sh: &Shared,
    addr: SocketAddr,
    opts: &Options,
    counter: Arc<AtomicU64>,
) -> ProviderReport {
    let mut groups = 0;
    let mut retries = 0;
    let outcome = loop {
        match run_worker(sh, addr, opts, &counter, &mut groups) {
            Ok(()) => break ProviderOutcome::Finished,
            Err(_) if sh.stop.load(Ordering::Relaxed) || sh.sched().is_complete() => {
                break ProviderOutcome::Finished
            }
            Err(ConnError::Corrupt(g)) => break ProviderOutcome::Dropped { bad_group: g },
            Err(e @ (ConnError::Refused(_) | ConnError::Local(_))) => {
                break ProviderOutcome::Failed {
                    error: e.to_string(),
                }
            }
            Err(e) if retries >= 2 => {
                break ProviderOutcome::Failed {
                    error: e.to_string(),
                }
            }
            Err(e) => {
                tracing::debug!(%addr, "retrying after: {e}");
                retries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    ProviderReport {
        addr,
        received: counter.load(Ordering::Relaxed),
        groups,
        outcome,
    }
}

fn run_worker(
    sh: &Shared,
    addr: SocketAddr,
    opts: &Options,
    counter: &Arc<AtomicU64>,
    groups: &mut u64,
) -> Result<(), ConnError> {
    let mut conn = Conn::open(addr, opts, Arc::clone(counter))?;
    sh.streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(conn.stream.try_clone()?);
    if sh.stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    sh.active.fetch_add(1, Ordering::Relaxed);
    let mut inflight: VecDeque<Range<u64>> = VecDeque::new();
    let result = fetch_pieces(sh, addr, &mut conn, opts, &mut inflight, groups);
    sh.active.fetch_sub(1, Ordering::Relaxed);
    let mut sched = sh.sched();
    for r in inflight {
        sched.release(r);
    }
    result
}

fn fetch_pieces(
    sh: &Shared,
    addr: SocketAddr,
    conn: &mut Conn,
    opts: &Options,
    inflight: &mut VecDeque<Range<u64>>,
    groups: &mut u64,
) -> Result<(), ConnError> {
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        while inflight.len() < opts.pipeline.max(1) {
            let next = {
                let mut sched = sh.sched();
                let fresh = match &sh.route {
                    Some(route) => {
                        sched.next_piece_in(PIECE_GROUPS, |k| route.owner(&sh.id, k) == Some(addr))
                    }
                    None => sched.next_piece(),
                };
                // The endgame: with nothing left to hand out, an idle
                // provider doubles a piece another one still holds (not
                // between gateways: each owns its own pieces).
                match fresh {
                    Some(r) => Some(r),
                    None if inflight.is_empty() && sh.route.is_none() => sched.double_piece(),
                    None => None,
                }
            };
            let Some(r) = next else {
                break;
            };
            inflight.push_back(r.clone());
            let groups = GroupRanges::new(vec![r]).map_err(ConnError::Wire)?;
            conn.send(&Request::GetRanges { id: sh.id, groups })?;
        }
        let Some(r) = inflight.front().cloned() else {
            if sh.sched().is_complete() {
                return Ok(());
            }
            // Others hold the rest; wait in case one fails and gives
            // pieces back.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let budget = tree::encoded_len(sh.manifest.size, std::slice::from_ref(&r))
            .checked_div(opts.min_rate.max(1))
            .map_or(opts.io_timeout, Duration::from_secs);
        conn.reader.get_mut().deadline = Some(Instant::now() + opts.io_timeout.max(budget));
        let got = receive_piece(sh, conn, r, groups);
        conn.reader.get_mut().deadline = None;
        got?;
        inflight.pop_front();
    }
}

fn receive_piece(
    sh: &Shared,
    conn: &mut Conn,
    r: Range<u64>,
    groups: &mut u64,
) -> Result<(), ConnError> {
    let size = sh.manifest.size;
    let want = [r];
    let expected = tree::encoded_len(size, &want);
    match conn.recv()? {
        Response::Ranges { encoded_len } if encoded_len == expected => {}
        Response::Ranges { .. } => return Err(ConnError::Protocol("wrong response length")),
        Response::Error { code } => return Err(ConnError::Refused(code)),
        _ => return Err(ConnError::Protocol("unexpected answer")),
    }
    let ranges = tree::chunk_ranges(&want);
    let root = blake3::Hash::from_bytes(sh.manifest.root);
    let stream = (&mut conn.reader).take(expected);
    for item in DecodeResponseIter::new(root, tree::tree(size), stream, &ranges) {
        match item {
            Ok(BaoContentItem::Parent(_)) => {}
            Ok(BaoContentItem::Leaf(leaf)) => {
                let g = leaf.offset / GROUP_BYTES;
                if leaf.offset % GROUP_BYTES != 0
                    || leaf.data.len() as u64 != tree::group_len(size, g)
                {
                    return Err(ConnError::Protocol("leaf not a whole chunk group"));
                }
                // Verified by the decoder against the tree: only now
                // does it touch the disk.
                // (In the endgame two providers may deliver one group:
                // the same verified bytes, counted once.)
                sh.file
                    .write_all_at(&leaf.data, leaf.offset)
                    .map_err(ConnError::Local)?;
                if sh.sched().complete(g) {
                    sh.done_bytes
                        .fetch_add(leaf.data.len() as u64, Ordering::Relaxed);
                    *groups += 1;
                }
            }
            Err(DecodeError::LeafHashMismatch(c)) => {
                return Err(ConnError::Corrupt(c.0 / tree::CHUNKS_PER_GROUP))
            }
            Err(DecodeError::ParentHashMismatch(node)) => {
                return Err(ConnError::Corrupt(
                    node.chunk_range().start.0 / tree::CHUNKS_PER_GROUP,
                ))
            }
            Err(DecodeError::Io(e)) => return Err(ConnError::Io(e)),
            Err(e) => return Err(ConnError::Io(io::Error::other(e.to_string()))),
        }
    }
    Ok(())
}
