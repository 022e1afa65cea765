//! The JetStream store against a real nats-server: restarts, duplicates, bad snapshots.

use planner_store::*;
use planner_testkit::NatsServer;

use crate::support::events;

async fn connect_as(server: &NatsServer, writer: &str) -> JetStreamStore {
    let client = async_nats::connect(server.url()).await.unwrap();
    let config = JetStreamConfig {
        writer_id: Some(writer.to_owned()),
        ..JetStreamConfig::default()
    };
    JetStreamStore::connect(client, config).await.unwrap()
}

async fn connect(server: &NatsServer) -> JetStreamStore {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .unwrap();
    JetStreamStore::connect(client, JetStreamConfig::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_event_is_lost_when_the_server_is_killed_and_restarted() {
    let mut server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    let mut acknowledged = Vec::new();
    for i in 0..50 {
        let batch = events(3, &format!("k{i}_"));
        store
            .append("survivor", acknowledged.len() as u64, &batch)
            .await
            .unwrap();
        acknowledged.extend(batch);
    }
    drop(store);
    server.kill();
    server.restart().unwrap();
    let store = connect(&server).await;
    assert_eq!(store.load_all("survivor").await.unwrap(), acknowledged);
    // And appends go on where they stopped.
    let next = events(1, "after");
    assert_eq!(store.append("survivor", 150, &next).await.unwrap(), 151);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_session_that_exists_conflicts_without_a_read_first() {
    use futures::StreamExt as _;
    let server = NatsServer::start().unwrap();
    let first = connect_as(&server, "writer-1").await;
    // Every read of a message the stores ask the server for, seen on the API's subjects.
    let watcher = async_nats::connect(server.url()).await.unwrap();
    let mut api = watcher.subscribe("$JS.API.>").await.unwrap();
    watcher.flush().await.unwrap();
    let batch = events(3, "a");
    assert_eq!(first.append("taken", 0, &batch).await.unwrap(), 3);
    let mut reads = Vec::new();
    while let Ok(Some(request)) =
        tokio::time::timeout(std::time::Duration::from_millis(300), api.next()).await
    {
        // `$JS.API.STREAM.MSG.GET.<stream>` and `$JS.API.DIRECT.GET.<stream>[.<subject>]`.
        if request.subject.contains(".GET.") {
            reads.push(request.subject.to_string());
        }
    }
    assert!(
        reads.is_empty(),
        "creating a session read the store first: {reads:?}"
    );
    // Stores that never read the session: a new session's append sends the empty subject's
    // sequence (0) without reading it first, and the server's check alone refuses it.
    let unaware = connect_as(&server, "writer-2").await;
    let err = unaware
        .append("taken", 0, &events(1, "b"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 3,
                ..
            }
        ),
        "{err}"
    );
    // The writer itself after a reconnect, sending its landed batch again: still recognised.
    let retrying = connect_as(&server, "writer-1").await;
    assert_eq!(retrying.append("taken", 0, &batch).await.unwrap(), 3);
    assert_eq!(first.load_all("taken").await.unwrap(), batch);
    // And once refused, the store knows where the session is: the next append goes on.
    assert_eq!(
        unaware.append("taken", 3, &events(1, "c")).await.unwrap(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_started_again_elsewhere_keeps_its_open_marker() {
    use crate::support::lifecycle;
    let server = NatsServer::start().unwrap();
    let store = connect_as(&server, "writer-1").await;
    // Ended at 2, then reopened by a follow-up: its marker says 2.
    store.append("s", 0, &[lifecycle::started()]).await.unwrap();
    store
        .append("s", 1, &[lifecycle::completed()])
        .await
        .unwrap();
    store.append("s", 2, &[lifecycle::planned()]).await.unwrap();
    assert_eq!(store.list_open().await.unwrap(), ["s"]);
    // An instance that does not hold the session takes a request for it to start it: the
    // append is refused, and the session's marker must not have been lowered to 0 meanwhile.
    let elsewhere = connect_as(&server, "writer-2").await;
    let err = elsewhere
        .append("s", 0, &[lifecycle::started()])
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    // A drop of the session's end at 2 (recovery's, or the one its ending append spawned)
    // arriving now keeps the marker: the session is open again.
    store.forget_open("s", 2).await.unwrap();
    assert_eq!(store.list_open().await.unwrap(), ["s"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_append_is_deduplicated_and_a_different_one_conflicts() {
    let server = NatsServer::start().unwrap();
    let first = connect_as(&server, "writer-1").await;
    // The same writer after a reconnect: a store that has not seen its own append's ack.
    let retrying = connect_as(&server, "writer-1").await;
    let other_writer = connect_as(&server, "writer-2").await;
    let stale = connect(&server).await;
    // They learn that the session is empty, as an instance does before its append.
    assert_eq!(retrying.version("dup").await.unwrap(), 0);
    assert_eq!(other_writer.version("dup").await.unwrap(), 0);
    assert_eq!(stale.version("dup").await.unwrap(), 0);
    let batch = events(2, "x");
    assert_eq!(first.append("dup", 0, &batch).await.unwrap(), 2);
    // The same batch sent again at the same position by the same writer (an append whose ack
    // was lost, retried): recognised as the session's last message, nothing stored twice.
    assert_eq!(retrying.append("dup", 0, &batch).await.unwrap(), 2);
    assert_eq!(first.load_all("dup").await.unwrap(), batch);
    // The very same batch from another writer (two instances handling one command in the same
    // millisecond) lost the race: a conflict, so that instance reloads and judges again.
    let err = other_writer.append("dup", 0, &batch).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    // A different batch from an instance that has not seen the append is refused by the
    // server's sequence check: a conflict, not an overwrite.
    let err = stale.append("dup", 0, &events(1, "y")).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(first.load_all("dup").await.unwrap(), batch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_snapshot_is_ignored() {
    let server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    store.append("s", 0, &events(3, "a")).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let bucket = async_nats::jetstream::new(client)
        .get_object_store("planner_snapshots")
        .await
        .unwrap();
    bucket.put("s", &mut &b"not a snapshot"[..]).await.unwrap();
    assert_eq!(store.load_snapshot("s").await.unwrap(), None);
    assert_eq!(load_planner(&store, "s").await.unwrap().version(), 3);
}

/// The stream's consumers, as the server lists them.
async fn consumers(server: &NatsServer) -> Vec<String> {
    let client = async_nats::connect(server.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream(JetStreamConfig::default().stream_name)
        .await
        .unwrap();
    let mut names = Vec::new();
    let mut listing = stream.consumer_names();
    while let Some(name) = futures::StreamExt::next(&mut listing).await {
        names.push(name.unwrap());
    }
    names
}

/// Loading a session used to create an ordered consumer that stayed on the server (30 s after
/// use); nats-server limits consumers per stream, so a store with ~1,000 sessions could no
/// longer be loaded, and a daemon no longer restarted. Now a load leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_loads_leave_no_consumer_behind() {
    let server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    // Short sessions (read message by message) and one long one (read through a consumer).
    let mut expected = Vec::new();
    for s in 0..20 {
        let session = format!("short{s}");
        let batch = events(3, &session);
        store.append(&session, 0, &batch).await.unwrap();
        expected.push((session, batch));
    }
    let mut long = Vec::new();
    for i in 0..100 {
        let batch = events(2, &format!("long{i}_"));
        store
            .append("long", long.len() as u64, &batch)
            .await
            .unwrap();
        long.extend(batch);
    }
    let before = consumers(&server).await;
    assert_eq!(before, Vec::<String>::new());

    for round in 0..500 {
        for (session, batch) in &expected {
            assert_eq!(&store.load_all(session).await.unwrap(), batch, "{session}");
        }
        if round % 10 == 0 {
            assert_eq!(store.load_all("long").await.unwrap(), long);
            // From the middle too: the consumer starts where the replay left off.
            assert_eq!(
                store.load_from("long", 150).await.unwrap(),
                long.get(150..).unwrap()
            );
        }
    }
    assert_eq!(
        consumers(&server).await,
        before,
        "loads left consumers on the server"
    );
}

/// A store written before the index existed (its index stream deleted here) is backfilled once
/// at connect: every session is listed as possibly unfinished, and each ended one drops out
/// when recovery forgets it; the backfill is not repeated on the next connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_before_the_index_is_backfilled_once() {
    use crate::support::lifecycle;
    let server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    for i in 0..20 {
        let s = format!("s{i}");
        store.append(&s, 0, &[lifecycle::started()]).await.unwrap();
        if i % 4 != 0 {
            store
                .append(&s, 1, &[lifecycle::completed()])
                .await
                .unwrap();
        }
    }
    let open: Vec<String> = (0..20).step_by(4).map(|i| format!("s{i}")).collect();
    let mut open_sorted = open.clone();
    open_sorted.sort();
    let expected: Vec<&str> = open_sorted.iter().map(String::as_str).collect();
    assert_eq!(
        crate::support::open_streams_settled(&store, &expected).await,
        open_sorted
    );
    drop(store);
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.delete_stream("PLANNER_EVENTS_OPEN").await.unwrap();

    let store = connect(&server).await;
    let listed = store.list_open().await.unwrap();
    assert_eq!(listed.len(), 20, "{listed:?}");
    for session in listed {
        let version = store.version(&session).await.unwrap();
        if version == 2 {
            store.forget_open(&session, version).await.unwrap();
        }
    }
    assert_eq!(store.list_open().await.unwrap(), open_sorted);
    // Connecting again does not backfill again.
    drop(store);
    let store = connect(&server).await;
    assert_eq!(store.list_open().await.unwrap(), open_sorted);
}

/// What a crash leaves: a marker for a session whose end was appended but whose marker was not
/// purged (or whose opening batch never landed). It is listed, and dropped by `forget_open`;
/// a marker a follow-up wrote after the caller's load survives a stale `forget_open`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_left_by_a_crash_is_dropped_and_a_newer_one_survives() {
    use crate::support::lifecycle;
    let server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    store.append("x", 0, &[lifecycle::started()]).await.unwrap();
    store
        .append("x", 1, &[lifecycle::completed()])
        .await
        .unwrap();
    // Dropped after the append returned: waited for, or it could purge the marker below.
    assert_eq!(
        crate::support::open_streams_settled(&store, &[]).await,
        Vec::<String>::new()
    );
    // The crash: the marker of the opening batch is there, the purge after the end is not.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Planner-Version", "0");
    js.publish_with_headers("planner.events.open.x", headers, Default::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(store.list_open().await.unwrap(), ["x"]);
    // A follow-up (another instance) reopens it after a recovery loaded it at version 2.
    let other = connect(&server).await;
    other.append("x", 2, &[lifecycle::planned()]).await.unwrap();
    store.forget_open("x", 2).await.unwrap();
    assert_eq!(
        store.list_open().await.unwrap(),
        ["x"],
        "the follow-up's marker survives"
    );
    // It ends again; the ending writer drops its marker itself.
    other
        .append("x", 3, &[lifecycle::completed()])
        .await
        .unwrap();
    assert_eq!(
        crate::support::open_streams_settled(&store, &[]).await,
        Vec::<String>::new()
    );
    // The leftover marker case: ended at 4, a marker for version 0 written late is dropped.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Planner-Version", "0");
    js.publish_with_headers("planner.events.open.x", headers, Default::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(store.list_open().await.unwrap(), ["x"]);
    store.forget_open("x", 4).await.unwrap();
    assert_eq!(store.list_open().await.unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appends_trace_context_is_kept_on_its_message_and_read_back() {
    let server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    store
        .append_with(
            "traced",
            0,
            &events(2, "t"),
            &AppendMeta::traced(traceparent),
        )
        .await
        .unwrap();
    store.append("traced", 2, &events(1, "u")).await.unwrap();
    store
        .append_with(
            "traced",
            3,
            &events(1, "v"),
            &AppendMeta::traced("bad value\r\n"),
        )
        .await
        .unwrap();
    let batches = store.load_batches("traced").await.unwrap();
    let traces: Vec<Option<&str>> = batches.iter().map(|b| b.traceparent.as_deref()).collect();
    assert_eq!(traces, vec![Some(traceparent), None, None]);
    // On the stream's message itself, as `nats stream get` shows it to an operator.
    let client = async_nats::connect(server.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("PLANNER_EVENTS")
        .await
        .unwrap();
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(
        first.headers.get("traceparent").map(|v| v.as_str()),
        Some(traceparent)
    );
    // Loading ignores it.
    assert_eq!(store.load_all("traced").await.unwrap().len(), 4);
}

/// The append that ends a plan returns once its events are durable. Dropping the session's
/// open marker is bookkeeping, done after it; a request for it that nobody answers (here denied
/// by the server, as a request to a stream whose leader just died goes unanswered) must not
/// hold the append, and with it the reply to the executor's last report, for the JetStream
/// request timeout. The marker it could not drop is left for recovery, as after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_ends_a_plan_does_not_wait_for_its_open_marker_to_be_dropped() {
    use crate::support::lifecycle;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        r#"authorization {
  users: [
    { user: "store", password: "store-pass", permissions: {
        publish: { allow: [">"], deny: ["$JS.API.STREAM.MSG.GET.PLANNER_EVENTS_OPEN"] },
        subscribe: { allow: [">"] } } }
  ]
}
"#,
    )
    .unwrap();
    let server = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]).unwrap();
    let client = async_nats::ConnectOptions::with_user_and_password(
        "store".to_owned(),
        "store-pass".to_owned(),
    )
    .connect(server.url())
    .await
    .unwrap();
    let store = JetStreamStore::connect(client, JetStreamConfig::default())
        .await
        .unwrap();
    store
        .append("slow-index", 0, &[lifecycle::started()])
        .await
        .unwrap();
    let started = Instant::now();
    let version = store
        .append("slow-index", 1, &[lifecycle::completed()])
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(version, 2);
    assert!(
        took < Duration::from_secs(2),
        "the ending append took {took:?}: it waited for the marker's drop"
    );
    assert_eq!(store.load_all("slow-index").await.unwrap().len(), 2);
    // The drop has not happened (its request waits for a reply that never comes, then fails):
    // the ended session stays listed, for recovery to drop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.list_open().await.unwrap(), ["slow-index"]);
}

/// A snapshot saved after its session appended again (the daemon saves off the session's lock)
/// still records the stream sequence its version ends at, so a load replays only what follows
/// it, rather than recording none and replaying the whole subject every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_saved_after_later_appends_records_where_its_version_ends() {
    let server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    let batches = crate::support::real_session();
    let mut version = 0;
    let mut live = planner_core::Planner::new();
    let mut at_snapshot = None;
    for (i, batch) in batches.iter().enumerate() {
        version = store.append("late-snap", version, batch).await.unwrap();
        for e in batch {
            live.apply(e);
        }
        // The daemon's case: the session appends again before the save runs.
        if i + 2 == batches.len() {
            at_snapshot = Some(Snapshot::of(live.state()));
        }
    }
    let at_snapshot = at_snapshot.unwrap();
    assert!(
        at_snapshot.version < version,
        "later appends came after the snapshot's point"
    );
    store
        .save_snapshot("late-snap", &at_snapshot)
        .await
        .unwrap();

    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let bucket = js.get_object_store("planner_snapshots").await.unwrap();
    let mut object = bucket.get("late-snap").await.unwrap();
    let mut bytes = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
        .await
        .unwrap();
    let (sequence, saved) = planner_store::jetstream::decode_snapshot(&bytes).unwrap();
    assert_eq!(saved.version, at_snapshot.version);
    // The message the snapshot's version ends at: the last append but one.
    let events = js.get_stream("PLANNER_EVENTS").await.unwrap();
    let second = events
        .get_raw_message(sequence)
        .await
        .expect("the recorded sequence names a message");
    assert_eq!(
        second
            .headers
            .get("Planner-Version")
            .map(|v| v.as_str().to_owned()),
        Some(at_snapshot.version.to_string())
    );
    // And a load from it is the live state.
    let loaded = load_planner(&store, "late-snap").await.unwrap();
    assert_eq!(loaded.state(), live.state());
}
