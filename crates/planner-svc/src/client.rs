//! The client commands of the CLI, for a daemon on NATS: `submit`, `watch`, `answer` and
//! `cancel`, and the operator's `quarantined`. They speak the public protocol only (`docs/protocol.md`): commands are requests on
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
use crate::progress::LiveView;
use crate::protocol::{
    ClientCommand, CommandReply, QuarantineReply, QuarantineRequest, QuarantinedSession, Subjects,
};

/// A connection to the daemon's NATS.
#[derive(Debug)]
pub struct Client {
    nats: async_nats::Client,
    subjects: Subjects,
    events_stream: String,
    url: String,
    timeout: Duration,
}

/// How long [`Client::quarantined`] waits for more replies after the last one.
pub const GATHER_QUIET: Duration = Duration::from_millis(500);

/// One daemon instance's quarantined sessions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Quarantine {
    /// The instance (its micro-service id, as `$SRV.INFO` shows it).
    pub instance: String,
    /// For a release: whether this instance held the session quarantined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released: Option<bool>,
    /// Its quarantined sessions.
    pub sessions: Vec<QuarantinedSession>,
}

/// Prints what [`Client::quarantined`] gathered: one line per quarantined session and
/// instance (`session`, age, instance, reason; tab-separated), or, with `json`, one JSON
/// object per instance and line.
pub fn print_quarantined(
    out: &mut dyn Write,
    instances: &[Quarantine],
    now: planner_core::Timestamp,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        for instance in instances {
            writeln!(out, "{}", serde_json::to_string(instance)?)?;
        }
        return Ok(());
    }
    for instance in instances {
        for q in &instance.sessions {
            let reason = q.reason.replace(['\n', '\t'], " ");
            let since = crate::inspect::ago(q.since, now);
            writeln!(
                out,
                "{}\t{since}\t{}\t{reason}",
                q.session, instance.instance
            )?;
        }
    }
    Ok(())
}

/// How `watch` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// Ask open questions on the terminal and send the answers; otherwise only print them
    /// (with the command that answers them).
    pub ask: bool,
    /// How the session is shown.
    pub view: View,
}

/// How `watch` shows a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Plain lines in the order things happened (piped, or a terminal that cannot redraw).
    Lines,
    /// The live view on standard output, a terminal (`progress.rs`): a line per task, updated
    /// in place; the outcome printed under it at the end.
    Live {
        /// Whether the states are coloured.
        colour: bool,
    },
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

    /// Asks every daemon instance for the sessions it quarantined, after lifting `release`'s
    /// quarantine on each if given. One request on `{p}.admin.quarantined`, which every
    /// instance answers (each is alone in its queue group); the replies are gathered until
    /// none came for [`GATHER_QUIET`] after the last one (or the request timeout passed), so a
    /// listing costs a fraction of a second more than the slowest instance's reply. An
    /// instance that replies later than that is missed: run the command again.
    pub async fn quarantined(&self, release: Option<&str>) -> anyhow::Result<Vec<Quarantine>> {
        let request = QuarantineRequest {
            release: release.map(str::to_owned),
        };
        let inbox = self.nats.new_inbox();
        let mut replies = self
            .nats
            .subscribe(inbox.clone())
            .await
            .context("subscribing to the replies")?;
        self.nats
            .publish_with_reply(
                self.subjects.admin_quarantined(),
                inbox,
                serde_json::to_vec(&request)?.into(),
            )
            .await
            .context("asking the planners")?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut gathered = Vec::new();
        loop {
            let until = if gathered.is_empty() {
                deadline
            } else {
                (tokio::time::Instant::now() + GATHER_QUIET).min(deadline)
            };
            let Ok(Some(reply)) = tokio::time::timeout_at(until, replies.next()).await else {
                break;
            };
            // A no-responders status (no instance subscribed) has an empty body.
            if reply.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                break;
            }
            match serde_json::from_slice::<QuarantineReply>(&reply.payload)
                .context("a planner's reply is not a quarantine reply")?
            {
                QuarantineReply::Ok {
                    instance,
                    released,
                    sessions,
                } => gathered.push(Quarantine {
                    instance,
                    released,
                    sessions,
                }),
                QuarantineReply::Error(error) => {
                    anyhow::bail!("refused ({}): {}", error.kind.as_str(), error.message)
                }
            }
        }
        if gathered.is_empty() {
            anyhow::bail!(
                "no planner answered within {:?} (is `planner-svc serve` running on {}?)",
                self.timeout,
                self.url
            );
        }
        gathered.sort_by(|a, b| a.instance.cmp(&b.instance));
        Ok(gathered)
    }

    /// Prints `session`'s tasks as they go, from its first event to the end of its plan, and
    /// returns how the plan ended: as plain lines, or as the live view (`options.view`). With
    /// `options.ask`, open questions are asked on the terminal and the answers sent.
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
        let mut live = match options.view {
            View::Lines => None,
            View::Live { colour } => Some(LiveView::new(
                (!options.ask).then(|| session.to_owned()),
                colour,
            )),
        };
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
                        if let Event::ClarificationRequested { cmd: PlannerCmd::AskUser { task_id, question, .. }, .. } = event {
                            if options.ask {
                                questions.push_back((task_id.clone(), question.clone()));
                            }
                        }
                        if live.is_none() {
                            print_line(out, session, event, options.ask)?;
                        }
                    }
                    events.extend(batch);
                    let planner = Planner::fold(&events);
                    if let Some(view) = live.as_mut() {
                        view.update(planner.state());
                    }
                    if caught_up && planner.state().phase.is_terminal() {
                        if let Some(view) = live.take() {
                            if asking {
                                // Under the prompt left unanswered.
                                writeln!(out)?;
                            }
                            view.finish(planner.state());
                            // The outcome, as a line of its own under the view.
                            if let Some(end) = events.iter().rev().find(|e| {
                                matches!(e, Event::PlanCompleted { .. } | Event::PlanFailed { .. } | Event::PlanCancelled { .. })
                            }) {
                                print_events(out, std::slice::from_ref(end))?;
                            }
                        }
                        writeln!(out)?;
                        print_summary(out, session, planner.state())?;
                        return Ok(planner.state().phase.clone());
                    }
                    if !asking {
                        asking = ask_next(out, &mut questions, &planner, &answers, live.as_mut())?;
                    }
                }
                Some((task_id, answer)) = answered.recv() => {
                    if let Some(view) = live.as_mut() {
                        view.resume();
                    }
                    if answer.is_empty() {
                        say(out, live.as_ref(), &format!("   no answer: answer later with `planner-svc answer {session} {task_id} <answer>`"))?;
                        let planner = Planner::fold(&events);
                        asking = ask_next(out, &mut questions, &planner, &answers, live.as_mut())?;
                        continue;
                    }
                    let command = ClientCommand::AnswerClarification { task_id: task_id.clone(), answer };
                    if let Err(error) = self.command(session, &command).await {
                        say(out, live.as_ref(), &format!("!  answer to {task_id} not taken: {error:#}"))?;
                    }
                    let planner = Planner::fold(&events);
                    asking = ask_next(out, &mut questions, &planner, &answers, live.as_mut())?;
                }
            }
        }
    }
}

/// The plain lines of `event` (piped, or on a terminal that cannot redraw).
fn print_line(
    out: &mut (dyn Write + Send),
    session: &str,
    event: &Event,
    ask: bool,
) -> std::io::Result<()> {
    match event {
        Event::TaskDispatched {
            cmd: PlannerCmd::ExecuteTool(d) | PlannerCmd::RunProcessing(d),
            ..
        } => {
            writeln!(
                out,
                "-> {} attempt {} to {}",
                d.task_id, d.attempt, d.target
            )?;
        }
        Event::ClarificationRequested {
            cmd: PlannerCmd::AskUser {
                task_id, question, ..
            },
            ..
        } if !ask => {
            writeln!(out, "?  {task_id}: {question} (answer with `planner-svc answer {session} {task_id} <answer>`)")?;
        }
        Event::TaskCancelled { task_id, .. } => {
            writeln!(out, "x  {task_id} cancelled")?;
        }
        _ => {}
    }
    print_events(out, std::slice::from_ref(event))
}

/// Prints `line`: above the live view when there is one.
fn say(out: &mut (dyn Write + Send), live: Option<&LiveView>, line: &str) -> std::io::Result<()> {
    match live {
        Some(view) => view.println(line),
        None => writeln!(out, "{line}"),
    }
}

/// Asks the first of `questions` still open, reading the answer on another thread (the
/// session goes on meanwhile); whether one is being asked. The live view, if any, is taken
/// off the screen until the answer comes, so nothing is drawn over the prompt or the typing.
fn ask_next(
    out: &mut (dyn Write + Send),
    questions: &mut VecDeque<(TaskId, String)>,
    planner: &Planner,
    answers: &mpsc::UnboundedSender<(TaskId, String)>,
    live: Option<&mut LiveView>,
) -> std::io::Result<bool> {
    while let Some((task_id, question)) = questions.pop_front() {
        if !planner.state().awaiting_answer.contains_key(&task_id) {
            continue;
        }
        if let Some(view) = live {
            view.pause();
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
