"""What every measurement group gets: the configuration, the run's settings and shared inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .workloads import BenchConfig, WarmCacheEncoder, pipeline_batch

__all__ = ["BenchContext", "QUICK_PATCHES", "QUICK_BATCH"]

#: quick runs use inputs of this many patches per axis (32^3 voxels for patch 8), in batches of at most
QUICK_PATCHES = 4
QUICK_BATCH = 2


@dataclass
class BenchContext:
    """Settings and shared inputs of one bench run.

    Args:
        cfg: the training configuration (``workloads.load_bench_config``).
        quick: tiny sizes and few repeats (checks the instrument, not the targets).
        repeats: timed rounds per comparison.
        warmup: untimed rounds before them.
        checkpoint: the trained model file of the inference group.
        tmp: scratch folder of this run (removed afterwards).
        plots_dir: where the plots go.
    """

    cfg: BenchConfig
    quick: bool
    repeats: int
    warmup: int
    checkpoint: Path
    tmp: Path
    plots_dir: Path
    encoder: WarmCacheEncoder = field(init=False)
    _batches: dict[tuple, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    _batch_files: dict[tuple, Path] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.encoder = WarmCacheEncoder(int(self.cfg.network["embed_dim"]), self.cfg.seed)

    @property
    def patch_size(self) -> list[int]:
        patch = self.cfg.network["patch_size"]
        return [int(patch)] * self.cfg.catalog.spatial_dims if isinstance(patch, int) else [int(p) for p in patch]

    @property
    def roi(self) -> list[int]:
        """The input size of the step comparisons: the config's ``roi_size`` (quick: 4 patches per axis)."""
        if self.quick:
            return [QUICK_PATCHES * p for p in self.patch_size]
        return list(self.cfg.roi_size)

    @property
    def batch_size(self) -> int:
        """The batch of the step comparisons: the config's ``batch_size`` (quick: at most 2)."""
        return min(QUICK_BATCH, self.cfg.batch_size) if self.quick else self.cfg.batch_size

    def tokens(self, size: Sequence[int]) -> int:
        """Patch tokens of an input of ``size``."""
        n = 1
        for s, p in zip(size, self.patch_size):
            n *= int(s) // p
        return n

    def batch(self, size: Sequence[int], batch_size: int) -> dict[str, Any]:
        """A batch of real cases at ``size`` (``workloads.pipeline_batch``), built once per run."""
        key = (tuple(int(s) for s in size), int(batch_size))
        if key not in self._batches:
            self._batches[key] = pipeline_batch(self.cfg, key[0], key[1])
        return self._batches[key]

    def batch_file(self, size: Sequence[int], batch_size: int) -> Path:
        """:meth:`batch` saved for a probe process (``torch.save``)."""
        key = (tuple(int(s) for s in size), int(batch_size))
        if key not in self._batch_files:
            path = self.tmp / f"batch_{'x'.join(map(str, key[0]))}_b{key[1]}.pt"
            torch.save(self.batch(*key), path)
            self._batch_files[key] = path
        return self._batch_files[key]

    def probe_spec(self, probe: str, **fields: Any) -> dict[str, Any]:
        """A ``probe.run_probe`` spec with this run's config and dataset (absolute paths) and the config's
        allocator setting (``cpu_allocator``; a field of the same name overrides it)."""
        return {
            "probe": probe,
            "config_file": str(Path(self.cfg.config_file).resolve()),
            "dataset_dir": str(Path(self.cfg.dataset_dir).resolve()),
            "cpu_allocator": self.cfg.cpu_allocator,
            **fields,
        }
