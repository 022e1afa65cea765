#!/usr/bin/env python3
"""A tool executor: `http_fetch` and `filesystem` tool calls, served until SIGINT or SIGTERM.

    python examples/tool_executor.py --nats nats://127.0.0.1:4222 --root /srv/files

- `tool_call.http_fetch`: GETs the first http(s) URL in the task's attachments or description
  and returns the body's first `--max-bytes`. A 5xx, a timeout or a refused connection is
  `Retryable`; another 4xx is `Fatal` (the same request would fail again).
- `tool_call.filesystem`: lists a directory or reads a file named in the description (its first
  word that is a path), inside `--root` only.

Both handlers are synchronous (blocking I/O) and run in the executor's threads; they check the
context between steps so that a cancelled attempt stops early.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from planner_client import Executor, Fatal, Retryable, Subjects, TaskContext, TaskMessage

URL = re.compile(r"https?://\S+")


def build(root: Path, max_bytes: int, concurrency: int, prefix: str) -> Executor:
    executor = Executor(subjects=Subjects(prefix=prefix), concurrency=concurrency)

    @executor.tool("http_fetch")
    def http_fetch(task: TaskMessage, ctx: TaskContext) -> str:
        urls = [a.uri for a in task.attachments if URL.match(a.uri)] + URL.findall(task.description)
        if not urls:
            raise Fatal("no http(s) URL in the attachments or the description")
        ctx.raise_if_cancelled()
        request = urllib.request.Request(urls[0], headers={"User-Agent": "planner-tool-executor"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body: bytes = response.read(max_bytes)
        except urllib.error.HTTPError as error:
            if error.code >= 500 or error.code == 429:
                raise Retryable(f"HTTP {error.code} from {urls[0]}") from error
            raise Fatal(f"HTTP {error.code} from {urls[0]}") from error
        except (urllib.error.URLError, TimeoutError) as error:
            raise Retryable(f"fetching {urls[0]} failed: {error}") from error
        return body.decode("utf-8", errors="replace")

    @executor.tool("filesystem")
    def filesystem(task: TaskMessage, ctx: TaskContext) -> str:
        words = [w.strip("'\"`,") for w in task.description.split()]
        named = next((w for w in words if "/" in w or w == "." or (root / w).exists()), ".")
        path = (root / named).resolve()
        if path != root and root not in path.parents:
            raise Fatal(f"{named} is outside the executor's root")
        if path.is_dir():
            return "\n".join(sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()))
        if path.is_file():
            with open(path, "rb") as f:
                return f.read(max_bytes).decode("utf-8", errors="replace")
        raise Fatal(f"no file or directory {named} under the root")

    return executor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--prefix", default="planner", help="the planner's subject prefix")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="what filesystem may read")
    parser.add_argument("--max-bytes", type=int, default=64 * 1024)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build(args.root.resolve(), args.max_bytes, args.concurrency, args.prefix).run(args.nats)


if __name__ == "__main__":
    main()
