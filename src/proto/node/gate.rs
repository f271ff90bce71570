//! The handshake gate: what a datagram no established session accounts for
//! may cost, per source. It owns the per-source budgets and boringtun's
//! MAC/cookie checkers, and answers with a [`Verdict`]; the node counts
//! the refusal and sends the cookie reply it may carry. It never sees the
//! link table.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::TunnResult;
use boringtun::x25519;

use super::{PROVEN_LIMIT, SOURCE_LIMIT, SOURCE_SLOTS};
use crate::proto::limit::SourceTable;

/// A WireGuard cookie reply (message type 3) is always this long.
pub(super) const COOKIE_REPLY_LEN: usize = 64;

/// Why the gate refused a handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The source is over its budget (and over its proven one, or showed
    /// no cookie).
    RateLimited,
    /// A bad MAC, or boringtun's node-wide load check asked for a cookie.
    HandshakeRejected,
}

/// What to do with a handshake initiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Go on to the Diffie-Hellman work.
    Pass,
    /// Drop it, counted as `refusal`; `reply` (a cookie reply) goes back to
    /// the datagram's source.
    Refuse {
        refusal: Refusal,
        reply: Option<[u8; COOKIE_REPLY_LEN]>,
    },
}

impl Verdict {
    fn refuse(refusal: Refusal) -> Verdict {
        Verdict::Refuse {
            refusal,
            reply: None,
        }
    }
}

/// Budgets of unauthenticated work per source, and the MAC and cookie
/// checks in front of the Diffie-Hellman work.
pub(super) struct Gate {
    /// MAC check, and node-wide: a cookie demanded above 64 initiations per
    /// tick.
    limiter: RateLimiter,
    /// The limiter the links' `Tunn`s check handshakes with again: MACs
    /// only, never under load, since this gate decided that (and a cookie
    /// it asked for must not be asked for again).
    links: Arc<RateLimiter>,
    /// Demands a valid cookie of every initiation: for sources over their
    /// budget.
    cookie: RateLimiter,
    /// Handshake initiations per source in the current second: boringtun's
    /// rate limiter is one global counter, so one noisy source could starve
    /// everyone else's handshakes without a per-source limit in front of it.
    sources: SourceTable,
    /// The second budget, for sources proven by a cookie and for cookie
    /// replies.
    proven: SourceTable,
}

impl Gate {
    /// A gate for the node whose link key is `public`; `hash_key` keys the
    /// source tables' hashing (random, so a flood can't aim at one set).
    pub(super) fn new(public: &x25519::PublicKey, hash_key: (u64, u64)) -> Gate {
        Gate {
            limiter: RateLimiter::new(public, 64),
            links: Arc::new(RateLimiter::new(public, u64::MAX)),
            // A limit of 0 makes it demand a valid cookie of every packet.
            cookie: RateLimiter::new(public, 0),
            sources: SourceTable::new(SOURCE_SLOTS, hash_key),
            proven: SourceTable::new(SOURCE_SLOTS, (hash_key.1, hash_key.0)),
        }
    }

    /// The checker a new link's `Tunn` is given.
    pub(super) fn link_limiter(&self) -> Arc<RateLimiter> {
        self.links.clone()
    }

    /// Starts a new count for the node-wide load check (once per timer).
    pub(super) fn tick(&self) {
        self.limiter.reset_count();
    }

    /// Charges one datagram no session accounts for (garbage, an unknown
    /// session, session traffic from an unknown endpoint) to `ip`'s budget;
    /// false when the budget is spent.
    pub(super) fn charge(&mut self, now: Instant, ip: IpAddr) -> bool {
        self.sources.allow(now, ip, SOURCE_LIMIT)
    }

    /// Checks a handshake initiation from `from`, cheapest check first: the
    /// source's budget (a table lookup), then boringtun's MAC and load
    /// check (a hash, which also throws out random bytes). A source over
    /// its budget that proves with a cookie (WireGuard's mac2) that it
    /// receives at its address gets a second, smaller budget: else anyone
    /// who forges a neighbour's address could lock that neighbour out.
    /// Cookie replies come out of that budget too, so a flood gets few
    /// answers.
    pub(super) fn check_initiation(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Verdict {
        let mut out = [0u8; COOKIE_REPLY_LEN];
        if self.sources.allow(now, from.ip(), SOURCE_LIMIT) {
            return match self
                .limiter
                .verify_packet(Some(from.ip()), datagram, &mut out)
            {
                Ok(_) => Verdict::Pass,
                Err(e) => Verdict::Refuse {
                    refusal: Refusal::HandshakeRejected,
                    reply: cookie_reply(e),
                },
            };
        }
        match self
            .cookie
            .verify_packet(Some(from.ip()), datagram, &mut out)
        {
            Ok(_) if self.proven.allow(now, from.ip(), PROVEN_LIMIT) => Verdict::Pass,
            Err(e @ TunnResult::WriteToNetwork(_))
                if self.proven.allow(now, from.ip(), PROVEN_LIMIT) =>
            {
                Verdict::Refuse {
                    refusal: Refusal::RateLimited,
                    reply: cookie_reply(e),
                }
            }
            _ => Verdict::refuse(Refusal::RateLimited),
        }
    }

    /// The per-source table (tests look at its memory and evictions).
    #[cfg(test)]
    pub(super) fn sources(&self) -> &SourceTable {
        &self.sources
    }
}

/// The cookie reply a refusing limiter wrote, if any.
fn cookie_reply(e: TunnResult<'_>) -> Option<[u8; COOKIE_REPLY_LEN]> {
    match e {
        TunnResult::WriteToNetwork(c) => c.try_into().ok(),
        _ => None,
    }
}

/// Whether `d` is a WireGuard cookie reply: message type 3, 64 bytes.
pub(super) fn is_cookie_reply(d: &[u8]) -> bool {
    d.len() == COOKIE_REPLY_LEN && d[0] == 3
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the clock
mod tests {
    use super::*;
    use boringtun::noise::Tunn;

    fn key(b: u8) -> x25519::StaticSecret {
        x25519::StaticSecret::from([b; 32])
    }

    /// A real handshake initiation from the holder of `from` to `to`.
    fn initiation(from: u8, to: &x25519::PublicKey) -> Vec<u8> {
        let mut t = Tunn::new(key(from), *to, None, None, 1, None);
        let mut buf = [0u8; 256];
        match t.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    #[test]
    fn budgets_are_per_source_and_cookies_are_few() {
        let public = x25519::PublicKey::from(&key(9));
        let mut gate = Gate::new(&public, (1, 2));
        let now = Instant::now();
        let a: SocketAddr = "198.18.0.1:7300".parse().unwrap();
        let b: SocketAddr = "198.18.1.1:7300".parse().unwrap();
        let init = initiation(1, &public);
        for _ in 0..SOURCE_LIMIT.burst {
            assert_eq!(gate.check_initiation(now, a, &init), Verdict::Pass);
        }
        // Over budget: a cookie reply (from the smaller budget), then
        // nothing at all.
        for i in 0..PROVEN_LIMIT.burst + 5 {
            match gate.check_initiation(now, a, &init) {
                Verdict::Refuse {
                    refusal: Refusal::RateLimited,
                    reply,
                } => {
                    assert_eq!(reply.is_some(), i < PROVEN_LIMIT.burst, "{i}");
                    if let Some(r) = reply {
                        assert!(is_cookie_reply(&r));
                    }
                }
                v => panic!("{i}: {v:?}"),
            }
        }
        assert!(!gate.charge(now, a.ip()), "a's budget is spent");
        // Another source is not held up by a's flood.
        assert!(gate.charge(now, b.ip()));
        assert_eq!(
            gate.check_initiation(now, b, &initiation(2, &public)),
            Verdict::Pass
        );
        // Bytes that are not an initiation for us fail the MAC, unanswered.
        let mut junk = init.clone();
        junk[100] ^= 1;
        assert_eq!(
            gate.check_initiation(now, b, &junk),
            Verdict::refuse(Refusal::HandshakeRejected)
        );
        // A second later the budget has refilled.
        let later = now + std::time::Duration::from_secs(1);
        assert_eq!(gate.check_initiation(later, a, &init), Verdict::Pass);
    }
}
