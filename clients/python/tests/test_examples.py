"""The examples, run as a user runs them: separate processes, real signals, a terminal's stdin."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import events_until_end, serving
from nats.aio.client import Client as NatsClient

from planner_client import Client, Executor, TaskContext, TaskMessage

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def start(script: str, *args: str, env: dict[str, str], stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        env={**os.environ, **env}, text=True, stdin=stdin, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def finish(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[int, str]:
    out, _ = await asyncio.to_thread(proc.communicate, timeout=timeout)
    return proc.returncode, out


async def test_tool_executor_serves_until_sigterm(client: Client, session: str, nats_url: str,
                                                  tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("remember the milk")
    proc = start("tool_executor.py", "--root", str(tmp_path), env={"NATS_URL": nats_url})
    try:
        plan = {"tasks": [
            {"id": "ls", "description": "list .", "kind": "tool_call", "target": "filesystem"},
            {"id": "cat", "description": "read notes.txt", "kind": "tool_call", "target": "filesystem"},
            # Last: its failure ends the plan (fail fast), which would cancel the others.
            {"id": "escape", "description": "read ../../etc/passwd", "kind": "tool_call",
             "target": "filesystem", "dependencies": ["ls", "cat"]},
        ]}
        await client.submit(session, "look at the files", plan=plan)
        events = await events_until_end(client, session)
    finally:
        proc.send_signal(signal.SIGTERM)
        code, out = await finish(proc)
    assert code == 0, out
    assert "shutting down" in out
    outputs = {e.data["task_id"]: str(e.data.get("output") or e.data.get("error")) for e in events
               if e.type == "task_status_updated" and e.data["status"] in ("completed", "failed")}
    assert "notes.txt" in outputs["ls"]
    assert outputs["cat"] == "remember the milk"
    assert "outside the executor's root" in outputs["escape"]
    assert events[-1].type == "plan_failed"


class FakeLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint on loopback that echoes the step."""

    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeLLM.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                 "body": body})
        step = body["messages"][-1]["content"].rsplit("Your step", 1)[-1]
        reply = {"choices": [{"message": {"role": "assistant", "content": f"LLM says{step}"}}],
                 "usage": {"total_tokens": 17}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_llm() -> Iterator[str]:
    FakeLLM.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def test_llm_executor_is_off_unless_configured() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "llm_executor.py")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "LLM_BASE_URL is not set" in proc.stderr


async def test_llm_executor_against_a_local_endpoint(client: Client, session: str, nats_url: str,
                                                     fake_llm: str) -> None:
    env = {"NATS_URL": nats_url, "LLM_BASE_URL": fake_llm, "LLM_MODEL": "tiny",
           "LLM_API_KEY_ENV": "TEST_LLM_KEY", "TEST_LLM_KEY": "sk-test"}
    proc = start("llm_executor.py", env=env)
    try:
        plan = {"tasks": [{"id": "sum", "description": "summarize the notes", "kind": "processing",
                           "target": "summarize"}]}
        await client.submit(session, "notes please", plan=plan)
        events = await events_until_end(client, session)
    finally:
        proc.send_signal(signal.SIGTERM)
        code, out = await finish(proc)
    assert code == 0, out
    done = next(e for e in events if e.type == "task_status_updated" and e.data["status"] == "completed")
    assert done.data["output"] == "LLM says (summarize): summarize the notes"
    assert done.data["tokens_used"] == 17
    (request,) = FakeLLM.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "tiny"
    assert "The request: notes please" in request["body"]["messages"][1]["content"]


async def test_terminal_ui_answers_from_stdin(nc: NatsClient, session: str, nats_url: str) -> None:
    executor = Executor()

    @executor.tool("web_search")
    async def search(task: TaskMessage, ctx: TaskContext) -> str:
        return "12 flights found"

    @executor.processing("summarize")
    async def summarize(task: TaskMessage, ctx: TaskContext) -> str:
        return " / ".join(i.output for i in task.inputs)

    request = "1. search for flights\n2. Which date suits you?\n3. summarize the options"
    async with serving(executor, nc):
        proc = start("terminal_ui.py", session, "--submit", request, env={"NATS_URL": nats_url},
                     stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write("next Friday\n")
        proc.stdin.flush()
        code, out = await finish(proc)
    assert code == 0, out
    assert "? Which date suits you?" in out
    assert "plan completed" in out
    # The summary step gets everything it summarises: the search's results and the answer.
    assert "t3 done: 12 flights found / next Friday" in out
