//! A simulated executor pool on NATS: what `planner-svc executor` runs, the demo executor of
//! docker-compose, and the load generator's executors.
//!
//! It does what docs/protocol.md asks of any executor: a durable pull consumer on the dispatch
//! stream filtered to the subjects it serves, an ack when it takes a task, a report through
//! JetStream (retried until acknowledged), and no second run of a (session, task, attempt) it
//! has already run (a redelivery gets the same report again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use planner_core::ExecutorEvent;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::protocol::{Subjects, TaskMessage};
use crate::sim::{SimBehaviour, SimExecutor};

/// What a pool has run: (session, task, attempt) and the final report it sent.
type RunAttempts = HashMap<(String, String, u32), ExecutorEvent>;

/// Settings of a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The dispatch stream.
    pub stream: String,
    /// The durable consumer (one per pool).
    pub consumer: String,
    /// The subjects served, e.g. `planner.task.>` or `planner.task.tool_call.web_search`.
    pub filter: String,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Whether to report `started` before the outcome.
    pub report_started: bool,
    /// How the simulated work behaves.
    pub behaviour: SimBehaviour,
}

/// Called for every dispatch taken and every report acknowledged, for measurements.
pub trait PoolObserver: Send + Sync + 'static {
    /// A dispatch arrived.
    fn dispatched(&self, _task: &TaskMessage, _at: Instant) {}
    /// A final report was acknowledged by JetStream.
    fn reported(&self, _task: &TaskMessage, _at: Instant) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl PoolObserver for NoObserver {}

/// Runs the pool until `shutdown`.
pub async fn run_pool(
    client: async_nats::Client,
    subjects: Subjects,
    options: PoolOptions,
    observer: Arc<dyn PoolObserver>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&options.stream)
        .await
        .with_context(|| format!("binding to the dispatch stream {}", options.stream))?;
    let consumer = stream
        .get_or_create_consumer(
            &options.consumer,
            pull::Config {
                durable_name: Some(options.consumer.clone()),
                filter_subject: options.filter.clone(),
                max_ack_pending: i64::try_from(options.concurrency * 2).unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .context("creating the executor consumer")?;
    let mut messages = consumer.messages().await.context("pulling dispatches")?;
    let slots = Arc::new(Semaphore::new(options.concurrency));
    // What this pool has run: (session, task, attempt) -> its final report. Bounded: cleared
    // when large (a repeat older than that is re-run, which at-least-once executors tolerate).
    let done: Arc<Mutex<RunAttempts>> = Arc::default();
    let mut seed = 0u64;
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(error)) => {
                    tracing::warn!(%error, "dispatch stream error");
                    continue;
                }
                None => return Ok(()),
            },
        };
        let task: TaskMessage = match serde_json::from_slice(&message.payload) {
            Ok(task) => task,
            Err(error) => {
                tracing::warn!(%error, "not a task message; terminating it");
                let _ = message.ack_with(async_nats::jetstream::AckKind::Term).await;
                continue;
            }
        };
        observer.dispatched(&task, Instant::now());
        let _ = message.ack().await;
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return Ok(());
        };
        seed += 1;
        let mut executor = SimExecutor::new(options.behaviour, seed);
        let (js, subjects, done, observer) =
            (js.clone(), subjects.clone(), done.clone(), observer.clone());
        let report_started = options.report_started;
        tokio::spawn(async move {
            let key = (
                task.session.clone(),
                task.assignment.task_id.0.clone(),
                task.assignment.attempt,
            );
            let known = done.lock().ok().and_then(|d| d.get(&key).cloned());
            let report = match known {
                Some(report) => report,
                None => {
                    if report_started {
                        publish(&js, &subjects, &task.session, &SimExecutor::started(&task)).await;
                    }
                    let latency = executor.latency();
                    if !latency.is_zero() {
                        tokio::time::sleep(latency).await;
                    }
                    let report = executor.outcome(&task);
                    if let Ok(mut done) = done.lock() {
                        if done.len() > 100_000 {
                            done.clear();
                        }
                        done.insert(key, report.clone());
                    }
                    report
                }
            };
            publish(&js, &subjects, &task.session, &report).await;
            observer.reported(&task, Instant::now());
            drop(permit);
        });
    }
}

/// Publishes a report through JetStream, retrying until it is acknowledged.
async fn publish(
    js: &jetstream::Context,
    subjects: &Subjects,
    session: &str,
    report: &ExecutorEvent,
) {
    let body = Bytes::from(serde_json::to_vec(report).unwrap_or_default());
    let mut delay = Duration::from_millis(50);
    loop {
        match js.publish(subjects.report(session), body.clone()).await {
            Ok(ack) => match ack.await {
                Ok(_) => return,
                Err(error) => tracing::warn!(%error, "report not acknowledged; retrying"),
            },
            Err(error) => tracing::warn!(%error, "report not sent; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
