"""The client: what users, UIs and upstream agents ask of a session, and what they watch.

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        await client.submit("s-42", "1. search for flights\\n2. summarize the options")
        async for event in client.watch("s-42"):
            print(event.type)
            if event.ends_plan:
                break
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel

from . import commands, events, ui
from .commands import CommandResult
from .errors import PlannerError
from .events import SessionEvent
from .models.command import (
    Attachment,
    CancelTargetPlan,
    CancelTargetTask,
    ClientCommandAnswerClarification,
    ClientCommandCancel,
    ClientCommandContinue,
    ClientCommandInitialize,
    Planning,
    PlanSpec,
)
from .subjects import Subjects, check_token


class Client:
    """Commands, event watching and questions for planner sessions, over one NATS connection.

    Build it on a connection you own (`Client(nc)`), or let it connect (`await
    Client.connect(...)`), in which case `close()` (or leaving `async with`) drains it.

    Every command method takes an optional `traceparent` (a W3C Trace Context header value,
    `00-<trace id>-<span id>-<flags>`): the command is handled in that trace, and the dispatches
    it causes, and the executors' claims and reports, stay in it (docs/observability.md).
    """

    def __init__(
        self, nc: NatsClient, *, subjects: Subjects | None = None, request_timeout: float = 10.0
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects or Subjects()
        self.request_timeout = request_timeout
        self._owns_connection = False

    @classmethod
    async def connect(
        cls,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        subjects: Subjects | None = None,
        request_timeout: float = 10.0,
        **connect_options: Any,
    ) -> Client:
        """Connects to NATS and returns a client that owns the connection."""
        client = cls(await nats.connect(servers, **connect_options), subjects=subjects,
                     request_timeout=request_timeout)
        client._owns_connection = True
        return client

    async def close(self) -> None:
        """Drains the connection if this client opened it."""
        if self._owns_connection and not self.nc.is_closed:
            await self.nc.drain()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Commands ----------------------------------------------------------------------------

    async def send(
        self, session: str, command: BaseModel, *, traceparent: str | None = None
    ) -> CommandResult:
        """Sends any command model (`models.command.ClientCommand*`); raises `PlannerError`."""
        return await commands.send(self.nc, self.subjects, session, command, self.request_timeout,
                                   traceparent)

    async def submit(
        self,
        session: str,
        input: str,
        *,
        request_id: str | None = None,
        plan: PlanSpec | dict[str, Any] | None = None,
        planning: Planning | dict[str, Any] | None = None,
        attachments: Sequence[Attachment | BaseModel | dict[str, Any]] = (),
        retries: int = 3,
        traceparent: str | None = None,
    ) -> CommandResult:
        """Sends a request (`initialize`): the first starts the session, later ones follow up.

        `plan` replaces the planner's own planning (validated, refused whole if invalid).
        `request_id` makes the request idempotent; one is generated when not given, so that
        this method can resend it safely when no reply comes (up to `retries` times, also on
        `conflict` and `unavailable`): the planner applies a request id once.
        """
        command = ClientCommandInitialize.model_validate({
            "type": "initialize",
            "input": input,
            "request_id": request_id or uuid.uuid4().hex,
            "plan": _plain(plan),
            "planning": _plain(planning),
            "attachments": [_plain(a) for a in attachments],
        })
        delay = 0.2
        for attempt in range(retries + 1):
            try:
                return await self.send(session, command, traceparent=traceparent)
            except commands.RETRYABLE_TRANSPORT:
                if attempt == retries:
                    raise
            except PlannerError as error:
                if not error.retryable or attempt == retries:
                    raise
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def answer(
        self, session: str, task_id: str, answer: str, *, traceparent: str | None = None
    ) -> CommandResult:
        """Answers the question of `task_id` (`answer_clarification`)."""
        return await self.send(session, ClientCommandAnswerClarification(
            type="answer_clarification", task_id=task_id, answer=answer), traceparent=traceparent)

    async def cancel(
        self,
        session: str,
        task_id: str | None = None,
        *,
        reason: str | None = None,
        traceparent: str | None = None,
    ) -> CommandResult:
        """Cancels one task and its dependents, or with no `task_id` the whole plan.

        A running attempt stops within one heartbeat interval of its executor.
        """
        target = (CancelTargetTask(scope="task", task_id=task_id) if task_id is not None
                  else CancelTargetPlan(scope="plan"))
        return await self.send(session, ClientCommandCancel(type="cancel", target=target,
                                                            reason=reason),
                               traceparent=traceparent)

    async def continue_(self, session: str, *, traceparent: str | None = None) -> CommandResult:
        """Dispatches whatever is ready (`continue`; a no-op unless something is)."""
        return await self.send(session, ClientCommandContinue(type="continue"),
                               traceparent=traceparent)

    # Events and questions ----------------------------------------------------------------

    def watch(self, session: str, *, from_start: bool = True) -> AsyncGenerator[SessionEvent, None]:
        """The session's events as an async iterator: its log from the start (or from now),
        then live, without end. Break out when done (`event.ends_plan` marks a plan's end)."""
        check_token(session, "session")
        return events.watch(self.js, self.subjects, session, from_start=from_start)

    async def history(self, session: str) -> list[SessionEvent]:
        """The session's events so far."""
        return await events.history(self.js, self.subjects, check_token(session, "session"))

    async def wait_for_end(self, session: str, timeout: float | None = None) -> SessionEvent:
        """Waits for the session's current plan to end; returns the event that ended it
        (`plan_completed`, `plan_failed` or `plan_cancelled`), at once if it already has.
        Reads the log's last batch and what follows, never the whole log. Raises
        `asyncio.TimeoutError` after `timeout` seconds."""
        check_token(session, "session")
        return await asyncio.wait_for(events.until_end(self.js, self.subjects, session), timeout)

    def questions(
        self, session: str = "*", *, include_open: bool = True
    ) -> AsyncGenerator[ui.Question, None]:
        """Questions for humans as they arrive, for one session or every one (`*`); see `ui`."""
        if session != "*":
            check_token(session, "session")
        return ui.questions(self.nc, self.js, self.subjects, self.answer, session,
                            include_open=include_open)


def _plain(value: Any) -> Any:
    """Models from any generated module (each has its own copies) as plain data."""
    return value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value
