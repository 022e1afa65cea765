//! The planner daemon: the thin shell that runs `planner-core` planners for many sessions, keeps
//! their events in a `planner-store` store, and talks NATS.
//!
//! # Layout
//!
//! - `config.rs`: settings from `config/planner.toml`, `PLANNER_*` variables and flags.
//! - `protocol.rs`: subjects and wire messages (the code behind `docs/protocol.md`).
//! - `engine/`: sessions, the persist-then-publish loop, timers, the outbox. No transport; its
//!   IO goes through seams (`engine/seams.rs`).
//! - `bus.rs`: publishers: NATS (JetStream for dispatches) and an in-process channel.
//! - `serve.rs`: the daemon on NATS (`planner-svc serve`).
//! - `startup.rs`: its start-up steps, retried while the failure can pass, not when a setting
//!   must change.
//! - `partition.rs`: which partition a session falls into and which instance serves it (pure).
//! - `ownership.rs`: partition leases in a KV bucket, handed over on join, leave and death.
//! - `http/`: the HTTP API, live streams and the web console (`--http`).
//! - `client.rs`: the CLI's client of a daemon (`submit`, `watch`, `answer`, `cancel`).
//! - `embedded.rs`: the same engine in-process with the file store (`planner-svc run`).
//! - `progress.rs`: `watch`'s live view on a terminal (task lines, spinners, the overall line).
//! - `inspect.rs`: what `replay` and `sessions` print about a session.
//! - `check.rs`: the event-log consistency check (`planner-svc check`, and the daemon's pass).
//! - `metrics.rs`: the Prometheus metrics: names, the recorder, and the metrics derived from
//!   persisted events.
//! - `health.rs`: the admin listener (`/metrics`, `/livez`, `/readyz`) and what readiness means.
//! - `trace.rs`: W3C trace context (`traceparent`) from commands and reports to what they publish
//!   and append, and the trace a session's timers continue.
//! - `otel.rs`: exporting spans over OTLP/HTTP (off unless configured), and the attempts' spans.
//! - `sim.rs`: simulated executors shared by tests, `run` and the load generator.
//! - `executor.rs`: a simulated executor pool on NATS (`planner-svc executor`, the load generator).

pub mod bus;
pub mod check;
pub mod client;
pub mod config;
pub mod embedded;
pub mod engine;
pub mod executor;
pub mod health;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod otel;
pub mod ownership;
pub mod partition;
pub mod progress;
pub mod protocol;
pub mod recent;
pub mod serve;
pub mod sim;
pub mod startup;
pub mod trace;

/// `error` and its causes, `: `-separated, each said once: many errors print their source in
/// their own message and return it as their source too (`…: Not a directory (os error 20):
/// Not a directory (os error 20)`). What the CLI prints and the daemon's logs carry.
pub fn report(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}
