//! The OpenAPI 3.1 document, generated from the handlers' annotations and the types
//! (`utoipa`); `docs/openapi.json` is kept equal to it by a test.

use axum::Json;
use utoipa::OpenApi;

use super::{api, live};

#[derive(OpenApi)]
#[openapi(
    info(title = "planner HTTP API", description = "Sessions, their events and live streams, and client commands. See docs/http.md."),
    paths(api::whoami, api::list, api::start, api::send, api::fork, api::state, api::events, live::session, live::sessions),
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

/// The document as JSON: utoipa's paths and HTTP types, with the wire types the API shares
/// with NATS (`ClientCommand`, `Event`) as their JSON Schemas from `schemars` (the same ones
/// as `docs/schemas/`; OpenAPI 3.1 schemas are JSON Schema 2020-12), so the two cannot drift.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(Doc::openapi()).unwrap_or_default();
    let mut schemas = serde_json::Map::new();
    for (name, schema) in [
        (
            "ClientCommand",
            schemars::schema_for!(crate::protocol::ClientCommand),
        ),
        ("Event", schemars::schema_for!(planner_core::Event)),
    ] {
        let mut schema = serde_json::to_value(schema).unwrap_or_default();
        if let Some(object) = schema.as_object_mut() {
            object.remove("$schema");
            if let Some(serde_json::Value::Object(defs)) = object.remove("$defs") {
                schemas.extend(defs);
            }
        }
        schemas.insert(name.to_owned(), schema);
    }
    let mut schemas = serde_json::Value::Object(schemas);
    rewrite_refs(&mut schemas);
    if let (Some(into), serde_json::Value::Object(from)) = (
        doc.pointer_mut("/components/schemas")
            .and_then(|s| s.as_object_mut()),
        schemas,
    ) {
        for (name, schema) in from {
            into.entry(name).or_insert(schema);
        }
    }
    let event = serde_json::json!({"$ref": "#/components/schemas/Event"});
    let command = serde_json::json!({"$ref": "#/components/schemas/ClientCommand"});
    for (pointer, value) in [
        ("/components/schemas/PositionedEvent/properties/event", &event),
        ("/components/schemas/CommandResult/properties/events/items", &event),
        ("/paths/~1api~1sessions/post/requestBody/content/application~1json/schema", &command),
        ("/paths/~1api~1sessions~1{id}~1commands/post/requestBody/content/application~1json/schema", &command),
    ] {
        if let Some(slot) = doc.pointer_mut(pointer) {
            *slot = value.clone();
        }
    }
    doc
}

/// `#/$defs/X` (schemars) to `#/components/schemas/X` (OpenAPI).
fn rewrite_refs(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(object) => {
            for (key, inner) in object.iter_mut() {
                match (key.as_str(), inner) {
                    ("$ref", serde_json::Value::String(target)) => {
                        if let Some(name) = target.strip_prefix("#/$defs/") {
                            *target = format!("#/components/schemas/{name}");
                        }
                    }
                    (_, inner) => rewrite_refs(inner),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

/// `GET /api/openapi.json`
pub async fn serve() -> Json<serde_json::Value> {
    Json(document())
}
