//! The state directory. Everything secret lives sealed in its vault
//! (`vault.rs`); this module keeps the plaintext rest.
//!
//! ```text
//! DIR/vault/         the sealed state (keys, record sequence, peer store)
//! DIR/qgate.toml     default configuration (no secrets)
//! DIR/control.sock   the control socket while the node runs
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Default config file name.
pub const CONFIG_FILE: &str = "qgate.toml";

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
