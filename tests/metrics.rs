//! The `metrics` endpoint of real nodes: two nodes in namespaces (underlay
//! 198.18.60.0/24), a ping over the overlay between two scrapes of
//! `GET /metrics`, fetched with a plain `TcpStream` from a thread that has
//! joined the node's namespace (the endpoint listens on that namespace's
//! loopback). See harness/mod.rs for the run-book.

mod harness;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use harness::{qgate_bin, Lab};

const UP: Duration = Duration::from_secs(20);
const PORT: u16 = 9469;

/// Sends `request` to 127.0.0.1:`port` inside network namespace `ns` and
/// returns the whole answer (the server closes after one reply).
fn http_in(ns: &str, port: u16, request: &str) -> String {
    let (ns, request) = (ns.to_string(), request.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace's file");
        // SAFETY: setns moves only this thread (which ends after the
        // request) into the namespace; the descriptor is valid for the call.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connects to the endpoint");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("a whole UTF-8 answer");
        out
    })
    .join()
    .expect("the request thread")
}

/// Scrapes /metrics: checks the status line and content type, returns the body.
fn scrape(ns: &str) -> String {
    let answer = http_in(ns, PORT, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains(
            "\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ),
        "{head}"
    );
    body.to_string()
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the exposition text strictly enough to catch a malformed line:
/// `# HELP`/`# TYPE` lines, sample lines `name{k="v",...} value` whose name
/// belongs to a declared family, `# EOF` last. Returns (series, value).
fn parse(text: &str) -> Vec<(String, f64)> {
    let mut families = HashSet::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(matches!(kind, "HELP" | "TYPE" | "UNIT"), "{line}");
            assert!(is_name(name), "{line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap_or("");
                assert!(matches!(t, "counter" | "gauge" | "info"), "{line}");
                families.insert(name.to_string());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                for l in labels.split(',') {
                    let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{line}"));
                    assert!(is_name(k), "{line}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(is_name(name), "{line}");
        let family = name
            .strip_suffix("_total")
            .or_else(|| name.strip_suffix("_info"))
            .filter(|f| families.contains(*f))
            .unwrap_or(name);
        assert!(families.contains(family), "{line}: no # TYPE for it");
        samples.push((series.to_string(), value));
    }
    samples
}

fn value(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .unwrap_or_else(|| panic!("no {series} in {samples:?}"))
        .1
}

#[test]
fn metrics_endpoint_reports_links_and_traffic() {
    let mut lab = Lab::new("m");
    let na = lab.add_host("a", &["198.18.60.1/24"]);
    let nb = lab.add_host("b", &["198.18.60.2/24"]);
    let a = lab.add_node("a", &na, "198.18.60.1:7300");
    let b = lab.add_node("b", &nb, "198.18.60.2:7300");
    let ub = lab.nodes[b].uri.clone();
    lab.nodes[a].set_peers(&[&ub]);
    for i in [a, b] {
        lab.nodes[i].edit_config(|t| {
            let on = t.replacen(
                &format!("# metrics = \"127.0.0.1:{PORT}\""),
                &format!("metrics = \"127.0.0.1:{PORT}\""),
                1,
            );
            assert_ne!(on, t, "the init template has a metrics line");
            on
        });
    }
    lab.start_all();
    assert!(lab.wait_ping(a, b, UP), "ping a -> b");

    let first = parse(&scrape(&na));
    assert!(
        value(&first, "qgate_links{state=\"up\"}") >= 1.0,
        "{first:?}"
    );
    let series = |s: &str| value(&first, s);
    series("qgate_uptime_seconds");
    series("qgate_dht_table_entries");
    series("qgate_relay_cells_forwarded_total");
    series("qgate_drops_total{reason=\"no_route\"}");
    series("qgate_cell_drops_total{reason=\"forged\"}");
    series("qgate_circuits_built");

    let ab = lab.nodes[b].address.clone();
    lab.sh_ok(&na, &format!("ping -6 -c 5 -i 0.2 -s 1000 {ab}"));
    let second = parse(&scrape(&na));
    for s in [
        "qgate_link_packets_total{direction=\"tx\"}",
        "qgate_link_packets_total{direction=\"rx\"}",
        "qgate_link_bytes_total{direction=\"tx\"}",
        "qgate_uptime_seconds",
    ] {
        assert!(
            value(&second, s) > value(&first, s),
            "{s}: {} then {}",
            value(&first, s),
            value(&second, s)
        );
    }
    // Five 1000-byte pings and their answers went over the link.
    let rx = |v: &[(String, f64)]| value(v, "qgate_link_bytes_total{direction=\"rx\"}");
    assert!(
        rx(&second) - rx(&first) >= 5000.0,
        "{} then {}",
        rx(&first),
        rx(&second)
    );
    // b answers too, and counts the same link.
    let on_b = parse(&scrape(&nb));
    assert!(value(&on_b, "qgate_links{state=\"up\"}") >= 1.0);
    assert!(value(&on_b, "qgate_link_packets_total{direction=\"rx\"}") >= 5.0);

    // Anything but GET /metrics is refused.
    let other = http_in(&na, PORT, "GET / HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
    let post = http_in(
        &na,
        PORT,
        "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");

    // A second node wanting the same address stops at start, with one line
    // naming the key; a non-loopback address is a config error.
    let c = lab.add_node("c", &na, "198.18.60.1:7301");
    let cfg = lab.nodes[c].config.clone();
    let text = std::fs::read_to_string(&cfg).unwrap();
    for (line, code, says) in [
        (format!("metrics = \"127.0.0.1:{PORT}\""), 1, "in use"),
        (
            format!("metrics = \"0.0.0.0:{PORT}\""),
            2,
            "not a loopback address",
        ),
    ] {
        std::fs::write(
            &cfg,
            text.replacen(&format!("# metrics = \"127.0.0.1:{PORT}\""), &line, 1),
        )
        .unwrap();
        let out = lab.sh(
            &na,
            &format!("{} run --config {}", qgate_bin(), cfg.display()),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{line}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("metrics") && err.contains(says), "{err}");
    }
    // Node a is unharmed.
    assert!(value(&parse(&scrape(&na)), "qgate_links{state=\"up\"}") >= 1.0);
}
