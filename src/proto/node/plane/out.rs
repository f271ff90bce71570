//! The data plane's share of a source's circuits: DATA on a circuit this
//! node built, sent without the node. When the node sends a packet to an
//! address over a ready circuit whose first link the plane holds, it grants
//! the plane a route to that circuit ([`OutRoute`]) for a while, as it
//! grants direct routes; the plane then compresses the packets to that
//! address as the node would, wraps them in the circuit's layers as DATA
//! for its last hop, numbering them from the count it shares with the node
//! ([`CellCounter`]), and seals the cell on the first link. It counts what
//! it sent per circuit for the node's idle timer and `status`. Everything
//! else a source does (building, probes, AUTH, the cells that come back)
//! stays with the node.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::Instant;

use super::relay::CellReport;
use crate::proto::compress::Adaptive;
use crate::proto::node::circuits::CellCounter;
use crate::proto::onion::HopKeys;

/// A route to a circuit this node built, as the node grants it.
pub struct OutRoute {
    /// The node's ID for the circuit.
    pub(in crate::proto::node) id: u64,
    /// The destination whose packets take it.
    pub(in crate::proto::node) dst: Ipv6Addr,
    /// The link to the first hop, and the circuit's ID on it.
    pub(in crate::proto::node) link: u32,
    pub(in crate::proto::node) circ: u32,
    /// The hops' keys, first to last (the node keeps them too).
    pub(in crate::proto::node) keys: Vec<Arc<HopKeys>>,
    /// The last hop's cell count, shared with the node.
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
}

/// The circuits the plane sends on, by the node's ID.
#[derive(Default)]
pub(super) struct OutRoutes {
    circuits: HashMap<u64, Sending>,
}

impl OutRoutes {
    /// Takes route `r` (a new grant for its circuit replaces the old).
    pub(super) fn insert(&mut self, r: OutRoute) {
        let s = self.circuits.remove(&r.id);
        let (used, bytes) = s.as_ref().map_or((None, 0), |s| (s.used, s.bytes));
        let adaptive = s.map(|s| s.adaptive).unwrap_or_default();
        self.circuits.insert(
            r.id,
            Sending {
                route: r,
                adaptive,
                used,
                bytes,
            },
        );
    }

    /// The circuit `id`, if the plane sends on it.
    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut Sending> {
        self.circuits.get_mut(&id)
    }

    /// Stops sending on circuit `id` (what it sent since the last report
    /// is still reported).
    pub(super) fn remove(&mut self, id: u64, report: &mut CellReport) {
        if let Some(s) = self.circuits.remove(&id) {
            Self::note(report, id, &s);
        }
    }

    /// Link `index` left the plane: the circuits that start on it leave
    /// too; returns their destinations.
    pub(super) fn lane_gone(&mut self, index: u32, report: &mut CellReport) -> Vec<Ipv6Addr> {
        let gone: Vec<(u64, Ipv6Addr)> = self
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
            (s.used, s.bytes) = (None, 0);
        }
    }

    fn note(report: &mut CellReport, id: u64, s: &Sending) {
        if let Some(t) = s.used {
            report.sent.push((id, t, s.bytes));
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
