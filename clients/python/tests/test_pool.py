"""Several executors on one daemon: each target's work reaches only the executors serving it, and
an executor that dies mid-task loses the attempt to another one after the heartbeat timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

import nats
from conftest import HEARTBEAT_TIMEOUT_MS, events_until_end, serving
from nats.aio.client import Client as NatsClient

from planner_client import Client, Executor, TaskContext, TaskMessage


async def test_two_executors_of_different_targets_share_a_plan(
    nc: NatsClient, client: Client, session: str, nats_url: str
) -> None:
    ran_by: dict[str, list[str]] = {}

    fetcher = Executor(concurrency=2)

    @fetcher.tool("fetch_page")
    async def fetch_page(task: TaskMessage, ctx: TaskContext) -> str:
        ran_by.setdefault(task.task_id, []).append("fetcher")
        await asyncio.sleep(0.05)
        return f"page {task.description}"

    summarizer = Executor(concurrency=2)

    @summarizer.processing("digest")
    def digest(task: TaskMessage, ctx: TaskContext) -> str:
        ran_by.setdefault(task.task_id, []).append("summarizer")
        return "digest of " + ", ".join(i.output for i in task.inputs)

    plan = {"tasks": [
        {"id": "p1", "description": "one", "kind": "tool_call", "target": "fetch_page"},
        {"id": "p2", "description": "two", "kind": "tool_call", "target": "fetch_page"},
        {"id": "d1", "description": "digest both", "kind": "processing", "target": "digest",
         "dependencies": ["p1", "p2"]},
        {"id": "p3", "description": "three", "kind": "tool_call", "target": "fetch_page",
         "dependencies": ["d1"]},
        {"id": "d2", "description": "digest the last", "kind": "processing", "target": "digest",
         "dependencies": ["p3"]},
    ]}
    # Each executor on a connection of its own, as two processes would be.
    other = await nats.connect(nats_url)
    try:
        async with serving(fetcher, nc), serving(summarizer, other):
            await client.submit(session, "fetch and digest", plan=plan)
            events = await events_until_end(client, session)
    finally:
        await other.close()

    assert events[-1].type == "plan_completed", [e.type for e in events]
    assert ran_by == {"p1": ["fetcher"], "p2": ["fetcher"], "d1": ["summarizer"],
                      "p3": ["fetcher"], "d2": ["summarizer"]}
    completed = {e.data["task_id"]: e.data["output"] for e in events
                 if e.type == "task_status_updated" and e.data["status"] == "completed"}
    assert completed["d1"] == "digest of page one, page two"
    assert completed["d2"] == "digest of page three"
    assert "retry_scheduled" not in [e.type for e in events]


# An executor in a process of its own, as a user runs one; it says when its handler has started.
DOOMED_EXECUTOR = """
import sys, time
from planner_client import Executor

executor = Executor()

@executor.tool("long_haul")
def long_haul(task, ctx):
    print(f"started {task.task_id} {task.attempt}", flush=True)
    time.sleep(60)
    return "never"

executor.run(sys.argv[1])
"""


async def test_an_executor_killed_mid_task_loses_the_attempt_to_another(
    nc: NatsClient, client: Client, session: str, nats_url: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED_EXECUTOR, nats_url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        plan = {"tasks": [{"id": "job", "description": "a long job", "kind": "tool_call",
                           "target": "long_haul"}]}
        await client.submit(session, "long haul", plan=plan)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"started job 1", line
        proc.send_signal(signal.SIGKILL)  # no shutdown, no hand-back: the heartbeats just stop
        killed_at = time.monotonic()
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    rescuer = Executor()
    attempts: list[int] = []

    @rescuer.tool("long_haul")
    async def long_haul(task: TaskMessage, ctx: TaskContext) -> str:
        attempts.append(task.attempt)
        return "done the second time"

    async with serving(rescuer, nc):
        events = await events_until_end(client, session)
    took = time.monotonic() - killed_at

    assert proc.returncode == -signal.SIGKILL
    assert attempts == [2]
    assert events[-1].type == "plan_completed"
    retry = next(e for e in events if e.type == "retry_scheduled")
    assert retry.data["attempt"] == 1
    assert retry.data["error"] == f"attempt timed out: no heartbeat for {HEARTBEAT_TIMEOUT_MS} ms"
    done = next(e for e in events if e.type == "task_status_updated" and e.data["status"] == "completed")
    assert done.data["attempt"] == 2 and done.data["output"] == "done the second time"
    # Found out by the heartbeat timeout, not by some slower path (the dispatch's AckWait, 30 s).
    assert took < HEARTBEAT_TIMEOUT_MS / 1000 + 10, f"attempt 2 done {took:.1f}s after the kill"


async def test_a_consumer_an_older_version_made_takes_this_version_s_ack_wait(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor()

    @executor.tool("upgraded")
    async def upgraded(task: TaskMessage, ctx: TaskContext) -> str:
        return "done"

    subject, handler = next(iter(executor._handlers.items()))
    durable = executor._durable(handler)
    stream = executor.subjects.tasks_stream
    js = nc.jetstream()
    # As an older executor left it: the server's default wait of 30 s.
    await js.add_consumer(stream, config=nats.js.api.ConsumerConfig(
        name=durable, durable_name=durable, filter_subject=subject,
        ack_policy=nats.js.api.AckPolicy.EXPLICIT, ack_wait=30.0,
    ))
    assert (await js.consumer_info(stream, durable)).config.ack_wait == 30.0
    async with serving(executor, nc):
        await client.submit(session, "upgraded", plan={"tasks": [
            {"id": "only", "description": "do it", "kind": "tool_call", "target": "upgraded"}]})
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed"
    assert (await js.consumer_info(stream, durable)).config.ack_wait == 10.0


async def test_a_dispatch_lost_with_an_executor_that_died_before_its_claim_runs_within_seconds(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor()
    attempts: list[int] = []

    @executor.tool("lossy")
    async def lossy(task: TaskMessage, ctx: TaskContext) -> str:
        attempts.append(task.attempt)
        return "done"

    # The executor makes its consumer, then stops: the member that dies is not running yet.
    async with serving(executor, nc):
        pass
    plan = {"tasks": [{"id": "only", "description": "do it", "kind": "tool_call", "target": "lossy"}]}
    await client.submit(session, "lossy", plan=plan)
    # A member fetches the dispatch and dies before claiming it: delivered, never acked.
    js = nc.jetstream()
    durable = executor._durable(executor._handlers[next(iter(executor._handlers))])
    sub = await js.pull_subscribe_bind(durable, stream=executor.subjects.tasks_stream)
    lost = await sub.fetch(1, timeout=10)
    assert len(lost) == 1
    await sub.unsubscribe()
    lost_at = time.monotonic()

    async with serving(executor, nc):
        events = await events_until_end(client, session)
    took = time.monotonic() - lost_at

    assert events[-1].type == "plan_completed"
    assert attempts == [1]
    # The consumer's ack wait brings it back, not the server's default 30 s.
    assert took < 16, f"the lost dispatch ran {took:.1f}s after it was lost"


async def test_a_fetched_dispatch_waits_a_little_for_a_slot_and_never_leaks_one() -> None:
    from planner_client.executor import _acquire

    def hold(slots: asyncio.Semaphore, shutdown: asyncio.Event) -> Coroutine[Any, Any, bool]:
        return _acquire(slots, shutdown, within=0.5)

    slots, shutdown = asyncio.Semaphore(1), asyncio.Event()
    await slots.acquire()  # an offer took the only slot while the fetch waited
    # The offer's attempt ends within the wait: the slot is the dispatch's.
    waiting = asyncio.create_task(hold(slots, shutdown))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    slots.release()
    assert await waiting is True
    assert slots.locked(), "the slot is the dispatch's now"
    # It does not end within the wait: no slot, and none taken later behind its back.
    assert await hold(slots, shutdown) is False
    slots.release()
    assert not slots.locked(), "the one slot is free again"
    # Shutdown while waiting: no slot.
    await slots.acquire()
    waiting = asyncio.create_task(hold(slots, shutdown))
    await asyncio.sleep(0.1)
    shutdown.set()
    assert await waiting is False
    slots.release()
    assert not slots.locked()
    # Cancelled while waiting (its executor stopping): the pending take is withdrawn.
    shutdown.clear()
    await slots.acquire()
    waiting = asyncio.create_task(hold(slots, shutdown))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    slots.release()
    assert not slots.locked(), "no slot leaked to the cancelled wait"


async def test_a_fetch_loop_lends_its_slot_to_one_offer_while_it_waits() -> None:
    from planner_client.executor import _Slots

    slots = _Slots(1)
    await slots.free.acquire()  # the fetch loop takes the one slot, then waits on the stream
    slots.polling += 1
    assert await slots.take_for_offer() is True, "an offer borrows the waiting fetch's slot"
    assert await slots.take_for_offer() is False, "one slot lent once"
    assert slots.end_poll() is False, "the fetch comes back without a slot"
    slots.free.release()  # the offer's attempt ends
    assert not slots.free.locked(), "one slot in all, free again"
    # No offer meanwhile: the fetch keeps its slot.
    await slots.free.acquire()
    slots.polling += 1
    assert slots.end_poll() is True
    slots.free.release()
    assert not slots.free.locked()
