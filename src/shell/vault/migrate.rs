//! Migration from a plaintext state directory written before the vault
//! existed: sealed once, then the plaintext files are overwritten and
//! removed.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use heed3::types::Bytes;
use heed3::{CommitOrAbort, EnvOpenOptions};
use zeroize::Zeroizing;

use super::files::{remove_tree, sync_dir};
use super::keys::{KeySource, Keys};
use super::meta::encode_identity;
use super::open::build;
use super::{
    Contents, LEGACY_IDENTITY, LEGACY_LINK, LEGACY_SEQ, LEGACY_STORE, MAP_SIZE, MAX_DBS, NODES_DB,
    VAULT_DIR, VAULT_NEW,
};
use crate::proto::Identity;

/// Seals a plaintext state directory once: builds the vault beside it,
/// renames it into place; `Vault::open` then removes the plaintext files.
pub(super) fn migrate(state_dir: &Path, source: &KeySource) -> Result<()> {
    let identity = legacy_identity(state_dir)?;
    let seq = fs::read_to_string(state_dir.join(LEGACY_SEQ))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let nodes = legacy_peers(state_dir)?;
    let (header, keys) = Keys::fresh(source)?;
    let contents = Contents {
        identity: encode_identity(&identity)?,
        seq,
        nodes,
        meta: Vec::new(),
    };
    let new = state_dir.join(VAULT_NEW);
    remove_tree(&new)?;
    build(&new, &header, &keys, &contents)?;
    fs::rename(&new, state_dir.join(VAULT_DIR))
        .with_context(|| format!("renaming {}", new.display()))?;
    sync_dir(state_dir)?;
    tracing::info!(
        peers = contents.nodes.len(),
        "sealed the plaintext state of {} under {}; removing the plaintext files",
        state_dir.display(),
        source.describe()
    );
    Ok(())
}

fn legacy_identity(dir: &Path) -> Result<Identity> {
    let id_path = dir.join(LEGACY_IDENTITY);
    let pem = Zeroizing::new(
        fs::read_to_string(&id_path).with_context(|| format!("reading {}", id_path.display()))?,
    );
    let link_path = dir.join(LEGACY_LINK);
    let link = Zeroizing::new(
        fs::read_to_string(&link_path)
            .with_context(|| format!("reading {}", link_path.display()))?,
    );
    let raw = Zeroizing::new(STANDARD.decode(link.trim()).unwrap_or_default());
    let link: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| anyhow!("{}: not a base64 32-byte key", link_path.display()))?;
    Identity::from_pem(&pem, link).with_context(|| format!("loading {}", id_path.display()))
}

/// The raw entries of a plaintext peer store, if there is one.
fn legacy_peers(dir: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = dir.join(LEGACY_STORE);
    if !path.join("data.mdb").exists() {
        return Ok(Vec::new());
    }
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
    // SAFETY: as in `open_env`: one open of this path in this process, under
    // the state directory's lock, no unsafe flags.
    #[allow(unsafe_code)]
    let env = unsafe { options.open(&path) }
        .with_context(|| format!("opening the plaintext peer store {}", path.display()))?;
    let wtxn = env.write_txn()?;
    let db = match env.create_databases_and_commit(wtxn, |opener, wtxn| {
        opener
            .create_database::<Bytes, Bytes>(wtxn, Some(NODES_DB))
            .map(CommitOrAbort::<_, std::convert::Infallible>::Commit)
    })? {
        CommitOrAbort::Commit(db) => db,
        CommitOrAbort::Abort(never) => match never {},
    };
    let rtxn = env.read_txn()?;
    let mut out = Vec::new();
    for entry in db.iter(&rtxn)? {
        let (k, v) = entry?;
        out.push((k.to_vec(), v.to_vec()));
    }
    drop(rtxn);
    env.prepare_for_closing().wait();
    Ok(out)
}

/// Overwrites and removes the plaintext files of an earlier version.
/// (Overwriting is best effort: on flash storage and copy-on-write file
/// systems the old blocks may survive; the README says so.)
pub(super) fn remove_legacy(state_dir: &Path) -> Result<()> {
    for name in [LEGACY_IDENTITY, LEGACY_LINK, LEGACY_SEQ] {
        shred(&state_dir.join(name))?;
    }
    let store = state_dir.join(LEGACY_STORE);
    if store.exists() {
        shred(&store.join("data.mdb"))?;
        remove_tree(&store)?;
    }
    sync_dir(state_dir)
}

fn shred(path: &Path) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.is_file() {
        if let Ok(mut f) = OpenOptions::new().write(true).open(path) {
            let zeros = vec![0u8; 64 * 1024];
            let mut left = meta.len();
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                if f.write_all(&zeros[..n]).is_err() {
                    break;
                }
                left -= n as u64;
            }
            let _ = f.sync_all();
        }
    }
    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}
