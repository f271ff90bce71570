//! Master keys: where the master key comes from (a key file or a
//! passphrase), the vault's plaintext header that says how to turn it into
//! the vault key, and the keys derived from it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hkdf::Hkdf;
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::files::sync_parent;
use super::{layout, Layout, HEADER_FILE, VAULT_DIR};

/// First bytes of the header of a vault whose LMDB pages are sealed
/// (`Format::Pages`, before per-value sealing; read only to upgrade it).
const MAGIC_PAGES: &[u8; 8] = b"QGVAULT1";
/// First bytes of the header of a vault whose values are sealed one by one
/// (`Format::Values`).
const MAGIC_VALUES: &[u8; 8] = b"QGVAULT2";
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
pub(super) fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
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
pub(super) enum Kdf {
    /// The key file's 32 bytes are the master key.
    KeyFile,
    /// Argon2id over the passphrase with the header's salt.
    Argon2id { m_kib: u32, t: u32, p: u32 },
}

/// How a vault's contents are sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    /// Every LMDB page sealed by LMDB itself (heed3's page encryption).
    /// Written by versions before per-value sealing; a vault found so is
    /// upgraded on open (`open::upgrade`).
    Pages,
    /// A plain LMDB environment whose keys are keyed hashes and whose
    /// values are sealed one by one (`seal`).
    Values,
}

/// The vault's plaintext header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) format: Format,
    pub(super) kdf: Kdf,
    pub(super) salt: [u8; 16],
    pub(super) key_id: [u8; 16],
}

impl Header {
    pub(super) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(match self.format {
            Format::Pages => MAGIC_PAGES,
            Format::Values => MAGIC_VALUES,
        });
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

    pub(super) fn decode(b: &[u8]) -> Option<Header> {
        if b.len() != HEADER_LEN {
            return None;
        }
        let format = match &b[..8] {
            m if m == MAGIC_PAGES => Format::Pages,
            m if m == MAGIC_VALUES => Format::Values,
            _ => return None,
        };
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
            format,
            kdf,
            salt: b[21..37].try_into().ok()?,
            key_id: b[37..53].try_into().ok()?,
        })
    }

    pub(super) fn read(vault: &Path) -> Result<Header> {
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
pub(super) struct Keys {
    /// Sealed the LMDB pages (`Format::Pages`): used only to read such a
    /// vault for its upgrade.
    pub(super) store: Zeroizing<[u8; 32]>,
    /// Seals each value (`Format::Values`).
    pub(super) value: Zeroizing<[u8; 32]>,
    /// Turns each key into the name it is stored under (`Format::Values`).
    pub(super) index: Zeroizing<[u8; 32]>,
    /// Names the master key in the header (not secret).
    pub(super) key_id: [u8; 16],
}

impl Keys {
    fn from_master(master: &[u8; 32]) -> Keys {
        let hk = Hkdf::<Sha256>::new(Some(b"qgate vault v1"), master);
        let mut store = Zeroizing::new([0u8; 32]);
        let mut value = Zeroizing::new([0u8; 32]);
        let mut index = Zeroizing::new([0u8; 32]);
        let mut key_id = [0u8; 16];
        // All lengths are far below HKDF-SHA256's limit.
        for (info, out) in [
            (&b"page key"[..], &mut store[..]),
            (b"value key", &mut value[..]),
            (b"index key", &mut index[..]),
            (b"key id", &mut key_id[..]),
        ] {
            hk.expand(info, out)
                .expect("16 and 32 bytes are valid HKDF lengths");
        }
        Keys {
            store,
            value,
            index,
            key_id,
        }
    }

    /// The master key per the header's recipe.
    pub(super) fn derive(source: &KeySource, kdf: Kdf, salt: &[u8; 16]) -> Result<Keys> {
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
    pub(super) fn fresh(source: &KeySource) -> Result<(Header, Keys)> {
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
            format: Format::Values,
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

pub(super) fn short(id: &[u8; 16]) -> String {
    hex::encode(&id[..4])
}
