//! The client commands (`submit`, `watch`, `answer`, `cancel`), spawned as a user runs them,
//! against a real nats-server, the daemon and an executor pool.

use std::process::{Command, Output};
use std::time::Duration;

use planner_core::Event;
use planner_store::EventStore;
use planner_testkit::NatsServer;

use crate::harness::{self, Daemon, ExecutorBehaviour, Executors};

/// Runs `planner-svc <args> --nats-url <url>` to its end, off the runtime's threads.
pub(crate) async fn cli(url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_planner-svc"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(args)
        .args(["--nats-url", url])
        .stdin(std::process::Stdio::null());
    tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap()
}

pub(crate) fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The position of the first line of `out` starting with `prefix`.
fn line(out: &str, prefix: &str) -> usize {
    out.lines()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{out}"))
}

async fn submit(url: &str, request: &str) -> String {
    let output = cli(url, &["submit", request]).await;
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("planner-svc watch"), "{stderr}");
    stdout.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_then_watch_follows_a_session_to_its_end() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(harness::config(&server)).await;
    let _executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;

    let session = submit(&server.url(), "search for flights, then summarize them").await;
    assert_eq!(session.len(), 32, "the new session's id alone: {session:?}");
    let watch = cli(&server.url(), &["watch", &session]).await;
    let (out, err) = text(&watch);
    assert!(watch.status.success(), "{out}\n{err}");
    // Piped: plain lines, in the order things happened, ending with the outcome.
    assert!(!out.contains('\u{1b}'), "{out:?}");
    assert!(line(&out, "planned 2 tasks") < line(&out, "-> t1 attempt 1 to web_search"));
    assert!(
        line(&out, "-> t1 attempt 1") < line(&out, "<- t1 completed"),
        "{out}"
    );
    assert!(
        line(&out, "<- t1 completed") < line(&out, "-> t2 attempt 1"),
        "{out}"
    );
    assert!(
        line(&out, "<- t2 completed") < line(&out, "plan completed"),
        "{out}"
    );
    assert!(
        out.contains(&format!("session {session}: completed")),
        "{out}"
    );

    // Submitting with a plan file runs that plan.
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"tasks": [{"id": "fetch", "description": "fetch the prices", "kind": "tool_call", "target": "http_fetch", "dependencies": []}]}"#,
    )
    .unwrap();
    let output = cli(
        &server.url(),
        &[
            "submit",
            "--watch",
            "--plan",
            plan.to_str().unwrap(),
            "get prices",
        ],
    )
    .await;
    let (out, err) = text(&output);
    assert!(output.status.success(), "{out}\n{err}");
    assert!(out.contains("-> fetch attempt 1 to http_fetch"), "{out}");
    assert!(out.contains("plan completed"), "{out}");

    // A session nobody started is an error, not a wait for ever.
    let output = cli(&server.url(), &["watch", "nobody-here"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output).1.contains("no session nobody-here"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_answered_with_answer_and_a_plan_cancelled_with_cancel() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(harness::config(&server)).await;
    let _executors = Executors::start(&server.url(), ExecutorBehaviour::default()).await;
    let store = harness::store(&server.url()).await;

    let session = submit(
        &server.url(),
        "1. search for flights\n2. Which date suits you?\n3. summarize the options",
    )
    .await;
    // Wait for the question, as a user waits for `watch` to show it.
    let mut asked = false;
    for _ in 0..200 {
        let events = store.load_all(&session).await.unwrap();
        if events
            .iter()
            .any(|e| matches!(e, Event::ClarificationRequested { .. }))
        {
            asked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(asked, "the question was never asked");
    // An answer to a task that asked nothing is refused, saying why.
    let wrong = cli(&server.url(), &["answer", &session, "t9", "whenever"]).await;
    assert_eq!(wrong.status.code(), Some(1));
    assert!(text(&wrong).1.contains("t9"), "{}", text(&wrong).1);

    let answer = cli(&server.url(), &["answer", &session, "t2", "next", "Friday"]).await;
    assert!(answer.status.success(), "{}", text(&answer).1);
    let watch = cli(&server.url(), &["watch", &session]).await;
    let (out, err) = text(&watch);
    assert!(watch.status.success(), "{out}\n{err}");
    assert!(line(&out, "?  t2: Which date suits you?") < line(&out, "<- t2 answered: next Friday"));
    assert!(
        line(&out, "<- t2 answered") < line(&out, "-> t3 attempt 1"),
        "{out}"
    );
    assert!(out.contains("plan completed"), "{out}");

    // Cancel: a session waiting on a question ends cancelled, and `watch` says so (exit 1).
    let waiting = submit(
        &server.url(),
        "Which date suits you? then search for flights",
    )
    .await;
    let cancel = cli(
        &server.url(),
        &["cancel", &waiting, "--reason", "changed my mind"],
    )
    .await;
    assert!(cancel.status.success(), "{}", text(&cancel).1);
    let watch = cli(&server.url(), &["watch", &waiting]).await;
    let (out, _) = text(&watch);
    assert_eq!(watch.status.code(), Some(1), "{out}");
    assert!(out.contains("plan cancelled"), "{out}");
    assert!(
        out.contains(&format!("session {waiting}: cancelled")),
        "{out}"
    );
    daemon.stop().await;
}

/// With no daemon, a client command says to start one instead of a raw "no responders".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_without_a_daemon_says_to_start_serve() {
    let server = NatsServer::start().unwrap();
    let output = cli(&server.url(), &["submit", "search for flights"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output).1.contains("start `planner-svc serve` first"),
        "{}",
        text(&output).1
    );
}
