#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install the bundle into it.
#   bash scripts/setup.sh          # runtime + test dependencies
# torch is pinned to 2.13.0 here (the CPU build available to these machines); the package itself
# only asks for a range, so GPU users install the torch build they need first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]"
.venv/bin/python -c "import torch, monai, anatomy_vlp_bundle; print('environment ready: torch', torch.__version__, '| monai', monai.__version__, '| anatomy_vlp_bundle', anatomy_vlp_bundle.__version__)"
