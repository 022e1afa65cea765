//! Writes the hand-made seeds of every target into `fuzz/corpus/<target>/seed-*`: valid inputs
//! made by the real encoders (events, snapshots, a file store log), so the fuzzer starts from
//! the shapes the daemon reads. `cargo run -p planner-fuzz --example seed_corpus`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use planner_core::codec;
use planner_core::{
    Command, Event, ExecutorEvent, ExecutorOutcome, Planner, PlannerConfig, TaskId, TaskStatus,
    Timestamp,
};
use planner_store::jetstream::encode_snapshot;
use planner_store::{EventStore, FileStore, FileStoreConfig, FsyncPolicy, Snapshot};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).unwrap();
}

/// A session run to its end: (the events of each command, the planner).
fn session() -> (Vec<Vec<Event>>, Planner) {
    let config = PlannerConfig {
        token_budget: 80,
        ..PlannerConfig::default()
    };
    let mut planner = Planner::with_config(config).unwrap();
    let mut batches = Vec::new();
    let mut now = 1_000;
    batches.push(
        planner
            .process(Command::Initialize {
                request_id: Some("r1".into()),
                input: "1. search for flights to Paris\n2. ask which date suits?\n3. summarize the options"
                    .into(),
                attachments: vec![],
                plan: None,
                planning: None,
                now: Timestamp(now),
            })
            .unwrap(),
    );
    for _ in 0..20 {
        now += 100;
        let state = planner.state();
        let Some(task) = state.tasks.iter().find(|t| {
            matches!(
                t.status,
                TaskStatus::Running | TaskStatus::NeedsClarification
            )
        }) else {
            break;
        };
        let (id, attempt, status) = (task.id.clone(), task.attempts, task.status);
        let command = if status == TaskStatus::NeedsClarification {
            Command::AnswerClarification {
                task_id: id,
                answer: "next Friday".into(),
                now: Timestamp(now),
            }
        } else if attempt == 1 && id == TaskId::from("t1") {
            Command::HandleExecutorEvent {
                event: ExecutorEvent {
                    task_id: id,
                    attempt,
                    outcome: ExecutorOutcome::Failed {
                        error: "timeout talking to the API".into(),
                        retryable: true,
                        tokens_used: Some(3),
                    },
                },
                lease: None,
                now: Timestamp(now),
            }
        } else {
            Command::HandleExecutorEvent {
                event: ExecutorEvent {
                    task_id: id,
                    attempt,
                    outcome: ExecutorOutcome::Completed {
                        output: "three flights found, the cheapest at 120 EUR".into(),
                        tokens_used: Some(12),
                    },
                },
                lease: None,
                now: Timestamp(now),
            }
        };
        batches.push(planner.process(command).unwrap());
        now += 60_000;
        batches.push(
            planner
                .process(Command::Tick {
                    now: Timestamp(now),
                })
                .unwrap(),
        );
    }
    batches.retain(|b| !b.is_empty());
    (batches, planner)
}

fn main() {
    for (name, text) in [
        (
            "sequence",
            "Search for the release notes, then summarize them",
        ),
        (
            "numbered",
            "1. fetch https://example.com\n2) run the tests\n3. email the report to <recipient>",
        ),
        (
            "bullets",
            "- search flights\n- search hotels\n  near the center\n* ask the user for a budget?",
        ),
        ("german", "Überprüfe die Datei, dann fasse sie zusammen."),
        ("chinese", "查找巴黎的天气，然后总结"),
        (
            "russian",
            "Найди погоду в Париже и кратко опиши. Затем отправь письмо.",
        ),
        (
            "mixed",
            "Café au lait ✨ TBD; afterwards query the DB ??? finally XXX",
        ),
        ("question", "confirm the budget? clarify the deadline"),
    ] {
        write("rule_parser", name, text.as_bytes());
    }

    for (name, plan) in [
        (
            "plan",
            r#"{"tasks":[{"id":"a","description":"search","kind":"tool_call","target":"search"},{"id":"b","description":"which date?","kind":"clarification","target":"user","question":"Which date?"},{"id":"c","description":"summarize","kind":"processing","target":"llm","dependencies":["a","b"],"attachments":[{"name":"x.csv","uri":"file:///tmp/x.csv","media_type":"text/csv"}],"timeouts":{"heartbeat_timeout_ms":500,"start_to_close_ms":9000}}]}"#,
        ),
        (
            "cycle",
            r#"{"tasks":[{"id":"a","description":"x","kind":"processing","target":"p","dependencies":["b"]},{"id":"b","description":"y","kind":"processing","target":"p","dependencies":["a"]}]}"#,
        ),
        (
            "existing",
            r#"{"tasks":[{"id":"t9","description":"after t1","kind":"tool_call","target":"search","dependencies":["t1","t3"]}]}"#,
        ),
        (
            "bad",
            r#"{"tasks":[{"id":"a.b","description":"","kind":"tool_call","target":"*","timeouts":{"schedule_to_start_ms":0}}]}"#,
        ),
    ] {
        write("plan_validation", name, plan.as_bytes());
    }

    let (batches, planner) = session();
    let mut all = Vec::new();
    for (i, batch) in batches.iter().enumerate() {
        write(
            "event_decoding",
            &format!("batch-{i:02}"),
            &codec::encode_batch(batch),
        );
        for (j, event) in batch.iter().enumerate() {
            if j == 0 {
                write(
                    "event_decoding",
                    &format!("event-{i:02}"),
                    &codec::encode(event),
                );
            }
        }
        all.extend(batch.iter().cloned());
    }
    write(
        "event_decoding",
        "reordered",
        br#"{"event":{"type":"plan_completed","at":9},"extra":[1,2],"v":1}"#,
    );
    write(
        "event_decoding",
        "old-version",
        br#"{"v":0,"event":{"type":"plan_completed","at":9}}"#,
    );

    let mut midway = Planner::new();
    for event in all.iter().take(all.len() / 2) {
        midway.apply(event);
    }
    for (name, state) in [("end", planner.state()), ("midway", midway.state())] {
        let snapshot = Snapshot::of(state);
        write(
            "snapshot_decoding",
            &format!("{name}.json"),
            &snapshot.encode(),
        );
        write(
            "snapshot_decoding",
            &format!("{name}.lz4"),
            &encode_snapshot(42, &snapshot),
        );
    }

    for (name, json) in [
        (
            "initialize",
            r#"{"type":"initialize","request_id":"r2","input":"search the news, then summarize","attachments":[{"name":"a","uri":"s3://b/a"}]}"#,
        ),
        (
            "initialize-plan",
            r#"{"type":"initialize","input":"supplied","plan":{"tasks":[{"id":"x1","description":"d","kind":"tool_call","target":"search","dependencies":["t1"]}]},"planning":{"source":"llm","note":"model m"}}"#,
        ),
        (
            "answer",
            r#"{"type":"answer_clarification","task_id":"t2","answer":"next Friday"}"#,
        ),
        (
            "cancel-task",
            r#"{"type":"cancel","target":{"scope":"task","task_id":"t1"},"reason":"not needed"}"#,
        ),
        (
            "cancel-plan",
            r#"{"type":"cancel","target":{"scope":"plan"}}"#,
        ),
        ("continue", r#"{"type":"continue"}"#),
        ("forbidden", r#"{"type":"tick","now":5}"#),
    ] {
        write("wire_command", name, json.as_bytes());
    }

    for (name, json) in [
        (
            "completed",
            r#"{"task_id":"t1","attempt":1,"status":"completed","output":"done","tokens_used":5,"lease":"lease-1"}"#,
        ),
        (
            "failed",
            r#"{"task_id":"t4","attempt":1,"status":"failed","error":"boom","retryable":false}"#,
        ),
        (
            "started",
            r#"{"task_id":"t1","attempt":1,"status":"started","lease":"lease-1"}"#,
        ),
        (
            "clarify",
            r#"{"task_id":"t4","attempt":1,"status":"needs_clarification","question":"which one?","extra":{"x":1}}"#,
        ),
    ] {
        write("wire_report", name, json.as_bytes());
    }

    for (name, json) in [
        ("claim", r#"{"task_id":"t4","attempt":1}"#),
        ("claim-again", r#"{"task_id":"t1","attempt":1}"#),
        (
            "heartbeat",
            r#"{"task_id":"t1","attempt":1,"lease":"lease-1"}"#,
        ),
        (
            "heartbeat-wrong",
            r#"{"task_id":"t1","attempt":2,"lease":"other"}"#,
        ),
    ] {
        write("wire_lease", name, json.as_bytes());
    }

    // A log written by the real store: two sessions' batches interleaved.
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut config = FileStoreConfig::new(dir.path());
        config.fsync = FsyncPolicy::Never;
        let store = FileStore::open(config).unwrap();
        let mut versions = [0u64, 0u64];
        for (i, batch) in batches.iter().take(6).enumerate() {
            let (stream, v) = if i % 3 == 2 {
                ("s-2", &mut versions[1])
            } else {
                ("s-1", &mut versions[0])
            };
            *v = store.append(stream, *v, batch).await.unwrap();
        }
    });
    let log = std::fs::read(dir.path().join("events.log")).unwrap();
    write("file_store_reader", "log", &log);
    write("file_store_reader", "torn", &log[..log.len() - 7]);
    write("file_store_reader", "empty", b"");
    println!("seeds written under {}", corpus("").display());
}
