//! The client commands of the CLI, for a daemon on NATS: `submit`, `watch`, `answer` and
//! `cancel`. They speak the public protocol only (`docs/protocol.md`): commands are requests on
//! `{p}.cmd.<session>`, and a session is followed by reading its event log,
//! `{p}.events.<session>`, with an ordered consumer.

use std::collections::VecDeque;
use std::io::{BufRead as _, Write};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, stream::LastRawMessageErrorKind};
use futures::StreamExt as _;
use planner_core::{codec, Event, PlanPhase, Planner, PlannerCmd, TaskId};
use tokio::sync::mpsc;

use crate::config::{redact_urls, Config};
use crate::embedded::print_events;
use crate::inspect::print_summary;
use crate::protocol::{ClientCommand, CommandReply, Subjects};

/// A connection to the daemon's NATS.
#[derive(Debug)]
pub struct Client {
    nats: async_nats::Client,
    subjects: Subjects,
    events_stream: String,
    url: String,
    timeout: Duration,
}

/// How `watch` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// Ask open questions on the terminal and send the answers; otherwise only print them
    /// (with the command that answers them).
    pub ask: bool,
}

impl Client {
    /// Connects with the daemon's NATS settings (`nats.*`).
    pub async fn connect(config: &Config) -> anyhow::Result<Client> {
        let nats = crate::serve::connect(config).await?;
        Ok(Client {
            nats,
            subjects: Subjects::new(&config.subjects.prefix),
            events_stream: config.store.stream_name.clone(),
            url: redact_urls(&config.nats.url),
            timeout: config.request_timeout(),
        })
    }

    /// Sends `command` to `session`; the version and the events it caused, or why it was
    /// refused.
    pub async fn command(
        &self,
        session: &str,
        command: &ClientCommand,
    ) -> anyhow::Result<(u64, Vec<Event>)> {
        let body = serde_json::to_vec(command)?;
        let request = self
            .nats
            .request(self.subjects.command(session), body.into());
        let reply = match tokio::time::timeout(self.timeout, request).await {
            Err(_) => anyhow::bail!(
                "no reply from the planner within {:?} (is `planner-svc serve` running on {}?)",
                self.timeout,
                self.url
            ),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                anyhow::bail!(
                    "no planner is serving on {}: start `planner-svc serve` first",
                    self.url
                )
            }
            Ok(reply) => reply.context("sending the command")?,
        };
        match serde_json::from_slice::<CommandReply>(&reply.payload)
            .context("the planner's reply is not a command reply")?
        {
            CommandReply::Ok { version, events } => Ok((version, events)),
            CommandReply::Error(error) => {
                anyhow::bail!("refused ({}): {}", error.kind.as_str(), error.message)
            }
        }
    }

    /// Prints `session`'s tasks as they go, from its first event to the end of its plan, and
    /// returns how the plan ended. With `options.ask`, open questions are asked on the
    /// terminal and the answers sent.
    pub async fn watch(
        &self,
        session: &str,
        out: &mut (dyn Write + Send),
        options: WatchOptions,
    ) -> anyhow::Result<PlanPhase> {
        let js = jetstream::new(self.nats.clone());
        let subject = self.subjects.events(session);
        let stream = js.get_stream(&self.events_stream).await.with_context(|| {
            format!(
                "opening the event stream {} on {} (has `planner-svc serve` run there?)",
                self.events_stream, self.url
            )
        })?;
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(_) => {}
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => anyhow::bail!(
                "no session {session} on {} (`planner-svc sessions` lists them)",
                self.url
            ),
            Err(e) => return Err(e).context("reading the event stream"),
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject,
                ..Default::default()
            })
            .await
            .context("following the session")?;
        let mut messages = consumer.messages().await.context("following the session")?;
        let mut events: Vec<Event> = Vec::new();
        let (answers, mut answered) = mpsc::unbounded_channel::<(TaskId, String)>();
        let mut questions: VecDeque<(TaskId, String)> = VecDeque::new();
        let mut asking = false;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        anyhow::bail!("the event stream ended");
                    };
                    let message = message.context("following the session")?;
                    let batch = codec::decode_batch(&message.payload)
                        .with_context(|| format!("decoding an event batch of session {session}"))?;
                    let caught_up = message.info().map(|info| info.pending == 0).unwrap_or(false);
                    for event in &batch {
                        match event {
                            Event::TaskDispatched { cmd: PlannerCmd::ExecuteTool(d) | PlannerCmd::RunProcessing(d), .. } => {
                                writeln!(out, "-> {} attempt {} to {}", d.task_id, d.attempt, d.target)?;
                            }
                            Event::ClarificationRequested { cmd: PlannerCmd::AskUser { task_id, question, .. }, .. } => {
                                if options.ask {
                                    questions.push_back((task_id.clone(), question.clone()));
                                } else {
                                    writeln!(out, "?  {task_id}: {question} (answer with `planner-svc answer {session} {task_id} <answer>`)")?;
                                }
                            }
                            Event::TaskCancelled { task_id, .. } => {
                                writeln!(out, "x  {task_id} cancelled")?;
                            }
                            _ => {}
                        }
                        print_events(out, std::slice::from_ref(event))?;
                    }
                    events.extend(batch);
                    let planner = Planner::fold(&events);
                    if caught_up && planner.state().phase.is_terminal() {
                        writeln!(out)?;
                        print_summary(out, session, planner.state())?;
                        return Ok(planner.state().phase.clone());
                    }
                    if !asking {
                        asking = ask_next(out, &mut questions, &planner, &answers)?;
                    }
                }
                Some((task_id, answer)) = answered.recv() => {
                    if answer.is_empty() {
                        writeln!(out, "   no answer: answer later with `planner-svc answer {session} {task_id} <answer>`")?;
                        let planner = Planner::fold(&events);
                        asking = ask_next(out, &mut questions, &planner, &answers)?;
                        continue;
                    }
                    let command = ClientCommand::AnswerClarification { task_id: task_id.clone(), answer };
                    if let Err(error) = self.command(session, &command).await {
                        writeln!(out, "!  answer to {task_id} not taken: {error:#}")?;
                    }
                    let planner = Planner::fold(&events);
                    asking = ask_next(out, &mut questions, &planner, &answers)?;
                }
            }
        }
    }
}

/// Asks the first of `questions` still open, reading the answer on another thread (the
/// session goes on meanwhile); whether one is being asked.
fn ask_next(
    out: &mut (dyn Write + Send),
    questions: &mut VecDeque<(TaskId, String)>,
    planner: &Planner,
    answers: &mpsc::UnboundedSender<(TaskId, String)>,
) -> std::io::Result<bool> {
    while let Some((task_id, question)) = questions.pop_front() {
        if !planner.state().awaiting_answer.contains_key(&task_id) {
            continue;
        }
        write!(out, "?  {task_id}: {question} > ")?;
        out.flush()?;
        let answers = answers.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            // An empty line or the end of input: no answer from here.
            let _ = std::io::stdin().lock().read_line(&mut line);
            let _ = answers.send((task_id, line.trim().to_owned()));
        });
        return Ok(true);
    }
    Ok(false)
}

/// A new session id: 32 hex digits.
pub fn new_session_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
