//! Onion circuits in network namespaces: seven real nodes (two ends, three
//! dedicated relays, two ordinary nodes that relay too) on one bridge with
//! underlay addresses in two /16s. Node a reaches node e through 2-3 relays
//! while nftables in both their namespaces drops every UDP datagram between
//! them; curl, ping and a 100 MB upload work, each relay on the circuit
//! forwards the bytes, the cells the relays log carry nothing that names the
//! ends or shows the plaintext, no relay holds both ends of a circuit, and
//! a relay killed under a live TCP connection is routed around while the
//! connection survives. Needs the `test-hooks` feature (relays record the
//! cells they forward) and root; see harness/mod.rs for the run-book.

#![cfg(feature = "test-hooks")]

mod harness;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{qgate_bin, random_file, wait_until, Lab};
use serde_json::Value;

const UP: Duration = Duration::from_secs(30);
/// The two cell sizes, bytes.
const CELL_SIZES: [usize; 2] = [256, 1376];
/// Size of the bulk upload.
const BULK: u64 = 100 * 1024 * 1024;
/// Lines the TCP client sends (one every 50 ms: 25 s).
const LINES: usize = 500;

/// `qgate <cmd> --json --config <config>`, parsed; None if the node does not
/// answer.
fn qgate_json(config: &Path, cmd: &str) -> Option<Value> {
    let out = Command::new(qgate_bin())
        .args([cmd, "--json", "--config"])
        .arg(config)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn list(v: &Value, key: &str) -> Vec<Value> {
    v[key].as_array().cloned().unwrap_or_default()
}

/// The ready circuit node `from` built to overlay address `to`, if any
/// (the newest one when there are several).
fn ready_circuit(config: &Path, to: &str) -> Option<Value> {
    let v = qgate_json(config, "circuits")?;
    list(&v, "circuits")
        .into_iter()
        .filter(|c| c["destination"] == to && c["state"] == "ready")
        .min_by(|x, y| {
            let age = |c: &Value| c["age_secs"].as_f64().unwrap_or(f64::MAX);
            age(x).total_cmp(&age(y))
        })
}

fn hops_of(circuit: &Value) -> Vec<String> {
    list(circuit, "hops")
        .iter()
        .map(|h| h.as_str().unwrap_or("?").to_lowercase())
        .collect()
}

fn ping_once(lab: &Lab, ns: &str, addr: &str) -> bool {
    lab.sh(ns, &format!("ping -6 -c 1 -W 2 {addr}"))
        .status
        .success()
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the hex string `hex` holds the bytes `pat` (hex) at a byte
/// boundary.
fn holds(hex: &str, pat: &str) -> bool {
    let mut from = 0;
    while let Some(i) = hex[from..].find(pat) {
        let at = from + i;
        if at % 2 == 0 {
            return true;
        }
        from = at + 1;
    }
    false
}

/// What one relay's cell log showed.
#[derive(Default, Debug)]
struct CellStats {
    fwd: usize,
    bwd: usize,
    small: usize,
    large: usize,
    /// Cells (in or out) holding one of the bare IPv4 addresses somewhere.
    ipv4_hits: usize,
}

/// Reads a relay's cell log and checks every complete line: two cells of
/// a cell size, of equal size, different from each other, holding none of
/// the `forbidden` byte strings (hex). Bare 4-byte IPv4 addresses (`ipv4`)
/// are only counted: random bytes hold a given 4-byte value now and then.
fn check_cell_log(
    relay: &str,
    path: &Path,
    forbidden: &[(String, String)],
    ipv4: &[String],
) -> CellStats {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut st = CellStats::default();
    // The node appends at its own pace: a last line without its newline is
    // still being written.
    for (n, line) in text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .enumerate()
    {
        let mut parts = line.split_whitespace();
        let (dir, cin, cout) = match (parts.next(), parts.next(), parts.next()) {
            (Some(d), Some(i), Some(o)) => (d, i, o),
            _ => panic!("{relay}: cell log line {n} malformed: {line:.80}"),
        };
        match dir {
            "fwd" => st.fwd += 1,
            "bwd" => st.bwd += 1,
            other => panic!("{relay}: cell log line {n}: direction {other:?}"),
        }
        for (what, cell) in [("in", cin), ("out", cout)] {
            let len = cell.len() / 2;
            assert!(
                CELL_SIZES.contains(&len),
                "{relay}: line {n}: {dir} cell {what} is {len} bytes, not one of {CELL_SIZES:?}"
            );
            if len == CELL_SIZES[0] {
                st.small += 1;
            } else {
                st.large += 1;
            }
            for (label, pat) in forbidden {
                assert!(
                    !holds(cell, pat),
                    "{relay}: line {n}: {dir} cell {what} holds {label} ({pat})"
                );
            }
            if ipv4.iter().any(|p| holds(cell, p)) {
                st.ipv4_hits += 1;
            }
        }
        assert_eq!(
            cin.len(),
            cout.len(),
            "{relay}: line {n}: a cell changed size at the relay"
        );
        assert_ne!(cin, cout, "{relay}: line {n}: {dir} cell passed unchanged");
    }
    st
}

/// Everything a relay's `qgate circuits` "relayed" list showed while we
/// sampled: (prev, next) by name -> largest (fwd, bwd) bytes seen.
type Seen = BTreeMap<String, BTreeMap<(String, String), (u64, u64)>>;

const SERVER_PY: &str = r#"
import json, os, socket, sys
addr, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
res = {"received": 0, "contiguous": True, "error": None}
try:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    srv.settimeout(120)
    conn, _ = srv.accept()
    conn.settimeout(60)
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if int(line) != res["received"]:
                res["contiguous"] = False
            res["received"] += 1
    if buf:
        res["contiguous"] = False
    conn.close()
except Exception as e:
    res["error"] = repr(e)
with open(out + ".tmp", "w") as f:
    json.dump(res, f)
os.rename(out + ".tmp", out)
"#;

const CLIENT_PY: &str = r#"
import json, os, socket, sys, threading, time
addr, port, out, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
res = {"sent": 0, "echoed": 0, "in_order": True, "max_gap": None, "gap_after_line": None, "error": None}
times = []
try:
    s = socket.create_connection((addr, port), timeout=10)
    s.settimeout(60)
    def reader():
        buf = b""
        try:
            while len(times) < n:
                d = s.recv(65536)
                if not d:
                    break
                buf += d
                *lines, buf = buf.split(b"\n")
                now = time.monotonic()
                for line in lines:
                    if int(line) != len(times):
                        res["in_order"] = False
                    times.append(now)
        except Exception as e:
            res["error"] = "reader: " + repr(e)
    t = threading.Thread(target=reader)
    t.start()
    for i in range(n):
        s.sendall(b"%d\n" % i)
        res["sent"] += 1
        time.sleep(0.05)
    t.join(90)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    s.close()
except Exception as e:
    res["error"] = repr(e)
res["echoed"] = len(times)
gaps = [b - a for a, b in zip(times, times[1:])]
if gaps:
    g = max(gaps)
    res["max_gap"] = g
    res["gap_after_line"] = gaps.index(g)
ok = res["error"] is None and res["echoed"] == n and res["in_order"]
with open(out + ".tmp", "w") as f:
    json.dump(res, f)
os.rename(out + ".tmp", out)
sys.exit(0 if ok else 1)
"#;

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

#[test]
fn onion_circuit_through_relays_hides_the_ends_and_survives_a_relay_loss() {
    let t_test = Instant::now();
    let mut lab = Lab::new("o");
    // name, dedicated relay?, underlay address. a and e sit in different
    // /16s; so do the relays, but with distinct_subnets off a test network
    // of two /16s can carry a 2-3 relay circuit.
    let plan: [(&str, bool, Ipv4Addr); 7] = [
        ("n1", false, Ipv4Addr::new(198, 18, 40, 3)), // bootstrap node
        ("a", false, Ipv4Addr::new(198, 18, 40, 1)),
        ("e", false, Ipv4Addr::new(198, 19, 40, 2)),
        ("r1", true, Ipv4Addr::new(198, 19, 40, 4)),
        ("r2", true, Ipv4Addr::new(198, 18, 40, 5)),
        ("r3", true, Ipv4Addr::new(198, 19, 40, 6)),
        ("n2", false, Ipv4Addr::new(198, 19, 40, 7)),
    ];
    let mut idx = HashMap::new();
    for (name, dedicated, ip4) in plan {
        let o = ip4.octets();
        let ns = lab.add_host(name, &[&format!("{ip4}/24")]);
        // Both /24s share the bridge: the other one is on-link too.
        let other = if o[1] == 18 { 19 } else { 18 };
        lab.sh_ok(&ns, &format!("ip route add 198.{other}.40.0/24 dev eth0"));
        let i = lab.add_node(name, &ns, &format!("{ip4}:7300"));
        lab.nodes[i].edit_config(|t| {
            assert!(t.contains("\n[relay]\n") && t.contains("preset = \"fast\"\n"));
            let mut t = t.replacen("\n[relay]\n", "\n[relay]\ndistinct_subnets = false\n", 1);
            if dedicated {
                // Two data threads each (`link.workers`): a circuit whose
                // two links sit on different threads is held by both, the
                // cells crossing between them.
                assert!(t.contains("# workers = 1\n"));
                t = t
                    .replacen(
                        "preset = \"fast\"\n",
                        "role = \"relay\"\npreset = \"fast\"\n",
                        1,
                    )
                    .replacen("# workers = 1\n", "workers = 2\n", 1);
            }
            t
        });
        idx.insert(name, i);
    }
    let (a, e, boot) = (idx["a"], idx["e"], idx["n1"]);
    let relay_names = ["n1", "n2", "r1", "r2", "r3"];
    let relays: Vec<usize> = relay_names.iter().map(|n| idx[n]).collect();
    // a sends everything in the overlay through 2-3 relays; both ends send
    // circuit payloads uncompressed, so the plaintext check below means
    // something.
    for &i in &[a, e] {
        lab.nodes[i].edit_config(|t| {
            assert!(t.contains("# compress = true"));
            t.replacen("# compress = true", "compress = false", 1)
        });
    }
    lab.nodes[a]
        .edit_config(|t| format!("{t}\n[[route]]\nprefix = \"fc00::/8\"\nhops = \"2..3\"\n"));
    let boot_uri = lab.nodes[boot].uri.clone();
    for i in 0..lab.nodes.len() {
        if i != boot {
            lab.nodes[i].set_peers(&[&boot_uri]);
        }
    }

    // No UDP at all between a and e: whatever they say goes through relays.
    let ip_of = |name: &str| plan.iter().find(|p| p.0 == name).unwrap().2;
    let (ip_a, ip_e) = (ip_of("a"), ip_of("e"));
    for (i, peer) in [(a, ip_e), (e, ip_a)] {
        let rules = lab.dir.join(format!("nft-{i}.conf"));
        std::fs::write(
            &rules,
            format!(
                "table inet qgtest {{\n\
                 chain out {{ type filter hook output priority 0; policy accept; ip daddr {peer} meta l4proto udp counter drop; }}\n\
                 chain in {{ type filter hook input priority 0; policy accept; ip saddr {peer} meta l4proto udp counter drop; }}\n\
                 }}\n"
            ),
        )
        .unwrap();
        let ns = lab.nodes[i].ns.clone();
        lab.sh_ok(&ns, &format!("nft -f {}", rules.display()));
        // The rule holds: a plain datagram does not get through.
        let out = lab.sh(&ns, &format!("echo x | socat -u - UDP4-SENDTO:{peer}:9999"));
        assert!(
            !out.status.success(),
            "nftables let UDP from {} to {peer} through",
            lab.nodes[i].name
        );
    }

    // Relays record the cells they forward (the bootstrap node n1 first).
    let logs: Vec<(usize, std::path::PathBuf)> = relay_names
        .iter()
        .map(|n| (idx[n], lab.dir.join(format!("cells-{n}.log"))))
        .collect();
    for (i, path) in &logs {
        let path = path.to_str().unwrap();
        lab.start_with_env(
            *i,
            &[("QGATE_CELL_LOG", path), ("QGATE_CELL_LOG_MAX", "6000")],
        );
    }
    lab.start(e);
    lab.start(a);
    for &r in &relays {
        let st = lab.nodes[r].status();
        assert_eq!(st["relay"]["enabled"], true, "{}: {st}", lab.nodes[r].name);
    }

    let name_of: HashMap<String, String> = lab
        .nodes
        .iter()
        .map(|n| (n.node_id.to_lowercase(), n.name.clone()))
        .collect();
    let name = |id: &Value| -> String {
        id.as_str()
            .map(|s| {
                name_of
                    .get(&s.to_lowercase())
                    .cloned()
                    .unwrap_or_else(|| format!("?{}", &s[..8.min(s.len())]))
            })
            .unwrap_or_else(|| "-".into())
    };
    let (cfg_a, cfg_e) = (lab.nodes[a].config.clone(), lab.nodes[e].config.clone());
    let (ns_a, ns_e) = (lab.nodes[a].ns.clone(), lab.nodes[e].ns.clone());
    let (addr_a, addr_e) = (lab.nodes[a].address.clone(), lab.nodes[e].address.clone());
    let (id_a, id_e) = (
        lab.nodes[a].node_id.to_lowercase(),
        lab.nodes[e].node_id.to_lowercase(),
    );

    // a learns enough relays that losing one still leaves a path.
    let mut pool = 0;
    let filled = wait_until(Duration::from_secs(60), || {
        pool = qgate_json(&cfg_a, "circuits")
            .and_then(|v| v["pool"].as_u64())
            .unwrap_or(0);
        pool >= 4
    });
    assert!(filled, "a's relay pool holds {pool} relays, want 4 or more");
    eprintln!(
        "a's relay pool: {pool} relays after {:.1?}",
        t_test.elapsed()
    );

    // The first packet builds the circuit; ping works through it.
    let t = Instant::now();
    assert!(
        wait_until(UP, || ping_once(&lab, &ns_a, &addr_e)),
        "a reaches e through a circuit"
    );
    eprintln!("first ping a -> e answered after {:.1?}", t.elapsed());
    let circuit = ready_circuit(&cfg_a, &addr_e).expect("a has a ready circuit to e");
    let hops = hops_of(&circuit);
    let hop_names: Vec<String> = hops.iter().map(|h| name(&Value::from(h.clone()))).collect();
    eprintln!(
        "a's circuit to e: a -> {} -> e ({circuit})",
        hop_names.join(" -> ")
    );
    assert!((2..=3).contains(&hops.len()), "hops 2..3: {circuit}");
    assert!(
        circuit["destination_node"].as_str().map(str::to_lowercase) == Some(id_e.clone()),
        "{circuit}"
    );
    for (h, n) in hops.iter().zip(&hop_names) {
        assert!(
            relay_names.contains(&n.as_str()),
            "hop {h} is not one of the relays"
        );
    }
    let mut distinct = hops.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), hops.len(), "a relay twice: {circuit}");
    let st = lab.nodes[a].status();
    assert!(
        st["circuits"].as_u64().unwrap_or(0) >= 1,
        "a's status counts its circuit: {st}"
    );
    lab.sh_ok(&ns_a, &format!("ping -6 -c 5 -i 0.2 -W 5 {addr_e}"));
    // 1288 + ICMPv6 8 + IPv6 40 = 1336, the most a circuit carries.
    lab.sh_ok(&ns_a, &format!("ping -6 -c 3 -i 0.2 -W 5 -s 1288 {addr_e}"));

    // curl from a fetches a file of a repeated marker from http.server on
    // e's overlay address; socat sends the same file the other way.
    let marker = "QGATE-CIRCUIT-PLAINTEXT-MARKER-0123456789abcdef\n";
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let text = marker.repeat((1 << 20) / marker.len());
    std::fs::write(www.join("marker.txt"), &text).unwrap();
    lab.spawn(
        &ns_e,
        &format!(
            "python3 -m http.server 8080 --bind {addr_e} --directory {}",
            www.display()
        ),
    );
    let got = lab.dir.join("marker.got");
    assert!(
        wait_until(UP, || lab
            .sh(
                &ns_a,
                &format!(
                    "curl -sf -m 20 -o {} http://[{addr_e}]:8080/marker.txt",
                    got.display()
                )
            )
            .status
            .success()),
        "curl from a to e's http.server"
    );
    assert!(
        std::fs::read_to_string(&got).unwrap() == text,
        "curl got the file intact"
    );
    let up = lab.dir.join("marker.up");
    lab.spawn(
        &ns_e,
        &format!(
            "socat -u TCP6-LISTEN:9001,bind=[{addr_e}],reuseaddr OPEN:{},creat,trunc",
            up.display()
        ),
    );
    wait_listen(&lab, &ns_e, 9001);
    lab.sh_ok(
        &ns_a,
        &format!(
            "socat -u OPEN:{} TCP6:[{addr_e}]:9001,connect-timeout=5",
            www.join("marker.txt").display()
        ),
    );
    assert!(
        wait_until(UP, || std::fs::read_to_string(&up).unwrap_or_default()
            == text),
        "socat upload of the marker file arrived intact"
    );

    // What the relays saw: the cells they forwarded (the log is written
    // every 250 ms).
    std::thread::sleep(Duration::from_secs(1));
    let octets6 = |s: &str| hex_of(&s.parse::<Ipv6Addr>().unwrap().octets());
    let endpoint =
        |ip: Ipv4Addr| format!("{}{}", hex_of(&ip.octets()), hex_of(&7300u16.to_be_bytes()));
    let forbidden = vec![
        (
            "the plaintext marker line".to_string(),
            hex_of(marker.as_bytes()),
        ),
        (
            "16 bytes of the plaintext".to_string(),
            hex_of(&marker.as_bytes()[..16]),
        ),
        ("a's overlay address".to_string(), octets6(&addr_a)),
        ("e's overlay address".to_string(), octets6(&addr_e)),
        ("a's node ID".to_string(), id_a.clone()),
        ("e's node ID".to_string(), id_e.clone()),
        ("a's underlay endpoint".to_string(), endpoint(ip_a)),
        ("e's underlay endpoint".to_string(), endpoint(ip_e)),
    ];
    let ipv4 = vec![hex_of(&ip_a.octets()), hex_of(&ip_e.octets())];
    let mut ipv4_hits = 0;
    for (n, (i, path)) in relay_names.iter().zip(&logs) {
        let st = check_cell_log(n, path, &forbidden, &ipv4);
        eprintln!(
            "cell log of {n}: {} forwarded, {} backward; cells {} small / {} large; none holds the marker, an end's address, ID or endpoint",
            st.fwd, st.bwd, st.small, st.large
        );
        ipv4_hits += st.ipv4_hits;
        let id = lab.nodes[*i].node_id.to_lowercase();
        if hops.contains(&id) {
            assert!(
                st.fwd >= 100 && st.bwd >= 100,
                "hop {n} logged {} forward and {} backward cells, expected the transfers both ways",
                st.fwd,
                st.bwd
            );
        }
    }
    // Chance alone puts a given 4-byte value in one cell of ~10^6; four
    // cells holding an end's bare IPv4 address would be no accident.
    eprintln!("cells holding a's or e's bare IPv4 address anywhere: {ipv4_hits} (chance level)");
    assert!(
        ipv4_hits <= 3,
        "{ipv4_hits} cells hold an end's IPv4 address"
    );

    // 100 MB from a to e with socat, timed; meanwhile every relay's view of
    // the circuits it carries is sampled.
    let hop_idx: Vec<usize> = hops
        .iter()
        .map(|h| {
            (0..lab.nodes.len())
                .find(|&i| lab.nodes[i].node_id.to_lowercase() == *h)
                .unwrap()
        })
        .collect();
    let fwd_before: Vec<u64> = hop_idx
        .iter()
        .map(|&i| {
            lab.nodes[i].status()["relay"]["bytes_forwarded"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect();
    let big = lab.dir.join("bulk.bin");
    let sum = random_file(&big, BULK as usize);
    let dst = lab.dir.join("bulk.got");
    lab.spawn(
        &ns_e,
        &format!(
            "socat -u TCP6-LISTEN:9002,bind=[{addr_e}],reuseaddr OPEN:{},creat,trunc",
            dst.display()
        ),
    );
    wait_listen(&lab, &ns_e, 9002);
    let relay_cfgs: Vec<(String, std::path::PathBuf)> = relays
        .iter()
        .map(|&r| (lab.nodes[r].name.clone(), lab.nodes[r].config.clone()))
        .collect();
    let mut seen: Seen = BTreeMap::new();
    let mut samples = 0;
    // One look at every relay's circuits; no relay may have a and e as
    // its two neighbours.
    let sample = |seen: &mut Seen| {
        for (rname, cfg) in &relay_cfgs {
            let Some(v) = qgate_json(cfg, "circuits") else {
                continue;
            };
            for r in list(&v, "relayed") {
                let (p, n) = (name(&r["prev"]), name(&r["next"]));
                let ends = [p.as_str(), n.as_str()];
                assert!(
                    !(ends.contains(&"a") && ends.contains(&"e")),
                    "relay {rname} carries a circuit between a and e directly: {r}"
                );
                let entry = seen
                    .entry(rname.clone())
                    .or_default()
                    .entry((p, n))
                    .or_default();
                entry.0 = entry.0.max(r["fwd_bytes"].as_u64().unwrap_or(0));
                entry.1 = entry.1.max(r["bwd_bytes"].as_u64().unwrap_or(0));
            }
        }
    };
    let (sent, elapsed) = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let t = Instant::now();
            let out = Command::new("ip")
                .args(["netns", "exec", &ns_a, "timeout", "200", "socat", "-u"])
                .arg(format!("OPEN:{}", big.display()))
                .arg(format!("TCP6:[{addr_e}]:9002,connect-timeout=5"))
                .output()
                .unwrap();
            // Done when e has every byte, not when a's socket buffer has.
            let complete = wait_until(Duration::from_secs(60), || {
                std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0) >= BULK
            });
            (out.status.success() && complete, t.elapsed())
        });
        // Bounded: at most 400 rounds of sampling (sender gives up at 260 s).
        for _ in 0..400 {
            if sender.is_finished() {
                break;
            }
            samples += 1;
            sample(&mut seen);
            std::thread::sleep(Duration::from_millis(500));
        }
        sender.join().unwrap()
    });
    // Once more with the whole upload counted.
    samples += 1;
    sample(&mut seen);
    assert!(
        sent,
        "100 MB upload a -> e through the circuit did not complete"
    );
    let out = lab.sh_ok(&ns_e, &format!("sha256sum {}", dst.display()));
    assert_eq!(
        out.split_whitespace().next().unwrap(),
        sum,
        "100 MB arrived intact"
    );
    let secs = elapsed.as_secs_f64();
    eprintln!(
        "100 MiB a -> e through {} relays: {secs:.1} s, {:.1} MB/s ({:.0} Mbit/s), sha256 matches",
        hops.len(),
        BULK as f64 / secs / 1e6,
        BULK as f64 * 8.0 / secs / 1e6
    );
    eprintln!(
        "what each relay's `qgate circuits` showed while the upload ran ({samples} samples):"
    );
    for (rname, _) in &relay_cfgs {
        match seen.get(rname) {
            None => eprintln!("  {rname}: carried no circuit"),
            Some(m) => {
                for ((p, n), (f, b)) in m {
                    eprintln!("  {rname}: prev {p}, next {n}: {f} bytes forward, {b} backward");
                }
            }
        }
    }
    let after = ready_circuit(&cfg_a, &addr_e).expect("a still has a ready circuit to e");
    assert_eq!(
        hops_of(&after),
        hops,
        "the circuit changed during the upload: {after}"
    );
    // Each hop forwarded the upload and knew only its two neighbours, which
    // chain from a to e.
    for (k, (&i, before)) in hop_idx.iter().zip(&fwd_before).enumerate() {
        let hn = &lab.nodes[i].name;
        let now = lab.nodes[i].status()["relay"]["bytes_forwarded"]
            .as_u64()
            .unwrap_or(0);
        let on_plane = lab.nodes[i].status()["data_path"]["plane_circuits"]
            .as_u64()
            .unwrap_or(0);
        eprintln!(
            "hop {} ({hn}): relay.bytes_forwarded {before} -> {now}; {on_plane} circuits on its data thread",
            k + 1
        );
        assert!(
            on_plane >= 1,
            "hop {hn}: its data thread does not pass the circuit's cells on"
        );
        assert!(
            now >= before + BULK,
            "hop {hn} forwarded {} bytes of the upload",
            now - before
        );
        let want_prev = if k == 0 {
            "a".to_string()
        } else {
            hop_names[k - 1].clone()
        };
        let want_next = if k + 1 == hops.len() {
            "e".to_string()
        } else {
            hop_names[k + 1].clone()
        };
        let m = seen.get(hn).cloned().unwrap_or_default();
        let (f, _) = m
            .get(&(want_prev.clone(), want_next.clone()))
            .copied()
            .unwrap_or_default();
        assert!(
            f >= BULK,
            "hop {hn}: no relayed entry {want_prev} -> {want_next} with the upload's bytes: {m:?}"
        );
    }
    // e knows the circuit ends at it and who authenticated as its source,
    // and its data thread, which opened the upload's cells, counted them
    // for it.
    let ve = qgate_json(&cfg_e, "circuits").expect("e answers circuits");
    let last = hop_names.last().unwrap().clone();
    let inbound = list(&ve, "inbound");
    let from_a = inbound
        .iter()
        .find(|c| c["source"] == addr_a.as_str() && name(&c["prev"]) == last);
    assert!(
        from_a.is_some(),
        "e has an inbound circuit from a via {last}: {ve}"
    );
    let rx = from_a.and_then(|c| c["rx_bytes"].as_u64()).unwrap_or(0);
    let on_plane = lab.nodes[e].status()["data_path"]["plane_circuits"]
        .as_u64()
        .unwrap_or(0);
    // Whatever e relays for others counts there too: at most this many.
    let relayed_by_e = list(&ve, "relayed").len() as u64;
    eprintln!(
        "e: {rx} bytes received on the circuit; {on_plane} circuits on its data thread, {relayed_by_e} relayed"
    );
    assert!(rx >= BULK, "e counted {rx} bytes of the upload");
    assert!(
        on_plane > relayed_by_e,
        "e's data thread does not open the circuit's cells"
    );
    // Still nothing direct between a and e.
    for (x, y) in [(a, &addr_e), (e, &addr_a)] {
        if let Some(l) = lab.nodes[x].link_to(y) {
            assert_ne!(
                l["state"], "up",
                "{} has a direct link: {l}",
                lab.nodes[x].name
            );
        }
    }

    // A live TCP connection (a line every 50 ms for 25 s, echoed by e) while
    // a relay of the circuit is killed: a new circuit without it carries the
    // connection on.
    let srv_py = lab.dir.join("echo_server.py");
    let cli_py = lab.dir.join("echo_client.py");
    std::fs::write(&srv_py, SERVER_PY).unwrap();
    std::fs::write(&cli_py, CLIENT_PY).unwrap();
    let (srv_out, cli_out) = (lab.dir.join("server.json"), lab.dir.join("client.json"));
    lab.spawn(
        &ns_e,
        &format!(
            "python3 {} {addr_e} 9100 {}",
            srv_py.display(),
            srv_out.display()
        ),
    );
    wait_listen(&lab, &ns_e, 9100);
    lab.spawn(
        &ns_a,
        &format!(
            "python3 {} {addr_e} 9100 {} {LINES}",
            cli_py.display(),
            cli_out.display()
        ),
    );
    std::thread::sleep(Duration::from_secs(5));
    let current = ready_circuit(&cfg_a, &addr_e).expect("a has a ready circuit to e");
    let old_hops = hops_of(&current);
    // The middle relay of three, the last of two: a has no link to it and
    // learns of its loss from the circuit alone.
    let victim_id = old_hops[old_hops.len() / 2].clone();
    let victim = (0..lab.nodes.len())
        .find(|&i| lab.nodes[i].node_id.to_lowercase() == victim_id)
        .unwrap();
    let vname = lab.nodes[victim].name.clone();
    let t_kill = Instant::now();
    lab.stop(victim, true);
    let mut new_circuit = Value::Null;
    let replaced = wait_until(Duration::from_secs(10), || {
        match ready_circuit(&cfg_a, &addr_e) {
            Some(c) if !hops_of(&c).contains(&victim_id) => {
                new_circuit = c;
                true
            }
            _ => false,
        }
    });
    let t_new = t_kill.elapsed();
    let names = |hs: &[String]| -> String {
        hs.iter()
            .map(|h| name(&Value::from(h.clone())))
            .collect::<Vec<_>>()
            .join(" -> ")
    };
    assert!(
        replaced,
        "10 s after {vname} was killed a has no ready circuit to e without it: {}",
        qgate_json(&cfg_a, "circuits").unwrap_or(Value::Null)
    );
    eprintln!(
        "killed {vname} (on a -> {} -> e); {t_new:.1?} later a had a ready circuit a -> {} -> e",
        names(&old_hops),
        names(&hops_of(&new_circuit))
    );
    assert!(wait_until(Duration::from_secs(90), || cli_out.exists()
        && srv_out.exists()));
    let cli = read_json(&cli_out).unwrap();
    let srv = read_json(&srv_out).unwrap();
    eprintln!("echo client: {cli}\necho server: {srv}");
    assert!(
        cli["error"].is_null() && cli["echoed"] == LINES && cli["in_order"] == true,
        "the TCP connection did not survive: {cli}"
    );
    assert!(
        srv["error"].is_null() && srv["received"] == LINES && srv["contiguous"] == true,
        "e did not get a contiguous sequence: {srv}"
    );
    let gap = cli["max_gap"].as_f64().unwrap();
    eprintln!(
        "traffic gap while the circuit was replaced: {gap:.2} s (largest pause between echoes)"
    );
    assert!(gap < 10.0, "traffic resumed only after {gap:.1} s");

    // Nothing ever went directly between a and e.
    for (i, n) in [(a, "a"), (e, "e")] {
        let out = lab.sh_ok(&lab.nodes[i].ns, "nft list table inet qgtest");
        let dropped: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split("counter packets ").nth(1))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        eprintln!("nftables in {n}: direct UDP datagrams dropped (out, in): {dropped:?}");
    }
    // Why a tried e directly, if it did: what a's log says about e.
    let (e_ip, e_short) = (ip_e.to_string(), id_e[..16].to_string());
    let log_a = lab.nodes[a].log();
    let about_e: Vec<&str> = log_a
        .lines()
        .filter(|l| l.contains(&e_ip) || l.contains(&e_short) || l.contains(&addr_e))
        .filter(|l| !l.contains("::circuits:"))
        .collect();
    eprintln!(
        "a's log names e outside circuit events in {} lines; the first few:",
        about_e.len()
    );
    for l in about_e.iter().take(12) {
        eprintln!("  {l}");
    }
    // Logs that don't betray: the relays ran at debug level, and no line
    // their circuit code wrote names either end of the traffic they carried
    // (node ID, overlay address, or underlay address of a or e).
    let a_short = lab.nodes[a].node_id[..16].to_string();
    for &r in &relays {
        let log = lab.nodes[r].log();
        let circuit_lines: Vec<&str> = log.lines().filter(|l| l.contains("::circuits:")).collect();
        for l in &circuit_lines {
            for (what, needle) in [
                ("a's address", addr_a.as_str()),
                ("a's ID", a_short.as_str()),
                ("e's address", addr_e.as_str()),
                ("e's ID", e_short.as_str()),
                ("e's endpoint", e_ip.as_str()),
            ] {
                assert!(
                    !l.contains(needle),
                    "relay {} logged {what} in a circuit line: {l}",
                    lab.nodes[r].name
                );
            }
        }
        eprintln!(
            "relay {}: {} circuit log lines at debug, none names a or e",
            lab.nodes[r].name,
            circuit_lines.len()
        );
    }
    eprintln!("test took {:.1?}", t_test.elapsed());
}

/// Waits until something listens on TCP `port` in namespace `ns`.
fn wait_listen(lab: &Lab, ns: &str, port: u16) {
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .sh(ns, &format!("ss -Hltn 'sport = :{port}' | grep -q LISTEN"))
            .status
            .success()),
        "nothing listens on port {port} in {ns}"
    );
}
