#!/usr/bin/env python3
"""Regenerates `planner_client.models` from the JSON Schemas in `docs/schemas/`.

The schemas are generated from the Rust wire types (and kept equal to them by a Rust test); the
Python models are generated from the schemas here, and `tests/test_models.py` regenerates them
into a temporary directory and fails if the checked-in files differ. So a change of the Rust
types reaches Python only through this script, and cannot be forgotten.

    python clients/python/scripts/generate_models.py            # rewrite the package's models
    python clients/python/scripts/generate_models.py --output D # write them to D instead

It needs the `test` extra (`datamodel-code-generator`, pinned: another version writes other
code). The generated files are never edited by hand.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PYTHON_ROOT = Path(__file__).resolve().parent.parent
REPO_ROOT = PYTHON_ROOT.parent.parent
SCHEMAS = REPO_ROOT / "docs" / "schemas"
MODELS = PYTHON_ROOT / "src" / "planner_client" / "models"

# Every option is spelled out so that the output depends on the schemas and the pinned
# generator only. Why each one:
OPTIONS = [
    "--input-file-type", "jsonschema",
    "--output-model-type", "pydantic_v2.BaseModel",
    # An immutable preset: a later default of the generator cannot change the output.
    "--preset", "standard-py310-20261027",
    "--target-python-version", "3.10",
    # Variants of tagged unions are named after their tag (LeaseReplyGranted, EventPlanCompleted)
    # rather than numbered (LeaseReply1), so code that uses them reads as the protocol does.
    "--use-tag-as-union-variant-name",
    # TaskId, NodeKind, ... become plain `str` and `Literal` fields instead of wrapper models.
    "--collapse-root-models",
    "--enum-field-as-literal", "all",
    # The Rust doc comments become docstrings.
    "--use-schema-description",
    "--use-field-description",
    "--use-double-quotes",
    "--disable-timestamp",
    # The built-in formatter: the output does not depend on the installed black or isort.
    "--formatters", "builtin",
]


def generate(output: Path, schemas: Path = SCHEMAS) -> None:
    """Writes one module per schema (and an `__init__.py`) into `output`, which must not exist."""
    command = [
        sys.executable,
        # The schemas' `uint32`/`uint64` formats are not known to the generator, which warns
        # about each and uses `int` with `ge=0`: what we want, so the warnings are noise.
        "-W", "ignore::UserWarning",
        "-m", "datamodel_code_generator",
        "--input", str(schemas),
        "--output", str(output),
        *OPTIONS,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"datamodel-codegen failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help=f"where to write (default: {MODELS})")
    args = parser.parse_args()
    if args.output is not None:
        generate(args.output)
        print(f"models written to {args.output}")
        return 0
    # Generate beside the package first so that a failure leaves the checked-in models alone.
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "models"
        generate(fresh)
        if MODELS.exists():
            shutil.rmtree(MODELS)
        shutil.copytree(fresh, MODELS)
    print(f"models written to {MODELS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
