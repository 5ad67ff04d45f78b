#!/usr/bin/env bash
# The test command: sets up a fresh machine, lints, then runs the whole test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck disable=SC1091
. scripts/setup.sh
echo "== ruff check (pyproject.toml [tool.ruff])"
python -m ruff check --no-cache .
python -m pytest -q -n auto "$@"
