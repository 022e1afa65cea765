//! Plans as data: the shape a parser or an LLM hands the planner, and its validation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::types::{is_valid_token, Attachment, NodeKind, TaskId, MAX_TOKEN_LEN};

/// The longest task description accepted, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 10_000;
/// The most dependencies one task may have.
pub const MAX_DEPENDENCIES: usize = 10_000;

/// A plan: tasks with their dependencies, before the planner accepts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// The tasks, in the order ties are broken when several are ready.
    pub tasks: Vec<TaskSpec>,
}

/// One task of a [`PlanSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique in the session; a valid subject token (see [`is_valid_token`]).
    pub id: TaskId,
    /// What to do.
    pub description: String,
    /// Who carries it out.
    pub kind: NodeKind,
    /// The tool or step serving it; `user` for clarifications. A valid subject token.
    pub target: String,
    /// Tasks, in this plan or earlier ones of the session, that must complete first.
    #[serde(default)]
    pub dependencies: Vec<TaskId>,
    /// Files or URLs the task needs.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// For clarifications, the question to ask; the description when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    /// Limits for this task's attempts that replace the session's `leases` ones (a task known
    /// to run for hours, or one that must answer in seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TaskTimeouts>,
}

/// A task's own attempt timeouts; each one set replaces the session's (`PlannerConfig::leases`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskTimeouts {
    /// A claimed attempt with no heartbeat for this long is timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// A claimed attempt running longer than this is timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_to_close_ms: Option<u64>,
    /// With claims required, an attempt nobody claims within this long is timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_to_start_ms: Option<u64>,
}

/// Why a plan was refused. The first problem found is reported.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A task's own timeout is 0 (leave it out for the session's).
    #[error("task {task_id} has a timeout of 0 ms")]
    ZeroTimeout {
        /// The task.
        task_id: TaskId,
    },
    /// The plan has no task.
    #[error("the plan has no task")]
    Empty,
    /// More tasks than `max_plan_tasks`.
    #[error("the plan has {count} tasks, more than the limit of {limit}")]
    TooManyTasks {
        /// Tasks in the plan.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An id is not a valid subject token.
    #[error("task id {id:?} is invalid: use 1 to {MAX_TOKEN_LEN} characters from A-Z a-z 0-9 _ -")]
    InvalidId {
        /// The id.
        id: String,
    },
    /// A target is not a valid subject token.
    #[error("task {task_id} has invalid target {target:?}: use 1 to {MAX_TOKEN_LEN} characters from A-Z a-z 0-9 _ -")]
    InvalidTarget {
        /// The task.
        task_id: TaskId,
        /// The target.
        target: String,
    },
    /// Two tasks share an id, or a task reuses an id of the session.
    #[error("task id {task_id} is used twice")]
    DuplicateId {
        /// The id.
        task_id: TaskId,
    },
    /// A dependency names no task of the plan or the session.
    #[error("task {task_id} depends on unknown task {dependency}")]
    UnknownDependency {
        /// The task.
        task_id: TaskId,
        /// The unknown dependency.
        dependency: TaskId,
    },
    /// A task depends on itself, directly or through others.
    #[error("the plan has a dependency cycle through task {task_id}")]
    Cycle {
        /// A task on the cycle.
        task_id: TaskId,
    },
    /// A description is empty or too long.
    #[error("task {task_id} has a description of {chars} characters; allowed: 1 to {MAX_DESCRIPTION_CHARS}")]
    BadDescription {
        /// The task.
        task_id: TaskId,
        /// Its length.
        chars: usize,
    },
    /// A task lists too many dependencies.
    #[error("task {task_id} has {count} dependencies, more than {MAX_DEPENDENCIES}")]
    TooManyDependencies {
        /// The task.
        task_id: TaskId,
        /// How many.
        count: usize,
    },
}

/// Checks `plan` against the ids the session already has (`existing`).
///
/// Dependencies may name earlier tasks of the session; the new tasks must not reuse their ids.
/// On error nothing is applied.
pub fn validate_plan(
    plan: &PlanSpec,
    existing: impl Fn(&TaskId) -> bool,
    max_tasks: usize,
) -> Result<(), PlanError> {
    if plan.tasks.is_empty() {
        return Err(PlanError::Empty);
    }
    if plan.tasks.len() > max_tasks {
        return Err(PlanError::TooManyTasks {
            count: plan.tasks.len(),
            limit: max_tasks,
        });
    }
    let mut position: BTreeMap<&TaskId, usize> = BTreeMap::new();
    for (i, task) in plan.tasks.iter().enumerate() {
        if !is_valid_token(task.id.as_str()) {
            return Err(PlanError::InvalidId {
                id: task.id.0.clone(),
            });
        }
        if let Some(t) = task.timeouts {
            if [
                t.heartbeat_timeout_ms,
                t.start_to_close_ms,
                t.schedule_to_start_ms,
            ]
            .contains(&Some(0))
            {
                return Err(PlanError::ZeroTimeout {
                    task_id: task.id.clone(),
                });
            }
        }
        if !is_valid_token(&task.target) {
            return Err(PlanError::InvalidTarget {
                task_id: task.id.clone(),
                target: task.target.clone(),
            });
        }
        let chars = task.description.chars().count();
        if chars == 0 || chars > MAX_DESCRIPTION_CHARS {
            return Err(PlanError::BadDescription {
                task_id: task.id.clone(),
                chars,
            });
        }
        if task.dependencies.len() > MAX_DEPENDENCIES {
            return Err(PlanError::TooManyDependencies {
                task_id: task.id.clone(),
                count: task.dependencies.len(),
            });
        }
        if existing(&task.id) || position.insert(&task.id, i).is_some() {
            return Err(PlanError::DuplicateId {
                task_id: task.id.clone(),
            });
        }
    }
    for task in &plan.tasks {
        for dep in &task.dependencies {
            if dep == &task.id {
                return Err(PlanError::Cycle {
                    task_id: task.id.clone(),
                });
            }
            if !position.contains_key(dep) && !existing(dep) {
                return Err(PlanError::UnknownDependency {
                    task_id: task.id.clone(),
                    dependency: dep.clone(),
                });
            }
        }
    }
    // Kahn's algorithm over the new tasks only: existing tasks cannot depend on new ones, so no
    // cycle can pass through them.
    let n = plan.tasks.len();
    let mut indegree = Vec::with_capacity(n);
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, task) in plan.tasks.iter().enumerate() {
        let deps: BTreeSet<usize> = task
            .dependencies
            .iter()
            .filter_map(|d| position.get(d).copied())
            .collect();
        indegree.push(deps.len());
        for d in deps {
            if let Some(list) = dependents.get_mut(d) {
                list.push(i);
            }
        }
    }
    let mut queue: Vec<usize> = (0..n).filter(|&i| indegree.get(i) == Some(&0)).collect();
    let mut seen = 0;
    while let Some(i) = queue.pop() {
        seen += 1;
        for &j in dependents.get(i).map_or(&[][..], Vec::as_slice) {
            let Some(count) = indegree.get_mut(j) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                queue.push(j);
            }
        }
    }
    // Kahn's algorithm leaves a task with unmet dependencies exactly when there is a cycle.
    let on_cycle = indegree
        .iter()
        .position(|&d| d > 0)
        .and_then(|i| plan.tasks.get(i));
    match on_cycle {
        Some(task) if seen < n => Err(PlanError::Cycle {
            task_id: task.id.clone(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, deps: &[&str]) -> TaskSpec {
        TaskSpec {
            timeouts: None,
            id: id.into(),
            description: format!("do {id}"),
            kind: NodeKind::Processing,
            target: "llm".into(),
            dependencies: deps.iter().map(|d| TaskId::from(*d)).collect(),
            attachments: vec![],
            question: None,
        }
    }

    fn check(tasks: Vec<TaskSpec>) -> Result<(), PlanError> {
        validate_plan(&PlanSpec { tasks }, |id| id.as_str() == "old", 100)
    }

    #[test]
    fn valid_plans_pass() {
        assert_eq!(
            check(vec![spec("a", &[]), spec("b", &["a", "old"])]),
            Ok(())
        );
    }

    #[test]
    fn each_problem_is_named() {
        assert_eq!(check(vec![]), Err(PlanError::Empty));
        assert!(matches!(
            check(vec![spec("a b", &[])]),
            Err(PlanError::InvalidId { .. })
        ));
        assert!(matches!(
            check(vec![spec("a", &[]), spec("a", &[])]),
            Err(PlanError::DuplicateId { .. })
        ));
        assert!(matches!(
            check(vec![spec("old", &[])]),
            Err(PlanError::DuplicateId { .. })
        ));
        assert!(matches!(
            check(vec![spec("a", &["zz"])]),
            Err(PlanError::UnknownDependency { .. })
        ));
        assert!(matches!(
            check(vec![spec("a", &["a"])]),
            Err(PlanError::Cycle { .. })
        ));
        assert!(matches!(
            check(vec![
                spec("a", &["c"]),
                spec("b", &["a"]),
                spec("c", &["b"])
            ]),
            Err(PlanError::Cycle { .. })
        ));
        let mut bad_target = spec("a", &[]);
        bad_target.target = "x.y".into();
        assert!(matches!(
            check(vec![bad_target]),
            Err(PlanError::InvalidTarget { .. })
        ));
        let mut empty = spec("a", &[]);
        empty.description.clear();
        assert!(matches!(
            check(vec![empty]),
            Err(PlanError::BadDescription { .. })
        ));
        let many: Vec<TaskSpec> = (0..101).map(|i| spec(&format!("t{i}"), &[])).collect();
        assert!(matches!(
            check(many),
            Err(PlanError::TooManyTasks {
                count: 101,
                limit: 100
            })
        ));
    }
}
