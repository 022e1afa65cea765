//! Retries and failure propagation: a failed attempt is retried after a backoff or fails its
//! task; a task that ended without an output takes its unfinished dependents with it; the failure
//! policy decides whether the plan goes on; `stop` ends a plan in failure. Nothing here refuses
//! a command: it runs after the checks.

use std::collections::BTreeSet;

use super::Decision;
use crate::compact::compact_error_message;
use crate::config::FailurePolicy;
use crate::event::{Event, FailureReason};
use crate::types::{TaskStatus, Timestamp};

impl Decision<'_> {
    /// An executor reported that attempt `attempt` of task `i` failed: another attempt is
    /// scheduled after a backoff if the error is retryable and the retry policy allows one,
    /// otherwise the task fails for good.
    pub(super) fn attempt_failed(
        &mut self,
        i: usize,
        attempt: u32,
        error: String,
        retryable: bool,
        tokens_used: Option<u64>,
        now: Timestamp,
    ) {
        let Some(task) = self.state.task_at(i) else {
            return;
        };
        let task_id = task.id.clone();
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

    /// After a task failed for good: its dependents fail, then the failure policy applies.
    pub(super) fn task_failed(&mut self, i: usize, now: Timestamp) {
        self.fail_dependents(i, now);
        match self.state.config.failure {
            FailurePolicy::FailFast => self.stop_for(i, now),
            FailurePolicy::ContinueOnFailure => {
                self.auto_compact(now);
                self.settle(now);
            }
        }
    }

    /// A new task may depend on one that already failed or was cancelled: it can never run,
    /// so it fails or is cancelled with it, as if it had been planned earlier. Looks at the
    /// tasks before `first_new`; returns the first failed one that failed a new task.
    pub(super) fn inherit_ended_dependencies(
        &mut self,
        first_new: usize,
        now: Timestamp,
    ) -> Option<usize> {
        let mut failed_root = None;
        for d in 0..first_new {
            let Some(status) = self.state.task_at(d).map(|t| t.status) else {
                break;
            };
            match status {
                TaskStatus::Failed if self.fail_dependents(d, now) => {
                    failed_root.get_or_insert(d);
                }
                TaskStatus::Cancelled => {
                    let Some(task) = self.state.task_at(d) else {
                        continue;
                    };
                    let why = format!("dependency {} was cancelled", task.id);
                    for k in self.unfinished_dependents(d) {
                        self.cancel_task(k, &why, now);
                    }
                }
                _ => {}
            }
        }
        failed_root
    }

    /// Fails every unfinished task that depends on task `i`, directly or not, in plan order.
    /// Returns whether any was failed.
    fn fail_dependents(&mut self, i: usize, now: Timestamp) -> bool {
        let Some(cause) = self.state.task_at(i) else {
            return false;
        };
        let verb = if cause.status == TaskStatus::Cancelled {
            "was cancelled"
        } else {
            "failed"
        };
        let error = format!("dependency {} {verb}", cause.id);
        let affected = self.unfinished_dependents(i);
        for &d in &affected {
            let Some(task) = self.state.task_at(d) else {
                continue;
            };
            self.emit(Event::TaskStatusUpdated {
                task_id: task.id.clone(),
                attempt: task.attempts,
                status: TaskStatus::Failed,
                output: None,
                error: Some(error.clone()),
                tokens_used: None,
                at: now,
            });
        }
        !affected.is_empty()
    }

    /// Every unfinished task downstream of `i`, in plan order. Cancellation follows the same
    /// edges.
    pub(super) fn unfinished_dependents(&self, i: usize) -> BTreeSet<usize> {
        let mut found = BTreeSet::new();
        let mut stack: Vec<usize> = self.state.dependents_of(i).to_vec();
        while let Some(d) = stack.pop() {
            let unfinished = self
                .state
                .task_at(d)
                .is_some_and(|t| !t.status.is_terminal());
            if unfinished && found.insert(d) {
                stack.extend_from_slice(self.state.dependents_of(d));
            }
        }
        found
    }

    /// Stops the plan because task `i` failed (the fail-fast policy).
    pub(super) fn stop_for(&mut self, i: usize, now: Timestamp) {
        if let Some(task_id) = self.state.task_at(i).map(|t| t.id.clone()) {
            self.stop(FailureReason::TaskFailed { task_id }, now);
        }
    }

    /// Stops the plan in failure: everything unfinished is cancelled.
    pub(super) fn stop(&mut self, reason: FailureReason, now: Timestamp) {
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
}
