//! Vaults whose LMDB pages are sealed (`Format::Pages`), as versions before
//! per-value sealing wrote them: read once, in one read transaction on one
//! thread, so `open::upgrade` can write their contents as a per-value
//! sealed vault.
//!
//! Why the format went: heed3 0.23.1's page encryption (lmdb-master3-sys
//! 0.2.6, LMDB's mdb.master3 branch) broke under the daemon's writes.
//! Values of ~1.5–2.0 KiB among smaller ones failed page splits
//! (`MDB_PROBLEM`, `MDB_PAGE_FULL`; `tests::lmdb_encrypted_page_split_bug`);
//! transactions on two threads failed (`MDB_BAD_DBI`, `MDB_PAGE_NOTFOUND`);
//! and with both worked round (values padded, one transaction at a time) a
//! `dht put` storm still ended 2 runs in 17 in a segfault in
//! `mdb_page_malloc`, called from the commit's encrypting write
//! (`mdb_page_flush`) with a garbage page count. Reading is not where any
//! of that happened.

use std::path::Path;

use aes_gcm_siv::aead::generic_array::GenericArray;
use anyhow::Result;
use heed3::types::Bytes;
use heed3::{CommitOrAbort, EncryptedDatabase, EnvOpenOptions, RoTxn, WithoutTls};
use zeroize::Zeroizing;

use super::keys::Keys;
use super::open::read_error;
use super::{
    pad, Contents, PageCipher, MAP_SIZE, MAX_DBS, META_DB, META_IDENTITY, META_SEQ, NODES_DB,
};

/// Everything a page-sealed vault in `dir` holds. Any page that fails
/// authentication is the same one-line error as in a per-value vault.
pub(super) fn read(dir: &Path, keys: &Keys) -> Result<Contents> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
    let key = GenericArray::clone_from_slice(&keys.store[..]);
    // SAFETY: as in `open::open_env`: the state directory's lock keeps
    // every other opener away, heed3 refuses a second open of one path in
    // this process, and no unsafe flags are set.
    #[allow(unsafe_code)]
    let env = unsafe { options.open_encrypted::<PageCipher, _>(key, dir) }
        .map_err(|e| read_error(dir, e))?;
    let contents = (|| {
        let rtxn = env.read_txn()?;
        let opened = env.open_databases_and_commit(rtxn, |opener, rtxn| {
            let nodes = opener.open_database::<Bytes, Bytes>(rtxn, Some(NODES_DB))?;
            let meta = opener.open_database::<Bytes, Bytes>(rtxn, Some(META_DB))?;
            Ok::<_, heed3::Error>(CommitOrAbort::<_, std::convert::Infallible>::Commit((
                nodes, meta,
            )))
        })?;
        let (nodes_db, meta_db) = match opened {
            CommitOrAbort::Commit(dbs) => dbs,
            CommitOrAbort::Abort(never) => match never {},
        };
        let mut rtxn = env.read_txn()?;
        let nodes = table(nodes_db.as_ref(), &mut rtxn)?;
        let mut meta = table(meta_db.as_ref(), &mut rtxn)?;
        let mut identity = None;
        let mut seq = 0;
        meta.retain(|(k, v)| {
            if k == META_IDENTITY {
                identity = Some(v.clone());
            } else if k == META_SEQ {
                seq = <[u8; 8]>::try_from(&v[..]).map_or(0, u64::from_be_bytes);
            } else {
                return true;
            }
            false
        });
        Ok::<_, heed3::Error>((identity, seq, nodes, meta))
    })();
    env.prepare_for_closing().wait();
    let (identity, seq, nodes, meta) = contents.map_err(|e| read_error(dir, e))?;
    let identity = identity
        .ok_or_else(|| anyhow::anyhow!("vault {} holds no identity (damaged?)", dir.display()))?;
    Ok(Contents {
        identity,
        seq,
        nodes: nodes.into_iter().map(|(k, v)| (k, v.to_vec())).collect(),
        meta,
    })
}

type Entries = Vec<(Vec<u8>, Zeroizing<Vec<u8>>)>;

/// Every entry of a table (none if it does not exist), unpadded.
fn table(
    db: Option<&EncryptedDatabase<'_, Bytes, Bytes>>,
    rtxn: &mut RoTxn<'_, WithoutTls>,
) -> heed3::Result<Entries> {
    let Some(db) = db else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in db.iter(rtxn)? {
        let (k, v) = entry?;
        out.push((k.to_vec(), Zeroizing::new(pad::unstored(v).to_vec())));
    }
    Ok(out)
}

/// Writes `contents` as a page-sealed vault into the environment directory
/// `dir` (which must exist), as versions before per-value sealing did: for
/// the upgrade's tests.
#[cfg(test)]
pub(super) fn write(dir: &Path, keys: &Keys, contents: &Contents) {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
    let key = GenericArray::clone_from_slice(&keys.store[..]);
    #[allow(unsafe_code)]
    let env = unsafe { options.open_encrypted::<PageCipher, _>(key, dir) }.unwrap();
    let wtxn = env.write_txn().unwrap();
    let (nodes, meta) = env
        .create_databases_and_commit(wtxn, |opener, wtxn| {
            let nodes = opener.create_database::<Bytes, Bytes>(wtxn, Some(NODES_DB))?;
            let meta = opener.create_database::<Bytes, Bytes>(wtxn, Some(META_DB))?;
            Ok::<_, heed3::Error>(CommitOrAbort::<_, ()>::Commit((nodes, meta)))
        })
        .unwrap()
        .unwrap_commit();
    let mut wtxn = env.write_txn().unwrap();
    meta.put(&mut wtxn, META_IDENTITY, &pad::stored(&contents.identity))
        .unwrap();
    meta.put(&mut wtxn, META_SEQ, &contents.seq.to_be_bytes())
        .unwrap();
    for (k, v) in &contents.meta {
        meta.put(&mut wtxn, k, &pad::stored(v)).unwrap();
    }
    for (k, v) in &contents.nodes {
        nodes.put(&mut wtxn, k, &pad::stored(v)).unwrap();
    }
    wtxn.commit().unwrap();
    env.prepare_for_closing().wait();
}
