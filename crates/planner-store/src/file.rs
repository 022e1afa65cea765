//! The file store: one append-only log of framed, checksummed records, for development and
//! single-node use.
//!
//! # Layout
//!
//! A directory holds `events.log`, `LOCK` and `snapshots/<stream>.json`. Every append is one
//! record of the log:
//!
//! ```text
//! [payload length: u32 LE][crc32 of payload: u32 LE][payload]
//! payload = [stream id length: u16 LE][stream id][base version: u64 LE][event count: u32 LE][batch JSON]
//! ```
//!
//! An append's metadata ([`crate::AppendMeta`], its trace context) is not kept: the record
//! has no room for it, and adding some would change the layout of every log written so far.
//! [`EventStore::append_with`] falls back to a plain append.
//!
//! # Durability
//!
//! Appends are written by one writer thread. With [`FsyncPolicy::Always`] each append is written
//! and `fdatasync`ed before it is acknowledged; with [`FsyncPolicy::Group`] the appends waiting
//! when the writer wakes are written together and share one `fdatasync` (group commit), and each
//! is acknowledged after it; with [`FsyncPolicy::Never`] the OS decides when data reaches the disk
//! (an acknowledged append survives a process crash but not a power cut).
//!
//! # Recovery
//!
//! Opening scans the log. A record cut short or failing its checksum *at the end* of the log is a
//! torn write (a power cut mid-append): the log is truncated to the last good record and the cut
//! is logged. A bad record *followed by a good one* is corruption, not a torn write: opening fails
//! with [`StoreError::Corrupt`] naming the offset, and nothing is dropped. A second process
//! opening the same directory fails with [`StoreError::Locked`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use planner_core::codec;
use planner_core::Event;
use tokio::sync::{mpsc, oneshot};

use crate::contract::{check_stream, EventStore, Snapshot, StoreError, StoredBatch};

const HEADER_LEN: u64 = 8;
/// The largest record accepted by default: 64 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// When appends reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Every append is synced before it is acknowledged.
    Always,
    /// Appends waiting together share one sync, each acknowledged after it (group commit).
    #[default]
    Group,
    /// No sync: survives a process crash, not a power cut.
    Never,
}

/// Settings of a [`FileStore`].
#[derive(Debug, Clone)]
pub struct FileStoreConfig {
    /// The directory; created if absent.
    pub dir: PathBuf,
    /// When appends reach the disk.
    pub fsync: FsyncPolicy,
    /// The largest record (one append) accepted, in bytes.
    pub max_record_bytes: usize,
}

impl FileStoreConfig {
    /// Defaults for `dir`: group commit, 64 MiB records.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStoreConfig {
            dir: dir.into(),
            fsync: FsyncPolicy::default(),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

/// Where one record of a stream is in the log.
#[derive(Debug, Clone, Copy)]
struct RecordRef {
    offset: u64,
    len: u32,
    base_version: u64,
    count: u32,
}

#[derive(Debug, Default)]
struct Index {
    streams: BTreeMap<String, Vec<RecordRef>>,
    /// Unfinished streams ([`EventStore::list_open`]): built by the scan at open, then
    /// changed by the writer together with `streams`.
    open: BTreeSet<String>,
}

impl Index {
    fn set_open(&mut self, stream: &str, opens: Option<bool>) {
        match opens {
            Some(true) => {
                self.open.insert(stream.to_owned());
            }
            Some(false) => {
                self.open.remove(stream);
            }
            None => {}
        }
    }

    fn version(&self, stream: &str) -> u64 {
        self.streams
            .get(stream)
            .and_then(|r| r.last())
            .map_or(0, |r| r.base_version + u64::from(r.count))
    }
}

struct AppendRequest {
    stream: String,
    expected_version: u64,
    count: u32,
    batch: Vec<u8>,
    /// What the batch does to the index of unfinished streams.
    opens: Option<bool>,
    reply: oneshot::Sender<Result<u64, StoreError>>,
}

/// The file store. See the module docs.
#[derive(Debug)]
pub struct FileStore {
    config: FileStoreConfig,
    log_path: PathBuf,
    reader: Arc<File>,
    index: Arc<Mutex<Index>>,
    writer: mpsc::UnboundedSender<AppendRequest>,
    /// Held for the store's life: the lock file's handle keeps the OS lock. None when the
    /// store was opened read-only.
    _lock: Option<File>,
}

impl std::fmt::Debug for AppendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendRequest")
            .field("stream", &self.stream)
            .field("expected_version", &self.expected_version)
            .finish_non_exhaustive()
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

impl FileStore {
    /// Opens (or creates) the store in `config.dir`, recovering from a torn tail.
    ///
    /// Blocking: call it from `spawn_blocking` or before the runtime's hot path.
    pub fn open(config: FileStoreConfig) -> Result<Self, StoreError> {
        Self::open_with(config, |file| Box::new(file))
    }

    /// [`FileStore::open`], with the log file as `wrap` makes it: the seam through which a
    /// test makes the log's calls fail.
    fn open_with(
        config: FileStoreConfig,
        wrap: impl FnOnce(File) -> Box<dyn LogFile>,
    ) -> Result<Self, StoreError> {
        let dir = &config.dir;
        fs::create_dir_all(dir.join("snapshots"))
            .map_err(io(format!("creating {}", dir.display())))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(format!("opening {}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: lock_path.display().to_string(),
                })
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(io(format!("locking {}", lock_path.display()))(e))
            }
        }

        let log_path = dir.join("events.log");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let mut file = wrap(file);
        let (index, end) = recover(&mut *file, &log_path, config.max_record_bytes)?;
        let reader =
            File::open(&log_path).map_err(io(format!("opening {}", log_path.display())))?;
        let index = Arc::new(Mutex::new(index));

        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            file,
            end,
            path: log_path.clone(),
            index: Arc::clone(&index),
            fsync: config.fsync,
            poisoned: false,
        };
        std::thread::Builder::new()
            .name("planner-file-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io("starting the file store's writer thread"))?;

        Ok(FileStore {
            config,
            log_path,
            reader: Arc::new(reader),
            index,
            writer: tx,
            _lock: Some(lock),
        })
    }

    /// Opens the store in `config.dir` to read it, as it is now: no lock (a `run` or `serve`
    /// may be writing it at the same time), no writer, and a torn tail is skipped rather than
    /// repaired. Appends and snapshots are refused with [`StoreError::ReadOnly`]. For operator
    /// commands (`replay`, `sessions`).
    pub fn open_read_only(config: FileStoreConfig) -> Result<Self, StoreError> {
        let log_path = config.dir.join("events.log");
        let (file, index) = match File::open(&log_path) {
            Ok(mut file) => {
                let (index, _good) = scan_log(&mut file, &log_path, config.max_record_bytes)?;
                (file, index)
            }
            // No log yet: an empty store, which is what a reader of it should see (the
            // reader is never read from with an empty index; the store is Unix-only anyway).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let empty = File::open("/dev/null").map_err(io("opening /dev/null"))?;
                (empty, Index::default())
            }
            Err(e) => return Err(io(format!("opening {}", log_path.display()))(e)),
        };
        // A closed channel: every append is refused before it is sent.
        let (tx, _) = mpsc::unbounded_channel();
        Ok(FileStore {
            config,
            log_path,
            reader: Arc::new(file),
            index: Arc::new(Mutex::new(index)),
            writer: tx,
            _lock: None,
        })
    }

    fn refuse_writes(&self) -> Result<(), StoreError> {
        match self._lock {
            Some(_) => Ok(()),
            None => Err(StoreError::ReadOnly {
                path: self.config.dir.display().to_string(),
            }),
        }
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        // The writer updates the index in one step after a successful write; a panic cannot
        // leave it half-updated.
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshot_path(&self, stream: &str) -> PathBuf {
        self.config
            .dir
            .join("snapshots")
            .join(format!("{stream}.json"))
    }
}

impl EventStore for FileStore {
    async fn append(
        &self,
        stream: &str,
        expected_version: u64,
        events: &[Event],
    ) -> Result<u64, StoreError> {
        check_stream(stream)?;
        self.refuse_writes()?;
        if events.is_empty() {
            let current = self.index().version(stream);
            return if current == expected_version {
                Ok(current)
            } else {
                Err(StoreError::Conflict {
                    stream: stream.to_owned(),
                    expected: expected_version,
                    actual: current,
                })
            };
        }
        let batch = codec::encode_batch(events);
        let record_len = 2 + stream.len() + 8 + 4 + batch.len();
        if record_len > self.config.max_record_bytes {
            return Err(StoreError::TooLarge {
                stream: stream.to_owned(),
                bytes: record_len,
                limit: self.config.max_record_bytes,
            });
        }
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(AppendRequest {
                stream: stream.to_owned(),
                expected_version,
                count: u32::try_from(events.len()).unwrap_or(u32::MAX),
                batch,
                opens: planner_core::open_after(events),
                reply,
            })
            .map_err(|_| StoreError::Poisoned)?;
        answer.await.map_err(|_| StoreError::Poisoned)?
    }

    async fn load_from(&self, stream: &str, version: u64) -> Result<Vec<Event>, StoreError> {
        check_stream(stream)?;
        let records: Vec<RecordRef> = {
            let index = self.index();
            let Some(records) = index.streams.get(stream) else {
                return Ok(Vec::new());
            };
            // The first record that ends after `version`.
            let start = records.partition_point(|r| r.base_version + u64::from(r.count) <= version);
            records[start..].to_vec()
        };
        let reader = Arc::clone(&self.reader);
        let path = self.log_path.clone();
        let stream = stream.to_owned();
        tokio::task::spawn_blocking(move || {
            read_records(&reader, &path, &stream, &records, version)
        })
        .await
        .map_err(|e| StoreError::Io {
            context: "reading the event log".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    async fn version(&self, stream: &str) -> Result<u64, StoreError> {
        check_stream(stream)?;
        Ok(self.index().version(stream))
    }

    async fn load_batches(&self, stream: &str) -> Result<Vec<StoredBatch>, StoreError> {
        check_stream(stream)?;
        let records: Vec<RecordRef> = self
            .index()
            .streams
            .get(stream)
            .cloned()
            .unwrap_or_default();
        let reader = Arc::clone(&self.reader);
        let path = self.log_path.clone();
        tokio::task::spawn_blocking(move || read_batches(&reader, &path, &records))
            .await
            .map_err(|e| StoreError::Io {
                context: "reading the event log".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    async fn list_streams(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.index().streams.keys().cloned().collect())
    }

    async fn list_open(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.index().open.iter().cloned().collect())
    }

    async fn forget_open(&self, stream: &str, version: u64) -> Result<(), StoreError> {
        check_stream(stream)?;
        // The index is exact but for a record that did not decode at open (kept as open);
        // dropped only if nothing was appended since the caller's load.
        let mut index = self.index();
        if index.version(stream) == version {
            index.open.remove(stream);
        }
        Ok(())
    }

    async fn save_snapshot(&self, stream: &str, snapshot: &Snapshot) -> Result<(), StoreError> {
        check_stream(stream)?;
        self.refuse_writes()?;
        let path = self.snapshot_path(stream);
        let bytes = snapshot.encode();
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| StoreError::Io {
                context: "writing a snapshot".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        check_stream(stream)?;
        let path = self.snapshot_path(stream);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        };
        match Snapshot::decode(&bytes) {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(reason) => {
                tracing::warn!(stream, path = %path.display(), %reason, "ignoring a snapshot that does not decode; the session will be replayed in full");
                Ok(None)
            }
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("json.tmp");
    let mut file = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_data())
        .map_err(io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!("renaming {}", tmp.display())))?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing {}", dir.display())))?;
    }
    Ok(())
}

/// Each record as it is on disk, its events decoded one record at a time (a record that does
/// not decode is reported as such, and the next is read all the same).
fn read_batches(
    reader: &File,
    path: &Path,
    records: &[RecordRef],
) -> Result<Vec<StoredBatch>, StoreError> {
    let mut batches = Vec::with_capacity(records.len());
    let mut buf = Vec::new();
    for record in records {
        buf.resize(record.len as usize, 0);
        reader
            .read_exact_at(&mut buf, record.offset + HEADER_LEN)
            .map_err(io(format!(
                "reading {} at {}",
                path.display(),
                record.offset
            )))?;
        let Some(parsed) = parse_payload(&buf) else {
            batches.push(StoredBatch {
                base_version: None,
                events: Err(format!(
                    "record at byte {} has changed on disk",
                    record.offset
                )),
                traceparent: None,
            });
            continue;
        };
        let events = codec::decode_batch(parsed.batch)
            .map_err(|e| e.to_string())
            .and_then(|events| {
                if events.len() == parsed.count as usize {
                    Ok(events)
                } else {
                    Err(format!(
                        "record holds {} events, its header says {}",
                        events.len(),
                        parsed.count
                    ))
                }
            });
        batches.push(StoredBatch {
            base_version: Some(parsed.base_version),
            events,
            traceparent: None,
        });
    }
    Ok(batches)
}

fn read_records(
    reader: &File,
    path: &Path,
    stream: &str,
    records: &[RecordRef],
    from: u64,
) -> Result<Vec<Event>, StoreError> {
    let mut events = Vec::new();
    let mut buf = Vec::new();
    for record in records {
        buf.resize(record.len as usize, 0);
        reader
            .read_exact_at(&mut buf, record.offset + HEADER_LEN)
            .map_err(io(format!(
                "reading {} at {}",
                path.display(),
                record.offset
            )))?;
        let parsed = parse_payload(&buf).ok_or_else(|| StoreError::Corrupt {
            path: path.display().to_string(),
            offset: record.offset,
            reason: "record changed on disk since it was indexed".into(),
        })?;
        let batch = codec::decode_batch(parsed.batch).map_err(|source| StoreError::Decode {
            stream: stream.to_owned(),
            version: record.base_version,
            source,
        })?;
        // The header's count is what the index (and so the stream's version) was built from:
        // a record holding another number of events would make the version lie, and every
        // append at the version the caller folded to would conflict for ever.
        if batch.len() != record.count as usize {
            return Err(StoreError::Corrupt {
                path: path.display().to_string(),
                offset: record.offset,
                reason: format!(
                    "record of stream {stream} holds {} events, its header says {}",
                    batch.len(),
                    record.count
                ),
            });
        }
        let skip = from.saturating_sub(record.base_version) as usize;
        events.extend(batch.into_iter().skip(skip));
    }
    Ok(events)
}

struct Payload<'a> {
    stream: &'a str,
    base_version: u64,
    count: u32,
    batch: &'a [u8],
}

fn parse_payload(payload: &[u8]) -> Option<Payload<'_>> {
    let stream_len = u16::from_le_bytes(payload.get(0..2)?.try_into().ok()?) as usize;
    let stream = std::str::from_utf8(payload.get(2..2 + stream_len)?).ok()?;
    let rest = payload.get(2 + stream_len..)?;
    let base_version = u64::from_le_bytes(rest.get(0..8)?.try_into().ok()?);
    let count = u32::from_le_bytes(rest.get(8..12)?.try_into().ok()?);
    Some(Payload {
        stream,
        base_version,
        count,
        batch: rest.get(12..)?,
    })
}

fn encode_record(out: &mut Vec<u8>, stream: &str, base_version: u64, count: u32, batch: &[u8]) {
    let payload_len = 2 + stream.len() + 8 + 4 + batch.len();
    let start = out.len();
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(stream.len() as u16).to_le_bytes());
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(&base_version.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(batch);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A record read during recovery, or why there is none at this offset.
enum Scan {
    Record { len: u32, payload: Vec<u8> },
    Bad(&'static str),
}

fn scan_at(data: &[u8], offset: usize, max_record: usize) -> Scan {
    let Some(header) = data.get(offset..offset + HEADER_LEN as usize) else {
        return Scan::Bad("record header cut short");
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len as usize > max_record || len < 14 {
        return Scan::Bad("implausible record length");
    }
    let start = offset + HEADER_LEN as usize;
    let Some(payload) = data.get(start..start + len as usize) else {
        return Scan::Bad("record cut short");
    };
    if crc32fast::hash(payload) != crc {
        return Scan::Bad("checksum mismatch");
    }
    Scan::Record {
        len,
        payload: payload.to_vec(),
    }
}

/// What the store does to its log file besides reading it: a seam, so that a test can make
/// each call fail. Implemented by [`File`] (opened to append: every write goes to the end).
trait LogFile: Read + Seek + Send {
    /// The file's length.
    fn length(&self) -> std::io::Result<u64>;
    /// Writes all of `buf` at the end.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()>;
    /// `fdatasync`.
    fn sync_data(&self) -> std::io::Result<()>;
    /// Cuts the file to `len` bytes and syncs it.
    fn truncate(&self, len: u64) -> std::io::Result<()>;
}

impl LogFile for File {
    fn length(&self) -> std::io::Result<u64> {
        self.metadata().map(|m| m.len())
    }
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.write_all(buf)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        File::sync_data(self)
    }
    fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.set_len(len).and_then(|()| self.sync_all())
    }
}

/// Scans the whole log, builds the index, and truncates a torn tail; the index and where the
/// log ends (from there on, the writer keeps that itself).
fn recover(
    file: &mut dyn LogFile,
    path: &Path,
    max_record: usize,
) -> Result<(Index, u64), StoreError> {
    let (index, good) = scan_log(file, path, max_record)?;
    let len = file
        .length()
        .map_err(io(format!("reading the length of {}", path.display())))?;
    if good < len {
        tracing::warn!(
            path = %path.display(),
            offset = good,
            bytes = len - good,
            "truncating a torn write at the end of the event log"
        );
        file.truncate(good)
            .map_err(io(format!("truncating {}", path.display())))?;
    }
    Ok((index, good))
}

/// Reads the whole log and indexes its records; returns the index and where the good records
/// end (before a torn tail, if any). Damage followed by a good record is refused: only a torn
/// write at the end is something to skip.
fn scan_log(
    file: &mut (impl Read + Seek + ?Sized),
    path: &Path,
    max_record: usize,
) -> Result<(Index, u64), StoreError> {
    let mut data = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut data))
        .map_err(io(format!("reading {}", path.display())))?;
    let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
        path: path.display().to_string(),
        offset: offset as u64,
        reason,
    };
    let mut index = Index::default();
    let mut offset = 0usize;
    while offset < data.len() {
        match scan_at(&data, offset, max_record) {
            Scan::Record { len, payload } => {
                let parsed = parse_payload(&payload)
                    .ok_or_else(|| corrupt(offset, "malformed record payload".into()))?;
                let expected = index.version(parsed.stream);
                if parsed.base_version != expected || !planner_core::is_valid_token(parsed.stream) {
                    return Err(corrupt(
                        offset,
                        format!(
                            "record of stream {:?} starts at version {}, expected {}",
                            parsed.stream, parsed.base_version, expected
                        ),
                    ));
                }
                let opens = record_opens(parsed.batch);
                index.set_open(parsed.stream, opens);
                index
                    .streams
                    .entry(parsed.stream.to_owned())
                    .or_default()
                    .push(RecordRef {
                        offset: offset as u64,
                        len,
                        base_version: parsed.base_version,
                        count: parsed.count,
                    });
                offset += HEADER_LEN as usize + len as usize;
            }
            Scan::Bad(reason) => {
                let later = (offset + 1..data.len())
                    .find(|&o| matches!(scan_at(&data, o, max_record), Scan::Record { .. }));
                if let Some(good) = later {
                    return Err(corrupt(
                        offset,
                        format!("{reason}, with a good record at byte {good} after it"),
                    ));
                }
                break;
            }
        }
    }
    Ok((index, offset as u64))
}

/// What a stored batch does to the index of unfinished streams. Only a batch naming an event
/// that opens or ends a plan is decoded (the others cannot change the index), so opening a
/// store does not decode its whole log; a batch that does not decode counts as opening, so
/// recovery meets it (and quarantines it) rather than losing it.
fn record_opens(batch: &[u8]) -> Option<bool> {
    const NAMES: [&[u8]; 5] = [
        b"session_started",
        b"tasks_planned",
        b"plan_completed",
        b"plan_failed",
        b"plan_cancelled",
    ];
    let mentions = |name: &[u8]| batch.windows(name.len()).any(|w| w == name);
    if !NAMES.iter().any(|name| mentions(name)) {
        return None;
    }
    match codec::decode_batch(batch) {
        Ok(events) => planner_core::open_after(&events),
        Err(_) => Some(true),
    }
}

struct Writer {
    file: Box<dyn LogFile>,
    /// Where the log ends: what recovery kept, advanced by each write that succeeded. Kept
    /// here, not asked of the file, so that a failed length query cannot misplace a record
    /// (it used to be read per group, with a failure taken for 0: records indexed at offsets
    /// counted from the start of the log, and a failed write truncating the whole log).
    end: u64,
    path: PathBuf,
    index: Arc<Mutex<Index>>,
    fsync: FsyncPolicy,
    poisoned: bool,
}

/// The most appends written under one sync in group commit.
const MAX_GROUP: usize = 512;

impl Writer {
    fn run(mut self, mut requests: mpsc::UnboundedReceiver<AppendRequest>) {
        while let Some(first) = requests.blocking_recv() {
            let mut group = vec![first];
            if self.fsync != FsyncPolicy::Always {
                while group.len() < MAX_GROUP {
                    match requests.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
            }
            self.write_group(group);
        }
    }

    fn write_group(&mut self, group: Vec<AppendRequest>) {
        if self.poisoned {
            for request in group {
                let _ = request.reply.send(Err(StoreError::Poisoned));
            }
            return;
        }
        let (start, mut versions) = {
            let index = self
                .index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let versions: BTreeMap<String, u64> = group
                .iter()
                .map(|r| (r.stream.clone(), index.version(&r.stream)))
                .collect();
            (self.end, versions)
        };
        let mut buf = Vec::new();
        let mut accepted = Vec::with_capacity(group.len());
        for request in group {
            let current = versions.get(&request.stream).copied().unwrap_or(0);
            if current != request.expected_version {
                let _ = request.reply.send(Err(StoreError::Conflict {
                    stream: request.stream,
                    expected: request.expected_version,
                    actual: current,
                }));
                continue;
            }
            let offset = start + buf.len() as u64;
            encode_record(
                &mut buf,
                &request.stream,
                current,
                request.count,
                &request.batch,
            );
            let len = (buf.len() as u64 - (offset - start) - HEADER_LEN) as u32;
            versions.insert(request.stream.clone(), current + u64::from(request.count));
            accepted.push((
                request,
                RecordRef {
                    offset,
                    len,
                    base_version: current,
                    count: 0,
                },
            ));
        }
        if accepted.is_empty() {
            return;
        }
        let written = self.file.append(&buf).and_then(|()| match self.fsync {
            FsyncPolicy::Never => Ok(()),
            _ => self.file.sync_data(),
        });
        if let Err(e) = written {
            // Undo a partial write so the log stays a sequence of whole records, ending where
            // it did (`self.end` is unchanged); if even that fails, where the log ends is not
            // known: stop taking writes (a reopen recovers the tail).
            if self.file.truncate(start).is_err() {
                self.poisoned = true;
            }
            let message = e.to_string();
            for (request, _) in accepted {
                let _ = request.reply.send(Err(StoreError::Io {
                    context: format!("appending to {}", self.path.display()),
                    source: std::io::Error::new(e.kind(), message.clone()),
                }));
            }
            return;
        }
        self.end = start + buf.len() as u64;
        let mut index = self
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut replies = Vec::with_capacity(accepted.len());
        for (request, mut record) in accepted {
            record.count = request.count;
            let new_version = record.base_version + u64::from(request.count);
            index.set_open(&request.stream, request.opens);
            index
                .streams
                .entry(request.stream)
                .or_default()
                .push(record);
            replies.push((request.reply, new_version));
        }
        drop(index);
        for (reply, version) in replies {
            let _ = reply.send(Ok(version));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use planner_core::{Event, Timestamp};

    use super::*;

    /// Faults to inject into the log's calls.
    #[derive(Default)]
    struct Faults {
        /// Every length query fails.
        length: AtomicBool,
        /// The next write writes half its bytes, then fails (a full disk).
        tear_next_write: AtomicBool,
    }

    /// The real log file, whose calls fail as `faults` say.
    struct FaultyLog {
        file: File,
        faults: Arc<Faults>,
    }

    impl Read for FaultyLog {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.file.read(buf)
        }
    }

    impl Seek for FaultyLog {
        fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
            self.file.seek(pos)
        }
    }

    impl LogFile for FaultyLog {
        fn length(&self) -> std::io::Result<u64> {
            if self.faults.length.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("injected: fstat failed"));
            }
            self.file.length()
        }
        fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
            if self.faults.tear_next_write.swap(false, Ordering::SeqCst) {
                self.file.write_all(&buf[..buf.len() / 2])?;
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.file.append(buf)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            LogFile::sync_data(&self.file)
        }
        fn truncate(&self, len: u64) -> std::io::Result<()> {
            LogFile::truncate(&self.file, len)
        }
    }

    fn events(at: u64) -> Vec<Event> {
        vec![Event::PlanCompleted { at: Timestamp(at) }]
    }

    /// #10 item 9: the writer took the log's length from `metadata()` for every group and, when
    /// that failed, started counting from 0: the next record was indexed at the offset of the
    /// log's first record (reading a session back gave another session's events), and a failed
    /// write truncated the whole log. The writer now keeps the end itself.
    #[tokio::test]
    async fn appends_after_failed_length_queries_and_a_torn_write_are_indexed_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let config = FileStoreConfig::new(dir.path());
        let store = {
            let faults = Arc::clone(&faults);
            FileStore::open_with(config.clone(), move |file| {
                Box::new(FaultyLog { file, faults })
            })
            .unwrap()
        };
        assert_eq!(store.append("first", 0, &events(1)).await.unwrap(), 1);

        faults.length.store(true, Ordering::SeqCst);
        faults.tear_next_write.store(true, Ordering::SeqCst);
        let torn = store.append("second", 0, &events(2)).await;
        assert!(matches!(torn, Err(StoreError::Io { .. })), "{torn:?}");
        assert_eq!(store.append("second", 0, &events(3)).await.unwrap(), 1);
        assert_eq!(store.append("first", 1, &events(4)).await.unwrap(), 2);

        async fn read(store: &FileStore) -> (Vec<Event>, Vec<Event>) {
            (
                store.load_from("first", 0).await.unwrap(),
                store.load_from("second", 0).await.unwrap(),
            )
        }
        let expected = ([events(1), events(4)].concat(), events(3));
        assert_eq!(read(&store).await, expected, "read back while running");
        drop(store);
        // The log on disk is whole records, as indexed: a reopen (which scans it) agrees.
        let reopened = FileStore::open(config).unwrap();
        assert_eq!(read(&reopened).await, expected, "read back after a reopen");
    }
}
