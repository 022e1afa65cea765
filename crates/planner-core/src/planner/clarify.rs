//! Clarifications: questions put to the user (a clarification task's dispatch, or an executor
//! asking mid-task), their answers, and what a deadline that passes unanswered means.

use super::Decision;
use crate::config::OnClarificationTimeout;
use crate::error::Error;
use crate::event::{Event, PlannerCmd};
use crate::state::PlanPhase;
use crate::types::{TaskId, TaskStatus, Timestamp};

impl Decision<'_> {
    /// Puts a question to the user on behalf of `task_id`: a clarification task's dispatch, or
    /// an executor asking mid-task.
    pub(super) fn ask(&mut self, task_id: TaskId, attempt: u32, question: String, now: Timestamp) {
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

    /// A human's answer. Every check comes before the answer is recorded.
    pub(super) fn answer(
        &mut self,
        task_id: TaskId,
        answer: String,
        now: Timestamp,
    ) -> Result<(), Error> {
        let (_, task) = self
            .state
            .lookup(&task_id)
            .ok_or_else(|| Error::UnknownTask {
                task_id: task_id.clone(),
            })?;
        if !self.state.awaiting_answer.contains_key(&task_id) {
            // The same answer again is a redelivery; anything else answers nothing.
            if task.answer.as_deref() == Some(answer.as_str()) {
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

    /// Questions whose deadline passed by `now` get the default answer, or fail their task, as
    /// `clarification.on_timeout` says.
    pub(super) fn expire_questions(&mut self, now: Timestamp) {
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
                    let Some((i, task)) = self.state.lookup(&task_id) else {
                        continue;
                    };
                    let attempt = task.attempts;
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
    }
}
