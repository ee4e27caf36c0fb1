"""Pictures of a prediction: boxes drawn on the image, with the abnormality heatmap.

CXR: the whole radiograph with every identified region's box and name, and the prior's
deviation map (the largest over regions) in translucent colour. CT: one row per identified
anatomy with its axial, coronal and sagittal slices through the box centre (model grid: RAS,
resampled), the box outline and that anatomy's deviation map. Titles carry the abnormality
score and the most probable finding. Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["draw_overlay"]


def _top_finding(entry: dict[str, Any]) -> str:
    findings = entry.get("findings") or {}
    if not findings:
        return ""
    name, p = max(findings.items(), key=lambda kv: kv[1])
    return f"{name} {p:.2f}"


def _heat(ax: Any, heat: Optional[np.ndarray], extent: Any = None) -> None:
    if heat is None or not np.isfinite(heat).any() or float(np.nanmax(heat)) <= 0:
        return
    h = heat / float(np.nanmax(heat))
    ax.imshow(np.ma.masked_less(h, 0.05), cmap="inferno", alpha=0.45, vmin=0, vmax=1, origin="lower", extent=extent)


def draw_overlay(pred: Any, path: str | Path, presence_threshold: float = 0.5, max_rows: Optional[int] = None) -> Path:
    """Write the picture of ``pred`` (an ``inference.Prediction``) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = pred.result
    names = list(result["anatomies"])
    image = np.asarray(pred.image, dtype=np.float32)
    heat = None if pred.heatmap is None else np.asarray(pred.heatmap, dtype=np.float32)
    boxes = np.asarray(pred.boxes_grid, dtype=np.float64)
    shown = [i for i, n in enumerate(names) if result["anatomies"][n]["present"] >= presence_threshold]
    colours = plt.get_cmap("tab20")

    if image.ndim == 2:
        fig, ax = plt.subplots(figsize=(7, 7))
        # arrays are (x, y): show rows = y from the top, as the radiograph is viewed
        ax.imshow(image.T, cmap="gray", vmin=0, vmax=1)
        if heat is not None and shown:
            h = heat[shown].max(0).T
            if float(h.max()) > 0:
                h = h / float(h.max())
                ax.imshow(np.ma.masked_less(h, 0.05), cmap="inferno", alpha=0.4, vmin=0, vmax=1)
        for c, i in enumerate(shown):
            x0, y0, x1, y1 = boxes[i]
            colour = colours(c % 20)
            ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2, edgecolor=colour))
            entry = result["anatomies"][names[i]]
            ax.text(x0, y0, f"{names[i]} {entry['abnormality']:.2f}", color=colour, fontsize=6, va="bottom")
        ax.set_axis_off()
        ax.set_title(f"{Path(str(result['image'])).name}: boxes and abnormality (heatmap)", fontsize=9)
    else:
        rows = shown[: max_rows] if max_rows else shown
        n = max(1, len(rows))
        fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
        views = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))
        for r, i in enumerate(rows):
            b = boxes[i]
            centre = np.clip(((b[:3] + b[3:]) / 2).astype(int), 0, np.asarray(image.shape) - 1)
            entry = result["anatomies"][names[i]]
            for c, (view, axis, (u, v)) in enumerate(views):
                ax = axes[r, c]
                sl = np.take(image, centre[axis], axis=axis)
                ax.imshow(sl.T, cmap="gray", vmin=0, vmax=1, origin="lower")
                if heat is not None:
                    _heat(ax, np.take(heat[i], centre[axis], axis=axis).T)
                ax.add_patch(
                    patches.Rectangle((b[u] - 0.5, b[v] - 0.5), b[u + 3] - b[u], b[v + 3] - b[v], fill=False, lw=1.2, edgecolor="lime")
                )
                ax.set_axis_off()
                title = f"{names[i]} ({view})"
                if c == 0:
                    title += f"\nabnormality {entry['abnormality']:.2f}; {_top_finding(entry)}"
                ax.set_title(title, fontsize=7)
        if not rows:
            axes[0, 0].text(0.5, 0.5, "no anatomy identified", ha="center")
            for ax in axes[0]:
                ax.set_axis_off()
        fig.suptitle(f"{Path(str(result['image'])).name} (model grid, RAS)", fontsize=9)
    # leave room for the title (0.3 inch) above the panels
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()) if image.ndim == 3 else None)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
