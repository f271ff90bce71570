//! The node's control socket, as a client: one JSON request line, one JSON
//! answer line per connection (see the kernel's `src/shell/control.rs`).
//! QuantumDFS uses it only for what sockets cannot give: the node's overlay
//! address and the DHT.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv6Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The socket could not be reached or the exchange broke.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The node answered with an error.
    #[error("node answered: {0}")]
    Refused(String),
    /// The answer was not what the API promises.
    #[error("unexpected answer from the node: {0}")]
    BadAnswer(String),
}

/// A client for one node's control socket.
#[derive(Debug, Clone)]
pub struct NodeClient {
    path: PathBuf,
}

/// One value read from the DHT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtValue {
    /// The publishing node's ID (64 hex digits).
    pub publisher: String,
    /// The value.
    pub value: Vec<u8>,
}

impl NodeClient {
    /// A client for the socket at `path`.
    pub fn new(path: &Path) -> NodeClient {
        NodeClient { path: path.into() }
    }

    fn request(&self, req: Value) -> Result<Value, NodeError> {
        let io = |source| NodeError::Io {
            path: self.path.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.path).map_err(io)?;
        // DHT lookups take up to ~20 s on the node's side.
        s.set_read_timeout(Some(Duration::from_secs(40)))
            .map_err(io)?;
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        writeln!(s, "{req}").map_err(io)?;
        let mut line = String::new();
        BufReader::new(std::io::Read::take(s, 1 << 20))
            .read_line(&mut line)
            .map_err(io)?;
        let v: Value =
            serde_json::from_str(&line).map_err(|e| NodeError::BadAnswer(e.to_string()))?;
        if v.get("ok").and_then(Value::as_bool) != Some(true) {
            let e = v.get("error").and_then(Value::as_str).unwrap_or("?");
            return Err(NodeError::Refused(e.chars().take(200).collect()));
        }
        Ok(v.get("status").cloned().unwrap_or(Value::Null))
    }

    /// The node's overlay address.
    pub fn overlay_address(&self) -> Result<Ipv6Addr, NodeError> {
        let st = self.request(json!({"cmd": "status"}))?;
        st.get("address")
            .and_then(Value::as_str)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| NodeError::BadAnswer("status has no address".into()))
    }

    /// Publishes a value; returns on how many nodes it was stored.
    pub fn dht_put(&self, ns: &str, key: &str, value: &[u8], ttl: u64) -> Result<u64, NodeError> {
        let v = self.request(json!({
            "cmd": "dht_put",
            "namespace": ns,
            "key": key,
            "value": base64::engine::general_purpose::STANDARD.encode(value),
            "ttl": ttl,
        }))?;
        Ok(v.get("stored_at").and_then(Value::as_u64).unwrap_or(0))
    }

    /// Reads a key's values (the newest per publisher).
    pub fn dht_get(&self, ns: &str, key: &str) -> Result<Vec<DhtValue>, NodeError> {
        let v = self.request(json!({"cmd": "dht_get", "namespace": ns, "key": key}))?;
        let values = v
            .get("values")
            .and_then(Value::as_array)
            .ok_or_else(|| NodeError::BadAnswer("dht_get without values".into()))?;
        Ok(values
            .iter()
            .filter_map(|x| {
                let publisher = x.get("publisher")?.as_str()?.to_string();
                let value = base64::engine::general_purpose::STANDARD
                    .decode(x.get("value")?.as_str()?)
                    .ok()?;
                Some(DhtValue { publisher, value })
            })
            .collect())
    }
}
