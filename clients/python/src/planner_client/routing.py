"""Addressing the instance that owns a session (docs/protocol.md, "Addressing the owner").

With several planner instances, each session has an owner, and a dispatch names it in its
`Planner-Owner` header. An attempt's claim, heartbeats and direct report sent to the usual
subjects reach any instance, which forwards them to the owner: one more hop for half or more of
them. Sent to `<prefix>.fwd.<owner>.<usual subject>`, they reach the owner at once.

When nobody listens there (the owner died), a request goes to the usual subject at once; when
the owner does not answer in time, to the usual subject too (claims, heartbeats and reports are
safe to repeat), and the executor stops addressing owners for `ADDRESSING_PAUSE` seconds: an
executor user whose NATS permissions lack `<prefix>.fwd.*.…` would otherwise wait out every
request twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from .pause import Pause
from .subjects import Subjects, is_valid_token

log = logging.getLogger(__name__)

OWNER_HEADER = "Planner-Owner"
"""The header of a dispatch naming the instance that owns its session."""

ADDRESSING_PAUSE = 60.0
"""Seconds an executor sends to the usual subjects only, after an owner did not answer in time."""


def owner(headers: Mapping[str, str] | None) -> str | None:
    """The owner a dispatch's headers name (the name in any case), if it is a valid one."""
    for name, value in (headers or {}).items():
        if name.lower() == OWNER_HEADER.lower() and is_valid_token(value):
            return value
    return None


class Addressing(Pause):
    """Whether an executor addresses owners now (see the module doc)."""

    def __init__(self, pause: float = ADDRESSING_PAUSE) -> None:
        super().__init__(pause)


@dataclass(frozen=True)
class Route:
    """Where one attempt's requests go: `owner` (from its dispatch) while `addressing` is on."""

    owner: str | None = None
    addressing: Addressing | None = None


USUAL = Route()
"""The usual subjects only: no owner addressed."""


async def request(
    nc: NatsClient,
    subjects: Subjects,
    route: Route,
    subject: str,
    body: bytes,
    *,
    timeout: float,
    headers: dict[str, str] | None,
) -> Msg:
    """`nc.request` on `subject`, asking the owner first when `route` names one.

    Raises what `nc.request` raises for the usual subject.
    """
    if route.owner is not None and route.addressing is not None and route.addressing.on():
        addressed = subjects.addressed(route.owner, subject)
        try:
            return await nc.request(addressed, body, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            pass  # the owner is gone: whoever serves the usual subject answers
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            route.addressing.timed_out()
            log.warning("the session's owner %s did not answer on %s in %.1fs; sending to the "
                        "usual subjects for %.0fs (may this executor publish to %s.fwd.*?)",
                        route.owner, addressed, timeout, route.addressing.pause, subjects.prefix)
    return await nc.request(subject, body, timeout=timeout, headers=headers)
