#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the main job: a generation with the model shipped in the package,
# printing the text and the speed. Extra arguments go to `mimoflash generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- "def fibonacci(n):" --max-tokens 96; fi
exec .venv/bin/mimoflash generate "$@"
