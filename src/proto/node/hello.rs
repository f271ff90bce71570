//! Messages between linked neighbours: the hello that carries each side's
//! signed record (verified before a link carries traffic) and the framing
//! of control messages (DHT, circuits) on a link.

use super::*;

impl Node {
    pub(super) fn handle_control(
        &mut self,
        now: Instant,
        index: u32,
        src: Ipv6Addr,
        ty: u8,
        body: &[u8],
    ) {
        if ty == message::MSG_SEGMENT {
            let Some(link) = self.links.get_mut(&index) else {
                return;
            };
            match link.reassembler.push(now, body) {
                // The inner type is never a segment (parse_segment refuses
                // that), so this recursion is one level deep.
                Ok(Some((inner, whole))) => self.handle_control(now, index, src, inner, &whole),
                Ok(None) => {}
                Err(_) => link.drops.bad_inner += 1,
            }
            return;
        }
        if ty == MSG_DHT {
            let Some(link) = self.links.get_mut(&index) else {
                return;
            };
            let Some(c) = link.verified.as_ref().and_then(|v| v.contact.clone()) else {
                link.drops.unverified += 1;
                return;
            };
            link.last_used = now;
            self.dht.handle_message(now, &c, body);
            self.pump_dht(now);
            return;
        }
        if ty != MSG_HELLO || body.is_empty() {
            if let Some(l) = self.links.get_mut(&index) {
                l.drops.bad_inner += 1;
            }
            return;
        }
        let ack = body[0] & HELLO_FLAG_ACK != 0;
        let (observed, rec_bytes) = if body[0] & HELLO_FLAG_OBSERVED != 0 {
            match parse_endpoint(&body[1..]) {
                Some((ep, rest)) => (Some(ep), rest),
                None => {
                    if let Some(l) = self.links.get_mut(&index) {
                        l.drops.bad_inner += 1;
                    }
                    return;
                }
            }
        } else {
            (None, &body[1..])
        };
        let link = match self.links.get_mut(&index) {
            Some(l) => l,
            None => return,
        };
        let known = link
            .verified
            .as_ref()
            .is_some_and(|v| v.record_bytes == rec_bytes);
        if !known {
            // A verification costs RSA work: at most one per second per link.
            if link
                .last_verify
                .is_some_and(|t| now.saturating_duration_since(t) < VERIFY_INTERVAL)
            {
                link.drops.hello_limited += 1;
                return;
            }
            link.last_verify = Some(now);
            match self.verify_hello(index, src, rec_bytes) {
                Ok(v) => {
                    let addr = v.address;
                    let id = v.record.node_id();
                    let ip = self
                        .links
                        .get(&index)
                        .and_then(|l| l.endpoint)
                        .map(|e| e.ip());
                    if !self.config.access.link.admits(ip, &id) {
                        tracing::debug!(link = index, node = %id.short(), "link closed: denied by [access]");
                        self.drops.access_denied += 1;
                        self.remove_link(index);
                        return;
                    }
                    // Another link already speaking for this address: the
                    // newer record wins (a node may have replaced its link key).
                    if let Some(other) = self.links.index_of_addr(&addr) {
                        if other != index {
                            let other_seq = self
                                .links
                                .get(&other)
                                .and_then(|l| l.verified.as_ref())
                                .map(|v| v.record.seq);
                            match other_seq {
                                Some(s) if s >= v.record.seq => {
                                    if let Some(l) = self.links.get_mut(&index) {
                                        l.drops.stale_record += 1;
                                    }
                                    return;
                                }
                                _ => {
                                    let configured =
                                        self.links.get(&other).and_then(|l| l.configured);
                                    self.remove_link(other);
                                    if let Some(l) = self.links.get_mut(&index) {
                                        l.configured = l.configured.or(configured);
                                    }
                                }
                            }
                        }
                    }
                    let compress = self.config.compression.allows(&id);
                    let mut v = v;
                    v.contact = self.dht.contact_from(now, rec_bytes).ok();
                    let contact = v.contact.clone();
                    let Some(link) = self.links.get_mut(&index) else {
                        return;
                    };
                    let first = link.verified.is_none();
                    link.verified = Some(v);
                    link.compress = compress;
                    let source = link.source;
                    let on_demand = link.opened_on_demand();
                    self.links.name_addr(addr, index);
                    self.resolver.fresh(&addr);
                    if let Some(c) = contact {
                        // A node that proved its record over a live link
                        // is the best kind of routing-table entry.
                        self.dht.heard_from(now, c, source);
                    }
                    if first {
                        if on_demand {
                            tracing::debug!(link = index, node = %id.short(), %addr, "neighbour verified");
                        } else {
                            tracing::info!(link = index, node = %id.short(), %addr, "neighbour verified");
                        }
                        self.flush_pending(now, index);
                    }
                }
                Err(why) => {
                    tracing::warn!(link = index, "rejected neighbour record: {why}");
                    if let Some(l) = self.links.get_mut(&index) {
                        l.drops.bad_record += 1;
                    }
                    return;
                }
            }
        }
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        link.they_have_ours = ack;
        if let (Some(ep), Some(v)) = (observed, &link.verified) {
            let reporter = v.record.node_id();
            self.own.note_observed(now, ep, reporter);
        }
        if body[0] & HELLO_FLAG_REPLY != 0 {
            self.send_hello(index, now);
        }
    }

    pub(super) fn verify_hello(
        &self,
        index: u32,
        src: Ipv6Addr,
        rec_bytes: &[u8],
    ) -> Result<Verified, String> {
        let link = &self.links[&index];
        let record = NodeRecord::parse_verified(rec_bytes).map_err(|e| e.to_string())?;
        // The record must name the very key the tunnel authenticated, or
        // anyone could replay someone else's public record.
        if record.link_key != link.peer_key {
            return Err("record's link key is not the key this link authenticated".into());
        }
        if let Some(id) = link.configured {
            if record.node_id() != id {
                return Err(format!(
                    "record is for node {}, configured {}",
                    record.node_id().short(),
                    id.short()
                ));
            }
        }
        if record.overlay_address() != src {
            return Err("hello sent from an address that is not the record's".into());
        }
        if record.node_id() == self.node_id() {
            return Err("record is our own".into());
        }
        if let Some(v) = &link.verified {
            if record.node_id() != v.record.node_id() {
                return Err("link already speaks for another node".into());
            }
            if record.seq < v.record.seq {
                return Err("record is older than the one we hold".into());
            }
        }
        Ok(Verified {
            address: record.overlay_address(),
            record,
            record_bytes: rec_bytes.to_vec(),
            contact: None,
        })
    }

    pub(super) fn send_hello(&mut self, index: u32, now: Instant) {
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        let mut body = Vec::with_capacity(20 + self.own.bytes().len());
        let mut flags = 0;
        if link.verified.is_some() {
            flags |= HELLO_FLAG_ACK;
        }
        if !link.they_have_ours {
            flags |= HELLO_FLAG_REPLY;
        }
        if link.endpoint.is_some() {
            flags |= HELLO_FLAG_OBSERVED;
        }
        body.push(flags);
        if let Some(ep) = link.endpoint {
            // Where we see the neighbour: how a node with no configured
            // endpoint learns what to publish in its record.
            put_endpoint(&mut body, ep);
        }
        body.extend_from_slice(self.own.bytes());
        link.last_hello = Some(now);
        self.send_control(index, MSG_HELLO, &body, false);
    }

    /// Sends a control message to a neighbour: in one frame when it fits a
    /// segment, else (or when `segmented`) through the message layer.
    pub(super) fn send_control(&mut self, index: u32, ty: u8, body: &[u8], segmented: bool) {
        let Some(link) = self.links.get(&index) else {
            return;
        };
        let dst = link
            .verified
            .as_ref()
            .map(|v| v.address)
            .or(link.configured.map(|id| id.overlay_address()))
            .unwrap_or(Ipv6Addr::UNSPECIFIED);
        let frames: Vec<(u8, Vec<u8>)> = if !segmented && body.len() <= message::SEGMENT_PAYLOAD {
            vec![(ty, body.to_vec())]
        } else {
            match self.segmenter.segment(ty, body) {
                Ok(segs) => segs
                    .into_iter()
                    .map(|s| (message::MSG_SEGMENT, s))
                    .collect(),
                Err(e) => {
                    tracing::warn!(link = index, "control message not sent: {e}");
                    return;
                }
            }
        };
        for (t, b) in frames {
            let n = wire::encode_control(self.address, dst, t, &b, &mut self.bufs.ctl);
            let Some(link) = self.links.get_mut(&index) else {
                return;
            };
            if let TunnResult::WriteToNetwork(out) =
                link.tunn.encapsulate(&self.bufs.ctl[..n], &mut self.bufs.a)
            {
                if let Some(ep) = link.endpoint {
                    self.transmits.push_back(Transmit {
                        dst: ep,
                        payload: reuse(&mut self.spare, out),
                    });
                }
            }
        }
    }
}
