"""The UI helper: questions arrive as they are asked, and answering one lets the plan go on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from planner_client import Client, Executor, Question, TaskContext, TaskMessage, wire


def executor_for_flights() -> tuple[Executor, dict[str, TaskMessage]]:
    executor = Executor()
    seen: dict[str, TaskMessage] = {}

    @executor.tool("web_search")
    async def search(task: TaskMessage, ctx: TaskContext) -> str:
        seen[task.task_id] = task
        return "12 flights found"

    @executor.processing("summarize")
    async def summarize(task: TaskMessage, ctx: TaskContext) -> str:
        seen[task.task_id] = task
        return "; ".join(f"{i.task_id}={i.output}" for i in task.inputs)

    return executor, seen


REQUEST = "1. search for flights\n2. Which date suits you?\n3. summarize the options"


async def test_question_is_yielded_and_its_answer_completes_the_plan(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor, seen = executor_for_flights()
    async with serving(executor, nc):
        questions = client.questions(session)
        first = asyncio.ensure_future(questions.__anext__())
        await asyncio.sleep(0.2)  # subscribed before the request, as a live UI is
        await client.submit(session, REQUEST)
        question = await asyncio.wait_for(first, 10)
        assert question.session == session
        assert question.text == "Which date suits you?"
        assert question.deadline is None
        # The question came in the request's trace, and its answer goes on in it.
        assert question.traceparent is not None
        answered: list[str | None] = []

        async def record(msg: Msg) -> None:
            answered.append(wire.traceparent(msg.headers))

        await nc.subscribe(f"planner.cmd.{session}", cb=record)
        reply = await question.answer("next Friday")
        assert reply.events[0].type == "clarification_answered"
        events = await events_until_end(client, session)
        await questions.aclose()
        await nc.flush()
        assert answered == [question.traceparent], answered

    assert events[-1].type == "plan_completed"
    summary = next(t for t in seen.values() if t.target == "summarize")
    outputs = {i.task_id: i.output for i in summary.inputs}
    assert "next Friday" in outputs.values()


async def test_open_question_is_found_in_the_log_by_a_late_ui(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor, _ = executor_for_flights()
    async with serving(executor, nc):
        await client.submit(session, REQUEST)
        # Wait until the question has been asked, with no UI listening.
        async for event in client.watch(session):
            if event.type == "clarification_requested":
                break
        questions = client.questions(session)
        question = await asyncio.wait_for(questions.__anext__(), 10)
        assert question.text == "Which date suits you?"
        await question.answer("tomorrow")
        events = await events_until_end(client, session)
        await questions.aclose()
    assert events[-1].type == "plan_completed"
    # Answered questions are no longer open.
    assert [q async for q in _open_now(client, session)] == []


async def _open_now(client: Client, session: str) -> AsyncGenerator[Question, None]:
    """The questions still open, without waiting for new ones."""
    questions = client.questions(session)
    try:
        while True:
            yield await asyncio.wait_for(questions.__anext__(), 0.5)
    except asyncio.TimeoutError:
        return
    finally:
        await questions.aclose()
