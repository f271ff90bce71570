//! Whether a destination's packets go through relays or direct, and why.
//!
//! The default preset asks for relays "whenever possible"
//! ([`Policy::Prefer`]): a destination gets a circuit when the node knows
//! enough usable relays for it (not the node itself, not the destination,
//! not a relay that just failed, and with the subnet rule, no two in one
//! subnet nor in an end's), and goes over a direct link otherwise. A strict
//! policy ([`Policy::Hops`], the `private` preset) never goes direct: the
//! destination is unreachable until relays appear. A node that talks to us
//! over a direct link is answered over it (`Prefer` only): it knows our
//! endpoint already, and a circuit back to it could fail where the direct
//! path works (NAT). Only a shortage of relays sends traffic direct: a full
//! circuit table or a first relay that can't be reached does not.
//!
//! Each decision is kept per destination as a [`RouteNote`], logged at info
//! when it is taken or changes (at most once a minute per kind, with a count
//! of those left out; the destination itself at debug only), and shown by
//! `qgate status` and `qgate circuits`. Decisions are checked again after
//! [`RECHECK`], so a network that grows relays moves its traffic onto
//! circuits.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BuildError;
use crate::proto::identity::NodeId;
use crate::proto::node::Node;
use crate::proto::route::{self, Candidate, Policy};

/// A direct decision is checked again after this long.
pub(super) const RECHECK: Duration = Duration::from_secs(10);
/// Notes of destinations not sent to for this long are forgotten.
const NOTE_KEEP: Duration = Duration::from_secs(600);
/// Most destinations with a note (oldest forgotten first).
const MAX_NOTES: usize = 1024;
/// A node that sent us an application packet over a direct link this
/// recently is answered over it.
const DIRECT_REPLY: Duration = Duration::from_secs(30);
/// At most one info line per kind of decision this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// `qgate status` reports decisions taken this recently.
const SUMMARY_FRESH: Duration = Duration::from_secs(60);

/// What the node does with packets to a destination that has no circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOutcome {
    /// Sent over a direct link: too few usable relays (`Prefer`).
    Direct,
    /// Sent over a direct link: the destination talks to us over one
    /// (`Prefer`).
    DirectReply,
    /// Answered with ICMPv6 unreachable: too few usable relays (`Hops`).
    Unreachable,
}

impl RouteOutcome {
    fn index(self) -> usize {
        match self {
            RouteOutcome::Direct => 0,
            RouteOutcome::DirectReply => 1,
            RouteOutcome::Unreachable => 2,
        }
    }
}

/// Why a destination gets no circuit.
#[derive(Clone, Copy, Debug)]
pub(super) struct RouteNote {
    outcome: RouteOutcome,
    usable: usize,
    needed: u8,
    /// When the relays were last counted.
    checked: Instant,
    /// When a packet last took this decision.
    used: Instant,
}

/// One destination without a circuit, as `qgate circuits` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RouteNoteView {
    /// Destination overlay address.
    pub destination: Ipv6Addr,
    /// Direct (for want of relays, or answering a direct sender) or
    /// unreachable.
    pub outcome: RouteOutcome,
    /// Usable relays when last counted.
    pub usable_relays: usize,
    /// Relays the policy needs at least.
    pub needed: u8,
    /// Seconds since a packet last went this way.
    pub idle_secs: f64,
}

/// The route policy at work, as `qgate status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RoutingSummary {
    /// The default policy (`direct`, `1..2 or direct`, `2..3`).
    pub default: String,
    /// Relays known (the pool).
    pub pool: usize,
    /// Usable relays: as counted for the latest destination without a
    /// circuit, else the fewest toward any linked neighbour.
    pub usable_relays: usize,
    /// Relays the default policy needs at least (0 for direct).
    pub needed: u8,
    /// Destinations sent direct (for want of relays, or answering a node
    /// that talks to us directly).
    pub direct_fallbacks: usize,
    /// Destinations unreachable for want of relays.
    pub unreachable: usize,
    /// One line: what the default does now and why.
    pub summary: String,
}

/// The per-destination notes.
#[derive(Default)]
pub(super) struct RouteNotes {
    map: HashMap<Ipv6Addr, RouteNote>,
    /// Per kind of decision: the last info line, and decisions not logged
    /// since.
    logged: [Option<Instant>; 3],
    quiet: [u64; 3],
}

impl RouteNotes {
    fn insert(&mut self, dst: Ipv6Addr, note: RouteNote) {
        if self.map.len() >= MAX_NOTES && !self.map.contains_key(&dst) {
            if let Some(oldest) = self.map.iter().min_by_key(|(_, n)| n.used).map(|(a, _)| *a) {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(dst, note);
    }

    pub(super) fn sweep(&mut self, now: Instant) {
        self.map
            .retain(|_, n| now.saturating_duration_since(n.used) < NOTE_KEEP);
    }
}

/// What a path toward one destination may be drawn from.
pub(super) struct PathInputs {
    pub(super) pool: Vec<Candidate>,
    pub(super) exclude: Vec<NodeId>,
    pub(super) ends: Vec<IpAddr>,
}

fn why(usable: usize, needed: u8) -> String {
    format!(
        "{usable} usable relay{}, {needed} needed",
        if usable == 1 { "" } else { "s" }
    )
}

impl Node {
    /// The relays a circuit to `dst` may use, and what they must avoid.
    pub(super) fn path_inputs(&self, dst: &Ipv6Addr) -> PathInputs {
        let mut exclude = vec![self.node_id()];
        exclude.extend(self.circ.pool.blamed());
        let pool = self.circ.pool.candidates(dst);
        let mut ends: Vec<IpAddr> = self.own.endpoints().iter().map(|e| e.ip()).collect();
        if let Some(d) = self.local_peer(dst) {
            ends.extend(d.ips.iter().copied());
        }
        PathInputs {
            pool,
            exclude,
            ends,
        }
    }

    fn usable_toward(&self, dst: &Ipv6Addr) -> usize {
        let p = self.path_inputs(dst);
        route::usable(
            &p.pool,
            &p.exclude,
            &p.ends,
            self.config.relay.distinct_subnets,
        )
    }

    /// For [`Policy::Prefer`]: whether packets to `dst` take a circuit
    /// (one exists or can be built, or builds fail for another reason than
    /// too few relays, which `circuit_send` answers); if not, the decision
    /// is noted and they go direct.
    pub(in crate::proto::node) fn relays_for(
        &mut self,
        now: Instant,
        dst: Ipv6Addr,
        min: u8,
        max: u8,
    ) -> bool {
        if self.circ.out.current(&dst).is_some() {
            return true;
        }
        // A direct decision holds for RECHECK: a flow going direct costs
        // two map lookups a packet.
        if let Some(n) = self.circ.notes.map.get_mut(&dst) {
            if n.outcome != RouteOutcome::Unreachable
                && now.saturating_duration_since(n.checked) < RECHECK
            {
                n.used = now;
                return false;
            }
        }
        if self.talks_to_us_directly(now, &dst) {
            let usable = self.circ.notes.map.get(&dst).map_or(0, |n| n.usable);
            self.note(now, dst, RouteOutcome::DirectReply, usable, min);
            return false;
        }
        if self.build_failing(now, &dst) {
            // Answered "unreachable" for a while by circuit_send; a relay
            // to blame drops out of the pool meanwhile.
            return true;
        }
        match self.build_circuit(now, dst, min, max) {
            Ok(_) => {
                if let Some(old) = self.circ.notes.map.remove(&dst) {
                    tracing::info!(
                        "relays available now: a destination that went direct ({}) gets a circuit",
                        why(old.usable, old.needed)
                    );
                }
                true
            }
            Err(BuildError::NoPath) => {
                let usable = self.usable_toward(&dst);
                self.note(now, dst, RouteOutcome::Direct, usable, min);
                false
            }
            // Not a shortage of relays: no reason to give up on them.
            Err(e) => {
                tracing::debug!(%dst, ?e, "no circuit built");
                true
            }
        }
    }

    /// Until when the decision to send to `dst` direct stands, if a direct
    /// decision is noted (policies that weigh relays note theirs; a direct
    /// policy notes none and decides the same every time).
    pub(in crate::proto::node) fn direct_until(&self, dst: &Ipv6Addr) -> Option<Instant> {
        self.circ
            .notes
            .map
            .get(dst)
            .filter(|n| n.outcome != RouteOutcome::Unreachable)
            .map(|n| n.checked + RECHECK)
    }

    /// Whether `dst` sent us an application packet over a direct link
    /// lately.
    fn talks_to_us_directly(&self, now: Instant, dst: &Ipv6Addr) -> bool {
        self.links
            .for_addr(dst)
            .and_then(|l| l.chan.last_app_rx)
            .is_some_and(|t| now.saturating_duration_since(t) < DIRECT_REPLY)
    }

    /// Whether `dst` was found unreachable (strict policy, too few relays)
    /// lately; its packets are answered at once then, without a new try.
    pub(super) fn noted_unreachable(&mut self, now: Instant, dst: &Ipv6Addr) -> bool {
        match self.circ.notes.map.get_mut(dst) {
            Some(n)
                if n.outcome == RouteOutcome::Unreachable
                    && now.saturating_duration_since(n.checked) < RECHECK =>
            {
                n.used = now;
                true
            }
            _ => false,
        }
    }

    /// A strict policy built no circuit to `dst` for want of relays:
    /// noted (and logged).
    pub(super) fn note_unreachable(&mut self, now: Instant, dst: Ipv6Addr, needed: u8) {
        let usable = self.usable_toward(&dst);
        self.note(now, dst, RouteOutcome::Unreachable, usable, needed);
    }

    fn note(
        &mut self,
        now: Instant,
        dst: Ipv6Addr,
        outcome: RouteOutcome,
        usable: usize,
        needed: u8,
    ) {
        let old = self.circ.notes.map.get(&dst).copied();
        self.circ.notes.insert(
            dst,
            RouteNote {
                outcome,
                usable,
                needed,
                checked: now,
                used: now,
            },
        );
        if old.is_some_and(|o| o.outcome == outcome) {
            return;
        }
        tracing::debug!(%dst, ?outcome, usable, needed, "route decision");
        // Destinations of this node's own traffic appear at debug only
        // (README, *Logs*), and a program sending to many addresses gets
        // one info line a minute per kind, not one per address.
        let k = outcome.index();
        let notes = &mut self.circ.notes;
        if notes.logged[k].is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY) {
            notes.quiet[k] += 1;
            return;
        }
        notes.logged[k] = Some(now);
        let more = match std::mem::take(&mut notes.quiet[k]) {
            0 => String::new(),
            n => format!(" ({n} more like it in the last minute)"),
        };
        match outcome {
            RouteOutcome::Direct => tracing::info!(
                "going direct to a destination: {} (the preset takes relays whenever possible){more}",
                why(usable, needed)
            ),
            RouteOutcome::DirectReply => tracing::info!(
                "answering a node that talks to us over a direct link, over that link{more}"
            ),
            RouteOutcome::Unreachable => tracing::info!(
                "destination unreachable: {}; this route never goes direct{more}",
                why(usable, needed)
            ),
        }
    }

    /// The per-destination decisions, for `qgate circuits`.
    pub(in crate::proto::node) fn route_notes(&self, now: Instant) -> Vec<RouteNoteView> {
        let mut v: Vec<RouteNoteView> = self
            .circ
            .notes
            .map
            .iter()
            .map(|(d, n)| RouteNoteView {
                destination: *d,
                outcome: n.outcome,
                usable_relays: n.usable,
                needed: n.needed,
                idle_secs: now.saturating_duration_since(n.used).as_secs_f64(),
            })
            .collect();
        v.sort_by_key(|n| n.destination);
        v
    }

    /// What the default policy does now and why, for `qgate status`:
    /// from the decisions packets took when there are any, else predicted
    /// for the nodes this one has links to (the likeliest destinations; a
    /// relay is never usable for traffic to itself).
    pub fn routing_summary(&self) -> RoutingSummary {
        let policy = self.config.routes.default;
        let needed = policy.relays().map_or(0, |(min, _)| min);
        let count = |o: RouteOutcome| {
            self.circ
                .notes
                .map
                .values()
                .filter(|n| n.outcome == o)
                .count()
        };
        let latest = self
            .circ
            .notes
            .map
            .values()
            .filter(|n| {
                // The core reads no clock: the last timer tick is "now"
                // to within a tick.
                self.last_timer.saturating_duration_since(n.used) < SUMMARY_FRESH
            })
            .max_by_key(|n| n.used);
        let usable = match latest {
            Some(n) => n.usable,
            None => self
                .links
                .addrs()
                .take(64)
                .map(|a| self.usable_toward(a))
                .min()
                .unwrap_or_else(|| self.usable_toward(&Ipv6Addr::UNSPECIFIED)),
        };
        let circuits = self.circ.out.len();
        let through = |n: usize| {
            format!(
                "{n} destination{} through relays",
                if n == 1 { "" } else { "s" }
            )
        };
        let summary = match (policy, latest) {
            _ if !self.config.has_tun => {
                "relay only: forwards circuits, sends no traffic of its own".to_string()
            }
            (Policy::Direct, _) => "direct: the route policy asks for no relays".to_string(),
            (_, Some(n)) => {
                let mut s = match n.outcome {
                    RouteOutcome::Direct => format!("direct: {}", why(n.usable, n.needed)),
                    RouteOutcome::DirectReply => {
                        "direct: answering a node that talks to us over a direct link".to_string()
                    }
                    RouteOutcome::Unreachable => {
                        format!("unreachable: {}", why(n.usable, n.needed))
                    }
                };
                if n.outcome == RouteOutcome::Unreachable {
                    s.push_str("; this policy never goes direct");
                }
                if circuits > 0 {
                    s.push_str(&format!("; {}", through(circuits)));
                }
                s
            }
            (_, None) if circuits > 0 => format!("{}, {}", through(circuits), why(usable, needed)),
            (_, None) if usable >= usize::from(needed) => {
                format!("through relays: {}", why(usable, needed))
            }
            (Policy::Prefer(..), None) => format!("direct: {}", why(usable, needed)),
            (Policy::Hops(..), None) => format!(
                "unreachable: {}; this policy never goes direct",
                why(usable, needed)
            ),
        };
        RoutingSummary {
            default: policy.to_string(),
            pool: self.circ.pool.len(),
            usable_relays: usable,
            needed,
            direct_fallbacks: count(RouteOutcome::Direct) + count(RouteOutcome::DirectReply),
            unreachable: count(RouteOutcome::Unreachable),
            summary,
        }
    }
}
