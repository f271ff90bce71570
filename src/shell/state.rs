//! The state directory: the node's keys and its record sequence number.
//!
//! ```text
//! DIR/identity.pem   RSA-2048 identity key, PKCS#8 PEM, mode 0600
//! DIR/link.key       X25519 link secret, base64, mode 0600
//! DIR/record.seq     last record sequence number used
//! DIR/qgate.toml     default configuration (no secrets)
//! ```

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand_core::OsRng;

use crate::proto::Identity;

/// RSA identity key file name.
pub const IDENTITY_FILE: &str = "identity.pem";
/// Link key file name.
pub const LINK_KEY_FILE: &str = "link.key";
/// Record sequence file name.
pub const SEQ_FILE: &str = "record.seq";
/// Default config file name.
pub const CONFIG_FILE: &str = "qgate.toml";

/// Creates a new identity in `dir`. Refuses to touch existing keys.
pub fn init(dir: &Path) -> Result<Identity> {
    let id_path = dir.join(IDENTITY_FILE);
    let link_path = dir.join(LINK_KEY_FILE);
    if id_path.exists() || link_path.exists() {
        bail!(
            "{} already holds keys; refusing to overwrite them (`qgate id --state-dir {}` prints them)",
            dir.display(),
            dir.display()
        );
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))?;
    let identity = Identity::generate(&mut OsRng).context("generating keys")?;
    write_new(&id_path, identity.rsa_pem()?.as_bytes(), 0o600)?;
    let link = format!("{}\n", STANDARD.encode(identity.link_secret_bytes()));
    write_new(&link_path, link.as_bytes(), 0o600)?;
    Ok(identity)
}

/// Writes a file that must not exist yet, durably.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Loads the identity from `dir`.
pub fn load_identity(dir: &Path) -> Result<Identity> {
    let id_path = dir.join(IDENTITY_FILE);
    let pem = fs::read_to_string(&id_path).with_context(|| {
        format!(
            "reading {} (no keys? run `qgate init --state-dir {}`)",
            id_path.display(),
            dir.display()
        )
    })?;
    let link_path = dir.join(LINK_KEY_FILE);
    let link = fs::read_to_string(&link_path)
        .with_context(|| format!("reading {}", link_path.display()))?;
    let link: [u8; 32] = STANDARD
        .decode(link.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .with_context(|| format!("{}: not a base64 32-byte key", link_path.display()))?;
    Identity::from_pem(&pem, link).with_context(|| format!("loading {}", id_path.display()))
}

/// Picks the sequence number for this run's record: above every earlier one
/// (from `record.seq`) and normally the current Unix time, so a record from
/// a wiped state dir still beats older copies. Stored before it is used.
pub fn next_record_seq(dir: &Path) -> Result<u64> {
    let path = dir.join(SEQ_FILE);
    let prev: u64 = fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let seq = now.max(prev + 1);
    write_record_seq(dir, seq)?;
    Ok(seq)
}

/// Stores the record sequence number in use (written and synced before a
/// record with it is published, so no later run reuses it).
pub fn write_record_seq(dir: &Path, seq: u64) -> Result<()> {
    let path = dir.join(SEQ_FILE);
    let tmp: PathBuf = dir.join(format!("{SEQ_FILE}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        writeln!(f, "{seq}")?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_load_and_never_overwrite() {
        let dir = std::env::temp_dir().join(format!("qgate-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = init(&dir).unwrap();
        let b = load_identity(&dir).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        assert_eq!(a.link_public(), b.link_public());
        assert!(init(&dir).is_err());
        assert_eq!(load_identity(&dir).unwrap().node_id(), a.node_id());
        let s1 = next_record_seq(&dir).unwrap();
        let s2 = next_record_seq(&dir).unwrap();
        assert!(s2 > s1);
        let mode = fs::metadata(dir.join(IDENTITY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }
}
