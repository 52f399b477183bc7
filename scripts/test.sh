#!/usr/bin/env bash
# The test command: fresh-machine setup, lint, format check, the whole suite (~4 min on 2 cores with the install; kept under 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q -n 2 "$@"  # two workers (pytest-xdist): the suite is CPU-bound, CI has 2 cores
