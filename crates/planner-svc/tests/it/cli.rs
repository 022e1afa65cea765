//! The binary, spawned as a user would run it.

use std::process::Command;

use crate::support::{answers_ping, planner_svc, Spawned};

/// Starts `run` on `request` in `dir` (data under `data`), and returns it with its session
/// once it printed a line starting with `until`. Its stdout is drained; stderr is piped.
fn run_until(
    dir: &std::path::Path,
    latency_ms: &str,
    request: &str,
    until: &str,
) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut run = planner_svc()
        .current_dir(dir)
        .args([
            "run",
            "--yes",
            "--data-dir",
            "data",
            "--latency-ms",
            latency_ms,
            request,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(run.stdout.take().unwrap()).lines();
    let session = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("session ")
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_owned();
    for line in lines.by_ref() {
        if line.unwrap().starts_with(until) {
            break;
        }
    }
    // Keep reading, so that the run never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (run, session)
}

/// Whether a daemon answers the micro-service ping on `url` within about ten seconds.
fn serving(url: &str) -> bool {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { answers_ping(&async_nats::connect(url).await.unwrap()).await })
}

#[test]
fn run_plans_and_finishes_a_request_with_simulated_executors() {
    let dir = tempfile::tempdir().unwrap();
    let output = planner_svc()
        .current_dir(dir.path())
        .args([
            "run",
            "--yes",
            "--data-dir",
            "data",
            "--latency-ms",
            "2",
            "1. search for hotels in Porto\n2. Which dates?\n3. then summarize the options",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "planned 3 tasks",
        "-> t1 attempt 1 to web_search",
        "?  Which dates? -> yes (auto)",
        // The summary gets the hotels t1 found as well as the dates (only t2's before).
        "<- t3 completed: [summarize] summarize the options (from t1, t2)",
        "plan completed",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The session is on disk: replay reads it back.
    let session = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("session "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_owned();
    let replay = planner_svc()
        .current_dir(dir.path())
        .args(["replay", "--data-dir", "data", &session])
        .output()
        .unwrap();
    assert!(replay.status.success());
    // The summary is on stdout, after the events, for people (it was `3 tasks (0 open: )` on
    // stderr).
    let summary = String::from_utf8_lossy(&replay.stdout);
    assert!(
        summary.contains(&format!("session {session}: completed"))
            && summary.contains("3 tasks: 3 completed\n"),
        "{summary}"
    );
}

#[test]
fn retried_failures_still_finish_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let output = planner_svc()
        .current_dir(dir.path())
        .args([
            "--set",
            "planner.retry.initial_backoff_ms=5",
            "--set",
            "planner.retry.max_attempts=20",
        ])
        .args([
            "run",
            "--yes",
            "--data-dir",
            "data",
            "--latency-ms",
            "1",
            "--fail-percent",
            "40",
            "--",
            "- fetch a\n- fetch b\n- fetch c\n- fetch d",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("retry in"),
        "40% failures should cause a retry:\n{stdout}"
    );
    assert!(stdout.contains("plan completed"), "{stdout}");
}

#[test]
fn a_bad_config_exits_64_naming_every_problem() {
    let output = planner_svc()
        .env("PLANNER_SESSIONS__BOGUS", "1")
        .args(["--set", "nats.nope=2", "serve"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown key sessions.bogus"), "{stderr}");
    assert!(stderr.contains("unknown key nats.nope"), "{stderr}");
}

#[test]
fn serve_refuses_an_otlp_endpoint_variable_that_is_no_url() {
    let output = planner_svc()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")
        .args(["serve"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{stderr}");
}

#[test]
fn replay_of_an_unknown_session_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let output = planner_svc()
        .current_dir(dir.path())
        .args(["replay", "--data-dir", "data", "nobody"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no events for session nobody"));
}

#[test]
fn serve_stops_on_sigterm_and_exits_0_within_the_grace_bound() {
    let server = planner_testkit::NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Spawned::start(
        planner_svc()
            .current_dir(dir.path())
            .args(["serve", "--nats-url", &server.url()])
            .env("PLANNER_SHUTDOWN__GRACE_S", "5"),
    );
    // Serving once it answers the micro-service ping.
    let serving = serving(&server.url());
    assert!(serving, "planner-svc serve did not start");
    // Some activity, which an operator must see at INFO.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let body = br#"{"type": "initialize", "input": "search for flights"}"#;
        client
            .request("planner.cmd.seen", body.to_vec().into())
            .await
            .unwrap();
    });
    daemon.signal("-TERM");
    let status = daemon.wait_exit(std::time::Duration::from_secs(10));
    let stderr = daemon.output();
    let status = status.unwrap_or_else(|| panic!("did not exit within 10 s of SIGTERM:\n{stderr}"));
    assert!(status.success(), "exit {status:?}\n{stderr}");
    for line in ["request received", "tasks planned", "task dispatched"] {
        assert!(
            stderr.contains(line) && stderr.contains("planner::activity"),
            "a session's activity ({line:?}) is logged at INFO:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("shutting down") && stderr.contains("stopped"),
        "{stderr}"
    );
}

async fn run_with_llm(
    replies: Vec<planner_testkit::llm_server::Reply>,
) -> (std::process::Output, usize) {
    let server = planner_testkit::llm_server::ScriptedServer::start(replies).await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = planner_svc();
    command
        .current_dir(dir.path())
        .args([
            "--set",
            "llm.enabled=true",
            "--set",
            &format!("llm.base_url=\"{}\"", server.url),
            "--set",
            "llm.initial_backoff_ms=10",
        ])
        .args([
            "run",
            "--yes",
            "--data-dir",
            "data",
            "--latency-ms",
            "1",
            "compare the vendors and email me",
        ]);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let requests = server.requests.lock().unwrap().len();
    (output, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_plans_with_the_configured_llm() {
    use planner_testkit::llm_server::Reply;
    let plan = serde_json::json!({"tasks": [
        {"id": "fetch", "description": "fetch the vendor prices", "kind": "tool_call", "target": "http_fetch", "dependencies": []},
        {"id": "compare", "description": "compare them", "kind": "processing", "target": "analyze", "dependencies": ["fetch"]},
        {"id": "send", "description": "email the result", "kind": "tool_call", "target": "email", "dependencies": ["compare"]}
    ]});
    let (output, requests) = run_with_llm(vec![Reply::completion(&plan.to_string())]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("planned 3 tasks (Llm)"), "{stdout}");
    assert!(
        stdout.contains("-> fetch attempt 1 to http_fetch"),
        "{stdout}"
    );
    assert!(stdout.contains("plan completed"), "{stdout}");
    assert!(requests >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_falls_back_to_the_rules_when_the_llm_answers_nonsense() {
    use planner_testkit::llm_server::Reply;
    let (output, requests) = run_with_llm(vec![
        Reply::completion("no idea"),
        Reply::completion("still no idea"),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("(RulesFallback)"), "{stdout}");
    assert!(stdout.contains("plan completed"), "{stdout}");
    assert_eq!(requests, 2, "one try and one repair request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_over_budget_gets_an_llm_summary_recorded_in_the_log() {
    use planner_testkit::llm_server::{Reply, ScriptedServer};
    let plan = serde_json::json!({"tasks": [
        {"id": "a", "description": "first step with a long enough description to fill the context", "kind": "processing", "target": "llm", "dependencies": []},
        {"id": "b", "description": "second step with a long enough description to fill the context", "kind": "processing", "target": "llm", "dependencies": ["a"]},
        {"id": "c", "description": "third step with a long enough description to fill the context", "kind": "processing", "target": "llm", "dependencies": ["b"]}
    ]});
    let mut replies = vec![Reply::completion(&plan.to_string())];
    replies.extend((0..20).map(|_| Reply::completion("LLM SUMMARY: three steps, going well")));
    let server = ScriptedServer::start(replies).await;
    let dir = tempfile::tempdir().unwrap();
    let mut run = planner_svc();
    run.current_dir(dir.path())
        .args([
            "--set",
            "llm.enabled=true",
            "--set",
            &format!("llm.base_url=\"{}\"", server.url),
            "--set",
            "planner.token_budget=24",
        ])
        .args([
            "run",
            "--yes",
            "--data-dir",
            "data",
            "--latency-ms",
            "300",
            "do the three steps",
        ]);
    let output = tokio::task::spawn_blocking(move || run.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{stdout}");
    let session = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("session "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_owned();
    let mut replay = planner_svc();
    replay
        .current_dir(dir.path())
        .args(["replay", "--json", "--data-dir", "data", &session]);
    let log = tokio::task::spawn_blocking(move || replay.output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    let compactions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"context_compacted\""))
        .collect();
    assert!(
        compactions.iter().any(|l| l.contains("[summary of")),
        "the deterministic summary goes in first:\n{log}"
    );
    assert!(
        compactions.iter().any(|l| l.contains("LLM SUMMARY")),
        "then the LLM's:\n{log}"
    );
}

#[test]
fn a_second_run_with_the_same_session_is_a_follow_up() {
    let dir = tempfile::tempdir().unwrap();
    let run = |session: Option<&str>, request: &str| {
        let mut command = planner_svc();
        command.current_dir(dir.path()).args([
            "run",
            "--yes",
            "--data-dir",
            "data",
            "--latency-ms",
            "1",
        ]);
        if let Some(session) = session {
            command.args(["--session", session]);
        }
        command.arg(request).output().unwrap()
    };
    let first = run(None, "search for hotels in Porto");
    let first_out = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{first_out}");
    let session = first_out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("session "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_owned();
    let second = run(Some(&session), "then book the cheapest one");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{stdout}");
    // Numbering continues and the plan reopens: the follow-up's task is t2 (one task, not
    // "1 tasks").
    assert!(
        stdout.contains("planned 1 task (") && stdout.contains("   t2 "),
        "{stdout}"
    );
    assert!(stdout.contains("plan completed"), "{stdout}");
}

/// `serve` logged its whole configuration at INFO, NATS password and token included (and the
/// compose file and the Kubernetes manifest set the password by environment). No secret may
/// reach the output, whatever fails.
#[test]
fn serve_never_prints_its_secrets() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (name, value) in [
        ("PLANNER_NATS__PASSWORD", "pw-hunter2-secret"),
        ("PLANNER_NATS__TOKEN", "tok-s3cr3t-value"),
    ] {
        let mut command = planner_svc();
        command
            .args(["serve"])
            .env("PLANNER_LOG__LEVEL", "debug")
            .env(
                "PLANNER_NATS__URL",
                format!("nats://alice:url-secret-pw@127.0.0.1:{port}"),
            )
            .env("PLANNER_NATS__CONNECT_TIMEOUT_MS", "200")
            .env("PLANNER_NATS__STARTUP_WAIT_S", "1")
            .env(name, value);
        if name.ends_with("PASSWORD") {
            command.env("PLANNER_NATS__USER", "alice");
        }
        let output = command.output().unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(all.contains("effective configuration"), "{all}");
        for secret in [value, "url-secret-pw"] {
            assert!(!all.contains(secret), "{secret} printed:\n{all}");
        }
        assert!(all.contains("[redacted]"), "{all}");
    }
}

/// `serve` exited 1 when NATS was not up yet (every instance restarted during a one-second
/// server restart died). It waits for the server, logging (each cause once), and serves once it
/// comes.
#[test]
fn serve_waits_for_nats_at_start_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Spawned::start(
        planner_svc()
            .current_dir(dir.path())
            .args(["serve"])
            .env("PLANNER_NATS__URL", format!("nats://127.0.0.1:{port}"))
            .env("PLANNER_NATS__CONNECT_TIMEOUT_MS", "200"),
    );
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    assert!(daemon.is_running(), "serve gave up while NATS was down");
    let server = planner_testkit::NatsServer::start_on(port, &[]).unwrap();
    let serving = serving(&server.url());
    let all = daemon.kill();
    assert!(serving, "serve did not come up once NATS did:\n{all}");
    assert!(all.contains("NATS not reachable yet"), "{all}");
    // Its cause once per line: it was `IO error: Connection refused (os error 111): Connection
    // refused (os error 111)`.
    for line in all.lines().filter(|l| l.contains("not reachable")) {
        assert_eq!(line.matches("(os error").count(), 1, "{line}");
    }
}

/// A `run` interrupted with Ctrl-C could not be resumed: `run --session <id>` added the demo
/// request as a follow-up and hung, the interrupted attempt never sent again. Ctrl-C now says
/// how to resume, and resuming finishes the plan without adding a request.
#[test]
fn a_run_interrupted_with_ctrl_c_resumes_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    // Wait until t1 is out to its executor (which claims it at once), then press Ctrl-C.
    let (first, session) = run_until(
        dir.path(),
        "4000",
        "1. search for flights\n2. summarize the options",
        "-> t1 attempt 1",
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = first.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!("resume with `planner-svc run --session {session}")),
        "{stderr}"
    );

    let resumed = planner_svc()
        .current_dir(dir.path())
        .args([
            "run",
            "--yes",
            "--data-dir",
            "data",
            "--latency-ms",
            "20",
            "--session",
            &session,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(stdout.contains("plan completed"), "{stdout}");
    // Claimed before the interruption: a new attempt; not yet claimed: the same one, re-sent.
    assert!(
        stdout.contains("-> t1 attempt 2") || stdout.contains("-> t1 attempt 1"),
        "the interrupted task is sent again:\n{stdout}"
    );
    let replay = planner_svc()
        .current_dir(dir.path())
        .args(["replay", "--json", "--data-dir", "data", &session])
        .output()
        .unwrap();
    let events = String::from_utf8_lossy(&replay.stdout);
    assert_eq!(
        events.matches("\"request_received\"").count(),
        1,
        "no request was added by resuming:\n{events}"
    );
}

/// `executor --nats-url` was silently ignored (the pool dialled the default URL), and a pool
/// started before the daemon failed with a bare "stream not found".
#[test]
fn executor_uses_its_nats_url_and_says_to_start_serve_first() {
    let server = planner_testkit::NatsServer::start().unwrap();
    let output = planner_svc()
        .args(["executor", "--nats-url", &server.url()])
        .env("PLANNER_NATS__STARTUP_WAIT_S", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("start `planner-svc serve`"), "{stderr}");
    assert!(
        !stderr.contains("Connection refused"),
        "it dialled another URL:\n{stderr}"
    );
}

/// While a `run` waited (at a question, or on slow executors), `replay` and `sessions` failed
/// on the data directory's lock: read-only commands do not need it.
#[test]
fn replay_and_sessions_read_a_store_a_run_is_using() {
    let dir = tempfile::tempdir().unwrap();
    let (mut run, session) = run_until(dir.path(), "10000", "search for flights", "-> t1");
    let replay = planner_svc()
        .current_dir(dir.path())
        .args(["replay", "--data-dir", "data", &session])
        .output()
        .unwrap();
    let sessions = planner_svc()
        .current_dir(dir.path())
        .args(["sessions", "--data-dir", "data"])
        .output()
        .unwrap();
    let _ = run.kill();
    let _ = run.wait();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let summary = String::from_utf8_lossy(&replay.stdout);
    assert!(summary.contains(": running"), "{summary}");
    assert!(summary.contains("1 running (t1)"), "{summary}");
    assert!(
        sessions.status.success(),
        "{}",
        String::from_utf8_lossy(&sessions.stderr)
    );
    // Piped: one line per session, its status, age and request tab-separated (bare ids
    // before).
    let listed = String::from_utf8_lossy(&sessions.stdout);
    let fields: Vec<&str> = listed.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 4, "{listed:?}");
    assert_eq!(fields[0], session);
    assert_eq!(fields[1], "running");
    assert!(fields[2].ends_with('s'), "an age in seconds: {listed:?}");
    assert_eq!(fields[3], "search for flights");
}

/// After the README's `run`, `planner-svc sessions` went to the daemon's JetStream store and
/// failed with an error about NATS. It still reads the daemon's store by default, but when that
/// fails and `run`'s data directory is here, the error says to pass it.
#[test]
fn sessions_without_a_data_dir_point_to_runs_store() {
    let dir = tempfile::tempdir().unwrap();
    let run = planner_svc()
        .current_dir(dir.path())
        .args(["run", "--yes", "--latency-ms", "1", "search for flights"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sessions = planner_svc()
        .current_dir(dir.path())
        .args(["sessions"])
        .env("PLANNER_NATS__URL", format!("nats://127.0.0.1:{port}"))
        .env("PLANNER_NATS__CONNECT_TIMEOUT_MS", "200")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&sessions.stderr);
    assert!(!sessions.status.success());
    assert!(stderr.contains("add --data-dir planner-data"), "{stderr}");
}

/// `run ""` and `run "   "` ran the demo request, while the daemon refuses an empty request.
#[test]
fn run_refuses_an_empty_request() {
    let dir = tempfile::tempdir().unwrap();
    for empty in ["", "   ", "\n"] {
        let output = planner_svc()
            .current_dir(dir.path())
            .args([
                "run",
                "--yes",
                "--data-dir",
                "data",
                "--latency-ms",
                "1",
                empty,
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{empty:?}: {stdout}{stderr}");
        assert!(stderr.contains("the request is empty"), "{stderr}");
        assert!(!stdout.contains("planned"), "{stdout}");
    }
    assert!(!dir.path().join("data").exists(), "nothing was stored");
}

/// `run --session does-not-exist "…"` silently started a new session, though `--session`
/// continues an existing one: a typo in an id lost the follow-up's context.
#[test]
fn run_with_a_session_that_does_not_exist_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = |data: &str| {
        planner_svc()
            .current_dir(dir.path())
            .args(["run", "--yes", "--data-dir", data, "--latency-ms", "1"])
            .args(["--session", "does-not-exist", "book the cheapest"])
            .output()
            .unwrap()
    };
    // A data directory holding another session, and none at all.
    let other = planner_svc()
        .current_dir(dir.path())
        .args([
            "run",
            "--yes",
            "--data-dir",
            "data",
            "--latency-ms",
            "1",
            "search",
        ])
        .output()
        .unwrap();
    assert!(other.status.success());
    for data in ["data", "nothing-here"] {
        let output = run(data);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
        assert!(
            stderr.contains("no session does-not-exist")
                && stderr.contains(&format!("planner-svc sessions --data-dir {data}")),
            "{stderr}"
        );
        assert!(!stdout.contains("planned"), "{stdout}");
    }
    assert!(!dir.path().join("nothing-here").exists());
    let sessions = planner_svc()
        .current_dir(dir.path())
        .args(["sessions", "--data-dir", "data"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&sessions.stdout).contains("does-not-exist"));
}

/// `replay --data-dir planner-dat` (a typo) said "no events for session" as if the directory
/// were a store, and `sessions` listed nothing and exited 0: a missing data directory is an
/// error naming it, and is not created.
#[test]
fn replay_and_sessions_of_a_missing_data_dir_say_so() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["replay", "--data-dir", "planner-dat", "s1"][..],
        &["sessions", "--data-dir", "planner-dat"][..],
    ] {
        let output = planner_svc()
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no data directory planner-dat"),
            "{args:?}: {stderr}"
        );
        assert!(!dir.path().join("planner-dat").exists(), "{args:?}");
    }
}

/// When piped, a question's auto-answer could print before the result that led to it: the
/// executor's report published the question before its events reached the printer.
#[test]
fn run_prints_each_result_before_what_it_led_to() {
    let dir = tempfile::tempdir().unwrap();
    // A race: a few runs, each of which used to lose it about every other time.
    for _ in 0..6 {
        let output = planner_svc()
            .current_dir(dir.path())
            .args(["run", "--yes", "--data-dir", "data", "--latency-ms", "1"])
            .arg("1. search for flights\n2. Which date suits you?\n3. summarize the options")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");
        let line = |prefix: &str| {
            stdout
                .lines()
                .position(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in:\n{stdout}"))
        };
        assert!(
            line("<- t1 completed") < line("?  Which date suits you?"),
            "{stdout}"
        );
        assert!(line("<- t2 answered") < line("-> t3 attempt 1"), "{stdout}");
    }
}

/// An error with an OS cause printed it twice: `Not a directory (os error 20): Not a directory
/// (os error 20)`.
#[test]
fn an_os_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    let output = planner_svc()
        .current_dir(dir.path())
        .args(["run", "--yes", "--data-dir", "a-file/data", "search"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("(os error 20)").count(), 1, "{stderr}");
    assert!(stderr.contains("a-file/data"), "{stderr}");
}

/// `run … | head` ended with `Broken pipe (os error 32)` (and `replay … | head` panicked): a
/// reader that stops reading ends the command quietly.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let steps: Vec<String> = (1..=40).map(|i| format!("{i}. fetch page {i}")).collect();
    let run = planner_svc()
        .current_dir(dir.path())
        .args(["run", "--yes", "--data-dir", "data", "--latency-ms", "1"])
        .arg(steps.join("\n"))
        .output()
        .unwrap();
    assert!(run.status.success());
    let session = String::from_utf8_lossy(&run.stdout)
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("session "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_owned();
    let requests = [
        vec!["run", "--yes", "--data-dir", "data", "--latency-ms", "20"]
            .into_iter()
            .map(str::to_owned)
            .chain([steps.join("\n")])
            .collect::<Vec<_>>(),
        ["replay", "--data-dir", "data", &session]
            .map(str::to_owned)
            .to_vec(),
        ["replay", "--json", "--data-dir", "data", &session]
            .map(str::to_owned)
            .to_vec(),
    ];
    for args in requests {
        let mut child = planner_svc()
            .current_dir(dir.path())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Like `head -n 1`: read a line, then close the pipe.
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{args:?}: {:?}\n{stderr}",
            output.status
        );
        assert!(
            !stderr.contains("Broken pipe") && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}

/// Logs written into a pipe or a file carried ANSI colour codes.
#[test]
fn logs_have_no_colours_when_stderr_is_not_a_terminal() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = planner_svc()
        .args(["serve"])
        .env("PLANNER_NATS__URL", format!("nats://127.0.0.1:{port}"))
        .env("PLANNER_NATS__CONNECT_TIMEOUT_MS", "200")
        .env("PLANNER_NATS__STARTUP_WAIT_S", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NATS not reachable yet"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
}

/// Once its stderr pipe was closed, `executor` ignored SIGINT and SIGTERM: logging the signal
/// failed, and tracing's report of that failure panicked the task that was to stop the pool.
#[test]
fn executor_stops_on_sigterm_with_its_stderr_closed() {
    use std::io::BufRead as _;
    let server = planner_testkit::NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _daemon = Spawned::start(planner_svc().current_dir(dir.path()).args([
        "serve",
        "--nats-url",
        &server.url(),
    ]));
    assert!(serving(&server.url()), "planner-svc serve did not start");
    let mut executor = planner_svc()
        .args(["executor", "--nats-url", &server.url()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(executor.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("executor pool running") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "executor ended");
    }
    drop(stderr);
    for signal in ["-TERM", "-INT"] {
        let _ = Command::new("kill")
            .args([signal, &executor.id().to_string()])
            .status();
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_secs(5) {
            if executor.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let stopped = executor.try_wait().unwrap();
    let _ = executor.kill();
    assert!(
        stopped.is_some_and(|status| status.success()),
        "still running 10 s after SIGTERM and SIGINT, or failed: {stopped:?}"
    );
}

/// `sessions` listed every session, oldest first, with no way to find one: it now filters by
/// status and by request text (any case), newest first, at most `--limit`.
#[test]
fn sessions_filter_by_status_and_text_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for request in [
        "search for FLIGHTS",
        "search for hotels",
        "book the flights",
    ] {
        let run = planner_svc()
            .current_dir(dir.path())
            .args(["run", "--yes", "--data-dir", "data", "--latency-ms", "1"])
            .arg(request)
            .output()
            .unwrap();
        assert!(run.status.success(), "{run:?}");
        let stdout = String::from_utf8_lossy(&run.stdout);
        let id = stdout.split_whitespace().nth(1).unwrap().to_owned();
        ids.push(id);
        // Distinct start times, to the millisecond.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let sessions = |args: &[&str]| -> Vec<String> {
        let output = planner_svc()
            .current_dir(dir.path())
            .args(["sessions", "--data-dir", "data"])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.split('\t').next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        sessions(&[]),
        [ids[2].clone(), ids[1].clone(), ids[0].clone()],
        "newest first"
    );
    assert_eq!(
        sessions(&["--search", "Flights"]),
        [ids[2].clone(), ids[0].clone()]
    );
    assert_eq!(
        sessions(&[
            "--search",
            "flights",
            "--status",
            "completed",
            "--limit",
            "1"
        ]),
        [ids[2].clone()]
    );
    assert!(sessions(&["--status", "failed"]).is_empty());
    let bad = planner_svc()
        .current_dir(dir.path())
        .args(["sessions", "--data-dir", "data", "--status", "done"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("running"), "names the statuses: {stderr}");
}
