//! The resume state of a fetch, kept beside the output as
//! `<output>.qdfs-state`: which chunk groups of `<output>.qdfs-part` are
//! verified, for which ID, and how many bytes all runs have received.
//!
//! It is written only after the part file's data has been synced, so it
//! never claims a group that is not on disk; it may lag behind (those
//! groups are fetched again). Any state that does not parse, or names
//! another file, is discarded and the fetch starts over.
//!
//! ```text
//! magic "QDFSRS01" | id [32] | size u64 | received u64 | bitmap (1 bit per group)
//! ```

use crate::id::Id;
use crate::manifest::MAX_FILE_SIZE;
use crate::schedule::Bitmap;
use crate::tree::group_count;

const MAGIC: &[u8; 8] = b"QDFSRS01";

/// A fetch's progress on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeState {
    /// The file's manifest ID.
    pub id: Id,
    /// Its size.
    pub size: u64,
    /// Bytes received from the network by every run so far.
    pub received: u64,
    /// Verified groups.
    pub done: Bitmap,
}

/// Why a state file is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// Not a state file.
    #[error("not a QuantumDFS resume state")]
    BadMagic,
    /// Wrong length for the size it names.
    #[error("resume state has the wrong length")]
    BadLength,
    /// Names an impossible size or sets bits past the end.
    #[error("resume state is inconsistent")]
    Inconsistent,
}

impl ResumeState {
    /// The state's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(56 + self.done.len() as usize / 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.received.to_be_bytes());
        out.extend_from_slice(&self.done.to_bytes());
        out
    }

    /// Parses a state file; never panics.
    pub fn parse(data: &[u8]) -> Result<ResumeState, ResumeError> {
        if data.len() < 56 {
            return Err(ResumeError::BadLength);
        }
        if &data[..8] != MAGIC {
            return Err(ResumeError::BadMagic);
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&data[8..40]);
        let mut n = [0u8; 8];
        n.copy_from_slice(&data[40..48]);
        let size = u64::from_be_bytes(n);
        n.copy_from_slice(&data[48..56]);
        let received = u64::from_be_bytes(n);
        if size > MAX_FILE_SIZE {
            return Err(ResumeError::Inconsistent);
        }
        let groups = group_count(size);
        if (data.len() - 56) as u64 != groups.div_ceil(8) {
            return Err(ResumeError::BadLength);
        }
        let done = Bitmap::from_bytes(&data[56..], groups).ok_or(ResumeError::Inconsistent)?;
        Ok(ResumeState {
            id: Id(id),
            size,
            received,
            done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let mut done = Bitmap::new(group_count(100_000));
        done.set(3, true);
        let s = ResumeState {
            id: Id([4; 32]),
            size: 100_000,
            received: 12345,
            done,
        };
        let b = s.encode();
        assert_eq!(ResumeState::parse(&b), Ok(s));
        for cut in 0..b.len() {
            assert!(ResumeState::parse(&b[..cut]).is_err());
        }
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(ResumeState::parse(&bad), Err(ResumeError::BadMagic));
        let mut bad = b.clone();
        *bad.last_mut().unwrap() = 0xff;
        assert_eq!(ResumeState::parse(&bad), Err(ResumeError::Inconsistent));
        let mut bad = b;
        bad[40] = 0xff;
        assert!(ResumeState::parse(&bad).is_err());
        for i in 0..2000u32 {
            let junk: Vec<u8> = (0..(i % 80)).map(|j| (i * 31 + j * 7) as u8).collect();
            crate::fuzzing::fuzz_resume(&junk);
        }
    }
}
