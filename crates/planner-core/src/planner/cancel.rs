//! Cancellation: of one task (with everything downstream of it) or of the whole plan. A
//! running or asking task's executor or UI is told with a `CancelTask` command.

use super::Decision;
use crate::command::CancelTarget;
use crate::error::Error;
use crate::event::{Event, PlannerCmd};
use crate::types::{TaskStatus, Timestamp};

impl Decision<'_> {
    /// A `Cancel` command. Cancelling what already ended is a no-op; an unknown task is refused
    /// before anything is emitted.
    pub(super) fn cancel(
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
                let (i, task) = self
                    .state
                    .lookup(&task_id)
                    .ok_or_else(|| Error::UnknownTask {
                        task_id: task_id.clone(),
                    })?;
                if task.status.is_terminal() {
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

    pub(super) fn cancel_task(&mut self, i: usize, reason: &str, now: Timestamp) {
        let Some(task) = self.state.task_at(i) else {
            return;
        };
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

    /// Cancels every unfinished task of the current run, in plan order.
    pub(super) fn cancel_all_open(&mut self, reason: &str, now: Timestamp) {
        for i in self.state.cursor..self.state.tasks.len() {
            if self
                .state
                .task_at(i)
                .is_some_and(|t| !t.status.is_terminal())
            {
                self.cancel_task(i, reason, now);
            }
        }
    }
}
