//! Timers: one `Tick` per session at its next deadline (a retry's backoff ending, a question's
//! timeout, the wall-time budget), by the engine's clock.
//!
//! A tick that fails for a reason that can pass (the store down, a lost race) is re-armed with
//! a growing delay until it succeeds: a lost tick would leave the session waiting forever for a
//! retry or a deadline that nothing fires any more.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use planner_core::{Command, Timestamp};
use planner_store::EventStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::Disposition;
use super::{Engine, Publisher};

/// A session's next deadline (`None`: nothing to fire), sent to the timer loop.
#[derive(Debug)]
pub(super) struct Arm {
    pub(super) session: String,
    pub(super) at: Option<Timestamp>,
    /// Consecutive failed ticks before this arm: sets the delay of the next re-arm.
    pub(super) failures: u32,
}

/// Delay before re-firing a tick that failed `failures` times in a row: 100 ms doubling, at
/// most 30 s.
pub(super) fn retry_delay(failures: u32) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << failures.min(9));
    Duration::from_millis(ms.min(30_000))
}

/// The sessions' next deadlines, in order. Pure: the daemon's loop and a simulation's steps
/// both drive it.
#[derive(Debug, Default)]
struct Due {
    order: BTreeSet<(Timestamp, String)>,
    by_session: HashMap<String, (Timestamp, u32)>,
}

impl Due {
    fn arm(
        &mut self,
        Arm {
            session,
            at,
            failures,
        }: Arm,
    ) {
        if let Some((old, _)) = self.by_session.remove(&session) {
            self.order.remove(&(old, session.clone()));
        }
        if let Some(at) = at {
            self.order.insert((at, session.clone()));
            self.by_session.insert(session, (at, failures));
        }
    }

    fn next(&self) -> Option<Timestamp> {
        self.order.first().map(|(at, _)| *at)
    }

    /// Removes and returns the sessions due at `now`, with their failures in a row.
    fn take_due(&mut self, now: Timestamp) -> Vec<(String, u32)> {
        let mut fired = Vec::new();
        while let Some((at, session)) = self.order.first().cloned() {
            if at > now {
                break;
            }
            self.order.remove(&(at, session.clone()));
            let failures = self.by_session.remove(&session).map_or(0, |(_, f)| f);
            fired.push((session, failures));
        }
        fired
    }
}

/// Fires ticks at sessions' deadlines; run it with [`TimerLoop::run`].
#[derive(Debug)]
pub struct TimerLoop {
    pub(super) updates: mpsc::UnboundedReceiver<Arm>,
    due: Due,
}

impl TimerLoop {
    pub(super) fn new(updates: mpsc::UnboundedReceiver<Arm>) -> Self {
        TimerLoop {
            updates,
            due: Due::default(),
        }
    }

    /// Sends `Tick` to each session when its deadline passes, until `shutdown`.
    pub async fn run<S: EventStore, P: Publisher>(
        mut self,
        engine: Arc<Engine<S, P>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let next = self.due.next();
            let sleep = match next {
                Some(at) => Duration::from_millis(
                    at.as_millis()
                        .saturating_sub(engine.clock.now().as_millis()),
                ),
                None => Duration::from_secs(3_600),
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                update = self.updates.recv() => {
                    let Some(arm) = update else { return };
                    self.due.arm(arm);
                    // Under load every command arms its session: take all that queued up in
                    // one wake-up, not one loop turn (and one new sleep) each.
                    while let Ok(arm) = self.updates.try_recv() {
                        self.due.arm(arm);
                    }
                }
                () = tokio::time::sleep(sleep), if next.is_some() => {
                    let now = engine.clock.now();
                    for (session, failures) in self.due.take_due(now) {
                        let engine = Arc::clone(&engine);
                        tokio::spawn(async move { fire(&engine, &session, failures).await });
                    }
                }
            }
        }
    }

    /// The earliest deadline armed so far. For simulations, which step time themselves.
    pub fn next_deadline(&mut self) -> Option<Timestamp> {
        while let Ok(arm) = self.updates.try_recv() {
            self.due.arm(arm);
        }
        self.due.next()
    }

    /// Fires, one after another and to the end, every tick due by the engine's clock; returns
    /// how many. For simulations: the same ticks as [`TimerLoop::run`], without tasks or sleeps.
    pub async fn fire_due<S: EventStore, P: Publisher>(
        &mut self,
        engine: &Arc<Engine<S, P>>,
    ) -> usize {
        self.next_deadline();
        let fired = self.due.take_due(engine.clock.now());
        for (session, failures) in &fired {
            fire(engine, session, *failures).await;
        }
        fired.len()
    }
}

/// One tick for `session`; a tick that fails for a reason that can pass is re-armed.
async fn fire<S: EventStore, P: Publisher>(
    engine: &Arc<Engine<S, P>>,
    session: &str,
    failures: u32,
) {
    // Its partition moved to another instance, which armed its own timer when it took it.
    if !engine.in_scope(session) {
        return;
    }
    let tick = Command::Tick {
        now: engine.clock.now(),
    };
    if let Err(error) = engine.handle(session, tick).await {
        match error.disposition() {
            Disposition::Retry => {
                let delay = retry_delay(failures);
                tracing::warn!(session, %error, ?delay, "tick failed; re-armed");
                engine.rearm_after_failure(session, delay, failures + 1);
            }
            Disposition::Reject => {
                tracing::warn!(session, %error, "tick refused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn failed_ticks_back_off_to_a_bound() {
        assert_eq!(retry_delay(0), Duration::from_millis(100));
        assert_eq!(retry_delay(1), Duration::from_millis(200));
        assert_eq!(retry_delay(8), Duration::from_millis(25_600));
        assert_eq!(retry_delay(9), Duration::from_secs(30));
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(30));
    }
}
