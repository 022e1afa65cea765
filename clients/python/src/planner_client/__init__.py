"""Python executors, clients and UIs for the planner daemon, which speaks JSON over NATS.

The wire contract is the repository's docs/protocol.md; the message types are generated from
its JSON Schemas (docs/schemas/) into `planner_client.models` and never edited by hand.

# Layout

- `executor`: `Executor`, handlers registered per target, a pool member with a concurrency
  limit and graceful shutdown.
- `attempt`: one dispatch's life: claim, ack, run while heartbeating, report; stops.
- `handlers`: what a handler is, how it is called (event loop or thread), and how its ending
  becomes a report.
- `context`: `TaskContext` (the lease and the stop signal a handler sees) and `TaskResult`.
- `lease`: the claim and heartbeat requests.
- `reporting`: report messages, sent to the planner directly, else published through
  JetStream until acknowledged.
- `routing`: the attempt's requests sent to the planner instance that owns its session.
- `pause`: a way of sending left alone for a while after it went unanswered.
- `client`: `Client`: submit, answer, cancel, watch, questions.
- `commands`: one command's request and reply.
- `events`: a session's event log, live or replayed, parsed leniently.
- `ui`: questions for humans as they arrive.
- `errors`: `Retryable`, `Fatal`, `NeedsClarification`, `Cancelled`, `PlannerError`.
- `subjects`: every subject and stream name, under one prefix.
- `wire`: JSON to and from the generated models; the `traceparent` header.
- `models`: generated; see `scripts/generate_models.py`.
"""

from .client import Client
from .commands import CommandResult
from .context import TaskContext, TaskResult
from .errors import (
    Cancelled,
    CorruptLog,
    Fatal,
    NeedsClarification,
    PlannerError,
    Retryable,
    TaskFailure,
)
from .events import SessionEvent
from .executor import Executor
from .models.task_message import TaskMessage
from .subjects import Subjects
from .ui import Question

__all__ = [
    "Cancelled",
    "Client",
    "CommandResult",
    "CorruptLog",
    "Executor",
    "Fatal",
    "NeedsClarification",
    "PlannerError",
    "Question",
    "Retryable",
    "SessionEvent",
    "Subjects",
    "TaskContext",
    "TaskFailure",
    "TaskMessage",
    "TaskResult",
]
