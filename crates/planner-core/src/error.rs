//! Why a command was refused. A refused command changes nothing: validation happens before any
//! event is emitted.

use thiserror::Error;

use crate::plan::PlanError;
use crate::state::PlanPhase;
use crate::types::TaskId;

/// A command the planner refused. Nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// The command needs a session that has received its first request.
    #[error("the session has not been initialized: send Initialize first")]
    NotInitialized,
    /// The request was empty or produced no task.
    #[error("the request is empty: nothing to plan")]
    EmptyRequest,
    /// The request is longer than `max_input_chars`.
    #[error("the request has {chars} characters, more than the limit of {limit}")]
    InputTooLarge {
        /// Its length in characters.
        chars: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The plan (parsed or supplied) is invalid.
    #[error("invalid plan: {0}")]
    InvalidPlan(#[from] PlanError),
    /// No task has this id in the session.
    #[error("unknown task {task_id}")]
    UnknownTask {
        /// The id sent.
        task_id: TaskId,
    },
    /// An executor reported on an attempt that was never dispatched.
    #[error("task {task_id} has no attempt {attempt} (latest dispatched: {latest})")]
    UnknownAttempt {
        /// The task.
        task_id: TaskId,
        /// The attempt reported.
        attempt: u32,
        /// The latest attempt dispatched (0: never dispatched).
        latest: u32,
    },
    /// A claim, heartbeat or report on an attempt that is not (or no longer) the caller's.
    #[error("attempt {attempt} of task {task_id} is not yours to run: {}", reason.as_str())]
    Fenced {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        attempt: u32,
        /// Why.
        reason: crate::command::FenceReason,
    },
    /// Executors do not run clarification tasks; a human answers them.
    #[error("task {task_id} is a clarification: answer it with AnswerClarification")]
    NotExecutable {
        /// The task.
        task_id: TaskId,
    },
    /// An answer arrived for a task that asked nothing, or already got a different answer.
    #[error("task {task_id} is not waiting for an answer")]
    NotAwaitingClarification {
        /// The task.
        task_id: TaskId,
    },
    /// A revision names a task that has not failed: only a task that failed for good is
    /// revised.
    #[error("task {task_id} has not failed ({status:?}): there is nothing to revise")]
    NotRevisable {
        /// The task.
        task_id: TaskId,
        /// Its status.
        status: crate::types::TaskStatus,
    },
    /// The plan has ended; only a new request (Initialize) reopens it.
    #[error("the plan has already ended ({phase:?})")]
    PlanFinished {
        /// How it ended.
        phase: PlanPhase,
    },
}

/// An invalid [`PlannerConfig`](crate::PlannerConfig): every problem found, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid planner config: {}", problems.join("; "))]
pub struct ConfigError {
    /// One sentence per problem, naming the field.
    pub problems: Vec<String>,
}
