//! One suite, generic over the contract, run against every store.

use std::sync::Arc;

use planner_core::{Event, Planner};
use planner_store::*;

use crate::support::{events, lifecycle, real_session};

/// Runs every case of the suite; `fresh` gives an empty store for each case.
pub async fn run_suite<S, F, Fut>(fresh: F)
where
    S: EventStore,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    append_and_load(&fresh().await).await;
    load_from_every_boundary(&fresh().await).await;
    concurrent_appenders_have_one_winner_per_version(Arc::new(fresh().await)).await;
    large_and_non_ascii_payloads(&fresh().await).await;
    many_streams(&fresh().await).await;
    snapshot_and_tail_equal_full_replay(&fresh().await).await;
    bad_stream_ids_are_refused(&fresh().await).await;
    long_stream(&fresh().await).await;
    open_index_lists_exactly_the_unfinished_streams(&fresh().await).await;
    an_append_with_metadata_is_an_append(&fresh().await).await;
}

/// `append_with` keeps the promises of `append`; the metadata never reaches the events, and a
/// store that keeps it hands back exactly what it was given.
async fn an_append_with_metadata_is_an_append<S: EventStore>(store: &S) {
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let first = events(2, "m");
    let meta = AppendMeta::traced(traceparent);
    assert_eq!(store.append_with("m", 0, &first, &meta).await.unwrap(), 2);
    let err = store
        .append_with("m", 0, &events(1, "x"), &meta)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    // A value no header can carry is dropped, never a reason to refuse the append.
    let bad = AppendMeta::traced("00-abc\r\nInjected: yes");
    let second = events(1, "n");
    assert_eq!(store.append_with("m", 2, &second, &bad).await.unwrap(), 3);
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();
    assert_eq!(store.load_all("m").await.unwrap(), all);
    for batch in store.load_batches("m").await.unwrap() {
        assert!(
            batch.traceparent.is_none() || batch.traceparent.as_deref() == Some(traceparent),
            "{batch:?}"
        );
    }
}

async fn append_and_load<S: EventStore>(store: &S) {
    assert_eq!(store.version("s1").await.unwrap(), 0);
    assert_eq!(store.load_all("s1").await.unwrap(), vec![]);
    let first = events(3, "a");
    assert_eq!(store.append("s1", 0, &first).await.unwrap(), 3);
    let second = events(2, "b");
    assert_eq!(store.append("s1", 3, &second).await.unwrap(), 5);
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();
    assert_eq!(store.load_all("s1").await.unwrap(), all);
    assert_eq!(store.version("s1").await.unwrap(), 5);

    // A stale version is a conflict and writes nothing.
    let err = store.append("s1", 3, &events(1, "c")).await.unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Conflict {
                expected: 3,
                actual: 5,
                ..
            }
        ),
        "{err}"
    );
    let err = store.append("s1", 9, &events(1, "c")).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(store.load_all("s1").await.unwrap(), all);

    // An empty append checks the version and writes nothing.
    assert_eq!(store.append("s1", 5, &[]).await.unwrap(), 5);
    assert!(store.append("s1", 4, &[]).await.unwrap_err().is_conflict());
    assert_eq!(store.list_streams().await.unwrap(), vec!["s1".to_owned()]);
}

async fn load_from_every_boundary<S: EventStore>(store: &S) {
    let mut all = Vec::new();
    for (i, size) in [1, 2, 3, 4].into_iter().enumerate() {
        let batch = events(size, &format!("b{i}_"));
        store.append("s", all.len() as u64, &batch).await.unwrap();
        all.extend(batch);
    }
    for from in 0..=all.len() + 2 {
        let expected = all[from.min(all.len())..].to_vec();
        assert_eq!(
            store.load_from("s", from as u64).await.unwrap(),
            expected,
            "from {from}"
        );
    }
}

async fn concurrent_appenders_have_one_winner_per_version<S: EventStore>(store: Arc<S>) {
    const WRITERS: usize = 6;
    const ROUNDS: usize = 5;
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        let version = store.version("race").await.unwrap();
        let mut handles = Vec::new();
        for writer in 0..WRITERS {
            let store = Arc::clone(&store);
            let batch = events(2, &format!("r{round}w{writer}_"));
            handles.push(tokio::spawn(async move {
                store.append("race", version, &batch).await.map(|_| batch)
            }));
        }
        let mut won = Vec::new();
        for handle in handles {
            match handle.await.unwrap() {
                Ok(batch) => won.push(batch),
                Err(e) => assert!(e.is_conflict(), "round {round}: {e}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {} winners", won.len());
        winners.extend(won.into_iter().flatten());
    }
    assert_eq!(store.load_all("race").await.unwrap(), winners);
}

async fn large_and_non_ascii_payloads<S: EventStore>(store: &S) {
    let mut big = events(1, "big");
    if let Event::TaskStatusUpdated { output, .. } = &mut big[0] {
        *output = Some("é日本🚀\"\\\n".repeat(20_000));
    }
    store.append("big", 0, &big).await.unwrap();
    assert_eq!(store.load_all("big").await.unwrap(), big);
}

async fn many_streams<S: EventStore>(store: &S) {
    let mut names: Vec<String> = (0..200).map(|i| format!("session-{i:03}")).collect();
    for name in &names {
        store.append(name, 0, &events(3, name)).await.unwrap();
    }
    names.sort();
    assert_eq!(store.list_streams().await.unwrap(), names);
    for name in names.iter().step_by(37) {
        assert_eq!(store.load_all(name).await.unwrap(), events(3, name));
    }
}

async fn snapshot_and_tail_equal_full_replay<S: EventStore>(store: &S) {
    let policy = SnapshotPolicy { every: 7 };
    let mut live = Planner::new();
    let mut snapshots = 0;
    for batch in real_session() {
        let before = live.version();
        for event in &batch {
            live.apply(event);
        }
        store.append("snap", before, &batch).await.unwrap();
        if policy.is_due(before, live.version()) {
            snapshots += 1;
        }
        policy.after_append(store, "snap", before, &live).await;
    }
    assert!(
        snapshots >= 2,
        "the session must cross several snapshot points"
    );
    let snapshot = store
        .load_snapshot("snap")
        .await
        .unwrap()
        .expect("a snapshot");
    assert!(snapshot.version > 0 && snapshot.version <= live.version());
    let loaded = load_planner(store, "snap").await.unwrap();
    assert_eq!(loaded.state(), live.state());
    let replayed = Planner::fold(&store.load_all("snap").await.unwrap());
    assert_eq!(replayed.state(), live.state());
    // A session with no snapshot loads by full replay; an unknown one is fresh.
    assert_eq!(
        load_planner(store, "nothing-here").await.unwrap().version(),
        0
    );
}

async fn bad_stream_ids_are_refused<S: EventStore>(store: &S) {
    for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
        let err = store.append(bad, 0, &events(1, "x")).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidStream { .. }),
            "{bad:?}: {err}"
        );
        assert!(store.load_all(bad).await.is_err());
    }
}

async fn long_stream<S: EventStore>(store: &S) {
    const EVENTS: usize = 100_000;
    const BATCH: usize = 1_000;
    let mut all = Vec::with_capacity(EVENTS);
    for b in 0..EVENTS / BATCH {
        let batch = events(BATCH, &format!("L{b}_"));
        store
            .append("long", (b * BATCH) as u64, &batch)
            .await
            .unwrap();
        all.extend(batch);
    }
    assert_eq!(store.version("long").await.unwrap(), EVENTS as u64);
    let loaded = store.load_all("long").await.unwrap();
    assert_eq!(loaded.len(), EVENTS);
    assert!(loaded == all, "the 100k-event stream differs after loading");
    assert_eq!(
        store.load_from("long", 99_990).await.unwrap(),
        all[99_990..].to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_keeps_the_contract() {
    run_suite(|| async { MemoryStore::new() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_keeps_the_contract_under_every_fsync_policy() {
    for fsync in [FsyncPolicy::Group, FsyncPolicy::Always, FsyncPolicy::Never] {
        let dirs = std::sync::Mutex::new(Vec::new());
        run_suite(|| {
            let dir = tempfile::tempdir().unwrap();
            let mut config = FileStoreConfig::new(dir.path());
            config.fsync = fsync;
            dirs.lock().unwrap().push(dir);
            async move { FileStore::open(config).unwrap() }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_store_keeps_the_contract() {
    let server = planner_testkit::NatsServer::start().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    run_suite(|| {
        // A fresh stream, prefix and bucket per case, on the one server.
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let url = server.url();
        async move {
            let client = async_nats::connect(url).await.unwrap();
            let config = JetStreamConfig {
                stream_name: format!("EVENTS_{n}"),
                subject_prefix: format!("case{n}.events"),
                snapshot_bucket: format!("snapshots_{n}"),
                ..JetStreamConfig::default()
            };
            JetStreamStore::connect(client, config).await.unwrap()
        }
    })
    .await;
}

/// The index of unfinished streams after a mix of open, ended and reopened sessions: exactly
/// the unfinished ones, and `forget_open` at a version a follow-up has passed keeps a reopened
/// session.
async fn open_index_lists_exactly_the_unfinished_streams<S: EventStore>(store: &S) {
    assert_eq!(store.list_open().await.unwrap(), Vec::<String>::new());
    // open: started; ended: started then completed; reopened: ended, then a follow-up;
    // cancelled: started, worked on, cancelled in a batch that carries other events after.
    store
        .append("open", 0, &[lifecycle::started()])
        .await
        .unwrap();
    store.append("open", 1, &events(2, "w")).await.unwrap();
    store
        .append("ended", 0, &[lifecycle::started()])
        .await
        .unwrap();
    store
        .append("ended", 1, &[lifecycle::completed()])
        .await
        .unwrap();
    store
        .append("reopened", 0, &[lifecycle::started()])
        .await
        .unwrap();
    store
        .append("reopened", 1, &[lifecycle::completed()])
        .await
        .unwrap();
    store
        .append("reopened", 2, &[lifecycle::planned()])
        .await
        .unwrap();
    store
        .append("cancelled", 0, &[lifecycle::started()])
        .await
        .unwrap();
    let mut last = events(1, "c");
    last.insert(0, lifecycle::cancelled());
    store.append("cancelled", 1, &last).await.unwrap();
    // A batch that neither opens nor ends leaves a stream as it was.
    store.append("plain", 0, &events(3, "p")).await.unwrap();
    // A real session, batch by batch, ends.
    for (i, batch) in real_session().iter().enumerate() {
        let version = store.version("real").await.unwrap();
        store.append("real", version, batch).await.unwrap();
        let ended = i + 1 == real_session().len();
        // Marked before the append that opens it; dropped once the one that ends it landed.
        let open = if ended {
            crate::support::open_streams_settled(store, &["open", "reopened"]).await
        } else {
            store.list_open().await.unwrap()
        };
        assert_eq!(open.contains(&"real".to_owned()), !ended, "after batch {i}");
    }
    assert_eq!(store.list_open().await.unwrap(), ["open", "reopened"]);
    // A caller that loaded "reopened" when it had ended (version 2) must not drop it: a
    // follow-up reopened it since.
    store.forget_open("reopened", 2).await.unwrap();
    assert_eq!(store.list_open().await.unwrap(), ["open", "reopened"]);
    // Nor does forgetting a stream that is not listed do anything.
    store.forget_open("ended", 2).await.unwrap();
    assert_eq!(store.list_open().await.unwrap(), ["open", "reopened"]);
}
