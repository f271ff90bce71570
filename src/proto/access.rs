//! Access control: who may link to this node and who may use it as a relay,
//! by node ID and by IP network, and how many links one subnet may hold.
//!
//! A list admits a peer unless a `deny` rule matches it; when `allow` is not
//! empty, it must also match an `allow` rule. Deny wins. The default (both
//! empty) admits everyone: the network is open.
//!
//! Rules are checked twice for links: at the handshake, when only the
//! sender's address is known (so a denied network costs no Diffie-Hellman
//! work), and again when the neighbour's signed record is verified and its
//! node ID is known.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::proto::NodeId;

/// Links one subnet may hold by default (IPv4 /24, IPv6 /48): generous,
/// so a NAT or a data centre full of honest nodes is not locked out, yet
/// one address block cannot take every link slot.
pub const DEFAULT_LINKS_PER_SUBNET: usize = 64;

/// One access rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// An IP network: address and prefix length.
    Net(IpAddr, u8),
    /// A node, by ID.
    Node(NodeId),
}

/// A rule that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is neither a node ID (64 hex digits) nor an IP network (\"198.51.100.0/24\", \"2001:db8::/32\", or one address)")]
pub struct BadRule(pub String);

impl FromStr for Rule {
    type Err = BadRule;

    fn from_str(s: &str) -> Result<Rule, BadRule> {
        let bad = || BadRule(s.to_string());
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            let raw = hex::decode(s).map_err(|_| bad())?;
            let id: [u8; 32] = raw.try_into().map_err(|_| bad())?;
            return Ok(Rule::Node(NodeId(id)));
        }
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
        };
        Ok(Rule::Net(mask(ip, len), len))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Net(ip, len) => write!(f, "{ip}/{len}"),
            Rule::Node(id) => write!(f, "{id}"),
        }
    }
}

/// `ip` with every bit past `len` cleared; IPv4-mapped IPv6 as IPv4.
fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's view of IPv4) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl Rule {
    fn matches_ip(&self, ip: IpAddr) -> bool {
        match *self {
            Rule::Net(net, len) => {
                let ip = canonical(ip);
                ip.is_ipv4() == net.is_ipv4() && mask(ip, len) == net
            }
            Rule::Node(_) => false,
        }
    }

    fn matches(&self, ip: Option<IpAddr>, id: &NodeId) -> bool {
        match self {
            Rule::Node(n) => n == id,
            net => ip.is_some_and(|ip| net.matches_ip(ip)),
        }
    }
}

/// An allow list and a deny list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessList {
    /// If not empty, only peers matching one of these.
    pub allow: Vec<Rule>,
    /// Never these.
    pub deny: Vec<Rule>,
}

impl AccessList {
    /// Whether the list admits everyone.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Before the peer's ID is known: false only if its address alone
    /// settles that it is refused.
    pub fn admits_addr(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|r| r.matches_ip(ip)) {
            return false;
        }
        self.allow.is_empty()
            || self.allow.iter().any(|r| r.matches_ip(ip))
            || self.allow.iter().any(|r| matches!(r, Rule::Node(_)))
    }

    /// With the peer's ID (and its address, if it has one).
    pub fn admits(&self, ip: Option<IpAddr>, id: &NodeId) -> bool {
        if self.deny.iter().any(|r| r.matches(ip, id)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|r| r.matches(ip, id))
    }
}

/// The node's access configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessConfig {
    /// Who may link to this node (and whom it keeps links with).
    pub link: AccessList,
    /// Who may build circuits through this node.
    pub relay: AccessList,
    /// Links at most per IPv4 /24 or IPv6 /48 of underlay address (0: no
    /// limit).
    pub links_per_subnet: usize,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            link: AccessList::default(),
            relay: AccessList::default(),
            links_per_subnet: DEFAULT_LINKS_PER_SUBNET,
        }
    }
}

/// The subnet an address counts against: IPv4 /24, IPv6 /48.
pub fn link_subnet(ip: IpAddr) -> IpAddr {
    let ip = canonical(ip);
    if ip.is_ipv4() {
        mask(ip, 24)
    } else {
        mask(ip, 48)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Rule {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse() {
        assert_eq!(r("198.51.100.7/24"), Rule::Net(ip("198.51.100.0"), 24));
        assert_eq!(r("2001:db8::1/32"), Rule::Net(ip("2001:db8::"), 32));
        assert_eq!(r("198.51.100.7"), Rule::Net(ip("198.51.100.7"), 32));
        let id = "ab".repeat(32);
        assert_eq!(r(&id), Rule::Node(NodeId([0xab; 32])));
        assert_eq!(r(&id).to_string(), id);
        for bad in [
            "",
            "1.2.3.4/33",
            "::/129",
            "fc00::/x",
            "hello",
            &"ab".repeat(31),
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let open = AccessList::default();
        assert!(open.is_open());
        assert!(open.admits_addr(ip("203.0.113.1")));
        assert!(open.admits(None, &NodeId([1; 32])));

        let l = AccessList {
            allow: vec![r("198.51.100.0/24")],
            deny: vec![r("198.51.100.66")],
        };
        assert!(l.admits_addr(ip("198.51.100.5")));
        assert!(l.admits_addr(ip("::ffff:198.51.100.5")), "mapped IPv4");
        assert!(!l.admits_addr(ip("198.51.100.66")));
        assert!(!l.admits_addr(ip("203.0.113.1")));
        assert!(!l.admits_addr(ip("2001:db8::1")));
        assert!(
            !l.admits(None, &NodeId([1; 32])),
            "no address, allow by net"
        );

        let me = NodeId([7; 32]);
        let by_id = AccessList {
            allow: vec![Rule::Node(me)],
            deny: vec![],
        };
        // The handshake can't know the ID yet: decided at verification.
        assert!(by_id.admits_addr(ip("203.0.113.1")));
        assert!(by_id.admits(Some(ip("203.0.113.1")), &me));
        assert!(!by_id.admits(Some(ip("203.0.113.1")), &NodeId([8; 32])));

        let deny_id = AccessList {
            allow: vec![],
            deny: vec![Rule::Node(me)],
        };
        assert!(deny_id.admits_addr(ip("203.0.113.1")));
        assert!(!deny_id.admits(Some(ip("203.0.113.1")), &me));
    }

    #[test]
    fn subnets() {
        assert_eq!(link_subnet(ip("198.18.5.9")), ip("198.18.5.0"));
        assert_eq!(link_subnet(ip("::ffff:198.18.5.9")), ip("198.18.5.0"));
        assert_eq!(link_subnet(ip("2001:db8:1:2::9")), ip("2001:db8:1::"));
    }
}
