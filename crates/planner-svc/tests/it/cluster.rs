//! A NATS cluster is the scale-out story: three nats-server nodes, streams at R3, three planner
//! instances; one node and one planner die mid-run.

use std::time::{Duration, Instant};

use planner_core::{Event, PlanPhase, Planner};
use planner_store::EventStore;
use planner_testkit::NatsCluster;
use serde_json::json;

use crate::harness::{command, store, ExecutorBehaviour, Executors};

/// A planner-svc process against the cluster, every stream and the lease bucket at R3.
/// One planner instance of the cluster: everything at R3, leases of 3 s.
fn planner3(url: &str) -> crate::support::Spawned {
    crate::support::serve_instance(
        url,
        3000,
        &[
            ("PLANNER_STORE__REPLICAS", "3"),
            ("PLANNER_DISPATCH__REPLICAS", "3"),
            ("PLANNER_REPORTS__REPLICAS", "3"),
            ("PLANNER_OWNERSHIP__REPLICAS", "3"),
        ],
    )
}

fn chain_plan(tasks: usize) -> serde_json::Value {
    let tasks: Vec<_> = (0..tasks)
        .map(|i| {
            let deps: Vec<String> = if i == 0 { vec![] } else { vec![format!("t{}", i - 1)] };
            json!({"id": format!("t{i}"), "description": "step", "kind": "tool_call", "target": "tool", "dependencies": deps})
        })
        .collect();
    json!({"type": "initialize", "input": "chain", "plan": {"tasks": tasks}})
}

fn ended(events: &[Event]) -> Option<PlanPhase> {
    let phase = Planner::fold(events).state().phase.clone();
    (phase != PlanPhase::Running && events.iter().any(Event::is_terminal)).then_some(phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_and_a_planner_die_mid_run_and_every_session_completes_with_nothing_run_twice()
{
    let mut cluster = NatsCluster::start(3).unwrap();
    let url = cluster.url();
    // The test's own connections go to node 0, which stays up (node 1 is killed); the
    // planners get every node.
    let first = cluster.nodes()[0].url();
    let client = async_nats::connect(first.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    // JetStream answers once the cluster elected its meta leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.query_account().await.is_err() {
        assert!(Instant::now() < deadline, "JetStream never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut planners: Vec<crate::support::Spawned> = (0..3).map(|_| planner3(&url)).collect();
    // Three instances serving, the partitions split between them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replies = crate::ownership::ownership(&client).await;
        let covered: usize = replies.iter().map(|r| r.partitions.len()).sum();
        if replies.len() == 3 && covered == 32 && replies.iter().all(|r| !r.partitions.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instances did not split the partitions: {replies:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let streams = ["PLANNER_EVENTS", "PLANNER_TASKS", "PLANNER_REPORTS"];
    for name in streams {
        let mut stream = js.get_stream(name).await.unwrap();
        assert_eq!(
            stream.info().await.unwrap().config.num_replicas,
            3,
            "{name}"
        );
    }
    let executors = Executors::start(
        &first,
        ExecutorBehaviour {
            delay: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .await;
    let sessions: Vec<String> = (0..15).map(|i| format!("cluster-{i}")).collect();
    for session in &sessions {
        command(&client, session, chain_plan(8)).await;
    }
    let store = store(&first).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut done = 0;
        for session in &sessions {
            done += store
                .load_all(session)
                .await
                .map(|events| {
                    events
                        .iter()
                        .filter(|e| e.event_type() == "task_status_updated")
                        .count()
                })
                .unwrap_or(0);
        }
        if done >= 20 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress before the failures");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mid-run: a NATS node and a planner instance die (SIGKILL both).
    cluster.node_mut(1).unwrap().kill();
    drop(planners.remove(0));
    let deadline = Instant::now() + Duration::from_secs(90);
    for session in &sessions {
        loop {
            if let Ok(events) = store.load_all(session).await {
                if let Some(phase) = ended(&events) {
                    assert_eq!(phase, PlanPhase::Completed, "{session}");
                    break;
                }
            }
            if Instant::now() >= deadline {
                let events = store.load_all(session).await.unwrap_or_default();
                let tail: Vec<String> = events
                    .iter()
                    .rev()
                    .take(12)
                    .rev()
                    .map(|e| serde_json::to_string(e).unwrap_or_default())
                    .collect();
                let logs: Vec<String> = planners.iter().map(|p| p.output()).collect();
                panic!(
                    "{session} did not end; its last events:\n{}\nthe live planners' logs:\n{}",
                    tail.join("\n"),
                    logs.join("\n----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        executors.max_runs_of_one_attempt(),
        1,
        "an attempt ran twice: {:?}",
        executors.executions.lock().unwrap()
    );
}
