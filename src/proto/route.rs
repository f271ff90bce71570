//! Route policy (destination prefix → direct or a number of relays) and
//! relay path selection.

use std::net::{IpAddr, Ipv6Addr};

use rand_core::RngCore;

use super::identity::NodeId;

/// Most relays on one circuit.
pub const MAX_HOPS: u8 = 3;

/// How to reach a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Over a direct link.
    Direct,
    /// Through a circuit of MIN..=MAX relays (1 ≤ MIN ≤ MAX ≤ 3); never
    /// direct: with too few usable relays the destination is unreachable.
    Hops(u8, u8),
    /// Through MIN..=MAX relays whenever the node knows enough usable
    /// relays (the subnet rule included), otherwise over a direct link.
    Prefer(u8, u8),
}

impl Policy {
    /// The relay range, if this policy uses circuits at all.
    pub fn relays(&self) -> Option<(u8, u8)> {
        match *self {
            Policy::Direct => None,
            Policy::Hops(a, b) | Policy::Prefer(a, b) => Some((a, b)),
        }
    }

    /// Parses `direct`, `MIN..MAX` / `N` (relays only), or
    /// `MIN..MAX or direct` (relays when possible).
    pub fn parse(s: &str) -> Result<Policy, String> {
        let s = s.trim();
        if s == "direct" {
            return Ok(Policy::Direct);
        }
        if let Some(r) = s.strip_suffix("or direct") {
            return match Policy::parse(r)? {
                Policy::Hops(a, b) => Ok(Policy::Prefer(a, b)),
                _ => Err(format!(
                    "{s:?}: write \"MIN..MAX or direct\", e.g. \"1..2 or direct\""
                )),
            };
        }
        let (a, b) = match s.split_once("..") {
            Some((a, b)) => (a.trim(), b.trim().trim_start_matches('=')),
            None => (s, s),
        };
        let (min, max): (u8, u8) = match (a.parse(), b.parse()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => {
                return Err(format!(
                    "{s:?} is neither \"direct\" nor \"MIN..MAX\" relays"
                ))
            }
        };
        if min == 0 || min > max || max > MAX_HOPS {
            return Err(format!(
                "{s:?}: relays must be 1 ≤ MIN ≤ MAX ≤ {MAX_HOPS} (use \"direct\" for none)"
            ));
        }
        Ok(Policy::Hops(min, max))
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = |f: &mut std::fmt::Formatter<'_>, a: u8, b: u8| {
            if a == b {
                write!(f, "{a}")
            } else {
                write!(f, "{a}..{b}")
            }
        };
        match *self {
            Policy::Direct => write!(f, "direct"),
            Policy::Hops(a, b) => range(f, a, b),
            Policy::Prefer(a, b) => {
                range(f, a, b)?;
                write!(f, " or direct")
            }
        }
    }
}

/// One `[[route]]` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Overlay prefix.
    pub prefix: Ipv6Addr,
    /// Prefix length.
    pub len: u8,
    /// What to do.
    pub policy: Policy,
}

impl Route {
    /// Whether `addr` is in this route's prefix.
    pub fn matches(&self, addr: &Ipv6Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - self.len as u32)
        };
        u128::from(*addr) & mask == u128::from(self.prefix) & mask
    }
}

/// The route policy: first matching route wins, else the default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Routes in order.
    pub routes: Vec<Route>,
    /// When none matches.
    pub default: Policy,
}

impl Default for RoutePolicy {
    fn default() -> RoutePolicy {
        RoutePolicy {
            routes: Vec::new(),
            default: Policy::Direct,
        }
    }
}

impl RoutePolicy {
    /// The policy for a destination.
    pub fn for_addr(&self, addr: &Ipv6Addr) -> Policy {
        self.routes
            .iter()
            .find(|r| r.matches(addr))
            .map(|r| r.policy)
            .unwrap_or(self.default)
    }
}

/// A relay that may be picked: its ID and the IP addresses of its endpoints.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Node ID.
    pub id: NodeId,
    /// Underlay IPs.
    pub ips: Vec<IpAddr>,
}

/// The subnet an address counts as for diversity: IPv4 /16, IPv6 /48.
pub fn subnet(ip: &IpAddr) -> (bool, u64) {
    match ip {
        IpAddr::V4(a) => (
            false,
            u64::from(u16::from_be_bytes([a.octets()[0], a.octets()[1]])),
        ),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => subnet(&IpAddr::V4(v4)),
            None => (true, (u128::from(*a) >> 80) as u64),
        },
    }
}

/// How many relays of `pool` could stand on one path at once under the
/// same rules as [`select`]: not excluded, with an endpoint, and with
/// `distinct`, no two in one subnet nor in a subnet of `endpoint_ips`.
/// Greedy over the pool's order, exact when each relay has one address.
pub fn usable(
    pool: &[Candidate],
    exclude: &[NodeId],
    endpoint_ips: &[IpAddr],
    distinct: bool,
) -> usize {
    let mut taken: Vec<(bool, u64)> = endpoint_ips.iter().map(subnet).collect();
    let mut n = 0;
    for c in pool {
        if exclude.contains(&c.id) || c.ips.is_empty() {
            continue;
        }
        if distinct {
            let nets: Vec<(bool, u64)> = c.ips.iter().map(subnet).collect();
            if nets.iter().any(|x| taken.contains(x)) {
                continue;
            }
            taken.extend(nets);
        }
        n += 1;
    }
    n
}

/// Draws the number of relays for a new circuit, uniformly in MIN..=MAX.
pub fn draw_len(rng: &mut impl RngCore, min: u8, max: u8) -> u8 {
    min + (rng.next_u32() % u32::from(max - min + 1)) as u8
}

/// Picks `len` relays from `pool`: never an ID in `exclude` (source,
/// destination, known-bad relays), no node twice, and with `distinct`, no two
/// relays — nor a relay and an address in `endpoint_ips` (the circuit's
/// ends) — in one IPv4 /16 or IPv6 /48. Random order; None if impossible.
pub fn select(
    rng: &mut impl RngCore,
    pool: &[Candidate],
    len: usize,
    exclude: &[NodeId],
    endpoint_ips: &[IpAddr],
    distinct: bool,
) -> Option<Vec<NodeId>> {
    let mut order: Vec<usize> = (0..pool.len())
        .filter(|&i| !exclude.contains(&pool[i].id) && !pool[i].ips.is_empty())
        .collect();
    // A few shuffled greedy passes find a path whenever one is likely to
    // exist; exhaustive search is not worth it for pools of this size.
    for _ in 0..8 {
        for i in (1..order.len()).rev() {
            let j = (rng.next_u32() as usize) % (i + 1);
            order.swap(i, j);
        }
        let mut taken: Vec<(bool, u64)> = endpoint_ips.iter().map(subnet).collect();
        let mut path: Vec<NodeId> = Vec::new();
        for &i in &order {
            if path.len() == len {
                break;
            }
            let c = &pool[i];
            if path.contains(&c.id) {
                continue;
            }
            let nets: Vec<(bool, u64)> = c.ips.iter().map(subnet).collect();
            if distinct && nets.iter().any(|n| taken.contains(n)) {
                continue;
            }
            taken.extend(nets);
            path.push(c.id);
        }
        if path.len() == len {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn cand(i: u8, ip: &str) -> Candidate {
        Candidate {
            id: NodeId([i; 32]),
            ips: vec![ip.parse().unwrap()],
        }
    }

    #[test]
    fn policy_parses_and_first_route_wins() {
        assert_eq!(Policy::parse("direct"), Ok(Policy::Direct));
        assert_eq!(Policy::parse("2..3"), Ok(Policy::Hops(2, 3)));
        assert_eq!(Policy::parse("2"), Ok(Policy::Hops(2, 2)));
        assert_eq!(Policy::parse("1..2 or direct"), Ok(Policy::Prefer(1, 2)));
        assert_eq!(Policy::parse("2 or direct"), Ok(Policy::Prefer(2, 2)));
        for p in ["direct", "2", "1..3", "1..2 or direct"] {
            assert_eq!(Policy::parse(p).unwrap().to_string(), p);
        }
        for bad in [
            "0..2",
            "3..2",
            "1..4",
            "x",
            "",
            "direct or direct",
            "or direct",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
        let p = RoutePolicy {
            routes: vec![
                Route {
                    prefix: "fc12::".parse().unwrap(),
                    len: 16,
                    policy: Policy::Direct,
                },
                Route {
                    prefix: "fc00::".parse().unwrap(),
                    len: 8,
                    policy: Policy::Hops(1, 1),
                },
            ],
            default: Policy::Hops(3, 3),
        };
        assert_eq!(p.for_addr(&"fc12::1".parse().unwrap()), Policy::Direct);
        assert_eq!(p.for_addr(&"fc13::1".parse().unwrap()), Policy::Hops(1, 1));
        assert_eq!(p.for_addr(&"fd00::1".parse().unwrap()), Policy::Hops(3, 3));
    }

    #[test]
    fn paths_respect_exclusions_uniqueness_and_subnets() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let pool: Vec<Candidate> = (0..30u8)
            .map(|i| cand(i, &format!("10.{}.0.{}", i % 6, i)))
            .collect();
        let exclude = [NodeId([0; 32]), NodeId([1; 32])];
        let ends: Vec<IpAddr> = vec!["10.2.9.9".parse().unwrap()];
        for _ in 0..500 {
            let p = select(&mut rng, &pool, 3, &exclude, &ends, true).unwrap();
            assert_eq!(p.len(), 3);
            let mut nets: Vec<u64> = p
                .iter()
                .map(|id| subnet(&pool[id.0[0] as usize].ips[0]).1)
                .collect();
            assert!(!p.iter().any(|id| exclude.contains(id)));
            assert!(
                !nets.contains(&subnet(&ends[0]).1),
                "hop shares the endpoint's /16"
            );
            nets.sort();
            nets.dedup();
            assert_eq!(nets.len(), 3, "two hops in one /16");
        }
        // Only 6 /16s, one taken by an endpoint: 5 relays at most.
        assert!(select(&mut rng, &pool, 3, &[], &ends, true).is_some());
        let tiny: Vec<Candidate> = (0..10).map(|i| cand(i, &format!("10.0.0.{i}"))).collect();
        assert!(select(&mut rng, &tiny, 2, &[], &[], true).is_none());
        assert_eq!(
            select(&mut rng, &tiny, 3, &[], &[], false).unwrap().len(),
            3
        );
        // IPv6 /48.
        let v6 = [cand(1, "2001:db8:1:1::1"), cand(2, "2001:db8:1:2::1")];
        assert!(select(&mut rng, &v6, 2, &[], &[], true).is_none());
    }

    #[test]
    fn usable_counts_what_select_can_use() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        // Five relays in three /16s, one of them an end's.
        let pool = [
            cand(1, "198.18.1.1"),
            cand(2, "198.18.1.2"),
            cand(3, "10.1.0.1"),
            cand(4, "10.2.0.1"),
            cand(5, "10.2.0.2"),
        ];
        let ends: Vec<IpAddr> = vec!["198.18.9.9".parse().unwrap()];
        assert_eq!(usable(&pool, &[], &ends, true), 2);
        assert_eq!(usable(&pool, &[], &ends, false), 5);
        assert_eq!(usable(&pool, &[NodeId([3; 32])], &ends, true), 1);
        // It agrees with select: 2 is possible, 3 is not.
        assert!(select(&mut rng, &pool, 2, &[], &ends, true).is_some());
        assert!(select(&mut rng, &pool, 3, &[], &ends, true).is_none());
        assert_eq!(usable(&[], &[], &[], true), 0);
    }

    #[test]
    fn lengths_follow_the_configured_range() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut counts = [0u32; 4];
        for _ in 0..3000 {
            counts[draw_len(&mut rng, 1, 3) as usize] += 1;
        }
        assert_eq!(counts[0], 0);
        for c in &counts[1..] {
            assert!((850..1150).contains(c), "{counts:?}");
        }
        assert!((0..100).all(|_| draw_len(&mut rng, 2, 2) == 2));
    }
}
