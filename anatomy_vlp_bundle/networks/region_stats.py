"""Voxel-level intensity statistics of each anatomy region, standardised per anatomy.

Why this exists (measured on the synthetic CT split, 80 x 64 x 64 at 4 mm, see docs/README.md):
the region feature pooled from 8 x 8 x 8 patch tokens carries little of what most findings
change: the organ's volume (enlargement, atrophy), its mean density (steatosis, osteopenia) and
the tails of its density histogram (calcifications, stones, cysts). A linear probe on nine
hand-made region statistics reached a mean test AUC of 0.88 with masks, the same probe on the
pooled token features of a randomly initialised or of a trained backbone 0.63; the end-to-end
prompt-pair loss did not fall below the label-prevalence entropy in 300 steps, because the
cases' region embeddings differed by a few hundredths of a logit. With the statistics below
appended to the fusion input, the same 300 steps reached a validation mean AUC of 0.82 (masks).

``region_statistics(image, weights, bins)`` per (sample, anatomy) from the region's voxel weights:

- ``log`` of the region's volume fraction (given mask, or predicted box);
- weighted mean and standard deviation of the intensity (the input in ``[0, 1]``);
- ``log(histogram + 1e-4)`` over ``bins`` equal bins of ``[0, 1]`` (the log keeps a handful of
  calcified voxels visible next to thousands of normal ones).

These are radiomics-style first-order features (volume, mean, spread, histogram); the model
learns which of them a finding's prompt points at. :class:`RunningStandardize` centres and
scales them per anatomy with running moments (buffers, updated in training only; DDP's buffer
broadcast keeps ranks equal), so inter-case differences arrive at unit scale whatever the organ.

All functions are TorchScript-compatible (the deploy wrapper uses them).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .box_ops import boxes_to_token_mask
from .heads import upsample_mask_logits

__all__ = ["region_statistics", "region_voxel_weights", "RunningStandardize", "stats_dim"]



def stats_dim(bins: int) -> int:
    """Width of :func:`region_statistics` for ``bins`` histogram bins (0 bins: off, width 0)."""
    return 0 if bins <= 0 else int(bins) + 3


def region_voxel_weights(
    anatomy: Optional[torch.Tensor],
    boxes: torch.Tensor,
    index: int,
    spatial: List[int],
    regions: str,
    mask_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(B, V)`` float voxel weights of anatomy ``index``: its given mask (``"mask"``), its predicted
    region (``"predicted"``), or (``"auto"``) the given mask where the sample has one and the
    predicted region elsewhere. The predicted region is the predicted mask (``mask_logits > 0``,
    upsampled to ``spatial``) where it is non-empty, else the predicted box.

    Args:
        anatomy: ``(B, M, *S)`` masks or ``None``.
        boxes: ``(B, M, 2d)`` normalised centre-size boxes (used detached).
        index: the anatomy.
        spatial: ``S``.
        regions: ``"mask"``, ``"predicted"`` or ``"auto"``.
        mask_logits: optional ``(B, M, *G)`` predicted mask logits on any grid (detached here).
    """
    # only what is used is rasterised: the given mask first, the predicted mask where it is missing,
    # the box where both are (a voxel-level box or upsampled mask per anatomy is the costly part)
    mask_w: Optional[torch.Tensor] = None
    has_mask = torch.zeros(0, dtype=torch.bool)
    if anatomy is not None and regions != "predicted":
        mask_w = anatomy[:, index].flatten(1).to(torch.float32)
        if regions == "mask":
            return mask_w
        has_mask = mask_w.sum(dim=1, keepdim=True) > 0
        if bool(has_mask.all()):
            return mask_w
    pred_w = _predicted_weights(boxes, index, spatial, mask_logits)
    if mask_w is None:
        return pred_w
    return torch.where(has_mask, mask_w, pred_w)


def _predicted_weights(boxes: torch.Tensor, index: int, spatial: List[int], mask_logits: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, V)`` the predicted mask of anatomy ``index`` where non-empty, else its predicted box."""
    if mask_logits is None:
        return _box_weights(boxes, index, spatial)
    pred_w = (upsample_mask_logits(mask_logits[:, index : index + 1].detach(), spatial)[:, 0].flatten(1) > 0).to(torch.float32)
    has_pred = pred_w.sum(dim=1, keepdim=True) > 0
    if bool(has_pred.all()):
        return pred_w
    return torch.where(has_pred, pred_w, _box_weights(boxes, index, spatial))


def _box_weights(boxes: torch.Tensor, index: int, spatial: List[int]) -> torch.Tensor:
    """``(B, V)`` voxels covered by the predicted box of anatomy ``index``."""
    return boxes_to_token_mask(boxes[:, index : index + 1].detach(), spatial, False)[:, 0].to(torch.float32)


def region_statistics(
    image: torch.Tensor,
    anatomy: Optional[torch.Tensor],
    boxes: torch.Tensor,
    regions: str,
    bins: int,
    mask_logits: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Statistics of every anatomy region (see the module docstring).

    One anatomy at a time, so memory stays ``O(B * voxels)`` whatever the number of anatomies.

    Args:
        image: ``(B, C, *S)`` in ``[0, 1]`` (channels averaged).
        anatomy: optional ``(B, M, *S)`` masks.
        boxes: ``(B, M, 2d)`` normalised centre-size boxes.
        regions: ``"mask"``, ``"predicted"`` or ``"auto"`` (as the model's ``regions``).
        bins: histogram bins (>= 1).
        mask_logits: optional ``(B, M, *G)`` predicted mask logits (the predicted regions; else boxes).

    Returns:
        ``stats`` ``(B, M, bins + 3)`` float32 and ``valid`` ``(B, M)`` bool (the region holds a
        voxel; an empty region's statistics are zeros).
    """
    b = image.shape[0]
    m = boxes.shape[1]
    spatial: List[int] = []
    for s in image.shape[2:]:
        spatial.append(int(s))
    x = image.to(torch.float32).mean(dim=1).flatten(1).clamp(0.0, 1.0)  # (B, V)
    n_vox = x.shape[1]
    index = (x * bins).to(torch.long).clamp(0, bins - 1)
    x2 = x * x
    rows: List[torch.Tensor] = []
    valids: List[torch.Tensor] = []
    for a in range(m):
        w = region_voxel_weights(anatomy, boxes, a, spatial, regions, mask_logits)
        total = w.sum(dim=1)
        valid = total > 0
        wn = w / total.clamp(min=1.0).unsqueeze(1)
        mean = (wn * x).sum(dim=1)
        var = ((wn * x2).sum(dim=1) - mean * mean).clamp(min=0.0)
        hist = torch.zeros(b, bins, dtype=torch.float32, device=image.device).scatter_add_(1, index, wn)
        volume = torch.log((total / float(n_vox)).clamp(min=1e-6))
        row = torch.cat([volume.unsqueeze(1), mean.unsqueeze(1), var.sqrt().unsqueeze(1), torch.log(hist + 1e-4)], dim=1)
        rows.append(row * valid.unsqueeze(1).to(row.dtype))
        valids.append(valid)
    return torch.stack(rows, dim=1), torch.stack(valids, dim=1)


class RunningStandardize(nn.Module):
    """Per-anatomy standardisation with running moments: ``(x - mean[m]) / sqrt(var[m] + eps)``.

    In training mode the moments are updated from the batch's valid entries first (a running
    average over the first ``1 / momentum`` updates, then an exponential one); eval mode only
    reads them. Invalid entries come out as zeros.

    Args:
        num_anatomies: ``M``.
        dim: feature width.
        momentum: the exponential rate once warm.
        eps: variance floor.

    ``forward(x (B, M, dim), valid (B, M) bool)`` -> ``(B, M, dim)``.
    """

    def __init__(self, num_anatomies: int, dim: int, momentum: float = 0.01, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"RunningStandardize: momentum must be in (0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.register_buffer("running_mean", torch.zeros(num_anatomies, dim))
        self.register_buffer("running_var", torch.ones(num_anatomies, dim))
        self.register_buffer("count", torch.zeros(num_anatomies))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        v = valid.to(torch.float32).unsqueeze(-1)  # (B, M, 1)
        if self.training:
            with torch.no_grad():
                n = v.sum(dim=0)  # (M, 1)
                seen = n > 0
                batch_mean = (x * v).sum(dim=0) / n.clamp(min=1.0)
                batch_var = ((x - batch_mean) ** 2 * v).sum(dim=0) / n.clamp(min=1.0)
                rate = torch.clamp(1.0 / (self.count.unsqueeze(1) + 1.0), min=self.momentum)
                rate = torch.where(seen, rate, torch.zeros_like(rate))
                # moments of the mixture (1 - rate) * running + rate * batch, without E[x^2] - E[x]^2
                # cancellation (a density mean varies by ~1e-2 around ~0.5 between cases)
                delta = batch_mean - self.running_mean
                self.running_var.copy_((1.0 - rate) * self.running_var + rate * batch_var + rate * (1.0 - rate) * delta * delta)
                self.running_mean.add_(rate * delta)
                self.count.add_(seen.squeeze(1).to(self.count.dtype))
        return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps) * v

    def extra_repr(self) -> str:
        return f"anatomies={self.running_mean.shape[0]}, dim={self.running_mean.shape[1]}, momentum={self.momentum}"
