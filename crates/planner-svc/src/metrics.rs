//! Prometheus metrics: the names, the recorder, and the one place that derives task, plan and
//! clarification metrics from persisted events.
//!
//! The engine and the edges call the [`metrics`] facade (`counter!`, `histogram!`): while no
//! recorder is installed (`metrics.enabled = false`, or a process that never called
//! [`install`]) each call is a no-op. [`install`] puts a Prometheus recorder in place once per
//! process and returns the handle the listener of `health.rs` renders on `/metrics`.
//!
//! Naming follows Prometheus's conventions: the `planner_` prefix, base units (`_seconds`),
//! `_total` on counters, and no session, task or request id as a label (they would make a
//! series per session). Labels are closed sets: task `kind` (`tool_call`, `processing`,
//! `clarification`), an `outcome`, a `command` type, an error `result` kind.
//!
//! Task, plan and clarification metrics come from the events as they were appended
//! ([`after_append`], called by the driver after the store acknowledged a batch), and their
//! durations from the events' own timestamps (the engine's clock, as recorded), never from a
//! second clock: the metric and the log cannot disagree. Every event is appended by exactly one
//! instance, so summing a counter over instances counts each event once.
//!
//! `docs/observability.md` lists every metric.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use planner_core::{Event, NodeKind, PendingQuestion, PlannerState, TaskId, TaskStatus, Timestamp};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Buckets of the latency histograms, in seconds: 1 ms to 5 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets of plan durations and times to answer, in seconds: 10 ms to 1 day.
const LONG_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// A metric's name and its (at most two) static labels, by address: what the handle caches
/// key on. Hashing the strings' bytes (SipHash) was about 1% of the daemon's CPU at
/// saturation; their addresses are stable, and the same text at two addresses only costs a
/// second entry holding the same handle.
type HandleKey = (usize, [(usize, usize); 2]);

fn handle_key(name: &'static str, labels: [Option<(&'static str, &'static str)>; 2]) -> HandleKey {
    let address = |text: &'static str| text.as_ptr() as usize ^ (text.len() << 48);
    (
        address(name),
        labels.map(|label| label.map_or((0, 0), |(key, value)| (address(key), address(value)))),
    )
}

/// Hashes a [`HandleKey`]'s words as they are: they are addresses, already spread.
#[derive(Default)]
struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type HandleMap<T> =
    std::collections::HashMap<HandleKey, T, std::hash::BuildHasherDefault<AddressHasher>>;

thread_local! {
    // `counter!` and `histogram!` build a key and look it up in the recorder's registry on
    // every call: about 4% of the daemon's CPU at saturation (perf). Handles are stable (the
    // recorder forgets no metric), so each worker thread keeps the ones it used.
    static COUNTERS: std::cell::RefCell<HandleMap<metrics::Counter>> =
        std::cell::RefCell::default();
    static HISTOGRAMS: std::cell::RefCell<HandleMap<metrics::Histogram>> =
        std::cell::RefCell::default();
}

fn labels_of(labels: [Option<(&'static str, &'static str)>; 2]) -> Vec<metrics::Label> {
    labels
        .into_iter()
        .flatten()
        .map(|(key, value)| metrics::Label::from_static_parts(key, value))
        .collect()
}

/// Adds `by` to the counter `name` with `labels`, through this thread's cache of handles
/// (used in place: cloning a handle per update was two contended atomic operations each).
fn count(name: &'static str, labels: [Option<(&'static str, &'static str)>; 2], by: u64) {
    // Before the recorder is installed a handle records nothing: not one to keep.
    if !enabled() {
        return counter!(name, labels_of(labels)).increment(by);
    }
    COUNTERS.with(|cache| {
        let key = handle_key(name, labels);
        let mut cache = cache.borrow_mut();
        match cache.get(&key) {
            Some(counter) => counter.increment(by),
            None => cache
                .entry(key)
                .or_insert_with(|| counter!(name, labels_of(labels)))
                .increment(by),
        }
    })
}

/// Records `value` in the histogram `name` with `labels`, through this thread's cache.
fn observe(name: &'static str, labels: [Option<(&'static str, &'static str)>; 2], value: f64) {
    if !enabled() {
        return histogram!(name, labels_of(labels)).record(value);
    }
    HISTOGRAMS.with(|cache| {
        let key = handle_key(name, labels);
        let mut cache = cache.borrow_mut();
        match cache.get(&key) {
            Some(histogram) => histogram.record(value),
            None => cache
                .entry(key)
                .or_insert_with(|| histogram!(name, labels_of(labels)))
                .record(value),
        }
    })
}

/// How often the recorder's histograms are folded into their buckets when nobody scrapes.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder (once per process; later calls return the same handle)
/// and records the build info of `component` (`serve`, `executor`).
pub fn install(component: &'static str) -> PrometheusHandle {
    let handle = HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("planner_plan_duration_seconds".into()),
                LONG_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("planner_clarification_answer_seconds".into()),
                    LONG_BUCKETS,
                )
            })
            .and_then(|b| b.set_buckets(LATENCY_BUCKETS));
        let recorder = match builder {
            Ok(builder) => builder.build_recorder(),
            // Only an empty bucket list fails, and ours are constants.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only what this one records");
        }
        describe();
        handle
    });
    ENABLED.store(true, Ordering::Relaxed);
    gauge!("planner_build_info", "version" => env!("CARGO_PKG_VERSION"), "component" => component)
        .set(1.0);
    handle.clone()
}

/// Whether a recorder is installed: the observers that must copy something first skip it
/// when not.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h, Unit};
    g!(
        "planner_build_info",
        "Always 1; the version and component as labels."
    );
    g!(
        "planner_ready",
        "1 when /readyz would answer 200 (read at scrape time), else 0."
    );
    c!(
        "planner_tasks_dispatched_total",
        "Task attempts dispatched to executors, by kind."
    );
    c!(
        "planner_task_attempts_total",
        "Task attempts that ended, by kind and outcome (completed, failed, timed_out, cancelled)."
    );
    c!(
        "planner_task_retries_total",
        "Retries scheduled after a failed or timed-out attempt, by kind."
    );
    c!(
        "planner_tasks_ended_total",
        "Tasks that reached a terminal status, by kind and outcome (completed, failed, cancelled)."
    );
    h!(
        "planner_task_schedule_to_start_seconds",
        Unit::Seconds,
        "From an attempt's dispatch to its claim by an executor, by kind."
    );
    h!(
        "planner_task_execution_seconds",
        Unit::Seconds,
        "From an attempt's claim (its dispatch when unclaimed) to its end, by kind and outcome."
    );
    c!(
        "planner_plans_started_total",
        "Plans started or reopened by a follow-up."
    );
    c!(
        "planner_plans_ended_total",
        "Plans ended, by outcome (completed, failed, cancelled)."
    );
    h!(
        "planner_plan_duration_seconds",
        Unit::Seconds,
        "From a plan's start (or reopening) to its end, by outcome."
    );
    c!(
        "planner_clarifications_asked_total",
        "Questions put to a human."
    );
    c!(
        "planner_clarifications_answered_total",
        "Questions answered, by who answered (human, default)."
    );
    h!(
        "planner_clarification_answer_seconds",
        Unit::Seconds,
        "From a question to its answer, by who answered."
    );
    g!(
        "planner_clarifications_pending",
        "Questions waiting for an answer, as this instance counted them (asked minus settled)."
    );
    g!(
        "planner_sessions_loaded",
        "Sessions held in memory by this instance."
    );
    c!(
        "planner_session_loads_total",
        "Sessions loaded from the store (snapshot and tail)."
    );
    c!(
        "planner_sessions_recovered_total",
        "Unfinished sessions picked up by recovery passes."
    );
    c!(
        "planner_sessions_quarantined_total",
        "Sessions quarantined because their log could not be loaded."
    );
    g!(
        "planner_sessions_quarantined",
        "Sessions this instance holds in quarantine."
    );
    h!(
        "planner_store_append_seconds",
        Unit::Seconds,
        "Latency of one append (one command's events) to the event store."
    );
    c!(
        "planner_store_append_conflicts_total",
        "Appends refused by optimistic concurrency (another writer was first)."
    );
    c!(
        "planner_store_append_failures_total",
        "Appends that failed for another reason."
    );
    c!("planner_events_appended_total", "Events appended, by type.");
    c!(
        "planner_publish_failures_total",
        "Publishes that failed after their events were persisted (the outbox re-publishes)."
    );
    c!(
        "planner_outbox_republished_total",
        "Messages re-published by recovery and the outbox sweep."
    );
    c!(
        "planner_dispatch_offers_total",
        "Dispatches offered to an executor before the stream, by outcome (claimed, taken, stopped, declined, unheard, unanswered, shutdown)."
    );
    c!(
        "planner_tasks_handed_over_total",
        "Tasks handed over in the reply to the report that made them ready (docs/protocol.md, \"The next task with the reply\"): each one is a dispatch neither offered nor published."
    );
    c!(
        "planner_commands_total",
        "Commands handled, by command type and result (ok, or the error kind)."
    );
    h!(
        "planner_command_duration_seconds",
        Unit::Seconds,
        "Time to handle one command (planning, append, publish), by command type."
    );
    c!("planner_reports_total", "Executor reports, by path (direct: a request on the result subject; stream: from the report stream) and result (applied; retried: nak'd or dead-lettered, or answered retry; refused: terminated, or answered refused).");
    c!(
        "planner_dead_letters_total",
        "Reports moved to the dead-letter stream."
    );
    c!(
        "planner_requests_busy_total",
        "Requests answered `busy` at limits.max_requests_in_flight, by endpoint."
    );
    c!(
        "planner_llm_calls_total",
        "Calls to the LLM endpoint, by outcome (ok, or the error)."
    );
    h!(
        "planner_llm_call_duration_seconds",
        Unit::Seconds,
        "Latency of one LLM call, retries included."
    );
    c!(
        "planner_llm_tokens_total",
        "Tokens the LLM endpoint reported, by direction (prompt, completion)."
    );
    c!(
        "planner_llm_fallbacks_total",
        "LLM plans not used, so the rule parser planned."
    );
    c!(
        "planner_consistency_checks_total",
        "Sessions checked by the background consistency check, by result (ok, problem)."
    );
    g!(
        "planner_consistency_problem_sessions",
        "Sessions whose log failed the consistency check in the last pass."
    );
    g!(
        "planner_consistency_last_pass_timestamp_seconds",
        "When the last consistency pass ended (Unix time)."
    );
    c!(
        "planner_executor_tasks_total",
        "Executor pool: attempts received, reported and stopped (event)."
    );
    h!(
        "planner_executor_task_seconds",
        Unit::Seconds,
        "Executor pool: from receiving an attempt to its acknowledged report."
    );
}

/// What the metrics need of a session before a command changed it: whether its plan was
/// running, and the questions waiting (answers are timed from when they were asked).
#[derive(Debug, Default)]
pub struct Before {
    running: bool,
    awaiting: BTreeMap<TaskId, PendingQuestion>,
}

impl Before {
    /// Captures it from `state` (nothing when metrics are off).
    pub fn of(state: &PlannerState) -> Self {
        if !enabled() {
            return Before::default();
        }
        Before {
            running: !state.phase.is_terminal()
                && state.phase != planner_core::PlanPhase::NotStarted,
            awaiting: state.awaiting_answer.clone(),
        }
    }
}

fn seconds(from: Timestamp, to: Timestamp) -> f64 {
    to.as_millis().saturating_sub(from.as_millis()) as f64 / 1000.0
}

fn kind_of(state: &PlannerState, task: &TaskId) -> &'static str {
    state.task(task).map_or("unknown", |t| t.kind.as_str())
}

/// Whether an error text is the core's attempt timeout (`lease.rs` writes it).
pub(crate) fn timed_out(error: Option<&str>) -> bool {
    error.is_some_and(|e| e.starts_with("attempt timed out"))
}

/// Derives the task, plan and clarification metrics from one command's events, after they
/// were appended: `before` as the session was, `after` with the events applied.
pub fn after_append(before: &Before, after: &PlannerState, events: &[Event]) {
    if !enabled() {
        return;
    }
    let mut running = before.running;
    for event in events {
        count(
            "planner_events_appended_total",
            [Some(("type", event.event_type())), None],
            1,
        );
        match event {
            Event::SessionStarted { .. } | Event::SessionForked { .. } => {}
            Event::TasksPlanned { .. } => {
                if !running {
                    counter!("planner_plans_started_total").increment(1);
                    running = true;
                }
            }
            Event::TaskDispatched { task_id, .. } => {
                count(
                    "planner_tasks_dispatched_total",
                    [Some(("kind", kind_of(after, task_id))), None],
                    1,
                );
            }
            Event::AttemptClaimed {
                task_id,
                attempt,
                at,
                ..
            } => {
                let Some(task) = after.task(task_id) else {
                    continue;
                };
                // The state holds the current attempt's dispatch: only time that one.
                if task.attempts == *attempt {
                    if let Some(dispatched) = task.dispatched_at {
                        observe(
                            "planner_task_schedule_to_start_seconds",
                            [Some(("kind", task.kind.as_str())), None],
                            seconds(dispatched, *at),
                        );
                    }
                }
            }
            Event::TaskStatusUpdated {
                task_id,
                attempt,
                status,
                error,
                at,
                ..
            } => {
                let outcome = match status {
                    TaskStatus::Completed => "completed",
                    TaskStatus::Failed if timed_out(error.as_deref()) => "timed_out",
                    TaskStatus::Failed => "failed",
                    _ => continue,
                };
                let ended = if *status == TaskStatus::Completed {
                    "completed"
                } else {
                    "failed"
                };
                count(
                    "planner_tasks_ended_total",
                    [
                        Some(("kind", kind_of(after, task_id))),
                        Some(("outcome", ended)),
                    ],
                    1,
                );
                // A task failed because a dependency did ran no attempt.
                if *attempt > 0 {
                    attempt_ended(after, task_id, *attempt, outcome, *at);
                }
            }
            Event::RetryScheduled {
                task_id,
                attempt,
                error,
                at,
                ..
            } => {
                let kind = kind_of(after, task_id);
                counter!("planner_task_retries_total", "kind" => kind).increment(1);
                let outcome = if timed_out(Some(error)) {
                    "timed_out"
                } else {
                    "failed"
                };
                attempt_ended(after, task_id, *attempt, outcome, *at);
            }
            Event::TaskCancelled {
                task_id, cmd, at, ..
            } => {
                counter!("planner_tasks_ended_total", "kind" => kind_of(after, task_id), "outcome" => "cancelled")
                    .increment(1);
                if let Some(cmd) = cmd {
                    if !before.awaiting.contains_key(task_id) {
                        attempt_ended(after, task_id, cmd.attempt(), "cancelled", *at);
                    }
                }
            }
            Event::ClarificationRequested { .. } => {
                counter!("planner_clarifications_asked_total").increment(1);
            }
            Event::ClarificationAnswered {
                task_id,
                defaulted,
                at,
                ..
            } => {
                let by = if *defaulted { "default" } else { "human" };
                counter!("planner_clarifications_answered_total", "by" => by).increment(1);
                if let Some(asked) = before.awaiting.get(task_id).and_then(|q| q.asked_at) {
                    histogram!("planner_clarification_answer_seconds", "by" => by)
                        .record(seconds(asked, *at));
                }
                if after
                    .task(task_id)
                    .is_some_and(|t| t.kind == NodeKind::Clarification)
                {
                    counter!("planner_tasks_ended_total", "kind" => "clarification", "outcome" => "completed")
                        .increment(1);
                }
            }
            Event::PlanCompleted { at } => plan_ended(after, "completed", *at, &mut running),
            Event::PlanFailed { at, .. } => plan_ended(after, "failed", *at, &mut running),
            Event::PlanCancelled { at, .. } => plan_ended(after, "cancelled", *at, &mut running),
            Event::RequestReceived { .. }
            | Event::AttemptHeartbeat { .. }
            | Event::LeasesExtended { .. }
            | Event::ContextCompacted { .. } => {}
        }
    }
    let pending = after.awaiting_answer.len() as f64 - before.awaiting.len() as f64;
    if pending != 0.0 {
        gauge!("planner_clarifications_pending").increment(pending);
    }
}

fn attempt_ended(
    after: &PlannerState,
    task_id: &TaskId,
    attempt: u32,
    outcome: &'static str,
    at: Timestamp,
) {
    let Some(task) = after.task(task_id) else {
        return;
    };
    let kind = task.kind.as_str();
    count(
        "planner_task_attempts_total",
        [Some(("kind", kind)), Some(("outcome", outcome))],
        1,
    );
    // A later dispatch of the same task in the batch replaced the attempt's times: skip.
    if task.attempts != attempt || task.kind == NodeKind::Clarification {
        return;
    }
    let started = task
        .lease
        .as_ref()
        .map(|l| l.claimed_at)
        .or(task.dispatched_at);
    if let Some(started) = started {
        observe(
            "planner_task_execution_seconds",
            [Some(("kind", kind)), Some(("outcome", outcome))],
            seconds(started, at),
        );
    }
}

fn plan_ended(after: &PlannerState, outcome: &'static str, at: Timestamp, running: &mut bool) {
    *running = false;
    counter!("planner_plans_ended_total", "outcome" => outcome).increment(1);
    if let Some(started) = after.started_at {
        histogram!("planner_plan_duration_seconds", "outcome" => outcome)
            .record(seconds(started, at));
    }
}

/// One append to the store: its latency, and a conflict or failure.
pub fn append_done<T>(elapsed: Duration, result: &Result<T, planner_store::StoreError>) {
    observe(
        "planner_store_append_seconds",
        [None, None],
        elapsed.as_secs_f64(),
    );
    match result {
        Ok(_) => {}
        Err(error) if error.is_conflict() => {
            counter!("planner_store_append_conflicts_total").increment(1)
        }
        Err(_) => counter!("planner_store_append_failures_total").increment(1),
    }
}

/// One command handled by the engine, with its result (`ok` or the error kind).
pub fn command_done(command: &'static str, result: &'static str, elapsed: Duration) {
    count(
        "planner_commands_total",
        [Some(("command", command)), Some(("result", result))],
        1,
    );
    observe(
        "planner_command_duration_seconds",
        [Some(("command", command)), None],
        elapsed.as_secs_f64(),
    );
}

/// What became of an executor report (`applied`, `retried`, `refused`) that came by `path`
/// (`direct`: a request on `{p}.result.<session>`; `stream`: from the report stream).
pub fn report(path: &'static str, result: &'static str) {
    count(
        "planner_reports_total",
        [Some(("path", path)), Some(("result", result))],
        1,
    );
}

/// A report moved to the dead-letter stream.
pub fn dead_letter() {
    counter!("planner_dead_letters_total").increment(1);
}

/// A request answered `busy` at the admission limit.
pub fn busy(endpoint: &'static str) {
    counter!("planner_requests_busy_total", "endpoint" => endpoint).increment(1);
}

/// A publish that failed after its events were persisted.
pub fn publish_failed() {
    counter!("planner_publish_failures_total").increment(1);
}

/// A dispatch offered to an executor, by what became of the offer: `claimed` (its claim was
/// answered here), `taken` and `stopped` (answered so by the executor), `declined`,
/// `unheard` (nobody listens on its subject), `unanswered` or `shutdown` (the daemon stopped
/// while it waited); the last four send it to the stream.
pub fn offered(outcome: &'static str) {
    count(
        "planner_dispatch_offers_total",
        [Some(("outcome", outcome)), None],
        1,
    );
}

/// A task handed over in a report's reply.
pub fn handed_over() {
    count("planner_tasks_handed_over_total", [None, None], 1);
}

/// Messages re-published by recovery or the outbox sweep.
pub fn republished(messages: usize) {
    counter!("planner_outbox_republished_total").increment(messages as u64);
}

/// A session loaded from the store.
pub fn session_loaded() {
    counter!("planner_session_loads_total").increment(1);
}

/// One recovery pass: sessions recovered and newly quarantined.
pub fn recovery_pass(recovered: usize, quarantined: usize) {
    counter!("planner_sessions_recovered_total").increment(recovered as u64);
    counter!("planner_sessions_quarantined_total").increment(quarantined as u64);
}

/// The gauges read from the engine when `/metrics` is scraped.
pub fn sessions(loaded: usize, quarantined: usize) {
    gauge!("planner_sessions_loaded").set(loaded as f64);
    gauge!("planner_sessions_quarantined").set(quarantined as f64);
}

/// Measures an executor pool: attempts received and reported, and how long each took.
#[derive(Debug, Default)]
pub struct PoolMetrics {
    started: std::sync::Mutex<std::collections::HashMap<(String, String, u32), std::time::Instant>>,
}

impl PoolMetrics {
    fn key(task: &crate::protocol::TaskMessage) -> (String, String, u32) {
        (
            task.session.clone(),
            task.assignment.task_id.to_string(),
            task.assignment.attempt,
        )
    }
}

impl crate::executor::PoolObserver for PoolMetrics {
    fn dispatched(&self, task: &crate::protocol::TaskMessage, at: std::time::Instant) {
        counter!("planner_executor_tasks_total", "event" => "received").increment(1);
        if let Ok(mut started) = self.started.lock() {
            started.insert(Self::key(task), at);
        }
    }

    fn reported(&self, task: &crate::protocol::TaskMessage, at: std::time::Instant) {
        counter!("planner_executor_tasks_total", "event" => "reported").increment(1);
        let began = self
            .started
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&Self::key(task)));
        if let Some(began) = began {
            histogram!("planner_executor_task_seconds")
                .record(at.duration_since(began).as_secs_f64());
        }
    }

    fn stopped(&self, task: &crate::protocol::TaskMessage, _reason: planner_core::FenceReason) {
        counter!("planner_executor_tasks_total", "event" => "stopped").increment(1);
        if let Ok(mut started) = self.started.lock() {
            started.remove(&Self::key(task));
        }
    }
}
