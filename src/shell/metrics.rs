//! `metrics = "127.0.0.1:9469"`: the counters `qgate status` shows, served
//! as `GET /metrics` in the OpenMetrics text format (which Prometheus reads)
//! on a loopback address, for dashboards that already scrape the host.
//!
//! Each scrape takes one [`Snapshot`]: `Node::status` and
//! `Node::closed_links` under one hold of the node lock, as long as `qgate
//! status` holds it, on tokio's blocking pool (never on the data path). A
//! fresh `prometheus_client` registry is filled from it and encoded after
//! the lock is released. Counters are sums that only grow: the traffic and
//! drops of live links plus those of links already removed. Labels take
//! only fixed values (link state, direction, drop reason), never a node ID
//! or address, so the number of series is bounded.
//!
//! The HTTP side is a few lines over tokio rather than hyper or axum: it
//! answers one GET from the same host, one request per connection, and an
//! HTTP stack would be most of the code it pulls in. `httparse` reads the
//! request head. Bounds: [`MAX_CONNECTIONS`] at once (more are answered 503
//! and closed), a head of at most [`MAX_HEAD`] bytes within
//! [`READ_TIMEOUT`], the reply written within [`WRITE_TIMEOUT`].

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proto::node::{ClosedLinks, LinkState};
use crate::proto::NodeStatus;

/// The port the `qgate init` template suggests.
pub const DEFAULT_PORT: u16 = 9469;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 4;
/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a client has to take the reply.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// What `text::encode` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Checks the `metrics` key's value: `IP:PORT` on a loopback address, port
/// not 0. The endpoint has no authentication, so it is never offered to
/// other hosts.
pub fn check_addr(value: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = value.parse().map_err(|_| {
        format!("{value:?} is not IP:PORT (e.g. \"127.0.0.1:{DEFAULT_PORT}\" or \"[::1]:{DEFAULT_PORT}\")")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{value:?} is not a loopback address: the metrics endpoint has no authentication, so only 127.0.0.0/8 or [::1] are accepted (scrape through a local agent or a tunnel)"
        ));
    }
    if addr.port() == 0 {
        return Err(format!(
            "{value:?}: port 0 would be a random port no scraper can find"
        ));
    }
    Ok(addr)
}

/// Binds the metrics address (at start, before the TUN exists, so a port in
/// use stops the node with a clear error).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let l = TcpListener::bind(addr).with_context(|| {
        format!("metrics = \"{addr}\": cannot listen there (another qgate or exporter on that port? pick another or remove the key)")
    })?;
    l.set_nonblocking(true)
        .context("metrics: setting the socket non-blocking")?;
    Ok(l)
}

/// What one scrape reports, taken under one hold of the node lock.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// What `qgate status` reports.
    pub status: NodeStatus,
    /// Counters of links removed since start.
    pub closed: ClosedLinks,
    /// Holds of the node's lock over 1 ms, by holder (the shell counts
    /// them; `qgate status` shows them as `data_path.long_holds`).
    pub long_holds: Vec<qgate_api::LockHolds>,
}

/// Takes a [`Snapshot`] (locks the node; called on the blocking pool).
pub type Take = Box<dyn Fn() -> Snapshot + Send + Sync>;

/// Everything the endpoint needs: how to take a snapshot, and what does
/// not change while the node runs.
pub struct Exporter {
    /// Takes the snapshot.
    pub take: Take,
    /// When the node started.
    pub started: Instant,
    /// `node` or `relay`.
    pub role: &'static str,
    /// The security preset's name.
    pub preset: String,
}

impl Exporter {
    /// One scrape: a snapshot, encoded.
    pub fn scrape(&self) -> Result<String, fmt::Error> {
        let snap = (self.take)();
        encode(&snap, self.started.elapsed(), self.role, &self.preset)
    }
}

/// A label set with one fixed-valued label.
type One = [(&'static str, &'static str); 1];

/// A count as a gauge's value.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn state_name(s: LinkState) -> &'static str {
    match s {
        LinkState::Connecting => "connecting",
        LinkState::Verifying => "verifying",
        LinkState::Up => "up",
        LinkState::Down => "down",
    }
}

/// Encodes a snapshot in the OpenMetrics text format (ending in `# EOF`).
pub fn encode(
    snap: &Snapshot,
    uptime: Duration,
    role: &'static str,
    preset: &str,
) -> Result<String, fmt::Error> {
    let st = &snap.status;
    let mut r = Registry::with_prefix("qgate");
    r.register(
        "node",
        "This node's version, role and security preset",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("role", role.to_string()),
            ("preset", preset.to_string()),
        ]),
    );
    let up: Gauge<f64, AtomicU64> = Gauge::default();
    up.set(uptime.as_secs_f64());
    r.register("uptime_seconds", "Seconds since the node started", up);

    let links: Family<One, Gauge> = Family::default();
    for s in [
        LinkState::Connecting,
        LinkState::Verifying,
        LinkState::Up,
        LinkState::Down,
    ] {
        let n = st.links.iter().filter(|l| l.state == s).count();
        links
            .get_or_create(&[("state", state_name(s))])
            .set(clamp(n as u64));
    }
    r.register("links", "Links by state", links);

    let (relay, rt, d) = (&st.relay, &st.routing, &st.dht);
    let gauges = [
        (
            "record_seq",
            "Sequence number of the node's signed record",
            st.record_seq,
        ),
        (
            "circuits_built",
            "Circuits this node built that are open now",
            st.circuits as u64,
        ),
        (
            "relay_enabled",
            "1 when the node relays for others",
            u64::from(relay.enabled),
        ),
        (
            "relay_circuits",
            "Circuits carried now as relay or destination",
            relay.circuits as u64,
        ),
        ("routing_relay_pool", "Relays known", rt.pool as u64),
        (
            "routing_usable_relays",
            "Usable relays, as last counted",
            rt.usable_relays as u64,
        ),
        (
            "routing_direct_destinations",
            "Destinations sent direct for want of relays",
            rt.direct_fallbacks as u64,
        ),
        (
            "routing_unreachable_destinations",
            "Destinations unreachable for want of relays",
            rt.unreachable as u64,
        ),
        (
            "dht_table_entries",
            "Nodes in the DHT routing table",
            st.table_entries as u64,
        ),
        (
            "data_path_busy_percent",
            "Share of recent time the data path worked rather than waited for packets",
            u64::from(st.data_path.busy_percent),
        ),
        (
            "compression_paused",
            "1 while compression is paused because the data path is the limit",
            u64::from(st.data_path.compression_paused),
        ),
        (
            "data_path_longest_lock_wait_microseconds",
            "Longest wait of the data path for the node's lock since start",
            st.data_path.longest_lock_wait_us,
        ),
        (
            "data_plane_links",
            "Links whose packets the data threads seal and open without the node",
            st.data_path.plane_links,
        ),
        (
            "data_path_threads",
            "Data-path threads the node's links are spread over (link.workers)",
            st.data_path.worker_links.len().max(1) as u64,
        ),
        (
            "data_plane_circuits",
            "Circuits relayed or ending here whose cells the data threads handle without the node",
            st.data_path.plane_circuits,
        ),
    ];
    for (name, help, v) in gauges {
        let g: Gauge = Gauge::default();
        g.set(clamp(v));
        r.register(name, help, g);
    }
    let counters = [
        (
            "links_closed",
            "Links removed since start",
            snap.closed.links,
        ),
        (
            "relay_circuits_carried",
            "Circuits carried since start",
            relay.circuits_total,
        ),
        (
            "relay_cells_forwarded",
            "Cells forwarded as relay",
            relay.cells_forwarded,
        ),
        (
            "relay_bytes_forwarded",
            "Bytes of cells forwarded as relay",
            relay.bytes_forwarded,
        ),
        ("relay_refused", "CREATE or EXTEND refused", relay.refused),
        (
            "compression_pauses",
            "Times compression paused because the data path was the limit",
            st.data_path.compression_pauses,
        ),
        (
            "data_path_long_lock_waits",
            "Times the data path waited over 1 ms for the node's lock",
            st.data_path.long_lock_waits,
        ),
        ("dht_lookups", "Lookups started", d.lookups),
        (
            "dht_lookups_found",
            "Lookups that found what they looked for",
            d.lookups_found,
        ),
        (
            "dht_lookups_refused",
            "Lookups refused (too many running)",
            d.lookups_refused,
        ),
        ("dht_requests_in", "Requests answered", d.requests_in),
        (
            "dht_replies_in",
            "Replies received and matched",
            d.replies_in,
        ),
        ("dht_messages_out", "Messages sent", d.messages_out),
        ("dht_timeouts", "Requests that timed out", d.timeouts),
        (
            "dht_liars",
            "Nodes caught passing on forged records",
            d.liars,
        ),
    ];
    for (name, help, v) in counters {
        let c: Counter = Counter::default();
        c.inc_by(v);
        r.register(name, help, c);
    }

    // Sums over live links and removed ones, so they only grow.
    let mut total = snap.closed.counters;
    let mut drops = snap.closed.drops;
    drops.add(&st.drops);
    for l in &st.links {
        total.add(&l.counters);
        drops.add(&l.drops);
    }
    let dir = |tx: u64, rx: u64| vec![("tx", tx), ("rx", rx)];
    let families = [
        (
            "link_packets",
            "Application packets over links",
            "direction",
            dir(total.tx_packets, total.rx_packets),
        ),
        (
            "link_bytes",
            "Application bytes over links (before compression)",
            "direction",
            dir(total.tx_bytes, total.rx_bytes),
        ),
        (
            "link_wire_bytes",
            "Bytes those packets took on the links (after compression)",
            "direction",
            dir(total.tx_wire_bytes, total.rx_wire_bytes),
        ),
        (
            "link_compressed_packets",
            "Packets sent or received compressed",
            "direction",
            dir(total.tx_compressed, total.rx_compressed),
        ),
        (
            "drops",
            "Packets and datagrams dropped, by reason (the node's and every link's)",
            "reason",
            drops.named(),
        ),
        (
            "cell_drops",
            "Cells dropped, by reason",
            "reason",
            relay.drops.named(),
        ),
        (
            "dht_bytes",
            "DHT message bytes",
            "direction",
            dir(d.bytes_out, d.bytes_in),
        ),
        (
            "dht_messages_refused",
            "DHT messages refused, by reason",
            "reason",
            vec![
                ("malformed", d.malformed),
                ("rate_limited", d.rate_limited),
                ("unexpected", d.unexpected),
            ],
        ),
        (
            "dht_records_refused",
            "DHT records or values refused, by reason",
            "reason",
            vec![
                ("forged", d.forged_records),
                ("expired", d.expired_records),
                ("stale", d.stale_records),
                ("oversized", d.oversized_records),
                ("store_full", d.store_full),
            ],
        ),
        (
            "node_lock_long_holds",
            "Holds of the node's lock over 1 ms, by holder: what packets may have waited behind",
            "holder",
            snap.long_holds
                .iter()
                .map(|h| (h.holder.as_str(), h.count))
                .collect(),
        ),
    ];
    for (name, help, label, values) in families {
        let f: Family<One, Counter> = Family::default();
        for (v, n) in values {
            f.get_or_create(&[(label, v)]).inc_by(n);
        }
        r.register(name, help, f);
    }

    let mut out = String::with_capacity(16 * 1024);
    text::encode(&mut out, &r)?;
    Ok(out)
}

/// What a request head asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    HeadTooLarge,
}

/// Reads a request head as far as it has come: None while it is
/// incomplete and within [`MAX_HEAD`].
fn answer_for(head: &[u8]) -> Option<Answer> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() >= MAX_HEAD => Some(Answer::HeadTooLarge),
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(_)) => Some(match (req.method, req.path) {
            (Some("GET"), Some(path)) => {
                let path = path.split_once('?').map_or(path, |(p, _)| p);
                if path == "/metrics" {
                    Answer::Metrics
                } else {
                    Answer::NotFound
                }
            }
            _ => Answer::MethodNotAllowed,
        }),
        Err(httparse::Error::TooManyHeaders) => Some(Answer::HeadTooLarge),
        Err(_) => Some(Answer::BadRequest),
    }
}

fn response(status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if status.starts_with("405") { "Allow: GET\r\n" } else { "" },
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics endpoint off: {e}");
            return;
        }
    };
    if let Ok(a) = listener.local_addr() {
        tracing::info!("metrics at http://{a}/metrics");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // E.g. out of descriptors: don't spin.
                tracing::debug!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let _ = stream.try_write(&response(
                "503 Service Unavailable",
                "text/plain",
                b"busy\n",
            ));
            tracing::debug!("metrics: {MAX_CONNECTIONS} connections open, one refused");
            continue;
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, exporter).await {
                tracing::debug!("metrics connection: {e}");
            }
            drop(permit);
        });
    }
}

async fn serve_one(mut stream: TcpStream, exporter: Arc<Exporter>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let answer = tokio::time::timeout(READ_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            let room = (MAX_HEAD - head.len()).min(buf.len());
            let n = stream.read(&mut buf[..room]).await?;
            if n == 0 {
                return Ok(None);
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(a) = answer_for(&head) {
                return Ok::<_, std::io::Error>(Some(a));
            }
        }
    })
    .await;
    let answer = match answer {
        Ok(Ok(Some(a))) => a,
        // Closed early, failed, or too slow: nothing to answer.
        Ok(Ok(None)) | Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
    };
    let plain = "text/plain; charset=utf-8";
    let reply = match answer {
        Answer::Metrics => match tokio::task::spawn_blocking(move || exporter.scrape()).await {
            Ok(Ok(body)) => response("200 OK", CONTENT_TYPE, body.as_bytes()),
            _ => response("500 Internal Server Error", plain, b"encoding failed\n"),
        },
        Answer::NotFound => response("404 Not Found", plain, b"only /metrics here\n"),
        Answer::MethodNotAllowed => response("405 Method Not Allowed", plain, b"only GET\n"),
        Answer::BadRequest => response("400 Bad Request", plain, b"bad request\n"),
        Answer::HeadTooLarge => response(
            "431 Request Header Fields Too Large",
            plain,
            b"request head too large\n",
        ),
    };
    match tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::node::{Drops, LinkCounters};

    #[test]
    fn only_loopback_addresses_are_accepted() {
        for ok in ["127.0.0.1:9469", "127.3.2.1:1", "[::1]:9469"] {
            assert_eq!(check_addr(ok).map(|a| a.to_string()), Ok(ok.to_string()));
        }
        for bad in [
            "0.0.0.0:9469",
            "[::]:9469",
            "192.0.2.7:9469",
            "[::ffff:127.0.0.1]:9469",
            "127.0.0.1:0",
            "localhost:9469",
            "127.0.0.1",
        ] {
            let e = check_addr(bad).unwrap_err();
            assert!(!e.contains('\n') && e.contains(bad), "{bad}: {e}");
        }
        let path = std::path::Path::new("/etc/qgate/qgate.toml");
        let e = super::super::config::parse("state_dir = '/x'\nmetrics = '0.0.0.0:9469'\n", path)
            .unwrap_err();
        let line = e.to_string();
        assert_eq!(e.key, "metrics");
        assert!(
            line.contains("not a loopback address") && !line.contains('\n'),
            "{line}"
        );
        let c = super::super::config::parse("state_dir = '/x'\nmetrics = '[::1]:9469'\n", path)
            .expect("loopback is accepted");
        assert_eq!(c.metrics, Some("[::1]:9469".parse().expect("an address")));
        let c = super::super::config::parse("state_dir = '/x'\n", path).expect("parses");
        assert_eq!(c.metrics, None);
    }

    #[test]
    fn heads_are_answered_by_method_and_path() {
        let a = |s: &str| answer_for(s.as_bytes());
        assert_eq!(
            a("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Answer::Metrics)
        );
        assert_eq!(
            a("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Answer::Metrics)
        );
        assert_eq!(a("GET / HTTP/1.1\r\n\r\n"), Some(Answer::NotFound));
        assert_eq!(a("GET /metricsx HTTP/1.1\r\n\r\n"), Some(Answer::NotFound));
        assert_eq!(
            a("POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Answer::MethodNotAllowed)
        );
        assert_eq!(a("GET /metrics HTTP/1.1\r\nHost"), None);
        assert_eq!(a("\x01\x02 garbage\r\n\r\n"), Some(Answer::BadRequest));
        let long = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(a(&long), Some(Answer::HeadTooLarge));
        let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            a(&format!("GET /metrics HTTP/1.1\r\n{many}\r\n")),
            Some(Answer::HeadTooLarge)
        );
    }

    /// The value of the one sample line starting with `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn closed_links_keep_counting() {
        let status = NodeStatus {
            node_id: "ab".into(),
            address: "fcab::1".parse().expect("an address"),
            record_seq: 3,
            endpoints: Vec::new(),
            dht: Default::default(),
            table_entries: 5,
            drops: Drops {
                no_route: 4,
                ..Drops::default()
            },
            circuits: 1,
            relay: Default::default(),
            routing: crate::proto::node::RoutingSummary {
                default: "direct".into(),
                pool: 0,
                usable_relays: 0,
                needed: 0,
                direct_fallbacks: 0,
                unreachable: 0,
                summary: String::new(),
            },
            links: Vec::new(),
            data_path: Default::default(),
        };
        let closed = ClosedLinks {
            links: 2,
            counters: LinkCounters {
                tx_bytes: 1000,
                rx_packets: 9,
                ..LinkCounters::default()
            },
            drops: Drops {
                no_route: 1,
                replay: 2,
                ..Drops::default()
            },
        };
        let long_holds = vec![qgate_api::LockHolds {
            holder: qgate_api::LockHolder::Control,
            count: 3,
            longest_us: 2_500,
        }];
        let snap = Snapshot {
            status,
            closed,
            long_holds,
        };
        let text = encode(&snap, Duration::from_secs(7), "node", "balanced").expect("encodes");
        assert_eq!(
            sample(&text, "qgate_links{state=\"up\"}"),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "qgate_links_closed_total"),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "qgate_link_bytes_total{direction=\"tx\"}"),
            Some(1000.0)
        );
        assert_eq!(
            sample(&text, "qgate_link_packets_total{direction=\"rx\"}"),
            Some(9.0)
        );
        assert_eq!(
            sample(&text, "qgate_drops_total{reason=\"no_route\"}"),
            Some(5.0)
        );
        assert_eq!(
            sample(&text, "qgate_drops_total{reason=\"replay\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "qgate_node_lock_long_holds_total{holder=\"control\"}"
            ),
            Some(3.0),
            "{text}"
        );
        assert_eq!(sample(&text, "qgate_dht_table_entries"), Some(5.0));
        assert_eq!(sample(&text, "qgate_uptime_seconds"), Some(7.0));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
