"""A session's events: the log in `PLANNER_EVENTS`, read live or replayed.

Each stream message is the batch of events one command caused: a JSON array of
`{"v": <schema version>, "event": {...}}`, with the session's version after the batch in the
`Planner-Version` header. They are read with an ordered consumer (ephemeral, in order, no
acks), which replays from the start and then follows live.

Events are parsed leniently on purpose: an event type these models do not know (a planner newer
than this client) is still yielded, with its raw `data` and no typed `event`, instead of
breaking the iteration of every UI on the day the daemon is upgraded.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from pydantic import BaseModel, ValidationError

from .errors import CorruptLog
from .models.event import Event
from .subjects import Subjects

log = logging.getLogger(__name__)

TERMINAL_TYPES = frozenset({"plan_completed", "plan_failed", "plan_cancelled"})
"""Event types that end a plan (a follow-up request can start the session again)."""

PLAN_START = "request_received"
"""The event type that starts a plan: a session's first request or a follow-up."""


def _variants(union_model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Maps each `type` tag of a generated tagged union to its model class."""
    annotation = union_model.model_fields["root"].annotation
    variants = {}
    for cls in typing.get_args(annotation):
        (tag,) = typing.get_args(cls.model_fields["type"].annotation)
        variants[tag] = cls
    return variants


EVENT_TYPES: dict[str, type[BaseModel]] = _variants(Event)
"""Every event type the generated models know, by its `type` tag."""


@dataclass(frozen=True)
class SessionEvent:
    """One event of a session's log."""

    type: str
    """The event's `type` tag, e.g. `task_status_updated` or `plan_completed`."""
    data: dict[str, Any]
    """The event as sent."""
    event: Any | None
    """The typed model (`models.event.EventPlanCompleted`, ...), or None for an unknown type."""
    schema_version: int | None = None
    """The envelope's `v` (None for events in a command reply, which have no envelope)."""
    session_version: int | None = None
    """The session's version after the batch this event came in."""

    @property
    def ends_plan(self) -> bool:
        """Whether this event ends the plan: completed, failed or cancelled."""
        return self.type in TERMINAL_TYPES


def parse_event(
    data: dict[str, Any], *, schema_version: int | None = None, session_version: int | None = None
) -> SessionEvent:
    """Builds a `SessionEvent`, typed when the models know the event's type."""
    kind = str(data.get("type", ""))
    model = EVENT_TYPES.get(kind)
    typed = None
    if model is not None:
        try:
            typed = model.model_validate(data)
        except ValidationError as error:
            log.warning("event %s does not match its model; yielded untyped: %s", kind, error)
    return SessionEvent(kind, data, typed, schema_version, session_version)


def parse_batch(payload: bytes, headers: dict[str, str] | None, *, session: str = "?",
                sequence: int | None = None) -> list[SessionEvent]:
    """The events of one stream message; `CorruptLog` (naming `session` and the message's
    `sequence`) when it is not a batch of event envelopes."""
    version = None
    if headers and "Planner-Version" in headers:
        try:
            version = int(headers["Planner-Version"])
        except ValueError:
            pass
    try:
        envelopes = json.loads(payload)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
        raise CorruptLog(session, sequence, f"not JSON ({error})") from error
    if not isinstance(envelopes, list) or not all(isinstance(e, dict) for e in envelopes):
        raise CorruptLog(session, sequence, "not an array of event envelopes")
    events = []
    for envelope in envelopes:
        event = envelope.get("event", {})
        if not isinstance(event, dict):
            raise CorruptLog(session, sequence, "an envelope whose event is not an object")
        events.append(parse_event(event, schema_version=envelope.get("v"),
                                  session_version=version))
    return events


async def watch(
    js: JetStreamContext, subjects: Subjects, session: str, *, from_start: bool = True
) -> AsyncGenerator[SessionEvent, None]:
    """Yields the session's events, from the start (or from now), then live, for ever.

    Break out of the loop to stop; the consumer is ephemeral and goes when the iteration is
    closed (use `contextlib.aclosing` to close it at once rather than at garbage collection).
    """
    sub = await js.subscribe(
        subjects.events(session),
        stream=subjects.events_stream,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=None)
            batch = parse_batch(msg.data, msg.headers, session=session,
                                sequence=msg.metadata.sequence.stream)
            for event in batch:
                yield event
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection may be closed already
            pass


async def until_end(js: JetStreamContext, subjects: Subjects, session: str) -> SessionEvent:
    """The event that ends the session's current plan: at once if it has ended, else the next
    one that does.

    Reads the log's last message first. When that batch ends the plan (or starts one), nothing
    before it matters, and only what follows is read: a replay from the start carries every
    result the session ever had, and two hundred sessions with ~1 MB logs waited on at once left
    a quarter of them unseen for two minutes (`scripts/owner_kill.py`), though every log ended
    with `plan_completed`. Only a last batch that neither starts nor ends a plan (a summary
    rewritten after the end, say) sends it back to the start of the log.
    """
    try:
        last = await js.get_last_msg(subjects.events_stream, subjects.events(session))
    except nats.js.errors.NotFoundError:
        last = None
    known = last.seq if last is not None and last.seq is not None else 0
    start = known + 1
    if last is not None and last.data is not None:
        for event in reversed(parse_batch(last.data, last.headers, session=session,
                                          sequence=last.seq)):
            if event.ends_plan:
                return event
            if event.type == PLAN_START:
                break
        else:
            start = 1
    ended: SessionEvent | None = None
    sub = await js.subscribe(
        subjects.events(session), stream=subjects.events_stream, ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=None)
            seq = msg.metadata.sequence.stream
            if seq < start:
                # An ordered consumer that restarts before its first message starts over from
                # the log's beginning: an earlier plan's end is not this one's.
                continue
            for event in parse_batch(msg.data, msg.headers, session=session, sequence=seq):
                if event.ends_plan:
                    ended = event
                elif event.type == PLAN_START:
                    ended = None
            if ended is not None and seq >= known:
                return ended
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection may be closed already
            pass


async def history(js: JetStreamContext, subjects: Subjects, session: str) -> list[SessionEvent]:
    """The session's events up to now (an empty list for a session that has none)."""
    try:
        last = await js.get_last_msg(subjects.events_stream, subjects.events(session))
    except nats.js.errors.NotFoundError:
        return []
    events: list[SessionEvent] = []
    sub = await js.subscribe(
        subjects.events(session), stream=subjects.events_stream, ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=None)
            events.extend(parse_batch(msg.data, msg.headers, session=session,
                                      sequence=msg.metadata.sequence.stream))
            if last.seq is None or msg.metadata.sequence.stream >= last.seq:
                return events
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001
            pass
