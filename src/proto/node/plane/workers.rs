//! More than one data plane (`link.workers`): which plane holds what, and
//! what passes between planes without the node.
//!
//! Link `i` is plane [`worker_of`]`(i, n)`'s. The node's messages reach the
//! planes by [`ToPlane::dispatch`]. A circuit relayed between links of two
//! planes is held by both: each passes on the cells arriving on its link
//! and gives them to the other ([`ToPlane::Pass`]), which seals them and
//! returns the buffers in batches ([`ToPlane::Spares`]). What a plane
//! sends other planes waits in its [`Crossing`] until the caller takes it
//! ([`DataPlane::poll_crossing`](super::DataPlane::poll_crossing)); it
//! never goes to the plane that made it.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv6Addr;

use super::ToPlane;

/// Which of `workers` data workers holds link `index`: the low byte of the
/// index, modulo `workers` (the kernel steers a link's datagrams to the
/// same worker by that byte, `qgate_platform::steer_by_link`).
pub fn worker_of(index: u32, workers: usize) -> usize {
    (index as usize & 0xff) % workers.max(1)
}

impl ToPlane {
    /// Gives this message to the planes of `workers` data workers that
    /// must have it ([`Node::data_planes`](crate::proto::node::Node::data_planes)):
    /// what concerns a link to the plane that holds it, a relayed circuit
    /// to the planes of both its links, and what concerns every plane (an
    /// address no longer routed, a circuit gone, path MTU, the compression
    /// pause) to each. A route for an address goes to one plane, and the
    /// others stop routing the address (so packets for it never leave by
    /// a route the node replaced, from a worker the kernel happened to
    /// give them to).
    pub fn dispatch(self, workers: usize, mut to: impl FnMut(usize, ToPlane)) {
        let n = workers.max(1);
        if n == 1 {
            return to(0, self);
        }
        let one = |index: u32| worker_of(index, n);
        let mut others = |keep: usize, m: &dyn Fn() -> ToPlane| {
            for w in (0..n).filter(|w| *w != keep) {
                to(w, m());
            }
        };
        let (w, msg) = match self {
            ToPlane::Handoff(ref lane) => (one(lane.index), self),
            ToPlane::Route(addr, index, _) => {
                others(one(index), &|| ToPlane::Unroute(addr));
                (one(index), self)
            }
            ToPlane::RouteCircuit(ref r, _) => {
                let (dst, w) = (r.dst, one(r.link));
                others(w, &|| ToPlane::Unroute(dst));
                (w, self)
            }
            ToPlane::Withdraw(index)
            | ToPlane::Seal(index, _)
            | ToPlane::SealRelayed(index, _, _)
            | ToPlane::SealApp(index, _)
            | ToPlane::SetCompress(index, _)
            | ToPlane::Initiate(index, _) => (one(index), self),
            ToPlane::Relay(r) => {
                // Both planes of a circuit whose links sit on two: each
                // takes the cells arriving on its link.
                let w = one(r.prev.0);
                match r.next.map(|next| one(next.0)).filter(|v| *v != w) {
                    Some(v) => {
                        to(v, ToPlane::Relay(r.clone()));
                        (w, ToPlane::Relay(r))
                    }
                    None => (w, ToPlane::Relay(r)),
                }
            }
            ToPlane::Pass(index, ..) => (one(index), self),
            ToPlane::Spares(w, _) => (w % n, self),
            ToPlane::Unroute(addr) => {
                others(0, &|| ToPlane::Unroute(addr));
                (0, self)
            }
            ToPlane::Unrelay(h) => {
                others(0, &|| ToPlane::Unrelay(h));
                (0, self)
            }
            ToPlane::SetMtu(ep, mtu) => {
                others(0, &|| ToPlane::SetMtu(ep, mtu));
                (0, self)
            }
            ToPlane::Pause(p) => {
                others(0, &|| ToPlane::Pause(p));
                (0, self)
            }
        };
        to(w, msg)
    }
}

/// Buffers a plane gives back at once to the plane that passed it cells
/// (one allocation, of the list, per batch).
const RETURN_BATCH: usize = 32;

/// Most sources a plane remembers having told the other planes about
/// (see [`Crossing::delivered`]); beyond, it forgets them all.
const MAX_ANNOUNCED: usize = 4096;

/// What one plane sends the others, and what it knows of them.
pub(super) struct Crossing {
    /// Which plane this is, of how many.
    id: usize,
    workers: usize,
    out: VecDeque<ToPlane>,
    /// Per plane, the buffers of the cells it passed over to seal here, to
    /// go back in a batch.
    returns: Vec<Vec<Vec<u8>>>,
    /// Per source, the circuit ending here whose DATA from it this plane
    /// last told the other planes about.
    announced: HashMap<Ipv6Addr, u64>,
}

impl Crossing {
    /// Plane `id` of `workers`.
    pub(super) fn new(id: usize, workers: usize) -> Crossing {
        let workers = workers.max(1);
        Crossing {
            id,
            workers,
            out: VecDeque::new(),
            returns: (0..workers).map(|_| Vec::new()).collect(),
            announced: HashMap::new(),
        }
    }

    /// Whether link `index` belongs on another plane.
    pub(super) fn elsewhere(&self, index: u32) -> bool {
        worker_of(index, self.workers) != self.id
    }

    /// A relayed cell for link `index` of another plane, in `frame`.
    pub(super) fn pass(&mut self, index: u32, frame: Vec<u8>, at: std::time::Instant) {
        self.out.push_back(ToPlane::Pass(index, frame, self.id, at));
    }

    /// Takes the buffer of a cell plane `to` passed here: back to it with
    /// the next batch, or (from this plane) none.
    pub(super) fn give_back(&mut self, to: usize, buf: Vec<u8>) -> Option<Vec<u8>> {
        let Some(list) = self.returns.get_mut(to).filter(|_| to != self.id) else {
            return Some(buf);
        };
        list.push(buf);
        if list.len() >= RETURN_BATCH {
            let bufs = std::mem::replace(list, Vec::with_capacity(RETURN_BATCH));
            self.out.push_back(ToPlane::Spares(to, bufs));
        }
        None
    }

    /// Sends back every buffer waiting for a batch (the plane's tick: a
    /// trickle of cells must not keep them).
    pub(super) fn flush(&mut self) {
        for (to, list) in self.returns.iter_mut().enumerate() {
            if !list.is_empty() {
                let bufs = std::mem::take(list);
                self.out.push_back(ToPlane::Spares(to, bufs));
            }
        }
    }

    /// DATA from `src` came on circuit `h`, which ends here: with more
    /// than one plane, the others stop routing `src` (a route of theirs
    /// goes elsewhere; replies go back on the circuit that last brought
    /// traffic), told once per change of circuit.
    pub(super) fn delivered(&mut self, src: Ipv6Addr, h: u64) {
        if self.workers < 2 || self.announced.get(&src) == Some(&h) {
            return;
        }
        if self.announced.len() >= MAX_ANNOUNCED {
            self.announced.clear();
        }
        self.announced.insert(src, h);
        self.out.push_back(ToPlane::Unroute(src));
    }

    /// The next message for the other planes.
    pub(super) fn poll(&mut self) -> Option<ToPlane> {
        self.out.pop_front()
    }

    /// Which plane this is.
    pub(super) fn id(&self) -> usize {
        self.id
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests read the clock
mod tests {
    use super::*;

    fn kinds(c: &mut Crossing) -> Vec<String> {
        std::iter::from_fn(|| c.poll())
            .map(|m| match m {
                ToPlane::Spares(to, b) => format!("spares {to} {}", b.len()),
                ToPlane::Unroute(a) => format!("unroute {a}"),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn buffers_go_back_in_batches_and_on_the_tick() {
        let mut c = Crossing::new(1, 2);
        // From this plane itself: kept here.
        assert!(c.give_back(1, vec![0; 8]).is_some());
        for _ in 0..RETURN_BATCH + 3 {
            assert!(c.give_back(0, vec![0; 8]).is_none());
        }
        assert_eq!(kinds(&mut c), vec![format!("spares 0 {RETURN_BATCH}")]);
        c.flush();
        assert_eq!(kinds(&mut c), vec!["spares 0 3".to_string()]);
        c.flush();
        assert!(kinds(&mut c).is_empty(), "nothing left to send back");
    }

    #[test]
    fn other_planes_hear_once_per_change_of_circuit() {
        let src: Ipv6Addr = "fc00::5".parse().unwrap();
        let mut c = Crossing::new(0, 2);
        c.delivered(src, 7);
        c.delivered(src, 7);
        c.delivered(src, 8);
        assert_eq!(kinds(&mut c), vec![format!("unroute {src}"); 2]);
        // One plane: nobody to tell.
        let mut one = Crossing::new(0, 1);
        one.delivered(src, 7);
        assert!(kinds(&mut one).is_empty());
    }

    #[test]
    fn links_and_routes_go_to_the_plane_that_holds_the_link() {
        assert_eq!(worker_of(0x0001_0203, 2), 1);
        assert_eq!(worker_of(0x0001_0203, 3), 0x03 % 3);
        let addr: Ipv6Addr = "fc00::9".parse().unwrap();
        let until = std::time::Instant::now();
        let mut got = Vec::new();
        ToPlane::Route(addr, 5, until).dispatch(3, |w, m| {
            got.push((w, matches!(m, ToPlane::Route(..))));
        });
        got.sort();
        // Plane 2 routes it; the others stop routing the address.
        assert_eq!(got, vec![(0, false), (1, false), (2, true)]);
        let mut got = Vec::new();
        ToPlane::Unrelay(3).dispatch(3, |w, _| got.push(w));
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
    }
}
