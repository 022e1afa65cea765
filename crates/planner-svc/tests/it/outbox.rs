//! The outbox: a publish that fails after its events are persisted is retried within
//! [`OUTBOX_RETRY`], not at the next sweep, and in the trace of the request it serves.

use std::sync::{Arc, Mutex};

use planner_core::Command;
use planner_store::MemoryStore;
use planner_svc::engine::{Engine, EngineConfig, Outgoing, Publisher};
use planner_svc::trace::{Edge, TraceParent};

/// A bus that refuses its first `failures` publishes and records, for every dispatch it
/// accepts, its attempt and the trace it was published in.
#[derive(Default)]
struct FlakyBus {
    failures: Mutex<usize>,
    accepted: Mutex<Vec<(u32, Option<String>)>>,
}

impl Publisher for FlakyBus {
    async fn publish(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        {
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                anyhow::bail!("the dispatch stream's leader is gone");
            }
        }
        let trace = planner_svc::trace::current().map(|t| t.trace_id());
        let mut accepted = self.accepted.lock().unwrap();
        for message in messages {
            if let Outgoing::Task(task) = message {
                accepted.push((task.assignment.attempt, trace.clone()));
            }
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_publish_is_retried_by_the_outbox_in_the_trace_of_its_request() {
    let bus = Arc::new(FlakyBus {
        failures: Mutex::new(1),
        ..FlakyBus::default()
    });
    let (engine, _timers) = Engine::new(
        Arc::new(MemoryStore::new()),
        Arc::clone(&bus),
        EngineConfig::default(),
    );
    let plan = serde_json::json!({"type": "initialize", "input": "traced", "plan": {"tasks": [
        {"id": "a", "description": "do a", "kind": "tool_call", "target": "search", "dependencies": []},
    ]}});
    let command: Command = serde_json::from_value(plan).unwrap();
    let request = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    planner_svc::trace::scope(request, Edge::Command, engine.handle("traced", command))
        .await
        .expect("persisted, though its publish failed");
    assert!(
        bus.accepted.lock().unwrap().is_empty(),
        "the bus refused it"
    );

    // The daemon calls this every OUTBOX_RETRY, outside any trace.
    engine.retry_unpublished().await;
    assert_eq!(
        *bus.accepted.lock().unwrap(),
        vec![(1, Some("0af7651916cd43dd8448eb211c80319c".to_owned()))],
        "re-published at once, in the request's trace"
    );
    // Nothing left to retry.
    engine.retry_unpublished().await;
    assert_eq!(bus.accepted.lock().unwrap().len(), 1);
}
