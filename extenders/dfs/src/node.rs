//! The node's control socket, through the extender API crate
//! (`qgate-api`, which depends on nothing in the kernel): the node's
//! identity, the DHT, and QuantumDFS's service record. QuantumDFS uses the
//! node only for what sockets cannot give.

use std::net::Ipv6Addr;
use std::path::Path;

pub use qgate_api::{DhtValue, Error as NodeError, NodeId, ServiceProvider};

/// The name QuantumDFS announces its service under (DHT namespace
/// `qgate.service`, key `qdfs`).
pub const SERVICE_NAME: &str = "qdfs";
/// The service version in its record: the wire protocol's.
pub const SERVICE_VERSION: u32 = crate::wire::PROTOCOL_VERSION as u32;

/// A client for one node's control socket.
#[derive(Debug, Clone)]
pub struct NodeClient {
    api: qgate_api::Client,
}

impl NodeClient {
    /// A client for the socket at `path`.
    pub fn new(path: &Path) -> NodeClient {
        NodeClient {
            api: qgate_api::Client::new(path),
        }
    }

    /// The typed API client underneath.
    pub fn api(&self) -> &qgate_api::Client {
        &self.api
    }

    /// The node's overlay address (from `identity`, or `status` on a node
    /// older than API version 2).
    pub fn overlay_address(&self) -> Result<Ipv6Addr, NodeError> {
        self.api.address()
    }

    /// Publishes a value; returns on how many nodes it was stored.
    pub fn dht_put(&self, ns: &str, key: &str, value: &[u8], ttl: u64) -> Result<u64, NodeError> {
        Ok(self.api.dht_put(ns, key, value, Some(ttl))?.stored_at)
    }

    /// Reads a key's values (the newest per publisher).
    pub fn dht_get(&self, ns: &str, key: &str) -> Result<Vec<DhtValue>, NodeError> {
        self.api.dht_get(ns, key)
    }

    /// Announces this node's QuantumDFS server on `port` of its overlay
    /// address for `ttl` seconds; returns on how many nodes the record was
    /// stored.
    pub fn announce_service(&self, port: u16, ttl: u64) -> Result<u64, NodeError> {
        Ok(self
            .api
            .service_announce(SERVICE_NAME, port, SERVICE_VERSION, Some(ttl))?
            .stored_at)
    }

    /// The nodes announcing a QuantumDFS server.
    pub fn lookup_service(&self) -> Result<Vec<ServiceProvider>, NodeError> {
        self.api.service_lookup(SERVICE_NAME)
    }
}
