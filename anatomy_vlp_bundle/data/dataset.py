"""Datasets and batching for contract datalists.

- :func:`vlp_collate` batches tensors with MONAI's collate and keeps text and per-anatomy lists
  (``sentences``, ``report``, ``id``, ...) as plain Python lists, which MONAI's collate cannot stack.
- :class:`SkippingDataset` turns a case that fails to load into a reported skip instead of a
  crash (the data contract: "a case that still fails to load during training is skipped and
  listed with its reason, and more than 1% such cases stops the run").
- :func:`build_dataset` makes a MONAI ``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` for
  one split of a datalist.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset, list_data_collate

from .datalist import load_datalist
from .readers import unwrap_transform_error

__all__ = ["vlp_collate", "SkippingDataset", "FailureKeepingCacheDataset", "TooManyBadCases", "build_dataset", "LIST_KEYS"]

logger = logging.getLogger(__name__)

#: Record fields that stay Python lists in a batch (one entry per sample).
LIST_KEYS = (
    "id",
    "patient",
    "report",
    "sentences",
    "anatomy_sentences",
    "findings_raw",
    "study_findings_raw",
    "anatomy_boxes_world",
)


def vlp_collate(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Collate samples into a batch.

    Tensors (``image`` (B, 1, *S), ``anatomy`` (B, M, *S), ``anatomy_presence`` (B, M), ...) are
    stacked with MONAI's ``list_data_collate`` (MetaTensor metadata kept); fields in
    :data:`LIST_KEYS` and any non-tensor field MONAI cannot stack (dicts, ragged lists) become a
    list with one entry per sample. ``None`` samples (cases skipped by :class:`SkippingDataset`)
    are dropped; a batch of only skipped cases collates to an empty dict.
    """
    samples = [s for s in batch if s is not None]
    if not samples:
        return {}
    keys = list(samples[0].keys())
    kept: dict[str, list[Any]] = {}
    stackable = []
    for key in keys:
        values = [s.get(key) for s in samples]
        if key in LIST_KEYS or not all(isinstance(v, (torch.Tensor, int, float)) for v in values):
            kept[key] = values
        else:
            stackable.append(key)
    out = list_data_collate([{k: s[k] for k in stackable} for s in samples]) if stackable else {}
    out.update(kept)
    return out


class TooManyBadCases(RuntimeError):
    """More than the allowed fraction of cases failed to load."""


class SkippingDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that a case failing to load is skipped (``None``), logged and listed.

    Args:
        dataset: the wrapped dataset (indexable, records available as ``dataset.data``).
        max_bad_fraction: once more than this fraction of the records has failed (counted against
            the dataset length, and only after at least one failure), :class:`TooManyBadCases` is
            raised naming the failures: a broken dataset stops the run instead of training on the rest.

    ``bad_cases`` lists ``(index, id, reason)`` of every skipped case (per worker process when
    the loader uses workers; the log carries every one).
    """

    def __init__(self, dataset: Any, max_bad_fraction: float = 0.01):
        self.dataset = dataset
        self.max_bad_fraction = float(max_bad_fraction)
        self.bad_cases: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.dataset)

    def _case_id(self, index: int) -> str:
        data = getattr(self.dataset, "data", None)
        try:
            return str(data[index].get("id", index))
        except Exception:
            return str(index)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except Exception as e:  # any loading/transform failure of one case
            cause = unwrap_transform_error(e)  # the reader's error names the file, MONAI's wrapper does not
            reason = f"{type(cause).__name__}: {cause}"
            case_id = self._case_id(index)
            with self._lock:
                self.bad_cases.append((index, case_id, reason))
                n_bad = len(self.bad_cases)
            logger.warning("skipping case %s (index %d): %s", case_id, index, reason)
            if n_bad > self.max_bad_fraction * max(len(self), 1):
                listing = "; ".join(f"{cid}: {r}" for _, cid, r in self.bad_cases[:10])
                raise TooManyBadCases(
                    f"{n_bad} of {len(self)} cases failed to load (more than {self.max_bad_fraction:.0%}): {listing}"
                ) from e
            return None


class _LoadFailure:
    """What :class:`FailureKeepingCacheDataset` caches for a case whose deterministic prefix failed."""

    def __init__(self, error: Exception):
        self.error = error


class FailureKeepingCacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` that keeps a case's loading failure instead of raising it while caching.

    ``CacheDataset`` runs the deterministic prefix of the chain for every cached case in its
    constructor, so one unloadable case (NaN voxels, a truncated file) would stop the run before
    :class:`SkippingDataset` could skip and list it. Here the failure is cached and raised again when
    that case is fetched, where :class:`SkippingDataset` reports it.
    """

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as e:
            return _LoadFailure(e)

    def _transform(self, index: int):
        if self._cache is not None and not self.hash_as_key and index % len(self) < self.cache_num:
            cached = self._cache[index % len(self)]
            if isinstance(cached, _LoadFailure):
                raise cached.error
        return super()._transform(index)


def build_dataset(
    datalist: str | Path,
    split: str,
    transform: Callable,
    cache: str = "none",
    cache_dir: str | Path | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    max_bad_fraction: float = 0.01,
    limit: int | None = None,
) -> SkippingDataset:
    """A dataset over one split of a contract datalist.

    Args:
        datalist: path of ``datalist.json`` (or its folder).
        split: ``training``, ``validation`` or ``test``.
        transform: the record -> tensors chain (``data.pipeline.build_transforms``).
        cache: ``"none"`` (``monai.data.Dataset``), ``"memory"`` (``CacheDataset``: the deterministic
            prefix of the chain cached in RAM) or ``"persistent"`` (``PersistentDataset`` in ``cache_dir``).
        limit: use only the first ``limit`` records (quick runs).
    """
    records = load_datalist(datalist).records(split)
    if limit is not None:
        records = records[: int(limit)]
    if not records:
        raise ValueError(f"{datalist}: split {split!r} has no records")
    if cache == "none":
        ds = Dataset(records, transform=transform)
    elif cache == "memory":
        ds = FailureKeepingCacheDataset(records, transform=transform, cache_rate=cache_rate,
                                        num_workers=num_workers or None, progress=False)
    elif cache == "persistent":
        if cache_dir is None:
            raise ValueError("cache='persistent' needs cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        ds = PersistentDataset(records, transform=transform, cache_dir=cache_dir)
    else:
        raise ValueError(f"cache must be 'none', 'memory' or 'persistent', got {cache!r}")
    return SkippingDataset(ds, max_bad_fraction=max_bad_fraction)
