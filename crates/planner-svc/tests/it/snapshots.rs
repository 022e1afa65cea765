//! Snapshots are kept off a command's path: its events, dispatches and reply never wait for
//! one to be saved.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use planner_core::{CancelTarget, Command, Timestamp};
use planner_store::{EventStore, SnapshotPolicy};
use planner_svc::bus::ChannelPublisher;
use planner_svc::engine::{Engine, EngineConfig};

use crate::engine_support::{request, Gate, HeldStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_answered_while_its_snapshot_is_still_being_saved() {
    // Snapshot saves wait until released: a save that takes long, or whose request was lost
    // with a cluster node.
    let (release, held) = Gate::closed();
    let store = Arc::new(HeldStore::new(Gate::open(), held));
    let (publisher, mut bus) = ChannelPublisher::new();
    let config = EngineConfig {
        // Every append crosses a snapshot point.
        snapshot: SnapshotPolicy { every: 1 },
        ..EngineConfig::default()
    };
    let (engine, _timers) = Engine::new(Arc::clone(&store), Arc::new(publisher), config);
    let initialize = request("1. fetch the weather\n2. summarize it");
    let handled = tokio::time::timeout(Duration::from_secs(5), engine.handle("held", initialize))
        .await
        .expect("the command waited for its snapshot to be saved")
        .unwrap();
    assert!(handled.version > 0);
    // Its dispatch went out too, before the save.
    let sent = tokio::time::timeout(Duration::from_secs(5), bus.recv())
        .await
        .expect("no dispatch while the snapshot was held");
    assert!(sent.is_some());
    assert_eq!(store.saved.load(Ordering::SeqCst), 0);
    assert!(store.inner.load_snapshot("held").await.unwrap().is_none());
    // The next command is answered too; its snapshot point is skipped while the first save
    // runs (saves of one session never overlap).
    let cancel = Command::Cancel {
        target: CancelTarget::Plan,
        reason: None,
        now: Timestamp(2),
    };
    let cancelled = tokio::time::timeout(Duration::from_secs(5), engine.handle("held", cancel))
        .await
        .expect("the second command waited for the first one's snapshot")
        .unwrap();
    assert!(cancelled.version > handled.version);

    // Released, the save lands, and a stop waits for it like for any confirmation.
    release.send(true).unwrap();
    engine.confirmations().close();
    tokio::time::timeout(Duration::from_secs(5), engine.confirmations().wait())
        .await
        .expect("the snapshot save never finished");
    assert_eq!(store.saved.load(Ordering::SeqCst), 1);
    let snapshot = store.inner.load_snapshot("held").await.unwrap().unwrap();
    assert_eq!(snapshot.version, handled.version);

    // The next snapshot point saves again.
    let follow_up = request("1. fetch it again");
    let reopened = engine.handle("held", follow_up).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), engine.confirmations().wait())
        .await
        .expect("the second snapshot save never finished");
    assert_eq!(store.saved.load(Ordering::SeqCst), 2);
    let snapshot = store.inner.load_snapshot("held").await.unwrap().unwrap();
    assert_eq!(snapshot.version, reopened.version);
}
