//! Peer URIs: everything another node needs to open a link to this one.
//!
//! ```text
//! qg://1/<node ID, 64 hex>/<X25519 link key, base64url without padding>/<endpoint>
//! ```
//! The `1` is the format version. The endpoint (`198.18.0.1:7300` or
//! `[2001:2::1]:7300`) may be left off for a node that only accepts links.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::identity::NodeId;

/// URI scheme prefix.
pub const SCHEME: &str = "qg://";
/// Current URI format version.
pub const URI_VERSION: &str = "1";

/// A parsed peer URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUri {
    /// The peer's node ID.
    pub node_id: NodeId,
    /// The peer's X25519 link key.
    pub link_key: [u8; 32],
    /// Where to reach it, if it can be reached.
    pub endpoint: Option<SocketAddr>,
}

/// Why a peer URI did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    /// The string does not start with `qg://`.
    #[error("peer URI must start with {SCHEME}")]
    Scheme,
    /// An unsupported format version.
    #[error("unsupported peer URI version {0:?} (this node speaks {URI_VERSION})")]
    Version(String),
    /// Wrong number of parts.
    #[error("peer URI must look like qg://1/NODE_ID/LINK_KEY[/IP:PORT]")]
    Shape,
    /// The node ID is not 64 hex digits.
    #[error("peer URI node ID must be 64 hex digits")]
    NodeId,
    /// The link key is not 32 bytes of base64url.
    #[error("peer URI link key must be 32 bytes in base64url")]
    LinkKey,
    /// The endpoint is not IP:PORT.
    #[error("peer URI endpoint must be IP:PORT (IPv6 in brackets): {0}")]
    Endpoint(String),
}

impl fmt::Display for PeerUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{URI_VERSION}/{}/{}",
            self.node_id,
            URL_SAFE_NO_PAD.encode(self.link_key)
        )?;
        if let Some(ep) = self.endpoint {
            write!(f, "/{ep}")?;
        }
        Ok(())
    }
}

impl FromStr for PeerUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<PeerUri, UriError> {
        let rest = s.trim().strip_prefix(SCHEME).ok_or(UriError::Scheme)?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() < 3 || parts.len() > 4 {
            return Err(UriError::Shape);
        }
        if parts[0] != URI_VERSION {
            return Err(UriError::Version(parts[0].chars().take(8).collect()));
        }
        let node_id = NodeId::parse(parts[1]).map_err(|_| UriError::NodeId)?;
        let key = URL_SAFE_NO_PAD
            .decode(parts[2])
            .map_err(|_| UriError::LinkKey)?;
        let link_key: [u8; 32] = key.try_into().map_err(|_| UriError::LinkKey)?;
        let endpoint = match parts.get(3) {
            None | Some(&"") => None,
            Some(ep) => Some(
                ep.parse::<SocketAddr>()
                    .map_err(|_| UriError::Endpoint(ep.chars().take(64).collect()))?,
            ),
        };
        Ok(PeerUri {
            node_id,
            link_key,
            endpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_v4_v6_none() {
        for ep in [
            Some("198.18.0.1:7300".parse().unwrap()),
            Some("[2001:2::1]:7300".parse().unwrap()),
            None,
        ] {
            let u = PeerUri {
                node_id: NodeId([1; 32]),
                link_key: [2; 32],
                endpoint: ep,
            };
            let s = u.to_string();
            assert_eq!(s.parse::<PeerUri>().unwrap(), u, "{s}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "qg://",
            "qg://2/aa/bb",
            "http://1/a/b",
            "qg://1/zz/AAAA",
            "qg://1/0101010101010101010101010101010101010101010101010101010101010101/AAAA",
            "qg://1/0101010101010101010101010101010101010101010101010101010101010101/AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI/nope",
            "qg://1/0101010101010101010101010101010101010101010101010101010101010101/AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI/1.2.3.4:5/x",
        ] {
            assert!(s.parse::<PeerUri>().is_err(), "{s}");
        }
    }
}
