//! Test helpers shared by the workspace's integration tests.
//!
//! [`NatsServer`] starts a real `nats-server -js` on a free loopback port with its own store
//! directory, and kills it when dropped. Tests never mock the bus or the store.
//! [`NatsCluster`] starts several of them routed into one JetStream cluster on loopback ports.
//! [`llm_server::ScriptedServer`] is a scripted chat-completions endpoint for LLM tests.

pub mod llm_server;
pub mod nats_cluster;
pub mod nats_server;

pub use nats_cluster::NatsCluster;
pub use nats_server::{NatsServer, NatsServerError};
