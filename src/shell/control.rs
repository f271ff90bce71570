//! The control socket: a Unix stream socket (mode 0660) speaking one JSON
//! request line and one JSON response line per connection.
//!
//! Request: `{"cmd":"status"}` (commands: `status`, `peers`,
//! `lookup` with `target`, `dht_put` with `namespace`, `key`, `value`
//! (base64) and `ttl`, `dht_get` with `namespace` and `key`). Response:
//! `{"ok":true,"status":{...}}` or `{"ok":false,"error":"..."}`. Lookups
//! take up to ~20 s to answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::UnixListener;

use crate::proto::dht::MAX_VALUE_LEN;
use crate::proto::node::LookupTarget;
use crate::proto::records::{MAX_KEY, MAX_NAMESPACE, MAX_VALUE_TTL};
use crate::proto::NodeId;

/// Version of the control API, reported as `api` in every status object;
/// raised when a field changes meaning or goes away (new fields don't).
pub const API_VERSION: u32 = 1;

/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 4096;

/// Answers requests; given the validated request, returns the answer. It
/// may block (a lookup waits for the network): it runs on a blocking thread.
pub type Handler = Arc<dyn Fn(&Request) -> Result<Value> + Send + Sync>;

/// A bound control socket; the file is removed when this is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Binds the socket. Refuses if another node answers on it; removes a
    /// stale file left by a node that died.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        if path.exists() {
            if StdUnixStream::connect(path).is_ok() {
                bail!(
                    "control socket {} is in use: is another qgate running with this config?",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale control socket {}", path.display()))?;
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("setting mode of {}", path.display()))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Serves requests until the task is dropped.
    pub async fn serve(&self, handler: Handler) {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut reader = TokioBufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST));
                let read =
                    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
                let reply = match read {
                    Ok(Ok(_)) => match Request::parse(&line) {
                        Ok(req) => match tokio::task::spawn_blocking(move || handler(&req)).await {
                            Ok(Ok(v)) => json!({"ok": true, "status": v}),
                            Ok(Err(e)) => json!({"ok": false, "error": format!("{e:#}")}),
                            Err(_) => json!({"ok": false, "error": "request failed"}),
                        },
                        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
                    },
                    _ => return,
                };
                let mut out = reply.to_string();
                out.push('\n');
                let _ = w.write_all(out.as_bytes()).await;
            });
        }
    }
}

/// Sends a request with only a command and returns the answer's `status` object.
pub fn request(path: &Path, cmd: &str) -> Result<Value> {
    call(path, &json!({ "cmd": cmd }))
}

/// Sends one request object and returns the answer's `status` object.
pub fn call(path: &Path, req: &Value) -> Result<Value> {
    let mut s = StdUnixStream::connect(path)
        .with_context(|| format!("connecting to control socket {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(40)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("bad answer from node")?;
    if v.get("ok").and_then(Value::as_bool) != Some(true) {
        bail!(
            "node answered: {}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
        );
    }
    Ok(v.get("status").cloned().unwrap_or(Value::Null))
}

/// A control API request, parsed and validated: everything the socket
/// accepts is checked here, with no I/O, before a handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `{"cmd":"status"}`
    Status,
    /// `{"cmd":"peers"}`
    Peers,
    /// `{"cmd":"circuits"}`
    Circuits,
    /// `{"cmd":"lookup","target":ID-or-address}`
    Lookup(LookupTarget),
    /// `{"cmd":"dht_put","namespace":..,"key":..,"value":BASE64,"ttl":SECS}`
    DhtPut {
        /// Namespace, 1–[`MAX_NAMESPACE`] bytes.
        namespace: String,
        /// Key, 1–[`MAX_KEY`] bytes.
        key: String,
        /// Value, at most [`MAX_VALUE_LEN`] bytes.
        value: Vec<u8>,
        /// Lifetime, 1–[`MAX_VALUE_TTL`] seconds (default 3600).
        ttl: u64,
    },
    /// `{"cmd":"dht_get","namespace":..,"key":..}`
    DhtGet {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
    },
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Longer than [`MAX_REQUEST`].
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// Not JSON, or not an object.
    #[error("{0}")]
    Json(String),
    /// A field is missing or wrong.
    #[error("{0}")]
    Invalid(String),
}

impl Request {
    /// Parses and validates one request line.
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        if line.len() as u64 > MAX_REQUEST {
            return Err(RequestError::TooLong);
        }
        let v: Value = serde_json::from_str(line).map_err(|e| RequestError::Json(e.to_string()))?;
        Request::from_value(&v)
    }

    /// Validates a request object.
    pub fn from_value(v: &Value) -> Result<Request, RequestError> {
        let bad = |m: String| RequestError::Invalid(m);
        let obj = v
            .as_object()
            .ok_or_else(|| bad("request must be a JSON object".into()))?;
        let s = |key: &str| -> Result<&str, RequestError> {
            obj.get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("request needs a string {key:?}")))
        };
        let sized = |key: &str, max: usize| -> Result<String, RequestError> {
            let x = s(key)?;
            if x.is_empty() || x.len() > max {
                return Err(bad(format!("{key:?} must be 1 to {max} bytes")));
            }
            Ok(x.to_string())
        };
        let cmd = obj.get("cmd").and_then(Value::as_str).unwrap_or("");
        Ok(match cmd {
            "status" => Request::Status,
            "peers" => Request::Peers,
            "circuits" => Request::Circuits,
            "lookup" => {
                let t = s("target")?;
                if let Ok(id) = NodeId::parse(t) {
                    Request::Lookup(LookupTarget::Id(id))
                } else if let Ok(a) = t.parse::<std::net::Ipv6Addr>() {
                    if !crate::proto::identity::is_overlay_address(&a) {
                        return Err(bad(format!("{a} is not an overlay address (fc00::/8)")));
                    }
                    Request::Lookup(LookupTarget::Address(a))
                } else {
                    return Err(bad(format!(
                        "{t:?} is neither a node ID (64 hex digits) nor an overlay address"
                    )));
                }
            }
            "dht_put" => {
                let value = base64::engine::general_purpose::STANDARD
                    .decode(s("value")?)
                    .map_err(|_| bad("value must be base64".into()))?;
                if value.len() > MAX_VALUE_LEN {
                    return Err(bad(format!("value longer than {MAX_VALUE_LEN} bytes")));
                }
                let ttl = match obj.get("ttl") {
                    None | Some(Value::Null) => 3600,
                    Some(t) => t
                        .as_u64()
                        .ok_or_else(|| bad("\"ttl\" must be a whole number of seconds".into()))?,
                };
                if ttl == 0 || ttl > MAX_VALUE_TTL {
                    return Err(bad(format!("\"ttl\" must be 1 to {MAX_VALUE_TTL} seconds")));
                }
                Request::DhtPut {
                    namespace: sized("namespace", MAX_NAMESPACE)?,
                    key: sized("key", MAX_KEY)?,
                    value,
                    ttl,
                }
            }
            "dht_get" => Request::DhtGet {
                namespace: sized("namespace", MAX_NAMESPACE)?,
                key: sized("key", MAX_KEY)?,
            },
            other => return Err(bad(format!("unknown command {other:?}"))),
        })
    }

    /// The request as the client sends it.
    pub fn to_value(&self) -> Value {
        match self {
            Request::Status => json!({"cmd": "status"}),
            Request::Peers => json!({"cmd": "peers"}),
            Request::Circuits => json!({"cmd": "circuits"}),
            Request::Lookup(LookupTarget::Id(id)) => {
                json!({"cmd": "lookup", "target": id.to_string()})
            }
            Request::Lookup(LookupTarget::Address(a)) => {
                json!({"cmd": "lookup", "target": a.to_string()})
            }
            Request::DhtPut {
                namespace,
                key,
                value,
                ttl,
            } => json!({
                "cmd": "dht_put",
                "namespace": namespace,
                "key": key,
                "value": base64::engine::general_purpose::STANDARD.encode(value),
                "ttl": ttl,
            }),
            Request::DhtGet { namespace, key } => {
                json!({"cmd": "dht_get", "namespace": namespace, "key": key})
            }
        }
    }
}
