//! LAN discovery (off by default): nodes on one link announce themselves to
//! the IPv6 link-local multicast group ff02::7167 and link to those they
//! hear, with no configured peer at all.
//!
//! An announcement is one line: `QGLAN1 <peer URI without endpoint> <port>`.
//! It carries nothing secret (the URI is public), but it does tell the
//! segment that a node runs here — hence off by default. A forged one can
//! only make us try a handshake: the link key in the URI must complete
//! WireGuard's handshake and the node's signed record must match it before
//! anything flows.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;

use crate::proto::PeerUri;

/// The multicast group (link-local scope).
pub const GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x7167);
/// How often a node announces itself.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(30);
const MAGIC: &str = "QGLAN1";

/// Interfaces with an IPv6 link-local address (index, name), from
/// /proc/net/if_inet6, leaving out loopback and `skip` (our TUN).
fn link_local_interfaces(skip: &str) -> Vec<(u32, String)> {
    let text = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    let mut out: Vec<(u32, String)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[0].starts_with("fe80") || f[5] == "lo" || f[5] == skip {
            continue;
        }
        if let Ok(idx) = u32::from_str_radix(f[1], 16) {
            if !out.iter().any(|(i, _)| *i == idx) {
                out.push((idx, f[5].to_string()));
            }
        }
    }
    out
}

/// Binds the announcement socket on `lan_port`. Called before the node
/// drops its privileges (a port below 1024 would need them); joining the
/// group and everything after needs none.
pub fn bind(lan_port: u16) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    s.set_reuse_address(true)?;
    s.set_multicast_loop_v6(false)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, lan_port)).into())
        .with_context(|| format!("binding LAN discovery port {lan_port}"))?;
    Ok(s.into())
}

/// Announces `uri` (with our UDP `port`) on socket `s` (from [`bind`]) and
/// calls `found` for every other node heard, with the endpoint its links are
/// reached at. Runs until the task is dropped.
pub async fn run(
    s: std::net::UdpSocket,
    lan_port: u16,
    uri: PeerUri,
    port: u16,
    tun: String,
    found: impl Fn(PeerUri, SocketAddr) + Send + 'static,
) -> Result<()> {
    let s = socket2::Socket::from(s);
    let ifaces = link_local_interfaces(&tun);
    for (idx, name) in &ifaces {
        if let Err(e) = s.join_multicast_v6(&GROUP, *idx) {
            tracing::warn!(interface = %name, "LAN discovery: joining {GROUP}: {e}");
        }
    }
    tracing::info!(interfaces = ?ifaces.iter().map(|i| &i.1).collect::<Vec<_>>(), "LAN discovery on");
    let sock = UdpSocket::from_std(s.into())?;
    let mut me = uri.clone();
    me.endpoint = None;
    let line = format!("{MAGIC} {me} {port}");
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for (idx, _) in link_local_interfaces(&tun) {
                    let to = SocketAddrV6::new(GROUP, lan_port, 0, idx);
                    if let Err(e) = sock.send_to(line.as_bytes(), to).await {
                        tracing::debug!(interface = idx, "LAN announcement: {e}");
                    }
                }
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let Some((peer, ep)) = parse(&buf[..n], from) else { continue };
                if peer.node_id != uri.node_id {
                    found(peer, ep);
                }
            }
        }
    }
}

/// Parses an announcement heard from `from`.
fn parse(b: &[u8], from: SocketAddr) -> Option<(PeerUri, SocketAddr)> {
    let text = std::str::from_utf8(b).ok()?;
    let mut f = text.split_whitespace();
    if f.next()? != MAGIC {
        return None;
    }
    let uri: PeerUri = f.next()?.parse().ok()?;
    let port: u16 = f.next()?.parse().ok()?;
    if port == 0 || f.next().is_some() {
        return None;
    }
    let SocketAddr::V6(v6) = from else {
        return None;
    };
    let ep = SocketAddr::V6(SocketAddrV6::new(*v6.ip(), port, 0, v6.scope_id()));
    Some((uri, ep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_parse_and_junk_does_not() {
        let from: SocketAddr = "[fe80::1%2]:7301".parse().unwrap();
        let uri = "qg://1/a3387b06714c81aabd78bc9c192c816547a47410fa009583762f6ef94394bec4/E75P6uryBMf9M1j8nAByGIHRdCeBKCJ-xnTzf3_pe20";
        let (u, ep) = parse(format!("QGLAN1 {uri} 7300").as_bytes(), from).unwrap();
        assert_eq!(u.to_string(), uri);
        assert_eq!(ep.to_string(), "[fe80::1%2]:7300");
        for junk in [
            "",
            "QGLAN1",
            "QGLAN2 x 1",
            &format!("QGLAN1 {uri} 0"),
            &format!("QGLAN1 {uri} 7300 extra"),
        ] {
            assert!(parse(junk.as_bytes(), from).is_none(), "{junk}");
        }
        assert!(parse(&[0xff; 40], from).is_none());
    }
}
