//! The relay's side of circuits, and the destination's (the last hop):
//! CREATE under the relay limits, forward and backward cells, EXTEND,
//! LOOKUP for a source, AUTH and DATA at the destination, and replies sent
//! back on inbound circuits.
//!
//! A part of [`Circuits`] with a narrow interface, in the manner of
//! quinn-proto's connections: the node hands it a cell, a command the data
//! plane opened, or the outcome of something it asked for, together with
//! what it needs to know of the node for that call ([`HopEnv`]); it
//! changes its own state (the hop circuits, their IDs on links, the
//! counters) and queues what the node is to do as [`HopAction`]s: cells
//! to send, a link to make, a lookup, a record to check, messages for the
//! data plane. The node carries them out ([`Node::hop_actions`]) and
//! answers with [`Circuits::extend_on`], [`Circuits::lookup_done`] or
//! [`Circuits::auth_checked`]. It touches no link, buffer or table of the
//! node's: a cell passed on, or DATA delivered, is the caller's buffer,
//! rewritten in place or decoded into the one it names.
//!
//! [`Node::hop_actions`]: crate::proto::node::Node

use std::net::Ipv6Addr;
use std::time::Instant;

use rand_core::RngCore;

use super::hops::{Admit, Peeled};
use super::{count, CircRef, Circuits, HopCirc};
use crate::proto::identity::{verify_signature, NodeId, NodeRecord};
use crate::proto::node::plane::{CellReport, CircuitRef, OutRoute, Relay, ToPlane};
use crate::proto::onion::body::{self, Extend, ExtendRefusal, Lookup};
use crate::proto::onion::{
    self, auth_message, server_handshake, CellKind, Cmd, OnionKey, CELL_HEADER, CELL_LARGE,
    CELL_SMALL, CREATED_LEN, CREATE_LEN, MAX_DATA,
};
use crate::proto::wire::{self, Incoming, Ipv6View, Lz4Table, CONTROL_BODY};

/// Whether the data plane holds a link (the node's link table answers).
pub(in crate::proto::node) trait Handed {
    fn handed(&self, link: u32) -> bool;
}

/// What the relay's side knows of the node, for one call.
pub(in crate::proto::node) struct HopEnv<'a> {
    pub now: Instant,
    /// This node's ID and overlay address.
    pub id: NodeId,
    pub address: Ipv6Addr,
    /// Whether it relays for others (`relay.enabled`).
    pub relay: bool,
    /// Whether it has a TUN (circuits may end here).
    pub has_tun: bool,
    /// Whether every cell is large (`traffic.always_large`).
    pub always_large: bool,
    /// The node's links, if it uses a data plane: which it has handed over.
    pub plane: Option<&'a dyn Handed>,
}

/// What the relay's side asks the node to do, in order.
pub(in crate::proto::node) enum HopAction {
    /// Send this node's cell (`frame[CONTROL_BODY..]`; the frame's headers
    /// are the node's to write) on `link`, then give the frame back
    /// ([`Circuits::reuse`]).
    Send { link: u32, frame: Vec<u8> },
    /// An EXTEND wants a link to this node: make one (or find it) and
    /// answer [`Circuits::extend_on`].
    Connect { h: u64, to: Box<Extend> },
    /// A LOOKUP wants this address's record: answer
    /// [`Circuits::lookup_done`], from what the node holds or after a DHT
    /// lookup.
    Lookup { h: u64, addr: Ipv6Addr },
    /// An AUTH names this record: check it (its signature, against the
    /// DHT's cache) and answer [`Circuits::auth_checked`] with it.
    CheckAuth {
        h: u64,
        record: Vec<u8>,
        signature: Vec<u8>,
    },
    /// Packets to this address go through the node again.
    Unroute(Ipv6Addr),
    /// A message for the data plane.
    Plane(ToPlane),
}

/// What became of a cell that arrived on a circuit this node carries.
pub(in crate::proto::node) enum Hop {
    /// Nothing more to do (dropped, or handled: see the actions).
    Done,
    /// Pass the packet (rewritten in place, its cell header written) on
    /// to this link, as a relayed cell.
    Pass(u32),
    /// DATA for this node: a packet of this length in the buffer the call
    /// named.
    Deliver(usize),
}

/// How a relay's CREATE went.
#[derive(PartialEq, Eq)]
pub(in crate::proto::node) enum Created {
    /// Served, refused for the relay's limits or dropped: nothing for the
    /// node.
    Handled,
    /// Refused: the neighbour may not relay through here.
    Denied,
}

/// Frames kept for reuse (cells this node sends: answers, CREATE, DESTROY).
const SPARE_FRAMES: usize = 64;

impl Circuits {
    /// The next thing the node is to do for the relay's side.
    pub(in crate::proto::node) fn poll_hop(&mut self) -> Option<HopAction> {
        self.actions.pop_front()
    }

    /// Takes back a frame of a [`HopAction::Send`], to reuse.
    pub(in crate::proto::node) fn reuse(&mut self, frame: Vec<u8>) {
        if self.frames.len() < SPARE_FRAMES {
            self.frames.push(frame);
        }
    }

    /// A zeroed frame for a cell of `size` bytes after the frame headers.
    fn frame(&mut self, size: usize) -> Vec<u8> {
        let mut f = self.frames.pop().unwrap_or_default();
        f.clear();
        f.resize(CONTROL_BODY + size, 0);
        f
    }

    /// Where a circuit ID on a link belongs.
    pub(super) fn circ_ref(&self, key: (u32, u32)) -> Option<CircRef> {
        self.on_link.get(&key).copied()
    }

    /// A free circuit ID on `link`; `high`: this node's side of the link
    /// sets the top bit (its ID is the lower), so the two sides never pick
    /// the same one.
    pub(in crate::proto::node) fn alloc_circ(&mut self, link: u32, high: bool) -> u32 {
        let high = if high { 0x8000_0000 } else { 0 };
        loop {
            let c = (self.rng.next_u32() & 0x7fff_ffff) | high;
            if c != 0 && !self.on_link.contains_key(&(link, c)) {
                return c;
            }
        }
    }

    /// Queues a link-level cell with a plain body (CREATE, CREATED,
    /// DESTROY): random nonce and padding.
    pub(in crate::proto::node) fn send_plain(
        &mut self,
        link: u32,
        circ: u32,
        kind: CellKind,
        body: &[u8],
    ) {
        let mut frame = self.frame(CELL_SMALL);
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let cell = &mut frame[CONTROL_BODY..];
        onion::write_header(cell, circ, kind, &nonce);
        cell[CELL_HEADER..CELL_HEADER + body.len()].copy_from_slice(body);
        self.rng.fill_bytes(&mut cell[CELL_HEADER + body.len()..]);
        self.actions.push_back(HopAction::Send { link, frame });
    }

    /// Queues a backward cell from hop circuit `h`: its answer to the
    /// source.
    fn answer(&mut self, env: &HopEnv, h: u64, command: Cmd, data: &[u8]) {
        let size = onion::cell_size_for(data.len(), env.always_large).unwrap_or(CELL_LARGE);
        let mut frame = self.frame(size);
        let Some(hc) = self.hops.get_mut(h) else {
            self.reuse(frame);
            return;
        };
        let ctr = hc.ctr.next();
        let (link, circ) = hc.prev();
        let (head, body) = frame[CONTROL_BODY..].split_at_mut(CELL_HEADER);
        let n = hc.keys.originate(ctr, command, data, body);
        onion::write_header(head, circ, CellKind::Relay, &n);
        self.actions.push_back(HopAction::Send { link, frame });
    }

    /// A CREATE from `link`; `admitted`: whether the neighbour may relay
    /// through here (the node checks its access lists).
    pub(in crate::proto::node) fn on_create(
        &mut self,
        env: &HopEnv,
        link: u32,
        circ: u32,
        body: &[u8],
        admitted: bool,
    ) -> Created {
        if self.on_link.contains_key(&(link, circ)) {
            self.stats.drops.bad_kind += 1;
            return Created::Handled;
        }
        if !admitted {
            self.stats.refused += 1;
            self.send_plain(link, circ, CellKind::Destroy, &[3]);
            return Created::Denied;
        }
        match self.hops.admit(env.now, link) {
            Admit::Yes => {}
            Admit::Limited => {
                self.stats.drops.create_limited += 1;
                return Created::Handled;
            }
            Admit::Full => {
                self.stats.refused += 1;
                tracing::debug!(link, "circuit refused: relay at its limit");
                self.send_plain(link, circ, CellKind::Destroy, &[1]);
                return Created::Handled;
            }
        }
        let keys: Vec<&OnionKey> = std::iter::once(&self.onion)
            .chain(self.prev_onion.as_ref())
            .collect();
        let res = server_handshake(&mut self.rng, &env.id, &keys, &body[..CREATE_LEN]);
        let (created, keys) = match res {
            Ok(x) => x,
            Err(e) => {
                self.stats.refused += 1;
                tracing::debug!(link, "circuit refused: {e}");
                self.send_plain(link, circ, CellKind::Destroy, &[2]);
                return Created::Handled;
            }
        };
        let h = self.next_id;
        self.next_id += 1;
        self.hops
            .insert(h, HopCirc::new(env.now, (link, circ), keys));
        self.on_link.insert((link, circ), CircRef::Prev(h));
        self.stats.circuits_total += 1;
        self.send_plain(link, circ, CellKind::Created, &created);
        Created::Handled
    }

    /// Removes hop circuit `h`, telling the side it did not hear it from.
    pub(in crate::proto::node) fn drop_hop(&mut self, h: u64, tell_prev: bool, tell_next: bool) {
        // Another circuit from the same source (its replacement) carries
        // the replies from now on (see `HopTable::remove`).
        let Some(hc) = self.hops.remove(h) else {
            return;
        };
        // The plane may hold it, or a route back on it (one that ended
        // here and authenticated its source).
        if hc.in_plane || hc.auth().is_some() {
            self.actions
                .push_back(HopAction::Plane(ToPlane::Unrelay(h)));
        }
        self.on_link.remove(&hc.prev());
        if tell_prev {
            self.send_plain(hc.prev().0, hc.prev().1, CellKind::Destroy, &[0]);
        }
        if let Some(next) = hc.next {
            self.on_link.remove(&next);
            if tell_next {
                self.send_plain(next.0, next.1, CellKind::Destroy, &[0]);
            }
        }
    }

    /// The hop circuits' upkeep: an EXTEND that took too long fails, and
    /// circuits idle too long go.
    pub(in crate::proto::node) fn hop_timers(&mut self, env: &HopEnv) {
        for (h, extending) in self.hops.stale(env.now) {
            if extending {
                self.answer(env, h, Cmd::ExtendFailed, &[5]);
            }
            self.drop_hop(h, true, true);
        }
        self.stats.circuits = self.hops.len();
    }

    /// A forward cell for hop circuit `h`, in `packet[CONTROL_BODY..]`:
    /// ours (DATA is decoded into `out`), or our layer is peeled in place
    /// and it is passed on.
    pub(in crate::proto::node) fn hop_forward(
        &mut self,
        env: &HopEnv,
        h: u64,
        mut nonce: [u8; 16],
        packet: &mut [u8],
        out: &mut [u8],
    ) -> Hop {
        let c = CONTROL_BODY;
        #[cfg(feature = "test-hooks")]
        let cell_in = self.cell_for_log(&packet[c..]);
        let Some(peeled) = self
            .hops
            .peel(env.now, h, &mut nonce, &mut packet[c + CELL_HEADER..])
        else {
            return Hop::Done;
        };
        match peeled {
            Err(e) => {
                count(&mut self.stats.drops, e);
                Hop::Done
            }
            Ok(Peeled::Unrecognised) => {
                self.stats.drops.unrecognised += 1;
                Hop::Done
            }
            Ok(Peeled::Pass((link, circ))) => {
                onion::write_header(&mut packet[c..], circ, CellKind::Relay, &nonce);
                #[cfg(feature = "test-hooks")]
                self.log_cell(true, cell_in, &packet[c..]);
                // Queued after the node passes this cell on: the plane
                // takes the circuit from the next cell on.
                self.maybe_hand_hop(env, h);
                Hop::Pass(link)
            }
            Ok(Peeled::Mine(command, range)) => {
                let data = &packet[c + CELL_HEADER + range.start..c + CELL_HEADER + range.end];
                self.hop_command(env, h, command, data, out)
            }
        }
    }

    /// A backward cell on hop circuit `h` (from its next hop), in
    /// `packet[CONTROL_BODY..]`: our layer is added in place, and it is
    /// passed on towards the source.
    pub(in crate::proto::node) fn hop_backward(
        &mut self,
        env: &HopEnv,
        h: u64,
        mut nonce: [u8; 16],
        packet: &mut [u8],
    ) -> Hop {
        let c = CONTROL_BODY;
        let size = packet.len() - c;
        #[cfg(feature = "test-hooks")]
        let cell_in = self.cell_for_log(&packet[c..]);
        let Some((link, circ)) =
            self.hops
                .wrap_back(env.now, h, &mut nonce, &mut packet[c + CELL_HEADER..])
        else {
            return Hop::Done;
        };
        self.hops.count_backward(h, size);
        onion::write_header(&mut packet[c..], circ, CellKind::Relay, &nonce);
        #[cfg(feature = "test-hooks")]
        self.log_cell(false, cell_in, &packet[c..]);
        self.maybe_hand_hop(env, h);
        Hop::Pass(link)
    }

    /// CREATED from the next hop of circuit `h`: the EXTEND is done.
    pub(in crate::proto::node) fn hop_created(&mut self, env: &HopEnv, h: u64, body: &[u8]) {
        let ok = self.hops.get_mut(h).is_some_and(|hc| {
            hc.last_used = env.now;
            hc.extending.take().is_some()
        });
        match body.get(..CREATED_LEN) {
            Some(created) if ok => self.answer(env, h, Cmd::Extended, created),
            _ => self.stats.drops.bad_kind += 1,
        }
    }

    /// A command addressed to this node as hop `h`, with its data. Returns
    /// the length of a packet for the TUN (DATA), decoded into `out`.
    fn hop_command(
        &mut self,
        env: &HopEnv,
        h: u64,
        command: Cmd,
        data: &[u8],
        out: &mut [u8],
    ) -> Hop {
        tracing::trace!(circuit = h, command = command.name(), "cell for us");
        match command {
            Cmd::Data => return self.hop_data(env, h, data, out),
            Cmd::Probe => self.answer(env, h, Cmd::ProbeReply, data),
            Cmd::Noise => self.stats.drops.noise += 1,
            Cmd::Extend => match Extend::parse(data) {
                Ok(x) => self.hop_extend(env, h, x),
                Err(_) => self.stats.drops.malformed += 1,
            },
            Cmd::Auth => self.hop_auth(env, h, data),
            Cmd::Lookup => match Lookup::parse(data) {
                Ok(l) if env.relay => {
                    let addr = l.address;
                    self.actions.push_back(HopAction::Lookup { h, addr });
                }
                Ok(_) => self.answer(env, h, Cmd::LookupReply, &[]),
                Err(_) => self.stats.drops.malformed += 1,
            },
            _ => self.stats.drops.bad_kind += 1,
        }
        Hop::Done
    }

    /// A command the data plane opened for hop circuit `h` (it holds the
    /// circuit), with its data; as [`Circuits::hop_forward`]'s.
    pub(in crate::proto::node) fn hop_opened(
        &mut self,
        env: &HopEnv,
        h: u64,
        at: Instant,
        command: Cmd,
        data: &[u8],
        out: &mut [u8],
    ) -> Hop {
        let Some(hc) = self.hops.get_mut(h) else {
            return Hop::Done;
        };
        hc.last_used = hc.last_used.max(at);
        let env = HopEnv { now: at, ..*env };
        self.hop_command(&env, h, command, data, out)
    }

    fn hop_data(&mut self, env: &HopEnv, h: u64, data: &[u8], out: &mut [u8]) -> Hop {
        let Some(hc) = self.hops.get_mut(h) else {
            return Hop::Done;
        };
        let Some(src) = hc.auth() else {
            self.stats.drops.unauthenticated += 1;
            return Hop::Done;
        };
        let Ok(view) = Ipv6View::new_checked(data) else {
            self.stats.drops.malformed += 1;
            return Hop::Done;
        };
        // The packet's source must be the node that authenticated this
        // circuit; anything else is someone speaking in another's name.
        if view.src() != src || view.dst() != env.address {
            self.stats.drops.spoofed_source += 1;
            return Hop::Done;
        }
        let rebuilt = view.next_header() == wire::NH_QGATE;
        let p = match wire::decode(view, out) {
            Ok((Incoming::App(p), _)) => p.len(),
            _ => {
                self.stats.drops.malformed += 1;
                return Hop::Done;
            }
        };
        // decode() returned either the cell's bytes (as is) or a packet
        // rebuilt in `out`: the result goes to `out` either way.
        if !rebuilt {
            out[..p].copy_from_slice(&data[..p]);
        }
        hc.rx_bytes += p as u64;
        hc.last_data = hc.last_data.max(Some(env.now));
        // Replies go back on the circuit that last brought traffic.
        self.hops.carries_replies(h, src);
        self.actions.push_back(HopAction::Unroute(src));
        // The circuit's next cells are the plane's, if it holds the link.
        self.maybe_hand_hop(env, h);
        Hop::Deliver(p)
    }

    fn hop_extend(&mut self, env: &HopEnv, h: u64, x: Extend) {
        if !env.relay {
            return self.extend_refused(env, h, ExtendRefusal::NotRelay);
        }
        let Some(hc) = self.hops.get(h) else {
            return;
        };
        if hc.next.is_some() || hc.auth().is_some() {
            return self.extend_refused(env, h, ExtendRefusal::AlreadyExtended);
        }
        if x.node == env.id {
            return self.extend_refused(env, h, ExtendRefusal::BadTarget);
        }
        let to = Box::new(x);
        self.actions.push_back(HopAction::Connect { h, to });
    }

    fn extend_refused(&mut self, env: &HopEnv, h: u64, why: ExtendRefusal) {
        self.stats.refused += 1;
        self.answer(env, h, Cmd::ExtendFailed, &[why as u8]);
    }

    /// The node's answer to [`HopAction::Connect`]: the link to the next
    /// hop and whether this side sets the top bit of circuit IDs on it
    /// (see [`Circuits::alloc_circ`]), or None when no link could be made.
    pub(in crate::proto::node) fn extend_on(
        &mut self,
        env: &HopEnv,
        h: u64,
        link: Option<(u32, bool)>,
        create: &[u8; CREATE_LEN],
    ) {
        let Some(hc) = self.hops.get(h) else {
            return;
        };
        let Some((link, high)) = link else {
            return self.extend_refused(env, h, ExtendRefusal::NoLink);
        };
        if hc.prev().0 == link {
            return self.extend_refused(env, h, ExtendRefusal::BadTarget);
        }
        let circ = self.alloc_circ(link, high);
        self.on_link.insert((link, circ), CircRef::Next(h));
        if let Some(hc) = self.hops.get_mut(h) {
            hc.next = Some((link, circ));
            hc.extending = Some(env.now);
        }
        self.send_plain(link, circ, CellKind::Create, create);
    }

    fn hop_auth(&mut self, env: &HopEnv, h: u64, data: &[u8]) {
        if !env.has_tun {
            return self.answer(env, h, Cmd::Refused, &[]);
        }
        // One AUTH per circuit, before any RSA work (a lost READY fails
        // the source's build step; a refusal closes its circuit). Only at
        // the circuit's end: a hop that extended it passes DATA on, and
        // an authenticated source would have it deliver some too.
        if !self.hops.first_auth(h) {
            self.stats.drops.bad_kind += 1;
            return;
        }
        if self.hops.get(h).is_some_and(|hc| hc.next.is_some()) {
            return self.answer(env, h, Cmd::Refused, &[]);
        }
        let Ok(body::Auth { record, signature }) = body::Auth::parse(data) else {
            return self.answer(env, h, Cmd::Refused, &[]);
        };
        self.actions.push_back(HopAction::CheckAuth {
            h,
            record: record.to_vec(),
            signature: signature.to_vec(),
        });
    }

    /// The node's answer to [`HopAction::CheckAuth`]: the record, if it is
    /// a valid one. The source is authenticated if the signature is its
    /// key's over this circuit's binding.
    pub(in crate::proto::node) fn auth_checked(
        &mut self,
        env: &HopEnv,
        h: u64,
        record: Option<NodeRecord>,
        signature: &[u8],
    ) {
        let Some(rec) = record else {
            return self.answer(env, h, Cmd::Refused, &[]);
        };
        let Some(hc) = self.hops.get(h) else {
            return;
        };
        let msg = auth_message(&env.id, &hc.keys.bind);
        if verify_signature(&rec.public_der, &msg, signature).ok() != Some(rec.node_id())
            || rec.node_id() == env.id
        {
            self.stats.drops.forged += 1;
            return self.answer(env, h, Cmd::Refused, &[]);
        }
        let src = rec.overlay_address();
        self.hops.carries_replies(h, src);
        self.actions.push_back(HopAction::Unroute(src));
        tracing::debug!(circuit = h, source = %src, "inbound circuit authenticated");
        self.answer(env, h, Cmd::Ready, &[]);
    }

    /// The node's answer to [`HopAction::Lookup`]: the record found, or
    /// nothing (empty).
    pub(in crate::proto::node) fn lookup_done(&mut self, env: &HopEnv, h: u64, record: &[u8]) {
        self.answer(env, h, Cmd::LookupReply, record);
    }

    /// If a circuit from `dst` brought traffic lately, the packet goes back
    /// on it. Returns None when there is no such circuit.
    pub(in crate::proto::node) fn inbound_route(
        &self,
        now: Instant,
        dst: &Ipv6Addr,
    ) -> Option<u64> {
        let own_circuit = self.out.current(dst).is_some();
        self.hops.inbound_route(now, dst, own_circuit)
    }

    /// Builds the DATA cell for `view` back on inbound circuit `h` in
    /// `cell` (`scratch`: where a compressed packet is framed; `lz4`: the
    /// compressor's table, if circuits compress). Returns (link, cell
    /// length).
    pub(in crate::proto::node) fn reply_cell(
        &mut self,
        h: u64,
        view: Ipv6View<'_>,
        lz4: Option<&mut Lz4Table>,
        always_large: bool,
        scratch: &mut [u8],
        cell: &mut [u8],
    ) -> Option<(u32, usize)> {
        let hc = self.hops.get_mut(h)?;
        let table = lz4.map(|t| (&mut hc.adaptive, t));
        let (frame, _) = crate::proto::compress::encode(view, table, scratch);
        if frame.len() > MAX_DATA {
            return None;
        }
        let size = onion::cell_size_for(frame.len(), always_large).unwrap_or(CELL_LARGE);
        let ctr = hc.ctr.next();
        hc.tx_bytes += view.bytes().len() as u64;
        let (link, circ) = hc.prev();
        let (head, body) = cell.get_mut(..size)?.split_at_mut(CELL_HEADER);
        let n = hc.keys.originate(ctr, Cmd::Data, frame, body);
        onion::write_header(head, circ, CellKind::Relay, &n);
        Some((link, size))
    }

    /// A route for the data plane back on circuit `h`, which ends here and
    /// authenticated `dst` as its source, if the node uses a plane and it
    /// holds the circuit's link: the plane then sends the packets to `dst`
    /// back on it itself for a while.
    pub(in crate::proto::node) fn back_route(
        &self,
        env: &HopEnv,
        h: u64,
        dst: Ipv6Addr,
        compress: bool,
    ) -> Option<OutRoute> {
        let plane = env.plane?;
        let hc = self.hops.get(h)?;
        let (link, circ) = hc.prev();
        if hc.auth() != Some(dst) || !plane.handed(link) {
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
            compress,
            always_large: env.always_large,
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
    fn maybe_hand_hop(&mut self, env: &HopEnv, h: u64) {
        let Some(plane) = env.plane else {
            return;
        };
        let Some(hc) = self.hops.get_mut(h) else {
            return;
        };
        // Only a circuit ending here has a source its DATA may come from.
        let (prev, next) = (hc.prev(), hc.next);
        let src = hc.auth().filter(|_| next.is_none());
        let ready = match next {
            Some(next) => hc.extending.is_none() && plane.handed(next.0),
            None => src.is_some(),
        };
        if hc.in_plane || !ready || !plane.handed(prev.0) {
            return;
        }
        hc.in_plane = true;
        tracing::trace!(
            circuit = h,
            ends_here = next.is_none(),
            "circuit handed to the data plane"
        );
        let relay = Relay {
            h,
            prev,
            next,
            keys: hc.keys.clone(),
            replay: hc.replay.clone(),
            src,
        };
        let msg = ToPlane::Relay(Box::new(relay));
        self.actions.push_back(HopAction::Plane(msg));
    }

    /// The data plane could not take relayed circuit `h` (a link of it was
    /// withdrawn meanwhile): the node passes its cells on, and may hand it
    /// over again.
    pub(in crate::proto::node) fn hop_not_in_plane(&mut self, h: u64) {
        if let Some(hc) = self.hops.get_mut(h) {
            hc.in_plane = false;
            // With several planes, another one may have taken it: it
            // lets go too (and `drop_hop` will not ask, in_plane unset).
            let msg = ToPlane::Unrelay(h);
            self.actions.push_back(HopAction::Plane(msg));
        }
    }

    /// Takes in what the data plane did with circuits' cells: passed on
    /// for relayed circuits, delivered at their ends, sent as DATA on
    /// circuits this node built or back on those it ends.
    pub(in crate::proto::node) fn plane_report(&mut self, r: CellReport) {
        for (h, at, fwd, bwd) in r.circuits {
            if let Some(hc) = self.hops.get_mut(h) {
                hc.last_used = hc.last_used.max(at);
                hc.fwd_bytes += fwd;
                hc.bwd_bytes += bwd;
            }
        }
        for (circuit, at, bytes) in r.sent {
            match circuit {
                CircuitRef::Built(id) => {
                    if let Some(c) = self.out.get_mut(id) {
                        c.last_used = c.last_used.max(at);
                        c.tx_bytes += bytes;
                    }
                }
                // As the node's own replies, they keep nothing alive: a
                // circuit is fresh while it brings traffic.
                CircuitRef::Carried(h) => {
                    if let Some(hc) = self.hops.get_mut(h) {
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
                    let Some(c) = self.out.get_mut(id) else {
                        continue;
                    };
                    c.rx_bytes += bytes;
                    if let Some(last) = c.hops.last_mut() {
                        last.last_reply = last.last_reply.max(at);
                    }
                }
                CircuitRef::Carried(h) => self.delivered(h, at, bytes),
            }
        }
        self.stats.drops.add(&r.drops);
        let s = &mut self.stats;
        s.cells_forwarded += r.cells;
        s.bytes_forwarded += r.bytes;
        s.drops.over_bandwidth += r.over_bandwidth;
        #[cfg(feature = "test-hooks")]
        for (forward, cell_in, out) in r.log {
            self.log_cell(forward, Some(cell_in), &out);
        }
    }

    /// The plane delivered `bytes` of DATA that came on circuit `h`, the
    /// last at `at`.
    fn delivered(&mut self, h: u64, at: Instant, bytes: u64) {
        let Some(hc) = self.hops.get_mut(h) else {
            return;
        };
        hc.rx_bytes += bytes;
        hc.last_used = hc.last_used.max(at);
        hc.last_data = hc.last_data.max(Some(at));
        // Replies go back on the circuit that last brought traffic. The
        // plane dropped any other route it held itself; one granted
        // meanwhile goes too. (With several planes, reports come one plane
        // at a time: a circuit whose DATA came later than this keeps the
        // replies.)
        let Some(src) = hc.auth() else {
            return;
        };
        let cur = self.hops.replies_on(&src);
        let later = cur
            .filter(|c| *c != h)
            .and_then(|c| self.hops.get(c))
            .is_some_and(|c| c.last_data > Some(at));
        if later {
            return;
        }
        if cur != Some(h) {
            self.actions.push_back(HopAction::Unroute(src));
        }
        self.hops.carries_replies(h, src);
    }

    /// How many circuits the data plane holds: relayed (it passes their
    /// cells on) or ending here (it opens them).
    pub(in crate::proto::node) fn hops_in_plane(&self) -> usize {
        self.hops.values().filter(|hc| hc.in_plane).count()
    }

    /// Test hook: notes a relayed cell as it arrived and as it left.
    #[cfg(feature = "test-hooks")]
    fn log_cell(&mut self, forward: bool, cell_in: Option<Vec<u8>>, out: &[u8]) {
        if let Some(cell_in) = cell_in {
            if self.cell_log.len() < 100_000 {
                self.cell_log.push((forward, cell_in, out.to_vec()));
            }
        }
    }

    /// Test hook: a copy of a cell about to be relayed, when cells are
    /// being logged.
    #[cfg(feature = "test-hooks")]
    fn cell_for_log(&self, cell: &[u8]) -> Option<Vec<u8>> {
        self.cell_log_on.then(|| cell.to_vec())
    }
}
