//! Context summaries written by the LLM, with the deterministic summary as the fallback.

use planner_core::{summarize_messages, Message, Profile, Role};

use crate::client::{ChatMessage, LlmClient};

/// Summarizes `messages` in about `token_budget` tokens, keeping what `profile` values. Falls
/// back to [`summarize_messages`] when the endpoint fails or answers nothing.
pub async fn summarize(
    client: &LlmClient,
    messages: &[Message],
    token_budget: u64,
    profile: Profile,
) -> String {
    let keep = match profile {
        Profile::General => "the user's goals, decisions and open questions",
        Profile::Coding => "file paths, code identifiers, commands, and exact error messages",
        Profile::Analysis => "numbers, findings, decisions and their reasons",
    };
    let words = token_budget * 3 / 4;
    let transcript: Vec<String> = messages
        .iter()
        .map(|m| {
            let role = match m.role {
                Role::User => "user",
                Role::Task => "task",
                Role::Planner => "planner",
                Role::Summary => "earlier summary",
            };
            format!("[{role}] {}", m.content)
        })
        .collect();
    let prompt = vec![
        ChatMessage::new(
            "system",
            format!("Summarize this conversation of an agent session in at most {words} words. Keep {keep}. Answer with the summary only."),
        ),
        ChatMessage::new("user", transcript.join("\n")),
    ];
    match client.chat(&prompt, None).await {
        Ok(summary) if !summary.trim().is_empty() => summary.trim().to_owned(),
        Ok(_) => summarize_messages(messages, token_budget, profile),
        Err(error) => {
            tracing::warn!(%error, "LLM summary failed; using the deterministic summary");
            summarize_messages(messages, token_budget, profile)
        }
    }
}
