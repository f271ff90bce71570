//! Whole nodes on a virtual clock: real [`Node`]s (WireGuard links through
//! boringtun, hellos, the DHT, circuits) exchanging datagrams over an
//! in-memory network, in one thread. Each node hands its established links
//! to a data plane of its own, as the daemon does (`qgate::proto::node::Host`
//! passes the messages between them).
//!
//! Time: the core is given `base + offset` as `now`; boringtun, built with
//! its `mock-instant` feature in this crate only, reads mock_instant's
//! `MockClock`, which is set to the same offset before every call into a
//! node. (MockClock 0.3 is thread-local: each test thread has its own clock,
//! and a simulation must stay on the thread that made it.)
//!
//! An event queue holds datagram deliveries and each node's next deadline
//! ([`Node::poll_timeout`]); nothing runs between events. A datagram takes
//! a fixed latency per pair of nodes (2–12 ms, drawn from the seed). Events
//! at the same instant run in the order (time, receiving node, sending
//! node, order sent), so arrival order does not depend on the order in
//! which a node happened to emit datagrams to different neighbours.
//!
//! What is not deterministic for a seed: boringtun draws its handshake
//! ephemerals and cookie secrets from the OS, so ciphertexts differ from run
//! to run (their sizes and timing do not).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use mock_instant::MockClock;
use qgate::proto::dht::DhtStats;
use qgate::proto::node::{Host as NodeHost, TunOutcome};
use qgate::proto::wire::write_ipv6_header;
use qgate::proto::{Identity, Node, NodeConfig};

use crate::Rng;

/// Marks the simulation's own test packets (UDP payload prefix).
const MAGIC: &[u8; 4] = b"QGSM";
/// Port every simulated node listens on.
pub const PORT: u16 = 7300;

/// The underlay endpoint of node `i`: an address in 2001:db8::/32 (the
/// documentation prefix; nothing here ever reaches a socket), one /48 per
/// node, so the subnet rules (links per /48, relays in distinct /48s) see
/// a network of independent hosts.
pub fn endpoint(i: usize) -> SocketAddr {
    let ip = Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 1);
    SocketAddr::V6(SocketAddrV6::new(ip, PORT, 0, 0))
}

/// A test packet from `src` to `dst`: IPv6, UDP, [`MAGIC`], pair and
/// sequence number.
pub fn probe(src: Ipv6Addr, dst: Ipv6Addr, pair: u32, seq: u32) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&40001u16.to_be_bytes());
    udp.extend_from_slice(MAGIC);
    udp.extend_from_slice(&pair.to_be_bytes());
    udp.extend_from_slice(&seq.to_be_bytes());
    udp.resize(100, 0);
    let len = udp.len() as u16;
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    let mut p = vec![0u8; 40 + udp.len()];
    write_ipv6_header(&mut p, udp.len(), 17, 64, src, dst);
    p[40..].copy_from_slice(&udp);
    p
}

/// A test packet that arrived at a node's TUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// Virtual time.
    pub at: Duration,
    /// Receiving node.
    pub host: usize,
    /// Its overlay source address.
    pub src: Ipv6Addr,
    /// Pair and sequence number from the payload.
    pub pair: u32,
    /// Sequence number.
    pub seq: u32,
}

fn parse_probe(at: Duration, host: usize, p: &[u8]) -> Option<Arrival> {
    if p.len() < 60 || p[6] != 17 || &p[48..52] != MAGIC {
        return None;
    }
    let src: [u8; 16] = p[8..24].try_into().ok()?;
    Some(Arrival {
        at,
        host,
        src: Ipv6Addr::from(src),
        pair: u32::from_be_bytes(p[52..56].try_into().ok()?),
        seq: u32::from_be_bytes(p[56..60].try_into().ok()?),
    })
}

struct Host {
    /// Until the node starts.
    identity: Option<Identity>,
    config: Option<NodeConfig>,
    /// The node and its data plane, which holds its established links
    /// as the daemon's data thread does.
    node: Option<NodeHost>,
    ep: SocketAddr,
    address: Ipv6Addr,
    /// Left the network: nothing reaches it, it runs nothing.
    gone: bool,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Start,
    Timer,
    Deliver { from: usize, payload: Vec<u8> },
}

/// Ordered by (time, node, sender, sequence): see the module comment.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    at: Duration,
    to: usize,
    from: usize,
    seq: u64,
    kind: Kind,
}

/// Traffic counters of the in-memory network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Datagrams delivered.
    pub datagrams: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Datagrams to or from a node that left, or to no node.
    pub lost: u64,
    /// Packets the nodes wrote to their TUNs (all kinds).
    pub tun_packets: u64,
    /// Node timer runs.
    pub timers: u64,
}

/// The simulated network of whole nodes.
pub struct Net {
    base: Instant,
    mock0: Duration,
    now: Duration,
    hosts: Vec<Host>,
    by_ep: HashMap<SocketAddr, usize>,
    queue: BinaryHeap<Reverse<Event>>,
    seq: u64,
    seed: u64,
    /// Test packets that reached a TUN, in order.
    pub arrivals: Vec<Arrival>,
    /// Counters.
    pub traffic: Traffic,
    /// When set, every delivery as (time, to, from, length): two runs of
    /// one seed can be compared to find where they part.
    pub trace: Option<Vec<(Duration, usize, usize, usize)>>,
}

impl Net {
    /// A network of not yet started nodes: `hosts[i]` listens on
    /// [`endpoint`]`(i)`; its identity and configuration are used when it
    /// starts (see [`Net::start_at`]).
    pub fn new(hosts: Vec<(Identity, NodeConfig)>, seed: u64) -> Net {
        let hosts: Vec<Host> = hosts
            .into_iter()
            .enumerate()
            .map(|(i, (id, cfg))| Host {
                address: id.overlay_address(),
                identity: Some(id),
                config: Some(cfg),
                node: None,
                ep: endpoint(i),
                gone: false,
            })
            .collect();
        let by_ep = hosts.iter().enumerate().map(|(i, h)| (h.ep, i)).collect();
        Net {
            base: Instant::now(),
            mock0: MockClock::time(),
            now: Duration::ZERO,
            hosts,
            by_ep,
            queue: BinaryHeap::new(),
            seq: 0,
            seed,
            arrivals: Vec::new(),
            traffic: Traffic::default(),
            trace: None,
        }
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// `now` as the core sees it.
    pub fn instant(&self) -> Instant {
        self.base + self.now
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Node `i`'s overlay address.
    pub fn address(&self, i: usize) -> Ipv6Addr {
        self.hosts[i].address
    }

    /// Node `i`, if started and not gone.
    pub fn node(&self, i: usize) -> Option<&Node> {
        let h = &self.hosts[i];
        h.node.as_deref().filter(|_| !h.gone)
    }

    /// Whether node `i` left.
    pub fn gone(&self, i: usize) -> bool {
        self.hosts[i].gone
    }

    fn push(&mut self, at: Duration, to: usize, from: usize, kind: Kind) {
        self.seq += 1;
        let seq = self.seq;
        self.queue.push(Reverse(Event {
            at,
            to,
            from,
            seq,
            kind,
        }));
    }

    /// Starts node `i` at virtual time `at` (not before now).
    pub fn start_at(&mut self, i: usize, at: Duration) {
        let at = at.max(self.now);
        self.push(at, i, i, Kind::Start);
    }

    /// One-way latency between two nodes, fixed per pair.
    fn latency(&self, a: usize, b: usize) -> Duration {
        let (x, y) = if a < b { (a, b) } else { (b, a) };
        let mut r = Rng(self.seed ^ ((x as u64) << 32 | y as u64).wrapping_mul(0x9e37_79b9));
        Duration::from_micros(2000 + r.next_u64() % 10_000)
    }

    fn set_clock(&self) {
        MockClock::set_time(self.mock0 + self.now);
    }

    /// Sends what node `i` queued (datagrams, TUN writes).
    fn drain(&mut self, i: usize) {
        let now = self.instant();
        let Some(node) = self.hosts[i].node.as_mut() else {
            return;
        };
        // Signatures are made at once (the shell makes them on a thread
        // of their own, taking milliseconds of real time).
        while let Some(job) = node.poll_sign() {
            let sig = node.signer().sign(&job.message);
            node.signed(now, &job, &sig);
        }
        let mut out = Vec::new();
        while let Some(t) = node.poll_transmit() {
            out.push(t);
        }
        let mut tun = Vec::new();
        while let Some(p) = node.poll_tun_write() {
            tun.push(p);
        }
        for t in out {
            self.send(i, t.dst, t.payload);
        }
        for p in tun {
            self.tun_write(i, &p);
        }
    }

    fn send(&mut self, from: usize, dst: SocketAddr, payload: Vec<u8>) {
        match self.by_ep.get(&dst) {
            Some(&to) => {
                let at = self.now + self.latency(from, to);
                self.push(at, to, from, Kind::Deliver { from, payload });
            }
            None => self.traffic.lost += 1,
        }
    }

    fn tun_write(&mut self, host: usize, p: &[u8]) {
        self.traffic.tun_packets += 1;
        if let Some(a) = parse_probe(self.now, host, p) {
            self.arrivals.push(a);
        }
    }

    fn schedule_timer(&mut self, i: usize) {
        if let Some(n) = &self.hosts[i].node {
            let at = n.poll_timeout().saturating_duration_since(self.base);
            self.push(at.max(self.now), i, i, Kind::Timer);
        }
    }

    fn run_event(&mut self, ev: Event) {
        let i = ev.to;
        if self.hosts[i].gone {
            if matches!(ev.kind, Kind::Deliver { .. }) {
                self.traffic.lost += 1;
            }
            return;
        }
        let now = self.instant();
        match ev.kind {
            Kind::Start => {
                let h = &mut self.hosts[i];
                let (Some(id), Some(mut cfg)) = (h.identity.take(), h.config.take()) else {
                    return;
                };
                cfg.unix_time = crate::START_UNIX + self.now.as_secs();
                h.node = Some(NodeHost::with_plane(Node::new(id, 1, cfg, now)));
                self.reserve(i);
                self.drain(i);
                self.schedule_timer(i);
            }
            Kind::Timer => {
                let Some(n) = self.hosts[i].node.as_mut() else {
                    return;
                };
                n.handle_timeout(now);
                self.traffic.timers += 1;
                self.reserve(i);
                self.drain(i);
                self.schedule_timer(i);
            }
            Kind::Deliver { from, payload } => {
                if self.hosts[from].gone {
                    // Left while the datagram was in flight.
                    self.traffic.lost += 1;
                    return;
                }
                let src = self.hosts[from].ep;
                let Some(n) = self.hosts[i].node.as_mut() else {
                    self.traffic.lost += 1;
                    return;
                };
                if let Some(t) = &mut self.trace {
                    t.push((self.now, i, from, payload.len()));
                }
                self.traffic.datagrams += 1;
                self.traffic.bytes += payload.len() as u64;
                let tun = n.handle_datagram(now, src, &payload).map(|p| p.to_vec());
                if let Some(p) = tun {
                    self.tun_write(i, &p);
                }
                self.drain(i);
            }
        }
    }

    /// As the shell does after the node's timers: store the wanted record
    /// sequence limit (here: nowhere), then allow it.
    fn reserve(&mut self, i: usize) {
        let now = self.instant();
        if let Some(n) = self.hosts[i].node.as_mut() {
            if let Some(s) = n.record_seq_wanted(now) {
                n.reserve_record_seq(s);
            }
        }
    }

    /// Runs every event due up to `until`, then sets the clock to it.
    pub fn run_until(&mut self, until: Duration) {
        while self.queue.peek().is_some_and(|Reverse(e)| e.at <= until) {
            let Some(Reverse(ev)) = self.queue.pop() else {
                break;
            };
            self.now = ev.at;
            self.set_clock();
            self.run_event(ev);
        }
        self.now = until.max(self.now);
        self.set_clock();
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Node `from` sends a test packet to node `to`'s overlay address, as if
    /// read from its TUN.
    pub fn send_probe(&mut self, from: usize, to: usize, pair: u32, seq: u32) {
        let p = probe(self.address(from), self.address(to), pair, seq);
        self.set_clock();
        let now = self.instant();
        let h = &mut self.hosts[from];
        let Some(n) = h.node.as_mut().filter(|_| !h.gone) else {
            return;
        };
        let out = match n.handle_tun_packet(now, &p) {
            TunOutcome::Send(dst, d) => Some((dst, d.to_vec())),
            TunOutcome::Reply(r) => {
                let r = r.to_vec();
                self.tun_write(from, &r);
                None
            }
            TunOutcome::Nothing => None,
        };
        if let Some((dst, d)) = out {
            self.send(from, dst, d);
        }
        self.drain(from);
    }

    /// Node `i` leaves: from now on nothing reaches it and it sends nothing
    /// (datagrams it sent that are still in flight are lost too).
    pub fn leave(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        h.gone = true;
        h.node = None;
    }

    /// Node `i`'s DHT counters, if it is running.
    pub fn dht_stats(&self, i: usize) -> Option<DhtStats> {
        self.node(i).map(|n| n.status().dht)
    }

    /// Node `i`'s links handed to its data plane, and its links in all.
    pub fn plane_links(&self, i: usize) -> Option<(u64, u64)> {
        self.node(i).map(|n| {
            let st = n.status();
            (st.data_path.plane_links, st.links.len() as u64)
        })
    }

    /// Node `i`'s circuits (relayed or ending there) whose cells its data
    /// plane handles, and the circuits it carries in all (as a relay or
    /// the destination).
    pub fn plane_circuits(&self, i: usize) -> Option<(u64, u64)> {
        self.node(i).map(|n| {
            let st = n.status();
            (st.data_path.plane_circuits, st.relay.circuits as u64)
        })
    }
}
