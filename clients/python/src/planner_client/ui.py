"""Questions for humans, as they arrive: what a UI is made of.

Questions are published on core NATS (`planner.ui.<session>.question`): a UI that was not
subscribed when one was asked missed it. They are also events in the session's log, so for one
session the helper first subscribes (so nothing asked from now on is missed), then reads the log
for questions still open, then follows the subscription; the same (task, attempt) is yielded
once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from . import events, wire
from .commands import CommandResult
from .models.question_message import QuestionMessage
from .subjects import Subjects

log = logging.getLogger(__name__)

class Answerer(Protocol):
    """`answer(session, task_id, text, traceparent=...)`: how a question answers itself (the
    Client's `answer`)."""

    def __call__(
        self, session: str, task_id: str, answer: str, *, traceparent: str | None = None
    ) -> Awaitable[CommandResult]: ...


@dataclass(frozen=True)
class Question:
    """A question waiting for a human."""

    session: str
    task_id: str
    attempt: int
    text: str
    """The question."""
    deadline: int | None
    """Milliseconds since the epoch after which the planner's timeout action happens, if set."""
    _answerer: Answerer = field(repr=False, compare=False)
    traceparent: str | None = None
    """The W3C trace context the question was asked in (its message's `traceparent` header);
    None for a question read back from the log."""

    async def answer(self, text: str, *, traceparent: str | None = None) -> CommandResult:
        """Sends `text` as the answer (`answer_clarification`), in `traceparent`'s trace, or by
        default in the question's: the work the answer unblocks stays in the request's trace."""
        return await self._answerer(self.session, self.task_id, text,
                                    traceparent=traceparent or self.traceparent)


def open_questions(log_events: list[events.SessionEvent]) -> list[tuple[str, int, str, int | None]]:
    """(task, attempt, question, deadline) of every question in the log not yet answered or closed.

    A question is closed by its answer, by its task's cancellation or end, or by the plan's end.
    """
    asked: dict[str, tuple[str, int, str, int | None]] = {}
    for event in log_events:
        data = event.data
        task_id = str(data.get("task_id", ""))
        if event.type == "clarification_requested":
            cmd = data.get("cmd") or {}
            asked[task_id] = (task_id, int(data.get("attempt", 0)), str(cmd.get("question", "")),
                              cmd.get("deadline"))
        elif event.type in ("clarification_answered", "task_cancelled") or (
            event.type == "task_status_updated"
            and data.get("status") in ("completed", "failed", "cancelled")
        ):
            asked.pop(task_id, None)
        elif event.ends_plan:
            asked.clear()
    return list(asked.values())


async def questions(
    nc: NatsClient,
    js: JetStreamContext,
    subjects: Subjects,
    answerer: Answerer,
    session: str = "*",
    *,
    include_open: bool = True,
) -> AsyncGenerator[Question, None]:
    """Yields questions of `session` (or of every session, `*`) as they are asked, for ever.

    With `include_open` and one session, questions asked before the call and still open come
    first. Answering is up to the caller (`await question.answer(text)`); a question left
    unanswered stays open, and is yielded again by the next call.
    """
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def enqueue(msg: Msg) -> None:
        queue.put_nowait(msg)

    sub = await nc.subscribe(subjects.question(session), cb=enqueue)
    seen: set[tuple[str, str, int]] = set()
    try:
        if include_open and session != "*":
            for task_id, attempt, text, deadline in open_questions(
                await events.history(js, subjects, session)
            ):
                seen.add((session, task_id, attempt))
                yield Question(session, task_id, attempt, text, deadline, answerer)
        while True:
            msg = await queue.get()
            try:
                q = wire.decode(QuestionMessage, msg.data)
            except ValidationError as error:
                log.warning("ignoring an unreadable question on %s: %s", msg.subject, error)
                continue
            key = (q.session, q.task_id, q.attempt)
            if key in seen:
                continue
            seen.add(key)
            deadline = q.deadline.root if q.deadline is not None else None
            yield Question(q.session, q.task_id, q.attempt, q.question, deadline, answerer,
                           wire.traceparent(msg.headers))
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001
            pass
