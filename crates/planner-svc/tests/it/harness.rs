//! A daemon, executors and a UI on a real nats-server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures::StreamExt;
use planner_core::FenceReason;
use planner_core::{Event, ExecutorEvent, ExecutorOutcome};
use planner_store::{EventStore, JetStreamConfig, JetStreamStore};
use planner_svc::config::Config;
use planner_svc::protocol::{
    CommandReply, LeaseReply, QuestionMessage, ReportMessage, TaskMessage,
};
use planner_testkit::NatsServer;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn config(server: &NatsServer) -> Config {
    let mut config = Config::default();
    config.nats.url = server.url();
    config.planner.retry.initial_backoff_ms = 50;
    config.sessions.recovery_interval_s = 1;
    config.shutdown.grace_s = 5;
    // A killed instance's partitions are taken over after this: short, so tests that kill
    // and replace an instance do not wait the production TTL.
    config.ownership.lease_ttl_ms = 2000;
    // Many daemons share this process: the tests of the admin listener give it a port.
    config.metrics.listen = String::new();
    // The metrics recorder is one per process: only the test of the background check runs it.
    config.metrics.check_interval_s = 0;
    // The default, said here: tests of the stream path turn them off.
    config.dispatch.offers = true;
    config
}

pub struct Daemon {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    pub async fn start(config: Config) -> Daemon {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        // The ping goes through the daemon's own connect path: with its credentials and TLS.
        let client = planner_svc::serve::connect(&config).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(planner_svc::serve::serve(config, async move {
            let _ = stopped.await;
        }));
        // Ready when the micro-service answers a ping.
        assert!(
            crate::support::answers_ping(&client).await,
            "the daemon did not answer $SRV.PING.planner"
        );
        Daemon {
            stop: Some(stop),
            handle,
        }
    }

    /// SIGTERM-like: stop intake, finish, drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(15), &mut self.handle).await;
        result
            .expect("stopped within the grace bound")
            .unwrap()
            .unwrap();
    }

    /// A crash: the task is dropped mid-flight.
    pub fn kill(self) {
        self.handle.abort();
    }
}

/// (session, task, attempt) -> times executed.
pub type Executions = Arc<Mutex<BTreeMap<(String, String, u32), u32>>>;

#[derive(Clone, Default)]
pub struct ExecutorBehaviour {
    /// Tasks whose first attempt fails (retryably).
    pub fail_first: BTreeSet<String>,
    /// Targets never answered (the executor claims the task and stalls, heartbeating).
    pub stall_targets: BTreeSet<String>,
    /// Targets whose first attempt's executor dies right after claiming it (no heartbeat,
    /// no report: a `kill -9`).
    pub die_after_claim: BTreeSet<String>,
    pub delay: Duration,
    /// Bytes of output each completed task reports (a short text when 0).
    pub output_bytes: usize,
}

pub struct Executors {
    pub executions: Executions,
    /// Deliveries of each (session, task, attempt), claimed or not.
    pub deliveries: Executions,
    /// (session, task, why) of every attempt the planner told a heartbeating executor to stop.
    pub stops: Arc<Mutex<Vec<(String, String, FenceReason)>>>,
    pub subjects_seen: Arc<Mutex<BTreeSet<String>>>,
    token: CancellationToken,
}

impl Drop for Executors {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl Executors {
    /// A pool pulling every dispatch (`planner.task.>`) through one durable consumer.
    pub async fn start(url: &str, behaviour: ExecutorBehaviour) -> Executors {
        Executors::start_on(async_nats::connect(url).await.unwrap(), behaviour).await
    }

    /// The same pool on a connection of the caller's (with its credentials).
    pub async fn start_on(client: async_nats::Client, behaviour: ExecutorBehaviour) -> Executors {
        let js = jetstream::new(client.clone());
        let stream = js.get_stream("PLANNER_TASKS").await.unwrap();
        let consumer = stream
            .get_or_create_consumer(
                "test-pool",
                pull::Config {
                    durable_name: Some("test-pool".into()),
                    filter_subject: "planner.task.>".into(),
                    // A delivery lost with a cluster node that dies comes back after this, not
                    // after the default 30 s (the pool acks right after its claim).
                    ack_wait: Duration::from_secs(5),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let executions: Executions = Arc::default();
        let deliveries: Executions = Arc::default();
        let delivered = deliveries.clone();
        let subjects_seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let token = CancellationToken::new();
        let stops_seen: Arc<Mutex<Vec<(String, String, FenceReason)>>> = Arc::default();
        let (ex, seen, stop, stops) = (
            executions.clone(),
            subjects_seen.clone(),
            token.clone(),
            stops_seen.clone(),
        );
        tokio::spawn(async move {
            // As the daemon's own pool pulls: async-nats' default pull requests outlive a
            // cluster node that dies with them by about 30 s (see `pull_messages`).
            let mut messages = planner_svc::bus::pull_messages(&consumer, 200)
                .await
                .unwrap();
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    m = messages.next() => match m { Some(Ok(m)) => m, Some(Err(_)) => continue, None => return },
                };
                let task: TaskMessage = serde_json::from_slice(&message.payload).unwrap();
                seen.lock().unwrap().insert(message.subject.to_string());
                // As docs/protocol.md asks of executors: the dispatch's trace context goes on
                // with its claim and its report.
                let mut trace = async_nats::HeaderMap::new();
                if let Some(value) = message.headers.as_ref().and_then(|h| h.get("traceparent")) {
                    trace.insert("traceparent", value.as_str());
                }
                let a = &task.assignment;
                *delivered
                    .lock()
                    .unwrap()
                    .entry((task.session.clone(), a.task_id.0.clone(), a.attempt))
                    .or_default() += 1;
                // Claim before running (docs/protocol.md); count runs, not deliveries. A claim
                // whose reply is lost (a server restart) is asked again with the same id.
                let claim_id = uuid::Uuid::new_v4().simple().to_string();
                let claim =
                    json!({"task_id": a.task_id, "attempt": a.attempt, "claim_id": claim_id});
                let mut reply = Err(());
                for tries in 1..=5u64 {
                    let asked = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.request_with_headers(
                            format!("planner.claim.{}", task.session),
                            trace.clone(),
                            serde_json::to_vec(&claim).unwrap().into(),
                        ),
                    )
                    .await;
                    if let Ok(Ok(answer)) = asked {
                        reply = Ok(answer);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                let Ok(reply) = reply else {
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                        .await;
                    continue;
                };
                let lease = match serde_json::from_slice::<LeaseReply>(&reply.payload).unwrap() {
                    LeaseReply::Granted { lease, .. } => lease,
                    LeaseReply::Stop { .. } => {
                        let _ = message.ack_with(AckKind::Term).await;
                        continue;
                    }
                    _ => {
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                            .await;
                        continue;
                    }
                };
                *ex.lock()
                    .unwrap()
                    .entry((task.session.clone(), a.task_id.0.clone(), a.attempt))
                    .or_default() += 1;
                message.ack().await.unwrap();
                if a.attempt == 1 && behaviour.die_after_claim.contains(&a.target) {
                    continue;
                }
                if behaviour.stall_targets.contains(&a.target) {
                    // Alive and heartbeating until the planner says stop.
                    let (client, session, stopped) =
                        (client.clone(), task.session.clone(), stops.clone());
                    let beat = json!({"task_id": a.task_id, "attempt": a.attempt, "lease": lease});
                    let task_id = a.task_id.0.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            let Ok(reply) = client
                                .request(
                                    format!("planner.heartbeat.{session}"),
                                    serde_json::to_vec(&beat).unwrap().into(),
                                )
                                .await
                            else {
                                continue;
                            };
                            if let Ok(LeaseReply::Stop { reason, .. }) =
                                serde_json::from_slice(&reply.payload)
                            {
                                stopped.lock().unwrap().push((session, task_id, reason));
                                return;
                            }
                        }
                    });
                    continue;
                }
                let outcome = if a.attempt == 1 && behaviour.fail_first.contains(a.task_id.as_str())
                {
                    ExecutorOutcome::Failed {
                        error: "first try fails".into(),
                        retryable: true,
                        tokens_used: None,
                    }
                } else {
                    ExecutorOutcome::Completed {
                        output: if behaviour.output_bytes > 0 {
                            "x".repeat(behaviour.output_bytes)
                        } else {
                            format!("done {}", a.task_id)
                        },
                        tokens_used: Some(3),
                    }
                };
                let js = js.clone();
                let delay = behaviour.delay;
                let report = ReportMessage {
                    event: ExecutorEvent {
                        task_id: a.task_id.clone(),
                        attempt: a.attempt,
                        outcome,
                    },
                    lease: Some(lease),
                    next: None,
                };
                let subject = format!("planner.report.{}", task.session);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let body = serde_json::to_vec(&report).unwrap();
                    // Retry through a server restart.
                    for _ in 0..100 {
                        let sent = js
                            .publish_with_headers(
                                subject.clone(),
                                trace.clone(),
                                body.clone().into(),
                            )
                            .await;
                        if let Ok(ack) = sent {
                            if ack.await.is_ok() {
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
            }
        });
        Executors {
            executions,
            deliveries,
            stops: stops_seen,
            subjects_seen,
            token,
        }
    }

    /// Deliveries of one (session, task, attempt) to this pool. Without a server restart (no lost
    /// acks) anything above 1 means the planner published a dispatch twice past its dedup.
    pub fn max_runs_of_one_attempt(&self) -> u32 {
        self.executions
            .lock()
            .unwrap()
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// A UI answering every question on `planner.ui.*.question` with `answer`.
pub async fn start_ui(url: &str, answer: &'static str) -> Arc<Mutex<Vec<QuestionMessage>>> {
    let client = async_nats::connect(url).await.unwrap();
    let mut questions = client.subscribe("planner.ui.*.question").await.unwrap();
    let seen: Arc<Mutex<Vec<QuestionMessage>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Some(message) = questions.next().await {
            let question: QuestionMessage = serde_json::from_slice(&message.payload).unwrap();
            record.lock().unwrap().push(question.clone());
            let body = serde_json::json!({"type": "answer_clarification", "task_id": question.task_id, "answer": answer});
            let _ = command(&client, &question.session, body).await;
        }
    });
    seen
}

/// Claims on `planner.claim.{session}` with `body` (the executor's side of docs/protocol.md).
pub async fn claim(
    client: &async_nats::Client,
    session: &str,
    body: serde_json::Value,
) -> LeaseReply {
    let reply = client
        .request(
            format!("planner.claim.{session}"),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// `config` with a heartbeat timeout of its own for tasks of `target`.
pub fn with_target_heartbeat(mut config: Config, target: &str, timeout_ms: u64) -> Config {
    config.planner.leases.targets.insert(
        target.into(),
        planner_core::TaskTimeouts {
            heartbeat_timeout_ms: Some(timeout_ms),
            ..Default::default()
        },
    );
    config
}

pub async fn command(
    client: &async_nats::Client,
    session: &str,
    body: serde_json::Value,
) -> CommandReply {
    let reply = client
        .request(
            format!("planner.cmd.{session}"),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

pub async fn store(url: &str) -> JetStreamStore {
    store_on(async_nats::connect(url).await.unwrap()).await
}

/// The daemon's store read on a connection of the caller's (with its credentials).
pub async fn store_on(client: async_nats::Client) -> JetStreamStore {
    JetStreamStore::connect(client, JetStreamConfig::default())
        .await
        .unwrap()
}

/// Polls the session's log until the plan ends; returns every event.
pub async fn wait_for_end(store: &JetStreamStore, session: &str) -> Vec<Event> {
    wait_for_end_within(store, session, Duration::from_secs(20)).await
}

/// [`wait_for_end`], for plans whose tasks take longer, waiting up to `limit`.
pub async fn wait_for_end_within(
    store: &JetStreamStore,
    session: &str,
    limit: Duration,
) -> Vec<Event> {
    let polls = limit.as_millis() / 50;
    for _ in 0..polls {
        if let Ok(events) = store.load_all(session).await {
            if events.iter().any(Event::is_terminal) {
                return events;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = store.load_all(session).await.unwrap_or_default();
    let types: Vec<&str> = events.iter().map(Event::event_type).collect();
    let planner = planner_core::Planner::fold(&events);
    let tasks: Vec<String> = planner
        .state()
        .tasks
        .iter()
        .map(|t| format!("{}:{:?}#{}", t.id, t.status, t.attempts))
        .collect();
    panic!("session {session} did not end: events {types:?}, tasks {tasks:?}");
}

/// The shipped executor pool (`planner-svc executor`) on `client`, pulling every dispatch
/// through its own consumer `consumer`, each task taking `latency`; it stops when the token
/// is cancelled.
pub fn start_pool(
    client: &async_nats::Client,
    consumer: &str,
    latency: std::time::Duration,
    observer: std::sync::Arc<dyn planner_svc::executor::PoolObserver>,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio_util::sync::CancellationToken,
) {
    start_pool_with(client, consumer, 4, latency, observer)
}

/// [`start_pool`] whose reports never ask for the next task: every task comes by an offer or
/// the stream, as from an executor written before hand-over.
pub fn start_pool_taking_no_next(
    client: &async_nats::Client,
    consumer: &str,
    latency: std::time::Duration,
    observer: std::sync::Arc<dyn planner_svc::executor::PoolObserver>,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio_util::sync::CancellationToken,
) {
    start_pool_options(client, consumer, 4, latency, observer, false)
}

/// [`start_pool`] with `concurrency` slots.
pub fn start_pool_with(
    client: &async_nats::Client,
    consumer: &str,
    concurrency: usize,
    latency: std::time::Duration,
    observer: std::sync::Arc<dyn planner_svc::executor::PoolObserver>,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio_util::sync::CancellationToken,
) {
    start_pool_options(client, consumer, concurrency, latency, observer, true)
}

fn start_pool_options(
    client: &async_nats::Client,
    consumer: &str,
    concurrency: usize,
    latency: std::time::Duration,
    observer: std::sync::Arc<dyn planner_svc::executor::PoolObserver>,
    take_next: bool,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio_util::sync::CancellationToken,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let pool = tokio::spawn(planner_svc::executor::run_pool(
        client.clone(),
        planner_svc::protocol::Subjects::new("planner"),
        planner_svc::executor::PoolOptions {
            offers: true,
            take_next,
            stream: "PLANNER_TASKS".into(),
            consumer: consumer.into(),
            filter: "planner.task.>".into(),
            concurrency,
            report_started: false,
            reports: Default::default(),
            behaviour: planner_svc::sim::SimBehaviour {
                latency,
                jitter_percent: 0,
                ..Default::default()
            },
        },
        observer,
        stop.clone(),
    ));
    (pool, stop)
}
