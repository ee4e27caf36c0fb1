"""Writing evaluation results: a metrics JSON, ROC-curve figures and a Markdown table.

Accepts either the dict of :func:`~anatomy_vlp_bundle.metrics.diagnosis.evaluate_findings` (it has
``pairs``) or the combined dict of :func:`~anatomy_vlp_bundle.metrics.handlers.compute_zero_shot_metrics`
(sections ``diagnosis``, ``abnormality``, ``localisation``).

Figures use matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg when saved as
PNG) instead of ``pyplot``, so writing them neither needs a display nor changes the backend or
global state of the calling process.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = ["to_plain", "safe_name", "write_metrics", "format_markdown_table"]


def to_plain(obj: Any) -> Any:
    """Recursively convert to JSON types: numpy / torch values to Python numbers and lists, tuples to
    lists, NaN and infinities to None, dict keys to strings, paths to strings."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch tensor
        obj = obj.detach().cpu().float().numpy() if obj.is_floating_point() else obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_plain(v) for v in obj]
    raise TypeError(f"to_plain: cannot convert {type(obj).__name__} to a JSON value")


def safe_name(name: str) -> str:
    """A file-name-safe version of ``name``: spaces and anything but letters, digits, ``.``, ``-``, ``_``
    become ``_`` (e.g. ``"left lung"`` -> ``"left_lung"``)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip()).strip("._")
    return out or "unnamed"


def _sections(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Per-pair sections (``diagnosis``, ``abnormality``) of a result dict."""
    if "pairs" in metrics:
        return {"diagnosis": metrics}
    return {k: v for k, v in metrics.items() if isinstance(v, Mapping) and "pairs" in v}


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _fmt_ci(ci: Any, digits: int = 3) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


# --------------------------------------------------------------------------- figures
def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_roc_group(title: str, pairs: list[Mapping[str, Any]], label_key: str, path: Path) -> None:
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    for e in pairs:
        roc = e.get("roc")
        if not roc:
            continue
        ax.plot(np.asarray(roc["fpr"]), np.asarray(roc["tpr"]), linewidth=1.5,
                label=f"{e[label_key]} (AUC {_fmt(e['auc'])}, n+={e['n_pos']})")
    skipped = [f"{e[label_key]}: {e['status']}" for e in pairs if e.get("status") != "ok"]
    if skipped:
        ax.text(0.98, 0.02, "\n".join(skipped), ha="right", va="bottom", fontsize=7, color="0.4", transform=ax.transAxes)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_aspect("equal")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right" if not skipped else "center right", fontsize=7)
    fig.savefig(path)


def _plot_summary(section: Mapping[str, Any], title: str, path: Path) -> None:
    ok = [e for e in section["pairs"] if e.get("status") == "ok" and e.get("roc")]
    n = max(len(ok), 1)
    fig = _new_figure(12.0, max(4.5, 0.2 * n + 1.5))
    ax_roc, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    # mean ROC: each pair's TPR interpolated on a common FPR grid (the step curve's upper envelope)
    grid = np.linspace(0, 1, 201)
    curves = []
    for e in ok:
        fpr, tpr = np.asarray(e["roc"]["fpr"], float), np.asarray(e["roc"]["tpr"], float)
        curves.append(np.interp(grid, fpr, tpr))
        ax_roc.plot(fpr, tpr, color="0.8", linewidth=0.7)
    ax_roc.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    if curves:
        mean_tpr = np.mean(curves, axis=0)
        mean_tpr[0] = 0.0
        ax_roc.plot(grid, mean_tpr, color="C0", linewidth=2.5,
                    label=f"mean ROC; mean AUC {_fmt(section.get('mean_auc'))}{_fmt_ci(section.get('mean_auc_ci'))}")
        ax_roc.legend(loc="lower right", fontsize=8)
    ax_roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{title}: {len(ok)} evaluable, {section.get('n_skipped', 0)} skipped")
    ax_roc.set_aspect("equal")
    # AUC per pair, sorted, with bootstrap CI whiskers
    ok_sorted = sorted(ok, key=lambda e: e["auc"])
    names = [f"{e['anatomy']} / {e['finding']}" for e in ok_sorted]
    aucs = np.array([e["auc"] for e in ok_sorted], dtype=float)
    y = np.arange(len(ok_sorted))
    if len(ok_sorted):
        # whisker lengths below / above the AUC (zero without a CI, e.g. n_boot=0)
        bounds = [e.get("auc_ci") or [None, None] for e in ok_sorted]
        lows = np.array([b[0] if b[0] is not None else a for b, a in zip(bounds, aucs)])
        highs = np.array([b[1] if b[1] is not None else a for b, a in zip(bounds, aucs)])
        ci = np.clip(np.stack([aucs - lows, highs - aucs]), 0, None)
        ax_bar.barh(y, aucs, xerr=ci, color=["C3" if a < 0.6 else "C0" for a in aucs], ecolor="0.3", capsize=2)
        ax_bar.set_yticks(y, names, fontsize=7 if n > 20 else 9)
    ax_bar.axvline(0.5, color="0.6", linestyle="--", linewidth=1)
    if section.get("mean_auc") is not None:
        ax_bar.axvline(section["mean_auc"], color="C1", linewidth=1.5, label=f"mean {_fmt(section['mean_auc'])}")
        ax_bar.legend(loc="lower right", fontsize=8)
    ax_bar.set(xlim=(0, 1), xlabel="ROC-AUC", title="AUC per pair (sorted)")
    fig.savefig(path)


def write_metrics(
    metrics: Mapping[str, Any],
    out_dir: Union[str, Path],
    prefix: str = "",
    plots: bool = True,
    include_curves: bool = False,
) -> dict[str, Any]:
    """Write ``{prefix}metrics.json``, ROC figures and ``{prefix}metrics.md`` into ``out_dir``.

    Figures (PNG): for the diagnosis section, one ``{prefix}roc_{anatomy}.png`` per anatomy (a curve
    per finding, AUC in the legend; study findings in ``roc_study.png``) and
    ``{prefix}roc_summary.png`` (mean ROC and the sorted per-pair AUC bar chart with CIs); for the
    abnormality section, ``{prefix}roc_abnormality.png`` (a curve per anatomy) and
    ``{prefix}roc_abnormality_summary.png``.

    Args:
        metrics: a result dict (see the module docstring).
        out_dir: output folder (created).
        prefix: file-name prefix, e.g. ``"test_"``.
        plots: write the PNG figures.
        include_curves: keep the ROC points (``roc``) in the JSON (off: smaller files).

    Returns:
        ``{"json": Path, "markdown": Path, "figures": [Path, ...]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", str(prefix))  # used as given ("test_" -> "test_metrics.json")

    def strip_curves(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: strip_curves(v) for k, v in obj.items() if include_curves or k != "roc"}
        if isinstance(obj, list):
            return [strip_curves(v) for v in obj]
        return obj

    json_path = out / f"{prefix}metrics.json"
    text = json.dumps(to_plain(strip_curves(metrics)), indent=1, allow_nan=False)
    json_path.write_text(text + "\n", encoding="utf-8")
    md_path = out / f"{prefix}metrics.md"
    md_path.write_text(format_markdown_table(metrics) + "\n", encoding="utf-8")

    figures: list[Path] = []
    if plots:
        used: set[str] = set()

        def fig_path(stem: str) -> Path:
            name = safe_name(stem)
            base, k = name, 2
            while name in used:  # two anatomies whose safe names collide
                name, k = f"{base}_{k}", k + 1
            used.add(name)
            return out / f"{prefix}roc_{name}.png"

        sections = _sections(metrics)
        diag = sections.get("diagnosis")
        if diag is not None:
            by_anatomy: dict[str, list[Mapping[str, Any]]] = {}
            for e in diag["pairs"]:
                by_anatomy.setdefault(e["anatomy"], []).append(e)
            for anatomy, pairs in by_anatomy.items():
                path = fig_path(anatomy)
                _plot_roc_group(anatomy, pairs, "finding", path)
                figures.append(path)
            path = fig_path("summary")
            _plot_summary(diag, "zero-shot diagnosis", path)
            figures.append(path)
        abn = sections.get("abnormality")
        if abn is not None:
            path = fig_path("abnormality")
            _plot_roc_group("abnormality score: any finding", list(abn["pairs"]), "anatomy", path)
            figures.append(path)
            path = fig_path("abnormality_summary")
            _plot_summary(abn, "abnormality score", path)
            figures.append(path)
    return {"json": json_path, "markdown": md_path, "figures": figures}


# --------------------------------------------------------------------------- markdown
def _pair_table(section: Mapping[str, Any]) -> list[str]:
    lines = [
        "| anatomy | finding | n+ | n- | AUC [95% CI] | threshold | sens. | spec. | bal. acc. | F1 | status |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    level = 100 * (1 - float(section.get("alpha", 0.05)))
    lines[0] = lines[0].replace("95% CI", f"{level:g}% CI")
    for e in section["pairs"]:
        auc = "" if e.get("auc") is None else _fmt(e["auc"]) + _fmt_ci(e.get("auc_ci"))
        lines.append(
            f"| {e['anatomy']} | {e['finding']} | {e['n_pos']} | {e['n_neg']} | {auc} | {_fmt(e.get('threshold'))} | "
            f"{_fmt(e.get('sensitivity'))} | {_fmt(e.get('specificity'))} | {_fmt(e.get('balanced_accuracy'))} | "
            f"{_fmt(e.get('f1'))} | {e['status']} |"
        )
    return lines


def _summary_lines(section: Mapping[str, Any]) -> list[str]:
    lines = [
        f"- mean AUC: **{_fmt(section.get('mean_auc'))}**{_fmt_ci(section.get('mean_auc_ci'))} over "
        f"{section.get('n_evaluable', 0)} evaluable pairs ({section.get('n_skipped', 0)} skipped: no positives or no "
        f"negatives), {section.get('n_cases', 0)} cases, {section.get('n_boot', 0)} bootstrap resamples",
        f"- mean balanced accuracy {_fmt(section.get('mean_balanced_accuracy'))}, mean F1 {_fmt(section.get('mean_f1'))}, "
        f"weighted F1 {_fmt(section.get('weighted_f1'))}, mean sensitivity {_fmt(section.get('mean_sensitivity'))}, "
        f"mean specificity {_fmt(section.get('mean_specificity'))}",
    ]
    for kind, v in (section.get("by_kind") or {}).items():
        lines.append(f"- {kind} findings: mean AUC {_fmt(v.get('mean_auc'))} ({v.get('n_evaluable', 0)} evaluable)")
    for name, g in (section.get("groups") or {}).items():
        lines.append(
            f"- group *{name}*: mean AUC {_fmt(g.get('mean_auc'))}{_fmt_ci(g.get('mean_auc_ci'))} "
            f"({g.get('n_evaluable', 0)} of {g.get('n_pairs', 0)} pairs evaluable)"
        )
    return lines


def format_markdown_table(metrics: Mapping[str, Any]) -> str:
    """Markdown for docs: the summary and a per-pair table (AUC [CI], threshold, sensitivity,
    specificity, balanced accuracy, F1, status) per section, and the localisation summary.

    Args:
        metrics: a result dict (see the module docstring).
    """
    out: list[str] = []
    titles = {"diagnosis": "Zero-shot diagnosis", "abnormality": "Abnormality score (any finding per anatomy)"}
    for key, section in _sections(metrics).items():
        out += [f"### {titles.get(key, key)}", ""] + _summary_lines(section) + [""] + _pair_table(section) + [""]
    loc = metrics.get("localisation") if isinstance(metrics, Mapping) else None
    if isinstance(loc, Mapping) and "per_anatomy" in loc:
        thr = loc.get("iou_threshold", 0.5)
        out += [
            "### Anatomy localisation",
            "",
            f"- mean IoU over anatomies **{_fmt(loc.get('mean_iou'))}**, over {loc.get('n_instances', 0)} present "
            f"instances {_fmt(loc.get('mean_iou_instances'))}; IoU >= {thr:g}: {_fmt(loc.get('fraction_iou_ge_threshold'))}; "
            f"presence accuracy {_fmt(loc.get('presence_accuracy'))}"
            + (f"; predicted-mask Dice {_fmt(loc.get('mean_dice'))}" if "mean_dice" in loc else ""),
            "",
        ]
        dice = "mean_dice" in loc
        out += [
            f"| anatomy | n present | mean IoU | IoU >= {thr:g} | presence acc. |" + (" mask Dice |" if dice else ""),
            "|---|---:|---:|---:|---:|" + ("---:|" if dice else ""),
        ]
        for name, v in loc["per_anatomy"].items():
            out.append(
                f"| {name} | {v['n_present']} | {_fmt(v.get('mean_iou'))} | {_fmt(v.get('fraction_iou_ge_threshold'))} | "
                f"{_fmt(v.get('presence_accuracy'))} |" + (f" {_fmt(v.get('mean_dice'))} |" if dice else "")
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n" if out else "(no metrics)\n"
