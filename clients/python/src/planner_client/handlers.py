"""Handlers: what a registered function is, how it is called, and how its ending becomes a report.

A handler is `fn(task: TaskMessage, ctx: TaskContext)`, async or not. Async handlers run on the
event loop; synchronous ones run in the executor's own thread pool (one thread per concurrency
slot), so blocking code never stalls the loop that sends the heartbeats: a handler that blocks
the loop for longer than the planner's heartbeat timeout would have its attempt taken away.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import reporting
from .context import TaskContext, TaskResult
from .errors import Cancelled, NeedsClarification, TaskFailure
from .models.task_message import TaskMessage
from .subjects import TaskKind

log = logging.getLogger(__name__)

HandlerResult = str | TaskResult
"""What a handler returns: the output, or the output with the tokens it used."""

HandlerFn = Callable[[TaskMessage, TaskContext], HandlerResult | Awaitable[HandlerResult]]
"""A handler: `fn(task, ctx) -> str | TaskResult`, plain or `async`."""


@dataclass(frozen=True)
class Handler:
    """A registered handler and the subject it serves."""

    kind: TaskKind
    target: str
    fn: HandlerFn

    @property
    def is_async(self) -> bool:
        """Whether it runs on the event loop (else in a worker thread)."""
        fn: Any = self.fn
        while isinstance(fn, functools.partial):
            fn = fn.func
        return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object whose __call__ is async
        )


async def call(handler: Handler, task: TaskMessage, ctx: TaskContext, threads: ThreadPoolExecutor) -> Any:
    """Runs the handler to its end; its exceptions propagate."""
    if handler.is_async:
        return await handler.fn(task, ctx)  # type: ignore[misc]
    # As asyncio.to_thread does, but on our pool: the default pool is shared with everything
    # else and sized for the machine, not for the executor's concurrency.
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(threads, functools.partial(context.run, handler.fn, task, ctx))


def report_for(work: asyncio.Future[Any] | Future[Any], task: TaskMessage, lease: str) -> reporting.Report:
    """The report of a handler that ended on its own (not stopped); `work` is its finished future."""
    try:
        result = work.result()
    except TaskFailure as failure:
        return reporting.failed(
            task, lease, str(failure) or type(failure).__name__,
            retryable=failure.retryable, tokens_used=failure.tokens_used,
        )
    except NeedsClarification as ask:
        return reporting.needs_clarification(task, lease, ask.question)
    except Cancelled as cancelled:
        # Nobody stopped the attempt: the handler raised it on its own.
        return reporting.failed(task, lease, str(cancelled), retryable=True)
    except asyncio.CancelledError:
        return reporting.failed(task, lease, "the handler was cancelled", retryable=True)
    except ValidationError as error:
        # The handler could not read its input (the task, or what it derived from it): the next
        # attempt gets the same input and would fail the same way.
        log.warning("handler %s could not validate its input on %s/%s attempt %s: %s",
                    task.target, task.session, task.task_id, task.attempt, error)
        return reporting.failed(task, lease, f"invalid input: {error}", retryable=False)
    except Exception as error:  # any other failure is reported, retryable
        log.warning("handler %s failed on %s/%s attempt %s", task.target, task.session,
                    task.task_id, task.attempt, exc_info=error)
        return reporting.failed(task, lease, f"{type(error).__name__}: {error}", retryable=True)
    if isinstance(result, TaskResult):
        return reporting.completed(task, lease, result.output, result.tokens_used)
    if isinstance(result, str):
        return reporting.completed(task, lease, result, None)
    return reporting.failed(
        task, lease,
        f"the handler returned {type(result).__name__}; it must return str or TaskResult",
        retryable=False,
    )
