//! `qgate run`: the tokio shell around the protocol core.
//!
//! Three loops share the node: TUN → UDP, UDP → TUN, and a timer. Each locks
//! the node only to hand it packets (never across an await), copies out what
//! to send, and does its I/O unlocked. Datagrams and TUN packets are taken in
//! batches (whatever is ready, up to [`BATCH`]) so one lock serves many.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::net::UdpSocket;

use super::config::Config;
use super::control::{ControlSocket, Handler};
use super::state;
use crate::proto::node::{normalize, Transmit};
use crate::proto::{Node, TunOutcome};
use qgate_platform::{AsyncDevice, Tun};

/// Most packets handled per lock.
const BATCH: usize = 64;
/// Buffer size for one packet or datagram.
const BUF: usize = 65536 + 256;

struct Shared {
    node: Mutex<Node>,
    udp: UdpSocket,
    tun: AsyncDevice,
    ipv6_socket: bool,
}

/// Starts the node and runs until SIGINT or SIGTERM.
pub fn run(config: Config) -> Result<()> {
    let identity = state::load_identity(&config.state_dir)?;
    if !qgate_platform::has_cap_net_admin() {
        bail!(
            "qgate run needs CAP_NET_ADMIN to create TUN interface {}: run it as root or grant the capability (see platform/linux/qgate.service)",
            config.tun_name
        );
    }
    let seq = state::next_record_seq(&config.state_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async_main(config, identity, seq))
}

fn bind_udp(listen: SocketAddr) -> Result<(UdpSocket, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if listen.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if listen.is_ipv6() {
        // "[::]" means both families; a specific IPv6 address only IPv6.
        let any = matches!(listen.ip(), IpAddr::V6(a) if a.is_unspecified());
        s.set_only_v6(!any)?;
    }
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    qgate_platform::set_dont_fragment(std::os::fd::AsFd::as_fd(&s), listen.is_ipv6())
        .context("setting don't-fragment on the UDP socket")?;
    s.set_nonblocking(true)?;
    s.bind(&listen.into())
        .with_context(|| format!("binding UDP {listen}"))?;
    Ok((UdpSocket::from_std(s.into())?, listen.is_ipv6()))
}

async fn async_main(config: Config, identity: crate::proto::Identity, seq: u64) -> Result<()> {
    let (udp, ipv6_socket) = bind_udp(config.listen)?;
    let address = identity.overlay_address();
    let node_id = identity.node_id();
    let started = Instant::now();
    let node = Node::new(identity, seq, config.node_config(), started, rand_u32());
    // The control socket is checked before the TUN exists, so a second
    // instance fails without touching the first one's interface.
    if config.control_socket.exists()
        && std::os::unix::net::UnixStream::connect(&config.control_socket).is_ok()
    {
        bail!(
            "control socket {} is in use: is another qgate running with this config?",
            config.control_socket.display()
        );
    }
    let Tun { device, name } =
        qgate_platform::create_tun(&config.tun_name, config.mtu as u16, address, 8)?;
    let control = ControlSocket::bind(&config.control_socket)?;
    tracing::info!(
        node = %node_id,
        %address,
        listen = %udp.local_addr()?,
        tun = %name,
        mtu = config.mtu,
        peers = config.peers.len(),
        "qgate up"
    );
    let shared = Arc::new(Shared {
        node: Mutex::new(node),
        udp,
        tun: device,
        ipv6_socket,
    });
    // Send the hellos the node queued for its configured peers.
    flush(&shared).await;

    let handler: Handler = {
        let shared = shared.clone();
        let tun_name = name.clone();
        let listen = config.listen;
        let mtu = config.mtu;
        Arc::new(move |cmd: &str| match cmd {
            "status" => {
                let st = shared.node.lock().expect("node lock").status();
                let mut v = serde_json::to_value(st)?;
                v["version"] = json!(env!("CARGO_PKG_VERSION"));
                v["uptime_secs"] = json!(started.elapsed().as_secs_f64());
                v["listen"] = json!(listen.to_string());
                v["tun"] = json!({"name": tun_name, "mtu": mtu});
                Ok(v)
            }
            other => bail!("unknown command {other:?}"),
        })
    };

    let tasks = [
        tokio::spawn(tun_loop(shared.clone())),
        tokio::spawn(udp_loop(shared.clone())),
        tokio::spawn(timer_loop(shared.clone())),
    ];
    let serve = control.serve(handler);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = serve => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shutting down"),
        _ = term.recv() => tracing::info!("terminated, shutting down"),
    }
    for t in tasks {
        t.abort();
    }
    drop(control);
    Ok(())
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    u32::from_le_bytes(b)
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

    async fn send(&self, dst: SocketAddr, data: &[u8]) {
        let to = self.to_socket(dst);
        let res = match self.udp.try_send_to(data, to) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.udp.send_to(data, to).await,
            r => r,
        };
        if let Err(e) = res {
            if e.raw_os_error() == Some(libc::EMSGSIZE) {
                // The kernel learnt a smaller path MTU (ICMP reached it).
                match qgate_platform::path_mtu(dst) {
                    Ok(mtu) => self.node.lock().expect("node lock").set_path_mtu(dst, mtu),
                    Err(e) => tracing::debug!(%dst, "path MTU query failed: {e}"),
                }
            } else {
                tracing::debug!(%dst, "send failed: {e}");
            }
        }
    }
}

fn drain(node: &mut Node, out: &mut Vec<Transmit>) {
    while let Some(t) = node.poll_transmit() {
        out.push(t);
    }
}

async fn flush(sh: &Shared) {
    let mut out = Vec::new();
    drain(&mut sh.node.lock().expect("node lock"), &mut out);
    for t in out {
        sh.send(t.dst, &t.payload).await;
    }
}

/// What a batch produced: datagrams to send and packets for the TUN, as
/// ranges of one reused buffer.
#[derive(Default)]
struct Outbox {
    data: Vec<u8>,
    sends: Vec<(SocketAddr, usize, usize)>,
    tun: Vec<(usize, usize)>,
    control: Vec<Transmit>,
}

impl Outbox {
    fn clear(&mut self) {
        self.data.clear();
        self.sends.clear();
        self.tun.clear();
    }
    fn push_send(&mut self, dst: SocketAddr, d: &[u8]) {
        let s = self.data.len();
        self.data.extend_from_slice(d);
        self.sends.push((dst, s, self.data.len()));
    }
    fn push_tun(&mut self, d: &[u8]) {
        let s = self.data.len();
        self.data.extend_from_slice(d);
        self.tun.push((s, self.data.len()));
    }
    async fn deliver(&mut self, sh: &Shared) {
        for &(dst, s, e) in &self.sends {
            sh.send(dst, &self.data[s..e]).await;
        }
        for &(s, e) in &self.tun {
            if let Err(e) = sh.tun.send(&self.data[s..e]).await {
                tracing::debug!("TUN write failed: {e}");
            }
        }
        for t in self.control.drain(..) {
            sh.send(t.dst, &t.payload).await;
        }
        self.clear();
    }
}

async fn tun_loop(sh: Arc<Shared>) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUF]).collect();
    let mut lens = vec![0usize; BATCH];
    let mut out = Outbox::default();
    loop {
        let n = match sh.tun.recv(&mut bufs[0]).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("TUN read failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        lens[0] = n;
        let mut count = 1;
        while count < BATCH {
            match sh.tun.try_recv(&mut bufs[count]) {
                Ok(n) => {
                    lens[count] = n;
                    count += 1;
                }
                Err(_) => break,
            }
        }
        let now = Instant::now();
        {
            let mut node = sh.node.lock().expect("node lock");
            for i in 0..count {
                match node.handle_tun_packet(now, &bufs[i][..lens[i]]) {
                    TunOutcome::Send(dst, d) => out.push_send(dst, d),
                    TunOutcome::Reply(p) => out.push_tun(p),
                    TunOutcome::Nothing => {}
                }
            }
            drain(&mut node, &mut out.control);
        }
        out.deliver(&sh).await;
    }
}

async fn udp_loop(sh: Arc<Shared>) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUF]).collect();
    let mut meta: Vec<(usize, SocketAddr)> = Vec::with_capacity(BATCH);
    let mut out = Outbox::default();
    loop {
        meta.clear();
        match sh.udp.recv_from(&mut bufs[0]).await {
            Ok((n, from)) => meta.push((n, from)),
            Err(e) => {
                // ICMP errors surface here as ECONNREFUSED etc. on Linux.
                tracing::debug!("UDP receive: {e}");
                continue;
            }
        }
        while meta.len() < BATCH {
            match sh.udp.try_recv_from(&mut bufs[meta.len()]) {
                Ok((n, from)) => meta.push((n, from)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => continue,
            }
        }
        let now = Instant::now();
        {
            let mut node = sh.node.lock().expect("node lock");
            for (i, &(n, from)) in meta.iter().enumerate() {
                if let Some(p) = node.handle_datagram(now, normalize(from), &bufs[i][..n]) {
                    out.push_tun(p);
                }
            }
            drain(&mut node, &mut out.control);
        }
        out.deliver(&sh).await;
    }
}

async fn timer_loop(sh: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sh.node
            .lock()
            .expect("node lock")
            .handle_timeout(Instant::now());
        flush(&sh).await;
    }
}
