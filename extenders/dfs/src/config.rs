//! The `qdfs serve` configuration file (TOML).
//!
//! ```toml
//! data_dir = "/var/lib/qdfs"          # the store (relative: to this file)
//! # listen = "[fc12:...]:7400"        # default: the node's overlay address
//! port = 7400                          # port used with the overlay address
//! control_socket = "/var/lib/qgate/control.sock"
//! announce = true                      # publish provider records in the DHT
//! max_connections = 64
//! max_connections_per_peer = 8
//! peer_rate = 0                        # bytes/s per peer; 0: unlimited
//! # Caching (src/cache.rs, src/gateway.rs, src/http.rs):
//! role = "provider"                    # or "cache-gateway"
//! cache = "256 MiB"                    # bytes on disk for the chunk cache; 0: off
//! upstream = ["[fc00::2]:7400"]        # gateway: providers asked besides the DHT's
//! gateways = ["[fc00::9]:7400"]        # `qdfs get --config`: gateways asked first
//! http = "127.0.0.1:8080"              # HTTP gateway; unset: off
//! http_overlay = false                 # also serve HTTP on the overlay address
//! # Private storage (see crate::owner, crate::holder, crate::repair):
//! quota = "10 GiB"                     # disk given to others' shares; 0: none
//! shares = "3-of-6"                    # scheme for this owner's stores
//! owner_key = "owner.key"              # default DATA_DIR/owner.key; repairs if present
//! repair_grace = "1h"                  # a share failing this long is re-created
//! repair_interval = "10 min"           # how often every share is challenged
//! holders = ["[fc00::1]:7400"]         # holders to use besides the DHT's
//! ```
//! Unknown keys are refused, so a typo is an error rather than a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::budget::Limits;

/// The node's control socket when none is configured.
pub const DEFAULT_CONTROL_SOCKET: &str = "/var/lib/qgate/control.sock";
/// The QuantumDFS port on the overlay address when none is configured.
pub const DEFAULT_PORT: u16 = 7400;

/// Where the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// This address (tests, or a node's overlay address written out).
    Address(SocketAddr),
    /// The node's overlay address (asked from the control socket), this port.
    NodeOverlay {
        /// The port.
        port: u16,
    },
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The store directory.
    pub data_dir: PathBuf,
    /// Where to listen.
    pub listen: Listen,
    /// The node's control socket.
    pub control_socket: PathBuf,
    /// Whether to publish provider records in the DHT.
    pub announce: bool,
    /// Connection and rate budgets.
    pub limits: Limits,
    /// Caching, gateways and HTTP.
    pub caching: Caching,
    /// Private storage settings.
    pub private: PrivateConfig,
}

/// What a `qdfs serve` is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Provides its store (and caches what its HTTP gateway reads).
    #[default]
    Provider,
    /// Also answers for any ID, through its cache and upstream providers.
    CacheGateway,
}

/// The caching part of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caching {
    /// The role.
    pub role: Role,
    /// Bytes the chunk cache may take on disk (0: off).
    pub cache_bytes: u64,
    /// Providers a gateway asks besides those the DHT names.
    pub upstream: Vec<SocketAddr>,
    /// Gateways `qdfs get` asks first.
    pub gateways: Vec<SocketAddr>,
    /// Where the HTTP gateway listens.
    pub http: Option<SocketAddr>,
    /// Whether the HTTP gateway also listens on the overlay address.
    pub http_overlay: bool,
}

/// The private-storage part of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateConfig {
    /// Bytes given to others' shares (0: none are kept).
    pub quota: u64,
    /// The scheme this owner stores with.
    pub scheme: crate::private::Scheme,
    /// The owner key file (`None`: `DATA_DIR/owner.key`).
    pub owner_key: Option<PathBuf>,
    /// How long a share may fail its challenges before it is re-created.
    pub repair_grace: std::time::Duration,
    /// How often the repairer challenges every share.
    pub repair_interval: std::time::Duration,
    /// Holders to use besides those found in the DHT.
    pub holders: Vec<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    data_dir: PathBuf,
    listen: Option<String>,
    port: Option<u16>,
    control_socket: Option<PathBuf>,
    announce: Option<bool>,
    max_connections: Option<usize>,
    max_connections_per_peer: Option<usize>,
    peer_rate: Option<u64>,
    role: Option<String>,
    cache: Option<Size>,
    #[serde(default)]
    upstream: Vec<SocketAddr>,
    #[serde(default)]
    gateways: Vec<SocketAddr>,
    http: Option<SocketAddr>,
    http_overlay: Option<bool>,
    quota: Option<crate::units::Amount>,
    shares: Option<String>,
    owner_key: Option<PathBuf>,
    repair_grace: Option<crate::units::Amount>,
    repair_interval: Option<crate::units::Amount>,
    holders: Option<Vec<SocketAddr>>,
}

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML or has unknown or mistyped keys.
    #[error("{0}")]
    Syntax(String),
    /// A key has a value out of range.
    #[error("{key}: {why}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Validates configuration text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let listen = match (raw.listen, raw.port) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Value {
                    key: "port",
                    why: "give either listen or port, not both".into(),
                })
            }
            (Some(l), None) => Listen::Address(l.parse().map_err(|_| ConfigError::Value {
                key: "listen",
                why: format!("{l:?} is not an address like [fc00::1]:7400"),
            })?),
            (None, port) => Listen::NodeOverlay {
                port: port.unwrap_or(DEFAULT_PORT),
            },
        };
        let positive = |key: &'static str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(ConfigError::Value {
                key,
                why: "must be at least 1".into(),
            }),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let role = match raw.role.as_deref() {
            None | Some("provider") => Role::Provider,
            Some("cache-gateway") => Role::CacheGateway,
            Some(other) => {
                return Err(ConfigError::Value {
                    key: "role",
                    why: format!("{other:?}: expected \"provider\" or \"cache-gateway\""),
                })
            }
        };
        let cache_bytes = match raw.cache {
            None => crate::cache::DEFAULT_CACHE_BYTES,
            Some(Size::Bytes(n)) => n,
            Some(Size::Text(t)) => {
                crate::cache::parse_size(&t).ok_or_else(|| ConfigError::Value {
                    key: "cache",
                    why: format!("{t:?} is not a size like \"10 GiB\" or 268435456"),
                })?
            }
        };
        if raw.http_overlay == Some(true) && raw.http.is_none() {
            return Err(ConfigError::Value {
                key: "http_overlay",
                why: "needs http (its port is used on the overlay address)".into(),
            });
        }
        let caching = Caching {
            role,
            cache_bytes,
            upstream: raw.upstream,
            gateways: raw.gateways,
            http: raw.http,
            http_overlay: raw.http_overlay.unwrap_or(false),
        };
        let value = |key: &'static str| move |why: String| ConfigError::Value { key, why };
        let secs = |key: &'static str, v: Option<crate::units::Amount>, default: u64| match v {
            None => Ok(std::time::Duration::from_secs(default)),
            Some(a) => crate::units::seconds(&a)
                .map_err(value(key))
                .and_then(|s| match s {
                    0 => Err(value(key)("must be at least 1 second".into())),
                    s => Ok(std::time::Duration::from_secs(s)),
                }),
        };
        let private = PrivateConfig {
            quota: match &raw.quota {
                None => 0,
                Some(a) => crate::units::size(a).map_err(value("quota"))?,
            },
            scheme: match &raw.shares {
                None => crate::private::Scheme::default(),
                Some(s) => s.parse().map_err(|e| value("shares")(format!("{e}")))?,
            },
            owner_key: raw.owner_key.map(resolve),
            repair_grace: secs("repair_grace", raw.repair_grace, 3600)?,
            repair_interval: secs("repair_interval", raw.repair_interval, 600)?,
            holders: raw.holders.unwrap_or_default(),
        };
        Ok(Config {
            caching,
            private,
            data_dir: resolve(raw.data_dir),
            listen,
            control_socket: resolve(
                raw.control_socket
                    .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            ),
            announce: raw.announce.unwrap_or(true),
            limits: Limits {
                max_connections: positive("max_connections", raw.max_connections, 64)?,
                max_connections_per_peer: positive(
                    "max_connections_per_peer",
                    raw.max_connections_per_peer,
                    8,
                )?,
                peer_rate: raw.peer_rate.filter(|r| *r > 0),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_refusals() {
        let c = Config::parse("data_dir = \"store\"\n", Path::new("/etc/qdfs")).unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/qdfs/store"));
        assert_eq!(c.listen, Listen::NodeOverlay { port: 7400 });
        assert_eq!(c.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert!(c.announce);
        assert_eq!(c.limits.peer_rate, None);
        let c = Config::parse(
            "data_dir = \"/s\"\nlisten = \"127.0.0.1:0\"\npeer_rate = 1000\nannounce = false\n",
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.listen, Listen::Address("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c.limits.peer_rate, Some(1000));
        assert_eq!(c.caching.role, Role::Provider);
        assert_eq!(c.caching.cache_bytes, crate::cache::DEFAULT_CACHE_BYTES);
        let c = Config::parse(
            "data_dir = \"/s\"\nrole = \"cache-gateway\"\ncache = \"10 GiB\"\n\
             upstream = [\"127.0.0.1:1\"]\ngateways = [\"[::1]:2\"]\n\
             http = \"127.0.0.1:8080\"\nhttp_overlay = true\n",
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.caching.role, Role::CacheGateway);
        assert_eq!(c.caching.cache_bytes, 10 << 30);
        assert_eq!(c.caching.upstream.len(), 1);
        assert_eq!(c.caching.gateways, ["[::1]:2".parse().unwrap()]);
        assert!(c.caching.http_overlay);
        let c = Config::parse("data_dir = \"/s\"\ncache = 0\n", Path::new("/")).unwrap();
        assert_eq!(c.caching.cache_bytes, 0);
        assert_eq!(c.private.quota, 0);
        let c = Config::parse(
            "data_dir = \"/s\"\nquota = \"2 GiB\"\nrepair_grace = 5\nshares = \"2-of-4\"\nholders = [\"127.0.0.1:9\"]\n",
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.private.quota, 2 << 30);
        assert_eq!(c.private.repair_grace.as_secs(), 5);
        assert_eq!(c.private.scheme.n, 4);
        assert_eq!(c.private.holders.len(), 1);
        for bad in [
            "",
            "data_dir = 3",
            "data_dir = \"/s\"\nlisten = \"nowhere\"",
            "data_dir = \"/s\"\nlisten = \"[::1]:1\"\nport = 2",
            "data_dir = \"/s\"\nmax_connections = 0",
            "data_dir = \"/s\"\nqouta = 1",
            "data_dir = \"/s\"\nrole = \"cache\"",
            "data_dir = \"/s\"\ncache = \"lots\"",
            "data_dir = \"/s\"\ngateways = [\"nowhere\"]",
            "data_dir = \"/s\"\nhttp_overlay = true",
            "data_dir = \"/s\"\nquota = \"lots\"",
            "data_dir = \"/s\"\nshares = \"6-of-3\"",
            "data_dir = \"/s\"\nrepair_grace = 0",
        ] {
            assert!(Config::parse(bad, Path::new("/")).is_err(), "{bad}");
        }
    }
}
