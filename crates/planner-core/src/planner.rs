//! The planner: `process` decides, `apply` records, `fold` rebuilds.
//!
//! # The driver's contract
//!
//! After every `process`, persist the returned events (in order, atomically), then publish the
//! [`PlannerCmd`](crate::PlannerCmd)s they carry ([`Event::planner_cmd`]). Arrange for a
//! [`Command::Tick`] at [`Planner::next_deadline`]; a tick that comes early or twice does nothing.
//!
//! # How reports are judged
//!
//! Executors deliver at least once and in any order, so reports that do not fit are sorted by
//! what they mean, and never corrupt the state:
//!
//! | report | result |
//! |---|---|
//! | unknown task | `Err(UnknownTask)` |
//! | attempt never dispatched (0, or above the latest) | `Err(UnknownAttempt)` |
//! | on a clarification task | `Err(NotExecutable)` |
//! | older attempt than the latest (stale) | `Ok([])`: superseded, ignored |
//! | latest attempt, already reported final (duplicate, or completed after failed) | `Ok([])`: the first final word stands |
//! | latest attempt after it asked a question, or while its retry waits | `Ok([])`: the attempt ended when it asked or failed |
//! | `started` twice | `Ok([])` |
//! | on a cancelled task (by a client, or when the plan around it ended) | `Ok([])`: ignored |
//! | plan ended: any report on a finished attempt (late, redelivered, contradicting) | `Ok([])`: dropped quietly |

use crate::command::Command;
use crate::config::PlannerConfig;
use crate::error::{ConfigError, Error};
use crate::event::{Dispatch, DispatchContext, Event, TaskAssignment, TaskOutput};
use crate::handler::Handler;
use crate::state::{PlanPhase, PlannerState};
use crate::types::{NodeKind, TaskId, Timestamp};

// This file holds the `Planner` API and `Decision::decide`, which sends each command to the
// concern that decides it. Each concern is a file of its own under `planner/`, holding its part
// of `impl Decision`.
mod budget;
mod cancel;
mod clarify;
mod compaction;
mod failure;
mod lease;
mod report;
mod request;
mod schedule;

/// The longest client request id accepted, in characters.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// An event-sourced planner for one session.
///
/// ```
/// use planner_core::{Command, Planner, Timestamp};
///
/// let mut planner = Planner::new();
/// let events = planner
///     .process(Command::Initialize {
///         request_id: None,
///         planning: None,
///         input: "1. search for flights\n2. summarize the options".into(),
///         attachments: vec![],
///         plan: None,
///         now: Timestamp(0),
///     })
///     .unwrap();
/// assert_eq!(planner.state().tasks.len(), 2);
/// // Rebuilding from the events gives the same planner.
/// assert_eq!(Planner::fold(&events).state(), planner.state());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Planner {
    state: PlannerState,
    log: Vec<Event>,
}

impl Planner {
    /// A planner with the default config.
    pub fn new() -> Self {
        Planner::default()
    }

    /// A planner with `config`, checked first.
    pub fn with_config(config: PlannerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Planner {
            state: PlannerState::with_config(config),
            log: Vec::new(),
        })
    }

    /// A planner resumed from a snapshot of its state; apply the events after it to catch up.
    /// The state's derived indexes (not serialized) are rebuilt here.
    pub fn from_state(mut state: PlannerState) -> Self {
        state.rebuild_indexes();
        Planner {
            state,
            log: Vec::new(),
        }
    }

    /// What the planner knows.
    pub fn state(&self) -> &PlannerState {
        &self.state
    }

    /// The timeouts that apply to the attempts of task `id` (its own, its target's, its
    /// kind's or the session's), so a shell can tell an executor how often to heartbeat.
    pub fn attempt_timeouts(&self, id: &TaskId) -> Option<crate::plan::TaskTimeouts> {
        let task = self.state.task(id)?;
        Some(lease::timeouts(&self.state, task))
    }

    /// How many events the state has applied: the session's version.
    pub fn version(&self) -> u64 {
        self.state.version
    }

    /// Rebuilds a planner from a session's events.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        let mut planner = Planner::new();
        for event in events {
            planner.apply(event);
        }
        planner
    }

    /// Applies one recorded event (replay). Never fails, never decides anything.
    pub fn apply(&mut self, event: &Event) {
        self.state.apply(event);
    }

    /// Events emitted by `process` since the log was last drained, for audit.
    pub fn log(&self) -> &[Event] {
        &self.log
    }

    /// Takes the events emitted since the last drain.
    pub fn drain_log(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.log)
    }

    /// The full assignment an executor gets for `dispatch`, rendered from the state: what a shell
    /// publishes for an `execute_tool` or `run_processing` command. `None` if the task is unknown.
    ///
    /// Everything in it but the context summary is fixed once the task is dispatched, so a
    /// re-publish after a crash sends the same assignment; the summary is the latest.
    pub fn assignment(&self, dispatch: &Dispatch) -> Option<TaskAssignment> {
        let state = &self.state;
        let task = state.task(&dispatch.task_id)?;
        let inputs = task
            .dependencies
            .iter()
            .filter_map(|d| state.task(d))
            .map(|d| TaskOutput {
                task_id: d.id.clone(),
                output: d.output.clone().unwrap_or_default(),
            })
            .collect();
        let context = self.dispatch_context(&dispatch.task_id)?;
        Some(TaskAssignment {
            task_id: task.id.clone(),
            attempt: dispatch.attempt,
            kind: task.kind,
            target: task.target.clone(),
            description: task.description.clone(),
            attachments: task.attachments.clone(),
            inputs,
            answer: task.answer.clone(),
            context_ref: context.reference(),
            context: Some(context),
        })
    }

    /// The context a task's executor is handed, as of now: the request the task serves, the
    /// session's latest summary, the system prompt (processing steps) and the profile. `None`
    /// for an unknown task.
    #[must_use]
    pub fn dispatch_context(&self, task_id: &TaskId) -> Option<DispatchContext> {
        let state = &self.state;
        let task = state.task(task_id)?;
        let config = &state.config;
        let system_prompt = (task.kind == NodeKind::Processing && !config.system_prompt.is_empty())
            .then(|| config.system_prompt.clone());
        Some(DispatchContext {
            request: state
                .requests
                .get(task.turn as usize)
                .cloned()
                .unwrap_or_default(),
            summary: state.context.summary.clone(),
            system_prompt,
            profile: config.profile,
        })
    }

    /// When the planner next needs a [`Command::Tick`]: the earliest retry backoff, question
    /// deadline or wall-time limit. `None` when nothing is timed.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Timestamp> {
        let s = &self.state;
        if s.phase != PlanPhase::Running {
            return None;
        }
        let retry = s.delayed().first().map(|(at, _)| *at);
        let question = s.awaiting_answer.values().filter_map(|q| q.deadline).min();
        let wall = s
            .config
            .budgets
            .max_wall_time_ms
            .zip(s.started_at)
            .map(|(limit, start)| start.plus_millis(limit));
        let attempt = lease::next_attempt_deadline(s);
        [retry, question, wall, attempt].into_iter().flatten().min()
    }

    /// Decides what `command` means, applies the resulting events and returns them.
    ///
    /// On `Err` nothing changed: every check happens before the first event is emitted.
    pub fn process(&mut self, command: Command) -> Result<Vec<Event>, Error> {
        let mut decision = Decision {
            state: &mut self.state,
            events: Vec::new(),
        };
        decision.decide(command)?;
        let events = decision.events;
        self.log.extend(events.iter().cloned());
        Ok(events)
    }
}

impl Handler for Planner {
    type Command = Command;
    type Event = Event;
    type Error = Error;

    fn process(&mut self, command: Command) -> Result<Vec<Event>, Error> {
        Planner::process(self, command)
    }

    fn fold<'a, I>(events: I) -> Self
    where
        I: IntoIterator<Item = &'a Event>,
    {
        Planner::fold(events)
    }
}

/// One `process` call in progress: every emitted event is applied at once, so later decisions
/// in the same call see the earlier ones.
struct Decision<'a> {
    state: &'a mut PlannerState,
    events: Vec<Event>,
}

impl Decision<'_> {
    /// Sends `command` to the concern that decides it.
    ///
    /// **Invariant: a refused command leaves no event.** Each handler validates everything
    /// before its first [`emit`](Self::emit), and nothing returns `Err` after it: since `emit`
    /// applies the event at once, a refusal after an emit would leave the state changed. Where a
    /// handler's checks are long they are a `&self` method returning `Result` (`judge` for
    /// reports, `check_request` and `plan_request` for requests), so the type shows that they
    /// emit nothing; what follows them returns no `Result` and so cannot refuse.
    fn decide(&mut self, command: Command) -> Result<(), Error> {
        match command {
            Command::Initialize {
                request_id,
                input,
                attachments,
                plan,
                planning,
                now,
            } => self.request(request_id, input, attachments, plan, planning, self.at(now)),
            Command::Revise {
                failed,
                input,
                plan,
                note,
                now,
            } => {
                self.require_started()?;
                self.revise(failed, input, plan, note, self.at(now))
            }
            Command::HandleExecutorEvent { event, lease, now } => {
                self.require_started()?;
                self.executor_event(event, lease, self.at(now))
            }
            Command::ClaimAttempt {
                task_id,
                attempt,
                lease,
                now,
            } => {
                self.require_started()?;
                self.claim(task_id, attempt, lease, self.at(now))
            }
            Command::Heartbeat {
                task_id,
                attempt,
                lease,
                now,
            } => {
                self.require_started()?;
                self.heartbeat(task_id, attempt, lease, self.at(now))
            }
            Command::AbandonAttempt {
                task_id,
                attempt,
                error,
                retryable,
                now,
            } => {
                self.require_started()?;
                self.abandon(task_id, attempt, error, retryable, self.at(now))
            }
            Command::ExtendLeases { now } => {
                self.extend_leases(self.at(now));
                Ok(())
            }
            Command::AnswerClarification {
                task_id,
                answer,
                now,
            } => {
                self.require_started()?;
                self.answer(task_id, answer, self.at(now))
            }
            Command::Continue => {
                self.require_started()?;
                let now = self.state.clock;
                self.settle(now);
                Ok(())
            }
            Command::Tick { now } => {
                self.tick(self.at(now));
                Ok(())
            }
            Command::CompactContext {
                summary,
                through,
                now,
            } => {
                self.require_started()?;
                self.compact_now(summary, through, self.at(now))
            }
            Command::Cancel {
                target,
                reason,
                now,
            } => {
                self.require_started()?;
                self.cancel(target, reason, self.at(now))
            }
        }
    }

    /// Applies `event` to the state and records it: the only way a decision changes anything.
    fn emit(&mut self, event: Event) {
        self.state.apply(&event);
        self.events.push(event);
    }

    /// The timers' turn, in order: the wall-time budget, question deadlines, then retries whose
    /// backoff ended (`settle` dispatches them with whatever else is ready). Never refuses; a
    /// tick with nothing due does nothing.
    fn tick(&mut self, now: Timestamp) {
        if self.state.phase != PlanPhase::Running || !self.check_wall_time(now) {
            return;
        }
        self.expire_questions(now);
        self.expire_attempts(now);
        self.settle(now);
    }

    /// Time never runs back: an earlier `now` than already seen counts as the latest seen.
    fn at(&self, now: Timestamp) -> Timestamp {
        now.max(self.state.clock)
    }

    fn require_started(&self) -> Result<(), Error> {
        if self.state.phase == PlanPhase::NotStarted {
            Err(Error::NotInitialized)
        } else {
            Ok(())
        }
    }

    fn require_open(&self) -> Result<(), Error> {
        if self.state.phase.is_terminal() {
            Err(Error::PlanFinished {
                phase: self.state.phase.clone(),
            })
        } else {
            Ok(())
        }
    }
}
