//! The `meta` table (the node's identity, the record sequence number,
//! opaque extender values) and the `values` table (the DHT value records
//! the node keeps).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use zeroize::Zeroizing;

use super::seal::Table;
use super::{Vault, META_IDENTITY, META_SEQ, META_VALUES};
use crate::proto::Identity;

/// Version byte leading the identity value.
const IDENTITY_VERSION: u8 = 1;

/// Marks, after [`META_VALUES`], the key of a record added by
/// [`Vault::add_value`]; those of [`Vault::replace_values`] follow the
/// prefix with a 4-byte index, so the two never meet.
const ADDED_VALUE: u8 = b'+';

pub(super) fn encode_identity(identity: &Identity) -> Result<Zeroizing<Vec<u8>>> {
    let pem = Zeroizing::new(identity.rsa_pem()?);
    let link = Zeroizing::new(identity.link_secret_bytes());
    let mut v = Zeroizing::new(Vec::with_capacity(1 + 32 + pem.len()));
    v.push(IDENTITY_VERSION);
    v.extend_from_slice(&link[..]);
    v.extend_from_slice(pem.as_bytes());
    Ok(v)
}

fn decode_identity(v: &[u8]) -> Result<Identity> {
    let bad = || anyhow!("the vault's identity entry does not decode");
    let (&version, rest) = v.split_first().ok_or_else(bad)?;
    if version != IDENTITY_VERSION || rest.len() < 32 {
        return Err(bad());
    }
    let mut link = Zeroizing::new([0u8; 32]);
    link.copy_from_slice(&rest[..32]);
    let pem = std::str::from_utf8(&rest[32..]).map_err(|_| bad())?;
    Identity::from_pem(pem, *link).map_err(|e| anyhow!("the vault's identity: {e}"))
}

impl Vault {
    pub(super) fn get_meta(&self, key: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let rtxn = self.rtxn()?;
        self.get(&rtxn, Table::Meta, key)
    }

    /// The node's identity.
    pub fn identity(&self) -> Result<Identity> {
        let v = self
            .get_meta(META_IDENTITY)?
            .ok_or_else(|| anyhow!("vault {} holds no identity (damaged?)", self.path.display()))?;
        decode_identity(&v)
    }

    /// The record sequence number last used (0 if none).
    pub fn record_seq(&self) -> Result<u64> {
        Ok(self
            .get_meta(META_SEQ)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Picks the sequence number for this run's record: above every earlier
    /// one and normally the current Unix time, so a record from a wiped
    /// state still beats older copies. Stored before it is used.
    pub fn next_record_seq(&self) -> Result<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let seq = now.max(self.record_seq()? + 1);
        self.write_record_seq(seq)?;
        Ok(seq)
    }

    /// Stores the record sequence number in use (committed, so durable,
    /// before a record with it is published).
    pub fn write_record_seq(&self, seq: u64) -> Result<()> {
        let mut wtxn = self.wtxn()?;
        self.put(&mut wtxn, Table::Meta, META_SEQ, &seq.to_be_bytes())?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// The DHT value records kept by the last [`Vault::replace_values`]
    /// (in its order) and those added since ([`Vault::add_value`]).
    pub fn values(&self) -> Result<Vec<Vec<u8>>> {
        let rtxn = self.rtxn()?;
        Ok(self
            .entries(&rtxn, Table::Values)?
            .into_iter()
            .map(|o| o.value.to_vec())
            .collect())
    }

    /// Replaces the kept DHT value records with `records` in one write
    /// transaction (a crash leaves the old or the new set).
    pub fn replace_values<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<()> {
        let mut wtxn = self.wtxn()?;
        let mut tally = self.clear(&mut wtxn, Table::Values)?;
        let mut key = META_VALUES.to_vec();
        for (i, r) in records.iter().enumerate() {
            key.truncate(META_VALUES.len());
            key.extend_from_slice(&(i as u32).to_be_bytes());
            self.put_counted(&mut wtxn, Table::Values, &key, r.as_ref(), &mut tally)?;
        }
        self.write_tally(&mut wtxn, Table::Values, &tally)?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Adds one DHT value record to the kept ones, in a transaction of its
    /// own, for a value this node has just put: kept across a crash without
    /// rewriting every record held (up to `MAX_VALUES` of 2 KiB). The next
    /// [`Vault::replace_values`] folds it into the full set. The key is the
    /// record's SHA-256, so adding a record twice keeps one copy.
    pub fn add_value(&self, record: &[u8]) -> Result<()> {
        use sha2::Digest;
        let mut key = META_VALUES.to_vec();
        key.push(ADDED_VALUE);
        key.extend_from_slice(&sha2::Sha256::digest(record));
        let mut wtxn = self.wtxn()?;
        self.put(&mut wtxn, Table::Values, &key, record)?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Stores an opaque value in the `meta` table under `key` (extender
    /// data; `identity`, `record_seq` and keys under `dht/value/` are
    /// reserved).
    pub fn put_meta(&self, key: &[u8], value: &[u8]) -> Result<()> {
        if key == META_IDENTITY || key == META_SEQ || key.starts_with(META_VALUES) {
            bail!("vault key {:?} is reserved", String::from_utf8_lossy(key));
        }
        let mut wtxn = self.wtxn()?;
        self.put(&mut wtxn, Table::Meta, key, value)?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Reads an opaque `meta` value.
    pub fn meta_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.get_meta(key)?.map(|v| v.to_vec()))
    }
}
