//! Human-readable rendering of `qgate status`.

use serde_json::Value;

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn drops(v: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = v.as_object() {
        for (k, n) in m {
            if n.as_u64().unwrap_or(0) > 0 {
                parts.push(format!("{k}={n}"));
            }
        }
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

/// Renders the status object for a terminal.
pub fn render(st: &Value) -> String {
    let g = |k: &str| st.get(k).cloned().unwrap_or(Value::Null);
    let s = |v: Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    let mut out = String::new();
    out.push_str(&format!("node      {}\n", s(g("node_id"))));
    out.push_str(&format!("address   {}\n", s(g("address"))));
    out.push_str(&format!(
        "uptime    {}   version {}\n",
        duration(g("uptime_secs").as_f64().unwrap_or(0.0)),
        s(g("version"))
    ));
    if st["tun"].is_null() {
        out.push_str(&format!(
            "listen    {}   role relay (no TUN: forwards only)\n",
            s(g("listen"))
        ));
    } else {
        out.push_str(&format!(
            "listen    {}   tun {} (mtu {})   role {}   preset {}\n",
            s(g("listen")),
            s(st["tun"]["name"].clone()),
            st["tun"]["mtu"],
            s(g("role")),
            s(g("preset")),
        ));
    }
    let rt = &st["routing"];
    if !rt.is_null() {
        let mut line = format!(
            "routing   {}   (default {}, relay pool {})",
            rt["summary"].as_str().unwrap_or("?"),
            rt["default"].as_str().unwrap_or("?"),
            rt["pool"]
        );
        let (d, u) = (
            rt["direct_fallbacks"].as_u64().unwrap_or(0),
            rt["unreachable"].as_u64().unwrap_or(0),
        );
        if d + u > 0 {
            line.push_str(&format!(
                "\n          destinations without a circuit: {d} sent direct, {u} unreachable (`qgate circuits`)"
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!("drops     {}\n", drops(&g("drops"))));
    let eps: Vec<String> = g("endpoints")
        .as_array()
        .map(|a| a.iter().map(|e| s(e.clone())).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "record    seq {}   endpoints {}\n",
        g("record_seq"),
        if eps.is_empty() {
            "(none yet)".into()
        } else {
            eps.join(" ")
        }
    ));
    out.push_str(&format!(
        "dht       {} known nodes   lookups {} ({} found)   records refused: forged {} expired {} stale {} oversized {}\n",
        g("table_entries"),
        st["dht"]["lookups"],
        st["dht"]["lookups_found"],
        st["dht"]["forged_records"],
        st["dht"]["expired_records"],
        st["dht"]["stale_records"],
        st["dht"]["oversized_records"],
    ));
    let r = &st["relay"];
    out.push_str(&format!(
        "circuits  {} built here   relay {}: carrying {} ({} since start), forwarded {} cells / {}, refused {}\n          cell drops {}\n",
        g("circuits"),
        if r["enabled"] == true { "on" } else { "off" },
        r["circuits"],
        r["circuits_total"],
        r["cells_forwarded"],
        bytes(r["bytes_forwarded"].as_f64().unwrap_or(0.0)),
        r["refused"],
        drops(&r["drops"]),
    ));
    let links = g("links");
    let links = links.as_array().cloned().unwrap_or_default();
    let up = links.iter().filter(|l| l["state"] == "up").count();
    out.push_str(&format!("links     {up} up of {}\n", links.len()));
    for l in &links {
        let addr = l["address"].as_str().unwrap_or("(unknown)");
        let hs = l["last_handshake_secs"]
            .as_f64()
            .map(|t| format!("{} ago", duration(t)))
            .unwrap_or_else(|| "never".into());
        out.push_str(&format!(
            "  {addr}  {}{}\n    endpoint {}  handshake {hs}  mtu {}\n    tx {} pkts {} (wire/app {:.2})  rx {} pkts {} (wire/app {:.2})  compression {}\n    drops {}\n",
            l["state"].as_str().unwrap_or("?"),
            if l["configured"] == true { " (configured)" } else { "" },
            l["endpoint"].as_str().unwrap_or("-"),
            l["mtu"],
            l["tx_packets"],
            bytes(l["tx_bytes"].as_f64().unwrap_or(0.0)),
            l["tx_compression_ratio"].as_f64().unwrap_or(1.0),
            l["rx_packets"],
            bytes(l["rx_bytes"].as_f64().unwrap_or(0.0)),
            l["rx_compression_ratio"].as_f64().unwrap_or(1.0),
            if l["compression"] == true { "on" } else { "off" },
            drops(&l["drops"]),
        ));
    }
    out
}

/// The strings in a JSON array.
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Renders `qgate peers` for a terminal.
pub fn render_peers(v: &Value) -> String {
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "{} known nodes in {} buckets\n",
        entries.iter().filter(|e| e["replacement"] != true).count(),
        v["buckets"]
    );
    out.push_str("bucket  address                                  source   last seen  link        endpoints\n");
    for e in &entries {
        let seen = e["last_seen_secs"]
            .as_f64()
            .map(|t| format!("{} ago", duration(t)))
            .unwrap_or_else(|| "-".into());
        let eps = strings(&e["endpoints"]);
        out.push_str(&format!(
            "{:>6}  {:<39}  {:<7}  {:>9}  {:<10}  {}{}\n",
            e["bucket"].as_u64().unwrap_or(0),
            e["address"].as_str().unwrap_or("?"),
            e["source"].as_str().unwrap_or("?"),
            seen,
            e["link"].as_str().unwrap_or("-"),
            eps.join(" "),
            if e["replacement"] == true {
                "  (replacement)"
            } else {
                ""
            },
        ));
    }
    out
}

/// Renders `qgate lookup` for a terminal.
pub fn render_lookup(v: &Value) -> String {
    let how = if v["already_known"] == true {
        "already known here (no query sent)".to_string()
    } else {
        format!(
            "in {} hops, {} queries, {:.0} ms",
            v["hops"],
            v["queries"],
            v["elapsed_ms"].as_f64().unwrap_or(0.0)
        )
    };
    if v["no_contacts"] == true {
        return "not found: no node to ask (is a peer linked? see `qgate status`)\n".to_string();
    }
    if v["found"] != true {
        return format!("not found ({})\n", how.trim_start_matches("in "));
    }
    let r = &v["record"];
    let eps = strings(&r["endpoints"]);
    format!(
        "node      {}\naddress   {}\nendpoints {}\nseq       {}   expires {}   roles {}\nfound     {how}\n",
        r["node_id"].as_str().unwrap_or("?"),
        r["address"].as_str().unwrap_or("?"),
        eps.join(" "),
        r["seq"],
        r["expires"],
        r["roles"],
    )
}

fn short(v: &Value) -> String {
    v.as_str()
        .map(|x| x.chars().take(16).collect())
        .unwrap_or_else(|| "-".into())
}

/// Renders `qgate circuits` for a terminal.
pub fn render_circuits(v: &Value) -> String {
    let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let built = list("circuits");
    if let Some(summary) = v["routing"]["summary"].as_str() {
        out.push_str(&format!(
            "routing: {summary}   (default {})\n",
            v["routing"]["default"].as_str().unwrap_or("?")
        ));
    }
    out.push_str(&format!(
        "built here: {}   (relay pool: {} known relays)\n",
        built.len(),
        v["pool"]
    ));
    for c in &built {
        let hops: Vec<String> = c["hops"]
            .as_array()
            .map(|a| a.iter().map(short).collect())
            .unwrap_or_default();
        out.push_str(&format!(
            "  #{} to {}  {}  age {}  mtu {}\n    via {}\n    tx {}  rx {}\n",
            c["id"],
            c["destination"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            duration(c["age_secs"].as_f64().unwrap_or(0.0)),
            c["mtu"],
            hops.join(" -> "),
            bytes(c["tx_bytes"].as_f64().unwrap_or(0.0)),
            bytes(c["rx_bytes"].as_f64().unwrap_or(0.0)),
        ));
    }
    let relayed = list("relayed");
    out.push_str(&format!("carried as relay: {}\n", relayed.len()));
    for r in &relayed {
        out.push_str(&format!(
            "  {} -> {}  age {}  forward {}  backward {}\n",
            short(&r["prev"]),
            short(&r["next"]),
            duration(r["age_secs"].as_f64().unwrap_or(0.0)),
            bytes(r["fwd_bytes"].as_f64().unwrap_or(0.0)),
            bytes(r["bwd_bytes"].as_f64().unwrap_or(0.0)),
        ));
    }
    let none = list("no_circuit");
    if !none.is_empty() {
        out.push_str(&format!("no circuit: {}\n", none.len()));
    }
    for n in &none {
        let (usable, needed) = (n["usable_relays"].as_u64().unwrap_or(0), &n["needed"]);
        let relays = format!(
            "{usable} usable relay{}, {needed} needed",
            if usable == 1 { "" } else { "s" }
        );
        let why = match n["outcome"].as_str() {
            Some("direct") => format!("direct: {relays}"),
            Some("direct_reply") => "direct: it talks to us over a direct link".to_string(),
            Some("unreachable") => {
                format!("unreachable: {relays} (this route never goes direct)")
            }
            _ => "?".to_string(),
        };
        out.push_str(&format!(
            "  to {}  {why}  idle {}\n",
            n["destination"].as_str().unwrap_or("?"),
            duration(n["idle_secs"].as_f64().unwrap_or(0.0)),
        ));
    }
    let inbound = list("inbound");
    out.push_str(&format!("ending here: {}\n", inbound.len()));
    for i in &inbound {
        out.push_str(&format!(
            "  from {} (via {})  age {}  rx {}  tx {}\n",
            i["source"].as_str().unwrap_or("(not authenticated)"),
            short(&i["prev"]),
            duration(i["age_secs"].as_f64().unwrap_or(0.0)),
            bytes(i["rx_bytes"].as_f64().unwrap_or(0.0)),
            bytes(i["tx_bytes"].as_f64().unwrap_or(0.0)),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookup_says_when_the_record_was_already_known() {
        let record = json!({"node_id": "ab", "address": "fcab::", "endpoints": ["198.18.0.1:7300"], "seq": 3, "expires": 9, "roles": 1});
        let known = json!({"found": true, "hops": 0, "queries": 0, "elapsed_ms": 0.0, "already_known": true, "record": record});
        assert!(render_lookup(&known).contains("found     already known here (no query sent)\n"));
        let asked = json!({"found": true, "hops": 2, "queries": 5, "elapsed_ms": 12.4, "already_known": false, "record": record});
        assert!(render_lookup(&asked).contains("found     in 2 hops, 5 queries, 12 ms\n"));
        let missing = json!({"found": false, "hops": 3, "queries": 9, "elapsed_ms": 40.0, "already_known": false});
        assert_eq!(
            render_lookup(&missing),
            "not found (3 hops, 9 queries, 40 ms)\n"
        );
    }

    #[test]
    fn routing_line_says_what_and_why() {
        let st = json!({"node_id": "ab", "address": "fcab::", "routing": {
            "summary": "direct: 0 usable relays, 1 needed", "default": "1..2 or direct",
            "pool": 1, "direct_fallbacks": 1, "unreachable": 0}});
        let out = render(&st);
        assert!(out.contains("routing   direct: 0 usable relays, 1 needed   (default 1..2 or direct, relay pool 1)\n"), "{out}");
        assert!(out.contains("1 sent direct, 0 unreachable"), "{out}");
    }
}
