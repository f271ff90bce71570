//! The source's side of circuits: sending packets through a circuit,
//! building one (path, CREATE, EXTEND, LOOKUP, AUTH), cells coming back on
//! it, failure and replacement, and cover traffic.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use rand_core::RngCore;

use super::outbound::Fault;
use super::routing::PathInputs;
use super::{
    count, wrap_into, BuildError, BuiltHop, CellCounter, CircRef, OutCirc, Peer, SignJob, Signing,
    Stage, CIRCUIT_MTU, MAX_OUT, OUT_IDLE, QUEUE,
};
use crate::proto::identity::NodeId;
use crate::proto::node::plane::{CircuitRef, OutRoute};
use crate::proto::node::{Node, Routed};
use crate::proto::onion::body::{self, Extend, ExtendRefusal, Lookup};
use crate::proto::onion::{CellKind, ClientHandshake, Cmd, CELL_HEADER, CREATED_LEN, MAX_DATA};
use crate::proto::route;
use crate::proto::wire::{self, Incoming, Ipv6View};
use std::sync::Arc;

impl Node {
    /// Whether builds to `dst` failed too often lately.
    pub(super) fn build_failing(&self, now: Instant, dst: &Ipv6Addr) -> bool {
        self.circ.out.failing(now, dst)
    }

    /// Sends an application packet to `dst` through a circuit, building one
    /// if needed.
    pub(in crate::proto::node) fn circuit_send(
        &mut self,
        now: Instant,
        view: Ipv6View<'_>,
        min: u8,
        max: u8,
    ) -> Routed {
        let dst = view.dst();
        if view.bytes().len() > CIRCUIT_MTU {
            return self.too_big_for_circuit(now, view);
        }
        let id = match self.circ.out.current(&dst) {
            Some(id) => id,
            None => {
                if self.build_failing(now, &dst) || self.noted_unreachable(now, &dst) {
                    self.drops.unreachable += 1;
                    return self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0);
                }
                match self.build_circuit(now, dst, min, max) {
                    Ok(id) => id,
                    Err(e) => {
                        if e == BuildError::NoPath {
                            self.note_unreachable(now, dst, min);
                        }
                        self.drops.no_route += 1;
                        return self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0);
                    }
                }
            }
        };
        let Some(c) = self.circ.out.get_mut(id) else {
            return Routed::Nothing;
        };
        c.last_used = now;
        if c.stage != Stage::Ready {
            if c.queue.len() >= QUEUE {
                c.queue.pop_front();
                self.drops.send_failed += 1;
            }
            c.queue.push_back(view.bytes().to_vec());
            return Routed::Nothing;
        }
        match self.out_data(id, view) {
            Some((link, len)) if self.send_cell(now, link, len) => {
                if !self.plane_routes(now, &dst) {
                    if let Some(r) = self.out_route(id) {
                        self.plane_route_circuit(now, r);
                    }
                }
                Routed::Queued
            }
            _ => Routed::Nothing,
        }
    }

    /// A route for the data plane to ready circuit `id`, if the node uses
    /// a plane and it holds the circuit's first link: the plane then sends
    /// the packets to the circuit's destination itself for a while.
    fn out_route(&self, id: u64) -> Option<OutRoute> {
        if !self.uses_plane() {
            return None;
        }
        let c = self.circ.out.get(id)?;
        if c.stage != Stage::Ready || !self.handed(c.link) {
            return None;
        }
        Some(OutRoute {
            id: CircuitRef::Built(id),
            dst: c.dst,
            link: c.link,
            circ: c.circ,
            keys: c.hops.iter().map(|h| h.keys.clone()).collect(),
            replays: c.hops.iter().map(|h| h.replay.clone()).collect(),
            counter: c.hops.last()?.ctr.clone(),
            compress: self.config.traffic.compress && self.config.compression.enabled,
            always_large: self.config.traffic.always_large,
        })
    }

    /// Whether circuits compress application packets (now: not while the
    /// data path is the limit, see `compress::Governor`, if cells are all
    /// large).
    pub(super) fn circuit_compress(&self) -> bool {
        // The pause applies only where cells are all one size: with two
        // cell sizes, whoever can load this node could switch compression,
        // and with it the cell sizes of circuits starting here, on and off
        // to mark their traffic.
        let pause = self.config.compression.adaptive
            && self.config.traffic.always_large
            && self.compression.paused();
        self.config.traffic.compress && self.config.compression.enabled && !pause
    }

    /// Wraps an application packet as DATA for circuit `id`'s destination,
    /// straight from the caller's packet (or its compressed frame in
    /// `bufs.b`) into `bufs.cell`: no copy of its own, no allocation.
    fn out_data(&mut self, id: u64, view: Ipv6View<'_>) -> Option<(u32, usize)> {
        let len = view.bytes().len();
        let (compress, large) = (self.circuit_compress(), self.config.traffic.always_large);
        let c = self.circ.out.get_mut(id)?;
        let table = compress.then_some((&mut c.adaptive, &mut self.bufs.lz4));
        let (frame, _) = crate::proto::compress::encode(view, table, &mut self.bufs.b);
        if frame.len() > MAX_DATA {
            self.drops.too_big += 1;
            return None;
        }
        c.tx_bytes += len as u64;
        let target = c.hops.len().checked_sub(1)?;
        wrap_into(c, target, Cmd::Data, frame, &mut self.bufs.cell, large)
    }

    /// The destination's record and what it says, when known here.
    pub(super) fn local_peer(&self, dst: &Ipv6Addr) -> Option<Peer> {
        self.local_record(dst)
            .as_deref()
            .and_then(Peer::from_record)
    }

    /// Picks relays and starts a circuit to `dst`: as many as drawn from
    /// MIN..=MAX, or fewer (not below MIN) when the pool can't give that
    /// many.
    pub(super) fn build_circuit(
        &mut self,
        now: Instant,
        dst: Ipv6Addr,
        min: u8,
        max: u8,
    ) -> Result<u64, BuildError> {
        if self.circ.out.len() >= MAX_OUT {
            return Err(BuildError::Limit);
        }
        self.fill_pool_from_table(now);
        let dest_record = self.local_record(&dst);
        let dest = dest_record.as_deref().and_then(Peer::from_record);
        let drawn = route::draw_len(&mut self.rng, min, max);
        let PathInputs {
            pool,
            exclude,
            ends,
        } = self.path_inputs(&dst);
        let distinct = self.config.relay.distinct_subnets;
        let path = (min..=drawn).rev().find_map(|len| {
            route::select(&mut self.rng, &pool, len.into(), &exclude, &ends, distinct)
        });
        let Some(path) = path else {
            tracing::debug!(%dst, pool = pool.len(), "no path: too few usable relays");
            return Err(BuildError::NoPath);
        };
        let relays: Vec<Peer> = path
            .iter()
            .filter_map(|id| self.circ.pool.peer(id).cloned())
            .collect();
        let first = relays.first().ok_or(BuildError::NoPath)?.clone();
        let link = self
            .connect_to(now, first.id, first.link_key, first.endpoint)
            .ok_or(BuildError::NoLink)?;
        let circ = self.alloc_circ(link);
        let id = self.circ.next_id;
        self.circ.next_id += 1;
        let (hs, create) = ClientHandshake::start(&mut self.rng, first.id, first.onion);
        tracing::debug!(circuit = id, %dst, relays = relays.len(), "building a circuit");
        let c = OutCirc::new(now, dst, relays, dest_record, dest, Some(hs), (link, circ));
        let dst = c.dst;
        self.circ.out.insert(id, c);
        self.unroute(dst);
        self.circ.on_link.insert((link, circ), CircRef::Out(id));
        self.send_plain(now, link, circ, CellKind::Create, &create);
        Ok(id)
    }

    /// CREATED from the first hop.
    pub(super) fn out_created(&mut self, now: Instant, id: u64, body: &[u8]) {
        let Some(c) = self.circ.out.get_mut(id) else {
            return;
        };
        let Some(hs) = c.pending.take() else {
            self.circ.stats.drops.bad_kind += 1;
            return;
        };
        match hs.finish(&body[..CREATED_LEN]) {
            Ok(keys) => {
                let took = now.saturating_duration_since(c.step_started);
                let hop_id = c.relays[0].id;
                c.hops.push(BuiltHop {
                    id: hop_id,
                    keys: Arc::new(keys),
                    ctr: CellCounter::default(),
                    replay: Arc::default(),
                    last_reply: now,
                });
                self.circ.out.step_took(took);
                self.advance(now, id);
            }
            Err(e) => {
                let bad = c.relays.first().map(|p| p.id);
                self.out_failed(now, id, bad, &e.to_string());
            }
        }
    }

    /// A backward cell on a circuit we built (in `self.bufs.cell[..size]`).
    pub(super) fn out_cell(
        &mut self,
        now: Instant,
        id: u64,
        nonce: [u8; 16],
        size: usize,
    ) -> Option<usize> {
        let body = &mut self.bufs.cell[CELL_HEADER..size];
        let u = match self.circ.out.open_reply(now, id, nonce, body)? {
            Ok(u) => u,
            Err(e) => {
                count(&mut self.circ.stats.drops, e);
                return None;
            }
        };
        let (start, end) = (CELL_HEADER + u.data.start, CELL_HEADER + u.data.end);
        self.out_command(now, id, u.hop, u.command, start, end)
    }

    /// A command from hop `hop` of circuit `id` we built, opened (here or
    /// by the data plane); its data in `self.bufs.cell[start..end]`.
    /// Returns a packet for the TUN (in `bufs.b`) when it was DATA from the
    /// destination.
    pub(super) fn out_command(
        &mut self,
        now: Instant,
        id: u64,
        hop: usize,
        command: Cmd,
        start: usize,
        end: usize,
    ) -> Option<usize> {
        let c = self.circ.out.get_mut(id)?;
        let last = hop + 1 == c.hops.len();
        let is_dest = last && c.dest.is_some() && c.hops.len() == c.relays.len() + 1;
        tracing::trace!(circuit = id, hop, command = command.name(), "cell from hop");
        match command {
            Cmd::Data if is_dest => {
                let Ok(view) = Ipv6View::new_checked(&self.bufs.cell[start..end]) else {
                    self.circ.stats.drops.malformed += 1;
                    return None;
                };
                if view.src() != c.dst || view.dst() != self.address {
                    self.circ.stats.drops.spoofed_source += 1;
                    return None;
                }
                let p = match wire::decode(view, &mut self.bufs.b) {
                    Ok((Incoming::App(p), _)) => p.len(),
                    _ => {
                        self.circ.stats.drops.malformed += 1;
                        return None;
                    }
                };
                c.rx_bytes += p as u64;
                if view.next_header() != wire::NH_QGATE {
                    self.bufs.b[..p].copy_from_slice(&self.bufs.cell[start..start + p]);
                }
                return Some(p);
            }
            Cmd::ProbeReply => {}
            Cmd::Extended if last && c.pending.is_some() => {
                let hs = c.pending.take()?;
                let next = if c.hops.len() < c.relays.len() {
                    c.relays[c.hops.len()].clone()
                } else {
                    c.dest.clone()?
                };
                match hs.finish(&self.bufs.cell[start..end]) {
                    Ok(keys) => {
                        let took = now.saturating_duration_since(c.step_started);
                        c.hops.push(BuiltHop {
                            id: next.id,
                            keys: Arc::new(keys),
                            ctr: CellCounter::default(),
                            replay: Arc::default(),
                            last_reply: now,
                        });
                        self.circ.out.step_took(took);
                        self.advance(now, id);
                    }
                    Err(e) => self.out_failed(now, id, Some(next.id), &e.to_string()),
                }
            }
            Cmd::ExtendFailed if last => {
                // A relay refusing to extend at all is to blame itself; a
                // next hop it could not reach (or that never answered) is.
                let why = ExtendRefusal::parse(&self.bufs.cell[start..end]);
                let next = match why {
                    Some(
                        ExtendRefusal::NotRelay
                        | ExtendRefusal::AlreadyExtended
                        | ExtendRefusal::BadTarget,
                    ) => c.hops.last().map(|h| h.id),
                    _ => c.next_relay(),
                };
                self.out_failed(now, id, next, "extend failed");
            }
            Cmd::LookupReply if last && c.stage == Stage::Looking => {
                let rec = self.bufs.cell[start..end].to_vec();
                let dst = c.dst;
                let ok = self
                    .dht
                    .records()
                    .verified_record(&rec)
                    .ok()
                    .filter(|r| r.overlay_address() == dst)
                    .and_then(|_| Peer::from_record(&rec));
                match ok {
                    Some(p) => {
                        let clash = self.config.relay.distinct_subnets
                            && c.relays.iter().any(|r| {
                                r.ips.iter().any(|a| {
                                    p.ips.iter().any(|b| route::subnet(a) == route::subnet(b))
                                })
                            });
                        c.dest = Some(p);
                        c.dest_record = Some(rec);
                        if clash {
                            // Now that the destination's subnet is known, a
                            // fresh path can avoid it.
                            self.out_failed(now, id, None, "relay shares the destination's subnet");
                        } else {
                            self.advance(now, id);
                        }
                    }
                    None => {
                        self.circ.stats.drops.malformed += 1;
                        self.circ.out.give_up(now, dst);
                        self.out_failed(now, id, None, "destination not found");
                    }
                }
            }
            Cmd::Ready if is_dest && c.stage == Stage::Authing => {
                c.stage = Stage::Ready;
                c.step_started = now;
                let dst = c.dst;
                tracing::info!(
                    circuit = id,
                    relays = c.relays.len(),
                    ms = now.saturating_duration_since(c.created).as_millis() as u64,
                    "circuit ready"
                );
                tracing::debug!(circuit = id, %dst, "circuit ready");
                self.circ.out.succeeded(&dst);
                // The replacement takes over from the circuit it replaces.
                // The plane asks the node again (its route may name the
                // circuit this one replaces).
                self.unroute(dst);
                if let Some(old) = self.circ.out.make_current(dst, id) {
                    self.close_out(now, old);
                }
                let queue = std::mem::take(&mut self.circ.out.get_mut(id)?.queue);
                for p in queue {
                    if let Ok(view) = Ipv6View::new_checked(&p) {
                        if let Some((link, len)) = self.out_data(id, view) {
                            self.send_cell(now, link, len);
                        }
                    }
                }
            }
            Cmd::Refused if is_dest => {
                let dst = c.dst;
                self.circ.out.give_up(now, dst);
                self.out_failed(now, id, None, "destination refused us");
            }
            _ => self.circ.stats.drops.bad_kind += 1,
        }
        None
    }

    /// Takes the next build step of circuit `id`.
    fn advance(&mut self, now: Instant, id: u64) {
        let Some(c) = self.circ.out.get_mut(id) else {
            return;
        };
        c.step_started = now;
        let built = c.hops.len();
        let target = built - 1;
        let next = if built < c.relays.len() {
            Some(c.relays[built].clone())
        } else if built == c.relays.len() {
            match &c.dest {
                Some(d) => Some(d.clone()),
                None => {
                    c.stage = Stage::Looking;
                    let mut data = [0u8; 16];
                    let n = Lookup { address: c.dst }.emit(&mut data).unwrap_or(0);
                    self.send_out(now, id, target, Cmd::Lookup, &data[..n]);
                    return;
                }
            }
        } else {
            None
        };
        match next {
            Some(p) => {
                let (hs, create) = ClientHandshake::start(&mut self.rng, p.id, p.onion);
                c.pending = Some(hs);
                c.stage = Stage::Extending;
                let x = Extend {
                    node: p.id,
                    link_key: p.link_key,
                    endpoint: p.endpoint,
                    create,
                };
                let mut data = [0u8; Extend::MAX_LEN];
                let Ok(n) = x.emit(&mut data) else {
                    return;
                };
                self.send_out(now, id, target, Cmd::Extend, &data[..n]);
            }
            None => {
                // The destination is the last hop: prove who we are to it,
                // once the signature is made (`signed`), away from here.
                c.stage = Stage::Signing;
                if let Some(message) = c.auth_message() {
                    self.circ.to_sign.push_back(SignJob {
                        what: Signing::Auth { circuit: id },
                        message,
                    });
                }
            }
        }
    }

    /// The next AUTH signature a circuit needs.
    pub(in crate::proto::node) fn poll_auth_job(&mut self) -> Option<SignJob> {
        self.circ.to_sign.pop_front()
    }

    /// Whether circuit `circuit` still waits for a signature over
    /// `message` (one that failed or was rebuilt meanwhile asked for
    /// another).
    pub(in crate::proto::node) fn wants_auth(&self, circuit: u64, message: &[u8]) -> bool {
        self.circ.out.get(circuit).is_some_and(|c| {
            c.stage == Stage::Signing && c.auth_message().is_some_and(|m| m == message)
        })
    }

    /// The AUTH signature for `circuit`: sends the AUTH, if the circuit
    /// still waits for it.
    pub(in crate::proto::node) fn auth_signed(
        &mut self,
        now: Instant,
        circuit: u64,
        message: &[u8],
        signature: &[u8],
    ) {
        if !self.wants_auth(circuit, message) {
            return;
        }
        let Some(c) = self.circ.out.get_mut(circuit) else {
            return;
        };
        // The AUTH round trip gets a step of its own.
        c.stage = Stage::Authing;
        c.step_started = now;
        let target = c.hops.len() - 1;
        let auth = body::Auth {
            record: self.own.bytes(),
            signature,
        };
        let mut data = [0u8; MAX_DATA];
        let Ok(n) = auth.emit(&mut data) else {
            tracing::warn!("our record is too large to authenticate on a circuit");
            return;
        };
        self.send_out(now, circuit, target, Cmd::Auth, &data[..n]);
    }

    /// Ends circuit `id` (telling its first hop).
    pub(super) fn close_out(&mut self, now: Instant, id: u64) {
        if let Some(c) = self.circ.out.remove(id) {
            // The plane no longer sends on it.
            self.unroute(c.dst);
            self.circ.on_link.remove(&(c.link, c.circ));
            self.send_plain(now, c.link, c.circ, CellKind::Destroy, &[0]);
        }
    }

    /// Circuit `id` failed (`bad`: the hop to blame, if known); a new one
    /// is built at once for the packets waiting, if it was in use.
    pub(super) fn out_failed(&mut self, now: Instant, id: u64, bad: Option<NodeId>, why: &str) {
        let Some(c) = self.circ.out.get_mut(id) else {
            return;
        };
        let (dst, in_use) = (c.dst, now.saturating_duration_since(c.last_used) < OUT_IDLE);
        let queue = std::mem::take(&mut c.queue);
        let replaced_by = c.replaced_by;
        // A relay to blame (not the destination, which is the last hop):
        // a fresh path avoids it, and the destination is not given up on.
        let fault = match bad {
            Some(b) if c.relays.iter().any(|p| p.id == b) => Fault::Relay,
            _ => Fault::Other,
        };
        tracing::info!(circuit = id, "circuit failed: {why}");
        tracing::debug!(circuit = id, %dst, "circuit failed");
        if let Some(b) = bad {
            // Out of the pool (it comes back from the DHT if it lives) and
            // not picked again for a while.
            self.circ.pool.blame(now, b);
        }
        self.close_out(now, id);
        let worth_another = self.circ.out.failed(now, dst, fault);
        if !worth_another || !in_use {
            return;
        }
        if replaced_by.is_some_and(|r| self.circ.out.contains(r)) {
            return;
        }
        // A failed make-before-break replacement: the circuit it was to
        // replace still carries the traffic, and the timers build another
        // replacement (unless builds to the destination are failing).
        if self.circ.out.iter().any(|(_, o)| o.replaced_by == Some(id)) {
            return;
        }
        if let Some((min, max)) = self.config.routes.for_addr(&dst).relays() {
            if let Ok(new) = self.build_circuit(now, dst, min, max) {
                if let Some(n) = self.circ.out.get_mut(new) {
                    n.queue = queue;
                }
            }
        }
    }

    /// Cover traffic on a ready circuit: NOISE cells for the destination,
    /// which look like DATA to every relay.
    pub(super) fn noise(&mut self, now: Instant, id: u64) {
        let rate = self.config.traffic.noise_rate;
        if rate <= 0.0 {
            return;
        }
        let (lo, hi) = self.config.traffic.noise_size;
        loop {
            let Some(c) = self.circ.out.get_mut(id) else {
                return;
            };
            let due = *c.next_noise.get_or_insert(now);
            if due > now {
                return;
            }
            // Exponential gaps (a Poisson process) at the configured rate.
            let u = (self.rng.next_u32() as f64 + 1.0) / (u32::MAX as f64 + 2.0);
            let gap = (-u.ln() / rate).min(60.0);
            c.next_noise = Some(due + Duration::from_secs_f64(gap));
            let target = c.hops.len() - 1;
            let span = hi.saturating_sub(lo) as u32 + 1;
            let size = (lo + (self.rng.next_u32() % span) as usize).min(MAX_DATA);
            // A reused buffer, lent out while the cell is sent.
            let mut junk = std::mem::take(&mut self.circ.noise_buf);
            junk.resize(size, 0);
            self.rng.fill_bytes(&mut junk);
            self.send_out(now, id, target, Cmd::Noise, &junk);
            self.circ.noise_buf = junk;
            if now.saturating_duration_since(due) > Duration::from_secs(1) {
                // Don't catch up on a backlog after a stall.
                if let Some(c) = self.circ.out.get_mut(id) {
                    c.next_noise = Some(now);
                }
                return;
            }
        }
    }

    /// Test hook: failed builds to `dst` so far (not a relay's fault, a
    /// relay's).
    #[cfg(test)]
    pub(in crate::proto::node) fn build_fails(&self, dst: &Ipv6Addr) -> (u32, u32) {
        self.circ.out.fails_of(dst)
    }

    /// Test hook: injects an application packet into the circuit to `dst`
    /// as DATA for its hop `hop` (the destination when none), whatever its
    /// source address says (to show the hops' checks).
    #[cfg(test)]
    pub(in crate::proto::node) fn inject_data(
        &mut self,
        now: Instant,
        dst: Ipv6Addr,
        hop: Option<usize>,
        packet: &[u8],
    ) -> bool {
        let Some(id) = self.circ.out.current(&dst) else {
            return false;
        };
        let Ok(view) = Ipv6View::new_checked(packet) else {
            return false;
        };
        if let Some(target) = hop {
            self.send_out(now, id, target, Cmd::Data, packet);
            return true;
        }
        match self.out_data(id, view) {
            Some((link, len)) => {
                self.send_cell(now, link, len);
                true
            }
            None => false,
        }
    }

    /// Test hook: sends another AUTH on the circuit to `dst`, to its hop
    /// `hop` (the destination when none), with `record` and a signature
    /// `sign` makes over that hop's binding (as a source holding two
    /// identities could).
    #[cfg(test)]
    pub(in crate::proto::node) fn inject_auth(
        &mut self,
        now: Instant,
        dst: Ipv6Addr,
        hop: Option<usize>,
        record: &[u8],
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) -> bool {
        let Some(id) = self.circ.out.current(&dst) else {
            return false;
        };
        let Some(c) = self.circ.out.get(id) else {
            return false;
        };
        let Some(target) = hop.or(c.hops.len().checked_sub(1)) else {
            return false;
        };
        let Some(h) = c.hops.get(target) else {
            return false;
        };
        let message = crate::proto::onion::auth_message(&h.id, &h.keys.bind);
        let signature = sign(&message);
        let auth = body::Auth {
            record,
            signature: &signature,
        };
        let mut data = [0u8; MAX_DATA];
        let Ok(n) = auth.emit(&mut data) else {
            return false;
        };
        self.send_out(now, id, target, Cmd::Auth, &data[..n]);
        true
    }

    /// Whether a ready circuit to `dst` exists (tests).
    pub fn circuit_ready(&self, dst: &Ipv6Addr) -> bool {
        self.circ
            .out
            .current(dst)
            .and_then(|id| self.circ.out.get(id))
            .is_some_and(|c| c.stage == Stage::Ready)
    }
}
