"""Hand-over (docs/protocol.md, "The next task with the reply"): a final report asks for the
session's next task, and the planner hands it over with the reply, claimed: the executor runs it
in the same slot without an offer, a stream message or a claim of its own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from planner_client import Client, Executor, TaskContext, TaskMessage

CHAIN = {"tasks": [
    {"id": "a", "description": "first", "kind": "tool_call", "target": "web_search"},
    {"id": "b", "description": "second", "kind": "tool_call", "target": "web_search",
     "dependencies": ["a"]},
    {"id": "c", "description": "third", "kind": "tool_call", "target": "web_search",
     "dependencies": ["b"]},
]}


def searching(runs: list[str], **options: object) -> Executor:
    executor = Executor(**options)  # type: ignore[arg-type]

    @executor.tool("web_search")
    async def search(task: TaskMessage, ctx: TaskContext) -> str:
        runs.append(task.task_id)
        await asyncio.sleep(0.01)
        return f"found {task.description}"

    return executor


async def counting_claims(nc: NatsClient) -> tuple[list[str], list[Any]]:
    """Every claim request any executor sends, as its subject (a listener beside the daemon's):
    to the planner's subjects, or addressed to the session's owner."""
    claims: list[str] = []

    async def seen(msg: Msg) -> None:
        claims.append(msg.subject)

    subs = [await nc.subscribe("planner.claim.>", cb=seen),
            await nc.subscribe("planner.fwd.*.planner.claim.>", cb=seen)]
    await nc.flush()
    return claims, subs


@pytest.mark.parametrize(("take_next", "claims_made"), [(True, 1), (False, 3)],
                         ids=["hand-over", "claims"])
async def test_a_chain_is_handed_over_task_by_task_with_one_claim_only(
    nc: NatsClient, client: Client, session: str, take_next: bool, claims_made: int
) -> None:
    runs: list[str] = []
    claims, subs = await counting_claims(nc)
    async with serving(searching(runs, concurrency=3, take_next=take_next), nc):
        await client.submit(session, "three in a row", plan=CHAIN)
        events = await events_until_end(client, session)
    for sub in subs:
        await sub.unsubscribe()
    assert events[-1].type == "plan_completed", [e.type for e in events]
    assert runs == ["a", "b", "c"]
    # a is claimed; b and c come claimed with the replies to a's and b's reports.
    assert len(claims) == claims_made, claims


async def test_only_tasks_the_executor_serves_are_handed_over(
    nc: NatsClient, client: Client, session: str
) -> None:
    # a and c are searches, b a summary: the searcher's report on a cannot bring b, and the
    # summariser's report on b cannot bring c.
    plan = {"tasks": [
        {"id": "a", "description": "first", "kind": "tool_call", "target": "web_search"},
        {"id": "b", "description": "second", "kind": "processing", "target": "summarize",
         "dependencies": ["a"]},
        {"id": "c", "description": "third", "kind": "tool_call", "target": "web_search",
         "dependencies": ["b"]},
    ]}
    searched: list[str] = []
    summarized: list[str] = []
    summarizer = Executor(concurrency=2, consumer_prefix="summarizer")

    @summarizer.processing("summarize")
    async def summarize(task: TaskMessage, ctx: TaskContext) -> str:
        summarized.append(task.task_id)
        return "summary"

    async with serving(searching(searched, concurrency=2, consumer_prefix="searcher"), nc), \
            serving(summarizer, nc):
        await client.submit(session, "search, summarise, search", plan=plan)
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed", [e.type for e in events]
    assert searched == ["a", "c"]
    assert summarized == ["b"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic, on dumping the bad model
async def test_a_task_handed_over_that_cannot_be_read_is_left_to_its_timeout_not_raised() -> None:
    # A reply whose task does not read as a dispatch here (the attempt is not a number): the
    # attempt loop must not raise (it runs inside an executor slot), nor run anything.
    from planner_client import attempt, routing
    from planner_client.models.report_reply import NextTask
    from planner_client.models.report_reply import TaskMessage as HandedTask

    task = HandedTask.model_construct(session="s", task_id="t", attempt="not a number",
                                      kind="tool_call", target="web_search", description="d",
                                      attachments=[], inputs=[], context_ref="")
    handed = NextTask.model_construct(task=task, lease="lease-of-a-bad-task-01")
    rt: Any = object()  # never reached: nothing is reported or run
    assert await attempt._run_handed_over(handed, rt, routing.USUAL, None) is None
