//! Per-peer budgets for the server, sans IO (the caller passes `now`):
//! how many connections in all and per peer address, and how fast one peer
//! may be served (a token bucket in bytes per second). A peer over its rate
//! is not refused, only slowed: the caller waits for the time returned.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once, all peers together.
    pub max_connections: usize,
    /// Connections served at once from one peer address.
    pub max_connections_per_peer: usize,
    /// Bytes per second served to one peer address; `None`: unlimited.
    pub peer_rate: Option<u64>,
}

/// Peers remembered with no connection open (for their rate buckets)
/// before the longest-idle are forgotten.
pub const MAX_IDLE_PEERS: usize = 4096;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// All connection slots are taken.
    #[error("too many connections")]
    Full,
    /// This peer has all its slots taken.
    #[error("too many connections from this peer")]
    PeerFull,
}

#[derive(Debug)]
struct Peer {
    connections: usize,
    /// Bytes this peer may still be sent at once; negative: in debt.
    tokens: f64,
    last: Instant,
}

/// The budgets of every peer with a connection open.
#[derive(Debug)]
pub struct Budgets {
    limits: Limits,
    total: usize,
    peers: HashMap<IpAddr, Peer>,
}

impl Budgets {
    /// Budgets under these limits.
    pub fn new(limits: Limits) -> Budgets {
        Budgets {
            limits,
            total: 0,
            peers: HashMap::new(),
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.total
    }

    /// Takes a connection slot for `peer`, or says why not.
    pub fn admit(&mut self, peer: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.total >= self.limits.max_connections {
            return Err(Refusal::Full);
        }
        self.sweep(now);
        let burst = self.burst();
        let p = self.peers.entry(peer).or_insert(Peer {
            connections: 0,
            tokens: burst,
            last: now,
        });
        if p.connections >= self.limits.max_connections_per_peer {
            return Err(Refusal::PeerFull);
        }
        p.connections += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`Budgets::admit`]. The peer's rate
    /// bucket outlives its connections (until [`Budgets::sweep`] finds it
    /// full again), so reconnecting does not refill it.
    pub fn release(&mut self, peer: IpAddr) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.connections = p.connections.saturating_sub(1);
            self.total = self.total.saturating_sub(1);
            if p.connections == 0 && self.limits.peer_rate.is_none_or(|r| r == 0) {
                self.peers.remove(&peer);
            }
        }
    }

    /// Forgets peers with no connection whose bucket has refilled (they
    /// would start full anyway); then, if more than [`MAX_IDLE_PEERS`]
    /// are left, the idle ones that waited longest. Called by `admit`.
    fn sweep(&mut self, now: Instant) {
        if self.peers.len() <= MAX_IDLE_PEERS {
            return;
        }
        let rate = self.limits.peer_rate.unwrap_or(0) as f64;
        let burst = self.burst();
        self.peers.retain(|_, p| {
            p.connections > 0
                || p.tokens + now.saturating_duration_since(p.last).as_secs_f64() * rate < burst
        });
        if self.peers.len() > MAX_IDLE_PEERS {
            let mut idle: Vec<(Instant, IpAddr)> = self
                .peers
                .iter()
                .filter(|(_, p)| p.connections == 0)
                .map(|(a, p)| (p.last, *a))
                .collect();
            idle.sort();
            let excess = self.peers.len() - MAX_IDLE_PEERS;
            for (_, a) in idle.into_iter().take(excess) {
                self.peers.remove(&a);
            }
        }
    }

    fn burst(&self) -> f64 {
        // A quarter second of rate, at least one request's worth, so
        // short fetches are not slowed at all.
        self.limits
            .peer_rate
            .map_or(0.0, |r| (r as f64 / 4.0).max(256.0 * 1024.0))
    }

    /// Charges `bytes` about to be sent to `peer`; returns how long to wait
    /// before sending them to keep within its rate.
    pub fn spend(&mut self, peer: IpAddr, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.limits.peer_rate.filter(|r| *r > 0) else {
            return Duration::ZERO;
        };
        let burst = self.burst();
        let Some(p) = self.peers.get_mut(&peer) else {
            return Duration::ZERO;
        };
        let elapsed = now.saturating_duration_since(p.last).as_secs_f64();
        p.last = now;
        p.tokens = (p.tokens + elapsed * rate as f64).min(burst);
        p.tokens -= bytes as f64;
        if p.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-p.tokens / rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: Option<u64>) -> Limits {
        Limits {
            max_connections: 3,
            max_connections_per_peer: 2,
            peer_rate: rate,
        }
    }

    #[test]
    fn connection_slots() {
        let t = Instant::now();
        let mut b = Budgets::new(limits(None));
        let a: IpAddr = "::1".parse().unwrap();
        let c: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(b.admit(a, t), Ok(()));
        assert_eq!(b.admit(a, t), Ok(()));
        assert_eq!(b.admit(a, t), Err(Refusal::PeerFull));
        assert_eq!(b.admit(c, t), Ok(()));
        assert_eq!(b.admit(c, t), Err(Refusal::Full));
        b.release(a);
        assert_eq!(b.admit(c, t), Ok(()));
        assert_eq!(b.connections(), 3);
        b.release(c);
        b.release(c);
        b.release(c); // one too many: ignored
        assert_eq!(b.connections(), 1);
    }

    #[test]
    fn rate_slows_after_the_burst() {
        let t = Instant::now();
        let mut b = Budgets::new(limits(Some(1 << 20)));
        let a: IpAddr = "::1".parse().unwrap();
        b.admit(a, t).unwrap();
        assert_eq!(b.spend(a, 256 * 1024, t), Duration::ZERO);
        let wait = b.spend(a, 512 * 1024, t);
        assert!((wait.as_secs_f64() - 0.5).abs() < 0.01, "{wait:?}");
        // A second later the debt is paid and a little credit is back.
        assert_eq!(
            b.spend(a, 1024, t + Duration::from_millis(1000)),
            Duration::ZERO
        );
        let mut free = Budgets::new(limits(None));
        free.admit(a, t).unwrap();
        assert_eq!(free.spend(a, u64::MAX, t), Duration::ZERO);
    }

    #[test]
    fn reconnecting_does_not_refill_the_bucket() {
        let t = Instant::now();
        let mut b = Budgets::new(limits(Some(1 << 20)));
        let a: IpAddr = "::1".parse().unwrap();
        b.admit(a, t).unwrap();
        assert_eq!(b.spend(a, 256 * 1024, t), Duration::ZERO);
        b.release(a);
        b.admit(a, t).unwrap();
        let wait = b.spend(a, 512 * 1024, t);
        assert!((wait.as_secs_f64() - 0.5).abs() < 0.01, "{wait:?}");
        b.release(a);
        // Many other idle peers later, the table stays bounded.
        for i in 0..(MAX_IDLE_PEERS as u32 + 10) {
            let p = IpAddr::from(std::net::Ipv4Addr::from(i));
            b.admit(p, t).unwrap();
            b.spend(p, 1 << 20, t);
            b.release(p);
        }
        assert!(b.peers.len() <= MAX_IDLE_PEERS + 1);
    }
}
