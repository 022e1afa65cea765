"""Cancelling a running task stops its handler within one heartbeat interval, and nothing is reported.

Run with and without the `planner.cancel.*.*` fast path: without it, the heartbeat's `stop`
reply is what stops the handler, which is the path the protocol guarantees.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from conftest import HEARTBEAT_INTERVAL, events_until_end, serving
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from planner_client import Cancelled, Client, Executor, TaskContext, TaskMessage

SLACK = 0.5
"""Allowed beyond one heartbeat interval: the cancel command's round trip and scheduling."""


async def reports_of(nc: NatsClient, session: str) -> list[dict[str, Any]]:
    """Collects every report published for the session (a core subscription sees them too)."""
    seen: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        seen.append(json.loads(msg.data))

    await nc.subscribe(f"planner.report.{session}", cb=collect)
    return seen


@pytest.mark.parametrize("fast_path", [False, True], ids=["heartbeat", "cancel-subject"])
async def test_async_handler_is_cancelled_without_a_report(
    nc: NatsClient, client: Client, session: str, fast_path: bool
) -> None:
    executor = Executor(listen_for_cancels=fast_path)
    started = asyncio.Event()
    cancelled_at: list[float] = []
    reasons: list[str | None] = []

    @executor.tool("long_job")
    async def long_job(task: TaskMessage, ctx: TaskContext) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled_at.append(time.monotonic())
            reasons.append(ctx.stop_reason)
            raise
        return "never"

    reports = await reports_of(nc, session)
    plan = {"tasks": [{"id": "job", "description": "run long", "kind": "tool_call", "target": "long_job"}]}
    async with serving(executor, nc):
        await client.submit(session, "long", plan=plan)
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.1)
        asked_at = time.monotonic()
        await client.cancel(session, "job", reason="not needed")
        events = await events_until_end(client, session)
        # Give a (wrong) report time to arrive before looking.
        await asyncio.sleep(2 * HEARTBEAT_INTERVAL)
        assert executor.in_flight == 0

    assert cancelled_at, "the handler was never cancelled"
    took = cancelled_at[0] - asked_at
    assert took <= HEARTBEAT_INTERVAL + SLACK, f"cancelled after {took:.3f}s"
    assert reasons == ["cancelled"]
    assert [r["status"] for r in reports] == [], reports
    assert events[-1].type in ("plan_cancelled", "plan_failed", "plan_completed")
    assert any(e.type == "task_cancelled" and e.data["task_id"] == "job" for e in events)


async def test_sync_handler_sees_the_stop_through_its_context(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor(listen_for_cancels=False)
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    stopped_at: list[float] = []

    @executor.tool("long_sync")
    def long_sync(task: TaskMessage, ctx: TaskContext) -> str:
        loop.call_soon_threadsafe(started.set)
        try:
            for _ in range(600):
                ctx.wait(0.1)  # raises Cancelled as soon as the attempt is stopped
        except Cancelled:
            stopped_at.append(time.monotonic())
            raise
        return "never"

    reports = await reports_of(nc, session)
    plan = {"tasks": [{"id": "job", "description": "run long", "kind": "tool_call", "target": "long_sync"}]}
    async with serving(executor, nc):
        await client.submit(session, "long", plan=plan)
        await asyncio.wait_for(started.wait(), 10)
        asked_at = time.monotonic()
        await client.cancel(session)  # the whole plan
        events = await events_until_end(client, session)
        await asyncio.sleep(2 * HEARTBEAT_INTERVAL)

    assert stopped_at, "the handler never saw the stop"
    took = stopped_at[0] - asked_at
    assert took <= HEARTBEAT_INTERVAL + SLACK, f"stopped after {took:.3f}s"
    assert reports == []
    assert events[-1].type == "plan_cancelled"
