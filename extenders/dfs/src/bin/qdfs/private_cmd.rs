//! `qdfs key`, `store`, `ls`, `fetch`, `share` and the private-storage part
//! of `qdfs serve` (holding others' shares, repairing the owner's).

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use qdfs::announce;
use qdfs::cap::Capability;
use qdfs::config::{Config, DEFAULT_CONTROL_SOCKET};
use qdfs::folder::{self, Listing, ListingEntry};
use qdfs::holder::{self, Holder, HolderRecord};
use qdfs::node::NodeClient;
use qdfs::owner::{self, IndexEntry, Net, OwnerKey};
use qdfs::private::Scheme;
use qdfs::repair::Repairer;
use qdfs::seal::StateKey;
use qdfs::server::Server;
use qdfs::store::write_atomic;
use serde_json::json;

use super::{data_dir, StoreArgs};

/// Where the owner's things are and how to reach holders.
#[derive(clap::Args, Clone)]
pub struct OwnerArgs {
    /// The owner key file (default: DATA_DIR/owner.key, or the
    /// configuration's owner_key).
    #[arg(long)]
    owner_key: Option<PathBuf>,
    /// A holder to place shares on or read them from, ADDR:PORT (repeatable).
    #[arg(long = "holder")]
    holders: Vec<SocketAddr>,
    /// Do not use the node's DHT (holders, shares and the index pointer).
    #[arg(long)]
    no_dht: bool,
    /// The node's control socket (for the DHT).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

/// The private-storage commands.
#[derive(Subcommand)]
pub enum PrivateCmd {
    /// Manage the owner key.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Encrypt a file (or each file of a folder), erasure-code it and place
    /// its shares on holders; prints the private ID (and, for a folder,
    /// each file's ID and name).
    Store {
        /// The file or folder to store.
        path: PathBuf,
        /// The scheme, K-of-N (default: the configuration's, else 3-of-6).
        #[arg(long)]
        shares: Option<Scheme>,
        #[command(flatten)]
        owner: OwnerArgs,
    },
    /// List the owner's stored files (ID, size, date, name).
    Ls {
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        owner: OwnerArgs,
    },
    /// Fetch a stored file or folder by its private ID or name (owner) or a
    /// capability (anyone: `qdfs:cap:` for a file, `qdfs:folder:` for a
    /// folder, written as a directory).
    Fetch {
        /// A private ID from `qdfs ls`, or a `qdfs:cap:` capability.
        what: String,
        /// Where to write it.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Replace an existing output.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        owner: OwnerArgs,
    },
    /// Print a read capability for one stored file, or for a stored folder
    /// (its entry `NAME/` in `qdfs ls`): whoever holds it reads exactly that.
    Share {
        /// The private ID from `qdfs ls`.
        id: String,
        #[command(flatten)]
        owner: OwnerArgs,
    },
}

/// `qdfs key ...`.
#[derive(Subcommand)]
pub enum KeyCmd {
    /// Create a new owner key (never over an existing one). With the node
    /// running it is sealed under the node's key for QuantumDFS, so the
    /// data directory alone does not give it away; keep an exported copy.
    New {
        #[command(flatten)]
        owner: OwnerArgs,
    },
    /// Write the owner key as 32 plain bytes to a new file (mode 0600):
    /// the copy to keep offline, which lists and fetches your files on any
    /// node (`--owner-key FILE`).
    Export {
        /// The new file.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        #[command(flatten)]
        owner: OwnerArgs,
    },
}

struct Ctx {
    dir: PathBuf,
    key_path: PathBuf,
    net: Net,
    scheme: Scheme,
    /// The node's key for QuantumDFS state (None: no node answered).
    state: Option<StateKey>,
}

/// The key QuantumDFS's state is sealed under: derived from the node's
/// extender key for "qdfs", asked over the control socket (`None` when no
/// node answers; the socket is the trust boundary, as for every extender).
pub fn state_key(socket: &Path) -> Option<StateKey> {
    if !socket.exists() {
        return None;
    }
    match NodeClient::new(socket).api().extender_key("qdfs") {
        Ok(k) => Some(StateKey::derive(&k.key)),
        Err(e) => {
            tracing::debug!("no state key from the node: {e}");
            None
        }
    }
}

fn ctx(a: &OwnerArgs) -> Result<Ctx> {
    let dir = data_dir(&a.store)?;
    let cfg = a.store.config.as_deref().map(Config::load).transpose()?;
    let key_path = a
        .owner_key
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.private.owner_key.clone()))
        .unwrap_or_else(|| dir.join("owner.key"));
    let mut holders = a.holders.clone();
    if let Some(c) = &cfg {
        holders.extend(c.private.holders.iter().copied());
    }
    let socket = a
        .control_socket
        .clone()
        .or_else(|| cfg.as_ref().map(|c| c.control_socket.clone()))
        .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into());
    let node = (!a.no_dht && socket.exists()).then(|| NodeClient::new(&socket));
    let scheme = cfg.as_ref().map(|c| c.private.scheme).unwrap_or_default();
    Ok(Ctx {
        state: state_key(&socket),
        net: Net::new(holders, node, dir.join("private-work")),
        dir,
        key_path,
        scheme,
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs one private-storage command.
pub fn run(cmd: PrivateCmd) -> Result<()> {
    match cmd {
        PrivateCmd::Key {
            cmd: KeyCmd::New { owner },
        } => {
            let c = ctx(&owner)?;
            OwnerKey::create(&c.key_path, c.state.as_ref())?;
            println!("{}", c.key_path.display());
            if c.state.is_some() {
                eprintln!("sealed under this node's key; keep an exported copy (qdfs key export -o FILE): it is the only way to your stored files");
            } else {
                eprintln!("no node answered, so the key is NOT sealed; keep a copy: it is the only way to your stored files");
            }
            Ok(())
        }
        PrivateCmd::Key {
            cmd: KeyCmd::Export { output, owner },
        } => {
            let c = ctx(&owner)?;
            OwnerKey::load(&c.key_path, c.state.as_ref())?.export(&output)?;
            println!("{}", output.display());
            Ok(())
        }
        PrivateCmd::Store {
            path,
            shares,
            owner,
        } => {
            let c = ctx(&owner)?;
            let key = OwnerKey::load_or_create(&c.key_path, true, c.state.as_ref())?;
            let meta = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
            let top = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "stored".into());
            let mut files = Vec::new();
            if meta.is_dir() {
                walk(&path, &top, 0, &mut files)?;
            } else if meta.is_file() {
                files.push((path.clone(), top.clone()));
            } else {
                bail!("{}: neither a file nor a folder", path.display());
            }
            // The index first: a store must never drop existing entries.
            let (mut index, prev) =
                owner::load_index(&key, &c.dir, &c.net).context("reading the owner index")?;
            let scheme = shares.unwrap_or(c.scheme);
            let mut lines = Vec::new();
            let mut listing = Listing {
                v: 1,
                entries: Vec::new(),
            };
            for (file, name) in files {
                let f = File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                let size = f.metadata()?.len();
                let cap = owner::store(f, size, scheme, &c.net)
                    .with_context(|| format!("storing {}", file.display()))?;
                let entry = IndexEntry {
                    name,
                    size,
                    date: now_secs(),
                    cap: cap.to_text(),
                };
                lines.push(if meta.is_dir() {
                    format!("{}  {}", entry.id(), entry.name)
                } else {
                    entry.id()
                });
                if let Some(rel) = entry.name.strip_prefix(&format!("{top}/")) {
                    listing.entries.push(ListingEntry {
                        path: rel.to_string(),
                        size,
                        cap: entry.cap.clone(),
                    });
                }
                index.entries.push(entry);
            }
            if meta.is_dir() {
                // The folder itself: its listing, stored like a file, for
                // a folder capability (`qdfs share TOP/`).
                let bytes = listing.encode();
                let total = listing.entries.iter().map(|e| e.size).sum();
                let cap = owner::store(&bytes[..], bytes.len() as u64, scheme, &c.net)
                    .context("storing the folder's listing")?;
                let entry = IndexEntry {
                    name: format!("{top}/"),
                    size: total,
                    date: now_secs(),
                    cap: cap.to_text(),
                };
                lines.push(format!("{}  {}", entry.id(), entry.name));
                index.entries.push(entry);
            }
            owner::save_index(&key, &c.dir, &c.net, &index, prev.as_ref(), scheme)
                .context("the files' shares are placed but the owner index was not updated")?;
            for l in lines {
                println!("{l}");
            }
            Ok(())
        }
        PrivateCmd::Ls { json, owner } => {
            let c = ctx(&owner)?;
            let key = OwnerKey::load(&c.key_path, c.state.as_ref())?;
            let (index, _) = owner::load_index(&key, &c.dir, &c.net)?;
            for e in &index.entries {
                if json {
                    println!(
                        "{}",
                        json!({"id": e.id(), "name": e.name, "size": e.size, "date": e.date})
                    );
                } else {
                    println!("{}  {:>14}  {}  {}", e.id(), e.size, e.date, e.name);
                }
            }
            Ok(())
        }
        PrivateCmd::Fetch {
            what,
            output,
            force,
            owner,
        } => {
            let c = ctx(&owner)?;
            let (cap, is_folder) = if what.starts_with(qdfs::cap::PREFIX) {
                (what.parse::<Capability>()?, false)
            } else if what.starts_with(folder::PREFIX) {
                (folder::parse_text(&what)?, true)
            } else {
                let key = OwnerKey::load(&c.key_path, c.state.as_ref())?;
                let (index, _) = owner::load_index(&key, &c.dir, &c.net)?;
                let e = index
                    .find(&what)
                    .ok_or_else(|| owner::OwnerError::UnknownFile(what.clone()))?;
                (e.capability()?, e.name.ends_with('/'))
            };
            if is_folder {
                let n = folder::read(&cap, &output, force, &c.net)?;
                eprintln!("{n} files written under {}", output.display());
            } else {
                owner::read(&cap, &output, force, &c.net)?;
            }
            Ok(())
        }
        PrivateCmd::Share { id, owner } => {
            let c = ctx(&owner)?;
            let key = OwnerKey::load(&c.key_path, c.state.as_ref())?;
            let (index, _) = owner::load_index(&key, &c.dir, &c.net)?;
            let e = index
                .find(&id)
                .ok_or_else(|| owner::OwnerError::UnknownFile(id.clone()))?;
            if e.name.ends_with('/') {
                println!("{}", folder::to_text(&e.capability()?));
            } else {
                println!("{}", e.capability()?.to_text());
            }
            Ok(())
        }
    }
}

/// Most files one `qdfs store` of a folder stores.
const MAX_FOLDER_FILES: usize = 10_000;

/// The files under `dir` (symbolic links and special files skipped), each
/// with its name in the index: `prefix/relative/path`.
fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    if depth > 64 {
        bail!("{}: folders nested deeper than 64", dir.display());
    }
    let mut items: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    items.sort_by_key(|e| e.file_name());
    for item in items {
        let name = item.file_name().to_string_lossy().into_owned();
        let ft = item.file_type()?;
        let rel = format!("{prefix}/{name}");
        if ft.is_dir() {
            walk(&item.path(), &rel, depth + 1, out)?;
        } else if ft.is_file() {
            if out.len() == MAX_FOLDER_FILES {
                bail!("{}: more than {MAX_FOLDER_FILES} files", dir.display());
            }
            out.push((item.path(), rel));
        } else {
            tracing::warn!(path = %item.path().display(), "skipping (not a file or folder)");
        }
    }
    Ok(())
}

/// The private-storage part of `qdfs serve`: keeps others' shares within
/// `quota` (announcing this node as a holder), and with an owner key
/// repairs the owner's files. Counters go to DATA_DIR/holder.json and
/// DATA_DIR/repair.json for `qdfs status`.
pub fn attach(
    cfg: &Config,
    server: Server,
    node: &NodeClient,
    local: SocketAddr,
) -> Result<Server> {
    let holder = Arc::new(Holder::open(server.store(), cfg.private.quota)?);
    let server = server.with_holder(Arc::clone(&holder));
    {
        let (holder, path) = (Arc::clone(&holder), cfg.data_dir.join("holder.json"));
        std::thread::spawn(move || loop {
            let v = serde_json::to_vec(&holder.snapshot()).unwrap_or_default();
            if let Err(e) = write_atomic(&path, &v) {
                tracing::warn!("writing holder stats: {e}");
            }
            std::thread::sleep(Duration::from_millis(500));
        });
    }
    if cfg.announce && cfg.private.quota > 0 {
        let (holder, node) = (Arc::clone(&holder), node.clone());
        std::thread::spawn(move || holder_announcer(&holder, &node, local));
    }
    let key_path = cfg
        .private
        .owner_key
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("owner.key"));
    if key_path.exists() {
        let key = OwnerKey::load(&key_path, state_key(&cfg.control_socket).as_ref())?;
        let node = cfg
            .control_socket
            .exists()
            .then(|| NodeClient::new(&cfg.control_socket));
        let net = Net::new(
            cfg.private.holders.clone(),
            node,
            cfg.data_dir.join("private-work"),
        );
        let mut r = Repairer::new(
            key,
            cfg.data_dir.clone(),
            net,
            cfg.private.repair_grace,
            cfg.private.scheme,
        );
        let (interval, path) = (
            cfg.private.repair_interval,
            cfg.data_dir.join("repair.json"),
        );
        tracing::info!(?interval, grace = ?cfg.private.repair_grace, "repairing the owner's files");
        std::thread::spawn(move || loop {
            std::thread::sleep(interval);
            match r.round(Instant::now()) {
                Ok(0) => {}
                Ok(n) => tracing::info!(shares = n, "repair round re-created shares"),
                Err(e) => tracing::warn!("repair round: {e}"),
            }
            let v = serde_json::to_vec(&r.stats).unwrap_or_default();
            if let Err(e) = write_atomic(&path, &v) {
                tracing::warn!("writing repair stats: {e}");
            }
        });
    }
    Ok(server)
}

/// Publishes this node's holder record (port and free quota) every ten
/// minutes, under the shard its address picks.
fn holder_announcer(holder: &Holder, node: &NodeClient, local: SocketAddr) {
    loop {
        let own = match local.ip() {
            IpAddr::V6(a) if a.octets()[0] == 0xfc => Ok(a),
            _ => node.overlay_address(),
        };
        let wait = match own {
            Ok(own) => {
                let key = holder::holders_key(announce::shard_for(&own));
                let rec = HolderRecord {
                    port: local.port(),
                    free: holder.free(),
                };
                match node.dht_put(
                    announce::NAMESPACE,
                    &key,
                    &rec.encode(),
                    announce::RECORD_TTL_SECS,
                ) {
                    Ok(n) if n > 0 => {
                        tracing::info!(stored_at = n, free = rec.free, "announced as holder");
                        600
                    }
                    Ok(_) => 10,
                    Err(e) => {
                        tracing::warn!("announcing as holder: {e}");
                        30
                    }
                }
            }
            Err(_) => 30,
        };
        std::thread::sleep(Duration::from_secs(wait));
    }
}

/// The private-storage counters for `qdfs status`.
pub fn status(dir: &Path) -> serde_json::Value {
    let read = |name: &str| -> serde_json::Value {
        std::fs::read(dir.join(name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    json!({"holder": read("holder.json"), "repair": read("repair.json")})
}
