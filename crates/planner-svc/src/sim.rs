//! Simulated executors: the one harness the tests, the embedded run and the load generator use
//! to exercise a planner without real tools.
//!
//! A [`SimExecutor`] turns a [`TaskMessage`] into the reports a real executor would send:
//! `started`, then `completed` (or, by the configured odds, a retryable failure), after a
//! delay. Its randomness is seeded, so a run can be repeated.

use std::time::Duration;

use planner_core::{ExecutorEvent, ExecutorOutcome};

use crate::protocol::TaskMessage;

/// How simulated executors behave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimBehaviour {
    /// How long a task takes, on average.
    pub latency: Duration,
    /// Spread of the latency, in percent: 50 means uniformly between 0.5× and 1.5× `latency`.
    pub jitter_percent: u8,
    /// Percent of attempts that fail (retryably).
    pub fail_percent: u8,
    /// Tokens reported per completed task.
    pub tokens: u64,
}

impl Default for SimBehaviour {
    fn default() -> Self {
        SimBehaviour {
            latency: Duration::from_millis(20),
            jitter_percent: 0,
            fail_percent: 0,
            tokens: 25,
        }
    }
}

/// A simulated executor pool.
#[derive(Debug, Clone)]
pub struct SimExecutor {
    behaviour: SimBehaviour,
    state: u64,
}

impl SimExecutor {
    /// A pool behaving as `behaviour`, with its randomness seeded by `seed`.
    pub fn new(behaviour: SimBehaviour, seed: u64) -> Self {
        SimExecutor {
            behaviour,
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    fn roll(&mut self) -> u8 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) % 100) as u8
    }

    /// The delay before the outcome (drawn anew each call when there is jitter).
    pub fn latency(&mut self) -> Duration {
        let jitter = u32::from(self.behaviour.jitter_percent.min(100));
        if jitter == 0 {
            return self.behaviour.latency;
        }
        // A factor between (100 - jitter)% and (100 + jitter)%.
        let roll = u32::from(self.roll()) * 2 * jitter / 99;
        self.behaviour.latency * (100 - jitter + roll) / 100
    }

    /// The final report for `task`: what the simulated tool "did".
    pub fn outcome(&mut self, task: &TaskMessage) -> ExecutorEvent {
        let a = &task.assignment;
        let outcome = if self.roll() < self.behaviour.fail_percent {
            ExecutorOutcome::Failed {
                error: format!("simulated failure of {} attempt {}", a.task_id, a.attempt),
                retryable: true,
                tokens_used: None,
            }
        } else {
            let mut output = format!("[{}] {}", a.target, a.description);
            if !a.inputs.is_empty() {
                let inputs: Vec<&str> = a.inputs.iter().map(|i| i.task_id.as_str()).collect();
                output.push_str(&format!(" (from {})", inputs.join(", ")));
            }
            if let Some(answer) = &a.answer {
                output.push_str(&format!(" (answer: {answer})"));
            }
            ExecutorOutcome::Completed {
                output,
                tokens_used: Some(self.behaviour.tokens),
            }
        };
        ExecutorEvent {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            outcome,
        }
    }

    /// The `started` report for `task`.
    pub fn started(task: &TaskMessage) -> ExecutorEvent {
        ExecutorEvent {
            task_id: task.assignment.task_id.clone(),
            attempt: task.assignment.attempt,
            outcome: ExecutorOutcome::Started,
        }
    }
}
