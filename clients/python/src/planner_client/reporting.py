"""Reports: the outcome of an attempt, sent to the planner directly, else through JetStream.

A report is the one message of the protocol that must not be lost (the work it describes may not
be repeatable). `send` first asks the planner directly (a request on
`planner.result.<session>`, answered once the report's events are stored: no stream write), and
when that gets no `ok` or `refused` (no planner running, no reply in time, `retry`) it
publishes the report through JetStream, retried with backoff until the server acks it, even
while no planner runs (docs/protocol.md, "Reports"). A published report carries a
`Nats-Msg-Id` of (session, task, attempt, status): a retry after a lost ack is then dropped by
the stream's duplicate window instead of being stored twice. A report that arrives both ways is
applied once: the planner ignores the second. Either way it carries the dispatch's `traceparent`
header when the dispatch had one.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext
from pydantic import BaseModel, ValidationError

from . import routing, wire
from .models.executor_report import (
    ReportMessageCompleted,
    ReportMessageFailed,
    ReportMessageNeedsClarification,
    ReportMessageStarted,
)
from .models.report_reply import NextTask, ReportReply, ReportReplyOk, ReportReplyRefused
from .models.task_message import TaskMessage
from .pause import Pause
from .subjects import Subjects

log = logging.getLogger(__name__)

Report = (
    ReportMessageStarted | ReportMessageCompleted | ReportMessageFailed | ReportMessageNeedsClarification
)

MAX_REPORT_BYTES = 256 * 1024
"""The daemon's `limits.max_message_bytes`: a larger report is refused by the report stream."""

DIRECT_PAUSE_FIRST = 1.0
"""Seconds reports go to the stream only after a direct report got no reply in time: the
first pause; each further one doubles, up to `DIRECT_PAUSE`, until a direct report is answered."""

DIRECT_PAUSE = 30.0
"""The longest pause of direct reports."""

ERROR_CHARS = 8000
"""Errors are cut to this many characters (the planner keeps even fewer: `error_char_limit`)."""


def completed(task: TaskMessage, lease: str, output: str, tokens_used: int | None) -> Report:
    """A `completed` report, or a non-retryable `failed` one if the output cannot be sent.

    An output over the report limit would be refused by JetStream on every retry; failing the
    attempt says why instead (pass large outputs by reference: docs/protocol.md, "Limits").
    """
    report = ReportMessageCompleted(
        task_id=task.task_id, attempt=task.attempt, lease=lease, status="completed",
        output=output, tokens_used=tokens_used,
    )
    size = len(wire.encode(report))
    if size <= MAX_REPORT_BYTES:
        return report
    return failed(
        task, lease,
        f"the output is {size} bytes with its report, more than the {MAX_REPORT_BYTES} a report "
        "may carry; return a reference (a URL or an object key) to large outputs",
        retryable=False, tokens_used=tokens_used,
    )


def failed(
    task: TaskMessage, lease: str, error: str, *, retryable: bool, tokens_used: int | None = None
) -> Report:
    """A `failed` report; long errors keep their head and tail."""
    if len(error) > ERROR_CHARS:
        half = ERROR_CHARS // 2
        error = f"{error[:half]} [...] {error[-half:]}"
    return ReportMessageFailed(
        task_id=task.task_id, attempt=task.attempt, lease=lease, status="failed",
        error=error, retryable=retryable, tokens_used=tokens_used,
    )


def needs_clarification(task: TaskMessage, lease: str, question: str) -> Report:
    """A `needs_clarification` report: the attempt ends and a human is asked."""
    return ReportMessageNeedsClarification(
        task_id=task.task_id, attempt=task.attempt, lease=lease, status="needs_clarification",
        question=question,
    )


def started(task: TaskMessage, lease: str) -> Report:
    """A `started` report (optional in the protocol)."""
    return ReportMessageStarted(
        task_id=task.task_id, attempt=task.attempt, lease=lease, status="started"
    )


class DirectReports(Pause):
    """Whether reports go to the planner directly now, for one executor.

    After a direct report got no reply in time (an overloaded or unreachable planner, or an
    executor user whose permissions do not allow `planner.result.*`), the next reports go
    to the stream without asking for `pause` seconds, instead of each waiting as long. The
    pause starts at `first` and doubles with each one, up to `longest`, until a direct report is
    answered: one lost reply (a NATS node killed under an append) costs a second of direct
    reports, a path that stays dead is soon left alone for the longest pause. Reports sent
    before a pause that time out during it are the same trouble, and add nothing.
    """

    def __init__(self, enabled: bool = True, first: float = DIRECT_PAUSE_FIRST,
                 longest: float = DIRECT_PAUSE) -> None:
        super().__init__(first)
        self.enabled = enabled
        self.first = first
        self.longest = longest

    def on(self) -> bool:
        return self.enabled and super().on()

    def timed_out(self) -> None:
        if not super().on():
            return
        super().timed_out()
        self.pause = min(self.pause * 2, self.longest)

    def answered(self) -> None:
        """A direct report was answered: the next pause, if any, is the first again."""
        self.pause = self.first


async def send(
    nc: NatsClient,
    js: JetStreamContext,
    subjects: Subjects,
    session: str,
    report: BaseModel,
    *,
    direct: DirectReports,
    timeout: float,
    give_up: asyncio.Event | None = None,
    trace: str | None = None,
    route: routing.Route = routing.USUAL,
) -> bool:
    """Sends `report` directly, else publishes it (`publish`); False only if `give_up` was set.

    A report the planner refuses (a wrong lease, an attempt it does not know) is dropped with an
    error in the log: the stream would refuse it the same way. `trace`: the dispatch's
    `traceparent`, carried on either way.
    """
    sent, _ = await send_taking_next(nc, js, subjects, session, report, direct=direct,
                                     timeout=timeout, give_up=give_up, trace=trace, route=route)
    return sent


async def send_taking_next(
    nc: NatsClient,
    js: JetStreamContext,
    subjects: Subjects,
    session: str,
    report: BaseModel,
    *,
    direct: DirectReports,
    timeout: float,
    give_up: asyncio.Event | None = None,
    trace: str | None = None,
    route: routing.Route = routing.USUAL,
) -> tuple[bool, NextTask | None]:
    """`send`, and the task the planner handed over in its reply when `report` asked for one
    (its `next`, docs/protocol.md "The next task with the reply"): run it now, it is yours."""
    if direct.on():
        status = getattr(report, "status", "report")
        task_id = getattr(report, "task_id", "?")
        attempt = getattr(report, "attempt", 0)
        subject = subjects.result(session)
        try:
            reply = await routing.request(nc, subjects, route, subject, wire.encode(report),
                                          timeout=timeout, headers=wire.trace_headers(trace))
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            log.warning("report %s of %s/%s attempt %s not answered in %.1fs; publishing it (and "
                        "the next %.0fs of reports) to the report stream", status, session,
                        task_id, attempt, timeout, direct.pause if direct.on() else 0)
            direct.timed_out()
        except nats.errors.Error as error:
            # No responders (no planner running), or the connection failed: the stream keeps it.
            log.debug("report %s of %s/%s attempt %s not sent directly (%s); publishing it",
                      status, session, task_id, attempt, error or type(error).__name__)
        else:
            try:
                answer = wire.decode_root(ReportReply, reply.data)
            except ValidationError:
                log.warning("unreadable reply to a report on %s: %r; publishing it", subject,
                            reply.data[:200])
            else:
                if isinstance(answer, ReportReplyOk):
                    direct.answered()
                    return True, answer.next
                if isinstance(answer, ReportReplyRefused):
                    log.error("report %s of %s/%s attempt %s refused by the planner (%s: %s); "
                              "dropped", status, session, task_id, attempt, answer.kind,
                              answer.message)
                    return True, None
                log.info("report %s of %s/%s attempt %s not handled now (%s); publishing it",
                         status, session, task_id, attempt, answer.kind)
    return await publish(js, subjects, session, report, give_up=give_up, trace=trace), None


async def publish(
    js: JetStreamContext,
    subjects: Subjects,
    session: str,
    report: BaseModel,
    *,
    give_up: asyncio.Event | None = None,
    ack_timeout: float = 5.0,
    trace: str | None = None,
) -> bool:
    """Publishes `report` until JetStream acks it; returns False only if `give_up` was set first.

    `give_up` is the executor's hard stop: without it a report to a NATS that never comes back
    would hold the process for ever. `trace`: the dispatch's `traceparent`, carried on.
    """
    body = wire.encode(report)
    status = getattr(report, "status", "report")
    task_id = getattr(report, "task_id", "?")
    attempt = getattr(report, "attempt", 0)
    headers = {"Nats-Msg-Id": f"report.{session}.{task_id}.{attempt}.{status}",
               **(wire.trace_headers(trace) or {})}
    delay = 0.05
    while True:
        try:
            await js.publish(subjects.report(session), body, timeout=ack_timeout, headers=headers)
            return True
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError) as error:
            log.warning("report %s of %s/%s attempt %s not acknowledged (%s); retrying in %.2fs",
                        status, session, task_id, attempt, error or type(error).__name__, delay)
        if give_up is not None:
            try:
                await asyncio.wait_for(give_up.wait(), timeout=delay)
                log.error("gave up the report %s of %s/%s attempt %s: the executor stopped",
                          status, session, task_id, attempt)
                return False
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
