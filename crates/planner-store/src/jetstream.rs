//! The JetStream store: one stream, one subject per session, for production.
//!
//! # Layout on the server
//!
//! - Stream `config.stream_name` captures `{subject_prefix}.*`; session `s` is subject
//!   `{subject_prefix}.s`, so a session replays by reading its subject's messages, without
//!   reading the others. A load reads its first messages one request each (the stream API's
//!   "next message on this subject", answered by the stream's leader so it is never stale) and
//!   only a long replay creates a consumer, which it deletes when done: a load leaves nothing
//!   behind on the server, whose consumers per stream are limited.
//! - Each append is **one message** holding the whole batch (a JSON array of versioned events),
//!   so it is atomic on every server version. Headers: `Planner-Version` (the session's version
//!   after the batch), `Planner-Batch-Id`, and `traceparent` when the append was given one
//!   ([`crate::AppendMeta`]): the W3C trace context of the work that caused it, which
//!   [`EventStore::load_batches`] reads back (and `nats stream get` shows), so an operator can
//!   tie a session's events to their trace. It is metadata: loading and replay ignore it.
//! - Snapshots are kept in the Object Store bucket `config.snapshot_bucket`, one object per
//!   session (an object store, not a KV bucket, because a large session's state is many MiB
//!   and the object store chunks it under the server's `max_payload`), LZ4-compressed after a
//!   header line `lz4 <stream sequence>` that lets a load start replay right after it.
//!
//! - The index of unfinished sessions ([`EventStore::list_open`]) is a second stream,
//!   `{stream_name}_OPEN`, capturing `{subject_prefix}.open.*` with one message per subject
//!   (`max_msgs_per_subject = 1`): a session's *marker* says "may be unfinished". Listing reads
//!   the stream's subjects (the stream-info subjects filter), so it costs O(unfinished); a KV
//!   bucket was not used because a deleted key leaves a tombstone that listing its keys still
//!   delivers (O(every session ever)), while a purged subject leaves nothing.
//!
//! # The index of unfinished sessions
//!
//! Its one promise: it never omits an unfinished session. A batch that opens a plan
//! ([`planner_core::open_after`]) writes the marker *before* the batch is appended, with
//! header `Planner-Version` = the version the batch is appended at; a batch that ends it purges
//! the marker *after* it is appended, in a task of its own (the append returns once the events
//! are durable, not after the bookkeeping). A crash between the two, or a purge that fails,
//! leaves a marker for an ended session, which recovery loads once and drops
//! ([`EventStore::forget_open`]). A purge removes
//! only a marker written for an earlier version than the end it saw (a purge up to the marker's
//! sequence), so it never removes the marker of a follow-up that reopened the session
//! meanwhile. A store written before the index is backfilled once at connect: every session
//! gets a marker, unless it has one, and the stream's metadata records that the backfill ended
//! (a crash during it runs it again).
//!
//! # Concurrency and duplicates
//!
//! An append sends `Nats-Expected-Last-Subject-Sequence`: the stream sequence of the session's
//! last message when the caller's version was current. If another writer appended since, the
//! server refuses it (`WrongLastSequence`) and the append fails with [`StoreError::Conflict`].
//! The sequence for a version is remembered after each append and load, and read from the
//! subject's last message otherwise. A new session sends 0 ("the subject must be empty"), so two
//! concurrent creates cannot both win; it reads nothing first, as the server's check is the
//! read's answer.
//!
//! `Planner-Batch-Id` is `{session}:{expected version}:{crc32 of the batch}:{writer}`. A retried
//! append whose first try landed (its ack lost) is refused by the sequence check; the store then
//! reads the session's last message and, if it carries the same batch id, reports the append as
//! the success it was. The writer id keeps another instance's identical batch (the same
//! command handled at the same millisecond) from passing for this one's. `Nats-Msg-Id` is not used: measured on nats-server 2.15, the server checks the
//! expected sequence *before* its duplicate window, so for conditional appends the id only cost
//! the server a dedup-table entry per message.
//!
//! # Durability
//!
//! An append returns after the server's ack. With file storage and one replica, an ack means the
//! message is in the server's page cache; the server fsyncs every 2 minutes unless it runs with
//! `sync_interval: always` (see `deploy/`), or the stream is replicated (R3), in which case an ack
//! means a quorum has it.
//!
//! # Server versions
//!
//! nats-server 2.10 or newer. [`JetStreamStore::connect`] refuses an older server with
//! [`StoreError::UnsupportedServer`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::object_store::{self, GetErrorKind};
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind, StorageType};
use async_nats::jetstream::{self, Context};
use bytes::Bytes;
use futures::StreamExt;
use planner_core::codec;
use planner_core::Event;

use crate::contract::{check_stream, AppendMeta, EventStore, Snapshot, StoreError, StoredBatch};

const VERSION: &str = "Planner-Version";
const BATCH_ID: &str = "Planner-Batch-Id";
/// The W3C trace context header (`crate::AppendMeta::traceparent`).
const TRACEPARENT: &str = "traceparent";
/// The open index stream's metadata key saying its backfill ended.
const INDEX_METADATA: &str = "planner-open-index";
const INDEX_COMPLETE: &str = "complete";
/// Messages per pull while replaying through a consumer.
const REPLAY_BATCH: usize = 16;
/// Messages read one request each before a replay switches to a consumer.
const DIRECT_READS: usize = 32;
/// Sessions whose positions are cached, at most (per cache).
const MAX_CACHED_POSITIONS: usize = 100_000;
/// How long the server keeps a replay consumer its creator stopped using (it died).
const REPLAY_CONSUMER_IDLE: Duration = Duration::from_secs(10);

/// Settings of a [`JetStreamStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// The stream's name.
    pub stream_name: String,
    /// Sessions are subjects `{subject_prefix}.{session}`.
    pub subject_prefix: String,
    /// The Object Store bucket for snapshots.
    pub snapshot_bucket: String,
    /// File (durable) or memory storage.
    pub storage: StorageType,
    /// Copies kept by the cluster (1, 3 or 5).
    pub replicas: usize,
    /// The stream's size limit in bytes (-1: none).
    pub max_bytes: i64,
    /// The largest append, in bytes; also limited by the server's `max_payload` (1 MiB by
    /// default; raise it in the server config for larger plans).
    pub max_message_bytes: i32,
    /// How long a `Nats-Msg-Id` is remembered for duplicate suppression.
    pub duplicate_window: Duration,
    /// How long to wait for one message while replaying before giving up.
    pub replay_timeout: Duration,
    /// Who writes through this store, in each batch's id: only this writer's own retried
    /// append counts as already done. None: a random id, different for every store opened.
    pub writer_id: Option<String>,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            stream_name: "PLANNER_EVENTS".into(),
            subject_prefix: "planner.events".into(),
            snapshot_bucket: "planner_snapshots".into(),
            storage: StorageType::File,
            replicas: 1,
            max_bytes: -1,
            max_message_bytes: 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
            replay_timeout: Duration::from_secs(10),
            writer_id: None,
        }
    }
}

/// The JetStream store. See the module docs.
pub struct JetStreamStore {
    context: Context,
    stream: stream::Stream,
    /// The index of unfinished sessions (see the module docs).
    open: stream::Stream,
    snapshots: object_store::ObjectStore,
    config: JetStreamConfig,
    /// This writer's id (see [`JetStreamConfig::writer_id`]).
    writer: String,
    positions: Mutex<Positions>,
    /// The runtime the store was connected on: work an append leaves behind (an ended
    /// session's marker drop) runs there, whoever polls the append.
    runtime: tokio::runtime::Handle,
}

/// A writer id unlikely to repeat: std's per-process random hash keys, mixed with the clock.
fn random_writer_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    format!("{:016x}", hasher.finish())
}

/// Per session, a version and the stream sequence of the message that ends there: the latest
/// known (to append without a round trip), and the one of the last snapshot loaded (to replay
/// from right after it).
#[derive(Debug, Default)]
struct Positions {
    latest: HashMap<String, (u64, u64)>,
    /// The positions before the latest, newest first, at most [`EARLIER_POSITIONS`] per
    /// stream: a snapshot saved after its session appended again (the daemon saves off the
    /// session's lock) still finds where its version ends, instead of recording none and
    /// making every load replay the whole subject.
    earlier: HashMap<String, Vec<(u64, u64)>>,
    snapshot: HashMap<String, (u64, u64)>,
}

/// Positions kept per stream besides the latest (see [`Positions::earlier`]).
const EARLIER_POSITIONS: usize = 3;

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn nats(operation: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> StoreError {
    move |e| StoreError::Nats {
        operation,
        message: e.to_string(),
    }
}

/// Parses "2.10.3" (or "v2.10.3-beta") into (major, minor).
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

impl JetStreamStore {
    /// Checks the server, then creates (or binds to) the stream and the snapshot bucket.
    pub async fn connect(
        client: async_nats::Client,
        config: JetStreamConfig,
    ) -> Result<Self, StoreError> {
        let mut version = client.server_info().version;
        if version.is_empty() {
            // A client made with `retry_on_initial_connect` may not have met the server yet.
            client
                .flush()
                .await
                .map_err(|e| nats("connecting to the server")(&e))?;
            version = client.server_info().version;
        }
        match major_minor(&version) {
            Some((major, minor)) if (major, minor) >= (2, 10) => {}
            _ => return Err(StoreError::UnsupportedServer { version }),
        }
        let context = jetstream::new(client);
        let stream = context
            .get_or_create_stream(stream::Config {
                name: config.stream_name.clone(),
                subjects: vec![format!("{}.*", config.subject_prefix)],
                storage: config.storage,
                num_replicas: config.replicas,
                max_bytes: config.max_bytes,
                max_message_size: config.max_message_bytes,
                duplicate_window: config.duplicate_window,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("creating the event stream")(&e))?;
        let snapshots = match context.get_object_store(&config.snapshot_bucket).await {
            Ok(store) => store,
            Err(_) => context
                .create_object_store(object_store::Config {
                    bucket: config.snapshot_bucket.clone(),
                    storage: config.storage,
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| nats("creating the snapshot bucket")(&e))?,
        };
        let open_config = stream::Config {
            name: format!("{}_OPEN", config.stream_name),
            subjects: vec![format!("{}.open.*", config.subject_prefix)],
            storage: config.storage,
            num_replicas: config.replicas,
            max_messages_per_subject: 1,
            allow_direct: true,
            ..Default::default()
        };
        let open = context
            .get_or_create_stream(open_config.clone())
            .await
            .map_err(|e| nats("creating the open-session index")(&e))?;
        let store = JetStreamStore {
            writer: config.writer_id.clone().unwrap_or_else(random_writer_id),
            context,
            stream,
            open,
            snapshots,
            config,
            positions: Mutex::new(Positions::default()),
            runtime: tokio::runtime::Handle::current(),
        };
        let complete = store
            .open
            .cached_info()
            .config
            .metadata
            .get(INDEX_METADATA)
            .is_some_and(|v| v == INDEX_COMPLETE);
        if !complete {
            store.backfill_open_index().await?;
            let mut done = open_config;
            done.metadata
                .insert(INDEX_METADATA.to_owned(), INDEX_COMPLETE.to_owned());
            store
                .context
                .update_stream(done)
                .await
                .map_err(|e| nats("recording the open-session index's backfill")(&e))?;
        }
        Ok(store)
    }

    /// Marks every session of a store written before the index as possibly unfinished: one
    /// O(every session) pass, once; recovery then loads each once and drops the ended ones. A
    /// session that already has a marker keeps it (the marker write expects an empty subject).
    async fn backfill_open_index(&self) -> Result<(), StoreError> {
        let sessions = self.list_streams().await?;
        if !sessions.is_empty() {
            tracing::info!(
                sessions = sessions.len(),
                "backfilling the index of unfinished sessions (once, for a store written before it)"
            );
        }
        // Acks awaited 64 at a time: a one-time pass, pipelined so a large store is quick.
        for chunk in sessions.chunks(64) {
            let mut acks = Vec::with_capacity(chunk.len());
            for session in chunk {
                let publish = PublishMessage::build()
                    .expected_last_subject_sequence(0)
                    .header(VERSION, "0");
                acks.push(
                    self.context
                        .send_publish(self.open_subject(session), publish)
                        .await,
                );
            }
            for ack in acks {
                let result = match ack {
                    Ok(pending) => pending.await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {}
                    // It has a marker already: an append marked it.
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
                    Err(e) => return Err(nats("backfilling the open-session index")(&e)),
                }
            }
        }
        Ok(())
    }

    fn open_subject(&self, stream: &str) -> String {
        format!("{}.open.{stream}", self.config.subject_prefix)
    }

    /// Writes the marker saying `stream` may be unfinished, for a batch appended at `version`.
    async fn mark_open(&self, stream: &str, version: u64) -> Result<(), StoreError> {
        let mut publish = PublishMessage::build().header(VERSION, version.to_string().as_str());
        if version == 0 {
            // A session started here is appended without a read first, so it may exist after
            // all (a follow-up for one not in memory): its marker, if it has one, is kept. A
            // marker's version must never go down: a drop of the session's older end would
            // purge a lowered one while the session is open again.
            publish = publish.expected_last_subject_sequence(0);
        }
        let ack = match self
            .context
            .send_publish(self.open_subject(stream), publish)
            .await
        {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(_) => Ok(()),
            Err(e) if version == 0 && e.kind() == PublishErrorKind::WrongLastSequence => Ok(()),
            Err(e) => Err(nats("marking a session unfinished")(&e)),
        }
    }

    fn subject(&self, stream: &str) -> String {
        format!("{}.{stream}", self.config.subject_prefix)
    }

    fn positions(&self) -> std::sync::MutexGuard<'_, Positions> {
        self.positions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, stream: &str, version: u64, sequence: u64) {
        let mut positions = self.positions();
        // A cache (a miss costs one read of the subject's last message): bounded by emptying
        // it, so memory does not grow with every session ever touched.
        if positions.latest.len() >= MAX_CACHED_POSITIONS {
            positions.latest.clear();
            positions.earlier.clear();
        }
        if let Some(previous) = positions
            .latest
            .insert(stream.to_owned(), (version, sequence))
            .filter(|&(v, _)| v < version)
        {
            // Looked up first: an append is the hot path, and the key's copy is made once per
            // stream, not once per append.
            match positions.earlier.get_mut(stream) {
                Some(earlier) => {
                    earlier.insert(0, previous);
                    earlier.truncate(EARLIER_POSITIONS);
                }
                None => {
                    positions.earlier.insert(stream.to_owned(), vec![previous]);
                }
            }
        }
    }

    /// The session's current version and the stream sequence of its last message, read from
    /// the server.
    async fn read_position(&self, stream: &str) -> Result<(u64, u64), StoreError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(stream))
            .await
        {
            Ok(message) => {
                let version = message
                    .headers
                    .get(VERSION)
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .ok_or_else(|| StoreError::Nats {
                        operation: "reading a session's last message",
                        message: format!(
                            "message {} of {} has no valid {VERSION} header",
                            message.sequence,
                            self.subject(stream)
                        ),
                    })?;
                self.remember(stream, version, message.sequence);
                Ok((version, message.sequence))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                self.remember(stream, 0, 0);
                Ok((0, 0))
            }
            Err(e) => Err(nats("reading a session's last message")(&e)),
        }
    }

    /// The stream sequence an append of events at `version` sends: the remembered one, or 0
    /// for a session started here whose position is unknown. That one expects an empty
    /// subject, which the server checks, so nothing is read first; a session that exists
    /// makes the append conflict, as a read would have.
    async fn append_sequence(&self, stream: &str, version: u64) -> Result<u64, StoreError> {
        let remembered = self.positions().latest.get(stream).copied();
        match remembered {
            Some((v, sequence)) if v == version => Ok(sequence),
            None if version == 0 => Ok(0),
            _ => self.sequence_for(stream, version).await,
        }
    }

    /// The stream sequence to expect when appending at `version`, or a conflict.
    async fn sequence_for(&self, stream: &str, version: u64) -> Result<u64, StoreError> {
        if let Some(&(v, seq)) = self.positions().latest.get(stream) {
            if v == version {
                return Ok(seq);
            }
        }
        let (actual, seq) = self.read_position(stream).await?;
        if actual == version {
            Ok(seq)
        } else {
            Err(StoreError::Conflict {
                stream: stream.to_owned(),
                expected: version,
                actual,
            })
        }
    }

    /// Reads the rest of a long replay through a consumer made for it and deleted afterwards
    /// (on error too): nats-server limits consumers per stream, so one left behind per load
    /// would stop loads, and a restart, once a store holds about a thousand sessions. The
    /// consumer's inactivity threshold cleans up after a process that dies mid-replay.
    async fn replay_with_consumer(
        &self,
        replay: &mut Replay<'_>,
        start_sequence: u64,
    ) -> Result<(), StoreError> {
        let consumer = self
            .stream
            .create_consumer(pull::Config {
                filter_subject: self.subject(replay.stream),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                ack_policy: AckPolicy::None,
                memory_storage: true,
                inactive_threshold: REPLAY_CONSUMER_IDLE,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("creating a replay consumer")(&e))?;
        let name = consumer.cached_info().name.clone();
        let read = async {
            let mut messages = consumer
                .stream()
                // A batch message can be up to `max_message_bytes`; small pulls keep what the
                // server has in flight to this client well under its slow-consumer limit.
                .max_messages_per_batch(REPLAY_BATCH)
                .messages()
                .await
                .map_err(|e| nats("starting a replay")(&e))?;
            while !replay.done {
                let next = tokio::time::timeout(self.config.replay_timeout, messages.next())
                    .await
                    .map_err(|_| StoreError::Nats {
                        operation: "replaying a session",
                        message: format!(
                            "no message within {:?} while replaying {}",
                            self.config.replay_timeout,
                            self.subject(replay.stream)
                        ),
                    })?;
                let Some(message) = next else { break };
                let message = message.map_err(|e| nats("replaying a session")(&e))?;
                let sequence = message
                    .info()
                    .map_err(|e| nats("replaying a session")(&*e))?
                    .stream_sequence;
                replay.take(sequence, message.headers.as_ref(), &message.payload)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = self.stream.delete_consumer(&name).await {
            // Not fatal: the server removes it after `REPLAY_CONSUMER_IDLE` anyway.
            tracing::debug!(consumer = %name, error = %e, "could not delete a replay consumer");
        }
        read
    }
}

impl JetStreamStore {
    /// After a batch that ended the plan landed at `version`: drops the session's marker, in a
    /// task of its own, so the append returns once its events are durable. The drop is
    /// bookkeeping: a failed or unfinished one leaves a marker too many, which recovery drops
    /// ([`EventStore::list_open`] may name an ended stream). Awaited here, one request lost with
    /// a cluster node held the append, and the report whose reply waited on it, for the whole
    /// request timeout (10 s by default).
    fn after_end(&self, stream: &str, version: u64, opens: Option<bool>) {
        if opens != Some(false) {
            return;
        }
        let (open, subject, stream) = (
            self.open.clone(),
            self.open_subject(stream),
            stream.to_owned(),
        );
        self.runtime.spawn(async move {
            if let Err(error) = drop_open_marker(&open, &subject, version).await {
                tracing::warn!(stream, %error, "could not drop an ended session from the open index; recovery will");
            }
        });
    }
}

/// Drops the open marker on `subject` if it was written before `version`: one written since,
/// by a follow-up that reopened the session, stays.
async fn drop_open_marker(
    open: &stream::Stream,
    subject: &str,
    version: u64,
) -> Result<(), StoreError> {
    let marker = match open.get_last_raw_message_by_subject(subject).await {
        Ok(marker) => marker,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(()),
        Err(e) => return Err(nats("reading a session's open marker")(&e)),
    };
    // The version the marking batch was appended at; a marker without one (not written by
    // this store) is kept: dropping a marker wrongly loses a session, keeping one costs a load.
    let marked_at = marker
        .headers
        .get(VERSION)
        .and_then(|v| v.as_str().parse::<u64>().ok());
    if marked_at.is_some_and(|at| at < version) {
        // Up to (not including) the next sequence: a newer marker, written by a follow-up
        // since, survives.
        open.purge()
            .filter(subject)
            .sequence(marker.sequence + 1)
            .await
            .map_err(|e| nats("dropping a session's open marker")(&e))?;
    }
    Ok(())
}

/// A replay in progress: the events at or after `version`, until the message at
/// `last_sequence`.
struct Replay<'a> {
    stream: &'a str,
    version: u64,
    last_sequence: u64,
    events: Vec<Event>,
    done: bool,
}

impl Replay<'_> {
    fn take(
        &mut self,
        sequence: u64,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let end_version = headers
            .and_then(|h| h.get(VERSION))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        let batch = codec::decode_batch(payload).map_err(|source| StoreError::Decode {
            stream: self.stream.to_owned(),
            version: end_version.unwrap_or(0),
            source,
        })?;
        let count = batch.len() as u64;
        let base = end_version
            .ok_or_else(|| StoreError::Nats {
                operation: "replaying a session",
                message: format!("message {sequence} has no valid {VERSION} header"),
            })?
            .saturating_sub(count);
        if base + count > self.version {
            let skip = self.version.saturating_sub(base) as usize;
            self.events.extend(batch.into_iter().skip(skip));
        }
        self.done = sequence >= self.last_sequence;
        Ok(())
    }
}

impl EventStore for JetStreamStore {
    async fn append(
        &self,
        stream: &str,
        expected_version: u64,
        events: &[Event],
    ) -> Result<u64, StoreError> {
        self.append_with(stream, expected_version, events, &AppendMeta::default())
            .await
    }

    async fn append_with(
        &self,
        stream: &str,
        expected_version: u64,
        events: &[Event],
        meta: &AppendMeta,
    ) -> Result<u64, StoreError> {
        check_stream(stream)?;
        if events.is_empty() {
            self.sequence_for(stream, expected_version).await?;
            return Ok(expected_version);
        }
        let batch = codec::encode_batch(events);
        let limit = usize::try_from(self.config.max_message_bytes).unwrap_or(usize::MAX);
        if batch.len() > limit {
            return Err(StoreError::TooLarge {
                stream: stream.to_owned(),
                bytes: batch.len(),
                limit,
            });
        }
        let sequence = self.append_sequence(stream, expected_version).await?;
        let new_version = expected_version + events.len() as u64;
        let opens = planner_core::open_after(events);
        if opens == Some(true) {
            // Before the append: a crash in between leaves a marker too many, never one short.
            self.mark_open(stream, expected_version).await?;
        }
        // The writer is part of the id: another instance that computed the very same batch
        // (same command, same millisecond) lost the race, and must hear so (a conflict, then a
        // reload), not be told its append landed.
        let id = format!(
            "{stream}:{expected_version}:{:08x}:{}",
            crc32fast::hash(&batch),
            self.writer
        );
        let mut publish = PublishMessage::build()
            .payload(Bytes::from(batch))
            .expected_last_subject_sequence(sequence)
            .header(BATCH_ID, id.as_str())
            .header(VERSION, new_version.to_string().as_str());
        if let Some(traceparent) = meta.storable_traceparent() {
            publish = publish.header(TRACEPARENT, traceparent);
        }
        let ack = match self
            .context
            .send_publish(self.subject(stream), publish)
            .await
        {
            Ok(pending) => pending.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => {
                // A duplicate ack means this very batch was stored by an earlier try.
                self.remember(stream, new_version, ack.sequence);
                self.after_end(stream, new_version, opens);
                Ok(new_version)
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                {
                    let mut positions = self.positions();
                    positions.latest.remove(stream);
                    positions.earlier.remove(stream);
                }
                // The server checks the sequence before the duplicate window, so a retry of an
                // append that landed (its ack lost) arrives here: if the session's last message
                // is this very batch, the append succeeded.
                let last = self
                    .stream
                    .get_last_raw_message_by_subject(&self.subject(stream))
                    .await
                    .ok();
                if let Some(last) = &last {
                    let same = last.headers.get(BATCH_ID).is_some_and(|v| v.as_str() == id);
                    if same {
                        self.remember(stream, new_version, last.sequence);
                        self.after_end(stream, new_version, opens);
                        return Ok(new_version);
                    }
                }
                // The message just read says where the session is: read again only without it.
                let known = last.as_ref().and_then(|last| {
                    let version = last
                        .headers
                        .get(VERSION)
                        .and_then(|v| v.as_str().parse::<u64>().ok())?;
                    self.remember(stream, version, last.sequence);
                    Some(version)
                });
                let actual = match known {
                    Some(version) => version,
                    None => self.read_position(stream).await?.0,
                };
                Err(StoreError::Conflict {
                    stream: stream.to_owned(),
                    expected: expected_version,
                    actual,
                })
            }
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                Err(StoreError::TooLarge {
                    stream: stream.to_owned(),
                    bytes: 0,
                    limit,
                })
            }
            Err(e) => Err(nats("appending events")(&e)),
        }
    }

    async fn load_from(&self, stream: &str, version: u64) -> Result<Vec<Event>, StoreError> {
        check_stream(stream)?;
        let (end, last_sequence) = self.read_position(stream).await?;
        if version >= end {
            return Ok(Vec::new());
        }
        // Start after a remembered position at or before `version`, if one is known.
        let start = match self.positions().snapshot.get(stream) {
            Some(&(v, seq)) if v <= version => seq + 1,
            _ => 1,
        };
        let mut replay = Replay {
            stream,
            version,
            last_sequence,
            events: Vec::new(),
            done: false,
        };
        // Short replays (the usual case after a snapshot) read message by message and leave
        // nothing on the server; a long one switches to a consumer, deleted when done.
        let mut next = start;
        for _ in 0..DIRECT_READS {
            let message = self
                .stream
                .raw_message_builder()
                .next_by_subject(self.subject(stream))
                .sequence(next)
                .send()
                .await
                .map_err(|e| nats("replaying a session")(&e))?;
            next = message.sequence + 1;
            replay.take(message.sequence, Some(&message.headers), &message.payload)?;
            if replay.done {
                return Ok(replay.events);
            }
        }
        self.replay_with_consumer(&mut replay, next).await?;
        Ok(replay.events)
    }

    async fn version(&self, stream: &str) -> Result<u64, StoreError> {
        check_stream(stream)?;
        Ok(self.read_position(stream).await?.0)
    }

    async fn load_batches(&self, stream: &str) -> Result<Vec<StoredBatch>, StoreError> {
        check_stream(stream)?;
        let (_, last_sequence) = self.read_position(stream).await?;
        let mut batches = Vec::new();
        let mut next = 1;
        // Message by message: a check reads everything once and must see each message as it is.
        while last_sequence > 0 && next <= last_sequence {
            let message = self
                .stream
                .raw_message_builder()
                .next_by_subject(self.subject(stream))
                .sequence(next)
                .send()
                .await
                .map_err(|e| nats("reading a session for a check")(&e))?;
            next = message.sequence + 1;
            let end_version = message
                .headers
                .get(VERSION)
                .and_then(|v| v.as_str().parse::<u64>().ok());
            let events = codec::decode_batch(&message.payload).map_err(|e| e.to_string());
            let base_version = match (&events, end_version) {
                (Ok(events), Some(end)) => end.checked_sub(events.len() as u64),
                _ => None,
            };
            let events = match (events, end_version) {
                (Ok(_), None) => Err(format!(
                    "message {} has no valid {VERSION} header",
                    message.sequence
                )),
                (events, _) => events,
            };
            let traceparent = message
                .headers
                .get(TRACEPARENT)
                .map(|v| v.as_str().to_owned());
            batches.push(StoredBatch {
                base_version,
                events,
                traceparent,
            });
        }
        Ok(batches)
    }

    async fn list_streams(&self) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}.", self.config.subject_prefix);
        let mut info = self
            .stream
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(|e| nats("listing sessions")(&e))?;
        let mut streams = Vec::new();
        while let Some(subject) = info.next().await {
            let (subject, _count) = subject.map_err(|e| nats("listing sessions")(&e))?;
            if let Some(session) = subject.strip_prefix(&prefix) {
                streams.push(session.to_owned());
            }
        }
        streams.sort();
        Ok(streams)
    }

    async fn list_open(&self) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}.open.", self.config.subject_prefix);
        let mut info = self
            .open
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(|e| nats("listing unfinished sessions")(&e))?;
        let mut streams = Vec::new();
        while let Some(subject) = info.next().await {
            let (subject, _count) = subject.map_err(|e| nats("listing unfinished sessions")(&e))?;
            if let Some(session) = subject.strip_prefix(&prefix) {
                streams.push(session.to_owned());
            }
        }
        streams.sort();
        Ok(streams)
    }

    async fn forget_open(&self, stream: &str, version: u64) -> Result<(), StoreError> {
        check_stream(stream)?;
        drop_open_marker(&self.open, &self.open_subject(stream), version).await
    }

    async fn save_snapshot(&self, stream: &str, snapshot: &Snapshot) -> Result<(), StoreError> {
        check_stream(stream)?;
        let sequence = {
            let positions = self.positions();
            let latest = positions.latest.get(stream).into_iter();
            let earlier = positions.earlier.get(stream).into_iter().flatten();
            latest
                .chain(earlier)
                .find(|&&(v, _)| v == snapshot.version)
                .map_or(0, |&(_, seq)| seq)
        };
        // "lz4 <stream sequence>\n" then the LZ4-compressed snapshot JSON: a large session's
        // state is many MiB of repetitive JSON, and compressing it cuts the transfer that
        // dominates loading.
        let bytes = encode_snapshot(sequence, snapshot);
        self.snapshots
            .put(stream, &mut bytes.as_slice())
            .await
            .map_err(|e| nats("saving a snapshot")(&e))?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        check_stream(stream)?;
        let mut object = match self.snapshots.get(stream).await {
            Ok(object) => object,
            Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(nats("loading a snapshot")(&e)),
        };
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
            .await
            .map_err(|e| nats("reading a snapshot")(&e))?;
        match decode_snapshot(&bytes) {
            Ok((sequence, snapshot)) => {
                if sequence > 0 {
                    let mut positions = self.positions();
                    if positions.snapshot.len() >= MAX_CACHED_POSITIONS {
                        positions.snapshot.clear();
                    }
                    positions
                        .snapshot
                        .insert(stream.to_owned(), (snapshot.version, sequence));
                }
                Ok(Some(snapshot))
            }
            Err(reason) => {
                tracing::warn!(stream, %reason, "ignoring a snapshot that does not decode; the session will be replayed in full");
                Ok(None)
            }
        }
    }
}

/// The first word of a stored snapshot: its layout.
const SNAPSHOT_FORMAT: &str = "lz4";

/// A snapshot as this store keeps it in the Object Store: `lz4 <stream sequence>\n`, then the
/// LZ4-compressed JSON of [`Snapshot::encode`].
pub fn encode_snapshot(sequence: u64, snapshot: &Snapshot) -> Vec<u8> {
    let json = snapshot.encode();
    let mut bytes = format!("{SNAPSHOT_FORMAT} {sequence}\n").into_bytes();
    bytes.extend_from_slice(&lz4_flex::compress_prepend_size(&json));
    bytes
}

/// Reads an object written by [`encode_snapshot`]: the stream sequence and the snapshot, or why
/// not. Stored bytes are input: public so the fuzz targets (`fuzz/`) can reach it.
pub fn decode_snapshot(bytes: &[u8]) -> Result<(u64, Snapshot), String> {
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|e| e.to_string())?;
    let sequence = match header.split_once(' ') {
        Some((SNAPSHOT_FORMAT, sequence)) => sequence.parse::<u64>().map_err(|e| e.to_string())?,
        _ => return Err(format!("unknown snapshot header {header:?}")),
    };
    let compressed = bytes.get(newline + 1..).unwrap_or_default();
    // The size prefix is stored bytes like any other: the decompressor allocates it up front,
    // so a damaged prefix would ask for up to 4 GiB. LZ4 expands a block at most about 255
    // times; anything claiming more is not a block this store wrote.
    let claimed = compressed
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let limit = compressed.len().saturating_mul(MAX_LZ4_RATIO);
    if claimed > limit {
        return Err(format!(
            "the snapshot claims {claimed} bytes uncompressed, more than {} compressed bytes can hold",
            compressed.len()
        ));
    }
    let json = lz4_flex::decompress_size_prepended(compressed).map_err(|e| e.to_string())?;
    Ok((sequence, Snapshot::decode(&json)?))
}

/// The most an LZ4 block expands (a run of 255-byte length extensions), rounded up.
const MAX_LZ4_RATIO: usize = 256;

#[cfg(test)]
mod tests {
    use super::major_minor;

    #[test]
    fn a_snapshot_claiming_more_than_lz4_can_expand_is_refused_before_allocating() {
        // Found by the snapshot_decoding fuzz target: a damaged size prefix made the
        // decompressor allocate 4 GiB (fuzz/regressions/snapshot_decoding/).
        let mut bytes = b"lz4 7\n".to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(b"\x10{}");
        let error = super::decode_snapshot(&bytes).expect_err("refused");
        assert!(error.contains("claims 4294967295 bytes"), "{error}");
        // A real snapshot, highly compressible, still reads.
        let mut state = planner_core::PlannerState::default();
        state.requests.push("x".repeat(100_000));
        let snapshot = crate::Snapshot::of(&state);
        let stored = super::encode_snapshot(9, &snapshot);
        assert_eq!(super::decode_snapshot(&stored), Ok((9, snapshot)));
    }

    #[test]
    fn server_versions_parse() {
        assert_eq!(major_minor("2.15.1"), Some((2, 15)));
        assert_eq!(major_minor("v2.10.0-beta.1"), Some((2, 10)));
        assert_eq!(major_minor("2.9.10"), Some((2, 9)));
        assert!((2, 9) < (2, 10));
        assert_eq!(major_minor("garbage"), None);
    }
}
