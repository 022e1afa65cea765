//! Hand-over (docs/protocol.md, "The next task with the reply"): a direct report that asks
//! for the session's next task gets it in the reply, claimed for it in the same write as the
//! report's events, and sent to no one else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use planner_core::Event;
use planner_store::EventStore;
use planner_svc::protocol::{LeaseReply, NextTask, ReportReply};
use planner_testkit::NatsServer;
use serde_json::json;

use crate::harness::{
    claim, command, config, start_pool, store, wait_for_end, with_target_heartbeat, Daemon,
};
use crate::reports::{chain, lease_of, result};

/// A completion of attempt 1 of `task` that asks for the next task of the subjects `serves`.
fn completed_asking(task: &str, lease: &str, serves: &str, claim_id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "task_id": task, "attempt": 1, "status": "completed", "output": format!("{task} done"),
        "lease": lease, "next": {"serves": [serves], "claim_id": claim_id},
    }))
    .unwrap()
}

/// Dispatches the dispatch stream ever stored.
async fn stored_dispatches(client: &async_nats::Client) -> u64 {
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream("PLANNER_TASKS").await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

/// The task a reply handed over, or a panic naming the reply.
fn handed_over(reply: ReportReply) -> NextTask {
    match reply {
        ReportReply::Ok { next: Some(next) } => *next,
        other => panic!("no task handed over: {other:?}"),
    }
}

/// Event types of each batch of the session's log.
async fn batches(store: &impl EventStore, session: &str) -> Vec<Vec<String>> {
    store
        .load_batches(session)
        .await
        .unwrap()
        .into_iter()
        .map(|batch| {
            batch
                .events
                .unwrap()
                .iter()
                .map(|e| match e {
                    Event::TaskDispatched { task_id, .. }
                    | Event::AttemptClaimed { task_id, .. }
                    | Event::TaskStatusUpdated { task_id, .. } => {
                        format!("{}:{task_id}", e.event_type())
                    }
                    _ => e.event_type().to_owned(),
                })
                .collect()
        })
        .collect()
}

/// Polls the session's log until `task` is dispatched (attempt `attempt`); returns the log.
async fn until_dispatched(
    store: &impl EventStore,
    session: &str,
    task: &str,
    attempt: u32,
    within: Duration,
) -> Vec<Event> {
    let deadline = Instant::now() + within;
    loop {
        let events = store.load_all(session).await.unwrap();
        if events.iter().any(|e| {
            matches!(e, Event::TaskDispatched { task_id, attempt: a, .. } if task_id.as_str() == task && *a == attempt)
        }) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{task} attempt {attempt} was never dispatched: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_asking_for_next_gets_a_ready_task_it_serves_claimed_in_the_same_write() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let store = store(&server.url()).await;
    let mut plan = chain(&["a", "b", "c"]);
    plan["plan"]["tasks"][2]["target"] = json!("other");
    command(&client, "s-next", plan).await;
    let lease = lease_of(&client, "s-next", "a").await;

    let claim_id = "next-claim-of-b-0001";
    let report = completed_asking("a", &lease, "planner.task.>", claim_id);
    let next = handed_over(result(&client, "s-next", report.clone()).await);
    assert_eq!(next.task.session, "s-next");
    assert_eq!(next.task.assignment.task_id.as_str(), "b");
    assert_eq!(next.task.assignment.attempt, 1);
    assert_eq!(next.lease, claim_id);
    // One write: a's completion, b's dispatch and b's claim, in one batch.
    let logged = batches(&store, "s-next").await;
    let last = logged.last().unwrap();
    for wanted in [
        "task_status_updated:a",
        "task_dispatched:b",
        "attempt_claimed:b",
    ] {
        assert!(last.iter().any(|e| e == wanted), "{wanted} not in {last:?}");
    }
    // The same report again (its reply lost): the same task, with the same lease.
    let again = handed_over(result(&client, "s-next", report).await);
    assert_eq!(again, next);
    assert_eq!(
        batches(&store, "s-next").await.len(),
        logged.len(),
        "a report sent again writes nothing"
    );
    // b went to no one else: only a was ever in the dispatch stream (no pool takes offers).
    // (A publish is sent before the reply but not awaited: give a stray one time to land.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored_dispatches(&client).await, 1);
    // The lease is the executor's: its heartbeat is answered, another's claim is refused.
    let beat = json!({"task_id": "b", "attempt": 1, "lease": claim_id});
    let reply = client
        .request(
            "planner.heartbeat.s-next",
            serde_json::to_vec(&beat).unwrap().into(),
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<LeaseReply>(&reply.payload).unwrap(),
        LeaseReply::Alive
    );
    assert!(matches!(
        claim(&client, "s-next", json!({"task_id": "b", "attempt": 1})).await,
        LeaseReply::Stop { .. }
    ));

    // c's target is not among the subjects the executor serves: nothing handed over, c is
    // dispatched as ever.
    let reply = result(
        &client,
        "s-next",
        completed_asking(
            "b",
            claim_id,
            "planner.task.tool_call.tool",
            "next-claim-of-c-0001",
        ),
    )
    .await;
    assert_eq!(reply, ReportReply::Ok { next: None });
    let events = store.load_all("s-next").await.unwrap();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::AttemptClaimed { task_id, .. } if task_id.as_str() == "c")),
        "{events:?}"
    );
    assert_eq!(stored_dispatches(&client).await, 2);
    let lease = lease_of(&client, "s-next", "c").await;
    // The plan's last report: nothing left to hand over.
    let reply = result(
        &client,
        "s-next",
        completed_asking("c", &lease, "planner.task.>", "next-claim-of-d-0001"),
    )
    .await;
    assert_eq!(reply, ReportReply::Ok { next: None });
    let events = wait_for_end(&store, "s-next").await;
    assert!(events.iter().any(|e| e.event_type() == "plan_completed"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_on_the_report_stream_or_malformed_is_ignored_and_the_report_applied() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = store(&server.url()).await;
    command(&client, "s-ignored", chain(&["a", "b", "c", "d", "e"])).await;

    // From the stream there is no reply to hand a task over in.
    let lease = lease_of(&client, "s-ignored", "a").await;
    let body = completed_asking("a", &lease, "planner.task.>", "next-claim-from-stream");
    js.publish("planner.report.s-ignored", body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    until_dispatched(&store, "s-ignored", "b", 1, Duration::from_secs(10)).await;
    // b is unclaimed: anyone's claim gets it.
    let lease = lease_of(&client, "s-ignored", "b").await;

    // A report published without a reply subject: there is no one to hand c over to.
    let report = completed_asking("b", &lease, "planner.task.>", "next-claim-without-reply");
    client
        .publish("planner.result.s-ignored", report.into())
        .await
        .unwrap();
    let events = until_dispatched(&store, "s-ignored", "c", 1, Duration::from_secs(10)).await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::AttemptClaimed { task_id, .. } if task_id.as_str() == "c")),
        "{events:?}"
    );

    // A `next` of the wrong shape: the report counts, `next` does not.
    let lease = lease_of(&client, "s-ignored", "c").await;
    for next in [
        json!(5),
        json!({"serves": ["planner.task.>"], "claim_id": "next-claim-with-extra", "extra": 1}),
    ] {
        let body = json!({"task_id": "c", "attempt": 1, "status": "completed", "output": "c done",
            "lease": lease, "next": next});
        let reply = result(&client, "s-ignored", serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(reply, ReportReply::Ok { next: None }, "{body}");
    }
    let events = until_dispatched(&store, "s-ignored", "d", 1, Duration::from_secs(10)).await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::AttemptClaimed { task_id, .. } if task_id.as_str() == "d")),
        "{events:?}"
    );

    // A claim id too short to be a lease: the report counts, `next` does not.
    let lease = lease_of(&client, "s-ignored", "d").await;
    let reply = result(
        &client,
        "s-ignored",
        completed_asking("d", &lease, "planner.task.>", "short"),
    )
    .await;
    assert_eq!(reply, ReportReply::Ok { next: None });
    let lease = lease_of(&client, "s-ignored", "e").await;
    let reply = result(
        &client,
        "s-ignored",
        crate::reports::completed("e", 1, &lease),
    )
    .await;
    assert_eq!(reply, ReportReply::Ok { next: None });
    wait_for_end(&store, "s-ignored").await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_handed_over_to_an_executor_that_dies_is_retried_after_its_heartbeat_timeout() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(with_target_heartbeat(config(&server), "tool", 1_000)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let store = store(&server.url()).await;
    command(&client, "s-lost", chain(&["a", "b"])).await;
    let lease = lease_of(&client, "s-lost", "a").await;
    let reply = result(
        &client,
        "s-lost",
        completed_asking("a", &lease, "planner.task.>", "next-claim-that-dies"),
    )
    .await;
    let next = handed_over(reply);
    assert_eq!(next.task.assignment.task_id.as_str(), "b");
    assert_eq!(next.heartbeat_interval_ms, Some(333));
    // The executor never runs it, never heartbeats: attempt 2 is dispatched to anyone.
    let started = Instant::now();
    until_dispatched(&store, "s-lost", "b", 2, Duration::from_secs(15)).await;
    assert!(started.elapsed() >= Duration::from_millis(500));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_handed_over_in_a_reply_its_executor_never_got_is_retried_when_the_report_comes_by_the_stream(
) {
    // The default heartbeat timeout (30 s): without the release, attempt 2 waits that long.
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = store(&server.url()).await;
    command(&client, "s-unheard", chain(&["a", "b"])).await;
    let lease = lease_of(&client, "s-unheard", "a").await;
    let report = completed_asking("a", &lease, "planner.task.>", "next-claim-never-received");
    // Applied, b claimed for the executor in the reply; the executor timed out before it
    // came (a NATS node died under the request, say) and publishes the report to the stream.
    let next = handed_over(result(&client, "s-unheard", report.clone()).await);
    assert_eq!(next.task.assignment.task_id.as_str(), "b");
    let sent = Instant::now();
    js.publish("planner.report.s-unheard", report.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let events = until_dispatched(&store, "s-unheard", "b", 2, Duration::from_secs(10)).await;
    assert!(sent.elapsed() < Duration::from_secs(10));
    let completions_of_a = events
        .iter()
        .filter(
            |e| matches!(e, Event::TaskStatusUpdated { task_id, .. } if task_id.as_str() == "a"),
        )
        .count();
    assert_eq!(completions_of_a, 1, "the report counted once: {events:?}");
    // The lease handed over is void: the executor that never got it cannot heartbeat it.
    let beat = json!({"task_id": "b", "attempt": 1, "lease": "next-claim-never-received"});
    let reply = client
        .request(
            "planner.heartbeat.s-unheard",
            serde_json::to_vec(&beat).unwrap().into(),
        )
        .await
        .unwrap();
    assert!(
        matches!(
            serde_json::from_slice::<LeaseReply>(&reply.payload).unwrap(),
            LeaseReply::Stop { .. }
        ),
        "attempt 1 of b still alive"
    );
    // Attempt 2 runs and the plan ends.
    let lease = match claim(&client, "s-unheard", json!({"task_id": "b", "attempt": 2})).await {
        LeaseReply::Granted { lease, .. } => lease,
        other => panic!("attempt 2 of b was not granted: {other:?}"),
    };
    let body = serde_json::to_vec(&json!({
        "task_id": "b", "attempt": 2, "status": "completed", "output": "b done", "lease": lease,
    }))
    .unwrap();
    assert_eq!(
        result(&client, "s-unheard", body).await,
        ReportReply::Ok { next: None }
    );
    let events = wait_for_end(&store, "s-unheard").await;
    assert!(events.iter().any(|e| e.event_type() == "plan_completed"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_asks_for_next_runs_a_chain_with_one_write_per_task() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let store = store(&server.url()).await;
    let (pool, stop) = start_pool(
        &client,
        "next-pool",
        Duration::from_millis(1),
        Arc::new(planner_svc::executor::NoObserver),
    );
    let tasks = ["t0", "t1", "t2", "t3", "t4", "t5"];
    // Wait until the pool takes offers: the first task goes by offer, the rest by hand-over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    command(&client, "s-pool", chain(&tasks)).await;
    let events = wait_for_end(&store, "s-pool").await;
    assert!(events.iter().any(|e| e.event_type() == "plan_completed"));
    let logged = batches(&store, "s-pool").await;
    // After t0's claim, each task's completion, the next task's dispatch and its claim share
    // one batch: one write per task.
    for pair in tasks.windows(2) {
        let (done, next) = (pair[0], pair[1]);
        assert!(
            logged.iter().any(|batch| {
                batch.contains(&format!("task_status_updated:{done}"))
                    && batch.contains(&format!("task_dispatched:{next}"))
                    && batch.contains(&format!("attempt_claimed:{next}"))
            }),
            "{next} was not handed over with {done}'s report: {logged:?}"
        );
    }
    let claims = events
        .iter()
        .filter(|e| e.event_type() == "attempt_claimed")
        .count();
    assert_eq!(
        claims,
        tasks.len(),
        "every attempt claimed once: {events:?}"
    );
    assert_eq!(stored_dispatches(&client).await, 0);
    stop.cancel();
    pool.await.unwrap().unwrap();
    daemon.stop().await;
}

/// A non-English output at the report size limit: the task handed over with its reply carries
/// it intact as its input, with its own non-English description.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_english_output_at_the_report_limit_reaches_the_task_handed_over_intact() {
    let server = NatsServer::start().unwrap();
    let config = config(&server);
    let limit = config.limits.max_message_bytes;
    let daemon = Daemon::start(config).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut plan = chain(&["a", "b"]);
    plan["plan"]["tasks"][1]["description"] = json!("要約する — résumer — تلخيص 👍🏽");
    command(&client, "s-intl-next", plan).await;
    let lease = lease_of(&client, "s-intl-next", "a").await;
    let report = |output: &str| {
        serde_json::to_vec(&json!({"task_id": "a", "attempt": 1, "status": "completed",
            "output": output, "lease": lease,
            "next": {"serves": ["planner.task.tool_call.tool"], "claim_id": "next-claim-intl-0001"}}))
        .unwrap()
    };
    let phrase = "结果：完成。Итог: готово. النتيجة: تم. 👍🏽 e\u{301} ";
    let overhead = report("").len();
    let mut output = String::new();
    while overhead + output.len() + phrase.len() <= limit {
        output.push_str(phrase);
    }
    while overhead + output.len() < limit {
        output.push('x');
    }
    assert_eq!(report(&output).len(), limit);
    let next = handed_over(result(&client, "s-intl-next", report(&output)).await);
    let a = &next.task.assignment;
    assert_eq!(a.task_id.as_str(), "b");
    assert_eq!(a.description, "要約する — résumer — تلخيص 👍🏽");
    assert_eq!(a.inputs.len(), 1);
    assert_eq!(a.inputs[0].output, output, "a's output reached b intact");
    daemon.stop().await;
}
