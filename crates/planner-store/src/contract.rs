//! The contract every store keeps, and its errors.

use std::future::Future;

use planner_core::codec::DecodeError;
use planner_core::{Event, PlannerState};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where a session's events live.
///
/// A *stream* holds one session's events; its *version* is the number of events in it. Every
/// implementation keeps these promises, checked by one conformance suite:
///
/// - `append` is atomic: the events of one call land together or not at all.
/// - `append` is optimistic: it succeeds only if the stream is at `expected_version`; otherwise it
///   fails with [`StoreError::Conflict`] and writes nothing. Of concurrent appends at one version,
///   exactly one wins.
/// - An acknowledged append is durable to the degree the store's configuration promises (see each
///   store's docs), and is seen by every later load.
/// - Stream ids are valid subject tokens ([`planner_core::is_valid_token`]).
/// - [`EventStore::list_open`] never omits a stream whose plan is unfinished.
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` if it is at `expected_version`; returns the new version.
    fn append(
        &self,
        stream: &str,
        expected_version: u64,
        events: &[Event],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// As [`EventStore::append`], with `meta` kept beside the events where the store can keep
    /// it (the JetStream store: headers of the append's message, read back by
    /// [`EventStore::load_batches`]). The metadata is never part of the events: replay and
    /// folding never see it. By default it is dropped (the memory and file stores do).
    fn append_with(
        &self,
        stream: &str,
        expected_version: u64,
        events: &[Event],
        meta: &AppendMeta,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let _ = meta;
        self.append(stream, expected_version, events)
    }

    /// The events of `stream` from `version` on (the first event is version 0). Empty for an
    /// unknown stream or a version at or past its end.
    fn load_from(
        &self,
        stream: &str,
        version: u64,
    ) -> impl Future<Output = Result<Vec<Event>, StoreError>> + Send;

    /// Every event of `stream`.
    fn load_all(
        &self,
        stream: &str,
    ) -> impl Future<Output = Result<Vec<Event>, StoreError>> + Send {
        self.load_from(stream, 0)
    }

    /// The number of events in `stream` (0 for an unknown stream).
    fn version(&self, stream: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Every append of `stream` as the store keeps it, in order: where each says it starts
    /// and its events, or why they cannot be decoded. For consistency checks
    /// (`planner-svc check`): unlike [`EventStore::load_from`], a batch that does not decode
    /// does not stop the listing, and the versions are the store's own record of them, so a
    /// gap shows. The default is one batch of everything `load_all` returns.
    fn load_batches(
        &self,
        stream: &str,
    ) -> impl Future<Output = Result<Vec<StoredBatch>, StoreError>> + Send {
        async move {
            let events = self.load_all(stream).await?;
            Ok(vec![StoredBatch {
                base_version: Some(0),
                events: Ok(events),
                traceparent: None,
            }])
        }
    }

    /// Every stream with at least one event, sorted: the sessions to recover at start-up.
    fn list_streams(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// The streams whose plan may be unfinished, sorted: what recovery visits. Read from an
    /// index the store keeps on `append` (from [`planner_core::open_after`]), so it costs
    /// O(unfinished sessions), not O(every session ever). It never omits an unfinished stream;
    /// it may name one that ended (a crash between an append and the index update), which the
    /// caller drops with [`EventStore::forget_open`] once it has loaded it.
    fn list_open(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// The caller loaded `stream` at `version` and found its plan ended: drop it from the index
    /// of [`EventStore::list_open`], unless an append at `version` or later (a follow-up that
    /// reopened it) has marked it open since.
    fn forget_open(
        &self,
        stream: &str,
        version: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Keeps `snapshot` as the newest snapshot of `stream`, replacing any older one.
    fn save_snapshot(
        &self,
        stream: &str,
        snapshot: &Snapshot,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The newest snapshot of `stream`. A snapshot that no longer decodes (after a schema
    /// change, say) is reported with a warning and treated as absent: the caller replays in full.
    fn load_snapshot(
        &self,
        stream: &str,
    ) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send;
}

/// One stored append, as [`EventStore::load_batches`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBatch {
    /// The version the batch starts at as the store recorded it; `None` when the record does
    /// not say (or says it in a form that cannot be read).
    pub base_version: Option<u64>,
    /// Its events, or why they cannot be decoded.
    pub events: Result<Vec<Event>, String>,
    /// The W3C `traceparent` it was appended with ([`AppendMeta::traceparent`]), when the
    /// store keeps it: what ties the append to the trace of the work that caused it.
    pub traceparent: Option<String>,
}

/// What a caller knows of an append besides its events ([`EventStore::append_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppendMeta {
    /// The W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) of the work that caused the
    /// append. A store keeps it only if it is a header-safe value (visible ASCII, at most
    /// [`AppendMeta::MAX_TRACEPARENT`] bytes); anything else is dropped, never refused: it
    /// must not fail an append.
    pub traceparent: Option<String>,
}

impl AppendMeta {
    /// The longest `traceparent` kept (a version-00 value is 55 bytes; later versions may
    /// append fields).
    pub const MAX_TRACEPARENT: usize = 256;

    /// Metadata naming the trace of the append.
    pub fn traced(traceparent: impl Into<String>) -> Self {
        AppendMeta {
            traceparent: Some(traceparent.into()),
        }
    }

    /// The `traceparent` if it is safe to store as a header value.
    pub fn storable_traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref().filter(|value| {
            !value.is_empty()
                && value.len() <= Self::MAX_TRACEPARENT
                && value.bytes().all(|b| b.is_ascii_graphic())
        })
    }
}

/// The layout version of [`Snapshot`]s. Bump it when `PlannerState` changes shape in a way old
/// snapshots cannot be read as: they are then ignored and sessions replay in full.
pub const SNAPSHOT_SCHEMA_VERSION: u32 = 1;

/// A planner's state at a version of its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The layout version ([`SNAPSHOT_SCHEMA_VERSION`] when written by this build).
    pub schema: u32,
    /// How many events the state has applied.
    pub version: u64,
    /// The state.
    pub state: PlannerState,
}

impl Snapshot {
    /// A snapshot of `state` in today's layout.
    pub fn of(state: &PlannerState) -> Self {
        Snapshot {
            schema: SNAPSHOT_SCHEMA_VERSION,
            version: state.version,
            state: state.clone(),
        }
    }

    /// Encodes the snapshot as JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing the state cannot fail: string keys only, no floats.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a snapshot; `None` (with the reason) if it is of another layout or malformed.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if snapshot.schema != SNAPSHOT_SCHEMA_VERSION {
            return Err(format!(
                "snapshot layout {} is not this build's {}",
                snapshot.schema, SNAPSHOT_SCHEMA_VERSION
            ));
        }
        if snapshot.state.version != snapshot.version {
            return Err(format!(
                "snapshot says version {} but its state is at {}",
                snapshot.version, snapshot.state.version
            ));
        }
        Ok(snapshot)
    }
}

/// Why a store operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream was not at the expected version: someone else appended first. Reload and retry.
    #[error("stream {stream} is at version {actual}, not the expected {expected}")]
    Conflict {
        /// The stream.
        stream: String,
        /// The version the caller expected.
        expected: u64,
        /// The version the stream is at.
        actual: u64,
    },
    /// The stream id is not a valid subject token.
    #[error("invalid stream id {stream:?}: use 1 to 64 characters from A-Z a-z 0-9 _ -")]
    InvalidStream {
        /// The id.
        stream: String,
    },
    /// One append is larger than the store accepts.
    #[error("an append to {stream} is {bytes} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The stream.
        stream: String,
        /// The encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Stored bytes failed their checksum or framing somewhere other than a torn tail.
    #[error("corrupt event log {path} at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Stored events could not be decoded.
    #[error("cannot decode events of stream {stream} at version {version}: {source}")]
    Decode {
        /// The stream.
        stream: String,
        /// The version of the first event of the record.
        version: u64,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The store was opened read-only (an operator command): it does not write.
    #[error("the event store at {path} is open read-only")]
    ReadOnly {
        /// The store's directory.
        path: String,
    },
    /// Another process holds the store's lock.
    #[error("the event store at {path} is in use by another process (lock file held)")]
    Locked {
        /// The lock file.
        path: String,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A NATS or JetStream operation failed.
    #[error("JetStream {operation} failed: {message}")]
    Nats {
        /// What was being done.
        operation: &'static str,
        /// The client's error.
        message: String,
    },
    /// The NATS server is too old for this store.
    #[error("nats-server {version} is not supported: 2.10 or newer is required")]
    UnsupportedServer {
        /// The server's version.
        version: String,
    },
    /// The store stopped after a write it could not undo; reopen it.
    #[error("the event store is unusable after an earlier write failure; reopen it")]
    Poisoned,
}

impl StoreError {
    /// Whether the caller should reload the stream and retry its command.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

pub(crate) fn check_stream(stream: &str) -> Result<(), StoreError> {
    if planner_core::is_valid_token(stream) {
        Ok(())
    } else {
        Err(StoreError::InvalidStream {
            stream: stream.to_owned(),
        })
    }
}
