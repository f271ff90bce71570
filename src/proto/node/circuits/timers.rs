//! Circuit upkeep on the node's timer (probes, build and idle timeouts,
//! make-before-break replacement, onion key rotation, stale relayed
//! circuits) and feeding the relay pool (`pool.rs`) from the DHT.

use std::time::Instant;

use rand_core::RngCore;

use super::cells::hop_env;
use super::{
    Stage, CIRCUIT_LIFETIME, LIVENESS, ONION_ROTATE, OUT_IDLE, PROBE_DEAD, PROBE_INTERVAL,
    STEP_TIMEOUT,
};
use crate::proto::dht::{Contact, Goal};
use crate::proto::node::{Node, Purpose};
use crate::proto::onion::{Cmd, OnionKey};

impl Node {
    /// Relays from the routing table go into the pool.
    pub(super) fn fill_pool_from_table(&mut self, now: Instant) {
        let mut key = [0u8; 32];
        self.rng.fill_bytes(&mut key);
        let contacts = self.dht.closest(&key, 64);
        self.add_to_pool(now, &contacts);
    }

    pub(in crate::proto::node) fn add_to_pool(&mut self, now: Instant, contacts: &[Contact]) {
        let (unix, own) = (self.dht.unix(now), self.node_id());
        self.circ.pool.offer(unix, own, contacts);
    }

    /// Circuit timers: probes, build and idle timeouts, replacement, noise,
    /// onion key rotation, the relay pool.
    pub(in crate::proto::node) fn circuit_timers(&mut self, now: Instant) {
        // Onion key rotation (the record is re-signed with the new key).
        if now.saturating_duration_since(self.circ.onion_since) >= ONION_ROTATE {
            let new = OnionKey::generate(&mut self.rng);
            self.circ.prev_onion = Some(std::mem::replace(&mut self.circ.onion, new));
            self.circ.onion_since = now;
            self.own.set_onion_key(self.circ.onion_public());
            self.own.poll_resign(now, self.dht.unix(now));
        }
        self.circ.out.sweep(now);
        self.circ.notes.sweep(now);
        // The pool: from the table, and random lookups further afield.
        let wants_pool = self.config.has_tun
            && (self.config.routes.default.relays().is_some()
                || self
                    .config
                    .routes
                    .routes
                    .iter()
                    .any(|r| r.policy.relays().is_some()));
        // Whether to fill is judged on the pool as it was before expired
        // records go.
        let fill = wants_pool && self.dht.table_len() > 0 && self.circ.pool.fill_due(now);
        self.circ.pool.sweep(now, self.dht.unix(now));
        if fill {
            self.fill_pool_from_table(now);
            let mut key = [0u8; 32];
            self.rng.fill_bytes(&mut key);
            if let Some(id) = self.dht.lookup(now, Goal::Closest(key)) {
                self.purposes.insert(id, Purpose::Pool);
            }
        }
        // Circuits we built.
        let ids = self.circ.out.ids();
        let mut extend_limit = self.circ.out.extend_timeout();
        for id in ids {
            let Some(c) = self.circ.out.get(id) else {
                continue;
            };
            if c.stage != Stage::Ready {
                // CREATE and EXTEND get what such steps take here lately;
                // a LOOKUP (a DHT lookup at the relay) and AUTH the lot.
                let limit = match c.stage {
                    Stage::Extending => extend_limit,
                    _ => STEP_TIMEOUT,
                };
                if now.saturating_duration_since(c.step_started) > limit {
                    let extending = c.stage == Stage::Extending;
                    // Nothing heard on any link since the step began, nor
                    // for a keepalive period and more: this node is cut
                    // off, not the relay it waits on (Tor's network
                    // liveness check). Blaming would empty the pool of
                    // relays that are fine. (Idle links are quiet up to a
                    // keepalive apart, so the step alone is too short.)
                    let since = c.step_started.min(now.checked_sub(LIVENESS).unwrap_or(now));
                    let heard = self.links.values().any(|l| l.chan.last_rx > since);
                    let blame = match c.stage {
                        Stage::Extending if heard => {
                            c.next_relay().or(c.dest.as_ref().map(|d| d.id))
                        }
                        _ => None,
                    };
                    if extending {
                        // Counted as taking the limit: if steps got slower
                        // here (another network, congestion), the limit
                        // follows them up instead of failing every build.
                        self.circ.out.step_took(limit);
                        extend_limit = self.circ.out.extend_timeout();
                    }
                    self.out_failed(now, id, blame, "build step timed out");
                }
                continue;
            }
            if now.saturating_duration_since(c.last_used) > OUT_IDLE {
                tracing::debug!(circuit = id, "closing an idle circuit");
                self.close_out(now, id);
                continue;
            }
            // A hop that stopped answering probes fails the circuit.
            let dead = c
                .hops
                .iter()
                .position(|h| now.saturating_duration_since(h.last_reply) > PROBE_DEAD);
            if let Some(i) = dead {
                // The first silent hop is to blame (later ones can't answer
                // through it).
                let blame = c.hops[i].id;
                self.out_failed(now, id, Some(blame), "a hop stopped answering probes");
                continue;
            }
            if now.saturating_duration_since(c.last_probe) >= PROBE_INTERVAL {
                let n = c.hops.len();
                if let Some(c) = self.circ.out.get_mut(id) {
                    c.last_probe = now;
                }
                for target in 0..n {
                    let mut nonce = [0u8; 8];
                    self.rng.fill_bytes(&mut nonce);
                    self.send_out(now, id, target, Cmd::Probe, &nonce);
                }
            }
            // Make before break: a replacement after the circuit's lifetime.
            let Some(c) = self.circ.out.get(id) else {
                continue;
            };
            if now.saturating_duration_since(c.created) > CIRCUIT_LIFETIME
                && c.replaced_by.is_none_or(|r| !self.circ.out.contains(r))
                && !self.build_failing(now, &c.dst)
            {
                let dst = c.dst;
                if let Some((min, max)) = self.config.routes.for_addr(&dst).relays() {
                    let new = self.build_circuit(now, dst, min, max).ok();
                    if let Some(c) = self.circ.out.get_mut(id) {
                        c.replaced_by = new;
                    }
                }
            }
            self.noise(now, id);
        }
        // Circuits we carry.
        let env = hop_env!(self, now);
        self.circ.hop_timers(&env);
        self.hop_actions(now);
    }
}
