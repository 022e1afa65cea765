"""Exceptions: the ones handlers raise to say how an attempt ended, and the ones this package raises.

A handler's exception decides the report (docs/protocol.md, "Reports"):

| raised in the handler        | report                                         |
|------------------------------|------------------------------------------------|
| `Retryable`                  | `failed`, `retryable: true`                    |
| `Fatal`                      | `failed`, `retryable: false`                   |
| `NeedsClarification`         | `needs_clarification` with the question        |
| any other `Exception`        | `failed`, `retryable: true` (a bug or an outage |
|                              | looks the same from here; the planner's retry  |
|                              | policy bounds the attempts)                    |

Whether another attempt comes is the planner's decision (its retry policy), not the executor's:
`retryable` only says whether one could succeed.
"""

from __future__ import annotations


class TaskFailure(Exception):
    """Base of the exceptions a handler raises to fail its attempt on purpose.

    `tokens_used` is counted against the session's token budget even though the attempt failed.
    """

    retryable: bool = True

    def __init__(self, message: str, *, tokens_used: int | None = None) -> None:
        super().__init__(message)
        self.tokens_used = tokens_used


class Retryable(TaskFailure):
    """The attempt failed, but another may succeed (a timeout, a 503, a rate limit)."""

    retryable = True


class Fatal(TaskFailure):
    """The attempt failed, and another would fail the same way (bad input, a 404, a refusal)."""

    retryable = False


class NeedsClarification(Exception):
    """The handler needs a human's answer to go on.

    The attempt ends with a `needs_clarification` report; a UI shows the question; after the
    answer the task is dispatched again as a new attempt whose `TaskMessage.answer` holds it.
    """

    def __init__(self, question: str) -> None:
        super().__init__(question)
        self.question = question


class Cancelled(Exception):
    """Raised by `TaskContext.raise_if_cancelled()` inside a handler whose attempt was stopped.

    Async handlers are cancelled the asyncio way (they see `asyncio.CancelledError` at their
    next `await`); this one is for synchronous handlers running in a thread, which Python cannot
    interrupt: they check the context and raise it. Whatever a stopped attempt returns or
    raises is discarded: the planner has already moved on, and no report is sent.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the attempt was stopped: {reason}")
        self.reason = reason


class PlannerError(Exception):
    """The planner refused a command (`{"status": "error", ...}`): nothing changed.

    `kind` is one of docs/protocol.md's error kinds; `retryable` says whether sending the same
    command again later can succeed (`conflict`, `unavailable`).
    """

    RETRYABLE_KINDS = frozenset({"conflict", "unavailable"})

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    @property
    def retryable(self) -> bool:
        """Whether the same command may succeed later."""
        return self.kind in self.RETRYABLE_KINDS


class CorruptLog(Exception):
    """A batch of a session's event log cannot be read (not a JSON array of event envelopes):
    written by something other than the planner, or damaged. Reading that session's events
    (`watch`, `history`, `wait_for_end`) stops here rather than skip what it cannot read.

    The daemon quarantines such a session; `planner-svc check` reports the batch, and
    `planner-svc replay` reads the log batch by batch (README, "Operations").
    """

    def __init__(self, session: str, sequence: int | None, reason: str) -> None:
        where = f"stream sequence {sequence}" if sequence is not None else "an unknown position"
        super().__init__(f"the event log of session {session} has an unreadable batch at "
                         f"{where}: {reason}")
        self.session = session
        self.sequence = sequence
        self.reason = reason
