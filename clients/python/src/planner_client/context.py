"""What a handler gets besides its task, and what it may return.

The context is how the executor talks to a running handler: it carries the lease and, above
all, the stop signal. It is backed by a `threading.Event` rather than an `asyncio.Event`
because synchronous handlers run in worker threads and must be able to read (and wait on) it
without the event loop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .errors import Cancelled
from .models.task_message import TaskMessage


@dataclass(frozen=True)
class TaskResult:
    """A completed attempt: its output and, optionally, the tokens it used.

    Return a plain `str` when there is nothing to count; `tokens_used` is counted against the
    session's token budget (`planner.budgets.max_tokens`).
    """

    output: str
    tokens_used: int | None = None


class TaskContext:
    """The running attempt as the handler sees it.

    Stopping: the planner stops an attempt when its task is cancelled, when it was superseded
    by a later attempt, or when the executor shuts down and its grace period ran out. An async
    handler is then cancelled at its next `await`; a synchronous one (run in a thread, which
    Python cannot kill) must look: `is_cancelled()`, `raise_if_cancelled()`, or
    `wait(seconds)` instead of `time.sleep`. Either way its result is discarded.
    """

    def __init__(
        self,
        task: TaskMessage,
        lease: str,
        heartbeat_interval: float | None,
        *,
        traceparent: str | None = None,
    ) -> None:
        self.task = task
        """The dispatch being run."""
        self.lease = lease
        """The claim's lease: heartbeats and the report carry it."""
        self.heartbeat_interval = heartbeat_interval
        """Seconds between heartbeats, or None when the planner times out no silent attempt."""
        self.traceparent = traceparent
        """The dispatch's W3C `traceparent` header, if it had one: the claim, the heartbeats and
        the report carry it, and a handler may pass it on to what it calls (an HTTP request's
        `traceparent` header) to keep that work in the same trace."""
        self.logger = logging.getLogger(f"planner_client.task.{task.target}")
        """A logger named after the target."""
        self._stopped = threading.Event()
        self._stop_reason: str | None = None
        self._shutting_down = threading.Event()

    @property
    def cancel_event(self) -> threading.Event:
        """Set when the attempt must stop; threads can `wait()` on it."""
        return self._stopped

    def is_cancelled(self) -> bool:
        """Whether the attempt must stop (its result would be discarded)."""
        return self._stopped.is_set()

    @property
    def stop_reason(self) -> str | None:
        """Why it must stop: the planner's `cancelled`, `superseded`, ..., or `shutdown`."""
        return self._stop_reason

    def raise_if_cancelled(self) -> None:
        """Raises `Cancelled` if the attempt must stop: call it between steps of blocking work."""
        if self._stopped.is_set():
            raise Cancelled(self._stop_reason or "stopped")

    def wait(self, seconds: float) -> None:
        """Sleeps up to `seconds` in a synchronous handler, raising `Cancelled` at once on a stop."""
        if self._stopped.wait(seconds):
            raise Cancelled(self._stop_reason or "stopped")

    @property
    def shutting_down(self) -> bool:
        """Whether the executor is shutting down: finish soon, or the attempt is handed back."""
        return self._shutting_down.is_set()

    def _stop(self, reason: str) -> None:
        """Marks the attempt stopped (the first reason wins)."""
        if not self._stopped.is_set():
            self._stop_reason = reason
            self._stopped.set()

    def _begin_shutdown(self) -> None:
        self._shutting_down.set()
