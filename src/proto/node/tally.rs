//! Counter structs as lists of named values, and the totals of links that
//! are gone, so that sums over links never go down (`qgate run`'s
//! `metrics` endpoint exports them as monotonic counters).

use super::{CellDrops, Drops, LinkCounters, Node};

/// Gives a struct of `u64` counters a list of its fields by name
/// ([`named`](Drops::named), in declaration order) and a field-by-field sum.
/// The names are the fields' own, as `qgate status` serializes them; the
/// test below checks that every field is listed.
macro_rules! tally {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        impl $ty {
            /// Every counter with its name.
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field)),+]
            }

            /// Adds `other` field by field (saturating).
            pub fn add(&mut self, other: &$ty) {
                $(self.$field = self.$field.saturating_add(other.$field);)+
            }

            /// Takes `other` away field by field (saturating).
            pub fn sub(&mut self, other: &$ty) {
                $(self.$field = self.$field.saturating_sub(other.$field);)+
            }
        }
    };
}

tally!(Drops {
    malformed,
    unknown_session,
    handshake_rejected,
    auth_failed,
    replay,
    bad_inner,
    unverified,
    spoofed_source,
    wrong_destination,
    bad_record,
    hello_limited,
    stale_record,
    no_route,
    tun_malformed,
    too_big,
    link_limit,
    send_failed,
    lookup_limited,
    unreachable,
    access_denied,
    subnet_limit,
    rate_limited,
});

tally!(CellDrops {
    bad_size,
    bad_kind,
    unknown_circuit,
    forged,
    replay,
    unrecognised,
    malformed,
    spoofed_source,
    unauthenticated,
    over_bandwidth,
    noise,
    create_limited,
    send_failed,
});

tally!(LinkCounters {
    tx_packets,
    tx_bytes,
    tx_wire_bytes,
    rx_packets,
    rx_bytes,
    rx_wire_bytes,
    tx_compressed,
    rx_compressed,
});

/// What links that were removed had counted, summed.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClosedLinks {
    /// Links removed since start.
    pub links: u64,
    /// Their traffic counters.
    pub counters: LinkCounters,
    /// Their drops.
    pub drops: Drops,
}

impl ClosedLinks {
    /// Adds what a removed link counted after it was removed (a data
    /// plane's last report).
    pub(super) fn settle(&mut self, counters: &LinkCounters, drops: &Drops) {
        self.counters.add(counters);
        self.drops.add(drops);
    }

    pub(super) fn close(&mut self, counters: &LinkCounters, drops: &Drops) {
        self.links += 1;
        self.counters.add(counters);
        self.drops.add(drops);
    }
}

impl Node {
    /// The counters of links removed since start: with the live links'
    /// counters in [`Node::status`], totals that only grow.
    pub fn closed_links(&self) -> ClosedLinks {
        self.links.closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field `qgate status` reports is in the named list, under the
    /// same name: a field added to a struct but not to its `tally!` fails.
    fn same_fields<T: serde::Serialize>(value: &T, named: Vec<(&'static str, u64)>) {
        let json = serde_json::to_value(value).expect("serializes");
        let mut from_serde: Vec<&str> = json
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut listed: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
        from_serde.sort_unstable();
        listed.sort_unstable();
        assert_eq!(from_serde, listed);
    }

    #[test]
    fn tallies_list_every_field() {
        same_fields(&Drops::default(), Drops::default().named());
        same_fields(&CellDrops::default(), CellDrops::default().named());
        same_fields(&LinkCounters::default(), LinkCounters::default().named());
    }

    #[test]
    fn add_sums_field_by_field_and_saturates() {
        let mut a = Drops {
            replay: 2,
            rate_limited: u64::MAX - 1,
            ..Drops::default()
        };
        let b = Drops {
            replay: 3,
            no_route: 7,
            rate_limited: 5,
            ..Drops::default()
        };
        a.add(&b);
        assert_eq!((a.replay, a.no_route, a.rate_limited), (5, 7, u64::MAX));
        let named = a.named();
        assert!(named.contains(&("no_route", 7)), "{named:?}");
        let mut closed = ClosedLinks::default();
        let c = LinkCounters {
            tx_bytes: 10,
            ..LinkCounters::default()
        };
        closed.close(&c, &b);
        closed.close(&c, &b);
        assert_eq!(
            (
                closed.links,
                closed.counters.tx_bytes,
                closed.drops.no_route
            ),
            (2, 20, 14)
        );
    }
}
