//! Why the engine did not apply a command, and what the edge should do about it.

use planner_store::StoreError;

use crate::protocol::ErrorKind;

/// Why a command was not applied. Nothing was persisted.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The session id is not a valid subject token.
    #[error("invalid session id {0:?}: use 1 to 64 characters from A-Z a-z 0-9 _ -")]
    BadSession(String),
    /// The planner refused the command.
    #[error(transparent)]
    Rejected(#[from] planner_core::Error),
    /// Other instances kept winning the race for this session.
    #[error("session {session} kept changing under this command ({retries} retries)")]
    Conflict {
        /// The session.
        session: String,
        /// Retries made.
        retries: u32,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A fork that cannot be made (a version past the source's end, a target that exists).
    #[error("{0}")]
    Fork(String),
}

/// What to do with input whose handling failed: decided here, by type, so every edge (command
/// replies, the report consumer, timers) treats the same failure the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// It would fail the same way again: refuse it (reply with the error, or terminate the
    /// report and publish it on the errors subject).
    Reject,
    /// It may pass later (the store down, a lost race): keep it and try again.
    Retry,
}

impl EngineError {
    /// The kind used in error replies and notices.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::BadSession(_) => ErrorKind::BadSession,
            EngineError::Rejected(_) | EngineError::Fork(_) => ErrorKind::Rejected,
            EngineError::Conflict { .. } => ErrorKind::Conflict,
            EngineError::Store(StoreError::TooLarge { .. }) => ErrorKind::TooLarge,
            EngineError::Store(StoreError::InvalidStream { .. }) => ErrorKind::BadSession,
            EngineError::Store(StoreError::Decode { .. } | StoreError::Corrupt { .. }) => {
                ErrorKind::Corrupt
            }
            EngineError::Store(_) => ErrorKind::Unavailable,
        }
    }

    /// Whether trying again can help.
    pub fn disposition(&self) -> Disposition {
        if self.kind().may_pass() {
            Disposition::Retry
        } else {
            Disposition::Reject
        }
    }
}
