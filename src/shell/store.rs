//! The persistent peer store: the nodes this node remembers across restarts,
//! kept in an LMDB environment (through `heed3`) in the state directory.
//!
//! ```text
//! DIR/peers.lmdb/            directory, mode 0700
//! DIR/peers.lmdb/data.mdb    LMDB data file, mode 0600
//! DIR/peers.lmdb/lock.mdb    LMDB lock file, mode 0600
//! ```
//!
//! One named database, `nodes`: key = the 32-byte node ID, value =
//!
//! ```text
//! [0]      version (1)
//! [1]      source
//! [2..10]  last_seen_unix, u64 big-endian
//! [10..]   the node's signed record, as received
//! ```
//!
//! Every store access in the project goes through this module. The store
//! is not encrypted yet; `heed3` (not `heed`) is used so that page
//! encryption can be switched on later (`EnvOpenOptions::open_encrypted`,
//! `EncryptedEnv`, `EncryptedDatabase`).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use heed3::types::Bytes;
use heed3::{CommitOrAbort, Database, Env, EnvOpenOptions, WithoutTls};

/// Name of the LMDB environment directory inside the state directory.
pub const STORE_DIR: &str = "peers.lmdb";
/// LMDB map size: the most the store can ever hold.
const MAP_SIZE: usize = 64 * 1024 * 1024;
/// Named databases the environment may hold.
const MAX_DBS: u32 = 4;
/// The peer table.
const NODES_DB: &str = "nodes";
/// Version byte leading every value.
const VALUE_VERSION: u8 = 1;
/// Version, source and last-seen bytes before the record.
const VALUE_HEADER_LEN: usize = 1 + 1 + 8;

/// One remembered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPeer {
    /// The node's signed record, as received (opaque bytes here).
    pub record: Vec<u8>,
    /// Where the entry came from first: 0 = config, 1 = network, 2 = store,
    /// 3 = lan (opaque u8 here).
    pub source: u8,
    /// Unix seconds when the node was last heard from.
    pub last_seen_unix: u64,
}

/// The node's peer store: an open LMDB environment and its `nodes` table.
#[derive(Debug)]
pub struct PeerStore {
    env: Env<WithoutTls>,
    nodes: Database<'static, Bytes, Bytes>,
    path: PathBuf,
}

impl PeerStore {
    /// Opens (creating if needed) the LMDB environment in
    /// `<state_dir>/peers.lmdb/` (directory mode 0700). Map size 64 MiB.
    /// Errors carry context naming the path; opening the same path twice in
    /// one process is an error (heed3 refuses it).
    pub fn open(state_dir: &Path) -> Result<PeerStore> {
        let path = state_dir.join(STORE_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating peer store directory {}", path.display()))?;
        // Also when the directory already existed, or the umask was odd.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting mode 0700 on {}", path.display()))?;

        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
        // SAFETY: LMDB memory-maps `data.mdb`; the map is undefined behaviour
        // only if the file is modified outside LMDB's own locking, or the
        // same environment is opened twice in one process. The node opens
        // its store exactly once, at start (one environment per state dir
        // per process), and refuses to start twice on a control socket, so
        // no second qgate works on the same directory; other processes that
        // would touch it go through LMDB's lock file. heed3 itself rejects a
        // second open of the same path in this process (`EnvAlreadyOpened`),
        // which we propagate. No unsafe `EnvFlags` are set. The crate denies
        // `unsafe_code`; this is the one audited exception in the store.
        #[allow(unsafe_code)]
        let env = unsafe { options.open(&path) }
            .with_context(|| format!("opening peer store {}", path.display()))?;

        let wtxn = env.write_txn().with_context(|| {
            format!(
                "peer store {}: starting a write transaction",
                path.display()
            )
        })?;
        let created = env
            .create_databases_and_commit(wtxn, |opener, wtxn| {
                opener
                    .create_database::<Bytes, Bytes>(wtxn, Some(NODES_DB))
                    .map(CommitOrAbort::<_, std::convert::Infallible>::Commit)
            })
            .with_context(|| {
                format!(
                    "peer store {}: creating the {NODES_DB:?} table",
                    path.display()
                )
            })?;
        let nodes = match created {
            CommitOrAbort::Commit(nodes) => nodes,
            CommitOrAbort::Abort(never) => match never {},
        };
        Ok(PeerStore { env, nodes, path })
    }

    /// All stored peers, keyed by 32-byte node ID, in key order. Entries
    /// whose key or value does not decode are skipped (and counted in a
    /// `tracing::warn!`), never a panic.
    pub fn load(&self) -> Result<Vec<([u8; 32], StoredPeer)>> {
        let rtxn = self
            .env
            .read_txn()
            .with_context(|| self.what("starting a read"))?;
        let mut peers = Vec::new();
        let mut skipped = 0usize;
        for entry in self
            .nodes
            .iter(&rtxn)
            .with_context(|| self.what("reading"))?
        {
            let (key, value) = entry.with_context(|| self.what("reading"))?;
            match (<[u8; 32]>::try_from(key), decode_value(value)) {
                (Ok(id), Some(peer)) => peers.push((id, peer)),
                _ => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                path = %self.path.display(),
                skipped,
                loaded = peers.len(),
                "peer store: skipped entries that do not decode"
            );
        }
        Ok(peers)
    }

    /// Replaces the whole peer table with `peers` in ONE write transaction
    /// (clear + put + commit), so a crash leaves either the old or the new
    /// set. If an ID appears twice, the later entry wins.
    pub fn replace_all(&self, peers: &[([u8; 32], StoredPeer)]) -> Result<()> {
        let mut wtxn = self
            .env
            .write_txn()
            .with_context(|| self.what("starting a write"))?;
        self.nodes
            .clear(&mut wtxn)
            .with_context(|| self.what("clearing"))?;
        let mut value = Vec::new();
        for (id, peer) in peers {
            encode_value(peer, &mut value);
            self.nodes
                .put(&mut wtxn, id, &value)
                .with_context(|| self.what("writing"))?;
        }
        wtxn.commit().with_context(|| self.what("committing"))
    }

    /// Number of stored peers (entries that would not decode count too).
    pub fn len(&self) -> Result<usize> {
        let rtxn = self
            .env
            .read_txn()
            .with_context(|| self.what("starting a read"))?;
        let n = self
            .nodes
            .len(&rtxn)
            .with_context(|| self.what("counting"))?;
        usize::try_from(n).with_context(|| self.what("counting"))
    }

    /// Whether the store holds no entries at all.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Error context: `peer store <path>: <doing>`.
    fn what(&self, doing: &str) -> String {
        format!("peer store {}: {doing}", self.path.display())
    }
}

/// Writes `peer`'s value encoding into `out` (cleared first).
fn encode_value(peer: &StoredPeer, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(VALUE_HEADER_LEN + peer.record.len());
    out.push(VALUE_VERSION);
    out.push(peer.source);
    out.extend_from_slice(&peer.last_seen_unix.to_be_bytes());
    out.extend_from_slice(&peer.record);
}

/// Decodes a value; `None` for an unknown version or a short value.
fn decode_value(value: &[u8]) -> Option<StoredPeer> {
    let (&version, rest) = value.split_first()?;
    if version != VALUE_VERSION {
        return None;
    }
    let (&source, rest) = rest.split_first()?;
    let (seen, record) = rest.split_first_chunk::<8>()?;
    Some(StoredPeer {
        record: record.to_vec(),
        source,
        last_seen_unix: u64::from_be_bytes(*seen),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop (also
    /// when the test panics).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "qgate-store-test-{name}-{}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn peer(i: u8) -> ([u8; 32], StoredPeer) {
        (
            [i; 32],
            StoredPeer {
                record: vec![i; 40 + usize::from(i)],
                source: i % 4,
                last_seen_unix: 1_700_000_000 + u64::from(i) * 0x0101_0101,
            },
        )
    }

    #[test]
    fn round_trip() {
        let dir = TempDir::new("round-trip");
        let store = PeerStore::open(&dir.0).unwrap();
        assert_eq!(store.len().unwrap(), 0);
        assert!(store.is_empty().unwrap());
        assert!(store.load().unwrap().is_empty());
        let peers: Vec<_> = (1..=5).map(peer).collect();
        store.replace_all(&peers).unwrap();
        assert_eq!(store.len().unwrap(), 5);
        assert!(!store.is_empty().unwrap());
        assert_eq!(store.load().unwrap(), peers);
        let mode = fs::metadata(dir.0.join(STORE_DIR))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn replace_all_replaces() {
        let dir = TempDir::new("replace");
        let store = PeerStore::open(&dir.0).unwrap();
        store.replace_all(&[peer(1), peer(2), peer(3)]).unwrap();
        let mut newer = peer(2);
        newer.1.last_seen_unix += 60;
        newer.1.record = b"newer record".to_vec();
        store.replace_all(&[newer.clone(), peer(9)]).unwrap();
        assert_eq!(store.load().unwrap(), vec![newer, peer(9)]);
        store.replace_all(&[]).unwrap();
        assert_eq!(store.len().unwrap(), 0);
    }

    #[test]
    fn reopen_after_drop_keeps_data() {
        let dir = TempDir::new("reopen");
        let peers = vec![peer(7), peer(8)];
        {
            let store = PeerStore::open(&dir.0).unwrap();
            store.replace_all(&peers).unwrap();
        }
        let store = PeerStore::open(&dir.0).unwrap();
        assert_eq!(store.load().unwrap(), peers);
    }

    #[test]
    fn second_open_in_one_process_is_an_error() {
        let dir = TempDir::new("twice");
        let first = PeerStore::open(&dir.0).unwrap();
        let err = PeerStore::open(&dir.0).unwrap_err();
        assert!(format!("{err:#}").contains(STORE_DIR), "{err:#}");
        drop(first);
        PeerStore::open(&dir.0).unwrap();
    }

    #[test]
    fn corrupt_values_are_skipped() {
        let dir = TempDir::new("corrupt");
        let store = PeerStore::open(&dir.0).unwrap();
        store.replace_all(&[peer(1), peer(5)]).unwrap();
        let mut wtxn = store.env.write_txn().unwrap();
        let bad: [(&[u8], &[u8]); 5] = [
            (&[2; 32], &[]),                                         // empty
            (&[3; 32], &[VALUE_VERSION, 1, 0, 0, 0]),                // short header
            (&[4; 32], &[9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xaa]),       // unknown version
            (&[6; 31], &[VALUE_VERSION, 1, 0, 0, 0, 0, 0, 0, 0, 0]), // short key
            (&[7; 33], &[VALUE_VERSION, 1, 0, 0, 0, 0, 0, 0, 0, 0]), // long key
        ];
        for (key, value) in bad {
            store.nodes.put(&mut wtxn, key, value).unwrap();
        }
        wtxn.commit().unwrap();
        assert_eq!(store.len().unwrap(), 7);
        assert_eq!(store.load().unwrap(), vec![peer(1), peer(5)]);
    }

    #[test]
    fn value_layout() {
        let p = StoredPeer {
            record: b"rec".to_vec(),
            source: 3,
            last_seen_unix: 0x0102_0304_0506_0708,
        };
        let mut v = vec![0xff; 4];
        encode_value(&p, &mut v);
        assert_eq!(v, [1, 3, 1, 2, 3, 4, 5, 6, 7, 8, b'r', b'e', b'c']);
        assert_eq!(decode_value(&v), Some(p));
        let empty = StoredPeer {
            record: Vec::new(),
            source: 0,
            last_seen_unix: 0,
        };
        encode_value(&empty, &mut v);
        assert_eq!(v.len(), VALUE_HEADER_LEN);
        assert_eq!(decode_value(&v), Some(empty));
    }
}
