#!/bin/sh
# Set up (system packages, .venv with test tools) and run lint, type checks and the tests.
# Arguments go to pytest, e.g. ./test.sh tests/unit -k store
set -eu
cd "$(dirname "$0")"
scripts/setup-system --test
scripts/setup-venv --test
.venv/bin/ruff check agent tests
.venv/bin/mypy
.venv/bin/vulture  # dead code: settings and whitelist in pyproject.toml [tool.vulture]
exec .venv/bin/python -m pytest "$@"
