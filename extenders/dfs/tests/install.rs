//! `scripts/install --with-dfs`, staged under DESTDIR (no root needed, no
//! users created, nothing started), with the binaries cargo built: the
//! files it writes, their modes, the inbound drop-in's port following
//! /etc/qdfs/qdfs.toml, a second run changing nothing, and a run without
//! the flag installing no DFS files. Needs bash and the `qgate` binary
//! next to `qdfs` (`cargo build -p qgate`); without it the test says so and
//! passes without running.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const QDFS: &str = env!("CARGO_BIN_EXE_qdfs");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn install(destdir: &Path, args: &[&str]) -> String {
    let qgate = Path::new(QDFS).with_file_name("qgate");
    let out = Command::new("bash")
        .arg(repo().join("scripts/install"))
        .args(args)
        .env("DESTDIR", destdir)
        .env("QGATE_BIN", &qgate)
        .env("QDFS_BIN", QDFS)
        .env_remove("QGATE_WITH_DFS")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/install {args:?} failed:\n{text}"
    );
    text
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn staged_install_with_dfs() {
    if !Path::new(QDFS).with_file_name("qgate").exists() {
        eprintln!("SKIPPED: qgate not built (cargo build -p qgate)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Without the flag: the node only.
    install(d, &[]);
    assert!(d.join("usr/local/bin/qgate").exists());
    assert!(!d.join("usr/local/bin/qdfs").exists());
    assert!(!d.join("etc/systemd/system/qdfs.service").exists());
    assert!(!d.join("var/lib/qgate/inbound.d").exists());

    let out = install(d, &["--with-dfs"]);
    assert!(out.contains("opens tcp/7400"), "{out}");
    let bin = d.join("usr/local/bin/qdfs");
    assert_eq!(fs::read(&bin).unwrap(), fs::read(QDFS).unwrap());
    assert_eq!(mode(&bin), 0o755);
    let unit = d.join("etc/systemd/system/qdfs.service");
    let text = fs::read_to_string(&unit).unwrap();
    assert_eq!(mode(&unit), 0o644);
    for line in [
        "After=qgate.service",
        "Requires=qgate.service",
        "User=qdfs",
        "SupplementaryGroups=qgate",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "ExecStart=/usr/local/bin/qdfs serve --config /etc/qdfs/qdfs.toml",
    ] {
        assert!(text.contains(line), "qdfs.service lacks {line:?}");
    }
    let conf = d.join("etc/qdfs/qdfs.toml");
    let c = qdfs::config::Config::load(&conf).unwrap();
    assert_eq!(c.data_dir, Path::new("/var/lib/qdfs"));
    assert_eq!(c.control_socket, Path::new("/var/lib/qgate/control.sock"));
    let dropin = d.join("var/lib/qgate/inbound.d/qdfs.toml");
    assert!(fs::read_to_string(&dropin)
        .unwrap()
        .contains("allow = [\"tcp/7400\"]"));
    assert_eq!(mode(&dropin), 0o644);
    assert_eq!(mode(dropin.parent().unwrap()), 0o755);
    let qgate_unit = fs::read_to_string(d.join("etc/systemd/system/qgate.service")).unwrap();
    assert!(qgate_unit.contains("StateDirectoryMode=0710"));

    // Again: nothing changes.
    let out = install(d, &["--with-dfs"]);
    assert_eq!(out.matches("(unchanged)").count(), 5, "{out}");
    assert!(out.contains("exists (kept)"), "{out}");

    // The operator's port wins: the config is kept, the drop-in follows it.
    let edited = fs::read_to_string(&conf)
        .unwrap()
        .replace("port = 7400", "port = 7500");
    fs::write(&conf, edited).unwrap();
    let out = install(d, &["--with-dfs"]);
    assert!(out.contains("opens tcp/7500"), "{out}");
    assert!(fs::read_to_string(&conf).unwrap().contains("port = 7500"));
    assert!(fs::read_to_string(&dropin)
        .unwrap()
        .contains("allow = [\"tcp/7500\"]"));

    let out = Command::new("bash")
        .arg(repo().join("scripts/install"))
        .arg("--nope")
        .env("DESTDIR", d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
