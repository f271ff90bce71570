//! QuantumDFS (`qdfs`): verified, content-addressed file sharing over the
//! QuantumGate overlay.
//!
//! A file is hashed into a BLAKE3 tree ([`bao_tree`]) whose root is the
//! file's plain BLAKE3 hash; a [`manifest::Manifest`] names that root and
//! the size (or, for a folder, its entries), and the manifest's own BLAKE3
//! hash is the [`Id`] users pass around. Providers serve verifiable ranges
//! over TCP ([`wire`] is the sans-IO message codec, [`server`] the socket
//! side); [`fetch`] pulls ranges from several providers at once, checks every
//! 16 KiB chunk group against the tree before it touches the disk, and keeps
//! a resume state so an interrupted fetch never downloads verified data
//! twice. Providers are found through the node's DHT ([`node`] speaks the
//! node's control socket, [`announce`] the provider records) or given
//! explicitly.
//!
//! Layout: pure parts (no sockets, no clock reads): [`id`], [`manifest`],
//! [`wire`], [`budget`], [`announce`], [`resume`], [`schedule`]; I/O parts:
//! [`tree`], [`store`], [`server`], [`fetch`], [`node`], [`config`],
//! [`progress`].

pub mod id;
pub mod manifest;
pub mod store;
pub mod tree;

pub use id::Id;

/// Entry points for fuzzers and the garbage-input tests: each feeds
/// arbitrary bytes to one parser that sees untrusted input and must return
/// an error rather than panic.
pub mod fuzzing {
    /// The manifest parser.
    pub fn fuzz_manifest(data: &[u8]) {
        if let Ok(m) = crate::manifest::Manifest::parse(data) {
            // What parses must re-encode to the same bytes (one encoding
            // per manifest, so one ID).
            assert_eq!(m.encode(), data);
        }
    }
}
