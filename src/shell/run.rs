//! `qgate run`: the shell around the protocol core.
//!
//! Tokio runs the control socket, signals and the node's timers. The data
//! plane runs on a dedicated thread that sleeps in poll(2) on the TUN and
//! the UDP socket and is woken by the kernel directly: a packet waits for no
//! task scheduler, which keeps the added round-trip time small (see
//! `data_loop`). It locks the node only to hand it a batch of packets,
//! copies out what to send, and does its I/O unlocked.
//!
//! Per-packet system calls, not crypto, bound a userspace tunnel's speed, so
//! both directions move batches:
//! - TUN → UDP: the TUN runs with virtio-net offloads, so one read returns a
//!   TCP segment of up to 64 KiB that the kernel did not have to cut up
//!   (tun-rs splits it); the encrypted datagrams leave in UDP GSO batches,
//!   one `sendmsg` for up to 64 equal-sized datagrams (quinn-udp).
//! - UDP → TUN: `recvmmsg` with UDP GRO (quinn-udp) returns many datagrams
//!   per call; the decrypted packets are coalesced back into large TCP
//!   segments (tun-rs's GRO table) before they are written to the TUN.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TrySendError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::config::Config;
use super::control::ControlSocket;
use super::vault::{KeyOptions, StateLock, StoredPeer, Vault};
use super::{filter, privilege};
use crate::proto::batch::SendBatch;
use crate::proto::dht::Source;
use crate::proto::node::{SignJob, Sweep, Transmit};
use crate::proto::Node;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use qgate_platform::{SyncDevice, Tun, VIRTIO_NET_HDR_LEN};
use quinn_udp::UdpSocketState;
use std::net::UdpSocket;
use std::os::fd::AsFd;

mod answers;
mod datapath;
mod lock;
mod plane;

use datapath::{data_loop, Io, TunSide, UdpSide, TSO_SEGMENTS};
use lock::{Holder, NodeLock};

struct Shared {
    node: NodeLock,
    /// Fresh counters from the data plane, for `status`.
    mailbox: plane::Mailbox,
    udp: UdpSocket,
    udp_state: UdpSocketState,
    /// None for a dedicated relay (`role = "relay"`).
    tun: Option<SyncDevice>,
    ipv6_socket: bool,
    store: Vault,
    /// What the vault holds of the DHT values (see `save_values`).
    values_saved: Mutex<SavedValues>,
    /// A task is writing the peer store and values (the timer starts one
    /// at a time and never waits for it).
    saving: AtomicBool,
    /// A task is storing the record sequence limit.
    seq_storing: AtomicBool,
    /// Signatures the node asked for, to the signing thread ([`sign_loop`]).
    signing: std::sync::mpsc::SyncSender<SignJob>,
    /// Held for the life of the node: no rotation or second node meanwhile.
    _lock: StateLock,
}

/// Starts the node and runs until SIGINT or SIGTERM. `key` names the master
/// key (the config's `key_file` fills in when it names none).
///
/// Everything that needs privilege happens first, on the main thread while
/// it is still the only thread: read the key and open the sealed state (a
/// node that cannot unseal it stops here, before it touches the network),
/// bind the UDP and control sockets, create and configure the TUN, install
/// the inbound filter (and start its watcher, see `filter`). Then the node
/// switches to the configured user, clears every capability and sets
/// no-new-privileges (see `privilege`); only then do the runtime and the
/// data-plane thread start, and they inherit the dropped state.
pub fn run(config: Config, mut key: KeyOptions) -> Result<()> {
    // A missing user stops the node before it creates anything.
    let target = privilege::Target::resolve(config.user.as_deref())?;
    if key.key_file.is_none() && key.passphrase_fd.is_none() && !key.ask_passphrase {
        key.key_file = config.key_file.clone();
    }
    let lock = StateLock::take(&config.state_dir)?;
    let source = key.for_open(&config.state_dir)?;
    let store = Vault::open_locked(&config.state_dir, &source, &lock)?;
    drop(source);
    let identity = store.identity()?;
    if !config.relay_only && !qgate_platform::has_cap_net_admin() {
        bail!(
            "qgate run needs CAP_NET_ADMIN to create TUN interface {}: run it as root or grant the capability (see platform/linux/qgate.service)",
            config.tun_name
        );
    }
    if !config.relay_only {
        qgate_platform::check_tun_device().map_err(anyhow::Error::msg)?;
    }
    let nft = if config.relay_only || config.inbound.all {
        None
    } else {
        Some(filter::find_nft().with_context(|| {
            "the inbound filter needs nftables' `nft` program, which is not installed (install nftables, or set [inbound] allow = [\"all\"] to run without a filter)"
        })?)
    };
    let seq = store.next_record_seq()?;
    let (mut udp, ipv6_socket) = bind_udp(config.listen, config.workers)?;
    let more_udp = udp.split_off(1);
    let udp = udp.pop().expect("the first socket");
    // Bound before the TUN exists, so a second instance fails without
    // touching the first one's interface.
    let mut control = ControlSocket::bind(&config.control_socket)?;
    let metrics = config.metrics.map(super::metrics::bind).transpose()?;
    // LAN discovery's socket too (a port below 1024 would need privilege);
    // a failure only turns discovery off, as before.
    let lan = if config.lan {
        match super::lan::bind(config.lan_port) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("LAN discovery off: {e:#}");
                None
            }
        }
    } else {
        None
    };
    // A dedicated relay has no TUN: it needs no privilege and ends no
    // circuits, it only forwards.
    let mut more_queues = Vec::new();
    let (device, name) = if config.relay_only {
        (None, String::new())
    } else {
        let Tun {
            device,
            queues,
            name,
        } = qgate_platform::create_tun(
            &config.tun_name,
            config.mtu as u16,
            identity.overlay_address(),
            8,
            true,
            config.workers,
        )?;
        more_queues = queues;
        (Some(device), name)
    };
    let mut guard = match &nft {
        Some(nft) => Some(filter::install(&name, &config.inbound, nft)?),
        None => {
            if !config.relay_only {
                tracing::info!("no inbound filter: [inbound] allow = [\"all\"]");
            }
            None
        }
    };
    control.hand_to(target.uid, target.gid)?;
    // Files a root start created (a migration, a new LMDB lock file) go to
    // the user too, so a later start as that user (systemd) can open them.
    if let Some(user) = &target.name {
        if nix::unistd::Uid::current().is_root() {
            privilege::hand_over(&config.state_dir, user)?;
        }
    }
    privilege::drop_to(&target)?;
    check_writable(
        config.control_socket.parent().unwrap_or(Path::new(".")),
        "the control socket's directory: the socket file will stay behind at shutdown (the next start removes it)",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let up = Up {
        identity,
        seq,
        store,
        lock,
        udp,
        more_udp,
        ipv6_socket,
        control,
        device,
        more_queues,
        name,
        lan,
        metrics,
    };
    let result = rt.block_on(async_main(config, up));
    // The watcher removes the filter; wait for it, so the table is gone
    // when the node has exited.
    if let Some(g) = guard.as_mut() {
        g.stop();
    }
    result
}

/// Warns when the (unprivileged) process can't create and remove files in
/// `dir`.
fn check_writable(dir: &Path, what: &str) {
    use std::os::unix::fs::MetadataExt;
    if !qgate_platform::privilege::can_write_dir(dir) {
        let me = nix::unistd::Uid::current();
        // Root without capabilities is an ordinary user to the file system:
        // name the owner, which is usually the `user` the config forgot.
        let owner = std::fs::metadata(dir).map(|m| m.uid()).ok();
        let hint = match owner {
            Some(o) if o != me.as_raw() => {
                format!(" (it belongs to uid {o}: set `user` in the config to that user)")
            }
            _ => String::new(),
        };
        tracing::warn!(
            "{} is not writable by uid {me}{hint}: {what}",
            dir.display(),
        );
    }
}

/// What `run` set up before the privilege drop.
struct Up {
    identity: crate::proto::Identity,
    seq: u64,
    store: Vault,
    /// The state directory's lock, held for the node's life.
    lock: StateLock,
    udp: UdpSocket,
    /// The further data threads' sockets, on the same port.
    more_udp: Vec<UdpSocket>,
    ipv6_socket: bool,
    control: ControlSocket,
    device: Option<SyncDevice>,
    /// The further data threads' TUN queues.
    more_queues: Vec<SyncDevice>,
    name: String,
    /// LAN discovery's socket, when it is on.
    lan: Option<UdpSocket>,
    /// The `metrics` endpoint's socket, when it is on.
    metrics: Option<std::net::TcpListener>,
}

fn source_code(s: Source) -> u8 {
    match s {
        Source::Config => 0,
        Source::Network => 1,
        Source::Store => 2,
        Source::Lan => 3,
    }
}

/// Writes the routing table to the peer store (one transaction).
fn save_peers(sh: &Shared) {
    let rows = sh.node.lock(Holder::Store).peer_snapshot(Instant::now());
    let peers: Vec<([u8; 32], StoredPeer)> = rows
        .into_iter()
        .map(|(id, record, source, last_seen_unix)| {
            (
                id,
                StoredPeer {
                    record,
                    source: source_code(source),
                    last_seen_unix,
                },
            )
        })
        .collect();
    if let Err(e) = sh.store.replace_all(&peers) {
        tracing::warn!("saving the peer store: {e:#}");
    }
}

/// What the vault holds of the DHT values: the fingerprint of the set last
/// written in full, and how many puts' records were added since
/// ([`Vault::add_value`]).
#[derive(Default)]
struct SavedValues {
    print: Option<u64>,
    added: usize,
}

/// Puts' records added to the vault one by one before a put writes the full
/// set instead (which removes them): bounds what a loop of puts leaves
/// behind, at most this many records of up to 2 KiB.
const MAX_ADDED_VALUES: usize = 64;

/// Writes the DHT value records the node keeps to the vault, unless they
/// are the ones written last time.
///
/// The values lock is taken before the node's snapshot and held through the
/// write, and a put adds its record under it after the node has the value
/// (`keep_put_value`): so a put's record is either in the snapshot or added
/// after the write, never erased by an older snapshot.
fn save_values(sh: &Shared) {
    let mut saved = sh.values_saved.lock().expect("values lock");
    write_values(sh, &mut saved);
}

fn write_values(sh: &Shared, saved: &mut SavedValues) {
    use std::hash::{Hash, Hasher};
    let records = sh.node.lock(Holder::Store).value_records(Instant::now());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    records.hash(&mut h);
    let print = h.finish();
    if saved.print == Some(print) {
        return;
    }
    match sh.store.replace_values(&records) {
        Ok(()) => {
            saved.print = Some(print);
            saved.added = 0;
        }
        Err(e) => tracing::warn!("saving the DHT values: {e:#}"),
    }
}

/// Keeps a value this node has just put (the node has it already) in the
/// vault before the put answers: its record alone, or, once
/// [`MAX_ADDED_VALUES`] are waiting, the full set.
fn keep_put_value(sh: &Shared, record: &[u8]) {
    let mut saved = sh.values_saved.lock().expect("values lock");
    if saved.added >= MAX_ADDED_VALUES {
        write_values(sh, &mut saved);
        return;
    }
    match sh.store.add_value(record) {
        Ok(()) => {
            saved.added += 1;
            // The next save writes the set even if it looks unchanged, so
            // that it removes the added record.
            saved.print = None;
        }
        Err(e) => tracing::warn!("keeping the value in the vault: {e:#}"),
    }
}

/// Binds the node's UDP socket, and with more than one data thread one
/// socket per thread on the same address (`SO_REUSEPORT`), the kernel
/// steering each datagram to the thread that holds its link.
fn bind_udp(listen: SocketAddr, workers: usize) -> Result<(Vec<UdpSocket>, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if listen.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let mut sockets = Vec::new();
    let mut listen = listen;
    if workers > 1 {
        // The group's sockets share the port with any other socket of the
        // same user that asks: make sure nobody holds it first (a second
        // instance must fail here, not join), and learn the port `:0`
        // picks, which every socket of the group then binds.
        let probe = UdpSocket::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
        listen = probe
            .local_addr()
            .context("reading the bound UDP address")?;
    }
    for _ in 0..workers.max(1) {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if listen.is_ipv6() {
            // "[::]" means both families; a specific IPv6 address only IPv6.
            let any = matches!(listen.ip(), IpAddr::V6(a) if a.is_unspecified());
            s.set_only_v6(!any)?;
        }
        if workers > 1 {
            s.set_reuse_port(true)?;
        }
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        qgate_platform::set_dont_fragment(std::os::fd::AsFd::as_fd(&s), listen.is_ipv6())
            .context("setting don't-fragment on the UDP socket")?;
        s.set_nonblocking(true)?;
        s.bind(&listen.into())
            .with_context(|| format!("binding UDP {listen}"))?;
        sockets.push(UdpSocket::from(s));
    }
    if workers > 1 {
        // One program for the whole group, attached through any of its
        // sockets.
        qgate_platform::steer_by_link(std::os::fd::AsFd::as_fd(&sockets[0]), workers as u32)
            .context("steering datagrams to the data threads")?;
    }
    Ok((sockets, listen.is_ipv6()))
}

async fn async_main(config: Config, up: Up) -> Result<()> {
    let udp_state = UdpSocketState::new((&up.udp).into()).context("setting up the UDP socket")?;
    // quinn-udp asks for "probe" path MTU discovery, under which the kernel
    // never reports a smaller path MTU; we want EMSGSIZE, so set DF again.
    qgate_platform::set_dont_fragment(std::os::fd::AsFd::as_fd(&up.udp), up.ipv6_socket)
        .context("setting don't-fragment on the UDP socket")?;
    let address = up.identity.overlay_address();
    let node_id = up.identity.node_id();
    let extender_keys = {
        let secret = zeroize::Zeroizing::new(up.identity.link_secret_bytes());
        super::extender::ExtenderKeys::new(&secret)
    };
    let started = Instant::now();
    let mut node = Node::new(up.identity, up.seq, config.node_config(), started);
    #[cfg(feature = "test-hooks")]
    if std::env::var_os("QGATE_CELL_LOG").is_some() {
        node.enable_cell_log();
    }
    // Nodes remembered from earlier runs: the way back in when every
    // configured peer is gone.
    let stored = up.store.load()?;
    let kept = stored
        .iter()
        .filter(|(_, p)| node.add_stored_peer(started, &p.record))
        .count();
    // DHT values kept by the last run: this node's own are published again
    // once it has joined, those held for others are served meanwhile.
    let values = up.store.values()?;
    let values_kept = values
        .iter()
        .filter(|r| node.restore_value(started, r))
        .count();
    tracing::info!(
        stored = stored.len(),
        usable = kept,
        values = values_kept,
        "vault {} opened, peer store and DHT values read",
        config.state_dir.join(super::vault::VAULT_DIR).display()
    );
    tracing::info!(
        node = %node_id,
        %address,
        listen = %up.udp.local_addr()?,
        tun = %up.name,
        mtu = config.mtu,
        peers = config.peers.len(),
        role = if config.relay_only { "relay" } else { "node" },
        preset = %config.preset,
        "qgate up"
    );
    for p in config.peers.iter().filter(|p| p.endpoint.is_none()) {
        tracing::warn!(
            "peer {} in `peers` has no endpoint: this node can't link to it until the DHT \
             (through another peer) knows where it is; append /IP:PORT, the address and UDP \
             port that node listens on, to its URI (e.g. {}/198.18.0.2:7300)",
            p.node_id.short(),
            p
        );
    }
    let max_gso = udp_state.max_gso_segments();
    let (signing, sign_jobs) = std::sync::mpsc::sync_channel(SIGN_QUEUE);
    // Established links go to the data planes, which the data threads hold.
    let planes = node.data_planes(config.workers);
    let (forward, mailbox, inboxes) =
        plane::mailbox(planes).context("making the data plane's mailbox")?;
    let release: lock::Release<Node> = Box::new(move |n: &mut Node| forward.forward(n));
    let shared = Arc::new(Shared {
        node: NodeLock::new(node, Some(release)),
        mailbox,
        udp: up.udp,
        udp_state,
        tun: up.device,
        ipv6_socket: up.ipv6_socket,
        store: up.store,
        values_saved: Mutex::new(SavedValues::default()),
        saving: AtomicBool::new(false),
        seq_storing: AtomicBool::new(false),
        signing,
        _lock: up.lock,
    });
    // Send the hellos the node queued for its configured peers.
    flush(&shared, Holder::Control);

    let handler = answers::handler(
        shared.clone(),
        answers::NodeInfo {
            started,
            node_id,
            address,
            listen: config.listen,
            tun: (!up.name.is_empty()).then(|| qgate_api::Tun {
                name: up.name.clone(),
                mtu: config.mtu as u64,
            }),
            role: if config.relay_only {
                qgate_api::Role::Relay
            } else {
                qgate_api::Role::Node
            },
            preset: config.preset,
            extender_keys,
        },
    );

    // The data-plane threads end with the process.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if config.workers > cores {
        tracing::warn!(
            workers = config.workers,
            cores,
            "link.workers is above the machine's cores: the data threads take turns on them"
        );
    }
    {
        let segments = if config.relay_only { 0 } else { TSO_SEGMENTS };
        let mut ios = vec![Io::default()];
        let mut queues = up.more_queues.into_iter();
        for s in up.more_udp {
            let state =
                UdpSocketState::new((&s).into()).context("setting up a data thread's socket")?;
            qgate_platform::set_dont_fragment(std::os::fd::AsFd::as_fd(&s), up.ipv6_socket)
                .context("setting don't-fragment on the UDP socket")?;
            ios.push(Io::own(s, state, queues.next()));
        }
        for (i, (io, inbox)) in ios.into_iter().zip(inboxes).enumerate() {
            let sh = shared.clone();
            let (tun, udp) = (
                TunSide::new(max_gso, config.mtu, segments),
                UdpSide::new(max_gso),
            );
            let name = if i == 0 {
                "qgate-data".to_string()
            } else {
                format!("qgate-data{i}")
            };
            std::thread::Builder::new()
                .name(name)
                .spawn(move || data_loop(sh, io, tun, udp, inbox))
                .context("starting a data-plane thread")?;
        }
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("qgate-sign".into())
            .spawn(move || sign_loop(sh, sign_jobs))
            .context("starting the signing thread")?;
    }
    let timer = tokio::spawn(timer_loop(shared.clone()));
    let lan = if let Some(lan_socket) = up.lan {
        let sh = shared.clone();
        let node = sh.node.lock(Holder::Lan);
        let uri = crate::proto::PeerUri {
            node_id: node.node_id(),
            link_key: node.record().link_key,
            endpoint: None,
        };
        drop(node);
        let port = shared.udp.local_addr()?.port();
        let found = move |peer: crate::proto::PeerUri, ep: SocketAddr| {
            sh.node
                .lock(Holder::Lan)
                .add_lan_peer(Instant::now(), &peer, ep);
            flush(&sh, Holder::Lan);
        };
        let (lan_port, tun) = (config.lan_port, up.name.clone());
        Some(tokio::spawn(async move {
            if let Err(e) = super::lan::run(lan_socket, lan_port, uri, port, tun, found).await {
                tracing::warn!("LAN discovery stopped: {e:#}");
            }
        }))
    } else {
        None
    };
    let metrics = up.metrics.map(|listener| {
        let sh = shared.clone();
        let exporter = super::metrics::Exporter {
            // One hold of the lock, as for `qgate status`.
            take: Box::new(move || {
                sh.mailbox.refresh();
                let node = sh.node.lock(Holder::Metrics);
                super::metrics::Snapshot {
                    status: node.status(),
                    closed: node.closed_links(),
                    long_holds: sh.node.long_holds(),
                }
            }),
            started,
            role: if config.relay_only { "relay" } else { "node" },
            preset: config.preset.as_str().to_string(),
        };
        tokio::spawn(super::metrics::serve(listener, Arc::new(exporter)))
    });
    let serve = up.control.serve(handler);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = serve => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shutting down"),
        _ = term.recv() => tracing::info!("terminated, shutting down"),
    }
    timer.abort();
    if let Some(l) = lan {
        l.abort();
    }
    if let Some(m) = metrics {
        m.abort();
    }
    drop(up.control);
    save_peers(&shared);
    save_values(&shared);
    Ok(())
}

impl Shared {
    fn to_socket(&self, dst: SocketAddr) -> SocketAddr {
        match dst {
            SocketAddr::V4(v4) if self.ipv6_socket => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        }
    }

    fn send(&self, dst: SocketAddr, data: &[u8]) {
        self.send_gso(dst, data, data.len())
    }

    /// Sends `data` as datagrams of `segment` bytes (the last may be
    /// shorter) in one system call.
    fn send_gso(&self, dst: SocketAddr, data: &[u8], segment: usize) {
        self.send_gso_with(dst, data, segment, Retry::Yes)
    }

    fn send_gso_with(&self, dst: SocketAddr, data: &[u8], segment: usize, retry: Retry) {
        let t = quinn_udp::Transmit {
            destination: self.to_socket(dst),
            ecn: None,
            contents: data,
            segment_size: (data.len() > segment).then_some(segment),
            src_ip: None,
        };
        let mut tries = 0;
        let res = loop {
            match self.udp_state.try_send((&self.udp).into(), &t) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && retry == Retry::Yes
                        && tries < 100 =>
                {
                    // Socket buffer full: wait (bounded) until it drains.
                    tries += 1;
                    let mut fds = [PollFd::new(self.udp.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(10u8));
                }
                r => break r,
            }
        };
        if let Err(e) = res {
            let errno = e.raw_os_error();
            if t.segment_size.is_some() && matches!(errno, Some(libc::EINVAL) | Some(libc::EIO)) {
                // Older kernels say EINVAL when a GSO segment exceeds the
                // path MTU, and some devices can't do GSO (quinn-udp then
                // stops batching): learn the MTU and send one by one.
                if let Ok(mtu) = qgate_platform::path_mtu(dst) {
                    self.node.lock(Holder::PathMtu).set_path_mtu(dst, mtu);
                }
                for d in data.chunks(segment) {
                    self.send_gso_with(dst, d, d.len(), retry);
                }
                return;
            }
            if errno == Some(libc::EMSGSIZE) {
                // The kernel learnt a smaller path MTU (ICMP reached it).
                match qgate_platform::path_mtu(dst) {
                    Ok(mtu) => self.node.lock(Holder::PathMtu).set_path_mtu(dst, mtu),
                    Err(e) => tracing::debug!(%dst, "path MTU query failed: {e}"),
                }
            } else {
                tracing::debug!(%dst, "send failed: {e}");
            }
        }
    }

    /// Writes one packet to the TUN (which expects a virtio-net header),
    /// from a buffer each thread that writes keeps (the data thread for
    /// the packets the node hands it, the timer thread for ICMP replies):
    /// no allocation per packet, and no lock between the two.
    fn write_tun(&self, packet: &[u8]) {
        write_tun_on(self.tun.as_ref(), packet);
    }
}

/// Writes one packet to TUN queue `tun` (see [`Shared::write_tun`]); a data
/// thread writes on its own queue, so that the flow's next packets come
/// back to it.
fn write_tun_on(tun: Option<&SyncDevice>, packet: &[u8]) {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let Some(tun) = tun else {
        return;
    };
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(packet);
        if let Err(e) = tun.send(buf) {
            tracing::debug!("TUN write failed: {e}");
        }
    });
}

/// Hands the node the payload buffers sent since the last call (for
/// reuse), takes what it queued, and passes the signatures it asked for to
/// the signing thread. The data path passes its empty send `batch`: what
/// the node sealed comes in one swap (`Node::take_output`), and `out` gets
/// only what the node queued on its own, which goes out first. Other
/// threads take everything one datagram at a time into `out`.
fn drain(
    sh: &Shared,
    node: &mut Node,
    batch: Option<&mut SendBatch>,
    out: &mut Vec<Transmit>,
    spent: &mut Vec<Vec<u8>>,
) {
    for p in spent.drain(..) {
        node.recycle(p);
    }
    match batch {
        Some(batch) => {
            // The node's next batch is built for today's GSO limit
            // (quinn-udp lowers it once the kernel refuses GSO).
            batch.set_max_segments(sh.udp_state.max_gso_segments());
            node.take_output(batch, out);
        }
        None => {
            while let Some(t) = node.poll_transmit() {
                out.push(t);
            }
        }
    }
    while let Some(job) = node.poll_sign() {
        // Never wait here (the node lock is held): a job that finds the
        // queue full is dropped: its circuit's build step times out, or a
        // record is planned anew after `SIGN_WAIT`.
        match sh.signing.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                tracing::debug!(what = ?job.what, "signing queue full: job dropped")
            }
            Err(TrySendError::Disconnected(_)) => tracing::error!("the signing thread is gone"),
        }
    }
}

/// Signatures waiting for the signing thread, at most (a circuit asks for
/// one per build, and a node builds at most a few hundred at once; the
/// node's own record one now and then).
const SIGN_QUEUE: usize = 256;

/// The signing thread: makes the RSA signatures the node asks for (a
/// circuit's AUTH, the node's own record; some milliseconds each) without
/// the node lock, so that no packet waits behind one, then hands each back
/// and sends what that queued. Jobs are few: one per circuit build, at most
/// one at a time per circuit, and a record now and then.
fn sign_loop(sh: Arc<Shared>, jobs: std::sync::mpsc::Receiver<SignJob>) {
    let signer = sh.node.lock(Holder::Sign).signer();
    for job in jobs {
        // A backlog may hold jobs of circuits that failed meanwhile.
        if !sh.node.lock(Holder::Sign).wants_signature(&job) {
            continue;
        }
        let signature = signer.sign(&job.message);
        sh.node
            .lock(Holder::Sign)
            .signed(Instant::now(), &job, &signature);
        flush(&sh, Holder::Sign);
    }
}

/// Whether a send that finds the socket buffer full waits for it to drain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Wait, bounded (the data path: back-pressure on the sender).
    Yes,
    /// Drop the datagram (the timer: never stalls on a full socket).
    No,
}

fn flush(sh: &Shared, who: Holder) {
    let mut out = Output::default();
    out.take(sh, &mut sh.node.lock(who));
    out.send(sh, Retry::Yes);
}

/// What the node queued outside the data path: datagrams and TUN writes,
/// taken under the lock and sent after it.
#[derive(Default)]
struct Output {
    datagrams: Vec<Transmit>,
    tun: Vec<Vec<u8>>,
}

impl Output {
    fn take(&mut self, sh: &Shared, node: &mut Node) {
        drain(sh, node, None, &mut self.datagrams, &mut Vec::new());
        while let Some(p) = node.poll_tun_write() {
            self.tun.push(p);
        }
    }

    fn send(self, sh: &Shared, retry: Retry) {
        for t in self.datagrams {
            sh.send_gso_with(t.dst, &t.payload, t.payload.len(), retry);
        }
        for p in self.tun {
            sh.write_tun(&p);
        }
    }
}

/// Test hook (feature `test-hooks`): appends the cells this node forwarded as
/// a relay to the file named by `QGATE_CELL_LOG`, one line each:
/// `fwd|bwd <hex in> <hex out>`. At most `QGATE_CELL_LOG_MAX` lines (5000).
#[cfg(feature = "test-hooks")]
fn write_cell_log(sh: &Shared) {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static WRITTEN: AtomicUsize = AtomicUsize::new(0);
    let cells = sh.node.lock(Holder::Timer).take_cell_log();
    let Ok(path) = std::env::var("QGATE_CELL_LOG") else {
        return;
    };
    let max = std::env::var("QGATE_CELL_LOG_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000usize);
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    else {
        return;
    };
    for (fwd, cin, cout) in cells {
        if WRITTEN.fetch_add(1, Ordering::Relaxed) >= max {
            return;
        }
        let dir = if fwd { "fwd" } else { "bwd" };
        let _ = writeln!(f, "{dir} {} {}", hex::encode(cin), hex::encode(cout));
    }
}

/// Links visited per step of the timer's sweep: about 50 µs of work (a
/// sweep over 2,000 links held the node ~0.8 ms on average, up to 13 ms, in
/// one piece).
const SWEEP_STEP: usize = 128;

/// The core's timers: sleeps until [`Node::poll_timeout`], runs
/// [`Node::handle_timeout`] and sends what it queued. Nothing here waits on
/// the disk or on a full socket: the vault is written by blocking tasks this
/// loop starts but never awaits (one of each kind at a time), and control
/// datagrams that find the socket buffer full are dropped (the protocol
/// sends hellos, handshakes and lookups again), so a slow disk or a flood
/// can't stall link timers.
async fn timer_loop(sh: Arc<Shared>) {
    let mut last_save = Instant::now();
    loop {
        let deadline = sh.node.lock(Holder::Timer).poll_timeout();
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
        let now = Instant::now();
        // In steps, letting go of the node between them: a packet waits
        // for one step, not for the whole sweep.
        loop {
            let mut out = Output::default();
            let mut node = sh.node.lock(Holder::Timer);
            let sweep = node.handle_timeout_some(now, SWEEP_STEP);
            out.take(&sh, &mut node);
            // A fair unlock: a thread waiting for the node (the data
            // thread, with packets) gets it before the next step does.
            node.unlock_fair();
            out.send(&sh, Retry::No);
            if sweep == Sweep::Done {
                break;
            }
        }
        let wanted_seq = sh.node.lock(Holder::Timer).record_seq_wanted(now);
        #[cfg(feature = "test-hooks")]
        write_cell_log(&sh);
        if let Some(limit) = wanted_seq {
            store_record_seq(&sh, limit);
        }
        // The peer store is a cache of the network: every 10 s is enough,
        // and shutdown writes it too. So are the values held for others
        // (our own are written as soon as they are put).
        if last_save.elapsed() >= Duration::from_secs(10) && !sh.saving.swap(true, Ordering::AcqRel)
        {
            last_save = Instant::now();
            let sh = sh.clone();
            tokio::task::spawn_blocking(move || {
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
fn store_record_seq(sh: &Arc<Shared>, limit: u64) {
    if sh.seq_storing.swap(true, Ordering::AcqRel) {
        return;
    }
    let sh = sh.clone();
    tokio::task::spawn_blocking(move || {
        match sh.store.write_record_seq(limit) {
            Ok(()) => sh.node.lock(Holder::Timer).reserve_record_seq(limit),
            Err(e) => tracing::warn!("storing the record sequence number: {e:#}"),
        }
        sh.seq_storing.store(false, Ordering::Release);
    });
}
