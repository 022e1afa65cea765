"""Claims and heartbeats: the requests that fence an attempt to one executor.

A claim asks the planner for the attempt before running it; a heartbeat, every
`heartbeat_interval_ms` while it runs, says the executor is alive and learns whether it should
go on. Either reply can be `stop` (the attempt was cancelled, superseded, or is someone else's):
then the executor runs nothing more and reports nothing. A missed heartbeat is covered by the
next one (the planner's timeout allows about three).

Claim ids. An executor's claim of an attempt has one id, `claim_id`: derived from the
executor's random id and the attempt (session, task, attempt), so it is the same on every
request for that attempt from that executor and unguessable by any other. A claim whose reply
was lost (a planner or server restart, an append whose ack timed out) is asked again with it,
and a claim that was never answered leaves the dispatch to come again (a nak): either way the
planner grants the same claim again, with the same lease, instead of refusing it as someone
else's, which would leave the attempt to wait out its heartbeat timeout before a retry.

Trace context. Each request carries the dispatch's W3C `traceparent` header when it had one
(docs/protocol.md, "Trace context"), so that the claim and the heartbeats are in the trace of
the request that caused the dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import nats.errors
from nats.aio.client import Client as NatsClient
from pydantic import ValidationError

from . import routing, wire
from .models.claim_request import ClaimRequest
from .models.heartbeat_request import HeartbeatRequest
from .models.lease_reply import (
    LeaseReply,
    LeaseReplyAlive,
    LeaseReplyError,
    LeaseReplyGranted,
    LeaseReplyStop,
)
from .models.task_message import TaskMessage
from .subjects import Subjects

log = logging.getLogger(__name__)

AnyLeaseReply = LeaseReplyGranted | LeaseReplyAlive | LeaseReplyStop | LeaseReplyError


class NoAnswer(Exception):
    """The planner did not answer in time, or its answer could not be read."""


CLAIM_TRIES = 3
"""Claim requests per dispatch (one claim id) before the dispatch is left to come again."""


def claim_id(executor_id: uuid.UUID, task: TaskMessage) -> str:
    """The claim id of the executor `executor_id` for `task`'s attempt (see the module doc).

    A UUID v5 in hex (32 characters, within the protocol's 16 to 64 letters and digits): the
    same for every delivery of the attempt to this executor, a different one for each other
    executor, and never derived from the message, which every executor sees alike.
    """
    return uuid.uuid5(executor_id, f"{task.session}\0{task.task_id}\0{task.attempt}").hex


async def claim(
    nc: NatsClient,
    subjects: Subjects,
    task: TaskMessage,
    timeout: float,
    *,
    claim_id: str,
    trace: str | None = None,
    route: routing.Route = routing.USUAL,
    tries: int = CLAIM_TRIES,
) -> AnyLeaseReply:
    """Claims `task`'s attempt as `claim_id`; raises `NoAnswer` when the planner cannot be heard.

    A grant carries the attempt's context when the dispatch left it out (see `run`). `trace` is
    the dispatch's `traceparent`, carried on.

    Asks up to `tries` times (`CLAIM_TRIES`) with the one claim id: a retried claim whose first reply was
    lost is the same claim, granted again with the same lease.
    """
    # A dispatch that carries its context says so by reference, so the grant need not repeat
    # it; one that left it out (a large context) gets it with the grant.
    held = task.context_ref if task.context is not None and task.context_ref else None
    body = wire.encode(ClaimRequest(task_id=task.task_id, attempt=task.attempt, claim_id=claim_id,
                                    context_ref=held))
    subject = subjects.claim(task.session)
    for asked in range(1, tries):
        try:
            reply = await _request(nc, subjects, route, subject, body, timeout, trace)
        except NoAnswer as error:
            log.debug("claim of %s/%s attempt %s not answered (%s); asking again",
                      task.session, task.task_id, task.attempt, error)
        else:
            # Refused for now (the planner at its request limit, its store failing, a lost
            # race): asked again, not given up. After a grant whose reply was lost, giving up
            # would decline an offer the grant settled, and the attempt would wait out its
            # heartbeat timeout.
            if not (isinstance(reply, LeaseReplyError) and reply.kind in RETRYABLE):
                return reply
            log.debug("claim of %s/%s attempt %s refused for now (%s); asking again",
                      task.session, task.task_id, task.attempt, reply.kind)
        await asyncio.sleep(0.2 * asked)
    return await _request(nc, subjects, route, subject, body, timeout, trace)


# Refusals that may pass: the claim is asked again.
RETRYABLE = frozenset({"busy", "unavailable", "conflict"})


async def heartbeat(
    nc: NatsClient,
    subjects: Subjects,
    task: TaskMessage,
    lease: str,
    timeout: float,
    trace: str | None = None,
    route: routing.Route = routing.USUAL,
) -> AnyLeaseReply:
    """Heartbeats a claimed attempt; raises `NoAnswer` when the planner cannot be heard."""
    body = wire.encode(HeartbeatRequest(task_id=task.task_id, attempt=task.attempt, lease=lease))
    return await _request(nc, subjects, route, subjects.heartbeat(task.session), body, timeout,
                          trace)


async def heartbeat_until_stopped(
    nc: NatsClient,
    subjects: Subjects,
    task: TaskMessage,
    lease: str,
    interval: float,
    trace: str | None = None,
    route: routing.Route = routing.USUAL,
) -> str:
    """Heartbeats every `interval` seconds for as long as it runs; returns the reason of a `stop`.

    Beats are scheduled on a fixed grid (not `sleep(interval)` after each reply) so that slow
    replies do not stretch the period past what the planner's timeout expects. A beat waits at
    most one interval for its reply: a later one would only delay the next beat.
    """
    next_beat = time.monotonic() + interval
    while True:
        await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
        next_beat += interval
        try:
            reply = await heartbeat(nc, subjects, task, lease, timeout=max(interval, 0.2),
                                    trace=trace, route=route)
        except NoAnswer as error:
            log.warning("heartbeat of %s/%s attempt %s not answered: %s",
                        task.session, task.task_id, task.attempt, error)
            continue
        if isinstance(reply, LeaseReplyStop):
            return reply.reason
        if isinstance(reply, LeaseReplyError):
            log.warning("heartbeat of %s/%s attempt %s refused: %s: %s",
                        task.session, task.task_id, task.attempt, reply.kind, reply.message)
        # After a late beat, skip the beats it overlapped instead of sending them in a burst.
        now = time.monotonic()
        if next_beat < now:
            next_beat = now


async def _request(
    nc: NatsClient,
    subjects: Subjects,
    route: routing.Route,
    subject: str,
    body: bytes,
    timeout: float,
    trace: str | None,
) -> AnyLeaseReply:
    try:
        reply = await routing.request(nc, subjects, route, subject, body, timeout=timeout,
                                      headers=wire.trace_headers(trace))
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError) as error:
        raise NoAnswer(f"no reply on {subject}: {type(error).__name__}") from error
    except nats.errors.Error as error:
        raise NoAnswer(f"request on {subject} failed: {error}") from error
    try:
        return wire.decode_root(LeaseReply, reply.data)
    except ValidationError as error:
        raise NoAnswer(f"unreadable reply on {subject}: {reply.data[:200]!r}") from error
