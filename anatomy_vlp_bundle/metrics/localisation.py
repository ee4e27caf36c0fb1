"""Anatomy localisation metrics: box IoU of present anatomies and presence accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT

from .diagnosis import _to_numpy

__all__ = ["evaluate_boxes"]


def _mean(x: np.ndarray) -> Optional[float]:
    return float(x.mean()) if x.size else None


def evaluate_boxes(
    pred_boxes: Any,
    target_boxes: Any,
    presence: Any,
    presence_prob: Optional[Any] = None,
    anatomy_names: Optional[Sequence[str]] = None,
    iou_threshold: float = 0.5,
    presence_threshold: float = 0.5,
    mask_dice: Optional[Any] = None,
) -> dict[str, Any]:
    """Box IoU per anatomy over the samples where the anatomy is present, and presence accuracy.

    IoU is invariant to scaling each axis, so any coordinates work as long as predictions and
    targets share them (voxel indices, or the normalised grid after
    :func:`~anatomy_vlp_bundle.networks.box_ops.cxcywh_to_corners`).

    Args:
        pred_boxes: ``(N, M, 2 * spatial_dims)`` predicted corner boxes ``(x0, y0, [z0], x1, y1, [z1])``.
        target_boxes: ``(N, M, 2 * spatial_dims)`` target corner boxes, same coordinates; only rows of
            present anatomies are read (absent / unknown rows may hold anything, e.g. NaN or zeros).
        presence: ``(N, M)`` presence codes: PRESENT 1, ABSENT 0, UNKNOWN -2 (left out).
        presence_prob: optional ``(N, M)`` predicted P(anatomy present).
        anatomy_names: ``M`` names used as keys of ``per_anatomy`` (default ``anatomy_0`` ...).
        iou_threshold: IoU counted as a hit (``fraction_iou_ge_threshold``).
        presence_threshold: P(present) above or at which an anatomy is called present.
        mask_dice: optional ``(N, M)`` Dice of the predicted anatomy masks against the given ones,
            NaN where undefined (no given mask); adds ``mean_dice`` / ``n_masks`` per anatomy and
            ``mean_dice`` (mean over anatomies of their means).

    Returns:
        ``per_anatomy``: name -> ``n_present``, ``mean_iou``, ``fraction_iou_ge_threshold``,
        ``presence_accuracy``, ``n_presence_known``; ``mean_iou`` (mean over anatomies of their
        means), ``mean_iou_instances`` (over all present instances), ``fraction_iou_ge_threshold``
        (instances), ``presence_accuracy`` (over all known presence entries), ``n_instances``,
        ``n_invalid_pred`` (present instances whose prediction is NaN/inf: IoU 0), ``iou_threshold``,
        and with ``mask_dice`` the Dice entries above. Undefined values are None.
    """
    from anatomy_vlp_bundle.networks.box_ops import elementwise_iou  # torch; imported when needed
    import torch

    pred = _to_numpy(pred_boxes, "pred_boxes")
    target = _to_numpy(target_boxes, "target_boxes")
    pres = _to_numpy(presence, "presence")
    if pred.ndim != 3 or pred.shape[-1] not in (4, 6):
        raise ValueError(f"pred_boxes must be (N, M, 4) for 2D or (N, M, 6) for 3D, got shape {pred.shape}")
    if target.shape != pred.shape:
        raise ValueError(f"target_boxes must have the shape of pred_boxes {pred.shape}, got {target.shape}")
    n, m = pred.shape[:2]
    if pres.shape != (n, m):
        raise ValueError(f"presence must be (N, M)={(n, m)}, got shape {pres.shape}")
    names = list(anatomy_names) if anatomy_names is not None else [f"anatomy_{i}" for i in range(m)]
    if len(names) != m:
        raise ValueError(f"anatomy_names has {len(names)} names for M={m} anatomies")

    present = pres == PRESENT
    bad_target = present & ~np.isfinite(target).all(-1)
    if bad_target.any():
        i, j = np.argwhere(bad_target)[0]
        raise ValueError(f"target_boxes[{i}, {j}] ({names[j]}) is marked present but holds NaN/inf: {target[i, j]}")
    # a non-finite prediction (a diverged model) scores IoU 0 and is counted, rather than stopping validation
    bad_pred = present & ~np.isfinite(pred).all(-1)
    iou = np.zeros((n, m))
    if present.any():
        iou_present = elementwise_iou(
            torch.from_numpy(np.nan_to_num(pred[present], nan=0.0, posinf=0.0, neginf=0.0)), torch.from_numpy(target[present])
        )
        iou[present] = iou_present.double().numpy()
    iou[bad_pred] = 0.0

    prob = None
    if presence_prob is not None:
        prob = _to_numpy(presence_prob, "presence_prob")
        if prob.shape != (n, m):
            raise ValueError(f"presence_prob must be (N, M)={(n, m)}, got shape {prob.shape}")
    known = (pres == PRESENT) | (pres == ABSENT)
    correct = None
    if prob is not None:
        correct = (prob >= presence_threshold) == present

    dice = None
    if mask_dice is not None:
        dice = _to_numpy(mask_dice, "mask_dice")
        if dice.shape != (n, m):
            raise ValueError(f"mask_dice must be (N, M)={(n, m)}, got shape {dice.shape}")
    per_anatomy: dict[str, dict[str, Any]] = {}
    means = []
    dice_means = []
    for j, name in enumerate(names):
        v = iou[present[:, j], j]
        entry: dict[str, Any] = {
            "n_present": int(v.size),
            "mean_iou": _mean(v),
            "fraction_iou_ge_threshold": _mean((v >= iou_threshold).astype(np.float64)),
            "n_presence_known": int(known[:, j].sum()),
            "presence_accuracy": None if correct is None else _mean(correct[known[:, j], j].astype(np.float64)),
        }
        if v.size:
            means.append(entry["mean_iou"])
        if dice is not None:
            d = dice[np.isfinite(dice[:, j]), j]
            entry["n_masks"], entry["mean_dice"] = int(d.size), _mean(d)
            if d.size:
                dice_means.append(entry["mean_dice"])
        per_anatomy[name] = entry
    all_iou = iou[present]
    extra: dict[str, Any] = {}
    if dice is not None:
        extra["mean_dice"] = float(np.mean(dice_means)) if dice_means else None
    return {
        "per_anatomy": per_anatomy,
        "mean_iou": float(np.mean(means)) if means else None,
        "mean_iou_instances": _mean(all_iou),
        "fraction_iou_ge_threshold": _mean((all_iou >= iou_threshold).astype(np.float64)),
        "presence_accuracy": None if correct is None else _mean(correct[known].astype(np.float64)),
        "n_instances": int(all_iou.size),
        "n_invalid_pred": int(bad_pred.sum()),
        "n_anatomies_evaluated": len(means),
        "iou_threshold": float(iou_threshold),
        "presence_threshold": float(presence_threshold),
        **extra,
    }
