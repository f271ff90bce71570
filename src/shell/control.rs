//! The control socket: a Unix stream socket (mode 0660) speaking one JSON
//! request line and one JSON response line per connection.
//!
//! Request: `{"cmd":"status"}` (commands: `status`, `peers`, `circuits`,
//! `lookup` with `target`, `dht_put` with `namespace`, `key`, `value`
//! (base64) and `ttl`, `dht_get` with `namespace` and `key`, and for
//! extenders `identity`, `extender_key` with `name`, `service_announce`
//! with `name`, `port`, `version` and `ttl`, `service_lookup` with `name`;
//! the wire types are the `qgate-api` crate's, documented for extender
//! authors in extenders/README.md). Response:
//! `{"ok":true,"status":{...}}` or `{"ok":false,"error":"..."}`. Lookups
//! take up to ~20 s to answer.
//!
//! Access: the socket file is mode 0660, owned by the node's user and group
//! (after the privilege drop), and every connection's SO_PEERCRED is checked
//! as well: root, the node's uid, or a process in the socket's group (its
//! primary group or, by SO_PEERGROUPS, a supplementary one); anyone else
//! gets an error reply. A request is one line of at most 4096 bytes that
//! must arrive within 5 s; a malformed one (too long, not UTF-8, not JSON,
//! not an object, no or an unknown `cmd`, an argument of the wrong type)
//! gets `{"ok":false,"error":"..."}`. At most 32 connections are served at
//! once.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::proto::dht::MAX_VALUE_LEN;
use crate::proto::node::LookupTarget;
use crate::proto::records::{MAX_KEY, MAX_NAMESPACE, MAX_VALUE_TTL};
use crate::proto::NodeId;

/// Version of the control API, reported as `api` in every status object
/// and by `identity` (see the `qgate-api` crate for what raises it).
pub const API_VERSION: u32 = qgate_api::API_VERSION;

/// Longest request line accepted (without its newline).
pub const MAX_REQUEST: usize = 4096;
/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;

/// One argument of a command: (name, type, required).
type Arg = (&'static str, ArgType, bool);

/// The commands and their arguments.
const COMMANDS: &[(&str, &[Arg])] = &[
    ("status", &[]),
    ("peers", &[]),
    ("circuits", &[]),
    ("lookup", &[("target", ArgType::Str, true)]),
    (
        "dht_put",
        &[
            ("namespace", ArgType::Str, true),
            ("key", ArgType::Str, true),
            ("value", ArgType::Str, true),
            ("ttl", ArgType::Uint, false),
        ],
    ),
    (
        "dht_get",
        &[
            ("namespace", ArgType::Str, true),
            ("key", ArgType::Str, true),
        ],
    ),
    ("identity", &[]),
    ("extender_key", &[("name", ArgType::Str, true)]),
    (
        "service_announce",
        &[
            ("name", ArgType::Str, true),
            ("port", ArgType::Uint, true),
            ("version", ArgType::Uint, true),
            ("ttl", ArgType::Uint, false),
        ],
    ),
    ("service_lookup", &[("name", ArgType::Str, true)]),
];

#[derive(Clone, Copy)]
enum ArgType {
    Str,
    Uint,
}

/// Checks one request line: at most [`MAX_REQUEST`] bytes, UTF-8, one JSON
/// object with a known string `cmd` and arguments of the right types.
/// Returns the object, or the error to answer with.
pub fn parse_request(line: &[u8]) -> std::result::Result<Value, String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    if text.trim().is_empty() {
        return Err("empty request".into());
    }
    let req: Value = serde_json::from_str(text).map_err(|e| format!("request is not JSON: {e}"))?;
    let Some(obj) = req.as_object() else {
        return Err("request must be a JSON object like {\"cmd\":\"status\"}".into());
    };
    let cmd = match obj.get("cmd") {
        None => return Err("request has no \"cmd\"".into()),
        Some(Value::String(c)) => c.as_str(),
        Some(_) => return Err("\"cmd\" must be a string".into()),
    };
    let Some((_, args)) = COMMANDS.iter().find(|(name, _)| *name == cmd) else {
        let known: Vec<&str> = COMMANDS.iter().map(|c| c.0).collect();
        let shown: String = cmd.chars().take(40).collect();
        return Err(format!(
            "unknown command {shown:?} (commands: {})",
            known.join(", ")
        ));
    };
    for (name, ty, required) in args.iter() {
        match (obj.get(*name), ty) {
            (None, ArgType::Str) if *required => {
                return Err(format!("{cmd} needs a string {name:?}"));
            }
            (None, ArgType::Uint) if *required => {
                return Err(format!("{cmd} needs a number {name:?}"));
            }
            (None, _) | (Some(Value::String(_)), ArgType::Str) => {}
            (Some(v), ArgType::Uint) if v.is_u64() => {}
            (Some(_), ArgType::Str) => return Err(format!("{cmd}: {name:?} must be a string")),
            (Some(_), ArgType::Uint) => {
                return Err(format!("{cmd}: {name:?} must be a non-negative integer"))
            }
        }
    }
    Ok(req)
}

/// Whether a peer may use the socket: root, the node's own uid, or a member
/// (primary or supplementary group) of the socket's group.
pub fn allowed(
    peer_uid: u32,
    peer_gid: u32,
    peer_groups: &[u32],
    own_uid: u32,
    sock_gid: u32,
) -> bool {
    peer_uid == 0 || peer_uid == own_uid || peer_gid == sock_gid || peer_groups.contains(&sock_gid)
}

/// Answers requests; given the validated request, returns the answer. It
/// may block (a lookup waits for the network): it runs on a blocking thread.
pub type Handler = Arc<dyn Fn(&Value) -> Result<Value> + Send + Sync>;

/// A bound control socket; the file is removed when this is dropped.
pub struct ControlSocket {
    listener: StdUnixListener,
    path: PathBuf,
    /// The socket file's group: its members may connect.
    gid: u32,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Binds the socket (mode 0660). Refuses if another node answers on it;
    /// removes a stale file left by a node that died. Needs no runtime.
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
        let listener = StdUnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        listener.set_nonblocking(true)?;
        // Removed with the socket from here on, also on the errors below.
        let mut sock = ControlSocket {
            listener,
            path: path.to_path_buf(),
            gid: 0,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("setting mode of {}", path.display()))?;
        sock.gid = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .gid();
        Ok(sock)
    }

    /// Gives the socket file to `uid` and `gid` (before privileges are
    /// dropped); members of `gid` may then use it.
    pub fn hand_to(&mut self, uid: u32, gid: u32) -> Result<()> {
        std::os::unix::fs::lchown(&self.path, Some(uid), Some(gid))
            .with_context(|| format!("changing the owner of {}", self.path.display()))?;
        self.gid = gid;
        Ok(())
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until the task is dropped. Needs a tokio runtime.
    pub async fn serve(&self, handler: Handler) {
        let listener = match self.listener.try_clone().and_then(UnixListener::from_std) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("control socket {}: {e}", self.path.display());
                return std::future::pending().await;
            }
        };
        let own_uid = nix::unistd::Uid::current().as_raw();
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // E.g. out of descriptors: don't spin.
                    tracing::debug!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                let _ = stream.try_write(
                    b"{\"ok\":false,\"error\":\"busy: too many control connections\"}\n",
                );
                tracing::debug!("control socket: {MAX_CONNECTIONS} connections open, one refused");
                continue;
            };
            let handler = handler.clone();
            let sock_gid = self.gid;
            tokio::spawn(async move {
                serve_one(stream, handler, own_uid, sock_gid).await;
                drop(permit);
            });
        }
    }
}

async fn serve_one(stream: UnixStream, handler: Handler, own_uid: u32, sock_gid: u32) {
    let refusal = match stream.peer_cred() {
        Ok(cred)
            if allowed(
                cred.uid(),
                cred.gid(),
                &qgate_platform::privilege::peer_groups(stream.as_raw_fd()),
                own_uid,
                sock_gid,
            ) =>
        {
            None
        }
        Ok(cred) => {
            tracing::debug!(
                uid = cred.uid(),
                gid = cred.gid(),
                pid = ?cred.pid(),
                "control socket: connection refused"
            );
            Some(format!(
                "permission denied: uid {} is not root, not the node's user and not in its group",
                cred.uid()
            ))
        }
        Err(e) => {
            tracing::debug!("control socket: no peer credentials: {e}");
            Some("permission denied: no peer credentials".to_string())
        }
    };
    let (r, mut w) = stream.into_split();
    // The request line is read even from a peer that will be refused, so
    // that it is not writing into a closed socket when the answer comes.
    let mut line = Vec::new();
    let mut reader = TokioBufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST as u64 + 2));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let reply = match (refusal, read) {
        (Some(refusal), _) => json!({"ok": false, "error": refusal}),
        (None, Err(_)) => json!({"ok": false, "error": format!(
            "no request line within {} s", READ_TIMEOUT.as_secs()
        )}),
        (None, Ok(Err(e))) => {
            tracing::debug!("control socket read: {e}");
            return;
        }
        (None, Ok(Ok(_))) => match parse_request(&line) {
            Ok(req) => match tokio::task::spawn_blocking(move || handler(&req)).await {
                Ok(Ok(v)) => json!({"ok": true, "status": v}),
                Ok(Err(e)) => json!({"ok": false, "error": format!("{e:#}")}),
                Err(_) => json!({"ok": false, "error": "request failed"}),
            },
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        },
    };
    let mut out = reply.to_string();
    out.push('\n');
    let _ = tokio::time::timeout(WRITE_TIMEOUT, w.write_all(out.as_bytes())).await;
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

/// A control API request, parsed and validated in full: [`parse_request`]'s
/// checks (size, UTF-8, JSON, command, argument types), then the wire type
/// of the extender API crate ([`qgate_api::Request`], so the node and its
/// clients read and write the same objects) and its limits, then the
/// values the kernel interprets (lookup target), with no I/O. The node's
/// handler turns every request into one of these first.
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
    /// `{"cmd":"identity"}`: node ID, overlay address, API version.
    Identity,
    /// `{"cmd":"extender_key","name":..}`: the named extender's key.
    ExtenderKey {
        /// Extender name ([`qgate_api::check_name`]).
        name: String,
    },
    /// `{"cmd":"service_announce","name":..,"port":..,"version":..,"ttl":SECS}`:
    /// a service record in the DHT, signed by this node.
    ServiceAnnounce {
        /// Service name ([`qgate_api::check_name`]).
        name: String,
        /// Port on this node's overlay address.
        port: u16,
        /// The service's protocol version.
        version: u32,
        /// Lifetime, 1–[`MAX_VALUE_TTL`] seconds (default 3600).
        ttl: u64,
    },
    /// `{"cmd":"service_lookup","name":..}`: who offers a service.
    ServiceLookup {
        /// Service name.
        name: String,
    },
}

/// Why a request was refused (one line, for the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

// The API crate states the kernel's limits for extenders; they must agree.
const _: () = {
    assert!(qgate_api::MAX_NAMESPACE == MAX_NAMESPACE);
    assert!(qgate_api::MAX_KEY == MAX_KEY);
    assert!(qgate_api::MAX_VALUE == MAX_VALUE_LEN);
    assert!(qgate_api::MAX_TTL == MAX_VALUE_TTL);
    assert!(qgate_api::MAX_REQUEST == MAX_REQUEST);
};

impl Request {
    /// Parses and validates one request line (as the socket reads it).
    pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
        let v = parse_request(line).map_err(RequestError)?;
        Request::from_value(&v)
    }

    /// Validates a request object.
    pub fn from_value(v: &Value) -> Result<Request, RequestError> {
        let bad = RequestError;
        if !v.is_object() {
            return Err(bad("request must be a JSON object".into()));
        }
        let wire: qgate_api::Request = serde_json::from_value(v.clone()).map_err(|e| {
            let text = e.to_string();
            bad(text
                .lines()
                .next()
                .unwrap_or("bad request")
                .chars()
                .take(200)
                .collect())
        })?;
        wire.validate().map_err(bad)?;
        let ttl = |t: Option<u64>| t.unwrap_or(qgate_api::DEFAULT_TTL);
        Ok(match wire {
            qgate_api::Request::Status => Request::Status,
            qgate_api::Request::Peers => Request::Peers,
            qgate_api::Request::Circuits => Request::Circuits,
            qgate_api::Request::Lookup { target: t } => {
                if let Ok(id) = NodeId::parse(&t) {
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
            qgate_api::Request::DhtPut {
                namespace,
                key,
                value,
                ttl: t,
            } => Request::DhtPut {
                namespace,
                key,
                value,
                ttl: ttl(t),
            },
            qgate_api::Request::DhtGet { namespace, key } => Request::DhtGet { namespace, key },
            qgate_api::Request::Identity => Request::Identity,
            qgate_api::Request::ExtenderKey { name } => Request::ExtenderKey { name },
            qgate_api::Request::ServiceAnnounce {
                name,
                port,
                version,
                ttl: t,
            } => Request::ServiceAnnounce {
                name,
                port,
                version,
                ttl: ttl(t),
            },
            qgate_api::Request::ServiceLookup { name } => Request::ServiceLookup { name },
        })
    }

    /// The request as the API crate writes it.
    pub fn to_wire(&self) -> qgate_api::Request {
        use qgate_api::Request as W;
        match self {
            Request::Status => W::Status,
            Request::Peers => W::Peers,
            Request::Circuits => W::Circuits,
            Request::Lookup(LookupTarget::Id(id)) => W::Lookup {
                target: id.to_string(),
            },
            Request::Lookup(LookupTarget::Address(a)) => W::Lookup {
                target: a.to_string(),
            },
            Request::DhtPut {
                namespace,
                key,
                value,
                ttl,
            } => W::DhtPut {
                namespace: namespace.clone(),
                key: key.clone(),
                value: value.clone(),
                ttl: Some(*ttl),
            },
            Request::DhtGet { namespace, key } => W::DhtGet {
                namespace: namespace.clone(),
                key: key.clone(),
            },
            Request::Identity => W::Identity,
            Request::ExtenderKey { name } => W::ExtenderKey { name: name.clone() },
            Request::ServiceAnnounce {
                name,
                port,
                version,
                ttl,
            } => W::ServiceAnnounce {
                name: name.clone(),
                port: *port,
                version: *version,
                ttl: Some(*ttl),
            },
            Request::ServiceLookup { name } => W::ServiceLookup { name: name.clone() },
        }
    }

    /// The request as the client sends it.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self.to_wire()).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_get_error_text() {
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
            (b"{\"cmd\":\"reboot\"}", "unknown command \"reboot\""),
            (b"{\"cmd\":\"lookup\"}", "needs a string \"target\""),
            (b"{\"cmd\":\"lookup\",\"target\":5}", "\"target\" must be a string"),
            (b"{\"cmd\":\"dht_get\",\"namespace\":\"a\",\"key\":[1]}", "\"key\" must be a string"),
            (
                b"{\"cmd\":\"dht_put\",\"namespace\":\"a\",\"key\":\"k\",\"value\":\"dg==\",\"ttl\":\"1h\"}",
                "\"ttl\" must be a non-negative integer",
            ),
            (
                b"{\"cmd\":\"dht_put\",\"namespace\":\"a\",\"key\":\"k\",\"value\":\"dg==\",\"ttl\":-1}",
                "\"ttl\" must be a non-negative integer",
            ),
        ] {
            let e = parse_request(line).unwrap_err();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(line));
            assert!(!e.contains('\n'));
        }
        for ok in [
            &b"{\"cmd\":\"status\"}\n"[..],
            b"{\"cmd\":\"status\"}\r\n",
            b"{\"cmd\":\"lookup\",\"target\":\"fc00::1\"}",
            b"{\"cmd\":\"dht_put\",\"namespace\":\"a\",\"key\":\"k\",\"value\":\"dg==\",\"ttl\":60}",
            b"{\"cmd\":\"dht_put\",\"namespace\":\"a\",\"key\":\"k\",\"value\":\"dg==\"}",
        ] {
            parse_request(ok).unwrap();
        }
        // Exactly at the limit is fine.
        let pad = MAX_REQUEST - "{\"cmd\":\"status\",\"x\":\"\"}".len();
        let at = format!("{{\"cmd\":\"status\",\"x\":\"{}\"}}", "a".repeat(pad));
        assert_eq!(at.len(), MAX_REQUEST);
        parse_request(at.as_bytes()).unwrap();
    }

    #[test]
    fn extender_requests_parse_and_round_trip() {
        for (line, want) in [
            (&br#"{"cmd":"identity"}"#[..], Request::Identity),
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
                    ttl: 3600,
                },
            ),
            (
                br#"{"cmd":"service_lookup","name":"dfs"}"#,
                Request::ServiceLookup { name: "dfs".into() },
            ),
        ] {
            let r = Request::parse(line).unwrap();
            assert_eq!(r, want);
            let again = r.to_value().to_string();
            assert_eq!(Request::parse(again.as_bytes()).unwrap(), r);
        }
        for (line, want) in [
            (&br#"{"cmd":"extender_key"}"#[..], "needs a string \"name\""),
            (
                br#"{"cmd":"extender_key","name":"../x"}"#,
                "must be 1 to 32",
            ),
            (br#"{"cmd":"extender_key","name":""}"#, "must be 1 to 32"),
            (
                br#"{"cmd":"service_announce","name":"dfs","version":1}"#,
                "needs a number \"port\"",
            ),
            (
                br#"{"cmd":"service_announce","name":"dfs","port":0,"version":1}"#,
                "\"port\" must be 1 to 65535",
            ),
            (
                br#"{"cmd":"service_announce","name":"dfs","port":70000,"version":1}"#,
                "70000",
            ),
            (
                br#"{"cmd":"service_announce","name":"dfs","port":1,"version":1,"ttl":0}"#,
                "\"ttl\" must be 1 to",
            ),
            (
                br#"{"cmd":"service_lookup","name":"DFS"}"#,
                "must be 1 to 32",
            ),
            (
                br#"{"cmd":"dht_put","namespace":"n","key":"k","value":"!!"}"#,
                "base64",
            ),
        ] {
            let e = Request::parse(line).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(line));
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn who_may_connect() {
        // Node runs as uid 998, socket group 997.
        assert!(allowed(0, 0, &[], 998, 997));
        assert!(allowed(998, 998, &[], 998, 997));
        assert!(allowed(1000, 997, &[], 998, 997));
        assert!(allowed(1000, 1000, &[4, 997], 998, 997));
        assert!(!allowed(1000, 1000, &[4, 24], 998, 997));
        assert!(!allowed(65534, 65534, &[], 998, 997));
    }

    fn temp_socket(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qgate-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("c.sock")
    }

    fn exchange(path: &Path, bytes: &[u8]) -> Value {
        let mut s = StdUnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn served_socket_answers_bad_input_with_errors() {
        let path = temp_socket("bad");
        let sock = ControlSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let handler: Handler = Arc::new(|req: &Value| match req["cmd"].as_str() {
            Some("status") => Ok(json!({"fine": true})),
            _ => bail!("handler refuses"),
        });
        let task = tokio::spawn(async move { sock.serve(handler).await });
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let v = exchange(&p, b"{\"cmd\":\"status\"}\n");
            assert_eq!(v, json!({"ok": true, "status": {"fine": true}}));
            let v = exchange(&p, b"{\"cmd\":\"peers\"}\n");
            assert_eq!(v, json!({"ok": false, "error": "handler refuses"}));
            let mut long = vec![b'{'; 10_000];
            long.push(b'\n');
            for bad in [
                &long[..],
                b"\xff\xff\n",
                b"nonsense\n",
                b"[1,2]\n",
                b"{\"x\":1}\n",
                b"{\"cmd\":\"nope\"}\n",
                b"{\"cmd\":\"lookup\",\"target\":false}\n",
                b"{\"cmd\":\"status\"", // no newline: end of file ends it
            ] {
                let v = exchange(&p, bad);
                assert_eq!(v["ok"], false, "{}", String::from_utf8_lossy(bad));
                assert!(
                    v["error"].as_str().unwrap().starts_with("bad request: "),
                    "{v}"
                );
            }
            // Still serving after all that.
            assert_eq!(exchange(&p, b"{\"cmd\":\"status\"}\n")["ok"], true);
        })
        .await
        .unwrap();
        task.abort();
        let _ = task.await;
        assert!(!path.exists(), "the socket file is removed with the socket");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_clients_time_out_and_connections_are_bounded() {
        let path = temp_socket("slow");
        let sock = ControlSocket::bind(&path).unwrap();
        let handler: Handler = Arc::new(|_: &Value| Ok(json!({})));
        let task = tokio::spawn(async move { sock.serve(handler).await });
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let silent: Vec<StdUnixStream> = (0..MAX_CONNECTIONS)
                .map(|_| StdUnixStream::connect(&p).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            // One too many: refused at once.
            let v = exchange(&p, b"{\"cmd\":\"status\"}\n");
            assert!(v["error"].as_str().unwrap().contains("busy"), "{v}");
            // The silent ones are answered and closed after the timeout.
            let t = std::time::Instant::now();
            for s in silent {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).unwrap();
                assert!(line.contains("no request line within"), "{line}");
            }
            assert!(t.elapsed() < Duration::from_secs(8));
            // And the slots are free again.
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(exchange(&p, b"{\"cmd\":\"status\"}\n")["ok"], true);
        })
        .await
        .unwrap();
        task.abort();
        let _ = task.await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
