//! Metrics, health probes and the consistency check, on a real nats-server.

use std::time::Duration;

use planner_testkit::NatsServer;
use serde_json::json;

use crate::harness::*;

/// A port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `127.0.0.1:port`: the status and the body, or `None` when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, dechunk(&body)))
}

/// A chunked body, joined (axum chunks bodies it streams).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            return out;
        }
        let Some(chunk) = after.get(..size) else {
            return body.to_owned();
        };
        out.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or_default();
    }
}

/// The value of the sample whose line starts with `series` (name and labels as rendered).
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_plan_its_tasks_and_their_durations_from_the_events() {
    let server = NatsServer::start().unwrap();
    let port = free_port();
    let mut config = config(&server);
    config.metrics.listen = format!("127.0.0.1:{port}");
    config.metrics.check_interval_s = 1;
    let daemon = Daemon::start(config).await;
    let executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let request =
        json!({"type": "initialize", "input": "1. Search for flights\n2. Summarize the options"});
    let reply = command(&client, "metrics-plan", request).await;
    assert!(
        matches!(reply, planner_svc::protocol::CommandReply::Ok { .. }),
        "{reply:?}"
    );
    let store = store(&server.url()).await;
    let events = wait_for_end(&store, "metrics-plan").await;
    // A late report sent directly, on an attempt that ended: answered ok, counted by its path.
    let task = events
        .iter()
        .find_map(|e| match e {
            planner_core::Event::TaskDispatched { task_id, .. } => Some(task_id.clone()),
            _ => None,
        })
        .unwrap();
    let late = json!({"task_id": task, "attempt": 1, "status": "completed", "output": "late"});
    let reply = client
        .request(
            "planner.result.metrics-plan",
            serde_json::to_vec(&late).unwrap().into(),
        )
        .await
        .unwrap();
    let reply: planner_svc::protocol::ReportReply = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply, planner_svc::protocol::ReportReply::Ok { next: None });
    // A task handed over with a report's reply (the pool stopped, so the test claims a itself).
    drop(executors);
    command(&client, "metrics-next", crate::reports::chain(&["a", "b"])).await;
    let lease = crate::reports::lease_of(&client, "metrics-next", "a").await;
    let asking = json!({"task_id": "a", "attempt": 1, "status": "completed", "output": "a done",
        "lease": lease, "next": {"serves": ["planner.task.>"], "claim_id": "metrics-next-claim-0001"}});
    let reply = crate::reports::result(
        &client,
        "metrics-next",
        serde_json::to_vec(&asking).unwrap(),
    )
    .await;
    assert!(
        matches!(
            &reply,
            planner_svc::protocol::ReportReply::Ok { next: Some(_) }
        ),
        "{reply:?}"
    );
    // The metrics are recorded after the append, so poll: the last event may be a moment old.
    let mut exposition = String::new();
    for _ in 0..100 {
        if let Some((200, body)) = http_get(port, "/metrics").await {
            exposition = body;
            let ended = sample(
                &exposition,
                "planner_plans_ended_total{outcome=\"completed\"}",
            );
            let checked = sample(
                &exposition,
                "planner_consistency_checks_total{result=\"ok\"}",
            );
            if ended.is_some_and(|v| v >= 1.0) && checked.is_some_and(|v| v >= 1.0) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_least = |series: &str, min: f64| {
        let value = sample(&exposition, series);
        assert!(
            value.is_some_and(|v| v >= min),
            "{series} = {value:?}, expected at least {min}; exposition:\n{exposition}"
        );
    };
    at_least("planner_plans_ended_total{outcome=\"completed\"}", 1.0);
    at_least("planner_plans_started_total", 1.0);
    at_least("planner_tasks_dispatched_total{kind=\"tool_call\"}", 1.0);
    at_least("planner_tasks_dispatched_total{kind=\"processing\"}", 1.0);
    at_least(
        "planner_task_attempts_total{kind=\"tool_call\",outcome=\"completed\"}",
        1.0,
    );
    at_least(
        "planner_tasks_ended_total{kind=\"processing\",outcome=\"completed\"}",
        1.0,
    );
    at_least(
        "planner_task_execution_seconds_count{kind=\"tool_call\",outcome=\"completed\"}",
        1.0,
    );
    at_least(
        "planner_task_schedule_to_start_seconds_count{kind=\"tool_call\"}",
        1.0,
    );
    at_least(
        "planner_plan_duration_seconds_count{outcome=\"completed\"}",
        1.0,
    );
    at_least("planner_store_append_seconds_count", 3.0);
    at_least(
        "planner_commands_total{command=\"initialize\",result=\"ok\"}",
        1.0,
    );
    at_least(
        "planner_reports_total{path=\"stream\",result=\"applied\"}",
        2.0,
    );
    at_least(
        "planner_reports_total{path=\"direct\",result=\"applied\"}",
        1.0,
    );
    at_least("planner_build_info{version=", 1.0);
    at_least("planner_tasks_handed_over_total", 1.0);
    // The background check read the session's log and found it whole.
    at_least("planner_consistency_checks_total{result=\"ok\"}", 1.0);
    assert_eq!(
        sample(&exposition, "planner_consistency_problem_sessions"),
        Some(0.0)
    );
    // Histograms, not summaries: Prometheus computes quantiles across instances from buckets.
    assert!(
        exposition.contains("planner_task_execution_seconds_bucket{"),
        "{exposition}"
    );
    // No session or task id reaches a label.
    assert!(!exposition.contains("metrics-plan"), "{exposition}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_unready_until_nats_is_reachable_and_livez_stays_live() {
    let nats_port = free_port();
    let admin_port = free_port();
    let mut config = planner_svc::config::Config::default();
    config.nats.url = format!("nats://127.0.0.1:{nats_port}");
    config.nats.startup_wait_s = 120;
    config.metrics.listen = format!("127.0.0.1:{admin_port}");
    config.shutdown.grace_s = 5;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(planner_svc::serve::serve(config, async move {
        let _ = stopped.await;
    }));
    // Live, and not ready, while it waits for its server.
    let mut waiting = None;
    for _ in 0..200 {
        if let Some((200, _)) = http_get(admin_port, "/livez").await {
            waiting = http_get(admin_port, "/readyz").await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, body) = waiting.expect("the admin listener answers while NATS is away");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("nats: not connected yet"), "{body}");
    // Still not ready a moment later: nothing changed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        http_get(admin_port, "/readyz").await.map(|r| r.0),
        Some(503)
    );

    let server = NatsServer::start_on(nats_port, &[]).unwrap();
    let mut ready = None;
    for _ in 0..400 {
        let probe = http_get(admin_port, "/readyz").await;
        if probe.as_ref().is_some_and(|(status, _)| *status == 200) {
            ready = probe;
            break;
        }
        ready = probe;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = ready.expect("the admin listener answers");
    assert_eq!(status, 200, "not ready once NATS is up: {body}");
    assert_eq!(http_get(admin_port, "/livez").await.map(|r| r.0), Some(200));
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), daemon)
        .await
        .expect("stopped")
        .unwrap()
        .unwrap();
    drop(server);
}

fn planner_svc() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_planner-svc"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

/// `planner-svc check` with `args`: its exit status and stdout + stderr.
fn check(args: &[&str]) -> (i32, String) {
    let output = planner_svc().arg("check").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// The file store's records (`[len][crc][payload]`), split into (stream, base, count, JSON).
fn read_log(path: &std::path::Path) -> Vec<(String, u64, u32, String)> {
    let data = std::fs::read(path).unwrap();
    let mut records = Vec::new();
    let mut at = 0;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let payload = &data[at + 8..at + 8 + len];
        let stream_len = u16::from_le_bytes(payload[0..2].try_into().unwrap()) as usize;
        let stream = String::from_utf8(payload[2..2 + stream_len].to_vec()).unwrap();
        let rest = &payload[2 + stream_len..];
        let base = u64::from_le_bytes(rest[0..8].try_into().unwrap());
        let count = u32::from_le_bytes(rest[8..12].try_into().unwrap());
        let json = String::from_utf8(rest[12..].to_vec()).unwrap();
        records.push((stream, base, count, json));
        at += 8 + len;
    }
    records
}

/// Writes records back, each with a correct checksum: a hand edit the framing cannot see.
fn write_log(path: &std::path::Path, records: &[(String, u64, u32, String)]) {
    let mut out = Vec::new();
    for (stream, base, count, json) in records {
        let mut payload = Vec::new();
        payload.extend_from_slice(&(stream.len() as u16).to_le_bytes());
        payload.extend_from_slice(stream.as_bytes());
        payload.extend_from_slice(&base.to_le_bytes());
        payload.extend_from_slice(&count.to_le_bytes());
        payload.extend_from_slice(json.as_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn check_passes_a_good_file_store_and_finds_a_gap_an_undecodable_event_and_an_edited_status() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = planner_svc()
        .args(["run", "--yes", "--latency-ms", "1", "--data-dir"])
        .arg(&data)
        .arg("1. Search for flights\n2. Summarize the options")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let data_dir = data.to_str().unwrap();
    let (status, text) = check(&["--data-dir", data_dir]);
    assert_eq!(status, 0, "{text}");
    assert!(
        text.contains("checked 1 sessions: 0 with problems"),
        "{text}"
    );

    let log = data.join("events.log");
    let good = read_log(&log);
    assert!(good.len() > 3, "{good:?}");

    // An edited status: the first task's completion made a failure. Its dependent was then
    // dispatched on a failed dependency.
    let mut edited = good.clone();
    let at = edited
        .iter()
        .position(|r| r.3.contains("\"status\":\"completed\""))
        .unwrap();
    edited[at].3 = edited[at]
        .3
        .replacen("\"status\":\"completed\"", "\"status\":\"failed\"", 1);
    write_log(&log, &edited);
    let (status, text) = check(&["--data-dir", data_dir]);
    assert_eq!(status, 1, "{text}");
    assert!(text.contains("PROBLEM"), "{text}");
    assert!(
        text.contains("before its dependencies") || text.contains("after it had ended"),
        "{text}"
    );

    // An event this build cannot decode.
    let mut undecodable = good.clone();
    let last = undecodable.len() - 1;
    undecodable[last].3 = r#"[{"v":1,"event":{"type":"no_such_event"}}]"#.to_owned();
    undecodable[last].2 = 1;
    write_log(&log, &undecodable);
    let (status, text) = check(&["--data-dir", data_dir]);
    assert_eq!(status, 1, "{text}");
    assert!(text.contains("undecodable append"), "{text}");

    // A gap: the last append claims to start two versions later. The store refuses to open
    // such a log; check says so and fails.
    let mut gap = good.clone();
    gap[last].1 += 2;
    write_log(&log, &gap);
    let (status, text) = check(&["--data-dir", data_dir]);
    assert_ne!(status, 0, "{text}");
    assert!(text.contains("starts at version"), "{text}");

    // Put back, it passes again.
    write_log(&log, &good);
    let (status, text) = check(&["--data-dir", data_dir]);
    assert_eq!(status, 0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_jetstream_log_and_finds_a_gap_and_an_undecodable_append() {
    use planner_store::EventStore as _;
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let _executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let request =
        json!({"type": "initialize", "input": "1. Search for flights\n2. Summarize the options"});
    command(&client, "checked", request).await;
    let store = store(&server.url()).await;
    wait_for_end(&store, "checked").await;
    daemon.stop().await;
    let url = format!("nats.url=\"{}\"", server.url());
    let (status, text) = check(&["--set", &url, "checked"]);
    assert_eq!(status, 0, "{text}");

    // Appended by hand behind the store's back: a batch whose version skips two, then one
    // that does not decode.
    let version = store.version("checked").await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let batch = planner_core::codec::encode_batch(&[planner_core::Event::LeasesExtended {
        at: planner_core::Timestamp(1),
    }]);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Planner-Version", (version + 3).to_string().as_str());
    js.publish_with_headers("planner.events.checked", headers, batch.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Planner-Version", (version + 4).to_string().as_str());
    js.publish_with_headers("planner.events.checked", headers, "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (status, text) = check(&["--set", &url, "checked"]);
    assert_eq!(status, 1, "{text}");
    assert!(text.contains("version gap"), "{text}");
    assert!(text.contains("undecodable append"), "{text}");
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// `prometheus` and `promtool` (Debian's `prometheus` package, which scripts/test installs):
/// `None` outside CI when absent, so a developer without them is told and not failed; in CI
/// (`CI` set by .ci/run) their absence fails the test.
fn prometheus_tools() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let find = |name: &str| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
    };
    match (find("prometheus"), find("promtool")) {
        (Some(prometheus), Some(promtool)) => Some((prometheus, promtool)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("prometheus and promtool are needed in CI: apt-get install prometheus (scripts/test does)")
        }
        _ => {
            eprintln!("SKIPPED: prometheus/promtool not on PATH (apt-get install prometheus); the Prometheus test did not run");
            None
        }
    }
}

/// `text` percent-encoded for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `query` on Prometheus's HTTP API: the parsed answer.
async fn prom_query(port: u16, query: &str) -> Option<serde_json::Value> {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={}", encode(query))).await?;
    (status == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

/// The first sample's value of a query's vector result.
fn first_value(answer: &serde_json::Value) -> Option<f64> {
    answer["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_daemon_and_the_shipped_rules_and_dashboard_hold() {
    let Some((prometheus, promtool)) = prometheus_tools() else {
        return;
    };
    // The shipped rules and scrape config pass Prometheus's own checks.
    let rules = std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo("deploy/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        rules.status.success(),
        "{}{}",
        String::from_utf8_lossy(&rules.stdout),
        String::from_utf8_lossy(&rules.stderr)
    );
    let scrape = std::process::Command::new(&promtool)
        .args(["check", "config"])
        .arg(repo("deploy/prometheus/prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        scrape.status.success(),
        "{}",
        String::from_utf8_lossy(&scrape.stdout)
    );

    let server = NatsServer::start().unwrap();
    let admin = free_port();
    let mut config = config(&server);
    config.metrics.listen = format!("127.0.0.1:{admin}");
    let daemon = Daemon::start(config).await;
    let _executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;

    // Prometheus scrapes it every second, with the shipped alert rules loaded.
    let dir = tempfile::tempdir().unwrap();
    let web = free_port();
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(
        &config_file,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: planner\n    static_configs:\n      - targets: [\"127.0.0.1:{admin}\"]\n",
            repo("deploy/prometheus/alerts.yml").display()
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        std::process::Command::new(&prometheus)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );

    let client = async_nats::connect(server.url()).await.unwrap();
    let request =
        json!({"type": "initialize", "input": "1. Search for flights\n2. Summarize the options"});
    command(&client, "scraped", request).await;
    let store = store(&server.url()).await;
    wait_for_end(&store, "scraped").await;

    // The exposition passes promtool's lint.
    let (_, exposition) = http_get(admin, "/metrics").await.unwrap();
    let mut lint = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        lint.stdin
            .take()
            .unwrap()
            .write_all(exposition.as_bytes())
            .unwrap();
    }
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // Prometheus has the completion counter and the duration histogram.
    let completed = "sum(planner_plans_ended_total{outcome=\"completed\"})";
    let p50 = "histogram_quantile(0.5, sum by (le) (planner_task_execution_seconds_bucket))";
    let (mut ended, mut quantile) = (None, None);
    for _ in 0..300 {
        ended = prom_query(web, completed)
            .await
            .as_ref()
            .and_then(first_value);
        quantile = prom_query(web, p50).await.as_ref().and_then(first_value);
        if ended.is_some_and(|v| v >= 1.0) && quantile.is_some_and(|v| v.is_finite()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ended.is_some_and(|v| v >= 1.0),
        "completed plans: {ended:?}"
    );
    assert!(
        quantile.is_some_and(|v| v.is_finite() && v >= 0.0),
        "median execution time: {quantile:?}"
    );

    // Every query of the shipped dashboard is one Prometheus accepts.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/planner-svc.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(!panels.is_empty());
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m");
            let answer = prom_query(web, &expr).await;
            assert_eq!(
                answer.as_ref().map(|a| a["status"].clone()),
                Some(json!("success")),
                "{expr}: {answer:?}"
            );
        }
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_trace_context_reaches_its_dispatches_and_comes_back_with_the_report() {
    use futures::StreamExt as _;
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    // Every dispatch, as a core subscriber sees it (headers included): offered first, and the
    // pool takes offers.
    let mut dispatches = client.subscribe("planner.offer.>").await.unwrap();
    client.flush().await.unwrap();
    // (b is offered, not handed over with a's report: a pool that takes no next.)
    let (pool, stop) = crate::harness::start_pool_taking_no_next(
        &client,
        "trace-pool",
        Duration::from_millis(1),
        std::sync::Arc::new(planner_svc::executor::NoObserver),
    );
    // b waits for a: its dispatch is decided while the daemon handles a's report.
    let plan = json!({"type": "initialize", "input": "traced", "plan": {"tasks": [
        {"id": "a", "description": "do a", "kind": "tool_call", "target": "search", "dependencies": []},
        {"id": "b", "description": "do b", "kind": "tool_call", "target": "search", "dependencies": ["a"]},
    ]}});
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    command_traced(&client, "traced", traceparent, &plan).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(20), dispatches.next())
            .await
            .expect("two dispatches")
            .unwrap();
        let task: planner_svc::protocol::TaskMessage =
            serde_json::from_slice(&message.payload).unwrap();
        let header = message
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.as_str().to_owned());
        seen.push((task.assignment.task_id.to_string(), header));
    }
    for (task, header) in &seen {
        let header = header
            .as_deref()
            .unwrap_or_else(|| panic!("dispatch of {task} has no traceparent"));
        let parsed = planner_svc::trace::TraceParent::parse(header).unwrap();
        assert_eq!(
            parsed.trace_id(),
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "dispatch of {task}: {header}"
        );
        // A span of its own under the request's.
        assert_ne!(header, traceparent);
    }
    assert_eq!(seen[1].0, "b", "{seen:?}");
    stop.cancel();
    let _ = pool.await;
    daemon.stop().await;
}

/// The trace id each append of `session` stored with it, in order (`None`: it stored none).
async fn stored_traces(
    store: &planner_store::JetStreamStore,
    session: &str,
) -> Vec<Option<String>> {
    planner_store::EventStore::load_batches(store, session)
        .await
        .unwrap()
        .iter()
        .map(|batch| {
            batch
                .traceparent
                .as_deref()
                .and_then(planner_svc::trace::TraceParent::parse)
                .map(|t| t.trace_id())
        })
        .collect()
}

/// The trace id of a `traceparent` header, if it has a valid one.
fn trace_id_of(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers
        .and_then(|h| h.get("traceparent"))
        .and_then(|v| planner_svc::trace::TraceParent::parse(v.as_str()))
        .map(|t| t.trace_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_failure_is_dispatched_in_the_trace_of_its_request() {
    use futures::StreamExt as _;
    let server = NatsServer::start().unwrap();
    let mut config = config(&server);
    // A backoff long enough that the retry comes from the timer, not from the report's handling.
    config.planner.retry.initial_backoff_ms = 300;
    let daemon = Daemon::start(config).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut dispatches = client.subscribe("planner.task.>").await.unwrap();
    client.flush().await.unwrap();
    let _executors = Executors::start(
        &server.url(),
        ExecutorBehaviour {
            fail_first: ["a".to_owned()].into(),
            ..ExecutorBehaviour::default()
        },
    )
    .await;
    let plan = json!({"type": "initialize", "input": "retried", "plan": {"tasks": [
        {"id": "a", "description": "do a", "kind": "tool_call", "target": "search", "dependencies": []},
    ]}});
    let trace = "0af7651916cd43dd8448eb211c80319c";
    command_traced(
        &client,
        "retried",
        &format!("00-{trace}-b7ad6b7169203331-01"),
        &plan,
    )
    .await;
    let mut attempts = Vec::new();
    while attempts.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(20), dispatches.next())
            .await
            .expect("the first attempt and its retry")
            .unwrap();
        let task: planner_svc::protocol::TaskMessage =
            serde_json::from_slice(&message.payload).unwrap();
        attempts.push((
            task.assignment.attempt,
            trace_id_of(message.headers.as_ref()),
        ));
    }
    assert_eq!(
        attempts,
        vec![(1, Some(trace.to_owned())), (2, Some(trace.to_owned()))],
        "the retry, sent when its backoff ended, is in the request's trace"
    );
    let store = store(&server.url()).await;
    let events = wait_for_end(&store, "retried").await;
    assert!(events
        .iter()
        .any(|e| matches!(e, planner_core::Event::RetryScheduled { .. })));
    // Every append of the session (the request, the claims, the reports, the tick that
    // retried) is in the request's trace: the first carries it on its JetStream message, and
    // the others carry no other (an append stores its trace when the trace changes).
    let traced = stored_traces(&store, "retried").await;
    assert!(traced.len() >= 5, "{traced:?}");
    assert_eq!(traced[0].as_deref(), Some(trace), "{traced:?}");
    assert!(traced.iter().flatten().all(|t| t == trace), "{traced:?}");
    let stored = traced.iter().flatten().count();
    assert!(
        stored < traced.len(),
        "once per trace, not per append: {traced:?}"
    );
    // An operator reads them back with `replay`.
    let output = crate::support::planner_svc()
        .args([
            "--set",
            &format!("nats.url=\"{}\"", server.url()),
            "replay",
            "retried",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert_eq!(
        stdout.matches(&format!("trace {trace}")).count(),
        stored,
        "{stdout}"
    );
    daemon.stop().await;
}

/// An OTLP/HTTP receiver on a free loopback port: every span POSTed to `/v1/traces`
/// (protobuf), as the daemon's exporter sends them.
struct OtlpReceiver {
    port: u16,
    spans: std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl OtlpReceiver {
    async fn start() -> OtlpReceiver {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (into, counted) = (spans.clone(), requests.clone());
        let router = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (into, counted) = (into.clone(), counted.clone());
                    async move {
                        assert_eq!(
                            headers.get("content-type").and_then(|v| v.to_str().ok()),
                            Some("application/x-protobuf")
                        );
                        let request = ExportTraceServiceRequest::decode(body).unwrap();
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut spans = into.lock().unwrap();
                        for resource in request.resource_spans {
                            for scope in resource.scope_spans {
                                spans.extend(scope.spans);
                            }
                        }
                        (
                            [("content-type", "application/x-protobuf")],
                            axum::body::Bytes::new(),
                        )
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await });
        OtlpReceiver {
            port,
            spans,
            requests,
        }
    }

    /// The spans received so far in trace `trace` (hex).
    fn spans_of(&self, trace: &str) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex(&s.trace_id) == trace)
            .cloned()
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A span's attribute, as text (strings and integers).
fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .and_then(|value| match value {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_requests_spans_are_exported_over_otlp_with_session_task_and_attempt() {
    use futures::StreamExt as _;
    let server = NatsServer::start().unwrap();
    let receiver = OtlpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The real daemon, configured the OpenTelemetry way; its metrics listener off (another
    // test's may hold the port).
    let mut daemon = crate::support::Spawned::start(
        crate::support::planner_svc()
            .current_dir(dir.path())
            .args([
                "--set",
                "metrics.listen=\"\"",
                "--set",
                "dispatch.offers=true",
                "serve",
                "--nats-url",
                &server.url(),
            ])
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{}", receiver.port),
            ),
    );
    let client = async_nats::connect(server.url()).await.unwrap();
    assert!(
        crate::support::answers_ping(&client).await,
        "the daemon did not start:\n{}",
        daemon.output()
    );
    // The dispatch, offered first (the pool takes offers).
    let mut dispatches = client.subscribe("planner.offer.>").await.unwrap();
    client.flush().await.unwrap();
    let (pool, stop) = start_pool(
        &client,
        "otlp-pool",
        Duration::from_millis(1),
        std::sync::Arc::new(planner_svc::executor::NoObserver),
    );
    let plan = json!({"type": "initialize", "input": "exported", "plan": {"tasks": [
        {"id": "a", "description": "do a", "kind": "tool_call", "target": "search", "dependencies": []},
    ]}});
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    command_traced(
        &client,
        "exported",
        &format!("00-{trace}-{parent}-01"),
        &plan,
    )
    .await;
    // The dispatch carries the request's trace, and the span that sent it.
    let dispatch = tokio::time::timeout(Duration::from_secs(20), dispatches.next())
        .await
        .expect("a dispatch")
        .unwrap();
    let sent = dispatch
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .and_then(|v| planner_svc::trace::TraceParent::parse(v.as_str()))
        .expect("the dispatch has a traceparent");
    assert_eq!(sent.trace_id(), trace);
    let store = store(&server.url()).await;
    wait_for_end(&store, "exported").await;
    stop.cancel();
    let _ = pool.await;

    // A graceful stop exports what is still queued (the batch's delay is 5 s by default).
    daemon.signal("-TERM");
    let (status, output) = tokio::task::spawn_blocking(move || {
        let status = daemon.wait_exit(Duration::from_secs(20));
        (status, daemon.output())
    })
    .await
    .unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{output}");
    assert!(
        output.contains("exporting spans over OTLP/HTTP"),
        "{output}"
    );
    assert!(!output.contains("exporting spans failed"), "{output}");
    let spans = receiver.spans_of(trace);
    let describe = || {
        spans
            .iter()
            .map(|s| {
                let attributes: Vec<String> = s
                    .attributes
                    .iter()
                    .map(|kv| format!("{}={:?}", kv.key, kv.value))
                    .collect();
                format!(
                    "{} span={} parent={} {}",
                    s.name,
                    hex(&s.span_id),
                    hex(&s.parent_span_id),
                    attributes.join(" ")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        receiver.requests.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "nothing exported"
    );
    let find = |name: &str, pairs: &[(&str, &str)]| {
        spans.iter().find(|s| {
            s.name == name
                && pairs
                    .iter()
                    .all(|(k, v)| attribute(s, k).as_deref() == Some(*v))
        })
    };
    // The request's handling, a child of the caller's span.
    let received = find("receive command", &[]).unwrap_or_else(|| panic!("{}", describe()));
    assert_eq!(hex(&received.parent_span_id), parent, "{}", describe());
    find(
        "command",
        &[("session", "exported"), ("command", "initialize")],
    )
    .unwrap_or_else(|| panic!("command handling: {}", describe()));
    find("append", &[("session", "exported")]).unwrap_or_else(|| panic!("append: {}", describe()));
    // The dispatch's span is the one whose context the dispatch carried.
    let dispatched = find(
        "dispatch",
        &[("session", "exported"), ("task", "a"), ("attempt", "1")],
    )
    .unwrap_or_else(|| panic!("dispatch: {}", describe()));
    assert_eq!(
        hex(&dispatched.span_id),
        hex(&sent.span_id),
        "{}",
        describe()
    );
    // The executor's report came back with that context: its handling is in the trace.
    find(
        "command",
        &[
            ("session", "exported"),
            ("command", "handle_executor_event"),
            ("task", "a"),
            ("attempt", "1"),
        ],
    )
    .unwrap_or_else(|| panic!("report handling: {}", describe()));
    let report = find("process report", &[]).unwrap_or_else(|| panic!("{}", describe()));
    assert_eq!(
        hex(&report.parent_span_id),
        hex(&dispatched.span_id),
        "{}",
        describe()
    );
    // The attempt, from its dispatch to its end.
    let attempt = find(
        "attempt",
        &[
            ("session", "exported"),
            ("task", "a"),
            ("attempt", "1"),
            ("outcome", "completed"),
        ],
    )
    .unwrap_or_else(|| panic!("attempt: {}", describe()));
    assert!(attempt.end_time_unix_nano >= attempt.start_time_unix_nano);
}

/// Sends `plan` to `session` with the header `traceparent`; the command must be accepted.
async fn command_traced(
    client: &async_nats::Client,
    session: &str,
    traceparent: &str,
    plan: &serde_json::Value,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", traceparent);
    let reply = client
        .request_with_headers(
            format!("planner.cmd.{session}"),
            headers,
            serde_json::to_vec(plan).unwrap().into(),
        )
        .await
        .unwrap();
    let reply: planner_svc::protocol::CommandReply =
        serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        matches!(reply, planner_svc::protocol::CommandReply::Ok { .. }),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_stores_its_trace_when_it_changes_and_an_untraced_claim_is_in_its_dispatchs() {
    use futures::StreamExt as _;
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(config(&server)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut questions = client
        .subscribe("planner.ui.changing.question")
        .await
        .unwrap();
    client.flush().await.unwrap();
    // The request dispatches a tool and asks a question; the answer comes in another trace
    // before any executor takes the tool's attempt.
    let plan = json!({"type": "initialize", "input": "changing", "plan": {"tasks": [
        {"id": "q", "description": "which year?", "kind": "clarification", "target": "user", "dependencies": []},
        {"id": "a", "description": "do a", "kind": "tool_call", "target": "search", "dependencies": []},
    ]}});
    let (first, second) = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "0af7651916cd43dd8448eb211c80319c",
    );
    command_traced(
        &client,
        "changing",
        &format!("00-{first}-00f067aa0ba902b7-00"),
        &plan,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(20), questions.next())
        .await
        .expect("the question")
        .unwrap();
    let answer = json!({"type": "answer_clarification", "task_id": "q", "answer": "1999"});
    command_traced(
        &client,
        "changing",
        &format!("00-{second}-b7ad6b7169203331-00"),
        &answer,
    )
    .await;
    // The shipped pool: the traces are unsampled, so its claim and report carry no
    // `traceparent`.
    let (pool, stop) = start_pool(
        &client,
        "changing-pool",
        Duration::from_millis(1),
        std::sync::Arc::new(planner_svc::executor::NoObserver),
    );
    let store = store(&server.url()).await;
    let events = wait_for_end(&store, "changing").await;
    assert!(events
        .iter()
        .any(|e| matches!(e, planner_core::Event::AttemptClaimed { .. })));
    let traced = stored_traces(&store, "changing").await;
    // The request's append and the answer's store their traces; the claim (no header) is
    // handled in the trace its attempt was dispatched in, the request's, not the session's
    // latest (the answer's), so its append stores the request's again; the report, in the
    // same trace, stores none.
    assert!(traced.len() >= 4, "{traced:?}");
    assert_eq!(traced[0].as_deref(), Some(first), "{traced:?}");
    assert_eq!(
        traced.iter().flatten().collect::<Vec<_>>(),
        [first, second, first],
        "{traced:?}"
    );
    assert!(
        traced.len() > 3,
        "the report's append stores no trace: {traced:?}"
    );
    stop.cancel();
    let _ = pool.await;
    daemon.stop().await;
}
