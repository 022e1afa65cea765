//! Forking a session at a version into a new session (`planner_core::fork_events`): the new
//! session's log is a copy of the source's first events and a `session_forked` record; from
//! there it runs like any session.

use std::sync::Arc;

use planner_core::{Command, Planner, TaskStatus};
use planner_store::EventStore;

use super::{Engine, EngineError, Handled, Publisher};

impl<S: EventStore, P: Publisher> Engine<S, P> {
    /// Forks `source` after its first `version` events (1 to its current version) into the new
    /// session `target`, which must have no events. Attempts that were claimed at that version
    /// belong to the source's executors: they are given up (retryably, so the retry policy
    /// sends new ones); what is ready is dispatched (`Continue`); unclaimed dispatches and open
    /// questions are published again for the fork. The copy is one append: a source prefix larger than the store's largest append
    /// is refused (`too_large`).
    pub async fn fork(
        self: &Arc<Self>,
        source: &str,
        version: u64,
        target: &str,
    ) -> Result<Handled, EngineError> {
        for session in [source, target] {
            if !planner_core::is_valid_token(session) {
                return Err(EngineError::BadSession(session.to_owned()));
            }
        }
        let history = self.store.load_from(source, 0).await?;
        let prefix = usize::try_from(version).unwrap_or(usize::MAX);
        if version == 0 || prefix > history.len() {
            return Err(EngineError::Fork(format!(
                "cannot fork {source} at version {version}: it has {} events",
                history.len()
            )));
        }
        let events = planner_core::fork_events(
            source,
            history.get(..prefix).unwrap_or_default(),
            self.now(),
        );
        let handled = {
            let slot = self.slot(target);
            let mut state = slot.state.lock().await;
            if self.store.version(target).await? != 0 {
                return Err(EngineError::Fork(format!(
                    "session {target} already exists: fork into a new session"
                )));
            }
            let planner = Planner::fold(&events);
            let version = self
                .store
                .append(target, 0, &events)
                .await
                .inspect_err(|_| {
                    state.planner = None;
                })?;
            self.appended(target, 0, &events, planner.state());
            state.planner = Some(planner);
            Handled {
                version,
                events,
                lease_terms: None,
                claim_context: None,
                handover: None,
            }
        };
        let claimed: Vec<(planner_core::TaskId, u32)> = {
            let planner = self.read(target).await?;
            planner
                .state()
                .tasks
                .iter()
                .filter(|t| t.status == TaskStatus::Running && t.lease.is_some())
                .map(|t| (t.id.clone(), t.attempts))
                .collect()
        };
        let mut handled = handled;
        for (task_id, attempt) in claimed {
            let abandon = Command::AbandonAttempt {
                task_id,
                attempt,
                error: "the session was forked: this attempt ran for the source session".into(),
                retryable: true,
                now: self.now(),
            };
            let more = self.handle(target, abandon).await?;
            handled.version = more.version;
            handled.events.extend(more.events);
        }
        // A version between two events of one command may leave work ready but not yet
        // dispatched: dispatch it, as the source did right after.
        let more = self.handle(target, Command::Continue).await?;
        handled.version = more.version;
        handled.events.extend(more.events);
        self.republish(target).await?;
        Ok(handled)
    }
}
