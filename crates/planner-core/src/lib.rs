//! The planner's core: a pure, event-sourced state machine that turns requests into tasks,
//! schedules them over their dependency graph, and tracks them to the end.
//!
//! It is *sans-IO*: no sockets, no files, no clock, no randomness. Time, ids and LLM output
//! arrive inside [`Command`]s and are recorded in [`Event`]s, so [`Planner::fold`] over a
//! session's events rebuilds exactly the planner that emitted them, anywhere, without calling
//! anything. A shell (the `planner-svc` daemon, or a test) feeds commands in, persists the events
//! that come out, then publishes the [`PlannerCmd`]s they carry to executors and UIs.
//!
//! ```
//! use planner_core::*;
//!
//! let mut planner = Planner::new();
//! let events = planner.process(Command::Initialize {
//!     request_id: None,
//!     planning: None,
//!     input: "Search for the release notes, then summarize them".into(),
//!     attachments: vec![],
//!     plan: None,
//!     now: Timestamp(1_000),
//! })?;
//! // The first task is dispatched at once; the second waits for it.
//! let dispatched: Vec<_> = events.iter().filter_map(Event::planner_cmd).collect();
//! assert_eq!(dispatched.len(), 1);
//!
//! let done = planner.process(Command::HandleExecutorEvent {
//!     lease: None, // the claim's lease, when the executor claimed the attempt
//!     event: ExecutorEvent {
//!         task_id: TaskId::from("t1"),
//!         attempt: 1,
//!         outcome: ExecutorOutcome::Completed { output: "notes...".into(), tokens_used: None },
//!     },
//!     now: Timestamp(2_000),
//! })?;
//! assert!(done.iter().any(|e| e.event_type() == "task_dispatched"));
//!
//! let all: Vec<Event> = events.into_iter().chain(done).collect();
//! assert_eq!(Planner::fold(&all).state(), planner.state());
//! # Ok::<(), planner_core::Error>(())
//! ```
//!
//! A dispatch event records a small [`Dispatch`] reference; the shell publishes the full
//! [`TaskAssignment`] that [`Planner::assignment`] renders from the state.
//!
//! # Layout
//!
//! - [`handler`]: the `Handler` trait (`process` decides, `fold` rebuilds).
//! - [`planner`]: `Planner`, the decisions: scheduling, retries, failures, clarifications,
//!   budgets, cancellation, follow-ups, one concern per file under `planner/`.
//! - [`state`]: `PlannerState` and `apply`, which records events and decides nothing.
//! - [`command`], [`event`]: the inputs and outputs, with the `PlannerCmd`s for executors and UIs.
//! - [`codec`]: the persisted form of events, versioned, with upcasters.
//! - [`plan`]: plans as data and their validation; [`parse`]: the rule-based parser.
//! - [`compact`]: error and thread compaction, token estimates.
//! - [`config`], [`types`], [`error`]: settings, nouns, refusals.
//! - [`testing`]: a given/when/then helper for tests of code built on the planner.

#![warn(missing_docs)]
// Requests arrive in every script: a byte-offset string slice that lands inside a character
// panics, so text is cut with `str::get`, `split_once` and friends. (The parser panicked on
// "Überprüfe ..." before this lint.)
#![warn(clippy::string_slice)]
#![warn(clippy::indexing_slicing)]

pub mod codec;
pub mod command;
pub mod compact;
pub mod config;
pub mod error;
pub mod event;
pub mod handler;
pub mod parse;
pub mod plan;
pub mod planner;
pub mod state;
pub mod testing;
pub mod types;

pub use command::{CancelTarget, Command, ExecutorEvent, ExecutorOutcome, FenceReason, Planning};
pub use compact::{
    compact_error_message, compact_thread, estimate_tokens, summarize_messages, Profile,
};
pub use config::{
    BudgetKind, Budgets, ClarificationPolicy, FailurePolicy, LeasePolicy, OnClarificationTimeout,
    PlannerConfig, RetryPolicy,
};
pub use error::{ConfigError, Error};
pub use event::{
    fork_events, open_after, Dispatch, DispatchContext, Event, FailureReason, PlanSource,
    PlannerCmd, TaskAssignment, TaskOutput, EVENT_SCHEMA_VERSION,
};
pub use handler::Handler;
pub use parse::{parse_input, parse_input_from};
pub use plan::{validate_plan, PlanError, PlanSpec, TaskSpec, TaskTimeouts};
pub use planner::Planner;
pub use state::{Context, ForkOrigin, PendingQuestion, PlanPhase, PlannerState, Usage};
pub use types::{
    is_valid_token, Attachment, Lease, Message, NodeKind, Role, Task, TaskId, TaskStatus, Timestamp,
};
