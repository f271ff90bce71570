//! The census: which entries each table holds, sealed, so that entries
//! removed from the file (or slots added) are found when the vault opens.
//!
//! Per-entry sealing leaves LMDB's structure plain: without this, someone
//! who can write `data.mdb` could delete a kept value or a peer and the
//! node would never know. The `census` table holds, for each of the other
//! three tables, one sealed entry: the number of slots and the XOR of a
//! keyed hash of each slot (`Sealer::tally`). Every write that adds a slot
//! updates it in the same transaction; a table cleared resets it. Opening
//! recounts every table and compares (`Vault::check_census`).
//!
//! Why XOR of keyed hashes suffices: the hashes' key is the vault's index
//! key, and the census itself is sealed, so someone without the master key
//! knows neither any slot's hash nor the sum; a set of slots other than
//! the true one matches it only by chance (2^-256). What it does not catch
//! is a whole older copy of the vault, or an older entry put back into a
//! slot that still exists: the slot set is then unchanged.

use anyhow::{anyhow, Result};
use heed3::{RoTxn, RwTxn, WithoutTls};

use super::seal::Table;
use super::Vault;

/// The tables a census is kept of. Every vault is built with a census of
/// each (`open::write_all`); one missing is damage.
pub(super) const COUNTED: [Table; 3] = [Table::Meta, Table::Nodes, Table::Values];

/// One table's census.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Tally {
    count: u64,
    sum: [u8; 32],
}

impl Tally {
    fn add(&mut self, hash: [u8; 32]) {
        self.count += 1;
        for (s, h) in self.sum.iter_mut().zip(hash) {
            *s ^= h;
        }
    }

    fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.count.to_be_bytes());
        out[8..].copy_from_slice(&self.sum);
        out
    }

    fn decode(b: &[u8]) -> Option<Tally> {
        let (count, sum) = b.split_first_chunk::<8>()?;
        Some(Tally {
            count: u64::from_be_bytes(*count),
            sum: sum.try_into().ok()?,
        })
    }
}

/// The census table's key for `table`'s census.
fn key(table: Table) -> [u8; 1] {
    [table as u8]
}

impl Vault {
    /// Counts a slot just added to `table`.
    pub(super) fn count_slot(&self, txn: &mut RwTxn<'_>, table: Table, slot: &[u8]) -> Result<()> {
        let mut tally = self.tally(txn, table)?;
        tally.add(self.sealer.tally(table, slot));
        self.write_tally(txn, table, &tally)
    }

    /// Empties `table` for a rewrite: the entries then go in with
    /// [`Vault::put_counted`] and the census with [`Vault::write_tally`],
    /// once, rather than an update per entry.
    pub(super) fn clear(&self, txn: &mut RwTxn<'_>, table: Table) -> Result<Tally> {
        self.db(table).clear(txn).map_err(|e| self.err(e))?;
        Ok(Tally::default())
    }

    /// [`Vault::put`] into a table being rewritten, counted in `tally`.
    pub(super) fn put_counted(
        &self,
        txn: &mut RwTxn<'_>,
        table: Table,
        key: &[u8],
        value: &[u8],
        tally: &mut Tally,
    ) -> Result<()> {
        if let Some(slot) = self.put_sealed(txn, table, key, value)? {
            tally.add(self.sealer.tally(table, &slot));
        }
        Ok(())
    }

    /// Recounts every table and compares with its census.
    pub(super) fn check_census(&self, txn: &RoTxn<'_, WithoutTls>) -> Result<()> {
        for table in COUNTED {
            let mut found = Tally::default();
            for entry in self.db(table).iter(txn).map_err(|e| self.err(e))? {
                let (slot, _) = entry.map_err(|e| self.err(e))?;
                found.add(self.sealer.tally(table, slot));
            }
            if found != self.tally(txn, table)? {
                return Err(self.damaged(&format!(
                    "the {table:?} table's entries are not those its census counts: some were removed or added"
                )));
            }
        }
        Ok(())
    }

    fn tally(&self, txn: &RoTxn<'_, WithoutTls>, table: Table) -> Result<Tally> {
        let v = self
            .get(txn, Table::Census, &key(table))?
            .ok_or_else(|| self.damaged(&format!("the {table:?} table's census is missing")))?;
        Tally::decode(&v)
            .ok_or_else(|| anyhow!("vault {}: a census does not decode", self.path.display()))
    }

    pub(super) fn write_tally(
        &self,
        txn: &mut RwTxn<'_>,
        table: Table,
        tally: &Tally,
    ) -> Result<()> {
        self.put_sealed(txn, Table::Census, &key(table), &tally.encode())
            .map(|_| ())
    }
}
