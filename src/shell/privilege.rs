//! Users and ownership (placeholder until the privilege-drop module lands).

use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// The uid and primary gid of a user.
pub fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let user = nix::unistd::User::from_name(name)
        .with_context(|| format!("looking up user {name:?}"))?
        .ok_or_else(|| anyhow!("user {name:?} does not exist: create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {name}`"))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

/// Hands `path` (a file or a directory tree, symlinks not followed) to `user`.
pub fn hand_over(path: &Path, user: &str) -> Result<()> {
    let (uid, gid) = lookup_user(user)?;
    chown_tree(path, uid, gid)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("handing {} over", path.display()))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
