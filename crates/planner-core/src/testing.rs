//! Given/when/then for planners: each test reads as a story.
//!
//! ```
//! use planner_core::testing::Scenario;
//! use planner_core::*;
//!
//! Scenario::new()
//!     .when(Command::Continue)
//!     .then_expect_error(Error::NotInitialized);
//! ```

use crate::command::Command;
use crate::config::PlannerConfig;
use crate::error::Error;
use crate::event::Event;
use crate::planner::Planner;

/// A planner given some history, about to receive one command.
///
/// Every `then_*` returns the scenario with the command's events added to the history, so a
/// story can go on with another `when`.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    planner: Planner,
    history: Vec<Event>,
}

/// The outcome of [`Scenario::when`], to be checked.
#[derive(Debug)]
#[must_use = "a scenario checks nothing until a then_* method is called"]
pub struct Outcome {
    planner: Planner,
    before: Planner,
    history: Vec<Event>,
    result: Result<Vec<Event>, Error>,
}

impl Scenario {
    /// A fresh planner with the default config.
    pub fn new() -> Self {
        Scenario::default()
    }

    /// A fresh planner with `config`.
    ///
    /// # Panics
    /// If the config is invalid: a test setup error.
    #[allow(clippy::expect_used)]
    pub fn with_config(config: PlannerConfig) -> Self {
        Scenario {
            planner: Planner::with_config(config).expect("scenario config must be valid"),
            history: Vec::new(),
        }
    }

    /// History the planner has already applied.
    pub fn given(mut self, events: impl IntoIterator<Item = Event>) -> Self {
        for event in events {
            self.planner.apply(&event);
            self.history.push(event);
        }
        self
    }

    /// Commands the planner has already processed, with their events taken as history.
    ///
    /// # Panics
    /// If one of them is refused: a test setup error.
    #[allow(clippy::expect_used)]
    pub fn given_commands(mut self, commands: impl IntoIterator<Item = Command>) -> Self {
        for command in commands {
            let events = self
                .planner
                .process(command)
                .expect("given commands must be accepted");
            self.history.extend(events);
        }
        self
    }

    /// The planner as given so far.
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Every event so far.
    pub fn history(&self) -> &[Event] {
        &self.history
    }

    /// The command under test.
    pub fn when(mut self, command: Command) -> Outcome {
        let before = self.planner.clone();
        let result = self.planner.process(command);
        Outcome {
            planner: self.planner,
            before,
            history: self.history,
            result,
        }
    }
}

#[allow(clippy::panic)]
impl Outcome {
    /// Asserts the command emitted exactly these events, and that replay agrees.
    pub fn then_expect_events(self, expected: &[Event]) -> Scenario {
        match &self.result {
            Ok(events) => assert_eq!(events.as_slice(), expected, "emitted events"),
            Err(e) => panic!("expected events, got error: {e}"),
        }
        self.check_replay()
    }

    /// Asserts the command emitted events of these types, in order, and that replay agrees.
    pub fn then_expect_types(self, expected: &[&str]) -> Scenario {
        match &self.result {
            Ok(events) => {
                let types: Vec<&str> = events.iter().map(Event::event_type).collect();
                assert_eq!(types, expected, "emitted event types: {events:#?}");
            }
            Err(e) => panic!("expected events, got error: {e}"),
        }
        self.check_replay()
    }

    /// Asserts the command was accepted and emitted nothing.
    pub fn then_expect_nothing(self) -> Scenario {
        self.then_expect_events(&[])
    }

    /// Asserts the command was refused with `expected`, and that the planner did not change.
    pub fn then_expect_error(self, expected: Error) -> Scenario {
        match &self.result {
            Ok(events) => panic!("expected error {expected:?}, got events {events:#?}"),
            Err(e) => assert_eq!(e, &expected, "error"),
        }
        assert_eq!(
            self.planner.state(),
            self.before.state(),
            "a refused command changed the state"
        );
        Scenario {
            planner: self.planner,
            history: self.history,
        }
    }

    /// Hands the events and the planner to `check`, after asserting replay agrees.
    pub fn then(self, check: impl FnOnce(&[Event], &Planner)) -> Scenario {
        let events = match &self.result {
            Ok(events) => events.clone(),
            Err(e) => panic!("expected events, got error: {e}"),
        };
        let scenario = self.check_replay();
        check(&events, &scenario.planner);
        scenario
    }

    fn check_replay(self) -> Scenario {
        let mut history = self.history;
        if let Ok(events) = self.result {
            history.extend(events);
        }
        // Before the first event the config lives only in the live planner; from then on the
        // first event carries it.
        if !history.is_empty() {
            let replayed = Planner::fold(&history);
            assert_eq!(
                replayed.state(),
                self.planner.state(),
                "fold(events) differs from live state"
            );
        }
        Scenario {
            planner: self.planner,
            history,
        }
    }
}
