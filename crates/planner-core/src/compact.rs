//! Keeping the context under a token budget: error compaction and thread compaction.
//!
//! Both functions are pure and deterministic. The planner calls them while deciding and records
//! their result in a `ContextCompacted` event, so a replay never recomputes a summary (and an LLM
//! summary, passed in through `CompactContext`, replays exactly too).

use serde::{Deserialize, Serialize};

use crate::types::{Message, Role};

/// What compaction values in older messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// The first line of each message.
    #[default]
    General,
    /// Paths, code and errors.
    Coding,
    /// Numbers, findings and decisions.
    Analysis,
}

/// Fixed overhead per message, in tokens (role and separators), as chat APIs count it.
pub const MESSAGE_OVERHEAD_TOKENS: u64 = 4;

/// An estimate of the tokens `text` takes: one token per four characters, rounded up.
///
/// This is the common rule of thumb for English with BPE tokenizers; it over-counts code slightly
/// and under-counts some non-Latin scripts. It is an estimate, not a tokenizer: it only decides
/// *when* to compact, and a real tokenizer can be used at the edges where exact counts matter.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// The estimated tokens of one message, overhead included.
pub fn message_tokens(message: &Message) -> u64 {
    estimate_tokens(&message.content) + MESSAGE_OVERHEAD_TOKENS
}

/// Shortens `message` to at most `char_limit` characters by keeping its head and tail around an
/// elision marker that says how much was cut.
///
/// Errors carry their cause at the top (the message) and at the bottom (the innermost frame, the
/// compiler's summary line), so both ends are kept: two thirds of the room for the head, one
/// third for the tail. Messages within the limit are returned unchanged.
pub fn compact_error_message(message: &str, char_limit: usize) -> String {
    let total = message.chars().count();
    if total <= char_limit {
        return message.to_owned();
    }
    // The marker's own length depends on the number it carries; reserve enough for any count.
    let marker_room = format!("\n… [{total} chars elided] …\n").chars().count();
    if char_limit <= marker_room {
        return message.chars().take(char_limit).collect();
    }
    let room = char_limit - marker_room;
    let head_len = room * 2 / 3;
    let tail_len = room - head_len;
    let elided = total - head_len - tail_len;
    let head: String = message.chars().take(head_len).collect();
    let tail: String = message.chars().skip(total - tail_len).collect();
    format!("{head}\n… [{elided} chars elided] …\n{tail}")
}

/// The result of [`compact_thread`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactedThread {
    /// The summary that replaces the folded messages.
    pub summary: String,
    /// How many of the oldest messages it replaces.
    pub folded: usize,
}

/// The longest line quoted from a message in a summary, in characters.
const SUMMARY_LINE_CHARS: usize = 160;
/// The most lines quoted from one message.
const SUMMARY_LINES_PER_MESSAGE: usize = 4;

/// Folds the oldest messages of `messages` into a summary so that the summary and the messages
/// kept fit in `token_budget`; returns `None` when everything already fits.
///
/// The newest messages that fit in half the budget are kept word for word; the older ones become
/// a summary of at most the other half (see [`summarize_messages`]).
pub fn compact_thread(
    messages: &[Message],
    token_budget: u64,
    profile: Profile,
) -> Option<CompactedThread> {
    let total: u64 = messages.iter().map(message_tokens).sum();
    if total <= token_budget || messages.is_empty() {
        return None;
    }
    let keep_budget = token_budget / 2;
    // Everything fitting in half the budget would mean the total fit too; fold at least one
    // message all the same, so a caller looping on "over budget" always makes progress.
    let folded = fold_point(messages, keep_budget).max(1);
    Some(CompactedThread {
        summary: summarize_messages(
            messages.get(..folded).unwrap_or(messages),
            token_budget - keep_budget,
            profile,
        ),
        folded,
    })
}

/// The index of the first message kept when only the newest messages that fit in `keep_tokens`
/// are kept: the messages before it are the ones to fold.
pub fn fold_point(messages: &[Message], keep_tokens: u64) -> usize {
    let mut kept_tokens = 0;
    let kept = messages
        .iter()
        .rev()
        .take_while(|message| {
            let cost = message_tokens(message);
            if kept_tokens + cost > keep_tokens {
                return false;
            }
            kept_tokens += cost;
            true
        })
        .count();
    messages.len() - kept
}

/// A deterministic summary of `messages` in at most `summary_tokens` (estimated).
///
/// A message with [`Role::Summary`] (an earlier summary) is carried forward. From every other
/// message the summary quotes its first line and the lines `profile` values, each cut to a
/// line's length. When they do not all fit, the lines the profile values (and earlier summaries)
/// are kept before first lines, the newest before the oldest; the kept lines stay in order. It starts with
/// a header that counts the original messages it stands for.
pub fn summarize_messages(messages: &[Message], summary_tokens: u64, profile: Profile) -> String {
    // (line, salient): salient lines are kept before plain ones when room runs out.
    let mut lines: Vec<(String, bool)> = Vec::new();
    for message in messages {
        if message.role == Role::Summary {
            // What survived an earlier compaction was judged worth keeping then.
            lines.extend(
                message
                    .content
                    .lines()
                    .filter(|l| !l.starts_with("[summary of"))
                    .map(|l| (l.to_owned(), true)),
            );
            continue;
        }
        let role = match message.role {
            Role::User => "user",
            Role::Task => "task",
            Role::Planner => "planner",
            Role::Summary => "summary",
        };
        let mut quoted = 0;
        for (i, line) in message
            .content
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            if quoted == SUMMARY_LINES_PER_MESSAGE {
                break;
            }
            let salient = is_salient(line, profile);
            if i == 0 || salient {
                let prefix = if quoted == 0 {
                    format!("- {role}: ")
                } else {
                    "  ".to_owned()
                };
                let text = format!("{prefix}{}", truncate_chars(line, SUMMARY_LINE_CHARS));
                lines.push((text, salient));
                quoted += 1;
            }
        }
    }

    let header = format!("[summary of {} earlier messages]", count_folded(messages));
    let mut tokens = estimate_tokens(&header) + MESSAGE_OVERHEAD_TOKENS;
    // Newest first within each class: salient lines, then plain ones, while they fit.
    let mut keep = vec![false; lines.len()];
    for wanted in [true, false] {
        for ((line, salient), kept) in lines.iter().zip(keep.iter_mut()).rev() {
            if *salient != wanted {
                continue;
            }
            let cost = estimate_tokens(line) + 1;
            if tokens + cost <= summary_tokens {
                tokens += cost;
                *kept = true;
            }
        }
    }
    let mut summary = header;
    for ((line, _), kept) in lines.iter().zip(keep) {
        if kept {
            summary.push('\n');
            summary.push_str(line);
        }
    }
    summary
}

/// How many original messages a run of messages stands for, earlier summaries included.
fn count_folded(folded: &[Message]) -> u64 {
    folded
        .iter()
        .map(|m| {
            if m.role == Role::Summary {
                m.content
                    .strip_prefix("[summary of ")
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(1)
            } else {
                1
            }
        })
        .sum()
}

fn truncate_chars(line: &str, limit: usize) -> String {
    if line.chars().count() <= limit {
        line.to_owned()
    } else {
        let mut cut: String = line.chars().take(limit - 1).collect();
        cut.push('…');
        cut
    }
}

fn is_salient(line: &str, profile: Profile) -> bool {
    let lower = line.to_lowercase();
    match profile {
        Profile::General => false,
        Profile::Coding => {
            const ERROR_WORDS: [&str; 7] = [
                "error",
                "panic",
                "failed",
                "exception",
                "warning",
                "traceback",
                "fatal",
            ];
            const CODE_MARKS: [&str; 8] = ["```", "::", "fn ", "=>", "def ", "();", "{", "}"];
            ERROR_WORDS.iter().any(|w| lower.contains(w))
                || CODE_MARKS.iter().any(|m| line.contains(m))
                || line.split_whitespace().any(looks_like_path)
        }
        Profile::Analysis => {
            const FINDING_WORDS: [&str; 10] = [
                "found",
                "finding",
                "result",
                "conclu",
                "decid",
                "decision",
                "therefore",
                "increase",
                "decrease",
                "recommend",
            ];
            line.bytes().any(|b| b.is_ascii_digit())
                || FINDING_WORDS.iter().any(|w| lower.contains(w))
        }
    }
}

fn looks_like_path(word: &str) -> bool {
    let word = word.trim_matches(|c: char| "`'\"(),:;".contains(c));
    if word.contains("://") {
        return true;
    }
    let has_sep = word.contains('/') || word.contains('\\');
    let has_ext = word.rsplit_once('.').is_some_and(|(stem, ext)| {
        !stem.is_empty()
            && (1..=5).contains(&ext.len())
            && ext.chars().all(|c| c.is_ascii_alphanumeric())
            && ext.chars().any(|c| c.is_ascii_alphabetic())
    });
    has_sep && word.len() > 1 || has_ext
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_errors_are_unchanged() {
        assert_eq!(compact_error_message("boom", 100), "boom");
    }

    #[test]
    fn long_errors_keep_head_and_tail_within_the_limit() {
        let msg = format!("HEAD-LINE\n{}\nTAIL-LINE", "x".repeat(10_000));
        let out = compact_error_message(&msg, 200);
        assert!(out.chars().count() <= 200, "{} chars", out.chars().count());
        assert!(out.starts_with("HEAD-LINE"));
        assert!(out.ends_with("TAIL-LINE"));
        assert!(out.contains("chars elided"));
    }

    #[test]
    fn error_compaction_is_char_safe_for_multibyte_text() {
        let msg = "é".repeat(5_000) + &"ß".repeat(5_000);
        let out = compact_error_message(&msg, 100);
        assert!(out.chars().count() <= 100);
        assert!(out.starts_with('é') && out.ends_with('ß'));
    }

    #[test]
    fn tiny_limits_still_respect_the_limit() {
        let out = compact_error_message(&"y".repeat(1000), 10);
        assert_eq!(out.chars().count(), 10);
    }

    #[test]
    fn token_estimate_is_a_quarter_of_chars_rounded_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abc"), 1);
        assert_eq!(estimate_tokens("abcdefgh"), 2);
        assert_eq!(estimate_tokens("abcdefghi"), 3);
    }

    fn msgs(n: usize, len: usize) -> Vec<Message> {
        (0..n)
            .map(|_| Message::new(Role::Task, format!("message {}", "w".repeat(len))))
            .collect()
    }

    #[test]
    fn a_thread_within_budget_is_left_alone() {
        assert_eq!(compact_thread(&msgs(3, 10), 1000, Profile::General), None);
    }

    #[test]
    fn an_oversized_thread_fits_the_budget_after_compaction() {
        let messages = msgs(50, 200);
        let budget = 500;
        let out = compact_thread(&messages, budget, Profile::General).expect("over budget");
        let kept: u64 = messages[out.folded..].iter().map(message_tokens).sum();
        let summary = estimate_tokens(&out.summary) + MESSAGE_OVERHEAD_TOKENS;
        assert!(kept + summary <= budget, "kept {kept} + summary {summary}");
        assert!(out
            .summary
            .starts_with(&format!("[summary of {} earlier messages]", out.folded)));
        assert!(out.folded > 0 && out.folded < messages.len());
    }

    #[test]
    fn coding_profile_keeps_paths_code_and_errors() {
        let content = "ran the build\nsome chatter\nerror[E0425]: cannot find value `x` in src/main.rs\nmore chatter\nlet y = foo::bar();";
        let mut messages = vec![Message::new(Role::Task, content)];
        messages.extend(msgs(20, 100));
        let out = compact_thread(&messages, 400, Profile::Coding).expect("over budget");
        assert!(out.summary.contains("error[E0425]"), "{}", out.summary);
        assert!(out.summary.contains("foo::bar()"), "{}", out.summary);
        assert!(!out.summary.contains("some chatter"), "{}", out.summary);
    }

    #[test]
    fn analysis_profile_keeps_numbers_and_findings() {
        let content =
            "looked at sales\nvibes were fine\nrevenue grew 12% in Q3\nwe decided to expand";
        let mut messages = vec![Message::new(Role::Task, content)];
        messages.extend(msgs(20, 100));
        let out = compact_thread(&messages, 400, Profile::Analysis).expect("over budget");
        assert!(out.summary.contains("12%"), "{}", out.summary);
        assert!(out.summary.contains("decided to expand"), "{}", out.summary);
        assert!(!out.summary.contains("vibes"), "{}", out.summary);
    }

    #[test]
    fn an_earlier_summary_is_carried_forward_and_counted() {
        let mut messages = vec![Message::new(
            Role::Summary,
            "[summary of 7 earlier messages]\n- user: the original ask",
        )];
        messages.extend(msgs(20, 100));
        let out = compact_thread(&messages, 400, Profile::General).expect("over budget");
        assert!(out.summary.contains("the original ask"), "{}", out.summary);
        let expected = 7 + out.folded as u64 - 1;
        assert!(
            out.summary
                .starts_with(&format!("[summary of {expected} earlier")),
            "{}",
            out.summary
        );
    }
}
