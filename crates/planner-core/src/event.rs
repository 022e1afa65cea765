//! What happened: the events a planner emits and folds, and the commands for executors and UIs
//! that they carry.
//!
//! Events are facts. Each carries everything [`apply`](crate::Planner::apply) needs, so folding
//! them never recomputes a plan, a backoff, a summary or a deadline.

use serde::{Deserialize, Serialize};

use crate::config::{BudgetKind, PlannerConfig};
use crate::plan::TaskSpec;
use crate::types::{Attachment, TaskId, TaskStatus, Timestamp};

/// Something that happened in a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The session started with this config.
    SessionStarted {
        /// The config every later decision uses. Boxed: it is by far the largest payload, and
        /// every event is as large as its largest variant.
        config: Box<PlannerConfig>,
        /// When.
        at: Timestamp,
    },
    /// A request (the first or a follow-up) arrived.
    RequestReceived {
        /// Which request of the session, from 0.
        turn: u32,
        /// The client's id for the request, if it gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// Its text.
        input: String,
        /// Its attachments.
        attachments: Vec<Attachment>,
        /// Set when the request is the planner's own revised plan after this task failed for
        /// good (a [`Command::Revise`](crate::Command::Revise)), not a user's request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision_of: Option<TaskId>,
        /// When.
        at: Timestamp,
    },
    /// Tasks were added to the plan.
    TasksPlanned {
        /// The request they serve.
        turn: u32,
        /// Who made the plan.
        source: PlanSource,
        /// Details of how it was made (the model, or why an LLM plan was not used).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        /// The tasks as accepted: ids, dependencies (follow-up ordering included) and attachments
        /// final.
        tasks: Vec<TaskSpec>,
    },
    /// A task was sent to an executor.
    TaskDispatched {
        /// The task.
        task_id: TaskId,
        /// The attempt, from 1.
        attempt: u32,
        /// What to send, exactly as it will be published (and re-published on recovery).
        cmd: PlannerCmd,
        /// When.
        at: Timestamp,
    },
    /// An executor reported on an attempt: started, completed or failed for good.
    TaskStatusUpdated {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        attempt: u32,
        /// The new status: `running`, `completed` or `failed`.
        status: TaskStatus,
        /// The output, when completed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        /// The error, compacted, when failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Tokens the attempt used, as reported.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokens_used: Option<u64>,
        /// When.
        at: Timestamp,
    },
    /// A question was put to a human: a clarification task, or an executor asking mid-task.
    ClarificationRequested {
        /// The task waiting for the answer.
        task_id: TaskId,
        /// The attempt that asked (for a clarification task, its dispatch).
        attempt: u32,
        /// What to send to the UI.
        cmd: PlannerCmd,
        /// When.
        at: Timestamp,
    },
    /// A question got its answer, from a human or from the timeout default.
    ClarificationAnswered {
        /// The task.
        task_id: TaskId,
        /// The answer.
        answer: String,
        /// Whether the answer is the configured default after the deadline passed.
        defaulted: bool,
        /// When.
        at: Timestamp,
    },
    /// An attempt failed and another is scheduled.
    RetryScheduled {
        /// The task.
        task_id: TaskId,
        /// The attempt that failed.
        attempt: u32,
        /// Its error, compacted.
        error: String,
        /// Tokens the attempt used, as reported.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokens_used: Option<u64>,
        /// The next attempt is not dispatched before this.
        not_before: Timestamp,
        /// When.
        at: Timestamp,
    },
    /// An executor claimed the current attempt of a task: it runs it, under `lease`.
    AttemptClaimed {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        attempt: u32,
        /// The lease token its heartbeats and report carry.
        lease: String,
        /// When.
        at: Timestamp,
    },
    /// The executor of a claimed attempt is alive. Recorded at most once per half heartbeat
    /// timeout per attempt, which bounds the log's growth to two events per timeout period.
    AttemptHeartbeat {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        attempt: u32,
        /// When.
        at: Timestamp,
    },
    /// Every claimed, running attempt's heartbeat counts as received now: the grace a planner
    /// coming back gives executors that could not reach it.
    LeasesExtended {
        /// When.
        at: Timestamp,
    },
    /// A task was cancelled.
    TaskCancelled {
        /// The task.
        task_id: TaskId,
        /// Why.
        reason: String,
        /// For a task in flight, the cancellation to send to its executor or UI.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cmd: Option<PlannerCmd>,
        /// When.
        at: Timestamp,
    },
    /// Older messages of the context were folded into a summary.
    ContextCompacted {
        /// The new summary, replacing the old one and the folded messages.
        summary: String,
        /// How many of the oldest messages it replaces.
        folded_messages: usize,
        /// Estimated tokens before.
        tokens_before: u64,
        /// Estimated tokens after.
        tokens_after: u64,
        /// When.
        at: Timestamp,
    },
    /// Every task finished, none failed.
    PlanCompleted {
        /// When.
        at: Timestamp,
    },
    /// The plan stopped in failure.
    PlanFailed {
        /// Why.
        reason: FailureReason,
        /// When.
        at: Timestamp,
    },
    /// The plan was cancelled.
    PlanCancelled {
        /// Why, for the record.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// When.
        at: Timestamp,
    },
    /// This session is a fork: the events before this one are a copy of the first `version`
    /// events of session `source` (see [`fork_events`](crate::fork_events)). From here on it
    /// runs as a session of its own.
    SessionForked {
        /// The session it was forked from.
        source: String,
        /// How many of the source's events it copied.
        version: u64,
        /// When.
        at: Timestamp,
    },
}

/// The log a fork of a session starts with: a copy of the source's first events (`prefix`,
/// as stored) followed by [`Event::SessionForked`], which records where it came from. Folding
/// it gives the source's state at that version with [`PlannerState::forked_from`] set: replay
/// stays exact, since the copy is data and `apply` decides nothing.
///
/// [`PlannerState::forked_from`]: crate::PlannerState::forked_from
pub fn fork_events(source: &str, prefix: &[Event], at: Timestamp) -> Vec<Event> {
    let mut events = Vec::with_capacity(prefix.len() + 1);
    events.extend(prefix.iter().cloned());
    events.push(Event::SessionForked {
        source: source.to_owned(),
        version: prefix.len() as u64,
        at,
    });
    events
}

impl Event {
    /// What this event does to whether its session's plan is unfinished: `Some(true)` when it
    /// opens (or reopens) the plan, `Some(false)` when it ends it, `None` when it leaves it as
    /// it was. Mirrors the phase changes of `apply`: `SessionStarted` and `TasksPlanned` (a
    /// follow-up or revision reopens an ended plan) open; `PlanCompleted`, `PlanFailed` and
    /// `PlanCancelled` end.
    pub fn opens_plan(&self) -> Option<bool> {
        match self {
            Event::SessionStarted { .. } | Event::TasksPlanned { .. } => Some(true),
            Event::PlanCompleted { .. }
            | Event::PlanFailed { .. }
            | Event::PlanCancelled { .. } => Some(false),
            _ => None,
        }
    }
}

/// Whether a session is unfinished after `batch` was appended to it: the effect of the batch's
/// last event that opens or ends the plan (see [`Event::opens_plan`]), `None` when none does
/// and the session is as it was. Stores use it to keep their index of unfinished sessions.
pub fn open_after(batch: &[Event]) -> Option<bool> {
    batch.iter().rev().find_map(Event::opens_plan)
}

/// The current version of the persisted event schema. See [`crate::codec`].
pub const EVENT_SCHEMA_VERSION: u32 = 1;

impl Event {
    /// The stable snake_case name of the event, as in its `type` field.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::SessionStarted { .. } => "session_started",
            Event::RequestReceived { .. } => "request_received",
            Event::TasksPlanned { .. } => "tasks_planned",
            Event::TaskDispatched { .. } => "task_dispatched",
            Event::TaskStatusUpdated { .. } => "task_status_updated",
            Event::ClarificationRequested { .. } => "clarification_requested",
            Event::ClarificationAnswered { .. } => "clarification_answered",
            Event::RetryScheduled { .. } => "retry_scheduled",
            Event::AttemptClaimed { .. } => "attempt_claimed",
            Event::AttemptHeartbeat { .. } => "attempt_heartbeat",
            Event::LeasesExtended { .. } => "leases_extended",
            Event::TaskCancelled { .. } => "task_cancelled",
            Event::ContextCompacted { .. } => "context_compacted",
            Event::PlanCompleted { .. } => "plan_completed",
            Event::PlanFailed { .. } => "plan_failed",
            Event::PlanCancelled { .. } => "plan_cancelled",
            Event::SessionForked { .. } => "session_forked",
        }
    }

    /// The schema version this event is written in.
    pub fn event_version(&self) -> u32 {
        EVENT_SCHEMA_VERSION
    }

    /// The command for an executor or a UI this event carries, if any: what a shell publishes
    /// after persisting the event.
    pub fn planner_cmd(&self) -> Option<&PlannerCmd> {
        match self {
            Event::TaskDispatched { cmd, .. } | Event::ClarificationRequested { cmd, .. } => {
                Some(cmd)
            }
            Event::TaskCancelled { cmd, .. } => cmd.as_ref(),
            _ => None,
        }
    }

    /// Whether the event ends the plan.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::PlanCompleted { .. } | Event::PlanFailed { .. } | Event::PlanCancelled { .. }
        )
    }
}

/// Who made a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum PlanSource {
    /// The deterministic rule parser ([`parse_input`](crate::parse_input)).
    Rules,
    /// A plan supplied as data with the request by a caller.
    Supplied,
    /// A plan made by an LLM and validated.
    Llm,
    /// The rule parser, because the LLM's plan failed (the note says why).
    RulesFallback,
}

/// Why a plan failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailureReason {
    /// A task failed for good under the fail-fast policy.
    TaskFailed {
        /// The task.
        task_id: TaskId,
    },
    /// Under continue-on-failure, everything that could finish did; these tasks failed.
    TasksFailed {
        /// The tasks that failed, in plan order.
        task_ids: Vec<TaskId>,
    },
    /// A budget was passed.
    BudgetExceeded {
        /// Which.
        budget: BudgetKind,
        /// Its limit.
        limit: u64,
        /// What was used (or would have been, had the step gone ahead).
        used: u64,
    },
}

/// A command for an executor or a UI, carried by an event and published by the shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PlannerCmd {
    /// Run a tool. Routed to the executors of `dispatch.target`.
    ExecuteTool(Dispatch),
    /// Run an LLM or compute step. Routed to the executors of `dispatch.target`.
    RunProcessing(Dispatch),
    /// Ask a human. Routed to the session's UI.
    AskUser {
        /// The task waiting for the answer.
        task_id: TaskId,
        /// The attempt that asked.
        attempt: u32,
        /// The question.
        question: String,
        /// After this the configured timeout action happens; none when it waits for ever.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline: Option<Timestamp>,
    },
    /// Stop a running attempt, or withdraw a question.
    CancelTask {
        /// The task.
        task_id: TaskId,
        /// The attempt to stop.
        attempt: u32,
    },
}

impl PlannerCmd {
    /// The task the command is about.
    pub fn task_id(&self) -> &TaskId {
        match self {
            PlannerCmd::ExecuteTool(d) | PlannerCmd::RunProcessing(d) => &d.task_id,
            PlannerCmd::AskUser { task_id, .. } | PlannerCmd::CancelTask { task_id, .. } => task_id,
        }
    }

    /// The attempt the command is about.
    pub fn attempt(&self) -> u32 {
        match self {
            PlannerCmd::ExecuteTool(d) | PlannerCmd::RunProcessing(d) => d.attempt,
            PlannerCmd::AskUser { attempt, .. } | PlannerCmd::CancelTask { attempt, .. } => {
                *attempt
            }
        }
    }
}

/// A dispatch as recorded: which attempt of which task went to which target.
///
/// It is a reference, kept small on purpose: the description, attachments, dependency outputs
/// and context are already in the state (and, except the context summary, never change once a
/// task is dispatched), so copying them into every dispatch event would store the same bytes
/// over and over. The shell turns it into the full [`TaskAssignment`] with
/// [`Planner::assignment`](crate::Planner::assignment) when it publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Dispatch {
    /// The task.
    pub task_id: TaskId,
    /// The attempt, from 1. An executor that sees a (task, attempt) twice ran it already.
    pub attempt: u32,
    /// The tool or step to use: the routing key.
    pub target: String,
}

/// Everything an executor needs to run one attempt of a task: what the shell publishes for an
/// `execute_tool` or `run_processing` command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TaskAssignment {
    /// The task.
    pub task_id: TaskId,
    /// The attempt, from 1. An executor that sees a (task, attempt) twice ran it already.
    pub attempt: u32,
    /// Tool call or processing step.
    pub kind: crate::types::NodeKind,
    /// The tool or step to use.
    pub target: String,
    /// What to do.
    pub description: String,
    /// Files or URLs it needs.
    pub attachments: Vec<Attachment>,
    /// Outputs of the tasks it depends on, in dependency order.
    pub inputs: Vec<TaskOutput>,
    /// A human's answer to the question this task (or one of its attempts) asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// What identifies `context`: equal references, equal contexts
    /// ([`DispatchContext::reference`]). An executor that holds the context of this reference
    /// (from an earlier task of the session) need not be sent it again.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub context_ref: String,
    /// The conversation so far, compacted. A shell may leave it out of a dispatch (the daemon
    /// does when it is large, see docs/protocol.md): the executor then gets it with its claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<DispatchContext>,
}

/// The output of a completed dependency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TaskOutput {
    /// The dependency.
    pub task_id: TaskId,
    /// Its output.
    pub output: String,
}

/// The context handed to an executor with a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DispatchContext {
    /// The request the task serves.
    pub request: String,
    /// The summary of older conversation: the session's latest when the assignment is rendered
    /// (for a live dispatch, the summary as of the dispatch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The system prompt (processing steps only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// The compaction profile, a hint for LLM steps.
    pub profile: crate::compact::Profile,
}

impl DispatchContext {
    /// A short reference to this context (16 hex digits): equal contexts have equal
    /// references, and different ones different references but with negligible chance. It is
    /// a hash (64-bit FNV-1a over the fields, each length-prefixed), not a secret: it lets an
    /// executor say which context it already holds, so the planner need not send it again.
    #[must_use]
    pub fn reference(&self) -> String {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        fn feed(hash: &mut u64, bytes: &[u8]) {
            for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
                *hash ^= u64::from(*byte);
                *hash = hash.wrapping_mul(PRIME);
            }
        }
        fn feed_opt(hash: &mut u64, text: Option<&str>) {
            match text {
                Some(text) => {
                    feed(hash, b"1");
                    feed(hash, text.as_bytes());
                }
                None => feed(hash, b"0"),
            }
        }
        let mut hash = OFFSET;
        feed(&mut hash, self.request.as_bytes());
        feed_opt(&mut hash, self.summary.as_deref());
        feed_opt(&mut hash, self.system_prompt.as_deref());
        let profile: &[u8] = match self.profile {
            crate::compact::Profile::General => b"general",
            crate::compact::Profile::Coding => b"coding",
            crate::compact::Profile::Analysis => b"analysis",
        };
        feed(&mut hash, profile);
        format!("{hash:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::DispatchContext;
    use crate::compact::Profile;

    fn context(request: &str, summary: Option<&str>, system: Option<&str>) -> DispatchContext {
        DispatchContext {
            request: request.into(),
            summary: summary.map(Into::into),
            system_prompt: system.map(Into::into),
            profile: Profile::General,
        }
    }

    #[test]
    fn equal_contexts_have_equal_references_and_different_ones_differ() {
        let a = context("plan a trip", Some("earlier"), None);
        assert_eq!(a.reference(), a.clone().reference());
        assert_eq!(a.reference().len(), 16);
        // Fields are length-prefixed: moving bytes between them changes the reference.
        for other in [
            context("plan a tri", Some("pearlier"), None),
            context("plan a trip", None, Some("earlier")),
            context("plan a trip", Some("earlier"), Some("")),
            context("plan a trip", Some("earlier!"), None),
            DispatchContext {
                profile: Profile::Coding,
                ..a.clone()
            },
        ] {
            assert_ne!(a.reference(), other.reference(), "{other:?}");
        }
    }

    #[test]
    fn the_reference_is_stable_across_builds() {
        // Executors keep contexts by reference across daemon upgrades: the hash must not move.
        // (64-bit FNV-1a over each field as a little-endian u64 length and its bytes; the value
        // was checked against an independent implementation.)
        assert_eq!(
            context("", None, None).reference(),
            context("", None, None).reference()
        );
        assert_eq!(context("hello", None, None).reference(), "4e374726b3b4e12f");
    }
}
