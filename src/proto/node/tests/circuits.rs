//! Circuits in small networks of real nodes: building through relays,
//! carrying both ways, healing, signing AUTH off the data path, looking up
//! through the circuit.

use super::*;

/// A circuit network in one process: A (0) and E (5), four relays
/// (1..=4) and a node that does not relay (6), all configured with relay
/// 1 only; A routes everything through 2..3 relays.
pub(super) fn circuit_net(now: Instant) -> (Net, Vec<Ipv6Addr>, Vec<NodeId>) {
    let ids = identities(7);
    let eps = endpoints(7);
    let addrs: Vec<Ipv6Addr> = ids.iter().map(|i| i.overlay_address()).collect();
    let node_ids: Vec<NodeId> = ids.iter().map(|i| i.node_id()).collect();
    let boot = vec![uri(&ids[1], eps[1])];
    let mut nodes = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let relay = (1..=4).contains(&i);
        let mut c = NodeConfig {
            advertise: vec![eps[i]],
            roles: if relay { ROLE_RELAY_BIT } else { 0 },
            ..cfg(if i == 1 { vec![] } else { boot.clone() })
        };
        c.relay.distinct_subnets = false;
        c.relay.enabled = relay;
        if i == 0 {
            c.routes.default = Policy::Hops(2, 3);
        }
        nodes.push((Node::new(id, 1, c, now), eps[i]));
    }
    let nodes = nodes.into_iter().map(|(n, e)| (host(n), e)).collect();
    let mut net = Net { nodes, now };
    net.run();
    (net, addrs, node_ids)
}

/// Runs timers and delivery for `secs` of virtual time.
pub(super) fn advance(net: &mut Net, secs: f64) -> Vec<Vec<Vec<u8>>> {
    let mut tun = vec![Vec::new(); net.nodes.len()];
    let steps = (secs / 0.25) as usize;
    for _ in 0..steps {
        net.now += Duration::from_millis(250);
        let now = net.now;
        // A node whose endpoint has port 1 is dead: it runs no timers
        // and what it would send is lost.
        for n in net.nodes.iter_mut().filter(|n| n.1.port() != 1) {
            n.0.handle_timeout(now);
            // As the shell does: store the sequence number, then allow it.
            if let Some(s) = n.0.record_seq_wanted(now) {
                n.0.reserve_record_seq(s);
            }
        }
        for _ in 0..50 {
            let mut moved = false;
            for i in 0..net.nodes.len() {
                sign_jobs(&mut net.nodes[i].0, now);
                while let Some(t) = net.nodes[i].0.poll_transmit() {
                    if net.nodes[i].1.port() == 1 {
                        continue;
                    }
                    moved = true;
                    let from = net.nodes[i].1;
                    if let Some(j) = net.nodes.iter().position(|(_, a)| *a == t.dst) {
                        if let Some(p) = net.nodes[j].0.handle_datagram(now, from, &t.payload) {
                            tun[j].push(p.to_vec());
                        }
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }
    tun
}

/// Sends from node `from`'s TUN: the datagram (if any) goes out at once.
pub(super) fn tun_send(net: &mut Net, from: usize, packet: &[u8]) -> Option<Vec<u8>> {
    let src_ep = net.nodes[from].1;
    let now = net.now;
    let (dst, data) = match net.nodes[from].0.handle_tun_packet(now, packet) {
        TunOutcome::Send(d, p) => (d, p.to_vec()),
        _ => return None,
    };
    let j = net.nodes.iter().position(|(_, a)| *a == dst)?;
    net.nodes[j]
        .0
        .handle_datagram(now, src_ep, &data)
        .map(|p| p.to_vec())
}

#[test]
fn circuit_carries_both_ways_authenticates_the_source_and_heals() {
    let now = Instant::now();
    let (mut net, addrs, ids) = circuit_net(now);
    let (a, e) = (0, 5);
    let p = udp_packet(addrs[a], addrs[e], b"through relays");
    assert!(matches!(
        net.nodes[a].0.handle_tun_packet(net.now, &p),
        TunOutcome::Nothing
    ));
    let tun = advance(&mut net, 3.0);
    assert!(tun[e].contains(&p), "E got the packet through the circuit");
    let report = net.nodes[a].0.circuits(net.now);
    let c = &report.circuits[0];
    assert_eq!(c.state, "ready");
    assert!((2..=3).contains(&c.hops.len()), "{:?}", c.hops);
    assert!(!c.hops.contains(&ids[a]) && !c.hops.contains(&ids[e]));
    // Only nodes with the relay role: never the bystander, which A
    // knows as well as the relays.
    assert!(c.hops.iter().all(|h| ids[1..=4].contains(h)));
    assert!(net.nodes[a].0.dht.find_local(&ids[6].0).is_some());
    assert!(
        report.pool <= 4,
        "pool of {} holds a non-relay",
        report.pool
    );
    // Nothing went over a direct link between A and E (the DHT may
    // have made one while joining; application traffic never uses it).
    let direct = |net: &mut Net, from: usize, to: usize| {
        net.nodes[from]
            .0
            .status()
            .links
            .iter()
            .filter(|l| l.address == Some(addrs[to]))
            .map(|l| l.counters.tx_packets)
            .sum::<u64>()
    };
    assert_eq!(direct(&mut net, a, e), 0);
    // E knows who talks to it; replies go back on the circuit.
    let inbound = net.nodes[e].0.circuits(net.now).inbound;
    assert_eq!(inbound.len(), 1);
    assert_eq!(inbound[0].source, Some(addrs[a]));
    let reply = udp_packet(addrs[e], addrs[a], b"and back");
    assert!(tun_send(&mut net, e, &reply).is_none(), "not a direct link");
    let tun = advance(&mut net, 0.5);
    assert!(
        tun[a].contains(&reply),
        "the reply came back on the circuit"
    );
    assert_eq!(direct(&mut net, e, a), 0);
    assert!(net.nodes[a].0.circuits(net.now).circuits[0].rx_bytes > 0);
    // No relay holds both ends.
    for r in 1..=4 {
        for rel in net.nodes[r].0.circuits(net.now).relayed {
            let ends = [rel.prev, rel.next];
            assert!(
                !(ends.contains(&Some(ids[a])) && ends.contains(&Some(ids[e]))),
                "relay {r} saw both ends"
            );
        }
    }
    // A packet with a forged inner source is dropped at E.
    let forged = udp_packet(addrs[2], addrs[e], b"I am relay 2");
    assert!(net.nodes[a].0.inject_data(net.now, addrs[e], None, &forged));
    let tun = advance(&mut net, 0.5);
    assert!(!tun[e].contains(&forged));
    assert_eq!(net.nodes[e].0.status().relay.drops.spoofed_source, 1);
    // A second AUTH on the circuit, signed by another identity A holds,
    // is ignored: E still knows the circuit as A's, and replies to A keep
    // taking it.
    let other = Identity::generate(&mut OsRng).unwrap();
    let record = other.sign_record(1).to_bytes();
    let bad_kind = net.nodes[e].0.status().relay.drops.bad_kind;
    assert!(net.nodes[a]
        .0
        .inject_auth(net.now, addrs[e], None, &record, |m| other.sign(m)));
    advance(&mut net, 0.5);
    assert_eq!(net.nodes[e].0.status().relay.drops.bad_kind, bad_kind + 1);
    // An AUTH, validly signed, to the first relay, which extended the
    // circuit: refused, so no relay ever takes DATA for itself.
    let first = ids.iter().position(|i| *i == c.hops[0]).unwrap();
    let own = net.nodes[a].0.signer();
    let record = own.sign_record(2).to_bytes();
    assert!(net.nodes[a]
        .0
        .inject_auth(net.now, addrs[e], Some(0), &record, |m| own.sign(m)));
    advance(&mut net, 0.5);
    assert!(
        net.nodes[first]
            .0
            .inbound_route(net.now, &addrs[a])
            .is_none(),
        "the relay took A for the circuit's authenticated source"
    );
    let to_relay = udp_packet(addrs[a], addrs[first], b"for the relay itself");
    let unauthenticated = net.nodes[first].0.status().relay.drops.unauthenticated;
    assert!(net.nodes[a]
        .0
        .inject_data(net.now, addrs[e], Some(0), &to_relay));
    let tun = advance(&mut net, 0.5);
    assert!(
        !tun[first].contains(&to_relay),
        "the relay took DATA for itself"
    );
    assert_eq!(
        net.nodes[first].0.status().relay.drops.unauthenticated,
        unauthenticated + 1
    );
    let inbound = net.nodes[e].0.circuits(net.now).inbound;
    assert_eq!(inbound.len(), 1);
    assert_eq!(inbound[0].source, Some(addrs[a]));
    let reply = udp_packet(addrs[e], addrs[a], b"still yours");
    assert!(tun_send(&mut net, e, &reply).is_none());
    assert!(advance(&mut net, 0.5)[a].contains(&reply));
    // Kill the first relay of the circuit: probes notice, a new circuit
    // carries traffic again within 10 s.
    let dead = c.hops[0];
    let k = ids.iter().position(|i| *i == dead).unwrap();
    // Its datagrams now go nowhere, and nothing reaches it.
    net.nodes[k].1 = "198.18.9.9:1".parse().unwrap();
    let mut healed = None;
    for step in 0..40 {
        let p = udp_packet(addrs[a], addrs[e], format!("probe {step}").as_bytes());
        assert!(tun_send(&mut net, a, &p).is_none(), "never a direct link");
        let tun = advance(&mut net, 0.25);
        if step > 0 && tun[e].contains(&p) {
            healed = Some(step as f64 * 0.25);
            break;
        }
    }
    let healed = healed.expect("traffic resumed");
    println!("traffic resumed {healed} s after the relay died");
    assert!(healed <= 10.0, "resumed after {healed} s");
    let c2 = &net.nodes[a].0.circuits(net.now).circuits[0];
    assert!(
        !c2.hops.contains(&dead),
        "new circuit avoids the dead relay"
    );
}

/// Whom a failed circuit counts against: a relay that died is blamed and
/// the failure is the relay's (the destination is not given up on), a
/// destination that stopped answering is the destination's.
/// Cover traffic: a source with a noise rate sends NOISE cells on its
/// ready circuit, sized within `noise_size`, and the destination drops
/// them as such (no relay can tell them from DATA).
#[test]
fn noise_cells_reach_the_destination_and_are_dropped_there() {
    let now = Instant::now();
    let (mut net, addrs, _) = circuit_net(now);
    let (a, e) = (0, 5);
    net.nodes[a].0.config.traffic.noise_rate = 20.0;
    net.nodes[a].0.config.traffic.noise_size = (64, 300);
    let p = udp_packet(addrs[a], addrs[e], b"build it");
    let _ = net.nodes[a].0.handle_tun_packet(net.now, &p);
    let tun = advance(&mut net, 3.0);
    assert!(tun[e].contains(&p));
    let before = net.nodes[e].0.relay_stats().drops.noise;
    advance(&mut net, 5.0);
    let noise = net.nodes[e].0.relay_stats().drops.noise - before;
    // 20 a second for 5 s: a Poisson count, far from 0 and from 1,000.
    assert!((20..=400).contains(&noise), "{noise} noise cells in 5 s");
}

#[test]
fn a_dead_relay_counts_against_itself_a_dead_destination_against_itself() {
    let now = Instant::now();
    let (mut net, addrs, ids) = circuit_net(now);
    let (a, e) = (0, 5);
    let p = udp_packet(addrs[a], addrs[e], b"first");
    net.nodes[a].0.handle_tun_packet(net.now, &p);
    assert!(advance(&mut net, 3.0)[e].contains(&p));
    let hops = net.nodes[a].0.circuits(net.now).circuits[0].hops.clone();
    // The circuit's last relay dies.
    let dead = *hops.last().unwrap();
    let k = ids.iter().position(|i| *i == dead).unwrap();
    net.nodes[k].1 = "198.18.9.8:1".parse().unwrap();
    let mut healed = false;
    for step in 0..60 {
        let p = udp_packet(addrs[a], addrs[e], format!("r{step}").as_bytes());
        tun_send(&mut net, a, &p);
        let tun = advance(&mut net, 0.25);
        if step > 0 && tun[e].contains(&p) {
            healed = true;
            break;
        }
    }
    assert!(healed, "traffic resumed after the relay died");
    let (other, relay) = net.nodes[a].0.build_fails(&addrs[e]);
    assert_eq!(other, 0, "a dead relay counted against the destination");
    assert!(relay >= 1, "the dead relay's failure was not counted");
    // Now the destination dies: its failures are its own.
    net.nodes[e].1 = "198.18.9.7:1".parse().unwrap();
    for step in 0..40 {
        let p = udp_packet(addrs[a], addrs[e], format!("d{step}").as_bytes());
        tun_send(&mut net, a, &p);
        advance(&mut net, 0.25);
    }
    let after = net.nodes[a].0.build_fails(&addrs[e]);
    assert!(after.0 >= 1, "the dead destination's failures: {after:?}");
    assert_eq!(after.1, relay, "a relay was blamed for the destination");
}

/// Holds the signatures nodes ask for while it lives (a failed assert
/// lets go too).
struct HoldSignatures;

impl HoldSignatures {
    fn new() -> HoldSignatures {
        HOLD_SIGNATURES.set(true);
        HoldSignatures
    }
}

impl Drop for HoldSignatures {
    fn drop(&mut self) {
        HOLD_SIGNATURES.set(false);
    }
}

/// The next AUTH job `node` hands out; record jobs met on the way are
/// signed at once, as the signing thread would.
fn next_auth(node: &mut Node, now: Instant) -> Option<SignJob> {
    while let Some(job) = node.poll_sign() {
        match job.what {
            Signing::Auth { .. } => return Some(job),
            Signing::Record { .. } => {
                let sig = node.signer().sign(&job.message);
                node.signed(now, &job, &sig);
            }
        }
    }
    None
}

/// A source asks for its AUTH signature rather than making it (RSA takes
/// milliseconds, and the data path must not wait); the circuit waits for
/// it, a signature for another message is not used, and one that comes
/// after its circuit timed out is not either: the rebuilt circuit asks
/// anew.
#[test]
fn circuit_auth_waits_for_a_signature_made_elsewhere() {
    let now = Instant::now();
    let (mut net, addrs, _) = circuit_net(now);
    let (a, e) = (0, 5);
    let p = udp_packet(addrs[a], addrs[e], b"through relays");
    let hold = HoldSignatures::new();
    net.nodes[a].0.handle_tun_packet(net.now, &p);
    let tun = advance(&mut net, 1.0);
    assert!(!tun[e].contains(&p), "no AUTH went without its signature");
    let job = next_auth(&mut net.nodes[a].0, net.now).expect("A asked for a signature");
    assert!(
        next_auth(&mut net.nodes[a].0, net.now).is_none(),
        "one job per circuit"
    );
    assert!(net.nodes[a].0.wants_signature(&job));
    assert_eq!(
        net.nodes[a].0.circuits(net.now).circuits[0].state,
        "building"
    );
    // A signature for something else: not used.
    let signer = net.nodes[a].0.signer();
    let other = SignJob {
        what: job.what,
        message: b"something else".to_vec(),
    };
    assert!(!net.nodes[a].0.wants_signature(&other));
    net.nodes[a]
        .0
        .signed(net.now, &other, &signer.sign(&other.message));
    assert!(net.nodes[a].0.poll_transmit().is_none());
    // No signature within the build step: the circuit fails, and its
    // replacement asks for one of its own.
    advance(&mut net, 6.0);
    assert!(!net.nodes[a].0.wants_signature(&job), "that build is over");
    let again = next_auth(&mut net.nodes[a].0, net.now).expect("the new build asks");
    assert_ne!(again.what, job.what);
    net.nodes[a]
        .0
        .signed(net.now, &job, &signer.sign(&job.message));
    assert!(
        net.nodes[a].0.poll_transmit().is_none(),
        "a late one is not used"
    );
    // The right one: AUTH goes, and the packet with it.
    net.nodes[a]
        .0
        .signed(net.now, &again, &signer.sign(&again.message));
    assert!(!net.nodes[a].0.wants_signature(&again), "signed once");
    drop(hold);
    let tun = advance(&mut net, 1.0);
    assert!(tun[e].contains(&p), "E got the packet once A signed");
    assert_eq!(net.nodes[a].0.circuits(net.now).circuits[0].state, "ready");
}

/// A destination the source knows nothing of is looked up by the last
/// relay of the circuit, never by the source itself.
#[test]
fn unknown_destination_is_looked_up_through_the_circuit() {
    let now = Instant::now();
    let (mut net, addrs, ids) = circuit_net(now);
    let (a, e) = (0, 5);
    // A forgets E and drops any link to it: only the relays know E.
    if let Some(i) = net.nodes[a].0.links.index_of_addr(&addrs[e]) {
        net.nodes[a].0.remove_link(net.now, i);
    }
    net.nodes[a].0.dht.forget(&ids[e]);
    assert!(net.nodes[a].0.local_record(&addrs[e]).is_none());
    let p = udp_packet(addrs[a], addrs[e], b"who is E?");
    assert!(matches!(
        net.nodes[a].0.handle_tun_packet(net.now, &p),
        TunOutcome::Nothing
    ));
    let tun = advance(&mut net, 3.0);
    assert!(tun[e].contains(&p), "E got the packet");
    let c = &net.nodes[a].0.circuits(net.now).circuits[0];
    assert_eq!(c.destination_node, Some(ids[e]));
    // A held no record of E, so the last relay fetched it (above); no
    // application packet went over a direct link. (DHT upkeep may still
    // link the two: E's own refreshes can reach A.)
    let st = net.nodes[a].0.status();
    let direct: u64 = st
        .links
        .iter()
        .filter(|l| l.address == Some(addrs[e]))
        .map(|l| l.counters.tx_packets)
        .sum();
    assert_eq!(direct, 0);
}
