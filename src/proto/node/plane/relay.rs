//! The data plane's share of the circuits this node carries (ARCHITECTURE
//! §14, gap 2, stage 3): relayed between two links the plane holds, or
//! ending here (this node is the destination) on one. For them the plane
//! takes its layer off a forward cell, or adds it to a backward one, where
//! the cell was decrypted, writes the onward circuit ID and seals the cell
//! on the other link, without the node; and it opens the cells addressed
//! to this hop itself, checking their counters against the circuit's replay
//! window (shared with the node, which opens the cells that reach it
//! before the hand-over). DATA at the circuit's end goes to the TUN from
//! the plane, once its inner source is the one the circuit authenticated;
//! every other command (a probe, LOOKUP, noise) goes to the node opened
//! ([`FromPlane::Opened`](super::FromPlane)).
//!
//! The node hands a relayed circuit over ([`Relay`]) once it is extended
//! and both of its links are handed, one ending here once its source
//! authenticated and its link is handed, and takes it back when it ends.
//! The relay bandwidth cap has one budget here for all that the relay
//! passes on over the plane's links: the cells the plane passes on itself,
//! and those the node passes on there
//! ([`ToPlane::SealRelayed`](super::ToPlane)). What the plane leaves to
//! the node: cells of other kinds (CREATE, CREATED, DESTROY) and cells on
//! circuits it does not hold. The plane counts what it passes on and
//! delivers per circuit and reports it once a tick ([`CellReport`]), which
//! keeps the node's idle timers, reply routes and `status` current.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use super::CircuitRef;
use crate::proto::limit::ByteBucket;
use crate::proto::node::circuits::{count, CellDrops};
use crate::proto::onion::{
    self, parse_cell, CellKind, Cmd, Forward, HopKeys, ReplayWindow, CELL_HEADER,
};

/// A circuit this node relays or ends, as the node hands it to the plane.
/// (Cloned for a second plane when its two links sit on two.)
#[derive(Clone)]
pub struct Relay {
    /// The node's ID for the circuit.
    pub(in crate::proto::node) h: u64,
    /// Link and circuit ID towards the source.
    pub(in crate::proto::node) prev: (u32, u32),
    /// Link and circuit ID towards the next hop; none where the circuit
    /// ends here.
    pub(in crate::proto::node) next: Option<(u32, u32)>,
    /// This hop's keys (the node keeps them too).
    pub(in crate::proto::node) keys: Arc<HopKeys>,
    /// The counters of the cells addressed to this hop (the node checks
    /// the ones it opens against the same window).
    pub(in crate::proto::node) replay: Arc<ReplayWindow>,
    /// Where the circuit ends here: the source it authenticated, the only
    /// one its DATA may come from.
    pub(in crate::proto::node) src: Option<Ipv6Addr>,
}

/// What the plane did with circuits' cells since its last report
/// ([`FromPlane::Relayed`](super::FromPlane::Relayed)): the cells it passed
/// on as a relay, the DATA it delivered at a circuit's end, the DATA it
/// sent (on circuits this node built, or back on those it ends), and what
/// it dropped of the cells it opened.
#[derive(Debug, Default)]
pub struct CellReport {
    /// Per circuit that passed cells on or took cells for this hop: the
    /// node's ID for it, when it last did, and the bytes it passed forward
    /// and backward since the last report.
    pub circuits: Vec<(u64, Instant, u64, u64)>,
    /// Per circuit that brought DATA the plane delivered to the TUN (one
    /// ending here, or one this node built): when it last did, and the
    /// packets' bytes since the last report.
    pub received: Vec<(CircuitRef, Instant, u64)>,
    /// What the plane dropped of the cells for this hop (forged, replayed,
    /// spoofed, ...).
    pub drops: CellDrops,
    /// Cells passed on.
    pub cells: u64,
    /// Bytes of those cells.
    pub bytes: u64,
    /// Cells dropped over the relay bandwidth cap.
    pub over_bandwidth: u64,
    /// Per circuit the plane sent DATA on (one this node built, or back on
    /// one it ends): when it last did, and the packets' bytes since the
    /// last report.
    pub sent: Vec<(CircuitRef, Instant, u64)>,
    /// Test hook: the cells passed on, as (forward?, as they came, as they
    /// left), while the node logs cells.
    #[cfg(feature = "test-hooks")]
    pub log: Vec<(bool, Vec<u8>, Vec<u8>)>,
}

impl CellReport {
    /// Whether there is nothing to report.
    pub fn is_empty(&self) -> bool {
        let empty = self.circuits.is_empty()
            && self.received.is_empty()
            && self.drops == CellDrops::default()
            && self.cells == 0
            && self.over_bandwidth == 0
            && self.sent.is_empty();
        #[cfg(feature = "test-hooks")]
        let empty = empty && self.log.is_empty();
        empty
    }
}

struct Carried {
    relay: Relay,
    /// Since the last report: when it last passed a cell on, and bytes
    /// forward and backward.
    used: Option<Instant>,
    fwd: u64,
    bwd: u64,
    /// Since the last report: when it last delivered DATA, and its bytes.
    delivered: Option<Instant>,
    rx: u64,
}

/// What became of a cell given to [`Relays::pass`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Passed on: seal it on this link.
    Onward(u32),
    /// Dropped (over the bandwidth cap, forged, replayed, ...) and counted.
    Dropped,
    /// Not the plane's: the node handles it.
    Node,
    /// Addressed to this hop and opened (no replay): the command and its
    /// data's range in the cell.
    Mine {
        h: u64,
        /// The source the circuit authenticated, where it ends here.
        src: Option<Ipv6Addr>,
        cmd: Cmd,
        data: Range<usize>,
    },
}

/// The circuits the plane relays, by the node's ID and by (link, circuit
/// ID) on either side.
#[derive(Default)]
pub(super) struct Relays {
    circuits: HashMap<u64, Carried>,
    /// (link, circuit ID) → (circuit, whether cells arriving there go
    /// forward).
    on_lane: HashMap<(u32, u32), (u64, bool)>,
    /// The relay bandwidth cap's budget for the cells the plane passes on.
    bucket: Option<ByteBucket>,
    report: CellReport,
    /// Test hook: whether passed cells are logged.
    #[cfg(feature = "test-hooks")]
    pub(super) log: bool,
}

impl Relays {
    /// With the relay bandwidth cap's budget, if there is a cap.
    pub(super) fn new(bucket: Option<ByteBucket>) -> Relays {
        Relays {
            bucket,
            ..Relays::default()
        }
    }

    /// How many circuits the plane relays.
    pub(super) fn len(&self) -> usize {
        self.circuits.len()
    }

    /// Takes over circuit `r` (its links are the plane's).
    pub(super) fn insert(&mut self, r: Relay) {
        self.remove(r.h);
        // The node's circuit IDs on a link are unique while a circuit
        // holds them, and it takes a circuit back before it frees them.
        for (key, forward) in [(Some(r.prev), true), (r.next, false)] {
            let Some(key) = key else { continue };
            if let Some((old, _)) = self.on_lane.insert(key, (r.h, forward)) {
                debug_assert!(false, "circuit {old} still held {key:?}");
            }
        }
        self.circuits.insert(
            r.h,
            Carried {
                relay: r,
                used: None,
                fwd: 0,
                bwd: 0,
                delivered: None,
                rx: 0,
            },
        );
    }

    /// Drops circuit `h` (what it passed on since the last report is still
    /// reported).
    pub(super) fn remove(&mut self, h: u64) {
        if let Some(c) = self.circuits.remove(&h) {
            for key in [Some(c.relay.prev), c.relay.next].into_iter().flatten() {
                if self.on_lane.get(&key).is_some_and(|(o, _)| *o == h) {
                    self.on_lane.remove(&key);
                }
            }
            Self::note(&mut self.report, h, &c);
        }
    }

    /// Link `index` left the plane: so do the circuits on it.
    pub(super) fn lane_gone(&mut self, index: u32) {
        let gone: Vec<u64> = self
            .circuits
            .iter()
            .filter(|(_, c)| c.relay.prev.0 == index || c.relay.next.is_some_and(|n| n.0 == index))
            .map(|(h, _)| *h)
            .collect();
        for h in gone {
            self.remove(h);
        }
    }

    /// A cell arrived on link `index` (`cell`: the whole cell). If it runs
    /// on a circuit the plane carries: a forward cell addressed to this
    /// hop is opened in place (and checked against the replay window); any
    /// other has this hop's layer come off (forward) or go on (backward)
    /// in place and the onward circuit ID written, and the answer is the
    /// link it goes on.
    pub(super) fn pass(&mut self, now: Instant, index: u32, cell: &mut [u8]) -> Step {
        let Ok(hdr) = parse_cell(cell) else {
            return Step::Node;
        };
        if hdr.kind != CellKind::Relay {
            return Step::Node;
        }
        let Some(&(h, forward)) = self.on_lane.get(&(index, hdr.circ)) else {
            return Step::Node;
        };
        let Some(c) = self.circuits.get_mut(&h) else {
            return Step::Node;
        };
        #[cfg(feature = "test-hooks")]
        let cell_in = self.log.then(|| cell.to_vec());
        let mut nonce = hdr.nonce;
        let size = cell.len();
        let (head, body) = cell.split_at_mut(CELL_HEADER);
        let onward = if forward {
            match c.relay.keys.forward(&mut nonce, body) {
                Ok(Forward::Pass) => match c.relay.next {
                    Some(next) => next,
                    None => {
                        self.report.drops.unrecognised += 1;
                        return Step::Dropped;
                    }
                },
                Ok(Forward::Mine(counter, cmd, range)) => {
                    if let Err(e) = c.relay.replay.check(counter) {
                        count(&mut self.report.drops, e);
                        return Step::Dropped;
                    }
                    c.used = Some(now);
                    let data = CELL_HEADER + range.start..CELL_HEADER + range.end;
                    let src = c.relay.src;
                    return Step::Mine { h, src, cmd, data };
                }
                Err(e) => {
                    count(&mut self.report.drops, e);
                    return Step::Dropped;
                }
            }
        } else {
            c.relay.keys.backward(&mut nonce, body);
            c.relay.prev
        };
        // Counted on the circuit before the cap, as the node counts it.
        c.used = Some(now);
        if forward {
            c.fwd += size as u64;
        } else {
            c.bwd += size as u64;
        }
        if !Self::spend(&mut self.bucket, &mut self.report, now, size) {
            return Step::Dropped;
        }
        onion::write_header(head, onward.1, CellKind::Relay, &nonce);
        #[cfg(feature = "test-hooks")]
        if let Some(cell_in) = cell_in {
            if self.report.log.len() < 10_000 {
                self.report.log.push((forward, cell_in, cell.to_vec()));
            }
        }
        Step::Onward(onward.0)
    }

    /// A cell of `size` bytes the node passes on as a relay on one of the
    /// plane's links: whether the relay bandwidth cap lets it through
    /// (then it is counted as passed on; else as dropped).
    pub(super) fn charge(&mut self, now: Instant, size: usize) -> bool {
        Self::spend(&mut self.bucket, &mut self.report, now, size)
    }

    fn spend(
        bucket: &mut Option<ByteBucket>,
        report: &mut CellReport,
        now: Instant,
        size: usize,
    ) -> bool {
        if let Some(b) = bucket {
            if !b.take(now, size) {
                report.over_bandwidth += 1;
                return false;
            }
        }
        report.cells += 1;
        report.bytes += size as u64;
        true
    }

    /// Circuit `h` (ending here) delivered a packet of `bytes` at `now`.
    pub(super) fn delivered(&mut self, now: Instant, h: u64, bytes: usize) {
        if let Some(c) = self.circuits.get_mut(&h) {
            c.delivered = Some(now);
            c.rx += bytes as u64;
        }
    }

    /// A cell for this hop dropped after it was opened.
    pub(super) fn drops_mut(&mut self) -> &mut CellDrops {
        &mut self.report.drops
    }

    fn note(report: &mut CellReport, h: u64, c: &Carried) {
        if let Some(t) = c.used {
            report.circuits.push((h, t, c.fwd, c.bwd));
        }
        if let Some(t) = c.delivered {
            report.received.push((CircuitRef::Carried(h), t, c.rx));
        }
    }

    /// The report being gathered (others add to it).
    pub(super) fn report_mut(&mut self) -> &mut CellReport {
        &mut self.report
    }

    /// What the plane passed on since the last call.
    pub(super) fn take_report(&mut self) -> CellReport {
        for (h, c) in &mut self.circuits {
            Self::note(&mut self.report, *h, c);
            (c.used, c.fwd, c.bwd, c.delivered, c.rx) = (None, 0, 0, None, 0);
        }
        std::mem::take(&mut self.report)
    }
}
