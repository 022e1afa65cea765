//! Exporting spans over OTLP/HTTP, and the spans of attempts.
//!
//! Off unless an endpoint is configured (`tracing.otlp_endpoint`, or the OpenTelemetry
//! variables `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and `OTEL_EXPORTER_OTLP_ENDPOINT`, see
//! [`endpoint`]). When on, `main.rs` puts [`layer`] beside the log's layer: the daemon's
//! `tracing` spans become OpenTelemetry spans, batched (`BatchSpanProcessor`, a queue of
//! 2,048 spans that drops rather than waits when full) and sent as protobuf over HTTP. The
//! processor exports from a thread of its own; its requests run on the daemon's runtime
//! ([`ExportClient`]), so no runtime thread ever blocks on the collector. [`Exporter::shutdown`]
//! flushes what is queued when the daemon stops.
//!
//! Which spans (the names `docs/observability.md` lists): the edge's (`trace.rs`, a child of the
//! incoming `traceparent`), `command` (session, command, task, attempt), `append`, `publish`,
//! and one `dispatch` or `question` per message sent, whose context is the message's
//! `traceparent`. An attempt's span ([`after_append`]) is emitted when the attempt ends, from
//! its dispatch to its end by the events' own timestamps. Spans below INFO are turned on for
//! the exporter only: without it they cost a disabled callsite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry::KeyValue;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use planner_core::{Event, NodeKind, PlannerState, TaskId, TaskStatus, Timestamp};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::TracingConfig;

/// The instrumentation scope of the daemon's spans.
pub const SCOPE: &str = "planner-svc";
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop waits for the queued spans to go out.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest collector response read (OTLP's are a few bytes).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Where spans go: `tracing.otlp_endpoint` with `/v1/traces` appended; else
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is; else `OTEL_EXPORTER_OTLP_ENDPOINT` with
/// `/v1/traces` appended (the OpenTelemetry specification's rules). `None`: no export (also
/// when `OTEL_SDK_DISABLED=true` and the setting is empty). `Err`: a variable that is not an
/// http(s) URL.
pub fn endpoint(
    config: &TracingConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    let signal = |base: &str| format!("{}/v1/traces", base.trim_end_matches('/'));
    if !config.otlp_endpoint.is_empty() {
        return Ok(Some(signal(&config.otlp_endpoint)));
    }
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let (name, url) = match (
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        set("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(url), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url.trim().to_owned()),
        (None, Some(base)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", signal(base.trim())),
        (None, None) => return Ok(None),
    };
    crate::config::check_otlp_endpoint(&url).map_err(|e| format!("{name} {url:?}: {e}"))?;
    Ok(Some(url))
}

/// The exporter's provider, to flush and stop when the daemon stops.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts exporting to `url` (the full `/v1/traces` URL), with requests run on `runtime`.
    pub fn start(
        url: &str,
        config: &TracingConfig,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Exporter> {
        let client = reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build()?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_http_client(ExportClient {
                client,
                runtime,
                url: url.to_owned(),
            })
            .build()?;
        // `Resource::builder` reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(config.service_name.clone());
        }
        let resource = resource
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        crate::trace::set_exporting();
        Ok(Exporter { provider })
    }

    /// The `tracing` layer that turns the daemon's spans into exported ones: spans of the
    /// planner's crates from DEBUG up, events (as span events) from INFO up, and WARN and
    /// ERROR events of every crate, inside a span.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::Layer as _;
        let filter = tracing_subscriber::filter::filter_fn(|meta| {
            let ours = meta.target().starts_with("planner");
            let level = *meta.level();
            if meta.is_span() {
                ours && level <= tracing::Level::DEBUG
            } else {
                level <= tracing::Level::WARN || (ours && level <= tracing::Level::INFO)
            }
        });
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(SCOPE))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_filter(filter)
    }

    /// Exports what is queued and stops, within a few seconds. Call it from outside the
    /// runtime (it blocks) while the runtime still runs (the requests run on it).
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(%error, "could not export every span before stopping");
        }
    }
}

/// The exporter's HTTP client: the workspace's reqwest (rustls), its requests spawned on the
/// daemon's runtime. The batch processor calls it from its own thread, outside any runtime,
/// and waits there for the spawned request.
#[derive(Debug)]
struct ExportClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    url: String,
}

/// When the last export failure was logged, in seconds since the epoch, and failures since.
static LAST_WARNED_S: AtomicU64 = AtomicU64::new(0);
static FAILURES: AtomicU64 = AtomicU64::new(0);

impl ExportClient {
    /// Logs a failed export, at most once a minute (the collector may be down for long).
    fn failed(&self, why: &str) {
        let failures = FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = LAST_WARNED_S.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 60
            && LAST_WARNED_S
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            FAILURES.store(0, Ordering::Relaxed);
            tracing::warn!(endpoint = %self.url, failures, "exporting spans failed: {why}; their batches are dropped");
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let sent = self
            .runtime
            .spawn(async move {
                let mut response = client.execute(request).await?;
                let status = response.status();
                let headers = std::mem::take(response.headers_mut());
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await? {
                    if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await;
        let (status, headers, body) = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                self.failed(&error.to_string());
                return Err(Box::new(error));
            }
            Err(error) => {
                self.failed(&error.to_string());
                return Err(Box::new(error));
            }
        };
        if !status.is_success() {
            self.failed(&format!("the collector answered {status}"));
        }
        let mut response = Response::builder().status(status).body(Bytes::from(body))?;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

fn system_time(at: Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(at.as_millis())
}

/// Emits a span for each attempt `events` ended (completed, failed, timed out, cancelled),
/// from its dispatch to its end by the events' timestamps, with session, task, attempt,
/// kind and outcome: the child of the current span (the command that ended it). `after` is
/// the session's state with the events applied. Nothing when spans are not exported.
pub fn after_append(session: &str, after: &PlannerState, events: &[Event]) {
    if !crate::trace::exporting() {
        return;
    }
    for event in events {
        let (task_id, attempt, outcome, at) = match event {
            Event::TaskStatusUpdated {
                task_id,
                attempt,
                status,
                error,
                at,
                ..
            } if *attempt > 0 => {
                let outcome = match status {
                    TaskStatus::Completed => "completed",
                    TaskStatus::Failed if crate::metrics::timed_out(error.as_deref()) => {
                        "timed_out"
                    }
                    TaskStatus::Failed => "failed",
                    _ => continue,
                };
                (task_id, *attempt, outcome, *at)
            }
            Event::RetryScheduled {
                task_id,
                attempt,
                error,
                at,
                ..
            } => {
                let outcome = if crate::metrics::timed_out(Some(error)) {
                    "timed_out"
                } else {
                    "failed"
                };
                (task_id, *attempt, outcome, *at)
            }
            Event::TaskCancelled {
                task_id,
                cmd: Some(cmd),
                at,
                ..
            } => (task_id, cmd.attempt(), "cancelled", *at),
            _ => continue,
        };
        attempt_span(session, after, task_id, attempt, outcome, at);
    }
}

fn attempt_span(
    session: &str,
    after: &PlannerState,
    task_id: &TaskId,
    attempt: u32,
    outcome: &'static str,
    ended: Timestamp,
) {
    let Some(task) = after.task(task_id) else {
        return;
    };
    // The state holds the current attempt's dispatch only; a question is not an attempt.
    let Some(dispatched) = task.dispatched_at.filter(|_| task.attempts == attempt) else {
        return;
    };
    if task.kind == NodeKind::Clarification {
        return;
    }
    let tracer = opentelemetry::global::tracer(SCOPE);
    let parent = tracing::Span::current().context();
    let mut span = tracer
        .span_builder("attempt")
        .with_kind(SpanKind::Internal)
        .with_start_time(system_time(dispatched))
        .with_attributes([
            KeyValue::new("session", session.to_owned()),
            KeyValue::new("task", task_id.to_string()),
            KeyValue::new("attempt", i64::from(attempt)),
            KeyValue::new("kind", task.kind.as_str()),
            KeyValue::new("outcome", outcome),
        ])
        .start_with_context(&tracer, &parent);
    if outcome != "completed" {
        span.set_status(Status::error(outcome));
    }
    span.end_with_timestamp(system_time(ended));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_endpoint_follows_the_setting_then_the_opentelemetry_variables() {
        let mut config = TracingConfig::default();
        assert_eq!(endpoint(&config, env(&[])), Ok(None));
        let base = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")];
        assert_eq!(
            endpoint(&config, env(&base)),
            Ok(Some("http://collector:4318/v1/traces".into()))
        );
        let both = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://traces:4318/custom",
            ),
        ];
        assert_eq!(
            endpoint(&config, env(&both)),
            Ok(Some("https://traces:4318/custom".into()))
        );
        let disabled = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert_eq!(endpoint(&config, env(&disabled)), Ok(None));
        let bad = [("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")];
        assert!(endpoint(&config, env(&bad))
            .unwrap_err()
            .contains("OTEL_EXPORTER_OTLP_ENDPOINT"));
        // The setting wins over every variable.
        config.otlp_endpoint = "http://127.0.0.1:4318".into();
        assert_eq!(
            endpoint(&config, env(&disabled)),
            Ok(Some("http://127.0.0.1:4318/v1/traces".into()))
        );
    }
}
