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
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
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
/// ([`ToPlane::dispatch`]). It also carries what data threads pass one
/// another (relayed cells, admitted datagrams), bounded per thread.
pub(super) struct Forward {
    doors: Vec<Door>,
    /// Per data thread, the cells and datagrams other threads passed it
    /// that it has not taken yet (at most [`MAX_PASSED`]).
    passed: Vec<AtomicUsize>,
    /// Per data thread, how busy it was over its last window (per mille).
    busy: Vec<AtomicU16>,
}

/// Most relayed cells and admitted datagrams waiting for one data thread
/// from the others: beyond, they are dropped (as a full socket buffer
/// drops datagrams), so a thread that falls behind holds no more.
const MAX_PASSED: usize = 4096;

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

    /// Passes data thread `w` a datagram the gate let through for its
    /// link, unless [`MAX_PASSED`] wait for it already (then false).
    pub(super) fn admit(&self, w: usize, link: u32, from: SocketAddr, datagram: &[u8]) -> bool {
        if !self.reserve(w) {
            return false;
        }
        self.post(w, Mail::Admit(link, from, datagram.to_vec()));
        true
    }

    /// Counts one more thing passed to thread `w`, if there is room.
    fn reserve(&self, w: usize) -> bool {
        let n = self.passed[w].fetch_add(1, Ordering::AcqRel);
        if n >= MAX_PASSED {
            self.passed[w].fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Data thread `w` notes how busy it was; the answer is the busiest
    /// thread's figure, which is what the node's compression governor
    /// hears (a thread at its limit pauses compression, whatever the
    /// others do).
    pub(super) fn busiest(&self, w: usize, busy: u16) -> u16 {
        self.busy[w].store(busy, Ordering::Relaxed);
        self.busy
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .max()
            .unwrap_or(busy)
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
    /// Cells other data threads passed while this one held the node: they
    /// are sealed once it lets go ([`Inbox::settle`]).
    deferred: Vec<ToPlane>,
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
    assert!(
        (1..=64).contains(&planes.len()),
        "one to 64 data threads (a bit each in a u64)"
    );
    let forward = Arc::new(Forward {
        passed: (0..doors.len()).map(|_| AtomicUsize::new(0)).collect(),
        busy: (0..doors.len()).map(|_| AtomicU16::new(0)).collect(),
        doors,
    });
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
            deferred: Vec::new(),
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
        self.take_mail(false);
        self.settle();
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
        self.take_mail(true);
        self.route(|_| node.poll_plane(), false);
        self.pass_crossing();
    }

    /// Seals what other threads passed while this one held the node, and
    /// passes on what the plane has for the other threads. Called where
    /// the node is not held.
    pub(super) fn settle(&mut self) {
        for m in std::mem::take(&mut self.deferred) {
            self.plane.handle(m);
        }
        self.pass_crossing();
    }

    /// Passes what the plane has for the other data threads' planes
    /// (relayed cells, buffers back, addresses no longer routed;
    /// [`DataPlane::poll_crossing`]) to them, and rings those.
    fn pass_crossing(&mut self) {
        self.route(DataPlane::poll_crossing, true);
    }

    /// Gives each message `next` yields to the planes that must have it
    /// ([`ToPlane::dispatch`]): this thread's (unless `crossing`: what the
    /// plane sends the others never comes back to it), and the other data
    /// threads', ringing those. A relayed cell for a thread that has
    /// [`MAX_PASSED`] waiting already is dropped and counted.
    fn route(&mut self, mut next: impl FnMut(&mut DataPlane) -> Option<ToPlane>, crossing: bool) {
        let Inbox {
            id, forward, plane, ..
        } = self;
        let mut rang = 0u64;
        while let Some(m) = next(plane) {
            m.dispatch(forward.workers(), |w, m| {
                if w == *id {
                    if !crossing {
                        plane.handle(m);
                    }
                    return;
                }
                if matches!(m, ToPlane::Pass(..)) && !forward.reserve(w) {
                    plane.dropped_pass(m);
                    return;
                }
                let _ = forward.doors[w].tx.send(Mail::Node(m));
                rang |= 1 << w;
            });
        }
        forward.ring_all(rang);
    }

    /// Takes the mail waiting; with the node held (`held`), the cells
    /// other threads passed wait for [`Inbox::settle`].
    fn take_mail(&mut self, held: bool) {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                Mail::Node(m) => {
                    if matches!(m, ToPlane::Pass(..)) {
                        self.forward.passed[self.id].fetch_sub(1, Ordering::AcqRel);
                    }
                    if held && matches!(m, ToPlane::Pass(..) | ToPlane::Spares(..)) {
                        self.deferred.push(m);
                    } else {
                        self.plane.handle(m);
                    }
                }
                Mail::Report(n) => {
                    self.plane.report();
                    self.report = Some(n);
                }
                Mail::Admit(link, from, datagram) => {
                    self.forward.passed[self.id].fetch_sub(1, Ordering::AcqRel);
                    self.admits.push((link, from, datagram));
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

    /// Whether other data threads passed datagrams to open.
    pub(super) fn has_admits(&self) -> bool {
        !self.admits.is_empty()
    }
}
