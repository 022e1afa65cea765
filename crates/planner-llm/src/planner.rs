//! Planning: the rule parser or an LLM behind one interface.
//!
//! An LLM plan goes through the same validation as any plan (`planner_core::validate_plan`).
//! An invalid answer is sent back once with the validation error; if the second answer is no
//! better, or the endpoint fails, the planner says so and the core's rule parser plans instead,
//! recorded as `rules_fallback` with the reason, which a UI can show. Either way the result
//! enters the core as command data: replay never calls the LLM.

use std::future::Future;

use planner_core::{
    validate_plan, Attachment, NodeKind, PlanSource, PlanSpec, Planning, Profile, TaskId, TaskSpec,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{ChatMessage, LlmClient};

/// What a planner knows when it plans a request.
#[derive(Debug, Clone, Default)]
pub struct PlanContext {
    /// The request.
    pub request: String,
    /// Its attachments.
    pub attachments: Vec<Attachment>,
    /// The session's context summary.
    pub summary: Option<String>,
    /// The configured system prompt.
    pub system_prompt: String,
    /// The compaction profile (a hint for what matters).
    pub profile: Profile,
    /// Ids the session already has: new tasks may depend on them, not reuse them.
    pub existing_ids: Vec<TaskId>,
    /// The largest plan accepted.
    pub max_tasks: usize,
}

/// A planner's answer: a plan to supply, or none (the rule parser runs), and how it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The plan, validated; `None` lets the core's rule parser plan.
    pub plan: Option<PlanSpec>,
    /// How: `llm`, `rules_fallback` or `rules`.
    pub planning: Option<Planning>,
}

/// Makes plans.
pub trait TaskPlanner: Send + Sync + 'static {
    /// Plans `context.request`.
    fn plan(&self, context: &PlanContext) -> impl Future<Output = Planned> + Send;
}

/// The rule parser: leaves planning to the core.
#[derive(Debug, Clone, Copy, Default)]
pub struct RulePlanner;

impl TaskPlanner for RulePlanner {
    async fn plan(&self, _context: &PlanContext) -> Planned {
        Planned {
            plan: None,
            planning: None,
        }
    }
}

/// Plans with an LLM; see the module docs.
#[derive(Debug)]
pub struct LlmPlanner {
    client: LlmClient,
}

/// The shape asked of the LLM.
#[derive(Debug, Deserialize)]
struct LlmPlan {
    tasks: Vec<LlmTask>,
}

#[derive(Debug, Deserialize)]
struct LlmTask {
    id: String,
    description: String,
    kind: NodeKind,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    dependencies: Vec<String>,
    #[serde(default)]
    attachments: Vec<String>,
    #[serde(default)]
    question: Option<String>,
}

/// The JSON Schema of the answer asked of the LLM.
pub fn plan_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["tasks"],
        "properties": {"tasks": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "additionalProperties": false,
            "required": ["id", "description", "kind", "target", "dependencies"],
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "kind": {"enum": ["clarification", "tool_call", "processing"]},
                "target": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "dependencies": {"type": "array", "items": {"type": "string"}},
                "attachments": {"type": "array", "items": {"type": "string"}},
                "question": {"type": "string"}
            }
        }}}
    })
}

impl LlmPlanner {
    /// A planner over `client`.
    pub fn new(client: LlmClient) -> Self {
        LlmPlanner { client }
    }

    /// The client.
    pub fn client(&self) -> &LlmClient {
        &self.client
    }

    /// The chat that asks for a plan.
    pub fn prompt(context: &PlanContext) -> Vec<ChatMessage> {
        let mut system = String::new();
        if !context.system_prompt.is_empty() {
            system.push_str(&context.system_prompt);
            system.push_str("\n\n");
        }
        system.push_str(
            "You plan work for an agent cluster. Break the user's request into tasks and answer \
             with JSON only: {\"tasks\": [{\"id\", \"description\", \"kind\", \"target\", \
             \"dependencies\", \"attachments\", \"question\"}]}. kind is \"tool_call\" (work for a \
             tool: target names the tool, e.g. web_search, http_fetch, shell, filesystem, email, \
             database), \"processing\" (an LLM or compute step: target names it, e.g. summarize, \
             analyze, generate) or \"clarification\" (a question for the user when a detail is \
             missing: target \"user\", question is the question). ids and targets use only \
             A-Z a-z 0-9 _ -. dependencies lists ids of tasks that must finish first; no cycles. \
             attachments lists the names of the request's attachments a task needs.",
        );
        system.push_str(match context.profile {
            Profile::General => "",
            Profile::Coding => {
                " The work is software engineering: keep paths, code and errors precise."
            }
            Profile::Analysis => {
                " The work is analysis: keep numbers, findings and decisions precise."
            }
        });
        if !context.existing_ids.is_empty() {
            let ids: Vec<&str> = context.existing_ids.iter().map(TaskId::as_str).collect();
            system.push_str(&format!(
                "\nThe session already has tasks {}: do not reuse these ids; depend on them if needed.",
                ids.join(", ")
            ));
        }
        if let Some(summary) = &context.summary {
            system.push_str("\nThe conversation so far:\n");
            system.push_str(summary);
        }
        let mut user = context.request.clone();
        if !context.attachments.is_empty() {
            let names: Vec<String> = context
                .attachments
                .iter()
                .map(|a| format!("{} ({})", a.name, a.uri))
                .collect();
            user.push_str(&format!("\n\nAttachments: {}", names.join(", ")));
        }
        vec![
            ChatMessage::new("system", system),
            ChatMessage::new("user", user),
        ]
    }

    /// Turns an answer into a validated plan, or says what is wrong with it.
    pub fn parse(answer: &str, context: &PlanContext) -> Result<PlanSpec, String> {
        let json = extract_json(answer).ok_or("the answer holds no JSON object")?;
        let plan: LlmPlan =
            serde_json::from_str(json).map_err(|e| format!("the JSON is not a plan: {e}"))?;
        let mut tasks = Vec::with_capacity(plan.tasks.len());
        for task in plan.tasks {
            let mut attachments = Vec::new();
            for name in &task.attachments {
                let found = context.attachments.iter().find(|a| &a.name == name);
                let attachment = found
                    .ok_or_else(|| format!("task {} names unknown attachment {name:?}", task.id))?;
                attachments.push(attachment.clone());
            }
            let target = task.target.unwrap_or_else(|| {
                if task.kind == NodeKind::Clarification {
                    "user".into()
                } else {
                    "llm".into()
                }
            });
            tasks.push(TaskSpec {
                timeouts: None,
                id: TaskId(task.id),
                question: task.question.or_else(|| {
                    (task.kind == NodeKind::Clarification).then(|| task.description.clone())
                }),
                description: task.description,
                kind: task.kind,
                target,
                dependencies: task.dependencies.into_iter().map(TaskId).collect(),
                attachments,
            });
        }
        let plan = PlanSpec { tasks };
        validate_plan(
            &plan,
            |id| context.existing_ids.contains(id),
            context.max_tasks,
        )
        .map_err(|e| e.to_string())?;
        Ok(plan)
    }
}

impl TaskPlanner for LlmPlanner {
    async fn plan(&self, context: &PlanContext) -> Planned {
        let schema = plan_schema();
        let mut messages = Self::prompt(context);
        let mut problem = String::new();
        for round in 0..2 {
            let answer = match self.client.chat(&messages, Some(&schema)).await {
                Ok(answer) => answer,
                Err(error) => {
                    problem = error.to_string();
                    break;
                }
            };
            match Self::parse(&answer, context) {
                Ok(plan) => {
                    return Planned {
                        plan: Some(plan),
                        planning: Some(Planning {
                            source: PlanSource::Llm,
                            note: Some(format!("model {}", self.client.config().model)),
                        }),
                    }
                }
                Err(error) => {
                    tracing::warn!(round, %error, "the LLM's plan is invalid");
                    problem = error.clone();
                    messages.push(ChatMessage::new("assistant", answer));
                    messages.push(ChatMessage::new(
                        "user",
                        format!("That plan is invalid: {error}. Answer with a corrected plan, JSON only."),
                    ));
                }
            }
        }
        metrics::counter!("planner_llm_fallbacks_total").increment(1);
        Planned {
            plan: None,
            planning: Some(Planning {
                source: PlanSource::RulesFallback,
                note: Some(format!("LLM plan not used: {problem}")),
            }),
        }
    }
}

/// The JSON object in an answer: the whole text, a fenced block, or the span from the first
/// `{` to the last `}`.
pub fn extract_json(answer: &str) -> Option<&str> {
    let trimmed = answer.trim();
    if trimmed.starts_with('{') && trimmed.ends_with('}') {
        return Some(trimmed);
    }
    let start = trimmed.find('{')?;
    let end = trimmed.rfind('}')?;
    (start < end).then(|| &trimmed[start..=end])
}
