"""The bench: ``python -m anatomy_vlp_bundle bench [--quick]`` measures the bundle's performance and
writes ``docs/BENCHMARKS.md`` with plots in ``docs/bench/``.

Groups (``--only model,data``), each a function ``run_<group>(BenchContext) -> report.Section``:

- ``model`` (:mod:`.model`): the full model's training step against MONAI's ``ViT`` of equal
  backbone, the backbone alone in fp32 and bf16 autocast, the model without conv stem / prior;
- ``attention`` (:mod:`.model`): SDPA against the explicit matmul-softmax path;
- ``mfu`` (:mod:`.model`): FLOPs utilisation of training steps against the measured matmul peak;
- ``memory`` (:mod:`.memory`): peak RSS of a step with and without gradient checkpointing;
- ``scaling`` (:mod:`.model`): step time and memory against the input size, power-law fits;
- ``data`` (:mod:`.data`): samples/s per MONAI dataset kind, data-wait share of training steps;
- ``text`` (:mod:`.text`): text encoding with a cold and a warm embedding cache;
- ``inference`` (:mod:`.inference`): eager / TorchScript / torch.export latency, CT file to JSON.

Measurement rules (:mod:`.timing`): warm-up rounds, then the median of timed rounds with the
spread; a baseline is timed in the same process, interleaved with what it is compared to. Peak
memory is measured in a fresh process per configuration (:mod:`.probe`).
"""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

__all__ = ["bench_command", "GROUPS"]

#: group name -> "module:function", run in this order
GROUPS = {
    "model": "model:run_model",
    "attention": "model:run_attention",
    "mfu": "model:run_mfu",
    "memory": "memory:run_memory",
    "scaling": "model:run_scaling",
    "data": "data:run_data",
    "text": "text:run_text",
    "inference": "inference:run_inference",
}
#: (repeats, warm-up rounds) when not given: full run, quick run
DEFAULT_ROUNDS = {False: (10, 2), True: (2, 1)}


def _runner(group: str) -> Callable:
    import importlib

    module, function = GROUPS[group].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def bench_command(
    quick: bool = False,
    out: str = "docs/BENCHMARKS.md",
    plots_dir: str = "docs/bench",
    only: str = "",
    repeats: Optional[int] = None,
    warmup: Optional[int] = None,
    config_file: str = "configs/train.yaml",
    dataset_dir: str = "data/synthetic_ct",
    checkpoint: str = "models/model.pt",
) -> None:
    """Measure and write the benchmark report: ``python -m anatomy_vlp_bundle bench [--quick]``.

    Run from the bundle root (the default paths are relative to it), on an otherwise idle machine.
    Every figure is measured in this run; each section of the report says how.

    Args:
        quick: tiny inputs and 1-2 repeats (a minute or two): checks the instrument end to end; its
            figures judge no target.
        out: the Markdown report.
        plots_dir: folder of the plots (``step_times.png``, ``scaling.png``) and ``results.json``.
        only: comma-separated groups to run (default all): model, attention, mfu, memory, scaling,
            data, text, inference.
        repeats: timed rounds per comparison (default 10; quick 2).
        warmup: untimed rounds before them (default 2; quick 1).
        config_file: the training config whose model, batch, optimizer and loader are measured.
        dataset_dir: the dataset (its ``datalist.json`` and cases) the batches come from.
        checkpoint: the trained model of the inference group.

    Raises:
        SystemExit: code 1 when a group failed (the report is still written, naming the error).
    """
    from .context import BenchContext
    from .machine import busy_warning, load_average, machine_facts
    from .report import Section, Table, write_report, write_results
    from .workloads import load_bench_config

    if isinstance(only, (list, tuple)):  # fire parses "a,b" as a tuple
        only = ",".join(only)
    groups = [g.strip() for g in str(only).split(",") if g.strip()] or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"bench: unknown group(s) {unknown}; choose from {list(GROUPS)}")
    groups = [g for g in GROUPS if g in groups]
    for path, what in ((config_file, "config_file"), (Path(dataset_dir) / "datalist.json", "dataset_dir")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"bench: {what} {path} not found (run from the bundle root, or pass --{what})")
    if "inference" in groups and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"bench: checkpoint {checkpoint} not found (train first, pass --checkpoint, or leave out 'inference')")
    default_repeats, default_warmup = DEFAULT_ROUNDS[bool(quick)]
    repeats = default_repeats if repeats is None else int(repeats)
    warmup = default_warmup if warmup is None else int(warmup)

    from ..runtime import allocator_state, tune_cpu_allocator

    bench_config = load_bench_config(config_file, dataset_dir)
    tune_cpu_allocator(bench_config.cpu_allocator)  # as training does (configs: cpu_allocator)
    facts = machine_facts()
    state = allocator_state()
    facts["glibc allocator (anatomy_vlp_bundle/runtime.py)"] = (
        f"mmap threshold {state['mmap_threshold']} B, trim threshold {state['trim_threshold']} B"
        if state["applied"] else f"left as it is ({state['reason']})")
    settings = {
        "command": "python -m anatomy_vlp_bundle bench" + (" --quick" if quick else "") + (f" --only {','.join(groups)}" if only else ""),
        "quick": bool(quick),
        "repeats": repeats,
        "warmup": warmup,
        "groups": groups,
        "busy": busy_warning(),
    }
    if settings["busy"]:
        print(f"warning: {settings['busy']}", flush=True)
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="anatomy_vlp_bench_") as tmp:
        ctx = BenchContext(bench_config, bool(quick), repeats, warmup, Path(checkpoint), Path(tmp), plots)
        for group in groups:
            print(f"[bench] {group} ...", flush=True)
            start = time.perf_counter()
            try:
                section = _runner(group)(ctx)
            except Exception as e:  # noqa: BLE001 - one failed group must not lose the others' measurements
                traceback.print_exc()
                section = Section(key=group, title=group, method="", error=f"{type(e).__name__}: {e}")
            section.seconds = time.perf_counter() - start
            print(f"[bench] {group} done in {section.seconds:.1f} s", flush=True)
            sections.append(section)
    if quick:  # tiny inputs: the figures check the instrument, they cannot judge the targets
        for section in sections:
            for target in section.targets:
                target.reached = None
    facts["load average at end (1 / 5 / 15 min)"] = load_average()
    facts["bench wall time"] = f"{time.perf_counter() - started:.0f} s"
    report = write_report(out, facts, sections, settings)
    write_results(plots / "results.json", facts, sections, settings)
    targets = [[t.name, t.goal, t.measured, t.status] for s in sections for t in s.targets]
    if targets:
        print(Table(["target", "goal", "measured", "status"], targets).markdown())
    print(f"benchmarks written to {report} (plots and results.json in {plots})")
    failed = [s.key for s in sections if s.error]
    if failed:
        print(f"error: group(s) {failed} failed (see the report)")
        raise SystemExit(1)
