#!/usr/bin/env bash
# Runs the Python client's tests against a real nats-server and the real daemon, in a virtualenv
# of its own (target/python-venv, never the user's Python), after `ruff check` and `mypy --strict`
# (configured in pyproject.toml). Extra arguments go to pytest.
#
#   PLANNER_SVC_BIN  the daemon (default: target/debug/planner-svc; built by `cargo build -p planner-svc`)
#   NATS_SERVER_BIN  nats-server 2.10 or newer (default: `nats-server` on PATH)
#   PYTHON           the interpreter that makes the venv (default: python3; 3.10 or newer)
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: $python is not Python 3.10 or newer; set PYTHON" >&2
  exit 1
fi

export PLANNER_SVC_BIN="${PLANNER_SVC_BIN:-$root/target/debug/planner-svc}"
if [ ! -x "$PLANNER_SVC_BIN" ]; then
  # The tests would all skip: say so loudly rather than pass without testing anything.
  echo "error: no daemon at $PLANNER_SVC_BIN; build it (cargo build -p planner-svc) or set PLANNER_SVC_BIN" >&2
  exit 1
fi

venv="$root/target/python-venv"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root/clients/python[test]"

# The static checks first, with the configuration in pyproject.toml (hence the cd): each fails
# the script on what it finds.
cd "$root/clients/python"
echo "ruff check" >&2
"$venv/bin/python" -m ruff check
echo "mypy --strict" >&2
"$venv/bin/python" -m mypy
cd "$root"

exec "$venv/bin/python" -m pytest "$root/clients/python/tests" "$@"
