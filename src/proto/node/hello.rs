//! Messages between linked neighbours: the hello that carries each side's
//! signed record (verified before a link carries traffic) and the framing
//! of control messages (DHT, circuits) on a link.

use super::*;
use crate::proto::identity::{parse_endpoint, put_endpoint};

/// Hello flag: the sender holds a verified record of the receiver.
const FLAG_ACK: u8 = 1;
/// Hello flag: "I don't know that you have my record: answer".
const FLAG_REPLY: u8 = 2;
/// Hello flag: an observed-endpoint field follows the flags.
const FLAG_OBSERVED: u8 = 4;

/// A hello's body ([`MSG_HELLO`]): one byte of flags, the endpoint the
/// sender sees the receiver at (if the flag says so), then the sender's
/// signed record (checked by the receiver, not here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hello<'a> {
    /// The sender holds a verified record of the receiver.
    pub(super) ack: bool,
    /// The sender wants a hello back.
    pub(super) reply: bool,
    /// Where the sender sees the receiver.
    pub(super) observed: Option<SocketAddr>,
    /// The sender's signed record.
    pub(super) record: &'a [u8],
}

impl<'a> Hello<'a> {
    /// Reads a hello body (hostile bytes): None if it is empty or its
    /// endpoint field is cut short or malformed. Unknown flags are ignored.
    pub(super) fn parse(body: &'a [u8]) -> Option<Hello<'a>> {
        let (&flags, rest) = body.split_first()?;
        let (observed, record) = if flags & FLAG_OBSERVED != 0 {
            let (ep, record) = parse_endpoint(rest)?;
            (Some(ep), record)
        } else {
            (None, rest)
        };
        Some(Hello {
            ack: flags & FLAG_ACK != 0,
            reply: flags & FLAG_REPLY != 0,
            observed,
            record,
        })
    }

    /// Appends the body to `out`.
    pub(super) fn emit(&self, out: &mut Vec<u8>) {
        let flag = |on: bool, f: u8| if on { f } else { 0 };
        let flags = flag(self.ack, FLAG_ACK)
            | flag(self.reply, FLAG_REPLY)
            | flag(self.observed.is_some(), FLAG_OBSERVED);
        out.push(flags);
        if let Some(ep) = self.observed {
            put_endpoint(out, ep);
        }
        out.extend_from_slice(self.record);
    }
}

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
        let hello = match (ty, Hello::parse(body)) {
            (MSG_HELLO, Some(h)) => h,
            _ => {
                if let Some(l) = self.links.get_mut(&index) {
                    l.drops.bad_inner += 1;
                }
                return;
            }
        };
        let (ack, observed, rec_bytes) = (hello.ack, hello.observed, hello.record);
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
        if hello.reply {
            self.send_hello(index, now);
        }
    }

    pub(super) fn verify_hello(
        &mut self,
        index: u32,
        src: Ipv6Addr,
        rec_bytes: &[u8],
    ) -> Result<Verified, String> {
        // Through the DHT's cache: a record it verified in a lookup reply
        // costs no second RSA check here, and `contact_from` below finds
        // this one verified.
        let record = self
            .dht
            .records()
            .verified_record(rec_bytes)
            .map_err(|e| e.to_string())?;
        let link = &self.links[&index];
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
        // Where we see the neighbour: how a node with no configured
        // endpoint learns what to publish in its record.
        let hello = Hello {
            ack: link.verified.is_some(),
            reply: !link.they_have_ours,
            observed: link.endpoint,
            record: self.own.bytes(),
        };
        let mut body = Vec::with_capacity(20 + hello.record.len());
        hello.emit(&mut body);
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
            match link.endpoint {
                Some(ep) => {
                    let _ = seal_batch(&mut self.out, &mut link.tunn, &self.bufs.ctl[..n], ep);
                }
                // Nowhere to send it yet: boringtun keeps the message for
                // the session's first handshake (the initiation it returns
                // has nowhere to go either).
                None => {
                    let _ = link.tunn.encapsulate(&self.bufs.ctl[..n], &mut self.bufs.a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_round_trip_and_cut_ones_are_refused() {
        let record = [9u8; 40];
        for observed in [
            None,
            Some("198.18.0.1:7300".parse().unwrap()),
            Some("[2001:db8::1]:7300".parse().unwrap()),
        ] {
            for (ack, reply) in [(false, false), (true, false), (false, true), (true, true)] {
                let h = Hello {
                    ack,
                    reply,
                    observed,
                    record: &record,
                };
                let mut body = Vec::new();
                h.emit(&mut body);
                assert_eq!(Hello::parse(&body), Some(h));
                if observed.is_some() {
                    // The endpoint field cut short.
                    assert_eq!(Hello::parse(&body[..3]), None);
                }
            }
        }
        assert_eq!(Hello::parse(&[]), None);
    }
}
