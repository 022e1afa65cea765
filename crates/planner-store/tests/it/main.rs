//! Integration tests of the stores, in one binary: one conformance suite run against all three
//! stores, file crash tests, and JetStream tests against a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod conformance;
mod file_crash;
mod fixtures;
mod jetstream;
mod support;
