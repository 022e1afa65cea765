"""Fixtures: a real nats-server and a real planner daemon per test, nothing mocked.

`NATS_SERVER_BIN` (or `nats-server` on PATH, 2.10 or newer) and `PLANNER_SVC_BIN` (or the
repository's `target/debug/planner-svc`) are the binaries; a test that needs one that is
missing is skipped with the reason. Each test gets its own server on a free port with its own
JetStream directory, and its own daemon with a 900 ms heartbeat timeout (so executors
heartbeat every 300 ms) and a short retry backoff, so that the tests run in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from planner_client import Client, Executor, SessionEvent

REPO_ROOT = Path(__file__).resolve().parents[3]
HEARTBEAT_TIMEOUT_MS = 900
HEARTBEAT_INTERVAL = HEARTBEAT_TIMEOUT_MS / 3 / 1000


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else None


def _nats_server_bin() -> str:
    candidates = [os.environ.get("NATS_SERVER_BIN"), shutil.which("nats-server")]
    found = []
    for candidate in filter(None, candidates):
        version = _version(candidate)
        if version is not None and version >= (2, 10, 0):
            return candidate
        found.append(f"{candidate} ({'.'.join(map(str, version)) if version else 'unknown version'})")
    pytest.skip("needs nats-server 2.10 or newer (JetStream work queues with claims): set "
                f"NATS_SERVER_BIN; found {', '.join(found) or 'none'}")


def _planner_bin() -> str:
    candidate = os.environ.get("PLANNER_SVC_BIN") or str(REPO_ROOT / "target" / "debug" / "planner-svc")
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        pytest.skip(f"needs the planner daemon: set PLANNER_SVC_BIN (no executable at {candidate}; "
                    "`cargo build -p planner-svc` builds target/debug/planner-svc)")
    return candidate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A fresh nats-server with JetStream, on loopback, stopped after the test."""
    binary = _nats_server_bin()
    port = _free_port()
    store = tmp_path / "jetstream"
    log = open(tmp_path / "nats-server.log", "wb")
    proc = subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(tmp_path / 'nats-server.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nats-server did not start listening within 10s") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()


@dataclass
class Planner:
    """The daemon under test."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest_asyncio.fixture
async def planner(nats_url: str, tmp_path: Path) -> AsyncIterator[Planner]:
    """`planner-svc serve` on the test's server, ready (it answers `$SRV.PING.planner`)."""
    binary = _planner_bin()
    workdir = tmp_path / "planner"
    workdir.mkdir()
    # A clean environment (no PLANNER_* of the caller, no config file in the working directory):
    # the daemon runs on its defaults and these settings only.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "PLANNER_NATS__URL": nats_url,
        "PLANNER_PLANNER__LEASES__HEARTBEAT_TIMEOUT_MS": str(HEARTBEAT_TIMEOUT_MS),
        "PLANNER_PLANNER__RETRY__INITIAL_BACKOFF_MS": "200",
        "PLANNER_SHUTDOWN__GRACE_S": "2",
        # Every context is then left out of the dispatches and comes with the claim's grant,
        # the path large contexts take (docs/protocol.md): the tests' handlers see it there.
        "PLANNER_DISPATCH__INLINE_CONTEXT_BYTES": "8",
        # The default, said here (docs/protocol.md, "Offers"): the client's tests cover them.
        "PLANNER_DISPATCH__OFFERS": "true",
        "RUST_LOG": "info",
        "NO_COLOR": "1",
    }
    log_path = tmp_path / "planner.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([binary, "serve"], cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    nc = await nats.connect(nats_url)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"planner-svc exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                await nc.request("$SRV.PING.planner", b"", timeout=0.5)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"planner-svc not ready within 60s:\n{log_path.read_text()}"
                    ) from None
                await asyncio.sleep(0.1)
        await nc.close()
        yield Planner(proc, log_path)
    finally:
        if not nc.is_closed:
            await nc.close()
        _stop(proc)
        log.close()


@pytest_asyncio.fixture
async def nc(planner: Planner, nats_url: str) -> AsyncIterator[NatsClient]:
    """A connection to the test's server, with the daemon running."""
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def client(nc: NatsClient) -> Client:
    return Client(nc)


@pytest.fixture
def session() -> str:
    """A session id of its own for each test."""
    return f"py-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def serving(executor: Executor, nc: NatsClient) -> AsyncIterator[asyncio.Event]:
    """Runs `executor` on `nc` inside the block; yields the shutdown event, and on exit shuts
    the executor down gracefully and waits for it."""
    shutdown = asyncio.Event()
    task = asyncio.create_task(executor.serve(nc, shutdown=shutdown))
    ready = asyncio.create_task(executor.ready.wait())
    done, _ = await asyncio.wait([task, ready], timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises what serve raised
        raise RuntimeError("the executor stopped before it was ready")
    if ready not in done:
        raise RuntimeError("the executor was not ready within 15s")
    try:
        yield shutdown
    finally:
        shutdown.set()
        await asyncio.wait_for(task, timeout=executor.grace_period + 30)


async def events_until_end(client: Client, session: str, timeout: float = 30) -> list[SessionEvent]:
    """Every event of the session up to the plan's end, read with `watch`."""
    seen: list[SessionEvent] = []

    async def collect() -> None:
        async for event in client.watch(session):
            seen.append(event)
            if event.ends_plan:
                return

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(
            f"the plan did not end within {timeout}s; events: {[e.type for e in seen]}"
        ) from None
    return seen
