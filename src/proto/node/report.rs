//! What the node reports about itself: `status` (links, drops, the data
//! path), the peer list and its snapshot for the peer store.

use super::*;

impl Node {
    /// What to keep in the peer store: the routing table with its records.
    pub fn peer_snapshot(&self, now: Instant) -> Vec<StoredPeerRow> {
        let unix = self.dht.unix(now);
        self.dht
            .table(now)
            .into_iter()
            .map(|e| {
                let ago = e.last_seen_secs.unwrap_or(0.0) as u64;
                (
                    e.id.0,
                    e.record.to_vec(),
                    e.source,
                    unix.saturating_sub(ago),
                )
            })
            .collect()
    }

    /// The routing table, for `qgate peers`.
    pub fn peers(&self, now: Instant) -> PeersReport {
        let entries: Vec<PeerView> = self
            .dht
            .table(now)
            .into_iter()
            .map(|e| {
                let endpoints = NodeRecord::parse_unverified(&e.record)
                    .ok()
                    .and_then(|r| r.fields().ok())
                    .map(|f| f.endpoints)
                    .unwrap_or_default();
                let address = e.id.overlay_address();
                PeerView {
                    bucket: e.bucket,
                    node_id: e.id,
                    address,
                    endpoints,
                    seq: e.seq,
                    expires: e.expires,
                    roles: e.roles,
                    source: e.source,
                    last_seen_secs: e.last_seen_secs,
                    fails: e.fails,
                    replacement: e.replacement,
                    link: self.links.for_addr(&address).map(|l| l.state()),
                }
            })
            .collect();
        let mut buckets: Vec<usize> = entries.iter().map(|e| e.bucket).collect();
        buckets.dedup();
        PeersReport {
            node_id: self.node_id(),
            buckets: buckets.len(),
            entries,
            dht: self.dht.stats(),
        }
    }

    pub fn status(&self) -> NodeStatus {
        let mut links: Vec<LinkStatus> = self
            .links
            .values()
            .map(|l| LinkStatus {
                link: l.index,
                node_id: l.node_id().map(|i| i.to_string()),
                address: l.node_id().map(|i| i.overlay_address()),
                state: l.state(),
                configured: l.persistent,
                endpoint: l.chan.endpoint,
                last_handshake_secs: l.chan.handshake_age().map(|d| d.as_secs_f64()),
                mtu: l.chan.mtu,
                compression: l.chan.compress,
                tx_compression_ratio: ratio(
                    l.chan.counters.tx_wire_bytes,
                    l.chan.counters.tx_bytes,
                ),
                rx_compression_ratio: ratio(
                    l.chan.counters.rx_wire_bytes,
                    l.chan.counters.rx_bytes,
                ),
                counters: l.chan.counters,
                drops: l.drops,
            })
            .collect();
        links.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        NodeStatus {
            node_id: self.node_id().to_string(),
            address: self.address,
            record_seq: self.own.record().seq,
            endpoints: self.own.endpoints().to_vec(),
            dht: self.dht.stats(),
            table_entries: self.dht.table_len(),
            drops: self.drops,
            circuits: self.out_circuits(),
            relay: self.relay_stats(),
            routing: self.routing_summary(),
            links,
            data_path: DataPathStatus {
                busy_percent: self.compression.busy_permille() / 10,
                compression_paused: self.compression.paused(),
                compression_pauses: self.compression.pauses(),
                long_lock_waits: self.long_lock_waits,
                longest_lock_wait_us: self.longest_lock_wait.as_micros() as u64,
                plane_links: self.links.values().filter(|l| l.chan.handed()).count() as u64,
                plane_circuits: self.circ.hops_in_plane() as u64,
                worker_links: self.worker_links(),
            },
        }
    }

    /// Index of the link to a verified neighbour (for tests).
    pub fn link_up_to(&self, addr: &Ipv6Addr) -> bool {
        self.links
            .for_addr(addr)
            .is_some_and(|l| l.state() == LinkState::Up && l.hello.they_have_ours())
    }

    /// Record checks done (signature verifications, not cache hits).
    pub fn record_verifications(&mut self) -> u64 {
        self.dht.records().verifications
    }
}
