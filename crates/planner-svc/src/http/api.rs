//! The JSON endpoints: sessions, their state (now or at any version), their events, and
//! client commands. Every write goes through [`Engine::handle`] (the session's lock, persist
//! then publish); every read through [`Engine::read`] or the store.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use planner_core::{Event, Planner, PlannerState};
use planner_store::EventStore;
use serde::{Deserialize, Serialize};

use crate::config::HttpRole;
use crate::engine::{Publisher, SessionSummary};
use crate::protocol::{ClientCommand, ErrorKind};

use super::auth::Role;
use super::error::ApiError;
use super::index::ListQuery;
use super::Api;

/// Longest `Idempotency-Key` accepted (the core's limit on request ids).
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The query of `GET /api/sessions`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only sessions of this status: not-started, running, asking, completed, failed,
    /// cancelled.
    pub status: Option<String>,
    /// Only sessions one of whose requests contains this text (ignoring case).
    pub q: Option<String>,
    /// Skip this many (default 0).
    pub offset: Option<usize>,
    /// At most this many (default 50, at most `http.max_page`).
    pub limit: Option<usize>,
}

/// One page of sessions, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionPage {
    /// The sessions.
    pub sessions: Vec<SessionSummary>,
    /// How many sessions the filter selects in all.
    pub total: usize,
    /// The offset of the next page, if there is one.
    pub next_offset: Option<usize>,
    /// False while the start-up scan of the store is still running (older sessions may be
    /// missing).
    pub complete: bool,
}

/// The query of `GET /api/sessions/{id}`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StateParams {
    /// Time travel: the state after the first `at` events (`Planner::fold` of that prefix).
    /// Default: the latest.
    pub at: Option<u64>,
}

/// A session's folded state.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionView {
    /// Its summary at `state.version`: what the list shows for that version.
    pub summary: SessionSummary,
    /// The session's latest version (the state may be older, with `at`).
    pub latest_version: u64,
    /// The state (`PlannerState`, see `docs/schemas/`).
    #[schema(value_type = Object)]
    pub state: PlannerState,
}

/// The query of `GET /api/sessions/{id}/events`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// The first event, counting from 0 (default 0).
    pub from: Option<u64>,
    /// At most this many (default 500, at most `http.max_page`).
    pub limit: Option<usize>,
}

/// An event with its position.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PositionedEvent {
    /// The session's version after this event (its position counting from 1): the SSE `id`.
    pub version: u64,
    /// The event (`docs/schemas/event.json`).
    #[schema(value_type = Object)]
    pub event: Event,
}

/// One page of a session's events.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventPage {
    /// The events, oldest first.
    pub events: Vec<PositionedEvent>,
    /// The session's version when read.
    pub version: u64,
    /// The `from` of the next page, if there is one.
    pub next: Option<u64>,
}

/// What an accepted command did.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommandResult {
    /// The session.
    pub session: String,
    /// The session's version after the command.
    pub version: u64,
    /// The events it caused, persisted (none for a retry the session had seen).
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Event>,
}

/// Who the caller is.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// The role of the token (or of anonymous requests): none, viewer, ui or operator.
    pub role: String,
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorKind::TooLarge, rejection.body_text())
        } else {
            ApiError::new(ErrorKind::Malformed, rejection.body_text())
        }
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.chars().count() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::Malformed,
                format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                ),
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// Decodes a client command, with the request id from `Idempotency-Key` (which must agree
/// with a `request_id` in the body, if both are given).
fn command(bytes: &[u8], key: Option<String>) -> Result<ClientCommand, ApiError> {
    let command = ClientCommand::decode(bytes)?;
    match (command, key) {
        (
            ClientCommand::Initialize {
                request_id,
                input,
                attachments,
                plan,
                planning,
            },
            Some(key),
        ) => {
            if request_id.as_ref().is_some_and(|id| *id != key) {
                return Err(ApiError::new(
                    ErrorKind::Malformed,
                    "request_id and Idempotency-Key differ: send one, or the same in both",
                ));
            }
            Ok(ClientCommand::Initialize {
                request_id: Some(key),
                input,
                attachments,
                plan,
                planning,
            })
        }
        (command, _) => Ok(command),
    }
}

/// Handles `command` in the trace its request's `traceparent` header names (a new one without).
async fn run_command<S: EventStore, P: Publisher>(
    api: &Api<S, P>,
    session: &str,
    command: ClientCommand,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let context = crate::trace::context_of_value(
        headers
            .get(crate::trace::HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let handling = api
        .engine
        .handle(session, command.into_command(api.engine.now()));
    let handled = crate::trace::scope(context, crate::trace::Edge::Command, handling).await?;
    let status = if handled.events.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(CommandResult {
            session: session.to_owned(),
            version: handled.version,
            events: handled.events,
        }),
    )
        .into_response())
}

/// `GET /api/whoami`: the caller's role; `none` without a token when anonymous requests
/// have no role (the console then asks for a token). Needs no token itself.
#[utoipa::path(get, path = "/api/whoami", tag = "sessions", security(()),
    responses((status = 200, body = WhoAmI), (status = 401, description = "A token that is not valid", body = ErrorBody)))]
pub async fn whoami(
    State(tokens): State<Arc<super::auth::Tokens>>,
    headers: HeaderMap,
) -> Result<Json<WhoAmI>, ApiError> {
    let role = super::auth::role_of(&tokens, &headers)?;
    Ok(Json(WhoAmI {
        role: role.as_str().to_owned(),
    }))
}

/// `GET /api/sessions`
#[utoipa::path(get, path = "/api/sessions", tag = "sessions", params(ListParams),
    responses((status = 200, body = SessionPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list<S: EventStore, P: Publisher>(
    State(api): State<Arc<Api<S, P>>>,
    Extension(role): Extension<Role>,
    Query(params): Query<ListParams>,
) -> Result<Json<SessionPage>, ApiError> {
    role.require(HttpRole::Viewer)?;
    if let Some(status) = &params.status {
        if !crate::engine::SESSION_STATUSES.contains(&status.as_str()) {
            return Err(ApiError::new(
                ErrorKind::Malformed,
                format!(
                    "status {status:?}: use one of {}",
                    crate::engine::SESSION_STATUSES.join(", ")
                ),
            ));
        }
    }
    let offset = params.offset.unwrap_or(0);
    let limit = params.limit.unwrap_or(50).clamp(1, api.config.max_page);
    let (sessions, total) = api.index.list(&ListQuery {
        status: params.status,
        search: params.q.filter(|q| !q.trim().is_empty()),
        offset,
        limit,
    });
    let next = offset.saturating_add(sessions.len());
    Ok(Json(SessionPage {
        sessions,
        total,
        next_offset: (next < total).then_some(next),
        complete: api.index.complete(),
    }))
}

/// `POST /api/sessions`: starts a session with an `initialize` command.
#[utoipa::path(post, path = "/api/sessions", tag = "commands",
    request_body(content = Object, description = "An `initialize` client command (docs/schemas/command.json)"),
    params(("Idempotency-Key" = Option<String>, Header, description = "The request id: a retry with the same key starts no second session")),
    responses((status = 201, body = CommandResult), (status = 200, description = "A retry: nothing new", body = CommandResult),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn start<S: EventStore, P: Publisher>(
    State(api): State<Arc<Api<S, P>>>,
    Extension(role): Extension<Role>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    role.require(HttpRole::Ui)?;
    let key = idempotency_key(&headers)?;
    let command = command(&body(bytes)?, key)?;
    let ClientCommand::Initialize { request_id, .. } = &command else {
        return Err(ApiError::new(
            ErrorKind::Malformed,
            format!(
                "a session starts with an initialize command, not {}: send it to /api/sessions/{{id}}/commands",
                command.command_type()
            ),
        ));
    };
    // With a request id, the session id is derived from it: a retry reaches the same session,
    // where the core recognises the request id and changes nothing.
    let session = match request_id {
        Some(id) => uuid::Uuid::new_v5(&SESSION_NAMESPACE, id.as_bytes())
            .simple()
            .to_string(),
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    run_command(&api, &session, command, &headers).await
}

/// The namespace of session ids derived from idempotency keys.
const SESSION_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a1f_3c52_90d4_4e0b_9a57_1b2c_7d8e_4f60);

/// `POST /api/sessions/{id}/commands`: any client command.
#[utoipa::path(post, path = "/api/sessions/{id}/commands", tag = "commands",
    params(("id" = String, Path, description = "The session"),
        ("Idempotency-Key" = Option<String>, Header, description = "For initialize (a follow-up): its request id")),
    request_body(content = Object, description = "A client command (docs/schemas/command.json): initialize, answer_clarification, cancel, continue"),
    responses((status = 201, body = CommandResult), (status = 200, description = "Nothing changed", body = CommandResult),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn send<S: EventStore, P: Publisher>(
    State(api): State<Arc<Api<S, P>>>,
    Extension(role): Extension<Role>,
    Path(session): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    role.require(HttpRole::Ui)?;
    let key = idempotency_key(&headers)?;
    let command = command(&body(bytes)?, key)?;
    // Only an initialize may create a session; anything else needs one that exists.
    if !matches!(command, ClientCommand::Initialize { .. })
        && existing_version(&api, &session).await? == 0
    {
        return Err(ApiError::no_session(&session));
    }
    run_command(&api, &session, command, &headers).await
}

async fn existing_version<S: EventStore, P: Publisher>(
    api: &Api<S, P>,
    session: &str,
) -> Result<u64, ApiError> {
    if !planner_core::is_valid_token(session) {
        return Err(crate::engine::EngineError::BadSession(session.to_owned()).into());
    }
    Ok(api.engine.store().version(session).await?)
}

/// `GET /api/sessions/{id}`: the folded state, now or (with `at`) at any version.
#[utoipa::path(get, path = "/api/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The session"), StateParams),
    responses((status = 200, body = SessionView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn state<S: EventStore, P: Publisher>(
    State(api): State<Arc<Api<S, P>>>,
    Extension(role): Extension<Role>,
    Path(session): Path<String>,
    Query(params): Query<StateParams>,
) -> Result<Json<SessionView>, ApiError> {
    role.require(HttpRole::Viewer)?;
    let latest = api.engine.read(&session).await?;
    let latest_version = latest.version();
    if latest_version == 0 {
        return Err(ApiError::no_session(&session));
    }
    // What a reader sees here, the list shows too.
    api.index.put_state(&session, latest.state());
    let planner = match params.at {
        None => latest,
        Some(at) if at == latest_version => latest,
        Some(at) if at > latest_version => {
            return Err(ApiError::new(
                ErrorKind::Malformed,
                format!("at = {at} is past the session's end (version {latest_version})"),
            ))
        }
        Some(at) => {
            let events = api.engine.store().load_from(&session, 0).await?;
            let prefix = usize::try_from(at).unwrap_or(usize::MAX).min(events.len());
            Planner::fold(events.get(..prefix).unwrap_or_default())
        }
    };
    Ok(Json(SessionView {
        summary: SessionSummary::of(&session, planner.state()),
        latest_version,
        state: planner.state().clone(),
    }))
}

/// `GET /api/sessions/{id}/events`: one page of the session's events.
#[utoipa::path(get, path = "/api/sessions/{id}/events", tag = "sessions",
    params(("id" = String, Path, description = "The session"), EventParams),
    responses((status = 200, body = EventPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn events<S: EventStore, P: Publisher>(
    State(api): State<Arc<Api<S, P>>>,
    Extension(role): Extension<Role>,
    Path(session): Path<String>,
    Query(params): Query<EventParams>,
) -> Result<Json<EventPage>, ApiError> {
    role.require(HttpRole::Viewer)?;
    let version = existing_version(&api, &session).await?;
    if version == 0 {
        return Err(ApiError::no_session(&session));
    }
    let from = params.from.unwrap_or(0);
    let limit = params.limit.unwrap_or(500).clamp(1, api.config.max_page);
    let loaded = api.engine.store().load_from(&session, from).await?;
    let end = from.saturating_add(loaded.len() as u64);
    let events: Vec<PositionedEvent> = loaded
        .into_iter()
        .take(limit)
        .zip(from + 1..)
        .map(|(event, version)| PositionedEvent { version, event })
        .collect();
    let next = from.saturating_add(events.len() as u64);
    Ok(Json(EventPage {
        events,
        version: end.max(version),
        next: (next < end).then_some(next),
    }))
}

/// The body of `POST /api/sessions/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// Fork after the source's first `at` events (default: all of them).
    #[serde(default)]
    pub at: Option<u64>,
}

/// `POST /api/sessions/{id}/fork`: a new session from the source's first `at` events.
#[utoipa::path(post, path = "/api/sessions/{id}/fork", tag = "commands",
    params(("id" = String, Path, description = "The source session"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key reaches the same fork")),
    request_body = ForkRequest,
    responses((status = 201, description = "The new session and its events", body = CommandResult),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn fork<S: EventStore, P: Publisher>(
    State(api): State<Arc<Api<S, P>>>,
    Extension(role): Extension<Role>,
    Path(source): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    role.require(HttpRole::Operator)?;
    let key = idempotency_key(&headers)?;
    let bytes = body(bytes)?;
    let request: ForkRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        ForkRequest::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(ErrorKind::Malformed, format!("not a fork request: {e}")))?
    };
    let latest = existing_version(&api, &source).await?;
    if latest == 0 {
        return Err(ApiError::no_session(&source));
    }
    let at = request.at.unwrap_or(latest);
    let target = match &key {
        Some(key) => uuid::Uuid::new_v5(
            &SESSION_NAMESPACE,
            format!("fork:{source}:{key}").as_bytes(),
        )
        .simple()
        .to_string(),
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    let existing = existing_version(&api, &target).await?;
    if key.is_some() && existing > 0 {
        // A retry: the fork exists already.
        return Ok((
            StatusCode::OK,
            Json(CommandResult {
                session: target,
                version: existing,
                events: Vec::new(),
            }),
        )
            .into_response());
    }
    let handled = api.engine.fork(&source, at, &target).await?;
    Ok((
        StatusCode::CREATED,
        Json(CommandResult {
            session: target,
            version: handled.version,
            events: handled.events,
        }),
    )
        .into_response())
}

// The OpenAPI document names this type.
#[allow(unused_imports)]
use crate::protocol::ErrorBody;
