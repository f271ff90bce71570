//! Unit tests of the link table and the handshake gate: foreign keys,
//! handshake floods, cookies, the caps on links not yet verified, which
//! links close, garbage datagrams.

use super::*;

#[test]
fn configured_uri_with_foreign_key_gets_no_traffic() {
    let now = Instant::now();
    let ids = identities(3);
    let eps = endpoints(2);
    let victim = ids[1].node_id();
    // A's URI names the victim's node ID but the attacker's link key.
    let forged = PeerUri {
        node_id: victim,
        link_key: ids[2].link_public(),
        endpoint: Some(eps[1]),
    };
    let mut it = ids.into_iter();
    let a = Node::new(it.next().unwrap(), 1, cfg(vec![forged]), now);
    let _victim = it.next();
    let attacker = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
    let mut net = Net {
        nodes: vec![(host(a), eps[0]), (host(attacker), eps[1])],
        now,
    };
    // A program on A sends to the victim's address before and after the
    // handshake with the attacker completes.
    let addr_a = net.nodes[0].0.address();
    let secret = udp_packet(addr_a, victim.overlay_address(), b"secret for the victim");
    let _ = net.nodes[0].0.handle_tun_packet(now, &secret);
    let delivered = net.run();
    let _ = net.nodes[0].0.handle_tun_packet(now, &secret);
    let delivered2 = net.run();
    assert!(
        delivered.iter().chain(&delivered2).all(|t| t.is_empty()),
        "nothing reaches the attacker"
    );
    let st = net.nodes[0].0.status();
    assert!(st.links.iter().all(|l| l.state != LinkState::Up));
    assert!(st.links.iter().map(|l| l.drops.bad_record).sum::<u64>() >= 1);
}

#[test]
fn handshake_flood_from_one_source_is_capped() {
    let now = Instant::now();
    let target = Identity::generate(&mut OsRng).unwrap();
    let target_uri = uri(&target, "198.18.0.1:7300".parse().unwrap());
    let mut node = Node::new(target, 1, cfg(vec![]), now);
    // A real node's initiations, replayed many times from one address.
    let attacker = Identity::generate(&mut OsRng).unwrap();
    let mut a = Node::new(attacker, 1, cfg(vec![target_uri]), now);
    let init = a.poll_transmit().unwrap().payload;
    let from: SocketAddr = "198.18.0.66:1".parse().unwrap();
    let (mut responses, mut cookies) = (0, 0);
    for _ in 0..100 {
        node.handle_datagram(now, from, &init);
        while let Some(t) = node.poll_transmit() {
            match t.payload[0] {
                2 => responses += 1,
                3 => cookies += 1,
                _ => {}
            }
        }
    }
    // At most the per-source budget reached the Diffie-Hellman work; the
    // rest were refused or asked for a cookie.
    let burst = SOURCE_LIMIT.burst as u64;
    assert!(responses <= burst, "{responses} responses");
    let d = node.status().drops;
    assert!(d.rate_limited >= 100 - burst, "{d:?} {cookies}");
}

#[test]
fn over_budget_source_gets_through_with_a_cookie() {
    let now = Instant::now();
    let ids = identities(3);
    let ep_a: SocketAddr = "198.18.0.1:7300".parse().unwrap();
    let ep_b: SocketAddr = "198.18.0.2:7300".parse().unwrap();
    let b_uri = uri(&ids[1], ep_b);
    let mut it = ids.into_iter();
    let mut a = Node::new(it.next().unwrap(), 1, cfg(vec![b_uri.clone()]), now);
    let mut b = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
    let mut c = Node::new(it.next().unwrap(), 1, cfg(vec![b_uri]), now);
    // Someone forging a's address spends a's whole handshake budget.
    let forged = c.poll_transmit().unwrap().payload;
    for _ in 0..SOURCE_LIMIT.burst {
        b.handle_datagram(now, ep_a, &forged);
    }
    while b.poll_transmit().is_some() {}
    // a's own initiation now gets a cookie challenge, not a refusal...
    let init = a.poll_transmit().unwrap().payload;
    assert!(b.handle_datagram(now, ep_a, &init).is_none());
    let challenge = b.poll_transmit().unwrap();
    assert_eq!((challenge.dst, challenge.payload[0]), (ep_a, 3));
    assert!(a.handle_datagram(now, ep_b, &challenge.payload).is_none());
    // ...and a sends its next initiation at once, carrying the cookie; it
    // is answered.
    let retry = a.poll_transmit().expect("an initiation at once");
    assert_eq!((retry.dst, retry.payload[0]), (ep_b, 1));
    b.handle_datagram(now, ep_a, &retry.payload);
    let answer = b.poll_transmit().unwrap();
    assert_eq!(answer.payload[0], 2, "handshake response");
    // The same cookie reply again (replayed by anyone on the path)
    // makes a send nothing: it no longer matches a's last initiation.
    // (Later than COOKIE_RETRY, so only the mismatch stops it.)
    while a.poll_transmit().is_some() {}
    let later = now + COOKIE_RETRY * 2;
    assert!(a.handle_datagram(later, ep_b, &challenge.payload).is_none());
    assert!(a.poll_transmit().is_none());
    let link = a.links.values().next().unwrap();
    assert_eq!(link.last_cookie_retry, Some(now));
}

/// A link a neighbour opened and keeps alive stays, used or not; a link
/// this node opened on demand closes after `ON_DEMAND_IDLE` unused.
#[test]
fn only_links_opened_on_demand_close_unused() {
    let now = Instant::now();
    let (ids, eps) = (identities(2), endpoints(2));
    let a_id = ids[0].node_id();
    let mut net = linked_pair(now, ids, &eps);
    let later = now + ON_DEMAND_IDLE + Duration::from_secs(5);
    let b = &mut net.nodes[1].0;
    // B's link is inbound (A configured B): kept alive, never used.
    let idx = *b.links.indices().first().expect("B has A's link");
    assert!(!b.links[&idx].persistent && !b.links[&idx].opened_on_demand());
    b.links.get_mut(&idx).unwrap().chan.last_rx = later;
    b.handle_timeout(later);
    assert!(
        b.links.get(&idx).is_some(),
        "an inbound link kept alive stays"
    );
    // The same link, had B opened it on demand, is closed.
    b.links.get_mut(&idx).unwrap().configured = Some(a_id);
    b.handle_timeout(later);
    assert!(
        b.links.get(&idx).is_none(),
        "an unused on-demand link closes"
    );
}

/// Links not yet verified are capped (a quarter of `max_links`, at least
/// 64); one younger than `UNVERIFIED_GRACE` is not pushed out for a newer
/// one (that one is refused and its node retries), an older one is.
#[test]
fn unverified_links_get_their_grace() {
    let t0 = Instant::now();
    let mut config = cfg(vec![]);
    config.max_links = 256;
    let mut v = Node::new(identities(1).pop().unwrap(), 1, config, t0);
    let from: SocketAddr = "198.18.5.5:40000".parse().unwrap();
    let cap = MIN_UNVERIFIED_LINKS;
    assert_eq!(v.max_unverified(), cap);
    for i in 0..cap {
        v.inject_inner(t0, [i as u8 + 1; 32], from, &[]);
    }
    assert_eq!(v.links.len(), cap);
    // Full, and all young: a new one is refused, nobody is pushed out.
    let t1 = t0 + UNVERIFIED_GRACE / 2;
    v.inject_inner(t1, [200; 32], from, &[]);
    assert_eq!(v.links.len(), cap);
    assert!(v.links.index_of_key(&[200; 32]).is_none());
    assert!(v.links.index_of_key(&[1; 32]).is_some());
    assert_eq!(v.status().drops.link_limit, 1);
    // Past the grace, the oldest makes room.
    let t2 = t0 + UNVERIFIED_GRACE;
    v.inject_inner(t2, [200; 32], from, &[]);
    assert_eq!(v.links.len(), cap);
    assert!(v.links.index_of_key(&[200; 32]).is_some());
    assert_eq!(v.status().drops.link_limit, 2);
    // All young again; a newcomer from another subnet is not refused: the
    // subnet holding most of them gives up its oldest.
    let t3 = t2 + UNVERIFIED_GRACE / 2;
    for i in 0..cap as u8 {
        v.inject_inner(t3, [i.wrapping_add(100); 32], from, &[]);
    }
    let t4 = t3 + Duration::from_millis(100);
    let elsewhere: SocketAddr = "198.18.9.9:40000".parse().unwrap();
    v.inject_inner(t4, [250; 32], elsewhere, &[]);
    assert!(
        v.links.index_of_key(&[250; 32]).is_some(),
        "a newcomer from another subnet"
    );
    assert_eq!(v.links.len(), cap);
    // A link this node opens itself is neither counted nor refused.
    let own = v.add_link([251; 32], Some(elsewhere), Some(NodeId([7; 32])), t4);
    assert!(own.is_some());
    assert_eq!(v.links.len(), cap + 1);
    // A larger node holds more: a quarter of max_links.
    let mut config = cfg(vec![]);
    config.max_links = 4096;
    let big = Node::new(identities(1).pop().unwrap(), 1, config, t0);
    assert_eq!(big.max_unverified(), 1024);
}

/// Inbound links take all but an eighth of `max_links`: busy neighbours
/// can't keep a node from opening links of its own; an inbound newcomer
/// over that share takes only an idle inbound link's place.
#[test]
fn links_of_our_own_keep_an_eighth_of_the_table() {
    let t0 = Instant::now();
    let mut config = cfg(vec![]);
    config.max_links = 16;
    let mut v = Node::new(identities(1).pop().unwrap(), 1, config, t0);
    let from: SocketAddr = "198.18.5.5:40000".parse().unwrap();
    let share = 16 - 16 / 8;
    for i in 0..share {
        v.inject_inner(t0, [i as u8 + 1; 32], from, &[]);
    }
    assert_eq!(v.links.len(), share);
    // All busy: one more inbound is refused, though the table has room.
    v.inject_inner(t0, [100; 32], from, &[]);
    assert!(v.links.index_of_key(&[100; 32]).is_none());
    assert_eq!(v.status().drops.link_limit, 1);
    // The node's own links still get on, up to the whole table.
    for i in 0..16 / 8 {
        let own = v.add_link(
            [200 + i as u8; 32],
            Some(from),
            Some(NodeId([i as u8; 32])),
            t0,
        );
        assert!(own.is_some(), "own link {i}");
    }
    assert_eq!(v.links.len(), 16);
    // Once an inbound link has been idle a while, a newcomer takes its
    // place, never one of ours.
    let later = t0 + LRU_IDLE + Duration::from_secs(1);
    for i in 1..share as u8 {
        let idx = v.links.index_of_key(&[i + 1; 32]).unwrap();
        v.links.get_mut(&idx).unwrap().chan.last_used = later;
    }
    v.inject_inner(later, [101; 32], from, &[]);
    assert!(v.links.index_of_key(&[101; 32]).is_some());
    assert!(
        v.links.index_of_key(&[1; 32]).is_none(),
        "the idle one went"
    );
    assert_eq!(v.links.len(), 16);
    for i in 0..16 / 8 {
        assert!(v.links.index_of_key(&[200 + i as u8; 32]).is_some());
    }
}

#[test]
fn garbage_datagrams_are_counted_not_fatal() {
    let now = Instant::now();
    let mut n = Node::new(Identity::generate(&mut OsRng).unwrap(), 1, cfg(vec![]), now);
    let from: SocketAddr = "198.18.0.9:1".parse().unwrap();
    let mut x: u64 = 88172645463325252;
    for i in 0..50_000usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [0, 1, 4, 32, 64, 92, 148, 200, 1500][i % 9];
        let mut d: Vec<u8> = (0..len).map(|j| (x >> (j % 57)) as u8).collect();
        if len >= 4 {
            d[0] = (i % 5) as u8;
            d[1..4].fill(0);
        }
        assert!(n.handle_datagram(now, from, &d).is_none());
    }
    assert!(n
        .handle_datagram(now, from, &vec![4u8; MAX_DATAGRAM + 1])
        .is_none());
    let d = n.status().drops;
    assert!(
        d.malformed + d.unknown_session + d.handshake_rejected + d.rate_limited > 40_000,
        "{d:?}"
    );
    // One source: its budget, and then nothing more got any work.
    assert!(d.rate_limited > 49_000, "{d:?}");
}

/// The data path's entry: a data message is decrypted into the caller's
/// buffer and an uncompressed packet is used there; a compressed one is
/// rebuilt by the node; a buffer shorter than the datagram drops it.
#[test]
fn datagrams_are_opened_into_the_callers_buffer() {
    let now = Instant::now();
    let (ids, eps) = (identities(2), endpoints(2));
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    let mut net = linked_pair(now, ids, &eps);
    // Random bytes don't compress: the packet goes as it is.
    let mut noise = [0u8; 1000];
    rand_core::RngCore::fill_bytes(&mut OsRng, &mut noise);
    let plain = udp_packet(addrs[0], addrs[1], &noise);
    let squeezable = udp_packet(addrs[0], addrs[1], &[b'x'; 1000]);
    let seal = |net: &mut Net, p: &[u8]| match net.nodes[0].0.handle_tun_packet(net.now, p) {
        TunOutcome::Send(_, d) => d.to_vec(),
        other => panic!("not sent: {other:?}"),
    };
    let (from, now) = (eps[0], net.now);
    let mut buf = vec![0xaa; 4096];

    // The compressible packet first: both are one flow, whose compression
    // may back off after an incompressible packet.
    let d = seal(&mut net, &squeezable);
    assert!(d.len() < squeezable.len(), "compressed on the wire");
    let b = &mut net.nodes[1].0;
    assert_eq!(
        b.receive(now, from, &d, &mut buf),
        Some(Delivered::Rebuilt(&squeezable[..]))
    );

    let d = seal(&mut net, &plain);
    let b = &mut net.nodes[1].0;
    assert_eq!(
        b.receive(now, from, &d, &mut buf),
        Some(Delivered::InPlace(plain.len()))
    );
    assert_eq!(&buf[..plain.len()], &plain[..]);

    let d = seal(&mut net, &plain);
    let b = &mut net.nodes[1].0;
    let before = b.status().drops.malformed;
    assert_eq!(b.receive(now, from, &d, &mut buf[..d.len() - 1]), None);
    assert_eq!(b.status().drops.malformed, before + 1);
    // The same datagram, with room, still opens: nothing was spent on it.
    assert_eq!(
        b.receive(now, from, &d, &mut buf),
        Some(Delivered::InPlace(plain.len()))
    );
    assert_eq!(b.status().links[0].counters.rx_packets, 3);
}
