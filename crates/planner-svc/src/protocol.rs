//! The wire contract: subjects and the JSON messages on them. `docs/protocol.md` is the prose
//! version of this file; a test checks its examples against these types.

use planner_core::{
    Attachment, CancelTarget, Command, Event, NodeKind, PlanSpec, Planning, TaskAssignment, TaskId,
    Timestamp,
};
use serde::{Deserialize, Serialize};

mod decode;

/// The header of a dispatch naming the planner instance that owns its session (with
/// `ownership.enabled`): an executor may send the attempt's claim, heartbeats and direct report
/// to it, on [`Subjects::forward`], instead of the planner's subjects (docs/protocol.md).
pub const OWNER_HEADER: &str = "Planner-Owner";

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

    /// `{p}.result.{session}`: executor reports sent directly to the planner (request/reply),
    /// answered once the events they cause are persisted. Not captured by the report stream:
    /// an executor that gets no `ok` or `refused` falls back to [`Subjects::report`].
    pub fn result(&self, session: &str) -> String {
        format!("{}.result.{session}", self.prefix)
    }

    /// `{p}.result.*`: what the daemon serves for direct reports.
    pub fn results(&self) -> String {
        format!("{}.result.*", self.prefix)
    }

    /// `{p}.task.{kind}.{target}`: dispatches for the executor pool serving `target`.
    pub fn task(&self, kind: NodeKind, target: &str) -> String {
        format!("{}.task.{}.{target}", self.prefix, kind.as_str())
    }

    /// `{p}.task.>`: the dispatch stream's subjects.
    pub fn tasks(&self) -> String {
        format!("{}.task.>", self.prefix)
    }

    /// `{p}.offer.{kind}.{target}`: a dispatch offered to an idle executor over core NATS
    /// before it goes to the stream (docs/protocol.md, "Offers").
    pub fn offer(&self, kind: NodeKind, target: &str) -> String {
        format!("{}.offer.{}.{target}", self.prefix, kind.as_str())
    }

    /// The offer subjects matching a pool's dispatch filter (`{p}.task.…` → `{p}.offer.…`);
    /// `None` for a filter outside the dispatch subjects.
    pub fn offers_for(&self, task_filter: &str) -> Option<String> {
        let rest = task_filter
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".task.")?;
        Some(format!("{}.offer.{rest}", self.prefix))
    }

    /// `{p}.claim.{session}`: an executor claims an attempt before running it (request/reply).
    pub fn claim(&self, session: &str) -> String {
        format!("{}.claim.{session}", self.prefix)
    }

    /// `{p}.claim.*`: what the daemon serves for claims.
    pub fn claims(&self) -> String {
        format!("{}.claim.*", self.prefix)
    }

    /// `{p}.heartbeat.{session}`: the executor of a claimed attempt is alive (request/reply).
    pub fn heartbeat(&self, session: &str) -> String {
        format!("{}.heartbeat.{session}", self.prefix)
    }

    /// `{p}.heartbeat.*`: what the daemon serves for heartbeats.
    pub fn heartbeats(&self) -> String {
        format!("{}.heartbeat.*", self.prefix)
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

    /// `{p}.dead.report.{session}`: a report that could not be processed, kept with its reason.
    pub fn dead_report(&self, session: &str) -> String {
        format!("{}.dead.report.{session}", self.prefix)
    }

    /// `{p}.dead.>`: the dead-letter stream's subjects.
    pub fn dead(&self) -> String {
        format!("{}.dead.>", self.prefix)
    }

    /// `{p}.errors`: bad input that had no one to reply to.
    pub fn errors(&self) -> String {
        format!("{}.errors", self.prefix)
    }

    /// `{p}.admin.quarantined`: the operator's request for the sessions each instance
    /// quarantined (or to release one). Every instance answers, for itself.
    pub fn admin_quarantined(&self) -> String {
        format!("{}.admin.quarantined", self.prefix)
    }

    /// `{p}.admin.ownership`: the operator's request for the partitions each instance serves,
    /// and what sessions cost it (loads, lost races, forwarded requests). Every instance answers.
    pub fn admin_ownership(&self) -> String {
        format!("{}.admin.ownership", self.prefix)
    }

    /// `{p}.report.{{partition(n,1)}}.{{wildcard(1)}}`: where the report stream's subject
    /// transform files `{p}.report.{session}` (nats-server computes the partition).
    pub fn report_transform_destination(&self, partitions: u32) -> String {
        format!(
            "{}.report.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}",
            self.prefix
        )
    }

    /// `{p}.report.{partition}.*`: the reports of one partition, as the stream stores them.
    pub fn partition_reports(&self, partition: u32) -> String {
        format!("{}.report.{partition}.*", self.prefix)
    }

    /// The session of a stored report: `{p}.report.{session}` as published (and stored before
    /// partitioning), or `{p}.report.{partition}.{session}` as the transform stores it.
    pub fn report_session<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".report.")?;
        match rest.split_once('.') {
            Some((partition, session)) if partition.bytes().all(|b| b.is_ascii_digit()) => {
                (!session.contains('.')).then_some(session)
            }
            Some(_) => None,
            None => Some(rest),
        }
    }

    /// `{p}.fwd.{instance}.{subject}`: a request for a session `instance` owns, forwarded to it
    /// by the instance that received it (with the client's reply subject).
    pub fn forward(&self, instance: &str, subject: &str) -> String {
        format!("{}.fwd.{instance}.{subject}", self.prefix)
    }

    /// `{p}.fwd.{instance}.>`: what `instance` receives forwarded.
    pub fn forwarded(&self, instance: &str) -> String {
        format!("{}.fwd.{instance}.>", self.prefix)
    }

    /// The subject a forwarded request was first sent to.
    pub fn unforward<'a>(&self, instance: &str, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".fwd.")?
            .strip_prefix(instance)?
            .strip_prefix('.')
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

/// A request on `{p}.admin.quarantined`. Empty (`{}`) lists; with `release`, lifts that
/// session's quarantine first (after an operator repaired its log), so that the next recovery
/// pass loads it again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuarantineRequest {
    /// The session whose quarantine to lift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// One instance's reply on `{p}.admin.quarantined`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum QuarantineReply {
    /// The sessions this instance holds quarantined (after the release, if one was asked).
    Ok {
        /// The instance that answers (its micro-service id, as `$SRV.INFO` shows it).
        instance: String,
        /// For a release: whether this instance held the session quarantined.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        released: Option<bool>,
        /// Its quarantined sessions, by session id.
        sessions: Vec<QuarantinedSession>,
    },
    /// The request could not be read.
    Error(ErrorBody),
}

/// One instance's reply on `{p}.admin.ownership` (an operator's view; not part of the client
/// protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipReply {
    /// The instance that answers (its name in the lease bucket).
    pub instance: String,
    /// Whether sessions are routed to their owners (`ownership.enabled`).
    pub enabled: bool,
    /// The partitions it serves.
    pub partitions: Vec<u32>,
    /// Of how many (`ownership.partitions`).
    pub of: u32,
    /// Sessions it loaded from the store since it started.
    pub loads: u64,
    /// Appends it lost to another instance (each costs a reload).
    pub conflicts: u64,
    /// Requests it forwarded to the owner of their session.
    pub forwarded: u64,
}

/// A session whose log could not be loaded: recovery skips it until its log changes or an
/// operator releases it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QuarantinedSession {
    /// The session id.
    pub session: String,
    /// Why its log could not be loaded.
    pub reason: String,
    /// When this instance first quarantined it (ms since the Unix epoch).
    pub since: Timestamp,
}

/// A command a client may send on `{p}.cmd.{session}`: what users, UIs and upstream agents
/// legitimately ask of a session.
///
/// It is not the core's [`Command`]: executor reports, ticks and compaction are the planner's
/// own business (reports arrive on the executors' report subjects, ticks come from the daemon's
/// timers, summaries from its LLM), so a client cannot forge a result or move the clock. There
/// is no `now` either: the planner stamps every command with its own clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientCommand {
    /// A request from the user. The first one starts the session; later ones are follow-ups
    /// whose tasks run after the current ones, with the conversation so far as context.
    Initialize {
        /// An id the client chose for this request: a second `initialize` with an id the session
        /// has already seen is a retry and changes nothing. At most 128 characters.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// The request in plain text; with no `plan`, the planner plans it.
        input: String,
        /// Files or URLs that come with the request; every task of the request gets them.
        #[serde(default)]
        attachments: Vec<Attachment>,
        /// A ready-made plan (from an LLM or a caller), used instead of the planner's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plan: Option<PlanSpec>,
        /// How `plan` was made, recorded with the tasks so that a UI can show it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        planning: Option<Planning>,
    },
    /// A human's answer to a question the planner asked.
    AnswerClarification {
        /// The task that asked.
        task_id: TaskId,
        /// The answer.
        answer: String,
    },
    /// Cancel one task (with everything that depends on it) or the whole plan.
    Cancel {
        /// What to cancel.
        target: CancelTarget,
        /// Why, for the record.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Dispatch whatever is ready (a no-op unless something is).
    Continue,
}

/// Command types of the core that clients may not send, and where that input comes from
/// instead: the refusal names it.
const PLANNER_ONLY: [(&str, &str); 4] = [
    (
        "handle_executor_event",
        "executors report on <prefix>.result.<session> (request/reply) or <prefix>.report.<session> (JetStream)",
    ),
    ("tick", "the planner keeps its own clock"),
    (
        "compact_context",
        "the planner compacts the context itself, with its configured LLM if any",
    ),
    (
        "revise",
        "the planner revises a failed plan itself, with its configured LLM if any",
    ),
];

impl ClientCommand {
    /// The stable snake_case name of the command, as on the wire.
    pub fn command_type(&self) -> &'static str {
        match self {
            ClientCommand::Initialize { .. } => "initialize",
            ClientCommand::AnswerClarification { .. } => "answer_clarification",
            ClientCommand::Cancel { .. } => "cancel",
            ClientCommand::Continue => "continue",
        }
    }

    /// Decodes a command request, telling a planner-only command (a typed `forbidden`) from
    /// input that is not a command at all (`malformed`).
    pub fn decode(payload: &[u8]) -> Result<ClientCommand, ErrorBody> {
        serde_json::from_slice(payload).map_err(|error| {
            #[derive(Deserialize)]
            struct Tagged {
                #[serde(rename = "type")]
                kind: String,
            }
            let forbidden = serde_json::from_slice::<Tagged>(payload)
                .ok()
                .and_then(|t| PLANNER_ONLY.iter().find(|(kind, _)| *kind == t.kind));
            match forbidden {
                Some((kind, instead)) => ErrorBody::new(
                    ErrorKind::Forbidden,
                    format!("{kind} is not a client command: {instead}"),
                ),
                None => ErrorBody::new(ErrorKind::Malformed, format!("not a command: {error}")),
            }
        })
    }

    /// The core command it stands for, at `now`.
    pub fn into_command(self, now: Timestamp) -> Command {
        match self {
            ClientCommand::Initialize {
                request_id,
                input,
                attachments,
                plan,
                planning,
            } => Command::Initialize {
                request_id,
                input,
                attachments,
                plan,
                planning,
                now,
            },
            ClientCommand::AnswerClarification { task_id, answer } => {
                Command::AnswerClarification {
                    task_id,
                    answer,
                    now,
                }
            }
            ClientCommand::Cancel { target, reason } => Command::Cancel {
                target,
                reason,
                now,
            },
            ClientCommand::Continue => Command::Continue,
        }
    }
}

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

/// Why input was refused, as a stable snake_case kind on the wire.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON, or not a known message.
    Malformed,
    /// Over a size limit.
    TooLarge,
    /// The session id is not a valid subject token.
    BadSession,
    /// A message this sender may not send (a planner-only command on the command subject).
    Forbidden,
    /// The planner refused it: unknown task, empty request, invalid plan, plan ended, ...
    Rejected,
    /// The session's stored log cannot be read: an operator must look; retrying cannot help.
    Corrupt,
    /// Other instances kept changing the session: retry.
    Conflict,
    /// The store failed: retry later.
    Unavailable,
    /// The instance is handling as many requests as it admits: retry shortly.
    Busy,
}

impl ErrorKind {
    /// The kind as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Malformed => "malformed",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::BadSession => "bad_session",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Busy => "busy",
        }
    }

    /// Whether the refusal may pass (the store down, a lost race, an instance at its request
    /// limit): nothing was applied, and the same message sent again later can succeed.
    pub fn may_pass(self) -> bool {
        match self {
            ErrorKind::Conflict | ErrorKind::Unavailable | ErrorKind::Busy => true,
            ErrorKind::Malformed
            | ErrorKind::TooLarge
            | ErrorKind::BadSession
            | ErrorKind::Forbidden
            | ErrorKind::Rejected
            | ErrorKind::Corrupt => false,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was refused.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
pub struct ErrorBody {
    /// What kind of refusal; says whether a retry can help.
    pub kind: ErrorKind,
    /// What went wrong, for people.
    pub message: String,
}

impl ErrorBody {
    /// A refusal of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody {
            kind,
            message: message.into(),
        }
    }
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

/// An executor's report on `{p}.result.{session}` (request/reply) or `{p}.report.{session}`
/// (JetStream): what happened to an attempt, with the lease of the executor's claim.
// Read by `decode.rs`, not by a derived `Deserialize` (see there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct ReportMessage {
    /// The report.
    #[serde(flatten)]
    pub event: planner_core::ExecutorEvent,
    /// The lease the claim returned; required once the attempt was claimed (and always when
    /// the planner requires claims).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Optional, and heeded only on `{p}.result.{session}`: the executor runs another task of
    /// this session in the slot the report frees. If the report makes a task ready that the
    /// executor serves, the planner claims it for the executor in the same write as the
    /// report's events and hands it over in the reply ([`ReportReply::Ok`]'s `next`) instead
    /// of offering it or publishing it to the dispatch stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<NextRequest>,
}

/// A `next` that does not parse reads as none: it is a request on the side of a report, and a
/// report refused for it would be dropped by its executor, its result lost with it.
fn lenient_next_value(value: serde_json::Value) -> Option<NextRequest> {
    if value.is_null() {
        return None;
    }
    match NextRequest::deserialize(value) {
        Ok(next) => Some(next),
        Err(error) => {
            tracing::warn!(%error, "a report's `next` does not parse; ignored, the report is applied");
            None
        }
    }
}

/// What an executor asks for with a report: the session's next task, claimed for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NextRequest {
    /// The dispatch subjects the executor serves, as NATS subject filters (`planner.task.>`,
    /// `planner.task.tool_call.web_search`, `planner.task.*.search`; at most
    /// [`NextRequest::MAX_SERVES`]): only a task whose dispatch subject one of them matches is
    /// handed over.
    pub serves: Vec<String>,
    /// The claim id, and so the lease, of the task handed over: as [`ClaimRequest`]'s
    /// `claim_id` (16 to 64 letters, digits, `_` or `-`), new for each report. A `next` with
    /// a malformed one is ignored (the report is applied all the same).
    pub claim_id: String,
    /// Optional: the `context_ref` of the session's context the executor holds; the reply
    /// carries the context unless it is that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_ref: Option<String>,
}

impl NextRequest {
    /// Most filters one request may name.
    pub const MAX_SERVES: usize = 64;

    /// Whether a dispatch on `subject` is one the executor serves.
    pub fn serves(&self, subject: &str) -> bool {
        self.serves
            .iter()
            .any(|filter| subject_matches(filter, subject))
    }

    /// Why this request cannot be granted, if it cannot.
    pub fn problem(&self, subjects: &Subjects) -> Option<String> {
        let claim = ClaimRequest {
            task_id: TaskId::from("next"),
            attempt: 1,
            claim_id: Some(self.claim_id.clone()),
            context_ref: None,
        };
        if let Some(problem) = claim.claim_id_problem() {
            return Some(problem);
        }
        let dispatches = format!("{}.task.", subjects.prefix);
        if self.serves.is_empty() || self.serves.len() > Self::MAX_SERVES {
            return Some(format!(
                "serves must name 1 to {} subject filters, not {}",
                Self::MAX_SERVES,
                self.serves.len()
            ));
        }
        if let Some(other) = self.serves.iter().find(|f| !f.starts_with(&dispatches)) {
            return Some(format!(
                "serves must be filters of dispatch subjects ({dispatches}…), not {other:?}"
            ));
        }
        None
    }
}

/// A task handed over in the reply to a report ([`NextRequest`]): claimed for the executor,
/// to run at once in the slot the report freed, as a granted claim's attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NextTask {
    /// The dispatch, as the stream would have carried it (a large context left out, as
    /// there: see `context`).
    pub task: TaskMessage,
    /// The lease: the request's claim id.
    pub lease: String,
    /// How often to heartbeat; absent when the planner times out no silent attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// The attempt's context, unless the request named it (`context_ref`) as the one the
    /// executor holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<planner_core::DispatchContext>,
}

/// Whether a NATS subject matches a filter (`*` one token, a last `>` one or more).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    let mut filter_tokens = filter.split('.').peekable();
    while let Some(wanted) = filter_tokens.next() {
        if wanted == ">" && filter_tokens.peek().is_none() {
            return subject_tokens.next().is_some();
        }
        match subject_tokens.next() {
            Some(token) if wanted == "*" || wanted == token => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// The reply to a report sent directly on `{p}.result.{session}` (the body is a
/// [`ReportMessage`], as on the report stream).
// Read by `decode.rs`, not by a derived `Deserialize` (see there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReportReply {
    /// Done: the events the report caused are persisted (or it changed nothing: a duplicate,
    /// or a report on an attempt that already ended). Do not publish it to the stream.
    Ok {
        /// The task handed over, when the report asked for one ([`ReportMessage`]'s `next`)
        /// and made one ready that the executor serves: run it now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<Box<NextTask>>,
    },
    /// Refused: it would be refused again (malformed, too large, an unknown task, a wrong
    /// lease, ...). Nothing changed; do not send it again, by either path. A notice went to
    /// `{p}.errors` too.
    Refused(ErrorBody),
    /// Not handled now (the store down, a lost race, the instance at its limit): publish the
    /// report to the stream, `{p}.report.{session}`, as without the direct path.
    Retry(ErrorBody),
}

/// A claim on `{p}.claim.{session}`: the executor asks to run an attempt it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The task.
    pub task_id: TaskId,
    /// The attempt, as dispatched.
    pub attempt: u32,
    /// Optional: an id the executor makes for this claim (e.g. a UUID, 16 to 64 letters,
    /// digits, `_` or `-`) and sends again when it retries the request after a lost reply. The
    /// same id is granted again, with the same lease; without it a retried claim is refused as
    /// `claimed_by_another` and the attempt waits for its heartbeat timeout. Never derive it
    /// from the message (its stream sequence, say): a redelivery to another executor must not
    /// pass as the same claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_id: Option<String>,
    /// Optional: the `context_ref` of the context this executor already holds for the task
    /// (the dispatch's, when the dispatch carried its context or the executor kept it from an
    /// earlier task of the session). The grant carries the context unless it is that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_ref: Option<String>,
}

impl ClaimRequest {
    /// Shortest claim id accepted: short ones are too easy to collide or guess.
    pub const MIN_CLAIM_ID: usize = 16;
    /// Longest claim id accepted.
    pub const MAX_CLAIM_ID: usize = 64;

    /// Why `claim_id` cannot be a lease token, if it cannot.
    pub fn claim_id_problem(&self) -> Option<String> {
        let id = self.claim_id.as_deref()?;
        let length = id.chars().count();
        if !(Self::MIN_CLAIM_ID..=Self::MAX_CLAIM_ID).contains(&length)
            || !planner_core::is_valid_token(id)
        {
            return Some(format!(
                "claim_id must be {} to {} letters, digits, `_` or `-`",
                Self::MIN_CLAIM_ID,
                Self::MAX_CLAIM_ID
            ));
        }
        None
    }
}

/// A heartbeat on `{p}.heartbeat.{session}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The task.
    pub task_id: TaskId,
    /// The attempt.
    pub attempt: u32,
    /// The lease the claim returned.
    pub lease: String,
}

/// The reply to a claim or a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum LeaseReply {
    /// The claim is granted: run the attempt, heartbeat every `heartbeat_interval_ms` (when
    /// set) and report with `lease`.
    Granted {
        /// The lease token for heartbeats and the report.
        lease: String,
        /// How often to heartbeat; absent when the planner times out no silent attempt.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_interval_ms: Option<u64>,
        /// The attempt's context, as of the grant, unless the claim named it (`context_ref`)
        /// as the one the executor holds. A dispatch leaves out a large context: this is
        /// where the executor gets it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<planner_core::DispatchContext>,
    },
    /// The heartbeat is recorded: go on.
    Alive,
    /// Not yours to run (any more): do not start, or stop now, and send no report.
    Stop {
        /// Why: `cancelled`, `superseded`, `not_running`, `claimed_by_another`, `not_claimed`,
        /// `lease_mismatch`.
        reason: planner_core::FenceReason,
        /// For people.
        message: String,
    },
    /// The request could not be handled; `kind` says whether to retry.
    Error(ErrorBody),
}

/// An executor's answer to an offer (`{p}.offer.{kind}.{target}`, a request whose body is
/// the dispatch, [`TaskMessage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "offer", rename_all = "snake_case")]
pub enum OfferReply {
    /// The executor claimed the attempt and holds its lease: nothing more to send.
    Taken,
    /// The claim was answered `stop`: the attempt is not to run, anywhere.
    Stopped,
    /// The executor did not take it (no free slot, the claim not answered): the planner
    /// publishes the dispatch to the stream.
    Declined,
}

/// A dispatch on `{p}.task.{kind}.{target}`.
// Read by `decode.rs`, not by a derived `Deserialize` (see there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct TaskMessage {
    /// The session: report back on `{p}.result.{session}` or `{p}.report.{session}`.
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
        ("command.json", json(schemars::schema_for!(ClientCommand))),
        (
            "command_reply.json",
            json(schemars::schema_for!(CommandReply)),
        ),
        (
            "executor_report.json",
            json(schemars::schema_for!(ReportMessage)),
        ),
        (
            "report_reply.json",
            json(schemars::schema_for!(ReportReply)),
        ),
        (
            "claim_request.json",
            json(schemars::schema_for!(ClaimRequest)),
        ),
        (
            "heartbeat_request.json",
            json(schemars::schema_for!(HeartbeatRequest)),
        ),
        ("lease_reply.json", json(schemars::schema_for!(LeaseReply))),
        (
            "task_message.json",
            json(schemars::schema_for!(TaskMessage)),
        ),
        ("offer_reply.json", json(schemars::schema_for!(OfferReply))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_matches_a_filter_as_nats_matches_it() {
        let task = "planner.task.tool_call.web_search";
        for filter in [
            "planner.task.>",
            "planner.>",
            "planner.task.tool_call.web_search",
            "planner.task.*.web_search",
            "planner.task.tool_call.*",
            "*.task.*.*",
        ] {
            assert!(subject_matches(filter, task), "{filter}");
        }
        for filter in [
            "planner.task.processing.>",
            "planner.task.tool_call",
            "planner.task.tool_call.web_search.more",
            "planner.task.*",
            "planner.task.tool_call.web_search.>",
            "other.task.>",
            "planner.task.>.web_search",
            "",
        ] {
            assert!(!subject_matches(filter, task), "{filter}");
        }
    }

    #[test]
    fn a_next_request_must_name_dispatch_subjects_and_a_claim_id_fit_for_a_lease() {
        let subjects = Subjects::new("planner");
        let next = |serves: &str, claim_id: &str| NextRequest {
            serves: vec![serves.into()],
            claim_id: claim_id.into(),
            context_ref: None,
        };
        assert_eq!(
            next("planner.task.>", "0123456789abcdef").problem(&subjects),
            None
        );
        assert!(next("planner.task.>", "short")
            .problem(&subjects)
            .is_some_and(|p| p.contains("claim_id")));
        assert!(next("planner.task.>", "not a token at all!")
            .problem(&subjects)
            .is_some());
        assert!(next("planner.report.>", "0123456789abcdef")
            .problem(&subjects)
            .is_some_and(|p| p.contains("serves")));
        assert!(next(">", "0123456789abcdef").problem(&subjects).is_some());
        let none = NextRequest {
            serves: vec![],
            ..next("planner.task.>", "0123456789abcdef")
        };
        assert!(none.problem(&subjects).is_some());
        let several = NextRequest {
            serves: vec![
                "planner.task.tool_call.search".into(),
                "planner.task.processing.*".into(),
            ],
            ..next("planner.task.>", "0123456789abcdef")
        };
        assert_eq!(several.problem(&subjects), None);
        assert!(several.serves("planner.task.processing.summarize"));
        assert!(several.serves("planner.task.tool_call.search"));
        assert!(!several.serves("planner.task.tool_call.fetch"));
    }

    #[test]
    fn a_report_reply_without_a_next_task_is_the_ok_of_before() {
        let ok = ReportReply::Ok { next: None };
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            serde_json::json!({"status": "ok"})
        );
        let read: ReportReply = serde_json::from_str(r#"{"status":"ok"}"#).unwrap();
        assert_eq!(read, ok);
    }
}
