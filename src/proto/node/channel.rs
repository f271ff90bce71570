//! A link's channel: what sealing and opening the link's datagrams needs —
//! the neighbour's WireGuard session (boringtun's `Tunn`), where the
//! neighbour is, the link MTU, its compression state and traffic counters
//! — apart from the control state a [`Link`](super::table::Link) keeps
//! (hello, verification, reconnects, timestamps). Every use of boringtun's
//! session is here, behind calls that take the buffers to work in and
//! answer what happened ([`Sealed`], [`Opened`], [`Tick`]). This is the
//! per-link state a data-path worker would own (ARCHITECTURE §14, gap 2).

use std::collections::VecDeque;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;

use super::{reuse, LinkCounters, Transmit, MAX_BATCH_BYTES, SEAL_MIN_OUT, SEAL_OVERHEAD};
use crate::proto::batch::SendBatch;
use crate::proto::compress::{self, Adaptive};
use crate::proto::wire::{self, Incoming, Ipv6View, Lz4Table, IPV6_MIN_MTU, MAX_PACKET};

/// What became of a packet given to a channel to seal.
pub(super) enum Sealed {
    /// A datagram is in the batch (the packet, or a handshake initiation
    /// while the packet waits for it).
    Queued,
    /// Nothing to send now: the packet waits behind a handshake.
    Held,
    /// The link could not seal it (no endpoint, no session to start), or
    /// the batch is full.
    Failed,
}

/// What opening a datagram came to.
pub(super) enum Opened {
    /// Authentic. With `Some(n)`: a packet for the node, in the first `n`
    /// bytes of the buffer it was opened into.
    Authentic(Option<usize>),
    /// Authentic, but an IPv4 packet, which links never carry.
    Ipv4,
    /// Nothing authenticated: boringtun, under load, answered an
    /// initiation with a cookie (queued), which proves nothing.
    Unproven,
    /// Refused.
    Refused(Refusal),
}

/// Why a datagram was refused ([`Opened::Refused`]), as the link counts it.
pub(super) enum Refusal {
    /// A counter already seen or out of the window.
    Replay,
    /// No session, or another session's index.
    UnknownSession,
    /// A handshake message that didn't hold.
    Handshake,
    /// Anything else (a bad tag, above all).
    Auth,
}

/// What became of an application packet a link opened
/// ([`Channel::deliver`]).
pub(super) enum Delivery {
    /// For the TUN, where it was decrypted: `buf[..n]`.
    InPlace(usize),
    /// For the TUN, rebuilt (decompressed or unframed) in `rebuild[..n]`.
    Rebuilt(usize),
    /// A control frame after all: nothing for the TUN.
    Control,
    /// Dropped; the link counts why.
    Dropped(DataDrop),
}

/// Why a link dropped an application packet it opened ([`Delivery`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DataDrop {
    /// Not a well-formed IPv6 packet or frame.
    BadInner,
    /// The neighbour's record is not verified yet.
    Unverified,
    /// Its source is not the neighbour's overlay address.
    SpoofedSource,
    /// Its destination is not this node's address.
    WrongDestination,
}

impl DataDrop {
    /// Counts the drop in `drops`.
    pub(super) fn count(self, drops: &mut super::Drops) {
        match self {
            DataDrop::BadInner => drops.bad_inner += 1,
            DataDrop::Unverified => drops.unverified += 1,
            DataDrop::SpoofedSource => drops.spoofed_source += 1,
            DataDrop::WrongDestination => drops.wrong_destination += 1,
        }
    }
}

/// Whether a packet fits the link ([`Channel::fit`]).
pub(super) enum Fit {
    /// It goes as it is.
    Fits,
    /// The link's MTU (given) is below IPv6's minimum, which programs never
    /// go under: the node fragments the packet for them (the receiving
    /// kernel reassembles).
    Fragment(usize),
    /// Too big: answer Packet Too Big with this MTU.
    TooBig(u32),
}

impl Refusal {
    /// Counts the refusal in `drops`.
    pub(super) fn count(self, drops: &mut super::Drops) {
        match self {
            Refusal::Replay => drops.replay += 1,
            Refusal::UnknownSession => drops.unknown_session += 1,
            Refusal::Handshake => drops.handshake_rejected += 1,
            Refusal::Auth => drops.auth_failed += 1,
        }
    }
}

/// What the channel's timers came to ([`Channel::tick`]).
pub(super) enum Tick {
    /// Nothing for the node (a keepalive or retry may have been queued).
    Nothing,
    /// The session expired: no handshake for too long.
    Expired,
}

/// A buffer at least this large may take the packets boringtun queued
/// behind a handshake (each up to [`MAX_PACKET`], sealed).
const FLUSH_ROOM: usize = MAX_PACKET + SEAL_OVERHEAD;

pub(super) struct Channel {
    /// The session; None while the link is handed to a data plane
    /// ([`Channel::split`]), which holds it.
    tunn: Option<Box<Tunn>>,
    /// While handed: the session's age as the data plane last reported it.
    handed_age: Option<Duration>,
    /// Where the neighbour's datagrams come from and ours go.
    pub(super) endpoint: Option<SocketAddr>,
    /// The largest packet sent on the link as it is (path MTU updates
    /// lower it).
    pub(super) mtu: usize,
    /// Whether the link compresses (the compression policy, once the
    /// neighbour is known).
    pub(super) compress: bool,
    adaptive: Adaptive,
    pub(super) counters: LinkCounters,
    /// When the link last authenticated a datagram from the neighbour.
    pub(super) last_rx: Instant,
    /// Last application packet or DHT message either way.
    pub(super) last_used: Instant,
    /// When the neighbour last sent us an application packet over this
    /// link (a node that talks to us directly is answered directly).
    pub(super) last_app_rx: Option<Instant>,
}

/// What a node's channels start from.
pub(super) struct Setup {
    /// The node's link key.
    pub(super) secret: x25519::StaticSecret,
    /// WireGuard's persistent keepalive, in seconds.
    pub(super) keepalive: Option<u16>,
    /// The handshake gate's limiter, shared by every session.
    pub(super) limiter: Arc<RateLimiter>,
    pub(super) mtu: usize,
}

impl Channel {
    /// The channel of link `index` to the holder of link key `peer_key`.
    pub(super) fn new(
        setup: Setup,
        index: u32,
        peer_key: [u8; 32],
        endpoint: Option<SocketAddr>,
        compress: bool,
        now: Instant,
    ) -> Channel {
        Channel {
            tunn: Some(Box::new(Tunn::new(
                setup.secret,
                x25519::PublicKey::from(peer_key),
                None,
                setup.keepalive,
                index,
                Some(setup.limiter),
            ))),
            handed_age: None,
            endpoint,
            mtu: setup.mtu,
            compress,
            adaptive: Adaptive::default(),
            counters: LinkCounters::default(),
            last_rx: now,
            last_used: now,
            last_app_rx: None,
        }
    }

    /// Whether the link is handed to a data plane, which holds its session.
    pub(super) fn handed(&self) -> bool {
        self.tunn.is_none()
    }

    /// Hands the session to a data plane: the channel it answers holds the
    /// session and the per-packet state (compression, counters,
    /// timestamps); this one keeps a copy of the rest, brought up to date
    /// by the plane's reports ([`Channel::update`]). None if handed
    /// already.
    pub(super) fn split(&mut self) -> Option<Channel> {
        let tunn = self.tunn.take()?;
        self.handed_age = tunn.time_since_last_handshake();
        Some(Channel {
            tunn: Some(tunn),
            handed_age: None,
            endpoint: self.endpoint,
            mtu: self.mtu,
            compress: self.compress,
            adaptive: std::mem::take(&mut self.adaptive),
            counters: self.counters,
            last_rx: self.last_rx,
            last_used: self.last_used,
            last_app_rx: self.last_app_rx,
        })
    }

    /// Takes back what [`Channel::split`] handed out.
    pub(super) fn rejoin(&mut self, from: Channel) {
        self.tunn = from.tunn;
        self.handed_age = None;
        self.endpoint = from.endpoint;
        self.mtu = from.mtu;
        self.adaptive = from.adaptive;
        self.counters = from.counters;
        self.last_rx = self.last_rx.max(from.last_rx);
        self.last_used = self.last_used.max(from.last_used);
        self.last_app_rx = self.last_app_rx.max(from.last_app_rx);
    }

    /// Takes in a data plane's report on the handed session.
    pub(super) fn update(
        &mut self,
        counters: LinkCounters,
        last_rx: Instant,
        last_used: Instant,
        last_app_rx: Option<Instant>,
        age: Option<Duration>,
    ) {
        self.counters = counters;
        self.last_rx = self.last_rx.max(last_rx);
        self.last_used = self.last_used.max(last_used);
        self.last_app_rx = self.last_app_rx.max(last_app_rx);
        self.handed_age = age;
    }

    /// Time since the session's last handshake; None without a session.
    pub(super) fn handshake_age(&self) -> Option<Duration> {
        match &self.tunn {
            Some(t) => t.time_since_last_handshake(),
            None => self.handed_age,
        }
    }

    /// Seals `frame` (a control frame or a cell) straight into the batch
    /// `out`, to the neighbour's endpoint.
    pub(super) fn seal(&mut self, out: &mut SendBatch, frame: &[u8]) -> Sealed {
        match (self.endpoint, &mut self.tunn) {
            (Some(ep), Some(tunn)) => seal_batch(out, tunn, frame, ep),
            _ => Sealed::Failed,
        }
    }

    /// Gives `frame` to boringtun while the neighbour's endpoint is still
    /// unknown: it keeps the frame for the session's first handshake (the
    /// initiation it writes to `scratch` has nowhere to go either).
    pub(super) fn hold(&mut self, frame: &[u8], scratch: &mut [u8]) {
        if let Some(t) = &mut self.tunn {
            let _ = t.encapsulate(frame, scratch);
        }
    }

    /// Whether a packet of `len` bytes fits the link (`verified`: the
    /// neighbour's record is, so fragments may go to it).
    pub(super) fn fit(&self, len: usize, verified: bool) -> Fit {
        if len <= self.mtu {
            Fit::Fits
        } else if self.mtu < IPV6_MIN_MTU && len <= IPV6_MIN_MTU && verified {
            Fit::Fragment(self.mtu)
        } else {
            Fit::TooBig(self.mtu.max(IPV6_MIN_MTU) as u32)
        }
    }

    /// Seals an application packet into the batch `out`: lz4 into
    /// `scratch` first when the link compresses, `lz4` is given (None:
    /// compression paused) and the flow's [`Adaptive`] state lets it, and
    /// counted.
    pub(super) fn seal_app(
        &mut self,
        view: Ipv6View<'_>,
        lz4: Option<&mut Lz4Table>,
        scratch: &mut [u8],
        out: &mut SendBatch,
    ) -> Sealed {
        let (Some(ep), Some(tunn)) = (self.endpoint, &mut self.tunn) else {
            return Sealed::Failed;
        };
        let table = if self.compress {
            lz4.map(|t| (&mut self.adaptive, t))
        } else {
            None
        };
        let (frame, compressed) = compress::encode(view, table, scratch);
        let c = &mut self.counters;
        c.tx_packets += 1;
        c.tx_bytes += view.bytes().len() as u64;
        c.tx_wire_bytes += frame.len() as u64;
        c.tx_compressed += compressed as u64;
        seal_batch(out, tunn, frame, ep)
    }

    /// Counts an application packet received: `len` bytes for the TUN,
    /// `wire` on the link.
    fn count_rx(&mut self, len: usize, wire: usize, compressed: bool) {
        let c = &mut self.counters;
        c.rx_packets += 1;
        c.rx_bytes += len as u64;
        c.rx_wire_bytes += wire as u64;
        c.rx_compressed += compressed as u64;
    }

    /// Checks and counts an application packet the link opened into
    /// `buf[..n]` (not a cell or control message: the node looked first):
    /// from `peer` (the neighbour's verified overlay address; None before
    /// its record is verified), to `own`, this node's address. A packet in
    /// qgate's framing is decompressed or unwrapped into `rebuild` (at
    /// least [`MAX_PACKET`] bytes).
    pub(super) fn deliver(
        &mut self,
        now: Instant,
        buf: &[u8],
        peer: Option<Ipv6Addr>,
        own: Ipv6Addr,
        rebuild: &mut [u8],
    ) -> Delivery {
        let Ok(view) = Ipv6View::new_checked(buf) else {
            return Delivery::Dropped(DataDrop::BadInner);
        };
        // A packet without qgate's framing is used where it was decrypted.
        let in_place = view.next_header() != wire::NH_QGATE;
        let (p, compressed) = match wire::decode(view, rebuild) {
            Ok((Incoming::App(p), compressed)) => (p, compressed),
            Ok((Incoming::Control(..), _)) => return Delivery::Control,
            Err(_) => return Delivery::Dropped(DataDrop::BadInner),
        };
        let Some(peer) = peer else {
            return Delivery::Dropped(DataDrop::Unverified);
        };
        if view.src() != peer {
            return Delivery::Dropped(DataDrop::SpoofedSource);
        }
        if view.dst() != own {
            return Delivery::Dropped(DataDrop::WrongDestination);
        }
        let len = p.len();
        self.last_used = now;
        self.last_app_rx = Some(now);
        self.count_rx(len, buf.len(), compressed);
        if in_place {
            Delivery::InPlace(len)
        } else {
            Delivery::Rebuilt(len)
        }
    }

    /// Opens `datagram` from `from` into `dst` (at least as long as the
    /// datagram). What boringtun answers (a handshake response, a cookie)
    /// is queued in `transmits`, and so are the packets that waited for a
    /// handshake when `dst` has room for them ([`FLUSH_ROOM`]; only a
    /// handshake answer brings them, and only a data message is opened
    /// into a smaller buffer).
    pub(super) fn open(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        dst: &mut [u8],
        transmits: &mut VecDeque<Transmit>,
    ) -> Opened {
        let flush = dst.len() >= FLUSH_ROOM;
        let Some(tunn) = &mut self.tunn else {
            return Opened::Refused(Refusal::UnknownSession);
        };
        let mut res = tunn.decapsulate(Some(from.ip()), datagram, dst);
        let mut authentic = false;
        loop {
            match res {
                TunnResult::Done => return Opened::Authentic(None),
                TunnResult::WriteToNetwork(out) if super::gate::is_cookie_reply(out) => {
                    // Under load boringtun answers an unauthenticated
                    // handshake with a cookie: that proves nothing about
                    // the sender.
                    transmits.push_back(Transmit {
                        dst: from,
                        payload: out.to_vec(),
                    });
                    return if authentic {
                        Opened::Authentic(None)
                    } else {
                        Opened::Unproven
                    };
                }
                TunnResult::WriteToNetwork(out) => {
                    authentic = true;
                    transmits.push_back(Transmit {
                        dst: from,
                        payload: out.to_vec(),
                    });
                    if !flush {
                        return Opened::Authentic(None);
                    }
                    // Flush packets that waited for this handshake.
                    res = tunn.decapsulate(None, &[], dst);
                }
                TunnResult::WriteToTunnelV6(p, _) => return Opened::Authentic(Some(p.len())),
                TunnResult::WriteToTunnelV4(..) => return Opened::Ipv4,
                TunnResult::Err(e) => {
                    return Opened::Refused(match e {
                        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
                            Refusal::Replay
                        }
                        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
                            Refusal::UnknownSession
                        }
                        WireGuardError::InvalidMac
                        | WireGuardError::WrongKey
                        | WireGuardError::InvalidTai64nTimestamp
                        | WireGuardError::WrongTai64nTimestamp
                        | WireGuardError::UnderLoad
                        | WireGuardError::UnexpectedPacket => Refusal::Handshake,
                        _ => Refusal::Auth,
                    })
                }
            }
        }
    }

    /// Runs boringtun's timers (rekey, keepalive, handshake retries): what
    /// they send goes to the neighbour's endpoint through `transmits`
    /// (payload buffers from `spare`). At most one datagram per call.
    pub(super) fn tick(
        &mut self,
        scratch: &mut [u8],
        transmits: &mut VecDeque<Transmit>,
        spare: &mut Vec<Vec<u8>>,
    ) -> Tick {
        let Some(tunn) = &mut self.tunn else {
            return Tick::Nothing;
        };
        match tunn.update_timers(scratch) {
            TunnResult::WriteToNetwork(out) => {
                if let Some(ep) = self.endpoint {
                    transmits.push_back(Transmit {
                        dst: ep,
                        payload: reuse(spare, out),
                    });
                }
                Tick::Nothing
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => Tick::Expired,
            _ => Tick::Nothing,
        }
    }

    /// Sends a handshake initiation to `to` (`force`: even if one went out
    /// lately), through `transmits`.
    pub(super) fn initiate(
        &mut self,
        to: SocketAddr,
        force: bool,
        scratch: &mut [u8],
        transmits: &mut VecDeque<Transmit>,
    ) {
        let Some(tunn) = &mut self.tunn else {
            return;
        };
        if let TunnResult::WriteToNetwork(out) = tunn.format_handshake_initiation(scratch, force) {
            transmits.push_back(Transmit {
                dst: to,
                payload: out.to_vec(),
            });
        }
    }
}

/// Seals `packet` on `tunn` straight into the batch `out`, as a datagram to
/// `dst`: the encryption is the only copy between here and the kernel.
fn seal_batch(out: &mut SendBatch, tunn: &mut Tunn, packet: &[u8], dst: SocketAddr) -> Sealed {
    if out.bytes() >= MAX_BATCH_BYTES {
        return Sealed::Failed;
    }
    let space = out.space((packet.len() + SEAL_OVERHEAD).max(SEAL_MIN_OUT));
    let n = match tunn.encapsulate(packet, space) {
        TunnResult::WriteToNetwork(d) => d.len(),
        TunnResult::Done => return Sealed::Held,
        _ => return Sealed::Failed,
    };
    out.commit(dst, n);
    Sealed::Queued
}
