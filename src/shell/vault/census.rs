//! The census: which entries each table holds, sealed, so that entries
//! removed from the file (or slots added) are found when the vault opens.
//!
//! Per-entry sealing leaves LMDB's structure plain: without this, someone
//! who can write `data.mdb` could delete a kept value or a peer and the
//! node would never know. The `census` table holds one sealed entry with,
//! for each of the other three tables, the number of slots and the XOR of
//! a keyed hash of each slot (`Sealer::tally`). Every write that adds a
//! slot updates it in the same transaction; a rewrite counts its table in
//! memory and writes it once. Opening recounts every table and compares
//! (`Vault::check_census`). One entry for all three, so one table can't
//! be rolled back with its own count while the others stay current.
//!
//! Why XOR of keyed hashes suffices: the hashes' key is the vault's index
//! key, and the census itself is sealed, so someone without the master key
//! knows neither any slot's hash nor the sum; a set of slots other than
//! the true one matches it only by chance (2^-256). What it does not catch:
//! a whole older copy of the vault, an older entry put back into a slot
//! that still exists (the slot set is then unchanged), or an older copy of
//! one table taken while the others were as they are now.

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

/// The census table's one key.
const KEY: &[u8] = b"all";

/// Where `table`'s tally sits in the census.
fn place(table: Table) -> usize {
    COUNTED.iter().position(|t| *t == table).unwrap_or(0)
}

fn encode(all: &[Tally; 3]) -> [u8; 120] {
    let mut out = [0u8; 120];
    for (chunk, t) in out.chunks_exact_mut(40).zip(all) {
        chunk.copy_from_slice(&t.encode());
    }
    out
}

fn decode(b: &[u8]) -> Option<[Tally; 3]> {
    if b.len() != 120 {
        return None;
    }
    let mut all = [Tally::default(); 3];
    for (t, chunk) in all.iter_mut().zip(b.chunks_exact(40)) {
        *t = Tally::decode(chunk)?;
    }
    Some(all)
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

    /// The census, or `None` in a vault being built.
    fn census(&self, txn: &RoTxn<'_, WithoutTls>) -> Result<Option<[Tally; 3]>> {
        let Some(v) = self.get(txn, Table::Census, KEY)? else {
            return Ok(None);
        };
        decode(&v)
            .map(Some)
            .ok_or_else(|| anyhow!("vault {}: the census does not decode", self.path.display()))
    }

    fn tally(&self, txn: &RoTxn<'_, WithoutTls>, table: Table) -> Result<Tally> {
        let all = self
            .census(txn)?
            .ok_or_else(|| self.damaged("the census is missing"))?;
        Ok(all[place(table)])
    }

    pub(super) fn write_tally(
        &self,
        txn: &mut RwTxn<'_>,
        table: Table,
        tally: &Tally,
    ) -> Result<()> {
        let mut all = self.census(txn)?.unwrap_or_default();
        all[place(table)] = *tally;
        self.put_sealed(txn, Table::Census, KEY, &encode(&all))
            .map(|_| ())
    }
}
