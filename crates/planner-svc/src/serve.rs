//! `planner-svc serve`: the daemon on NATS.
//!
//! - Commands: the micro-service `planner`, endpoint `command` on `{p}.cmd.*` (queue group
//!   `planner`, so several instances share them; `$SRV.PING|INFO|STATS` work).
//! - Executor reports: captured by the JetStream stream `PLANNER_REPORTS` on `{p}.report.*`,
//!   which files each under its session's partition (`{p}.report.<n>.<session>`, a subject
//!   transform); each partition is consumed through a durable pull consumer of its own
//!   (`planner-svc-<n>`) by the instance that leases it (`ownership.rs`); reports acknowledged
//!   only after the events they cause are persisted (and what those carry published). The
//!   shared consumer of old (`planner-svc`) drains reports stored before partitioning.
//! - Direct reports: endpoint `result` on `{p}.result.*` (request/reply, not captured by the
//!   report stream): a report applied at once and answered `ok` only after the events it
//!   causes are persisted, `refused`, or `retry` (then the executor publishes it to the stream).
//!   The same checks as a report from the stream ([`judge_report`]); a report that comes both
//!   ways is applied once (the core ignores the second).
//! - Ownership: commands, claims, heartbeats and direct reports for a session another
//!   instance owns are forwarded to it on `{p}.fwd.<instance>.<subject>`, as requests of the
//!   forwarder's own, which relays the answer to the client and answers itself when the owner
//!   is gone (see `Router`: in transit, to the next owner; at most two hops).
//! - Dispatches: published into the work-queue stream `PLANNER_TASKS` on
//!   `{p}.task.{kind}.{target}`; an executor pool pulls from its own filtered consumer, so a task
//!   reaches one executor of a pool, and waits while none is online.
//! - Operators: endpoints `quarantined` on `{p}.admin.quarantined` and `ownership` on
//!   `{p}.admin.ownership`, in a queue group of each instance's own, so every instance answers
//!   for the sessions it quarantined and the partitions it serves.
//! - Questions and cancellations on core subjects; the event log is the JetStream store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
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
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::bus::NatsPublisher;
use crate::config::{Config, FsyncSetting, StoreKind};
use crate::engine::{Disposition, Engine, EngineConfig, EngineError, Llm};
use crate::ownership::{Leases, Round};
use crate::partition::{Answering, Partitions, Route};
use crate::protocol::{
    ClaimRequest, ClientCommand, CommandReply, ErrorBody, ErrorKind, ErrorNotice, HeartbeatRequest,
    LeaseReply, OwnershipReply, QuarantineReply, QuarantineRequest, ReportMessage, ReportReply,
    Subjects,
};
use crate::startup::{patiently, Misconfigured, PublishDenials};

/// The daemon's version, reported to `$SRV.INFO`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Connects to NATS, waiting for it up to `nats.startup_wait_s` with a growing delay and a log
/// line per attempt: a daemon started with (or just before) its server, or during a server
/// restart, must not exit (under an orchestrator that is a crash loop).
async fn connect_patiently(
    config: &Config,
    denials: &Denials,
) -> anyhow::Result<async_nats::Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.nats.startup_wait_s);
    let mut delay = Duration::from_millis(250);
    loop {
        match connect_watching(config, Some(denials.clone())).await {
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

/// Where the connection's event callback sends what the server refused: the subscriptions
/// (the daemon cannot serve without them) and the last publish (a start-up step it refused
/// only times out: this says why).
#[derive(Clone)]
struct Denials {
    subscriptions: tokio::sync::mpsc::UnboundedSender<String>,
    publishes: PublishDenials,
}

/// Connects to NATS as configured. The connection's events are logged: the server's errors
/// (a permissions violation among them) at ERROR or WARN, the rest at INFO.
pub async fn connect(config: &Config) -> anyhow::Result<async_nats::Client> {
    connect_watching(config, None).await
}

/// The server's refusal of a `what` ("subscription" or "publish"): `Permissions Violation for
/// Subscription to "<subject>"` is what the daemon cannot serve without.
fn permission_denial<'a>(event: &'a async_nats::Event, what: &str) -> Option<&'a str> {
    match event {
        async_nats::Event::ServerError(async_nats::ServerError::Other(text))
            if text
                .to_lowercase()
                .starts_with(&format!("permissions violation for {what}")) =>
        {
            Some(text)
        }
        _ => None,
    }
}

fn log_event(event: &async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::ServerError(error) => {
            let text = error.to_string();
            if text.to_lowercase().contains("permissions violation") {
                tracing::error!(%error, "the NATS server refused a subject to this user; check its permissions");
            } else {
                tracing::warn!(%error, "NATS server error");
            }
        }
        Event::ClientError(error) => tracing::warn!(%error, "NATS client error"),
        Event::SlowConsumer(_) => tracing::warn!(%event, "nats connection event"),
        _ => tracing::info!(%event, "nats connection event"),
    }
}

async fn connect_watching(
    config: &Config,
    denials: Option<Denials>,
) -> anyhow::Result<async_nats::Client> {
    let nats = &config.nats;
    let mut options = async_nats::ConnectOptions::new()
        .name(&nats.name)
        .connection_timeout(Duration::from_millis(nats.connect_timeout_ms))
        .request_timeout(Some(config.request_timeout()))
        .event_callback(move |event| {
            let denials = denials.clone();
            async move {
                log_event(&event);
                if let Some(denials) = denials {
                    if let Some(denied) = permission_denial(&event, "subscription") {
                        let _ = denials.subscriptions.send(denied.to_owned());
                    } else if let Some(denied) = permission_denial(&event, "publish") {
                        denials.publishes.record(denied);
                    }
                }
            }
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
        inline_context_bytes: config.dispatch.inline_context_bytes,
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
    let (subscriptions, denied) = tokio::sync::mpsc::unbounded_channel();
    let publishes = PublishDenials::default();
    let denials = Denials {
        subscriptions,
        publishes: publishes.clone(),
    };
    crate::trace::set_enabled(config.metrics.trace_context);
    // Live (and not ready) from here on, while NATS is waited for.
    let admin = crate::health::start(&config.metrics, &config.metrics.listen, "serve").await;
    let client = tokio::select! {
        client = connect_patiently(&config, &denials) => client?,
        () = &mut shutdown => return Ok(()),
    };
    admin.health.connected(&client);
    let health = Arc::clone(&admin.health);
    let run = Run {
        config,
        client,
        denied,
        publishes,
        health,
    };
    let config = &run.config;
    match config.store.kind {
        StoreKind::Jetstream => {
            let store_config = JetStreamConfig {
                stream_name: config.store.stream_name.clone(),
                subject_prefix: Subjects::new(&config.subjects.prefix).events_prefix(),
                snapshot_bucket: config.store.snapshot_bucket.clone(),
                storage: StorageType::File,
                replicas: config.store.replicas,
                max_bytes: config.store.max_bytes,
                max_message_bytes: i32::try_from(config.store.max_append_bytes).unwrap_or(i32::MAX),
                ..JetStreamConfig::default()
            };
            let store = patiently(
                config,
                &run.publishes,
                "opening the JetStream event store",
                || JetStreamStore::connect(run.client.clone(), store_config.clone()),
            )
            .await?;
            run_with(run, store, shutdown).await
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
            run_with(run, store, shutdown).await
        }
        StoreKind::Memory => run_with(run, MemoryStore::new(), shutdown).await,
    }
}

/// The streams the daemon uses, created or brought up to date; the report stream and the
/// legacy shared consumer's messages (reports stored before partitioning, or all of them with
/// ownership off).
async fn ensure_streams(
    config: &Config,
    client: &async_nats::Client,
) -> anyhow::Result<(stream::Stream, pull::Stream)> {
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
    // With ownership, the stream files each report under its session's partition
    // (`{p}.report.<n>.<session>`, computed by the server), so that each partition's consumer
    // sees only its own; executors keep publishing to `{p}.report.<session>`.
    let transform = config.ownership.enabled.then(|| stream::SubjectTransform {
        source: subjects.reports(),
        destination: subjects.report_transform_destination(config.ownership.partitions),
    });
    let mut reports = js
        .get_or_create_stream(stream::Config {
            name: config.reports.stream_name.clone(),
            subjects: vec![subjects.reports()],
            storage: StorageType::File,
            num_replicas: config.reports.replicas,
            max_age: Duration::from_secs(config.reports.max_age_days * 86_400),
            max_message_size: i32::try_from(config.limits.max_message_bytes).unwrap_or(i32::MAX),
            subject_transform: transform.clone(),
            ..Default::default()
        })
        .await
        .context("creating the reports stream")?;
    let existing = reports
        .info()
        .await
        .context("reading the reports stream")?
        .config
        .clone();
    match (&existing.subject_transform, &transform) {
        (Some(have), Some(want)) if have.destination != want.destination => {
            return Err(Misconfigured(format!(
                "the reports stream {} partitions reports as {:?}, not {:?}: ownership.partitions must not change for a deployment (set it back)",
                config.reports.stream_name,
                have.destination,
                want.destination
            ))
            .into())
        }
        (Some(have), None) => {
            return Err(Misconfigured(format!(
                "the reports stream {} partitions reports ({:?}): ownership.enabled = false cannot read them; enable ownership again",
                config.reports.stream_name,
                have.destination
            ))
            .into())
        }
        (None, Some(_)) => {
            // A stream from before ownership: add the transform. Reports stored until now keep
            // their subjects and go through the legacy consumer below.
            tracing::info!(
                stream = %config.reports.stream_name,
                "partitioning the reports stream (adding its subject transform)"
            );
            js.update_stream(stream::Config {
                subject_transform: transform,
                ..existing
            })
            .await
            .context("adding the subject transform to the reports stream")?;
            reports = js
                .get_stream(&config.reports.stream_name)
                .await
                .context("reading the reports stream")?;
        }
        _ => {}
    }
    // Created or updated: a consumer an older version made (or made with other settings)
    // takes this configuration's `reports.ack_wait_s` and limits, rather than keeping its own.
    let consumer = reports
        .create_consumer(pull::Config {
            durable_name: Some(config.reports.consumer.clone()),
            filter_subject: subjects.reports(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(config.reports.ack_wait_s),
            max_ack_pending: i64::try_from(config.reports.max_in_flight * 4).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await
        .context("creating the reports consumer")?;
    let legacy = crate::bus::pull_messages(&consumer, 64)
        .await
        .context("subscribing to executor reports")?;
    Ok((reports, legacy))
}

/// A connected daemon, before its store is open.
struct Run {
    config: Config,
    client: async_nats::Client,
    /// The subscriptions the server refused (from the connection's event callback).
    denied: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// The publishes it refused.
    publishes: PublishDenials,
    /// What `/readyz` answers from.
    health: Arc<crate::health::Health>,
}

/// How long the server has, after a round trip that follows the daemon's subscriptions, to
/// have refused one of them: the refusal arrives before the round trip's reply, and this only
/// covers the hop from the client's reader to its event callback.
const DENIAL_SETTLE: Duration = Duration::from_millis(250);

/// What shutdown may take beyond `shutdown.grace_s` (stopping the endpoints and the report
/// pump before the grace period, the micro-service and the drain after it), so the process
/// always ends.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

/// The daemon cannot serve without a subject the server refused it.
fn denied_error(denial: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the NATS server refused a subscription the daemon needs ({denial}); allow it in the \
         permissions of the daemon's NATS user (deploy/nats/nats-server.conf, user planner)"
    )
}

async fn run_with<S: EventStore>(
    run: Run,
    store: S,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let Run {
        config,
        client,
        mut denied,
        publishes,
        health,
    } = run;
    let subjects = Subjects::new(&config.subjects.prefix);
    let ownership = &config.ownership;
    // This instance's name in the lease bucket, on the forwarding subjects, and on its
    // dispatches.
    let instance = if ownership.instance_id.is_empty() {
        uuid::Uuid::new_v4().simple().to_string()
    } else {
        ownership.instance_id.clone()
    };
    let mut publisher = NatsPublisher::new(client.clone(), subjects.clone());
    if config.dispatch.offers {
        publisher = publisher
            .offering(Duration::from_millis(config.dispatch.offer_timeout_ms))
            .await?;
    }
    if ownership.enabled {
        publisher = publisher.owned_by(instance.clone());
    }
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
    let partitions = if ownership.enabled {
        Partitions::new(ownership.partitions)
    } else {
        Partitions::all_owned(ownership.partitions)
    };
    // Dropped with this future (a stop, or a task aborted as a crash): its timers and
    // recovery passes, which may outlive it, leave every session to the new owners.
    let _disown = Disown(Arc::clone(&partitions));
    if ownership.enabled {
        engine_config.scope = Some(Arc::clone(&partitions));
    }
    let publisher = Arc::new(publisher);
    let (engine, timers) = Engine::new(Arc::new(store), Arc::clone(&publisher), engine_config);
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();

    // Bound before serving starts: a taken port is a start-up error, not a warning later.
    let http_stop = CancellationToken::new();
    let _stop_http = http_stop.clone().drop_guard();
    if config.http.enabled {
        let (addr, listener) = crate::http::bind(&config.http).await?;
        tracing::info!(%addr, "HTTP API and console listening");
        let (engine, http, stop) = (Arc::clone(&engine), config.http.clone(), http_stop.clone());
        tracker.spawn(async move {
            if let Err(error) = crate::http::serve_on(listener, engine, http, stop).await {
                tracing::error!(error = %crate::report(&error), "the HTTP API stopped");
            }
        });
    }

    let (report_stream, legacy_reports) =
        patiently(&config, &publishes, "creating the daemon's streams", || {
            ensure_streams(&config, &client)
        })
        .await?;
    health.streams_bound();
    {
        let engine = Arc::clone(&engine);
        health.on_scrape(move || {
            crate::metrics::sessions(engine.loaded_sessions(), engine.quarantined().len())
        });
    }
    let admission = Arc::new(Semaphore::new(config.limits.max_requests_in_flight));
    let max_bytes = config.limits.max_message_bytes;
    let report_pump = Arc::new(ReportPump {
        engine: Arc::clone(&engine),
        subjects: subjects.clone(),
        client: client.clone(),
        limits: Arc::new(Semaphore::new(config.reports.max_in_flight)),
        max_bytes,
        max_deliver: config.reports.max_deliver,
        tracker: tracker.clone(),
    });
    let router = Arc::new(Router {
        enabled: ownership.enabled,
        me: instance.clone(),
        partitions: Arc::clone(&partitions),
        subjects: subjects.clone(),
        client: client.clone(),
        forwarded: AtomicU64::new(0),
        timeout: config.request_timeout(),
    });
    let recover_now = Arc::new(tokio::sync::Notify::new());
    // Leases first: a single instance takes every partition before it serves, as before.
    let ownership_stop = CancellationToken::new();
    let mut ownership_task = if ownership.enabled {
        // A connection of its own: under saturation the main one queues thousands of
        // publishes and acks, and lease refreshes waiting behind them outlasted the TTL
        // (measured: every lease of two instances expired mid-run, again and again).
        let lease_client = connect(&config)
            .await
            .context("connecting for the partition leases")?;
        let js = async_nats::jetstream::new(lease_client);
        let mut leases =
            Leases::open(&js, ownership, instance.clone(), Arc::clone(&partitions)).await?;
        let mut owned = Owned {
            partitions: Arc::clone(&partitions),
            pumps: BTreeMap::new(),
            pending: BTreeSet::new(),
            engine: Arc::clone(&engine),
            report_pump: Arc::clone(&report_pump),
            reports: report_stream,
            config: config.clone(),
            recover_now: Arc::clone(&recover_now),
        };
        match leases.round(true).await {
            Ok(round) => owned.apply(&mut leases, round).await,
            Err(error) => {
                tracing::warn!(error = %crate::report(&error), "first lease round failed; retrying")
            }
        }
        tracing::info!(instance = %instance, partitions = ?leases.held(), "partition leases");
        Some(AbortOnDropHandle::new(tokio::spawn(run_leases(
            leases,
            owned,
            ownership_stop.clone(),
        ))))
    } else {
        drop(report_stream);
        None
    };

    // The micro-service starts after the first lease round: once it answers a ping, the
    // instance serves (with one instance, every partition).
    let service = client
        .service_builder()
        .description("event-sourced task planner")
        .queue_group("planner")
        .start("planner", VERSION)
        .await
        .map_err(|e| anyhow::anyhow!("registering the micro-service: {e}"))?;
    // Every instance answers the operator for its own quarantine: a queue group of its own
    // (the service's id), so the request reaches them all, and the CLI gathers the replies.
    let service_id = service.info().await.id;
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
    // Reports sent directly (request/reply): answered once applied; the stream is the fallback.
    let mut results = service
        .endpoint_builder()
        .name("result")
        .add(subjects.results())
        .await
        .map_err(|e| anyhow::anyhow!("adding the result endpoint: {e}"))?;
    let mut admin = service
        .endpoint_builder()
        .name("quarantined")
        .queue_group(format!("planner-admin-{service_id}"))
        .add(subjects.admin_quarantined())
        .await
        .map_err(|e| anyhow::anyhow!("adding the quarantined endpoint: {e}"))?;
    let mut admin_ownership = service
        .endpoint_builder()
        .name("ownership")
        .queue_group(format!("planner-admin-{service_id}"))
        .add(subjects.admin_ownership())
        .await
        .map_err(|e| anyhow::anyhow!("adding the ownership endpoint: {e}"))?;
    // Requests other instances forward here, for sessions this one owns.
    let mut forwarded = client
        .subscribe(subjects.forwarded(&instance))
        .await
        .context("subscribing to forwarded requests")?;
    // A subscription the server refuses is refused after the fact (the client does not wait
    // for the server to accept a SUB): one round trip, then the refusals it flushed out. The
    // daemon cannot serve without its subjects, so a refusal is the end of its start-up.
    client
        .flush()
        .await
        .context("checking the daemon's subscriptions with the NATS server")?;
    if let Ok(Some(denial)) = tokio::time::timeout(DENIAL_SETTLE, denied.recv()).await {
        return Err(denied_error(&denial));
    }
    // Serving starts now; recovery runs beside it (its first pass at once), so one slow or
    // broken session delays nothing and stops nothing.
    tracing::info!(prefix = %config.subjects.prefix, store = ?config.store.kind, instance = %instance, "planner-svc serving");

    tracker.spawn(timers.run(Arc::clone(&engine), token.clone()));
    {
        let (engine, token) = (Arc::clone(&engine), token.clone());
        tracker.spawn(async move {
            let mut interval = tokio::time::interval(crate::engine::OUTBOX_RETRY);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = interval.tick() => engine.retry_unpublished().await,
                }
            }
        });
    }
    {
        let engine = Arc::clone(&engine);
        let token = token.clone();
        let (client, subjects) = (client.clone(), subjects.clone());
        let every = Duration::from_secs(config.sessions.recovery_interval_s);
        let recover_now = Arc::clone(&recover_now);
        let health = Arc::clone(&health);
        tracker.spawn(async move {
            let mut interval = tokio::time::interval(every);
            let mut first = true;
            loop {
                let periodic = tokio::select! {
                    () = token.cancelled() => return,
                    _ = interval.tick() => true,
                    // Partitions acquired: recover their sessions now.
                    () = recover_now.notified() => false,
                };
                if periodic && !first {
                    engine.sweep().await;
                }
                match engine.recover().await {
                    Ok(pass) => {
                        crate::metrics::recovery_pass(pass.recovered, pass.quarantined.len());
                        health.recovered();
                        if first || pass.recovered > 0 {
                            tracing::info!(
                                recovered = pass.recovered,
                                failed = pass.failed,
                                quarantined = pass.quarantined.len(),
                                start_up = first,
                                "recovery pass"
                            );
                        }
                        for (session, reason) in pass.quarantined {
                            let notice = ErrorNotice {
                                subject: subjects.events(&session),
                                session: Some(session),
                                error: ErrorBody::new(
                                    ErrorKind::Corrupt,
                                    format!("session quarantined: {reason}"),
                                ),
                            };
                            let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
                            let _ = client.publish(subjects.errors(), body).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "recovery pass failed; the next one tries again")
                    }
                }
                first = false;
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
    // Reports have a pump of their own: waiting for a free report slot must never hold up
    // claims, heartbeats and commands. (It did, when one loop served all four: at
    // `reports.max_in_flight` every claim waited for a report to finish, and executors with it.)
    // This one drains the shared consumer: every report with ownership off, and with it on
    // the reports stored before the stream was partitioned.
    let intake = CancellationToken::new();
    let mut report_pump_task = tokio::spawn(pump_reports(
        legacy_reports,
        Arc::clone(&report_pump),
        intake.clone(),
    ));
    let site = Site {
        admission: Arc::clone(&admission),
        tracker: tracker.clone(),
        engine: Arc::clone(&engine),
        router: Arc::clone(&router),
        max_bytes,
    };
    let mut pump_ended = false;
    let mut failure = None;
    let mut leases_ended = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(denial) = denied.recv() => {
                // Refused later (a reconnect to a server with other permissions): the same end.
                failure = Some(denied_error(&denial));
                tracing::error!("a subscription the daemon needs was refused; shutting down");
                break;
            }
                        _ = &mut report_pump_task => {
                // The consumer ended (it does not on a server restart): without reports no
                // plan moves on, so stop and let the supervisor restart the daemon.
                tracing::error!("the executor report consumer ended; shutting down");
                pump_ended = true;
                break;
            }
            _ = async { ownership_task.as_mut()?.await.ok() }, if ownership_task.is_some() && !leases_ended => {
                tracing::error!("the partition lease loop ended; shutting down");
                leases_ended = true;
                break;
            }
            request = commands.next() => {
                let Some(request) = request else { break };
                answer(Endpoint::Command, Incoming::from(request), &site);
            }
            request = claims.next() => {
                let Some(request) = request else { break };
                answer(Endpoint::Claim, Incoming::from(request), &site);
            }
            request = heartbeats.next() => {
                let Some(request) = request else { break };
                answer(Endpoint::Heartbeat, Incoming::from(request), &site);
            }
            request = results.next() => {
                let Some(request) = request else { break };
                answer(Endpoint::Result, Incoming::from(request), &site);
            }
            message = forwarded.next() => {
                let Some(message) = message else { break };
                let Some(original) = subjects.unforward(&instance, &message.subject).map(str::to_owned) else { continue };
                let Some(endpoint) = Endpoint::of(&subjects, &original) else { continue };
                let incoming = Incoming { subject: original, payload: message.payload, reply: message.reply, headers: message.headers, forwarded: true };
                answer(endpoint, incoming, &site);
            }
            request = admin.next() => {
                let Some(request) = request else { break };
                let reply = quarantine_reply(&engine, &service_id, &request.message.payload, max_bytes);
                let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
                tracker.spawn(async move {
                    let _ = request.respond(Ok(body)).await;
                });
            }
            request = admin_ownership.next() => {
                let Some(request) = request else { break };
                let stats = engine.stats();
                let reply = OwnershipReply {
                    instance: instance.clone(),
                    enabled: router.enabled,
                    partitions: partitions.owned(),
                    of: partitions.count(),
                    loads: stats.loads,
                    conflicts: stats.conflicts,
                    forwarded: router.forwarded.load(Ordering::Relaxed),
                };
                let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
                tracker.spawn(async move {
                    let _ = request.respond(Ok(body)).await;
                });
            }
        }
    }

    tracing::info!("shutting down: intake stopped, finishing in-flight work");
    health.draining();
    // Partitions first, while requests are still answered: their reports drained, their
    // leases deleted, so the other instances take them over at once rather than after the TTL.
    ownership_stop.cancel();
    if let Some(task) = ownership_task.as_mut() {
        if !leases_ended {
            let grace = Duration::from_secs(config.shutdown.grace_s);
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!(
                    "handing partitions over did not finish within the grace period; they expire"
                );
            }
        }
    }
    let grace = Duration::from_secs(config.shutdown.grace_s);
    let stopping = async {
        intake.cancel();
        http_stop.cancel();
        if !pump_ended {
            let _ = report_pump_task.await;
        }
        let _ = commands.stop().await;
        let _ = claims.stop().await;
        let _ = heartbeats.stop().await;
        let _ = results.stop().await;
        let _ = admin.stop().await;
        let _ = admin_ownership.stop().await;
        let _ = forwarded.unsubscribe().await;
        // Claims are no longer served: offers waiting for one go to the stream now.
        publisher.stop_offering();
        token.cancel();
        tracker.close();
        let confirmations = engine.confirmations().clone();
        confirmations.close();
        let settled = async {
            tracker.wait().await;
            confirmations.wait().await;
        };
        if tokio::time::timeout(grace, settled).await.is_err() {
            tracing::warn!(
                ?grace,
                "in-flight work did not finish within the grace period"
            );
        }
        let _ = service.stop().await;
        client.drain().await.context("draining the NATS connection")
    };
    // Every step above waits on the server or on tasks: however they hang, the daemon ends.
    match tokio::time::timeout(grace + SHUTDOWN_SLACK, stopping).await {
        Ok(drained) => drained?,
        Err(_) => tracing::warn!(
            bound = ?(grace + SHUTDOWN_SLACK),
            "shutdown did not finish within shutdown.grace_s and its slack; stopping anyway"
        ),
    }
    match failure {
        Some(failure) => Err(failure),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Clears the partitions served when the daemon's future ends, however it ends.
struct Disown(Arc<Partitions>);

impl Drop for Disown {
    fn drop(&mut self) {
        self.0.disown_all();
    }
}

/// Where a request goes: the instance that owns its session's partition, if another one.
struct Router {
    enabled: bool,
    me: String,
    partitions: Arc<Partitions>,
    subjects: Subjects,
    client: async_nats::Client,
    forwarded: AtomicU64,
    /// How long a forwarded request waits for the owner's answer (`nats.request_timeout_ms`,
    /// what clients wait by default).
    timeout: Duration,
}

impl Router {
    /// The instance to forward `incoming` to, when another one owns its session, or takes it
    /// next while it is in transit ([`Partitions::forward_to`]). A request forwarded here that
    /// this instance neither serves nor hands over (the sender's owner table was behind, as
    /// happens for a moment after a handover) goes on once more, marked
    /// ([`FORWARDED_AGAIN`]); a marked one is handled where it lands, owner or not: at most
    /// two hops, never a loop, and optimistic concurrency keeps a request handled off its
    /// owner apart from the owner's work.
    ///
    /// A request answered here for a partition served or handed over here holds that partition's
    /// sessions in memory until it is answered ([`crate::partition::Answering`]).
    fn route(&self, endpoint: Endpoint, incoming: &Incoming) -> Route {
        if !self.enabled {
            return Route::Here(None);
        }
        let Some(session) = self
            .subjects
            .session_of(&incoming.subject, endpoint.token())
        else {
            return Route::Here(None);
        };
        let partition = self.partitions.of(session);
        // Handled here whatever the owner (nobody to relay an answer to, or forwarded twice
        // already), and held like any request answered here while its partition is.
        if incoming.reply.is_none() || incoming.forwarded_again() {
            return Route::Here(self.partitions.hold(partition));
        }
        self.partitions.route(partition, &self.me)
    }

    /// Sends `incoming` on to `owner` as a request of this instance's own (its inbox, waiting
    /// up to `timeout`), and relays the answer, headers and all, to `incoming`'s reply subject.
    /// Gives `incoming` back when nobody listens there: the owner died and its lease has not
    /// expired yet, so the caller answers it itself (optimistic concurrency keeps that safe).
    /// A request that times out is not answered here: the owner may be slow, not gone, and may
    /// have applied it (a command applied twice would be refused the second time), so the
    /// client's own timeout and retry decide, as for any request.
    async fn forward(
        &self,
        endpoint: Endpoint,
        owner: &str,
        incoming: Incoming,
    ) -> Option<Incoming> {
        let reply_to = incoming.reply.clone()?;
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        let headers = if incoming.forwarded {
            let mut headers = incoming.headers.clone().unwrap_or_default();
            headers.insert(FORWARDED_AGAIN, "1");
            Some(headers)
        } else {
            incoming.headers.clone()
        };
        let request = async_nats::Request {
            payload: Some(incoming.payload.clone()),
            headers,
            timeout: Some(Some(self.timeout)),
            inbox: None,
        };
        let subject = self.subjects.forward(owner, &incoming.subject);
        match self.client.send_request(subject, request).await {
            Ok(answer) => {
                let relayed = match answer.headers {
                    Some(headers) => {
                        self.client
                            .publish_with_headers(reply_to, headers, answer.payload)
                            .await
                    }
                    None => self.client.publish(reply_to, answer.payload).await,
                };
                if let Err(error) = relayed {
                    tracing::warn!(%error, endpoint = endpoint.name(), "could not relay the owner's reply");
                }
                None
            }
            Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                tracing::info!(
                    owner,
                    endpoint = endpoint.name(),
                    "the session's owner is gone (its lease not expired yet); answered here"
                );
                Some(incoming)
            }
            Err(error) => {
                tracing::warn!(%error, owner, endpoint = endpoint.name(), "a request forwarded to its session's owner was not answered");
                None
            }
        }
    }
}

/// The header of a request forwarded a second time: its receiver handles it.
const FORWARDED_AGAIN: &str = "Planner-Forwarded-Again";

/// A request from a client or an executor, received directly or forwarded by another instance.
struct Incoming {
    subject: String,
    payload: Bytes,
    reply: Option<async_nats::Subject>,
    /// Carried on when forwarded: the trace context (`traceparent`) among them.
    headers: Option<async_nats::HeaderMap>,
    forwarded: bool,
}

impl Incoming {
    /// Whether it was forwarded twice already (see [`Router::route`]).
    fn forwarded_again(&self) -> bool {
        self.forwarded
            && self
                .headers
                .as_ref()
                .is_some_and(|headers| headers.get(FORWARDED_AGAIN).is_some())
    }
}

impl From<async_nats::service::Request> for Incoming {
    fn from(request: async_nats::service::Request) -> Self {
        Incoming {
            subject: request.message.subject.to_string(),
            payload: request.message.payload,
            reply: request.message.reply,
            headers: request.message.headers,
            forwarded: false,
        }
    }
}

/// The partitions this instance serves: a report pump each, and the engine's sessions.
struct Owned<S> {
    partitions: Arc<Partitions>,
    pumps: BTreeMap<u32, PartitionPump>,
    /// Partitions held whose consumer could not be opened yet: tried again every round.
    pending: BTreeSet<u32>,
    engine: Arc<Engine<S, NatsPublisher>>,
    report_pump: Arc<ReportPump<S>>,
    reports: stream::Stream,
    config: Config,
    recover_now: Arc<tokio::sync::Notify>,
}

/// One partition's report pump; aborted if dropped (the lease lost, or the daemon gone).
struct PartitionPump {
    stop: CancellationToken,
    task: AbortOnDropHandle<()>,
}

/// How long a released partition's pump keeps handling reports already delivered to it, and
/// how long requests answered here for it have to finish before its sessions are forgotten.
const HANDOVER_DRAIN: Duration = Duration::from_millis(500);

impl<S: EventStore> Owned<S> {
    fn partitions(&self) -> u32 {
        self.config.ownership.partitions
    }

    /// Acts on a lease round: stops what was lost at once, drains and releases what another
    /// member should hold, starts what was acquired.
    async fn apply(&mut self, leases: &mut Leases, round: Round) {
        let count = self.partitions();
        for partition in &round.lost {
            tracing::warn!(partition, "partition lease lost; no longer serving it");
            self.pumps.remove(partition);
            self.pending.remove(partition);
            self.partitions.set_owned(*partition, false);
            self.engine.forget_partition(*partition, count);
        }
        if !round.to_release.is_empty() {
            // Their requests are still answered here while the pumps drain (the sessions are
            // in memory and the leases ours); then all leases go at once, and from then on
            // their requests go to the next owner, not here.
            let mut draining = Vec::new();
            for partition in &round.to_release {
                self.partitions.set_handing_over(*partition);
                self.pending.remove(partition);
                if let Some(pump) = self.pumps.remove(partition) {
                    pump.stop.cancel();
                    draining.push(pump.task);
                }
            }
            futures::future::join_all(draining).await;
            leases.release(&round.to_release).await;
            for partition in &round.to_release {
                self.partitions.set_owned(*partition, false);
            }
            // Requests answered here until now finish on the sessions in memory; forgotten
            // first, one still waiting for its session's lock would load it again here.
            let drains = round
                .to_release
                .iter()
                .map(|partition| self.partitions.drain(*partition, HANDOVER_DRAIN));
            if !futures::future::join_all(drains)
                .await
                .into_iter()
                .all(|done| done)
            {
                tracing::warn!(partitions = ?round.to_release, "requests still answered here after the handover's drain; the next owner's writes fence them");
            }
            for partition in &round.to_release {
                self.engine.forget_partition(*partition, count);
            }
            tracing::info!(partitions = ?round.to_release, "partitions handed over");
        }
        for partition in &round.acquired {
            self.engine.forget_partition(*partition, count);
            self.partitions.set_owned(*partition, true);
            self.pending.insert(*partition);
        }
        self.start_pending().await;
        if !round.acquired.is_empty() {
            tracing::info!(partitions = ?round.acquired, "partitions acquired");
            self.recover_now.notify_one();
        }
    }

    /// Opens the report consumer of each partition held without one.
    async fn start_pending(&mut self) {
        for partition in std::mem::take(&mut self.pending) {
            match self.open(partition).await {
                Ok(messages) => {
                    let stop = CancellationToken::new();
                    let task = AbortOnDropHandle::new(tokio::spawn(pump_partition(
                        messages,
                        Arc::clone(&self.report_pump),
                        stop.clone(),
                    )));
                    self.pumps.insert(partition, PartitionPump { stop, task });
                }
                Err(error) => {
                    tracing::warn!(partition, error = %crate::report(&error), "could not open a partition's report consumer; retrying");
                    self.pending.insert(partition);
                }
            }
        }
    }

    async fn open(&self, partition: u32) -> anyhow::Result<pull::Stream> {
        let name = format!("{}-{partition}", self.config.reports.consumer);
        let subjects = &self.report_pump.subjects;
        // Created or updated, as the shared one is (`ensure_streams`).
        let consumer = self
            .reports
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subjects.partition_reports(partition),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(self.config.reports.ack_wait_s),
                max_ack_pending: i64::try_from(self.config.reports.max_in_flight * 4)
                    .unwrap_or(i64::MAX),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the report consumer {name}"))?;
        crate::bus::pull_messages(&consumer, 64)
            .await
            .with_context(|| format!("pulling from the report consumer {name}"))
    }

    /// A graceful stop: leave the membership, drain every partition, release every lease.
    async fn release_all(&mut self, leases: &mut Leases) {
        leases.leave().await;
        let round = Round {
            to_release: leases.held(),
            ..Round::default()
        };
        self.apply(leases, round).await;
    }
}

/// Runs lease rounds every third of the TTL and whenever the bucket changes, until `stop`;
/// then hands every partition over.
async fn run_leases<S: EventStore>(
    mut leases: Leases,
    mut owned: Owned<S>,
    stop: CancellationToken,
) {
    let mut refresh = tokio::time::interval(leases.refresh_every());
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    let mut watch = match leases.bucket().watch_all().await {
        Ok(watch) => Some(watch),
        Err(error) => {
            tracing::warn!(%error, "cannot watch the lease bucket; acting on changes every refresh only");
            None
        }
    };
    loop {
        let refreshing = tokio::select! {
            () = stop.cancelled() => break,
            _ = refresh.tick() => true,
            entry = async { watch.as_mut()?.next().await }, if watch.is_some() => match entry {
                Some(Ok(entry)) if leases.observe(&entry) => {
                    // A handover frees many keys at once: one round for the burst.
                    let quiet = tokio::time::sleep(Duration::from_millis(20));
                    tokio::pin!(quiet);
                    while let Some(watch) = watch.as_mut() {
                        tokio::select! {
                            () = &mut quiet => break,
                            more = watch.next() => match more {
                                Some(Ok(entry)) => {
                                    leases.observe(&entry);
                                }
                                Some(Err(_)) => {}
                                None => break,
                            },
                        }
                    }
                    false
                }
                Some(Ok(_)) => continue,
                Some(Err(error)) => {
                    tracing::debug!(%error, "lease bucket watch error");
                    continue;
                }
                None => {
                    watch = None;
                    continue;
                }
            },
        };
        match leases.round(refreshing).await {
            Ok(round) => owned.apply(&mut leases, round).await,
            Err(error) => {
                tracing::warn!(error = %crate::report(&error), "lease round failed; retrying");
                let round = Round {
                    lost: leases.expired(),
                    ..Round::default()
                };
                owned.apply(&mut leases, round).await;
            }
        }
        owned.start_pending().await;
    }
    owned.release_all(&mut leases).await;
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

impl<S: EventStore> ReportPump<S> {
    fn spawn(
        &self,
        message: async_nats::jetstream::Message,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> tokio::task::JoinHandle<()> {
        let (engine, subjects, client) = (
            Arc::clone(&self.engine),
            self.subjects.clone(),
            self.client.clone(),
        );
        let (max_bytes, max_deliver) = (self.max_bytes, self.max_deliver);
        let context = crate::trace::carried_by(message.headers.as_ref());
        let edge = crate::trace::Edge::Report;
        self.tracker
            .spawn(crate::trace::scope(context, edge, async move {
                handle_report(&engine, &subjects, &client, message, max_bytes, max_deliver).await;
                drop(permit);
            }))
    }
}

/// What [`next_report`] got.
// Returned once per report and moved straight into its task: boxing the message would add an
// allocation per report on the hot path to save a few hundred bytes of stack.
#[allow(clippy::large_enum_variant)]
enum Pulled {
    /// A report, and the in-flight slot it holds.
    Report(
        async_nats::jetstream::Message,
        tokio::sync::OwnedSemaphorePermit,
    ),
    /// `stop` was cancelled.
    Stopped,
    /// The consumer (or the slot semaphore) ended.
    Ended,
}

/// Waits for a free in-flight slot, then for the next report, either of them cut short by
/// `stop`. A stream error (missed heartbeats while the server restarts) is logged and waited
/// past: the stream recovers.
async fn next_report<S>(
    reports: &mut pull::Stream,
    pump: &ReportPump<S>,
    stop: &CancellationToken,
) -> Pulled {
    let permit = tokio::select! {
        () = stop.cancelled() => return Pulled::Stopped,
        permit = Arc::clone(&pump.limits).acquire_owned() => match permit {
            Ok(permit) => permit,
            Err(_) => return Pulled::Ended,
        },
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return Pulled::Stopped,
            message = reports.next() => match message {
                Some(Ok(message)) => return Pulled::Report(message, permit),
                Some(Err(error)) => tracing::warn!(%error, "executor report stream error"),
                None => return Pulled::Ended,
            },
        }
    }
}

/// Takes executor reports off the consumer, each handled in a task of its own within the
/// in-flight limit, until `intake` is cancelled or the consumer ends.
async fn pump_reports<S: EventStore>(
    mut reports: pull::Stream,
    pump: Arc<ReportPump<S>>,
    intake: CancellationToken,
) {
    while let Pulled::Report(message, permit) = next_report(&mut reports, &pump, &intake).await {
        pump.spawn(message, permit);
    }
}

/// One partition's pump: as [`pump_reports`] until `stop`, then it handles what was already
/// delivered to it for up to [`HANDOVER_DRAIN`] and waits for its reports in flight, so the
/// next owner starts after them.
async fn pump_partition<S: EventStore>(
    mut reports: pull::Stream,
    pump: Arc<ReportPump<S>>,
    stop: CancellationToken,
) {
    let mut in_flight = Vec::new();
    loop {
        let (message, permit) = match next_report(&mut reports, &pump, &stop).await {
            Pulled::Report(message, permit) => (message, permit),
            Pulled::Stopped => break,
            Pulled::Ended => return,
        };
        in_flight.retain(|task: &tokio::task::JoinHandle<()>| !task.is_finished());
        in_flight.push(pump.spawn(message, permit));
    }
    let until = tokio::time::Instant::now() + HANDOVER_DRAIN;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(
        until.min(tokio::time::Instant::now() + Duration::from_millis(50)),
        reports.next(),
    )
    .await
    {
        let Ok(permit) = Arc::clone(&pump.limits).acquire_owned().await else {
            break;
        };
        in_flight.push(pump.spawn(message, permit));
    }
    drop(reports);
    futures::future::join_all(in_flight).await;
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

/// What becomes of one executor report, whichever way it came.
enum ReportOutcome {
    /// Applied (or a recognised duplicate, or on an attempt that already ended): ack it, or
    /// answer `ok`, with the task handed over when a direct report asked for one.
    Done(Option<Box<crate::protocol::NextTask>>),
    /// It may pass later: nak with a delay, for redelivery (or, past `reports.max_deliver`,
    /// to the dead-letter stream); answered directly, `retry` (the executor publishes it to
    /// the stream).
    Retry(ErrorBody),
    /// It would fail the same way again: terminate it, or answer `refused`, and say so on the
    /// errors subject.
    Refused(ErrorNotice),
}

/// Judges one executor report and applies it: the same checks for a report from the stream
/// and one sent directly (its size, its session, its JSON, then the core's judgement of the
/// lease and the attempt). `subject` is the one it came on, `session` the one it names.
async fn judge_report<S: EventStore>(
    engine: &Arc<Engine<S, NatsPublisher>>,
    subjects: &Subjects,
    subject: &str,
    session: Option<&str>,
    payload: &[u8],
    max_bytes: usize,
    path: ReportVia,
) -> ReportOutcome {
    let refuse = |kind: ErrorKind, text: String| {
        ReportOutcome::Refused(ErrorNotice {
            subject: subject.to_owned(),
            session: session.map(str::to_owned),
            error: ErrorBody::new(kind, text),
        })
    };
    if payload.len() > max_bytes {
        return refuse(
            ErrorKind::TooLarge,
            format!("report of {} bytes, limit {max_bytes}", payload.len()),
        );
    }
    let Some(session) = session else {
        return refuse(ErrorKind::BadSession, "no session in subject".into());
    };
    let ReportMessage { event, lease, next } = match serde_json::from_slice(payload) {
        Ok(report) => report,
        Err(e) => return refuse(ErrorKind::Malformed, format!("not an executor report: {e}")),
    };
    let task = event.task_id.clone();
    // A report asking for the next task that comes by the stream was not answered directly:
    // a task its first sending was handed, if any, never reached its executor.
    let unreceived = next
        .as_ref()
        .filter(|_| path == ReportVia::Stream)
        .map(|next| next.claim_id.clone());
    // Only a direct report has a reply to hand a task over in; from the stream, `next` is
    // ignored (its executor may be long gone).
    let chain = match next {
        Some(next) if path == ReportVia::Direct => match next.problem(subjects) {
            None => Some(chain_for(subjects, next)),
            Some(problem) => {
                tracing::warn!(session, task = %task, problem, "a report's `next` ignored; the report is applied");
                None
            }
        },
        _ => None,
    };
    let held = chain.as_ref().and_then(|(_, held)| held.clone());
    let command = Command::HandleExecutorEvent {
        event,
        lease,
        now: engine.now(),
    };
    match engine
        .handle_chained(session, command, chain.map(|(chain, _)| chain))
        .await
    {
        Ok(handled) => {
            if let Some(lease) = unreceived {
                if let Err(error) = engine.release_unreceived_handover(session, &lease).await {
                    // The report is applied; the task waits out its heartbeat timeout instead.
                    tracing::warn!(session, task = %task, %error, "could not release a task handed over in a lost reply");
                }
            }
            ReportOutcome::Done(handled.handover.map(|handover| {
                Box::new(crate::protocol::NextTask {
                    heartbeat_interval_ms: heartbeat_interval(handover.lease_terms.as_ref()),
                    // The executor holds the context already, or gets it here. (The dispatch's
                    // reference is this context's: hashing it again cost a long chain 3% of the
                    // daemon's CPU.)
                    context: handover
                        .context
                        .filter(|_| held.as_deref() != Some(&handover.task.assignment.context_ref)),
                    task: handover.task,
                    lease: handover.lease,
                })
            }))
        }
        Err(e) => match e.disposition() {
            Disposition::Reject => {
                tracing::warn!(session, task = %task, error = %e, "executor report refused");
                refuse(e.kind(), e.to_string())
            }
            Disposition::Retry => {
                tracing::warn!(session, task = %task, error = %e, "executor report not processed; it comes again");
                ReportOutcome::Retry(ErrorBody::new(e.kind(), e.to_string()))
            }
        },
    }
}

/// Which way a report came.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReportVia {
    /// A request on `{p}.result.<session>`.
    Direct,
    /// The report stream, or a message on `{p}.result.<session>` without a reply subject: no
    /// reply to hand a task over in.
    Stream,
}

/// The engine's [`Chain`](crate::engine::Chain) for a report's `next`, and the context
/// reference the executor holds.
fn chain_for(
    subjects: &Subjects,
    next: crate::protocol::NextRequest,
) -> (crate::engine::Chain, Option<String>) {
    let subjects = subjects.clone();
    let held = next.context_ref.clone();
    let lease = next.claim_id.clone();
    let chain = crate::engine::Chain {
        lease,
        serves: Box::new(move |kind, target| next.serves(&subjects.task(kind, target))),
    };
    (chain, held)
}

/// How often the executor of an attempt with these timeouts heartbeats: three beats per
/// timeout, so one lost or late beat never costs the lease.
fn heartbeat_interval(terms: Option<&planner_core::TaskTimeouts>) -> Option<u64> {
    terms
        .and_then(|t| t.heartbeat_timeout_ms)
        .map(|timeout| (timeout / 3).max(1))
}

/// A report from the stream: acked once applied, nak'd (or dead-lettered) to come again, or
/// terminated with a notice.
async fn handle_report<S: EventStore>(
    engine: &Arc<Engine<S, NatsPublisher>>,
    subjects: &Subjects,
    client: &async_nats::Client,
    message: async_nats::jetstream::Message,
    max_bytes: usize,
    max_deliver: u64,
) {
    let subject = message.subject.to_string();
    let session = subjects.report_session(&subject);
    let via = ReportVia::Stream;
    let outcome = judge_report(
        engine,
        subjects,
        &subject,
        session,
        &message.payload,
        max_bytes,
        via,
    )
    .await;
    match outcome {
        ReportOutcome::Done(_) => {
            crate::metrics::report("stream", "applied");
            if let Err(error) = message.ack().await {
                tracing::warn!(%error, "could not acknowledge a report; it will be redelivered and ignored as a duplicate");
            }
        }
        ReportOutcome::Retry(reason) => {
            crate::metrics::report("stream", "retried");
            let deliveries = message.info().map_or(0, |info| info.delivered);
            let dead = u64::try_from(deliveries).unwrap_or(0) >= max_deliver;
            if dead
                && dead_letter(
                    client,
                    subjects,
                    &subject,
                    session,
                    &message,
                    &reason.message,
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
            crate::metrics::report("stream", "refused");
            // Bad input is terminated, not redelivered: it would fail the same way again.
            let _ = message.ack_with(AckKind::Term).await;
            let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
            let _ = client.publish(subjects.errors(), body).await;
        }
    }
}

/// A report sent directly on `{p}.result.<session>`: answered `ok` once its events are
/// persisted, `retry` when it may pass later (the executor then publishes it to the stream,
/// where it is retried as any report), or `refused` (with a notice on the errors subject, as a
/// refused report from the stream gets).
async fn result_reply<S: EventStore>(
    engine: &Arc<Engine<S, NatsPublisher>>,
    subjects: &Subjects,
    client: &async_nats::Client,
    subject: &str,
    payload: &[u8],
    max_bytes: usize,
    via: ReportVia,
) -> ReportReply {
    let session = subjects.session_of(subject, Endpoint::Result.token());
    match judge_report(engine, subjects, subject, session, payload, max_bytes, via).await {
        ReportOutcome::Done(next) => {
            crate::metrics::report("direct", "applied");
            if next.is_some() {
                crate::metrics::handed_over();
            }
            ReportReply::Ok { next }
        }
        ReportOutcome::Retry(error) => {
            crate::metrics::report("direct", "retried");
            ReportReply::Retry(error)
        }
        ReportOutcome::Refused(notice) => {
            crate::metrics::report("direct", "refused");
            let body = Bytes::from(serde_json::to_vec(&notice).unwrap_or_default());
            let _ = client.publish(subjects.errors(), body).await;
            ReportReply::Refused(notice.error)
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
    let mut held_context = None;
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
                held_context = claim.context_ref;
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
                        context: None,
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
            LeaseReply::Granted { lease, .. } => LeaseReply::Granted {
                lease,
                heartbeat_interval_ms: heartbeat_interval(handled.lease_terms.as_ref()),
                // The executor holds the context already, or gets it here.
                context: handled
                    .claim_context
                    .filter(|context| held_context.as_deref() != Some(&context.reference())),
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
    /// A report sent directly (`{p}.result.<session>`).
    Result,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Command => "command",
            Endpoint::Claim => "claim",
            Endpoint::Heartbeat => "heartbeat",
            Endpoint::Result => "result",
        }
    }

    /// Where its requests enter, for their trace.
    /// The trace a request is handled in: the one it carries, or a new one for a command;
    /// an executor's claim, heartbeat or report that carries none (executors send it only for
    /// sampled traces) is handled in the trace its attempt was dispatched in
    /// ([`crate::trace::carried_by`]).
    fn trace_context(
        self,
        headers: Option<&async_nats::HeaderMap>,
    ) -> Option<crate::trace::TraceParent> {
        match self {
            Endpoint::Command => crate::trace::context_of(headers),
            Endpoint::Claim | Endpoint::Heartbeat | Endpoint::Result => {
                crate::trace::carried_by(headers)
            }
        }
    }

    fn edge(self) -> crate::trace::Edge {
        match self {
            Endpoint::Command => crate::trace::Edge::Command,
            Endpoint::Claim => crate::trace::Edge::Claim,
            Endpoint::Heartbeat => crate::trace::Edge::Heartbeat,
            // A direct report is handled as one from the stream: the same span.
            Endpoint::Result => crate::trace::Edge::Report,
        }
    }

    /// The subject token before the session: `{p}.<token>.<session>`.
    fn token(self) -> &'static str {
        match self {
            Endpoint::Command => "cmd",
            Endpoint::Claim => "claim",
            Endpoint::Heartbeat => "heartbeat",
            Endpoint::Result => "result",
        }
    }

    /// The endpoint a request's subject is for.
    fn of(subjects: &Subjects, subject: &str) -> Option<Endpoint> {
        [
            Endpoint::Command,
            Endpoint::Claim,
            Endpoint::Heartbeat,
            Endpoint::Result,
        ]
        .into_iter()
        .find(|endpoint| subjects.session_of(subject, endpoint.token()).is_some())
    }

    /// The reply for a refusal before the request is looked at.
    fn refusal(self, body: ErrorBody) -> Bytes {
        let json = match self {
            Endpoint::Command => serde_json::to_vec(&CommandReply::Error(body)),
            Endpoint::Claim | Endpoint::Heartbeat => serde_json::to_vec(&LeaseReply::Error(body)),
            // `busy` (the one refusal made here): the executor publishes it to the stream.
            Endpoint::Result => serde_json::to_vec(&if body.kind.may_pass() {
                ReportReply::Retry(body)
            } else {
                ReportReply::Refused(body)
            }),
        };
        Bytes::from(json.unwrap_or_default())
    }
}

/// Answers one request in a task of its own, within the admission limit (past it: `busy` at
/// once, without queueing), or forwards it to the instance that owns its session.
fn answer<S: EventStore>(endpoint: Endpoint, incoming: Incoming, site: &Site<S>) {
    let answering = match site.router.route(endpoint, &incoming) {
        Route::Here(answering) => answering,
        Route::Forward(owner) => {
            let site = site.clone();
            site.tracker.clone().spawn(async move {
                if let Some(incoming) = site.router.forward(endpoint, &owner, incoming).await {
                    answer_here(endpoint, incoming, None, &site);
                }
            });
            return;
        }
    };
    answer_here(endpoint, incoming, answering, site);
}

/// What answering a request needs: the daemon's parts, shared by every request's task.
struct Site<S: EventStore> {
    admission: Arc<Semaphore>,
    tracker: TaskTracker,
    engine: Arc<Engine<S, NatsPublisher>>,
    router: Arc<Router>,
    max_bytes: usize,
}

impl<S: EventStore> Clone for Site<S> {
    fn clone(&self) -> Self {
        Site {
            admission: Arc::clone(&self.admission),
            tracker: self.tracker.clone(),
            engine: Arc::clone(&self.engine),
            router: Arc::clone(&self.router),
            max_bytes: self.max_bytes,
        }
    }
}

/// Answers one request here, in a task of its own, within the admission limit; `answering`
/// (its partition's sessions held in memory) is let go once it is answered.
fn answer_here<S: EventStore>(
    endpoint: Endpoint,
    incoming: Incoming,
    answering: Option<Answering>,
    site: &Site<S>,
) {
    let (engine, router, max_bytes) = (
        Arc::clone(&site.engine),
        Arc::clone(&site.router),
        site.max_bytes,
    );
    let tracker = &site.tracker;
    let Some(reply_to) = incoming.reply.clone() else {
        // Nobody to answer: handled all the same (a command published without a reply).
        let context = endpoint.trace_context(incoming.headers.as_ref());
        tracker.spawn(crate::trace::scope(context, endpoint.edge(), async move {
            let _ = handle(endpoint, &engine, &router, &incoming, max_bytes).await;
            drop(answering);
        }));
        return;
    };
    let Ok(permit) = Arc::clone(&site.admission).try_acquire_owned() else {
        crate::metrics::busy(endpoint.name());
        tracing::warn!(
            request = endpoint.name(),
            "at limits.max_requests_in_flight; answered busy"
        );
        tracker.spawn(async move {
            let _ = router
                .client
                .publish(reply_to, endpoint.refusal(busy()))
                .await;
        });
        return;
    };
    let context = endpoint.trace_context(incoming.headers.as_ref());
    tracker.spawn(crate::trace::scope(context, endpoint.edge(), async move {
        // Boxed: the handling's state is large, and a spawned future is moved whole into its
        // task (that copy was 5% of the daemon's CPU at saturation, perf).
        let body = Box::pin(handle(endpoint, &engine, &router, &incoming, max_bytes)).await;
        drop((permit, answering));
        if let Err(error) = router.client.publish(reply_to, body).await {
            tracing::warn!(%error, endpoint = endpoint.name(), "could not send a reply");
        }
    }));
}

/// The reply to one request, handled here.
async fn handle<S: EventStore>(
    endpoint: Endpoint,
    engine: &Arc<Engine<S, NatsPublisher>>,
    router: &Router,
    incoming: &Incoming,
    max_bytes: usize,
) -> Bytes {
    let (subject, payload) = (incoming.subject.as_str(), &incoming.payload);
    let subjects = &router.subjects;
    let body = match endpoint {
        Endpoint::Command => {
            let reply = command_reply(engine, subjects, subject, payload, max_bytes).await;
            serde_json::to_vec(&reply)
        }
        Endpoint::Claim => {
            let kind = LeaseRequest::Claim;
            let reply = lease_reply(engine, subjects, subject, payload, max_bytes, kind).await;
            serde_json::to_vec(&reply)
        }
        Endpoint::Heartbeat => {
            let kind = LeaseRequest::Heartbeat;
            let reply = lease_reply(engine, subjects, subject, payload, max_bytes, kind).await;
            serde_json::to_vec(&reply)
        }
        Endpoint::Result => {
            let client = &router.client;
            // A report published without a reply subject has no one to hand a task over to.
            let via = if incoming.reply.is_some() {
                ReportVia::Direct
            } else {
                ReportVia::Stream
            };
            let reply =
                result_reply(engine, subjects, client, subject, payload, max_bytes, via).await;
            serde_json::to_vec(&reply)
        }
    };
    Bytes::from(body.unwrap_or_default())
}

fn busy() -> ErrorBody {
    ErrorBody::new(
        ErrorKind::Busy,
        "this instance is handling as many requests as it admits (limits.max_requests_in_flight): retry shortly",
    )
}
