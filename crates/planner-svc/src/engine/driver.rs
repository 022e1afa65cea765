//! The persist-then-publish driver: one command of one session, under that session's lock.
//!
//! Load the planner if needed (snapshot + tail), `process`, **append the events** (optimistic
//! concurrency at the version the planner was at), then send the dispatches, questions and
//! cancellations they carry, then arm the session's timer, then release the lock; the bus's
//! acks (and executors' answers to offers) are awaited in a task of their own (they guard no
//! order; a missing one marks the session for the outbox sweep).
//! Nothing is published before its events are persisted. On a concurrency conflict (another instance appended first) the
//! session is reloaded and the command retried; a command the planner refuses is retried the
//! same way when the store shows the session moved on, so an instance never judges input
//! against a stale copy.

use std::sync::Arc;

use planner_core::{Command, NodeKind, Planner, PlannerCmd, Timestamp};
use planner_store::{
    load_planner, save_snapshot_logged, AppendMeta, EventStore, Snapshot, StoreError,
};
use tracing::Instrument as _;

use super::render::{deliverable, outgoing, Undeliverable};
use super::{Chain, Engine, EngineError, Handled, Handover, Publisher};

/// Sets every `now` of `command`: the engine's clock is the only time the planner sees.
pub(super) fn stamp(command: Command, at: Timestamp) -> Command {
    match command {
        Command::Initialize {
            request_id,
            input,
            attachments,
            plan,
            planning,
            ..
        } => Command::Initialize {
            request_id,
            input,
            attachments,
            plan,
            planning,
            now: at,
        },
        Command::Revise {
            failed,
            input,
            plan,
            note,
            ..
        } => Command::Revise {
            failed,
            input,
            plan,
            note,
            now: at,
        },
        Command::HandleExecutorEvent { event, lease, .. } => Command::HandleExecutorEvent {
            event,
            lease,
            now: at,
        },
        Command::ClaimAttempt {
            task_id,
            attempt,
            lease,
            ..
        } => Command::ClaimAttempt {
            task_id,
            attempt,
            lease,
            now: at,
        },
        Command::Heartbeat {
            task_id,
            attempt,
            lease,
            ..
        } => Command::Heartbeat {
            task_id,
            attempt,
            lease,
            now: at,
        },
        Command::AnswerClarification {
            task_id, answer, ..
        } => Command::AnswerClarification {
            task_id,
            answer,
            now: at,
        },
        Command::Continue => Command::Continue,
        Command::Tick { .. } => Command::Tick { now: at },
        Command::ExtendLeases { .. } => Command::ExtendLeases { now: at },
        Command::AbandonAttempt {
            task_id,
            attempt,
            error,
            retryable,
            ..
        } => Command::AbandonAttempt {
            task_id,
            attempt,
            error,
            retryable,
            now: at,
        },
        Command::CompactContext {
            summary, through, ..
        } => Command::CompactContext {
            summary,
            through,
            now: at,
        },
        Command::Cancel { target, reason, .. } => Command::Cancel {
            target,
            reason,
            now: at,
        },
    }
}

/// Whether `command` decides work whose trace the session's later ticks continue: not the
/// lease-keeping claims, heartbeats and extensions (an executor may send them without a
/// trace), nor ticks themselves (they run in the remembered one).
fn decides_work(command: &Command) -> bool {
    !matches!(
        command,
        Command::Tick { .. }
            | Command::ExtendLeases { .. }
            | Command::ClaimAttempt { .. }
            | Command::Heartbeat { .. }
    )
}

impl<S: EventStore, P: Publisher> Engine<S, P> {
    /// The session's planner from the store; a new session gets this instance's settings.
    pub(super) async fn load(&self, session: &str) -> Result<Planner, StoreError> {
        self.stats
            .loads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let planner = load_planner(self.store.as_ref(), session).await?;
        crate::metrics::session_loaded();
        if planner.version() == 0 {
            return Ok(self.new_planner());
        }
        Ok(planner)
    }

    /// A new session's planner, with this instance's settings: from its first event on, the
    /// settings a session started with are in its log.
    fn new_planner(&self) -> Planner {
        Planner::with_config(self.config.planner.clone()).unwrap_or_default()
    }

    /// Whether `command`, for a session not in memory, is taken to start a new session, with
    /// no read of the store: a request (`initialize`) for a session this instance has not
    /// recorded as ended (recovery records those) or quarantined. Almost every one starts a
    /// session, and the append proves it: it expects the session's subject to be empty, so a
    /// session that exists after all (a follow-up for one this instance evicted, or served by
    /// another) makes it conflict, and the session is then loaded like any other. A load for
    /// every new session was two reads of the store (its snapshot and its last message).
    fn presumed_new(&self, session: &str, command: &Command) -> bool {
        matches!(command, Command::Initialize { .. })
            && self.registry.ended_at(session).is_none()
            && self.registry.quarantined_at(session).is_none()
    }

    /// Decide, persist, publish, arm: see the module docs.
    ///
    /// Also returns the dispatches too large for the bus, which were not published: (task,
    /// attempt, bytes), for the caller to fail outside the session's lock.
    pub(super) async fn drive(
        &self,
        session: &str,
        command: Command,
        chain: Option<&Chain>,
    ) -> Result<(Handled, Vec<Undeliverable>), EngineError> {
        let retries = self.config.conflict_retries;
        // Set while the planner is a presumed-new session's, until its append proves it.
        let mut presumed_new = false;
        // A presumed-new session that existed after all lost no race: it gets a round more.
        let mut extra_round = false;
        for attempt in 0..=retries.saturating_add(1) {
            if attempt > retries && !extra_round {
                break;
            }
            let slot = self.slot(session);
            let mut guard = slot.state.lock().await;
            // Split borrows: the planner and the slot's other fields side by side.
            let state = &mut *guard;
            if std::mem::take(&mut state.deciding) {
                tracing::debug!("the session's last command was abandoned half way; reloading");
                state.planner = None;
            }
            if state.planner.is_none() && attempt == 0 && self.presumed_new(session, &command) {
                state.planner = Some(self.new_planner());
                presumed_new = true;
            }
            if state.planner.is_none() {
                presumed_new = false;
                let loaded = self.load(session).await?;
                // Loaded for this command, not by recovery: whether the attempts it has in
                // flight were ever published is unknown (the instance that appended them may
                // have died before publishing, and recovery skips sessions already in memory),
                // so the next sweep re-publishes those not yet claimed. Found by the kill -9
                // ownership test: a redelivered report loaded the session first and its next
                // dispatch was never sent.
                if loaded.version() > 0 && loaded.state().phase == planner_core::PlanPhase::Running
                {
                    state.unpublished = true;
                    self.retry_publish(session);
                }
                state.planner = Some(loaded);
            }
            if crate::trace::pending() {
                // An executor's message without a trace: the trace its attempt was dispatched
                // in, else the session's latest, else a new one.
                let (task, attempt) = super::attempt_of(&command);
                let context = task
                    .zip(attempt)
                    .and_then(|(task, attempt)| state.attempt_trace(task, attempt))
                    .or_else(|| slot.trace())
                    .unwrap_or_else(crate::trace::TraceParent::new_root);
                crate::trace::adopt(context);
            }
            let Some(planner) = state.planner.as_mut() else {
                continue;
            };
            let before = planner.version();
            let observed = crate::metrics::Before::of(planner.state());
            let now = self.clock.now();
            state.deciding = true;
            let mut events = match planner.process(stamp(command.clone(), now)) {
                Ok(events) => events,
                Err(refused) => {
                    state.deciding = false;
                    // Another instance may have moved the session on (a report for a task it
                    // dispatched, say): judge the command against the latest state, not ours.
                    if self.store.version(session).await? != before {
                        state.planner = None;
                        extra_round |= presumed_new;
                        continue;
                    }
                    return Err(refused.into());
                }
            };
            // A report that asks for the next task claims it here, or, sent again after its
            // reply was lost (a duplicate, which changes nothing), finds the task claimed for
            // it the first time and hands it over again.
            let handed_over = chain.and_then(|chain| {
                let limit = self
                    .config
                    .max_dispatch_bytes
                    .saturating_sub(HANDOVER_ENVELOPE);
                hand_over(session, planner, &mut events, chain, now, limit)
                    .or_else(|| held_by(planner, &chain.lease))
            });
            planner.drain_log();
            let (lease_terms, claim_context) = match &command {
                Command::ClaimAttempt { task_id, .. } => (
                    planner.attempt_timeouts(task_id),
                    planner.dispatch_context(task_id),
                ),
                _ => (None, None),
            };
            if events.is_empty() {
                state.deciding = false;
                let handover = handed_over.and_then(|held| self.handover(session, planner, held));
                let handled = Handled {
                    version: before,
                    events,
                    lease_terms,
                    claim_context,
                    handover,
                };
                return Ok((handled, Vec::new()));
            }
            let appending = std::time::Instant::now();
            let span = tracing::debug_span!(
                "append",
                session = %session,
                version = before,
                events = events.len(),
                result = tracing::field::Empty,
            );
            // An append carries its trace when the trace differs from the one this instance
            // last stored for the session (the JetStream store keeps it on the message): an
            // operator reading the log finds each batch's trace at the batch or the nearest one
            // before it. Once per trace, not once per append: the header on every append of
            // every report was a few percent of the throughput at saturation (#12).
            let trace = crate::trace::current().map(|context| context.trace_id);
            let meta = match trace {
                Some(trace) if state.appended_trace != Some(trace) => {
                    crate::trace::outgoing_from(&span)
                        .map(AppendMeta::traced)
                        .unwrap_or_default()
                }
                _ => AppendMeta::default(),
            };
            let appended = self
                .store
                .append_with(session, before, &events, &meta)
                .instrument(span.clone())
                .await;
            crate::metrics::append_done(appending.elapsed(), &appended);
            span.record(
                "result",
                match &appended {
                    Ok(_) => "ok",
                    Err(error) if error.is_conflict() => "conflict",
                    Err(_) => "error",
                },
            );
            drop(span);
            match appended {
                Ok(version) => {
                    if meta.traceparent.is_some() {
                        state.appended_trace = trace;
                    }
                    self.appended(session, before, &events, planner.state());
                    crate::metrics::after_append(&observed, planner.state(), &events);
                    crate::otel::after_append(session, planner.state(), &events);
                    if let Some(context) = crate::trace::here() {
                        if decides_work(&command) {
                            slot.remember_trace(context);
                        }
                        super::registry::note_attempts(&mut state.attempt_traces, &events, context);
                    }
                    // The task handed over goes in the reply, to no one else.
                    let skipped = handed_over.as_ref().map(|h| (&h.task_id, h.attempt));
                    let (outgoing, undeliverable) = deliverable(
                        outgoing(session, planner, &events, skipped),
                        self.config.max_dispatch_bytes,
                        self.config.inline_context_bytes,
                    );
                    let handover =
                        handed_over.and_then(|held| self.handover(session, planner, held));
                    let deadline = planner.next_deadline();
                    // Taken under the lock (a copy of the state), saved after it: a save is
                    // a few JetStream requests (every `snapshot.every` events, more for a
                    // large state), and neither this command's dispatches nor its reply
                    // need it. One that fails or is lost leaves the older snapshot, which a
                    // load replays further from; one at a time per session.
                    let saving = &state.snapshot_saving;
                    let snapshot = (self.config.snapshot.is_due(before, planner.version())
                        && !saving.swap(true, std::sync::atomic::Ordering::SeqCst))
                    .then(|| (Snapshot::of(planner.state()), Arc::clone(saving)));
                    let mut confirmation = None;
                    if !outgoing.is_empty() {
                        let span = tracing::debug_span!("publish", session = %session, messages = outgoing.len());
                        match self.publisher.send(&outgoing).instrument(span).await {
                            Ok(confirm) => confirmation = Some(confirm),
                            Err(error) => {
                                tracing::warn!(%error, "publish failed after persisting; the outbox re-publishes it");
                                crate::metrics::publish_failed();
                                state.unpublished = true;
                                self.retry_publish(session);
                            }
                        }
                    }
                    state.deciding = false;
                    self.arm(session, deadline);
                    // The bus's acknowledgements guard no order (the messages left in order
                    // above), so they are awaited without the session's lock: the session's
                    // next command (typically the claim of the dispatch just sent) need not
                    // wait for them. Nor does this command's reply: it is justified by the
                    // append, and an offered dispatch is confirmed only once an executor
                    // claimed it (a claim this instance may have to serve meanwhile).
                    drop(guard);
                    if let Some((snapshot, saving)) = snapshot {
                        let (store, session) = (Arc::clone(&self.store), session.to_owned());
                        let saved = async move {
                            save_snapshot_logged(store.as_ref(), &session, &snapshot).await;
                            saving.store(false, std::sync::atomic::Ordering::SeqCst);
                        };
                        self.confirmations.spawn(saved.in_current_span());
                    }
                    if let Some(confirmation) = confirmation {
                        let (slot, unpublished) =
                            (Arc::clone(&slot), Arc::clone(&self.unpublished));
                        let session = session.to_owned();
                        let confirmed = async move {
                            if let Err(error) = confirmation.await {
                                tracing::warn!(%error, "publish not acknowledged after persisting; the outbox re-publishes it");
                                // `slot` is held, so the session cannot have been evicted since.
                                slot.state.lock().await.unpublished = true;
                                if let Ok(mut pending) = unpublished.lock() {
                                    pending.insert(session);
                                }
                            }
                        };
                        self.confirmations.spawn(confirmed.in_current_span());
                    }
                    tracing::debug!(version, events = events.len(), "persisted and published");
                    let handled = Handled {
                        version,
                        events,
                        lease_terms,
                        claim_context,
                        handover,
                    };
                    return Ok((handled, undeliverable));
                }
                Err(error) => {
                    // The planner applied events that are not in the store: drop it.
                    state.planner = None;
                    state.deciding = false;
                    if error.is_conflict() && presumed_new {
                        // Not a race: the session existed; now it is loaded.
                        tracing::debug!(%error, "a request for a session not in memory found it in the store; loading it");
                        extra_round = true;
                        continue;
                    }
                    if error.is_conflict() {
                        self.stats
                            .conflicts
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(attempt, %error, "lost a race for the session; reloading");
                        continue;
                    }
                    return Err(error.into());
                }
            }
        }
        Err(EngineError::Conflict {
            session: session.to_owned(),
            retries,
        })
    }
}

/// Room left in a reply for what surrounds the dispatch it hands over (the status, the lease,
/// the heartbeat interval, JSON punctuation): a dispatch within `max_dispatch_bytes` less this
/// fits the bus in a reply too.
const HANDOVER_ENVELOPE: usize = 1024;

/// An attempt handed over, with its dispatch (its context whole) once rendered.
struct HeldAttempt {
    task_id: planner_core::TaskId,
    attempt: u32,
    lease: String,
    message: Option<crate::protocol::TaskMessage>,
}

impl<S: EventStore, P: Publisher> Engine<S, P> {
    /// A report that asked for the next task (`lease`: its claim id) came by the report
    /// stream: its executor never got a direct reply (an executor publishes a report only
    /// when the planner did not answer it in time), so a task claimed for it in that reply
    /// would sit unrun until its heartbeat timeout. That attempt is abandoned now, retryable:
    /// the retry policy dispatches the task again to anyone. Whether one was.
    pub async fn release_unreceived_handover(
        self: &Arc<Self>,
        session: &str,
        lease: &str,
    ) -> Result<bool, EngineError> {
        // The report was just handled, so its session is in memory: looked up there, under
        // its lock, without a read of the store for every report that comes by the stream.
        let in_memory = match self.registry.get(session) {
            Some(slot) => slot
                .state
                .lock()
                .await
                .planner
                .as_ref()
                .map(|planner| held_by(planner, lease)),
            None => None,
        };
        let held = match in_memory {
            Some(held) => held,
            None => held_by(&self.read(session).await?, lease),
        };
        let Some(held) = held else {
            return Ok(false);
        };
        let abandon = Command::AbandonAttempt {
            task_id: held.task_id.clone(),
            attempt: held.attempt,
            error: "handed over in a reply its executor never received (its report came by the report stream)".to_owned(),
            retryable: true,
            now: self.now(),
        };
        match self.handle(session, abandon).await {
            Ok(_) => {
                tracing::warn!(session, task = %held.task_id, attempt = held.attempt, "a task handed over in a lost reply; retrying it now rather than at its heartbeat timeout");
                Ok(true)
            }
            // It moved on meanwhile (the attempt ended or the plan did): nothing held any more.
            Err(EngineError::Rejected(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The reply's account of an attempt handed over: its dispatch as published (rendered by
    /// [`hand_over`], or here for one handed over again), and its context unless inline.
    fn handover(&self, session: &str, planner: &Planner, held: HeldAttempt) -> Option<Handover> {
        let HeldAttempt {
            task_id,
            attempt,
            lease,
            message,
        } = held;
        let mut task = match message {
            Some(message) => message,
            None => super::render::dispatch(session, planner, &task_id, attempt)?,
        };
        super::render::leave_out_large_context(&mut task, self.config.inline_context_bytes);
        // A context the dispatch carries inline is not sent twice.
        let context = match task.assignment.context {
            Some(_) => None,
            None => planner.dispatch_context(&task_id),
        };
        // The reply compares the executor's context with the dispatch's reference, not with a
        // hash of this context: the two must be the same.
        debug_assert!(context
            .as_ref()
            .is_none_or(|context| context.reference() == task.assignment.context_ref));
        Some(Handover {
            task,
            lease,
            lease_terms: planner.attempt_timeouts(&task_id),
            context,
        })
    }
}

/// The running attempt whose lease is `lease`, if any: what a report's `next` got the first
/// time it was sent.
fn held_by(planner: &Planner, lease: &str) -> Option<HeldAttempt> {
    planner.state().tasks.iter().find_map(|task| {
        let held = task.status == planner_core::TaskStatus::Running
            && task.lease.as_ref().is_some_and(|l| l.token == lease);
        held.then(|| HeldAttempt {
            task_id: task.id.clone(),
            attempt: task.attempts,
            lease: lease.to_owned(),
            message: None,
        })
    })
}

/// Claims, for a report's executor, the first task its events dispatch that the executor
/// serves ([`Chain`]) and that fits a reply of `limit` bytes: the claim's events join the
/// report's, so one append carries both. Returns the task, attempt and lease handed over;
/// `None` (and `events` unchanged) when no dispatched task suits or the claim is refused.
fn hand_over(
    session: &str,
    planner: &mut Planner,
    events: &mut Vec<planner_core::Event>,
    chain: &Chain,
    now: Timestamp,
    limit: usize,
) -> Option<HeldAttempt> {
    let (task_id, attempt) = events
        .iter()
        .filter_map(planner_core::Event::planner_cmd)
        .find_map(|cmd| {
            let (kind, dispatch) = match cmd {
                PlannerCmd::ExecuteTool(dispatch) => (NodeKind::ToolCall, dispatch),
                PlannerCmd::RunProcessing(dispatch) => (NodeKind::Processing, dispatch),
                _ => return None,
            };
            (chain.serves)(kind, &dispatch.target)
                .then(|| (dispatch.task_id.clone(), dispatch.attempt))
        })?;
    // One too large for a reply is published (or failed as undeliverable) as ever.
    let message = super::render::dispatch(session, planner, &task_id, attempt)?;
    if super::render::oversized(&message, limit).is_some() {
        return None;
    }
    let claim = Command::ClaimAttempt {
        task_id: task_id.clone(),
        attempt,
        lease: chain.lease.clone(),
        now,
    };
    let claimed = planner.process(claim).ok()?;
    events.extend(claimed);
    Some(HeldAttempt {
        task_id,
        attempt,
        lease: chain.lease.clone(),
        message: Some(message),
    })
}
