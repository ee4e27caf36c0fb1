#!/usr/bin/env bash
# Build (or check) .venv-deploy: the environment of the MONAI Deploy app (anatomy_vlp_bundle/apps/deploy).
#   bash scripts/deploy_env.sh          # build once (about 3 minutes, 4 GB); later runs only check it
#   bash scripts/deploy_env.sh --test   # ... then run tests/deploy in that environment
# Kept apart from .venv because MONAI Deploy App SDK 4 needs pydicom>=3 and highdicom while other
# apps (MONAI Label) need pydicom<3. torch is pinned to 2.13.0 with a pip constraint file, so no
# dependency (the bundle's own "torch>=2.4,<3" range included) can make pip fetch another torch build.
# holoscan-cli<=4.2.0 provides the `monai-deploy package` command (later releases dropped it).
# Variables: PYTHON (interpreter for the venv, default python3.11), DEPLOY_VENV (default .venv-deploy).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${DEPLOY_VENV:-$ROOT/.venv-deploy}"
PY="${PYTHON:-python3.11}"
RUN_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --test) RUN_TESTS=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "deploy_env.sh: unknown argument '$arg' (use --test or --help)" >&2; exit 2 ;;
  esac
done

TORCH_VERSION=2.13.0
MONAI_VERSION=1.6.1
SDK_VERSION=4.0.0
HOLOSCAN_CLI="holoscan-cli<=4.2.0"
start=$(date +%s)

check() {
  # exit 0 when the venv holds the pinned versions and every app import works
  "$VENV/bin/python" - "$TORCH_VERSION" "$MONAI_VERSION" "$SDK_VERSION" <<'EOF'
import sys
from importlib.metadata import version

torch_v, monai_v, sdk_v = sys.argv[1:4]
import highdicom, holoscan, monai, pydicom, pytest, torch  # noqa: E401,F401
import monai.deploy.core  # noqa: F401
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator  # noqa: F401
import anatomy_vlp_bundle
from anatomy_vlp_bundle.apps.deploy import AnatomyVLPDeployApp  # noqa: F401

problems = []
if torch.__version__.split("+")[0] != torch_v:
    problems.append(f"torch {torch.__version__} (want {torch_v})")
if monai.__version__ != monai_v:
    problems.append(f"monai {monai.__version__} (want {monai_v})")
if version("monai-deploy-app-sdk") != sdk_v:
    problems.append(f"monai-deploy-app-sdk {version('monai-deploy-app-sdk')} (want {sdk_v})")
if tuple(int(v) for v in version("holoscan-cli").split(".")[:2]) > (4, 2):
    problems.append(f"holoscan-cli {version('holoscan-cli')} (want <=4.2.0 for `monai-deploy package`)")
if int(pydicom.__version__.split(".")[0]) < 3:
    problems.append(f"pydicom {pydicom.__version__} (want >=3)")
if problems:
    sys.exit("wrong versions: " + ", ".join(problems))
print(f"deploy environment ready: torch {torch.__version__} | monai {monai.__version__} | "
      f"monai-deploy-app-sdk {version('monai-deploy-app-sdk')} | highdicom {highdicom.__version__} | "
      f"pydicom {pydicom.__version__} | holoscan {holoscan.__version__} | anatomy_vlp_bundle {anatomy_vlp_bundle.__version__}")
EOF
}

if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
  echo "[deploy_env] $VENV already built (checked in $(( $(date +%s) - start )) s)"
else
  if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PY" >/dev/null 2>&1 || { echo "deploy_env.sh: $PY not found (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
    echo "[deploy_env] creating $VENV with $PY"
    "$PY" -m venv "$VENV"
  fi
  # the constraint file lives inside the venv (not in the repository)
  printf 'torch==%s\n' "$TORCH_VERSION" > "$VENV/constraints.txt"
  pip_install() {
    # pip's notes about unreachable extra index folders of this machine are dropped; errors stay
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$VENV/constraints.txt" "$@" 2>&1 \
      | { grep -v "is neither a file nor a directory" || true; }
  }
  pip_install --upgrade "pip>25.1"  # holoscan-cli 4.2 requires it; python3.11's venv brings pip 23
  echo "[deploy_env] installing torch==$TORCH_VERSION, monai==$MONAI_VERSION, monai-deploy-app-sdk==$SDK_VERSION, $HOLOSCAN_CLI, highdicom, the bundle"
  pip_install "torch==$TORCH_VERSION" "monai==$MONAI_VERSION" "monai-deploy-app-sdk==$SDK_VERSION" "$HOLOSCAN_CLI" \
    "pydicom>=3" "highdicom" -e "$ROOT[test]"
  check
  echo "[deploy_env] built in $(( $(date +%s) - start )) s"
fi

if [ "$RUN_TESTS" = 1 ]; then
  t0=$(date +%s)
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VENV/bin/python" -m pytest -q tests/deploy
  echo "[deploy_env] tests/deploy ran in $(( $(date +%s) - t0 )) s"
fi
