//! The DHT at 10,000 nodes: lookups, mass failure, liars, an eclipse
//! attempt. Figures are printed (run with `--nocapture` to see them).

use std::time::{Duration, Instant};

use qgate_sim::Sim;

fn nodes() -> usize {
    std::env::var("QGATE_SIM_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
const LOOKUPS: usize = 10_000;

fn scenario(name: &str, liars: f64, seed: u64) {
    let t0 = Instant::now();
    let mut sim = Sim::build(nodes(), liars, Duration::from_millis(5), seed);
    let (mean, max) = sim.state_bytes();
    eprintln!(
        "[{name}] built {} nodes in {:.1?} wall: {:.0} table entries/node, state {} B/node mean, {} B max",
        sim.len(),
        t0.elapsed(),
        sim.table_mean(),
        mean,
        max
    );

    let t = sim.total_stats();
    eprintln!(
        "[{name}] after build: {} honest nodes with < 20 entries; {} liars caught, {} forged, {} timeouts, {} lookups ({} refused)",
        sim.poor_tables(20), t.liars, t.forged_records, t.timeouts, t.lookups, t.lookups_refused
    );
    // 1. Lookups of random honest nodes.
    let honest = sim.honest_alive();
    let st = sim.lookups(LOOKUPS, Duration::from_millis(2), |s| {
        honest[s.rng.below(honest.len())]
    });
    eprintln!(
        "[{name}] lookups: {} ({:.1?} wall)",
        st.line(),
        t0.elapsed()
    );
    assert!(st.success() >= 0.999, "[{name}] lookups: {}", st.line());
    assert!(st.hops_pct(0.5) <= 6, "not O(log n): {}", st.line());

    // 2. 200 colluding IDs generated near one target.
    let target = honest[sim.rng.below(honest.len())];
    let tid = sim.id(target);
    let boot = honest.clone();
    for k in 0..200 {
        let id = sim.id_near(&tid, 16);
        let b = boot[sim.rng.below(boot.len())];
        sim.add_node(
            id,
            qgate_sim::Behaviour::Eclipser,
            Some(b),
            Duration::from_millis(10 * k),
        );
    }
    sim.run_for(Duration::from_secs(30));
    let st = sim.lookups(1000, Duration::from_millis(5), |_| target);
    eprintln!(
        "[{name}] eclipse target, 200 colluders at >=16 shared bits: {}",
        st.line()
    );
    assert!(st.success() >= 0.99, "[{name}] eclipse: {}", st.line());

    // 3. 30% leave at once (the colluders too); tables refresh.
    let mut killed = 0;
    for i in 0..sim.len() {
        if !sim.alive(i) {
            continue;
        }
        if sim.is_colluder(i) || (sim.rng.below(1000) < 300) {
            sim.kill(i);
            killed += 1;
        }
    }
    let alive = sim.honest_alive();
    let st = sim.lookups(2000, Duration::from_millis(2), |s| {
        alive[s.rng.below(alive.len())]
    });
    eprintln!(
        "[{name}] right after {killed} left, before any refresh: {} ({:.1?} wall)",
        st.line(),
        t0.elapsed()
    );
    sim.refresh_all(Duration::from_secs(60));
    sim.run_for(Duration::from_secs(90));
    let alive = sim.honest_alive();
    let st = sim.lookups(LOOKUPS, Duration::from_millis(2), |s| {
        alive[s.rng.below(alive.len())]
    });
    eprintln!(
        "[{name}] after {killed} left and tables refreshed: {} ({:.1?} wall)",
        st.line(),
        t0.elapsed()
    );
    assert!(st.success() >= 0.99, "[{name}] after churn: {}", st.line());
    let t = sim.total_stats();
    eprintln!(
        "[{name}] totals: {} messages, {} bytes, {} forged records refused, {} timeouts, {} rate-limited; {:.1?} wall",
        t.messages_out,
        t.bytes_out,
        t.forged_records,
        t.timeouts,
        t.rate_limited,
        t0.elapsed()
    );
}

#[test]
fn ten_thousand_honest_nodes() {
    scenario("honest", 0.0, 1);
}

#[test]
fn ten_thousand_nodes_five_percent_liars() {
    scenario("5% liars", 0.05, 2);
}
