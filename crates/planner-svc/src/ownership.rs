//! Partition leases in a JetStream KV bucket (ARCHITECTURE.md, "Ownership"; docs/adr/0004).
//!
//! The bucket keeps every value for `ownership.lease_ttl_ms` (its max age), one revision per
//! key. Each instance:
//!
//! - announces itself as `member.<instance>` and refreshes it every third of the TTL; an
//!   instance that stops refreshing (it died) drops out when the server expires its key;
//! - computes which live member each partition belongs to by rendezvous hashing
//!   ([`crate::partition::assigned_member`]): all compute the same answer, and a member joining
//!   or leaving moves only the partitions it takes or gives;
//! - acquires `owner.<n>` for its partitions with `create` (a key absent, deleted or expired);
//!   another instance's lease is never taken, only waited out (an instance missing from the
//!   members may be slow, not dead); refreshes each lease with `update` at its own last
//!   revision; a refresh that finds another revision means the lease was lost: the partition
//!   is dropped at once;
//! - releases a partition another member should hold (after draining its work, the caller's
//!   job) and all of them on a graceful stop, by deleting the key at its revision, so the next
//!   owner takes it at once instead of after the TTL.
//!
//! A [`Leases::round`] reads the bucket and does all of that but the draining; the daemon runs
//! one every third of the TTL and whenever the bucket changes (a watch). Only the partition
//! counts of this module do IO; the rules are in `partition.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::stream::StorageType;
use bytes::Bytes;
use futures::TryStreamExt as _;

use crate::config::OwnershipConfig;
use crate::partition::{assigned_member, Partitions};

/// What a round changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Partitions acquired: start serving them (recover their sessions).
    pub acquired: Vec<u32>,
    /// Partitions whose lease was lost (another instance holds it, or it expired): stop
    /// serving them at once.
    pub lost: Vec<u32>,
    /// Partitions another member should hold: drain their work, then [`Leases::release`].
    pub to_release: Vec<u32>,
}

/// This instance's leases.
#[derive(Debug)]
pub struct Leases {
    kv: kv::Store,
    me: String,
    partitions: Arc<Partitions>,
    ttl: Duration,
    /// Partition -> the revision of our lease on it, and when it was last refreshed.
    held: BTreeMap<u32, (u64, Instant)>,
    /// Members seen in the last round.
    members: BTreeSet<String>,
}

fn owner_key(partition: u32) -> String {
    format!("owner.{partition}")
}

fn member_key(instance: &str) -> String {
    format!("member.{instance}")
}

impl Leases {
    /// Opens (creating it if needed) the lease bucket for instance `me`.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        config: &OwnershipConfig,
        me: String,
        partitions: Arc<Partitions>,
    ) -> anyhow::Result<Leases> {
        let ttl = Duration::from_millis(config.lease_ttl_ms);
        let kv = match js.get_key_value(&config.bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: config.bucket.clone(),
                    description: "planner partition leases and members".into(),
                    history: 1,
                    max_age: ttl,
                    storage: StorageType::File,
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating the lease bucket {}", config.bucket))?,
        };
        Ok(Leases {
            kv,
            me,
            partitions,
            ttl,
            held: BTreeMap::new(),
            members: BTreeSet::new(),
        })
    }

    /// This instance's name in the bucket.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The bucket, to watch.
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    /// How often leases are refreshed: a third of the TTL, so one lost refresh never costs one.
    pub fn refresh_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Whether `instance` was a live member at the last round.
    pub fn is_member(&self, instance: &str) -> bool {
        self.members.contains(instance)
    }

    /// The partitions held.
    pub fn held(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// Live members (their key not expired or deleted), sorted.
    async fn read_members(&self) -> anyhow::Result<BTreeSet<String>> {
        let filter = format!("{}{}", self.kv.prefix, member_key("*"));
        let mut subjects = self
            .kv
            .stream
            .info_with_subjects(filter)
            .await
            .context("listing lease members")?;
        let mut members = BTreeSet::new();
        while let Some((subject, _)) = subjects.try_next().await.context("listing members")? {
            let Some(key) = subject.strip_prefix(self.kv.prefix.as_str()) else {
                continue;
            };
            if let Some(entry) = self.kv.entry(key).await.context("reading a member")? {
                if entry.operation == Operation::Put {
                    if let Some(instance) = key.strip_prefix("member.") {
                        members.insert(instance.to_owned());
                    }
                }
            }
        }
        Ok(members)
    }

    /// The owner (and revision) of each partition's lease, `None` where there is none.
    async fn read_owners(&self) -> anyhow::Result<Vec<Option<(String, u64)>>> {
        let reads = (0..self.partitions.count()).map(|p| self.kv.entry(owner_key(p)));
        let entries = futures::future::try_join_all(reads)
            .await
            .context("reading partition leases")?;
        Ok(entries
            .into_iter()
            .map(|entry| {
                entry.and_then(|e| {
                    (e.operation == Operation::Put)
                        .then(|| (String::from_utf8_lossy(&e.value).into_owned(), e.revision))
                })
            })
            .collect())
    }

    /// One round: announce (when `refresh`), read the bucket, acquire what is ours and free,
    /// refresh (when `refresh`) or give up what is ours no more. See the module docs.
    pub async fn round(&mut self, refresh: bool) -> anyhow::Result<Round> {
        let mut round = Round::default();
        if refresh {
            self.kv
                .put(member_key(&self.me), Bytes::from(self.me.clone()))
                .await
                .context("announcing this instance")?;
        }
        let mut members = self.read_members().await?;
        members.insert(self.me.clone());
        let list: Vec<String> = members.iter().cloned().collect();
        let mut owners = self.read_owners().await?;
        let now = Instant::now();
        let mut refreshes = Vec::new();
        let mut acquisitions = Vec::new();
        for partition in 0..self.partitions.count() {
            let index = partition as usize;
            let ours = assigned_member(partition, &list) == Some(self.me.as_str());
            let current = owners.get(index).cloned().flatten();
            if let Some((_, refreshed)) = self.held.get(&partition).copied() {
                // Only this instance writes its own name: a key holding it at another revision
                // is our own refresh whose answer was lost, still ours.
                match current {
                    Some((owner, revision)) if owner == self.me => {
                        self.held.insert(partition, (revision, refreshed));
                        if !ours {
                            round.to_release.push(partition);
                        } else if refresh {
                            refreshes.push((partition, revision, refreshed));
                        }
                    }
                    _ => {
                        self.held.remove(&partition);
                        round.lost.push(partition);
                    }
                }
                continue;
            }
            if !ours {
                continue;
            }
            match current {
                None => acquisitions.push((partition, None)),
                // Ours from before (a restart under the same instance id): taken back at its
                // revision. Another instance's lease is left to expire: a member missing from
                // the list may only be slow, and its key expires one TTL after it died.
                Some((owner, revision)) if owner == self.me => {
                    acquisitions.push((partition, Some(revision)))
                }
                Some(_) => {}
            }
        }
        // All writes of a round at once: a round takes one round trip, not one per partition
        // (sequential refreshes under load once outlasted the TTL).
        let me = Bytes::from(self.me.clone());
        let refreshed =
            futures::future::join_all(refreshes.iter().map(|(partition, revision, _)| {
                self.kv.update(owner_key(*partition), me.clone(), *revision)
            }))
            .await;
        for ((partition, _, last), result) in refreshes.into_iter().zip(refreshed) {
            match result {
                Ok(revision) => {
                    self.held.insert(partition, (revision, now));
                    if let Some(slot) = owners.get_mut(partition as usize) {
                        *slot = Some((self.me.clone(), revision));
                    }
                }
                Err(error)
                    if error.kind() == kv::UpdateErrorKind::WrongLastRevision
                        || now.duration_since(last) >= self.ttl =>
                {
                    tracing::warn!(partition, %error, "partition lease lost");
                    self.held.remove(&partition);
                    round.lost.push(partition);
                }
                Err(error) => {
                    tracing::warn!(partition, %error, "could not refresh a partition lease; trying again");
                }
            }
        }
        let acquired =
            futures::future::join_all(acquisitions.iter().map(|(partition, revision)| {
                let (kv, key, value) = (&self.kv, owner_key(*partition), me.clone());
                async move {
                    match revision {
                        None => kv.create(key, value).await.map_err(anyhow::Error::new),
                        Some(revision) => kv
                            .update(key, value, *revision)
                            .await
                            .map_err(anyhow::Error::new),
                    }
                }
            }))
            .await;
        for ((partition, _), result) in acquisitions.into_iter().zip(acquired) {
            match result {
                Ok(revision) => {
                    self.held.insert(partition, (revision, now));
                    if let Some(slot) = owners.get_mut(partition as usize) {
                        *slot = Some((self.me.clone(), revision));
                    }
                    round.acquired.push(partition);
                }
                Err(error) => {
                    tracing::debug!(partition, %error, "partition taken by another instance first")
                }
            }
        }
        self.partitions.set_members(list);
        self.members = members;
        self.partitions.set_owners(
            owners
                .into_iter()
                .map(|o| o.map(|(owner, _)| owner))
                .collect(),
        );
        Ok(round)
    }

    /// Leases not refreshed for a whole TTL (the bucket unreachable): they have expired on
    /// the server, or are about to; another instance may hold them. Dropped, and returned.
    pub fn expired(&mut self) -> Vec<u32> {
        let now = Instant::now();
        let expired: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, (_, refreshed))| now.duration_since(*refreshed) >= self.ttl)
            .map(|(partition, _)| *partition)
            .collect();
        for partition in &expired {
            self.held.remove(partition);
        }
        expired
    }

    /// Gives `partitions` up (their work drained): deletes our leases at their revisions, all
    /// at once, so the members they belong to take them at once.
    pub async fn release(&mut self, partitions: &[u32]) {
        let held: Vec<(u32, u64)> = partitions
            .iter()
            .filter_map(|p| self.held.remove(p).map(|(revision, _)| (*p, revision)))
            .collect();
        let deletes = held.iter().map(|(partition, revision)| {
            self.kv
                .delete_expect_revision(owner_key(*partition), Some(*revision))
        });
        let deleted = futures::future::join_all(deletes).await;
        for ((partition, _), result) in held.iter().zip(deleted) {
            if let Err(error) = result {
                // Someone else holds it already, or it expired: nothing of ours to delete.
                tracing::debug!(partition, %error, "releasing a partition lease");
            }
        }
    }

    /// Takes in a change the bucket's watch saw: the owner table and the members are updated
    /// at once (requests are routed by them: waiting for the next round sent requests for a
    /// partition just released to the instance that released it). Whether it calls for a
    /// round: a partition freed or taken by an owner not known for it, a member that joined
    /// or left. Refreshes (puts of what is known) do not: they come every third of the TTL
    /// from every instance.
    pub fn observe(&self, entry: &kv::Entry) -> bool {
        let put = entry.operation == Operation::Put;
        if let Some(instance) = entry.key.strip_prefix("member.") {
            self.partitions.set_member(instance, put);
            return !put || !self.is_member(instance);
        }
        let Some(partition) = entry
            .key
            .strip_prefix("owner.")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            return false;
        };
        let owner = put.then(|| String::from_utf8_lossy(&entry.value).into_owned());
        self.partitions.set_owner(partition, owner) || !put
    }

    /// Leaves the membership (a graceful stop): the others stop counting on this instance.
    pub async fn leave(&mut self) {
        // Requests for the partitions it hands over go to the others from now on.
        self.partitions.set_member(&self.me, false);
        if let Err(error) = self.kv.delete(member_key(&self.me)).await {
            tracing::warn!(%error, "could not leave the lease membership; it expires");
        }
    }
}
