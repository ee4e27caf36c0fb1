"""Inference group: model latency eager / TorchScript / torch.export, and CT file to result JSON.

- Latency: the trained checkpoint's image-only model on one preprocessed case of the test split:
  ``AnatomyVLPModel`` (what ``Predictor`` runs for a checkpoint), its ``DeployWrapper`` (eager),
  the wrapper scripted, saved and loaded (``export_torchscript`` + ``torch.jit.load``, as
  ``Predictor`` loads a ``.ts``), and exported, saved and loaded (``export_program`` +
  ``torch.export.load``, as for a ``.pt2``); interleaved, no gradients.
- End to end: ``python -m anatomy_vlp_bundle infer --checkpoint ... --image ... --out ...`` in a
  fresh process on a synthetic CT volume written as NIfTI (512 x 512 x 300 at 0.7 x 0.7 x 1.0 mm;
  quick: 128 x 128 x 64 voxels of the same extent): wall time from start to the result JSON on disk, and the process's peak
  RSS. The same ``Predictor.predict`` in this process (model already loaded) shows how much of it
  is start-up and loading.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from ..data.datalist import load_datalist
from ..inference.predictor import Predictor
from ..networks.deploy import DeployWrapper, export_program, export_torchscript
from .context import BenchContext
from .probe import run_child
from .report import Section, Table, Target, fmt_bytes, fmt_ratio, fmt_seconds, timing_cells
from .timing import Timing, interleaved, ratio

__all__ = ["run_inference", "write_ct_volume", "E2E_SHAPE", "E2E_SPACING"]

#: the end-to-end volume of the targets (voxels, mm), and the quick run's small one (of a similar extent)
E2E_SHAPE = (512, 512, 300)
E2E_SPACING = (0.7, 0.7, 1.0)
QUICK_E2E_SHAPE = (128, 128, 64)
QUICK_E2E_SPACING = (2.8, 2.8, 4.0)
#: the issue's targets
MAX_E2E_SECONDS = 20.0
MAX_INFERENCE_RSS = 3e9
#: TorchScript's profiling executor specialises a graph over its first calls: never time those
MIN_INFERENCE_WARMUP = 3

MODEL = "AnatomyVLPModel, eager (Predictor's checkpoint path)"
EAGER = "DeployWrapper, eager"
SCRIPT = "TorchScript (.ts)"
PROGRAM = "torch.export (.pt2)"


def write_ct_volume(path: str | Path, shape: Sequence[int] = E2E_SHAPE, spacing: Sequence[float] = E2E_SPACING, seed: int = 0) -> Path:
    """A noisy body-like CT as an int16 NIfTI (RAS, ``spacing`` mm): air around an ellipsoidal body of
    soft tissue (40 HU) with a spine (700 HU) along its long axis and two lungs (-850 HU) in its
    upper part, Gaussian noise (sd 20 HU). Written slice by slice to keep memory low."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in shape)
    x = np.linspace(-1.0, 1.0, nx, dtype=np.float32)[:, None]
    y = np.linspace(-1.0, 1.0, ny, dtype=np.float32)[None, :]
    volume = np.empty((nx, ny, nz), dtype=np.int16)
    for k, z in enumerate(np.linspace(-1.0, 1.0, nz)):
        radius = float(np.sqrt(max(0.0, 1.0 - (z / 1.15) ** 2)))  # the body narrows towards both ends
        hu = np.full((nx, ny), -1000.0, dtype=np.float32)
        body = (x / (0.85 * radius + 1e-6)) ** 2 + (y / (0.6 * radius + 1e-6)) ** 2 <= 1.0
        hu[body] = 40.0
        if z > 0.2:
            lungs = ((np.abs(x) - 0.4) / (0.3 * radius + 1e-6)) ** 2 + ((y + 0.05) / (0.35 * radius + 1e-6)) ** 2 <= 1.0
            hu[lungs & body] = -850.0
        hu[(x / 0.08) ** 2 + ((y - 0.42) / 0.08) ** 2 <= 1.0] = 700.0
        hu += rng.standard_normal((nx, ny), dtype=np.float32) * 20.0
        volume[..., k] = np.clip(hu, -1024, 3071).astype(np.int16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.diag([*(float(s) for s in spacing), 1.0])), str(path))
    return path


def run_inference(ctx: BenchContext) -> Section:
    """Latency of the three model forms, and the end-to-end ``infer`` command on a CT file."""
    start = time.perf_counter()
    predictor = Predictor.load(ctx.checkpoint)
    load_seconds = time.perf_counter() - start
    wrapper = DeployWrapper(predictor.model, preprocessing=predictor.preprocessing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that TorchScript is deprecated
        start = time.perf_counter()
        scripted = torch.jit.load(str(export_torchscript(wrapper, ctx.tmp / "model.ts")))
        script_seconds = time.perf_counter() - start
        start = time.perf_counter()
        program = torch.export.load(str(export_program(wrapper, ctx.tmp / "model.pt2"))).module()
        export_seconds = time.perf_counter() - start

    datalist = load_datalist(ctx.cfg.dataset_dir)
    case = (datalist.records("test") or datalist.records("training"))[0]["image"]
    image = torch.as_tensor(predictor.prepare(case)["image"]).float()[None]
    model = predictor.model
    forwards = {
        MODEL: lambda: model(image, None, None, regions="predicted"),
        EAGER: lambda: wrapper(image),
        SCRIPT: lambda: scripted(image),
        PROGRAM: lambda: program(image),
    }
    with torch.no_grad():
        t = interleaved(forwards, ctx.repeats, max(ctx.warmup, MIN_INFERENCE_WARMUP))
    rows = [[name, *timing_cells(t[name]), fmt_ratio(ratio(t[name], t[EAGER]))] for name in forwards]
    script_ratio = ratio(t[SCRIPT], t[EAGER])

    shape, spacing = (QUICK_E2E_SHAPE, QUICK_E2E_SPACING) if ctx.quick else (E2E_SHAPE, E2E_SPACING)
    volume = write_ct_volume(ctx.tmp / f"ct_{'x'.join(map(str, shape))}.nii", shape, spacing)
    runs = 1 if ctx.quick else min(3, ctx.repeats)
    e2e, in_process = [], []
    for i in range(runs):
        result = ctx.tmp / f"result_{i}.json"
        run = run_child([sys.executable, "-m", "anatomy_vlp_bundle", "infer", "--checkpoint", str(Path(ctx.checkpoint).resolve()),
                         "--image", str(volume), "--out", str(result)])
        if run.returncode != 0 or "anatomies" not in json.loads(result.read_text() if result.is_file() else "{}"):
            raise RuntimeError(f"infer on {volume} failed (exit {run.returncode}): {(run.stdout + run.stderr)[-2000:]}")
        e2e.append(run)
        start = time.perf_counter()
        predictor.predict(volume)
        in_process.append(time.perf_counter() - start)
    wall = Timing(tuple(r.seconds for r in e2e))
    peak = max(r.max_rss_bytes for r in e2e)
    described = f"{' x '.join(map(str, shape))} int16 at {' x '.join(map(str, spacing))} mm"
    e2e_rows = [[described, str(runs), *timing_cells(wall), fmt_bytes(peak), fmt_seconds(statistics.median(in_process))]]
    return Section(
        key="inference",
        title="Inference",
        method=(
            f"Checkpoint `{ctx.checkpoint}`: loading it took {fmt_seconds(load_seconds)}, scripting + saving + loading "
            f"the TorchScript file {fmt_seconds(script_seconds)}, exporting (with its eager check) + saving + loading "
            f"the torch.export archive {fmt_seconds(export_seconds)}. Latency of one forward (batch 1 of "
            f"{' x '.join(map(str, image.shape[2:]))}, a preprocessed test case, no gradients, "
            f"{max(ctx.warmup, MIN_INFERENCE_WARMUP)} warm-up calls: TorchScript optimises over its first calls); "
            "ratios against the eager `DeployWrapper`, the same computation as the exported forms. End to end: "
            "`python -m anatomy_vlp_bundle infer --checkpoint ... --image ... --out result.json` in a fresh process "
            "(interpreter start, imports, checkpoint load, reading, preprocessing, forward, JSON), on a synthetic "
            "body-like CT (uncompressed NIfTI)."
        ),
        tables=[
            Table(["model form", "median", "min - max", "ratio to eager DeployWrapper"], rows),
            Table(["CT volume", "runs", "wall median", "wall min - max", "peak RSS", "Predictor.predict in process"],
                  e2e_rows, caption="End to end, CT file to result JSON:"),
        ],
        targets=[
            Target("TorchScript latency vs eager", "<= 1.00x", fmt_ratio(script_ratio), script_ratio <= 1.0),
            Target("end-to-end 512 x 512 x 300 CT inference (file to result JSON)", f"< {MAX_E2E_SECONDS:.0f} s",
                   f"{fmt_seconds(wall.median)} ({' x '.join(map(str, shape))})", wall.median < MAX_E2E_SECONDS),
            Target("peak RSS of CT inference (512 x 512 x 300)", f"< {fmt_bytes(MAX_INFERENCE_RSS)}",
                   f"{fmt_bytes(peak)} ({' x '.join(map(str, shape))})", peak < MAX_INFERENCE_RSS),
        ],
        values={"load_seconds": load_seconds, "script_seconds": script_seconds, "export_seconds": export_seconds,
                "timings": t, "e2e_shape": list(shape), "e2e_seconds": wall, "e2e_peak_rss": peak,
                "predict_in_process_seconds": in_process},
    )
