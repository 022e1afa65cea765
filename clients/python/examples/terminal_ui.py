#!/usr/bin/env python3
"""A terminal UI: follows a session, asks you its questions, and sends your answers.

    python examples/terminal_ui.py my-session --submit "1. search for flights
    2. Which date suits you?
    3. summarize the options"

Without `--submit` it attaches to an existing session (questions already open are asked
first). It prints progress as the events arrive and exits when the plan ends (status 0 when it
completed, 1 otherwise), or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from planner_client import Client, PlannerError, Question, SessionEvent, Subjects


def describe(event: SessionEvent) -> str | None:
    """One line per event worth showing, or None."""
    d = event.data
    match event.type:
        case "tasks_planned":
            steps = ", ".join(f"{t['id']} ({t['kind']} {t['target']})" for t in d["tasks"])
            return f"planned: {steps}"
        case "task_status_updated" if d["status"] == "completed":
            output = (d.get("output") or "").strip().replace("\n", " ")
            return f"{d['task_id']} done: {output[:120]}"
        case "task_status_updated" if d["status"] == "failed":
            return f"{d['task_id']} failed: {d.get('error')}"
        case "retry_scheduled":
            return f"{d['task_id']} attempt {d['attempt']} failed, retrying: {d['error']}"
        case "task_cancelled":
            return f"{d['task_id']} cancelled: {d.get('reason')}"
        case "plan_completed" | "plan_failed" | "plan_cancelled":
            return event.type.replace("_", " ")
    return None


def read_line(prompt: str) -> asyncio.Future[str]:
    """`input()` in a daemon thread: a prompt still waiting when the plan ends (another UI
    answered, say) must not keep the program alive, as a pool thread would."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        outcome: tuple[Callable[[Any], None], Any]
        try:
            line = input(prompt)
            outcome = (future.set_result, line)
        except EOFError as error:
            outcome = (future.set_exception, error)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop is gone: the program is exiting

    threading.Thread(target=run, daemon=True).start()
    return future


async def ask(question: Question) -> None:
    """Prompts on the terminal and sends the answer."""
    prompt = f"\n? {question.text}"
    if question.deadline:
        prompt += f" (answer by {datetime.fromtimestamp(question.deadline / 1000):%H:%M:%S})"
    print(prompt, flush=True)
    try:
        text = await read_line("> ")
    except EOFError:
        return  # no more input: leave the question open for another UI
    try:
        reply = await question.answer(text.strip())
    except PlannerError as error:
        print(f"  not accepted: {error.message}", flush=True)
        return
    print(f"  answered {question.task_id} (session version {reply.version})", flush=True)


async def answer_questions(client: Client, session: str) -> None:
    async for question in client.questions(session):
        await ask(question)


async def follow(client: Client, session: str) -> SessionEvent:
    async for event in client.watch(session):
        line = describe(event)
        if line:
            print(line, flush=True)
        if event.ends_plan:
            return event
    raise AssertionError("the event stream ended")


async def main_async(args: argparse.Namespace) -> int:
    async with await Client.connect(args.nats, subjects=Subjects(prefix=args.prefix)) as client:
        if args.submit:
            await client.submit(args.session, args.submit)
        questions = asyncio.create_task(answer_questions(client, args.session))
        try:
            end = await follow(client, args.session)
        finally:
            questions.cancel()
        return 0 if end.type == "plan_completed" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("session", help="the session id (1-64 of A-Z a-z 0-9 _ -)")
    parser.add_argument("--submit", help="a request to send first")
    parser.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--prefix", default="planner")
    args = parser.parse_args()
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
