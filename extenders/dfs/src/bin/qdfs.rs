//! `qdfs`: the QuantumDFS command line.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use qdfs::announce::{self, ProviderRecord};
use qdfs::cache::PieceCache;
use qdfs::config::{Config, Listen, Role, DEFAULT_CONTROL_SOCKET};
use qdfs::fetch::{self, FetchError, FileReport, ProviderOutcome};
use qdfs::gateway::Gateway;
use qdfs::node::NodeClient;
use qdfs::progress::{Bar, JsonLines, Lines, Progress};
use qdfs::server::Server;
use qdfs::store::{write_atomic, Store};
use qdfs::Id;
use serde_json::json;

#[path = "qdfs/private_cmd.rs"]
mod private_cmd;

#[derive(Parser)]
#[command(
    name = "qdfs",
    version,
    about = "QuantumDFS: verified, content-addressed file sharing over QuantumGate"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct StoreArgs {
    /// The serve configuration whose data_dir holds the store.
    #[arg(long, conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// The store directory (default: $QDFS_DATA_DIR, else ~/.local/share/qdfs).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the store to other nodes (and announce it in the node's DHT).
    Serve {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Hash a file or folder into the store (no copy is made) and print its ID.
    Add {
        /// File or folder to share.
        path: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Fetch a file or folder by ID, verifying every chunk group.
    Get {
        /// The ID (64 hex digits).
        id: String,
        /// Where to write it (a folder is created as a directory).
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// A provider to fetch from, ADDR:PORT (repeatable).
        #[arg(long = "provider")]
        providers: Vec<SocketAddr>,
        /// Do not search the node's DHT for providers.
        #[arg(long)]
        no_dht: bool,
        /// The node's control socket (for the DHT).
        #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        /// Do not record the fetched files in the store (so do not provide them).
        #[arg(long)]
        no_provide: bool,
        /// Progress and result as JSON lines on stdout.
        #[arg(long)]
        json: bool,
        /// Most providers used at once.
        #[arg(long, default_value_t = 8)]
        max_providers: usize,
        /// Write even if the output exists and is not this fetch being
        /// resumed (replace a file, merge into a non-empty directory).
        #[arg(long)]
        force: bool,
        /// A caching gateway to ask first, ADDR:PORT (repeatable; added to
        /// the `gateways` of --config).
        #[arg(long = "gateway")]
        gateways: Vec<SocketAddr>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Private storage: key, store, ls, fetch, share.
    #[command(flatten)]
    Private(private_cmd::PrivateCmd),
    /// Show what the store holds and what `qdfs serve` has served.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn data_dir(args: &StoreArgs) -> Result<PathBuf> {
    if let Some(d) = &args.data_dir {
        return Ok(d.clone());
    }
    if let Some(c) = &args.config {
        return Ok(Config::load(c)?.data_dir);
    }
    if let Some(d) = std::env::var_os("QDFS_DATA_DIR") {
        return Ok(d.into());
    }
    let home = std::env::var_os("HOME").context("no --data-dir, QDFS_DATA_DIR or HOME")?;
    Ok(Path::new(&home).join(".local/share/qdfs"))
}

/// The node's control socket for commands that take `StoreArgs`: the
/// configuration's, else the default.
fn control_socket_of(args: &StoreArgs) -> Result<PathBuf> {
    Ok(match &args.config {
        Some(c) => Config::load(c)?.control_socket,
        None => DEFAULT_CONTROL_SOCKET.into(),
    })
}

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.cmd {
        Cmd::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            // One line: each cause once (the library's messages often
            // include their source already).
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            eprintln!("qdfs: {msg}");
            match e.downcast_ref::<FetchError>() {
                Some(FetchError::Interrupted { .. }) => 130,
                _ => 1,
            }
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve { config } => serve(&config),
        Cmd::Add { path, store } => {
            let state = private_cmd::state_key(&control_socket_of(&store)?);
            let store = Store::open(&data_dir(&store)?)?.with_state(state);
            let started = Instant::now();
            let (id, m) = store
                .add(&path)
                .with_context(|| format!("adding {}", path.display()))?;
            tracing::info!(
                "hashed {} bytes in {:.2} s",
                m.size(),
                started.elapsed().as_secs_f64()
            );
            println!("{id}");
            Ok(())
        }
        Cmd::Get {
            id,
            output,
            providers,
            no_dht,
            control_socket,
            no_provide,
            json,
            max_providers,
            force,
            gateways,
            store,
        } => {
            let id: Id = id.parse().context("bad ID")?;
            let mut opts = fetch::Options::new(providers);
            opts.max_providers = max_providers.max(1);
            opts.force = force;
            opts.gateways = configured_gateways(&store, gateways)?;
            if !no_dht && control_socket.exists() {
                for p in dht_providers(&NodeClient::new(&control_socket), &id) {
                    if !opts.providers.contains(&p) {
                        opts.providers.push(p);
                    }
                }
            }
            if !no_provide {
                let state = private_cmd::state_key(&control_socket);
                opts.provide = Some(Store::open(&data_dir(&store)?)?.with_state(state));
            }
            signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&opts.stop))?;
            signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&opts.stop))?;
            let progress: Box<dyn Progress> = if json {
                Box::new(JsonLines::new())
            } else if std::io::stderr().is_terminal() {
                Box::new(Bar::new())
            } else {
                Box::new(Lines::new())
            };
            let reports = fetch::get(&id, &output, &opts, progress.as_ref())?;
            print_reports(&id, &reports, json);
            Ok(())
        }
        Cmd::Status { json, store } => status(&data_dir(&store)?, json),
        Cmd::Private(cmd) => private_cmd::run(cmd),
    }
}

/// Providers of `id` found in the DHT (every shard asked at once).
fn dht_providers(node: &NodeClient, id: &Id) -> Vec<SocketAddr> {
    let handles: Vec<_> = (0..announce::SHARDS)
        .map(|shard| {
            let (node, key) = (node.clone(), announce::key(id, shard));
            std::thread::spawn(move || node.dht_get(announce::NAMESPACE, &key))
        })
        .collect();
    let mut values = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => values.extend(v),
            Ok(Err(e)) => tracing::warn!("DHT search: {e}"),
            Err(_) => {}
        }
    }
    // In random order: the record order (sorted by address) would let a
    // Sybil with low node IDs always be asked first.
    let seed = qdfs::owner::random_bytes::<32>();
    let mut ps = announce::providers(&values);
    ps.sort_by_cached_key(|p| *blake3::keyed_hash(&seed, p.to_string().as_bytes()).as_bytes());
    ps
}

fn print_reports(id: &Id, reports: &[FileReport], json: bool) {
    if json {
        println!("{}", json!({"event": "done", "id": id, "files": reports}));
        return;
    }
    let mut out = std::io::stdout().lock();
    for r in reports {
        let fetched = r.size - r.already;
        let _ = writeln!(
            out,
            "{}: {} bytes ({} already verified on disk), received {} bytes in {:.2} s ({:.1} MB/s); {} bytes over all runs",
            r.path.display(),
            r.size,
            r.already,
            r.received,
            r.seconds,
            fetched as f64 / r.seconds.max(1e-6) / 1e6,
            r.received_total
        );
        for p in &r.providers {
            let how = match &p.outcome {
                ProviderOutcome::Finished => "finished".to_string(),
                ProviderOutcome::Failed { error } => format!("failed: {error}"),
                ProviderOutcome::Dropped { bad_group } => {
                    format!("dropped: chunk group {bad_group} failed verification")
                }
            };
            let _ = writeln!(
                out,
                "  provider {}: {} groups, {} bytes, {how}",
                p.addr, p.groups, p.received
            );
        }
    }
}

fn serve(config: &Path) -> Result<()> {
    let cfg = Config::load(config)?;
    // What the store records about provided files is sealed under the
    // node's key for QuantumDFS (plain only when no node answers).
    let state = private_cmd::state_key(&cfg.control_socket);
    if state.is_none() {
        tracing::warn!(socket = %cfg.control_socket.display(), "no node answered for a state key: the store's records are not sealed at rest");
    }
    let store = Store::open(&cfg.data_dir)?.with_state(state);
    let node = NodeClient::new(&cfg.control_socket);
    let addr = match cfg.listen {
        Listen::Address(a) => a,
        Listen::NodeOverlay { port } => {
            let a = node
                .overlay_address()
                .context("asking the node for its overlay address (or set listen)")?;
            SocketAddr::new(IpAddr::V6(a), port)
        }
    };
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    println!("listening on {local}");
    std::io::stdout().flush()?;
    tracing::info!(%local, store = %cfg.data_dir.display(), "serving");
    let gateway = start_caching(&cfg, &store, &node, local)?;
    let mut server = Server::new(store, cfg.limits);
    if cfg.caching.role == Role::CacheGateway {
        server = server.with_gateway(Arc::clone(&gateway));
    }
    let server = Arc::new(private_cmd::attach(&cfg, server, &node, local)?);
    {
        let server = Arc::clone(&server);
        let path = cfg.data_dir.join("stats.json");
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let mut v = serde_json::to_value(server.stats.snapshot()).unwrap_or_default();
            v["gateway"] = serde_json::to_value(gateway.snapshot()).unwrap_or_default();
            let v = serde_json::to_vec(&v).unwrap_or_default();
            if let Err(e) = write_atomic(&path, &v) {
                tracing::warn!("writing stats: {e}");
            }
        });
    }
    if cfg.announce {
        let (store, node) = (server.store().clone(), node.clone());
        std::thread::spawn(move || announcer(&store, &node, local));
    }
    server.run(listener);
    Ok(())
}

/// Publishes the service record (`qgate.service`/`qdfs`: this port) and a
/// provider record for every ID in the store, new ones within ten seconds,
/// all of them again every [`announce::REPUBLISH_SECS`].
fn announcer(store: &Store, node: &NodeClient, local: SocketAddr) {
    let mut announced: std::collections::HashMap<Id, Instant> = Default::default();
    let mut service_at: Option<Instant> = None;
    let mut warned = false;
    loop {
        if service_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(announce::REPUBLISH_SECS)) {
            match node.announce_service(local.port(), announce::RECORD_TTL_SECS) {
                Ok(n) if n > 0 => {
                    tracing::info!(port = local.port(), stored_at = n, "service announced");
                    service_at = Some(Instant::now());
                }
                Ok(_) => tracing::info!("service record stored nowhere yet; will retry"),
                Err(e) => tracing::warn!("announcing the service: {e}"),
            }
        }
        let own = match local.ip() {
            IpAddr::V6(a) if a.octets()[0] == 0xfc => Ok(a),
            _ => node.overlay_address(),
        };
        match (own, store.ids()) {
            (Ok(own), Ok(ids)) => {
                let shard = announce::shard_for(&own);
                let value = ProviderRecord { port: local.port() }.encode();
                for id in ids {
                    let due = announced.get(&id).is_none_or(|t| {
                        t.elapsed() >= Duration::from_secs(announce::REPUBLISH_SECS)
                    });
                    if !due {
                        continue;
                    }
                    let key = announce::key(&id, shard);
                    match node.dht_put(announce::NAMESPACE, &key, &value, announce::RECORD_TTL_SECS)
                    {
                        Ok(0) => {
                            // Nobody took it (the node has no DHT peers
                            // yet): try again next round.
                            tracing::info!(%id, "announce stored nowhere yet; will retry");
                        }
                        Ok(n) => {
                            tracing::info!(%id, stored_at = n, "announced");
                            announced.insert(id, Instant::now());
                        }
                        Err(e) => {
                            tracing::warn!(%id, "announcing: {e}");
                            break;
                        }
                    }
                }
            }
            (Err(e), _) if !warned => {
                tracing::warn!("not announcing (no node to ask): {e}");
                warned = true;
            }
            (_, Err(e)) => tracing::warn!("listing the store: {e}"),
            _ => {}
        }
        std::thread::sleep(Duration::from_secs(10));
    }
}

fn status(dir: &Path, json: bool) -> Result<()> {
    if !dir.exists() {
        bail!("no store at {}", dir.display());
    }
    let store = Store::open(dir)?;
    let ids = store.ids()?;
    let stats: serde_json::Value = std::fs::read(dir.join("stats.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    let private = private_cmd::status(dir);
    if json {
        println!(
            "{}",
            json!({"data_dir": dir, "provided": ids.len(), "served": stats,
                   "cache": stats["gateway"]["cache"], "private": private})
        );
    } else {
        println!("store     {}", dir.display());
        println!("provided  {} manifests (files and folders)", ids.len());
        match stats.as_object() {
            Some(o) => {
                for (k, v) in o {
                    println!("{k:<17} {v}");
                }
            }
            None => println!("served    (no `qdfs serve` has run on this store)"),
        }
        for part in ["holder", "repair"] {
            if let Some(o) = private[part].as_object() {
                for (k, v) in o {
                    println!("{part}.{k:<17} {v}");
                }
            }
        }
    }
    Ok(())
}

/// Gateways from `--gateway` and the `gateways` of `--config`.
fn configured_gateways(store: &StoreArgs, given: Vec<SocketAddr>) -> Result<Vec<SocketAddr>> {
    let mut out = given;
    if let Some(c) = &store.config {
        for g in Config::load(c)?.caching.gateways {
            if !out.contains(&g) {
                out.push(g);
            }
        }
    }
    Ok(out)
}

/// The chunk cache (wiped and opened under DATA_DIR/cache), the gateway
/// over it (upstream: `upstream` and the DHT), and the HTTP gateway if
/// configured.
fn start_caching(
    cfg: &Config,
    store: &Store,
    node: &NodeClient,
    local: SocketAddr,
) -> Result<Arc<Gateway>> {
    let c = &cfg.caching;
    let dir = cfg.data_dir.join("cache");
    let cache = PieceCache::open(&dir, c.cache_bytes)
        .with_context(|| format!("opening the cache in {}", dir.display()))?;
    let lookup: Option<qdfs::gateway::Lookup> = cfg.control_socket.exists().then(|| {
        let node = node.clone();
        Box::new(move |id: &Id| {
            dht_providers(&node, id)
                .into_iter()
                .filter(|p| *p != local)
                .collect()
        }) as qdfs::gateway::Lookup
    });
    let gw = Arc::new(Gateway::new(
        store.clone(),
        cache,
        c.upstream.clone(),
        lookup,
    ));
    if let Some(http) = c.http {
        let mut addrs = vec![http];
        if c.http_overlay {
            addrs.push(SocketAddr::new(local.ip(), http.port()));
        }
        for a in addrs {
            let bound = qdfs::http::spawn(a, Arc::clone(&gw))
                .with_context(|| format!("binding the HTTP gateway on {a}"))?;
            println!("http on {bound}");
        }
        std::io::stdout().flush()?;
    }
    Ok(gw)
}
