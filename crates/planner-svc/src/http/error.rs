//! Typed JSON errors: the same [`ErrorBody`] and [`ErrorKind`]s as on NATS, with an HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::EngineError;
use crate::protocol::{ErrorBody, ErrorKind};

/// A refused request: its status and the body the client reads.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, as on NATS.
    pub body: ErrorBody,
}

impl ApiError {
    /// A refusal of `kind` with its usual status.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            status: status_of(kind),
            body: ErrorBody::new(kind, message),
        }
    }

    /// No (valid) token: 401, kind `forbidden`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            body: ErrorBody::new(ErrorKind::Forbidden, message),
        }
    }

    /// An unknown session: 404, kind `bad_session`.
    pub fn no_session(session: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            body: ErrorBody::new(ErrorKind::BadSession, format!("no session {session}")),
        }
    }

    /// Not a route: 404, kind `malformed`.
    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            body: ErrorBody::new(ErrorKind::Malformed, format!("no such endpoint: {path}")),
        }
    }
}

/// The status a kind is answered with: 400 malformed or bad_session, 413 too_large, 403
/// forbidden, 422 rejected, 409 conflict, 500 corrupt, 503 unavailable or busy (with
/// `Retry-After`).
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Malformed | ErrorKind::BadSession => StatusCode::BAD_REQUEST,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Corrupt => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unavailable | ErrorKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        ApiError::new(error.kind(), error.to_string())
    }
}

impl From<planner_store::StoreError> for ApiError {
    fn from(error: planner_store::StoreError) -> Self {
        EngineError::Store(error).into()
    }
}

impl From<ErrorBody> for ApiError {
    fn from(body: ErrorBody) -> Self {
        ApiError {
            status: status_of(body.kind),
            body,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"planner\""),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
