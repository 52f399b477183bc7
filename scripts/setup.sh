#!/usr/bin/env bash
# Creates .venv and installs nanoseek with its test extra. torch is pinned first to the CPU build that
# installs quickly from local disk here; an unpinned torch could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e '.[test]'
