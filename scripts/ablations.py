"""Ablations of the default CT run, each trained and evaluated with the same budget, as config overrides.

    .venv/bin/python scripts/ablations.py --epochs 6
    .venv/bin/python scripts/ablations.py --epochs 16 --variants full,no_prior

Variants (DESIGN.md's components):

- ``full``: the default configuration;
- ``no_prior``: no normality prior (``network_def#prior: None``; the ``normality`` term leaves every stage);
- ``no_disease``: no disease-level contrastive term;
- ``no_fine_grained``: no fine-grained (region-sentence) alignment;
- ``no_detection``: no box/presence/mask supervision (image-only regions are then untrained boxes
  and masks; the given masks still define the regions in the "with masks" column).

Each variant trains with ``python -m monai.bundle run training`` (own ``ckpt_dir`` / ``output_dir``),
is evaluated on the test split with ``configs/evaluate.yaml`` (own ``eval_dir``), and one markdown
table with mean AUCs and their bootstrap 95% intervals is printed and written to
``eval/ablations/table.md``. Runs one after the other (the machine has 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import fire
import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "no_prior", "no_disease", "no_fine_grained", "no_detection")
DROPPED_TERM = {"no_prior": "normality", "no_disease": "disease", "no_fine_grained": "fine_grained", "no_detection": "detection"}


def stages_without(term: str) -> list:
    """train.yaml's stage schedule with ``term`` removed from every stage."""
    config = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())
    stages = []
    for stage in config["stages"]:
        stage = dict(stage)
        stage["terms"] = [t for t in stage["terms"] if t != term]
        if stage.get("weights"):
            stage["weights"] = {k: v for k, v in stage["weights"].items() if k.split(".")[0] != term}
        if stage["terms"]:  # a stage left without terms goes (the last stage takes the remaining epochs)
            stages.append(stage)
    return stages


def overrides(variant: str) -> list[str]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if variant == "full":
        return []
    args = ["--stages", repr(stages_without(DROPPED_TERM[variant]))]
    if variant == "no_prior":
        args += ["--network_def#prior", "None"]
    return args


def _run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with log.open("w") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {result.returncode}); see {log}")
    return time.time() - start


def _fmt(mode: dict) -> str:
    lo, hi = mode.get("mean_auc_ci") or (float("nan"), float("nan"))
    return f"{mode['mean_auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def main(epochs: int = 6, variants: str = ",".join(VARIANTS), n_boot: int = 1000) -> None:
    names = [v.strip() for v in str(variants).split(",") if v.strip()]
    out = ROOT / "eval" / "ablations"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        common = [
            "--max_epochs", str(epochs), "--show_progress", "False",
            "--ckpt_dir", str(ROOT / "models" / "ablations" / name),
            "--output_dir", str(ROOT / "runs" / "ablations" / name),
        ] + overrides(name)
        train_s = _run(
            [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml"] + common,
            out / f"{name}_train.log",
        )
        eval_dir = out / name
        _run(
            [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
             "['configs/train.yaml','configs/evaluate.yaml']", "--eval_dir", str(eval_dir), "--n_boot", str(n_boot)] + common,
            out / f"{name}_eval.log",
        )
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        rows.append((name, metrics, train_s))
        print(f"{name}: trained in {train_s:.0f} s; image only {_fmt(metrics['predicted'])}, masks {_fmt(metrics['mask'])}", flush=True)
    lines = [
        f"| variant ({epochs} epochs) | mean AUC image only [95% CI] | mean AUC with masks [95% CI] | focal (image / masks) | box IoU | training |",
        "|---|---|---|---|---|---|",
    ]
    for name, m, seconds in rows:
        p, k = m["predicted"], m["mask"]
        focal = f"{p.get('focal_mean_auc', float('nan')):.3f} / {k.get('focal_mean_auc', float('nan')):.3f}"
        lines.append(f"| {name} | {_fmt(p)} | {_fmt(k)} | {focal} | {p['box_iou']:.3f} | {seconds / 60:.1f} min |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    fire.Fire(main)
