//! Publishers: where outgoing messages go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use async_nats::StatusCode;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::sync::{mpsc, oneshot};
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

/// Offering dispatches (docs/protocol.md, "Offers"): a core message on
/// `{p}.offer.{kind}.{target}` whose reply subject is this publisher's own inbox, answered by
/// the executor's claim (handled here: [`Publisher::claim_answered`]) or by the executor. A
/// dispatch taken that way never touches the dispatch stream: one durable write and one hop
/// less per task. Anything but a claim, `taken` or `stopped` (no executor listens, none had a
/// free slot, no answer in time, an answer that does not parse, a daemon shutting down) sends
/// it to the stream as before; a second delivery is harmless, the claim fences it.
///
/// The inbox is ours, not async-nats' request multiplexer: an offer settled by its claim gets
/// no reply, and the multiplexer keeps a request's entry until its reply comes, so every
/// offer taken leaked one (about 1 MB a second at 10,000 tasks a second).
#[derive(Debug)]
struct Offers {
    /// How long an offer waits for its answer: longer than an executor's claim (5 s), so an
    /// executor that takes an offer and claims has its answer counted.
    timeout: Duration,
    /// Offer subjects nobody listened on lately, until when they are not offered to: without
    /// it every dispatch for executors that do not take offers would cost a round trip.
    unheard: Mutex<HashMap<String, Instant>>,
    /// Where answers come: `{inbox}.{token}`, one subscription for every offer.
    inbox: String,
    next_token: AtomicU64,
    waiting: Mutex<Waiting>,
    /// Set when the daemon stops: no new offers, and those waiting go to the stream at once
    /// (the claims that would answer them are no longer served).
    stopped: AtomicBool,
}

/// Offers waiting for their answer, by token (an answer's subject) and by dispatch id (a
/// claim's attempt).
#[derive(Debug, Default)]
struct Waiting {
    by_token: HashMap<u64, (String, oneshot::Sender<Answer>)>,
    by_dispatch: HashMap<String, u64>,
}

impl Waiting {
    fn insert(&mut self, token: u64, id: &str, answered: oneshot::Sender<Answer>) {
        // A dispatch offered again (the outbox does not offer, but a batch could name it
        // twice): the newer offer is the one a claim answers; the older one's sender goes,
        // and its dispatch to the stream (a copy the claim fences).
        if let Some(older) = self.by_dispatch.insert(id.to_owned(), token) {
            self.by_token.remove(&older);
        }
        self.by_token.insert(token, (id.to_owned(), answered));
    }

    fn take_token(&mut self, token: u64) -> Option<oneshot::Sender<Answer>> {
        let (id, answered) = self.by_token.remove(&token)?;
        if self.by_dispatch.get(&id) == Some(&token) {
            self.by_dispatch.remove(&id);
        }
        Some(answered)
    }

    fn take_dispatch(&mut self, id: &str) -> Option<oneshot::Sender<Answer>> {
        let token = self.by_dispatch.remove(id)?;
        self.by_token.remove(&token).map(|(_, answered)| answered)
    }

    fn len(&self) -> usize {
        self.by_token.len()
    }
}

/// How an offer was answered.
#[derive(Debug)]
enum Answer {
    /// Its attempt's claim was answered here.
    Claimed,
    /// A message came to its reply subject: an executor's answer, or the server's
    /// no-responders status.
    Replied(async_nats::Message),
    /// The daemon is stopping.
    Stopped,
}

/// An offer waiting for its answer; forgotten when dropped.
struct Pending {
    offers: Arc<Offers>,
    token: u64,
    /// The offer's reply subject.
    reply: String,
    answer: oneshot::Receiver<Answer>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.offers.waiting.lock() {
            waiting.take_token(self.token);
        }
    }
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

    /// Notes an offer of dispatch `id`: its reply subject, and what resolves when it is
    /// answered. Forgotten when dropped, however the offer's future ends (answered, timed out,
    /// an error later in its batch, the task aborted). After [`Offers::stop`] it is answered
    /// `Stopped` at once (checked under the lock `stop` takes, so none slips in after it).
    fn wait(self: &Arc<Self>, id: &str) -> Pending {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (answered, answer) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            if self.stopped.load(Ordering::Relaxed) {
                let _ = answered.send(Answer::Stopped);
            } else {
                waiting.insert(token, id, answered);
            }
        }
        Pending {
            offers: Arc::clone(self),
            token,
            reply: format!("{}.{token}", self.inbox),
            answer,
        }
    }

    fn answer_reply(&self, message: async_nats::Message) {
        let token = message
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .and_then(|token| token.parse::<u64>().ok());
        let answered = token.and_then(|token| {
            self.waiting
                .lock()
                .ok()
                .and_then(|mut waiting| waiting.take_token(token))
        });
        // None: an answer after the claim's, or after the timeout; nothing waits for it.
        if let Some(answered) = answered {
            let _ = answered.send(Answer::Replied(message));
        }
    }

    /// The claim of an attempt was answered: its offer, if one waits, is answered with it.
    /// Most claims are of offers; those of stream deliveries cost a lock and, while any offer
    /// waits, the dispatch id.
    fn answer_claim(&self, session: &str, task_id: &planner_core::TaskId, attempt: u32) {
        let answered = self.waiting.lock().ok().and_then(|mut waiting| {
            if waiting.len() == 0 {
                return None;
            }
            waiting.take_dispatch(&dispatch_id(session, task_id, attempt))
        });
        if let Some(answered) = answered {
            let _ = answered.send(Answer::Claimed);
        }
    }

    fn stop(&self) {
        let waiting = self.waiting.lock().map(|mut waiting| {
            self.stopped.store(true, Ordering::Relaxed);
            std::mem::take(&mut *waiting)
        });
        if let Ok(waiting) = waiting {
            for (_, answered) in waiting.by_token.into_values() {
                let _ = answered.send(Answer::Stopped);
            }
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
    /// Subscribes to the publisher's answer inbox, read until the connection closes.
    pub async fn offering(mut self, timeout: Duration) -> anyhow::Result<Self> {
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|error| anyhow::anyhow!("subscribing to the offers' answer inbox: {error}"))?;
        let offers = Arc::new(Offers {
            timeout,
            unheard: Mutex::default(),
            inbox,
            next_token: AtomicU64::new(0),
            waiting: Mutex::default(),
            stopped: AtomicBool::new(false),
        });
        let reader = Arc::clone(&offers);
        tokio::spawn(async move {
            while let Some(message) = answers.next().await {
                reader.answer_reply(message);
            }
            // The connection is closing: nothing will answer those still waiting.
            reader.stop();
        });
        self.offers = Some(offers);
        Ok(self)
    }

    /// Stops offering: offers still waiting for an answer go to the stream now, later
    /// dispatches straight there. For a daemon that stops serving claims.
    pub fn stop_offering(&self) {
        if let Some(offers) = &self.offers {
            offers.stop();
        }
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
                    let offering = self
                        .offers
                        .as_ref()
                        .filter(|o| offer && !o.stopped.load(Ordering::Relaxed))
                        .and_then(|offers| {
                            let subject = self.subjects.offer(a.kind, &a.target);
                            offers.heard(&subject).then_some((offers, subject))
                        });
                    if let Some((offers, offer_subject)) = offering {
                        // Sent now, in order with the batch's other messages; only its
                        // answer is awaited in the confirmation. (Sent when the confirmation
                        // was first polled, every offer waited for the driver's spawned task
                        // to be scheduled: one more hop on each task's critical path.)
                        let mut pending = offers.wait(&id);
                        // The timeout runs from the send, not from the confirmation's first poll.
                        let deadline = tokio::time::Instant::now() + offers.timeout;
                        let sent = self
                            .client
                            .publish_with_reply_and_headers(
                                offer_subject.clone(),
                                pending.reply.clone(),
                                headers.clone(),
                                payload.clone(),
                            )
                            .instrument(span.clone())
                            .await;
                        let jetstream = self.jetstream.clone();
                        let offers = Arc::clone(offers);
                        let offered = async move {
                            let answer = match sent {
                                Ok(()) => tokio::time::timeout_at(deadline, &mut pending.answer)
                                    .await
                                    .ok()
                                    .and_then(Result::ok),
                                Err(error) => {
                                    tracing::debug!(%error, subject = %offer_subject, "offer not sent; the dispatch goes to the stream");
                                    None
                                }
                            };
                            match answer {
                                Some(Answer::Claimed) => {
                                    crate::metrics::offered("claimed");
                                    return Ok(());
                                }
                                Some(Answer::Replied(message))
                                    if message.status == Some(StatusCode::NO_RESPONDERS) =>
                                {
                                    offers.not_heard(&offer_subject);
                                    crate::metrics::offered("unheard");
                                }
                                Some(Answer::Replied(message)) => {
                                    match serde_json::from_slice::<OfferReply>(&message.payload) {
                                        Ok(OfferReply::Taken) => {
                                            crate::metrics::offered("taken");
                                            return Ok(());
                                        }
                                        Ok(OfferReply::Stopped) => {
                                            crate::metrics::offered("stopped");
                                            return Ok(());
                                        }
                                        Ok(OfferReply::Declined) => {
                                            crate::metrics::offered("declined")
                                        }
                                        Err(error) => {
                                            tracing::warn!(%error, subject = %offer_subject, "an offer's answer is not an offer reply; the dispatch goes to the stream");
                                            crate::metrics::offered("unanswered");
                                        }
                                    }
                                }
                                Some(Answer::Stopped) => crate::metrics::offered("shutdown"),
                                None => {
                                    tracing::debug!(subject = %offer_subject, "offer not answered; the dispatch goes to the stream");
                                    crate::metrics::offered("unanswered");
                                }
                            }
                            stream(&jetstream, subject, headers, payload, id)
                                .await?
                                .await?;
                            Ok(())
                        };
                        confirmations.push(Box::pin(offered.instrument(span)));
                    } else {
                        let sent = stream(&self.jetstream, subject, headers, payload, id)
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
        // Together, not one after another: an offer resolves only once an executor claimed
        // it (awaited in turn, a batch's second offer's answer waited for the first task's
        // claim, its third for the second's, ...).
        // Every one to its end (an offer's entry in `waiting` goes with it), then the first
        // failure, if any.
        Ok(Box::pin(async move {
            let results = futures::future::join_all(confirmations).await;
            results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
            Ok(())
        }))
    }
}

/// Publishes a dispatch to the stream; what it returns resolves with JetStream's ack.
async fn stream(
    jetstream: &jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Bytes,
    id: String,
) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    let publish = PublishMessage::build()
        .payload(payload)
        .headers(headers)
        .message_id(id);
    Ok(jetstream.send_publish(subject, publish).await?)
}

fn json<T: serde::Serialize>(value: &T) -> Bytes {
    // These message types serialize infallibly (string keys, no floats).
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

impl Publisher for NatsPublisher {
    fn claim_answered(&self, session: &str, task_id: &planner_core::TaskId, attempt: u32) {
        if let Some(offers) = &self.offers {
            offers.answer_claim(session, task_id, attempt);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_answered_either_way_leaves_nothing_waiting() {
        let mut waiting = Waiting::default();
        let (claimed, _a) = oneshot::channel();
        let (replied, _b) = oneshot::channel();
        waiting.insert(1, "s.a.1", claimed);
        waiting.insert(2, "s.b.1", replied);
        assert!(waiting.take_dispatch("s.a.1").is_some());
        assert!(waiting.take_token(2).is_some());
        assert_eq!(waiting.len(), 0);
        assert!(waiting.by_dispatch.is_empty());
        // An answer after the claim's finds nothing.
        assert!(waiting.take_token(1).is_none());
    }

    fn offers() -> Arc<Offers> {
        Arc::new(Offers {
            timeout: Duration::from_secs(6),
            unheard: Mutex::default(),
            inbox: "_INBOX.test".into(),
            next_token: AtomicU64::new(0),
            waiting: Mutex::default(),
            stopped: AtomicBool::new(false),
        })
    }

    fn waiting(offers: &Offers) -> usize {
        offers.waiting.lock().unwrap().len()
    }

    #[test]
    fn an_offer_dropped_unanswered_is_forgotten() {
        let offers = offers();
        let pending = offers.wait("s.a.1");
        assert_eq!(waiting(&offers), 1);
        // An error later in its batch, an aborted task: the future holding it is dropped.
        drop(pending);
        assert_eq!(waiting(&offers), 0);
        assert!(offers.waiting.lock().unwrap().by_dispatch.is_empty());
    }

    #[test]
    fn an_offer_after_the_stop_is_answered_stopped_at_once() {
        let offers = offers();
        let before = offers.wait("s.a.1");
        offers.stop();
        let mut after = offers.wait("s.b.1");
        assert_eq!(waiting(&offers), 0);
        assert!(matches!(after.answer.try_recv(), Ok(Answer::Stopped)));
        let mut before = before;
        assert!(matches!(before.answer.try_recv(), Ok(Answer::Stopped)));
    }

    #[test]
    fn a_claim_answers_its_offer() {
        let offers = offers();
        let mut pending = offers.wait(&dispatch_id("s", &planner_core::TaskId::from("a"), 1));
        offers.answer_claim("s", &planner_core::TaskId::from("a"), 1);
        assert!(matches!(pending.answer.try_recv(), Ok(Answer::Claimed)));
        assert_eq!(waiting(&offers), 0);
    }

    #[test]
    fn a_dispatch_offered_again_is_answered_by_its_newer_offer() {
        let mut waiting = Waiting::default();
        let (older, _a) = oneshot::channel();
        let (newer, _b) = oneshot::channel();
        waiting.insert(1, "s.a.1", older);
        waiting.insert(2, "s.a.1", newer);
        assert_eq!(waiting.len(), 1);
        assert!(waiting.take_token(1).is_none());
        assert!(waiting.take_dispatch("s.a.1").is_some());
        assert_eq!(waiting.len(), 0);
    }
}
