//! Bearer tokens, each with a role, compared in constant time. Tokens never reach a log: the
//! config holds them as [`Secret`]s and nothing here prints one.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::config::{HttpConfig, HttpRole, Secret};

use super::error::ApiError;

/// The configured tokens and the role of a request without one.
#[derive(Clone)]
pub struct Tokens {
    tokens: Vec<(Vec<u8>, HttpRole)>,
    anonymous: HttpRole,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.tokens.len())
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

impl Tokens {
    /// The tokens of `config`.
    pub fn new(config: &HttpConfig) -> Self {
        let mut tokens = Vec::new();
        for (secret, role) in [
            (&config.viewer_tokens, HttpRole::Viewer),
            (&config.ui_tokens, HttpRole::Ui),
            (&config.operator_tokens, HttpRole::Operator),
        ] {
            tokens.extend(split(secret).map(|t| (t.as_bytes().to_vec(), role)));
        }
        Tokens {
            tokens,
            anonymous: config.anonymous,
        }
    }

    /// The role `presented` grants: every configured token is compared, in constant time for
    /// tokens of the same length, and the loop never stops early.
    pub fn role_of(&self, presented: &[u8]) -> Option<HttpRole> {
        let mut found = None;
        for (token, role) in &self.tokens {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = found.max(Some(*role));
            }
        }
        found
    }
}

fn split(secret: &Secret) -> impl Iterator<Item = &str> {
    secret
        .expose()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The role of the request being served, for handlers to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role(pub HttpRole);

impl Role {
    /// `Ok` if the role is at least `needed`, else a typed `forbidden` (403).
    pub fn require(self, needed: HttpRole) -> Result<(), ApiError> {
        if self.0 >= needed {
            Ok(())
        } else {
            Err(ApiError::new(
                crate::protocol::ErrorKind::Forbidden,
                format!(
                    "this needs the {} role; the token has {}",
                    needed.as_str(),
                    self.0.as_str()
                ),
            ))
        }
    }
}

/// The role of a request: its token's, or (without one) the anonymous role, which may be
/// `none`. A token that matches none is refused (401).
pub fn role_of(tokens: &Tokens, headers: &axum::http::HeaderMap) -> Result<HttpRole, ApiError> {
    match headers.get(header::AUTHORIZATION) {
        Some(value) => {
            let value = value.as_bytes();
            let token = value
                .strip_prefix(b"Bearer ")
                .or_else(|| value.strip_prefix(b"bearer "));
            token
                .and_then(|t| tokens.role_of(t))
                .ok_or_else(|| ApiError::unauthorized("the bearer token is not valid"))
        }
        None => Ok(tokens.anonymous),
    }
}

/// Reads `Authorization: Bearer <token>`, refuses a request with none (unless anonymous
/// requests have a role) or with an unknown one (401), and records the role for handlers.
pub async fn authenticate(
    State(tokens): State<std::sync::Arc<Tokens>>,
    mut request: Request,
    next: Next,
) -> Response {
    let role = match role_of(&tokens, request.headers()) {
        Ok(HttpRole::None) => {
            return ApiError::unauthorized("send Authorization: Bearer <token>").into_response()
        }
        Ok(role) => role,
        Err(error) => return error.into_response(),
    };
    request.extensions_mut().insert(Role(role));
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_token_grants_its_role_and_nothing_else_passes() {
        let config = HttpConfig {
            viewer_tokens: Secret::from("v1, v2"),
            ui_tokens: Secret::from("u1"),
            operator_tokens: Secret::from("o1"),
            ..HttpConfig::default()
        };
        let tokens = Tokens::new(&config);
        assert_eq!(tokens.role_of(b"v1"), Some(HttpRole::Viewer));
        assert_eq!(tokens.role_of(b"v2"), Some(HttpRole::Viewer));
        assert_eq!(tokens.role_of(b"u1"), Some(HttpRole::Ui));
        assert_eq!(tokens.role_of(b"o1"), Some(HttpRole::Operator));
        assert_eq!(tokens.role_of(b"o"), None);
        assert_eq!(tokens.role_of(b"o1 "), None);
        assert_eq!(tokens.role_of(b""), None);
        assert!(!format!("{tokens:?}").contains("o1"));
        assert!(Role(HttpRole::Ui).require(HttpRole::Viewer).is_ok());
        assert!(Role(HttpRole::Viewer).require(HttpRole::Ui).is_err());
    }
}
