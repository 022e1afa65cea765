"""The generated models stay equal to docs/schemas/ (and so to the Rust types) and read
the protocol's examples."""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from planner_client.models.cancel_message import CancelMessage
from planner_client.models.claim_request import ClaimRequest
from planner_client.models.command import ClientCommand
from planner_client.models.command_reply import CommandReply
from planner_client.models.error_notice import ErrorNotice
from planner_client.models.event import Event
from planner_client.models.executor_report import ReportMessage
from planner_client.models.heartbeat_request import HeartbeatRequest
from planner_client.models.lease_reply import LeaseReply
from planner_client.models.offer_reply import OfferReply
from planner_client.models.question_message import QuestionMessage
from planner_client.models.report_reply import ReportReply
from planner_client.models.task_message import TaskMessage

PYTHON_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PYTHON_ROOT.parents[1]
MODELS = PYTHON_ROOT / "src" / "planner_client" / "models"
SCRIPT = PYTHON_ROOT / "scripts" / "generate_models.py"
REGENERATE = "python clients/python/scripts/generate_models.py"


def test_models_match_the_schemas(tmp_path: Path) -> None:
    if importlib.util.find_spec("datamodel_code_generator") is None:
        pytest.skip("needs datamodel-code-generator: pip install -e 'clients/python[test]'")
    fresh = tmp_path / "models"
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(fresh)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    checked_in = {p.name for p in MODELS.glob("*.py")}
    generated = {p.name for p in fresh.glob("*.py")}
    problems = []
    for name in sorted(checked_in - generated):
        problems.append(f"{name}: checked in, but no schema generates it any more")
    for name in sorted(generated - checked_in):
        problems.append(f"{name}: generated from a schema, but not checked in")
    for name in sorted(checked_in & generated):
        old = (MODELS / name).read_text().splitlines(keepends=True)
        new = (fresh / name).read_text().splitlines(keepends=True)
        if old != new:
            diff = "".join(difflib.unified_diff(old, new, f"checked-in/{name}", f"generated/{name}"))
            lines = diff.splitlines()
            more = f"\n... ({len(lines) - 40} more lines)" if len(lines) > 40 else ""
            shown = "\n".join(lines[:40]) + more
            problems.append(f"{name} differs:\n{shown}")
    assert not problems, (
        "planner_client/models is out of date with docs/schemas/ (the Rust wire types changed?).\n"
        f"Regenerate with `{REGENERATE}` and commit the result; never edit the models by hand.\n\n"
        + "\n\n".join(problems)
    )


# docs/protocol.md marks each JSON example with the type it must decode as (`json <type>`); the
# Rust tests check them against the Rust types, this one against the generated Python models.
EXAMPLE_MODELS: dict[str, type[BaseModel]] = {
    "command": ClientCommand,
    "reply": CommandReply,
    "task": TaskMessage,
    "claim": ClaimRequest,
    "heartbeat": HeartbeatRequest,
    "lease_reply": LeaseReply,
    "offer_reply": OfferReply,
    "report": ReportMessage,
    "report_reply": ReportReply,
    "notice": ErrorNotice,
    "question": QuestionMessage,
    "cancel": CancelMessage,
}

# Operator requests (`planner-svc quarantined`): the Python client has no models for them; the
# Rust test checks these examples.
OPERATOR_ONLY = {"quarantine_request", "quarantine_reply"}


def protocol_examples() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "docs" / "protocol.md").read_text()
    return re.findall(r"```json (\w+)\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize(("kind", "body"), protocol_examples())
def test_protocol_examples_decode(kind: str, body: str) -> None:
    value: Any = json.loads(body)
    if kind == "batch":
        for envelope in value:
            assert set(envelope) == {"v", "event"}
            Event.model_validate(envelope["event"])
        return
    if kind in OPERATOR_ONLY:
        return
    model = EXAMPLE_MODELS.get(kind)
    assert model is not None, f"docs/protocol.md has a `json {kind}` example this test does not map"
    parsed = model.model_validate(value)
    # What the models write back is what the example says (fields left out stay out).
    assert json.loads(parsed.model_dump_json(exclude_unset=True)) == value


def test_protocol_has_examples() -> None:
    kinds = {kind for kind, _ in protocol_examples()}
    assert kinds >= set(EXAMPLE_MODELS) | {"batch"}
