//! Offers (docs/protocol.md, "Offers"): a dispatch offered over core NATS before the stream,
//! taken by an executor that claims it, or sent to the stream when nobody takes it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use planner_core::Event;
use planner_testkit::NatsServer;
use serde_json::json;

use crate::harness::{
    command, config, start_pool, start_pool_with, store, wait_for_end, Daemon, ExecutorBehaviour,
    Executors,
};

fn plan(tasks: &[(&str, &[&str])]) -> serde_json::Value {
    let tasks: Vec<_> = tasks
        .iter()
        .map(|(id, deps)| json!({"id": id, "description": format!("do {id}"), "kind": "tool_call", "target": "tool", "dependencies": deps}))
        .collect();
    json!({"type": "initialize", "input": "planned", "plan": {"tasks": tasks}})
}

fn completed(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::PlanCompleted { .. }))
}

/// Messages the dispatch stream ever stored.
async fn stored_dispatches(client: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("PLANNER_TASKS").await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

/// A server, a daemon whose offers wait `offer_timeout_ms` for their answer, and a client.
async fn daemon_offering_for(offer_timeout_ms: u64) -> (NatsServer, Daemon, async_nats::Client) {
    let server = NatsServer::start().unwrap();
    let mut config = config(&server);
    config.dispatch.offer_timeout_ms = offer_timeout_ms;
    let daemon = Daemon::start(config).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    (server, daemon, client)
}

/// Runs a chain of `tasks` tasks in `session` on stream-only executors and asserts that it
/// completes well within a minute-long offer timeout, every dispatch stored in the stream and
/// none run twice.
async fn chain_reaches_the_stream_at_once(
    server: &NatsServer,
    client: &async_nats::Client,
    session: &str,
    tasks: usize,
) {
    let executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let ids: Vec<String> = (0..tasks).map(|i| format!("t{i}")).collect();
    let deps: Vec<Vec<&str>> = (0..tasks)
        .map(|i| {
            if i == 0 {
                vec![]
            } else {
                vec![ids[i - 1].as_str()]
            }
        })
        .collect();
    let chain: Vec<(&str, &[&str])> = ids
        .iter()
        .zip(&deps)
        .map(|(id, deps)| (id.as_str(), deps.as_slice()))
        .collect();
    let started = Instant::now();
    command(client, session, plan(&chain)).await;
    let events = wait_for_end(&store(&server.url()).await, session).await;
    assert!(completed(&events));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the dispatches waited for the offer timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(stored_dispatches(client).await, tasks as u64);
    assert_eq!(executors.max_runs_of_one_attempt(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatches_taken_by_offer_are_never_written_to_the_stream() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let (pool, stop) = start_pool(
        &client,
        "offer-pool",
        Duration::from_millis(1),
        Arc::new(planner_svc::executor::NoObserver),
    );
    // One session at a time: the pool (4 slots) always has one free for an offer; a pool
    // without one declines, and the dispatch goes to the stream (the next test).
    let chain = plan(&[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])]);
    let store = store(&server.url()).await;
    for s in 0..3 {
        command(&client, &format!("s-offer-{s}"), chain.clone()).await;
        let events = wait_for_end(&store, &format!("s-offer-{s}")).await;
        assert!(completed(&events), "s-offer-{s} did not complete");
    }
    assert_eq!(
        stored_dispatches(&client).await,
        0,
        "every dispatch was taken by offer: none should have been written to PLANNER_TASKS"
    );
    stop.cancel();
    pool.await.unwrap().unwrap();
    daemon.stop().await;
}

/// An executor that takes offers and never answers them (it died before its claim): each
/// dispatch reaches the stream after `dispatch.offer_timeout_ms`, and runs once there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_nobody_answers_goes_to_the_stream_after_the_timeout() {
    let (server, daemon, client) = daemon_offering_for(300).await;
    let mut swallowed = client.subscribe("planner.offer.>").await.unwrap();
    let offers = Arc::new(Mutex::new(0u32));
    let counted = Arc::clone(&offers);
    let sink = tokio::spawn(async move {
        while swallowed.next().await.is_some() {
            *counted.lock().unwrap() += 1;
        }
    });
    let executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    command(&client, "s-silent", plan(&[("a", &[]), ("b", &["a"])])).await;
    let events = wait_for_end(&store(&server.url()).await, "s-silent").await;
    assert!(completed(&events));
    assert_eq!(
        *offers.lock().unwrap(),
        2,
        "both dispatches were offered first"
    );
    assert_eq!(stored_dispatches(&client).await, 2);
    assert_eq!(executors.max_runs_of_one_attempt(), 1);
    sink.abort();
    daemon.stop().await;
}

/// An offer nobody subscribes to is answered by the server's no-responders status: the
/// dispatch reaches the stream at once, not after the offer timeout (a minute here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_nobody_listens_to_goes_to_the_stream_at_once() {
    let (server, daemon, client) = daemon_offering_for(60_000).await;
    // Stream-only executors: nothing listens on the offer subjects.
    chain_reaches_the_stream_at_once(&server, &client, "s-unheard", 2).await;
    daemon.stop().await;
}

/// A daemon that stops while an offer waits for its answer sends the dispatch to the stream
/// before it exits, instead of leaving it to the next owner's recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_sends_offers_still_waiting_to_the_stream() {
    let (_server, daemon, client) = daemon_offering_for(60_000).await;
    // Takes offers and never answers them.
    let mut swallowed = client.subscribe("planner.offer.>").await.unwrap();
    command(&client, "s-stopping", plan(&[("a", &[])])).await;
    let offer = tokio::time::timeout(Duration::from_secs(10), swallowed.next())
        .await
        .expect("the dispatch was offered");
    assert!(offer.is_some());
    assert_eq!(stored_dispatches(&client).await, 0, "still only offered");
    let stopping = Instant::now();
    daemon.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "the stop waited for the offer timeout: {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        stored_dispatches(&client).await,
        1,
        "the offer still waiting at the stop went to the stream"
    );
}

/// Declined offers, and answers that are not offer replies, send the dispatch to the stream
/// at once: the plan does not wait out the offer timeout (a minute here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_or_garbled_answer_sends_the_dispatch_to_the_stream_at_once() {
    let (server, daemon, client) = daemon_offering_for(60_000).await;
    let mut offered = client.subscribe("planner.offer.>").await.unwrap();
    let answerer = client.clone();
    let responder = tokio::spawn(async move {
        let mut n = 0u32;
        while let Some(offer) = offered.next().await {
            n += 1;
            let body: &'static [u8] = if n % 2 == 1 {
                br#"{"offer": "declined"}"#
            } else {
                b"\xff not json"
            };
            if let Some(reply) = offer.reply {
                answerer.publish(reply, body.into()).await.unwrap();
            }
        }
    });
    chain_reaches_the_stream_at_once(&server, &client, "s-declined", 3).await;
    responder.abort();
    daemon.stop().await;
}

/// With offers off, dispatches go to the stream only, and the shipped pool still runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_offers_off_every_dispatch_goes_through_the_stream() {
    let server = NatsServer::start().unwrap();
    let mut config = config(&server);
    config.dispatch.offers = false;
    let daemon = Daemon::start(config).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let (pool, stop) = start_pool(
        &client,
        "stream-pool",
        Duration::from_millis(1),
        Arc::new(planner_svc::executor::NoObserver),
    );
    // Two tasks ready at once: neither waits for a report that could hand it over.
    command(&client, "s-stream", plan(&[("a", &[]), ("b", &[])])).await;
    let events = wait_for_end(&store(&server.url()).await, "s-stream").await;
    assert!(completed(&events));
    assert_eq!(stored_dispatches(&client).await, 2);
    stop.cancel();
    pool.await.unwrap().unwrap();
    daemon.stop().await;
}

/// A batch's offers go out together: with one slot (and so one offer waiting for it), of
/// three tasks ready at once one at least is declined and runs from the stream. (Offered one
/// after another, each waited for the claim of the one before, and none was declined.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_offers_go_out_together_and_those_past_the_pools_room_reach_the_stream() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let (pool, stop) = start_pool_with(
        &client,
        "one-slot",
        1,
        Duration::from_millis(300),
        Arc::new(planner_svc::executor::NoObserver),
    );
    command(
        &client,
        "s-together",
        plan(&[("x", &[]), ("y", &[]), ("z", &[])]),
    )
    .await;
    let events = wait_for_end(&store(&server.url()).await, "s-together").await;
    assert!(completed(&events));
    assert!(
        stored_dispatches(&client).await >= 1,
        "no offer was declined: were they sent one after another?"
    );
    stop.cancel();
    pool.await.unwrap().unwrap();
    daemon.stop().await;
}

/// While a stream message waits for a slot, the pool still reads offers: one it has no room
/// for is declined at once (and reaches the stream), not left unread until the offer timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_waiting_for_a_slot_still_answers_offers() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let (pool, stop) = start_pool_with(
        &client,
        "one-slot",
        1,
        Duration::from_secs(2),
        Arc::new(planner_svc::executor::NoObserver),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // x takes the slot, y waits among the offers, z is declined: the stream's copy of z is
    // then what the pool's loop waits for a slot for.
    command(
        &client,
        "s-busy",
        plan(&[("x", &[]), ("y", &[]), ("z", &[])]),
    )
    .await;
    let until = Instant::now() + Duration::from_secs(5);
    while stored_dispatches(&client).await < 1 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored_dispatches(&client).await, 1, "z was declined");
    let sent = Instant::now();
    command(&client, "s-later", plan(&[("a", &[])])).await;
    let until = Instant::now() + Duration::from_secs(10);
    while stored_dispatches(&client).await < 2 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored_dispatches(&client).await, 2, "a reached the stream");
    assert!(
        sent.elapsed() < Duration::from_millis(1500),
        "the offer of a was answered only after {:?}: unread while the pool waited for a slot",
        sent.elapsed()
    );
    stop.cancel();
    pool.await.unwrap().unwrap();
    daemon.stop().await;
}

/// A planner that granted an offer's claim but whose reply was lost has settled the offer
/// with that claim: the pool asks again with the same claim id (granted again) instead of
/// declining to nobody and leaving the attempt to its heartbeat timeout. The planner here is
/// the test, on a real server: it loses the first claim's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offers_claim_not_answered_is_asked_again_not_declined() {
    let server = NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: "PLANNER_TASKS".into(),
            subjects: vec!["planner.task.>".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut claims = client.subscribe("planner.claim.s-lost").await.unwrap();
    let mut results = client.subscribe("planner.result.s-lost").await.unwrap();
    let mut answers = client.subscribe("offer-answers").await.unwrap();
    let (pool, stop) = start_pool_with(
        &client,
        "lost-grant",
        1,
        Duration::from_millis(1),
        Arc::new(planner_svc::executor::NoObserver),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let task = json!({"session": "s-lost", "task_id": "t1", "attempt": 1, "kind": "tool_call",
        "target": "tool", "description": "do it", "attachments": [], "inputs": [],
        "context": {"profile": "general", "request": "do it"}});
    client
        .publish_with_reply(
            "planner.offer.tool_call.tool",
            "offer-answers",
            serde_json::to_vec(&task).unwrap().into(),
        )
        .await
        .unwrap();
    let wait = Duration::from_secs(15);
    let first = tokio::time::timeout(wait, claims.next())
        .await
        .unwrap()
        .unwrap();
    // Its reply lost.
    let second = tokio::time::timeout(wait, claims.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.payload, second.payload, "the retry is the same claim");
    let claim: serde_json::Value = serde_json::from_slice(&second.payload).unwrap();
    let granted = json!({"status": "granted", "lease": claim["claim_id"]});
    client
        .publish(
            second.reply.unwrap(),
            serde_json::to_vec(&granted).unwrap().into(),
        )
        .await
        .unwrap();
    let report = tokio::time::timeout(wait, results.next()).await;
    assert!(
        matches!(report, Ok(Some(_))),
        "the attempt ran and reported"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), answers.next())
            .await
            .is_err(),
        "the offer was answered (declined?) instead of claimed again"
    );
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), pool).await;
}

/// A claim the planner answers `busy` (at its request limit) is asked again, not declined:
/// after a grant whose reply was lost, a decline reaches nobody (the grant settled the offer)
/// and the attempt would wait out its heartbeat timeout. The planner here is scripted on a
/// real server: busy twice, then granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_asks_a_claim_answered_busy_again_and_takes_the_offer() {
    use async_nats::jetstream::stream;
    use planner_svc::protocol::{
        ClaimRequest, ErrorBody, ErrorKind, LeaseReply, OfferReply, ReportReply,
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let server = NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client.clone())
        .create_stream(stream::Config {
            name: "PLANNER_TASKS".into(),
            subjects: vec!["planner.task.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut claims = client.subscribe("planner.claim.>").await.unwrap();
    let mut results = client.subscribe("planner.result.>").await.unwrap();
    let planner = client.clone();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&asked);
    tokio::spawn(async move {
        while let Some(request) = claims.next().await {
            let claim: ClaimRequest = serde_json::from_slice(&request.payload).unwrap();
            let reply = {
                let mut seen = seen.lock().unwrap();
                seen.push(claim.claim_id.clone());
                if seen.len() <= 2 {
                    LeaseReply::Error(ErrorBody::new(ErrorKind::Busy, "at the request limit"))
                } else {
                    LeaseReply::Granted {
                        lease: claim.claim_id.unwrap(),
                        heartbeat_interval_ms: None,
                        context: None,
                    }
                }
            };
            let body = serde_json::to_vec(&reply).unwrap();
            planner
                .publish(request.reply.unwrap(), body.into())
                .await
                .unwrap();
        }
    });
    let (pool, stop) = start_pool(
        &client,
        "busy-pool",
        Duration::ZERO,
        Arc::new(planner_svc::executor::NoObserver),
    );
    // The planner answers the report (its hand-over asks for nothing here).
    let (reported_tx, mut reported) = tokio::sync::mpsc::unbounded_channel();
    let answerer = client.clone();
    tokio::spawn(async move {
        while let Some(report) = results.next().await {
            let ok = serde_json::to_vec(&ReportReply::Ok { next: None }).unwrap();
            if let Some(reply) = report.reply {
                answerer.publish(reply, ok.into()).await.unwrap();
            }
            let _ = reported_tx.send(report.subject.to_string());
        }
    });
    let offer = json!({"session": "s-busy", "task_id": "t1", "attempt": 1, "kind": "tool_call",
        "target": "tool", "description": "do t1", "attachments": [], "inputs": []});
    let offer = serde_json::to_vec(&offer).unwrap();
    // The grant settles the offer on the planner's side: the pool answers an offer only to
    // decline it, which it must not do here.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let request = async_nats::Request::new()
            .payload(offer.clone().into())
            .timeout(Some(Duration::from_secs(2)));
        match client
            .send_request("planner.offer.tool_call.tool", request)
            .await
        {
            Ok(answer) => panic!(
                "the pool answered the offer: {:?}",
                serde_json::from_slice::<OfferReply>(&answer.payload)
            ),
            Err(error) if error.kind() == async_nats::RequestErrorKind::TimedOut => break,
            // The pool is not subscribed yet.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(error) => panic!("no pool took offers: {error}"),
        }
    }
    let claim_ids = asked.lock().unwrap().clone();
    assert_eq!(claim_ids.len(), 3, "{claim_ids:?}");
    assert!(
        claim_ids.windows(2).all(|w| w[0] == w[1]),
        "asked again with the same claim id: {claim_ids:?}"
    );
    // The attempt ran: its report arrives.
    let subject = tokio::time::timeout(Duration::from_secs(10), reported.recv())
        .await
        .expect("the attempt was reported")
        .unwrap();
    assert_eq!(subject, "planner.result.s-busy");
    stop.cancel();
    let _ = pool.await;
}
