"""Measurements that need a process of their own: peak resident memory, and the training loop.

Peak resident memory (``ru_maxrss``) only ever grows within a process, so every configuration is
measured in a fresh one: :func:`run_probe` starts ``python -m anatomy_vlp_bundle.bench.probe SPEC``
(``SPEC`` a JSON object) through :func:`run_child` and reads the JSON line it prints last. Probes:

- ``step``: load a batch the caller saved (``batch_file``), build a workload
  (``workloads.make_step``), run one training step; reports ``rss_built`` (peak RSS after building
  model and batch), ``rss_peak`` (after the step), ``step_bytes = rss_peak - rss_built``
  (activations, gradients and optimizer state of the step) and the step's wall time.
- ``steps``: as ``step``, then ``warmup`` untimed and ``repeats`` timed steps; reports each step's
  wall time and, per step, the user and kernel CPU time and the minor page faults (the glibc
  allocator comparison of the model group).
- ``train_loop``: the training loader of the config (``FailureKeepingCacheDataset`` with its
  ``cache_rate``, ``SkippingDataset``, ``DataLoader`` with its batch size, shuffling,
  ``num_workers`` and ``vlp_collate``) feeding the training step; reports the time to fill the
  cache, per step the time blocked in ``next(loader)`` and the step time, and the peak RSS.

:func:`run_child` runs any command through a small launcher process (``_LAUNCHER``) and returns
its wall time and its own peak RSS, e.g. the ``infer`` command of the inference group. Without the
launcher a child's ``ru_maxrss`` would start at the bench process's peak (Linux carries it over
fork and exec); a probe's own ``ru_maxrss`` is clean for the same reason.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ChildRun", "run_child", "run_probe", "run_probes", "peak_rss_bytes", "main"]


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: wall time, its own peak RSS (bytes), exit code and output."""

    seconds: float
    max_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ``ru_maxrss`` in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


#: ``python -c _LAUNCHER RESULT_FILE ARGS...``: runs ARGS in a child of its own and writes its wall time, peak
#: RSS (``os.wait4``: that child's alone) and exit code to RESULT_FILE. A small process in between because
#: Linux carries the parent's peak RSS over fork and exec into the child's ``ru_maxrss``, and the bench
#: process is large: a child of the launcher starts from the launcher's few MB.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": seconds, "max_rss_bytes": usage.ru_maxrss * 1024, "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


def run_child(args: Sequence[str]) -> ChildRun:
    """Run ``args`` to completion in a fresh process: its wall time, its own peak RSS, exit code and output."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "child.json"
        with open(Path(tmp) / "out", "w+") as out, open(Path(tmp) / "err", "w+") as err:
            launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, str(result), *args], stdout=out, stderr=err)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if launcher.returncode != 0 or not result.is_file():
            raise RuntimeError(f"run_child: the launcher failed (exit {launcher.returncode}): {stderr[-2000:]}")
        child = json.loads(result.read_text())
    return ChildRun(float(child["seconds"]), int(child["max_rss_bytes"]), int(child["returncode"]), stdout, stderr)


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one probe (see the module docstring) in a fresh interpreter and return its result dict.

    Raises:
        RuntimeError: when the probe fails (its stderr is included).
    """
    run = run_child([sys.executable, "-m", "anatomy_vlp_bundle.bench.probe", json.dumps(spec)])
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"bench probe {spec.get('probe')} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_probes(specs: Sequence[dict[str, Any]], workers: int = 2) -> list[dict[str, Any]]:
    """:func:`run_probe` for several specs, ``workers`` processes at a time (for memory only: their
    timings would disturb each other), results in the order of ``specs``."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        return list(pool.map(run_probe, specs))


def _spec_step(spec: dict[str, Any]) -> Any:
    """The training step a ``step`` / ``steps`` spec names (``workloads.make_step``) on the parent's batch."""
    import torch

    from .workloads import WarmCacheEncoder, load_bench_config, make_step

    cfg = load_bench_config(spec["config_file"], spec["dataset_dir"])
    encoder = WarmCacheEncoder(int(cfg.network["embed_dim"]), cfg.seed)
    # the parent's batch (``torch.save``): loading cases here would leave their transient peak in ru_maxrss
    batch = torch.load(spec["batch_file"], weights_only=False)
    return make_step(cfg, spec["workload"], batch, encoder, **dict(spec.get("overrides") or {}))


def _step_probe(spec: dict[str, Any]) -> dict[str, Any]:
    step = _spec_step(spec)
    built = peak_rss_bytes()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"rss_built": built, "rss_peak": peak, "step_bytes": peak - built, "step_seconds": seconds}


def _steps_probe(spec: dict[str, Any]) -> dict[str, Any]:
    from ..runtime import allocator_state

    step = _spec_step(spec)
    for _ in range(int(spec.get("warmup", 1))):
        step()
    seconds: list[float] = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(max(1, int(spec.get("repeats", 3)))):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = len(seconds)
    return {"allocator": allocator_state(), "step_seconds": seconds, "user_seconds": (after.ru_utime - usage.ru_utime) / n,
            "system_seconds": (after.ru_stime - usage.ru_stime) / n,
            "minor_faults": (after.ru_minflt - usage.ru_minflt) / n, "rss_peak": peak_rss_bytes()}


def _train_loop_probe(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from ..data.datalist import load_datalist
    from ..data.dataset import FailureKeepingCacheDataset, SkippingDataset, vlp_collate
    from .workloads import TrainingStep, WarmCacheEncoder, build_model, load_bench_config

    cfg = load_bench_config(spec["config_file"], spec["dataset_dir"])
    roi = [int(v) for v in spec["size"]]
    records = load_datalist(cfg.dataset_dir).records("training")
    if spec.get("cases"):
        records = records[: int(spec["cases"])]
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    dataset = FailureKeepingCacheDataset(records, transform=cfg.train_transforms(roi), cache_rate=cfg.cache_rate,
                                         num_workers=cfg.num_workers, progress=False)
    cache_seconds = time.perf_counter() - start
    loader = DataLoader(SkippingDataset(dataset), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.num_workers, collate_fn=vlp_collate)
    warmup = int(spec["warmup"])
    steps = min(int(spec["steps"]), len(loader) - warmup)
    if steps < 1:
        raise ValueError(f"train_loop probe: {len(records)} cases give {len(loader)} batches, fewer than {warmup} warm-up + 1")
    encoder = WarmCacheEncoder(int(cfg.network["embed_dim"]), cfg.seed)
    step = TrainingStep(cfg, build_model(cfg, encoder, img_size=roi), encoder)
    waits: list[float] = []
    step_seconds: list[float] = []
    batches = iter(loader)
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        step.run(batch)
        done = time.perf_counter()
        if i >= warmup:
            waits.append(fetched - start)
            step_seconds.append(done - fetched)
    return {"cases": len(records), "cache_seconds": cache_seconds, "wait_seconds": waits, "step_seconds": step_seconds,
            "rss_peak": peak_rss_bytes()}


PROBES = {"step": _step_probe, "steps": _steps_probe, "train_loop": _train_loop_probe}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m anatomy_vlp_bundle.bench.probe '<JSON spec>'``: run the probe, print its JSON result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        raise SystemExit("usage: python -m anatomy_vlp_bundle.bench.probe '<JSON spec>'")
    spec = json.loads(argv[0])
    if spec.get("probe") not in PROBES:
        raise SystemExit(f"unknown probe {spec.get('probe')!r}; one of {sorted(PROBES)}")
    from ..runtime import tune_cpu_allocator

    # the allocator of the run measured: the config's (``BenchContext.probe_spec``), or the spec's own
    tune_cpu_allocator(bool(spec.get("cpu_allocator", True)))
    print(json.dumps(PROBES[spec["probe"]](spec)))


if __name__ == "__main__":
    main()
