//! Which caching gateway a client asks for which piece, sans IO:
//! rendezvous (highest random weight) hashing of the piece over the
//! gateways still working.
//!
//! Every client computes the same owner for a piece from the same gateway
//! list, so each gateway caches a disjoint part of the popular content and
//! a piece crosses the gateways' upstream once, not once per gateway. When
//! a gateway fails, only its pieces move (each to the gateway with the next
//! highest weight); the others stay where they are cached.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::id::Id;

/// The weight of `gateway` for piece `piece` of file `id`.
pub fn weight(id: &Id, piece: u64, gateway: &SocketAddr) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"qdfs-route-v1");
    h.update(&id.0);
    h.update(&piece.to_be_bytes());
    h.update(gateway.to_string().as_bytes());
    let d = h.finalize();
    let mut w = [0u8; 8];
    w.copy_from_slice(&d.as_bytes()[..8]);
    u64::from_be_bytes(w)
}

/// The gateways of one fetch and which of them still work.
#[derive(Debug)]
pub struct Route {
    gateways: Vec<SocketAddr>,
    dead: Vec<AtomicBool>,
}

impl Route {
    /// A route over these gateways, all working.
    pub fn new(gateways: Vec<SocketAddr>) -> Route {
        let dead = gateways.iter().map(|_| AtomicBool::new(false)).collect();
        Route { gateways, dead }
    }

    /// The working gateway that owns piece `piece` of `id`, if any works.
    pub fn owner(&self, id: &Id, piece: u64) -> Option<SocketAddr> {
        self.gateways
            .iter()
            .zip(&self.dead)
            .filter(|(_, d)| !d.load(Ordering::Relaxed))
            .max_by_key(|(g, _)| (weight(id, piece, g), **g))
            .map(|(g, _)| *g)
    }

    /// Marks a gateway as failed: its pieces go to the others.
    pub fn mark_dead(&self, gateway: &SocketAddr) {
        for (g, d) in self.gateways.iter().zip(&self.dead) {
            if g == gateway {
                d.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_failover_move_only_the_dead_gateways_pieces() {
        let gws: Vec<SocketAddr> = (1..=3)
            .map(|i| format!("127.0.0.{i}:7400").parse().unwrap())
            .collect();
        let r = Route::new(gws.clone());
        let id = Id([5; 32]);
        let before: Vec<_> = (0..300).map(|p| r.owner(&id, p).unwrap()).collect();
        for g in &gws {
            let n = before.iter().filter(|o| *o == g).count();
            assert!((60..=140).contains(&n), "{g}: {n} of 300");
        }
        r.mark_dead(&gws[0]);
        for (p, old) in before.iter().enumerate() {
            let new = r.owner(&id, p as u64).unwrap();
            if *old == gws[0] {
                assert_ne!(new, gws[0]);
            } else {
                assert_eq!(new, *old);
            }
        }
        r.mark_dead(&gws[1]);
        r.mark_dead(&gws[2]);
        assert_eq!(r.owner(&id, 0), None);
    }
}
