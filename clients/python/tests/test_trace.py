"""W3C trace context: a command's `traceparent` reaches the dispatches, and the executor carries
a dispatch's on its claim, its heartbeats and its report when the trace is sampled
(docs/protocol.md, "Trace context")."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import pytest
from conftest import HEARTBEAT_INTERVAL, events_until_end, serving
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from planner_client import Client, Executor, TaskContext, TaskMessage, wire

PLAN = {"tasks": [{"id": "a", "description": "take a while", "kind": "tool_call", "target": "slow"}]}


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "unsampled"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct-report", "stream-report"])
async def test_a_sampled_dispatch_trace_is_carried_on_the_claim_the_heartbeats_and_the_report(
    nc: NatsClient, client: Client, session: str, direct: bool, sampled: bool
) -> None:
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-{'01' if sampled else '00'}"
    executor = Executor(direct_reports=direct)
    handed: list[str | None] = []

    @executor.tool("slow")
    async def slow(task: TaskMessage, ctx: TaskContext) -> str:
        handed.append(ctx.traceparent)
        await asyncio.sleep(HEARTBEAT_INTERVAL * 2.5)  # two heartbeats or so
        return "done"

    # What each message carried, by kind (`planner.<kind>.…`, or sent to the session's owner,
    # `planner.fwd.<owner>.planner.<kind>.…`), as a core subscription sees it.
    seen: dict[str, list[str | None]] = defaultdict(list)

    async def record(msg: Msg) -> None:
        parts = msg.subject.split(".")
        kind = parts[4] if parts[1] == "fwd" else parts[1]
        seen[kind].append(wire.traceparent(msg.headers))

    for kind in ("claim", "heartbeat", "result"):
        await nc.subscribe(f"planner.fwd.*.planner.{kind}.{session}", cb=record)
    # The executor takes offers: the dispatch is seen on its offer subject.
    for subject in ("planner.offer.tool_call.slow", f"planner.claim.{session}",
                    f"planner.heartbeat.{session}", f"planner.result.{session}",
                    f"planner.report.{session}"):
        await nc.subscribe(subject, cb=record)
    async with serving(executor, nc):
        await client.submit(session, "one step", plan=PLAN, traceparent=traceparent)
        events = await events_until_end(client, session)
    await nc.flush()
    assert events[-1].type == "plan_completed", [e.type for e in events]

    # The command's trace reaches the dispatch (with the daemon's own span id).
    [dispatched] = seen.pop("offer")
    assert dispatched is not None and dispatched.split("-")[1] == trace_id, dispatched
    # The executor carries the dispatch's on, as it is, when the trace is sampled (the planner
    # handles them in the trace it dispatched the attempt in otherwise).
    leased = dispatched if sampled else None
    assert seen.pop("claim") == [leased]
    beats = seen.pop("heartbeat")
    assert beats and beats == [leased] * len(beats), beats
    # The report, on the path it took (a direct one is stored by no stream).
    assert seen == ({"result": [leased]} if direct else {"report": [leased]}), seen
    # The handler sees the dispatch's either way, to pass on to what it calls.
    assert handed == [dispatched]


def test_the_traceparent_header_is_read_in_any_case_and_never_made_up() -> None:
    assert wire.traceparent({"Traceparent": "00-ab-cd-01", "Nats-Msg-Id": "x"}) == "00-ab-cd-01"
    assert wire.traceparent({"Nats-Msg-Id": "x"}) is None
    assert wire.traceparent(None) is None
    assert wire.trace_headers(None) is None
    assert wire.trace_headers("00-ab-cd-01") == {"traceparent": "00-ab-cd-01"}


def test_only_a_valid_traceparent_with_the_sampled_flag_is_sampled() -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
    assert wire.sampled(f"{trace}-01")
    assert wire.sampled(f"{trace}-03")
    assert not wire.sampled(f"{trace}-00")
    assert not wire.sampled(f"{trace}-02")
    assert not wire.sampled(f"{trace}-zz")
    assert not wire.sampled(f"01-{trace[3:]}-01")
    assert not wire.sampled("")
    assert not wire.sampled(None)
