#!/bin/sh
# Set up (system packages, .venv) and run the agent. With no arguments it runs on its
# embedded defaults: the test-pattern camera, a SQLite store in ~/.local/state, and a
# quick-start viewer token printed below. Arguments go to `therelay-agent run`.
set -eu
cd "$(dirname "$0")"
scripts/setup-system
scripts/setup-venv
exec .venv/bin/therelay-agent run "$@"
