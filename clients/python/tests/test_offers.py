"""Offers (docs/protocol.md, "Offers"): the executor takes the dispatches the planner offers
before the stream, so they are never written to it; without a free slot it declines, and the
dispatch reaches it through the stream."""

from __future__ import annotations

import asyncio
import json
import uuid

import nats
import pytest
from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy

from planner_client import Client, Executor, TaskContext, TaskMessage

PLAN = {"tasks": [
    {"id": "a", "description": "first", "kind": "tool_call", "target": "web_search"},
    {"id": "b", "description": "second", "kind": "tool_call", "target": "web_search",
     "dependencies": ["a"]},
    {"id": "c", "description": "third", "kind": "tool_call", "target": "web_search",
     "dependencies": ["b"]},
]}


async def stored_dispatches(nc: NatsClient) -> int:
    """Messages the dispatch stream ever stored."""
    info = await nc.jetstream().stream_info("PLANNER_TASKS")
    return info.state.last_seq


def executor_counting(runs: list[str], **options: object) -> Executor:
    executor = Executor(**options)  # type: ignore[arg-type]

    @executor.tool("web_search")
    async def search(task: TaskMessage, ctx: TaskContext) -> str:
        runs.append(task.task_id)
        await asyncio.sleep(0.01)
        return f"found {task.description}"

    return executor


@pytest.mark.parametrize(("offers", "stored"), [(True, 0), (False, 3)], ids=["offers", "stream-only"])
async def test_offered_dispatches_never_reach_the_stream_and_with_offers_off_all_do(
    nc: NatsClient, client: Client, session: str, offers: bool, stored: int
) -> None:
    # Three slots: one for the attempt whose report is being answered, one for the next offer,
    # one to spare. (No hand-over: each task is dispatched, offered or stored.)
    runs: list[str] = []
    executor = executor_counting(runs, concurrency=3, offers=offers, take_next=False)
    async with serving(executor, nc):
        await client.submit(session, "three in a row", plan=PLAN)
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed", [e.type for e in events]
    assert runs == ["a", "b", "c"]
    assert await stored_dispatches(nc) == stored


async def test_a_one_slot_executor_waiting_on_the_stream_takes_offers(
    nc: NatsClient, client: Client
) -> None:
    # Its fetch loop long-polls the stream (5 s here) without holding the one slot: each
    # offer finds it free. (A fetch that held it declined them all: each one stored.)
    runs: list[str] = []
    executor = executor_counting(runs, concurrency=1, fetch_wait=5.0, take_next=False)
    one = {"tasks": [{"id": "only", "description": "one", "kind": "tool_call",
                      "target": "web_search"}]}
    async with serving(executor, nc):
        for i in range(3):
            session = f"s-one-slot-{uuid.uuid4().hex[:8]}-{i}"
            await client.submit(session, "one task", plan=one)
            events = await events_until_end(client, session)
            assert events[-1].type == "plan_completed", [e.type for e in events]
    assert runs == ["only"] * 3
    assert await stored_dispatches(nc) == 0


async def test_an_unreadable_offer_is_declined_at_once(nc: NatsClient) -> None:
    executor = executor_counting([])
    async with serving(executor, nc):
        answer = await nc.request("planner.offer.tool_call.web_search", b"\xff not a dispatch",
                                  timeout=2)
    assert answer.data == b'{"offer": "declined"}'


async def test_offers_past_the_free_slots_are_declined_and_come_through_the_stream(
    nc: NatsClient, client: Client, session: str
) -> None:
    # One slot: of three tasks ready at once, one at least finds it busy and is declined.
    runs: list[str] = []
    executor = Executor(concurrency=1)

    @executor.tool("web_search")
    async def search(task: TaskMessage, ctx: TaskContext) -> str:
        runs.append(task.task_id)
        await asyncio.sleep(0.3)
        return "done"

    plan = {"tasks": [
        {"id": task, "description": task, "kind": "tool_call", "target": "web_search"}
        for task in ("x", "y", "z")
    ]}
    async with serving(executor, nc):
        await client.submit(session, "three at once", plan=plan)
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed", [e.type for e in events]
    # Each ran once, the declined ones through the stream.
    assert sorted(runs) == ["x", "y", "z"]
    assert await stored_dispatches(nc) >= 1


async def test_an_offer_is_not_held_behind_an_idle_fetch(
    nc: NatsClient, client: Client, session: str
) -> None:
    # One slot, which the handler's fetch loop holds while it waits (up to `fetch_wait`) for a
    # stream message. An offer that waited for that slot waited out the fetch: up to a second
    # per task. Declined at once instead, it reaches the idle fetch through the stream.
    runs: list[str] = []
    executor = executor_counting(runs, concurrency=1, fetch_wait=1.0)
    plan = {"tasks": [
        {"id": f"t{i}", "description": f"step {i}", "kind": "tool_call", "target": "web_search",
         "dependencies": [f"t{i - 1}"] if i else []}
        for i in range(5)
    ]}
    async with serving(executor, nc):
        started = asyncio.get_running_loop().time()
        await client.submit(session, "five in a row", plan=plan)
        events = await events_until_end(client, session)
        took = asyncio.get_running_loop().time() - started
    assert events[-1].type == "plan_completed", [e.type for e in events]
    assert runs == [f"t{i}" for i in range(5)]
    assert took < 1.5, f"five 10 ms tasks took {took:.2f} s"


async def test_an_offers_claim_not_answered_is_asked_again_not_declined(nats_url: str) -> None:
    # A planner that grants the claim but whose reply is lost has settled the offer with that
    # claim: a `declined` would reach nobody, and the attempt would wait for its heartbeat
    # timeout. The executor asks again with the same claim id, which is granted again.
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name="PLANNER_TASKS", subjects=["planner.task.>"],
                                    retention=RetentionPolicy.WORK_QUEUE)
    claims: list[bytes] = []

    async def planner_losing_the_first_reply(msg: Msg) -> None:
        claims.append(msg.data)
        if len(claims) > 1:
            lease = json.loads(msg.data)["claim_id"]
            await msg.respond(json.dumps({"status": "granted", "lease": lease}).encode())

    await nc.subscribe("planner.claim.s-offer-lost", cb=planner_losing_the_first_reply)
    answers = await nc.subscribe("planner.offer-answers")
    ran = asyncio.Event()
    executor = Executor(request_timeout=0.3, grace_period=0.5)

    @executor.tool("web_search")
    async def search(task: TaskMessage, ctx: TaskContext) -> str:
        ran.set()
        return "found"

    task = {"session": "s-offer-lost", "task_id": "t1", "attempt": 1, "kind": "tool_call",
            "target": "web_search", "description": "do it", "attachments": [], "inputs": [],
            "context": {"profile": "general", "request": "do it"}}
    try:
        async with serving(executor, nc):
            await nc.publish("planner.offer.tool_call.web_search", json.dumps(task).encode(),
                             reply="planner.offer-answers")
            await asyncio.wait_for(ran.wait(), timeout=10)
            assert len(claims) == 2, claims
            assert claims[0] == claims[1], "the retry is the same claim"
            # Not answered: the claim was (`declined` would be the bug).
            with pytest.raises(nats.errors.TimeoutError):
                await answers.next_msg(timeout=0.2)
    finally:
        await nc.close()
