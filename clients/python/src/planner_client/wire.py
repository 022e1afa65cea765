"""JSON in and out of the generated models, the one way every module does it.

Outgoing messages drop unset optional fields (`exclude_none`): the planner treats a missing
field and a null alike where both are allowed, and the messages stay as small and as readable as
docs/protocol.md's examples. Incoming messages are validated by the generated models, so a
reply the models cannot read is an error here rather than a KeyError later.

The W3C trace context travels in a NATS header, `traceparent` (docs/protocol.md, "Trace
context"): read from a dispatch, carried on the executor's reports, and on its claims and
heartbeats when the trace is sampled (`sampled`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, RootModel

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def encode(message: BaseModel) -> bytes:
    """The JSON of a generated model (a RootModel is encoded as its root)."""
    return message.model_dump_json(exclude_none=True, by_alias=True).encode()


def decode(model: type[M], payload: bytes) -> M:
    """Parses and validates `payload` as `model`; raises pydantic's ValidationError."""
    return model.model_validate_json(payload)


def decode_root(model: type[RootModel[T]], payload: bytes) -> T:
    """Parses a tagged union (a generated RootModel) and returns the variant it holds."""
    return model.model_validate_json(payload).root


def loads(payload: bytes) -> Any:
    """Plain JSON, for what is read before its type is known."""
    return json.loads(payload)


TRACEPARENT = "traceparent"
"""The NATS header carrying a W3C Trace Context `traceparent`."""


def traceparent(headers: Mapping[str, str] | None) -> str | None:
    """The `traceparent` among a message's headers, if it has one (the name in any case)."""
    for name, value in (headers or {}).items():
        if name.lower() == TRACEPARENT and value:
            return value
    return None


def trace_headers(trace: str | None) -> dict[str, str] | None:
    """Headers carrying `trace` as the `traceparent`; None without one (no headers at all)."""
    return {TRACEPARENT: trace} if trace else None


def sampled(trace: str | None) -> bool:
    """Whether `trace` is a version-00 `traceparent` whose sampled flag (bit 0) is set.

    Claims and heartbeats carry the trace only then: they decide no work, and the planner files
    one without a trace under its session's latest, which has the same trace id.
    """
    if not trace:
        return False
    parts = trace.strip().split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[3]) != 2:
        return False
    try:
        return int(parts[3], 16) & 1 == 1
    except ValueError:
        return False
