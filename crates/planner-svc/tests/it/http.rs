//! The HTTP API (#13) over HTTP against a daemon on a real nats-server: every endpoint, the
//! error kinds, auth per role, time travel against `Planner::fold`, and live streams resumed
//! with `Last-Event-ID` after a dropped connection.

use std::time::{Duration, Instant};

use futures::StreamExt;
use planner_core::{Event, Planner};
use planner_store::EventStore;
use planner_svc::config::{Config, Secret};
use planner_testkit::NatsServer;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{config, store, Daemon, ExecutorBehaviour, Executors};

const VIEWER: &str = "viewer-token-1";
const UI: &str = "ui-token-1";
const OPERATOR: &str = "operator-token-1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn http_config(server: &NatsServer) -> (Config, String) {
    let mut config = config(server);
    let port = free_port();
    config.http.enabled = true;
    config.http.listen = format!("127.0.0.1:{port}");
    config.http.viewer_tokens = Secret::from(VIEWER);
    config.http.ui_tokens = Secret::from(UI);
    config.http.operator_tokens = Secret::from(OPERATOR);
    config.http.max_body_bytes = 4096;
    (config, format!("http://127.0.0.1:{port}"))
}

pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
}

impl Http {
    pub async fn wait_ready(base: &str) -> Http {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if client
                .get(format!("{base}/api/openapi.json"))
                .send()
                .await
                .is_ok()
            {
                return Http {
                    base: base.to_owned(),
                    client,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the HTTP API did not come up at {base}");
    }

    pub async fn get(&self, token: Option<&str>, path: &str) -> (StatusCode, Value) {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(
        &self,
        token: &str,
        path: &str,
        body: &str,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Polls the session's state until `done` holds (20 s at most).
    pub async fn wait_state(&self, session: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, view) = self
                .get(Some(VIEWER), &format!("/api/sessions/{session}"))
                .await;
            if status == StatusCode::OK && done(&view) {
                return view;
            }
            assert!(Instant::now() < deadline, "state never got there: {view}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn kind(body: &Value) -> &str {
    body["kind"].as_str().unwrap_or("")
}

const REQUEST: &str =
    "1. Search flights to Oslo\n2. Which dates suit you?\n3. Summarize the best flights";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_serves_every_endpoint_with_typed_errors_and_roles() {
    let server = NatsServer::start().unwrap();
    let (config, base) = http_config(&server);
    let daemon = Daemon::start(config).await;
    let _executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let http = Http::wait_ready(&base).await;
    let body = json!({"type": "initialize", "input": REQUEST}).to_string();

    // Auth: no token, a wrong token, a role too small.
    let (status, error) = http.get(None, "/api/sessions").await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::UNAUTHORIZED, "forbidden")
    );
    let (status, error) = http.get(Some("nope"), "/api/sessions").await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::UNAUTHORIZED, "forbidden")
    );
    let (status, error) = http.post(VIEWER, "/api/sessions", &body, None).await;
    assert_eq!((status, kind(&error)), (StatusCode::FORBIDDEN, "forbidden"));
    let (status, who) = http.get(None, "/api/whoami").await;
    assert_eq!(
        (status, who["role"].as_str()),
        (StatusCode::OK, Some("none"))
    );
    let (status, error) = http.get(Some("nope"), "/api/whoami").await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::UNAUTHORIZED, "forbidden")
    );
    for (token, role) in [(VIEWER, "viewer"), (UI, "ui"), (OPERATOR, "operator")] {
        let (status, who) = http.get(Some(token), "/api/whoami").await;
        assert_eq!((status, who["role"].as_str()), (StatusCode::OK, Some(role)));
    }

    // Start, with an idempotency key: the retry reaches the same session and changes nothing.
    let (status, started) = http.post(UI, "/api/sessions", &body, Some("req-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let session = started["session"].as_str().unwrap().to_owned();
    assert!(!started["events"].as_array().unwrap().is_empty());
    let (status, again) = http.post(UI, "/api/sessions", &body, Some("req-1")).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["session"], started["session"]);
    assert_eq!(again["events"], json!([]));
    let (status, error) = http
        .post(
            UI,
            "/api/sessions",
            &json!({"type": "initialize", "input": "x", "request_id": "other"}).to_string(),
            Some("req-1"),
        )
        .await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::BAD_REQUEST, "malformed")
    );

    // The question: answered over HTTP, then the plan completes.
    let view = http
        .wait_state(&session, |v| {
            v["state"]["awaiting_answer"]
                .as_object()
                .is_some_and(|q| !q.is_empty())
        })
        .await;
    assert_eq!(view["summary"]["status"], "asking");
    let task = view["state"]["awaiting_answer"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    // A viewer may not answer; an unknown task is refused by the planner.
    let answer =
        json!({"type": "answer_clarification", "task_id": task, "answer": "in May"}).to_string();
    let path = format!("/api/sessions/{session}/commands");
    let (status, error) = http.post(VIEWER, &path, &answer, None).await;
    assert_eq!((status, kind(&error)), (StatusCode::FORBIDDEN, "forbidden"));
    let unknown =
        json!({"type": "answer_clarification", "task_id": "t999", "answer": "?"}).to_string();
    let (status, error) = http.post(UI, &path, &unknown, None).await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
        "{error}"
    );
    let (status, answered) = http.post(UI, &path, &answer, None).await;
    assert_eq!(status, StatusCode::CREATED, "{answered}");
    let done = http
        .wait_state(&session, |v| v["summary"]["status"] == "completed")
        .await;
    assert_eq!(done["summary"]["tasks"]["completed"], 3);

    // The list agrees with the detail view; filters and search.
    let (status, page) = http
        .get(Some(VIEWER), "/api/sessions?status=completed&q=OSLO")
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["sessions"][0], done["summary"], "{page}");
    let (_, none) = http.get(Some(VIEWER), "/api/sessions?status=failed").await;
    assert_eq!(none["total"], 0);
    let (_, none) = http.get(Some(VIEWER), "/api/sessions?q=zanzibar").await;
    assert_eq!(none["total"], 0);
    let (status, error) = http
        .get(Some(VIEWER), "/api/sessions?status=sleeping")
        .await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::BAD_REQUEST, "malformed")
    );

    // Events, paged, are the store's events.
    let stored = store(&server.url()).await.load_all(&session).await.unwrap();
    let mut paged: Vec<Event> = Vec::new();
    let mut from = 0;
    loop {
        let (status, page) = http
            .get(
                Some(VIEWER),
                &format!("/api/sessions/{session}/events?from={from}&limit=3"),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        for item in page["events"].as_array().unwrap() {
            assert_eq!(item["version"], paged.len() as u64 + 1);
            paged.push(serde_json::from_value(item["event"].clone()).unwrap());
        }
        match page["next"].as_u64() {
            Some(next) => from = next,
            None => break,
        }
    }
    assert_eq!(paged, stored);

    // Time travel: the state at each version is the fold of that prefix.
    for at in [1, stored.len() / 2, stored.len() - 1, stored.len()] {
        let (status, view) = http
            .get(Some(VIEWER), &format!("/api/sessions/{session}?at={at}"))
            .await;
        assert_eq!(status, StatusCode::OK);
        let folded = Planner::fold(&stored[..at]);
        assert_eq!(
            view["state"],
            serde_json::to_value(folded.state()).unwrap(),
            "at {at}"
        );
        assert_eq!(view["latest_version"], stored.len() as u64);
        assert_eq!(view["summary"]["version"], at as u64);
    }
    let (status, error) = http
        .get(
            Some(VIEWER),
            &format!("/api/sessions/{session}?at={}", stored.len() + 1),
        )
        .await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::BAD_REQUEST, "malformed")
    );

    // Cancelling: a follow-up's task, then the plan.
    let follow_up =
        json!({"type": "initialize", "input": "1. Which seat do you want?\n2. Book it"})
            .to_string();
    let (status, _) = http.post(UI, &path, &follow_up, Some("req-2")).await;
    assert_eq!(status, StatusCode::CREATED);
    let view = http
        .wait_state(&session, |v| v["summary"]["status"] == "asking")
        .await;
    let asking = view["state"]["awaiting_answer"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let cancel =
        json!({"type": "cancel", "target": {"scope": "task", "task_id": asking}}).to_string();
    let (status, cancelled) = http.post(UI, &path, &cancel, None).await;
    assert_eq!(status, StatusCode::CREATED, "{cancelled}");
    let view = http
        .wait_state(&session, |v| v["summary"]["status"] != "asking")
        .await;
    assert!(
        view["summary"]["tasks"]["cancelled"].as_u64().unwrap() >= 1,
        "{view}"
    );
    let (status, _) = http
        .post(UI, &path, &json!({"type": "continue"}).to_string(), None)
        .await;
    assert!(status.is_success());

    // The error kinds.
    let (status, error) = http.post(UI, &path, "{not json", None).await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::BAD_REQUEST, "malformed")
    );
    let (status, error) = http
        .post(
            UI,
            &path,
            &json!({"type": "tick", "now": 1}).to_string(),
            None,
        )
        .await;
    assert_eq!((status, kind(&error)), (StatusCode::FORBIDDEN, "forbidden"));
    let big = json!({"type": "initialize", "input": "x".repeat(10_000)}).to_string();
    let (status, error) = http.post(UI, &path, &big, None).await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
    );
    let (status, error) = http.get(Some(VIEWER), "/api/sessions/not.a.session").await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::BAD_REQUEST, "bad_session")
    );
    let (status, error) = http.get(Some(VIEWER), "/api/sessions/nosuchsession").await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::NOT_FOUND, "bad_session")
    );
    let (status, error) = http
        .post(UI, "/api/sessions/nosuchsession/commands", &cancel, None)
        .await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::NOT_FOUND, "bad_session")
    );
    let (status, error) = http.post(UI, "/api/sessions", &cancel, None).await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::BAD_REQUEST, "malformed")
    );
    let (status, error) = http.get(Some(VIEWER), "/api/nothing-here").await;
    assert_eq!((status, kind(&error)), (StatusCode::NOT_FOUND, "malformed"));

    // The OpenAPI document names every path.
    let (status, doc) = http.get(None, "/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.1")),
        Some(true)
    );
    for path in [
        "/api/sessions",
        "/api/sessions/{id}",
        "/api/sessions/{id}/events",
        "/api/sessions/{id}/commands",
        "/api/sessions/{id}/live",
        "/api/live",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    daemon.stop().await;
}

/// Reads SSE messages (id, data) from `response` until `count` arrived or `deadline` passed.
async fn read_sse(response: reqwest::Response, count: usize) -> Vec<(u64, Value)> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while messages.len() < count {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("SSE messages in time")
            .expect("the stream stays open")
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut id = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse::<u64>().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if let Some(id) = id {
                messages.push((id, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    messages.truncate(count);
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_resume_after_a_dropped_connection_without_loss_or_repeats() {
    let server = NatsServer::start().unwrap();
    let (config, base) = http_config(&server);
    let daemon = Daemon::start(config).await;
    let http = Http::wait_ready(&base).await;

    // The list view's stream sees the session start.
    let list_stream = http
        .client
        .get(format!("{base}/api/live"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(list_stream.status(), StatusCode::OK);

    // No executors yet: the session waits with its first dispatches.
    let body = json!({"type": "initialize", "input": "1. Search flights\n2. Compare prices\n3. Summarize them"}).to_string();
    let (status, started) = http.post(UI, "/api/sessions", &body, None).await;
    assert_eq!(status, StatusCode::CREATED);
    let session = started["session"].as_str().unwrap().to_owned();
    let first = started["version"].as_u64().unwrap();

    let mut list = list_stream.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while !seen.contains(&session) {
        let chunk = tokio::time::timeout_at(deadline, list.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: summary"), "{seen}");

    // Read the first two events, then drop the connection.
    let live = format!("{base}/api/sessions/{session}/live");
    let response = http
        .client
        .get(&live)
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let head = read_sse(response, 2).await;
    assert_eq!(
        head.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let last = head[1].0;

    // The plan moves on while no one listens.
    let _executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let store = store(&server.url()).await;
    let all = crate::harness::wait_for_end(&store, &session).await;
    assert!(all.len() as u64 > first);

    // Resume: exactly the events after `last`, in order, each with its version as id.
    let response = http
        .client
        .get(&live)
        .bearer_auth(VIEWER)
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    let rest = read_sse(response, all.len() - last as usize).await;
    let mut got: Vec<Event> = head
        .iter()
        .map(|(_, m)| serde_json::from_value(m["event"].clone()).unwrap())
        .collect();
    for (i, (id, message)) in rest.iter().enumerate() {
        assert_eq!(*id, last + 1 + i as u64);
        assert_eq!(message["version"], *id);
        got.push(serde_json::from_value(message["event"].clone()).unwrap());
    }
    assert_eq!(got, all);

    // A live follower sees a new append as it happens.
    let response = http
        .client
        .get(format!("{live}?from={}", all.len()))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    let follow_up = json!({"type": "initialize", "input": "Summarize again"}).to_string();
    let (status, _) = http
        .post(
            UI,
            &format!("/api/sessions/{session}/commands"),
            &follow_up,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let next = read_sse(response, 1).await;
    assert_eq!(next[0].0, all.len() as u64 + 1);

    let (status, error) = http.get(Some(VIEWER), "/api/sessions/nosuch/live").await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::NOT_FOUND, "bad_session")
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_at_a_version_runs_to_completion_as_a_session_of_its_own() {
    let server = NatsServer::start().unwrap();
    let (config, base) = http_config(&server);
    let daemon = Daemon::start(config).await;
    let _executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let http = Http::wait_ready(&base).await;
    let body = json!({"type": "initialize", "input": REQUEST}).to_string();
    let (status, started) = http.post(UI, "/api/sessions", &body, None).await;
    assert_eq!(status, StatusCode::CREATED);
    let source = started["session"].as_str().unwrap().to_owned();
    // Run the source to its end, remembering the version at which it asked its question.
    let asking = http
        .wait_state(&source, |v| v["summary"]["status"] == "asking")
        .await;
    let at = asking["summary"]["version"].as_u64().unwrap();
    let answer =
        json!({"type": "answer_clarification", "task_id": "t2", "answer": "May"}).to_string();
    let (status, _) = http
        .post(
            UI,
            &format!("/api/sessions/{source}/commands"),
            &answer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    http.wait_state(&source, |v| v["summary"]["status"] == "completed")
        .await;

    // Only an operator forks; the version must be inside the source.
    let path = format!("/api/sessions/{source}/fork");
    let (status, error) = http
        .post(UI, &path, &json!({"at": at}).to_string(), None)
        .await;
    assert_eq!((status, kind(&error)), (StatusCode::FORBIDDEN, "forbidden"));
    let (status, error) = http
        .post(OPERATOR, &path, &json!({"at": 0}).to_string(), None)
        .await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
        "{error}"
    );
    let (status, error) = http
        .post(OPERATOR, "/api/sessions/nosuch/fork", "{}", None)
        .await;
    assert_eq!(
        (status, kind(&error)),
        (StatusCode::NOT_FOUND, "bad_session")
    );

    // The fork at the question: its log is the source's prefix and a record of where it came
    // from; it asks the question again and, answered differently, runs to its own end.
    let (status, forked) = http
        .post(
            OPERATOR,
            &path,
            &json!({"at": at}).to_string(),
            Some("fork-1"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forked}");
    let fork = forked["session"].as_str().unwrap().to_owned();
    assert_ne!(fork, source);
    let (status, again) = http
        .post(
            OPERATOR,
            &path,
            &json!({"at": at}).to_string(),
            Some("fork-1"),
        )
        .await;
    assert_eq!(
        (status, again["session"].as_str()),
        (StatusCode::OK, Some(fork.as_str()))
    );
    let store = store(&server.url()).await;
    let source_log = store.load_all(&source).await.unwrap();
    let fork_log = store.load_all(&fork).await.unwrap();
    assert_eq!(&fork_log[..at as usize], &source_log[..at as usize]);
    assert!(
        matches!(&fork_log[at as usize], Event::SessionForked { source: s, version, .. } if *s == source && *version == at)
    );
    let view = http
        .wait_state(&fork, |v| v["summary"]["status"] == "asking")
        .await;
    assert_eq!(
        view["state"]["forked_from"],
        json!({"session": source, "version": at})
    );
    let answer =
        json!({"type": "answer_clarification", "task_id": "t2", "answer": "June"}).to_string();
    let (status, _) = http
        .post(UI, &format!("/api/sessions/{fork}/commands"), &answer, None)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let done = http
        .wait_state(&fork, |v| v["summary"]["status"] == "completed")
        .await;
    assert_eq!(done["summary"]["tasks"]["completed"], 3);
    // Replay is exact: the fork's log folds to the state the API shows.
    let fork_log = store.load_all(&fork).await.unwrap();
    assert_eq!(
        done["state"],
        serde_json::to_value(Planner::fold(&fork_log).state()).unwrap()
    );
    // The source did not move.
    assert_eq!(store.load_all(&source).await.unwrap(), source_log);
    daemon.stop().await;
}
