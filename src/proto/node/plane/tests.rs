//! The data plane on its own: two planes, each holding one end of a link
//! whose session was made by the links' channels, carry packets both ways
//! with no node, check what the node would check, and hand the rest over.

use std::collections::VecDeque;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519;

use super::*;
use crate::proto::limit::ByteBucket;
use crate::proto::node::channel::{Channel, Opened, Setup};
use crate::proto::onion::HopKeys;
use crate::proto::wire;

const MTU: usize = 1420;

fn addr(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, last)
}

fn ep(last: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, last], 4000))
}

fn setup(secret: &x25519::StaticSecret) -> Setup {
    let public = x25519::PublicKey::from(secret);
    Setup {
        secret: secret.clone(),
        keepalive: None,
        limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
        mtu: MTU,
    }
}

/// Two channels with a session between them: `a` (index 1, at `ep(1)`)
/// initiated to `b` (index 2, at `ep(2)`).
fn session(now: Instant) -> (Channel, Channel) {
    let (ka, kb) = (
        x25519::StaticSecret::from([1u8; 32]),
        x25519::StaticSecret::from([2u8; 32]),
    );
    let (pa, pb) = (
        x25519::PublicKey::from(&ka).to_bytes(),
        x25519::PublicKey::from(&kb).to_bytes(),
    );
    let mut a = Channel::new(setup(&ka), 1, pb, Some(ep(2)), true, now);
    let mut b = Channel::new(setup(&kb), 2, pa, Some(ep(1)), true, now);
    let mut buf = vec![0u8; 4096];
    let mut to_b = VecDeque::new();
    a.initiate(ep(2), true, &mut buf, &mut to_b);
    let init = to_b.pop_front().expect("an initiation").payload;
    let mut to_a = VecDeque::new();
    assert!(matches!(
        b.open(ep(1), &init, &mut buf, &mut to_a),
        Opened::Authentic(None)
    ));
    let resp = to_a.pop_front().expect("a response").payload;
    let mut more = VecDeque::new();
    assert!(matches!(
        a.open(ep(2), &resp, &mut buf, &mut more),
        Opened::Authentic(None)
    ));
    (a, b)
}

/// Planes for `a` (at `addr(1)`) and `b` (at `addr(2)`), each holding its
/// end of the link, routed to the other.
fn planes(now: Instant) -> (DataPlane, DataPlane) {
    let (ca, cb) = session(now);
    let mut pa = DataPlane::new(addr(1), MTU, None);
    let mut pb = DataPlane::new(addr(2), MTU, None);
    for (p, index, chan, peer) in [(&mut pa, 1, ca, addr(2)), (&mut pb, 2, cb, addr(1))] {
        p.handle(ToPlane::Handoff(Box::new(Lane::new(index, chan, peer))));
        p.handle(ToPlane::Route(peer, index, now + Duration::from_secs(60)));
    }
    (pa, pb)
}

fn udp(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload.len()];
    wire::write_ipv6_header(&mut p, payload.len(), 17, 64, src, dst);
    p[40..].copy_from_slice(payload);
    p
}

/// Sends what `from` queued to `to` (as if from `src`), returning the
/// packets for `to`'s TUN.
fn carry(from: &mut DataPlane, to: &mut DataPlane, src: SocketAddr, now: Instant) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Some(t) = from.poll_transmit() {
        match to.receive(now, src, &t.payload, &mut buf) {
            PlaneRx::InPlace(n) => got.push(buf[..n].to_vec()),
            PlaneRx::Rebuilt(p) => got.push(p.to_vec()),
            PlaneRx::Done => {}
            PlaneRx::NotMine => panic!("a handed link's datagram went to the node"),
        }
        from.recycle(t.payload);
    }
    got
}

fn activity(p: &mut DataPlane, now: Instant) -> Vec<Activity> {
    p.handle_timeout(now);
    let mut out = Vec::new();
    while let Some(e) = p.poll_event() {
        if let FromPlane::Activity(a) = e {
            out.push(*a);
        }
    }
    out
}

#[test]
fn handed_links_carry_packets_both_ways_and_count_them() {
    let now = Instant::now();
    let (mut a, mut b) = planes(now);
    // Compressible and not: both arrive as they were sent.
    let text = udp(addr(1), addr(2), &[b'q'; 900]);
    let noise: Vec<u8> = (0..900u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let noise = udp(addr(1), addr(2), &noise);
    for p in [&text, &noise] {
        assert_eq!(a.send_tun_packet(now, p), PlaneTx::Done);
    }
    assert_eq!(
        carry(&mut a, &mut b, ep(1), now),
        vec![text.clone(), noise.clone()]
    );
    let back = udp(addr(2), addr(1), b"pong");
    assert_eq!(b.send_tun_packet(now, &back), PlaneTx::Done);
    assert_eq!(carry(&mut b, &mut a, ep(2), now), vec![back]);
    let ta = activity(&mut a, now);
    assert_eq!(ta.len(), 1);
    assert_eq!(ta[0].counters.tx_packets, 2);
    assert_eq!(ta[0].counters.rx_packets, 1);
    assert!(ta[0].counters.tx_compressed >= 1, "{:?}", ta[0].counters);
    assert_eq!(ta[0].last_app_rx, Some(now));
    assert!(ta[0].handshake_age.is_some());
}

#[test]
fn what_the_node_must_see_goes_to_the_node() {
    let now = Instant::now();
    let (mut a, mut b) = planes(now);
    // An address not routed here, and a packet that is not IPv6.
    let other = udp(addr(1), addr(9), b"x");
    assert_eq!(a.send_tun_packet(now, &other), PlaneTx::NotMine);
    assert_eq!(a.send_tun_packet(now, b"\x45junk"), PlaneTx::NotMine);
    // A control frame the node made, sealed by the plane, arrives at the
    // other plane as a message for its node.
    let mut frame = Vec::new();
    wire::encode_control(addr(1), addr(2), 7, b"hello there", &mut frame);
    a.handle(ToPlane::Seal(1, frame.clone()));
    assert!(carry(&mut a, &mut b, ep(1), now).is_empty());
    match b.poll_event() {
        Some(FromPlane::Inner {
            index: 2, packet, ..
        }) => assert_eq!(packet, frame),
        _ => panic!("the control frame did not reach the node"),
    }
    // A datagram from somewhere else than the link's endpoint is the
    // node's (its gate charges the source); admitted, it moves the link.
    let p = udp(addr(1), addr(2), b"moved");
    assert_eq!(a.send_tun_packet(now, &p), PlaneTx::Done);
    let d = a.poll_transmit().unwrap().payload;
    let mut buf = vec![0u8; 4096];
    assert_eq!(b.receive(now, ep(7), &d, &mut buf), PlaneRx::NotMine);
    assert_eq!(
        b.admit(now, 2, ep(7), &d, &mut buf),
        PlaneRx::InPlace(p.len())
    );
    assert!(matches!(b.poll_event(), Some(FromPlane::Moved(2, e)) if e == ep(7)));
    // Unknown session indices and initiations are the node's too.
    let mut init = VecDeque::new();
    let (mut c, _) = session(now);
    c.initiate(ep(2), true, &mut buf, &mut init);
    let init = init.pop_front().unwrap().payload;
    assert_eq!(b.receive(now, ep(1), &init, &mut buf), PlaneRx::NotMine);
}

#[test]
fn spoofed_and_misaddressed_packets_are_dropped_and_reported() {
    let now = Instant::now();
    let (mut a, mut b) = planes(now);
    for p in [
        udp(addr(5), addr(2), b"spoof"),
        udp(addr(1), addr(6), b"wrong"),
    ] {
        // Routed by hand: the plane seals whatever is routed to the link.
        let dst = Ipv6View::new_checked(&p).unwrap().dst();
        a.handle(ToPlane::Route(dst, 1, now + Duration::from_secs(60)));
        assert_eq!(a.send_tun_packet(now, &p), PlaneTx::Done);
    }
    assert!(carry(&mut a, &mut b, ep(1), now).is_empty());
    let tb = activity(&mut b, now);
    assert_eq!(tb[0].drops.spoofed_source, 1);
    assert_eq!(tb[0].drops.wrong_destination, 1);
    assert_eq!(tb[0].counters.rx_packets, 0);
    // Reported once: the next report starts from zero.
    assert_eq!(activity(&mut b, now)[0].drops, Drops::default());
    // A replayed datagram is refused and counted.
    let p = udp(addr(1), addr(2), b"once");
    assert_eq!(a.send_tun_packet(now, &p), PlaneTx::Done);
    let d = a.poll_transmit().unwrap().payload;
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        b.receive(now, ep(1), &d, &mut buf),
        PlaneRx::InPlace(p.len())
    );
    assert_eq!(b.receive(now, ep(1), &d, &mut buf), PlaneRx::Done);
    assert_eq!(activity(&mut b, now)[0].drops.replay, 1);
}

#[test]
fn a_withdrawn_link_comes_back_with_its_counts_and_its_routes_go() {
    let now = Instant::now();
    let (mut a, mut b) = planes(now);
    let p = udp(addr(1), addr(2), b"before");
    assert_eq!(a.send_tun_packet(now, &p), PlaneTx::Done);
    assert_eq!(carry(&mut a, &mut b, ep(1), now).len(), 1);
    a.handle(ToPlane::Withdraw(1));
    let lane = match a.poll_event() {
        Some(FromPlane::Returned(lane)) => lane,
        _ => panic!("no link came back"),
    };
    assert_eq!(lane.index(), 1);
    assert_eq!(lane.chan.counters.tx_packets, 1);
    assert_eq!(a.links(), 0);
    assert_eq!(a.send_tun_packet(now, &p), PlaneTx::NotMine);
    // A frame for it that crossed the withdrawal is lost, and counted.
    a.handle(ToPlane::Seal(1, vec![0u8; 60]));
    assert_eq!(a.lost, 1);
    assert!(a.poll_transmit().is_none());
    // Handed again, it carries on with the same session.
    a.handle(ToPlane::Handoff(lane));
    a.handle(ToPlane::Route(addr(2), 1, now + Duration::from_secs(60)));
    let p = udp(addr(1), addr(2), b"after");
    assert_eq!(a.send_tun_packet(now, &p), PlaneTx::Done);
    assert_eq!(carry(&mut a, &mut b, ep(1), now), vec![p]);
}

/// A packet sealed while the link has no session waits in boringtun for
/// the handshake; the response, opened by the plane into a buffer only as
/// long as the datagram (as the daemon's data thread passes), sends it.
#[test]
fn packets_that_waited_for_a_handshake_leave_with_its_response() {
    let now = Instant::now();
    let (ka, kb) = (
        x25519::StaticSecret::from([3u8; 32]),
        x25519::StaticSecret::from([4u8; 32]),
    );
    let (pa, pb) = (
        x25519::PublicKey::from(&ka).to_bytes(),
        x25519::PublicKey::from(&kb).to_bytes(),
    );
    let ca = Channel::new(setup(&ka), 1, pb, Some(ep(2)), false, now);
    let mut cb = Channel::new(setup(&kb), 2, pa, Some(ep(1)), false, now);
    let mut a = DataPlane::new(addr(1), MTU, None);
    a.handle(ToPlane::Handoff(Box::new(Lane::new(1, ca, addr(2)))));
    a.handle(ToPlane::Route(addr(2), 1, now + Duration::from_secs(60)));
    let p = udp(addr(1), addr(2), b"waited");
    assert_eq!(a.send_tun_packet(now, &p), PlaneTx::Done);
    // What went out is the initiation; the packet waits.
    let init = a.poll_transmit().expect("an initiation").payload;
    assert!(a.poll_transmit().is_none());
    let mut big = vec![0u8; 4096];
    let mut to_a = VecDeque::new();
    assert!(matches!(
        cb.open(ep(1), &init, &mut big, &mut to_a),
        Opened::Authentic(None)
    ));
    let resp = to_a.pop_front().expect("a response").payload;
    let mut small = vec![0u8; resp.len()];
    assert_eq!(a.receive(now, ep(2), &resp, &mut small), PlaneRx::Done);
    let mut got = Vec::new();
    while let Some(t) = a.poll_transmit() {
        let mut to_b = VecDeque::new();
        match cb.open(ep(1), &t.payload, &mut big, &mut to_b) {
            Opened::Authentic(Some(n)) => got.push(big[..n].to_vec()),
            Opened::Authentic(None) => got.push(Vec::new()),
            _ => got.push(b"refused".to_vec()),
        }
    }
    assert!(got.contains(&p), "the packet did not arrive: {got:?}");
}

/// A cookie reply proves nothing about its sender: from another endpoint
/// than the link's it is refused, and it moves nothing.
#[test]
fn a_cookie_reply_from_elsewhere_moves_nothing() {
    let now = Instant::now();
    let (mut a, _b) = planes(now);
    // Type 3, receiver index 1 << 8 (link 1), then nonce and sealed cookie.
    let mut cookie = vec![0u8; 64];
    cookie[0] = 3;
    cookie[4..8].copy_from_slice(&(1u32 << 8).to_le_bytes());
    let mut buf = vec![0u8; 4096];
    assert_eq!(a.receive(now, ep(7), &cookie, &mut buf), PlaneRx::NotMine);
    assert_eq!(a.admit(now, 1, ep(7), &cookie, &mut buf), PlaneRx::Done);
    assert!(a.poll_event().is_none(), "nothing moved");
    assert!(a.poll_transmit().is_none());
}

/// Two channels with a session between them, as `session` makes, with
/// their own keys, indices and endpoints.
fn session_between(now: Instant, a: (u8, u32, u8), b: (u8, u32, u8)) -> (Channel, Channel) {
    let (ka, kb) = (
        x25519::StaticSecret::from([a.0; 32]),
        x25519::StaticSecret::from([b.0; 32]),
    );
    let (pa, pb) = (
        x25519::PublicKey::from(&ka).to_bytes(),
        x25519::PublicKey::from(&kb).to_bytes(),
    );
    let mut ca = Channel::new(setup(&ka), a.1, pb, Some(ep(b.2)), true, now);
    let mut cb = Channel::new(setup(&kb), b.1, pa, Some(ep(a.2)), true, now);
    let mut buf = vec![0u8; 4096];
    let mut to_b = VecDeque::new();
    ca.initiate(ep(b.2), true, &mut buf, &mut to_b);
    let init = to_b.pop_front().expect("an initiation").payload;
    let mut to_a = VecDeque::new();
    assert!(matches!(
        cb.open(ep(a.2), &init, &mut buf, &mut to_a),
        Opened::Authentic(None)
    ));
    let resp = to_a.pop_front().expect("a response").payload;
    assert!(matches!(
        ca.open(ep(b.2), &resp, &mut buf, &mut VecDeque::new()),
        Opened::Authentic(None)
    ));
    (ca, cb)
}

/// The cell in a control frame that reached a plane's node.
fn cell_of(p: &mut DataPlane) -> Option<Vec<u8>> {
    while let Some(e) = p.poll_event() {
        if let FromPlane::Inner { packet, .. } = e {
            let view = Ipv6View::new_checked(&packet).ok()?;
            let (ty, body) = wire::control_of(view)?;
            assert_eq!(ty, MSG_CELL);
            return Some(body.to_vec());
        }
    }
    None
}

/// The plane's report on circuits' cells, asked for now.
fn cell_report(p: &mut DataPlane) -> Box<CellReport> {
    p.report();
    std::iter::from_fn(|| p.poll_event())
        .find_map(|e| match e {
            FromPlane::Relayed(x) => Some(x),
            _ => None,
        })
        .expect("a report on circuits' cells")
}

/// Hands R's plane relayed circuit `h`: ID 40 on link 1 (towards S), 41
/// on link 2 (towards N).
fn relay_40_41(h: u64, keys: Arc<HopKeys>) -> ToPlane {
    ToPlane::Relay(Box::new(Relay {
        h,
        prev: (1, 40),
        next: Some((2, 41)),
        keys,
        replay: Arc::default(),
        src: None,
    }))
}

/// Routes S's packets to N (`addr(3)`) on circuit 5, which S built over
/// R (ID 40 on link 10) with these hops' keys, until `until`.
fn route_s_n(
    keys: &[Arc<HopKeys>],
    counter: &crate::proto::node::circuits::CellCounter,
    compress: bool,
    until: Instant,
) -> ToPlane {
    ToPlane::RouteCircuit(
        Box::new(OutRoute {
            id: CircuitRef::Built(5),
            dst: addr(3),
            link: 10,
            circ: 40,
            keys: keys.to_vec(),
            replays: keys.iter().map(|_| Arc::default()).collect(),
            counter: counter.clone(),
            compress,
            always_large: false,
        }),
        until,
    )
}

/// Planes for S (`addr(1)`), R (`addr(2)`) and N (`addr(3)`), with a
/// link S–R (indices 10 and 1) and a link R–N (2 and 11); R's plane has
/// the relay bandwidth budget `bucket`.
fn relay_line(now: Instant, bucket: Option<ByteBucket>) -> [DataPlane; 3] {
    let (s_r, r_s) = session_between(now, (5, 10, 1), (6, 1, 2));
    let (r_n, n_r) = session_between(now, (6, 2, 2), (7, 11, 3));
    let mut s = DataPlane::new(addr(1), MTU, None);
    let mut r = DataPlane::new(addr(2), MTU, bucket);
    let mut n = DataPlane::new(addr(3), MTU, None);
    s.handle(ToPlane::Handoff(Box::new(Lane::new(10, s_r, addr(2)))));
    r.handle(ToPlane::Handoff(Box::new(Lane::new(1, r_s, addr(1)))));
    r.handle(ToPlane::Handoff(Box::new(Lane::new(2, r_n, addr(3)))));
    n.handle(ToPlane::Handoff(Box::new(Lane::new(11, n_r, addr(2)))));
    [s, r, n]
}

/// A relay's plane between a source S (`addr(1)`) and the next hop N
/// (`addr(3)`): R (`addr(2)`) holds both links and, once the node hands it
/// the circuit, passes cells on either way with its layer off or on, opens
/// what is addressed to R for its node (once), and leaves the node what
/// runs on circuits it does not hold.
#[test]
fn a_relayed_circuit_passes_cells_on_without_the_node() {
    use crate::proto::node::circuits::pair;
    use crate::proto::onion::{self, CellKind, Cmd, Forward, CELL_HEADER, CELL_SMALL};
    let now = Instant::now();
    let [mut s, mut r, mut n] = relay_line(now, None);
    // The circuit: ID 40 between S and R, 41 between R and N.
    let ((src_r, hop_r), (src_n, hop_n)) = (pair(), pair());
    let path = [src_r, src_n];
    let hop_r = Arc::new(hop_r);
    // S sends a forward cell for N, and one for R.
    let send = |s: &mut DataPlane, target: usize, data: &[u8]| -> Vec<u8> {
        let mut cell = vec![0u8; CELL_SMALL];
        let nonce = onion::wrap(&path, target, 1, Cmd::Probe, data, &mut cell[CELL_HEADER..]);
        onion::write_header(&mut cell, 40, CellKind::Relay, &nonce);
        let mut frame = Vec::new();
        wire::encode_control(addr(1), addr(2), MSG_CELL, &cell, &mut frame);
        s.handle(ToPlane::Seal(10, frame));
        cell
    };
    // Before the hand-over, R's node sees it.
    let sent = send(&mut s, 1, b"to n");
    assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    assert_eq!(cell_of(&mut r), Some(sent));
    r.handle(relay_40_41(7, hop_r.clone()));
    assert_eq!(r.relayed(), 1);
    send(&mut s, 1, b"to n");
    assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    assert!(!r.has_events(), "R's node saw nothing");
    assert!(carry(&mut r, &mut n, ep(2), now).is_empty());
    let mut got = cell_of(&mut n).expect("the cell reached N");
    let hdr = onion::parse_cell(&got).unwrap();
    assert_eq!((hdr.circ, hdr.kind), (41, CellKind::Relay));
    let mut nonce = hdr.nonce;
    match hop_n.forward(&mut nonce, &mut got[CELL_HEADER..]) {
        Ok(Forward::Mine(_, Cmd::Probe, range)) => {
            assert_eq!(
                &got[CELL_HEADER + range.start..CELL_HEADER + range.end],
                b"to n"
            )
        }
        other => panic!("N could not open it: {other:?}"),
    }
    // A cell for R itself: R's plane opens it and gives R's node the
    // command; the same cell again is a replay, dropped and counted.
    for _ in 0..2 {
        send(&mut s, 0, b"to r");
        assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    }
    let opened: Vec<_> = std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            FromPlane::Opened(c) => Some((c.circuit, c.hop, c.cmd, c.data)),
            _ => None,
        })
        .collect();
    assert_eq!(
        opened,
        vec![(CircuitRef::Carried(7), 0, Cmd::Probe, b"to r".to_vec())],
        "opened once, for the node"
    );
    assert!(r.poll_transmit().is_none(), "nothing passed on");
    // Backward: N's cell gets R's layer and reaches S, who sees N spoke.
    let mut cell = vec![0u8; CELL_SMALL];
    let nonce = hop_n.originate(1, Cmd::ProbeReply, b"back", &mut cell[CELL_HEADER..]);
    onion::write_header(&mut cell, 41, CellKind::Relay, &nonce);
    let mut frame = Vec::new();
    wire::encode_control(addr(3), addr(2), MSG_CELL, &cell, &mut frame);
    n.handle(ToPlane::Seal(11, frame));
    assert!(carry(&mut n, &mut r, ep(3), now).is_empty());
    assert!(carry(&mut r, &mut s, ep(2), now).is_empty());
    let mut got = cell_of(&mut s).expect("the cell reached S");
    let hdr = onion::parse_cell(&got).unwrap();
    assert_eq!(hdr.circ, 40);
    let u = onion::unwrap(&path, hdr.nonce, &mut got[CELL_HEADER..]).expect("S opens it");
    assert_eq!((u.hop, u.command), (1, Cmd::ProbeReply));
    assert_eq!(
        &got[CELL_HEADER + u.data.start..CELL_HEADER + u.data.end],
        b"back"
    );
    // Counted for the node: two cells passed on, one each way, and the
    // replay.
    let report = cell_report(&mut r);
    assert_eq!((report.cells, report.bytes), (2, 2 * CELL_SMALL as u64));
    assert_eq!(report.drops.replay, 1);
    assert_eq!(
        report.circuits,
        vec![(7, now, CELL_SMALL as u64, CELL_SMALL as u64)]
    );
    r.report();
    assert!(
        !std::iter::from_fn(|| r.poll_event()).any(|e| matches!(e, FromPlane::Relayed(_))),
        "nothing new, no report"
    );
    // Taken back (the circuit ended): its cells are the node's again.
    r.handle(ToPlane::Unrelay(7));
    assert_eq!(r.relayed(), 0);
    let sent = send(&mut s, 1, b"late");
    assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    assert_eq!(cell_of(&mut r), Some(sent));
    // A link withdrawn takes its circuits with it.
    r.handle(relay_40_41(8, hop_r.clone()));
    r.handle(ToPlane::Withdraw(2));
    assert_eq!(r.relayed(), 0);
    // A circuit that crossed its link's withdrawal is refused, and the
    // node told.
    while r.poll_event().is_some() {}
    r.handle(relay_40_41(9, hop_r));
    assert_eq!(r.relayed(), 0);
    assert!(matches!(r.poll_event(), Some(FromPlane::Unrelayed(9))));
}

/// The relay bandwidth cap holds for the cells the plane passes on.
#[test]
fn a_relay_plane_keeps_to_the_bandwidth_cap() {
    use crate::proto::node::circuits::{pair, relay_bucket};
    use crate::proto::onion::{self, CellKind, Cmd, CELL_HEADER, CELL_LARGE};
    let now = Instant::now();
    // The smallest burst: four large cells.
    let [mut s, mut r, _n] = relay_line(now, Some(relay_bucket(1)));
    let ((src_r, hop_r), (src_n, _)) = (pair(), pair());
    let path = [src_r, src_n];
    r.handle(relay_40_41(1, Arc::new(hop_r)));
    for i in 0..6 {
        let mut cell = vec![0u8; CELL_LARGE];
        let nonce = onion::wrap(&path, 1, i, Cmd::Probe, b"x", &mut cell[CELL_HEADER..]);
        onion::write_header(&mut cell, 40, CellKind::Relay, &nonce);
        let mut frame = Vec::new();
        wire::encode_control(addr(1), addr(2), MSG_CELL, &cell, &mut frame);
        s.handle(ToPlane::Seal(10, frame));
    }
    assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    let mut passed = 0;
    while r.poll_transmit().is_some() {
        passed += 1;
    }
    assert_eq!(passed, 4, "a burst of four large cells");
    // The cells the node passes on over the plane's links spend the same
    // budget: nothing left for them now, a large cell's worth a second
    // later... at one byte a second, never.
    let mut frame = Vec::new();
    wire::encode_control(addr(2), addr(3), MSG_CELL, &[0u8; CELL_LARGE], &mut frame);
    r.handle(ToPlane::SealRelayed(2, frame, now));
    assert!(r.poll_transmit().is_none(), "over the cap");
    let report = cell_report(&mut r);
    assert_eq!((report.cells, report.over_bandwidth), (4, 3));
    // Without a cap the node's cells go out, counted as passed on.
    let [_s, mut r, _n] = relay_line(now, None);
    let mut frame = Vec::new();
    wire::encode_control(addr(2), addr(3), MSG_CELL, &[0u8; CELL_LARGE], &mut frame);
    r.handle(ToPlane::SealRelayed(2, frame, now));
    assert!(r.poll_transmit().is_some());
    let report = cell_report(&mut r);
    assert_eq!((report.cells, report.bytes), (1, CELL_LARGE as u64));
}

/// Reports wait for a node that is slow to take them: the timers make no
/// new ones meanwhile, so they never pile up.
#[test]
fn reports_do_not_pile_up_behind_a_busy_node() {
    let now = Instant::now();
    let (mut a, _b) = planes(now);
    for _ in 0..100 {
        a.handle_timeout(now);
    }
    let queued = std::iter::from_fn(|| a.poll_event()).count();
    assert_eq!(queued, 1, "one link, one report");
    a.handle_timeout(now);
    assert_eq!(activity(&mut a, now).len(), 1, "taken, made again");
    // Asked for, one is made all the same.
    a.handle_timeout(now);
    a.report();
    assert_eq!(std::iter::from_fn(|| a.poll_event()).count(), 2);
}

/// A source's plane sends DATA on a circuit it was routed to: S wraps the
/// packet for N (through R, whose plane passes it on), numbering it from
/// the count it shares with its node; what is too big for a cell, an
/// address no longer routed and a withdrawn link go to the node.
#[test]
fn a_routed_circuit_carries_data_without_the_node() {
    use crate::proto::node::circuits::{pair, CellCounter, CIRCUIT_MTU};
    use crate::proto::onion::{Cmd, Forward, CELL_HEADER};
    let now = Instant::now();
    let [mut s, mut r, mut n] = relay_line(now, None);
    let ((src_r, hop_r), (src_n, hop_n)) = (pair(), pair());
    r.handle(relay_40_41(1, Arc::new(hop_r)));
    let counter = CellCounter::default();
    let keys = vec![Arc::new(src_r), Arc::new(src_n)];
    let route = |s: &mut DataPlane| {
        s.handle(route_s_n(
            &keys,
            &counter,
            false,
            now + Duration::from_secs(5),
        ))
    };
    route(&mut s);
    // The node numbered one cell on the circuit already.
    assert_eq!(counter.next(), 1);
    let p = udp(addr(1), addr(3), b"over the circuit");
    assert_eq!(s.send_tun_packet(now, &p), PlaneTx::Done);
    assert!(!s.has_events(), "S's node saw nothing");
    assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    assert!(carry(&mut r, &mut n, ep(2), now).is_empty());
    let mut cell = cell_of(&mut n).expect("the cell reached N");
    let hdr = onion::parse_cell(&cell).unwrap();
    assert_eq!(hdr.circ, 41);
    let mut nonce = hdr.nonce;
    match hop_n.forward(&mut nonce, &mut cell[CELL_HEADER..]) {
        Ok(Forward::Mine(2, Cmd::Data, range)) => {
            assert_eq!(
                &cell[CELL_HEADER + range.start..CELL_HEADER + range.end],
                &p[..]
            )
        }
        other => panic!("N could not open it as the second cell: {other:?}"),
    }
    assert_eq!(counter.next(), 3, "the plane took number 2");
    // Reported for the node's idle timer and counters.
    let report = cell_report(&mut s);
    assert_eq!(
        report.sent,
        vec![(CircuitRef::Built(5), now, p.len() as u64)]
    );
    // Too big for a cell: the node's (it answers Packet Too Big).
    let big = udp(addr(1), addr(3), &vec![0u8; CIRCUIT_MTU]);
    assert_eq!(s.send_tun_packet(now, &big), PlaneTx::NotMine);
    // The grant ends, the route goes, the link goes: the node's again.
    let later = now + Duration::from_secs(6);
    assert_eq!(s.send_tun_packet(later, &p), PlaneTx::NotMine);
    s.handle(ToPlane::Unroute(addr(3)));
    assert_eq!(s.send_tun_packet(now, &p), PlaneTx::NotMine);
    // Timers drop a grant that ran out (with the circuit's keys), even if
    // the node never takes it back.
    route(&mut s);
    s.handle_timeout(later);
    assert_eq!(s.send_tun_packet(now, &p), PlaneTx::NotMine);
    while s.poll_event().is_some() {}
    // A withdrawn link takes the circuit's route with it, and what was
    // sent on it is still reported.
    route(&mut s);
    assert_eq!(s.send_tun_packet(now, &p), PlaneTx::Done);
    s.handle(ToPlane::Withdraw(10));
    // A grant over a link the plane doesn't hold is ignored.
    route(&mut s);
    let lane = std::iter::from_fn(|| s.poll_event())
        .find_map(|e| match e {
            FromPlane::Returned(lane) => Some(lane),
            _ => None,
        })
        .expect("the link came back");
    s.handle(ToPlane::Handoff(lane));
    assert_eq!(
        s.send_tun_packet(now, &p),
        PlaneTx::NotMine,
        "no route came back with the link"
    );
    let report = cell_report(&mut s);
    assert_eq!(
        report.sent,
        vec![(CircuitRef::Built(5), now, p.len() as u64)]
    );
}

/// A circuit S → R → N whose every part is on a plane: S's route to it,
/// R relaying, N ending it (its source authenticated as S) with a route
/// back. Packets cross both ways with no node involved; at N, DATA that
/// claims another source, a replay and DATA on a circuit that never
/// authenticated are dropped and counted; at S, a hop's answer goes to the
/// node opened; and the circuit's end at N takes its route back with it.
#[test]
fn a_circuit_carries_data_both_ways_from_plane_to_plane() {
    use crate::proto::node::circuits::{pair, CellCounter};
    use crate::proto::onion::{self, CellKind, Cmd, CELL_HEADER, CELL_SMALL};
    let now = Instant::now();
    let until = now + Duration::from_secs(5);
    let [mut s, mut r, mut n] = relay_line(now, None);
    let ((src_r, hop_r), (src_n, hop_n)) = (pair(), pair());
    let (hop_r, hop_n) = (Arc::new(hop_r), Arc::new(hop_n));
    r.handle(relay_40_41(1, hop_r.clone()));
    let n_replay = Arc::new(crate::proto::onion::ReplayWindow::default());
    let end = |src: Option<Ipv6Addr>| {
        ToPlane::Relay(Box::new(Relay {
            h: 9,
            prev: (11, 41),
            next: None,
            keys: hop_n.clone(),
            replay: n_replay.clone(),
            src,
        }))
    };
    n.handle(end(Some(addr(1))));
    let keys = vec![Arc::new(src_r), Arc::new(src_n)];
    let (s_ctr, n_ctr) = (CellCounter::default(), CellCounter::default());
    s.handle(route_s_n(&keys, &s_ctr, true, until));
    n.handle(ToPlane::RouteCircuit(
        Box::new(OutRoute {
            id: CircuitRef::Carried(9),
            dst: addr(1),
            link: 11,
            circ: 41,
            keys: vec![hop_n.clone()],
            replays: Vec::new(),
            counter: n_ctr.clone(),
            compress: true,
            always_large: false,
        }),
        until,
    ));
    // Forward: S's packet reaches N's TUN (compressible, so rebuilt there).
    let there = udp(addr(1), addr(3), &[7u8; 600]);
    assert_eq!(s.send_tun_packet(now, &there), PlaneTx::Done);
    assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    assert_eq!(carry(&mut r, &mut n, ep(2), now), vec![there.clone()]);
    // Back: N's reply reaches S's TUN, as it was.
    let back = udp(addr(3), addr(1), b"the reply");
    assert_eq!(n.send_tun_packet(now, &back), PlaneTx::Done);
    assert!(carry(&mut n, &mut r, ep(3), now).is_empty());
    assert_eq!(carry(&mut r, &mut s, ep(2), now), vec![back.clone()]);
    for p in [&mut s, &mut r, &mut n] {
        assert!(
            !std::iter::from_fn(|| p.poll_event()).any(|e| matches!(
                e,
                FromPlane::Inner { .. } | FromPlane::Opened(_) | FromPlane::Unrouted(..)
            )),
            "no node saw a cell"
        );
    }
    // Counted for the nodes: what each end delivered and sent.
    let at_n = cell_report(&mut n);
    assert_eq!(at_n.received, vec![(CircuitRef::Carried(9), now, 640)]);
    assert_eq!(
        at_n.sent,
        vec![(CircuitRef::Carried(9), now, back.len() as u64)]
    );
    let at_s = cell_report(&mut s);
    assert_eq!(
        at_s.received,
        vec![(CircuitRef::Built(5), now, back.len() as u64)]
    );
    // S's cells for N, built by hand: N's plane checks every one.
    let to_n = |ctr: u64, packet: &[u8]| {
        let mut cell = vec![0u8; CELL_SMALL];
        let (head, body) = cell.split_at_mut(CELL_HEADER);
        let nonce = onion::wrap(&keys, 1, ctr, Cmd::Data, packet, body);
        onion::write_header(head, 40, CellKind::Relay, &nonce);
        let mut frame = Vec::new();
        wire::encode_control(addr(1), addr(2), MSG_CELL, &cell, &mut frame);
        frame
    };
    let ctr = s_ctr.next();
    let spoofed = udp(addr(4), addr(3), b"in another's name");
    let fine = udp(addr(1), addr(3), b"once");
    for frame in [
        to_n(ctr, &spoofed),
        to_n(ctr + 1, &fine),
        to_n(ctr + 1, &fine),
    ] {
        s.handle(ToPlane::Seal(10, frame));
    }
    assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    assert_eq!(carry(&mut r, &mut n, ep(2), now), vec![fine.clone()]);
    let drops = cell_report(&mut n).drops;
    assert_eq!((drops.spoofed_source, drops.replay), (1, 1));
    // A hop's answer at S goes to S's node, opened.
    let mut cell = vec![0u8; CELL_SMALL];
    let nonce = hop_r.originate(1, Cmd::ProbeReply, b"pong", &mut cell[CELL_HEADER..]);
    onion::write_header(&mut cell, 40, CellKind::Relay, &nonce);
    let mut frame = Vec::new();
    wire::encode_control(addr(2), addr(1), MSG_CELL, &cell, &mut frame);
    r.handle(ToPlane::Seal(1, frame));
    assert!(carry(&mut r, &mut s, ep(2), now).is_empty());
    let opened = std::iter::from_fn(|| s.poll_event()).find_map(|e| match e {
        FromPlane::Opened(c) => Some((c.circuit, c.hop, c.cmd, c.data)),
        _ => None,
    });
    assert_eq!(
        opened,
        Some((CircuitRef::Built(5), 0, Cmd::ProbeReply, b"pong".to_vec()))
    );
    // The circuit ends at N: its cells are N's node's again, and the route
    // back goes (the node is told).
    n.handle(ToPlane::Unrelay(9));
    assert_eq!(n.relayed(), 0);
    assert!(std::iter::from_fn(|| n.poll_event())
        .any(|e| matches!(e, FromPlane::Unrouted(a, t) if a == addr(1) && t == until)));
    assert_eq!(n.send_tun_packet(now, &back), PlaneTx::NotMine);
    // Taken again with no authenticated source, its DATA is dropped.
    n.handle(end(None));
    s.handle(ToPlane::Seal(10, to_n(ctr + 2, &fine)));
    assert!(carry(&mut s, &mut r, ep(1), now).is_empty());
    assert!(carry(&mut r, &mut n, ep(2), now).is_empty());
    let d = cell_report(&mut n).drops;
    assert_eq!(d.unauthenticated, 1, "{d:?}");
}

/// A relay whose two links sit on two planes (`link.workers = 2`: link 1,
/// to S, on plane 1 of 2; link 2, to N, on plane 0): both hold the
/// circuit, each passes on the cells arriving on its link and gives them
/// to the other to seal, and the buffers go back in batches, so once warm
/// neither plane allocates per cell, either way.
#[test]
fn a_relay_split_over_two_planes_passes_cells_both_ways() {
    use crate::proto::node::circuits::pair;
    use crate::proto::node::tests::alloc::counted;
    use crate::proto::onion::{self, CellKind, Cmd, Forward, CELL_HEADER, CELL_SMALL};
    let now = Instant::now();
    let (s_r, r_s) = session_between(now, (5, 10, 1), (6, 1, 2));
    let (r_n, n_r) = session_between(now, (6, 2, 2), (7, 11, 3));
    let mut s = DataPlane::new(addr(1), MTU, None);
    let mut n = DataPlane::new(addr(3), MTU, None);
    let mut r = [
        DataPlane::new(addr(2), MTU, None),
        DataPlane::new(addr(2), MTU, None),
    ];
    for (i, p) in r.iter_mut().enumerate() {
        p.set_worker(i, 2);
    }
    fn give(r: &mut [DataPlane; 2], m: ToPlane) {
        m.dispatch(2, |w, m| r[w].handle(m));
    }
    s.handle(ToPlane::Handoff(Box::new(Lane::new(10, s_r, addr(2)))));
    give(
        &mut r,
        ToPlane::Handoff(Box::new(Lane::new(1, r_s, addr(1)))),
    );
    give(
        &mut r,
        ToPlane::Handoff(Box::new(Lane::new(2, r_n, addr(3)))),
    );
    n.handle(ToPlane::Handoff(Box::new(Lane::new(11, n_r, addr(2)))));
    assert_eq!((r[0].links(), r[1].links()), (1, 1));
    let ((src_r, hop_r), (src_n, hop_n)) = (pair(), pair());
    let path = [src_r, src_n];
    give(&mut r, relay_40_41(7, Arc::new(hop_r)));
    assert_eq!((r[0].relayed(), r[1].relayed()), (1, 1), "both hold it");
    // One datagram from `from` (a plane outside R) through R's planes
    // (`first` receives it) to the far side; returns it and R's
    // allocations.
    let (mut batch, mut others) = (SendBatch::default(), Vec::new());
    let mut buf = vec![0u8; 4096];
    let mut through = |r: &mut [DataPlane; 2], d: &[u8], src: SocketAddr, first: usize| {
        let (_, allocs) = counted(|| {
            assert_eq!(r[first].receive(now, src, d, &mut buf), PlaneRx::Done);
            for w in [first, 1 - first, first] {
                while let Some(m) = r[w].poll_crossing() {
                    m.dispatch(2, |v, m| {
                        if v != w {
                            r[v].handle(m);
                        }
                    });
                }
            }
            r[1 - first].take_output(&mut batch, &mut others);
        });
        assert!(
            !r[0].has_events() && !r[1].has_events(),
            "R's node was asked"
        );
        assert!(others.is_empty());
        let out: Vec<u8> = {
            let mut sent = batch.datagrams();
            let (_, d) = sent.next().expect("R passed it on");
            assert!(sent.next().is_none());
            d.to_vec()
        };
        batch.clear();
        (out, allocs)
    };
    let mut got = vec![0u8; 4096];
    // One way at a time, as a bulk transfer's data: the plane that passes
    // cells over gets no buffers back with cells the other way.
    let mut fwd_allocs = 0;
    for round in 0..300u64 {
        // Forward: S's cell for N.
        let mut cell = vec![0u8; CELL_SMALL];
        let nonce = onion::wrap(
            &path,
            1,
            round + 1,
            Cmd::Probe,
            b"to n",
            &mut cell[CELL_HEADER..],
        );
        onion::write_header(&mut cell, 40, CellKind::Relay, &nonce);
        let mut frame = Vec::new();
        wire::encode_control(addr(1), addr(2), MSG_CELL, &cell, &mut frame);
        s.handle(ToPlane::Seal(10, frame));
        let t = s.poll_transmit().expect("S sent it");
        let (d, allocs) = through(&mut r, &t.payload, ep(1), 1);
        if round >= 100 {
            fwd_allocs += allocs;
        }
        assert_eq!(n.receive(now, ep(2), &d, &mut got), PlaneRx::Done);
        let mut c = cell_of(&mut n).expect("the cell reached N");
        let hdr = onion::parse_cell(&c).unwrap();
        assert_eq!(hdr.circ, 41);
        let mut nonce = hdr.nonce;
        assert!(matches!(
            hop_n.forward(&mut nonce, &mut c[CELL_HEADER..]),
            Ok(Forward::Mine(_, Cmd::Probe, _))
        ));
    }
    let mut bwd_allocs = 0;
    for round in 0..300u64 {
        // Backward: N's answers for S.
        let mut cell = vec![0u8; CELL_SMALL];
        let nonce = hop_n.originate(
            round + 1,
            Cmd::ProbeReply,
            b"back",
            &mut cell[CELL_HEADER..],
        );
        onion::write_header(&mut cell, 41, CellKind::Relay, &nonce);
        let mut frame = Vec::new();
        wire::encode_control(addr(3), addr(2), MSG_CELL, &cell, &mut frame);
        n.handle(ToPlane::Seal(11, frame));
        let t = n.poll_transmit().expect("N sent it");
        let (d, allocs) = through(&mut r, &t.payload, ep(3), 0);
        if round >= 100 {
            bwd_allocs += allocs;
        }
        assert_eq!(s.receive(now, ep(2), &d, &mut got), PlaneRx::Done);
        let mut c = cell_of(&mut s).expect("the cell reached S");
        let hdr = onion::parse_cell(&c).unwrap();
        assert_eq!(hdr.circ, 40);
        let u = onion::unwrap(&path, hdr.nonce, &mut c[CELL_HEADER..]).expect("S opens it");
        assert_eq!((u.hop, u.command), (1, Cmd::ProbeReply));
    }
    println!(
        "a relay split over two planes, allocations per cell: forward {:.2}, back {:.2}",
        fwd_allocs as f64 / 200.0,
        bwd_allocs as f64 / 200.0
    );
    // The planes' own lists of returned buffers (one per batch of 32).
    assert!(
        fwd_allocs <= 200 / 32 + 1,
        "forward: {fwd_allocs} allocations"
    );
    assert!(bwd_allocs <= 200 / 32 + 1, "back: {bwd_allocs} allocations");
    // Each plane counts the cells it passed on.
    let (a, b) = (cell_report(&mut r[1]), cell_report(&mut r[0]));
    assert_eq!((a.cells, b.cells), (300, 300));
    // Gone from both when the node takes it back.
    give(&mut r, ToPlane::Unrelay(7));
    assert_eq!((r[0].relayed(), r[1].relayed()), (0, 0));
}
