//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! very function its fuzz target calls (`qgate::fuzzing::<target>`), so the
//! inputs that once found bugs keep being checked by an ordinary
//! `cargo test --features test-hooks` (as scripts/test runs it), with or
//! without cargo-fuzz.
#![cfg(feature = "test-hooks")]

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_has_a_corpus_and_survives_it() {
    for (name, run) in qgate::fuzzing::TARGETS {
        let dir = corpus_dir(name);
        let inputs = files(&dir);
        assert!(!inputs.is_empty(), "corpus {} is empty", dir.display());
        for f in &inputs {
            let data = std::fs::read(f).expect("reading corpus file");
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "fuzz target {name} fails on {}", f.display());
        }
        eprintln!("{name}: {} inputs", inputs.len());
    }
}

#[test]
fn every_fuzz_target_is_replayed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for f in files(&dir) {
        let stem = f.file_stem().and_then(|s| s.to_str()).expect("file name");
        assert!(
            qgate::fuzzing::TARGETS.iter().any(|(n, _)| *n == stem),
            "fuzz target {stem} has no entry in qgate::fuzzing::TARGETS"
        );
    }
    // And the other way round: every entry is a fuzz target.
    for (name, _) in qgate::fuzzing::TARGETS {
        assert!(
            dir.join(format!("{name}.rs")).exists(),
            "qgate::fuzzing::{name} has no fuzz target"
        );
    }
}

/// Writes the hand-made seeds of each corpus (`seed-*` files): run with
/// `cargo test --test fuzz_corpus -- --ignored write_seeds` after a format
/// changes, then let the fuzzer grow and `cargo fuzz cmin` shrink them.
#[test]
#[ignore]
fn write_seeds() {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519;
    use qgate::proto::dht::Msg;
    use qgate::proto::identity::RecordExt;
    use qgate::proto::message::{Segmenter, MSG_SEGMENT};
    use qgate::proto::node::{MSG_CELL, MSG_DHT, MSG_HELLO};
    use qgate::proto::onion::{self, ClientHandshake, OnionKey, CELL_HEADER, CELL_SMALL};
    use qgate::proto::records::SignedValue;
    use qgate::proto::wire;
    use qgate::proto::{Identity, NodeId};
    use rand_chacha::rand_core::SeedableRng;

    let pem = include_str!("fixtures/identity-golden.pem");
    let id = Identity::from_pem(pem, [7u8; 32]).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    let ext = RecordExt {
        expires: Some(1_800_086_400),
        endpoints: vec![
            "198.18.0.3:7300".parse().unwrap(),
            "[2001:db8::1]:7300".parse().unwrap(),
        ],
        roles: 1,
        onion_key: Some([9; 32]),
    };
    let rec = id.sign_record_with(3, &ext).to_bytes();
    let rec_plain = id.sign_record(1).to_bytes();
    seeds.push(("record", rec.clone()));
    seeds.push(("record", rec_plain.clone()));
    let uri = format!(
        "qg://1/{}/{}/198.18.0.1:7300",
        id.node_id(),
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            id.link_public()
        )
    );
    seeds.push(("uri", uri.clone().into_bytes()));
    seeds.push((
        "uri",
        uri.replace("198.18.0.1:7300", "[2001:db8::7]:9")
            .into_bytes(),
    ));
    seeds.push(("uri", uri.rsplit_once('/').unwrap().0.as_bytes().to_vec()));

    // Frames: an app packet (UDP), the same compressed, a control frame.
    let a: std::net::Ipv6Addr = "fc00::1".parse().unwrap();
    let b: std::net::Ipv6Addr = "fc00::2".parse().unwrap();
    let payload: Vec<u8> = b"hello hello hello hello ".repeat(20);
    let mut udp = vec![0u8; 40 + 8 + payload.len()];
    wire::write_ipv6_header(&mut udp, 8 + payload.len(), 17, 64, a, b);
    udp[44..46].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp[48..].copy_from_slice(&payload);
    seeds.push(("frame", udp.clone()));
    let mut out = vec![0u8; 2 * wire::MAX_PACKET];
    if let wire::Encoded::Compressed(n) = wire::encode_app(
        wire::Ipv6View::new_checked(&udp).unwrap(),
        Some(&mut wire::Lz4Table::default()),
        &mut out,
    ) {
        seeds.push(("frame", out[..n].to_vec()));
    }
    let mut ctl = Vec::new();
    wire::encode_control(a, b, MSG_HELLO, &[0, 1, 2, 3], &mut ctl);
    seeds.push(("frame", ctl.clone()));
    let mut icmp = vec![0u8; 40 + 8];
    wire::write_ipv6_header(&mut icmp, 8, 58, 64, a, b);
    icmp[40] = 128;
    seeds.push(("frame", icmp.clone()));

    // Datagrams: a handshake initiation to the golden node, and garbage.
    let mut t = Tunn::new(
        x25519::StaticSecret::from([3u8; 32]),
        x25519::PublicKey::from(id.link_public()),
        None,
        None,
        5,
        None,
    );
    let mut buf = vec![0u8; 2048];
    if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, true) {
        seeds.push(("datagram", p.to_vec()));
    }
    seeds.push(("datagram", {
        let mut g = vec![4u8, 0, 0, 0];
        g.extend_from_slice(&[0x55; 60]);
        g
    }));
    seeds.push(("datagram", udp.clone()));

    // The message layer.
    let mut sg = Segmenter::new(1);
    let segs = sg.segment(MSG_DHT, &vec![7u8; 3000]).unwrap();
    let mut seg_in = Vec::new();
    for s in &segs {
        seg_in.push((s.len() / 8) as u8);
        seg_in.extend_from_slice(&s[..(s.len() / 8) * 8]);
    }
    seeds.push(("segment", seg_in));
    let one = &sg.segment(MSG_HELLO, b"short").unwrap()[0];
    seeds.push(("segment", [&[(one.len() / 8 + 1) as u8][..], one].concat()));

    // DHT messages and a value record.
    let msgs = [
        Msg::Find {
            txid: 1,
            target: [5; 32],
            values: true,
        },
        Msg::Reply {
            txid: 2,
            values: vec![],
            nodes: vec![rec.clone()],
        },
        Msg::Store {
            txid: 3,
            node: true,
            record: rec.clone(),
        },
        Msg::Stored { txid: 4, ok: true },
        Msg::Ping { txid: 5 },
        Msg::Pong { txid: 6 },
    ];
    let value = SignedValue::sign(&id, b"dfs", b"block-42", b"provider", 1, 1_800_000_600).unwrap();
    for m in &msgs {
        seeds.push(("dht", m.to_bytes()));
    }
    seeds.push((
        "dht",
        Msg::Store {
            txid: 7,
            node: false,
            record: value.to_bytes(),
        }
        .to_bytes(),
    ));
    seeds.push(("dht", value.to_bytes()));

    // Cells: a CREATE, and a relay cell.
    let onion_key = OnionKey::generate(&mut rng);
    let (_c, create) = ClientHandshake::start(&mut rng, NodeId([1; 32]), onion_key.public);
    let mut cell = vec![0u8; CELL_SMALL];
    onion::write_header(&mut cell, 9, onion::CellKind::Create, &[0; 16]);
    cell[CELL_HEADER..CELL_HEADER + create.len()].copy_from_slice(&create);
    seeds.push(("cell", cell.clone()));
    let mut relay = vec![0x42u8; onion::CELL_LARGE];
    onion::write_header(&mut relay, 9, onion::CellKind::Relay, &[3; 16]);
    seeds.push(("cell", relay));
    seeds.push(("cell", create.to_vec()));

    // Node-protocol messages: type byte, then body.
    seeds.push(("message", [&[MSG_HELLO, 1][..], &rec].concat()));
    seeds.push((
        "message",
        [&[MSG_HELLO, 4, 4, 198, 18, 0, 1, 0x1c, 0x84][..], &rec].concat(),
    ));
    for m in &msgs {
        seeds.push(("message", [&[MSG_DHT][..], &m.to_bytes()].concat()));
    }
    seeds.push(("message", [&[MSG_SEGMENT][..], &segs[0]].concat()));
    seeds.push(("message", [&[MSG_CELL][..], &cell].concat()));
    seeds.push(("message", udp.clone()));

    // Control requests.
    for r in [
        r#"{"cmd":"status"}"#,
        r#"{"cmd":"peers"}"#,
        r#"{"cmd":"circuits"}"#,
        r#"{"cmd":"lookup","target":"fc12:3456:789a:bcde:f012:3456:789a:bcde"}"#,
        &format!(r#"{{"cmd":"lookup","target":"{}"}}"#, id.node_id()),
        r#"{"cmd":"dht_put","namespace":"dfs","key":"block-42","value":"aGVsbG8=","ttl":600}"#,
        r#"{"cmd":"dht_get","namespace":"dfs","key":"block-42"}"#,
        r#"{"cmd":"identity"}"#,
        r#"{"cmd":"extender_key","name":"dfs"}"#,
        r#"{"cmd":"service_announce","name":"dfs","port":7400,"version":1,"ttl":600}"#,
        r#"{"cmd":"service_lookup","name":"dfs"}"#,
        r#"{"port":7400,"version":1}"#,
        r#"{"cmd":"nope"}"#,
        r#"[1,2,3]"#,
    ] {
        seeds.push(("control", r.as_bytes().to_vec()));
    }

    // Configurations.
    let dflt = qgate::shell::config::default_text(
        std::path::Path::new("/var/lib/qgate"),
        &"0.0.0.0:7300".parse().unwrap(),
        Some(std::path::Path::new("/media/usb/qgate.key")),
        None,
        None,
    );
    seeds.push(("config", dflt.into_bytes()));
    seeds.push((
        "config",
        format!(
            "state_dir = \"/var/lib/qgate\"\nlisten = \"[::]:7300\"\npeers = [\"{uri}\"]\npreset = \"private\"\nrole = \"relay\"\n[relay]\nbandwidth = \"50Mbit\"\n[[route]]\nprefix = \"fc00::/8\"\nhops = \"1..3\"\n[traffic]\nnoise_rate = 2\nnoise_size = \"64..1200\"\n[compression]\nenabled = false\n[discovery]\nlan = true\n"
        )
        .into_bytes(),
    ));
    seeds.push(("config", b"state_dir = 3\n".to_vec()));

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut n = std::collections::HashMap::new();
    for (t, data) in seeds {
        let i = n.entry(t).or_insert(0);
        *i += 1;
        let dir = root.join(t);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{i:02}")), data).unwrap();
    }
}
