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
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::UnixListener;

/// Version of the control API, reported as `api` in every status object;
/// raised when a field changes meaning or goes away (new fields don't).
pub const API_VERSION: u32 = 1;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// Answers requests; given the request object, returns the answer. It may
/// block (a lookup waits for the network): it runs on a blocking thread.
pub type Handler = Arc<dyn Fn(&Value) -> Result<Value> + Send + Sync>;

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
                    Ok(Ok(_)) => match serde_json::from_str::<Value>(&line) {
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
