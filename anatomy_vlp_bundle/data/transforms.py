"""MONAI dictionary transforms that turn a contract record into anatomy tensors.

- :class:`LoadStudyd` loads ``image`` and builds ``anatomy`` (one binary channel per catalog anatomy, on
  the image grid) and ``anatomy_presence`` from the record's ``anatomy_masks``, ``anatomy_mask`` and
  ``anatomy_boxes`` (``DATA_CONTRACT.md``: per anatomy a binary mask wins over the label map, which
  wins over a box).
- :class:`DeriveAnatomyBoxesd` runs after the last spatial transform and turns the ``anatomy`` channels
  into ``anatomy_boxes`` (index coordinates of the final grid) and the sample's ``anatomy_presence``.

The geometry lives in pure functions (:func:`mask_extents`, :func:`rasterise_world_box`,
:func:`rasterise_pixel_box`, :func:`foreground_outside_fraction`, :func:`align_mask_to_image`) so that
the validator and inference can reuse them.

Shapes: ``D`` spatial dims (3 for CT, 2 for CXR), ``S`` the spatial shape, ``M`` the number of catalog
anatomies. CT arrays are ``(C, X, Y, Z)`` with a RAS affine; CXR arrays ``(C, W, H)`` (axis 0 = x =
column) with affine ``diag(sx, sy, 1, 1)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform, ResampleToMatch

from .catalog import Catalog, load_catalog
from .labels import ABSENT, PRESENT, UNKNOWN
from .readers import ImageReadError, load_mask_image, load_study_image

__all__ = [
    "LoadStudyd",
    "EnsureAnatomyd",
    "DeriveAnatomyBoxesd",
    "BodyForeground",
    "build_anatomy",
    "align_mask_to_image",
    "foreground_outside_fraction",
    "rasterise_world_box",
    "rasterise_pixel_box",
    "mask_extents",
]

#: Foreground voxels sampled for the "belongs to another scan" check (a strided subset beyond this).
_MAX_CHECKED_VOXELS = 200_000


# --------------------------------------------------------------------------------------------- geometry
def _affine(img: MetaTensor | torch.Tensor, spatial_dims: int) -> np.ndarray:
    """The ``(D+1, D+1)`` voxel-index -> world affine of a MetaTensor as float64 numpy."""
    aff = img.affine if isinstance(img, MetaTensor) else torch.eye(spatial_dims + 1)
    return np.asarray(to_affine_nd(spatial_dims, np.asarray(aff, dtype=np.float64)), dtype=np.float64)


def mask_extents(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel extent of a mask in index coordinates.

    Args:
        mask: ``(M, *S)``, nonzero = inside.

    Returns:
        ``boxes`` ``(M, 2D)`` float32 in MONAI corner mode (``StandardMode``: ``xyxy`` / ``xyzxyz`` in the
        array's axis order), start inclusive, end exclusive (indices 10..19 -> 10, 20), zeros for empty
        channels; ``nonempty`` ``(M,)`` bool.
    """
    mask = torch.as_tensor(mask)
    # uint8 max-reductions are several times faster than bool any() on CPU; reducing the leading
    # (outer, contiguous) spatial axes first keeps every pass cheap.
    fg = mask.to(torch.uint8) if mask.dtype in (torch.bool, torch.uint8) else (mask != 0).to(torch.uint8)
    spatial_dims = fg.ndim - 1
    starts, ends = [], []
    for axis in range(1, fg.ndim):
        proj = fg.amax(dim=tuple(range(1, axis))) if axis > 1 else fg
        if proj.ndim > 2:
            proj = proj.flatten(2).amax(dim=2)  # (M, n_axis): which indices along `axis` hold foreground
        n = proj.shape[1]
        first = proj.argmax(dim=1)  # argmax returns the first maximal index
        last = n - proj.flip(dims=[1]).argmax(dim=1)  # one past the last foreground index
        starts.append(first)
        ends.append(last)
    nonempty = proj.amax(dim=1) > 0 if n else torch.zeros(fg.shape[0], dtype=torch.bool)
    boxes = torch.cat([torch.stack(starts, 1), torch.stack(ends, 1)], dim=1).to(torch.float32)
    boxes[~nonempty] = 0.0
    return boxes, nonempty


def foreground_outside_fraction(mask: MetaTensor, image: MetaTensor, spatial_dims: int) -> float:
    """Fraction of ``mask``'s foreground voxels whose centres lie outside ``image``'s extent (by world position).

    The image extent runs from the outer edge of its first voxel to the outer edge of its last one
    (index ``-0.5 .. n - 0.5`` per axis). Returns 0 for an empty mask.
    """
    idx = torch.nonzero(torch.as_tensor(mask)[0] != 0)
    if idx.shape[0] == 0:
        return 0.0
    if idx.shape[0] > _MAX_CHECKED_VOXELS:
        idx = idx[:: idx.shape[0] // _MAX_CHECKED_VOXELS + 1]
    pts = np.concatenate([idx.numpy().astype(np.float64), np.ones((idx.shape[0], 1))], axis=1)
    mask_to_image = np.linalg.inv(_affine(image, spatial_dims)) @ _affine(mask, spatial_dims)
    in_image = (pts @ mask_to_image.T)[:, :spatial_dims]
    shape = np.asarray(image.shape[1:], dtype=np.float64)
    inside = np.all((in_image >= -0.5) & (in_image <= shape - 0.5), axis=1)
    return float(1.0 - inside.mean())


def align_mask_to_image(
    mask: MetaTensor,
    image: MetaTensor,
    path: str | Path,
    spatial_dims: int,
    max_outside_fraction: float = 0.5,
) -> MetaTensor:
    """Bring a mask or label map onto ``image``'s grid by physical position (nearest neighbour).

    Args:
        mask: ``(1, *S_mask)`` with its own affine (any orientation, spacing or cropped region).
        image: ``(C, *S)`` the target grid.
        path: the mask's file (for error messages).
        spatial_dims: 3 (CT) or 2 (CXR).
        max_outside_fraction: more of the mask's foreground than this outside the image is an error.

    Returns:
        ``(1, *S)`` with the mask's values (label values preserved) and the image's affine.

    Raises:
        ImageReadError: naming ``path`` when the mask belongs to another scan (foreground mostly outside
        the image), or, for 2D images or masks without usable pixel spacing, when the sizes differ.
    """
    image_shape = tuple(image.shape[1:])
    if spatial_dims == 2 and not (image.meta.get("spacing_known", False) and mask.meta.get("spacing_known", False)):
        # Without physical spacing on both sides the only meaningful correspondence is pixel for pixel.
        if tuple(mask.shape[1:]) != image_shape:
            w, h = image_shape
            mw, mh = mask.shape[1:]
            raise ImageReadError(
                f"{path}: mask is {mw}x{mh} pixels but the image is {w}x{h}; without usable pixel spacing a "
                "mask must have the image's pixel size"
            )
        return MetaTensor(torch.as_tensor(mask).clone(), affine=image.affine.clone(), meta=_meta_without_affine(image))
    outside = foreground_outside_fraction(mask, image, spatial_dims)
    if outside > max_outside_fraction:
        raise ImageReadError(
            f"{path}: {100 * outside:.0f}% of the mask's foreground lies outside the image "
            f"({image.meta.get('filename_or_obj', 'image')}): it belongs to another scan"
        )
    same_grid = tuple(mask.shape[1:]) == image_shape and np.allclose(
        _affine(mask, spatial_dims), _affine(image, spatial_dims), atol=1e-4
    )
    if same_grid:
        out = torch.as_tensor(mask).clone()
    else:
        resampler = ResampleToMatch(mode="nearest", padding_mode="zeros", dtype=torch.float32)
        out = resampler(MetaTensor(torch.as_tensor(mask).to(torch.float32), affine=mask.affine), img_dst=image)
        out = torch.as_tensor(out).round().to(mask.dtype if not mask.dtype.is_floating_point else torch.float32)
    return MetaTensor(out, affine=image.affine.clone(), meta=_meta_without_affine(image))


def rasterise_world_box(box: Sequence[float], image: MetaTensor) -> torch.Tensor:
    """Fill a world-RAS box on a 3D image grid.

    Args:
        box: ``[xmin, ymin, zmin, xmax, ymax, zmax]`` RAS millimetres spanning voxel edges.
        image: ``(C, X, Y, Z)`` with its RAS affine.

    Returns:
        ``(X, Y, Z)`` bool: voxels whose centres lie in ``[min, max)`` on every world axis (for an
        oblique grid this is the box rotated into voxel space).
    """
    shape = tuple(image.shape[1:])
    lo_w, hi_w = np.asarray(box[:3], dtype=np.float64), np.asarray(box[3:], dtype=np.float64)
    aff = _affine(image, 3)
    inv = np.linalg.inv(aff)
    corners = np.array([[*c, 1.0] for c in itertools.product(*zip(lo_w, hi_w))])  # the 8 box corners
    corner_idx = (corners @ inv.T)[:, :3]
    # Only the index block that can hold voxels of the box is tested (full volumes are large).
    start = np.clip(np.floor(corner_idx.min(0)).astype(int), 0, shape)
    stop = np.clip(np.ceil(corner_idx.max(0)).astype(int) + 1, 0, shape)
    out = torch.zeros(shape, dtype=torch.bool)
    if np.any(stop <= start):
        return out
    grids = np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(start, stop)], indexing="ij")
    centres = np.stack(grids, -1) @ aff[:3, :3].T + aff[:3, 3]
    tol = 1e-6 * float(np.abs(aff[:3, :3]).max())
    inside = np.all((centres >= lo_w - tol) & (centres < hi_w - tol), axis=-1)
    out[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = torch.from_numpy(inside)
    return out


def rasterise_pixel_box(box: Sequence[float], shape: Sequence[int]) -> torch.Tensor:
    """Fill a pixel box on a 2D image grid.

    Args:
        box: ``[x_min, y_min, x_max, y_max]`` in pixels of the stored image (x = column, origin at the
            top-left corner of the top-left pixel, max exclusive: pixels 10..19 -> 10, 20).
        shape: ``(W, H)`` the image's spatial shape (axis 0 = x).

    Returns:
        ``(W, H)`` bool: pixels whose centres ``i + 0.5`` lie in ``[min, max)``, clipped to the image.
    """
    out = torch.zeros(tuple(shape), dtype=torch.bool)
    x0, y0, x1, y1 = (float(v) for v in box)
    ranges = []
    for lo, hi, n in ((x0, x1, shape[0]), (y0, y1, shape[1])):
        a = int(np.clip(np.ceil(lo - 0.5), 0, n))
        b = int(np.clip(np.ceil(hi - 0.5), 0, n))
        ranges.append((a, b))
    (a0, b0), (a1, b1) = ranges
    out[a0:b0, a1:b1] = True
    return out


def _meta_without_affine(img: MetaTensor) -> dict:
    meta = dict(img.meta) if isinstance(img, MetaTensor) else {}
    meta.pop("affine", None)
    return meta


def _check_box(box: Any, spatial_dims: int, where: str) -> list[float]:
    n = 2 * spatial_dims
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a box must be {n} numbers, got {box!r}") from None
    if len(vals) != n or not all(np.isfinite(vals)):
        raise ValueError(f"{where}: a box must be {n} finite numbers, got {box!r}")
    if any(vals[i + spatial_dims] <= vals[i] for i in range(spatial_dims)):
        raise ValueError(f"{where}: box max must exceed min on every axis, got {box!r}")
    return vals


# --------------------------------------------------------------------------------------------- building
def build_anatomy(
    catalog: Catalog,
    image: MetaTensor,
    label_map: str | Path | None = None,
    masks: Mapping[str, str | Path] | None = None,
    boxes: Mapping[str, Sequence[float]] | None = None,
    max_outside_fraction: float = 0.5,
    record_id: str = "",
) -> tuple[MetaTensor, torch.Tensor]:
    """Build the anatomy channels of one record on the image grid.

    Precedence per anatomy: a binary mask in ``masks``, else the label map when the anatomy has
    ``labels``, else a box in ``boxes``. Names the catalog does not know are ignored (the validator
    reports them); label values no anatomy lists are ignored.

    Args:
        catalog: the anatomy catalog (row order of the outputs).
        image: ``(1, *S)`` loaded image (its affine is the target grid).
        label_map: integer label map file (``anatomy_mask``).
        masks: anatomy name -> binary mask file (``anatomy_masks``); nonzero = inside.
        boxes: anatomy name -> box (``anatomy_boxes``; CT world RAS mm, CXR pixels).
        max_outside_fraction: see :func:`align_mask_to_image`.
        record_id: for error messages.

    Returns:
        ``anatomy`` ``(M, *S)`` uint8 MetaTensor (image affine and meta) and ``presence`` ``(M,)``
        float32: PRESENT where the mask/box is given and non-empty on the image grid, ABSENT where the
        label map decides and holds none of the anatomy's labels, UNKNOWN otherwise.
    """
    spatial_dims = catalog.spatial_dims
    shape = tuple(image.shape[1:])
    if len(shape) != spatial_dims:
        raise ValueError(f"record {record_id!r}: image has {len(shape)} spatial dims, catalog {catalog.name!r} needs {spatial_dims}")
    num = catalog.num_anatomies
    channels = torch.zeros((num, *shape), dtype=torch.uint8)
    presence = torch.full((num,), float(UNKNOWN), dtype=torch.float32)
    decided: set[int] = set()
    known = set(catalog.names)

    for name, path in (masks or {}).items():
        if name not in known or not path:
            continue
        row = catalog.index(name)
        raw = load_mask_image(path, spatial_dims)
        binary = MetaTensor((torch.as_tensor(raw) > 0).to(torch.uint8), affine=raw.affine, meta=_meta_without_affine(raw))
        on_grid = align_mask_to_image(binary, image, path, spatial_dims, max_outside_fraction)
        channels[row] = torch.as_tensor(on_grid[0]) > 0
        presence[row] = PRESENT if bool(channels[row].any()) else UNKNOWN
        decided.add(row)

    if label_map:
        rows_by_labels = [(i, a.labels) for i, a in enumerate(catalog.anatomies) if a.labels and i not in decided]
        if rows_by_labels:
            raw = load_mask_image(label_map, spatial_dims)
            values = torch.as_tensor(raw)
            if values.dtype.is_floating_point:
                bad = values[values != torch.round(values)]
                if bad.numel():
                    raise ImageReadError(
                        f"{label_map}: label map holds non-integer values (e.g. {float(bad[0]):g}); "
                        "labels must be integers"
                    )
            on_grid = torch.as_tensor(align_mask_to_image(raw, image, label_map, spatial_dims, max_outside_fraction)[0])
            # label value -> anatomy row through a lookup table (one pass instead of one isin per anatomy);
            # catalogs give each label to at most one anatomy, values nobody lists map to -1.
            max_label = max(v for _, labels in rows_by_labels for v in labels)
            lut = torch.full((max_label + 2,), -1, dtype=torch.int64)
            for row, labels in rows_by_labels:
                lut[list(labels)] = row
            values = on_grid.to(torch.int64).clamp_(-1, max_label + 1)  # out-of-range -> the -1 slots
            row_map = lut[values]
            for row, _ in rows_by_labels:
                channels[row] = row_map == row
                presence[row] = PRESENT if bool(channels[row].any()) else ABSENT
                decided.add(row)

    for name, box in (boxes or {}).items():
        if name not in known:
            continue
        row = catalog.index(name)
        if row in decided:
            continue
        vals = _check_box(box, spatial_dims, f"record {record_id!r} anatomy_boxes[{name!r}]")
        filled = rasterise_world_box(vals, image) if spatial_dims == 3 else rasterise_pixel_box(vals, shape)
        channels[row] = filled
        presence[row] = PRESENT if bool(filled.any()) else UNKNOWN
        decided.add(row)

    meta = _meta_without_affine(image)
    # Without a file name: MONAI's Spacingd treats every key starting with "<key>_" as a meta dict of a
    # NIfTI-named tensor and would try to .update() "anatomy_presence" / "anatomy_boxes".
    meta.pop("filename_or_obj", None)
    anatomy = MetaTensor(channels, affine=image.affine.clone(), meta=meta)
    return anatomy, presence


class LoadStudyd(MapTransform):
    """Load a record's image and build its anatomy channels on the image grid.

    Reads ``data[key]`` (a path, or an already loaded channel-first MetaTensor) with
    :func:`~anatomy_vlp_bundle.data.readers.load_study_image`, then :func:`build_anatomy` from the
    record's ``anatomy_masks`` / ``anatomy_mask`` / ``anatomy_boxes``; those three record fields are
    consumed (the box dict is replaced later by the ``anatomy_boxes`` tensor). Other fields pass through.

    Output (``M = catalog.num_anatomies``, ``S`` the image's spatial shape):
        ``image``: ``(1, *S)`` float32 MetaTensor (CT in HU, CXR raw gray);
        ``anatomy``: ``(M, *S)`` uint8 MetaTensor on the same grid;
        ``anatomy_presence``: ``(M,)`` float32 (PRESENT / ABSENT / UNKNOWN), the sample's state of which
        anatomies are known present, updated by :class:`DeriveAnatomyBoxesd`.

    Args:
        catalog: a :class:`Catalog` or anything :func:`load_catalog` accepts.
        modality: ``"CT"`` or ``"CXR"``; defaults to ``catalog.modality``.
        keys: the image key.
        anatomy_key, presence_key: output keys.
        label_map_key, masks_key, boxes_key: record fields holding the label map path, the
            name -> mask path dict and the name -> box dict.
        max_outside_fraction: a mask with more of its foreground outside the image is an error.
        allow_missing_keys: skip records without an image instead of raising.
        defer_empty: a record with no mask, label map or box gets no ``anatomy`` here (its presence is
            all UNKNOWN, as it would be); :class:`EnsureAnatomyd` adds the empty channels after the
            spatial transforms, on the final grid. Why: at inference the channels are empty, and
            ``M`` empty channels on a 512 x 512 x 300 CT grid are 0.9 GB as uint8 and 3.5 GB once
            resampled in float32 (measured: the ``infer`` command peaked at 5.1 GB, 15 s of its 16.5 s
            in resampling them).
    """

    def __init__(
        self,
        catalog: Catalog | str | dict,
        modality: str | None = None,
        keys: KeysCollection = "image",
        anatomy_key: str = "anatomy",
        presence_key: str = "anatomy_presence",
        label_map_key: str = "anatomy_mask",
        masks_key: str = "anatomy_masks",
        boxes_key: str = "anatomy_boxes",
        max_outside_fraction: float = 0.5,
        allow_missing_keys: bool = False,
        defer_empty: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.defer_empty = bool(defer_empty)
        self.catalog = load_catalog(catalog)
        self.modality = (modality or self.catalog.modality).upper()
        if (self.modality == "CT") != (self.catalog.spatial_dims == 3):
            raise ValueError(f"modality {self.modality!r} does not match catalog {self.catalog.name!r} ({self.catalog.modality})")
        self.anatomy_key = anatomy_key
        self.presence_key = presence_key
        self.label_map_key = label_map_key
        self.masks_key = masks_key
        self.boxes_key = boxes_key
        self.max_outside_fraction = max_outside_fraction

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label_map = d.pop(self.label_map_key, None)
        masks = d.pop(self.masks_key, None) or {}
        boxes = d.pop(self.boxes_key, None) or {}
        if not isinstance(masks, Mapping) or not isinstance(boxes, Mapping):
            raise ValueError(f"record {d.get('id', '?')!r}: '{self.masks_key}' and '{self.boxes_key}' must be dicts keyed by anatomy name")
        for key in self.key_iterator(d):
            image = d[key]
            if isinstance(image, (str, Path)):
                image = load_study_image(image, self.modality)
            elif not isinstance(image, MetaTensor):
                raise TypeError(f"record {d.get('id', '?')!r}: '{key}' must be a path or a channel-first MetaTensor")
            if self.defer_empty and not label_map and not masks and not boxes:
                d[key] = image
                d.pop(self.anatomy_key, None)
                d[self.presence_key] = torch.full((self.catalog.num_anatomies,), float(UNKNOWN), dtype=torch.float32)
                continue
            anatomy, presence = build_anatomy(
                self.catalog,
                image,
                label_map=label_map,
                masks=masks,
                boxes=boxes,
                max_outside_fraction=self.max_outside_fraction,
                record_id=str(d.get("id", "")),
            )
            d[key] = image
            d[self.anatomy_key] = anatomy
            d[self.presence_key] = presence
        return d


class EnsureAnatomyd(MapTransform):
    """Add empty anatomy channels where a record has none (see ``LoadStudyd(defer_empty=True)``).

    ``anatomy`` ``(M, *S)`` uint8 zeros on the image's current grid, with a copy of the image's
    metadata and transform trace (as the channels would carry had they gone through the same
    spatial transforms), so that batches mixing records with and without masks collate.

    Args:
        num_anatomies: ``M``.
        keys: the anatomy key.
        image_key: the image whose grid the channels take.
    """

    def __init__(self, num_anatomies: int, keys: KeysCollection = "anatomy", image_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.num_anatomies = int(num_anatomies)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            if key in d:
                continue
            image = d[self.image_key]
            zeros = torch.zeros((self.num_anatomies, *image.shape[1:]), dtype=torch.uint8)
            if isinstance(image, MetaTensor):
                zeros = MetaTensor(zeros, meta=dict(image.meta), applied_operations=list(image.applied_operations))
            d[key] = zeros
        return d


class BodyForeground:
    """``select_fn`` for ``CropForegroundd``: voxels above ``threshold`` (HU for CT), or every voxel when
    none is (an empty selection would crop the volume to nothing). A class, not a lambda, so that data
    loader workers can pickle it."""

    def __init__(self, threshold: float = -500.0):
        self.threshold = threshold

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        sel = img > self.threshold
        return sel if bool(sel.any()) else torch.ones_like(sel)


class DeriveAnatomyBoxesd(MapTransform):
    """Derive per-anatomy boxes and the sample's presence from the anatomy channels.

    Run after the last spatial transform. For ``anatomy`` ``(M, *S)``:

    - ``anatomy_boxes`` ``(M, 2D)`` float32: each channel's extent in index coordinates of the current
      grid, MONAI corner mode (``xyzxyz`` / ``xyxy`` in array axis order), start inclusive, end
      exclusive; zeros where the channel is empty.
    - ``anatomy_presence`` ``(M,)`` float32: PRESENT where the channel is non-empty; an anatomy that was
      PRESENT before but whose channel is now empty (cropped out of view) becomes ABSENT in this sample;
      ABSENT and UNKNOWN stay as they were.
    - ``findings`` ``(M, F)`` (if present as a tensor/array): rows of anatomies that went out of view are
      set to UNKNOWN (their findings are not visible in this sample).

    Args:
        keys: the anatomy key (one key).
        presence_key, boxes_key, findings_key: keys read/written.
        allow_missing_keys: skip samples without ``anatomy``.
    """

    def __init__(
        self,
        keys: KeysCollection = "anatomy",
        presence_key: str = "anatomy_presence",
        boxes_key: str = "anatomy_boxes",
        findings_key: str = "findings",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("DeriveAnatomyBoxesd takes exactly one anatomy key")
        self.presence_key = presence_key
        self.boxes_key = boxes_key
        self.findings_key = findings_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            boxes, nonempty = mask_extents(torch.as_tensor(d[key]))
            before = d.get(self.presence_key)
            if before is None:
                before = torch.full(nonempty.shape, float(UNKNOWN))
            before = torch.as_tensor(before, dtype=torch.float32)
            presence = torch.where(
                nonempty,
                torch.tensor(float(PRESENT)),
                torch.where(before == UNKNOWN, torch.tensor(float(UNKNOWN)), torch.tensor(float(ABSENT))),
            )
            went_out_of_view = (before == PRESENT) & ~nonempty
            d[self.boxes_key] = boxes
            d[self.presence_key] = presence
            findings = d.get(self.findings_key)
            if isinstance(findings, (torch.Tensor, np.ndarray)) and findings.ndim == 2 and findings.shape[0] == nonempty.shape[0]:
                if bool(went_out_of_view.any()):
                    findings = torch.as_tensor(findings).clone()
                    findings[went_out_of_view] = UNKNOWN
                    d[self.findings_key] = findings
        return d
