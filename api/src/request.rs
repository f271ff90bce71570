//! The requests: one enum for every command the node accepts, its wire
//! form (serde's internal tag `cmd`), and the one parser the node runs on
//! every request line ([`Request::parse`]): shape, command, argument types
//! and limits, with an error that says which command and what was wrong.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{
    NodeId, DEFAULT_TTL, MAX_KEY, MAX_NAME, MAX_NAMESPACE, MAX_REQUEST, MAX_TTL, MAX_VALUE,
};

/// The commands, as named on the wire, in the order the node lists them
/// when it refuses an unknown one.
pub const COMMANDS: [&str; 10] = [
    "status",
    "peers",
    "circuits",
    "lookup",
    "dht_put",
    "dht_get",
    "identity",
    "extender_key",
    "service_announce",
    "service_lookup",
];

/// One request to the node. Serializes to the wire's request object, with
/// the command in `cmd`; [`Request::parse`] reads one back, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The node's report (answer: [`crate::Status`]).
    Status,
    /// The node's routing table (answer: [`crate::Peers`]).
    Peers,
    /// The node's circuits (answer: [`crate::Circuits`]).
    Circuits,
    /// Finds a node's record by node ID or overlay address (answer:
    /// [`crate::Lookup`]).
    Lookup {
        /// A node ID (64 hex digits) or an overlay address.
        target: Target,
    },
    /// Publishes a value, signed by the node (answer: [`crate::Stored`]).
    DhtPut {
        /// 1 to [`MAX_NAMESPACE`] bytes.
        namespace: String,
        /// 1 to [`MAX_KEY`] bytes.
        key: String,
        /// At most [`MAX_VALUE`] bytes (base64 on the wire).
        #[serde(with = "crate::b64")]
        value: Vec<u8>,
        /// 1 to [`MAX_TTL`] seconds; [`DEFAULT_TTL`] when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl: Option<u64>,
    },
    /// Reads a key's values, the newest per publisher (answer:
    /// [`crate::DhtValues`]).
    DhtGet {
        /// 1 to [`MAX_NAMESPACE`] bytes.
        namespace: String,
        /// 1 to [`MAX_KEY`] bytes.
        key: String,
    },
    /// Who the node is (answer: [`crate::Identity`]). Since version 2.
    Identity,
    /// The key of the extender `name` (answer: [`crate::ExtenderKey`]).
    /// Since version 2.
    ExtenderKey {
        /// The extender's name (see [`check_name`]).
        name: String,
    },
    /// Announces that this node offers service `name` on `port` of its
    /// overlay address: a [`crate::ServiceRecord`] published in the DHT
    /// under [`crate::SERVICE_NAMESPACE`], signed by the node (answer:
    /// [`crate::Stored`]). Since version 2.
    ServiceAnnounce {
        /// The service's name (see [`check_name`]).
        name: String,
        /// TCP or UDP port on the overlay address (not 0).
        port: u16,
        /// The service's own protocol version.
        version: u32,
        /// 1 to [`MAX_TTL`] seconds; [`DEFAULT_TTL`] when absent. Announce
        /// again before it runs out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl: Option<u64>,
    },
    /// Finds the nodes offering service `name` (answer:
    /// [`crate::Services`]). Since version 2.
    ServiceLookup {
        /// The service's name (see [`check_name`]).
        name: String,
    },
}

/// What a lookup looks for; a string on the wire (64 hex digits, or an
/// overlay address in `fc00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A node ID.
    Id(NodeId),
    /// An overlay address.
    Address(Ipv6Addr),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Id(id) => id.fmt(f),
            Target::Address(a) => a.fmt(f),
        }
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(t: &str) -> Result<Target, String> {
        if let Ok(id) = t.parse::<NodeId>() {
            return Ok(Target::Id(id));
        }
        match t.parse::<Ipv6Addr>() {
            Ok(a) if a.octets()[0] == 0xfc => Ok(Target::Address(a)),
            Ok(a) => Err(format!("{a} is not an overlay address (fc00::/8)")),
            Err(_) => {
                let shown: String = t.chars().take(70).collect();
                Err(format!(
                    "{shown:?} is neither a node ID (64 hex digits) nor an overlay address"
                ))
            }
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Target, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a request line was refused, with the command when there was one.
/// The node answers with `bad request: ` and this (one line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Over [`MAX_REQUEST`] bytes.
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// Not UTF-8.
    #[error("request is not UTF-8")]
    NotUtf8,
    /// Nothing but white space.
    #[error("empty request")]
    Empty,
    /// Not JSON (serde's message).
    #[error("request is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("request must be a JSON object like {{\"cmd\":\"status\"}}")]
    NotObject,
    /// No `cmd`.
    #[error("request has no \"cmd\"")]
    NoCommand,
    /// `cmd` is not a string.
    #[error("\"cmd\" must be a string")]
    CommandNotString,
    /// A command this node does not know. Clients read
    /// `unknown command "NAME"` as "the node's API is older".
    #[error("unknown command {0:?} (commands: {list})", list = COMMANDS.join(", "))]
    UnknownCommand(String),
    /// An argument missing or of the wrong type (serde's message).
    #[error("{command}: {detail}")]
    Argument {
        /// The command.
        command: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// An argument out of the node's limits.
    #[error("{command}: {detail}")]
    Limit {
        /// The command.
        command: &'static str,
        /// Which argument and what the limit is.
        detail: String,
    },
}

/// The first line of a serde message, at most 200 characters.
fn one_line(e: impl fmt::Display) -> String {
    let text = e.to_string();
    text.lines()
        .next()
        .unwrap_or("malformed")
        .chars()
        .take(200)
        .collect()
}

impl Request {
    /// Parses and checks one request line as the node reads it (a trailing
    /// newline is allowed): at most [`MAX_REQUEST`] bytes of UTF-8, one
    /// JSON object with a known `cmd`, arguments of the right types, within
    /// the limits ([`Request::validate`]). Unknown fields are ignored.
    pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_REQUEST {
            return Err(RequestError::TooLong);
        }
        let text = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
        if text.trim().is_empty() {
            return Err(RequestError::Empty);
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| RequestError::NotJson(one_line(e)))?;
        let Some(obj) = value.as_object() else {
            return Err(RequestError::NotObject);
        };
        let command = match obj.get("cmd") {
            None => return Err(RequestError::NoCommand),
            Some(serde_json::Value::String(c)) => c,
            Some(_) => return Err(RequestError::CommandNotString),
        };
        let Some(command) = COMMANDS.iter().copied().find(|c| c == command) else {
            return Err(RequestError::UnknownCommand(
                command.chars().take(40).collect(),
            ));
        };
        let req: Request = serde_json::from_value(value).map_err(|e| RequestError::Argument {
            command,
            detail: one_line(e),
        })?;
        req.validate()?;
        Ok(req)
    }

    /// The command's name on the wire (`"dht_get"`, ...).
    pub fn command(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Peers => "peers",
            Request::Circuits => "circuits",
            Request::Lookup { .. } => "lookup",
            Request::DhtPut { .. } => "dht_put",
            Request::DhtGet { .. } => "dht_get",
            Request::Identity => "identity",
            Request::ExtenderKey { .. } => "extender_key",
            Request::ServiceAnnounce { .. } => "service_announce",
            Request::ServiceLookup { .. } => "service_lookup",
        }
    }

    /// The API version that introduced the command.
    pub fn since(&self) -> u32 {
        match self {
            Request::Identity
            | Request::ExtenderKey { .. }
            | Request::ServiceAnnounce { .. }
            | Request::ServiceLookup { .. } => 2,
            _ => 1,
        }
    }

    /// The lifetime a `dht_put` or `service_announce` asks for, with the
    /// default filled in (None for other commands).
    pub fn ttl(&self) -> Option<u64> {
        match self {
            Request::DhtPut { ttl, .. } | Request::ServiceAnnounce { ttl, .. } => {
                Some(ttl.unwrap_or(DEFAULT_TTL))
            }
            _ => None,
        }
    }

    /// Checks the values against the node's limits (sizes, names, ttl,
    /// port) without I/O: what passes is not refused for its shape.
    /// [`Request::parse`] runs it on every request the node reads, and the
    /// [`crate::Client`] before sending.
    pub fn validate(&self) -> Result<(), RequestError> {
        let command = self.command();
        let limit = |detail: String| RequestError::Limit { command, detail };
        let sized = |what: &str, s: &str, max: usize| {
            if s.is_empty() || s.len() > max {
                Err(limit(format!("{what:?} must be 1 to {max} bytes")))
            } else {
                Ok(())
            }
        };
        let ttl = |t: &Option<u64>| match t {
            Some(t) if *t == 0 || *t > MAX_TTL => {
                Err(limit(format!("\"ttl\" must be 1 to {MAX_TTL} seconds")))
            }
            _ => Ok(()),
        };
        let name = |n: &str| check_name(n).map_err(limit);
        match self {
            Request::Status
            | Request::Peers
            | Request::Circuits
            | Request::Identity
            | Request::Lookup { .. } => Ok(()),
            Request::DhtPut {
                namespace,
                key,
                value,
                ttl: t,
            } => {
                sized("namespace", namespace, MAX_NAMESPACE)?;
                sized("key", key, MAX_KEY)?;
                if value.len() > MAX_VALUE {
                    return Err(limit(format!("value longer than {MAX_VALUE} bytes")));
                }
                ttl(t)
            }
            Request::DhtGet { namespace, key } => {
                sized("namespace", namespace, MAX_NAMESPACE)?;
                sized("key", key, MAX_KEY)
            }
            Request::ExtenderKey { name: n } | Request::ServiceLookup { name: n } => name(n),
            Request::ServiceAnnounce {
                name: n,
                port,
                ttl: t,
                ..
            } => {
                name(n)?;
                if *port == 0 {
                    return Err(limit("\"port\" must be 1 to 65535".into()));
                }
                ttl(t)
            }
        }
    }
}

/// Checks an extender's or a service's name: 1 to [`MAX_NAME`] bytes of
/// lowercase ASCII letters, digits, `.`, `_` and `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c);
    if name.is_empty() || name.len() > MAX_NAME || !name.bytes().all(ok) {
        let shown: String = name.chars().take(40).collect();
        return Err(format!(
            "name {shown:?} must be 1 to {MAX_NAME} of a-z, 0-9, '.', '_', '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_get_one_line_with_context() {
        let long = format!(
            "{{\"cmd\":\"status\",\"x\":\"{}\"}}",
            "a".repeat(MAX_REQUEST)
        );
        for (line, want) in [
            (long.as_bytes(), "longer than 4096"),
            (&[0xff, 0xfe, b'{', b'}'][..], "not UTF-8"),
            (b"", "empty"),
            (b"  \n", "empty"),
            (b"status", "not JSON"),
            (b"{\"cmd\":", "not JSON"),
            (b"[\"status\"]", "JSON object"),
            (b"\"status\"", "JSON object"),
            (b"42", "JSON object"),
            (b"{}", "no \"cmd\""),
            (b"{\"cmd\":7}", "must be a string"),
            (b"{\"cmd\":null}", "must be a string"),
            (b"{\"cmd\":\"reboot\"}", "unknown command \"reboot\" (commands: status, peers,"),
            (b"{\"cmd\":\"lookup\"}", "lookup: missing field `target`"),
            (b"{\"cmd\":\"lookup\",\"target\":5}", "lookup: invalid type: integer `5`, expected a string"),
            (b"{\"cmd\":\"lookup\",\"target\":\"fd00::1\"}", "not an overlay address"),
            (b"{\"cmd\":\"lookup\",\"target\":\"bob\"}", "neither a node ID"),
            (b"{\"cmd\":\"dht_get\",\"namespace\":\"a\",\"key\":[1]}", "dht_get: invalid type: sequence"),
            (
                b"{\"cmd\":\"dht_put\",\"namespace\":\"a\",\"key\":\"k\",\"value\":\"dg==\",\"ttl\":\"1h\"}",
                "dht_put: invalid type: string \"1h\", expected u64",
            ),
            (
                b"{\"cmd\":\"dht_put\",\"namespace\":\"a\",\"key\":\"k\",\"value\":\"dg==\",\"ttl\":-1}",
                "dht_put: invalid value: integer `-1`, expected u64",
            ),
            (
                b"{\"cmd\":\"dht_put\",\"namespace\":\"\",\"key\":\"k\",\"value\":\"dg==\"}",
                "dht_put: \"namespace\" must be 1 to 32 bytes",
            ),
            (br#"{"cmd":"extender_key"}"#, "extender_key: missing field `name`"),
            (br#"{"cmd":"extender_key","name":"../x"}"#, "extender_key: name \"../x\" must be 1 to 32"),
            (br#"{"cmd":"extender_key","name":""}"#, "must be 1 to 32"),
            (
                br#"{"cmd":"service_announce","name":"dfs","version":1}"#,
                "service_announce: missing field `port`",
            ),
            (
                br#"{"cmd":"service_announce","name":"dfs","port":0,"version":1}"#,
                "service_announce: \"port\" must be 1 to 65535",
            ),
            (
                br#"{"cmd":"service_announce","name":"dfs","port":70000,"version":1}"#,
                "70000",
            ),
            (
                br#"{"cmd":"service_announce","name":"dfs","port":1,"version":1,"ttl":0}"#,
                "\"ttl\" must be 1 to",
            ),
            (br#"{"cmd":"service_lookup","name":"DFS"}"#, "must be 1 to 32"),
            (
                br#"{"cmd":"dht_put","namespace":"n","key":"k","value":"!!"}"#,
                "base64",
            ),
        ] {
            let e = Request::parse(line).unwrap_err().to_string();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(line));
            assert!(!e.contains('\n'));
        }
        // Exactly at the limit is fine.
        let pad = MAX_REQUEST - "{\"cmd\":\"status\",\"x\":\"\"}".len();
        let at = format!("{{\"cmd\":\"status\",\"x\":\"{}\"}}", "a".repeat(pad));
        assert_eq!(at.len(), MAX_REQUEST);
        assert_eq!(Request::parse(at.as_bytes()), Ok(Request::Status));
    }

    #[test]
    fn requests_parse_and_round_trip() {
        let id = "ab".repeat(32);
        for (line, want) in [
            (&b"{\"cmd\":\"status\"}\n"[..], Request::Status),
            (b"{\"cmd\":\"peers\"}\r\n", Request::Peers),
            (b"{\"cmd\":\"circuits\",\"x\":[1]}", Request::Circuits),
            (
                b"{\"cmd\":\"lookup\",\"target\":\"fc00::1\"}",
                Request::Lookup {
                    target: Target::Address("fc00::1".parse().unwrap()),
                },
            ),
            (
                format!("{{\"cmd\":\"lookup\",\"target\":\"{id}\"}}")
                    .leak()
                    .as_bytes(),
                Request::Lookup {
                    target: Target::Id(id.parse().unwrap()),
                },
            ),
            (
                b"{\"cmd\":\"dht_put\",\"namespace\":\"a\",\"key\":\"k\",\"value\":\"dg==\"}",
                Request::DhtPut {
                    namespace: "a".into(),
                    key: "k".into(),
                    value: b"v".to_vec(),
                    ttl: None,
                },
            ),
            (br#"{"cmd":"identity"}"#, Request::Identity),
            (
                br#"{"cmd":"extender_key","name":"dfs"}"#,
                Request::ExtenderKey { name: "dfs".into() },
            ),
            (
                br#"{"cmd":"service_announce","name":"dfs","port":7400,"version":1}"#,
                Request::ServiceAnnounce {
                    name: "dfs".into(),
                    port: 7400,
                    version: 1,
                    ttl: None,
                },
            ),
            (
                br#"{"cmd":"service_lookup","name":"dfs"}"#,
                Request::ServiceLookup { name: "dfs".into() },
            ),
        ] {
            let r = Request::parse(line).unwrap();
            assert_eq!(r, want);
            let again = serde_json::to_string(&r).unwrap();
            assert_eq!(Request::parse(again.as_bytes()).unwrap(), r);
        }
        assert_eq!(
            Request::parse(br#"{"cmd":"service_announce","name":"d","port":1,"version":1}"#)
                .unwrap()
                .ttl(),
            Some(DEFAULT_TTL)
        );
    }

    #[test]
    fn every_listed_command_is_a_request() {
        // Each name in COMMANDS reaches serde (an argument error at worst,
        // never "unknown command"), and each variant's name is listed.
        for c in COMMANDS {
            let line = format!("{{\"cmd\":\"{c}\"}}");
            match Request::parse(line.as_bytes()) {
                Ok(r) => assert_eq!(r.command(), c),
                Err(RequestError::Argument { command, .. }) => assert_eq!(command, c),
                Err(e) => panic!("{c}: {e}"),
            }
        }
        let unlisted = Request::parse(br#"{"cmd":"Status"}"#).unwrap_err();
        assert!(matches!(unlisted, RequestError::UnknownCommand(_)));
    }
}
