//! Least privilege for `qgate run`.
//!
//! The node needs CAP_NET_ADMIN only to create and configure its TUN
//! interface and to install its inbound filter. Once those exist (and the
//! UDP socket, the control socket and the peer store are open), it switches
//! to the configured user (`user = "NAME"`: supplementary groups, gid, uid),
//! clears every capability set (effective, permitted, inheritable, ambient,
//! and the bounding set where it may), sets no-new-privileges, reads all of
//! it back and refuses to go on if anything is left. Without `user` it keeps
//! its uid but drops the same way. Under systemd with `User=qgate` and
//! `AmbientCapabilities=CAP_NET_ADMIN` the process already runs as the
//! configured user, so only the capabilities are cleared: one code path.
//!
//! Capabilities are per thread, and so are no-new-privileges and (at the
//! system-call level) uids: the drop happens on the main thread while it is
//! the only one (checked), so every thread started later inherits it.
//!
//! The raw calls (capset, prctl) are in `qgate_platform::privilege`,
//! hand-rolled rather than taken from the `caps` crate: one capset/capget
//! pair and a few prctls are as short as the calls into a crate would be;
//! nix covers the user and group calls.

use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Group, Uid, User};

use qgate_platform::privilege as sys;
pub use qgate_platform::privilege::CAP_NET_ADMIN;

/// The uid and primary gid of user `name`, or an error saying how to
/// create it.
pub fn lookup_user(name: &str) -> Result<(u32, u32)> {
    match User::from_name(name) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => bail!(
            "user {name:?} does not exist: create it with `useradd --system --home-dir /var/lib/qgate --shell /usr/sbin/nologin {name}`"
        ),
        Err(e) => bail!("looking up user {name:?}: {e}"),
    }
}

/// Gives the directory tree `dir` to `user` and their primary group
/// (recursively, symlinks changed themselves and never followed), for
/// `qgate init --user NAME`.
pub fn hand_over(dir: &Path, user: &str) -> Result<()> {
    let (uid, gid) = lookup_user(user)?;
    chown_tree(dir, uid, gid)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("changing the owner of {}", path.display()))?;
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", path.display()))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Whom `qgate run` becomes: resolved before anything is set up, so a
/// missing user stops the node before it creates anything.
#[derive(Debug, Clone)]
pub struct Target {
    /// The configured user's name; None keeps the current uid.
    pub name: Option<String>,
    /// The uid to run as.
    pub uid: u32,
    /// The gid to run as.
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database).
    groups: Vec<Gid>,
}

impl Target {
    /// Resolves `user` (None: the current uid and gid).
    pub fn resolve(user: Option<&str>) -> Result<Target> {
        let Some(name) = user else {
            return Ok(Target {
                name: None,
                uid: Uid::current().as_raw(),
                gid: Gid::current().as_raw(),
                groups: Vec::new(),
            });
        };
        let (uid, gid) = lookup_user(name)?;
        let cname = std::ffi::CString::new(name).context("user name")?;
        let groups = nix::unistd::getgrouplist(&cname, Gid::from_raw(gid))
            .with_context(|| format!("reading the groups of user {name:?}"))?;
        Ok(Target {
            name: Some(name.to_string()),
            uid,
            gid,
            groups,
        })
    }

    /// The primary group's name, for messages.
    fn group_name(&self) -> String {
        Group::from_gid(Gid::from_raw(self.gid))
            .ok()
            .flatten()
            .map(|g| g.name)
            .unwrap_or_else(|| self.gid.to_string())
    }
}

/// Switches to `target` and clears every capability, then verifies. Must
/// run while the calling thread is the process's only thread.
pub fn drop_to(target: &Target) -> Result<()> {
    let before = ProcStatus::read()?;
    if before.threads != 1 {
        bail!(
            "dropping privileges needs a single-threaded process, found {} threads",
            before.threads
        );
    }
    // Already the configured user (systemd's User=): only the
    // capabilities go. No user configured: the uid stays as it is.
    let switch = target.name.is_some()
        && (before.uids.iter().any(|u| *u != target.uid)
            || before.gids.iter().any(|g| *g != target.gid));
    // The bounding set first: dropping from it needs CAP_SETPCAP, which a
    // root process has now and loses with setuid. Without it (systemd gives
    // only CAP_NET_ADMIN) the bounding set stays; the unit's
    // CapabilityBoundingSet limits it, and with no-new-privileges and an
    // empty permitted set nothing can be regained from it anyway.
    let mut bounding_kept = 0u32;
    for cap in 0..=last_cap() {
        if sys::bounding_drop(cap).is_err() {
            bounding_kept += 1;
        }
    }
    if switch {
        let name = target.name.as_deref().unwrap_or("?");
        nix::unistd::setgroups(&target.groups)
            .with_context(|| format!("setting the groups of user {name:?} (needs root)"))?;
        nix::unistd::setresgid(
            Gid::from_raw(target.gid),
            Gid::from_raw(target.gid),
            Gid::from_raw(target.gid),
        )
        .with_context(|| format!("switching to group {}", target.group_name()))?;
        nix::unistd::setresuid(
            Uid::from_raw(target.uid),
            Uid::from_raw(target.uid),
            Uid::from_raw(target.uid),
        )
        .with_context(|| format!("switching to user {name:?}"))?;
    }
    sys::capset(0, 0, 0).context("clearing capabilities")?;
    sys::ambient_clear_all().context("clearing ambient capabilities")?;
    sys::set_no_new_privs().context("setting no-new-privileges")?;

    // Read it all back.
    let after = ProcStatus::read()?;
    let mut left = Vec::new();
    for (set, v) in [
        ("effective", after.cap_eff),
        ("permitted", after.cap_prm),
        ("inheritable", after.cap_inh),
        ("ambient", after.cap_amb),
    ] {
        if v != 0 {
            left.push(format!("{set} capabilities {v:#x}"));
        }
    }
    let (eff, prm, inh) = sys::capget().context("reading capabilities back")?;
    if eff | prm | inh != 0 {
        left.push(format!(
            "capget says effective {eff:#x} permitted {prm:#x} inheritable {inh:#x}"
        ));
    }
    if !after.no_new_privs {
        left.push("no-new-privileges is not set".into());
    }
    if target.name.is_some() && after.uids.iter().any(|u| *u != target.uid) {
        left.push(format!("uids {:?}, wanted {}", after.uids, target.uid));
    }
    if target.name.is_some() && after.gids.iter().any(|g| *g != target.gid) {
        left.push(format!("gids {:?}, wanted {}", after.gids, target.gid));
    }
    if target.uid != 0 && sys::can_become_root() {
        left.push("setuid(0) still succeeds".into());
    }
    if !left.is_empty() {
        bail!(
            "refusing to run with privileges left after the drop: {}",
            left.join(", ")
        );
    }
    match &target.name {
        Some(name) => tracing::info!(
            uid = target.uid,
            gid = target.gid,
            bounding = if bounding_kept == 0 { "empty" } else { "kept (no CAP_SETPCAP)" },
            "running as user {name:?} with no capabilities and no-new-privileges"
        ),
        None if target.uid == 0 => tracing::warn!(
            "running as uid 0 (root) with no capabilities and no-new-privileges; set `user` in the config to run as an unprivileged user"
        ),
        None => tracing::info!(
            "running as uid {} with no capabilities and no-new-privileges",
            target.uid
        ),
    }
    Ok(())
}

/// For the filter guard: keeps CAP_NET_ADMIN and nothing else, in every
/// set including ambient (so the `nft` it runs, as root or not, holds it
/// too), drops the rest of the bounding set where it may, and sets
/// no-new-privileges.
pub fn keep_only_net_admin() -> Result<()> {
    for cap in 0..=last_cap() {
        if cap != CAP_NET_ADMIN {
            // EPERM without CAP_SETPCAP: then the bounding set stays.
            let _ = sys::bounding_drop(cap);
        }
    }
    let one = 1u64 << CAP_NET_ADMIN;
    sys::capset(one, one, one).context("keeping only CAP_NET_ADMIN")?;
    sys::ambient_clear_all().context("clearing ambient capabilities")?;
    sys::ambient_raise(CAP_NET_ADMIN).context("keeping CAP_NET_ADMIN for nft")?;
    sys::set_no_new_privs().context("setting no-new-privileges")?;
    let st = ProcStatus::read()?;
    if st.cap_eff != one || st.cap_prm != one || st.cap_inh & !one != 0 || st.cap_amb & !one != 0 {
        bail!(
            "keeping only CAP_NET_ADMIN: effective {:#x} permitted {:#x} inheritable {:#x} ambient {:#x}",
            st.cap_eff,
            st.cap_prm,
            st.cap_inh,
            st.cap_amb
        );
    }
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// What /proc/self/status says about this process's privileges.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// Real, effective, saved and filesystem uid.
    pub uids: Vec<u32>,
    /// Real, effective, saved and filesystem gid.
    pub gids: Vec<u32>,
    /// Capability sets.
    pub cap_eff: u64,
    /// Permitted.
    pub cap_prm: u64,
    /// Inheritable.
    pub cap_inh: u64,
    /// Ambient.
    pub cap_amb: u64,
    /// Bounding.
    pub cap_bnd: u64,
    /// NoNewPrivs.
    pub no_new_privs: bool,
    /// Number of threads.
    pub threads: u32,
}

impl ProcStatus {
    /// Reads /proc/self/status.
    pub fn read() -> Result<ProcStatus> {
        let text =
            std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        Ok(ProcStatus::parse(&text))
    }

    /// Parses the text of a /proc/PID/status file.
    pub fn parse(text: &str) -> ProcStatus {
        let mut st = ProcStatus::default();
        let hex = |v: &str| u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX);
        let ids = |v: &str| -> Vec<u32> {
            v.split_whitespace()
                .map(|x| x.parse().unwrap_or(u32::MAX))
                .collect()
        };
        // Unknown until seen: a missing line must not read as "no privilege".
        (st.cap_eff, st.cap_prm, st.cap_inh, st.cap_amb, st.cap_bnd) =
            (u64::MAX, u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k {
                "Uid" => st.uids = ids(v),
                "Gid" => st.gids = ids(v),
                "CapEff" => st.cap_eff = hex(v),
                "CapPrm" => st.cap_prm = hex(v),
                "CapInh" => st.cap_inh = hex(v),
                "CapAmb" => st.cap_amb = hex(v),
                "CapBnd" => st.cap_bnd = hex(v),
                "NoNewPrivs" => st.no_new_privs = v.trim() == "1",
                "Threads" => st.threads = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        if st.uids.len() != 4 {
            st.uids = vec![u32::MAX];
        }
        if st.gids.len() != 4 {
            st.gids = vec![u32::MAX];
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parses_and_missing_lines_read_as_privileged() {
        let st = ProcStatus::parse(
            "Name:\tqgate\nThreads:\t1\nUid:\t998\t998\t998\t998\nGid:\t997\t997\t997\t997\n\
             CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
             CapBnd:\t0000000000001000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n",
        );
        assert_eq!(st.uids, [998; 4]);
        assert_eq!(st.gids, [997; 4]);
        assert_eq!(
            (st.cap_eff, st.cap_prm, st.cap_inh, st.cap_amb),
            (0, 0, 0, 0)
        );
        assert_eq!(st.cap_bnd, 1 << CAP_NET_ADMIN);
        assert!(st.no_new_privs);
        assert_eq!(st.threads, 1);
        let st = ProcStatus::parse("Uid:\t0\t0\n");
        assert_eq!(st.cap_eff, u64::MAX);
        assert_eq!(st.uids, [u32::MAX]);
        assert!(!st.no_new_privs);
    }

    #[test]
    fn unknown_user_is_one_clear_line() {
        let e = lookup_user("qgate-no-such-user").unwrap_err().to_string();
        assert!(
            e.starts_with(
                "user \"qgate-no-such-user\" does not exist: create it with `useradd --system"
            ),
            "{e}"
        );
        assert!(!e.contains('\n'));
        assert_eq!(lookup_user("root").unwrap(), (0, 0));
    }

    #[test]
    fn hand_over_changes_the_tree_and_not_symlink_targets() {
        if !Uid::effective().is_root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("qgate-handover-{}", std::process::id()));
        let outside = dir.with_extension("outside");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/f"), "x").unwrap();
        std::fs::write(&outside, "y").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        hand_over(&dir, "nobody").unwrap();
        let (uid, gid) = lookup_user("nobody").unwrap();
        use std::os::unix::fs::MetadataExt;
        for p in [
            dir.clone(),
            dir.join("sub"),
            dir.join("sub/f"),
            dir.join("link"),
        ] {
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{}", p.display());
        }
        let m = std::fs::metadata(&outside).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (0, 0),
            "the symlink's target was changed"
        );
        assert!(hand_over(&dir, "qgate-no-such-user").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&outside).unwrap();
    }
}
