//! The Handler pattern: a pure decision function over commands, and a fold over events.

/// An event-sourced aggregate: `process` decides, `fold` rebuilds.
///
/// The law that ties the two together, checked by the property tests: for any sequence of
/// commands, folding every event `process` returned gives the state `process` left behind.
pub trait Handler: Sized {
    /// What the handler is asked to do.
    type Command;
    /// What happened, the only thing persisted.
    type Event;
    /// Why a command was refused (nothing was applied).
    type Error;

    /// Decides what `command` means, applies the resulting events and returns them. Pure: no IO,
    /// no clock, no randomness.
    fn process(&mut self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Rebuilds the handler from its history.
    fn fold<'a, I>(events: I) -> Self
    where
        I: IntoIterator<Item = &'a Self::Event>,
        Self::Event: 'a;
}
