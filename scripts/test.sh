#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, then lint and type-check.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Three pytest processes, each given whole modules in collection order (a
# module's servers and fixtures start once; tests/deploy's Debian root and
# image build, on a new machine, early): the suite mostly waits on servers,
# timeouts and sockets, so on two CPUs it takes under half the time of one
# process. ZION_TEST_PROCESSES=0 runs it in this one process.
.venv/bin/python -m pytest -n "${ZION_TEST_PROCESSES:-3}" --dist loadfile --no-loadscope-reorder "$@"
.venv/bin/ruff check zion tests bench
.venv/bin/mypy
