//! A node and, if it uses them, its data planes, driven from one thread
//! with the node's one-packet-at-a-time calls: what the simulator and the
//! tests run, so that every scenario runs with links handed to a plane (or
//! spread over several) as well as without. Each call gives a plane what
//! is routed to it first, then the node, and passes the messages between
//! them until all are quiet. It copies what it returns (a shell would not:
//! each data thread holds its plane and takes the node's lock only for
//! what the plane answers `NotMine`).
//!
//! With several planes it picks the one a datagram or a TUN packet reaches
//! as the kernel would in the shell: a datagram by the link index in its
//! receiver index (`qgate_platform::steer_by_link`), a TUN packet by a
//! hash of its destination (a queue of a multi-queue TUN, as for a flow
//! the kernel has not seen answered yet; so about half of them reach a
//! plane without the route, which leaves them to the node).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::time::Instant;

use super::plane::{DataPlane, PlaneRx, PlaneTx, ToPlane};
use super::{Delivered, Node, NodeStatus, Sweep, Transmit, TunOutcome};
use crate::proto::wire::MAX_PACKET;

/// A node and its data plane. Every other call of the node's goes to it
/// as it is (through `Deref`).
pub struct Host {
    node: Node,
    /// The planes, one per data worker; none without planes.
    planes: Vec<DataPlane>,
    /// Packets for the TUN that came out of passing messages.
    tun: VecDeque<Vec<u8>>,
    /// What a call returns, copied.
    ret: Vec<u8>,
    /// Datagrams are opened here.
    buf: Vec<u8>,
    /// Application packets the node gave the plane to seal in the last
    /// pump.
    sealed_app: usize,
}

impl Deref for Host {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl DerefMut for Host {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}

impl Host {
    /// The node alone.
    pub fn new(node: Node) -> Host {
        Host {
            node,
            planes: Vec::new(),
            tun: VecDeque::new(),
            ret: Vec::new(),
            buf: vec![0u8; 2 * MAX_PACKET + 1024],
            sealed_app: 0,
        }
    }

    /// The node, handing its established links to a data plane.
    pub fn with_plane(node: Node) -> Host {
        Host::with_planes(node, 1)
    }

    /// The node, spreading its established links over `workers` data
    /// planes ([`Node::data_planes`]).
    pub fn with_planes(mut node: Node, workers: usize) -> Host {
        let planes = node.data_planes(workers);
        let mut h = Host::new(node);
        h.planes = planes;
        h
    }

    /// How many of the planes hold a circuit (relayed or ending here).
    #[cfg(test)]
    pub fn planes_holding(&self) -> usize {
        self.planes.iter().filter(|p| p.relayed() > 0).count()
    }

    /// The (first) data plane, if the node uses one.
    pub fn plane(&mut self) -> Option<&mut DataPlane> {
        self.pump();
        self.planes.first_mut()
    }

    /// The plane the kernel would give datagram `d`: the low byte of the
    /// link index in its receiver index, modulo the planes (what
    /// `qgate_platform::steer_by_link`'s program computes).
    fn plane_for_datagram(&self, d: &[u8]) -> usize {
        let at = if d.first() == Some(&2) { 9 } else { 5 };
        d.get(at)
            .map_or(0, |b| usize::from(*b) % self.planes.len().max(1))
    }

    /// The plane a TUN packet to `packet`'s destination reaches: a fixed
    /// hash of the destination.
    fn plane_for_packet(&self, packet: &[u8]) -> usize {
        let dst = packet.get(24..40).unwrap_or(&[]);
        let h = dst
            .iter()
            .fold(0usize, |h, b| h.wrapping_mul(31) ^ usize::from(*b));
        h % self.planes.len().max(1)
    }

    /// Passes messages between the node and the planes until none has
    /// any.
    fn pump(&mut self) {
        if self.planes.is_empty() {
            return;
        }
        let workers = self.planes.len();
        loop {
            let mut moved = false;
            while let Some(m) = self.node.poll_plane() {
                if matches!(m, ToPlane::SealApp(..)) {
                    self.sealed_app += 1;
                }
                let planes = &mut self.planes;
                m.dispatch(workers, |w, m| planes[w].handle(m));
                moved = true;
            }
            for w in 0..workers {
                while let Some(m) = self.planes[w].poll_crossing() {
                    // Never back to the plane that sent it.
                    let planes = &mut self.planes;
                    m.dispatch(workers, |v, m| {
                        if v != w {
                            planes[v].handle(m);
                        }
                    });
                    moved = true;
                }
                while let Some(e) = self.planes[w].poll_event() {
                    if let Some(p) = self.node.handle_plane(e) {
                        self.tun.push_back(p.to_vec());
                    }
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// As [`Node::handle_datagram`].
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, d: &[u8]) -> Option<&[u8]> {
        self.pump();
        let mut got = false;
        let mut mine = false;
        let w = self.plane_for_datagram(d);
        if let Some(plane) = self.planes.get_mut(w) {
            match plane.receive(now, from, d, &mut self.buf) {
                PlaneRx::InPlace(n) => {
                    self.ret.clear();
                    self.ret.extend_from_slice(&self.buf[..n]);
                    (got, mine) = (true, true);
                }
                PlaneRx::Rebuilt(p) => {
                    self.ret.clear();
                    self.ret.extend_from_slice(p);
                    (got, mine) = (true, true);
                }
                PlaneRx::Done => mine = true,
                PlaneRx::NotMine => {}
            }
        }
        if !mine {
            if let Some(p) = self.node.handle_datagram(now, from, d) {
                self.ret.clear();
                self.ret.extend_from_slice(p);
                got = true;
            }
        }
        self.pump();
        if let Some(index) = self.node.take_admitted() {
            got = self.admit(now, index, from, d);
            self.pump();
        }
        if !got {
            let p = self.tun.pop_front()?;
            self.ret = p;
        }
        Some(&self.ret)
    }

    /// As [`Node::handle_tun_packet`].
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) -> TunOutcome<'_> {
        self.pump();
        let w = self.plane_for_packet(packet);
        if let Some(plane) = self.planes.get_mut(w) {
            match plane.send_tun_packet(now, packet) {
                PlaneTx::Done => {
                    return match plane.pop_last() {
                        Some((dst, d)) => {
                            self.ret.clear();
                            self.ret.extend_from_slice(d);
                            TunOutcome::Send(dst, &self.ret)
                        }
                        None => TunOutcome::Nothing,
                    };
                }
                PlaneTx::Reply(p) => {
                    self.ret.clear();
                    self.ret.extend_from_slice(p);
                    return TunOutcome::Reply(&self.ret);
                }
                PlaneTx::NotMine => {}
            }
        }
        self.sealed_app = 0;
        let out = match self.node.handle_tun_packet(now, packet) {
            TunOutcome::Send(dst, d) => {
                self.ret.clear();
                self.ret.extend_from_slice(d);
                Some((Some(dst), true))
            }
            TunOutcome::Reply(p) => {
                self.ret.clear();
                self.ret.extend_from_slice(p);
                Some((None, true))
            }
            TunOutcome::Nothing => None,
        };
        self.pump();
        match out {
            Some((Some(dst), _)) => TunOutcome::Send(dst, &self.ret),
            Some((None, _)) => TunOutcome::Reply(&self.ret),
            // Routed over a handed link: the plane sealed it (fragments
            // stay in the batch, as the node leaves them).
            None if self.sealed_app != 1 => TunOutcome::Nothing,
            None => match self.planes.iter_mut().find_map(|p| p.pop_last()) {
                Some((dst, d)) => {
                    self.ret.clear();
                    self.ret.extend_from_slice(d);
                    TunOutcome::Send(dst, &self.ret)
                }
                None => TunOutcome::Nothing,
            },
        }
    }

    /// As [`Node::receive`]: the plane opens a datagram on a handed link
    /// into `buf`, the node the rest.
    pub fn receive<'a>(
        &'a mut self,
        now: Instant,
        from: SocketAddr,
        d: &[u8],
        buf: &mut [u8],
    ) -> Option<Delivered<'a>> {
        self.pump();
        let mut mine = false;
        let w = self.plane_for_datagram(d);
        if let Some(plane) = self.planes.get_mut(w) {
            match plane.receive(now, from, d, buf) {
                PlaneRx::InPlace(n) => return Some(Delivered::InPlace(n)),
                PlaneRx::Rebuilt(p) => {
                    self.ret.clear();
                    self.ret.extend_from_slice(p);
                    return Some(Delivered::Rebuilt(&self.ret));
                }
                PlaneRx::Done => mine = true,
                PlaneRx::NotMine => {}
            }
        }
        let mut got = if mine {
            None
        } else {
            match self.node.receive(now, from, d, buf) {
                None => None,
                Some(Delivered::InPlace(n)) => Some(Some(n)),
                Some(Delivered::Rebuilt(p)) => {
                    self.ret.clear();
                    self.ret.extend_from_slice(p);
                    Some(None)
                }
            }
        };
        self.pump();
        if let Some(index) = self.node.take_admitted() {
            got = self.admit(now, index, from, d).then_some(None);
            self.pump();
        }
        match got {
            Some(Some(n)) => Some(Delivered::InPlace(n)),
            Some(None) => Some(Delivered::Rebuilt(&self.ret)),
            None => {
                self.ret = self.tun.pop_front()?;
                Some(Delivered::Rebuilt(&self.ret))
            }
        }
    }

    /// Has the plane open a datagram the node's gate let through for a
    /// handed link; a packet for the TUN lands in `ret` (true).
    fn admit(&mut self, now: Instant, index: u32, from: SocketAddr, d: &[u8]) -> bool {
        let w = super::plane::worker_of(index, self.planes.len());
        let Some(plane) = self.planes.get_mut(w) else {
            return false;
        };
        let n = match plane.admit(now, index, from, d, &mut self.buf) {
            PlaneRx::InPlace(n) => n,
            PlaneRx::Rebuilt(p) => {
                self.ret.clear();
                self.ret.extend_from_slice(p);
                return true;
            }
            PlaneRx::Done | PlaneRx::NotMine => return false,
        };
        self.ret.clear();
        self.ret.extend_from_slice(&self.buf[..n]);
        true
    }

    /// As [`Node::status`], with the plane's counts as of now.
    pub fn status(&mut self) -> NodeStatus {
        for plane in &mut self.planes {
            plane.report();
        }
        self.pump();
        self.node.status()
    }

    /// As [`Node::poll_transmit`]: the node's datagrams, then the planes'.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.pump();
        if let Some(t) = self.node.poll_transmit() {
            return Some(t);
        }
        self.planes.iter_mut().find_map(|p| p.poll_transmit())
    }

    /// As [`Node::poll_tun_write`].
    pub fn poll_tun_write(&mut self) -> Option<Vec<u8>> {
        self.pump();
        self.node.poll_tun_write().or_else(|| self.tun.pop_front())
    }

    /// As [`Node::handle_timeout`]: the plane's timers first (its reports
    /// reach the node's link timers), then the node's.
    pub fn handle_timeout(&mut self, now: Instant) {
        while self.handle_timeout_some(now, usize::MAX) == Sweep::More {}
    }

    /// As [`Node::handle_timeout_some`]; the plane's timers run at the
    /// start of a sweep.
    pub fn handle_timeout_some(&mut self, now: Instant, links: usize) -> Sweep {
        self.pump();
        if !self.node.sweeping && !self.planes.is_empty() {
            for plane in &mut self.planes {
                plane.handle_timeout(now);
            }
            self.pump();
        }
        let sweep = self.node.handle_timeout_some(now, links);
        self.pump();
        sweep
    }
}
