//! Tests of the vault: round trips, sealing, wrong keys, tampering,
//! migration, rotation after a crash at every step, the header and key files.

use super::keys::{read_key_file, Format, Header, Kdf, Keys};
use super::peers::encode_value;
use super::*;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Result};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use heed3::{CommitOrAbort, EnvOpenOptions};
use rand_core::OsRng;

use crate::proto::Identity;

/// A fresh directory under the system temp dir, removed on drop (also
/// when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
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
    // A put's record is added alone (twice: one copy), read back with the
    // set, and folded away by the next full write.
    v.add_value(b"five").unwrap();
    v.add_value(b"five").unwrap();
    let mut kept = v.values().unwrap();
    kept.sort();
    assert_eq!(kept, [b"five".to_vec(), b"four".to_vec(), b"two".to_vec()]);
    v.replace_values(&[b"four".to_vec(), b"five".to_vec()])
        .unwrap();
    assert_eq!(v.values().unwrap(), [b"four".to_vec(), b"five".to_vec()]);
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
    // The table names ("meta", "nodes", "values") are in the clear: they
    // say nothing about this node.
    let needles: Vec<Vec<u8>> = vec![
        marker.to_vec(),
        peer(9).0.to_vec(),
        META_IDENTITY.to_vec(),
        META_SEQ.to_vec(),
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
    let path = t.state().join(VAULT_DIR).join("data.mdb");
    let at = probe::take(&path).expect("the probe saw the marker sealed");
    v.close();
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
        let lock = StateLock::take(&t.state()).unwrap();
        let e = rotate(&t.state(), &lock, &old, &new, &crash).unwrap_err();
        drop(lock);
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
        let lock = StateLock::take(&t.state()).unwrap();
        rotate(&t.state(), &lock, opens, refused, &|_| Ok(())).unwrap();
        drop(lock);
        assert!(Vault::open(&t.state(), refused).is_ok());
    }
}

#[test]
fn header_layout() {
    let h = Header {
        format: Format::Values,
        kdf: Kdf::Argon2id {
            m_kib: 65536,
            t: 3,
            p: 1,
        },
        salt: [7; 16],
        key_id: [9; 16],
    };
    assert_eq!(Header::decode(&h.encode()), Some(h.clone()));
    let old = Header {
        format: Format::Pages,
        ..h.clone()
    };
    assert_eq!(&old.encode()[..8], b"QGVAULT1");
    assert_eq!(&h.encode()[..8], b"QGVAULT2");
    assert_eq!(Header::decode(&old.encode()), Some(old));
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

/// A put storm's writes (one record added per put, the full set every 64)
/// beside the identity: page-sealed LMDB failed here at record 1,236
/// (`MDB_PROBLEM`) unless values were padded (see `pages`). Records of 820
/// bytes (a typical put) and of 1,650 (the largest a DHT takes).
#[test]
fn a_put_storm_beside_the_identity_is_kept_whole() {
    let t = TempDir::new("storm");
    let key = t.key("k");
    let v = Vault::create(&t.state(), &key, &identity()).unwrap();
    let mut all: Vec<Vec<u8>> = Vec::new();
    for i in 0..3200u32 {
        let size = if i % 10 == 0 { 1650 } else { 820 };
        let mut rec = vec![(i % 251) as u8; size];
        rec[..4].copy_from_slice(&i.to_be_bytes());
        all.push(rec.clone());
        if i % 65 == 64 {
            v.replace_values(&all)
                .unwrap_or_else(|e| panic!("set at {i}: {e:#}"));
        } else {
            v.add_value(&rec)
                .unwrap_or_else(|e| panic!("add at {i}: {e:#}"));
        }
    }
    let mut kept = v.values().unwrap();
    kept.sort();
    all.sort();
    assert_eq!(kept, all);
    v.close();
    let v = Vault::open(&t.state(), &key).unwrap();
    assert_eq!(v.identity().unwrap().node_id(), identity().node_id());
    assert_eq!(v.values().unwrap().len(), all.len());
}

/// The values of the last full set come back in its order, those added
/// since after them.
#[test]
fn values_keep_their_order() {
    let t = TempDir::new("order");
    let key = t.key("k");
    let v = Vault::create(&t.state(), &key, &identity()).unwrap();
    let set: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(30)).collect();
    v.replace_values(&set).unwrap();
    v.add_value(b"added").unwrap();
    v.add_value(b"added").unwrap();
    let mut want = set.clone();
    want.push(b"added".to_vec());
    assert_eq!(v.values().unwrap(), want);
}

/// Entries removed from the file behind the vault's back (LMDB's structure
/// is not sealed) are found at open by the census; so is a census removed.
#[test]
fn removed_entries_are_found_at_open() {
    use super::seal::Table;
    type Tamper = fn(&Vault, &mut heed3::RwTxn<'_>);
    let cases: [(&str, Tamper); 4] = [
        ("a peer", |v, txn| {
            let slot = v.sealer.slot(Table::Nodes, &peer(2).0);
            assert!(v.nodes.delete(txn, &slot).unwrap());
        }),
        ("a kept value", |v, txn| {
            let first = v.values.first(txn).unwrap().unwrap().0.to_vec();
            assert!(v.values.delete(txn, &first).unwrap());
        }),
        ("the values table", |v, txn| v.values.clear(txn).unwrap()),
        ("a census", |v, txn| {
            let slot = v.sealer.slot(Table::Census, b"all");
            assert!(v.census.delete(txn, &slot).unwrap());
        }),
    ];
    for (what, tamper) in cases {
        let t = TempDir::new("census");
        let key = t.key("k");
        let v = Vault::create(&t.state(), &key, &identity()).unwrap();
        v.replace_all(&(1..=4).map(peer).collect::<Vec<_>>())
            .unwrap();
        v.replace_values(&[b"one".to_vec(), b"two".to_vec()])
            .unwrap();
        v.add_value(b"three").unwrap();
        v.put_meta(b"ext", b"kept").unwrap();
        v.close();
        // Untouched, it opens (and every write kept the census right).
        let v = Vault::open(&t.state(), &key).unwrap();
        let mut txn = v.env.write_txn().unwrap();
        tamper(&v, &mut txn);
        txn.commit().unwrap();
        v.close();
        let e = err(Vault::open(&t.state(), &key));
        assert!(
            e.contains("failed authentication") && e.contains("census"),
            "{what}: {e}"
        );
    }
}

/// A page-sealed vault (`Format::Pages`) as versions before per-entry
/// sealing wrote it, in `t`'s state directory; its keys and contents.
fn page_sealed_vault(t: &TempDir, key: &KeySource) -> (Header, Contents) {
    let (header, keys) = Keys::fresh(key).unwrap();
    let header = Header {
        format: Format::Pages,
        ..header
    };
    let contents = Contents {
        identity: super::meta::encode_identity(&identity()).unwrap(),
        seq: 77,
        nodes: (1..=5)
            .map(peer)
            .map(|(k, p)| {
                let mut v = Vec::new();
                encode_value(&p, &mut v);
                (k.to_vec(), v)
            })
            .collect(),
        meta: vec![
            (b"ext".to_vec(), Zeroizing::new(b"kept".to_vec())),
            (
                [META_VALUES, &[0, 0, 0, 0]].concat(),
                Zeroizing::new(vec![9u8; 1650]),
            ),
            (
                [META_VALUES, b"+added"].concat(),
                Zeroizing::new(b"added".to_vec()),
            ),
        ],
    };
    let dir = t.state().join(VAULT_DIR);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(HEADER_FILE), header.encode()).unwrap();
    pages::write(&dir, &keys, &contents);
    (header, contents)
}

/// Everything `page_sealed_vault` put in, read back.
fn holds_the_page_sealed_contents(v: &Vault) {
    assert_eq!(v.identity().unwrap().node_id(), identity().node_id());
    assert_eq!(v.load().unwrap(), (1..=5).map(peer).collect::<Vec<_>>());
    assert_eq!(v.record_seq().unwrap(), 77);
    assert_eq!(v.meta_value(b"ext").unwrap().unwrap(), b"kept");
    assert_eq!(v.values().unwrap(), [vec![9u8; 1650], b"added".to_vec()]);
}

/// A vault written by a version that sealed LMDB's pages is upgraded on
/// its first open: everything in it reads back, and the header names the
/// new format.
#[test]
fn a_page_sealed_vault_is_upgraded_on_open() {
    let t = TempDir::new("upgrade");
    let key = t.key("k");
    page_sealed_vault(&t, &key);
    let v = Vault::open(&t.state(), &key).unwrap();
    holds_the_page_sealed_contents(&v);
    v.close();
    let dir = t.state().join(VAULT_DIR);
    assert_eq!(Header::read(&dir).unwrap().format, Format::Values);
    assert!(!t.state().join(VAULT_NEW).exists());
    let v = Vault::open(&t.state(), &key).unwrap();
    holds_the_page_sealed_contents(&v);
    v.close();
    // A wrong key is refused and rewrites nothing.
    let t2 = TempDir::new("upgrade-wrong");
    page_sealed_vault(&t2, &key);
    let data = t2.state().join(VAULT_DIR).join("data.mdb");
    let before = fs::read(&data).unwrap();
    assert!(err(Vault::open(&t2.state(), &t.key("other"))).starts_with("wrong key"));
    assert_eq!(fs::read(&data).unwrap(), before);
}

/// While someone holds the state directory (a running node, a rotation),
/// an open by another (`qgate id`) changes nothing: an upgrade is refused
/// with a line that says why, and a copy in `vault.new` stays.
#[test]
fn an_open_beside_a_running_node_changes_nothing() {
    let t = TempDir::new("upgrade-busy");
    let key = t.key("k");
    page_sealed_vault(&t, &key);
    let lock = StateLock::take(&t.state()).unwrap();
    let e = err(Vault::open(&t.state(), &key));
    assert!(e.contains("stop the node"), "{e}");
    let dir = t.state().join(VAULT_DIR);
    assert_eq!(Header::read(&dir).unwrap().format, Format::Pages);
    // Under the lock the holder upgrades it.
    let v = Vault::open_locked(&t.state(), &key, &lock).unwrap();
    v.close();
    // The other side of a rotation, say: left alone beside the holder.
    fs::create_dir_all(t.state().join(VAULT_NEW)).unwrap();
    let v = Vault::open(&t.state(), &key).unwrap();
    holds_the_page_sealed_contents(&v);
    v.close();
    assert!(t.state().join(VAULT_NEW).exists());
    drop(lock);
    // With the directory free, the open clears it.
    Vault::open(&t.state(), &key).unwrap().close();
    assert!(!t.state().join(VAULT_NEW).exists());
}

/// An upgrade that a crash stops after any step leaves a vault that opens
/// with everything in it, in one format or the other; the next open
/// finishes the job.
#[test]
fn an_upgrade_survives_a_crash_after_every_step() {
    for step in [
        RotateStep::Written,
        RotateStep::Synced,
        RotateStep::Swapped,
        RotateStep::Cleaned,
    ] {
        let t = TempDir::new(&format!("upgrade-{}", step.name()));
        let key = t.key("k");
        let (header, _) = page_sealed_vault(&t, &key);
        let keys = Keys::derive(&key, header.kdf, &header.salt).unwrap();
        let crash = |s: RotateStep| {
            if s == step {
                bail!("fault injected after {}", s.name())
            }
            Ok(())
        };
        let e = super::open::upgrade(&t.state(), &header, &keys, &crash).unwrap_err();
        assert!(format!("{e}").contains(step.name()));
        let dir = t.state().join(VAULT_DIR);
        let format = Header::read(&dir).unwrap().format;
        let want = match step {
            RotateStep::Written | RotateStep::Synced => Format::Pages,
            RotateStep::Swapped | RotateStep::Cleaned => Format::Values,
        };
        assert_eq!(format, want, "{step:?}");
        assert_eq!(
            t.state().join(VAULT_NEW).exists(),
            step != RotateStep::Cleaned,
            "{step:?}"
        );
        let v = Vault::open(&t.state(), &key).unwrap();
        holds_the_page_sealed_contents(&v);
        v.close();
        assert_eq!(Header::read(&dir).unwrap().format, Format::Values);
        assert!(!t.state().join(VAULT_NEW).exists(), "{step:?}");
    }
}

/// LMDB's bug itself, without the vault: an encrypted table with one value
/// of 1,700 bytes among records of 820, written as a put storm writes them.
/// Fails with heed3 0.23.1 (`MDB_PROBLEM`); passes without encryption, or
/// with the value at 2,040 bytes or more. Run it after upgrading heed3:
/// once it passes, `pad` may go. `STRESS_BIG=n` sets the value's size,
/// `STRESS_PLAIN=1` turns encryption off.
#[test]
#[ignore]
fn lmdb_encrypted_page_split_bug() {
    let t = TempDir::new("lmdb-bug");
    let path = t.0.join("plain");
    fs::create_dir_all(&path).unwrap();
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_SIZE).max_dbs(MAX_DBS);
    macro_rules! pattern {
        ($env:expr) => {{
            let env = $env;
            let wtxn = env.write_txn().unwrap();
            let db = env
                .create_databases_and_commit(wtxn, |opener, wtxn| {
                    opener
                        .create_database::<Bytes, Bytes>(wtxn, Some(META_DB))
                        .map(CommitOrAbort::<_, ()>::Commit)
                })
                .unwrap()
                .unwrap_commit();
            let big = std::env::var("STRESS_BIG").map_or(1700, |n| n.parse().unwrap());
            {
                let mut wtxn = env.write_txn().unwrap();
                db.put(&mut wtxn, b"identity", &vec![1u8; big]).unwrap();
                wtxn.commit().unwrap();
            }
            let mut all: Vec<Vec<u8>> = Vec::new();
            let mut added = 0;
            for i in 0..3000u32 {
                let mut rec = vec![(i % 251) as u8; 820];
                rec[..4].copy_from_slice(&(i * 4).to_be_bytes());
                all.push(rec.clone());
                let mut wtxn = env.write_txn().unwrap();
                if added >= 64 {
                    let mut end = META_VALUES.to_vec();
                    *end.last_mut().unwrap() += 1;
                    let range = (
                        std::ops::Bound::Included(META_VALUES),
                        std::ops::Bound::Excluded(&end[..]),
                    );
                    db.delete_range(&mut wtxn, &range).unwrap();
                    let mut key = META_VALUES.to_vec();
                    for (n, r) in all.iter().enumerate() {
                        key.truncate(META_VALUES.len());
                        key.extend_from_slice(&(n as u32).to_be_bytes());
                        db.put(&mut wtxn, &key, r).unwrap();
                    }
                    added = 0;
                } else {
                    use sha2::Digest;
                    let mut key = META_VALUES.to_vec();
                    key.push(b'+');
                    key.extend_from_slice(&sha2::Sha256::digest(&rec));
                    if let Err(e) = db.put(&mut wtxn, &key, &rec) {
                        panic!("add at {i}: {e}");
                    }
                    added += 1;
                }
                wtxn.commit().unwrap();
            }
            all.len()
        }};
    }
    #[allow(unsafe_code)]
    let n = if std::env::var("STRESS_PLAIN").is_err() {
        let key = aes_gcm_siv::aead::generic_array::GenericArray::clone_from_slice(&[7u8; 32]);
        pattern!(unsafe { options.open_encrypted::<cipher::PageCipher, _>(key, &path) }.unwrap())
    } else {
        pattern!(unsafe { options.open(&path) }.unwrap())
    };
    eprintln!("{n} records written");
}

/// The daemon's vault users at once, as under a put storm: one thread
/// adding put records (the full set every 64, as `keep_put_value` does),
/// one rewriting the peer table (`save_peers`), one the record sequence
/// number (`store_record_seq`), one reading. On the page-sealed format,
/// without the vault's turn (`Txn`), it failed every time in a release
/// build within seconds (`MDB_BAD_DBI` with writers alone,
/// `MDB_PAGE_NOTFOUND` in the reader with the writes serialized); in a
/// debug build it did not fail in 3 min, hence ignored:
/// `cargo test --release --lib concurrent_writers -- --ignored` (~15 s).
/// `STRESS_ROUNDS=n` sets the puts (8000).
#[test]
#[ignore]
fn concurrent_writers_as_in_a_put_storm() {
    let t = TempDir::new("writers");
    let key = t.key("k");
    let v = Vault::create(&t.state(), &key, &identity()).unwrap();
    let rounds: u32 = std::env::var("STRESS_ROUNDS").map_or(8000, |n| n.parse().unwrap());
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // The others stop when this one does, panicking or not.
            struct Done<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _done = Done(&done);
            let mut all: Vec<Vec<u8>> = Vec::new();
            let mut added = 0;
            for i in 0..rounds {
                let mut rec = vec![(i % 251) as u8; 700 + (i as usize * 37) % 200];
                rec[..4].copy_from_slice(&i.to_be_bytes());
                all.push(rec.clone());
                if added >= 64 {
                    v.replace_values(&all)
                        .unwrap_or_else(|e| panic!("set at {i}: {e:#}"));
                    added = 0;
                } else {
                    v.add_value(&rec)
                        .unwrap_or_else(|e| panic!("add at {i}: {e:#}"));
                    added += 1;
                }
            }
        });
        s.spawn(|| {
            let mut n = 0u32;
            while !done.load(Ordering::Acquire) {
                let peers: Vec<([u8; 32], StoredPeer)> = (0..40u32)
                    .map(|p| {
                        let mut id = [0u8; 32];
                        id[..4].copy_from_slice(&(p * 7 + n % 3).to_be_bytes());
                        let peer = StoredPeer {
                            record: vec![(p % 200) as u8; 600 + (p as usize * 13) % 300],
                            source: 1,
                            last_seen_unix: u64::from(n),
                        };
                        (id, peer)
                    })
                    .collect();
                v.replace_all(&peers)
                    .unwrap_or_else(|e| panic!("peers at {n}: {e:#}"));
                n += 1;
            }
        });
        s.spawn(|| {
            let mut n = 0u64;
            while !done.load(Ordering::Acquire) {
                v.record_seq()
                    .unwrap_or_else(|e| panic!("read seq {n}: {e:#}"));
                v.len().unwrap_or_else(|e| panic!("peers read {n}: {e:#}"));
                if n.is_multiple_of(50) {
                    v.values()
                        .unwrap_or_else(|e| panic!("values read {n}: {e:#}"));
                }
                n += 1;
            }
        });
        s.spawn(|| {
            let mut seq = 1_800_000_000u64;
            while !done.load(Ordering::Acquire) {
                seq += 3600;
                {
                    v.write_record_seq(seq)
                        .unwrap_or_else(|e| panic!("seq {seq}: {e:#}"));
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
    });
    v.close();
    let v = Vault::open(&t.state(), &key).unwrap();
    assert_eq!(v.identity().unwrap().node_id(), identity().node_id());
    assert!(!v.values().unwrap().is_empty());
}
