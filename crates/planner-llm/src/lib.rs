//! LLM planning and summaries over any OpenAI-compatible chat-completions endpoint.
//!
//! Everything here runs *outside* the core and outside any session lock: its results enter the
//! planner as command data (`Initialize { plan, planning }`, `Revise { plan, .. }`,
//! `CompactContext { summary, through }`) and are recorded in events, so a replay never calls
//! an LLM.
//!
//! # Layout
//!
//! - `config.rs`: the `[llm]` settings (off by default).
//! - `client.rs`: the chat-completions client: timeouts, bounded concurrency, retries that
//!   honour `Retry-After`, structured output with a fallback to text.
//! - `planner.rs`: `TaskPlanner`, `RulePlanner`, `LlmPlanner` (prompt, parse, validate, ask
//!   once more, fall back).
//! - `summarize.rs`: LLM summaries with the deterministic one as the fallback.

pub mod client;
pub mod config;
pub mod planner;
pub mod summarize;

pub use client::{ChatMessage, LlmClient, LlmError};
pub use config::{LlmConfig, StructuredOutput};
pub use planner::{
    extract_json, plan_schema, LlmPlanner, PlanContext, Planned, RulePlanner, TaskPlanner,
};
pub use summarize::summarize;
