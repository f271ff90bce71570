//! QuantumGate's control API for extenders: the requests and answers of the
//! node's control socket as types, the API version, the limits the node
//! enforces, and a blocking [`Client`].
//!
//! The wire format is JSON lines: one request object per connection,
//! `{"cmd":"status"}`, `{"cmd":"dht_get","namespace":"n","key":"k"}`, ...,
//! answered by one line, `{"ok":true,"status":{...}}` or
//! `{"ok":false,"error":"..."}`. [`Request`] (one variant per command)
//! serializes to exactly that request object (serde's internal tag `cmd`),
//! and the node reads every line with [`Request::parse`] into the same
//! type, limits included, so the two cannot drift apart. Each request gets
//! one typed answer ([`Status`], [`Peers`], [`Circuits`], [`Lookup`],
//! [`Stored`], [`DhtValues`], [`Identity`], [`ExtenderKey`], [`Services`]),
//! gathered in [`Response`]; the node's handler returns a [`Response`] and
//! the CLI renders one. This crate depends on nothing in the kernel crate
//! (`qgate`); the kernel depends on it.
//!
//! Versioning: [`API_VERSION`] is what this crate speaks. The node reports
//! its own as `api` in `identity` and `status`. It is raised when a request
//! or an answer field changes meaning or goes away, and when commands are
//! added (an older node answers an unknown command with an error, which the
//! client turns into [`Error::Unsupported`]); new answer fields alone don't
//! raise it, and clients ignore fields they don't know.
//!
//! Trust: the control socket is the trust boundary. Whoever can connect to
//! it (root, the node's user, members of the socket's group) may make every
//! request, for every extender name: an extender's key and its service
//! records are kept from other users, not from other programs that share
//! the socket.

#![deny(missing_docs, unreachable_pub)]

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod client;
mod report;
mod request;

pub use client::{Client, Error};
pub use report::{
    Circuit, CircuitState, Circuits, Counters, DataPath, Inbound, Link, LinkState, LockHolder,
    LockHolds, Lookup, LookupRecord, NoCircuit, Peer, Peers, RelayStats, Relayed, Role,
    RouteOutcome, Routing, Source, Status, Tun,
};
pub use request::{check_name, Request, RequestError, Target, COMMANDS};

/// The control API version this crate speaks. Version 2 added `identity`,
/// `extender_key`, `service_announce` and `service_lookup`; nothing of
/// version 1 changed.
pub const API_VERSION: u32 = 2;

/// The control socket's default path.
pub const DEFAULT_SOCKET: &str = "/var/lib/qgate/control.sock";

/// Longest request line the node reads (without its newline).
pub const MAX_REQUEST: usize = 4096;
/// DHT namespace: 1 to this many bytes.
pub const MAX_NAMESPACE: usize = 32;
/// DHT key: 1 to this many bytes.
pub const MAX_KEY: usize = 64;
/// DHT value: at most this many bytes.
pub const MAX_VALUE: usize = 1024;
/// Longest lifetime of a DHT value or a service record, in seconds (24 h).
pub const MAX_TTL: u64 = 24 * 3600;
/// Lifetime when a request names none, in seconds (1 h).
pub const DEFAULT_TTL: u64 = 3600;
/// Publishers a DHT key keeps at most; when full, the entry expiring first
/// gives way to a newer one.
pub const MAX_PUBLISHERS: usize = 20;
/// Extender and service names: 1 to this many bytes of `a-z 0-9 . _ -`.
pub const MAX_NAME: usize = 32;
/// The DHT namespace service records live in (key: the service's name).
pub const SERVICE_NAMESPACE: &str = "qgate.service";

/// A node's ID: the SHA-256 of its RSA public key (64 hex digits as text).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The node's overlay address: `fc` followed by the first 15 bytes of
    /// the ID.
    pub fn overlay_address(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a[0] = 0xfc;
        a[1..].copy_from_slice(&self.0[..15]);
        Ipv6Addr::from(a)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = String;

    fn from_str(s: &str) -> Result<NodeId, String> {
        let bad = || {
            format!(
                "{:?} is not a node ID (64 hex digits)",
                &s[..s.len().min(70)]
            )
        };
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 32];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(NodeId(id))
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NodeId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Answer to [`Request::Identity`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node's API version.
    pub api: u32,
    /// The node's program version (`qgate` crate version).
    pub version: String,
    /// The node's ID.
    pub node_id: NodeId,
    /// The node's overlay address (the one extenders bind to).
    pub address: Ipv6Addr,
}

/// Answer to [`Request::ExtenderKey`]: 32 bytes only this node can derive,
/// the same for the same name for as long as the node keeps its identity,
/// different for every other name and every other node. What the extender
/// does with it is its own business (seal its state, derive its own keys).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtenderKey {
    /// The extender's name.
    pub name: String,
    /// The key (base64 on the wire).
    #[serde(with = "b64_32")]
    pub key: [u8; 32],
}

impl fmt::Debug for ExtenderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtenderKey")
            .field("name", &self.name)
            .field("key", &"<secret>")
            .finish()
    }
}

/// Answer to [`Request::DhtPut`] and [`Request::ServiceAnnounce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// On how many nodes the value was stored (0: only here for now; the
    /// node publishes it again periodically).
    pub stored_at: u64,
    /// The lifetime it got, in seconds.
    pub ttl: u64,
}

/// One value read from the DHT. On the wire the node adds `text`: the value
/// as a string when it is UTF-8 (what `qgate dht get` shows); it is not kept
/// here, [`DhtValue::text`] derives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DhtValue {
    /// The node that signed it.
    pub publisher: NodeId,
    /// The publisher's sequence number (newer is larger).
    pub seq: u64,
    /// When it expires, in Unix seconds.
    pub expires: u64,
    /// The value (base64 on the wire).
    #[serde(with = "b64")]
    pub value: Vec<u8>,
}

impl DhtValue {
    /// The value as text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

impl Serialize for DhtValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            publisher: NodeId,
            seq: u64,
            expires: u64,
            #[serde(serialize_with = "b64::serialize")]
            value: &'a [u8],
            text: Option<&'a str>,
        }
        Wire {
            publisher: self.publisher,
            seq: self.seq,
            expires: self.expires,
            value: &self.value,
            text: self.text(),
        }
        .serialize(s)
    }
}

/// Answer to [`Request::DhtGet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtValues {
    /// The newest value per publisher.
    pub values: Vec<DhtValue>,
    /// Queries the read sent.
    #[serde(default)]
    pub queries: u64,
}

/// A service record: the DHT value under ([`SERVICE_NAMESPACE`], name),
/// signed by the node that offers the service (JSON, a few dozen bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The port on the publisher's overlay address.
    pub port: u16,
    /// The service's own protocol version.
    pub version: u32,
}

impl ServiceRecord {
    /// The record as a DHT value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a DHT value (refuses port 0 and anything over
    /// [`MAX_VALUE`]).
    pub fn decode(value: &[u8]) -> Result<ServiceRecord, String> {
        if value.len() > MAX_VALUE {
            return Err("service record longer than a DHT value".into());
        }
        let r: ServiceRecord =
            serde_json::from_slice(value).map_err(|e| format!("bad service record: {e}"))?;
        if r.port == 0 {
            return Err("service record with port 0".into());
        }
        Ok(r)
    }
}

/// One node offering a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceProvider {
    /// The node's ID (it signed the record).
    pub node_id: NodeId,
    /// Its overlay address (derived from the ID).
    pub address: Ipv6Addr,
    /// The service's port there.
    pub port: u16,
    /// The service's protocol version there.
    pub version: u32,
    /// When the record expires, in Unix seconds.
    pub expires: u64,
}

/// Answer to [`Request::ServiceLookup`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    /// Who offers it (at most [`MAX_PUBLISHERS`]; records that don't parse
    /// are left out).
    pub providers: Vec<ServiceProvider>,
}

impl Services {
    /// The providers found in a service key's DHT values.
    pub fn from_values(values: &[DhtValue]) -> Services {
        Services {
            providers: values
                .iter()
                .filter_map(|v| {
                    let r = ServiceRecord::decode(&v.value).ok()?;
                    Some(ServiceProvider {
                        node_id: v.publisher,
                        address: v.publisher.overlay_address(),
                        port: r.port,
                        version: r.version,
                        expires: v.expires,
                    })
                })
                .collect(),
        }
    }
}

/// The answer line: `{"ok":true,"status":...}` or
/// `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The answer's object when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// Why not when it didn't (one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A security preset: routes and traffic shape chosen together (`preset`
/// in the node's configuration and in [`Status`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Direct links only: fastest, no circuits.
    Fast,
    /// Circuits of one or two relays when there are relays enough, else
    /// direct (the default).
    #[default]
    Balanced,
    /// Two or three relays, never direct; cover traffic, fixed cell size,
    /// no compression.
    Private,
}

impl Preset {
    /// Every preset, in the order the documentation lists them.
    pub const ALL: [Preset; 3] = [Preset::Fast, Preset::Balanced, Preset::Private];

    /// The preset's name (`fast`, `balanced`, `private`).
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::Fast => "fast",
            Preset::Balanced => "balanced",
            Preset::Private => "private",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no preset; says which names are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not one of \"fast\", \"balanced\", \"private\"")]
pub struct UnknownPreset(pub String);

impl FromStr for Preset {
    type Err = UnknownPreset;

    fn from_str(s: &str) -> Result<Preset, UnknownPreset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPreset(s.chars().take(40).collect()))
    }
}

/// A typed answer: what the node puts in `status` for each request (see
/// [`Response::decode`] for which request gets which). Serializes to the
/// answer's object itself, with no tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    /// To [`Request::Status`].
    Status(Box<Status>),
    /// To [`Request::Peers`].
    Peers(Box<Peers>),
    /// To [`Request::Circuits`].
    Circuits(Box<Circuits>),
    /// To [`Request::Lookup`].
    Lookup(Box<Lookup>),
    /// To [`Request::DhtPut`] and [`Request::ServiceAnnounce`].
    Stored(Stored),
    /// To [`Request::DhtGet`].
    DhtValues(DhtValues),
    /// To [`Request::Identity`].
    Identity(Identity),
    /// To [`Request::ExtenderKey`].
    ExtenderKey(ExtenderKey),
    /// To [`Request::ServiceLookup`].
    Services(Services),
}

impl Response {
    /// Reads the answer's object as the answer to `req`.
    pub fn decode(req: &Request, v: serde_json::Value) -> Result<Response, serde_json::Error> {
        use serde_json::from_value as de;
        Ok(match req {
            Request::Status => Response::Status(de(v)?),
            Request::Peers => Response::Peers(de(v)?),
            Request::Circuits => Response::Circuits(de(v)?),
            Request::Lookup { .. } => Response::Lookup(de(v)?),
            Request::DhtPut { .. } | Request::ServiceAnnounce { .. } => Response::Stored(de(v)?),
            Request::DhtGet { .. } => Response::DhtValues(de(v)?),
            Request::Identity => Response::Identity(de(v)?),
            Request::ExtenderKey { .. } => Response::ExtenderKey(de(v)?),
            Request::ServiceLookup { .. } => Response::Services(de(v)?),
        })
    }

    /// Whether this is the kind of answer `req` gets.
    pub fn answers(&self, req: &Request) -> bool {
        matches!(
            (self, req),
            (Response::Status(_), Request::Status)
                | (Response::Peers(_), Request::Peers)
                | (Response::Circuits(_), Request::Circuits)
                | (Response::Lookup(_), Request::Lookup { .. })
                | (
                    Response::Stored(_),
                    Request::DhtPut { .. } | Request::ServiceAnnounce { .. }
                )
                | (Response::DhtValues(_), Request::DhtGet { .. })
                | (Response::Identity(_), Request::Identity)
                | (Response::ExtenderKey(_), Request::ExtenderKey { .. })
                | (Response::Services(_), Request::ServiceLookup { .. })
        )
    }
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| serde::de::Error::custom("value must be base64"))
    }
}

mod b64_32 {
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        super::b64::serialize(v, s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        super::b64::deserialize(d)?
            .try_into()
            .map_err(|_| serde::de::Error::custom("key must be 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_keep_the_wire_format() {
        let cases = [
            (Request::Status, json!({"cmd": "status"})),
            (Request::Identity, json!({"cmd": "identity"})),
            (
                Request::DhtPut {
                    namespace: "n".into(),
                    key: "k".into(),
                    value: b"v".to_vec(),
                    ttl: Some(60),
                },
                json!({"cmd": "dht_put", "namespace": "n", "key": "k", "value": "dg==", "ttl": 60}),
            ),
            (
                Request::DhtGet {
                    namespace: "n".into(),
                    key: "k".into(),
                },
                json!({"cmd": "dht_get", "namespace": "n", "key": "k"}),
            ),
            (
                Request::ExtenderKey { name: "dfs".into() },
                json!({"cmd": "extender_key", "name": "dfs"}),
            ),
            (
                Request::ServiceAnnounce {
                    name: "dfs".into(),
                    port: 7400,
                    version: 1,
                    ttl: None,
                },
                json!({"cmd": "service_announce", "name": "dfs", "port": 7400, "version": 1}),
            ),
        ];
        for (req, wire) in cases {
            assert_eq!(serde_json::to_value(&req).unwrap(), wire);
            assert_eq!(serde_json::from_value::<Request>(wire).unwrap(), req);
            req.validate().unwrap();
        }
        // Unknown fields are ignored, as the node always did.
        let r: Request = serde_json::from_str(r#"{"cmd":"status","x":1}"#).unwrap();
        assert_eq!(r, Request::Status);
    }

    #[test]
    fn validation_refuses_what_the_node_refuses() {
        let put = |ns: &str, key: &str, n: usize, ttl| Request::DhtPut {
            namespace: ns.into(),
            key: key.into(),
            value: vec![0; n],
            ttl,
        };
        assert!(put("", "k", 1, None).validate().is_err());
        assert!(put(&"n".repeat(33), "k", 1, None).validate().is_err());
        assert!(put("n", &"k".repeat(65), 1, None).validate().is_err());
        assert!(put("n", "k", 1025, None).validate().is_err());
        assert!(put("n", "k", 1024, Some(0)).validate().is_err());
        assert!(put("n", "k", 1024, Some(MAX_TTL + 1)).validate().is_err());
        put("n", "k", 1024, Some(MAX_TTL)).validate().unwrap();
        for bad in ["", "DFS", "a/b", "a b", "é", &"a".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("quantum-dfs.v1_x").unwrap();
        let ann = Request::ServiceAnnounce {
            name: "dfs".into(),
            port: 0,
            version: 1,
            ttl: None,
        };
        assert!(ann.validate().is_err());
    }

    #[test]
    fn node_ids_and_service_records() {
        let id: NodeId = "fc".repeat(32).parse().unwrap();
        assert_eq!(id.to_string(), "fc".repeat(32));
        assert_eq!(id.overlay_address().octets()[0], 0xfc);
        assert_eq!(id.overlay_address().octets()[1..], [0xfc; 15]);
        for bad in ["", "zz", &"0".repeat(63), &"g".repeat(64), &"é".repeat(32)] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad:?}");
        }
        let rec = ServiceRecord {
            port: 7400,
            version: 1,
        };
        assert_eq!(ServiceRecord::decode(&rec.encode()).unwrap(), rec);
        for bad in [
            &b""[..],
            b"{}",
            b"{\"port\":0,\"version\":1}",
            b"\xff",
            b"[1]",
        ] {
            assert!(ServiceRecord::decode(bad).is_err());
        }
        let values = vec![
            DhtValue {
                publisher: id,
                seq: 1,
                expires: 9,
                value: rec.encode(),
            },
            DhtValue {
                publisher: NodeId([1; 32]),
                seq: 1,
                expires: 9,
                value: b"junk".to_vec(),
            },
        ];
        let s = Services::from_values(&values);
        assert_eq!(s.providers.len(), 1);
        assert_eq!(s.providers[0].address, id.overlay_address());
        assert_eq!(s.providers[0].port, 7400);
    }

    #[test]
    fn extender_keys_are_not_logged() {
        let k = ExtenderKey {
            name: "dfs".into(),
            key: [7; 32],
        };
        assert!(!format!("{k:?}").contains('7'));
        let v = serde_json::to_value(&k).unwrap();
        assert_eq!(serde_json::from_value::<ExtenderKey>(v).unwrap(), k);
    }

    #[test]
    fn dht_values_carry_text_on_the_wire_and_answers_decode_by_request() {
        let v = DhtValue {
            publisher: NodeId([0xab; 32]),
            seq: 2,
            expires: 9,
            value: b"hi".to_vec(),
        };
        let wire = serde_json::to_value(&v).unwrap();
        assert_eq!(wire["value"], "aGk=");
        assert_eq!(wire["text"], "hi");
        assert_eq!(serde_json::from_value::<DhtValue>(wire).unwrap(), v);
        let binary = DhtValue {
            value: vec![0xff],
            ..v.clone()
        };
        assert_eq!(serde_json::to_value(&binary).unwrap()["text"], json!(null));

        let get = Request::DhtGet {
            namespace: "n".into(),
            key: "k".into(),
        };
        let answer = json!({"values": [serde_json::to_value(&v).unwrap()], "queries": 3});
        let r = Response::decode(&get, answer.clone()).unwrap();
        assert!(r.answers(&get) && !r.answers(&Request::Status));
        assert_eq!(serde_json::to_value(&r).unwrap(), answer);
        // The same object is no answer to `status`.
        assert!(Response::decode(&Request::Status, answer).is_err());
    }

    #[test]
    fn presets_by_name() {
        for p in Preset::ALL {
            assert_eq!(p.as_str().parse::<Preset>(), Ok(p));
            assert_eq!(serde_json::to_value(p).unwrap(), json!(p.as_str()));
        }
        assert_eq!(Preset::default(), Preset::Balanced);
        let e = "paranoid".parse::<Preset>().unwrap_err().to_string();
        assert_eq!(
            e,
            "\"paranoid\" is not one of \"fast\", \"balanced\", \"private\""
        );
    }
}
