//! The control API's requests for extenders that need more than the DHT:
//! a key per extender, and the service records' encoding (the records
//! themselves are DHT values under `qgate_api::SERVICE_NAMESPACE`, written
//! and read by `run`'s DHT calls).
//!
//! Extender keys. `extender_key NAME` answers
//! HKDF-SHA256(salt = [`KEY_SALT`], input = the node's link secret (its
//! x25519 static key, part of its identity, sealed in the vault),
//! info = NAME), 32 bytes. The same name gets the same key for as long as
//! the node keeps its identity (restarts, master-key rotations); another
//! name or another node gets an unrelated key, and the key says nothing
//! about the link secret (HKDF is a PRF in its info). Who may ask: whoever
//! may use the control socket, for any name: the socket is the trust
//! boundary (root, the node's user, members of its group). Two extenders
//! that must not read each other's keys need separate nodes, or one of
//! them kept off the socket's group.

use hkdf::Hkdf;
use sha2::Sha256;

/// HKDF salt of extender keys: names the purpose and its version, so the
/// link secret's other uses never meet these outputs.
pub const KEY_SALT: &[u8] = b"qgate extender key v1";

/// Derives extender keys from the node's link secret.
pub struct ExtenderKeys {
    prk: Hkdf<Sha256>,
}

impl ExtenderKeys {
    /// From the node's link secret (the caller zeroizes its copy).
    pub fn new(link_secret: &[u8; 32]) -> ExtenderKeys {
        ExtenderKeys {
            prk: Hkdf::<Sha256>::new(Some(KEY_SALT), link_secret),
        }
    }

    /// The key of extender `name` (checked by the API crate's
    /// `check_name` before it gets here).
    pub fn key(&self, name: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        // 32 bytes are far below HKDF-SHA256's 8160-byte limit.
        let _ = self.prk.expand(name.as_bytes(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_per_name_and_per_node() {
        let a = ExtenderKeys::new(&[1; 32]);
        let b = ExtenderKeys::new(&[2; 32]);
        assert_eq!(a.key("dfs"), a.key("dfs"));
        assert_ne!(a.key("dfs"), a.key("dfs2"));
        assert_ne!(a.key("dfs"), b.key("dfs"));
        assert_ne!(a.key("dfs"), [0; 32]);
        // Fixed: a change of derivation would change every extender's key.
        assert_eq!(
            hex::encode(a.key("dfs")),
            hex::encode({
                let mut o = [0u8; 32];
                Hkdf::<Sha256>::new(Some(b"qgate extender key v1"), &[1; 32])
                    .expand(b"dfs", &mut o)
                    .unwrap();
                o
            })
        );
    }
}
