//! Human-readable rendering of the control API's typed answers (`qgate
//! status`, `peers`, `circuits`, `lookup`).

use qgate_api::{
    CircuitState, Circuits, Counters, LinkState, Lookup, NodeId, Peers, Role, RouteOutcome, Status,
};

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

/// The non-zero counters, `name=n` by name, or `none`.
fn drops(c: &Counters) -> String {
    let parts: Vec<String> = c
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

/// A counter's value, `null` when the node did not report it.
fn count(c: &Counters, name: &str) -> String {
    c.get(name)
        .map(u64::to_string)
        .unwrap_or_else(|| "null".into())
}

/// Renders `qgate status` for a terminal.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!("node      {}\n", st.node_id));
    out.push_str(&format!("address   {}\n", st.address));
    out.push_str(&format!(
        "uptime    {}   version {}\n",
        duration(st.uptime_secs),
        st.version
    ));
    match &st.tun {
        None => out.push_str(&format!(
            "listen    {}   role relay (no TUN: forwards only)\n",
            st.listen
        )),
        Some(tun) => out.push_str(&format!(
            "listen    {}   tun {} (mtu {})   role {}   preset {}\n",
            st.listen,
            tun.name,
            tun.mtu,
            match st.role {
                Role::Node => "node",
                Role::Relay => "relay",
            },
            st.preset,
        )),
    }
    let rt = &st.routing;
    let mut line = format!(
        "routing   {}   (default {}, relay pool {})",
        rt.summary, rt.default, rt.pool
    );
    let (d, u) = (rt.direct_fallbacks, rt.unreachable);
    if d + u > 0 {
        line.push_str(&format!(
            "\n          destinations without a circuit: {d} sent direct, {u} unreachable (`qgate circuits`)"
        ));
    }
    out.push_str(&line);
    out.push('\n');
    out.push_str(&format!("drops     {}\n", drops(&st.drops)));
    let eps: Vec<String> = st.endpoints.iter().map(|e| e.to_string()).collect();
    out.push_str(&format!(
        "record    seq {}   endpoints {}\n",
        st.record_seq,
        if eps.is_empty() {
            "(none yet)".into()
        } else {
            eps.join(" ")
        }
    ));
    out.push_str(&format!(
        "dht       {} known nodes   lookups {} ({} found)   records refused: forged {} expired {} stale {} oversized {}\n",
        st.table_entries,
        count(&st.dht, "lookups"),
        count(&st.dht, "lookups_found"),
        count(&st.dht, "forged_records"),
        count(&st.dht, "expired_records"),
        count(&st.dht, "stale_records"),
        count(&st.dht, "oversized_records"),
    ));
    let r = &st.relay;
    out.push_str(&format!(
        "circuits  {} built here   relay {}: carrying {} ({} since start), forwarded {} cells / {}, refused {}\n          cell drops {}\n",
        st.circuits,
        if r.enabled { "on" } else { "off" },
        r.circuits,
        r.circuits_total,
        r.cells_forwarded,
        bytes(r.bytes_forwarded as f64),
        r.refused,
        drops(&r.drops),
    ));
    let dp = &st.data_path;
    let threads = match dp.worker_links.len() {
        0 | 1 => "the data thread".to_string(),
        n => format!(
            "{n} data threads ({} links)",
            dp.worker_links
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" + ")
        ),
    };
    out.push_str(&format!(
        "data path {}% busy   compression {} (paused {} times)   {} and {} on {threads}\n",
        dp.busy_percent,
        if dp.compression_paused {
            "paused: the data path, not the link, is the limit"
        } else {
            "on where allowed"
        },
        dp.compression_pauses,
        noun(dp.plane_links, "link", "links"),
        noun(dp.plane_circuits, "circuit", "circuits"),
    ));
    out.push_str(&format!(
        "          waited for the node over 1 ms: {} times (longest {:.1} ms)\n",
        dp.long_lock_waits,
        dp.longest_lock_wait_us as f64 / 1000.0,
    ));
    if !dp.long_holds.is_empty() {
        let holds: Vec<String> = dp
            .long_holds
            .iter()
            .map(|h| {
                format!(
                    "{} {} (longest {:.1} ms)",
                    h.holder.as_str(),
                    h.count,
                    h.longest_us as f64 / 1000.0
                )
            })
            .collect();
        out.push_str(&format!(
            "          held the node over 1 ms: {}\n",
            holds.join(", ")
        ));
    }
    let up = st.links.iter().filter(|l| l.state == LinkState::Up).count();
    out.push_str(&format!("links     {up} up of {}\n", st.links.len()));
    for l in &st.links {
        let addr = l
            .address
            .map(|a| a.to_string())
            .unwrap_or_else(|| "(unknown)".into());
        let hs = l
            .last_handshake_secs
            .map(|t| format!("{} ago", duration(t)))
            .unwrap_or_else(|| "never".into());
        out.push_str(&format!(
            "  {addr}  {}{}\n    endpoint {}  handshake {hs}  mtu {}\n    tx {} pkts {} (wire/app {:.2})  rx {} pkts {} (wire/app {:.2})  compression {}\n    drops {}\n",
            l.state.as_str(),
            if l.configured { " (configured)" } else { "" },
            l.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            l.mtu,
            l.tx_packets,
            bytes(l.tx_bytes as f64),
            l.tx_compression_ratio,
            l.rx_packets,
            bytes(l.rx_bytes as f64),
            l.rx_compression_ratio,
            if l.compression { "on" } else { "off" },
            drops(&l.drops),
        ));
    }
    out
}

/// Renders `qgate peers` for a terminal.
pub fn render_peers(v: &Peers) -> String {
    let mut out = format!(
        "{} known nodes in {} buckets\n",
        v.entries.iter().filter(|e| !e.replacement).count(),
        v.buckets
    );
    out.push_str("bucket  address                                  source   last seen  link        endpoints\n");
    for e in &v.entries {
        let seen = e
            .last_seen_secs
            .map(|t| format!("{} ago", duration(t)))
            .unwrap_or_else(|| "-".into());
        let eps: Vec<String> = e.endpoints.iter().map(|x| x.to_string()).collect();
        out.push_str(&format!(
            "{:>6}  {:<39}  {:<7}  {:>9}  {:<10}  {}{}\n",
            e.bucket,
            e.address.to_string(),
            e.source.as_str(),
            seen,
            e.link.map(LinkState::as_str).unwrap_or("-"),
            eps.join(" "),
            if e.replacement { "  (replacement)" } else { "" },
        ));
    }
    out
}

/// Renders `qgate lookup` for a terminal.
pub fn render_lookup(v: &Lookup) -> String {
    let how = if v.already_known {
        "already known here (no query sent)".to_string()
    } else {
        format!(
            "in {} hops, {} queries, {:.0} ms",
            v.hops, v.queries, v.elapsed_ms
        )
    };
    if v.no_contacts {
        return "not found: no node to ask (is a peer linked? see `qgate status`)\n".to_string();
    }
    if !v.found {
        return format!("not found ({})\n", how.trim_start_matches("in "));
    }
    let Some(r) = &v.record else {
        return format!("found     {how} (its record did not parse)\n");
    };
    let eps: Vec<String> = r.endpoints.iter().map(|e| e.to_string()).collect();
    format!(
        "node      {}\naddress   {}\nendpoints {}\nseq       {}   expires {}   roles {}\nfound     {how}\n",
        r.node_id,
        r.address,
        eps.join(" "),
        r.seq,
        r.expires
            .map(|e| e.to_string())
            .unwrap_or_else(|| "null".into()),
        r.roles,
    )
}

/// The first 16 hex digits of a node ID, `-` for none.
fn short(id: Option<&NodeId>) -> String {
    id.map(|x| x.to_string().chars().take(16).collect())
        .unwrap_or_else(|| "-".into())
}

/// Renders `qgate circuits` for a terminal.
pub fn render_circuits(v: &Circuits) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "routing: {}   (default {})\n",
        v.routing.summary, v.routing.default
    ));
    out.push_str(&format!(
        "built here: {}   (relay pool: {} known relays)\n",
        v.circuits.len(),
        v.pool
    ));
    for c in &v.circuits {
        let hops: Vec<String> = c.hops.iter().map(|h| short(Some(h))).collect();
        out.push_str(&format!(
            "  #{} to {}  {}  age {}  mtu {}\n    via {}\n    tx {}  rx {}\n",
            c.id,
            c.destination,
            match c.state {
                CircuitState::Building => "building",
                CircuitState::Ready => "ready",
            },
            duration(c.age_secs),
            c.mtu,
            hops.join(" -> "),
            bytes(c.tx_bytes as f64),
            bytes(c.rx_bytes as f64),
        ));
    }
    out.push_str(&format!("carried as relay: {}\n", v.relayed.len()));
    for r in &v.relayed {
        out.push_str(&format!(
            "  {} -> {}  age {}  forward {}  backward {}\n",
            short(r.prev.as_ref()),
            short(r.next.as_ref()),
            duration(r.age_secs),
            bytes(r.fwd_bytes as f64),
            bytes(r.bwd_bytes as f64),
        ));
    }
    if !v.no_circuit.is_empty() {
        out.push_str(&format!("no circuit: {}\n", v.no_circuit.len()));
    }
    for n in &v.no_circuit {
        let (usable, needed) = (n.usable_relays, n.needed);
        let relays = format!(
            "{usable} usable relay{}, {needed} needed",
            if usable == 1 { "" } else { "s" }
        );
        let why = match n.outcome {
            RouteOutcome::Direct => format!("direct: {relays}"),
            RouteOutcome::DirectReply => "direct: it talks to us over a direct link".to_string(),
            RouteOutcome::Unreachable => {
                format!("unreachable: {relays} (this route never goes direct)")
            }
        };
        out.push_str(&format!(
            "  to {}  {why}  idle {}\n",
            n.destination,
            duration(n.idle_secs),
        ));
    }
    out.push_str(&format!("ending here: {}\n", v.inbound.len()));
    for i in &v.inbound {
        out.push_str(&format!(
            "  from {} (via {})  age {}  rx {}  tx {}\n",
            i.source
                .map(|s| s.to_string())
                .unwrap_or_else(|| "(not authenticated)".into()),
            short(i.prev.as_ref()),
            duration(i.age_secs),
            bytes(i.rx_bytes as f64),
            bytes(i.tx_bytes as f64),
        ));
    }
    out
}

/// `n` and the noun in the number it takes ("1 link", "3 links").
fn noun(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lookup(v: serde_json::Value) -> Lookup {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn lookup_says_when_the_record_was_already_known() {
        let id = "ab".repeat(32);
        let record = json!({"node_id": id, "address": "fcab::", "link_key": "x", "endpoints": ["198.18.0.1:7300"], "seq": 3, "expires": 9, "roles": 1});
        let known = lookup(
            json!({"found": true, "hops": 0, "queries": 0, "elapsed_ms": 0.0, "already_known": true, "no_contacts": false, "record": record}),
        );
        let text = render_lookup(&known);
        assert!(text.contains("found     already known here (no query sent)\n"));
        assert!(text.contains(&format!("node      {id}\n")), "{text}");
        assert!(
            text.contains("seq       3   expires 9   roles 1\n"),
            "{text}"
        );
        let asked = lookup(
            json!({"found": true, "hops": 2, "queries": 5, "elapsed_ms": 12.4, "already_known": false, "no_contacts": false, "record": record}),
        );
        assert!(render_lookup(&asked).contains("found     in 2 hops, 5 queries, 12 ms\n"));
        let missing = lookup(
            json!({"found": false, "hops": 3, "queries": 9, "elapsed_ms": 40.0, "already_known": false, "no_contacts": false}),
        );
        assert_eq!(
            render_lookup(&missing),
            "not found (3 hops, 9 queries, 40 ms)\n"
        );
    }

    #[test]
    fn routing_line_says_what_and_why() {
        let st: Status = serde_json::from_value(json!({
            "api": 2, "node_id": "ab".repeat(32), "address": "fcab::", "version": "0.1.0",
            "uptime_secs": 75.0, "listen": "0.0.0.0:7300", "tun": {"name": "qg0", "mtu": 1280},
            "role": "node", "preset": "balanced", "record_seq": 4, "endpoints": [],
            "dht": {"lookups": 2, "lookups_found": 1}, "table_entries": 3,
            "drops": {"no_route": 2, "malformed": 0, "auth_failed": 1}, "circuits": 0,
            "relay": {"enabled": true, "circuits": 0, "circuits_total": 0, "bytes_forwarded": 2048,
                      "cells_forwarded": 2, "refused": 0, "drops": {}},
            "routing": {"summary": "direct: 0 usable relays, 1 needed", "default": "1..2 or direct",
                        "pool": 1, "usable_relays": 0, "needed": 1, "direct_fallbacks": 1, "unreachable": 0},
            "links": [],
        }))
        .unwrap();
        let out = render(&st);
        assert!(out.contains("routing   direct: 0 usable relays, 1 needed   (default 1..2 or direct, relay pool 1)\n"), "{out}");
        assert!(out.contains("1 sent direct, 0 unreachable"), "{out}");
        assert!(out.contains("uptime    1m15s   version 0.1.0\n"), "{out}");
        assert!(
            out.contains("tun qg0 (mtu 1280)   role node   preset balanced\n"),
            "{out}"
        );
        // Non-zero drops, by name.
        assert!(
            out.contains("drops     auth_failed=1 no_route=2\n"),
            "{out}"
        );
        assert!(
            out.contains("lookups 2 (1 found)   records refused: forged null"),
            "{out}"
        );
        assert!(out.contains("forwarded 2 cells / 2.0 KiB"), "{out}");
    }
}
