//! The list of sessions: an in-memory index of [`SessionSummary`]s.
//!
//! Built once at start by a background scan of the store (every stream, each loaded from its
//! newest snapshot and tail: O(all sessions) once, not per request), then kept by the engine's
//! append hook ([`Engine::observe`]). A list request filters and sorts the index: O(n log n) in
//! the sessions indexed, never a store read. Limits, also in `docs/http.md`:
//!
//! - at most `http.index_max_sessions` sessions are kept (the most recently started);
//! - it is per instance: appends made by other instances sharing the store reach it when a
//!   session's page is read on this instance, at the next rescan (after a lag), or never for
//!   sessions nobody reads here;
//! - the search looks in the first 2,000 characters of each request, ignoring case.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use planner_core::{Event, PlannerState};
use planner_store::EventStore;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::engine::{Appended, Engine, Publisher, SessionSummary};

/// How much of each request the search looks in, in characters.
const SEARCHED_CHARS: usize = 2_000;

struct Entry {
    summary: SessionSummary,
    /// The requests, lowercased, cut to [`SEARCHED_CHARS`] each.
    searched: String,
}

/// What a list request asks for.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only sessions of this status.
    pub status: Option<String>,
    /// Only sessions one of whose requests contains this, ignoring case.
    pub search: Option<String>,
    /// Skip this many.
    pub offset: usize,
    /// At most this many.
    pub limit: usize,
}

/// The index. See the module docs.
pub struct SessionIndex {
    max: usize,
    entries: RwLock<HashMap<String, Entry>>,
    complete: AtomicBool,
    /// Summaries as they change: the live stream of the list view.
    changes: broadcast::Sender<Arc<SessionSummary>>,
}

impl std::fmt::Debug for SessionIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionIndex")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

fn searched_text<'a>(requests: impl Iterator<Item = &'a String>) -> String {
    requests
        .map(|r| {
            r.chars()
                .take(SEARCHED_CHARS)
                .collect::<String>()
                .to_lowercase()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl SessionIndex {
    /// An empty index of at most `max` sessions.
    pub fn new(max: usize) -> Self {
        SessionIndex {
            max: max.max(1),
            entries: RwLock::default(),
            complete: AtomicBool::new(false),
            changes: broadcast::channel(crate::engine::OBSERVER_CAPACITY).0,
        }
    }

    /// Summaries as they change, from now on.
    pub fn changes(&self) -> broadcast::Receiver<Arc<SessionSummary>> {
        self.changes.subscribe()
    }

    /// Whether the start-up scan has finished (until then a list may miss older sessions).
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Relaxed)
    }

    /// Records `state` of `session`, unless the index already holds a newer version.
    pub fn put_state(&self, session: &str, state: &PlannerState) {
        let summary = SessionSummary::of(session, state);
        let searched = searched_text(state.requests.iter());
        self.put(summary, |_| searched);
    }

    /// Records an append the engine made.
    fn put_appended(&self, appended: &Appended) {
        let new_requests: Vec<String> = appended
            .events
            .iter()
            .filter_map(|e| match e {
                Event::RequestReceived { input, .. } => Some(input.clone()),
                _ => None,
            })
            .collect();
        self.put(appended.summary.clone(), |old| {
            let added = searched_text(new_requests.iter());
            match (old, added.is_empty()) {
                (Some(old), true) => old.to_owned(),
                (Some(old), false) if !old.is_empty() => format!("{old}\n{added}"),
                _ => added,
            }
        });
    }

    fn put(&self, summary: SessionSummary, searched: impl FnOnce(Option<&str>) -> String) {
        {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            let old = entries.get(&summary.session);
            if old.is_some_and(|old| old.summary.version >= summary.version) {
                return;
            }
            let searched = searched(old.map(|o| o.searched.as_str()));
            entries.insert(
                summary.session.clone(),
                Entry {
                    summary: summary.clone(),
                    searched,
                },
            );
            if entries.len() > self.max.saturating_add(self.max / 8) {
                let mut by_age: Vec<(Option<planner_core::Timestamp>, String)> = entries
                    .values()
                    .map(|e| (e.summary.started_at, e.summary.session.clone()))
                    .collect();
                by_age.sort();
                let over = entries.len() - self.max;
                for (_, session) in by_age.into_iter().take(over) {
                    entries.remove(&session);
                }
            }
        }
        let _ = self.changes.send(Arc::new(summary));
    }

    /// One page of the sessions `query` selects, newest first, and how many it selects.
    pub fn list(&self, query: &ListQuery) -> (Vec<SessionSummary>, usize) {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let search = query.search.as_deref().map(str::to_lowercase);
        let mut selected: Vec<&SessionSummary> = entries
            .values()
            .filter(|e| query.status.as_ref().is_none_or(|s| *s == e.summary.status))
            .filter(|e| {
                search
                    .as_ref()
                    .is_none_or(|s| e.searched.contains(s.as_str()))
            })
            .map(|e| &e.summary)
            .collect();
        selected.sort_by(|a, b| {
            b.started_at
                .cmp(&a.started_at)
                .then_with(|| a.session.cmp(&b.session))
        });
        let total = selected.len();
        let page = selected
            .into_iter()
            .skip(query.offset)
            .take(query.limit)
            .cloned()
            .collect();
        (page, total)
    }

    /// Keeps the index: scans the store once, then follows the engine's appends until
    /// `shutdown`. A follower that lags behind rescans.
    pub async fn maintain<S: EventStore, P: Publisher>(
        self: Arc<Self>,
        engine: Arc<Engine<S, P>>,
        shutdown: CancellationToken,
    ) {
        let mut appends = engine.observe();
        let mut scan = true;
        loop {
            if scan {
                scan = false;
                self.scan(&engine).await;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = appends.recv() => match received {
                    Ok(appended) => self.put_appended(&appended),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "the session index fell behind the engine; rescanning the store");
                        scan = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    async fn scan<S: EventStore, P: Publisher>(&self, engine: &Engine<S, P>) {
        let sessions = match engine.store().list_streams().await {
            Ok(sessions) => sessions,
            Err(error) => {
                tracing::warn!(%error, "cannot list the sessions for the HTTP index");
                return;
            }
        };
        for session in sessions {
            match engine.read(&session).await {
                Ok(planner) => self.put_state(&session, planner.state()),
                Err(error) => tracing::warn!(session, %error, "cannot index a session"),
            }
        }
        self.complete.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(session: &str, status: &str, started: u64, version: u64) -> SessionSummary {
        SessionSummary {
            session: session.into(),
            status: status.into(),
            version,
            request: String::new(),
            requests: 1,
            started_at: Some(planner_core::Timestamp(started)),
            updated_at: planner_core::Timestamp(started),
            tasks: Default::default(),
            questions: 0,
        }
    }

    #[test]
    fn lists_filter_search_and_page_newest_first() {
        let index = SessionIndex::new(10);
        for i in 0..5u64 {
            let status = if i % 2 == 0 { "running" } else { "completed" };
            let text = format!("Book flight {i}");
            index.put(summary(&format!("s{i}"), status, i, 1), |_| {
                text.to_lowercase()
            });
        }
        let all = |q: ListQuery| {
            let (page, total) = index.list(&q);
            (
                page.into_iter().map(|s| s.session).collect::<Vec<_>>(),
                total,
            )
        };
        let q = ListQuery {
            limit: 2,
            ..Default::default()
        };
        assert_eq!(all(q.clone()), (vec!["s4".into(), "s3".into()], 5));
        assert_eq!(
            all(ListQuery {
                offset: 4,
                ..q.clone()
            }),
            (vec!["s0".into()], 5)
        );
        let running = ListQuery {
            status: Some("running".into()),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(
            all(running),
            (vec!["s4".into(), "s2".into(), "s0".into()], 3)
        );
        let search = ListQuery {
            search: Some("FLIGHT 3".into()),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(all(search), (vec!["s3".into()], 1));
        // An older version never replaces a newer one.
        index.put(summary("s4", "failed", 4, 0), |_| String::new());
        assert_eq!(index.list(&q).0[0].status, "running");
    }

    #[test]
    fn requests_in_any_script_are_searched_ignoring_case_and_cut_on_characters() {
        let index = SessionIndex::new(10);
        let requests = [
            "Найди погоду в Париже и кратко опиши",
            "Überprüfe die Datei, dann fasse sie zusammen",
            "查找巴黎的天气，然后总结",
        ];
        for (i, request) in requests.iter().enumerate() {
            let text = searched_text([request.to_string()].iter());
            index.put(summary(&format!("s{i}"), "running", i as u64, 1), |_| {
                text.clone()
            });
        }
        let found = |search: &str| {
            let query = ListQuery {
                search: Some(search.into()),
                limit: 10,
                ..Default::default()
            };
            index
                .list(&query)
                .0
                .into_iter()
                .map(|s| s.session)
                .collect::<Vec<_>>()
        };
        assert_eq!(found("ПАРИЖЕ"), vec!["s0".to_owned()]);
        assert_eq!(found("ÜBERPRÜFE"), vec!["s1".to_owned()]);
        assert_eq!(found("巴黎"), vec!["s2".to_owned()]);
        // A request longer than what is searched is cut on a character, never inside one.
        let long: String = "é".repeat(SEARCHED_CHARS + 10);
        let cut = searched_text([long].iter());
        assert_eq!(cut.chars().count(), SEARCHED_CHARS);
    }

    #[test]
    fn the_oldest_sessions_leave_past_the_bound() {
        let index = SessionIndex::new(8);
        for i in 0..100u64 {
            index.put(summary(&format!("s{i}"), "running", i, 1), |_| {
                String::new()
            });
        }
        let (page, total) = index.list(&ListQuery {
            limit: 100,
            ..Default::default()
        });
        assert!(total <= 9, "{total}");
        assert_eq!(page[0].session, "s99");
    }
}
