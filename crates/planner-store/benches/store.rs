//! Store benchmarks: append throughput per fsync policy, replay of a 1M-event session, loading a
//! 100k-event session with snapshots, and the raw JetStream publish-with-ack ceiling measured in
//! the same run on the same server.
//!
//! `cargo bench -p planner-store --bench store` (needs nats-server 2.10+, as the tests do).
//! `BENCH_QUICK=1` shrinks every size by 10 for a smoke run. Prints a Markdown table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use planner_core::*;
use planner_store::*;
use planner_testkit::NatsServer;

fn scale(n: usize) -> usize {
    if std::env::var_os("BENCH_QUICK").is_some() {
        (n / 10).max(1)
    } else {
        n
    }
}

/// The events of a typical `process()` call: a completion and the dispatch it frees.
fn typical_batch(session: usize, i: usize) -> Vec<Event> {
    let task_id = TaskId(format!("t{i}"));
    vec![
        Event::TaskStatusUpdated {
            task_id: task_id.clone(),
            attempt: 1,
            status: TaskStatus::Completed,
            output: Some(format!(
                "session {session}: 42 rows matched; see report-{i}.csv"
            )),
            error: None,
            tokens_used: Some(120),
            at: Timestamp(i as u64),
        },
        Event::TaskDispatched {
            task_id: TaskId(format!("t{}", i + 1)),
            attempt: 1,
            cmd: PlannerCmd::ExecuteTool(Dispatch {
                task_id: TaskId(format!("t{}", i + 1)),
                attempt: 1,
                target: "web_search".into(),
            }),
            at: Timestamp(i as u64),
        },
    ]
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn row(what: &str, detail: &str, value: String) {
    println!("| {what} | {detail} | {value} |");
}

fn rate(n: usize, elapsed: Duration) -> String {
    let per_sec = n as f64 / elapsed.as_secs_f64();
    if per_sec >= 1e6 {
        format!("{:.2} M/s", per_sec / 1e6)
    } else {
        format!("{:.1} k/s", per_sec / 1e3)
    }
}

/// `sessions` concurrent writers, each appending `appends` typical batches in sequence.
async fn append_load<S: EventStore>(
    store: Arc<S>,
    tag: &str,
    sessions: usize,
    appends: usize,
) -> Duration {
    let start = Instant::now();
    let mut handles = Vec::new();
    for s in 0..sessions {
        let store = Arc::clone(&store);
        let stream = format!("{tag}-{s}");
        handles.push(tokio::spawn(async move {
            let mut version = 0;
            for i in 0..appends {
                version = store
                    .append(&stream, version, &typical_batch(s, i))
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}

/// A real planner session of at least `events` events, as the batches of its process() calls.
fn long_real_session(events: usize) -> Vec<Vec<Event>> {
    let mut planner = Planner::with_config(PlannerConfig {
        max_parallel: 16,
        ..PlannerConfig::default()
    })
    .unwrap();
    let mut batches = Vec::new();
    let mut total = 0;
    let mut now = 0;
    let mut turn = 0;
    while total < events {
        let tasks = (0..1_000)
            .map(|i| TaskSpec {
                timeouts: None,
                id: TaskId(format!("r{turn}_{i}")),
                description: format!("step {i} of request {turn}"),
                kind: NodeKind::ToolCall,
                target: "bench".into(),
                dependencies: if i >= 16 {
                    vec![TaskId(format!("r{turn}_{}", i - 16))]
                } else {
                    vec![]
                },
                attachments: vec![],
                question: None,
            })
            .collect();
        let first = planner
            .process(Command::Initialize {
                request_id: None,
                planning: None,
                input: format!("request {turn}"),
                attachments: vec![],
                plan: Some(PlanSpec { tasks }),
                now: Timestamp(now),
            })
            .unwrap();
        total += first.len();
        batches.push(first);
        while !planner.state().phase.is_terminal() {
            let running: Vec<(TaskId, u32)> = planner
                .state()
                .tasks
                .iter()
                .skip(planner.state().cursor)
                .filter(|t| t.status == TaskStatus::Running)
                .map(|t| (t.id.clone(), t.attempts))
                .collect();
            for (task_id, attempt) in running {
                now += 1;
                let batch = planner
                    .process(Command::HandleExecutorEvent {
                        lease: None,
                        event: ExecutorEvent {
                            task_id,
                            attempt,
                            outcome: ExecutorOutcome::Completed {
                                output: "ok: 42 rows".into(),
                                tokens_used: Some(10),
                            },
                        },
                        now: Timestamp(now),
                    })
                    .unwrap();
                total += batch.len();
                batches.push(batch);
            }
        }
        turn += 1;
    }
    batches
}

async fn bench_file(root: &std::path::Path) {
    let sessions = 64;
    let appends = scale(200);
    for (name, policy) in [
        ("always", FsyncPolicy::Always),
        ("group", FsyncPolicy::Group),
        ("never", FsyncPolicy::Never),
    ] {
        let dir = tempfile::tempdir_in(root).unwrap();
        let mut config = FileStoreConfig::new(dir.path());
        config.fsync = policy;
        let store = Arc::new(FileStore::open(config).unwrap());
        let sequential = append_load(Arc::clone(&store), "seq", 1, scale(500)).await;
        row(
            "file append",
            &format!("fsync {name}, 1 session, one at a time"),
            rate(scale(500), sequential),
        );
        let concurrent = append_load(Arc::clone(&store), "par", sessions, appends).await;
        row(
            "file append",
            &format!("fsync {name}, {sessions} sessions in flight"),
            rate(sessions * appends, concurrent),
        );
    }

    // Replay of a 1M-event session.
    let dir = tempfile::tempdir_in(root).unwrap();
    let mut config = FileStoreConfig::new(dir.path());
    config.fsync = FsyncPolicy::Never;
    let store = FileStore::open(config).unwrap();
    let events = scale(1_000_000);
    let batch = 1_000.min(events);
    for b in 0..events / batch {
        let chunk: Vec<Event> = (0..batch)
            .flat_map(|i| typical_batch(0, b * batch + i).into_iter().take(1))
            .collect();
        store
            .append("million", (b * batch) as u64, &chunk)
            .await
            .unwrap();
    }
    let samples: Vec<Duration> = futures_lite_block(3, || async {
        let start = Instant::now();
        let loaded = store.load_all("million").await.unwrap();
        assert_eq!(loaded.len(), events);
        start.elapsed()
    })
    .await;
    row(
        "file replay",
        &format!("load_all of a {events}-event session (median of 3)"),
        format!(
            "{:.0} ms, {}",
            median(samples.clone()).as_secs_f64() * 1e3,
            rate(events, median(samples))
        ),
    );

    // A 100k-event real session with snapshots every 1,000 events.
    let dir = tempfile::tempdir_in(root).unwrap();
    let mut config = FileStoreConfig::new(dir.path());
    config.fsync = FsyncPolicy::Never;
    let store = FileStore::open(config).unwrap();
    load_with_snapshots(&store, "file").await;
}

async fn load_with_snapshots<S: EventStore>(store: &S, name: &str) {
    let policy = SnapshotPolicy { every: 1_000 };
    let batches = long_real_session(scale(100_000));
    let mut live = Planner::new();
    for batch in &batches {
        let before = live.version();
        for e in batch {
            live.apply(e);
        }
        store.append("hundredk", before, batch).await.unwrap();
        policy.after_append(store, "hundredk", before, &live).await;
    }
    let events = live.version();
    let with_snapshot = futures_lite_block(5, || async {
        let start = Instant::now();
        let planner = load_planner(store, "hundredk").await.unwrap();
        assert_eq!(planner.version(), events);
        start.elapsed()
    })
    .await;
    let full = futures_lite_block(3, || async {
        let start = Instant::now();
        let planner = Planner::fold(&store.load_all("hundredk").await.unwrap());
        assert_eq!(planner.version(), events);
        start.elapsed()
    })
    .await;
    row(
        &format!("{name} load"),
        &format!("{events}-event session, snapshot every 1,000 (median of 5)"),
        format!("{:.1} ms", median(with_snapshot).as_secs_f64() * 1e3),
    );
    row(
        &format!("{name} load"),
        "same session, full replay (median of 3)",
        format!("{:.1} ms", median(full).as_secs_f64() * 1e3),
    );
}

/// Runs `f` `n` times in sequence and collects the results.
async fn futures_lite_block<F, Fut>(n: usize, f: F) -> Vec<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(f().await);
    }
    out
}

async fn raw_ceiling(client: &async_nats::Client, label: &str) -> f64 {
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(jetstream::stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let payload = Bytes::from(vec![b'x'; 300]);
    let n = scale(2_000);
    let start = Instant::now();
    for _ in 0..n {
        js.publish("raw.one", payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let one = start.elapsed();
    row(
        "JetStream raw publish+ack",
        &format!("{label}300 B, one at a time"),
        format!(
            "{} ({:.0} µs each)",
            rate(n, one),
            one.as_secs_f64() * 1e6 / n as f64
        ),
    );
    let mut best = 0.0f64;
    for window in [64usize, 512] {
        let n = scale(20_000);
        let start = Instant::now();
        let mut in_flight = VecDeque::with_capacity(window);
        for _ in 0..n {
            if in_flight.len() == window {
                let ack: jetstream::context::PublishAckFuture = in_flight.pop_front().unwrap();
                ack.await.unwrap();
            }
            in_flight.push_back(js.publish("raw.many", payload.clone()).await.unwrap());
        }
        for ack in in_flight {
            ack.await.unwrap();
        }
        let elapsed = start.elapsed();
        let per_sec = n as f64 / elapsed.as_secs_f64();
        best = best.max(per_sec);
        row(
            "JetStream raw publish+ack",
            &format!("{label}300 B, {window} acks in flight"),
            rate(n, elapsed),
        );
    }
    js.delete_stream("RAW").await.unwrap();
    best
}

async fn bench_jetstream(server: &NatsServer, label: &str) {
    let client = async_nats::connect(server.url()).await.unwrap();
    let ceiling = raw_ceiling(&client, label).await;
    let store = Arc::new(
        JetStreamStore::connect(client.clone(), JetStreamConfig::default())
            .await
            .unwrap(),
    );
    let appends = scale(500);
    let sequential = append_load(Arc::clone(&store), "seq", 1, appends).await;
    row(
        "JetStream store append",
        &format!("{label}1 session, one at a time"),
        rate(appends, sequential),
    );
    for sessions in [64usize, 256, 512] {
        let per = scale(20_000) / sessions;
        let elapsed =
            append_load(Arc::clone(&store), &format!("par{sessions}"), sessions, per).await;
        let per_sec = (sessions * per) as f64 / elapsed.as_secs_f64();
        row(
            "JetStream store append",
            &format!("{label}{sessions} sessions in flight"),
            format!(
                "{} = {:.0}% of the pipelined ceiling",
                rate(sessions * per, elapsed),
                100.0 * per_sec / ceiling
            ),
        );
    }

    let events = scale(1_000_000);
    let batch = 1_000.min(events);
    for b in 0..events / batch {
        let chunk: Vec<Event> = (0..batch)
            .flat_map(|i| typical_batch(0, b * batch + i).into_iter().take(1))
            .collect();
        store
            .append("million", (b * batch) as u64, &chunk)
            .await
            .unwrap();
    }
    let samples = futures_lite_block(3, || async {
        let start = Instant::now();
        let loaded = store.load_all("million").await.unwrap();
        assert_eq!(loaded.len(), events);
        start.elapsed()
    })
    .await;
    let m = median(samples);
    row(
        "JetStream replay",
        &format!("{label}load_all of a {events}-event session (median of 3)"),
        format!("{:.0} ms, {}", m.as_secs_f64() * 1e3, rate(events, m)),
    );
    load_with_snapshots(store.as_ref(), &format!("JetStream {label}")).await;
}

fn main() {
    // Criterion-style filter arguments are ignored: this bench always runs whole.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("| what | how | result |");
        println!("|---|---|---|");
        let root = std::env::current_dir().unwrap().join("target");
        std::fs::create_dir_all(&root).unwrap();
        if std::env::var("BENCH_ONLY").map_or(true, |only| only == "file") {
            bench_file(&root).await;
        }
        if std::env::var("BENCH_ONLY").is_ok_and(|only| only == "file") {
            return;
        }

        let server = NatsServer::start().unwrap();
        bench_jetstream(&server, "").await;
        drop(server);

        let conf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(conf.path(), "jetstream { sync_interval: always }\n").unwrap();
        let server = NatsServer::start_with_args(&["-c", conf.path().to_str().unwrap()]).unwrap();
        bench_jetstream(&server, "sync_interval always, ").await;
    });
}
