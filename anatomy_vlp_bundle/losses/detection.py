"""Anatomy box loss: L1 + generalised IoU on present anatomies, BCE on presence (DETR-style, fixed assignment).

Query ``i`` is bound to anatomy ``i`` of the catalog, so no Hungarian matching is needed: the
prediction of row ``i`` is compared with the target of row ``i``.

Conventions (``networks/box_ops.py``):

- predictions: normalised centre-size boxes ``(cx, cy, [cz], w, h, [d])`` (the box head's output);
- targets: the data pipeline's ``anatomy_boxes``, voxel corner boxes of the final grid
  ``(x0, y0, [z0], x1, y1, [z1])``, end exclusive, zeros where the anatomy is not present;
- presence codes: 1 present, 0 absent, -2 unknown (``data/labels.py``).

Reductions (what "the loss" means, so hand values can be checked):

- ``l1``: ``sum_i sum_c |pred_ic - target_ic|`` over present anatomies ``i`` and the ``2D``
  normalised centre-size coordinates ``c``, divided by the number of present anatomies
  (DETR's ``loss_bbox``: summed over coordinates, averaged over boxes).
- ``giou``: ``mean_i (1 - GIoU(pred_i, target_i))`` over present anatomies, computed on corner boxes
  in normalised coordinates with MONAI's ``box_pair_giou`` (GIoU is invariant to per-axis scaling,
  so normalised and voxel coordinates give the same value).
- ``presence``: mean BCE-with-logits over anatomies whose presence is known (1 or 0).

Entries that do not qualify are multiplied by zero rather than selected away, so the graph (and
DDP's view of which parameters are used) does not depend on the batch, and a batch where nothing
qualifies gives exact zeros that are still connected to the predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Dict, Union

import torch
import torch.nn.functional as F

from ..data.labels import ABSENT, PRESENT
from ..networks.box_ops import boxes_to_normalized_cxcywh, cxcywh_to_corners, elementwise_giou

__all__ = ["detection_loss", "mask_loss", "present_box_mask"]


def present_box_mask(target_boxes: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Which anatomies take part in the box losses: presence PRESENT and a box of positive size.

    Args:
        target_boxes: ``(B, M, 2D)`` voxel corner boxes.
        presence: ``(B, M)`` presence codes.

    Returns:
        ``(B, M)`` bool.
    """
    d = target_boxes.shape[-1] // 2
    size = target_boxes[..., d:] - target_boxes[..., :d]
    return (presence.round().long() == PRESENT) & (size > 0).all(dim=-1)


def detection_loss(
    pred_boxes: torch.Tensor,
    presence_logits: torch.Tensor,
    target_boxes: torch.Tensor,
    presence: torch.Tensor,
    spatial_shape: Union[Sequence[int], torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """Box and presence losses of the anatomy queries.

    Args:
        pred_boxes: ``(B, M, 2D)`` predicted normalised ``(cx, cy, [cz], w, h, [d])``.
        presence_logits: ``(B, M)`` predicted presence logits.
        target_boxes: ``(B, M, 2D)`` target voxel corner boxes of the input grid (end exclusive).
        presence: ``(B, M)`` presence codes (1 present, 0 absent, anything else unknown).
        spatial_shape: the input grid's size, ``D`` ints (the boxes' normalisation).

    Returns:
        ``{"l1": ..., "giou": ..., "presence": ...}`` scalar float32 tensors (see the module
        docstring for the reductions).

    Raises:
        ValueError: when shapes do not match.
    """
    if pred_boxes.dim() != 3 or pred_boxes.shape[-1] not in (4, 6):
        raise ValueError(f"detection_loss: pred_boxes must be (B, M, 4|6), got {tuple(pred_boxes.shape)}")
    if target_boxes.shape != pred_boxes.shape:
        raise ValueError(
            f"detection_loss: target_boxes {tuple(target_boxes.shape)} must match pred_boxes {tuple(pred_boxes.shape)}"
        )
    if presence_logits.shape != pred_boxes.shape[:2] or presence.shape != pred_boxes.shape[:2]:
        raise ValueError(
            f"detection_loss: presence_logits {tuple(presence_logits.shape)} and presence {tuple(presence.shape)} "
            f"must be (B, M) = {tuple(pred_boxes.shape[:2])}"
        )
    d = pred_boxes.shape[-1] // 2
    pred = pred_boxes.float()
    target_boxes = target_boxes.to(device=pred.device, dtype=torch.float32)
    presence = presence.to(pred.device)
    present = present_box_mask(target_boxes, presence)
    weight = present.float()
    n_present = weight.sum().clamp(min=1.0)

    target = boxes_to_normalized_cxcywh(target_boxes, spatial_shape)
    # rows that do not take part get a valid stand-in box (the whole grid) so that MONAI's GIoU,
    # which raises on boxes of negative size, never sees a zero/garbage target; their weight is 0
    whole = torch.cat([torch.full_like(target[..., :d], 0.5), torch.ones_like(target[..., d:])], dim=-1)
    target = torch.where(present.unsqueeze(-1), target, whole)

    l1 = ((pred - target).abs().sum(dim=-1) * weight).sum() / n_present
    giou = elementwise_giou(cxcywh_to_corners(pred), cxcywh_to_corners(target))
    loss_giou = ((1.0 - giou.float()) * weight).sum() / n_present

    codes = presence.round().long()
    known = ((codes == PRESENT) | (codes == ABSENT)).float()
    bce = F.binary_cross_entropy_with_logits(presence_logits.float(), (codes == PRESENT).float(), reduction="none")
    loss_presence = (bce * known).sum() / known.sum().clamp(min=1.0)
    return {"l1": l1, "giou": loss_giou, "presence": loss_presence}


def mask_loss(mask_logits: torch.Tensor, masks: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Anatomy mask loss on the segmentation head's grid: BCE + soft Dice (MONAI ``DiceLoss``).

    The target of each cell is the fraction of its voxels inside the mask (adaptive average
    pooling of the full-resolution masks onto the logits' grid), so the coarse masks learn partial
    volumes at organ borders. Entries: anatomies whose mask is non-empty in the sample (BCE + Dice),
    and anatomies known absent (BCE against an empty target: Dice of an empty target is all
    smoothing); a present anatomy without a mask is left out.

    Args:
        mask_logits: ``(B, M, *G)``.
        masks: ``(B, M, *S)`` binary masks (``S`` a multiple of ``G`` or any size: adaptive pooling).
        presence: ``(B, M)`` presence codes.

    Returns:
        0-d loss: mean over entries of ``BCE + Dice`` (0, connected, when no entry qualifies).
    """
    from monai.losses import DiceLoss  # local: keeps this module's import light

    masks = masks.as_tensor() if hasattr(masks, "as_tensor") else masks
    grid = [int(s) for s in mask_logits.shape[2:]]
    pool = F.adaptive_avg_pool3d if len(grid) == 3 else F.adaptive_avg_pool2d
    target = pool(masks.float().to(mask_logits.device), grid)
    b, m = target.shape[0], target.shape[1]
    nonempty = target.flatten(2).sum(-1) > 0
    absent = presence.to(mask_logits.device).round().long() == ABSENT
    valid = (nonempty | absent).float()
    logits = mask_logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(-1)
    dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-3, smooth_dr=1e-3)(logits, target).reshape(b, m)
    per_entry = bce + dice * nonempty.float()
    return (per_entry * valid).sum() / valid.sum().clamp_min(1.0)
