//! Compaction: older messages of the context are folded into a summary, automatically when the
//! context passes its token budget, or on a `CompactContext` command (with a summary written
//! outside the core, or the deterministic one).

use super::Decision;
use crate::compact::{compact_thread, message_tokens, summarize_messages};
use crate::compact::{estimate_tokens, MESSAGE_OVERHEAD_TOKENS};
use crate::error::Error;
use crate::event::Event;
use crate::types::{Message, Role, Timestamp};

impl Decision<'_> {
    /// Compacts the context when it is over the token budget.
    pub(super) fn auto_compact(&mut self, now: Timestamp) {
        let context = &self.state.context;
        let budget = self.state.config.token_budget;
        if context.tokens <= budget {
            return;
        }
        let thread = context.thread();
        let Some(compacted) = compact_thread(&thread, budget, self.state.config.profile) else {
            return;
        };
        let had_summary = usize::from(context.summary.is_some());
        let folded_messages = compacted.folded.saturating_sub(had_summary);
        self.emit_compaction(compacted.summary, folded_messages, now);
    }

    /// A `CompactContext` command: folds the messages its summary covers (`through`), or
    /// everything but the newest message. A supplied summary that is too long is refused before
    /// anything is emitted; one that covers less than the summary in place changes nothing.
    pub(super) fn compact_now(
        &mut self,
        summary: Option<String>,
        through: Option<u64>,
        now: Timestamp,
    ) -> Result<(), Error> {
        let context = &self.state.context;
        let fold = match through {
            // Written while other messages came in: fold only the ones it covers.
            Some(through) => match through.checked_sub(context.folded) {
                Some(covered) => usize::try_from(covered)
                    .unwrap_or(usize::MAX)
                    .min(context.messages.len()),
                // A later compaction folded messages this summary never saw: it is stale.
                None => return Ok(()),
            },
            None => context.messages.len().saturating_sub(1),
        };
        if fold == 0 && summary.is_none() {
            return Ok(());
        }
        let summary = match summary {
            Some(summary) => {
                let limit = self.state.config.max_input_chars;
                let chars = summary.chars().count();
                if chars > limit {
                    return Err(Error::InputTooLarge { chars, limit });
                }
                summary
            }
            None => {
                let mut folded = Vec::with_capacity(fold + 1);
                if let Some(s) = &context.summary {
                    folded.push(Message::new(Role::Summary, s.clone()));
                }
                folded.extend(context.messages.iter().take(fold).cloned());
                let config = &self.state.config;
                summarize_messages(&folded, config.token_budget / 2, config.profile)
            }
        };
        self.emit_compaction(summary, fold, now);
        Ok(())
    }

    fn emit_compaction(&mut self, summary: String, folded_messages: usize, now: Timestamp) {
        let context = &self.state.context;
        if folded_messages == 0 && context.summary.as_ref() == Some(&summary) {
            return;
        }
        let tokens_after = estimate_tokens(&summary)
            + MESSAGE_OVERHEAD_TOKENS
            + context
                .messages
                .iter()
                .skip(folded_messages)
                .map(message_tokens)
                .sum::<u64>();
        self.emit(Event::ContextCompacted {
            summary,
            folded_messages,
            tokens_before: context.tokens,
            tokens_after,
            at: now,
        });
    }
}
