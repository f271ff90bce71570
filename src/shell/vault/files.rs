//! The state directory's lock, and small file helpers.

use std::fs::{self, File};
use std::path::Path;

use anyhow::{anyhow, Context, Result};

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

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

pub(super) fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

pub(super) fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("removing {}: {e}", path.display())),
    }
}
