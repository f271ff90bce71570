//! Onion circuits: the cell format, the per-hop handshake and the layer
//! crypto. Pure functions and small state; `node` drives them.
//!
//! ## Cells
//!
//! Everything a circuit carries travels between neighbours as a cell inside
//! a link's control frame (`MSG_CELL`). A cell is exactly [`CELL_SMALL`] or
//! [`CELL_LARGE`] bytes, wherever it is on the circuit:
//!
//! ```text
//! circ u32     circuit ID on this link (the side that sent CREATE chose it)
//! kind u8      CREATE, CREATED, RELAY or DESTROY
//! nonce [16]   RELAY: the layer nonce (below); others: random
//! body         the rest of the cell
//! ```
//!
//! ## Layers
//!
//! Each hop shares keys with the source (see [`ClientHandshake`]), per
//! direction: an AES-256 key for a CTR layer over the body, an AES-256 key
//! for one block operation on the nonce, an AES-256-GCM key for cells
//! addressed to that hop, and an 8-byte magic.
//!
//! Forward (source → destination), a hop receiving `(n, body)` computes
//! `m = AES-dec(n)`. If `m` starts with its magic, the cell is for it: the
//! body is GCM ciphertext under its key, with the counter in `m[8..]` as
//! nonce. Otherwise it XORs the body with AES-CTR keyed per hop, IV `m`, and
//! passes `(m, body)` on. Backward, a hop passes `(AES-enc(n), CTR(n, body))`
//! and a hop that speaks itself sends `(AES-enc(magic | counter), GCM(...))`.
//! The source, holding every hop's keys, builds and peels all layers.
//!
//! So the nonce and the body change at every hop (a relay can't match a cell
//! it forwards to the one it received) and the cell never changes size (a
//! relay can't tell how many hops remain). Integrity is end to end: the GCM
//! tag of the hop a cell is for; relays check the size and the link (whose
//! WireGuard AEAD authenticates every cell between neighbours). A per-hop
//! tag would have to shrink the cell or sit at a fixed offset that tells
//! position, so relay layers are unauthenticated, as in Tor's relay cells;
//! a relay that flips bits only makes the cell fail at its end. Counters are
//! checked against a sliding window ([`ReplayWindow`]) by the hop a cell is
//! for.

use aes::cipher::{BlockDecrypt, BlockEncrypt, InnerIvInit, KeyInit, StreamCipher};
use aes::{Aes256, Aes256Enc};
use boringtun::x25519;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};

use super::identity::NodeId;

/// The small cell size (handshakes, probes, ACK-sized packets).
pub const CELL_SMALL: usize = 256;
/// The large cell size. A control frame (IPv6 header 40 + frame header 2)
/// holding it is 1418 bytes: it fits a link over a 1500-byte underlay.
pub const CELL_LARGE: usize = 1376;
/// Circuit ID, kind, nonce.
pub const CELL_HEADER: usize = 4 + 1 + 16;
/// GCM tag.
pub const TAG_LEN: usize = 16;
/// Command and length inside an addressed body.
pub const RELAY_HEADER: usize = 3;
/// Most data bytes one cell carries.
pub const MAX_DATA: usize = CELL_LARGE - CELL_HEADER - TAG_LEN - RELAY_HEADER;
/// Most data bytes a small cell carries.
pub const SMALL_DATA: usize = CELL_SMALL - CELL_HEADER - TAG_LEN - RELAY_HEADER;

/// Cell kinds (visible to the neighbour, like Tor's link-level commands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CellKind {
    /// Open a circuit on this link (handshake in the body).
    Create = 1,
    /// Answer to CREATE.
    Created = 2,
    /// A layered cell.
    Relay = 3,
    /// Tear the circuit down (sent hop by hop).
    Destroy = 4,
}

impl TryFrom<u8> for CellKind {
    type Error = OnionError;

    fn try_from(b: u8) -> Result<CellKind, OnionError> {
        Ok(match b {
            1 => CellKind::Create,
            2 => CellKind::Created,
            3 => CellKind::Relay,
            4 => CellKind::Destroy,
            _ => return Err(OnionError::BadKind),
        })
    }
}

/// Length of a CREATE body's handshake (onion key B | client key X).
pub const CREATE_LEN: usize = 64;
/// Length of a CREATED body's handshake (server key Y | AUTH).
pub const CREATED_LEN: usize = 64;

/// Commands inside an addressed body (encrypted: only the source and the
/// hop it is for see them). Bodies of EXTEND, AUTH, LOOKUP and the answers
/// that carry more than a byte are in [`body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cmd {
    /// Extend the circuit ([`body::Extend`]).
    Extend = 1,
    /// The source proves who it is to the destination ([`body::Auth`]).
    Auth = 2,
    /// An application packet (a link frame: as is, or compressed).
    Data = 3,
    /// Are you there? (8 bytes echoed)
    Probe = 4,
    /// Cover traffic: dropped by the hop it is for.
    Noise = 5,
    /// Look up the record of an overlay address in the DHT
    /// ([`body::Lookup`]).
    Lookup = 6,
    /// Hop → source: the extend worked (CREATED handshake follows).
    Extended = 10,
    /// Hop → source: the extend failed ([`body::ExtendRefusal`]).
    ExtendFailed = 11,
    /// Destination → source: authenticated, data may flow.
    Ready = 12,
    /// Destination → source: authentication refused.
    Refused = 13,
    /// Hop → source: probe answer.
    ProbeReply = 14,
    /// Hop → source: the looked-up record (empty: not found).
    LookupReply = 15,
}

impl Cmd {
    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Cmd::Extend => "extend",
            Cmd::Auth => "auth",
            Cmd::Data => "data",
            Cmd::Probe => "probe",
            Cmd::Noise => "noise",
            Cmd::Lookup => "lookup",
            Cmd::Extended => "extended",
            Cmd::ExtendFailed => "extend_failed",
            Cmd::Ready => "ready",
            Cmd::Refused => "refused",
            Cmd::ProbeReply => "probe_reply",
            Cmd::LookupReply => "lookup_reply",
        }
    }
}

impl TryFrom<u8> for Cmd {
    type Error = OnionError;

    fn try_from(b: u8) -> Result<Cmd, OnionError> {
        Ok(match b {
            1 => Cmd::Extend,
            2 => Cmd::Auth,
            3 => Cmd::Data,
            4 => Cmd::Probe,
            5 => Cmd::Noise,
            6 => Cmd::Lookup,
            10 => Cmd::Extended,
            11 => Cmd::ExtendFailed,
            12 => Cmd::Ready,
            13 => Cmd::Refused,
            14 => Cmd::ProbeReply,
            15 => Cmd::LookupReply,
            _ => return Err(OnionError::BadCommand),
        })
    }
}

pub mod body;

/// Why a cell or handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OnionError {
    /// Not one of the fixed sizes.
    #[error("cell of a size that is not a cell size")]
    BadSize,
    /// Unknown kind.
    #[error("unknown cell kind")]
    BadKind,
    /// Unknown command in an addressed body.
    #[error("unknown relay command")]
    BadCommand,
    /// GCM tag did not verify.
    #[error("cell failed authentication")]
    Forged,
    /// Counter seen before, or too old for the window.
    #[error("replayed cell")]
    Replay,
    /// No hop recognised the cell.
    #[error("cell recognised by no hop")]
    Unrecognised,
    /// Body fields don't add up.
    #[error("malformed cell body")]
    Malformed,
    /// Handshake names an onion key we don't hold.
    #[error("unknown onion key")]
    UnknownOnionKey,
    /// Handshake produced a non-contributory (all-zero) secret.
    #[error("degenerate key exchange")]
    Degenerate,
    /// The server's AUTH did not verify (key confirmation failed).
    #[error("handshake authentication failed")]
    BadAuth,
}

/// A parsed cell header; the body stays in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellHeader {
    /// Circuit ID on this link.
    pub circ: u32,
    /// CellKind.
    pub kind: CellKind,
    /// Layer nonce.
    pub nonce: [u8; 16],
}

/// Parses a cell's header, checking its size and kind.
pub fn parse_cell(cell: &[u8]) -> Result<CellHeader, OnionError> {
    if cell.len() != CELL_SMALL && cell.len() != CELL_LARGE {
        return Err(OnionError::BadSize);
    }
    let kind = CellKind::try_from(cell[4])?;
    Ok(CellHeader {
        circ: u32::from_be_bytes(cell[..4].try_into().expect("4 bytes")),
        kind,
        nonce: cell[5..21].try_into().expect("16 bytes"),
    })
}

/// Writes a cell header into `cell[..CELL_HEADER]`.
pub fn write_header(cell: &mut [u8], circ: u32, kind: CellKind, nonce: &[u8; 16]) {
    cell[..4].copy_from_slice(&circ.to_be_bytes());
    cell[4] = kind as u8;
    cell[5..21].copy_from_slice(nonce);
}

/// The cell size that carries `data` bytes (None: too large).
pub fn cell_size_for(data: usize, always_large: bool) -> Option<usize> {
    if data <= SMALL_DATA && !always_large {
        Some(CELL_SMALL)
    } else if data <= MAX_DATA {
        Some(CELL_LARGE)
    } else {
        None
    }
}

/// An onion key pair: X25519, published in the node's record, rotated.
pub struct OnionKey {
    secret: x25519::StaticSecret,
    /// The public half.
    pub public: [u8; 32],
}

impl OnionKey {
    /// A fresh key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> OnionKey {
        let secret = x25519::StaticSecret::random_from_rng(rng);
        let public = x25519::PublicKey::from(&secret).to_bytes();
        OnionKey { secret, public }
    }

    /// The secret half (tests reveal it to show forward secrecy).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// Rebuilds a key from its secret.
    pub fn from_secret(secret: [u8; 32]) -> OnionKey {
        let secret = x25519::StaticSecret::from(secret);
        let public = x25519::PublicKey::from(&secret).to_bytes();
        OnionKey { secret, public }
    }
}

const PROTO: &[u8] = b"QuantumGate-ntor-x25519-sha256-1";

fn hmac(key_suffix: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut key = PROTO.to_vec();
    key.extend_from_slice(key_suffix);
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Secret input, AUTH and keys of one handshake, as both sides compute them.
fn derive(
    exp_yx: &[u8; 32],
    exp_bx: &[u8; 32],
    id: &NodeId,
    b: &[u8; 32],
    x: &[u8; 32],
    y: &[u8; 32],
) -> ([u8; 32], HopKeys) {
    let input: [&[u8]; 7] = [exp_yx, exp_bx, &id.0, b, x, y, PROTO];
    let seed = hmac(b":key_extract", &input);
    let verify = hmac(b":verify", &input);
    let auth = hmac(b":mac", &[&verify, &id.0, b, y, x, PROTO, b"Server"]);
    let hk = Hkdf::<Sha256>::from_prk(&seed).expect("32-byte PRK");
    let mut okm = [0u8; 2 * (3 * 32 + 8) + 32];
    hk.expand(b"QuantumGate circuit keys v1", &mut okm)
        .expect("short output");
    let dir = |o: &[u8]| DirKeys {
        ctr: Aes256Enc::new_from_slice(&o[..32]).expect("32-byte key"),
        block: Aes256::new_from_slice(&o[32..64]).expect("32-byte key"),
        gcm: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &o[64..96]).expect("32-byte key")),
        magic: o[96..104].try_into().expect("8 bytes"),
    };
    let keys = HopKeys {
        fwd: dir(&okm[..104]),
        bwd: dir(&okm[104..208]),
        bind: okm[208..240].try_into().expect("32 bytes"),
    };
    (auth, keys)
}

/// The source's side of one hop's handshake: ephemeral `x`, the hop's
/// onion key `B` from its signed record, and its node ID.
pub struct ClientHandshake {
    x: x25519::StaticSecret,
    x_pub: [u8; 32],
    b: [u8; 32],
    id: NodeId,
}

impl ClientHandshake {
    /// Starts a handshake with hop `id` whose record names onion key `b`;
    /// returns the CREATE body (`B | X`).
    pub fn start(
        rng: &mut (impl RngCore + CryptoRng),
        id: NodeId,
        b: [u8; 32],
    ) -> (ClientHandshake, [u8; CREATE_LEN]) {
        let x = x25519::StaticSecret::random_from_rng(rng);
        let x_pub = x25519::PublicKey::from(&x).to_bytes();
        let mut create = [0u8; CREATE_LEN];
        create[..32].copy_from_slice(&b);
        create[32..].copy_from_slice(&x_pub);
        (ClientHandshake { x, x_pub, b, id }, create)
    }

    /// Finishes with the hop's CREATED body (`Y | AUTH`): checks AUTH (key
    /// confirmation: only the holder of the onion key's secret can compute
    /// it) and returns the hop's keys.
    pub fn finish(self, created: &[u8]) -> Result<HopKeys, OnionError> {
        if created.len() < CREATED_LEN {
            return Err(OnionError::Malformed);
        }
        let y: [u8; 32] = created[..32].try_into().expect("32 bytes");
        let y_key = x25519::PublicKey::from(y);
        let s1 = self.x.diffie_hellman(&y_key);
        let s2 = self.x.diffie_hellman(&x25519::PublicKey::from(self.b));
        if !s1.was_contributory() || !s2.was_contributory() {
            return Err(OnionError::Degenerate);
        }
        let (auth, keys) = derive(
            s1.as_bytes(),
            s2.as_bytes(),
            &self.id,
            &self.b,
            &self.x_pub,
            &y,
        );
        // Constant-time comparison through the MAC API.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&auth).expect("key");
        m.update(b"confirm");
        let want = m.finalize();
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&created[32..64]).expect("key");
        m.update(b"confirm");
        if m.finalize() != want {
            return Err(OnionError::BadAuth);
        }
        Ok(keys)
    }
}

/// The hop's side: answers a CREATE body with its CREATED body and the keys.
/// `keys` are the onion keys the hop holds (current and previous).
pub fn server_handshake(
    rng: &mut (impl RngCore + CryptoRng),
    id: &NodeId,
    keys: &[&OnionKey],
    create: &[u8],
) -> Result<([u8; CREATED_LEN], HopKeys), OnionError> {
    if create.len() < CREATE_LEN {
        return Err(OnionError::Malformed);
    }
    let b: [u8; 32] = create[..32].try_into().expect("32 bytes");
    let x: [u8; 32] = create[32..64].try_into().expect("32 bytes");
    let onion = keys
        .iter()
        .find(|k| k.public == b)
        .ok_or(OnionError::UnknownOnionKey)?;
    let y = x25519::StaticSecret::random_from_rng(rng);
    let y_pub = x25519::PublicKey::from(&y).to_bytes();
    let x_key = x25519::PublicKey::from(x);
    let s1 = y.diffie_hellman(&x_key);
    let s2 = onion.secret.diffie_hellman(&x_key);
    if !s1.was_contributory() || !s2.was_contributory() {
        return Err(OnionError::Degenerate);
    }
    let (auth, keys) = derive(s1.as_bytes(), s2.as_bytes(), id, &b, &x, &y_pub);
    let mut created = [0u8; CREATED_LEN];
    created[..32].copy_from_slice(&y_pub);
    created[32..].copy_from_slice(&auth);
    Ok((created, keys))
}

/// One direction's keys at one hop.
pub struct DirKeys {
    /// The layer's keystream cipher, its key schedule expanded once (a
    /// cell clones it rather than expanding the key again).
    ctr: Aes256Enc,
    block: Aes256,
    /// ring's AES-GCM (assembly, on AES-NI and carry-less multiply): a
    /// large cell sealed in 0.38–0.40 µs and opened in 0.36–0.38 µs on the
    /// 2-core bench machine, against 1.5–1.8 µs each with the `aes-gcm`
    /// crate, whose GHASH topped a destination's profile
    /// (`cell_crypto_speed`, release, three runs each).
    gcm: LessSafeKey,
    magic: [u8; 8],
}

type Ctr = ctr::Ctr128BE<Aes256Enc>;

impl DirKeys {
    fn xor_stream(&self, iv: &[u8; 16], body: &mut [u8]) {
        let core = ctr::CtrCore::inner_iv_init(self.ctr.clone(), iv.into());
        let mut c = Ctr::from_core(core);
        c.apply_keystream(body);
    }

    fn enc_block(&self, n: &[u8; 16]) -> [u8; 16] {
        let mut b = (*n).into();
        self.block.encrypt_block(&mut b);
        b.into()
    }

    fn dec_block(&self, n: &[u8; 16]) -> [u8; 16] {
        let mut b = (*n).into();
        self.block.decrypt_block(&mut b);
        b.into()
    }

    fn recognised(&self, m: &[u8; 16]) -> Option<u64> {
        (m[..8] == self.magic).then(|| u64::from_be_bytes(m[8..].try_into().expect("8 bytes")))
    }

    fn gcm_nonce(counter: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_be_bytes());
        n
    }

    /// Fills `body` (a whole cell body) with `cmd | len | data | zeros`,
    /// sealed under counter `counter`; returns the inner nonce `magic | counter`.
    fn seal(&self, counter: u64, command: Cmd, data: &[u8], body: &mut [u8]) -> [u8; 16] {
        let plain = body.len() - TAG_LEN;
        debug_assert!(data.len() + RELAY_HEADER <= plain);
        body[0] = command as u8;
        body[1..3].copy_from_slice(&(data.len() as u16).to_be_bytes());
        body[3..3 + data.len()].copy_from_slice(data);
        body[3 + data.len()..plain].fill(0);
        let (text, tag) = body.split_at_mut(plain);
        let nonce = Nonce::assume_unique_for_key(Self::gcm_nonce(counter));
        let t = self
            .gcm
            .seal_in_place_separate_tag(nonce, Aad::empty(), text)
            .expect("GCM encrypts any length we use");
        tag.copy_from_slice(t.as_ref());
        let mut m = [0u8; 16];
        m[..8].copy_from_slice(&self.magic);
        m[8..].copy_from_slice(&counter.to_be_bytes());
        m
    }

    /// Opens an addressed body in place; returns (command, data range).
    fn open(
        &self,
        counter: u64,
        body: &mut [u8],
    ) -> Result<(Cmd, std::ops::Range<usize>), OnionError> {
        if body.len() < TAG_LEN + RELAY_HEADER {
            return Err(OnionError::Malformed);
        }
        let plain = body.len() - TAG_LEN;
        let (text, tag) = body.split_at_mut(plain);
        let tag = Tag::try_from(&tag[..]).map_err(|_| OnionError::Malformed)?;
        let nonce = Nonce::assume_unique_for_key(Self::gcm_nonce(counter));
        self.gcm
            .open_in_place_separate_tag(nonce, Aad::empty(), tag, text, 0..)
            .map_err(|_| OnionError::Forged)?;
        let len = u16::from_be_bytes([text[1], text[2]]) as usize;
        if RELAY_HEADER + len > plain {
            return Err(OnionError::Malformed);
        }
        Ok((Cmd::try_from(text[0])?, RELAY_HEADER..RELAY_HEADER + len))
    }
}

/// A hop's keys, both directions, plus a binding value only the source and
/// this hop know (the destination's signs the source's authentication).
pub struct HopKeys {
    fwd: DirKeys,
    bwd: DirKeys,
    /// Transcript binding for the source's authentication to this hop.
    pub bind: [u8; 32],
}

/// What a hop found in a forward cell.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// Addressed to this hop: (counter, command, data range in the body).
    Mine(u64, Cmd, std::ops::Range<usize>),
    /// Not for this hop: pass the cell on (nonce and body rewritten).
    Pass,
}

impl HopKeys {
    /// Relay/destination: handles a forward cell's nonce and body in place.
    pub fn forward(&self, nonce: &mut [u8; 16], body: &mut [u8]) -> Result<Forward, OnionError> {
        let m = self.fwd.dec_block(nonce);
        if let Some(counter) = self.fwd.recognised(&m) {
            let (c, r) = self.fwd.open(counter, body)?;
            return Ok(Forward::Mine(counter, c, r));
        }
        self.fwd.xor_stream(&m, body);
        *nonce = m;
        Ok(Forward::Pass)
    }

    /// Relay: adds its layer to a backward cell in place.
    pub fn backward(&self, nonce: &mut [u8; 16], body: &mut [u8]) {
        self.bwd.xor_stream(nonce, body);
        *nonce = self.bwd.enc_block(nonce);
    }

    /// Hop: writes a backward cell of its own into `body`; returns the nonce.
    pub fn originate(&self, counter: u64, command: Cmd, data: &[u8], body: &mut [u8]) -> [u8; 16] {
        let m = self.bwd.seal(counter, command, data, body);
        self.bwd.enc_block(&m)
    }
}

impl AsRef<HopKeys> for HopKeys {
    fn as_ref(&self) -> &HopKeys {
        self
    }
}

/// Source: builds a forward cell for `hops[target]` (earlier hops only
/// pass it on) into `body`; returns the nonce to send. `hops` is the
/// circuit's own slice (anything that lends its `HopKeys`), so no list of
/// keys is built per cell.
pub fn wrap<K: AsRef<HopKeys>>(
    hops: &[K],
    target: usize,
    counter: u64,
    command: Cmd,
    data: &[u8],
    body: &mut [u8],
) -> [u8; 16] {
    let t = hops[target].as_ref();
    let m = t.fwd.seal(counter, command, data, body);
    let mut n = t.fwd.enc_block(&m);
    for h in hops[..target].iter().rev() {
        let h = h.as_ref();
        h.fwd.xor_stream(&n, body);
        n = h.fwd.enc_block(&n);
    }
    n
}

/// A backward cell as the source found it: from `hop`, with its counter,
/// command and data range in the body.
#[derive(Debug, PartialEq, Eq)]
pub struct Unwrapped {
    /// Which hop spoke (index into the circuit's hops).
    pub hop: usize,
    /// Its counter.
    pub counter: u64,
    /// Command.
    pub command: Cmd,
    /// Data range in the body.
    pub data: std::ops::Range<usize>,
}

/// Source: peels a backward cell in place.
pub fn unwrap<K: AsRef<HopKeys>>(
    hops: &[K],
    nonce: [u8; 16],
    body: &mut [u8],
) -> Result<Unwrapped, OnionError> {
    let mut n = nonce;
    for (i, h) in hops.iter().enumerate() {
        let h = h.as_ref();
        let m = h.bwd.dec_block(&n);
        if let Some(counter) = h.bwd.recognised(&m) {
            let (command, data) = h.bwd.open(counter, body)?;
            return Ok(Unwrapped {
                hop: i,
                counter,
                command,
                data,
            });
        }
        h.bwd.xor_stream(&m, body);
        n = m;
    }
    Err(OnionError::Unrecognised)
}

/// Sliding-window replay check on cell counters (2048 wide, like
/// WireGuard's), shareable: the node and its data plane check a circuit's
/// counters against one window (behind an `Arc`) without a lock and without
/// handing it back and forth, so a cell is accepted once whichever of them
/// opens it. Hand-rolled because the crates that keep a replay window
/// (boringtun's among them) take `&mut self`.
///
/// Each of the 65 words covers a block of 32 counters: the block's number
/// in its high half, a bit per counter seen in the low half. A word only
/// ever moves to a later block (a compare-and-swap), so a counter is
/// accepted at most once: after it, its word holds its bit or a later
/// block, and either refuses it. Counters from 2^37 on (a circuit's 137
/// billionth cell) are refused; the circuit is rebuilt long before.
#[derive(Debug)]
pub struct ReplayWindow {
    /// The highest counter accepted: counters `WINDOW` or more below it
    /// are refused even where their word still holds their block.
    top: AtomicU64,
    words: [AtomicU64; WORDS],
}

/// Blocks from the top's back to `WINDOW` below it, each in a word of its own.
const WORDS: usize = 65;

impl Default for ReplayWindow {
    fn default() -> ReplayWindow {
        ReplayWindow {
            top: AtomicU64::new(0),
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}
const WINDOW: u64 = 64 * 32;
/// The first counter the window refuses (its block number takes 32 bits).
const COUNTER_LIMIT: u64 = 1 << 37;

impl ReplayWindow {
    /// Accepts `counter` once; refuses repeats and counters older than the
    /// window. Safe to call from several threads at once.
    pub fn check(&self, counter: u64) -> Result<(), OnionError> {
        if counter >= COUNTER_LIMIT
            || counter.saturating_add(WINDOW) <= self.top.load(Ordering::Acquire)
        {
            return Err(OnionError::Replay);
        }
        let block = counter / 32;
        let bit = 1u64 << (counter % 32);
        let word = &self.words[(block % WORDS as u64) as usize];
        let mut seen = word.load(Ordering::Acquire);
        loop {
            let (held, mask) = (seen >> 32, seen & 0xffff_ffff);
            let next = match held.cmp(&block) {
                std::cmp::Ordering::Greater => return Err(OnionError::Replay),
                std::cmp::Ordering::Equal if mask & bit != 0 => return Err(OnionError::Replay),
                std::cmp::Ordering::Equal => seen | bit,
                std::cmp::Ordering::Less => (block << 32) | bit,
            };
            match word.compare_exchange_weak(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => seen = now,
            }
        }
        self.top.fetch_max(counter, Ordering::AcqRel);
        Ok(())
    }
}

/// Domain separation for the source's signature to the destination.
pub const AUTH_CONTEXT: &[u8] = b"QuantumGate circuit auth\0";

/// The bytes the source signs to authenticate itself on a circuit: context,
/// destination ID, and the binding only this circuit's two ends know.
pub fn auth_message(dest: &NodeId, bind: &[u8; 32]) -> Vec<u8> {
    let mut m = AUTH_CONTEXT.to_vec();
    m.extend_from_slice(&dest.0);
    m.extend_from_slice(bind);
    m
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock
mod tests {
    use super::*;

    #[test]
    fn cell_kinds_and_commands_are_their_bytes_and_others_are_refused() {
        let (mut kinds, mut cmds) = (0, 0);
        for b in 0..=u8::MAX {
            match CellKind::try_from(b) {
                Ok(k) => {
                    assert_eq!(k as u8, b);
                    kinds += 1;
                    let mut cell = vec![0u8; CELL_SMALL];
                    write_header(&mut cell, 7, k, &[1; 16]);
                    assert_eq!(parse_cell(&cell).map(|h| (h.circ, h.kind)), Ok((7, k)));
                }
                Err(e) => {
                    assert_eq!(e, OnionError::BadKind);
                    let mut cell = vec![0u8; CELL_LARGE];
                    cell[4] = b;
                    assert_eq!(parse_cell(&cell), Err(OnionError::BadKind));
                }
            }
            match Cmd::try_from(b) {
                Ok(c) => {
                    assert_eq!(c as u8, b);
                    cmds += 1;
                }
                Err(e) => assert_eq!(e, OnionError::BadCommand),
            }
        }
        assert_eq!((kinds, cmds), (4, 12));
    }
    use rand_core::OsRng;

    fn hop(id: u8) -> (NodeId, OnionKey) {
        (NodeId([id; 32]), OnionKey::generate(&mut OsRng))
    }

    fn handshake(id: &NodeId, key: &OnionKey) -> (HopKeys, HopKeys) {
        let (c, create) = ClientHandshake::start(&mut OsRng, *id, key.public);
        let (created, server) = server_handshake(&mut OsRng, id, &[key], &create).unwrap();
        (c.finish(&created).unwrap(), server)
    }

    #[test]
    fn handshake_agrees_and_confirms_keys() {
        let (id, key) = hop(1);
        let (client, server) = handshake(&id, &key);
        assert_eq!(client.bind, server.bind);
        // Wrong onion key: the hop can't even answer.
        let (_, other) = hop(2);
        let (_, create) = ClientHandshake::start(&mut OsRng, id, other.public);
        assert_eq!(
            server_handshake(&mut OsRng, &id, &[&key], &create).err(),
            Some(OnionError::UnknownOnionKey)
        );
        // An impostor who holds a key under the right public value can't
        // exist; one that answers with its own key fails confirmation.
        let (c, create) = ClientHandshake::start(&mut OsRng, id, key.public);
        let mut fake_create = create;
        fake_create[..32].copy_from_slice(&other.public);
        let (created, _) = server_handshake(&mut OsRng, &id, &[&other], &fake_create).unwrap();
        assert_eq!(c.finish(&created).err(), Some(OnionError::BadAuth));
        // Tampered AUTH.
        let (c, create) = ClientHandshake::start(&mut OsRng, id, key.public);
        let (mut created, _) = server_handshake(&mut OsRng, &id, &[&key], &create).unwrap();
        created[40] ^= 1;
        assert_eq!(c.finish(&created).err(), Some(OnionError::BadAuth));
        // A small-order point from the client is refused.
        let mut zero = [0u8; CREATE_LEN];
        zero[..32].copy_from_slice(&key.public);
        assert_eq!(
            server_handshake(&mut OsRng, &id, &[&key], &zero).err(),
            Some(OnionError::Degenerate)
        );
    }

    /// Three relays and a destination: a cell for each hop reaches it
    /// through the others, changes completely at every hop, never changes
    /// size, and the backward direction peels at the source.
    #[test]
    fn layers_peel_one_per_hop_and_cells_change_at_every_hop() {
        let hops: Vec<(NodeId, OnionKey)> = (1..=4).map(hop).collect();
        let pairs: Vec<(HopKeys, HopKeys)> = hops.iter().map(|(i, k)| handshake(i, k)).collect();
        let client: Vec<&HopKeys> = pairs.iter().map(|p| &p.0).collect();
        let servers: Vec<&HopKeys> = pairs.iter().map(|p| &p.1).collect();
        for size in [CELL_SMALL, CELL_LARGE] {
            for target in 0..4 {
                let data = vec![0xab; 100];
                let mut body = vec![0u8; size - CELL_HEADER];
                let mut n = wrap(&client, target, 7, Cmd::Data, &data, &mut body);
                for (i, s) in servers.iter().enumerate() {
                    let before = (n, body.clone());
                    match s.forward(&mut n, &mut body).unwrap() {
                        Forward::Mine(c, command, r) => {
                            assert_eq!(i, target);
                            assert_eq!((c, command), (7, Cmd::Data));
                            assert_eq!(&body[r], &data[..]);
                            break;
                        }
                        Forward::Pass => {
                            assert!(i < target);
                            assert_ne!(before.0, n, "nonce unchanged at hop {i}");
                            let same = before.1.iter().zip(&body).filter(|(a, b)| a == b).count();
                            assert!(same < body.len() / 16, "body barely changed at hop {i}");
                            assert_eq!(body.len(), size - CELL_HEADER);
                        }
                    }
                }
                // Backward from `target`.
                let mut body = vec![0u8; size - CELL_HEADER];
                let mut n = servers[target].originate(9, Cmd::ProbeReply, b"pong", &mut body);
                for s in servers[..target].iter().rev() {
                    s.backward(&mut n, &mut body);
                }
                let u = unwrap(&client, n, &mut body).unwrap();
                assert_eq!((u.hop, u.counter, u.command), (target, 9, Cmd::ProbeReply));
                assert_eq!(&body[u.data], b"pong");
            }
        }
    }

    #[test]
    fn forged_and_truncated_cells_are_refused() {
        let (id, key) = hop(1);
        let (client, server) = handshake(&id, &key);
        let mut body = vec![0u8; CELL_SMALL - CELL_HEADER];
        let mut n = wrap(&[&client], 0, 1, Cmd::Probe, b"12345678", &mut body);
        body[30] ^= 0x40;
        assert_eq!(server.forward(&mut n, &mut body), Err(OnionError::Forged));
        assert_eq!(parse_cell(&[0u8; 255]).err(), Some(OnionError::BadSize));
        assert_eq!(parse_cell(&[0u8; 1377]).err(), Some(OnionError::BadSize));
        let mut cell = vec![0u8; CELL_SMALL];
        cell[4] = 9;
        assert_eq!(parse_cell(&cell).err(), Some(OnionError::BadKind));
        // Random junk backward is recognised by nobody.
        let mut junk = vec![7u8; CELL_SMALL - CELL_HEADER];
        assert_eq!(
            unwrap(&[&client], [3; 16], &mut junk).err(),
            Some(OnionError::Unrecognised)
        );
    }

    #[test]
    fn replay_window_refuses_repeats_and_old_counters() {
        let w = ReplayWindow::default();
        assert!(w.check(5).is_ok());
        assert!(w.check(5).is_err());
        assert!(w.check(3).is_ok(), "reordered within the window");
        assert!(w.check(3).is_err());
        assert!(w.check(5000).is_ok());
        assert!(w.check(5000 - WINDOW).is_err(), "older than the window");
        assert!(w.check(5000 - WINDOW + 1).is_ok());
        assert!(w.check(4999).is_ok());
        assert!(w.check(4999).is_err());
        assert!(w.check(COUNTER_LIMIT - 1).is_ok());
        assert!(w.check(COUNTER_LIMIT - 1).is_err());
        assert!(
            w.check(COUNTER_LIMIT).is_err(),
            "past the counters a window holds"
        );
        assert!(w.check(u64::MAX).is_err());
    }

    /// Two threads offered the same counters at the same time (each in its
    /// own order, and each also a counter a block generation later, which
    /// falls in the same word) accept each counter at most once between
    /// them, and every one of the newer generation exactly once.
    #[test]
    fn replay_window_shared_by_two_threads_accepts_each_counter_once() {
        use std::sync::{Arc, Barrier};
        const N: u64 = 1000;
        let gen = WORDS as u64 * 32;
        for round in 0..50u64 {
            let w = Arc::new(ReplayWindow::default());
            let start = Arc::new(Barrier::new(2));
            let base = round * 10 * gen;
            let run = |rev: bool| {
                let (w, start) = (w.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let mut ok = Vec::new();
                    for i in 0..N {
                        let c = base + if rev { N - 1 - i } else { i };
                        for c in [c, c + gen] {
                            if w.check(c).is_ok() {
                                ok.push(c);
                            }
                        }
                    }
                    ok
                })
            };
            let (a, b) = (run(false), run(true));
            let mut all = a.join().unwrap();
            all.extend(b.join().unwrap());
            all.sort_unstable();
            let len = all.len();
            all.dedup();
            assert_eq!(all.len(), len, "round {round}: a counter accepted twice");
            let newer: Vec<u64> = all.iter().copied().filter(|c| *c >= base + gen).collect();
            let want: Vec<u64> = (base + gen..base + gen + N).collect();
            assert_eq!(newer, want, "round {round}: every newer counter once");
        }
    }

    /// The end-to-end layer is standard AES-256-GCM with the nonce
    /// `0000 ‖ counter` and no associated data, tag after the text: the
    /// published test case 14 of the GCM specification (key, IV and 16
    /// bytes of text all zero) authenticates as counter 0's cell (its
    /// zero command byte is then refused as a command), and with one bit
    /// of its tag flipped it is forged. Pins the wire format against a
    /// change of the crate underneath.
    #[test]
    fn the_cell_layer_is_standard_gcm() {
        let zero = [0u8; 32];
        let keys = DirKeys {
            ctr: Aes256Enc::new_from_slice(&zero).unwrap(),
            block: Aes256::new_from_slice(&zero).unwrap(),
            gcm: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &zero).unwrap()),
            magic: [0; 8],
        };
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let mut body = hex("cea7403d4d606b6e074ec5d3baf39d18");
        body.extend(hex("d0d1c8a799996bf0265b98b5d48ab919"));
        let mut forged = body.clone();
        forged[31] ^= 1;
        assert_eq!(keys.open(0, &mut body), Err(OnionError::BadCommand));
        assert_eq!(body[..16], [0u8; 16], "the all-zero text of the test case");
        assert_eq!(keys.open(0, &mut forged), Err(OnionError::Forged));
    }

    /// What a large cell's end-to-end layer costs: the source's seal
    /// (`wrap` for the first hop) and the hop's open (`forward`, with a
    /// copy of the cell each time). A timing, not a check.
    #[test]
    #[ignore = "a timing: cargo test --release --lib cell_crypto_speed -- --ignored --nocapture"]
    fn cell_crypto_speed() {
        let (id, key) = hop(1);
        let (client, server) = handshake(&id, &key);
        let data = vec![0x5au8; MAX_DATA];
        let mut body = vec![0u8; CELL_LARGE - CELL_HEADER];
        const N: u32 = 50_000;
        let t = std::time::Instant::now();
        let mut nonce = [0u8; 16];
        for i in 0..N {
            nonce = wrap(&[&client], 0, u64::from(i) + 1, Cmd::Data, &data, &mut body);
        }
        let seal = t.elapsed() / N;
        let sealed = body.clone();
        let t = std::time::Instant::now();
        for _ in 0..N {
            body.copy_from_slice(&sealed);
            let mut n = nonce;
            assert!(matches!(
                server.forward(&mut n, &mut body),
                Ok(Forward::Mine(..))
            ));
        }
        let open = t.elapsed() / N;
        println!(
            "a large cell ({} bytes of data): seal {seal:?}, open {open:?}",
            MAX_DATA
        );
    }

    /// Forward secrecy: someone who recorded a circuit's handshake and cells
    /// and later gets the hop's onion secret (its link and RSA keys play no
    /// part) still can't open them: the ephemeral secret `y` is gone, and
    /// answering the recorded CREATE again yields other keys.
    #[test]
    fn recorded_cells_stay_sealed_after_the_onion_key_leaks() {
        let (id, key) = hop(1);
        let (c, create) = ClientHandshake::start(&mut OsRng, id, key.public);
        let (created, server) = server_handshake(&mut OsRng, &id, &[&key], &create).unwrap();
        let client = c.finish(&created).unwrap();
        let secret = b"the plaintext of a recorded cell";
        let mut body = vec![0u8; CELL_SMALL - CELL_HEADER];
        let n = wrap(&[&client], 0, 1, Cmd::Data, secret, &mut body);
        let recorded = (n, body.clone());
        // The hop itself can open it while it holds the circuit.
        let (mut n2, mut b2) = recorded.clone();
        assert!(matches!(
            server.forward(&mut n2, &mut b2),
            Ok(Forward::Mine(..))
        ));
        drop(server);
        // Later: the onion secret leaks (the attacker rebuilds the key pair).
        let leaked = OnionKey::from_secret(key.secret_bytes());
        for _ in 0..8 {
            let (_, replay) = server_handshake(&mut OsRng, &id, &[&leaked], &create).unwrap();
            let (mut n3, mut b3) = recorded.clone();
            assert!(!matches!(
                replay.forward(&mut n3, &mut b3),
                Ok(Forward::Mine(..))
            ));
            assert!(!b3.windows(secret.len()).any(|w| w == secret));
        }
    }
}
