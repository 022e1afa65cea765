//! The rule-based parser: a request in plain text becomes a plan without an LLM.
//!
//! Deterministic by construction: the same text always gives the same plan, so it can run inside
//! `process`. The rules, in order:
//!
//! 1. **Steps.** A numbered list (`1.`, `2)`) gives one step per item, run in sequence. A bulleted
//!    list (`-`, `*`, `•`) gives one step per item, run in parallel. Lines that do not start an
//!    item continue the item above. Otherwise the text is cut into sentences, run in sequence.
//! 2. **Sequencing words.** Inside a step, "then", "after that", "afterwards", "next" and
//!    "finally" cut it further into steps that run one after another (and their equivalents
//!    in a few other languages: "dann", "puis", "luego", "затем", "然后", ...).
//! 3. **Kinds.** A step that is a question (ends with `?`, or starts with "ask", "confirm",
//!    "clarify", "check with") is a [`NodeKind::Clarification`]. A step whose words name a tool
//!    (search, fetch, run, file, email, query, ...) is a [`NodeKind::ToolCall`] served by that
//!    tool. Anything else is a [`NodeKind::Processing`] step.
//! 4. **Missing details.** A step with a placeholder (`<...>`, `TBD`, `???`, `XXX`) gets a
//!    clarification task before it asking for the detail, and depends on it.
//! 5. **Summaries.** A processing step that summarises, compares or combines ("summarize",
//!    "compare", "combine", "recap", ...) depends on every step of the request before it, not
//!    only the one it follows: an executor gets the outputs of a task's dependencies as its
//!    inputs, and a summary must see everything it summarises. In a bulleted list it waits
//!    for the items before it.

use crate::plan::{PlanSpec, TaskSpec};
use crate::types::{NodeKind, TaskId};

/// Parses `input` into a plan whose ids are `t1`, `t2`, ...
pub fn parse_input(input: &str) -> PlanSpec {
    parse_input_from(input, 1)
}

/// Parses `input` into a plan whose ids count up from `t{first_number}`.
pub fn parse_input_from(input: &str, first_number: u64) -> PlanSpec {
    let mut builder = Builder {
        next: first_number,
        tasks: Vec::new(),
    };
    let (items, parallel) = split_items(input);
    let mut previous_tail: Option<TaskId> = None;
    for item in items {
        let steps = split_sequence(&item);
        // Items of a bulleted list are independent; steps inside one item are a chain.
        let mut tail = if parallel {
            None
        } else {
            previous_tail.clone()
        };
        for step in steps {
            // A summarising step needs what it summarises: every step of the request before
            // it, not only the last (whose own inputs are not passed on).
            let after = if summarises(&step) {
                builder.tasks.iter().map(|t| t.id.clone()).collect()
            } else {
                tail.into_iter().collect()
            };
            tail = Some(builder.push_step(&step, after));
        }
        previous_tail = tail;
    }
    PlanSpec {
        tasks: builder.tasks,
    }
}

struct Builder {
    next: u64,
    tasks: Vec<TaskSpec>,
}

impl Builder {
    fn fresh_id(&mut self) -> TaskId {
        let id = TaskId(format!("t{}", self.next));
        // A session can be numbered up to u64::MAX by a supplied plan (a task `t18446744073709551615`):
        // the ids then repeat and the plan is refused as a duplicate, rather than overflowing.
        self.next = self.next.saturating_add(1);
        id
    }

    /// Adds one step (and the clarification it needs, if any); returns the id later steps wait on.
    fn push_step(&mut self, step: &str, after: Vec<TaskId>) -> TaskId {
        let mut dependencies = after;
        let (kind, target) = classify(step);
        if kind != NodeKind::Clarification {
            if let Some(placeholder) = find_placeholder(step) {
                let id = self.fresh_id();
                let question = format!("What should replace {placeholder} in: \"{step}\"?");
                self.tasks.push(TaskSpec {
                    timeouts: None,
                    id: id.clone(),
                    description: question.clone(),
                    kind: NodeKind::Clarification,
                    target: "user".to_owned(),
                    dependencies: dependencies.clone(),
                    attachments: Vec::new(),
                    question: Some(question),
                });
                // The step waits on the answer; a summarising one still gets every step
                // before it.
                if summarises(step) {
                    dependencies.push(id);
                } else {
                    dependencies = vec![id];
                }
            }
        }
        let id = self.fresh_id();
        self.tasks.push(TaskSpec {
            timeouts: None,
            id: id.clone(),
            description: step.to_owned(),
            kind,
            target: target.to_owned(),
            dependencies,
            attachments: Vec::new(),
            question: (kind == NodeKind::Clarification).then(|| step.to_owned()),
        });
        id
    }
}

/// Splits the text into items; the flag says whether they may run in parallel.
fn split_items(input: &str) -> (Vec<String>, bool) {
    let lines: Vec<&str> = input
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let numbered = lines.iter().filter(|l| strip_number(l).is_some()).count();
    let bulleted = lines.iter().filter(|l| strip_bullet(l).is_some()).count();
    if numbered == 0 && bulleted == 0 {
        return (split_sentences(&lines.join(" ")), false);
    }
    let use_numbers = numbered >= bulleted;
    let mut items: Vec<String> = Vec::new();
    let mut preamble: Vec<&str> = Vec::new();
    for line in lines {
        let started = if use_numbers {
            strip_number(line)
        } else {
            strip_bullet(line)
        };
        match (started, items.last_mut()) {
            (Some(text), _) => items.push(text.trim().to_owned()),
            (None, Some(last)) => {
                last.push(' ');
                last.push_str(line);
            }
            (None, None) => preamble.push(line),
        }
    }
    // A line before the list ("Please do the following:") is context, not a step, unless it
    // asks something.
    let mut result: Vec<String> = preamble
        .into_iter()
        .flat_map(split_sentences)
        .filter(|s| s.ends_with(['?', '？', '؟']))
        .collect();
    result.extend(items.into_iter().filter(|i| !i.is_empty()));
    (result, !use_numbers)
}

fn strip_number(line: &str) -> Option<&str> {
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 3 {
        return None;
    }
    let rest = line.get(digits..)?;
    rest.strip_prefix(". ")
        .or_else(|| rest.strip_prefix(") "))
        .or_else(|| rest.strip_prefix(": "))
}

fn strip_bullet(line: &str) -> Option<&str> {
    ["- ", "* ", "• ", "+ "]
        .iter()
        .find_map(|b| line.strip_prefix(b))
}

/// Cuts text into sentences at `.`, `!` or `?` followed by white space; the mark stays.
fn split_sentences(text: &str) -> Vec<String> {
    let mut sentences = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        current.push(c);
        // Full-width marks (Chinese, Japanese) end a sentence with no space after them.
        let at_end = matches!(c, '。' | '！' | '？')
            || matches!(c, '.' | '!' | '?' | '؟') && chars.peek().is_none_or(|n| n.is_whitespace());
        if at_end && !ends_with_abbreviation(&current) {
            push_trimmed(&mut sentences, &current);
            current.clear();
        }
    }
    push_trimmed(&mut sentences, &current);
    sentences
}

fn ends_with_abbreviation(text: &str) -> bool {
    let last = text.split_whitespace().last().unwrap_or("").to_lowercase();
    matches!(
        last.as_str(),
        "e.g." | "i.e." | "etc." | "vs." | "mr." | "dr." | "no."
    )
}

fn push_trimmed(out: &mut Vec<String>, text: &str) {
    let t = text
        .trim()
        .trim_end_matches(['.', '!', ';', ',', '。', '！', '，', '、'])
        .trim();
    if !t.is_empty() {
        out.push(t.to_owned());
    }
}

const SEQUENCE_WORDS: [&str; 17] = [
    ", and then ",
    " and then ",
    ", then ",
    " then ",
    ", after that ",
    " after that ",
    ", afterwards ",
    ", finally ",
    // The same cut in a few other languages users write requests in; anything else still
    // plans, as one step per sentence.
    ", dann ",
    ", danach ",
    ", puis ",
    ", ensuite ",
    ", luego ",
    ", después ",
    ", затем ",
    ", потом ",
    "然后",
];

/// Cuts one item at sequencing words into steps run in order.
fn split_sequence(item: &str) -> Vec<String> {
    let mut steps = vec![strip_leading_connector(item).to_owned()];
    for word in SEQUENCE_WORDS {
        steps = steps.into_iter().flat_map(|s| split_ci(&s, word)).collect();
    }
    steps
        .into_iter()
        .map(|s| {
            strip_leading_connector(&s)
                .trim_end_matches([',', '.', ';', '，', '。', '、'])
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

fn strip_leading_connector(s: &str) -> &str {
    let s = s.trim();
    for lead in [
        "then ",
        "after that ",
        "after that, ",
        "afterwards ",
        "afterwards, ",
        "next ",
        "next, ",
        "finally ",
        "finally, ",
        "and ",
    ] {
        // `get`, not slicing: `lead.len()` may fall inside a multi-byte character of `s`.
        if s.get(..lead.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(lead))
        {
            return s.get(lead.len()..).unwrap_or_default().trim();
        }
    }
    s
}

/// Splits at every case-insensitive occurrence of `sep` (ASCII), keeping the rest intact.
///
/// ASCII lowercasing keeps every byte offset, so an offset found in `lower` is a character
/// boundary of `s` too; `get` keeps that an argument rather than a panic if it ever were not.
fn split_ci(s: &str, sep: &str) -> Vec<String> {
    let lower = s.to_ascii_lowercase();
    let mut parts = Vec::new();
    let mut start = 0;
    while let Some(found) = lower.get(start..).and_then(|rest| rest.find(sep)) {
        parts.push(s.get(start..start + found).unwrap_or_default().to_owned());
        start += found + sep.len();
    }
    parts.push(s.get(start..).unwrap_or_default().to_owned());
    parts
}

/// Tool words, checked in order; the first match names the tool.
const TOOLS: [(&str, &[&str]); 6] = [
    (
        "web_search",
        &[
            "search",
            "look up",
            "lookup",
            "google",
            "find online",
            "research",
        ],
    ),
    (
        "http_fetch",
        &[
            "fetch", "download", "http://", "https://", "browse", "scrape", "url", "api",
        ],
    ),
    ("email", &["email", "e-mail", "send ", "notify", "message "]),
    ("database", &["query", "sql", "database", "table "]),
    (
        "filesystem",
        &["file", "folder", "directory", "save ", "read ", "list "],
    ),
    (
        "shell",
        &[
            "run ", "execute", "install", "deploy", "build", "compile", "test", "git ", "command",
            "script",
        ],
    ),
];

/// Processing words, checked in order; the first match names the step. `llm` otherwise.
const STEPS: [(&str, &[&str]); 5] = [
    ("summarize", &["summar", "tl;dr", "condense"]),
    (
        "analyze",
        &["analy", "compare", "evaluate", "assess", "review"],
    ),
    ("translate", &["translat"]),
    (
        "generate",
        &["write", "draft", "generate", "create", "compose"],
    ),
    ("extract", &["extract", "parse", "classify"]),
];

/// Words of a step that gathers the results of the steps before it (rule 5).
const SUMMARISING: [&str; 9] = [
    "summar",
    "tl;dr",
    "condense",
    "compare",
    "combine",
    "consolidate",
    "recap",
    "overview",
    "merge",
];

/// Whether `step` is a processing step that summarises, compares or combines what came before.
fn summarises(step: &str) -> bool {
    let lower = step.to_lowercase();
    classify(step).0 == NodeKind::Processing && SUMMARISING.iter().any(|w| lower.contains(w))
}

fn classify(step: &str) -> (NodeKind, &'static str) {
    let lower = step.to_lowercase();
    let asks = ["ask ", "confirm ", "clarify ", "check with "]
        .iter()
        .any(|w| lower.starts_with(w));
    if step.trim_end().ends_with(['?', '？', '؟']) || asks {
        return (NodeKind::Clarification, "user");
    }
    let padded = format!(" {lower} ");
    for (tool, words) in TOOLS {
        if words.iter().any(|w| padded.contains(w)) {
            return (NodeKind::ToolCall, tool);
        }
    }
    for (name, words) in STEPS {
        if words.iter().any(|w| lower.contains(w)) {
            return (NodeKind::Processing, name);
        }
    }
    (NodeKind::Processing, "llm")
}

fn find_placeholder(step: &str) -> Option<String> {
    if let (Some(open), Some(close)) = (step.find('<'), step.find('>')) {
        if open < close && close - open > 1 {
            return step.get(open..=close).map(str::to_owned);
        }
    }
    ["TBD", "???", "XXX"]
        .iter()
        .find(|p| step.contains(*p))
        .map(|p| (*p).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (kind, target, description, dependencies) of each task, compactly.
    fn shape(input: &str) -> Vec<(String, NodeKind, String, String, Vec<String>)> {
        parse_input(input)
            .tasks
            .into_iter()
            .map(|t| {
                (
                    t.id.0,
                    t.kind,
                    t.target,
                    t.description,
                    t.dependencies.into_iter().map(|d| d.0).collect(),
                )
            })
            .collect()
    }

    use NodeKind::*;

    fn row(
        id: &str,
        kind: NodeKind,
        target: &str,
        desc: &str,
        deps: &[&str],
    ) -> (String, NodeKind, String, String, Vec<String>) {
        (
            id.into(),
            kind,
            target.into(),
            desc.into(),
            deps.iter().map(|d| (*d).to_owned()).collect(),
        )
    }

    #[test]
    fn numbered_lists_run_in_sequence() {
        assert_eq!(
            shape("Please:\n1. Search for rust event sourcing crates\n2. Summarize the top three\n3) Save the report to report.md"),
            vec![
                row("t1", ToolCall, "web_search", "Search for rust event sourcing crates", &[]),
                row("t2", Processing, "summarize", "Summarize the top three", &["t1"]),
                row("t3", ToolCall, "filesystem", "Save the report to report.md", &["t2"]),
            ]
        );
    }

    /// For the README's request, t3 "summarize the options" got only t2's answer: the flights
    /// t1 found never reached it. A summarising step depends on every step before it in the
    /// request, so each one's output is among its inputs (docs/protocol.md's example).
    #[test]
    fn a_summarising_step_gets_every_step_before_it() {
        assert_eq!(
            shape("1. search for flights\n2. Which date suits you?\n3. summarize the options"),
            vec![
                row("t1", ToolCall, "web_search", "search for flights", &[]),
                row(
                    "t2",
                    Clarification,
                    "user",
                    "Which date suits you?",
                    &["t1"]
                ),
                row(
                    "t3",
                    Processing,
                    "summarize",
                    "summarize the options",
                    &["t1", "t2"]
                ),
            ]
        );
        assert_eq!(
            shape("fetch the prices, then fetch the reviews, then compare them, then email Bob"),
            vec![
                row("t1", ToolCall, "http_fetch", "fetch the prices", &[]),
                row("t2", ToolCall, "http_fetch", "fetch the reviews", &["t1"]),
                row("t3", Processing, "analyze", "compare them", &["t1", "t2"]),
                row("t4", ToolCall, "email", "email Bob", &["t3"]),
            ]
        );
        // In a bulleted list the others run in parallel; the summary waits for them all.
        assert_eq!(
            shape("- fetch https://a.example\n- fetch https://b.example\n- summarize both"),
            vec![
                row("t1", ToolCall, "http_fetch", "fetch https://a.example", &[]),
                row("t2", ToolCall, "http_fetch", "fetch https://b.example", &[]),
                row(
                    "t3",
                    Processing,
                    "summarize",
                    "summarize both",
                    &["t1", "t2"]
                ),
            ]
        );
        // A follow-up's summary summarises its own request's steps.
        let follow_up = parse_input_from("search hotels, then summarize them", 4);
        let deps: Vec<Vec<String>> = follow_up
            .tasks
            .iter()
            .map(|t| t.dependencies.iter().map(|d| d.0.clone()).collect())
            .collect();
        assert_eq!(deps, vec![vec![], vec!["t4".to_owned()]]);
    }

    #[test]
    fn bulleted_lists_run_in_parallel() {
        assert_eq!(
            shape("- fetch https://example.com/a\n- fetch https://example.com/b\n- translate the intro"),
            vec![
                row("t1", ToolCall, "http_fetch", "fetch https://example.com/a", &[]),
                row("t2", ToolCall, "http_fetch", "fetch https://example.com/b", &[]),
                row("t3", Processing, "translate", "translate the intro", &[]),
            ]
        );
    }

    #[test]
    fn sentences_and_sequencing_words_make_a_chain() {
        assert_eq!(
            shape("Run the tests, then analyze the failures. After that draft a fix"),
            vec![
                row("t1", ToolCall, "shell", "Run the tests", &[]),
                row("t2", Processing, "analyze", "analyze the failures", &["t1"]),
                row("t3", Processing, "generate", "draft a fix", &["t2"]),
            ]
        );
    }

    #[test]
    fn questions_become_clarifications() {
        let tasks = parse_input("Which region should I deploy to? Then deploy the service").tasks;
        assert_eq!(tasks[0].kind, Clarification);
        assert_eq!(tasks[0].target, "user");
        assert_eq!(
            tasks[0].question.as_deref(),
            Some("Which region should I deploy to?")
        );
        assert_eq!(tasks[1].kind, ToolCall);
        assert_eq!(tasks[1].dependencies, vec![TaskId::from("t1")]);
    }

    #[test]
    fn placeholders_ask_for_the_missing_detail_first() {
        let tasks = parse_input("Email the report to <recipient>").tasks;
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[0].kind, Clarification);
        assert!(tasks[0].description.contains("<recipient>"));
        assert_eq!(tasks[1].kind, ToolCall);
        assert_eq!(tasks[1].target, "email");
        assert_eq!(tasks[1].dependencies, vec![TaskId::from("t1")]);
    }

    #[test]
    fn numbering_continues_from_the_given_number() {
        let tasks = parse_input_from("think hard. answer", 7).tasks;
        assert_eq!(tasks[0].id.as_str(), "t7");
        assert_eq!(tasks[1].id.as_str(), "t8");
        assert_eq!(tasks[0].target, "llm");
    }

    #[test]
    fn numbering_stops_at_the_largest_number_without_overflowing() {
        // Found by the rule_parser fuzz target (fuzz/regressions/rule_parser/).
        let tasks = parse_input_from("think hard. answer", u64::MAX).tasks;
        assert_eq!(tasks[0].id.as_str(), "t18446744073709551615");
        assert_eq!(tasks[1].id, tasks[0].id);
    }

    #[test]
    fn empty_input_gives_no_task() {
        assert!(parse_input("  \n\t ").tasks.is_empty());
        assert!(parse_input("...").tasks.is_empty());
    }

    #[test]
    fn parsing_is_deterministic_and_total_on_odd_input() {
        for input in [
            "<",
            ">x<",
            "1.",
            "- ",
            "é?",
            "then then then",
            "1) \n2)",
            "a\u{0}b",
            "<<>>",
        ] {
            assert_eq!(parse_input(input), parse_input(input), "{input:?}");
        }
    }

    /// The requests that crashed `planner-svc run` (a byte offset inside a multi-byte
    /// character): each now gives a plan, cut where the language's own words say so.
    #[test]
    fn non_english_requests_plan_instead_of_panicking() {
        let cases: [(&str, usize); 6] = [
            ("Café au lait and croissant", 1),
            ("Überprüfe die Datei, dann fasse sie zusammen", 2),
            ("查找巴黎的天气，然后总结", 2),
            ("Найди погоду в Париже, затем кратко опиши", 2),
            ("Найди погоду в Париже и кратко опиши", 1),
            ("天気を調べて。まとめて！", 2),
        ];
        for (input, steps) in cases {
            let plan = parse_input(input);
            assert_eq!(plan.tasks.len(), steps, "{input:?}: {plan:?}");
            for pair in plan.tasks.windows(2) {
                if let [before, after] = pair {
                    assert_eq!(after.dependencies, vec![before.id.clone()], "{input:?}");
                }
            }
        }
        let question = parse_input("查找巴黎的天气？");
        assert_eq!(question.tasks.len(), 1);
        assert_eq!(question.tasks.first().map(|t| t.kind), Some(Clarification));
    }

    /// A connector word cut through a multi-byte character: "then " is five bytes, and the
    /// fifth byte of "théé" falls inside the second "é".
    #[test]
    fn leading_words_compare_on_character_boundaries() {
        for input in ["théé", "aéé", "nééé", "afterwards… now", "finalé,x"] {
            let plan = parse_input(input);
            assert_eq!(plan.tasks.len(), 1, "{input:?}");
        }
    }
}
