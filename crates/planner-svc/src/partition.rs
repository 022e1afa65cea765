//! Partitions: which partition a session falls into, which live instance a partition belongs to,
//! and the set of partitions this instance serves. Pure functions and an atomic set, free of
//! NATS, so the rules are tested on their own (the leases that apply them are `ownership.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// FNV-1a, 32 bits: the hash nats-server's subject mapping `partition(n, ...)` applies to the
/// bytes of the tokens it names (`subject_transform.go`, `getHashPartition`), so a session's
/// partition here is the one the report stream's subject transform writes into its subject.
fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in bytes {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The partition of `session` among `partitions` (at least 1): what nats-server's
/// `{{partition(partitions,1)}}` gives for a subject whose first wildcard token is `session`.
pub fn partition_of(session: &str, partitions: u32) -> u32 {
    fnv1a32(session.as_bytes()) % partitions.max(1)
}

/// 64-bit FNV-1a then a final mix (splitmix64's), for rendezvous weights: FNV alone clusters
/// on inputs that differ in their last bytes only.
fn weight(member: &str, partition: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in member
        .as_bytes()
        .iter()
        .chain(b"/")
        .chain(partition.to_le_bytes().iter())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The member `partition` belongs to: rendezvous (highest random weight) hashing, so that a
/// member joining takes about 1/n of the partitions from the others and one leaving gives only
/// its own away. Every instance computes the same answer from the same members.
pub fn assigned_member(partition: u32, members: &[String]) -> Option<&str> {
    members
        .iter()
        .max_by(|a, b| {
            weight(a, partition)
                .cmp(&weight(b, partition))
                .then_with(|| b.cmp(a))
        })
        .map(String::as_str)
}

/// What this instance knows of partitions: which it serves (read on every request, report and
/// timer, so an atomic flag each) and who it last saw owning each of the others (where to
/// forward).
#[derive(Debug)]
pub struct Partitions {
    count: u32,
    owned: Vec<AtomicBool>,
    owners: RwLock<Vec<Option<String>>>,
}

impl Partitions {
    /// `count` partitions (at least 1), none served, no owner known.
    pub fn new(count: u32) -> Arc<Self> {
        let count = count.max(1);
        Arc::new(Partitions {
            count,
            owned: (0..count).map(|_| AtomicBool::new(false)).collect(),
            owners: RwLock::new(vec![None; count as usize]),
        })
    }

    /// Every partition served here: a single instance without leases.
    pub fn all_owned(count: u32) -> Arc<Self> {
        let partitions = Self::new(count);
        for flag in &partitions.owned {
            flag.store(true, Ordering::Release);
        }
        partitions
    }

    /// How many partitions there are.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The partition of `session`.
    pub fn of(&self, session: &str) -> u32 {
        partition_of(session, self.count)
    }

    /// Whether this instance serves `partition`.
    pub fn owns(&self, partition: u32) -> bool {
        self.owned
            .get(partition as usize)
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    }

    /// Whether this instance serves `session`'s partition.
    pub fn owns_session(&self, session: &str) -> bool {
        self.owns(self.of(session))
    }

    /// Marks `partition` served here or not.
    pub fn set_owned(&self, partition: u32, owned: bool) {
        if let Some(flag) = self.owned.get(partition as usize) {
            flag.store(owned, Ordering::Release);
        }
    }

    /// The partitions served here, in order.
    pub fn owned(&self) -> Vec<u32> {
        (0..self.count).filter(|p| self.owns(*p)).collect()
    }

    /// Serves nothing any more (a daemon that stopped or was dropped).
    pub fn disown_all(&self) {
        for flag in &self.owned {
            flag.store(false, Ordering::Release);
        }
    }

    /// Records who owns each partition, as last read from the lease bucket.
    pub fn set_owners(&self, owners: Vec<Option<String>>) {
        let mut table = self.owners.write().unwrap_or_else(PoisonError::into_inner);
        *table = owners;
        table.resize(self.count as usize, None);
    }

    /// The instance last seen owning `partition`, if any.
    pub fn owner(&self, partition: u32) -> Option<String> {
        self.owners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(partition as usize)
            .cloned()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn a_session_always_falls_in_the_same_partition_within_range() {
        for i in 0..1000 {
            let session = format!("s-{i}");
            let p = partition_of(&session, 32);
            assert!(p < 32);
            assert_eq!(p, partition_of(&session, 32));
        }
        assert_eq!(partition_of("anything", 0), 0, "no division by zero");
    }

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("instance-{i}")).collect()
    }

    #[test]
    fn rendezvous_spreads_partitions_and_a_join_moves_only_what_the_newcomer_takes() {
        let two = members(2);
        let three = members(3);
        let mut moved = 0;
        let mut counts = [0usize; 3];
        for p in 0..32 {
            let before = assigned_member(p, &two).unwrap();
            let after = assigned_member(p, &three).unwrap();
            if before != after {
                moved += 1;
                assert_eq!(after, "instance-2", "a partition moved between old members");
            }
            counts[three.iter().position(|m| m == after).unwrap()] += 1;
        }
        assert!((5..=18).contains(&moved), "moved {moved} of 32");
        assert!(counts.iter().all(|c| *c >= 4), "{counts:?}");
        assert_eq!(assigned_member(3, &[]), None);
    }

    #[test]
    fn every_instance_computes_the_same_owner_whatever_the_order_of_members() {
        let mut shuffled = members(5);
        shuffled.reverse();
        for p in 0..64 {
            assert_eq!(
                assigned_member(p, &members(5)),
                assigned_member(p, &shuffled)
            );
        }
    }

    #[test]
    fn owned_partitions_are_tracked() {
        let partitions = Partitions::new(8);
        assert!(partitions.owned().is_empty());
        partitions.set_owned(3, true);
        partitions.set_owned(99, true);
        assert_eq!(partitions.owned(), vec![3]);
        assert!(Partitions::all_owned(4).owns(3));
        partitions.set_owners(vec![Some("a".into())]);
        assert_eq!(partitions.owner(0).as_deref(), Some("a"));
        assert_eq!(partitions.owner(7), None);
        partitions.disown_all();
        assert!(partitions.owned().is_empty());
    }
}
