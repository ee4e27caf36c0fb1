"""Box geometry for the anatomy box head and its losses (pure torch functions, 2D and 3D).

Conventions (the same as the data pipeline's ``anatomy_boxes``):

- A *corner* box is ``(x0, y0, [z0], x1, y1, [z1])`` in array-axis order (``x`` = first spatial
  axis of the tensor), end exclusive: MONAI's ``StandardMode`` (``"xyxy"`` / ``"xyzxyz"``).
  A box covering voxels ``10..19`` along an axis is ``(10, 20)``.
- A *centre-size* box is ``(cx, cy, [cz], w, h, [d])``: MONAI's ``"ccwh"`` / ``"cccwhd"``.
- A *normalised* centre-size box divides centres and sizes by the spatial shape, so the whole
  input grid is ``(0.5, 0.5, [0.5], 1, 1, [1])``; this is what the box head predicts.
- The token grid of a ViT splits every axis into ``g`` equal cells; token ``j`` covers
  ``[j / g, (j + 1) / g)`` in normalised coordinates, and tokens are numbered in row-major order
  over the grid (the order of ``conv_output.flatten(2)``).

Every function accepts any number of leading dimensions (``(..., 2 * spatial_dims)``) unless it
says otherwise, keeps the autograd graph, and never synchronises with the device. The pairwise
functions and the elementwise GIoU use :mod:`monai.data.box_utils` (which is differentiable; it
computes in float32, then casts back to the input dtype, and raises on invalid boxes); the
elementwise IoU, which MONAI does not have, is written here and tested against ``box_iou``'s
diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Union

import torch
from monai.data.box_utils import box_giou, box_iou, box_pair_giou

__all__ = [
    "corners_to_cxcywh",
    "cxcywh_to_corners",
    "boxes_to_normalized_cxcywh",
    "normalized_cxcywh_to_boxes",
    "box_spatial_dims",
    "pairwise_iou",
    "pairwise_giou",
    "elementwise_iou",
    "elementwise_giou",
    "boxes_to_token_mask",
]

_EPS = 1e-7


def box_spatial_dims(boxes: torch.Tensor) -> int:
    """Number of spatial dimensions (2 or 3) of boxes shaped ``(..., 4)`` or ``(..., 6)``.

    Raises:
        ValueError: when the last dimension is neither 4 nor 6.
    """
    if boxes.dim() == 0 or boxes.shape[-1] not in (4, 6):
        raise ValueError(
            f"boxes must have shape (..., 4) for 2D or (..., 6) for 3D, got shape {tuple(boxes.shape)}"
        )
    return boxes.shape[-1] // 2


def corners_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(x0, y0, [z0], x1, y1, [z1])`` -> ``(cx, cy, [cz], w, h, [d])``.

    Args:
        boxes: corner boxes ``(..., 2 * spatial_dims)``.

    Returns:
        centre-size boxes of the same shape and dtype (MONAI's ``"ccwh"`` / ``"cccwhd"``).
    """
    d = box_spatial_dims(boxes)
    lo, hi = boxes[..., :d], boxes[..., d:]
    return torch.cat([(lo + hi) * 0.5, hi - lo], dim=-1)


def cxcywh_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """``(cx, cy, [cz], w, h, [d])`` -> ``(x0, y0, [z0], x1, y1, [z1])`` (inverse of :func:`corners_to_cxcywh`).

    Args:
        boxes: centre-size boxes ``(..., 2 * spatial_dims)``.

    Returns:
        corner boxes of the same shape and dtype (MONAI's ``StandardMode``).
    """
    d = box_spatial_dims(boxes)
    centre, half = boxes[..., :d], boxes[..., d:] * 0.5
    return torch.cat([centre - half, centre + half], dim=-1)


def _shape_tensor(spatial_shape: Union[Sequence[int], torch.Tensor], like: torch.Tensor, d: int) -> torch.Tensor:
    """The spatial shape as a tensor broadcastable against ``(..., d)``, on ``like``'s device and dtype."""
    # checked before moving to the boxes' device, so a CPU shape never makes the device wait
    shape = torch.as_tensor(spatial_shape, dtype=like.dtype if like.is_floating_point() else torch.float32)
    if shape.shape[-1:] != (d,):
        raise ValueError(
            f"spatial_shape must hold {d} sizes (one per spatial axis) for boxes with {2 * d} numbers, "
            f"got {tuple(spatial_shape.shape) if isinstance(spatial_shape, torch.Tensor) else list(spatial_shape)}"
        )
    if bool((shape <= 0).any()):
        raise ValueError(f"spatial_shape sizes must be positive, got {shape.tolist()}")
    return shape.to(like.device)


def boxes_to_normalized_cxcywh(boxes: torch.Tensor, spatial_shape: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
    """Corner boxes in voxel index coordinates -> centre-size boxes normalised by the spatial shape.

    Args:
        boxes: corner boxes ``(..., 2 * spatial_dims)``, voxel index coordinates of the input grid,
            end exclusive.
        spatial_shape: the grid's size per axis (``spatial_dims`` ints, or a tensor ``(..., spatial_dims)``
            broadcastable against the boxes' leading dimensions, e.g. ``(B, 1, D)`` for per-sample shapes).

    Returns:
        ``(cx / S0, cy / S1, [cz / S2], w / S0, h / S1, [d / S2])``, float, same shape as ``boxes``.
    """
    d = box_spatial_dims(boxes)
    boxes = boxes if boxes.is_floating_point() else boxes.float()
    shape = _shape_tensor(spatial_shape, boxes, d)
    return corners_to_cxcywh(boxes) / torch.cat([shape, shape], dim=-1)


def normalized_cxcywh_to_boxes(
    norm_boxes: torch.Tensor, spatial_shape: Union[Sequence[int], torch.Tensor]
) -> torch.Tensor:
    """Normalised centre-size boxes -> corner boxes in voxel index coordinates (inverse of
    :func:`boxes_to_normalized_cxcywh`; no rounding, no clipping).

    Args:
        norm_boxes: ``(..., 2 * spatial_dims)`` normalised ``(cx, cy, [cz], w, h, [d])``.
        spatial_shape: the grid's size per axis (see :func:`boxes_to_normalized_cxcywh`).

    Returns:
        float corner boxes ``(..., 2 * spatial_dims)``, end exclusive.
    """
    d = box_spatial_dims(norm_boxes)
    norm_boxes = norm_boxes if norm_boxes.is_floating_point() else norm_boxes.float()
    shape = _shape_tensor(spatial_shape, norm_boxes, d)
    return cxcywh_to_corners(norm_boxes * torch.cat([shape, shape], dim=-1))


def _check_pairwise(boxes1: torch.Tensor, boxes2: torch.Tensor) -> None:
    if boxes1.dim() != 2 or boxes2.dim() != 2 or boxes1.shape[-1] != boxes2.shape[-1]:
        raise ValueError(
            "pairwise box functions take boxes1 (N, 2*D) and boxes2 (M, 2*D) with the same D, "
            f"got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    box_spatial_dims(boxes1)


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``boxes1`` with every box of ``boxes2`` (MONAI ``box_iou``).

    Args:
        boxes1: corner boxes ``(N, 2 * spatial_dims)``.
        boxes2: corner boxes ``(M, 2 * spatial_dims)``.

    Returns:
        ``(N, M)`` IoU (differentiable).
    """
    _check_pairwise(boxes1, boxes2)
    return box_iou(boxes1, boxes2)  # type: ignore[return-value]


def pairwise_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of every box of ``boxes1`` with every box of ``boxes2`` (MONAI ``box_giou``).

    Args:
        boxes1: corner boxes ``(N, 2 * spatial_dims)``.
        boxes2: corner boxes ``(M, 2 * spatial_dims)``.

    Returns:
        ``(N, M)`` GIoU in ``[-1, 1]`` (differentiable).
    """
    _check_pairwise(boxes1, boxes2)
    return box_giou(boxes1, boxes2)  # type: ignore[return-value]


def _check_elementwise(boxes1: torch.Tensor, boxes2: torch.Tensor) -> None:
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"elementwise box functions take two box tensors of the same shape, got {tuple(boxes1.shape)} "
            f"and {tuple(boxes2.shape)}"
        )
    box_spatial_dims(boxes1)


def elementwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes1[..., i]`` with ``boxes2[..., i]`` (MONAI only has the pairwise form).

    Computed in float32 (volumes of 3D boxes overflow half precision), returned in float32.
    Two empty boxes have IoU 0.

    Args:
        boxes1: corner boxes ``(..., 2 * spatial_dims)``.
        boxes2: corner boxes of the same shape.

    Returns:
        ``(...)`` IoU (differentiable).
    """
    _check_elementwise(boxes1, boxes2)
    d = boxes1.shape[-1] // 2
    b1, b2 = boxes1.float(), boxes2.float()
    size1 = (b1[..., d:] - b1[..., :d]).clamp(min=0)
    size2 = (b2[..., d:] - b2[..., :d]).clamp(min=0)
    overlap = (torch.minimum(b1[..., d:], b2[..., d:]) - torch.maximum(b1[..., :d], b2[..., :d])).clamp(min=0)
    inter = overlap.prod(-1)
    union = size1.prod(-1) + size2.prod(-1) - inter
    return inter / (union + _EPS)


def elementwise_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of ``boxes1[..., i]`` with ``boxes2[..., i]`` (MONAI ``box_pair_giou``).

    The GIoU loss is ``1 - elementwise_giou(pred, target)``. MONAI raises ``ValueError`` for boxes
    with a negative size (``x1 < x0``): select the valid (present) anatomies before calling.

    Args:
        boxes1: corner boxes ``(..., 2 * spatial_dims)``.
        boxes2: corner boxes of the same shape.

    Returns:
        ``(...)`` GIoU in ``[-1, 1]`` (differentiable), dtype of ``boxes1`` (float32 for integer boxes).
    """
    _check_elementwise(boxes1, boxes2)
    lead = boxes1.shape[:-1]
    if boxes1.numel() == 0:
        return boxes1.new_zeros(lead, dtype=boxes1.dtype if boxes1.is_floating_point() else torch.float32)
    flat1 = boxes1.reshape(-1, boxes1.shape[-1])
    flat2 = boxes2.reshape(-1, boxes2.shape[-1]).to(flat1.dtype)
    return box_pair_giou(flat1, flat2).reshape(lead)  # type: ignore[union-attr]


def boxes_to_token_mask(
    norm_boxes: torch.Tensor, grid: List[int], soft: bool = False, min_overlap: float = 1e-4
) -> torch.Tensor:
    """Rasterise normalised boxes onto a token grid: which tokens each box covers.

    Hard mode: a token belongs to a box when the box overlaps it (the analogue of max-pooling a
    mask onto the token grid), and the token holding the box centre always belongs to it, so a
    tiny or zero-size box still owns one token. Soft mode: the fraction of each token's volume
    inside the box (differentiable in the boxes), in ``[0, 1]``.

    TorchScript-compatible (the deploy wrapper pools image-only regions with it).

    Args:
        norm_boxes: ``(B, M, 2 * spatial_dims)`` normalised ``(cx, cy, [cz], w, h, [d])``.
        grid: tokens per axis, ``spatial_dims`` ints (array-axis order, like the boxes).
        soft: return fractional coverage instead of a bool mask.
        min_overlap: hard mode: the fraction of a token's extent (per axis) a box must cover to
            claim it; smaller overlaps are rounding error (a box edge exactly on a token edge).

    Returns:
        ``(B, M, prod(grid))`` bool (hard) or float coverage (soft), tokens in row-major grid order.
    """
    if norm_boxes.dim() != 3 or norm_boxes.shape[-1] != 2 * len(grid):
        raise ValueError(
            "boxes_to_token_mask: norm_boxes must be (B, M, 2 * spatial_dims) with spatial_dims = len(grid) = "
            + str(len(grid))
            + ", got shape "
            + str(list(norm_boxes.shape))
        )
    d = len(grid)
    b, m = norm_boxes.shape[0], norm_boxes.shape[1]
    boxes = norm_boxes.float()
    out = torch.ones(b, m, 1, dtype=torch.float32, device=norm_boxes.device)
    for axis in range(d):
        g = grid[axis]
        centre = boxes[:, :, axis : axis + 1]
        half = boxes[:, :, d + axis : d + axis + 1].clamp(min=0.0) * 0.5
        lo, hi = centre - half, centre + half  # (B, M, 1)
        edges = torch.arange(g + 1, dtype=torch.float32, device=norm_boxes.device) / g
        t0, t1 = edges[:-1], edges[1:]  # (g,)
        # fraction of each token's extent along this axis covered by the box
        cover = (torch.minimum(hi, t1) - torch.maximum(lo, t0)).clamp(min=0.0) * g
        if not soft:
            # overlap beyond rounding: a box edge on a token edge (e.g. voxel 8 of 8-voxel
            # patches) must not claim the next token because centre +- size/2 is inexact
            overlaps = cover > min_overlap
            # the token holding the centre (clamped into the grid, so a centre on or past the
            # border still owns the border token)
            centre_index = (centre * g).floor().clamp(0, g - 1)
            holds_centre = torch.arange(g, dtype=torch.float32, device=norm_boxes.device) == centre_index
            cover = (overlaps | holds_centre).float()
        out = (out.unsqueeze(-1) * cover.unsqueeze(2)).reshape(b, m, -1)
    if soft:
        return out
    return out > 0.5
