//! Unit tests of the DHT: a few `Dht`s wired directly (`Mesh`), with
//! records checked by a plain oracle (`Plain`) instead of RSA.

use super::*;

/// Records are `id [32] | seq u64 | expires u64 | ok u8`, valid when
/// `ok` is 1: enough to test the DHT's logic without RSA.
struct Plain;

thread_local! {
    /// Value records `Plain` checked on this thread (a test's own).
    static VALUE_CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Records for Plain {
    fn check_node(&mut self, b: &[u8], now: u64) -> Result<RecordInfo, RecordError> {
        if b.len() != 49 || b[48] != 1 {
            return Err(RecordError::Forged);
        }
        let expires = u64::from_be_bytes(b[40..48].try_into().unwrap());
        if expires <= now {
            return Err(RecordError::Expired);
        }
        Ok(RecordInfo {
            id: NodeId(b[..32].try_into().unwrap()),
            seq: u64::from_be_bytes(b[32..40].try_into().unwrap()),
            expires,
            roles: 0,
            ip: None,
        })
    }
    fn check_value(&mut self, b: &[u8], now: u64) -> Result<ValueInfo, RecordError> {
        VALUE_CHECKS.with(|c| c.set(c.get() + 1));
        // target [32] | publisher [32] | seq | expires | value
        if b.len() < 80 {
            return Err(RecordError::Forged);
        }
        if b.len() > 80 + MAX_VALUE_LEN {
            return Err(RecordError::Oversized);
        }
        let expires = u64::from_be_bytes(b[72..80].try_into().unwrap());
        if expires <= now {
            return Err(RecordError::Expired);
        }
        Ok(ValueInfo {
            target: b[..32].try_into().unwrap(),
            publisher: NodeId(b[32..64].try_into().unwrap()),
            seq: u64::from_be_bytes(b[64..72].try_into().unwrap()),
            expires,
        })
    }
}

fn rec(id: u8, seq: u64) -> Vec<u8> {
    let mut b = vec![id; 32];
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&2_000_000_000u64.to_be_bytes());
    b.push(1);
    b
}

fn contact(id: u8, seq: u64) -> Contact {
    let r = rec(id, seq);
    Contact {
        info: Plain.check_node(&r, 0).unwrap(),
        record: Arc::from(r),
    }
}

/// A few DHTs wired directly, messages delivered in order.
struct Mesh {
    nodes: Vec<Dht<Plain>>,
    now: Instant,
}
impl Mesh {
    fn new(ids: &[u8]) -> Mesh {
        let now = Instant::now();
        let nodes = ids
            .iter()
            .map(|i| Dht::new(contact(*i, 1), Plain, now, 1_700_000_000, *i as u64))
            .collect();
        Mesh { nodes, now }
    }
    fn run(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some((to, bytes)) = self.nodes[i].poll_transmit() {
                    moved = true;
                    let from = self.nodes[i].own().clone();
                    if let Some(j) = self
                        .nodes
                        .iter()
                        .position(|n| n.own().info.id == to.info.id)
                    {
                        let now = self.now;
                        self.nodes[j].handle_message(now, &from, &bytes);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }
}

#[test]
fn messages_roundtrip_and_never_panic() {
    let msgs = [
        Msg::Find {
            txid: 7,
            target: [3; 32],
            values: true,
        },
        Msg::Reply {
            txid: 8,
            values: vec![vec![1, 2, 3]],
            nodes: vec![rec(1, 1), rec(2, 2)],
        },
        Msg::Store {
            txid: 9,
            node: false,
            record: vec![5; 100],
        },
        Msg::Stored { txid: 1, ok: true },
        Msg::Ping { txid: 2 },
        Msg::Pong { txid: 3 },
    ];
    for m in msgs {
        let b = m.to_bytes();
        assert_eq!(Msg::parse(&b).unwrap(), m);
        for n in 0..b.len() {
            let _ = Msg::parse(&b[..n]);
        }
    }
}

#[test]
fn lookup_finds_a_node_through_others() {
    let ids: Vec<u8> = (1..=40).collect();
    let mut m = Mesh::new(&ids);
    let now = m.now;
    // A chain: each knows the next few only.
    for i in 0..m.nodes.len() {
        for d in 1..=3 {
            let j = (i + d) % m.nodes.len();
            let c = m.nodes[j].own().clone();
            m.nodes[i].add_contact(now, c, Source::Config);
        }
    }
    for i in 0..m.nodes.len() {
        m.nodes[i].publish(now);
    }
    m.run();
    let target = m.nodes[25].own().info.id;
    let id = m.nodes[0]
        .lookup(
            now,
            Goal::Node {
                prefix: target.0.to_vec(),
                min_seq: 0,
                reachable: false,
            },
        )
        .unwrap();
    m.run();
    let ev = std::iter::from_fn(|| m.nodes[0].poll_event())
        .find(|e| e.id == id)
        .unwrap();
    match ev.outcome {
        Outcome::Found(c) => assert_eq!(c.info.id, target),
        o => panic!("not found: {o:?}"),
    }
}

#[test]
fn full_bucket_keeps_its_old_entries() {
    let now = Instant::now();
    let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
    // IDs 0x80.. all land in bucket 0 of node 0x00... Unproven
    // entries give way to nodes that talk to us; those then stay.
    for i in 0..K as u8 {
        d.add_contact(now, contact(0xa0 + i, 1), Source::Store);
    }
    for i in 0..K as u8 {
        let c = contact(0x80 + i, 1);
        d.handle_message(now, &c, &Msg::Ping { txid: 1 }.to_bytes());
    }
    for i in 0..50u8 {
        let c = contact(0xc0 + i, 1);
        d.handle_message(now, &c, &Msg::Ping { txid: 1 }.to_bytes());
    }
    let table = d.table(now);
    let live: Vec<_> = table.iter().filter(|e| !e.replacement).collect();
    assert_eq!(live.len(), K);
    assert!(live.iter().all(|e| e.id.0[0] < 0xa0 && e.proven));
    assert_eq!(table.len() - live.len(), REPLACEMENTS);
}

#[test]
fn records_are_checked_and_counted() {
    let mut m = Mesh::new(&[1, 2]);
    let now = m.now;
    let a = m.nodes[0].own().clone();
    // Forged, expired, stale.
    let mut forged = rec(9, 5);
    forged[48] = 0;
    let mut expired = rec(9, 5);
    expired[40..48].copy_from_slice(&5u64.to_be_bytes());
    for (r, ok) in [
        (rec(9, 5), true),
        (forged, false),
        (expired, false),
        (rec(9, 4), false),
    ] {
        let msg = Msg::Store {
            txid: 1,
            node: true,
            record: r,
        };
        m.nodes[1].handle_message(now, &a, &msg.to_bytes());
        let (_, reply) = m.nodes[1].poll_transmit().unwrap();
        assert_eq!(Msg::parse(&reply).unwrap(), Msg::Stored { txid: 1, ok });
    }
    let s = m.nodes[1].stats();
    assert_eq!(
        (s.forged_records, s.expired_records, s.stale_records),
        (1, 1, 1)
    );
    // Oversized values are refused.
    let mut big = vec![0u8; 80 + MAX_VALUE_LEN + 1];
    big[72..80].copy_from_slice(&2_000_000_000u64.to_be_bytes());
    let msg = Msg::Store {
        txid: 2,
        node: false,
        record: big,
    };
    m.nodes[1].handle_message(now, &a, &msg.to_bytes());
    assert_eq!(m.nodes[1].stats().oversized_records, 1);
}

#[test]
fn values_are_bounded_per_key() {
    let now = Instant::now();
    let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
    let from = contact(5, 1);
    let mut stored = 0;
    for p in 0..(MAX_VALUES_PER_KEY + 10) as u8 {
        let mut v = vec![7u8; 32];
        v.extend_from_slice(&[p; 32]);
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&2_000_000_000u64.to_be_bytes());
        v.extend_from_slice(b"provider");
        let msg = Msg::Store {
            txid: p as u32,
            node: false,
            record: v,
        };
        d.handle_message(now, &from, &msg.to_bytes());
        if let Some((_, r)) = d.poll_transmit() {
            if Msg::parse(&r).unwrap()
                == (Msg::Stored {
                    txid: p as u32,
                    ok: true,
                })
            {
                stored += 1;
            }
        }
    }
    assert_eq!(stored, MAX_VALUES_PER_KEY);
    assert_eq!(d.local_values(now, &[7; 32]).len(), MAX_VALUES_PER_KEY);
}

#[test]
fn requests_over_budget_are_dropped() {
    let now = Instant::now();
    let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
    let from = contact(5, 1);
    for _ in 0..200 {
        d.handle_message(now, &from, &Msg::Ping { txid: 1 }.to_bytes());
    }
    assert_eq!(d.stats().requests_in, REQUEST_BURST as u64);
    assert_eq!(d.stats().rate_limited, 200 - REQUEST_BURST as u64);
}

#[test]
fn kept_values_come_back_after_a_restart() {
    let value = |target: u8, publisher: u8, expires: u64, text: &[u8]| {
        let mut v = vec![target; 32];
        v.extend_from_slice(&[publisher; 32]);
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&expires.to_be_bytes());
        v.extend_from_slice(text);
        v
    };
    let now = Instant::now();
    let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
    d.put(now, &value(7, 0, 2_000_000_000, b"mine")).unwrap();
    let from = contact(5, 1);
    for (txid, v) in [
        (1, value(7, 5, 2_000_000_000, b"held")),
        (2, value(8, 5, 1_700_000_100, b"soon gone")),
    ] {
        let msg = Msg::Store {
            txid,
            node: false,
            record: v,
        };
        d.handle_message(now, &from, &msg.to_bytes());
    }
    let kept = d.value_records(now);
    // Our own value is both published and stored here: kept once.
    assert_eq!(kept.len(), 3, "{kept:?}");

    // The next run, 200 s later: the short-lived value has expired,
    // and a damaged record is refused like one from the network.
    let later = now + Duration::from_secs(200);
    let mut d2 = Dht::new(contact(0, 2), Plain, later, 1_700_000_200, 2);
    let back: Vec<bool> = kept.iter().map(|r| d2.restore_value(later, r)).collect();
    assert_eq!(back.iter().filter(|b| **b).count(), 2, "{back:?}");
    assert!(!d2.restore_value(later, &kept[0][..40]));
    let mut texts: Vec<Vec<u8>> = d2
        .local_values(later, &[7; 32])
        .iter()
        .map(|r| r[80..].to_vec())
        .collect();
    texts.sort();
    assert_eq!(texts, [b"held".to_vec(), b"mine".to_vec()]);
    assert!(d2.local_values(later, &[8; 32]).is_empty());
    // Only our own is published again.
    assert_eq!(d2.own_values.len(), 1);
    assert_eq!(d2.value_records(later).len(), 2);
}

/// The store may give back two of our own records for one key (a put's
/// record beside an older full set), in any order: the newer is the one
/// published again and kept, whichever comes first.
#[test]
fn the_newest_own_value_wins_a_restore() {
    let value = |seq: u64, text: &[u8]| {
        let mut v = vec![7u8; 32];
        v.extend_from_slice(&[0u8; 32]);
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&2_000_000_000u64.to_be_bytes());
        v.extend_from_slice(text);
        v
    };
    let (old, new) = (value(1, b"old"), value(2, b"new"));
    let now = Instant::now();
    for order in [[&old, &new], [&new, &old]] {
        let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
        for r in order {
            d.restore_value(now, r);
        }
        let kept = d.value_records(now);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(&kept[0][..], &new[..]);
        let texts: Vec<Vec<u8>> = d
            .local_values(now, &[7; 32])
            .iter()
            .map(|r| r[80..].to_vec())
            .collect();
        assert_eq!(texts, [b"new".to_vec()]);
    }
}

/// A node that has put thousands of values stores them again a share at
/// a time: republishing takes at most `REPUBLISH_LOOKUPS` lookup slots, the
/// node's record and its other lookups keep theirs, nothing is verified
/// again, and a put made while every slot is taken goes out later.
#[test]
fn many_own_values_are_republished_a_few_at_a_time() {
    let value = |n: u32| {
        let mut v = vec![0u8; 32];
        v[..4].copy_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0u8; 32]); // published by node 0: us
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&2_000_000_000u64.to_be_bytes());
        v.extend_from_slice(b"value");
        v
    };
    let mut m = Mesh::new(&[0, 1, 2, 3, 4, 5]);
    let now = m.now;
    for i in 1..=5 {
        let c = m.nodes[i].own().clone();
        m.nodes[0].add_contact(now, c, Source::Config);
    }
    let d = &mut m.nodes[0];
    for n in 0..2000 {
        // Stored here only up to the per-publisher limit; all are ours.
        d.restore_value(now, &value(n));
    }
    assert_eq!(d.own_values.len(), 2000);
    let checks = VALUE_CHECKS.with(|c| c.get());
    d.publish(now);
    assert_eq!(
        VALUE_CHECKS.with(|c| c.get()),
        checks,
        "nothing checked again"
    );
    // Our record's lookup, then values at the republishing pace's burst.
    let burst = REPUBLISH_RATE.burst as usize;
    assert_eq!(d.lookups.len(), 1 + burst);
    assert_eq!(d.republish.len(), 2000 - burst);
    // Nothing more before the pace allows it, and the timer knows when.
    d.handle_timeout(now);
    assert_eq!(d.lookups.len(), 1 + burst);
    let due = d.poll_timeout().expect("a deadline");
    assert!(
        due > now && due <= now + Duration::from_millis(250),
        "{due:?} {now:?}"
    );
    // The node's own work still finds slots; republishing waits.
    let gets: Vec<_> = (0..(MAX_LOOKUPS - REPUBLISH_LOOKUPS))
        .map(|i| d.lookup(now, Goal::Values([i as u8 + 100; 32])))
        .collect();
    assert!(gets.iter().all(|g| g.is_some()), "{gets:?}");
    d.handle_timeout(now + Duration::from_secs(1));
    assert_eq!(d.lookups.len(), 1 + burst + MAX_LOOKUPS - REPUBLISH_LOOKUPS);
    // A put with every slot taken is kept and queued, not lost.
    while d.lookups.len() < MAX_LOOKUPS {
        assert!(d.lookup(now, Goal::Values([7; 32])).is_some());
    }
    assert_eq!(d.put(now, &value(5000)), Ok(None));
    let first = d.republish.front().map(|k| k.0[..4].to_vec());
    assert_eq!(
        first,
        Some(5000u32.to_be_bytes().to_vec()),
        "the put waits, first in line"
    );
    // As lookups end, the timers move the queue on until it is empty,
    // starting a lookup for every value in it (none skipped), never
    // faster than the pace and never more at once than the share. A
    // publish midway (a new endpoint) queues nothing twice. Five peers
    // take it all without rate-limiting us, so none drops out of the
    // table. (The 64 lookups above, all at one instant, were more than
    // they take: those peers timed out, and are known again here.)
    m.run();
    let t = now + LOOKUP_DEADLINE;
    m.now = t;
    m.nodes[0].handle_timeout(t);
    m.run();
    for i in 1..=5 {
        let c = m.nodes[i].own().clone();
        m.nodes[0].add_contact(t, c, Source::Config);
    }
    let limited_before: u64 = m.nodes[1..].iter().map(|n| n.stats.rate_limited).sum();
    let queued = m.nodes[0].republish.len() as u64;
    let started = m.nodes[0].stats.lookups;
    let (mut rounds, mut t) = (0, t);
    let step = Duration::from_secs(1);
    while !m.nodes[0].republish.is_empty() {
        m.run();
        t += step;
        m.now = t;
        if rounds == 3 {
            m.nodes[0].publish(t);
            assert!(m.nodes[0].republish.len() <= 2001);
        }
        m.nodes[0].handle_timeout(t);
        rounds += 1;
        // The pace's burst, then its rate (and our record's lookup at the
        // publish).
        let begun = m.nodes[0].stats.lookups - started;
        let most = REPUBLISH_RATE.burst + REPUBLISH_RATE.per_sec * rounds + 1;
        assert!(begun <= u64::from(most), "{begun} in {rounds} s");
        assert!(m.nodes[0].lookups.len() <= REPUBLISH_LOOKUPS + 1);
        assert!(rounds < 1000, "the queue drains");
    }
    m.run();
    assert!(m.nodes[0].stats.lookups - started >= queued);
    let limited: u64 = m.nodes[1..].iter().map(|n| n.stats.rate_limited).sum();
    assert_eq!(
        limited, limited_before,
        "peers rate-limited our republishing"
    );
    assert_eq!(m.nodes[0].table_len(), 5, "a peer dropped out");
}

/// A node with many values and a single peer (the smallest network, a
/// two-node bench) republishes them at a pace the peer takes: unpaced, 32
/// lookups every 250 ms tick asked the peer ~256 requests a second, it
/// rate-limited them, they timed out and the node dropped its only peer.
#[test]
fn republishing_stays_inside_a_lone_peers_budget() {
    let mut m = Mesh::new(&[0, 1]);
    let now = m.now;
    let peer = m.nodes[1].own().clone();
    m.nodes[0].add_contact(now, peer, Source::Config);
    for n in 0..300u32 {
        let mut v = vec![0u8; 32];
        v[..4].copy_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0u8; 32]);
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&2_000_000_000u64.to_be_bytes());
        m.nodes[0].restore_value(now, &v);
    }
    let started = m.nodes[0].stats.lookups;
    m.nodes[0].publish(now);
    let tick = Duration::from_millis(250);
    let mut t = now;
    for _ in 0..400 {
        m.run();
        t += tick;
        m.now = t;
        m.nodes[0].handle_timeout(t);
        m.nodes[1].handle_timeout(t);
        if m.nodes[0].republish.is_empty() {
            break;
        }
    }
    m.run();
    assert!(m.nodes[0].republish.is_empty(), "the queue drains");
    assert!(m.nodes[0].stats.lookups - started > 300);
    assert_eq!(m.nodes[1].stats.rate_limited, 0, "the peer rate-limited us");
    assert_eq!(m.nodes[0].table_len(), 1, "the peer was dropped");
}

/// The node's own lookups (a program's gets, an extender's puts) to a lone
/// peer, in a burst and then as fast as slots free up, wait for the budget
/// that peer keeps for it rather than being refused by it, which would make
/// the node drop its only peer.
#[test]
fn own_lookups_stay_inside_a_lone_peers_budget() {
    let mut m = Mesh::new(&[0, 1]);
    let now = m.now;
    let peer = m.nodes[1].own().clone();
    m.nodes[0].add_contact(now, peer, Source::Config);
    const TOTAL: usize = 240;
    let tick = Duration::from_millis(250);
    let (mut t, mut started, mut done) = (now, 0, 0);
    let start = |m: &mut Mesh, t: Instant, started: &mut usize| {
        let key = [(*started % 256) as u8, (*started / 256) as u8, 1, 2].repeat(8);
        let key: Key = key.try_into().unwrap();
        assert!(m.nodes[0].lookup(t, Goal::Values(key)).is_some());
        *started += 1;
    };
    // A whole burst, answered at once, then a quiet tick: the budget is
    // still spent (4 tokens back), not whole again.
    for _ in 0..REQUEST_OUT.burst {
        start(&mut m, t, &mut started);
    }
    m.run();
    while m.nodes[0].poll_event().is_some() {
        done += 1;
    }
    assert_eq!(done, started, "the burst went out at once");
    t += tick;
    m.now = t;
    m.nodes[0].handle_timeout(t);
    m.nodes[1].handle_timeout(t);
    for _ in 0..200 {
        // Every slot that frees up takes a new lookup at once.
        while started < TOTAL && m.nodes[0].running() < MAX_LOOKUPS {
            start(&mut m, t, &mut started);
        }
        m.run();
        while m.nodes[0].poll_event().is_some() {
            done += 1;
        }
        if done == TOTAL {
            break;
        }
        // The node says when it has something to do, waits included.
        assert!(
            m.nodes[0]
                .poll_timeout()
                .is_some_and(|d| d <= t + RPC_TIMEOUT),
            "a waiting lookup is due"
        );
        t += tick;
        m.now = t;
        m.nodes[0].handle_timeout(t);
        m.nodes[1].handle_timeout(t);
    }
    assert_eq!(done, TOTAL, "every lookup ended");
    assert_eq!(m.nodes[1].stats.rate_limited, 0, "the peer rate-limited us");
    assert_eq!(m.nodes[0].stats.timeouts, 0);
    assert_eq!(m.nodes[0].table_len(), 1, "the peer was dropped");
    // At REQUEST_OUT's pace: the burst, then 16 a second.
    let took = t.saturating_duration_since(now).as_secs_f64();
    let pace = (TOTAL - REQUEST_OUT.burst as usize) as f64 / f64::from(REQUEST_OUT.per_sec);
    assert!(took >= pace - 0.5 && took <= pace + 1.0, "{took} s");
}

/// The outgoing budgets are bounded: with every entry still pacing its
/// peer, a new peer waits rather than the table being wiped (which would
/// give every paced peer a whole burst again); entries that filled up make
/// room.
#[test]
fn outgoing_budgets_are_bounded_without_forgetting_paced_peers() {
    let now = Instant::now();
    let mut rates = HashMap::new();
    for i in 0..MAX_RATE_PEERS as u32 {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        assert_eq!(take_out(&mut rates, now, &NodeId(id)), Ok(()));
    }
    let new = NodeId([0xff; 32]);
    assert!(
        take_out(&mut rates, now, &new).is_err(),
        "no room: it waits"
    );
    charge_out(&mut rates, now, &new);
    assert_eq!(rates.len(), MAX_RATE_PEERS, "nobody forgotten");
    // One token taken is back within an interval: every bucket is full
    // again, and the new peer gets an entry.
    let later = now + Duration::from_millis(100);
    assert_eq!(take_out(&mut rates, later, &new), Ok(()));
    assert_eq!(rates.len(), 1);
}

/// A node keeps at most `MAX_OWN_VALUES` values of its own: the next put
/// is refused with a reason, a new value under a key it has is not, and
/// values that expired make room.
#[test]
fn own_values_are_bounded() {
    let now = Instant::now();
    let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
    let value = |n: u32, seq: u64, expires: u64| {
        let mut v = vec![0u8; 32];
        v[..4].copy_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0u8; 32]);
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&expires.to_be_bytes());
        v
    };
    let soon = 1_700_000_100;
    for n in 0..MAX_OWN_VALUES as u32 {
        assert!(d.put(now, &value(n, 1, soon)).is_ok(), "value {n}");
    }
    let extra = value(MAX_OWN_VALUES as u32, 1, soon);
    assert_eq!(d.put(now, &extra), Err(RecordError::TooManyOwn));
    let max = format!("{MAX_OWN_VALUES} unexpired values");
    assert!(RecordError::TooManyOwn.to_string().contains(&max));
    // Asked before signing: a new key doesn't fit, one we have does.
    let extra_target: Key = extra[..32].try_into().unwrap();
    let seven: Key = value(7, 1, soon)[..32].try_into().unwrap();
    assert_eq!(
        d.own_value_fits(now, &extra_target),
        Err(RecordError::TooManyOwn)
    );
    assert_eq!(d.own_value_fits(now, &seven), Ok(()));
    assert!(d.put(now, &value(7, 2, soon)).is_ok(), "a key we have");
    // Restored ones count too.
    let us = d.own.info.id;
    assert!(!d.own_values.contains_key(&(extra_target, us)));
    d.restore_value(now, &extra);
    assert_eq!(d.own_values.len(), MAX_OWN_VALUES);
    // Once they expire there is room again.
    let later = now + Duration::from_secs(200);
    assert!(d.put(later, &value(1 << 20, 1, 1_700_001_000)).is_ok());
    assert_eq!(d.own_values.len(), 1);
}

/// With no contacts, republishing waits instead of running through the
/// queue with lookups that end at once.
#[test]
fn republishing_waits_for_contacts() {
    let now = Instant::now();
    let mut d = Dht::new(contact(0, 1), Plain, now, 1_700_000_000, 1);
    for n in 0..100u8 {
        let mut v = vec![n; 32];
        v.extend_from_slice(&[0u8; 32]);
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&2_000_000_000u64.to_be_bytes());
        d.restore_value(now, &v);
    }
    d.publish(now);
    assert_eq!(d.republish.len(), 100);
    assert!(d.poll_timeout().is_none_or(|t| t > now), "nothing due");
    d.add_contact(now, contact(1, 1), Source::Config);
    assert!(
        d.poll_timeout().is_some_and(|t| t <= now),
        "due once a contact is known"
    );
    d.handle_timeout(now);
    assert!(d.republish.len() < 100);
}
