//! The bodies of the fuzz targets: one `pub fn <target>(data: &[u8])` per target of `fuzz/`.
//!
//! They live here, in an ordinary workspace crate, so that stable `cargo test` replays the
//! checked-in corpus (`fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`) through the
//! same code the fuzzer runs (`tests/corpus.rs`): CI guards every past crash without nightly.
//! `fuzz/` holds only thin `fuzz_target!` wrappers; see `docs/fuzzing.md`.
//!
//! Each body decodes its input with the function the daemon uses on that input, then takes it
//! as far as the daemon would (a wire command through a `Planner`, a snapshot restored and
//! ticked, a log opened and read through the real `FileStore`), and checks the cheap invariants
//! on the way: what decodes re-encodes to the same value, a refused command changes nothing,
//! the fold of the events equals the live state. A panic is a finding.

// A fuzz body's job is to panic when an invariant breaks: its asserts, unwraps and panics are
// the findings, as in a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use planner_core::codec::{self, Upcaster};
use planner_core::{
    parse_input, parse_input_from, validate_plan, Command, Event, LeasePolicy, NodeKind, PlanSpec,
    Planner, PlannerConfig, TaskId, TaskSpec, TaskStatus, Timestamp,
};
use planner_store::jetstream::{decode_snapshot, encode_snapshot};
use planner_store::{EventStore, FileStore, FileStoreConfig, FsyncPolicy, Snapshot};
use planner_svc::protocol::{ClaimRequest, ClientCommand, HeartbeatRequest, ReportMessage};

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` and the corpus directories name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("rule_parser", rule_parser),
    ("plan_validation", plan_validation),
    ("event_decoding", event_decoding),
    ("snapshot_decoding", snapshot_decoding),
    ("wire_command", wire_command),
    ("wire_report", wire_report),
    ("wire_lease", wire_lease),
    ("file_store_reader", file_store_reader),
];

/// The rule parser, on any text: a plan that validates (or none), the same every time, and a
/// request of that text accepted or refused by a planner whose fold equals its live state.
pub fn rule_parser(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let plan = parse_input(text);
    assert_eq!(plan, parse_input(text), "the parser is deterministic");
    if !plan.tasks.is_empty() && plan.tasks.iter().all(|t| fits(&t.description)) {
        validate_plan(&plan, |_| false, usize::MAX)
            .unwrap_or_else(|e| panic!("the parser made an invalid plan: {e}\n{plan:#?}"));
    }
    // Numbering from where a session is (`next_task_number`), the largest included.
    let first = data.first().map_or(1, |&b| u64::from(b) + 1);
    let _ = parse_input_from(text, first);
    let _ = parse_input_from(text, u64::MAX - 1);
    for fixture in fixtures() {
        let mut session = fixture.clone();
        let now = session.now(1);
        session.step(Command::Initialize {
            request_id: None,
            input: text.to_owned(),
            attachments: vec![],
            plan: None,
            planning: None,
            now,
        });
        session.settle();
    }
}

/// Plan validation, on any JSON plan: what validates is accepted by a planner (as a supplied
/// plan), what does not is refused with nothing changed.
pub fn plan_validation(data: &[u8]) {
    let Ok(plan) = serde_json::from_slice::<PlanSpec>(data) else {
        return;
    };
    let json = serde_json::to_vec(&plan).unwrap();
    assert_eq!(serde_json::from_slice::<PlanSpec>(&json).unwrap(), plan);
    for fixture in fixtures() {
        let mut session = fixture.clone();
        let state = session.planner.state();
        let valid_here = validate_plan(
            &plan,
            |id| state.task(id).is_some(),
            state.config.max_plan_tasks,
        );
        let now = session.now(1);
        let accepted = session.step(Command::Initialize {
            request_id: None,
            input: "a supplied plan".into(),
            attachments: vec![],
            plan: Some(plan.clone()),
            planning: None,
            now,
        });
        assert_eq!(accepted, valid_here.is_ok(), "{valid_here:?}");
        session.settle();
    }
}

/// Event decoding and upcasting: an envelope or a batch, as the stores read them; what decodes
/// re-encodes to itself, reads the same through an upcaster, and folds into a planner that can
/// go on deciding.
pub fn event_decoding(data: &[u8]) {
    if let Ok(event) = codec::decode(data) {
        let bytes = codec::encode(&event);
        assert_eq!(codec::decode(&bytes).unwrap(), event);
        // The same bytes read by a build one schema version later, through an upcaster.
        let later = codec::decode_with(data, 2, &[IDENTITY_UPCASTER]).unwrap();
        assert_eq!(later, event);
        replay(std::slice::from_ref(&event));
    } else {
        // The upcaster path on whatever it is; a failure is an error, never a panic.
        let _ = codec::decode_with(data, 2, &[IDENTITY_UPCASTER]);
        let _ = codec::decode_with(data, 3, &[FAILING_UPCASTER, IDENTITY_UPCASTER]);
    }
    if let Ok(events) = codec::decode_batch(data) {
        let bytes = codec::encode_batch(&events);
        assert_eq!(codec::decode_batch(&bytes).unwrap(), events);
        replay(&events);
    }
}

/// Snapshot decoding, as both stores read them (the file store's JSON, the JetStream store's
/// LZ4 object), then restored as `load_planner` does and driven on.
pub fn snapshot_decoding(data: &[u8]) {
    if let Ok(snapshot) = Snapshot::decode(data) {
        restore(snapshot);
    }
    if let Ok((sequence, snapshot)) = decode_snapshot(data) {
        let bytes = encode_snapshot(sequence, &snapshot);
        let (again_sequence, again) = decode_snapshot(&bytes).unwrap();
        assert_eq!((again_sequence, &again), (sequence, &snapshot));
        restore(snapshot);
    }
}

/// Commands (requests, answers, cancels) as the daemon decodes them on `{p}.cmd.<session>`,
/// then processed by sessions at several stages.
pub fn wire_command(data: &[u8]) {
    let command = match ClientCommand::decode(data) {
        Ok(command) => command,
        Err(refusal) => {
            assert!(!refusal.message.is_empty());
            return;
        }
    };
    let json = serde_json::to_vec(&command).unwrap();
    assert_eq!(ClientCommand::decode(&json).unwrap(), command);
    for fixture in fixtures() {
        let mut session = fixture.clone();
        let now = session.now(1);
        session.step(command.clone().into_command(now));
        session.settle();
    }
}

/// Executor reports as the daemon decodes them on `{p}.report.<session>`.
pub fn wire_report(data: &[u8]) {
    let Ok(report) = serde_json::from_slice::<ReportMessage>(data) else {
        return;
    };
    let json = serde_json::to_vec(&report).unwrap();
    assert_eq!(
        serde_json::from_slice::<ReportMessage>(&json).unwrap(),
        report
    );
    for fixture in fixtures() {
        let mut session = fixture.clone();
        let now = session.now(1);
        session.step(Command::HandleExecutorEvent {
            event: report.event.clone(),
            lease: report.lease.clone(),
            now,
        });
        session.settle();
    }
}

/// Claims and heartbeats as the daemon decodes them on `{p}.claim.<session>` and
/// `{p}.heartbeat.<session>` (the same bytes are tried as both).
pub fn wire_lease(data: &[u8]) {
    if let Ok(claim) = serde_json::from_slice::<ClaimRequest>(data) {
        let json = serde_json::to_vec(&claim).unwrap();
        assert_eq!(
            serde_json::from_slice::<ClaimRequest>(&json).unwrap(),
            claim
        );
        for fixture in fixtures() {
            let mut session = fixture.clone();
            let now = session.now(1);
            session.step(Command::ClaimAttempt {
                task_id: claim.task_id.clone(),
                attempt: claim.attempt,
                lease: "fuzz-lease".into(),
                now,
            });
            session.settle();
        }
    }
    if let Ok(beat) = serde_json::from_slice::<HeartbeatRequest>(data) {
        let json = serde_json::to_vec(&beat).unwrap();
        assert_eq!(
            serde_json::from_slice::<HeartbeatRequest>(&json).unwrap(),
            beat
        );
        for fixture in fixtures() {
            let mut session = fixture.clone();
            let now = session.now(1);
            session.step(Command::Heartbeat {
                task_id: beat.task_id.clone(),
                attempt: beat.attempt,
                lease: beat.lease.clone(),
                now,
            });
            session.settle();
        }
    }
}

/// The file store's record reader: `data` is an `events.log`. Opened read-only (as operator
/// commands do) and for writing (recovery truncates a torn tail), both must agree; every stream
/// reads back as many events as its version says; an append after recovery reads back, and a
/// reopen sees the same log.
pub fn file_store_reader(data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("events.log"), data).unwrap();
    let mut config = FileStoreConfig::new(dir.path());
    config.fsync = FsyncPolicy::Never;
    // Small enough that the scan's "implausible length" check is exercised, large enough for
    // any record the fuzzer can write.
    config.max_record_bytes = 1 << 20;
    block_on(async {
        let read_only = FileStore::open_read_only(config.clone());
        let seen = match &read_only {
            Ok(store) => Some(read_store(store).await),
            Err(_) => None,
        };
        drop(read_only);
        let store = match FileStore::open(config.clone()) {
            Ok(store) => store,
            Err(e) => {
                assert!(seen.is_none(), "read-only open succeeded, open failed: {e}");
                return;
            }
        };
        let seen = seen.expect("open succeeded, read-only open failed");
        let recovered = read_store(&store).await;
        assert_eq!(recovered.streams, seen.streams);
        let Some(contents) = recovered.contents else {
            // A record that does not decode: reported as an error, like the read-only store.
            assert!(seen.contents.is_none());
            return;
        };
        assert_eq!(Some(&contents), seen.contents.as_ref());
        // Append to every stream (and a new one) after recovery; each reads back in full.
        let extra = Event::PlanCompleted { at: Timestamp(1) };
        let mut expected = contents.clone();
        expected
            .entry("fuzz-new".to_owned())
            .or_default()
            .extend([]);
        for (stream, events) in &mut expected {
            let version = events.len() as u64;
            let after = store
                .append(stream, version, std::slice::from_ref(&extra))
                .await
                .unwrap_or_else(|e| panic!("append to {stream} at {version}: {e}"));
            assert_eq!(after, version + 1);
            events.push(extra.clone());
        }
        let appended = read_store(&store).await.contents.unwrap();
        assert_eq!(appended, expected);
        drop(store);
        let reopened = FileStore::open(config).unwrap();
        assert_eq!(read_store(&reopened).await.contents.unwrap(), expected);
    });
}

type Contents = std::collections::BTreeMap<String, Vec<Event>>;

struct Read {
    streams: Vec<String>,
    /// Every stream's events, or `None` when one failed to read (a record that does not decode).
    contents: Option<Contents>,
}

async fn read_store(store: &FileStore) -> Read {
    let streams = store.list_streams().await.unwrap();
    let mut contents = Contents::new();
    for stream in &streams {
        let version = store.version(stream).await.unwrap();
        let events = match store.load_all(stream).await {
            Ok(events) => events,
            Err(_) => {
                return Read {
                    streams,
                    contents: None,
                }
            }
        };
        assert_eq!(
            events.len() as u64,
            version,
            "stream {stream} says version {version} but holds {} events",
            events.len()
        );
        // Reading from the middle gives the tail.
        let half = version / 2;
        let tail = store.load_from(stream, half).await.unwrap();
        assert_eq!(tail.as_slice(), events.get(half as usize..).unwrap());
        contents.insert(stream.clone(), events);
    }
    Read {
        streams,
        contents: Some(contents),
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
    }
    RUNTIME.with(|runtime| runtime.block_on(future))
}

/// Whether a description is within what a plan may hold (the parser keeps long sentences whole;
/// the planner then refuses the request, which is not the parser's bug).
fn fits(description: &str) -> bool {
    let chars = description.chars().count();
    (1..=planner_core::plan::MAX_DESCRIPTION_CHARS).contains(&chars)
}

fn identity(value: serde_json::Value) -> Result<serde_json::Value, String> {
    Ok(value)
}

fn refuse(_: serde_json::Value) -> Result<serde_json::Value, String> {
    Err("refused".into())
}

const IDENTITY_UPCASTER: Upcaster = Upcaster {
    from_version: 1,
    upcast: identity,
};

const FAILING_UPCASTER: Upcaster = Upcaster {
    from_version: 2,
    upcast: refuse,
};

/// Stored events, folded as a load does, then driven on as a loaded session is.
fn replay(events: &[Event]) {
    let planner = Planner::fold(events);
    assert_eq!(planner.version(), events.len() as u64);
    let mut session = Session::new(planner);
    session.events = events.to_vec();
    session.settle();
}

/// A decoded snapshot: re-encoded to itself, restored as `load_planner` restores it, and driven on.
fn restore(snapshot: Snapshot) {
    let bytes = snapshot.encode();
    assert_eq!(Snapshot::decode(&bytes).unwrap(), snapshot);
    let planner = Planner::from_state(snapshot.state);
    let again = Planner::from_state(planner.state().clone());
    assert_eq!(
        again.state(),
        planner.state(),
        "rebuilding indexes is idempotent"
    );
    let _ = planner.next_deadline();
    // The events of the session are unknown: the fold check starts from the snapshot.
    let mut session = Session::new(planner);
    session.from_snapshot = Some(session.planner.clone());
    session.settle();
}

/// A planner and every event it emitted (after `from_snapshot`, when it was restored).
#[derive(Debug, Clone)]
struct Session {
    planner: Planner,
    events: Vec<Event>,
    from_snapshot: Option<Planner>,
}

impl Session {
    fn new(planner: Planner) -> Self {
        Session {
            planner,
            events: Vec::new(),
            from_snapshot: None,
        }
    }

    /// A time `millis` after the latest the planner has seen.
    fn now(&self, millis: u64) -> Timestamp {
        self.planner.state().clock.plus_millis(millis)
    }

    /// Processes `command` and checks the core's laws: a refused command changes nothing, the
    /// events re-encode to themselves, and the fold of the session equals its live state.
    /// Whether the command was accepted.
    fn step(&mut self, command: Command) -> bool {
        let before = self.planner.state().clone();
        let described = format!("{command:?}");
        match self.planner.process(command) {
            Ok(events) => {
                let bytes = codec::encode_batch(&events);
                assert_eq!(codec::decode_batch(&bytes).unwrap(), events);
                for event in &events {
                    if let Some(dispatch) = event.planner_cmd().and_then(dispatch_of) {
                        let _ = self.planner.assignment(&dispatch);
                    }
                }
                self.events.extend(events);
                let folded = match &self.from_snapshot {
                    Some(start) => {
                        let mut folded = start.clone();
                        for event in &self.events {
                            folded.apply(event);
                        }
                        folded
                    }
                    None => Planner::fold(&self.events),
                };
                assert_eq!(
                    folded.state(),
                    self.planner.state(),
                    "fold differs from the live state after {described}"
                );
                true
            }
            Err(_) => {
                assert_eq!(
                    self.planner.state(),
                    &before,
                    "a refused command changed the state: {described}"
                );
                false
            }
        }
    }

    /// What the daemon does next to any session: dispatch what is ready, fire timers (up to a
    /// day later, past every timeout), and compact.
    fn settle(&mut self) {
        self.step(Command::Continue);
        let now = self.now(1);
        self.step(Command::ExtendLeases { now });
        let _ = self.planner.next_deadline();
        for later in [1_000, 60_000, 86_400_000] {
            let now = self.now(later);
            self.step(Command::Tick { now });
        }
        let now = self.now(1);
        self.step(Command::CompactContext {
            summary: None,
            through: None,
            now,
        });
    }
}

fn dispatch_of(cmd: &planner_core::PlannerCmd) -> Option<planner_core::Dispatch> {
    match cmd {
        planner_core::PlannerCmd::ExecuteTool(d) | planner_core::PlannerCmd::RunProcessing(d) => {
            Some(d.clone())
        }
        _ => None,
    }
}

/// Sessions at a few stages, built once: a fresh one, and two running a plan with a tool call
/// dispatched and claimed, a question asked and a step waiting on both (the second with claims
/// required, every timeout set and a small token budget).
fn fixtures() -> &'static [Session] {
    static FIXTURES: OnceLock<Vec<Session>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let strict = PlannerConfig {
            token_budget: 60,
            max_parallel: 1,
            leases: LeasePolicy {
                require_claim: true,
                heartbeat_timeout_ms: Some(1_000),
                start_to_close_ms: Some(5_000),
                schedule_to_start_ms: Some(2_000),
                // A kind's own timeout beside the session's, so both layers are exercised.
                kinds: [(
                    planner_core::NodeKind::Processing,
                    planner_core::TaskTimeouts {
                        heartbeat_timeout_ms: Some(500),
                        ..Default::default()
                    },
                )]
                .into(),
                ..LeasePolicy::default()
            },
            clarification: planner_core::ClarificationPolicy {
                timeout_ms: Some(3_000),
                ..Default::default()
            },
            budgets: planner_core::Budgets {
                max_tokens: Some(1_000),
                ..Default::default()
            },
            ..PlannerConfig::default()
        };
        let mut sessions = vec![Session::new(Planner::new())];
        for config in [PlannerConfig::default(), strict] {
            let mut session = Session::new(Planner::with_config(config).unwrap());
            assert!(session.step(Command::Initialize {
                request_id: Some("r1".into()),
                input: "find flights, ask for the date, then summarize".into(),
                attachments: vec![],
                plan: Some(fixture_plan()),
                planning: None,
                now: Timestamp(1_000),
            }));
            // Claim the first running attempt with a known lease ("lease-1").
            let running = session
                .planner
                .state()
                .tasks
                .iter()
                .find(|t| t.status == TaskStatus::Running)
                .map(|t| (t.id.clone(), t.attempts));
            if let Some((task_id, attempt)) = running {
                assert!(session.step(Command::ClaimAttempt {
                    task_id,
                    attempt,
                    lease: "lease-1".into(),
                    now: Timestamp(1_100),
                }));
            }
            sessions.push(session);
        }
        sessions
    })
}

fn fixture_plan() -> PlanSpec {
    let task = |id: &str, kind: NodeKind, target: &str, deps: &[&str]| TaskSpec {
        id: TaskId::from(id),
        description: format!("step {id}"),
        kind,
        target: target.into(),
        dependencies: deps.iter().map(|d| TaskId::from(*d)).collect(),
        attachments: vec![],
        question: None,
        timeouts: None,
    };
    PlanSpec {
        tasks: vec![
            task("t1", NodeKind::ToolCall, "search", &[]),
            task("t2", NodeKind::Clarification, "user", &[]),
            task("t3", NodeKind::Processing, "summarize", &["t1", "t2"]),
            task("t4", NodeKind::ToolCall, "fetch", &[]),
        ],
    }
}
