#!/usr/bin/env bash
# Creates .venv and installs nanoseek with its test extra. torch is pinned and installed first. A plain
# `pip install torch` gets the CPU build only where pip's config points at a local wheelhouse of CPU wheels
# (find-links, as on this project's machines); from PyPI on Linux it is the multi-GB CUDA build. Set
# NANOSEEK_TORCH_INDEX=https://download.pytorch.org/whl/cpu to take torch from that index instead (unset: pip's
# own configuration, so offline runs never wait on a network index).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0 ${NANOSEEK_TORCH_INDEX:+--index-url "$NANOSEEK_TORCH_INDEX"}
pip install -q --disable-pip-version-check -e '.[test]'
