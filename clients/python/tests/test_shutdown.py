"""Graceful shutdown: stop fetching, let in-flight work finish within the grace period, hand back the rest."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient

from planner_client import Client, Executor, TaskContext, TaskMessage


def two_tasks(target: str) -> dict[str, Any]:
    return {"tasks": [{"id": f"t{i}", "description": "work", "kind": "tool_call", "target": target}
                      for i in (1, 2)]}


async def test_in_flight_work_finishes_and_nothing_new_is_taken(
    nc: NatsClient, client: Client, session: str
) -> None:
    ran_by: dict[str, str] = {}
    started = asyncio.Event()
    saw_shutdown: list[bool] = []

    def make(name: str, hold: float) -> Executor:
        executor = Executor(concurrency=1, grace_period=10)

        @executor.tool("work")
        async def work(task: TaskMessage, ctx: TaskContext) -> str:
            ran_by[task.task_id] = name
            started.set()
            await asyncio.sleep(hold)
            saw_shutdown.append(ctx.shutting_down)
            return f"done by {name}"

        return executor

    first = make("first", hold=1.0)
    async with serving(first, nc) as shutdown:
        await client.submit(session, "two things", plan=two_tasks("work"))
        await asyncio.wait_for(started.wait(), 10)
        shutdown.set()  # while the first task runs; the second waits in the stream
    # `serving` returned: the first executor has finished its attempt and stopped.
    assert list(ran_by.values()) == ["first"]
    assert saw_shutdown == [True]
    async with serving(make("second", hold=0.0), nc):
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed"
    assert sorted(ran_by.values()) == ["first", "second"]
    assert "retry_scheduled" not in [e.type for e in events]


async def test_work_past_the_grace_period_is_handed_back(
    nc: NatsClient, client: Client, session: str
) -> None:
    stopped: list[str | None] = []
    started = asyncio.Event()

    slow = Executor(grace_period=0.5)

    @slow.tool("work")
    async def forever(task: TaskMessage, ctx: TaskContext) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(ctx.stop_reason)
            raise
        return "never"

    fast = Executor()
    attempts: list[int] = []

    @fast.tool("work")
    async def quick(task: TaskMessage, ctx: TaskContext) -> str:
        attempts.append(task.attempt)
        return "quick"

    plan = {"tasks": [{"id": "t1", "description": "work", "kind": "tool_call", "target": "work"}]}
    async with serving(slow, nc):
        await client.submit(session, "one thing", plan=plan)
        await asyncio.wait_for(started.wait(), 10)
    assert stopped == ["shutdown"]
    # Handed back with a retryable failure: the planner retries at once, not after its
    # heartbeat timeout, and another executor runs attempt 2.
    async with serving(fast, nc):
        events = await events_until_end(client, session)
    assert attempts == [2]
    retry = next(e for e in events if e.type == "retry_scheduled")
    assert retry.data["error"] == "the executor shut down before the attempt finished"
    assert events[-1].type == "plan_completed"
