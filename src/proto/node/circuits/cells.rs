//! Circuit cells on links: circuit IDs, sending cells (plain, wrapped for a
//! hop, or from a hop back towards the source), the relay bandwidth cap, and
//! the entry for cells arriving on a link, which hands them to the source's
//! side ([`super::source`]) or the relay's ([`super::relay`]). Also what
//! happens to circuits when a link goes away.

use std::net::SocketAddr;
use std::time::Instant;

use rand_core::RngCore;

use super::{count, wrap_into, CircRef, Stage};
use crate::proto::identity::NodeId;
use crate::proto::node::{Node, Sealed, MAX_PENDING_CTL, MSG_CELL};
use crate::proto::onion::{
    self, parse_cell, CellKind, Cmd, CELL_HEADER, CELL_LARGE, CELL_SMALL, CREATED_LEN,
};
use crate::proto::wire;

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
        let high = match self.links.get(&link).and_then(|l| l.node_id()) {
            Some(id) if self.node_id() < id => 0x8000_0000,
            _ => 0,
        };
        loop {
            let c = (self.rng.next_u32() & 0x7fff_ffff) | high;
            if c != 0 && !self.circ.on_link.contains_key(&(link, c)) {
                return c;
            }
        }
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
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let cell = &mut self.bufs.cell[..CELL_SMALL];
        onion::write_header(cell, circ, kind, &nonce);
        cell[CELL_HEADER..CELL_HEADER + body.len()].copy_from_slice(body);
        let rest = CELL_HEADER + body.len();
        self.rng.fill_bytes(&mut self.bufs.cell[rest..CELL_SMALL]);
        self.send_cell(now, link, CELL_SMALL);
    }

    fn cell_size(&self, data: usize) -> usize {
        onion::cell_size_for(data, self.config.traffic.always_large).unwrap_or(CELL_LARGE)
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

    /// Builds a backward cell from hop circuit `h` into `self.bufs.cell`.
    pub(super) fn originate(&mut self, now: Instant, h: u64, command: Cmd, data: &[u8]) {
        let size = self.cell_size(data.len());
        let Some(hc) = self.circ.hops.get_mut(h) else {
            return;
        };
        let ctr = hc.ctr.next();
        let (link, circ) = hc.prev();
        let (head, body) = self.bufs.cell[..size].split_at_mut(CELL_HEADER);
        let n = hc.keys.originate(ctr, command, data, body);
        onion::write_header(head, circ, CellKind::Relay, &n);
        self.send_cell(now, link, size);
    }

    /// Test hook: notes a relayed cell as it arrived and as it left.
    #[cfg(feature = "test-hooks")]
    pub(super) fn log_cell(&mut self, forward: bool, cell_in: Option<Vec<u8>>, out: &[u8]) {
        if let Some(cell_in) = cell_in {
            if self.circ.cell_log.len() < 100_000 {
                self.circ.cell_log.push((forward, cell_in, out.to_vec()));
            }
        }
    }

    /// Test hook: a copy of a cell about to be relayed, when cells are
    /// being logged.
    #[cfg(feature = "test-hooks")]
    pub(super) fn cell_for_log(&self, cell: &[u8]) -> Option<Vec<u8>> {
        self.circ.cell_log_on.then(|| cell.to_vec())
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
        let body = &packet[c + CELL_HEADER..];
        match hdr.kind {
            CellKind::Create => {
                self.on_create(now, link, hdr.circ, body);
                None
            }
            CellKind::Destroy => {
                self.on_destroy(now, key);
                None
            }
            CellKind::Created => {
                match self.circ.on_link.get(&key).copied() {
                    Some(CircRef::Out(id)) => self.out_created(now, id, body),
                    Some(CircRef::Next(h)) => {
                        let ok = self.circ.hops.get_mut(h).is_some_and(|hc| {
                            hc.last_used = now;
                            hc.extending.take().is_some()
                        });
                        if ok {
                            let created = body[..CREATED_LEN].to_vec();
                            self.originate(now, h, Cmd::Extended, &created);
                        } else {
                            self.circ.stats.drops.bad_kind += 1;
                        }
                    }
                    _ => self.circ.stats.drops.unknown_circuit += 1,
                }
                None
            }
            _ => {
                let Some(r) = self.circ.on_link.get(&key).copied() else {
                    self.circ.stats.drops.unknown_circuit += 1;
                    return None;
                };
                let size = packet.len() - c;
                let mut nonce = hdr.nonce;
                match r {
                    CircRef::Prev(h) => self.hop_forward(now, h, nonce, packet),
                    CircRef::Next(h) => {
                        #[cfg(feature = "test-hooks")]
                        let cell_in = self.cell_for_log(&packet[c..]);
                        let (link, circ) = self.circ.hops.wrap_back(
                            now,
                            h,
                            &mut nonce,
                            &mut packet[c + CELL_HEADER..],
                        )?;
                        self.circ.hops.count_backward(h, size);
                        onion::write_header(&mut packet[c..], circ, CellKind::Relay, &nonce);
                        #[cfg(feature = "test-hooks")]
                        self.log_cell(false, cell_in, &packet[c..]);
                        self.pass_on(now, link, packet);
                        self.maybe_hand_hop(h);
                        None
                    }
                    CircRef::Out(id) => {
                        self.bufs.cell[..size].copy_from_slice(&packet[c..]);
                        self.out_cell(now, id, nonce, size)
                    }
                }
            }
        }
    }

    fn on_destroy(&mut self, now: Instant, key: (u32, u32)) {
        match self.circ.on_link.get(&key).copied() {
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
        let on: Vec<((u32, u32), CircRef)> = self
            .circ
            .on_link
            .range((link, 0)..=(link, u32::MAX))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (key, r) in on {
            self.circ.on_link.remove(&key);
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
}
