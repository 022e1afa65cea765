//! Stored data written by this format's first build, checked in: every later build must still
//! read it. When the format changes, keep these files and add an upcaster; never regenerate them.

use std::path::Path;

use planner_core::{codec, Event, PlanPhase, TaskStatus};
use planner_store::*;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v1")
        .join(name)
}

/// Regenerates the fixtures; run by hand only when adding a new fixture version:
/// `PLANNER_WRITE_FIXTURES=1 cargo test -p planner-store --test it fixtures`.
async fn write_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(FileStoreConfig::new(dir.path())).unwrap();
    let mut version = 0;
    let batches = crate::support::real_session();
    for batch in &batches {
        version = store
            .append("fixture-session", version, batch)
            .await
            .unwrap();
    }
    drop(store);
    std::fs::copy(dir.path().join("events.log"), fixture("events.log")).unwrap();
    std::fs::write(fixture("batch.json"), codec::encode_batch(&batches[0])).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_log_written_in_the_v1_format_still_loads() {
    if std::env::var_os("PLANNER_WRITE_FIXTURES").is_some() {
        write_fixtures().await;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("snapshots")).unwrap();
    std::fs::copy(fixture("events.log"), dir.path().join("events.log")).unwrap();
    let store = FileStore::open(FileStoreConfig::new(dir.path())).unwrap();
    assert_eq!(
        store.list_streams().await.unwrap(),
        vec!["fixture-session".to_owned()]
    );
    let planner = load_planner(&store, "fixture-session").await.unwrap();
    let state = planner.state();
    assert_eq!(state.phase, PlanPhase::Completed);
    assert_eq!(state.tasks.len(), 6);
    assert!(state
        .tasks
        .iter()
        .all(|t| t.status == TaskStatus::Completed));
    assert_eq!(
        state.task(&"t2".into()).map(|t| t.attempts),
        Some(2),
        "t2 was retried"
    );
    assert!(
        state.context.summary.is_some(),
        "the session compacted its context"
    );
}

#[test]
fn a_batch_written_in_the_v1_format_still_decodes() {
    let bytes = std::fs::read(fixture("batch.json")).unwrap();
    let events = codec::decode_batch(&bytes).unwrap();
    let types: Vec<&str> = events.iter().map(Event::event_type).collect();
    assert_eq!(
        types[..3],
        ["session_started", "request_received", "tasks_planned"]
    );
}
