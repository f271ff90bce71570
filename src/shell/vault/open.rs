//! The vault on disk: the LMDB environment and its four tables; creating,
//! opening, verifying and upgrading a vault; building a complete one from
//! its contents (init, migration, upgrade, rotation) and copying them out;
//! and reading and writing single entries through the sealer.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use heed3::types::Bytes;
use heed3::{CommitOrAbort, Database, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use zeroize::Zeroizing;

use super::files::StateLock;
use super::files::{remove_tree, sync_dir, sync_parent};
use super::keys::{short, Format, Header, KeySource, Keys};
use super::meta::encode_identity;
use super::migrate::{migrate, remove_legacy};
use super::pages;
use super::rotate::{swap_in, RotateStep};
use super::seal::{Opened, Sealer, Table, MAX_KEY};
use super::Txn;
use super::{
    layout, Contents, Layout, Vault, CENSUS_DB, HEADER_FILE, LEGACY_IDENTITY, LEGACY_STORE,
    MAP_SIZE, MAX_DBS, META_DB, META_IDENTITY, META_SEQ, META_VALUES, NODES_DB, VALUES_DB,
    VAULT_DIR, VAULT_NEW,
};
use crate::proto::Identity;

/// The one-line message for a vault that fails to read: damage or
/// tampering gets its own, since it means the vault cannot be trusted.
pub(super) fn read_error(path: &Path, e: heed3::Error) -> anyhow::Error {
    match e {
        heed3::Error::Mdb(heed3::MdbError::CryptoFail)
        | heed3::Error::Mdb(heed3::MdbError::Corrupted)
        | heed3::Error::Mdb(heed3::MdbError::PageNotFound)
        | heed3::Error::Mdb(heed3::MdbError::Invalid)
        | heed3::Error::Mdb(heed3::MdbError::BadTxn) => damaged(path, &e.to_string()),
        e => anyhow!("vault {}: {e}", path.display()),
    }
}

fn damaged(path: &Path, what: &str) -> anyhow::Error {
    anyhow!(
        "vault {} failed authentication: it was tampered with or is damaged ({what}); refusing to start, nothing was changed",
        path.display()
    )
}

/// Whether opening an environment may create its tables: only a vault
/// being built. An existing vault missing one is damaged, and an open
/// writes nothing before it has checked the vault.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tables {
    Create,
    Existing,
}

fn open_env(dir: &Path, header: &Header, keys: &Keys, tables: Tables) -> Result<Vault> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
    // SAFETY: LMDB memory-maps `data.mdb`; the map is undefined behaviour
    // only if the file is modified outside LMDB's own locking, or the same
    // environment is opened twice in one process. Every process that opens
    // a vault (a node, `qgate id` beside it, `key rotate`) does so through
    // LMDB, whose lock file coordinates them; heed3 itself rejects a second
    // open of one path in this process (`EnvAlreadyOpened`), which we
    // propagate. No unsafe `EnvFlags` are set. The crate denies
    // `unsafe_code`; the opens of the vault are the audited exceptions.
    #[allow(unsafe_code)]
    let env = unsafe { options.open(dir) }.map_err(|e| read_error(dir, e))?;
    let dbs = match tables {
        Tables::Create => {
            let wtxn = env.write_txn().map_err(|e| read_error(dir, e))?;
            env.create_databases_and_commit(wtxn, |opener, wtxn| {
                let mut create = |name| {
                    opener
                        .create_database::<Bytes, Bytes>(wtxn, Some(name))
                        .map(Some)
                };
                let dbs = (
                    create(NODES_DB)?,
                    create(META_DB)?,
                    create(VALUES_DB)?,
                    create(CENSUS_DB)?,
                );
                Ok::<_, heed3::Error>(CommitOrAbort::<_, std::convert::Infallible>::Commit(dbs))
            })
        }
        Tables::Existing => {
            let rtxn = env.read_txn().map_err(|e| read_error(dir, e))?;
            env.open_databases_and_commit(rtxn, |opener, rtxn| {
                let open = |name| opener.open_database::<Bytes, Bytes>(rtxn, Some(name));
                let dbs = (
                    open(NODES_DB)?,
                    open(META_DB)?,
                    open(VALUES_DB)?,
                    open(CENSUS_DB)?,
                );
                Ok::<_, heed3::Error>(CommitOrAbort::<_, std::convert::Infallible>::Commit(dbs))
            })
        }
    }
    .map_err(|e| read_error(dir, e))?;
    let (nodes, meta, values, census) = match dbs {
        CommitOrAbort::Commit((Some(n), Some(m), Some(v), Some(c))) => (n, m, v, c),
        CommitOrAbort::Commit(_) => return Err(damaged(dir, "a table is missing")),
        CommitOrAbort::Abort(never) => match never {},
    };
    Ok(Vault {
        env,
        nodes,
        meta,
        values,
        census,
        sealer: Sealer::new(keys, &header.salt),
        path: dir.to_path_buf(),
        turn: parking_lot::Mutex::new(()),
    })
}

/// Builds a complete vault in `dir` (which must not exist): header, tables,
/// contents; committed and synced before it returns.
pub(super) fn build(dir: &Path, header: &Header, keys: &Keys, contents: &Contents) -> Result<()> {
    write_vault(dir, header, keys, contents)?;
    sync_vault(dir)
}

/// Writes a complete vault into `dir` (which must not exist): header,
/// tables, contents, committed in one transaction and closed.
pub(super) fn write_vault(
    dir: &Path,
    header: &Header,
    keys: &Keys,
    contents: &Contents,
) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(HEADER_FILE);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&header.encode()))
        .with_context(|| format!("writing {}", path.display()))?;
    let vault = open_env(dir, header, keys, Tables::Create)?;
    vault.write_all(contents)?;
    vault.close();
    Ok(())
}

/// Makes a written vault durable: its files, its directory, and the entry
/// naming it in the state directory.
pub(super) fn sync_vault(dir: &Path) -> Result<()> {
    for f in [HEADER_FILE, "data.mdb", "lock.mdb"] {
        let p = dir.join(f);
        if p.exists() {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", p.display()))?;
        }
    }
    sync_dir(dir)?;
    sync_parent(dir)
}

impl Vault {
    /// Creates the vault of a new node in `state_dir` (built beside, then
    /// renamed into place). Refuses if any state exists.
    pub fn create(state_dir: &Path, source: &KeySource, identity: &Identity) -> Result<Vault> {
        if layout(state_dir) != Layout::Empty {
            bail!(
                "{} already holds a node's keys; refusing to overwrite them (`qgate id --state-dir {}` prints them)",
                state_dir.display(),
                state_dir.display()
            );
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let (header, keys) = Keys::fresh(source)?;
        let contents = Contents {
            identity: encode_identity(identity)?,
            seq: 0,
            nodes: Vec::new(),
            meta: Vec::new(),
        };
        let new = state_dir.join(VAULT_NEW);
        remove_tree(&new)?;
        build(&new, &header, &keys, &contents)?;
        let vault = state_dir.join(VAULT_DIR);
        fs::rename(&new, &vault).with_context(|| format!("renaming {}", new.display()))?;
        sync_dir(state_dir)?;
        open_env(&vault, &header, &keys, Tables::Existing)
    }

    /// Opens the vault of `state_dir` with `source` for a caller that does
    /// not hold the state directory's lock (`qgate id`). Nothing on disk
    /// changes unless something has to (a migration, an upgrade, a copy
    /// left by a crash) and no one else holds the lock: then it is taken
    /// for the open, which is [`Vault::open_locked`]'s. Beside a running
    /// node or rotation a vault that needs a migration or an upgrade is
    /// refused with a line saying to stop the node first. The lock is not
    /// taken otherwise, so a `qgate id` never makes a node's start fail.
    pub fn open(state_dir: &Path, source: &KeySource) -> Result<Vault> {
        if needs_upkeep(state_dir) {
            if let Ok(lock) = StateLock::take(state_dir) {
                return Vault::open_locked(state_dir, source, &lock);
            }
        }
        Vault::open_with(state_dir, source, Upkeep::No)
    }

    /// Opens the vault of `state_dir` with `source`, under the state
    /// directory's lock: checks the key, migrates a plaintext state from
    /// before the vault, upgrades a page-sealed vault, opens and
    /// authenticates every entry, and clears what a crash left behind.
    /// Every refusal is one line and changes nothing.
    pub fn open_locked(state_dir: &Path, source: &KeySource, _lock: &StateLock) -> Result<Vault> {
        Vault::open_with(state_dir, source, Upkeep::Yes)
    }

    fn open_with(state_dir: &Path, source: &KeySource, upkeep: Upkeep) -> Result<Vault> {
        let busy = |what: &str| {
            anyhow!(
                "{} {what}, which needs the state directory to itself, and a running node or key rotation holds it: stop the node, then run this again",
                state_dir.display()
            )
        };
        match (layout(state_dir), upkeep) {
            (Layout::Empty, _) => bail!(
                "{} holds no node keys: run `qgate init --state-dir {}` first",
                state_dir.display(),
                state_dir.display()
            ),
            (Layout::Legacy, Upkeep::Yes) => migrate(state_dir, source)?,
            (Layout::Legacy, Upkeep::No) => {
                return Err(busy(
                    "holds plaintext state from before the vault; sealing it",
                ))
            }
            (Layout::Sealed, _) => {}
        }
        let dir = state_dir.join(VAULT_DIR);
        let header = Header::read(&dir)?;
        let keys = Keys::derive(source, header.kdf, &header.salt)?;
        if keys.key_id != header.key_id {
            return Err(wrong_key(state_dir, &header, &keys));
        }
        let header = match (header.format, upkeep) {
            (Format::Values, _) => header,
            (Format::Pages, Upkeep::Yes) => upgrade(state_dir, &header, &keys, &|_| Ok(()))?,
            (Format::Pages, Upkeep::No) => {
                return Err(busy("is in the old page-sealed format; upgrading it"))
            }
        };
        let vault = open_env(&dir, &header, &keys, Tables::Existing)?;
        vault.verify()?;
        if upkeep == Upkeep::No {
            return Ok(vault);
        }
        // A crash in a rotation, upgrade or migration may have left a
        // second copy: the vault opened, holds everything, so the copy goes.
        let new = state_dir.join(VAULT_NEW);
        if new.exists() {
            tracing::info!(
                "removing {} left by an interrupted key rotation or upgrade",
                new.display()
            );
            remove_tree(&new)?;
        }
        if state_dir.join(LEGACY_IDENTITY).exists() || state_dir.join(LEGACY_STORE).exists() {
            remove_legacy(state_dir)?;
        }
        Ok(vault)
    }

    /// Opens every entry once: damage is found at start, not in the middle
    /// of a run.
    fn verify(&self) -> Result<()> {
        self.identity()?;
        let rtxn = self.rtxn()?;
        for table in [Table::Meta, Table::Nodes, Table::Values, Table::Census] {
            self.entries(&rtxn, table)?;
        }
        self.check_census(&rtxn)
    }

    /// The one-line error for a vault whose contents fail a check.
    pub(super) fn damaged(&self, what: &str) -> anyhow::Error {
        damaged(&self.path, what)
    }

    pub(super) fn err(&self, e: heed3::Error) -> anyhow::Error {
        read_error(&self.path, e)
    }

    /// A read transaction, in the vault's turn (see [`Txn`]).
    pub(super) fn rtxn(&self) -> Result<Txn<'_, RoTxn<'_, WithoutTls>>> {
        let turn = self.turn.lock();
        let txn = self.env.read_txn().map_err(|e| self.err(e))?;
        Ok(Txn { txn, _turn: turn })
    }

    /// A write transaction, in the vault's turn (see [`Txn`]).
    pub(super) fn wtxn(&self) -> Result<Txn<'_, RwTxn<'_>>> {
        let turn = self.turn.lock();
        let txn = self.env.write_txn().map_err(|e| self.err(e))?;
        Ok(Txn { txn, _turn: turn })
    }

    pub(super) fn db(&self, table: Table) -> &Database<'static, Bytes, Bytes> {
        match table {
            Table::Meta => &self.meta,
            Table::Nodes => &self.nodes,
            Table::Values => &self.values,
            Table::Census => &self.census,
        }
    }

    /// The value `key` holds in `table`, opened.
    pub(super) fn get(
        &self,
        txn: &RoTxn<'_, WithoutTls>,
        table: Table,
        key: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let slot = self.sealer.slot(table, key);
        let Some(stored) = self.db(table).get(txn, &slot).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let opened = self
            .sealer
            .open(table, &slot, stored)
            .map_err(|_| self.damaged("an entry does not open"))?;
        Ok(Some(opened.value))
    }

    /// Seals (`key`, `value`) into `table`, replacing what `key` held, and
    /// counts a new slot in the table's census.
    pub(super) fn put(
        &self,
        txn: &mut RwTxn<'_>,
        table: Table,
        key: &[u8],
        value: &[u8],
    ) -> Result<()> {
        if let Some(slot) = self.put_sealed(txn, table, key, value)? {
            self.count_slot(txn, table, &slot)?;
        }
        Ok(())
    }

    /// Seals (`key`, `value`) into `table` and stores it; the slot if it
    /// was new (the census is the caller's business).
    pub(super) fn put_sealed(
        &self,
        txn: &mut RwTxn<'_>,
        table: Table,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<[u8; 32]>> {
        let (slot, sealed) = self.sealer.seal(table, key, value).ok_or_else(|| {
            anyhow!(
                "vault {}: a key of {} bytes (at most {MAX_KEY}) or a value of {} bytes is too long",
                self.path.display(),
                key.len(),
                value.len()
            )
        })?;
        let db = self.db(table);
        let new = db.get(txn, &slot).map_err(|e| self.err(e))?.is_none();
        db.put(txn, &slot, &sealed).map_err(|e| self.err(e))?;
        Ok(new.then_some(slot))
    }

    /// Every entry of `table`, opened, in key order (the slots' order is
    /// the hashes', which says nothing).
    pub(super) fn entries(&self, txn: &RoTxn<'_, WithoutTls>, table: Table) -> Result<Vec<Opened>> {
        let mut out = Vec::new();
        for entry in self.db(table).iter(txn).map_err(|e| self.err(e))? {
            let (slot, stored) = entry.map_err(|e| self.err(e))?;
            out.push(
                self.sealer
                    .open(table, slot, stored)
                    .map_err(|_| self.damaged("an entry does not open"))?,
            );
        }
        out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Everything, for a copy.
    pub(super) fn contents(&self) -> Result<Contents> {
        let rtxn = self.rtxn()?;
        let identity = self
            .get(&rtxn, Table::Meta, META_IDENTITY)?
            .ok_or_else(|| anyhow!("vault {} holds no identity", self.path.display()))?;
        let seq = self
            .get(&rtxn, Table::Meta, META_SEQ)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map_or(0, u64::from_be_bytes);
        let nodes = self
            .entries(&rtxn, Table::Nodes)?
            .into_iter()
            .map(|o| (o.key, o.value.to_vec()))
            .collect();
        let mut meta = Vec::new();
        for table in [Table::Meta, Table::Values] {
            for o in self.entries(&rtxn, table)? {
                if o.key != META_IDENTITY && o.key != META_SEQ {
                    meta.push((o.key, o.value));
                }
            }
        }
        Ok(Contents {
            identity,
            seq,
            nodes,
            meta,
        })
    }

    /// Writes `contents` into this (new) vault in one transaction.
    fn write_all(&self, c: &Contents) -> Result<()> {
        let mut wtxn = self.wtxn()?;
        let mut meta = self.clear(&mut wtxn, Table::Meta)?;
        let mut values = self.clear(&mut wtxn, Table::Values)?;
        let mut nodes = self.clear(&mut wtxn, Table::Nodes)?;
        self.put_counted(
            &mut wtxn,
            Table::Meta,
            META_IDENTITY,
            &c.identity,
            &mut meta,
        )?;
        let seq = c.seq.to_be_bytes();
        self.put_counted(&mut wtxn, Table::Meta, META_SEQ, &seq, &mut meta)?;
        for (k, v) in &c.meta {
            if k.starts_with(META_VALUES) {
                self.put_counted(&mut wtxn, Table::Values, k, v, &mut values)?;
            } else {
                self.put_counted(&mut wtxn, Table::Meta, k, v, &mut meta)?;
            }
        }
        for (k, v) in &c.nodes {
            self.put_counted(&mut wtxn, Table::Nodes, k, v, &mut nodes)?;
        }
        self.write_tally(&mut wtxn, Table::Meta, &meta)?;
        self.write_tally(&mut wtxn, Table::Values, &values)?;
        self.write_tally(&mut wtxn, Table::Nodes, &nodes)?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Closes the environment and waits until LMDB has let go of it.
    pub fn close(self) {
        let Vault { env, .. } = self;
        env.prepare_for_closing().wait();
    }
}

/// Rewrites a page-sealed vault (`Format::Pages`) as a per-value sealed
/// one under the same master key, the way a rotation swaps: built and
/// synced in `vault.new`, exchanged with `vault` in one rename, the old copy
/// removed. A crash at any point leaves `vault` complete in one format or
/// the other (a leftover `vault.new` goes on the next open).
/// `after` is called after each step (fault injection in tests). Returns
/// the new header.
pub(super) fn upgrade(
    state_dir: &Path,
    header: &Header,
    keys: &Keys,
    after: &dyn Fn(RotateStep) -> Result<()>,
) -> Result<Header> {
    let contents = pages::read(&state_dir.join(VAULT_DIR), keys)?;
    let new = Header {
        format: Format::Values,
        ..header.clone()
    };
    swap_in(state_dir, &new, keys, &contents, after)?;
    tracing::info!(
        peers = contents.nodes.len(),
        entries = contents.meta.len(),
        "vault {}: upgraded from page sealing (LMDB's encryption) to sealing each entry",
        state_dir.join(VAULT_DIR).display()
    );
    Ok(new)
}

/// Whether an open would change what is on disk: a plaintext state to
/// seal, a page-sealed vault to upgrade, a copy left by a crash, plaintext
/// files left by a migration.
fn needs_upkeep(state_dir: &Path) -> bool {
    layout(state_dir) == Layout::Legacy
        || Header::read(&state_dir.join(VAULT_DIR)).is_ok_and(|h| h.format == Format::Pages)
        || state_dir.join(VAULT_NEW).exists()
        || state_dir.join(LEGACY_IDENTITY).exists()
        || state_dir.join(LEGACY_STORE).exists()
}

/// Whether an open may change what is on disk (migrate, upgrade, clear
/// leftovers): only under the state directory's lock.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upkeep {
    Yes,
    No,
}

/// Explains a key whose ID is not the vault's: the wrong key, or one side
/// of a rotation that a crash interrupted.
fn wrong_key(state_dir: &Path, header: &Header, keys: &Keys) -> anyhow::Error {
    let new = state_dir.join(VAULT_NEW);
    if let Ok(other) = Header::read(&new) {
        if other.key_id == keys.key_id {
            return anyhow!(
                "{}: this key ({}) is one side of an interrupted key rotation; the vault is sealed with key {}: start with that key (then rotate again if you want)",
                state_dir.display(),
                short(&keys.key_id),
                short(&header.key_id)
            );
        }
    }
    anyhow!(
        "wrong key: {} is sealed with key {}, the key given is {}; refusing to start, nothing was changed",
        state_dir.display(),
        short(&header.key_id),
        short(&keys.key_id)
    )
}
