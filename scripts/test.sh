#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
# pytest's exit code is passed through, so "no tests collected" (5) fails like any other failure.
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}   # see mimoflash/cli.py: spinning OpenMP barriers stall on busy CPUs
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
