//! Publishers: where outgoing messages go.

use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::engine::{Confirmation, Outgoing, Publisher};
use crate::protocol::{dispatch_id, Subjects};

/// Publishes to NATS: dispatches through the JetStream work-queue stream (acknowledged, with
/// `Nats-Msg-Id` = session.task.attempt), questions and cancellations on core subjects.
#[derive(Debug, Clone)]
pub struct NatsPublisher {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    subjects: Subjects,
    /// This instance's name, put on every dispatch ([`crate::protocol::OWNER_HEADER`]) when
    /// sessions have owners: what it dispatches, it owns.
    owner: Option<String>,
}

impl NatsPublisher {
    /// A publisher on `client`.
    pub fn new(client: async_nats::Client, subjects: Subjects) -> Self {
        NatsPublisher {
            jetstream: jetstream::new(client.clone()),
            client,
            subjects,
            owner: None,
        }
    }

    /// Names `owner` on every dispatch, for its executors to address it directly.
    pub fn owned_by(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }
}

fn json<T: serde::Serialize>(value: &T) -> Bytes {
    // These message types serialize infallibly (string keys, no floats).
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

impl Publisher for NatsPublisher {
    async fn publish(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        self.send(messages).await?.await
    }

    async fn send(&self, messages: &[Outgoing]) -> anyhow::Result<Confirmation> {
        // Dispatches go out together and their acks are awaited together, by the caller.
        let mut acks = Vec::new();
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
                    let mut publish = PublishMessage::build()
                        .payload(json(task))
                        .message_id(dispatch_id(&task.session, &a.task_id, a.attempt));
                    if let Some(trace) = crate::trace::outgoing_from(&span) {
                        publish = publish.header(crate::trace::HEADER, trace.as_str());
                    }
                    if let Some(owner) = &self.owner {
                        publish = publish.header(crate::protocol::OWNER_HEADER, owner.as_str());
                    }
                    let sent = self
                        .jetstream
                        .send_publish(subject, publish)
                        .instrument(span)
                        .await?;
                    acks.push(sent);
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
        Ok(Box::pin(async move {
            for ack in acks {
                ack.await?;
            }
            Ok(())
        }))
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
