"""Reports go to the planner directly (a request answered once applied); the report stream is
the fallback when no planner answers (docs/protocol.md, "Reports")."""

from __future__ import annotations

import logging
import time

import nats
import pytest
from conftest import Planner, events_until_end, serving
from nats.aio.client import Client as NatsClient

from planner_client import Client, Executor, Subjects, TaskContext, TaskMessage, reporting

TASK = TaskMessage.model_validate({
    "session": "py-nobody", "task_id": "t1", "attempt": 1, "kind": "tool_call", "target": "x",
    "description": "d", "attachments": [], "inputs": [],
    "context": {"request": "r", "profile": "general"},
})


async def stored_reports(nc: NatsClient) -> int:
    info = await nc.jetstream().stream_info("PLANNER_REPORTS")
    return info.state.messages


PLAN = {"tasks": [
    {"id": "a", "description": "first", "kind": "tool_call", "target": "echo"},
    {"id": "b", "description": "second", "kind": "tool_call", "target": "echo", "dependencies": ["a"]},
]}


@pytest.mark.parametrize(("direct", "stored"), [(True, 0), (False, 2)])
async def test_reports_go_directly_unless_turned_off(
    nc: NatsClient, client: Client, session: str, direct: bool, stored: int
) -> None:
    executor = Executor(direct_reports=direct)

    @executor.tool("echo")
    async def echo(task: TaskMessage, ctx: TaskContext) -> str:
        return task.description

    async with serving(executor, nc):
        await client.submit(session, "two steps", plan=PLAN)
        events = await events_until_end(client, session)
    assert events[-1].type == "plan_completed", [e.type for e in events]
    # Direct reports are answered once applied and stored by no stream; published ones are.
    assert await stored_reports(nc) == stored


async def test_a_refused_direct_report_is_dropped_not_published(
    nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    direct = reporting.DirectReports()
    report = reporting.completed(TASK, "no-such-lease", "out", None)
    with caplog.at_level(logging.ERROR, logger="planner_client.reporting"):
        sent = await reporting.send(nc, nc.jetstream(), Subjects(), TASK.session, report,
                                    direct=direct, timeout=5)
    assert sent
    assert "refused by the planner (rejected" in caplog.text
    assert await stored_reports(nc) == 0


async def test_with_no_planner_running_a_report_goes_to_the_stream(
    planner: Planner, nats_url: str
) -> None:
    # The daemon made the streams; now no one answers planner.result.
    planner.proc.terminate()
    planner.proc.wait(timeout=10)
    nc = await nats.connect(nats_url)
    try:
        direct = reporting.DirectReports()
        report = reporting.completed(TASK, "lease", "out", None)
        sent = await reporting.send(nc, nc.jetstream(), Subjects(), TASK.session, report,
                                    direct=direct, timeout=5)
        assert sent
        assert await stored_reports(nc) == 1
        # No responders is no reason to stop asking: only a timeout pauses the direct path.
        assert direct.on()
    finally:
        await nc.close()


def test_direct_reports_pause_longer_each_time_until_one_is_answered() -> None:
    direct = reporting.DirectReports(first=0.05, longest=0.2)
    assert direct.on()
    direct.timed_out()
    assert not direct.on()
    assert direct.pause == 0.1  # the next one
    # Reports sent before the pause that time out during it are the same trouble.
    direct.timed_out()
    assert direct.pause == 0.1
    time.sleep(0.07)  # the first pause, 0.05 s, is over
    assert direct.on()
    direct.timed_out()
    assert not direct.on()
    assert direct.pause == 0.2
    time.sleep(0.12)  # the second, 0.1 s, is over
    assert direct.on()
    direct.timed_out()
    assert not direct.on()
    assert direct.pause == 0.2  # the longest
    # An answer: the next trouble is new, and paused for as short as the first.
    direct.answered()
    assert direct.pause == 0.05
    assert not reporting.DirectReports(enabled=False).on()
