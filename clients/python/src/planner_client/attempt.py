"""One dispatch, from the moment it is fetched (or offered) to its report: docs/protocol.md's
executor loop.

    claim ─ granted ─> ack, run the handler while heartbeating ─> report with the lease
                                                                   (directly, else through JetStream)
          ─ stop ────> term (someone else's, or cancelled: never run it)
          ─ error, no answer ─> nak with a delay (it comes again)

An offer (docs/protocol.md, "Offers") goes the same way. The planner answers it itself when it
answers the claim, so the ack and the term send nothing; the nak answers `declined` (the planner
then sends the dispatch to the stream), and a delivery of an attempt this executor runs or ran,
which it does not claim again, answers `taken`.

The claim is asked under this executor's claim id for the attempt (`lease.claim_id`), the same
on every delivery: a dispatch that comes again after a claim whose reply was lost is granted
again. A delivery of an attempt this executor runs, or ran, is acked and not run again (its ack
was lost; the planner would grant the claim again all the same).

The claim, the heartbeats and the report carry the dispatch's `traceparent` header on when its
trace is sampled (`wire.sampled`): one request, one trace. For an unsampled trace the planner
handles them in the trace it dispatched the attempt in, and the header would only cost the bus;
a handler finds the dispatch's `traceparent` in `ctx.traceparent` either way.

While the handler runs, three things can stop it: a heartbeat reply `stop`, a message on
`planner.cancel.<session>.<task>` (the fast path), and the end of the executor's shutdown
grace period. A stop by the planner sends no report: the attempt is no longer this executor's,
and the planner would ignore it. A stop by shutdown hands the attempt back: a retryable
`failed` report, so the planner retries it now instead of after the heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from . import handlers, lease, reporting, routing, wire
from .context import TaskContext
from .handlers import Handler
from .models.executor_report import NextRequest
from .models.lease_reply import LeaseReplyGranted, LeaseReplyStop
from .models.report_reply import NextTask
from .models.task_message import DispatchContext, TaskMessage
from .subjects import Subjects

log = logging.getLogger(__name__)

SHUTDOWN = "shutdown"
"""The stop reason when the executor's grace period ran out (the planner's reasons are its own)."""

AttemptKey = tuple[str, str, int]
"""(session, task id, attempt): what identifies the work."""

FINISHED_KEPT = 10_000
"""Attempts over that an executor remembers, so that a late redelivery of one is not run again."""


class Delivery(Protocol):
    """How a dispatch reached the executor: a stream message, or an `Offer`."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> dict[str, str] | None: ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def term(self) -> None: ...


_TAKEN = b'{"offer": "taken"}'
_DECLINED = b'{"offer": "declined"}'


class Offer:
    """A dispatch offered on `planner.offer.<kind>.<target>`. The claim answers it (so `ack`
    and `term` send nothing), `nak` and `decline` answer `declined`, `taken` answers `taken`
    (for an attempt not claimed again)."""

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> dict[str, str] | None:
        return self._msg.headers

    async def ack(self) -> None:
        """After a granted claim: the planner answered the offer with it."""

    async def nak(self, delay: float | None = None) -> None:
        await self._answer(_DECLINED)

    async def term(self) -> None:
        """After a claim refused for good: the planner answered the offer with it."""

    async def taken(self) -> None:
        await self._answer(_TAKEN)

    async def decline(self) -> None:
        await self._answer(_DECLINED)

    async def _answer(self, body: bytes) -> None:
        if self._msg.reply:
            await self._msg.respond(body)


class AttemptControl:
    """The executor's handle on a running attempt: how it is stopped from outside."""

    def __init__(self, ctx: TaskContext, route: routing.Route = routing.USUAL) -> None:
        self.route = route
        """Where the attempt's heartbeats and report go (`routing`)."""
        self.ctx = ctx
        self._stopped = asyncio.Event()

    def stop(self, reason: str) -> None:
        """Stops the attempt: the handler's context says so, and the supervisor wakes up."""
        self.ctx._stop(reason)
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


@dataclass
class Runtime:
    """What every attempt of one executor shares."""

    nc: NatsClient
    js: JetStreamContext
    subjects: Subjects
    threads: ThreadPoolExecutor
    request_timeout: float
    nak_delay: float
    report_started: bool
    draining: asyncio.Event
    """Set when shutdown begins: nothing new is claimed."""
    hard_stop: asyncio.Event
    """Set when shutdown gives up: reports still unacknowledged are abandoned."""
    direct: reporting.DirectReports = field(default_factory=reporting.DirectReports)
    """Whether reports go to the planner directly (the stream as the fallback)."""
    addressing: routing.Addressing = field(default_factory=routing.Addressing)
    """Whether requests go to the session's owner a dispatch names (`routing`)."""
    executor_id: uuid.UUID = field(default_factory=uuid.uuid4)
    """The executor's random id, which its claim ids are derived from (`lease.claim_id`)."""
    take_next: bool = False
    """Whether final direct reports ask for the session's next task (docs/protocol.md, "The
    next task with the reply"), run in the same slot without a claim."""
    handlers: dict[tuple[str, str], Handler] = field(default_factory=dict)
    """The executor's handlers by (kind, target): what runs a task handed over."""
    serves: list[str] = field(default_factory=list)
    """The dispatch subjects the handlers serve: what a report's `next` asks for."""
    running: dict[AttemptKey, AttemptControl] = field(default_factory=dict)
    finished: OrderedDict[AttemptKey, None] = field(default_factory=OrderedDict)
    """The last `FINISHED_KEPT` attempts over, oldest first."""

    def ours(self, key: AttemptKey) -> bool:
        """Whether this executor runs or ran the attempt `key`."""
        return key in self.running or key in self.finished

    def finish(self, key: AttemptKey) -> None:
        self.running.pop(key, None)
        self.finished[key] = None
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)


async def run(msg: Delivery, handler: Handler, rt: Runtime) -> None:
    """Takes one fetched or offered dispatch through claim, work and report, then runs the
    tasks the planner hands over with the reports' replies, in the same slot. Never raises."""
    handed = await _run_delivered(msg, handler, rt)
    while handed is not None:
        next_task, route, trace = handed
        try:
            handed = await _run_handed_over(next_task, rt, route, trace)
        except Exception:  # one attempt's bug must not end the executor
            log.exception("a task handed over (%s/%s) ended with an error",
                          next_task.task.session, next_task.task.task_id)
            handed = None


Handed = tuple[NextTask, routing.Route, str | None]
"""A task handed over with a report's reply, the route its session's requests take and the
trace it continues."""


async def _run_delivered(msg: Delivery, handler: Handler, rt: Runtime) -> Handed | None:
    try:
        task = wire.decode(TaskMessage, msg.data)
    except ValidationError as error:
        # Not a dispatch this client can read: it would fail the same way on every delivery.
        log.error("terminating an unreadable dispatch on %s: %s", msg.subject, error)
        # An offer is declined (no claim answers it, and its timeout would delay the stream's
        # copy, which is then terminated the same way).
        await _settle(msg.decline() if isinstance(msg, Offer) else msg.term())
        return None
    if rt.draining.is_set():
        await _settle(msg.nak())
        return None
    key = (task.session, task.task_id, task.attempt)
    if rt.ours(key):
        _log_again(task)
        await _settle(msg.taken() if isinstance(msg, Offer) else msg.ack())
        return None
    dispatch_trace = wire.traceparent(msg.headers)
    trace = dispatch_trace if wire.sampled(dispatch_trace) else None
    route = routing.Route(routing.owner(msg.headers), rt.addressing)
    try:
        # An offer's claim is asked again like a stream message's: a planner that granted it
        # but whose reply was lost has settled the offer with that claim, so a `declined`
        # would reach nobody and the attempt would wait out its heartbeat timeout. Asked
        # again with the same claim id, it is granted again. (Were the planner gone, its offer
        # times out and the dispatch reaches the stream; that copy's claim is fenced.)
        reply = await lease.claim(rt.nc, rt.subjects, task, rt.request_timeout,
                                  claim_id=lease.claim_id(rt.executor_id, task), trace=trace,
                                  route=route)
    except lease.NoAnswer as error:
        log.warning("claim of %s/%s attempt %s not answered (%s); it will come again",
                    task.session, task.task_id, task.attempt, error)
        await _settle(msg.nak(delay=rt.nak_delay))
        return None
    if isinstance(reply, LeaseReplyStop):
        log.info("not running %s/%s attempt %s: %s", task.session, task.task_id, task.attempt,
                 reply.reason)
        await _settle(msg.term())
        return None
    if not isinstance(reply, LeaseReplyGranted):
        log.warning("claim of %s/%s attempt %s refused (%s); it will come again",
                    task.session, task.task_id, task.attempt, reply)
        await _settle(msg.nak(delay=rt.nak_delay))
        return None
    if rt.ours(key):
        # Another delivery of it was granted while this claim was asked, and runs it.
        _log_again(task)
        await _settle(msg.ack())
        return None
    if reply.context is not None:
        # A large context is left out of the dispatch and sent with the grant.
        task = task.model_copy(update={"context": reply.context})
    # The claim is ours: the dispatch has done its job. (Were this ack lost, the redelivery's
    # claim would be granted again, and the delivery found running here.)
    return await _run_held(handler, task, reply.lease, reply.heartbeat_interval_ms, rt, route,
                           dispatch_trace, settle=msg.ack())


async def _run_handed_over(handed: NextTask, rt: Runtime, route: routing.Route,
                           dispatch_trace: str | None) -> Handed | None:
    """Runs a task the planner handed over with a report's reply (claimed for this executor
    already: no claim, no ack), and returns the one handed over with its own report."""
    # The reply's models are generated apart from the dispatch's: read it as a dispatch.
    try:
        task = TaskMessage.model_validate(handed.task.model_dump(mode="json", by_alias=True))
        if handed.context is not None:
            # A context the dispatch leaves out comes with the reply (as with a claim's grant).
            context = DispatchContext.model_validate(handed.context.model_dump(mode="json",
                                                                               by_alias=True))
            task = task.model_copy(update={"context": context})
    except ValidationError as error:
        # Unreadable as a dispatch here: nothing to run it with, and no task to report on. Its
        # heartbeat timeout hands it to another executor.
        log.error("a task handed over (%s/%s) is not a dispatch this client can read; it is "
                  "retried after its heartbeat timeout: %s", handed.task.session,
                  handed.task.task_id, error)
        return None
    key = (task.session, task.task_id, task.attempt)
    if rt.ours(key):
        _log_again(task)
        return None
    handler = rt.handlers.get((task.kind, task.target))
    if handler is None:
        # Not ours to run after all (asked for subjects this executor does not serve): hand it
        # back at once rather than let it wait out its heartbeat timeout.
        log.error("%s/%s attempt %s handed over but no handler serves it here; handing it back",
                  task.session, task.task_id, task.attempt)
        back = reporting.failed(task, handed.lease, "handed over to an executor that does not "
                                "serve it", retryable=True)
        await _report(rt, task, back, _carried(dispatch_trace), route)
        return None
    return await _run_held(handler, task, handed.lease, handed.heartbeat_interval_ms, rt, route,
                           dispatch_trace)


async def _run_held(handler: Handler, task: TaskMessage, lease_token: str,
                    heartbeat_interval_ms: int | None, rt: Runtime, route: routing.Route,
                    dispatch_trace: str | None,
                    settle: Awaitable[None] | None = None) -> Handed | None:
    """Runs an attempt this executor holds the lease of and reports it; returns the task handed
    over with the report's reply, if any. `settle`: the delivery's ack, once it is running."""
    interval = heartbeat_interval_ms / 1000 if heartbeat_interval_ms else None
    ctx = TaskContext(task, lease_token, interval, traceparent=dispatch_trace)
    if rt.draining.is_set():
        ctx._begin_shutdown()
    control = AttemptControl(ctx, route)
    key = (task.session, task.task_id, task.attempt)
    rt.running[key] = control
    try:
        if settle is not None:
            await _settle(settle)
        if rt.report_started:
            await _report(rt, task, reporting.started(task, ctx.lease), _carried(dispatch_trace),
                          route)
        next_task = await _supervise(handler, task, control, rt)
        return None if next_task is None else (next_task, route, dispatch_trace)
    except Exception:  # one attempt's bug must not end the executor
        log.exception("attempt %s/%s %s ended with an error", task.session, task.task_id,
                      task.attempt)
        return None
    finally:
        rt.finish(key)


def _log_again(task: TaskMessage) -> None:
    log.info("%s/%s attempt %s delivered again to the executor running or having run it; "
             "not run again", task.session, task.task_id, task.attempt)


async def _supervise(handler: Handler, task: TaskMessage, control: AttemptControl,
                     rt: Runtime) -> NextTask | None:
    """Runs the handler against its stop signals, then reports (or not) as the protocol says;
    returns the task the planner handed over with the report's reply, if any."""
    ctx = control.ctx
    work = asyncio.ensure_future(handlers.call(handler, task, ctx, rt.threads))
    watchers: list[asyncio.Future[Any]] = [asyncio.ensure_future(control.wait_stopped())]
    beats: asyncio.Future[str] | None = None
    if ctx.heartbeat_interval:
        beats = asyncio.ensure_future(
            lease.heartbeat_until_stopped(rt.nc, rt.subjects, task, ctx.lease, ctx.heartbeat_interval,
                                          trace=_carried(ctx.traceparent), route=control.route)
        )
        watchers.append(beats)
    try:
        while not work.done() and not control.stopped:
            await asyncio.wait([work, *watchers], return_when=asyncio.FIRST_COMPLETED)
            if beats is not None and beats.done():
                watchers.remove(beats)
                if beats.cancelled() or beats.exception() is not None:
                    # A bug, not a planner's answer: the attempt goes on, unwatched; the
                    # planner's heartbeat timeout will judge it.
                    log.error("heartbeats of %s/%s attempt %s ended: %r", task.session,
                              task.task_id, task.attempt,
                              None if beats.cancelled() else beats.exception())
                else:
                    control.stop(beats.result())
                beats = None
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not work.done() and not control.stopped:
            # We are being cancelled ourselves (the executor's hard stop): take the handler along.
            work.cancel()

    if not control.stopped:
        report = handlers.report_for(work, task, ctx.lease)
        log.info("%s/%s attempt %s %s", task.session, task.task_id, task.attempt,
                 getattr(report, "status", "?"))
        if rt.take_next and rt.direct.on() and not rt.draining.is_set():
            # The slot this report frees runs the session's next task, if the planner has one
            # this executor serves: it comes with the reply, claimed.
            ask = NextRequest(serves=rt.serves, claim_id=uuid.uuid4().hex)
            report = report.model_copy(update={"next": ask})
            _, next_task = await reporting.send_taking_next(
                rt.nc, rt.js, rt.subjects, task.session, report, direct=rt.direct,
                timeout=rt.request_timeout, give_up=rt.hard_stop,
                trace=_carried(ctx.traceparent), route=control.route)
            return next_task
        await _report(rt, task, report, _carried(ctx.traceparent), control.route)
        return None

    reason = ctx.stop_reason or "stopped"
    if reason == SHUTDOWN:
        log.warning("handing back %s/%s attempt %s: the shutdown grace period is over",
                    task.session, task.task_id, task.attempt)
        handback = reporting.failed(
            task, ctx.lease, "the executor shut down before the attempt finished", retryable=True
        )
        await _report(rt, task, handback, _carried(ctx.traceparent), control.route)
    else:
        log.info("%s/%s attempt %s stopped by the planner (%s); no report", task.session,
                 task.task_id, task.attempt, reason)
    if handler.is_async:
        work.cancel()
    elif not work.done():
        log.info("waiting for the thread of %s/%s attempt %s to notice the stop", task.session,
                 task.task_id, task.attempt)
    # The slot stays taken until the handler has really ended: a thread cannot be killed, and
    # an async handler may take a moment to unwind.
    await asyncio.wait([work])
    if not work.cancelled() and work.exception() is not None:
        log.debug("a stopped handler ended with %r (discarded)", work.exception())
    return None


def _carried(trace: str | None) -> str | None:
    """The `traceparent` an attempt's requests carry: the dispatch's, if its trace is sampled."""
    return trace if wire.sampled(trace) else None


async def _report(rt: Runtime, task: TaskMessage, report: reporting.Report, trace: str | None,
                  route: routing.Route) -> None:
    await reporting.send(rt.nc, rt.js, rt.subjects, task.session, report, direct=rt.direct,
                         timeout=rt.request_timeout, give_up=rt.hard_stop, trace=trace,
                         route=route)


async def _settle(ack: Awaitable[None]) -> None:
    """Acks, naks or terms a dispatch; a failure only delays a redelivery, so it is logged."""
    try:
        await ack
    except Exception as error:  # noqa: BLE001
        log.warning("could not settle a dispatch: %s", error)
