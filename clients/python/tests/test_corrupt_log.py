"""A session whose event log holds a batch that is not one (written by something else, or
damaged): reading its events raises `CorruptLog` naming the session and the batch, rather than
a bare JSON error or a skipped batch."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from nats.aio.client import Client as NatsClient

from planner_client import Client, CorruptLog


@pytest.mark.parametrize("garbage", [b"\xff not json", b'{"an": "object"}', b'[1, 2]',
                                     b'[{"v": 1, "event": "a string"}]'],
                         ids=["not-json", "not-an-array", "not-envelopes", "event-not-object"])
async def test_every_reader_names_the_session_and_the_batch(
    nc: NatsClient, client: Client, session: str, garbage: bytes
) -> None:
    ack = await nc.jetstream().publish(f"planner.events.{session}", garbage)

    with pytest.raises(CorruptLog) as history:
        await client.history(session)
    with pytest.raises(CorruptLog) as waited:
        await client.wait_for_end(session, timeout=10)

    async def first_event() -> None:
        async with contextlib.aclosing(client.watch(session)) as events:
            async for _ in events:
                pass

    with pytest.raises(CorruptLog) as watched:
        await asyncio.wait_for(first_event(), timeout=10)
    for raised in (history.value, waited.value, watched.value):
        assert raised.session == session
        assert raised.sequence == ack.seq
        assert session in str(raised) and str(ack.seq) in str(raised)
