#!/usr/bin/env bash
# The main job: set up, train the default tiny model on the embedded corpus (the Python stdlib source), then
# generate from it. Extra arguments go to `nanoseek train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
nanoseek train --out runs/tiny "$@"
nanoseek generate --model runs/tiny --prompt "def " --max-new-tokens 64
