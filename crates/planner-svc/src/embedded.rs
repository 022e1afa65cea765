//! `planner-svc run`: the same engine on an in-process bus, with the file store under a data
//! directory, simulated executors, and questions asked on the terminal. No NATS needed.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use planner_core::{Command, Event, PlanPhase, PlannerConfig, TaskStatus};
use planner_store::{FileStore, FileStoreConfig, SnapshotPolicy};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::ChannelPublisher;
use crate::engine::{Engine, EngineConfig, Llm, Outgoing};
use crate::sim::{SimBehaviour, SimExecutor};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The request; none to resume `session` as it was left.
    pub request: Option<String>,
    /// Where the file store lives.
    pub data_dir: PathBuf,
    /// The session id; a new one when absent.
    pub session: Option<String>,
    /// Answer questions "yes" instead of asking (also when stdin is not a terminal).
    pub auto_answer: bool,
    /// How the simulated executors behave.
    pub behaviour: SimBehaviour,
    /// The planner settings of a new session.
    pub planner: PlannerConfig,
    /// The LLM planner, if configured.
    pub llm: Option<Arc<planner_llm::LlmPlanner>>,
    /// Serve the HTTP API and console beside the run (and after it, until Ctrl-C).
    pub http: Option<crate::config::HttpConfig>,
}

/// Runs the request to its end, printing progress to `out`; returns how the plan ended. With
/// `http`, the console stays up after the end until Ctrl-C.
pub async fn run(options: RunOptions, out: &mut (dyn Write + Send)) -> anyhow::Result<PlanPhase> {
    let (phase, console) = run_to_end(options, out).await?;
    if let Some((url, ended, _stop_http)) = console {
        ended.store(true, std::sync::atomic::Ordering::SeqCst);
        writeln!(
            out,
            "the plan ended; the console stays up at {url}: Ctrl-C to stop"
        )?;
        out.flush()?;
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(phase)
}

/// The console's address, whether the run ended, and what stops the console when dropped.
type Console = Option<(
    String,
    Arc<std::sync::atomic::AtomicBool>,
    tokio_util::sync::DropGuard,
)>;

async fn run_to_end(
    options: RunOptions,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<(PlanPhase, Console)> {
    let unknown_session = |id: &str| {
        anyhow::anyhow!(
            "no session {id} in {dir}: --session continues an existing session; list them with `planner-svc sessions --data-dir {dir}`, or leave out --session to start a new one",
            dir = options.data_dir.display()
        )
    };
    // Not even a directory: say so before opening the store creates one.
    if let Some(id) = &options.session {
        if !options.data_dir.is_dir() {
            return Err(unknown_session(id));
        }
    }
    let data_dir = options.data_dir.clone();
    let store =
        tokio::task::spawn_blocking(move || FileStore::open(FileStoreConfig::new(data_dir)))
            .await?
            .with_context(|| {
                format!("opening the event store in {}", options.data_dir.display())
            })?;
    let (publisher, mut bus) = ChannelPublisher::new();
    let (engine, timers) = Engine::new(
        Arc::new(store),
        Arc::new(publisher),
        EngineConfig {
            planner: options.planner.clone(),
            snapshot: SnapshotPolicy::default(),
            llm: options.llm.clone().map(|llm| llm as Arc<dyn Llm>),
            ..EngineConfig::default()
        },
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(timers.run(Arc::clone(&engine), shutdown.clone()));
    let _stop_timers = shutdown.clone().drop_guard();
    let http_stop = CancellationToken::new();
    let mut http_guard = Some(http_stop.clone().drop_guard());
    let console = match &options.http {
        Some(http) => {
            let (addr, listener) = crate::http::bind(http).await?;
            let (engine, http, stop) = (Arc::clone(&engine), http.clone(), http_stop.clone());
            tokio::spawn(async move {
                if let Err(error) = crate::http::serve_on(listener, engine, http, stop).await {
                    tracing::error!(error = %crate::report(&error), "the HTTP API stopped");
                }
            });
            Some(format!("http://{addr}/"))
        }
        None => None,
    };

    let session = options
        .session
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let existing = planner_store::load_planner(engine.store().as_ref(), &session)
        .await
        .with_context(|| format!("loading session {session}"))?;
    if existing.version() == 0 && options.session.is_some() {
        return Err(unknown_session(&session));
    }
    writeln!(
        out,
        "session {session} (events in {})",
        options.data_dir.display()
    )?;
    if let Some(url) = &console {
        writeln!(out, "console: {url}#/sessions/{session}")?;
    }
    let ended_run = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut done = |phase: PlanPhase| {
        let console = match (&console, http_guard.take()) {
            (Some(url), Some(guard)) => Some((url.clone(), Arc::clone(&ended_run), guard)),
            _ => None,
        };
        (phase, console)
    };
    // Commands sent over HTTP (a cancel, say) can end the plan too: the engine tells.
    let mut observed = engine.observe();
    // Ctrl-C ends the run as it always did (everything done so far is in the log), and says how
    // to pick the session up again: also while a question waits for an answer.
    {
        let hint = format!(
            "interrupted: resume with `planner-svc run --session {session} --data-dir {}`",
            options.data_dir.display()
        );
        let ended_run = Arc::clone(&ended_run);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                if ended_run.load(std::sync::atomic::Ordering::SeqCst) {
                    // The plan ended; only the console was still up.
                    std::process::exit(0);
                }
                eprintln!("\n{hint}");
                std::process::exit(130);
            }
        });
    }

    // Every handled command's events come back here to be printed, in order.
    let (progress_tx, mut progress) = mpsc::unbounded_channel::<Vec<Event>>();
    if existing.version() > 0 {
        let phase = existing.state().phase.clone();
        if phase.is_terminal() && options.request.is_none() {
            writeln!(
                out,
                "session {session} already ended: {phase:?}; give a request to follow up"
            )?;
            return Ok(done(phase));
        }
        let resumed = resume(&engine, &session, &existing).await?;
        let _ = progress_tx.send(resumed);
    }
    if let Some(request) = &options.request {
        let handled = engine
            .handle(
                &session,
                Command::Initialize {
                    request_id: None,
                    planning: None,
                    input: request.clone(),
                    attachments: vec![],
                    plan: None,
                    now: engine.now(),
                },
            )
            .await?;
        let _ = progress_tx.send(handled.events);
    }

    let auto_answer = options.auto_answer || !std::io::stdin().is_terminal();
    // Held by an executor from handling a report until its events are sent to `progress`: a
    // message on the bus was published inside such a turn, so once the printer holds it, the
    // events that led to the message are in `progress` and are printed first. (One session:
    // its handling is one at a time anyway.)
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    let mut seed = 1;
    loop {
        tokio::select! {
            // Print what happened before acting on what it published.
            biased;
            Some(events) = progress.recv() => {
                print_events(out, &events)?;
                if let Some(phase) = ended(&events) {
                    return Ok(done(phase));
                }
            }
            Ok(appended) = observed.recv(), if console.is_some() => {
                if appended.session == session {
                    if let Some(phase) = ended(&appended.events) {
                        // Printed here only if the loop's own commands did not cause it.
                        while let Ok(events) = progress.try_recv() {
                            print_events(out, &events)?;
                        }
                        print_events(out, &appended.events)?;
                        return Ok(done(phase));
                    }
                }
            }
            Some(message) = bus.recv() => {
                {
                    let _turn = turn.lock().await;
                    while let Ok(events) = progress.try_recv() {
                        print_events(out, &events)?;
                        if let Some(phase) = ended(&events) {
                            return Ok(done(phase));
                        }
                    }
                }
                match message {
                Outgoing::Task(task) => {
                    writeln!(out, "-> {} attempt {} to {}", task.assignment.task_id, task.assignment.attempt, task.assignment.target)?;
                    let engine = Arc::clone(&engine);
                    let progress = progress_tx.clone();
                    let session = session.clone();
                    seed += 1;
                    let mut executor = SimExecutor::new(options.behaviour, seed);
                    let turn = Arc::clone(&turn);
                    tokio::spawn(async move {
                        // Like any executor: claim the attempt, then report under its lease.
                        // (Simulated work is far shorter than the heartbeat timeout.)
                        let lease = uuid::Uuid::new_v4().simple().to_string();
                        let claim = Command::ClaimAttempt {
                            task_id: task.assignment.task_id.clone(),
                            attempt: task.assignment.attempt,
                            lease: lease.clone(),
                            now: engine.now(),
                        };
                        let claimed = {
                            let _turn = turn.lock().await;
                            engine.handle(&session, claim).await.map(|handled| { let _ = progress.send(handled.events); })
                        };
                        match claimed {
                            Ok(()) => {}
                            Err(error) => {
                                tracing::info!(%error, "attempt not claimed; not running it");
                                return;
                            }
                        }
                        for event in [SimExecutor::started(&task), executor.outcome(&task)] {
                            tokio::time::sleep(executor.latency() / 2).await;
                            let report = Command::HandleExecutorEvent { event, lease: Some(lease.clone()), now: engine.now() };
                            let _turn = turn.lock().await;
                            match engine.handle(&session, report).await {
                                Ok(handled) => { let _ = progress.send(handled.events); }
                                Err(error) => tracing::warn!(%error, "report refused"),
                            }
                        }
                    });
                }
                Outgoing::Question(question) => {
                    let answer = ask(out, &question.question, auto_answer).await?;
                    let handled = engine
                        .handle(&session, Command::AnswerClarification { task_id: question.task_id, answer, now: engine.now() })
                        .await?;
                    let _ = progress_tx.send(handled.events);
                }
                Outgoing::Cancel(cancel) => {
                    writeln!(out, "x  {} attempt {} cancelled", cancel.task_id, cancel.attempt)?;
                }
                Outgoing::Notice(notice) => {
                    writeln!(out, "!  {}", notice.error.message)?;
                }
            }},
        }
    }
}

/// Picks up a session an earlier run left (Ctrl-C, a crash): the executors of its claimed
/// attempts died with that process, so those attempts are given up (retryably: the retry
/// policy sends new ones); unclaimed dispatches and open questions are published again.
/// Returns the events it caused.
async fn resume<S: planner_store::EventStore>(
    engine: &Arc<Engine<S, ChannelPublisher>>,
    session: &str,
    existing: &planner_core::Planner,
) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    let claimed: Vec<(planner_core::TaskId, u32)> = existing
        .state()
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Running && t.lease.is_some())
        .map(|t| (t.id.clone(), t.attempts))
        .collect();
    for (task_id, attempt) in claimed {
        let abandon = Command::AbandonAttempt {
            task_id,
            attempt,
            error: "the run that was executing it was interrupted".into(),
            retryable: true,
            now: engine.now(),
        };
        events.extend(engine.handle(session, abandon).await?.events);
    }
    engine.republish(session).await?;
    Ok(events)
}

fn ended(events: &[Event]) -> Option<PlanPhase> {
    events.iter().find_map(|e| match e {
        Event::PlanCompleted { .. } => Some(PlanPhase::Completed),
        Event::PlanFailed { reason, .. } => Some(PlanPhase::Failed {
            reason: reason.clone(),
        }),
        Event::PlanCancelled { .. } => Some(PlanPhase::Cancelled),
        _ => None,
    })
}

async fn ask(
    out: &mut (dyn Write + Send),
    question: &str,
    auto_answer: bool,
) -> anyhow::Result<String> {
    if auto_answer {
        writeln!(out, "?  {question} -> yes (auto)")?;
        return Ok("yes".to_owned());
    }
    write!(out, "?  {question} > ")?;
    out.flush()?;
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await??;
    let line = line.trim();
    Ok(if line.is_empty() {
        "yes".to_owned()
    } else {
        line.to_owned()
    })
}

/// `n` and `noun`, plural unless `n` is 1: "1 task", "3 tasks".
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Prints what a person following the plan wants to see.
pub fn print_events(out: &mut (dyn Write + Send), events: &[Event]) -> std::io::Result<()> {
    for event in events {
        match event {
            Event::TasksPlanned { tasks, source, .. } => {
                writeln!(out, "planned {} ({source:?}):", count(tasks.len(), "task"))?;
                for t in tasks {
                    let deps: Vec<&str> = t.dependencies.iter().map(|d| d.as_str()).collect();
                    let after = if deps.is_empty() {
                        String::new()
                    } else {
                        format!("  (after {})", deps.join(", "))
                    };
                    writeln!(
                        out,
                        "   {:<4} {:<13} {:<11} {}{after}",
                        t.id.as_str(),
                        t.kind.as_str(),
                        t.target,
                        t.description
                    )?;
                }
            }
            Event::TaskStatusUpdated {
                task_id,
                status: TaskStatus::Completed,
                output,
                ..
            } => {
                writeln!(
                    out,
                    "<- {task_id} completed: {}",
                    output.as_deref().unwrap_or("")
                )?;
            }
            Event::TaskStatusUpdated {
                task_id,
                status: TaskStatus::Failed,
                error,
                ..
            } => {
                writeln!(
                    out,
                    "<- {task_id} failed: {}",
                    error.as_deref().unwrap_or("")
                )?;
            }
            Event::RetryScheduled {
                task_id,
                error,
                not_before,
                at,
                ..
            } => {
                let wait = not_before.as_millis().saturating_sub(at.as_millis());
                writeln!(out, "<- {task_id} failed ({error}); retry in {wait} ms")?;
            }
            Event::ClarificationAnswered {
                task_id, answer, ..
            } => {
                writeln!(out, "<- {task_id} answered: {answer}")?;
            }
            Event::ContextCompacted {
                tokens_before,
                tokens_after,
                ..
            } => {
                writeln!(
                    out,
                    "   context compacted: {tokens_before} -> {tokens_after} tokens"
                )?;
            }
            Event::PlanCompleted { .. } => writeln!(out, "plan completed")?,
            Event::PlanFailed { reason, .. } => writeln!(out, "plan failed: {reason:?}")?,
            Event::PlanCancelled { .. } => writeln!(out, "plan cancelled")?,
            _ => {}
        }
    }
    Ok(())
}
