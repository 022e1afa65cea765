"""The planner's NATS subjects and stream names, in one place.

Every subject starts with a prefix (`planner` unless the daemon's `subjects.prefix` says
otherwise), so nothing else in this package spells a subject: a deployment with another prefix
changes one argument. The layout is docs/protocol.md's table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["tool_call", "processing"]
"""The kinds of work that reach executors (clarifications go to UIs)."""

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_valid_token(value: str) -> bool:
    """Whether `value` may be a session id, task id or target: 1 to 64 of `A-Z a-z 0-9 _ -`.

    The planner refuses anything else (`bad_session`); checking here turns a typo into an
    error at the call instead of a refused request or, worse, a subject with a wildcard in it.
    """
    return bool(_TOKEN.match(value))


def check_token(value: str, what: str) -> str:
    """Returns `value`, or raises ValueError naming `what` if it is not a valid token."""
    if not is_valid_token(value):
        raise ValueError(f"{what} {value!r} is not 1 to 64 characters of A-Z a-z 0-9 _ -")
    return value


@dataclass(frozen=True)
class Subjects:
    """Subject and stream names under one prefix.

    The stream names are the daemon's defaults (`dispatch.stream_name`,
    `store.stream_name`); change them here if its configuration does.
    """

    prefix: str = "planner"
    tasks_stream: str = "PLANNER_TASKS"
    events_stream: str = "PLANNER_EVENTS"

    def command(self, session: str) -> str:
        """Where commands for `session` go (request/reply)."""
        return f"{self.prefix}.cmd.{check_token(session, 'session')}"

    def task(self, kind: TaskKind, target: str) -> str:
        """Where dispatches of `kind` for `target` are published (JetStream work queue)."""
        return f"{self.prefix}.task.{kind}.{check_token(target, 'target')}"

    def offer(self, kind: TaskKind, target: str) -> str:
        """Where dispatches of `kind` for `target` are offered before the stream (request/reply)."""
        return f"{self.prefix}.offer.{kind}.{check_token(target, 'target')}"

    def addressed(self, owner: str, subject: str) -> str:
        """`subject` sent to the planner instance `owner` (docs/protocol.md, "Addressing the owner")."""
        return f"{self.prefix}.fwd.{check_token(owner, 'owner')}.{subject}"

    def claim(self, session: str) -> str:
        """Where an executor claims an attempt (request/reply)."""
        return f"{self.prefix}.claim.{session}"

    def heartbeat(self, session: str) -> str:
        """Where an executor heartbeats a claimed attempt (request/reply)."""
        return f"{self.prefix}.heartbeat.{session}"

    def result(self, session: str) -> str:
        """Where an executor sends the outcome of an attempt directly (request/reply)."""
        return f"{self.prefix}.result.{session}"

    def report(self, session: str) -> str:
        """Where an executor publishes the outcome of an attempt (through JetStream)."""
        return f"{self.prefix}.report.{session}"

    def question(self, session: str) -> str:
        """Where questions of `session` are published; `*` for every session."""
        return f"{self.prefix}.ui.{session}.question"

    def cancel(self, session: str = "*", task: str = "*") -> str:
        """Where cancellations of running attempts are published; wildcards by default."""
        return f"{self.prefix}.cancel.{session}.{task}"

    def events(self, session: str) -> str:
        """The subject of `session`'s event log in the events stream."""
        return f"{self.prefix}.events.{check_token(session, 'session')}"
