//! planner-llm against a local HTTP server that speaks the chat-completions protocol with
//! scripted answers: no network, no model.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod planning;
