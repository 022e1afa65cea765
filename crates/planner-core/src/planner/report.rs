//! Executor reports: `judge` sorts each report (the table in the `planner` module docs) before
//! anything is emitted; only a report on a task's latest, running attempt goes on to change
//! anything. A failure goes to `failure`, a question to `clarify`.

use super::Decision;
use crate::command::{ExecutorEvent, ExecutorOutcome};
use crate::error::Error;
use crate::event::Event;
use crate::types::{Task, TaskStatus, Timestamp};

impl Decision<'_> {
    /// A report from an executor about one attempt of one task.
    pub(super) fn executor_event(
        &mut self,
        event: ExecutorEvent,
        lease: Option<String>,
        now: Timestamp,
    ) -> Result<(), Error> {
        let Some((i, task)) = self.judge(&event)? else {
            return Ok(());
        };
        // Only the claim's holder may change what the attempt did.
        self.check_lease(task, event.attempt, lease.as_deref())?;
        let started = task.started;
        let ExecutorEvent {
            task_id,
            attempt,
            outcome,
        } = event;
        match outcome {
            ExecutorOutcome::Started => {
                if !started {
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
            } => self.attempt_failed(i, attempt, error, retryable, tokens_used, now),
            ExecutorOutcome::NeedsClarification { question } => {
                self.ask(task_id, attempt, question, now);
                self.auto_compact(now);
                self.settle(now);
            }
        }
        Ok(())
    }

    /// Judges a report: `Err` refuses it, `Ok(None)` ignores it (stale, duplicate, or about an
    /// attempt that already ended), `Ok(Some((i, task)))` means it is about the latest attempt
    /// of `task` (at position `i`), which is running.
    fn judge(&self, event: &ExecutorEvent) -> Result<Option<(usize, &Task)>, Error> {
        let ExecutorEvent {
            task_id, attempt, ..
        } = event;
        let attempt = *attempt;
        let (i, task) = self.locate(task_id, attempt)?;
        // A task cancelled while its executor worked on it (by the client, or because the plan
        // failed or was cancelled around it) gets its report late through no fault of the
        // executor: ignored, like any report on an attempt that already ended.
        if task.status == TaskStatus::Cancelled {
            return Ok(None);
        }
        // A superseded attempt's report is stale whatever became of the plan since: reports
        // are redelivered (at least once), and a redelivery may come after the plan ended.
        if attempt < task.attempts {
            return Ok(None);
        }
        // After the end, a report on a finished attempt is a late or redelivered one (a result
        // racing a cancel or a timeout, a lost ack): dropped quietly, whatever it says, since
        // the attempt's outcome is recorded. Only a task left open, which an ended plan does
        // not have, is refused.
        if self.state.phase.is_terminal() && !task.status.is_terminal() {
            return Err(Error::PlanFinished {
                phase: self.state.phase.clone(),
            });
        }
        if task.status != TaskStatus::Running {
            return Ok(None);
        }
        Ok(Some((i, task)))
    }
}
