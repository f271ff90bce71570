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
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::node::plane::{DataPlane, ToPlane};
use crate::proto::node::TICK;
use crate::proto::Node;

/// What a data thread is told.
pub(super) enum Mail {
    /// A message from the node.
    Node(ToPlane),
    /// Report the links' counters to the node now (the number of the
    /// request).
    Report(u64),
    /// A datagram the node's gate let through for a link this data thread
    /// holds (a handshake initiation, a neighbour's new endpoint) that
    /// another data thread received: the link's index, where it came
    /// from, the datagram.
    Admit(u32, SocketAddr, Vec<u8>),
}

/// One data thread's door: its channel and its bell.
struct Door {
    tx: Sender<Mail>,
    bell: UnixDatagram,
}

/// The node's end: passes its messages on to the data threads as each hold
/// of the node ends, each to the threads whose plane must have it
/// ([`ToPlane::dispatch`]).
pub(super) struct Forward {
    doors: Vec<Door>,
}

impl Forward {
    /// Passes on what `node` queued for the planes, and rings the data
    /// threads it gave something.
    pub(super) fn forward(&self, node: &mut Node) {
        let mut rang = 0u64;
        while let Some(m) = node.poll_plane() {
            m.dispatch(self.doors.len(), |w, m| {
                // A data thread ends only with the process.
                let _ = self.doors[w].tx.send(Mail::Node(m));
                rang |= 1 << w;
            });
        }
        self.ring_all(rang);
    }

    /// Rings the data threads whose bits `rang` has.
    fn ring_all(&self, rang: u64) {
        for (w, door) in self.doors.iter().enumerate() {
            if rang & (1 << w) != 0 {
                ring(door);
            }
        }
    }

    /// Gives data thread `w` a message, and rings.
    pub(super) fn post(&self, w: usize, mail: Mail) {
        let _ = self.doors[w].tx.send(mail);
        ring(&self.doors[w]);
    }

    /// How many data threads there are.
    pub(super) fn workers(&self) -> usize {
        self.doors.len()
    }
}

fn ring(door: &Door) {
    // A full bell (the data thread has not read it yet) rings already.
    let _ = door.bell.send(&[1]);
}

/// The control threads' end: fresh counters for `status`.
pub(super) struct Mailbox {
    forward: Arc<Forward>,
    asked: AtomicU64,
    /// Per data thread, the last report it gave the node.
    answered: Vec<AtomicU64>,
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
        for w in 0..self.forward.workers() {
            self.forward.post(w, Mail::Report(n));
        }
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        let behind = || self.answered.iter().any(|a| a.load(Ordering::Acquire) < n);
        while behind() && start.elapsed() < REFRESH_WAIT {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Data thread `w` has given the node the report asked as `n`.
    pub(super) fn answered(&self, w: usize, n: u64) {
        self.answered[w].fetch_max(n, Ordering::Release);
    }
}

/// A data thread's end: its plane and its messages.
pub(super) struct Inbox {
    rx: Receiver<Mail>,
    bell: UnixDatagram,
    /// Which data thread (worker) this is.
    pub(super) id: usize,
    /// Every data thread's door, for what this one passes to another.
    pub(super) forward: Arc<Forward>,
    /// The data plane.
    pub(super) plane: DataPlane,
    next_tick: Instant,
    /// The last report asked for and not yet answered.
    pub(super) report: Option<u64>,
    /// Datagrams other data threads received for this one's links
    /// ([`Mail::Admit`]), to open.
    pub(super) admits: Vec<(u32, SocketAddr, Vec<u8>)>,
}

/// A mailbox for `planes`, one per data thread: the node lock's release
/// hook, the control threads' end, and each data thread's.
pub(super) fn mailbox(planes: Vec<DataPlane>) -> io::Result<(Arc<Forward>, Mailbox, Vec<Inbox>)> {
    let mut doors = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..planes.len() {
        let (tx, rx) = channel();
        let (ring, bell) = UnixDatagram::pair()?;
        ring.set_nonblocking(true)?;
        bell.set_nonblocking(true)?;
        doors.push(Door { tx, bell: ring });
        ends.push((rx, bell));
    }
    let forward = Arc::new(Forward { doors });
    let mailbox = Mailbox {
        forward: forward.clone(),
        asked: AtomicU64::new(0),
        answered: (0..planes.len()).map(|_| AtomicU64::new(0)).collect(),
    };
    let inboxes = planes
        .into_iter()
        .zip(ends)
        .enumerate()
        .map(|(id, (plane, (rx, bell)))| Inbox {
            rx,
            bell,
            id,
            forward: forward.clone(),
            plane,
            next_tick: Instant::now(),
            report: None,
            admits: Vec::new(),
        })
        .collect();
    Ok((forward, mailbox, inboxes))
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
        self.route(|_| node.poll_plane());
    }

    /// Passes the cells the plane relayed onto other data threads' links
    /// to them ([`DataPlane::poll_crossing`]), and rings those.
    pub(super) fn pass_crossing(&mut self) {
        self.route(DataPlane::poll_crossing);
    }

    /// Gives each message `next` yields to this thread's plane, or to the
    /// other data threads whose planes must have it
    /// ([`ToPlane::dispatch`]), ringing those.
    fn route(&mut self, mut next: impl FnMut(&mut DataPlane) -> Option<ToPlane>) {
        let Inbox {
            id, forward, plane, ..
        } = self;
        let mut rang = 0u64;
        while let Some(m) = next(plane) {
            m.dispatch(forward.workers(), |w, m| {
                if w == *id {
                    plane.handle(m);
                } else {
                    let _ = forward.doors[w].tx.send(Mail::Node(m));
                    rang |= 1 << w;
                }
            });
        }
        forward.ring_all(rang);
    }

    fn take_mail(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                Mail::Node(m) => self.plane.handle(m),
                Mail::Report(n) => {
                    self.plane.report();
                    self.report = Some(n);
                }
                Mail::Admit(link, from, datagram) => self.admits.push((link, from, datagram)),
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

    /// Whether other data threads passed datagrams to open.
    pub(super) fn has_admits(&self) -> bool {
        !self.admits.is_empty()
    }
}
