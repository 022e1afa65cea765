//! The web console: plain JavaScript modules and CSS with no build step, embedded in the
//! binary with `include_str!` (no CDN; works offline), served at `/`.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../../console/index.html");

/// The console's routes.
pub fn routes() -> Router {
    Router::new().route(
        "/",
        get(|| async {
            ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response()
        }),
    )
}
