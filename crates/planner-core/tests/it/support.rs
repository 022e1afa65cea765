//! Shorthands that keep the stories short.

use planner_core::*;

pub fn at(ms: u64) -> Timestamp {
    Timestamp(ms)
}

pub fn init(input: &str) -> Command {
    Command::Initialize {
        request_id: None,
        planning: None,
        input: input.into(),
        attachments: vec![],
        plan: None,
        now: at(0),
    }
}

pub fn init_plan(tasks: Vec<TaskSpec>) -> Command {
    Command::Initialize {
        request_id: None,
        planning: None,
        input: "planned request".into(),
        attachments: vec![],
        plan: Some(PlanSpec { tasks }),
        now: at(0),
    }
}

pub fn spec(id: &str, kind: NodeKind, deps: &[&str]) -> TaskSpec {
    TaskSpec {
        timeouts: None,
        id: id.into(),
        description: format!("do {id}"),
        kind,
        target: if kind == NodeKind::Clarification {
            "user"
        } else {
            "tool"
        }
        .into(),
        dependencies: deps.iter().map(|d| TaskId::from(*d)).collect(),
        attachments: vec![],
        question: None,
    }
}

pub fn work(id: &str, deps: &[&str]) -> TaskSpec {
    spec(id, NodeKind::ToolCall, deps)
}

pub fn report(task: &str, attempt: u32, outcome: ExecutorOutcome, now: u64) -> Command {
    Command::HandleExecutorEvent {
        lease: None,
        event: ExecutorEvent {
            task_id: task.into(),
            attempt,
            outcome,
        },
        now: at(now),
    }
}

pub fn done(task: &str, attempt: u32, now: u64) -> Command {
    report(
        task,
        attempt,
        ExecutorOutcome::Completed {
            output: format!("output of {task}"),
            tokens_used: None,
        },
        now,
    )
}

pub fn failed(task: &str, attempt: u32, retryable: bool, now: u64) -> Command {
    report(
        task,
        attempt,
        ExecutorOutcome::Failed {
            error: format!("{task} broke"),
            retryable,
            tokens_used: None,
        },
        now,
    )
}

pub fn answer(task: &str, text: &str, now: u64) -> Command {
    Command::AnswerClarification {
        task_id: task.into(),
        answer: text.into(),
        now: at(now),
    }
}

pub fn cancel_task(task: &str, now: u64) -> Command {
    Command::Cancel {
        target: CancelTarget::Task {
            task_id: task.into(),
        },
        reason: None,
        now: at(now),
    }
}

/// The (task, attempt) of every dispatch of work in `events`.
pub fn dispatched(events: &[Event]) -> Vec<(String, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::TaskDispatched {
                task_id, attempt, ..
            } => Some((task_id.0.clone(), *attempt)),
            _ => None,
        })
        .collect()
}

pub fn d(task: &str, attempt: u32) -> (String, u32) {
    (task.to_owned(), attempt)
}

pub fn status(planner: &Planner, task: &str) -> TaskStatus {
    planner
        .state()
        .task(&TaskId::from(task))
        .map(|t| t.status)
        .unwrap_or_else(|| panic!("no task {task}"))
}

pub fn config(f: impl FnOnce(&mut PlannerConfig)) -> PlannerConfig {
    let mut c = PlannerConfig::default();
    f(&mut c);
    c
}
