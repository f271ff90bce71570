//! The node's side of the DHT: resolving an overlay address to a node
//! (lookups for packets with no link yet, their queue and rate), links
//! opened on demand, spreading our record, and the DHT's control-API
//! operations (lookups, values).

use super::resolve::Miss;
use super::*;

impl Node {
    /// A TUN packet for an address we have no link to: find the node.
    pub(super) fn tun_miss(&mut self, now: Instant, view: Ipv6View<'_>) -> Routed {
        let dst = view.dst();
        if !is_overlay_address(&dst) || dst == self.address {
            self.drops.no_route += 1;
            return Routed::Nothing;
        }
        let min_seq = match self.resolver.miss(now, dst, view.bytes()) {
            Miss::Unreachable => {
                self.drops.unreachable += 1;
                return self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0);
            }
            Miss::Queued => return Routed::Nothing,
            Miss::QueueFull => {
                self.drops.send_failed += 1;
                return Routed::Nothing;
            }
            Miss::Resolve { min_seq } => min_seq,
        };
        let prefix = dst.octets()[1..16].to_vec();
        if let Some(c) = self.dht.find_local(&prefix).filter(|c| {
            c.info.seq >= min_seq && c.info.ip.is_some() && c.info.id.overlay_address() == dst
        }) {
            if let Some(idx) = self.connect(now, &c.record) {
                if let Some(l) = self.links.get_mut(&idx) {
                    l.pending.push_back(view.bytes().to_vec());
                }
                self.flush_pending(now, idx);
                return Routed::Nothing;
            }
        }
        if !self.resolver.may_look_up(now) {
            self.drops.lookup_limited += 1;
            return self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0);
        }
        let goal = Goal::Node {
            prefix,
            min_seq,
            reachable: true,
        };
        match self.dht.lookup(now, goal) {
            Some(id) => {
                tracing::debug!(%dst, "looking up an address");
                self.purposes.insert(id, Purpose::Address(dst));
                self.resolver.looking_up(now, dst, view.bytes());
                self.pump_dht(now);
                Routed::Nothing
            }
            None => {
                self.drops.lookup_limited += 1;
                self.icmp_reply(now, view, wire::ICMPV6_DEST_UNREACHABLE, 3, 0)
            }
        }
    }

    /// Moves the DHT's messages onto links and handles its finished lookups.
    pub(super) fn pump_dht(&mut self, now: Instant) {
        loop {
            let mut moved = false;
            while let Some((to, bytes)) = self.dht.poll_transmit() {
                moved = true;
                self.dht_send(now, &to, &bytes);
            }
            while let Some(ev) = self.dht.poll_event() {
                moved = true;
                self.on_lookup_done(now, ev);
            }
            if !moved {
                return;
            }
        }
    }

    pub(super) fn dht_send(&mut self, now: Instant, to: &Contact, bytes: &[u8]) {
        let addr = to.info.id.overlay_address();
        let idx = match self.links.index_of_addr(&addr) {
            Some(i) => i,
            None => match self.connect(now, &to.record) {
                Some(i) => i,
                // No endpoint or no room: the request fails now rather
                // than in two seconds.
                None => {
                    self.dht.unreachable(now, &to.info.id);
                    return;
                }
            },
        };
        let Some(link) = self.links.get_mut(&idx) else {
            return;
        };
        link.chan.last_used = now;
        if link.verified.is_some() {
            self.send_control(idx, MSG_DHT, bytes, false);
        } else {
            if link.pending_ctl.len() >= MAX_PENDING_CTL {
                link.pending_ctl.pop_front();
            }
            link.pending_ctl.push_back((MSG_DHT, bytes.to_vec()));
        }
    }

    /// Makes an on-demand link to the node of a (checked) record, or
    /// returns the link we have.
    pub(super) fn connect(&mut self, now: Instant, record: &[u8]) -> Option<u32> {
        let rec = NodeRecord::parse_unverified(record).ok()?;
        let id = rec.node_id();
        if id == self.node_id() {
            return None;
        }
        if let Some(i) = self.links.index_of_addr(&id.overlay_address()) {
            return Some(i);
        }
        // A record may name someone else's link key: never let it borrow
        // (or be mapped onto) that node's link.
        if let Some(l) = self.links.for_key(&rec.link_key) {
            if l.node_id().is_some_and(|x| x != id) {
                return None;
            }
        }
        let fields = rec.fields().ok()?;
        let ipv6_ok =
            self.config.advertise.is_empty() || self.config.advertise.iter().any(|a| a.is_ipv6());
        let ep = fields
            .endpoints
            .iter()
            .find(|e| e.is_ipv4() || ipv6_ok)
            .copied()?;
        let idx = self.add_link(rec.link_key, Some(ep), Some(id), now)?;
        self.name_addr(id.overlay_address(), idx);
        if let Some(l) = self.links.get_mut(&idx) {
            l.chan.last_used = now;
        }
        tracing::debug!(link = idx, node = %id.short(), endpoint = %ep, "linking on demand");
        self.send_hello(idx, now);
        Some(idx)
    }

    /// Sends what waited for a link's neighbour to verify.
    pub(super) fn flush_pending(&mut self, now: Instant, index: u32) {
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        if link.verified.is_none() {
            return;
        }
        let pending = std::mem::take(&mut link.pending);
        let ctl = std::mem::take(&mut link.pending_ctl);
        for (ty, m) in ctl {
            if ty == MSG_CELL {
                self.bufs.cell[..m.len()].copy_from_slice(&m);
                self.send_cell(now, index, m.len());
            } else {
                self.send_control(index, ty, &m, false);
            }
        }
        for p in pending {
            // Sealed into the send batch; an ICMPv6 answer has no one to
            // go to now.
            let _ = self.route_tun(now, &p);
        }
    }

    pub(super) fn on_lookup_done(&mut self, now: Instant, ev: LookupDone) {
        match self.purposes.remove(&ev.id) {
            Some(Purpose::Address(addr)) => {
                let waiting = self.resolver.done(&addr);
                let found = match &ev.outcome {
                    Outcome::Found(c) if c.info.id.overlay_address() == addr => Some(c.clone()),
                    _ => None,
                };
                let linked = found.and_then(|c| self.connect(now, &c.record));
                match linked {
                    // Found, but nothing waits any more: the link stays
                    // for the next packet.
                    Some(_) if waiting.is_empty() => {}
                    Some(idx) => {
                        tracing::debug!(%addr, hops = ev.hops, queries = ev.queries, "address found");
                        if let Some(l) = self.links.get_mut(&idx) {
                            for p in waiting {
                                if l.pending.len() >= MAX_PENDING {
                                    l.pending.pop_front();
                                }
                                l.pending.push_back(p);
                            }
                        }
                        self.flush_pending(now, idx);
                    }
                    None => {
                        tracing::debug!(%addr, queries = ev.queries, "address not found");
                        self.resolver.failed(now, addr);
                        // Tell the program, not silence.
                        if let Some(p) = waiting.into_iter().next() {
                            self.drops.unreachable += 1;
                            let mut buf = vec![0u8; IPV6_MIN_MTU];
                            if let Ok(view) = Ipv6View::new_checked(&p) {
                                let ty = wire::ICMPV6_DEST_UNREACHABLE;
                                if let Some(n) = wire::icmpv6_error(view, ty, 3, 0, &mut buf) {
                                    buf.truncate(n);
                                    self.tun_out.push_back(buf);
                                }
                            }
                        }
                    }
                }
            }
            Some(Purpose::Pool) => {
                if let Outcome::Closest(c) = &ev.outcome {
                    self.add_to_pool(now, c);
                }
            }
            Some(Purpose::Circuit(h, addr)) => {
                let found = match ev.outcome {
                    Outcome::Found(c) => Some(c),
                    _ => None,
                };
                self.circuit_lookup_done(now, h, addr, found);
            }
            Some(Purpose::Api) => {
                if self.api_results.len() >= MAX_API_RESULTS {
                    self.api_results.clear();
                }
                self.api_results.insert(ev.id, ev);
            }
            None => {}
        }
    }

    /// The DHT's timers, joining, and keeping our record fresh.
    pub(super) fn dht_timers(&mut self, now: Instant) {
        self.dht.handle_timeout(now);
        if self.dht.table_len() == 0 {
            self.joined = false;
        } else if !self.joined {
            // First contact (a configured peer, the store, the LAN): join.
            self.joined = true;
            tracing::info!(entries = self.dht.table_len(), "joining the DHT");
            self.dht.publish(now);
            self.dht.refresh(now, Refresh::Join);
        }
        self.resolver.expire(now);
        let unix = self.dht.unix(now);
        self.own.poll_resign(now, unix);
        self.pump_dht(now);
    }

    /// Spreads a record [`own_record::OwnRecord`] signed anew: to the DHT
    /// (announced once joined) and in a hello to every verified neighbour.
    pub(super) fn spread_record(&mut self, now: Instant) {
        let own = own_contact(self.own.record(), self.own.bytes());
        if self.joined {
            self.dht.set_own(now, own);
        } else {
            self.dht.set_own_quietly(own);
        }
        let verified: Vec<u32> = self
            .links
            .values()
            .filter(|l| l.verified.is_some())
            .map(|l| l.index)
            .collect();
        for i in verified {
            if let Some(l) = self.links.get_mut(&i) {
                l.hello.our_record_changed();
            }
            self.send_hello(i, now);
        }
    }

    /// Adds a node remembered from an earlier run (its record is checked;
    /// expired or forged ones are refused).
    pub fn add_stored_peer(&mut self, now: Instant, record: &[u8]) -> bool {
        match self.dht.contact_from(now, record) {
            Ok(c) if c.info.id != self.node_id() => {
                // A peer the config names is "config" whatever the store
                // remembered it as.
                let configured = self.config.peers.iter().any(|p| p.uri.node_id == c.info.id);
                let source = if configured {
                    Source::Config
                } else {
                    Source::Store
                };
                self.dht.add_contact(now, c, source);
                true
            }
            _ => false,
        }
    }

    /// Links to a node found on the LAN (not kept up like configured peers).
    pub fn add_lan_peer(&mut self, now: Instant, uri: &PeerUri, endpoint: SocketAddr) {
        let addr = uri.node_id.overlay_address();
        if uri.node_id == self.node_id() || self.links.index_of_addr(&addr).is_some() {
            return;
        }
        // Announcements are unauthenticated: each costs us a handshake, so
        // act on one a second at most.
        if self
            .last_lan
            .is_some_and(|t| now.saturating_duration_since(t) < LAN_INTERVAL)
        {
            return;
        }
        self.last_lan = Some(now);
        if let Some(idx) = self.add_link(uri.link_key, Some(endpoint), Some(uri.node_id), now) {
            self.name_addr(addr, idx);
            if let Some(l) = self.links.get_mut(&idx) {
                l.source = Source::Lan;
            }
            tracing::info!(node = %uri.node_id.short(), %endpoint, "node found on the LAN");
            self.send_hello(idx, now);
        }
    }

    /// Starts a lookup for the control API; collect it with
    /// [`Node::take_api_result`].
    pub fn api_lookup(&mut self, now: Instant, target: &LookupTarget) -> Option<u64> {
        let prefix = match target {
            LookupTarget::Id(id) => id.0.to_vec(),
            LookupTarget::Address(a) => a.octets()[1..16].to_vec(),
        };
        let goal = Goal::Node {
            prefix,
            min_seq: 0,
            reachable: false,
        };
        self.api_start(now, goal)
    }

    pub(super) fn api_start(&mut self, now: Instant, goal: Goal) -> Option<u64> {
        let id = self.dht.lookup(now, goal)?;
        self.purposes.insert(id, Purpose::Api);
        self.pump_dht(now);
        Some(id)
    }

    /// A finished control-API lookup, put or get.
    pub fn take_api_result(&mut self, id: u64) -> Option<LookupDone> {
        self.api_results.remove(&id)
    }

    /// Signs and publishes a value under (namespace, key) for `ttl`
    /// seconds: [`Node::value_stamp`], signing, [`Node::put_signed_value`]
    /// in one call, for callers that don't mind the node waiting on RSA.
    pub fn dht_put(
        &mut self,
        now: Instant,
        namespace: &[u8],
        key: &[u8],
        value: &[u8],
        ttl: u64,
    ) -> Result<Option<u64>, PutError> {
        let (seq, expires) = self.value_stamp(now, ttl)?;
        let v = SignedValue::sign(self.own.identity(), namespace, key, value, seq, expires)?;
        self.put_signed_value(now, &v)
    }

    /// The signing key for [`SignedValue::sign`] and [`SignJob`]s, so the
    /// shell can sign off the node (and off whatever lock guards it).
    pub fn signer(&self) -> Arc<Identity> {
        self.own.identity().clone()
    }

    /// The next signature this node needs (see [`SignJob`]): the node's
    /// own record first, then circuits' AUTHs.
    pub fn poll_sign(&mut self) -> Option<SignJob> {
        if let Some(job) = self.own.take_job() {
            return Some(SignJob {
                what: Signing::Record { seq: job.seq },
                message: job.message,
            });
        }
        self.poll_auth_job()
    }

    /// Whether `job` is still wanted: a signer with a backlog skips the
    /// jobs nobody waits for any more.
    pub fn wants_signature(&self, job: &SignJob) -> bool {
        match job.what {
            Signing::Auth { circuit } => self.wants_auth(circuit, &job.message),
            Signing::Record { seq } => self.own.wants(seq, &job.message),
        }
    }

    /// The signature for `job`, made with [`Node::signer`]: sends the AUTH
    /// it was for, or spreads the record it completes.
    pub fn signed(&mut self, now: Instant, job: &SignJob, signature: &[u8]) {
        match job.what {
            Signing::Auth { circuit } => self.auth_signed(now, circuit, &job.message, signature),
            Signing::Record { seq } => {
                if self.own.install(seq, &job.message, signature).is_some() {
                    self.spread_record(now);
                    self.pump_dht(now);
                }
            }
        }
    }

    /// Whether a value of ours under (`namespace`, `key`) would be taken
    /// (see [`crate::proto::dht::MAX_OWN_VALUES`]): asked before signing.
    pub fn own_value_fits(
        &mut self,
        now: Instant,
        namespace: &[u8],
        key: &[u8],
    ) -> Result<(), crate::proto::dht::RecordError> {
        self.dht.own_value_fits(now, &value_target(namespace, key))
    }

    /// The sequence number and expiry (unix seconds) of the next value this
    /// node publishes with a lifetime of `ttl` seconds.
    pub fn value_stamp(
        &mut self,
        now: Instant,
        ttl: u64,
    ) -> Result<(u64, u64), crate::proto::records::ValueError> {
        if ttl == 0 || ttl > crate::proto::records::MAX_VALUE_TTL {
            return Err(crate::proto::records::ValueError::Ttl);
        }
        // Milliseconds, so a burst of puts doesn't run ahead of the clock
        // (and a quick restart doesn't sign values older than those stored).
        self.value_seq = self
            .value_seq
            .saturating_add(1)
            .max(self.dht.unix_millis(now));
        Ok((self.value_seq, self.dht.unix(now) + ttl))
    }

    /// Stores and publishes a value this node signed with
    /// [`Node::signer`] (see [`Node::value_stamp`]); the lookup ID to wait
    /// on, if it went out.
    ///
    /// A value under this node's key is taken as signed by it and not
    /// verified again (an RSA verification, some tens of microseconds, that
    /// would run under whatever lock guards the node); any other goes
    /// through the DHT's full check. Crate-only for that reason: a value
    /// parsed from elsewhere must never come here.
    pub(crate) fn put_signed_value(
        &mut self,
        now: Instant,
        value: &SignedValue,
    ) -> Result<Option<u64>, PutError> {
        let bytes = value.to_bytes();
        if value.public_der == self.own.identity().public_der() {
            let info = ValueInfo {
                target: value_target(&value.namespace, &value.key),
                publisher: self.own.identity().node_id(),
                seq: value.seq,
                expires: value.expires,
            };
            self.dht.records().vouch_value(&bytes, info);
        }
        let id = self.dht.put(now, &bytes)?;
        if let Some(id) = id {
            self.purposes.insert(id, Purpose::Api);
        }
        self.pump_dht(now);
        Ok(id)
    }

    /// Looks up the values under (namespace, key).
    pub fn dht_get(&mut self, now: Instant, namespace: &[u8], key: &[u8]) -> Option<u64> {
        self.api_start(now, Goal::Values(value_target(namespace, key)))
    }

    /// Values stored on this node under (namespace, key).
    pub fn local_values(&self, now: Instant, namespace: &[u8], key: &[u8]) -> Vec<Arc<[u8]>> {
        self.dht.local_values(now, &value_target(namespace, key))
    }

    /// Every value record this node keeps (its own and those it holds for
    /// others), for the node's store.
    pub fn value_records(&self, now: Instant) -> Vec<Arc<[u8]>> {
        self.dht.value_records(now)
    }

    /// Takes back a value record kept by an earlier run (checked like one
    /// from the network; this node's own are published again on joining).
    pub fn restore_value(&mut self, now: Instant, record: &[u8]) -> bool {
        self.dht.restore_value(now, record)
    }
}
