//! Given/when/then stories for every command in the states where it matters.

use planner_core::testing::Scenario;
use planner_core::*;

use crate::support::*;

use NodeKind::{Clarification, Processing, ToolCall};

// ----- initialization -----

#[test]
fn commands_before_the_first_request_are_refused() {
    for cmd in [
        Command::Continue,
        done("t1", 1, 0),
        answer("t1", "yes", 0),
        cancel_task("t1", 0),
        Command::CompactContext {
            summary: None,
            through: None,
            now: at(0),
        },
    ] {
        Scenario::new()
            .when(cmd)
            .then_expect_error(Error::NotInitialized);
    }
    // A tick before anything is timed is a spurious wake-up, not an error.
    Scenario::new()
        .when(Command::Tick { now: at(5) })
        .then_expect_nothing();
}

#[test]
fn a_request_is_planned_and_its_first_ready_task_dispatched() {
    Scenario::new()
        .when(init("1. search for crates\n2. summarize them"))
        .then(|events, planner| {
            let types: Vec<_> = events.iter().map(Event::event_type).collect();
            assert_eq!(
                types,
                [
                    "session_started",
                    "request_received",
                    "tasks_planned",
                    "task_dispatched"
                ]
            );
            assert_eq!(dispatched(events), [d("t1", 1)]);
            assert_eq!(status(planner, "t2"), TaskStatus::Planned);
            assert_eq!(planner.state().phase, PlanPhase::Running);
        });
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    Scenario::new()
        .when(init("   "))
        .then_expect_error(Error::EmptyRequest);
    Scenario::with_config(config(|c| c.max_input_chars = 10))
        .when(init("this is far too long"))
        .then_expect_error(Error::InputTooLarge {
            chars: 20,
            limit: 10,
        });
    Scenario::new()
        .when(init_plan(vec![work("a", &["b"]), work("b", &["a"])]))
        .then_expect_error(Error::InvalidPlan(PlanError::Cycle {
            task_id: "a".into(),
        }));
    Scenario::new()
        .when(init_plan(vec![]))
        .then_expect_error(Error::InvalidPlan(PlanError::Empty));
    Scenario::new()
        .when(init_plan(vec![work("a", &["ghost"])]))
        .then_expect_error(Error::InvalidPlan(PlanError::UnknownDependency {
            task_id: "a".into(),
            dependency: "ghost".into(),
        }));
}

#[test]
fn a_follow_up_after_the_largest_task_number_is_refused_not_a_panic() {
    // A supplied task `t<u64::MAX>` moves the parser's numbering to its end; a plain-text
    // follow-up then used to overflow it (found by the rule_parser fuzz target).
    Scenario::new()
        .given_commands([init_plan(vec![work("t18446744073709551615", &[])])])
        .when(init("search again, then summarize"))
        .then_expect_error(Error::InvalidPlan(PlanError::DuplicateId {
            task_id: "t18446744073709551615".into(),
        }));
}

#[test]
fn a_supplied_plan_runs_in_dependency_order_with_request_attachments() {
    let attachment = Attachment {
        name: "data.csv".into(),
        uri: "file:///tmp/data.csv".into(),
        media_type: Some("text/csv".into()),
    };
    let planner = Scenario::new()
        .given_commands([Command::Initialize {
            request_id: None,
            planning: None,
            input: "analyze".into(),
            attachments: vec![attachment.clone()],
            plan: Some(PlanSpec {
                tasks: vec![work("load", &[]), spec("crunch", Processing, &["load"])],
            }),
            now: at(0),
        }])
        .when(done("load", 1, 10))
        .then(|events, planner| {
            let cmd = events
                .iter()
                .find_map(Event::planner_cmd)
                .expect("a dispatch");
            let PlannerCmd::RunProcessing(dispatch) = cmd else {
                panic!("expected processing, got {cmd:?}")
            };
            let dispatch = planner.assignment(dispatch).expect("renders");
            assert_eq!(dispatch.task_id.as_str(), "crunch");
            assert_eq!(dispatch.attachments, vec![attachment.clone()]);
            assert_eq!(dispatch.inputs.len(), 1);
            assert_eq!(dispatch.inputs[0].output, "output of load");
            assert_eq!(dispatch.context.unwrap().request, "analyze");
        });
    assert_eq!(status(planner.planner(), "load"), TaskStatus::Completed);
}

// ----- scheduling -----

#[test]
fn at_most_max_parallel_tasks_run_and_ties_break_in_plan_order() {
    let planner = Scenario::with_config(config(|c| c.max_parallel = 2))
        .when(init(
            "- fetch a.txt\n- fetch b.txt\n- fetch c.txt\n- fetch d.txt",
        ))
        .then(|events, planner| {
            assert_eq!(dispatched(events), [d("t1", 1), d("t2", 1)]);
            assert_eq!(planner.state().running_count(), 2);
        });
    planner
        .when(done("t2", 1, 5))
        .then(|events, _| assert_eq!(dispatched(events), [d("t3", 1)]));
}

#[test]
fn max_parallel_one_walks_a_chain_like_a_cursor() {
    let mut planner = Scenario::with_config(config(|c| c.max_parallel = 1))
        .when(init("a. then b. then c"))
        .then(|events, _| assert_eq!(dispatched(events), [d("t1", 1)]))
        .planner()
        .clone();
    assert_eq!(planner.state().cursor, 0);
    for (n, next) in [(1, Some("t2")), (2, Some("t3")), (3, None)] {
        let events = planner
            .process(done(&format!("t{n}"), 1, n))
            .expect("accepted");
        assert_eq!(planner.state().cursor, n as usize);
        match next {
            Some(id) => assert_eq!(dispatched(&events), [d(id, 1)]),
            None => assert_eq!(events.last().map(Event::event_type), Some("plan_completed")),
        }
    }
    assert_eq!(planner.state().phase, PlanPhase::Completed);
}

#[test]
fn continue_dispatches_nothing_twice() {
    Scenario::new()
        .given_commands([init("do one thing")])
        .when(Command::Continue)
        .then_expect_nothing();
}

// ----- executor reports -----

#[test]
fn reports_that_do_not_fit_are_typed_errors_or_no_ops() {
    let given = || Scenario::new().given_commands([init("Which color? then paint the wall")]);
    // t1 is a clarification, t2 waits for it and has never been dispatched.
    given()
        .when(done("nope", 1, 1))
        .then_expect_error(Error::UnknownTask {
            task_id: "nope".into(),
        });
    given()
        .when(done("t1", 1, 1))
        .then_expect_error(Error::NotExecutable {
            task_id: "t1".into(),
        });
    given()
        .when(done("t2", 1, 1))
        .then_expect_error(Error::UnknownAttempt {
            task_id: "t2".into(),
            attempt: 1,
            latest: 0,
        });

    let running = || Scenario::new().given_commands([init("paint the wall")]);
    running()
        .when(done("t1", 0, 1))
        .then_expect_error(Error::UnknownAttempt {
            task_id: "t1".into(),
            attempt: 0,
            latest: 1,
        });
    running()
        .when(done("t1", 2, 1))
        .then_expect_error(Error::UnknownAttempt {
            task_id: "t1".into(),
            attempt: 2,
            latest: 1,
        });
    running()
        .given_commands([report("t1", 1, ExecutorOutcome::Started, 1)])
        .when(report("t1", 1, ExecutorOutcome::Started, 2))
        .then_expect_nothing();
}

/// A late or contradicting result after the end changes nothing and is no error: it used to
/// be refused with PlanFinished, which the daemon publishes on planner.errors; the executor
/// liveness issue (#9, item 5) asks that such races be dropped quietly.
#[test]
fn a_duplicate_or_late_result_after_the_end_is_dropped_quietly() {
    let finished = || Scenario::new().given_commands([init("paint the wall"), done("t1", 1, 5)]);
    finished().when(done("t1", 1, 6)).then_expect_nothing();
    finished()
        .when(failed("t1", 1, true, 6))
        .then_expect_nothing();
}

/// Found by the service simulation: a sibling still running when the plan failed fast is
/// cancelled with it, and its executor's result arrives afterwards. That is no error of the
/// executor's; it used to be refused (and published on planner.errors).
#[test]
fn a_result_for_a_task_cancelled_when_the_plan_failed_is_ignored() {
    let failed_fast = || {
        Scenario::new().given_commands([init("- fetch a\n- fetch b"), failed("t1", 1, false, 5)])
    };
    failed_fast().when(done("t2", 1, 6)).then_expect_nothing();
    failed_fast()
        .when(failed("t2", 1, true, 6))
        .then_expect_nothing();
}

/// Found by the service simulation: a report redelivered (its ack was lost) after a retry
/// finished the plan is stale, not an error.
#[test]
fn a_redelivered_report_of_a_superseded_attempt_after_the_end_is_ignored() {
    let retried_and_done = || {
        Scenario::with_config(PlannerConfig {
            retry: RetryPolicy {
                initial_backoff_ms: 0,
                ..RetryPolicy::default()
            },
            ..PlannerConfig::default()
        })
        .given_commands([
            init("paint the wall"),
            failed("t1", 1, true, 5),
            Command::Tick { now: Timestamp(10) },
            done("t1", 2, 20),
        ])
    };
    retried_and_done()
        .when(failed("t1", 1, true, 30))
        .then_expect_nothing();
    retried_and_done()
        .when(done("t1", 1, 30))
        .then_expect_nothing();
}

/// Found by the service simulation: an executor's question, redelivered after the question
/// timed out and failed the plan, is what was already recorded, not an error.
#[test]
fn a_redelivered_question_after_the_plan_ended_is_ignored() {
    Scenario::with_config(PlannerConfig {
        clarification: ClarificationPolicy {
            timeout_ms: Some(100),
            ..ClarificationPolicy::default()
        },
        ..PlannerConfig::default()
    })
    .given_commands([
        init("paint the wall"),
        report(
            "t1",
            1,
            ExecutorOutcome::NeedsClarification {
                question: "which colour?".into(),
            },
            5,
        ),
        Command::Tick {
            now: Timestamp(1_000),
        },
    ])
    .when(report(
        "t1",
        1,
        ExecutorOutcome::NeedsClarification {
            question: "which colour?".into(),
        },
        2_000,
    ))
    .then_expect_nothing();
}

#[test]
fn started_then_completed_records_both() {
    Scenario::new()
        .given_commands([
            init("paint the wall. then dry it"),
            report("t1", 1, ExecutorOutcome::Started, 1),
        ])
        .when(done("t1", 1, 2))
        .then_expect_types(&["task_status_updated", "task_dispatched"]);
}

// ----- retries -----

#[test]
fn a_retryable_failure_backs_off_then_dispatches_the_next_attempt() {
    let planner = Scenario::new()
        .given_commands([init("paint the wall")])
        .when(failed("t1", 1, true, 100))
        .then(|events, planner| {
            assert!(matches!(
                events,
                [Event::RetryScheduled { not_before, .. }] if *not_before == at(1_100)
            ));
            assert_eq!(planner.next_deadline(), Some(at(1_100)));
            assert_eq!(status(planner, "t1"), TaskStatus::Planned);
        });
    let early = planner
        .clone()
        .when(Command::Tick { now: at(1_099) })
        .then_expect_nothing();
    let planner = early
        .when(Command::Tick { now: at(1_100) })
        .then(|events, _| assert_eq!(dispatched(events), [d("t1", 2)]));
    // The first attempt's result, arriving late, is stale.
    planner.when(done("t1", 1, 1_200)).then_expect_nothing();
}

#[test]
fn backoff_grows_and_is_capped() {
    let policy = RetryPolicy {
        max_attempts: 10,
        initial_backoff_ms: 1_000,
        multiplier_percent: 200,
        max_backoff_ms: 5_000,
    };
    let delays: Vec<u64> = (1..=5).map(|n| policy.backoff_ms(n)).collect();
    assert_eq!(delays, [1_000, 2_000, 4_000, 5_000, 5_000]);
    assert_eq!(policy.backoff_ms(u32::MAX), 5_000);
}

#[test]
fn exhausted_attempts_fail_the_task_its_dependents_and_the_plan() {
    let cfg = config(|c| {
        c.retry.max_attempts = 2;
        c.max_parallel = 2;
    });
    Scenario::with_config(cfg)
        .given_commands([
            init_plan(vec![work("a", &[]), work("b", &[]), work("c", &["a"])]),
            failed("a", 1, true, 10),
            Command::Tick { now: at(2_000) },
        ])
        .when(failed("a", 2, true, 2_100))
        .then(|events, planner| {
            let types: Vec<_> = events.iter().map(Event::event_type).collect();
            assert_eq!(
                types,
                [
                    "task_status_updated", // a failed
                    "task_status_updated", // c failed: dependency
                    "task_cancelled",      // b, running, cancelled
                    "plan_failed"
                ]
            );
            assert_eq!(
                events[2].planner_cmd(),
                Some(&PlannerCmd::CancelTask {
                    task_id: "b".into(),
                    attempt: 1
                })
            );
            assert_eq!(status(planner, "c"), TaskStatus::Failed);
            assert_eq!(
                planner.state().phase,
                PlanPhase::Failed {
                    reason: FailureReason::TaskFailed {
                        task_id: "a".into()
                    }
                }
            );
            assert_eq!(
                planner.state().task(&"a".into()).map(|t| t.failures),
                Some(2)
            );
        });
}

#[test]
fn a_non_retryable_failure_fails_at_once_with_its_error_compacted() {
    let cfg = config(|c| c.error_char_limit = 100);
    Scenario::with_config(cfg)
        .given_commands([init("compile the project")])
        .when(report(
            "t1",
            1,
            ExecutorOutcome::Failed {
                error: format!("error: first line\n{}\nlast line", "noise ".repeat(1_000)),
                retryable: false,
                tokens_used: None,
            },
            1,
        ))
        .then(|_, planner| {
            let error = planner
                .state()
                .task(&"t1".into())
                .and_then(|t| t.error.clone())
                .expect("error kept");
            assert!(error.chars().count() <= 100, "{error}");
            assert!(error.starts_with("error: first line") && error.ends_with("last line"));
            assert!(planner.state().phase.is_terminal());
        });
}

#[test]
fn continue_on_failure_lets_independent_branches_finish_first() {
    let cfg = config(|c| {
        c.failure = FailurePolicy::ContinueOnFailure;
        c.max_parallel = 2;
    });
    let planner = Scenario::with_config(cfg)
        .given_commands([init_plan(vec![
            work("a", &[]),
            work("a2", &["a"]),
            work("b", &[]),
            work("b2", &["b"]),
        ])])
        .when(failed("a", 1, false, 1))
        .then(|events, planner| {
            assert_eq!(status(planner, "a2"), TaskStatus::Failed);
            assert_eq!(planner.state().phase, PlanPhase::Running);
            assert!(
                dispatched(events).is_empty(),
                "b still runs; nothing new is ready"
            );
        });
    let planner = planner
        .when(done("b", 1, 2))
        .then(|events, _| assert_eq!(dispatched(events), [d("b2", 1)]));
    planner.when(done("b2", 1, 3)).then(|events, planner| {
        assert_eq!(events.last().map(Event::event_type), Some("plan_failed"));
        assert_eq!(
            planner.state().phase,
            PlanPhase::Failed {
                reason: FailureReason::TasksFailed {
                    task_ids: vec!["a".into(), "a2".into()]
                }
            }
        );
    });
}

// ----- clarification -----

#[test]
fn a_clarification_task_asks_the_user_and_the_answer_feeds_its_dependents() {
    let planner = Scenario::new()
        .when(init("Which region? then deploy the service"))
        .then(|events, planner| {
            let asks: Vec<_> = events
                .iter()
                .filter(|e| e.event_type() == "clarification_requested")
                .collect();
            assert_eq!(asks.len(), 1);
            assert!(matches!(
                asks[0].planner_cmd(),
                Some(PlannerCmd::AskUser { question, deadline: None, .. }) if question == "Which region?"
            ));
            assert!(planner.state().is_waiting_for_user());
            assert!(dispatched(events).is_empty());
        });
    let planner = planner
        .when(answer("t1", "eu-west-1", 50))
        .then(|events, planner| {
            assert_eq!(dispatched(events), [d("t2", 1)]);
            let Some(PlannerCmd::ExecuteTool(dispatch)) =
                events.last().and_then(Event::planner_cmd)
            else {
                panic!("expected a tool dispatch")
            };
            let dispatch = planner.assignment(dispatch).expect("renders");
            assert_eq!(dispatch.inputs[0].output, "eu-west-1");
            assert!(!planner.state().is_waiting_for_user());
        });
    // The same answer again is a redelivery; a different one answers nothing.
    let again = || planner.clone();
    again()
        .when(answer("t1", "eu-west-1", 60))
        .then_expect_nothing();
    again()
        .when(answer("t1", "us-east-1", 60))
        .then_expect_error(Error::NotAwaitingClarification {
            task_id: "t1".into(),
        });
    again()
        .when(answer("t2", "what?", 60))
        .then_expect_error(Error::NotAwaitingClarification {
            task_id: "t2".into(),
        });
}

#[test]
fn an_executor_asking_mid_task_frees_its_slot_and_gets_the_answer_on_the_next_attempt() {
    let cfg = config(|c| c.max_parallel = 1);
    let planner = Scenario::with_config(cfg)
        .given_commands([init("- deploy the service\n- fetch the logs")])
        .when(report(
            "t1",
            1,
            ExecutorOutcome::NeedsClarification {
                question: "which region?".into(),
            },
            10,
        ))
        .then(|events, planner| {
            assert_eq!(events[0].event_type(), "clarification_requested");
            assert_eq!(dispatched(events), [d("t2", 1)], "the freed slot is used");
            assert_eq!(status(planner, "t1"), TaskStatus::NeedsClarification);
        });
    // The asking attempt ended: its later reports are ignored.
    planner
        .clone()
        .when(done("t1", 1, 11))
        .then_expect_nothing();
    let planner = planner
        .given_commands([answer("t1", "eu-west-1", 20)])
        .when(done("t2", 1, 30))
        .then(|events, planner| {
            let Some(PlannerCmd::ExecuteTool(dispatch)) =
                events.last().and_then(Event::planner_cmd)
            else {
                panic!("expected t1 again")
            };
            let dispatch = planner.assignment(dispatch).expect("renders");
            assert_eq!((dispatch.task_id.as_str(), dispatch.attempt), ("t1", 2));
            assert_eq!(dispatch.answer.as_deref(), Some("eu-west-1"));
        });
    assert_eq!(
        planner
            .planner()
            .state()
            .task(&"t1".into())
            .map(|t| t.failures),
        Some(0),
        "asking is not failing"
    );
}

#[test]
fn an_unanswered_question_takes_the_default_at_its_deadline() {
    let cfg = config(|c| {
        c.clarification = ClarificationPolicy {
            timeout_ms: Some(5_000),
            on_timeout: OnClarificationTimeout::UseDefault {
                answer: "any".into(),
            },
        }
    });
    let planner = Scenario::with_config(cfg)
        .when(init("Which color? then paint the wall"))
        .then(|_, planner| assert_eq!(planner.next_deadline(), Some(at(5_000))));
    planner
        .when(Command::Tick { now: at(5_000) })
        .then(|events, _| {
            assert!(matches!(
                &events[0],
                Event::ClarificationAnswered { answer, defaulted: true, .. } if answer == "any"
            ));
            assert_eq!(dispatched(events), [d("t2", 1)]);
        });
}

#[test]
fn an_unanswered_question_fails_its_task_when_so_configured() {
    let cfg = config(|c| c.clarification.timeout_ms = Some(1_000));
    Scenario::with_config(cfg)
        .given_commands([init("Which color? then paint the wall")])
        .when(Command::Tick { now: at(1_000) })
        .then(|events, planner| {
            assert_eq!(status(planner, "t1"), TaskStatus::Failed);
            assert_eq!(status(planner, "t2"), TaskStatus::Failed);
            assert_eq!(events.last().map(Event::event_type), Some("plan_failed"));
        });
}

// ----- budgets -----

#[test]
fn passing_the_dispatch_budget_stops_the_plan_and_names_it() {
    let cfg = config(|c| {
        c.budgets.max_dispatches = Some(1);
    });
    Scenario::with_config(cfg)
        .given_commands([init("a. then b")])
        .when(done("t1", 1, 1))
        .then(|_, planner| {
            assert_eq!(
                planner.state().phase,
                PlanPhase::Failed {
                    reason: FailureReason::BudgetExceeded {
                        budget: BudgetKind::Dispatches,
                        limit: 1,
                        used: 2
                    }
                }
            );
            assert_eq!(status(planner, "t2"), TaskStatus::Cancelled);
        });
}

#[test]
fn passing_the_attempt_budget_stops_retries() {
    let cfg = config(|c| c.budgets.max_attempts = Some(1));
    Scenario::with_config(cfg)
        .given_commands([init("flaky thing"), failed("t1", 1, true, 1)])
        .when(Command::Tick { now: at(1_001) })
        .then(|_, planner| {
            assert!(matches!(
                planner.state().phase,
                PlanPhase::Failed {
                    reason: FailureReason::BudgetExceeded {
                        budget: BudgetKind::Attempts,
                        ..
                    }
                }
            ));
        });
}

#[test]
fn passing_the_token_budget_stops_the_plan() {
    let cfg = config(|c| c.budgets.max_tokens = Some(100));
    Scenario::with_config(cfg)
        .given_commands([init("a. then b")])
        .when(report(
            "t1",
            1,
            ExecutorOutcome::Completed {
                output: "ok".into(),
                tokens_used: Some(101),
            },
            1,
        ))
        .then(|events, planner| {
            assert!(dispatched(events).is_empty());
            assert!(matches!(
                planner.state().phase,
                PlanPhase::Failed {
                    reason: FailureReason::BudgetExceeded {
                        budget: BudgetKind::Tokens,
                        limit: 100,
                        used: 101
                    }
                }
            ));
        });
}

#[test]
fn the_wall_time_budget_is_a_deadline() {
    let cfg = config(|c| c.budgets.max_wall_time_ms = Some(60_000));
    let planner = Scenario::with_config(cfg)
        .when(init("slow thing"))
        .then(|_, planner| assert_eq!(planner.next_deadline(), Some(at(60_000))));
    planner
        .when(Command::Tick { now: at(60_000) })
        .then_expect_types(&["task_cancelled", "plan_failed"]);
}

/// Found trying the daemon as a user: the budget ran from the session's first request, so any
/// follow-up sent after `max_wall_time_ms` stopped at once.
#[test]
fn a_follow_up_after_the_plan_ended_gets_a_fresh_wall_time_budget() {
    let cfg = config(|c| c.budgets.max_wall_time_ms = Some(60_000));
    let reopened = Scenario::with_config(cfg)
        .given_commands([init("paint the wall"), done("t1", 1, 1_000)])
        .when(Command::Initialize {
            request_id: None,
            planning: None,
            input: "then dry it".into(),
            attachments: vec![],
            plan: None,
            now: at(600_000),
        })
        .then_expect_types(&["request_received", "tasks_planned", "task_dispatched"]);
    assert_eq!(reopened.planner().next_deadline(), Some(at(660_000)));
    reopened
        .when(Command::Tick { now: at(659_999) })
        .then_expect_nothing()
        .when(Command::Tick { now: at(660_000) })
        .then_expect_types(&["task_cancelled", "plan_failed"]);
}

// ----- cancellation -----

#[test]
fn cancelling_a_task_cancels_its_dependents_and_the_rest_goes_on() {
    let cfg = config(|c| c.max_parallel = 2);
    let planner = Scenario::with_config(cfg)
        .given_commands([init_plan(vec![
            work("a", &[]),
            work("a2", &["a"]),
            work("b", &[]),
        ])])
        .when(cancel_task("a", 5))
        .then(|events, planner| {
            assert_eq!(
                events[0].planner_cmd(),
                Some(&PlannerCmd::CancelTask {
                    task_id: "a".into(),
                    attempt: 1
                })
            );
            assert_eq!(
                events[1].planner_cmd(),
                None,
                "a2 never ran: nothing to stop"
            );
            assert_eq!(status(planner, "a2"), TaskStatus::Cancelled);
            assert_eq!(planner.state().phase, PlanPhase::Running);
        });
    let finished = planner
        .when(done("b", 1, 6))
        .then_expect_types(&["task_status_updated", "plan_completed"]);
    finished
        .clone()
        .when(cancel_task("a", 7))
        .then_expect_nothing();
    finished
        .clone()
        .when(cancel_task("zzz", 7))
        .then_expect_error(Error::UnknownTask {
            task_id: "zzz".into(),
        });
}

#[test]
fn cancelling_the_plan_stops_everything_once() {
    let planner = Scenario::new()
        .given_commands([init("Which color? then paint. - also fetch x")])
        .when(Command::Cancel {
            target: CancelTarget::Plan,
            reason: Some("user left".into()),
            now: at(3),
        })
        .then(|events, planner| {
            assert_eq!(events.last().map(Event::event_type), Some("plan_cancelled"));
            assert_eq!(planner.state().phase, PlanPhase::Cancelled);
            assert!(planner
                .state()
                .tasks
                .iter()
                .all(|t| t.status == TaskStatus::Cancelled));
            assert!(!planner.state().is_waiting_for_user());
        });
    planner
        .when(Command::Cancel {
            target: CancelTarget::Plan,
            reason: None,
            now: at(4),
        })
        .then_expect_nothing();
}

// ----- follow-ups -----

#[test]
fn a_follow_up_runs_after_the_unfinished_tasks_with_the_conversation_as_context() {
    let planner = Scenario::new()
        .given_commands([init("search for hotels")])
        .when(init("then book the cheapest"))
        .then(|events, planner| {
            assert!(dispatched(events).is_empty(), "waits for t1");
            let t2 = planner
                .state()
                .task(&"t2".into())
                .expect("numbering continues");
            assert_eq!(t2.dependencies, vec![TaskId::from("t1")]);
            assert_eq!(t2.turn, 1);
        });
    let planner = planner.when(done("t1", 1, 5)).then(|events, planner| {
        let Some(PlannerCmd::RunProcessing(dispatch)) = events.last().and_then(Event::planner_cmd)
        else {
            panic!("expected t2")
        };
        let dispatch = planner.assignment(dispatch).expect("renders");
        assert_eq!(dispatch.task_id.as_str(), "t2");
        assert_eq!(dispatch.context.unwrap().request, "then book the cheapest");
    });
    let finished = planner
        .when(done("t2", 1, 6))
        .then_expect_types(&["task_status_updated", "plan_completed"]);
    // A follow-up reopens a finished plan.
    finished
        .clone()
        .when(init("and email me the receipt"))
        .then(|events, planner| {
            assert_eq!(dispatched(events), [d("t3", 1)]);
            assert_eq!(planner.state().phase, PlanPhase::Running);
            assert_eq!(planner.state().requests.len(), 3);
        });
}

#[test]
fn a_follow_up_on_a_failed_task_fails_with_it() {
    let cfg = config(|c| c.failure = FailurePolicy::ContinueOnFailure);
    Scenario::with_config(cfg)
        .given_commands([init_plan(vec![work("a", &[])]), failed("a", 1, false, 1)])
        .when(init_plan(vec![work("b", &["a"]), work("c", &[])]))
        .then(|events, planner| {
            assert_eq!(status(planner, "b"), TaskStatus::Failed);
            assert_eq!(dispatched(events), [d("c", 1)]);
        });
}

// ----- time -----

#[test]
fn time_never_runs_back() {
    Scenario::new()
        .given_commands([init("a. then b"), done("t1", 1, 500)])
        .when(done("t2", 1, 100))
        .then(|events, planner| {
            assert!(matches!(
                events[0],
                Event::TaskStatusUpdated {
                    at: Timestamp(500),
                    ..
                }
            ));
            assert_eq!(planner.state().clock, at(500));
        });
}

// ----- compaction -----

#[test]
fn the_context_is_compacted_when_it_passes_the_budget_and_the_summary_travels() {
    let cfg = config(|c| c.token_budget = 200);
    let long = "result line\n".repeat(100);
    let planner = Scenario::with_config(cfg)
        .given_commands([init("a. then b")])
        .when(report(
            "t1",
            1,
            ExecutorOutcome::Completed {
                output: long,
                tokens_used: None,
            },
            1,
        ))
        .then(|events, planner| {
            let types: Vec<_> = events.iter().map(Event::event_type).collect();
            assert_eq!(
                types,
                [
                    "task_status_updated",
                    "context_compacted",
                    "task_dispatched"
                ]
            );
            let context = &planner.state().context;
            assert!(context.tokens <= 200, "{} tokens", context.tokens);
            let Some(PlannerCmd::RunProcessing(dispatch)) =
                events.last().and_then(Event::planner_cmd)
            else {
                panic!("expected t2")
            };
            let dispatch = planner.assignment(dispatch).expect("renders");
            assert_eq!(dispatch.context.unwrap().summary, context.summary);
            assert!(context.summary.is_some());
        });
    // An explicit compaction with a summary written elsewhere (an LLM's) is recorded as given.
    planner
        .when(Command::CompactContext {
            summary: Some("the user wants a and b".into()),
            through: None,
            now: at(2),
        })
        .then(|_, planner| {
            assert_eq!(
                planner.state().context.summary.as_deref(),
                Some("the user wants a and b")
            );
        });
}

#[test]
fn compacting_nothing_is_a_no_op() {
    Scenario::new()
        .given_commands([init("just one thing")])
        .when(Command::CompactContext {
            summary: None,
            through: None,
            now: at(1),
        })
        .then_expect_nothing();
}

// ----- persistence shape -----

#[test]
fn events_are_stable_snake_case_json() {
    let planner = Scenario::new().when(init("fetch x")).then(|_, _| {});
    let json = serde_json::to_value(&planner.history()[3]).expect("serializes");
    assert_eq!(json["type"], "task_dispatched");
    assert_eq!(json["cmd"]["type"], "execute_tool");
    assert_eq!(json["cmd"]["target"], "http_fetch");
    assert_eq!(json["task_id"], "t1");
    assert_eq!(json["attempt"], 1);
}

#[test]
fn a_snapshot_of_the_state_restores_the_same_planner() {
    let planner = Scenario::new()
        .given_commands([
            init("- fetch a\n- fetch b\n- which one?"),
            done("t1", 1, 1),
            failed("t2", 1, true, 2),
        ])
        .when(Command::Continue)
        .then(|_, _| {})
        .planner()
        .clone();
    let snapshot = serde_json::to_vec(planner.state()).expect("serializes");
    let restored: PlannerState = serde_json::from_slice(&snapshot).expect("deserializes");
    // Derived indexes are not serialized; resuming rebuilds them equal to the live ones.
    let mut resumed = Planner::from_state(restored);
    assert_eq!(resumed.state(), planner.state());
    let mut live = planner.clone();
    assert_eq!(
        resumed.process(Command::Tick { now: at(5_000) }),
        live.process(Command::Tick { now: at(5_000) })
    );
}

#[test]
fn executor_reports_decode_from_the_documented_json() {
    let json = r#"{"task_id":"t1","attempt":1,"status":"failed","error":"boom"}"#;
    let event: ExecutorEvent = serde_json::from_str(json).expect("decodes");
    assert_eq!(
        event.outcome,
        ExecutorOutcome::Failed {
            error: "boom".into(),
            retryable: true,
            tokens_used: None
        }
    );
    assert!(serde_json::from_str::<ExecutorEvent>(
        r#"{"task_id":"t1","attempt":1,"status":"exploded"}"#
    )
    .is_err());
    let _ = Clarification;
    let _ = ToolCall;
}

#[test]
fn a_retried_request_with_the_same_id_changes_nothing() {
    let request = |id: &str, text: &str| Command::Initialize {
        request_id: Some(id.into()),
        planning: None,
        input: text.into(),
        attachments: vec![],
        plan: None,
        now: at(0),
    };
    Scenario::new()
        .given_commands([request("req-1", "fetch the report")])
        .when(request("req-1", "fetch the report"))
        .then_expect_nothing()
        .when(request("req-2", "then summarize it"))
        .then(|_, planner| assert_eq!(planner.state().requests.len(), 2))
        .when(request(&"x".repeat(129), "too long an id"))
        .then_expect_error(Error::InputTooLarge {
            chars: 129,
            limit: 128,
        });
}

#[test]
fn folding_an_inconsistent_history_does_not_panic() {
    // Histories are written by `process`, but stored bytes can be edited or damaged: `apply`
    // must stay total. Reports for tasks that never ran, unknown ids, double completions.
    let planned = init_plan(vec![work("a", &[]), work("b", &["a"])]);
    let mut planner = Planner::new();
    let mut history = planner.process(planned).unwrap();
    let done = |task: &str| Event::TaskStatusUpdated {
        task_id: task.into(),
        attempt: 1,
        status: TaskStatus::Completed,
        output: None,
        error: None,
        tokens_used: Some(u64::MAX),
        at: at(1),
    };
    history.extend([
        done("b"),
        done("b"),
        done("ghost"),
        Event::TaskCancelled {
            task_id: "a".into(),
            reason: "x".into(),
            cmd: None,
            at: at(2),
        },
        Event::RetryScheduled {
            task_id: "a".into(),
            attempt: 9,
            error: "e".into(),
            tokens_used: Some(u64::MAX),
            not_before: at(3),
            at: at(3),
        },
        Event::ClarificationAnswered {
            task_id: "nobody".into(),
            answer: "x".into(),
            defaulted: false,
            at: at(4),
        },
        Event::ContextCompacted {
            summary: "s".into(),
            folded_messages: 999,
            tokens_before: 0,
            tokens_after: 0,
            at: at(5),
        },
        Event::PlanCompleted { at: at(6) },
    ]);
    let folded = Planner::fold(&history);
    assert_eq!(folded.version(), history.len() as u64);
}

#[test]
fn a_plan_may_list_a_task_before_the_tasks_it_depends_on() {
    // An LLM does not always answer in dependency order.
    Scenario::new()
        .when(init_plan(vec![
            work("report", &["fetch"]),
            work("fetch", &[]),
        ]))
        .then(|events, planner| {
            assert_eq!(
                dispatched(events),
                [d("fetch", 1)],
                "report waits for fetch"
            );
            assert_eq!(status(planner, "report"), TaskStatus::Planned);
        })
        .when(done("fetch", 1, 5))
        .then(|events, _| assert_eq!(dispatched(events), [d("report", 1)]));
}

/// A corrupt snapshot with positions past the end of the task list used to panic in slicing
/// once loaded. A stored state is input: the planner resumes from it and goes on.
#[test]
fn a_snapshot_with_positions_past_the_end_resumes_without_panicking() {
    let mut live = Planner::new();
    live.process(init("- fetch a\n- fetch b. then summarize"))
        .unwrap();
    let mut state = live.state().clone();
    state.cursor = 1_000;
    state.run_start = 2_000;
    let mut resumed = Planner::from_state(state);
    assert!(resumed.state().cursor <= resumed.state().tasks.len());
    resumed.process(done("t1", 1, 10)).unwrap();
    resumed.process(Command::Tick { now: at(20) }).unwrap();
    resumed.process(init("then email it")).unwrap();
    resumed
        .process(Command::ExtendLeases { now: at(30) })
        .unwrap();
    resumed
        .process(Command::Cancel {
            target: CancelTarget::Plan,
            reason: None,
            now: at(40),
        })
        .unwrap();
    assert!(resumed.state().phase.is_terminal());
}

// ----- revisions -----

fn revise(failed: &str, tasks: Vec<TaskSpec>, now: u64) -> Command {
    Command::Revise {
        failed: failed.into(),
        input: format!("[revision] {failed} failed"),
        plan: PlanSpec { tasks },
        note: Some(format!("revision after {failed} failed")),
        now: at(now),
    }
}

/// Revisions used to be counted by the text "[revision" at the start of a request, which a
/// user can type. A revision is now a command of its own, recorded as `revision_of` and
/// counted in the state; a user's request with that text is an ordinary request.
#[test]
fn a_revision_is_recorded_as_such_and_counted_and_a_typed_mark_is_not() {
    let user = |text: &str| Command::Initialize {
        request_id: None,
        planning: Some(Planning {
            source: PlanSource::Llm,
            note: Some("revision after a failed".into()),
        }),
        input: text.into(),
        attachments: vec![],
        plan: Some(PlanSpec {
            tasks: vec![work("a", &[])],
        }),
        now: at(0),
    };
    Scenario::with_config(config(|c| c.retry.max_attempts = 1))
        .given_commands([user("[revision 1] fetch the report")])
        .when(failed("a", 1, false, 1))
        .then(|_, planner| {
            let s = planner.state();
            assert_eq!(s.revisions, 0, "a typed mark is no revision");
            assert_eq!(s.last_user_request(), Some("[revision 1] fetch the report"));
            assert!(matches!(s.phase, PlanPhase::Failed { .. }));
        })
        // Only a failed task is revised.
        .when(revise("nope", vec![work("b", &[])], 2))
        .then_expect_error(Error::UnknownTask {
            task_id: "nope".into(),
        })
        .when(revise("a", vec![work("a2", &[])], 2))
        .then(|events, planner| {
            assert!(events.iter().any(|e| matches!(
                e,
                Event::RequestReceived { revision_of: Some(t), .. } if t.as_str() == "a"
            )));
            assert!(events.iter().any(|e| matches!(
                e,
                Event::TasksPlanned { source: PlanSource::Llm, note: Some(n), .. }
                    if n == "revision after a failed"
            )));
            let s = planner.state();
            assert_eq!(s.revisions, 1);
            assert_eq!(s.phase, PlanPhase::Running);
            // The request a revision is for is still the user's.
            assert_eq!(s.last_user_request(), Some("[revision 1] fetch the report"));
        })
        .when(done("a2", 1, 3))
        .then(|_, planner| {
            assert_eq!(planner.state().phase, PlanPhase::Completed);
            // Replay (checked by `then`) and a snapshot keep the count.
            let bytes = serde_json::to_vec(planner.state()).expect("serializes");
            let restored: PlannerState = serde_json::from_slice(&bytes).expect("deserializes");
            assert_eq!(Planner::from_state(restored).state(), planner.state());
        })
        .when(revise("a2", vec![work("a3", &[])], 4))
        .then_expect_error(Error::NotRevisable {
            task_id: "a2".into(),
            status: TaskStatus::Completed,
        });
}

#[test]
fn a_request_without_a_revision_serializes_as_before() {
    let event = Event::RequestReceived {
        turn: 0,
        request_id: None,
        input: "fetch x".into(),
        attachments: vec![],
        revision_of: None,
        at: at(1),
    };
    assert_eq!(
        serde_json::to_string(&event).expect("serializes"),
        r#"{"type":"request_received","turn":0,"input":"fetch x","attachments":[],"at":1}"#
    );
}

// ----- summaries written outside the core -----

/// An LLM's summary is written from the context as it was when the call started; a
/// `CompactContext` without `through` folded everything but the newest message when it
/// arrived, so messages that came in during the call were dropped unsummarised. With `through`
/// only the messages the summary covers are replaced.
#[test]
fn a_summary_written_during_new_messages_replaces_only_what_it_covers() {
    let compact = |through: Option<u64>, now: u64| Command::CompactContext {
        summary: Some("LLM SUMMARY".into()),
        through,
        now: at(now),
    };
    let scenario = Scenario::new().given_commands([
        init_plan(vec![work("a", &[]), work("b", &[])]),
        done("a", 1, 1),
    ]);
    // The summary is asked for now: it covers the two messages there are.
    let context = &scenario.planner().state().context;
    assert_eq!(context.messages.len(), 2);
    let through = context.folded + 2;
    // Meanwhile b completes and the user asks for more.
    let scenario = scenario
        .given_commands([done("b", 1, 2), init_plan(vec![work("c", &[])])])
        .when(compact(Some(through), 3))
        .then(|events, planner| {
            let Some(Event::ContextCompacted {
                folded_messages, ..
            }) = events.first()
            else {
                panic!("expected a compaction: {events:#?}");
            };
            assert_eq!(*folded_messages, 2);
            let context = &planner.state().context;
            assert_eq!(context.summary.as_deref(), Some("LLM SUMMARY"));
            assert_eq!(context.folded, 2);
            let kept: Vec<&str> = context
                .messages
                .iter()
                .map(|m| m.content.as_str())
                .collect();
            assert_eq!(kept, ["b (tool): output of b", "planned request"]);
        });
    // A summary written before that compaction covers less than the one in place: no change.
    scenario
        .when(compact(Some(1), 4))
        .then_expect_nothing()
        // One that covers everything folds everything.
        .when(compact(Some(4), 5))
        .then(|_, planner| {
            let context = &planner.state().context;
            assert!(context.messages.is_empty());
            assert_eq!(context.folded, 4);
        });
}
