"""How a handler's exception becomes a report, and what the planner makes of it."""

from __future__ import annotations

from typing import Any

from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel

from planner_client import (
    Client,
    Executor,
    Fatal,
    NeedsClarification,
    Retryable,
    TaskContext,
    TaskMessage,
)


def one_task(target: str) -> dict[str, Any]:
    return {"tasks": [{"id": "only", "description": "do it", "kind": "tool_call", "target": target}]}


async def test_retryable_failure_is_retried_as_attempt_two(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor()
    attempts: list[int] = []

    @executor.tool("flaky")
    async def flaky(task: TaskMessage, ctx: TaskContext) -> str:
        attempts.append(task.attempt)
        if task.attempt == 1:
            raise Retryable("HTTP 503 from the API", tokens_used=7)
        return "second time lucky"

    async with serving(executor, nc):
        await client.submit(session, "flaky", plan=one_task("flaky"))
        events = await events_until_end(client, session)

    assert attempts == [1, 2]
    assert events[-1].type == "plan_completed"
    retry = next(e for e in events if e.type == "retry_scheduled")
    assert retry.data["attempt"] == 1
    assert retry.data["error"] == "HTTP 503 from the API"
    assert retry.data["tokens_used"] == 7
    done = next(e for e in events if e.type == "task_status_updated" and e.data["status"] == "completed")
    assert done.data["attempt"] == 2 and done.data["output"] == "second time lucky"


async def test_unexpected_exception_is_retryable(nc: NatsClient, client: Client, session: str) -> None:
    executor = Executor()
    attempts: list[int] = []

    @executor.tool("buggy")
    def buggy(task: TaskMessage, ctx: TaskContext) -> str:
        attempts.append(task.attempt)
        if task.attempt == 1:
            raise KeyError("missing")
        return "ok"

    async with serving(executor, nc):
        await client.submit(session, "buggy", plan=one_task("buggy"))
        events = await events_until_end(client, session)

    assert attempts == [1, 2]
    assert events[-1].type == "plan_completed"
    retry = next(e for e in events if e.type == "retry_scheduled")
    assert retry.data["error"] == "KeyError: 'missing'"


async def test_fatal_failure_is_not_retried(nc: NatsClient, client: Client, session: str) -> None:
    executor = Executor()
    attempts: list[int] = []

    @executor.tool("doomed")
    async def doomed(task: TaskMessage, ctx: TaskContext) -> str:
        attempts.append(task.attempt)
        raise Fatal("404: no such page")

    async with serving(executor, nc):
        await client.submit(session, "doomed", plan=one_task("doomed"))
        events = await events_until_end(client, session)

    assert attempts == [1]
    assert events[-1].type == "plan_failed"
    assert "retry_scheduled" not in [e.type for e in events]
    failed = next(e for e in events if e.type == "task_status_updated" and e.data["status"] == "failed")
    assert failed.data["error"] == "404: no such page"


async def test_handler_can_ask_a_question_mid_task(nc: NatsClient, client: Client, session: str) -> None:
    executor = Executor()
    answers: list[str | None] = []

    @executor.tool("book")
    async def book(task: TaskMessage, ctx: TaskContext) -> str:
        answers.append(task.answer)
        if task.answer is None:
            raise NeedsClarification("Which airline do you prefer?")
        return f"booked with {task.answer}"

    async with serving(executor, nc):
        await client.submit(session, "book a flight", plan=one_task("book"))
        async for question in client.questions(session):
            assert question.text == "Which airline do you prefer?"
            assert question.task_id == "only" and question.attempt == 1
            await question.answer("the cheapest")
            break
        events = await events_until_end(client, session)

    assert answers == [None, "the cheapest"]
    assert events[-1].type == "plan_completed"
    done = next(e for e in events if e.type == "task_status_updated" and e.data["status"] == "completed")
    assert done.data["output"] == "booked with the cheapest"


class Booking(BaseModel):
    """What the `reserve` handler expects its description to be."""

    flight: str
    seats: int


async def test_input_the_handler_cannot_read_fails_for_good_and_the_executor_goes_on(
    nc: NatsClient, client: Client, session: str
) -> None:
    executor = Executor(concurrency=1)
    attempts: list[tuple[str, int]] = []

    @executor.tool("reserve")
    async def reserve(task: TaskMessage, ctx: TaskContext) -> str:
        attempts.append((task.session, task.attempt))
        booking = Booking.model_validate_json(task.description)  # raises ValidationError
        return f"{booking.seats} seats on {booking.flight}"

    later = f"{session}-next"
    async with serving(executor, nc):
        await client.submit(session, "bad", plan={"tasks": [
            {"id": "only", "description": '{"flight": "LH 400", "seats": "many"}',
             "kind": "tool_call", "target": "reserve"}]})
        events = await events_until_end(client, session)
        # The same executor takes the next task as if nothing had happened.
        await client.submit(later, "good", plan={"tasks": [
            {"id": "only", "description": '{"flight": "LH 400", "seats": 2}',
             "kind": "tool_call", "target": "reserve"}]})
        next_events = await events_until_end(client, later)
        assert executor.ready.is_set()

    assert attempts == [(session, 1), (later, 1)]
    assert events[-1].type == "plan_failed"
    assert "retry_scheduled" not in [e.type for e in events]
    failed = next(e for e in events if e.type == "task_status_updated" and e.data["status"] == "failed")
    assert failed.data["error"].startswith("invalid input: 1 validation error for Booking")
    assert "seats" in failed.data["error"]
    assert next_events[-1].type == "plan_completed"
    done = next(e for e in next_events
                if e.type == "task_status_updated" and e.data["status"] == "completed")
    assert done.data["output"] == "2 seats on LH 400"
