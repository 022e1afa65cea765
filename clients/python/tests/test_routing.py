"""Addressing the session's owner a dispatch names (docs/protocol.md, "Addressing the owner")."""

from __future__ import annotations

import asyncio

from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from planner_client import Client, Executor, TaskContext, TaskMessage
from planner_client.routing import Addressing, Route, owner, request
from planner_client.subjects import Subjects

PLAN = {"tasks": [{"id": "a", "description": "one step", "kind": "tool_call", "target": "addressed"}]}


async def test_an_executor_sends_its_claim_and_report_to_the_owner_its_dispatch_names(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor()

    @executor.tool("addressed")
    async def addressed(task: TaskMessage, ctx: TaskContext) -> str:
        return "done"

    # What went where, as a core subscription sees it.
    seen: list[str] = []

    async def record(msg: Msg) -> None:
        seen.append(msg.subject)

    for subject in ("planner.fwd.>", f"planner.claim.{session}", f"planner.result.{session}"):
        await nc.subscribe(subject, cb=record)
    owners: list[str | None] = []

    async def dispatched(msg: Msg) -> None:
        owners.append(owner(msg.headers))

    # The executor takes offers: the dispatch is seen on its offer subject.
    await nc.subscribe("planner.offer.tool_call.addressed", cb=dispatched)
    async with serving(executor, nc):
        await client.submit(session, "one step", plan=PLAN)
        events = await events_until_end(client, session)
    await nc.flush()
    assert events[-1].type == "plan_completed", [e.type for e in events]
    [named] = owners
    assert named is not None, "the dispatch names its session's owner"
    assert sorted(seen) == sorted([f"planner.fwd.{named}.planner.claim.{session}",
                                   f"planner.fwd.{named}.planner.result.{session}"]), seen


async def test_a_gone_owner_is_skipped_at_once_and_a_silent_one_pauses_addressing(
    nc: NatsClient,
) -> None:
    # A prefix of its own: the planner the other tests run answers `planner.claim.*` too, and
    # its reply (this test's `{}` is malformed to it) raced the scripted one.
    subjects = Subjects(prefix="routing")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"usual")

    await nc.subscribe("routing.claim.routing-s", cb=answer)
    # Nobody listens for "ghost": the usual subject answers, without waiting the timeout.
    addressing = Addressing()
    started = asyncio.get_running_loop().time()
    reply = await request(nc, subjects, Route("ghost", addressing), "routing.claim.routing-s",
                          b"{}", timeout=2.0, headers=None)
    assert reply.data == b"usual"
    assert asyncio.get_running_loop().time() - started < 1.0
    assert addressing.on()

    # "mute" listens and never answers (as a server dropping a denied publish would): the usual
    # subject answers after the timeout, and the executor stops addressing owners for a while.
    async def silent(msg: Msg) -> None:
        pass

    await nc.subscribe("routing.fwd.mute.>", cb=silent)
    await nc.flush()
    reply = await request(nc, subjects, Route("mute", addressing), "routing.claim.routing-s",
                          b"{}", timeout=0.3, headers=None)
    assert reply.data == b"usual"
    assert not addressing.on()


def test_only_a_valid_owner_name_is_taken_from_a_dispatch() -> None:
    assert owner({"Planner-Owner": "Yd5u1oFH9x-z_2"}) == "Yd5u1oFH9x-z_2"
    assert owner({"planner-owner": "abc"}) == "abc"
    for bad in ["", "a.b", "*", ">", "a b", "é", "x" * 200]:
        assert owner({"Planner-Owner": bad}) is None, bad
    assert owner(None) is None
    assert owner({}) is None
