//! Where a planner's events live: one contract ([`EventStore`]), three stores.
//!
//! - [`MemoryStore`]: in a map, for tests and the embedded run.
//! - [`FileStore`]: an append-only log of framed, checksummed records with a configurable fsync
//!   policy and torn-tail recovery, for development and single-node use.
//! - [`JetStreamStore`]: a NATS JetStream stream, one subject per session, with optimistic
//!   concurrency and duplicate suppression, for production and several instances.
//!
//! [`load_planner`] rebuilds a session's planner from the newest snapshot and the events after it;
//! [`SnapshotPolicy`] says when to take one.
//!
//! # Layout
//!
//! - `contract.rs`: the trait, `Snapshot`, `StoreError`.
//! - `memory.rs`, `file.rs`, `jetstream.rs`: the stores.
//! - `loader.rs`: snapshot + tail loading and the snapshot policy.

pub mod contract;
pub mod file;
pub mod jetstream;
pub mod loader;
pub mod memory;

pub use contract::{
    AppendMeta, EventStore, Snapshot, StoreError, StoredBatch, SNAPSHOT_SCHEMA_VERSION,
};
pub use file::{FileStore, FileStoreConfig, FsyncPolicy};
pub use jetstream::{JetStreamConfig, JetStreamStore};
pub use loader::{load_planner, save_snapshot_logged, SnapshotPolicy};
pub use memory::MemoryStore;
