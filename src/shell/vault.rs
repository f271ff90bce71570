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
//! DIR/vault/data.mdb    LMDB; every key a keyed hash, every value sealed
//! DIR/vault/lock.mdb    LMDB reader table (no data)
//! ```
//!
//! One LMDB environment holds all state, so a write of several entries is
//! one transaction and a rotation can swap a whole vault in with one atomic
//! rename:
//! - table `meta`: `identity` (RSA key as PKCS#8 PEM and the X25519 link
//!   secret), `record_seq` (u64), and extender data;
//! - table `values`: the DHT value records the node keeps;
//! - table `nodes`: the peer store (key = node ID, value = below);
//! - table `census`: how many entries each other table holds, and which
//!   (`census`), so removed entries are found at open.
//!
//! Each entry is sealed on its own (`seal`): LMDB stores, under a keyed
//! hash of the key, AES-256-GCM-SIV of the key and the value, bound to its
//! vault, table and slot. What the file shows: the table names, how many
//! entries each holds, their sizes to within 64 bytes, and LMDB's page
//! structure. Keys, values, node IDs and which values are kept do not
//! appear.
//!
//! What sealing does not catch: an attacker who can write the file may put
//! back an older copy of it, or an older entry into a slot that still
//! exists (neither changes any table's slots, which is what the census
//! checks). Reads then see old but authentic data; nothing can be forged
//! or read. And LMDB parses its own page structure, which is not sealed,
//! before any entry is authenticated.
//!
//! Until 2026-11 LMDB's own page encryption sealed the vault (heed3's
//! encrypted environment); it crashed under the daemon's writes (see
//! `pages`). A vault in that format is upgraded on its first open
//! (`open::upgrade`), crash-safe as a key rotation is.
//!
//! A state directory from an earlier version (`identity.pem`, `link.key`,
//! `record.seq`, `peers.lmdb/` in the clear) is migrated once, on the first
//! open with a key: the vault is built beside it, renamed into place, and
//! only then are the plaintext files overwritten and removed.

use std::path::{Path, PathBuf};

use heed3::types::Bytes;
use heed3::{Database, Env, WithoutTls};
use zeroize::Zeroizing;

// The parts: how one entry is sealed (and its test probe), master keys and
// the header, the environment on disk (create, open, upgrade, copy), one
// file per table (`meta` with `values`, `nodes`), migration from plaintext,
// rotation, the state lock and file helpers; and, to read a vault of the
// page-sealed format once, its cipher, its reader and its padding.
mod census;
mod cipher;
mod files;
mod keys;
mod meta;
mod migrate;
mod open;
mod pad;
mod pages;
mod peers;
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod probe;
mod rotate;
mod seal;
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
/// rewrite of every value kept (8,192 held for others, up to a page each,
/// plus this node's own) beside the set it replaces.
const MAP_SIZE: usize = 1 << 30;
/// Named tables the environment may hold.
const MAX_DBS: u32 = 8;
/// The peer table.
const NODES_DB: &str = "nodes";
/// Identity, record sequence and other single values.
const META_DB: &str = "meta";
/// The DHT value records kept (keys under [`META_VALUES`]).
const VALUES_DB: &str = "values";
/// Each other table's census (`census`).
const CENSUS_DB: &str = "census";
/// Meta key of the identity.
const META_IDENTITY: &[u8] = b"identity";
/// Meta key of the record sequence number.
const META_SEQ: &[u8] = b"record_seq";
/// Keys under this prefix name the DHT value records the node keeps (those
/// it published through the control API and those it holds for others),
/// one per key, in the `values` table (in `meta` in a page-sealed vault).
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
    /// Other entries: extender data, and the DHT value records (keys under
    /// [`META_VALUES`]), copied as they are.
    meta: Vec<(Vec<u8>, Zeroizing<Vec<u8>>)>,
}

/// An open vault.
pub struct Vault {
    env: Env<WithoutTls>,
    nodes: Database<'static, Bytes, Bytes>,
    meta: Database<'static, Bytes, Bytes>,
    values: Database<'static, Bytes, Bytes>,
    census: Database<'static, Bytes, Bytes>,
    sealer: seal::Sealer,
    path: PathBuf,
    /// One transaction at a time, reads included ([`Txn`]).
    turn: parking_lot::Mutex<()>,
}

/// A transaction on the vault that holds the vault's turn: no other
/// transaction, read or write, runs beside it on any thread.
///
/// Why: heed3 0.23.1's encrypted environment, which sealed the vault
/// before per-value sealing, was not safe for transactions on several
/// threads at once (`pages`). A plain environment is, as LMDB promises:
/// `tests::concurrent_writers_as_in_a_put_storm` passed without the turn
/// (release, 8,000 and 20,000 puts, once each). The turn stays because it
/// costs nothing here (vault work is a few small transactions a second)
/// and keeps every vault access in one order.
/// Nothing on the data path waits for it: the vault is written by control
/// threads and blocking tasks only.
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
