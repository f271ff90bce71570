//! The vault on disk: the LMDB environment under the page cipher; creating,
//! opening and verifying a vault; building a complete one from its contents
//! (init, migration, rotation) and copying them out.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use aes_gcm_siv::aead::generic_array::GenericArray;
use anyhow::{anyhow, bail, Context, Result};
use heed3::types::Bytes;
use heed3::{CommitOrAbort, EnvOpenOptions, WithoutTls};
use zeroize::Zeroizing;

use super::files::{remove_tree, sync_dir, sync_parent};
use super::keys::{short, Header, KeySource, Keys};
use super::meta::encode_identity;
use super::migrate::{migrate, remove_legacy};
use super::pad;
use super::Txn;
use super::{
    layout, Contents, Layout, PageCipher, Vault, HEADER_FILE, LEGACY_IDENTITY, LEGACY_STORE,
    MAP_SIZE, MAX_DBS, META_DB, META_IDENTITY, META_SEQ, NODES_DB, VAULT_DIR, VAULT_NEW,
};
use crate::proto::Identity;

/// The one-line message for an LMDB error while reading a vault: a page that
/// fails authentication gets its own, since it means tampering or damage.
fn read_error(path: &Path, e: heed3::Error) -> anyhow::Error {
    match e {
        heed3::Error::Mdb(heed3::MdbError::CryptoFail)
        | heed3::Error::Mdb(heed3::MdbError::Corrupted)
        | heed3::Error::Mdb(heed3::MdbError::PageNotFound)
        | heed3::Error::Mdb(heed3::MdbError::Invalid)
        | heed3::Error::Mdb(heed3::MdbError::BadTxn) => anyhow!(
            "vault {} failed authentication: it was tampered with or is damaged ({e}); refusing to start, nothing was changed",
            path.display()
        ),
        e => anyhow!("vault {}: {e}", path.display()),
    }
}

fn open_env(dir: &Path, keys: &Keys) -> Result<Vault> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
    let key = GenericArray::clone_from_slice(&keys.store[..]);
    // SAFETY: LMDB memory-maps `data.mdb`; the map is undefined behaviour
    // only if the file is modified outside LMDB's own locking, or the same
    // environment is opened twice in one process. The node opens its vault
    // once per state directory per process, `run` and `key rotate` hold the
    // state directory's lock (`StateLock`), and heed3 itself rejects a
    // second open of one path in this process (`EnvAlreadyOpened`), which we
    // propagate. No unsafe `EnvFlags` are set. The crate denies
    // `unsafe_code`; this is the one audited exception in the vault.
    #[allow(unsafe_code)]
    let env = unsafe { options.open_encrypted::<PageCipher, _>(key, dir) }
        .map_err(|e| read_error(dir, e))?;
    let wtxn = env.write_txn().map_err(|e| read_error(dir, e))?;
    let created = env
        .create_databases_and_commit(wtxn, |opener, wtxn| {
            let nodes = opener.create_database::<Bytes, Bytes>(wtxn, Some(NODES_DB))?;
            let meta = opener.create_database::<Bytes, Bytes>(wtxn, Some(META_DB))?;
            Ok::<_, heed3::Error>(CommitOrAbort::<_, std::convert::Infallible>::Commit((
                nodes, meta,
            )))
        })
        .map_err(|e| read_error(dir, e))?;
    let (nodes, meta) = match created {
        CommitOrAbort::Commit(dbs) => dbs,
        CommitOrAbort::Abort(never) => match never {},
    };
    Ok(Vault {
        env,
        nodes,
        meta,
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
    let vault = open_env(dir, keys)?;
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
        open_env(&vault, &keys)
    }

    /// Opens the vault of `state_dir` with `source`: checks the key, reads
    /// and authenticates every entry, migrates a plaintext state from an
    /// earlier version, and clears what a crash left behind. Every refusal
    /// is one line and changes nothing.
    pub fn open(state_dir: &Path, source: &KeySource) -> Result<Vault> {
        match layout(state_dir) {
            Layout::Empty => bail!(
                "{} holds no node keys: run `qgate init --state-dir {}` first",
                state_dir.display(),
                state_dir.display()
            ),
            Layout::Legacy => migrate(state_dir, source)?,
            Layout::Sealed => {}
        }
        let dir = state_dir.join(VAULT_DIR);
        let header = Header::read(&dir)?;
        let keys = Keys::derive(source, header.kdf, &header.salt)?;
        if keys.key_id != header.key_id {
            return Err(wrong_key(state_dir, &header, &keys));
        }
        let vault = open_env(&dir, &keys)?;
        vault.verify()?;
        vault.pad_old_values()?;
        // A crash in a rotation or migration may have left a second copy:
        // the vault opened, holds everything, so the copy goes.
        let new = state_dir.join(VAULT_NEW);
        if new.exists() {
            tracing::info!("removing {} left by an interrupted rotation", new.display());
            remove_tree(&new)?;
        }
        if state_dir.join(LEGACY_IDENTITY).exists() || state_dir.join(LEGACY_STORE).exists() {
            remove_legacy(state_dir)?;
        }
        Ok(vault)
    }

    /// Pads what an earlier version stored unpadded in the range LMDB
    /// mishandles (the identity, values, peers; see `pad`), in one
    /// transaction: left as they were, the next writes beside them would
    /// meet the bug. A vault padded so is no longer readable by versions
    /// before the padding.
    fn pad_old_values(&self) -> Result<()> {
        let mut wtxn = self.wtxn()?;
        let mut padded = 0;
        for db in [&self.meta, &self.nodes] {
            let mut old: Vec<(Vec<u8>, Zeroizing<Vec<u8>>)> = Vec::new();
            for entry in db.iter(&mut wtxn).map_err(|e| self.err(e))? {
                let (k, v) = entry.map_err(|e| self.err(e))?;
                if pad::needs_padding(v) {
                    old.push((k.to_vec(), Zeroizing::new(pad::stored(v).into_owned())));
                }
            }
            for (k, v) in &old {
                db.put(&mut wtxn, k, v).map_err(|e| self.err(e))?;
            }
            padded += old.len();
        }
        if padded == 0 {
            return Ok(());
        }
        wtxn.commit().map_err(|e| self.err(e))?;
        tracing::info!(
            padded,
            "vault: old entries rewritten padded (an LMDB bug's way round)"
        );
        Ok(())
    }

    /// Reads every entry once: a page that fails authentication is found at
    /// start, not in the middle of a run.
    fn verify(&self) -> Result<()> {
        self.identity()?;
        self.load()?;
        let mut rtxn = self.rtxn()?;
        for entry in self.meta.iter(&mut rtxn).map_err(|e| self.err(e))? {
            entry.map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    pub(super) fn err(&self, e: heed3::Error) -> anyhow::Error {
        read_error(&self.path, e)
    }

    /// A read transaction, in the vault's turn (see [`Txn`]).
    pub(super) fn rtxn(&self) -> Result<Txn<'_, heed3::RoTxn<'_, WithoutTls>>> {
        let turn = self.turn.lock();
        let txn = self.env.read_txn().map_err(|e| self.err(e))?;
        Ok(Txn { txn, _turn: turn })
    }

    /// A write transaction, in the vault's turn (see [`Txn`]).
    pub(super) fn wtxn(&self) -> Result<Txn<'_, heed3::RwTxn<'_>>> {
        let turn = self.turn.lock();
        let txn = self.env.write_txn().map_err(|e| self.err(e))?;
        Ok(Txn { txn, _turn: turn })
    }

    /// Everything, for a copy.
    pub(super) fn contents(&self) -> Result<Contents> {
        let identity = self
            .get_meta(META_IDENTITY)?
            .ok_or_else(|| anyhow!("vault {} holds no identity", self.path.display()))?;
        let seq = self.record_seq()?;
        let mut rtxn = self.rtxn()?;
        let mut nodes = Vec::new();
        for entry in self.nodes.iter(&mut rtxn).map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            nodes.push((k.to_vec(), pad::unstored(v).to_vec()));
        }
        let mut meta = Vec::new();
        for entry in self.meta.iter(&mut rtxn).map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            if k != META_IDENTITY && k != META_SEQ {
                meta.push((k.to_vec(), Zeroizing::new(pad::unstored(v).to_vec())));
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
        self.meta
            .put(
                &mut wtxn,
                META_IDENTITY,
                &Zeroizing::new(pad::stored(&c.identity).into_owned()),
            )
            .map_err(|e| self.err(e))?;
        self.meta
            .put(&mut wtxn, META_SEQ, &c.seq.to_be_bytes())
            .map_err(|e| self.err(e))?;
        for (k, v) in &c.meta {
            self.meta
                .put(&mut wtxn, k, &Zeroizing::new(pad::stored(v).into_owned()))
                .map_err(|e| self.err(e))?;
        }
        for (k, v) in &c.nodes {
            self.nodes
                .put(&mut wtxn, k, &pad::stored(v))
                .map_err(|e| self.err(e))?;
        }
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Closes the environment and waits until LMDB has let go of it.
    pub fn close(self) {
        let Vault { env, .. } = self;
        env.prepare_for_closing().wait();
    }
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
