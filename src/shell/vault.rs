//! The sealed state: everything the node keeps on disk, encrypted and
//! authenticated under a key derived from a master key that lives outside
//! the state directory (a key file, e.g. on removable media, or a
//! passphrase).
//!
//! ```text
//! DIR/qgate.toml        configuration (no secrets; not sealed)
//! DIR/vault/            directory, mode 0700
//! DIR/vault/header      plaintext, 53 bytes: how to turn the master key into
//!                       the vault key (key file or Argon2id + salt), and a key
//!                       ID (HKDF of the master key) that tells a wrong key
//!                       from a damaged store
//! DIR/vault/data.mdb    LMDB, every page but the two meta pages sealed
//! DIR/vault/lock.mdb    LMDB reader table (no data)
//! ```
//!
//! One LMDB environment holds all state, so one mechanism seals all of it
//! and a rotation can swap it in with one atomic rename:
//! - table `meta`: `identity` (RSA key as PKCS#8 PEM and the X25519 link
//!   secret), `record_seq` (u64), and later extender data;
//! - table `nodes`: the peer store (key = node ID, value = below).
//!
//! Page sealing is heed3's LMDB page encryption. The cipher is
//! AES-256-GCM-SIV, not plain AES-256-GCM: LMDB takes each page's nonce from
//! its page number and transaction ID, and a crash after pages reached the
//! disk but before the commit did makes the next transaction reuse that
//! transaction ID for different contents. Under GCM a repeated nonce leaks
//! the authentication key; under GCM-SIV it only shows that two sealed
//! pages were equal. Keys, values, table names and free pages are all
//! sealed; the meta pages hold only page numbers and sizes.
//!
//! What page sealing does not catch: LMDB does not bind a page to its
//! position beyond the page's own header, so an attacker who can write the
//! file may put back a whole older copy of it, or an older copy of a page.
//! Reads then see old but authentic data; nothing can be forged or read.
//!
//! A state directory from an earlier version (`identity.pem`, `link.key`,
//! `record.seq`, `peers.lmdb/` in the clear) is migrated once, on the first
//! open with a key: the vault is built beside it, renamed into place, and
//! only then are the plaintext files overwritten and removed.

use std::path::{Path, PathBuf};

use heed3::types::Bytes;
use heed3::{EncryptedDatabase, EncryptedEnv, WithoutTls};
use zeroize::Zeroizing;

// The parts: the page cipher (and its test probe), master keys and the
// header, the environment on disk (create, open, copy), one file per table
// (`meta`, `nodes`), migration, rotation, the state lock and file helpers,
// and how values are padded in the tables (`pad`: an LMDB bug's way round).
mod cipher;
mod files;
mod keys;
mod meta;
mod migrate;
mod open;
mod pad;
mod peers;
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod probe;
mod rotate;
#[cfg(test)]
mod tests;

pub use cipher::PageCipher;
pub use files::StateLock;
pub use keys::{default_key_file, generate_key_file, read_passphrase_fd, KeyOptions, KeySource};
pub use peers::StoredPeer;
pub use rotate::{rotate, short_id, RotateStep};

/// The vault directory inside the state directory.
pub const VAULT_DIR: &str = "vault";
/// Where a new vault is built before it is renamed into place (init,
/// migration, rotation). Left over only by a crash.
pub const VAULT_NEW: &str = "vault.new";
/// The plaintext header inside the vault directory.
const HEADER_FILE: &str = "header";
/// LMDB map size: the most the vault can ever hold. Address space, not
/// memory or disk (the file grows as pages are written): room for a full
/// rewrite of every value kept (8,192 held for others, padded to a page
/// each by `pad`, plus this node's own) beside the set it replaces.
const MAP_SIZE: usize = 1 << 30;
/// Named tables the environment may hold.
const MAX_DBS: u32 = 4;
/// The peer table.
const NODES_DB: &str = "nodes";
/// Identity, record sequence and other single values.
const META_DB: &str = "meta";
/// Meta key of the identity.
const META_IDENTITY: &[u8] = b"identity";
/// Meta key of the record sequence number.
const META_SEQ: &[u8] = b"record_seq";
/// Meta keys under this prefix hold the DHT value records the node keeps
/// (those it published through the control API and those it holds for
/// others), one per key.
const META_VALUES: &[u8] = b"dht/value/";

/// Files of a state directory written by qgate before the vault existed.
pub const LEGACY_IDENTITY: &str = "identity.pem";
/// Legacy link key file.
pub const LEGACY_LINK: &str = "link.key";
/// Legacy record sequence file.
pub const LEGACY_SEQ: &str = "record.seq";
/// Legacy (unencrypted) peer store.
pub const LEGACY_STORE: &str = "peers.lmdb";

/// Everything a vault holds, in memory: what a migration or a rotation
/// copies.
struct Contents {
    identity: Zeroizing<Vec<u8>>,
    seq: u64,
    /// Raw (key, value) pairs of the `nodes` table.
    nodes: Vec<(Vec<u8>, Vec<u8>)>,
    /// Other `meta` entries (extender data), copied as they are.
    meta: Vec<(Vec<u8>, Zeroizing<Vec<u8>>)>,
}

/// An open vault.
pub struct Vault {
    env: EncryptedEnv<WithoutTls>,
    nodes: EncryptedDatabase<'static, Bytes, Bytes>,
    meta: EncryptedDatabase<'static, Bytes, Bytes>,
    path: PathBuf,
    /// One transaction at a time, reads included ([`Txn`]).
    turn: parking_lot::Mutex<()>,
}

/// A transaction on the vault that holds the vault's turn: no other
/// transaction, read or write, runs beside it on any thread.
///
/// Why: heed3 0.23.1's encrypted environment (lmdb-master3-sys 0.2.6) is
/// not safe for transactions on several threads at once, though LMDB
/// itself is. Two writers on two threads (LMDB serializes them itself) end
/// within seconds in `MDB_BAD_DBI`; a reader beside one writer in
/// `MDB_PAGE_NOTFOUND`; a daemon under a put storm over the control socket
/// (puts kept by control threads while the timer's task saved the peers)
/// died in a segfault inside LMDB after asking for terabytes of memory
/// (`tests::concurrent_writers_as_in_a_put_storm`, which passes with this
/// turn). Nothing on the data path waits for it: the vault is written by
/// control threads and blocking tasks only.
pub(super) struct Txn<'a, T> {
    // Declared first, so dropped (an unfinished write aborted) before the
    // turn is let go.
    txn: T,
    _turn: parking_lot::MutexGuard<'a, ()>,
}

impl<T> std::ops::Deref for Txn<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.txn
    }
}

impl<T> std::ops::DerefMut for Txn<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.txn
    }
}

impl<'a> Txn<'a, heed3::RwTxn<'a>> {
    /// Commits, then lets go of the turn.
    fn commit(self) -> heed3::Result<()> {
        self.txn.commit()
    }
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("path", &self.path).finish()
    }
}

/// What a state directory holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Layout {
    /// Nothing: `qgate init` has not run.
    Empty,
    /// Plaintext state from a qgate without a vault.
    Legacy,
    /// A vault.
    Sealed,
}

/// Looks at a state directory without opening anything.
pub fn layout(state_dir: &Path) -> Layout {
    if state_dir.join(VAULT_DIR).join(HEADER_FILE).exists() {
        Layout::Sealed
    } else if state_dir.join(LEGACY_IDENTITY).exists() {
        Layout::Legacy
    } else {
        Layout::Empty
    }
}
