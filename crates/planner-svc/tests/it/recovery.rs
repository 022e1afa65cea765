//! Recovery's cost: it visits the store's index of unfinished sessions, not every session.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use planner_core::{CancelTarget, Command, Event, Planner, PlannerConfig, Timestamp};
use planner_store::{EventStore, MemoryStore, Snapshot, StoreError};
use planner_svc::bus::ChannelPublisher;
use planner_svc::engine::{Engine, EngineConfig};

/// A memory store that counts the sessions read (loads and snapshot reads).
#[derive(Default)]
struct CountingStore {
    inner: MemoryStore,
    reads: AtomicUsize,
}

impl EventStore for CountingStore {
    async fn append(
        &self,
        stream: &str,
        expected: u64,
        events: &[Event],
    ) -> Result<u64, StoreError> {
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
        self.inner.save_snapshot(stream, snapshot).await
    }
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.load_snapshot(stream).await
    }
}

/// Appends a session started from a one-task plan, and cancels it when `end`.
async fn write_session(store: &CountingStore, session: &str, end: bool) {
    let mut planner = Planner::with_config(PlannerConfig::default()).unwrap();
    let started = planner
        .process(Command::Initialize {
            request_id: None,
            planning: None,
            input: "fetch the weather".into(),
            attachments: vec![],
            plan: None,
            now: Timestamp(1),
        })
        .unwrap();
    let mut version = store.append(session, 0, &started).await.unwrap();
    if end {
        let cancelled = planner
            .process(Command::Cancel {
                target: CancelTarget::Plan,
                reason: None,
                now: Timestamp(2),
            })
            .unwrap();
        version = store.append(session, version, &cancelled).await.unwrap();
    }
    assert_eq!(version, planner.version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_reads_only_the_unfinished_sessions() {
    let store = Arc::new(CountingStore::default());
    for i in 0..1_000 {
        write_session(&store, &format!("ended{i}"), true).await;
    }
    for i in 0..10 {
        write_session(&store, &format!("open{i}"), false).await;
    }
    assert_eq!(store.inner.list_streams().await.unwrap().len(), 1_010);
    let (publisher, _bus) = ChannelPublisher::new();
    let (engine, _timers) = Engine::new(
        Arc::clone(&store),
        Arc::new(publisher),
        EngineConfig::default(),
    );
    let report = engine.recover().await.unwrap();
    assert_eq!(report.recovered, 10);
    let reads = store.reads.load(Ordering::SeqCst);
    // Each open session: a snapshot read and a load (plus a reload after extending leases).
    assert!(
        reads <= 10 * 4,
        "recovery read {reads} sessions' logs for 10 unfinished of 1,010"
    );
}
