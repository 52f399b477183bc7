#!/usr/bin/env bash
# The main job: set up, train the default tiny model on the embedded corpus (the Python stdlib source), then
# generate from it. Extra arguments go to `nanoseek train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# run again, it continues the first run's checkpoints (a finished run: nothing to train) rather than starting a
# second run in the same directory, which `nanoseek train` refuses
resume=""
if compgen -G "runs/tiny/checkpoints/step_*" >/dev/null; then resume="--resume"; fi
nanoseek train --out runs/tiny $resume "$@"
nanoseek generate --model runs/tiny --prompt "def " --max-new-tokens 64
