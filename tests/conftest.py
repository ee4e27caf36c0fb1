import os
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
