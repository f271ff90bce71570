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
//! [`wire`], [`budget`], [`announce`], [`resume`], [`schedule`], [`seal`],
//! [`route`] (which gateway gets which piece), [`private`] (client-side
//! encryption and k-of-n shares), [`cap`] (read capabilities), [`units`];
//! [`folder`] (folder listings and capabilities; reading a folder is I/O);
//! I/O parts: [`tree`], [`store`], [`server`], [`fetch`], [`node`],
//! [`config`], [`progress`], [`cache`] (the chunk cache), [`gateway`]
//! (serving what the store lacks through the cache and upstream), [`http`]
//! (the HTTP gateway), and for private storage [`holder`] (keeping others'
//! shares within a quota; its [`holder::Ledger`] is pure), [`owner`] (owner
//! key, placing and reading shares, the owner's index) and [`repair`]
//! (challenges and re-creating lost shares; its [`repair::Tracker`] is
//! pure).

pub mod announce;
pub mod budget;
pub mod cache;
pub mod cap;
pub mod config;
pub mod fetch;
pub mod folder;
pub mod gateway;
pub mod holder;
pub mod http;
pub mod id;
pub mod manifest;
pub mod node;
pub mod owner;
pub mod private;
pub mod progress;
pub mod repair;
pub mod resume;
pub mod route;
pub mod schedule;
pub mod seal;
pub mod server;
pub mod store;
pub mod tree;
pub mod units;
pub mod wire;

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

    /// The request and response decoders of the wire protocol.
    pub fn fuzz_wire(data: &[u8]) {
        let _ = crate::wire::Request::parse(data);
        let _ = crate::wire::Response::parse(data);
        let mut d = crate::wire::FrameDecoder::new(crate::wire::MAX_RESPONSE_FRAME);
        d.push(data);
        while let Ok(Some(_)) = d.next_frame() {}
    }

    /// The provider record found in the DHT.
    pub fn fuzz_provider_record(data: &[u8]) {
        let _ = crate::announce::ProviderRecord::parse(data);
    }

    /// The HTTP gateway's request-head, request-target and `Range`
    /// parsers (the whole input is also tried as a head; the first line of
    /// `data` is the target, the rest the `Range` value).
    pub fn fuzz_http(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let (target, range) = text.split_once('\n').unwrap_or((&text, ""));
        let _ = crate::http::parse_head(data);
        let _ = crate::http::parse_path(target);
        let _ = crate::http::percent_decode(target);
        for size in [0, 1, 1000, u64::MAX] {
            if let crate::http::RangeAsk::Part { start, end } =
                crate::http::parse_range(Some(range), size)
            {
                assert!(start < end && end <= size);
            }
        }
    }

    /// The resume state file.
    pub fn fuzz_resume(data: &[u8]) {
        let _ = crate::resume::ResumeState::parse(data);
    }

    /// A sealed state file (opened with a fixed key).
    pub fn fuzz_sealed(data: &[u8]) {
        let k = crate::seal::StateKey::derive(&[0; 32]);
        let _ = crate::seal::open(&k, "fuzz", data);
    }

    /// A read capability, binary and text forms.
    pub fn fuzz_capability(data: &[u8]) {
        if let Ok(c) = crate::cap::Capability::parse(data) {
            // One encoding per capability.
            assert_eq!(c.encode(), data);
            for j in 0..c.shares.len() {
                let _ = c.share_id(j);
            }
        }
        let _ = String::from_utf8_lossy(data).parse::<crate::cap::Capability>();
    }

    /// What private storage reads from the DHT or the network: the holder
    /// record, the owner's index pointer, the index itself, and a folder's
    /// listing and capability text.
    pub fn fuzz_private_records(data: &[u8]) {
        let _ = crate::holder::HolderRecord::parse(data);
        let _ = crate::owner::OwnerKey::from_bytes([7; 32]).open_pointer(data);
        let _ = crate::owner::Index::parse(data);
        let _ = crate::folder::Listing::parse(data);
        let _ = crate::folder::parse_text(&String::from_utf8_lossy(data));
    }
}
