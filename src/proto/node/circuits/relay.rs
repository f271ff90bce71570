//! The relay's side of circuits, and the destination's (the last hop):
//! CREATE under the relay limits, forward cells, EXTEND, LOOKUP for a
//! source, AUTH and DATA at the destination, and replies sent back on
//! inbound circuits.

use std::net::Ipv6Addr;
use std::time::Instant;

use super::hops::{Admit, Peeled};
use super::{count, CircRef, HopCirc, CIRCUIT_MTU};
use crate::proto::dht::{Contact, Goal};
use crate::proto::identity::verify_signature;
use crate::proto::node::plane::{CellReport, CircuitRef, OutRoute, Relay, ToPlane};
use crate::proto::node::{Node, Purpose, Routed};
use crate::proto::onion::body::{self, Extend, ExtendRefusal, Lookup};
use crate::proto::onion::{
    self, auth_message, server_handshake, CellKind, Cmd, OnionKey, CELL_HEADER, CELL_LARGE,
    CREATE_LEN, MAX_DATA,
};
use crate::proto::wire::{self, Incoming, Ipv6View};

impl Node {
    pub(super) fn on_create(&mut self, now: Instant, link: u32, circ: u32, body: &[u8]) {
        if self.circ.on_link.contains_key(&(link, circ)) {
            self.circ.stats.drops.bad_kind += 1;
            return;
        }
        if !self.config.access.relay.is_open() {
            // Only a verified neighbour can be checked against the lists.
            let who = self.links.get(&link).and_then(|l| {
                let v = l.verified.as_ref()?;
                Some((l.chan.endpoint.map(|e| e.ip()), v.record.node_id()))
            });
            let admitted = who.is_some_and(|(ip, id)| self.config.access.relay.admits(ip, &id));
            if !admitted {
                self.circ.stats.refused += 1;
                self.drops.access_denied += 1;
                tracing::debug!(
                    link,
                    "circuit refused: neighbour not allowed to relay through here"
                );
                self.send_plain(now, link, circ, CellKind::Destroy, &[3]);
                return;
            }
        }
        match self.circ.hops.admit(now, link) {
            Admit::Yes => {}
            Admit::Limited => {
                self.circ.stats.drops.create_limited += 1;
                return;
            }
            Admit::Full => {
                self.circ.stats.refused += 1;
                tracing::debug!(link, "circuit refused: relay at its limit");
                self.send_plain(now, link, circ, CellKind::Destroy, &[1]);
                return;
            }
        }
        let id = self.node_id();
        let keys: Vec<&OnionKey> = std::iter::once(&self.circ.onion)
            .chain(self.circ.prev_onion.as_ref())
            .collect();
        let res = server_handshake(&mut self.rng, &id, &keys, &body[..CREATE_LEN]);
        let (created, keys) = match res {
            Ok(x) => x,
            Err(e) => {
                self.circ.stats.refused += 1;
                tracing::debug!(link, "circuit refused: {e}");
                self.send_plain(now, link, circ, CellKind::Destroy, &[2]);
                return;
            }
        };
        let h = self.circ.next_id;
        self.circ.next_id += 1;
        self.circ
            .hops
            .insert(h, HopCirc::new(now, (link, circ), keys));
        self.circ.on_link.insert((link, circ), CircRef::Prev(h));
        self.circ.stats.circuits_total += 1;
        self.send_plain(now, link, circ, CellKind::Created, &created);
    }

    /// Removes hop circuit `h`, telling the side it did not hear it from.
    pub(super) fn drop_hop(&mut self, now: Instant, h: u64, tell_prev: bool, tell_next: bool) {
        // Another circuit from the same source (its replacement) carries
        // the replies from now on (see `HopTable::remove`).
        let Some(hc) = self.circ.hops.remove(h) else {
            return;
        };
        // The plane may hold it, or a route back on it (one that ended
        // here and authenticated its source).
        if hc.in_plane || hc.auth().is_some() {
            self.plane_tell(ToPlane::Unrelay(h));
        }
        self.circ.on_link.remove(&hc.prev());
        if tell_prev {
            self.send_plain(now, hc.prev().0, hc.prev().1, CellKind::Destroy, &[0]);
        }
        if let Some(next) = hc.next {
            self.circ.on_link.remove(&next);
            if tell_next {
                self.send_plain(now, next.0, next.1, CellKind::Destroy, &[0]);
            }
        }
    }

    /// A forward cell at a hop, in `packet[CONTROL_BODY..]` (see
    /// [`Node::handle_cell`]): ours, or peel our layer in place and pass
    /// it on from there.
    pub(super) fn hop_forward(
        &mut self,
        now: Instant,
        h: u64,
        mut nonce: [u8; 16],
        packet: &mut [u8],
    ) -> Option<usize> {
        let c = wire::CONTROL_BODY;
        #[cfg(feature = "test-hooks")]
        let cell_in = self.cell_for_log(&packet[c..]);
        let peeled = self
            .circ
            .hops
            .peel(now, h, &mut nonce, &mut packet[c + CELL_HEADER..])?;
        match peeled {
            Err(e) => {
                count(&mut self.circ.stats.drops, e);
                None
            }
            Ok(Peeled::Unrecognised) => {
                self.circ.stats.drops.unrecognised += 1;
                None
            }
            Ok(Peeled::Pass((link, circ))) => {
                onion::write_header(&mut packet[c..], circ, CellKind::Relay, &nonce);
                #[cfg(feature = "test-hooks")]
                self.log_cell(true, cell_in, &packet[c..]);
                self.pass_on(now, link, packet);
                self.maybe_hand_hop(h);
                None
            }
            Ok(Peeled::Mine(command, range)) => {
                // The cell ends here: its data goes where commands read it.
                let start = CELL_HEADER + range.start;
                let end = CELL_HEADER + range.end;
                self.bufs.cell[start..end].copy_from_slice(&packet[c + start..c + end]);
                self.hop_command(now, h, command, start, end)
            }
        }
    }

    /// A command addressed to this node as a hop; the data is in
    /// `self.bufs.cell[start..end]`.
    fn hop_command(
        &mut self,
        now: Instant,
        h: u64,
        command: Cmd,
        start: usize,
        end: usize,
    ) -> Option<usize> {
        tracing::trace!(circuit = h, command = command.name(), "cell for us");
        match command {
            Cmd::Data => return self.hop_data(now, h, start, end),
            Cmd::Probe => {
                let data = self.bufs.cell[start..end].to_vec();
                self.originate(now, h, Cmd::ProbeReply, &data);
            }
            Cmd::Noise => self.circ.stats.drops.noise += 1,
            Cmd::Extend => match Extend::parse(&self.bufs.cell[start..end]) {
                Ok(x) => self.hop_extend(now, h, x),
                Err(_) => self.circ.stats.drops.malformed += 1,
            },
            Cmd::Auth => {
                let data = self.bufs.cell[start..end].to_vec();
                self.hop_auth(now, h, &data);
            }
            Cmd::Lookup => match Lookup::parse(&self.bufs.cell[start..end]) {
                Ok(l) => self.hop_lookup(now, h, l.address),
                Err(_) => self.circ.stats.drops.malformed += 1,
            },
            _ => self.circ.stats.drops.bad_kind += 1,
        }
        None
    }

    fn hop_data(&mut self, now: Instant, h: u64, start: usize, end: usize) -> Option<usize> {
        let hc = self.circ.hops.get_mut(h)?;
        let Some(src) = hc.auth() else {
            self.circ.stats.drops.unauthenticated += 1;
            return None;
        };
        let Ok(view) = Ipv6View::new_checked(&self.bufs.cell[start..end]) else {
            self.circ.stats.drops.malformed += 1;
            return None;
        };
        // The packet's source must be the node that authenticated this
        // circuit; anything else is someone speaking in another's name.
        if view.src() != src || view.dst() != self.address {
            self.circ.stats.drops.spoofed_source += 1;
            return None;
        }
        let (p, _) = match wire::decode(view, &mut self.bufs.b) {
            Ok((Incoming::App(p), c)) => (p.len(), c),
            _ => {
                self.circ.stats.drops.malformed += 1;
                return None;
            }
        };
        hc.rx_bytes += p as u64;
        hc.last_data = hc.last_data.max(Some(now));
        // Replies go back on the circuit that last brought traffic.
        self.circ.hops.carries_replies(h, src);
        self.handoff.unroute(src);
        // decode() returned either the cell's bytes (as is) or a rebuilt
        // packet in bufs.b: put the result in bufs.b either way.
        if !matches!(view.next_header(), wire::NH_QGATE) {
            self.bufs.b[..p].copy_from_slice(&self.bufs.cell[start..start + p]);
        }
        // The circuit's next cells are the plane's, if it holds the link.
        self.maybe_hand_hop(h);
        Some(p)
    }

    fn hop_extend(&mut self, now: Instant, h: u64, x: Extend) {
        let fail = |node: &mut Node, why: ExtendRefusal| {
            node.circ.stats.refused += 1;
            node.originate(now, h, Cmd::ExtendFailed, &[why as u8]);
        };
        if !self.config.relay.enabled {
            return fail(self, ExtendRefusal::NotRelay);
        }
        let Some(hc) = self.circ.hops.get(h) else {
            return;
        };
        if hc.next.is_some() || hc.auth().is_some() {
            return fail(self, ExtendRefusal::AlreadyExtended);
        }
        if x.node == self.node_id() {
            return fail(self, ExtendRefusal::BadTarget);
        }
        let Extend {
            node: id,
            link_key,
            endpoint: ep,
            create,
        } = x;
        let Some(link) = self.connect_to(now, id, link_key, ep) else {
            return fail(self, ExtendRefusal::NoLink);
        };
        if self.circ.hops.get(h).map(|hc| hc.prev().0) == Some(link) {
            return fail(self, ExtendRefusal::BadTarget);
        }
        let circ = self.alloc_circ(link);
        self.circ.on_link.insert((link, circ), CircRef::Next(h));
        if let Some(hc) = self.circ.hops.get_mut(h) {
            hc.next = Some((link, circ));
            hc.extending = Some(now);
        }
        self.send_plain(now, link, circ, CellKind::Create, &create);
    }

    fn hop_auth(&mut self, now: Instant, h: u64, data: &[u8]) {
        let refuse = |node: &mut Node| node.originate(now, h, Cmd::Refused, &[]);
        if !self.config.has_tun {
            return refuse(self);
        }
        // One AUTH per circuit, before any RSA work (a lost READY fails
        // the source's build step; a refusal closes its circuit). Only at
        // the circuit's end: a hop that extended it passes DATA on, and
        // an authenticated source would have it deliver some too.
        if !self.circ.hops.first_auth(h) {
            self.circ.stats.drops.bad_kind += 1;
            return;
        }
        if self.circ.hops.get(h).is_some_and(|hc| hc.next.is_some()) {
            return refuse(self);
        }
        let Ok(body::Auth {
            record,
            signature: sig,
        }) = body::Auth::parse(data)
        else {
            return refuse(self);
        };
        let Ok(rec) = self.dht.records().verified_record(record) else {
            return refuse(self);
        };
        let Some(hc) = self.circ.hops.get(h) else {
            return;
        };
        let msg = auth_message(&self.node_id(), &hc.keys.bind);
        if verify_signature(&rec.public_der, &msg, sig).ok() != Some(rec.node_id())
            || rec.node_id() == self.node_id()
        {
            self.circ.stats.drops.forged += 1;
            return refuse(self);
        }
        let src = rec.overlay_address();
        self.circ.hops.carries_replies(h, src);
        self.unroute(src);
        tracing::debug!(circuit = h, source = %src, "inbound circuit authenticated");
        self.originate(now, h, Cmd::Ready, &[]);
    }

    fn hop_lookup(&mut self, now: Instant, h: u64, addr: Ipv6Addr) {
        if !self.config.relay.enabled {
            self.originate(now, h, Cmd::LookupReply, &[]);
            return;
        }
        // Known already (a link, or the routing table)?
        if let Some(rec) = self.local_record(&addr) {
            self.originate(now, h, Cmd::LookupReply, &rec);
            return;
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
            None => self.originate(now, h, Cmd::LookupReply, &[]),
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
        self.originate(now, h, Cmd::LookupReply, &rec);
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
        let own_circuit = self.circ.out.current(dst).is_some();
        self.circ.hops.inbound_route(now, dst, own_circuit)
    }

    /// Sends a packet back on inbound circuit `h` (see [`Node::inbound_route`]).
    pub(in crate::proto::node) fn inbound_send(
        &mut self,
        now: Instant,
        view: Ipv6View<'_>,
        h: u64,
    ) -> Routed {
        if view.bytes().len() > CIRCUIT_MTU {
            self.drops.too_big += 1;
            return self.icmp_reply(
                now,
                view,
                wire::ICMPV6_PACKET_TOO_BIG,
                0,
                CIRCUIT_MTU as u32,
            );
        }
        let (compress, large) = (self.circuit_compress(), self.config.traffic.always_large);
        let Some(hc) = self.circ.hops.get_mut(h) else {
            return Routed::Nothing;
        };
        let table = compress.then_some((&mut hc.adaptive, &mut self.bufs.lz4));
        let (frame, _) = crate::proto::compress::encode(view, table, &mut self.bufs.b);
        if frame.len() > MAX_DATA {
            return Routed::Nothing;
        }
        let size = onion::cell_size_for(frame.len(), large).unwrap_or(CELL_LARGE);
        let ctr = hc.ctr.next();
        hc.tx_bytes += view.bytes().len() as u64;
        let (link, circ) = hc.prev();
        let (head, body) = self.bufs.cell[..size].split_at_mut(CELL_HEADER);
        let n = hc.keys.originate(ctr, Cmd::Data, frame, body);
        onion::write_header(head, circ, CellKind::Relay, &n);
        if !self.send_cell(now, link, size) {
            return Routed::Nothing;
        }
        let dst = view.dst();
        if !self.plane_routes(now, &dst) {
            if let Some(r) = self.back_route(h, dst) {
                self.plane_route_circuit(now, r);
            }
        }
        Routed::Queued
    }

    /// A route for the data plane back on circuit `h`, which ends here and
    /// authenticated `dst` as its source, if the node uses a plane and it
    /// holds the circuit's link: the plane then sends the packets to `dst`
    /// back on it itself for a while.
    fn back_route(&self, h: u64, dst: Ipv6Addr) -> Option<OutRoute> {
        if !self.uses_plane() {
            return None;
        }
        let hc = self.circ.hops.get(h)?;
        let (link, circ) = hc.prev();
        if hc.auth() != Some(dst) || !self.handed(link) {
            return None;
        }
        Some(OutRoute {
            id: CircuitRef::Carried(h),
            dst,
            link,
            circ,
            keys: vec![hc.keys.clone()],
            replays: Vec::new(),
            counter: hc.ctr.clone(),
            compress: self.config.traffic.compress && self.config.compression.enabled,
            always_large: self.config.traffic.always_large,
        })
    }

    /// Hands circuit `h` to the data plane, if the node uses one and the
    /// plane holds its links: a relayed one once it is extended and both
    /// its links are handed (the plane passes its cells on from then on),
    /// one ending here once its source authenticated (the plane delivers
    /// its DATA). Either way the plane opens the cells for this hop (see
    /// [`Relay`]). Asked whenever the node passes one of its cells on
    /// itself, or delivers its DATA, so a circuit goes over with its first
    /// cell after its links did.
    pub(super) fn maybe_hand_hop(&mut self, h: u64) {
        if !self.uses_plane() {
            return;
        }
        let Some(hc) = self.circ.hops.get(h) else {
            return;
        };
        // Only a circuit ending here has a source its DATA may come from.
        let (prev, next) = (hc.prev(), hc.next);
        let src = hc.auth().filter(|_| next.is_none());
        let ready = match next {
            Some(next) => hc.extending.is_none() && self.handed(next.0),
            None => src.is_some(),
        };
        if hc.in_plane || !ready || !self.handed(prev.0) {
            return;
        }
        let (keys, replay) = (hc.keys.clone(), hc.replay.clone());
        if let Some(hc) = self.circ.hops.get_mut(h) {
            hc.in_plane = true;
        }
        tracing::trace!(
            circuit = h,
            ends_here = next.is_none(),
            "circuit handed to the data plane"
        );
        self.plane_tell(ToPlane::Relay(Box::new(Relay {
            h,
            prev,
            next,
            keys,
            replay,
            src,
        })));
    }

    /// The data plane could not take relayed circuit `h` (a link of it was
    /// withdrawn meanwhile): the node passes its cells on, and may hand it
    /// over again.
    pub(in crate::proto::node) fn hop_not_in_plane(&mut self, h: u64) {
        if let Some(hc) = self.circ.hops.get_mut(h) {
            hc.in_plane = false;
            // With several planes, another one may have taken it: it
            // lets go too (and `drop_hop` will not ask, in_plane unset).
            self.plane_tell(ToPlane::Unrelay(h));
        }
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
        let (start, end) = (CELL_HEADER, CELL_HEADER + data.len());
        self.bufs.cell.get_mut(start..end)?.copy_from_slice(data);
        match circuit {
            CircuitRef::Carried(h) => {
                let hc = self.circ.hops.get_mut(h)?;
                hc.last_used = hc.last_used.max(at);
                self.hop_command(at, h, cmd, start, end)
            }
            CircuitRef::Built(id) => {
                let hop_of = self.circ.out.get_mut(id)?.hops.get_mut(hop)?;
                hop_of.last_reply = hop_of.last_reply.max(at);
                self.out_command(at, id, hop, cmd, start, end)
            }
        }
    }

    /// Takes in what the data plane did with circuits' cells: passed on
    /// for relayed circuits, delivered at their ends, sent as DATA on
    /// circuits this node built or back on those it ends.
    pub(in crate::proto::node) fn cells_from_plane(&mut self, r: CellReport) {
        for (h, at, fwd, bwd) in r.circuits {
            if let Some(hc) = self.circ.hops.get_mut(h) {
                hc.last_used = hc.last_used.max(at);
                hc.fwd_bytes += fwd;
                hc.bwd_bytes += bwd;
            }
        }
        for (circuit, at, bytes) in r.sent {
            match circuit {
                CircuitRef::Built(id) => {
                    if let Some(c) = self.circ.out.get_mut(id) {
                        c.last_used = c.last_used.max(at);
                        c.tx_bytes += bytes;
                    }
                }
                // As the node's own replies, they keep nothing alive: a
                // circuit is fresh while it brings traffic.
                CircuitRef::Carried(h) => {
                    if let Some(hc) = self.circ.hops.get_mut(h) {
                        hc.tx_bytes += bytes;
                    }
                }
            }
        }
        // In the order they last delivered: replies go back on the circuit
        // that last brought traffic.
        let mut received = r.received;
        received.sort_by_key(|(_, at, _)| *at);
        for (circuit, at, bytes) in received {
            match circuit {
                CircuitRef::Built(id) => {
                    let Some(c) = self.circ.out.get_mut(id) else {
                        continue;
                    };
                    c.rx_bytes += bytes;
                    if let Some(last) = c.hops.last_mut() {
                        last.last_reply = last.last_reply.max(at);
                    }
                }
                CircuitRef::Carried(h) => {
                    let Some(hc) = self.circ.hops.get_mut(h) else {
                        continue;
                    };
                    hc.rx_bytes += bytes;
                    hc.last_used = hc.last_used.max(at);
                    hc.last_data = hc.last_data.max(Some(at));
                    // Replies go back on the circuit that last brought
                    // traffic. The plane dropped any other route it held
                    // itself; one granted meanwhile goes too. (With several
                    // planes, reports come one plane at a time: a circuit
                    // whose DATA came later than this keeps the replies.)
                    let Some(src) = hc.auth() else { continue };
                    let cur = self.circ.hops.replies_on(&src);
                    let later = cur
                        .filter(|c| *c != h)
                        .and_then(|c| self.circ.hops.get(c))
                        .is_some_and(|c| c.last_data > Some(at));
                    if later {
                        continue;
                    }
                    if cur != Some(h) {
                        self.handoff.unroute(src);
                    }
                    self.circ.hops.carries_replies(h, src);
                }
            }
        }
        self.circ.stats.drops.add(&r.drops);
        let s = &mut self.circ.stats;
        s.cells_forwarded += r.cells;
        s.bytes_forwarded += r.bytes;
        s.drops.over_bandwidth += r.over_bandwidth;
        #[cfg(feature = "test-hooks")]
        for (forward, cell_in, out) in r.log {
            self.log_cell(forward, Some(cell_in), &out);
        }
    }

    /// How many circuits the data plane holds: relayed (it passes their
    /// cells on) or ending here (it opens them).
    pub(in crate::proto::node) fn hops_in_plane(&self) -> usize {
        self.circ.hops.values().filter(|hc| hc.in_plane).count()
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
