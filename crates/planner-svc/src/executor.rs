//! A simulated executor pool on NATS: what `planner-svc executor` runs, the demo executor of
//! docker-compose, and the load generator's executors.
//!
//! It does what docs/protocol.md asks of any executor: a durable pull consumer on the dispatch
//! stream filtered to the subjects it serves; a claim before running (ack on `granted`, term on
//! `stop`, nak on no answer); heartbeats while the work runs, stopping when one says `stop`; a
//! report with the lease, sent directly to the planner (a request answered once the report is
//! applied) and, when that gets no `ok` or `refused`, through JetStream (retried until
//! acknowledged); and no second run of a (session, task, attempt) it has already run (a
//! redelivery gets the same report again; the pool remembers at least its latest 50,000). A
//! cancellation stops a running attempt at once by its message on `{p}.cancel.<session>.<task>`
//! (one wildcard subscription per pool), and within a heartbeat if that message is lost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use planner_core::{DispatchContext, FenceReason};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::protocol::{
    CancelMessage, ClaimRequest, HeartbeatRequest, LeaseReply, NextRequest, NextTask, OfferReply,
    ReportMessage, ReportReply, Subjects, TaskMessage,
};
use crate::recent::Recent;
use crate::sim::{SimBehaviour, SimExecutor};

/// How long the dispatch stream waits for the pool's ack before delivering a message again.
/// The pool acks right after its claim, so this only bounds how long a delivery lost in flight
/// (with a cluster node that died, say) stays lost: async-nats' default, 30 s, stalled the
/// last tasks of a three-node cluster run with a node killed for about 30 s.
const DELIVERY_ACK_WAIT: Duration = Duration::from_secs(10);
/// How often a stream message waiting for a free slot says it is still wanted: well inside
/// [`DELIVERY_ACK_WAIT`].
const WAITING_PROGRESS: Duration = Duration::from_secs(3);

/// What a pool has run: (session, task, attempt) and the final report it sent, for at least
/// the latest [`REMEMBERED`] attempts (a repeat older than that is run again, which
/// at-least-once executors tolerate; the planner refuses a claim for an attempt it has
/// settled).
type RunAttempts = Recent<(String, String, u32), ReportMessage>;

/// How many of its latest attempts, and sessions' contexts, a pool remembers at least.
const REMEMBERED: usize = 50_000;

/// The attempts running in a pool, each with the token that stops it.
type Running = Arc<Mutex<HashMap<(String, String, u32), CancellationToken>>>;

/// The latest context this pool was handed per session, by reference: a claim names it, so
/// the planner sends a large context once per change, not once per task.
type Contexts = Arc<Mutex<Recent<String, (String, DispatchContext)>>>;

/// Settings of a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The dispatch stream.
    pub stream: String,
    /// The durable consumer (one per pool).
    pub consumer: String,
    /// The subjects served, e.g. `planner.task.>` or `planner.task.tool_call.web_search`.
    pub filter: String,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Whether to report `started` before the outcome.
    pub report_started: bool,
    /// How the simulated work behaves.
    pub behaviour: SimBehaviour,
    /// How reports reach the planner.
    pub reports: ReportPath,
    /// Whether to take offers (`{p}.offer.…`, answered by the claim) besides the stream.
    pub offers: bool,
    /// Whether each direct report asks for the session's next task (`next`), which the
    /// planner then hands over in its reply, claimed: one write and no offer or claim per
    /// task of a chain.
    pub take_next: bool,
}

/// How a pool sends its reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReportPath {
    /// A request on `{p}.result.<session>`, answered once the report is applied (no write to
    /// the report stream); published to the stream instead when the planner does not answer in
    /// time, has no responders, or answers `retry`. A `refused` report is dropped (logged).
    #[default]
    Direct,
    /// Published to the report stream (`{p}.report.<session>`) only, retried until
    /// acknowledged: the path of executors written before the direct one.
    Stream,
}

/// Called for every dispatch taken and every report acknowledged, for measurements.
pub trait PoolObserver: Send + Sync + 'static {
    /// A dispatch arrived.
    fn dispatched(&self, _task: &TaskMessage, _at: Instant) {}
    /// A final report was answered `ok` (or `refused`) by the planner, or acknowledged by
    /// JetStream.
    fn reported(&self, _task: &TaskMessage, _at: Instant) {}
    /// A final report is about to be sent. A report sent directly is answered once the
    /// planner persisted it, and the session's next dispatch may arrive before that answer:
    /// a latency from result to next dispatch starts here, not at [`PoolObserver::reported`].
    fn reporting(&self, _task: &TaskMessage, _at: Instant) {}
    /// The planner stopped a running attempt (cancelled, superseded, ...): no report.
    fn stopped(&self, _task: &TaskMessage, _reason: FenceReason) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl PoolObserver for NoObserver {}

/// Runs the pool until `shutdown`.
pub async fn run_pool(
    client: async_nats::Client,
    subjects: Subjects,
    options: PoolOptions,
    observer: Arc<dyn PoolObserver>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(&options.stream).await.with_context(|| {
        format!(
            "binding to the dispatch stream {}: it is created by the daemon, so start \
             `planner-svc serve` against this NATS server first",
            options.stream
        )
    })?;
    // A consumer of this name serving other subjects is another pool's: updating it would
    // move that pool onto this one's subjects.
    if let Ok(existing) = stream.consumer_info(&options.consumer).await {
        let serves = &existing.config.filter_subject;
        if !serves.is_empty() && *serves != options.filter {
            anyhow::bail!(
                "the consumer {} exists for the subjects {serves}, not {}: another pool's; give \
                 this one its own --consumer (or the same --filter)",
                options.consumer,
                options.filter
            );
        }
    }
    // Created or updated: a consumer an older pool made keeps no older ack wait (async-nats'
    // 30 s default, before [`DELIVERY_ACK_WAIT`]). Every member of one pool runs with the same
    // options: the last to start sets the consumer's `max_ack_pending`.
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(options.consumer.clone()),
            filter_subject: options.filter.clone(),
            max_ack_pending: i64::try_from(options.concurrency * 2).unwrap_or(i64::MAX),
            ack_wait: DELIVERY_ACK_WAIT,
            ..Default::default()
        })
        .await
        .context("creating the executor consumer")?;
    let mut messages = crate::bus::pull_messages(&consumer, 200)
        .await
        .context("pulling dispatches")?;
    // Offers of the same subjects, in one queue group per consumer: a dispatch offered is
    // taken by one member of the one pool that serves its subject, as a stream message is.
    let mut offers = match subjects.offers_for(&options.filter) {
        Some(offer_subjects) if options.offers => Some(
            client
                .queue_subscribe(offer_subjects, options.consumer.clone())
                .await
                .context("subscribing to offers")?,
        ),
        _ => None,
    };
    let running: Running = Arc::default();
    let cancels = client
        .subscribe(subjects.cancel("*", &planner_core::TaskId::from("*")))
        .await
        .context("subscribing to cancellations")?;
    tokio::spawn(stop_cancelled(cancels, Arc::clone(&running)));
    let slots = Arc::new(Semaphore::new(options.concurrency));
    let backlog = Arc::new(Semaphore::new(options.concurrency));
    let pool = Arc::new(Shared {
        client: client.clone(),
        js,
        subjects,
        observer,
        done: Arc::new(Mutex::new(Recent::new(REMEMBERED))),
        running,
        contexts: Arc::new(Mutex::new(Recent::new(REMEMBERED))),
        direct: DirectReports::new(options.reports),
        addressing: Pause::default(),
        report_started: options.report_started,
        take_next: options.take_next && options.reports == ReportPath::Direct,
        filter: options.filter.clone(),
        shutdown: shutdown.clone(),
        // Claim ids are derived from this pool's id and the attempt: a redelivered dispatch
        // the pool claimed before (the grant lost to a timeout, a cluster node dying under the
        // append) is claimed again with the same id and granted again. With a new id per
        // delivery it was refused as another's, its message terminated, and the attempt waited
        // out the heartbeat timeout (30 s) before a retry: seen in a three-node cluster run
        // with a node killed.
        pool_id: uuid::Uuid::new_v4(),
    });
    let mut seed = 0u64;
    // Stream messages delivered and waiting for a slot, oldest first: the consumer's
    // max_ack_pending bounds how many. Each says it is still wanted every WAITING_PROGRESS,
    // so the ack wait never delivers a waiting message again. Meanwhile offers are still
    // taken: a loop that only awaited the slot left them unread until their timeout sent them
    // to the stream. An offer takes a slot free now, or waits for one in its own task while
    // fewer than `concurrency` offers wait (answered once claimed: the planner's offer timeout
    // bounds the wait); past that it is declined, and the planner sends it to the stream at
    // once. Declining whenever every slot was busy sent a fifth of the dispatches of a
    // saturated load generator run to the stream after all.
    let mut waiting: VecDeque<(Delivery, TaskMessage, Option<async_nats::HeaderMap>)> =
        VecDeque::new();
    let mut progress = tokio::time::interval(WAITING_PROGRESS);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            permit = Arc::clone(&slots).acquire_owned(), if !waiting.is_empty() => {
                let Ok(permit) = permit else { return Ok(()) };
                let Some((delivery, task, headers)) = waiting.pop_front() else { continue };
                seed += 1;
                start(&pool, &slots, delivery, task, headers, Slot::Held(permit), seed, options.behaviour);
            }
            _ = progress.tick(), if !waiting.is_empty() => {
                for (delivery, ..) in &waiting {
                    delivery.in_progress().await;
                }
            }
            m = messages.next() => match m {
                Some(Ok(m)) => {
                    let (payload, headers) = (m.payload.clone(), m.headers.clone());
                    let delivery = Delivery::Stream(Box::new(m));
                    let Some(task) = readable(&delivery, &payload).await else {
                        continue;
                    };
                    if waiting.is_empty() {
                        // The first progress a full period after the wait begins, not at once.
                        progress.reset();
                    }
                    waiting.push_back((delivery, task, headers));
                }
                Some(Err(error)) => tracing::warn!(%error, "dispatch stream error"),
                None => return Ok(()),
            },
            Some(m) = next_offer(&mut offers) => {
                let offer = Delivery::Offer { client: client.clone(), reply: m.reply };
                let Some(task) = readable(&offer, &m.payload).await else {
                    continue;
                };
                if let Some(slot) = offer_slot(&offer, &slots, &backlog).await {
                    seed += 1;
                    start(&pool, &slots, offer, task, m.headers, slot, seed, options.behaviour);
                }
            }
        }
    }
}

/// The dispatch a delivery carries; one that is not a task message is refused (and `None`).
async fn readable(delivery: &Delivery, payload: &[u8]) -> Option<TaskMessage> {
    match serde_json::from_slice(payload) {
        Ok(task) => Some(task),
        Err(error) => {
            tracing::warn!(%error, "not a task message; refusing it");
            delivery.refuse().await;
            None
        }
    }
}

/// An offer's slot: one free now, else a place among the offers waiting for one; with
/// neither, the offer is declined (and `None`).
async fn offer_slot(
    offer: &Delivery,
    slots: &Arc<Semaphore>,
    backlog: &Arc<Semaphore>,
) -> Option<Slot> {
    match Arc::clone(slots).try_acquire_owned() {
        Ok(permit) => Some(Slot::Held(permit)),
        Err(_) => match Arc::clone(backlog).try_acquire_owned() {
            Ok(waiting) => Some(Slot::Awaited(waiting)),
            Err(_) => {
                offer.decline().await;
                None
            }
        },
    }
}

/// Runs a delivery's attempt in a task of its own, once it holds a slot.
#[allow(clippy::too_many_arguments)]
fn start(
    pool: &Arc<Shared>,
    slots: &Arc<Semaphore>,
    delivery: Delivery,
    task: TaskMessage,
    headers: Option<async_nats::HeaderMap>,
    slot: Slot,
    seed: u64,
    behaviour: SimBehaviour,
) {
    pool.observer.dispatched(&task, Instant::now());
    let executor = SimExecutor::new(behaviour, seed);
    // The claim, the heartbeats and the report carry the dispatch's trace context on when
    // the trace is sampled (recorded somewhere): one request, one trace, one tree of
    // spans. For an unsampled one the header would only cost the bus: the planner handles
    // a message of the attempt that carries none in the trace it dispatched it in.
    let trace = headers
        .as_ref()
        .and_then(|h| h.get(crate::trace::HEADER))
        .map(|v| v.as_str().to_owned())
        .filter(|value| crate::trace::sampled(value));
    let owner = owner_of(headers.as_ref());
    let (pool, slots) = (Arc::clone(pool), Arc::clone(slots));
    tokio::spawn(async move {
        let permit = match slot {
            Slot::Held(permit) => permit,
            Slot::Awaited(waiting) => {
                let Ok(permit) = slots.acquire_owned().await else {
                    return;
                };
                drop(waiting);
                permit
            }
        };
        pool.run(delivery, task, executor, trace, owner).await;
        drop(permit);
    });
}

/// A delivery's place among the pool's running attempts.
enum Slot {
    /// One of the `concurrency` slots.
    Held(tokio::sync::OwnedSemaphorePermit),
    /// A place among the offers waiting for a slot.
    Awaited(tokio::sync::OwnedSemaphorePermit),
}

/// The next offer, or never when the pool takes none.
async fn next_offer(offers: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match offers {
        Some(offers) => offers.next().await,
        None => std::future::pending().await,
    }
}

/// What a pool's attempts share.
struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    observer: Arc<dyn PoolObserver>,
    done: Arc<Mutex<RunAttempts>>,
    running: Running,
    contexts: Contexts,
    direct: DirectReports,
    addressing: Pause,
    report_started: bool,
    take_next: bool,
    /// The dispatch subjects served: what a report's `next` asks for.
    filter: String,
    /// Once cancelled, reports stop asking for the next task: a stopping pool would not run it.
    shutdown: CancellationToken,
    pool_id: uuid::Uuid,
}

/// How a dispatch reached the pool, and so how to answer it.
enum Delivery {
    /// A message of the dispatch stream: acked, nak'ed or terminated.
    Stream(Box<jetstream::Message>),
    /// An offer: answered with an [`OfferReply`] when the pool does not claim it (none when it
    /// has no reply subject); a claim answers it otherwise.
    Offer {
        client: async_nats::Client,
        reply: Option<async_nats::Subject>,
    },
}

impl Delivery {
    /// The claim was granted: nothing more to deliver. The planner answered an offer itself
    /// when it answered the claim.
    async fn claimed(&self) {
        if let Delivery::Stream(message) = self {
            let _ = message.ack().await;
        }
    }

    /// The planner refused the claim for good: never deliver it again (an offer, answered by
    /// the planner with the claim).
    async fn refused(&self) {
        if let Delivery::Stream(message) = self {
            let _ = message.ack_with(AckKind::Term).await;
        }
    }

    /// The attempt runs, or ran, in this pool, which does not claim it again: nothing more to
    /// deliver.
    async fn taken(&self) {
        match self {
            Delivery::Stream(message) => {
                let _ = message.ack().await;
            }
            Delivery::Offer { .. } => self.answer(OfferReply::Taken).await,
        }
    }

    /// Still wanted: the server's ack wait starts again (a stream message; nothing for an
    /// offer, which its planner's offer timeout bounds).
    async fn in_progress(&self) {
        if let Delivery::Stream(message) = self {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }

    /// Not a dispatch at all.
    async fn refuse(&self) {
        match self {
            Delivery::Stream(message) => {
                let _ = message.ack_with(AckKind::Term).await;
            }
            Delivery::Offer { .. } => self.answer(OfferReply::Declined).await,
        }
    }

    /// Not taken now: deliver it again after `delay` (to anyone, for an offer: the stream).
    async fn again(&self, delay: Duration) {
        match self {
            Delivery::Stream(message) => {
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Delivery::Offer { .. } => self.answer(OfferReply::Declined).await,
        }
    }

    async fn decline(&self) {
        self.again(Duration::from_secs(1)).await;
    }

    async fn answer(&self, reply: OfferReply) {
        if let Delivery::Offer {
            client,
            reply: Some(subject),
        } = self
        {
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            if let Err(error) = client.publish(subject.clone(), body.into()).await {
                tracing::warn!(%error, "could not answer an offer; the planner sends it to the stream after its timeout");
            }
        }
    }
}

impl Shared {
    /// Claims, runs and reports one delivered attempt.
    async fn run(
        &self,
        delivery: Delivery,
        mut task: TaskMessage,
        mut executor: SimExecutor,
        trace: Option<String>,
        owner: Option<String>,
    ) {
        let trace = trace.as_deref();
        let route = Route {
            client: &self.client,
            subjects: &self.subjects,
            owner: owner.as_deref(),
            addressing: &self.addressing,
        };
        let key = (
            task.session.clone(),
            task.assignment.task_id.0.clone(),
            task.assignment.attempt,
        );
        // A redelivery of an attempt this pool already ran: the same report again.
        let known = self.done.lock().ok().and_then(|d| d.get(&key).cloned());
        if let Some(report) = known {
            delivery.taken().await;
            send_report(route, &self.js, &task.session, &report, trace, &self.direct).await;
            return;
        }
        // A delivery of an attempt this pool is claiming or running (the first delivery's
        // ack was lost, or came after its ack wait): the first one runs it. The planner
        // grants this pool's claim again (one claim id per attempt), so without this the
        // attempt would run twice. A stream message comes back later, when `done` answers it;
        // an offer is answered taken: this pool holds the attempt.
        let cancelled = CancellationToken::new();
        let Some(_running) = RunningEntry::enter(&self.running, &key, &cancelled) else {
            match delivery {
                Delivery::Stream(_) => delivery.again(Duration::from_secs(5)).await,
                Delivery::Offer { .. } => delivery.taken().await,
            }
            return;
        };
        // Claim before running: the fence that makes a second delivery harmless. The
        // message is acked (the offer answered) only once the claim is answered, so an
        // executor that dies before it leaves the dispatch to be delivered to another.
        let held = hold_context(&self.contexts, &mut task);
        let claim_id = claim_id(&self.pool_id, &key);
        // An offer's claim is asked again like a stream message's: a planner that granted it
        // but whose reply was lost has settled the offer with that claim, so declining would
        // reach nobody and the attempt would wait out its heartbeat timeout. Asked again with
        // the same claim id, it is granted again. (Were the planner gone, its offer times out
        // and the dispatch reaches the stream; that copy's claim is fenced.)
        let lease = match claim(route, &task, &claim_id, held, trace, CLAIM_TRIES).await {
            Ok(LeaseReply::Granted {
                lease,
                heartbeat_interval_ms,
                context,
            }) => {
                delivery.claimed().await;
                if let Some(context) = context {
                    remember_context(&self.contexts, &task.session, &context);
                    task.assignment.context = Some(context);
                }
                (lease, heartbeat_interval_ms)
            }
            Ok(LeaseReply::Stop { reason, .. }) => {
                tracing::info!(session = %task.session, task = %task.assignment.task_id, reason = reason.as_str(), "attempt not ours to run; discarded");
                delivery.refused().await;
                return;
            }
            Ok(other) => {
                tracing::warn!(?other, "claim not answered; the dispatch will come again");
                delivery.again(Duration::from_secs(1)).await;
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "claim failed; the dispatch will come again");
                delivery.again(Duration::from_secs(1)).await;
                return;
            }
        };
        drop(delivery);
        let (lease, interval) = lease;
        let mut attempt = Claimed {
            task,
            lease,
            interval,
            cancelled,
            _running,
            trace: trace.map(str::to_owned),
        };
        // Each report asks for the session's next task (when the pool takes them), which the
        // planner hands over in its reply: run it in this slot, with no offer and no claim.
        loop {
            // The next task continues the trace (the same session's work) and gets the context
            // this pool named in the request when the reply leaves it out.
            let trace = attempt.trace.clone();
            let Some((next, held)) = self.run_claimed(route, attempt, &mut executor).await else {
                return;
            };
            let Some(mut claimed) = self.take_over(*next, held) else {
                return;
            };
            claimed.trace = trace;
            attempt = claimed;
        }
    }

    /// Runs an attempt this pool holds the lease of, reports it, and returns the task the
    /// planner handed over in the report's reply, if any, with the context the request named.
    async fn run_claimed(
        &self,
        route: Route<'_>,
        attempt: Claimed,
        executor: &mut SimExecutor,
    ) -> Option<(Box<NextTask>, Option<(String, DispatchContext)>)> {
        let Claimed {
            task,
            lease,
            interval,
            cancelled,
            _running,
            trace,
        } = attempt;
        let trace = trace.as_deref();
        if self.report_started {
            let started = ReportMessage {
                event: SimExecutor::started(&task),
                lease: Some(lease.clone()),
                next: None,
            };
            send_report(
                route,
                &self.js,
                &task.session,
                &started,
                trace,
                &self.direct,
            )
            .await;
        }
        let latency = executor.latency();
        let stopped = tokio::select! {
            stopped = work_with_heartbeats(route, &task, &lease, interval, latency, trace) => stopped,
            () = cancelled.cancelled() => Some(FenceReason::Cancelled),
        };
        if let Some(reason) = stopped {
            tracing::info!(session = %task.session, task = %task.assignment.task_id, reason = reason.as_str(), "attempt stopped by the planner; no report");
            self.observer.stopped(&task, reason);
            return None;
        }
        let mut report = ReportMessage {
            event: executor.outcome(&task),
            lease: Some(lease),
            next: None,
        };
        let key = (
            task.session.clone(),
            task.assignment.task_id.0.clone(),
            task.assignment.attempt,
        );
        let retired = self
            .done
            .lock()
            .ok()
            .and_then(|mut done| done.insert(key, report.clone()));
        retire(retired);
        // The context named is kept here: another task of the session may replace the pool's
        // copy before the reply comes.
        let mut held = None;
        // Only a direct report can be answered with a task: one bound for the stream (direct
        // reports off or paused) does not ask, as the planner would take its `next` for a reply
        // that never came.
        if self.take_next && self.direct.on() && !self.shutdown.is_cancelled() {
            held = self
                .contexts
                .lock()
                .ok()
                .and_then(|c| c.get(&task.session).cloned());
            report.next = Some(NextRequest {
                serves: vec![self.filter.clone()],
                claim_id: uuid::Uuid::new_v4().simple().to_string(),
                context_ref: held.as_ref().map(|(reference, _)| reference.clone()),
            });
        }
        self.observer.reporting(&task, Instant::now());
        let next = send_report(route, &self.js, &task.session, &report, trace, &self.direct).await;
        let status = match &report.event.outcome {
            planner_core::ExecutorOutcome::Completed { .. } => "completed",
            planner_core::ExecutorOutcome::Failed { .. } => "failed",
            planner_core::ExecutorOutcome::NeedsClarification { .. } => "asked a question",
            planner_core::ExecutorOutcome::Started => "started",
        };
        tracing::info!(session = %task.session, task = %task.assignment.task_id, attempt = task.assignment.attempt, target = %task.assignment.target, status, "ran a task");
        self.observer.reported(&task, Instant::now());
        next.map(|next| (next, held))
    }

    /// A task handed over with a report's reply, as an attempt this pool holds; `None` when
    /// the pool runs that attempt already (its lease then lapses into a retry).
    fn take_over(
        &self,
        next: NextTask,
        held: Option<(String, DispatchContext)>,
    ) -> Option<Claimed> {
        let NextTask {
            mut task,
            lease,
            heartbeat_interval_ms,
            context,
        } = next;
        self.observer.dispatched(&task, Instant::now());
        match context {
            Some(context) => {
                remember_context(&self.contexts, &task.session, &context);
                task.assignment.context = Some(context);
            }
            None => match held {
                Some((reference, context))
                    if task.assignment.context.is_none()
                        && reference == task.assignment.context_ref =>
                {
                    task.assignment.context = Some(context);
                }
                _ => {
                    hold_context(&self.contexts, &mut task);
                }
            },
        }
        let key = (
            task.session.clone(),
            task.assignment.task_id.0.clone(),
            task.assignment.attempt,
        );
        let cancelled = CancellationToken::new();
        let Some(running) = RunningEntry::enter(&self.running, &key, &cancelled) else {
            tracing::warn!(session = %task.session, task = %task.assignment.task_id, "a task handed over is running here already; not run twice");
            return None;
        };
        Some(Claimed {
            task,
            lease,
            interval: heartbeat_interval_ms,
            cancelled,
            _running: running,
            trace: None,
        })
    }
}

/// An attempt this pool holds the lease of.
struct Claimed {
    task: TaskMessage,
    lease: String,
    interval: Option<u64>,
    /// Cancelled by the attempt's cancel message.
    cancelled: CancellationToken,
    _running: RunningEntry,
    /// The dispatch's trace context, sent on with the heartbeats and the report.
    trace: Option<String>,
}

/// An attempt's place in [`Running`], from its claim until its report is sent (or it is
/// given up): removed when dropped.
struct RunningEntry {
    running: Running,
    key: (String, String, u32),
}

impl RunningEntry {
    /// Enters `key` with its cancellation token; `None` when it is there already.
    fn enter(
        running: &Running,
        key: &(String, String, u32),
        cancelled: &CancellationToken,
    ) -> Option<RunningEntry> {
        let mut map = running.lock().ok()?;
        if map.contains_key(key) {
            return None;
        }
        map.insert(key.clone(), cancelled.clone());
        Some(RunningEntry {
            running: Arc::clone(running),
            key: key.clone(),
        })
    }
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.key);
        }
    }
}

/// Stops the running attempts that cancel messages name (the fast path; heartbeats are the
/// sure one).
async fn stop_cancelled(mut cancels: async_nats::Subscriber, running: Running) {
    while let Some(message) = cancels.next().await {
        let Ok(cancel) = serde_json::from_slice::<CancelMessage>(&message.payload) else {
            tracing::warn!(subject = %message.subject, "not a cancel message; ignored");
            continue;
        };
        let key = (cancel.session, cancel.task_id.0, cancel.attempt);
        if let Some(token) = running.lock().ok().and_then(|r| r.get(&key).cloned()) {
            token.cancel();
        }
    }
}

/// The reference of the context the pool holds for `task`: the dispatch's own (remembered for
/// the session's next tasks), or the one remembered from an earlier task when the dispatch
/// left it out and the reference matches (then filled into `task`).
fn hold_context(contexts: &Contexts, task: &mut TaskMessage) -> Option<String> {
    let a = &mut task.assignment;
    if let Some(context) = &a.context {
        remember_context(contexts, &task.session, context);
        return Some(a.context_ref.clone()).filter(|r| !r.is_empty());
    }
    let held = contexts
        .lock()
        .ok()
        .and_then(|c| c.get(&task.session).cloned())
        .filter(|(reference, _)| *reference == a.context_ref)?;
    a.context = Some(held.1);
    Some(held.0)
}

fn remember_context(contexts: &Contexts, session: &str, context: &DispatchContext) {
    // Bounded like `done`: a session's context forgotten is sent again.
    let retired = contexts.lock().ok().and_then(|mut contexts| {
        contexts.insert(session.to_owned(), (context.reference(), context.clone()))
    });
    retire(retired);
}

/// Frees a generation a [`Recent`] retired (50,000 entries) on the blocking pool: on a
/// runtime worker it would hold up the attempts that worker serves.
fn retire<K: Send + 'static, V: Send + 'static>(retired: Option<HashMap<K, V>>) {
    if let Some(retired) = retired {
        tokio::task::spawn_blocking(move || drop(retired));
    }
}

/// This pool's claim id for the attempt `key` (session, task, attempt): the same for every
/// delivery of it to this pool, unguessable by any other.
fn claim_id(pool_id: &uuid::Uuid, key: &(String, String, u32)) -> String {
    let (session, task, attempt) = key;
    let name = format!("{session}\0{task}\0{attempt}");
    uuid::Uuid::new_v5(pool_id, name.as_bytes())
        .simple()
        .to_string()
}

/// Headers carrying `trace` (a dispatch's `traceparent`), if any.
fn trace_headers(trace: Option<&str>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(trace) = trace {
        headers.insert(crate::trace::HEADER, trace);
    }
    headers
}

/// Asks the planner for the attempt, naming the context the pool holds for it.
async fn claim(
    route: Route<'_>,
    task: &TaskMessage,
    claim_id: &str,
    context_ref: Option<String>,
    trace: Option<&str>,
    max_tries: u64,
) -> anyhow::Result<LeaseReply> {
    // One id for this claim, sent again on a retry and on a redelivery: a claim whose reply
    // was lost is then granted again instead of refused as someone else's.
    let body = serde_json::to_vec(&ClaimRequest {
        task_id: task.assignment.task_id.clone(),
        attempt: task.assignment.attempt,
        claim_id: Some(claim_id.to_owned()),
        context_ref,
    })?;
    let mut tries = 0;
    loop {
        tries += 1;
        let subject = route.subjects.claim(&task.session);
        let reply = ask(route, subject, &trace_headers(trace), body.clone().into())
            .await
            .context("no claim reply in time")
            .and_then(|reply| reply.context("claim request failed"));
        match reply {
            Ok(reply) => {
                let answer: LeaseReply = serde_json::from_slice(&reply.payload)?;
                // Refused for now (the planner at its request limit, its store failing, a
                // lost race): asked again like an unanswered claim, not given up. After a
                // grant whose reply was lost, giving up would decline an offer the grant
                // settled, and the attempt would wait out its heartbeat timeout.
                let retryable = matches!(&answer, LeaseReply::Error(body) if body.kind.may_pass());
                if !retryable || tries >= max_tries {
                    return Ok(answer);
                }
                tracing::debug!(tries, ?answer, "claim refused for now; asking again");
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
            Err(error) if tries >= max_tries => return Err(error),
            Err(error) => {
                tracing::debug!(%error, tries, "claim not answered; asking again");
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
        }
    }
}

/// Works for `latency`, heartbeating every `interval`; returns why the planner stopped the
/// attempt, if it did.
async fn work_with_heartbeats(
    route: Route<'_>,
    task: &TaskMessage,
    lease: &str,
    interval: Option<u64>,
    latency: Duration,
    trace: Option<&str>,
) -> Option<FenceReason> {
    // Work that takes no time takes none here: tokio's timer has a 1 ms tick, and a zero
    // sleep waits for the next one (it was a third of a one-session chain's time per task).
    if latency.is_zero() {
        return None;
    }
    let work = tokio::time::sleep(latency);
    tokio::pin!(work);
    let Some(interval) = interval.map(Duration::from_millis) else {
        work.await;
        return None;
    };
    let body = serde_json::to_vec(&HeartbeatRequest {
        task_id: task.assignment.task_id.clone(),
        attempt: task.assignment.attempt,
        lease: lease.to_owned(),
    })
    .unwrap_or_default();
    let mut beats = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            () = &mut work => return None,
            _ = beats.tick() => {
                let subject = route.subjects.heartbeat(&task.session);
                let reply = ask(route, subject, &trace_headers(trace), body.clone().into()).await;
                match reply.ok().and_then(Result::ok).and_then(|r| serde_json::from_slice::<LeaseReply>(&r.payload).ok()) {
                    Some(LeaseReply::Stop { reason, .. }) => return Some(reason),
                    Some(_) => {}
                    // A missed beat is not fatal: the timeout allows about three.
                    None => tracing::warn!(task = %task.assignment.task_id, "heartbeat not answered"),
                }
            }
        }
    }
}

/// How long a claim, heartbeat or direct report waits for the planner.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Claim requests per dispatch (with one claim id) before the dispatch is left to come again.
const CLAIM_TRIES: u64 = 3;

/// A way of sending that is switched off for a while after a request sent that way went
/// unanswered for [`REQUEST_TIMEOUT`].
#[derive(Default)]
struct Pause {
    off_until: Mutex<Option<Instant>>,
}

impl Pause {
    fn on(&self) -> bool {
        self.off_until
            .lock()
            .map_or(true, |until| until.is_none_or(|t| Instant::now() >= t))
    }

    fn pause(&self, how_long: Duration) {
        if let Ok(mut until) = self.off_until.lock() {
            *until = Some(Instant::now() + how_long);
        }
    }
}

/// Whether a pool sends its reports directly now.
struct DirectReports {
    path: ReportPath,
    /// Paused when a direct report went unanswered for [`REQUEST_TIMEOUT`]: reports then go
    /// to the stream without asking. A planner that cannot answer in time is overloaded or
    /// unreachable (or a server's permissions drop the request: an executor user without
    /// `{p}.result.*`), and waiting that long for each report would stall every one of them.
    paused: Pause,
    /// How long the next pause lasts: [`DIRECT_PAUSE_FIRST`], doubled by each pause up to
    /// [`DIRECT_PAUSE_MAX`], and back to the first once a direct report is answered. One lost
    /// reply (a NATS node killed under an append) costs a second of direct reports, not 30;
    /// a path that stays dead (permissions) is soon left alone for the longest pause.
    next_pause: Mutex<Duration>,
}

impl DirectReports {
    fn new(path: ReportPath) -> Self {
        DirectReports {
            path,
            paused: Pause::default(),
            next_pause: Mutex::new(DIRECT_PAUSE_FIRST),
        }
    }

    fn on(&self) -> bool {
        self.path == ReportPath::Direct && self.paused.on()
    }

    /// A direct report went unanswered: pauses the path, for longer than last time unless
    /// a report was answered since. Reports sent before the pause that time out during it
    /// are the same trouble, and add nothing. Returns the pause, if this started one.
    fn timed_out(&self) -> Option<Duration> {
        // Checked under the lock: two reports timing out together on two threads are one
        // pause, not two.
        let Ok(mut next) = self.next_pause.lock() else {
            self.paused.pause(DIRECT_PAUSE_MAX);
            return Some(DIRECT_PAUSE_MAX);
        };
        if !self.paused.on() {
            return None;
        }
        let pause = *next;
        *next = (pause * 2).min(DIRECT_PAUSE_MAX);
        self.paused.pause(pause);
        Some(pause)
    }

    /// A direct report was answered: the next pause, if any, is the first again.
    fn answered(&self) {
        if let Ok(mut next) = self.next_pause.lock() {
            *next = DIRECT_PAUSE_FIRST;
        }
    }
}

/// Where an attempt's claim, heartbeats and direct report go: to the instance that owns the
/// session, `{p}.fwd.<owner>.<subject>`, when the dispatch named it (its `Planner-Owner`
/// header) and the pool addresses owners now; else to the planner's subject, which any
/// instance serves and forwards to the owner. Addressing the owner saves that hop (half or
/// more of the requests with two or three instances). When nobody listens there (the owner
/// died), the request goes to the planner's subject at once; when the owner does not answer in
/// time, to the planner's subject too, and the pool stops addressing owners for a while: an
/// executor user whose permissions lack `{p}.fwd.*.…` sees every such request dropped.
#[derive(Clone, Copy)]
struct Route<'a> {
    client: &'a async_nats::Client,
    subjects: &'a Subjects,
    owner: Option<&'a str>,
    addressing: &'a Pause,
}

/// How long a pool sends to the planner's subjects only after a request to an owner went
/// unanswered in time.
const ADDRESSING_PAUSE: Duration = Duration::from_secs(60);

/// The header of a dispatch naming the instance that owns its session.
const OWNER_HEADER: &str = crate::protocol::OWNER_HEADER;

/// The owner a dispatch names, if it names a valid one.
fn owner_of(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers
        .and_then(|h| h.get(OWNER_HEADER))
        .map(|v| v.as_str())
        .filter(|owner| planner_core::is_valid_token(owner))
        .map(str::to_owned)
}

/// Sends a request on `subject` (`{p}.<claim|heartbeat|result>.<session>`) along `route`,
/// waiting up to [`REQUEST_TIMEOUT`] for each place asked.
async fn ask(
    route: Route<'_>,
    subject: String,
    headers: &async_nats::HeaderMap,
    body: Bytes,
) -> Result<Result<async_nats::Message, async_nats::RequestError>, tokio::time::error::Elapsed> {
    let client = route.client;
    let send = |subject: String| {
        let (headers, body) = (headers.clone(), body.clone());
        tokio::time::timeout(REQUEST_TIMEOUT, async move {
            if headers.is_empty() {
                client.request(subject, body).await
            } else {
                client.request_with_headers(subject, headers, body).await
            }
        })
    };
    if let Some(owner) = route.owner.filter(|_| route.addressing.on()) {
        let addressed = route.subjects.forward(owner, &subject);
        let answered = send(addressed).await;
        match &answered {
            Ok(Ok(_)) => return answered,
            // Nobody listens there: the owner is gone; whoever serves the subject answers.
            Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::NoResponders => {}
            Ok(Err(error)) if error.kind() != async_nats::RequestErrorKind::TimedOut => {
                return answered
            }
            _ => {
                route.addressing.pause(ADDRESSING_PAUSE);
                tracing::warn!(owner, pause = ?ADDRESSING_PAUSE, "the session's owner did not answer in time; asking on the planner's subjects for a while (may executors publish to {{p}}.fwd.*?)");
            }
        }
    }
    send(subject).await
}

/// How long reports go to the stream only after a direct report was not answered in time.
/// The first pause of direct reports after one went unanswered ([`DirectReports`]).
const DIRECT_PAUSE_FIRST: Duration = Duration::from_secs(1);
/// The longest, reached after about a minute of direct reports unanswered.
const DIRECT_PAUSE_MAX: Duration = Duration::from_secs(30);

/// Sends a report: directly when the pool does and the planner answered in time lately, with
/// the stream as the fallback; else to the stream.
async fn send_report(
    route: Route<'_>,
    js: &jetstream::Context,
    session: &str,
    report: &ReportMessage,
    trace: Option<&str>,
    path: &DirectReports,
) -> Option<Box<NextTask>> {
    let body = Bytes::from(serde_json::to_vec(report).unwrap_or_default());
    let headers = trace_headers(trace);
    if path.on() {
        let (task, attempt) = (&report.event.task_id, report.event.attempt);
        match direct(route, session, &headers, body.clone()).await {
            Direct::Done(next) => {
                path.answered();
                return next;
            }
            Direct::Refused(error) => {
                // The stream would refuse it the same way: nothing more to do with it.
                tracing::warn!(session, task = %task, attempt, kind = %error.kind, error = %error.message, "report refused by the planner; dropped");
                return None;
            }
            Direct::TimedOut => match path.timed_out() {
                Some(pause) => {
                    tracing::warn!(session, task = %task, attempt, ?pause, "report not answered in time; publishing it and the next reports to the report stream");
                }
                None => {
                    tracing::warn!(session, task = %task, attempt, "report not answered in time; publishing it to the report stream");
                }
            },
            Direct::Fallback(why) => {
                tracing::debug!(session, task = %task, attempt, why, "report not taken directly; publishing it to the report stream");
            }
        }
    }
    publish(js, route.subjects, session, headers, body).await;
    None
}

/// What became of a report sent directly.
enum Direct {
    /// Applied (its events persisted), or recognised as changing nothing; with the task
    /// handed over, if the report asked for one and got it.
    Done(Option<Box<NextTask>>),
    /// Refused for good.
    Refused(crate::protocol::ErrorBody),
    /// No reply within [`REQUEST_TIMEOUT`]: publish it to the stream (if it was applied after
    /// all, the stream's copy is ignored as a duplicate).
    TimedOut,
    /// Not taken (no responders, `retry`, an unreadable reply): publish it to the stream.
    Fallback(String),
}

/// Sends a report as a request on `{p}.result.<session>`, once: the stream is the retry.
async fn direct(
    route: Route<'_>,
    session: &str,
    headers: &async_nats::HeaderMap,
    body: Bytes,
) -> Direct {
    let subject = route.subjects.result(session);
    match ask(route, subject, headers, body).await {
        Err(_) => Direct::TimedOut,
        Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::TimedOut => {
            Direct::TimedOut
        }
        Ok(Err(error)) => Direct::Fallback(error.to_string()),
        Ok(Ok(reply)) => match serde_json::from_slice::<ReportReply>(&reply.payload) {
            Ok(ReportReply::Ok { next }) => Direct::Done(next),
            Ok(ReportReply::Refused(error)) => Direct::Refused(error),
            Ok(ReportReply::Retry(error)) => {
                Direct::Fallback(format!("{}: {}", error.kind, error.message))
            }
            Err(error) => Direct::Fallback(format!("unreadable reply: {error}")),
        },
    }
}

/// Publishes a report through JetStream, retrying until it is acknowledged.
async fn publish(
    js: &jetstream::Context,
    subjects: &Subjects,
    session: &str,
    headers: async_nats::HeaderMap,
    body: Bytes,
) {
    let mut delay = Duration::from_millis(50);
    loop {
        let sent = js
            .publish_with_headers(subjects.report(session), headers.clone(), body.clone())
            .await;
        match sent {
            Ok(ack) => match ack.await {
                Ok(_) => return,
                Err(error) => tracing::warn!(%error, "report not acknowledged; retrying"),
            },
            Err(error) => tracing::warn!(%error, "report not sent; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_reports_pause_longer_each_time_until_one_is_answered() {
        let direct = DirectReports::new(ReportPath::Direct);
        let secs = Duration::from_secs;
        // A pause ended: as if its time had passed.
        let pause_ends = || direct.paused.pause(Duration::ZERO);
        assert!(direct.on());
        assert_eq!(direct.timed_out(), Some(secs(1)));
        assert!(!direct.on());
        // Reports sent before the pause that time out during it are the same trouble.
        assert_eq!(direct.timed_out(), None);
        let mut pauses = Vec::new();
        for _ in 0..6 {
            pause_ends();
            assert!(direct.on());
            pauses.extend(direct.timed_out());
        }
        assert_eq!(pauses, [2, 4, 8, 16, 30, 30].map(secs));
        // An answer: the next trouble is new, and paused for as short as the first.
        direct.answered();
        pause_ends();
        assert_eq!(direct.timed_out(), Some(secs(1)));
        // A pool that reports to the stream only never sends directly.
        assert!(!DirectReports::new(ReportPath::Stream).on());
    }

    #[test]
    fn a_dispatch_names_an_owner_only_with_a_valid_instance_name() {
        let named = |value: &str| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(OWNER_HEADER, value);
            owner_of(Some(&headers))
        };
        assert_eq!(named("Yd5u1oFH9x-z_2").as_deref(), Some("Yd5u1oFH9x-z_2"));
        // Anything that would change the subject it is put into is ignored.
        for bad in ["", "a.b", "*", ">", "a b", "é", &"x".repeat(200)] {
            assert_eq!(named(bad), None, "{bad:?}");
        }
        assert_eq!(owner_of(None), None);
        assert_eq!(owner_of(Some(&async_nats::HeaderMap::new())), None);
    }

    #[test]
    fn a_pool_claims_an_attempt_under_one_id_every_delivery_and_other_pools_under_others() {
        let key = |attempt| ("s-1".to_owned(), "t1".to_owned(), attempt);
        let (pool, other) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        assert_eq!(claim_id(&pool, &key(1)), claim_id(&pool, &key(1)));
        assert_ne!(claim_id(&pool, &key(1)), claim_id(&pool, &key(2)));
        assert_ne!(claim_id(&pool, &key(1)), claim_id(&other, &key(1)));
        let request = ClaimRequest {
            task_id: planner_core::TaskId::from("t1"),
            attempt: 1,
            claim_id: Some(claim_id(&pool, &key(1))),
            context_ref: None,
        };
        assert_eq!(request.claim_id_problem(), None);
    }
}
