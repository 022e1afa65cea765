//! Claims, heartbeats and attempt timeouts: how the planner knows an attempt is being worked
//! on, fences out whoever it no longer belongs to, and closes the attempts of executors that
//! died, stalled or never came.

use super::Decision;
use crate::command::FenceReason;
use crate::error::Error;
use crate::event::Event;
use crate::plan::TaskTimeouts;
use crate::state::PlannerState;
use crate::types::{NodeKind, Task, TaskId, TaskStatus, Timestamp};

/// Why an attempt is closed by the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeout {
    ScheduleToStart,
    StartToClose,
    Heartbeat,
}

impl Timeout {
    fn describe(self, limit_ms: u64) -> String {
        match self {
            Timeout::ScheduleToStart => {
                format!("attempt timed out: no executor claimed it within {limit_ms} ms")
            }
            Timeout::StartToClose => {
                format!("attempt timed out: still running after {limit_ms} ms")
            }
            Timeout::Heartbeat => {
                format!("attempt timed out: no heartbeat for {limit_ms} ms")
            }
        }
    }
}

/// The timeouts of a task's attempts: its own, its target's, its kind's or the session's.
pub(crate) fn timeouts(state: &PlannerState, task: &Task) -> TaskTimeouts {
    state
        .config
        .leases
        .timeouts_for(task.kind, &task.target, task.timeouts)
}

fn heartbeat_timeout(state: &PlannerState, task: &Task) -> Option<u64> {
    timeouts(state, task).heartbeat_timeout_ms
}

/// When the attempt of task `i` times out, and why, if it can.
fn attempt_deadline(state: &PlannerState, i: usize) -> Option<(Timestamp, Timeout, u64)> {
    let task = state.tasks.get(i)?;
    if task.status != TaskStatus::Running || task.kind == NodeKind::Clarification {
        return None;
    }
    let TaskTimeouts {
        heartbeat_timeout_ms: heartbeat_timeout,
        start_to_close_ms: start_to_close,
        schedule_to_start_ms: schedule_to_start,
    } = timeouts(state, task);
    let mut deadlines = Vec::with_capacity(2);
    match &task.lease {
        Some(lease) => {
            if let Some(limit) = heartbeat_timeout {
                deadlines.push((lease.beat_at.plus_millis(limit), Timeout::Heartbeat, limit));
            }
            if let Some(limit) = start_to_close {
                deadlines.push((
                    lease.claimed_at.plus_millis(limit),
                    Timeout::StartToClose,
                    limit,
                ));
            }
        }
        None => {
            if let (true, Some(limit), Some(at)) = (
                state.config.leases.require_claim,
                schedule_to_start,
                task.dispatched_at,
            ) {
                deadlines.push((at.plus_millis(limit), Timeout::ScheduleToStart, limit));
            }
        }
    }
    deadlines.into_iter().min_by_key(|(at, _, _)| *at)
}

/// The earliest attempt timeout among running tasks.
pub(super) fn next_attempt_deadline(state: &PlannerState) -> Option<Timestamp> {
    (state.cursor..state.tasks.len())
        .filter_map(|i| attempt_deadline(state, i).map(|(at, _, _)| at))
        .min()
}

impl Decision<'_> {
    /// Checks that `attempt` of `task_id` is the task's current, running attempt, and returns
    /// the task's index and the task; the reason it is not otherwise.
    fn fence(&self, task_id: &TaskId, attempt: u32) -> Result<(usize, &Task), Error> {
        let fenced = |reason| Error::Fenced {
            task_id: task_id.clone(),
            attempt,
            reason,
        };
        let (i, task) = self.locate(task_id, attempt)?;
        if task.status == TaskStatus::Cancelled {
            return Err(fenced(FenceReason::Cancelled));
        }
        if attempt < task.attempts {
            return Err(fenced(FenceReason::Superseded));
        }
        if task.status != TaskStatus::Running {
            return Err(fenced(FenceReason::NotRunning));
        }
        Ok((i, task))
    }

    /// The index of an executable task that had `attempt` dispatched, and the task; what an
    /// executor may speak about at all (reports, claims, heartbeats), before any judgment of
    /// its state.
    pub(super) fn locate(&self, task_id: &TaskId, attempt: u32) -> Result<(usize, &Task), Error> {
        let (i, task) = self
            .state
            .lookup(task_id)
            .ok_or_else(|| Error::UnknownTask {
                task_id: task_id.clone(),
            })?;
        if task.kind == NodeKind::Clarification {
            return Err(Error::NotExecutable {
                task_id: task_id.clone(),
            });
        }
        if attempt == 0 || attempt > task.attempts {
            return Err(Error::UnknownAttempt {
                task_id: task_id.clone(),
                attempt,
                latest: task.attempts,
            });
        }
        Ok((i, task))
    }

    /// Checks that `lease` is the claim on the current attempt of `task`.
    pub(super) fn check_lease(
        &self,
        task: &Task,
        attempt: u32,
        lease: Option<&str>,
    ) -> Result<(), Error> {
        let reason = match (&task.lease, lease) {
            (Some(held), Some(given)) if held.token == given => return Ok(()),
            (Some(_), _) => FenceReason::LeaseMismatch,
            (None, _) if !self.state.config.leases.require_claim => return Ok(()),
            (None, _) => FenceReason::NotClaimed,
        };
        Err(Error::Fenced {
            task_id: task.id.clone(),
            attempt,
            reason,
        })
    }

    /// An executor claims an attempt: granted once, to one lease.
    pub(super) fn claim(
        &mut self,
        task_id: TaskId,
        attempt: u32,
        lease: String,
        now: Timestamp,
    ) -> Result<(), Error> {
        // The fence first: its reason (cancelled, superseded) tells the executor more than
        // "the plan ended" would.
        let (_, task) = self.fence(&task_id, attempt)?;
        self.require_open()?;
        match &task.lease {
            // The same claim again (its reply was lost): granted again, nothing new.
            Some(held) if held.token == lease => return Ok(()),
            Some(_) => {
                return Err(Error::Fenced {
                    task_id,
                    attempt,
                    reason: FenceReason::ClaimedByAnother,
                })
            }
            None => {}
        }
        self.emit(Event::AttemptClaimed {
            task_id,
            attempt,
            lease,
            at: now,
        });
        Ok(())
    }

    /// The executor of a claimed attempt is alive. Recorded only when half the heartbeat
    /// timeout has passed since the last one recorded: the deadline stays ahead of a live
    /// executor that beats at least every third of the timeout, and the log grows by at most
    /// two events per timeout period per running attempt.
    pub(super) fn heartbeat(
        &mut self,
        task_id: TaskId,
        attempt: u32,
        lease: String,
        now: Timestamp,
    ) -> Result<(), Error> {
        // The fence first: its reason (cancelled, superseded) tells the executor more than
        // "the plan ended" would.
        let (_, task) = self.fence(&task_id, attempt)?;
        self.require_open()?;
        if task.lease.is_none() {
            return Err(Error::Fenced {
                task_id,
                attempt,
                reason: FenceReason::NotClaimed,
            });
        }
        self.check_lease(task, attempt, Some(&lease))?;
        let (Some(limit), Some(held)) = (heartbeat_timeout(self.state, task), task.lease.as_ref())
        else {
            return Ok(());
        };
        if now >= held.beat_at.plus_millis(limit / 2) {
            self.emit(Event::AttemptHeartbeat {
                task_id,
                attempt,
                at: now,
            });
        }
        Ok(())
    }

    /// Attempts whose timeout passed by `now` fail (retryably): the retry policy decides
    /// whether a new attempt comes. Their executors, if alive, learn it from their next
    /// heartbeat; a late report for them is stale.
    pub(super) fn expire_attempts(&mut self, now: Timestamp) {
        let expired: Vec<(usize, Timeout, u64)> = (self.state.cursor..self.state.tasks.len())
            .filter_map(|i| {
                attempt_deadline(self.state, i)
                    .filter(|(at, _, _)| *at <= now)
                    .map(|(_, why, limit)| (i, why, limit))
            })
            .collect();
        for (i, why, limit) in expired {
            if self.state.phase.is_terminal() {
                return;
            }
            // An earlier expiry in this loop may have ended this task (a dependency failed).
            let Some(attempt) = self
                .state
                .task_at(i)
                .filter(|t| t.status == TaskStatus::Running)
                .map(|t| t.attempts)
            else {
                continue;
            };
            self.attempt_failed(i, attempt, why.describe(limit), true, None, now);
        }
    }

    /// One heartbeat timeout of grace for every claimed, running attempt, recorded only when
    /// some lease's last beat is older than half the timeout (as heartbeats are). A lease gets
    /// one grace per beat of its executor: a dead executor's lease is not kept alive by a
    /// session that is recovered again and again.
    pub(super) fn extend_leases(&mut self, now: Timestamp) {
        if self.state.phase != crate::state::PlanPhase::Running {
            return;
        }
        let state = &*self.state;
        let stale = state
            .tasks
            .get(state.cursor..)
            .unwrap_or_default()
            .iter()
            .any(|t| {
                t.status == TaskStatus::Running
                    && t.lease
                        .as_ref()
                        .filter(|l| !l.graced)
                        .zip(heartbeat_timeout(state, t))
                        .is_some_and(|(l, limit)| now >= l.beat_at.plus_millis(limit / 2))
            });
        if stale {
            self.emit(Event::LeasesExtended { at: now });
        }
    }

    /// The shell gave up on the current attempt: it failed, retryably or not.
    pub(super) fn abandon(
        &mut self,
        task_id: TaskId,
        attempt: u32,
        error: String,
        retryable: bool,
        now: Timestamp,
    ) -> Result<(), Error> {
        let (i, _) = self.fence(&task_id, attempt)?;
        self.require_open()?;
        self.attempt_failed(i, attempt, error, retryable, None, now);
        Ok(())
    }
}
