//! Unit tests of the node: small networks of real `Node`s wired in memory
//! (`Net`), on a clock the tests move.

use super::*;
use crate::proto::identity::RecordExt;
use crate::proto::identity::ROLE_RELAY as ROLE_RELAY_BIT;
use crate::proto::onion;
use boringtun::noise::TunnResult;
use rand_core::OsRng;

pub(in crate::proto::node) mod alloc;
mod circuits;
mod links;

use circuits::{advance, circuit_net};

struct Net {
    nodes: Vec<(Host, SocketAddr)>,
    now: Instant,
}

/// A node as the tests run it: on its own, or with `QGATE_TEST_PLANE` set
/// (CI runs the node's tests three ways) handing its established links to
/// a data plane, or with `QGATE_TEST_PLANE=2` spreading them over two.
pub(super) fn host(node: Node) -> Host {
    let env = std::env::var("QGATE_TEST_PLANE").ok();
    let planes = match PLANES.get() {
        Some(n) => n,
        None => env.map_or(0, |v| v.parse().unwrap_or(1usize).max(1)),
    };
    if planes > 0 && !NO_PLANE.get() {
        Host::with_planes(node, planes)
    } else {
        Host::new(node)
    }
}

fn cfg(peers: Vec<PeerUri>) -> NodeConfig {
    NodeConfig {
        peers: peers.into_iter().map(|uri| PeerConfig { uri }).collect(),
        compression: CompressionPolicy {
            enabled: true,
            adaptive: true,
            ..Default::default()
        },
        keepalive: 10,
        mtu: 1440,
        max_links: 16,
        advertise: vec![],
        roles: 0,
        unix_time: 1_800_000_000,
        routes: RoutePolicy::default(),
        relay: RelayConfig::default(),
        traffic: TrafficConfig::default(),
        has_tun: true,
        access: AccessConfig::default(),
        rng_seed: {
            let mut s = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut OsRng, &mut s);
            s
        },
    }
}

fn identities(n: usize) -> Vec<Identity> {
    (0..n)
        .map(|_| Identity::generate(&mut OsRng).unwrap())
        .collect()
}

fn endpoints(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| format!("198.18.0.{}:7300", i + 1).parse().unwrap())
        .collect()
}

fn uri(id: &Identity, ep: SocketAddr) -> PeerUri {
    PeerUri {
        node_id: id.node_id(),
        link_key: id.link_public(),
        endpoint: Some(ep),
    }
}

/// A (configured with B) and B (configured with nobody), the first two of
/// `ids` at the first two of `eps`, run until their link is quiet.
fn linked_pair(now: Instant, ids: Vec<Identity>, eps: &[SocketAddr]) -> Net {
    let peers_a = vec![uri(&ids[1], eps[1])];
    let mut it = ids.into_iter();
    let a = Node::new(it.next().unwrap(), 1, cfg(peers_a), now);
    let b = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
    let mut net = Net {
        nodes: vec![(host(a), eps[0]), (host(b), eps[1])],
        now,
    };
    net.run();
    net
}

thread_local! {
    /// Set by a test that drives the node's own data path: no plane.
    static NO_PLANE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set by a test: every node runs with this many data planes, whatever
    /// QGATE_TEST_PLANE says.
    static PLANES: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// Set by a test: nobody makes the signatures nodes ask for.
    static HOLD_SIGNATURES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the signatures a node asked for ([`Node::poll_sign`]), as the
/// shell's signing thread does (unless a test holds them).
pub(super) fn sign_jobs(node: &mut Node, now: Instant) {
    if HOLD_SIGNATURES.get() {
        return;
    }
    while let Some(job) = node.poll_sign() {
        let sig = node.signer().sign(&job.message);
        node.signed(now, &job, &sig);
    }
}

impl Net {
    /// Delivers queued datagrams until the network is quiet; returns
    /// packets written to each node's TUN.
    fn run(&mut self) -> Vec<Vec<Vec<u8>>> {
        let mut tun = vec![Vec::new(); self.nodes.len()];
        let mut quiet = 0;
        for _ in 0..200 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                sign_jobs(&mut self.nodes[i].0, self.now);
                while let Some(t) = self.nodes[i].0.poll_transmit() {
                    moved = true;
                    let from = self.nodes[i].1;
                    if let Some(j) = self.nodes.iter().position(|(_, a)| *a == t.dst) {
                        if let Some(p) = self.nodes[j].0.handle_datagram(self.now, from, &t.payload)
                        {
                            tun[j].push(p.to_vec());
                        }
                    }
                }
            }
            // Quiet for a while (timers such as hello repeats and
            // record re-signing run once a second or slower): done.
            quiet = if moved { 0 } else { quiet + 1 };
            if quiet > 8 {
                break;
            }
            self.now += Duration::from_millis(300);
            for n in &mut self.nodes {
                n.0.handle_timeout(self.now);
                // As the shell does: store the sequence number, then allow it.
                if let Some(s) = n.0.record_seq_wanted(self.now) {
                    n.0.reserve_record_seq(s);
                }
            }
        }
        tun
    }

    /// Moves datagrams until none is left, running no timers.
    fn deliver(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                sign_jobs(&mut self.nodes[i].0, self.now);
                while let Some(t) = self.nodes[i].0.poll_transmit() {
                    moved = true;
                    let from = self.nodes[i].1;
                    if let Some(j) = self.nodes.iter().position(|(_, a)| *a == t.dst) {
                        self.nodes[j].0.handle_datagram(self.now, from, &t.payload);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn send(&mut self, from: usize, packet: &[u8]) -> Option<Vec<u8>> {
        let src_ep = self.nodes[from].1;
        let (dst, data) = match self.nodes[from].0.handle_tun_packet(self.now, packet) {
            TunOutcome::Send(d, p) => (d, p.to_vec()),
            _ => return None,
        };
        let j = self.nodes.iter().position(|(_, a)| *a == dst)?;
        self.nodes[j]
            .0
            .handle_datagram(self.now, src_ep, &data)
            .map(|p| p.to_vec())
    }
}

fn udp_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload.len()];
    wire::write_ipv6_header(&mut p, payload.len(), 17, 64, src, dst);
    p[40..].copy_from_slice(payload);
    p
}

/// A removed link's traffic and drops stay in the totals
/// (`closed_links`), so sums over links never go down.
#[test]
fn removed_links_keep_their_counts() {
    let now = Instant::now();
    let (ids, eps) = (identities(2), endpoints(2));
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    let mut net = linked_pair(now, ids, &eps);
    let p = udp_packet(addrs[0], addrs[1], &[b'x'; 600]);
    assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
    let before = net.nodes[1].0.status();
    let link = &before.links[0];
    assert!(link.counters.rx_bytes >= 600, "{:?}", link.counters);
    let (rx_bytes, index) = (link.counters.rx_bytes, link.link);
    net.nodes[1].0.remove_link(net.now, index);
    let after = net.nodes[1].0.status();
    assert!(after.links.iter().all(|l| l.link != index));
    let closed = net.nodes[1].0.closed_links();
    assert_eq!((closed.links, closed.counters.rx_bytes), (1, rx_bytes));
}

/// Compression pauses while the shell reports a saturated data path and
/// resumes once it waits for packets again; `adaptive = false` keeps it on.
#[test]
fn compression_pauses_while_the_data_path_is_the_limit() {
    let now = Instant::now();
    for adaptive in [true, false] {
        let (ids, eps) = (identities(2), endpoints(2));
        let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
        let mut net = linked_pair(now, ids, &eps);
        net.nodes[0].0.config.compression.adaptive = adaptive;
        let p = udp_packet(addrs[0], addrs[1], &[b'x'; 1000]);
        let compressed = |net: &mut Net| net.nodes[0].0.status().links[0].counters.tx_compressed;
        assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
        assert_eq!(compressed(&mut net), 1);
        for _ in 0..6 {
            net.nodes[0].0.report_data_path_busy(1000);
        }
        let st = net.nodes[0].0.status().data_path;
        assert!(st.compression_paused && st.busy_percent > 90, "{st:?}");
        assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
        assert_eq!(compressed(&mut net), if adaptive { 1 } else { 2 });
        for _ in 0..6 {
            net.nodes[0].0.report_data_path_busy(50);
        }
        assert!(!net.nodes[0].0.status().data_path.compression_paused);
        assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
        assert_eq!(compressed(&mut net), if adaptive { 2 } else { 3 });
        assert_eq!(net.nodes[0].0.status().data_path.compression_pauses, 1);
    }
}

#[test]
fn link_up_verify_forward_and_reject_spoofing() {
    let now = Instant::now();
    let ids = identities(3);
    let eps = endpoints(3);
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    // A knows B; C knows B; B knows nobody (open network).
    let peers_a = vec![uri(&ids[1], eps[1])];
    let peers_c = vec![uri(&ids[1], eps[1])];
    let mut it = ids.into_iter();
    let a = Node::new(it.next().unwrap(), 1, cfg(peers_a), now);
    let b = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
    let c = Node::new(it.next().unwrap(), 1, cfg(peers_c), now);
    let mut net = Net {
        nodes: vec![(host(a), eps[0]), (host(b), eps[1]), (host(c), eps[2])],
        now,
    };
    net.run();
    assert!(net.nodes[0].0.link_up_to(&addrs[1]));
    assert!(net.nodes[1].0.link_up_to(&addrs[0]));
    assert!(net.nodes[1].0.link_up_to(&addrs[2]));

    // A -> B, compressible payload, arrives intact.
    let p = udp_packet(addrs[0], addrs[1], &[b'x'; 1000]);
    assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
    // B -> C over the link C opened.
    let p = udp_packet(addrs[1], addrs[2], b"hello from b, a short one");
    assert_eq!(net.send(1, &p).as_deref(), Some(&p[..]));
    // A claims C's address: B drops and counts it.
    let p = udp_packet(addrs[2], addrs[1], b"spoofed");
    assert_eq!(net.send(0, &p), None);
    let st = net.nodes[1].0.status();
    let spoofed: u64 = st.links.iter().map(|l| l.drops.spoofed_source).sum();
    assert_eq!(spoofed, 1);
    // A was configured with B only, yet reaches C: joining the DHT
    // through B made A learn C's record and link to C on demand.
    let p = udp_packet(addrs[0], addrs[2], b"no configured link to c");
    assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
    assert!(net.nodes[0].0.link_up_to(&addrs[2]));
    // An address nobody has: the lookup fails and the program gets
    // ICMPv6 address unreachable; at once, next time.
    let nobody = Ipv6Addr::new(0xfc00, 1, 2, 3, 4, 5, 6, 7);
    let p = udp_packet(addrs[0], nobody, b"anyone there?");
    let now = net.now;
    assert!(matches!(
        net.nodes[0].0.handle_tun_packet(now, &p),
        TunOutcome::Nothing
    ));
    net.run();
    let r = net.nodes[0]
        .0
        .poll_tun_write()
        .expect("ICMPv6 for the program");
    let v = Ipv6View::new_checked(&r).unwrap();
    assert_eq!(v.next_header(), wire::NH_ICMPV6);
    assert_eq!(v.payload()[0], wire::ICMPV6_DEST_UNREACHABLE);
    assert_eq!(v.dst(), addrs[0]);
    let now = net.now + Duration::from_secs(1);
    assert!(matches!(
        net.nodes[0].0.handle_tun_packet(now, &p),
        TunOutcome::Reply(_)
    ));
    // A misbehaving A routes C's traffic over its link to B: B drops it
    // as not addressed to B.
    let to_b = net.nodes[0].0.links.index_of_addr(&addrs[1]).unwrap();
    net.nodes[0].0.name_addr(addrs[2], to_b);
    let p = udp_packet(addrs[0], addrs[2], b"not for b");
    assert_eq!(net.send(0, &p), None);
    let wrong: u64 = net.nodes[1]
        .0
        .status()
        .links
        .iter()
        .map(|l| l.drops.wrong_destination)
        .sum();
    assert_eq!(wrong, 1);
    net.nodes[0].0.links.unname_addr(&addrs[2]);
    // A path below 1280 + overhead: programs still send 1280, and the
    // node fragments for them; B's kernel gets fragments it can join.
    net.nodes[0].0.set_path_mtu(eps[1], 1300);
    let p = udp_packet(addrs[0], addrs[1], &[9u8; 1240]);
    assert!(matches!(
        net.nodes[0].0.handle_tun_packet(now, &p),
        TunOutcome::Nothing
    ));
    let got = net.run();
    assert_eq!(got[1].len(), 2, "two fragments");
    for f in &got[1] {
        assert!(f.len() <= 1300 - 28 - 32);
        assert_eq!(
            Ipv6View::new_checked(f).unwrap().next_header(),
            wire::NH_FRAGMENT
        );
    }
    // Too big for a smaller path MTU: Packet Too Big back to the TUN.
    net.nodes[0].0.set_path_mtu(eps[1], 1400);
    let p = udp_packet(addrs[0], addrs[1], &[7u8; 1390]);
    match net.nodes[0]
        .0
        .handle_tun_packet(now + Duration::from_secs(1), &p)
    {
        TunOutcome::Reply(r) => {
            let v = Ipv6View::new_checked(r).unwrap();
            assert_eq!(v.payload()[0], wire::ICMPV6_PACKET_TOO_BIG);
            let mtu = u32::from_be_bytes(v.payload()[4..8].try_into().unwrap());
            assert_eq!(mtu as usize, 1400 - 28 - 32);
        }
        other => panic!("{other:?}"),
    }
}

/// A handshake initiation to `to` from a fresh key, as a new node sends it.
fn initiation(to: &Node, seed: u8) -> Vec<u8> {
    let mut t = Tunn::new(
        x25519::StaticSecret::from([seed; 32]),
        x25519::PublicKey::from(to.own.identity().link_public()),
        None,
        None,
        u32::from(seed),
        None,
    );
    let mut buf = vec![0u8; 256];
    match t.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    }
}

#[test]
fn handshake_flood_is_limited_per_source() {
    let t0 = Instant::now();
    let mut v = Node::new(identities(1).pop().unwrap(), 1, cfg(vec![]), t0);
    let flooder: SocketAddr = "198.18.5.5:40000".parse().unwrap();
    let other: SocketAddr = "198.18.6.6:7300".parse().unwrap();
    // Valid initiations from one source, 2000 a second for 2 s: each
    // would cost Diffie-Hellman work and a link.
    let inits: Vec<Vec<u8>> = (0..8).map(|i| initiation(&v, 100 + i)).collect();
    let mut answered = 0;
    let mut now = t0;
    for i in 0..4000usize {
        now = t0 + Duration::from_micros(500 * i as u64);
        let from = SocketAddr::new(flooder.ip(), 40000 + (i % 1000) as u16);
        v.handle_datagram(now, from, &inits[i % inits.len()]);
        // Garbage from the same source shares its budget.
        v.handle_datagram(now, from, &[0x55; 100]);
        answered += std::iter::from_fn(|| v.poll_transmit())
            .filter(|t| t.dst.ip() == flooder.ip() && t.payload[0] == 2)
            .count();
        if i % 500 == 0 {
            v.handle_timeout(now);
        }
    }
    let limit = SOURCE_LIMIT.burst as usize + 2 * SOURCE_LIMIT.per_sec as usize + 1;
    let proven = PROVEN_LIMIT.burst as usize + 2 * PROVEN_LIMIT.per_sec as usize + 1;
    // Handshake responses: within the source budget (the flooder has no
    // cookies, so the proven budget gives it none).
    assert!(answered <= limit, "{answered} answered");
    let st = v.status();
    assert!(
        st.drops.rate_limited >= (8000 - limit - proven) as u64,
        "{:?}",
        st.drops
    );
    // Another source at the same moment is not limited: answered at
    // once (the flood may have put the node under load as a whole,
    // then the answer is a cookie, and the retry with it succeeds).
    let limited = st.drops.rate_limited;
    let mut t = Tunn::new(
        x25519::StaticSecret::from([99; 32]),
        x25519::PublicKey::from(v.own.identity().link_public()),
        None,
        None,
        99,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let mut answer = None;
    for _ in 0..2 {
        let init = match t.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        };
        v.handle_datagram(now, other, &init);
        let to_other: Vec<Transmit> = std::iter::from_fn(|| v.poll_transmit())
            .filter(|t| t.dst == other)
            .collect();
        assert_eq!(to_other.len(), 1);
        if to_other[0].payload[0] == 2 {
            answer = Some(2);
            break;
        }
        assert_eq!(to_other[0].payload[0], 3, "a cookie");
        let _ = t.decapsulate(None, &to_other[0].payload, &mut buf);
    }
    assert_eq!(answer, Some(2), "a handshake response");
    assert_eq!(v.status().drops.rate_limited, limited);
}

#[test]
fn established_link_passes_data_through_a_flood() {
    let now = Instant::now();
    let ids = identities(2);
    let eps = endpoints(2);
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    let mut net = linked_pair(now, ids, &eps);
    assert!(net.nodes[1].0.link_up_to(&addrs[0]));
    let flooder: SocketAddr = "198.18.5.5:40000".parse().unwrap();
    let init = initiation(&net.nodes[1].0, 42);
    let mut delivered = 0;
    for i in 0..2000u64 {
        net.now += Duration::from_millis(1);
        let b = &mut net.nodes[1].0;
        for _ in 0..20 {
            b.handle_datagram(net.now, flooder, &init);
            b.handle_datagram(net.now, flooder, &[4, 0, 0, 0, 9, 9, 9, 9]);
        }
        while b.poll_transmit().is_some() {}
        if i % 10 == 0 {
            let p = udp_packet(addrs[0], addrs[1], format!("packet {i}").as_bytes());
            delivered += (net.send(0, &p).as_deref() == Some(&p[..])) as usize;
        }
    }
    assert_eq!(delivered, 200, "every packet of the established link");
    let d = net.nodes[1].0.status().drops;
    assert!(d.rate_limited > 70_000, "{d:?}");
}

#[test]
fn source_table_stays_bounded_under_a_spray() {
    let t0 = Instant::now();
    let mut v = Node::new(identities(1).pop().unwrap(), 1, cfg(vec![]), t0);
    let junk = [1u8; 148];
    for i in 0..100_000u32 {
        let now = t0 + Duration::from_micros(u64::from(i) * 20);
        let ip = std::net::Ipv4Addr::from(0xc612_0000 + i);
        v.handle_datagram(now, SocketAddr::new(ip.into(), 7300), &junk);
        if i % 12_500 == 0 {
            v.handle_timeout(now);
        }
        while v.poll_transmit().is_some() {}
    }
    assert!(v.gate.sources().len() <= SOURCE_SLOTS);
    assert!(
        v.gate.sources().memory() <= 256 * 1024,
        "{}",
        v.gate.sources().memory()
    );
    assert!(v.gate.sources().evicted >= 100_000 - SOURCE_SLOTS as u64);
    assert!(v.links.is_empty(), "random bytes make no link");
}

#[test]
fn create_floods_are_limited_per_neighbour() {
    let t0 = Instant::now();
    let ids = identities(3);
    let eps = endpoints(3);
    let keys: Vec<[u8; 32]> = ids.iter().map(|i| i.link_public()).collect();
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    let v_uri = uri(&ids[0], eps[0]);
    let mut it = ids.into_iter();
    let v = Node::new(it.next().unwrap(), 1, cfg(vec![]), t0);
    let a = Node::new(it.next().unwrap(), 1, cfg(vec![v_uri.clone()]), t0);
    let b = Node::new(it.next().unwrap(), 1, cfg(vec![v_uri]), t0);
    let mut net = Net {
        nodes: vec![(host(v), eps[0]), (host(a), eps[1]), (host(b), eps[2])],
        now: t0,
    };
    net.run();
    let t0 = net.now;
    let v = &mut net.nodes[0].0;
    assert!(v.link_up_to(&addrs[1]) && v.link_up_to(&addrs[2]));
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let (_c, create) = onion::ClientHandshake::start(&mut rng, v.node_id(), v.circ.onion_public());
    let cell_for = |circ: u32| {
        let mut cell = vec![0u8; onion::CELL_SMALL];
        onion::write_header(&mut cell, circ, onion::CellKind::Create, &[0; 16]);
        cell[onion::CELL_HEADER..onion::CELL_HEADER + create.len()].copy_from_slice(&create);
        cell
    };
    let mut pkt = Vec::new();
    // 1000 CREATEs in one second from neighbour a.
    for i in 0..1000u32 {
        let now = t0 + Duration::from_millis(u64::from(i));
        wire::encode_control(addrs[1], addrs[0], MSG_CELL, &cell_for(i + 1), &mut pkt);
        v.inject_inner(now, keys[1], eps[1], &pkt);
        while v.poll_transmit().is_some() {}
    }
    let st = v.status().relay;
    let allowed = CREATE_LIMIT.burst as u64 + CREATE_LIMIT.per_sec as u64 + 1;
    assert!(st.drops.create_limited >= 1000 - allowed, "{st:?}");
    assert!(st.circuits_total <= allowed, "{st:?}");
    assert!(st.circuits_total >= CREATE_LIMIT.burst as u64, "{st:?}");
    // Neighbour b still builds.
    let before = st.circuits_total;
    wire::encode_control(addrs[2], addrs[0], MSG_CELL, &cell_for(5), &mut pkt);
    v.inject_inner(t0 + Duration::from_secs(1), keys[2], eps[2], &pkt);
    assert_eq!(v.status().relay.circuits_total, before + 1);
}

#[test]
fn control_messages_survive_segmentation() {
    let now = Instant::now();
    let ids = identities(2);
    let eps = endpoints(2);
    let mut net = linked_pair(now, ids, &eps);
    let addr_a = net.nodes[0].0.address();
    let idx = net.nodes[1].0.links.index_of_addr(&addr_a).unwrap();
    // b re-sends its hello as segments; a takes it as any hello (a newer
    // record would replace the old one, the same one is simply known).
    net.nodes[0]
        .0
        .links
        .values_mut()
        .for_each(|l| l.hello.our_record_changed());
    let mut body = Vec::new();
    hello::Hello {
        ack: true,
        reply: true,
        observed: None,
        record: net.nodes[1].0.own.bytes(),
    }
    .emit(&mut body);
    net.nodes[1].0.send_control(idx, MSG_HELLO, &body, true);
    // Sealed, or given to the data plane to seal.
    assert!(!net.nodes[1].0.out.is_empty() || net.nodes[1].0.handoff.pending() > 0);
    net.run();
    let st = net.nodes[0].0.status();
    assert_eq!(st.links[0].drops.bad_inner, 0);
    assert!(net.nodes[0].0.link_up_to(&net.nodes[1].0.address()));
    // A 20 KB message of an unknown type arrives whole and is counted
    // as one bad message, not 17 bad segments.
    net.nodes[1]
        .0
        .send_control(idx, 77, &vec![5u8; 20_000], false);
    let n = &net.nodes[1].0;
    assert_eq!(n.out.datagrams().count() + n.handoff.pending(), 17);
    net.run();
    assert_eq!(net.nodes[0].0.status().links[0].drops.bad_inner, 1);
}

/// A value the node signed itself is not verified again when it is put
/// (an RSA verification under the node's lock); one under another key is,
/// and a forged one is refused.
#[test]
fn own_puts_are_not_verified_again_others_are() {
    let now = Instant::now();
    let mut ids = identities(2);
    let other = ids.pop().unwrap();
    let mut n = Node::new(ids.pop().unwrap(), 1, cfg(vec![]), now);
    let before = n.dht.records().verifications;
    n.dht_put(now, b"ns", b"k", b"mine", 3600).unwrap();
    assert_eq!(n.dht.records().verifications, before, "verified again");
    assert_eq!(n.local_values(now, b"ns", b"k").len(), 1);
    let (seq, expires) = (5, n.dht.unix(now) + 3600);
    let theirs = SignedValue::sign(&other, b"ns", b"k2", b"theirs", seq, expires).unwrap();
    n.put_signed_value(now, &theirs).unwrap();
    assert_eq!(n.dht.records().verifications, before + 1);
    let mut forged = SignedValue::sign(&other, b"ns", b"k3", b"forged", seq, expires).unwrap();
    forged.value = b"changed".to_vec();
    assert!(n.put_signed_value(now, &forged).is_err());
}

/// A value put while the node was alone is kept (the shell writes
/// `value_records` to the vault); restored in the next run, it reaches
/// the node's peer once the node joins.
#[test]
fn a_kept_value_is_published_again_after_a_restart() {
    let now = Instant::now();
    let mut ids = identities(2);
    let eps = endpoints(2);
    let again =
        |id: &Identity| Identity::from_pem(&id.rsa_pem().unwrap(), id.link_secret_bytes()).unwrap();
    let mut alone = Node::new(again(&ids[0]), 1, cfg(vec![]), now);
    alone
        .dht_put(now, b"ns", b"k", b"kept value", 3600)
        .unwrap();
    let kept = alone.value_records(now);
    assert_eq!(kept.len(), 1);
    drop(alone);

    let later = now + Duration::from_secs(60);
    let b_id = ids.pop().unwrap();
    let mut a = Node::new(ids.pop().unwrap(), 2, cfg(vec![uri(&b_id, eps[1])]), later);
    assert!(a.restore_value(later, &kept[0]));
    let b = Node::new(b_id, 1, cfg(vec![]), later);
    let mut net = Net {
        nodes: vec![(host(a), eps[0]), (host(b), eps[1])],
        now: later,
    };
    net.run();
    advance(&mut net, 2.0);
    let at_b = net.nodes[1].0.local_values(net.now, b"ns", b"k");
    assert_eq!(at_b.len(), 1, "b stores a's kept value");
    assert_eq!(&at_b[0][..], &kept[0][..]);
}

#[test]
fn packet_to_an_unlinked_address_waits_for_the_lookup_then_flows() {
    let now = Instant::now();
    let ids = identities(3);
    let eps = endpoints(3);
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    let conf = |peers: Vec<PeerUri>, ep: SocketAddr| NodeConfig {
        advertise: vec![ep],
        ..cfg(peers)
    };
    let (pa, pc) = (vec![uri(&ids[1], eps[1])], vec![uri(&ids[1], eps[1])]);
    let mut it = ids.into_iter();
    let a = Node::new(it.next().unwrap(), 1, conf(pa, eps[0]), now);
    let b = Node::new(it.next().unwrap(), 1, conf(vec![], eps[1]), now);
    let c = Node::new(it.next().unwrap(), 1, conf(pc, eps[2]), now);
    let mut net = Net {
        nodes: vec![(host(a), eps[0]), (host(b), eps[1]), (host(c), eps[2])],
        now,
    };
    // Links A-B and C-B come up; no timer has run, so A has not joined
    // the DHT and knows nothing of C.
    net.deliver();
    assert!(net.nodes[0].0.link_up_to(&addrs[1]));
    assert!(net.nodes[0].0.links.index_of_addr(&addrs[2]).is_none());
    let p = udp_packet(addrs[0], addrs[2], b"waits for a lookup");
    let out = net.nodes[0].0.handle_tun_packet(now, &p);
    assert!(matches!(out, TunOutcome::Nothing), "{out:?}");
    let tun = net.run();
    assert!(tun[2].contains(&p), "the packet that waited reached C");
    assert!(net.nodes[0].0.link_up_to(&addrs[2]));
    assert_eq!(net.nodes[0].0.status().drops.unreachable, 0);
    // Nothing more to say: the on-demand link closes; the configured
    // one stays.
    for _ in 0..60 {
        net.now += Duration::from_secs(3);
        let now = net.now;
        for n in &mut net.nodes {
            n.0.handle_timeout(now);
            // As the shell does: store the sequence number, then allow it.
            if let Some(s) = n.0.record_seq_wanted(now) {
                n.0.reserve_record_seq(s);
            }
        }
        net.deliver();
    }
    assert!(net.nodes[0].0.links.index_of_addr(&addrs[2]).is_none());
    assert!(net.nodes[0].0.links.index_of_addr(&addrs[1]).is_some());
}

#[test]
fn access_lists_and_subnet_limit_refuse_links() {
    use crate::proto::access::Rule;
    let now = Instant::now();
    let ids = identities(3);
    let eps = endpoints(3);
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    let c_id = ids[2].node_id();
    // Three B configurations; A and C both configured with B.
    let deny_a_net = AccessConfig {
        link: crate::proto::access::AccessList {
            allow: vec![],
            deny: vec![Rule::Net(eps[0].ip(), 32)],
        },
        ..AccessConfig::default()
    };
    let allow_only_c = AccessConfig {
        link: crate::proto::access::AccessList {
            allow: vec![Rule::Node(c_id)],
            deny: vec![],
        },
        ..AccessConfig::default()
    };
    let one_per_subnet = AccessConfig {
        links_per_subnet: 1,
        ..AccessConfig::default()
    };
    for (case, access) in [deny_a_net, allow_only_c, one_per_subnet]
        .into_iter()
        .enumerate()
    {
        let (pa, pc) = (vec![uri(&ids[1], eps[1])], vec![uri(&ids[1], eps[1])]);
        let clone = |i: &Identity| {
            Identity::from_pem(&i.rsa_pem().unwrap(), i.link_secret_bytes()).unwrap()
        };
        let a = Node::new(clone(&ids[0]), 1, cfg(pa), now);
        let b = Node::new(
            clone(&ids[1]),
            1,
            NodeConfig {
                access,
                ..cfg(vec![])
            },
            now,
        );
        let c = Node::new(clone(&ids[2]), 1, cfg(pc), now);
        let mut net = Net {
            nodes: vec![(host(a), eps[0]), (host(b), eps[1]), (host(c), eps[2])],
            now,
        };
        // A starts first, so under the subnet limit it takes the slot.
        net.run();
        let st = net.nodes[1].0.status();
        match case {
            0 | 1 => {
                assert!(
                    !net.nodes[1].0.link_up_to(&addrs[0]),
                    "case {case}: A linked"
                );
                assert!(
                    net.nodes[1].0.link_up_to(&addrs[2]),
                    "case {case}: C refused"
                );
                assert!(st.drops.access_denied > 0, "case {case}");
            }
            _ => {
                let up = [0, 2].map(|i| net.nodes[1].0.link_up_to(&addrs[i]));
                assert_eq!(up.iter().filter(|u| **u).count(), 1, "{up:?}");
                assert!(st.drops.subnet_limit > 0);
                assert_eq!(st.drops.access_denied, 0);
            }
        }
    }
}

#[test]
fn relays_refuse_circuits_from_denied_nodes() {
    use crate::proto::access::Rule;
    let now = Instant::now();
    let (mut net, addrs, ids) = circuit_net(now);
    for r in 1..=4 {
        net.nodes[r].0.config.access.relay.deny = vec![Rule::Node(ids[0])];
    }
    let (a, e) = (0, 5);
    let p = udp_packet(addrs[a], addrs[e], b"through relays?");
    assert!(matches!(
        net.nodes[a].0.handle_tun_packet(net.now, &p),
        TunOutcome::Nothing
    ));
    let tun = advance(&mut net, 20.0);
    assert!(!tun[e].contains(&p), "a denied source got through");
    let refused: u64 = (1..=4).map(|r| net.nodes[r].0.status().relay.refused).sum();
    assert!(refused > 0);
    assert!(net.nodes[a]
        .0
        .circuits(net.now)
        .circuits
        .iter()
        .all(|c| c.state != "ready"));
    // Another source is still carried.
    let p = udp_packet(addrs[6], addrs[e], b"allowed source");
    net.nodes[6].0.set_default_policy(Policy::Hops(1, 2));
    assert!(matches!(
        net.nodes[6].0.handle_tun_packet(net.now, &p),
        TunOutcome::Nothing
    ));
    let tun = advance(&mut net, 5.0);
    assert!(tun[e].contains(&p), "an allowed source was refused");
}

#[test]
fn relays_whenever_possible_else_direct_and_says_why() {
    // Two nodes, both relays, on the default "balanced" policy: the
    // only relay A knows is the destination itself, so A goes direct.
    let now = Instant::now();
    let ids = identities(2);
    let eps = endpoints(2);
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    let mut net = linked_pair(now, ids, &eps);
    for n in &mut net.nodes {
        n.0.set_default_policy(Policy::Prefer(1, 2));
        n.0.config.roles = ROLE_RELAY_BIT;
    }
    let p = udp_packet(addrs[0], addrs[1], b"direct, for want of relays");
    assert_eq!(net.send(0, &p).as_deref(), Some(&p[..]));
    let r = net.nodes[0].0.routing_summary();
    assert_eq!(r.default, "1..2 or direct");
    assert_eq!(r.summary, "direct: 0 usable relays, 1 needed");
    assert_eq!(r.direct_fallbacks, 1);
    let c = net.nodes[0].0.circuits(net.now);
    assert!(c.circuits.is_empty());
    assert_eq!(c.no_circuit.len(), 1);
    assert_eq!(c.no_circuit[0].destination, addrs[1]);
    assert_eq!(c.no_circuit[0].outcome, RouteOutcome::Direct);
    assert_eq!(
        (c.no_circuit[0].usable_relays, c.no_circuit[0].needed),
        (0, 1)
    );
    // The reply goes direct too (B's policy is the same).
    let back = udp_packet(addrs[1], addrs[0], b"and back");
    assert_eq!(net.send(1, &back).as_deref(), Some(&back[..]));

    // A strict policy ("private") never goes direct: unreachable.
    net.nodes[0].0.set_default_policy(Policy::Hops(2, 3));
    let now = net.now + Duration::from_secs(2);
    let out = net.nodes[0].0.handle_tun_packet(now, &p);
    let TunOutcome::Reply(icmp) = out else {
        panic!("expected ICMPv6 unreachable");
    };
    let v = Ipv6View::new_checked(icmp).unwrap();
    assert_eq!(v.payload()[0], wire::ICMPV6_DEST_UNREACHABLE);
    let r = net.nodes[0].0.routing_summary();
    assert!(
        r.summary
            .starts_with("unreachable: 0 usable relays, 2 needed"),
        "{}",
        r.summary
    );
    assert_eq!(r.unreachable, 1);
}

#[test]
fn relays_whenever_possible_builds_circuits_when_relays_exist() {
    let now = Instant::now();
    let (mut net, addrs, _) = circuit_net(now);
    net.nodes[0].0.set_default_policy(Policy::Prefer(1, 2));
    let (a, e) = (0, 5);
    let p = udp_packet(addrs[a], addrs[e], b"through relays, by default");
    assert!(matches!(
        net.nodes[a].0.handle_tun_packet(net.now, &p),
        TunOutcome::Nothing
    ));
    let tun = advance(&mut net, 5.0);
    assert!(tun[e].contains(&p), "not delivered");
    let c = net.nodes[a].0.circuits(net.now);
    assert_eq!(c.circuits.len(), 1);
    assert!((1..=2).contains(&c.circuits[0].hops.len()));
    assert!(c.no_circuit.is_empty());
    let summary = net.nodes[a].0.routing_summary().summary;
    assert!(
        summary.starts_with("1 destination through relays"),
        "{summary}"
    );
}

#[test]
fn relays_whenever_possible_answers_a_direct_sender_directly() {
    // E (5) talks to A over a direct link; A, on "relays whenever
    // possible" with relays to spare, answers over that link rather
    // than building a circuit back (which a NAT in front of E could
    // stop). A's own first packet to another node still takes relays.
    let now = Instant::now();
    let (mut net, addrs, _) = circuit_net(now);
    net.nodes[0].0.set_default_policy(Policy::Prefer(1, 2));
    let (a, e) = (0, 5);
    let hello = udp_packet(addrs[e], addrs[a], b"hello over a direct link");
    // Over the link E has to A, or one E makes after a lookup.
    let delivered = match net.send(e, &hello) {
        Some(p) => p == hello,
        None => advance(&mut net, 3.0)[a].contains(&hello),
    };
    assert!(delivered, "not delivered");
    let reply = udp_packet(addrs[a], addrs[e], b"and back the same way");
    assert_eq!(net.send(a, &reply).as_deref(), Some(&reply[..]));
    let c = net.nodes[a].0.circuits(net.now);
    assert!(c.circuits.is_empty(), "a circuit was built for a reply");
    assert_eq!(c.no_circuit.len(), 1);
    assert_eq!(c.no_circuit[0].outcome, RouteOutcome::DirectReply);
    assert_eq!(
        net.nodes[a].0.routing_summary().summary,
        "direct: answering a node that talks to us over a direct link"
    );
}

#[test]
fn forged_expired_replayed_and_oversized_records_are_refused_and_counted() {
    let now = Instant::now();
    let ids = identities(3);
    let eps = endpoints(2);
    let addr_b = ids[1].overlay_address();
    let x = &ids[2];
    let ext = |expires| RecordExt {
        expires: Some(expires),
        endpoints: vec![eps[0]],
        roles: 0,
        onion_key: None,
    };
    let good = x.sign_record_with(10, &ext(1_800_003_600)).to_bytes();
    let mut forged = good.clone();
    let n = forged.len();
    forged[n - 5] ^= 1;
    let expired = x.sign_record_with(11, &ext(1_799_000_000)).to_bytes();
    let replayed = x.sign_record_with(5, &ext(1_800_003_600)).to_bytes();
    let oversized = vec![1u8; crate::proto::identity::MAX_RECORD_LEN + 100];
    let mut net = linked_pair(now, ids, &eps);
    let idx = net.nodes[0].0.links.index_of_addr(&addr_b).unwrap();
    for (i, r) in [good, forged, expired, replayed, oversized]
        .into_iter()
        .enumerate()
    {
        let m = super::super::dht::Msg::Store {
            txid: i as u32,
            node: true,
            record: r,
        };
        net.nodes[0]
            .0
            .send_control(idx, MSG_DHT, &m.to_bytes(), false);
        net.run();
    }
    let d = net.nodes[1].0.status().dht;
    assert_eq!(
        (
            d.forged_records,
            d.expired_records,
            d.stale_records,
            d.oversized_records
        ),
        (1, 1, 1, 1),
        "{d:?}"
    );
}

#[test]
fn no_record_is_signed_with_a_sequence_number_not_yet_stored() {
    let now = Instant::now();
    let mut n = Node::new(identities(1).pop().unwrap(), 5, cfg(vec![]), now);
    assert_eq!(n.record().seq, 5);
    // Only 5 is stored: the first re-signing (due at once: the record
    // carries no endpoints yet and expires within half its TTL once 13 h
    // pass) must wait for the shell.
    let later = now + Duration::from_secs(13 * 3600);
    n.handle_timeout(later);
    assert_eq!(n.record().seq, 5, "signed past the stored limit");
    let want = n.record_seq_wanted(later).expect("asks for a limit");
    assert!(want > 1_800_000_000 + 13 * 3600, "{want}");
    n.reserve_record_seq(want);
    let t = later + Duration::from_millis(250);
    n.handle_timeout(t);
    // The record is signed away from the node (the shell's signing
    // thread); until then the old one stands.
    assert_eq!(n.record().seq, 5, "signed under the node");
    sign_jobs(&mut n, t);
    let seq = n.record().seq;
    assert!(seq > 5 && seq <= want, "seq {seq}, limit {want}");
    // With an hour of numbers in hand it asks for nothing more.
    assert_eq!(n.record_seq_wanted(t), None);
    assert_eq!(n.poll_timeout(), t + TICK);
}

/// The timer's sweep in steps, as the shell runs it (letting go of the node
/// between steps): every link is visited once per sweep, a link removed
/// mid-sweep is skipped, and each link's timers do their work: here, after
/// a silence longer than keepalive and grace, a new handshake to every
/// neighbour.
#[test]
fn the_timer_sweeps_links_in_steps() {
    let now = Instant::now();
    let (ids, eps) = (identities(4), endpoints(4));
    let peers = (1..4).map(|i| uri(&ids[i], eps[i])).collect();
    let mut it = ids.into_iter();
    let mut nodes = vec![(Node::new(it.next().unwrap(), 1, cfg(peers), now), eps[0])];
    for (i, id) in it.enumerate() {
        nodes.push((Node::new(id, 1, cfg(vec![]), now), eps[i + 1]));
    }
    let nodes = nodes.into_iter().map(|(n, e)| (host(n), e)).collect();
    let mut net = Net { nodes, now };
    net.run();
    let hub = &mut net.nodes[0].0;
    assert_eq!(hub.status().links.len(), 3);
    while hub.poll_transmit().is_some() {}

    // A silence of 20 s (keepalive 10 s + grace 5 s): one link per step.
    let t = net.now + Duration::from_secs(20);
    let steps: Vec<Sweep> = (0..3).map(|_| hub.handle_timeout_some(t, 1)).collect();
    assert_eq!(steps, [Sweep::More, Sweep::More, Sweep::Done]);
    let mut initiations = std::collections::BTreeSet::new();
    while let Some(tx) = hub.poll_transmit() {
        if tx.payload.first() == Some(&1) {
            initiations.insert(tx.dst);
        }
    }
    let want: std::collections::BTreeSet<SocketAddr> = eps[1..].iter().copied().collect();
    assert_eq!(initiations, want, "a new handshake to every neighbour");
    assert_eq!(
        hub.poll_timeout(),
        t + TICK,
        "the sweep's start is the tick"
    );

    // A new sweep starts at the next call; a link removed during it, before
    // its turn, is skipped (its turn visits nothing) and the sweep ends.
    let t = t + TICK;
    assert_eq!(hub.handle_timeout_some(t, 1), Sweep::More);
    assert_eq!(hub.sweep.len(), 2, "one link visited, two to go");
    let index = hub.sweep[0]; // the last one the sweep would visit
    hub.remove_link(t, index);
    assert_eq!(hub.handle_timeout_some(t, 1), Sweep::More);
    assert_eq!(hub.handle_timeout_some(t, 1), Sweep::Done);
    assert!(!hub.sweeping && hub.sweep.is_empty());
    assert_eq!(hub.status().links.len(), 2);
    // A budget of 0 still moves the sweep on (one link per call).
    let t = t + TICK;
    let steps: Vec<Sweep> = (0..2).map(|_| hub.handle_timeout_some(t, 0)).collect();
    assert_eq!(steps, [Sweep::More, Sweep::Done]);
    // One call does it all, as before.
    assert_eq!(hub.handle_timeout_some(t + TICK, usize::MAX), Sweep::Done);
}

/// The data path's waits for the node, as the shell notes them, show in
/// the status: those over 1 ms counted, the longest kept.
#[test]
fn data_path_lock_waits_show_in_the_status() {
    let now = Instant::now();
    let mut node = Node::new(identities(1).remove(0), 1, cfg(vec![]), now);
    for us in [200, 1_500, 900, 4_200] {
        node.note_data_lock_wait(Duration::from_micros(us));
    }
    let dp = node.status().data_path;
    assert_eq!((dp.long_lock_waits, dp.longest_lock_wait_us), (2, 4_200));
}
