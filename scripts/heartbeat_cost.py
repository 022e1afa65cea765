#!/usr/bin/env python3
"""Measures what heartbeats cost the daemon (docs/benchmarks.md, "Heartbeat cost").

Starts nats-server ($NATS_SERVER_BIN) and `planner-svc serve` (release build by default),
creates N sessions of one task each, claims every attempt, then for a window sends nothing
(idle) and for another window heartbeats every attempt every INTERVAL seconds, and reports the
daemon's CPU time and the event-stream appends in each window.

    python3 -m venv /tmp/hb && /tmp/hb/bin/pip install nats-py
    /tmp/hb/bin/python scripts/heartbeat_cost.py --attempts 1000 --interval 5 --window 60
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import tempfile
import time

import nats


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def events_in_stream(js):
    info = await js.stream_info("PLANNER_EVENTS")
    return info.state.messages


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--attempts", type=int, default=1000)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--window", type=float, default=60.0)
    p.add_argument("--daemon", default="target/release/planner-svc")
    args = p.parse_args()

    port = free_port()
    store = tempfile.mkdtemp()
    server = subprocess.Popen(
        [os.environ.get("NATS_SERVER_BIN", "nats-server"), "-js", "-a", "127.0.0.1",
         "-p", str(port), "-sd", store],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"nats://127.0.0.1:{port}"
    # The heartbeat timeout is three intervals, so the planner records one every 1.5 intervals.
    env = dict(os.environ, PLANNER_NATS__URL=url, PLANNER_LOG__LEVEL="warn",
               PLANNER_PLANNER__LEASES__HEARTBEAT_TIMEOUT_MS=str(int(args.interval * 3000)),
               PLANNER_LIMITS__MAX_REQUESTS_IN_FLIGHT="100000",
               PLANNER_SESSIONS__MAX_LOADED="100000")
    daemon = subprocess.Popen([os.path.abspath(args.daemon), "serve"], env=env,
                              cwd=tempfile.mkdtemp(), stdout=subprocess.DEVNULL)
    try:
        nc = await nats.connect(url)
        for _ in range(100):
            try:
                await nc.request("$SRV.PING.planner", b"", timeout=0.2)
                break
            except Exception:
                await asyncio.sleep(0.05)
        js = nc.jetstream()
        plan = {"tasks": [{"id": "a", "description": "long work", "kind": "tool_call",
                           "target": "tool", "dependencies": []}]}
        for i in range(args.attempts):
            cmd = {"type": "initialize", "input": "long work", "plan": plan}
            await nc.request(f"planner.cmd.hb{i}", json.dumps(cmd).encode(), timeout=10)
        leases = []

        async def window(beating):
            cpu0, ev0, t0 = cpu_seconds(daemon.pid), await events_in_stream(js), time.monotonic()
            beats = 0
            while time.monotonic() - t0 < args.window:
                start = time.monotonic()
                if beating:
                    pending = [nc.request(f"planner.heartbeat.hb{i}",
                                          json.dumps({"task_id": "a", "attempt": 1,
                                                      "lease": leases[i]}).encode(), timeout=10)
                               for i in range(args.attempts)]
                    for reply in await asyncio.gather(*pending):
                        assert json.loads(reply.data)["status"] == "alive", reply.data
                    beats += args.attempts
                await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - start)))
            seconds = time.monotonic() - t0
            cpu = cpu_seconds(daemon.pid) - cpu0
            appends = await events_in_stream(js) - ev0
            return seconds, cpu, beats, appends

        # Idle first: unclaimed attempts have no timeout to fire. Then claim all and heartbeat.
        idle = await window(False)
        for i in range(args.attempts):
            reply = await nc.request(f"planner.claim.hb{i}",
                                     json.dumps({"task_id": "a", "attempt": 1}).encode(), timeout=10)
            leases.append(json.loads(reply.data)["lease"])
        beating = await window(True)
        for name, (seconds, cpu, beats, appends) in (("idle", idle), ("heartbeating", beating)):
            print(f"{name}: {seconds:.0f} s, daemon CPU {cpu:.2f} s ({100 * cpu / seconds:.1f}% of a core), "
                  f"{beats / seconds:.0f} heartbeats/s, {appends / seconds:.1f} event appends/s")
        await nc.close()
    finally:
        daemon.terminate()
        daemon.wait()
        server.terminate()
        server.wait()


asyncio.run(main())
