//! The CLI on a pseudo-terminal, as a person at a keyboard uses it: questions asked at a
//! prompt and answered by typing, Ctrl-C pressed (the terminal's ^C, which the kernel turns
//! into SIGINT for the foreground process group, not a `kill` aimed at one process).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use expectrl::process::unix::WaitStatus;
use expectrl::session::OsSession as Session;
use expectrl::{ControlCode, Expect as _, Regex};

/// `planner-svc` with `args` in `dir`, on a fresh pseudo-terminal.
fn on_a_terminal(dir: &Path, args: &[&str]) -> Session {
    let mut command = Command::new(env!("CARGO_BIN_EXE_planner-svc"));
    command
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERM", "dumb")
        .args(args);
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
