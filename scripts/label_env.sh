#!/usr/bin/env bash
# Build (or update) the MONAI Label environment in .venv-label and install the bundle into it.
#   bash scripts/label_env.sh           # build / update the environment
#   bash scripts/label_env.sh --test    # ... then run tests/label in it
#
# MONAI Label 0.8.5 does not install beside the main environment's CPU torch 2.13 (its `sam2` sdist
# builds against a torch it fetches itself, and PyPI torchvision 0.28 fails beside torch 2.13), so it
# gets its own environment, following the recipe checked in ../shared/ANCHORS.md: torch 2.14.1 +
# torchvision 0.29.1 (runs on CPU), monai 1.6.1, monailabel 0.8.5, pydicom/pynetdicom/dicomweb-client
# below their next majors. A pip constraint file pins torch and torchvision for every pip call,
# including the isolated build of `sam2` (PIP_CONSTRAINT reaches pip's build subprocesses, `-c` does
# not), so pip never resolves another torch (a multi-GB download).
# Safe to re-run: an existing environment is updated in place (pip skips what is satisfied).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${LABEL_VENV:-$ROOT/.venv-label}"
PY="${PYTHON:-python3.11}"
RUN_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --test) RUN_TESTS=1 ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "label_env.sh: unknown argument $arg (use --test)" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY" >/dev/null 2>&1 || { echo "label_env.sh: $PY not found (set PYTHON=...)" >&2; exit 1; }
  "$PY" -m venv "$VENV"
fi
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -c "$CONSTRAINTS")
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1 monai==1.6.1 monailabel==0.8.5 "pydicom<3" "pynetdicom<3" "dicomweb-client<0.60"
# the bundle (editable) and the test runner; not the bundle's [test] extra: its jsonschema>=4 conflicts
# with monailabel's pydicom-seg (jsonschema<4)
"${PIP[@]}" -e "$ROOT" pytest pytest-timeout
"$VENV/bin/python" - <<'EOF'
import monai, monailabel, torch, torchvision, anatomy_vlp_bundle
from monailabel.interfaces.app import MONAILabelApp  # noqa: F401 - the app's base class imports
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
print(f"label environment ready: torch {torch.__version__} | torchvision {torchvision.__version__} | monai {monai.__version__}"
      f" | monailabel {monailabel.__version__} | anatomy_vlp_bundle {anatomy_vlp_bundle.__version__}")
EOF
echo "label_env.sh: environment $VENV ready in $(( $(date +%s) - start )) s"

if [ "$RUN_TESTS" = 1 ]; then
  tstart=$(date +%s)
  status=0
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VENV/bin/python" -m pytest -q tests/label || status=$?
  echo "label_env.sh: tests/label finished in $(( $(date +%s) - tstart )) s (exit $status)"
  exit "$status"
fi
