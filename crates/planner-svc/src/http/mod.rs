//! The HTTP API and the web console (`docs/http.md`): its own listener beside the daemon's
//! NATS endpoints (or beside `run`'s in-process bus), off unless `http.enabled`.
//!
//! - `api.rs`: sessions, state (time travel with `?at=`), events, client commands.
//! - `live.rs`: live streams over server-sent events, resumable with `Last-Event-ID`.
//! - `index.rs`: the in-memory list of sessions the list endpoint reads.
//! - `auth.rs`: bearer tokens and roles; `error.rs`: typed JSON errors.
//! - `openapi.rs`: the OpenAPI 3.1 document, generated from the types.
//! - `console.rs`: the web console's assets, embedded in the binary.
//!
//! Writes go through [`Engine::handle`], like commands on NATS; reads through
//! [`Engine::read`] and the store. Nothing here takes a session's lock itself.

pub mod api;
pub mod auth;
pub mod console;
pub mod error;
pub mod index;
pub mod live;
pub mod openapi;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use planner_store::EventStore;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::engine::{Engine, Publisher};
use crate::protocol::ErrorKind;

use self::auth::Tokens;
use self::error::ApiError;
use self::index::SessionIndex;

/// What the handlers share.
pub struct Api<S, P> {
    /// The engine every command goes through.
    pub engine: Arc<Engine<S, P>>,
    /// The list of sessions.
    pub index: Arc<SessionIndex>,
    /// The settings.
    pub config: HttpConfig,
    /// Ends the live streams (a server shutting down waits for its connections).
    pub shutdown: CancellationToken,
}

impl<S, P> std::fmt::Debug for Api<S, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<S, P> Api<S, P> {
    fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.config.keep_alive_s.max(1))
    }
}

/// The routes: the API under `/api`, the console at `/`.
pub fn router<S: EventStore, P: Publisher>(api: Arc<Api<S, P>>) -> Router {
    let tokens = Arc::new(Tokens::new(&api.config));
    let timeout = Duration::from_millis(api.config.request_timeout_ms.max(1));
    // Live streams last: the timeout covers the other requests only.
    let bounded = Router::new()
        .route(
            "/api/sessions",
            get(api::list::<S, P>).post(api::start::<S, P>),
        )
        .route("/api/sessions/{id}", get(api::state::<S, P>))
        .route("/api/sessions/{id}/events", get(api::events::<S, P>))
        .route("/api/sessions/{id}/commands", post(api::send::<S, P>))
        .route("/api/sessions/{id}/fork", post(api::fork::<S, P>))
        .layer(middleware::from_fn_with_state(timeout, time_limit));
    let live = Router::new()
        .route("/api/sessions/{id}/live", get(live::session::<S, P>))
        .route("/api/live", get(live::sessions::<S, P>));
    let protected = bounded
        .merge(live)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&tokens),
            auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(api.config.max_body_bytes))
        .with_state(Arc::clone(&api));
    let mut app = Router::new()
        .merge(protected)
        .route("/api/openapi.json", get(openapi::serve))
        .route(
            "/api/whoami",
            get(api::whoami).with_state(Arc::clone(&tokens)),
        )
        .merge(console::routes())
        .fallback(|request: Request| async move { ApiError::not_found(request.uri().path()) })
        .layer(middleware::from_fn(security_headers));
    if !api.config.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = api
            .config
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::HeaderName::from_static("idempotency-key"),
                    header::HeaderName::from_static("last-event-id"),
                ]),
        );
    }
    app
}

async fn time_limit(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "no answer within http.request_timeout_ms ({} ms)",
                limit.as_millis()
            ),
        )
        .into_response(),
    }
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Serves the API on `listener` until `shutdown`, keeping the session index meanwhile.
pub async fn serve_on<S: EventStore, P: Publisher>(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine<S, P>>,
    config: HttpConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let index = Arc::new(SessionIndex::new(config.index_max_sessions));
    tokio::spawn(Arc::clone(&index).maintain(Arc::clone(&engine), shutdown.clone()));
    let api = Arc::new(Api {
        engine,
        index,
        config,
        shutdown: shutdown.clone(),
    });
    let app = router(api);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving HTTP")
}

/// Binds `config.listen`: the address it listens on, and the listener.
pub async fn bind(config: &HttpConfig) -> anyhow::Result<(SocketAddr, tokio::net::TcpListener)> {
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding the HTTP listener to http.listen {}", config.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the HTTP listener's address")?;
    Ok((addr, listener))
}
