//! Durability: proving that holders still hold shares, and re-creating
//! lost shares after a grace period.
//!
//! A **challenge** asks a holder for one random chunk group of a share
//! with an ordinary `GetRanges` and checks the answer against the share's
//! BLAKE3 root (the manifest in the capability): a holder that answers
//! correctly has those bytes (or fetched them just now from someone who
//! has). It costs one 16 KiB group and the hashes above it.
//!
//! The [`Tracker`] (sans IO: the caller passes `now`) remembers since when
//! each (share, holder) has failed; a share failing for longer than the
//! grace period is lost. [`Repairer::round`] challenges every share of
//! every file in the owner's index (and the index itself), re-creates the
//! lost ones from `k` others ([`crate::owner::repair`]), places them on new
//! holders, and stores an updated index.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bao_tree::io::sync::DecodeResponseIter;
use bao_tree::io::BaoContentItem;
use serde::Serialize;

use crate::cap::Capability;
use crate::id::Id;
use crate::manifest::{FileManifest, Manifest};
use crate::owner::{self, Index, Net, OwnerError, OwnerKey};
use crate::private::Scheme;
use crate::tree;
use crate::wire::{
    read_frame, GroupRanges, Request, Response, MAX_RESPONSE_FRAME, PROTOCOL_VERSION,
};

/// Why a challenge failed.
#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    /// The holder could not be reached or broke off.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The holder answered with something else than the share's bytes.
    #[error("{0}")]
    Wrong(String),
}

/// A socket's reading side that gives up at a deadline.
struct Deadline<'a> {
    s: &'a TcpStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "challenge answer too slow",
            ));
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf)
    }
}

#[allow(clippy::single_range_in_vec_init)] // one group, as a list of ranges
/// Challenges `holder` for chunk group `group` (taken modulo the share's
/// group count) of the share with manifest `m`.
pub fn challenge(
    holder: SocketAddr,
    m: FileManifest,
    group: u64,
    timeout: Duration,
) -> Result<(), ChallengeError> {
    let wrong = |s: &str| ChallengeError::Wrong(s.into());
    let groups = tree::group_count(m.size).max(1);
    let g = group % groups;
    let id = Manifest::File(m).id();
    let stream = TcpStream::connect_timeout(&holder, timeout)?;
    stream.set_write_timeout(Some(timeout))?;
    // The whole exchange within twice the timeout: a holder trickling a
    // byte now and then must not hold the (sequential) repairer.
    let mut s = Deadline {
        s: &stream,
        until: Instant::now() + 2 * timeout,
    };
    let ranges = GroupRanges::new(vec![g..g + 1]).map_err(|e| wrong(&e.to_string()))?;
    let mut out = Request::Hello {
        version: PROTOCOL_VERSION,
    }
    .encode();
    out.extend(Request::GetRanges { id, groups: ranges }.encode());
    (&stream).write_all(&out)?;
    let recv = |s: &mut Deadline| -> Result<Response, ChallengeError> {
        let b = read_frame(s, MAX_RESPONSE_FRAME).map_err(|e| wrong(&e.to_string()))?;
        Response::parse(&b).map_err(|e| wrong(&e.to_string()))
    };
    if !matches!(recv(&mut s)?, Response::Hello { .. }) {
        return Err(wrong("no hello"));
    }
    let want = [g..g + 1];
    let expected = tree::encoded_len(m.size, &want);
    match recv(&mut s)? {
        Response::Ranges { encoded_len } if encoded_len == expected => {}
        Response::Error { code } => return Err(ChallengeError::Wrong(format!("{code:?}"))),
        _ => return Err(wrong("unexpected answer")),
    }
    let root = blake3::Hash::from_bytes(m.root);
    let ranges = tree::chunk_ranges(&want);
    let mut leaves = 0;
    for item in DecodeResponseIter::new(root, tree::tree(m.size), (&mut s).take(expected), &ranges)
    {
        match item {
            Ok(BaoContentItem::Leaf(_)) => leaves += 1,
            Ok(BaoContentItem::Parent(_)) => {}
            Err(e) => return Err(ChallengeError::Wrong(e.to_string())),
        }
    }
    if leaves == 0 && m.size > 0 {
        return Err(wrong("no data"));
    }
    Ok(())
}

/// Since when each (share, holder) has failed its challenges, sans IO.
#[derive(Debug, Default)]
pub struct Tracker {
    failing: HashMap<(Id, SocketAddr), Instant>,
}

impl Tracker {
    /// Records a passed challenge.
    pub fn passed(&mut self, share: Id, holder: SocketAddr) {
        self.failing.remove(&(share, holder));
    }

    /// Records a failed challenge; returns whether the share is now lost
    /// on that holder (failing for at least `grace`).
    pub fn failed(&mut self, share: Id, holder: SocketAddr, now: Instant, grace: Duration) -> bool {
        let since = *self.failing.entry((share, holder)).or_insert(now);
        now.saturating_duration_since(since) >= grace
    }

    /// Forgets a (share, holder) after a repair moved the share.
    pub fn forget(&mut self, share: Id, holder: SocketAddr) {
        self.failing.remove(&(share, holder));
    }
}

/// Repair counters, as `qdfs status` shows them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct RepairSnapshot {
    /// Rounds run.
    pub rounds: u64,
    /// Challenges sent.
    pub challenges: u64,
    /// Challenges failed.
    pub challenges_failed: u64,
    /// Shares re-created and placed on a new holder.
    pub repairs: u64,
    /// Repairs that failed (tried again next round).
    pub repairs_failed: u64,
    /// Shares of the owner's files held now (as of the last round).
    pub shares_ok: u64,
    /// Shares whose holder fails its challenges now.
    pub shares_failing: u64,
}

/// The owner's repairer.
#[derive(Debug)]
pub struct Repairer {
    owner: OwnerKey,
    data_dir: PathBuf,
    net: Net,
    grace: Duration,
    scheme: Scheme,
    tracker: Tracker,
    /// Counters.
    pub stats: RepairSnapshot,
    round: u64,
}

impl Repairer {
    /// A repairer for `owner`'s files.
    pub fn new(
        owner: OwnerKey,
        data_dir: PathBuf,
        net: Net,
        grace: Duration,
        scheme: Scheme,
    ) -> Repairer {
        Repairer {
            owner,
            data_dir,
            net,
            grace,
            scheme,
            tracker: Tracker::default(),
            stats: RepairSnapshot::default(),
            round: 0,
        }
    }

    /// Checks one capability's shares; returns the lost ones.
    fn check(&mut self, cap: &Capability, now: Instant) -> HashSet<usize> {
        let mut lost = HashSet::new();
        for (j, s) in cap.shares.iter().enumerate() {
            let (Some(m), Some(id)) = (cap.share_manifest(j), cap.share_id(j)) else {
                continue;
            };
            // The hinted holder; without a hint (a pointer too small to
            // keep them), the first provider the DHT knows.
            let holder = match s.hints.first() {
                Some(&h) => h,
                None => match self.net.share_providers(&id, &[]).first() {
                    Some(&h) => h,
                    None => {
                        lost.insert(j);
                        continue;
                    }
                },
            };
            let group = u64::from_be_bytes(owner::random_bytes::<8>());
            self.stats.challenges += 1;
            match challenge(holder, m, group, self.net.connect_timeout) {
                Ok(()) => {
                    self.tracker.passed(id, holder);
                    self.stats.shares_ok += 1;
                }
                Err(e) => {
                    self.stats.challenges_failed += 1;
                    self.stats.shares_failing += 1;
                    tracing::info!(share = j, %holder, "challenge failed: {e}");
                    if self.tracker.failed(id, holder, now, self.grace) {
                        lost.insert(j);
                    }
                }
            }
        }
        lost
    }

    fn fix(&mut self, cap: &Capability, lost: &HashSet<usize>) -> Option<Capability> {
        match owner::repair(cap, lost, &self.net) {
            Ok(new) => {
                for &j in lost {
                    if let (Some(id), Some(h)) =
                        (cap.share_id(j), cap.shares[j].hints.first().copied())
                    {
                        self.tracker.forget(id, h);
                    }
                }
                self.stats.repairs += lost.len() as u64;
                tracing::info!(file = %cap.name(), shares = lost.len(), "repaired");
                Some(new)
            }
            Err(e) => {
                self.stats.repairs_failed += 1;
                tracing::warn!(file = %cap.name(), "repair failed: {e}");
                None
            }
        }
    }

    /// One round: challenge everything, repair what is lost, store the
    /// updated index. Returns the number of shares repaired.
    pub fn round(&mut self, now: Instant) -> Result<u64, OwnerError> {
        self.round += 1;
        self.stats.rounds += 1;
        self.stats.shares_ok = 0;
        self.stats.shares_failing = 0;
        let before = self.stats.repairs;
        let (mut index, ptr): (Index, _) =
            owner::load_index(&self.owner, &self.data_dir, &self.net)?;
        let Some(ptr) = ptr else { return Ok(0) };
        let mut changed = false;
        for i in 0..index.entries.len() {
            let cap = match index.entries[i].capability() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("{e}");
                    continue;
                }
            };
            let lost = self.check(&cap, now);
            if !lost.is_empty() {
                if let Some(new) = self.fix(&cap, &lost) {
                    index.entries[i].cap = new.to_text();
                    changed = true;
                }
            }
        }
        // The index's own shares: a lost one means storing the index anew.
        let index_lost = self.check(&ptr.cap, now);
        if changed || !index_lost.is_empty() {
            owner::save_index(
                &self.owner,
                &self.data_dir,
                &self.net,
                &index,
                Some(&ptr),
                self.scheme,
            )?;
        } else if self.round % 8 == 1 {
            // Keep the pointer alive in the DHT (values live 24 h).
            owner::publish_pointer(&self.owner, &self.data_dir, &self.net, &ptr)?;
        }
        Ok(self.stats.repairs - before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_waits_for_the_grace_period() {
        let mut t = Tracker::default();
        let (id, h) = (Id([1; 32]), "127.0.0.1:1".parse().unwrap());
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        assert!(!t.failed(id, h, t0, grace));
        assert!(!t.failed(id, h, t0 + Duration::from_secs(5), grace));
        assert!(t.failed(id, h, t0 + Duration::from_secs(10), grace));
        t.passed(id, h);
        assert!(!t.failed(id, h, t0 + Duration::from_secs(11), grace));
    }
}
