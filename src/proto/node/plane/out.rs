//! The data plane's share of a circuit's ends: DATA sent on a circuit this
//! node built, or back on one it ends, and the cells that come back on one
//! it built, without the node. When the node sends a packet to an address
//! over a ready circuit whose first link the plane holds (or back on a
//! circuit from that address that ends here), it grants the plane a route
//! to that circuit ([`OutRoute`]) for a while, as it grants direct routes;
//! the plane then compresses the packets to that address as the node
//! would, wraps them in the circuit's layers as DATA for its last hop (or
//! in this hop's layer, back to the source), numbering them from the count
//! it shares with the node ([`CellCounter`]), and seals the cell on the
//! link. While it holds the route to a circuit this node built, it also
//! peels the cells that come back on it, checking each hop's counters
//! against the replay window it shares with the node: DATA from the
//! destination goes to the TUN, any other answer to the node, opened. It
//! counts what it sent and received per circuit for the node's idle timers
//! and `status`. Building, probes and AUTH stay with the node.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use super::relay::CellReport;
use super::CircuitRef;
use crate::proto::compress::Adaptive;
use crate::proto::node::circuits::{count, CellCounter, CellDrops};
use crate::proto::onion::{self, parse_cell, CellKind, Cmd, HopKeys, ReplayWindow, CELL_HEADER};

/// A route to a circuit this node built, or back on one that ends here, as
/// the node grants it.
pub struct OutRoute {
    /// The circuit: one this node built (DATA goes forward to its last
    /// hop), or one it ends (DATA goes back to its source).
    pub(in crate::proto::node) id: CircuitRef,
    /// The destination whose packets take it.
    pub(in crate::proto::node) dst: Ipv6Addr,
    /// The link the cells leave on (to the first hop, or back towards the
    /// source), and the circuit's ID on it.
    pub(in crate::proto::node) link: u32,
    pub(in crate::proto::node) circ: u32,
    /// The hops' keys, first to last (the node keeps them too); where the
    /// circuit ends here, this hop's alone.
    pub(in crate::proto::node) keys: Vec<Arc<HopKeys>>,
    /// Each hop's replay window, first to last, shared with the node: the
    /// cells coming back on a circuit this node built are checked against
    /// them (none where the circuit ends here: its cells come in as
    /// [`Relay`](super::Relay)'s).
    pub(in crate::proto::node) replays: Vec<Arc<ReplayWindow>>,
    /// The count of the cells the plane numbers, shared with the node: the
    /// last hop's, or this hop's towards the source.
    pub(in crate::proto::node) counter: CellCounter,
    /// Whether the circuit compresses (the node's setting; the plane
    /// pauses it as the node does when all cells are large).
    pub(in crate::proto::node) compress: bool,
    /// Whether all cells are large (`traffic.always_large`).
    pub(in crate::proto::node) always_large: bool,
}

pub(super) struct Sending {
    pub(super) route: OutRoute,
    /// Which flows are worth compressing (the plane's own judgement).
    pub(super) adaptive: Adaptive,
    /// Since the last report: when it last sent, and the packets' bytes.
    used: Option<Instant>,
    bytes: u64,
    /// Since the last report: when DATA last came back, and its bytes.
    delivered: Option<Instant>,
    rx: u64,
}

/// What became of a cell that came back on a circuit this node built
/// ([`OutRoutes::receive`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Back {
    /// DATA from the destination, opened: its range in the cell.
    Data {
        id: u64,
        dst: Ipv6Addr,
        data: Range<usize>,
    },
    /// Another answer, opened: from hop `hop`, the command and its data's
    /// range in the cell.
    Opened {
        id: u64,
        hop: usize,
        cmd: Cmd,
        data: Range<usize>,
    },
    /// Forged, replayed or recognised by no hop: dropped and counted.
    Dropped,
    /// Not on a circuit the plane holds: the node's.
    Node,
}

/// The circuits the plane sends on, by the node's ID, and those this node
/// built also by their first link and circuit ID there.
#[derive(Default)]
pub(super) struct OutRoutes {
    circuits: HashMap<CircuitRef, Sending>,
    on_lane: HashMap<(u32, u32), u64>,
}

impl OutRoutes {
    /// Takes route `r` (a new grant for its circuit replaces the old).
    pub(super) fn insert(&mut self, r: OutRoute) {
        let (adaptive, used, bytes, delivered, rx) = match self.circuits.remove(&r.id) {
            Some(s) => (s.adaptive, s.used, s.bytes, s.delivered, s.rx),
            None => (Adaptive::default(), None, 0, None, 0),
        };
        if let CircuitRef::Built(id) = r.id {
            self.on_lane.insert((r.link, r.circ), id);
        }
        self.circuits.insert(
            r.id,
            Sending {
                route: r,
                adaptive,
                used,
                bytes,
                delivered,
                rx,
            },
        );
    }

    /// The circuit `id`, if the plane sends on it.
    pub(super) fn get_mut(&mut self, id: CircuitRef) -> Option<&mut Sending> {
        self.circuits.get_mut(&id)
    }

    /// Stops sending on circuit `id` (what it sent since the last report
    /// is still reported).
    pub(super) fn remove(&mut self, id: CircuitRef, report: &mut CellReport) {
        if let Some(s) = self.circuits.remove(&id) {
            let key = (s.route.link, s.route.circ);
            if self.on_lane.get(&key).map(|b| CircuitRef::Built(*b)) == Some(id) {
                self.on_lane.remove(&key);
            }
            Self::note(report, id, &s);
        }
    }

    /// A cell arrived on link `index` (`cell`: the whole cell). If it came
    /// back on a circuit this node built and the plane holds, it is peeled
    /// in place, and its counter checked against the replay window of the
    /// hop that sent it.
    pub(super) fn receive(&mut self, index: u32, cell: &mut [u8], drops: &mut CellDrops) -> Back {
        let Ok(hdr) = parse_cell(cell) else {
            return Back::Node;
        };
        if hdr.kind != CellKind::Relay {
            return Back::Node;
        }
        let Some(&id) = self.on_lane.get(&(index, hdr.circ)) else {
            return Back::Node;
        };
        let Some(s) = self.circuits.get_mut(&CircuitRef::Built(id)) else {
            return Back::Node;
        };
        let r = &s.route;
        let u = onion::unwrap(&r.keys, hdr.nonce, &mut cell[CELL_HEADER..]).and_then(|u| {
            let window = r
                .replays
                .get(u.hop)
                .ok_or(onion::OnionError::Unrecognised)?;
            window.check(u.counter).map(|()| u)
        });
        let u = match u {
            Ok(u) => u,
            Err(e) => {
                count(drops, e);
                return Back::Dropped;
            }
        };
        let data = CELL_HEADER + u.data.start..CELL_HEADER + u.data.end;
        if u.command == Cmd::Data && u.hop + 1 == r.keys.len() {
            return Back::Data {
                id,
                dst: r.dst,
                data,
            };
        }
        Back::Opened {
            id,
            hop: u.hop,
            cmd: u.command,
            data,
        }
    }

    /// Circuit `id` (this node built) brought a packet of `bytes` back at
    /// `now`.
    pub(super) fn delivered(&mut self, now: Instant, id: u64, bytes: usize) {
        if let Some(s) = self.circuits.get_mut(&CircuitRef::Built(id)) {
            s.delivered = Some(now);
            s.rx += bytes as u64;
        }
    }

    /// Link `index` left the plane: the circuits that start on it leave
    /// too; returns their destinations.
    pub(super) fn lane_gone(&mut self, index: u32, report: &mut CellReport) -> Vec<Ipv6Addr> {
        let gone: Vec<(CircuitRef, Ipv6Addr)> = self
            .circuits
            .values()
            .filter(|s| s.route.link == index)
            .map(|s| (s.route.id, s.route.dst))
            .collect();
        for (id, _) in &gone {
            self.remove(*id, report);
        }
        gone.into_iter().map(|(_, dst)| dst).collect()
    }

    /// Adds what the circuits sent since the last report to `report`.
    pub(super) fn report(&mut self, report: &mut CellReport) {
        for (id, s) in &mut self.circuits {
            Self::note(report, *id, s);
            (s.used, s.bytes, s.delivered, s.rx) = (None, 0, None, 0);
        }
    }

    fn note(report: &mut CellReport, id: CircuitRef, s: &Sending) {
        if let Some(t) = s.used {
            report.sent.push((id, t, s.bytes));
        }
        if let Some(t) = s.delivered {
            report.received.push((id, t, s.rx));
        }
    }
}

impl Sending {
    /// Notes a packet of `bytes` sent at `now`.
    pub(super) fn sent(&mut self, now: Instant, bytes: usize) {
        self.used = Some(now);
        self.bytes += bytes as u64;
    }
}
