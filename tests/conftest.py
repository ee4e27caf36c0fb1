import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ANATOMY_VLP_SHARED", REPO.parent / "shared"))
REAL = SHARED / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The read-only real scans in ``../shared/data/real`` (skips when the folder is absent)."""
    if not REAL.is_dir():
        pytest.skip(f"real test data not found at {REAL} (set ANATOMY_VLP_SHARED)")
    return REAL


@pytest.fixture(scope="session")
def load_script():
    """``load_script(name)``: ``scripts/<name>.py`` imported as a module (in ``sys.modules``, which
    dataclasses need, until the session ends)."""
    loaded = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
