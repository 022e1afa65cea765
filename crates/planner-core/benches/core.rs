//! Core benchmarks: process() over a 1,000-task graph, and fold() of 1M events, in memory and
//! decoded from their persisted JSON. See docs/benchmarks.md for figures and how to read them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use planner_core::*;

/// A 1,000-task layered graph: each task depends on up to two of the ten tasks before it.
fn graph(tasks: usize, prefix: &str) -> PlanSpec {
    let tasks = (0..tasks)
        .map(|i| {
            let mut dependencies = Vec::new();
            if i >= 10 {
                dependencies.push(TaskId(format!("{prefix}{}", i - 10)));
                if i % 3 == 0 {
                    dependencies.push(TaskId(format!("{prefix}{}", i - 7)));
                }
            }
            TaskSpec {
                timeouts: None,
                id: TaskId(format!("{prefix}{i}")),
                description: format!("step {i} of the benchmark graph"),
                kind: if i % 2 == 0 {
                    NodeKind::ToolCall
                } else {
                    NodeKind::Processing
                },
                target: "bench".into(),
                dependencies,
                attachments: vec![],
                question: None,
            }
        })
        .collect();
    PlanSpec { tasks }
}

fn config() -> PlannerConfig {
    PlannerConfig {
        max_parallel: 8,
        ..PlannerConfig::default()
    }
}

fn started(plan: PlanSpec) -> (Planner, Vec<(TaskId, u32)>) {
    let mut planner = Planner::with_config(config()).unwrap();
    let events = planner
        .process(Command::Initialize {
            request_id: None,
            planning: None,
            input: "run the benchmark graph".into(),
            attachments: vec![],
            plan: Some(plan),
            now: Timestamp(0),
        })
        .unwrap();
    let ready = dispatches(&events);
    // Keep the initial events in the log: callers that want them drain it.
    let _ = events;
    (planner, ready)
}

fn dispatches(events: &[Event]) -> Vec<(TaskId, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::TaskDispatched {
                task_id, attempt, ..
            } => Some((task_id.clone(), *attempt)),
            _ => None,
        })
        .collect()
}

/// Runs the plan to its end, completing dispatched tasks in order; returns every event.
fn run_to_end(planner: &mut Planner, mut ready: Vec<(TaskId, u32)>, now: &mut u64) -> Vec<Event> {
    let mut all = Vec::new();
    while let Some((task_id, attempt)) = ready.pop() {
        *now += 1;
        for outcome in [
            ExecutorOutcome::Started,
            ExecutorOutcome::Completed {
                output: "ok: 42 rows".into(),
                tokens_used: Some(10),
            },
        ] {
            let events = planner
                .process(Command::HandleExecutorEvent {
                    lease: None,
                    event: ExecutorEvent {
                        task_id: task_id.clone(),
                        attempt,
                        outcome,
                    },
                    now: Timestamp(*now),
                })
                .unwrap();
            ready.extend(dispatches(&events));
            all.extend(events);
        }
        planner.drain_log();
    }
    all
}

fn process_graph(c: &mut Criterion) {
    let mut group = c.benchmark_group("process");
    // Each task takes two process() steps: started, completed (which dispatches what it frees).
    group.throughput(Throughput::Elements(2_000));
    group.bench_function("1000_task_graph_steps", |b| {
        b.iter_batched(
            || started(graph(1_000, "t")),
            |(mut planner, ready)| {
                let mut now = 0;
                let events = run_to_end(&mut planner, ready, &mut now);
                assert_eq!(planner.state().phase, PlanPhase::Completed);
                events.len()
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

/// A long session: follow-up requests of 10,000 tasks each until it has at least `target` events.
fn long_session(target: usize) -> Vec<Event> {
    let mut planner = Planner::with_config(PlannerConfig {
        max_parallel: 64,
        ..PlannerConfig::default()
    })
    .unwrap();
    let mut all = Vec::new();
    let mut now = 0;
    let mut turn = 0;
    while all.len() < target {
        let events = planner
            .process(Command::Initialize {
                request_id: None,
                planning: None,
                input: format!("request {turn}"),
                attachments: vec![],
                plan: Some(graph(10_000, &format!("r{turn}_"))),
                now: Timestamp(now),
            })
            .unwrap();
        let ready = dispatches(&events);
        all.extend(events);
        all.extend(run_to_end(&mut planner, ready, &mut now));
        turn += 1;
    }
    all.truncate(target);
    all
}

fn fold_events(c: &mut Criterion) {
    const EVENTS: usize = 1_000_000;
    let events = long_session(EVENTS);
    let encoded: Vec<Vec<u8>> = events.iter().map(codec::encode).collect();
    let bytes: usize = encoded.iter().map(Vec::len).sum();
    eprintln!(
        "fold input: {} events, {} JSON bytes ({} bytes/event on average)",
        events.len(),
        bytes,
        bytes / events.len()
    );

    let mut group = c.benchmark_group("fold");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("1m_events_in_memory", |b| {
        b.iter(|| Planner::fold(&events).version());
    });
    group.bench_function("1m_events_decoded_from_json", |b| {
        b.iter(|| {
            let mut planner = Planner::new();
            for bytes in &encoded {
                planner.apply(&codec::decode(bytes).unwrap());
            }
            planner.version()
        });
    });
    group.finish();
}

/// Recovery at start-up: 1,000 sessions of about 1,000 events each, each folded from its own
/// events (what a daemon does for every unfinished session after a restart).
fn fold_many_sessions(c: &mut Criterion) {
    let sessions: Vec<Vec<Event>> = (0..1_000)
        .map(|_| {
            let (mut planner, ready) = started(graph(330, "t"));
            let mut events = planner.drain_log();
            let mut now = 0;
            events.extend(run_to_end(&mut planner, ready, &mut now));
            events
        })
        .collect();
    let total: usize = sessions.iter().map(Vec::len).sum();
    let encoded: Vec<Vec<Vec<u8>>> = sessions
        .iter()
        .map(|s| s.iter().map(codec::encode).collect())
        .collect();
    eprintln!(
        "fold_sessions input: {} sessions, {total} events",
        sessions.len()
    );
    let mut group = c.benchmark_group("fold_sessions");
    group.sample_size(10);
    group.throughput(Throughput::Elements(total as u64));
    group.bench_function("1000x1000_events_in_memory", |b| {
        b.iter(|| {
            sessions
                .iter()
                .map(|s| Planner::fold(s).version())
                .sum::<u64>()
        });
    });
    group.bench_function("1000x1000_events_decoded_from_json", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|session| {
                    let mut planner = Planner::new();
                    for bytes in session {
                        planner.apply(&codec::decode(bytes).unwrap());
                    }
                    planner.version()
                })
                .sum::<u64>()
        });
    });
    group.finish();
}

criterion_group!(benches, process_graph, fold_events, fold_many_sessions);
criterion_main!(benches);
