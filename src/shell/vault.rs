//! The sealed state: everything the node keeps on disk, encrypted and
//! authenticated under a key derived from a master key that lives outside
//! the state directory (a key file, e.g. on removable media, or a
//! passphrase).
//!
//! ```text
//! DIR/qgate.toml        configuration (no secrets; not sealed)
//! DIR/vault/            directory, mode 0700
//! DIR/vault/header      plaintext, 53 bytes: how to turn the master key into
//!                       the vault key (key file or Argon2id + salt), and a key
//!                       ID (HKDF of the master key) that tells a wrong key
//!                       from a damaged store
//! DIR/vault/data.mdb    LMDB, every page but the two meta pages sealed
//! DIR/vault/lock.mdb    LMDB reader table (no data)
//! ```
//!
//! One LMDB environment holds all state, so one mechanism seals all of it
//! and a rotation can swap it in with one atomic rename:
//! - table `meta`: `identity` (RSA key as PKCS#8 PEM and the X25519 link
//!   secret), `record_seq` (u64), and later extender data;
//! - table `nodes`: the peer store (key = node ID, value = below).
//!
//! Page sealing is heed3's LMDB page encryption. The cipher is
//! AES-256-GCM-SIV, not plain AES-256-GCM: LMDB takes each page's nonce from
//! its page number and transaction ID, and a crash after pages reached the
//! disk but before the commit did makes the next transaction reuse that
//! transaction ID for different contents. Under GCM a repeated nonce leaks
//! the authentication key; under GCM-SIV it only shows that two sealed
//! pages were equal. Keys, values, table names and free pages are all
//! sealed; the meta pages hold only page numbers and sizes.
//!
//! What page sealing does not catch: LMDB does not bind a page to its
//! position beyond the page's own header, so an attacker who can write the
//! file may put back a whole older copy of it, or an older copy of a page.
//! Reads then see old but authentic data; nothing can be forged or read.
//!
//! A state directory from an earlier version (`identity.pem`, `link.key`,
//! `record.seq`, `peers.lmdb/` in the clear) is migrated once, on the first
//! open with a key: the vault is built beside it, renamed into place, and
//! only then are the plaintext files overwritten and removed.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aes_gcm_siv::aead::consts::{U0, U12, U16, U32};
use aes_gcm_siv::aead::generic_array::GenericArray;
use aes_gcm_siv::aead::{AeadCore, AeadInPlace, KeyInit, KeySizeUser};
use aes_gcm_siv::Aes256GcmSiv;
use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use heed3::types::Bytes;
use heed3::{CommitOrAbort, EncryptedDatabase, EncryptedEnv, EnvOpenOptions, WithoutTls};
use hkdf::Hkdf;
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::proto::Identity;

/// The vault directory inside the state directory.
pub const VAULT_DIR: &str = "vault";
/// Where a new vault is built before it is renamed into place (init,
/// migration, rotation). Left over only by a crash.
pub const VAULT_NEW: &str = "vault.new";
/// The plaintext header inside the vault directory.
const HEADER_FILE: &str = "header";
/// LMDB map size: the most the vault can ever hold.
const MAP_SIZE: usize = 64 * 1024 * 1024;
/// Named tables the environment may hold.
const MAX_DBS: u32 = 4;
/// The peer table.
const NODES_DB: &str = "nodes";
/// Identity, record sequence and other single values.
const META_DB: &str = "meta";
/// Meta key of the identity.
const META_IDENTITY: &[u8] = b"identity";
/// Meta key of the record sequence number.
const META_SEQ: &[u8] = b"record_seq";
/// Meta keys under this prefix hold the DHT value records the node keeps
/// (those it published through the control API and those it holds for
/// others), one per key.
const META_VALUES: &[u8] = b"dht/value/";
/// Version byte leading every peer value.
const VALUE_VERSION: u8 = 1;
/// Version, source and last-seen bytes before the record.
const VALUE_HEADER_LEN: usize = 1 + 1 + 8;
/// Version byte leading the identity value.
const IDENTITY_VERSION: u8 = 1;

/// Files of a state directory written by qgate before the vault existed.
pub const LEGACY_IDENTITY: &str = "identity.pem";
/// Legacy link key file.
pub const LEGACY_LINK: &str = "link.key";
/// Legacy record sequence file.
pub const LEGACY_SEQ: &str = "record.seq";
/// Legacy (unencrypted) peer store.
pub const LEGACY_STORE: &str = "peers.lmdb";

/// First bytes of the header.
const HEADER_MAGIC: &[u8; 8] = b"QGVAULT1";
/// Header length.
const HEADER_LEN: usize = 8 + 1 + 4 * 3 + 16 + 16;
/// Argon2id cost for a new passphrase: 64 MiB, 3 passes, 1 lane (about a
/// third of a second here), stored in the header so it can be raised later.
const ARGON2_M_KIB: u32 = 64 * 1024;
const ARGON2_T: u32 = 3;
const ARGON2_P: u32 = 1;
/// Bounds on the header's Argon2 costs, so a damaged header cannot make a
/// start allocate gigabytes or spin for hours.
const ARGON2_MAX_M_KIB: u32 = 4 * 1024 * 1024;
const ARGON2_MAX_T: u32 = 64;
const ARGON2_MAX_P: u32 = 16;
/// First line of a key file.
const KEY_FILE_PREFIX: &str = "qgate-master-key-v1:";

// ---------------------------------------------------------------------------
// The page cipher

/// The AEAD LMDB seals pages with: AES-256-GCM-SIV (see the module docs for
/// why not plain GCM), wrapped only so a test can learn where a chosen
/// plaintext landed in the file (`probe`).
pub struct PageCipher(Aes256GcmSiv);

impl KeySizeUser for PageCipher {
    type KeySize = U32;
}

impl KeyInit for PageCipher {
    fn new(key: &GenericArray<u8, U32>) -> Self {
        PageCipher(Aes256GcmSiv::new(key))
    }
}

impl AeadCore for PageCipher {
    type NonceSize = U12;
    type TagSize = U16;
    type CiphertextOverhead = U0;
}

impl AeadInPlace for PageCipher {
    fn encrypt_in_place_detached(
        &self,
        nonce: &GenericArray<u8, U12>,
        aad: &[u8],
        buffer: &mut [u8],
    ) -> aes_gcm_siv::aead::Result<GenericArray<u8, U16>> {
        #[cfg(feature = "test-hooks")]
        if PROBE_ON.load(Ordering::Relaxed) {
            probe::observe(nonce, buffer);
        }
        self.0.encrypt_in_place_detached(nonce, aad, buffer)
    }

    fn decrypt_in_place_detached(
        &self,
        nonce: &GenericArray<u8, U12>,
        aad: &[u8],
        buffer: &mut [u8],
        tag: &GenericArray<u8, U16>,
    ) -> aes_gcm_siv::aead::Result<()> {
        self.0.decrypt_in_place_detached(nonce, aad, buffer, tag)
    }
}

#[cfg(feature = "test-hooks")]
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Mutex,
};

#[cfg(feature = "test-hooks")]
static PROBE_ON: AtomicBool = AtomicBool::new(false);
#[cfg(feature = "test-hooks")]
static PROBE: Mutex<Option<(Vec<u8>, Option<u64>)>> = Mutex::new(None);

/// Test hook: where in `data.mdb` a chosen plaintext was sealed, so a test
/// can flip a byte inside a stored value and be sure it hit one.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod probe {
    use super::*;

    /// LMDB's page header before the sealed part of each page (page number
    /// and transaction ID; they form the nonce).
    const PAGE_HEADER: u64 = 16;

    /// Starts watching page seals for `marker`.
    pub fn start(marker: &[u8]) {
        *PROBE.lock().unwrap_or_else(|e| e.into_inner()) = Some((marker.to_vec(), None));
        PROBE_ON.store(true, Ordering::Relaxed);
    }

    /// Stops watching; the file offset of the marker's first byte in the
    /// last page sealed with it, if any.
    pub fn take() -> Option<u64> {
        PROBE_ON.store(false, Ordering::Relaxed);
        PROBE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .and_then(|(_, at)| at)
    }

    pub(super) fn observe(nonce: &GenericArray<u8, U12>, page: &[u8]) {
        let mut guard = PROBE.lock().unwrap_or_else(|e| e.into_inner());
        let Some((marker, at)) = guard.as_mut() else {
            return;
        };
        if marker.is_empty() {
            return;
        }
        if let Some(off) = page.windows(marker.len()).position(|w| w == &marker[..]) {
            let mut pgno = [0u8; 8];
            pgno.copy_from_slice(&nonce[..8]);
            let psize = page_size();
            *at = Some(u64::from_le_bytes(pgno) * psize + PAGE_HEADER + off as u64);
        }
    }

    fn page_size() -> u64 {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .unwrap_or(4096)
    }
}

// ---------------------------------------------------------------------------
// Master keys

/// Where the master key comes from.
pub enum KeySource {
    /// A key file (`qgate key new PATH` writes one).
    File(PathBuf),
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<String>),
}

impl KeySource {
    /// For messages: "key file PATH" or "the passphrase".
    pub fn describe(&self) -> String {
        match self {
            KeySource::File(p) => format!("key file {}", p.display()),
            KeySource::Passphrase(_) => "the passphrase".into(),
        }
    }
}

/// The key file a state directory uses when none is named: beside the
/// directory, never in it, and named after it, so two nodes on one host
/// never share one (`/var/lib/qgate` → `/var/lib/qgate.key`).
pub fn default_key_file(state_dir: &Path) -> Result<PathBuf> {
    let abs = if state_dir.is_absolute() {
        state_dir.to_path_buf()
    } else {
        std::env::current_dir()
            .context("finding the current directory")?
            .join(state_dir)
    };
    let name = abs.file_name().ok_or_else(|| {
        anyhow!(
            "{}: cannot derive a key file name from this state directory; give --key-file PATH",
            state_dir.display()
        )
    })?;
    let mut name = name.to_os_string();
    name.push(".key");
    Ok(abs.with_file_name(name))
}

/// Writes a new random master key to `path` (mode 0600, synced). Refuses to
/// overwrite anything.
pub fn generate_key_file(path: &Path) -> Result<()> {
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut key[..]);
    let text = Zeroizing::new(format!("{KEY_FILE_PREFIX}{}\n", STANDARD.encode(&key[..])));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow!(
                    "key file {} already exists; refusing to overwrite it",
                    path.display()
                )
            } else {
                anyhow!("creating key file {}: {e}", path.display())
            }
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing key file {}", path.display()))?;
    sync_parent(path)?;
    Ok(())
}

/// Reads a key file. Warns when others may read it.
fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let f = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "key file {} not found (is the media holding it mounted?)",
                path.display()
            )
        } else {
            anyhow!("reading key file {}: {e}", path.display())
        }
    })?;
    if let Ok(meta) = f.metadata() {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "key file {} can be read by others (mode {:o}); `chmod 600` it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    let mut text = Zeroizing::new(String::new());
    f.take(4096)
        .read_to_string(&mut text)
        .with_context(|| format!("reading key file {}", path.display()))?;
    let bad = || anyhow!("{} is not a qgate key file", path.display());
    let b64 = text.trim().strip_prefix(KEY_FILE_PREFIX).ok_or_else(bad)?;
    let raw = Zeroizing::new(STANDARD.decode(b64).map_err(|_| bad())?);
    let key: [u8; 32] = raw.as_slice().try_into().map_err(|_| bad())?;
    Ok(Zeroizing::new(key))
}

/// Reads a passphrase from an open file descriptor (one line; the trailing
/// newline is not part of it).
pub fn read_passphrase_fd(fd: i32) -> Result<Zeroizing<String>> {
    // Through /proc rather than from_raw_fd: no unsafe, and the descriptor
    // is not closed behind its owner's back.
    let path = format!("/proc/self/fd/{fd}");
    let mut text = Zeroizing::new(String::new());
    File::open(&path)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| anyhow!("reading the passphrase from file descriptor {fd}: {e}"))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!("the passphrase from file descriptor {fd} is empty");
    }
    Ok(Zeroizing::new(line.to_string()))
}

/// How the user named the master key: command-line flags and the config's
/// `key_file`.
#[derive(Clone, Debug, Default)]
pub struct KeyOptions {
    /// `--key-file PATH` (or the config's `key_file`).
    pub key_file: Option<PathBuf>,
    /// `--passphrase-fd N`.
    pub passphrase_fd: Option<i32>,
    /// `--ask-passphrase`: prompt on the terminal.
    pub ask_passphrase: bool,
}

impl KeyOptions {
    fn passphrase(&self, state_dir: &Path, confirm: bool) -> Result<Option<KeySource>> {
        if self.key_file.is_some() && (self.passphrase_fd.is_some() || self.ask_passphrase) {
            bail!("give either a key file or a passphrase, not both");
        }
        if let Some(fd) = self.passphrase_fd {
            return Ok(Some(KeySource::Passphrase(read_passphrase_fd(fd)?)));
        }
        if self.ask_passphrase {
            let prompt = format!("passphrase for {}: ", state_dir.display());
            let pass = Zeroizing::new(
                rpassword::prompt_password(prompt)
                    .context("reading the passphrase from the terminal")?,
            );
            if pass.is_empty() {
                bail!("the passphrase is empty");
            }
            if confirm {
                let again = Zeroizing::new(
                    rpassword::prompt_password("the same passphrase again: ")
                        .context("reading the passphrase from the terminal")?,
                );
                if *again != *pass {
                    bail!("the passphrases differ; nothing was written");
                }
            }
            return Ok(Some(KeySource::Passphrase(pass)));
        }
        Ok(None)
    }

    /// The key that opens `state_dir`'s vault (or seals a plaintext state
    /// once). Without options: the default key file, if it exists.
    pub fn for_open(&self, state_dir: &Path) -> Result<KeySource> {
        if let Some(k) = self.passphrase(state_dir, false)? {
            return Ok(k);
        }
        if let Some(p) = &self.key_file {
            return Ok(KeySource::File(p.clone()));
        }
        let default = default_key_file(state_dir)?;
        if default.exists() {
            return Ok(KeySource::File(default));
        }
        let dir = state_dir.display();
        match layout(state_dir) {
            Layout::Legacy => bail!(
                "{dir} holds an unsealed state from an earlier qgate: seal it once by starting with a key, e.g. `qgate key new --key-file {}` then `--key-file {}` (or --passphrase-fd N)",
                default.display(),
                default.display()
            ),
            Layout::Sealed => {
                let passphrase = Header::read(&state_dir.join(VAULT_DIR))
                    .map(|h| matches!(h.kdf, Kdf::Argon2id { .. }))
                    .unwrap_or(false);
                if passphrase {
                    bail!("no key: {dir} is sealed with a passphrase: give --passphrase-fd N or --ask-passphrase")
                }
                bail!(
                    "no key: {dir} is sealed and its default key file {} does not exist (is the media holding it mounted?); give --key-file PATH",
                    default.display()
                )
            }
            Layout::Empty => bail!(
                "{dir} holds no node keys: run `qgate init --state-dir {dir}` first"
            ),
        }
    }

    /// The key that seals a new vault: a passphrase, the named key file
    /// (created if missing), or a new default key file (never
    /// overwritten). Also says what it did, for the user.
    pub fn for_create(&self, state_dir: &Path) -> Result<(KeySource, String)> {
        if let Some(k) = self.passphrase(state_dir, true)? {
            return Ok((k, "sealed with a passphrase (Argon2id)".into()));
        }
        match &self.key_file {
            Some(p) if p.exists() => {
                read_key_file(p)?;
                Ok((
                    KeySource::File(p.clone()),
                    format!("sealed with the existing key file {}", p.display()),
                ))
            }
            Some(p) => {
                generate_key_file(p)?;
                Ok((
                    KeySource::File(p.clone()),
                    format!(
                        "new key file {} (keep it safe: without it the state is lost)",
                        p.display()
                    ),
                ))
            }
            None => {
                let p = default_key_file(state_dir)?;
                if p.exists() {
                    bail!(
                        "key file {} already exists; refusing to overwrite it (pass --key-file {} to seal with it)",
                        p.display(),
                        p.display()
                    );
                }
                generate_key_file(&p)?;
                Ok((
                    KeySource::File(p.clone()),
                    format!(
                        "new key file {} (outside the state dir; move it to removable media and set key_file, see README)",
                        p.display()
                    ),
                ))
            }
        }
    }
}

/// How the header turns the master key into the vault key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kdf {
    /// The key file's 32 bytes are the master key.
    KeyFile,
    /// Argon2id over the passphrase with the header's salt.
    Argon2id { m_kib: u32, t: u32, p: u32 },
}

/// The vault's plaintext header.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Header {
    kdf: Kdf,
    salt: [u8; 16],
    key_id: [u8; 16],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(HEADER_MAGIC);
        let (kind, m, t, p) = match self.kdf {
            Kdf::KeyFile => (0u8, 0, 0, 0),
            Kdf::Argon2id { m_kib, t, p } => (1u8, m_kib, t, p),
        };
        out[8] = kind;
        out[9..13].copy_from_slice(&m.to_be_bytes());
        out[13..17].copy_from_slice(&t.to_be_bytes());
        out[17..21].copy_from_slice(&p.to_be_bytes());
        out[21..37].copy_from_slice(&self.salt);
        out[37..53].copy_from_slice(&self.key_id);
        out
    }

    fn decode(b: &[u8]) -> Option<Header> {
        if b.len() != HEADER_LEN || &b[..8] != HEADER_MAGIC {
            return None;
        }
        let u = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let kdf = match b[8] {
            0 => Kdf::KeyFile,
            1 => {
                let (m_kib, t, p) = (u(9), u(13), u(17));
                if !(8..=ARGON2_MAX_M_KIB).contains(&m_kib)
                    || !(1..=ARGON2_MAX_T).contains(&t)
                    || !(1..=ARGON2_MAX_P).contains(&p)
                {
                    return None;
                }
                Kdf::Argon2id { m_kib, t, p }
            }
            _ => return None,
        };
        Some(Header {
            kdf,
            salt: b[21..37].try_into().ok()?,
            key_id: b[37..53].try_into().ok()?,
        })
    }

    fn read(vault: &Path) -> Result<Header> {
        let path = vault.join(HEADER_FILE);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Header::decode(&bytes).ok_or_else(|| {
            anyhow!(
                "{} is damaged (not a qgate vault header); the vault cannot be opened",
                path.display()
            )
        })
    }
}

/// The keys derived from one master key.
struct Keys {
    /// Seals the LMDB pages.
    store: Zeroizing<[u8; 32]>,
    /// Names the master key in the header (not secret).
    key_id: [u8; 16],
}

impl Keys {
    fn from_master(master: &[u8; 32]) -> Keys {
        let hk = Hkdf::<Sha256>::new(Some(b"qgate vault v1"), master);
        let mut store = Zeroizing::new([0u8; 32]);
        let mut key_id = [0u8; 16];
        // Both lengths are far below HKDF-SHA256's limit.
        hk.expand(b"page key", &mut store[..])
            .expect("32 bytes is a valid HKDF length");
        hk.expand(b"key id", &mut key_id)
            .expect("16 bytes is a valid HKDF length");
        Keys { store, key_id }
    }

    /// The master key per the header's recipe.
    fn derive(source: &KeySource, kdf: Kdf, salt: &[u8; 16]) -> Result<Keys> {
        let master = match (source, kdf) {
            (KeySource::File(path), _) => read_key_file(path)?,
            (KeySource::Passphrase(pass), Kdf::Argon2id { m_kib, t, p }) => {
                argon2id(pass, salt, m_kib, t, p)?
            }
            (KeySource::Passphrase(pass), Kdf::KeyFile) => {
                // A passphrase cannot open a key-file vault; derive anyway so
                // the ID check reports a wrong key.
                argon2id(pass, salt, ARGON2_M_KIB, ARGON2_T, ARGON2_P)?
            }
        };
        Ok(Keys::from_master(&master))
    }

    /// A fresh header (new salt) and keys for `source`.
    fn fresh(source: &KeySource) -> Result<(Header, Keys)> {
        let mut salt = [0u8; 16];
        OsRng.fill_bytes(&mut salt);
        let kdf = match source {
            KeySource::File(_) => Kdf::KeyFile,
            KeySource::Passphrase(_) => Kdf::Argon2id {
                m_kib: ARGON2_M_KIB,
                t: ARGON2_T,
                p: ARGON2_P,
            },
        };
        let keys = Keys::derive(source, kdf, &salt)?;
        let header = Header {
            kdf,
            salt,
            key_id: keys.key_id,
        };
        Ok((header, keys))
    }
}

fn argon2id(pass: &str, salt: &[u8; 16], m: u32, t: u32, p: u32) -> Result<Zeroizing<[u8; 32]>> {
    let params =
        argon2::Params::new(m, t, p, Some(32)).map_err(|e| anyhow!("Argon2id parameters: {e}"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(pass.as_bytes(), salt, &mut out[..])
        .map_err(|e| anyhow!("stretching the passphrase: {e}"))?;
    Ok(out)
}

fn short(id: &[u8; 16]) -> String {
    hex::encode(&id[..4])
}

// ---------------------------------------------------------------------------
// The vault

/// One remembered node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPeer {
    /// The node's signed record, as received (opaque bytes here).
    pub record: Vec<u8>,
    /// Where the entry came from first: 0 = config, 1 = network, 2 = store,
    /// 3 = lan (opaque u8 here).
    pub source: u8,
    /// Unix seconds when the node was last heard from.
    pub last_seen_unix: u64,
}

/// Everything a vault holds, in memory: what a migration or a rotation
/// copies.
struct Contents {
    identity: Zeroizing<Vec<u8>>,
    seq: u64,
    /// Raw (key, value) pairs of the `nodes` table.
    nodes: Vec<(Vec<u8>, Vec<u8>)>,
    /// Other `meta` entries (extender data), copied as they are.
    meta: Vec<(Vec<u8>, Zeroizing<Vec<u8>>)>,
}

/// An open vault.
pub struct Vault {
    env: EncryptedEnv<WithoutTls>,
    nodes: EncryptedDatabase<'static, Bytes, Bytes>,
    meta: EncryptedDatabase<'static, Bytes, Bytes>,
    path: PathBuf,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("path", &self.path).finish()
    }
}

/// What a state directory holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Layout {
    /// Nothing: `qgate init` has not run.
    Empty,
    /// Plaintext state from a qgate without a vault.
    Legacy,
    /// A vault.
    Sealed,
}

/// Looks at a state directory without opening anything.
pub fn layout(state_dir: &Path) -> Layout {
    if state_dir.join(VAULT_DIR).join(HEADER_FILE).exists() {
        Layout::Sealed
    } else if state_dir.join(LEGACY_IDENTITY).exists() {
        Layout::Legacy
    } else {
        Layout::Empty
    }
}

fn encode_identity(identity: &Identity) -> Result<Zeroizing<Vec<u8>>> {
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

/// The one-line message for an LMDB error while reading a vault: a page that
/// fails authentication gets its own, since it means tampering or damage.
fn read_error(path: &Path, e: heed3::Error) -> anyhow::Error {
    match e {
        heed3::Error::Mdb(heed3::MdbError::CryptoFail)
        | heed3::Error::Mdb(heed3::MdbError::Corrupted)
        | heed3::Error::Mdb(heed3::MdbError::PageNotFound)
        | heed3::Error::Mdb(heed3::MdbError::Invalid)
        | heed3::Error::Mdb(heed3::MdbError::BadTxn) => anyhow!(
            "vault {} failed authentication: it was tampered with or is damaged ({e}); refusing to start, nothing was changed",
            path.display()
        ),
        e => anyhow!("vault {}: {e}", path.display()),
    }
}

fn open_env(dir: &Path, keys: &Keys) -> Result<Vault> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
    let key = GenericArray::clone_from_slice(&keys.store[..]);
    // SAFETY: LMDB memory-maps `data.mdb`; the map is undefined behaviour
    // only if the file is modified outside LMDB's own locking, or the same
    // environment is opened twice in one process. The node opens its vault
    // once per state directory per process, `run` and `key rotate` hold the
    // state directory's lock (`StateLock`), and heed3 itself rejects a
    // second open of one path in this process (`EnvAlreadyOpened`), which we
    // propagate. No unsafe `EnvFlags` are set. The crate denies
    // `unsafe_code`; this is the one audited exception in the vault.
    #[allow(unsafe_code)]
    let env = unsafe { options.open_encrypted::<PageCipher, _>(key, dir) }
        .map_err(|e| read_error(dir, e))?;
    let wtxn = env.write_txn().map_err(|e| read_error(dir, e))?;
    let created = env
        .create_databases_and_commit(wtxn, |opener, wtxn| {
            let nodes = opener.create_database::<Bytes, Bytes>(wtxn, Some(NODES_DB))?;
            let meta = opener.create_database::<Bytes, Bytes>(wtxn, Some(META_DB))?;
            Ok::<_, heed3::Error>(CommitOrAbort::<_, std::convert::Infallible>::Commit((
                nodes, meta,
            )))
        })
        .map_err(|e| read_error(dir, e))?;
    let (nodes, meta) = match created {
        CommitOrAbort::Commit(dbs) => dbs,
        CommitOrAbort::Abort(never) => match never {},
    };
    Ok(Vault {
        env,
        nodes,
        meta,
        path: dir.to_path_buf(),
    })
}

/// Builds a complete vault in `dir` (which must not exist): header, tables,
/// contents; committed and synced before it returns.
fn build(dir: &Path, header: &Header, keys: &Keys, contents: &Contents) -> Result<()> {
    write_vault(dir, header, keys, contents)?;
    sync_vault(dir)
}

/// Writes a complete vault into `dir` (which must not exist): header,
/// tables, contents, committed in one transaction and closed.
fn write_vault(dir: &Path, header: &Header, keys: &Keys, contents: &Contents) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(HEADER_FILE);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&header.encode()))
        .with_context(|| format!("writing {}", path.display()))?;
    let vault = open_env(dir, keys)?;
    vault.write_all(contents)?;
    vault.close();
    Ok(())
}

/// Makes a written vault durable: its files, its directory, and the entry
/// naming it in the state directory.
fn sync_vault(dir: &Path) -> Result<()> {
    for f in [HEADER_FILE, "data.mdb", "lock.mdb"] {
        let p = dir.join(f);
        if p.exists() {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", p.display()))?;
        }
    }
    sync_dir(dir)?;
    sync_parent(dir)
}

impl Vault {
    /// Creates the vault of a new node in `state_dir` (built beside, then
    /// renamed into place). Refuses if any state exists.
    pub fn create(state_dir: &Path, source: &KeySource, identity: &Identity) -> Result<Vault> {
        if layout(state_dir) != Layout::Empty {
            bail!(
                "{} already holds a node's keys; refusing to overwrite them (`qgate id --state-dir {}` prints them)",
                state_dir.display(),
                state_dir.display()
            );
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let (header, keys) = Keys::fresh(source)?;
        let contents = Contents {
            identity: encode_identity(identity)?,
            seq: 0,
            nodes: Vec::new(),
            meta: Vec::new(),
        };
        let new = state_dir.join(VAULT_NEW);
        remove_tree(&new)?;
        build(&new, &header, &keys, &contents)?;
        let vault = state_dir.join(VAULT_DIR);
        fs::rename(&new, &vault).with_context(|| format!("renaming {}", new.display()))?;
        sync_dir(state_dir)?;
        open_env(&vault, &keys)
    }

    /// Opens the vault of `state_dir` with `source`: checks the key, reads
    /// and authenticates every entry, migrates a plaintext state from an
    /// earlier version, and clears what a crash left behind. Every refusal
    /// is one line and changes nothing.
    pub fn open(state_dir: &Path, source: &KeySource) -> Result<Vault> {
        match layout(state_dir) {
            Layout::Empty => bail!(
                "{} holds no node keys: run `qgate init --state-dir {}` first",
                state_dir.display(),
                state_dir.display()
            ),
            Layout::Legacy => migrate(state_dir, source)?,
            Layout::Sealed => {}
        }
        let dir = state_dir.join(VAULT_DIR);
        let header = Header::read(&dir)?;
        let keys = Keys::derive(source, header.kdf, &header.salt)?;
        if keys.key_id != header.key_id {
            return Err(wrong_key(state_dir, &header, &keys));
        }
        let vault = open_env(&dir, &keys)?;
        vault.verify()?;
        // A crash in a rotation or migration may have left a second copy:
        // the vault opened, holds everything, so the copy goes.
        let new = state_dir.join(VAULT_NEW);
        if new.exists() {
            tracing::info!("removing {} left by an interrupted rotation", new.display());
            remove_tree(&new)?;
        }
        if state_dir.join(LEGACY_IDENTITY).exists() || state_dir.join(LEGACY_STORE).exists() {
            remove_legacy(state_dir)?;
        }
        Ok(vault)
    }

    /// Reads every entry once: a page that fails authentication is found at
    /// start, not in the middle of a run.
    fn verify(&self) -> Result<()> {
        self.identity()?;
        self.load()?;
        let mut rtxn = self.rtxn()?;
        for entry in self.meta.iter(&mut rtxn).map_err(|e| self.err(e))? {
            entry.map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn err(&self, e: heed3::Error) -> anyhow::Error {
        read_error(&self.path, e)
    }

    fn rtxn(&self) -> Result<heed3::RoTxn<'_, WithoutTls>> {
        self.env.read_txn().map_err(|e| self.err(e))
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let mut rtxn = self.rtxn()?;
        let v = self
            .meta
            .get(&mut rtxn, key)
            .map_err(|e| self.err(e))?
            .map(|v| Zeroizing::new(v.to_vec()));
        Ok(v)
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
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        self.meta
            .put(&mut wtxn, META_SEQ, &seq.to_be_bytes())
            .map_err(|e| self.err(e))?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// All stored peers, keyed by 32-byte node ID, in key order. Entries
    /// whose key or value does not decode are skipped (and counted in a
    /// warning), never a panic. A page that fails authentication is an
    /// error.
    pub fn load(&self) -> Result<Vec<([u8; 32], StoredPeer)>> {
        let mut rtxn = self.rtxn()?;
        let mut peers = Vec::new();
        let mut skipped = 0usize;
        for entry in self.nodes.iter(&mut rtxn).map_err(|e| self.err(e))? {
            let (key, value) = entry.map_err(|e| self.err(e))?;
            match (<[u8; 32]>::try_from(key), decode_value(value)) {
                (Ok(id), Some(peer)) => peers.push((id, peer)),
                _ => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                loaded = peers.len(),
                "vault: skipped peer entries that do not decode"
            );
        }
        Ok(peers)
    }

    /// Replaces the whole peer table with `peers` in ONE write transaction,
    /// so a crash leaves either the old or the new set.
    pub fn replace_all(&self, peers: &[([u8; 32], StoredPeer)]) -> Result<()> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        self.nodes.clear(&mut wtxn).map_err(|e| self.err(e))?;
        let mut value = Vec::new();
        for (id, peer) in peers {
            encode_value(peer, &mut value);
            self.nodes
                .put(&mut wtxn, id, &value)
                .map_err(|e| self.err(e))?;
        }
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Number of stored peers.
    pub fn len(&self) -> Result<usize> {
        let rtxn = self.rtxn()?;
        let n = self.nodes.len(&rtxn).map_err(|e| self.err(e))?;
        usize::try_from(n).map_err(|_| anyhow!("peer count overflows"))
    }

    /// Whether the peer table is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The DHT value records kept by the last [`Vault::replace_values`].
    pub fn values(&self) -> Result<Vec<Vec<u8>>> {
        let mut rtxn = self.rtxn()?;
        let mut out = Vec::new();
        for entry in self
            .meta
            .prefix_iter(&mut rtxn, META_VALUES)
            .map_err(|e| self.err(e))?
        {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            out.push(v.to_vec());
        }
        Ok(out)
    }

    /// Replaces the kept DHT value records with `records` in one write
    /// transaction (a crash leaves the old or the new set).
    pub fn replace_values<R: AsRef<[u8]>>(&self, records: &[R]) -> Result<()> {
        let mut end = META_VALUES.to_vec();
        *end.last_mut().expect("non-empty prefix") += 1;
        let range = (
            std::ops::Bound::Included(META_VALUES),
            std::ops::Bound::Excluded(&end[..]),
        );
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        self.meta
            .delete_range(&mut wtxn, &range)
            .map_err(|e| self.err(e))?;
        let mut key = META_VALUES.to_vec();
        for (i, r) in records.iter().enumerate() {
            key.truncate(META_VALUES.len());
            key.extend_from_slice(&(i as u32).to_be_bytes());
            self.meta
                .put(&mut wtxn, &key, r.as_ref())
                .map_err(|e| self.err(e))?;
        }
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Stores an opaque value in the `meta` table under `key` (extender
    /// data; `identity`, `record_seq` and keys under `dht/value/` are
    /// reserved).
    pub fn put_meta(&self, key: &[u8], value: &[u8]) -> Result<()> {
        if key == META_IDENTITY || key == META_SEQ || key.starts_with(META_VALUES) {
            bail!("vault key {:?} is reserved", String::from_utf8_lossy(key));
        }
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        self.meta
            .put(&mut wtxn, key, value)
            .map_err(|e| self.err(e))?;
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Reads an opaque `meta` value.
    pub fn meta_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.get_meta(key)?.map(|v| v.to_vec()))
    }

    /// Everything, for a copy.
    fn contents(&self) -> Result<Contents> {
        let identity = self
            .get_meta(META_IDENTITY)?
            .ok_or_else(|| anyhow!("vault {} holds no identity", self.path.display()))?;
        let seq = self.record_seq()?;
        let mut rtxn = self.rtxn()?;
        let mut nodes = Vec::new();
        for entry in self.nodes.iter(&mut rtxn).map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            nodes.push((k.to_vec(), v.to_vec()));
        }
        let mut meta = Vec::new();
        for entry in self.meta.iter(&mut rtxn).map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            if k != META_IDENTITY && k != META_SEQ {
                meta.push((k.to_vec(), Zeroizing::new(v.to_vec())));
            }
        }
        Ok(Contents {
            identity,
            seq,
            nodes,
            meta,
        })
    }

    /// Writes `contents` into this (new) vault in one transaction.
    fn write_all(&self, c: &Contents) -> Result<()> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        self.meta
            .put(&mut wtxn, META_IDENTITY, &c.identity)
            .map_err(|e| self.err(e))?;
        self.meta
            .put(&mut wtxn, META_SEQ, &c.seq.to_be_bytes())
            .map_err(|e| self.err(e))?;
        for (k, v) in &c.meta {
            self.meta.put(&mut wtxn, k, v).map_err(|e| self.err(e))?;
        }
        for (k, v) in &c.nodes {
            self.nodes.put(&mut wtxn, k, v).map_err(|e| self.err(e))?;
        }
        wtxn.commit().map_err(|e| self.err(e))
    }

    /// Closes the environment and waits until LMDB has let go of it.
    pub fn close(self) {
        let Vault { env, .. } = self;
        env.prepare_for_closing().wait();
    }
}

/// Explains a key whose ID is not the vault's: the wrong key, or one side
/// of a rotation that a crash interrupted.
fn wrong_key(state_dir: &Path, header: &Header, keys: &Keys) -> anyhow::Error {
    let new = state_dir.join(VAULT_NEW);
    if let Ok(other) = Header::read(&new) {
        if other.key_id == keys.key_id {
            return anyhow!(
                "{}: this key ({}) is one side of an interrupted key rotation; the vault is sealed with key {}: start with that key (then rotate again if you want)",
                state_dir.display(),
                short(&keys.key_id),
                short(&header.key_id)
            );
        }
    }
    anyhow!(
        "wrong key: {} is sealed with key {}, the key given is {}; refusing to start, nothing was changed",
        state_dir.display(),
        short(&header.key_id),
        short(&keys.key_id)
    )
}

// ---------------------------------------------------------------------------
// Migration from a plaintext state directory

/// Seals a plaintext state directory once: builds the vault beside it,
/// renames it into place; `Vault::open` then removes the plaintext files.
fn migrate(state_dir: &Path, source: &KeySource) -> Result<()> {
    let identity = legacy_identity(state_dir)?;
    let seq = fs::read_to_string(state_dir.join(LEGACY_SEQ))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let nodes = legacy_peers(state_dir)?;
    let (header, keys) = Keys::fresh(source)?;
    let contents = Contents {
        identity: encode_identity(&identity)?,
        seq,
        nodes,
        meta: Vec::new(),
    };
    let new = state_dir.join(VAULT_NEW);
    remove_tree(&new)?;
    build(&new, &header, &keys, &contents)?;
    fs::rename(&new, state_dir.join(VAULT_DIR))
        .with_context(|| format!("renaming {}", new.display()))?;
    sync_dir(state_dir)?;
    tracing::info!(
        peers = contents.nodes.len(),
        "sealed the plaintext state of {} under {}; removing the plaintext files",
        state_dir.display(),
        source.describe()
    );
    Ok(())
}

fn legacy_identity(dir: &Path) -> Result<Identity> {
    let id_path = dir.join(LEGACY_IDENTITY);
    let pem = Zeroizing::new(
        fs::read_to_string(&id_path).with_context(|| format!("reading {}", id_path.display()))?,
    );
    let link_path = dir.join(LEGACY_LINK);
    let link = Zeroizing::new(
        fs::read_to_string(&link_path)
            .with_context(|| format!("reading {}", link_path.display()))?,
    );
    let raw = Zeroizing::new(STANDARD.decode(link.trim()).unwrap_or_default());
    let link: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| anyhow!("{}: not a base64 32-byte key", link_path.display()))?;
    Identity::from_pem(&pem, link).with_context(|| format!("loading {}", id_path.display()))
}

/// The raw entries of a plaintext peer store, if there is one.
fn legacy_peers(dir: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = dir.join(LEGACY_STORE);
    if !path.join("data.mdb").exists() {
        return Ok(Vec::new());
    }
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
    // SAFETY: as in `open_env`: one open of this path in this process, under
    // the state directory's lock, no unsafe flags.
    #[allow(unsafe_code)]
    let env = unsafe { options.open(&path) }
        .with_context(|| format!("opening the plaintext peer store {}", path.display()))?;
    let wtxn = env.write_txn()?;
    let db = match env.create_databases_and_commit(wtxn, |opener, wtxn| {
        opener
            .create_database::<Bytes, Bytes>(wtxn, Some(NODES_DB))
            .map(CommitOrAbort::<_, std::convert::Infallible>::Commit)
    })? {
        CommitOrAbort::Commit(db) => db,
        CommitOrAbort::Abort(never) => match never {},
    };
    let rtxn = env.read_txn()?;
    let mut out = Vec::new();
    for entry in db.iter(&rtxn)? {
        let (k, v) = entry?;
        out.push((k.to_vec(), v.to_vec()));
    }
    drop(rtxn);
    env.prepare_for_closing().wait();
    Ok(out)
}

/// Overwrites and removes the plaintext files of an earlier version.
/// (Overwriting is best effort: on flash storage and copy-on-write file
/// systems the old blocks may survive; the README says so.)
fn remove_legacy(state_dir: &Path) -> Result<()> {
    for name in [LEGACY_IDENTITY, LEGACY_LINK, LEGACY_SEQ] {
        shred(&state_dir.join(name))?;
    }
    let store = state_dir.join(LEGACY_STORE);
    if store.exists() {
        shred(&store.join("data.mdb"))?;
        remove_tree(&store)?;
    }
    sync_dir(state_dir)
}

fn shred(path: &Path) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.is_file() {
        if let Ok(mut f) = OpenOptions::new().write(true).open(path) {
            let zeros = vec![0u8; 64 * 1024];
            let mut left = meta.len();
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                if f.write_all(&zeros[..n]).is_err() {
                    break;
                }
                left -= n as u64;
            }
            let _ = f.sync_all();
        }
    }
    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

// ---------------------------------------------------------------------------
// Rotation

/// The steps of a rotation, for fault injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotateStep {
    /// The new vault is written (committed) in `vault.new`.
    Written,
    /// ... and synced: files and directory.
    Synced,
    /// ... and swapped with the old one (one atomic rename).
    Swapped,
    /// ... and the old copy is removed.
    Cleaned,
}

impl RotateStep {
    /// Name used by `QGATE_FAULT=rotate-after-<name>`.
    pub fn name(self) -> &'static str {
        match self {
            RotateStep::Written => "write",
            RotateStep::Synced => "sync",
            RotateStep::Swapped => "swap",
            RotateStep::Cleaned => "cleanup",
        }
    }
}

/// Re-seals the vault of `state_dir` under `new`: writes a complete new
/// vault, syncs it, swaps it in with one atomic exchange, removes the old.
/// A crash at any point leaves a vault that `old` or `new` opens, with
/// everything in it. `after` is called after each step (fault injection:
/// an error stops the rotation there, as a crash would).
pub fn rotate(
    state_dir: &Path,
    old: &KeySource,
    new: &KeySource,
    after: &dyn Fn(RotateStep) -> Result<()>,
) -> Result<[u8; 16]> {
    let vault = Vault::open(state_dir, old)?;
    let contents = vault.contents()?;
    vault.close();
    let (header, keys) = Keys::fresh(new)?;
    let old_header = Header::read(&state_dir.join(VAULT_DIR))?;
    if header.key_id == old_header.key_id {
        bail!("the new key is the key the vault is sealed with already");
    }
    let new_dir = state_dir.join(VAULT_NEW);
    remove_tree(&new_dir)?;
    // Written: the new vault committed and closed ...
    write_vault(&new_dir, &header, &keys, &contents)?;
    after(RotateStep::Written)?;
    // ... Synced: every file and the directory entries made durable.
    sync_vault(&new_dir)?;
    after(RotateStep::Synced)?;
    // Swapped: both names always exist, so every instant has a complete
    // vault under `vault`, sealed with the old key before and the new after.
    nix::fcntl::renameat2(
        None,
        &new_dir,
        None,
        &state_dir.join(VAULT_DIR),
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .with_context(|| format!("swapping {} into place", new_dir.display()))?;
    sync_dir(state_dir)?;
    after(RotateStep::Swapped)?;
    // Cleaned: the old vault, now under `vault.new`, goes.
    remove_tree(&new_dir)?;
    sync_dir(state_dir)?;
    after(RotateStep::Cleaned)?;
    Ok(header.key_id)
}

/// The short form of a key ID.
pub fn short_id(id: &[u8; 16]) -> String {
    short(id)
}

// ---------------------------------------------------------------------------
// The state directory's lock

/// An exclusive lock on a state directory, held by `run`, `key rotate` and
/// migrations for as long as they work on it.
pub struct StateLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl StateLock {
    /// Takes the lock or says who holds it.
    pub fn take(state_dir: &Path) -> Result<StateLock> {
        let dir = File::open(state_dir)
            .with_context(|| format!("opening state directory {}", state_dir.display()))?;
        nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map(StateLock)
            .map_err(|_| {
                anyhow!(
                    "{} is in use by another qgate (a running node or a key rotation); stop it first",
                    state_dir.display()
                )
            })
    }
}

// ---------------------------------------------------------------------------
// Small file helpers

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("removing {}: {e}", path.display())),
    }
}

/// Writes `peer`'s value encoding into `out` (cleared first).
fn encode_value(peer: &StoredPeer, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(VALUE_HEADER_LEN + peer.record.len());
    out.push(VALUE_VERSION);
    out.push(peer.source);
    out.extend_from_slice(&peer.last_seen_unix.to_be_bytes());
    out.extend_from_slice(&peer.record);
}

/// Decodes a value; `None` for an unknown version or a short value.
fn decode_value(value: &[u8]) -> Option<StoredPeer> {
    let (&version, rest) = value.split_first()?;
    if version != VALUE_VERSION {
        return None;
    }
    let (&source, rest) = rest.split_first()?;
    let (seen, record) = rest.split_first_chunk::<8>()?;
    Some(StoredPeer {
        record: record.to_vec(),
        source,
        last_seen_unix: u64::from_be_bytes(*seen),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A fresh directory under the system temp dir, removed on drop (also
    /// when the test panics).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            use std::sync::atomic::Ordering;
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "qgate-vault-test-{name}-{}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn state(&self) -> PathBuf {
            self.0.join("state")
        }
        fn key(&self, name: &str) -> KeySource {
            let p = self.0.join(name);
            if !p.exists() {
                generate_key_file(&p).unwrap();
            }
            KeySource::File(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn identity() -> Identity {
        use std::sync::OnceLock;
        // RSA key generation is slow; one identity serves every test.
        static ID: OnceLock<(String, [u8; 32])> = OnceLock::new();
        let (pem, link) = ID.get_or_init(|| {
            let id = Identity::generate(&mut OsRng).unwrap();
            (id.rsa_pem().unwrap(), id.link_secret_bytes())
        });
        Identity::from_pem(pem, *link).unwrap()
    }

    fn peer(i: u8) -> ([u8; 32], StoredPeer) {
        (
            [i; 32],
            StoredPeer {
                record: vec![i; 40 + usize::from(i)],
                source: i % 4,
                last_seen_unix: 1_700_000_000 + u64::from(i) * 0x0101_0101,
            },
        )
    }

    fn err(r: Result<Vault>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn create_open_round_trip() {
        let t = TempDir::new("round-trip");
        let key = t.key("k");
        let id = identity();
        let v = Vault::create(&t.state(), &key, &id).unwrap();
        assert!(v.is_empty().unwrap());
        let peers: Vec<_> = (1..=5).map(peer).collect();
        v.replace_all(&peers).unwrap();
        let s = v.next_record_seq().unwrap();
        assert!(v.next_record_seq().unwrap() > s);
        v.put_meta(b"dfs/x", b"extender value").unwrap();
        assert!(v.put_meta(META_IDENTITY, b"no").is_err());
        assert!(v.put_meta(b"dht/value/\0\0\0\0", b"no").is_err());
        // DHT values: replaced as a set, and apart from other meta entries.
        v.replace_values(&[b"one".to_vec(), b"two".to_vec(), b"three".to_vec()])
            .unwrap();
        v.replace_values(&[b"two".to_vec(), b"four".to_vec()])
            .unwrap();
        v.close();
        let v = Vault::open(&t.state(), &key).unwrap();
        assert_eq!(v.identity().unwrap().node_id(), id.node_id());
        assert_eq!(v.load().unwrap(), peers);
        assert_eq!(v.record_seq().unwrap(), s + 1);
        assert_eq!(v.meta_value(b"dfs/x").unwrap().unwrap(), b"extender value");
        assert_eq!(v.values().unwrap(), [b"two".to_vec(), b"four".to_vec()]);
        v.replace_values::<Vec<u8>>(&[]).unwrap();
        assert!(v.values().unwrap().is_empty());
        assert_eq!(v.meta_value(b"dfs/x").unwrap().unwrap(), b"extender value");
        assert_eq!(v.identity().unwrap().node_id(), id.node_id());
        let mode = fs::metadata(t.state().join(VAULT_DIR))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Create refuses to overwrite.
        v.close();
        assert!(err(Vault::create(&t.state(), &key, &id)).contains("refusing to overwrite"));
    }

    #[test]
    fn nothing_readable_in_the_files() {
        let t = TempDir::new("opaque");
        let key = t.key("k");
        let id = identity();
        let v = Vault::create(&t.state(), &key, &id).unwrap();
        let marker = b"PLAINTEXT-MARKER-0123456789";
        let mut p = peer(9);
        p.1.record = marker.repeat(20);
        v.replace_all(&[p]).unwrap();
        v.close();
        let pem = id.rsa_pem().unwrap();
        let pem_body: String = pem.lines().nth(3).unwrap().to_string();
        let needles: Vec<Vec<u8>> = vec![
            marker.to_vec(),
            NODES_DB.as_bytes().to_vec(),
            META_IDENTITY.to_vec(),
            pem_body.into_bytes(),
            id.node_id().0.to_vec(),
            id.link_secret_bytes().to_vec(),
        ];
        for f in ["data.mdb", "lock.mdb", "header"] {
            let bytes = fs::read(t.state().join(VAULT_DIR).join(f)).unwrap();
            for n in &needles {
                assert!(
                    !bytes.windows(n.len()).any(|w| w == &n[..]),
                    "{f} holds {:?}",
                    String::from_utf8_lossy(n)
                );
            }
        }
    }

    #[test]
    fn no_key_wrong_key_and_passphrase() {
        let t = TempDir::new("wrong");
        let key = t.key("k");
        let id = identity();
        Vault::create(&t.state(), &key, &id).unwrap().close();
        let before = fs::read(t.state().join(VAULT_DIR).join("data.mdb")).unwrap();
        let missing = KeySource::File(t.0.join("absent"));
        assert!(err(Vault::open(&t.state(), &missing)).contains("not found"));
        let other = t.key("other");
        let e = err(Vault::open(&t.state(), &other));
        assert!(e.starts_with("wrong key"), "{e}");
        let pass = KeySource::Passphrase(Zeroizing::new("hunter2".into()));
        assert!(err(Vault::open(&t.state(), &pass)).starts_with("wrong key"));
        fs::write(t.0.join("junk"), "not a key\n").unwrap();
        let junk = KeySource::File(t.0.join("junk"));
        assert!(err(Vault::open(&t.state(), &junk)).contains("not a qgate key file"));
        // Nothing was changed by the refusals.
        assert_eq!(
            before,
            fs::read(t.state().join(VAULT_DIR).join("data.mdb")).unwrap()
        );
        assert!(Vault::open(&t.state(), &key).is_ok());

        // A passphrase vault opens with the passphrase only.
        let t2 = TempDir::new("pass");
        Vault::create(&t2.state(), &pass, &id).unwrap().close();
        let v = Vault::open(&t2.state(), &pass).unwrap();
        assert_eq!(v.identity().unwrap().node_id(), id.node_id());
        v.close();
        let bad = KeySource::Passphrase(Zeroizing::new("hunter3".into()));
        assert!(err(Vault::open(&t2.state(), &bad)).starts_with("wrong key"));
        assert!(err(Vault::open(&t2.state(), &key)).starts_with("wrong key"));
    }

    #[test]
    #[cfg(feature = "test-hooks")]
    fn a_flipped_byte_in_a_value_is_refused() {
        let t = TempDir::new("tamper");
        let key = t.key("k");
        let v = Vault::create(&t.state(), &key, &identity()).unwrap();
        let marker = b"TAMPER-TARGET-MARKER";
        let mut p = peer(3);
        p.1.record = marker.to_vec();
        probe::start(marker);
        v.replace_all(&[peer(1), p, peer(5)]).unwrap();
        let at = probe::take().expect("the probe saw the marker sealed");
        v.close();
        let path = t.state().join(VAULT_DIR).join("data.mdb");
        let mut bytes = fs::read(&path).unwrap();
        bytes[at as usize + 3] ^= 0x20;
        fs::write(&path, &bytes).unwrap();
        let e = err(Vault::open(&t.state(), &key));
        assert!(e.contains("failed authentication"), "{e}");
        // The refusal wrote nothing.
        assert_eq!(bytes, fs::read(&path).unwrap());
        // Damaged header: a clear line too.
        let t2 = TempDir::new("header");
        Vault::create(&t2.state(), &key, &identity())
            .unwrap()
            .close();
        fs::write(t2.state().join(VAULT_DIR).join(HEADER_FILE), b"junk").unwrap();
        assert!(err(Vault::open(&t2.state(), &key)).contains("damaged"));
    }

    fn legacy_state(dir: &Path, id: &Identity, peers: &[([u8; 32], StoredPeer)]) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(LEGACY_IDENTITY), id.rsa_pem().unwrap()).unwrap();
        fs::write(
            dir.join(LEGACY_LINK),
            format!("{}\n", STANDARD.encode(id.link_secret_bytes())),
        )
        .unwrap();
        fs::write(dir.join(LEGACY_SEQ), "1234\n").unwrap();
        let path = dir.join(LEGACY_STORE);
        fs::create_dir_all(&path).unwrap();
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
        #[allow(unsafe_code)]
        let env = unsafe { options.open(&path) }.unwrap();
        let wtxn = env.write_txn().unwrap();
        let db = env
            .create_databases_and_commit(wtxn, |opener, wtxn| {
                opener
                    .create_database::<Bytes, Bytes>(wtxn, Some(NODES_DB))
                    .map(CommitOrAbort::<_, ()>::Commit)
            })
            .unwrap()
            .unwrap_commit();
        let mut wtxn = env.write_txn().unwrap();
        let mut v = Vec::new();
        for (k, p) in peers {
            encode_value(p, &mut v);
            db.put(&mut wtxn, k, &v).unwrap();
        }
        wtxn.commit().unwrap();
        env.prepare_for_closing().wait();
    }

    #[test]
    fn plaintext_state_is_migrated_once() {
        let t = TempDir::new("migrate");
        let id = identity();
        let peers: Vec<_> = (1..=4).map(peer).collect();
        legacy_state(&t.state(), &id, &peers);
        assert_eq!(layout(&t.state()), Layout::Legacy);
        let key = t.key("k");
        let v = Vault::open(&t.state(), &key).unwrap();
        assert_eq!(v.identity().unwrap().node_id(), id.node_id());
        assert_eq!(v.load().unwrap(), peers);
        assert_eq!(v.record_seq().unwrap(), 1234);
        v.close();
        assert_eq!(layout(&t.state()), Layout::Sealed);
        for f in [LEGACY_IDENTITY, LEGACY_LINK, LEGACY_SEQ, LEGACY_STORE] {
            assert!(!t.state().join(f).exists(), "{f} left behind");
        }
        // Once: the next open is a plain open.
        let v = Vault::open(&t.state(), &key).unwrap();
        assert_eq!(v.load().unwrap(), peers);
    }

    #[test]
    fn rotation_survives_a_crash_after_every_step() {
        for step in [
            RotateStep::Written,
            RotateStep::Synced,
            RotateStep::Swapped,
            RotateStep::Cleaned,
        ] {
            let t = TempDir::new(step.name());
            let old = t.key("old");
            let new = t.key("new");
            let id = identity();
            let v = Vault::create(&t.state(), &old, &id).unwrap();
            let peers: Vec<_> = (1..=6).map(peer).collect();
            v.replace_all(&peers).unwrap();
            let seq = v.next_record_seq().unwrap();
            v.put_meta(b"ext", b"kept").unwrap();
            v.replace_values(&[b"a value record".to_vec()]).unwrap();
            v.close();
            let crash = |s: RotateStep| {
                if s == step {
                    bail!("fault injected after {}", s.name())
                }
                Ok(())
            };
            let e = rotate(&t.state(), &old, &new, &crash).unwrap_err();
            assert!(format!("{e}").contains(step.name()));
            // Exactly one of the keys opens it, with everything in it.
            let (opens, refused) = match step {
                RotateStep::Written | RotateStep::Synced => (&old, &new),
                RotateStep::Swapped | RotateStep::Cleaned => (&new, &old),
            };
            let msg = err(Vault::open(&t.state(), refused));
            if step == RotateStep::Cleaned {
                assert!(msg.starts_with("wrong key"), "{msg}");
            } else {
                assert!(msg.contains("interrupted key rotation"), "{step:?}: {msg}");
            }
            let v = Vault::open(&t.state(), opens).unwrap();
            assert_eq!(v.identity().unwrap().node_id(), id.node_id());
            assert_eq!(v.load().unwrap(), peers);
            assert_eq!(v.record_seq().unwrap(), seq);
            assert_eq!(v.meta_value(b"ext").unwrap().unwrap(), b"kept");
            assert_eq!(v.values().unwrap(), [b"a value record".to_vec()]);
            v.close();
            // The leftover copy is gone after that open.
            assert!(!t.state().join(VAULT_NEW).exists());
            // And a rotation from there completes.
            rotate(&t.state(), opens, refused, &|_| Ok(())).unwrap();
            assert!(Vault::open(&t.state(), refused).is_ok());
        }
    }

    #[test]
    fn header_layout() {
        let h = Header {
            kdf: Kdf::Argon2id {
                m_kib: 65536,
                t: 3,
                p: 1,
            },
            salt: [7; 16],
            key_id: [9; 16],
        };
        assert_eq!(Header::decode(&h.encode()), Some(h.clone()));
        let mut b = h.encode();
        b[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Header::decode(&b), None, "absurd Argon2 cost refused");
        assert_eq!(Header::decode(&b[..40]), None);
        let d = TempDir::new("default-key");
        assert_eq!(
            default_key_file(&d.0.join("node-a")).unwrap(),
            d.0.join("node-a.key")
        );
        assert_eq!(
            default_key_file(&d.0.join("node-a/")).unwrap(),
            d.0.join("node-a.key")
        );
        assert!(default_key_file(Path::new("/")).is_err());
    }

    #[test]
    fn one_holder_of_the_state_lock() {
        let t = TempDir::new("lock");
        let first = StateLock::take(&t.0).unwrap();
        let e = StateLock::take(&t.0).err().expect("second lock refused");
        assert!(format!("{e:#}").contains("in use"), "{e:#}");
        drop(first);
        StateLock::take(&t.0).unwrap();
    }

    #[test]
    fn key_files() {
        let t = TempDir::new("keyfile");
        let p = t.0.join("a.key");
        generate_key_file(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(format!("{:#}", generate_key_file(&p).unwrap_err()).contains("refusing"));
        let k = read_key_file(&p).unwrap();
        let p2 = t.0.join("b.key");
        generate_key_file(&p2).unwrap();
        assert_ne!(*k, *read_key_file(&p2).unwrap());
    }
}
