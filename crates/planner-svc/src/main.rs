//! `planner-svc`: the planner daemon and its tools. See `--help`.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use planner_core::{CancelTarget, PlanPhase, Planner, TaskId};
use planner_store::{EventStore, FileStore, FileStoreConfig, JetStreamConfig, JetStreamStore};
use planner_svc::client::{self, Client, View, WatchOptions};
use planner_svc::config::{Config, LogFormat, StoreKind};
use planner_svc::embedded::{print_events, run, RunOptions};
use planner_svc::inspect::{
    print_sessions, print_summary, select, SessionFilter, SessionRow, STATUSES,
};
use planner_svc::otel::Exporter;
use planner_svc::protocol::{ClientCommand, Subjects};
use planner_svc::serve::{connect, serve};
use planner_svc::sim::SimBehaviour;
use tracing_subscriber::EnvFilter;

/// The daemon allocates and frees a buffer per message it reads or writes; glibc's malloc spent
/// about a third of the daemon's CPU at saturation (docs/benchmarks.md), mimalloc far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a bad configuration (EX_CONFIG is 78; 64, EX_USAGE, is what operators
/// script against for "fix your settings").
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "planner-svc",
    version,
    about = "Event-sourced task planner for agent clusters, on NATS"
)]
struct Cli {
    /// The config file (default: config/planner.toml if it exists).
    #[arg(long, global = true, env = "PLANNER_CONFIG")]
    config: Option<PathBuf>,
    /// Override a setting: `--set sessions.max_loaded=500` (repeatable; wins over env and file).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon on NATS.
    Serve {
        /// NATS server URL(s), comma-separated (overrides nats.url).
        #[arg(long)]
        nats_url: Option<String>,
        /// Serve the HTTP API and web console on this address, e.g. 127.0.0.1:8080 (turns
        /// http.enabled on and sets http.listen; see docs/http.md).
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
    },
    /// Plan and run a request in-process with simulated executors: no NATS needed.
    Run {
        /// The request (words are joined; blank is refused); a demo request when left out,
        /// or with --session and no request, the session resumed as it was left (after
        /// Ctrl-C).
        request: Vec<String>,
        /// Where the file store keeps events (overrides store.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Continue an existing session (`sessions` lists them; an unknown id is an error):
        /// resume it where it was left, then run the follow-up request if one is given.
        #[arg(long)]
        session: Option<String>,
        /// Answer every question "yes" instead of asking.
        #[arg(long)]
        yes: bool,
        /// Simulated task duration in milliseconds.
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        /// Percent of simulated attempts that fail (and are retried).
        #[arg(long, default_value_t = 0)]
        fail_percent: u8,
        /// Serve the HTTP API and web console on this address while the run goes, e.g.
        /// 127.0.0.1:8080; without tokens configured, anonymous requests get the operator
        /// role (loopback only). Stays up after the plan ends, until Ctrl-C.
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
    },
    /// Print a session's events and folded state, from the configured store.
    Replay {
        /// The session id.
        session: String,
        /// Print events as JSON lines instead of a summary.
        #[arg(long)]
        json: bool,
        /// Read the file store in this directory (overrides the configured store).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run a simulated executor pool on NATS (a demo executor; the load generator's executors).
    Executor {
        /// NATS server URL(s) (overrides nats.url).
        #[arg(long)]
        nats_url: Option<String>,
        /// The subjects to serve (default: every dispatch, `{prefix}.task.>`).
        #[arg(long)]
        filter: Option<String>,
        /// The durable consumer name (one per pool).
        #[arg(long, default_value = "demo-executors")]
        consumer: String,
        /// Tasks run at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Simulated task duration in milliseconds.
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
        /// Percent of simulated attempts that fail (and are retried).
        #[arg(long, default_value_t = 0)]
        fail_percent: u8,
        /// Publish reports to the report stream only, as executors written before direct
        /// reports do (default: a request to the planner first, the stream as the fallback).
        #[arg(long)]
        stream_reports: bool,
        /// Take dispatches from the dispatch stream only, not offers (`{prefix}.offer.…`) too.
        #[arg(long)]
        no_offers: bool,
        /// Never ask for the session's next task with a report (`next`): every task comes by
        /// an offer or the dispatch stream, and is claimed.
        #[arg(long)]
        no_next: bool,
    },
    /// Start a session on the daemon from a request; prints its id (follow it with `watch`).
    Submit {
        /// The request (words are joined).
        #[arg(required = true)]
        request: Vec<String>,
        /// The session id (default: a new one). An existing session takes it as a follow-up.
        #[arg(long)]
        session: Option<String>,
        /// A plan (JSON, as `docs/protocol.md` shows) to run instead of the planner's own.
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
        /// Watch the session to its end after submitting it.
        #[arg(long)]
        watch: bool,
        /// NATS server URL(s) (overrides nats.url).
        #[arg(long)]
        nats_url: Option<String>,
    },
    /// Follow a session on the daemon: its tasks as they go, until the plan ends. On a
    /// terminal, a live view (a line per task, an overall line) and open questions asked and
    /// the answers sent; piped (or TERM=dumb), plain lines. NO_COLOR: no colours.
    Watch {
        /// The session id.
        session: String,
        /// Never ask questions, only print them (the default when not on a terminal).
        #[arg(long)]
        no_ask: bool,
        /// NATS server URL(s) (overrides nats.url).
        #[arg(long)]
        nats_url: Option<String>,
    },
    /// Answer a question a session asked (its task id, as `watch` shows it).
    Answer {
        /// The session id.
        session: String,
        /// The task that asked.
        task: String,
        /// The answer (words are joined).
        #[arg(required = true)]
        answer: Vec<String>,
        /// NATS server URL(s) (overrides nats.url).
        #[arg(long)]
        nats_url: Option<String>,
    },
    /// Cancel a session's plan, or one task and what depends on it.
    Cancel {
        /// The session id.
        session: String,
        /// The task (default: the whole plan).
        task: Option<String>,
        /// Why, for the record.
        #[arg(long)]
        reason: Option<String>,
        /// NATS server URL(s) (overrides nats.url).
        #[arg(long)]
        nats_url: Option<String>,
    },
    /// List the sessions the daemon quarantined (their log could not be loaded), asking every
    /// instance: session, since when, instance, reason.
    Quarantined {
        /// First lift this session's quarantine on every instance (after repairing its log):
        /// the next recovery pass loads it again.
        #[arg(long, value_name = "SESSION")]
        release: Option<String>,
        /// One JSON object per instance and line.
        #[arg(long)]
        json: bool,
        /// NATS server URL(s) (overrides nats.url).
        #[arg(long)]
        nats_url: Option<String>,
    },
    /// Check the event logs of the configured store (every session, or the ones given):
    /// versions contiguous, events decodable, the snapshot equal to the fold, no task changed
    /// after it ended, attempts increasing, every dispatch justified. Prints one line per
    /// session and each problem; exits 1 when any log has a problem.
    Check {
        /// The sessions to check (default: every session in the store).
        sessions: Vec<String>,
        /// Read the file store in this directory (overrides the configured store).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// List the sessions in the configured store, newest first: id, status, age, request.
    Sessions {
        /// Read the file store in this directory (overrides the configured store).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only sessions with this status.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(STATUSES))]
        status: Option<String>,
        /// Only sessions one of whose requests contains this text (case-insensitive).
        #[arg(long, value_name = "TEXT")]
        search: Option<String>,
        /// At most this many sessions (the newest).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
}

const DEMO_REQUEST: &str = "1. Search for direct flights from Lisbon to Oslo\n2. Which dates suit you?\n3. Compare the prices and summarize the best three options\n4. Email the summary to <address>";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut overrides = cli.set.clone();
    if let Cmd::Serve {
        http: Some(addr), ..
    }
    | Cmd::Run {
        http: Some(addr), ..
    } = &cli.command
    {
        overrides.push("http.enabled=true".into());
        overrides.push(format!("http.listen=\"{addr}\""));
    }
    match &cli.command {
        Cmd::Serve {
            nats_url: Some(url),
            ..
        }
        | Cmd::Executor {
            nats_url: Some(url),
            ..
        }
        | Cmd::Submit {
            nats_url: Some(url),
            ..
        }
        | Cmd::Watch {
            nats_url: Some(url),
            ..
        }
        | Cmd::Answer {
            nats_url: Some(url),
            ..
        }
        | Cmd::Cancel {
            nats_url: Some(url),
            ..
        }
        | Cmd::Quarantined {
            nats_url: Some(url),
            ..
        } => overrides.push(format!("nats.url=\"{url}\"")),
        Cmd::Run {
            data_dir: Some(dir),
            ..
        }
        | Cmd::Replay {
            data_dir: Some(dir),
            ..
        }
        | Cmd::Sessions {
            data_dir: Some(dir),
            ..
        }
        | Cmd::Check {
            data_dir: Some(dir),
            ..
        } => {
            overrides.push(format!("store.data_dir=\"{}\"", dir.display()));
            overrides.push("store.kind=\"file\"".into());
        }
        _ => {}
    }
    let mut config = match Config::load(cli.config.as_deref(), std::env::vars(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("planner-svc: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // `run --http` on a laptop: no tokens configured means the person at the keyboard, on
    // loopback only (validation refuses another address).
    if let Cmd::Run { http: Some(_), .. } = &cli.command {
        let http = &mut config.http;
        if http.viewer_tokens.is_empty()
            && http.ui_tokens.is_empty()
            && http.operator_tokens.is_empty()
            && http.anonymous == planner_svc::config::HttpRole::None
        {
            http.anonymous = planner_svc::config::HttpRole::Operator;
            if let Err(e) = config.validate() {
                eprintln!("planner-svc: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let quiet = !matches!(cli.command, Cmd::Serve { .. } | Cmd::Executor { .. });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("planner-svc: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Spans are exported by the daemon only, when an endpoint is configured (docs/observability.md).
    let endpoint = match &cli.command {
        Cmd::Serve { .. } => {
            match planner_svc::otel::endpoint(&config.tracing, |name| std::env::var(name).ok()) {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    eprintln!("planner-svc: invalid configuration:\n  - {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        _ => None,
    };
    let exporter = endpoint.map(|url| {
        let started = Exporter::start(&url, &config.tracing, runtime.handle().clone());
        (url, started)
    });
    let (exporter, failed) = match exporter {
        Some((url, Ok(exporter))) => (Some((url, exporter)), None),
        Some((url, Err(error))) => (None, Some((url, error))),
        None => (None, None),
    };
    init_logging(&config, quiet, exporter.as_ref().map(|(_, e)| e));
    if let Some((url, error)) = failed {
        tracing::error!(endpoint = url, error = %planner_svc::report(&error), "cannot export spans over OTLP; running without");
    }
    if let Some((url, _)) = &exporter {
        tracing::info!(endpoint = url, "exporting spans over OTLP/HTTP");
    }
    let result = runtime.block_on(dispatch(cli.command, config));
    // While the runtime still runs: the last spans' requests run on it.
    if let Some((_, exporter)) = exporter {
        exporter.shutdown();
    }
    match result {
        Ok(code) => code,
        // The reader went away (`planner-svc run … | head`): nothing more to say, to no one.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("planner-svc: {}", planner_svc::report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Whether `error` comes from writing into a pipe whose reader is gone.
fn broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_logging(config: &Config, quiet: bool, exporter: Option<&Exporter>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let default = if quiet {
        "warn"
    } else {
        config.log.level.as_str()
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    match exporter {
        // The log's filter is the log's alone: the spans the exporter records below the
        // log's level are made, and not logged.
        Some(exporter) => tracing_subscriber::registry()
            .with(log_layer(config).with_filter(filter))
            .with(exporter.layer())
            .init(),
        None => tracing_subscriber::registry()
            .with(filter)
            .with(log_layer(config))
            .init(),
    }
}

/// The log's lines on stderr, as `log.format` says.
fn log_layer<S>(config: &Config) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    // Colours only for a person at a terminal (and not for one who set NO_COLOR).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        // A log line that cannot be written (stderr's reader gone) is dropped: tracing's
        // report of it goes through eprintln!, which panics on the same closed pipe, and took
        // down the task that was logging (the one stopping `executor` on SIGTERM among them).
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => layer.json().boxed(),
        LogFormat::Pretty => layer.boxed(),
    }
}

async fn dispatch(command: Cmd, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Cmd::Serve { .. } => {
            tracing::info!(config = ?config, version = env!("CARGO_PKG_VERSION"), "effective configuration");
            // On a worker, not on the thread that called `block_on`: that thread polls its
            // future outside the pool, so each request the serve loop took woke it, and it
            // woke a worker for the task it spawned. Spawned, the loop and its tasks share the
            // workers' queues (one-session chain: 7.7 -> 4.3 context switches per task).
            tokio::spawn(serve(config, shutdown_signal()))
                .await
                .context("the serve loop failed")??;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            request,
            yes,
            latency_ms,
            fail_percent,
            session,
            ..
        } => {
            // No request: resume the given session as it was left, or plan the demo request.
            // A request given but blank is refused, as the daemon refuses it.
            let given = !request.is_empty();
            let request = request.join(" ");
            let request = match (request.trim().is_empty(), given, &session) {
                (false, _, _) => Some(request),
                (true, true, _) => Cli::command()
                    .error(
                        clap::error::ErrorKind::ValueValidation,
                        "the request is empty: nothing to plan (leave it out for the demo request)",
                    )
                    .exit(),
                (true, false, Some(_)) => None,
                (true, false, None) => Some(DEMO_REQUEST.to_owned()),
            };
            let options = RunOptions {
                request,
                data_dir: config.store.data_dir.clone(),
                session,
                auto_answer: yes,
                behaviour: SimBehaviour {
                    latency: Duration::from_millis(latency_ms),
                    fail_percent,
                    ..SimBehaviour::default()
                },
                planner: config.planner.clone(),
                llm: config.llm_planner(),
                http: config.http.enabled.then(|| config.http.clone()),
            };
            let mut out = std::io::stdout();
            let phase = run(options, &mut out).await?;
            Ok(if phase == PlanPhase::Completed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Executor {
            filter,
            consumer,
            concurrency,
            latency_ms,
            fail_percent,
            stream_reports,
            no_offers,
            no_next,
            ..
        } => {
            let admin = planner_svc::health::start(
                &config.metrics,
                &config.metrics.executor_listen,
                "executor",
            )
            .await;
            let client = connect(&config).await?;
            // An executor pool has no recovery of its own: ready once connected.
            admin.health.connected(&client);
            admin.health.streams_bound();
            admin.health.recovered();
            let observer: std::sync::Arc<dyn planner_svc::executor::PoolObserver> =
                if config.metrics.enabled {
                    std::sync::Arc::new(planner_svc::metrics::PoolMetrics::default())
                } else {
                    std::sync::Arc::new(planner_svc::executor::NoObserver)
                };
            let subjects = Subjects::new(&config.subjects.prefix);
            let options = planner_svc::executor::PoolOptions {
                stream: config.dispatch.stream_name.clone(),
                consumer,
                filter: filter.unwrap_or_else(|| subjects.tasks()),
                concurrency: concurrency.max(1),
                report_started: true,
                behaviour: SimBehaviour {
                    latency: Duration::from_millis(latency_ms),
                    jitter_percent: 50,
                    fail_percent,
                    ..SimBehaviour::default()
                },
                reports: if stream_reports {
                    planner_svc::executor::ReportPath::Stream
                } else {
                    planner_svc::executor::ReportPath::Direct
                },
                offers: !no_offers,
                take_next: !no_next,
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stop = shutdown.clone();
            let signalled = shutdown_signal();
            tokio::spawn(async move {
                signalled.await;
                stop.cancel();
            });
            tracing::info!(filter = %options.filter, "simulated executor pool running");
            planner_svc::executor::run_pool(client.clone(), subjects, options, observer, shutdown)
                .await?;
            client.drain().await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Submit {
            request,
            session,
            plan,
            watch,
            ..
        } => {
            let input = request.join(" ");
            if input.trim().is_empty() {
                anyhow::bail!("the request is empty: nothing to plan");
            }
            let plan =
                match plan {
                    Some(path) => {
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("reading the plan {}", path.display()))?;
                        Some(serde_json::from_str(&text).with_context(|| {
                            format!("the plan {} is not a plan", path.display())
                        })?)
                    }
                    None => None,
                };
            let session = session.unwrap_or_else(client::new_session_id);
            let client = Client::connect(&config).await?;
            let command = ClientCommand::Initialize {
                request_id: Some(client::new_session_id()),
                input,
                attachments: vec![],
                plan,
                planning: None,
            };
            client.command(&session, &command).await?;
            writeln!(std::io::stdout(), "{session}")?;
            if !watch {
                eprintln!("submitted; follow it with `planner-svc watch {session}`");
                return Ok(ExitCode::SUCCESS);
            }
            watch_session(&client, &session, false).await
        }
        Cmd::Watch {
            session, no_ask, ..
        } => {
            let client = Client::connect(&config).await?;
            watch_session(&client, &session, no_ask).await
        }
        Cmd::Answer {
            session,
            task,
            answer,
            ..
        } => {
            let client = Client::connect(&config).await?;
            let command = ClientCommand::AnswerClarification {
                task_id: TaskId(task.clone()),
                answer: answer.join(" "),
            };
            client.command(&session, &command).await?;
            eprintln!("answered {task} of session {session}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel {
            session,
            task,
            reason,
            ..
        } => {
            let client = Client::connect(&config).await?;
            let target = match &task {
                Some(task) => CancelTarget::Task {
                    task_id: TaskId(task.clone()),
                },
                None => CancelTarget::Plan,
            };
            client
                .command(&session, &ClientCommand::Cancel { target, reason })
                .await?;
            match task {
                Some(task) => eprintln!("cancelled {task} of session {session}"),
                None => eprintln!("cancelled session {session}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Quarantined { release, json, .. } => {
            let client = Client::connect(&config).await?;
            let instances = client.quarantined(release.as_deref()).await?;
            if let Some(session) = &release {
                let lifted = instances
                    .iter()
                    .filter(|i| i.released == Some(true))
                    .count();
                eprintln!(
                    "released {session} on {lifted} of {} instances",
                    instances.len()
                );
            }
            client::print_quarantined(&mut std::io::stdout().lock(), &instances, now(), json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { sessions, .. } => {
            with_store(&config, |store| async move {
                let sessions = if sessions.is_empty() {
                    store.list_streams().await?
                } else {
                    sessions
                };
                let mut out = std::io::stdout().lock();
                let mut bad = 0;
                for session in &sessions {
                    let report = match &store {
                        AnyStore::File(s) => planner_svc::check::check_session(s, session).await,
                        AnyStore::JetStream(s) => {
                            planner_svc::check::check_session(s.as_ref(), session).await
                        }
                    }
                    .with_context(|| format!("reading session {session}"))?;
                    if report.ok() {
                        writeln!(out, "ok       {session} ({} events)", report.events)?;
                    } else {
                        bad += 1;
                        writeln!(out, "PROBLEM  {session} ({} events)", report.events)?;
                        for problem in &report.problems {
                            writeln!(out, "  - {problem}")?;
                        }
                    }
                }
                writeln!(
                    out,
                    "checked {} sessions: {bad} with problems",
                    sessions.len()
                )?;
                Ok(if bad == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            })
            .await
        }
        Cmd::Replay { session, json, .. } => {
            with_store(&config, |store| async move {
                replay(&store, &session, json).await
            })
            .await
        }
        Cmd::Sessions {
            status,
            search,
            limit,
            ..
        } => {
            let filter = SessionFilter {
                status,
                search,
                limit,
            };
            with_store(&config, |store| async move {
                let mut rows = Vec::new();
                for session in store.list_streams().await? {
                    let events = store.load_all(&session).await?;
                    rows.push(SessionRow::new(&session, &events));
                }
                let rows = select(rows, &filter);
                let terminal = std::io::stdout().is_terminal();
                print_sessions(&mut std::io::stdout().lock(), &rows, now(), terminal)?;
                Ok(ExitCode::SUCCESS)
            })
            .await
        }
    }
}

/// The wall clock, for ages.
fn now() -> planner_core::Timestamp {
    planner_core::Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

/// Follows `session` to its end: exit 0 when its plan completed, 1 otherwise.
async fn watch_session(client: &Client, session: &str, no_ask: bool) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdout().is_terminal();
    let ask = !no_ask && std::io::stdin().is_terminal() && terminal;
    // The live view needs a terminal that can move its cursor: with TERM unset or `dumb`,
    // plain lines (indicatif would draw nothing there). Colours unless NO_COLOR is set.
    let redraws = std::env::var_os("TERM").is_some_and(|t| !t.is_empty() && t != "dumb");
    let view = if terminal && redraws {
        View::Live {
            colour: std::env::var_os("NO_COLOR").is_none(),
        }
    } else {
        View::Lines
    };
    let mut out = std::io::stdout();
    let phase = client
        .watch(session, &mut out, WatchOptions { ask, view })
        .await?;
    Ok(if phase == PlanPhase::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn with_store<F, Fut>(config: &Config, f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(AnyStore) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let store = match config.store.kind {
        StoreKind::File => {
            let dir = config.store.data_dir.clone();
            // A typo in the directory must not read as an empty store.
            if !dir.is_dir() {
                anyhow::bail!(
                    "no data directory {} (`planner-svc run` keeps its sessions in planner-data unless given --data-dir)",
                    dir.display()
                );
            }
            // Read-only: no lock, so a `run` or `serve` may keep writing meanwhile.
            AnyStore::File(
                tokio::task::spawn_blocking(move || {
                    FileStore::open_read_only(FileStoreConfig::new(dir))
                })
                .await?
                .context("opening the file store")?,
            )
        }
        StoreKind::Jetstream => {
            // The sessions of `run` are in its data directory, not on NATS: say so when the
            // daemon's store cannot be reached and that directory is here.
            let local = &config.store.data_dir;
            let hint = |e: anyhow::Error| {
                if local.join("events.log").exists() {
                    e.context(format!(
                        "reading the daemon's JetStream store; the sessions of `planner-svc run` are in {0}: add --data-dir {0}",
                        local.display()
                    ))
                } else {
                    e.context("reading the daemon's JetStream store (for `planner-svc run`'s sessions, add --data-dir <dir>)")
                }
            };
            let client = connect(config).await.map_err(hint)?;
            AnyStore::JetStream(Box::new(
                JetStreamStore::connect(
                    client,
                    JetStreamConfig {
                        stream_name: config.store.stream_name.clone(),
                        subject_prefix: Subjects::new(&config.subjects.prefix).events_prefix(),
                        snapshot_bucket: config.store.snapshot_bucket.clone(),
                        ..JetStreamConfig::default()
                    },
                )
                .await
                .map_err(|e| hint(e.into()))?,
            ))
        }
        StoreKind::Memory => anyhow::bail!(
            "the memory store holds nothing to inspect; use --data-dir or store.kind=jetstream"
        ),
    };
    f(store).await
}

/// The stores an operator command can read.
enum AnyStore {
    File(FileStore),
    JetStream(Box<JetStreamStore>),
}

impl AnyStore {
    async fn list_streams(&self) -> Result<Vec<String>, planner_store::StoreError> {
        match self {
            AnyStore::File(s) => s.list_streams().await,
            AnyStore::JetStream(s) => s.list_streams().await,
        }
    }

    async fn load_all(
        &self,
        session: &str,
    ) -> Result<Vec<planner_core::Event>, planner_store::StoreError> {
        match self {
            AnyStore::File(s) => s.load_all(session).await,
            AnyStore::JetStream(s) => s.load_all(session).await,
        }
    }

    /// The trace of each append that has one, by the version it starts at (the JetStream
    /// store keeps them; the file store does not).
    async fn traces(
        &self,
        session: &str,
    ) -> Result<std::collections::BTreeMap<u64, String>, planner_store::StoreError> {
        let AnyStore::JetStream(store) = self else {
            return Ok(std::collections::BTreeMap::new());
        };
        Ok(store
            .load_batches(session)
            .await?
            .into_iter()
            .filter_map(|batch| Some((batch.base_version?, batch.traceparent?)))
            .collect())
    }
}

async fn replay(store: &AnyStore, session: &str, json: bool) -> anyhow::Result<ExitCode> {
    let events = store.load_all(session).await?;
    if events.is_empty() {
        eprintln!("no events for session {session}");
        return Ok(ExitCode::from(1));
    }
    let mut out = std::io::stdout();
    if json {
        for event in &events {
            writeln!(out, "{}", serde_json::to_string(event)?)?;
        }
    } else {
        let traces = store.traces(session).await?;
        for (version, event) in events.iter().enumerate() {
            if let Some(traceparent) = traces.get(&(version as u64)) {
                match planner_svc::trace::TraceParent::parse(traceparent) {
                    Some(parsed) => {
                        writeln!(out, "       trace {} ({traceparent})", parsed.trace_id())?
                    }
                    None => writeln!(out, "       trace {traceparent}")?,
                }
            }
            writeln!(out, "{version:>6} {}", event.event_type())?;
            print_events(&mut out, std::slice::from_ref(event))?;
        }
    }
    let planner = Planner::fold(&events);
    // After JSON lines, the summary would break a reader of them: it goes to stderr there.
    if json {
        print_summary(&mut std::io::stderr(), session, planner.state())?;
    } else {
        writeln!(out)?;
        print_summary(&mut out, session, planner.state())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed when this is called,
/// not when the future is first polled: a signal between the two (the executor logged that it
/// runs, its stopping task not yet scheduled) is then not lost, and does not kill the process
/// with its default action (the cause of `executor_stops_on_sigterm_with_its_stderr_closed`
/// failing now and then under load).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let (mut interrupt, mut terminate) = handlers;
            let interrupted = async {
                match interrupt.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            let terminated = async {
                match terminate.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = interrupted => {},
                () = terminated => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
    }
}
