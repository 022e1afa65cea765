//! A simulated cluster: a virtual clock, an in-memory bus with at-least-once, out-of-order
//! delivery, executors that succeed, fail, ask or stall, humans who answer late, and crashes
//! after which the planner is rebuilt from its persisted events. Over many seeds: every plan
//! ends, no task is lost, and no (task, attempt) is dispatched twice.

use std::collections::{BTreeMap, BTreeSet};

use planner_core::*;

/// A small deterministic generator (xorshift64*): the simulation must replay from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Sim {
    rng: Rng,
    planner: Planner,
    /// The durable log: what a crash keeps.
    store: Vec<Event>,
    now: u64,
    /// Dispatched attempts an executor holds, not yet reported.
    in_flight: Vec<(TaskId, u32)>,
    /// Reports sent but not yet delivered (the bus reorders and redelivers).
    mailbox: Vec<ExecutorEvent>,
    questions: BTreeSet<TaskId>,
    /// How many times each (task, attempt) reached an executor.
    executions: BTreeMap<(TaskId, u32), u32>,
    crashes: u32,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut config = PlannerConfig::default();
        config.max_parallel = 1 + rng.below(4) as usize;
        config.retry.max_attempts = 1 + rng.below(4) as u32;
        config.retry.initial_backoff_ms = rng.below(500);
        if rng.chance(50) {
            config.failure = FailurePolicy::ContinueOnFailure;
        }
        if rng.chance(30) {
            config.clarification.timeout_ms = Some(1 + rng.below(3_000));
            if rng.chance(50) {
                config.clarification.on_timeout = OnClarificationTimeout::UseDefault {
                    answer: "default".into(),
                };
            }
        }
        config.token_budget = 64 + rng.below(512);
        let planner = Planner::with_config(config).unwrap_or_default();
        Sim {
            rng,
            planner,
            store: Vec::new(),
            now: 0,
            in_flight: Vec::new(),
            mailbox: Vec::new(),
            questions: BTreeSet::new(),
            executions: BTreeMap::new(),
            crashes: 0,
        }
    }

    fn random_plan(&mut self) -> PlanSpec {
        let n = 1 + self.rng.below(30) as usize;
        let tasks = (0..n)
            .map(|i| {
                let kind = match self.rng.below(10) {
                    0 => NodeKind::Clarification,
                    1..=5 => NodeKind::ToolCall,
                    _ => NodeKind::Processing,
                };
                let dependencies = (0..i)
                    .filter(|_| self.rng.chance(15))
                    .map(|j| TaskId(format!("s{j}")))
                    .collect();
                TaskSpec {
                    timeouts: None,
                    id: TaskId(format!("s{i}")),
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
        PlanSpec { tasks }
    }

    /// Feeds a command through the driver's contract: process, persist, then publish.
    fn drive(&mut self, command: Command) {
        let events = match self.planner.process(command) {
            Ok(events) => events,
            Err(_) => return, // refused: nothing changed, nothing to publish
        };
        self.store.extend(events.iter().cloned());
        for event in &events {
            match event.planner_cmd() {
                Some(PlannerCmd::ExecuteTool(d) | PlannerCmd::RunProcessing(d)) => {
                    *self
                        .executions
                        .entry((d.task_id.clone(), d.attempt))
                        .or_default() += 1;
                    self.in_flight.push((d.task_id.clone(), d.attempt));
                }
                Some(PlannerCmd::AskUser { task_id, .. }) => {
                    self.questions.insert(task_id.clone());
                }
                Some(PlannerCmd::CancelTask { task_id, attempt }) => {
                    self.in_flight
                        .retain(|(t, a)| !(t == task_id && a == attempt));
                    self.questions.remove(task_id);
                }
                None => {}
            }
            if let Event::ClarificationAnswered { task_id, .. } = event {
                self.questions.remove(task_id);
            }
        }
    }

    fn executor_step(&mut self) {
        let k = self.rng.below(self.in_flight.len() as u64) as usize;
        if self.rng.chance(10) {
            return; // stall: it stays in flight and reports later
        }
        let (task_id, attempt) = self.in_flight.swap_remove(k);
        let outcome = match self.rng.below(100) {
            0..=69 => ExecutorOutcome::Completed {
                output: format!("result of {task_id}"),
                tokens_used: Some(self.rng.below(50)),
            },
            70..=84 => ExecutorOutcome::Failed {
                error: "flaky".into(),
                retryable: true,
                tokens_used: None,
            },
            85..=91 => ExecutorOutcome::Failed {
                error: "broken".into(),
                retryable: false,
                tokens_used: None,
            },
            _ => ExecutorOutcome::NeedsClarification {
                question: "which one?".into(),
            },
        };
        if self.rng.chance(30) {
            self.mailbox.push(ExecutorEvent {
                task_id: task_id.clone(),
                attempt,
                outcome: ExecutorOutcome::Started,
            });
        }
        let report = ExecutorEvent {
            task_id,
            attempt,
            outcome,
        };
        if self.rng.chance(10) {
            self.mailbox.push(report.clone()); // redelivered
        }
        self.mailbox.push(report);
    }

    fn run(&mut self) -> Result<(), String> {
        let plan = self.random_plan();
        self.drive(Command::Initialize {
            request_id: None,
            planning: None,
            input: "simulated".into(),
            attachments: vec![],
            plan: Some(plan),
            now: Timestamp(0),
        });
        for _ in 0..20_000 {
            let done = self.planner.state().phase.is_terminal();
            if done && self.mailbox.is_empty() {
                break;
            }
            self.now += self.rng.below(50);
            let roll = self.rng.below(100);
            if roll < 5 {
                // Crash: the process dies; a new one folds the store. Published work stays out.
                let rebuilt = Planner::fold(&self.store);
                if rebuilt.state() != self.planner.state() {
                    return Err(format!(
                        "rebuilt state differs after {} events",
                        self.store.len()
                    ));
                }
                self.planner = rebuilt;
                self.crashes += 1;
            } else if roll < 45 && !self.mailbox.is_empty() {
                let k = self.rng.below(self.mailbox.len() as u64) as usize;
                let event = self.mailbox.swap_remove(k);
                self.drive(Command::HandleExecutorEvent {
                    lease: None,
                    event,
                    now: Timestamp(self.now),
                });
            } else if roll < 85 && !self.in_flight.is_empty() {
                self.executor_step();
            } else if roll < 95 && !self.questions.is_empty() {
                let k = self.rng.below(self.questions.len() as u64) as usize;
                let task_id = self
                    .questions
                    .iter()
                    .nth(k)
                    .cloned()
                    .unwrap_or_else(|| TaskId::from("?"));
                self.drive(Command::AnswerClarification {
                    task_id,
                    answer: "an answer".into(),
                    now: Timestamp(self.now),
                });
            } else if self.mailbox.is_empty() && self.in_flight.is_empty() && !done {
                // Nothing moves but time: jump to the next deadline, as a shell's timer would.
                match self.planner.next_deadline() {
                    Some(deadline) => {
                        self.now = self.now.max(deadline.as_millis());
                        self.drive(Command::Tick {
                            now: Timestamp(self.now),
                        });
                    }
                    None if self.questions.is_empty() => {
                        return Err(format!(
                            "stuck: nothing in flight, nothing timed, plan {:?}",
                            self.planner.state().phase
                        ));
                    }
                    None => {}
                }
            }
        }
        let state = self.planner.state();
        if !state.phase.is_terminal() {
            return Err(format!("did not finish: {:?}", state.phase));
        }
        if let Some(t) = state.tasks.iter().find(|t| !t.status.is_terminal()) {
            return Err(format!("task {} lost in {:?}", t.id, t.status));
        }
        if let Some(((t, a), n)) = self.executions.iter().find(|(_, n)| **n > 1) {
            return Err(format!("{t} attempt {a} ran {n} times"));
        }
        Ok(())
    }
}

#[test]
fn many_seeds_every_plan_ends_nothing_lost_nothing_run_twice() {
    let mut crashes = 0;
    let mut outcomes = BTreeMap::<&str, u32>::new();
    for seed in 0..1_000 {
        let mut sim = Sim::new(seed);
        if let Err(problem) = sim.run() {
            panic!("seed {seed}: {problem}");
        }
        crashes += sim.crashes;
        let outcome = match sim.planner.state().phase {
            PlanPhase::Completed => "completed",
            PlanPhase::Failed { .. } => "failed",
            _ => "other",
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    // The simulation must exercise both endings and crashes, or it proves little.
    assert!(crashes > 1_000, "only {crashes} crashes");
    assert!(
        outcomes.get("completed").copied().unwrap_or(0) > 100,
        "{outcomes:?}"
    );
    assert!(
        outcomes.get("failed").copied().unwrap_or(0) > 100,
        "{outcomes:?}"
    );
}
