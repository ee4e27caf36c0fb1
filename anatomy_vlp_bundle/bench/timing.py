"""Measurement primitives: interleaved timing, ratios, power-law fits and FLOP counts.

Every timed figure of the bench comes from :func:`interleaved`: all variants of a comparison are
warmed up, then timed in rounds (A, B, C, then C, B, A, ...), so that a change of machine load
during the run hits every variant alike and none always runs first. A :class:`Timing` keeps every
sample; the report shows the median and the spread (min-max).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Timing", "interleaved", "ratio", "fit_power_law", "count_flops", "utilisation"]


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples (seconds) of one variant."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("Timing needs at least one sample")

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def low(self) -> float:
        return float(min(self.samples))

    @property
    def high(self) -> float:
        return float(max(self.samples))

    @property
    def spread(self) -> float:
        """``(max - min) / median``: 0.1 means the samples span 10% of the median."""
        return (self.high - self.low) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, float | list[float]]:
        return {"median": self.median, "min": self.low, "max": self.high, "samples": list(self.samples)}


def interleaved(workloads: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several workloads side by side.

    Each workload runs ``warmup`` times untimed, then ``repeats`` timed rounds follow; a round runs
    every workload once, in the given order on even rounds and reversed on odd ones (A, B, B, A, ...).

    Args:
        workloads: name -> zero-argument callable (one training step, one forward, ...).
        repeats: timed rounds (>= 1).
        warmup: untimed rounds before them.

    Returns:
        name -> :class:`Timing` with ``repeats`` samples.
    """
    if repeats < 1:
        raise ValueError(f"interleaved: repeats must be >= 1, got {repeats}")
    names = list(workloads)
    for _ in range(max(0, int(warmup))):
        for name in names:
            workloads[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(int(repeats)):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            workloads[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def ratio(value: Timing | float, baseline: Timing | float) -> float:
    """``value / baseline`` of two medians (or plain numbers): 1.2 = 20% slower than the baseline."""
    v = value.median if isinstance(value, Timing) else float(value)
    b = baseline.median if isinstance(baseline, Timing) else float(baseline)
    return v / b if b > 0 else math.inf


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of ``y = c * x**a`` on log-log axes.

    Returns:
        ``(a, c)``: the growth exponent and the coefficient.
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"fit_power_law: needs two or more (x, y) pairs, got {len(x)} x and {len(y)} y")
    if min(x) <= 0 or min(y) <= 0:
        raise ValueError("fit_power_law: x and y must be positive (log-log fit)")
    exponent, log_c = np.polyfit(np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64)), 1)
    return float(exponent), float(math.exp(log_c))


def count_flops(workload: Callable[[], object]) -> int:
    """FLOPs of one call of ``workload`` as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    The counter covers matmuls, convolutions and attention (forward and backward), the operations
    "model FLOPs" refer to; element-wise work, norms and the optimizer update are not counted.
    """
    with FlopCounterMode(display=False) as counter:
        workload()
    return int(counter.get_total_flops())


def utilisation(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved ``flops / seconds`` as a fraction of ``peak_flops_per_s``."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"utilisation: seconds and peak must be positive, got {seconds}, {peak_flops_per_s}")
    return flops / seconds / peak_flops_per_s
