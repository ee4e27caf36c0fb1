"""Memory group: peak resident memory of a training step, with and without gradient checkpointing.

Each configuration runs in a fresh process (``probe.run_probes``, two at a time: nothing is timed
here, and a process's peak RSS is its own whatever runs beside it): the peak RSS after building the
model and loading the batch, the peak after one training step, and their difference, the step's
own memory (activations kept for backward, gradients, AdamW state, allocator slack, one-time
buffers of the first step).

The activation memory itself is measured exactly, in process: :func:`saved_activation_bytes`
counts the distinct storages autograd keeps for backward during one training step (every tensor
packed by ``torch.autograd.graph.saved_tensors_hooks``, plus the inputs a checkpointed region
keeps for its recomputation; parameters excluded). Gradient checkpointing
(``network_def#gradient_checkpointing``) recomputes the conv stem's, the transformer blocks' and
the mask head's activations in backward; the region statistics, pooling, prior and losses keep
theirs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .context import BenchContext
from .probe import run_probes
from .report import Section, Table, Target, fmt_bytes, fmt_percent
from .workloads import build_model, make_step

__all__ = ["run_memory", "saved_activation_bytes", "MIN_CHECKPOINT_SAVING"]

#: the issue's target: gradient checkpointing cuts the step's activation memory by at least this fraction
MIN_CHECKPOINT_SAVING = 0.4

LABELS = {"full": "full model (training iteration)", "backbone": "backbone alone"}

#: modules that call ``torch.utils.checkpoint.checkpoint`` by that name (their regions' inputs are counted)
_CHECKPOINT_CALLERS = ("anatomy_vlp_bundle.networks.anatomy_vit", "anatomy_vlp_bundle.networks.vlp_model")


@contextmanager
def _count_checkpoint_inputs(record: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Within the block, the bundle's ``checkpoint`` calls report their tensor arguments to ``record``
    (a non-reentrant checkpoint keeps them by reference, outside autograd's saved tensors)."""
    import importlib

    modules = [importlib.import_module(name) for name in _CHECKPOINT_CALLERS]
    originals = [m.checkpoint for m in modules]

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            for a in args:
                if isinstance(a, torch.Tensor):
                    record(a)
            return original(fn, *args, **kwargs)
        return checkpoint

    for m, original in zip(modules, originals):
        m.checkpoint = counting(original)
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.checkpoint = original


def saved_activation_bytes(step: Callable[[], Any], parameters: Any) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``step()`` (one training
    step): tensors saved by autograd's operations and the inputs of checkpointed regions, minus the
    storages of ``parameters`` (weights are saved by reference, they are not activations)."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    kept: dict[int, int] = {}

    def record(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and storage.nbytes() > 0:
            kept[ptr] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        record(t)
        return t

    with _count_checkpoint_inputs(record), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(kept.values())


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
    batch = ctx.batch(ctx.roi, ctx.batch_size)
    kept: dict[str, dict[bool, int]] = {}
    for workload in results:
        for ckpt in (False, True):
            step = make_step(cfg, workload, batch, ctx.encoder, gradient_checkpointing=ckpt)
            step()  # the first step creates the optimizer state and fits nothing twice
            kept.setdefault(workload, {})[ckpt] = saved_activation_bytes(step, step.params)
    act_rows, act_saving = [], {}
    for workload, pair in kept.items():
        act_saving[workload] = 1.0 - pair[True] / pair[False] if pair[False] > 0 else 0.0
        for ckpt, value in pair.items():
            act_rows.append([LABELS[workload], "on" if ckpt else "off", fmt_bytes(value), fmt_percent(act_saving[workload]) if ckpt else ""])
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
        tables=[
            Table(["step", "gradient checkpointing", "activations kept for backward", "saved by checkpointing"], act_rows,
                  caption="Activation memory, exact (in this process, the second step of each configuration): the distinct "
                          "storages autograd keeps for backward (`saved_tensors_hooks`) plus the inputs checkpointed "
                          "regions keep for their recomputation, parameters excluded."),
            Table(["step", "gradient checkpointing", "RSS after build", "peak RSS after step", "step memory",
                   "saved by checkpointing"], rows,
                  caption="The whole step's memory, as the process sees it (fresh process per row, first step: also "
                          "gradients, optimizer state, one-time buffers and the transient peak of backward, where a "
                          "checkpointed region's recomputed maps and their gradients coexist):"),
        ],
        targets=[Target("gradient checkpointing cuts the full model's step activation memory (kept for backward)",
                        f">= {fmt_percent(MIN_CHECKPOINT_SAVING)}", f"{fmt_percent(act_saving['full'])} (peak RSS of the step: "
                        f"{fmt_percent(saving['full'])})", act_saving["full"] >= MIN_CHECKPOINT_SAVING)],
        values={"probes": {w: {str(k): v for k, v in pair.items()} for w, pair in results.items()}, "saving": saving,
                "activation_bytes": {w: {str(k): v for k, v in pair.items()} for w, pair in kept.items()},
                "activation_saving": act_saving, "param_bytes": param_bytes},
    )
