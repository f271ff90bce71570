//! The node's own record: its identity, the signed record it presents, the
//! endpoints its neighbours report, and when to sign anew. A part with its
//! own state: the node feeds it reports and ticks; it answers with a record
//! to sign ([`RecordJob`], signed away from the node: RSA takes
//! milliseconds and packets must not wait behind it) and, once the
//! signature is back, with a new record to spread ([`Resigned`]). It never
//! touches links or the DHT.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::identity::{Identity, NodeId, NodeRecord, RecordExt};

/// Lifetime of our record; it is signed anew when half is left.
pub(super) const RECORD_TTL: u64 = 24 * 3600;
/// Records are not re-signed more often than this.
const RESIGN_INTERVAL: Duration = Duration::from_secs(10);
/// A record handed out for signing and not signed within this long is
/// planned anew (the signer dropped the job: its queue was full).
const SIGN_WAIT: Duration = Duration::from_secs(10);
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

/// A record to sign: `message` with the node's identity, handed back to
/// [`OwnRecord::install`] with the same `seq`.
pub(super) struct RecordJob {
    pub seq: u64,
    pub message: Vec<u8>,
}

/// A record planned and waiting for its signature.
struct Pending {
    /// Complete but for the signature.
    record: NodeRecord,
    ext: RecordExt,
    message: Vec<u8>,
    asked: Instant,
    /// Handed to the signer already ([`OwnRecord::take_job`]).
    handed: bool,
}

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
    /// The next record, while its signature is being made.
    pending: Option<Pending>,
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
            pending: None,
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
    }

    /// Plans a new record when one is due (a new onion key at once; new
    /// endpoints or half the lifetime gone, at most every
    /// `RESIGN_INTERVAL`) and its sequence number is stored. The record
    /// to sign is then handed out by [`OwnRecord::take_job`].
    pub(super) fn poll_resign(&mut self, now: Instant, unix: u64) {
        if let Some(p) = &self.pending {
            if now.saturating_duration_since(p.asked) < SIGN_WAIT {
                return;
            }
            tracing::debug!(
                seq = p.record.seq,
                "record not signed in time: planned anew"
            );
            self.pending = None;
        }
        let endpoints = self.desired_endpoints(now);
        let expiring = self.ext.expires.is_none_or(|e| e < unix + RECORD_TTL / 2);
        let due = self
            .last_resign
            .is_none_or(|t| now.saturating_duration_since(t) >= RESIGN_INTERVAL);
        let wanted = due && (expiring || endpoints != self.ext.endpoints);
        // What the record states besides endpoints changed (the onion key):
        // sign anew as soon as the sequence number allows.
        let changed =
            self.ext.onion_key != Some(self.fixed.onion_key) || self.ext.roles != self.fixed.roles;
        if !wanted && !changed {
            return;
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
            return;
        }
        self.last_resign = Some(now);
        let ext = RecordExt {
            expires: Some(unix + RECORD_TTL),
            endpoints,
            roles: self.fixed.roles,
            onion_key: Some(self.fixed.onion_key),
        };
        let record = self.identity.unsigned_record(seq, &ext);
        self.pending = Some(Pending {
            message: record.signed_bytes(),
            record,
            ext,
            asked: now,
            handed: false,
        });
    }

    /// The record to sign, once per plan.
    pub(super) fn take_job(&mut self) -> Option<RecordJob> {
        let p = self.pending.as_mut().filter(|p| !p.handed)?;
        p.handed = true;
        Some(RecordJob {
            seq: p.record.seq,
            message: p.message.clone(),
        })
    }

    /// Whether the record `seq`, over `message`, still waits for its
    /// signature.
    pub(super) fn wants(&self, seq: u64, message: &[u8]) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.record.seq == seq && p.message == message)
    }

    /// The signature for the planned record `seq` over `message`: it
    /// becomes the record we present.
    pub(super) fn install(
        &mut self,
        seq: u64,
        message: &[u8],
        signature: &[u8],
    ) -> Option<Resigned> {
        if !self.wants(seq, message) {
            return None;
        }
        let mut p = self.pending.take()?;
        p.record.signature = signature.to_vec();
        self.bytes = p.record.to_bytes();
        self.record = p.record;
        self.ext = p.ext;
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

    /// Plans, signs and installs as the node and the shell's signing
    /// thread do; whether a new record came of it.
    fn resign(o: &mut OwnRecord, now: Instant, unix: u64) -> bool {
        o.poll_resign(now, unix);
        let Some(job) = o.take_job() else {
            return false;
        };
        let signature = o.identity().sign(&job.message);
        o.install(job.seq, &job.message, &signature).is_some()
    }

    #[test]
    fn a_rotated_onion_key_is_published_once_its_number_is_stored() {
        let t0 = Instant::now();
        let unix = 1_800_000_000;
        let mut o = own(5, unix);
        o.set_onion_key([2; 32]);
        // Only 5 is stored: nothing is signed, however often it is asked.
        assert!(!resign(&mut o, t0, unix));
        assert!(!resign(&mut o, t0 + Duration::from_secs(60), unix + 60));
        assert_eq!(o.record().seq, 5);
        let limit = o.seq_wanted(unix + 60).expect("asks for a limit");
        o.reserve_seq(limit);
        // The change is not forgotten meanwhile, and doesn't wait for the
        // re-sign interval.
        assert!(resign(&mut o, t0 + Duration::from_secs(61), unix + 61));
        assert_eq!(published(&o).onion_key, Some([2; 32]));
        assert!(o.record().seq > 5 && o.record().seq <= limit);
        assert!(!resign(&mut o, t0 + Duration::from_secs(62), unix + 62));
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
        assert!(resign(&mut o, t0, unix));
        assert_eq!(o.endpoints(), &[b]);
        assert_eq!(published(&o).endpoints, vec![b]);
        // Nothing changed: no new record.
        let later = t0 + Duration::from_secs(30);
        assert!(!resign(&mut o, later, unix + 30));
    }

    #[test]
    fn a_record_is_signed_away_and_planned_anew_if_its_signature_never_comes() {
        let t0 = Instant::now();
        let unix = 1_800_000_000;
        let mut o = own(5, unix);
        o.reserve_seq(unix + 3600);
        o.set_onion_key([2; 32]);
        o.poll_resign(t0, unix);
        let job = o.take_job().expect("a record to sign");
        // Handed out once; until it is signed the old record stands and
        // nothing else is planned.
        assert!(o.take_job().is_none());
        o.poll_resign(t0 + Duration::from_secs(1), unix + 1);
        assert!(o.take_job().is_none());
        assert_eq!(o.record().seq, 5);
        assert_eq!(published(&o).onion_key, Some([1; 32]));
        // The signer dropped it: after SIGN_WAIT it is planned anew, and the
        // first job's signature no longer fits.
        let later = t0 + SIGN_WAIT + Duration::from_secs(1);
        o.poll_resign(later, unix + 11);
        let again = o.take_job().expect("planned anew");
        assert_ne!(again.message, job.message);
        let stale = o.identity().sign(&job.message);
        assert!(o.install(job.seq, &job.message, &stale).is_none());
        // A signature over something else is refused too.
        assert!(o.install(again.seq, &job.message, &stale).is_none());
        let good = o.identity().sign(&again.message);
        assert!(o.install(again.seq, &again.message, &good).is_some());
        assert_eq!(o.record().seq, again.seq);
        assert_eq!(published(&o).onion_key, Some([2; 32]));
        // A key rotated while a record was out is signed next.
        o.set_onion_key([3; 32]);
        o.poll_resign(later, unix + 11);
        assert!(o.take_job().is_some());
    }
}
