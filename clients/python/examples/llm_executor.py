#!/usr/bin/env python3
"""An LLM executor: processing steps answered by any OpenAI-compatible chat-completions endpoint.

Off unless configured: with no `LLM_BASE_URL` it says so and exits without touching the network.

    LLM_BASE_URL=http://127.0.0.1:11434/v1 LLM_MODEL=llama3.1 python examples/llm_executor.py

Settings (environment): `LLM_BASE_URL` (up to and including `/v1`: OpenAI, vLLM, Ollama's /v1,
llama.cpp's server), `LLM_MODEL`, `LLM_API_KEY_ENV` (the name of the variable holding the key,
default `OPENAI_API_KEY`; unset or empty: no key is sent), `LLM_TIMEOUT_S` (default 60),
`NATS_URL`. It serves `processing.<target>` for `LLM_TARGETS` (default: summarize, analyze,
translate, generate, extract, llm).

Each step becomes one chat request: the session's system prompt, then the request, the older
conversation's summary, the outputs of the steps it depends on, the step itself and a human's
answer if it asked. 429, 5xx and timeouts are `Retryable`, other 4xx `Fatal`; the tokens the
endpoint reports count against the session's budget. The HTTP client is the standard library's,
in the executor's threads: a request cannot be interrupted, so a cancelled step ends when its
request does (at most `LLM_TIMEOUT_S`) and its answer is discarded.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request

from planner_client import Executor, Fatal, Retryable, TaskContext, TaskMessage, TaskResult

DEFAULT_TARGETS = "summarize,analyze,translate,generate,extract,llm"


def messages_for(task: TaskMessage) -> list[dict[str, str]]:
    """The chat messages of one processing step."""
    # The executor fills the context in before a handler runs (from the dispatch or the claim).
    context = task.context
    system = ((context and context.system_prompt)
              or "You carry out one step of a larger plan. Answer with the result only.")
    parts = [f"The request: {context.request if context else ''}"]
    if context and context.summary:
        parts.append(f"Earlier in the conversation: {context.summary}")
    for earlier in task.inputs:
        parts.append(f"Result of step {earlier.task_id}:\n{earlier.output}")
    parts.append(f"Your step ({task.target}): {task.description}")
    if task.answer:
        parts.append(f"The user answered your question: {task.answer}")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def chat(
    base_url: str, model: str, api_key: str, timeout: float, messages: list[dict[str, str]]
) -> TaskResult:
    """One chat-completions request."""
    body = json.dumps({"model": model, "messages": messages}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{base_url.rstrip('/')}/chat/completions", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read(500).decode("utf-8", errors="replace")
        if error.code == 429 or error.code >= 500:
            raise Retryable(f"HTTP {error.code} from the LLM: {detail}") from error
        raise Fatal(f"HTTP {error.code} from the LLM: {detail}") from error
    except (urllib.error.URLError, TimeoutError) as error:
        raise Retryable(f"the LLM did not answer: {error}") from error
    try:
        output = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as error:
        raise Retryable(f"unexpected reply from the LLM: {str(reply)[:300]}") from error
    tokens = (reply.get("usage") or {}).get("total_tokens")
    return TaskResult(output=output or "", tokens_used=tokens if isinstance(tokens, int) else None)


def build() -> Executor | None:
    base_url = os.environ.get("LLM_BASE_URL", "")
    if not base_url:
        return None
    model = os.environ.get("LLM_MODEL", "llama3.1")
    api_key = os.environ.get(os.environ.get("LLM_API_KEY_ENV", "OPENAI_API_KEY"), "")
    timeout = float(os.environ.get("LLM_TIMEOUT_S", "60"))
    executor = Executor(concurrency=int(os.environ.get("LLM_CONCURRENCY", "4")))

    def step(task: TaskMessage, ctx: TaskContext) -> TaskResult:
        ctx.raise_if_cancelled()
        return chat(base_url, model, api_key, timeout, messages_for(task))

    for target in filter(None, os.environ.get("LLM_TARGETS", DEFAULT_TARGETS).split(",")):
        executor.processing(target.strip())(step)
    return executor


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    executor = build()
    if executor is None:
        print("llm_executor: LLM_BASE_URL is not set, so there is no endpoint to call; "
              "set it (and LLM_MODEL) to serve processing steps", file=sys.stderr)
        return 2
    executor.run(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
