//! Key rotation: re-sealing a vault under a new master key so that a crash
//! at any step leaves a vault one of the two keys opens.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::files::{remove_tree, sync_dir, StateLock};
use super::keys::{short, Header, KeySource, Keys};
use super::open::{sync_vault, write_vault};
use super::{Contents, Vault, VAULT_DIR, VAULT_NEW};

/// The steps of a rotation (and of a format upgrade, which swaps the same
/// way), for fault injection.
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
    lock: &StateLock,
    old: &KeySource,
    new: &KeySource,
    after: &dyn Fn(RotateStep) -> Result<()>,
) -> Result<[u8; 16]> {
    let vault = Vault::open_locked(state_dir, old, lock)?;
    let contents = vault.contents()?;
    vault.close();
    let (header, keys) = Keys::fresh(new)?;
    let old_header = Header::read(&state_dir.join(VAULT_DIR))?;
    if header.key_id == old_header.key_id {
        bail!("the new key is the key the vault is sealed with already");
    }
    swap_in(state_dir, &header, &keys, &contents, after)?;
    Ok(header.key_id)
}

/// Writes `contents` as a complete vault in `vault.new`, syncs it, swaps it
/// with `vault` in one atomic exchange, and removes the old one. A crash at
/// any point leaves a complete vault under `vault`: the old one before the
/// exchange, the new one after. `after` is called after each step.
pub(super) fn swap_in(
    state_dir: &Path,
    header: &Header,
    keys: &Keys,
    contents: &Contents,
    after: &dyn Fn(RotateStep) -> Result<()>,
) -> Result<()> {
    let new_dir = state_dir.join(VAULT_NEW);
    remove_tree(&new_dir)?;
    // Written: the new vault committed and closed ...
    write_vault(&new_dir, header, keys, contents)?;
    after(RotateStep::Written)?;
    // ... Synced: every file and the directory entries made durable.
    sync_vault(&new_dir)?;
    after(RotateStep::Synced)?;
    // Swapped: both names always exist, so every instant has a complete
    // vault under `vault`, the old one before and the new one after.
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
    Ok(())
}

/// The short form of a key ID.
pub fn short_id(id: &[u8; 16]) -> String {
    short(id)
}
