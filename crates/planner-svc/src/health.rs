//! The admin listener of `serve` and `executor`: `/metrics` (Prometheus text), `/livez` and
//! `/readyz`, on `metrics.listen` (localhost by default; `""` turns it off).
//!
//! - `/livez` is 200 while the runtime answers: it checks no dependency, so a NATS outage
//!   never turns into a restart loop.
//! - `/readyz` is 200 only when NATS is connected, the streams and consumers are bound, the
//!   start-up recovery pass is done, and the daemon is not shutting down; otherwise 503 with
//!   the conditions that do not hold, one per line.
//!
//! The listener starts before the daemon connects to NATS, so an orchestrator sees a live but
//! unready process while it waits for its server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// What `/readyz` reports on. Shared between the daemon, which sets it, and the listener.
#[derive(Default)]
pub struct Health {
    client: OnceLock<async_nats::Client>,
    streams_bound: AtomicBool,
    recovered: AtomicBool,
    draining: AtomicBool,
    /// Sets gauges from the daemon's state just before `/metrics` renders.
    refresh: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("problems", &self.problems())
            .finish()
    }
}

impl Health {
    /// Nothing ready yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Health::default())
    }

    /// The NATS connection, once made: readiness follows its state from then on.
    pub fn connected(&self, client: &async_nats::Client) {
        let _ = self.client.set(client.clone());
    }

    /// The streams and consumers the daemon needs exist and are bound.
    pub fn streams_bound(&self) {
        self.streams_bound.store(true, Ordering::Relaxed);
    }

    /// The start-up recovery pass is done.
    pub fn recovered(&self) {
        self.recovered.store(true, Ordering::Relaxed);
    }

    /// Shutting down: no longer ready for new work.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// What to run before `/metrics` renders (the daemon's gauges).
    pub fn on_scrape(&self, refresh: impl Fn() + Send + Sync + 'static) {
        let _ = self.refresh.set(Box::new(refresh));
    }

    /// Why the process is not ready; empty when it is.
    pub fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        match self.client.get() {
            None => problems.push("nats: not connected yet"),
            Some(client) => {
                if client.connection_state() != async_nats::connection::State::Connected {
                    problems.push("nats: disconnected");
                }
            }
        }
        if !self.streams_bound.load(Ordering::Relaxed) {
            problems.push("streams: not bound yet");
        }
        if !self.recovered.load(Ordering::Relaxed) {
            problems.push("recovery: start-up pass not done");
        }
        if self.draining.load(Ordering::Relaxed) {
            problems.push("shutting down");
        }
        problems
    }
}

#[derive(Clone)]
struct Admin {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// Binds `listen` and serves the admin routes until `stop` is cancelled. Returns the bound address (`:0` picks a free port) and the task serving it.
pub async fn listen_on(
    listen: &str,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding metrics.listen {listen:?} (set it to \"\" to turn the admin listener off, or pick another port)"))?;
    let address = listener
        .local_addr()
        .context("reading the admin listener's address")?;
    if let Some(handle) = metrics.clone() {
        // Histograms are drained into their buckets by upkeep: keep it running between scrapes.
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => handle.run_upkeep(),
                }
            }
        });
    }
    let app = Router::new()
        .route("/metrics", get(metrics_route))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Admin { health, metrics });
    tracing::info!(%address, "admin listener (/metrics, /livez, /readyz)");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the admin listener stopped");
        }
    });
    Ok((address, task))
}

async fn metrics_route(State(admin): State<Admin>) -> Response {
    let Some(handle) = admin.metrics else {
        return (
            StatusCode::NOT_FOUND,
            "metrics are off (metrics.enabled = false)\n",
        )
            .into_response();
    };
    if let Some(refresh) = admin.health.refresh.get() {
        refresh();
    }
    let ready = if admin.health.problems().is_empty() {
        1.0
    } else {
        0.0
    };
    metrics::gauge!("planner_ready").set(ready);
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let problems = admin.health.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = problems.join("\n");
        body.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// The running admin listener of a process; stops with it (when dropped).
#[derive(Debug)]
pub struct AdminListener {
    /// What `/readyz` reports on.
    pub health: Arc<Health>,
    /// The bound address, when listening.
    pub address: Option<SocketAddr>,
    stop: CancellationToken,
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Installs the metrics recorder when `metrics.enabled`, and starts the listener on `listen`
/// unless it is empty (an address that cannot be bound is logged as an error, and the process
/// runs without the listener). `component` names the process in `planner_build_info`.
pub async fn start(
    config: &crate::config::MetricsConfig,
    listen: &str,
    component: &'static str,
) -> AdminListener {
    let health = Health::new();
    let stop = CancellationToken::new();
    let handle = config.enabled.then(|| crate::metrics::install(component));
    if let Some(handle) = handle.clone() {
        // Histograms keep every sample until they are rendered: without a scrape (no
        // listener, or no Prometheus) they grew for the life of the process (a saturation
        // run's daemon peaked at 98-115 MiB against 53 before). Upkeep folds them into their
        // buckets, as the exporter's own `install` would.
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::metrics::UPKEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => handle.run_upkeep(),
                }
            }
        });
    }
    // A taken port costs the probes and the metrics, not the planner: said loudly, not fatal
    // (the orchestrator's readiness probe then fails, which is how an operator hears of it).
    let address = if listen.is_empty() {
        None
    } else {
        match listen_on(listen, Arc::clone(&health), handle, stop.clone()).await {
            Ok((address, _task)) => Some(address),
            Err(error) => {
                tracing::error!(error = %crate::report(&error), "no admin listener: /metrics, /livez and /readyz are not served");
                None
            }
        }
    };
    AdminListener {
        health,
        address,
        stop,
    }
}
