//! A client for OpenAI-compatible `POST {base_url}/chat/completions`.
//!
//! It uses only what OpenAI, vLLM, Ollama (`/v1`) and llama.cpp's server all accept: `model`,
//! `messages`, `temperature`, and optionally `response_format`. Retries follow `Retry-After` on
//! 429 and 503, back off exponentially otherwise, and stop after `max_retries`. A server that
//! refuses `response_format` with a 400 is asked again without it, and not asked with it again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::Semaphore;

use crate::config::{LlmConfig, StructuredOutput};

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.to_owned(),
            content: content.into(),
        }
    }
}

/// Why a chat failed, after any retries.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LlmError {
    /// No answer within the timeout.
    #[error("the LLM endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// The endpoint could not be reached.
    #[error("cannot reach the LLM endpoint: {0}")]
    Unreachable(String),
    /// The endpoint answered with an error status.
    #[error("the LLM endpoint answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The answer was not a chat completion.
    #[error("the LLM endpoint's answer is not a chat completion: {0}")]
    Malformed(String),
}

/// The client. Cheap to share behind an `Arc`.
pub struct LlmClient {
    http: reqwest::Client,
    config: LlmConfig,
    api_key: Option<String>,
    slots: Semaphore,
    schema_refused: AtomicBool,
}

impl std::fmt::Debug for LlmClient {
    // By hand: the API key must never reach a log or an error message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("config", &self.config)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

impl LlmClient {
    /// A client for `config`; the API key is read once, from `config.api_key_env`.
    pub fn new(config: LlmConfig, api_key: Option<String>) -> Result<Self, LlmError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| LlmError::Unreachable(e.to_string()))?;
        Ok(LlmClient {
            http,
            slots: Semaphore::new(config.max_concurrency.max(1)),
            config,
            api_key: api_key.filter(|k| !k.is_empty()),
            schema_refused: AtomicBool::new(false),
        })
    }

    /// The settings.
    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// Sends `messages` and returns the first choice's text. `schema`, when given and the
    /// server takes it, constrains the answer.
    pub async fn chat(
        &self,
        messages: &[ChatMessage],
        schema: Option<&Value>,
    ) -> Result<String, LlmError> {
        let started = std::time::Instant::now();
        let result = self.chat_with_retries(messages, schema).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(LlmError::Timeout(_)) => "timeout",
            Err(LlmError::Unreachable(_)) => "unreachable",
            Err(LlmError::Status { .. }) => "status",
            Err(LlmError::Malformed(_)) => "malformed",
        };
        metrics::counter!("planner_llm_calls_total", "outcome" => outcome).increment(1);
        metrics::histogram!("planner_llm_call_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn chat_with_retries(
        &self,
        messages: &[ChatMessage],
        schema: Option<&Value>,
    ) -> Result<String, LlmError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|e| LlmError::Unreachable(e.to_string()))?;
        let mut with_format = true;
        let mut attempt = 0;
        loop {
            let format = if with_format && !self.schema_refused.load(Ordering::Relaxed) {
                self.response_format(schema)
            } else {
                None
            };
            match self.send(messages, format.as_ref()).await {
                Ok(text) => return Ok(text),
                Err(Failure::FormatRefused(body)) if format.is_some() => {
                    tracing::warn!(%body, "the LLM endpoint refused response_format; asking for plain text from now on");
                    self.schema_refused.store(true, Ordering::Relaxed);
                    with_format = false;
                }
                Err(Failure::Retry(error, wait)) if attempt < self.config.max_retries => {
                    attempt += 1;
                    let wait = wait.unwrap_or_else(|| {
                        Duration::from_millis(
                            self.config
                                .initial_backoff_ms
                                .saturating_mul(1 << attempt.min(10))
                                / 2,
                        )
                    });
                    tracing::warn!(%error, attempt, ?wait, "LLM request failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(Failure::Retry(error, _)) | Err(Failure::Final(error)) => return Err(error),
                Err(Failure::FormatRefused(body)) => {
                    return Err(LlmError::Status { status: 400, body })
                }
            }
        }
    }

    fn response_format(&self, schema: Option<&Value>) -> Option<Value> {
        match (self.config.structured_output, schema) {
            (StructuredOutput::JsonSchema, Some(schema)) => Some(json!({
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema}
            })),
            (StructuredOutput::JsonSchema | StructuredOutput::JsonObject, _) => {
                Some(json!({"type": "json_object"}))
            }
            (StructuredOutput::Text, _) => None,
        }
    }

    async fn send(
        &self,
        messages: &[ChatMessage],
        format: Option<&Value>,
    ) -> Result<String, Failure> {
        let mut body = json!({
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
        });
        if let (Some(format), Some(object)) = (format, body.as_object_mut()) {
            object.insert("response_format".into(), format.clone());
        }
        let url = format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        );
        let mut request = self.http.post(url).json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Err(Failure::Retry(
                    LlmError::Timeout(Duration::from_millis(self.config.timeout_ms)),
                    None,
                ))
            }
            Err(e) => return Err(Failure::Retry(LlmError::Unreachable(e.to_string()), None)),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(60)));
        let text = match response.text().await {
            Ok(text) => text,
            Err(e) if e.is_timeout() => {
                return Err(Failure::Retry(
                    LlmError::Timeout(Duration::from_millis(self.config.timeout_ms)),
                    None,
                ))
            }
            Err(e) => return Err(Failure::Retry(LlmError::Unreachable(e.to_string()), None)),
        };
        if status == 429 || status >= 500 {
            return Err(Failure::Retry(
                LlmError::Status {
                    status,
                    body: snippet(&text),
                },
                retry_after,
            ));
        }
        if status == 400 && format.is_some() && text.to_lowercase().contains("response_format") {
            return Err(Failure::FormatRefused(snippet(&text)));
        }
        if !(200..300).contains(&status) {
            return Err(Failure::Final(LlmError::Status {
                status,
                body: snippet(&text),
            }));
        }
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Failure::Final(LlmError::Malformed(e.to_string())))?;
        for (field, direction) in [
            ("/usage/prompt_tokens", "prompt"),
            ("/usage/completion_tokens", "completion"),
        ] {
            if let Some(tokens) = value.pointer(field).and_then(Value::as_u64) {
                metrics::counter!("planner_llm_tokens_total", "direction" => direction)
                    .increment(tokens);
            }
        }
        value
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                Failure::Final(LlmError::Malformed(format!(
                    "no choices[0].message.content in {}",
                    snippet(&text)
                )))
            })
    }
}

enum Failure {
    Retry(LlmError, Option<Duration>),
    Final(LlmError),
    FormatRefused(String),
}

fn snippet(text: &str) -> String {
    text.chars().take(300).collect()
}
