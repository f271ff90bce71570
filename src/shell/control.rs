//! The control socket: a Unix stream socket (mode 0660) speaking one JSON
//! request line and one JSON response line per connection.
//!
//! Requests and answers are `qgate-api`'s types (documented for extender
//! authors in extenders/README.md): each line is parsed once, here, by
//! [`qgate_api::Request::parse`] (shape, command, argument types and
//! limits), the node's [`Handler`] gets the typed [`Request`] and returns a
//! typed [`Response`] or a [`ControlError`], and the answer line is
//! `{"ok":true,"status":{...}}` or `{"ok":false,"error":"..."}` (bad
//! requests: `"bad request: ..."`). Lookups take up to ~20 s to answer.
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

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use qgate_api::{Answer, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::proto::dht::MAX_VALUE_LEN;
use crate::proto::records::{MAX_KEY, MAX_NAMESPACE, MAX_VALUE_TTL};

/// Version of the control API, reported as `api` in every status object
/// and by `identity` (see the `qgate-api` crate for what raises it).
pub const API_VERSION: u32 = qgate_api::API_VERSION;

/// Longest request line accepted (without its newline).
pub const MAX_REQUEST: usize = qgate_api::MAX_REQUEST;
/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;

// The API crate states the kernel's limits for extenders; they must agree.
const _: () = {
    assert!(qgate_api::MAX_NAMESPACE == MAX_NAMESPACE);
    assert!(qgate_api::MAX_KEY == MAX_KEY);
    assert!(qgate_api::MAX_VALUE == MAX_VALUE_LEN);
    assert!(qgate_api::MAX_TTL == MAX_VALUE_TTL);
};

/// Why the node could not answer a well-formed request (one line for the
/// client; the command is the client's to add, as its errors do).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Too many lookups running already.
    #[error("too many lookups running; try again")]
    Busy,
    /// A lookup or DHT operation did not finish in time.
    #[error("the lookup did not finish in time")]
    Timeout,
    /// The node refused to publish a value.
    #[error(transparent)]
    Put(#[from] crate::proto::node::PutError),
    /// The node's report did not fit the API's types (a bug: the kernel and
    /// `qgate-api` disagree).
    #[error("the node's {what} report does not fit the API: {source}")]
    Report {
        /// Which report.
        what: &'static str,
        /// Where it did not fit.
        source: serde_json::Error,
    },
}

/// The error and its sources, as one line (`outer: inner: ...`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text.replace('\n', " ")
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

/// Answers requests: given a parsed, validated request, returns its typed
/// answer. It may block (a lookup waits for the network): it runs on a
/// blocking thread.
pub type Handler = Arc<dyn Fn(Request) -> Result<Response, ControlError> + Send + Sync>;

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
    let refused = |error: String| Answer {
        ok: false,
        status: None,
        error: Some(error),
    };
    let reply = match (refusal, read) {
        (Some(refusal), _) => refused(refusal),
        (None, Err(_)) => refused(format!(
            "no request line within {} s",
            READ_TIMEOUT.as_secs()
        )),
        (None, Ok(Err(e))) => {
            tracing::debug!("control socket read: {e}");
            return;
        }
        (None, Ok(Ok(_))) => match Request::parse(&line) {
            Ok(req) => match tokio::task::spawn_blocking(move || handler(req)).await {
                Ok(Ok(answer)) => match serde_json::to_value(answer) {
                    Ok(v) => Answer {
                        ok: true,
                        status: Some(v),
                        error: None,
                    },
                    Err(e) => refused(format!("encoding the answer: {e}")),
                },
                Ok(Err(e)) => refused(chain(&e)),
                Err(_) => refused("request failed".into()),
            },
            Err(e) => refused(format!("bad request: {e}")),
        },
    };
    let mut out = serde_json::to_string(&reply)
        .unwrap_or_else(|_| "{\"ok\":false,\"error\":\"encoding the answer\"}".into());
    out.push('\n');
    let _ = tokio::time::timeout(WRITE_TIMEOUT, w.write_all(out.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgate_api::Stored;
    use serde_json::{json, Value};
    use std::io::{BufRead, BufReader, Write};

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
        let handler: Handler = Arc::new(|req: Request| match req {
            Request::Status => Ok(Response::Stored(Stored {
                stored_at: 1,
                ttl: 2,
            })),
            Request::Circuits => Err(ControlError::Put(crate::proto::node::PutError::Value(
                crate::proto::records::ValueError::Ttl,
            ))),
            _ => Err(ControlError::Busy),
        });
        let task = tokio::spawn(async move { sock.serve(handler).await });
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let v = exchange(&p, b"{\"cmd\":\"status\"}\n");
            assert_eq!(v, json!({"ok": true, "status": {"stored_at": 1, "ttl": 2}}));
            let v = exchange(&p, b"{\"cmd\":\"peers\"}\n");
            assert_eq!(
                v,
                json!({"ok": false, "error": "too many lookups running; try again"})
            );
            let v = exchange(&p, b"{\"cmd\":\"circuits\"}\n");
            assert_eq!(
                v,
                json!({"ok": false, "error": "lifetime must be 1 to 86400 seconds"})
            );
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
        let handler: Handler = Arc::new(|_: Request| {
            Ok(Response::Stored(Stored {
                stored_at: 0,
                ttl: 1,
            }))
        });
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
