"""Commands to a session: request/reply on `planner.cmd.<session>`.

The reply is either the events the command caused, already persisted, or an error after which
nothing changed (raised as `PlannerError`). Replies are read leniently like the event log (see
`events`): an event type unknown to these models does not make an accepted command look failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel

from . import wire
from .errors import PlannerError
from .events import SessionEvent, parse_event
from .models.command_reply import CommandReplyError
from .subjects import Subjects


@dataclass(frozen=True)
class CommandResult:
    """An accepted command: the session's version after it and the events it caused."""

    version: int
    events: list[SessionEvent]


async def send(
    nc: NatsClient,
    subjects: Subjects,
    session: str,
    command: BaseModel,
    timeout: float,
    traceparent: str | None = None,
) -> CommandResult:
    """Sends one command and waits for its reply.

    Raises `PlannerError` when the planner refuses it, and `nats.errors.TimeoutError` or
    `nats.errors.NoRespondersError` when no planner answers (then nobody knows whether it was
    applied: resend an `initialize` with the same `request_id`, which makes that safe).
    `traceparent`, a W3C Trace Context header, puts the command and the work it causes (the
    dispatches, and the executors' requests that carry theirs on) in that trace.
    """
    reply = await nc.request(subjects.command(session), wire.encode(command), timeout=timeout,
                             headers=wire.trace_headers(traceparent))
    body = json.loads(reply.data)
    if body.get("status") == "ok":
        return CommandResult(
            version=int(body["version"]),
            events=[parse_event(e, session_version=int(body["version"])) for e in body["events"]],
        )
    error = CommandReplyError.model_validate(body)
    raise PlannerError(error.kind, error.message)


RETRYABLE_TRANSPORT = (nats.errors.TimeoutError, nats.errors.NoRespondersError)
"""No answer: the command may or may not have been applied."""
