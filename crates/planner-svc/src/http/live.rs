//! Live streams over server-sent events.
//!
//! - `GET /api/sessions/{id}/live`: the session's events from a position on, then as they are
//!   appended. Each SSE message is one event, its `id` the session's version after it (the
//!   event's position counting from 1), its data a [`PositionedEvent`]. A client that
//!   reconnects with `Last-Event-ID: N` (or `?from=N`) gets the events after the first N: none
//!   lost, none repeated. Catch-up reads the store; then the engine's append hook feeds the
//!   stream, and a gap (an append of another instance, or a lagging stream) is filled from the
//!   store, which is also polled every [`POLL`] for appends other instances made.
//! - `GET /api/live`: every session's summary as it changes (the list view), SSE event
//!   `summary`. It has no resume: a client that reconnects reloads the list.
//!
//! Both send a keep-alive comment every `http.keep_alive_s`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use planner_store::EventStore;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

use crate::config::HttpRole;
use crate::engine::Publisher;
use crate::protocol::ErrorKind;

use super::api::PositionedEvent;
use super::auth::Role;
use super::error::ApiError;
use super::Api;

/// How often a live session stream checks the store for appends this instance did not make.
pub const POLL: Duration = Duration::from_secs(2);

/// Messages buffered per live stream before the producer waits for the client.
const BUFFER: usize = 256;

/// The query of `GET /api/sessions/{id}/live`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LiveParams {
    /// Start after the first `from` events (default: `Last-Event-ID`, else 0: everything).
    pub from: Option<u64>,
}

type SseStream = Sse<
    axum::response::sse::KeepAliveStream<
        futures::stream::BoxStream<'static, Result<SseEvent, Infallible>>,
    >,
>;

fn stream_of(rx: mpsc::Receiver<SseEvent>, keep_alive: Duration) -> SseStream {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    let stream: futures::stream::BoxStream<'static, Result<SseEvent, Infallible>> =
        Box::pin(stream);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(keep_alive))
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    headers
        .get("last-event-id")
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::Malformed,
                        "Last-Event-ID must be a version number",
                    )
                })
        })
        .transpose()
}

/// `GET /api/sessions/{id}/live`
#[utoipa::path(get, path = "/api/sessions/{id}/live", tag = "live",
    params(("id" = String, Path, description = "The session"), LiveParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this version")),
    responses((status = 200, description = "text/event-stream: one message per event, `id` = version, data = PositionedEvent", content_type = "text/event-stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn session<S: EventStore, P: Publisher>(
    State(api): State<Arc<Api<S, P>>>,
    Extension(role): Extension<Role>,
    Path(session): Path<String>,
    Query(params): Query<LiveParams>,
    headers: HeaderMap,
) -> Result<SseStream, ApiError> {
    role.require(HttpRole::Viewer)?;
    if !planner_core::is_valid_token(&session) {
        return Err(crate::engine::EngineError::BadSession(session).into());
    }
    let from = match last_event_id(&headers)? {
        Some(id) => id,
        None => params.from.unwrap_or(0),
    };
    if api.engine.store().version(&session).await? == 0 {
        return Err(ApiError::no_session(&session));
    }
    // Subscribed before the catch-up read, so nothing appended in between is missed.
    let appends = api.engine.observe();
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(follow(Arc::clone(&api), session, from, appends, tx));
    Ok(stream_of(rx, api.keep_alive()))
}

fn message(version: u64, event: planner_core::Event) -> SseEvent {
    let data = serde_json::to_string(&PositionedEvent { version, event }).unwrap_or_default();
    SseEvent::default().id(version.to_string()).data(data)
}

/// Sends `session`'s events after the first `next` to `tx` until the client goes away.
async fn follow<S: EventStore, P: Publisher>(
    api: Arc<Api<S, P>>,
    session: String,
    mut next: u64,
    mut appends: broadcast::Receiver<Arc<crate::engine::Appended>>,
    tx: mpsc::Sender<SseEvent>,
) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut catch_up = true;
    loop {
        if catch_up {
            catch_up = false;
            match api.engine.store().load_from(&session, next).await {
                Ok(events) => {
                    for event in events {
                        next += 1;
                        if tx.send(message(next, event)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(session, %error, "a live stream could not read the store; retrying");
                }
            }
        }
        tokio::select! {
            () = tx.closed() => return,
            () = api.shutdown.cancelled() => return,
            _ = poll.tick() => {
                if api.engine.store().version(&session).await.is_ok_and(|v| v > next) {
                    catch_up = true;
                }
            }
            received = appends.recv() => match received {
                Ok(appended) if appended.session == session => {
                    if appended.from > next {
                        // Appends we did not see (another instance's): read them.
                        catch_up = true;
                        continue;
                    }
                    let skip = usize::try_from(next - appended.from).unwrap_or(usize::MAX);
                    for event in appended.events.iter().skip(skip) {
                        next += 1;
                        if tx.send(message(next, event.clone())).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => catch_up = true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// `GET /api/live`
#[utoipa::path(get, path = "/api/live", tag = "live",
    responses((status = 200, description = "text/event-stream: event `summary`, data = SessionSummary, one per change", content_type = "text/event-stream"),
        (status = 401, body = ErrorBody)))]
pub async fn sessions<S: EventStore, P: Publisher>(
    State(api): State<Arc<Api<S, P>>>,
    Extension(role): Extension<Role>,
) -> Result<SseStream, ApiError> {
    role.require(HttpRole::Viewer)?;
    let mut changes = api.index.changes();
    let (tx, rx) = mpsc::channel(BUFFER);
    let shutdown = api.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let summary = tokio::select! {
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
                received = changes.recv() => match received {
                    Ok(summary) => summary,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Tell the client to reload the list.
                        if tx.send(SseEvent::default().event("reload").data("{}")).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            let data = serde_json::to_string(summary.as_ref()).unwrap_or_default();
            if tx
                .send(SseEvent::default().event("summary").data(data))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok(stream_of(rx, api.keep_alive()))
}

#[allow(unused_imports)]
use crate::protocol::ErrorBody;
