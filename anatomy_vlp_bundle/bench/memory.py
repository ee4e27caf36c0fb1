"""Memory group: peak resident memory of a training step, with and without gradient checkpointing.

Each configuration runs in a fresh process (``probe.run_probes``, two at a time: nothing is timed
here, and a process's peak RSS is its own whatever runs beside it): the peak RSS after building the
model and loading the batch, the peak after one training step, and their difference, the step's
own memory (activations kept for backward, gradients, AdamW state, allocator slack). Gradient
checkpointing (``network_def#gradient_checkpointing``) recomputes the transformer blocks'
activations in backward; the conv stem, heads and losses keep theirs.
"""

from __future__ import annotations

from .context import BenchContext
from .probe import run_probes
from .report import Section, Table, Target, fmt_bytes, fmt_percent
from .workloads import build_model

__all__ = ["run_memory", "MIN_CHECKPOINT_SAVING"]

#: the issue's target: gradient checkpointing cuts the step's memory by at least this fraction
MIN_CHECKPOINT_SAVING = 0.4

LABELS = {"full": "full model (training iteration)", "backbone": "backbone alone"}


def run_memory(ctx: BenchContext) -> Section:
    """Step memory of the full model (and, in a full run, the backbone alone), checkpointing off / on."""
    cfg = ctx.cfg
    batch_file = str(ctx.batch_file(ctx.roi, ctx.batch_size))
    configs = [(workload, ckpt) for workload in (("full",) if ctx.quick else ("full", "backbone")) for ckpt in (False, True)]
    probes = run_probes([ctx.probe_spec("step", batch_file=batch_file, workload=workload, overrides={"gradient_checkpointing": ckpt})
                         for workload, ckpt in configs])
    results: dict[str, dict[bool, dict]] = {}
    for (workload, ckpt), probe in zip(configs, probes):
        results.setdefault(workload, {})[ckpt] = probe
    rows, saving = [], {}
    for workload, pair in results.items():
        off = pair[False]["step_bytes"]
        saving[workload] = 1.0 - pair[True]["step_bytes"] / off if off > 0 else 0.0
        for ckpt, r in pair.items():
            rows.append([LABELS[workload], "on" if ckpt else "off", fmt_bytes(r["rss_built"]), fmt_bytes(r["rss_peak"]),
                         fmt_bytes(r["step_bytes"]), fmt_percent(saving[workload]) if ckpt else ""])
    param_bytes = sum(p.numel() * p.element_size() for p in build_model(cfg, ctx.encoder, img_size=ctx.roi).parameters())
    shape = " x ".join(map(str, ctx.roi))
    return Section(
        key="memory",
        title="Memory of a training step",
        method=(
            f"One training step (batch {ctx.batch_size} of {shape}, as in the first section) in a fresh process per "
            "row: peak RSS (`ru_maxrss`) after building the model and loading the batch, after the step, and the "
            "difference (the step's memory: activations kept for backward, gradients, AdamW state, allocator "
            f"slack). The model's parameters take {fmt_bytes(param_bytes)}; gradients and AdamW's two moments add "
            "about three times that to the first step. Gradient checkpointing recomputes the conv stem, the "
            "transformer blocks and the mask head in backward (the mask head's recomputed maps and their gradients "
            "still coexist there); the losses keep their activations. The peak RSS of "
            "a whole training run is measured in the data group (training loop)."
        ),
        tables=[Table(["step", "gradient checkpointing", "RSS after build", "peak RSS after step", "step memory",
                       "saved by checkpointing"], rows)],
        targets=[Target("gradient checkpointing cuts the full model's step memory", f">= {fmt_percent(MIN_CHECKPOINT_SAVING)}",
                        fmt_percent(saving["full"]), saving["full"] >= MIN_CHECKPOINT_SAVING)],
        values={"probes": {w: {str(k): v for k, v in pair.items()} for w, pair in results.items()}, "saving": saving,
                "param_bytes": param_bytes},
    )
