//! Publishers: where outgoing messages go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use async_nats::RequestErrorKind;
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::engine::{Confirmation, Outgoing, Publisher};
use crate::protocol::{dispatch_id, OfferReply, Subjects};

/// Publishes to NATS: dispatches through the JetStream work-queue stream (acknowledged, with
/// `Nats-Msg-Id` = session.task.attempt), first offered to an idle executor when offers are
/// on; questions and cancellations on core subjects.
#[derive(Debug, Clone)]
pub struct NatsPublisher {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    subjects: Subjects,
    /// This instance's name, put on every dispatch ([`crate::protocol::OWNER_HEADER`]) when
    /// sessions have owners: what it dispatches, it owns.
    owner: Option<String>,
    /// How dispatches are offered, when they are.
    offers: Option<Arc<Offers>>,
}

/// Offering dispatches (docs/protocol.md, "Offers"): a core request on
/// `{p}.offer.{kind}.{target}` answered by the executor that claimed the attempt. A dispatch
/// taken that way never touches the dispatch stream: one durable write and one hop less per
/// task. Anything but `taken` or `stopped` (no executor listens, none had a free slot, no
/// answer in time, an answer that does not parse) sends it to the stream as before; a second
/// delivery is harmless, the claim fences it.
#[derive(Debug)]
struct Offers {
    /// How long an offer waits for its answer: longer than an executor's claim (5 s), so an
    /// executor that takes an offer and claims has its answer counted.
    timeout: Duration,
    /// Offer subjects nobody listened on lately, until when they are not offered to: without
    /// it every dispatch for executors that do not take offers would cost a round trip.
    unheard: Mutex<HashMap<String, Instant>>,
    /// Offers waiting for their answer, by dispatch id: the claim, handled here, answers them
    /// ([`Publisher::claim_answered`]), so executors need not.
    waiting: Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>,
}

/// How long a subject nobody listened on is not offered to: short, because executors that
/// start after the planner find their first dispatches in the stream until it ends (with
/// 10 s, a load generator run with three instances sent two thirds of its dispatches there).
const UNHEARD_PAUSE: Duration = Duration::from_secs(2);

impl Offers {
    fn heard(&self, subject: &str) -> bool {
        self.unheard.lock().map_or(true, |unheard| {
            unheard
                .get(subject)
                .is_none_or(|until| Instant::now() >= *until)
        })
    }

    /// Notes an offer of `id` waiting for its claim; what resolves when the claim is answered.
    fn wait_for_claim(&self, id: &str) -> tokio::sync::oneshot::Receiver<()> {
        let (answered, answer) = tokio::sync::oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(id.to_owned(), answered);
        }
        answer
    }

    fn forget(&self, id: &str) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(id);
        }
    }

    fn not_heard(&self, subject: &str) {
        if let Ok(mut unheard) = self.unheard.lock() {
            let now = Instant::now();
            unheard.retain(|_, until| *until > now);
            unheard.insert(subject.to_owned(), now + UNHEARD_PAUSE);
        }
    }
}

impl NatsPublisher {
    /// A publisher on `client`.
    pub fn new(client: async_nats::Client, subjects: Subjects) -> Self {
        NatsPublisher {
            jetstream: jetstream::new(client.clone()),
            client,
            subjects,
            owner: None,
            offers: None,
        }
    }

    /// Names `owner` on every dispatch, for its executors to address it directly.
    pub fn owned_by(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Offers each dispatch to an idle executor first, waiting up to `timeout` for the answer.
    pub fn offering(mut self, timeout: Duration) -> Self {
        self.offers = Some(Arc::new(Offers {
            timeout,
            unheard: Mutex::default(),
            waiting: Mutex::default(),
        }));
        self
    }

    /// Sends `messages`; dispatches are offered first when `offer` (and offers are on).
    async fn send_with(&self, messages: &[Outgoing], offer: bool) -> anyhow::Result<Confirmation> {
        // Dispatches go out together and their acks are awaited together, by the caller.
        let mut confirmations: Vec<Confirmation> = Vec::new();
        for message in messages {
            match message {
                Outgoing::Task(task) => {
                    let a = &task.assignment;
                    let subject = self.subjects.task(a.kind, &a.target);
                    // One span per attempt sent: its context is the dispatch's `traceparent`,
                    // so the executor's work and report are its children.
                    let span = tracing::debug_span!(
                        "dispatch",
                        otel.kind = "producer",
                        session = %task.session,
                        task = %a.task_id,
                        attempt = a.attempt,
                        messaging.system = "nats",
                        messaging.destination.name = %subject,
                    );
                    let mut headers = async_nats::HeaderMap::new();
                    if let Some(trace) = crate::trace::outgoing_from(&span) {
                        headers.insert(crate::trace::HEADER, trace.as_str());
                    }
                    if let Some(owner) = &self.owner {
                        headers.insert(crate::protocol::OWNER_HEADER, owner.as_str());
                    }
                    let payload = json(task);
                    let id = dispatch_id(&task.session, &a.task_id, a.attempt);
                    let offers = self.offers.as_ref().filter(|_| offer);
                    let offer_subject = self.subjects.offer(a.kind, &a.target);
                    if let Some(offers) = offers.filter(|o| o.heard(&offer_subject)) {
                        let publisher = self.clone();
                        let offers = Arc::clone(offers);
                        let offered = async move {
                            let request = async_nats::Request::new()
                                .headers(headers.clone())
                                .payload(payload.clone())
                                .timeout(Some(offers.timeout));
                            let claimed = offers.wait_for_claim(&id);
                            let asked = publisher
                                .client
                                .send_request(offer_subject.clone(), request);
                            let answer = tokio::select! {
                                answer = asked => answer,
                                Ok(()) = claimed => {
                                    crate::metrics::offered("claimed");
                                    return Ok(());
                                }
                            };
                            offers.forget(&id);
                            match answer
                                .map(|reply| serde_json::from_slice::<OfferReply>(&reply.payload))
                            {
                                Ok(Ok(OfferReply::Taken)) => {
                                    crate::metrics::offered("taken");
                                    return Ok(());
                                }
                                Ok(Ok(OfferReply::Stopped)) => {
                                    crate::metrics::offered("stopped");
                                    return Ok(());
                                }
                                Ok(Ok(OfferReply::Declined)) => crate::metrics::offered("declined"),
                                Ok(Err(error)) => {
                                    tracing::warn!(%error, subject = %offer_subject, "an offer's answer is not an offer reply; the dispatch goes to the stream");
                                    crate::metrics::offered("unanswered");
                                }
                                Err(error) if error.kind() == RequestErrorKind::NoResponders => {
                                    offers.not_heard(&offer_subject);
                                    crate::metrics::offered("unheard");
                                }
                                Err(error) => {
                                    tracing::debug!(%error, subject = %offer_subject, "offer not answered; the dispatch goes to the stream");
                                    crate::metrics::offered("unanswered");
                                }
                            }
                            publisher
                                .stream(subject, headers, payload, id)
                                .await?
                                .await?;
                            Ok(())
                        };
                        confirmations.push(Box::pin(offered.instrument(span)));
                    } else {
                        let sent = self
                            .stream(subject, headers, payload, id)
                            .instrument(span)
                            .await?;
                        confirmations.push(Box::pin(async move {
                            sent.await?;
                            Ok(())
                        }));
                    }
                }
                Outgoing::Question(question) => {
                    let subject = self.subjects.question(&question.session);
                    let span = tracing::debug_span!(
                        "question",
                        otel.kind = "producer",
                        session = %question.session,
                        task = %question.task_id,
                        attempt = question.attempt,
                        messaging.system = "nats",
                        messaging.destination.name = %subject,
                    );
                    let mut headers = async_nats::HeaderMap::new();
                    if let Some(trace) = crate::trace::outgoing_from(&span) {
                        headers.insert(crate::trace::HEADER, trace.as_str());
                    }
                    self.client
                        .publish_with_headers(subject, headers, json(question))
                        .instrument(span)
                        .await?;
                }
                Outgoing::Cancel(cancel) => {
                    self.client
                        .publish(
                            self.subjects.cancel(&cancel.session, &cancel.task_id),
                            json(cancel),
                        )
                        .await?;
                }
                Outgoing::Notice(notice) => {
                    self.client
                        .publish(self.subjects.errors(), json(notice))
                        .await?;
                }
            }
        }
        // Together, not one after another: an offer is sent when its future is first polled,
        // and resolves only once an executor claimed it (a batch's second offer waited for
        // the first task's claim, its third for the second's, ...).
        // Every one to its end (an offer's entry in `waiting` goes with it), then the first
        // failure, if any.
        Ok(Box::pin(async move {
            let results = futures::future::join_all(confirmations).await;
            results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
            Ok(())
        }))
    }

    /// Publishes a dispatch to the stream; what it returns resolves with JetStream's ack.
    async fn stream(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Bytes,
        id: String,
    ) -> anyhow::Result<jetstream::context::PublishAckFuture> {
        let mut publish = PublishMessage::build().payload(payload).message_id(id);
        for (name, values) in headers.iter() {
            for value in values {
                publish = publish.header(name.clone(), value.clone());
            }
        }
        Ok(self.jetstream.send_publish(subject, publish).await?)
    }
}

fn json<T: serde::Serialize>(value: &T) -> Bytes {
    // These message types serialize infallibly (string keys, no floats).
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

impl Publisher for NatsPublisher {
    fn claim_answered(&self, session: &str, task_id: &planner_core::TaskId, attempt: u32) {
        if let Some(offers) = &self.offers {
            let taken =
                offers.waiting.lock().ok().and_then(|mut waiting| {
                    waiting.remove(&dispatch_id(session, task_id, attempt))
                });
            if let Some(answered) = taken {
                let _ = answered.send(());
            }
        }
    }

    /// What the outbox and recovery use (under the session's lock): straight to the stream.
    /// An offer waits for the executor's claim, which needs that lock.
    async fn publish(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        self.send_with(messages, false).await?.await
    }

    async fn send(&self, messages: &[Outgoing]) -> anyhow::Result<Confirmation> {
        self.send_with(messages, true).await
    }
}

/// Publishes into a channel: the embedded run's in-process bus.
#[derive(Debug, Clone)]
pub struct ChannelPublisher {
    sender: mpsc::UnboundedSender<Outgoing>,
}

impl ChannelPublisher {
    /// A publisher and the receiving end of its bus.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Outgoing>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (ChannelPublisher { sender }, receiver)
    }
}

impl Publisher for ChannelPublisher {
    async fn publish(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        for message in messages {
            self.sender
                .send(message.clone())
                .map_err(|_| anyhow::anyhow!("the in-process bus is closed"))?;
        }
        Ok(())
    }
}

/// How long one pull request waits at the server for messages.
const PULL_EXPIRES: std::time::Duration = std::time::Duration::from_secs(5);
/// The idle heartbeat that proves a pull request is still alive while no message comes.
const PULL_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// Messages of a pull consumer, `batch` per pull request.
///
/// When the server that leads a consumer dies (a node of a cluster), the pull requests
/// waiting there die with it, and the client only notices when their heartbeats stop or they
/// expire. async-nats' defaults (30 s expiry; a 15 s heartbeat, none at all with
/// `Consumer::stream`) stalled a three-node cluster run for about 30 s after a node kill; with
/// 5 s and 1 s a lost pull request is replaced within about 2 s (two missed heartbeats), for
/// one pull request per 5 s and one heartbeat per second of an idle consumer.
pub async fn pull_messages(
    consumer: &jetstream::consumer::PullConsumer,
    batch: usize,
) -> Result<jetstream::consumer::pull::Stream, jetstream::consumer::StreamError> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
}
