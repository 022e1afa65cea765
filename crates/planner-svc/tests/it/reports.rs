//! Direct reports: a report sent as a request on `planner.result.<session>`, answered once its
//! events are stored, with the report stream as the executor's fallback (docs/protocol.md,
//! "Reports").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::{StreamExt, TryStreamExt};
use planner_core::{Event, TaskStatus};
use planner_store::EventStore;
use planner_svc::executor::{run_pool, PoolObserver, PoolOptions, ReportPath};
use planner_svc::protocol::{
    ErrorKind, ErrorNotice, LeaseReply, ReportReply, Subjects, TaskMessage,
};
use planner_svc::sim::SimBehaviour;
use planner_testkit::NatsServer;
use serde_json::json;

use crate::harness::{claim, command, config, store, wait_for_end, Daemon};
use crate::ownership::ownership;

pub(crate) fn chain(session_tasks: &[&str]) -> serde_json::Value {
    let tasks: Vec<_> = session_tasks
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let deps: Vec<&str> = if i == 0 { vec![] } else { vec![session_tasks[i - 1]] };
            json!({"id": id, "description": format!("do {id}"), "kind": "tool_call", "target": "tool", "dependencies": deps})
        })
        .collect();
    json!({"type": "initialize", "input": "planned", "plan": {"tasks": tasks}})
}

/// Sends `body` as a direct report for `session`; the planner's reply.
pub(crate) async fn result(
    client: &async_nats::Client,
    session: &str,
    body: Vec<u8>,
) -> ReportReply {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(format!("planner.result.{session}"), body.into()),
    )
    .await
    .expect("a reply within 10 s")
    .expect("someone answers planner.result");
    serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("not a report reply: {e}: {:?}", reply.payload))
}

pub(crate) fn completed(task: &str, attempt: u32, lease: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"task_id": task, "attempt": attempt, "status": "completed", "output": format!("{task} done"), "lease": lease})).unwrap()
}

pub(crate) async fn lease_of(client: &async_nats::Client, session: &str, task: &str) -> String {
    match claim(client, session, json!({"task_id": task, "attempt": 1})).await {
        LeaseReply::Granted { lease, .. } => lease,
        other => panic!("the claim of {task} was not granted: {other:?}"),
    }
}

/// Messages the report stream holds (every report published to it, acked or not).
async fn stream_reports(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("PLANNER_REPORTS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Waits until every consumer of the report stream has handled what it holds.
async fn reports_drained(js: &jetstream::Context) {
    for _ in 0..500 {
        let stream = js.get_stream("PLANNER_REPORTS").await.unwrap();
        let consumers: Vec<_> = stream.consumers().try_collect().await.unwrap();
        if consumers
            .iter()
            .all(|c| c.num_pending == 0 && c.num_ack_pending == 0)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the report stream's consumers did not drain");
}

/// The `completed` status updates of (task, attempt) in `events`.
fn completions(events: &[Event], task: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(e, Event::TaskStatusUpdated { task_id, status: TaskStatus::Completed, .. } if task_id.as_str() == task)
        })
        .count()
}

fn dispatches(events: &[Event], task: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::TaskDispatched { task_id, .. } if task_id.as_str() == task))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_report_is_answered_ok_once_its_events_are_stored_and_writes_no_stream() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = store(&server.url()).await;
    command(&client, "s-direct", chain(&["a", "b"])).await;
    let lease = lease_of(&client, "s-direct", "a").await;

    let reply = result(&client, "s-direct", completed("a", 1, &lease)).await;
    assert_eq!(reply, ReportReply::Ok { next: None });
    // When the reply comes, the completion and the dispatch it caused are in the store.
    let events = store.load_all("s-direct").await.unwrap();
    assert_eq!(completions(&events, "a"), 1, "{events:?}");
    assert_eq!(dispatches(&events, "b"), 1, "{events:?}");
    assert_eq!(
        stream_reports(&js).await,
        0,
        "nothing went through the stream"
    );

    let lease = lease_of(&client, "s-direct", "b").await;
    assert_eq!(
        result(&client, "s-direct", completed("b", 1, &lease)).await,
        ReportReply::Ok { next: None }
    );
    let events = store.load_all("s-direct").await.unwrap();
    assert!(
        events.iter().any(|e| e.event_type() == "plan_completed"),
        "{events:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_report_with_a_wrong_lease_or_bad_input_is_refused_and_changes_nothing() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = store(&server.url()).await;
    command(&client, "s-refuse", chain(&["a"])).await;
    let lease = lease_of(&client, "s-refuse", "a").await;
    let version = store.version("s-refuse").await.unwrap();
    let mut errors = client.subscribe("planner.errors").await.unwrap();
    client.flush().await.unwrap();

    let oversized = serde_json::to_vec(&json!({"task_id": "a", "attempt": 1, "status": "completed", "output": "x".repeat(300 * 1024), "lease": lease})).unwrap();
    let cases: Vec<(&str, Vec<u8>, ErrorKind, &str)> = vec![
        (
            "s-refuse",
            completed("a", 1, "guessed"),
            ErrorKind::Rejected,
            "lease_mismatch",
        ),
        (
            "s-refuse",
            serde_json::to_vec(
                &json!({"task_id": "a", "attempt": 1, "status": "completed", "output": "no lease"}),
            )
            .unwrap(),
            ErrorKind::Rejected,
            "lease_mismatch",
        ),
        (
            "s-refuse",
            b"not json".to_vec(),
            ErrorKind::Malformed,
            "not an executor report",
        ),
        ("s-refuse", oversized, ErrorKind::TooLarge, "limit"),
        (
            "s-refuse",
            completed("ghost", 1, &lease),
            ErrorKind::Rejected,
            "ghost",
        ),
        (
            "s-nobody",
            completed("a", 1, &lease),
            ErrorKind::Rejected,
            "",
        ),
    ];
    for (session, body, kind, says) in cases {
        match result(&client, session, body).await {
            ReportReply::Refused(error) => {
                assert_eq!(error.kind, kind, "{error:?}");
                assert!(error.message.contains(says), "{error:?}");
            }
            other => panic!("{session}: refused as {kind} expected, got {other:?}"),
        }
        // Said on planner.errors too, as a refused report from the stream is.
        let notice = tokio::time::timeout(Duration::from_secs(5), errors.next())
            .await
            .expect("a notice on planner.errors")
            .unwrap();
        let notice: ErrorNotice = serde_json::from_slice(&notice.payload).unwrap();
        assert_eq!(notice.subject, format!("planner.result.{session}"));
        assert_eq!(notice.session.as_deref(), Some(session));
        assert_eq!(notice.error.kind, kind);
    }
    assert_eq!(
        store.version("s-refuse").await.unwrap(),
        version,
        "nothing changed"
    );
    assert_eq!(
        store.version("s-nobody").await.unwrap(),
        0,
        "no session made"
    );
    assert_eq!(stream_reports(&js).await, 0);

    // The holder of the lease completes it.
    assert_eq!(
        result(&client, "s-refuse", completed("a", 1, &lease)).await,
        ReportReply::Ok { next: None }
    );
    assert!(crate::daemon::ended_completed(
        &store.load_all("s-refuse").await.unwrap()
    ));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_sent_both_ways_is_applied_once_and_one_for_an_ended_attempt_is_dropped_quietly() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = store(&server.url()).await;
    command(&client, "s-twice", chain(&["a", "b", "c"])).await;
    let publish = |body: Vec<u8>| {
        let js = js.clone();
        async move {
            js.publish("planner.report.s-twice", body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    // Direct first, then the same report through the stream (a fallback after a lost reply).
    let lease = lease_of(&client, "s-twice", "a").await;
    assert_eq!(
        result(&client, "s-twice", completed("a", 1, &lease)).await,
        ReportReply::Ok { next: None }
    );
    publish(completed("a", 1, &lease)).await;
    reports_drained(&js).await;
    // The stream first, then directly (a report both published and retried directly).
    let lease = lease_of(&client, "s-twice", "b").await;
    publish(completed("b", 1, &lease)).await;
    reports_drained(&js).await;
    assert_eq!(
        result(&client, "s-twice", completed("b", 1, &lease)).await,
        ReportReply::Ok { next: None },
        "a duplicate is answered ok: nothing more to do"
    );
    let events = store.load_all("s-twice").await.unwrap();
    for task in ["a", "b"] {
        assert_eq!(completions(&events, task), 1, "{task}: {events:?}");
    }
    assert_eq!(dispatches(&events, "b"), 1, "{events:?}");
    assert_eq!(dispatches(&events, "c"), 1, "{events:?}");

    // The plan is cancelled while c runs: its report comes late, and is dropped quietly.
    let lease = lease_of(&client, "s-twice", "c").await;
    command(
        &client,
        "s-twice",
        json!({"type": "cancel", "target": {"scope": "plan"}}),
    )
    .await;
    wait_for_end(&store, "s-twice").await;
    let version = store.version("s-twice").await.unwrap();
    let mut errors = client.subscribe("planner.errors").await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(
        result(&client, "s-twice", completed("c", 1, &lease)).await,
        ReportReply::Ok { next: None }
    );
    assert_eq!(store.version("s-twice").await.unwrap(), version);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), errors.next())
            .await
            .is_err(),
        "no notice for a report on an attempt that ended"
    );
    daemon.stop().await;
}

/// Counts what the pool reported.
#[derive(Default)]
struct Reported(AtomicU64);

impl PoolObserver for Reported {
    fn reported(&self, _task: &TaskMessage, _at: Instant) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_planner_running_the_pools_report_goes_to_the_stream_and_is_applied_later() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = store(&server.url()).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let reported = Arc::new(Reported::default());
    let pool = tokio::spawn(run_pool(
        client.clone(),
        Subjects::new("planner"),
        PoolOptions {
            offers: true,
            take_next: true,
            stream: "PLANNER_TASKS".into(),
            consumer: "fallback-pool".into(),
            filter: "planner.task.>".into(),
            concurrency: 2,
            report_started: false,
            behaviour: SimBehaviour {
                latency: Duration::from_secs(3),
                jitter_percent: 0,
                fail_percent: 0,
                tokens: 1,
            },
            reports: ReportPath::Direct,
        },
        reported.clone() as Arc<dyn PoolObserver>,
        stop.clone(),
    ));
    command(&client, "s-fallback", chain(&["a"])).await;
    // Claimed: the work runs; the planner stops before it ends.
    let mut claimed = false;
    for _ in 0..200 {
        let events = store.load_all("s-fallback").await.unwrap();
        if events.iter().any(|e| e.event_type() == "attempt_claimed") {
            claimed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(claimed, "the pool claimed the attempt");
    daemon.stop().await;
    assert_eq!(
        reported.0.load(Ordering::Relaxed),
        0,
        "stopped before the report"
    );

    // No one answers planner.result: the report is published to the stream, and kept there.
    let mut stored = 0;
    for _ in 0..200 {
        stored = stream_reports(&js).await;
        if stored > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored, 1, "the report went to the stream");
    assert_eq!(reported.0.load(Ordering::Relaxed), 1);
    let events = store.load_all("s-fallback").await.unwrap();
    assert_eq!(
        completions(&events, "a"),
        0,
        "not applied while no planner runs"
    );

    // A planner starts: it takes the report from the stream.
    let daemon = Daemon::start(config(&server)).await;
    let events = wait_for_end(&store, "s-fallback").await;
    assert!(crate::daemon::ended_completed(&events), "{events:?}");
    assert_eq!(completions(&events, "a"), 1);
    stop.cancel();
    let _ = pool.await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_report_reaching_an_instance_that_does_not_own_the_session_is_forwarded_and_applied(
) {
    let server = NatsServer::start().unwrap();
    let a = Daemon::start(config(&server)).await;
    let b = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = store(&server.url()).await;
    crate::ownership::wait_for_split(&client, 2, Duration::from_secs(10)).await;
    let forwarded = |replies: Vec<planner_svc::protocol::OwnershipReply>| -> u64 {
        replies.iter().map(|r| r.forwarded).sum()
    };
    // Requests land on either instance (one queue group): send reports until one landed on
    // the instance that does not own its session (each does with probability one half).
    let mut seen_forwarded = false;
    for i in 0..30 {
        let session = format!("s-fwd-{i}");
        command(&client, &session, chain(&["a"])).await;
        let lease = lease_of(&client, &session, "a").await;
        let before = forwarded(ownership(&client).await);
        assert_eq!(
            result(&client, &session, completed("a", 1, &lease)).await,
            ReportReply::Ok { next: None }
        );
        let events = store.load_all(&session).await.unwrap();
        assert_eq!(completions(&events, "a"), 1, "{session}: {events:?}");
        if forwarded(ownership(&client).await) > before {
            seen_forwarded = true;
            break;
        }
    }
    assert!(seen_forwarded, "no direct report was forwarded in 30 tries");
    assert_eq!(stream_reports(&js).await, 0);
    a.stop().await;
    b.stop().await;
}

/// A report in the languages executors really answer in, at the size limit: the limit counts
/// bytes (a character of these is 2 to 4 of them), a report just under it is applied with its
/// output intact, one just over it is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_english_report_at_the_size_limit_is_applied_intact_and_one_byte_over_refused() {
    let server = NatsServer::start().unwrap();
    let config = config(&server);
    let limit = config.limits.max_message_bytes;
    let daemon = Daemon::start(config).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let store = store(&server.url()).await;
    command(&client, "s-intl", chain(&["a", "b"])).await;
    let lease = lease_of(&client, "s-intl", "a").await;

    let report = |output: &str| {
        serde_json::to_vec(&json!({"task_id": "a", "attempt": 1, "status": "completed", "output": output, "lease": lease})).unwrap()
    };
    // Chinese, Cyrillic, Arabic, an emoji with a skin tone and a combining accent.
    let phrase = "结果：完成。Итог: готово. النتيجة: تم. 👍🏽 e\u{301} ";
    let overhead = report("").len();
    let mut output = String::new();
    while overhead + output.len() + phrase.len() <= limit {
        output.push_str(phrase);
    }
    // Filled to the byte with one-byte characters (JSON escapes none of these).
    while overhead + output.len() < limit {
        output.push('x');
    }
    assert_eq!(report(&output).len(), limit);
    assert!(
        output.chars().count() < limit,
        "characters are not bytes here"
    );

    let over = report(&format!("{output}x"));
    match result(&client, "s-intl", over).await {
        ReportReply::Refused(error) => assert_eq!(error.kind, ErrorKind::TooLarge, "{error:?}"),
        other => panic!("one byte over the limit: {other:?}"),
    }
    let events = store.load_all("s-intl").await.unwrap();
    assert_eq!(
        completions(&events, "a"),
        0,
        "the refused report changed nothing"
    );

    assert_eq!(
        result(&client, "s-intl", report(&output)).await,
        ReportReply::Ok { next: None }
    );
    let events = store.load_all("s-intl").await.unwrap();
    let stored = events.iter().find_map(|e| match e {
        Event::TaskStatusUpdated {
            task_id,
            status: TaskStatus::Completed,
            output,
            ..
        } if task_id.as_str() == "a" => output.clone(),
        _ => None,
    });
    assert_eq!(
        stored.as_deref(),
        Some(output.as_str()),
        "stored byte for byte"
    );
    assert_eq!(dispatches(&events, "b"), 1, "{events:?}");
    daemon.stop().await;
}
