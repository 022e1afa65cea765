//! `planner-svc serve`: the daemon on NATS.
//!
//! - Commands: the micro-service `planner`, endpoint `command` on `{p}.cmd.*` (queue group
//!   `planner`, so several instances share them; `$SRV.PING|INFO|STATS` work).
//! - Executor reports: captured by the JetStream stream `PLANNER_REPORTS` on `{p}.report.*`,
//!   consumed through one durable pull consumer every instance shares, acknowledged only after
//!   the events they cause are persisted (and what those carry published).
//! - Dispatches: published into the work-queue stream `PLANNER_TASKS` on
//!   `{p}.task.{kind}.{target}`; an executor pool pulls from its own filtered consumer, so a task
//!   reaches one executor of a pool, and waits while none is online.
//! - Operators: endpoint `quarantined` on `{p}.admin.quarantined`, in a queue group of each
//!   instance's own, so every instance answers for the sessions it quarantined.
//! - Questions and cancellations on core subjects; the event log is the JetStream store.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use planner_core::{Command, FenceReason};
use planner_store::{
    EventStore, FileStore, FileStoreConfig, FsyncPolicy, JetStreamConfig, JetStreamStore,
    MemoryStore, SnapshotPolicy,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::NatsPublisher;
use crate::config::{Config, FsyncSetting, StoreKind};
use crate::engine::{Disposition, Engine, EngineConfig, EngineError, Llm};
use crate::protocol::{
    ClaimRequest, ClientCommand, CommandReply, ErrorBody, ErrorKind, ErrorNotice, HeartbeatRequest,
    LeaseReply, QuarantineReply, QuarantineRequest, ReportMessage, Subjects,
};

/// The daemon's version, reported to `$SRV.INFO`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Connects to NATS, waiting for it up to `nats.startup_wait_s` with a growing delay and a log
/// line per attempt: a daemon started with (or just before) its server, or during a server
/// restart, must not exit (under an orchestrator that is a crash loop).
async fn connect_patiently(config: &Config) -> anyhow::Result<async_nats::Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.nats.startup_wait_s);
    let mut delay = Duration::from_millis(250);
    loop {
        match connect(config).await {
            Ok(client) => return Ok(client),
            // A server that answers and refuses the TLS handshake or the credentials will
            // refuse them again: say why now rather than after `startup_wait_s`.
            Err(error) if error.downcast_ref::<ConnectRefusal>().is_some() => return Err(error),
            Err(error) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %crate::report(&error), retry_in = ?delay, "NATS not reachable yet; waiting for it");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => {
                return Err(error.context(format!(
                    "NATS still not reachable after nats.startup_wait_s = {} s",
                    config.nats.startup_wait_s
                )))
            }
        }
    }
}

/// Connects to NATS as configured.
pub async fn connect(config: &Config) -> anyhow::Result<async_nats::Client> {
    let nats = &config.nats;
    let mut options = async_nats::ConnectOptions::new()
        .name(&nats.name)
        .connection_timeout(Duration::from_millis(nats.connect_timeout_ms))
        .request_timeout(Some(config.request_timeout()))
        .event_callback(|event| async move {
            tracing::info!(%event, "nats connection event");
        });
    // Credentials in a URL are taken out of it and given to the client as options: the client
    // logs the server addresses it dials (at debug), and they must not carry a password.
    let (plain_urls, url_credentials) = crate::config::split_url_credentials(&nats.url);
    if !nats.user.is_empty() {
        options = options.user_and_password(nats.user.clone(), nats.password.expose().to_owned());
    } else if let Some((user, password)) = url_credentials {
        options = options.user_and_password(user, password);
    }
    if !nats.token.is_empty() {
        options = options.token(nats.token.expose().to_owned());
    }
    if !nats.nkey_seed_file.is_empty() {
        let seed = std::fs::read_to_string(&nats.nkey_seed_file)
            .with_context(|| format!("reading nats.nkey_seed_file {}", nats.nkey_seed_file))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if !nats.creds_file.is_empty() {
        options = options
            .credentials_file(&nats.creds_file)
            .await
            .with_context(|| format!("reading nats.creds_file {}", nats.creds_file))?;
    }
    if nats.tls_required {
        options = options.require_tls(true);
    }
    if !nats.tls_ca_file.is_empty() {
        options = options.add_root_certificates(nats.tls_ca_file.clone().into());
    }
    if !nats.tls_cert_file.is_empty() {
        options = options.add_client_certificate(
            nats.tls_cert_file.clone().into(),
            nats.tls_key_file.clone().into(),
        );
    }
    let urls: Vec<async_nats::ServerAddr> = plain_urls
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "parsing nats.url {:?}",
                crate::config::redact_urls(&nats.url)
            )
        })?;
    let at = crate::config::redact_urls(&nats.url);
    options.connect(urls).await.map_err(|error| {
        let refusal = ConnectRefusal::of(&error, nats);
        let error = anyhow::Error::new(error).context(format!("connecting to NATS at {at}"));
        match refusal {
            Some(refusal) => error.context(refusal),
            None => error,
        }
    })
}

/// A server that answered and refused us: the TLS handshake failed or the credentials were
/// not accepted. It names the settings to check (never their values).
#[derive(Debug, thiserror::Error)]
pub enum ConnectRefusal {
    /// The TLS handshake failed (either side refused the other's certificate, or one side
    /// does not speak TLS).
    #[error("TLS with the NATS server failed; check nats.tls_ca_file (the CA that signed the server's certificate), nats.tls_cert_file and nats.tls_key_file (a client certificate, when the server verifies clients) and nats.tls_required")]
    Tls,
    /// The server refused the credentials.
    #[error("the NATS server refused the credentials; check nats.user and nats.password, nats.token, nats.nkey_seed_file or nats.creds_file")]
    Credentials,
}

impl ConnectRefusal {
    fn of(error: &async_nats::ConnectError, nats: &crate::config::NatsConfig) -> Option<Self> {
        use async_nats::ConnectErrorKind as Kind;
        match error.kind() {
            Kind::Tls => Some(ConnectRefusal::Tls),
            Kind::AuthorizationViolation | Kind::Authentication => {
                Some(ConnectRefusal::Credentials)
            }
            // async-nats reports a failed handshake as the IO error rustls gives it
            // ("invalid peer certificate: UnknownIssuer", "received fatal alert: ..."): its
            // text is all there is to tell it from a refused connection.
            Kind::Io => {
                let text = error_chain(error).to_lowercase();
                let tls = ["certificate", "tls", "handshake", "alert"]
                    .iter()
                    .any(|word| text.contains(word));
                (tls || (nats.tls_required && text.contains("unexpected eof")))
                    .then_some(ConnectRefusal::Tls)
            }
            _ => None,
        }
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn engine_config(config: &Config) -> EngineConfig {
    EngineConfig {
        planner: config.planner.clone(),
        snapshot: SnapshotPolicy {
            every: config.store.snapshot_every,
        },
        conflict_retries: config.sessions.conflict_retries,
        max_loaded: config.sessions.max_loaded,
        max_remembered_ended: config.sessions.max_remembered_ended,
        idle_timeout: Duration::from_secs(config.sessions.idle_timeout_s),
        llm: config.llm_planner().map(|llm| llm as Arc<dyn Llm>),
        ..EngineConfig::default()
    }
}

/// Runs the daemon until `shutdown` resolves, then stops intake, finishes in-flight work within
/// `shutdown.grace_s`, drains the connection and returns.
pub async fn serve(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    crate::trace::set_enabled(config.metrics.trace_context);
    // Live (and not ready) from here on, while NATS is waited for.
    let admin = crate::health::start(&config.metrics, &config.metrics.listen, "serve").await;
    let client = tokio::select! {
        client = connect_patiently(&config) => client?,
        () = &mut shutdown => return Ok(()),
    };
    admin.health.connected(&client);
    let health = Arc::clone(&admin.health);
    match config.store.kind {
        StoreKind::Jetstream => {
            let store = JetStreamStore::connect(
                client.clone(),
                JetStreamConfig {
                    stream_name: config.store.stream_name.clone(),
                    subject_prefix: Subjects::new(&config.subjects.prefix).events_prefix(),
                    snapshot_bucket: config.store.snapshot_bucket.clone(),
                    storage: StorageType::File,
                    replicas: config.store.replicas,
                    max_bytes: config.store.max_bytes,
                    max_message_bytes: i32::try_from(config.store.max_append_bytes)
                        .unwrap_or(i32::MAX),
                    ..JetStreamConfig::default()
                },
            )
            .await
            .context("opening the JetStream event store")?;
            run_with(config, client, store, shutdown, health).await
        }
        StoreKind::File => {
            let mut file = FileStoreConfig::new(&config.store.data_dir);
            file.fsync = match config.store.fsync {
                FsyncSetting::Always => FsyncPolicy::Always,
                FsyncSetting::Group => FsyncPolicy::Group,
                FsyncSetting::Never => FsyncPolicy::Never,
            };
            file.max_record_bytes = config.store.max_append_bytes;
            let store = tokio::task::spawn_blocking(move || FileStore::open(file))
                .await?
                .context("opening the file event store")?;
            run_with(config, client, store, shutdown, health).await
        }
        StoreKind::Memory => run_with(config, client, MemoryStore::new(), shutdown, health).await,
    }
}

async fn ensure_streams(
    config: &Config,
    client: &async_nats::Client,
) -> anyhow::Result<pull::Stream> {
    let subjects = Subjects::new(&config.subjects.prefix);
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(stream::Config {
        name: config.dispatch.stream_name.clone(),
        subjects: vec![subjects.tasks()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        num_replicas: config.dispatch.replicas,
        duplicate_window: Duration::from_secs(config.dispatch.duplicate_window_s),
        ..Default::default()
    })
    .await
    .context("creating the dispatch stream")?;
    js.get_or_create_stream(stream::Config {
        name: config.reports.dead_letter_stream.clone(),
        subjects: vec![subjects.dead()],
        storage: StorageType::File,
        num_replicas: config.reports.replicas,
        max_age: Duration::from_secs(config.reports.max_age_days * 86_400),
        ..Default::default()
    })
    .await
    .context("creating the dead-letter stream")?;
    let reports = js
        .get_or_create_stream(stream::Config {
            name: config.reports.stream_name.clone(),
            subjects: vec![subjects.reports()],
            storage: StorageType::File,
            num_replicas: config.reports.replicas,
            max_age: Duration::from_secs(config.reports.max_age_days * 86_400),
            max_message_size: i32::try_from(config.limits.max_message_bytes).unwrap_or(i32::MAX),
            ..Default::default()
        })
        .await
        .context("creating the reports stream")?;
    let consumer = reports
        .get_or_create_consumer(
            &config.reports.consumer,
            pull::Config {
                durable_name: Some(config.reports.consumer.clone()),
                filter_subject: subjects.reports(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(config.reports.ack_wait_s),
                max_ack_pending: i64::try_from(config.reports.max_in_flight * 4)
                    .unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .context("creating the reports consumer")?;
    consumer
        .messages()
        .await
        .context("subscribing to executor reports")
}

async fn run_with<S: EventStore>(
    config: Config,
    client: async_nats::Client,
    store: S,
    shutdown: impl std::future::Future<Output = ()> + Send,
    health: Arc<crate::health::Health>,
) -> anyhow::Result<()> {
    let subjects = Subjects::new(&config.subjects.prefix);
    let publisher = NatsPublisher::new(client.clone(), subjects.clone());
    let mut engine_config = engine_config(&config);
    let max_payload = client.server_info().max_payload;
    if max_payload > 0 {
        // What the server accepts is the limit; a dispatch over it fails its attempt at once.
        engine_config.max_dispatch_bytes = max_payload;
        if config.limits.max_message_bytes > max_payload {
            tracing::warn!(
                limit = config.limits.max_message_bytes,
                max_payload,
                "limits.max_message_bytes is above the server's max_payload: larger commands and reports cannot reach the planner"
            );
        }
    }
    let (engine, timers) = Engine::new(Arc::new(store), Arc::new(publisher), engine_config);
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();

    let reports = ensure_streams(&config, &client).await?;
    health.streams_bound();
    {
        let engine = Arc::clone(&engine);
        health.on_scrape(move || {
            crate::metrics::sessions(engine.loaded_sessions(), engine.quarantined().len())
        });
    }
    let service = client
        .service_builder()
        .description("event-sourced task planner")
        .queue_group("planner")
        .start("planner", VERSION)
        .await
        .map_err(|e| anyhow::anyhow!("registering the micro-service: {e}"))?;
    let mut commands = service
        .endpoint_builder()
        .name("command")
        .add(subjects.commands())
        .await
        .map_err(|e| anyhow::anyhow!("adding the command endpoint: {e}"))?;
    let mut claims = service
        .endpoint_builder()
        .name("claim")
        .add(subjects.claims())
        .await
        .map_err(|e| anyhow::anyhow!("adding the claim endpoint: {e}"))?;
    let mut heartbeats = service
        .endpoint_builder()
        .name("heartbeat")
        .add(subjects.heartbeats())
        .await
        .map_err(|e| anyhow::anyhow!("adding the heartbeat endpoint: {e}"))?;
    // Every instance answers the operator for its own quarantine: a queue group of its own
    // (the service's id), so the request reaches them all, and the CLI gathers the replies.
    let instance = service.info().await.id;
    let mut admin = service
        .endpoint_builder()
        .name("quarantined")
        .queue_group(format!("planner-admin-{instance}"))
        .add(subjects.admin_quarantined())
        .await
        .map_err(|e| anyhow::anyhow!("adding the quarantined endpoint: {e}"))?;
    // Serving starts now; recovery runs beside it (its first pass at once), so one slow or
    // broken session delays nothing and stops nothing.
    tracing::info!(prefix = %config.subjects.prefix, store = ?config.store.kind, "planner-svc serving");

    tracker.spawn(timers.run(Arc::clone(&engine), token.clone()));
    {
        let engine = Arc::clone(&engine);
        let token = token.clone();
        let (client, subjects) = (client.clone(), subjects.clone());
        let every = Duration::from_secs(config.sessions.recovery_interval_s);
        let health = Arc::clone(&health);
        tracker.spawn(async move {
            let mut interval = tokio::time::interval(every);
            let mut first = true;
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = interval.tick() => {
                        if !first {
                            engine.sweep().await;
                        }
                        match engine.recover().await {
                            Ok(pass) => {
                                crate::metrics::recovery_pass(pass.recovered, pass.quarantined.len());
                                health.recovered();
                                if first || pass.recovered > 0 {
                                    tracing::info!(recovered = pass.recovered, failed = pass.failed, quarantined = pass.quarantined.len(), start_up = first, "recovery pass");
                                }
                                for (session, reason) in pass.quarantined {
                                    let notice = ErrorNotice {
                                        subject: subjects.events(&session),
                                        session: Some(session),
                                        error: ErrorBody::new(ErrorKind::Corrupt, format!("session quarantined: {reason}")),
                                    };
                                    let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
                                    let _ = client.publish(subjects.errors(), body).await;
                                }
                            }
                            Err(error) => tracing::warn!(%error, "recovery pass failed; the next one tries again"),
                        }
                        first = false;
                    }
                }
            }
        });
    }

    if config.metrics.check_interval_s > 0 {
        let engine = Arc::clone(&engine);
        let token = token.clone();
        let every = Duration::from_secs(config.metrics.check_interval_s);
        let batch = config.metrics.check_batch;
        tracker.spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.tick().await;
            let (mut cursor, mut problems) = (String::new(), std::collections::BTreeSet::new());
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = interval.tick() => {
                        let sessions = engine.loaded_session_ids();
                        cursor = crate::check::background_pass(engine.store().as_ref(), sessions, &cursor, batch, &mut problems).await;
                    }
                }
            }
        });
    }
    let admission = Arc::new(Semaphore::new(config.limits.max_requests_in_flight));
    let max_bytes = config.limits.max_message_bytes;
    // Reports have a pump of their own: waiting for a free report slot must never hold up
    // claims, heartbeats and commands. (It did, when one loop served all four: at
    // `reports.max_in_flight` every claim waited for a report to finish, and executors with it.)
    let intake = CancellationToken::new();
    let mut report_pump = tokio::spawn(pump_reports(
        reports,
        ReportPump {
            engine: Arc::clone(&engine),
            subjects: subjects.clone(),
            client: client.clone(),
            limits: Arc::new(Semaphore::new(config.reports.max_in_flight)),
            max_bytes,
            max_deliver: config.reports.max_deliver,
            tracker: tracker.clone(),
        },
        intake.clone(),
    ));
    let mut pump_ended = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = &mut report_pump => {
                // The consumer ended (it does not on a server restart): without reports no
                // plan moves on, so stop and let the supervisor restart the daemon.
                tracing::error!("the executor report consumer ended; shutting down");
                pump_ended = true;
                break;
            }
            request = commands.next() => {
                let Some(request) = request else { break };
                answer(Endpoint::Command, request, &admission, &tracker, &engine, &subjects, max_bytes);
            }
            request = claims.next() => {
                let Some(request) = request else { break };
                answer(Endpoint::Claim, request, &admission, &tracker, &engine, &subjects, max_bytes);
            }
            request = heartbeats.next() => {
                let Some(request) = request else { break };
                answer(Endpoint::Heartbeat, request, &admission, &tracker, &engine, &subjects, max_bytes);
            }
            request = admin.next() => {
                let Some(request) = request else { break };
                let reply = quarantine_reply(&engine, &instance, &request.message.payload, max_bytes);
                let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
                tracker.spawn(async move {
                    let _ = request.respond(Ok(body)).await;
                });
            }
        }
    }

    tracing::info!("shutting down: intake stopped, finishing in-flight work");
    health.draining();
    intake.cancel();
    if !pump_ended {
        let _ = report_pump.await;
    }
    let _ = commands.stop().await;
    let _ = claims.stop().await;
    let _ = heartbeats.stop().await;
    let _ = admin.stop().await;
    token.cancel();
    tracker.close();
    let grace = Duration::from_secs(config.shutdown.grace_s);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight work did not finish within the grace period"
        );
    }
    let _ = service.stop().await;
    client
        .drain()
        .await
        .context("draining the NATS connection")?;
    tracing::info!("stopped");
    Ok(())
}

/// What the report pump needs.
struct ReportPump<S> {
    engine: Arc<Engine<S, NatsPublisher>>,
    subjects: Subjects,
    client: async_nats::Client,
    /// `reports.max_in_flight` slots: past it, the pump pulls nothing more.
    limits: Arc<Semaphore>,
    max_bytes: usize,
    max_deliver: u64,
    tracker: TaskTracker,
}

/// Takes executor reports off the consumer, each handled in a task of its own within the
/// in-flight limit, until `intake` is cancelled or the consumer ends.
async fn pump_reports<S: EventStore>(
    mut reports: pull::Stream,
    pump: ReportPump<S>,
    intake: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            () = intake.cancelled() => return,
            permit = Arc::clone(&pump.limits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let message = tokio::select! {
            () = intake.cancelled() => return,
            message = reports.next() => match message {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    // Missed heartbeats while the server restarts; the stream recovers.
                    tracing::warn!(%error, "executor report stream error");
                    continue;
                }
                None => return,
            },
        };
        let (engine, subjects, client) = (
            Arc::clone(&pump.engine),
            pump.subjects.clone(),
            pump.client.clone(),
        );
        let (max_bytes, max_deliver) = (pump.max_bytes, pump.max_deliver);
        let context = crate::trace::context_of(message.headers.as_ref());
        pump.tracker.spawn(crate::trace::scope(context, async move {
            handle_report(&engine, &subjects, &client, message, max_bytes, max_deliver).await;
            drop(permit);
        }));
    }
}

async fn command_reply<S: EventStore>(
    engine: &Arc<Engine<S, NatsPublisher>>,
    subjects: &Subjects,
    subject: &str,
    payload: &[u8],
    max_bytes: usize,
) -> CommandReply {
    if payload.len() > max_bytes {
        return CommandReply::Error(ErrorBody::new(
            ErrorKind::TooLarge,
            format!(
                "the command is {} bytes, more than the limit of {max_bytes}",
                payload.len()
            ),
        ));
    }
    let Some(session) = subjects.session_of(subject, "cmd") else {
        return CommandReply::Error(ErrorBody::new(
            ErrorKind::BadSession,
            format!("no session in subject {subject}"),
        ));
    };
    let command = match ClientCommand::decode(payload) {
        Ok(command) => command,
        Err(refusal) => {
            tracing::warn!(session, kind = %refusal.kind, error = %refusal.message, "command refused at the edge");
            return CommandReply::Error(refusal);
        }
    };
    match engine
        .handle(session, command.into_command(engine.now()))
        .await
    {
        Ok(handled) => CommandReply::Ok {
            version: handled.version,
            events: handled.events,
        },
        Err(e) => {
            tracing::warn!(session, error = %e, kind = %e.kind(), "command refused");
            CommandReply::Error(ErrorBody::new(e.kind(), e.to_string()))
        }
    }
}

/// The reply to an operator's `{p}.admin.quarantined` request: this instance's quarantined
/// sessions, after lifting the one named by `release`.
fn quarantine_reply<S: EventStore>(
    engine: &Engine<S, NatsPublisher>,
    instance: &str,
    payload: &[u8],
    max_bytes: usize,
) -> QuarantineReply {
    if payload.len() > max_bytes {
        return QuarantineReply::Error(ErrorBody::new(
            ErrorKind::TooLarge,
            format!("the request is more than the limit of {max_bytes} bytes"),
        ));
    }
    // An empty body lists, as `{}` does.
    let request = if payload.iter().all(u8::is_ascii_whitespace) {
        QuarantineRequest::default()
    } else {
        match serde_json::from_slice::<QuarantineRequest>(payload) {
            Ok(request) => request,
            Err(error) => {
                return QuarantineReply::Error(ErrorBody::new(
                    ErrorKind::Malformed,
                    format!("not a quarantine request: {error}"),
                ))
            }
        }
    };
    let released = request.release.as_deref().map(|session| {
        let released = engine.release_quarantine(session);
        if released {
            tracing::info!(
                session,
                "quarantine lifted by an operator; the next recovery pass loads the session again"
            );
        }
        released
    });
    QuarantineReply::Ok {
        instance: instance.to_owned(),
        released,
        sessions: engine.quarantined(),
    }
}

/// What becomes of one executor report.
enum ReportOutcome {
    /// Applied (or a recognised duplicate): ack.
    Done,
    /// It may pass later: nak with a delay, for redelivery (or, past `reports.max_deliver`,
    /// to the dead-letter stream), with why it failed.
    Retry(String),
    /// It would fail the same way again: terminate it and say so on the errors subject.
    Refused(ErrorNotice),
}

async fn handle_report<S: EventStore>(
    engine: &Arc<Engine<S, NatsPublisher>>,
    subjects: &Subjects,
    client: &async_nats::Client,
    message: async_nats::jetstream::Message,
    max_bytes: usize,
    max_deliver: u64,
) {
    let subject = message.subject.to_string();
    let session = subjects.session_of(&subject, "report").map(str::to_owned);
    let refuse = |kind: ErrorKind, text: String| {
        ReportOutcome::Refused(ErrorNotice {
            subject: subject.clone(),
            session: session.clone(),
            error: ErrorBody::new(kind, text),
        })
    };
    let outcome = 'judge: {
        if message.payload.len() > max_bytes {
            break 'judge refuse(
                ErrorKind::TooLarge,
                format!(
                    "report of {} bytes, limit {max_bytes}",
                    message.payload.len()
                ),
            );
        }
        let Some(session) = session.as_deref() else {
            break 'judge refuse(ErrorKind::BadSession, "no session in subject".into());
        };
        let ReportMessage { event, lease } = match serde_json::from_slice(&message.payload) {
            Ok(report) => report,
            Err(e) => {
                break 'judge refuse(ErrorKind::Malformed, format!("not an executor report: {e}"))
            }
        };
        let task = event.task_id.clone();
        let command = Command::HandleExecutorEvent {
            event,
            lease,
            now: engine.now(),
        };
        match engine.handle(session, command).await {
            Ok(_) => ReportOutcome::Done,
            Err(e) => match e.disposition() {
                Disposition::Reject => {
                    tracing::warn!(session, task = %task, error = %e, "executor report refused");
                    refuse(e.kind(), e.to_string())
                }
                Disposition::Retry => {
                    tracing::warn!(session, task = %task, error = %e, "executor report not processed; will be redelivered");
                    ReportOutcome::Retry(e.to_string())
                }
            },
        }
    };
    match outcome {
        ReportOutcome::Done => {
            crate::metrics::report("applied");
            if let Err(error) = message.ack().await {
                tracing::warn!(%error, "could not acknowledge a report; it will be redelivered and ignored as a duplicate");
            }
        }
        ReportOutcome::Retry(reason) => {
            crate::metrics::report("retried");
            let deliveries = message.info().map_or(0, |info| info.delivered);
            let dead = u64::try_from(deliveries).unwrap_or(0) >= max_deliver;
            if dead
                && dead_letter(
                    client,
                    subjects,
                    &subject,
                    session.as_deref(),
                    &message,
                    &reason,
                    deliveries,
                )
                .await
            {
                let _ = message.ack_with(AckKind::Term).await;
            } else {
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
        ReportOutcome::Refused(notice) => {
            crate::metrics::report("refused");
            // Bad input is terminated, not redelivered: it would fail the same way again.
            let _ = message.ack_with(AckKind::Term).await;
            let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
            let _ = client.publish(subjects.errors(), body).await;
        }
    }
}

/// Which lease request an endpoint serves.
#[derive(Clone, Copy)]
enum LeaseRequest {
    Claim,
    Heartbeat,
}

/// Claims and heartbeats: the executor learns whether the attempt is (still) its to run.
async fn lease_reply<S: EventStore>(
    engine: &Arc<Engine<S, NatsPublisher>>,
    subjects: &Subjects,
    subject: &str,
    payload: &[u8],
    max_bytes: usize,
    kind: LeaseRequest,
) -> LeaseReply {
    let refuse = |kind, message: String| LeaseReply::Error(ErrorBody::new(kind, message));
    if payload.len() > max_bytes {
        return refuse(
            ErrorKind::TooLarge,
            format!("{} bytes, limit {max_bytes}", payload.len()),
        );
    }
    let (endpoint, what) = match kind {
        LeaseRequest::Claim => ("claim", "a claim"),
        LeaseRequest::Heartbeat => ("heartbeat", "a heartbeat"),
    };
    let Some(session) = subjects.session_of(subject, endpoint) else {
        return refuse(
            ErrorKind::BadSession,
            format!("no session in subject {subject}"),
        );
    };
    let now = engine.now();
    let (command, granted) = match kind {
        LeaseRequest::Claim => match serde_json::from_slice::<ClaimRequest>(payload) {
            Ok(claim) => {
                if let Some(problem) = claim.claim_id_problem() {
                    return refuse(ErrorKind::Malformed, problem);
                }
                // Lease tokens are ids: the executor's claim id, so that a retried claim is
                // the same claim, or one made here; either way recorded in the core's event.
                let lease = claim
                    .claim_id
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                let command = Command::ClaimAttempt {
                    task_id: claim.task_id,
                    attempt: claim.attempt,
                    lease: lease.clone(),
                    now,
                };
                (
                    command,
                    LeaseReply::Granted {
                        lease,
                        heartbeat_interval_ms: None,
                    },
                )
            }
            Err(e) => return refuse(ErrorKind::Malformed, format!("not {what}: {e}")),
        },
        LeaseRequest::Heartbeat => match serde_json::from_slice::<HeartbeatRequest>(payload) {
            Ok(beat) => (
                Command::Heartbeat {
                    task_id: beat.task_id,
                    attempt: beat.attempt,
                    lease: beat.lease,
                    now,
                },
                LeaseReply::Alive,
            ),
            Err(e) => return refuse(ErrorKind::Malformed, format!("not {what}: {e}")),
        },
    };
    match engine.handle(session, command).await {
        Ok(handled) => match granted {
            // Three beats per timeout: one lost or late beat never costs the lease.
            LeaseReply::Granted { lease, .. } => LeaseReply::Granted {
                lease,
                heartbeat_interval_ms: handled
                    .lease_terms
                    .and_then(|t| t.heartbeat_timeout_ms)
                    .map(|timeout| (timeout / 3).max(1)),
            },
            other => other,
        },
        Err(EngineError::Rejected(refusal)) => {
            let reason = match &refusal {
                planner_core::Error::Fenced { reason, .. } => *reason,
                // The plan ended, or the attempt is unknown here: nothing to run either way.
                _ => FenceReason::NotRunning,
            };
            tracing::info!(session, %refusal, "{what} fenced");
            LeaseReply::Stop {
                reason,
                message: refusal.to_string(),
            }
        }
        Err(e) => {
            tracing::warn!(session, error = %e, "{what} not handled");
            refuse(e.kind(), e.to_string())
        }
    }
}

/// Keeps a report that failed `deliveries` times for a reason that could pass in the
/// dead-letter stream (the original body, with the reason and its subject in headers), and
/// says so on the errors subject. True once the dead-letter stream acknowledged it: only then
/// may the report be dropped from the report stream.
async fn dead_letter(
    client: &async_nats::Client,
    subjects: &Subjects,
    subject: &str,
    session: Option<&str>,
    message: &async_nats::jetstream::Message,
    reason: &str,
    deliveries: i64,
) -> bool {
    let js = async_nats::jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Planner-Dead-Reason", reason);
    headers.insert("Planner-Dead-Subject", subject);
    headers.insert("Planner-Deliveries", deliveries.to_string().as_str());
    let target = subjects.dead_report(session.unwrap_or("unknown"));
    let stored = match js
        .publish_with_headers(target.clone(), headers, message.payload.clone())
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if !stored {
        tracing::warn!(
            subject,
            "could not dead-letter a report; it will come again"
        );
        return false;
    }
    tracing::error!(subject, deliveries, reason, dead_letter = %target, "report dead-lettered after repeated failures");
    crate::metrics::dead_letter();
    let notice = ErrorNotice {
        subject: subject.to_owned(),
        session: session.map(str::to_owned),
        error: ErrorBody::new(
            ErrorKind::Unavailable,
            format!("dead-lettered to {target} after {deliveries} deliveries: {reason}"),
        ),
    };
    let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
    let _ = client.publish(subjects.errors(), body).await;
    true
}

/// The request/reply endpoints clients and executors call.
#[derive(Clone, Copy)]
enum Endpoint {
    Command,
    Claim,
    Heartbeat,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Command => "command",
            Endpoint::Claim => "claim",
            Endpoint::Heartbeat => "heartbeat",
        }
    }

    /// The reply for a refusal before the request is looked at.
    fn refusal(self, body: ErrorBody) -> Bytes {
        let json = match self {
            Endpoint::Command => serde_json::to_vec(&CommandReply::Error(body)),
            Endpoint::Claim | Endpoint::Heartbeat => serde_json::to_vec(&LeaseReply::Error(body)),
        };
        Bytes::from(json.unwrap_or_default())
    }
}

/// Answers one request in a task of its own, within the admission limit (past it: `busy` at
/// once, without queueing).
fn answer<S: EventStore>(
    endpoint: Endpoint,
    request: async_nats::service::Request,
    admission: &Arc<Semaphore>,
    tracker: &TaskTracker,
    engine: &Arc<Engine<S, NatsPublisher>>,
    subjects: &Subjects,
    max_bytes: usize,
) {
    let (engine, subjects) = (Arc::clone(engine), subjects.clone());
    let Ok(permit) = Arc::clone(admission).try_acquire_owned() else {
        crate::metrics::busy(endpoint.name());
        tracing::warn!(
            request = endpoint.name(),
            "at limits.max_requests_in_flight; answered busy"
        );
        tracker.spawn(async move {
            let _ = request.respond(Ok(endpoint.refusal(busy()))).await;
        });
        return;
    };
    let context = crate::trace::context_of(request.message.headers.as_ref());
    tracker.spawn(crate::trace::scope(context, async move {
        let (subject, payload) = (&request.message.subject, &request.message.payload);
        let body = match endpoint {
            Endpoint::Command => {
                let reply = command_reply(&engine, &subjects, subject, payload, max_bytes).await;
                serde_json::to_vec(&reply)
            }
            Endpoint::Claim => {
                let kind = LeaseRequest::Claim;
                let reply =
                    lease_reply(&engine, &subjects, subject, payload, max_bytes, kind).await;
                serde_json::to_vec(&reply)
            }
            Endpoint::Heartbeat => {
                let kind = LeaseRequest::Heartbeat;
                let reply =
                    lease_reply(&engine, &subjects, subject, payload, max_bytes, kind).await;
                serde_json::to_vec(&reply)
            }
        };
        drop(permit);
        if let Err(error) = request
            .respond(Ok(Bytes::from(body.unwrap_or_default())))
            .await
        {
            tracing::warn!(%error, endpoint = endpoint.name(), "could not send a reply");
        }
    }));
}

fn busy() -> ErrorBody {
    ErrorBody::new(
        ErrorKind::Busy,
        "this instance is handling as many requests as it admits (limits.max_requests_in_flight): retry shortly",
    )
}
