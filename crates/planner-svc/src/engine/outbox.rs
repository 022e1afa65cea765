//! Recovery and the outbox: the event log is the outbox.
//!
//! A session whose publish failed is marked; the sweep re-publishes the current attempt of
//! every running task and every open question of marked sessions, and recovery (at start-up,
//! then every `sessions.recovery_interval_s`) does the same for every unfinished session not
//! in memory, so an instance that dies leaves no retry or deadline unfired for long. Dispatches
//! carry `Nats-Msg-Id = session.task.attempt`, so a re-publish inside the dispatch stream's
//! duplicate window never reaches an executor twice.

use planner_core::{Command, PlanPhase};
use planner_store::EventStore;

use super::render::in_flight;
use super::{Engine, EngineError, Publisher};

impl<S: EventStore, P: Publisher> Engine<S, P> {
    /// Re-publishes what an unfinished session has in flight: the current attempt of every
    /// running task and every open question. Safe to repeat (dispatch ids deduplicate).
    pub async fn republish(&self, session: &str) -> Result<(), EngineError> {
        let slot = self.slot(session);
        let mut state = slot.state.lock().await;
        if state.planner.is_none() {
            state.planner = Some(self.load(session).await?);
        }
        let Some(planner) = state.planner.as_ref() else {
            return Ok(());
        };
        let messages = in_flight(session, planner);
        let deadline = planner.next_deadline();
        if !messages.is_empty() {
            match self.publisher.publish(&messages).await {
                Ok(()) => state.unpublished = false,
                Err(error) => {
                    tracing::warn!(session, %error, "re-publish failed; will retry");
                    state.unpublished = true;
                }
            }
        } else {
            state.unpublished = false;
        }
        self.arm(session, deadline);
        Ok(())
    }

    /// Every session in the store that has not ended and is not in memory gets its in-flight
    /// work re-published and its timer armed: at start-up, and periodically, so that the retries
    /// and deadlines of sessions whose instance died are picked up by the survivors. Sessions
    /// seen ended are skipped until their version moves. Returns how many were recovered.
    pub async fn recover(&self) -> Result<usize, EngineError> {
        let mut recovered = 0;
        for session in self.store.list_streams().await? {
            if self.registry.contains(&session) {
                continue;
            }
            if let Some(version) = self.registry.ended_at(&session) {
                if self.store.version(&session).await? == version {
                    continue;
                }
            }
            let planner = self.load(&session).await?;
            if planner.state().phase != PlanPhase::Running {
                self.registry.mark_ended(&session, planner.version());
                continue;
            }
            {
                let slot = self.slot(&session);
                slot.state.lock().await.planner = Some(planner);
            }
            // Its executors could not heartbeat while no instance held it: one timeout of
            // grace before silent attempts are timed out.
            let grace = Command::ExtendLeases {
                now: self.clock.now(),
            };
            if let Err(error) = self.drive(&session, grace).await {
                tracing::warn!(session, %error, "could not extend the leases of a recovered session");
            }
            self.republish(&session).await?;
            recovered += 1;
        }
        Ok(recovered)
    }

    /// Periodic housekeeping: re-publish for sessions whose publish failed, drop sessions idle
    /// past the timeout, and the least recently used ones past `max_loaded`.
    pub async fn sweep(&self) {
        for (session, slot) in self.registry.all() {
            let unpublished = slot
                .state
                .try_lock()
                .map(|s| s.unpublished)
                .unwrap_or(false);
            drop(slot);
            if unpublished {
                if let Err(error) = self.republish(&session).await {
                    tracing::warn!(session, %error, "outbox sweep failed");
                }
            }
        }
        let idle_ms = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        self.registry.evict(
            self.clock.now().as_millis(),
            idle_ms,
            self.config.max_loaded,
        );
    }
}
