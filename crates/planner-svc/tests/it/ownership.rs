//! Sessions have an owner: partitions leased through a KV bucket, reports routed by the
//! server's subject transform, requests forwarded to the owner, failover and handover.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use planner_core::{Event, PlanPhase, Planner};
use planner_store::EventStore;
use planner_svc::partition::partition_of;
use planner_svc::protocol::{OwnershipReply, Subjects};
use planner_testkit::NatsServer;
use serde_json::json;

use crate::harness::{command, config, store, wait_for_end, Daemon, ExecutorBehaviour, Executors};

const PARTITIONS: u32 = 32;

/// Every instance's answer on `planner.admin.ownership`.
pub async fn ownership(client: &async_nats::Client) -> Vec<OwnershipReply> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("planner.admin.ownership", inbox, "".into())
        .await
        .unwrap();
    let mut all = Vec::new();
    while let Ok(Some(reply)) =
        tokio::time::timeout(Duration::from_millis(300), replies.next()).await
    {
        // A status without a body (no responders yet) is no instance's answer.
        if let Ok(answer) = serde_json::from_slice(&reply.payload) {
            all.push(answer);
        }
    }
    all.sort_by(|a: &OwnershipReply, b| a.instance.cmp(&b.instance));
    all
}

/// Waits until `instances` instances answer and split all partitions between them, each
/// holding some; returns their replies.
pub async fn wait_for_split(
    client: &async_nats::Client,
    instances: usize,
    within: Duration,
) -> Vec<OwnershipReply> {
    let deadline = Instant::now() + within;
    loop {
        let replies = ownership(client).await;
        let mut seen = BTreeSet::new();
        let disjoint = replies
            .iter()
            .all(|r| r.partitions.iter().all(|p| seen.insert(*p)));
        if replies.len() == instances
            && disjoint
            && seen.len() == PARTITIONS as usize
            && replies.iter().all(|r| !r.partitions.is_empty())
        {
            return replies;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not split between {instances} instances: {replies:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

fn completed(events: &[Event]) -> bool {
    Planner::fold(events).state().phase == PlanPhase::Completed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_of_a_session_is_the_one_the_server_files_its_reports_under() {
    let server = NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let subjects = Subjects::new("ptest");
    for partitions in [32, 7] {
        let name = format!("PTEST{partitions}");
        let reports = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subjects
                    .reports()
                    .replace("ptest", &format!("ptest{partitions}"))],
                subject_transform: Some(stream::SubjectTransform {
                    source: subjects
                        .reports()
                        .replace("ptest", &format!("ptest{partitions}")),
                    destination: subjects
                        .report_transform_destination(partitions)
                        .replace("ptest", &format!("ptest{partitions}")),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let sessions: Vec<String> = (0..300)
            .map(|i| format!("s-{i}"))
            .chain(["a", "x", "session_with-Mixed_09", "Z"].map(String::from))
            .collect();
        for session in &sessions {
            js.publish(format!("ptest{partitions}.report.{session}"), "{}".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        for (i, session) in sessions.iter().enumerate() {
            let stored = reports.get_raw_message(i as u64 + 1).await.unwrap();
            let expected = format!(
                "ptest{partitions}.report.{}.{session}",
                partition_of(session, partitions)
            );
            assert_eq!(stored.subject.as_str(), expected);
            assert_eq!(
                Subjects::new(format!("ptest{partitions}")).report_session(&stored.subject),
                Some(session.as_str())
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_partitions_and_each_serves_its_own_sessions() {
    let server = NatsServer::start().unwrap();
    let a = Daemon::start(config(&server)).await;
    let b = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    wait_for_split(&client, 2, Duration::from_secs(10)).await;
    let executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let sessions: Vec<String> = (0..24).map(|i| format!("own-{i}")).collect();
    for session in &sessions {
        command(&client, session, chain_plan(5)).await;
    }
    let store = store(&server.url()).await;
    for session in &sessions {
        assert!(completed(&wait_for_end(&store, session).await), "{session}");
    }
    assert_eq!(executors.max_runs_of_one_attempt(), 1);
    let replies = ownership(&client).await;
    let loads: u64 = replies.iter().map(|r| r.loads).sum();
    let conflicts: u64 = replies.iter().map(|r| r.conflicts).sum();
    let forwarded: u64 = replies.iter().map(|r| r.forwarded).sum();
    // No session is loaded at all (its owner started it, without a read of the store), and
    // none raced: without routing, every report reaching the other instance reloads it.
    assert!(
        loads <= 2,
        "{loads} loads for {} sessions: {replies:?}",
        sessions.len()
    );
    assert_eq!(conflicts, 0, "{replies:?}");
    assert!(
        forwarded > 0,
        "requests reached the other instance and were forwarded: {replies:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_s_partitions_are_taken_over_within_the_ttl_and_nothing_runs_twice() {
    let server = NatsServer::start().unwrap();
    let ttl_ms = 3000;
    let mut doomed = crate::support::serve_instance(&server.url(), ttl_ms, &[]);
    let _survivor = crate::support::serve_instance(&server.url(), ttl_ms, &[]);
    let client = async_nats::connect(server.url()).await.unwrap();
    wait_for_split(&client, 2, Duration::from_secs(60)).await;
    let behaviour = ExecutorBehaviour {
        delay: Duration::from_millis(20),
        ..Default::default()
    };
    let executors = Executors::start(&server.url(), behaviour).await;
    let sessions: Vec<String> = (0..20).map(|i| format!("kill-{i}")).collect();
    for session in &sessions {
        command(&client, session, chain_plan(10)).await;
    }
    // Mid-run: some results in, most not.
    let store = store(&server.url()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut done = 0;
        for session in &sessions {
            done += store
                .load_all(session)
                .await
                .unwrap()
                .iter()
                .filter(|e| e.event_type() == "task_status_updated")
                .count();
        }
        if done >= 30 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill(); // SIGKILL
    let killed_at = Instant::now();
    // The survivor holds every partition within about the TTL (its key expires, the next
    // refresh round sees it gone).
    loop {
        let replies = ownership(&client).await;
        if replies.len() == 1 && replies[0].partitions.len() == PARTITIONS as usize {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_millis(2 * ttl_ms + 2000),
            "partitions not taken over: {replies:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let taken_over = killed_at.elapsed();
    assert!(
        taken_over >= Duration::from_millis(ttl_ms / 2),
        "{taken_over:?}"
    );
    for session in &sessions {
        assert!(completed(&wait_for_end(&store, session).await), "{session}");
    }
    assert_eq!(
        executors.max_runs_of_one_attempt(),
        1,
        "an attempt ran twice: {:?}",
        executors.executions.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_partitions_over_without_waiting_for_the_ttl() {
    let server = NatsServer::start().unwrap();
    let mut slow_ttl = config(&server);
    slow_ttl.ownership.lease_ttl_ms = 60_000;
    let a = Daemon::start(slow_ttl.clone()).await;
    let b = Daemon::start(slow_ttl).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    wait_for_split(&client, 2, Duration::from_secs(10)).await;
    let executors = Executors::start(
        &server.url(),
        ExecutorBehaviour {
            delay: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .await;
    let sessions: Vec<String> = (0..16).map(|i| format!("handover-{i}")).collect();
    for session in &sessions {
        command(&client, session, chain_plan(8)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped_at = Instant::now();
    a.stop().await;
    loop {
        let replies = ownership(&client).await;
        if replies.len() == 1 && replies[0].partitions.len() == PARTITIONS as usize {
            break;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(10),
            "not handed over well before the 60 s TTL: {replies:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = store(&server.url()).await;
    for session in &sessions {
        assert!(completed(&wait_for_end(&store, session).await), "{session}");
    }
    assert_eq!(executors.max_runs_of_one_attempt(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_instance_joining_mid_run_takes_partitions_without_loss() {
    let server = NatsServer::start().unwrap();
    let a = Daemon::start(config(&server)).await;
    let b = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let before = wait_for_split(&client, 2, Duration::from_secs(10)).await;
    let executors = Executors::start(
        &server.url(),
        ExecutorBehaviour {
            delay: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .await;
    let sessions: Vec<String> = (0..24).map(|i| format!("join-{i}")).collect();
    for session in &sessions {
        command(&client, session, chain_plan(8)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let c = Daemon::start(config(&server)).await;
    let after = wait_for_split(&client, 3, Duration::from_secs(10)).await;
    // Rendezvous hashing: the newcomer took partitions; the two others only gave some up.
    for old in &before {
        let now = after.iter().find(|r| r.instance == old.instance).unwrap();
        assert!(
            now.partitions.iter().all(|p| old.partitions.contains(p)),
            "a partition moved between the old instances: {before:?} -> {after:?}"
        );
    }
    let store = store(&server.url()).await;
    for session in &sessions {
        assert!(completed(&wait_for_end(&store, session).await), "{session}");
    }
    assert_eq!(
        executors.max_runs_of_one_attempt(),
        1,
        "{:?}",
        executors.executions.lock().unwrap()
    );
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_from_before_ownership_is_partitioned_and_its_stored_reports_still_count() {
    use planner_core::{ExecutorEvent, ExecutorOutcome};
    use planner_svc::protocol::{LeaseReply, ReportMessage};
    let server = NatsServer::start().unwrap();
    let mut before = config(&server);
    before.ownership.enabled = false;
    let old = Daemon::start(before).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    command(&client, "migrated", chain_plan(3)).await;
    let lease = match crate::harness::claim(
        &client,
        "migrated",
        json!({"task_id": "t0", "attempt": 1, "claim_id": "c-migrated-0123456789"}),
    )
    .await
    {
        LeaseReply::Granted { lease, .. } => lease,
        other => panic!("claim refused: {other:?}"),
    };
    old.stop().await;
    // A report stored while no daemon runs, under the subject of old.
    let js = jetstream::new(client.clone());
    let report = ReportMessage {
        event: ExecutorEvent {
            task_id: "t0".into(),
            attempt: 1,
            outcome: ExecutorOutcome::Completed {
                output: "done".into(),
                tokens_used: None,
            },
        },
        lease: Some(lease),
        next: None,
    };
    js.publish(
        "planner.report.migrated",
        serde_json::to_vec(&report).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut reports = js.get_stream("PLANNER_REPORTS").await.unwrap();
    assert!(reports
        .info()
        .await
        .unwrap()
        .config
        .subject_transform
        .is_none());

    let new = Daemon::start(config(&server)).await;
    let transform = reports
        .info()
        .await
        .unwrap()
        .config
        .subject_transform
        .clone();
    assert_eq!(
        transform.map(|t| t.destination),
        Some(Subjects::new("planner").report_transform_destination(PARTITIONS))
    );
    let executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let store = store(&server.url()).await;
    let events = wait_for_end(&store, "migrated").await;
    assert!(completed(&events));
    // t0 ran once: by hand, its stored report applied by the partitioned daemon.
    assert!(!executors.executions.lock().unwrap().contains_key(&(
        "migrated".to_owned(),
        "t0".to_owned(),
        1
    )));
    new.stop().await;

    let mut wrong = config(&server);
    wrong.ownership.partitions = 16;
    let refused = planner_svc::serve::serve(wrong, std::future::pending()).await;
    let error = planner_svc::report(&refused.unwrap_err());
    assert!(
        error.contains("ownership.partitions must not change"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_joining_under_load_takes_its_sessions_without_the_giver_loading_them_again() {
    let server = NatsServer::start().unwrap();
    let a = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let alone = wait_for_split(&client, 1, Duration::from_secs(10)).await;
    let giver = alone[0].instance.clone();
    // Every session's task is claimed and heartbeats every 100 ms, through the handover: a
    // steady stream of requests for every session, half of them landing on each instance.
    let executors = Executors::start(
        &server.url(),
        ExecutorBehaviour {
            stall_targets: ["hold".to_owned()].into(),
            ..Default::default()
        },
    )
    .await;
    let sessions: Vec<String> = (0..96).map(|i| format!("joined-{i}")).collect();
    let hold = json!({"type": "initialize", "input": "hold", "plan": {"tasks": [
        {"id": "t0", "description": "hold", "kind": "tool_call", "target": "hold", "dependencies": []}
    ]}});
    for session in &sessions {
        command(&client, session, hold.clone()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while executors.executions.lock().unwrap().len() < sessions.len() {
        assert!(Instant::now() < deadline, "the tasks were not all claimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = Daemon::start(config(&server)).await;
    let split = wait_for_split(&client, 2, Duration::from_secs(10)).await;
    // Several heartbeats of every session after the handover.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let taker = split.iter().find(|r| r.instance != giver).unwrap();
    let moved = sessions
        .iter()
        .filter(|s| taker.partitions.contains(&partition_of(s, PARTITIONS)))
        .count() as u64;
    assert!(moved > 0, "{split:?}");
    let replies = ownership(&client).await;
    let of = |instance: &str| replies.iter().find(|r| r.instance == instance).unwrap();
    let (given, taken) = (of(&giver), of(&taker.instance));
    // The giver started each session without loading it and loaded none after handing it
    // over; the taker loaded each session it took once; neither lost a race to the other.
    assert!(
        given.loads <= 1,
        "the giver loaded {} times for {} sessions: {replies:?}",
        given.loads,
        sessions.len()
    );
    assert!(
        taken.loads <= moved + 1,
        "the taker loaded {} times for the {moved} sessions it took: {replies:?}",
        taken.loads
    );
    let conflicts: u64 = replies.iter().map(|r| r.conflicts).sum();
    assert!(conflicts <= 1, "{replies:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_killed_owner_s_session_is_answered_before_its_lease_expires() {
    let server = NatsServer::start().unwrap();
    // A lease far longer than the test: the dead owner's partitions stay its own throughout.
    let ttl_ms = 60_000;
    let mut doomed = crate::support::serve_instance(&server.url(), ttl_ms, &[]);
    let _survivor = crate::support::serve_instance(&server.url(), ttl_ms, &[]);
    let client = async_nats::connect(server.url()).await.unwrap();
    let before = wait_for_split(&client, 2, Duration::from_secs(60)).await;
    doomed.kill(); // SIGKILL: its lease stays until the TTL
    let killed_at = Instant::now();
    let survivor = ownership(&client).await;
    assert_eq!(survivor.len(), 1, "{survivor:?}");
    let dead = before
        .iter()
        .find(|r| r.instance != survivor[0].instance)
        .unwrap();
    let session = (0..)
        .map(|i| format!("orphan-{i}"))
        .find(|s| dead.partitions.contains(&partition_of(s, PARTITIONS)))
        .unwrap();
    // The survivor forwards it to the owner it knows, finds nobody there and answers itself.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(
            format!("planner.cmd.{session}"),
            serde_json::to_vec(&chain_plan(2)).unwrap().into(),
        ),
    )
    .await
    .expect("answered within 5 s")
    .expect("answered, not no responders");
    let reply: planner_svc::protocol::CommandReply =
        serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        matches!(reply, planner_svc::protocol::CommandReply::Ok { .. }),
        "{reply:?}"
    );
    assert!(killed_at.elapsed() < Duration::from_millis(ttl_ms / 2));
    let store = store(&server.url()).await;
    let events = store.load_all(&session).await.unwrap();
    let requests = events
        .iter()
        .filter(|e| e.event_type() == "request_received")
        .count();
    assert_eq!(requests, 1, "applied once: {events:?}");
    let still = ownership(&client).await;
    assert!(
        still[0].partitions.len() < PARTITIONS as usize,
        "the dead owner's lease has not expired: {still:?}"
    );
}

/// A changed partition count cannot be waited out: `serve` exits at once naming the setting,
/// not after `nats.startup_wait_s` (60 s) of retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_changed_partition_count_exits_at_once_naming_the_setting() {
    use crate::support::{planner_svc, Spawned};
    let server = NatsServer::start().unwrap();
    Daemon::start(config(&server)).await.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut daemon = Spawned::start(
        planner_svc()
            .current_dir(dir.path())
            .args(["serve", "--nats-url", &server.url()])
            .env("PLANNER_OWNERSHIP__PARTITIONS", "16")
            .env("PLANNER_METRICS__LISTEN", ""),
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.wait_exit(Duration::from_secs(30));
        (status, daemon.output())
    })
    .await
    .unwrap();
    let (status, output) = status;
    assert!(
        status.is_some_and(|s| !s.success()),
        "exit {status:?}:\n{output}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}:\n{output}",
        started.elapsed()
    );
    assert!(
        output.contains("ownership.partitions must not change"),
        "{output}"
    );
    assert!(output.contains("waiting will not help"), "{output}");
}

/// A dispatch names its session's owner, and the shipped executor pool sends the attempt's
/// claim and report to it: with two instances, only the clients' commands are forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_address_the_owner_a_dispatch_names_so_their_requests_are_not_forwarded() {
    let server = NatsServer::start().unwrap();
    let a = Daemon::start(config(&server)).await;
    let b = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    wait_for_split(&client, 2, Duration::from_secs(10)).await;
    let (pool, stop) = crate::harness::start_pool(
        &client,
        "addressing-pool",
        Duration::from_millis(1),
        std::sync::Arc::new(planner_svc::executor::NoObserver),
    );
    let sessions: Vec<String> = (0..24).map(|i| format!("addressed-{i}")).collect();
    for session in &sessions {
        command(&client, session, chain_plan(5)).await;
    }
    let store = store(&server.url()).await;
    for session in &sessions {
        assert!(completed(&wait_for_end(&store, session).await), "{session}");
    }
    let replies = ownership(&client).await;
    let forwarded: u64 = replies.iter().map(|r| r.forwarded).sum();
    // 24 commands sent to the planner's subject (about half reach the other instance) and
    // 240 claims and reports sent to the owners: forwarding the latter took ~120 hops.
    assert!(
        forwarded <= sessions.len() as u64,
        "{forwarded} requests forwarded: {replies:?}"
    );
    stop.cancel();
    let _ = pool.await;
    a.stop().await;
    b.stop().await;
}

/// A dispatch naming an owner nobody listens for (it died) is claimed and reported on the
/// planner's subjects at once, not after a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_naming_a_dead_owner_is_claimed_through_the_planners_subjects() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    wait_for_split(&client, 1, Duration::from_secs(10)).await;
    command(&client, "ghosted", chain_plan(1)).await;
    // Take the daemon's dispatch off the work queue and put it back naming an owner that is
    // gone (another message id: the first is in the dedup window).
    let js = jetstream::new(client.clone());
    let tasks = js.get_stream("PLANNER_TASKS").await.unwrap();
    let taker = tasks
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("taker".into()),
            filter_subject: "planner.task.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = taker.fetch().max_messages(1).messages().await.unwrap();
    let dispatch = tokio::time::timeout(Duration::from_secs(10), batch.next())
        .await
        .expect("the dispatch")
        .unwrap()
        .unwrap();
    let mut headers = dispatch.headers.clone().unwrap_or_default();
    assert!(
        headers.get(planner_svc::protocol::OWNER_HEADER).is_some(),
        "{headers:?}"
    );
    headers.insert(planner_svc::protocol::OWNER_HEADER, "ghost-instance");
    headers.insert("Nats-Msg-Id", "ghosted-again");
    let subject = dispatch.subject.to_string();
    let payload = dispatch.payload.clone();
    dispatch.ack().await.unwrap();
    tasks.delete_consumer("taker").await.unwrap();
    js.publish_with_headers(subject, headers, payload)
        .await
        .unwrap()
        .await
        .unwrap();
    let started = Instant::now();
    let (pool, stop) = crate::harness::start_pool(
        &client,
        "ghost-pool",
        Duration::from_millis(1),
        std::sync::Arc::new(planner_svc::executor::NoObserver),
    );
    let store = store(&server.url()).await;
    assert!(completed(&wait_for_end(&store, "ghosted").await));
    // Well under the 5 s a request waits: nobody listening is known at once.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    stop.cancel();
    let _ = pool.await;
    daemon.stop().await;
}
