//! What the operator commands print about sessions: the summary of `replay` and the table of
//! `sessions`. Pure functions of a session's events and the time, so that they are tested
//! without a store.

use std::io::Write;

use planner_core::{Event, FailureReason, PlanPhase, Planner, PlannerState, TaskStatus, Timestamp};

use crate::embedded::count;

/// One line of `sessions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The session id.
    pub session: String,
    /// Where its plan is: `running`, `asking` (waiting for an answer), `completed`,
    /// `failed`, `cancelled`, `not-started` (one of [`STATUSES`]).
    pub status: String,
    /// When its first event was recorded.
    pub started: Option<Timestamp>,
    /// Its first request on one line, with how many follow-ups came after it.
    pub request: String,
    /// Every request of the session, lowercased: what `--search` looks in.
    searched: String,
}

/// The statuses a session row can have, in the order a plan goes through them.
pub const STATUSES: [&str; 6] = [
    "not-started",
    "running",
    "asking",
    "completed",
    "failed",
    "cancelled",
];

/// Which sessions `sessions` lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Only sessions with this status (one of [`STATUSES`]).
    pub status: Option<String>,
    /// Only sessions one of whose requests contains this text, ignoring case.
    pub search: Option<String>,
    /// At most this many, the newest.
    pub limit: Option<usize>,
}

/// The rows `filter` keeps, newest first (sessions with no start time last, then by id).
pub fn select(mut rows: Vec<SessionRow>, filter: &SessionFilter) -> Vec<SessionRow> {
    let search = filter.search.as_deref().map(str::to_lowercase);
    rows.retain(|row| {
        filter.status.as_ref().is_none_or(|s| *s == row.status)
            && search
                .as_ref()
                .is_none_or(|s| row.searched.contains(s.as_str()))
    });
    rows.sort_by(|a, b| {
        b.started
            .cmp(&a.started)
            .then_with(|| a.session.cmp(&b.session))
    });
    if let Some(limit) = filter.limit {
        rows.truncate(limit);
    }
    rows
}

impl SessionRow {
    /// The row of `session`, from its events.
    pub fn new(session: &str, events: &[Event]) -> SessionRow {
        let planner = Planner::fold(events);
        let state = planner.state();
        let started = events.iter().find_map(|event| match event {
            Event::SessionStarted { at, .. } | Event::RequestReceived { at, .. } => Some(*at),
            _ => None,
        });
        let mut request = state
            .requests
            .first()
            .map(|r| one_line(r))
            .unwrap_or_default();
        if state.requests.len() > 1 {
            let more = state.requests.len() - 1;
            request.push_str(&format!(" (+{})", count(more, "follow-up")));
        }
        SessionRow {
            session: session.to_owned(),
            status: status(state),
            started,
            request,
            searched: state
                .requests
                .iter()
                .map(|r| one_line(r).to_lowercase())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// Writes `rows`: on a terminal, aligned columns under a header, requests cut to fit; else one
/// line per session, its fields tab-separated, nothing cut (for `cut`, `awk`, `grep`).
pub fn print_sessions(
    out: &mut dyn Write,
    rows: &[SessionRow],
    now: Timestamp,
    terminal: bool,
) -> std::io::Result<()> {
    let age = |row: &SessionRow| row.started.map_or_else(|| "-".to_owned(), |t| ago(t, now));
    if !terminal {
        for row in rows {
            writeln!(
                out,
                "{}\t{}\t{}\t{}",
                row.session,
                row.status,
                age(row),
                row.request
            )?;
        }
        return Ok(());
    }
    let id_width = rows
        .iter()
        .map(|r| r.session.len())
        .max()
        .unwrap_or(0)
        .max(7);
    writeln!(
        out,
        "{:<id_width$}  {:<10} {:>5}  REQUEST",
        "SESSION", "STATUS", "AGE"
    )?;
    for row in rows {
        writeln!(
            out,
            "{:<id_width$}  {:<10} {:>5}  {}",
            row.session,
            row.status,
            age(row),
            cut(&row.request, 60)
        )?;
    }
    Ok(())
}

/// `replay`'s summary of a folded session, a few lines for people.
pub fn print_summary(
    out: &mut dyn Write,
    session: &str,
    state: &PlannerState,
) -> std::io::Result<()> {
    writeln!(
        out,
        "session {session}: {} (version {})",
        phase_text(&state.phase),
        state.version
    )?;
    let mut by_status: Vec<String> = Vec::new();
    for (status, name) in [
        (TaskStatus::Completed, "completed"),
        (TaskStatus::Running, "running"),
        (TaskStatus::NeedsClarification, "waiting for an answer"),
        (TaskStatus::Planned, "planned"),
        (TaskStatus::Failed, "failed"),
        (TaskStatus::Cancelled, "cancelled"),
    ] {
        let ids: Vec<&str> = state
            .tasks
            .iter()
            .filter(|t| t.status == status)
            .map(|t| t.id.as_str())
            .collect();
        // Completed tasks are counted; the others are named too, as those are looked for.
        match (ids.len(), status == TaskStatus::Completed) {
            (0, _) => {}
            (n, true) => by_status.push(format!("{n} {name}")),
            (n, false) => by_status.push(format!("{n} {name} ({})", ids.join(", "))),
        }
    }
    if by_status.is_empty() {
        writeln!(out, "  no tasks")?;
    } else {
        writeln!(
            out,
            "  {}: {}",
            count(state.tasks.len(), "task"),
            by_status.join(", ")
        )?;
    }
    let dispatches = if state.usage.dispatches == 1 {
        "dispatch"
    } else {
        "dispatches"
    };
    writeln!(
        out,
        "  {} {dispatches}, {} tokens",
        state.usage.dispatches, state.usage.tokens
    )
}

fn status(state: &PlannerState) -> String {
    match &state.phase {
        PlanPhase::Running if !state.awaiting_answer.is_empty() => "asking".to_owned(),
        PlanPhase::Running => "running".to_owned(),
        PlanPhase::NotStarted => "not-started".to_owned(),
        PlanPhase::Completed => "completed".to_owned(),
        PlanPhase::Failed { .. } => "failed".to_owned(),
        PlanPhase::Cancelled => "cancelled".to_owned(),
    }
}

fn phase_text(phase: &PlanPhase) -> String {
    match phase {
        PlanPhase::Failed { reason } => match reason {
            FailureReason::TaskFailed { task_id } => format!("failed ({task_id} failed)"),
            FailureReason::TasksFailed { task_ids } => {
                let ids: Vec<&str> = task_ids.iter().map(|t| t.as_str()).collect();
                format!("failed ({} failed)", ids.join(", "))
            }
            FailureReason::BudgetExceeded {
                budget,
                limit,
                used,
            } => format!("failed (over the {budget:?} budget: {used} of {limit})"),
        },
        PlanPhase::NotStarted => "not started".to_owned(),
        PlanPhase::Running => "running".to_owned(),
        PlanPhase::Completed => "completed".to_owned(),
        PlanPhase::Cancelled => "cancelled".to_owned(),
    }
}

/// How long before `now` `then` was, in the largest unit: `45s`, `12m`, `3h`, `2d`.
pub fn ago(then: Timestamp, now: Timestamp) -> String {
    let s = now.as_millis().saturating_sub(then.as_millis()) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m", s / 60),
        3_600..=86_399 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let kept: String = text.chars().take(width.saturating_sub(1)).collect();
    format!("{kept}…")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use planner_core::Command;

    fn session(input: &str, follow_up: Option<&str>) -> Vec<Event> {
        let mut planner = Planner::new();
        let mut events = Vec::new();
        for (i, request) in std::iter::once(input).chain(follow_up).enumerate() {
            events.extend(
                planner
                    .process(Command::Initialize {
                        request_id: None,
                        planning: None,
                        input: request.into(),
                        attachments: vec![],
                        plan: None,
                        now: Timestamp(1_000 + i as u64),
                    })
                    .unwrap(),
            );
        }
        events
    }

    fn text(f: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> String {
        let mut out = Vec::new();
        f(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn sessions_piped_are_tab_separated_lines_with_status_age_and_request() {
        let rows = [
            SessionRow::new(
                "s1",
                &session("1. search for flights\n2. summarize them", None),
            ),
            SessionRow::new("s2", &session("search", Some("then book"))),
        ];
        let now = Timestamp(1_000 + 90_000);
        assert_eq!(
            text(|out| print_sessions(out, &rows, now, false)),
            "s1\trunning\t1m\t1. search for flights 2. summarize them\n\
             s2\trunning\t1m\tsearch (+1 follow-up)\n"
        );
        let table = text(|out| print_sessions(out, &rows, now, true));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("SESSION") && lines[0].ends_with("REQUEST"));
        assert!(
            lines[2].starts_with("s2       running       1m  search"),
            "{table}"
        );
    }

    #[test]
    fn sessions_are_filtered_by_status_and_request_text_newest_first() {
        let at = |mut events: Vec<Event>, ms: u64| {
            for event in &mut events {
                if let Event::SessionStarted { at, .. } | Event::RequestReceived { at, .. } = event
                {
                    *at = Timestamp(ms);
                }
            }
            events
        };
        let mut cancelled = session("search for hotels", None);
        cancelled.extend(
            Planner::fold(&cancelled)
                .process(Command::Cancel {
                    target: planner_core::CancelTarget::Plan,
                    reason: None,
                    now: Timestamp(5_000),
                })
                .unwrap(),
        );
        let rows = vec![
            SessionRow::new("old", &at(session("Search for FLIGHTS", None), 1_000)),
            SessionRow::new("cancelled", &at(cancelled, 2_000)),
            SessionRow::new("new", &at(session("book", Some("then the flights")), 3_000)),
        ];
        let ids = |filter: SessionFilter| -> Vec<String> {
            select(rows.clone(), &filter)
                .into_iter()
                .map(|r| r.session)
                .collect()
        };
        assert_eq!(ids(SessionFilter::default()), ["new", "cancelled", "old"]);
        let search = |text: &str| SessionFilter {
            search: Some(text.into()),
            ..SessionFilter::default()
        };
        // Any request of the session, whatever the case.
        assert_eq!(ids(search("flights")), ["new", "old"]);
        assert_eq!(ids(search("HOTELS")), ["cancelled"]);
        assert!(ids(search("trains")).is_empty());
        let status = |s: &str| SessionFilter {
            status: Some(s.into()),
            ..SessionFilter::default()
        };
        assert_eq!(ids(status("cancelled")), ["cancelled"]);
        assert_eq!(ids(status("running")), ["new", "old"]);
        assert!(ids(status("completed")).is_empty());
        let newest = SessionFilter {
            status: Some("running".into()),
            search: Some("flights".into()),
            limit: Some(1),
        };
        assert_eq!(ids(newest), ["new"]);
    }

    #[test]
    fn the_replay_summary_names_the_tasks_not_done() {
        let events = session("1. search for flights\n2. summarize the options", None);
        let state = Planner::fold(&events).state().clone();
        assert_eq!(
            text(|out| print_summary(out, "s1", &state)),
            "session s1: running (version 4)\n  2 tasks: 1 running (t1), 1 planned (t2)\n  1 dispatch, 0 tokens\n"
        );
    }

    #[test]
    fn ages_use_the_largest_unit() {
        for (ms, expected) in [
            (0, "0s"),
            (59_999, "59s"),
            (60_000, "1m"),
            (7_200_000, "2h"),
            (3 * 86_400_000, "3d"),
        ] {
            assert_eq!(ago(Timestamp(5), Timestamp(5 + ms)), expected);
        }
        assert_eq!(ago(Timestamp(10), Timestamp(5)), "0s", "a clock behind");
    }
}
