"""The claim request: asked again with the same claim id when its reply is lost."""

from __future__ import annotations

import json

import nats
from nats.aio.msg import Msg

from planner_client import TaskMessage
from planner_client.lease import claim
from planner_client.models.lease_reply import LeaseReplyGranted
from planner_client.subjects import Subjects

TASK = {
    "session": "s-lost", "task_id": "t1", "attempt": 1, "kind": "tool_call", "target": "tool",
    "description": "do it", "attachments": [], "inputs": [],
    "context": {"profile": "general", "request": "do it"},
}


async def test_a_claim_whose_reply_is_lost_is_asked_again_with_the_same_id(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    asked: list[dict[str, object]] = []

    async def planner_losing_the_first_reply(msg: Msg) -> None:
        asked.append(json.loads(msg.data))
        if len(asked) > 1:
            lease = asked[-1]["claim_id"]
            await msg.respond(json.dumps({"status": "granted", "lease": lease}).encode())

    await nc.subscribe("planner.claim.s-lost", cb=planner_losing_the_first_reply)
    try:
        task = TaskMessage.model_validate(TASK)
        reply = await claim(nc, Subjects(), task, timeout=0.3)
    finally:
        await nc.close()
    assert len(asked) == 2, asked
    first, second = asked
    assert first == second, "the retry is the same claim"
    assert isinstance(first["claim_id"], str) and len(first["claim_id"]) >= 16
    assert isinstance(reply, LeaseReplyGranted) and reply.lease == first["claim_id"]
