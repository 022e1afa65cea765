//! Requests and planning: a request becomes tasks (a supplied or LLM plan, or the rule parser);
//! a follow-up's tasks wait for what is still unfinished. Every refusal of a request is decided
//! in `check_request` and `plan_request`, which take `&self`, before anything is recorded.

use std::collections::BTreeSet;

use super::{Decision, MAX_REQUEST_ID_CHARS};
use crate::command::Planning;
use crate::config::FailurePolicy;
use crate::error::Error;
use crate::event::{Event, PlanSource};
use crate::parse::parse_input_from;
use crate::plan::{validate_plan, PlanSpec};
use crate::state::PlanPhase;
use crate::types::{Attachment, TaskId, TaskStatus, Timestamp};

/// A request's plan, made and checked, ready to record.
struct Planned {
    source: PlanSource,
    note: Option<String>,
    plan: PlanSpec,
}

impl Decision<'_> {
    /// A request from the user: the first starts the session, later ones are follow-ups.
    pub(super) fn request(
        &mut self,
        request_id: Option<String>,
        input: String,
        attachments: Vec<Attachment>,
        plan: Option<PlanSpec>,
        planning: Option<Planning>,
        now: Timestamp,
    ) -> Result<(), Error> {
        if self.check_request(request_id.as_ref())? {
            return Ok(());
        }
        let planned = self.plan_request(&input, &attachments, plan, planning)?;
        self.record_request(request_id, input, attachments, None, planned, now);
        Ok(())
    }

    /// The shell's revised plan after `failed` failed for good: a follow-up request whose plan
    /// came from an LLM, recorded as a revision of `failed`. Refused unless `failed` is a task
    /// of the session that failed.
    pub(super) fn revise(
        &mut self,
        failed: TaskId,
        input: String,
        plan: PlanSpec,
        note: Option<String>,
        now: Timestamp,
    ) -> Result<(), Error> {
        let Some(task) = self.state.task(&failed) else {
            return Err(Error::UnknownTask { task_id: failed });
        };
        if task.status != TaskStatus::Failed {
            return Err(Error::NotRevisable {
                task_id: failed,
                status: task.status,
            });
        }
        let planning = Planning {
            source: PlanSource::Llm,
            note,
        };
        let planned = self.plan_request(&input, &[], Some(plan), Some(planning))?;
        self.record_request(None, input, vec![], Some(failed), planned, now);
        Ok(())
    }

    /// Checks a request's id; `Ok(true)` when the session has seen it already: a retry, which
    /// changes nothing.
    fn check_request(&self, request_id: Option<&String>) -> Result<bool, Error> {
        let Some(id) = request_id else {
            return Ok(false);
        };
        let chars = id.chars().count();
        if chars > MAX_REQUEST_ID_CHARS {
            return Err(Error::InputTooLarge {
                chars,
                limit: MAX_REQUEST_ID_CHARS,
            });
        }
        Ok(self.state.request_ids.contains(id))
    }

    /// Makes the request's plan and checks it. A follow-up's first tasks wait for everything
    /// still unfinished; the request's attachments go to every task it planned.
    fn plan_request(
        &self,
        input: &str,
        attachments: &[Attachment],
        plan: Option<PlanSpec>,
        planning: Option<Planning>,
    ) -> Result<Planned, Error> {
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
                let parsed = parse_input_from(input, self.state.next_task_number.max(1));
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
        let unfinished: Vec<TaskId> = state
            .tasks
            .get(state.cursor..)
            .unwrap_or_default()
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
                let mut all = attachments.to_vec();
                all.append(&mut spec.attachments);
                spec.attachments = all;
            }
        }
        Ok(Planned { source, note, plan })
    }

    /// Records a checked request and its plan, then moves the plan on.
    fn record_request(
        &mut self,
        request_id: Option<String>,
        input: String,
        attachments: Vec<Attachment>,
        revision_of: Option<TaskId>,
        planned: Planned,
        now: Timestamp,
    ) {
        let Planned { source, note, plan } = planned;
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
            revision_of,
            at: now,
        });
        self.emit(Event::TasksPlanned {
            turn,
            source,
            note,
            tasks: plan.tasks,
        });

        let failed_root = self.inherit_ended_dependencies(first_new, now);
        self.auto_compact(now);
        match failed_root {
            Some(d) if self.state.config.failure == FailurePolicy::FailFast => {
                self.stop_for(d, now);
            }
            _ => self.settle(now),
        }
    }
}
