//! The sans-IO protocol core: identity, wire formats, links and the node
//! state machine. No sockets, no tokio, no clock reads of our own (time comes
//! in as `now`), no OS randomness (an RNG is passed in where one is needed).
//! clippy.toml names the calls; they are denied here and allowed in tests.
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod access;
pub mod batch;
pub mod compress;
pub mod dht;
pub mod identity;
pub mod limit;
pub mod message;
pub mod node;
pub mod onion;
pub mod records;
pub mod route;
pub mod uri;
pub mod wire;

pub use identity::{Identity, NodeId, NodeRecord};
pub use node::{Delivered, Node, NodeConfig, NodeStatus, PeerConfig, TunOutcome};
pub use uri::PeerUri;
