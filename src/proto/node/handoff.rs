//! The node's side of the data plane ([`plane`](super::plane)): which links
//! it hands over and when, what it asks the plane to do on them, and what
//! it takes in from the plane's reports.
//!
//! A link is handed over once it is up and its neighbour verified (the
//! link timers look each tick), and withdrawn when it is removed. The node
//! keeps the link's control state (`Link`) and a copy of the channel's
//! (endpoint, MTU, counters, timestamps, the session's age) that the
//! plane's reports keep current to within a tick. Packets the node routes
//! over a handed link, and the control messages and cells it sends there,
//! go to the plane as messages. Packets to an address the node has just
//! routed straight over a handed link go to the plane directly for
//! [`ROUTE_HOLD`], unless a circuit takes over the address first; so do
//! packets to an address the node has just sent on a ready circuit it
//! built (a route to the circuit, `Node::plane_route_circuit`), until a
//! replacement, the circuit's end or an inbound circuit takes it back;
//! and packets back on a circuit that ends here, to its authenticated
//! source. A circuit this node relays between two handed links, or one
//! that ends here on a handed link, is handed over too
//! (`Circuits::maybe_hand_hop`): the plane passes its cells on, or opens them.

use super::plane::{Activity, DataPlane, FromPlane, Lane, OpenedCell, OutRoute, ToPlane};
use super::*;

/// How long at most the plane may send packets to an address over the link
/// or circuit the node last chose for it before it asks the node again; a
/// direct route never past the moment the node's own direct decision is
/// due again (`RECHECK`, 10 s after it was made). A circuit to the
/// address, or one that brings packets from it, takes a direct route back
/// at once; a circuit's route goes back when a replacement takes over,
/// when it ends, and when a circuit from the address brings its DATA or
/// AUTH (a source's probes refreshing such a circuit move the node's
/// choice without telling the plane: for at most this long). (At 1 s, one ping in
/// 100 at 10 ms went through the node, and the p99 of a ping test measured
/// that one.)
const ROUTE_HOLD: Duration = Duration::from_secs(5);

/// The node's hand-off state: whether it uses a plane, and what it has to
/// tell it.
#[derive(Default)]
pub(super) struct Handoff {
    on: bool,
    /// How many planes (data workers) the links are spread over (see
    /// [`plane::worker_of`]); 0 or 1: one.
    workers: usize,
    out: VecDeque<ToPlane>,
    /// Links removed while handed: their counters as last reported, until
    /// the plane returns them with the rest.
    withdrawn: HashMap<u32, LinkCounters>,
    /// Addresses the plane routes, and until when.
    routed: HashMap<Ipv6Addr, Instant>,
    /// The handed link the last datagram passed the gate for.
    admitted: Option<u32>,
}

/// Most routed addresses remembered before the expired ones are dropped.
const MAX_ROUTED: usize = 4096;

impl Handoff {
    /// Whether the node uses a plane.
    pub(super) fn is_on(&self) -> bool {
        self.on
    }

    /// How many messages wait for the plane.
    #[cfg(test)]
    pub(super) fn pending(&self) -> usize {
        self.out.len()
    }

    /// Tells the plane something (a link's compression, links' MTU, an
    /// initiation to send), if the node uses one.
    pub(super) fn tell(&mut self, msg: ToPlane) {
        if self.on {
            self.out.push_back(msg);
        }
    }

    /// Packets to `addr` go through the node again, if the plane routes
    /// them.
    pub(super) fn unroute(&mut self, addr: Ipv6Addr) {
        if self.routed.remove(&addr).is_some() {
            self.out.push_back(ToPlane::Unroute(addr));
        }
    }
}

impl Node {
    /// From now on, hands established links to the data plane this
    /// returns. The caller passes [`Node::poll_plane`]'s messages to it and
    /// its [`DataPlane::poll_event`]s to [`Node::handle_plane`], gives it
    /// the TUN packets and datagrams first, and the node those the plane
    /// answers `NotMine`.
    pub fn data_plane(&mut self) -> DataPlane {
        self.data_planes(1).pop().expect("one plane")
    }

    /// As [`Node::data_plane`], for `workers` data workers (at least one):
    /// link `index` goes to plane [`plane::worker_of`]`(index, workers)`,
    /// and the caller passes each of [`Node::poll_plane`]'s messages on
    /// with [`ToPlane::dispatch`], and so each plane's
    /// [`DataPlane::poll_crossing`] to the other planes: a circuit relayed
    /// between two links of different planes is held by both, each passing
    /// on the cells that arrive on its link, to the other to seal. The
    /// relay bandwidth cap is split evenly over the planes.
    pub fn data_planes(&mut self, workers: usize) -> Vec<DataPlane> {
        let workers = workers.max(1);
        self.handoff.on = true;
        self.handoff.workers = workers;
        // The cap is the node's: each plane gets its share.
        let share = |bw: u64| (bw / workers as u64).max(1);
        let bucket = self
            .config
            .relay
            .bandwidth
            .map(|bw| circuits::relay_bucket(share(bw)));
        (0..workers)
            .map(|id| {
                let mut plane = DataPlane::new(self.address, self.config.mtu, bucket);
                plane.set_worker(id, workers);
                #[cfg(feature = "test-hooks")]
                plane.log_cells(self.cell_log_on());
                plane
            })
            .collect()
    }

    /// Handed links per plane (none without planes).
    pub(super) fn worker_links(&self) -> Vec<u64> {
        if !self.handoff.on {
            return Vec::new();
        }
        let n = self.handoff.workers.max(1);
        let mut per = vec![0u64; n];
        for l in self.links.values().filter(|l| l.chan.handed()) {
            per[plane::worker_of(l.index, n)] += 1;
        }
        per
    }

    /// Whether the node hands links and circuits to a data plane.
    pub(super) fn uses_plane(&self) -> bool {
        self.handoff.on
    }

    /// The next message for the data plane.
    pub fn poll_plane(&mut self) -> Option<ToPlane> {
        self.handoff.out.pop_front()
    }

    /// Whether link `index` is handed to the data plane.
    pub(super) fn handed(&self, index: u32) -> bool {
        self.links.get(&index).is_some_and(|l| l.chan.handed())
    }

    /// Hands link `index` over if it is up and not handed yet.
    pub(super) fn maybe_hand_off(&mut self, index: u32) {
        if !self.handoff.on {
            return;
        }
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        if link.state() != LinkState::Up {
            return;
        }
        let Some(peer) = link.verified.as_ref().map(|v| v.address) else {
            return;
        };
        if let Some(chan) = link.chan.split() {
            tracing::debug!(link = index, "link handed to the data plane");
            self.handoff
                .out
                .push_back(ToPlane::Handoff(Box::new(Lane::new(index, chan, peer))));
        }
    }

    /// Link `link` (handed) is being removed: the plane gives it back.
    pub(super) fn withdraw(&mut self, link: &table::Link) {
        if link.chan.handed() {
            self.handoff
                .withdrawn
                .insert(link.index, link.chan.counters);
            self.handoff.out.push_back(ToPlane::Withdraw(link.index));
        }
    }

    /// Asks the plane to seal `frame` (a control message or a cell) on
    /// handed link `index`.
    pub(super) fn plane_seal(&mut self, index: u32, frame: &[u8]) {
        let frame = reuse(&mut self.spare, frame);
        self.handoff.out.push_back(ToPlane::Seal(index, frame));
    }

    /// Asks the plane to seal `frame`, a cell this node passes on as a
    /// relay, on handed link `index`, within the relay bandwidth cap (the
    /// plane's budget, which it also spends on the cells it passes on
    /// itself).
    pub(super) fn plane_seal_relayed(&mut self, now: Instant, index: u32, frame: &[u8]) {
        let frame = reuse(&mut self.spare, frame);
        self.handoff
            .out
            .push_back(ToPlane::SealRelayed(index, frame, now));
    }

    /// Asks the plane to seal application packet `packet` on handed link
    /// `index`, and to send the packets to its destination there for
    /// [`ROUTE_HOLD`].
    pub(super) fn plane_send(&mut self, now: Instant, index: u32, dst: Ipv6Addr, packet: &[u8]) {
        let packet = reuse(&mut self.spare, packet);
        // Not past the moment the node would decide again.
        let until = match self.direct_until(&dst) {
            Some(t) => t.min(now + ROUTE_HOLD),
            None => now + ROUTE_HOLD,
        };
        let h = &mut self.handoff;
        h.out.push_back(ToPlane::SealApp(index, packet));
        if until > now {
            h.out.push_back(ToPlane::Route(dst, index, until));
            if h.routed.len() >= MAX_ROUTED {
                h.routed.retain(|_, t| *t > now);
            }
            h.routed.insert(dst, until);
        }
    }

    /// Whether the plane routes `dst` now (a packet to it came to the node
    /// all the same because the plane left it: too big, say).
    pub(super) fn plane_routes(&self, now: Instant, dst: &Ipv6Addr) -> bool {
        self.handoff.routed.get(dst).is_some_and(|t| *t > now)
    }

    /// Grants the plane route `r` to a circuit this node built, for
    /// [`ROUTE_HOLD`] (the caller checked [`Node::plane_routes`]).
    pub(super) fn plane_route_circuit(&mut self, now: Instant, r: OutRoute) {
        let h = &mut self.handoff;
        let (dst, until) = (r.dst, now + ROUTE_HOLD);
        h.out.push_back(ToPlane::RouteCircuit(Box::new(r), until));
        if h.routed.len() >= MAX_ROUTED {
            h.routed.retain(|_, t| *t > now);
        }
        h.routed.insert(dst, until);
    }

    /// The last datagram given to [`Node::receive`] or
    /// [`Node::handle_datagram`] is for handed link `index` (a handshake
    /// initiation, or a datagram from another endpoint than the link's)
    /// and passed the gate: the caller has the plane open it
    /// ([`DataPlane::admit`]), after passing on the node's messages.
    pub(super) fn plane_admit(&mut self, index: u32) {
        self.handoff.admitted = Some(index);
    }

    /// The handed link the last datagram is for, once it passed the gate
    /// (see [`DataPlane::admit`]); asked once after each datagram.
    pub fn take_admitted(&mut self) -> Option<u32> {
        self.handoff.admitted.take()
    }

    /// Packets to `addr` go through the node again (a circuit took it
    /// over).
    pub(super) fn unroute(&mut self, addr: Ipv6Addr) {
        self.handoff.unroute(addr);
    }

    /// Routes overlay address `addr` over link `index`; if that moves it
    /// from another link, the plane asks the node again.
    pub(super) fn name_addr(&mut self, addr: Ipv6Addr, index: u32) {
        if self.links.index_of_addr(&addr) != Some(index) {
            self.unroute(addr);
        }
        self.links.name_addr(addr, index);
    }

    /// Sets the default route policy (tests: the daemon reads it once), and
    /// has the plane ask the node again for every address.
    #[cfg(test)]
    pub(super) fn set_default_policy(&mut self, policy: crate::proto::route::Policy) {
        self.config.routes.default = policy;
        let routed: Vec<Ipv6Addr> = self.handoff.routed.keys().copied().collect();
        for addr in routed {
            self.unroute(addr);
        }
    }

    /// Tells the plane something, if the node uses one.
    pub(super) fn plane_tell(&mut self, msg: ToPlane) {
        self.handoff.tell(msg);
    }

    /// Takes in a message from the data plane. Returns a packet for the
    /// TUN, if the message brought one (a circuit's DATA for this node).
    /// (Buffers cross both ways: the node keeps those the plane's messages
    /// bring, for the messages it sends.)
    pub fn handle_plane(&mut self, msg: FromPlane) -> Option<&[u8]> {
        match msg {
            FromPlane::Returned(lane) => self.returned(*lane),
            FromPlane::Inner { index, at, packet } => {
                let mut buf = packet;
                let n = buf.len();
                // The plane sends only control frames (hellos, DHT, cells);
                // a cell's DATA for this node comes back rebuilt.
                let inner = self.handle_inner(at, index, &mut buf, n);
                self.recycle(buf);
                if let Some(Inner::Rebuilt(n)) = inner {
                    return Some(&self.bufs.b[..n]);
                }
            }
            FromPlane::Expired(index) => {
                if let Some(link) = self.links.get_mut(&index) {
                    if !link.expired {
                        tracing::info!(link = index, node = ?link.node_id(), "link session expired");
                    }
                    link.expired = true;
                    link.session_up = false;
                }
            }
            FromPlane::Moved(index, to) => {
                if let Some(link) = self.links.get_mut(&index) {
                    tracing::info!(link = index, old = ?link.chan.endpoint, new = %to, "neighbour moved to a new endpoint");
                    link.chan.endpoint = Some(to);
                    link.chan.mtu = self.config.mtu;
                }
            }
            FromPlane::Activity(a) => self.activity(&a),
            // Neither asks for anything that sends, or needs the time.
            FromPlane::Relayed(r) => self.cells_from_plane(self.last_timer, *r),
            FromPlane::Unrelayed(h) => self.hop_not_in_plane(self.last_timer, h),
            FromPlane::Opened(cell) => {
                let OpenedCell {
                    at,
                    circuit,
                    hop,
                    cmd,
                    data,
                } = *cell;
                let n = self.opened_from_plane(at, circuit, hop, cmd, &data);
                self.recycle(data);
                if let Some(n) = n {
                    return Some(&self.bufs.b[..n]);
                }
            }
            FromPlane::Unrouted(addr, until) => {
                // Unless the node granted another route since.
                if self.handoff.routed.get(&addr) == Some(&until) {
                    self.handoff.routed.remove(&addr);
                }
            }
            FromPlane::Heard(index, at) => {
                if let Some(link) = self.links.get_mut(&index) {
                    link.chan.last_app_rx = link.chan.last_app_rx.max(Some(at));
                    link.chan.last_used = link.chan.last_used.max(at);
                }
            }
        }
        None
    }

    fn returned(&mut self, lane: Lane) {
        if let Some(before) = self.handoff.withdrawn.remove(&lane.index) {
            // Removed meanwhile: what it counted since its last report
            // joins the removed links' totals.
            let mut since = lane.chan.counters;
            since.sub(&before);
            self.links.settle(&since, &lane.drops);
            return;
        }
        if let Some(link) = self.links.get_mut(&lane.index) {
            link.chan.rejoin(lane.chan);
            link.drops.add(&lane.drops);
        }
    }

    fn activity(&mut self, a: &Activity) {
        let Some(link) = self.links.get_mut(&a.index) else {
            return;
        };
        if !link.chan.handed() {
            return;
        }
        link.chan.update(
            a.counters,
            a.last_rx,
            a.last_used,
            a.last_app_rx,
            a.handshake_age,
        );
        link.drops.add(&a.drops);
        // A session the plane made again after one expired.
        if a.handshake_age.is_some() && !link.session_up {
            link.session_up = true;
            link.expired = false;
            link.reconnect_attempts = 0;
            tracing::info!(link = a.index, node = ?link.node_id(), "link session established");
        }
    }
}
