//! What loading sessions costs: recovery visits the store's index of unfinished sessions, not
//! every session, and a new session is started without reading the store.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use planner_core::{CancelTarget, Command, Planner, PlannerConfig, Timestamp};
use planner_store::EventStore;
use planner_svc::bus::ChannelPublisher;
use planner_svc::engine::{Engine, EngineConfig};

use crate::engine_support::{request, HeldStore};

/// Appends a session started from a one-task plan, and cancels it when `end`.
async fn write_session(store: &HeldStore, session: &str, end: bool) {
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
    let store = Arc::new(HeldStore::open());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_is_started_without_reading_the_store() {
    let store = Arc::new(HeldStore::open());
    let (publisher, _bus) = ChannelPublisher::new();
    let (engine, _timers) = Engine::new(
        Arc::clone(&store),
        Arc::new(publisher),
        EngineConfig::default(),
    );
    let handled = engine
        .handle("brand-new", request("fetch the weather"))
        .await
        .unwrap();
    assert!(handled.version > 0);
    assert_eq!(store.reads.load(Ordering::SeqCst), 0, "the store was read");
    assert_eq!(engine.stats().loads, 0);
    assert_eq!(
        store.inner.version("brand-new").await.unwrap(),
        handled.version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_stored_session_not_in_memory_is_its_follow_up() {
    // No retries at all: finding the session in the store is not a lost race.
    for end in [false, true] {
        let store = Arc::new(HeldStore::open());
        write_session(&store, "known", end).await;
        let stored = store.inner.load_all("known").await.unwrap();
        let (publisher, _bus) = ChannelPublisher::new();
        let config = EngineConfig {
            conflict_retries: 0,
            ..EngineConfig::default()
        };
        let (engine, _timers) = Engine::new(Arc::clone(&store), Arc::new(publisher), config);
        let handled = engine
            .handle("known", request("and then summarize it"))
            .await
            .unwrap();
        // Appended after the stored events, which are untouched: a follow-up, not a new plan.
        let after = store.inner.load_all("known").await.unwrap();
        assert_eq!(&after[..stored.len()], &stored[..], "ended: {end}");
        assert_eq!(handled.version, after.len() as u64, "ended: {end}");
        assert!(after.len() > stored.len(), "ended: {end}");
        let folded = Planner::fold(&after);
        assert_eq!(folded.state().requests.len(), 2, "ended: {end}");
        let stats = engine.stats();
        assert_eq!((stats.loads, stats.conflicts), (1, 0), "ended: {end}");
    }
}
