#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, then lint and type-check.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pytest "$@"
.venv/bin/ruff check zion tests bench
.venv/bin/mypy
