//! Signed records the DHT carries, and their RSA checks.
//!
//! Node records are [`NodeRecord`]s with an expiry in their extension area.
//! Value records are what extenders publish: one entry per (namespace, key,
//! publisher), signed by the publishing node's RSA key:
//!
//! ```text
//! version u8 = 1 | ns_len u8 | namespace | key_len u8 | key |
//! seq u64 | expires u64 | value_len u16 | value |
//! spki_len u16 | spki | sig_len u16 | sig
//! ```
//!
//! (big-endian; the signature covers a domain-separation context followed
//! by everything before `sig_len`). A value record lives in the DHT at
//! SHA-256("QuantumGate DHT key\0" | ns_len | namespace | key_len | key).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::dht::{Key, RecordError, RecordInfo, Records, ValueInfo, MAX_VALUE_LEN};
use super::identity::{
    verify_signature, Identity, IdentityError, NodeId, NodeRecord, RecordExt, MAX_RECORD_LEN,
};

/// Longest namespace.
pub const MAX_NAMESPACE: usize = 32;
/// Longest key.
pub const MAX_KEY: usize = 64;
/// Longest lifetime of a value record.
pub const MAX_VALUE_TTL: u64 = 24 * 3600;
/// Longest lifetime of a node record.
pub const MAX_RECORD_TTL: u64 = 7 * 24 * 3600;
/// Clock difference tolerated when judging expiry times from the future.
const CLOCK_SLACK: u64 = 600;
/// Checks remembered (by record hash) before the cache starts over.
const CACHE: usize = 8192;

const VALUE_VERSION: u8 = 1;
const VALUE_SIG_CONTEXT: &[u8] = b"QuantumGate DHT value\0";
const KEY_CONTEXT: &[u8] = b"QuantumGate DHT key\0";

/// Where a (namespace, key) lives in the DHT.
pub fn value_target(namespace: &[u8], key: &[u8]) -> Key {
    let mut h = Sha256::new();
    h.update(KEY_CONTEXT);
    h.update([namespace.len() as u8]);
    h.update(namespace);
    h.update([key.len() as u8]);
    h.update(key);
    h.finalize().into()
}

/// A value record, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedValue {
    /// Namespace (an extender's name).
    pub namespace: Vec<u8>,
    /// Key within the namespace.
    pub key: Vec<u8>,
    /// Sequence number (per namespace, key and publisher).
    pub seq: u64,
    /// Unix time it expires.
    pub expires: u64,
    /// The value.
    pub value: Vec<u8>,
    /// The publisher's RSA public key (DER).
    pub public_der: Vec<u8>,
    /// Signature.
    pub signature: Vec<u8>,
}

/// Why a value can't be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Namespace empty or too long.
    #[error("namespace must be 1 to {MAX_NAMESPACE} bytes")]
    Namespace,
    /// Key empty or too long.
    #[error("key must be 1 to {MAX_KEY} bytes")]
    Key,
    /// Value too long.
    #[error("value must be at most {MAX_VALUE_LEN} bytes")]
    Value,
    /// Lifetime out of range.
    #[error("lifetime must be 1 to {MAX_VALUE_TTL} seconds")]
    Ttl,
}

impl SignedValue {
    fn unsigned(&self, out: &mut Vec<u8>) {
        out.push(VALUE_VERSION);
        out.push(self.namespace.len() as u8);
        out.extend_from_slice(&self.namespace);
        out.push(self.key.len() as u8);
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.expires.to_be_bytes());
        out.extend_from_slice(&(self.value.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.value);
        out.extend_from_slice(&(self.public_der.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.public_der);
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = VALUE_SIG_CONTEXT.to_vec();
        self.unsigned(&mut out);
        out
    }

    /// Signs a value as `identity`.
    pub fn sign(
        identity: &Identity,
        namespace: &[u8],
        key: &[u8],
        value: &[u8],
        seq: u64,
        expires: u64,
    ) -> Result<SignedValue, ValueError> {
        if namespace.is_empty() || namespace.len() > MAX_NAMESPACE {
            return Err(ValueError::Namespace);
        }
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(ValueError::Key);
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(ValueError::Value);
        }
        let mut v = SignedValue {
            namespace: namespace.to_vec(),
            key: key.to_vec(),
            seq,
            expires,
            value: value.to_vec(),
            public_der: identity.public_der().to_vec(),
            signature: Vec::new(),
        };
        v.signature = identity.sign(&v.signed_bytes());
        Ok(v)
    }

    /// Serialises.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(600 + self.value.len());
        self.unsigned(&mut out);
        out.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses without checking the signature.
    pub fn parse(b: &[u8]) -> Result<SignedValue, RecordError> {
        let mut r = b;
        let mut take = |n: usize| -> Result<&[u8], RecordError> {
            if r.len() < n {
                return Err(RecordError::Forged);
            }
            let (a, rest) = r.split_at(n);
            r = rest;
            Ok(a)
        };
        if take(1)?[0] != VALUE_VERSION {
            return Err(RecordError::Forged);
        }
        let n = take(1)?[0] as usize;
        let namespace = take(n)?.to_vec();
        let n = take(1)?[0] as usize;
        let key = take(n)?.to_vec();
        let seq = u64::from_be_bytes(take(8)?.try_into().expect("8"));
        let expires = u64::from_be_bytes(take(8)?.try_into().expect("8"));
        let n = u16::from_be_bytes(take(2)?.try_into().expect("2")) as usize;
        if n > MAX_VALUE_LEN {
            return Err(RecordError::Oversized);
        }
        let value = take(n)?.to_vec();
        let n = u16::from_be_bytes(take(2)?.try_into().expect("2")) as usize;
        let public_der = take(n)?.to_vec();
        let n = u16::from_be_bytes(take(2)?.try_into().expect("2")) as usize;
        let signature = take(n)?.to_vec();
        if !r.is_empty()
            || namespace.is_empty()
            || namespace.len() > MAX_NAMESPACE
            || key.is_empty()
            || key.len() > MAX_KEY
        {
            return Err(RecordError::Forged);
        }
        Ok(SignedValue {
            namespace,
            key,
            seq,
            expires,
            value,
            public_der,
            signature,
        })
    }

    /// The publisher's node ID.
    pub fn publisher(&self) -> NodeId {
        NodeId::from_public_key_der(&self.public_der)
    }
}

#[derive(Clone)]
enum Checked {
    /// A node record whose signature verified: its facts, or why its
    /// fields don't make sense.
    Node(Result<RecordInfo, RecordError>),
    Value(ValueInfo),
    Bad(RecordError),
}

/// The node's record checks: RSA signatures, remembered by record hash so a
/// record seen in many replies costs one verification. The node's other
/// checks of node records (a neighbour's hello, a relay's AUTH, a looked-up
/// destination) go through [`RsaRecords::verified_record`], so a record
/// the DHT already verified is not verified again, and the other way round.
#[derive(Default)]
pub struct RsaRecords {
    cache: HashMap<[u8; 32], Checked>,
    /// Signature verifications done (cache misses).
    pub verifications: u64,
}

impl RsaRecords {
    fn cached(&mut self, b: &[u8], f: impl FnOnce(&[u8]) -> Checked) -> Checked {
        let h: [u8; 32] = Sha256::digest(b).into();
        if let Some(c) = self.cache.get(&h) {
            return c.clone();
        }
        self.verifications += 1;
        let c = f(b);
        self.remember(h, c.clone());
        c
    }

    /// Takes value record `b` as checked, with `info`, without verifying
    /// its signature: for a value this node has just signed itself (the
    /// caller vouches for it). Expiry is still judged when it is used.
    pub fn vouch_value(&mut self, b: &[u8], info: ValueInfo) {
        let h: [u8; 32] = Sha256::digest(b).into();
        self.remember(h, Checked::Value(info));
    }

    fn remember(&mut self, h: [u8; 32], c: Checked) {
        if self.cache.len() >= CACHE {
            self.cache.clear();
        }
        self.cache.insert(h, c);
    }

    /// Parses a node record and checks its signature (as
    /// [`NodeRecord::parse_verified`]), unless these very bytes verified
    /// before: then they are only parsed. A record that verifies is
    /// remembered for the DHT's checks too. Expiry is not judged here.
    pub fn verified_record(&mut self, b: &[u8]) -> Result<NodeRecord, IdentityError> {
        if b.len() > MAX_RECORD_LEN {
            return Err(IdentityError::Malformed("too long"));
        }
        let h: [u8; 32] = Sha256::digest(b).into();
        if let Some(Checked::Node(_)) = self.cache.get(&h) {
            return NodeRecord::parse_unverified(b);
        }
        // Not known to verify (unknown, or failed as a node or as a value
        // record): verify, so the answer is parse_verified's own.
        self.verifications += 1;
        let rec = NodeRecord::parse_verified(b)?;
        self.remember(h, Checked::Node(node_info(&rec)));
        Ok(rec)
    }
}

/// The facts of a verified node record (expiry not judged here).
pub fn node_info(rec: &NodeRecord) -> Result<RecordInfo, RecordError> {
    let ext: RecordExt = rec.fields().map_err(|_| RecordError::Forged)?;
    Ok(RecordInfo {
        id: rec.node_id(),
        seq: rec.seq,
        expires: ext.expires.unwrap_or(0),
        roles: ext.roles,
        ip: ext.endpoints.first().map(|e| e.ip()),
    })
}

fn judge_expiry(expires: u64, max_ttl: u64, now: u64) -> Result<(), RecordError> {
    if expires <= now {
        return Err(RecordError::Expired);
    }
    if expires > now + max_ttl + CLOCK_SLACK {
        return Err(RecordError::Forged);
    }
    Ok(())
}

impl Records for RsaRecords {
    fn check_node(&mut self, b: &[u8], now: u64) -> Result<RecordInfo, RecordError> {
        if b.len() > MAX_RECORD_LEN {
            return Err(RecordError::Oversized);
        }
        let c = self.cached(b, |b| match NodeRecord::parse_verified(b) {
            Ok(r) => Checked::Node(node_info(&r)),
            Err(_) => Checked::Bad(RecordError::Forged),
        });
        match c {
            Checked::Node(i) => {
                let i = i?;
                judge_expiry(i.expires, MAX_RECORD_TTL, now)?;
                Ok(i)
            }
            Checked::Bad(e) => Err(e),
            Checked::Value(_) => Err(RecordError::Forged),
        }
    }

    fn check_value(&mut self, b: &[u8], now: u64) -> Result<ValueInfo, RecordError> {
        if b.len() > super::dht::MAX_RECORD_BYTES {
            return Err(RecordError::Oversized);
        }
        let c = self.cached(b, |b| {
            let v = match SignedValue::parse(b) {
                Ok(v) => v,
                Err(e) => return Checked::Bad(e),
            };
            match verify_signature(&v.public_der, &v.signed_bytes(), &v.signature) {
                Ok(publisher) => Checked::Value(ValueInfo {
                    target: value_target(&v.namespace, &v.key),
                    publisher,
                    seq: v.seq,
                    expires: v.expires,
                }),
                Err(_) => Checked::Bad(RecordError::Forged),
            }
        });
        match c {
            Checked::Value(i) => {
                judge_expiry(i.expires, MAX_VALUE_TTL, now)?;
                Ok(i)
            }
            Checked::Bad(e) => Err(e),
            Checked::Node(_) => Err(RecordError::Forged),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::identity::tests::fixture;

    const NOW: u64 = 1_800_000_000;

    fn ext(expires: u64) -> RecordExt {
        RecordExt {
            expires: Some(expires),
            endpoints: vec!["198.18.0.1:7300".parse().unwrap()],
            roles: 0,
            onion_key: None,
        }
    }

    #[test]
    fn node_records_forged_expired_oversized() {
        let id = fixture();
        let mut r = RsaRecords::default();
        let good = id.sign_record_with(5, &ext(NOW + 3600)).to_bytes();
        let info = r.check_node(&good, NOW).unwrap();
        assert_eq!((info.id, info.seq), (id.node_id(), 5));
        // Cached: a second check costs no verification.
        r.check_node(&good, NOW).unwrap();
        assert_eq!(r.verifications, 1);
        let mut forged = good.clone();
        let n = forged.len();
        forged[n - 1] ^= 1;
        assert_eq!(r.check_node(&forged, NOW), Err(RecordError::Forged));
        assert_eq!(r.check_node(&good, NOW + 3600), Err(RecordError::Expired));
        let never = id.sign_record(6).to_bytes();
        assert_eq!(r.check_node(&never, NOW), Err(RecordError::Expired));
        let far = id.sign_record_with(7, &ext(NOW + 30 * 86400)).to_bytes();
        assert_eq!(r.check_node(&far, NOW), Err(RecordError::Forged));
        assert_eq!(
            r.check_node(&vec![1u8; MAX_RECORD_LEN + 1], NOW),
            Err(RecordError::Oversized)
        );
    }

    #[test]
    fn value_records_sign_check_and_refuse_tampering() {
        let id = fixture();
        let mut r = RsaRecords::default();
        let v = SignedValue::sign(&id, b"dfs", b"block-1", b"provider", 3, NOW + 60).unwrap();
        let b = v.to_bytes();
        assert_eq!(SignedValue::parse(&b).unwrap(), v);
        let info = r.check_value(&b, NOW).unwrap();
        assert_eq!(info.publisher, id.node_id());
        assert_eq!(info.target, value_target(b"dfs", b"block-1"));
        for i in [1usize, 10, 20, b.len() - 1] {
            let mut t = b.clone();
            t[i] ^= 1;
            assert!(r.check_value(&t, NOW).is_err(), "flip at {i}");
        }
        for n in 0..b.len() {
            let _ = r.check_value(&b[..n], NOW);
        }
        assert!(SignedValue::sign(&id, b"", b"k", b"v", 1, NOW).is_err());
        assert!(SignedValue::sign(&id, b"n", b"k", &[0; MAX_VALUE_LEN + 1], 1, NOW).is_err());
        assert_eq!(r.check_value(&b, NOW + 61), Err(RecordError::Expired));
    }
}
