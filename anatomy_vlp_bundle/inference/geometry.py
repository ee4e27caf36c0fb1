"""Boxes and label maps from the model's grid back to the input image's own space.

The model sees the image after the inference chain of :func:`~anatomy_vlp_bundle.data.pipeline.build_transforms`
(CT: RAS orientation, resampling, body crop, centre crop/pad; CXR: resize). Its boxes are corner
boxes in index coordinates of that grid, end exclusive, voxel ``i`` spanning ``[i, i + 1)``.

CT: the preprocessed grid's ``affine`` (MONAI tracks it through every spatial transform) maps its
voxel centres to RAS millimetres, the loaded image's affine maps the input's own voxel centres
there; a box goes through world space onto the input's voxels (``box_voxel``: the voxels whose
centres fall inside, start inclusive, end exclusive) and ``box_world`` is the RAS bounding box of
those voxels' edges (``../shared/DATA_CONTRACT.md``). Label maps are resampled by physical
position (nearest neighbour) with MONAI's ``SpatialResample``.

CXR: the chain only resizes, so boxes scale by ``input size / model size`` per axis
(``box_pixel`` ``[x_min, y_min, x_max, y_max]``, x = column).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

__all__ = ["grid_box_to_world", "world_box_to_voxels", "voxel_box_to_world", "grid_box_to_pixels", "resample_to_input"]


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``(2^d, d)`` corners of the box ``[lo, hi]``."""
    return np.array([[hi[a] if bit else lo[a] for a, bit in enumerate(bits)] for bits in itertools.product((0, 1), repeat=len(lo))])


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(P, 3)`` points through a 4x4 affine."""
    homo = np.concatenate([points, np.ones((points.shape[0], 1))], axis=1)
    return (homo @ np.asarray(affine, dtype=np.float64).T)[:, :3]


def grid_box_to_world(box: Sequence[float], affine: np.ndarray) -> np.ndarray:
    """Corner box on a grid (edges, voxel ``i`` = ``[i, i + 1)``) -> ``(2^d, d)`` world corner points."""
    b = np.asarray(box, dtype=np.float64)
    d = b.size // 2
    # box edge coordinate c is index coordinate c - 0.5 (voxel centres at integer indices)
    return _apply(affine, _corners(b[:d] - 0.5, b[d:] - 0.5))


def world_box_to_voxels(points: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> list[int]:
    """World points -> ``[i0, j0, k0, i1, j1, k1]`` voxel box of the grid (``affine``, ``shape``):
    the voxels whose centres lie inside the points' bounding box in index space, clipped to the grid."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    idx = _apply(inv, points)
    lo, hi = idx.min(0), idx.max(0)
    eps = 1e-6
    start = np.ceil(lo - eps).astype(int)
    end = np.floor(hi + eps).astype(int) + 1
    shape = np.asarray(shape, dtype=int)
    start = np.clip(start, 0, shape)
    end = np.clip(end, start, shape)
    return [int(v) for v in start] + [int(v) for v in end]


def voxel_box_to_world(voxel_box: Sequence[int], affine: np.ndarray) -> list[float]:
    """``[i0, j0, k0, i1, j1, k1]`` (end exclusive) -> the RAS bounding box of those voxels' edges."""
    v = np.asarray(voxel_box, dtype=np.float64)
    d = v.size // 2
    pts = _apply(affine, _corners(v[:d] - 0.5, v[d:] - 0.5))
    return [float(x) for x in pts.min(0)] + [float(x) for x in pts.max(0)]


def grid_box_to_pixels(box: Sequence[float], grid_shape: Sequence[int], input_shape: Sequence[int]) -> list[int]:
    """CXR: a box on the resized grid -> ``[x_min, y_min, x_max, y_max]`` pixels of the input (max exclusive)."""
    b = np.asarray(box, dtype=np.float64)
    d = b.size // 2
    scale = np.asarray(input_shape, dtype=np.float64) / np.asarray(grid_shape, dtype=np.float64)
    lo = np.floor(b[:d] * scale + 1e-6).astype(int)
    hi = np.ceil(b[d:] * scale - 1e-6).astype(int)
    size = np.asarray(input_shape, dtype=int)
    lo = np.clip(lo, 0, size)
    hi = np.clip(hi, lo, size)
    return [int(v) for v in lo] + [int(v) for v in hi]


def resample_to_input(label: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int]) -> torch.Tensor:
    """``(1, *S)`` label map on the model grid -> ``(1, *dst_shape)`` on the input grid, by physical
    position (nearest neighbour; outside the model's field of view: 0)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = MetaTensor(label.float(), affine=torch.as_tensor(np.asarray(src_affine), dtype=torch.float64))
    out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float64)(
        src, dst_affine=torch.as_tensor(np.asarray(dst_affine), dtype=torch.float64), spatial_size=[int(s) for s in dst_shape]
    )
    return torch.as_tensor(out).round().to(torch.int16)
