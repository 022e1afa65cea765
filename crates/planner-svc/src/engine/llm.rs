//! The LLM around the core: planning a request before it reaches the session's lock, revising
//! a plan after a task failed for good, and rewriting a compacted context's summary. Each runs
//! through the [`Llm`](super::Llm) seam and ends as an ordinary command, so its output is
//! recorded in the log and a replay never calls the LLM.

use std::sync::Arc;

use planner_core::{Command, TaskStatus};
use planner_store::EventStore;

use super::{Engine, EngineError, Publisher};

/// How the text of a revision request starts (`[revision N] ...`), for the LLM and for people.
/// Revisions are not counted by it (a user may type it): they are [`Command::Revise`]s,
/// counted by the core in `PlannerState::revisions`.
pub const REVISION_MARK: &str = "[revision";

impl<S: EventStore, P: Publisher> Engine<S, P> {
    pub(super) async fn plan_with_llm(
        &self,
        session: &str,
        command: Command,
    ) -> Result<Command, EngineError> {
        let Some(llm) = self.config.llm.clone() else {
            return Ok(command);
        };
        let Command::Initialize {
            request_id,
            input,
            attachments,
            plan: None,
            planning: None,
            now,
        } = command
        else {
            return Ok(command);
        };
        let rebuilt = |plan, planning| Command::Initialize {
            request_id: request_id.clone(),
            input: input.clone(),
            attachments: attachments.clone(),
            plan,
            planning,
            now,
        };
        if input.trim().is_empty() {
            return Ok(rebuilt(None, None));
        }
        // Read what the prompt needs, then let go of the session: the call holds no lock.
        let context = {
            let slot = self.slot(session);
            let mut state = slot.state.lock().await;
            if state.planner.is_none() {
                state.planner = Some(self.load(session).await?);
            }
            let Some(planner) = state.planner.as_ref() else {
                return Ok(rebuilt(None, None));
            };
            let s = planner.state();
            if request_id
                .as_ref()
                .is_some_and(|id| s.request_ids.contains(id))
            {
                return Ok(rebuilt(None, None)); // a retry: the core ignores it
            }
            planner_llm::PlanContext {
                request: input.clone(),
                attachments: attachments.clone(),
                summary: s.context.summary.clone(),
                system_prompt: s.config.system_prompt.clone(),
                profile: s.config.profile,
                existing_ids: s.tasks.iter().map(|t| t.id.clone()).collect(),
                max_tasks: s.config.max_plan_tasks,
            }
        };
        let planned = llm.plan(&context).await;
        Ok(rebuilt(planned.plan, planned.planning))
    }

    /// After a task failed for good, asks the LLM for a revised plan for what is left and, if it
    /// gives a valid one, sends it as a [`Command::Revise`] (recorded like a follow-up request
    /// with an LLM plan and its note, marked as a revision of `failed`). At most `llm.max_revisions` per session; a failed revision changes
    /// nothing (the plan stays failed).
    pub(super) fn revise(self: &Arc<Self>, session: &str, failed: planner_core::TaskId) {
        let Some(llm) = self.config.llm.clone() else {
            return;
        };
        let limit = llm.max_revisions();
        if limit == 0 {
            return;
        }
        let engine = Arc::clone(self);
        let session = session.to_owned();
        tokio::spawn(async move {
            let context = {
                let slot = engine.slot(&session);
                let state = slot.state.lock().await;
                let Some(planner) = state.planner.as_ref() else {
                    return;
                };
                let s = planner.state();
                // Counted from the log's structure (`RequestReceived::revision_of`), never
                // from a request's text, which a user chooses.
                let done = s.revisions;
                if done >= limit {
                    return;
                }
                let error = s
                    .task(&failed)
                    .and_then(|t| t.error.clone())
                    .unwrap_or_default();
                let completed: Vec<String> = s
                    .tasks
                    .iter()
                    .filter(|t| t.status == TaskStatus::Completed)
                    .map(|t| format!("{} ({})", t.id, t.description))
                    .collect();
                let original = s.last_user_request().unwrap_or_default();
                let request = format!(
                    "{REVISION_MARK} {}] The request was: {original}\nTask {failed} failed for good: {error}\nCompleted so far: {}\nPlan what is left to fulfil the request without repeating the failed approach. New tasks may depend on completed ones.",
                    done.saturating_add(1),
                    if completed.is_empty() { "nothing".to_owned() } else { completed.join("; ") },
                );
                planner_llm::PlanContext {
                    request,
                    attachments: vec![],
                    summary: s.context.summary.clone(),
                    system_prompt: s.config.system_prompt.clone(),
                    profile: s.config.profile,
                    existing_ids: s.tasks.iter().map(|t| t.id.clone()).collect(),
                    max_tasks: s.config.max_plan_tasks,
                }
            };
            let planned = llm.plan(&context).await;
            let Some(plan) = planned.plan else {
                tracing::warn!(session, failed = %failed, "no usable revised plan; the plan stays failed");
                return;
            };
            let note = format!("revision after {failed} failed");
            let command = Command::Revise {
                failed: failed.clone(),
                input: context.request,
                plan,
                note: Some(note),
                now: engine.clock.now(),
            };
            if let Err(error) = Box::pin(engine.handle(&session, command)).await {
                tracing::warn!(session, %error, "could not record the revised plan");
            }
        });
    }

    pub(super) fn rewrite_summary(self: &Arc<Self>, session: &str) {
        let Some(llm) = self.config.llm.clone() else {
            return;
        };
        let engine = Arc::clone(self);
        let session = session.to_owned();
        tokio::spawn(async move {
            let thread = {
                let slot = engine.slot(&session);
                let state = slot.state.lock().await;
                state.planner.as_ref().map(|p| {
                    let s = p.state();
                    // What the summary will cover: messages added during the call are not in
                    // it, and the core keeps them.
                    let through = s.context.folded.saturating_add(
                        u64::try_from(s.context.messages.len()).unwrap_or(u64::MAX),
                    );
                    (
                        s.context.thread(),
                        through,
                        s.config.token_budget,
                        s.config.profile,
                    )
                })
            };
            let Some((thread, through, budget, profile)) = thread else {
                return;
            };
            let Some(summary) = llm.summarize(&thread, budget / 2, profile).await else {
                return; // summaries are off
            };
            let command = Command::CompactContext {
                summary: Some(summary),
                through: Some(through),
                now: engine.clock.now(),
            };
            if let Err(error) = Box::pin(engine.handle(&session, command)).await {
                tracing::warn!(session, %error, "could not record the LLM summary");
            }
        });
    }
}
