//! How a planner behaves: prompt, profile, limits, retry, failure and clarification policies.
//!
//! The config a session started with is recorded in its first event, so a replay decides with the
//! same limits even if the defaults changed since.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::compact::Profile;
use crate::error::ConfigError;
use crate::plan::TaskTimeouts;
use crate::types::NodeKind;

/// Default token budget for the context handed to executors.
pub const DEFAULT_TOKEN_BUDGET: u64 = 4_000;
/// Default longest error message kept, in characters.
pub const DEFAULT_ERROR_CHAR_LIMIT: usize = 2_000;
/// Default number of tasks running at once.
pub const DEFAULT_MAX_PARALLEL: usize = 4;
/// Default largest plan, in tasks.
pub const DEFAULT_MAX_PLAN_TASKS: usize = 10_000;
/// Default longest request, in characters.
pub const DEFAULT_MAX_INPUT_CHARS: usize = 100_000;

/// The planner's settings. Every field has a default; see [`PlannerConfig::default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct PlannerConfig {
    /// Prepended to the context of processing steps.
    pub system_prompt: String,
    /// What compaction keeps of older messages.
    pub profile: Profile,
    /// The context (summary + recent messages) is compacted when its estimated tokens pass this.
    pub token_budget: u64,
    /// Errors longer than this many characters keep their head and tail only.
    pub error_char_limit: usize,
    /// How many tool or processing tasks run at once. 1 reproduces a sequential cursor.
    pub max_parallel: usize,
    /// The largest plan accepted, in tasks, per request.
    pub max_plan_tasks: usize,
    /// The longest request accepted, in characters.
    pub max_input_chars: usize,
    /// When and how failed attempts are retried.
    pub retry: RetryPolicy,
    /// What a task that fails for good does to the rest of the plan.
    pub failure: FailurePolicy,
    /// How long a human has to answer, and what happens after.
    pub clarification: ClarificationPolicy,
    /// Limits that stop the plan when passed.
    pub budgets: Budgets,
    /// Claims, leases and the timeouts that find executors that died or stalled.
    pub leases: LeasePolicy,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            system_prompt: String::new(),
            profile: Profile::General,
            token_budget: DEFAULT_TOKEN_BUDGET,
            error_char_limit: DEFAULT_ERROR_CHAR_LIMIT,
            max_parallel: DEFAULT_MAX_PARALLEL,
            max_plan_tasks: DEFAULT_MAX_PLAN_TASKS,
            max_input_chars: DEFAULT_MAX_INPUT_CHARS,
            retry: RetryPolicy::default(),
            failure: FailurePolicy::FailFast,
            clarification: ClarificationPolicy::default(),
            budgets: Budgets::default(),
            leases: LeasePolicy::default(),
        }
    }
}

impl PlannerConfig {
    /// Checks every field and reports all problems together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.max_parallel == 0 {
            problems.push("max_parallel must be at least 1".to_owned());
        }
        if self.max_plan_tasks == 0 {
            problems.push("max_plan_tasks must be at least 1".to_owned());
        }
        if self.max_input_chars == 0 {
            problems.push("max_input_chars must be at least 1".to_owned());
        }
        if self.token_budget < 16 {
            problems.push("token_budget must be at least 16".to_owned());
        }
        if self.error_char_limit < 32 {
            problems.push("error_char_limit must be at least 32".to_owned());
        }
        if self.retry.max_attempts == 0 {
            problems.push("retry.max_attempts must be at least 1".to_owned());
        }
        if self.retry.multiplier_percent < 100 {
            problems.push("retry.multiplier_percent must be at least 100".to_owned());
        }
        if self.retry.max_backoff_ms < self.retry.initial_backoff_ms {
            problems
                .push("retry.max_backoff_ms must be at least retry.initial_backoff_ms".to_owned());
        }
        self.leases.check(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Exponential backoff between attempts of a task: the n-th retry waits
/// `min(initial_backoff_ms * (multiplier_percent/100)^(n-1), max_backoff_ms)`.
///
/// There is no jitter: the core has no randomness. Executors pools spread load by themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts per task, the first included. 1 means no retry.
    pub max_attempts: u32,
    /// Wait before the first retry.
    pub initial_backoff_ms: u64,
    /// Growth per retry, in percent (200 doubles).
    pub multiplier_percent: u32,
    /// The longest wait.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 1_000,
            multiplier_percent: 200,
            max_backoff_ms: 60_000,
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry).
    pub fn backoff_ms(&self, retry: u32) -> u64 {
        let mut delay = self.initial_backoff_ms as u128;
        for _ in 1..retry {
            delay = delay * self.multiplier_percent as u128 / 100;
            if delay >= self.max_backoff_ms as u128 {
                return self.max_backoff_ms;
            }
        }
        (delay as u64).min(self.max_backoff_ms)
    }
}

/// What a task that fails for good does to the rest of the plan. Its dependents fail either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Stop at once: cancel what runs, fail the plan.
    FailFast,
    /// Let independent branches finish, then fail the plan.
    ContinueOnFailure,
}

/// How long a human has to answer a question, and what happens when the time passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ClarificationPolicy {
    /// Time to answer; `None` waits for ever.
    pub timeout_ms: Option<u64>,
    /// What happens when the time passes.
    pub on_timeout: OnClarificationTimeout,
}

impl Default for ClarificationPolicy {
    fn default() -> Self {
        ClarificationPolicy {
            timeout_ms: None,
            on_timeout: OnClarificationTimeout::Fail,
        }
    }
}

/// What a clarification whose deadline passed turns into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OnClarificationTimeout {
    /// The task fails (and the failure policy applies).
    Fail,
    /// The task goes on with this answer.
    UseDefault {
        /// The answer used.
        answer: String,
    },
}

/// Optional limits; passing one stops the plan in a failed state that names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Budgets {
    /// Most dispatches (questions included) for the session.
    pub max_dispatches: Option<u64>,
    /// Most tool and processing attempts (retries included) for the session.
    pub max_attempts: Option<u64>,
    /// Most tokens reported used by executors.
    pub max_tokens: Option<u64>,
    /// Longest time a run of the plan may take: from its first request, or from the follow-up
    /// that reopened it after it ended.
    pub max_wall_time_ms: Option<u64>,
}

/// Which budget was passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// [`Budgets::max_dispatches`].
    Dispatches,
    /// [`Budgets::max_attempts`].
    Attempts,
    /// [`Budgets::max_tokens`].
    Tokens,
    /// [`Budgets::max_wall_time_ms`].
    WallTime,
}

/// How the planner knows an attempt is still being worked on.
///
/// An executor **claims** an attempt before running it and gets a lease token; the claim is
/// the fence that makes a second delivery of one dispatch harmless (a second claim is refused).
/// While it runs it **heartbeats** with the token, and its report must carry it. An attempt
/// whose executor went silent, ran too long, or was never claimed in time is closed as failed
/// (retryable) and retried as a new attempt under the retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct LeasePolicy {
    /// Reports on an attempt must carry the lease of a claim: an executor cannot complete a
    /// task it never claimed. Off in the core's default (tests and embedded use without
    /// executors that claim); the daemon's configuration turns it on.
    pub require_claim: bool,
    /// A claimed attempt with no heartbeat for this long is timed out.
    pub heartbeat_timeout_ms: Option<u64>,
    /// A claimed attempt running longer than this is timed out, heartbeats or not.
    pub start_to_close_ms: Option<u64>,
    /// With `require_claim`, a dispatched attempt no executor claimed within this long is
    /// timed out (a queue with no live executor). None: it waits.
    pub schedule_to_start_ms: Option<u64>,
    /// Timeouts for one kind of task (`tool_call`, `processing`): each one set replaces the
    /// session-wide one above. Clarifications have their own (`clarification.timeout_ms`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub kinds: BTreeMap<NodeKind, TaskTimeouts>,
    /// Timeouts for one target (`web_search`, `summarize`, ...): each one set replaces the
    /// kind's and the session's. A task of a supplied plan may still set its own, which win.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, TaskTimeouts>,
}

impl LeasePolicy {
    /// The timeouts that apply to an attempt of a task of `kind` served by `target`, with the
    /// task's `own` from its plan: for each timeout, the most specific one set wins (the task's,
    /// then the target's, then the kind's, then the session's).
    pub fn timeouts_for(
        &self,
        kind: NodeKind,
        target: &str,
        own: Option<TaskTimeouts>,
    ) -> TaskTimeouts {
        let layers = [
            own,
            self.targets.get(target).copied(),
            self.kinds.get(&kind).copied(),
            Some(TaskTimeouts {
                heartbeat_timeout_ms: self.heartbeat_timeout_ms,
                start_to_close_ms: self.start_to_close_ms,
                schedule_to_start_ms: self.schedule_to_start_ms,
            }),
        ];
        let first = |pick: fn(&TaskTimeouts) -> Option<u64>| layers.iter().flatten().find_map(pick);
        TaskTimeouts {
            heartbeat_timeout_ms: first(|t| t.heartbeat_timeout_ms),
            start_to_close_ms: first(|t| t.start_to_close_ms),
            schedule_to_start_ms: first(|t| t.schedule_to_start_ms),
        }
    }

    /// Adds a problem for each zero timeout and each name that cannot be a kind or target.
    fn check(&self, problems: &mut Vec<String>) {
        let session = TaskTimeouts {
            heartbeat_timeout_ms: self.heartbeat_timeout_ms,
            start_to_close_ms: self.start_to_close_ms,
            schedule_to_start_ms: self.schedule_to_start_ms,
        };
        let mut layers = vec![("leases".to_owned(), session)];
        for (kind, timeouts) in &self.kinds {
            if *kind == NodeKind::Clarification {
                problems.push(
                    "leases.kinds.clarification: questions have no attempts to time out; \
                     use clarification.timeout_ms"
                        .to_owned(),
                );
            }
            layers.push((format!("leases.kinds.{}", kind.as_str()), *timeouts));
        }
        for (target, timeouts) in &self.targets {
            if !crate::is_valid_token(target) {
                problems.push(format!(
                    "leases.targets.{target}: not a target name (letters, digits, `_` and `-`)"
                ));
            }
            layers.push((format!("leases.targets.{target}"), *timeouts));
        }
        for (prefix, t) in layers {
            for (name, value) in [
                ("heartbeat_timeout_ms", t.heartbeat_timeout_ms),
                ("start_to_close_ms", t.start_to_close_ms),
                ("schedule_to_start_ms", t.schedule_to_start_ms),
            ] {
                if value == Some(0) {
                    problems.push(format!(
                        "{prefix}.{name} must be at least 1 (or absent: no timeout)"
                    ));
                }
            }
        }
    }
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            require_claim: false,
            heartbeat_timeout_ms: Some(30_000),
            start_to_close_ms: None,
            schedule_to_start_ms: None,
            kinds: BTreeMap::new(),
            targets: BTreeMap::new(),
        }
    }
}
