//! What the tests that drive the engine directly share: a memory store that counts the
//! sessions it reads and can hold appends or snapshot saves until released (a slow or lost
//! store request), so each test names only what it watches; and a user's request.

use std::sync::atomic::{AtomicUsize, Ordering};

use planner_core::{Command, Event, Timestamp};
use planner_store::{EventStore, MemoryStore, Snapshot, StoreError};
use tokio::sync::watch;

/// A user's request (`initialize`) with the rule parser's plan.
pub fn request(input: &str) -> Command {
    Command::Initialize {
        request_id: None,
        planning: None,
        input: input.into(),
        attachments: vec![],
        plan: None,
        now: Timestamp(10),
    }
}

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
    /// Sessions read: loads and snapshot reads.
    pub reads: AtomicUsize,
}

impl HeldStore {
    pub fn new(appends: Gate, snapshots: Gate) -> HeldStore {
        HeldStore {
            inner: MemoryStore::default(),
            appends,
            snapshots,
            saved: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
        }
    }

    /// A store that holds nothing: it only counts.
    pub fn open() -> HeldStore {
        HeldStore::new(Gate::open(), Gate::open())
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
        self.reads.fetch_add(1, Ordering::SeqCst);
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
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.load_snapshot(stream).await
    }
}
