//! The node's own record: its identity, the signed record it presents, the
//! endpoints its neighbours report, and when to sign anew. A part with its
//! own state: the node feeds it reports and ticks, and it answers with a new
//! record to spread ([`Resigned`]); it never touches links or the DHT.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::identity::{Identity, NodeId, NodeRecord, RecordExt};

/// Lifetime of our record; it is signed anew when half is left.
pub(super) const RECORD_TTL: u64 = 24 * 3600;
/// Records are not re-signed more often than this.
const RESIGN_INTERVAL: Duration = Duration::from_secs(10);
/// How far ahead of the record sequence number in use the stored limit is
/// kept (seconds of re-signing, which follows the wall clock).
const SEQ_MARGIN: u64 = 3600;
/// A neighbour's report of our endpoint counts this long.
const OBSERVED_FOR: Duration = Duration::from_secs(600);
/// Observed endpoints remembered.
const MAX_OBSERVED: usize = 16;

/// What the record's extension says besides endpoints and expiry.
#[derive(Clone, Copy, Debug)]
pub(super) struct Fixed {
    /// Role bits.
    pub roles: u8,
    /// The circuit layer's onion key.
    pub onion_key: [u8; 32],
}

/// A new record was signed: spread it (DHT, hellos to every neighbour).
pub(super) struct Resigned;

pub(super) struct OwnRecord {
    /// Shared with the shell, which signs DHT values outside the node (RSA
    /// signing takes milliseconds; packets must not wait for it).
    identity: Arc<Identity>,
    record: NodeRecord,
    bytes: Vec<u8>,
    ext: RecordExt,
    /// Endpoints to publish whatever neighbours say (config `advertise`).
    advertise: Vec<SocketAddr>,
    fixed: Fixed,
    /// Our endpoint as neighbours see it: reporter → (its latest report, when).
    observed: HashMap<NodeId, (SocketAddr, Instant)>,
    last_resign: Option<Instant>,
    /// Something the record states changed (the onion key): sign anew as
    /// soon as the sequence number allows, whatever the interval.
    changed: bool,
    /// Highest record sequence number the shell has stored durably: no
    /// record with a higher one is signed (a crash must never let a restart
    /// reuse a number that was published).
    seq_limit: u64,
}

impl OwnRecord {
    /// Signs the first record, with sequence number `seq` (stored already)
    /// and the wall clock `unix`.
    pub(super) fn new(
        identity: Identity,
        seq: u64,
        unix: u64,
        advertise: Vec<SocketAddr>,
        fixed: Fixed,
    ) -> OwnRecord {
        let ext = RecordExt {
            expires: Some(unix + RECORD_TTL),
            endpoints: advertise.clone(),
            roles: fixed.roles,
            onion_key: Some(fixed.onion_key),
        };
        let record = identity.sign_record_with(seq, &ext);
        OwnRecord {
            identity: Arc::new(identity),
            bytes: record.to_bytes(),
            record,
            ext,
            advertise,
            fixed,
            observed: HashMap::new(),
            last_resign: None,
            changed: false,
            seq_limit: seq,
        }
    }

    pub(super) fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    pub(super) fn record(&self) -> &NodeRecord {
        &self.record
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The endpoints the current record publishes.
    pub(super) fn endpoints(&self) -> &[SocketAddr] {
        &self.ext.endpoints
    }

    /// A neighbour says it sees us at `ep`.
    pub(super) fn note_observed(&mut self, now: Instant, ep: SocketAddr, reporter: NodeId) {
        if ep.port() == 0 || ep.ip().is_unspecified() {
            return;
        }
        if !self.observed.contains_key(&reporter) && self.observed.len() >= MAX_OBSERVED {
            if let Some(old) = self
                .observed
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(r, _)| *r)
            {
                self.observed.remove(&old);
            }
        }
        self.observed.insert(reporter, (ep, now));
    }

    /// Endpoints for our record: the configured ones, else per address
    /// family the one most neighbours report (one vote each, their latest,
    /// for ten minutes). A tie keeps the endpoint we publish, so two
    /// neighbours that see us differently can't make it flip back and forth.
    fn desired_endpoints(&self, now: Instant) -> Vec<SocketAddr> {
        if !self.advertise.is_empty() {
            return self.advertise.clone();
        }
        let mut votes: HashMap<SocketAddr, usize> = HashMap::new();
        for (ep, t) in self.observed.values() {
            let link_local =
                matches!(ep.ip(), IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80);
            if now.saturating_duration_since(*t) < OBSERVED_FOR && !link_local {
                *votes.entry(*ep).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for v4 in [true, false] {
            let current = self
                .ext
                .endpoints
                .iter()
                .find(|e| e.is_ipv4() == v4)
                .copied();
            let cur_votes = current.and_then(|c| votes.get(&c).copied()).unwrap_or(0);
            let best = votes
                .iter()
                .filter(|(e, _)| e.is_ipv4() == v4)
                .max_by_key(|(e, n)| (**n, **e))
                .map(|(e, n)| (*e, *n));
            match (current, best) {
                (Some(c), Some((_, n))) if cur_votes >= n => out.push(c),
                (_, Some((e, _))) => out.push(e),
                (Some(c), None) => out.push(c),
                (None, None) => {}
            }
        }
        out
    }

    /// A new onion key (the circuit layer rotated it): the record must say
    /// so at the next [`OwnRecord::poll_resign`].
    pub(super) fn set_onion_key(&mut self, key: [u8; 32]) {
        self.fixed.onion_key = key;
        self.changed = true;
    }

    /// Signs a new record when one is due (a new onion key; new endpoints
    /// or half the lifetime gone, at most every `RESIGN_INTERVAL`) and its
    /// sequence number is stored.
    pub(super) fn poll_resign(&mut self, now: Instant, unix: u64) -> Option<Resigned> {
        let endpoints = self.desired_endpoints(now);
        let expiring = self.ext.expires.is_none_or(|e| e < unix + RECORD_TTL / 2);
        let due = self
            .last_resign
            .is_none_or(|t| now.saturating_duration_since(t) >= RESIGN_INTERVAL);
        let wanted = due && (expiring || endpoints != self.ext.endpoints);
        if !wanted && !self.changed {
            return None;
        }
        let seq = self.record.seq.saturating_add(1).max(unix);
        if seq > self.seq_limit {
            // Not stored yet: wait for the shell (seq_wanted) rather than
            // publish a number a crash could hand out again.
            tracing::debug!(
                seq,
                limit = self.seq_limit,
                "record re-signing waits for its sequence number to be stored"
            );
            return None;
        }
        self.last_resign = Some(now);
        self.changed = false;
        self.ext = RecordExt {
            expires: Some(unix + RECORD_TTL),
            endpoints,
            roles: self.fixed.roles,
            onion_key: Some(self.fixed.onion_key),
        };
        self.record = self.identity.sign_record_with(seq, &self.ext);
        self.bytes = self.record.to_bytes();
        tracing::info!(seq, endpoints = ?self.ext.endpoints, "record signed");
        Some(Resigned)
    }

    /// The limit to store before further records may be signed, when the
    /// stored one runs short (see `Node::record_seq_wanted`).
    pub(super) fn seq_wanted(&self, unix: u64) -> Option<u64> {
        let next = self.record.seq.saturating_add(1).max(unix);
        (next.saturating_add(SEQ_MARGIN / 2) > self.seq_limit)
            .then(|| next.saturating_add(SEQ_MARGIN))
    }

    /// Sequence numbers up to `limit` are stored durably.
    pub(super) fn reserve_seq(&mut self, limit: u64) {
        self.seq_limit = self.seq_limit.max(limit);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the clock
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;

    fn own(seq: u64, unix: u64) -> OwnRecord {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let fixed = Fixed {
            roles: 0,
            onion_key: [1; 32],
        };
        OwnRecord::new(
            Identity::generate(&mut rng).unwrap(),
            seq,
            unix,
            vec![],
            fixed,
        )
    }

    fn published(o: &OwnRecord) -> RecordExt {
        NodeRecord::parse_verified(o.bytes())
            .unwrap()
            .fields()
            .unwrap()
    }

    #[test]
    fn a_rotated_onion_key_is_published_once_its_number_is_stored() {
        let t0 = Instant::now();
        let unix = 1_800_000_000;
        let mut o = own(5, unix);
        o.set_onion_key([2; 32]);
        // Only 5 is stored: nothing is signed, however often it is asked.
        assert!(o.poll_resign(t0, unix).is_none());
        assert!(o
            .poll_resign(t0 + Duration::from_secs(60), unix + 60)
            .is_none());
        assert_eq!(o.record().seq, 5);
        let limit = o.seq_wanted(unix + 60).expect("asks for a limit");
        o.reserve_seq(limit);
        // The change is not forgotten meanwhile, and doesn't wait for the
        // re-sign interval.
        assert!(o
            .poll_resign(t0 + Duration::from_secs(61), unix + 61)
            .is_some());
        assert_eq!(published(&o).onion_key, Some([2; 32]));
        assert!(o.record().seq > 5 && o.record().seq <= limit);
        assert!(o
            .poll_resign(t0 + Duration::from_secs(62), unix + 62)
            .is_none());
    }

    #[test]
    fn the_endpoint_most_neighbours_report_is_published() {
        let t0 = Instant::now();
        let unix = 1_800_000_000;
        let mut o = own(unix, unix);
        o.reserve_seq(unix + 3600);
        let a: SocketAddr = "198.18.0.1:7300".parse().unwrap();
        let b: SocketAddr = "198.18.0.2:7300".parse().unwrap();
        o.note_observed(t0, a, NodeId([1; 32]));
        o.note_observed(t0, b, NodeId([2; 32]));
        o.note_observed(t0, b, NodeId([3; 32]));
        // Ignored: no port, unspecified.
        o.note_observed(t0, "0.0.0.0:7300".parse().unwrap(), NodeId([4; 32]));
        o.note_observed(t0, "198.18.0.3:0".parse().unwrap(), NodeId([5; 32]));
        assert!(o.poll_resign(t0, unix).is_some());
        assert_eq!(o.endpoints(), &[b]);
        assert_eq!(published(&o).endpoints, vec![b]);
        // Nothing changed: no new record.
        let later = t0 + Duration::from_secs(30);
        assert!(o.poll_resign(later, unix + 30).is_none());
    }
}
