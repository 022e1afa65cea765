//! The event-log consistency check: `planner-svc check`, and the daemon's background pass
//! over its loaded sessions.
//!
//! A session's log is read as the store keeps it ([`EventStore::load_batches`]) and checked
//! for what must hold of every log the planner wrote:
//!
//! - **versions contiguous**: each append starts where the one before ended;
//! - **events decodable**: every append decodes with this build's schema and upcasters;
//! - **fold equals snapshot**: the stored snapshot is the fold of the events up to its version;
//! - **terminal stays terminal**: no task is reported, dispatched or cancelled after it
//!   completed, failed or was cancelled (so no task ends twice);
//! - **attempts monotonic**: each dispatch of a task is a later attempt than the one before,
//!   and no report, claim or retry names an attempt that was never dispatched;
//! - **every dispatch justified**: a dispatched task was planned, is not running or ended,
//!   its dependencies completed, and the plan was running.
//!
//! The checks replay the log through the core's own `apply`, judging each event against the
//! state before it; they decide nothing and change nothing.

use planner_core::{Event, PlanPhase, Planner, TaskStatus};
use planner_store::{EventStore, StoredBatch};

/// What is wrong with one session's log (empty: nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// The session.
    pub session: String,
    /// Events read.
    pub events: u64,
    /// One line per problem, each naming the version it was found at.
    pub problems: Vec<String>,
}

impl SessionReport {
    /// Whether the log passed.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `session` in `store`. A store that cannot be read at all is an error; anything wrong
/// with the log itself is a problem in the report.
pub async fn check_session<S: EventStore>(
    store: &S,
    session: &str,
) -> Result<SessionReport, planner_store::StoreError> {
    let batches = store.load_batches(session).await?;
    let snapshot = store.load_snapshot(session).await?;
    Ok(check_log(session, &batches, snapshot.as_ref()))
}

/// Checks a log given as its stored batches and its snapshot, if any. See the module docs.
pub fn check_log(
    session: &str,
    batches: &[StoredBatch],
    snapshot: Option<&planner_store::Snapshot>,
) -> SessionReport {
    let mut problems = Vec::new();
    let mut planner = Planner::new();
    // Where the next batch must start; `None` after a batch whose end is unknown.
    let mut expected = Some(0u64);
    let mut readable = true;
    let mut snapshot_checked = false;
    for batch in batches {
        match (expected, batch.base_version) {
            (Some(want), Some(base)) if base != want => {
                problems.push(format!(
                    "version gap: an append starts at version {base}, the log before it ends at {want}"
                ));
                readable = false;
            }
            (_, None) => {
                problems.push(format!(
                    "an append after version {} does not say which version it starts at",
                    expected.map_or_else(|| "?".to_owned(), |v| v.to_string())
                ));
                readable = false;
            }
            _ => {}
        }
        let events = match &batch.events {
            Ok(events) => events,
            Err(reason) => {
                problems.push(format!(
                    "undecodable append at version {}: {reason}",
                    batch
                        .base_version
                        .map_or_else(|| "?".to_owned(), |v| v.to_string())
                ));
                readable = false;
                expected = None;
                continue;
            }
        };
        expected = batch.base_version.map(|b| b + events.len() as u64);
        // Past a gap or an unreadable append the fold is no longer the session's: the
        // invariants below are only judged on the readable prefix.
        if !readable {
            continue;
        }
        for event in events {
            let version = planner.version() + 1;
            if let Some(problem) = judge(&planner, event) {
                problems.push(format!(
                    "version {version} ({}): {problem}",
                    event.event_type()
                ));
            }
            planner.apply(event);
            if let Some(snapshot) = snapshot.filter(|s| s.version == planner.version()) {
                snapshot_checked = true;
                if !same_state(planner.state(), &snapshot.state) {
                    problems.push(format!(
                        "the snapshot at version {} differs from the fold of the events up to it",
                        snapshot.version
                    ));
                }
            }
        }
    }
    if let Some(snapshot) = snapshot {
        if readable && !snapshot_checked {
            problems.push(format!(
                "the snapshot is at version {}, the log ends at {}",
                snapshot.version,
                planner.version()
            ));
        }
    }
    SessionReport {
        session: session.to_owned(),
        events: planner.version(),
        problems,
    }
}

/// Two states compared as they are persisted (the derived indexes are not).
fn same_state(a: &planner_core::PlannerState, b: &planner_core::PlannerState) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// What is wrong with `event` given the state before it, if anything.
fn judge(planner: &Planner, event: &Event) -> Option<String> {
    let state = planner.state();
    let task_of = |id: &planner_core::TaskId| state.task(id);
    match event {
        Event::TaskDispatched {
            task_id, attempt, ..
        } => {
            let Some(task) = task_of(task_id) else {
                return Some(format!("dispatch of {task_id}, which was never planned"));
            };
            if task.status.is_terminal() {
                return Some(format!(
                    "dispatch of {task_id}, which had ended ({:?})",
                    task.status
                ));
            }
            if task.status == TaskStatus::Running {
                return Some(format!(
                    "dispatch of {task_id} attempt {attempt} while attempt {} runs",
                    task.attempts
                ));
            }
            if *attempt <= task.attempts {
                return Some(format!(
                    "{task_id} dispatched as attempt {attempt} after attempt {}",
                    task.attempts
                ));
            }
            if state.phase != PlanPhase::Running {
                return Some(format!(
                    "dispatch of {task_id} while the plan is {:?}",
                    state.phase
                ));
            }
            let unmet: Vec<String> = task
                .dependencies
                .iter()
                .filter(|d| task_of(d).is_none_or(|t| t.status != TaskStatus::Completed))
                .map(ToString::to_string)
                .collect();
            if !unmet.is_empty() {
                return Some(format!(
                    "dispatch of {task_id} before its dependencies {} completed",
                    unmet.join(", ")
                ));
            }
            None
        }
        Event::TaskStatusUpdated {
            task_id,
            attempt,
            status,
            ..
        } => {
            let task = task_of(task_id)?;
            if task.status.is_terminal() {
                return Some(format!(
                    "{task_id} reported {status:?} after it had ended ({:?})",
                    task.status
                ));
            }
            (*attempt > task.attempts).then(|| {
                format!(
                    "{task_id} reported for attempt {attempt}, only {} dispatched",
                    task.attempts
                )
            })
        }
        Event::RetryScheduled {
            task_id, attempt, ..
        }
        | Event::AttemptClaimed {
            task_id, attempt, ..
        } => {
            let task = task_of(task_id)?;
            if task.status.is_terminal() {
                return Some(format!(
                    "{task_id} changed after it had ended ({:?})",
                    task.status
                ));
            }
            (*attempt > task.attempts).then(|| {
                format!(
                    "{task_id} attempt {attempt} named, only {} dispatched",
                    task.attempts
                )
            })
        }
        Event::TaskCancelled { task_id, .. } => {
            let task = task_of(task_id)?;
            task.status
                .is_terminal()
                .then(|| format!("{task_id} cancelled after it had ended ({:?})", task.status))
        }
        Event::ClarificationRequested {
            task_id, attempt, ..
        } => {
            let task = task_of(task_id)?;
            if task.status.is_terminal() {
                return Some(format!(
                    "question of {task_id}, which had ended ({:?})",
                    task.status
                ));
            }
            (*attempt < task.attempts).then(|| {
                format!(
                    "question of {task_id} for attempt {attempt} after attempt {}",
                    task.attempts
                )
            })
        }
        _ => None,
    }
}

/// One background pass over the loaded sessions: each checked against the store, the result
/// exported as metrics (`planner_consistency_*`). At most `batch` sessions, the ones after
/// `cursor` (by id) first, so successive passes cover them all. Returns the next cursor.
pub async fn background_pass<S: EventStore>(
    store: &S,
    sessions: Vec<String>,
    cursor: &str,
    batch: usize,
    problem_sessions: &mut std::collections::BTreeSet<String>,
) -> String {
    let mut sessions = sessions;
    sessions.sort();
    let start = sessions.partition_point(|s| s.as_str() <= cursor);
    let mut order: Vec<String> = sessions[start..].to_vec();
    order.extend(sessions[..start].iter().cloned());
    order.truncate(batch.max(1));
    let mut last = cursor.to_owned();
    for session in order {
        match check_session(store, &session).await {
            Ok(report) if report.ok() => {
                problem_sessions.remove(&session);
                metrics::counter!("planner_consistency_checks_total", "result" => "ok")
                    .increment(1);
            }
            Ok(report) => {
                tracing::error!(session, problems = ?report.problems, "the session's log failed the consistency check");
                problem_sessions.insert(session.clone());
                metrics::counter!("planner_consistency_checks_total", "result" => "problem")
                    .increment(1);
            }
            Err(error) => {
                tracing::warn!(session, %error, "could not read a session for the consistency check");
            }
        }
        last = session;
    }
    metrics::gauge!("planner_consistency_problem_sessions").set(problem_sessions.len() as f64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("planner_consistency_last_pass_timestamp_seconds").set(now);
    last
}
