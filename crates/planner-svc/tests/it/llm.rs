//! The engine with a scripted LLM behind its `Llm` seam, an in-memory store and a channel bus:
//! revisions after a failure and summary rewrites, without a network.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use planner_core::{
    Command, Event, ExecutorEvent, ExecutorOutcome, Message, NodeKind, PlanSpec, Planner, Profile,
    TaskId, TaskSpec, Timestamp,
};
use planner_llm::{PlanContext, Planned};
use planner_store::{EventStore, MemoryStore};
use planner_svc::bus::ChannelPublisher;
use planner_svc::engine::{Engine, EngineConfig, Llm};

/// Plans every revision with one task `r<n>`, and summarises with a fixed text, after
/// `summary_gate` lets it (when set).
#[derive(Debug, Default)]
struct ScriptedLlm {
    max_revisions: u32,
    prompts: Mutex<Vec<String>>,
    summary_gate: Option<Arc<tokio::sync::Semaphore>>,
    summarizing: tokio::sync::Notify,
}

impl Llm for ScriptedLlm {
    fn plan<'a>(&'a self, context: &'a PlanContext) -> BoxFuture<'a, Planned> {
        Box::pin(async move {
            let n = {
                let mut prompts = self.prompts.lock().unwrap();
                prompts.push(context.request.clone());
                prompts.len()
            };
            Planned {
                plan: Some(PlanSpec {
                    tasks: vec![task(&format!("r{n}"))],
                }),
                planning: None,
            }
        })
    }

    fn summarize<'a>(
        &'a self,
        _thread: &'a [Message],
        _token_budget: u64,
        _profile: Profile,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            self.summarizing.notify_one();
            if let Some(gate) = &self.summary_gate {
                gate.acquire().await.unwrap().forget();
            }
            Some("LLM SUMMARY".to_owned())
        })
    }

    fn max_revisions(&self) -> u32 {
        self.max_revisions
    }
}

fn task(id: &str) -> TaskSpec {
    TaskSpec {
        timeouts: None,
        id: id.into(),
        description: format!("do {id}"),
        kind: NodeKind::ToolCall,
        target: "tool".into(),
        dependencies: vec![],
        attachments: vec![],
        question: None,
    }
}

fn request(input: &str, tasks: &[&str]) -> Command {
    Command::Initialize {
        request_id: None,
        input: input.into(),
        attachments: vec![],
        plan: Some(PlanSpec {
            tasks: tasks.iter().map(|t| task(t)).collect(),
        }),
        planning: None,
        now: Timestamp(0),
    }
}

fn report(task_id: &str, outcome: ExecutorOutcome) -> Command {
    Command::HandleExecutorEvent {
        event: ExecutorEvent {
            task_id: TaskId::from(task_id),
            attempt: 1,
            outcome,
        },
        lease: None,
        now: Timestamp(0),
    }
}

type TestEngine = Arc<Engine<MemoryStore, ChannelPublisher>>;

fn engine(
    llm: Arc<ScriptedLlm>,
    planner: impl FnOnce(&mut planner_core::PlannerConfig),
) -> (TestEngine, Arc<MemoryStore>, impl Sized) {
    let store = Arc::new(MemoryStore::new());
    let (publisher, bus) = ChannelPublisher::new();
    let mut config = EngineConfig {
        llm: Some(llm as Arc<dyn Llm>),
        ..EngineConfig::default()
    };
    planner(&mut config.planner);
    let (engine, _timers) = Engine::new(Arc::clone(&store), Arc::new(publisher), config);
    (engine, store, bus)
}

/// Waits (up to 5 s) until the session's log holds an event `found` accepts.
async fn wait_for(
    store: &MemoryStore,
    session: &str,
    found: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    for _ in 0..500 {
        let events = store.load_all(session).await.unwrap();
        if events.iter().any(&found) {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "not found in {session}: {:#?}",
        store.load_all(session).await.unwrap()
    );
}

/// Revisions were counted by the text "[revision" at the start of a request: a user's request
/// starting with "[revision 1]" used up the only revision allowed, and a task that then failed
/// for good got none. Revisions are now `Command::Revise`s counted by the core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_typed_like_a_revision_does_not_use_up_the_revisions() {
    let llm = Arc::new(ScriptedLlm {
        max_revisions: 1,
        ..ScriptedLlm::default()
    });
    let (engine, store, _bus) = engine(Arc::clone(&llm), |p| p.retry.max_attempts = 1);
    let session = "s-typed-revision";
    engine
        .handle(session, request("[revision 1] fetch the report", &["a"]))
        .await
        .unwrap();
    let failed = ExecutorOutcome::Failed {
        error: "a broke".into(),
        retryable: false,
        tokens_used: None,
    };
    engine.handle(session, report("a", failed)).await.unwrap();
    let events = wait_for(&store, session, |e| {
        matches!(e, Event::TasksPlanned { turn: 1, .. })
    })
    .await;
    let prompts = llm.prompts.lock().unwrap().clone();
    assert_eq!(prompts.len(), 1, "{prompts:?}");
    assert!(
        prompts[0].contains("The request was: [revision 1] fetch the report"),
        "{prompts:?}"
    );
    let planner = Planner::fold(&events);
    assert_eq!(planner.state().revisions, 1);

    // The revision's task fails too: that was the one revision allowed.
    let failed = ExecutorOutcome::Failed {
        error: "r1 broke".into(),
        retryable: false,
        tokens_used: None,
    };
    engine.handle(session, report("r1", failed)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(llm.prompts.lock().unwrap().len(), 1, "no second revision");
}

/// The summary rewrite read the context, called the LLM without the session's lock, then sent
/// a `CompactContext` that folded everything but the newest message: messages that came in
/// during the call were dropped without ever being summarised. Now the command says what the
/// summary covers, and the core keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_arrive_during_a_summary_rewrite_are_kept() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let llm = Arc::new(ScriptedLlm {
        summary_gate: Some(Arc::clone(&gate)),
        ..ScriptedLlm::default()
    });
    let (engine, store, _bus) = engine(Arc::clone(&llm), |p| p.token_budget = 100);
    let session = "s-slow-summary";
    // A request over the budget: compacted at once, and the LLM asked for a better summary.
    let long = "fetch the quarterly report and the appendix ".repeat(25);
    engine
        .handle(session, request(&long, &["a", "b"]))
        .await
        .unwrap();
    llm.summarizing.notified().await;
    // While the LLM writes, the user asks for more and a task completes.
    engine
        .handle(session, request("REMEMBER-ME: also fetch c", &["c"]))
        .await
        .unwrap();
    let done = ExecutorOutcome::Completed {
        output: "the report".into(),
        tokens_used: None,
    };
    engine.handle(session, report("a", done)).await.unwrap();
    gate.add_permits(10);
    let events = wait_for(
        &store,
        session,
        |e| matches!(e, Event::ContextCompacted { summary, .. } if summary == "LLM SUMMARY"),
    )
    .await;
    let context = Planner::fold(&events).state().context.clone();
    assert_eq!(context.summary.as_deref(), Some("LLM SUMMARY"));
    let kept: Vec<&str> = context
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert!(
        kept.iter().any(|m| m.starts_with("REMEMBER-ME")),
        "the request made during the call was lost: {kept:?}"
    );
    assert!(kept.iter().any(|m| m.starts_with("a (tool)")), "{kept:?}");
}
