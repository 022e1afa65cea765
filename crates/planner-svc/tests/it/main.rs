//! Integration tests of planner-svc: the CLI as a user runs it, the config, and the daemon on a
//! real nats-server with executors and a UI on the bus.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod abandoned;
mod auth;
mod cli;
mod client;
mod cluster;
mod config;
mod daemon;
mod deploy;
mod engine_support;
mod handover;
mod harness;
mod http;
mod llm;
mod observability;
mod offers;
mod outbox;
mod ownership;
mod protocol;
mod pty;
mod recovery;
mod reports;
mod roles;
mod sim;
mod snapshots;
mod support;
