//! What the engine tells observers after each successful append: the events, where they start,
//! and the session's summary after them. The HTTP API follows it for its live streams and its
//! list of sessions; nothing is built when no one listens.

use std::sync::Arc;

use planner_core::{Event, PlanPhase, PlannerState, TaskStatus, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{Engine, Publisher};

/// How many appends an observer may fall behind before it is told it lagged (and reloads from
/// the store).
pub const OBSERVER_CAPACITY: usize = 4096;

/// One persisted append of one session.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The session.
    pub session: String,
    /// The version before the append: `events[0]` is event number `from` (counting from 0).
    pub from: u64,
    /// The events, as stored.
    pub events: Vec<Event>,
    /// The session after them.
    pub summary: SessionSummary,
}

/// Where a session is, in one line: what a list of sessions shows. A pure function of the
/// session's folded state ([`SessionSummary::of`]), so a list and a detail view built from the
/// same version agree.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
pub struct SessionSummary {
    /// The session id.
    pub session: String,
    /// `not-started`, `running`, `asking` (waiting for an answer), `completed`, `failed` or
    /// `cancelled`: the statuses `planner-svc sessions` shows.
    pub status: String,
    /// How many events the session has.
    pub version: u64,
    /// Its first request, cut to 200 characters.
    pub request: String,
    /// How many requests it had (follow-ups and revisions included).
    pub requests: usize,
    /// When its current run started (ms since the Unix epoch): the first request, or the
    /// follow-up that reopened it. Lists are sorted by it, newest first.
    #[schema(value_type = Option<u64>)]
    pub started_at: Option<Timestamp>,
    /// The time of its latest event (ms since the Unix epoch).
    #[schema(value_type = u64)]
    pub updated_at: Timestamp,
    /// Its tasks, counted by status.
    pub tasks: TaskCounts,
    /// Questions waiting for an answer.
    pub questions: usize,
}

/// Tasks counted by status.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    utoipa::ToSchema,
)]
pub struct TaskCounts {
    /// Every task.
    pub total: usize,
    /// Not dispatched yet.
    pub planned: usize,
    /// Dispatched and not finished.
    pub running: usize,
    /// Waiting for an answer.
    pub needs_clarification: usize,
    /// Completed.
    pub completed: usize,
    /// Failed for good.
    pub failed: usize,
    /// Cancelled.
    pub cancelled: usize,
}

/// Longest request text a summary keeps, in characters.
const REQUEST_CHARS: usize = 200;

/// The status names of [`SessionSummary::status`], in the order a plan goes through them.
pub const SESSION_STATUSES: [&str; 6] = [
    "not-started",
    "running",
    "asking",
    "completed",
    "failed",
    "cancelled",
];

/// The status of a session in [`SESSION_STATUSES`].
pub fn session_status(state: &PlannerState) -> &'static str {
    match &state.phase {
        PlanPhase::Running if !state.awaiting_answer.is_empty() => "asking",
        PlanPhase::Running => "running",
        PlanPhase::NotStarted => "not-started",
        PlanPhase::Completed => "completed",
        PlanPhase::Failed { .. } => "failed",
        PlanPhase::Cancelled => "cancelled",
    }
}

impl SessionSummary {
    /// The summary of `session` at `state`.
    pub fn of(session: &str, state: &PlannerState) -> SessionSummary {
        let mut tasks = TaskCounts {
            total: state.tasks.len(),
            ..TaskCounts::default()
        };
        for task in &state.tasks {
            let count = match task.status {
                TaskStatus::Planned => &mut tasks.planned,
                TaskStatus::Running => &mut tasks.running,
                TaskStatus::NeedsClarification => &mut tasks.needs_clarification,
                TaskStatus::Completed => &mut tasks.completed,
                TaskStatus::Failed => &mut tasks.failed,
                TaskStatus::Cancelled => &mut tasks.cancelled,
            };
            *count += 1;
        }
        SessionSummary {
            session: session.to_owned(),
            status: session_status(state).to_owned(),
            version: state.version,
            request: state
                .requests
                .first()
                .map(|r| r.chars().take(REQUEST_CHARS).collect())
                .unwrap_or_default(),
            requests: state.requests.len(),
            started_at: state.started_at,
            updated_at: state.clock,
            tasks,
            questions: state.awaiting_answer.len(),
        }
    }
}

/// The sending side, kept by the engine.
pub(super) type Observers = broadcast::Sender<Arc<Appended>>;

impl<S, P: Publisher> Engine<S, P> {
    /// Every append this engine persists from now on, in order per session (appends of other
    /// instances sharing the store are not seen: follow the store for those). A receiver that
    /// falls more than [`OBSERVER_CAPACITY`] appends behind gets `Lagged` and should reload.
    pub fn observe(&self) -> broadcast::Receiver<Arc<Appended>> {
        self.observers.subscribe()
    }

    /// Called by the driver after each successful append, under the session's lock (so
    /// appends of one session are told in order). Builds nothing when no one listens.
    pub(super) fn appended(
        &self,
        session: &str,
        from: u64,
        events: &[Event],
        state: &PlannerState,
    ) {
        if self.observers.receiver_count() == 0 {
            return;
        }
        let _ = self.observers.send(Arc::new(Appended {
            session: session.to_owned(),
            from,
            events: events.to_vec(),
            summary: SessionSummary::of(session, state),
        }));
    }
}

impl<S: planner_store::EventStore, P: Publisher> Engine<S, P> {
    /// A copy of `session`'s planner at its latest version, for readers: the one in memory
    /// (read under the session's lock) when it is as new as the store's, else loaded from the
    /// store (snapshot + tail) without taking it into memory. Version 0 for an unknown session.
    pub async fn read(&self, session: &str) -> Result<planner_core::Planner, super::EngineError> {
        if !planner_core::is_valid_token(session) {
            return Err(super::EngineError::BadSession(session.to_owned()));
        }
        let stored = self.store.version(session).await?;
        if let Some(slot) = self.registry.get(session) {
            let state = slot.state.lock().await;
            if let Some(planner) = state.planner.as_ref().filter(|p| p.version() == stored) {
                return Ok(planner.clone());
            }
        }
        Ok(planner_store::load_planner(self.store.as_ref(), session).await?)
    }
}
