//! The link table: making and removing links (the caps on links and on
//! links not yet verified), and every datagram from the UDP socket — the
//! handshake gate's verdict (`gate.rs`), the first Diffie-Hellman, then
//! the link's [`Channel`] (`channel.rs`); the per-link timers.

use super::channel::{Channel, Opened, Setup, Tick};
use super::gate;
use super::hello::HelloState;
use super::table::Room;
use super::*;

impl Node {
    pub(super) fn add_link(
        &mut self,
        peer_key: [u8; 32],
        endpoint: Option<SocketAddr>,
        configured: Option<NodeId>,
        now: Instant,
    ) -> Option<u32> {
        if let Some(idx) = self.links.index_of_key(&peer_key) {
            return Some(idx);
        }
        if configured.is_none() {
            // An inbound link from a node not yet verified: capped apart
            // (see `LinkTable::room_unverified`).
            let cap = self.max_unverified();
            let room = self
                .links
                .room_unverified(endpoint, now, cap, UNVERIFIED_GRACE);
            // Not logged: a flood of handshakes would fill the log.
            if !self.make_room(now, room, false) {
                return None;
            }
        }
        // Full: the link unused longest makes room, if it has been idle a
        // while; else the new one is refused (see `LinkTable::room`).
        let room = self
            .links
            .room(now, self.config.max_links, LRU_IDLE, configured.is_none());
        if !self.make_room(now, room, true) {
            return None;
        }
        let keepalive = (self.config.keepalive > 0).then_some(self.config.keepalive);
        let compress = configured
            .map(|id| self.config.compression.allows(&id))
            .unwrap_or(self.config.compression.enabled);
        let setup = Setup {
            secret: self.own.identity().link_secret().clone(),
            keepalive,
            limiter: self.gate.link_limiter(),
            mtu: self.config.mtu,
        };
        let index = self.links.insert(peer_key, |index| Link {
            index,
            chan: Channel::new(setup, index, peer_key, endpoint, compress, now),
            peer_key,
            configured,
            persistent: false,
            source: Source::Network,
            pending_ctl: VecDeque::new(),
            verified: None,
            hello: HelloState::default(),
            last_reconnect: None,
            last_cookie_retry: None,
            reconnect_attempts: 0,
            pending: VecDeque::new(),
            reassembler: Reassembler::default(),
            session_up: false,
            expired: false,
            created: now,
            drops: Drops::default(),
        });
        Some(index)
    }

    /// Acts on the link table's answer to "is there room?": removes the
    /// link that must make room (counted as a `link_limit` drop, as is a
    /// refusal; logged if `log`). Returns whether the new link fits.
    fn make_room(&mut self, now: Instant, room: Room, log: bool) -> bool {
        match room {
            Room::Free => true,
            Room::Evict(i) => {
                self.drops.link_limit += 1;
                self.drop_link(now, i, log);
                true
            }
            Room::Full => {
                self.drops.link_limit += 1;
                false
            }
        }
    }

    /// Most links not yet verified at once.
    pub(super) fn max_unverified(&self) -> usize {
        (self.config.max_links / 4).max(MIN_UNVERIFIED_LINKS)
    }

    /// Removes a link that made room or failed its handshake (not logged:
    /// a flood would fill the log).
    pub(super) fn remove_link_quietly(&mut self, now: Instant, index: u32) {
        self.drop_link(now, index, false);
    }

    pub(super) fn remove_link(&mut self, now: Instant, index: u32) {
        self.drop_link(now, index, true);
    }

    fn drop_link(&mut self, now: Instant, index: u32, log: bool) {
        if let Some(link) = self.links.remove(index) {
            self.withdraw(&link);
            if log {
                tracing::info!(link = index, node = ?link.node_id(), "link removed");
            }
            // The real `now`: circuits rebuilt here time their steps from it.
            self.circuits_link_gone(now, index);
        }
    }

    /// Handles one datagram from the UDP socket. Returns a packet to write
    /// to the TUN, if the datagram carried one. Queued replies (handshake
    /// responses, hellos) are drained with [`Node::poll_transmit`].
    ///
    /// The simulator's and the tests' entry; the data path uses
    /// [`Node::receive`], which decrypts into the caller's buffer.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Option<&[u8]> {
        let mut buf = std::mem::take(&mut self.bufs.alt);
        let inner = self.receive_inner(now, from, datagram, &mut buf);
        self.bufs.alt = buf;
        match inner? {
            Inner::InPlace(n) => Some(&self.bufs.alt[..n]),
            Inner::Rebuilt(n) => Some(&self.bufs.b[..n]),
        }
    }

    /// Handles one datagram from the UDP socket, as
    /// [`Node::handle_datagram`] does, but decrypts a data message into
    /// `buf` (which must be at least as long as the datagram; a shorter one
    /// drops it): its packet for the TUN is then usually `buf[..n]` and
    /// needs no copy (the shell passes the space behind the TUN's
    /// virtio-net header).
    pub fn receive<'a>(
        &'a mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
    ) -> Option<Delivered<'a>> {
        match self.receive_inner(now, from, datagram, buf)? {
            Inner::InPlace(n) => Some(Delivered::InPlace(n)),
            Inner::Rebuilt(n) => Some(Delivered::Rebuilt(&self.bufs.b[..n])),
        }
    }

    fn receive_inner(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
    ) -> Option<Inner> {
        // boringtun panics if its output buffer is shorter than the
        // datagram: `bufs.a` holds MAX_DATAGRAM, the caller's buffer what
        // it holds, so refuse anything larger.
        if datagram.len() > MAX_DATAGRAM || datagram.len() > buf.len() {
            self.drops.malformed += 1;
            return None;
        }
        let from = normalize(from);
        let mut cookie_reply = false;
        let mut data = false;
        let index = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => {
                // Garbage costs its source budget too, so a source that
                // sends it is throttled in everything it sends.
                if self.gate.charge(now, from.ip()) {
                    self.drops.malformed += 1;
                } else {
                    self.drops.rate_limited += 1;
                }
                return None;
            }
            Ok(Packet::HandshakeInit(init)) => self.admit_initiation(now, from, datagram, &init)?,
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(p)) => {
                cookie_reply = true;
                p.receiver_idx >> 8
            }
            Ok(Packet::PacketData(p)) => {
                data = true;
                p.receiver_idx >> 8
            }
        };
        let Some(link) = self.links.get_mut(&index) else {
            if self.gate.charge(now, from.ip()) {
                self.drops.unknown_session += 1;
            } else {
                self.drops.rate_limited += 1;
            }
            return None;
        };
        // Session traffic from where the neighbour is known to be costs no
        // budget (so established links keep working through a flood); from
        // anywhere else it is unauthenticated work like a handshake. (An
        // initiation was charged in `admit_initiation`, and its
        // link's endpoint is where it came from.)
        if link.chan.endpoint != Some(from) && !self.gate.charge(now, from.ip()) {
            self.drops.rate_limited += 1;
            return None;
        }
        if self.handed(index) {
            // The plane holds the session: an initiation, or a datagram
            // from a new endpoint, that the gate let through.
            self.plane_admit(index);
            return None;
        }
        let link = self.links.get_mut(&index)?;
        // A link created for this very handshake (see
        // `admit_initiation`) is kept only if the handshake holds.
        let fresh = link.configured.is_none() && link.verified.is_none() && !link.session_up;
        // A data message is opened into the caller's buffer (it needs no
        // more room than the datagram). A handshake goes to `bufs.a`: its
        // answer may be followed by the packets that waited for it, each
        // as large as a packet can be.
        let dst: &mut [u8] = if data { &mut *buf } else { &mut self.bufs.a };
        let inner_len = match link.chan.open(from, datagram, dst, &mut self.transmits) {
            Opened::Authentic(n) => n,
            Opened::Ipv4 => {
                link.drops.bad_inner += 1;
                None
            }
            not_authentic => {
                if let Opened::Refused(why) = not_authentic {
                    why.count(&mut link.drops);
                }
                if fresh && link.chan.handshake_age().is_none() {
                    self.remove_link_quietly(now, index);
                }
                return None;
            }
        };
        if cookie_reply {
            // The neighbour is under load and asked for proof that we
            // receive at our address: boringtun kept the cookie, and the
            // next initiation carries it (mac2). Send that one now rather
            // than at the next retry (1 to 5 s away), at most once per
            // `COOKIE_RETRY` per link, and only to the neighbour's known
            // endpoint. A cookie reply decrypts only with the MAC of our
            // last initiation, so a blind attacker can't make one; but
            // whoever saw that initiation (the path, the neighbour) can,
            // until we send the next. Answered anywhere, a reply forged
            // from elsewhere would draw each new initiation to the forger,
            // who could then repeat it and keep the real handshake from
            // being retried.
            if link.chan.endpoint == Some(from)
                && link
                    .last_cookie_retry
                    .is_none_or(|t| now.saturating_duration_since(t) >= COOKIE_RETRY)
            {
                link.last_cookie_retry = Some(now);
                link.chan
                    .initiate(from, true, &mut self.bufs.b, &mut self.transmits);
            }
            return None;
        }
        let was_up = link.session_up;
        link.session_up = link.chan.handshake_age().is_some();
        link.expired = false;
        link.chan.last_rx = now;
        if link.chan.endpoint != Some(from) {
            if link.chan.endpoint.is_some() {
                tracing::info!(link = index, old = ?link.chan.endpoint, new = %from, "neighbour moved to a new endpoint");
            }
            link.chan.endpoint = Some(from);
            link.chan.mtu = self.config.mtu;
        }
        if !was_up && link.session_up {
            link.reconnect_attempts = 0;
            // No hello here: a responder can't send before the initiator's
            // first data message, and the initiator's queued hello is that
            // message. A restarted neighbour says so with an un-acked hello.
            // A link this node opened on demand carries its own traffic:
            // its far end is a destination, named at debug only (README,
            // *Logs*); configured and inbound links are logged at info.
            if link.opened_on_demand() {
                tracing::debug!(link = index, endpoint = %from, node = ?link.node_id(), "link session established");
            } else {
                tracing::info!(link = index, endpoint = %from, node = ?link.node_id(), "link session established");
            }
        }
        let n = inner_len?;
        if !data {
            // boringtun only hands out a packet for the TUN from a data
            // message; were that ever to change, it would be in `bufs.a`.
            return None;
        }
        self.handle_inner(now, index, buf, n)
    }

    /// One link's part of the timer sweep (see [`Node::handle_timeout_some`]).
    pub(super) fn link_timers(&mut self, now: Instant, index: u32) -> LinkFate {
        let Some(link) = self.links.get_mut(&index) else {
            return LinkFate::Keep;
        };
        // boringtun's timers emit at most one datagram per call.
        if let Tick::Expired =
            link.chan
                .tick(&mut self.bufs.a, &mut self.transmits, &mut self.spare)
        {
            if !link.expired {
                tracing::info!(link = index, node = ?link.node_id(), "link session expired");
            }
            link.expired = true;
            link.session_up = false;
        }
        link.reassembler.expire(now);
        let up = link.chan.handshake_age().is_some() && !link.expired;
        if link.session_up && !up {
            link.session_up = false;
        }
        // A neighbour that restarted has forgotten our session and
        // silently drops what we send; WireGuard alone notices only when
        // data (not keepalives) goes unanswered, or at the next rekey two
        // minutes on. Keepalives make silence a signal: nothing heard for
        // a keepalive period plus grace means a new handshake.
        // Only for links this node wants (configured, or opened for its
        // own traffic): a neighbour that opened a link to us and went
        // quiet closed it or will link again itself, and its link here
        // goes once it counts as gone.
        let silence = Duration::from_secs(self.config.keepalive as u64) + SILENCE_GRACE;
        if self.config.keepalive > 0
            && (link.persistent || link.opened_on_demand())
            && link.session_up
            && now.saturating_duration_since(link.chan.last_rx) > silence
            && link
                .last_reconnect
                .is_none_or(|t| now.saturating_duration_since(t) >= silence)
        {
            if let Some(ep) = link.chan.endpoint {
                link.last_reconnect = Some(now);
                tracing::debug!(link = index, "neighbour silent, handshaking again");
                if link.chan.handed() {
                    self.handoff.tell(plane::ToPlane::Initiate(index, false));
                } else {
                    link.chan
                        .initiate(ep, false, &mut self.bufs.a, &mut self.transmits);
                }
            }
        }
        if link.persistent && !link.session_up {
            // Quick retries first (a peer started a moment after us),
            // then WireGuard's own pace.
            let interval = if link.reconnect_attempts < QUICK_RECONNECTS {
                QUICK_RECONNECT_INTERVAL
            } else {
                RECONNECT_INTERVAL
            };
            let due = link
                .last_reconnect
                .is_some_and(|t| now.saturating_duration_since(t) >= interval);
            if link.last_reconnect.is_none() {
                // The first initiation went out with the first hello.
                link.last_reconnect = Some(now);
            }
            if let (true, Some(ep)) = (due, link.chan.endpoint) {
                link.last_reconnect = Some(now);
                link.reconnect_attempts = link.reconnect_attempts.saturating_add(1);
                if link.chan.handed() {
                    self.handoff.tell(plane::ToPlane::Initiate(index, true));
                } else {
                    link.chan
                        .initiate(ep, true, &mut self.bufs.a, &mut self.transmits);
                }
            }
        }
        let hello_due = link.session_up && link.hello.due(now, link.verified.is_some());
        if !link.persistent {
            let age = now.saturating_duration_since(link.created);
            let idle = now.saturating_duration_since(link.chan.last_rx);
            let unused = now.saturating_duration_since(link.chan.last_used);
            // A link we made to a looked-up record that never came up:
            // the record may be stale, so the next lookup wants a newer one.
            let failed_connect =
                link.configured.is_some() && link.verified.is_none() && age > CONNECT_TIMEOUT;
            if failed_connect {
                if let Some(id) = link.configured {
                    let seq = self.dht.find_local(&id.0).map(|c| c.info.seq).unwrap_or(0);
                    let addr = id.overlay_address();
                    self.resolver.stale(now, addr, seq.saturating_add(1));
                }
            }
            // A neighbour gone quiet for good (it died, or came back
            // elsewhere): drop the link, so the next packet looks the
            // node up afresh rather than knocking at an old endpoint.
            let gone = link.verified.is_some() && self.config.keepalive > 0 && idle > GONE_AFTER;
            if gone {
                if let Some(v) = &link.verified {
                    let below = v.record.seq.saturating_add(1);
                    self.resolver.stale(now, v.address, below);
                }
            }
            // Unused links close only where this node opened them for
            // its own traffic. A link from a neighbour that keeps it
            // alive (its configured peer: it re-links within seconds)
            // stays until the neighbour goes quiet (`gone`, the idle
            // timeout) or a full table needs the room (`add_link`).
            // Closing those at ON_DEMAND_IDLE made every inbound link
            // of a busy node drop and come back every ~2 minutes.
            if failed_connect
                || gone
                || (link.verified.is_none() && age > UNVERIFIED_TIMEOUT)
                || idle > IDLE_TIMEOUT
                || (link.opened_on_demand() && unused > ON_DEMAND_IDLE)
            {
                return LinkFate::Remove;
            }
        }
        if hello_due {
            self.send_hello(index, now);
        }
        self.maybe_hand_off(index);
        LinkFate::Keep
    }

    /// Fuzzing and test hook (feature `test-hooks`): handles `packet` as if it had arrived,
    /// decrypted, on the link to the holder of link key `peer_key` (made if
    /// there is none, as for a handshake from `from`). Returns the length of
    /// a packet for the TUN, as [`Node::handle_datagram`] would.
    #[doc(hidden)]
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn inject_inner(
        &mut self,
        now: Instant,
        peer_key: [u8; 32],
        from: SocketAddr,
        packet: &[u8],
    ) -> Option<usize> {
        let index = self.add_link(peer_key, Some(from), None, now)?;
        if let Some(l) = self.links.get_mut(&index) {
            l.session_up = true;
        }
        let mut buf = std::mem::take(&mut self.bufs.alt);
        let n = packet.len().min(buf.len());
        buf[..n].copy_from_slice(&packet[..n]);
        let inner = self.handle_inner(now, index, &mut buf, n);
        self.bufs.alt = buf;
        inner.map(|(Inner::InPlace(n) | Inner::Rebuilt(n))| n)
    }

    /// Whether `ip`'s subnet (IPv4 /24, IPv6 /48) holds its share of links.
    pub(super) fn subnet_full(&self, ip: IpAddr) -> bool {
        let limit = self.config.access.links_per_subnet;
        limit != 0 && self.links.in_subnet(ip) >= limit
    }

    /// Checks a handshake initiation's MAC and load, finds who sent it, and
    /// returns the link index (creating a link for an unknown node).
    pub(super) fn admit_initiation(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        init: &boringtun::noise::HandshakeInit<'_>,
    ) -> Option<u32> {
        // Cheap checks first, in order of cost: the gate (a table lookup,
        // then a hash, which also throws out random bytes), the access
        // list, and only then the Diffie-Hellman work.
        match self.gate.check_initiation(now, from, datagram) {
            gate::Verdict::Pass => {}
            gate::Verdict::Refuse { refusal, reply } => {
                match refusal {
                    gate::Refusal::RateLimited => self.drops.rate_limited += 1,
                    gate::Refusal::HandshakeRejected => self.drops.handshake_rejected += 1,
                }
                if let Some(reply) = reply {
                    let payload = reuse(&mut self.spare, &reply);
                    self.transmits.push_back(Transmit { dst: from, payload });
                }
                return None;
            }
        }
        // A denied network costs no Diffie-Hellman work.
        if !self.config.access.link.admits_addr(from.ip()) {
            self.drops.access_denied += 1;
            return None;
        }
        let public = x25519::PublicKey::from(self.own.identity().link_secret());
        let half = match parse_handshake_anon(self.own.identity().link_secret(), &public, init) {
            Ok(h) => h,
            Err(_) => {
                self.drops.handshake_rejected += 1;
                return None;
            }
        };
        if self.links.index_of_key(&half.peer_static_public).is_none()
            && self.subnet_full(from.ip())
        {
            self.drops.subnet_limit += 1;
            return None;
        }
        let idx = self.add_link(half.peer_static_public, Some(from), None, now);
        if let Some(i) = idx {
            if self.links[&i].configured.is_none() && self.links[&i].verified.is_none() {
                tracing::debug!(link = i, %from, "handshake from an unknown node");
            }
        }
        idx
    }
}
