"""How a handler's ending becomes a report, without NATS: the cases the daemon tests cannot reach cheaply."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from planner_client import Fatal, NeedsClarification, Retryable, TaskMessage, TaskResult
from planner_client.handlers import report_for
from planner_client.models.executor_report import ReportMessageFailed
from planner_client.reporting import ERROR_CHARS, MAX_REPORT_BYTES

TASK = TaskMessage.model_validate({
    "session": "s", "task_id": "t1", "attempt": 3, "kind": "tool_call", "target": "x",
    "description": "d", "attachments": [], "inputs": [],
    "context": {"request": "r", "profile": "general"},
})


def ended(result: object = None, error: BaseException | None = None) -> Future[object]:
    """A finished handler (report_for only reads `result()`)."""
    future: Future[object] = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    return future


@pytest.mark.parametrize(("ending", "expected"), [
    (ended("out"), {"status": "completed", "output": "out"}),
    (ended(TaskResult("out", 5)), {"status": "completed", "output": "out", "tokens_used": 5}),
    (ended(error=Retryable("busy", tokens_used=2)),
     {"status": "failed", "error": "busy", "retryable": True, "tokens_used": 2}),
    (ended(error=Fatal("bad input")), {"status": "failed", "error": "bad input", "retryable": False}),
    (ended(error=ValueError("oops")), {"status": "failed", "error": "ValueError: oops", "retryable": True}),
    (ended(error=NeedsClarification("which?")), {"status": "needs_clarification", "question": "which?"}),
    (ended({"not": "a string"}), {"status": "failed", "retryable": False,
                                  "error": "the handler returned dict; it must return str or TaskResult"}),
])
def test_endings(ending: Future[object], expected: dict[str, object]) -> None:
    report = report_for(ending, TASK, "lease-1")
    body = report.model_dump(exclude_none=True)
    assert body == {"task_id": "t1", "attempt": 3, "lease": "lease-1", **expected}


def test_an_output_too_large_to_report_fails_for_good() -> None:
    report = report_for(ended("x" * MAX_REPORT_BYTES), TASK, "lease-1")
    assert isinstance(report, ReportMessageFailed)
    assert report.status == "failed" and report.retryable is False
    assert "more than the 262144 a report may carry" in report.error


def test_long_errors_keep_head_and_tail() -> None:
    report = report_for(ended(error=Retryable("a" * ERROR_CHARS + "z" * ERROR_CHARS)), TASK, "l")
    assert isinstance(report, ReportMessageFailed)
    assert len(report.error) < ERROR_CHARS + 20
    assert report.error.startswith("aaa") and report.error.endswith("zzz") and "[...]" in report.error
