//! After two nodes ran with traffic between them, nothing in their state
//! directories (the config file aside, which holds no secrets) shows what
//! was sent, who the nodes are, or whom they knew: no payload, no node ID or
//! overlay address in any encoding, no private key material. And a value
//! put through the control API is kept (sealed) across a crash.

mod harness;

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use harness::{qgate_bin, value_texts, Lab};
use qgate::shell::vault::{KeySource, Vault};

const UP: Duration = Duration::from_secs(20);

/// Every file under `dir`, except the config.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.file_name().unwrap() != "qgate.toml" {
            out.push(p);
        }
    }
}

/// The ways a node's ID and address could appear.
fn identity_needles(node_id: &str, address: &str, uri: &str) -> Vec<(String, Vec<u8>)> {
    let raw_id = hex::decode(node_id).unwrap();
    let ip: Ipv6Addr = address.parse().unwrap();
    let seg = ip.segments();
    let expanded: Vec<String> = seg.iter().map(|s| format!("{s:04x}")).collect();
    let link_key = uri.split('/').nth(4).unwrap().to_string();
    vec![
        ("id hex".into(), node_id.as_bytes().to_vec()),
        ("id HEX".into(), node_id.to_uppercase().into_bytes()),
        ("id raw".into(), raw_id.clone()),
        (
            "id base64".into(),
            STANDARD_NO_PAD.encode(&raw_id).into_bytes(),
        ),
        (
            "id base64url".into(),
            URL_SAFE_NO_PAD.encode(&raw_id).into_bytes(),
        ),
        ("address text".into(), address.as_bytes().to_vec()),
        ("address expanded".into(), expanded.join(":").into_bytes()),
        ("address raw".into(), ip.octets().to_vec()),
        ("link key".into(), link_key.into_bytes()),
    ]
}

#[test]
fn state_dirs_hold_nothing_readable_after_traffic() {
    let mut lab = Lab::new("r");
    let na = lab.add_host("a", &["198.18.50.1/24"]);
    let nb = lab.add_host("b", &["198.18.50.2/24"]);
    let a = lab.add_node("a", &na, "198.18.50.1:7300");
    let b = lab.add_node("b", &nb, "198.18.50.2:7300");
    let ub = lab.nodes[b].uri.clone();
    lab.nodes[a].set_peers(&[&ub]);
    lab.start_all();
    assert!(lab.wait_ping(a, b, UP), "ping a -> b");
    let ab = lab.nodes[b].address.clone();

    // Payloads: a TCP stream each way and a value stored through the
    // control API (extender data).
    let to_b = "PLAINTEXT-A-TO-B-7c1f9e";
    let to_a = "PLAINTEXT-B-TO-A-d40b2a";
    let got = lab.dir.join("got-at-b.txt");
    lab.spawn(
        &nb,
        &format!(
            "socat -u TCP6-LISTEN:9000,bind=[{ab}],reuseaddr OPEN:{},creat",
            got.display()
        ),
    );
    std::thread::sleep(Duration::from_millis(500));
    lab.sh_ok(
        &na,
        &format!("for i in $(seq 200); do echo {to_b}; done | socat -u - TCP6:[{ab}]:9000"),
    );
    let aa = lab.nodes[a].address.clone();
    lab.spawn(
        &na,
        &format!("socat -u TCP6-LISTEN:9001,bind=[{aa}],reuseaddr OPEN:/dev/null"),
    );
    std::thread::sleep(Duration::from_millis(500));
    lab.sh_ok(
        &nb,
        &format!("for i in $(seq 200); do echo {to_a}; done | socat -u - TCP6:[{aa}]:9001"),
    );
    assert!(std::fs::read_to_string(&got).unwrap().contains(to_b));
    let dht_value = "PLAINTEXT-DHT-VALUE-55e1";
    let put = lab.sh(
        &na,
        &format!(
            "{} dht put --config {} demo-ns demo-key {dht_value}",
            qgate_bin(),
            lab.nodes[a].config.display()
        ),
    );
    assert!(put.status.success(), "{put:?}");

    // A clean stop: each node writes its peer store (the other node's
    // record in it) on the way down.
    lab.stop(a, false);
    lab.stop(b, false);

    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("payload a->b".into(), to_b.as_bytes().to_vec()),
        ("payload b->a".into(), to_a.as_bytes().to_vec()),
        ("dht value".into(), dht_value.as_bytes().to_vec()),
    ];
    for n in [a, b] {
        let node = &lab.nodes[n];
        needles.extend(identity_needles(&node.node_id, &node.address, &node.uri));
        // Private key material, as the vault itself holds it.
        let key = lab.dir.join(format!("{}.key", node.name));
        assert!(key.exists(), "the key file lives outside the state dir");
        let v = Vault::open(&node.dir, &KeySource::File(key)).unwrap();
        assert!(
            !v.load().unwrap().is_empty(),
            "{}: the peer store was written (else the scan proves little)",
            node.name
        );
        // The value put through the control API is kept (a's own, b holds
        // it for a): sealed, so the scan below must not find it.
        let values = v.values().unwrap();
        assert!(
            values.iter().any(|r| r
                .windows(dht_value.len())
                .any(|w| w == dht_value.as_bytes())),
            "{}: the DHT value is in the vault ({} values)",
            node.name,
            values.len()
        );
        let id = v.identity().unwrap();
        v.close();
        let pem = id.rsa_pem().unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(&body).unwrap();
        for (i, chunk) in der.chunks(24).enumerate() {
            needles.push((format!("RSA key DER[{i}]"), chunk.to_vec()));
        }
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            needles.push(("RSA key PEM line".into(), line.as_bytes().to_vec()));
        }
        let link = id.link_secret_bytes();
        needles.push(("link secret raw".into(), link.to_vec()));
        needles.push((
            "link secret base64".into(),
            STANDARD.encode(link).into_bytes(),
        ));
    }

    let mut scanned = 0usize;
    for n in [a, b] {
        let mut list = Vec::new();
        files(&lab.nodes[n].dir, &mut list);
        assert!(
            list.iter().any(|p| p.ends_with("vault/data.mdb")),
            "{list:?}"
        );
        for f in list {
            let bytes = std::fs::read(&f).unwrap();
            scanned += bytes.len();
            for (what, needle) in &needles {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == &needle[..]),
                    "{} holds {what}",
                    f.display()
                );
            }
        }
    }
    eprintln!(
        "scanned {scanned} bytes in two state dirs for {} needles: none found",
        needles.len()
    );
}

/// A value put through the control API is in the vault before the put
/// answers: after a SIGKILL and a restart the node still serves it (a lone
/// node, so no other node could have handed it back).
#[test]
fn a_value_put_survives_a_crash() {
    let mut lab = Lab::new("v");
    let na = lab.add_host("a", &["198.18.51.1/24"]);
    let a = lab.add_node("a", &na, "198.18.51.1:7300");
    lab.start(a);
    let value = "KEPT-ACROSS-A-CRASH-3b9d";
    let dht = |lab: &Lab, args: &str| {
        lab.sh(
            &na,
            &format!(
                "{} dht {args} --config {}",
                qgate_bin(),
                lab.nodes[a].config.display()
            ),
        )
    };
    let put = dht(&lab, &format!("put crash-ns crash-key {value}"));
    assert!(put.status.success(), "{put:?}");
    lab.stop(a, true);
    lab.start(a);
    let get = dht(&lab, "get crash-ns crash-key --json");
    assert!(get.status.success(), "{get:?}");
    let v: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(value_texts(&v), [value], "{v}");
    assert!(
        lab.nodes[a].log().contains("values=1"),
        "the restart read the value from the vault:\n{}",
        lab.nodes[a].log()
    );
}

/// Puts kept while the node is killed (SIGKILL) in the middle of a storm
/// of them, three times over: every restart opens the vault (its entries
/// and its census check out), and every put that was answered is in the
/// vault afterwards, to be published again. (Checked in the vault, not with
/// `dht get`: a lone node's own store answers for at most
/// `MAX_VALUES_PER_PUBLISHER` of one publisher's values.) LMDB commits a
/// put and the census's count of it in one transaction.
#[test]
fn puts_acknowledged_before_crashes_are_all_kept() {
    let mut lab = Lab::new("w");
    let na = lab.add_host("a", &["198.18.52.1/24"]);
    let a = lab.add_node("a", &na, "198.18.52.1:7300");
    let config = lab.nodes[a].config.clone();
    let put = |key: &str| {
        std::process::Command::new(qgate_bin())
            .args(["dht", "put", "crash-storm", key, key, "--config"])
            .arg(&config)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let mut acked: Vec<String> = Vec::new();
    for round in 0..3 {
        lab.start(a);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let answered = std::thread::scope(|s| {
            let storm = s.spawn(|| {
                let mut answered = Vec::new();
                // Bounded: 400 puts or the kill, whichever comes first.
                for i in 0..400 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("r{round}-k{i}");
                    if put(&key) {
                        answered.push(key);
                    }
                }
                answered
            });
            std::thread::sleep(Duration::from_millis(400));
            lab.stop(a, true);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            storm.join().unwrap()
        });
        assert!(!answered.is_empty(), "round {round}: no put was answered");
        acked.extend(answered);
    }
    // The last restart opened the vault after the third crash; a clean
    // stop, then the vault itself.
    lab.start(a);
    lab.stop(a, false);
    let node = &lab.nodes[a];
    let key = lab.dir.join(format!("{}.key", node.name));
    let v = Vault::open(&node.dir, &KeySource::File(key)).unwrap();
    let kept: std::collections::HashSet<String> = v
        .values()
        .unwrap()
        .iter()
        .filter_map(|r| qgate::proto::records::SignedValue::parse(r).ok())
        .filter(|r| r.namespace == b"crash-storm")
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    v.close();
    let missing: Vec<&String> = acked.iter().filter(|k| !kept.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged puts lost: {missing:?}\nlog:\n{}",
        missing.len(),
        acked.len(),
        lab.nodes[a].log()
    );
    eprintln!("{} acknowledged puts kept across 3 crashes", acked.len());
}
