//! The planner's own overhead around an LLM call: building the prompt, parsing and validating a
//! 50-task answer, and recording it in the core. (The call itself is not measured.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use planner_core::*;
use planner_llm::{LlmPlanner, PlanContext};
use serde_json::json;

fn answer(n: usize) -> String {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let deps: Vec<String> = if i == 0 { vec![] } else { vec![format!("t{}", i - 1)] };
            json!({"id": format!("t{i}"), "description": format!("step {i}: do the thing with enough words to be realistic"), "kind": "tool_call", "target": "web_search", "dependencies": deps})
        })
        .collect();
    json!({"tasks": tasks}).to_string()
}

fn overhead(c: &mut Criterion) {
    let context = PlanContext {
        request: "a fifty step request ".repeat(20),
        max_tasks: 1_000,
        ..PlanContext::default()
    };
    let text = answer(50);
    c.bench_function("llm_overhead/prompt_parse_validate_record_50_tasks", |b| {
        b.iter(|| {
            let prompt = LlmPlanner::prompt(&context);
            assert_eq!(prompt.len(), 2);
            let plan = LlmPlanner::parse(&text, &context).unwrap();
            let mut planner = Planner::new();
            planner
                .process(Command::Initialize {
                    request_id: None,
                    input: context.request.clone(),
                    attachments: vec![],
                    plan: Some(plan),
                    planning: Some(Planning {
                        source: PlanSource::Llm,
                        note: None,
                    }),
                    now: Timestamp(0),
                })
                .unwrap()
                .len()
        });
    });
}

criterion_group!(benches, overhead);
criterion_main!(benches);
