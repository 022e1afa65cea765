//! The CLI on a pseudo-terminal, as a person at a keyboard uses it: questions asked at a
//! prompt and answered by typing, Ctrl-C pressed (the terminal's ^C, which the kernel turns
//! into SIGINT for the foreground process group, not a `kill` aimed at one process).

use std::path::Path;
use std::time::Duration;

use expectrl::process::unix::WaitStatus;
use expectrl::session::OsSession as Session;
use expectrl::{ControlCode, Expect as _, Regex};
use planner_testkit::NatsServer;

use crate::harness::{self, Daemon, ExecutorBehaviour, Executors};
use crate::support::planner_svc;

/// `planner-svc` with `args` in `dir`, on a fresh pseudo-terminal.
fn on_a_terminal(dir: &Path, args: &[&str]) -> Session {
    let mut command = planner_svc();
    command.current_dir(dir).env("TERM", "dumb").args(args);
    let mut session = Session::spawn(command).unwrap();
    session.set_expect_timeout(Some(Duration::from_secs(30)));
    session
}

/// The session id from the first line `run` prints.
fn session_id(terminal: &mut Session) -> String {
    let found = terminal
        .expect(Regex("session ([0-9a-f]{32}) \\(events in"))
        .unwrap();
    String::from_utf8(found.get(1).unwrap().to_vec()).unwrap()
}

/// Presses Ctrl-C and checks the run says how to resume `session` and exits 130.
fn interrupt(mut terminal: Session, session: &str) {
    terminal.send(ControlCode::EndOfText).unwrap();
    terminal
        .expect(format!(
            "interrupted: resume with `planner-svc run --session {session} --data-dir data`"
        ))
        .unwrap();
    let status = terminal.get_process().wait().unwrap();
    assert!(
        matches!(status, WaitStatus::Exited(_, 130)),
        "Ctrl-C ends the run with 130: {status:?}"
    );
}

/// Waits for the end of a run: `plan completed`, then exit 0.
fn completes(mut terminal: Session) {
    terminal.expect("plan completed").unwrap();
    terminal.expect(expectrl::Eof).unwrap();
    let status = terminal.get_process().wait().unwrap();
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "a completed plan exits 0: {status:?}"
    );
}

/// Ctrl-C while a (slow) task runs: the run says how to resume; `run --session <id>` sends the
/// interrupted task again and finishes the plan.
#[test]
fn ctrl_c_at_a_running_task_then_resume_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = on_a_terminal(
        dir.path(),
        &[
            "run",
            "--data-dir",
            "data",
            "--latency-ms",
            "4000",
            "1. search for flights\n2. summarize the options",
        ],
    );
    let session = session_id(&mut first);
    first.expect("-> t1 attempt 1 to").unwrap();
    // Let its executor claim it: the resumed run must give that attempt up and send another.
    std::thread::sleep(Duration::from_millis(500));
    interrupt(first, &session);

    let mut resumed = on_a_terminal(
        dir.path(),
        &[
            "run",
            "--data-dir",
            "data",
            "--latency-ms",
            "20",
            "--session",
            &session,
        ],
    );
    resumed
        .expect(format!("session {session} (events in data)"))
        .unwrap();
    resumed.expect(Regex("-> t1 attempt [12] to")).unwrap();
    resumed.expect("<- t1 completed").unwrap();
    resumed.expect("<- t2 completed").unwrap();
    completes(resumed);
}

/// Ctrl-C at a question's prompt: the resumed run asks the question again, and the answer typed
/// at the terminal reaches the plan, which finishes.
#[test]
fn ctrl_c_at_a_question_then_resume_and_answer_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let request = "1. search for flights\n2. Which date suits you?\n3. summarize the options";
    let mut first = on_a_terminal(
        dir.path(),
        &["run", "--data-dir", "data", "--latency-ms", "20", request],
    );
    let session = session_id(&mut first);
    first.expect("?  Which date suits you? > ").unwrap();
    interrupt(first, &session);

    let mut resumed = on_a_terminal(
        dir.path(),
        &["run", "--data-dir", "data", "--session", &session],
    );
    resumed.expect("?  Which date suits you? > ").unwrap();
    resumed.send_line("next Friday").unwrap();
    resumed.expect("<- t2 answered: next Friday").unwrap();
    resumed.expect("<- t3 completed").unwrap();
    completes(resumed);
}

/// `planner-svc <args> --nats-url <url>` on a fresh pseudo-terminal that can redraw (TERM is
/// not `dumb`), so `watch` shows its live view; `env` is added to its environment.
fn client_on_a_terminal(url: &str, args: &[&str], env: &[(&str, &str)]) -> Session {
    let mut command = planner_svc();
    command
        .env("TERM", "xterm")
        .envs(env.iter().copied())
        .args(args)
        .args(["--nats-url", url]);
    let mut session = Session::spawn(command).unwrap();
    session.set_expect_timeout(Some(Duration::from_secs(30)));
    session
}

/// Everything the terminal showed up to and including `needle`'s match.
fn shown<N: expectrl::Needle>(terminal: &mut Session, needle: N) -> String {
    let found = terminal.expect(needle).unwrap();
    let mut text = String::from_utf8_lossy(found.before()).into_owned();
    text.push_str(&String::from_utf8_lossy(found.get(0).unwrap_or_default()));
    text
}

/// Waits for the process to end with `code`.
fn exits_with(mut terminal: Session, code: i32) {
    terminal.expect(expectrl::Eof).unwrap();
    let status = terminal.get_process().wait().unwrap();
    assert!(
        matches!(status, WaitStatus::Exited(_, c) if c == code),
        "expected exit {code}: {status:?}"
    );
}

/// `submit --watch` on a terminal: a line per task with its state (queued, running with a
/// spinner, done), coloured, and an overall line, redrawn in place; then the outcome as lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_a_terminal_shows_tasks_live_then_the_outcome() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(harness::config(&server)).await;
    let behaviour = ExecutorBehaviour {
        delay: Duration::from_millis(1500),
        ..ExecutorBehaviour::default()
    };
    let _executors = Executors::start(&server.url(), behaviour).await;
    let url = server.url();
    tokio::task::spawn_blocking(move || {
        let mut terminal = client_on_a_terminal(
            &url,
            &[
                "submit",
                "--watch",
                "search for flights, then summarize them",
            ],
            &[],
        );
        // Colours by default: the state words in theirs.
        shown(&mut terminal, Regex("t1 +\u{1b}\\[36mrunning"));
        // t2 waits on t1.
        shown(&mut terminal, Regex("t2 +\u{1b}\\[2mqueued"));
        shown(&mut terminal, "0/2 done, 1 running, 1 queued");
        shown(&mut terminal, Regex("t1 +\u{1b}\\[32mdone"));
        shown(&mut terminal, Regex("t2 +\u{1b}\\[36mrunning"));
        shown(&mut terminal, Regex("t2 +\u{1b}\\[32mdone"));
        shown(&mut terminal, "2/2 done");
        // The outcome, as plain lines under the view.
        shown(&mut terminal, "plan completed");
        shown(&mut terminal, Regex("session [0-9a-f]{32}: completed"));
        exits_with(terminal, 0);
    })
    .await
    .unwrap();
    daemon.stop().await;
}

/// A question asked by `watch` on a terminal: the view is taken off the screen while the
/// prompt waits (nothing is drawn over it or the typing), the typed answer reaches the plan,
/// and the view comes back under it. NO_COLOR: no colours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_a_terminal_asks_a_question_at_a_quiet_prompt() {
    let server = NatsServer::start().unwrap();
    let daemon = Daemon::start(harness::config(&server)).await;
    let behaviour = ExecutorBehaviour {
        delay: Duration::from_millis(300),
        ..ExecutorBehaviour::default()
    };
    let _executors = Executors::start(&server.url(), behaviour).await;
    let url = server.url();
    tokio::task::spawn_blocking(move || {
        let mut terminal = client_on_a_terminal(
            &url,
            &[
                "submit",
                "--watch",
                "1. search for flights\n2. Which date suits you?\n3. summarize the options",
            ],
            &[("NO_COLOR", "1")],
        );
        let mut seen = shown(&mut terminal, Regex("t1 +running"));
        seen += &shown(&mut terminal, "?  t2: Which date suits you? > ");
        // The prompt waits: no spinner, no elapsed time drawn over it.
        std::thread::sleep(Duration::from_millis(800));
        let mut buf = [0u8; 256];
        match terminal.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!(
                "drawn over the prompt: {other:?} {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
        terminal.send_line("next Friday").unwrap();
        seen += &shown(&mut terminal, Regex("t2 +done +next Friday"));
        seen += &shown(&mut terminal, Regex("t3 +done"));
        seen += &shown(&mut terminal, "3/3 done");
        seen += &shown(&mut terminal, "plan completed");
        seen += &shown(&mut terminal, Regex("session [0-9a-f]{32}: completed"));
        assert!(!seen.contains("\u{1b}[32m"), "NO_COLOR: {seen:?}");
        exits_with(terminal, 0);
    })
    .await
    .unwrap();
    daemon.stop().await;
}
