//! Allocations on the packet path, counted: a global allocator for this
//! test binary that counts the allocations a thread makes while counting is
//! on, and a circuit A → relays → E (the `circuit_net` of the node tests)
//! driven by hand. Each node's work for a packet is counted: the source
//! wrapping it, every relay peeling a layer and sending the cell on, the
//! destination delivering it; the harness's own copies are not. Nodes are
//! driven as the shell's data path drives them: what a node sends is
//! sealed into its send batch and swapped out (`Node::take_output`). With
//! ALLOC_TRACE set, every counted allocation prints its backtrace.

use super::*;
use crate::proto::batch::SendBatch;
use crate::proto::node::plane::{PlaneRx, PlaneTx};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    /// Allocations by this thread while counting (None: not counting).
    static COUNT: Cell<Option<u64>> = const { Cell::new(None) };
}

fn note() {
    // try_with: the allocator may run while the thread is torn down.
    let _ = COUNT.try_with(|c| {
        if let Some(n) = c.get() {
            c.set(None);
            if std::env::var_os("ALLOC_TRACE").is_some() {
                eprintln!("ALLOC\n{}", std::backtrace::Backtrace::force_capture());
            }
            c.set(Some(n + 1));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter touches only a const-initialised thread-local `Cell`, which
// neither allocates nor has a destructor.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning what it returns and the allocations it made.
pub(in crate::proto::node) fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    COUNT.with(|c| c.set(Some(0)));
    let out = f();
    let n = COUNT.with(|c| c.replace(None)).unwrap_or(0);
    (out, n)
}

/// Allocations on one way across a circuit held by planes: at the plane
/// that sends, at the relays' (and the cells they passed on), and at the
/// plane that delivers.
#[derive(Default)]
struct Way {
    sender: u64,
    relays: u64,
    relayed: u64,
    receiver: u64,
}

impl Way {
    fn add(&mut self, o: &Way) {
        self.sender += o.sender;
        self.relays += o.relays;
        self.relayed += o.relayed;
        self.receiver += o.receiver;
    }
}

/// What [`cross`] sends and receives with, kept from call to call (as a
/// data thread keeps it).
struct Carrier {
    batch: SendBatch,
    others: Vec<Transmit>,
    buf: Vec<u8>,
}

impl Carrier {
    fn new() -> Carrier {
        Carrier {
            batch: SendBatch::default(),
            others: Vec::new(),
            buf: vec![0u8; 4096],
        }
    }
}

/// Hands `packet` to node `from`'s plane and carries what it sends plane to
/// plane over `relays` to node `to`'s plane, which must deliver it; no
/// node on the way may be asked anything.
fn cross(
    net: &mut Net,
    k: &mut Carrier,
    from: usize,
    to: usize,
    relays: &[usize],
    packet: &[u8],
) -> Way {
    let now = net.now;
    let mut w = Way::default();
    let Carrier { batch, others, buf } = k;
    let pa = net.nodes[from].0.plane().unwrap();
    let (done, n) = counted(|| {
        let done = pa.send_tun_packet(now, packet) == PlaneTx::Done;
        pa.take_output(batch, others);
        done
    });
    assert!(done, "node {from}'s plane sent it itself");
    assert!(!pa.has_events(), "node {from} was asked");
    w.sender = n;
    let mut ep = net.nodes[from].1;
    loop {
        let (dst, data) = {
            let mut sent = batch.datagrams();
            let (dst, d) = sent.next().expect("a node sent something");
            assert!(sent.next().is_none(), "one datagram per hop");
            (dst, d.to_vec())
        };
        let j = net.nodes.iter().position(|(_, e)| *e == dst).unwrap();
        let plane = net.nodes[j].0.plane().unwrap();
        if j == to {
            let (got, n) = counted(|| match plane.receive(now, ep, &data, buf) {
                PlaneRx::InPlace(n) => buf[..n] == packet[..],
                PlaneRx::Rebuilt(p) => p == packet,
                _ => false,
            });
            assert!(got, "delivered by node {to}'s plane");
            assert!(!plane.has_events(), "node {to} was asked");
            w.receiver = n;
            return w;
        }
        assert!(relays.contains(&j));
        let (done, n) = counted(|| {
            let done = plane.receive(now, ep, &data, buf) == PlaneRx::Done;
            plane.take_output(batch, others);
            done
        });
        assert!(done);
        assert!(!plane.has_events(), "relay {j} was asked");
        assert!(others.is_empty(), "only the batch is sent");
        (w.relays, w.relayed) = (w.relays + n, w.relayed + 1);
        ep = net.nodes[j].1;
    }
}

#[derive(Default, Debug)]
struct Tally {
    source: u64,
    relays: u64,
    cells_relayed: u64,
    destination: u64,
    delivered: u64,
}

/// Sends `packet` from node `a` and carries what follows hop by hop to
/// its end, counting each node's allocations. Each node works as the data
/// path drives it: the packet from the TUN and the datagrams that arrive
/// go in, and what the node sealed comes out in a send batch swapped
/// with the harness's own (`take_output`); nothing else is queued.
fn carry(
    net: &mut Net,
    (a, e): (usize, usize),
    relays: &[usize],
    packet: &[u8],
    batch: &mut SendBatch,
    t: &mut Tally,
) {
    let now = net.now;
    let mut others = Vec::new();
    let (_, n) = counted(|| {
        let reply = net.nodes[a].0.send_tun_packet(now, packet).is_some();
        net.nodes[a].0.take_output(batch, &mut others);
        reply
    });
    assert!(others.is_empty(), "only the batch is sent");
    t.source += n;
    let mut from = net.nodes[a].1;
    loop {
        // The harness copies the datagram (not counted).
        let (to, data) = {
            let mut sent = batch.datagrams();
            let Some((to, d)) = sent.next() else {
                panic!("a node sent nothing");
            };
            assert!(sent.next().is_none(), "one datagram per hop");
            (to, d.to_vec())
        };
        let j = net
            .nodes
            .iter()
            .position(|(_, ep)| *ep == to)
            .expect("a node");
        let (got, n) = counted(|| {
            let got = net.nodes[j].0.handle_datagram(now, from, &data).is_some();
            net.nodes[j].0.take_output(batch, &mut others);
            got
        });
        assert!(others.is_empty(), "only the batch is sent");
        if relays.contains(&j) {
            t.relays += n;
            t.cells_relayed += 1;
        } else if j == e {
            t.destination += n;
            t.delivered += u64::from(got);
            assert!(batch.is_empty(), "the destination sent nothing back");
            return;
        }
        from = net.nodes[j].1;
    }
}

/// The node tests' circuit network with a circuit built from node 0 to
/// node 5; returns the network, the addresses and the circuit's relays.
fn built_circuit(now: Instant) -> (Net, Vec<Ipv6Addr>, Vec<usize>) {
    let (mut net, addrs, ids) = circuit_net(now);
    let (a, e) = (0, 5);
    let p = udp_packet(addrs[a], addrs[e], b"build");
    let _ = net.nodes[a].0.handle_tun_packet(net.now, &p);
    let tun = advance(&mut net, 3.0);
    assert!(tun[e].contains(&p), "the circuit was built");
    let hops = net.nodes[a].0.circuits(net.now).circuits[0].hops.clone();
    let relays: Vec<usize> = hops
        .iter()
        .map(|h| ids.iter().position(|i| i == h).unwrap())
        .filter(|&i| i != e)
        .collect();
    assert!(!relays.is_empty());
    (net, addrs, relays)
}

#[test]
fn relays_allocate_nothing_per_cell() {
    // The node's own data path (a handed link's is counted below).
    NO_PLANE.set(true);
    let now = Instant::now();
    let (mut net, addrs, relays) = built_circuit(now);
    let (a, e) = (0, 5);
    // Warm up (buffers reach their sizes, spare buffers come back), then
    // count 200 packets of 1,000 bytes.
    let payload = vec![0x5a; 1000];
    let packet = udp_packet(addrs[a], addrs[e], &payload);
    let mut batch = SendBatch::default();
    let mut warm = Tally::default();
    for _ in 0..50 {
        carry(&mut net, (a, e), &relays, &packet, &mut batch, &mut warm);
    }
    let mut t = Tally::default();
    for _ in 0..200 {
        carry(&mut net, (a, e), &relays, &packet, &mut batch, &mut t);
    }
    println!(
        "allocations per packet over {} relays: source {:.2}, each relayed cell {:.2}, destination {:.2} ({} cells relayed, {} delivered)",
        relays.len(),
        t.source as f64 / 200.0,
        t.relays as f64 / t.cells_relayed.max(1) as f64,
        t.destination as f64 / 200.0,
        t.cells_relayed,
        t.delivered
    );
    assert_eq!(t.delivered, 200, "every packet arrived");
    assert_eq!(t.cells_relayed, 200 * relays.len() as u64);
    assert_eq!(t.relays, 0, "a relay allocated while forwarding cells");
    assert_eq!(
        t.source, 0,
        "the source allocated while sending on a circuit"
    );
    assert_eq!(
        t.destination, 0,
        "the destination allocated while delivering"
    );
}

#[test]
fn a_direct_link_allocates_nothing_per_packet() {
    NO_PLANE.set(true);
    let now = Instant::now();
    let mut net = linked_pair(now, identities(2), &endpoints(2));
    let (a, b) = (net.nodes[0].0.address(), net.nodes[1].0.address());
    assert!(net.nodes[0].0.link_up_to(&b));
    // Text-like payloads, so lz4 compresses them on the way.
    let line = b"<li><a href=\"/docs/page\">a page of the documentation</a></li>\n";
    let payload: Vec<u8> = line.iter().copied().cycle().take(1200).collect();
    let packet = udp_packet(a, b, &payload);
    let mut batch = SendBatch::default();
    let mut warm = Tally::default();
    for _ in 0..50 {
        carry(&mut net, (0, 1), &[], &packet, &mut batch, &mut warm);
    }
    let mut t = Tally::default();
    for _ in 0..200 {
        carry(&mut net, (0, 1), &[], &packet, &mut batch, &mut t);
    }
    println!(
        "allocations per packet on a direct link: sender {:.2}, receiver {:.2} ({} delivered)",
        t.source as f64 / 200.0,
        t.destination as f64 / 200.0,
        t.delivered
    );
    assert_eq!(t.delivered, 200, "every packet arrived");
    assert_eq!(t.source, 0, "the sender allocated per packet");
    assert_eq!(t.destination, 0, "the receiver allocated per packet");
    let st = net.nodes[0].0.status();
    assert!(
        st.links[0].counters.tx_compressed > 0,
        "packets were compressed"
    );
}

/// A link handed to a data plane, driven as a data thread would drive the
/// plane alone: the sender's plane seals the packet into a send batch it
/// swaps out, the receiver's opens it into the caller's buffer. Neither
/// allocates per packet, nor does either ask its node for anything.
#[test]
fn a_handed_link_allocates_nothing_per_packet() {
    let now = Instant::now();
    let (ids, eps) = (identities(2), endpoints(2));
    let peers_a = vec![uri(&ids[1], eps[1])];
    let mut it = ids.into_iter();
    let a = Node::new(it.next().unwrap(), 1, cfg(peers_a), now);
    let b = Node::new(it.next().unwrap(), 1, cfg(vec![]), now);
    let mut net = Net {
        nodes: vec![(Host::with_plane(a), eps[0]), (Host::with_plane(b), eps[1])],
        now,
    };
    net.run();
    let (a, b) = (net.nodes[0].0.address(), net.nodes[1].0.address());
    // The first packet goes through the node, which routes it over the
    // handed link and lets the plane send the next ones itself.
    let line = b"<li><a href=\"/docs/page\">a page of the documentation</a></li>\n";
    let payload: Vec<u8> = line.iter().copied().cycle().take(1200).collect();
    let packet = udp_packet(a, b, &payload);
    assert_eq!(net.send(0, &packet).as_deref(), Some(&packet[..]));
    assert_eq!(
        net.nodes[0].0.plane().unwrap().links(),
        1,
        "the link was handed over"
    );
    let from = eps[0];
    let mut batch = SendBatch::default();
    let mut others = Vec::new();
    let mut buf = vec![0u8; 4096];
    let (mut sender, mut receiver, mut delivered) = (0, 0, 0);
    for round in 0..250 {
        let (done, n) = counted(|| {
            let pa = net.nodes[0].0.plane().unwrap();
            let done = pa.send_tun_packet(now, &packet) == PlaneTx::Done;
            pa.take_output(&mut batch, &mut others);
            done
        });
        assert!(done, "the plane sent it itself");
        assert!(others.is_empty(), "only the batch is sent");
        let data = batch.datagrams().next().expect("a datagram").1.to_vec();
        let (got, m) = counted(|| {
            let pb = net.nodes[1].0.plane().unwrap();
            match pb.receive(now, from, &data, &mut buf) {
                PlaneRx::InPlace(n) => buf[..n] == packet[..],
                PlaneRx::Rebuilt(p) => p == &packet[..],
                _ => false,
            }
        });
        assert!(got, "delivered by the plane");
        // The first 50 warm up (buffers reach their sizes).
        if round >= 50 {
            (sender, receiver, delivered) = (sender + n, receiver + m, delivered + 1);
        }
    }
    println!(
        "allocations per packet on a handed link: sender {:.2}, receiver {:.2} ({delivered} delivered)",
        sender as f64 / 200.0,
        receiver as f64 / 200.0,
    );
    assert_eq!(sender, 0, "the sender's plane allocated per packet");
    assert_eq!(receiver, 0, "the receiver's plane allocated per packet");
    let st = net.nodes[0].0.status();
    assert!(
        st.links[0].counters.tx_compressed > 200,
        "packets were compressed"
    );
}

/// Relays whose data planes hold the circuit: once the first cells have
/// gone through each relay's node, which hands the circuit over, every
/// relay's plane passes the cells on alone — its node sees none of them —
/// and allocates nothing per cell. The source's plane, routed to the
/// circuit by its node, wraps and sends the packets alone too, and the
/// destination's plane, which took the circuit with its first DATA,
/// delivers them alone; and the same the other way, once the destination's
/// node routed its first reply back on the circuit.
#[test]
fn handed_relays_pass_cells_on_alone_and_allocate_nothing() {
    // One plane per node: the test carries datagrams plane to plane.
    PLANES.set(Some(1));
    let now = Instant::now();
    let (mut net, addrs, relays) = built_circuit(now);
    let (a, e) = (0, 5);
    let payload = vec![0x5a; 1000];
    let packet = udp_packet(addrs[a], addrs[e], &payload);
    let _ = net.nodes[a].0.handle_tun_packet(net.now, &packet);
    let tun = advance(&mut net, 1.0);
    assert!(tun[e].contains(&packet));
    for &r in &relays {
        let st = net.nodes[r].0.status();
        assert!(
            st.data_path.plane_circuits >= 1,
            "relay {r} did not hand the circuit over"
        );
        assert!(net.nodes[r].0.plane().unwrap().relayed() >= 1);
    }
    let before: Vec<u64> = relays
        .iter()
        .map(|&r| net.nodes[r].0.status().relay.cells_forwarded)
        .collect();
    let (mut way, mut delivered) = (Way::default(), 0u64);
    let mut k = Carrier::new();
    for round in 0..250 {
        // The source's node routed the destination to the circuit (with
        // the packet above): its plane wraps and seals the packet itself.
        let w = cross(&mut net, &mut k, a, e, &relays, &packet);
        // The first 50 warm up (buffers reach their sizes).
        if round >= 50 {
            way.add(&w);
            delivered += 1;
        }
    }
    println!(
        "forward, allocations: per cell on {} handed relays {:.2}; per packet at the source's plane {:.2}, at the destination's {:.2} ({} cells relayed, {delivered} delivered)",
        relays.len(),
        way.relays as f64 / way.relayed as f64,
        way.sender as f64 / 200.0,
        way.receiver as f64 / 200.0,
        way.relayed,
    );
    assert_eq!(way.relayed, 200 * relays.len() as u64);
    assert_eq!(way.relays, 0, "a relay's plane allocated per cell");
    assert_eq!(way.sender, 0, "the source's plane allocated per packet");
    assert_eq!(
        way.receiver, 0,
        "the destination's plane allocated per packet"
    );
    // The destination's first reply goes through its node, which routes
    // the source back on the circuit; its plane sends the next ones, and
    // the source's plane delivers them.
    let reply = udp_packet(addrs[e], addrs[a], &payload[..600]);
    let _ = net.nodes[e].0.handle_tun_packet(net.now, &reply);
    let tun = advance(&mut net, 1.0);
    assert!(tun[a].contains(&reply));
    let mut back = Way::default();
    let path: Vec<usize> = relays.iter().rev().copied().collect();
    for round in 0..250 {
        let w = cross(&mut net, &mut k, e, a, &path, &reply);
        if round >= 50 {
            back.add(&w);
        }
    }
    println!(
        "back, allocations: per cell on the relays {:.2}; per packet at the destination's plane {:.2}, at the source's {:.2}",
        back.relays as f64 / back.relayed as f64,
        back.sender as f64 / 200.0,
        back.receiver as f64 / 200.0,
    );
    assert_eq!(back.relayed, 200 * relays.len() as u64);
    assert_eq!(
        (back.relays, back.sender, back.receiver),
        (0, 0, 0),
        "a plane allocated on the way back"
    );
    // The source's node learns what its plane sent on the circuit (a
    // status asks the plane for a report).
    let _ = net.nodes[a].0.status();
    let c = &net.nodes[a].0.circuits(net.now).circuits[0];
    assert!(c.tx_bytes >= 250 * packet.len() as u64, "{c:?}");
    // The nodes learn what their planes passed on.
    for (k, &r) in relays.iter().enumerate() {
        let st = net.nodes[r].0.status();
        assert!(
            st.relay.cells_forwarded >= before[k] + 250,
            "relay {r}: {} cells counted",
            st.relay.cells_forwarded - before[k]
        );
    }
    // Idle, the source closes the circuit; its DESTROY takes it out of
    // every relay's plane and the destination's.
    assert_eq!(net.nodes[e].0.plane().unwrap().relayed(), 1);
    advance(&mut net, 200.0);
    assert!(
        net.nodes[a].0.circuits(net.now).circuits.is_empty(),
        "the idle circuit was closed"
    );
    for &r in relays.iter().chain([&e]) {
        assert_eq!(net.nodes[r].0.plane().unwrap().relayed(), 0, "node {r}");
        assert_eq!(net.nodes[r].0.status().data_path.plane_circuits, 0);
    }
}

/// With two data planes per node (`link.workers = 2`), links are spread
/// over them, and a relay whose two links sit on different planes is held
/// by both: each passes on the cells arriving on its link and gives them to
/// the other to seal. Packets cross the circuit both ways, every node on it
/// holds the circuit on its planes, and the relays' nodes count the cells.
#[test]
fn a_relay_between_two_planes_passes_cells_across() {
    PLANES.set(Some(2));
    let now = Instant::now();
    let (mut net, addrs, relays) = built_circuit(now);
    let (a, e) = (0, 5);
    let payload = vec![0x5a; 1000];
    let packet = udp_packet(addrs[a], addrs[e], &payload);
    let reply = udp_packet(addrs[e], addrs[a], &payload[..600]);
    let before: Vec<u64> = relays
        .iter()
        .map(|&r| net.nodes[r].0.status().relay.cells_forwarded)
        .collect();
    let (mut there, mut back) = (0, 0);
    for _ in 0..40 {
        // What a plane seals itself comes back to the caller to send.
        let _ = super::circuits::tun_send(&mut net, a, &packet);
        let tun = advance(&mut net, 0.25);
        there += tun[e].iter().filter(|p| **p == packet).count();
        let _ = super::circuits::tun_send(&mut net, e, &reply);
        let tun = advance(&mut net, 0.25);
        back += tun[a].iter().filter(|p| **p == reply).count();
    }
    assert_eq!((there, back), (40, 40), "delivered both ways");
    let mut crossed = 0;
    for (k, &r) in relays.iter().enumerate() {
        let st = net.nodes[r].0.status();
        assert!(st.data_path.plane_circuits >= 1, "relay {r} kept it");
        assert!(st.relay.cells_forwarded >= before[k] + 80, "relay {r}");
        assert_eq!(st.data_path.worker_links.len(), 2);
        let holding = net.nodes[r].0.planes_holding();
        assert!(holding >= 1, "relay {r}: no plane holds the circuit");
        crossed += usize::from(holding == 2);
    }
    println!(
        "{} relays, {crossed} with the circuit's links on two planes",
        relays.len()
    );
    // Idle, the circuit closes, and every plane lets it go.
    advance(&mut net, 200.0);
    for &r in relays.iter().chain([&e]) {
        assert_eq!(net.nodes[r].0.planes_holding(), 0, "node {r}");
    }
}
