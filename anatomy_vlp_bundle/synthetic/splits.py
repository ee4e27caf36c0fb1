"""Split sizes and patient assignment shared by the synthetic generators.

Both generators make the same promise: 180 / 40 / 100 training / validation / test cases for the
default 320 (scaled for other sizes), some patients with a second study, and no patient in two
splits. One implementation keeps that promise for both.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_N_CASES", "DEFAULT_SPLITS", "split_sizes", "plan_patients"]

DEFAULT_N_CASES = 320
#: Split sizes for DEFAULT_N_CASES; other sizes scale them.
DEFAULT_SPLITS = {"training": 180, "validation": 40, "test": 100}


def split_sizes(n_cases: int, n_test: int | None = None, n_val: int | None = None) -> dict[str, int]:
    """Cases per split: 180/40/100 for 320 cases, scaled for other sizes.

    At least one training case; one validation and one test case when ``n_cases >= 3``; explicit
    ``n_test`` / ``n_val`` win.
    """
    if int(n_cases) != n_cases or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got {n_cases!r}")
    n_cases = int(n_cases)
    if n_test is None:
        n_test = round(n_cases * DEFAULT_SPLITS["test"] / DEFAULT_N_CASES)
        n_test = max(n_test, 1) if n_cases >= 3 else 0
    if n_val is None:
        n_val = round(n_cases * DEFAULT_SPLITS["validation"] / DEFAULT_N_CASES)
        n_val = max(n_val, 1) if n_cases >= 3 else 0
    for name, v in (("n_test", n_test), ("n_val", n_val)):
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    n_test, n_val = int(n_test), int(n_val)
    if n_cases - n_test - n_val < 1:
        raise ValueError(f"n_test ({n_test}) + n_val ({n_val}) leave no training case out of n_cases={n_cases}")
    return {"training": n_cases - n_test - n_val, "validation": n_val, "test": n_test}


def plan_patients(
    n_cases: int,
    seed: int,
    stream: int,
    second_study_probability: float,
    n_test: int | None = None,
    n_val: int | None = None,
) -> list[tuple[int, int, str]]:
    """Which patient and split each case belongs to.

    Patients have one or two studies and never straddle splits; the patient groups of all splits
    are shuffled together, so case order does not reveal the split.

    Args:
        stream: a generator-specific constant so that CT and CXR plans are independent.
        second_study_probability: chance that a patient group has two studies.

    Returns:
        ``[(case_index, patient_index, split), ...]`` in case order.
    """
    sizes = split_sizes(n_cases, n_test, n_val)
    rng = np.random.default_rng([int(seed), int(stream), int(n_cases)])
    groups: list[tuple[str, int]] = []
    for split, count in sizes.items():
        left = count
        while left > 0:
            size = 2 if left >= 2 and rng.random() < second_study_probability else 1
            groups.append((split, size))
            left -= size
    plan = []
    for patient, gi in enumerate(rng.permutation(len(groups))):
        split, size = groups[gi]
        plan += [(len(plan) + k, patient, split) for k in range(size)]
    return plan
