#!/usr/bin/env bash
# The test command: fresh-machine setup, lint, format check, the whole suite (~10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
