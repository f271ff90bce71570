//! QuantumDFS state sealed at rest, sans IO: the small files that say what
//! a node keeps and for whom (the owner key, the owner's index, where
//! shared files are) are encrypted and authenticated under a key that the
//! data directory does not hold.
//!
//! The key comes from outside the data directory, as the node's vault key
//! does: from the node (its extender key for `qdfs`, asked over the control
//! socket) or from a key file named in the configuration. A data directory
//! copied off a disk therefore shows none of it.
//!
//! Format of a sealed file: magic `QDS1`, a random 24-byte nonce, then the
//! XChaCha20-Poly1305 ciphertext and tag. The associated data is the file's
//! label (its role, e.g. `"owner.key"`), so a sealed file moved to another
//! name does not open. A sealed file is rewritten whole with a new nonce.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const MAGIC: &[u8; 4] = b"QDS1";
const NONCE: usize = 24;
const TAG: usize = 16;
/// Longest plaintext sealed (a file holding more is not "small state").
pub const MAX_SEALED: usize = 64 << 20;

/// The key state is sealed under.
#[derive(Clone)]
pub struct StateKey([u8; 32]);

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(..)")
    }
}

impl StateKey {
    /// The state key derived from a 32-byte secret (the node's extender
    /// key, or a key file's contents), for this purpose only.
    pub fn derive(secret: &[u8; 32]) -> StateKey {
        StateKey(blake3::derive_key(
            "quantumdfs 2026 state sealing v1",
            secret,
        ))
    }
}

/// Why sealed bytes did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not a sealed file (no magic, too short).
    #[error("not a sealed QuantumDFS file")]
    NotSealed,
    /// The tag did not verify: another key, another label, or damage.
    #[error("does not open with this key (another node's or owner's key, or damaged)")]
    WrongKeyOrDamaged,
    /// Longer than [`MAX_SEALED`].
    #[error("sealed file larger than {MAX_SEALED} bytes")]
    TooLarge,
}

/// Seals `plain` for the file labelled `label`, with a fresh random
/// `nonce` (the caller draws it from the OS).
pub fn seal(
    key: &StateKey,
    label: &str,
    nonce: [u8; NONCE],
    plain: &[u8],
) -> Result<Vec<u8>, SealError> {
    if plain.len() > MAX_SEALED {
        return Err(SealError::TooLarge);
    }
    let c = XChaCha20Poly1305::new((&key.0).into());
    let ct = c
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: label.as_bytes(),
            },
        )
        .map_err(|_| SealError::TooLarge)?;
    let mut out = Vec::with_capacity(MAGIC.len() + NONCE + ct.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens what [`seal`] made for the same label.
pub fn open(key: &StateKey, label: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < MAGIC.len() + NONCE + TAG || &sealed[..MAGIC.len()] != MAGIC {
        return Err(SealError::NotSealed);
    }
    if sealed.len() > MAX_SEALED + MAGIC.len() + NONCE + TAG {
        return Err(SealError::TooLarge);
    }
    let (nonce, ct) = sealed[MAGIC.len()..].split_at(NONCE);
    XChaCha20Poly1305::new((&key.0).into())
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: label.as_bytes(),
            },
        )
        .map_err(|_| SealError::WrongKeyOrDamaged)
}

/// Whether bytes look like a sealed file (to tell one from a plaintext
/// file of an older version).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let k = StateKey::derive(&[7; 32]);
        let other = StateKey::derive(&[8; 32]);
        let s = seal(&k, "owner.key", [1; 24], b"secret index").unwrap();
        assert!(is_sealed(&s));
        assert!(!s.windows(6).any(|w| w == b"secret"), "plaintext visible");
        assert_eq!(open(&k, "owner.key", &s).unwrap(), b"secret index");
        assert_eq!(
            open(&other, "owner.key", &s),
            Err(SealError::WrongKeyOrDamaged)
        );
        assert_eq!(open(&k, "index", &s), Err(SealError::WrongKeyOrDamaged));
        let mut bad = s.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            open(&k, "owner.key", &bad),
            Err(SealError::WrongKeyOrDamaged)
        );
        assert_eq!(open(&k, "owner.key", b"QDS1"), Err(SealError::NotSealed));
        assert_eq!(
            open(&k, "owner.key", b"plain text"),
            Err(SealError::NotSealed)
        );
        for len in 0..s.len() {
            assert!(open(&k, "owner.key", &s[..len]).is_err());
        }
    }
}
