//! The runtime around the core, free of any transport: sessions in memory, each behind its own
//! lock; commands processed, persisted, then published; timers; and the outbox that re-publishes
//! what a crash may have left unpublished.
//!
//! One concern per file:
//!
//! - `mod.rs`: the [`Engine`] and [`Engine::handle`], which runs a command through the LLM
//!   pre-planning, the driver, and the follow-ups its events call for.
//! - `seams.rs`: the traits every IO goes through besides the store ([`Publisher`],
//!   [`Clock`], [`Llm`]), so a simulation can replace each.
//! - `registry.rs`: sessions in memory, their locks, eviction, sessions seen ended.
//! - `driver.rs`: the persist-then-publish loop for one command (the contract is there).
//! - `outbox.rs`: recovery and re-publishing what a crash or a failed publish left unsent.
//! - `timers.rs`: ticks at each session's next deadline, re-armed when they fail.
//! - `render.rs`: what events ask to publish, as wire messages.
//! - `llm.rs`: planning, revising and summarizing with the LLM.
//! - `fork.rs`: forking a session at a version into a new one.
//! - `observe.rs`: what observers (the HTTP API) are told after each append.
//! - `error.rs`: why a command was not applied, and its [`Disposition`].

mod driver;
mod error;
mod fork;
mod llm;
mod observe;
mod outbox;
mod registry;
mod render;
mod seams;
mod timers;

use std::sync::Arc;
use std::time::Duration;

use planner_core::{Command, Event, FailureReason, PlannerConfig, Timestamp};
use planner_store::{EventStore, SnapshotPolicy};
use tokio::sync::mpsc;
use tracing::Instrument;

pub use error::{Disposition, EngineError};
pub use llm::REVISION_MARK;
pub use observe::{
    session_status, Appended, SessionSummary, TaskCounts, OBSERVER_CAPACITY, SESSION_STATUSES,
};
pub use outbox::{Recovery, OUTBOX_RETRY};
pub use render::{in_flight, outgoing, oversized, Outgoing};
pub use seams::{Clock, Confirmation, Llm, Publisher, SystemClock};
pub use timers::TimerLoop;

use registry::{Registry, Slot};
use timers::Arm;

/// The engine's settings, and the seams it is given.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The planner settings of new sessions.
    pub planner: PlannerConfig,
    /// When to snapshot.
    pub snapshot: SnapshotPolicy,
    /// Retries after an optimistic-concurrency conflict.
    pub conflict_retries: u32,
    /// Most sessions held in memory.
    pub max_loaded: usize,
    /// Idle time after which a session is dropped from memory.
    pub idle_timeout: Duration,
    /// Plans requests (and writes summaries) with an LLM; the rule parser when absent.
    pub llm: Option<Arc<dyn Llm>>,
    /// Where time comes from.
    pub clock: Arc<dyn Clock>,
    /// Most sessions remembered as ended or quarantined (caches that save recovery a load).
    pub max_remembered_ended: usize,
    /// The largest dispatch the bus accepts (the server's `max_payload`): a larger one is
    /// never published; its attempt fails with a clear error instead of waiting for ever.
    pub max_dispatch_bytes: usize,
    /// The partitions this instance serves (`None`: every session). Recovery and timers leave
    /// sessions outside them to their owner; commands are still handled for any session
    /// (optimistic concurrency keeps instances apart), routing them is the transport's job.
    pub scope: Option<Arc<crate::partition::Partitions>>,
    /// Contexts up to this many bytes (request, summary and system prompt) travel in every
    /// dispatch; larger ones are left out, and an executor gets them with its claim unless it
    /// holds them already (`context_ref`). `usize::MAX`: always in the dispatch.
    pub inline_context_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            planner: PlannerConfig::default(),
            snapshot: SnapshotPolicy::default(),
            conflict_retries: 5,
            max_loaded: 10_000,
            idle_timeout: Duration::from_secs(300),
            llm: None,
            clock: Arc::new(SystemClock),
            max_dispatch_bytes: 1024 * 1024,
            inline_context_bytes: usize::MAX,
            max_remembered_ended: 100_000,
            scope: None,
        }
    }
}

/// What an accepted command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    /// The session's version after it.
    pub version: u64,
    /// The events it caused, persisted.
    pub events: Vec<Event>,
    /// For a granted claim: the timeouts of its attempt (its own, its target's, its kind's or
    /// the session's), from which the executor learns how often to heartbeat.
    pub lease_terms: Option<planner_core::TaskTimeouts>,
    /// For a granted claim: the context its executor is handed, as of now.
    pub claim_context: Option<planner_core::DispatchContext>,
    /// The task handed over to the reporting executor, when a report came with a [`Chain`]
    /// and made a task ready that the executor serves.
    pub handover: Option<Handover>,
}

/// A report's request for the session's next task (the wire's `NextRequest`): the engine
/// claims the first task the report makes ready that the executor serves, in the same append
/// as the report's events, and sends that task to no one else.
pub struct Chain {
    /// The lease of the task handed over: the executor's claim id.
    pub lease: String,
    /// Whether the executor serves dispatches of this kind and target.
    pub serves: Serves,
}

/// Whether an executor serves dispatches of a kind and target.
pub type Serves = Box<dyn Fn(planner_core::NodeKind, &str) -> bool + Send + Sync>;

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// A task claimed for the executor whose report made it ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The dispatch, as it would have been published (a large context left out).
    pub task: crate::protocol::TaskMessage,
    /// Its lease.
    pub lease: String,
    /// The timeouts of its attempt, as a granted claim's `lease_terms`.
    pub lease_terms: Option<planner_core::TaskTimeouts>,
    /// Its context, as a granted claim's.
    pub context: Option<planner_core::DispatchContext>,
}

/// Sessions, their locks and their timers. See the module docs.
pub struct Engine<S, P> {
    store: Arc<S>,
    publisher: Arc<P>,
    config: EngineConfig,
    clock: Arc<dyn Clock>,
    registry: Registry,
    timers: mpsc::UnboundedSender<Arm>,
    stats: Stats,
    observers: observe::Observers,
    /// Sessions whose publish failed since the outbox last retried them (each also has
    /// `unpublished` set, which keeps it in memory until then).
    unpublished: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// The tasks awaiting the bus's confirmation of what was sent (JetStream acks, offers'
    /// answers), and the snapshot saves, for a stop to wait for ([`Engine::confirmations`]).
    confirmations: tokio_util::task::TaskTracker,
}

/// Counters of what sessions cost: loads from the store and lost races. With sessions routed
/// to their owner both stay near zero after start-up; a stream of them means two instances
/// fight over sessions.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) loads: std::sync::atomic::AtomicU64,
    pub(crate) conflicts: std::sync::atomic::AtomicU64,
}

/// A copy of the engine's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    /// Sessions loaded (replayed) from the store.
    pub loads: u64,
    /// Appends that lost an optimistic-concurrency race (each costs a reload).
    pub conflicts: u64,
}

impl<S, P> std::fmt::Debug for Engine<S, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: EventStore, P: Publisher> Engine<S, P> {
    /// An engine over `store` and `publisher`, and the timer loop to spawn beside it.
    pub fn new(store: Arc<S>, publisher: Arc<P>, config: EngineConfig) -> (Arc<Self>, TimerLoop) {
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Arc::new(Engine {
            store,
            publisher,
            clock: Arc::clone(&config.clock),
            registry: Registry::new(config.max_remembered_ended),
            config,
            timers: tx,
            stats: Stats::default(),
            observers: tokio::sync::broadcast::channel(observe::OBSERVER_CAPACITY).0,
            unpublished: Arc::default(),
            confirmations: tokio_util::task::TaskTracker::new(),
        });
        (engine, TimerLoop::new(rx))
    }

    /// The tasks awaiting confirmations of what was sent, and the snapshot saves: a daemon
    /// that stops waits for them (after it stopped offering, so none waits for a claim no
    /// longer served), else a dispatch offered just before the stop waited for the next
    /// owner's recovery.
    pub fn confirmations(&self) -> &tokio_util::task::TaskTracker {
        &self.confirmations
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The current time by the engine's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Sessions this instance quarantined (their log could not be loaded): why, and since when.
    pub fn quarantined(&self) -> Vec<crate::protocol::QuarantinedSession> {
        self.registry
            .quarantined()
            .into_iter()
            .map(
                |(session, reason, since)| crate::protocol::QuarantinedSession {
                    session,
                    reason,
                    since: Timestamp::from_millis(since),
                },
            )
            .collect()
    }

    /// Lifts `session`'s quarantine (after an operator repaired its log): the next recovery
    /// pass loads it again, even if its log did not change. Whether it was quarantined here.
    pub fn release_quarantine(&self, session: &str) -> bool {
        self.registry.release_quarantine(session)
    }

    /// Loads and lost races so far.
    pub fn stats(&self) -> EngineStats {
        use std::sync::atomic::Ordering::Relaxed;
        EngineStats {
            loads: self.stats.loads.load(Relaxed),
            conflicts: self.stats.conflicts.load(Relaxed),
        }
    }

    /// Whether this instance serves `session` (see [`EngineConfig::scope`]).
    pub fn in_scope(&self, session: &str) -> bool {
        self.config
            .scope
            .as_ref()
            .is_none_or(|scope| scope.owns_session(session))
    }

    /// Drops from memory every session of `partition` (of `partitions`), whatever it is
    /// doing: another instance serves them now, so what is held here is about to be stale.
    /// A command in flight on one finishes on its own copy; optimistic concurrency fences it.
    /// Their timers fire nothing while the partition is not served here.
    pub fn forget_partition(&self, partition: u32, partitions: u32) {
        self.registry.remove_where(|session| {
            crate::partition::partition_of(session, partitions) == partition
        });
    }

    /// The ids of the sessions in memory.
    pub fn loaded_session_ids(&self) -> Vec<String> {
        self.registry.all().into_iter().map(|(s, _)| s).collect()
    }

    /// How many sessions are in memory.
    pub fn loaded_sessions(&self) -> usize {
        self.registry.len()
    }

    /// A copy of every session's planner held in memory, each read under its session's lock.
    /// For checks that compare what an instance believes with what its log says.
    pub async fn loaded_planners(&self) -> Vec<(String, planner_core::Planner)> {
        let mut planners = Vec::new();
        for (session, slot) in self.registry.all() {
            if let Some(planner) = slot.state.lock().await.planner.clone() {
                planners.push((session, planner));
            }
        }
        planners.sort_by(|a, b| a.0.cmp(&b.0));
        planners
    }

    fn slot(&self, session: &str) -> Arc<Slot> {
        let now_ms = self.clock.now().as_millis();
        let (slot, len) = self.registry.slot(session, now_ms);
        let idle_ms = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        self.registry
            .evict_if_over(len, now_ms, idle_ms, self.config.max_loaded);
        slot
    }

    /// Arms (or, with `None`, disarms) the session's timer.
    fn arm(&self, session: &str, at: Option<Timestamp>) {
        let _ = self.timers.send(Arm {
            session: session.to_owned(),
            at,
            failures: 0,
        });
    }

    /// A dispatch too large for the bus: its attempt fails for good, and operators are told.
    async fn abandon_undeliverable(
        &self,
        session: &str,
        task_id: planner_core::TaskId,
        attempt: u32,
        bytes: usize,
    ) {
        let limit = self.config.max_dispatch_bytes;
        let error = format!(
            "the dispatch of attempt {attempt} is {bytes} bytes, more than the bus accepts ({limit}): pass large inputs by reference"
        );
        tracing::error!(session, task = %task_id, attempt, bytes, limit, "dispatch too large; failing the attempt");
        let notice = Outgoing::Notice(crate::protocol::ErrorNotice {
            subject: String::new(),
            session: Some(session.to_owned()),
            error: crate::protocol::ErrorBody::new(
                crate::protocol::ErrorKind::TooLarge,
                format!("task {task_id}: {error}"),
            ),
        });
        let abandon = Command::AbandonAttempt {
            task_id,
            attempt,
            error,
            retryable: false,
            now: self.clock.now(),
        };
        if let Err(error) = Box::pin(self.drive(session, abandon, None)).await {
            tracing::warn!(session, %error, "could not record an undeliverable dispatch");
        }
        if let Err(error) = self.publisher.publish(&[notice]).await {
            tracing::warn!(session, %error, "could not publish a notice");
        }
    }

    /// Re-arms a tick that failed, `delay` from now, counting the failures in a row.
    fn rearm_after_failure(&self, session: &str, delay: Duration, failures: u32) {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let at = Timestamp(self.clock.now().as_millis().saturating_add(delay_ms));
        let _ = self.timers.send(Arm {
            session: session.to_owned(),
            at: Some(at),
            failures,
        });
    }

    /// Processes `command` for `session`: decide, persist, publish. See the module docs.
    ///
    /// With an LLM configured, a request without a plan is planned by the LLM first, outside the
    /// session's lock; after a command whose events compacted the context, the LLM rewrites the
    /// summary in the background (a `CompactContext` of its own).
    ///
    /// A command handled outside any trace (a tick at a retry's backoff or a deadline, an LLM
    /// revision or summary, recovery) is handled in the trace of the session's latest command
    /// (the one whose events scheduled it), or a new one when the session has none in memory:
    /// the retry of a task is in the trace of the request that started it.
    pub async fn handle(
        self: &Arc<Self>,
        session: &str,
        command: Command,
    ) -> Result<Handled, EngineError> {
        self.handle_chained(session, command, None).await
    }

    /// [`Engine::handle`] for an executor's report that asks for the session's next task: see
    /// [`Chain`]. `chain` is ignored for any other command.
    pub async fn handle_chained(
        self: &Arc<Self>,
        session: &str,
        command: Command,
        chain: Option<Chain>,
    ) -> Result<Handled, EngineError> {
        let chain = chain.filter(|_| matches!(command, Command::HandleExecutorEvent { .. }));
        // An executor's message without a trace of its own (`trace::pending`) adopts the trace
        // its attempt was dispatched in once the session is locked (`drive`). Work outside any
        // trace (a tick, a revision, recovery; or, while spans are exported, an executor's
        // message without one) runs in the session's latest.
        if crate::trace::current().is_none() && crate::trace::enabled() && !crate::trace::pending()
        {
            let context = self
                .registry
                .get(session)
                .and_then(|slot| slot.trace())
                .unwrap_or_else(crate::trace::TraceParent::new_root);
            let edge = crate::trace::Edge::Internal;
            // Boxed before it is wrapped: the handling's future is large, and moving it into
            // the scope's future and that into a box was 3% of the daemon's CPU at saturation
            // (perf, when executors' messages without a trace still came this way).
            let work = Box::pin(self.handle_traced(session, command, chain));
            return crate::trace::scope(Some(context), edge, work).await;
        }
        self.handle_traced(session, command, chain).await
    }

    async fn handle_traced(
        self: &Arc<Self>,
        session: &str,
        command: Command,
        chain: Option<Chain>,
    ) -> Result<Handled, EngineError> {
        if !planner_core::is_valid_token(session) {
            return Err(EngineError::BadSession(session.to_owned()));
        }
        let command_type = command.command_type();
        let span = tracing::info_span!(
            "command",
            session = %session,
            command = %command_type,
            task = tracing::field::Empty,
            attempt = tracing::field::Empty,
        );
        let (task, attempt) = attempt_of(&command);
        if let Some(task) = task {
            span.record("task", tracing::field::display(task));
        }
        if let Some(attempt) = attempt {
            span.record("attempt", attempt);
        }
        let started = std::time::Instant::now();
        let claimed = match &command {
            Command::ClaimAttempt {
                task_id, attempt, ..
            } => Some((task_id.clone(), *attempt)),
            _ => None,
        };
        let result: Result<Handled, EngineError> = async {
            let command = self.plan_with_llm(session, command).await?;
            let rewrite_summary = !matches!(command, Command::CompactContext { .. });
            let (handled, undeliverable) = self.drive(session, command, chain.as_ref()).await?;
            log_activity(&handled.events);
            for (task_id, attempt, bytes) in undeliverable {
                self.abandon_undeliverable(session, task_id, attempt, bytes)
                    .await;
            }
            if rewrite_summary
                && handled
                    .events
                    .iter()
                    .any(|e| e.event_type() == "context_compacted")
            {
                self.rewrite_summary(session);
            }
            let failed = handled.events.iter().find_map(|e| match e {
                Event::PlanFailed {
                    reason: FailureReason::TaskFailed { task_id },
                    ..
                } => Some(task_id.clone()),
                _ => None,
            });
            if let Some(task_id) = failed {
                self.revise(session, task_id);
            }
            Ok(handled)
        }
        .instrument(span)
        .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(error) => error.kind().as_str(),
        };
        crate::metrics::command_done(command_type, outcome, started.elapsed());
        // A claim granted or refused for good answers the attempt's offer, if it was offered:
        // the executor need not say so (one message less per task). One that may pass
        // (`retry`) does not: the executor declines the offer.
        if let Some((task_id, attempt)) = claimed {
            let answered = match &result {
                Ok(_) => true,
                Err(error) => error.disposition() == Disposition::Reject,
            };
            if answered {
                self.publisher.claim_answered(session, &task_id, attempt);
            }
        }
        result
    }
}

/// The task and attempt a command names, for its span and its trace.
fn attempt_of(command: &Command) -> (Option<&planner_core::TaskId>, Option<u32>) {
    match command {
        Command::HandleExecutorEvent { event, .. } => (Some(&event.task_id), Some(event.attempt)),
        Command::ClaimAttempt {
            task_id, attempt, ..
        }
        | Command::Heartbeat {
            task_id, attempt, ..
        }
        | Command::AbandonAttempt {
            task_id, attempt, ..
        } => (Some(task_id), Some(*attempt)),
        Command::AnswerClarification { task_id, .. } => (Some(task_id), None),
        _ => (None, None),
    }
}

/// The log target of the activity lines: a daemon running thousands of tasks a second
/// turns them down with `log.level = "info,planner::activity=warn"`.
pub const ACTIVITY: &str = "planner::activity";

/// What an operator following the log at INFO sees of a session, one line each: a request
/// and its plan, each task's dispatch, result and question, retries, and how the plan ends.
/// Runs inside the `command` span, which names the session.
fn log_activity(events: &[Event]) {
    for event in events {
        match event {
            Event::RequestReceived { turn, input, .. } => {
                tracing::info!(target: ACTIVITY, turn, chars = input.chars().count(), "request received");
            }
            Event::TasksPlanned { tasks, source, .. } => {
                tracing::info!(target: ACTIVITY, tasks = tasks.len(), ?source, "tasks planned")
            }
            Event::PlanCompleted { .. } => tracing::info!(target: ACTIVITY, "plan completed"),
            Event::PlanFailed { reason, .. } => {
                tracing::info!(target: ACTIVITY, ?reason, "plan failed")
            }
            Event::PlanCancelled { reason, .. } => {
                tracing::info!(target: ACTIVITY, ?reason, "plan cancelled")
            }
            Event::TaskDispatched {
                task_id,
                attempt,
                cmd,
                ..
            } => {
                let target = match cmd {
                    planner_core::PlannerCmd::ExecuteTool(d)
                    | planner_core::PlannerCmd::RunProcessing(d) => d.target.as_str(),
                    _ => "user",
                };
                tracing::info!(target: ACTIVITY, task = %task_id, attempt, target, "task dispatched")
            }
            Event::TaskStatusUpdated {
                task_id,
                attempt,
                status,
                ..
            } => tracing::info!(target: ACTIVITY, task = %task_id, attempt, ?status, "task result"),
            Event::ClarificationRequested {
                task_id, attempt, ..
            } => tracing::info!(target: ACTIVITY, task = %task_id, attempt, "question asked"),
            Event::ClarificationAnswered { task_id, .. } => {
                tracing::info!(target: ACTIVITY, task = %task_id, "question answered")
            }
            Event::RetryScheduled {
                task_id,
                attempt,
                error,
                ..
            } => {
                tracing::info!(target: ACTIVITY, task = %task_id, attempt, %error, "attempt failed; retry scheduled")
            }
            _ => {}
        }
    }
}
