//! The `[llm]` section of `config/planner.toml`: off by default, so the embedded run and the
//! tests work offline with the rule parser.

use serde::{Deserialize, Serialize};

/// How the client asks for structured output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// `response_format: {"type": "json_schema", ...}` (OpenAI, vLLM, Ollama, llama.cpp's
    /// server); if the server refuses it, the client falls back to `text` by itself.
    JsonSchema,
    /// `response_format: {"type": "json_object"}`.
    JsonObject,
    /// No `response_format`: the JSON is extracted from the text answer.
    Text,
}

/// Settings of the LLM client and planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Use the LLM to plan requests (and to write summaries). Off: the rule parser plans.
    pub enabled: bool,
    /// The API's base URL, up to and including `/v1`.
    pub base_url: String,
    /// The model name.
    pub model: String,
    /// The environment variable holding the API key (empty or unset: no key is sent).
    pub api_key_env: String,
    /// Time allowed for one request, in milliseconds.
    pub timeout_ms: u64,
    /// Requests in flight at once, across sessions.
    pub max_concurrency: usize,
    /// Retries after a 429, a 5xx, a timeout or a connection error.
    pub max_retries: u32,
    /// The first retry's wait when the server gives no `Retry-After`, in milliseconds.
    pub initial_backoff_ms: u64,
    /// How to ask for JSON.
    pub structured_output: StructuredOutput,
    /// Sampling temperature.
    pub temperature: f32,
    /// Also write context summaries with the LLM (the deterministic summary is the fallback).
    pub summarize: bool,
    /// When a plan fails because a task failed for good, ask the LLM for a revised plan for
    /// what is left, at most this many times per session (0: never).
    pub max_revisions: u32,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            enabled: false,
            base_url: "http://127.0.0.1:11434/v1".into(),
            model: "llama3.1".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            timeout_ms: 60_000,
            max_concurrency: 4,
            max_retries: 3,
            initial_backoff_ms: 500,
            structured_output: StructuredOutput::JsonSchema,
            temperature: 0.0,
            summarize: true,
            max_revisions: 0,
        }
    }
}
