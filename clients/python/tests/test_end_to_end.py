"""A whole plan through the real daemon: the client submits, the executor runs, watch() follows."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient

from planner_client import Client, Executor, TaskContext, TaskMessage, TaskResult


async def test_supplied_plan_runs_to_completion(nc: NatsClient, client: Client, session: str) -> None:
    executor = Executor(concurrency=4)
    seen: dict[str, TaskMessage] = {}
    threads: set[str] = set()

    @executor.tool("http_fetch")
    async def fetch(task: TaskMessage, ctx: TaskContext) -> str:
        seen[task.task_id] = task
        await asyncio.sleep(0.05)
        return f"prices for {task.description}"

    @executor.processing("analyze")
    def analyze(task: TaskMessage, ctx: TaskContext) -> TaskResult:
        # A synchronous handler: it runs in a worker thread, not on the event loop.
        seen[task.task_id] = task
        threads.add(threading.current_thread().name)
        joined = " + ".join(i.output for i in task.inputs)
        return TaskResult(output=f"compared: {joined}", tokens_used=42)

    plan = {"tasks": [
        {"id": "fetch_a", "description": "vendor A", "kind": "tool_call", "target": "http_fetch"},
        {"id": "fetch_b", "description": "vendor B", "kind": "tool_call", "target": "http_fetch"},
        {"id": "compare", "description": "compare the prices", "kind": "processing",
         "target": "analyze", "dependencies": ["fetch_a", "fetch_b"]},
    ]}
    async with serving(executor, nc):
        reply = await client.submit(session, "compare vendors", plan=plan, request_id="req-1")
        assert reply.version > 0
        assert "tasks_planned" in [e.type for e in reply.events]
        events = await events_until_end(client, session)

    types = [e.type for e in events]
    assert types[0] == "session_started"
    assert types[-1] == "plan_completed", types
    assert events[-1].event is not None and events[-1].event.type == "plan_completed"
    completed = {e.data["task_id"]: e.data for e in events
                 if e.type == "task_status_updated" and e.data["status"] == "completed"}
    assert set(completed) == {"fetch_a", "fetch_b", "compare"}
    assert completed["compare"]["output"] == "compared: prices for vendor A + prices for vendor B"
    assert completed["compare"]["tokens_used"] == 42
    # Every attempt was claimed before it ran.
    claimed = {e.data["task_id"] for e in events if e.type == "attempt_claimed"}
    assert claimed == {"fetch_a", "fetch_b", "compare"}
    # Typed inputs: the dependent task got its dependencies' outputs, in dependency order.
    compare = seen["compare"]
    assert [i.task_id for i in compare.inputs] == ["fetch_a", "fetch_b"]
    assert compare.kind == "processing"
    assert compare.context is not None and compare.context.request == "compare vendors"
    assert all(name.startswith("planner-handler") for name in threads)


async def test_request_id_makes_a_resubmission_a_no_op(nc: NatsClient, client: Client, session: str) -> None:
    executor = Executor()

    @executor.tool("web_search")
    async def search(task: TaskMessage, ctx: TaskContext) -> str:
        return "found"

    @executor.processing("summarize")
    async def summarize(task: TaskMessage, ctx: TaskContext) -> str:
        return "short"

    # The rule parser plans a plain request (search, then summarize).
    request = "1. search for flights\n2. summarize the options"
    first = await client.submit(session, request, request_id="req-same")
    again = await client.submit(session, request, request_id="req-same")
    assert first.events and again.events == []
    async with serving(executor, nc):
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed"
    planned = [e for e in events if e.type == "tasks_planned"]
    assert len(planned) == 1
    assert [t["target"] for t in planned[0].data["tasks"]] == ["web_search", "summarize"]


async def test_concurrency_limit_is_respected(nc: NatsClient, client: Client, session: str) -> None:
    executor = Executor(concurrency=2)
    running = 0
    most = 0

    @executor.tool("slow")
    async def slow(task: TaskMessage, ctx: TaskContext) -> str:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.3)
        finally:
            running -= 1
        return "ok"

    plan = {"tasks": [{"id": f"s{i}", "description": "wait", "kind": "tool_call", "target": "slow"}
                      for i in range(5)]}
    async with serving(executor, nc):
        started = time.monotonic()
        await client.submit(session, "five slow things", plan=plan)
        events = await events_until_end(client, session)
        took = time.monotonic() - started
    assert events[-1].type == "plan_completed"
    assert most == 2
    assert took >= 0.9  # three rounds of 0.3 s with two slots


async def test_blocking_handler_keeps_its_attempt_through_heartbeats(
    nc: NatsClient, client: Client, session: str
) -> None:
    # 1.5 s of blocking work is longer than the daemon's 0.9 s heartbeat timeout: the attempt
    # survives only because heartbeats go on from the event loop while the thread blocks.
    executor = Executor()
    attempts: list[int] = []

    @executor.tool("blocking")
    def blocking(task: TaskMessage, ctx: TaskContext) -> str:
        attempts.append(task.attempt)
        time.sleep(1.5)
        return "done"

    plan = {"tasks": [{"id": "b", "description": "block", "kind": "tool_call", "target": "blocking"}]}
    async with serving(executor, nc):
        await client.submit(session, "block", plan=plan)
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed"
    assert attempts == [1]
    assert "retry_scheduled" not in [e.type for e in events]
    assert any(e.type == "attempt_heartbeat" for e in events)


async def test_wait_for_end_waits_for_the_current_plan(nc: NatsClient, client: Client, session: str) -> None:
    executor = Executor(concurrency=2)
    release = asyncio.Event()

    @executor.tool("echo")
    async def echo(task: TaskMessage, ctx: TaskContext) -> str:
        if task.task_id == "second":
            await release.wait()
        return task.description

    def plan(task_id: str) -> dict[str, object]:
        return {"tasks": [{"id": task_id, "description": task_id, "kind": "tool_call",
                           "target": "echo"}]}

    async with serving(executor, nc):
        await client.submit(session, "the first request", plan=plan("first"))
        first = await client.wait_for_end(session, timeout=30)
        assert first.type == "plan_completed"
        # Already ended: answered from the log's last batch, at once.
        assert (await client.wait_for_end(session, timeout=5)).session_version == first.session_version

        # A follow-up starts the session again: the first plan's end is not this one's.
        await client.submit(session, "a follow-up", plan=plan("second"))
        with pytest.raises(asyncio.TimeoutError):
            await client.wait_for_end(session, timeout=1)
        release.set()
        second = await client.wait_for_end(session, timeout=30)
        assert second.type == "plan_completed"
        assert first.session_version is not None and second.session_version is not None
        assert second.session_version > first.session_version


async def test_wait_for_end_sees_an_end_followed_by_other_batches(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor(concurrency=2)

    @executor.tool("echo")
    async def echo(task: TaskMessage, ctx: TaskContext) -> str:
        return task.description

    plan = {"tasks": [{"id": "only", "description": "one", "kind": "tool_call", "target": "echo"}]}
    async with serving(executor, nc):
        await client.submit(session, "a request", plan=plan)
        first = await client.wait_for_end(session, timeout=30)
    # A batch after the end that neither starts nor ends a plan (as a summary rewritten by an
    # LLM after the last task is): the plan has still ended.
    late = [{"v": 1, "event": {"type": "context_compacted", "summary": "later", "through": 1}}]
    await nc.jetstream().publish(client.subjects.events(session), json.dumps(late).encode(),
                                 stream=client.subjects.events_stream)
    again = await client.wait_for_end(session, timeout=5)
    assert again.type == "plan_completed"
    assert again.session_version == first.session_version
