//! The per-role users of deploy/nats/nats-server.conf, with the daemon running as its
//! `planner` user (#10 item 6): each role can do its job, and the server refuses what a role
//! must not do (forged reports, forged dispatches or events, commands from an executor), so the
//! store does not change.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use planner_svc::protocol::{CommandReply, ErrorKind, ErrorNotice, QuarantineReply};
use planner_testkit::NatsServer;
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::harness::{config, Daemon};
use crate::support::{connect_watching, planner_svc, refused, Spawned};

const ROLES: [&str; 4] = ["planner", "executor", "ui", "operator"];

fn password(role: &str) -> String {
    format!("test-{role}-pw")
}

/// The shipped config with each `change-me-<role>` placeholder replaced by a test password.
fn shipped_server(dir: &std::path::Path) -> NatsServer {
    shipped_server_edited(dir, |text| text)
}

/// The shipped config, changed by `edit`, with test passwords.
fn shipped_server_edited(dir: &std::path::Path, edit: impl FnOnce(String) -> String) -> NatsServer {
    let conf =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/nats-server.conf");
    let mut text = edit(std::fs::read_to_string(conf).unwrap());
    for role in ROLES {
        text = text.replace(&format!("change-me-{role}"), &password(role));
    }
    assert!(!text.contains("change-me"), "a role the test does not know");
    let path = dir.join("nats-server.conf");
    std::fs::write(&path, text).unwrap();
    NatsServer::start_with_args(&["-c", path.to_str().unwrap()]).unwrap()
}

/// The daemon's config, as the shipped `planner` user.
fn planner_config(server: &NatsServer) -> planner_svc::config::Config {
    let mut daemon_config = config(server);
    daemon_config.nats.user = "planner".into();
    daemon_config.nats.password = password("planner").as_str().into();
    daemon_config
}

/// A connection as `role`, and the server's errors (permission violations) it receives.
async fn connect_as(
    server: &NatsServer,
    role: &str,
) -> (async_nats::Client, UnboundedReceiver<String>) {
    connect_watching(&server.url(), role, &password(role)).await
}

async fn messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

async fn request(
    client: &async_nats::Client,
    subject: String,
    body: serde_json::Value,
) -> async_nats::Message {
    tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject, serde_json::to_vec(&body).unwrap().into()),
    )
    .await
    .expect("a reply within 10 s")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_its_job_and_the_server_refuses_what_a_role_must_not_do() {
    let dir = tempfile::tempdir().unwrap();
    let server = shipped_server(dir.path());
    let daemon_config = planner_config(&server);
    let planner = planner_svc::serve::connect(&daemon_config).await.unwrap();
    let daemon = Daemon::start(daemon_config).await;
    let js = jetstream::new(planner.clone());

    let (operator, mut operator_events) = connect_as(&server, "operator").await;
    let mut errors = operator.subscribe("planner.errors").await.unwrap();
    operator.flush().await.unwrap();

    // The UI starts a session: one task is dispatched.
    let (ui, mut ui_events) = connect_as(&server, "ui").await;
    let plan = json!({"tasks": [{"id": "t1", "kind": "tool_call", "target": "fetch", "description": "fetch a"}]});
    let reply = request(
        &ui,
        "planner.cmd.s1".into(),
        json!({"type": "initialize", "input": "fetch a", "plan": plan}),
    )
    .await;
    let reply: CommandReply = serde_json::from_slice(&reply.payload).unwrap();
    assert!(matches!(reply, CommandReply::Ok { .. }), "{reply:?}");

    // The executor pulls it and claims it.
    let (executor, mut executor_events) = connect_as(&server, "executor").await;
    let executor_js = jetstream::new(executor.clone());
    let tasks = executor_js.get_stream("PLANNER_TASKS").await.unwrap();
    let consumer = tasks
        .get_or_create_consumer(
            "pool",
            jetstream::consumer::pull::Config {
                durable_name: Some("pool".into()),
                filter_subject: "planner.task.>".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let task = batch.next().await.expect("a dispatch").unwrap();
    task.ack().await.unwrap();
    let claim = request(
        &executor,
        "planner.claim.s1".into(),
        json!({"task_id": "t1", "attempt": 1, "claim_id": "claim-roles-0001"}),
    )
    .await;
    let claim: serde_json::Value = serde_json::from_slice(&claim.payload).unwrap();
    assert_eq!(claim["status"], "granted", "{claim}");

    let events_before = messages(&js, "PLANNER_EVENTS").await;
    let reports_before = messages(&js, "PLANNER_REPORTS").await;
    let tasks_before = messages(&js, "PLANNER_TASKS").await;

    // An executor may not send commands: not a new session, not an answer to any session's
    // question.
    executor
        .publish(
            "planner.cmd.s2",
            serde_json::to_vec(&json!({"type": "initialize", "input": "forged"}))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    executor.flush().await.unwrap();
    refused(&mut executor_events, "planner.cmd.s2").await;
    // Nor read what the UIs are asked, nor the stored events.
    let _questions = executor.subscribe("planner.ui.>").await.unwrap();
    executor.flush().await.unwrap();
    refused(&mut executor_events, "planner.ui.>").await;
    let _events = executor.subscribe("planner.events.>").await.unwrap();
    executor.flush().await.unwrap();
    refused(&mut executor_events, "planner.events.>").await;

    // A UI may not forge an executor's result (by either path), a dispatch or a stored event.
    let forged = json!({"event": {"task_id": "t1", "attempt": 1, "outcome": {"status": "completed", "output": "forged"}}});
    for subject in [
        "planner.report.s1",
        "planner.result.s1",
        "planner.task.tool_call.fetch",
        "planner.events.s1",
    ] {
        ui.publish(subject, serde_json::to_vec(&forged).unwrap().into())
            .await
            .unwrap();
        ui.flush().await.unwrap();
        refused(&mut ui_events, subject).await;
    }
    // Compaction (a summary written into the context) is the planner's own: refused by the
    // daemon, as every planner-only command.
    let compact = request(
        &ui,
        "planner.cmd.s1".into(),
        json!({"type": "compact_context", "summary": "forged", "now": 1}),
    )
    .await;
    match serde_json::from_slice::<CommandReply>(&compact.payload).unwrap() {
        CommandReply::Error(error) => assert_eq!(error.kind, ErrorKind::Forbidden, "{error:?}"),
        other => panic!("a UI compacted the context: {other:?}"),
    }
    // The operator reads; it does not command.
    operator
        .publish("planner.cmd.s3", "{}".into())
        .await
        .unwrap();
    operator.flush().await.unwrap();
    refused(&mut operator_events, "planner.cmd.s3").await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        messages(&js, "PLANNER_EVENTS").await,
        events_before,
        "a refused publish reached the store"
    );
    assert_eq!(
        messages(&js, "PLANNER_REPORTS").await,
        reports_before,
        "a forged report was captured"
    );
    assert_eq!(
        messages(&js, "PLANNER_TASKS").await,
        tasks_before,
        "a forged dispatch was queued"
    );

    // What an operator watches: a report the planner cannot read is said on planner.errors.
    let ack = executor_js
        .publish("planner.report.s1", "not json".into())
        .await
        .unwrap();
    ack.await.unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(10), errors.next())
        .await
        .expect("an error notice within 10 s")
        .unwrap();
    let notice: ErrorNotice = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice.error.kind, ErrorKind::Malformed, "{notice:?}");

    // The operator lists the quarantined sessions (none here); the planner may serve the
    // subject. A UI may not ask (nor release a quarantine).
    let reply = request(&operator, "planner.admin.quarantined".into(), json!({})).await;
    let reply: QuarantineReply = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        matches!(&reply, QuarantineReply::Ok { sessions, .. } if sessions.is_empty()),
        "{reply:?}"
    );
    ui.publish("planner.admin.quarantined", r#"{"release": "s1"}"#.into())
        .await
        .unwrap();
    refused(&mut ui_events, "planner.admin.quarantined").await;

    // The executor reports its attempt directly (request/reply), with the lease.
    let lease = claim["lease"].as_str().unwrap();
    let report = request(
        &executor,
        "planner.result.s1".into(),
        json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "a", "lease": lease}),
    )
    .await;
    let report: serde_json::Value = serde_json::from_slice(&report.payload).unwrap();
    assert_eq!(report["status"], "ok", "{report}");

    daemon.stop().await;
}

/// The shipped config, except that the planner user may not subscribe to `planner.claim.*`.
fn server_denying_claims(dir: &std::path::Path) -> NatsServer {
    shipped_server_edited(dir, |text| {
        let allowed = r#"subscribe: { allow: ["planner.cmd.*", "planner.claim.*", "#;
        assert!(text.contains(allowed), "the shipped planner user changed");
        text.replace(allowed, r#"subscribe: { allow: ["planner.cmd.*", "#)
    })
}

/// The daemon as a `planner` user the server does not let subscribe to `planner.claim.*`: it
/// cannot serve executors, so it must say so at start-up and exit, not serve half-deaf (it
/// served: the refusal was an INFO line, "nats connection event").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planner_denied_a_subject_it_serves_fails_at_start_up_naming_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_denying_claims(dir.path());
    let mut daemon_config = planner_config(&server);
    daemon_config.shutdown.grace_s = 2;
    // Whatever happens, the test ends: a start-up that served anyway is stopped after 3 s, and
    // the whole run is bounded.
    let run = planner_svc::serve::serve(daemon_config, tokio::time::sleep(Duration::from_secs(3)));
    let result = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("serve ended within 30 s");
    let error = format!(
        "{:#}",
        result.expect_err("the daemon served without planner.claim.*")
    );
    assert!(error.contains("planner.claim.*"), "{error}");
    assert!(error.to_lowercase().contains("permission"), "{error}");
}

/// The same as an operator sees it: `serve` exits with an error naming the subject, and the
/// server's refusal is logged at ERROR, not INFO. Bounded: a daemon that serves on is killed.
#[test]
fn serve_as_a_planner_denied_a_subject_exits_1_with_the_refusal_logged_at_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_denying_claims(dir.path());
    let mut daemon = Spawned::start(
        planner_svc()
            .current_dir(dir.path())
            .args(["serve", "--nats-url", &server.url()])
            .env("PLANNER_NATS__USER", "planner")
            .env("PLANNER_NATS__PASSWORD", password("planner"))
            .env("PLANNER_SHUTDOWN__GRACE_S", "2"),
    );
    let status = daemon.wait_exit(Duration::from_secs(30));
    let output = daemon.output();
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "exit {status:?}:\n{output}"
    );
    assert!(
        output.lines().any(|line| line.contains("ERROR")
            && line.contains("Permissions Violation")
            && line.contains("planner.claim.*")),
        "{output}"
    );
    assert!(
        output.contains("refused a subscription the daemon needs"),
        "{output}"
    );
    assert!(!output.contains("planner-svc serving"), "{output}");
}

/// A planner user the server does not let use the JetStream API: waiting cannot fix that, so
/// `serve` exits at once naming the refusal, not after `nats.startup_wait_s` (60 s) of retries.
#[test]
fn serve_refused_the_jetstream_api_exits_at_once_naming_the_permission() {
    let dir = tempfile::tempdir().unwrap();
    let server = shipped_server_edited(dir.path(), |text| {
        let allowed = r#"publish: { allow: ["planner.>", "$JS.API.>", "#;
        assert!(text.contains(allowed), "the shipped planner user changed");
        text.replace(allowed, r#"publish: { allow: ["planner.>", "#)
    });
    let started = std::time::Instant::now();
    let mut daemon = Spawned::start(
        planner_svc()
            .current_dir(dir.path())
            .args(["serve", "--nats-url", &server.url()])
            .env("PLANNER_NATS__USER", "planner")
            .env("PLANNER_NATS__PASSWORD", password("planner"))
            .env("PLANNER_METRICS__LISTEN", ""),
    );
    let status = daemon.wait_exit(Duration::from_secs(30));
    let output = daemon.output();
    assert!(
        status.is_some_and(|s| !s.success()),
        "exit {status:?}:\n{output}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}:\n{output}",
        started.elapsed()
    );
    assert!(output.contains("waiting will not help"), "{output}");
    assert!(output.contains("$JS.API"), "{output}");
    assert!(
        output.contains("permissions of the daemon's NATS user"),
        "{output}"
    );
}
