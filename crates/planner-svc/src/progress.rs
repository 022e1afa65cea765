//! The live view of `watch` on a terminal: one line per task with its state (a spinner on the
//! running ones) and an overall line (done/total, elapsed), redrawn as the session goes.
//!
//! What the lines say is decided by pure functions of the folded state ([`task_lines`],
//! [`render_task`], [`overall_line`]), tested below; [`LiveView`] only hands them to
//! `indicatif`, which draws and redraws them in place. Piped, `watch` prints plain lines
//! instead and never comes here.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use planner_core::{PlannerState, Task, TaskStatus};

/// A task's state as the view shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// Not dispatched yet (waiting for its dependencies, a slot or a retry's backoff).
    Queued,
    /// Dispatched and not finished.
    Running,
    /// Completed.
    Done,
    /// Failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
    /// Waiting for a person's answer.
    Asking,
}

impl Shown {
    /// How `task` is shown.
    pub fn of(task: &Task) -> Shown {
        match task.status {
            TaskStatus::Planned => Shown::Queued,
            TaskStatus::Running => Shown::Running,
            TaskStatus::Completed => Shown::Done,
            TaskStatus::NeedsClarification => Shown::Asking,
            TaskStatus::Failed => Shown::Failed,
            TaskStatus::Cancelled => Shown::Cancelled,
        }
    }

    /// The word on the task's line.
    pub const fn word(self) -> &'static str {
        match self {
            Shown::Queued => "queued",
            Shown::Running => "running",
            Shown::Done => "done",
            Shown::Failed => "failed",
            Shown::Cancelled => "cancelled",
            Shown::Asking => "asking",
        }
    }

    /// The mark before the line (the running ones get a spinner instead).
    const fn mark(self) -> &'static str {
        match self {
            Shown::Queued => "·",
            Shown::Running => "~",
            Shown::Done => "✓",
            Shown::Failed => "✗",
            Shown::Cancelled => "-",
            Shown::Asking => "?",
        }
    }

    /// The ANSI colour of the word (SGR parameters).
    const fn colour(self) -> &'static str {
        match self {
            Shown::Queued => "2",
            Shown::Running => "36",
            Shown::Done => "32",
            Shown::Failed => "31",
            Shown::Cancelled => "33",
            Shown::Asking => "1;35",
        }
    }
}

/// One task's line, before it is drawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLine {
    /// The task.
    pub id: String,
    /// Its state.
    pub shown: Shown,
    /// What follows the state: what it does, its output, its error or its question.
    pub detail: String,
}

/// The lines of `state`'s tasks, in plan order. `answer_hint` is the session when questions
/// are not asked here: the asking lines then say how to answer them.
pub fn task_lines(state: &PlannerState, answer_hint: Option<&str>) -> Vec<TaskLine> {
    state
        .tasks
        .iter()
        .map(|task| {
            let shown = Shown::of(task);
            let detail = match shown {
                Shown::Queued if task.failures > 0 => format!(
                    "{}: retry after {}: {}",
                    task.target,
                    plural(task.failures, "failure"),
                    first_line(task.error.as_deref().unwrap_or(""))
                ),
                Shown::Queued | Shown::Cancelled => {
                    format!("{}: {}", task.target, first_line(&task.description))
                }
                Shown::Running if task.attempts > 1 => format!(
                    "{}: {} (attempt {})",
                    task.target,
                    first_line(&task.description),
                    task.attempts
                ),
                Shown::Running => format!("{}: {}", task.target, first_line(&task.description)),
                Shown::Done => first_line(task.output.as_deref().unwrap_or("")).to_owned(),
                Shown::Failed => first_line(task.error.as_deref().unwrap_or("")).to_owned(),
                Shown::Asking => {
                    let question = first_line(
                        task.question
                            .as_deref()
                            .unwrap_or(task.description.as_str()),
                    );
                    match answer_hint {
                        Some(session) => format!(
                            "{question} (answer with `planner-svc answer {session} {} <answer>`)",
                            task.id
                        ),
                        None => question.to_owned(),
                    }
                }
            };
            TaskLine {
                id: task.id.to_string(),
                shown,
                detail,
            }
        })
        .collect()
}

/// `line` as drawn after its mark, the id padded to `id_width`; the state word in its colour
/// when `colour`.
pub fn render_task(line: &TaskLine, id_width: usize, colour: bool) -> String {
    let word = format!("{:<9}", line.shown.word());
    let word = if colour {
        format!("\u{1b}[{}m{word}\u{1b}[0m", line.shown.colour())
    } else {
        word
    };
    format!("{:<id_width$} {word} {}", line.id, line.detail)
        .trim_end()
        .to_owned()
}

/// The overall line (the elapsed time is drawn after it): `2/5 done`, then how many tasks are
/// in each other state that has any.
pub fn overall_line(state: &PlannerState) -> String {
    let count = |shown: Shown| state.tasks.iter().filter(|t| Shown::of(t) == shown).count();
    let mut text = format!("{}/{} done", count(Shown::Done), state.tasks.len());
    for shown in [
        Shown::Running,
        Shown::Asking,
        Shown::Queued,
        Shown::Failed,
        Shown::Cancelled,
    ] {
        let n = count(shown);
        if n > 0 {
            text.push_str(&format!(", {n} {}", shown.word()));
        }
    }
    text
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn plural(n: u32, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// How often spinners turn (and the elapsed time is redrawn).
const TICK: Duration = Duration::from_millis(120);

/// The bars on the terminal: one per task, and the overall one under them.
#[derive(Debug)]
pub struct LiveView {
    multi: MultiProgress,
    overall: ProgressBar,
    /// The bar of each task shown, in plan order, with the state it shows.
    tasks: Vec<(ProgressBar, Shown)>,
    answer_hint: Option<String>,
    colour: bool,
    paused: bool,
}

impl LiveView {
    /// A view drawn on standard output. `answer_hint`: the session, when its questions are not
    /// asked here. With `colour` false, no escape sequence other than cursor movement is drawn.
    pub fn new(answer_hint: Option<String>, colour: bool) -> LiveView {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let overall = multi.add(ProgressBar::new_spinner());
        overall.set_style(style(if colour {
            "{spinner:.bold} {msg:.bold} · {elapsed_precise}"
        } else {
            "{spinner} {msg} · {elapsed_precise}"
        }));
        overall.set_message("waiting for the plan");
        overall.enable_steady_tick(TICK);
        LiveView {
            multi,
            overall,
            tasks: Vec::new(),
            answer_hint,
            colour,
            paused: false,
        }
    }

    /// Shows `state`.
    pub fn update(&mut self, state: &PlannerState) {
        let lines = task_lines(state, self.answer_hint.as_deref());
        let id_width = lines
            .iter()
            .map(|l| l.id.chars().count())
            .max()
            .unwrap_or(0);
        for (i, line) in lines.iter().enumerate() {
            if i == self.tasks.len() {
                let bar = self
                    .multi
                    .insert_before(&self.overall, ProgressBar::new_spinner());
                bar.set_style(task_style(line.shown, self.colour));
                bar.set_prefix(line.shown.mark());
                if line.shown == Shown::Running {
                    bar.enable_steady_tick(TICK);
                }
                self.tasks.push((bar, line.shown));
            }
            let Some((bar, shown)) = self.tasks.get_mut(i) else {
                continue;
            };
            if *shown != line.shown {
                bar.set_style(task_style(line.shown, self.colour));
                bar.set_prefix(line.shown.mark());
                if line.shown == Shown::Running {
                    bar.enable_steady_tick(TICK);
                } else {
                    bar.disable_steady_tick();
                }
                *shown = line.shown;
            }
            bar.set_message(render_task(line, id_width, self.colour));
        }
        self.overall.set_message(overall_line(state));
    }

    /// Takes the bars off the screen until [`LiveView::resume`], for a prompt: nothing is
    /// drawn meanwhile, so the prompt and what is typed at it stay as they are.
    pub fn pause(&mut self) {
        if !self.paused {
            let _ = self.multi.clear();
            self.multi.set_draw_target(ProgressDrawTarget::hidden());
            self.paused = true;
        }
    }

    /// Draws the bars again, under whatever was printed while they were paused.
    pub fn resume(&mut self) {
        if self.paused {
            self.multi.set_draw_target(ProgressDrawTarget::stdout());
            self.paused = false;
            self.overall.tick();
        }
    }

    /// Prints `line` above the bars.
    pub fn println(&self, line: &str) -> std::io::Result<()> {
        if self.paused {
            // Nothing is drawn while paused: printing above the bars means printing.
            self.multi.suspend(|| println!("{line}"));
            Ok(())
        } else {
            self.multi.println(line)
        }
    }

    /// Draws `state` one last time and leaves the lines on the screen; what is printed next
    /// goes under them.
    pub fn finish(mut self, state: &PlannerState) {
        self.resume();
        self.update(state);
        for (bar, _) in &self.tasks {
            bar.finish();
        }
        self.overall.finish();
    }
}

fn task_style(shown: Shown, colour: bool) -> ProgressStyle {
    match (shown, colour) {
        (Shown::Running, true) => style("  {spinner:.cyan} {wide_msg}"),
        (Shown::Running, false) => style("  {spinner} {wide_msg}"),
        (_, _) => style("  {prefix} {wide_msg}"),
    }
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants of this file: a bad one would show as a bare spinner.
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

#[cfg(test)]
mod tests {
    use planner_core::{NodeKind, TaskId};

    use super::*;

    fn task(id: &str, status: TaskStatus) -> Task {
        Task {
            id: TaskId(id.to_owned()),
            description: format!("do {id}\nmore"),
            kind: NodeKind::ToolCall,
            target: "web_search".to_owned(),
            status,
            attachments: Vec::new(),
            dependencies: Vec::new(),
            turn: 0,
            attempts: 1,
            failures: 0,
            started: false,
            output: None,
            error: None,
            question: None,
            answer: None,
            not_before: None,
            dispatched_at: None,
            lease: None,
            timeouts: None,
        }
    }

    fn state(tasks: Vec<Task>) -> PlannerState {
        let mut state = PlannerState::default();
        state.tasks = tasks;
        state
    }

    #[test]
    fn each_status_has_its_word_and_detail() {
        let mut done = task("t1", TaskStatus::Completed);
        done.output = Some("3 flights\nand more".to_owned());
        let mut failed = task("t2", TaskStatus::Failed);
        failed.error = Some("timeout".to_owned());
        let mut asking = task("t3", TaskStatus::NeedsClarification);
        asking.question = Some("Which date suits you?".to_owned());
        let mut retry = task("t4", TaskStatus::Planned);
        retry.failures = 1;
        retry.error = Some("boom".to_owned());
        let mut again = task("t5", TaskStatus::Running);
        again.attempts = 2;
        let state = state(vec![
            done,
            failed,
            asking,
            retry,
            again,
            task("t6", TaskStatus::Running),
            task("t7", TaskStatus::Planned),
            task("t8", TaskStatus::Cancelled),
        ]);
        let shown: Vec<(Shown, String)> = task_lines(&state, None)
            .into_iter()
            .map(|l| (l.shown, l.detail))
            .collect();
        assert_eq!(
            shown,
            vec![
                (Shown::Done, "3 flights".to_owned()),
                (Shown::Failed, "timeout".to_owned()),
                (Shown::Asking, "Which date suits you?".to_owned()),
                (
                    Shown::Queued,
                    "web_search: retry after 1 failure: boom".to_owned()
                ),
                (Shown::Running, "web_search: do t5 (attempt 2)".to_owned()),
                (Shown::Running, "web_search: do t6".to_owned()),
                (Shown::Queued, "web_search: do t7".to_owned()),
                (Shown::Cancelled, "web_search: do t8".to_owned()),
            ]
        );
        assert_eq!(
            overall_line(&state),
            "1/8 done, 2 running, 1 asking, 2 queued, 1 failed, 1 cancelled"
        );
    }

    #[test]
    fn a_question_not_asked_here_says_how_to_answer_it() {
        let mut asking = task("t2", TaskStatus::NeedsClarification);
        asking.question = Some("Which date?".to_owned());
        let lines = task_lines(&state(vec![asking]), Some("abc"));
        assert_eq!(
            lines[0].detail,
            "Which date? (answer with `planner-svc answer abc t2 <answer>`)"
        );
    }

    #[test]
    fn lines_are_aligned_and_coloured_only_when_asked() {
        let line = TaskLine {
            id: "t1".to_owned(),
            shown: Shown::Running,
            detail: "web_search: flights".to_owned(),
        };
        assert_eq!(
            render_task(&line, 4, false),
            "t1   running   web_search: flights"
        );
        let coloured = render_task(&line, 4, true);
        assert_eq!(
            coloured,
            "t1   \u{1b}[36mrunning  \u{1b}[0m web_search: flights"
        );
        let bare = TaskLine {
            detail: String::new(),
            shown: Shown::Done,
            ..line
        };
        assert_eq!(render_task(&bare, 2, false), "t1 done");
    }

    #[test]
    fn no_tasks_yet() {
        assert_eq!(overall_line(&PlannerState::default()), "0/0 done");
        assert!(task_lines(&PlannerState::default(), None).is_empty());
    }
}
