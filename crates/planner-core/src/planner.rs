//! The planner: `process` decides, `apply` records, `fold` rebuilds.
//!
//! # The driver's contract
//!
//! After every `process`, persist the returned events (in order, atomically), then publish the
//! [`PlannerCmd`]s they carry ([`Event::planner_cmd`]). Arrange for a [`Command::Tick`] at
//! [`Planner::next_deadline`]; a tick that comes early or twice does nothing.
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
//! | plan ended, and the report is not a duplicate of a recorded outcome | `Err(PlanFinished)` |

use std::collections::BTreeSet;

use crate::command::{CancelTarget, Command, ExecutorEvent, ExecutorOutcome};
use crate::compact::{compact_error_message, compact_thread, message_tokens, summarize_messages};
use crate::compact::{estimate_tokens, MESSAGE_OVERHEAD_TOKENS};
use crate::config::{BudgetKind, FailurePolicy, OnClarificationTimeout, PlannerConfig};
use crate::error::{ConfigError, Error};
use crate::event::{
    Dispatch, DispatchContext, Event, FailureReason, PlanSource, PlannerCmd, TaskAssignment,
    TaskOutput,
};
use crate::handler::Handler;
use crate::parse::parse_input_from;
use crate::plan::{validate_plan, PlanSpec};
use crate::state::{PlanPhase, PlannerState};
use crate::types::{Message, NodeKind, Role, TaskId, TaskStatus, Timestamp};

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
        let config = &state.config;
        let system_prompt = (task.kind == NodeKind::Processing && !config.system_prompt.is_empty())
            .then(|| config.system_prompt.clone());
        Some(TaskAssignment {
            task_id: task.id.clone(),
            attempt: dispatch.attempt,
            kind: task.kind,
            target: task.target.clone(),
            description: task.description.clone(),
            attachments: task.attachments.clone(),
            inputs,
            answer: task.answer.clone(),
            context: DispatchContext {
                request: state
                    .requests
                    .get(task.turn as usize)
                    .cloned()
                    .unwrap_or_default(),
                summary: state.context.summary.clone(),
                system_prompt,
                profile: config.profile,
            },
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
        [retry, question, wall].into_iter().flatten().min()
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
    fn emit(&mut self, event: Event) {
        self.state.apply(&event);
        self.events.push(event);
    }

    fn decide(&mut self, command: Command) -> Result<(), Error> {
        match command {
            Command::Initialize {
                request_id,
                input,
                attachments,
                plan,
                planning,
                now,
            } => {
                if let Some(id) = &request_id {
                    let chars = id.chars().count();
                    if chars > MAX_REQUEST_ID_CHARS {
                        return Err(Error::InputTooLarge {
                            chars,
                            limit: MAX_REQUEST_ID_CHARS,
                        });
                    }
                    if self.state.request_ids.contains(id) {
                        return Ok(());
                    }
                }
                self.initialize(request_id, input, attachments, plan, planning, self.at(now))
            }
            Command::HandleExecutorEvent { event, now } => {
                self.require_started()?;
                self.executor_event(event, self.at(now))
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
            Command::CompactContext { summary, now } => {
                self.require_started()?;
                self.compact_now(summary, self.at(now))
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

    // ----- requests -----

    fn initialize(
        &mut self,
        request_id: Option<String>,
        input: String,
        attachments: Vec<crate::types::Attachment>,
        plan: Option<PlanSpec>,
        planning: Option<crate::command::Planning>,
        now: Timestamp,
    ) -> Result<(), Error> {
        let config = &self.state.config;
        let chars = input.chars().count();
        if chars > config.max_input_chars {
            return Err(Error::InputTooLarge {
                chars,
                limit: config.max_input_chars,
            });
        }
        let claimed = planning.as_ref().map(|p| p.source);
        let note = planning.and_then(|p| p.note);
        let (source, mut plan) = match plan {
            Some(plan) => {
                let source = if claimed == Some(PlanSource::Llm) {
                    PlanSource::Llm
                } else {
                    PlanSource::Supplied
                };
                (source, plan)
            }
            None => {
                if input.trim().is_empty() {
                    return Err(Error::EmptyRequest);
                }
                let parsed = parse_input_from(&input, self.state.next_task_number.max(1));
                if parsed.tasks.is_empty() {
                    return Err(Error::EmptyRequest);
                }
                let source = if claimed == Some(PlanSource::RulesFallback) {
                    PlanSource::RulesFallback
                } else {
                    PlanSource::Rules
                };
                (source, parsed)
            }
        };
        let state = &*self.state;
        validate_plan(
            &plan,
            |id| state.index_of(id).is_some(),
            state.config.max_plan_tasks,
        )?;

        // A follow-up runs after what is still unfinished: its first tasks wait for all of it.
        let unfinished: Vec<TaskId> = state.tasks[state.cursor..]
            .iter()
            .filter(|t| !t.status.is_terminal())
            .map(|t| t.id.clone())
            .collect();
        let new_ids: BTreeSet<TaskId> = plan.tasks.iter().map(|t| t.id.clone()).collect();
        for spec in &mut plan.tasks {
            if !unfinished.is_empty() && !spec.dependencies.iter().any(|d| new_ids.contains(d)) {
                spec.dependencies.extend(unfinished.iter().cloned());
            }
            if !attachments.is_empty() {
                let mut all = attachments.clone();
                all.append(&mut spec.attachments);
                spec.attachments = all;
            }
        }

        let turn = u32::try_from(self.state.requests.len()).unwrap_or(u32::MAX);
        let first_new = self.state.tasks.len();
        if self.state.phase == PlanPhase::NotStarted {
            self.emit(Event::SessionStarted {
                config: Box::new(self.state.config.clone()),
                at: now,
            });
        }
        self.emit(Event::RequestReceived {
            turn,
            request_id,
            input,
            attachments,
            at: now,
        });
        self.emit(Event::TasksPlanned {
            turn,
            source,
            note,
            tasks: plan.tasks,
        });

        // A new task may depend on one that already failed or was cancelled: it can never run,
        // so it fails or is cancelled with it, as if it had been planned earlier.
        let mut failed_root = None;
        for d in 0..first_new {
            let status = self.state.tasks[d].status;
            match status {
                TaskStatus::Failed if self.fail_dependents(d, now) => {
                    failed_root.get_or_insert(d);
                }
                TaskStatus::Cancelled => {
                    let why = format!("dependency {} was cancelled", self.state.tasks[d].id);
                    for k in self.unfinished_dependents(d) {
                        self.cancel_task(k, &why, now);
                    }
                }
                _ => {}
            }
        }
        self.auto_compact(now);
        match failed_root {
            Some(d) if self.state.config.failure == FailurePolicy::FailFast => {
                let task_id = self.state.tasks[d].id.clone();
                self.stop(FailureReason::TaskFailed { task_id }, now);
            }
            _ => self.settle(now),
        }
        Ok(())
    }

    // ----- executor reports -----

    fn executor_event(&mut self, event: ExecutorEvent, now: Timestamp) -> Result<(), Error> {
        let ExecutorEvent {
            task_id,
            attempt,
            outcome,
        } = event;
        let i = self
            .state
            .index_of(&task_id)
            .ok_or_else(|| Error::UnknownTask {
                task_id: task_id.clone(),
            })?;
        let task = &self.state.tasks[i];
        if task.kind == NodeKind::Clarification {
            return Err(Error::NotExecutable { task_id });
        }
        if attempt == 0 || attempt > task.attempts {
            return Err(Error::UnknownAttempt {
                task_id,
                attempt,
                latest: task.attempts,
            });
        }
        let duplicate_of_outcome = matches!(
            (&outcome, task.status),
            (ExecutorOutcome::Completed { .. }, TaskStatus::Completed)
                | (ExecutorOutcome::Failed { .. }, TaskStatus::Failed)
        );
        if self.state.phase.is_terminal() && !duplicate_of_outcome {
            return Err(Error::PlanFinished {
                phase: self.state.phase.clone(),
            });
        }
        if attempt < task.attempts || task.status != TaskStatus::Running {
            return Ok(());
        }
        match outcome {
            ExecutorOutcome::Started => {
                if !task.started {
                    self.emit(Event::TaskStatusUpdated {
                        task_id,
                        attempt,
                        status: TaskStatus::Running,
                        output: None,
                        error: None,
                        tokens_used: None,
                        at: now,
                    });
                }
            }
            ExecutorOutcome::Completed {
                output,
                tokens_used,
            } => {
                self.emit(Event::TaskStatusUpdated {
                    task_id,
                    attempt,
                    status: TaskStatus::Completed,
                    output: Some(output),
                    error: None,
                    tokens_used,
                    at: now,
                });
                if self.check_tokens(now) {
                    self.auto_compact(now);
                    self.settle(now);
                }
            }
            ExecutorOutcome::Failed {
                error,
                retryable,
                tokens_used,
            } => {
                let config = &self.state.config;
                let error = compact_error_message(&error, config.error_char_limit);
                let attempts_used = task.failures + 1;
                if retryable && attempts_used < config.retry.max_attempts {
                    let not_before = now.plus_millis(config.retry.backoff_ms(attempts_used));
                    self.emit(Event::RetryScheduled {
                        task_id,
                        attempt,
                        error,
                        tokens_used,
                        not_before,
                        at: now,
                    });
                    if self.check_tokens(now) {
                        self.settle(now);
                    }
                } else {
                    self.emit(Event::TaskStatusUpdated {
                        task_id,
                        attempt,
                        status: TaskStatus::Failed,
                        output: None,
                        error: Some(error),
                        tokens_used,
                        at: now,
                    });
                    if self.check_tokens(now) {
                        self.task_failed(i, now);
                    }
                }
            }
            ExecutorOutcome::NeedsClarification { question } => {
                self.ask(task_id, attempt, question, now);
                self.auto_compact(now);
                self.settle(now);
            }
        }
        Ok(())
    }

    /// After a task failed for good: its dependents fail, then the failure policy applies.
    fn task_failed(&mut self, i: usize, now: Timestamp) {
        self.fail_dependents(i, now);
        match self.state.config.failure {
            FailurePolicy::FailFast => {
                let task_id = self.state.tasks[i].id.clone();
                self.stop(FailureReason::TaskFailed { task_id }, now);
            }
            FailurePolicy::ContinueOnFailure => {
                self.auto_compact(now);
                self.settle(now);
            }
        }
    }

    /// Fails every unfinished task that depends on task `i`, directly or not, in plan order.
    /// Returns whether any was failed.
    fn fail_dependents(&mut self, i: usize, now: Timestamp) -> bool {
        let affected = self.unfinished_dependents(i);
        let cause = self.state.tasks[i].id.clone();
        let verb = if self.state.tasks[i].status == TaskStatus::Cancelled {
            "was cancelled"
        } else {
            "failed"
        };
        for &d in &affected {
            let task = &self.state.tasks[d];
            self.emit(Event::TaskStatusUpdated {
                task_id: task.id.clone(),
                attempt: task.attempts,
                status: TaskStatus::Failed,
                output: None,
                error: Some(format!("dependency {cause} {verb}")),
                tokens_used: None,
                at: now,
            });
        }
        !affected.is_empty()
    }

    /// Every unfinished task downstream of `i`, in plan order.
    fn unfinished_dependents(&self, i: usize) -> BTreeSet<usize> {
        let mut found = BTreeSet::new();
        let mut stack: Vec<usize> = self.state.dependents_of(i).to_vec();
        while let Some(d) = stack.pop() {
            if !self.state.tasks[d].status.is_terminal() && found.insert(d) {
                stack.extend_from_slice(self.state.dependents_of(d));
            }
        }
        found
    }

    // ----- clarifications -----

    /// Puts a question to the user on behalf of `task_id`: a clarification task's dispatch, or
    /// an executor asking mid-task.
    fn ask(&mut self, task_id: TaskId, attempt: u32, question: String, now: Timestamp) {
        let deadline = self.question_deadline(now);
        self.emit(Event::ClarificationRequested {
            task_id: task_id.clone(),
            attempt,
            cmd: PlannerCmd::AskUser {
                task_id,
                attempt,
                question,
                deadline,
            },
            at: now,
        });
    }

    fn question_deadline(&self, now: Timestamp) -> Option<Timestamp> {
        self.state
            .config
            .clarification
            .timeout_ms
            .map(|ms| now.plus_millis(ms))
    }

    fn answer(&mut self, task_id: TaskId, answer: String, now: Timestamp) -> Result<(), Error> {
        let i = self
            .state
            .index_of(&task_id)
            .ok_or_else(|| Error::UnknownTask {
                task_id: task_id.clone(),
            })?;
        if !self.state.awaiting_answer.contains_key(&task_id) {
            // The same answer again is a redelivery; anything else answers nothing.
            if self.state.tasks[i].answer.as_deref() == Some(answer.as_str()) {
                return Ok(());
            }
            return Err(Error::NotAwaitingClarification { task_id });
        }
        self.require_open()?;
        let limit = self.state.config.max_input_chars;
        let chars = answer.chars().count();
        if chars > limit {
            return Err(Error::InputTooLarge { chars, limit });
        }
        self.emit(Event::ClarificationAnswered {
            task_id,
            answer,
            defaulted: false,
            at: now,
        });
        self.auto_compact(now);
        self.settle(now);
        Ok(())
    }

    // ----- time -----

    fn tick(&mut self, now: Timestamp) {
        if self.state.phase != PlanPhase::Running {
            return;
        }
        if let (Some(limit), Some(start)) = (
            self.state.config.budgets.max_wall_time_ms,
            self.state.started_at,
        ) {
            let used = now.as_millis().saturating_sub(start.as_millis());
            if used >= limit {
                self.stop(
                    FailureReason::BudgetExceeded {
                        budget: BudgetKind::WallTime,
                        limit,
                        used,
                    },
                    now,
                );
                return;
            }
        }
        let expired: Vec<TaskId> = self
            .state
            .awaiting_answer
            .iter()
            .filter(|(_, q)| q.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for task_id in expired {
            if self.state.phase != PlanPhase::Running {
                return;
            }
            match self.state.config.clarification.on_timeout.clone() {
                OnClarificationTimeout::UseDefault { answer } => {
                    self.emit(Event::ClarificationAnswered {
                        task_id,
                        answer,
                        defaulted: true,
                        at: now,
                    });
                }
                OnClarificationTimeout::Fail => {
                    let Some(i) = self.state.index_of(&task_id) else {
                        continue;
                    };
                    let attempt = self.state.tasks[i].attempts;
                    self.emit(Event::TaskStatusUpdated {
                        task_id,
                        attempt,
                        status: TaskStatus::Failed,
                        output: None,
                        error: Some("the question was not answered in time".to_owned()),
                        tokens_used: None,
                        at: now,
                    });
                    self.task_failed(i, now);
                }
            }
        }
        self.settle(now);
    }

    // ----- context -----

    /// Compacts the context when it is over the token budget.
    fn auto_compact(&mut self, now: Timestamp) {
        let context = &self.state.context;
        let budget = self.state.config.token_budget;
        if context.tokens <= budget {
            return;
        }
        let thread = context.thread();
        let Some(compacted) = compact_thread(&thread, budget, self.state.config.profile) else {
            return;
        };
        let had_summary = usize::from(context.summary.is_some());
        let folded_messages = compacted.folded.saturating_sub(had_summary);
        self.emit_compaction(compacted.summary, folded_messages, now);
    }

    fn compact_now(&mut self, summary: Option<String>, now: Timestamp) -> Result<(), Error> {
        let context = &self.state.context;
        // Fold everything but the newest message.
        let fold = context.messages.len().saturating_sub(1);
        if fold == 0 && summary.is_none() {
            return Ok(());
        }
        let summary = match summary {
            Some(summary) => {
                let limit = self.state.config.max_input_chars;
                let chars = summary.chars().count();
                if chars > limit {
                    return Err(Error::InputTooLarge { chars, limit });
                }
                summary
            }
            None => {
                let mut folded = Vec::with_capacity(fold + 1);
                if let Some(s) = &context.summary {
                    folded.push(Message::new(Role::Summary, s.clone()));
                }
                folded.extend(context.messages[..fold].iter().cloned());
                let config = &self.state.config;
                summarize_messages(&folded, config.token_budget / 2, config.profile)
            }
        };
        self.emit_compaction(summary, fold, now);
        Ok(())
    }

    fn emit_compaction(&mut self, summary: String, folded_messages: usize, now: Timestamp) {
        let context = &self.state.context;
        if folded_messages == 0 && context.summary.as_ref() == Some(&summary) {
            return;
        }
        let tokens_after = estimate_tokens(&summary)
            + MESSAGE_OVERHEAD_TOKENS
            + context.messages[folded_messages.min(context.messages.len())..]
                .iter()
                .map(message_tokens)
                .sum::<u64>();
        self.emit(Event::ContextCompacted {
            summary,
            folded_messages,
            tokens_before: context.tokens,
            tokens_after,
            at: now,
        });
    }

    // ----- cancellation -----

    fn cancel(
        &mut self,
        target: CancelTarget,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<(), Error> {
        match target {
            CancelTarget::Plan => {
                if self.state.phase.is_terminal() {
                    return Ok(());
                }
                let why = reason
                    .clone()
                    .unwrap_or_else(|| "plan cancelled".to_owned());
                self.cancel_all_open(&why, now);
                self.emit(Event::PlanCancelled { reason, at: now });
            }
            CancelTarget::Task { task_id } => {
                let i = self
                    .state
                    .index_of(&task_id)
                    .ok_or_else(|| Error::UnknownTask {
                        task_id: task_id.clone(),
                    })?;
                if self.state.tasks[i].status.is_terminal() {
                    return Ok(());
                }
                let why = reason.unwrap_or_else(|| format!("task {task_id} cancelled"));
                let mut affected = self.unfinished_dependents(i);
                affected.insert(i);
                for d in affected {
                    self.cancel_task(d, &why, now);
                }
                self.settle(now);
            }
        }
        Ok(())
    }

    fn cancel_task(&mut self, i: usize, reason: &str, now: Timestamp) {
        let task = &self.state.tasks[i];
        let cmd = match task.status {
            TaskStatus::Running | TaskStatus::NeedsClarification => Some(PlannerCmd::CancelTask {
                task_id: task.id.clone(),
                attempt: task.attempts,
            }),
            _ => None,
        };
        self.emit(Event::TaskCancelled {
            task_id: task.id.clone(),
            reason: reason.to_owned(),
            cmd,
            at: now,
        });
    }

    fn cancel_all_open(&mut self, reason: &str, now: Timestamp) {
        for i in self.state.cursor..self.state.tasks.len() {
            if !self.state.tasks[i].status.is_terminal() {
                self.cancel_task(i, reason, now);
            }
        }
    }

    /// Stops the plan in failure: everything unfinished is cancelled.
    fn stop(&mut self, reason: FailureReason, now: Timestamp) {
        let why = match &reason {
            FailureReason::TaskFailed { task_id } => format!("plan stopped: task {task_id} failed"),
            FailureReason::TasksFailed { .. } => "plan stopped: tasks failed".to_owned(),
            FailureReason::BudgetExceeded { budget, .. } => {
                format!("plan stopped: {budget:?} budget exceeded")
            }
        };
        self.cancel_all_open(&why, now);
        self.emit(Event::PlanFailed { reason, at: now });
    }

    // ----- budgets -----

    /// Stops the plan if reported tokens passed the budget; returns whether it goes on.
    fn check_tokens(&mut self, now: Timestamp) -> bool {
        if let Some(limit) = self.state.config.budgets.max_tokens {
            let used = self.state.usage.tokens;
            if used > limit {
                self.stop(
                    FailureReason::BudgetExceeded {
                        budget: BudgetKind::Tokens,
                        limit,
                        used,
                    },
                    now,
                );
                return false;
            }
        }
        true
    }

    /// Stops the plan if one more dispatch (of work, when `work`) would pass a budget; returns
    /// whether it may go ahead.
    fn admit_dispatch(&mut self, work: bool, now: Timestamp) -> bool {
        let budgets = &self.state.config.budgets;
        let usage = self.state.usage;
        let over = if budgets
            .max_dispatches
            .is_some_and(|l| usage.dispatches >= l)
        {
            budgets
                .max_dispatches
                .map(|l| (BudgetKind::Dispatches, l, usage.dispatches + 1))
        } else if work && budgets.max_attempts.is_some_and(|l| usage.attempts >= l) {
            budgets
                .max_attempts
                .map(|l| (BudgetKind::Attempts, l, usage.attempts + 1))
        } else {
            None
        };
        match over {
            Some((budget, limit, used)) => {
                self.stop(
                    FailureReason::BudgetExceeded {
                        budget,
                        limit,
                        used,
                    },
                    now,
                );
                false
            }
            None => true,
        }
    }

    // ----- scheduling -----

    /// Ends the plan when nothing is left, otherwise dispatches what is ready.
    fn settle(&mut self, now: Timestamp) {
        if self.state.phase != PlanPhase::Running {
            return;
        }
        if self.state.open_count() == 0 {
            self.finish_plan(now);
            return;
        }
        // Questions take no parallel slot: a human is not an executor.
        let questions: Vec<usize> = self.state.ready_questions().iter().copied().collect();
        for i in questions {
            if !self.admit_dispatch(false, now) {
                return;
            }
            let task = &self.state.tasks[i];
            let attempt = task.attempts + 1;
            let question = task
                .question
                .clone()
                .unwrap_or_else(|| task.description.clone());
            let task_id = task.id.clone();
            self.ask(task_id, attempt, question, now);
        }
        let free = self
            .state
            .config
            .max_parallel
            .saturating_sub(self.state.running_count());
        if free == 0 {
            return;
        }
        let mut candidates: Vec<usize> =
            self.state.ready_work().iter().take(free).copied().collect();
        candidates.extend(
            self.state
                .delayed()
                .iter()
                .take_while(|(at, _)| *at <= now)
                .map(|(_, i)| *i),
        );
        candidates.sort_unstable();
        candidates.truncate(free);
        for i in candidates {
            if !self.admit_dispatch(true, now) {
                return;
            }
            let event = self.dispatch_event(i, now);
            self.emit(event);
        }
    }

    fn dispatch_event(&self, i: usize, now: Timestamp) -> Event {
        let task = &self.state.tasks[i];
        let dispatch = Dispatch {
            task_id: task.id.clone(),
            attempt: task.attempts + 1,
            target: task.target.clone(),
        };
        let cmd = match task.kind {
            NodeKind::ToolCall => PlannerCmd::ExecuteTool(dispatch),
            _ => PlannerCmd::RunProcessing(dispatch),
        };
        Event::TaskDispatched {
            task_id: task.id.clone(),
            attempt: task.attempts + 1,
            cmd,
            at: now,
        }
    }

    fn finish_plan(&mut self, now: Timestamp) {
        let failed: Vec<TaskId> = self.state.tasks[self.state.run_start..]
            .iter()
            .filter(|t| t.status == TaskStatus::Failed)
            .map(|t| t.id.clone())
            .collect();
        if failed.is_empty() {
            self.emit(Event::PlanCompleted { at: now });
        } else {
            self.emit(Event::PlanFailed {
                reason: FailureReason::TasksFailed { task_ids: failed },
                at: now,
            });
        }
    }
}
