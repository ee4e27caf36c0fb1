"""The MONAI transform chain from a contract record to training-ready tensors.

:func:`build_transforms` returns one ``Compose`` per (modality, mode). Per sample it yields
(``M = catalog.num_anatomies``, ``S`` = ``roi_size``):

- ``image``: ``(1, *S)`` float32 MetaTensor in [0, 1];
- ``anatomy``: ``(M, *S)`` uint8 MetaTensor, one binary channel per anatomy (catalog order);
- ``anatomy_presence``: ``(M,)`` float32, PRESENT / ABSENT / UNKNOWN (``data/labels.py``);
- ``anatomy_boxes``: ``(M, 2D)`` float32, per-anatomy extent in index coordinates of the final grid
  (MONAI corner mode, end exclusive), zeros where not present;
- every other record field unchanged (``id``, ``report``, ... and what ``report_parser`` adds).

CT: load -> orient to RAS -> resample to ``spacing`` -> crop to the body -> HU window to [0, 1] ->
centre crop/pad (eval, infer) or pad + random crop (train) to ``roi_size`` -> augmentation (train) ->
boxes. CXR: load -> percentile scaling to [0, 1] -> random crop (train) -> resize to ``roi_size`` ->
augmentation (train) -> boxes. Train and eval share this one definition; eval is train without the
random transforms.
"""

from __future__ import annotations

from typing import Sequence

from typing import Any

import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    Orientationd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleCropd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandZoomd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from .catalog import Catalog, load_catalog
from .transforms import BodyForeground, DeriveAnatomyBoxesd, EnsureAnatomyd, LoadStudyd

__all__ = ["build_transforms", "default_augment", "hu_windows_to_input", "MODES", "DEFAULT_CT_SPACING", "DEFAULT_CT_ROI", "DEFAULT_CXR_SIZE"]

MODES = ("train", "eval", "infer")
DEFAULT_CT_SPACING = (4.0, 4.0, 4.0)
DEFAULT_CT_ROI = (80, 64, 64)
DEFAULT_CXR_SIZE = (224, 224)
#: HU above which a voxel counts as body when centring the CT crop (air is about -1000).
BODY_THRESHOLD_HU = -500.0

IMAGE, ANATOMY = "image", "anatomy"
SPATIAL_KEYS = (IMAGE, ANATOMY)


def default_augment(spatial_dims: int) -> dict[str, Any]:
    """Default training augmentation parameters.

    Keys: ``enabled``; ``flip_prob`` (one probability per array axis; 0 on the left-right axis, axis 0,
    because flipping swaps left and right anatomies, and for CXR also 0 on the vertical axis, which
    would swap upper and lower lung zones); ``rotate_prob``, ``rotate_range`` (radians, one value for
    every axis or one per axis); ``zoom_prob``, ``zoom_range`` (min, max); ``random_crop`` (CT: random
    ``roi_size`` crop instead of the centred one; CXR: random crop of ``crop_scale`` .. 1 of each side
    before resizing); ``noise_prob``, ``noise_std``, ``scale_prob``, ``scale_factor``, ``shift_prob``,
    ``shift_offset`` (image intensity only, on the [0, 1] scale).
    """
    ct = spatial_dims == 3
    return {
        "enabled": True,
        # CT: no flips (an upside-down or back-to-front abdomen is not a plausible scan)
        "flip_prob": (0.0, 0.0, 0.0) if ct else (0.0, 0.0),
        "rotate_prob": 0.3,
        "rotate_range": 0.1,
        # CT: no zoom (organ volume is what enlargement and atrophy findings are; a CXR zoom keeps
        # the cardiothoracic ratio)
        "zoom_prob": 0.0 if ct else 0.3,
        "zoom_range": (0.9, 1.1),
        "random_crop": True,
        "crop_scale": 0.85,
        "noise_prob": 0.15,
        "noise_std": 0.01,
        # CT: no intensity scale/shift (Hounsfield units are absolute: a 0.05 shift on the [0, 1]
        # scale is 100 HU, more than steatosis or osteopenia change); CXR exposure varies
        "scale_prob": 0.0 if ct else 0.3,
        "scale_factor": 0.1,
        "shift_prob": 0.0 if ct else 0.3,
        "shift_offset": 0.05,
    }


def _resolve_augment(augment: dict | None, spatial_dims: int) -> dict[str, Any]:
    params = default_augment(spatial_dims)
    unknown = set(augment or {}) - set(params)
    if unknown:
        raise ValueError(f"unknown augment option(s) {sorted(unknown)}; options are {sorted(params)}")
    params.update(augment or {})
    if len(tuple(params["flip_prob"])) != spatial_dims:
        raise ValueError(f"augment flip_prob needs one probability per axis ({spatial_dims}), got {params['flip_prob']!r}")
    return params


def _rotate_ranges(value: Any, spatial_dims: int) -> tuple[float, ...]:
    vals = tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),) * (1 if spatial_dims == 2 else 3)
    want = 1 if spatial_dims == 2 else 3
    if len(vals) != want:
        raise ValueError(f"augment rotate_range needs {want} value(s) for {spatial_dims}D, got {value!r}")
    return vals


def _spatial_augment(p: dict[str, Any], spatial_dims: int) -> list:
    """Random flips, rotation and zoom, applied to image and anatomy together (anatomy nearest)."""
    out: list = []
    for axis, prob in enumerate(p["flip_prob"]):
        if prob > 0:
            out.append(RandFlipd(SPATIAL_KEYS, prob=float(prob), spatial_axis=axis))
    if p["rotate_prob"] > 0:
        ranges = _rotate_ranges(p["rotate_range"], spatial_dims)
        names = ("range_x", "range_y", "range_z")[: len(ranges)]
        out.append(
            RandRotated(
                SPATIAL_KEYS,
                prob=float(p["rotate_prob"]),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",  # 0 is air (CT, after windowing) / black (CXR): outside the scan
                keep_size=True,
                dtype=torch.float32,
                **dict(zip(names, ranges)),
            )
        )
    if p["zoom_prob"] > 0:
        lo, hi = p["zoom_range"]
        out.append(
            RandZoomd(
                SPATIAL_KEYS,
                prob=float(p["zoom_prob"]),
                min_zoom=float(lo),
                max_zoom=float(hi),
                mode=("trilinear" if spatial_dims == 3 else "bilinear", "nearest-exact"),
                padding_mode="constant",  # zero padding: edge padding would smear anatomy labels outward
                keep_size=True,
            )
        )
    return out


def _intensity_augment(p: dict[str, Any]) -> list:
    """Random noise / scale / shift on the image only, then clipping back to [0, 1]."""
    out: list = []
    if p["noise_prob"] > 0:
        out.append(RandGaussianNoised(IMAGE, prob=float(p["noise_prob"]), std=float(p["noise_std"]), dtype=torch.float32))
    if p["scale_prob"] > 0:
        out.append(RandScaleIntensityd(IMAGE, factors=float(p["scale_factor"]), prob=float(p["scale_prob"])))
    if p["shift_prob"] > 0:
        out.append(RandShiftIntensityd(IMAGE, offsets=float(p["shift_offset"]), prob=float(p["shift_prob"])))
    if out:
        out.append(ScaleIntensityRanged(IMAGE, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True))
    return out


def hu_windows_to_input(windows_hu: Sequence[Sequence[float]] | None, hu_window: Sequence[float]) -> list[list[float]] | None:
    """CT windows given in HU, as the model's ``input_windows`` (the units of the input after
    ``hu_window`` is mapped to ``[0, 1]``): e.g. ``[[-150, 250]]`` with ``hu_window`` ``(-1000, 1000)``
    is ``[[0.425, 0.625]]``. ``None`` or empty: ``None``."""
    if not windows_hu:
        return None
    lo, hi = _hu_range(hu_window, "hu_window")
    out = []
    for w in windows_hu:
        a, b = _hu_range(w, "a CT window")
        out.append([(a - lo) / (hi - lo), (b - lo) / (hi - lo)])
    return out


def _hu_range(value: Sequence[float], name: str) -> tuple[float, float]:
    """``(low, high)`` HU as floats; a clear error unless ``high > low``."""
    lo, hi = (float(v) for v in value)
    if not hi > lo:
        raise ValueError(f"{name} must be (low, high) with high > low, got {tuple(value)!r}")
    return lo, hi


def build_transforms(
    catalog: Catalog | str | dict,
    mode: str = "train",
    spacing: tuple[float, ...] | None = None,
    roi_size: tuple[int, ...] | None = None,
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    augment: dict | None = None,
    report_parser: Any = None,
    intensity_percentiles: tuple[float, float] = (0.5, 99.5),
) -> Compose:
    """The whole record -> tensors chain for the catalog's modality.

    Args:
        catalog: anatomy catalog (its ``modality`` / ``spatial_dims`` choose the CT or CXR chain).
        mode: ``"train"`` (random crop and augmentation), ``"eval"`` (deterministic) or ``"infer"``
            (deterministic; records need no masks: anatomies without any are all-zero / UNKNOWN).
        spacing: CT target spacing in mm (default ``(4, 4, 4)``); ignored for CXR.
        roi_size: output spatial size (CT default ``(80, 64, 64)``, CXR ``(224, 224)``).
        hu_window: CT HU range mapped to [0, 1] (clipped).
        augment: overrides of :func:`default_augment` (train mode only; ``{"enabled": False}`` turns
            every random transform off).
        report_parser: optional MapTransform (``text.reports.ParseReportd(catalog)``) inserted right
            after loading.
        intensity_percentiles: CXR lower/upper percentiles mapped to 0 and 1 (``(0, 100)`` = min-max).

    Returns:
        ``monai.transforms.Compose`` producing ``image``, ``anatomy``, ``anatomy_presence``,
        ``anatomy_boxes`` and the record's other fields.
    """
    catalog = load_catalog(catalog)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    spatial_dims = catalog.spatial_dims
    train = mode == "train"
    aug = _resolve_augment(augment, spatial_dims)
    randomise = train and bool(aug["enabled"])

    # records without masks, label map or boxes (e.g. at inference) get their empty anatomy channels
    # on the final grid (EnsureAnatomyd), not resampled from the input grid
    chain: list = [LoadStudyd(catalog, keys=IMAGE, defer_empty=True)]
    if report_parser is not None:
        chain.append(report_parser)

    if spatial_dims == 3:
        spacing = tuple(float(s) for s in (spacing or DEFAULT_CT_SPACING))
        roi = tuple(int(r) for r in (roi_size or DEFAULT_CT_ROI))
        if len(spacing) != 3 or len(roi) != 3:
            raise ValueError(f"CT needs 3 spacing values and a 3D roi_size, got {spacing!r}, {roi!r}")
        lo, hi = _hu_range(hu_window, "hu_window")
        chain += [
            Orientationd(SPATIAL_KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
            Spacingd(SPATIAL_KEYS, pixdim=spacing, mode=("bilinear", "nearest"), dtype=torch.float32, allow_missing_keys=True),
            # Centre on the body: crop to its bounding box first, so that the final centre crop/pad
            # (or the random crop) is taken around the patient, not around air.
            CropForegroundd(
                SPATIAL_KEYS,
                source_key=IMAGE,
                select_fn=BodyForeground(BODY_THRESHOLD_HU),
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
                allow_missing_keys=True,
            ),
            ScaleIntensityRanged(IMAGE, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        ]
        if randomise and aug["random_crop"]:
            chain += [
                SpatialPadd(SPATIAL_KEYS, spatial_size=roi, allow_missing_keys=True),
                RandSpatialCropd(SPATIAL_KEYS, roi_size=roi, random_size=False, allow_missing_keys=True),
            ]
        else:
            chain.append(ResizeWithPadOrCropd(SPATIAL_KEYS, spatial_size=roi, allow_missing_keys=True))
    else:
        roi = tuple(int(r) for r in (roi_size or DEFAULT_CXR_SIZE))
        if len(roi) != 2:
            raise ValueError(f"CXR needs a 2D roi_size, got {roi!r}")
        low_pct, high_pct = intensity_percentiles
        chain.append(ScaleIntensityRangePercentilesd(IMAGE, lower=low_pct, upper=high_pct, b_min=0.0, b_max=1.0, clip=True))
        if randomise and aug["random_crop"]:
            chain.append(
                RandScaleCropd(SPATIAL_KEYS, roi_scale=float(aug["crop_scale"]), max_roi_scale=1.0, random_size=True, allow_missing_keys=True)
            )
        chain.append(
            Resized(
                SPATIAL_KEYS,
                spatial_size=roi,
                mode=("bilinear", "nearest-exact"),
                anti_aliasing=(True, False),  # smooth the image before shrinking it; labels stay crisp
                allow_missing_keys=True,
            )
        )
    chain.append(EnsureAnatomyd(catalog.num_anatomies, ANATOMY, IMAGE))
    if randomise:
        chain += _spatial_augment(aug, spatial_dims)
        chain += _intensity_augment(aug)
    chain += [
        CastToTyped(ANATOMY, dtype=torch.uint8),
        CastToTyped(IMAGE, dtype=torch.float32),
        DeriveAnatomyBoxesd(ANATOMY),
    ]
    return Compose(chain)
