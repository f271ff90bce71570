//! Multi-node tests: real qgate processes in network namespaces, real TUN
//! devices, real UDP, and unmodified programs (ping, curl, python3's
//! http.server, socat) talking over overlay addresses. See harness/mod.rs
//! for the run-book.

mod harness;

use std::time::Duration;

use harness::{qgate_bin, random_file, wait_until, Lab};

const UP: Duration = Duration::from_secs(20);

/// Three nodes on a bridge: a and c know b, c knows a, b knows nobody (so
/// b's links are accepted from records alone).
fn three_nodes(lab: &mut Lab) -> (usize, usize, usize) {
    let na = lab.add_host("a", &["198.18.20.1/24"]);
    let nb = lab.add_host("b", &["198.18.20.2/24"]);
    let nc = lab.add_host("c", &["198.18.20.3/24"]);
    let a = lab.add_node("a", &na, "198.18.20.1:7300");
    let b = lab.add_node("b", &nb, "198.18.20.2:7300");
    let c = lab.add_node("c", &nc, "198.18.20.3:7300");
    let (ub, ua) = (lab.nodes[b].uri.clone(), lab.nodes[a].uri.clone());
    // b sends the text whose compression is checked: compress whenever it
    // saves bytes, also while a loaded machine makes b's data path the limit.
    // b also runs two data threads (`link.workers`): its links are spread
    // over them, the kernel steering each link's datagrams and each flow's
    // TUN packets to the thread that holds the link.
    lab.nodes[b].edit_config(|t| {
        assert!(t.contains("# adaptive = true") && t.contains("# workers = 1"));
        t.replacen("# adaptive = true", "adaptive = false", 1)
            .replacen("# workers = 1", "workers = 2", 1)
    });
    lab.nodes[a].set_peers(&[&ub]);
    lab.nodes[c].set_peers(&[&ub, &ua]);
    lab.start_all();
    (a, b, c)
}

#[test]
fn three_nodes_carry_real_programs() {
    let mut lab = Lab::new("p");
    let (a, b, c) = three_nodes(&mut lab);
    for (x, y) in [(a, b), (b, a), (c, b), (a, c), (c, a), (b, c)] {
        assert!(lab.wait_ping(x, y, UP), "ping {x} -> {y}");
    }
    let (na, nb, nc) = (
        lab.nodes[a].ns.clone(),
        lab.nodes[b].ns.clone(),
        lab.nodes[c].ns.clone(),
    );
    let (aa, ab, ac) = (
        lab.nodes[a].address.clone(),
        lab.nodes[b].address.clone(),
        lab.nodes[c].address.clone(),
    );

    // ping -6 with several sizes, including one that fills the MTU.
    lab.sh_ok(&na, &format!("ping -6 -c 3 -i 0.2 -s 1392 {ab}"));

    // http.server on b's overlay address; curl from a and c.
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello over the overlay\n").unwrap();
    let big = www.join("big.bin");
    let sum = random_file(&big, 50 * 1024 * 1024);
    lab.spawn(
        &nb,
        &format!(
            "python3 -m http.server 8080 --bind {ab} --directory {}",
            www.display()
        ),
    );
    let url = format!("http://[{ab}]:8080/");
    assert!(wait_until(UP, || lab
        .sh(&na, &format!("curl -sf -m 2 {url}"))
        .status
        .success()));
    assert_eq!(
        lab.sh_ok(&nc, &format!("curl -sf -m 5 {url}")),
        "hello over the overlay\n"
    );

    // 50 MB across, checksum intact.
    let got = lab.dir.join("got.bin");
    lab.sh_ok(
        &na,
        &format!("curl -sf -m 100 -o {} {url}big.bin", got.display()),
    );
    let out = lab.sh_ok(&na, &format!("sha256sum {}", got.display()));
    assert_eq!(out.split_whitespace().next().unwrap(), sum);

    // UDP with socat: c sends, a receives.
    let recv = lab.dir.join("udp.out");
    lab.spawn(
        &na,
        &format!(
            "socat -u UDP6-RECV:9000,bind=[{aa}] OPEN:{},creat,append",
            recv.display()
        ),
    );
    assert!(wait_until(UP, || {
        lab.sh(
            &nc,
            &format!("echo datagram-from-c | socat -u - UDP6-SENDTO:[{aa}]:9000"),
        );
        std::fs::read_to_string(&recv)
            .unwrap_or_default()
            .contains("datagram-from-c")
    }));
    let _ = ac;

    // Status reports what happened on the link a -> b.
    let l = lab.nodes[a].link_to(&ab).expect("a has a link to b");
    assert_eq!(l["state"], "up");
    assert!(l["rx_bytes"].as_u64().unwrap() > 50_000_000, "{l}");
    assert!(l["last_handshake_secs"].as_f64().is_some());
    // b never had a's URI, but a's link is verified and known by address.
    let l = lab.nodes[b].link_to(&aa).expect("b has a link to a");
    assert_eq!(l["state"], "up");
    assert_eq!(l["configured"], false);
    let st = lab.nodes[b].status();
    assert!(st["uptime_secs"].as_f64().unwrap() > 0.0);
    // Its established links are the data thread's: their packets were
    // sealed and opened without the node.
    assert!(
        st["data_path"]["plane_links"].as_u64().unwrap() >= 1,
        "{st}"
    );
    // Spread over its two data threads.
    let per: Vec<u64> = st["data_path"]["worker_links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per.len(), 2, "{st}");
    assert_eq!(
        per.iter().sum::<u64>(),
        st["data_path"]["plane_links"].as_u64().unwrap()
    );
    // The kernel steered each link's datagrams to the thread that holds
    // it: of the 50 MB's tens of thousands, only handshake initiations
    // (which carry no receiver index) crossed between the threads.
    let crossed = lab.nodes[b]
        .log()
        .matches("datagram passed to the data thread that holds its link")
        .count();
    eprintln!("b's links per data thread: {per:?}; datagrams crossed: {crossed}");
    assert!(
        crossed < 20,
        "{crossed} datagrams crossed between b's threads"
    );
    assert_eq!(st["api"], qgate::shell::control::API_VERSION);
    assert_eq!(st["address"], ab.as_str());

    // Compression: 20 MB of text shrinks on the wire; the 50 MB of random
    // bytes above went as they were (ratio stays near 1 for that part).
    let text: String = (0..400_000)
        .map(|i| format!("line {i} of a compressible file\n"))
        .collect();
    std::fs::write(www.join("text.txt"), &text).unwrap();
    let before = lab.nodes[b].link_to(&aa).unwrap();
    let got = lab.dir.join("text.got");
    lab.sh_ok(
        &na,
        &format!("curl -sf -m 60 -o {} {url}text.txt", got.display()),
    );
    assert_eq!(std::fs::read_to_string(&got).unwrap(), text);
    let after = lab.nodes[b].link_to(&aa).unwrap();
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let ratio = d("tx_wire_bytes") as f64 / d("tx_bytes") as f64;
    assert!(ratio < 0.6, "text compressed on the wire: ratio {ratio}");
    assert!(d("tx_compressed") > 1000, "{after}");
    assert!(
        lab.nodes[a].link_to(&ab).unwrap()["rx_compressed"]
            .as_u64()
            .unwrap()
            > 1000
    );
}

#[test]
fn ipv6_underlay() {
    let mut lab = Lab::new("6");
    let na = lab.add_host("a", &["2001:2::1/64"]);
    let nb = lab.add_host("b", &["2001:2::2/64"]);
    let a = lab.add_node("a", &na, "[2001:2::1]:7300");
    let b = lab.add_node("b", &nb, "[2001:2::2]:7300");
    let ub = lab.nodes[b].uri.clone();
    assert!(ub.ends_with("/[2001:2::2]:7300"), "{ub}");
    lab.nodes[a].set_peers(&[&ub]);
    // b switches compression off: nothing it sends is compressed.
    lab.nodes[b].edit_config(|t| t.replace("# enabled = true", "enabled = false"));
    lab.start_all();
    assert!(lab.wait_ping(a, b, UP));
    assert!(lab.wait_ping(b, a, UP));
    let ab = lab.nodes[b].address.clone();
    let www = lab.dir.join("www6");
    std::fs::create_dir_all(&www).unwrap();
    let sum = random_file(&www.join("f.bin"), 5 * 1024 * 1024);
    std::fs::write(www.join("zeros"), vec![0u8; 2 << 20]).unwrap();
    lab.spawn(
        &nb,
        &format!(
            "python3 -m http.server 8080 --bind {ab} --directory {}",
            www.display()
        ),
    );
    let got = lab.dir.join("f6.bin");
    assert!(wait_until(UP, || lab
        .sh(
            &na,
            &format!(
                "curl -sf -m 30 -o {} http://[{ab}]:8080/f.bin",
                got.display()
            )
        )
        .status
        .success()));
    let out = lab.sh_ok(&na, &format!("sha256sum {}", got.display()));
    assert_eq!(out.split_whitespace().next().unwrap(), sum);
    lab.sh_ok(
        &na,
        &format!("curl -sf -m 30 -o /dev/null http://[{ab}]:8080/zeros"),
    );
    let l = lab.nodes[a].link_to(&ab).unwrap();
    assert_eq!(l["endpoint"], "[2001:2::2]:7300");
    assert_eq!(l["rx_compressed"], 0, "b sends nothing compressed: {l}");
    let aa = lab.nodes[a].address.clone();
    assert_eq!(lab.nodes[b].link_to(&aa).unwrap()["compression"], false);
    // IPv6 listen address: the default TUN MTU is the IPv6 budget.
    assert_eq!(lab.nodes[a].status()["tun"]["mtu"], 1420);
}

#[test]
fn restarted_or_moved_node_is_reached_again() {
    let mut lab = Lab::new("r");
    let (a, b, c) = three_nodes(&mut lab);
    assert!(lab.wait_ping(a, b, UP));
    assert!(lab.wait_ping(c, b, UP));
    // b knows nobody: after a crash it is the others who must find it again.
    lab.stop(b, true);
    assert!(!lab.nodes[b].running());
    lab.start(b);
    assert!(
        lab.wait_ping(a, b, Duration::from_secs(30)),
        "a reaches restarted b"
    );
    assert!(
        lab.wait_ping(b, c, Duration::from_secs(30)),
        "restarted b reaches c"
    );
    // a comes back on another port: b (which never had a's URI) follows it.
    lab.stop(a, false);
    lab.nodes[a].edit_config(|t| t.replace("198.18.20.1:7300", "198.18.20.1:7301"));
    lab.start(a);
    assert!(
        lab.wait_ping(b, a, Duration::from_secs(30)),
        "b reaches a at its new port"
    );
    let ab = lab.nodes[a].address.clone();
    let l = lab.nodes[b].link_to(&ab).unwrap();
    assert_eq!(l["endpoint"], "198.18.20.1:7301");
}

#[test]
fn spoofed_source_is_dropped() {
    let mut lab = Lab::new("s");
    let (a, b, c) = three_nodes(&mut lab);
    assert!(lab.wait_ping(a, b, UP));
    let (na, ab, ac) = (
        lab.nodes[a].ns.clone(),
        lab.nodes[b].address.clone(),
        lab.nodes[c].address.clone(),
    );
    // a puts c's address on its own TUN and pings b from it.
    lab.sh_ok(&na, &format!("ip -6 addr add {ac}/128 dev qg0 nodad"));
    let before = lab.nodes[b].drops("spoofed_source");
    let out = lab.sh(&na, &format!("ping -6 -c 3 -i 0.2 -W 1 -I {ac} {ab}"));
    assert!(!out.status.success(), "spoofed ping must not be answered");
    let after = lab.nodes[b].drops("spoofed_source");
    assert!(after >= before + 3, "spoofed_source {before} -> {after}");
    // a's own traffic still flows (with c's address gone again, so the
    // kernel picks a's own source address).
    lab.sh_ok(&na, &format!("ip -6 addr del {ac}/128 dev qg0"));
    assert!(lab.wait_ping(a, b, UP));
}

#[test]
fn malformed_flood_leaves_node_serving() {
    let mut lab = Lab::new("f");
    let (a, b, _c) = three_nodes(&mut lab);
    assert!(lab.wait_ping(a, b, UP));
    let flooder = lab.add_host("x", &["198.18.20.9/24"]);
    // 30,000 datagrams of random bytes, some shaped like WireGuard messages
    // (type 1-4 with the right sizes), bounded in count and time.
    let script = r#"
import os, random, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.time() + 20
for i in range(30000):
    if time.time() > end:
        break
    kind = i % 6
    if kind < 4:
        size = [148, 92, 64, 32 + random.randint(0, 1400)][kind]
        d = bytes([kind + 1, 0, 0, 0]) + os.urandom(size - 4)
    elif kind == 4:
        d = os.urandom(random.randint(0, 3))
    else:
        d = os.urandom(random.randint(1, 1472))
    s.sendto(d, ("198.18.20.2", 7300))
print("sent")
"#;
    let path = lab.dir.join("flood.py");
    std::fs::write(&path, script).unwrap();
    let pid = lab.spawn(&flooder, &format!("python3 {}", path.display()));
    // The node keeps serving its peers during the flood...
    assert!(lab.wait_ping(a, b, UP));
    assert!(wait_until(
        Duration::from_secs(30),
        || !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| s.contains("State:\tZ"))
                .unwrap_or(true)
    ));
    // ...and after it.
    assert!(lab.nodes[b].running(), "b survived the flood");
    assert!(lab.wait_ping(a, b, UP));
    // One source: beyond its budget, everything is dropped unread as
    // rate_limited.
    let dropped = lab.nodes[b].drops("malformed")
        + lab.nodes[b].drops("unknown_session")
        + lab.nodes[b].drops("handshake_rejected")
        + lab.nodes[b].drops("rate_limited");
    assert!(dropped >= 10_000, "dropped and counted: {dropped}");
}

/// Sends `src` from namespace `from` to a socat listener on `to_addr` in
/// namespace `to` (TCP over the overlay) and checks it arrives intact.
fn upload(
    lab: &mut Lab,
    from: &str,
    to: &str,
    to_addr: &str,
    port: u16,
    src: &std::path::Path,
    sum: &str,
) {
    let dst = lab.dir.join(format!("upload-{port}.bin"));
    lab.spawn(
        to,
        &format!(
            "socat -u TCP6-LISTEN:{port},bind=[{to_addr}],reuseaddr OPEN:{},creat,trunc",
            dst.display()
        ),
    );
    assert!(wait_until(UP, || lab
        .sh(
            from,
            &format!(
                "socat -u OPEN:{} TCP6:[{to_addr}]:{port},connect-timeout=2",
                src.display()
            )
        )
        .status
        .success()));
    assert!(
        wait_until(UP, || {
            let out = lab.sh(from, &format!("sha256sum {}", dst.display()));
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                == Some(sum)
        }),
        "upload to port {port} arrived intact"
    );
}

#[test]
fn path_mtu_is_learnt_through_a_router() {
    let mut lab = Lab::new("m");
    let na = lab.add_ns("a");
    let nr = lab.add_ns("r");
    let nb = lab.add_ns("b");
    lab.veth(&na, "eth0", &nr, "ra", 1500);
    lab.veth(&nr, "rb", &nb, "eth0", 1400);
    lab.sh_ok(
        &na,
        "ip addr add 198.18.31.2/24 dev eth0 && ip route add default via 198.18.31.1",
    );
    lab.sh_ok(&nr, "ip addr add 198.18.31.1/24 dev ra && ip addr add 198.18.32.1/24 dev rb && sysctl -qw net.ipv4.ip_forward=1");
    lab.sh_ok(
        &nb,
        "ip addr add 198.18.32.2/24 dev eth0 && ip route add default via 198.18.32.1",
    );
    let a = lab.add_node("a", &na, "198.18.31.2:7300");
    let b = lab.add_node("b", &nb, "198.18.32.2:7300");
    let ub = lab.nodes[b].uri.clone();
    lab.nodes[a].set_peers(&[&ub]);
    lab.start_all();
    assert!(lab.wait_ping(a, b, UP));
    let (aa, ab) = (lab.nodes[a].address.clone(), lab.nodes[b].address.clone());
    let _ = aa;
    // a uploads to b: a's own interface allows 1500, the router's far side
    // only 1400, so a must learn the path MTU from ICMP.
    let src = lab.dir.join("up.bin");
    let sum = random_file(&src, 8 * 1024 * 1024);
    upload(&mut lab, &na, &nb, &ab, 9001, &src, &sum);
    let l = lab.nodes[a].link_to(&ab).unwrap();
    // 1400 - IPv4 20 - UDP 8 - WireGuard 32
    assert_eq!(l["mtu"], 1340, "{l}");
    assert!(
        l["drops"]["too_big"].as_u64().unwrap() > 0,
        "Packet Too Big was sent: {l}"
    );
    // The sending kernel took the Packet Too Big: its route to b says so.
    let route = lab.sh_ok(&na, &format!("ip -6 route get {ab}"));
    assert!(route.contains("mtu 1340"), "{route}");

    // Narrower still: 1300 leaves links 1240 bytes, below IPv6's minimum of
    // 1280. Programs are told 1280 and the node fragments what they send.
    lab.sh_ok(&nr, "ip link set rb mtu 1300");
    lab.sh_ok(&nb, "ip link set eth0 mtu 1300");
    upload(&mut lab, &na, &nb, &ab, 9002, &src, &sum);
    let l = lab.nodes[a].link_to(&ab).unwrap();
    assert_eq!(l["mtu"], 1240, "{l}");
    // b's kernel put fragments back together.
    let snmp = lab.sh_ok(&nb, "cat /proc/net/snmp6");
    let reasm: u64 = snmp
        .lines()
        .find_map(|l| l.strip_prefix("Ip6ReasmOKs"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(reasm > 0, "no reassembled fragments at b");
}

#[test]
fn bad_config_and_missing_privilege_fail_cleanly() {
    let mut lab = Lab::new("c");
    let ns = lab.add_ns("a");
    let n = lab.add_node("a", &ns, "198.18.40.1:7300");
    let cfg = lab.nodes[n].config.clone();
    let good = std::fs::read_to_string(&cfg).unwrap();
    for (bad, key) in [
        ("\nnot_a_key = 1\n", "not_a_key"),
        ("\n[tun]\nmtu = 99\n", "mtu"),
    ] {
        let path = lab.dir.join("bad.toml");
        let text = if bad.contains("[tun]") {
            good.replace("[tun]\n", &bad[1..])
        } else {
            format!("{bad}{good}")
        };
        std::fs::write(&path, text).unwrap();
        let out = lab.sh(
            &ns,
            &format!("{} run --config {}", qgate_bin(), path.display()),
        );
        assert_eq!(out.status.code(), Some(2), "exit code 2 for {bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(key), "{err}");
        // Nothing left behind: no TUN, no control socket.
        let links = lab.sh_ok(&ns, "ip -o link");
        assert!(!links.contains("qg0"), "{links}");
        assert!(!lab.nodes[n].dir.join("control.sock").exists());
    }
    // Without CAP_NET_ADMIN: one clear line, at once.
    let out = lab.sh(
        &ns,
        &format!(
            "setpriv --bounding-set=-net_admin --inh-caps=-net_admin {} run --config {}",
            qgate_bin(),
            cfg.display()
        ),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!lab.sh_ok(&ns, "ip -o link").contains("qg0"));
}
