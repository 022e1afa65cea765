//! The wire contract: subjects and the JSON messages on them. `docs/protocol.md` is the prose
//! version of this file; a test checks its examples against these types.

use planner_core::{Command, Event, NodeKind, TaskAssignment, TaskId, Timestamp};
use serde::{Deserialize, Serialize};

/// Subject names, all under one prefix (`planner` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects {
            prefix: prefix.into(),
        }
    }

    /// `{p}.cmd.{session}`: commands, request/reply.
    pub fn command(&self, session: &str) -> String {
        format!("{}.cmd.{session}", self.prefix)
    }

    /// `{p}.cmd.*`: what the daemon serves.
    pub fn commands(&self) -> String {
        format!("{}.cmd.*", self.prefix)
    }

    /// `{p}.report.{session}`: executor reports, captured by JetStream.
    pub fn report(&self, session: &str) -> String {
        format!("{}.report.{session}", self.prefix)
    }

    /// `{p}.report.*`: the reports stream's subjects.
    pub fn reports(&self) -> String {
        format!("{}.report.*", self.prefix)
    }

    /// `{p}.task.{kind}.{target}`: dispatches for the executor pool serving `target`.
    pub fn task(&self, kind: NodeKind, target: &str) -> String {
        format!("{}.task.{}.{target}", self.prefix, kind.as_str())
    }

    /// `{p}.task.>`: the dispatch stream's subjects.
    pub fn tasks(&self) -> String {
        format!("{}.task.>", self.prefix)
    }

    /// `{p}.ui.{session}.question`: questions for the session's UI.
    pub fn question(&self, session: &str) -> String {
        format!("{}.ui.{session}.question", self.prefix)
    }

    /// `{p}.cancel.{session}.{task}`: stop a running attempt, or withdraw a question.
    pub fn cancel(&self, session: &str, task: &TaskId) -> String {
        format!("{}.cancel.{session}.{task}", self.prefix)
    }

    /// `{p}.events.{session}`: the session's event log (the JetStream event store).
    pub fn events(&self, session: &str) -> String {
        format!("{}.events.{session}", self.prefix)
    }

    /// `{p}.events`: the event store's subject prefix.
    pub fn events_prefix(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// `{p}.errors`: bad input that had no one to reply to.
    pub fn errors(&self) -> String {
        format!("{}.errors", self.prefix)
    }

    /// The session id in a subject `{p}.{kind}.{session}[...]`, if the subject has that shape.
    pub fn session_of<'a>(&self, subject: &'a str, kind: &str) -> Option<&'a str> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?
            .strip_prefix(kind)?
            .strip_prefix('.')?;
        rest.split('.').next()
    }
}

/// A command request on `{p}.cmd.{session}`. The planner sets every `now` itself: clients do
/// not control its clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct CommandRequest(pub Command);

/// The reply to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CommandReply {
    /// Accepted: the events it caused, already persisted.
    Ok {
        /// The session's version after them.
        version: u64,
        /// The events.
        events: Vec<Event>,
    },
    /// Refused: nothing changed.
    Error(ErrorBody),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    /// A stable snake_case kind: `malformed`, `too_large`, `bad_session`, `rejected`,
    /// `conflict`, `unavailable`.
    pub kind: String,
    /// What went wrong, for people.
    pub message: String,
}

/// A report that could not be processed and had no reply subject, on `{p}.errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorNotice {
    /// The subject the input came in on.
    pub subject: String,
    /// The session, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The error.
    #[serde(flatten)]
    pub error: ErrorBody,
}

/// A dispatch on `{p}.task.{kind}.{target}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TaskMessage {
    /// The session: report back on `{p}.report.{session}`.
    pub session: String,
    /// The work.
    #[serde(flatten)]
    pub assignment: TaskAssignment,
}

/// A question on `{p}.ui.{session}.question`. Answer it with an `answer_clarification` command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QuestionMessage {
    /// The session.
    pub session: String,
    /// The task waiting for the answer.
    pub task_id: TaskId,
    /// The attempt that asked.
    pub attempt: u32,
    /// The question.
    pub question: String,
    /// When the configured timeout action happens, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
}

/// A cancellation on `{p}.cancel.{session}.{task}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CancelMessage {
    /// The session.
    pub session: String,
    /// The task.
    pub task_id: TaskId,
    /// The attempt to stop.
    pub attempt: u32,
}

/// The `Nats-Msg-Id` of a dispatch: the same (session, task, attempt) is never delivered twice
/// within the dispatch stream's duplicate window.
pub fn dispatch_id(session: &str, task: &TaskId, attempt: u32) -> String {
    format!("{session}.{task}.{attempt}")
}

/// The JSON Schema of every message on the wire, by file name: what `docs/schemas/` holds
/// (a test keeps the two equal).
pub fn schemas() -> Vec<(&'static str, serde_json::Value)> {
    fn json(schema: schemars::Schema) -> serde_json::Value {
        serde_json::to_value(schema).unwrap_or_default()
    }
    vec![
        ("command.json", json(schemars::schema_for!(Command))),
        (
            "command_reply.json",
            json(schemars::schema_for!(CommandReply)),
        ),
        (
            "executor_report.json",
            json(schemars::schema_for!(planner_core::ExecutorEvent)),
        ),
        (
            "task_message.json",
            json(schemars::schema_for!(TaskMessage)),
        ),
        (
            "question_message.json",
            json(schemars::schema_for!(QuestionMessage)),
        ),
        (
            "cancel_message.json",
            json(schemars::schema_for!(CancelMessage)),
        ),
        (
            "error_notice.json",
            json(schemars::schema_for!(ErrorNotice)),
        ),
        ("event.json", json(schemars::schema_for!(Event))),
    ]
}
