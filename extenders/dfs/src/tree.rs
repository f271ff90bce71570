//! The BLAKE3 tree of a file (through [`bao_tree`]): building its outboard
//! while hashing, and the geometry of chunk-group requests.
//!
//! A file is cut into 16 KiB chunk groups ([`GROUP_BYTES`]); the outboard
//! holds the hash pairs of the tree above the groups (64 bytes per group,
//! 0.4 % of the file), stored in post order so it is written sequentially
//! while the file streams through once. Group `g` covers bytes
//! `g * 16 KiB ..` and BLAKE3 chunks `g * 16 ..`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::path::Path;

use bao_tree::iter::BaoChunk;
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};

use crate::manifest::{FileManifest, BLOCK_LOG, GROUP_BYTES, MAX_FILE_SIZE};

/// Chunks (1 KiB each) in one group.
pub const CHUNKS_PER_GROUP: u64 = 1 << BLOCK_LOG;

/// The tree geometry of a file of `size` bytes.
pub fn tree(size: u64) -> BaoTree {
    BaoTree::new(size, BlockSize::from_chunk_log(BLOCK_LOG))
}

/// Number of chunk groups of a file of `size` bytes (0 for an empty file).
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES)
}

/// Byte length of group `g` of a file of `size` bytes.
pub fn group_len(size: u64, g: u64) -> u64 {
    let start = g.saturating_mul(GROUP_BYTES);
    size.saturating_sub(start).min(GROUP_BYTES)
}

/// The BLAKE3 chunk ranges covering these group ranges.
pub fn chunk_ranges(groups: &[Range<u64>]) -> ChunkRanges {
    let mut out = ChunkRanges::empty();
    for r in groups {
        out |= ChunkRanges::from(
            ChunkNum(r.start * CHUNKS_PER_GROUP)..ChunkNum(r.end * CHUNKS_PER_GROUP),
        );
    }
    out
}

/// Exact length of the verified-stream encoding of `groups` of a file of
/// `size` bytes: the parent hash pairs on the way down plus the groups'
/// bytes. Both sides compute it; a response of any other length is refused.
pub fn encoded_len(size: u64, groups: &[Range<u64>]) -> u64 {
    let t = tree(size);
    let ranges = chunk_ranges(groups);
    let ranges = bao_tree::io::sync::truncate_ranges(&ranges, size);
    t.ranges_pre_order_chunks_iter_ref(ranges, 0)
        .map(|c| match c {
            BaoChunk::Parent { .. } => 64,
            BaoChunk::Leaf { size, .. } => size as u64,
        })
        .sum()
}

/// Why a file could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Reading the file or writing the outboard failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// Too big for the manifest format.
    #[error("file is larger than {MAX_FILE_SIZE} bytes")]
    TooLarge,
}

/// Hashes `size` bytes from `data`, writing the post-order outboard to
/// `outboard`; returns the file's manifest. Memory stays at one buffer
/// whatever the size.
pub fn hash_stream(
    data: impl Read,
    size: u64,
    outboard: impl Write,
) -> Result<FileManifest, HashError> {
    if size > MAX_FILE_SIZE {
        return Err(HashError::TooLarge);
    }
    let reader = BufReader::with_capacity(1 << 20, data);
    let mut writer = BufWriter::with_capacity(1 << 16, outboard);
    let root = bao_tree::io::sync::outboard_post_order(reader, tree(size), &mut writer).map_err(
        |source| HashError::Io {
            what: "hashing".into(),
            source,
        },
    )?;
    writer.flush().map_err(|source| HashError::Io {
        what: "writing the outboard".into(),
        source,
    })?;
    Ok(FileManifest {
        size,
        root: *root.as_bytes(),
    })
}

/// Hashes the file at `path` into a manifest, writing its outboard to `ob`
/// (already open, at `outboard_path`).
pub fn hash_file(path: &Path, ob: File, outboard_path: &Path) -> Result<FileManifest, HashError> {
    let io = |what: String| move |source| HashError::Io { what, source };
    let f = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let size = f
        .metadata()
        .map_err(io(format!("reading {}", path.display())))?
        .len();
    // A file that shrinks while being hashed ends in an error, not a
    // manifest for bytes that never existed.
    let m = hash_stream(f.take(size), size, &ob)?;
    ob.sync_all()
        .map_err(io(format!("syncing {}", outboard_path.display())))?;
    Ok(m)
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn root_is_plain_blake3() {
        for n in [0, 1, 1024, 16 * 1024, 16 * 1024 + 1, 100_000] {
            let d = data(n);
            let mut ob = Vec::new();
            let m = hash_stream(&d[..], n as u64, &mut ob).unwrap();
            assert_eq!(m.root, *blake3::hash(&d).as_bytes(), "size {n}");
            assert_eq!(ob.len() as u64, tree(n as u64).outboard_size());
        }
    }

    #[test]
    fn geometry() {
        assert_eq!(group_count(0), 0);
        assert_eq!(group_count(1), 1);
        assert_eq!(group_count(GROUP_BYTES), 1);
        assert_eq!(group_count(GROUP_BYTES + 1), 2);
        assert_eq!(group_len(GROUP_BYTES + 5, 1), 5);
        assert_eq!(group_len(GROUP_BYTES + 5, 2), 0);
        // One whole small file: its bytes, no parents.
        assert_eq!(encoded_len(1000, &[0..1]), 1000);
        // Two groups: one parent pair and both groups.
        assert_eq!(encoded_len(GROUP_BYTES + 5, &[0..2]), 64 + GROUP_BYTES + 5);
    }

    #[test]
    fn short_file_is_an_error() {
        let d = data(1000);
        assert!(hash_stream(&d[..], 2000, Vec::new()).is_err());
    }
}
