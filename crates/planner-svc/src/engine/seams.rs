//! The engine's seams: besides the store (`planner_store::EventStore`), every IO the engine
//! does goes through one of these traits, so a test can put a deterministic, fault-injecting
//! version in its place (`tests/it/sim.rs` does: a virtual clock, a lossy bus, a scripted LLM).

use std::fmt::Debug;
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use planner_core::{Message, Profile, Timestamp};
use planner_llm::{PlanContext, Planned, TaskPlanner};

use super::render::Outgoing;

/// What confirms a sent batch: resolves once the bus accepted every message of it (for
/// dispatches: JetStream acknowledged them), or with the first failure.
pub type Confirmation = BoxFuture<'static, anyhow::Result<()>>;

/// Where outgoing messages go: NATS in the daemon, channels in the embedded run.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `messages` in order; `Ok` once each is accepted by the bus (for dispatches:
    /// acknowledged by JetStream). Called under the session's lock (the outbox, recovery): it
    /// must not wait for anything that needs that lock, such as an executor's claim.
    fn publish(&self, messages: &[Outgoing]) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The claim of `attempt` of `task_id` was answered for good (granted, or refused): an
    /// offer of it waiting for its executor's answer is answered. By default, nothing.
    fn claim_answered(&self, _session: &str, _task_id: &planner_core::TaskId, _attempt: u32) {}

    /// Sends `messages` in order and returns what confirms them, without waiting for it: the
    /// driver sends under the session's lock (so a session's messages leave in order) and
    /// waits for the confirmation in a task of its own (it guards no order: a dispatch that is
    /// not acknowledged is re-published by the outbox sweep). A confirmation may wait for an
    /// executor's claim (an offered dispatch; the offer itself leaves here, in order, and the
    /// claim that answers it waits for the lock to be released). By default,
    /// [`Publisher::publish`] and an already resolved confirmation.
    fn send(
        &self,
        messages: &[Outgoing],
    ) -> impl Future<Output = anyhow::Result<Confirmation>> + Send {
        async move {
            self.publish(messages).await?;
            let confirmed: Confirmation = Box::pin(async { Ok(()) });
            Ok(confirmed)
        }
    }
}

/// The only source of the time the engine stamps on commands and uses for its timers and its
/// idle sessions.
pub trait Clock: Debug + Send + Sync + 'static {
    /// The current time, in milliseconds since the Unix epoch.
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Timestamp(ms)
    }
}

/// The LLM as the engine uses it: plans requests, rewrites context summaries. Neither call may
/// fail: each falls back to what the core does without an LLM.
pub trait Llm: Debug + Send + Sync + 'static {
    /// Plans `context.request`.
    fn plan<'a>(&'a self, context: &'a PlanContext) -> BoxFuture<'a, Planned>;

    /// A summary of `thread` in about `token_budget` tokens; `None` when summaries are off.
    fn summarize<'a>(
        &'a self,
        thread: &'a [Message],
        token_budget: u64,
        profile: Profile,
    ) -> BoxFuture<'a, Option<String>>;

    /// Revised plans allowed per session after a task fails for good (0: none).
    fn max_revisions(&self) -> u32;
}

impl Llm for planner_llm::LlmPlanner {
    fn plan<'a>(&'a self, context: &'a PlanContext) -> BoxFuture<'a, Planned> {
        Box::pin(TaskPlanner::plan(self, context))
    }

    fn summarize<'a>(
        &'a self,
        thread: &'a [Message],
        token_budget: u64,
        profile: Profile,
    ) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            if !self.client().config().summarize {
                return None;
            }
            Some(planner_llm::summarize(self.client(), thread, token_budget, profile).await)
        })
    }

    fn max_revisions(&self) -> u32 {
        self.client().config().max_revisions
    }
}
