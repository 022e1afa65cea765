//! Partitions: which partition a session falls into, which live instance a partition belongs to,
//! and the set of partitions this instance serves. Pure functions and an atomic set, free of
//! NATS, so the rules are tested on their own (the leases that apply them are `ownership.rs`).

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

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
/// timer, so an atomic each), who owns each of the others and which members are live (where
/// to forward), as last seen in the lease bucket: its watch updates both at once, each lease
/// round rewrites them whole.
#[derive(Debug)]
pub struct Partitions {
    count: u32,
    served: Vec<AtomicU8>,
    /// Requests being answered here, per partition ([`Answering`]): a partition given away is
    /// forgotten only once they are done, else one still waiting for its session's lock would
    /// load the session again on the instance that just gave it away.
    answering: Vec<AtomicU32>,
    owners: RwLock<Vec<Option<String>>>,
    members: RwLock<Vec<String>>,
}

/// Not served here.
const NOT_SERVED: u8 = 0;
/// Served here: its reports pumped, its sessions recovered and timed here.
const SERVED: u8 = 1;
/// Being handed over: the lease is still ours and its pump drains, so requests are still
/// answered here (the sessions are in memory), but nothing new is started for it.
const HANDING_OVER: u8 = 2;

impl Partitions {
    /// `count` partitions (at least 1), none served, no owner known.
    pub fn new(count: u32) -> Arc<Self> {
        let count = count.max(1);
        Arc::new(Partitions {
            count,
            served: (0..count).map(|_| AtomicU8::new(NOT_SERVED)).collect(),
            answering: (0..count).map(|_| AtomicU32::new(0)).collect(),
            owners: RwLock::new(vec![None; count as usize]),
            members: RwLock::new(Vec::new()),
        })
    }

    /// Every partition served here: a single instance without leases.
    pub fn all_owned(count: u32) -> Arc<Self> {
        let partitions = Self::new(count);
        for flag in &partitions.served {
            flag.store(SERVED, Ordering::Release);
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

    fn state(&self, partition: u32) -> u8 {
        self.served
            .get(partition as usize)
            .map_or(NOT_SERVED, |flag| flag.load(Ordering::Acquire))
    }

    fn set_state(&self, partition: u32, state: u8) {
        if let Some(flag) = self.served.get(partition as usize) {
            // Sequentially consistent for `route` and `drain` (see there).
            flag.store(state, Ordering::SeqCst);
        }
    }

    /// Whether this instance serves `partition`.
    pub fn owns(&self, partition: u32) -> bool {
        self.state(partition) == SERVED
    }

    /// Whether this instance serves `session`'s partition.
    pub fn owns_session(&self, session: &str) -> bool {
        self.owns(self.of(session))
    }

    /// Marks `partition` served here or not.
    pub fn set_owned(&self, partition: u32, owned: bool) {
        self.set_state(partition, if owned { SERVED } else { NOT_SERVED });
    }

    /// Marks `partition` as being handed over: no longer served (no recovery, no timers), but
    /// its requests still answered here until its lease is released ([`Partitions::set_owned`]
    /// false then).
    pub fn set_handing_over(&self, partition: u32) {
        self.set_state(partition, HANDING_OVER);
    }

    /// The partitions served here, in order.
    pub fn owned(&self) -> Vec<u32> {
        (0..self.count).filter(|p| self.owns(*p)).collect()
    }

    /// Serves nothing any more (a daemon that stopped or was dropped).
    pub fn disown_all(&self) {
        for flag in &self.served {
            flag.store(NOT_SERVED, Ordering::Release);
        }
    }

    /// Records who owns each partition, as read from the lease bucket by a round.
    pub fn set_owners(&self, owners: Vec<Option<String>>) {
        let mut table = self.owners.write().unwrap_or_else(PoisonError::into_inner);
        *table = owners;
        table.resize(self.count as usize, None);
    }

    /// Records the owner of one partition (`None`: its lease was deleted), as the bucket's
    /// watch saw it. Whether that changed the owner known.
    pub fn set_owner(&self, partition: u32, owner: Option<String>) -> bool {
        let mut table = self.owners.write().unwrap_or_else(PoisonError::into_inner);
        match table.get_mut(partition as usize) {
            Some(slot) if *slot != owner => {
                *slot = owner;
                true
            }
            _ => false,
        }
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

    /// Records the live members, as read by a round.
    pub fn set_members(&self, members: Vec<String>) {
        let mut list = self.members.write().unwrap_or_else(PoisonError::into_inner);
        *list = members;
    }

    /// A member joined (`live`) or left, as the bucket's watch saw it.
    pub fn set_member(&self, member: &str, live: bool) {
        let mut list = self.members.write().unwrap_or_else(PoisonError::into_inner);
        let known = list.iter().position(|m| m == member);
        match (known, live) {
            (None, true) => list.push(member.to_owned()),
            (Some(at), false) => {
                list.swap_remove(at);
            }
            _ => {}
        }
    }

    /// Where instance `me` answers a request for a session of `partition`: here, holding the
    /// partition's sessions in memory until it is done when this instance serves or hands it
    /// over ([`Answering`]), here without holding anything ([`Partitions::forward_to`] found
    /// no one else), or at another instance.
    pub fn route(self: &Arc<Self>, partition: u32, me: &str) -> Route {
        if let Some(answering) = self.hold(partition) {
            return Route::Here(Some(answering));
        }
        match self.forward_to(partition, me) {
            Some(owner) => Route::Forward(owner),
            None => Route::Here(None),
        }
    }

    /// Holds `partition`'s sessions in memory for a request answered here, when it is served
    /// or handed over here; `None` (nothing held) when it is not.
    pub fn hold(self: &Arc<Self>, partition: u32) -> Option<Answering> {
        // Counted before the state is read, and `drain` reads the count after the state is
        // written, both sequentially consistent: either this request sees the partition
        // given away, or the drain sees this request.
        let answering = self.answering.get(partition as usize).map(|count| {
            count.fetch_add(1, Ordering::SeqCst);
            Answering {
                partitions: Arc::clone(self),
                partition,
            }
        })?;
        let state = self
            .served
            .get(partition as usize)
            .map_or(NOT_SERVED, |flag| flag.load(Ordering::SeqCst));
        (state != NOT_SERVED).then_some(answering)
    }

    /// Waits, up to `within`, until no request routed here for `partition` while it was served
    /// or handed over ([`Partitions::route`]) is still being answered; call it after marking
    /// the partition not served. Whether they all finished (past `within`, the caller goes on:
    /// optimistic concurrency fences what is left).
    pub async fn drain(&self, partition: u32, within: Duration) -> bool {
        let Some(count) = self.answering.get(partition as usize) else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + within;
        // Polled: a handover waits here once per partition given away, for requests that
        // take milliseconds, and a notification on every request's end would cost them all.
        while count.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// Where instance `me` sends a request for a session of `partition`: `None` to answer it
    /// here (served here, or being handed over from here), else the instance to forward it to.
    /// That is the partition's owner; while it has none (in transit: released by its last
    /// owner, not yet taken, or its owner's lease expired), the member rendezvous hashing
    /// gives it to, which takes it next. Answered here when that is this instance.
    pub fn forward_to(&self, partition: u32, me: &str) -> Option<String> {
        if self.state(partition) != NOT_SERVED {
            return None;
        }
        if let Some(owner) = self.owner(partition).filter(|owner| owner != me) {
            return Some(owner);
        }
        let members = self.members.read().unwrap_or_else(PoisonError::into_inner);
        assigned_member(partition, &members)
            .filter(|next| *next != me)
            .map(str::to_owned)
    }
}

/// Where a request is answered ([`Partitions::route`]).
#[derive(Debug)]
pub enum Route {
    /// Here; holding its partition's sessions in memory until dropped, when served here.
    Here(Option<Answering>),
    /// Forwarded to this instance.
    Forward(String),
}

/// A request being answered here for a partition served or handed over here: until it is
/// dropped, [`Partitions::drain`] waits before the partition's sessions are forgotten.
#[derive(Debug)]
pub struct Answering {
    partitions: Arc<Partitions>,
    partition: u32,
}

impl Drop for Answering {
    fn drop(&mut self) {
        if let Some(count) = self.partitions.answering.get(self.partition as usize) {
            count.fetch_sub(1, Ordering::SeqCst);
        }
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

    #[test]
    fn a_request_goes_to_the_owner_or_while_there_is_none_to_the_next_owner() {
        let members = members(3);
        let partitions = Partitions::new(32);
        partitions.set_members(members.clone());
        let me = "instance-0";
        let p = (0..32)
            .find(|p| assigned_member(*p, &members) == Some("instance-1"))
            .unwrap();
        // Owned elsewhere: to its owner, whoever rendezvous would give it to.
        partitions.set_owner(p, Some("instance-2".into()));
        assert_eq!(partitions.forward_to(p, me).as_deref(), Some("instance-2"));
        // Served here, or being handed over from here: answered here.
        partitions.set_owned(p, true);
        assert_eq!(partitions.forward_to(p, me), None);
        partitions.set_handing_over(p);
        assert_eq!(partitions.forward_to(p, me), None);
        assert!(!partitions.owns(p), "nothing new starts for it");
        // Released by us: the table may still name us until the watch says otherwise, and a
        // released partition goes to its next owner.
        partitions.set_owned(p, false);
        partitions.set_owner(p, Some(me.into()));
        assert_eq!(partitions.forward_to(p, me).as_deref(), Some("instance-1"));
        assert!(partitions.set_owner(p, None));
        assert!(!partitions.set_owner(p, None), "no change");
        assert_eq!(partitions.forward_to(p, me).as_deref(), Some("instance-1"));
        // Its next owner left: the member rendezvous now gives it to.
        partitions.set_member("instance-1", false);
        let left = ["instance-0".to_owned(), "instance-2".to_owned()];
        let next = assigned_member(p, &left);
        assert_eq!(
            partitions.forward_to(p, me).as_deref(),
            next.filter(|n| *n != me)
        );
        // No other member: here.
        partitions.set_members(vec![me.to_owned()]);
        assert_eq!(partitions.forward_to(p, me), None);
        partitions.set_member("instance-1", true);
        partitions.set_member("instance-1", true);
        assert_eq!(partitions.members.read().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_partition_given_away_drains_the_requests_answered_here_and_forwards_new_ones() {
        let me = "instance-1";
        let partitions = Partitions::new(4);
        partitions.set_members(vec!["instance-1".into(), "instance-2".into()]);
        partitions.set_owners(vec![Some("instance-2".into()); 4]);
        partitions.set_owned(2, true);
        let Route::Here(Some(served)) = partitions.route(2, me) else {
            panic!("a served partition's request is answered here, holding it");
        };
        partitions.set_handing_over(2);
        let Route::Here(Some(handing_over)) = partitions.route(2, me) else {
            panic!("a partition handed over still answers here, holding it");
        };
        partitions.set_owned(2, false);
        assert!(
            matches!(partitions.route(2, me), Route::Forward(ref owner) if owner == "instance-2"),
            "once given away, its requests go to the owner"
        );
        // The two requests answered here hold the drain, whatever the forwarded one did.
        assert!(!partitions.drain(2, Duration::from_millis(50)).await);
        drop(served);
        assert!(!partitions.drain(2, Duration::from_millis(50)).await);
        let drained = tokio::spawn({
            let partitions = Arc::clone(&partitions);
            async move { partitions.drain(2, Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(handing_over);
        assert!(drained.await.unwrap(), "drained once the last one was done");
        // Another partition's requests never held this one.
        partitions.set_owned(1, true);
        let _other = partitions.route(1, me);
        assert!(partitions.drain(2, Duration::ZERO).await);
        // A request handled here whoever owns it (no reply subject, or forwarded twice) holds
        // a partition served here, and nothing otherwise.
        let held = partitions.hold(1);
        assert!(held.is_some());
        assert!(!partitions.drain(1, Duration::ZERO).await);
        assert!(partitions.hold(2).is_none());
        assert!(partitions.drain(2, Duration::ZERO).await);
    }
}
