//! The in-memory store: for tests and the embedded run. Nothing survives the process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use planner_core::Event;

use crate::contract::{check_stream, EventStore, Snapshot, StoreError};

/// Events and snapshots in a map. A `std::sync::Mutex` is right here: nothing is awaited while it
/// is held, and each operation is a short copy.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    streams: BTreeMap<String, Vec<Event>>,
    snapshots: BTreeMap<String, Snapshot>,
    /// Unfinished streams: exact, as it changes under the same lock as the events.
    open: BTreeSet<String>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written stream (each operation is
        // one push or one clone), so a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl EventStore for MemoryStore {
    async fn append(
        &self,
        stream: &str,
        expected_version: u64,
        events: &[Event],
    ) -> Result<u64, StoreError> {
        check_stream(stream)?;
        let mut inner = self.lock();
        let current = inner.streams.get(stream).map_or(0, Vec::len) as u64;
        if current != expected_version {
            return Err(StoreError::Conflict {
                stream: stream.to_owned(),
                expected: expected_version,
                actual: current,
            });
        }
        if events.is_empty() {
            return Ok(current);
        }
        match planner_core::open_after(events) {
            Some(true) => {
                inner.open.insert(stream.to_owned());
            }
            Some(false) => {
                inner.open.remove(stream);
            }
            None => {}
        }
        let log = inner.streams.entry(stream.to_owned()).or_default();
        log.extend_from_slice(events);
        Ok(log.len() as u64)
    }

    async fn load_from(&self, stream: &str, version: u64) -> Result<Vec<Event>, StoreError> {
        check_stream(stream)?;
        let inner = self.lock();
        let events = inner.streams.get(stream).map_or(&[][..], Vec::as_slice);
        let from = usize::try_from(version)
            .unwrap_or(usize::MAX)
            .min(events.len());
        Ok(events[from..].to_vec())
    }

    async fn version(&self, stream: &str) -> Result<u64, StoreError> {
        check_stream(stream)?;
        Ok(self.lock().streams.get(stream).map_or(0, Vec::len) as u64)
    }

    async fn list_streams(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock().streams.keys().cloned().collect())
    }

    async fn list_open(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock().open.iter().cloned().collect())
    }

    async fn forget_open(&self, stream: &str, version: u64) -> Result<(), StoreError> {
        check_stream(stream)?;
        // The index is exact; this only matters if it was not (nothing appended since).
        let mut inner = self.lock();
        if inner.streams.get(stream).map_or(0, Vec::len) as u64 == version {
            inner.open.remove(stream);
        }
        Ok(())
    }

    async fn save_snapshot(&self, stream: &str, snapshot: &Snapshot) -> Result<(), StoreError> {
        check_stream(stream)?;
        self.lock()
            .snapshots
            .insert(stream.to_owned(), snapshot.clone());
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        check_stream(stream)?;
        Ok(self.lock().snapshots.get(stream).cloned())
    }
}
