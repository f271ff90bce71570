//! The inbound filter: nftables on the TUN interface.
//!
//! Every node of the overlay can send to this node's overlay address, so by
//! default new connections arriving on the TUN are dropped, except ICMPv6
//! echo requests and what `[inbound] allow` lists. Connection tracking lets
//! replies to connections this node opened through (`established`), and
//! ICMPv6 errors about its flows (packet too big, unreachable, time
//! exceeded: `related`). The table has one chain on the input hook that
//! looks only at packets from the TUN (`iifname`); its policy is accept, so
//! traffic on every other interface is never touched. A dedicated relay has
//! no TUN and installs nothing; neither does `allow = ["all"]`.
//!
//! Removal. The table is installed while the node still holds
//! CAP_NET_ADMIN, and the node drops that right after, so it cannot delete
//! the table itself when it stops. Before the drop it starts a watcher, the
//! same binary as `qgate __filter-guard --table NAME --nft PATH`: its stdin
//! is the read end of a pipe whose write end only the node holds (close on
//! exec; every other descriptor is closed on exec too, and the watcher runs
//! in its own process group with a minimal environment). The watcher keeps
//! CAP_NET_ADMIN and nothing else, sets no-new-privileges, and blocks
//! reading stdin. When the node exits in any way — a clean stop, a crash,
//! SIGKILL — the kernel closes the write end, the read returns end of file,
//! and the watcher runs `nft delete table` and exits. PR_SET_PDEATHSIG
//! (SIGTERM, which the watcher handles the same way) backs this up. A clean
//! stop closes the pipe and waits for the watcher, so the table is gone when
//! the node has exited. A table of the same name left behind by a node that
//! died with its watcher is replaced atomically at the next start.

use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::config::Inbound;
use qgate_platform::privilege as sys;

/// The hidden subcommand that runs the watcher.
pub const GUARD_COMMAND: &str = "__filter-guard";

/// The nftables table of the node whose TUN is `tun` (family inet).
pub fn table_name(tun: &str) -> String {
    format!("qgate_{tun}")
}

/// The ruleset `nft -f -` loads: creates the table if missing, deletes it
/// (dropping a stale one) and creates it again, in one transaction.
pub fn ruleset(tun: &str, inbound: &Inbound) -> String {
    let table = table_name(tun);
    let mut s = String::new();
    let _ = writeln!(s, "table inet {table}");
    let _ = writeln!(s, "delete table inet {table}");
    let _ = writeln!(s, "table inet {table} {{");
    let _ = writeln!(s, "\tchain input {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook input priority filter; policy accept;"
    );
    let _ = writeln!(s, "\t\tiifname != \"{tun}\" accept");
    let _ = writeln!(s, "\t\tct state established,related accept");
    let _ = writeln!(s, "\t\ticmpv6 type echo-request accept");
    for r in &inbound.rules {
        let proto = r.proto.name();
        if r.first == r.last {
            let _ = writeln!(s, "\t\t{proto} dport {} accept", r.first);
        } else {
            let _ = writeln!(s, "\t\t{proto} dport {}-{} accept", r.first, r.last);
        }
    }
    let _ = writeln!(s, "\t\tdrop");
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}

/// Finds the `nft` program on PATH (and in the sbin directories, which a
/// non-root PATH may lack).
pub fn find_nft() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join("nft"))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The installed filter: dropping it (or [`Guard::stop`]) has the watcher
/// remove the table.
pub struct Guard {
    child: Option<Child>,
    pipe: Option<OwnedFd>,
    table: String,
}

/// Installs the filter for TUN `tun` and starts its watcher. `nft` is the
/// program to use (see [`find_nft`]). Needs CAP_NET_ADMIN.
pub fn install(tun: &str, inbound: &Inbound, nft: &Path) -> Result<Guard> {
    let table = table_name(tun);
    let rules = ruleset(tun, inbound);
    nft_run(nft, &["-f", "-"], Some(&rules))
        .with_context(|| format!("installing the inbound filter (nftables table inet {table})"))?;
    let guard = match spawn_guard(&table, nft) {
        Ok(g) => g,
        Err(e) => {
            let _ = nft_run(nft, &["delete", "table", "inet", &table], None);
            return Err(e.context("starting the inbound filter's watcher"));
        }
    };
    tracing::info!(
        table = %format!("inet {table}"),
        allow = %inbound.rules.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" "),
        "inbound filter on {tun}: new connections from the overlay refused except ICMPv6 echo and the allowed ports"
    );
    Ok(guard)
}

fn nft_run(nft: &Path, args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new(nft)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", nft.display()))?;
    // An nft that fails early may exit before reading its input; the write
    // then fails with EPIPE, and the useful error is nft's own, on stderr.
    // So a write error is only reported when nft itself claims success.
    let mut write_err = None;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        write_err = w.write_all(text.as_bytes()).err();
    }
    let out = child.wait_with_output()?;
    if let (Some(e), true) = (write_err, out.status.success()) {
        return Err(e).with_context(|| format!("writing to {}", nft.display()));
    }
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        bail!(
            "{} {} failed ({}): {first}",
            nft.display(),
            args.join(" "),
            out.status
        );
    }
    Ok(())
}

fn spawn_guard(table: &str, nft: &Path) -> Result<Guard> {
    let (read, write) = sys::pipe_cloexec().context("creating a pipe")?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(GUARD_COMMAND)
        .arg("--table")
        .arg(table)
        .arg("--nft")
        .arg(nft)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Not in the terminal's process group: a Ctrl-C is for the node,
        // which then closes the pipe.
        .process_group(0);
    // Everything but stdin/out/err closes at exec: the watcher holds no
    // socket, no TUN, no store, no other pipe end.
    sys::watcher_child(&mut cmd, libc::SIGTERM);
    let child = cmd.spawn().context("running /proc/self/exe")?;
    Ok(Guard {
        child: Some(child),
        pipe: Some(write),
        table: table.to_string(),
    })
}

impl Guard {
    /// Closes the pipe and waits (up to 3 s) for the watcher to remove the
    /// table.
    pub fn stop(&mut self) {
        self.pipe = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        tracing::warn!(table = %self.table, "the inbound filter's watcher ended with {status}");
                    }
                    return;
                }
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    tracing::warn!(table = %self.table, "the inbound filter's watcher did not finish in 3 s");
                    return;
                }
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The watcher (`qgate __filter-guard`): keeps only CAP_NET_ADMIN, waits for
/// end of file on stdin (or SIGTERM/SIGHUP), then deletes `table`.
pub fn guard_main(table: &str, nft: &Path) -> Result<()> {
    if !table.starts_with("qgate_") {
        bail!("{table:?} is not a qgate table");
    }
    // A signal ends the wait below instead of the process (the filter must
    // go in every case); the parent's death sends one.
    sys::interrupt_on(&[libc::SIGTERM, libc::SIGHUP, libc::SIGINT])
        .context("installing signal handlers")?;
    sys::set_parent_death_signal(libc::SIGTERM).context("asking for the parent's death signal")?;
    super::privilege::keep_only_net_admin()?;
    // End of file (the node is gone), a signal, or an error: in every case
    // the filter must go.
    sys::wait_for_eof(0);
    nft_run(nft, &["delete", "table", "inet", table], None)
        .with_context(|| format!("removing the inbound filter (table inet {table})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shell::config::{PortRule, Transport};

    #[test]
    fn ruleset_text() {
        let inbound = Inbound {
            all: false,
            rules: vec![
                PortRule {
                    proto: Transport::Tcp,
                    first: 22,
                    last: 22,
                },
                PortRule {
                    proto: Transport::Udp,
                    first: 9999,
                    last: 9999,
                },
                PortRule {
                    proto: Transport::Tcp,
                    first: 8000,
                    last: 8100,
                },
            ],
        };
        assert_eq!(
            ruleset("qg0", &inbound),
            "table inet qgate_qg0\n\
             delete table inet qgate_qg0\n\
             table inet qgate_qg0 {\n\
             \tchain input {\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname != \"qg0\" accept\n\
             \t\tct state established,related accept\n\
             \t\ticmpv6 type echo-request accept\n\
             \t\ttcp dport 22 accept\n\
             \t\tudp dport 9999 accept\n\
             \t\ttcp dport 8000-8100 accept\n\
             \t\tdrop\n\
             \t}\n\
             }\n"
        );
        // Nothing allowed: echo and replies only.
        let r = ruleset("qt-b.1", &Inbound::default());
        assert!(r.contains("iifname != \"qt-b.1\" accept\n"));
        assert!(r.contains("icmpv6 type echo-request accept\n\t\tdrop\n"));
        assert!(!r.contains("dport"));
    }

    #[test]
    fn ruleset_loads_into_nft() {
        // Checked by nft itself (`-c`: parse and validate, change nothing)
        // when it is installed and we may talk to netfilter.
        let Some(nft) = find_nft() else {
            return;
        };
        if !crate::shell::privilege::ProcStatus::read()
            .is_ok_and(|s| s.cap_eff & (1 << super::super::privilege::CAP_NET_ADMIN) != 0)
        {
            return;
        }
        let inbound = crate::shell::config::parse(
            "state_dir='/x'\n[inbound]\nallow = ['tcp/22', 'udp/9999', 'tcp/8000-8100']\n",
            Path::new("/x/qgate.toml"),
        )
        .unwrap()
        .inbound;
        nft_run(
            &nft,
            &["-c", "-f", "-"],
            Some(&ruleset("qg-test.0", &inbound)),
        )
        .unwrap();
    }

    #[test]
    fn nft_that_fails_before_reading_reports_its_own_error() {
        // An nft that exits without reading its input: the write fails with
        // EPIPE (the input is larger than a pipe buffer, so the write is
        // still under way when nft exits), yet the error is nft's stderr.
        let dir = std::env::temp_dir().join(format!("qgate-nft-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("nft");
        std::fs::write(&fake, "#!/bin/sh\necho 'Error: not today' >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let big = "#\n".repeat(1 << 20);
        let err = nft_run(&fake, &["-f", "-"], Some(&big)).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("Error: not today"), "{msg}");
        assert!(msg.contains("exit status: 1"), "{msg}");
    }
}
