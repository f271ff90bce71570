//! What the node reports about circuits: the views `qgate circuits` shows
//! and the relay counters of `qgate status`.

use std::net::Ipv6Addr;
use std::time::Instant;

use serde::Serialize;

use super::{RelayStats, RouteNoteView, RoutingSummary, Stage, CIRCUIT_MTU};
use crate::proto::identity::NodeId;
use crate::proto::node::Node;

/// One circuit this node built, as `qgate circuits` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CircuitView {
    /// Local handle.
    pub id: u64,
    /// Destination overlay address.
    pub destination: Ipv6Addr,
    /// Destination node ID, once known.
    pub destination_node: Option<NodeId>,
    /// Relays in order (node IDs).
    pub hops: Vec<NodeId>,
    /// building | ready
    pub state: &'static str,
    /// Seconds since the build began.
    pub age_secs: f64,
    /// Application bytes sent / received.
    pub tx_bytes: u64,
    /// Application bytes received.
    pub rx_bytes: u64,
    /// Largest packet it carries.
    pub mtu: usize,
}

/// A circuit this node carries as relay.
#[derive(Clone, Debug, Serialize)]
pub struct RelayedView {
    /// Previous neighbour.
    pub prev: Option<NodeId>,
    /// Next neighbour (None: not extended).
    pub next: Option<NodeId>,
    /// Seconds since CREATE.
    pub age_secs: f64,
    /// Cell bytes forwarded towards the destination.
    pub fwd_bytes: u64,
    /// Cell bytes forwarded towards the source.
    pub bwd_bytes: u64,
}

/// A circuit ending here.
#[derive(Clone, Debug, Serialize)]
pub struct InboundView {
    /// The authenticated source.
    pub source: Option<Ipv6Addr>,
    /// Previous neighbour (the last relay).
    pub prev: Option<NodeId>,
    /// Seconds since CREATE.
    pub age_secs: f64,
    /// Application bytes received.
    pub rx_bytes: u64,
    /// Application bytes sent back.
    pub tx_bytes: u64,
}

/// What `qgate circuits` reports.
#[derive(Clone, Debug, Serialize)]
pub struct CircuitsReport {
    /// Built here.
    pub circuits: Vec<CircuitView>,
    /// Carried as relay.
    pub relayed: Vec<RelayedView>,
    /// Ending here.
    pub inbound: Vec<InboundView>,
    /// Relays known (the pool paths are drawn from).
    pub pool: usize,
    /// What the default route policy does now and why.
    pub routing: RoutingSummary,
    /// Destinations without a circuit for want of relays: sent direct or
    /// unreachable.
    pub no_circuit: Vec<RouteNoteView>,
}

impl Node {
    /// Relay counters.
    pub(in crate::proto::node) fn relay_stats(&self) -> RelayStats {
        let mut s = self.circ.stats;
        s.enabled = self.config.relay.enabled;
        s.circuits = self.circ.hops.len();
        s
    }

    /// Circuits built here, carried, and ending here.
    pub fn circuits(&self, now: Instant) -> CircuitsReport {
        let mut circuits: Vec<CircuitView> = self
            .circ
            .out
            .iter()
            .map(|(id, c)| CircuitView {
                id,
                destination: c.dst,
                destination_node: c.dest.as_ref().map(|d| d.id),
                hops: c.relays.iter().map(|p| p.id).collect(),
                state: if c.stage == Stage::Ready {
                    "ready"
                } else {
                    "building"
                },
                age_secs: now.saturating_duration_since(c.created).as_secs_f64(),
                tx_bytes: c.tx_bytes,
                rx_bytes: c.rx_bytes,
                mtu: CIRCUIT_MTU,
            })
            .collect();
        circuits.sort_by_key(|c| c.id);
        let mut relayed = Vec::new();
        let mut inbound = Vec::new();
        for hc in self.circ.hops.values() {
            let prev = self.neighbour(hc.prev().0);
            let age_secs = now.saturating_duration_since(hc.created).as_secs_f64();
            if hc.next.is_some() {
                relayed.push(RelayedView {
                    prev,
                    next: hc.next.and_then(|(l, _)| self.neighbour(l)),
                    age_secs,
                    fwd_bytes: hc.fwd_bytes,
                    bwd_bytes: hc.bwd_bytes,
                });
            } else {
                inbound.push(InboundView {
                    source: hc.auth(),
                    prev,
                    age_secs,
                    rx_bytes: hc.rx_bytes,
                    tx_bytes: hc.tx_bytes,
                });
            }
        }
        CircuitsReport {
            circuits,
            relayed,
            inbound,
            pool: self.circ.pool.len(),
            routing: self.routing_summary(),
            no_circuit: self.route_notes(now),
        }
    }

    /// Circuits this node built.
    pub(in crate::proto::node) fn out_circuits(&self) -> usize {
        self.circ.out.len()
    }
}
