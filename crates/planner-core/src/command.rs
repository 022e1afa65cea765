//! What the planner is asked to do: commands, and the executor reports they carry.

use serde::{Deserialize, Serialize};

use crate::plan::PlanSpec;
use crate::types::{Attachment, TaskId, Timestamp};

/// An input to [`Planner::process`](crate::Planner::process).
///
/// Time enters through the `now` fields: the planner never reads a clock. A `now` earlier than
/// the latest time the planner has seen is treated as that latest time (time never runs back).
/// On the wire `now` may be left out (it reads as 0, "no later than what was seen"); the daemon
/// sets it from its own clock in any case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// A request from the user. The first one starts the session; later ones are follow-ups
    /// whose tasks run after the current ones, with the conversation so far as context.
    Initialize {
        /// An id the client chose for this request: a second `initialize` with an id the session
        /// has already seen is a retry and changes nothing. At most 128 characters.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// The request in plain text; with no `plan`, the rule parser turns it into tasks.
        input: String,
        /// Files or URLs that come with the request; every task of the request gets them.
        #[serde(default)]
        attachments: Vec<Attachment>,
        /// A ready-made plan (from an LLM or a caller), used instead of the rule parser.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plan: Option<PlanSpec>,
        /// How the plan was made, when a planner outside the core made (or failed to make) it:
        /// recorded with the tasks so that a UI can show it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        planning: Option<Planning>,
        /// When the request arrived.
        #[serde(default)]
        now: Timestamp,
    },
    /// A revised plan, made outside the core (by the daemon's LLM) after `failed` failed for
    /// good: recorded like a follow-up request whose plan came from an LLM, and marked as a
    /// revision of `failed` ([`PlannerState::revisions`](crate::PlannerState::revisions)
    /// counts them). Only the planner's shell sends it: no client message maps to it, so
    /// revisions are counted from the log's structure, never from text a user can type.
    Revise {
        /// The task that failed for good; it must be a failed task of the session.
        failed: TaskId,
        /// The revision request, as shown to people and kept in the context.
        input: String,
        /// The revised plan.
        plan: PlanSpec,
        /// Details for people (recorded as the plan's note).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        /// When.
        #[serde(default)]
        now: Timestamp,
    },
    /// A report from an executor about one attempt of one task.
    HandleExecutorEvent {
        /// The report.
        event: ExecutorEvent,
        /// The lease of the attempt's claim, as the report carries it. Required when the
        /// attempt was claimed or claims are required ([`crate::LeasePolicy::require_claim`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
        /// When it arrived.
        #[serde(default)]
        now: Timestamp,
    },
    /// A human's answer to a question the planner asked.
    AnswerClarification {
        /// The task that asked.
        task_id: TaskId,
        /// The answer.
        answer: String,
        /// When it arrived.
        #[serde(default)]
        now: Timestamp,
    },
    /// Dispatch whatever is ready, at the latest time seen. A no-op when nothing is.
    Continue,
    /// Time has passed: retries whose backoff ended are dispatched, clarification deadlines and
    /// the wall-time budget are checked. A tick with nothing due is a no-op.
    Tick {
        /// The current time.
        #[serde(default)]
        now: Timestamp,
    },
    /// Fold older messages of the context into a summary now, whatever its size.
    CompactContext {
        /// A summary written outside the core (e.g. by an LLM); the deterministic summary of
        /// [`compact_thread`](crate::compact_thread) when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        summary: Option<String>,
        /// What `summary` covers: the summary in place when it was written and the messages
        /// before this number (counted over the session, as
        /// [`Context::folded`](crate::Context::folded) + the messages then). Only those are
        /// replaced; messages added since stay. A summary that covers less than the one in
        /// place (another compaction came in between) changes nothing. When absent, everything
        /// but the newest message is folded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        through: Option<u64>,
        /// When.
        #[serde(default)]
        now: Timestamp,
    },
    /// An executor claims an attempt before running it; refused (with a [`FenceReason`]) if
    /// the attempt is not the task's current running one or someone else claimed it.
    ClaimAttempt {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        attempt: u32,
        /// The lease token, chosen by the shell (ids come from outside the core).
        lease: String,
        /// When.
        #[serde(default)]
        now: Timestamp,
    },
    /// The executor of a claimed attempt is alive; refused (with a [`FenceReason`]) once the
    /// attempt no longer belongs to it: cancelled, timed out, ended.
    Heartbeat {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        attempt: u32,
        /// The lease of its claim.
        lease: String,
        /// When.
        #[serde(default)]
        now: Timestamp,
    },
    /// The shell gave up on an attempt: its dispatch can never be delivered (larger than the
    /// bus accepts: not `retryable`, the task fails for good), or its executor is known dead
    /// (an interrupted embedded run: `retryable`, the retry policy decides).
    AbandonAttempt {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        attempt: u32,
        /// Why, for the record and the task's error.
        error: String,
        /// Whether another attempt may succeed.
        #[serde(default)]
        retryable: bool,
        /// When.
        #[serde(default)]
        now: Timestamp,
    },
    /// The planner itself was away (a restart, an outage): every claimed, running attempt gets
    /// one heartbeat timeout of grace from `now`, since its executor could not heartbeat to
    /// anyone meanwhile. A no-op when every lease is fresh.
    ExtendLeases {
        /// When the planner came back.
        #[serde(default)]
        now: Timestamp,
    },
    /// Cancel one task (with everything that depends on it) or the whole plan.
    Cancel {
        /// What to cancel.
        target: CancelTarget,
        /// Why, for the record.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// When.
        #[serde(default)]
        now: Timestamp,
    },
}

impl Command {
    /// The stable snake_case name of the command, as on the wire.
    pub fn command_type(&self) -> &'static str {
        match self {
            Command::Initialize { .. } => "initialize",
            Command::Revise { .. } => "revise",
            Command::HandleExecutorEvent { .. } => "handle_executor_event",
            Command::AnswerClarification { .. } => "answer_clarification",
            Command::Continue => "continue",
            Command::Tick { .. } => "tick",
            Command::CompactContext { .. } => "compact_context",
            Command::ClaimAttempt { .. } => "claim_attempt",
            Command::Heartbeat { .. } => "heartbeat",
            Command::ExtendLeases { .. } => "extend_leases",
            Command::AbandonAttempt { .. } => "abandon_attempt",
            Command::Cancel { .. } => "cancel",
        }
    }
}

/// How a plan was made outside the core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Planning {
    /// Who made it: `llm` with a plan, `rules_fallback` without one (the rule parser runs).
    pub source: crate::event::PlanSource,
    /// Details for people: the model, or why the LLM's plan was not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What a [`Command::Cancel`] cancels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "scope", rename_all = "snake_case", deny_unknown_fields)]
pub enum CancelTarget {
    /// Every unfinished task; the plan ends cancelled.
    Plan,
    /// One task and every unfinished task that depends on it, directly or not.
    Task {
        /// The task.
        task_id: TaskId,
    },
}

/// An executor's report about one attempt of one task.
///
/// Unknown fields are ignored (serde cannot refuse them next to a flattened enum), which also
/// lets executors add their own diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExecutorEvent {
    /// The task.
    pub task_id: TaskId,
    /// The attempt, as dispatched (1 for the first).
    pub attempt: u32,
    /// What happened.
    #[serde(flatten)]
    pub outcome: ExecutorOutcome,
}

/// What happened to an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ExecutorOutcome {
    /// The executor took the task.
    Started,
    /// The task finished.
    Completed {
        /// What it produced, handed to dependent tasks.
        output: String,
        /// Tokens it used, counted against the token budget.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokens_used: Option<u64>,
    },
    /// The attempt failed.
    Failed {
        /// What went wrong; compacted to `error_char_limit`.
        error: String,
        /// Whether another attempt may succeed (the retry policy decides if there is one).
        #[serde(default = "retryable_by_default")]
        retryable: bool,
        /// Tokens it used, counted against the token budget.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokens_used: Option<u64>,
    },
    /// The executor needs a human's answer to go on. The attempt ends; the task is dispatched
    /// again, as a new attempt, with the answer attached.
    NeedsClarification {
        /// The question for the human.
        question: String,
    },
}

fn retryable_by_default() -> bool {
    true
}

/// Why a claim, heartbeat or report on an attempt was refused: the attempt is not (or no
/// longer) the caller's to run. The executor stops and discards the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FenceReason {
    /// The task was cancelled.
    Cancelled,
    /// A later attempt exists (this one timed out or failed).
    Superseded,
    /// The attempt is not running (it ended, or waits for an answer).
    NotRunning,
    /// Another executor claimed it.
    ClaimedByAnother,
    /// Nobody claimed it: claim before heartbeating or reporting.
    NotClaimed,
    /// The lease given is not the claim's.
    LeaseMismatch,
}

impl FenceReason {
    /// The reason as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FenceReason::Cancelled => "cancelled",
            FenceReason::Superseded => "superseded",
            FenceReason::NotRunning => "not_running",
            FenceReason::ClaimedByAnother => "claimed_by_another",
            FenceReason::NotClaimed => "not_claimed",
            FenceReason::LeaseMismatch => "lease_mismatch",
        }
    }
}
