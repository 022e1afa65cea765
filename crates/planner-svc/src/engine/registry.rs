//! The session registry: which sessions are in memory, each behind its own lock, when each was
//! last used, and which were seen ended. Memory only; loading from the store is the driver's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use planner_core::{Event, Planner, TaskId};

/// One session in memory.
pub(super) struct Slot {
    /// A `tokio` mutex: the store append and the sending of the messages are awaited while it
    /// is held, so that a session's commands are persisted and published in order (the bus's
    /// acks are awaited after it is released: they guard no order). Sessions never wait on each
    /// other: each has its own.
    pub(super) state: tokio::sync::Mutex<SlotState>,
    last_used_ms: AtomicU64,
    /// The trace of the session's latest command that decided work (a request, a report, an
    /// answer, a cancellation; not the lease-keeping claims and heartbeats, nor ticks): the
    /// ticks it scheduled run in it, so a retry is in the trace of its request. A
    /// `std::sync::Mutex` beside the session's lock, not under it: a tick reads it without
    /// queueing behind a command, and nothing is awaited while it is held.
    trace: Mutex<Option<crate::trace::TraceParent>>,
}

impl Slot {
    /// The trace of the session's latest command that decided work.
    pub(super) fn trace(&self) -> Option<crate::trace::TraceParent> {
        *lock(&self.trace)
    }

    /// Remembers `context` as the trace of the session's latest command that decided work.
    pub(super) fn remember_trace(&self, context: crate::trace::TraceParent) {
        *lock(&self.trace) = Some(context);
    }
}

/// What a session's lock guards.
#[derive(Default)]
pub(super) struct SlotState {
    /// The planner, when loaded; `None` forces a reload from the store (after a failed append,
    /// or when another instance may have moved the session on).
    pub(super) planner: Option<Planner>,
    /// A publish failed after its events were persisted: the outbox sweep re-publishes.
    pub(super) unpublished: bool,
    /// Set from deciding a command until its append and publish returned. Found set, the
    /// command was abandoned half way (its caller gave up: an HTTP request past its time
    /// limit, a client gone), so the planner may hold events the store does not, or
    /// dispatches never published: it is reloaded, and the load re-publishes.
    pub(super) deciding: bool,
    /// The trace id this instance last stored with one of the session's appends: an append
    /// in the same trace stores none (see `Engine::drive`).
    pub(super) appended_trace: Option<[u8; 16]>,
    /// The trace each running attempt was dispatched in: an executor's claim, heartbeat or
    /// report of it that carries no `traceparent` (executors send one only for sampled traces)
    /// is handled in it. An entry lives from the dispatch to the attempt's end (or the next
    /// attempt's dispatch), so there are at most as many as running tasks: a list, searched
    /// under the session's lock.
    pub(super) attempt_traces: Vec<(TaskId, u32, crate::trace::TraceParent)>,
    /// A snapshot of the session is being saved (after its lock was released): a snapshot
    /// point reached meanwhile is skipped, so saves of one session never overlap (a store
    /// may write each through one temporary file, or replace the older object's chunks).
    pub(super) snapshot_saving: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlotState {
    /// The trace `task`'s attempt `attempt` was dispatched in, while it runs.
    pub(super) fn attempt_trace(
        &self,
        task: &TaskId,
        attempt: u32,
    ) -> Option<crate::trace::TraceParent> {
        self.attempt_traces
            .iter()
            .find(|(id, dispatched, _)| id == task && *dispatched == attempt)
            .map(|(_, _, context)| *context)
    }
}

/// Keeps in `traces` (a [`SlotState::attempt_traces`]) the trace of the attempts `events`
/// dispatch (`context`), and forgets those of the tasks they end.
pub(super) fn note_attempts(
    traces: &mut Vec<(TaskId, u32, crate::trace::TraceParent)>,
    events: &[Event],
    context: crate::trace::TraceParent,
) {
    for event in events {
        match event {
            Event::TaskDispatched {
                task_id, attempt, ..
            } => {
                traces.retain(|(id, _, _)| id != task_id);
                traces.push((task_id.clone(), *attempt, context));
            }
            Event::TaskStatusUpdated {
                task_id, status, ..
            } if status.is_terminal() => {
                traces.retain(|(id, _, _)| id != task_id);
            }
            _ => {}
        }
    }
}

/// Sessions in memory and sessions seen ended.
pub(super) struct Registry {
    /// Most sessions remembered as ended (or quarantined): both maps are caches that save
    /// recovery a load, so past the bound they are emptied and refilled as recovery meets
    /// the sessions again; memory stays bounded whatever the number of sessions ever run.
    max_remembered: usize,
    sessions: Mutex<HashMap<String, Arc<Slot>>>,
    /// Sessions seen ended, with the version they ended at: recovery skips them until their
    /// version moves (a follow-up reopened them).
    ended: Mutex<HashMap<String, u64>>,
    /// Sessions whose log could not be loaded: the version then, why, and since when (ms).
    quarantined: Mutex<HashMap<String, (u64, String, u64)>>,
    /// How many sessions in memory trigger an eviction between sweeps: an eighth over the
    /// bound, or over what the last eviction could not drop (sessions in use), so that the
    /// O(n log n) pass runs once per n/8 new sessions at most.
    evict_above: std::sync::atomic::AtomicUsize,
}

/// The maps (and a slot's trace) are only held for lookups and inserts; nothing can leave them
/// half-changed, so a poisoned lock is safe to use.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    pub(super) fn new(max_remembered: usize) -> Self {
        Registry {
            max_remembered: max_remembered.max(1),
            sessions: Mutex::default(),
            ended: Mutex::default(),
            quarantined: Mutex::default(),
            evict_above: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Evicts now if the sessions in memory passed the trigger (see `evict_above`): the bound
    /// `max_loaded` holds between sweeps too, whatever the rate new sessions arrive at. `len`
    /// is what [`Registry::slot`] saw, so the common case costs one atomic load, no lock.
    pub(super) fn evict_if_over(&self, len: usize, now_ms: u64, idle_ms: u64, max_loaded: usize) {
        let trigger = self
            .evict_above
            .load(Ordering::Relaxed)
            .max(max_loaded.saturating_add(max_loaded / 8));
        if len <= trigger {
            return;
        }
        self.evict(now_ms, idle_ms, max_loaded);
        let left = self.len();
        self.evict_above
            .store(left.saturating_add(left / 8), Ordering::Relaxed);
    }

    /// The session's slot, created empty if absent, marked used at `now_ms`; and how many
    /// sessions are in memory with it.
    pub(super) fn slot(&self, session: &str, now_ms: u64) -> (Arc<Slot>, usize) {
        let mut sessions = lock(&self.sessions);
        let slot = Arc::clone(sessions.entry(session.to_owned()).or_insert_with(|| {
            Arc::new(Slot {
                state: tokio::sync::Mutex::new(SlotState::default()),
                last_used_ms: AtomicU64::new(now_ms),
                trace: Mutex::new(None),
            })
        }));
        let len = sessions.len();
        drop(sessions);
        slot.last_used_ms.store(now_ms, Ordering::Relaxed);
        (slot, len)
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// The slot of `session` if it is in memory (without creating one).
    pub(super) fn get(&self, session: &str) -> Option<Arc<Slot>> {
        lock(&self.sessions).get(session).cloned()
    }

    /// Drops `slot`, the slot of `session`, if nobody else uses it and it holds no planner
    /// (recovery made it, then found nothing to keep: an ended session, a failed load).
    pub(super) fn remove_unused(&self, session: &str, slot: Arc<Slot>) {
        let mut sessions = lock(&self.sessions);
        let unused = sessions.get(session).is_some_and(|held| {
            Arc::ptr_eq(held, &slot)
                && Arc::strong_count(&slot) == 2
                && slot.state.try_lock().is_ok_and(|s| s.planner.is_none())
        });
        if unused {
            sessions.remove(session);
        }
    }

    pub(super) fn contains(&self, session: &str) -> bool {
        lock(&self.sessions).contains_key(session)
    }

    /// Drops every session `doomed` names, in use or not.
    pub(super) fn remove_where(&self, doomed: impl Fn(&str) -> bool) {
        lock(&self.sessions).retain(|session, _| !doomed(session));
    }

    /// Every slot in memory, to visit without holding the map.
    pub(super) fn all(&self) -> Vec<(String, Arc<Slot>)> {
        lock(&self.sessions)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }

    /// The version a session was seen ended at, if it was.
    pub(super) fn ended_at(&self, session: &str) -> Option<u64> {
        lock(&self.ended).get(session).copied()
    }

    pub(super) fn mark_ended(&self, session: &str, version: u64) {
        let mut ended = lock(&self.ended);
        if ended.len() >= self.max_remembered {
            ended.clear();
        }
        ended.insert(session.to_owned(), version);
    }

    /// Quarantines `session` at `version` for `reason`, first at `now_ms` (a session
    /// quarantined again keeps the time it was first quarantined).
    pub(super) fn quarantine(&self, session: &str, version: u64, reason: String, now_ms: u64) {
        let mut quarantined = lock(&self.quarantined);
        if quarantined.len() >= self.max_remembered {
            quarantined.clear();
        }
        let since = quarantined
            .get(session)
            .map_or(now_ms, |(_, _, since)| *since);
        quarantined.insert(session.to_owned(), (version, reason, since));
    }

    pub(super) fn quarantined_at(&self, session: &str) -> Option<u64> {
        lock(&self.quarantined).get(session).map(|(v, _, _)| *v)
    }

    /// Drops `session` from the quarantine; whether it was in it.
    pub(super) fn release_quarantine(&self, session: &str) -> bool {
        lock(&self.quarantined).remove(session).is_some()
    }

    /// Quarantined sessions: (session, why, since when in ms), sorted by session.
    pub(super) fn quarantined(&self) -> Vec<(String, String, u64)> {
        let mut list: Vec<(String, String, u64)> = lock(&self.quarantined)
            .iter()
            .map(|(s, (_, why, since))| (s.clone(), why.clone(), *since))
            .collect();
        list.sort();
        list
    }

    /// Drops sessions idle for `idle_ms` at `now_ms`, and the least recently used ones past
    /// `max_loaded`. Only a session nobody is using, with nothing left to publish, is dropped;
    /// its timer stays armed and reloads it when it fires.
    pub(super) fn evict(&self, now_ms: u64, idle_ms: u64, max_loaded: usize) {
        let mut sessions = lock(&self.sessions);
        let mut by_age: Vec<(u64, String)> = sessions
            .iter()
            .map(|(k, v)| (v.last_used_ms.load(Ordering::Relaxed), k.clone()))
            .collect();
        by_age.sort();
        let over = by_age.len().saturating_sub(max_loaded);
        for (i, (last_used, session)) in by_age.iter().enumerate() {
            let idle = now_ms.saturating_sub(*last_used) >= idle_ms;
            if !(idle || i < over) {
                continue;
            }
            let Some(slot) = sessions.get(session) else {
                continue;
            };
            // The map's reference is the only one: no command holds or waits for the slot.
            let evictable =
                Arc::strong_count(slot) == 1 && slot.state.try_lock().is_ok_and(|s| !s.unpublished);
            if evictable {
                sessions.remove(session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Registry;

    #[test]
    fn sessions_in_memory_stay_near_the_bound_between_sweeps() {
        let registry = Registry::new(100);
        let (busy, _) = registry.slot("busy", 0);
        for i in 0..10_000u64 {
            let (slot, len) = registry.slot(&format!("s{i}"), i);
            drop(slot);
            // What the engine does on every slot it hands out; nothing idles long enough here.
            registry.evict_if_over(len, i, u64::MAX, 100);
            assert!(
                registry.len() <= 100 + 100 / 8 + 1,
                "{} at {i}",
                registry.len()
            );
        }
        // A session in use is never dropped.
        assert!(registry.contains("busy"));
        drop(busy);
    }

    #[test]
    fn sessions_remembered_as_ended_stay_within_the_bound() {
        let registry = Registry::new(100);
        for i in 0..10_000u64 {
            registry.mark_ended(&format!("s{i}"), i);
            registry.quarantine(&format!("q{i}"), i, "corrupt".into(), i);
        }
        assert!(registry.ended.lock().map_or(0, |e| e.len()) <= 100);
        assert!(registry.quarantined().len() <= 100);
        assert_eq!(registry.ended_at("s9999"), Some(9_999));
    }
}
