//! The daemon's settings: `config/planner.toml`, then `PLANNER_*` environment variables, then
//! command-line flags, each overriding the one before. Every key has a default (see
//! `config/planner.toml`, which documents them all); problems are reported together (a value
//! of the wrong type is reported and put back to its default so that the rest is still read
//! and validated), each naming its key and where it was set (the file, the environment
//! variable or the `--set` flag), and the binary exits with status 64.
//!
//! Environment variables name a key by its path, upper-cased, sections joined with `__`:
//! `PLANNER_NATS__URL`, `PLANNER_SESSIONS__MAX_LOADED`, `PLANNER_PLANNER__RETRY__MAX_ATTEMPTS`.
//! Values are read as TOML (numbers, booleans) and otherwise as strings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use planner_core::PlannerConfig;
use serde::{Deserialize, Serialize};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/planner.toml";
/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "PLANNER_";

/// Variables with the prefix that are the CLI's own, not settings: skipped by [`Config::load`].
/// (`PLANNER_CONFIG` names the file, as `--config` does; read as a setting it was refused as an
/// unknown key, so the documented variable stopped every command.)
pub const CLI_ENV: &[&str] = &["PLANNER_CONFIG"];

/// Every setting of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS.
    pub nats: NatsConfig,
    /// Subject names.
    pub subjects: SubjectsConfig,
    /// Where events live.
    pub store: StoreConfig,
    /// The work-queue stream dispatches go through.
    pub dispatch: DispatchConfig,
    /// The stream executor reports are captured in.
    pub reports: ReportsConfig,
    /// Sessions held in memory.
    pub sessions: SessionsConfig,
    /// Input limits.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Stopping.
    pub shutdown: ShutdownConfig,
    /// Prometheus metrics, health probes, the background consistency check, trace context.
    pub metrics: MetricsConfig,
    /// Exporting spans over OTLP (off by default).
    pub tracing: TracingConfig,
    /// The planner settings every new session starts with.
    pub planner: PlannerConfig,
    /// LLM planning and summaries (off by default: the rule parser plans).
    pub llm: planner_llm::LlmConfig,
    /// Which instance serves which sessions: partitions leased through a KV bucket.
    pub ownership: OwnershipConfig,
    /// The HTTP API and web console (off by default).
    pub http: HttpConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats: NatsConfig::default(),
            subjects: SubjectsConfig::default(),
            store: StoreConfig::default(),
            dispatch: DispatchConfig::default(),
            reports: ReportsConfig::default(),
            sessions: SessionsConfig::default(),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            shutdown: ShutdownConfig::default(),
            metrics: MetricsConfig::default(),
            tracing: TracingConfig::default(),
            // The daemon fences executors: a report must come from the executor that claimed
            // the attempt (the core's own default leaves claims optional for embedders).
            planner: PlannerConfig {
                leases: planner_core::LeasePolicy {
                    require_claim: true,
                    ..planner_core::LeasePolicy::default()
                },
                ..PlannerConfig::default()
            },
            llm: planner_llm::LlmConfig::default(),
            ownership: OwnershipConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

/// `overlay`'s keys over `base`'s, table by table: a file that sets one key of a section
/// keeps the daemon's defaults for the others (serde's defaults are the library's).
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => merge(below, above),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A setting that must never reach a log, an error message or a `Debug` print: it prints as
/// `[redacted]`. Its own small type rather than the `secrecy` crate's because the
/// configuration is also serialized (defaults are overlaid by the file), which `secrecy` rules
/// out for plain strings.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that needs it (the NATS connection).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is unset.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("[redacted]")
        }
    }
}

/// `url` (comma-separated NATS URLs) with any `user:password@` replaced by `[redacted]@`: for
/// logs and error messages.
pub fn redact_urls(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme + 3 => {
                format!(
                    "{}[redacted]{}",
                    one.get(..scheme + 3).unwrap_or_default(),
                    one.get(at..).unwrap_or_default()
                )
            }
            (None, Some(at)) => format!("[redacted]{}", one.get(at..).unwrap_or_default()),
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `url` (comma-separated) without `user:password@` parts, and the first such credentials.
pub fn split_url_credentials(url: &str) -> (String, Option<(String, String)>) {
    let mut credentials = None;
    let plain = url
        .split(',')
        .map(|one| {
            let one = one.trim();
            let start = one.find("://").map_or(0, |s| s + 3);
            match (one.get(start..), one.get(..start)) {
                (Some(rest), Some(scheme)) => match rest.split_once('@') {
                    Some((userinfo, host)) => {
                        if credentials.is_none() {
                            let (user, password) =
                                userinfo.split_once(':').unwrap_or((userinfo, ""));
                            credentials = Some((user.to_owned(), password.to_owned()));
                        }
                        format!("{scheme}{host}")
                    }
                    None => one.to_owned(),
                },
                _ => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    (plain, credentials)
}

impl std::fmt::Debug for NatsConfig {
    // By hand: URLs may carry credentials, and the password and token are secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_urls(&self.url))
            .field("name", &self.name)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls_required", &self.tls_required)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("startup_wait_s", &self.startup_wait_s)
            .finish_non_exhaustive()
    }
}

/// How to reach NATS. Empty strings mean "not set".
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// The connection's name, shown by the server.
    pub name: String,
    /// User name (with `password`).
    pub user: String,
    /// Password (with `user`).
    pub password: Secret,
    /// Token authentication.
    pub token: Secret,
    /// A file holding an nkey seed.
    pub nkey_seed_file: String,
    /// A `.creds` file (JWT + nkey).
    pub creds_file: String,
    /// Require TLS.
    pub tls_required: bool,
    /// CA certificate file for TLS.
    pub tls_ca_file: String,
    /// Client certificate file for mutual TLS (with `tls_key_file`).
    pub tls_cert_file: String,
    /// Client key file for mutual TLS.
    pub tls_key_file: String,
    /// Time allowed to connect, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Time allowed for a request (and a JetStream ack), in milliseconds.
    pub request_timeout_ms: u64,
    /// How long `serve` waits for NATS at start-up (reachable, its JetStream or cluster
    /// ready) before giving up (0: one attempt). What waiting cannot fix (a setting to
    /// change, a permission) ends the start-up at once (`startup.rs`).
    pub startup_wait_s: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            name: "planner-svc".into(),
            user: String::new(),
            password: Secret::default(),
            token: Secret::default(),
            nkey_seed_file: String::new(),
            creds_file: String::new(),
            tls_required: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            startup_wait_s: 60,
        }
    }
}

/// Subject names (see docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubjectsConfig {
    /// Every subject starts with this (dot-separated tokens).
    pub prefix: String,
}

impl Default for SubjectsConfig {
    fn default() -> Self {
        SubjectsConfig {
            prefix: "planner".into(),
        }
    }
}

/// Which store, and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// JetStream (production; needs NATS).
    Jetstream,
    /// The file store in `data_dir` (single node).
    File,
    /// In memory (tests; nothing survives).
    Memory,
}

/// When the file store syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncSetting {
    /// Every append.
    Always,
    /// Appends waiting together share one sync.
    Group,
    /// Never (survives a process crash, not a power cut).
    Never,
}

/// Where events live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `jetstream`, `file` or `memory`.
    pub kind: StoreKind,
    /// The file store's directory.
    pub data_dir: PathBuf,
    /// The file store's sync policy.
    pub fsync: FsyncSetting,
    /// The JetStream stream holding events.
    pub stream_name: String,
    /// The Object Store bucket holding snapshots.
    pub snapshot_bucket: String,
    /// JetStream replicas (1, 3 or 5).
    pub replicas: usize,
    /// The event stream's size limit in bytes (-1: none).
    pub max_bytes: i64,
    /// The largest append (the events of one command), in bytes.
    pub max_append_bytes: usize,
    /// A snapshot every this many events (0: never).
    pub snapshot_every: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Jetstream,
            data_dir: PathBuf::from("planner-data"),
            fsync: FsyncSetting::Group,
            stream_name: "PLANNER_EVENTS".into(),
            snapshot_bucket: "planner_snapshots".into(),
            replicas: 1,
            max_bytes: -1,
            max_append_bytes: 1024 * 1024,
            snapshot_every: 1_000,
        }
    }
}

/// The work-queue stream dispatches go through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Its name.
    pub stream_name: String,
    /// How long a dispatch id is remembered, in seconds: a re-published dispatch inside this
    /// window never reaches an executor twice.
    pub duplicate_window_s: u64,
    /// Replicas.
    pub replicas: usize,
    /// Offer each dispatch to an idle executor over core NATS before the stream
    /// (docs/protocol.md, "Offers"): an executor that takes it claims at once, and the dispatch
    /// is never written to the stream. Executors that do not listen for offers get dispatches
    /// from the stream as before. On by default.
    pub offers: bool,
    /// How long an offer waits for its answer before the dispatch goes to the stream, in
    /// milliseconds: above an executor's claim timeout (5 s in the shipped pool and client).
    pub offer_timeout_ms: u64,
    /// Contexts (request, summary, system prompt) up to this many bytes travel in every
    /// dispatch; a larger one is left out of it and sent with the claim's grant, unless the
    /// executor says it holds it already (docs/protocol.md). Executors that do not claim, or
    /// read the context only from the dispatch, need it above their largest context.
    pub inline_context_bytes: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            stream_name: "PLANNER_TASKS".into(),
            duplicate_window_s: 3_600,
            replicas: 1,
            offers: true,
            offer_timeout_ms: 6_000,
            inline_context_bytes: 1_024,
        }
    }
}

/// The stream executor reports are captured in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportsConfig {
    /// Its name.
    pub stream_name: String,
    /// The durable consumer every instance shares.
    pub consumer: String,
    /// Reports from the stream processed at once per instance (direct reports are requests,
    /// under `limits.max_requests_in_flight`).
    pub max_in_flight: usize,
    /// Seconds before an unacknowledged report is redelivered.
    pub ack_wait_s: u64,
    /// Days reports are kept.
    pub max_age_days: u64,
    /// Replicas.
    pub replicas: usize,
    /// Deliveries of a report that keeps failing for a reason that could pass (the store
    /// down, lost races) before it goes to the dead-letter stream instead of coming again.
    pub max_deliver: u64,
    /// The dead-letter stream: reports that could not be processed, with the reason.
    pub dead_letter_stream: String,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        ReportsConfig {
            stream_name: "PLANNER_REPORTS".into(),
            consumer: "planner-svc".into(),
            max_in_flight: 256,
            ack_wait_s: 30,
            max_age_days: 7,
            replicas: 1,
            max_deliver: 20,
            dead_letter_stream: "PLANNER_DEAD".into(),
        }
    }
}

/// Session ownership (ARCHITECTURE.md, "Ownership"; docs/adr/0004): sessions fall into a fixed
/// number of partitions, each leased by one instance through a KV bucket, which serves their
/// commands and reports; the other instances forward to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OwnershipConfig {
    /// Off: every instance serves every session (the shared consumer of old), and optimistic
    /// concurrency alone keeps them apart.
    pub enabled: bool,
    /// Partitions sessions are hashed into. Fixed for the life of a deployment: it is written
    /// into the report stream's subject transform, and a daemon refuses to start with another.
    pub partitions: u32,
    /// The KV bucket of leases (`owner.<n>`) and members (`member.<instance>`).
    pub bucket: String,
    /// A lease not refreshed for this long expires (the bucket's max age); it is refreshed
    /// every third of it. A dead instance's partitions are taken over about this long after.
    pub lease_ttl_ms: u64,
    /// The bucket's replicas.
    pub replicas: usize,
    /// This instance's name in the bucket; empty: a random one per start. A stable, unique
    /// name (a pod name) lets a restarted instance take its leases back at once.
    pub instance_id: String,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        OwnershipConfig {
            enabled: true,
            partitions: 32,
            bucket: "planner_owners".into(),
            lease_ttl_ms: 10_000,
            replicas: 1,
            instance_id: String::new(),
        }
    }
}

/// Sessions held in memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Most sessions held at once; the least recently used idle ones go first.
    pub max_loaded: usize,
    /// Seconds after which an idle session is dropped from memory (reloaded on demand).
    pub idle_timeout_s: u64,
    /// How often a command is retried after losing an optimistic-concurrency race.
    pub conflict_retries: u32,
    /// Seconds between sweeps that re-publish undelivered dispatches, drop idle sessions, and
    /// pick up unfinished sessions not in memory (those of an instance that died).
    pub recovery_interval_s: u64,
    /// Most sessions remembered as ended or quarantined, so that recovery skips them without
    /// loading them; past it the memory is emptied and refilled (a bound, not a correctness
    /// limit).
    pub max_remembered_ended: usize,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_loaded: 10_000,
            idle_timeout_s: 300,
            conflict_retries: 5,
            recovery_interval_s: 30,
            max_remembered_ended: 100_000,
        }
    }
}

/// Input limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest command or report accepted, in bytes.
    pub max_message_bytes: usize,
    /// Client requests (commands, claims, heartbeats, direct reports) handled at once per
    /// instance; past it a request is answered `busy` (a direct report `retry`) at once
    /// instead of queueing without bound.
    pub max_requests_in_flight: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: 256 * 1024,
            max_requests_in_flight: 4096,
        }
    }
}

/// Who may use the HTTP API: a role per bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpRole {
    /// No access (only for `http.anonymous`: every request needs a token).
    None,
    /// Reads sessions, their events and live streams.
    Viewer,
    /// A viewer that also sends client commands: starts sessions, follow-ups, answers
    /// questions, cancels, continues (what a UI sends on `{p}.cmd.<session>`).
    Ui,
    /// A UI that also forks sessions.
    Operator,
}

impl HttpRole {
    /// The role as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpRole::None => "none",
            HttpRole::Viewer => "viewer",
            HttpRole::Ui => "ui",
            HttpRole::Operator => "operator",
        }
    }
}

/// The HTTP API and web console (`docs/http.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve it (`serve --http ADDR` and `run --http ADDR` turn it on).
    pub enabled: bool,
    /// The address to listen on.
    pub listen: String,
    /// Bearer tokens of the `viewer` role, comma-separated (several, to rotate them).
    pub viewer_tokens: Secret,
    /// Bearer tokens of the `ui` role, comma-separated.
    pub ui_tokens: Secret,
    /// Bearer tokens of the `operator` role, comma-separated.
    pub operator_tokens: Secret,
    /// The role of a request without a token: `none` (refused), or `viewer`, `ui`,
    /// `operator`, allowed only on a loopback `listen` address.
    pub anonymous: HttpRole,
    /// Origins allowed to call the API from another site's pages (CORS); none by default.
    pub cors_origins: Vec<String>,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Time allowed to answer a request (not a live stream), in milliseconds.
    pub request_timeout_ms: u64,
    /// Most items in one page of sessions or events.
    pub max_page: usize,
    /// Seconds between keep-alive comments on a live stream.
    pub keep_alive_s: u64,
    /// Most sessions in the list's in-memory index (the newest are kept).
    pub index_max_sessions: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: false,
            listen: "127.0.0.1:8080".into(),
            viewer_tokens: Secret::default(),
            ui_tokens: Secret::default(),
            operator_tokens: Secret::default(),
            anonymous: HttpRole::None,
            cors_origins: Vec::new(),
            max_body_bytes: 256 * 1024,
            request_timeout_ms: 10_000,
            max_page: 1_000,
            keep_alive_s: 15,
            index_max_sessions: 100_000,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// For people.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `planner_svc=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// Stopping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Seconds to finish in-flight work after SIGTERM before exiting anyway.
    pub grace_s: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_s: 10 }
    }
}

/// Prometheus metrics, health probes, the background consistency check and trace context
/// (see `docs/observability.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether metrics are recorded and served on `/metrics`.
    pub enabled: bool,
    /// Where `serve` answers `/metrics`, `/livez` and `/readyz` (`""`: no listener).
    pub listen: String,
    /// Where `executor` answers the same routes (`""`: no listener).
    pub executor_listen: String,
    /// Seconds between passes of the background consistency check over the loaded sessions
    /// (0: off).
    pub check_interval_s: u64,
    /// Sessions checked per pass at most (the least recently checked first).
    pub check_batch: usize,
    /// Carry a W3C `traceparent` from commands and reports to the dispatches and questions
    /// they cause (a new trace for a request without one).
    pub trace_context: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            executor_listen: "127.0.0.1:9465".into(),
            check_interval_s: 60,
            check_batch: 100,
            trace_context: true,
        }
    }
}

/// Exporting spans over OTLP/HTTP (see `docs/observability.md`). Off unless an endpoint is
/// set here or in the OpenTelemetry variables (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), which this setting wins over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// The base URL of an OTLP/HTTP receiver, e.g. `http://127.0.0.1:4318` (`/v1/traces` is
    /// appended, as for `OTEL_EXPORTER_OTLP_ENDPOINT`); `""`: the OpenTelemetry variables
    /// decide, and without them nothing is exported.
    pub otlp_endpoint: String,
    /// The `service.name` of the exported spans; `OTEL_SERVICE_NAME` wins when set.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: String::new(),
            service_name: "planner-svc".into(),
        }
    }
}

/// Whether `url` is an http(s) URL with a host: what an OTLP/HTTP endpoint must be.
pub fn check_otlp_endpoint(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err("use an http:// or https:// URL with a host".into());
    }
    Ok(())
}

/// Everything wrong with a configuration, each problem naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl Config {
    /// Reads the file (the default path only if it exists), applies `PLANNER_*` variables from
    /// `env` and then `overrides` (`key.path=value`), and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        // Where each key was last set, so that a problem names what the user has to change.
        let mut sources = Sources::new();
        let file = match path {
            Some(path) => read_table(path, &mut problems),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                read_table(Path::new(DEFAULT_CONFIG_PATH), &mut problems)
            }
            None => toml::Table::new(),
        };
        let file_name = path.unwrap_or(Path::new(DEFAULT_CONFIG_PATH)).display();
        record_file_keys(&file, "", &file_name.to_string(), &mut sources);
        let defaults = match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(defaults)) => defaults,
            _ => toml::Table::new(),
        };
        let mut table = defaults.clone();
        merge(&mut table, file);
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if CLI_ENV.contains(&name.as_str()) {
                continue;
            }
            let key = rest.to_lowercase().replace("__", ".");
            let source = format!("environment variable {name}");
            set_path(&mut table, &key, &value, &source, &mut problems);
            sources.insert(key, source);
        }
        for entry in overrides {
            match entry.split_once('=') {
                Some((key, value)) => {
                    let source = format!("--set {}", key.trim());
                    set_path(&mut table, key.trim(), value.trim(), &source, &mut problems);
                    sources.insert(key.trim().to_owned(), source);
                }
                None => problems.push(format!("--set {entry:?}: expected key.path=value")),
            }
        }
        // Unknown keys are reported and set aside, so that type and value problems in the rest
        // are reported in the same run.
        unknown_keys(&mut table, &sources, &mut problems);
        // Through text, so that type errors point at their key. Each refused value is reported
        // and put back to its default, and the rest read again: every bad value is reported in
        // one run, and the values that parse are then validated too. Bounded, as each round
        // resets one key that was set.
        for _ in 0..=MAX_TYPE_PROBLEMS {
            let text = toml::to_string(&table).unwrap_or_default();
            let error = match toml::from_str::<Config>(&text) {
                Ok(config) => {
                    if let Err(e) = config.validate() {
                        problems.extend(
                            e.problems
                                .into_iter()
                                .map(|problem| attribute(problem, &sources)),
                        );
                    }
                    if problems.is_empty() {
                        return Ok(config);
                    }
                    break;
                }
                Err(error) => error,
            };
            let key = error_key(&error, &text);
            match &key {
                Some(key) => {
                    problems.push(attribute(format!("{key}: {}", error.message()), &sources))
                }
                None => problems.push(error.message().to_owned()),
            }
            if !key.is_some_and(|key| reset_to_default(&mut table, &defaults, &key)) {
                break;
            }
        }
        Err(ConfigError { problems })
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.nats.url.trim().is_empty() {
            problems.push("nats.url must not be empty".into());
        }
        if !self.nats.user.is_empty() && self.nats.password.is_empty() {
            problems.push("nats.password must be set with nats.user".into());
        }
        if self.nats.tls_cert_file.is_empty() != self.nats.tls_key_file.is_empty() {
            problems.push("nats.tls_cert_file and nats.tls_key_file go together".into());
        }
        for (key, file) in [
            ("nats.nkey_seed_file", &self.nats.nkey_seed_file),
            ("nats.creds_file", &self.nats.creds_file),
            ("nats.tls_ca_file", &self.nats.tls_ca_file),
            ("nats.tls_cert_file", &self.nats.tls_cert_file),
            ("nats.tls_key_file", &self.nats.tls_key_file),
        ] {
            if !file.is_empty() && !Path::new(file).is_file() {
                problems.push(format!("{key}: no such file {file:?}"));
            }
        }
        if !self
            .subjects
            .prefix
            .split('.')
            .all(planner_core::is_valid_token)
        {
            problems.push(format!(
                "subjects.prefix {:?}: use dot-separated tokens of A-Z a-z 0-9 _ -",
                self.subjects.prefix
            ));
        }
        for (key, name) in [
            ("store.stream_name", &self.store.stream_name),
            ("dispatch.stream_name", &self.dispatch.stream_name),
            ("reports.stream_name", &self.reports.stream_name),
            ("reports.consumer", &self.reports.consumer),
            (
                "reports.dead_letter_stream",
                &self.reports.dead_letter_stream,
            ),
            ("store.snapshot_bucket", &self.store.snapshot_bucket),
            ("ownership.bucket", &self.ownership.bucket),
        ] {
            if !planner_core::is_valid_token(name) {
                problems.push(format!("{key} {name:?}: use 1 to 64 of A-Z a-z 0-9 _ -"));
            }
        }
        for (key, replicas) in [
            ("store.replicas", self.store.replicas),
            ("dispatch.replicas", self.dispatch.replicas),
            ("reports.replicas", self.reports.replicas),
            ("ownership.replicas", self.ownership.replicas),
        ] {
            if !matches!(replicas, 1 | 3 | 5) {
                problems.push(format!("{key} must be 1, 3 or 5, not {replicas}"));
            }
        }
        if let Err(problem) = check_log_level(&self.log.level) {
            problems.push(problem);
        }
        if self.store.max_append_bytes < 1024 {
            problems.push("store.max_append_bytes must be at least 1024".into());
        }
        if self.limits.max_message_bytes < 1024 {
            problems.push("limits.max_message_bytes must be at least 1024".into());
        }
        if self.limits.max_requests_in_flight == 0 {
            problems.push("limits.max_requests_in_flight must be at least 1".into());
        }
        if !(1..=1024).contains(&self.ownership.partitions) {
            problems.push("ownership.partitions must be between 1 and 1024".into());
        }
        if self.ownership.lease_ttl_ms < 1000 {
            problems.push("ownership.lease_ttl_ms must be at least 1000".into());
        }
        if !self.ownership.instance_id.is_empty()
            && !planner_core::is_valid_token(&self.ownership.instance_id)
        {
            problems.push(format!(
                "ownership.instance_id {:?}: use 1 to 64 of A-Z a-z 0-9 _ -",
                self.ownership.instance_id
            ));
        }
        if self.dispatch.offers && self.dispatch.offer_timeout_ms < 100 {
            problems.push("dispatch.offer_timeout_ms must be at least 100 (executors claim before they answer)".into());
        }
        if self.reports.max_deliver == 0 {
            problems.push("reports.max_deliver must be at least 1".into());
        }
        if self.reports.max_in_flight == 0 {
            problems.push("reports.max_in_flight must be at least 1".into());
        }
        if self.sessions.max_loaded == 0 {
            problems.push("sessions.max_loaded must be at least 1".into());
        }
        if self.sessions.recovery_interval_s == 0 {
            problems.push("sessions.recovery_interval_s must be at least 1".into());
        }
        if self.llm.enabled {
            if self.llm.base_url.trim().is_empty() {
                problems.push("llm.base_url must be set when llm.enabled".into());
            }
            if self.llm.model.trim().is_empty() {
                problems.push("llm.model must be set when llm.enabled".into());
            }
            if self.llm.max_concurrency == 0 {
                problems.push("llm.max_concurrency must be at least 1".into());
            }
        }
        if self.http.enabled {
            match self.http.listen.parse::<std::net::SocketAddr>() {
                Err(e) => problems.push(format!(
                    "http.listen {:?}: {e} (use IP:PORT, e.g. 127.0.0.1:8080)",
                    self.http.listen
                )),
                Ok(addr) if !addr.ip().is_loopback() && self.http.anonymous != HttpRole::None => {
                    problems.push(format!(
                        "http.anonymous {:?} is allowed only on a loopback http.listen, not {addr}: set tokens instead",
                        self.http.anonymous.as_str()
                    ))
                }
                Ok(_) => {}
            }
            if self.http.max_body_bytes < 1024 {
                problems.push("http.max_body_bytes must be at least 1024".into());
            }
            if self.http.max_page == 0 {
                problems.push("http.max_page must be at least 1".into());
            }
            if self.http.request_timeout_ms == 0 {
                problems.push("http.request_timeout_ms must be at least 1".into());
            }
            if self.http.keep_alive_s == 0 {
                problems.push("http.keep_alive_s must be at least 1".into());
            }
        }
        for (key, listen) in [
            ("metrics.listen", &self.metrics.listen),
            ("metrics.executor_listen", &self.metrics.executor_listen),
        ] {
            if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
                problems.push(format!(
                    "{key} {listen:?}: use host:port with an IP address (\"127.0.0.1:9464\"), or \"\" for none"
                ));
            }
        }
        if !self.tracing.otlp_endpoint.is_empty() {
            if let Err(e) = check_otlp_endpoint(&self.tracing.otlp_endpoint) {
                problems.push(format!(
                    "tracing.otlp_endpoint {:?}: {e} (e.g. \"http://127.0.0.1:4318\"), or \"\" for none",
                    self.tracing.otlp_endpoint
                ));
            }
        }
        if self.tracing.service_name.trim().is_empty() {
            problems.push("tracing.service_name must not be empty".into());
        }
        if let Err(e) = self.planner.validate() {
            problems.extend(e.problems.into_iter().map(|p| format!("planner.{p}")));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The LLM planner, when `llm.enabled`; the API key is read from the variable named by
    /// `llm.api_key_env`.
    pub fn llm_planner(&self) -> Option<std::sync::Arc<planner_llm::LlmPlanner>> {
        if !self.llm.enabled {
            return None;
        }
        let key = std::env::var(&self.llm.api_key_env).ok();
        match planner_llm::LlmClient::new(self.llm.clone(), key) {
            Ok(client) => Some(std::sync::Arc::new(planner_llm::LlmPlanner::new(client))),
            Err(error) => {
                tracing::error!(%error, "cannot build the LLM client; planning with the rules");
                None
            }
        }
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.nats.request_timeout_ms)
    }
}

fn read_table(path: &Path, problems: &mut Vec<String>) -> toml::Table {
    match std::fs::read_to_string(path) {
        Ok(text) => match text.parse::<toml::Table>() {
            Ok(table) => table,
            Err(e) => {
                problems.push(format!("{}: {}", path.display(), e.message()));
                toml::Table::new()
            }
        },
        Err(e) => {
            problems.push(format!("{}: {e}", path.display()));
            toml::Table::new()
        }
    }
}

fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(
    table: &mut toml::Table,
    key: &str,
    raw: &str,
    source: &str,
    problems: &mut Vec<String>,
) {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        problems.push(format!("{source}: malformed key {key:?}"));
        return;
    }
    let mut current = table;
    for part in &parts[..parts.len() - 1] {
        let entry = current
            .entry((*part).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => current = t,
            _ => {
                problems.push(format!("{source}: {part} is not a section"));
                return;
            }
        }
    }
    // A string-typed key keeps a value like "123" as a string: the value it replaces (the
    // default, or the file's) says which type the key has.
    let last = parts[parts.len() - 1];
    let value = match (current.get(last), parse_value(raw)) {
        (Some(toml::Value::String(_)), parsed) if !parsed.is_str() => {
            toml::Value::String(raw.to_owned())
        }
        (_, parsed) => parsed,
    };
    current.insert(last.to_owned(), value);
}

/// Reports and removes every key the config does not have (outside `planner`, which serde
/// checks itself).
fn unknown_keys(table: &mut toml::Table, sources: &Sources, problems: &mut Vec<String>) {
    let Ok(toml::Value::Table(known)) = toml::Value::try_from(Config::default()) else {
        return;
    };
    let mut unknown_sections = Vec::new();
    for (section, value) in table.iter_mut() {
        match (known.get(section), value) {
            (None, _) => {
                problems.push(named(
                    format!("unknown section or key {section:?}"),
                    section,
                    sources,
                ));
                unknown_sections.push(section.clone());
            }
            (Some(_), _) if section == "planner" => {}
            (Some(toml::Value::Table(known_keys)), toml::Value::Table(keys)) => {
                let unknown: Vec<String> = keys
                    .keys()
                    .filter(|key| !known_keys.contains_key(*key))
                    .cloned()
                    .collect();
                for key in unknown {
                    let path = format!("{section}.{key}");
                    problems.push(named(format!("unknown key {path}"), &path, sources));
                    keys.remove(&key);
                }
            }
            (Some(_), _) => {
                problems.push(attribute(format!("{section} must be a section"), sources));
                unknown_sections.push(section.clone());
            }
        }
    }
    for section in unknown_sections {
        table.remove(&section);
    }
}

/// The dotted key a deserialization error points at in `text` (as `toml::to_string` writes a
/// table: `[section.sub]` headers, then `key = value` lines).
fn error_key(error: &toml::de::Error, text: &str) -> Option<String> {
    let start = error.span()?.start;
    let before = text.get(..start)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next()?.trim();
    let (key, _) = line.split_once('=')?;
    let key = unquote(key.trim());
    let section = before
        .get(..line_start)?
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| {
            header
                .trim_matches(|c| c == '[' || c == ']')
                .split('.')
                .map(|part| unquote(part.trim()))
                .collect::<Vec<_>>()
                .join(".")
        });
    Some(match section {
        Some(section) if !section.is_empty() => format!("{section}.{key}"),
        _ => key,
    })
}

fn unquote(part: &str) -> String {
    part.trim_matches(|c| c == '"' || c == '\'').to_owned()
}

/// Puts `key` back to its value in `defaults` (or removes it when it has none). Whether the
/// table changed.
fn reset_to_default(table: &mut toml::Table, defaults: &toml::Table, key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    let Some((last, sections)) = parts.split_last() else {
        return false;
    };
    let mut current = table;
    let mut default = Some(defaults);
    for part in sections {
        match current.get_mut(*part) {
            Some(toml::Value::Table(t)) => current = t,
            _ => return false,
        }
        default = default
            .and_then(|d| d.get(*part))
            .and_then(toml::Value::as_table);
    }
    match default.and_then(|d| d.get(*last)) {
        Some(value) if current.get(*last) != Some(value) => {
            current.insert((*last).to_owned(), value.clone());
            true
        }
        Some(_) => false,
        None => current.remove(*last).is_some(),
    }
}

/// Where each key was set: `key.path` to "--set key.path", "environment variable PLANNER_…" or
/// the file's name.
type Sources = std::collections::BTreeMap<String, String>;

/// The most type problems reported in one run (each costs a parse).
const MAX_TYPE_PROBLEMS: usize = 64;

fn record_file_keys(table: &toml::Table, prefix: &str, file: &str, sources: &mut Sources) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => record_file_keys(inner, &path, file, sources),
            _ => {
                sources.insert(path, file.to_owned());
            }
        }
    }
}

/// `problem`, which starts with the key it is about, with where that key was set when it was
/// not left at its default.
fn attribute(problem: String, sources: &Sources) -> String {
    let source = sources
        .iter()
        .filter(|(key, _)| {
            problem
                .strip_prefix(key.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', ':']))
        })
        .max_by_key(|(key, _)| key.len())
        .map(|(_, source)| source);
    match source {
        Some(source) => format!("{problem} (set by {source})"),
        None => problem,
    }
}

/// `problem` about `key`, with where that key was set.
fn named(problem: String, key: &str, sources: &Sources) -> String {
    let source = sources
        .iter()
        .find(|(set, _)| *set == key || set.starts_with(&format!("{key}.")));
    match source {
        Some((_, source)) => format!("{problem} (set by {source})"),
        None => problem,
    }
}

/// The levels a `log.level` directive may end with.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a tracing filter: comma-separated directives, each a level or `target=level`. A
/// bare word that is no level is refused, though tracing would take it as a target name (with
/// every level), which turns every other log off.
fn check_log_level(filter: &str) -> Result<(), String> {
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LOG_LEVELS.contains(&level.trim().to_lowercase().as_str()) {
            return Err(format!(
                "log.level {filter:?}: {level:?} is not a level; use one of {} or target=level directives (e.g. \"planner_svc=debug,info\")",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("log.level {filter:?}: {e}"))
}
