"""Data group: samples/s of the training chain per MONAI dataset kind, and the training loop's data wait.

- Samples/s: the config's training chain (``train#preprocessing``: load, orient, resample, crop to
  the body, window, random crop, augmentation, boxes, report parsing) over the first cases of the
  training split, through ``monai.data.Dataset`` (everything per sample), ``CacheDataset`` (the
  deterministic prefix cached in RAM) and ``PersistentDataset`` (cached on disk), each built by the
  bundle's ``data.dataset.build_dataset``; one pass over the cases per timed round, interleaved.
- Data wait: the training loader exactly as the config builds it (``FailureKeepingCacheDataset``
  with its ``cache_rate``, ``SkippingDataset``, ``DataLoader`` with its batch size, shuffling,
  ``num_workers`` and ``vlp_collate``) feeding the training step, in a process of its own
  (``probe`` ``train_loop``): the share of the loop's time spent blocked in ``next(loader)``. Its
  peak RSS with the whole training split cached is the training run's memory (the validation
  cache and the text model, when a sentence is not cached, come on top in a real run).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

from ..data.dataset import build_dataset
from .context import BenchContext
from .probe import run_probe
from .report import Section, Table, Target, fmt_bytes, fmt_percent, fmt_seconds, timing_cells
from .timing import interleaved

__all__ = ["run_data", "MAX_DATA_WAIT", "MAX_TRAINING_RSS"]

#: the issue's targets
MAX_DATA_WAIT = 0.10
MAX_TRAINING_RSS = 6e9
#: cases per dataset pass (quick / full)
CASES = {True: 2, False: 16}
#: training-loop probe: (warm-up steps, timed steps, cases) per mode; None = the whole training split
LOOP = {True: (1, 1, 8), False: (2, 8, None)}


def _one_pass(dataset: Any) -> None:
    for i in range(len(dataset)):
        dataset[i]


def run_data(ctx: BenchContext) -> Section:
    """Samples/s of the training chain per dataset kind, and the data-wait share of training steps."""
    cfg = ctx.cfg
    n = CASES[ctx.quick]
    transform = cfg.train_transforms(ctx.roi)
    datasets: dict[str, Any] = {}
    one_off: dict[str, float] = {}
    for label, cache in (("Dataset", "none"), ("CacheDataset", "memory"), ("PersistentDataset", "persistent")):
        start = time.perf_counter()
        datasets[label] = build_dataset(cfg.dataset_dir, "training", transform, cache=cache, cache_dir=ctx.tmp / "persistent",
                                        cache_rate=cfg.cache_rate, num_workers=cfg.num_workers, limit=n)
        if cache == "persistent":  # the first pass writes the disk cache
            _one_pass(datasets[label])
        one_off[label] = time.perf_counter() - start
    n = len(datasets["Dataset"])  # fewer when the split is smaller
    passes = {label: functools.partial(_one_pass, ds) for label, ds in datasets.items()}
    t = interleaved(passes, ctx.repeats, ctx.warmup)
    one_off_text = {"Dataset": "none", "CacheDataset": "filling the cache: {}", "PersistentDataset": "first pass, writing the cache: {}"}
    rows = [[label, f"{n / t[label].median:.1f}", *timing_cells(t[label]), one_off_text[label].format(fmt_seconds(one_off[label]))]
            for label in datasets]

    warmup, steps, cases = LOOP[ctx.quick]
    loop = run_probe(ctx.probe_spec("train_loop", size=ctx.roi, warmup=warmup, steps=steps, cases=cases))
    waits, step_times = loop["wait_seconds"], loop["step_seconds"]
    wait_share = sum(waits) / (sum(waits) + sum(step_times))
    loop_rows = [[
        str(loop["cases"]), fmt_seconds(loop["cache_seconds"]), str(len(waits)), fmt_seconds(statistics.median(waits)),
        fmt_seconds(statistics.median(step_times)), fmt_percent(wait_share), fmt_bytes(loop["rss_peak"]),
    ]]
    shape = " x ".join(map(str, ctx.roi))
    return Section(
        key="data",
        title="Data pipeline",
        method=(
            f"Training chain at {shape} (`train#preprocessing` with its report parser and augmentation) over the "
            f"first {n} training cases, one pass per timed round, datasets built by `data.dataset.build_dataset`. "
            "Then the training loop with the config's loader settings (batch "
            f"{cfg.batch_size}, num_workers {cfg.num_workers}, CacheDataset with cache_rate {cfg.cache_rate}) and the "
            f"full training step, in a fresh process: {warmup} warm-up step(s), then the time blocked in "
            "`next(loader)` against the whole loop's time."
        ),
        tables=[
            Table(["dataset", "samples/s", "pass median", "pass min - max", "one-off cost"], rows),
            Table(["cases cached", "cache fill", "timed steps", "median data wait", "median step", "data wait share",
                   "peak RSS"], loop_rows, caption="Training loop (the config's loader):"),
        ],
        targets=[
            Target("data wait share of the training step time", f"< {fmt_percent(MAX_DATA_WAIT)}", fmt_percent(wait_share),
                   wait_share < MAX_DATA_WAIT),
            Target("peak RSS of the default CT training run (training loop, whole training split cached)",
                   f"< {fmt_bytes(MAX_TRAINING_RSS)}", f"{fmt_bytes(loop['rss_peak'])} ({loop['cases']} cases cached)",
                   loop["rss_peak"] < MAX_TRAINING_RSS),
        ],
        values={"cases": n, "timings": t, "one_off_seconds": one_off, "train_loop": loop, "wait_share": wait_share},
    )
