//! Scheduling: `settle` moves the plan on after a change. It ends the plan when nothing is open,
//! otherwise puts ready questions to the user and dispatches ready work (and retries whose
//! backoff ended) up to `max_parallel`, each admitted by the budgets first.

use super::Decision;
use crate::event::{Dispatch, Event, FailureReason, PlannerCmd};
use crate::state::PlanPhase;
use crate::types::{NodeKind, TaskId, TaskStatus, Timestamp};

impl Decision<'_> {
    /// Ends the plan when nothing is left, otherwise dispatches what is ready.
    pub(super) fn settle(&mut self, now: Timestamp) {
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
            let Some(task) = self.state.task_at(i) else {
                continue;
            };
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
            if let Some(event) = self.dispatch_event(i, now) {
                self.emit(event);
            }
        }
    }

    fn dispatch_event(&self, i: usize, now: Timestamp) -> Option<Event> {
        let task = self.state.task_at(i)?;
        let dispatch = Dispatch {
            task_id: task.id.clone(),
            attempt: task.attempts + 1,
            target: task.target.clone(),
        };
        let cmd = match task.kind {
            NodeKind::ToolCall => PlannerCmd::ExecuteTool(dispatch),
            _ => PlannerCmd::RunProcessing(dispatch),
        };
        Some(Event::TaskDispatched {
            task_id: task.id.clone(),
            attempt: task.attempts + 1,
            cmd,
            at: now,
        })
    }

    fn finish_plan(&mut self, now: Timestamp) {
        let failed: Vec<TaskId> = self
            .state
            .tasks
            .get(self.state.run_start..)
            .unwrap_or_default()
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
