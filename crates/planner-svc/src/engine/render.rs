//! Rendering: what the events of a command ask to publish, as wire messages built from the
//! planner after them. Pure: no IO, no clock.

use planner_core::{Dispatch, Event, NodeKind, Planner, PlannerCmd, TaskStatus};

use crate::protocol::{CancelMessage, ErrorNotice, QuestionMessage, TaskMessage};

/// Something to publish after its events are persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A dispatch for an executor pool.
    Task(TaskMessage),
    /// A question for the session's UI.
    Question(QuestionMessage),
    /// A cancellation for an executor or a UI.
    Cancel(CancelMessage),
    /// Something operators must know that no client can be told (on `{p}.errors`).
    Notice(ErrorNotice),
}

/// A dispatch that is not published because it is larger than the bus accepts: (task,
/// attempt, bytes).
pub type Undeliverable = (planner_core::TaskId, u32, usize);

/// `messages` without the dispatches over `limit` bytes, and those, for their attempts to be
/// failed instead. The size counts the context even where it is then left out (contexts over
/// `inline_context` bytes, see [`context_bytes`]): the claim's grant carries it instead.
pub fn deliverable(
    messages: Vec<Outgoing>,
    limit: usize,
    inline_context: usize,
) -> (Vec<Outgoing>, Vec<Undeliverable>) {
    let mut undeliverable = Vec::new();
    let kept = messages
        .into_iter()
        .filter_map(|message| {
            let Outgoing::Task(mut task) = message else {
                return Some(message);
            };
            if let Some(bytes) = oversized(&task, limit) {
                let a = &task.assignment;
                undeliverable.push((a.task_id.clone(), a.attempt, bytes));
                return None;
            }
            leave_out_large_context(&mut task, inline_context);
            Some(Outgoing::Task(task))
        })
        .collect();
    (kept, undeliverable)
}

/// Leaves a context over `inline_context` bytes out of a dispatch (the claim's grant, or the
/// hand-over's reply, carries it instead).
pub fn leave_out_large_context(task: &mut TaskMessage, inline_context: usize) {
    if task
        .assignment
        .context
        .as_ref()
        .is_some_and(|context| context_bytes(context) > inline_context)
    {
        task.assignment.context = None;
    }
}

/// A context's size as the inlining limit counts it: its request, summary and system prompt.
pub fn context_bytes(context: &planner_core::DispatchContext) -> usize {
    context.request.len()
        + context.summary.as_ref().map_or(0, String::len)
        + context.system_prompt.as_ref().map_or(0, String::len)
}

/// Whether a dispatch is larger than `limit` bytes on the wire. Exact (it encodes the
/// message) only when a cheap lower bound says it could be: most dispatches are far under.
pub fn oversized(task: &TaskMessage, limit: usize) -> Option<usize> {
    let a = &task.assignment;
    let lower_bound = a.description.len()
        + a.inputs.iter().map(|i| i.output.len()).sum::<usize>()
        + a.context.as_ref().map_or(0, context_bytes)
        + a.answer.as_ref().map_or(0, String::len);
    if lower_bound.saturating_mul(8) < limit {
        return None;
    }
    let bytes = serde_json::to_vec(task).map_or(usize::MAX, |b| b.len());
    (bytes > limit).then_some(bytes)
}

/// The dispatch of `task_id`'s attempt `attempt`, its context whole; `None` for a task that is
/// not an executor's.
pub fn dispatch(
    session: &str,
    planner: &Planner,
    task_id: &planner_core::TaskId,
    attempt: u32,
) -> Option<TaskMessage> {
    // By the id index: a scan comparing ids was 3% of the daemon's CPU with 80-task plans.
    let task = planner.state().task(task_id)?;
    if task.kind == NodeKind::Clarification {
        return None;
    }
    let dispatch = Dispatch {
        task_id: task_id.clone(),
        attempt,
        target: task.target.clone(),
    };
    Some(TaskMessage {
        session: session.to_owned(),
        assignment: planner.assignment(&dispatch)?,
    })
}

/// What the events of one command ask to publish, rendered from the planner after them, but
/// for the dispatch of `handed_over` (task, attempt), which goes in a report's reply instead.
pub fn outgoing(
    session: &str,
    planner: &Planner,
    events: &[Event],
    handed_over: Option<(&planner_core::TaskId, u32)>,
) -> Vec<Outgoing> {
    events
        .iter()
        .filter_map(Event::planner_cmd)
        .filter(|cmd| match (cmd, handed_over) {
            (
                PlannerCmd::ExecuteTool(dispatch) | PlannerCmd::RunProcessing(dispatch),
                Some((task_id, attempt)),
            ) => !(dispatch.task_id == *task_id && dispatch.attempt == attempt),
            _ => true,
        })
        .filter_map(|cmd| render(session, planner, cmd))
        .collect()
}

fn render(session: &str, planner: &Planner, cmd: &PlannerCmd) -> Option<Outgoing> {
    match cmd {
        PlannerCmd::ExecuteTool(dispatch) | PlannerCmd::RunProcessing(dispatch) => {
            let assignment = planner.assignment(dispatch)?;
            Some(Outgoing::Task(TaskMessage {
                session: session.to_owned(),
                assignment,
            }))
        }
        PlannerCmd::AskUser {
            task_id,
            attempt,
            question,
            deadline,
        } => Some(Outgoing::Question(QuestionMessage {
            session: session.to_owned(),
            task_id: task_id.clone(),
            attempt: *attempt,
            question: question.clone(),
            deadline: *deadline,
        })),
        PlannerCmd::CancelTask { task_id, attempt } => Some(Outgoing::Cancel(CancelMessage {
            session: session.to_owned(),
            task_id: task_id.clone(),
            attempt: *attempt,
        })),
    }
}

/// The current attempt of every running task and every open question of a session.
pub fn in_flight(session: &str, planner: &Planner) -> Vec<Outgoing> {
    let state = planner.state();
    let mut out = Vec::new();
    for task in state.tasks.get(state.cursor..).unwrap_or_default() {
        match task.status {
            // A claimed attempt is with its executor: sending it again could only be refused
            // at the claim. If that executor died, the heartbeat timeout finds it.
            TaskStatus::Running if task.kind != NodeKind::Clarification && task.lease.is_none() => {
                let dispatch = Dispatch {
                    task_id: task.id.clone(),
                    attempt: task.attempts,
                    target: task.target.clone(),
                };
                let cmd = PlannerCmd::ExecuteTool(dispatch);
                out.extend(render(session, planner, &cmd));
            }
            TaskStatus::NeedsClarification => {
                let pending = state.awaiting_answer.get(&task.id);
                out.push(Outgoing::Question(QuestionMessage {
                    session: session.to_owned(),
                    task_id: task.id.clone(),
                    attempt: pending.map_or(task.attempts, |p| p.attempt),
                    question: task
                        .question
                        .clone()
                        .unwrap_or_else(|| task.description.clone()),
                    deadline: pending.and_then(|p| p.deadline),
                }));
            }
            _ => {}
        }
    }
    out
}
