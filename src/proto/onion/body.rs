//! The bodies of addressed commands that carry structure, beside the cell
//! format: what a source asks of a hop (EXTEND, AUTH, LOOKUP) and why a hop
//! refused an EXTEND. Each is parsed from hostile bytes into a typed value
//! (an error, never a panic) and emitted into the caller's buffer (no
//! allocation). The other commands carry raw bytes: DATA a link frame,
//! PROBE/PROBE_REPLY 8 echoed bytes, EXTENDED a CREATED handshake,
//! LOOKUP_REPLY a node record (empty: not found).

use std::net::{Ipv6Addr, SocketAddr};

use super::CREATE_LEN;
use crate::proto::identity::{parse_endpoint, write_endpoint, NodeId, MAX_ENDPOINT_LEN};

/// Why a command body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Shorter than its fields.
    #[error("command body too short")]
    Short,
    /// Longer than its fields.
    #[error("command body has trailing bytes")]
    Trailing,
    /// The endpoint is neither IPv4 nor IPv6.
    #[error("bad endpoint in command body")]
    BadEndpoint,
    /// Does not fit the buffer (or a cell).
    #[error("command body too large")]
    TooLarge,
}

/// EXTEND: link to this node and open a circuit to it with this CREATE.
///
/// ```text
/// node ID [32] | link key [32] | endpoint (4|ip4|port or 6|ip6|port) | CREATE [64]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extend {
    /// The next hop's node ID.
    pub node: NodeId,
    /// Its WireGuard link key.
    pub link_key: [u8; 32],
    /// Where it listens.
    pub endpoint: SocketAddr,
    /// The handshake to send it in a CREATE cell.
    pub create: [u8; CREATE_LEN],
}

impl Extend {
    /// The most bytes an EXTEND body takes (IPv6 endpoint).
    pub const MAX_LEN: usize = 64 + MAX_ENDPOINT_LEN + CREATE_LEN;

    /// Parses an EXTEND body.
    pub fn parse(b: &[u8]) -> Result<Extend, BodyError> {
        if b.len() < 64 {
            return Err(BodyError::Short);
        }
        let (node, link_key) = b[..64].split_at(32);
        let (endpoint, rest) = parse_endpoint(&b[64..]).ok_or(if b.len() > 64 {
            BodyError::BadEndpoint
        } else {
            BodyError::Short
        })?;
        let create = match rest.len() {
            CREATE_LEN => rest.try_into().map_err(|_| BodyError::Short)?,
            n if n < CREATE_LEN => return Err(BodyError::Short),
            _ => return Err(BodyError::Trailing),
        };
        Ok(Extend {
            node: NodeId(node.try_into().map_err(|_| BodyError::Short)?),
            link_key: link_key.try_into().map_err(|_| BodyError::Short)?,
            endpoint,
            create,
        })
    }

    /// Writes the body into `out`; returns its length.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, BodyError> {
        if out.len() < Extend::MAX_LEN {
            return Err(BodyError::TooLarge);
        }
        out[..32].copy_from_slice(&self.node.0);
        out[32..64].copy_from_slice(&self.link_key);
        let n = 64 + write_endpoint(&mut out[64..], self.endpoint);
        out[n..n + CREATE_LEN].copy_from_slice(&self.create);
        Ok(n + CREATE_LEN)
    }
}

/// AUTH: the source's signed record and its signature over the circuit's
/// binding value (see `auth_message`).
///
/// ```text
/// record length u16 | record | signature (the rest)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth<'a> {
    /// The source's node record (verified by the receiver).
    pub record: &'a [u8],
    /// RSA signature by the record's key.
    pub signature: &'a [u8],
}

impl<'a> Auth<'a> {
    /// Parses an AUTH body.
    pub fn parse(b: &'a [u8]) -> Result<Auth<'a>, BodyError> {
        let len = b.get(..2).ok_or(BodyError::Short)?;
        let rlen = u16::from_be_bytes([len[0], len[1]]) as usize;
        let rest = &b[2..];
        if rest.len() < rlen {
            return Err(BodyError::Short);
        }
        let (record, signature) = rest.split_at(rlen);
        Ok(Auth { record, signature })
    }

    /// Writes the body into `out`; returns its length.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, BodyError> {
        let n = 2 + self.record.len() + self.signature.len();
        if n > out.len() || self.record.len() > u16::MAX as usize {
            return Err(BodyError::TooLarge);
        }
        out[..2].copy_from_slice(&(self.record.len() as u16).to_be_bytes());
        let (r, s) = out[2..n].split_at_mut(self.record.len());
        r.copy_from_slice(self.record);
        s.copy_from_slice(self.signature);
        Ok(n)
    }
}

/// LOOKUP: the overlay address whose record the hop should find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    /// The address looked up.
    pub address: Ipv6Addr,
}

impl Lookup {
    /// Parses a LOOKUP body (exactly 16 bytes).
    pub fn parse(b: &[u8]) -> Result<Lookup, BodyError> {
        match <[u8; 16]>::try_from(b) {
            Ok(o) => Ok(Lookup {
                address: Ipv6Addr::from(o),
            }),
            Err(_) if b.len() < 16 => Err(BodyError::Short),
            Err(_) => Err(BodyError::Trailing),
        }
    }

    /// Writes the body into `out`; returns its length.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, BodyError> {
        out.get_mut(..16)
            .ok_or(BodyError::TooLarge)?
            .copy_from_slice(&self.address.octets());
        Ok(16)
    }
}

/// Why a hop refused an EXTEND (the one byte of EXTEND_FAILED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExtendRefusal {
    /// The hop does not relay.
    NotRelay = 1,
    /// The circuit at this hop is extended or authenticated already.
    AlreadyExtended = 2,
    /// The named next hop is this hop itself, or the previous one.
    BadTarget = 3,
    /// No link to the next hop could be made.
    NoLink = 4,
}

impl ExtendRefusal {
    /// Parses the reason byte (None: absent or unknown).
    pub fn parse(b: &[u8]) -> Option<ExtendRefusal> {
        Some(match b.first()? {
            1 => ExtendRefusal::NotRelay,
            2 => ExtendRefusal::AlreadyExtended,
            3 => ExtendRefusal::BadTarget,
            4 => ExtendRefusal::NoLink,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extend(ep: &str) -> Extend {
        Extend {
            node: NodeId([7; 32]),
            link_key: [9; 32],
            endpoint: ep.parse().unwrap(),
            create: [3; CREATE_LEN],
        }
    }

    #[test]
    fn bodies_round_trip_and_refuse_bad_lengths() {
        let mut buf = [0u8; 512];
        for ep in ["198.18.0.1:7300", "[2001:db8::1]:9"] {
            let e = extend(ep);
            let n = e.emit(&mut buf).unwrap();
            assert_eq!(Extend::parse(&buf[..n]).unwrap(), e);
            assert_eq!(Extend::parse(&buf[..n - 1]), Err(BodyError::Short));
            assert_eq!(Extend::parse(&buf[..n + 1]), Err(BodyError::Trailing));
        }
        let mut bad = buf;
        bad[64] = 5;
        assert_eq!(Extend::parse(&bad[..200]), Err(BodyError::BadEndpoint));
        assert_eq!(Extend::parse(&buf[..10]), Err(BodyError::Short));

        let a = Auth {
            record: b"record bytes",
            signature: b"sig",
        };
        let n = a.emit(&mut buf).unwrap();
        assert_eq!(Auth::parse(&buf[..n]).unwrap(), a);
        assert_eq!(Auth::parse(&buf[..5]), Err(BodyError::Short));
        assert_eq!(a.emit(&mut buf[..10]), Err(BodyError::TooLarge));

        let l = Lookup {
            address: "fd00::1".parse().unwrap(),
        };
        let n = l.emit(&mut buf).unwrap();
        assert_eq!(Lookup::parse(&buf[..n]).unwrap(), l);
        assert_eq!(Lookup::parse(&buf[..15]), Err(BodyError::Short));
        assert_eq!(Lookup::parse(&buf[..17]), Err(BodyError::Trailing));

        assert_eq!(ExtendRefusal::parse(&[4]), Some(ExtendRefusal::NoLink));
        assert_eq!(ExtendRefusal::parse(&[]), None);
        assert_eq!(ExtendRefusal::parse(&[99]), None);
    }

    #[test]
    fn random_bodies_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = [0u8; 300];
        for i in 0..20_000usize {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if i % 3 == 0 {
                buf[64] = 4 + 2 * (i % 2) as u8;
            }
            let b = &buf[..i % 300];
            let _ = Extend::parse(b);
            let _ = Auth::parse(b);
            let _ = Lookup::parse(b);
            let _ = ExtendRefusal::parse(b);
        }
    }
}
