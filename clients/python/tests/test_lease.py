"""Claims: one id per executor and attempt, so that a claim asked again (its reply lost, or its
dispatch delivered again) is the same claim, granted again, and never another executor's."""

from __future__ import annotations

import asyncio
import json
import uuid

import nats
from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from planner_client import Client, Executor, TaskContext, TaskMessage, attempt, wire
from planner_client.lease import claim, claim_id
from planner_client.models.lease_reply import LeaseReplyError, LeaseReplyGranted, LeaseReplyStop
from planner_client.subjects import Subjects

TASK = {
    "session": "s-lost", "task_id": "t1", "attempt": 1, "kind": "tool_call", "target": "tool",
    "description": "do it", "attachments": [], "inputs": [],
    "context": {"profile": "general", "request": "do it"},
}

ONE_STEP = {"tasks": [{"id": "a", "description": "do it", "kind": "tool_call", "target": "echo"}]}


async def test_a_claim_whose_reply_is_lost_is_asked_again_with_the_same_id(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    asked: list[dict[str, object]] = []

    async def planner_losing_the_first_reply(msg: Msg) -> None:
        asked.append(json.loads(msg.data))
        if len(asked) > 1:
            lease = asked[-1]["claim_id"]
            await msg.respond(json.dumps({"status": "granted", "lease": lease}).encode())

    await nc.subscribe("planner.claim.s-lost", cb=planner_losing_the_first_reply)
    task = TaskMessage.model_validate(TASK)
    try:
        reply = await claim(nc, Subjects(), task, timeout=0.3, claim_id=claim_id(uuid.uuid4(), task))
    finally:
        await nc.close()
    assert len(asked) == 2, asked
    first, second = asked
    assert first == second, "the retry is the same claim"
    assert isinstance(reply, LeaseReplyGranted) and reply.lease == first["claim_id"]


async def test_a_claim_refused_for_now_is_asked_again_and_a_refusal_for_good_is_not(
    nats_url: str,
) -> None:
    nc = await nats.connect(nats_url)
    asked: list[dict[str, object]] = []
    refusals = ["busy", "unavailable"]

    async def planner_at_its_limit(msg: Msg) -> None:
        asked.append(json.loads(msg.data))
        if refusals:
            kind = refusals.pop(0)
            await msg.respond(json.dumps({"status": "error", "kind": kind, "message": kind}).encode())
        else:
            lease = asked[-1]["claim_id"]
            await msg.respond(json.dumps({"status": "granted", "lease": lease}).encode())

    await nc.subscribe("planner.claim.s-lost", cb=planner_at_its_limit)
    task = TaskMessage.model_validate(TASK)
    try:
        reply = await claim(nc, Subjects(), task, timeout=2, claim_id=claim_id(uuid.uuid4(), task))
        assert len(asked) == 3, asked
        assert asked[0] == asked[1] == asked[2], "the same claim each time"
        assert isinstance(reply, LeaseReplyGranted) and reply.lease == asked[0]["claim_id"]
        # A refusal retrying cannot help is the answer at once.
        asked.clear()
        refusals.extend(["rejected", "busy"])
        reply = await claim(nc, Subjects(), task, timeout=2, claim_id=claim_id(uuid.uuid4(), task))
        assert len(asked) == 1, asked
        assert isinstance(reply, LeaseReplyError) and reply.kind == "rejected"
    finally:
        await nc.close()


def test_claim_ids_are_one_per_executor_and_attempt_and_valid_lease_tokens() -> None:
    task = TaskMessage.model_validate(TASK)
    executor, other = uuid.uuid4(), uuid.uuid4()
    again = TaskMessage.model_validate(TASK)
    retry = TaskMessage.model_validate({**TASK, "attempt": 2})
    assert claim_id(executor, task) == claim_id(executor, again)
    assert claim_id(executor, task) != claim_id(executor, retry)
    assert claim_id(executor, task) != claim_id(other, task)
    # The protocol's rule (ClaimRequest.claim_id): 16 to 64 letters, digits, `_` or `-`.
    ident = claim_id(executor, task)
    assert 16 <= len(ident) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in ident)


async def test_a_dispatch_redelivered_after_a_lost_claim_reply_is_granted_to_the_same_executor(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor()
    ran: list[tuple[int, str]] = []

    @executor.tool("echo")
    async def echo(task: TaskMessage, ctx: TaskContext) -> str:
        ran.append((task.attempt, ctx.lease))
        return task.description

    # The executor's first delivery, taken from its consumer (the one it binds to): its claim is
    # granted and persisted, but the reply is lost, so the executor hands the dispatch back.
    sub = await nc.jetstream().pull_subscribe(
        "planner.task.tool_call.echo", durable="planner-tool_call-echo", stream="PLANNER_TASKS",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
    )
    await client.submit(session, "one step", plan=ONE_STEP)
    [msg] = await sub.fetch(1, timeout=10)
    task = wire.decode(TaskMessage, msg.data)
    subjects = Subjects()
    granted = await claim(nc, subjects, task, 5, claim_id=claim_id(executor.id, task))
    assert isinstance(granted, LeaseReplyGranted), granted
    # Asked again by the same executor: the same claim, with the same lease.
    again = await claim(nc, subjects, task, 5, claim_id=claim_id(executor.id, task))
    assert isinstance(again, LeaseReplyGranted) and again.lease == granted.lease, again
    # Another executor cannot pass for it.
    other = await claim(nc, subjects, task, 5, claim_id=claim_id(Executor().id, task))
    assert isinstance(other, LeaseReplyStop) and other.reason == "claimed_by_another", other
    await msg.nak()
    await sub.unsubscribe()

    # The redelivery comes to the executor: granted again, run once, as the first attempt (no
    # heartbeat timeout, no second attempt).
    async with serving(executor, nc):
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed", [e.type for e in events]
    assert ran == [(1, granted.lease)]
    assert not [e for e in events if e.type in ("attempt_timed_out", "attempt_failed")], \
        [e.type for e in events]


async def test_a_dispatch_delivered_again_to_its_executor_is_not_run_twice(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor(concurrency=2)
    started = asyncio.Event()
    release = asyncio.Event()
    runs = 0

    @executor.tool("echo")
    async def echo(task: TaskMessage, ctx: TaskContext) -> str:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return task.description

    claims: list[Msg] = []
    dispatches: list[Msg] = []
    settled: list[bytes] = []

    async def claimed(msg: Msg) -> None:
        claims.append(msg)

    async def dispatched(msg: Msg) -> None:
        dispatches.append(msg)

    async def acked(msg: Msg) -> None:
        settled.append(msg.data)

    # A core subscription sees the claims (to the usual subject or to the session's owner) and
    # the dispatch as they are sent (offered: the executor takes offers).
    await nc.subscribe(f"planner.claim.{session}", cb=claimed)
    await nc.subscribe(f"planner.fwd.*.planner.claim.{session}", cb=claimed)
    await nc.subscribe("planner.offer.tool_call.echo", cb=dispatched)
    await nc.subscribe("test.settle", cb=acked)
    async with serving(executor, nc):
        runtime = executor._runtime
        assert runtime is not None
        [handler] = executor.handlers
        await client.submit(session, "one step", plan=ONE_STEP)
        await asyncio.wait_for(started.wait(), 10)
        await nc.flush()
        assert len(claims) == 1 and len(dispatches) == 1
        # The dispatch delivered again (as after a lost ack), its acks seen on test.settle.
        [dispatch] = dispatches
        again = Msg(_client=nc, subject=dispatch.subject, reply="test.settle", data=dispatch.data,
                    headers=dispatch.headers)
        # While the attempt runs: the planner would grant this executor's claim again (the
        # same id); the executor must not run the attempt a second time (a second run would
        # wait for `release` here, and time out).
        await asyncio.wait_for(attempt.run(again, handler, runtime), 10)
        release.set()
        events = await events_until_end(client, session)
        # Once it is over (its report perhaps not yet applied): not run again either.
        again = Msg(_client=nc, subject=dispatch.subject, reply="test.settle", data=dispatch.data,
                    headers=dispatch.headers)
        await asyncio.wait_for(attempt.run(again, handler, runtime), 10)
        await nc.flush()
    assert events[-1].type == "plan_completed", [e.type for e in events]
    assert runs == 1
    assert len(claims) == 1, "a delivery of an attempt the executor holds is not claimed again"
    # Each delivery again is acked (an empty message or `+ACK`): the attempt is taken.
    assert [d or b"+ACK" for d in settled] == [b"+ACK", b"+ACK"], settled
