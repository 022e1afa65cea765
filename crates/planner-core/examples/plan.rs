//! Plans a request and runs it in-process with simulated executors, printing progress.
//!
//! ```text
//! cargo run -p planner-core --example plan -- "1. search for flights 2. Which date suits you? ..."
//! ```
//!
//! Questions are asked on the terminal; with no terminal (or `--yes`), they are answered "yes".
//! Time is simulated: each task "takes" 100 ms of virtual time, so the run is instant and the
//! same every time. A shell like this one, with real executors and a store, is all the core needs.

use std::collections::VecDeque;
use std::io::{self, BufRead, IsTerminal, Write};
use std::process::ExitCode;

use planner_core::*;

const DEMO_REQUEST: &str = "\
1. Search for direct flights from Lisbon to Oslo
2. Which dates suit you?
3. Compare the prices and summarize the best three options
4. Email the summary to <address>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let auto_answer = args.iter().any(|a| a == "--yes") || !io::stdin().is_terminal();
    let request = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let request = if request.trim().is_empty() {
        DEMO_REQUEST.to_owned()
    } else {
        request
    };
    match run(&request, auto_answer) {
        Ok(PlanPhase::Completed) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(request: &str, auto_answer: bool) -> Result<PlanPhase, Error> {
    let mut planner = Planner::new();
    let mut now = Timestamp(0);
    let mut work: VecDeque<Dispatch> = VecDeque::new();
    let mut questions: VecDeque<(TaskId, String)> = VecDeque::new();

    println!("request: {}", request.replace('\n', " / "));
    let events = planner.process(Command::Initialize {
        request_id: None,
        planning: None,
        input: request.to_owned(),
        attachments: vec![],
        plan: None,
        now,
    })?;
    report(&events, &mut work, &mut questions);

    while !planner.state().phase.is_terminal() {
        if let Some(dispatch) = work.pop_front() {
            now = now.plus_millis(100);
            let Some(assignment) = planner.assignment(&dispatch) else {
                continue;
            };
            let output = simulate(&assignment);
            let events = planner.process(Command::HandleExecutorEvent {
                lease: None,
                event: ExecutorEvent {
                    task_id: dispatch.task_id,
                    attempt: dispatch.attempt,
                    outcome: ExecutorOutcome::Completed {
                        output,
                        tokens_used: Some(50),
                    },
                },
                now,
            })?;
            report(&events, &mut work, &mut questions);
        } else if let Some((task_id, question)) = questions.pop_front() {
            let answer = ask(&question, auto_answer);
            let events = planner.process(Command::AnswerClarification {
                task_id,
                answer,
                now,
            })?;
            report(&events, &mut work, &mut questions);
        } else if let Some(deadline) = planner.next_deadline() {
            now = now.max(deadline);
            let events = planner.process(Command::Tick { now })?;
            report(&events, &mut work, &mut questions);
        } else {
            break;
        }
    }
    let state = planner.state();
    println!(
        "plan {:?} after {} events, {} dispatches, {} of simulated time",
        state.phase, state.version, state.usage.dispatches, now
    );
    Ok(state.phase.clone())
}

/// What a demo executor "does": echo the task with its inputs.
fn simulate(assignment: &TaskAssignment) -> String {
    let inputs: Vec<&str> = assignment
        .inputs
        .iter()
        .map(|i| i.task_id.as_str())
        .collect();
    let mut output = format!("[{}] done: {}", assignment.target, assignment.description);
    if !inputs.is_empty() {
        output.push_str(&format!(" (using {})", inputs.join(", ")));
    }
    if let Some(answer) = &assignment.answer {
        output.push_str(&format!(" (answer: {answer})"));
    }
    output
}

fn ask(question: &str, auto_answer: bool) -> String {
    if auto_answer {
        println!("  ? {question} -> yes (auto)");
        return "yes".to_owned();
    }
    print!("  ? {question} > ");
    let _ = io::stdout().flush();
    let mut line = String::new();
    match io::stdin().lock().read_line(&mut line) {
        Ok(n) if n > 0 && !line.trim().is_empty() => line.trim().to_owned(),
        _ => "yes".to_owned(),
    }
}

fn report(
    events: &[Event],
    work: &mut VecDeque<Dispatch>,
    questions: &mut VecDeque<(TaskId, String)>,
) {
    for event in events {
        match event {
            Event::TasksPlanned { tasks, source, .. } => {
                let plural = if tasks.len() == 1 { "" } else { "s" };
                println!("planned {} task{plural} ({source:?}):", tasks.len());
                for t in tasks {
                    let deps: Vec<&str> = t.dependencies.iter().map(TaskId::as_str).collect();
                    println!(
                        "  {:<4} {:<14} {:<12} {}{}",
                        t.id.as_str(),
                        t.kind.as_str(),
                        t.target,
                        t.description,
                        if deps.is_empty() {
                            String::new()
                        } else {
                            format!("  (after {})", deps.join(", "))
                        }
                    );
                }
            }
            Event::TaskDispatched {
                cmd: PlannerCmd::ExecuteTool(d) | PlannerCmd::RunProcessing(d),
                ..
            } => {
                println!("-> {} attempt {} to {}", d.task_id, d.attempt, d.target);
                work.push_back(d.clone());
            }
            Event::ClarificationRequested {
                cmd:
                    PlannerCmd::AskUser {
                        task_id, question, ..
                    },
                ..
            } => {
                questions.push_back((task_id.clone(), question.clone()));
            }
            Event::TaskStatusUpdated {
                task_id,
                status: TaskStatus::Completed,
                output,
                ..
            } => {
                println!(
                    "<- {task_id} completed: {}",
                    output.as_deref().unwrap_or("")
                );
            }
            Event::TaskStatusUpdated {
                task_id,
                status: TaskStatus::Failed,
                error,
                ..
            } => {
                println!("<- {task_id} failed: {}", error.as_deref().unwrap_or(""));
            }
            Event::ClarificationAnswered {
                task_id, answer, ..
            } => {
                println!("<- {task_id} answered: {answer}");
            }
            Event::ContextCompacted {
                tokens_before,
                tokens_after,
                ..
            } => {
                println!("   context compacted: {tokens_before} -> {tokens_after} tokens");
            }
            Event::PlanCompleted { .. } => println!("plan completed"),
            Event::PlanFailed { reason, .. } => println!("plan failed: {reason:?}"),
            _ => {}
        }
    }
}
