//! The nouns of the domain: ids, time, tasks and their statuses, attachments and messages.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
///
/// The core never reads a clock: every timestamp arrives inside a command and is recorded in the
/// events it causes, so a replay sees exactly the times the live run saw.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp `millis` milliseconds after the epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + millis`, saturating at the end of time rather than wrapping.
    #[must_use]
    pub const fn plus_millis(self, millis: u64) -> Self {
        Timestamp(self.0.saturating_add(millis))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// The longest task id or target name we accept.
pub const MAX_TOKEN_LEN: usize = 64;

/// Whether `s` can be used as one token of a NATS subject and in a `Nats-Msg-Id`:
/// 1 to [`MAX_TOKEN_LEN`] characters from `[A-Za-z0-9_-]`.
///
/// Task ids and target names end up in subjects and dedup ids, so they are held to this from the
/// moment a plan is accepted.
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOKEN_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A task's id, unique within its session. Ids from the rule parser are `t1`, `t2`, ...; ids in a
/// plan supplied as data are the plan's own, validated with [`is_valid_token`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct TaskId(pub String);

impl TaskId {
    /// Wraps `id` without validating it; plans are validated as a whole before they are applied.
    pub fn new(id: impl Into<String>) -> Self {
        TaskId(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TaskId {
    fn from(s: &str) -> Self {
        TaskId(s.to_owned())
    }
}

/// What kind of work a task is, which decides who carries it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// A question for a human, routed to a UI.
    Clarification,
    /// Work for a tool executor (search, shell, HTTP, files, ...).
    ToolCall,
    /// An LLM or compute step.
    Processing,
}

impl NodeKind {
    /// The stable snake_case name used on the wire and in subjects.
    pub const fn as_str(self) -> &'static str {
        match self {
            NodeKind::Clarification => "clarification",
            NodeKind::ToolCall => "tool_call",
            NodeKind::Processing => "processing",
        }
    }
}

/// Where a task is in its life.
///
/// `Completed`, `Failed` and `Cancelled` are terminal: once there, a task never leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Not dispatched yet: waiting for dependencies, a free slot, or a retry backoff.
    Planned,
    /// Dispatched to an executor and not finished.
    Running,
    /// Finished with an output.
    Completed,
    /// Waiting for a human's answer (a clarification task, or an executor that asked mid-task).
    NeedsClarification,
    /// Failed for good: attempts exhausted, not retryable, or a dependency failed.
    Failed,
    /// Cancelled by a command or because the plan stopped.
    Cancelled,
}

impl TaskStatus {
    /// Whether the status is final.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

/// A file, URL or blob a request or task refers to. The planner passes attachments through to
/// executors; it never reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Attachment {
    /// A short human-readable name, e.g. `report.csv`.
    pub name: String,
    /// Where the content lives, e.g. `s3://bucket/report.csv` or `file:///tmp/x`.
    pub uri: String,
    /// The media type when known, e.g. `text/csv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
}

/// Who said a message of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user's request or answer.
    User,
    /// A task's result, reported by an executor.
    Task,
    /// A question the planner asked on the user's behalf.
    Planner,
    /// A summary of earlier messages, written by compaction.
    Summary,
}

/// One message of the session's conversation, the context handed to executors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// One task of a plan, as the planner tracks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Task {
    /// Unique within the session.
    pub id: TaskId,
    /// What to do, in the user's words or the plan's.
    pub description: String,
    /// Who carries it out.
    pub kind: NodeKind,
    /// The tool or step that serves it (`web_search`, `shell`, `summarize`, ...); `user` for
    /// clarifications. A valid subject token.
    pub target: String,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// Files or URLs the task needs.
    pub attachments: Vec<Attachment>,
    /// Tasks that must complete before this one is dispatched.
    pub dependencies: Vec<TaskId>,
    /// The request (turn) that created the task, counting from 0.
    pub turn: u32,
    /// How many times it was dispatched; also the number of the current attempt.
    pub attempts: u32,
    /// How many attempts failed.
    pub failures: u32,
    /// Whether the executor reported the current attempt as started.
    pub started: bool,
    /// The output of the attempt that completed it.
    pub output: Option<String>,
    /// The last error reported, compacted to the configured limit.
    pub error: Option<String>,
    /// The question to ask (clarification tasks) or the one an executor asked mid-task.
    pub question: Option<String>,
    /// The human's answer, attached to the next dispatch.
    pub answer: Option<String>,
    /// A retry backoff: not dispatched before this time.
    pub not_before: Option<Timestamp>,
    /// When the current attempt was dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<Timestamp>,
    /// The current attempt's claim, if an executor claimed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The task's own attempt timeouts, from its plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<crate::plan::TaskTimeouts>,
}

/// An executor's claim on the current attempt of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Lease {
    /// The token heartbeats and the report must carry.
    pub token: String,
    /// When it was claimed.
    pub claimed_at: Timestamp,
    /// The last heartbeat recorded (heartbeats are recorded at most every half timeout), or
    /// the last grace a planner gave after an outage.
    pub beat_at: Timestamp,
    /// `beat_at` is a planner's grace, not a beat of the executor: no second grace comes
    /// before the executor beats again. Without this, a session evicted and recovered over and
    /// over would keep the lease of a dead executor alive for ever.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub graced: bool,
}
