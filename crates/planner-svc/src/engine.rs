//! The runtime around the core, free of any transport: sessions in memory, each behind its own
//! lock; commands processed, persisted, then published; timers; and the outbox that re-publishes
//! what a crash may have left unpublished.
//!
//! # The driver's contract, as kept here
//!
//! For one command of one session, under that session's lock: load the planner if needed
//! (snapshot + tail), `process`, **append the events** (optimistic concurrency at the version the
//! planner was at), then publish the dispatches, questions and cancellations they carry, then arm
//! the session's timer. Nothing is published before its events are persisted. On a concurrency
//! conflict (another instance appended first) the session is reloaded and the command retried;
//! a command the planner refuses is retried the same way when the store shows the session moved
//! on, so an instance never judges input against a stale copy.
//!
//! # The outbox
//!
//! The event log is the outbox. A session whose publish failed is marked; the sweep re-publishes
//! the current attempt of every running task and every open question of marked sessions, and
//! recovery (at start-up, then every `sessions.recovery_interval_s`) does the same for every
//! unfinished session not in memory, so an instance that dies leaves no retry or deadline
//! unfired for long. Dispatches carry
//! `Nats-Msg-Id = session.task.attempt`, so a re-publish inside the dispatch stream's duplicate
//! window never reaches an executor twice.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use planner_core::{
    Command, Dispatch, Event, FailureReason, NodeKind, PlanPhase, Planner, PlannerCmd,
    PlannerConfig, TaskStatus, Timestamp,
};
use planner_store::{load_planner, EventStore, SnapshotPolicy, StoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::protocol::{CancelMessage, QuestionMessage, TaskMessage};

/// Something to publish after its events are persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A dispatch for an executor pool.
    Task(TaskMessage),
    /// A question for the session's UI.
    Question(QuestionMessage),
    /// A cancellation for an executor or a UI.
    Cancel(CancelMessage),
}

/// Where outgoing messages go: NATS in the daemon, channels in the embedded run.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `messages` in order; `Ok` once each is accepted by the bus (for dispatches:
    /// acknowledged by JetStream).
    fn publish(&self, messages: &[Outgoing]) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The engine's settings.
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
    pub llm: Option<Arc<planner_llm::LlmPlanner>>,
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
}

/// Why a command was not applied. Nothing was persisted.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The session id is not a valid subject token.
    #[error("invalid session id {0:?}: use 1 to 64 characters from A-Z a-z 0-9 _ -")]
    BadSession(String),
    /// The planner refused the command.
    #[error(transparent)]
    Rejected(#[from] planner_core::Error),
    /// Other instances kept winning the race for this session.
    #[error("session {session} kept changing under this command ({retries} retries)")]
    Conflict {
        /// The session.
        session: String,
        /// Retries made.
        retries: u32,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EngineError {
    /// The stable kind used in error replies.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::BadSession(_) => "bad_session",
            EngineError::Rejected(_) => "rejected",
            EngineError::Conflict { .. } => "conflict",
            EngineError::Store(StoreError::TooLarge { .. }) => "too_large",
            EngineError::Store(_) => "unavailable",
        }
    }
}

/// How a revision request starts (`[revision N] ...`): counted to cap revisions per session.
pub const REVISION_MARK: &str = "[revision";

/// The current time as the core counts it. The only clock the planner's time comes from.
pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp(ms)
}

/// Sets every `now` of `command` (clients do not control the planner's clock).
pub fn stamp(command: Command, at: Timestamp) -> Command {
    match command {
        Command::Initialize {
            request_id,
            input,
            attachments,
            plan,
            planning,
            ..
        } => Command::Initialize {
            request_id,
            input,
            attachments,
            plan,
            planning,
            now: at,
        },
        Command::HandleExecutorEvent { event, .. } => {
            Command::HandleExecutorEvent { event, now: at }
        }
        Command::AnswerClarification {
            task_id, answer, ..
        } => Command::AnswerClarification {
            task_id,
            answer,
            now: at,
        },
        Command::Continue => Command::Continue,
        Command::Tick { .. } => Command::Tick { now: at },
        Command::CompactContext { summary, .. } => Command::CompactContext { summary, now: at },
        Command::Cancel { target, reason, .. } => Command::Cancel {
            target,
            reason,
            now: at,
        },
    }
}

struct Slot {
    /// A `tokio` mutex: the store append and the publish are awaited while it is held, so that a
    /// session's commands are persisted and published in order. Sessions never wait on each
    /// other: each has its own.
    state: tokio::sync::Mutex<SlotState>,
    last_used_ms: AtomicU64,
}

#[derive(Default)]
struct SlotState {
    planner: Option<Planner>,
    unpublished: bool,
}

/// Sessions, their locks and their timers. See the module docs.
pub struct Engine<S, P> {
    store: Arc<S>,
    publisher: Arc<P>,
    config: EngineConfig,
    sessions: Mutex<HashMap<String, Arc<Slot>>>,
    timers: mpsc::UnboundedSender<(String, Option<Timestamp>)>,
    /// Sessions seen ended, with the version they ended at: recovery skips them until their
    /// version moves (a follow-up reopened them).
    ended: Mutex<HashMap<String, u64>>,
}

impl<S, P> std::fmt::Debug for Engine<S, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Fires ticks at sessions' deadlines; run it with [`TimerLoop::run`].
#[derive(Debug)]
pub struct TimerLoop {
    updates: mpsc::UnboundedReceiver<(String, Option<Timestamp>)>,
}

impl<S: EventStore, P: Publisher> Engine<S, P> {
    /// An engine over `store` and `publisher`, and the timer loop to spawn beside it.
    pub fn new(store: Arc<S>, publisher: Arc<P>, config: EngineConfig) -> (Arc<Self>, TimerLoop) {
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Arc::new(Engine {
            store,
            publisher,
            config,
            sessions: Mutex::new(HashMap::new()),
            timers: tx,
            ended: Mutex::new(HashMap::new()),
        });
        (engine, TimerLoop { updates: rx })
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        // Held only for map lookups and inserts; nothing can leave the map half-changed.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn slot(&self, session: &str) -> Arc<Slot> {
        let mut sessions = self.sessions();
        let slot = sessions
            .entry(session.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: tokio::sync::Mutex::new(SlotState::default()),
                    last_used_ms: AtomicU64::new(0),
                })
            })
            .clone();
        slot.last_used_ms
            .store(now().as_millis(), Ordering::Relaxed);
        slot
    }

    /// How many sessions are in memory.
    pub fn loaded_sessions(&self) -> usize {
        self.sessions().len()
    }

    async fn load(&self, session: &str) -> Result<Planner, StoreError> {
        let planner = load_planner(self.store.as_ref(), session).await?;
        if planner.version() == 0 {
            // A new session starts with this instance's planner settings; from its first event
            // on, the settings it started with are in its log.
            return Ok(Planner::with_config(self.config.planner.clone()).unwrap_or_default());
        }
        Ok(planner)
    }

    /// Processes `command` for `session`: decide, persist, publish. See the module docs.
    ///
    /// With an LLM configured, a request without a plan is planned by the LLM first, outside the
    /// session's lock; after a command whose events compacted the context, the LLM rewrites the
    /// summary in the background (a `CompactContext` of its own).
    pub async fn handle(
        self: &Arc<Self>,
        session: &str,
        command: Command,
    ) -> Result<Handled, EngineError> {
        if !planner_core::is_valid_token(session) {
            return Err(EngineError::BadSession(session.to_owned()));
        }
        let span = tracing::info_span!("session", id = session, command = command.command_type());
        async {
            let command = self.plan_with_llm(session, command).await?;
            let rewrite_summary = !matches!(command, Command::CompactContext { .. });
            let handled = self.handle_in_span(session, command).await?;
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
        .await
    }

    async fn plan_with_llm(&self, session: &str, command: Command) -> Result<Command, EngineError> {
        let Some(llm) = self.config.llm.clone() else {
            return Ok(command);
        };
        let Command::Initialize {
            request_id,
            input,
            attachments,
            plan: None,
            planning: None,
            now,
        } = command
        else {
            return Ok(command);
        };
        let rebuilt = |plan, planning| Command::Initialize {
            request_id: request_id.clone(),
            input: input.clone(),
            attachments: attachments.clone(),
            plan,
            planning,
            now,
        };
        if input.trim().is_empty() {
            return Ok(rebuilt(None, None));
        }
        // Read what the prompt needs, then let go of the session: the call holds no lock.
        let context = {
            let slot = self.slot(session);
            let mut state = slot.state.lock().await;
            if state.planner.is_none() {
                state.planner = Some(self.load(session).await?);
            }
            let Some(planner) = state.planner.as_ref() else {
                return Ok(rebuilt(None, None));
            };
            let s = planner.state();
            if request_id
                .as_ref()
                .is_some_and(|id| s.request_ids.contains(id))
            {
                return Ok(rebuilt(None, None)); // a retry: the core ignores it
            }
            planner_llm::PlanContext {
                request: input.clone(),
                attachments: attachments.clone(),
                summary: s.context.summary.clone(),
                system_prompt: s.config.system_prompt.clone(),
                profile: s.config.profile,
                existing_ids: s.tasks.iter().map(|t| t.id.clone()).collect(),
                max_tasks: s.config.max_plan_tasks,
            }
        };
        let planned = planner_llm::TaskPlanner::plan(llm.as_ref(), &context).await;
        Ok(rebuilt(planned.plan, planned.planning))
    }

    /// After a task failed for good, asks the LLM for a revised plan for what is left and, if it
    /// gives a valid one, sends it as a follow-up request marked as a revision (recorded like any
    /// plan, with its note). At most `llm.max_revisions` per session; a failed revision changes
    /// nothing (the plan stays failed).
    fn revise(self: &Arc<Self>, session: &str, failed: planner_core::TaskId) {
        let Some(llm) = self.config.llm.clone() else {
            return;
        };
        let limit = llm.client().config().max_revisions;
        if limit == 0 {
            return;
        }
        let engine = Arc::clone(self);
        let session = session.to_owned();
        tokio::spawn(async move {
            let context = {
                let slot = engine.slot(&session);
                let state = slot.state.lock().await;
                let Some(planner) = state.planner.as_ref() else {
                    return;
                };
                let s = planner.state();
                let done = s
                    .requests
                    .iter()
                    .filter(|r| r.starts_with(REVISION_MARK))
                    .count();
                if done >= limit as usize {
                    return;
                }
                let error = s
                    .task(&failed)
                    .and_then(|t| t.error.clone())
                    .unwrap_or_default();
                let completed: Vec<String> = s
                    .tasks
                    .iter()
                    .filter(|t| t.status == TaskStatus::Completed)
                    .map(|t| format!("{} ({})", t.id, t.description))
                    .collect();
                let original = s
                    .requests
                    .iter()
                    .rev()
                    .find(|r| !r.starts_with(REVISION_MARK))
                    .cloned()
                    .unwrap_or_default();
                let request = format!(
                    "{REVISION_MARK} {}] The request was: {original}\nTask {failed} failed for good: {error}\nCompleted so far: {}\nPlan what is left to fulfil the request without repeating the failed approach. New tasks may depend on completed ones.",
                    done + 1,
                    if completed.is_empty() { "nothing".to_owned() } else { completed.join("; ") },
                );
                planner_llm::PlanContext {
                    request,
                    attachments: vec![],
                    summary: s.context.summary.clone(),
                    system_prompt: s.config.system_prompt.clone(),
                    profile: s.config.profile,
                    existing_ids: s.tasks.iter().map(|t| t.id.clone()).collect(),
                    max_tasks: s.config.max_plan_tasks,
                }
            };
            let planned = planner_llm::TaskPlanner::plan(llm.as_ref(), &context).await;
            let Some(plan) = planned.plan else {
                tracing::warn!(session, failed = %failed, "no usable revised plan; the plan stays failed");
                return;
            };
            let note = format!("revision after {failed} failed");
            let command = Command::Initialize {
                request_id: None,
                input: context.request,
                attachments: vec![],
                plan: Some(plan),
                planning: Some(planner_core::Planning {
                    source: planner_core::PlanSource::Llm,
                    note: Some(note),
                }),
                now: now(),
            };
            if let Err(error) = Box::pin(engine.handle(&session, command)).await {
                tracing::warn!(session, %error, "could not record the revised plan");
            }
        });
    }

    fn rewrite_summary(self: &Arc<Self>, session: &str) {
        let Some(llm) = self.config.llm.clone() else {
            return;
        };
        if !llm.client().config().summarize {
            return;
        }
        let engine = Arc::clone(self);
        let session = session.to_owned();
        tokio::spawn(async move {
            let thread = {
                let slot = engine.slot(&session);
                let state = slot.state.lock().await;
                state.planner.as_ref().map(|p| {
                    let s = p.state();
                    (s.context.thread(), s.config.token_budget, s.config.profile)
                })
            };
            let Some((thread, budget, profile)) = thread else {
                return;
            };
            let summary = planner_llm::summarize(llm.client(), &thread, budget / 2, profile).await;
            let command = Command::CompactContext {
                summary: Some(summary),
                now: now(),
            };
            if let Err(error) = Box::pin(engine.handle(&session, command)).await {
                tracing::warn!(session, %error, "could not record the LLM summary");
            }
        });
    }

    async fn handle_in_span(
        &self,
        session: &str,
        command: Command,
    ) -> Result<Handled, EngineError> {
        let retries = self.config.conflict_retries;
        for attempt in 0..=retries {
            let slot = self.slot(session);
            let mut state = slot.state.lock().await;
            if state.planner.is_none() {
                state.planner = Some(self.load(session).await?);
            }
            let Some(planner) = state.planner.as_mut() else {
                continue;
            };
            let before = planner.version();
            let events = match planner.process(stamp(command.clone(), now())) {
                Ok(events) => events,
                Err(refused) => {
                    // Another instance may have moved the session on (a report for a task it
                    // dispatched, say): judge the command against the latest state, not ours.
                    if self.store.version(session).await? != before {
                        state.planner = None;
                        continue;
                    }
                    return Err(refused.into());
                }
            };
            planner.drain_log();
            if events.is_empty() {
                return Ok(Handled {
                    version: before,
                    events,
                });
            }
            match self.store.append(session, before, &events).await {
                Ok(version) => {
                    let outgoing = outgoing(session, planner, &events);
                    let deadline = planner.next_deadline();
                    self.config
                        .snapshot
                        .after_append(self.store.as_ref(), session, before, planner)
                        .await;
                    if !outgoing.is_empty() {
                        if let Err(error) = self.publisher.publish(&outgoing).await {
                            tracing::warn!(%error, "publish failed after persisting; the outbox sweep will re-publish");
                            state.unpublished = true;
                        }
                    }
                    let _ = self.timers.send((session.to_owned(), deadline));
                    tracing::debug!(version, events = events.len(), "persisted and published");
                    return Ok(Handled { version, events });
                }
                Err(error) => {
                    // The planner applied events that are not in the store: drop it.
                    state.planner = None;
                    if error.is_conflict() {
                        tracing::debug!(attempt, %error, "lost a race for the session; reloading");
                        continue;
                    }
                    return Err(error.into());
                }
            }
        }
        Err(EngineError::Conflict {
            session: session.to_owned(),
            retries,
        })
    }

    /// Re-publishes what an unfinished session has in flight: the current attempt of every
    /// running task and every open question. Safe to repeat (dispatch ids deduplicate).
    pub async fn republish(&self, session: &str) -> Result<(), EngineError> {
        let slot = self.slot(session);
        let mut state = slot.state.lock().await;
        if state.planner.is_none() {
            state.planner = Some(self.load(session).await?);
        }
        let Some(planner) = state.planner.as_ref() else {
            return Ok(());
        };
        let messages = in_flight(session, planner);
        let deadline = planner.next_deadline();
        if !messages.is_empty() {
            match self.publisher.publish(&messages).await {
                Ok(()) => state.unpublished = false,
                Err(error) => {
                    tracing::warn!(session, %error, "re-publish failed; will retry");
                    state.unpublished = true;
                }
            }
        } else {
            state.unpublished = false;
        }
        let _ = self.timers.send((session.to_owned(), deadline));
        Ok(())
    }

    /// Every session in the store that has not ended and is not in memory gets its in-flight
    /// work re-published and its timer armed: at start-up, and periodically, so that the retries
    /// and deadlines of sessions whose instance died are picked up by the survivors. Sessions
    /// seen ended are skipped until their version moves. Returns how many were recovered.
    pub async fn recover(&self) -> Result<usize, EngineError> {
        let mut recovered = 0;
        for session in self.store.list_streams().await? {
            if self.sessions().contains_key(&session) {
                continue;
            }
            let ended_at = self
                .ended
                .lock()
                .ok()
                .and_then(|e| e.get(&session).copied());
            if let Some(version) = ended_at {
                if self.store.version(&session).await? == version {
                    continue;
                }
            }
            let planner = self.load(&session).await?;
            if planner.state().phase != PlanPhase::Running {
                if let Ok(mut ended) = self.ended.lock() {
                    ended.insert(session.clone(), planner.version());
                }
                continue;
            }
            {
                let slot = self.slot(&session);
                slot.state.lock().await.planner = Some(planner);
            }
            self.republish(&session).await?;
            recovered += 1;
        }
        Ok(recovered)
    }

    /// Periodic housekeeping: re-publish for sessions whose publish failed, drop sessions idle
    /// past the timeout, and the least recently used ones past `max_loaded`.
    pub async fn sweep(&self) {
        let slots: Vec<(String, Arc<Slot>)> = self
            .sessions()
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        for (session, slot) in &slots {
            let unpublished = slot
                .state
                .try_lock()
                .map(|s| s.unpublished)
                .unwrap_or(false);
            if unpublished {
                if let Err(error) = self.republish(session).await {
                    tracing::warn!(session, %error, "outbox sweep failed");
                }
            }
        }
        let now_ms = now().as_millis();
        let idle_ms = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut by_age: Vec<(u64, String)> = slots
            .iter()
            .map(|(k, v)| (v.last_used_ms.load(Ordering::Relaxed), k.clone()))
            .collect();
        by_age.sort();
        let over = by_age.len().saturating_sub(self.config.max_loaded);
        let mut sessions = self.sessions();
        for (i, (last_used, session)) in by_age.iter().enumerate() {
            let idle = now_ms.saturating_sub(*last_used) >= idle_ms;
            if !(idle || i < over) {
                continue;
            }
            let Some(slot) = sessions.get(session) else {
                continue;
            };
            // Only a session nobody is using, with nothing left to publish, is dropped; its
            // timer stays armed and reloads it when it fires.
            let evictable =
                slot.state.try_lock().is_ok_and(|s| !s.unpublished) && Arc::strong_count(slot) == 2;
            if evictable {
                sessions.remove(session);
            }
        }
    }
}

impl TimerLoop {
    /// Sends `Tick` to each session when its deadline passes, until `shutdown`.
    pub async fn run<S: EventStore, P: Publisher>(
        mut self,
        engine: Arc<Engine<S, P>>,
        shutdown: CancellationToken,
    ) {
        let mut due: BTreeSet<(Timestamp, String)> = BTreeSet::new();
        let mut by_session: HashMap<String, Timestamp> = HashMap::new();
        loop {
            let next = due.first().map(|(at, _)| *at);
            let sleep = match next {
                Some(at) => Duration::from_millis(at.as_millis().saturating_sub(now().as_millis())),
                None => Duration::from_secs(3_600),
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                update = self.updates.recv() => {
                    let Some((session, deadline)) = update else { return };
                    if let Some(old) = by_session.remove(&session) {
                        due.remove(&(old, session.clone()));
                    }
                    if let Some(at) = deadline {
                        due.insert((at, session.clone()));
                        by_session.insert(session, at);
                    }
                }
                () = tokio::time::sleep(sleep), if next.is_some() => {
                    let now = now();
                    while let Some((at, session)) = due.first().cloned() {
                        if at > now {
                            break;
                        }
                        due.remove(&(at, session.clone()));
                        by_session.remove(&session);
                        let engine = Arc::clone(&engine);
                        tokio::spawn(async move {
                            if let Err(error) = engine.handle(&session, Command::Tick { now }).await {
                                tracing::warn!(session, %error, "tick failed");
                            }
                        });
                    }
                }
            }
        }
    }
}

/// What the events of one command ask to publish, rendered from the planner after them.
pub fn outgoing(session: &str, planner: &Planner, events: &[Event]) -> Vec<Outgoing> {
    events
        .iter()
        .filter_map(Event::planner_cmd)
        .filter_map(|cmd| render(session, planner, cmd))
        .collect()
}

fn render(session: &str, planner: &Planner, cmd: &PlannerCmd) -> Option<Outgoing> {
    match cmd {
        PlannerCmd::ExecuteTool(dispatch) | PlannerCmd::RunProcessing(dispatch) => {
            let assignment = planner.assignment(dispatch)?;
            Some(Outgoing::Task(TaskMessage {
                session: session.to_owned(),
                assignment,
            }))
        }
        PlannerCmd::AskUser {
            task_id,
            attempt,
            question,
            deadline,
        } => Some(Outgoing::Question(QuestionMessage {
            session: session.to_owned(),
            task_id: task_id.clone(),
            attempt: *attempt,
            question: question.clone(),
            deadline: *deadline,
        })),
        PlannerCmd::CancelTask { task_id, attempt } => Some(Outgoing::Cancel(CancelMessage {
            session: session.to_owned(),
            task_id: task_id.clone(),
            attempt: *attempt,
        })),
    }
}

/// The current attempt of every running task and every open question of a session.
pub fn in_flight(session: &str, planner: &Planner) -> Vec<Outgoing> {
    let state = planner.state();
    let mut out = Vec::new();
    for task in &state.tasks[state.cursor..] {
        match task.status {
            TaskStatus::Running if task.kind != NodeKind::Clarification => {
                let dispatch = Dispatch {
                    task_id: task.id.clone(),
                    attempt: task.attempts,
                    target: task.target.clone(),
                };
                let cmd = PlannerCmd::ExecuteTool(dispatch);
                out.extend(render(session, planner, &cmd));
            }
            TaskStatus::NeedsClarification => {
                let pending = state.awaiting_answer.get(&task.id);
                out.push(Outgoing::Question(QuestionMessage {
                    session: session.to_owned(),
                    task_id: task.id.clone(),
                    attempt: pending.map_or(task.attempts, |p| p.attempt),
                    question: task
                        .question
                        .clone()
                        .unwrap_or_else(|| task.description.clone()),
                    deadline: pending.and_then(|p| p.deadline),
                }));
            }
            _ => {}
        }
    }
    out
}
