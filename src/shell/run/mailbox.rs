//! The node's mailbox: how threads other than the data thread reach the
//! node.
//!
//! The data thread owns the [`Node`]; nothing else touches it. Every other
//! thread (control requests, the signing thread, LAN discovery, saving the
//! peer store, metrics) sends it work through the [`Mailbox`]: a closure
//! over `&mut Node`, queued, with a byte written to a socket pair that the
//! data thread's poll(2) watches. The data thread runs the waiting work
//! between batches of packets ([`Inbox::run`]) and sends what it queued.
//!
//! Why not a mutex: with `Mutex<Node>` a control thread that took the lock
//! could lose its core while holding it (it had just spent milliseconds on
//! an RSA signature, and on 2 cores the scheduler preempts it), and the
//! data path then waited for a thread that wasn't running. Measured with
//! `BENCH_ONLY=storm scripts/bench` on 2 cores: control holds of the lock
//! used 50–170 µs of CPU but lasted 1–8.6 ms, 475 times over 1 ms in one
//! storm of 3,042 puts, and the data path waited over 1 ms 30 times (up to
//! 7.7 ms). Work in the mailbox costs the data path its CPU time, unless
//! the data thread itself loses its core meanwhile: in the same storm about
//! 100 pieces of 10–100 µs of CPU took 1–4.6 ms, each with one involuntary
//! context switch (the machine's two cores were simply full).
//!
//! Each piece of work is timed; one over [`LONG_HOLD`] is counted per
//! sender ([`Holder`]), and `status` shows them (`data_path.slow_work`).

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use qgate_api::SlowWork;
pub(super) use qgate_api::WorkFrom as Holder;

use crate::proto::Node;

/// Work counted in [`SlowWork`] (and in the data path's
/// `long_lock_waits`).
pub(super) const LONG_HOLD: Duration = Duration::from_millis(1);

/// Every sender, in the order `status` lists them.
const HOLDERS: [Holder; 7] = [
    Holder::Timer,
    Holder::Control,
    Holder::Sign,
    Holder::Store,
    Holder::Lan,
    Holder::PathMtu,
    Holder::Metrics,
];

fn slot(who: Holder) -> usize {
    HOLDERS.iter().position(|h| *h == who).unwrap_or(0)
}

/// Work for the node (generic for the tests only).
type Job<T> = Box<dyn FnOnce(&mut T) + Send>;

#[derive(Default)]
struct Tally {
    count: AtomicU64,
    longest_us: AtomicU64,
}

/// The sending side, shared by every thread.
pub(super) struct Mailbox<T = Node> {
    jobs: Sender<(Holder, Job<T>)>,
    /// Written to wake the data thread (one byte; a full buffer means a
    /// wake-up is pending already).
    bell: UnixStream,
    /// Work was queued since the data thread last looked (spares it a
    /// system call per batch of packets).
    pending: AtomicBool,
    holds: [Tally; HOLDERS.len()],
}

/// The data thread's side.
pub(super) struct Inbox<T = Node> {
    jobs: Receiver<(Holder, Job<T>)>,
    bell: UnixStream,
}

/// A mailbox and its inbox.
pub(super) fn mailbox<T>() -> Result<(Mailbox<T>, Inbox<T>)> {
    let (tx, rx) = channel();
    let (ring, hear) = UnixStream::pair().context("creating the node's wake-up socket pair")?;
    ring.set_nonblocking(true)
        .and_then(|()| hear.set_nonblocking(true))
        .context("making the wake-up socket pair non-blocking")?;
    Ok((
        Mailbox {
            jobs: tx,
            bell: ring,
            pending: AtomicBool::new(false),
            holds: Default::default(),
        },
        Inbox {
            jobs: rx,
            bell: hear,
        },
    ))
}

impl<T: 'static> Mailbox<T> {
    /// Runs `f` on the node and waits for its answer. Never call this from
    /// the data thread (it would wait for itself): use [`Mailbox::post`].
    pub(super) fn call<R: Send + 'static>(
        &self,
        who: Holder,
        f: impl FnOnce(&mut T) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = sync_channel(1);
        self.post(who, move |node| {
            let _ = tx.send(f(node));
        });
        match rx.recv() {
            Ok(r) => r,
            // The data thread is gone only when the process ends (a panic
            // there exits it, see `qgate.rs`); wait for that.
            Err(_) => loop {
                std::thread::park();
            },
        }
    }

    /// Queues `f` for the node without waiting for it.
    pub(super) fn post(&self, who: Holder, f: impl FnOnce(&mut T) + Send + 'static) {
        if self.jobs.send((who, Box::new(f))).is_ok() {
            self.pending.store(true, Ordering::Release);
            // WouldBlock: the bell has rung and not been heard yet.
            let _ = (&self.bell).write(&[1]);
        }
    }

    /// Counts a piece of work that took `took`.
    pub(super) fn note(&self, who: Holder, took: Duration) {
        if took > LONG_HOLD {
            let t = &self.holds[slot(who)];
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            t.count.fetch_add(1, Ordering::Relaxed);
            t.longest_us.fetch_max(us, Ordering::Relaxed);
        }
    }

    /// The work over [`LONG_HOLD`] since start, senders that had none
    /// left out.
    pub(super) fn slow_work(&self) -> Vec<SlowWork> {
        HOLDERS
            .iter()
            .zip(&self.holds)
            .filter_map(|(&holder, t)| {
                let count = t.count.load(Ordering::Relaxed);
                (count > 0).then(|| SlowWork {
                    from: holder,
                    count,
                    longest_us: t.longest_us.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

impl<T> Inbox<T> {
    /// What the data thread's poll(2) watches.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    /// Empties the bell (poll(2) said it rang).
    pub(super) fn hear(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.bell).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Runs the work waiting, each piece timed and counted in `mailbox`,
    /// and answers the longest (None: there was none). Costs an atomic
    /// load when nothing was queued.
    pub(super) fn run(&self, node: &mut T, mailbox: &Mailbox<T>) -> Option<Duration>
    where
        T: 'static,
    {
        if !mailbox.pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        let mut longest = None;
        loop {
            match self.jobs.try_recv() {
                Ok((who, job)) => {
                    let t0 = Instant::now();
                    job(node);
                    let took = t0.elapsed();
                    mailbox.note(who, took);
                    longest = longest.max(Some(took));
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return longest,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    #[test]
    fn work_runs_on_the_owner_and_long_work_is_counted_for_its_sender() {
        let (mailbox, inbox) = mailbox::<u32>().unwrap();
        let mailbox = std::sync::Arc::new(mailbox);
        let m = mailbox.clone();
        let caller = std::thread::spawn(move || {
            m.call(Holder::Control, |n| {
                std::thread::sleep(Duration::from_millis(3));
                *n += 1;
                *n
            })
        });
        mailbox.post(Holder::Lan, |n| *n += 1);
        // The owner: waits for the bell, then runs what came (bounded).
        let mut node = 10u32;
        for _ in 0..100 {
            if node == 12 {
                break;
            }
            let mut fds = [PollFd::new(inbox.fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(100u16)).unwrap();
            inbox.hear();
            inbox.run(&mut node, &mailbox);
        }
        assert_eq!(node, 12);
        let answer = caller.join().unwrap();
        assert!(answer == 11 || answer == 12, "{answer}");
        let holds = mailbox.slow_work();
        assert_eq!(holds.len(), 1, "{holds:?}");
        assert_eq!((holds[0].from, holds[0].count), (Holder::Control, 1));
        assert!(holds[0].longest_us >= 3_000, "{holds:?}");
        // Nothing waiting: nothing runs.
        assert_eq!(inbox.run(&mut node, &mailbox), None);
    }
}
