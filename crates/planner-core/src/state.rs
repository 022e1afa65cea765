//! The planner's state and `apply`: how each event changes it.
//!
//! `apply` holds no business logic and cannot fail: an event is a fact that already happened.
//! Every decision (what to dispatch, when to retry, what a summary says) was taken by `process`
//! and written into the event. Besides the public data, the state keeps indexes (ready sets,
//! dependency counts) that make scheduling O(log n) per step; they are derived by `apply` too, so
//! a folded state equals the live one field for field.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::compact::{estimate_tokens, message_tokens, MESSAGE_OVERHEAD_TOKENS};
use crate::config::PlannerConfig;
use crate::event::{Event, FailureReason, PlannerCmd};
use crate::plan::TaskSpec;
use crate::types::{Message, NodeKind, Role, Task, TaskId, TaskStatus, Timestamp};

/// Where the plan as a whole is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum PlanPhase {
    /// No request yet.
    #[default]
    NotStarted,
    /// Tasks are planned, running or waiting.
    Running,
    /// Every task finished and none failed. A follow-up request reopens the plan.
    Completed,
    /// The plan failed. A follow-up request reopens it.
    Failed {
        /// Why.
        reason: FailureReason,
    },
    /// The plan was cancelled. A follow-up request reopens it.
    Cancelled,
}

impl PlanPhase {
    /// Whether the plan has ended (until a follow-up reopens it).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            PlanPhase::Completed | PlanPhase::Failed { .. } | PlanPhase::Cancelled
        )
    }
}

/// What the session has used, counted against [`Budgets`](crate::Budgets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Dispatches, questions included.
    pub dispatches: u64,
    /// Tool and processing attempts.
    pub attempts: u64,
    /// Tokens reported by executors.
    pub tokens: u64,
}

/// The conversation handed to executors: a summary of older messages and the recent ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// The summary of everything compacted so far.
    pub summary: Option<String>,
    /// Messages since the last compaction, oldest first.
    pub messages: Vec<Message>,
    /// Estimated tokens of the summary and the messages.
    pub tokens: u64,
    /// How many messages have been folded into summaries so far: `messages[0]` is message
    /// number `folded` of the session (counting from 0). A summary written outside the core
    /// says up to which message it covers
    /// ([`Command::CompactContext::through`](crate::Command::CompactContext)), and this tells
    /// which of today's messages that is. 0 in snapshots from before it was kept, and counted
    /// on from there.
    #[serde(default)]
    pub folded: u64,
}

impl Context {
    fn push(&mut self, message: Message) {
        self.tokens += message_tokens(&message);
        self.messages.push(message);
    }

    /// The summary (as a [`Role::Summary`] message, when there is one) followed by the messages:
    /// the thread compaction works on.
    pub fn thread(&self) -> Vec<Message> {
        let mut thread = Vec::with_capacity(self.messages.len() + 1);
        if let Some(summary) = &self.summary {
            thread.push(Message::new(Role::Summary, summary.clone()));
        }
        thread.extend(self.messages.iter().cloned());
        thread
    }
}

/// A question waiting for a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingQuestion {
    /// The attempt that asked.
    pub attempt: u32,
    /// When the timeout action happens; none when it waits for ever.
    pub deadline: Option<Timestamp>,
    /// When it was asked (the event's time): how long answers take is measured from here.
    /// Absent in snapshots from before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked_at: Option<Timestamp>,
}

/// Where a forked session came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkOrigin {
    /// The source session.
    pub session: String,
    /// How many of its events the fork copied.
    pub version: u64,
}

/// Everything a planner knows. Rebuilt exactly by folding the session's events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannerState {
    /// The config the session runs with (recorded by its first event).
    pub config: PlannerConfig,
    /// Where the plan is.
    pub phase: PlanPhase,
    /// Every task of the session, in plan order.
    pub tasks: Vec<Task>,
    /// The first task (in plan order) that has not finished: with `max_parallel = 1` and a
    /// sequential plan, the task being worked on.
    pub cursor: usize,
    /// The text of every request, by turn.
    pub requests: Vec<String>,
    /// The context handed to executors.
    pub context: Context,
    /// Questions waiting for a human, by task.
    pub awaiting_answer: BTreeMap<TaskId, PendingQuestion>,
    /// What the session has used.
    pub usage: Usage,
    /// When the current run started: the first request, or the follow-up that reopened the
    /// plan after it ended (the wall-time budget counts from here).
    pub started_at: Option<Timestamp>,
    /// The latest time recorded by an event.
    pub clock: Timestamp,
    /// How many events have been applied.
    pub version: u64,
    /// The number the rule parser gives its next task (`t{n}`).
    pub next_task_number: u64,
    /// Index of the first task of the current run (since the plan last (re)opened).
    pub run_start: usize,
    /// The client ids of the requests received, so that a retried request is recognised.
    #[serde(default)]
    pub request_ids: BTreeSet<String>,
    /// How many of the requests were the planner's own revised plans
    /// ([`Command::Revise`](crate::Command::Revise)); the shell caps them.
    #[serde(default)]
    pub revisions: u32,
    /// The turn of the latest request that was not a revision: the request a revision is
    /// for. Absent in snapshots from before it was kept: see
    /// [`PlannerState::last_user_request`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_user_turn: Option<u32>,
    /// The session this one was forked from, and at which version; none for a session that
    /// started with a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkOrigin>,

    // Derived from `tasks`: not serialized (snapshots stay smaller), rebuilt by
    // `rebuild_indexes` when a state is deserialized.
    #[serde(skip)]
    index: HashMap<TaskId, usize>,
    #[serde(skip)]
    dependents: Vec<Vec<usize>>,
    #[serde(skip)]
    unmet_dependencies: Vec<u32>,
    #[serde(skip)]
    ready_work: BTreeSet<usize>,
    #[serde(skip)]
    ready_questions: BTreeSet<usize>,
    #[serde(skip)]
    delayed: BTreeSet<(Timestamp, usize)>,
    #[serde(skip)]
    running: usize,
    #[serde(skip)]
    open: usize,
}

impl PlannerState {
    /// An empty state that will run with `config`.
    pub fn with_config(config: PlannerConfig) -> Self {
        PlannerState {
            config,
            ..PlannerState::default()
        }
    }

    /// The text of the latest request that was not a revision: what a revision is for. For a
    /// state from a snapshot older than `last_user_turn`, the latest request.
    pub fn last_user_request(&self) -> Option<&str> {
        match self.last_user_turn {
            Some(turn) => usize::try_from(turn)
                .ok()
                .and_then(|t| self.requests.get(t)),
            None => self.requests.last(),
        }
        .map(String::as_str)
    }

    /// Rebuilds the derived indexes (ready sets, dependency counts, counters) from `tasks`:
    /// what a deserialized state needs before it can decide anything. The result equals the
    /// indexes `apply` maintains, field for field.
    pub fn rebuild_indexes(&mut self) {
        let n = self.tasks.len();
        // A stored state is input like any other: positions past the end (a corrupt or
        // hand-edited snapshot) are clamped, not trusted to slice with.
        self.cursor = self.cursor.min(n);
        self.run_start = self.run_start.min(n);
        self.index = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        self.dependents = vec![Vec::new(); n];
        self.unmet_dependencies = Vec::with_capacity(n);
        self.ready_work.clear();
        self.ready_questions.clear();
        self.delayed.clear();
        self.running = 0;
        self.open = 0;
        for (i, task) in self.tasks.iter().enumerate() {
            let unmet = link_dependencies(&self.index, &self.tasks, &mut self.dependents, i, task);
            self.unmet_dependencies.push(unmet);
            match task.status {
                TaskStatus::Running => self.running += 1,
                TaskStatus::Planned if unmet == 0 => match task.not_before {
                    Some(at) => {
                        self.delayed.insert((at, i));
                    }
                    None if task.kind == NodeKind::Clarification => {
                        self.ready_questions.insert(i);
                    }
                    None => {
                        self.ready_work.insert(i);
                    }
                },
                _ => {}
            }
            if !task.status.is_terminal() {
                self.open += 1;
            }
        }
    }

    /// The task with this id.
    pub fn task(&self, id: &TaskId) -> Option<&Task> {
        self.index.get(id).and_then(|&i| self.tasks.get(i))
    }

    /// Whether some question waits for a human.
    pub fn is_waiting_for_user(&self) -> bool {
        !self.awaiting_answer.is_empty()
    }

    /// Tool and processing tasks dispatched and not finished.
    pub fn running_count(&self) -> usize {
        self.running
    }

    /// Tasks not finished.
    pub fn open_count(&self) -> usize {
        self.open
    }

    pub(crate) fn index_of(&self, id: &TaskId) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub(crate) fn dependents_of(&self, i: usize) -> &[usize] {
        self.dependents.get(i).map_or(&[], Vec::as_slice)
    }

    /// The task at position `i` (a position from the indexes: `index_of`, the ready sets).
    pub(crate) fn task_at(&self, i: usize) -> Option<&Task> {
        self.tasks.get(i)
    }

    /// The position and the task with this id.
    pub(crate) fn lookup(&self, id: &TaskId) -> Option<(usize, &Task)> {
        let i = self.index_of(id)?;
        Some((i, self.tasks.get(i)?))
    }

    pub(crate) fn ready_work(&self) -> &BTreeSet<usize> {
        &self.ready_work
    }

    pub(crate) fn ready_questions(&self) -> &BTreeSet<usize> {
        &self.ready_questions
    }

    pub(crate) fn delayed(&self) -> &BTreeSet<(Timestamp, usize)> {
        &self.delayed
    }

    /// Changes the state by one event. Never fails: an event that names an unknown task (which
    /// `process` never emits) is ignored rather than trusted.
    pub(crate) fn apply(&mut self, event: &Event) {
        self.version += 1;
        match event {
            Event::SessionStarted { config, at } => {
                self.config = (**config).clone();
                self.phase = PlanPhase::Running;
                self.started_at = Some(*at);
                self.tick(*at);
            }
            Event::RequestReceived {
                turn,
                request_id,
                input,
                attachments: _,
                revision_of,
                at,
            } => {
                if revision_of.is_some() {
                    self.revisions = self.revisions.saturating_add(1);
                } else {
                    self.last_user_turn = Some(*turn);
                }
                self.requests.push(input.clone());
                if let Some(id) = request_id {
                    self.request_ids.insert(id.clone());
                }
                if !input.is_empty() {
                    self.context.push(Message::new(Role::User, input.clone()));
                }
                self.tick(*at);
            }
            Event::TasksPlanned { turn, tasks, .. } => self.add_tasks(*turn, tasks),
            Event::TaskDispatched {
                task_id,
                attempt,
                at,
                ..
            } => {
                self.tick(*at);
                let Some(i) = self.index_of(task_id) else {
                    return;
                };
                self.unschedule(i);
                let Some(task) = self.tasks.get_mut(i) else {
                    return;
                };
                task.attempts = *attempt;
                task.status = TaskStatus::Running;
                task.started = false;
                task.dispatched_at = Some(*at);
                task.lease = None;
                self.running += 1;
                self.usage.dispatches += 1;
                self.usage.attempts += 1;
            }
            Event::ClarificationRequested {
                task_id,
                attempt,
                cmd,
                at,
            } => {
                self.tick(*at);
                let Some(i) = self.index_of(task_id) else {
                    return;
                };
                let (question, deadline) = match cmd {
                    PlannerCmd::AskUser {
                        question, deadline, ..
                    } => (question.clone(), *deadline),
                    _ => (String::new(), None),
                };
                let Some(status) = self.tasks.get(i).map(|t| t.status) else {
                    return;
                };
                if status == TaskStatus::Running {
                    self.running = self.running.saturating_sub(1);
                } else {
                    // A clarification task being asked: that is its dispatch.
                    self.unschedule(i);
                    self.usage.dispatches += 1;
                }
                let Some(task) = self.tasks.get_mut(i) else {
                    return;
                };
                task.attempts = *attempt;
                task.status = TaskStatus::NeedsClarification;
                task.question = Some(question.clone());
                self.awaiting_answer.insert(
                    task_id.clone(),
                    PendingQuestion {
                        attempt: *attempt,
                        deadline,
                        asked_at: Some(*at),
                    },
                );
                self.context.push(Message::new(
                    Role::Planner,
                    format!("question ({task_id}): {question}"),
                ));
            }
            Event::ClarificationAnswered {
                task_id,
                answer,
                at,
                ..
            } => {
                self.tick(*at);
                let Some(i) = self.index_of(task_id) else {
                    return;
                };
                self.awaiting_answer.remove(task_id);
                self.context.push(Message::new(
                    Role::User,
                    format!("answer ({task_id}): {answer}"),
                ));
                let Some(task) = self.tasks.get_mut(i) else {
                    return;
                };
                task.answer = Some(answer.clone());
                if task.kind == NodeKind::Clarification {
                    task.output = Some(answer.clone());
                    self.complete(i);
                } else {
                    task.status = TaskStatus::Planned;
                    self.ready_work.insert(i);
                }
            }
            Event::TaskStatusUpdated {
                task_id,
                attempt,
                status,
                output,
                error,
                tokens_used,
                at,
            } => {
                self.tick(*at);
                self.usage.tokens = self.usage.tokens.saturating_add(tokens_used.unwrap_or(0));
                let Some(i) = self.index_of(task_id) else {
                    return;
                };
                match status {
                    TaskStatus::Running => {
                        if let Some(task) = self.tasks.get_mut(i) {
                            task.started = true;
                        }
                    }
                    TaskStatus::Completed => {
                        self.end_attempt(i);
                        let Some(task) = self.tasks.get_mut(i) else {
                            return;
                        };
                        task.output = output.clone();
                        let content = format!(
                            "{task_id} ({}): {}",
                            task.target,
                            output.as_deref().unwrap_or("")
                        );
                        self.context.push(Message::new(Role::Task, content));
                        self.complete(i);
                    }
                    TaskStatus::Failed => {
                        let Some(task) = self.tasks.get_mut(i) else {
                            return;
                        };
                        if task.attempts == *attempt && *attempt > 0 {
                            task.failures += 1;
                        }
                        self.end_attempt(i);
                        let Some(task) = self.tasks.get_mut(i) else {
                            return;
                        };
                        task.error = error.clone();
                        let content =
                            format!("{task_id} failed: {}", error.as_deref().unwrap_or(""));
                        self.context.push(Message::new(Role::Task, content));
                        self.finish(i, TaskStatus::Failed);
                    }
                    // `process` emits no other status here; ignore rather than trust.
                    _ => {}
                }
            }
            Event::RetryScheduled {
                task_id,
                error,
                tokens_used,
                not_before,
                at,
                ..
            } => {
                self.tick(*at);
                self.usage.tokens = self.usage.tokens.saturating_add(tokens_used.unwrap_or(0));
                let Some(i) = self.index_of(task_id) else {
                    return;
                };
                self.end_attempt(i);
                let Some(task) = self.tasks.get_mut(i) else {
                    return;
                };
                task.failures += 1;
                task.status = TaskStatus::Planned;
                task.error = Some(error.clone());
                task.not_before = Some(*not_before);
                self.delayed.insert((*not_before, i));
            }
            Event::AttemptClaimed {
                task_id,
                attempt,
                lease,
                at,
            } => {
                self.tick(*at);
                let Some(i) = self.index_of(task_id) else {
                    return;
                };
                let Some(task) = self.tasks.get_mut(i) else {
                    return;
                };
                if task.attempts == *attempt {
                    task.started = true;
                    task.lease = Some(crate::types::Lease {
                        token: lease.clone(),
                        claimed_at: *at,
                        beat_at: *at,
                        graced: false,
                    });
                }
            }
            Event::AttemptHeartbeat {
                task_id,
                attempt,
                at,
            } => {
                self.tick(*at);
                let Some(i) = self.index_of(task_id) else {
                    return;
                };
                let Some(task) = self.tasks.get_mut(i) else {
                    return;
                };
                if task.attempts == *attempt {
                    if let Some(lease) = task.lease.as_mut() {
                        lease.beat_at = *at;
                        lease.graced = false;
                    }
                }
            }
            Event::LeasesExtended { at } => {
                self.tick(*at);
                for task in &mut self.tasks {
                    if task.status == TaskStatus::Running {
                        if let Some(lease) = task.lease.as_mut().filter(|l| !l.graced) {
                            lease.beat_at = lease.beat_at.max(*at);
                            lease.graced = true;
                        }
                    }
                }
            }
            Event::TaskCancelled { task_id, at, .. } => {
                self.tick(*at);
                let Some(i) = self.index_of(task_id) else {
                    return;
                };
                if self.tasks.get(i).is_none_or(|t| t.status.is_terminal()) {
                    return;
                }
                self.end_attempt(i);
                self.unschedule(i);
                self.finish(i, TaskStatus::Cancelled);
            }
            Event::ContextCompacted {
                summary,
                folded_messages,
                at,
                ..
            } => {
                self.tick(*at);
                let folded = (*folded_messages).min(self.context.messages.len());
                self.context.messages.drain(..folded);
                self.context.folded = self
                    .context
                    .folded
                    .saturating_add(u64::try_from(folded).unwrap_or(u64::MAX));
                self.context.summary = Some(summary.clone());
                self.context.tokens = estimate_tokens(summary)
                    + MESSAGE_OVERHEAD_TOKENS
                    + self
                        .context
                        .messages
                        .iter()
                        .map(message_tokens)
                        .sum::<u64>();
            }
            Event::PlanCompleted { at } => {
                self.tick(*at);
                self.phase = PlanPhase::Completed;
            }
            Event::PlanFailed { reason, at } => {
                self.tick(*at);
                self.phase = PlanPhase::Failed {
                    reason: reason.clone(),
                };
            }
            Event::SessionForked {
                source,
                version,
                at,
            } => {
                self.forked_from = Some(ForkOrigin {
                    session: source.clone(),
                    version: *version,
                });
                self.tick(*at);
            }
            Event::PlanCancelled { at, .. } => {
                self.tick(*at);
                self.phase = PlanPhase::Cancelled;
            }
        }
    }

    fn tick(&mut self, at: Timestamp) {
        self.clock = self.clock.max(at);
    }

    fn add_tasks(&mut self, turn: u32, specs: &[TaskSpec]) {
        if self.phase.is_terminal() {
            self.phase = PlanPhase::Running;
            self.run_start = self.tasks.len();
            // The wall-time budget counts from when the plan (re)opened: a follow-up after
            // `max_wall_time_ms` is a new run, not one already over its budget.
            self.started_at = Some(self.clock);
        }
        // Two passes: a plan may list a task before the tasks it depends on, so every new id
        // is known before any dependency is counted.
        let first = self.tasks.len();
        for spec in specs {
            let i = self.tasks.len();
            if let Some(n) = spec
                .id
                .as_str()
                .strip_prefix('t')
                .and_then(|n| n.parse::<u64>().ok())
            {
                self.next_task_number = self.next_task_number.max(n.saturating_add(1));
            }
            self.tasks.push(Task {
                id: spec.id.clone(),
                description: spec.description.clone(),
                kind: spec.kind,
                target: spec.target.clone(),
                status: TaskStatus::Planned,
                attachments: spec.attachments.clone(),
                dependencies: spec.dependencies.clone(),
                turn,
                attempts: 0,
                failures: 0,
                started: false,
                output: None,
                error: None,
                question: spec.question.clone(),
                answer: None,
                not_before: None,
                dispatched_at: None,
                lease: None,
                timeouts: spec.timeouts,
            });
            self.index.insert(spec.id.clone(), i);
            self.dependents.push(Vec::new());
            self.unmet_dependencies.push(0);
        }
        let new = self.tasks.get(first..).unwrap_or_default();
        for (i, task) in (first..).zip(new) {
            let unmet = link_dependencies(&self.index, &self.tasks, &mut self.dependents, i, task);
            if let Some(count) = self.unmet_dependencies.get_mut(i) {
                *count = unmet;
            }
            self.open += 1;
            if unmet == 0 {
                if task.kind == NodeKind::Clarification {
                    self.ready_questions.insert(i);
                } else {
                    self.ready_work.insert(i);
                }
            }
        }
        self.advance_cursor();
    }

    fn unschedule(&mut self, i: usize) {
        self.ready_work.remove(&i);
        self.ready_questions.remove(&i);
        if let Some(at) = self.tasks.get_mut(i).and_then(|t| t.not_before.take()) {
            self.delayed.remove(&(at, i));
        }
    }

    /// Releases what an attempt in flight held: its parallel slot or its pending question.
    fn end_attempt(&mut self, i: usize) {
        let Some(task) = self.tasks.get(i) else {
            return;
        };
        match task.status {
            TaskStatus::Running => self.running = self.running.saturating_sub(1),
            TaskStatus::NeedsClarification => {
                self.awaiting_answer.remove(&task.id);
            }
            _ => {}
        }
    }

    fn complete(&mut self, i: usize) {
        self.finish(i, TaskStatus::Completed);
        let Some(dependents) = self.dependents.get(i) else {
            return;
        };
        for &d in dependents {
            let (Some(unmet), Some(task)) = (self.unmet_dependencies.get_mut(d), self.tasks.get(d))
            else {
                continue;
            };
            *unmet = unmet.saturating_sub(1);
            if *unmet == 0 && task.status == TaskStatus::Planned {
                if task.kind == NodeKind::Clarification {
                    self.ready_questions.insert(d);
                } else {
                    self.ready_work.insert(d);
                }
            }
        }
    }

    fn finish(&mut self, i: usize, status: TaskStatus) {
        if self.tasks.get(i).is_none_or(|t| t.status.is_terminal()) {
            return;
        }
        self.unschedule(i);
        if let Some(task) = self.tasks.get_mut(i) {
            task.status = status;
        }
        self.open = self.open.saturating_sub(1);
        self.advance_cursor();
    }

    fn advance_cursor(&mut self) {
        let unfinished = self
            .tasks
            .get(self.cursor..)
            .unwrap_or_default()
            .iter()
            .position(|t| !t.status.is_terminal());
        self.cursor = unfinished.map_or(self.tasks.len(), |k| self.cursor + k);
    }
}

/// Records task `i` (`task`) as a dependent of each task it depends on (each once, never of
/// itself; unknown ids are skipped), and returns how many of those are not completed.
fn link_dependencies(
    index: &HashMap<TaskId, usize>,
    tasks: &[Task],
    dependents: &mut [Vec<usize>],
    i: usize,
    task: &Task,
) -> u32 {
    let mut unmet = 0;
    let mut seen = BTreeSet::new();
    for dep in &task.dependencies {
        let Some(d) = index.get(dep).copied() else {
            continue;
        };
        if d != i && seen.insert(d) {
            if let Some(list) = dependents.get_mut(d) {
                list.push(i);
            }
            if tasks
                .get(d)
                .is_some_and(|t| t.status != TaskStatus::Completed)
            {
                unmet += 1;
            }
        }
    }
    unmet
}
