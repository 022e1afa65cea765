//! The OpenAPI 3.1 document, generated from the handlers' annotations and the types
//! (`utoipa`); `docs/openapi.json` is kept equal to it by a test.

use axum::Json;
use utoipa::OpenApi;

use super::{api, live};

#[derive(OpenApi)]
#[openapi(
    info(title = "planner HTTP API", description = "Sessions, their events and live streams, and client commands. See docs/http.md."),
    paths(api::whoami, api::list, api::start, api::send, api::state, api::events, live::session, live::sessions),
    components(schemas(crate::protocol::ErrorBody, crate::protocol::ErrorKind)),
    modifiers(&Bearer),
    security(("bearer" = [])),
    tags((name = "sessions", description = "Reading sessions"), (name = "commands", description = "Client commands"), (name = "live", description = "Server-sent events"))
)]
struct Doc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as JSON.
pub fn document() -> serde_json::Value {
    serde_json::to_value(Doc::openapi()).unwrap_or_default()
}

/// `GET /api/openapi.json`
pub async fn serve() -> Json<serde_json::Value> {
    Json(document())
}
