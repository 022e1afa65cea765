//! Property tests: for any sequence of commands, replay equals live state, the invariants hold
//! after every step, and nothing panics.

use std::collections::BTreeSet;

use planner_core::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Request {
        text: usize,
    },
    Plan {
        tasks: Vec<(u8, u8)>,
    },
    Report {
        task: usize,
        attempt_delta: i8,
        outcome: u8,
        tokens: Option<u64>,
    },
    Answer {
        task: usize,
    },
    Tick {
        advance: u64,
    },
    Continue,
    Compact {
        supplied: bool,
        through: Option<u64>,
    },
    CancelTask {
        task: usize,
    },
    CancelPlan,
    Claim {
        task: usize,
        lease: u8,
    },
    Beat {
        task: usize,
        lease: u8,
    },
    Extend,
}

const REQUESTS: [&str; 6] = [
    "1. search for flights\n2. summarize the options\n3. Which date suits you?",
    "- fetch a.txt\n- fetch b.txt\n- run the tests\n- analyze the output",
    "Email the report to <someone>. then archive it",
    "think",
    "Which color? then paint the wall, then take a photo",
    "",
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..REQUESTS.len()).prop_map(|text| Op::Request { text }),
        1 => prop::collection::vec((0u8..3, any::<u8>()), 1..7).prop_map(|tasks| Op::Plan { tasks }),
        12 => (0..16usize, prop_oneof![6 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)], 0u8..5, prop::option::of(0u64..400))
            .prop_map(|(task, attempt_delta, outcome, tokens)| Op::Report { task, attempt_delta, outcome, tokens }),
        2 => (0..16usize).prop_map(|task| Op::Answer { task }),
        2 => (0u64..4_000).prop_map(|advance| Op::Tick { advance }),
        1 => Just(Op::Continue),
        1 => (any::<bool>(), proptest::option::of(0u64..40))
            .prop_map(|(supplied, through)| Op::Compact { supplied, through }),
        1 => (0..16usize).prop_map(|task| Op::CancelTask { task }),
        1 => Just(Op::CancelPlan),
        2 => Just(Op::Continue),
        4 => (0..16usize, 0u8..3).prop_map(|(task, lease)| Op::Claim { task, lease }),
        3 => (0..16usize, 0u8..3).prop_map(|(task, lease)| Op::Beat { task, lease }),
        1 => Just(Op::Extend),
    ]
}

fn planner_config() -> impl Strategy<Value = PlannerConfig> {
    (
        1usize..4,
        any::<bool>(),
        1u32..4,
        0u64..2_000,
        prop::option::of(1u64..5_000),
        any::<bool>(),
        prop::option::of(1u64..12),
        prop::option::of(100u64..1_000),
        16u64..400,
        prop::option::of(1_000u64..20_000),
        (
            any::<bool>(),
            prop::option::of(500u64..8_000),
            prop::option::of(1_000u64..20_000),
            prop::option::of(500u64..8_000),
            prop::option::of(500u64..8_000),
        ),
    )
        .prop_map(
            |(
                max_parallel,
                continue_on_failure,
                attempts,
                backoff,
                timeout,
                default_answer,
                dispatches,
                tokens,
                token_budget,
                wall,
                (require_claim, heartbeat, start_to_close, schedule_to_start, processing_heartbeat),
            )| {
                let mut c = PlannerConfig::default();
                c.max_parallel = max_parallel;
                if continue_on_failure {
                    c.failure = FailurePolicy::ContinueOnFailure;
                }
                c.retry.max_attempts = attempts;
                c.retry.initial_backoff_ms = backoff;
                c.retry.max_backoff_ms = backoff.max(1) * 4;
                c.clarification.timeout_ms = timeout;
                if default_answer {
                    c.clarification.on_timeout = OnClarificationTimeout::UseDefault {
                        answer: "default".into(),
                    };
                }
                c.budgets.max_dispatches = dispatches;
                c.budgets.max_tokens = tokens;
                c.budgets.max_wall_time_ms = wall;
                c.token_budget = token_budget;
                c.leases = LeasePolicy {
                    require_claim,
                    heartbeat_timeout_ms: heartbeat,
                    start_to_close_ms: start_to_close,
                    schedule_to_start_ms: schedule_to_start,
                    ..LeasePolicy::default()
                };
                if let Some(limit) = processing_heartbeat {
                    // A kind's own timeout beside the session's: both clocks run in one session.
                    c.leases.kinds.insert(
                        NodeKind::Processing,
                        TaskTimeouts {
                            heartbeat_timeout_ms: Some(limit),
                            ..TaskTimeouts::default()
                        },
                    );
                }
                c
            },
        )
}

struct Runner {
    planner: Planner,
    history: Vec<Event>,
    now: u64,
    plans: u32,
}

impl Runner {
    /// Mostly a task in flight (running or asking), sometimes any task, so that most reports
    /// and answers land and some do not.
    /// A task in flight (mostly) and its current attempt.
    fn attempt_of(&self, i: usize) -> (TaskId, u32) {
        let task_id = self.task_id(i);
        let attempt = self
            .planner
            .state()
            .task(&task_id)
            .map_or(1, |t| t.attempts);
        (task_id, attempt)
    }

    fn task_id(&self, i: usize) -> TaskId {
        let tasks = &self.planner.state().tasks;
        let live: Vec<&Task> = tasks
            .iter()
            .filter(|t| {
                matches!(
                    t.status,
                    TaskStatus::Running | TaskStatus::NeedsClarification
                )
            })
            .collect();
        if i < 12 && !live.is_empty() {
            live[i % live.len()].id.clone()
        } else if tasks.is_empty() {
            TaskId::from("t1")
        } else {
            tasks[i % tasks.len()].id.clone()
        }
    }

    fn command(&mut self, op: &Op) -> Command {
        let now = Timestamp(self.now);
        match op {
            Op::Request { text } => Command::Initialize {
                request_id: None,
                planning: None,
                input: REQUESTS[*text].into(),
                attachments: vec![],
                plan: None,
                now,
            },
            Op::Plan { tasks } => {
                self.plans += 1;
                let prefix = format!("p{}_", self.plans);
                let existing: Vec<TaskId> = self
                    .planner
                    .state()
                    .tasks
                    .iter()
                    .map(|t| t.id.clone())
                    .collect();
                let specs = tasks
                    .iter()
                    .enumerate()
                    .map(|(i, (kind, deps))| {
                        let kind = [
                            NodeKind::Clarification,
                            NodeKind::ToolCall,
                            NodeKind::Processing,
                        ][*kind as usize % 3];
                        let mut dependencies: Vec<TaskId> = (0..i)
                            .filter(|j| deps & (1 << (j % 8)) != 0)
                            .map(|j| TaskId(format!("{prefix}{j}")))
                            .collect();
                        // Now and then depend on a task listed later (cycles are refused whole).
                        if deps & 0x40 != 0 && i + 1 < tasks.len() {
                            dependencies.push(TaskId(format!("{prefix}{}", i + 1)));
                        }
                        // Now and then depend on an earlier request's task.
                        if deps & 0x80 != 0 && !existing.is_empty() {
                            dependencies.push(existing[*deps as usize % existing.len()].clone());
                        }
                        TaskSpec {
                            timeouts: None,
                            id: TaskId(format!("{prefix}{i}")),
                            description: format!("step {i}"),
                            kind,
                            target: if kind == NodeKind::Clarification {
                                "user".into()
                            } else {
                                "tool".into()
                            },
                            dependencies,
                            attachments: vec![],
                            question: None,
                        }
                    })
                    .collect();
                Command::Initialize {
                    request_id: None,
                    planning: None,
                    input: String::new(),
                    attachments: vec![],
                    plan: Some(PlanSpec { tasks: specs }),
                    now,
                }
            }
            Op::Report {
                task,
                attempt_delta,
                outcome,
                tokens,
            } => {
                let task_id = self.task_id(*task);
                let latest = self
                    .planner
                    .state()
                    .task(&task_id)
                    .map_or(0, |t| t.attempts);
                let attempt = (i64::from(latest) + i64::from(*attempt_delta)).max(0) as u32;
                let outcome = match outcome {
                    0 => ExecutorOutcome::Started,
                    1 => ExecutorOutcome::Completed {
                        output: format!("out {task_id}\n{}", "data ".repeat(20)),
                        tokens_used: *tokens,
                    },
                    2 => ExecutorOutcome::Failed {
                        error: "transient".into(),
                        retryable: true,
                        tokens_used: *tokens,
                    },
                    3 => ExecutorOutcome::Failed {
                        error: "fatal".into(),
                        retryable: false,
                        tokens_used: None,
                    },
                    _ => ExecutorOutcome::NeedsClarification {
                        question: "how?".into(),
                    },
                };
                // Executors report under the lease of their claim, when they claimed.
                let lease = self
                    .planner
                    .state()
                    .task(&task_id)
                    .and_then(|t| t.lease.as_ref())
                    .map(|l| l.token.clone());
                Command::HandleExecutorEvent {
                    lease,
                    event: ExecutorEvent {
                        task_id,
                        attempt,
                        outcome,
                    },
                    now,
                }
            }
            Op::Answer { task } => Command::AnswerClarification {
                task_id: self.task_id(*task),
                answer: "yes".into(),
                now,
            },
            Op::Tick { advance } => {
                self.now += advance;
                Command::Tick {
                    now: Timestamp(self.now),
                }
            }
            Op::Continue => Command::Continue,
            Op::Compact { supplied, through } => Command::CompactContext {
                summary: supplied.then(|| "an outside summary".to_owned()),
                through: *through,
                now,
            },
            Op::CancelTask { task } => Command::Cancel {
                target: CancelTarget::Task {
                    task_id: self.task_id(*task),
                },
                reason: None,
                now,
            },
            Op::CancelPlan => Command::Cancel {
                target: CancelTarget::Plan,
                reason: None,
                now,
            },
            Op::Claim { task, lease } => {
                let (task_id, attempt) = self.attempt_of(*task);
                Command::ClaimAttempt {
                    task_id,
                    attempt,
                    lease: format!("L{lease}"),
                    now,
                }
            }
            Op::Extend => Command::ExtendLeases { now },
            Op::Beat { task, lease } => {
                let (task_id, attempt) = self.attempt_of(*task);
                Command::Heartbeat {
                    task_id,
                    attempt,
                    lease: format!("L{lease}"),
                    now,
                }
            }
        }
    }
}

/// The invariants every reachable state satisfies.
fn check_invariants(
    planner: &Planner,
    history: &[Event],
    before: &PlannerState,
) -> Result<(), TestCaseError> {
    let s = planner.state();
    let running = s
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Running)
        .count();
    prop_assert_eq!(running, s.running_count());
    prop_assert!(
        running <= s.config.max_parallel,
        "{} running > max_parallel {}",
        running,
        s.config.max_parallel
    );
    let open = s.tasks.iter().filter(|t| !t.status.is_terminal()).count();
    prop_assert_eq!(open, s.open_count());

    let dispatches: Vec<(&TaskId, u32)> = history
        .iter()
        .filter_map(|e| match e {
            Event::TaskDispatched {
                task_id, attempt, ..
            } => Some((task_id, *attempt)),
            _ => None,
        })
        .collect();
    let unique: BTreeSet<_> = dispatches.iter().collect();
    prop_assert_eq!(
        unique.len(),
        dispatches.len(),
        "a (task, attempt) was dispatched twice"
    );

    for task in &s.tasks {
        if matches!(
            task.status,
            TaskStatus::Running | TaskStatus::Completed | TaskStatus::NeedsClarification
        ) {
            for dep in &task.dependencies {
                let dep_status = s.task(dep).map(|t| t.status);
                prop_assert_eq!(
                    dep_status,
                    Some(TaskStatus::Completed),
                    "{} ran before {} completed",
                    task.id,
                    dep
                );
            }
        }
        if task.status == TaskStatus::Running {
            prop_assert!(
                unique.contains(&(&task.id, task.attempts)),
                "{} runs undispatched",
                task.id
            );
        }
        prop_assert_eq!(
            task.status == TaskStatus::NeedsClarification,
            s.awaiting_answer.contains_key(&task.id),
            "waiting flag of {}",
            task.id
        );
    }
    for old in &before.tasks {
        if old.status.is_terminal() {
            let now = s.task(&old.id).map(|t| t.status);
            prop_assert_eq!(now, Some(old.status), "terminal task {} changed", old.id);
        }
    }
    if s.phase.is_terminal() {
        prop_assert_eq!(open, 0, "the plan ended with open tasks");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn replay_equals_live_state_and_invariants_hold(
        config in planner_config(),
        first in 0..REQUESTS.len() - 1,
        ops in prop::collection::vec(op(), 0..60),
    ) {
        let planner = Planner::with_config(config).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut runner = Runner { planner, history: Vec::new(), now: 0, plans: 0 };
        let ops = std::iter::once(Op::Request { text: first }).chain(ops);
        for op in ops {
            let command = runner.command(&op);
            let before = runner.planner.clone();
            match runner.planner.process(command.clone()) {
                Ok(events) => {
                    // The stores' index of unfinished sessions follows the batch: what
                    // `open_after` says is what the phase is now; no effect leaves it as it was.
                    let running = runner.planner.state().phase == PlanPhase::Running;
                    let expected = open_after(&events).unwrap_or(before.state().phase == PlanPhase::Running);
                    prop_assert_eq!(expected, running, "open_after disagrees with the phase after {:?}: {:?}", command, events);
                    // Every event carries an `at` no earlier than the clock before it.
                    runner.history.extend(events);
                }
                Err(_) => {
                    prop_assert_eq!(runner.planner.state(), before.state(), "a refused {:?} changed the state", command);
                }
            }
            check_invariants(&runner.planner, &runner.history, before.state())?;
            let replayed = Planner::fold(&runner.history);
            prop_assert_eq!(replayed.state(), runner.planner.state(), "replay differs after {:?}", command);
            // A snapshot (indexes left out) resumes as the same planner.
            let snapshot = serde_json::to_vec(runner.planner.state()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let state: PlannerState = serde_json::from_slice(&snapshot).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let resumed = Planner::from_state(state);
            prop_assert_eq!(resumed.state(), runner.planner.state(), "snapshot differs after {:?}", command);
            // Events survive their persisted form.
            for event in &runner.history[before.version() as usize..] {
                let decoded = codec::decode(&codec::encode(event)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&decoded, event);
            }
        }
    }

    #[test]
    fn arbitrary_json_commands_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        // Whatever arrives on the wire either fails to decode or is processed without a panic.
        if let Ok(command) = serde_json::from_slice::<Command>(&bytes) {
            let mut planner = Planner::new();
            let _ = planner.process(command);
        }
        let _ = codec::decode(&bytes);
    }

    #[test]
    fn requests_in_any_script_plan_without_panicking(input in unicode_request()) {
        // Users write in every language; the parser's connector words and markers are ASCII
        // and must never be matched by cutting a character in two.
        let mut planner = Planner::new();
        // A typed refusal (nothing to plan in it) is an answer; a panic is the bug.
        let Ok(mut history) = planner.process(Command::Initialize {
            request_id: None,
            planning: None,
            input: input.clone(),
            attachments: vec![],
            plan: None,
            now: Timestamp(1_000),
        }) else {
            prop_assert!(planner.state().tasks.is_empty(), "a refused request changed state");
            return Ok(());
        };
        // A follow-up parses the same way, numbering on from the first plan.
        if let Ok(more) = planner.process(Command::Initialize {
            request_id: None,
            planning: None,
            input: format!("{input} then {input}"),
            attachments: vec![],
            plan: None,
            now: Timestamp(2_000),
        }) {
            history.extend(more);
        }
        let replayed = Planner::fold(&history);
        prop_assert_eq!(replayed.state(), planner.state());
    }
}

/// Requests mixing the parser's own words and marks with text from every script: accents,
/// combining marks, CJK, right-to-left scripts, emoji (with joiners) and any `char` at all.
fn unicode_request() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        prop::sample::select(vec![
            "then ",
            "Then ",
            "and then ",
            ", then ",
            "after that ",
            "finally, ",
            "next ",
            "1. ",
            "2) ",
            "- ",
            "• ",
            "? ",
            ". ",
            "! ",
            "\n",
            "<",
            ">",
            "TBD",
            "search ",
            "summarize ",
        ])
        .prop_map(str::to_owned),
        prop::sample::select(vec![
            "é",
            "e\u{301}",
            "\u{301}",
            "ß",
            "Über",
            "thé",
            "café",
            "然后",
            "，",
            "。",
            "？",
            "查找",
            "天気",
            "Найди",
            "затем",
            "مرحبا",
            "؟",
            "שלום",
            "\u{200f}",
            "\u{202e}",
            "👩\u{200d}💻",
            "🇫🇷",
            "\u{fe0f}",
            "\u{0}",
            "\u{feff}",
            "ᄀ",
            "𝔘",
        ])
        .prop_map(str::to_owned),
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(fragment, 0..24).prop_map(|parts| parts.concat())
}
