//! Node identity: the RSA-2048 identity key, the X25519 link key, the node ID
//! and overlay address derived from them, and the signed node record that
//! binds them together.
//!
//! Formats pinned by golden vectors (see the tests at the bottom):
//! - node ID = SHA-256 of the RSA public key, DER SubjectPublicKeyInfo;
//! - overlay address = `fc` followed by the first 15 bytes of the node ID;
//! - node ID as text = 64 lowercase hex digits.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use boringtun::x25519;
use rand_core::CryptoRngCore;
use rsa::pkcs1v15::{Signature, SigningKey};
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};

/// Size of an RSA identity key in bits. Records carrying any other size are
/// rejected, which also bounds what a verification can cost us.
pub const RSA_BITS: usize = 2048;
/// Length of an RSA-2048 PKCS#1 v1.5 signature.
pub const SIGNATURE_LEN: usize = RSA_BITS / 8;

/// Errors from identity parsing, key handling and record verification.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A node ID in text form was not 64 hex digits.
    #[error("node ID must be 64 hex digits")]
    BadNodeId,
    /// A key could not be generated, encoded or decoded.
    #[error("key error: {0}")]
    Key(String),
    /// The RSA key is not a 2048-bit key.
    #[error("identity key must be RSA-{RSA_BITS}")]
    KeySize,
    /// A record's bytes do not follow the record format.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
    /// A record carries a format version we do not speak.
    #[error("unsupported record version {0}")]
    Version(u8),
    /// A record's signature does not verify under its key.
    #[error("record signature does not verify")]
    BadSignature,
}

/// A node's ID: SHA-256 of its RSA public key (DER SubjectPublicKeyInfo).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The ID of the node owning this RSA public key (in DER form).
    pub fn from_public_key_der(der: &[u8]) -> NodeId {
        NodeId(Sha256::digest(der).into())
    }

    /// The node's overlay address: `fc` followed by the first 15 bytes of the ID.
    pub fn overlay_address(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a[0] = 0xfc;
        a[1..].copy_from_slice(&self.0[..15]);
        Ipv6Addr::from(a)
    }

    /// Parses the 64-hex-digit text form.
    pub fn parse(s: &str) -> Result<NodeId, IdentityError> {
        let mut id = [0u8; 32];
        if s.len() != 64 {
            return Err(IdentityError::BadNodeId);
        }
        hex::decode_to_slice(s, &mut id).map_err(|_| IdentityError::BadNodeId)?;
        Ok(NodeId(id))
    }

    /// A short form for logs (first 8 bytes in hex).
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// Whether `addr` is an overlay address (in fc00::/8).
pub fn is_overlay_address(addr: &Ipv6Addr) -> bool {
    addr.octets()[0] == 0xfc
}

/// The secret half of a node: its RSA identity key and its X25519 link key.
pub struct Identity {
    rsa: RsaPrivateKey,
    public_der: Vec<u8>,
    link_secret: x25519::StaticSecret,
    node_id: NodeId,
}

impl Identity {
    /// Generates a fresh identity (an RSA-2048 key takes ~60 ms).
    pub fn generate(rng: &mut impl CryptoRngCore) -> Result<Identity, IdentityError> {
        let rsa =
            RsaPrivateKey::new(rng, RSA_BITS).map_err(|e| IdentityError::Key(e.to_string()))?;
        let link_secret = x25519::StaticSecret::random_from_rng(rng);
        Identity::from_parts(rsa, link_secret)
    }

    /// Builds an identity from existing keys.
    pub fn from_parts(
        rsa: RsaPrivateKey,
        link_secret: x25519::StaticSecret,
    ) -> Result<Identity, IdentityError> {
        // Exactly 2048 bits: a modulus of 2041–2047 bits also fills 256
        // bytes, but every other node refuses its signatures (ring wants
        // 2048 bits or more), so such a key would make a node nobody hears.
        if rsa.size() != SIGNATURE_LEN || rsa.n().bits() != RSA_BITS {
            return Err(IdentityError::KeySize);
        }
        let public_der = rsa
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| IdentityError::Key(e.to_string()))?
            .into_vec();
        let node_id = NodeId::from_public_key_der(&public_der);
        Ok(Identity {
            rsa,
            public_der,
            link_secret,
            node_id,
        })
    }

    /// Loads an identity from the RSA key as PKCS#8 PEM and the 32 raw bytes
    /// of the X25519 link secret.
    pub fn from_pem(rsa_pem: &str, link_secret: [u8; 32]) -> Result<Identity, IdentityError> {
        let rsa = RsaPrivateKey::from_pkcs8_pem(rsa_pem)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Identity::from_parts(rsa, x25519::StaticSecret::from(link_secret))
    }

    /// The RSA key as PKCS#8 PEM (secret: write it with mode 0600).
    pub fn rsa_pem(&self) -> Result<String, IdentityError> {
        Ok(self
            .rsa
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Key(e.to_string()))?
            .to_string())
    }

    /// The raw X25519 link secret (secret: write it with mode 0600).
    pub fn link_secret_bytes(&self) -> [u8; 32] {
        self.link_secret.to_bytes()
    }

    /// The X25519 link secret for WireGuard tunnels.
    pub fn link_secret(&self) -> &x25519::StaticSecret {
        &self.link_secret
    }

    /// The public X25519 link key.
    pub fn link_public(&self) -> [u8; 32] {
        x25519::PublicKey::from(&self.link_secret).to_bytes()
    }

    /// This node's ID.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// This node's overlay address.
    pub fn overlay_address(&self) -> Ipv6Addr {
        self.node_id.overlay_address()
    }

    /// The RSA public key, DER SubjectPublicKeyInfo.
    pub fn public_der(&self) -> &[u8] {
        &self.public_der
    }

    /// Signs `msg` (which starts with its own domain-separation context).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let key = SigningKey::<Sha256>::new(self.rsa.clone());
        let sig: Signature = key.sign(msg);
        sig.to_vec()
    }

    /// Signs a new record with the given sequence number and no extensions.
    pub fn sign_record(&self, seq: u64) -> NodeRecord {
        self.sign_record_with(seq, &RecordExt::default())
    }

    /// Signs a new record carrying expiry, endpoints and roles.
    pub fn sign_record_with(&self, seq: u64, ext: &RecordExt) -> NodeRecord {
        let mut rec = self.unsigned_record(seq, ext);
        rec.signature = self.sign(&rec.signed_bytes());
        rec
    }

    /// A record of ours without its signature yet: sign
    /// [`NodeRecord::signed_bytes`] (away from the data path: it takes
    /// milliseconds) into its `signature`.
    pub fn unsigned_record(&self, seq: u64, ext: &RecordExt) -> NodeRecord {
        NodeRecord {
            seq,
            link_key: self.link_public(),
            public_der: self.public_der.clone(),
            ext: ext.to_bytes(),
            signature: Vec::new(),
            node_id: self.node_id,
        }
    }
}

/// Checks an RSA-2048 PKCS#1 v1.5 / SHA-256 signature over `msg` (which
/// must start with its own domain-separation context) under the DER public
/// key `public_der`; returns the signer's node ID. Non-canonical key
/// encodings are refused, so one key has one ID.
pub fn verify_signature(
    public_der: &[u8],
    msg: &[u8],
    signature: &[u8],
) -> Result<NodeId, IdentityError> {
    let key = RsaPublicKey::from_public_key_der(public_der)
        .map_err(|_| IdentityError::Malformed("bad public key"))?;
    if key.size() != SIGNATURE_LEN {
        return Err(IdentityError::KeySize);
    }
    let canonical = key
        .to_public_key_der()
        .map_err(|_| IdentityError::Malformed("bad public key"))?;
    if canonical.as_bytes() != public_der {
        return Err(IdentityError::Malformed("non-canonical public key"));
    }
    if signature.len() != SIGNATURE_LEN {
        return Err(IdentityError::BadSignature);
    }
    // The same PKCS#1 v1.5 / SHA-256 check as the rsa crate's
    // `VerifyingKey::verify`, in ring (several times faster: every hello,
    // DHT reply and circuit AUTH carries records to check). ring also wants
    // a modulus of at least 2048 bits and an odd exponent of 3 or more,
    // which every key `Identity` makes has.
    let n = key.n().to_bytes_be();
    let e = key.e().to_bytes_be();
    ring::signature::RsaPublicKeyComponents { n: &n, e: &e }
        .verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, msg, signature)
        .map_err(|_| IdentityError::BadSignature)?;
    Ok(NodeId::from_public_key_der(public_der))
}

/// Domain separation for record signatures, so a record signature can never
/// be replayed as a signature over anything else.
const RECORD_SIG_CONTEXT: &[u8] = b"QuantumGate node record\0";
/// Current record format version.
pub const RECORD_VERSION: u8 = 1;
/// Largest record we accept: version + seq + key + two length fields +
/// a 2048-bit SPKI (294 bytes) + signature + room for extensions.
pub const MAX_RECORD_LEN: usize = 1024;

/// A node record: the node's RSA public key, its X25519 link key and a
/// sequence number, signed by the RSA key.
///
/// Wire format, version 1 (all integers big-endian):
/// ```text
/// version u8 = 1 | seq u64 | link_key [32] |
/// spki_len u16 | spki [spki_len] |
/// ext_len u16 | ext [ext_len]       (extensions, ignored by v1 readers)
/// sig_len u16 | sig [sig_len]       (RSASSA-PKCS1-v1_5 / SHA-256 over
///                                   context || everything before sig_len)
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Sequence number: a record with a higher number replaces a lower one.
    pub seq: u64,
    /// The X25519 public key the node's WireGuard links authenticate with.
    pub link_key: [u8; 32],
    /// RSA public key, DER SubjectPublicKeyInfo.
    pub public_der: Vec<u8>,
    /// Extension bytes (TLVs of later versions), covered by the signature.
    pub ext: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
    node_id: NodeId,
}

impl fmt::Debug for NodeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeRecord")
            .field("node_id", &self.node_id)
            .field("seq", &self.seq)
            .finish()
    }
}

impl NodeRecord {
    /// What the record's signature covers (domain-separated).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_SIG_CONTEXT.len() + 64 + self.public_der.len());
        out.extend_from_slice(RECORD_SIG_CONTEXT);
        self.emit_unsigned(&mut out);
        out
    }

    fn emit_unsigned(&self, out: &mut Vec<u8>) {
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.link_key);
        out.extend_from_slice(&(self.public_der.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.public_der);
        out.extend_from_slice(&(self.ext.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.ext);
    }

    /// Serialises the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(600);
        self.emit_unsigned(&mut out);
        out.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses and fully verifies a record: format, key size, canonical key
    /// encoding and signature. The node ID is derived from the key, so the
    /// returned record's ID and address are bound to it by construction.
    pub fn parse_verified(bytes: &[u8]) -> Result<NodeRecord, IdentityError> {
        let rec = NodeRecord::parse_unverified(bytes)?;
        rec.verify()?;
        Ok(rec)
    }

    /// Parses a record without checking its signature. Use only where the
    /// record is then verified (or was written by this node itself).
    pub fn parse_unverified(bytes: &[u8]) -> Result<NodeRecord, IdentityError> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(IdentityError::Malformed("too long"));
        }
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != RECORD_VERSION {
            return Err(IdentityError::Version(version));
        }
        let seq = u64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"));
        let link_key: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
        let der_len = r.u16()? as usize;
        let public_der = r.take(der_len)?.to_vec();
        let ext_len = r.u16()? as usize;
        let ext = r.take(ext_len)?.to_vec();
        let sig_len = r.u16()? as usize;
        let signature = r.take(sig_len)?.to_vec();
        if !r.0.is_empty() {
            return Err(IdentityError::Malformed("trailing bytes"));
        }
        let node_id = NodeId::from_public_key_der(&public_der);
        Ok(NodeRecord {
            seq,
            link_key,
            public_der,
            ext,
            signature,
            node_id,
        })
    }

    /// Checks key size, canonical DER and the signature.
    pub fn verify(&self) -> Result<(), IdentityError> {
        verify_signature(&self.public_der, &self.signed_bytes(), &self.signature).map(|_| ())
    }

    /// The ID of the node this record speaks for (hash of its key).
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The overlay address of the node this record speaks for.
    pub fn overlay_address(&self) -> Ipv6Addr {
        self.node_id.overlay_address()
    }

    /// The extension fields (expiry, endpoints, roles).
    pub fn fields(&self) -> Result<RecordExt, IdentityError> {
        RecordExt::parse(&self.ext)
    }
}

/// Role bit: the node relays for others.
pub const ROLE_RELAY: u8 = 1;
/// Role bit: the node is a caching gateway.
pub const ROLE_CACHE: u8 = 2;
/// Most endpoints a record lists.
pub const MAX_ENDPOINTS: usize = 4;

const EXT_EXPIRES: u8 = 1;
const EXT_ENDPOINT: u8 = 2;
const EXT_ROLES: u8 = 3;
const EXT_ONION: u8 = 4;

/// The fields a record carries in its signed extension area.
///
/// Encoding: a sequence of `type u8 | len u16 | value` entries; unknown
/// types are skipped, so later versions can add fields without a new
/// record version. Types: 1 = expiry (unix seconds, u64), 2 = endpoint
/// (`4 | ipv4 [4] | port u16` or `6 | ipv6 [16] | port u16`, repeatable),
/// 3 = roles (u8 bit set: 1 relay, 2 cache gateway), 4 = onion key (X25519,
/// 32 bytes; the key circuits use, rotated apart from the link key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordExt {
    /// Unix time after which the record is void (DHT records need one).
    pub expires: Option<u64>,
    /// UDP endpoints where the node's links can be reached.
    pub endpoints: Vec<SocketAddr>,
    /// Role bits (`ROLE_*`).
    pub roles: u8,
    /// Onion key for circuit handshakes.
    pub onion_key: Option<[u8; 32]>,
}

impl RecordExt {
    /// Encodes the fields.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(e) = self.expires {
            out.push(EXT_EXPIRES);
            out.extend_from_slice(&8u16.to_be_bytes());
            out.extend_from_slice(&e.to_be_bytes());
        }
        for ep in self.endpoints.iter().take(MAX_ENDPOINTS) {
            let mut v = Vec::with_capacity(19);
            put_endpoint(&mut v, *ep);
            out.push(EXT_ENDPOINT);
            out.extend_from_slice(&(v.len() as u16).to_be_bytes());
            out.extend_from_slice(&v);
        }
        if self.roles != 0 {
            out.push(EXT_ROLES);
            out.extend_from_slice(&1u16.to_be_bytes());
            out.push(self.roles);
        }
        if let Some(k) = self.onion_key {
            out.push(EXT_ONION);
            out.extend_from_slice(&32u16.to_be_bytes());
            out.extend_from_slice(&k);
        }
        out
    }

    /// Decodes the fields; malformed known fields are an error.
    pub fn parse(bytes: &[u8]) -> Result<RecordExt, IdentityError> {
        let mut r = Reader(bytes);
        let mut ext = RecordExt::default();
        while !r.0.is_empty() {
            let ty = r.u8()?;
            let len = r.u16()? as usize;
            let mut v = Reader(r.take(len)?);
            match ty {
                EXT_EXPIRES => {
                    ext.expires = Some(u64::from_be_bytes(v.take(8)?.try_into().expect("8 bytes")))
                }
                EXT_ENDPOINT => {
                    let ip = match v.u8()? {
                        4 => IpAddr::from(<[u8; 4]>::try_from(v.take(4)?).expect("4 bytes")),
                        6 => IpAddr::from(<[u8; 16]>::try_from(v.take(16)?).expect("16 bytes")),
                        _ => return Err(IdentityError::Malformed("endpoint family")),
                    };
                    let port = v.u16()?;
                    if ext.endpoints.len() >= MAX_ENDPOINTS {
                        return Err(IdentityError::Malformed("too many endpoints"));
                    }
                    ext.endpoints.push(SocketAddr::new(ip, port));
                }
                EXT_ROLES => ext.roles = v.u8()?,
                EXT_ONION => ext.onion_key = Some(v.take(32)?.try_into().expect("32 bytes")),
                _ => continue,
            }
            if !v.0.is_empty() {
                return Err(IdentityError::Malformed("extension length"));
            }
        }
        Ok(ext)
    }
}

/// Most bytes an encoded endpoint takes (IPv6).
pub const MAX_ENDPOINT_LEN: usize = 19;

/// Encodes an endpoint: `4 | ipv4 [4] | port u16` or `6 | ipv6 [16] | port u16`.
pub fn put_endpoint(out: &mut Vec<u8>, ep: SocketAddr) {
    let mut b = [0u8; MAX_ENDPOINT_LEN];
    let n = write_endpoint(&mut b, ep);
    out.extend_from_slice(&b[..n]);
}

/// Encodes an endpoint into `out` (at least [`MAX_ENDPOINT_LEN`] bytes, or
/// 7 for IPv4); returns its length.
pub fn write_endpoint(out: &mut [u8], ep: SocketAddr) -> usize {
    let n = match ep.ip() {
        IpAddr::V4(a) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&a.octets());
            5
        }
        IpAddr::V6(a) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&a.octets());
            17
        }
    };
    out[n..n + 2].copy_from_slice(&ep.port().to_be_bytes());
    n + 2
}

/// Decodes what [`put_endpoint`] wrote; returns the rest.
pub fn parse_endpoint(b: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let (ip, rest): (IpAddr, &[u8]) = match *b.first()? {
        4 if b.len() >= 7 => (<[u8; 4]>::try_from(&b[1..5]).ok()?.into(), &b[5..]),
        6 if b.len() >= 19 => (<[u8; 16]>::try_from(&b[1..17]).ok()?.into(), &b[17..]),
        _ => return None,
    };
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    Some((SocketAddr::new(ip, port), &rest[2..]))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], IdentityError> {
        if self.0.len() < n {
            return Err(IdentityError::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, IdentityError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, IdentityError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fixture() -> Identity {
        let pem = include_str!("../../tests/fixtures/identity-golden.pem");
        Identity::from_pem(pem, [7u8; 32]).unwrap()
    }

    #[test]
    fn golden_identity() {
        let id = fixture();
        assert_eq!(
            id.node_id().to_string(),
            "a3387b06714c81aabd78bc9c192c816547a47410fa009583762f6ef94394bec4"
        );
        assert_eq!(
            id.overlay_address().to_string(),
            "fca3:387b:671:4c81:aabd:78bc:9c19:2c81"
        );
        let uri = crate::proto::uri::PeerUri {
            node_id: id.node_id(),
            link_key: id.link_public(),
            endpoint: Some("198.18.0.1:7300".parse().unwrap()),
        };
        assert_eq!(uri.to_string(), "qg://1/a3387b06714c81aabd78bc9c192c816547a47410fa009583762f6ef94394bec4/E75P6uryBMf9M1j8nAByGIHRdCeBKCJ-xnTzf3_pe20/198.18.0.1:7300");
        // The record format: fixed key and sequence number give fixed bytes
        // (PKCS#1 v1.5 signatures are deterministic).
        let rec = id.sign_record(1);
        assert_eq!(
            hex::encode(sha2::Sha256::digest(rec.to_bytes())),
            "b327d67d6d6cbb2fc5fc73bec94c0ee74ffcfa365ba3ed5711245385ceee437c"
        );
    }

    #[test]
    fn only_2048_bit_keys_make_an_identity() {
        use rand_chacha::rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let link = || x25519::StaticSecret::from([3u8; 32]);
        let short = RsaPrivateKey::new(&mut rng, 2047).unwrap();
        assert_eq!(short.size(), SIGNATURE_LEN, "fills the same 256 bytes");
        assert!(matches!(
            Identity::from_parts(short, link()),
            Err(IdentityError::KeySize)
        ));
        assert!(Identity::from_parts(fixture().rsa.clone(), link()).is_ok());
    }

    #[test]
    fn record_roundtrip_and_tamper() {
        let id = fixture();
        let rec = id.sign_record(42);
        let bytes = rec.to_bytes();
        let back = NodeRecord::parse_verified(&bytes).unwrap();
        assert_eq!(back.seq, 42);
        assert_eq!(back.node_id(), id.node_id());
        assert_eq!(back.link_key, id.link_public());
        // Any flipped bit must break it.
        for i in [0usize, 5, 20, 50, 200, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(NodeRecord::parse_verified(&b).is_err(), "flip at {i}");
        }
        // Truncations never panic and never verify.
        for n in 0..bytes.len() {
            assert!(NodeRecord::parse_verified(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn record_fields_roundtrip() {
        let id = fixture();
        let ext = RecordExt {
            expires: Some(1_800_000_000),
            endpoints: vec![
                "198.18.0.1:7300".parse().unwrap(),
                "[2001:db8::1]:7301".parse().unwrap(),
            ],
            roles: ROLE_RELAY,
            onion_key: Some([7; 32]),
        };
        let rec = id.sign_record_with(9, &ext);
        let back = NodeRecord::parse_verified(&rec.to_bytes()).unwrap();
        assert_eq!(back.fields().unwrap(), ext);
        // Unknown extension types are skipped; truncated ones refused.
        let mut raw = ext.to_bytes();
        raw.extend_from_slice(&[99, 0, 2, 1, 2]);
        assert_eq!(RecordExt::parse(&raw).unwrap(), ext);
        for n in 0..raw.len() - 5 {
            let _ = RecordExt::parse(&raw[..n]);
        }
        assert!(RecordExt::parse(&raw[..raw.len() - 1]).is_err());
    }

    #[test]
    fn overlay_address_is_id_prefix() {
        let id = NodeId([0xab; 32]);
        let a = id.overlay_address().octets();
        assert_eq!(a[0], 0xfc);
        assert_eq!(&a[1..], &[0xab; 15]);
        assert!(is_overlay_address(&id.overlay_address()));
    }
}
