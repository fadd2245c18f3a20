//! The consistent hash ring that places rooms on workers.
//!
//! Every node that builds a ring from the same worker list must place every
//! room on the same worker, so the key is hashed explicitly (FNV-1a over the
//! bytes of `app`, a NUL, and `channel`) rather than through `std::hash`,
//! whose output for `str` is not a stable contract. Virtual nodes spread each
//! worker over the ring so that adding or removing one of N workers moves
//! about 1/N of the rooms.

use consistent_hash_ring::{Ring as HashRing, RingBuilder};

/// Virtual nodes per worker: enough for an even spread with a few workers.
pub const DEFAULT_VNODES: usize = 64;

pub struct Ring {
    inner: HashRing<usize>,
}

impl Ring {
    /// A ring over workers `0..n`.
    pub fn new(n: usize, vnodes: usize) -> Ring {
        assert!(n > 0, "a ring needs at least one worker");
        Ring {
            inner: RingBuilder::default()
                .vnodes(vnodes)
                .nodes_iter(0..n)
                .build(),
        }
    }

    /// The worker that owns `channel` of `app`.
    pub fn owner(&self, app: &str, channel: &str) -> usize {
        *self.inner.get(room_hash(app, channel))
    }

    /// Every worker in this room's ring order: the owner first, then the
    /// ones its rooms fall to if the workers before them are down.
    pub fn candidates<'a>(&'a self, app: &str, channel: &str) -> impl Iterator<Item = usize> + 'a {
        self.inner.replicas(room_hash(app, channel)).copied()
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// A ring over named nodes (a cluster's worker addresses): every process that
/// builds it from the same names, in any order, places every room the same
/// way, and adding or removing one name moves only that name's share.
pub struct NamedRing {
    inner: HashRing<u64>,
    names: std::collections::HashMap<u64, String>,
}

impl NamedRing {
    pub fn new(names: &[String], vnodes: usize) -> NamedRing {
        let ids: std::collections::HashMap<u64, String> = names
            .iter()
            .map(|n| (room_hash(n, ""), n.clone()))
            .collect();
        let inner = RingBuilder::default()
            .vnodes(vnodes)
            .nodes_iter(ids.keys().copied())
            .build();
        NamedRing { inner, names: ids }
    }

    /// Every node in this room's ring order (none for an empty ring).
    pub fn candidates<'a>(
        &'a self,
        app: &str,
        channel: &str,
    ) -> impl Iterator<Item = &'a str> + 'a {
        let order: Vec<&'a str> = if self.inner.is_empty() {
            Vec::new()
        } else {
            self.inner
                .replicas(room_hash(app, channel))
                .map(|id| self.names[id].as_str())
                .collect()
        };
        order.into_iter()
    }
}

/// FNV-1a ([`crate::fnv`]) of `app`, a NUL and `channel`: stable across
/// builds, platforms and processes.
pub fn room_hash(app: &str, channel: &str) -> u64 {
    crate::fnv::Fnv1a::new()
        .write(app.as_bytes())
        .write(&[0])
        .write(channel.as_bytes())
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_hash_values_are_pinned() {
        // Placement across processes and versions rests on these values.
        assert_eq!(room_hash("1", "room"), 0x90d8_da2c_caf4_d0af);
        assert_eq!(room_hash("app", "presence-lobby"), 0xfcfa_8de2_f27d_b244);
        assert_eq!(room_hash("", ""), 0xaf63_bd4c_8601_b7df);
        assert_eq!(room_hash("worker-a:7001", ""), 0x8a96_772c_1ecc_6a8f);
    }

    #[test]
    fn same_input_same_owner_on_every_ring() {
        let a = Ring::new(5, DEFAULT_VNODES);
        let b = Ring::new(5, DEFAULT_VNODES);
        for i in 0..1000 {
            let ch = format!("room-{i}");
            assert_eq!(a.owner("1", &ch), b.owner("1", &ch));
        }
    }

    #[test]
    fn spread_is_even_enough_and_growth_moves_about_one_nth() {
        let n = 4;
        let small = Ring::new(n, DEFAULT_VNODES);
        let big = Ring::new(n + 1, DEFAULT_VNODES);
        let rooms = 20_000;
        let mut per = vec![0usize; n];
        let mut moved = 0;
        for i in 0..rooms {
            let ch = format!("room-{i}");
            let before = small.owner("app", &ch);
            per[before] += 1;
            let after = big.owner("app", &ch);
            if before != after {
                assert_eq!(after, n, "a room only ever moves to the new worker");
                moved += 1;
            }
        }
        let ideal = rooms / n;
        for c in per {
            assert!(
                c > ideal / 2 && c < ideal * 3 / 2,
                "uneven spread: {c} vs {ideal}"
            );
        }
        let expected = rooms / (n + 1);
        assert!(
            moved > expected / 2 && moved < expected * 3 / 2,
            "moved {moved}, expected about {expected}"
        );
    }

    #[test]
    fn removing_one_of_n_moves_only_its_rooms_to_their_next_candidates() {
        let ring = Ring::new(5, DEFAULT_VNODES);
        let (mut moved, rooms) = (0, 20_000);
        for i in 0..rooms {
            let ch = format!("room-{i}");
            let mut c = ring.candidates("app", &ch);
            let owner = c.next().unwrap();
            assert_eq!(
                owner,
                ring.owner("app", &ch),
                "the first candidate is the owner"
            );
            // Worker 2 leaves: only its rooms move, to their second candidate.
            let after = if owner == 2 { c.next().unwrap() } else { owner };
            if after != owner {
                moved += 1;
                assert_ne!(after, 2);
            }
        }
        let expected = rooms / 5;
        assert!(
            moved > expected / 2 && moved < expected * 3 / 2,
            "moved {moved}, expected about {expected}"
        );
        let all: Vec<usize> = ring.candidates("app", "x").collect();
        assert_eq!(all.len(), 5, "every worker appears once: {all:?}");
    }

    #[test]
    fn named_rings_agree_whatever_the_order_and_move_little() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = NamedRing::new(&names(&["w1:1", "w2:1", "w3:1"]), DEFAULT_VNODES);
        let b = NamedRing::new(&names(&["w3:1", "w1:1", "w2:1"]), DEFAULT_VNODES);
        let grown = NamedRing::new(&names(&["w1:1", "w2:1", "w3:1", "w4:1"]), DEFAULT_VNODES);
        let mut moved = 0;
        for i in 0..8000 {
            let ch = format!("room-{i}");
            let owner = a.candidates("1", &ch).next().unwrap();
            assert_eq!(owner, b.candidates("1", &ch).next().unwrap());
            let after = grown.candidates("1", &ch).next().unwrap();
            if after != owner {
                assert_eq!(after, "w4:1", "rooms only move to the new worker");
                moved += 1;
            }
        }
        assert!(
            moved > 1000 && moved < 3000,
            "about a quarter moved: {moved}"
        );
        assert_eq!(NamedRing::new(&[], 8).candidates("1", "x").count(), 0);
    }

    #[test]
    fn hash_is_stable() {
        // Pinned so a change of hash (which would re-home every room in a
        // mixed-version cluster) cannot slip in unnoticed.
        assert_eq!(room_hash("", ""), 0xaf63_bd4c_8601_b7df);
        assert_ne!(room_hash("a", "b"), room_hash("ab", ""));
    }
}
