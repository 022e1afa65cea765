//! Load generator: drives S concurrent sessions of T chained tasks through a running daemon
//! with simulated executors on NATS, and reports task completions per second, the latency from
//! an executor's result to the next dispatch (p50, p99), the daemon's peak RSS, and the raw
//! JetStream publish-with-ack ceiling measured in the same run on the same server (512 writes in
//! flight, and the median latency of one write at a time: one session's floor per task).
//!
//! ```text
//! cargo build --release -p planner-svc -p planner-loadgen && target/release/loadgen --sessions 1000 --tasks 20
//! ```
//!
//! It starts its own nats-server (2.10+, found like the tests find it) unless `--nats-url` is
//! given, and spawns the `planner-svc` binary next to it as the daemon: `--instances N` of
//! them, which split the sessions' partitions between them (ARCHITECTURE.md, "Ownership").

#![allow(clippy::print_stdout)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use bytes::Bytes;
use clap::Parser;
use futures::{StreamExt as _, TryStreamExt as _};
use planner_store::{EventStore, JetStreamConfig, JetStreamStore};
use planner_svc::executor::{run_pool, PoolObserver, PoolOptions, ReportPath};
use planner_svc::protocol::{CommandReply, OwnershipReply, Subjects, TaskMessage};
use planner_svc::sim::SimBehaviour;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The executors here are the shipped pool (`planner-svc executor`), which runs on mimalloc in
/// `planner-svc`: the same allocator here, so the load generator costs what the pool does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Drive concurrent sessions through a planner-svc daemon and measure it")]
struct Args {
    /// Concurrent sessions.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Tasks per session, each depending on the one before.
    #[arg(long, default_value_t = 20)]
    tasks: usize,
    /// Simulated task duration, in milliseconds (raise it to offer less load).
    #[arg(long, default_value_t = 0)]
    executor_latency_ms: u64,
    /// Spread of the simulated duration, in percent (50: between 0.5× and 1.5×).
    #[arg(long, default_value_t = 50)]
    jitter_percent: u8,
    /// Sessions start evenly over this many milliseconds (0: all at once).
    #[arg(long, default_value_t = 1000)]
    ramp_ms: u64,
    /// Daemon instances to start, sharing the sessions (each owns a share of the partitions).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// The daemon binary (default: planner-svc next to this one).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// A setting for the daemon, passed as its `--set KEY=VALUE` (repeatable; wins over the
    /// load generator's own: reports.max_in_flight=1024, sessions.max_loaded=100000).
    #[arg(long = "daemon-set", value_name = "KEY=VALUE")]
    daemon_set: Vec<String>,
    /// A configuration file for the nats-server the load generator starts (its `-c`), e.g. one
    /// with `jetstream { sync_interval: always }`; ignored with `--nats-url`.
    #[arg(long, value_name = "FILE")]
    nats_config: Option<PathBuf>,
    /// Starts the server with `jetstream { sync_interval: always }` (every write fsynced, what
    /// `deploy/` ships): a shorthand for a `--nats-config` file holding just that.
    #[arg(long)]
    sync_always: bool,
    /// Starts a cluster of this many nats-servers on loopback ports instead of one server,
    /// with every stream and the lease bucket replicated on all of them (at most 5); ignored
    /// with `--nats-url`.
    #[arg(long, value_name = "NODES")]
    cluster: Option<usize>,
    /// With `--cluster`: kills (SIGKILL) its last node this many milliseconds after the
    /// sessions start, and reports what the run made of it.
    #[arg(long, value_name = "MS", requires = "cluster")]
    kill_node_after_ms: Option<u64>,
    /// The executors publish their reports to the report stream only (one more durable write
    /// per task), instead of sending them to the planner directly with the stream as fallback.
    #[arg(long)]
    stream_reports: bool,
    /// Dispatches reach the executors only through the dispatch stream: the daemons offer
    /// none (`dispatch.offers = false`) and the pool takes none.
    #[arg(long)]
    no_offers: bool,
    /// The pool's reports never ask for the session's next task (`next`): each task comes by
    /// an offer or the stream and is claimed, as before the planner handed tasks over.
    #[arg(long)]
    no_next: bool,
    /// Writes every result → next dispatch latency to this file, one `unix_seconds,micros` line
    /// each (when the dispatch arrived), to see when in a run its tail happens and line it up
    /// with other logs.
    #[arg(long, value_name = "FILE")]
    latencies: Option<PathBuf>,
}

#[derive(Default)]
struct Observer {
    dispatched: AtomicU64,
    /// The dispatches' bytes as sent (the JSON of each `TaskMessage`).
    dispatch_bytes: AtomicU64,
    reported: AtomicU64,
    last_report: Mutex<HashMap<String, Instant>>,
    /// Each result → next dispatch latency, with when the dispatch arrived.
    latencies_us: Mutex<Vec<(Instant, u64)>>,
    /// Attempts run to a report more than once (by any executor of the pool): the planner
    /// promises none.
    executed: Mutex<HashMap<(String, String, u32), u32>>,
    /// Tasks reported at least once: the run is done when every task is (a retried task
    /// reports more than once).
    tasks_done: AtomicU64,
    tasks_seen: Mutex<HashSet<(String, String)>>,
}

impl Observer {
    /// Every table sized for the whole run up front. Grown on demand they rehash in doublings,
    /// under their lock, on a pool thread: at 28,672 entries the two SipHashed tables took
    /// about 20 ms together, every executor of the pool waited, and that pause was measured as
    /// the daemon's result → next dispatch tail (the dips at 0.9, 1.8 and 3.2 s of a half-load
    /// run, doubling like the tables).
    fn for_run(sessions: usize, tasks: usize) -> Self {
        // Capped (about 250 MB of address space at the cap, touched only as used), so that a
        // huge run does not reserve gigabytes before it starts.
        let attempts = sessions.saturating_mul(tasks).min(1 << 20);
        Self {
            last_report: Mutex::new(HashMap::with_capacity(sessions)),
            latencies_us: Mutex::new(Vec::with_capacity(attempts)),
            executed: Mutex::new(HashMap::with_capacity(attempts)),
            tasks_seen: Mutex::new(HashSet::with_capacity(attempts)),
            ..Self::default()
        }
    }
}

impl PoolObserver for Observer {
    fn dispatched(&self, task: &TaskMessage, at: Instant) {
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        let bytes = serde_json::to_vec(task).map_or(0, |b| b.len() as u64);
        self.dispatch_bytes.fetch_add(bytes, Ordering::Relaxed);
        let previous = self
            .last_report
            .lock()
            .ok()
            .and_then(|m| m.get(&task.session).copied());
        if let Some(previous) = previous {
            let micros = u64::try_from(at.duration_since(previous).as_micros()).unwrap_or(u64::MAX);
            if let Ok(mut l) = self.latencies_us.lock() {
                l.push((at, micros));
            }
        }
    }
    fn reporting(&self, task: &TaskMessage, at: Instant) {
        if let Ok(mut m) = self.last_report.lock() {
            m.insert(task.session.clone(), at);
        }
    }
    fn reported(&self, task: &TaskMessage, _at: Instant) {
        self.reported.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut executed) = self.executed.lock() {
            let key = (
                task.session.clone(),
                task.assignment.task_id.0.clone(),
                task.assignment.attempt,
            );
            let task_key = (key.0.clone(), key.1.clone());
            *executed.entry(key).or_default() += 1;
            let first_of_task = self
                .tasks_seen
                .lock()
                .is_ok_and(|mut seen| seen.insert(task_key));
            if first_of_task {
                self.tasks_done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Whether any report consumer (one per partition, and the shared one) still has reports
/// pending or unacknowledged.
async fn reports_pending(js: &jetstream::Context) -> anyhow::Result<bool> {
    let stream = js.get_stream("PLANNER_REPORTS").await?;
    let mut consumers = stream.consumers();
    let mut busy = false;
    while let Some(info) = consumers.try_next().await? {
        busy |= info.num_pending > 0 || info.num_ack_pending > 0;
    }
    Ok(busy)
}

/// Every daemon's answer on `planner.admin.ownership`, gathered for a quarter second.
async fn ownership(client: &async_nats::Client) -> Vec<OwnershipReply> {
    let inbox = client.new_inbox();
    let Ok(mut replies) = client.subscribe(inbox.clone()).await else {
        return Vec::new();
    };
    if client
        .publish_with_reply("planner.admin.ownership", inbox, Bytes::new())
        .await
        .is_err()
    {
        return Vec::new();
    }
    let mut all = Vec::new();
    while let Ok(Some(reply)) =
        tokio::time::timeout(Duration::from_millis(250), replies.next()).await
    {
        if let Ok(answer) = serde_json::from_slice::<OwnershipReply>(&reply.payload) {
            all.push(answer);
        }
    }
    all
}

/// The latencies in consecutive windows from the first: where in a run its tail lies (a ramp,
/// a stall, or spread evenly). Each window is `count p50/p99` in ms, or `0 -` when nothing
/// arrived in it.
fn by_window(timed: &[(Instant, u64)], window: Duration) -> String {
    let Some(start) = timed.iter().map(|(at, _)| *at).min() else {
        return "none".to_owned();
    };
    let mut windows: Vec<Vec<u64>> = Vec::new();
    for (at, micros) in timed {
        let index = (at.duration_since(start).as_micros() / window.as_micros().max(1)) as usize;
        if windows.len() <= index {
            windows.resize_with(index + 1, Vec::new);
        }
        windows[index].push(*micros);
    }
    windows
        .iter_mut()
        .map(|w| {
            // A window with no dispatch at all is a stall: said so, not printed as NaN.
            if w.is_empty() {
                return "0 -".to_owned();
            }
            w.sort_unstable();
            format!(
                "{} {:.1}/{:.1}",
                w.len(),
                percentile(w, 0.50),
                percentile(w, 0.99)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Context switches (voluntary and not) of every live thread of `pid`: each is a wake-up, the
/// cost that dominates a task's latency when the machine is otherwise idle. Threads that ended
/// are not counted.
fn context_switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for thread in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(thread) = thread else { continue };
        let Ok(status) = std::fs::read_to_string(thread.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// The daemons started, killed when dropped: a run that fails leaves none behind.
struct Daemons(Vec<std::process::Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for daemon in &mut self.0 {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

/// The pids of this process's child `nats-server`s (one, or a cluster's nodes).
fn nats_server_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
            let parent: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (parent == me && name.starts_with("nats-server")).then_some(pid)
        })
        .collect()
}

/// The CPU seconds of all of `pids` (none if any cannot be read: a node was killed).
fn cpu_of(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|pid| cpu_seconds(*pid)).sum()
}

/// The raw JetStream figures the run is read against: the throughput ceiling with 512 writes in
/// flight, and the median latency of one write at a time.
struct Raw {
    msgs_per_s: f64,
    /// One session's chain can go no faster than this per task: each task's result must be
    /// durable before the next task is dispatched, so one write waits on the critical path.
    one_in_flight_ms: f64,
}

async fn ceiling(client: &async_nats::Client, replicas: usize) -> anyhow::Result<Raw> {
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(jetstream::stream::Config {
        name: "LOADGEN_RAW".into(),
        subjects: vec!["loadgen.raw".into()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    let payload = Bytes::from(vec![b'x'; 300]);
    let n = 20_000;
    let start = Instant::now();
    let mut in_flight = VecDeque::new();
    for _ in 0..n {
        if in_flight.len() == 512 {
            let ack: jetstream::context::PublishAckFuture =
                in_flight.pop_front().context("window")?;
            ack.await?;
        }
        in_flight.push_back(js.publish("loadgen.raw", payload.clone()).await?);
    }
    for ack in in_flight {
        ack.await?;
    }
    let msgs_per_s = n as f64 / start.elapsed().as_secs_f64();
    let mut one_at_a_time = Vec::with_capacity(500);
    for _ in 0..500 {
        let sent = Instant::now();
        js.publish("loadgen.raw", payload.clone()).await?.await?;
        one_at_a_time.push(sent.elapsed().as_micros() as u64);
    }
    one_at_a_time.sort_unstable();
    js.delete_stream("LOADGEN_RAW").await?;
    Ok(Raw {
        msgs_per_s,
        one_in_flight_ms: percentile(&one_at_a_time, 0.5),
    })
}

/// Messages written to each stream so far (its last sequence: work queues delete what they
/// deliver, so the count of stored messages would not do), and whether it is on file.
async fn stream_writes(js: &jetstream::Context) -> anyhow::Result<Vec<(String, u64, bool)>> {
    // A cluster that lost a node may not answer every stream's info at once.
    let mut tries = 0;
    loop {
        tries += 1;
        match stream_writes_once(js).await {
            Err(error) if tries < 10 => {
                eprintln!("loadgen: reading the streams' writes: {error}; asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            done => return done,
        }
    }
}

async fn stream_writes_once(js: &jetstream::Context) -> anyhow::Result<Vec<(String, u64, bool)>> {
    use futures::TryStreamExt as _;
    let mut names: Vec<String> = js.stream_names().try_collect().await?;
    names.sort();
    let mut writes = Vec::new();
    for name in names {
        let info = js.get_stream(&name).await?.info().await?.clone();
        let file = info.config.storage == jetstream::stream::StorageType::File;
        writes.push((name, info.state.last_sequence, file));
    }
    Ok(writes)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _server;
    let conf_dir = tempfile::tempdir()?;
    let nats_config = match (&args.nats_config, args.sync_always) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => {
            let path = conf_dir.path().join("nats-server.conf");
            std::fs::write(&path, "jetstream { sync_interval: always }\n")?;
            Some(path)
        }
        (None, false) => None,
    };
    let mut cluster = None;
    let replicas = match (&args.nats_url, args.cluster) {
        (None, Some(nodes)) => nodes.clamp(1, 5),
        _ => 1,
    };
    let url = match (&args.nats_url, args.cluster) {
        (Some(url), _) => url.clone(),
        (None, Some(_)) => {
            if nats_config.is_some() {
                bail!("--cluster starts its nodes with their own settings: drop --nats-config / --sync-always");
            }
            let nodes = planner_testkit::NatsCluster::start(replicas)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let url = nodes.url();
            cluster = Some(nodes);
            url
        }
        (None, None) => {
            let conf = nats_config.as_ref().map(|p| p.display().to_string());
            let server_args: Vec<&str> = match &conf {
                Some(conf) => vec!["-c", conf.as_str()],
                None => Vec::new(),
            };
            let server = planner_testkit::NatsServer::start_with_args(&server_args)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let url = server.url();
            _server = server;
            url
        }
    };
    // The load generator's own connection goes to the first node, which is never killed.
    let own_url = url.split(',').next().unwrap_or(&url).to_owned();
    let client = async_nats::connect(&own_url).await?;
    if cluster.is_some() {
        // A cluster answers JetStream requests once it elected its meta leader.
        let js = jetstream::new(client.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        while js.query_account().await.is_err() {
            if Instant::now() > deadline {
                bail!("the cluster's JetStream did not become ready in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let raw = ceiling(&client, replicas).await?;

    let daemon_bin = match &args.daemon {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("planner-svc"),
    };
    if !daemon_bin.is_file() {
        bail!(
            "no daemon binary at {}: build it with `cargo build --release -p planner-svc`",
            daemon_bin.display()
        );
    }
    let workdir = tempfile::tempdir()?;
    let instances = args.instances.max(1);
    let mut daemons = Daemons(Vec::new());
    for _ in 0..instances {
        let daemon = Command::new(&daemon_bin)
            // Said explicitly, so a run measures what its flags say whatever the default.
            .args([
                "--set",
                if args.no_offers {
                    "dispatch.offers=false"
                } else {
                    "dispatch.offers=true"
                },
            ])
            .args(args.daemon_set.iter().flat_map(|kv| ["--set", kv.as_str()]))
            .arg("serve")
            .current_dir(workdir.path())
            .env("PLANNER_NATS__URL", &url)
            .env("PLANNER_LOG__LEVEL", "warn")
            .env("PLANNER_REPORTS__MAX_IN_FLIGHT", "1024")
            .env("PLANNER_SESSIONS__MAX_LOADED", "100000")
            // Metrics are recorded all the same; several instances cannot share one port.
            .env("PLANNER_METRICS__LISTEN", "")
            .envs(
                [
                    "PLANNER_STORE__REPLICAS",
                    "PLANNER_DISPATCH__REPLICAS",
                    "PLANNER_REPORTS__REPLICAS",
                    "PLANNER_OWNERSHIP__REPLICAS",
                ]
                .map(|key| (key, replicas.to_string())),
            )
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", daemon_bin.display()))?;
        daemons.0.push(daemon);
    }
    // Ready when every instance answers for its partitions and together they hold them all
    // (with ownership off, each answers with every partition).
    let mut ready = false;
    for _ in 0..400 {
        let owners = ownership(&client).await;
        let covered: std::collections::BTreeSet<u32> = owners
            .iter()
            .flat_map(|o| o.partitions.iter().copied())
            .collect();
        // Each partition served once, all of them: no handover left to run during the run.
        let served: usize = owners.iter().map(|o| o.partitions.len()).sum();
        if owners.len() == instances
            && owners.iter().all(|o| !o.partitions.is_empty())
            && owners
                .iter()
                .all(|o| covered.len() == o.of as usize && served == covered.len())
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !ready {
        bail!("the {instances} daemon(s) did not answer with their partitions on planner.admin.ownership");
    }

    let observer = Arc::new(Observer::for_run(args.sessions, args.tasks));
    let shutdown = CancellationToken::new();
    let subjects = Subjects::new("planner");
    let pool = tokio::spawn(run_pool(
        client.clone(),
        subjects.clone(),
        PoolOptions {
            stream: "PLANNER_TASKS".into(),
            consumer: "loadgen-pool".into(),
            filter: subjects.tasks(),
            concurrency: args.sessions.max(64),
            report_started: false,
            behaviour: SimBehaviour {
                latency: Duration::from_millis(args.executor_latency_ms),
                jitter_percent: args.jitter_percent,
                fail_percent: 0,
                tokens: 10,
            },
            reports: if args.stream_reports {
                ReportPath::Stream
            } else {
                ReportPath::Direct
            },
            offers: !args.no_offers,
            take_next: !args.no_next,
        },
        observer.clone() as Arc<dyn PoolObserver>,
        shutdown.clone(),
    ));
    if !args.no_offers {
        wait_for_offers(&client, &subjects).await?;
    }

    let total = (args.sessions * args.tasks) as u64;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos());
    let plan = |s: usize| {
        let tasks: Vec<_> = (0..args.tasks)
            .map(|i| {
                let deps: Vec<String> = if i == 0 { vec![] } else { vec![format!("t{}", i - 1)] };
                json!({"id": format!("t{i}"), "description": format!("step {i}"), "kind": "tool_call", "target": "load", "dependencies": deps})
            })
            .collect();
        // A request id makes a submit asked again after a timeout a retry, not a second plan;
        // one per run, so that a run against a server that kept an earlier run's sessions is
        // not taken for a repeat of it.
        json!({"type": "initialize", "request_id": format!("load-{s}-{run}"), "input": "load test", "plan": {"tasks": tasks}})
    };
    let server_pids = nats_server_pids();
    // Every instance's CPU together: what the deployment spent.
    let daemons_cpu = |daemons: &[std::process::Child]| -> Option<f64> {
        daemons.iter().map(|d| cpu_seconds(d.id())).sum()
    };
    let cpu_before = (
        daemons_cpu(&daemons.0),
        cpu_of(&server_pids),
        cpu_seconds(std::process::id()),
    );
    let switches =
        |pids: &mut dyn Iterator<Item = u32>| -> Option<u64> { pids.map(context_switches).sum() };
    let switches_before = (
        switches(&mut daemons.0.iter().map(std::process::Child::id)),
        switches(&mut server_pids.iter().copied()),
        context_switches(std::process::id()),
    );
    let start = Instant::now();
    let mut killed_node = None;
    // Tasks done at each whole second of the run: where a node kill stalls it, and how long.
    let mut progress: Vec<u64> = Vec::new();
    let mut requests = Vec::new();
    for s in 0..args.sessions {
        let client = client.clone();
        let body = bytes::Bytes::from(serde_json::to_vec(&plan(s))?);
        let offset = Duration::from_millis(args.ramp_ms) * u32::try_from(s).unwrap_or(u32::MAX)
            / u32::try_from(args.sessions.max(1)).unwrap_or(1);
        requests.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start) + offset).await;
            // A refusal that may pass (the daemon at its request limit, its store failing, a
            // lost race) applied nothing, and a request that timed out or found no daemon
            // (a cluster electing leaders, partitions moving) may not have been applied: asked
            // again, as a client would, a few times. The plan's request id makes a repeat of
            // one that was applied change nothing.
            let mut tries = 0u64;
            loop {
                tries += 1;
                match client
                    .request(format!("planner.cmd.load-{s}"), body.clone())
                    .await
                {
                    Ok(reply) => {
                        let passing = matches!(
                            serde_json::from_slice(&reply.payload),
                            Ok(CommandReply::Error(error)) if error.kind.may_pass()
                        );
                        if !passing || tries >= 60 {
                            return Ok::<_, async_nats::RequestError>(reply);
                        }
                    }
                    Err(error)
                        if tries < 60
                            && matches!(
                                error.kind(),
                                async_nats::RequestErrorKind::TimedOut
                                    | async_nats::RequestErrorKind::NoResponders
                            ) => {}
                    Err(error) => return Err(error),
                }
                // Spread by session, so that a thousand refused at once do not come back at once.
                let spread = u64::try_from(s % 97).unwrap_or(0);
                tokio::time::sleep(Duration::from_millis((50 * tries).min(1_000) + spread)).await;
            }
        }));
    }
    for (s, r) in requests.into_iter().enumerate() {
        let reply = r.await??;
        // A refused plan (too large a message, too many tasks, or refused for now 60 times)
        // would otherwise leave the run waiting for tasks that never come.
        if let Ok(CommandReply::Error(error)) = serde_json::from_slice(&reply.payload) {
            bail!(
                "the daemon refused session load-{s}'s plan ({} tasks): {:?}: {}",
                args.tasks,
                error.kind,
                error.message
            );
        }
    }
    // Done when every task was reported and the daemon has processed every report.
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let (Some(nodes), Some(after), None) =
            (cluster.as_mut(), args.kill_node_after_ms, killed_node)
        {
            if start.elapsed() >= Duration::from_millis(after) {
                let last = nodes.nodes().len().saturating_sub(1);
                if let Some(node) = nodes.node_mut(last) {
                    node.kill();
                    killed_node = Some((
                        last,
                        start.elapsed(),
                        observer.tasks_done.load(Ordering::Relaxed),
                    ));
                }
            }
        }
        let second = usize::try_from(start.elapsed().as_secs()).unwrap_or(usize::MAX);
        while progress.len() <= second && progress.len() < 3600 {
            progress.push(observer.tasks_done.load(Ordering::Relaxed));
        }
        if observer.tasks_done.load(Ordering::Relaxed) >= total {
            // Every report consumer (one per partition, and the shared one) is empty. A cluster
            // electing a leader may not answer for a while: asked again, not given up.
            match reports_pending(&js).await {
                Ok(false) => break,
                Ok(true) => {}
                Err(error) => {
                    eprintln!("loadgen: reading the report consumers: {error}; asking again")
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "timed out: {} of {total} tasks reported",
                observer.tasks_done.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let rss = daemons
        .0
        .iter()
        .filter_map(|d| peak_rss_mib(d.id()))
        .fold(None, |max: Option<f64>, r| {
            Some(max.map_or(r, |m| m.max(r)))
        });
    let owners = ownership(&client).await;
    let writes = stream_writes(&js).await?;
    let cpu_after = (
        daemons_cpu(&daemons.0),
        cpu_of(&server_pids),
        cpu_seconds(std::process::id()),
    );
    let switches_after = (
        switches(&mut daemons.0.iter().map(std::process::Child::id)),
        switches(&mut server_pids.iter().copied()),
        context_switches(std::process::id()),
    );
    let per_task_switches = |before: Option<u64>, after: Option<u64>| {
        before.zip(after).map_or("n/a".to_owned(), |(b, a)| {
            format!("{:.1}", a.saturating_sub(b) as f64 / total.max(1) as f64)
        })
    };
    let per_task_us = |before: Option<f64>, after: Option<f64>| {
        before.zip(after).map_or("n/a".to_owned(), |(b, a)| {
            format!("{:.0} µs", (a - b) * 1e6 / total.max(1) as f64)
        })
    };

    // Check a sample of sessions really completed, from the event store.
    let store = JetStreamStore::connect(client.clone(), JetStreamConfig::default()).await?;
    let mut completed = 0;
    let sample: Vec<usize> = (0..args.sessions)
        .step_by((args.sessions / 20).max(1))
        .collect();
    for s in &sample {
        // A cluster that lost a node may still be electing a stream leader: ask again.
        let mut tries = 0;
        let events = loop {
            match store.load_all(&format!("load-{s}")).await {
                Ok(events) => break events,
                Err(error) if tries < 30 => {
                    tries += 1;
                    eprintln!("reading session load-{s} failed ({error}); trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(error.into()),
            }
        };
        if events.iter().any(|e| e.event_type() == "plan_completed") {
            completed += 1;
        }
    }
    shutdown.cancel();
    let _ = pool.await;
    for daemon in &daemons.0 {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(daemon.id().to_string())
            .status();
    }
    for daemon in &mut daemons.0 {
        let _ = daemon.wait();
    }

    let timed = observer
        .latencies_us
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    if let Some(path) = &args.latencies {
        // Wall-clock times, to line the samples up with other processes' logs (a GC trace, a
        // CPU's steal time): an `Instant` has no epoch, so each is placed from one reading of
        // both clocks.
        let (now, wall_now) = (Instant::now(), std::time::SystemTime::now());
        let epoch = wall_now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let lines: String = timed
            .iter()
            .map(|(at, micros)| {
                let wall = epoch - now.duration_since(*at).as_secs_f64();
                format!("{wall:.6},{micros}\n")
            })
            .collect();
        std::fs::write(path, lines)
            .with_context(|| format!("writing the latencies to {}", path.display()))?;
    }
    let mut latencies: Vec<u64> = timed.iter().map(|(_, micros)| *micros).collect();
    latencies.sort_unstable();
    println!("| instances | sessions | tasks each | ramp | executor latency (± jitter) | task completions/s | result → next dispatch p50 / p99 | daemon peak RSS (largest) | raw JetStream ceiling (512 in flight) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} ms | {} ms (± {}%) | {:.0} | {:.2} ms / {:.2} ms | {} | {:.0} msgs/s |",
        instances,
        args.sessions,
        args.tasks,
        args.ramp_ms,
        args.executor_latency_ms,
        args.jitter_percent,
        total as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        rss.map_or("n/a".to_owned(), |r| format!("{r:.0} MiB")),
        raw.msgs_per_s
    );
    println!(
        "({completed} of {} sampled sessions completed; {total} tasks in {:.2} s)",
        sample.len(),
        elapsed.as_secs_f64()
    );
    let sum = |f: fn(&OwnershipReply) -> u64| owners.iter().map(f).sum::<u64>();
    println!(
        "(sessions loaded {}, lost races {}, requests forwarded {}, over {} instance(s) answering)",
        sum(|o| o.loads),
        sum(|o| o.conflicts),
        sum(|o| o.forwarded),
        owners.len()
    );
    println!(
        "result → next dispatch by half second of the run (count, p50 / p99 ms): {}",
        by_window(&timed, Duration::from_millis(500))
    );
    let dispatched = observer.dispatched.load(Ordering::Relaxed).max(1);
    let completions = total as f64 / elapsed.as_secs_f64();
    let durable: u64 = writes.iter().filter(|w| w.2).map(|w| w.1).sum();
    let per_task = durable as f64 / total.max(1) as f64;
    println!(
        "ms per task (one session's chain): {:.3}; one raw durable write at a time (its floor): {:.3} ms median; dispatch bytes: {:.0} per dispatch",
        1000.0 * args.sessions as f64 / completions,
        raw.one_in_flight_ms,
        observer.dispatch_bytes.load(Ordering::Relaxed) as f64 / dispatched as f64
    );
    println!(
        "CPU per task: daemon {}, nats-server {}, load generator and its executors {}",
        per_task_us(cpu_before.0, cpu_after.0),
        per_task_us(cpu_before.1, cpu_after.1),
        per_task_us(cpu_before.2, cpu_after.2),
    );
    println!(
        "context switches per task: daemon {}, nats-server {}, load generator and its executors {}",
        per_task_switches(switches_before.0, switches_after.0),
        per_task_switches(switches_before.1, switches_after.1),
        per_task_switches(switches_before.2, switches_after.2),
    );
    let listed: Vec<String> = writes
        .iter()
        .map(|(name, n, file)| format!("{name} {n}{}", if *file { "" } else { " (memory)" }))
        .collect();
    println!(
        "stream writes: {}; durable (file) writes per task: {per_task:.2}; completions ÷ (ceiling ÷ durable writes per task): {:.1}%",
        listed.join(", "),
        100.0 * completions * per_task / raw.msgs_per_s
    );
    let twice = observer
        .executed
        .lock()
        .map(|e| e.values().filter(|n| **n > 1).count())
        .unwrap_or(0);
    let retried = observer
        .reported
        .load(Ordering::Relaxed)
        .saturating_sub(total);
    println!("attempts executed twice: {twice}; executions beyond one per task (retried attempts): {retried}");
    if let Some((node, at, done)) = killed_node {
        println!(
            "cluster of {replicas}: node-{node} killed (SIGKILL) at {:.2} s, {done} of {total} tasks done by then; every sampled session completed: {}",
            at.as_secs_f64(),
            completed == sample.len()
        );
        let per_second: Vec<String> = progress
            .windows(2)
            .map(|w| (w[1] - w[0]).to_string())
            .collect();
        println!("tasks done in each second: {}", per_second.join(" "));
    }
    if completed != sample.len() {
        bail!("some sampled sessions did not complete");
    }
    Ok(())
}

/// Waits until the pool takes offers (it answers an offer it cannot read with `declined`): a
/// dispatch offered before would find nobody listening, and its instance would send that
/// subject's dispatches to the stream for a while, measuring the fallback instead.
async fn wait_for_offers(client: &async_nats::Client, subjects: &Subjects) -> anyhow::Result<()> {
    let subject = subjects.offer(planner_core::NodeKind::ToolCall, "loadgen-probe");
    for _ in 0..200 {
        let probe = client.request(subject.clone(), "probe".into());
        if tokio::time::timeout(Duration::from_secs(1), probe)
            .await
            .is_ok_and(|answer| answer.is_ok())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the executor pool did not take offers within 10 s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_without_dispatches_reads_as_a_stall_not_a_number() {
        let start = Instant::now();
        let timed = [
            (start, 1_000),
            (start + Duration::from_millis(1_200), 3_000),
        ];
        assert_eq!(
            by_window(&timed, Duration::from_millis(500)),
            "1 1.0/1.0; 0 -; 1 3.0/3.0"
        );
        assert_eq!(by_window(&[], Duration::from_millis(500)), "none");
    }
}
