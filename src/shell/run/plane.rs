//! The data plane's mailbox: how the node's messages for the data plane
//! (`proto::node::plane`) reach the data thread, which holds the plane.
//!
//! Any thread may hold the node (the timer, control requests, the signing
//! thread, the data thread itself). As each hold ends, the node lock passes
//! what the node queued for the plane into a channel and rings a bell, a
//! socket in the data thread's poll(2) set ([`Forward`]). The data thread
//! takes the messages before its next packets ([`Inbox::take`]); what the
//! plane answers (counters, messages for the node) it gives the node under
//! the lock, in the same hold as the packets that need the node anyway, or
//! in one of its own.
//!
//! `status` wants counters as of now, not as of the plane's last report (a
//! tick ago): [`Mailbox::refresh`] asks for a report and waits, a few
//! milliseconds at most, until the node has it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use crate::proto::node::plane::{DataPlane, ToPlane};
use crate::proto::node::TICK;
use crate::proto::Node;

/// What the data thread is told.
pub(super) enum Mail {
    /// A message from the node.
    Node(ToPlane),
    /// Report the links' counters to the node now (the number of the
    /// request).
    Report(u64),
}

/// The node's end: passes its messages on as each hold of the node ends.
pub(super) struct Forward {
    tx: Sender<Mail>,
    bell: UnixDatagram,
}

impl Forward {
    /// Passes on what `node` queued for the plane, and rings if anything.
    pub(super) fn forward(&self, node: &mut Node) {
        let mut any = false;
        while let Some(m) = node.poll_plane() {
            // The data thread ends only with the process.
            let _ = self.tx.send(Mail::Node(m));
            any = true;
        }
        if any {
            self.ring();
        }
    }

    fn ring(&self) {
        // A full bell (the data thread has not read it yet) rings already.
        let _ = self.bell.send(&[1]);
    }
}

/// The control threads' end: fresh counters for `status`.
pub(super) struct Mailbox {
    forward: Forward,
    asked: AtomicU64,
    answered: AtomicU64,
}

/// How long `status` waits for the data thread's report at most (a busy
/// data thread answers between two batches).
const REFRESH_WAIT: Duration = Duration::from_millis(50);

impl Mailbox {
    /// Asks the data thread to report the links' counters to the node, and
    /// waits until it has (at most [`REFRESH_WAIT`]; then `status` shows
    /// the last report, a tick old at most).
    pub(super) fn refresh(&self) {
        let n = self.asked.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.forward.tx.send(Mail::Report(n));
        self.forward.ring();
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        while self.answered.load(Ordering::Acquire) < n && start.elapsed() < REFRESH_WAIT {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// The data thread has given the node the report asked as `n`.
    pub(super) fn answered(&self, n: u64) {
        self.answered.fetch_max(n, Ordering::Release);
    }
}

/// The data thread's end: the plane and its messages.
pub(super) struct Inbox {
    rx: Receiver<Mail>,
    bell: UnixDatagram,
    /// The data plane.
    pub(super) plane: DataPlane,
    next_tick: Instant,
    /// The last report asked for and not yet answered.
    pub(super) report: Option<u64>,
}

/// A mailbox for `plane`: the node lock's release hook, the control
/// threads' end, and the data thread's.
pub(super) fn mailbox(plane: DataPlane) -> io::Result<(Forward, Mailbox, Inbox)> {
    let (tx, rx) = channel();
    let (ring, bell) = UnixDatagram::pair()?;
    ring.set_nonblocking(true)?;
    bell.set_nonblocking(true)?;
    let forward = Forward {
        tx: tx.clone(),
        bell: ring.try_clone()?,
    };
    let mailbox = Mailbox {
        forward: Forward { tx, bell: ring },
        asked: AtomicU64::new(0),
        answered: AtomicU64::new(0),
    };
    let inbox = Inbox {
        rx,
        bell,
        plane,
        next_tick: Instant::now(),
        report: None,
    };
    Ok((forward, mailbox, inbox))
}

impl Inbox {
    /// The bell, for poll(2).
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    /// Silences the bell (poll(2) said it rang); [`Inbox::take`] then
    /// takes what it rang for.
    pub(super) fn silence(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = self.bell.recv(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    /// Gives the plane the messages waiting (no system call), and runs its
    /// timers when due.
    pub(super) fn take(&mut self, now: Instant) {
        self.take_mail();
        if now >= self.next_tick {
            self.plane.handle_timeout(now);
            self.next_tick = now + TICK;
        }
    }

    /// Gives the plane the messages waiting, then, with the node held,
    /// what the node queued since: the data thread's own holds pass their
    /// messages on directly (a relayed cell, a packet the node routed over
    /// a handed link), after every earlier one, which other threads' holds
    /// put in the channel as they ended.
    pub(super) fn take_from(&mut self, node: &mut Node) {
        self.take_mail();
        while let Some(m) = node.poll_plane() {
            self.plane.handle(m);
        }
    }

    fn take_mail(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                Mail::Node(m) => self.plane.handle(m),
                Mail::Report(n) => {
                    self.plane.report();
                    self.report = Some(n);
                }
            }
        }
    }

    /// Until when poll(2) may sleep: the plane's next tick.
    pub(super) fn deadline(&self) -> Instant {
        self.next_tick
    }

    /// Whether the node has something to take from the plane.
    pub(super) fn for_node(&self) -> bool {
        self.plane.has_events() || self.report.is_some()
    }
}
