//! The hello part: how linked neighbours show each other their signed
//! records before a link carries traffic. It holds the hello's wire form
//! ([`Hello`]), each link's hello state ([`HelloState`]: who has whose
//! record, when to repeat, the verification budget) and the judgement of a
//! record a neighbour presents ([`check_record`], answering
//! [`RecordRejected`] or a [`Claim`] on the overlay address). None of it
//! touches the node: the node (`control.rs`) verifies the signature through
//! the DHT's cache, asks this part, and acts on the answers.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::proto::identity::{parse_endpoint, put_endpoint, IdentityError, NodeId, NodeRecord};

/// Hello flag: the sender holds a verified record of the receiver.
const FLAG_ACK: u8 = 1;
/// Hello flag: "I don't know that you have my record: answer".
const FLAG_REPLY: u8 = 2;
/// Hello flag: an observed-endpoint field follows the flags.
const FLAG_OBSERVED: u8 = 4;

/// How often an unconfirmed hello is repeated.
pub(super) const HELLO_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between two record verifications on one link (RSA work).
pub(super) const VERIFY_INTERVAL: Duration = Duration::from_secs(1);

/// A hello's body (`MSG_HELLO`): one byte of flags, the endpoint the
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

/// One link's hello state: whether the neighbour holds our record, when we
/// last said hello, and when we last spent an RSA check on its record.
/// Not `Copy`: a copy that spent the verification budget would leave the
/// link's own budget unspent.
#[derive(Debug, Default)]
pub(super) struct HelloState {
    /// The neighbour's last hello said it holds our record (verified).
    they_have_ours: bool,
    last_hello: Option<Instant>,
    last_verify: Option<Instant>,
}

impl HelloState {
    /// Whether the neighbour said it holds our current record.
    pub(super) fn they_have_ours(&self) -> bool {
        self.they_have_ours
    }

    /// Whether a hello is due on a link whose session is up: until both
    /// sides hold each other's record, one every [`HELLO_INTERVAL`].
    pub(super) fn due(&self, now: Instant, verified: bool) -> bool {
        (!verified || !self.they_have_ours)
            && self
                .last_hello
                .is_none_or(|t| now.saturating_duration_since(t) >= HELLO_INTERVAL)
    }

    /// The hello to send now (`verified`: we hold the neighbour's record;
    /// `observed`: where we see it), counted as sent.
    pub(super) fn say<'a>(
        &mut self,
        now: Instant,
        verified: bool,
        observed: Option<SocketAddr>,
        record: &'a [u8],
    ) -> Hello<'a> {
        self.last_hello = Some(now);
        Hello {
            ack: verified,
            reply: !self.they_have_ours,
            observed,
            record,
        }
    }

    /// Whether a record we don't hold yet may be checked now (at most one
    /// RSA check per link per [`VERIFY_INTERVAL`]); a yes spends the budget.
    pub(super) fn may_verify(&mut self, now: Instant) -> bool {
        if self
            .last_verify
            .is_some_and(|t| now.saturating_duration_since(t) < VERIFY_INTERVAL)
        {
            return false;
        }
        self.last_verify = Some(now);
        true
    }

    /// Takes note of what a hello from the neighbour said about our record.
    pub(super) fn heard(&mut self, ack: bool) {
        self.they_have_ours = ack;
    }

    /// Our record changed: the neighbour no longer holds the current one.
    pub(super) fn our_record_changed(&mut self) {
        self.they_have_ours = false;
    }
}

/// Why a neighbour's record was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordRejected {
    /// Malformed, or its signature does not verify.
    #[error(transparent)]
    Invalid(#[from] IdentityError),
    /// It names another link key than the one the tunnel authenticated:
    /// anyone could otherwise replay someone else's public record.
    #[error("record's link key is not the key this link authenticated")]
    WrongLinkKey,
    /// The link was made to (or configured for) another node.
    #[error("record is for node {}, configured {}", .found.short(), .expected.short())]
    NotConfigured { found: NodeId, expected: NodeId },
    /// The hello came from another overlay address than the record's.
    #[error("hello sent from an address that is not the record's")]
    WrongAddress,
    /// It is this node's own record.
    #[error("record is our own")]
    OwnRecord,
    /// The link already speaks for another node.
    #[error("link already speaks for another node")]
    OtherNode,
    /// Older than the record the link already proved.
    #[error("record is older than the one we hold")]
    Older,
}

/// What the node knows of a link when it judges a record presented on it.
#[derive(Clone, Copy, Debug)]
pub(super) struct LinkFacts {
    /// The neighbour's link key, as the tunnel authenticated it.
    pub(super) peer_key: [u8; 32],
    /// The node the link must turn out to be (configured peers, links made
    /// to a looked-up record).
    pub(super) configured: Option<NodeId>,
    /// The node and record sequence number the link already proved.
    pub(super) holds: Option<(NodeId, u64)>,
}

/// Judges a record whose signature verified, presented in a hello from the
/// overlay address `src` on a link described by `link`, by the node `own`.
pub(super) fn check_record(
    record: &NodeRecord,
    link: &LinkFacts,
    src: Ipv6Addr,
    own: NodeId,
) -> Result<(), RecordRejected> {
    let id = record.node_id();
    if record.link_key != link.peer_key {
        return Err(RecordRejected::WrongLinkKey);
    }
    if let Some(expected) = link.configured {
        if id != expected {
            return Err(RecordRejected::NotConfigured {
                found: id,
                expected,
            });
        }
    }
    if record.overlay_address() != src {
        return Err(RecordRejected::WrongAddress);
    }
    if id == own {
        return Err(RecordRejected::OwnRecord);
    }
    if let Some((held, seq)) = link.holds {
        if id != held {
            return Err(RecordRejected::OtherNode);
        }
        if record.seq < seq {
            return Err(RecordRejected::Older);
        }
    }
    Ok(())
}

/// A verified record's claim on its overlay address, when another link may
/// speak for that address already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// No other link speaks for the address.
    Free,
    /// Another link proved a record at least as new: it stays, and this
    /// record is not taken (counted as a stale record).
    Kept(u32),
    /// This record is newer (the node may have replaced its link key): the
    /// other link goes, and this one takes over what it was configured for.
    Replaces(u32),
}

impl Claim {
    /// `other`: the link that speaks for the address now and the sequence
    /// number it proved (None when it proved none); `seq`: this record's.
    pub(super) fn judge(this: u32, other: Option<(u32, Option<u64>)>, seq: u64) -> Claim {
        match other {
            None => Claim::Free,
            Some((o, _)) if o == this => Claim::Free,
            Some((o, Some(s))) if s >= seq => Claim::Kept(o),
            Some((o, _)) => Claim::Replaces(o),
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests read the clock and OsRng
mod tests {
    use super::*;
    use crate::proto::identity::Identity;

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

    #[test]
    fn hellos_repeat_until_both_sides_hold_the_records() {
        let t0 = Instant::now();
        let mut st = HelloState::default();
        assert!(st.due(t0, false));
        let h = st.say(t0, false, None, b"rec");
        assert!(!h.ack && h.reply && h.record == b"rec");
        // Not again within the interval, again after it.
        assert!(!st.due(t0 + HELLO_INTERVAL / 2, false));
        assert!(st.due(t0 + HELLO_INTERVAL, false));
        // They hold ours but we don't hold theirs: hellos go on.
        st.heard(true);
        assert!(st.due(t0 + 10 * HELLO_INTERVAL, false));
        // We hold theirs, they hold ours: no more hellos.
        assert!(!st.due(t0 + 10 * HELLO_INTERVAL, true));
        assert!(!st.say(t0, true, None, b"rec").reply);
        // Our record changed: hellos again, asking for an answer.
        st.our_record_changed();
        assert!(st.due(t0 + 10 * HELLO_INTERVAL, true));
        assert!(st.say(t0, true, None, b"rec").reply);
    }

    #[test]
    fn one_verification_per_link_per_interval() {
        let t0 = Instant::now();
        let mut st = HelloState::default();
        assert!(st.may_verify(t0));
        assert!(!st.may_verify(t0));
        assert!(!st.may_verify(t0 + VERIFY_INTERVAL - Duration::from_millis(1)));
        assert!(st.may_verify(t0 + VERIFY_INTERVAL));
    }

    fn record(seq: u64) -> NodeRecord {
        let id = Identity::generate(&mut rand_core::OsRng).unwrap();
        id.sign_record(seq)
    }

    #[test]
    fn a_record_is_refused_for_each_mismatch() {
        let rec = record(5);
        let other = record(1);
        let id = rec.node_id();
        let src = rec.overlay_address();
        let fine = LinkFacts {
            peer_key: rec.link_key,
            configured: None,
            holds: None,
        };
        let own = other.node_id();
        assert!(check_record(&rec, &fine, src, own).is_ok());
        // The same node, configured, holding an older or the same record.
        let held = LinkFacts {
            configured: Some(id),
            holds: Some((id, 5)),
            ..fine
        };
        assert!(check_record(&rec, &held, src, own).is_ok());
        let check = |facts: LinkFacts, src, own| check_record(&rec, &facts, src, own).unwrap_err();
        let wrong_key = LinkFacts {
            peer_key: [7; 32],
            ..fine
        };
        assert!(matches!(
            check(wrong_key, src, own),
            RecordRejected::WrongLinkKey
        ));
        let configured = LinkFacts {
            configured: Some(own),
            ..fine
        };
        assert!(matches!(
            check(configured, src, own),
            RecordRejected::NotConfigured { found, expected } if found == id && expected == own
        ));
        assert!(matches!(
            check(fine, other.overlay_address(), own),
            RecordRejected::WrongAddress
        ));
        assert!(matches!(check(fine, src, id), RecordRejected::OwnRecord));
        let other_node = LinkFacts {
            holds: Some((own, 1)),
            ..fine
        };
        assert!(matches!(
            check(other_node, src, own),
            RecordRejected::OtherNode
        ));
        let newer_held = LinkFacts {
            holds: Some((id, 6)),
            ..fine
        };
        assert!(matches!(check(newer_held, src, own), RecordRejected::Older));
        // The link key is checked first: a replayed record of someone else
        // is refused as such, whatever else is wrong with it.
        assert!(matches!(
            check(wrong_key, other.overlay_address(), id),
            RecordRejected::WrongLinkKey
        ));
    }

    #[test]
    fn the_newer_record_claims_the_address() {
        assert_eq!(Claim::judge(1, None, 3), Claim::Free);
        assert_eq!(Claim::judge(1, Some((1, Some(9))), 3), Claim::Free);
        assert_eq!(Claim::judge(1, Some((2, Some(3))), 3), Claim::Kept(2));
        assert_eq!(Claim::judge(1, Some((2, Some(2))), 3), Claim::Replaces(2));
        assert_eq!(Claim::judge(1, Some((2, None)), 3), Claim::Replaces(2));
    }
}
