//! Sealing one vault entry: what a key is stored under, and what its value
//! becomes on disk.
//!
//! - **Stored key** (`Sealer::slot`): HMAC-SHA256 under the index key of
//!   the table's tag and the key. A node ID, a value's hash or an extender's
//!   key name never reaches the file; equal keys meet in one slot, so LMDB's
//!   put still replaces and its get still finds.
//! - **Stored value** (`Sealer::seal`): `nonce (12) | ciphertext | tag (16)`,
//!   AES-256-GCM-SIV under the value key, over
//!   `version | key length (u16) | key | value length (u32) | value | zeros`,
//!   zero-padded to a multiple of [`PAD`] so a value's length shows only
//!   roughly. The associated data names the format, the vault (the
//!   header's salt, new for every vault `init`, a migration or a key
//!   rotation builds; an upgrade keeps it), the table and the slot: a
//!   sealed value moved to another slot, table or vault fails to open. The key
//!   travels inside, so a table can be listed (`Opened::key`) though its
//!   slots are hashes.
//!
//! The nonce is random: GCM-SIV stays safe if two values ever drew the same
//! one (it then shows only that the two were equal), and the vault seals far
//! fewer than the 2^32 values per key that random 96-bit nonces allow.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keys::Keys;

/// Leads every sealed plaintext.
const SEAL_VERSION: u8 = 1;
/// Sealed plaintexts are padded to a multiple of this.
pub(super) const PAD: usize = 64;
/// The longest key (LMDB's own limit, kept so the keys that fit before
/// still fit and no others).
pub(super) const MAX_KEY: usize = 511;
const NONCE: usize = 12;
const TAG: usize = 16;
/// Bound into every seal's associated data.
const CONTEXT: &[u8] = b"qgate vault v2";

/// The vault's tables, each a tag in its slots and seals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Table {
    /// Identity, record sequence, extender values.
    Meta = 1,
    /// The peer store.
    Nodes = 2,
    /// DHT value records kept.
    Values = 3,
    /// Each other table's census (`census`).
    Census = 4,
}

/// A stored value that does not open: tampered with, damaged, or sealed
/// under another key.
#[derive(Debug)]
pub(super) struct Damaged;

/// An entry opened.
pub(super) struct Opened {
    pub(super) key: Vec<u8>,
    pub(super) value: Zeroizing<Vec<u8>>,
}

/// Seals and opens entries under one vault's keys.
pub(super) struct Sealer {
    aead: Aes256GcmSiv,
    index: Hmac<Sha256>,
    /// The vault's salt (from its header), bound into every seal.
    salt: [u8; 16],
}

impl Sealer {
    pub(super) fn new(keys: &Keys, salt: &[u8; 16]) -> Sealer {
        Sealer {
            salt: *salt,
            aead: Aes256GcmSiv::new((&keys.value[..]).into()),
            index: <Hmac<Sha256> as Mac>::new_from_slice(&keys.index[..])
                .expect("HMAC takes a key of any length"),
        }
    }

    /// The name `key` is stored under in `table`.
    pub(super) fn slot(&self, table: Table, key: &[u8]) -> [u8; 32] {
        let mut mac = self.index.clone();
        mac.update(&[table as u8]);
        mac.update(key);
        mac.finalize().into_bytes().into()
    }

    /// A keyed hash of `slot` in `table` for its table's census: under the
    /// index key, but after a byte (0xCE) no slot's input starts with.
    pub(super) fn tally(&self, table: Table, slot: &[u8]) -> [u8; 32] {
        let mut mac = self.index.clone();
        mac.update(&[0xCE, table as u8]);
        mac.update(slot);
        mac.finalize().into_bytes().into()
    }

    fn aad(&self, table: Table, slot: &[u8]) -> Zeroizing<Vec<u8>> {
        let mut aad = Zeroizing::new(Vec::with_capacity(
            CONTEXT.len() + self.salt.len() + 1 + slot.len(),
        ));
        aad.extend_from_slice(CONTEXT);
        aad.extend_from_slice(&self.salt);
        aad.push(table as u8);
        aad.extend_from_slice(slot);
        aad
    }

    /// `key`'s slot in `table` and the sealed bytes of (`key`, `value`);
    /// `None` for a key longer than [`MAX_KEY`] or a value of 4 GiB.
    pub(super) fn seal(
        &self,
        table: Table,
        key: &[u8],
        value: &[u8],
    ) -> Option<([u8; 32], Vec<u8>)> {
        if key.len() > MAX_KEY {
            return None;
        }
        let slot = self.slot(table, key);
        let key_len = u16::try_from(key.len()).ok()?;
        let value_len = u32::try_from(value.len()).ok()?;
        let len = 1 + 2 + key.len() + 4 + value.len();
        let mut plain = Zeroizing::new(Vec::with_capacity(len.next_multiple_of(PAD)));
        plain.push(SEAL_VERSION);
        plain.extend_from_slice(&key_len.to_be_bytes());
        plain.extend_from_slice(key);
        plain.extend_from_slice(&value_len.to_be_bytes());
        plain.extend_from_slice(value);
        plain.resize(len.next_multiple_of(PAD), 0);
        let mut nonce = [0u8; NONCE];
        OsRng.fill_bytes(&mut nonce);
        let aad = self.aad(table, &slot);
        let sealed = self
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .expect("AES-GCM-SIV seals any message below 64 GiB");
        let mut out = Vec::with_capacity(NONCE + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        #[cfg(feature = "test-hooks")]
        super::probe::observe(&plain, &out);
        Some((slot, out))
    }

    /// Opens what `slot` holds in `table`: the key must be the one the slot
    /// names.
    pub(super) fn open(&self, table: Table, slot: &[u8], stored: &[u8]) -> Result<Opened, Damaged> {
        if stored.len() < NONCE + TAG {
            return Err(Damaged);
        }
        let (nonce, sealed) = stored.split_at(NONCE);
        let aad = self.aad(table, slot);
        let plain = Zeroizing::new(
            self.aead
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
                .map_err(|_| Damaged)?,
        );
        let (&version, rest) = plain.split_first().ok_or(Damaged)?;
        if version != SEAL_VERSION {
            return Err(Damaged);
        }
        let (key_len, rest) = rest.split_first_chunk::<2>().ok_or(Damaged)?;
        let key = rest
            .get(..usize::from(u16::from_be_bytes(*key_len)))
            .ok_or(Damaged)?;
        let rest = &rest[key.len()..];
        let (value_len, rest) = rest.split_first_chunk::<4>().ok_or(Damaged)?;
        let value = usize::try_from(u32::from_be_bytes(*value_len))
            .ok()
            .and_then(|n| rest.get(..n))
            .ok_or(Damaged)?;
        // Authentic, and sealed for this slot; the key inside must name it
        // too (it always does unless the sealing code itself is wrong).
        if self.slot(table, key)[..] != *slot {
            return Err(Damaged);
        }
        Ok(Opened {
            key: key.to_vec(),
            value: Zeroizing::new(value.to_vec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> Keys {
        Keys {
            store: Zeroizing::new([seed; 32]),
            value: Zeroizing::new([seed.wrapping_add(1); 32]),
            index: Zeroizing::new([seed.wrapping_add(2); 32]),
            key_id: [0; 16],
        }
    }

    fn sealer(seed: u8) -> Sealer {
        Sealer::new(&keys(seed), &[seed; 16])
    }

    #[test]
    fn entries_round_trip_and_refuse_every_change() {
        let s = sealer(1);
        for (key, value) in [
            (&b"identity"[..], vec![7u8; 1700]),
            (b"", Vec::new()),
            (&[9u8; 32][..], vec![1u8; 63]),
        ] {
            let (slot, sealed) = s.seal(Table::Nodes, key, &value).unwrap();
            assert_eq!(sealed.len() % PAD, NONCE + TAG);
            let o = s.open(Table::Nodes, &slot, &sealed).unwrap();
            assert_eq!((&o.key[..], &o.value[..]), (key, &value[..]));
            // Two seals of one entry differ (random nonce).
            assert_ne!(s.seal(Table::Nodes, key, &value).unwrap().1, sealed);
            // Every flipped bit is refused.
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x10;
                assert!(s.open(Table::Nodes, &slot, &bad).is_err(), "byte {i}");
            }
            // So are a truncation, another slot, another table, another key.
            assert!(s
                .open(Table::Nodes, &slot, &sealed[..sealed.len() - 1])
                .is_err());
            let other = s.slot(Table::Nodes, b"other");
            assert!(s.open(Table::Nodes, &other, &sealed).is_err());
            assert!(s.open(Table::Meta, &slot, &sealed).is_err());
            assert!(sealer(2).open(Table::Nodes, &slot, &sealed).is_err());
            // Same keys, another vault (salt).
            let elsewhere = Sealer::new(&keys(1), &[9; 16]);
            assert!(elsewhere.open(Table::Nodes, &slot, &sealed).is_err());
        }
        // Slots: keyed, per table, and nothing of the key in them.
        assert_ne!(s.slot(Table::Meta, b"k"), s.slot(Table::Values, b"k"));
        assert_ne!(s.slot(Table::Meta, b"k"), sealer(2).slot(Table::Meta, b"k"));
        assert_eq!(s.slot(Table::Meta, b"k"), s.slot(Table::Meta, b"k"));
        // Keys as long as LMDB took, not longer.
        assert!(s.seal(Table::Meta, &[1; MAX_KEY], b"v").is_some());
        assert!(s.seal(Table::Meta, &[1; MAX_KEY + 1], b"v").is_none());
    }
}
