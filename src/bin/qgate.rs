//! `qgate`: the QuantumGate node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use clap::{Parser, Subcommand};
use serde_json::json;

use qgate::proto::{Identity, PeerUri};
use qgate::shell::vault::{self, KeyOptions, KeySource, Vault};
use qgate::shell::{config, privilege, run, state, status};
use qgate_api::{Request, Response};

/// QuantumGate node: an encrypted peer-to-peer IPv6 overlay.
///
/// Typical use, as root: `qgate init --state-dir /var/lib/qgate --user qgate
/// --listen 0.0.0.0:7300 --advertise IP:7300`, put another node's peer URI
/// under `peers` in /var/lib/qgate/qgate.toml, then `qgate run` (needs
/// CAP_NET_ADMIN) and `qgate status`. Commands that need a config use
/// --config FILE, else $QGATE_CONFIG, else /var/lib/qgate/qgate.toml.
/// Logs go to stderr; QGATE_LOG (e.g. "debug") overrides the config's `log`.
#[derive(Parser)]
#[command(name = "qgate", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The configuration file, for commands that talk to or run a node.
#[derive(clap::Args, Clone, Debug, Default)]
struct ConfigArg {
    /// Configuration file [default: $QGATE_CONFIG, else
    /// /var/lib/qgate/qgate.toml when it exists].
    #[arg(long, value_name = "FILE", env = "QGATE_CONFIG", hide_env = true)]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// The file named, or the install's default when it exists.
    fn path(&self) -> Result<PathBuf, Failure> {
        if let Some(p) = &self.config {
            return Ok(p.clone());
        }
        let dflt = Path::new(config::DEFAULT_CONFIG);
        match std::fs::metadata(dflt) {
            Ok(_) => return Ok(dflt.to_path_buf()),
            // The state directory is 0700: an operator in group qgate can
            // talk to the node but not read its config.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Failure::Usage(format!(
                    "cannot read {}: run as root, or set QGATE_CONFIG to a copy you can read",
                    config::DEFAULT_CONFIG
                )))
            }
            Err(_) => {}
        }
        Err(Failure::Usage(format!(
            "no configuration file: pass --config FILE or set QGATE_CONFIG (there is no {}; `qgate init --state-dir /var/lib/qgate` makes one)",
            config::DEFAULT_CONFIG
        )))
    }

    fn load(&self) -> Result<config::Config, Failure> {
        load_config(&self.path()?)
    }
}

/// Where the master key that unseals the state directory comes from.
#[derive(clap::Args, Clone, Debug, Default)]
struct KeyArgs {
    /// Master key file (default: the config's `key_file`, else the file
    /// beside the state directory, DIR.key). Keep it on removable media.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Read a passphrase (one line) from this open file descriptor instead
    /// of using a key file; it is stretched with Argon2id.
    #[arg(long, value_name = "N", conflicts_with = "key_file")]
    passphrase_fd: Option<i32>,
    /// Prompt for a passphrase on the terminal.
    #[arg(long, conflicts_with_all = ["key_file", "passphrase_fd"])]
    ask_passphrase: bool,
}

impl KeyArgs {
    fn options(&self) -> KeyOptions {
        KeyOptions {
            key_file: self.key_file.clone(),
            passphrase_fd: self.passphrase_fd,
            ask_passphrase: self.ask_passphrase,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the node's keys, sealed in DIR/vault under a master key, and a
    /// commented default config (DIR/qgate.toml); print the overlay address
    /// and peer URI. Without a key option a new key file is written beside
    /// the state directory (DIR.key). Never overwrites keys.
    Init {
        /// State directory to create (mode 0700).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// UDP address to listen on, put in the config and the peer URI.
        #[arg(long, value_name = "IP:PORT", default_value = config::DEFAULT_LISTEN)]
        listen: SocketAddr,
        #[command(flatten)]
        key: KeyArgs,
        /// Hand the state directory (and a key file made here) to this user,
        /// the one `qgate run` switches to (config `user`).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// The address and port other nodes reach this one at, when that is
        /// not the listen address (e.g. listening on 0.0.0.0): written to
        /// the config (`advertise`) and put in the peer URI.
        #[arg(long, value_name = "IP:PORT")]
        advertise: Option<SocketAddr>,
    },
    /// Print the node ID, overlay address and peer URI of a state directory
    /// (unseals it: needs the key).
    Id {
        /// State directory [default: the configuration file's state_dir].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        key: KeyArgs,
        /// Print JSON: {"node_id", "address", "uri"}.
        #[arg(long)]
        json: bool,
    },
    /// Run the node in the foreground (needs CAP_NET_ADMIN, except with
    /// `role = "relay"`, which makes no TUN). Refuses to start without the
    /// right key, or if the vault fails authentication.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Master keys: make a key file, re-seal the state under a new key.
    Key {
        #[command(subcommand)]
        op: KeyOp,
    },
    /// Show the running node's identity, uptime and links.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Wait up to this many seconds for the node to come up.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
    },
    /// Show the nodes this node knows (its DHT routing table): bucket,
    /// endpoints, last seen, and where each entry came from (config, store,
    /// network, lan).
    Peers {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show circuits: those this node built (relays in order, age, bytes,
    /// state), those it carries as a relay (its two neighbours only), and
    /// those ending here (the authenticated source).
    Circuits {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Find a node's signed record in the DHT by node ID or overlay address.
    Lookup {
        #[command(flatten)]
        config: ConfigArg,
        /// Node ID (64 hex digits) or overlay address (fc..).
        target: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Store or fetch signed values in the DHT (for extenders): one entry
    /// per (namespace, key, publishing node).
    Dht {
        #[command(subcommand)]
        op: DhtOp,
    },
    /// Internal: the inbound filter's watcher, started by `qgate run`
    /// before it drops its privileges (see src/shell/filter.rs).
    #[command(name = "__filter-guard", hide = true)]
    FilterGuard {
        /// The nftables table (family inet) to delete.
        #[arg(long)]
        table: String,
        /// The nft program.
        #[arg(long)]
        nft: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyOp {
    /// Write a new random master key to PATH (mode 0600); never overwrites.
    New {
        /// Where to write it (e.g. on a USB stick).
        #[arg(long, value_name = "PATH")]
        key_file: PathBuf,
    },
    /// Re-seal the whole state under a new key: a complete new vault is
    /// written and synced, then swapped in with one atomic rename. A crash
    /// at any point leaves a vault that the old or the new key opens. The
    /// node must be stopped.
    Rotate {
        #[command(flatten)]
        config: ConfigArg,
        /// State directory (instead of the configuration file; wins over
        /// QGATE_CONFIG).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        key: KeyArgs,
        /// The new key file; created if it does not exist.
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "new_passphrase_fd"
        )]
        new_key_file: Option<PathBuf>,
        /// Seal with a passphrase read from this file descriptor instead.
        #[arg(long, value_name = "N", conflicts_with = "new_key_file")]
        new_passphrase_fd: Option<i32>,
    },
}

#[derive(Subcommand)]
enum DhtOp {
    /// Sign VALUE as this node and store it under NAMESPACE/KEY.
    Put {
        #[command(flatten)]
        config: ConfigArg,
        /// Namespace (1-32 bytes), e.g. an extender's name.
        namespace: String,
        /// Key (1-64 bytes).
        key: String,
        /// Value (at most 1024 bytes).
        value: String,
        /// Lifetime in seconds (at most 86400); the node re-stores it until then.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Print every publisher's value under NAMESPACE/KEY.
    Get {
        #[command(flatten)]
        config: ConfigArg,
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Exit code for bad configuration or usage.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("qgate: config error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Usage(e)) => {
            eprintln!("qgate: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(e)) => {
            // One line, each cause once: typed errors (qgate-api's) name
            // their source in their own message already.
            let mut msg = String::new();
            for cause in e.chain() {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = if msg.is_empty() {
                        c
                    } else {
                        format!("{msg}: {c}")
                    };
                }
            }
            eprintln!("qgate: {msg}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(config::ConfigError),
    Usage(String),
    Other(anyhow::Error),
}

impl From<qgate_api::Error> for Failure {
    fn from(e: qgate_api::Error) -> Self {
        Failure::Other(e.into())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

/// The control API client for the node `cfg` configures.
fn client(cfg: &config::Config) -> qgate_api::Client {
    qgate_api::Client::new(&cfg.control_socket)
}

/// Sends `req` to the node; its answer as the node wrote it (what `--json`
/// prints).
fn ask(cfg: &config::Config, req: &Request) -> Result<serde_json::Value, qgate_api::Error> {
    client(cfg).call(req)
}

/// Prints an answer: as the node wrote it with `--json`, else rendered from
/// its typed form by `render`.
fn show(
    req: &Request,
    raw: serde_json::Value,
    json: bool,
    render: impl FnOnce(Response) -> Option<String>,
) -> Result<(), Failure> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&raw).context("encoding")?
        );
        return Ok(());
    }
    let typed = Response::decode(req, raw).map_err(|e| qgate_api::Error::BadAnswer {
        command: req.command(),
        detail: e.to_string(),
    });
    match typed.map(render) {
        Ok(Some(text)) => {
            print!("{text}");
            Ok(())
        }
        Ok(None) => Err(Failure::Other(anyhow::anyhow!(
            "{}: unexpected answer from the node",
            req.command()
        ))),
        Err(e) => Err(Failure::Other(e.into())),
    }
}

fn load_config(path: &Path) -> Result<config::Config, Failure> {
    config::load(path).map_err(Failure::Config)
}

fn uri_for(id: &Identity, listen: Option<SocketAddr>) -> PeerUri {
    PeerUri {
        node_id: id.node_id(),
        link_key: id.link_public(),
        endpoint: listen.filter(|l| !l.ip().is_unspecified()),
    }
}

/// `qgate key ...`.
fn key_op(op: KeyOp) -> Result<(), Failure> {
    match op {
        KeyOp::New { key_file } => {
            vault::generate_key_file(&key_file)?;
            println!("new key file {} (mode 0600)", key_file.display());
            Ok(())
        }
        KeyOp::Rotate {
            config,
            state_dir,
            key,
            new_key_file,
            new_passphrase_fd,
        } => {
            let (state_dir, cfg_key) = match state_dir {
                Some(d) => (d, None),
                None => {
                    let cfg = config.load()?;
                    (cfg.state_dir, cfg.key_file)
                }
            };
            let mut old = key.options();
            if old.key_file.is_none() && old.passphrase_fd.is_none() && !old.ask_passphrase {
                old.key_file = cfg_key;
            }
            let lock = vault::StateLock::take(&state_dir)?;
            let old = old.for_open(&state_dir)?;
            let new = match (new_key_file, new_passphrase_fd) {
                (_, Some(fd)) => KeySource::Passphrase(vault::read_passphrase_fd(fd)?),
                (Some(p), None) => {
                    if !p.exists() {
                        vault::generate_key_file(&p)?;
                        println!("new key file {} (mode 0600)", p.display());
                    }
                    KeySource::File(p)
                }
                (None, None) => unreachable!("clap requires one of them"),
            };
            // Fault injection for tests: QGATE_FAULT=rotate-after-STEP ends
            // the process right after that step, as a crash would.
            let fault = std::env::var("QGATE_FAULT").unwrap_or_default();
            let after = |step: vault::RotateStep| -> Result<()> {
                if fault == format!("rotate-after-{}", step.name()) {
                    eprintln!("qgate: fault injected after the {} step", step.name());
                    std::process::exit(86);
                }
                Ok(())
            };
            let id = vault::rotate(&state_dir, &lock, &old, &new, &after)?;
            println!(
                "{} is now sealed with {} (key {}); the old key no longer opens it",
                state_dir.display(),
                new.describe(),
                vault::short_id(&id)
            );
            if let KeySource::File(p) = &new {
                println!(
                    "start the node with --key-file {} (or set key_file in the config)",
                    p.display()
                );
            }
            Ok(())
        }
    }
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.cmd {
        Cmd::Init {
            state_dir,
            listen,
            key,
            user,
            advertise,
        } => {
            if let Some(a) = advertise.filter(|a| a.ip().is_unspecified() || a.port() == 0) {
                return Err(Failure::Usage(format!(
                    "--advertise {a}: other nodes need a real address and port"
                )));
            }
            if vault::layout(&state_dir) != vault::Layout::Empty {
                return Err(Failure::Other(anyhow::anyhow!(
                    "{} already holds a node's keys; refusing to overwrite them (`qgate id --state-dir {}` prints them)",
                    state_dir.display(),
                    state_dir.display()
                )));
            }
            // Check the user before writing anything.
            if let Some(name) = &user {
                privilege::lookup_user(name)?;
            }
            let (source, said) = key.options().for_create(&state_dir)?;
            let id = Identity::generate(&mut rand_core::OsRng).context("generating keys")?;
            let store = Vault::create(&state_dir, &source, &id)?;
            store.close();
            let key_path = match &source {
                KeySource::File(p) => Some(std::fs::canonicalize(p).unwrap_or(p.clone())),
                KeySource::Passphrase(_) => None,
            };
            let cfg_path = state_dir.join(state::CONFIG_FILE);
            let wrote_config = if cfg_path.exists() {
                false
            } else {
                let abs = std::fs::canonicalize(&state_dir).unwrap_or(state_dir.clone());
                state::write_new(
                    &cfg_path,
                    config::default_text(
                        &abs,
                        &listen,
                        key_path.as_deref(),
                        user.as_deref(),
                        advertise.as_ref(),
                    )
                    .as_bytes(),
                    0o644,
                )?;
                true
            };
            if let Some(name) = &user {
                privilege::hand_over(&state_dir, name)?;
                // The node reads its key file after it switched to that
                // user; a file system without owners (a FAT stick) needs
                // mount options instead (uid=, gid=).
                if let Some(k) = &key_path {
                    if let Err(e) = privilege::hand_over(k, name) {
                        println!("note     could not hand {} to {name}: {e:#}", k.display());
                    }
                }
            }
            let uri = uri_for(&id, advertise.or(Some(listen)));
            println!("node ID  {}", id.node_id());
            println!("address  {}", id.overlay_address());
            println!("peer URI {uri}");
            println!("key      {said}");
            if uri.endpoint.is_none() {
                println!(
                    "         (no endpoint: listening on {listen}, the URI can't say where to reach this node; give others {uri}/IP:{} with this machine's address, or run init with --advertise IP:{})",
                    listen.port(),
                    listen.port()
                );
            }
            if wrote_config {
                // The install's path needs no --config on later commands.
                let abs_cfg = std::fs::canonicalize(&cfg_path).unwrap_or(cfg_path.clone());
                let run = if abs_cfg == Path::new(config::DEFAULT_CONFIG) {
                    "qgate run".to_string()
                } else {
                    format!("qgate run --config {}", cfg_path.display())
                };
                println!(
                    "config   {} (put peer URIs under `peers`, open ports under [inbound], then `{run}`)",
                    cfg_path.display(),
                );
            } else {
                println!(
                    "config   {} already exists, left as it is",
                    cfg_path.display()
                );
            }
            Ok(())
        }
        Cmd::Id {
            state_dir,
            config,
            key,
            json,
        } => {
            let (state_dir, cfg) = match state_dir {
                Some(d) => {
                    let cfg = config::load(&d.join(state::CONFIG_FILE)).ok();
                    (d, cfg)
                }
                None => {
                    let cfg = config.load()?;
                    (cfg.state_dir.clone(), Some(cfg))
                }
            };
            let mut opts = key.options();
            if opts.key_file.is_none() && opts.passphrase_fd.is_none() && !opts.ask_passphrase {
                opts.key_file = cfg.as_ref().and_then(|c| c.key_file.clone());
            }
            let source = opts.for_open(&state_dir)?;
            let store = Vault::open(&state_dir, &source)?;
            let id = store.identity()?;
            store.close();
            // The first advertised endpoint, else the listen address.
            let endpoint = cfg
                .as_ref()
                .and_then(|c| c.advertise.first().copied().or(Some(c.listen)));
            let uri = uri_for(&id, endpoint);
            if json {
                println!(
                    "{}",
                    json!({"node_id": id.node_id().to_string(), "address": id.overlay_address().to_string(), "uri": uri.to_string()})
                );
            } else {
                println!("node ID  {}", id.node_id());
                println!("address  {}", id.overlay_address());
                println!("peer URI {uri}");
            }
            Ok(())
        }
        Cmd::FilterGuard { table, nft } => {
            qgate::shell::filter::guard_main(&table, &nft)?;
            Ok(())
        }
        Cmd::Run { config, key } => {
            let cfg = config.load()?;
            let filter = std::env::var("QGATE_LOG").unwrap_or_else(|_| cfg.log.clone());
            // boringtun logs every handshake retry; keep it quiet unless asked.
            let filter = if filter.contains("boringtun") {
                filter
            } else {
                format!("{filter},boringtun=off")
            };
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_new(&filter)
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            // A panic on any thread (the data plane runs on its own) ends
            // the whole node, so a supervisor restarts it rather than
            // leaving a process that answers status but moves no packets.
            let default_hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                default_hook(info);
                std::process::exit(101);
            }));
            run::run(cfg, key.options())?;
            Ok(())
        }
        Cmd::Key { op } => key_op(op),
        Cmd::Status { config, json, wait } => {
            let cfg = config.load()?;
            let deadline = Instant::now() + Duration::from_secs_f64(wait.unwrap_or(0.0).max(0.0));
            let raw = loop {
                match ask(&cfg, &Request::Status) {
                    Ok(v) => break v,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Failure::Other(anyhow::Error::new(e).context(
                            if wait.is_some() {
                                "node did not come up in time"
                            } else {
                                "is the node running? (`qgate status --wait 10` waits for it)"
                            },
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            show(&Request::Status, raw, json, |r| match r {
                Response::Status(st) => Some(status::render(&st)),
                _ => None,
            })
        }
        Cmd::Peers { config, json } => {
            let cfg = config.load()?;
            let raw = ask(&cfg, &Request::Peers).context("is the node running?")?;
            show(&Request::Peers, raw, json, |r| match r {
                Response::Peers(p) => Some(status::render_peers(&p)),
                _ => None,
            })
        }
        Cmd::Circuits { config, json } => {
            let cfg = config.load()?;
            let raw = ask(&cfg, &Request::Circuits).context("is the node running?")?;
            show(&Request::Circuits, raw, json, |r| match r {
                Response::Circuits(c) => Some(status::render_circuits(&c)),
                _ => None,
            })
        }
        Cmd::Lookup {
            config,
            target,
            json,
        } => {
            let cfg = config.load()?;
            let parsed: qgate_api::Target = target
                .parse()
                .map_err(|e: String| anyhow::anyhow!("lookup: {e}"))?;
            let req = Request::Lookup { target: parsed };
            let raw = ask(&cfg, &req)?;
            let found = raw["found"].as_bool() == Some(true);
            show(&req, raw, json, |r| match r {
                Response::Lookup(l) => Some(status::render_lookup(&l)),
                _ => None,
            })?;
            if found {
                Ok(())
            } else {
                Err(Failure::Other(anyhow::anyhow!("{target}: not found")))
            }
        }
        Cmd::Dht { op } => match op {
            DhtOp::Put {
                config,
                namespace,
                key,
                value,
                ttl,
            } => {
                let cfg = config.load()?;
                let stored = client(&cfg).dht_put(&namespace, &key, value.as_bytes(), Some(ttl))?;
                if stored.stored_at > 0 {
                    println!(
                        "stored {namespace}/{key} at {} nodes for {ttl} s",
                        stored.stored_at
                    );
                } else {
                    // Kept here and in the vault all the same: it goes out
                    // when a lookup slot frees, and every 30 min.
                    println!(
                        "kept {namespace}/{key} here for {ttl} s; no other node has it yet \
                         (none answered, or the node was busy): it is sent again when a \
                         lookup slot is free and every 30 min"
                    );
                }
                Ok(())
            }
            DhtOp::Get {
                config,
                namespace,
                key,
                json,
            } => {
                let cfg = config.load()?;
                let req = Request::DhtGet {
                    namespace: namespace.clone(),
                    key: key.clone(),
                };
                let raw = ask(&cfg, &req)?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&raw).context("encoding")?
                    );
                    return Ok(());
                }
                let Ok(Response::DhtValues(got)) = Response::decode(&req, raw) else {
                    return Err(Failure::Other(anyhow::anyhow!(
                        "dht_get: unexpected answer from the node"
                    )));
                };
                if got.values.is_empty() {
                    return Err(Failure::Other(anyhow::anyhow!(
                        "{namespace}/{key}: no values"
                    )));
                }
                for x in got.values {
                    let shown = x.text().map(String::from).unwrap_or_else(|| {
                        format!(
                            "base64:{}",
                            base64::engine::general_purpose::STANDARD.encode(&x.value)
                        )
                    });
                    println!("{}  {}", &x.publisher.to_string()[..16], shown);
                }
                Ok(())
            }
        },
    }
}
