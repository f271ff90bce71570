//! Control messages on a link, in the node: their framing (one frame, or
//! segments through the message layer), DHT messages handed to the DHT,
//! and hellos, where the node acts on what the hello part
//! ([`super::hello`]) decides.

use super::hello::{check_record, Claim, Hello, LinkFacts, RecordRejected};
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
            link.chan.last_used = now;
            self.dht.handle_message(now, &c, body);
            self.pump_dht(now);
            return;
        }
        match (ty, Hello::parse(body)) {
            (MSG_HELLO, Some(h)) => self.handle_hello(now, index, src, h),
            _ => {
                if let Some(l) = self.links.get_mut(&index) {
                    l.drops.bad_inner += 1;
                }
            }
        }
    }

    /// A hello from the neighbour on link `index`, sent from `src`.
    fn handle_hello(&mut self, now: Instant, index: u32, src: Ipv6Addr, hello: Hello<'_>) {
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        let known = link
            .verified
            .as_ref()
            .is_some_and(|v| v.record_bytes == hello.record);
        if !known {
            // A verification costs RSA work: budgeted per link.
            if !link.hello.may_verify(now) {
                link.drops.hello_limited += 1;
                return;
            }
            let verified = match self.verify_hello(index, src, hello.record) {
                Ok(v) => v,
                Err(why) => {
                    tracing::warn!(link = index, "rejected neighbour record: {why}");
                    if let Some(l) = self.links.get_mut(&index) {
                        l.drops.bad_record += 1;
                    }
                    return;
                }
            };
            if !self.take_record(now, index, verified) {
                return;
            }
        }
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        link.hello.heard(hello.ack);
        if let (Some(ep), Some(v)) = (hello.observed, &link.verified) {
            let reporter = v.record.node_id();
            self.own.note_observed(now, ep, reporter);
        }
        if hello.reply {
            self.send_hello(index, now);
        }
    }

    /// Verifies a record a neighbour presents (the signature through the
    /// DHT's cache: a record it verified in a lookup reply costs no second
    /// RSA check here, and `contact_from` later finds this one verified),
    /// then judges it against what the link is ([`check_record`]).
    fn verify_hello(
        &mut self,
        index: u32,
        src: Ipv6Addr,
        rec_bytes: &[u8],
    ) -> Result<Verified, RecordRejected> {
        let record = self.dht.records().verified_record(rec_bytes)?;
        let link = &self.links[&index];
        let facts = LinkFacts {
            peer_key: link.peer_key,
            configured: link.configured,
            holds: link
                .verified
                .as_ref()
                .map(|v| (v.record.node_id(), v.record.seq)),
        };
        check_record(&record, &facts, src, self.node_id())?;
        Ok(Verified {
            address: record.overlay_address(),
            record,
            record_bytes: rec_bytes.to_vec(),
            contact: None,
        })
    }

    /// Makes a verified record the link's, unless access rules or a newer
    /// record on another link say no (then false; the link may be gone).
    fn take_record(&mut self, now: Instant, index: u32, mut v: Verified) -> bool {
        let addr = v.address;
        let id = v.record.node_id();
        let ip = self
            .links
            .get(&index)
            .and_then(|l| l.chan.endpoint)
            .map(|e| e.ip());
        if !self.config.access.link.admits(ip, &id) {
            tracing::debug!(link = index, node = %id.short(), "link closed: denied by [access]");
            self.drops.access_denied += 1;
            self.remove_link(now, index);
            return false;
        }
        let other = self.links.index_of_addr(&addr).map(|o| {
            let seq = self
                .links
                .get(&o)
                .and_then(|l| l.verified.as_ref())
                .map(|v| v.record.seq);
            (o, seq)
        });
        match Claim::judge(index, other, v.record.seq) {
            Claim::Free => {}
            Claim::Kept(_) => {
                if let Some(l) = self.links.get_mut(&index) {
                    l.drops.stale_record += 1;
                }
                return false;
            }
            Claim::Replaces(other) => {
                let configured = self.links.get(&other).and_then(|l| l.configured);
                self.remove_link(now, other);
                if let Some(l) = self.links.get_mut(&index) {
                    l.configured = l.configured.or(configured);
                }
            }
        }
        let compress = self.config.compression.allows(&id);
        v.contact = self.dht.contact_from(now, &v.record_bytes).ok();
        let contact = v.contact.clone();
        let Some(link) = self.links.get_mut(&index) else {
            return false;
        };
        let first = link.verified.is_none();
        link.verified = Some(v);
        link.chan.compress = compress;
        if link.chan.handed() {
            self.handoff
                .tell(plane::ToPlane::SetCompress(index, compress));
        }
        let source = link.source;
        let on_demand = link.opened_on_demand();
        self.name_addr(addr, index);
        self.resolver.fresh(&addr);
        if let Some(c) = contact {
            // A node that proved its record over a live link is the best
            // kind of routing-table entry.
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
        true
    }

    pub(super) fn send_hello(&mut self, index: u32, now: Instant) {
        let Some(link) = self.links.get_mut(&index) else {
            return;
        };
        // Where we see the neighbour: how a node with no configured
        // endpoint learns what to publish in its record.
        let hello = link.hello.say(
            now,
            link.verified.is_some(),
            link.chan.endpoint,
            self.own.bytes(),
        );
        let mut body = Vec::with_capacity(20 + hello.record.len());
        hello.emit(&mut body);
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
            if link.chan.handed() {
                let frame = std::mem::take(&mut self.bufs.ctl);
                self.plane_seal(index, &frame[..n]);
                self.bufs.ctl = frame;
            } else if link.chan.endpoint.is_some() {
                let _ = link.chan.seal(&mut self.out, &self.bufs.ctl[..n]);
            } else {
                // Nowhere to send it yet: boringtun keeps the message for
                // the session's first handshake.
                link.chan.hold(&self.bufs.ctl[..n], &mut self.bufs.a);
            }
        }
    }
}
