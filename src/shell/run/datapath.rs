//! The data thread: one thread serving both directions of the data path,
//! sleeping in poll(2) on the TUN, the UDP socket and the data plane's bell
//! (see [`data_loop`]). It holds the data plane (`proto::node::plane`):
//! packets on links handed to it, and packets to addresses routed over
//! them, are sealed and opened without the node; the node is locked only
//! for the rest of a batch (and for the plane's reports).

use std::io;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use qgate_platform::{GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};
use quinn_udp::{RecvMeta, UdpSocketState};
use std::os::fd::AsFd;

use super::lock::{Held, Holder};
use super::plane::Inbox;
use super::{drain, Shared};
use crate::proto::batch::SendBatch;
use crate::proto::node::plane::{worker_of, DataPlane, PlaneRx, PlaneTx};
use crate::proto::node::{normalize, Transmit};
use crate::proto::{Delivered, Node};

/// Receive buffers per `recvmmsg` call (each holds a GRO batch).
const RECV_BATCH: usize = 8;
/// Capacity of each buffer written to the TUN. tun-rs's GRO table merges a
/// TCP flow's packets into the first one's buffer only when it has room for
/// the merged packet (up to 64 KiB, and the virtio header twice), so a
/// buffer sized for one packet means one TUN write and one trip through the
/// kernel's TCP receive path per packet: profiled at 73,500 single-packet
/// writes a second at 800 Mbit/s, and ~2.5x the throughput with room to
/// merge. Pages are touched only as merged data fills them.
const TUN_WRITE_CAP: usize = 2 * VIRTIO_NET_HDR_LEN + 65535;
/// Size of one receive buffer or TUN read: the largest GRO/TSO aggregate.
const BUF: usize = 65536 + 256;
/// Packets one TUN read may split into: a 64 KiB TSO segment cut at the
/// smallest MSS Linux sends (48 bytes, for a peer that advertises a tiny
/// MSS) — fewer buffers would make tun-rs refuse the read and stall that
/// flow. They cost about 2.7 MiB (idle RSS measured 9.6 MiB against 7.0
/// with 128 buffers).
pub(super) const TSO_SEGMENTS: usize = 65536 / 48 + 1;

/// What a send batch keeps of its buffer after a burst: a full TUN read
/// (`TSO_SEGMENTS` packets) seals into about 2 MiB.
const BATCH_KEEP: usize = 4 << 20;

/// A data thread's own socket and TUN queue. The first data thread reads
/// the node's socket and the TUN's first queue (`Shared`); each further
/// one a socket of its own, bound to the same port (`SO_REUSEPORT`, the
/// kernel steering each datagram to the thread that holds its link:
/// `qgate_platform::steer_by_link`), and a queue of its own of the
/// multi-queue TUN. Everyone sends on the node's socket.
#[derive(Default)]
pub(super) struct Io {
    udp: Option<(UdpSocket, UdpSocketState)>,
    tun: Option<SyncDevice>,
}

impl Io {
    /// A further data thread's: its socket and TUN queue.
    pub(super) fn own(udp: UdpSocket, state: UdpSocketState, tun: Option<SyncDevice>) -> Io {
        Io {
            udp: Some((udp, state)),
            tun,
        }
    }

    fn udp<'a>(&'a self, sh: &'a Shared) -> (&'a UdpSocket, &'a UdpSocketState) {
        match &self.udp {
            Some((s, state)) => (s, state),
            None => (&sh.udp, &sh.udp_state),
        }
    }

    fn tun<'a>(&'a self, sh: &'a Shared) -> Option<&'a SyncDevice> {
        match (&self.tun, &self.udp) {
            (Some(t), _) => Some(t),
            // A further thread without a queue: a relay, which has no TUN.
            (None, Some(_)) => None,
            (None, None) => sh.tun.as_ref(),
        }
    }
}

/// Sends a batch of sealed datagrams, one GSO send per run, and empties it.
fn send_batch(sh: &Shared, batch: &mut SendBatch) {
    for (dst, bytes, segment) in batch.runs() {
        sh.send_gso(dst, bytes, segment);
    }
    batch.clear_keeping(BATCH_KEEP);
}

/// What one side of the data path sends after a batch of input.
struct Outgoing {
    /// What the node sealed (swapped out of the node, see
    /// `Node::take_output`): packets from the TUN, the cells a relay
    /// forwards, hellos; runs to one destination leave in one GSO send.
    batch: SendBatch,
    /// What the node queued on its own (handshake responses); leaves first.
    control: Vec<Transmit>,
    /// Payloads of `control` once sent, handed back to the node.
    spent: Vec<Vec<u8>>,
}

impl Outgoing {
    fn new(max_gso: usize) -> Outgoing {
        Outgoing {
            batch: SendBatch::new(max_gso),
            control: Vec::new(),
            spent: Vec::new(),
        }
    }

    /// Takes the node's output (the lock is held).
    fn take(&mut self, sh: &Shared, node: &mut Node) {
        drain(
            sh,
            node,
            Some(&mut self.batch),
            &mut self.control,
            &mut self.spent,
        );
    }

    /// Takes the data plane's output (the node's batch must have been sent).
    fn take_plane(&mut self, sh: &Shared, plane: &mut DataPlane) {
        for p in self.spent.drain(..) {
            plane.recycle(p);
        }
        self.batch.set_max_segments(sh.udp_state.max_gso_segments());
        plane.take_output(&mut self.batch, &mut self.control);
    }

    /// Sends it (after the lock is released), in the node's order.
    fn send(&mut self, sh: &Shared) {
        for t in self.control.drain(..) {
            sh.send(t.dst, &t.payload);
            self.spent.push(t.payload);
        }
        send_batch(sh, &mut self.batch);
    }
}

/// Gives the node what the data plane has for it (under the lock): its
/// reports, and the messages its links opened for the node; then the plane
/// what the node has for it. A packet for the TUN that comes of them goes
/// to `tun`. Answers a `status` that waits for the report.
fn plane_to_node(sh: &Shared, inbox: &mut Inbox, node: &mut Node, mut tun: impl FnMut(&[u8])) {
    while let Some(e) = inbox.plane.poll_event() {
        if let Some(p) = node.handle_plane(e) {
            tun(p);
        }
    }
    if let Some(n) = inbox.report.take() {
        sh.mailbox.answered(inbox.id, n);
    }
    inbox.take_from(node);
}

/// Takes the node for the data path. When the lock was held (by the timer,
/// a control request, ...), the wait since `since` is noted in the node's
/// report (`status`, metrics). Every take reads the clock twice, to time
/// the hold itself (`run/lock.rs`): about 50 ns a batch.
fn lock_for_data(sh: &Shared, since: Instant) -> Held<'_> {
    if let Some(node) = sh.node.try_lock(Holder::Data) {
        return node;
    }
    let mut node = sh.node.lock(Holder::Data);
    node.note_data_lock_wait(since.elapsed());
    node
}

/// The node, when the data thread needs it: always for packets the plane
/// left to it (`must`), which wait for it; only if nobody holds it for
/// what the plane has for the node (reports, hellos, cells), which then
/// waits for the next try, so that packets the plane handles never wait
/// behind a control request.
fn node_if<'a>(sh: &'a Shared, since: Instant, must: bool, inbox: &Inbox) -> Option<Held<'a>> {
    if must {
        Some(lock_for_data(sh, since))
    } else if inbox.for_node() {
        sh.node.try_lock(Holder::Data)
    } else {
        None
    }
}

/// Per-direction state of the data plane, reused across batches.
pub(super) struct TunSide {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: Outgoing,
    /// ICMPv6 errors for the TUN, behind a virtio-net header: the first
    /// `n_replies`, in reused buffers.
    replies: Vec<Vec<u8>>,
    n_replies: usize,
    /// The packets of a read that the plane left to the node.
    rest: Vec<usize>,
}

impl TunSide {
    pub(super) fn new(max_gso: usize, mtu: usize, segments: usize) -> TunSide {
        TunSide {
            original: vec![
                0u8;
                if segments > 0 {
                    VIRTIO_NET_HDR_LEN + BUF
                } else {
                    0
                }
            ],
            bufs: (0..segments).map(|_| vec![0u8; mtu.max(2048)]).collect(),
            sizes: vec![0usize; segments],
            out: Outgoing::new(max_gso),
            replies: Vec::new(),
            n_replies: 0,
            rest: Vec::new(),
        }
    }

    fn reply(&mut self, p: &[u8]) {
        if self.n_replies == self.replies.len() {
            self.replies.push(Vec::new());
        }
        let b = &mut self.replies[self.n_replies];
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(p);
        self.n_replies += 1;
    }

    /// Reads one TUN read's worth of packets (one TSO segment, split), hands
    /// them to the plane, the rest to the node, and sends what comes out.
    /// The TUN is non-blocking; returns false when nothing was waiting.
    fn step(&mut self, sh: &Shared, io: &Io, inbox: &mut Inbox) -> bool {
        let Some(dev) = io.tun(sh) else {
            return false;
        };
        let n = match dev.recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                tracing::warn!("TUN read failed: {e}");
                return false;
            }
        };
        let now = Instant::now();
        inbox.take(now);
        self.rest.clear();
        for i in 0..n {
            match inbox
                .plane
                .send_tun_packet(now, &self.bufs[i][..self.sizes[i]])
            {
                PlaneTx::Done => {}
                PlaneTx::Reply(p) => self.reply(p),
                PlaneTx::NotMine => self.rest.push(i),
            }
        }
        if !self.rest.is_empty() {
            // What the plane sealed goes out before the node is waited for.
            self.out.take_plane(sh, &mut inbox.plane);
            self.out.send(sh);
        }
        if let Some(mut node) = node_if(sh, now, !self.rest.is_empty(), inbox) {
            let rest = std::mem::take(&mut self.rest);
            for &i in &rest {
                if let Some(p) = node.send_tun_packet(now, &self.bufs[i][..self.sizes[i]]) {
                    self.reply(p);
                }
            }
            self.rest = rest;
            plane_to_node(sh, inbox, &mut node, |p| super::write_tun_on(io.tun(sh), p));
            self.out.take(sh, &mut node);
            drop(node);
            self.out.send(sh);
        }
        inbox.settle();
        self.out.take_plane(sh, &mut inbox.plane);
        self.out.send(sh);
        for b in &self.replies[..self.n_replies] {
            if let Err(e) = dev.send(b) {
                tracing::debug!("TUN write failed: {e}");
            }
        }
        self.n_replies = 0;
        true
    }
}

pub(super) struct UdpSide {
    bufs: [Vec<u8>; RECV_BATCH],
    meta: Vec<RecvMeta>,
    to_tun: Vec<BytesMut>,
    gro: GROTable,
    /// What the node sends in answer: above all the cells a relay forwards
    /// (runs of equal-sized cells to one neighbour leave in one GSO send).
    out: Outgoing,
    /// The datagrams of a batch the plane left to the node: (buffer,
    /// offset, length).
    rest: Vec<(usize, usize, usize)>,
    /// Of those, the ones the node's gate let through for a handed link,
    /// for the plane to open: (link, buffer, offset, length).
    admitted: Vec<(u32, usize, usize, usize)>,
}

/// Puts the packet for the TUN that the plane or the node left in `b`
/// behind the virtio-net header: `Some(n)`, opened there (`n` bytes), or
/// `p`, rebuilt elsewhere (copied in).
fn into_tun_buf(b: &mut BytesMut, opened: Option<usize>, p: &[u8]) {
    let n = match opened {
        Some(n) => n,
        None => {
            // Decompressed or from a circuit: one copy.
            let n = p.len();
            if b.len() < VIRTIO_NET_HDR_LEN + n {
                b.resize(VIRTIO_NET_HDR_LEN + n, 0);
            }
            b[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + n].copy_from_slice(p);
            n
        }
    };
    b.truncate(VIRTIO_NET_HDR_LEN + n);
    // GRO writes offload fields into the header it sends.
    b[..VIRTIO_NET_HDR_LEN].fill(0);
}

/// The `k`th buffer for the TUN, made if missing, at least `need` long.
fn tun_buf(to_tun: &mut Vec<BytesMut>, k: usize, need: usize) -> &mut BytesMut {
    if k == to_tun.len() {
        to_tun.push(BytesMut::with_capacity(TUN_WRITE_CAP));
    }
    let b = &mut to_tun[k];
    // The buffer keeps the length of its last packet, so growing it zeroes
    // only the difference (a few bytes, in a stream of full-sized packets).
    if b.len() < need {
        b.resize(need, 0);
    }
    b
}

impl UdpSide {
    pub(super) fn new(max_gso: usize) -> UdpSide {
        UdpSide {
            bufs: std::array::from_fn(|_| vec![0u8; BUF]),
            meta: vec![RecvMeta::default(); RECV_BATCH],
            to_tun: Vec::new(),
            gro: GROTable::default(),
            out: Outgoing::new(max_gso),
            rest: Vec::new(),
            admitted: Vec::new(),
        }
    }

    /// Writes the first `k` buffers to the TUN (GRO-coalesced).
    fn write_tun(&mut self, sh: &Shared, io: &Io, k: usize) {
        let res = match (k, io.tun(sh)) {
            (0, _) | (_, None) => Ok(0),
            // Nothing to coalesce: skip the GRO table.
            (1, Some(tun)) => tun.send(&self.to_tun[0]),
            (_, Some(tun)) => {
                tun.send_multiple(&mut self.gro, &mut self.to_tun[..k], VIRTIO_NET_HDR_LEN)
            }
        };
        if let Err(e) = res {
            tracing::debug!("TUN write failed: {e}");
        }
    }

    /// Gives the node what the plane has for it (reports, messages its
    /// links opened) outside a batch, and sends what the plane's timers
    /// and the node queued.
    pub(super) fn serve_plane(&mut self, sh: &Shared, io: &Io, inbox: &mut Inbox) {
        if inbox.has_admits() {
            let k = self.open_admits(inbox, Instant::now(), 0);
            self.write_tun(sh, io, k);
        }
        if let Some(mut node) = node_if(sh, Instant::now(), false, inbox) {
            plane_to_node(sh, inbox, &mut node, |p| super::write_tun_on(io.tun(sh), p));
            self.out.take(sh, &mut node);
            drop(node);
            self.out.send(sh);
        }
        inbox.settle();
        self.out.take_plane(sh, &mut inbox.plane);
        self.out.send(sh);
    }

    /// Receives one `recvmmsg` batch, hands it to the plane, the rest to
    /// the node, and writes the packets to the TUN. Returns false when
    /// nothing was waiting.
    fn step(&mut self, sh: &Shared, io: &Io, inbox: &mut Inbox) -> bool {
        let res = {
            // On the stack: nothing allocated per receive.
            let mut iov = self.bufs.each_mut().map(|b| std::io::IoSliceMut::new(b));
            let (socket, state) = io.udp(sh);
            state.recv(socket.into(), &mut iov, &mut self.meta)
        };
        let n = match res {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                // ICMP errors surface here as ECONNREFUSED etc. on Linux.
                tracing::debug!("UDP receive: {e}");
                return true;
            }
        };
        let now = Instant::now();
        inbox.take(now);
        let mut k = 0;
        self.rest.clear();
        for (i, (m, buf)) in self.meta.iter().zip(&self.bufs).take(n).enumerate() {
            let from = normalize(m.addr);
            let stride = m.stride.max(1);
            for (j, seg) in buf[..m.len].chunks(stride).enumerate() {
                // Decrypted behind the virtio-net header, where the TUN
                // write takes it from.
                let b = tun_buf(&mut self.to_tun, k, VIRTIO_NET_HDR_LEN + seg.len());
                let opened = match inbox
                    .plane
                    .receive(now, from, seg, &mut b[VIRTIO_NET_HDR_LEN..])
                {
                    PlaneRx::InPlace(n) => Some(n),
                    PlaneRx::Rebuilt(p) => {
                        into_tun_buf(b, None, p);
                        k += 1;
                        continue;
                    }
                    PlaneRx::Done => continue,
                    PlaneRx::NotMine => {
                        self.rest.push((i, j * stride, seg.len()));
                        continue;
                    }
                };
                into_tun_buf(b, opened, &[]);
                k += 1;
            }
        }
        if !self.rest.is_empty() {
            // What the plane did goes out before the node is waited for.
            self.write_tun(sh, io, k);
            k = 0;
            self.out.take_plane(sh, &mut inbox.plane);
            self.out.send(sh);
        }
        self.admitted.clear();
        if let Some(mut node) = node_if(sh, now, !self.rest.is_empty(), inbox) {
            for &(i, at, len) in &self.rest {
                let from = normalize(self.meta[i].addr);
                let seg = &self.bufs[i][at..at + len];
                let b = tun_buf(&mut self.to_tun, k, VIRTIO_NET_HDR_LEN + len);
                match node.receive(now, from, seg, &mut b[VIRTIO_NET_HDR_LEN..]) {
                    None => {
                        if let Some(link) = node.take_admitted() {
                            self.admitted.push((link, i, at, len));
                        }
                        continue;
                    }
                    Some(Delivered::InPlace(n)) => into_tun_buf(b, Some(n), &[]),
                    Some(Delivered::Rebuilt(p)) => into_tun_buf(b, None, p),
                }
                k += 1;
            }
            let to_tun = &mut self.to_tun;
            plane_to_node(sh, inbox, &mut node, |p| {
                let b = tun_buf(to_tun, k, VIRTIO_NET_HDR_LEN + p.len());
                into_tun_buf(b, None, p);
                k += 1;
            });
            self.out.take(sh, &mut node);
        }
        // Datagrams the gate let through for handed links (handshakes, a
        // neighbour's new endpoint): the plane opens them, after the node's
        // messages (`take_from` above), from where they were received.
        for &(link, i, at, len) in &self.admitted {
            let from = normalize(self.meta[i].addr);
            let seg = &self.bufs[i][at..at + len];
            let w = worker_of(link, inbox.forward.workers());
            if w != inbox.id {
                // Another data thread holds the link (after the node's
                // messages for it, which `take_from` passed on above): an
                // initiation, whose sender's index picked this thread, or
                // data from a neighbour's new endpoint.
                tracing::debug!(
                    link,
                    to = w,
                    "datagram passed to the data thread that holds its link"
                );
                if !inbox.forward.admit(w, link, from, seg) {
                    tracing::debug!(
                        link,
                        to = w,
                        "data thread behind: admitted datagram dropped"
                    );
                }
                continue;
            }
            let b = tun_buf(&mut self.to_tun, k, VIRTIO_NET_HDR_LEN + len);
            match inbox
                .plane
                .admit(now, link, from, seg, &mut b[VIRTIO_NET_HDR_LEN..])
            {
                PlaneRx::InPlace(n) => into_tun_buf(b, Some(n), &[]),
                PlaneRx::Rebuilt(p) => into_tun_buf(b, None, p),
                PlaneRx::Done | PlaneRx::NotMine => continue,
            }
            k += 1;
        }
        let k = self.open_admits(inbox, now, k);
        // Cells relayed onto other data threads' links go to them (and
        // what they passed while the node was held is sealed).
        inbox.settle();
        // The node's first (what it sealed itself), then the plane's (what
        // the node just gave it, relayed cells above all).
        self.out.send(sh);
        self.out.take_plane(sh, &mut inbox.plane);
        self.write_tun(sh, io, k);
        self.out.send(sh);
        true
    }
}

impl UdpSide {
    /// Opens the datagrams other data threads passed on for this one's
    /// links, into TUN buffers from `k` on; returns the new count.
    fn open_admits(&mut self, inbox: &mut Inbox, now: Instant, mut k: usize) -> usize {
        for (link, from, d) in std::mem::take(&mut inbox.admits) {
            let b = tun_buf(&mut self.to_tun, k, VIRTIO_NET_HDR_LEN + d.len());
            match inbox
                .plane
                .admit(now, link, from, &d, &mut b[VIRTIO_NET_HDR_LEN..])
            {
                PlaneRx::InPlace(n) => into_tun_buf(b, Some(n), &[]),
                PlaneRx::Rebuilt(p) => into_tun_buf(b, None, p),
                PlaneRx::Done | PlaneRx::NotMine => continue,
            }
            k += 1;
        }
        k
    }
}

/// The data thread's time slice: EEVDF's shortest. Measured with
/// `BENCH_ONLY=storm scripts/bench` (2 cores, 4 loops of `qgate dht put`):
/// ping p99 during the storm 3.6–4.1 ms against 5.1–5.5 ms with the default.
const DATA_SLICE: Duration = Duration::from_micros(100);

/// The data plane: one thread serving both directions, sleeping in poll(2)
/// on the TUN and the UDP socket.
///
/// One thread rather than one per direction: a packet written to the TUN is
/// often answered at once (an echo reply, a TCP ACK), and the answer is then
/// read by the same thread without waking another one. Measured on the
/// 2-core bench machine (scripts/bench), a thread per direction moved ~15%
/// more TCP but added ~0.04 ms round-trip time; batching, not threads, is
/// where the throughput comes from. Both sides keep their own buffers, so a
/// second thread can be added back without reshaping anything.
///
/// The thread asks the scheduler for a short time slice ([`DATA_SLICE`]):
/// when other work (RSA signing, a burst of control requests, other
/// programs) keeps both cores busy, a packet that wakes it then waits less
/// for a core.
pub(super) fn data_loop(
    sh: Arc<Shared>,
    io: Io,
    mut tun: TunSide,
    mut udp: UdpSide,
    mut inbox: Inbox,
) {
    if let Err(e) = qgate_platform::request_time_slice(DATA_SLICE) {
        tracing::debug!("data thread keeps the default time slice: {e}");
    }
    // Which side poll(2) said is ready; both at first.
    let (mut tun_ready, mut udp_ready) = (true, true);
    let mut load = LoadWindow::new(Instant::now());
    // The bell is polled from a clone of the inbox's socket, so the inbox
    // stays free to be lent out.
    let bell = inbox
        .fd()
        .try_clone_to_owned()
        .expect("a descriptor to spare");
    let mut fds = vec![
        PollFd::new(io.udp(&sh).0.as_fd(), PollFlags::POLLIN),
        PollFd::new(bell.as_fd(), PollFlags::POLLIN),
    ];
    if let Some(t) = io.tun(&sh) {
        fds.push(PollFd::new(t.as_fd(), PollFlags::POLLIN));
    }
    loop {
        // Serve the ready sides until neither has anything, alternating so
        // neither direction starves the other. Writing to the TUN often
        // makes the TUN readable at once (an echo reply, a TCP ACK), so a
        // UDP batch makes the TUN side worth a look.
        while tun_ready || udp_ready {
            if udp_ready {
                udp_ready = udp.step(&sh, &io, &mut inbox);
                tun_ready |= udp_ready;
            }
            if tun_ready {
                tun_ready = tun.step(&sh, &io, &mut inbox);
            }
            load.maybe_report(&sh, &inbox, Instant::now());
        }
        // What the node sent the plane, its timers, its reports.
        inbox.take(Instant::now());
        udp.serve_plane(&sh, &io, &mut inbox);
        let waiting = Instant::now();
        // The plane's next tick; soon if the node was busy when the plane
        // had something for it.
        let sleep = if inbox.for_node() {
            Duration::from_millis(1)
        } else {
            inbox.deadline().saturating_duration_since(waiting)
        };
        let ms = u16::try_from(sleep.as_millis() + 1).unwrap_or(u16::MAX);
        let polled = poll(&mut fds, PollTimeout::from(ms));
        let now = Instant::now();
        load.waited(waiting, now);
        load.maybe_report(&sh, &inbox, now);
        match polled {
            Ok(_) => {
                let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                tun_ready = fds.get(2).is_some_and(ready);
                udp_ready = fds.first().is_some_and(ready);
                if fds.get(1).is_some_and(ready) {
                    inbox.silence();
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                (tun_ready, udp_ready) = (io.tun(&sh).is_some(), true);
            }
        }
    }
}

/// How busy the data thread is: the share of each window (at least
/// [`LOAD_WINDOW`]) it spent working rather than waiting in poll(2) for
/// packets, told to the node, which pauses compression while the data path
/// is the limit.
///
/// A send waiting for a full socket buffer counts as work. A bottleneck
/// on the path (a slow uplink, a shaper) drops packets, which the
/// application's TCP answers by slowing down, long before our socket
/// buffer fills; the buffer fills when the local kernel or a receiver on
/// the same machine cannot keep up, i.e. when CPU is the limit. Measured
/// both ways (scripts/bench, compression): counting those waits as idle
/// kept compression on over the unlimited veth at 0.71x of compression
/// off, counting them as work 0.95x; the 100 Mbit/s shaped link was 1.72x
/// either way.
struct LoadWindow {
    start: Instant,
    waited: Duration,
}

/// Shortest window the data thread's load is measured over.
const LOAD_WINDOW: Duration = Duration::from_millis(50);

impl LoadWindow {
    fn new(now: Instant) -> LoadWindow {
        LoadWindow {
            start: now,
            waited: Duration::ZERO,
        }
    }

    fn waited(&mut self, from: Instant, to: Instant) {
        self.waited += to.saturating_duration_since(from);
    }

    /// With several data threads, the node hears the busiest one's figure
    /// (see `Forward::busiest`).
    fn maybe_report(&mut self, sh: &Shared, inbox: &Inbox, now: Instant) {
        let window = now.saturating_duration_since(self.start);
        if window < LOAD_WINDOW {
            return;
        }
        let idle = (self.waited.as_micros() * 1000 / window.as_micros().max(1)).min(1000);
        let busy = inbox.forward.busiest(inbox.id, 1000 - idle as u16);
        // Not worth a wait: a busy node hears of the load next window.
        if let Some(mut node) = sh.node.try_lock(Holder::Data) {
            node.report_data_path_busy(busy);
            *self = LoadWindow::new(now);
        }
    }
}
