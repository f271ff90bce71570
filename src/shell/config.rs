//! The node's TOML configuration: parsed and validated in full before
//! anything is started. Every error is one line naming the key.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::proto::access::{AccessConfig, AccessList, Rule, DEFAULT_LINKS_PER_SUBNET};
use crate::proto::identity::ROLE_RELAY;
use crate::proto::node::{
    link_mtu, CompressionPolicy, NodeConfig, PeerConfig, RelayConfig, TrafficConfig,
};
use crate::proto::route::{Policy, Route, RoutePolicy};
use crate::proto::wire::IPV6_MIN_MTU;
use crate::proto::{NodeId, PeerUri};
pub use qgate_api::Preset;

/// Default UDP port.
pub const DEFAULT_PORT: u16 = 7300;
/// Default listen address: dual-stack, so both underlays work.
pub const DEFAULT_LISTEN: &str = "[::]:7300";
/// Default TUN name.
pub const DEFAULT_TUN: &str = "qg0";
/// Default keepalive, seconds.
pub const DEFAULT_KEEPALIVE: u16 = 10;
/// Default bound on links.
pub const DEFAULT_MAX_LINKS: usize = 1024;
/// Most data-path threads (`link.workers`).
pub const MAX_WORKERS: usize = 64;
/// Where the CLI looks for the configuration when neither `--config` nor
/// `QGATE_CONFIG` names one: the state directory the install uses.
pub const DEFAULT_CONFIG: &str = "/var/lib/qgate/qgate.toml";
/// Default security preset.
pub const DEFAULT_PRESET: Preset = Preset::Balanced;
/// Default UDP port of LAN discovery announcements.
pub const DEFAULT_LAN_PORT: u16 = 7301;
/// Underlay MTU assumed for the default TUN MTU.
pub const UNDERLAY_MTU: usize = 1500;

/// A configuration error: which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The key (dotted path), or a line reference when the TOML itself is broken.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    key_file: Option<PathBuf>,
    listen: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    log: Option<String>,
    #[serde(default)]
    tun: RawTun,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    link: RawLink,
    #[serde(default)]
    compression: RawCompression,
    #[serde(default)]
    advertise: Vec<String>,
    #[serde(default)]
    discovery: RawDiscovery,
    role: Option<String>,
    preset: Option<String>,
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    traffic: RawTraffic,
    #[serde(default)]
    access: RawAccess,
    user: Option<String>,
    #[serde(default)]
    inbound: RawInbound,
    metrics: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    link_allow: Vec<String>,
    #[serde(default)]
    link_deny: Vec<String>,
    #[serde(default)]
    relay_allow: Vec<String>,
    #[serde(default)]
    relay_deny: Vec<String>,
    links_per_subnet: Option<usize>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    allow: Option<Vec<String>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    enabled: Option<bool>,
    bandwidth: Option<String>,
    distinct_subnets: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    hops: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawTraffic {
    noise_rate: Option<f64>,
    noise_size: Option<String>,
    large_cells_only: Option<bool>,
    compress: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    lan: Option<bool>,
    lan_port: Option<u16>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawTun {
    name: Option<String>,
    mtu: Option<u32>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawLink {
    keepalive: Option<u16>,
    max_links: Option<usize>,
    workers: Option<usize>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawCompression {
    enabled: Option<bool>,
    adaptive: Option<bool>,
    #[serde(default)]
    off: Vec<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file was read from.
    pub path: PathBuf,
    /// State directory (the sealed vault).
    pub state_dir: PathBuf,
    /// Master key file (None: the state directory's default, DIR.key).
    pub key_file: Option<PathBuf>,
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Configured peers.
    pub peers: Vec<PeerUri>,
    /// Log filter (tracing-subscriber syntax).
    pub log: String,
    /// TUN interface name.
    pub tun_name: String,
    /// TUN MTU.
    pub mtu: usize,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Keepalive seconds.
    pub keepalive: u16,
    /// Most links.
    pub max_links: usize,
    /// Data-path threads; links are spread over them (`link.workers`).
    pub workers: usize,
    /// Compression policy.
    pub compression: CompressionPolicy,
    /// Endpoints published in the node's record (empty: the listen address
    /// if it names one, else what neighbours observe).
    pub advertise: Vec<SocketAddr>,
    /// LAN discovery by IPv6 link-local multicast.
    pub lan: bool,
    /// UDP port of LAN announcements.
    pub lan_port: u16,
    /// `role = "relay"`: no TUN, forwards only.
    pub relay_only: bool,
    /// The security preset.
    pub preset: Preset,
    /// Route policy.
    pub routes: RoutePolicy,
    /// Relay settings.
    pub relay: RelayConfig,
    /// Circuit traffic shaping.
    pub traffic: TrafficConfig,
    /// Who may link to the node and relay through it.
    pub access: AccessConfig,
    /// `user = "NAME"`: the unprivileged user `qgate run` switches to once
    /// its sockets and TUN are set up (None: keep the current uid).
    pub user: Option<String>,
    /// `[inbound] allow`: what new connections from the overlay may reach
    /// this node (besides ICMPv6 echo and replies to its own connections).
    pub inbound: Inbound,
    /// `metrics = "127.0.0.1:9469"`: where `GET /metrics` is served (None: off).
    pub metrics: Option<SocketAddr>,
}

/// What the inbound filter lets through, besides ICMPv6 echo requests and
/// packets of connections this node opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inbound {
    /// `"all"`: no filter at all.
    pub all: bool,
    /// Allowed destination ports.
    pub rules: Vec<PortRule>,
}

/// One `[inbound] allow` entry other than `"all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRule {
    /// Transport protocol.
    pub proto: Transport,
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (equal to `first` for one port).
    pub last: u16,
}

/// Transport protocol of a [`PortRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Transport {
    /// The protocol's name in nftables and in the config.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

impl std::fmt::Display for PortRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}/{}", self.proto.name(), self.first)
        } else {
            write!(f, "{}/{}-{}", self.proto.name(), self.first, self.last)
        }
    }
}

/// Parses one `[inbound] allow` entry other than `"all"`: `"tcp/22"`,
/// `"udp/9999"`, `"tcp/8000-8100"`.
fn parse_port_rule(entry: &str) -> Result<PortRule, String> {
    let bad = || {
        format!(
            "{entry:?} is not \"all\", \"tcp/PORT\", \"udp/PORT\" or a range like \"tcp/8000-8100\""
        )
    };
    let (proto, ports) = entry.split_once('/').ok_or_else(bad)?;
    let proto = match proto {
        "tcp" => Transport::Tcp,
        "udp" => Transport::Udp,
        _ => return Err(bad()),
    };
    let port = |s: &str| -> Result<u16, String> {
        match s.parse::<u16>() {
            Ok(0) => Err(format!("{entry:?}: port 0 is not a port")),
            Ok(p) => Ok(p),
            Err(_) => Err(bad()),
        }
    };
    let (first, last) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!("{entry:?}: the range runs backwards"));
    }
    Ok(PortRule { proto, first, last })
}

/// Whether `name` looks like a Unix user name (what useradd accepts by
/// default): 1-32 of a-z, 0-9, '_', '-', not starting with '-' or a digit.
fn valid_user_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && !name.starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

impl Config {
    /// The protocol core's part.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            peers: self
                .peers
                .iter()
                .map(|uri| PeerConfig { uri: uri.clone() })
                .collect(),
            compression: self.compression.clone(),
            keepalive: self.keepalive,
            mtu: self.mtu,
            max_links: self.max_links,
            advertise: if self.advertise.is_empty() && !self.listen.ip().is_unspecified() {
                vec![self.listen]
            } else {
                self.advertise.clone()
            },
            roles: if self.relay.enabled { ROLE_RELAY } else { 0 },
            routes: self.routes.clone(),
            relay: self.relay.clone(),
            traffic: self.traffic.clone(),
            has_tun: !self.relay_only,
            access: self.access.clone(),
            rng_seed: {
                let mut seed = [0u8; 32];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
                seed
            },
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// The default TUN MTU for a listen address: the direct-link budget of
/// [`link_mtu`] for a 1500-byte underlay, IPv6 outer headers if the socket
/// can carry IPv6 (1420), IPv4 otherwise (1440).
pub fn default_mtu(listen: &SocketAddr) -> usize {
    link_mtu(UNDERLAY_MTU, listen.is_ipv6())
}

/// Reads and validates a configuration file, and the inbound drop-ins
/// beside it (see [`INBOUND_DIR`]).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        key: "(file)".into(),
        message: format!("cannot read: {e}"),
    })?;
    let mut config = parse(&text, path)?;
    let dir = path.parent().unwrap_or(Path::new(".")).join(INBOUND_DIR);
    for rule in load_inbound_dir(&dir)? {
        if !config.inbound.rules.contains(&rule) {
            config.inbound.rules.push(rule);
        }
    }
    Ok(config)
}

/// The directory beside the configuration file whose `*.toml` files each
/// add ports to `[inbound] allow`: `allow = ["tcp/7400"]`, nothing else.
/// An extender's installer writes one (QuantumDFS: `qdfs.toml`) so that its
/// port opens without anyone editing `qgate.toml`; removing the file closes
/// it again at the node's next start. `"all"` is refused there: only
/// `qgate.toml` may turn the filter off. The directory lives in the state
/// directory (the node's user's, mode 0700/0710), so only root and the
/// node's user can add a file.
pub const INBOUND_DIR: &str = "inbound.d";
/// Files read from [`INBOUND_DIR`] at most (more is a configuration error).
const MAX_INBOUND_FILES: usize = 64;
/// Largest drop-in file read.
const MAX_INBOUND_FILE: u64 = 16 * 1024;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawDropIn {
    allow: Vec<String>,
}

/// The port rules of the `*.toml` files in `dir`, in file-name order
/// (nothing when the directory does not exist).
pub fn load_inbound_dir(dir: &Path) -> Result<Vec<PortRule>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ConfigError {
                file: dir.display().to_string(),
                key: "(directory)".into(),
                message: format!("cannot read: {e}"),
            })
        }
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.len() > MAX_INBOUND_FILES {
        return Err(ConfigError {
            file: dir.display().to_string(),
            key: "(directory)".into(),
            message: format!("more than {MAX_INBOUND_FILES} drop-in files"),
        });
    }
    let mut rules = Vec::new();
    for path in files {
        let file = path.display().to_string();
        let err = |key: &str, message: String| ConfigError {
            file: file.clone(),
            key: key.into(),
            message,
        };
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| {
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(f, MAX_INBOUND_FILE),
                    &mut text,
                )
            })
            .map_err(|e| err("(file)", format!("cannot read: {e}")))?;
        let raw: RawDropIn = toml::from_str(&text).map_err(|e| toml_error(&file, &text, e))?;
        for (i, entry) in raw.allow.iter().enumerate() {
            let key = format!("allow[{i}]");
            if entry == "all" {
                return Err(err(
                    &key,
                    "\"all\" is only accepted in the main configuration's [inbound] allow".into(),
                ));
            }
            rules.push(parse_port_rule(entry).map_err(|m| err(&key, m))?);
        }
    }
    Ok(rules)
}

fn toml_error(file: &str, text: &str, e: toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace('\n', " ");
    let key = match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("");
            let key = line.split('=').next().unwrap_or("").trim();
            if line.contains('=') && !key.is_empty() {
                format!("{key} (line {line_no})")
            } else {
                format!("line {line_no}")
            }
        }
        None => "(file)".into(),
    };
    ConfigError {
        file: file.into(),
        key,
        message,
    }
}

/// Parses and validates configuration text; `path` is used for messages and
/// to resolve relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&file, text, e))?;
    let err = |key: &str, message: String| ConfigError {
        file: file.clone(),
        key: key.into(),
        message,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

    let state_dir = resolve(raw.state_dir.ok_or_else(|| {
        err(
            "state_dir",
            "missing: the directory holding the node's keys".into(),
        )
    })?);
    let key_file = raw.key_file.map(resolve);
    let listen_s = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
    let listen: SocketAddr = listen_s.parse().map_err(|_| {
        err(
            "listen",
            format!("{listen_s:?} is not IP:PORT (IPv6 in brackets, e.g. \"[::]:7300\")"),
        )
    })?;
    let mut peers = Vec::new();
    for (i, p) in raw.peers.iter().enumerate() {
        let uri: PeerUri = p
            .parse()
            .map_err(|e| err(&format!("peers[{i}]"), format!("{e}")))?;
        peers.push(uri);
    }
    let tun_name = raw.tun.name.unwrap_or_else(|| DEFAULT_TUN.into());
    if tun_name.is_empty()
        || tun_name.len() > 15
        || !tun_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(err(
            "tun.name",
            format!("{tun_name:?} is not an interface name (1-15 of a-z, 0-9, '-', '_', '.')"),
        ));
    }
    let mtu = match raw.tun.mtu {
        None => default_mtu(&listen),
        Some(m) if (IPV6_MIN_MTU as u32..=65535).contains(&m) => m as usize,
        Some(m) => {
            return Err(err(
                "tun.mtu",
                format!("{m} is out of range: IPv6 needs at least {IPV6_MIN_MTU}, at most 65535"),
            ))
        }
    };
    let control_socket = resolve(
        raw.control
            .socket
            .unwrap_or_else(|| state_dir.join("control.sock")),
    );
    // sockaddr_un holds 108 bytes including the terminating NUL.
    if control_socket.as_os_str().len() > 107 {
        return Err(err(
            "control.socket",
            format!(
                "path is {} bytes; a Unix socket path holds at most 107",
                control_socket.as_os_str().len()
            ),
        ));
    }
    let log = raw.log.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log).is_err() {
        return Err(err(
            "log",
            format!("{log:?} is not a log filter (e.g. \"info\" or \"debug,boringtun=warn\")"),
        ));
    }
    let keepalive = raw.link.keepalive.unwrap_or(DEFAULT_KEEPALIVE);
    let max_links = raw.link.max_links.unwrap_or(DEFAULT_MAX_LINKS);
    if max_links == 0 || max_links > 1 << 20 {
        return Err(err(
            "link.max_links",
            format!("{max_links} is out of range 1..=1048576"),
        ));
    }
    let workers = raw.link.workers.unwrap_or(1);
    if workers == 0 || workers > MAX_WORKERS {
        return Err(err(
            "link.workers",
            format!("{workers} is out of range 1..={MAX_WORKERS}"),
        ));
    }
    let mut compression = CompressionPolicy {
        enabled: raw.compression.enabled.unwrap_or(true),
        adaptive: raw.compression.adaptive.unwrap_or(true),
        ..Default::default()
    };
    for (i, entry) in raw.compression.off.iter().enumerate() {
        let key = format!("compression.off[{i}]");
        if let Some((addr, len)) = entry.split_once('/') {
            let a: Ipv6Addr = addr
                .parse()
                .map_err(|_| err(&key, format!("{entry:?} is not an IPv6 prefix or node ID")))?;
            let l: u8 =
                len.parse().ok().filter(|l| *l <= 128).ok_or_else(|| {
                    err(&key, format!("{entry:?}: prefix length must be 0..=128"))
                })?;
            compression.off_prefixes.push((a, l));
        } else {
            let id = NodeId::parse(entry).map_err(|_| {
                err(
                    &key,
                    format!("{entry:?} is neither an IPv6 prefix (fc12::/16) nor a 64-hex-digit node ID"),
                )
            })?;
            compression.off_nodes.push(id);
        }
    }
    let mut advertise = Vec::new();
    for (i, a) in raw.advertise.iter().enumerate() {
        let ep: SocketAddr = a.parse().map_err(|_| {
            err(
                &format!("advertise[{i}]"),
                format!("{a:?} is not IP:PORT (IPv6 in brackets)"),
            )
        })?;
        if ep.ip().is_unspecified() || ep.port() == 0 {
            return Err(err(
                &format!("advertise[{i}]"),
                format!("{a:?}: an advertised endpoint needs a real address and port"),
            ));
        }
        advertise.push(ep);
    }
    if advertise.len() > crate::proto::identity::MAX_ENDPOINTS {
        return Err(err(
            "advertise",
            format!(
                "at most {} endpoints fit in a record",
                crate::proto::identity::MAX_ENDPOINTS
            ),
        ));
    }
    let lan = raw.discovery.lan.unwrap_or(false);
    let lan_port = raw.discovery.lan_port.unwrap_or(DEFAULT_LAN_PORT);
    if lan_port == 0 {
        return Err(err("discovery.lan_port", "0 is not a port".into()));
    }
    let relay_only = match raw.role.as_deref().unwrap_or("node") {
        "node" => false,
        "relay" => true,
        other => {
            return Err(err(
                "role",
                format!("{other:?} is neither \"node\" nor \"relay\""),
            ))
        }
    };
    let preset = match raw.preset.as_deref() {
        None => DEFAULT_PRESET,
        Some(name) => name
            .parse::<Preset>()
            .map_err(|e| err("preset", e.to_string()))?,
    };
    let (default_policy, mut traffic) = match preset {
        Preset::Fast => (Policy::Direct, TrafficConfig::default()),
        Preset::Balanced => (Policy::Prefer(1, 2), TrafficConfig::default()),
        Preset::Private => (
            Policy::Hops(2, 3),
            TrafficConfig {
                noise_rate: 2.0,
                noise_size: (64, 1200),
                always_large: true,
                compress: false,
            },
        ),
    };
    if let Some(r) = raw.traffic.noise_rate {
        if !(0.0..=1000.0).contains(&r) {
            return Err(err(
                "traffic.noise_rate",
                format!("{r} is out of range 0..=1000 cells/s"),
            ));
        }
        traffic.noise_rate = r;
    }
    if let Some(ns) = &raw.traffic.noise_size {
        let range = ns
            .split_once("..")
            .and_then(|(a, b)| {
                Some((
                    a.trim().parse::<usize>().ok()?,
                    b.trim().parse::<usize>().ok()?,
                ))
            })
            .filter(|(a, b)| a <= b && *b <= crate::proto::onion::MAX_DATA);
        traffic.noise_size = range.ok_or_else(|| {
            err(
                "traffic.noise_size",
                format!(
                    "{ns:?} is not \"MIN..MAX\" bytes with MIN ≤ MAX ≤ {}",
                    crate::proto::onion::MAX_DATA
                ),
            )
        })?;
    }
    if let Some(b) = raw.traffic.large_cells_only {
        traffic.always_large = b;
    }
    if let Some(b) = raw.traffic.compress {
        traffic.compress = b;
    }
    let bandwidth = match raw.relay.bandwidth.as_deref() {
        None | Some("unlimited") => None,
        Some(b) => Some(parse_bandwidth(b).ok_or_else(|| {
            err(
                "relay.bandwidth",
                format!("{b:?} is not \"unlimited\" or a rate like \"50Mbit\" or \"10MB\""),
            )
        })?),
    };
    let relay = RelayConfig {
        enabled: raw.relay.enabled.unwrap_or(true) || relay_only,
        bandwidth,
        distinct_subnets: raw.relay.distinct_subnets.unwrap_or(true),
    };
    if relay_only && raw.relay.enabled == Some(false) {
        return Err(err(
            "relay.enabled",
            "false, but role = \"relay\" does nothing else".into(),
        ));
    }
    let mut routes = Vec::new();
    for (i, r) in raw.route.iter().enumerate() {
        let key = format!("route[{i}]");
        let (a, l) = match r.prefix.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok().filter(|l| *l <= 128)),
            None => (r.prefix.as_str(), Some(128)),
        };
        let prefix: Ipv6Addr = a.parse().map_err(|_| {
            err(
                &format!("{key}.prefix"),
                format!("{:?} is not an IPv6 prefix", r.prefix),
            )
        })?;
        let len = l.ok_or_else(|| {
            err(
                &format!("{key}.prefix"),
                format!("{:?}: length must be 0..=128", r.prefix),
            )
        })?;
        let policy = Policy::parse(&r.hops).map_err(|e| err(&format!("{key}.hops"), e))?;
        routes.push(Route {
            prefix,
            len,
            policy,
        });
    }
    let routes = RoutePolicy {
        routes,
        default: default_policy,
    };
    let rules = |key: &str, list: &[String]| -> Result<Vec<Rule>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, r)| {
                r.parse()
                    .map_err(|e| err(&format!("access.{key}[{i}]"), format!("{e}")))
            })
            .collect()
    };
    let access = AccessConfig {
        link: AccessList {
            allow: rules("link_allow", &raw.access.link_allow)?,
            deny: rules("link_deny", &raw.access.link_deny)?,
        },
        relay: AccessList {
            allow: rules("relay_allow", &raw.access.relay_allow)?,
            deny: rules("relay_deny", &raw.access.relay_deny)?,
        },
        links_per_subnet: raw
            .access
            .links_per_subnet
            .unwrap_or(DEFAULT_LINKS_PER_SUBNET),
    };
    let user = match raw.user {
        Some(u) if !valid_user_name(&u) => {
            return Err(err(
                "user",
                format!("{u:?} is not a user name (1-32 of a-z, 0-9, '_', '-')"),
            ))
        }
        u => u,
    };
    let mut inbound = Inbound::default();
    let allow = raw.inbound.allow.unwrap_or_default();
    for (i, entry) in allow.iter().enumerate() {
        let key = format!("inbound.allow[{i}]");
        if entry == "all" {
            if allow.len() > 1 {
                return Err(err(&key, "\"all\" allows everything: list it alone".into()));
            }
            inbound.all = true;
        } else {
            inbound
                .rules
                .push(parse_port_rule(entry).map_err(|m| err(&key, m))?);
        }
    }
    let metrics = match raw.metrics {
        Some(m) => Some(super::metrics::check_addr(&m).map_err(|e| err("metrics", e))?),
        None => None,
    };
    Ok(Config {
        metrics,
        access,
        user,
        inbound,
        relay_only,
        preset,
        routes,
        relay,
        traffic,
        advertise,
        lan,
        lan_port,
        path: path.to_path_buf(),
        state_dir,
        key_file,
        listen,
        peers,
        log,
        tun_name,
        mtu,
        control_socket,
        keepalive,
        max_links,
        workers,
        compression,
    })
}

/// Parses a rate: "50Mbit", "1Gbit", "800kbit" (bits/s) or "10MB", "512KB"
/// (bytes/s); returns bytes per second.
fn parse_bandwidth(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let bytes = match unit.trim() {
        "bit" => n / 8.0,
        "kbit" | "Kbit" => n * 1e3 / 8.0,
        "Mbit" | "mbit" => n * 1e6 / 8.0,
        "Gbit" | "gbit" => n * 1e9 / 8.0,
        "B" => n,
        "KB" | "kB" => n * 1e3,
        "MB" => n * 1e6,
        "GB" => n * 1e9,
        _ => return None,
    };
    (bytes >= 1.0 && bytes.is_finite()).then_some(bytes as u64)
}

/// The commented default configuration `qgate init` writes.
/// `key_file`: the key file to name in the config (None: a commented line).
pub fn default_text(
    state_dir: &Path,
    listen: &SocketAddr,
    key_file: Option<&Path>,
    user: Option<&str>,
    advertise: Option<&SocketAddr>,
) -> String {
    let advertise_line = match advertise {
        Some(a) => format!("advertise = [\"{a}\"]"),
        None => "# advertise = [\"198.18.0.1:7300\"]".to_string(),
    };
    let key_line = match key_file {
        Some(k) => format!("key_file = {:?}", k.display().to_string()),
        None => "# key_file = \"/media/usb/qgate.key\"".to_string(),
    };
    let user_line = match user {
        Some(u) => format!("user = {u:?}"),
        None => "# user = \"qgate\"".to_string(),
    };
    format!(
        r#"# QuantumGate node configuration. Every key is optional except state_dir;
# the values shown commented out are the defaults. `qgate run --config FILE`
# validates all of it before starting anything.

# Where the node keeps its state: the sealed vault (keys, peers, ...).
state_dir = "{state}"

# The master key that unseals the vault. Keep it off the machine when you can
# (e.g. a USB stick that must be mounted when the node starts); `qgate run
# --key-file` overrides this, `--passphrase-fd N` replaces it for a vault
# sealed with a passphrase. Default: the file beside state_dir, "<state_dir>.key".
{key_line}

# UDP address links arrive on: IPv4 ("0.0.0.0:7300") or IPv6/dual-stack ("[::]:7300").
listen = "{listen}"

# Nodes to link to at start: peer URIs as printed by `qgate init` / `qgate id`.
# Any node will do; the network is open, so nodes not listed here may link to
# this one too once their signed record checks out.
peers = [
]

# Endpoints other nodes reach this one at, published in its signed record so
# that anyone can link to it. Default: the listen address if it names one,
# else the address the node's neighbours see its packets come from.
{advertise_line}

# Log filter: error, warn, info, debug, trace (tracing-subscriber syntax).
# log = "info"

# "node": a TUN interface, programs talk through it, and it relays for others.
# "relay": a routing gateway; no TUN, no CAP_NET_ADMIN, it only forwards.
# role = "node"

# Security preset, setting routes and traffic shape together:
#   "fast"      direct links, lz4 on
#   "balanced"  1..2 relays per circuit whenever the node knows enough usable
#               relays, else direct ("1..2 or direct"); lz4 on
#   "private"   2..3 relays and never direct, cover traffic (2 noise
#               cells/s), lz4 off, every cell the large size
# On a network with too few relays, "balanced" goes direct and "private"
# answers "destination unreachable"; `qgate status` says which and why
# (`qgate circuits` lists each destination). Every value can be overridden
# in [relay], [[route]], [traffic].
# preset = "{preset}"

# Unprivileged user to run as once the sockets, the TUN and the inbound
# filter are set up (then every capability is dropped and no-new-privileges
# set). Unset: keep the current user, still dropping every capability.
# `qgate init --user NAME` hands the state directory to that user and sets
# this line.
{user_line}

# Serve the counters `qgate status` shows in the Prometheus/OpenMetrics text
# format at http://ADDRESS/metrics. Off unless set; loopback addresses only
# (127.0.0.0/8 or [::1]): the endpoint has no authentication.
# metrics = "127.0.0.1:{metrics_port}"

[inbound]
# New connections from the overlay that may reach this node. Every node of
# the network can send to its overlay address, so by default only ICMPv6
# echo requests get in (plus replies to connections this node opened, and
# ICMPv6 errors about them). Entries: "tcp/22", "udp/9999", "tcp/8000-8100",
# or "all" (no filter). Enforced with nftables on the TUN interface.
# Extenders' installers add their ports in inbound.d/*.toml beside this file
# (`allow = ["tcp/7400"]`; `scripts/install --with-dfs` writes qdfs.toml).
# allow = []

[tun]
# name = "{tun}"
# MTU of the overlay interface. The default is what a direct link carries over
# a 1500-byte underlay: 1440 with an IPv4 listen address, 1420 with IPv6
# (outer IP + UDP 8 + WireGuard 32). Smaller paths are learnt per peer.
# mtu = {mtu}

[control]
# Unix socket for `qgate status` (mode 0660).
# socket = "{sock}"

[link]
# WireGuard persistent keepalive in seconds (0 = off). A neighbour silent for
# this long plus 5 s is handshaked again, which is how a restarted neighbour
# is noticed.
# keepalive = {ka}
# Most links at once (links other nodes open take at most 7/8 of them).
# max_links = {ml}
# Data-path threads. Links are spread over them (one link is one thread's),
# so a node with many busy links can use more cores; one is best where
# the node's peers share its cores.
# workers = 1

[compression]
# Payloads are lz4-compressed before encryption when that saves bytes.
# Compress-then-encrypt lets an observer learn something from packet sizes
# (the VORACLE attack on VPNs): if secrets and attacker-chosen data share a
# connection, turn compression off for those peers, prefixes, or entirely.
# enabled = true
# lz4 costs CPU time: while the data path rather than the link is the limit
# (a fast LAN), compression pauses, and resumes once the link is the limit
# again (`qgate status`, "data path"). false compresses whenever it saves
# bytes, e.g. on a metered link.
# adaptive = true
# off = ["fc12:3456::/32", "<64-hex-digit node ID>"]

[discovery]
# Find nodes on the same LAN segment by IPv6 link-local multicast (ff02::7167).
# Off by default: announcing tells everyone on the segment a node runs here.
# lan = false
# lan_port = {lan_port}

[relay]
# Carry circuits for others (the relay role is published in the record).
# enabled = true
# Cap on forwarded traffic: "unlimited", or a rate like "50Mbit" or "10MB".
# bandwidth = "unlimited"
# No two relays of a circuit (nor a relay and either end) in one IPv4 /16 or
# IPv6 /48. Turn off only for test networks that live in a few subnets.
# distinct_subnets = true

[traffic]
# Cover traffic: noise cells per second on each circuit in use, and their
# payload size range in bytes; relays can't tell them from data.
# noise_rate = 0.0
# noise_size = "64..1200"
# Send every cell at the large size (packet sizes then say nothing).
# large_cells_only = false
# lz4 on circuit payloads (off in "private": sizes can leak content).
# compress = true

[access]
# Who may link to this node, and who may build circuits through it. Entries
# are node IDs (64 hex) or IP networks of underlay addresses ("198.51.100.0/24",
# "2001:db8::/32", one address). Deny wins; a non-empty allow list admits only
# what it names. Empty lists (the default) leave the network open.
# link_allow = []
# link_deny = []
# relay_allow = []
# relay_deny = []
# Links at most per IPv4 /24 or IPv6 /48 of underlay address (0: no limit).
# links_per_subnet = {lps}

# Routes: which destinations go direct and which through relays. First match
# wins; without a match the preset decides. prefix is an overlay prefix or a
# single address; hops is "direct", "MIN..MAX" relays (1..3, never direct),
# or "MIN..MAX or direct" (relays when enough are known, else direct).
# [[route]]
# prefix = "fc00::/8"
# hops = "2..3"
"#,
        preset = DEFAULT_PRESET,
        state = state_dir.display(),
        key_line = key_line,
        user_line = user_line,
        advertise_line = advertise_line,
        listen = listen,
        tun = DEFAULT_TUN,
        mtu = default_mtu(listen),
        sock = state_dir.join("control.sock").display(),
        ka = DEFAULT_KEEPALIVE,
        ml = DEFAULT_MAX_LINKS,
        lan_port = DEFAULT_LAN_PORT,
        lps = DEFAULT_LINKS_PER_SUBNET,
        metrics_port = super::metrics::DEFAULT_PORT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/qgate/qgate.toml"))
    }

    #[test]
    fn access_lists() {
        let base = "state_dir = \"/s\"\n";
        let c = p(base).unwrap();
        assert!(c.access.link.is_open() && c.access.relay.is_open());
        assert_eq!(c.access.links_per_subnet, DEFAULT_LINKS_PER_SUBNET);
        let id = "cd".repeat(32);
        let c = p(&format!(
            "{base}[access]\nlink_deny = [\"198.51.100.0/24\", \"{id}\"]\nrelay_allow = [\"2001:db8::/32\"]\nlinks_per_subnet = 4\n"
        ))
        .unwrap();
        assert_eq!(c.access.link.deny.len(), 2);
        assert_eq!(c.access.relay.allow.len(), 1);
        assert_eq!(c.access.links_per_subnet, 4);
        assert_eq!(c.node_config().access, c.access);
        let e = p(&format!(
            "{base}[access]\nrelay_deny = [\"10.0.0.0/8\", \"nope\"]\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "access.relay_deny[1]", "{e}");
        let e = p(&format!("{base}[access]\nlink_alow = []\n")).unwrap_err();
        assert!(e.to_string().contains("link_alow"), "{e}");
    }

    #[test]
    fn default_text_parses() {
        let c = p(&default_text(
            Path::new("/var/lib/qgate"),
            &"0.0.0.0:7300".parse().unwrap(),
            Some(Path::new("/var/lib/qgate.key")),
            Some("qgate"),
            Some(&"198.18.0.9:7300".parse().unwrap()),
        ))
        .unwrap();
        assert_eq!(c.user.as_deref(), Some("qgate"));
        assert_eq!(c.advertise, vec!["198.18.0.9:7300".parse().unwrap()]);
        assert_eq!(c.key_file.as_deref(), Some(Path::new("/var/lib/qgate.key")));
        assert_eq!(c.mtu, 1440);
        assert_eq!(c.tun_name, "qg0");
        assert_eq!(c.control_socket, Path::new("/var/lib/qgate/control.sock"));
        let c = p(&default_text(
            Path::new("/x"),
            &"[::]:7300".parse().unwrap(),
            None,
            None,
            None,
        ))
        .unwrap();
        assert_eq!(c.key_file, None);
        assert_eq!(c.mtu, 1420);
        assert_eq!(c.user, None);
        assert_eq!(c.inbound, Inbound::default());
    }

    #[test]
    fn user_and_inbound_parse() {
        let c = p("state_dir='/x'\nuser = 'qgate'\n[inbound]\nallow = ['tcp/22', 'udp/9999', 'tcp/8000-8100']\n").unwrap();
        assert_eq!(c.user.as_deref(), Some("qgate"));
        assert!(!c.inbound.all);
        let shown: Vec<String> = c.inbound.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(shown, ["tcp/22", "udp/9999", "tcp/8000-8100"]);
        assert_eq!(
            c.inbound.rules[2],
            PortRule {
                proto: Transport::Tcp,
                first: 8000,
                last: 8100
            }
        );
        let c = p("state_dir='/x'\n[inbound]\nallow = ['all']\n").unwrap();
        assert!(c.inbound.all && c.inbound.rules.is_empty());
        let c = p("state_dir='/x'\n[inbound]\nallow = []\n").unwrap();
        assert_eq!(c.inbound, Inbound::default());
    }

    #[test]
    fn inbound_drop_ins_add_ports() {
        let dir = std::env::temp_dir().join(format!("qgate-dropin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(INBOUND_DIR)).unwrap();
        let config = dir.join("qgate.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = '{}'\n[inbound]\nallow = ['tcp/22']\n",
                dir.display()
            ),
        )
        .unwrap();
        let d = dir.join(INBOUND_DIR);
        std::fs::write(d.join("qdfs.toml"), "allow = ['tcp/7400', 'tcp/22']\n").unwrap();
        std::fs::write(d.join("other.toml"), "allow = ['udp/9000-9010']\n").unwrap();
        std::fs::write(d.join("README"), "not read").unwrap();
        let c = load(&config).unwrap();
        let shown: Vec<String> = c.inbound.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(shown, ["tcp/22", "udp/9000-9010", "tcp/7400"]);
        for (text, key) in [
            ("allow = ['all']\n", "allow[0]"),
            ("allow = ['tcp/0']\n", "allow[0]"),
            ("allow = ['tcp/1']\nextra = 1\n", "extra"),
            ("allow = 'tcp/1'\n", "allow"),
        ] {
            std::fs::write(d.join("qdfs.toml"), text).unwrap();
            let e = load(&config).unwrap_err();
            assert!(e.file.ends_with("qdfs.toml"), "{e}");
            assert!(e.key.contains(key), "{text}: {e}");
        }
        std::fs::remove_dir_all(d).unwrap();
        let c = load(&config).unwrap();
        assert_eq!(c.inbound.rules.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_user_and_inbound_name_the_key() {
        for (text, key) in [
            ("user = ''\n", "user"),
            ("user = 'Root'\n", "user"),
            ("user = '-x'\n", "user"),
            ("user = 'a b'\n", "user"),
            ("user = 7\n", "user"),
            ("[inbound]\nallow = ['tcp']\n", "inbound.allow[0]"),
            ("[inbound]\nallow = ['icmp/1']\n", "inbound.allow[0]"),
            (
                "[inbound]\nallow = ['tcp/22', 'tcp/0']\n",
                "inbound.allow[1]",
            ),
            ("[inbound]\nallow = ['tcp/65536']\n", "inbound.allow[0]"),
            ("[inbound]\nallow = ['udp/9-1']\n", "inbound.allow[0]"),
            ("[inbound]\nallow = ['udp/1-2-3']\n", "inbound.allow[0]"),
            ("[inbound]\nallow = ['tcp/ 22']\n", "inbound.allow[0]"),
            ("[inbound]\nallow = ['tcp/22', 'all']\n", "inbound.allow[1]"),
            ("[inbound]\nallow = 'all'\n", "allow"),
            ("[inbound]\ndeny = []\n", "deny"),
        ] {
            let e = p(&format!("state_dir='/x'\n{text}")).unwrap_err();
            let line = e.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(e.key.contains(key), "{text:?}: {line}");
        }
    }

    #[test]
    fn errors_name_the_key_on_one_line() {
        for (text, key) in [
            ("state_dir='/x'\nbogus = 1\n", "bogus"),
            ("state_dir='/x'\nlisten = 'nope'\n", "listen"),
            ("state_dir='/x'\n[tun]\nmtu = 100\n", "tun.mtu"),
            ("state_dir='/x'\n[tun]\nmtu = 'big'\n", "mtu"),
            (
                "state_dir='/x'\n[tun]\nname = 'way-too-long-a-name'\n",
                "tun.name",
            ),
            ("state_dir='/x'\npeers = ['qg://2/x/y']\n", "peers[0]"),
            (
                "state_dir='/x'\n[compression]\noff = ['zz']\n",
                "compression.off[0]",
            ),
            ("listen = '[::]:1'\n", "state_dir"),
            ("state_dir='/x'\n[link]\nkeepalive = -1\n", "keepalive"),
            ("state_dir='/x'\nlog = 'info,,=='\n", "log"),
        ] {
            let e = p(text).unwrap_err();
            let line = e.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(e.key.contains(key), "{text:?}: {line}");
        }
    }

    #[test]
    fn presets_parse_by_name_and_unknown_ones_list_the_valid_ones() {
        assert_eq!(p("state_dir='/x'\n").unwrap().preset, Preset::Balanced);
        for (name, want) in [
            ("fast", Preset::Fast),
            ("balanced", Preset::Balanced),
            ("private", Preset::Private),
        ] {
            let c = p(&format!("state_dir='/x'\npreset = '{name}'\n")).unwrap();
            assert_eq!(c.preset, want);
            assert_eq!(c.preset.to_string(), name);
        }
        let e = p("state_dir='/x'\npreset = 'Fast'\n").unwrap_err();
        assert_eq!(e.key, "preset");
        let line = e.to_string();
        assert!(
            line.ends_with("\"Fast\" is not one of \"fast\", \"balanced\", \"private\""),
            "{line}"
        );
    }
}
