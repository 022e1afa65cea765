//! Claims, leases, heartbeats and attempt timeouts, as stories.

use planner_core::testing::Scenario;
use planner_core::*;

use crate::support::*;

fn claim(task: &str, attempt: u32, lease: &str, now: u64) -> Command {
    Command::ClaimAttempt {
        task_id: task.into(),
        attempt,
        lease: lease.into(),
        now: at(now),
    }
}

fn beat(task: &str, attempt: u32, lease: &str, now: u64) -> Command {
    Command::Heartbeat {
        task_id: task.into(),
        attempt,
        lease: lease.into(),
        now: at(now),
    }
}

fn done_under(task: &str, attempt: u32, lease: Option<&str>, now: u64) -> Command {
    Command::HandleExecutorEvent {
        lease: lease.map(str::to_owned),
        event: ExecutorEvent {
            task_id: task.into(),
            attempt,
            outcome: ExecutorOutcome::Completed {
                output: format!("output of {task}"),
                tokens_used: None,
            },
        },
        now: at(now),
    }
}

fn fenced(task: &str, attempt: u32, reason: FenceReason) -> Error {
    Error::Fenced {
        task_id: task.into(),
        attempt,
        reason,
    }
}

fn config(leases: LeasePolicy) -> PlannerConfig {
    PlannerConfig {
        leases,
        retry: RetryPolicy {
            initial_backoff_ms: 100,
            ..RetryPolicy::default()
        },
        ..PlannerConfig::default()
    }
}

fn strict() -> PlannerConfig {
    config(LeasePolicy {
        require_claim: true,
        heartbeat_timeout_ms: Some(30_000),
        start_to_close_ms: None,
        schedule_to_start_ms: None,
        ..LeasePolicy::default()
    })
}

#[test]
fn one_claim_per_attempt_and_only_its_lease_reports() {
    let claimed = || {
        Scenario::with_config(strict())
            .given_commands([init("paint the wall"), claim("t1", 1, "L1", 10)])
    };
    // A second delivery of the same dispatch: its claim is refused, so it never runs.
    claimed()
        .when(claim("t1", 1, "L2", 11))
        .then_expect_error(fenced("t1", 1, FenceReason::ClaimedByAnother));
    // The same claim again (its reply was lost): granted, nothing new recorded.
    claimed()
        .when(claim("t1", 1, "L1", 11))
        .then_expect_nothing();
    // A report without the lease, or with another, changes nothing.
    claimed()
        .when(done_under("t1", 1, None, 20))
        .then_expect_error(fenced("t1", 1, FenceReason::LeaseMismatch));
    claimed()
        .when(done_under("t1", 1, Some("L2"), 20))
        .then_expect_error(fenced("t1", 1, FenceReason::LeaseMismatch));
    claimed()
        .when(done_under("t1", 1, Some("L1"), 20))
        .then_expect_types(&["task_status_updated", "plan_completed"]);
}

#[test]
fn with_claims_required_an_unclaimed_attempt_cannot_be_completed() {
    Scenario::with_config(strict())
        .given_commands([init("paint the wall")])
        .when(done_under("t1", 1, Some("made-up"), 20))
        .then_expect_error(fenced("t1", 1, FenceReason::NotClaimed));
    // The core's default does not require claims: executors that never claim still work.
    Scenario::new()
        .given_commands([init("paint the wall")])
        .when(done_under("t1", 1, None, 20))
        .then_expect_types(&["task_status_updated", "plan_completed"]);
}

#[test]
fn a_silent_executor_times_out_and_the_task_is_retried_as_a_new_attempt() {
    let silent = || {
        Scenario::with_config(strict())
            .given_commands([init("paint the wall"), claim("t1", 1, "L1", 1_000)])
    };
    assert_eq!(silent().planner().next_deadline(), Some(at(31_000)));
    silent()
        .when(Command::Tick { now: at(30_999) })
        .then_expect_nothing();
    let timed_out = silent()
        .when(Command::Tick { now: at(31_000) })
        .then_expect_types(&["retry_scheduled"]);
    let task = timed_out
        .planner()
        .state()
        .task(&"t1".into())
        .cloned()
        .unwrap();
    assert!(task
        .error
        .unwrap_or_default()
        .contains("no heartbeat for 30000 ms"));
    // After the backoff, attempt 2 goes out; attempt 1 is fenced out and its result is stale.
    let retried = timed_out
        .when(Command::Tick { now: at(31_100) })
        .then_expect_types(&["task_dispatched"]);
    retried
        .when(beat("t1", 1, "L1", 31_200))
        .then_expect_error(fenced("t1", 1, FenceReason::Superseded))
        .when(done_under("t1", 1, Some("L1"), 31_300))
        .then_expect_nothing()
        .when(claim("t1", 2, "L9", 31_400))
        .then_expect_types(&["attempt_claimed"])
        .when(done_under("t1", 2, Some("L9"), 31_500))
        .then_expect_types(&["task_status_updated", "plan_completed"]);
}

#[test]
fn heartbeats_keep_an_attempt_alive_and_are_recorded_at_most_every_half_timeout() {
    let mut scenario = Scenario::with_config(strict())
        .given_commands([init("paint the wall"), claim("t1", 1, "L1", 0)]);
    let mut recorded = 0;
    // An hour of heartbeats every 10 s, with ticks in between.
    for second in (10..=3_600).step_by(10) {
        let now = second * 1_000;
        let before = scenario.history().len();
        scenario = scenario
            .when(beat("t1", 1, "L1", now))
            .then(|_, _| {})
            .when(Command::Tick {
                now: at(now + 5_000),
            })
            .then_expect_nothing();
        recorded += scenario.history().len() - before;
    }
    // Every 20 s (the first beat at or past half the 30 s timeout): 180, not 360.
    assert_eq!(recorded, 180);
    assert_eq!(
        scenario
            .planner()
            .state()
            .task(&"t1".into())
            .map(|t| t.status),
        Some(TaskStatus::Running)
    );
}

#[test]
fn cancellation_reaches_a_running_executor_through_its_heartbeat() {
    Scenario::with_config(strict())
        .given_commands([
            init("paint the wall. then dry it"),
            claim("t1", 1, "L1", 10),
            Command::Cancel {
                target: CancelTarget::Task {
                    task_id: "t1".into(),
                },
                reason: None,
                now: at(20),
            },
        ])
        .when(beat("t1", 1, "L1", 30))
        .then_expect_error(fenced("t1", 1, FenceReason::Cancelled));
    // A task cancelled while the plan goes on: the heartbeat says so.
    Scenario::with_config(strict())
        .given_commands([
            init("- fetch a\n- fetch b"),
            claim("t1", 1, "L1", 10),
            Command::Cancel {
                target: CancelTarget::Task {
                    task_id: "t1".into(),
                },
                reason: None,
                now: at(20),
            },
        ])
        .when(beat("t1", 1, "L1", 30))
        .then_expect_error(fenced("t1", 1, FenceReason::Cancelled))
        .when(claim("t1", 1, "L2", 40))
        .then_expect_error(fenced("t1", 1, FenceReason::Cancelled));
}

#[test]
fn an_attempt_nobody_claims_and_one_that_runs_too_long_time_out() {
    let queued = Scenario::with_config(config(LeasePolicy {
        require_claim: true,
        heartbeat_timeout_ms: None,
        start_to_close_ms: Some(60_000),
        schedule_to_start_ms: Some(5_000),
        ..LeasePolicy::default()
    }))
    .given_commands([init("paint the wall")]);
    assert_eq!(queued.planner().next_deadline(), Some(at(5_000)));
    let requeued = queued
        .when(Command::Tick { now: at(5_000) })
        .then_expect_types(&["retry_scheduled"])
        .when(Command::Tick { now: at(5_100) })
        .then_expect_types(&["task_dispatched"])
        .when(claim("t1", 2, "L1", 6_000))
        .then_expect_types(&["attempt_claimed"]);
    assert_eq!(requeued.planner().next_deadline(), Some(at(66_000)));
    let task = requeued
        .when(Command::Tick { now: at(66_000) })
        .then_expect_types(&["retry_scheduled"])
        .planner()
        .state()
        .task(&"t1".into())
        .cloned()
        .unwrap();
    assert!(task
        .error
        .unwrap_or_default()
        .contains("still running after 60000 ms"));
}

#[test]
fn a_planner_coming_back_gives_running_attempts_one_timeout_of_grace() {
    let claimed = || {
        Scenario::with_config(strict())
            .given_commands([init("paint the wall"), claim("t1", 1, "L1", 0)])
    };
    // Fresh leases: nothing to record.
    claimed()
        .when(Command::ExtendLeases { now: at(1_000) })
        .then_expect_nothing();
    // Back after 100 s away: the executor could not heartbeat to anyone meanwhile.
    let back = claimed()
        .when(Command::ExtendLeases { now: at(100_000) })
        .then_expect_types(&["leases_extended"]);
    assert_eq!(back.planner().next_deadline(), Some(at(130_000)));
    back.when(Command::Tick { now: at(100_000) })
        .then_expect_nothing()
        .when(beat("t1", 1, "L1", 110_000))
        .then(|_, _| {})
        .when(done_under("t1", 1, Some("L1"), 120_000))
        .then_expect_types(&["task_status_updated", "plan_completed"]);
}

/// Seed 315 of the service simulation: a session evicted and recovered over and over gave
/// its dead executor's lease a new grace at every recovery, so it never timed out. One grace
/// per beat: after a grace, only a heartbeat earns the next one.
#[test]
fn a_lease_gets_one_grace_until_its_executor_beats_again() {
    let graced = || {
        Scenario::with_config(strict()).given_commands([
            init("paint the wall"),
            claim("t1", 1, "L1", 0),
            Command::ExtendLeases { now: at(100_000) },
        ])
    };
    assert_eq!(graced().planner().next_deadline(), Some(at(130_000)));
    // Recovered again, with no beat in between: no second grace; the timeout stands.
    let again = graced()
        .when(Command::ExtendLeases { now: at(120_000) })
        .then_expect_nothing();
    assert_eq!(again.planner().next_deadline(), Some(at(130_000)));
    again
        .when(Command::Tick { now: at(130_000) })
        .then_expect_types(&["retry_scheduled"]);
    // A live executor beats; a later outage earns it a grace again.
    graced()
        .given_commands([beat("t1", 1, "L1", 116_000)])
        .when(Command::ExtendLeases { now: at(200_000) })
        .then_expect_types(&["leases_extended"]);
}

#[test]
fn a_task_of_a_supplied_plan_can_carry_its_own_timeouts() {
    let quick = TaskSpec {
        timeouts: Some(TaskTimeouts {
            heartbeat_timeout_ms: Some(2_000),
            ..TaskTimeouts::default()
        }),
        ..work("quick", &[])
    };
    let plan = || {
        Scenario::with_config(strict()).given_commands([
            init_plan(vec![quick.clone(), work("slow", &[])]),
            claim("quick", 1, "Q", 0),
            claim("slow", 1, "S", 0),
        ])
    };
    // Its own 2 s, not the session's 30 s; the other task keeps the session's.
    assert_eq!(plan().planner().next_deadline(), Some(at(2_000)));
    let after = plan()
        .when(Command::Tick { now: at(2_000) })
        .then_expect_types(&["retry_scheduled"]);
    assert_eq!(
        after
            .planner()
            .state()
            .task(&"slow".into())
            .map(|t| t.status),
        Some(TaskStatus::Running)
    );
    // Heartbeats are recorded at half its own timeout.
    plan()
        .when(beat("quick", 1, "Q", 1_000))
        .then_expect_types(&["attempt_heartbeat"]);
    // A zero timeout is a plan error, not a task that times out at once.
    let zero = TaskSpec {
        timeouts: Some(TaskTimeouts {
            start_to_close_ms: Some(0),
            ..TaskTimeouts::default()
        }),
        ..work("zero", &[])
    };
    Scenario::with_config(strict())
        .when(init_plan(vec![zero]))
        .then_expect_error(Error::InvalidPlan(PlanError::ZeroTimeout {
            task_id: "zero".into(),
        }));
}

#[test]
fn timeouts_come_from_the_task_then_its_target_then_its_kind_then_the_session() {
    let timeouts = |heartbeat: u64| TaskTimeouts {
        heartbeat_timeout_ms: Some(heartbeat),
        ..TaskTimeouts::default()
    };
    let mut leases = LeasePolicy {
        require_claim: true,
        heartbeat_timeout_ms: Some(30_000),
        start_to_close_ms: Some(600_000),
        ..LeasePolicy::default()
    };
    leases.kinds.insert(NodeKind::Processing, timeouts(20_000));
    leases.targets.insert("search".into(), timeouts(10_000));
    let on = |target: &str, spec: TaskSpec| TaskSpec {
        target: target.into(),
        ..spec
    };
    let tasks = vec![
        work("plain", &[]),
        spec("think", NodeKind::Processing, &[]),
        on("search", spec("find", NodeKind::Processing, &[])),
        TaskSpec {
            timeouts: Some(timeouts(5_000)),
            ..on("search", work("own", &[]))
        },
    ];
    let config = PlannerConfig {
        max_parallel: 8,
        ..config(leases)
    };
    let given = || {
        Scenario::with_config(config.clone()).given_commands([
            init_plan(tasks.clone()),
            claim("plain", 1, "A", 0),
            claim("think", 1, "B", 0),
            claim("find", 1, "C", 0),
            claim("own", 1, "D", 0),
        ])
    };
    let scenario = given();
    let planner = scenario.planner();
    let heartbeat = |id: &str| {
        planner
            .attempt_timeouts(&id.into())
            .and_then(|t| t.heartbeat_timeout_ms)
    };
    assert_eq!(heartbeat("plain"), Some(30_000), "the session's");
    assert_eq!(heartbeat("think"), Some(20_000), "its kind's");
    assert_eq!(
        heartbeat("find"),
        Some(10_000),
        "its target's, over its kind's"
    );
    assert_eq!(heartbeat("own"), Some(5_000), "its own, over its target's");
    // What a layer leaves unset falls through to the next one.
    assert_eq!(
        planner
            .attempt_timeouts(&"own".into())
            .and_then(|t| t.start_to_close_ms),
        Some(600_000)
    );
    // And the clock agrees: the tightest one times out first, alone.
    assert_eq!(planner.next_deadline(), Some(at(5_000)));
    let later = given()
        .when(Command::Tick { now: at(10_000) })
        .then_expect_types(&["retry_scheduled", "retry_scheduled"]);
    let running = |id: &str| {
        later
            .planner()
            .state()
            .task(&id.into())
            .map(|t| (t.status, t.attempts))
    };
    assert_eq!(running("plain"), Some((TaskStatus::Running, 1)));
    assert_eq!(running("think"), Some((TaskStatus::Running, 1)));
}

#[test]
fn per_kind_and_per_target_timeouts_are_checked_with_the_rest_of_the_config() {
    let mut leases = LeasePolicy::default();
    leases.kinds.insert(
        NodeKind::Clarification,
        TaskTimeouts {
            heartbeat_timeout_ms: Some(1_000),
            ..TaskTimeouts::default()
        },
    );
    leases.targets.insert(
        "web search".into(),
        TaskTimeouts {
            start_to_close_ms: Some(0),
            ..TaskTimeouts::default()
        },
    );
    let Err(error) = config(leases).validate() else {
        panic!("a config with a zero timeout and bad names was accepted");
    };
    let text = error.to_string();
    for expected in [
        "leases.kinds.clarification",
        "leases.targets.web search: not a target name",
        "leases.targets.web search.start_to_close_ms must be at least 1",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from {text}");
    }
}
