//! The data plane: the per-packet work of established links, apart from the
//! node (ARCHITECTURE §14, gap 2, stage 1). It owns the [`Channel`]s of the
//! links the node handed to it, each with the neighbour's verified overlay
//! address, and a route map (overlay address → link) for the packets it
//! may send straight over one of them. It seals TUN packets to routed
//! addresses and opens datagrams on its links from their known endpoints;
//! everything else — packets to other addresses, handshake initiations,
//! datagrams from elsewhere, and what a link opened that is not an
//! application packet (hellos, DHT messages, cells) — goes to the node.
//!
//! The node and the plane talk only through messages: [`ToPlane`] (hand a
//! link over, take it back, route an address, seal a frame the node made)
//! and [`FromPlane`] (a link returned, a message for the node, a session
//! expired, the links' counters and timestamps once a tick). Whoever holds
//! both passes them on; the simulator and the tests do it in one thread,
//! and a shell can hold the plane on its data thread, so that a packet on a
//! handed link never waits for the node.
//!
//! Like the node, the plane reads no clock: every call takes `now`.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Packet, Tunn};

mod out;
mod relay;
mod workers;
pub use out::OutRoute;
use out::{Back, OutRoutes};
pub use relay::{CellReport, Relay};
use relay::{Relays, Step};
pub use workers::worker_of;
use workers::Crossing;

use super::channel::{Channel, Delivery, Fit, Opened, Sealed, Tick};
use super::circuits::CIRCUIT_MTU;
use super::{
    reuse, Drops, LinkCounters, Transmit, MAX_DATAGRAM, MAX_SPARE, MSG_CELL, SPARE_CAPACITY,
};
use crate::proto::batch::SendBatch;
use crate::proto::onion::{self, CellKind, Cmd, CELL_HEADER, CELL_LARGE, MAX_DATA};
use crate::proto::wire::{self, Incoming, Ipv6View, Lz4Table, MAX_PACKET};

/// How often at most a link tells the node that its neighbour sends
/// application packets ([`FromPlane::Heard`]).
pub const HEARD_EVERY: Duration = Duration::from_secs(1);

/// A link as the node hands it to the plane, and as the plane returns it.
/// Opaque outside the node.
pub struct Lane {
    pub(super) index: u32,
    pub(super) chan: Channel,
    /// The neighbour's verified overlay address: the source its packets
    /// must carry.
    pub(super) peer: Ipv6Addr,
    /// What the plane dropped on the link since it last reported.
    pub(super) drops: Drops,
    /// When the plane last told the node the neighbour sends
    /// ([`FromPlane::Heard`]).
    pub(super) told: Option<Instant>,
    /// When a cookie reply last made the plane send a new initiation.
    pub(super) cookie_retry: Option<Instant>,
}

impl Lane {
    /// Link `index`'s channel, split off the node's, for the neighbour at
    /// overlay address `peer`.
    pub(super) fn new(index: u32, chan: Channel, peer: Ipv6Addr) -> Lane {
        Lane {
            index,
            chan,
            peer,
            drops: Drops::default(),
            told: None,
            cookie_retry: None,
        }
    }
}

/// What a datagram for a handed link is, as far as the plane cares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    /// An initiation or a response.
    Handshake,
    Cookie,
}

/// Most messages for the node the plane keeps while the node is busy; a
/// control frame or cell beyond it is dropped (and counted in `lost`), as
/// a full socket buffer would drop it.
const MAX_EVENTS: usize = 4096;

impl Lane {
    /// The link's session index.
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// A circuit, as the node and the plane name it to each other: the node's
/// ID for it, in one of its two tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitRef {
    /// One this node built (it is the source).
    Built(u64),
    /// One this node relays or ends.
    Carried(u64),
}

/// A command addressed to this node that the plane opened on a circuit
/// ([`FromPlane::Opened`]): anything but the DATA it delivers itself.
#[derive(Debug)]
pub struct OpenedCell {
    /// When it arrived.
    pub at: Instant,
    /// The circuit it came on.
    pub circuit: CircuitRef,
    /// On a circuit this node built: which hop spoke (0 on one it carries).
    pub hop: usize,
    /// The command.
    pub cmd: Cmd,
    /// Its data (the node keeps the buffer for its own messages, as it
    /// keeps [`FromPlane::Inner`]'s).
    pub data: Vec<u8>,
}

/// Where a routed address's packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// Straight over a link.
    Link(u32),
    /// On a circuit: forward on one this node built, or back to the
    /// source of one it ends.
    Circuit(CircuitRef),
}

/// What the node tells the plane.
pub enum ToPlane {
    /// Take this link: its datagrams and routed packets are the plane's
    /// from now on.
    Handoff(Box<Lane>),
    /// Give the link back ([`FromPlane::Returned`]); its routes go with it.
    Withdraw(u32),
    /// Packets to this overlay address go over this link until then (the
    /// node decided so, and decides again after).
    Route(Ipv6Addr, u32, Instant),
    /// Packets to the route's destination go on the circuit it names
    /// until then, as DATA the plane wraps itself (the node sent one there
    /// just now).
    RouteCircuit(Box<OutRoute>, Instant),
    /// Packets to this overlay address go to the node again.
    Unroute(Ipv6Addr),
    /// Seal a frame the node made (a control message, a cell) on a link.
    Seal(u32, Vec<u8>),
    /// Seal a cell the node passes on as a relay on a link, within the
    /// relay bandwidth cap (as of the instant given), and count it.
    SealRelayed(u32, Vec<u8>, Instant),
    /// Seal an application packet the node routed over a link (compressed
    /// as the link does).
    SealApp(u32, Vec<u8>),
    /// Whether a link compresses (its neighbour's record was verified
    /// again).
    SetCompress(u32, bool),
    /// Send a handshake initiation on a link (`true`: even if one went out
    /// lately).
    Initiate(u32, bool),
    /// The path MTU towards an endpoint changed: links there use this one.
    SetMtu(SocketAddr, usize),
    /// Whether compression is paused (the data path is the limit).
    Pause(bool),
    /// Pass on the cells of a relayed circuit between two handed links,
    /// or take those of a circuit that ends here on a handed link (see
    /// [`Relay`]).
    Relay(Box<Relay>),
    /// A cell another plane (the third field) passed on as a relay at the
    /// instant given, onto link `index`, which this plane holds: the frame
    /// (room for the control header, then the cell, its header written) to
    /// seal there. The buffer goes back to that plane, with others
    /// (`Spares`).
    Pass(u32, Vec<u8>, usize, Instant),
    /// Buffers of cells this plane passed to another to seal, back for
    /// the next ones (so a relay between two planes allocates no buffer
    /// per cell).
    Spares(usize, Vec<Vec<u8>>),
    /// Leave a circuit's cells to the node again (it ended); a route back
    /// on it goes too.
    Unrelay(u64),
}

/// What the plane tells the node.
pub enum FromPlane {
    /// A withdrawn link, with what the plane counted on it.
    Returned(Box<Lane>),
    /// A message a link opened that the node handles (hello, DHT, cell):
    /// the decrypted packet. Hand the buffer back with
    /// [`DataPlane::recycle`].
    Inner {
        /// The link.
        index: u32,
        /// When it arrived.
        at: Instant,
        /// The packet.
        packet: Vec<u8>,
    },
    /// A link's session expired (no handshake for too long).
    Expired(u32),
    /// A link's neighbour now sends from another endpoint.
    Moved(u32, SocketAddr),
    /// A link's neighbour sent an application packet, the first for
    /// [`HEARD_EVERY`] (a node that talks to this one directly is
    /// answered directly).
    Heard(u32, Instant),
    /// A link's state as of the last tick, for `status` and the node's
    /// link timers.
    Activity(Box<Activity>),
    /// What the plane did with circuits' cells since the last tick: passed
    /// on as a relay, delivered at a circuit's end or at its source, sent
    /// as DATA (on circuits this node built, or back on those it ends),
    /// dropped.
    Relayed(Box<CellReport>),
    /// The plane did not take this circuit (one of its links left the
    /// plane before the circuit came): its cells are the node's.
    Unrelayed(u64),
    /// A command addressed to this node, opened on a circuit the plane
    /// holds (a probe, an answer to one, LOOKUP, noise, ...).
    Opened(Box<OpenedCell>),
    /// The plane stopped routing this address by itself: a circuit that
    /// ends here brought DATA from it, so replies go back on that one
    /// (whichever route the node had granted), or a circuit a route went
    /// back on ended. With the end of the grant it dropped, by which the
    /// node tells it from a grant it made since.
    Unrouted(Ipv6Addr, Instant),
}

/// A handed link's counters and timestamps ([`FromPlane::Activity`]).
#[derive(Clone, Debug)]
pub struct Activity {
    /// The link.
    pub index: u32,
    /// Its traffic counters (totals).
    pub counters: LinkCounters,
    /// What the plane dropped on it since the last report.
    pub drops: Drops,
    /// When it last authenticated a datagram.
    pub last_rx: Instant,
    /// When it last carried an application packet either way.
    pub last_used: Instant,
    /// When the neighbour last sent an application packet.
    pub last_app_rx: Option<Instant>,
    /// Time since the session's last handshake.
    pub handshake_age: Option<Duration>,
}

/// What became of a TUN packet given to the plane.
#[derive(Debug, PartialEq, Eq)]
pub enum PlaneTx<'a> {
    /// Sealed into the plane's send batch ([`DataPlane::take_output`]), or
    /// dropped and counted.
    Done,
    /// Write this back to the TUN (an ICMPv6 Packet Too Big).
    Reply(&'a [u8]),
    /// Not routed here: give it to the node.
    NotMine,
}

/// What became of a datagram given to the plane.
#[derive(Debug, PartialEq, Eq)]
pub enum PlaneRx<'a> {
    /// A packet for the TUN in the caller's buffer, `buf[..n]`.
    InPlace(usize),
    /// A packet for the TUN rebuilt by the plane (decompressed): copy it.
    Rebuilt(&'a [u8]),
    /// Handled: nothing for the TUN (a handshake answer, a message for the
    /// node in [`DataPlane::poll_event`], or dropped and counted).
    Done,
    /// Not for a handed link, or from somewhere else than its endpoint:
    /// give it to the node.
    NotMine,
}

/// A cell the plane opened for this node: on which circuit, from which hop
/// (of one this node built), the command, its data's range in the cell, and
/// for DATA the source it must come from, where the plane delivers it.
struct Ended {
    circuit: CircuitRef,
    hop: usize,
    cmd: Cmd,
    data: std::ops::Range<usize>,
    deliver: Option<Ipv6Addr>,
}

/// The data plane. See the module's documentation.
pub struct DataPlane {
    own: Ipv6Addr,
    lanes: HashMap<u32, Lane>,
    routes: HashMap<Ipv6Addr, (Target, Instant)>,
    /// The circuits this node built that the plane sends on.
    outs: OutRoutes,
    /// Where a source's cell is built (frame headers and cell).
    cell: Vec<u8>,
    /// A link's MTU when its neighbour moves (the configured one).
    mtu: usize,
    out: SendBatch,
    transmits: VecDeque<Transmit>,
    events: VecDeque<FromPlane>,
    spare: Vec<Vec<u8>>,
    /// Decompression and unframing (a packet for the TUN).
    rebuild: Vec<u8>,
    /// Compression, handshakes and ICMP replies.
    scratch: Vec<u8>,
    lz4: Lz4Table,
    paused: bool,
    relays: Relays,
    /// Reports ([`FromPlane::Activity`], [`FromPlane::Relayed`]) waiting
    /// for the node: while any do, the timers make no new ones (a node
    /// that doesn't keep up gets them late, not piled up; one asked for
    /// with [`DataPlane::report`] is made all the same).
    reports_queued: usize,
    /// Frames the node asked to seal on a link the plane does not hold (a
    /// withdrawal crossed them), and control frames dropped while the node
    /// was busy ([`MAX_EVENTS`]).
    pub(super) lost: u64,
    /// Which plane this is, and what it sends the other planes
    /// ([`DataPlane::poll_crossing`]).
    cross: Crossing,
}

impl DataPlane {
    /// An empty plane for the node at overlay address `own`, whose links
    /// start at MTU `mtu`, with the relay bandwidth cap's budget `bucket`
    /// for the cells it passes on.
    pub(super) fn new(
        own: Ipv6Addr,
        mtu: usize,
        bucket: Option<crate::proto::limit::ByteBucket>,
    ) -> DataPlane {
        DataPlane {
            own,
            lanes: HashMap::new(),
            routes: HashMap::new(),
            outs: OutRoutes::default(),
            cell: vec![0u8; wire::CONTROL_BODY + CELL_LARGE],
            mtu,
            out: SendBatch::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            spare: Vec::new(),
            rebuild: vec![0u8; 2 * MAX_PACKET + 1024],
            scratch: vec![0u8; 2 * MAX_PACKET + 1024],
            lz4: Lz4Table::default(),
            paused: false,
            relays: Relays::new(bucket),
            reports_queued: 0,
            lost: 0,
            cross: Crossing::new(0, 1),
        }
    }

    /// Makes this plane number `id` of `workers` ([`Node::data_planes`](super::Node::data_planes)).
    pub(super) fn set_worker(&mut self, id: usize, workers: usize) {
        self.cross = Crossing::new(id, workers);
    }

    /// The next message this plane has for the other planes: a cell it
    /// passed on, as a relay, towards a link another plane holds, buffers
    /// back, an address no longer routed. Give it to them with
    /// [`ToPlane::dispatch`], except to this plane.
    pub fn poll_crossing(&mut self) -> Option<ToPlane> {
        self.cross.poll()
    }

    /// A cell this plane passed on towards another plane, which the caller
    /// could not give it (too many wait for that plane already): dropped,
    /// counted as a cell its link could not take, its buffer kept.
    pub fn dropped_pass(&mut self, m: ToPlane) {
        if let ToPlane::Pass(_, frame, ..) = m {
            self.relays.drops_mut().send_failed += 1;
            self.recycle(frame);
        }
    }

    /// Which plane this is ([`Node::data_planes`](super::Node::data_planes)).
    pub fn worker(&self) -> usize {
        self.cross.id()
    }

    /// How many links the plane holds.
    pub fn links(&self) -> usize {
        self.lanes.len()
    }

    /// How many circuits the plane holds: relayed (it passes their cells
    /// on) or ending here (it opens them).
    pub fn relayed(&self) -> usize {
        self.relays.len()
    }

    /// Test hook: whether the cells the plane passes on are logged (in its
    /// [`CellReport`]s).
    #[cfg(feature = "test-hooks")]
    pub(super) fn log_cells(&mut self, on: bool) {
        self.relays.log = on;
    }

    /// Acts on a message from the node.
    pub fn handle(&mut self, msg: ToPlane) {
        match msg {
            ToPlane::Handoff(lane) => {
                self.lanes.insert(lane.index, *lane);
            }
            ToPlane::Withdraw(index) => {
                self.routes.retain(|_, (t, _)| *t != Target::Link(index));
                for dst in self.outs.lane_gone(index, self.relays.report_mut()) {
                    self.routes.remove(&dst);
                }
                self.relays.lane_gone(index);
                if let Some(lane) = self.lanes.remove(&index) {
                    self.events.push_back(FromPlane::Returned(Box::new(lane)));
                }
            }
            ToPlane::Route(addr, index, until) => {
                self.unroute(addr);
                self.routes.insert(addr, (Target::Link(index), until));
            }
            ToPlane::RouteCircuit(r, until) => {
                // Only over a link the plane holds (a withdrawal may have
                // crossed the grant).
                if self.lanes.contains_key(&r.link) {
                    let (dst, id) = (r.dst, r.id);
                    // A new grant for the same circuit keeps what the plane
                    // learnt of its flows.
                    if self.routes.get(&dst).map(|(t, _)| *t) != Some(Target::Circuit(id)) {
                        self.unroute(dst);
                    }
                    self.outs.insert(*r);
                    self.routes.insert(dst, (Target::Circuit(id), until));
                }
            }
            ToPlane::Unroute(addr) => self.unroute(addr),
            ToPlane::SealApp(index, packet) => {
                match (Ipv6View::new_checked(&packet), self.lanes.get_mut(&index)) {
                    (Ok(view), Some(lane)) => {
                        let lz4 = (!self.paused).then_some(&mut self.lz4);
                        let (scratch, out) = (&mut self.scratch, &mut self.out);
                        if let Sealed::Failed = lane.chan.seal_app(view, lz4, scratch, out) {
                            lane.drops.send_failed += 1;
                        }
                    }
                    _ => self.lost += 1,
                }
                self.recycle(packet);
            }
            ToPlane::SetCompress(index, on) => {
                if let Some(lane) = self.lanes.get_mut(&index) {
                    lane.chan.compress = on;
                }
            }
            ToPlane::Seal(index, frame) => {
                self.seal(index, &frame);
                self.recycle(frame);
            }
            ToPlane::Pass(index, mut frame, from, at) => {
                match self.lanes.get_mut(&index) {
                    Some(lane) => {
                        wire::write_control_header(&mut frame, self.own, lane.peer, MSG_CELL);
                        lane.chan.last_used = lane.chan.last_used.max(at);
                        if let Sealed::Failed = lane.chan.seal(&mut self.out, &frame) {
                            lane.drops.send_failed += 1;
                        }
                    }
                    None => self.lost += 1,
                }
                if let Some(frame) = self.cross.give_back(from, frame) {
                    self.recycle(frame);
                }
            }
            ToPlane::Spares(_, bufs) => {
                for b in bufs {
                    self.recycle(b);
                }
            }
            ToPlane::SealRelayed(index, frame, now) => {
                let size = frame.len().saturating_sub(wire::CONTROL_BODY);
                if self.relays.charge(now, size) {
                    self.seal(index, &frame);
                }
                self.recycle(frame);
            }
            ToPlane::Initiate(index, force) => {
                if let Some(lane) = self.lanes.get_mut(&index) {
                    if let Some(ep) = lane.chan.endpoint {
                        lane.chan
                            .initiate(ep, force, &mut self.scratch, &mut self.transmits);
                    }
                }
            }
            ToPlane::SetMtu(endpoint, mtu) => {
                for lane in self.lanes.values_mut() {
                    if lane.chan.endpoint == Some(endpoint) {
                        lane.chan.mtu = mtu;
                    }
                }
            }
            ToPlane::Pause(paused) => self.paused = paused,
            ToPlane::Relay(r) => {
                // Its links that belong here must be here (a withdrawal
                // may have crossed the hand-over; the node then ends the
                // circuit anyway). One on another plane is that plane's:
                // the cells for it cross over (`poll_crossing`).
                let here = |l: Option<(u32, u32)>| {
                    l.is_none_or(|l| self.cross.elsewhere(l.0) || self.lanes.contains_key(&l.0))
                };
                if here(Some(r.prev)) && here(r.next) {
                    self.relays.insert(*r);
                } else {
                    self.events.push_back(FromPlane::Unrelayed(r.h));
                }
            }
            ToPlane::Unrelay(h) => {
                self.relays.remove(h);
                let back = self.routes.iter().find_map(|(addr, (t, until))| {
                    (*t == Target::Circuit(CircuitRef::Carried(h))).then_some((*addr, *until))
                });
                if let Some((addr, until)) = back {
                    self.unroute(addr);
                    self.events.push_back(FromPlane::Unrouted(addr, until));
                }
            }
        }
    }

    /// Packets to `addr` go to the node again; a circuit they took is no
    /// longer sent on.
    fn unroute(&mut self, addr: Ipv6Addr) {
        if let Some((Target::Circuit(id), _)) = self.routes.remove(&addr) {
            self.outs.remove(id, self.relays.report_mut());
        }
    }

    /// Seals `frame` (a control frame or cell) on link `index`.
    fn seal(&mut self, index: u32, frame: &[u8]) {
        match self.lanes.get_mut(&index) {
            Some(lane) => {
                if let Sealed::Failed = lane.chan.seal(&mut self.out, frame) {
                    lane.drops.send_failed += 1;
                }
            }
            None => self.lost += 1,
        }
    }

    /// Whether messages for the node wait ([`DataPlane::poll_event`]).
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next message for the node.
    pub fn poll_event(&mut self) -> Option<FromPlane> {
        let e = self.events.pop_front()?;
        if matches!(e, FromPlane::Activity(_) | FromPlane::Relayed(_)) {
            self.reports_queued = self.reports_queued.saturating_sub(1);
        }
        Some(e)
    }

    /// Takes back a buffer the plane handed out (a [`FromPlane::Inner`]
    /// packet, a [`Transmit`]'s payload) for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE && buf.capacity() <= SPARE_CAPACITY {
            self.spare.push(buf);
        }
    }

    /// Handles a packet read from the TUN, if its destination is routed
    /// over a handed link.
    pub fn send_tun_packet(&mut self, now: Instant, packet: &[u8]) -> PlaneTx<'_> {
        let Ok(view) = Ipv6View::new_checked(packet) else {
            return PlaneTx::NotMine;
        };
        let index = match self.routes.get(&view.dst()) {
            Some(&(Target::Link(index), until)) if now < until => index,
            Some(&(Target::Circuit(id), until)) if now < until => {
                return self.send_on_circuit(now, id, view);
            }
            _ => return PlaneTx::NotMine,
        };
        let Some(lane) = self.lanes.get_mut(&index) else {
            return PlaneTx::NotMine;
        };
        match lane.chan.fit(packet.len(), true) {
            Fit::Fits => {}
            // Fragmenting for a link below IPv6's minimum MTU is rare
            // enough to leave to the node.
            Fit::Fragment(_) => return PlaneTx::NotMine,
            // The node answers it, within its ICMP budget.
            Fit::TooBig(_) => return PlaneTx::NotMine,
        }
        lane.chan.last_used = now;
        let lz4 = (!self.paused).then_some(&mut self.lz4);
        if let Sealed::Failed = lane
            .chan
            .seal_app(view, lz4, &mut self.scratch, &mut self.out)
        {
            lane.drops.send_failed += 1;
        }
        PlaneTx::Done
    }

    /// Sends an application packet as DATA on circuit `id` (routed here):
    /// compressed as the node would, wrapped for the circuit's last hop
    /// into the plane's cell buffer, and sealed on the first link. What
    /// doesn't fit a cell goes to the node (it answers ICMPv6).
    fn send_on_circuit(&mut self, now: Instant, id: CircuitRef, view: Ipv6View<'_>) -> PlaneTx<'_> {
        let DataPlane {
            own,
            lanes,
            out,
            scratch,
            lz4,
            paused,
            outs,
            cell,
            ..
        } = self;
        let Some(s) = outs.get_mut(id) else {
            return PlaneTx::NotMine;
        };
        let r = &s.route;
        let Some(lane) = lanes.get_mut(&r.link) else {
            return PlaneTx::NotMine;
        };
        let len = view.bytes().len();
        if len > CIRCUIT_MTU {
            return PlaneTx::NotMine;
        }
        // As `Node::circuit_compress`: paused only where cells are all one
        // size.
        let compress = r.compress && !(*paused && r.always_large);
        let table = compress.then_some((&mut s.adaptive, lz4));
        let (frame, _) = crate::proto::compress::encode(view, table, scratch);
        if frame.len() > MAX_DATA {
            return PlaneTx::NotMine;
        }
        let size = onion::cell_size_for(frame.len(), r.always_large).unwrap_or(CELL_LARGE);
        let Some(target) = r.keys.len().checked_sub(1) else {
            return PlaneTx::NotMine;
        };
        let c = wire::CONTROL_BODY;
        let packet = &mut cell[..c + size];
        let counter = r.counter.next();
        let (head, body) = packet[c..].split_at_mut(CELL_HEADER);
        let nonce = match r.id {
            CircuitRef::Built(_) => onion::wrap(&r.keys, target, counter, Cmd::Data, frame, body),
            // Back to the source of a circuit that ends here: this hop's
            // layer alone.
            CircuitRef::Carried(_) => r.keys[0].originate(counter, Cmd::Data, frame, body),
        };
        onion::write_header(head, r.circ, CellKind::Relay, &nonce);
        wire::write_control_header(packet, *own, lane.peer, MSG_CELL);
        lane.chan.last_used = now;
        if let Sealed::Failed = lane.chan.seal(out, packet) {
            lane.drops.send_failed += 1;
        }
        s.sent(now, len);
        PlaneTx::Done
    }

    /// Handles a datagram from the UDP socket, if it is for a handed link
    /// and comes from the link's endpoint: a data message is decrypted into
    /// `buf` (at least as long as the datagram).
    pub fn receive<'a>(
        &'a mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
    ) -> PlaneRx<'a> {
        if datagram.len() > MAX_DATAGRAM || datagram.len() > buf.len() {
            return PlaneRx::NotMine;
        }
        let from = super::normalize(from);
        let (index, kind) = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::PacketData(p)) => (p.receiver_idx >> 8, Kind::Data),
            Ok(Packet::HandshakeResponse(p)) => (p.receiver_idx >> 8, Kind::Handshake),
            Ok(Packet::PacketCookieReply(p)) => (p.receiver_idx >> 8, Kind::Cookie),
            // Initiations pass the node's gate first ([`DataPlane::admit`]).
            Ok(Packet::HandshakeInit(_)) | Err(_) => return PlaneRx::NotMine,
        };
        match self.lanes.get(&index) {
            Some(lane) if lane.chan.endpoint == Some(from) => {}
            _ => return PlaneRx::NotMine,
        }
        self.open(now, index, from, datagram, buf, kind)
    }

    /// Handles a datagram for handed link `index` that the node's gate let
    /// through ([`Node::take_admitted`](super::Node::take_admitted)): a
    /// handshake initiation, or a datagram from another endpoint than the
    /// link's. A data message is decrypted into `buf`, as
    /// [`DataPlane::receive`] does; a cookie reply from elsewhere is
    /// refused (it proves nothing, and would move the link).
    pub fn admit<'a>(
        &'a mut self,
        now: Instant,
        index: u32,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
    ) -> PlaneRx<'a> {
        if !self.lanes.contains_key(&index)
            || datagram.len() > MAX_DATAGRAM
            || datagram.len() > buf.len()
        {
            return PlaneRx::Done;
        }
        let kind = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::PacketData(_)) => Kind::Data,
            Ok(Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)) => Kind::Handshake,
            Ok(Packet::PacketCookieReply(_)) | Err(_) => return PlaneRx::Done,
        };
        self.open(now, index, super::normalize(from), datagram, buf, kind)
    }

    fn open<'a>(
        &'a mut self,
        now: Instant,
        index: u32,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        kind: Kind,
    ) -> PlaneRx<'a> {
        let DataPlane {
            own,
            lanes,
            mtu,
            out,
            transmits,
            events,
            spare,
            rebuild,
            scratch,
            relays,
            lost,
            outs,
            routes,
            cross,
            ..
        } = self;
        let Some(lane) = lanes.get_mut(&index) else {
            return PlaneRx::Done;
        };
        // A data message opens into the caller's buffer (it needs no more
        // room than the datagram); a handshake's answer may be followed by
        // the packets that waited for it, each up to a full packet, so it
        // opens into `scratch` (see `Channel::open`).
        let dst: &mut [u8] = if kind == Kind::Data { buf } else { scratch };
        let n = match lane.chan.open(from, datagram, dst, transmits) {
            Opened::Authentic(n) => n,
            Opened::Ipv4 => {
                lane.drops.bad_inner += 1;
                return PlaneRx::Done;
            }
            Opened::Unproven => return PlaneRx::Done,
            Opened::Refused(why) => {
                why.count(&mut lane.drops);
                return PlaneRx::Done;
            }
        };
        if kind == Kind::Cookie {
            // The neighbour is under load and wants proof that we receive
            // at our address: boringtun kept the cookie, and the next
            // initiation carries it. Sent now, at most once per
            // `COOKIE_RETRY`, as the node does; the reply proves nothing
            // about its sender, so it moves nothing.
            if lane
                .cookie_retry
                .is_none_or(|t| now.saturating_duration_since(t) >= super::COOKIE_RETRY)
            {
                lane.cookie_retry = Some(now);
                if let Some(ep) = lane.chan.endpoint {
                    lane.chan.initiate(ep, true, scratch, transmits);
                }
            }
            return PlaneRx::Done;
        }
        lane.chan.last_rx = now;
        if lane.chan.endpoint != Some(from) {
            lane.chan.endpoint = Some(from);
            lane.chan.mtu = *mtu;
            events.push_back(FromPlane::Moved(index, from));
        }
        let Some(n) = n.filter(|_| kind == Kind::Data) else {
            return PlaneRx::Done;
        };
        let control = Ipv6View::new_checked(&buf[..n])
            .ok()
            .and_then(|view| wire::control_of(view).map(|(ty, body)| (ty, body.len())));
        if let Some((MSG_CELL, len)) = control {
            // A cell: relayed circuits' pass on from here; those for this
            // hop, and those coming back on circuits this node built, are
            // opened here.
            lane.chan.last_used = now;
            let c = wire::CONTROL_BODY;
            let frame = &mut buf[..c + len];
            let ended = match relays.pass(now, index, &mut frame[c..]) {
                Step::Onward(to) => {
                    match lanes.get_mut(&to) {
                        Some(next) => {
                            wire::write_control_header(frame, *own, next.peer, MSG_CELL);
                            next.chan.last_used = now;
                            if let Sealed::Failed = next.chan.seal(out, frame) {
                                next.drops.send_failed += 1;
                            }
                        }
                        // Another plane's link: the cell crosses over.
                        None if cross.elsewhere(to) => cross.pass(to, reuse(spare, frame), now),
                        None => *lost += 1,
                    }
                    return PlaneRx::Done;
                }
                Step::Dropped => return PlaneRx::Done,
                Step::Mine { h, src, cmd, data } => Some(Ended {
                    circuit: CircuitRef::Carried(h),
                    hop: 0,
                    cmd,
                    data,
                    deliver: src.filter(|_| cmd == Cmd::Data),
                }),
                Step::Node => match outs.receive(index, &mut frame[c..], relays.drops_mut()) {
                    Back::Node => None,
                    Back::Dropped => return PlaneRx::Done,
                    Back::Data { id, dst, data } => Some(Ended {
                        circuit: CircuitRef::Built(id),
                        hop: 0,
                        cmd: Cmd::Data,
                        data,
                        deliver: Some(dst),
                    }),
                    Back::Opened { id, hop, cmd, data } => Some(Ended {
                        circuit: CircuitRef::Built(id),
                        hop,
                        cmd,
                        data,
                        deliver: None,
                    }),
                },
            };
            if let Some(e) = ended {
                let (start, end) = (c + e.data.start, c + e.data.end);
                if let Some(src) = e.deliver {
                    return Self::deliver(
                        now,
                        *own,
                        src,
                        e.circuit,
                        buf,
                        start..end,
                        rebuild,
                        relays,
                        outs,
                        routes,
                        events,
                        cross,
                    );
                }
                if e.cmd == Cmd::Noise && matches!(e.circuit, CircuitRef::Carried(_)) {
                    // Cover traffic, dropped by design (as the node does),
                    // without waking it.
                    relays.drops_mut().noise += 1;
                    return PlaneRx::Done;
                }
                if e.cmd == Cmd::Data {
                    // DATA on a circuit that did not authenticate its
                    // source, or from a hop that is not the destination
                    // (as the node counts them).
                    match e.circuit {
                        CircuitRef::Carried(_) => relays.drops_mut().unauthenticated += 1,
                        CircuitRef::Built(_) => relays.drops_mut().bad_kind += 1,
                    }
                    return PlaneRx::Done;
                }
                if events.len() >= MAX_EVENTS {
                    *lost += 1;
                    return PlaneRx::Done;
                }
                let data = reuse(spare, &buf[start..end]);
                events.push_back(FromPlane::Opened(Box::new(OpenedCell {
                    at: now,
                    circuit: e.circuit,
                    hop: e.hop,
                    cmd: e.cmd,
                    data,
                })));
                return PlaneRx::Done;
            }
        }
        let packet = &buf[..n];
        if control.is_some() {
            if events.len() >= MAX_EVENTS {
                // The node has not kept up: dropped, as a full socket
                // buffer would have.
                *lost += 1;
                return PlaneRx::Done;
            }
            let packet = reuse(spare, packet);
            events.push_back(FromPlane::Inner {
                index,
                at: now,
                packet,
            });
            return PlaneRx::Done;
        }
        let delivery = lane
            .chan
            .deliver(now, packet, Some(lane.peer), *own, rebuild);
        if matches!(delivery, Delivery::InPlace(_) | Delivery::Rebuilt(_))
            && lane
                .told
                .is_none_or(|t| now.saturating_duration_since(t) >= HEARD_EVERY)
        {
            lane.told = Some(now);
            events.push_back(FromPlane::Heard(index, now));
        }
        match delivery {
            Delivery::InPlace(n) => PlaneRx::InPlace(n),
            Delivery::Rebuilt(n) => PlaneRx::Rebuilt(&rebuild[..n]),
            Delivery::Control => PlaneRx::Done,
            Delivery::Dropped(why) => {
                why.count(&mut lane.drops);
                PlaneRx::Done
            }
        }
    }

    /// DATA opened on a circuit, in `buf[data]`, for the TUN: its inner
    /// source must be `src` (the source the circuit authenticated, or the
    /// destination of one this node built) and its destination this node.
    /// Decompressed into `rebuild`, or moved to the front of `buf`.
    #[allow(clippy::too_many_arguments)] // the plane's fields, split for the borrow checker
    fn deliver<'a>(
        now: Instant,
        own: Ipv6Addr,
        src: Ipv6Addr,
        circuit: CircuitRef,
        buf: &mut [u8],
        data: std::ops::Range<usize>,
        rebuild: &'a mut [u8],
        relays: &mut Relays,
        outs: &mut OutRoutes,
        routes: &mut HashMap<Ipv6Addr, (Target, Instant)>,
        events: &mut VecDeque<FromPlane>,
        cross: &mut Crossing,
    ) -> PlaneRx<'a> {
        let start = data.start;
        let Ok(view) = Ipv6View::new_checked(&buf[data]) else {
            relays.drops_mut().malformed += 1;
            return PlaneRx::Done;
        };
        if view.src() != src || view.dst() != own {
            relays.drops_mut().spoofed_source += 1;
            return PlaneRx::Done;
        }
        let rebuilt = view.next_header() == wire::NH_QGATE;
        let n = match wire::decode(view, rebuild) {
            Ok((Incoming::App(p), _)) => p.len(),
            _ => {
                relays.drops_mut().malformed += 1;
                return PlaneRx::Done;
            }
        };
        match circuit {
            CircuitRef::Built(id) => outs.delivered(now, id, n),
            CircuitRef::Carried(h) => {
                relays.delivered(now, h, n);
                // Replies go back on the circuit that last brought
                // traffic: a route the node granted to anything else goes
                // (as the node's own `hop_data` does).
                let back = Target::Circuit(circuit);
                if routes.get(&src).is_some_and(|(t, _)| *t != back) {
                    if let Some((target, until)) = routes.remove(&src) {
                        if let Target::Circuit(other) = target {
                            outs.remove(other, relays.report_mut());
                        }
                        events.push_back(FromPlane::Unrouted(src, until));
                    }
                }
                // And the other planes' (which cannot route `src` back on
                // this circuit: its link is this plane's).
                cross.delivered(src, h);
            }
        }
        if rebuilt {
            return PlaneRx::Rebuilt(&rebuild[..n]);
        }
        buf.copy_within(start..start + n, 0);
        PlaneRx::InPlace(n)
    }

    /// What to send, as [`Node::take_output`](super::Node::take_output)
    /// gives it: handshake answers and timer datagrams appended to
    /// `others`, the sealed batch swapped into `batch` (which must be
    /// empty).
    pub fn take_output(&mut self, batch: &mut SendBatch, others: &mut Vec<Transmit>) {
        super::swap_output(&mut self.transmits, &mut self.out, batch, others);
    }

    /// The datagram sealed last, taken out of the send batch (the
    /// simulator and the tests, a packet at a time).
    pub fn pop_last(&mut self) -> Option<(SocketAddr, &[u8])> {
        self.out.pop_last()
    }

    /// Next datagram to send, one at a time (the simulator and the tests).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        super::next_transmit(&mut self.transmits, &mut self.out, &mut self.spare)
    }

    /// Runs the links' session timers (rekey, keepalive, retries) and
    /// reports each link's [`Activity`] to the node. Call it as often as
    /// the node's own timers run.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Grants that ran out go (with a circuit's keys): the node may not
        // take back what it no longer remembers granting.
        let expired: Vec<Ipv6Addr> = self
            .routes
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(addr, _)| *addr)
            .collect();
        for addr in expired {
            self.unroute(addr);
        }
        for lane in self.lanes.values_mut() {
            if let Tick::Expired =
                lane.chan
                    .tick(&mut self.scratch, &mut self.transmits, &mut self.spare)
            {
                self.events.push_back(FromPlane::Expired(lane.index));
            }
        }
        self.cross.flush();
        if self.reports_queued == 0 {
            self.report();
        }
    }

    /// Reports each link's [`Activity`] to the node now (as the timers do;
    /// for a `status` that must be current), and what circuits' cells did
    /// ([`CellReport`]: passed on, delivered, sent, dropped).
    pub fn report(&mut self) {
        let mut r = self.relays.take_report();
        self.outs.report(&mut r);
        if !r.is_empty() {
            self.events.push_back(FromPlane::Relayed(Box::new(r)));
            self.reports_queued += 1;
        }
        self.reports_queued += self.lanes.len();
        for lane in self.lanes.values_mut() {
            self.events
                .push_back(FromPlane::Activity(Box::new(Activity {
                    index: lane.index,
                    counters: lane.chan.counters,
                    drops: std::mem::take(&mut lane.drops),
                    last_rx: lane.chan.last_rx,
                    last_used: lane.chan.last_used,
                    last_app_rx: lane.chan.last_app_rx,
                    handshake_age: lane.chan.handshake_age(),
                })));
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the clock
#[path = "plane/tests.rs"]
mod tests;
