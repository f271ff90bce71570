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

use super::channel::{Channel, Delivery, Fit, Opened, Sealed, Tick};
use super::{reuse, Drops, LinkCounters, Transmit, MAX_DATAGRAM, MAX_SPARE, SPARE_CAPACITY};
use crate::proto::batch::SendBatch;
use crate::proto::wire::{self, Ipv6View, Lz4Table, MAX_PACKET};

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
}

impl Lane {
    /// The link's session index.
    pub fn index(&self) -> u32 {
        self.index
    }
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
    /// Packets to this overlay address go to the node again.
    Unroute(Ipv6Addr),
    /// Seal a frame the node made (a control message, a cell) on a link.
    Seal(u32, Vec<u8>),
    /// Seal an application packet the node routed over a link (compressed
    /// as the link does).
    SealApp(u32, Vec<u8>),
    /// Open a datagram for a link that the node's gate let through (a
    /// handshake initiation, or a datagram from a new endpoint).
    Admit {
        /// The link.
        index: u32,
        /// Where it came from.
        from: SocketAddr,
        /// When it came.
        at: Instant,
        /// The datagram.
        datagram: Vec<u8>,
    },
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

/// The data plane. See the module's documentation.
pub struct DataPlane {
    own: Ipv6Addr,
    lanes: HashMap<u32, Lane>,
    routes: HashMap<Ipv6Addr, (u32, Instant)>,
    /// A link's MTU when its neighbour moves (the configured one).
    mtu: usize,
    out: SendBatch,
    /// Packets for the TUN from admitted datagrams.
    tun_out: VecDeque<Vec<u8>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<FromPlane>,
    spare: Vec<Vec<u8>>,
    /// Decompression and unframing (a packet for the TUN).
    rebuild: Vec<u8>,
    /// Compression, handshakes and ICMP replies.
    scratch: Vec<u8>,
    lz4: Lz4Table,
    paused: bool,
    /// Frames the node asked to seal on a link the plane does not hold (a
    /// withdrawal crossed them), and datagrams refused for size.
    pub(super) lost: u64,
}

impl DataPlane {
    /// An empty plane for the node at overlay address `own`, whose links
    /// start at MTU `mtu`.
    pub fn new(own: Ipv6Addr, mtu: usize) -> DataPlane {
        DataPlane {
            own,
            lanes: HashMap::new(),
            routes: HashMap::new(),
            mtu,
            out: SendBatch::default(),
            tun_out: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            spare: Vec::new(),
            rebuild: vec![0u8; 2 * MAX_PACKET + 1024],
            scratch: vec![0u8; 2 * MAX_PACKET + 1024],
            lz4: Lz4Table::default(),
            paused: false,
            lost: 0,
        }
    }

    /// How many links the plane holds.
    pub fn links(&self) -> usize {
        self.lanes.len()
    }

    /// Acts on a message from the node.
    pub fn handle(&mut self, msg: ToPlane) {
        match msg {
            ToPlane::Handoff(lane) => {
                self.lanes.insert(lane.index, *lane);
            }
            ToPlane::Withdraw(index) => {
                self.routes.retain(|_, (i, _)| *i != index);
                if let Some(lane) = self.lanes.remove(&index) {
                    self.events.push_back(FromPlane::Returned(Box::new(lane)));
                }
            }
            ToPlane::Route(addr, index, until) => {
                self.routes.insert(addr, (index, until));
            }
            ToPlane::Unroute(addr) => {
                self.routes.remove(&addr);
            }
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
            ToPlane::Admit {
                index,
                from,
                at,
                datagram,
            } => {
                // Opened into `scratch`, which the plane uses only to seal.
                let mut buf = std::mem::take(&mut self.scratch);
                let got = match self.admit(at, index, from, &datagram, &mut buf) {
                    PlaneRx::InPlace(n) => Some((true, n)),
                    PlaneRx::Rebuilt(p) => Some((false, p.len())),
                    PlaneRx::Done | PlaneRx::NotMine => None,
                };
                if let Some((in_place, n)) = got {
                    let packet = if in_place {
                        &buf[..n]
                    } else {
                        &self.rebuild[..n]
                    };
                    let p = reuse(&mut self.spare, packet);
                    self.tun_out.push_back(p);
                }
                self.scratch = buf;
                self.recycle(datagram);
            }
            ToPlane::SetCompress(index, on) => {
                if let Some(lane) = self.lanes.get_mut(&index) {
                    lane.chan.compress = on;
                }
            }
            ToPlane::Seal(index, frame) => {
                match self.lanes.get_mut(&index) {
                    Some(lane) => {
                        if let Sealed::Failed = lane.chan.seal(&mut self.out, &frame) {
                            lane.drops.send_failed += 1;
                        }
                    }
                    None => self.lost += 1,
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
        }
    }

    /// A packet for the TUN from a datagram the node had the plane admit
    /// ([`ToPlane::Admit`]); hand the buffer back with
    /// [`DataPlane::recycle`].
    pub fn poll_tun_write(&mut self) -> Option<Vec<u8>> {
        self.tun_out.pop_front()
    }

    /// Whether messages for the node wait ([`DataPlane::poll_event`]).
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next message for the node.
    pub fn poll_event(&mut self) -> Option<FromPlane> {
        self.events.pop_front()
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
            Some(&(index, until)) if now < until => index,
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
        let (index, data) = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::PacketData(p)) => (p.receiver_idx >> 8, true),
            Ok(Packet::HandshakeResponse(p)) => (p.receiver_idx >> 8, false),
            Ok(Packet::PacketCookieReply(p)) => (p.receiver_idx >> 8, false),
            // Initiations pass the node's gate first ([`DataPlane::admit`]).
            Ok(Packet::HandshakeInit(_)) | Err(_) => return PlaneRx::NotMine,
        };
        match self.lanes.get(&index) {
            Some(lane) if lane.chan.endpoint == Some(from) => {}
            _ => return PlaneRx::NotMine,
        }
        self.open(now, index, from, datagram, buf, data)
    }

    /// Handles a datagram for handed link `index` that the node's gate let
    /// through (a handshake initiation, or data from a new endpoint). `buf`
    /// must hold [`MAX_PACKET`] bytes and more, as the packets that waited
    /// for a handshake may follow its answer.
    pub fn admit<'a>(
        &'a mut self,
        now: Instant,
        index: u32,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
    ) -> PlaneRx<'a> {
        if !self.lanes.contains_key(&index) || datagram.len() > buf.len() {
            return PlaneRx::Done;
        }
        let data = matches!(
            Tunn::parse_incoming_packet(datagram),
            Ok(Packet::PacketData(_))
        );
        self.open(now, index, super::normalize(from), datagram, buf, data)
    }

    fn open<'a>(
        &'a mut self,
        now: Instant,
        index: u32,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        data: bool,
    ) -> PlaneRx<'a> {
        let Some(lane) = self.lanes.get_mut(&index) else {
            return PlaneRx::Done;
        };
        let n = match lane.chan.open(from, datagram, buf, &mut self.transmits) {
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
        lane.chan.last_rx = now;
        if lane.chan.endpoint != Some(from) {
            lane.chan.endpoint = Some(from);
            lane.chan.mtu = self.mtu;
            self.events.push_back(FromPlane::Moved(index, from));
        }
        let Some(n) = n.filter(|_| data) else {
            return PlaneRx::Done;
        };
        let packet = &buf[..n];
        if let Ok(view) = Ipv6View::new_checked(packet) {
            if wire::control_of(view).is_some() {
                let packet = reuse(&mut self.spare, packet);
                self.events.push_back(FromPlane::Inner {
                    index,
                    at: now,
                    packet,
                });
                return PlaneRx::Done;
            }
        }
        let delivery = lane
            .chan
            .deliver(now, packet, Some(lane.peer), self.own, &mut self.rebuild);
        if matches!(delivery, Delivery::InPlace(_) | Delivery::Rebuilt(_))
            && lane
                .told
                .is_none_or(|t| now.saturating_duration_since(t) >= HEARD_EVERY)
        {
            lane.told = Some(now);
            self.events.push_back(FromPlane::Heard(index, now));
        }
        match delivery {
            Delivery::InPlace(n) => PlaneRx::InPlace(n),
            Delivery::Rebuilt(n) => PlaneRx::Rebuilt(&self.rebuild[..n]),
            Delivery::Control => PlaneRx::Done,
            Delivery::Dropped(why) => {
                why.count(&mut lane.drops);
                PlaneRx::Done
            }
        }
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
    pub fn handle_timeout(&mut self, _now: Instant) {
        for lane in self.lanes.values_mut() {
            if let Tick::Expired =
                lane.chan
                    .tick(&mut self.scratch, &mut self.transmits, &mut self.spare)
            {
                self.events.push_back(FromPlane::Expired(lane.index));
            }
        }
        self.report();
    }

    /// Reports each link's [`Activity`] to the node now (as the timers do;
    /// for a `status` that must be current).
    pub fn report(&mut self) {
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
