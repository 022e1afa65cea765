//! The LLM planner and summarizer, scripted case by case.

use std::time::{Duration, Instant};

use planner_core::*;
use planner_llm::*;
use serde_json::json;

use planner_testkit::llm_server::{Reply, ScriptedServer};

fn client(server: &ScriptedServer, tweak: impl FnOnce(&mut LlmConfig)) -> LlmClient {
    let mut config = LlmConfig {
        enabled: true,
        base_url: server.url.clone(),
        model: "scripted".into(),
        timeout_ms: 2_000,
        initial_backoff_ms: 10,
        ..LlmConfig::default()
    };
    tweak(&mut config);
    LlmClient::new(config, Some("sk-test".into())).unwrap()
}

fn context() -> PlanContext {
    PlanContext {
        request: "Compare the Q3 price lists and email the result".into(),
        attachments: vec![Attachment {
            name: "q3.csv".into(),
            uri: "s3://b/q3.csv".into(),
            media_type: None,
        }],
        max_tasks: 100,
        ..PlanContext::default()
    }
}

fn good_plan() -> String {
    json!({"tasks": [
        {"id": "load", "description": "load the price lists", "kind": "tool_call", "target": "filesystem", "dependencies": [], "attachments": ["q3.csv"]},
        {"id": "compare", "description": "compare prices", "kind": "processing", "target": "analyze", "dependencies": ["load"]},
        {"id": "who", "description": "Who gets the email?", "kind": "clarification", "target": "user", "dependencies": []},
        {"id": "send", "description": "email the comparison", "kind": "tool_call", "target": "email", "dependencies": ["compare", "who"]}
    ]})
    .to_string()
}

#[tokio::test]
async fn a_good_plan_with_dependencies_is_used_as_is() {
    let server = ScriptedServer::start(vec![Reply::completion(&good_plan())]).await;
    let planned = LlmPlanner::new(client(&server, |_| {}))
        .plan(&context())
        .await;
    let plan = planned.plan.expect("a plan");
    assert_eq!(plan.tasks.len(), 4);
    assert_eq!(plan.tasks[0].attachments[0].uri, "s3://b/q3.csv");
    assert_eq!(
        plan.tasks[2].question.as_deref(),
        Some("Who gets the email?")
    );
    assert_eq!(planned.planning.map(|p| p.source), Some(PlanSource::Llm));
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests[0].authorization.as_deref(), Some("Bearer sk-test"));
    assert_eq!(requests[0].body["response_format"]["type"], "json_schema");
    assert_eq!(requests[0].body["model"], "scripted");
}

#[tokio::test]
async fn a_plan_with_a_cycle_is_sent_back_once_and_the_repair_is_used() {
    let cyclic = json!({"tasks": [
        {"id": "a", "description": "a", "kind": "processing", "target": "llm", "dependencies": ["b"]},
        {"id": "b", "description": "b", "kind": "processing", "target": "llm", "dependencies": ["a"]}
    ]})
    .to_string();
    let server = ScriptedServer::start(vec![
        Reply::completion(&cyclic),
        Reply::completion(&good_plan()),
    ])
    .await;
    let planned = LlmPlanner::new(client(&server, |_| {}))
        .plan(&context())
        .await;
    assert_eq!(planned.plan.map(|p| p.tasks.len()), Some(4));
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 2);
    let last = requests[1].body["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(last.contains("invalid") && last.contains("cycle"), "{last}");
}

#[tokio::test]
async fn malformed_answers_fall_back_to_the_rule_parser_and_say_why() {
    let server = ScriptedServer::start(vec![
        Reply::completion("Sure! Here is a plan: step one..."),
        Reply::completion("{\"tasks\": 3}"),
    ])
    .await;
    let planned = LlmPlanner::new(client(&server, |_| {}))
        .plan(&context())
        .await;
    assert_eq!(planned.plan, None);
    let planning = planned.planning.expect("a note");
    assert_eq!(planning.source, PlanSource::RulesFallback);
    assert!(
        planning
            .note
            .as_deref()
            .unwrap_or("")
            .contains("not a plan"),
        "{planning:?}"
    );
    // The core records the fallback with the tasks, for a UI to show.
    let mut planner = Planner::new();
    let events = planner
        .process(Command::Initialize {
            request_id: None,
            input: context().request,
            attachments: vec![],
            plan: None,
            planning: Some(planning),
            now: Timestamp(0),
        })
        .unwrap();
    assert!(events.iter().any(|e| matches!(
        e,
        Event::TasksPlanned {
            source: PlanSource::RulesFallback,
            note: Some(_),
            ..
        }
    )));
}

#[tokio::test]
async fn a_rate_limit_is_waited_out_as_the_server_asks() {
    let mut limited = Reply::status(429, "{\"error\": \"slow down\"}");
    limited.headers.push(("Retry-After", "1".into()));
    let server = ScriptedServer::start(vec![limited, Reply::completion(&good_plan())]).await;
    let started = Instant::now();
    let planned = LlmPlanner::new(client(&server, |_| {}))
        .plan(&context())
        .await;
    assert!(planned.plan.is_some());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(server.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_timeout_ends_in_the_fallback_after_the_retries() {
    let slow = |_| Reply {
        delay: Duration::from_millis(800),
        ..Reply::completion(&good_plan())
    };
    let server = ScriptedServer::start((0..3).map(slow).collect()).await;
    let planned = LlmPlanner::new(client(&server, |c| {
        c.timeout_ms = 200;
        c.max_retries = 1;
    }))
    .plan(&context())
    .await;
    assert_eq!(planned.plan, None);
    let note = planned.planning.and_then(|p| p.note).unwrap_or_default();
    assert!(note.contains("did not answer"), "{note}");
}

#[tokio::test]
async fn a_server_without_json_schema_support_is_asked_for_text() {
    let fenced = format!("Here you go:\n```json\n{}\n```", good_plan());
    let server = ScriptedServer::start(vec![
        Reply::status(
            400,
            "{\"error\": {\"message\": \"response_format json_schema is not supported\"}}",
        ),
        Reply::completion(&fenced),
        Reply::completion(&good_plan()),
    ])
    .await;
    let planner = LlmPlanner::new(client(&server, |_| {}));
    assert!(planner.plan(&context()).await.plan.is_some());
    assert!(planner.plan(&context()).await.plan.is_some());
    let requests = server.requests.lock().unwrap();
    assert!(requests[0].body.get("response_format").is_some());
    assert!(
        requests[1].body.get("response_format").is_none(),
        "asked again without the format"
    );
    assert!(
        requests[2].body.get("response_format").is_none(),
        "and not with it again"
    );
}

#[tokio::test]
async fn summaries_come_from_the_llm_or_the_deterministic_fallback() {
    let server = ScriptedServer::start(vec![Reply::completion(
        "The user wants the cheapest vendor; Q3 prices loaded.",
    )])
    .await;
    let messages: Vec<Message> = (0..30)
        .map(|i| Message::new(Role::Task, format!("result {i}: 12 rows")))
        .collect();
    let summary = summarize(&client(&server, |_| {}), &messages, 200, Profile::Analysis).await;
    assert_eq!(
        summary,
        "The user wants the cheapest vendor; Q3 prices loaded."
    );
    // Nothing listens on port 9 of loopback: the deterministic summary is used.
    let down = LlmClient::new(
        LlmConfig {
            base_url: "http://127.0.0.1:9/v1".into(),
            max_retries: 0,
            ..LlmConfig::default()
        },
        None,
    )
    .unwrap();
    let fallback = summarize(&down, &messages, 200, Profile::Analysis).await;
    assert!(
        fallback.starts_with("[summary of 30 earlier messages]"),
        "{fallback}"
    );
}

#[tokio::test]
async fn a_session_planned_by_the_llm_replays_while_the_endpoint_is_down() {
    let server = ScriptedServer::start(vec![Reply::completion(&good_plan())]).await;
    let planned = LlmPlanner::new(client(&server, |_| {}))
        .plan(&context())
        .await;
    drop(server);
    let mut planner = Planner::new();
    let events = planner
        .process(Command::Initialize {
            request_id: None,
            input: context().request,
            attachments: context().attachments,
            plan: planned.plan,
            planning: planned.planning,
            now: Timestamp(0),
        })
        .unwrap();
    // Replay uses only the events: no endpoint, no planner, same state.
    assert_eq!(Planner::fold(&events).state(), planner.state());
    assert!(events.iter().any(|e| matches!(
        e,
        Event::TasksPlanned {
            source: PlanSource::Llm,
            ..
        }
    )));
}
