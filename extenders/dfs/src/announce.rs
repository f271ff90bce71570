//! Provider records in the node's DHT, sans IO.
//!
//! One record per provided file or folder (never per chunk): under
//! namespace `qdfs`, key `prov/<ID in base64url>/<shard>`, value
//! `{"v":1,"port":P}`. The value holds no address: the DHT tells who
//! published it (a node ID, checked by the node's signature), and the
//! provider is that node's overlay address (`fc` + the first 15 bytes of
//! its ID) at port P. So a record can only point at its own publisher:
//! nobody can steer fetchers at someone else's address.
//!
//! A DHT key keeps at most 20 publishers (when full, the entry expiring
//! first makes room for a newer one). Each provider publishes under one of
//! [`SHARDS`] keys, chosen by its address, and fetchers read all of them:
//! up to 80 providers are visible at once, and because providers
//! re-publish every [`REPUBLISH_SECS`] with a fresh lifetime, the visible
//! set rotates through the rest. A fetcher needs only a handful.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use base64::Engine;
use serde_json::{json, Value};

use crate::id::Id;
use crate::node::DhtValue;

/// The DHT namespace of QuantumDFS.
pub const NAMESPACE: &str = "qdfs";
/// Keys per ID that providers spread over.
pub const SHARDS: u8 = 4;
/// Lifetime of a provider record.
pub const RECORD_TTL_SECS: u64 = 3600;
/// How often a provider publishes its records again.
pub const REPUBLISH_SECS: u64 = 1800;
/// Largest record value accepted (the DHT's own limit).
pub const MAX_RECORD: usize = 1024;

/// The DHT key of shard `shard` of `id`'s providers.
pub fn key(id: &Id, shard: u8) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.0);
    format!("prov/{b}/{shard}")
}

/// The shard a provider at `addr` publishes under.
pub fn shard_for(addr: &Ipv6Addr) -> u8 {
    blake3::hash(&addr.octets()).as_bytes()[0] % SHARDS
}

/// A provider record's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderRecord {
    /// The port `qdfs serve` listens on at the publisher's overlay address.
    pub port: u16,
}

/// Why a record value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Longer than [`MAX_RECORD`].
    #[error("record longer than {MAX_RECORD} bytes")]
    TooLong,
    /// Not the JSON object described above.
    #[error("record is not {{\"v\":1,\"port\":P}}")]
    Malformed,
    /// A record version this build does not read.
    #[error("record version {0} is not supported")]
    UnsupportedVersion(u64),
}

impl ProviderRecord {
    /// The value to publish.
    pub fn encode(&self) -> Vec<u8> {
        json!({"v": 1, "port": self.port}).to_string().into_bytes()
    }

    /// Parses a value read from the DHT.
    pub fn parse(data: &[u8]) -> Result<ProviderRecord, RecordError> {
        if data.len() > MAX_RECORD {
            return Err(RecordError::TooLong);
        }
        let v: Value = serde_json::from_slice(data).map_err(|_| RecordError::Malformed)?;
        let version = v
            .get("v")
            .and_then(Value::as_u64)
            .ok_or(RecordError::Malformed)?;
        if version != 1 {
            return Err(RecordError::UnsupportedVersion(version));
        }
        let port = v
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or(RecordError::Malformed)?;
        Ok(ProviderRecord { port })
    }
}

/// The overlay address of the node with this ID (64 hex digits).
pub fn overlay_address_of(node_id_hex: &str) -> Option<Ipv6Addr> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(node_id_hex, &mut id).ok()?;
    let mut a = [0u8; 16];
    a[0] = 0xfc;
    a[1..].copy_from_slice(&id[..15]);
    Some(Ipv6Addr::from(a))
}

/// The providers named by DHT values; malformed ones are skipped.
pub fn providers(values: &[DhtValue]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = values
        .iter()
        .filter_map(|v| {
            let addr = v.publisher.overlay_address();
            let rec = ProviderRecord::parse(&v.value).ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(addr, rec.port, 0, 0)))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_refusals() {
        let r = ProviderRecord { port: 7400 };
        assert_eq!(ProviderRecord::parse(&r.encode()), Ok(r));
        for bad in [
            &b"{}"[..],
            b"{\"v\":1}",
            b"{\"v\":1,\"port\":0}",
            b"{\"v\":1,\"port\":70000}",
            b"{\"v\":1,\"port\":\"80\"}",
            b"[1]",
            b"\xff",
        ] {
            assert!(ProviderRecord::parse(bad).is_err());
        }
        assert_eq!(
            ProviderRecord::parse(b"{\"v\":2,\"port\":1}"),
            Err(RecordError::UnsupportedVersion(2))
        );
        assert_eq!(
            ProviderRecord::parse(&vec![b' '; 2000]),
            Err(RecordError::TooLong)
        );
    }

    #[test]
    fn keys_fit_and_addresses_derive_from_publishers() {
        let id = Id([0xab; 32]);
        for s in 0..SHARDS {
            let k = key(&id, s);
            assert!(k.len() <= 64, "{k}");
        }
        let publisher = format!("{}{}", "12".repeat(15), "ff".repeat(17));
        let a = overlay_address_of(&publisher).unwrap();
        assert_eq!(a.to_string(), "fc12:1212:1212:1212:1212:1212:1212:1212");
        let publisher: crate::node::NodeId = publisher.parse().unwrap();
        assert_eq!(publisher.overlay_address(), a);
        let value = |publisher, value| DhtValue {
            publisher,
            seq: 1,
            expires: 0,
            value,
        };
        let values = vec![
            value(publisher, ProviderRecord { port: 9 }.encode()),
            value(publisher, b"junk".to_vec()),
        ];
        let p = providers(&values);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].port(), 9);
        assert!(shard_for(&a) < SHARDS);
    }
}
