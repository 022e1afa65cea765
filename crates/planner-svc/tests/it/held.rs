//! A memory store whose appends and snapshot saves can be held until released, for the engine
//! tests that need a slow or lost store request: one wrapper, so each test names only the gate
//! it closes.

use std::sync::atomic::{AtomicUsize, Ordering};

use planner_core::Event;
use planner_store::{EventStore, MemoryStore, Snapshot, StoreError};
use tokio::sync::watch;

/// A gate: closed until `open` is sent `true`.
pub struct Gate(watch::Receiver<bool>);

impl Gate {
    /// A closed gate and the sender that opens it.
    pub fn closed() -> (watch::Sender<bool>, Gate) {
        let (open, gate) = watch::channel(false);
        (open, Gate(gate))
    }

    /// An open gate.
    pub fn open() -> Gate {
        Gate(watch::channel(true).1)
    }

    async fn pass(&self) {
        let mut gate = self.0.clone();
        let _ = gate.wait_for(|open| *open).await;
    }
}

/// A memory store whose appends pass `appends` and whose snapshot saves pass `snapshots`
/// before they run. A call dropped while it waits (its caller gave up) never reaches the store.
pub struct HeldStore {
    pub inner: MemoryStore,
    pub appends: Gate,
    pub snapshots: Gate,
    /// Snapshots saved.
    pub saved: AtomicUsize,
}

impl HeldStore {
    pub fn new(appends: Gate, snapshots: Gate) -> HeldStore {
        HeldStore {
            inner: MemoryStore::default(),
            appends,
            snapshots,
            saved: AtomicUsize::new(0),
        }
    }
}

impl EventStore for HeldStore {
    async fn append(
        &self,
        stream: &str,
        expected: u64,
        events: &[Event],
    ) -> Result<u64, StoreError> {
        self.appends.pass().await;
        self.inner.append(stream, expected, events).await
    }
    async fn load_from(&self, stream: &str, version: u64) -> Result<Vec<Event>, StoreError> {
        self.inner.load_from(stream, version).await
    }
    async fn version(&self, stream: &str) -> Result<u64, StoreError> {
        self.inner.version(stream).await
    }
    async fn list_streams(&self) -> Result<Vec<String>, StoreError> {
        self.inner.list_streams().await
    }
    async fn list_open(&self) -> Result<Vec<String>, StoreError> {
        self.inner.list_open().await
    }
    async fn forget_open(&self, stream: &str, version: u64) -> Result<(), StoreError> {
        self.inner.forget_open(stream, version).await
    }
    async fn save_snapshot(&self, stream: &str, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.snapshots.pass().await;
        self.inner.save_snapshot(stream, snapshot).await?;
        self.saved.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream).await
    }
}
