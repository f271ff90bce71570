//! The whole-node scenario: a network of real nodes joins through a few
//! well-known ones, sources build circuits of 1–3 relays to random
//! destinations by sending packets to them, then a third of the nodes leave
//! at once and the broken circuits are rebuilt.
//!
//! Timeline (virtual): nodes start over [`JOIN`]; the network settles; the
//! DHT's background lookups are counted over [`WINDOW`] as a baseline; every
//! source sends a test packet each [`PROBE_EVERY`] from then on; after
//! [`WINDOW`] a third of the nodes (never a pair's end) leave; the run ends
//! [`AFTER_CHURN`] later.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use qgate::proto::access::AccessConfig;
use qgate::proto::identity::ROLE_RELAY;
use qgate::proto::node::{CompressionPolicy, RelayConfig, TrafficConfig};
use qgate::proto::route::{Policy, Route, RoutePolicy};
use qgate::proto::{NodeConfig, NodeId, PeerConfig, PeerUri};

use crate::net::{endpoint, Net};
use crate::{keys, pct, Rng};

/// Nodes start over this long.
pub const JOIN: Duration = Duration::from_secs(20);
/// Then the network settles this long (relay pools fill).
pub const SETTLE: Duration = Duration::from_secs(30);
/// Length of the baseline window and of the build window.
pub const WINDOW: Duration = Duration::from_secs(20);
/// The run goes on this long after the churn.
pub const AFTER_CHURN: Duration = Duration::from_secs(60);
/// Each source sends a test packet this often.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Params {
    /// Nodes.
    pub nodes: usize,
    /// Share of relays, percent.
    pub relay_pct: usize,
    /// Well-known nodes everyone is configured with (two each).
    pub seeds: usize,
    /// Source–destination pairs (distinct sources).
    pub pairs: usize,
    /// Seed of everything.
    pub seed: u64,
    /// Keep every delivery (see [`Net::trace`]).
    pub trace: bool,
}

/// The figures of one run: all follow from [`Params`].
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Nodes, relays among them.
    pub nodes: usize,
    /// Relays.
    pub relays: usize,
    /// Pairs.
    pub pairs: usize,
    /// Pairs whose test packets arrived within the build window.
    pub built: usize,
    /// Of those, circuits with as many relays as asked (reported by the
    /// source at the end of the window).
    pub right_length: usize,
    /// Time to the first packet through, ms: median, 90th percentile, max.
    pub build_ms: (u64, u64, u64),
    /// DHT lookups (all nodes) in the baseline window, without circuits.
    pub lookups_baseline: u64,
    /// DHT lookups (all nodes) in the build window.
    pub lookups_build: u64,
    /// Nodes that left.
    pub left: usize,
    /// Built circuits that had a relay among them.
    pub affected: usize,
    /// Of those, pairs whose packets arrived again after the churn.
    pub rebuilt: usize,
    /// Time from the churn to the first packet through again, ms: median,
    /// 90th percentile, max.
    pub rebuild_ms: (u64, u64, u64),
    /// Built circuits that lost no relay and kept carrying (no gap over 2 s).
    pub unaffected_kept: usize,
    /// Built circuits that lost no relay.
    pub unaffected: usize,
    /// Pairs delivering in the last 10 s of the run.
    pub delivering_at_end: usize,
    /// DHT lookups by the remaining nodes after the churn.
    pub lookups_after_churn: u64,
    /// Datagrams delivered over the whole run.
    pub datagrams: u64,
    /// Links the remaining nodes had handed to their data planes at the
    /// end, and links in all.
    pub plane_links: (u64, u64),
    /// Relayed circuits the remaining nodes' data planes passed cells on
    /// for at the end, and circuits carried in all (by relays and
    /// destinations).
    pub plane_circuits: (u64, u64),
}

impl Summary {
    /// Lookups per circuit built beyond the baseline.
    pub fn lookups_per_circuit(&self) -> f64 {
        (self.lookups_build as f64 - self.lookups_baseline as f64) / self.built.max(1) as f64
    }
}

/// Wall-clock figures of a run (not part of the summary: they vary).
#[derive(Clone, Debug)]
pub struct Wall {
    /// Generating the identities.
    pub keys: Duration,
    /// The whole run.
    pub total: Duration,
    /// Every delivery, if asked for.
    pub trace: Option<Vec<(Duration, usize, usize, usize)>>,
}

fn node_config(seed_bytes: [u8; 32], relay: bool, peers: Vec<PeerUri>) -> NodeConfig {
    NodeConfig {
        peers: peers.into_iter().map(|uri| PeerConfig { uri }).collect(),
        compression: CompressionPolicy {
            enabled: true,
            ..Default::default()
        },
        // The shell's defaults.
        keepalive: 10,
        mtu: 1440,
        max_links: 1024,
        advertise: vec![],
        roles: if relay { ROLE_RELAY } else { 0 },
        unix_time: crate::START_UNIX,
        routes: RoutePolicy::default(),
        relay: RelayConfig {
            enabled: relay,
            ..Default::default()
        },
        traffic: TrafficConfig::default(),
        has_tun: true,
        rng_seed: seed_bytes,
        access: AccessConfig::default(),
    }
}

fn seed_bytes(rng: &mut Rng) -> [u8; 32] {
    let mut s = [0u8; 32];
    for c in s.chunks_mut(8) {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    s
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn spread(v: &[u64]) -> (u64, u64, u64) {
    (
        pct(v, 0.5),
        pct(v, 0.9),
        v.iter().copied().max().unwrap_or(0),
    )
}

fn lookups(net: &Net) -> Vec<u64> {
    (0..net.len())
        .map(|i| net.dht_stats(i).map_or(0, |s| s.lookups))
        .collect()
}

/// Lookups made since `before` by the nodes still running.
fn lookups_since(net: &Net, before: &[u64]) -> u64 {
    (0..net.len())
        .filter_map(|i| net.dht_stats(i).map(|s| s.lookups - before[i]))
        .sum()
}

/// One run; `log` gets progress lines.
pub fn run(p: &Params, log: &mut dyn FnMut(String)) -> (Summary, Wall) {
    let wall = Instant::now();
    let n = p.nodes;
    assert!(p.seeds >= 1 && p.seeds < n && p.pairs <= n / 2);
    let ids = keys::identities(n, p.seed);
    let keys_wall = wall.elapsed();
    log(format!("{n} identities in {keys_wall:.1?} wall"));
    let mut rng = Rng(p.seed ^ 0x6e65_7473_696d);
    let relay: Vec<bool> = (0..n).map(|_| rng.below(100) < p.relay_pct).collect();
    let uris: Vec<PeerUri> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| PeerUri {
            node_id: id.node_id(),
            link_key: id.link_public(),
            endpoint: Some(endpoint(i)),
        })
        .collect();
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|id| id.overlay_address()).collect();
    let node_ids: Vec<NodeId> = ids.iter().map(|id| id.node_id()).collect();
    // Pairs: distinct sources, random destinations, 1, 2, 3 relays in turn.
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, &mut rng);
    let pairs: Vec<(usize, usize, u8)> = (0..p.pairs)
        .map(|k| {
            let src = order[k];
            let dst = loop {
                let d = rng.below(n);
                if d != src {
                    break d;
                }
            };
            (src, dst, 1 + (k % 3) as u8)
        })
        .collect();
    let mut hosts = Vec::with_capacity(n);
    for (i, id) in ids.into_iter().enumerate() {
        // Seed 0 knows nobody; everyone else two of the other seeds.
        let mut boot: Vec<usize> = (0..p.seeds).filter(|&s| s != i).collect();
        shuffle(&mut boot, &mut rng);
        boot.truncate(if i == 0 { 0 } else { 2 });
        let mut cfg = node_config(
            seed_bytes(&mut rng),
            relay[i],
            boot.iter().map(|&b| uris[b].clone()).collect(),
        );
        cfg.advertise = vec![endpoint(i)];
        for &(s, d, h) in &pairs {
            if s == i {
                cfg.routes.routes.push(Route {
                    prefix: addrs[d],
                    len: 128,
                    policy: Policy::Hops(h, h),
                });
            }
        }
        hosts.push((id, cfg));
    }
    let mut net = Net::new(hosts, p.seed);
    if p.trace {
        net.trace = Some(Vec::new());
    }
    // The seeds first, then everyone else over JOIN.
    for i in 0..n {
        let at = if i < p.seeds {
            Duration::ZERO
        } else {
            Duration::from_millis(1000 + rng.below(JOIN.as_millis() as usize - 1000) as u64)
        };
        net.start_at(i, at);
    }
    net.run_until(JOIN + SETTLE);
    log(format!(
        "joined and settled at {:?} virtual, {:.1?} wall: {} datagrams, {} timer runs",
        net.now(),
        wall.elapsed(),
        net.traffic.datagrams,
        net.traffic.timers
    ));

    // Baseline: DHT lookups of a network without circuits.
    let l0 = lookups(&net);
    net.run_for(WINDOW);
    let lookups_baseline = lookups_since(&net, &l0);

    // Build: every source sends a packet each PROBE_EVERY from now on.
    let t_build = net.now();
    let l1 = lookups(&net);
    let mut seq = 0u32;
    let probe_round = |net: &mut Net, seq: &mut u32, until: Duration| {
        while net.now() < until {
            for (k, &(s, d, _)) in pairs.iter().enumerate() {
                net.send_probe(s, d, k as u32, *seq);
            }
            *seq += 1;
            net.run_for(PROBE_EVERY);
        }
    };
    probe_round(&mut net, &mut seq, t_build + WINDOW);
    let lookups_build = lookups_since(&net, &l1);
    let sent_at = |seq: u32| t_build + PROBE_EVERY * seq;
    // Pair k's arrivals at its destination, from its source.
    let arrivals = |net: &Net, k: usize| -> Vec<(Duration, u32)> {
        let (s, d, _) = pairs[k];
        net.arrivals
            .iter()
            .filter(|a| a.pair == k as u32 && a.host == d && a.src == addrs[s])
            .map(|a| (a.at, a.seq))
            .collect()
    };
    let mut build_ms = Vec::new();
    let mut built_pairs = Vec::new();
    let mut right_length = 0;
    let mut hops_of: Vec<Vec<NodeId>> = vec![Vec::new(); pairs.len()];
    for (k, &(s, d, h)) in pairs.iter().enumerate() {
        let Some(&(at, _)) = arrivals(&net, k).first() else {
            continue;
        };
        build_ms.push(ms(at - t_build));
        built_pairs.push(k);
        if let Some(node) = net.node(s) {
            let report = node.circuits(net.instant());
            if let Some(c) = report
                .circuits
                .iter()
                .find(|c| c.destination == addrs[d] && c.state == "ready")
            {
                right_length += usize::from(c.hops.len() == h as usize);
                hops_of[k] = c.hops.clone();
            }
        }
    }
    log(format!(
        "built {}/{} at {:?} virtual, {:.1?} wall",
        built_pairs.len(),
        pairs.len(),
        net.now(),
        wall.elapsed()
    ));

    // Churn: a third of all nodes leave at once, none of the pairs' ends.
    let t_churn = net.now();
    let first_after = seq;
    let mut ends = vec![false; n];
    for &(s, d, _) in &pairs {
        ends[s] = true;
        ends[d] = true;
    }
    let mut candidates: Vec<usize> = (0..n).filter(|&i| !ends[i]).collect();
    shuffle(&mut candidates, &mut rng);
    candidates.truncate(n / 3);
    let mut gone = vec![false; n];
    for &i in &candidates {
        net.leave(i);
        gone[i] = true;
    }
    let left = candidates.len();
    let l2 = lookups(&net);
    probe_round(&mut net, &mut seq, t_churn + AFTER_CHURN);
    let lookups_after_churn = lookups_since(&net, &l2);

    let mut affected = 0;
    let mut rebuilt = 0;
    let mut rebuild_ms = Vec::new();
    let mut unaffected = 0;
    let mut unaffected_kept = 0;
    for &k in &built_pairs {
        let after: Vec<(Duration, u32)> = arrivals(&net, k)
            .into_iter()
            .filter(|&(_, s)| s >= first_after)
            .collect();
        let hit = hops_of[k].iter().any(|h| {
            node_ids
                .iter()
                .position(|x| x == h)
                .is_some_and(|i| gone[i])
        });
        if hit {
            affected += 1;
            if let Some(&(at, _)) = after.first() {
                rebuilt += 1;
                rebuild_ms.push(ms(at - t_churn));
            }
        } else {
            unaffected += 1;
            // Carried on: packets throughout, never a gap over 2 s.
            let mut last = t_churn;
            let mut kept = !after.is_empty();
            for &(at, s) in &after {
                kept &= at.saturating_sub(last) <= Duration::from_secs(2)
                    && at.saturating_sub(sent_at(s)) <= Duration::from_secs(2);
                last = at;
            }
            kept &= net.now().saturating_sub(last) <= Duration::from_secs(2);
            unaffected_kept += usize::from(kept);
        }
    }
    let end = net.now();
    let delivering_at_end = (0..pairs.len())
        .filter(|&k| {
            arrivals(&net, k)
                .iter()
                .any(|&(at, _)| at + Duration::from_secs(10) >= end)
        })
        .count();
    let summary = Summary {
        nodes: n,
        relays: relay.iter().filter(|r| **r).count(),
        pairs: pairs.len(),
        built: built_pairs.len(),
        right_length,
        build_ms: spread(&build_ms),
        lookups_baseline,
        lookups_build,
        left,
        affected,
        rebuilt,
        rebuild_ms: spread(&rebuild_ms),
        unaffected_kept,
        unaffected,
        delivering_at_end,
        lookups_after_churn,
        datagrams: net.traffic.datagrams,
        plane_links: (0..n)
            .filter_map(|i| net.plane_links(i))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        plane_circuits: (0..n)
            .filter_map(|i| net.plane_circuits(i))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
    };
    log(format!(
        "done at {:?} virtual, {:.1?} wall: {} datagrams ({} MB), {} lost, {} timer runs",
        net.now(),
        wall.elapsed(),
        net.traffic.datagrams,
        net.traffic.bytes / 1_000_000,
        net.traffic.lost,
        net.traffic.timers
    ));
    (
        summary,
        Wall {
            keys: keys_wall,
            total: wall.elapsed(),
            trace: net.trace.take(),
        },
    )
}
