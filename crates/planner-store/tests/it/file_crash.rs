//! The file store after power cuts, garbage and bit rot.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use planner_core::Event;
use planner_store::*;

use crate::support::events;

fn open(dir: &Path) -> Result<FileStore, StoreError> {
    FileStore::open(FileStoreConfig::new(dir))
}

fn log_len(dir: &Path) -> u64 {
    fs::metadata(dir.join("events.log")).unwrap().len()
}

/// Three appends to two streams; returns the events and the log's length before the last one.
async fn write_three(dir: &Path) -> (Vec<Event>, Vec<Event>, u64) {
    let store = open(dir).unwrap();
    let a = events(4, "a");
    let b = events(3, "b");
    store.append("s", 0, &a).await.unwrap();
    store.append("other", 0, &b).await.unwrap();
    let before_last = log_len(dir);
    store.append("s", 4, &events(5, "c")).await.unwrap();
    (a, b, before_last)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to.join("snapshots")).unwrap();
    fs::copy(from.join("events.log"), to.join("events.log")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_anywhere_in_the_last_record_loses_only_that_record() {
    let original = tempfile::tempdir().unwrap();
    let (a, b, before_last) = write_three(original.path()).await;
    let full = log_len(original.path());
    for cut in before_last..full {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(original.path(), dir.path());
        OpenOptions::new()
            .write(true)
            .open(dir.path().join("events.log"))
            .unwrap()
            .set_len(cut)
            .unwrap();
        let store = open(dir.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(store.load_all("s").await.unwrap(), a, "cut at {cut}");
        assert_eq!(store.load_all("other").await.unwrap(), b, "cut at {cut}");
        assert_eq!(
            log_len(dir.path()),
            before_last,
            "the torn tail is truncated"
        );
        // The store takes appends again where the good records end.
        assert_eq!(store.append("s", 4, &events(1, "d")).await.unwrap(), 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_last_record_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    write_three(dir.path()).await;
    let good = log_len(dir.path());
    let mut file = OpenOptions::new()
        .append(true)
        .open(dir.path().join("events.log"))
        .unwrap();
    file.write_all(&[
        0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
    ])
    .unwrap();
    file.write_all(&[0u8; 4096]).unwrap();
    drop(file);
    let store = open(dir.path()).unwrap();
    assert_eq!(store.version("s").await.unwrap(), 9);
    assert_eq!(log_len(dir.path()), good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_the_middle_is_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write_three(dir.path()).await;
    let path = dir.path().join("events.log");
    let mut bytes = fs::read(&path).unwrap();
    bytes[20] ^= 0x10; // inside the first record's payload
    fs::write(&path, &bytes).unwrap();
    let err = open(dir.path()).unwrap_err();
    match err {
        StoreError::Corrupt { offset, reason, .. } => {
            assert_eq!(offset, 0);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected corruption, got {other}"),
    }
    // Nothing was truncated: the operator still has every byte.
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_count_disagrees_with_its_events_is_corrupt_not_a_wrong_version() {
    // A well-framed record (good checksum) whose header counts 2 events but holds 1: the
    // stream's version said 2 while 1 event loaded, and every append conflicted. Found by the
    // file_store_reader fuzz target's invariant (fuzz/regressions/file_store_reader/).
    let dir = tempfile::tempdir().unwrap();
    let batch = br#"[{"v":1,"event":{"type":"plan_completed","at":9}}]"#;
    let mut payload = Vec::new();
    payload.extend_from_slice(&1u16.to_le_bytes());
    payload.extend_from_slice(b"s");
    payload.extend_from_slice(&0u64.to_le_bytes());
    payload.extend_from_slice(&2u32.to_le_bytes());
    payload.extend_from_slice(batch);
    let mut record = (payload.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    fs::write(dir.path().join("events.log"), &record).unwrap();
    let store = open(dir.path()).unwrap();
    match store.load_all("s").await.unwrap_err() {
        StoreError::Corrupt { offset, reason, .. } => {
            assert_eq!(offset, 0);
            assert!(
                reason.contains("holds 1 events, its header says 2"),
                "{reason}"
            );
        }
        other => panic!("expected corruption, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path()).unwrap();
    let err = open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    drop(first);
    // The writer thread ends when the store is dropped; the lock goes with the handle.
    let reopened = open(dir.path());
    assert!(reopened.is_ok(), "{:?}", reopened.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _, _) = write_three(dir.path()).await;
    let store = open(dir.path()).unwrap();
    let all = store.load_all("s").await.unwrap();
    assert_eq!(&all[..4], &a[..]);
    assert_eq!(all.len(), 9);
    assert_eq!(
        store.list_streams().await.unwrap(),
        vec!["other".to_owned(), "s".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_snapshot_is_ignored_in_favour_of_a_full_replay() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).unwrap();
    let batches = crate::support::real_session();
    let mut version = 0;
    let mut live = planner_core::Planner::new();
    for batch in &batches {
        version = store.append("s", version, batch).await.unwrap();
        for e in batch {
            live.apply(e);
        }
    }
    store
        .save_snapshot("s", &Snapshot::of(live.state()))
        .await
        .unwrap();
    fs::write(
        dir.path().join("snapshots/s.json"),
        br#"{"schema":99,"version":3,"state":{}}"#,
    )
    .unwrap();
    assert_eq!(store.load_snapshot("s").await.unwrap(), None);
    let loaded = load_planner(&store, "s").await.unwrap();
    assert_eq!(loaded.state(), live.state());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_over_the_record_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = FileStoreConfig::new(dir.path());
    config.max_record_bytes = 1_000;
    let store = FileStore::open(config).unwrap();
    let err = store.append("s", 0, &events(100, "x")).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { limit: 1_000, .. }),
        "{err}"
    );
    assert_eq!(store.version("s").await.unwrap(), 0);
}

/// `replay` and `sessions` could not read a store a `run` was using (its lock). A read-only
/// open takes no lock, reads what is there, skips a torn tail without repairing it, and
/// refuses to write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_in_use_can_be_read_without_its_lock() {
    let dir = tempfile::tempdir().unwrap();
    let writer = open(dir.path()).unwrap();
    let a = events(4, "a");
    writer.append("s", 0, &a).await.unwrap();
    assert!(matches!(open(dir.path()), Err(StoreError::Locked { .. })));

    // A torn write at the end, as a crash mid-append leaves it.
    let mut log = OpenOptions::new()
        .append(true)
        .open(dir.path().join("events.log"))
        .unwrap();
    log.write_all(&[0x00, 0x00, 0x01]).unwrap();
    drop(log);
    let torn = log_len(dir.path());

    let reader = FileStore::open_read_only(FileStoreConfig::new(dir.path())).unwrap();
    assert_eq!(reader.load_all("s").await.unwrap(), a);
    assert_eq!(reader.list_streams().await.unwrap(), vec!["s".to_owned()]);
    assert_eq!(log_len(dir.path()), torn, "a reader repairs nothing");
    assert!(matches!(
        reader.append("s", 4, &events(1, "x")).await,
        Err(StoreError::ReadOnly { .. })
    ));
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_index_is_rebuilt_from_the_log_when_the_store_reopens() {
    use crate::support::lifecycle;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path()).unwrap();
        store.append("a", 0, &[lifecycle::started()]).await.unwrap();
        store.append("a", 1, &events(2, "x")).await.unwrap();
        store.append("b", 0, &[lifecycle::started()]).await.unwrap();
        store
            .append("b", 1, &[lifecycle::completed()])
            .await
            .unwrap();
        store.append("c", 0, &[lifecycle::started()]).await.unwrap();
        store
            .append("c", 1, &[lifecycle::completed()])
            .await
            .unwrap();
        store.append("c", 2, &[lifecycle::planned()]).await.unwrap();
        // A user's text naming an event type does not fool the scan's filter.
        let mut mention = events(1, "plan_completed session_started");
        mention.insert(0, lifecycle::completed());
        store.append("d", 0, &[lifecycle::started()]).await.unwrap();
        store.append("d", 1, &mention).await.unwrap();
        assert_eq!(store.list_open().await.unwrap(), ["a", "c"]);
    }
    let store = open(dir.path()).unwrap();
    assert_eq!(store.list_open().await.unwrap(), ["a", "c"]);
    let reader = FileStore::open_read_only(FileStoreConfig::new(dir.path())).unwrap();
    assert_eq!(reader.list_open().await.unwrap(), ["a", "c"]);
}
