//! Loading a session: the newest snapshot, then the events after it.

use planner_core::Planner;

use crate::contract::{EventStore, Snapshot, StoreError};

/// Rebuilds the planner of `stream` from its newest usable snapshot and the events after it (or
/// from all its events when there is none). An unknown stream gives a fresh planner at version 0.
///
/// A snapshot ahead of the stream (its events lost, or the snapshot written for another store)
/// is ignored with a warning: events are the truth.
pub async fn load_planner<S: EventStore>(store: &S, stream: &str) -> Result<Planner, StoreError> {
    let snapshot = store.load_snapshot(stream).await?;
    let (mut planner, from) = match snapshot {
        Some(snapshot) => {
            let version = snapshot.version;
            (Planner::from_state(snapshot.state), version)
        }
        None => (Planner::new(), 0),
    };
    let tail = store.load_from(stream, from).await?;
    if from > 0 && tail.is_empty() {
        let stored = store.version(stream).await?;
        if stored < from {
            tracing::warn!(
                stream,
                snapshot_version = from,
                stored_version = stored,
                "ignoring a snapshot ahead of its stream; replaying the stream in full"
            );
            let all = store.load_all(stream).await?;
            return Ok(Planner::fold(&all));
        }
    }
    for event in &tail {
        planner.apply(event);
    }
    Ok(planner)
}

/// When to keep a snapshot: every `every` events (0: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Events between snapshots.
    pub every: u64,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy { every: 1_000 }
    }
}

impl SnapshotPolicy {
    /// Whether an append that took a stream from `before` to `after` crossed a snapshot point.
    pub fn is_due(&self, before: u64, after: u64) -> bool {
        self.every > 0 && after / self.every > before / self.every
    }

    /// Saves a snapshot of `planner` if the append from `before` crossed a snapshot point.
    /// A failed snapshot is logged, not returned: the events are already safe, and the next
    /// snapshot point tries again.
    pub async fn after_append<S: EventStore>(
        &self,
        store: &S,
        stream: &str,
        before: u64,
        planner: &Planner,
    ) {
        if self.is_due(before, planner.version()) {
            save_snapshot_logged(store, stream, &Snapshot::of(planner.state())).await;
        }
    }
}

/// Saves `snapshot`, logging a failure rather than returning it: the events are already safe,
/// and the next snapshot point tries again.
pub async fn save_snapshot_logged<S: EventStore>(store: &S, stream: &str, snapshot: &Snapshot) {
    if let Err(error) = store.save_snapshot(stream, snapshot).await {
        tracing::warn!(stream, %error, "could not save a snapshot; will try at the next point");
    }
}
