//! Events to store.

use planner_core::*;

/// `n` synthetic events; every tenth carries non-ASCII text.
pub fn events(n: usize, tag: &str) -> Vec<Event> {
    (0..n)
        .map(|i| Event::TaskStatusUpdated {
            task_id: TaskId(format!("{tag}{i}")),
            attempt: 1,
            status: TaskStatus::Completed,
            output: Some(if i % 10 == 0 {
                format!("résultat {i}: 日本語 🚀 \u{0}")
            } else {
                format!("result {i}")
            }),
            error: None,
            tokens_used: Some(i as u64),
            at: Timestamp(i as u64),
        })
        .collect()
}

/// A real session, process() call by process() call: the batches a shell would append.
pub fn real_session() -> Vec<Vec<Event>> {
    let mut planner = Planner::with_config(PlannerConfig {
        max_parallel: 3,
        token_budget: 200,
        ..PlannerConfig::default()
    })
    .unwrap();
    let mut batches = vec![planner
        .process(Command::Initialize {
            request_id: None,
            planning: None,
            input: "- fetch a\n- fetch b\n- fetch c\n- summarize\n- analyze d\n- translate e"
                .into(),
            attachments: vec![],
            plan: None,
            now: Timestamp(0),
        })
        .unwrap()];
    let mut now = 0;
    while !planner.state().phase.is_terminal() {
        now += 10;
        let running: Vec<(TaskId, u32)> = planner
            .state()
            .tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Running)
            .map(|t| (t.id.clone(), t.attempts))
            .collect();
        let Some((task_id, attempt)) = running.into_iter().next() else {
            break;
        };
        let outcome = if attempt == 1 && task_id.as_str() == "t2" {
            ExecutorOutcome::Failed {
                error: "flaky".into(),
                retryable: true,
                tokens_used: None,
            }
        } else {
            ExecutorOutcome::Completed {
                output: format!("output of {task_id} ").repeat(20),
                tokens_used: Some(5),
            }
        };
        batches.push(
            planner
                .process(Command::HandleExecutorEvent {
                    lease: None,
                    event: ExecutorEvent {
                        task_id,
                        attempt,
                        outcome,
                    },
                    now: Timestamp(now),
                })
                .unwrap(),
        );
        if let Some(deadline) = planner.next_deadline() {
            now = now.max(deadline.as_millis());
            batches.push(
                planner
                    .process(Command::Tick {
                        now: Timestamp(now),
                    })
                    .unwrap(),
            );
        }
    }
    batches.retain(|b| !b.is_empty());
    batches
}

/// `list_open` once it equals `expected`, or as it is after 5 s: a store may drop an ended
/// session's marker after the append that ended it returned (the JetStream store does, in a
/// task of its own), never before.
pub async fn open_streams_settled<S: planner_store::EventStore>(
    store: &S,
    expected: &[&str],
) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let open = store.list_open().await.unwrap();
        if open == expected || std::time::Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Single events that open or end a plan, for the index of unfinished sessions.
pub mod lifecycle {
    use planner_core::*;

    pub fn started() -> Event {
        Event::SessionStarted {
            config: Box::default(),
            at: Timestamp(1),
        }
    }

    pub fn planned() -> Event {
        Event::TasksPlanned {
            turn: 1,
            source: PlanSource::Rules,
            note: None,
            tasks: vec![],
        }
    }

    pub fn completed() -> Event {
        Event::PlanCompleted { at: Timestamp(2) }
    }

    pub fn cancelled() -> Event {
        Event::PlanCancelled {
            reason: None,
            at: Timestamp(2),
        }
    }
}
