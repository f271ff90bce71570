//! Circuit cells on links, the node's side: circuit IDs, sending cells
//! (plain, wrapped for a hop, or a hop's own), the relay bandwidth cap, and
//! the entry for cells arriving on a link, which hands them to the source's
//! side ([`super::source`]) or the relay's ([`super::relay`]) and carries
//! out what the relay's side asks for ([`Node::hop_actions`]). Also what
//! happens to circuits when a link goes away.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Instant;

use super::relay::{Created, Handed, Hop, HopAction};
use super::{count, wrap_into, CircRef, Stage, CIRCUIT_MTU};
use crate::proto::dht::{Contact, Goal};
use crate::proto::identity::NodeId;
use crate::proto::node::plane::{CellReport, CircuitRef};
use crate::proto::node::table::LinkTable;
use crate::proto::node::{Node, Purpose, Routed, Sealed, MAX_PENDING_CTL, MSG_CELL};
use crate::proto::onion::{self, parse_cell, CellKind, Cmd};
use crate::proto::wire::{self, Ipv6View};

/// What the relay's side needs to know of the node, for one call (see
/// [`super::relay::HopEnv`]): built from the node's fields, so that the
/// call may borrow the circuits mutably beside it.
macro_rules! hop_env {
    ($node:ident, $now:expr) => {
        $crate::proto::node::circuits::relay::HopEnv {
            now: $now,
            id: $node.own.record().node_id(),
            address: $node.address,
            relay: $node.config.relay.enabled,
            has_tun: $node.config.has_tun,
            always_large: $node.config.traffic.always_large,
            plane: $node
                .handoff
                .is_on()
                .then_some(&$node.links as &dyn $crate::proto::node::circuits::relay::Handed),
        }
    };
}
pub(super) use hop_env;

impl Handed for LinkTable {
    fn handed(&self, link: u32) -> bool {
        self.get(&link).is_some_and(|l| l.chan.handed())
    }
}

/// Whose a cell sent on a link is ([`Node::send_in_place`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Carry {
    /// This node's own (built here, or a hop's answer).
    Own,
    /// One it passes on as a relay, within the relay bandwidth cap.
    Relayed,
}

impl Node {
    pub(super) fn neighbour(&self, link: u32) -> Option<NodeId> {
        self.links
            .get(&link)
            .and_then(|l| l.verified.as_ref())
            .map(|v| v.record.node_id())
    }

    /// A free circuit ID on a link. The side whose node ID is lower sets
    /// the top bit, so the two sides never pick the same one.
    pub(super) fn alloc_circ(&mut self, link: u32) -> u32 {
        self.circ.alloc_circ(link, self.high_side(link))
    }

    /// Whether this node's side of `link` sets the top bit of circuit IDs.
    fn high_side(&self, link: u32) -> bool {
        let theirs = self.links.get(&link).and_then(|l| l.node_id());
        theirs.is_some_and(|id| self.node_id() < id)
    }

    /// Sends `self.bufs.cell[..len]` on `link` (queued until the link's
    /// neighbour is verified). True when a datagram went into the send
    /// batch.
    pub(in crate::proto::node) fn send_cell(
        &mut self,
        now: Instant,
        link: u32,
        len: usize,
    ) -> bool {
        let mut frame = std::mem::take(&mut self.bufs.ctl);
        frame.clear();
        frame.resize(wire::CONTROL_BODY + len, 0);
        frame[wire::CONTROL_BODY..].copy_from_slice(&self.bufs.cell[..len]);
        let sent = self.send_in_place(now, link, &mut frame, Carry::Own);
        self.bufs.ctl = frame;
        sent
    }

    /// Sends the cell in `packet[CONTROL_BODY..]` on `link`: writes the
    /// frame's headers around it and seals the packet straight into the
    /// send batch (queued until the link's neighbour is verified). A relayed
    /// cell leaves this way from the buffer it was decrypted into. True
    /// when a datagram went into the batch.
    pub(super) fn send_in_place(
        &mut self,
        now: Instant,
        link: u32,
        packet: &mut [u8],
        carry: Carry,
    ) -> bool {
        let Some(l) = self.links.get_mut(&link) else {
            self.circ.stats.drops.send_failed += 1;
            return false;
        };
        l.chan.last_used = now;
        let Some(v) = &l.verified else {
            if l.pending_ctl.len() >= MAX_PENDING_CTL {
                l.pending_ctl.pop_front();
            }
            let cell = packet[wire::CONTROL_BODY..].to_vec();
            l.pending_ctl.push_back((MSG_CELL, cell));
            return false;
        };
        let (dst, Some(_)) = (v.address, l.chan.endpoint) else {
            self.circ.stats.drops.send_failed += 1;
            return false;
        };
        wire::write_control_header(packet, self.address, dst, MSG_CELL);
        if l.chan.handed() {
            match carry {
                Carry::Own => self.plane_seal(link, packet),
                Carry::Relayed => self.plane_seal_relayed(now, link, packet),
            }
            return true;
        }
        match l.chan.seal(&mut self.out, packet) {
            Sealed::Queued => true,
            Sealed::Held => false,
            Sealed::Failed => {
                self.circ.stats.drops.send_failed += 1;
                false
            }
        }
    }

    /// Passes a relayed cell (in `packet[CONTROL_BODY..]`, its header
    /// written) on to `link`, within the relay bandwidth cap. On a handed
    /// link the plane's budget applies, the one for everything this relay
    /// passes on there, and the plane counts the cell; else the node's.
    pub(super) fn pass_on(&mut self, now: Instant, link: u32, packet: &mut [u8]) {
        let size = packet.len() - wire::CONTROL_BODY;
        if !self.handed(link) {
            if !self.bandwidth_ok(now, size) {
                self.circ.stats.drops.over_bandwidth += 1;
                return;
            }
            self.circ.stats.cells_forwarded += 1;
            self.circ.stats.bytes_forwarded += size as u64;
        }
        self.send_in_place(now, link, packet, Carry::Relayed);
    }

    /// A link-level cell with a plain body (CREATE, CREATED, DESTROY).
    pub(super) fn send_plain(
        &mut self,
        now: Instant,
        link: u32,
        circ: u32,
        kind: CellKind,
        body: &[u8],
    ) {
        self.circ.send_plain(link, circ, kind, body);
        self.hop_actions(now);
    }

    /// Builds a forward cell for hop `target` of out-circuit `id` in
    /// `self.bufs.cell`; returns (first link, length).
    fn wrap_out(
        &mut self,
        id: u64,
        target: usize,
        command: Cmd,
        data: &[u8],
    ) -> Option<(u32, usize)> {
        let c = self.circ.out.get_mut(id)?;
        let large = self.config.traffic.always_large;
        wrap_into(c, target, command, data, &mut self.bufs.cell, large)
    }

    pub(super) fn send_out(
        &mut self,
        now: Instant,
        id: u64,
        target: usize,
        command: Cmd,
        data: &[u8],
    ) {
        if let Some((link, len)) = self.wrap_out(id, target, command, data) {
            self.send_cell(now, link, len);
        }
    }

    /// Whether the relay bandwidth cap lets `bytes` more through.
    pub(super) fn bandwidth_ok(&mut self, now: Instant, bytes: usize) -> bool {
        self.circ
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.take(now, bytes))
    }

    /// Handles a cell from a link: `packet` is the control frame of type
    /// `MSG_CELL` it came in, the cell in `packet[CONTROL_BODY..]`. A cell
    /// passed on is peeled or wrapped there and sent from there. Returns a
    /// packet for the TUN (in `bufs.b`) when it was DATA for us.
    pub(in crate::proto::node) fn handle_cell(
        &mut self,
        now: Instant,
        link: u32,
        packet: &mut [u8],
    ) -> Option<usize> {
        let c = wire::CONTROL_BODY;
        let hdr = match parse_cell(&packet[c..]) {
            Ok(h) => h,
            Err(e) => {
                count(&mut self.circ.stats.drops, e);
                return None;
            }
        };
        self.neighbour(link)?;
        let key = (link, hdr.circ);
        let hop = match hdr.kind {
            CellKind::Create => {
                self.on_create(now, link, hdr.circ, &packet[c..]);
                Hop::Done
            }
            CellKind::Destroy => {
                self.on_destroy(now, key);
                Hop::Done
            }
            CellKind::Created => {
                let body = &packet[c + onion::CELL_HEADER..];
                match self.circ.circ_ref(key) {
                    Some(CircRef::Out(id)) => self.out_created(now, id, body),
                    Some(CircRef::Next(h)) => {
                        let env = hop_env!(self, now);
                        self.circ.hop_created(&env, h, body);
                    }
                    _ => self.circ.stats.drops.unknown_circuit += 1,
                }
                Hop::Done
            }
            _ => {
                let Some(r) = self.circ.circ_ref(key) else {
                    self.circ.stats.drops.unknown_circuit += 1;
                    return None;
                };
                let env = hop_env!(self, now);
                match r {
                    CircRef::Prev(h) => {
                        let out = &mut self.bufs.b;
                        self.circ.hop_forward(&env, h, hdr.nonce, packet, out)
                    }
                    CircRef::Next(h) => self.circ.hop_backward(&env, h, hdr.nonce, packet),
                    CircRef::Out(id) => {
                        let size = packet.len() - c;
                        self.bufs.cell[..size].copy_from_slice(&packet[c..]);
                        return self.out_cell(now, id, hdr.nonce, size);
                    }
                }
            }
        };
        // A cell passed on leaves before what the relay's side asked for
        // meanwhile (handing its circuit to the plane, say). DATA for us
        // stays in bufs.b: the relay's side asks only for routes and plane
        // messages as it delivers, and those use no buffer of the node's.
        if let Hop::Pass(next) = hop {
            self.pass_on(now, next, packet);
        }
        self.hop_actions(now);
        match hop {
            Hop::Deliver(n) => Some(n),
            _ => None,
        }
    }

    /// A CREATE (the cell in `cell`) from `link`: the relay's side serves
    /// it, if the access lists let the neighbour relay through here.
    fn on_create(&mut self, now: Instant, link: u32, circ: u32, cell: &[u8]) {
        let admitted = self.config.access.relay.is_open() || {
            // Only a verified neighbour can be checked against the lists.
            let who = self.links.get(&link).and_then(|l| {
                let v = l.verified.as_ref()?;
                Some((l.chan.endpoint.map(|e| e.ip()), v.record.node_id()))
            });
            who.is_some_and(|(ip, id)| self.config.access.relay.admits(ip, &id))
        };
        let env = hop_env!(self, now);
        let body = &cell[onion::CELL_HEADER..];
        if self.circ.on_create(&env, link, circ, body, admitted) == Created::Denied {
            self.drops.access_denied += 1;
            tracing::debug!(
                link,
                "circuit refused: neighbour not allowed to relay through here"
            );
        }
    }

    fn on_destroy(&mut self, now: Instant, key: (u32, u32)) {
        match self.circ.circ_ref(key) {
            Some(CircRef::Prev(h)) => self.drop_hop(now, h, false, true),
            Some(CircRef::Next(h)) => self.drop_hop(now, h, true, false),
            Some(CircRef::Out(id)) => {
                // While building, the relay being reached refused (full,
                // not allowed, bad handshake) and the relays before passed
                // its DESTROY on: it is to blame, as for a timeout.
                let bad = self.circ.out.get(id).and_then(|c| match c.stage {
                    Stage::Extending => c.next_relay(),
                    _ => None,
                });
                self.out_failed(now, id, bad, "destroyed by a hop")
            }
            None => {}
        }
    }

    /// Removes hop circuit `h`, telling the side it did not hear it from.
    pub(super) fn drop_hop(&mut self, now: Instant, h: u64, tell_prev: bool, tell_next: bool) {
        self.circ.drop_hop(h, tell_prev, tell_next);
        self.hop_actions(now);
    }

    /// Carries out what the relay's side asked for (see
    /// [`super::relay::HopAction`]), and what it asks for meanwhile.
    pub(in crate::proto::node) fn hop_actions(&mut self, now: Instant) {
        while let Some(action) = self.circ.poll_hop() {
            match action {
                HopAction::Send { link, mut frame } => {
                    self.send_in_place(now, link, &mut frame, Carry::Own);
                    self.circ.reuse(frame);
                }
                HopAction::Connect { h, to } => {
                    let link = self
                        .connect_to(now, to.node, to.link_key, to.endpoint)
                        .map(|l| (l, self.high_side(l)));
                    let env = hop_env!(self, now);
                    self.circ.extend_on(&env, h, link, &to.create);
                }
                HopAction::Lookup { h, addr } => self.hop_lookup(now, h, addr),
                HopAction::CheckAuth {
                    h,
                    record,
                    signature,
                } => {
                    let rec = self.dht.records().verified_record(&record).ok();
                    let env = hop_env!(self, now);
                    self.circ.auth_checked(&env, h, rec, &signature);
                }
                HopAction::Unroute(addr) => self.unroute(addr),
                HopAction::Plane(msg) => self.plane_tell(msg),
            }
        }
    }

    /// A LOOKUP on hop circuit `h`: the record from what this node holds,
    /// or from a DHT lookup.
    fn hop_lookup(&mut self, now: Instant, h: u64, addr: Ipv6Addr) {
        if let Some(rec) = self.local_record(&addr) {
            let env = hop_env!(self, now);
            return self.circ.lookup_done(&env, h, &rec);
        }
        let goal = Goal::Node {
            prefix: addr.octets()[1..16].to_vec(),
            min_seq: 0,
            reachable: true,
        };
        match self.dht.lookup(now, goal) {
            Some(id) => {
                self.purposes.insert(id, Purpose::Circuit(h, addr));
                self.pump_dht(now);
            }
            None => {
                let env = hop_env!(self, now);
                self.circ.lookup_done(&env, h, &[]);
            }
        }
    }

    /// A DHT lookup a circuit asked for has finished.
    pub(in crate::proto::node) fn circuit_lookup_done(
        &mut self,
        now: Instant,
        h: u64,
        addr: Ipv6Addr,
        found: Option<Contact>,
    ) {
        let rec = found
            .filter(|c| c.info.id.overlay_address() == addr)
            .map(|c| c.record.to_vec())
            .unwrap_or_default();
        let env = hop_env!(self, now);
        self.circ.lookup_done(&env, h, &rec);
        self.hop_actions(now);
    }

    /// A record for an address we already hold: a neighbour's, the DHT's
    /// table, or one a circuit looked up.
    pub(in crate::proto::node) fn local_record(&self, addr: &Ipv6Addr) -> Option<Vec<u8>> {
        if let Some(v) = self.links.for_addr(addr).and_then(|l| l.verified.as_ref()) {
            return Some(v.record_bytes.clone());
        }
        let c = self.dht.find_local(&addr.octets()[1..16])?;
        (c.info.id.overlay_address() == *addr).then(|| c.record.to_vec())
    }

    /// If a circuit from `dst` brought traffic lately, the packet goes back
    /// on it. Returns None when there is no such circuit.
    pub(in crate::proto::node) fn inbound_route(
        &self,
        now: Instant,
        dst: &Ipv6Addr,
    ) -> Option<u64> {
        self.circ.inbound_route(now, dst)
    }

    /// Sends a packet back on inbound circuit `h` (see [`Node::inbound_route`]).
    pub(in crate::proto::node) fn inbound_send(
        &mut self,
        now: Instant,
        view: Ipv6View<'_>,
        h: u64,
    ) -> Routed {
        if view.bytes().len() > CIRCUIT_MTU {
            return self.too_big_for_circuit(now, view);
        }
        let large = self.config.traffic.always_large;
        let lz4 = self.circuit_compress().then_some(&mut self.bufs.lz4);
        let (scratch, cell) = (&mut self.bufs.b, &mut self.bufs.cell);
        let Some((link, size)) = self.circ.reply_cell(h, view, lz4, large, scratch, cell) else {
            return Routed::Nothing;
        };
        if !self.send_cell(now, link, size) {
            return Routed::Nothing;
        }
        let dst = view.dst();
        if !self.plane_routes(now, &dst) {
            let compress = self.config.traffic.compress && self.config.compression.enabled;
            let env = hop_env!(self, now);
            if let Some(r) = self.circ.back_route(&env, h, dst, compress) {
                self.plane_route_circuit(now, r);
            }
        }
        Routed::Queued
    }

    /// A packet larger than a circuit carries: counted, and an ICMPv6
    /// Packet Too Big answers it.
    pub(super) fn too_big_for_circuit(&mut self, now: Instant, view: Ipv6View<'_>) -> Routed {
        self.drops.too_big += 1;
        let mtu = CIRCUIT_MTU.max(wire::IPV6_MIN_MTU) as u32;
        self.icmp_reply(now, view, wire::ICMPV6_PACKET_TOO_BIG, 0, mtu)
    }

    /// A link to a node named by ID, link key and endpoint (an EXTEND).
    pub(super) fn connect_to(
        &mut self,
        now: Instant,
        id: NodeId,
        key: [u8; 32],
        ep: SocketAddr,
    ) -> Option<u32> {
        if let Some(i) = self.links.index_of_addr(&id.overlay_address()) {
            return Some(i);
        }
        if let Some(l) = self.links.for_key(&key) {
            if l.node_id().is_some_and(|x| x != id) {
                return None;
            }
        }
        let idx = self.add_link(key, Some(ep), Some(id), now)?;
        self.name_addr(id.overlay_address(), idx);
        self.send_hello(idx, now);
        Some(idx)
    }

    /// A link went away: every circuit using it ends, and the other side
    /// of each is told.
    pub(in crate::proto::node) fn circuits_link_gone(&mut self, now: Instant, link: u32) {
        for (key, r) in self.circ.on_link_of(link) {
            self.circ.forget(key);
            match r {
                CircRef::Prev(h) => self.drop_hop(now, h, false, true),
                CircRef::Next(h) => self.drop_hop(now, h, true, false),
                CircRef::Out(id) => {
                    let bad = self
                        .circ
                        .out
                        .get(id)
                        .and_then(|c| c.relays.first().map(|p| p.id));
                    self.out_failed(now, id, bad, "link to the first hop is gone")
                }
            }
        }
        self.circ.hops.link_gone(link);
    }

    /// A cell frame of a size no cell has.
    pub(in crate::proto::node) fn circ_bad_size(&mut self) {
        self.circ.stats.drops.bad_size += 1;
    }

    /// A command for this node that the data plane opened on a circuit
    /// (`hop`: which hop of a circuit this node built spoke), with its
    /// data. Returns a packet for the TUN (in `bufs.b`), if it brought one.
    pub(in crate::proto::node) fn opened_from_plane(
        &mut self,
        at: Instant,
        circuit: CircuitRef,
        hop: usize,
        cmd: Cmd,
        data: &[u8],
    ) -> Option<usize> {
        match circuit {
            CircuitRef::Carried(h) => {
                let env = hop_env!(self, at);
                let out = &mut self.bufs.b;
                let done = self.circ.hop_opened(&env, h, at, cmd, data, out);
                self.hop_actions(at);
                match done {
                    Hop::Deliver(n) => Some(n),
                    _ => None,
                }
            }
            CircuitRef::Built(id) => {
                let (start, end) = (onion::CELL_HEADER, onion::CELL_HEADER + data.len());
                self.bufs.cell.get_mut(start..end)?.copy_from_slice(data);
                let hop_of = self.circ.out.get_mut(id)?.hops.get_mut(hop)?;
                hop_of.last_reply = hop_of.last_reply.max(at);
                self.out_command(at, id, hop, cmd, start, end)
            }
        }
    }

    /// Takes in what the data plane did with circuits' cells.
    pub(in crate::proto::node) fn cells_from_plane(&mut self, now: Instant, r: CellReport) {
        self.circ.plane_report(r);
        self.hop_actions(now);
    }

    /// The data plane could not take relayed circuit `h`.
    pub(in crate::proto::node) fn hop_not_in_plane(&mut self, now: Instant, h: u64) {
        self.circ.hop_not_in_plane(h);
        self.hop_actions(now);
    }

    /// Test hook: whether relays record the cells they forward.
    #[cfg(feature = "test-hooks")]
    pub(in crate::proto::node) fn cell_log_on(&self) -> bool {
        self.circ.cell_log_on
    }

    /// Test hook: relays record the cells they forward from now on (for
    /// [`Node::take_cell_log`]).
    #[cfg(feature = "test-hooks")]
    pub fn enable_cell_log(&mut self) {
        self.circ.cell_log_on = true;
    }

    /// Test hook: the cells forwarded since the last call.
    #[cfg(feature = "test-hooks")]
    pub fn take_cell_log(&mut self) -> Vec<(bool, Vec<u8>, Vec<u8>)> {
        std::mem::take(&mut self.circ.cell_log)
    }
}
