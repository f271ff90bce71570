//! The node's timers, run by the data thread that owns the node.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::PollTimeout;

use super::{save_peers, save_values, Holder, Output, Retry, Shared};
use crate::proto::node::Sweep;
use crate::proto::Node;

/// Links visited per step of the timer's sweep: about 50 µs of work (a
/// sweep over 2,000 links held the node ~0.8 ms on average, up to 13 ms, in
/// one piece).
const SWEEP_STEP: usize = 128;

/// The core's timers, run by the data thread between batches of packets:
/// when [`Node::poll_timeout`] has come, one step of the sweep
/// ([`SWEEP_STEP`] links) per round, so a packet waits for one step, not
/// for the whole sweep; the rest of the timers' work (the record sequence
/// number, saving the peer store) goes to blocking tasks it starts but
/// never waits for. Nothing here waits on the disk or on a full socket:
/// control datagrams that find the socket buffer full are dropped (the
/// protocol sends hellos, handshakes and lookups again), so a slow disk or
/// a flood can't stall link timers.
pub(super) struct Timers {
    /// When the next sweep is due.
    deadline: Instant,
    /// A sweep under way: the time it runs at.
    sweeping: Option<Instant>,
    last_save: Instant,
    runtime: tokio::runtime::Handle,
}

impl Timers {
    pub(super) fn new(node: &Node, runtime: tokio::runtime::Handle) -> Timers {
        Timers {
            deadline: node.poll_timeout(),
            sweeping: None,
            last_save: Instant::now(),
            runtime,
        }
    }

    /// How long poll(2) may sleep: until the next sweep, none while one is
    /// under way.
    pub(super) fn timeout(&self, now: Instant) -> PollTimeout {
        if self.sweeping.is_some() {
            return PollTimeout::ZERO;
        }
        // Rounded up: waking a little early would spin until the deadline.
        let ms = self
            .deadline
            .saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000);
        PollTimeout::try_from(ms.min(60_000) as u16 as i32).unwrap_or(PollTimeout::MAX)
    }

    /// One step of the sweep, if one is due or under way.
    pub(super) fn step(&mut self, sh: &Arc<Shared>, node: &mut Node, now: Instant) {
        let at = match self.sweeping {
            Some(at) => at,
            None if now >= self.deadline => now,
            None => return,
        };
        let t0 = Instant::now();
        let mut out = Output::default();
        let sweep = node.handle_timeout_some(at, SWEEP_STEP);
        out.take(sh, node);
        self.sweeping = (sweep != Sweep::Done).then_some(at);
        if sweep == Sweep::Done {
            self.deadline = node.poll_timeout();
            self.after_sweep(sh, node, at);
        }
        let took = t0.elapsed();
        sh.node.note(Holder::Timer, took);
        node.note_data_lock_wait(took);
        out.send(sh, Retry::No);
    }

    fn after_sweep(&mut self, sh: &Arc<Shared>, node: &mut Node, now: Instant) {
        #[cfg(feature = "test-hooks")]
        super::write_cell_log(node);
        if let Some(limit) = node.record_seq_wanted(now) {
            store_record_seq(sh, &self.runtime, limit);
        }
        // The peer store is a cache of the network: every 10 s is enough,
        // and shutdown writes it too. So are the values held for others
        // (our own are written as soon as they are put).
        if self.last_save.elapsed() >= Duration::from_secs(10)
            && !sh.saving.swap(true, Ordering::AcqRel)
        {
            self.last_save = Instant::now();
            let sh = sh.clone();
            self.runtime.spawn_blocking(move || {
                save_peers(&sh);
                save_values(&sh);
                sh.saving.store(false, Ordering::Release);
            });
        }
    }
}

/// Stores `limit` as the highest record sequence number in use, then lets
/// the node sign records up to it: durable before published, so a restart
/// after a crash never signs a number the network has seen with other
/// contents. Runs on a blocking task; the node re-signs once it is done.
fn store_record_seq(sh: &Arc<Shared>, runtime: &tokio::runtime::Handle, limit: u64) {
    if sh.seq_storing.swap(true, Ordering::AcqRel) {
        return;
    }
    let sh = sh.clone();
    runtime.spawn_blocking(move || {
        match sh.store.write_record_seq(limit) {
            Ok(()) => sh
                .node
                .post(Holder::Timer, move |n| n.reserve_record_seq(limit)),
            Err(e) => tracing::warn!("storing the record sequence number: {e:#}"),
        }
        sh.seq_storing.store(false, Ordering::Release);
    });
}
