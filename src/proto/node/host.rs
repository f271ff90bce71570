//! A node and, if it uses one, its data plane, driven from one thread with
//! the node's one-packet-at-a-time calls: what the simulator and the tests
//! run, so that every scenario runs with links handed to a plane as well as
//! without. Each call gives the plane what is routed to it first, then the
//! node, and passes the messages between them until both are quiet. It
//! copies what it returns (a shell would not: the data thread holds the
//! plane and takes the node's lock only for what the plane answers
//! `NotMine`).

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
    plane: Option<DataPlane>,
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
            plane: None,
            tun: VecDeque::new(),
            ret: Vec::new(),
            buf: vec![0u8; 2 * MAX_PACKET + 1024],
            sealed_app: 0,
        }
    }

    /// The node, handing its established links to a data plane.
    pub fn with_plane(mut node: Node) -> Host {
        let plane = node.data_plane();
        let mut h = Host::new(node);
        h.plane = Some(plane);
        h
    }

    /// The data plane, if the node uses one.
    pub fn plane(&mut self) -> Option<&mut DataPlane> {
        self.pump();
        self.plane.as_mut()
    }

    /// Passes messages between the node and the plane until neither has
    /// any.
    fn pump(&mut self) {
        let Some(plane) = &mut self.plane else {
            return;
        };
        loop {
            let mut moved = false;
            while let Some(m) = self.node.poll_plane() {
                if matches!(m, ToPlane::SealApp(..)) {
                    self.sealed_app += 1;
                }
                plane.handle(m);
                moved = true;
            }
            while let Some(e) = plane.poll_event() {
                if let Some(p) = self.node.handle_plane(e) {
                    self.tun.push_back(p.to_vec());
                }
                moved = true;
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
        if let Some(plane) = &mut self.plane {
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
        if let Some(plane) = &mut self.plane {
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
            None => match self.plane.as_mut().and_then(|p| p.pop_last()) {
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
        if let Some(plane) = &mut self.plane {
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
        let Some(plane) = &mut self.plane else {
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
        if let Some(plane) = &mut self.plane {
            plane.report();
        }
        self.pump();
        self.node.status()
    }

    /// As [`Node::poll_transmit`]: the node's datagrams, then the plane's.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.pump();
        if let Some(t) = self.node.poll_transmit() {
            return Some(t);
        }
        self.plane.as_mut()?.poll_transmit()
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
        if !self.node.sweeping {
            if let Some(plane) = &mut self.plane {
                plane.handle_timeout(now);
                self.pump();
            }
        }
        let sweep = self.node.handle_timeout_some(now, links);
        self.pump();
        sweep
    }
}
