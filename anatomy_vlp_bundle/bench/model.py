"""Model groups: training-step times and ratios, attention paths, FLOPs utilisation, scaling.

- ``model``: the full model's training step against MONAI's ``ViT`` of the same width, depth,
  heads and patch size on the same batch, with the backbone alone (fp32 and bf16 autocast) and the
  full model without conv stem / without normality prior, all interleaved.
- ``attention``: ``AnatomyViT(attention="sdpa")`` against ``attention="math"`` (explicit
  matmul-softmax), one block and the backbone's whole step.
- ``mfu``: FLOPs of a step (``FlopCounterMode``) over its time, against the measured matmul peak,
  at the default width and at width 384.
- ``scaling``: the full step's time and memory against the input size, with power-law fits.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..networks.anatomy_vit import AnatomyTransformerBlock, masks_to_token_mask, query_attention_mask
from .context import BenchContext
from .machine import bf16_supported, matmul_peak
from .probe import run_probe
from .report import Section, Table, Target, bar_chart, fmt_bytes, fmt_percent, fmt_ratio, fmt_seconds, scaling_chart, timing_cells
from .timing import Timing, count_flops, fit_power_law, interleaved, ratio, utilisation
from .workloads import make_step

__all__ = ["run_model", "run_attention", "run_mfu", "run_scaling", "SCALING_SIZES", "SCALING_BATCH", "MFU_WIDTH"]

#: cube sides of the scaling group (3D inputs; a quick run times QUICK_SCALING_SIZES)
SCALING_SIZES = (64, 96, 128, 160)
QUICK_SCALING_SIZES = (32, 48)
#: batch of the scaling group: one sample, so that 160^3 fits in memory
SCALING_BATCH = 1
#: the wide configuration of the MFU target
MFU_WIDTH = 384
#: the issue's targets
MAX_FULL_TO_VIT = 1.15
MIN_VIT_TO_BACKBONE_POLICY = 1.5
MIN_MFU = 0.5

VIT = "MONAI ViT (fp32)"
FULL = "full model (fp32)"
FULL_BF16 = "full model (bf16 autocast)"
NO_STEM = "full model, no conv stem"
NO_PRIOR = "full model, no normality prior"
BACKBONE = "backbone alone (fp32)"
BACKBONE_BF16 = "backbone alone (bf16 autocast)"


def _shape(ctx: BenchContext, size: list[int], batch_size: int) -> str:
    return f"batch {batch_size} of {' x '.join(map(str, size))} ({ctx.tokens(size)} patch tokens + [CLS] + {ctx.cfg.catalog.num_anatomies} queries)"


# --------------------------------------------------------------------------------------------- model
def run_model(ctx: BenchContext) -> Section:
    """Training-step times of the full model and its variants against MONAI's ``ViT``."""
    cfg, enc = ctx.cfg, ctx.encoder
    batch = ctx.batch(ctx.roi, ctx.batch_size)
    policy_bf16 = bf16_supported()
    steps = {
        VIT: make_step(cfg, "vit", batch, enc),
        FULL: make_step(cfg, "full", batch, enc),
        FULL_BF16: make_step(cfg, "full", batch, enc, amp_dtype=torch.bfloat16),
        NO_STEM: make_step(cfg, "full", batch, enc, conv_stem=False),
        NO_PRIOR: make_step(cfg, "full", batch, enc, prior=None),
        BACKBONE: make_step(cfg, "backbone", batch, enc),
        BACKBONE_BF16: make_step(cfg, "backbone", batch, enc, amp_dtype=torch.bfloat16),
    }
    t = interleaved(steps, ctx.repeats, ctx.warmup)
    net = cfg.network
    rows = [[name, *timing_cells(t[name]), fmt_ratio(ratio(t[name], t[VIT]))] for name in steps]
    extra = [
        ["conv stem (full - no conv stem)", fmt_seconds(t[FULL].median - t[NO_STEM].median),
         fmt_percent((t[FULL].median - t[NO_STEM].median) / t[FULL].median)],
        ["normality prior (full - no prior)", fmt_seconds(t[FULL].median - t[NO_PRIOR].median),
         fmt_percent((t[FULL].median - t[NO_PRIOR].median) / t[FULL].median)],
    ]
    full_ratio = ratio(t[FULL], t[VIT])
    allocator = _allocator_table(ctx)
    policy = BACKBONE_BF16 if policy_bf16 else BACKBONE
    speedup = ratio(t[VIT], t[policy])
    plot = bar_chart(ctx.plots_dir / "step_times.png", list(steps), [t[n] for n in steps],
                     f"training step\n{_shape(ctx, ctx.roi, ctx.batch_size)}")
    return Section(
        key="model",
        title="Training step: full model against MONAI ViT",
        method=(
            f"One training step each, {_shape(ctx, ctx.roi, ctx.batch_size)}, the same batch of real cases (the "
            "bundle's chain, eval mode). **Full model** = the bundle's training iteration (`VLPTrainIteration`) in "
            f"the config's last stage (`{steps[FULL].stage}`: its loss terms and weights, prior fitted), sentence "
            "targets and prompts from a warm embedding cache (no text model), forward + every loss term + backward "
            "+ gradient clipping + AdamW, in fp32 and under bf16 autocast (what `amp: auto` takes on a CPU with native "
            "bf16). **MONAI ViT** = `monai.networks.nets.ViT("
            f"hidden_size={net['hidden_size']}, mlp_dim={net.get('mlp_dim') or 4 * int(net['hidden_size'])}, "
            f"num_layers={net['num_layers']}, num_heads={net['num_heads']}, patch_size={net['patch_size']}, "
            "classification=False)` with a mean-square loss on its tokens, backward, clipping, AdamW; the backbone "
            "alone (`AnatomyViT`, conv stem, [CLS] and anatomy queries) runs the same plain step. Ratios are "
            "against the MONAI ViT step."
        ),
        tables=[
            Table(["step", "median", "min - max", "ratio to MONAI ViT"], rows),
            Table(["component", "extra time per step", "share of the full step"], extra,
                  caption="Extra cost of components (differences of medians, as noisy as both; without the conv stem the "
                          "normality prior and the mask head work on the coarser token grid, so the stem's line includes "
                          "their finer-grid work):"),
            allocator,
        ],
        targets=[
            Target("full model step vs MONAI ViT step of equal backbone", f"<= {MAX_FULL_TO_VIT:.2f}x",
                   fmt_ratio(full_ratio), full_ratio <= MAX_FULL_TO_VIT),
            Target(f"speed-up of the backbone under the default precision policy ({'bf16 autocast' if policy_bf16 else 'fp32: no native bf16'}) "
                   "over MONAI ViT fp32 (ViT step / backbone step)", f">= {MIN_VIT_TO_BACKBONE_POLICY:.2f}x", fmt_ratio(speedup),
                   speedup >= MIN_VIT_TO_BACKBONE_POLICY),
            Target("GPU: AMP bf16 and fused attention paths, switched by config", "exist",
                   "not measured: the bench runs on the CPU (switches: `amp`, `amp_dtype`, `network_def#attention`)", None),
        ],
        plots=[plot],
        values={"timings": t, "full_to_vit": full_ratio, "vit_to_backbone_policy": speedup},
    )


def _allocator_table(ctx: BenchContext) -> Table:
    """The full fp32 step in two fresh processes, one after the other: glibc's allocator as it comes,
    and as ``cpu_allocator: true`` sets it (``runtime.tune_cpu_allocator``)."""
    batch_file = str(ctx.batch_file(ctx.roi, ctx.batch_size))
    rows = []
    for label, tuned in (("glibc as it comes", False), ("`cpu_allocator: true` (runtime.py)", True)):
        r = run_probe(ctx.probe_spec("steps", batch_file=batch_file, workload="full", cpu_allocator=tuned,
                                     warmup=ctx.warmup, repeats=ctx.repeats))
        t = Timing(tuple(r["step_seconds"]))
        applied = "" if r["allocator"]["applied"] == tuned else f" (not applied: {r['allocator']['reason']})"
        rows.append([label + applied, *timing_cells(t), fmt_seconds(r["user_seconds"]), fmt_seconds(r["system_seconds"]),
                     f"{r['minor_faults']:,.0f}"])
    return Table(["full model step (fp32), allocator", "median", "min - max", "user CPU per step", "kernel CPU per step",
                  "page faults per step"], rows,
                 caption="The glibc allocator, each in a fresh process (the rows above run with the config's setting): "
                         "without `cpu_allocator`, every full-resolution activation above glibc's mmap threshold is "
                         "mapped and unmapped every step, and its pages are faulted in again (kernel time).")


# --------------------------------------------------------------------------------------------- attention
class _BlockPass:
    """Forward and backward of one transformer block on fixed tokens (``(B, L, D)``) and mask."""

    def __init__(self, block: AnatomyTransformerBlock, tokens: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> None:
        self.block = block.train()
        self.tokens = tokens
        self.attn_mask = attn_mask

    def __call__(self) -> None:
        self.block.zero_grad(set_to_none=True)
        self.tokens.grad = None
        self.block(self.tokens, self.attn_mask).float().pow(2).mean().backward()


def run_attention(ctx: BenchContext) -> Section:
    """SDPA against the explicit matmul-softmax path: one block (with and without the query mask)
    and the backbone's training step."""
    cfg, enc = ctx.cfg, ctx.encoder
    batch = ctx.batch(ctx.roi, ctx.batch_size)
    net = cfg.network
    hidden, heads = int(net["hidden_size"]), int(net["num_heads"])
    mlp = int(net.get("mlp_dim") or 4 * hidden)
    m = cfg.catalog.num_anatomies
    b = ctx.batch_size
    length = 1 + m + ctx.tokens(ctx.roi)
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randn(b, length, hidden, generator=g).requires_grad_(True)
    region = masks_to_token_mask(batch["anatomy"].as_tensor() if hasattr(batch["anatomy"], "as_tensor") else batch["anatomy"],
                                 ctx.patch_size)
    mask = query_attention_mask(region)
    torch.manual_seed(cfg.seed)
    sdpa_block = AnatomyTransformerBlock(hidden, mlp, heads, attention="sdpa")
    math_block = AnatomyTransformerBlock(hidden, mlp, heads, attention="math")
    math_block.load_state_dict(sdpa_block.state_dict())
    cases = [
        ("one block, forward + backward", None),
        ("one block with the mask-guided query mask", mask),
    ]
    steps: dict[str, Any] = {}
    for label, attn_mask in cases:
        steps[f"{label}|sdpa"] = _BlockPass(sdpa_block, tokens, attn_mask)
        steps[f"{label}|math"] = _BlockPass(math_block, tokens, attn_mask)
    backbone_label = "backbone training step"
    steps[f"{backbone_label}|sdpa"] = make_step(cfg, "backbone", batch, enc, attention="sdpa")
    steps[f"{backbone_label}|math"] = make_step(cfg, "backbone", batch, enc, attention="math")
    t = interleaved(steps, ctx.repeats, ctx.warmup)
    rows = []
    for label in [c[0] for c in cases] + [backbone_label]:
        sdpa, plain = t[f"{label}|sdpa"], t[f"{label}|math"]
        rows.append([label, *timing_cells(sdpa), *timing_cells(plain), fmt_ratio(ratio(plain, sdpa))])
    return Section(
        key="attention",
        title="Attention: SDPA against matmul-softmax",
        method=(
            f"`AnatomyViT(attention=\"sdpa\")` (`F.scaled_dot_product_attention`) against `attention=\"math\"` "
            f"(`softmax(q k^T / sqrt(d) + mask) v` with plain matmuls), same weights: one transformer block "
            f"(width {hidden}, {heads} heads, {b} x {length} tokens) forward + backward, without and with the "
            "additive query mask of mask-guided attention (from the batch's masks), and the backbone's whole "
            f"training step ({_shape(ctx, ctx.roi, b)}). Both paths give the same outputs and gradients "
            "(tests/test_bench.py)."
        ),
        tables=[Table(["workload", "SDPA median", "SDPA min - max", "math median", "math min - max", "math / SDPA"], rows)],
        values={"timings": t},
    )


# --------------------------------------------------------------------------------------------- MFU
def run_mfu(ctx: BenchContext) -> Section:
    """Achieved FLOP/s of training steps against the measured fp32 matmul peak."""
    cfg, enc = ctx.cfg, ctx.encoder
    batch = ctx.batch(ctx.roi, ctx.batch_size)
    size, rounds = (1024, 3) if ctx.quick else (2048, 10)
    peak = matmul_peak(size, rounds, torch.float32)
    peak_bf16 = matmul_peak(size, rounds, torch.bfloat16)
    widths = sorted({int(cfg.network["hidden_size"]), MFU_WIDTH})
    steps: dict[str, Any] = {}
    for width in widths:
        for workload, label in (("vit", "MONAI ViT"), ("backbone", "backbone alone"), ("full", "full model")):
            steps[f"{label}|{width}"] = make_step(cfg, workload, batch, enc, hidden_size=width)
    flops = {name: count_flops(step) for name, step in steps.items()}  # one untimed step each: the first warm-up round
    t = interleaved(steps, ctx.repeats, max(0, ctx.warmup - 1))
    rows, mfu = [], {}
    for name, step_flops in flops.items():
        label, width = name.split("|")
        mfu[name] = utilisation(step_flops, t[name].median, peak)
        rows.append([label, width, f"{step_flops / 1e9:.1f}", fmt_seconds(t[name].median),
                     f"{step_flops / t[name].median / 1e9:.1f}", fmt_percent(mfu[name])])
    wide = f"full model|{widths[-1]}"
    return Section(
        key="mfu",
        title="Model FLOPs utilisation",
        method=(
            f"Peak: the best of {rounds} fp32 `{size} x {size} @ {size} x {size}` matmuls after a warm-up, "
            f"{peak / 1e9:.1f} GFLOP/s (bf16: {peak_bf16 / 1e9:.1f} GFLOP/s). FLOPs of one training step "
            "(forward, loss, backward) counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, "
            "convolutions, attention; element-wise work and the optimizer are not counted), divided by the "
            f"step's median time. {_shape(ctx, ctx.roi, ctx.batch_size)}, fp32; the width-{MFU_WIDTH} models "
            f"keep the default depth, {cfg.network['num_heads']} heads and token count."
        ),
        tables=[Table(["step", "width", "GFLOP per step", "median step", "achieved GFLOP/s", "MFU (of fp32 peak)"], rows)],
        targets=[Target(f"MFU of the full model's fp32 training step at width {widths[-1]}", f">= {fmt_percent(MIN_MFU)}",
                        fmt_percent(mfu[wide]), mfu[wide] >= MIN_MFU)],
        values={"peak_fp32": peak, "peak_bf16": peak_bf16, "flops": flops, "timings": t, "mfu": mfu},
    )


# --------------------------------------------------------------------------------------------- scaling
def run_scaling(ctx: BenchContext) -> Section:
    """Step time (in process, interleaved) and step memory (a process per size) against the input size.

    A quick run times its two small sizes only: the memory group exercises the same probe.
    """
    cfg, enc = ctx.cfg, ctx.encoder
    d = cfg.catalog.spatial_dims
    sides = QUICK_SCALING_SIZES if ctx.quick else SCALING_SIZES
    sizes = [[side] * d for side in sides]
    steps = {side: make_step(cfg, "full", ctx.batch(size, SCALING_BATCH), enc) for side, size in zip(sides, sizes)}
    t = interleaved(steps, ctx.repeats, ctx.warmup)
    tokens = [ctx.tokens(size) for size in sizes]
    time_fit = fit_power_law(tokens, [t[s].median for s in sides])
    memory: dict[int, dict[str, Any]] = {}
    if not ctx.quick:
        memory = {side: run_probe(ctx.probe_spec("step", batch_file=str(ctx.batch_file(size, SCALING_BATCH)), workload="full"))
                  for side, size in zip(sides, sizes)}
    step_bytes = [float(memory[s]["step_bytes"]) for s in sides] if memory else []
    memory_fit = fit_power_law(tokens, step_bytes) if step_bytes and min(step_bytes) > 0 else None
    rows = []
    for side, size, n in zip(sides, sizes, tokens):
        mem = [fmt_bytes(memory[side]["step_bytes"]), fmt_bytes(memory[side]["rss_peak"])] if memory else ["not measured (quick)"] * 2
        rows.append([" x ".join(map(str, size)), str(n), *timing_cells(t[side]), *mem])
    plot = scaling_chart(ctx.plots_dir / "scaling.png", tokens, [t[s] for s in sides], step_bytes, time_fit, memory_fit)
    fits = [f"Fitted growth: step time ~ N^{time_fit[0]:.2f} (N = patch tokens)"]
    if memory_fit is not None:
        fits.append(f"step memory ~ N^{memory_fit[0]:.2f}.")
    elif memory:
        fits.append("step memory: no fit (a size showed no growth of the peak RSS).")
    return Section(
        key="scaling",
        title="Scaling with input size",
        method=(
            f"The full model's training step (as in the first section) at batch {SCALING_BATCH} for inputs of "
            f"{', '.join(str(s) for s in sides)} voxels per axis (patch {ctx.patch_size[0]}), each a model built for "
            "its size; times interleaved across sizes in one process, memory in a fresh process per size (peak "
            "RSS after the step minus after building model and batch)."
        ),
        tables=[Table(["input", "patch tokens", "median step", "min - max", "step memory", "peak RSS"], rows)],
        notes=[", ".join(fits)],
        plots=[plot],
        values={"tokens": tokens, "timings": {str(s): t[s] for s in sides}, "memory": {str(s): m for s, m in memory.items()},
                "time_exponent": time_fit[0], "memory_exponent": None if memory_fit is None else memory_fit[0]},
    )
