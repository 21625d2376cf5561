#!/usr/bin/env bash
# Create .venv and install mimoflash with everything the tests need. Idempotent; fast when already installed.
# torch is installed first and explicitly: a bare `torch` requirement in a fresh environment can pull a multi-GB
# CUDA build, while torch==2.13.0 installs the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# The server's browser test drives Debian's chromium through chromedriver (tests/test_serve_browser.py). Installed from
# the distribution's packages only, once; skipped quietly where apt is unavailable or we are not root.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null) || echo "setup: could not install chromium (the browser test will skip)"
  else
    echo "setup: chromium not installed and apt-get unavailable or not root (the browser test will skip)"
  fi
fi
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -vE "^(WARNING: Location|  )" || true
.venv/bin/python -c "import mimoflash, torch, transformers; print(f'mimoflash {mimoflash.__version__} ready (torch {torch.__version__}, transformers {transformers.__version__})')"
