//! Recovery and the outbox: the event log is the outbox.
//!
//! A session whose publish failed is marked; the sweep re-publishes the current attempt of
//! every running task not yet claimed and every open question of marked sessions, and recovery (at start-up,
//! then every `sessions.recovery_interval_s`) does the same for every unfinished session not
//! in memory, so an instance that dies leaves no retry or deadline unfired for long. Dispatches
//! carry `Nats-Msg-Id = session.task.attempt`, so a re-publish inside the dispatch stream's
//! duplicate window never reaches an executor twice.

use planner_core::{Command, PlanPhase};
use planner_store::EventStore;

use super::render::{deliverable, in_flight, Undeliverable};

/// How often the daemon retries the publishes that failed ([`Engine::retry_unpublished`]).
pub const OUTBOX_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
use super::{Disposition, Engine, EngineError, Publisher};

/// What one recovery pass did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Unfinished sessions picked up.
    pub recovered: usize,
    /// Sessions that failed for a reason that can pass; the next pass tries them again.
    pub failed: usize,
    /// Sessions newly quarantined, with the reason.
    pub quarantined: Vec<(String, String)>,
}

impl<S: EventStore, P: Publisher> Engine<S, P> {
    /// Re-publishes what an unfinished session has in flight: the current attempt of every
    /// running task and every open question. Safe to repeat (dispatch ids deduplicate).
    ///
    /// Outside any trace (the outbox's retries, recovery), it runs in the trace of the
    /// session's latest command, if one is in memory: the re-sent dispatch is in the trace of
    /// the request it serves.
    pub async fn republish(&self, session: &str) -> Result<(), EngineError> {
        if crate::trace::current().is_none() && crate::trace::enabled() {
            if let Some(context) = self.registry.get(session).and_then(|slot| slot.trace()) {
                // Boxed before it is wrapped (see `Engine::handle`).
                let work = Box::pin(self.republish_traced(session));
                let edge = crate::trace::Edge::Internal;
                return crate::trace::scope(Some(context), edge, work).await;
            }
        }
        self.republish_traced(session).await
    }

    async fn republish_traced(&self, session: &str) -> Result<(), EngineError> {
        let undeliverable = self.republish_locked(session).await?;
        for (task_id, attempt, bytes) in undeliverable {
            self.abandon_undeliverable(session, task_id, attempt, bytes)
                .await;
        }
        Ok(())
    }

    async fn republish_locked(&self, session: &str) -> Result<Vec<Undeliverable>, EngineError> {
        let slot = self.slot(session);
        let mut state = slot.state.lock().await;
        if state.planner.is_none() {
            state.planner = Some(self.load(session).await?);
        }
        let Some(planner) = state.planner.as_ref() else {
            return Ok(Vec::new());
        };
        let (messages, undeliverable) = deliverable(
            in_flight(session, planner),
            self.config.max_dispatch_bytes,
            self.config.inline_context_bytes,
        );
        let deadline = planner.next_deadline();
        if !messages.is_empty() {
            match self.publisher.publish(&messages).await {
                Ok(()) => {
                    crate::metrics::republished(messages.len());
                    state.unpublished = false;
                }
                Err(error) => {
                    tracing::warn!(session, %error, "re-publish failed; will retry");
                    crate::metrics::publish_failed();
                    state.unpublished = true;
                    self.retry_publish(session);
                }
            }
        } else {
            state.unpublished = false;
        }
        self.arm(session, deadline);
        Ok(undeliverable)
    }

    /// Every session in the store that has not ended, is not in memory and is in this
    /// instance's scope (its partitions, [`super::EngineConfig::scope`]) gets its in-flight
    /// work re-published and its timer armed: at start-up, and periodically, so that the retries
    /// and deadlines of sessions whose instance died are picked up by the survivors. Sessions
    /// seen ended are skipped until their version moves.
    ///
    /// The sessions visited come from the store's index of unfinished sessions
    /// ([`EventStore::list_open`]): a pass costs O(unfinished), not O(every session ever). One
    /// the index names but that turns out ended (a crash between an append and the index
    /// update) is dropped from it ([`EventStore::forget_open`]).
    ///
    /// One session never stops the others: a session whose log cannot be decoded is
    /// quarantined (skipped until its log changes, listed by [`Engine::quarantined`]) and one
    /// that fails for a reason that can pass is tried again on the next pass. Only failing to
    /// list the sessions at all is an error.
    pub async fn recover(&self) -> Result<Recovery, EngineError> {
        let mut report = Recovery::default();
        for session in self.store.list_open().await? {
            if self.registry.contains(&session) || !self.in_scope(&session) {
                continue;
            }
            match self.recover_one(&session).await {
                Ok(true) => report.recovered += 1,
                Ok(false) => {}
                Err(error) => match error.disposition() {
                    Disposition::Reject => {
                        let version = self.store.version(&session).await.unwrap_or(0);
                        tracing::error!(session, %error, "session quarantined: its log cannot be loaded; recovery skips it until it changes");
                        self.registry.quarantine(
                            &session,
                            version,
                            error.to_string(),
                            self.clock.now().as_millis(),
                        );
                        report.quarantined.push((session, error.to_string()));
                    }
                    Disposition::Retry => {
                        tracing::warn!(session, %error, "could not recover a session; next pass tries again");
                        report.failed += 1;
                    }
                },
            }
        }
        Ok(report)
    }

    /// Recovers one session; false when it needed nothing (ended, or quarantined unchanged).
    async fn recover_one(&self, session: &str) -> Result<bool, EngineError> {
        let skip_at = self
            .registry
            .ended_at(session)
            .or_else(|| self.registry.quarantined_at(session));
        if let Some(version) = skip_at {
            if self.store.version(session).await? == version {
                return Ok(false);
            }
        }
        // Loaded under the session's lock: a command arriving meanwhile (a claim for a
        // partition just acquired) waits for this load instead of making its own, and finds
        // the session in memory. (Loaded outside it, both loaded, and recovery's copy, older,
        // then replaced the command's.)
        let slot = self.slot(session);
        let mut state = slot.state.lock().await;
        if state.planner.is_some() {
            // A command loaded it since the pass began: in memory, and marked for the sweep.
            return Ok(false);
        }
        let planner = match self.load(session).await {
            Ok(planner) => planner,
            Err(error) => {
                drop(state);
                self.registry.remove_unused(session, slot);
                return Err(error.into());
            }
        };
        self.registry.release_quarantine(session);
        if planner.state().phase != PlanPhase::Running {
            drop(state);
            self.registry.remove_unused(session, slot);
            self.registry.mark_ended(session, planner.version());
            if let Err(error) = self.store.forget_open(session, planner.version()).await {
                tracing::warn!(session, %error, "could not drop an ended session from the store's open index; the next pass tries again");
            }
            return Ok(false);
        }
        state.planner = Some(planner);
        drop(state);
        drop(slot);
        // Its executors could not heartbeat while no instance held it: one timeout of grace
        // before silent attempts are timed out.
        let grace = Command::ExtendLeases {
            now: self.clock.now(),
        };
        if let Err(error) = self.drive(session, grace, None).await {
            tracing::warn!(session, %error, "could not extend the leases of a recovered session");
        }
        self.republish(session).await?;
        Ok(true)
    }

    /// Notes `session` (its `unpublished` already set) for the outbox's next retry.
    pub(super) fn retry_publish(&self, session: &str) {
        if let Ok(mut pending) = self.unpublished.lock() {
            pending.insert(session.to_owned());
        }
    }

    /// Re-publishes the sessions whose publish failed since the last call: the daemon calls it
    /// every [`OUTBOX_RETRY`], so a publish lost to a server or cluster node going away is
    /// retried within about a second, not at the next sweep (`sessions.recovery_interval_s`,
    /// 30 s by default: a node kill in a cluster run left sessions waiting for it). One that
    /// fails again is noted again.
    pub async fn retry_unpublished(&self) {
        let pending = match self.unpublished.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        for session in pending {
            let still = self
                .registry
                .get(&session)
                .is_some_and(|slot| slot.state.try_lock().map_or(true, |s| s.unpublished));
            if !still {
                continue;
            }
            if let Err(error) = self.republish(&session).await {
                tracing::warn!(session, %error, "outbox retry failed; trying again");
                self.retry_publish(&session);
            }
        }
    }

    /// Periodic housekeeping: re-publish for sessions whose publish failed, drop sessions idle
    /// past the timeout, and the least recently used ones past `max_loaded`.
    pub async fn sweep(&self) {
        // What the sweep below re-publishes anyway: the pending notes go with it.
        if let Ok(mut pending) = self.unpublished.lock() {
            pending.clear();
        }
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
