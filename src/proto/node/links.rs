//! The link table and the handshake gate: making and removing links (the
//! caps on links and on links not yet verified), and every datagram from
//! the UDP socket — the per-source budget, boringtun's MAC and cookie
//! checks, the first Diffie-Hellman, then the link's `Tunn`.

use super::*;

impl Node {
    pub(super) fn add_link(
        &mut self,
        peer_key: [u8; 32],
        endpoint: Option<SocketAddr>,
        configured: Option<NodeId>,
        now: Instant,
    ) -> Option<u32> {
        if let Some(idx) = self.by_key.get(&peer_key) {
            return Some(*idx);
        }
        if configured.is_none() && !self.admit_unverified(endpoint, now) {
            self.drops.link_limit += 1;
            return None;
        }
        if self.links.len() >= self.config.max_links {
            // Full: the on-demand link unused longest makes room, if it has
            // been idle a while; else the new one is refused.
            let lru = self
                .links
                .values()
                .filter(|l| !l.persistent && now.saturating_duration_since(l.last_used) > LRU_IDLE)
                .min_by_key(|l| l.last_used)
                .map(|l| l.index);
            self.drops.link_limit += 1;
            match lru {
                Some(i) => self.remove_link(i),
                None => return None,
            }
        }
        let mut index = self.next_index;
        while self.links.contains_key(&index) {
            index = (index + 1) & 0x00ff_ffff;
        }
        self.next_index = (index + 1) & 0x00ff_ffff;
        let keepalive = (self.config.keepalive > 0).then_some(self.config.keepalive);
        let tunn = Tunn::new(
            self.own.identity().link_secret().clone(),
            x25519::PublicKey::from(peer_key),
            None,
            keepalive,
            index,
            Some(self.link_gate.clone()),
        );
        let compress = configured
            .map(|id| self.config.compression.allows(&id))
            .unwrap_or(self.config.compression.enabled);
        self.links.insert(
            index,
            Link {
                index,
                tunn,
                peer_key,
                endpoint,
                configured,
                persistent: false,
                source: Source::Network,
                last_used: now,
                pending_ctl: VecDeque::new(),
                verified: None,
                they_have_ours: false,
                last_hello: None,
                last_reconnect: None,
                last_cookie_retry: None,
                reconnect_attempts: 0,
                pending: VecDeque::new(),
                last_verify: None,
                reassembler: Reassembler::default(),
                session_up: false,
                expired: false,
                created: now,
                last_rx: now,
                last_app_rx: None,
                mtu: self.config.mtu,
                compress,
                adaptive: Adaptive::default(),
                counters: LinkCounters::default(),
                drops: Drops::default(),
            },
        );
        self.by_key.insert(peer_key, index);
        Some(index)
    }

    /// Makes room for one more inbound link not yet verified, or says no
    /// (a link pushed out counts as a `link_limit` drop, as does a refusal).
    ///
    /// Such links are cheap to make (one initiation from a fresh key), so
    /// they are capped ([`Node::max_unverified`]). At the cap, the oldest
    /// gives way once it has had `UNVERIFIED_GRACE` to show a record;
    /// otherwise the newcomer is refused (its node retries), unless the
    /// newcomer's subnet (/24, /48) holds fewer of these links than the
    /// subnet holding most: then that subnet's oldest gives way, so a flood
    /// from a few subnets can't keep everyone else out. Links this node
    /// opened itself (lookups, LAN) are neither counted nor refused here:
    /// they are limited where they are made.
    fn admit_unverified(&mut self, endpoint: Option<SocketAddr>, now: Instant) -> bool {
        let inbound = |l: &&Link| !l.persistent && l.verified.is_none() && l.configured.is_none();
        let count = self.links.values().filter(inbound).count();
        if count < self.max_unverified() {
            return true;
        }
        let oldest = self
            .links
            .values()
            .filter(inbound)
            .map(|l| (l.created, l.index))
            .min();
        if let Some((created, i)) = oldest {
            if now.saturating_duration_since(created) >= UNVERIFIED_GRACE {
                self.drops.link_limit += 1;
                self.remove_link_quietly(i);
                return true;
            }
        }
        let subnet = |ep: Option<SocketAddr>| ep.map(|e| link_subnet(e.ip()));
        let mut per_subnet: HashMap<Option<IpAddr>, (usize, Instant, u32)> = HashMap::new();
        for l in self.links.values().filter(inbound) {
            let e = per_subnet
                .entry(subnet(l.endpoint))
                .or_insert((0, l.created, l.index));
            e.0 += 1;
            if l.created < e.1 {
                (e.1, e.2) = (l.created, l.index);
            }
        }
        let mine = per_subnet.get(&subnet(endpoint)).map_or(0, |e| e.0);
        let most = per_subnet
            .values()
            .max_by_key(|e| (e.0, std::cmp::Reverse(e.1)));
        match most {
            Some(&(n, _, i)) if n > mine + 1 => {
                self.drops.link_limit += 1;
                self.remove_link_quietly(i);
                true
            }
            _ => false,
        }
    }

    /// Most links not yet verified at once.
    pub(super) fn max_unverified(&self) -> usize {
        (self.config.max_links / 4).max(MIN_UNVERIFIED_LINKS)
    }

    pub(super) fn remove_link_quietly(&mut self, index: u32) {
        if let Some(link) = self.links.remove(&index) {
            self.closed_links.close(&link.counters, &link.drops);
            self.by_key.remove(&link.peer_key);
            self.by_addr.retain(|_, i| *i != index);
            let now = link.last_rx.max(link.last_used);
            self.circuits_link_gone(now, index);
        }
    }

    pub(super) fn remove_link(&mut self, index: u32) {
        if let Some(link) = self.links.remove(&index) {
            self.closed_links.close(&link.counters, &link.drops);
            self.by_key.remove(&link.peer_key);
            self.by_addr.retain(|_, i| *i != index);
            tracing::info!(link = index, node = ?link.node_id(), "link removed");
            let now = link.last_rx.max(link.last_used);
            self.circuits_link_gone(now, index);
        }
    }

    /// Handles one datagram from the UDP socket. Returns a packet to write
    /// to the TUN, if the datagram carried one. Queued replies (handshake
    /// responses, hellos) are drained with [`Node::poll_transmit`].
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Option<&[u8]> {
        // boringtun panics if its output buffer is shorter than the
        // datagram: ours holds MAX_DATAGRAM, so refuse anything larger.
        if datagram.len() > MAX_DATAGRAM {
            self.drops.malformed += 1;
            return None;
        }
        let from = normalize(from);
        let mut cookie_reply = false;
        let index = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => {
                // Garbage costs its source budget too, so a source that
                // sends it is throttled in everything it sends.
                if self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
                    self.drops.malformed += 1;
                } else {
                    self.drops.rate_limited += 1;
                }
                return None;
            }
            Ok(Packet::HandshakeInit(init)) => {
                self.rate_limiter_check_and_index(now, from, datagram, &init)?
            }
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(p)) => {
                cookie_reply = true;
                p.receiver_idx >> 8
            }
            Ok(Packet::PacketData(p)) => p.receiver_idx >> 8,
        };
        let Some(link) = self.links.get_mut(&index) else {
            if self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
                self.drops.unknown_session += 1;
            } else {
                self.drops.rate_limited += 1;
            }
            return None;
        };
        // Session traffic from where the neighbour is known to be costs no
        // budget (so established links keep working through a flood); from
        // anywhere else it is unauthenticated work like a handshake. (An
        // initiation was charged in `rate_limiter_check_and_index`, and its
        // link's endpoint is where it came from.)
        if link.endpoint != Some(from) && !self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
            self.drops.rate_limited += 1;
            return None;
        }
        let link = self.links.get_mut(&index)?;
        // A link created for this very handshake (see
        // `rate_limiter_check_and_index`) is kept only if the handshake holds.
        let fresh = link.configured.is_none() && link.verified.is_none() && !link.session_up;
        let mut res = link
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.bufs.a);
        let mut authenticated = false;
        let mut inner_len = None;
        loop {
            match res {
                TunnResult::Done => {
                    authenticated = true;
                    break;
                }
                TunnResult::WriteToNetwork(out) if is_cookie_reply(out) => {
                    // Under load boringtun answers an unauthenticated
                    // handshake with a cookie: that proves nothing about the
                    // sender, so the link is left as it is.
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: out.to_vec(),
                    });
                    break;
                }
                TunnResult::WriteToNetwork(out) => {
                    authenticated = true;
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: out.to_vec(),
                    });
                    // Flush packets that waited for this handshake.
                    res = link.tunn.decapsulate(None, &[], &mut self.bufs.a);
                }
                TunnResult::WriteToTunnelV6(p, _) => {
                    authenticated = true;
                    inner_len = Some(p.len());
                    break;
                }
                TunnResult::WriteToTunnelV4(..) => {
                    authenticated = true;
                    link.drops.bad_inner += 1;
                    break;
                }
                TunnResult::Err(e) => {
                    match e {
                        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
                            link.drops.replay += 1
                        }
                        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
                            link.drops.unknown_session += 1
                        }
                        WireGuardError::InvalidMac
                        | WireGuardError::WrongKey
                        | WireGuardError::InvalidTai64nTimestamp
                        | WireGuardError::WrongTai64nTimestamp
                        | WireGuardError::UnderLoad
                        | WireGuardError::UnexpectedPacket => link.drops.handshake_rejected += 1,
                        _ => link.drops.auth_failed += 1,
                    }
                    break;
                }
            }
        }
        if !authenticated {
            if fresh && link.tunn.time_since_last_handshake().is_none() {
                self.remove_link_quietly(index);
            }
            return None;
        }
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
            if link.endpoint == Some(from)
                && link
                    .last_cookie_retry
                    .is_none_or(|t| now.saturating_duration_since(t) >= COOKIE_RETRY)
            {
                link.last_cookie_retry = Some(now);
                initiate(
                    &mut link.tunn,
                    from,
                    true,
                    &mut self.bufs.b,
                    &mut self.transmits,
                );
            }
            return None;
        }
        let was_up = link.session_up;
        link.session_up = link.tunn.time_since_last_handshake().is_some();
        link.expired = false;
        link.last_rx = now;
        if link.endpoint != Some(from) {
            if link.endpoint.is_some() {
                tracing::info!(link = index, old = ?link.endpoint, new = %from, "neighbour moved to a new endpoint");
            }
            link.endpoint = Some(from);
            link.mtu = self.config.mtu;
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
        self.handle_inner(now, index, n)
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
        let n = packet.len().min(self.bufs.a.len());
        self.bufs.a[..n].copy_from_slice(&packet[..n]);
        self.handle_inner(now, index, n).map(<[u8]>::len)
    }

    /// Whether `ip`'s subnet (IPv4 /24, IPv6 /48) holds its share of links.
    pub(super) fn subnet_full(&self, ip: IpAddr) -> bool {
        let limit = self.config.access.links_per_subnet;
        if limit == 0 {
            return false;
        }
        let net = link_subnet(ip);
        self.links
            .values()
            .filter(|l| l.endpoint.is_some_and(|e| link_subnet(e.ip()) == net))
            .count()
            >= limit
    }

    /// Checks a handshake initiation's MAC and load, finds who sent it, and
    /// returns the link index (creating a link for an unknown node).
    pub(super) fn rate_limiter_check_and_index(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        init: &boringtun::noise::HandshakeInit<'_>,
    ) -> Option<u32> {
        // Cheap checks first, in order of cost: the source's budget (a
        // table lookup), boringtun's MAC and global load check (a hash,
        // which also throws out random bytes), and only then the
        // Diffie-Hellman work.
        if !self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
            // Over budget. A source that proves with a cookie (WireGuard's
            // mac2) that it receives at its address gets a second, smaller
            // budget: else anyone who forges a neighbour's address could
            // lock that neighbour out. Cookie replies come out of that
            // budget too, so a flood gets few answers.
            let mut cookie = [0u8; 64];
            match self
                .cookie_gate
                .verify_packet(Some(from.ip()), datagram, &mut cookie)
            {
                Ok(_) if self.proven.allow(now, from.ip(), PROVEN_LIMIT) => {}
                Err(TunnResult::WriteToNetwork(c))
                    if self.proven.allow(now, from.ip(), PROVEN_LIMIT) =>
                {
                    self.drops.rate_limited += 1;
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: c.to_vec(),
                    });
                    return None;
                }
                _ => {
                    self.drops.rate_limited += 1;
                    return None;
                }
            }
        } else if !pass_gate(
            &self.rate_limiter,
            from,
            datagram,
            &mut self.transmits,
            &mut self.drops,
        ) {
            return None;
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
        if !self.by_key.contains_key(&half.peer_static_public) && self.subnet_full(from.ip()) {
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

/// Runs a boringtun rate limiter's checks (MAC, and under load the cookie)
/// on a handshake message, queueing the cookie reply it may want sent.
/// Returns whether the handshake may go on; a refusal is counted.
pub(super) fn pass_gate(
    limiter: &RateLimiter,
    from: SocketAddr,
    datagram: &[u8],
    transmits: &mut VecDeque<Transmit>,
    drops: &mut Drops,
) -> bool {
    let mut cookie = [0u8; 64];
    match limiter.verify_packet(Some(from.ip()), datagram, &mut cookie) {
        Ok(_) => true,
        Err(e) => {
            drops.handshake_rejected += 1;
            if let TunnResult::WriteToNetwork(c) = e {
                transmits.push_back(Transmit {
                    dst: from,
                    payload: c.to_vec(),
                });
            }
            false
        }
    }
}

/// Queues a handshake initiation to `ep` (a fresh one if `force`, else only
/// when none is in progress).
pub(super) fn initiate(
    tunn: &mut Tunn,
    ep: SocketAddr,
    force: bool,
    buf: &mut [u8],
    transmits: &mut VecDeque<Transmit>,
) {
    if let TunnResult::WriteToNetwork(out) = tunn.format_handshake_initiation(buf, force) {
        transmits.push_back(Transmit {
            dst: ep,
            payload: out.to_vec(),
        });
    }
}

/// WireGuard cookie reply: message type 3, 64 bytes.
pub(super) fn is_cookie_reply(d: &[u8]) -> bool {
    d.len() == 64 && d[0] == 3
}
