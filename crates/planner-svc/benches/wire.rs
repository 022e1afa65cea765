//! Reading the two messages every chained task crosses the wire in: the executor's report (read
//! by the planner) and the planner's reply with the next task (read by the executor), with the
//! hand-written decoders of `protocol/decode.rs` against serde's derived reading they replace.
//!
//! `cargo bench -p planner-svc --bench wire`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use planner_core::ExecutorEvent;
use planner_svc::protocol::{NextRequest, ReportMessage, ReportReply};
use serde::{Deserialize, Deserializer};

/// The derived reading of a report (flattened event, tagged outcome, `next` read leniently
/// through a `Value`), as before the decoder.
#[derive(Deserialize)]
#[allow(dead_code)]
struct DerivedReport {
    #[serde(flatten)]
    event: ExecutorEvent,
    #[serde(default)]
    lease: Option<String>,
    #[serde(default, deserialize_with = "lenient_next")]
    next: Option<NextRequest>,
}

fn lenient_next<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NextRequest>, D::Error> {
    Ok(NextRequest::deserialize(serde_json::Value::deserialize(d)?).ok())
}

/// The derived reading of a reply (tagged, the task flattened), as before the decoder.
#[derive(Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[allow(dead_code)]
enum DerivedReply {
    Ok {
        #[serde(default)]
        next: Option<Box<DerivedNext>>,
    },
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct DerivedNext {
    task: DerivedTask,
    lease: String,
    heartbeat_interval_ms: Option<u64>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct DerivedTask {
    session: String,
    #[serde(flatten)]
    assignment: planner_core::TaskAssignment,
}

/// A report as the shipped pool sends it: a completion asking for the next task.
fn report() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "task_id": "t7", "attempt": 1, "status": "completed",
        "output": "session 3f2a: 42 rows matched; see report-7.csv for the rows and their sources",
        "lease": "9b1c7e0f4a2d4c8e9f3b6a1d2c5e7f90",
        "next": {
            "serves": ["planner.task.>"],
            "claim_id": "5d2e8f1a3b4c4d6e8f9a0b1c2d3e4f50",
            "context_ref": "a1b2c3d4e5f60718"
        }
    }))
    .unwrap()
}

/// A reply handing the next task over, its context held by the executor (by reference).
fn reply() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "status": "ok",
        "next": {
            "task": {
                "session": "3f2a9c1e", "task_id": "t8", "attempt": 1, "kind": "processing",
                "target": "analyze", "description": "compare the prices of the two lists",
                "attachments": [],
                "inputs": [{"task_id": "t7", "output": "session 3f2a: 42 rows matched; see report-7.csv"}],
                "context_ref": "a1b2c3d4e5f60718"
            },
            "lease": "5d2e8f1a3b4c4d6e8f9a0b1c2d3e4f50",
            "heartbeat_interval_ms": 10000
        }
    }))
    .unwrap()
}

fn wire(c: &mut Criterion) {
    let report = report();
    let reply = reply();
    // Both readings must take the samples as meant, or the comparison means nothing.
    let read: ReportMessage = serde_json::from_slice(&report).unwrap();
    assert!(read.next.is_some());
    let derived: DerivedReport = serde_json::from_slice(&report).unwrap();
    assert_eq!(derived.next, read.next);
    let ReportReply::Ok { next: Some(_) } = serde_json::from_slice(&reply).unwrap() else {
        panic!("the sample reply hands no task over");
    };
    let DerivedReply::Ok { next: Some(_) } = serde_json::from_slice(&reply).unwrap() else {
        panic!("the sample reply hands no task over");
    };

    let mut group = c.benchmark_group("wire");
    group.bench_function("report/decoder", |b| {
        b.iter(|| serde_json::from_slice::<ReportMessage>(black_box(&report)).unwrap())
    });
    group.bench_function("report/derived", |b| {
        b.iter(|| serde_json::from_slice::<DerivedReport>(black_box(&report)).unwrap())
    });
    group.bench_function("reply/decoder", |b| {
        b.iter(|| serde_json::from_slice::<ReportReply>(black_box(&reply)).unwrap())
    });
    group.bench_function("reply/derived", |b| {
        b.iter(|| serde_json::from_slice::<DerivedReply>(black_box(&reply)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
