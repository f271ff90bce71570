//! Load generator for `scripts/bench-scale`: N protocol cores
//! ([`qgate::proto::Node`]) in one process, each with its own UDP socket and
//! one configured peer, the real daemon under test. Each core is driven as
//! `qgate run` drives its own (src/shell/run.rs): datagrams into
//! `handle_datagram`, `handle_timeout` at `poll_timeout`, `poll_transmit`
//! out, record sequence numbers reserved when asked. They keep no TUN and
//! accept no second link (`max_links = 1`), so the only links are the N to
//! the daemon, which then idle on keepalives and hellos like any neighbour.
//!
//! Prints one line per event on stdout, for the script to parse:
//!   `keys N SECS`        identities made
//!   `nodes N SECS`       cores built (each signs its record)
//!   `start UNIX_SECS`    the sockets start sending (the clock for `up`)
//!   `up COUNT SECS`      COUNT cores have seen their link up (session and
//!                        records exchanged; at every 100 and at N)
//!   `down COUNT SECS`    a core's link went down again (COUNT up now)
//!   `end UP DOWNS`       on exit (SIGTERM, SIGINT or `--secs`)
//!
//! Identities: a fresh RSA-2048 key takes ~60-300 ms, 2,000 of them minutes
//! on two cores. Instead a small pool of primes is searched (every key pair
//! gives two) and each core gets a distinct *pair* of pool primes as its
//! modulus: 64 primes give 2,016 moduli from 32 key generations. Moduli that
//! share a prime are factored by a gcd, which matters nowhere in a load
//! test: the cores still sign and verify real 2048-bit PKCS#1 signatures.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use boringtun::x25519;
use clap::Parser;
use qgate::proto::access::AccessConfig;
use qgate::proto::node::{normalize, CompressionPolicy, RelayConfig, TrafficConfig};
use qgate::proto::route::RoutePolicy;
use qgate::proto::{Identity, Node, NodeConfig, PeerConfig, PeerUri};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{BigUint, RsaPrivateKey};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

#[derive(Parser)]
#[command(about = "N qgate protocol cores, each linked to one daemon")]
struct Args {
    /// The daemon's qgate:// URI, with its endpoint.
    #[arg(long)]
    uri: String,
    /// How many cores.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=4096))]
    peers: u32,
    /// Local IPv4 addresses to bind: FIRST..FIRST+COUNT-1, core i on address i mod COUNT.
    #[arg(long, default_value = "198.18.61.10")]
    first_addr: Ipv4Addr,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=250))]
    addrs: u32,
    /// Stop after this many seconds (SIGTERM or SIGINT stop it earlier).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
    /// New cores started per second (0: all at once, the hardest case for
    /// the daemon: every handshake arrives within a few milliseconds).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    rate: u32,
    /// Seed of the identities and the cores' randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn stream(seed: u64, n: u64) -> ChaCha20Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&n.to_le_bytes());
    s[16..].copy_from_slice(b"bench-scale keys");
    ChaCha20Rng::from_seed(s)
}

/// `f(i, item)` over `items` on every core, results in order.
fn parallel<T: Send, R: Send>(items: Vec<T>, f: impl Fn(usize, T) -> R + Sync) -> Vec<R> {
    let workers = thread::available_parallelism().map_or(1, |w| w.get());
    let per = items.len().div_ceil(workers).max(1);
    let mut chunks = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        chunks.push(rest);
        rest = tail;
    }
    let f = &f;
    thread::scope(|s| {
        let parts: Vec<_> = chunks
            .into_iter()
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    part.into_iter()
                        .enumerate()
                        .map(|(o, item)| f(c * per + o, item))
                        .collect::<Vec<R>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().expect("worker thread"))
            .collect()
    })
}

/// `n` distinct identities from a pool of primes (see the module comment).
fn identities(n: usize, seed: u64) -> anyhow::Result<Vec<Identity>> {
    let mut primes = 2;
    while primes * (primes - 1) / 2 < n {
        primes += 1;
    }
    let keys = parallel((0..primes.div_ceil(2)).collect(), |_, k| {
        RsaPrivateKey::new(&mut stream(seed, k as u64), 2048)
    });
    let keys = keys.into_iter().collect::<Result<Vec<_>, _>>()?;
    let e = keys[0].e().clone();
    let pool: Vec<BigUint> = keys.iter().flat_map(|k| k.primes().to_vec()).collect();
    let pairs: Vec<(usize, usize)> = (0..pool.len())
        .flat_map(|i| (i + 1..pool.len()).map(move |j| (i, j)))
        .take(n)
        .collect();
    parallel(pairs, |t, (i, j)| {
        let rsa = RsaPrivateKey::from_p_q(pool[i].clone(), pool[j].clone(), e.clone())?;
        let mut link = [0u8; 32];
        stream(seed, (1 << 32) + t as u64).fill_bytes(&mut link);
        Ok(Identity::from_parts(rsa, x25519::StaticSecret::from(link))?)
    })
    .into_iter()
    .collect()
}

fn node_config(daemon: &PeerUri, own: SocketAddr, seed: [u8; 32], unix_time: u64) -> NodeConfig {
    NodeConfig {
        peers: vec![PeerConfig {
            uri: daemon.clone(),
        }],
        compression: CompressionPolicy {
            enabled: true,
            ..Default::default()
        },
        // The shell's defaults (src/shell/config.rs).
        keepalive: 10,
        mtu: 1440,
        // The daemon only: nodes it names in DHT answers get no link.
        max_links: 1,
        // Its own socket's address: as a node with a configured public
        // address, it has no record to re-sign when the daemon reports the
        // endpoint it sees.
        advertise: vec![own],
        roles: 0,
        unix_time,
        routes: RoutePolicy::default(),
        relay: RelayConfig {
            enabled: false,
            ..Default::default()
        },
        traffic: TrafficConfig::default(),
        has_tun: false,
        rng_seed: seed,
        access: AccessConfig::default(),
    }
}

enum Event {
    /// The link is up (session, records exchanged) for the first time.
    First(Duration),
    Up,
    Down(Duration),
}

/// Drives one core until `stop` changes, reporting its link to the daemon.
async fn drive(
    mut node: Node,
    delay: Duration,
    sock: UdpSocket,
    daemon: Ipv6Addr,
    start: Instant,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(start + delay)).await;
    let mut buf = vec![0u8; 2048];
    let (mut up, mut ever) = (false, false);
    loop {
        while let Some(t) = node.poll_transmit() {
            // A full socket drops the datagram, as the shell does: the
            // protocol repeats handshakes and hellos.
            let _ = sock.try_send_to(&t.payload, t.dst);
            node.recycle(t.payload);
        }
        while node.poll_tun_write().is_some() {}
        if up != node.link_up_to(&daemon) {
            up = !up;
            let ev = match (up, ever) {
                (true, false) => Event::First(start.elapsed()),
                (true, true) => Event::Up,
                (false, _) => Event::Down(start.elapsed()),
            };
            ever = true;
            let _ = events.send(ev);
        }
        let deadline = tokio::time::Instant::from_std(node.poll_timeout());
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    let _ = node.handle_datagram(Instant::now(), normalize(from), &buf[..n]);
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                node.handle_timeout(now);
                if let Some(limit) = node.record_seq_wanted(now) {
                    node.reserve_record_seq(limit);
                }
            }
            _ = stop.changed() => return,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let daemon = PeerUri::from_str(&args.uri).context("--uri")?;
    if daemon.endpoint.is_none() {
        bail!("--uri needs the daemon's endpoint");
    }
    let n = args.peers as usize;
    let t = Instant::now();
    let ids = identities(n, args.seed)?;
    println!("keys {n} {:.2}", t.elapsed().as_secs_f64());
    let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let ip = u32::from(args.first_addr) + (i as u32 % args.addrs);
        let local = SocketAddr::from((Ipv4Addr::from(ip), 0));
        let s = std::net::UdpSocket::bind(local).with_context(|| format!("binding {local}"))?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    let owns = socks
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<Vec<_>, _>>()?;
    let t = Instant::now();
    let created = Instant::now();
    // Each core signs its record here, before the clock starts.
    let nodes = parallel(ids, |i, id| {
        let mut seed = [0u8; 32];
        stream(args.seed, (2 << 32) + i as u64).fill_bytes(&mut seed);
        Node::new(id, 1, node_config(&daemon, owns[i], seed, unix), created)
    });
    println!("nodes {n} {:.2}", t.elapsed().as_secs_f64());
    let addr = daemon.node_id.overlay_address();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let socks = socks
            .into_iter()
            .map(UdpSocket::from_std)
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let start = Instant::now();
        println!(
            "start {:.3}",
            SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64()
        );
        let mut tasks = Vec::with_capacity(n);
        for (i, (node, sock)) in nodes.into_iter().zip(socks).enumerate() {
            let delay = match args.rate {
                0 => Duration::ZERO,
                r => Duration::from_secs_f64(i as f64 / f64::from(r)),
            };
            tasks.push(tokio::spawn(drive(
                node,
                delay,
                sock,
                addr,
                start,
                tx.clone(),
                stop_rx.clone(),
            )));
        }
        drop(tx);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let end = tokio::time::sleep(Duration::from_secs(args.secs));
        tokio::pin!(end);
        let (mut first, mut up, mut downs) = (0usize, 0usize, 0u64);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::First(at)) => {
                        first += 1;
                        up += 1;
                        if first % 100 == 0 || first == n {
                            println!("up {first} {:.3}", at.as_secs_f64());
                        }
                    }
                    Some(Event::Up) => up += 1,
                    Some(Event::Down(at)) => {
                        up -= 1;
                        downs += 1;
                        println!("down {up} {:.3}", at.as_secs_f64());
                    }
                    None => break,
                },
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                () = &mut end => break,
            }
        }
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        println!("end {up} {downs}");
        anyhow::Ok(())
    })
}
