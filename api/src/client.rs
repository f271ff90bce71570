//! A blocking client for the node's control socket: one connection per
//! request, one request line out, one answer line back.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::{
    Answer, Circuits, DhtValue, DhtValues, ExtenderKey, Identity, Lookup, Peers, Request,
    RequestError, Response, ServiceProvider, Services, Status, Stored, Target, API_VERSION,
};

/// Longest answer line read. A status report takes about 600 bytes per
/// link (a node with 2,000 links answers ~1.2 MB), a DHT read of 20 values
/// of 1 KiB ~30 KiB; 64 MiB holds a status of ~100,000 links and still
/// bounds what a client holds.
const MAX_ANSWER: u64 = 64 << 20;

/// Why a request failed; every variant names the request's command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request was refused here, before anything was sent (a name,
    /// size or ttl out of the limits).
    #[error("{command}: {detail}")]
    Invalid {
        /// The request's command.
        command: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The socket could not be reached: is the node running, and is this
    /// user allowed to use it?
    #[error("{command}: connecting to control socket {path}: {source}")]
    Connect {
        /// The request's command.
        command: &'static str,
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange broke (timeout, closed early).
    #[error("{command}: control socket {path}: {source}")]
    Io {
        /// The request's command.
        command: &'static str,
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The node answered with an error.
    #[error("{command}: node answered: {message}")]
    Refused {
        /// The request's command.
        command: &'static str,
        /// The node's message (at most 300 characters).
        message: String,
    },
    /// The node does not know the command: its API is older than the one
    /// that introduced it.
    #[error("{command}: the node speaks control API {node_api}, this needs {needed}")]
    Unsupported {
        /// The request's command.
        command: &'static str,
        /// The node's API version (0: it did not say).
        node_api: u32,
        /// The version that introduced the command.
        needed: u32,
    },
    /// The answer was not what the API promises.
    #[error("{command}: unexpected answer from the node: {detail}")]
    BadAnswer {
        /// The request's command.
        command: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// A client for one node's control socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the socket at `path`. Nothing is connected yet.
    pub fn new(path: impl AsRef<Path>) -> Client {
        Client {
            path: path.as_ref().to_path_buf(),
            // DHT operations take up to ~20 s on the node's side.
            timeout: Duration::from_secs(40),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets how long to wait for an answer (default 40 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Sends one request and returns the answer's `status` object as JSON.
    pub fn call(&self, req: &Request) -> Result<serde_json::Value, Error> {
        let command = req.command();
        req.validate().map_err(|e| Error::Invalid {
            command,
            detail: match e {
                RequestError::Limit { detail, .. } | RequestError::Argument { detail, .. } => {
                    detail
                }
                e => e.to_string(),
            },
        })?;
        let connect = |source| Error::Connect {
            command,
            path: self.path.clone(),
            source,
        };
        let io = |source| Error::Io {
            command,
            path: self.path.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.path).map_err(connect)?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        let mut line = serde_json::to_string(req).map_err(|e| Error::Invalid {
            command,
            detail: e.to_string(),
        })?;
        line.push('\n');
        s.write_all(line.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        BufReader::new(s.take(MAX_ANSWER))
            .read_line(&mut answer)
            .map_err(io)?;
        if answer.len() as u64 >= MAX_ANSWER && !answer.ends_with('\n') {
            return Err(Error::BadAnswer {
                command,
                detail: format!("the answer is longer than {} MiB", MAX_ANSWER >> 20),
            });
        }
        let a: Answer = serde_json::from_str(&answer).map_err(|e| Error::BadAnswer {
            command,
            detail: format!("not an answer line: {e}"),
        })?;
        if !a.ok {
            let message: String = a
                .error
                .unwrap_or_else(|| "unknown error".into())
                .chars()
                .take(300)
                .collect();
            if message.contains(&format!("unknown command \"{command}\"")) {
                return Err(Error::Unsupported {
                    command,
                    node_api: self.node_api().unwrap_or(0),
                    needed: req.since(),
                });
            }
            return Err(Error::Refused { command, message });
        }
        Ok(a.status.unwrap_or(serde_json::Value::Null))
    }

    /// Sends one request and reads the answer as `T`.
    pub fn call_as<T: DeserializeOwned>(&self, req: &Request) -> Result<T, Error> {
        let v = self.call(req)?;
        serde_json::from_value(v).map_err(|e| Error::BadAnswer {
            command: req.command(),
            detail: e.to_string(),
        })
    }

    /// Sends one request and reads the answer as the [`Response`] that
    /// request gets.
    pub fn request(&self, req: &Request) -> Result<Response, Error> {
        let v = self.call(req)?;
        Response::decode(req, v).map_err(|e| Error::BadAnswer {
            command: req.command(),
            detail: e.to_string(),
        })
    }

    /// The node's API version as its status reports it.
    /// (Only `api` is read: a node too old for a command may also lack
    /// report fields.)
    fn node_api(&self) -> Result<u32, Error> {
        let v = self.call(&Request::Status)?;
        Ok(v.get("api")
            .and_then(serde_json::Value::as_u64)
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(0))
    }

    /// The node's report, typed as version-2 nodes write it (an older
    /// node's may lack fields: [`Client::call`] reads any).
    pub fn status(&self) -> Result<Status, Error> {
        self.call_as(&Request::Status)
    }

    /// The node's routing table.
    pub fn peers(&self) -> Result<Peers, Error> {
        self.call_as(&Request::Peers)
    }

    /// The node's circuits.
    pub fn circuits(&self) -> Result<Circuits, Error> {
        self.call_as(&Request::Circuits)
    }

    /// Finds a node's record (waits up to ~30 s for the network).
    pub fn lookup(&self, target: Target) -> Result<Lookup, Error> {
        self.call_as(&Request::Lookup { target })
    }

    /// Who the node is: ID, overlay address, API version.
    pub fn identity(&self) -> Result<Identity, Error> {
        self.call_as(&Request::Identity)
    }

    /// The node's overlay address; works with every node version (from
    /// `identity`, or from `status` on a node older than version 2, whose
    /// report is read for `address` alone: it may lack newer fields).
    pub fn address(&self) -> Result<std::net::Ipv6Addr, Error> {
        match self.identity() {
            Ok(id) => Ok(id.address),
            Err(Error::Unsupported { .. }) => {
                let v = self.call(&Request::Status)?;
                serde_json::from_value(v.get("address").cloned().unwrap_or_default()).map_err(|e| {
                    Error::BadAnswer {
                        command: "status",
                        detail: e.to_string(),
                    }
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The node's API version; works with every node version (falls back
    /// to `status` when the node predates `identity`).
    pub fn api_version(&self) -> Result<u32, Error> {
        match self.identity() {
            Ok(id) => Ok(id.api),
            Err(Error::Unsupported { node_api, .. }) => Ok(node_api),
            Err(e) => Err(e),
        }
    }

    /// Fails with [`Error::Unsupported`] unless the node speaks at least
    /// the API this crate speaks.
    pub fn require_current_api(&self) -> Result<u32, Error> {
        let node_api = self.api_version()?;
        if node_api < API_VERSION {
            return Err(Error::Unsupported {
                command: "identity",
                node_api,
                needed: API_VERSION,
            });
        }
        Ok(node_api)
    }

    /// The key of extender `name` (see [`ExtenderKey`]).
    pub fn extender_key(&self, name: &str) -> Result<ExtenderKey, Error> {
        let req = Request::ExtenderKey { name: name.into() };
        let k: ExtenderKey = self.call_as(&req)?;
        if k.name != name {
            return Err(Error::BadAnswer {
                command: req.command(),
                detail: format!("a key for {:?}, not {name:?}", k.name),
            });
        }
        Ok(k)
    }

    /// Publishes `value` under (`namespace`, `key`) for `ttl` seconds
    /// (None: the default, 1 h).
    pub fn dht_put(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<u64>,
    ) -> Result<Stored, Error> {
        self.call_as(&Request::DhtPut {
            namespace: namespace.into(),
            key: key.into(),
            value: value.to_vec(),
            ttl,
        })
    }

    /// Reads the values under (`namespace`, `key`), the newest per
    /// publisher.
    pub fn dht_get(&self, namespace: &str, key: &str) -> Result<Vec<DhtValue>, Error> {
        Ok(self.dht_values(namespace, key)?.values)
    }

    /// Reads the values under (`namespace`, `key`), the newest per
    /// publisher, with how many queries that took.
    pub fn dht_values(&self, namespace: &str, key: &str) -> Result<DhtValues, Error> {
        self.call_as(&Request::DhtGet {
            namespace: namespace.into(),
            key: key.into(),
        })
    }

    /// Announces service `name` on `port` of the node's overlay address
    /// for `ttl` seconds (None: 1 h); announce again before it runs out.
    pub fn service_announce(
        &self,
        name: &str,
        port: u16,
        version: u32,
        ttl: Option<u64>,
    ) -> Result<Stored, Error> {
        self.call_as(&Request::ServiceAnnounce {
            name: name.into(),
            port,
            version,
            ttl,
        })
    }

    /// The nodes offering service `name`.
    pub fn service_lookup(&self, name: &str) -> Result<Vec<ServiceProvider>, Error> {
        let s: Services = self.call_as(&Request::ServiceLookup { name: name.into() })?;
        Ok(s.providers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-shot fake node: answers each connection with the next line.
    fn fake_node(
        tag: &str,
        answers: Vec<&'static str>,
    ) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let dir = std::env::temp_dir().join(format!("qgate-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            for a in answers {
                let (mut s, _) = l.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                got.push(line);
                // A client that stopped reading (an answer over its
                // limit) closes the socket: not this fake's failure.
                let _ = s.write_all(a.as_bytes()).and_then(|_| s.write_all(b"\n"));
            }
            let _ = std::fs::remove_dir_all(&dir);
            got
        });
        (path, t)
    }

    #[test]
    fn typed_answers_and_errors() {
        let id = "ab".repeat(32);
        let identity: &'static str = Box::leak(
            format!(r#"{{"ok":true,"status":{{"api":2,"version":"0.1.0","node_id":"{id}","address":"fcab::1"}}}}"#)
                .into_boxed_str(),
        );
        let (path, t) = fake_node(
            "typed",
            vec![
                identity,
                r#"{"ok":false,"error":"bad request: unknown command \"service_lookup\" (commands: status)"}"#,
                r#"{"ok":true,"status":{"api":1,"address":"fcab::1","node_id":"abababababababababababababababababababababababababababababababab"}}"#,
                r#"{"ok":false,"error":"too many lookups running; try again"}"#,
                r#"{"ok":true,"status":{"values":"nope"}}"#,
            ],
        );
        let c = Client::new(&path);
        let i = c.identity().unwrap();
        assert_eq!(i.api, 2);
        assert_eq!(i.node_id.to_string(), id);
        match c.service_lookup("dfs").unwrap_err() {
            Error::Unsupported {
                command,
                node_api,
                needed,
            } => assert_eq!((command, node_api, needed), ("service_lookup", 1, 2)),
            e => panic!("{e}"),
        }
        match c.dht_get("n", "k").unwrap_err() {
            Error::Refused { command, message } => {
                assert_eq!(command, "dht_get");
                assert!(message.contains("too many"));
            }
            e => panic!("{e}"),
        }
        let e = c.dht_get("n", "k").unwrap_err();
        assert!(matches!(e, Error::BadAnswer { .. }), "{e}");
        let got = t.join().unwrap();
        assert_eq!(got[0], "{\"cmd\":\"identity\"}\n");
        assert_eq!(got[1], "{\"cmd\":\"service_lookup\",\"name\":\"dfs\"}\n");
        // Refused here, nothing sent.
        let e = c.extender_key("Not/A/Name").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Invalid {
                    command: "extender_key",
                    ..
                }
            ),
            "{e}"
        );
        let e = Client::new("/nonexistent/qgate.sock").status().unwrap_err();
        assert!(matches!(e, Error::Connect { .. }));
        assert!(e.to_string().contains("/nonexistent/qgate.sock"), "{e}");
    }

    /// A node with thousands of links answers `status` with megabytes:
    /// read whole up to `MAX_ANSWER`, refused by name beyond it.
    #[test]
    fn long_answers_are_read_up_to_the_limit() {
        let long = |n: usize| -> &'static str {
            Box::leak(format!(r#"{{"ok":false,"error":"{}"}}"#, "x".repeat(n)).into_boxed_str())
        };
        let (path, t) = fake_node("long", vec![long(3 << 20), long(MAX_ANSWER as usize + 10)]);
        let c = Client::new(&path);
        match c.dht_get("n", "k").unwrap_err() {
            // Parsed whole (else BadAnswer); the message is cut to 300.
            Error::Refused { message, .. } => assert_eq!(message, "x".repeat(300)),
            e => panic!("{e}"),
        }
        let e = c.dht_get("n", "k").unwrap_err();
        assert!(e.to_string().contains("longer than 64 MiB"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn an_old_node_still_tells_its_address() {
        // API 1: no `identity`, and a status without the newer fields.
        let old = r#"{"ok":true,"status":{"api":1,"address":"fcab::1","node_id":"abababababababababababababababababababababababababababababababab"}}"#;
        let (path, t) = fake_node(
            "old",
            vec![
                r#"{"ok":false,"error":"bad request: unknown command \"identity\" (commands: status)"}"#,
                old,
                old,
                old,
            ],
        );
        let c = Client::new(&path);
        assert_eq!(
            c.address().unwrap(),
            "fcab::1".parse::<std::net::Ipv6Addr>().unwrap()
        );
        // The typed report wants what version-2 nodes send.
        assert!(matches!(
            c.status(),
            Err(Error::BadAnswer {
                command: "status",
                ..
            })
        ));
        let got = t.join().unwrap();
        assert_eq!(got[0], "{\"cmd\":\"identity\"}\n");
        assert!(
            got[1..].iter().all(|l| l == "{\"cmd\":\"status\"}\n"),
            "{got:?}"
        );
    }
}
