//! The owner side of private storage: the owner key, sealing a file into
//! shares and placing them on distinct holders, reading a file back from
//! any `k` shares, and the owner's index kept in the network.
//!
//! - **Owner key**: 32 random bytes in a file of mode 0600 (by default
//!   `DATA_DIR/owner.key`). Everything the owner has is reachable from it.
//! - **Placement**: share `j` goes to the holder nearest its share ID
//!   (XOR distance to BLAKE3 of the holder's address and port) that
//!   accepts it, never to a holder that already has another share of the
//!   same file; a store succeeds only when all `n` shares are held on `n`
//!   distinct holders, so any `n − k` of them may be lost.
//! - **Index**: the list of stored files (name, size, date, capability) is
//!   JSON, sealed and stored like any file. A [`Pointer`] to it (sequence
//!   number and the index's capability, sealed under a key derived from
//!   the owner key) is published in the DHT under a key also derived from
//!   the owner key, and kept locally in `DATA_DIR/owner-index-<tag>.ptr`. Anyone
//!   can publish under that key; readers ignore values that do not open
//!   and take the highest sequence number.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::announce;
use crate::cap::{Capability, ShareRef};
use crate::fetch::{self, FetchError};
use crate::holder;
use crate::id::Id;
use crate::manifest::{FileManifest, Manifest};
use crate::node::{NodeClient, NodeError};
use crate::private::{self, PrivateError, Scheme};
use crate::progress::Silent;
use crate::seal::{self, StateKey};
use crate::store::{create_temp, write_atomic, StoreError};
use crate::tree;
use crate::wire::{read_frame, ErrorCode, Request, Response, MAX_RESPONSE_FRAME, PROTOCOL_VERSION};

/// Largest pointer value (the DHT's value limit).
pub const MAX_POINTER: usize = 1024;
/// Largest index accepted when reading it back.
pub const MAX_INDEX: u64 = 64 << 20;
/// Lifetime of the pointer in the DHT (its maximum); `qdfs serve`
/// republishes it.
pub const POINTER_TTL_SECS: u64 = 24 * 3600;

/// Why a private-storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
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
    /// The owner key file is missing or malformed.
    #[error("owner key {path}: {why}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Sealing or opening failed.
    #[error("{0}")]
    Private(#[from] PrivateError),
    /// A store operation failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Not every share found a holder.
    #[error("placed {placed} of {n} shares: {found} holders known, {accepted} accepted a share, {refused} refused (quota or busy), {unreachable} unreachable; a store needs {n} distinct holders")]
    Placement {
        /// Shares placed.
        placed: usize,
        /// Shares needed.
        n: usize,
        /// Candidate holders.
        found: usize,
        /// Holders that accepted a share.
        accepted: usize,
        /// Holders that refused.
        refused: usize,
        /// Holders that could not be reached.
        unreachable: usize,
    },
    /// Fewer than `k` shares could be fetched.
    #[error("only {have} of the {n} shares could be fetched, {need} needed (last error: {last})")]
    NotEnoughShares {
        /// Shares fetched.
        have: usize,
        /// Shares needed.
        need: usize,
        /// Shares made.
        n: usize,
        /// The last failure.
        last: String,
    },
    /// The output exists.
    #[error("{0} exists (use --force to replace it)")]
    OutputExists(PathBuf),
    /// The index could not be read.
    #[error("owner index: {0}")]
    Index(String),
    /// No file with this ID in the index.
    #[error("no stored file {0} in the owner's index")]
    UnknownFile(String),
    /// The node could not be asked.
    #[error("{0}")]
    Node(#[from] NodeError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OwnerError {
    let path = path.to_path_buf();
    move |source| OwnerError::Io { what, path, source }
}

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // getrandom(2) blocks only until the pool is first initialised.
    let mut filled = 0;
    while filled < N {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let r = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if r > 0 {
            filled += r as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // No random source: nothing secret may be made.
            panic!("getrandom failed: {}", io::Error::last_os_error());
        }
    }
    b
}

/// The owner's key.
#[derive(Clone)]
pub struct OwnerKey([u8; 32]);

/// The label (associated data) of a sealed owner key file.
const OWNER_KEY_LABEL: &str = "owner.key";

/// Writes `bytes` to a new file at `path`, mode 0600, never over an
/// existing file or through a link, and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), OwnerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(bytes).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("syncing", path))?;
    Ok(())
}

impl std::fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnerKey(..)")
    }
}

impl OwnerKey {
    /// A key from its bytes.
    pub fn from_bytes(b: [u8; 32]) -> OwnerKey {
        OwnerKey(b)
    }

    /// Creates a new random key at `path` (mode 0600, never over an
    /// existing file or through a link): sealed under `state` (the node's
    /// key for QuantumDFS) when there is one, else as 32 plain bytes.
    pub fn create(path: &Path, state: Option<&StateKey>) -> Result<OwnerKey, OwnerError> {
        let key = OwnerKey(random_bytes::<32>());
        let bytes = match state {
            Some(st) => {
                seal::seal(st, OWNER_KEY_LABEL, random_bytes::<24>(), &key.0).map_err(|e| {
                    OwnerError::Key {
                        path: path.into(),
                        why: e.to_string(),
                    }
                })?
            }
            None => key.0.to_vec(),
        };
        write_new(path, &bytes)?;
        Ok(key)
    }

    /// Writes the key as 32 plain bytes to a new file at `path` (mode
    /// 0600): the copy to keep offline (the USB stick), which opens on any
    /// node with `--owner-key`.
    pub fn export(&self, path: &Path) -> Result<(), OwnerError> {
        write_new(path, &self.0)
    }

    /// Reads the key at `path`: 32 plain bytes (an exported copy), or a
    /// key sealed under `state`.
    pub fn load(path: &Path, state: Option<&StateKey>) -> Result<OwnerKey, OwnerError> {
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err("opening", path))?;
        let meta = f.metadata().map_err(io_err("reading", path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "owner key is readable by others (chmod 600 it)");
        }
        let mut b = Vec::new();
        (&mut f)
            .take(256)
            .read_to_end(&mut b)
            .map_err(io_err("reading", path))?;
        let bad = |why: String| OwnerError::Key {
            path: path.into(),
            why,
        };
        if seal::is_sealed(&b) {
            let st = state.ok_or_else(|| {
                bad(
                    "sealed under a node's key, and no node answered to unseal it (start qgate, \
                     or use an exported copy: qdfs key export)"
                        .into(),
                )
            })?;
            b = seal::open(st, OWNER_KEY_LABEL, &b).map_err(|e| bad(e.to_string()))?;
        }
        let key: [u8; 32] = b
            .try_into()
            .map_err(|_| bad("neither 32 bytes nor a sealed key".into()))?;
        Ok(OwnerKey(key))
    }

    /// Reads the key at `path`, creating it first if `create` and missing.
    pub fn load_or_create(
        path: &Path,
        create: bool,
        state: Option<&StateKey>,
    ) -> Result<OwnerKey, OwnerError> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                let k = OwnerKey::create(path, state)?;
                tracing::warn!(path = %path.display(), "created a new owner key: keep a copy (qdfs key export), it is the only way to your stored files");
                Ok(k)
            }
            _ => OwnerKey::load(path, state),
        }
    }

    /// The DHT key the owner's index pointer is published under.
    pub fn dht_key(&self) -> String {
        let k = blake3::derive_key("qdfs owner index v1", &self.0);
        format!(
            "own/{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k)
        )
    }

    fn pointer_cipher(&self) -> XChaCha20Poly1305 {
        let k = blake3::derive_key("qdfs owner pointer v1", &self.0);
        XChaCha20Poly1305::new((&k).into())
    }

    /// Seals a pointer for publishing (at most [`MAX_POINTER`] bytes:
    /// holder hints are dropped if it would not fit).
    pub fn seal_pointer(&self, p: &Pointer) -> Vec<u8> {
        let mut cap = p.cap.clone();
        for s in &mut cap.shares {
            s.hints.truncate(1);
        }
        let mut msg = p.seq.to_be_bytes().to_vec();
        msg.extend_from_slice(&cap.encode());
        if msg.len() + 24 + 16 > MAX_POINTER {
            for s in &mut cap.shares {
                s.hints.clear();
            }
            msg.truncate(8);
            msg.extend_from_slice(&cap.encode());
        }
        let nonce = random_bytes::<24>();
        let aad = self.dht_key();
        let sealed = self
            .pointer_cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &msg,
                    aad: aad.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a pointer value; `None` if it is not this owner's.
    pub fn open_pointer(&self, v: &[u8]) -> Option<Pointer> {
        if v.len() > MAX_POINTER || v.len() < 24 + 16 + 8 {
            return None;
        }
        let (nonce, sealed) = v.split_at(24);
        let aad = self.dht_key();
        let msg = self
            .pointer_cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .ok()?;
        let (seq, cap) = msg.split_at(8);
        let seq = u64::from_be_bytes(seq.try_into().ok()?);
        Some(Pointer {
            seq,
            cap: Capability::parse(cap).ok()?,
        })
    }
}

/// Where the owner's index is: its sequence number and capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    /// Higher is newer.
    pub seq: u64,
    /// The index file's capability.
    pub cap: Capability,
}

/// One stored file in the owner's index.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexEntry {
    /// The file's name when stored.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// When it was stored (Unix seconds).
    pub date: u64,
    /// Its capability (text form).
    pub cap: String,
}

impl std::fmt::Debug for IndexEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the capability: it holds the file's key.
        f.debug_struct("IndexEntry")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("date", &self.date)
            .finish_non_exhaustive()
    }
}

impl IndexEntry {
    /// The entry's capability.
    pub fn capability(&self) -> Result<Capability, OwnerError> {
        self.cap
            .parse()
            .map_err(|e| OwnerError::Index(format!("{}: {e}", self.name)))
    }

    /// The ID `qdfs ls` shows and `qdfs fetch` takes.
    pub fn id(&self) -> String {
        self.capability().map(|c| c.name()).unwrap_or_default()
    }
}

/// The owner's index.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Index {
    /// Format version (1).
    pub v: u32,
    /// Stored files, oldest first.
    pub entries: Vec<IndexEntry>,
}

impl Index {
    /// Parses an index's plaintext.
    pub fn parse(data: &[u8]) -> Result<Index, OwnerError> {
        let i: Index =
            serde_json::from_slice(data).map_err(|e| OwnerError::Index(e.to_string()))?;
        if i.v != 1 {
            return Err(OwnerError::Index(format!("version {} not supported", i.v)));
        }
        Ok(i)
    }

    /// The entry with this ID (or, if unique, this name).
    pub fn find(&self, id: &str) -> Option<&IndexEntry> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.id() == id)
            .or_else(|| {
                let named: Vec<_> = self.entries.iter().filter(|e| e.name == id).collect();
                (named.len() == 1).then(|| named[0])
            })
    }
}

/// Where holders and shares are found, and where temporaries go.
#[derive(Debug, Clone)]
pub struct Net {
    /// Holders given explicitly (tried with those from the DHT).
    pub holders: Vec<SocketAddr>,
    /// The node, for the DHT (`None`: explicit holders and hints only).
    pub node: Option<NodeClient>,
    /// A directory for temporaries (shares being made or read).
    pub work: PathBuf,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// I/O timeout.
    pub io_timeout: Duration,
}

impl Net {
    /// Explicit holders, a node (if any) and a work directory.
    pub fn new(holders: Vec<SocketAddr>, node: Option<NodeClient>, work: PathBuf) -> Net {
        Net {
            holders,
            node,
            work,
            connect_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_secs(20),
        }
    }

    /// Candidate holders: the explicit ones, then those in the DHT with
    /// free quota.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let mut out = self.holders.clone();
        if let Some(node) = &self.node {
            let mut values = Vec::new();
            for key in holder::all_holder_keys() {
                match node.dht_get(announce::NAMESPACE, &key) {
                    Ok(v) => values.extend(v),
                    Err(e) => tracing::debug!("DHT holders: {e}"),
                }
            }
            for (addr, free) in holder::holders(&values) {
                if free > 0 && !out.contains(&addr) {
                    out.push(addr);
                }
            }
        }
        out
    }

    /// Providers of a share: its hints, then its provider records.
    pub fn share_providers(&self, id: &Id, hints: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut out = hints.to_vec();
        if let Some(node) = &self.node {
            let mut values = Vec::new();
            for shard in 0..announce::SHARDS {
                if let Ok(v) = node.dht_get(announce::NAMESPACE, &announce::key(id, shard)) {
                    values.extend(v);
                }
            }
            for p in announce::providers(&values) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// A new private directory under the work directory.
    fn scratch(&self) -> Result<Scratch, OwnerError> {
        fs::create_dir_all(&self.work).map_err(io_err("creating", &self.work))?;
        let name = hex::encode(random_bytes::<8>());
        let p = self.work.join(format!("work-{name}"));
        fs::create_dir(&p).map_err(io_err("creating", &p))?;
        let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o700));
        Ok(Scratch(p))
    }
}

/// A temporary directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// XOR distance between a share ID and a holder.
pub fn distance(id: &Id, holder: &SocketAddr) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    match holder.ip() {
        IpAddr::V4(a) => h.update(&a.octets()),
        IpAddr::V6(a) => h.update(&a.octets()),
    };
    h.update(&holder.port().to_be_bytes());
    let h = h.finalize();
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = id.0[i] ^ h.as_bytes()[i];
    }
    d
}

/// How a holder answered a put.
#[derive(Debug)]
enum PutError {
    Refused(ErrorCode),
    Failed(String),
}

/// Puts one share on one holder.
fn put_share(addr: SocketAddr, m: FileManifest, data: &Path, net: &Net) -> Result<(), PutError> {
    let fail = |e: &dyn std::fmt::Display| PutError::Failed(e.to_string());
    let mut s = TcpStream::connect_timeout(&addr, net.connect_timeout).map_err(|e| fail(&e))?;
    s.set_read_timeout(Some(net.io_timeout))
        .map_err(|e| fail(&e))?;
    s.set_write_timeout(Some(net.io_timeout))
        .map_err(|e| fail(&e))?;
    let recv = |s: &mut TcpStream| -> Result<Response, PutError> {
        let body = read_frame(s, MAX_RESPONSE_FRAME).map_err(|e| fail(&e))?;
        Response::parse(&body).map_err(|e| fail(&e))
    };
    s.write_all(
        &Request::Hello {
            version: PROTOCOL_VERSION,
        }
        .encode(),
    )
    .map_err(|e| fail(&e))?;
    match recv(&mut s)? {
        Response::Hello { .. } => {}
        Response::Error { code } => return Err(PutError::Refused(code)),
        _ => return Err(PutError::Failed("no hello".into())),
    }
    s.write_all(&Request::PutShare { manifest: m }.encode())
        .map_err(|e| fail(&e))?;
    match recv(&mut s)? {
        Response::Stored => return Ok(()),
        Response::Accept => {}
        Response::Error { code } => return Err(PutError::Refused(code)),
        _ => return Err(PutError::Failed("unexpected answer".into())),
    }
    let mut f = File::open(data).map_err(|e| fail(&e))?;
    io::copy(&mut (&mut f).take(m.size), &mut s).map_err(|e| fail(&e))?;
    match recv(&mut s)? {
        Response::Stored => Ok(()),
        Response::Error { code } => Err(PutError::Refused(code)),
        _ => Err(PutError::Failed("unexpected answer".into())),
    }
}

/// One share made on this machine, ready to place.
#[derive(Debug, Clone)]
pub struct LocalShare {
    /// Share number.
    pub index: usize,
    /// Its bytes.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: FileManifest,
}

/// Which node a holder address is: its IP, except on loopback (tests run
/// many holders on one address, told apart by port).
pub fn node_of(a: &SocketAddr) -> (IpAddr, u16) {
    if a.ip().is_loopback() {
        (a.ip(), a.port())
    } else {
        (a.ip(), 0)
    }
}

/// Places each share on a distinct holder node (see the module docs);
/// holders in `exclude` get none. Returns the holder of each share, in
/// order.
pub fn place(
    shares: &[LocalShare],
    candidates: &[SocketAddr],
    exclude: &HashSet<SocketAddr>,
    net: &Net,
) -> Result<Vec<SocketAddr>, OwnerError> {
    // Distinct *nodes*: an overlay address is one node whatever its port
    // (one node announcing several ports must not hold several shares).
    let mut used: HashSet<(IpAddr, u16)> = exclude.iter().map(node_of).collect();
    let mut dead: HashSet<SocketAddr> = HashSet::new();
    let mut refused: HashSet<SocketAddr> = HashSet::new();
    let mut placed = Vec::with_capacity(shares.len());
    for s in shares {
        let id = Manifest::File(s.manifest).id();
        let mut order: Vec<SocketAddr> = candidates
            .iter()
            .copied()
            .filter(|c| !used.contains(&node_of(c)) && !dead.contains(c))
            .collect();
        order.sort_by_key(|c| distance(&id, c));
        let mut holder = None;
        for c in order {
            let placed = put_share(c, s.manifest, &s.path, net).and_then(|()| {
                // A holder that says Stored must prove it: one random chunk
                // group checked against the share's root.
                let g = u64::from_be_bytes(random_bytes::<8>());
                crate::repair::challenge(c, s.manifest, g, net.io_timeout)
                    .map_err(|e| PutError::Failed(format!("failed its first challenge: {e}")))
            });
            match placed {
                Ok(()) => {
                    holder = Some(c);
                    break;
                }
                Err(PutError::Refused(code)) => {
                    tracing::info!(holder = %c, share = s.index, "refused: {code:?}");
                    refused.insert(c);
                }
                Err(PutError::Failed(e)) => {
                    tracing::info!(holder = %c, share = s.index, "unreachable: {e}");
                    dead.insert(c);
                }
            }
        }
        match holder {
            Some(h) => {
                used.insert(node_of(&h));
                refused.remove(&h);
                placed.push(h);
            }
            None => {
                return Err(OwnerError::Placement {
                    placed: placed.len(),
                    n: shares.len(),
                    found: candidates.len(),
                    accepted: placed.len(),
                    refused: refused.len(),
                    unreachable: dead.len(),
                })
            }
        }
    }
    Ok(placed)
}

/// Seals `size` bytes of `data` into `scheme.n` share files in `dir`.
fn seal_to_files(
    data: impl Read,
    size: u64,
    scheme: Scheme,
    dir: &Path,
) -> Result<(private::SealedFile, Vec<LocalShare>), OwnerError> {
    let mut paths = Vec::new();
    let mut files = Vec::new();
    for j in 0..scheme.n as usize {
        let p = dir.join(format!("share-{j}"));
        let f = File::create(&p).map_err(io_err("creating", &p))?;
        paths.push(p);
        files.push(BufWriter::with_capacity(1 << 16, f));
    }
    let sealed = {
        let mut ws: Vec<&mut dyn Write> = files.iter_mut().map(|w| w as &mut dyn Write).collect();
        private::seal(data, size, scheme, random_bytes(), random_bytes(), &mut ws)?
    };
    let mut shares = Vec::new();
    for (j, (w, p)) in files.into_iter().zip(paths).enumerate() {
        w.into_inner()
            .map_err(|e| io_err("writing", &p)(e.into_error()))?;
        shares.push(LocalShare {
            index: j,
            manifest: hash_share(&p)?,
            path: p,
        });
    }
    Ok((sealed, shares))
}

fn hash_share(p: &Path) -> Result<FileManifest, OwnerError> {
    let f = File::open(p).map_err(io_err("opening", p))?;
    let size = f.metadata().map_err(io_err("reading", p))?.len();
    tree::hash_stream(f, size, io::sink()).map_err(|e| OwnerError::Index(e.to_string()))
}

/// Seals `size` bytes of `data` and places its shares; returns the
/// capability.
pub fn store(
    data: impl Read,
    size: u64,
    scheme: Scheme,
    net: &Net,
) -> Result<Capability, OwnerError> {
    let dir = net.scratch()?;
    let (sealed, shares) = seal_to_files(data, size, scheme, &dir.0)?;
    let candidates = net.candidates();
    let holders = place(&shares, &candidates, &HashSet::new(), net)?;
    Ok(Capability {
        file: sealed,
        shares: shares
            .iter()
            .zip(holders)
            .map(|(s, h)| ShareRef {
                root: s.manifest.root,
                hints: vec![h],
            })
            .collect(),
    })
}

/// Fetches shares of `cap` (none of `skip`) into `dir` until `k` of them
/// are there; returns the paths, `None` for shares not fetched.
///
/// `k + 1` shares are fetched at once (originals first, as they need no
/// decoding); when one fails the next share takes its place, and as soon
/// as `k` are complete the others are stopped. So the slowest holder of
/// `k + 1` never holds the read up, at the cost of at most one share's
/// extra transfer.
fn fetch_shares(
    cap: &Capability,
    dir: &Path,
    skip: &HashSet<usize>,
    net: &Net,
) -> Result<Vec<Option<PathBuf>>, OwnerError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    struct Tally {
        got: Vec<Option<PathBuf>>,
        have: usize,
        last: String,
    }
    let (k, n) = (cap.file.scheme.k as usize, cap.file.scheme.n as usize);
    let order: Vec<usize> = (0..n.min(cap.shares.len()))
        .filter(|j| !skip.contains(j))
        .collect();
    let next = AtomicUsize::new(0);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Mutex::new(Tally {
        got: vec![None; n],
        have: 0,
        last: String::from("no holder known"),
    });
    let worker = || loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(&j) = order.get(next.fetch_add(1, Ordering::Relaxed)) else {
            return;
        };
        let (Some(id), Some(s)) = (cap.share_id(j), cap.shares.get(j)) else {
            continue;
        };
        let providers = net.share_providers(&id, &s.hints);
        let p = dir.join(format!("share-{j}"));
        let result = if providers.is_empty() {
            Err("no holder known".to_string())
        } else {
            let mut opts = fetch::Options::new(providers);
            opts.connect_timeout = net.connect_timeout;
            opts.io_timeout = net.io_timeout;
            opts.force = true;
            opts.stop = Arc::clone(&stop);
            fetch::get(&id, &p, &opts, &Silent).map_err(|e| match e {
                FetchError::Interrupted { .. } => String::new(),
                e => e.to_string(),
            })
        };
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(_) if t.have < k => {
                t.got[j] = Some(p);
                t.have += 1;
                if t.have == k {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(e) if e.is_empty() => {}
            Err(e) => {
                tracing::info!(share = j, "share not fetched: {e}");
                t.last = format!("share {j}: {e}");
            }
        }
    };
    std::thread::scope(|sc| {
        for _ in 0..(k + 1).min(order.len()) {
            sc.spawn(worker);
        }
    });
    let t = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    if t.have < k {
        return Err(OwnerError::NotEnoughShares {
            have: t.have,
            need: k,
            n,
            last: t.last,
        });
    }
    Ok(t.got)
}

/// Reads the file of `cap` from any `k` shares, writing its plaintext to
/// `out` (created new beside it, renamed into place when complete).
pub fn read(cap: &Capability, out: &Path, force: bool, net: &Net) -> Result<(), OwnerError> {
    if !force && fs::symlink_metadata(out).is_ok() {
        return Err(OwnerError::OutputExists(out.into()));
    }
    let dir = net.scratch()?;
    let got = fetch_shares(cap, &dir.0, &HashSet::new(), net)?;
    let (tmp, f) = create_temp(out)?;
    let result = open_into(cap, &got, f);
    match result {
        Ok(()) => fs::rename(&tmp, out).map_err(io_err("renaming", &tmp)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn open_into(cap: &Capability, got: &[Option<PathBuf>], out: File) -> Result<(), OwnerError> {
    let mut w = BufWriter::new(&out);
    open_shares(cap, got, &mut w)?;
    w.flush().map_err(|e| OwnerError::Private(e.into()))?;
    drop(w);
    out.sync_all()
        .map_err(|e| OwnerError::Private(PrivateError::Io(e)))
}

/// Opens the shares at `got` (any `k` present) into `out`.
fn open_shares(
    cap: &Capability,
    got: &[Option<PathBuf>],
    out: impl Write,
) -> Result<(), OwnerError> {
    let mut files: Vec<Option<io::BufReader<File>>> = Vec::new();
    for p in got {
        files.push(match p {
            Some(p) => Some(io::BufReader::new(
                File::open(p).map_err(io_err("opening", p))?,
            )),
            None => None,
        });
    }
    let mut rs: Vec<Option<&mut dyn Read>> = files
        .iter_mut()
        .map(|f| f.as_mut().map(|r| r as &mut dyn Read))
        .collect();
    private::open(&cap.file, &mut rs, out)?;
    Ok(())
}

/// Re-creates shares `lost` of `cap` from `k` others and places them on
/// holders not holding any other share of it; returns the capability with
/// the new holders as hints.
pub fn repair(
    cap: &Capability,
    lost: &HashSet<usize>,
    net: &Net,
) -> Result<Capability, OwnerError> {
    let n = cap.file.scheme.n as usize;
    let dir = net.scratch()?;
    let got = fetch_shares(cap, &dir.0, lost, net)?;
    let mut files: Vec<Option<File>> = Vec::new();
    for p in &got {
        files.push(match p {
            Some(p) => Some(File::open(p).map_err(io_err("opening", p))?),
            None => None,
        });
    }
    let mut outs: Vec<Option<BufWriter<File>>> = Vec::new();
    let mut new_paths = HashMap::new();
    for j in 0..n {
        if lost.contains(&j) {
            let p = dir.0.join(format!("new-{j}"));
            outs.push(Some(BufWriter::new(
                File::create(&p).map_err(io_err("creating", &p))?,
            )));
            new_paths.insert(j, p);
        } else {
            outs.push(None);
        }
    }
    {
        let mut readers: Vec<Option<io::BufReader<&File>>> = files
            .iter()
            .map(|f| f.as_ref().map(io::BufReader::new))
            .collect();
        let mut rs: Vec<Option<&mut dyn Read>> = readers
            .iter_mut()
            .map(|f| f.as_mut().map(|r| r as &mut dyn Read))
            .collect();
        let mut ws: Vec<Option<&mut dyn Write>> = outs
            .iter_mut()
            .map(|o| o.as_mut().map(|w| w as &mut dyn Write))
            .collect();
        private::regenerate(&cap.file, &mut rs, &mut ws)?;
    }
    for w in outs.into_iter().flatten() {
        w.into_inner()
            .map_err(|e| OwnerError::Private(e.into_error().into()))?;
    }
    let mut remade = Vec::new();
    let mut lost_sorted: Vec<usize> = lost.iter().copied().collect();
    lost_sorted.sort();
    for j in lost_sorted {
        let p = &new_paths[&j];
        let m = hash_share(p)?;
        if Some(m) != cap.share_manifest(j) {
            return Err(OwnerError::Index(format!(
                "share {j} re-created with a different root (damaged shares?)"
            )));
        }
        remade.push(LocalShare {
            index: j,
            path: p.clone(),
            manifest: m,
        });
    }
    let exclude: HashSet<SocketAddr> = cap
        .shares
        .iter()
        .enumerate()
        .filter(|(j, _)| !lost.contains(j))
        .flat_map(|(_, s)| s.hints.iter().copied())
        .collect();
    let lost_holders: HashSet<SocketAddr> = cap
        .shares
        .iter()
        .enumerate()
        .filter(|(j, _)| lost.contains(j))
        .flat_map(|(_, s)| s.hints.iter().copied())
        .collect();
    let candidates: Vec<SocketAddr> = net
        .candidates()
        .into_iter()
        .filter(|c| !lost_holders.contains(c))
        .collect();
    let holders = place(&remade, &candidates, &exclude, net)?;
    let mut out = cap.clone();
    for (s, h) in remade.iter().zip(holders) {
        out.shares[s.index].hints = vec![h];
    }
    Ok(out)
}

/// The owner's local copy of the pointer (named after the owner's DHT
/// key, so owners sharing a data directory do not replace each other's).
pub fn pointer_path(owner: &OwnerKey, data_dir: &Path) -> PathBuf {
    let tag = blake3::hash(owner.dht_key().as_bytes()).to_hex();
    data_dir.join(format!("owner-index-{}.ptr", &tag[..16]))
}

/// The newest pointer that opens: the local copy and the DHT's values.
pub fn find_pointer(
    owner: &OwnerKey,
    data_dir: &Path,
    net: &Net,
) -> Result<Option<Pointer>, OwnerError> {
    let mut found: Vec<Pointer> = Vec::new();
    if let Ok(b) = fs::read(pointer_path(owner, data_dir)) {
        found.extend(owner.open_pointer(&b));
    }
    if let Some(node) = &net.node {
        match node.dht_get(announce::NAMESPACE, &owner.dht_key()) {
            Ok(values) => found.extend(values.iter().filter_map(|v| owner.open_pointer(&v.value))),
            // With no local pointer either, an empty index would be a
            // guess: a store on top of it would hide every earlier file.
            Err(e) if found.is_empty() => {
                return Err(OwnerError::Index(format!(
                    "cannot read the owner's index pointer from the DHT: {e}"
                )))
            }
            Err(e) => tracing::warn!("owner pointer from the DHT: {e}; using the local one"),
        }
    }
    Ok(found.into_iter().max_by_key(|p| p.seq))
}

/// Reads the owner's index (empty if there is none yet); returns it with
/// the pointer it came from.
pub fn load_index(
    owner: &OwnerKey,
    data_dir: &Path,
    net: &Net,
) -> Result<(Index, Option<Pointer>), OwnerError> {
    let Some(p) = find_pointer(owner, data_dir, net)? else {
        return Ok((
            Index {
                v: 1,
                entries: Vec::new(),
            },
            None,
        ));
    };
    if p.cap.file.size > MAX_INDEX {
        return Err(OwnerError::Index("larger than allowed".into()));
    }
    Ok((Index::parse(&read_to_vec(&p.cap, net)?)?, Some(p)))
}

/// Reads a small sealed file (an index, a folder listing) into memory: its
/// plaintext never touches the disk. The caller bounds its size.
pub fn read_to_vec(cap: &Capability, net: &Net) -> Result<Vec<u8>, OwnerError> {
    let dir = net.scratch()?;
    let got = fetch_shares(cap, &dir.0, &HashSet::new(), net)?;
    let mut bytes = Vec::new();
    open_shares(cap, &got, &mut bytes)?;
    Ok(bytes)
}

/// Stores `index` as a new sealed file and publishes a pointer to it with
/// the next sequence number (locally and, with a node, in the DHT).
pub fn save_index(
    owner: &OwnerKey,
    data_dir: &Path,
    net: &Net,
    index: &Index,
    prev: Option<&Pointer>,
    scheme: Scheme,
) -> Result<Pointer, OwnerError> {
    // Someone else (the repairer, another machine with this key) may have
    // saved since `prev` was read: merge their entries in rather than
    // publish over them. Entries are only ever added or replaced (same
    // ID, new holder hints), so the union by ID loses nothing.
    let mut index = index.clone();
    let mut seq = prev.map_or(0, |p| p.seq);
    if let Some(newest) = find_pointer(owner, data_dir, net)?.filter(|n| n.seq > seq) {
        if newest.cap.file.size > MAX_INDEX {
            return Err(OwnerError::Index("larger than allowed".into()));
        }
        let theirs = Index::parse(&read_to_vec(&newest.cap, net)?)?;
        let ours: HashSet<String> = index.entries.iter().map(IndexEntry::id).collect();
        let missing: Vec<IndexEntry> = theirs
            .entries
            .into_iter()
            .filter(|e| !ours.contains(&e.id()))
            .collect();
        if !missing.is_empty() {
            tracing::info!(
                merged = missing.len(),
                "the owner's index changed meanwhile; merged its entries"
            );
        }
        index.entries.splice(0..0, missing);
        seq = newest.seq;
    }
    let bytes = serde_json::to_vec(&index).map_err(|e| OwnerError::Index(e.to_string()))?;
    let cap = store(&bytes[..], bytes.len() as u64, scheme, net)?;
    let p = Pointer { seq: seq + 1, cap };
    publish_pointer(owner, data_dir, net, &p)?;
    Ok(p)
}

/// Writes the pointer locally and puts it in the DHT (if there is a node).
pub fn publish_pointer(
    owner: &OwnerKey,
    data_dir: &Path,
    net: &Net,
    p: &Pointer,
) -> Result<(), OwnerError> {
    let sealed = owner.seal_pointer(p);
    fs::create_dir_all(data_dir).map_err(io_err("creating", data_dir))?;
    write_atomic(&pointer_path(owner, data_dir), &sealed)?;
    if let Some(node) = &net.node {
        match node.dht_put(
            announce::NAMESPACE,
            &owner.dht_key(),
            &sealed,
            POINTER_TTL_SECS,
        ) {
            Ok(n) => tracing::info!(stored_at = n, seq = p.seq, "owner index pointer published"),
            Err(e) => tracing::warn!("publishing the owner index pointer: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capability {
        Capability {
            file: private::SealedFile {
                key: [1; 32],
                prefix: [2; 16],
                scheme: Scheme::default(),
                size: 77,
            },
            shares: (0..6)
                .map(|j| ShareRef {
                    root: [j; 32],
                    hints: vec!["[fc00:1:2:3:4:5:6:7]:7400".parse().unwrap(); 3],
                })
                .collect(),
        }
    }

    #[test]
    fn pointer_opens_only_for_its_owner() {
        let a = OwnerKey::from_bytes([3; 32]);
        let b = OwnerKey::from_bytes([4; 32]);
        assert_ne!(a.dht_key(), b.dht_key());
        // The DHT's key limit.
        assert!(a.dht_key().len() <= 64);
        let p = Pointer { seq: 9, cap: cap() };
        let v = a.seal_pointer(&p);
        assert!(v.len() <= MAX_POINTER);
        let opened = a.open_pointer(&v).unwrap();
        assert_eq!(opened.seq, 9);
        assert_eq!(opened.cap.shares[0].hints.len(), 1);
        assert_eq!(opened.cap.file, p.cap.file);
        assert!(b.open_pointer(&v).is_none());
        let mut t = v.clone();
        t[30] ^= 1;
        assert!(a.open_pointer(&t).is_none());
        assert!(a.open_pointer(&v[..20]).is_none());
    }

    #[test]
    fn key_file_is_private_and_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("k/owner.key");
        let k = OwnerKey::load_or_create(&p, true, None).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(OwnerKey::create(&p, None).is_err());
        assert_eq!(OwnerKey::load(&p, None).unwrap().0, k.0);
        fs::write(tmp.path().join("short"), b"abc").unwrap();
        assert!(OwnerKey::load(&tmp.path().join("short"), None).is_err());
        assert!(OwnerKey::load_or_create(&tmp.path().join("none"), false, None).is_err());
    }

    #[test]
    fn sealed_key_opens_only_with_its_node_and_exports_plain() {
        let tmp = tempfile::tempdir().unwrap();
        let node = StateKey::derive(&[1; 32]);
        let other = StateKey::derive(&[2; 32]);
        let p = tmp.path().join("owner.key");
        let k = OwnerKey::create(&p, Some(&node)).unwrap();
        let on_disk = fs::read(&p).unwrap();
        assert!(seal::is_sealed(&on_disk));
        assert!(!on_disk.windows(32).any(|w| w == k.0), "key in the clear");
        assert_eq!(OwnerKey::load(&p, Some(&node)).unwrap().0, k.0);
        let e = OwnerKey::load(&p, None).unwrap_err().to_string();
        assert!(e.contains("no node answered"), "{e}");
        assert!(OwnerKey::load(&p, Some(&other)).is_err());
        // The exported copy is the plain key, for any node.
        let usb = tmp.path().join("usb.key");
        k.export(&usb).unwrap();
        assert_eq!(fs::read(&usb).unwrap(), k.0);
        assert_eq!(OwnerKey::load(&usb, Some(&other)).unwrap().0, k.0);
        assert!(k.export(&usb).is_err(), "never over an existing file");
    }

    #[test]
    fn index_parse_and_find() {
        let e = IndexEntry {
            name: "a.txt".into(),
            size: 77,
            date: 1,
            cap: cap().to_text(),
        };
        let i = Index {
            v: 1,
            entries: vec![e.clone()],
        };
        let b = serde_json::to_vec(&i).unwrap();
        assert_eq!(Index::parse(&b).unwrap(), i);
        assert_eq!(i.find(&e.id()), Some(&e));
        assert_eq!(i.find("a.txt"), Some(&e));
        assert!(i.find("b").is_none());
        assert!(Index::parse(b"{\"v\":2,\"entries\":[]}").is_err());
        assert!(Index::parse(b"[").is_err());
    }
}
