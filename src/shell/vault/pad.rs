//! How a page-sealed vault (`Format::Pages`, read only for its upgrade)
//! stored values: any value of [`PAD_FROM`] bytes or more was padded to at
//! least [`PAD_TO`], so LMDB kept it on overflow pages of its own. A vault
//! sealed per value needs none of this: LMDB's bug is in its page
//! encryption.
//!
//! Why: with page encryption (LMDB's mdb.master3 branch, through heed3
//! 0.23.1 / lmdb-master3-sys 0.2.6, the newest there are), a table that
//! holds a value of about 1.5–2.0 KiB among smaller ones breaks when pages
//! split: writes fail with `MDB_PROBLEM` or `MDB_PAGE_FULL`, and some runs
//! end in a segfault inside LMDB after it asks for terabytes of memory
//! (as transactions on two threads at once do, which the vault's turn,
//! `Txn`, rules out).
//! The node's identity (a PEM of ~1.7 KiB) and DHT value records up to
//! ~1.65 KiB are such values. The same writes without encryption, or with
//! the large value at 2 KiB or more (an overflow page), run clean
//! (`vault::tests::lmdb_encrypted_page_split_bug`, beside records of 820
//! bytes: a value of 900–1,500 bytes passes, 1,600–2,000 fails, 2,040 and
//! more passes). This is LMDB's bug; the padding keeps us out of it, with
//! a margin below.
//!
//! A padded value is `value | zeros | len (u32, big-endian) | MAGIC`.
//! Values written unpadded by earlier versions read back as they are: no
//! value we store ends in `MAGIC` with a length that fits (the identity
//! ends in a PEM footer, records in a signature).

#[cfg(test)]
use std::borrow::Cow;

/// Values this long or longer are padded.
pub(super) const PAD_FROM: usize = 1024;
/// The least a padded value occupies: past LMDB's largest in-page node on
/// 4 KiB pages (~2 KiB), so it goes to an overflow page.
pub(super) const PAD_TO: usize = 2560;
/// Ends a padded value.
const MAGIC: &[u8; 5] = b"QGPAD";
#[cfg(test)]
const TRAILER: usize = 4 + MAGIC.len();

/// The bytes a page-sealed vault stored for `value` (to build one in tests).
#[cfg(test)]
pub(super) fn stored(value: &[u8]) -> Cow<'_, [u8]> {
    if value.len() < PAD_FROM {
        return Cow::Borrowed(value);
    }
    let total = (value.len() + TRAILER).max(PAD_TO);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(value);
    out.resize(total - TRAILER, 0);
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(MAGIC);
    Cow::Owned(out)
}

/// The value `bytes` (as stored) hold.
pub(super) fn unstored(bytes: &[u8]) -> &[u8] {
    let Some(body) = bytes.strip_suffix(MAGIC) else {
        return bytes;
    };
    let Some((body, len)) = body.split_last_chunk::<4>() else {
        return bytes;
    };
    let len = u32::from_be_bytes(*len) as usize;
    if bytes.len() < PAD_TO || len < PAD_FROM || len > body.len() {
        return bytes;
    }
    &body[..len]
}

/// Whether a value stored as `bytes` sits in the size range that breaks
/// encrypted LMDB (stored unpadded by an earlier version).
#[cfg(test)]
pub(super) fn needs_padding(bytes: &[u8]) -> bool {
    (PAD_FROM..PAD_TO).contains(&bytes.len()) && unstored(bytes).len() == bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_old_ones_read_as_they_are() {
        for n in [0, 1, 100, PAD_FROM - 1, PAD_FROM, 1700, 2047, PAD_TO, 5000] {
            let v: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let s = stored(&v);
            assert_eq!(unstored(&s), &v[..], "{n}");
            if n >= PAD_FROM {
                assert!(s.len() >= PAD_TO, "{n}");
                assert!(!needs_padding(&s));
            } else {
                assert_eq!(s.len(), n);
            }
        }
        // Written unpadded by an earlier version: read as is, and flagged.
        let old = vec![b'-'; 1700];
        assert_eq!(unstored(&old), &old[..]);
        assert!(needs_padding(&old));
        // A trailer that doesn't fit is not one.
        let mut odd = vec![1u8; 3000];
        odd.extend_from_slice(&100_000u32.to_be_bytes());
        odd.extend_from_slice(MAGIC);
        assert_eq!(unstored(&odd).len(), odd.len());
    }
}
