//! A minimal async web service that embeds the engine directly: no NATS, an in-memory store,
//! executors in the same process, and the HTTP API and console of `docs/http.md` on
//! 127.0.0.1:8080 (anonymous requests get the operator role: loopback only).
//!
//! ```sh
//! cargo run -p planner-svc --example web_service
//! curl -s -X POST 127.0.0.1:8080/api/sessions -H 'content-type: application/json' \
//!   -d '{"type":"initialize","input":"1. search flights\n2. Which date suits you?\n3. summarize"}'
//! ```
//!
//! Then open http://127.0.0.1:8080/ and answer the question in the inbox.

use std::sync::Arc;

use planner_core::{Command, PlannerConfig};
use planner_store::MemoryStore;
use planner_svc::bus::ChannelPublisher;
use planner_svc::config::{HttpConfig, HttpRole};
use planner_svc::engine::{Engine, EngineConfig, Outgoing};
use planner_svc::sim::{SimBehaviour, SimExecutor};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The engine: sessions, locks, persist-then-publish, timers. Its bus is a channel here.
    let (publisher, mut bus) = ChannelPublisher::new();
    let (engine, timers) = Engine::new(
        Arc::new(MemoryStore::new()),
        Arc::new(publisher),
        EngineConfig {
            planner: PlannerConfig::default(),
            ..EngineConfig::default()
        },
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(timers.run(Arc::clone(&engine), shutdown.clone()));

    // The executors: every dispatch is claimed, run (simulated) and reported to the engine.
    // Questions wait for an answer from the console or the API.
    let executors = Arc::clone(&engine);
    tokio::spawn(async move {
        let mut seed = 0;
        while let Some(message) = bus.recv().await {
            let Outgoing::Task(task) = message else {
                continue;
            };
            seed += 1;
            let engine = Arc::clone(&executors);
            tokio::spawn(async move {
                let mut executor = SimExecutor::new(SimBehaviour::default(), seed);
                let lease = format!("lease-{seed}");
                let claim = Command::ClaimAttempt {
                    task_id: task.assignment.task_id.clone(),
                    attempt: task.assignment.attempt,
                    lease: lease.clone(),
                    now: engine.now(),
                };
                if engine.handle(&task.session, claim).await.is_err() {
                    return;
                }
                tokio::time::sleep(executor.latency()).await;
                let report = Command::HandleExecutorEvent {
                    event: executor.outcome(&task),
                    lease: Some(lease),
                    now: engine.now(),
                };
                if let Err(error) = engine.handle(&task.session, report).await {
                    eprintln!("report refused: {error}");
                }
            });
        }
    });

    // The HTTP API and console, on the same engine.
    let http = HttpConfig {
        enabled: true,
        listen: "127.0.0.1:8080".into(),
        anonymous: HttpRole::Operator,
        ..HttpConfig::default()
    };
    let (addr, listener) = planner_svc::http::bind(&http).await?;
    println!("console at http://{addr}/ (Ctrl-C to stop)");
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    planner_svc::http::serve_on(listener, engine, http, shutdown).await
}
