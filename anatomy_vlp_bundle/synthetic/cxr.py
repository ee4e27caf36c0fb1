"""Synthetic chest radiographs: digitally reconstructed radiographs (DRR) of a 3D chest phantom.

Each case is a coarse 3D attenuation volume (linear attenuation per mm at a diagnostic effective
energy) holding the body, chest wall, lungs (air-filled hemithoraces with branching vessel
markings), heart, mediastinum, aorta (ascending, arch, descending), superior vena cava, trachea
and main bronchi, hila, spine, ribs, clavicles, humeral heads, hemidiaphragm domes and the upper
abdomen with the gastric air bubble. The radiograph integrates the attenuation along the
antero-posterior axis (a parallel-beam PA projection), adds scatter and quantum noise and maps
``-log(transmission)`` through a film-like characteristic curve (Beer-Lambert: dense structures
such as bone and the heart are bright, the lungs dark). Anatomy masks are projected the same way:
a pixel belongs to an anatomy when its ray crosses it, so the heart overlaps the lungs and the
zones nest inside their lung. Zones, apical zones, costophrenic angles and the upper mediastinum
are then derived from the projected masks, as Chest ImaGenome defines them on the image.

Coordinates (millimetres): the *scanner* frame has its origin at the detector centre, ``z`` grows
toward the feet (image rows, head at the top), ``y`` grows posteriorly (the beam direction of a PA
view) and ``x`` grows toward the patient's LEFT (image columns), so the patient's right is on the
image's left, as a PA radiograph is displayed. The *patient* frame is the scanner frame moved by
the case's position shift, in-plane tilt and axial rotation (a shear of ``x`` with depth, which is
what moves the spinous processes away from the midpoint of the clavicle heads on a rotated film).
Volumes are indexed ``[z, y, x]``; images and masks ``[row, column]``. The image covers the
same field of view as the volume, so a mask box ``[x_min, y_min, x_max, y_max]`` (x = column)
computed from a mask PNG is a box of the image.

Public API: :func:`generate_cxr_dataset` (the ``synth --modality cxr`` command),
:func:`sample_case_parameters` / :func:`render_case` / :func:`simulate_case` (one case, used by
the tests), and the pure 2D region helpers :func:`lung_zones`, :func:`costophrenic_angle`,
:func:`cardiothoracic_ratio` and :func:`nodule_cnr`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data.catalog import Catalog, load_catalog
from ..data.datalist import write_datalist
from .report_writer import write_report
from .splits import DEFAULT_N_CASES, plan_patients, split_sizes

__all__ = [
    "generate_cxr_dataset",
    "PhantomGrid",
    "PatientAnatomy",
    "CaseView",
    "FocalLesion",
    "CaseFindings",
    "CaseParameters",
    "SimulatedCase",
    "sample_patient_anatomy",
    "sample_case_parameters",
    "render_case",
    "simulate_case",
    "CasePlan",
    "plan_cases",
    "split_sizes",
    "lung_zones",
    "zone_rows",
    "costophrenic_angle",
    "cardiothoracic_ratio",
    "nodule_cnr",
    "mask_filename",
    "CATALOG_NAME",
    "DATALIST_NAME",
    "DEFAULT_N_CASES",
    "FINDING_PREVALENCE",
]

CATALOG_NAME = "synthetic_cxr"
DATALIST_NAME = "synthetic-cxr-v1"
SIDES = (("right", -1), ("left", +1))  # side name, sign of x (patient's left is +x)

# Linear attenuation coefficients per mm at an effective energy of about 60 keV.
MU_SOFT = 0.0200  # muscle, blood, heart, mediastinal soft tissue
MU_FLUID = 0.0195  # pleural fluid
MU_LUNG = 0.0045  # aerated lung parenchyma (density about 0.25 g/ml)
MU_BONE = 0.0350  # ribs, clavicles, humeri (cortex and marrow averaged)
MU_VERTEBRA = 0.0255  # vertebral bodies (mostly trabecular bone)

#: Case-level prevalence aimed at for every finding; a fifth of the studies are fully normal and the
#: others draw each finding with FINDING_PREVALENCE / (1 - P_NORMAL_STUDY).
FINDING_PREVALENCE = 0.27
P_NORMAL_STUDY = 0.2
P_FOLLOW_UP = 0.12  # chance that a patient has a second study (same split)
PLAN_STREAM = 0x706C616E  # random stream of the case plan, independent of the CT generator's
P_16_BIT = 0.1  # share of images stored as 16-bit PNG

# Reference body profile along z (mm, patient frame, before the patient's scale factors): half-widths
# and half-depths of the inner rib cage (the hemithoraces' outer wall) and of the body outline
# (neck, shoulders, chest, upper abdomen).
_PROFILE_Z = np.array([-200, -175, -160, -148, -135, -120, -100, -60, 0, 60, 120, 200], dtype=np.float64)
_INNER_HALF_WIDTH = np.array([30, 36, 48, 66, 86, 104, 120, 135, 144, 148, 146, 140], dtype=np.float64)
_INNER_HALF_DEPTH = np.array([30, 34, 44, 56, 66, 75, 84, 91, 96, 98, 98, 98], dtype=np.float64)
_BODY_HALF_WIDTH = np.array([60, 64, 92, 140, 178, 192, 188, 172, 165, 162, 160, 158], dtype=np.float64)
_BODY_HALF_DEPTH = np.array([56, 58, 70, 84, 95, 104, 110, 114, 117, 118, 118, 118], dtype=np.float64)
_INNER_CENTER_Y = 8.0  # the rib cage sits slightly posterior to the body's centre


# ============================================================================ geometry (pure)
@dataclass(frozen=True)
class PhantomGrid:
    """The voxel grid of the 3D phantom (scanner frame, origin at the centre).

    Attributes:
        shape: ``(Z, Y, X)`` voxels: rows (head to feet), depth (anterior to posterior), columns
            (patient's right to left).
        fov_mm: edge of the square field of view covered by rows and columns (the image's FOV).
        depth_mm: antero-posterior extent.
    """

    shape: tuple[int, int, int] = (128, 48, 128)
    fov_mm: float = 400.0
    depth_mm: float = 256.0

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(dz, dy, dx)`` in mm."""
        return (self.fov_mm / self.shape[0], self.depth_mm / self.shape[1], self.fov_mm / self.shape[2])

    @property
    def origin(self) -> tuple[float, float, float]:
        """Scanner coordinate of the outer corner of voxel ``[0, 0, 0]`` (``(z, y, x)`` mm)."""
        return (-self.fov_mm / 2, -self.depth_mm / 2, -self.fov_mm / 2)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along z (Z,), y (Y,) and x (X,) in mm (float32)."""
        return tuple(
            (o + (np.arange(n, dtype=np.float32) + 0.5) * d).astype(np.float32)
            for o, n, d in zip(self.origin, self.shape, self.spacing)
        )


DEFAULT_GRID = PhantomGrid()


def soft_occupancy(signed_distance_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] from an (approximate) signed distance, negative inside."""
    return np.clip(0.5 - signed_distance_mm / edge_mm, 0.0, 1.0).astype(np.float32, copy=False)


def ellipsoid_distance(u: np.ndarray, v: np.ndarray, w: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """First-order signed distance (mm) to an axis-aligned ellipsoid centred at the origin.

    Args:
        u, v, w: broadcastable coordinate arrays along the ellipsoid's axes (mm).
        radii: the three semi-axes (mm).
    """
    a, b, c = (float(r) for r in radii)
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
    grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (w / c**2) ** 2) / np.maximum(q, 1e-6)
    return (q - 1.0) / np.maximum(grad, 1.0 / max(a, b, c))


def stamp_balls(
    grid: PhantomGrid, centers_zyx: np.ndarray, radii: np.ndarray, edge_mm: float | None = None,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume occupancy of a union of balls (a tube when the centres are dense along a curve).

    Args:
        grid: the phantom grid.
        centers_zyx: (N, 3) ball centres in scanner mm ``(z, y, x)``.
        radii: (N,) radii in mm (or one radius).
        edge_mm: width of the soft edge (default: the in-plane voxel size).
        weights: optional (N,) factors multiplying each ball's occupancy.

    Returns:
        ``(flat_index, occupancy)``: flat voxel indices into a ``grid.shape`` array and the
        occupancy of each (repeated indices possible: accumulate with ``np.maximum.at``).
    """
    centers = np.asarray(centers_zyx, dtype=np.float32).reshape(-1, 3)
    n = len(centers)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float32), (n,))
    spacing = np.array(grid.spacing, np.float32)
    origin = np.array(grid.origin, np.float32)
    edge = np.float32(edge_mm or spacing[2])
    reach = np.ceil((float(radii.max()) + edge / 2) / spacing).astype(int)
    base = np.floor((centers - origin) / spacing).astype(np.int64)  # voxel holding each centre
    # separable offsets: per-axis voxel indices (N, k_axis) and squared distances to the centre
    idx, d2, ok = [], [], []
    for axis in range(3):
        off = np.arange(-reach[axis], reach[axis] + 1)
        i = base[:, axis : axis + 1] + off[None, :]
        idx.append(i)
        d2.append(((origin[axis] + (i + 0.5) * spacing[axis]).astype(np.float32) - centers[:, axis : axis + 1]) ** 2)
        ok.append((i >= 0) & (i < grid.shape[axis]))
    dist = np.sqrt(d2[0][:, :, None, None] + d2[1][:, None, :, None] + d2[2][:, None, None, :])
    occ = np.clip(0.5 + (radii[:, None, None, None] - dist) / edge, 0.0, 1.0)
    if weights is not None:
        occ *= np.broadcast_to(np.asarray(weights, dtype=np.float32), (n,))[:, None, None, None]
    Y, X = grid.shape[1], grid.shape[2]
    flat = (idx[0][:, :, None, None] * Y + idx[1][:, None, :, None]) * X + idx[2][:, None, None, :]
    keep = (occ > 0) & ok[0][:, :, None, None] & ok[1][:, None, :, None] & ok[2][:, None, None, :]
    return flat[keep], occ[keep]


def splat_segments(grid: PhantomGrid, centers_zyx: np.ndarray, volumes_mm3: np.ndarray) -> np.ndarray:
    """Mass-preserving trilinear splat of small volumes (e.g. short vessel segments) onto the grid.

    Thin structures (narrower than a voxel) keep their exact line integral through partial volume.

    Args:
        grid: the phantom grid.
        centers_zyx: (N, 3) segment centres in scanner mm.
        volumes_mm3: (N,) volume of each segment.

    Returns:
        ``grid.shape`` float32 volume fraction (not clipped; clip to 1 for an occupancy).
    """
    out = np.zeros(grid.shape, np.float32)
    centers = np.asarray(centers_zyx, dtype=np.float64).reshape(-1, 3)
    if len(centers) == 0:
        return out
    spacing = np.array(grid.spacing)
    pos = (centers - np.array(grid.origin)) / spacing - 0.5  # continuous voxel index
    base = np.floor(pos).astype(np.int64)
    frac = pos - base
    fill = np.asarray(volumes_mm3, np.float64) / float(np.prod(spacing))
    flat_out = out.reshape(-1)
    for corner in range(8):
        bits = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        i = base + bits
        w = np.prod(np.where(bits, frac, 1 - frac), axis=1) * fill
        ok = np.all((i >= 0) & (i < np.array(grid.shape)), axis=1)
        np.add.at(flat_out, np.ravel_multi_index(tuple(i[ok].T), grid.shape), w[ok].astype(np.float32))
    return out


def polyline(points: Sequence[Sequence[float]], step_mm: float) -> np.ndarray:
    """Resample a polyline (M, 3) at about ``step_mm`` spacing; returns (N, 3)."""
    pts = np.asarray(points, dtype=np.float64)
    out = [pts[:1]]
    for a, b in zip(pts[:-1], pts[1:]):
        n = max(1, int(math.ceil(np.linalg.norm(b - a) / step_mm)))
        t = np.arange(1, n + 1)[:, None] / n
        out.append(a + (b - a) * t)
    return np.concatenate(out, axis=0)


class _Block:
    """Patient-frame coordinates of a sub-block of the grid (broadcastable arrays, mm)."""

    __slots__ = ("sl", "X", "Y", "Z")

    def __init__(self, sl, X, Y, Z):
        self.sl = sl  # (slice_z, slice_y, slice_x) into the grid
        self.X = X  # (Zb, Yb, Xb): toward the patient's left
        self.Y = Y  # (1, Yb, 1): posterior
        self.Z = Z  # (Zb, 1, Xb): toward the feet


class _Frame:
    """Maps between the scanner frame (grid, image) and the patient frame (anatomy) of one case."""

    def __init__(self, grid: PhantomGrid, view: "CaseView"):
        self.grid = grid
        t = math.radians(view.tilt_deg)
        self.cos, self.sin = math.cos(t), math.sin(t)
        self.shift_x, self.shift_z = view.shift_x_mm, view.shift_z_mm
        self.rho = view.axial_rotation
        self.z, self.y, self.x = grid.axes()

    def to_scanner(self, points_zyx: np.ndarray) -> np.ndarray:
        """(N, 3) patient-frame points ``(z, y, x)`` -> scanner frame."""
        p = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
        zp, y, xx = p[:, 0], p[:, 1], p[:, 2]
        xp = xx + self.rho * y
        x = self.shift_x + self.cos * xp - self.sin * zp
        z = self.shift_z + self.sin * xp + self.cos * zp
        return np.stack([z, y, x], axis=1)

    def to_patient_2d(self, z: np.ndarray, x: np.ndarray, y: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Scanner ``(z, x)`` (at depth ``y``) -> patient ``(z, x)``."""
        dx, dz = x - self.shift_x, z - self.shift_z
        xp = self.cos * dx + self.sin * dz
        zp = -self.sin * dx + self.cos * dz
        return zp, xp - self.rho * y

    def block(self, lo_zyx: Sequence[float], hi_zyx: Sequence[float]) -> _Block | None:
        """The grid block covering the patient-frame box ``lo..hi`` (None when outside the grid)."""
        corners = np.array(
            [[z, y, x] for z in (lo_zyx[0], hi_zyx[0]) for y in (lo_zyx[1], hi_zyx[1]) for x in (lo_zyx[2], hi_zyx[2])]
        )
        sc = self.to_scanner(corners)
        lo, hi = sc.min(0), sc.max(0)
        sl = []
        for axis, (o, d, n) in enumerate(zip(self.grid.origin, self.grid.spacing, self.grid.shape)):
            i0 = max(0, int(math.floor((lo[axis] - o) / d - 0.5)) - 1)
            i1 = min(n, int(math.ceil((hi[axis] - o) / d - 0.5)) + 2)
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        z = self.z[sl[0]][:, None, None]
        y = self.y[sl[1]][None, :, None]
        x = self.x[sl[2]][None, None, :]
        dx, dz = x - np.float32(self.shift_x), z - np.float32(self.shift_z)
        xp = np.float32(self.cos) * dx + np.float32(self.sin) * dz
        zp = np.float32(-self.sin) * dx + np.float32(self.cos) * dz
        return _Block(tuple(sl), (xp - np.float32(self.rho) * y).astype(np.float32), y, zp.astype(np.float32))

    def sub_block(self, outer: _Block, lo_zyx: Sequence[float], hi_zyx: Sequence[float]) -> tuple[_Block, tuple] | None:
        """The part of ``outer`` covering the patient-frame box ``lo..hi``: ``(block, local slices into outer)``."""
        inner = self.block(lo_zyx, hi_zyx)
        if inner is None:
            return None
        local = []
        for a in range(3):
            i0 = max(inner.sl[a].start, outer.sl[a].start) - outer.sl[a].start
            i1 = min(inner.sl[a].stop, outer.sl[a].stop) - outer.sl[a].start
            if i1 <= i0:
                return None
            local.append(slice(i0, i1))
        local = tuple(local)
        sl = tuple(slice(outer.sl[a].start + local[a].start, outer.sl[a].start + local[a].stop) for a in range(3))
        return _Block(sl, outer.X[local], outer.Y[:, local[1], :], outer.Z[local[0], :, local[2]]), local

    def full(self) -> _Block:
        g = self.grid
        big = 10 * (g.fov_mm + g.depth_mm)
        return self.block((-big, -big, -big), (big, big, big))


# ============================================================================ parameters
@dataclass(frozen=True)
class PatientAnatomy:
    """Patient-level shape parameters (patient frame, mm), shared by all studies of a patient.

    ``z`` grows toward the feet, ``y`` posteriorly, ``x`` toward the patient's left.
    """

    width: float  # transverse scale of the chest
    height: float  # cranio-caudal scale
    depth: float  # antero-posterior scale
    apex_z: float  # lung apices
    dome_z: tuple[float, float]  # (right, left) hemidiaphragm dome tops at rest
    carina_z: float
    mediastinum_half_width: float  # lung medial border at the thoracic inlet (SVC and aortic knob widen it below)
    heart_center: tuple[float, float, float]  # (z, y, x)
    heart_radii: tuple[float, float, float]  # (transverse, antero-posterior, long axis)
    heart_tilt_deg: float  # transverse axis rotated toward the left-inferior
    hilum_z: tuple[float, float]  # (right, left)
    hilum_lateral: float  # distance of the hila from the midline
    arch_top_z: float  # top of the aortic arch
    rib_spacing: float
    tree_seed: int  # vessel tree (lung markings)


@dataclass(frozen=True)
class CaseView:
    """Study-level acquisition parameters: positioning, exposure, display, storage."""

    tilt_deg: float = 0.0  # in-plane rotation of the patient
    axial_rotation: float = 0.0  # x shift per mm of depth (rotation about the body's long axis)
    shift_x_mm: float = 0.0
    shift_z_mm: float = 0.0
    inspiration_mm: float = 0.0  # deeper inspiration lowers both domes
    photons: float = 3000.0  # photons per pixel of unattenuated beam (quantum noise)
    display_center: float = 3.3  # -log(transmission) shown as mid grey
    display_width: float = 2.0
    heel: float = 0.0  # anode heel effect: relative exposure gradient across the rows
    enhance: float = 0.5  # unsharp-mask gain of the image processing (local contrast, as on processed films)
    bit_depth: int = 8
    noise_seed: int = 0


@dataclass(frozen=True)
class FocalLesion:
    """A finding confined to one lung zone.

    Attributes:
        kind: ``"nodule"``, ``"consolidation"`` or ``"atelectasis"``.
        side: -1 right lung, +1 left lung.
        zone: ``"upper"``, ``"mid"`` or ``"lower"``.
        size_mm: nodule diameter, consolidation radius or atelectasis plate radius.
        density: fraction of the soft-tissue-minus-lung attenuation difference (contrast).
        seed: placement within the zone.
        target_cnr: for low-contrast nodules, the contrast-to-noise ratio the contrast is lowered to.
    """

    kind: str
    side: int
    zone: str
    size_mm: float
    density: float
    seed: int
    target_cnr: float | None = None


@dataclass(frozen=True)
class CaseFindings:
    """Findings of one study; 0 (or an empty tuple) means absent. Pairs are (right, left)."""

    cardiomegaly: float = 0.0  # relative transverse enlargement of the heart
    widened_mediastinum_mm: float = 0.0  # added to the upper mediastinum's half-width
    elevated_hemidiaphragm_mm: tuple[float, float] = (0.0, 0.0)
    pleural_effusion: tuple[float, float] = (0.0, 0.0)  # size in (0, 1]: small .. large
    pneumothorax: tuple[float, float] = (0.0, 0.0)  # fraction of retraction of the lung
    enlarged_hilum: tuple[float, float] = (0.0, 0.0)  # relative enlargement of the hilar shadow
    edema: float = 0.0  # relative increase of lung density
    focal: tuple[FocalLesion, ...] = ()


@dataclass(frozen=True)
class CaseParameters:
    anatomy: PatientAnatomy
    view: CaseView
    findings: CaseFindings
    conspicuity: float = 1.0


@dataclass
class SimulatedCase:
    """One rendered radiograph.

    Attributes:
        image: (H, W) float display values in [0, 255] (noise included, not yet quantised).
        image_clean: (H, W) the same without quantum noise.
        masks: anatomy name -> (H, W) bool mask, in the catalog's order (non-empty ones only).
        findings: anatomy -> finding -> 1 | 0 for every finding of every region present.
        details: anatomy -> finding -> short descriptor for the report (e.g. ``"6 mm"``).
        lesions: ground truth of each rendered finding (kind, anatomies, pixel centre, size, CNR...).
        line_integral: (H, W) attenuation line integral (dimensionless).
        pixel_mm: pixel size in mm.
        ctr: cardiothoracic ratio measured on the masks.
    """

    image: np.ndarray
    image_clean: np.ndarray
    masks: dict[str, np.ndarray]
    findings: dict[str, dict[str, int]]
    details: dict[str, dict[str, str]]
    lesions: list[dict[str, Any]]
    line_integral: np.ndarray
    pixel_mm: float
    ctr: float
    bit_depth: int = 8

    def quantised(self) -> np.ndarray:
        """The stored pixel array: uint8, or uint16 for 16-bit cases."""
        if self.bit_depth == 16:
            return np.round(np.clip(self.image, 0, 255) * (65535.0 / 255.0)).astype(np.uint16)
        return np.round(np.clip(self.image, 0, 255)).astype(np.uint8)


# ============================================================================ sampling
def sample_patient_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    """Draw a patient's chest shape (sizes, positions, heart size, lung height, vessel tree)."""
    w = float(np.clip(rng.normal(1.0, 0.045), 0.9, 1.1))
    h = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    d = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    apex = -150.0 * h + rng.normal(0, 4)
    dome_r = 72.0 * h + rng.normal(0, 7)
    dome_l = dome_r + rng.uniform(8, 22)  # the liver holds the right dome higher
    carina = apex + rng.uniform(96, 112) * h
    heart_scale = rng.uniform(0.9, 1.05)
    heart_radii = (66.0 * w * heart_scale, 62.0 * d * heart_scale, 54.0 * h * heart_scale)
    heart_center = (
        dome_l - 0.62 * heart_radii[2] + rng.normal(0, 4),  # resting on the diaphragm
        -22.0 * d + rng.normal(0, 3),
        rng.uniform(18, 32) * w,
    )
    return PatientAnatomy(
        width=w,
        height=h,
        depth=d,
        apex_z=float(apex),
        dome_z=(float(dome_r), float(dome_l)),
        carina_z=float(carina),
        mediastinum_half_width=float(rng.uniform(21, 26) * w),
        heart_center=tuple(float(v) for v in heart_center),
        heart_radii=tuple(float(v) for v in heart_radii),
        heart_tilt_deg=float(rng.uniform(25, 42)),
        hilum_z=(float(carina + rng.uniform(20, 34)), float(carina + rng.uniform(8, 22))),
        hilum_lateral=float(rng.uniform(52, 64) * w),
        arch_top_z=float(carina - rng.uniform(28, 40)),
        rib_spacing=float(rng.uniform(21, 24) * h),
        tree_seed=int(rng.integers(2**31)),
    )


def _sample_view(rng: np.random.Generator) -> CaseView:
    return CaseView(
        tilt_deg=float(np.clip(rng.normal(0, 1.5), -4, 4)),
        axial_rotation=float(np.clip(rng.normal(0, 0.05), -0.12, 0.12)),
        shift_x_mm=float(rng.normal(0, 6)),
        shift_z_mm=float(rng.normal(0, 6)),
        inspiration_mm=float(rng.normal(0, 7)),
        photons=float(np.exp(rng.uniform(np.log(3000), np.log(10000)))),
        display_center=float(rng.uniform(3.1, 3.5)),
        display_width=float(rng.uniform(1.8, 2.2)),
        heel=float(rng.uniform(-0.08, 0.08)),
        enhance=float(rng.uniform(0.3, 0.7)),
        bit_depth=16 if rng.random() < P_16_BIT else 8,
        noise_seed=int(rng.integers(2**31)),
    )


def _pick_sides(rng: np.random.Generator, p_both: float) -> tuple[bool, bool]:
    u = rng.random()
    if u < p_both:
        return (True, True)
    return (True, False) if u < p_both + (1 - p_both) / 2 else (False, True)


def _sample_findings(rng: np.random.Generator, conspicuity: float) -> CaseFindings:
    """Draw the findings of a study (each finding type at about FINDING_PREVALENCE of the cases).

    Every random number is drawn whether or not a finding is present, so switching prevalence or
    conspicuity does not reshuffle the other findings.
    """
    c = conspicuity
    normal = rng.random() < P_NORMAL_STUDY
    p = FINDING_PREVALENCE / (1 - P_NORMAL_STUDY)
    draws = {k: (not normal) and rng.random() < p for k in (
        "cardiomegaly", "widened mediastinum", "elevated hemidiaphragm", "pleural effusion",
        "pneumothorax", "enlarged hilum", "edema", "consolidation", "atelectasis", "nodule")}

    def pair(present: bool, sides: tuple[bool, bool], values: tuple[float, float]) -> tuple[float, float]:
        return tuple(float(v) if present and s else 0.0 for s, v in zip(sides, values))

    cardiomegaly = c * rng.uniform(0.25, 0.42) * draws["cardiomegaly"]
    widened = c * rng.uniform(14, 26) * draws["widened mediastinum"]
    elev_side = _pick_sides(rng, 0.0)
    elevated = pair(draws["elevated hemidiaphragm"], elev_side, (c * rng.uniform(28, 45),) * 2)
    eff_sides = _pick_sides(rng, 0.3)
    effusion = pair(draws["pleural effusion"], eff_sides, tuple(np.clip(c * rng.uniform(0.15, 1.0, 2), 0.05, 1.0)))
    ptx_side = _pick_sides(rng, 0.0)
    pneumothorax = pair(draws["pneumothorax"], ptx_side, (min(0.45, c * rng.uniform(0.12, 0.28)),) * 2)
    hil_sides = _pick_sides(rng, 0.5)
    hilum = pair(draws["enlarged hilum"], hil_sides, tuple(c * rng.uniform(0.35, 0.6, 2)))
    edema = c * rng.uniform(0.6, 1.3) * draws["edema"]

    focal: list[FocalLesion] = []
    zones = ("upper", "mid", "lower")
    n_cons = 1 + int(rng.random() < 0.2)
    for i in range(2):
        side, zone = (-1, 1)[int(rng.integers(2))], zones[int(rng.choice(3, p=[0.2, 0.35, 0.45]))]
        radius = rng.uniform(14, 28) * math.sqrt(c)
        dens, seed = min(1.0, c * rng.uniform(0.55, 0.95)), int(rng.integers(2**31))
        if draws["consolidation"] and i < n_cons:
            focal.append(FocalLesion("consolidation", side, zone, float(radius), float(dens), seed))
    side, zone = (-1, 1)[int(rng.integers(2))], zones[int(rng.choice(3, p=[0.05, 0.35, 0.6]))]
    radius, dens, seed = rng.uniform(25, 45), min(1.0, c * rng.uniform(0.6, 1.0)), int(rng.integers(2**31))
    if draws["atelectasis"]:
        focal.append(FocalLesion("atelectasis", side, zone, float(radius), float(dens), seed))
    n_nod = 1 + int(rng.random() < 0.25)
    for i in range(2):
        side, zone = (-1, 1)[int(rng.integers(2))], zones[int(rng.integers(3))]
        diameter = float(np.exp(rng.uniform(np.log(4.0), np.log(20.0))) * math.sqrt(c))
        low = rng.random() < 0.4
        target = float(rng.uniform(1.2, 2.8) * c)
        dens, seed = float(min(1.0, c * rng.uniform(0.8, 1.0))), int(rng.integers(2**31))
        if draws["nodule"] and i < n_nod:
            focal.append(FocalLesion("nodule", side, zone, diameter, dens, seed, target if low else None))
    return CaseFindings(
        cardiomegaly=float(cardiomegaly),
        widened_mediastinum_mm=float(widened),
        elevated_hemidiaphragm_mm=elevated,
        pleural_effusion=effusion,
        pneumothorax=pneumothorax,
        enlarged_hilum=hilum,
        edema=float(edema),
        focal=tuple(focal),
    )


def sample_case_parameters(
    rng: np.random.Generator, patient_rng: np.random.Generator | None = None, conspicuity: float = 1.0
) -> CaseParameters:
    """Draw one study.

    Args:
        rng: the case's generator (``np.random.default_rng([seed, case_index])``): view and findings.
        patient_rng: the patient's generator (anatomy); default: ``rng`` itself (one study per patient).
        conspicuity: multiplier of finding contrast and size (1 = default difficulty).
    """
    anatomy = sample_patient_anatomy(patient_rng if patient_rng is not None else rng)
    view = _sample_view(rng)
    findings = _sample_findings(rng, conspicuity)
    return CaseParameters(anatomy=anatomy, view=view, findings=findings, conspicuity=float(conspicuity))


def _patient_rng(seed: int, patient_index: int) -> np.random.Generator:
    # Three words with a non-zero tag: never equal to a case stream [seed, case_index].
    return np.random.default_rng([int(seed), int(patient_index), 0x70617469])


# ============================================================================ phantom
@dataclass
class _Geometry:
    """Case geometry after findings that change anatomy (patient frame, mm)."""

    dome_z: tuple[float, float]
    heart_center: tuple[float, float, float]
    heart_radii: tuple[float, float, float]
    mediastinum_upper: float
    hilum_scale: tuple[float, float]
    heart_top_z: float


def _case_geometry(anat: PatientAnatomy, view: CaseView, fnd: CaseFindings) -> _Geometry:
    domes = tuple(anat.dome_z[i] + view.inspiration_mm - fnd.elevated_hemidiaphragm_mm[i] for i in range(2))
    k = 1.0 + fnd.cardiomegaly
    a, b, c = anat.heart_radii
    radii = (a * k, b * k**0.7, c * k**0.5)
    z, y, x = anat.heart_center
    # an enlarged heart grows to the left and keeps resting on the left dome
    center = (z + view.inspiration_mm - (radii[2] - c) * 0.4, y, x + (radii[0] - a) * 0.35)
    return _Geometry(
        dome_z=domes,
        heart_center=center,
        heart_radii=radii,
        mediastinum_upper=anat.mediastinum_half_width + fnd.widened_mediastinum_mm,
        hilum_scale=tuple(1.0 + v for v in fnd.enlarged_hilum),
        heart_top_z=center[0] - math.hypot(radii[0] * math.sin(math.radians(anat.heart_tilt_deg)),
                                           radii[2] * math.cos(math.radians(anat.heart_tilt_deg))),
    )


def _interp(values_z: np.ndarray, table: np.ndarray, anat: PatientAnatomy, scale: float) -> np.ndarray:
    return np.interp(values_z, _PROFILE_Z * anat.height, table * scale).astype(np.float32)


def _dome_surface(anat: PatientAnatomy, dome_z: float, lateral: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """z of one hemidiaphragm at (lateral distance from the midline, depth): a dome, lowest laterally
    (costophrenic angle) and posteriorly (posterior recess)."""
    w, d = anat.width, anat.depth
    return (
        dome_z
        + (0.0062 / w**2) * (lateral - 58.0 * w) ** 2
        + (0.0032 / d**2) * (Y + 5.0 * d) ** 2
    ).astype(np.float32)


def _mediastinal_half_width(anat: PatientAnatomy, geo: _Geometry, Z: np.ndarray, side: int) -> np.ndarray:
    """Distance (mm) from the midline to the lung's medial border at height Z: the superior vena cava
    makes the right border, the aortic knob and the pulmonary trunk bulge the left one."""
    m, w, top, arch, heart = geo.mediastinum_upper, anat.width, anat.apex_z - 30, anat.arch_top_z, geo.heart_top_z
    if side < 0:
        zs = [top, arch - 10, heart, heart + 30, 400.0]
        ws = [m * 0.8, m + 6 * w, m + 8 * w, 15.0 * w, 13.0 * w]
    else:
        zs = [top, arch - 5, arch + 12, arch + 30, anat.carina_z + 20, heart + 20, heart + 50, 400.0]
        ws = [m * 0.8, m + 4 * w, m + 16 * w, m + 6 * w, m + 12 * w, m + 8 * w, 15.0 * w, 13.0 * w]
    return np.interp(Z, np.maximum.accumulate(zs), ws).astype(np.float32)


def _dome_surface_both(anat: PatientAnatomy, geo: _Geometry, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """z of the diaphragm under either lung (right dome for X < 0, left dome otherwise)."""
    base = np.where(X < 0, np.float32(geo.dome_z[0]), np.float32(geo.dome_z[1]))
    return base + (_dome_surface(anat, 0.0, np.abs(X), Y))


def _rib_cage_distance(anat: PatientAnatomy, side: int, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Signed distance (mm, negative inside) to the inside of the rib cage below one lung apex."""
    a = _interp(Z, _INNER_HALF_WIDTH, anat, anat.width)
    b = _interp(Z, _INNER_HALF_DEPTH, anat, anat.depth)
    r = np.sqrt((X / a) ** 2 + ((Y - _INNER_CENTER_Y * anat.depth) / b) ** 2)
    lateral = side * X
    apex = anat.apex_z + (0.010 / anat.width**2) * (lateral - 50.0 * anat.width) ** 2 + 0.004 * (Y - 20.0) ** 2
    return np.maximum((r - 1.0) * b, apex - Z)


def _medial_distance(
    anat: PatientAnatomy, geo: _Geometry, side: int, X: np.ndarray, Y: np.ndarray, Z: np.ndarray
) -> np.ndarray:
    """Signed distance (mm, negative lateral of it) to one lung's medial (mediastinal) border."""
    # the lungs reach closer to the midline in front of and behind the middle mediastinum
    # (anterior and posterior junction lines)
    depth_factor = 0.6 + 0.4 * np.exp(-((Y - 5.0 * anat.depth) / (48.0 * anat.depth)) ** 2)
    return _mediastinal_half_width(anat, geo, Z, side) * depth_factor - side * X


class _Phantom:
    """Accumulates the 3D phantom of one case and the projections of its regions."""

    def __init__(self, params: CaseParameters, grid: PhantomGrid):
        self.params = params
        self.anat = params.anatomy
        self.view = params.view
        self.fnd = params.findings
        self.grid = grid
        self.frame = _Frame(grid, params.view)
        self.geo = _case_geometry(self.anat, self.view, self.fnd)
        self.edge = grid.spacing[2]
        shape = grid.shape
        self.mu = np.zeros(shape, np.float32)  # attenuation per mm
        self.solid = np.zeros(shape, np.float32)  # solids carved out of the lungs (heart, vessels, spine)
        self.mediastinal = np.zeros(shape, np.float32)  # heart and great vessels (part of the mediastinum)
        self.bone = np.zeros(shape, np.float32)  # excess attenuation of bone over soft tissue
        self.airway = np.zeros(shape, np.float32)  # air inside the body outside the lungs
        self.vessels = np.zeros(shape, np.float32)  # lung vessel tree (markings)
        # region name -> (Z, X) projected occupancy in voxels (a ray "crosses" a region at >= 0.5)
        self.projections: dict[str, np.ndarray] = {}
        self.sides: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ helpers
    def _project(self, name: str, blk: _Block, occ: np.ndarray) -> None:
        proj = self.projections.setdefault(name, np.zeros((self.grid.shape[0], self.grid.shape[2]), np.float32))
        proj[blk.sl[0], blk.sl[2]] += occ.sum(axis=1)

    def _stamp(self, points_patient: np.ndarray, radii, targets: Iterable[tuple[np.ndarray, float]],
               point_weights: np.ndarray | None = None, region: str | None = None) -> None:
        """Stamp a tube (patient-frame points) into volumes (max, times a weight each) and, when
        ``region`` is given, into that region's projection (largest occupancy along each ray)."""
        flat, occ = stamp_balls(self.grid, self.frame.to_scanner(points_patient), radii, self.edge, point_weights)
        for target, weight in targets:
            np.maximum.at(target.reshape(-1), flat, occ * np.float32(weight))
        if region is not None:
            Z, Y, X = self.grid.shape
            proj = self.projections.setdefault(region, np.zeros((Z, X), np.float32))
            np.maximum.at(proj.reshape(-1), (flat // (Y * X)) * X + flat % X, occ)

    def _heart_distance(self, blk: _Block, radii_scale: tuple[float, float, float] = (1, 1, 1),
                        offset: tuple[float, float, float] = (0, 0, 0)) -> np.ndarray:
        z0, y0, x0 = self.geo.heart_center
        a, b, c = self.geo.heart_radii
        t = math.radians(self.anat.heart_tilt_deg)
        dx, dz = blk.X - x0, blk.Z - z0
        u = dx * math.cos(t) + dz * math.sin(t)
        w = -dx * math.sin(t) + dz * math.cos(t)
        return ellipsoid_distance(u - offset[0] * a, (blk.Y - y0) - offset[1] * b, w - offset[2] * c,
                                  (a * radii_scale[0], b * radii_scale[1], c * radii_scale[2]))

    # ------------------------------------------------------------------ anatomy
    def build_anatomy(self) -> None:
        """Build the normal anatomy (and the anatomy-changing findings) into the volumes and projections."""
        self._add_body()
        self._add_heart()
        self._add_great_vessels()
        self._add_spine()
        self._add_airways()
        self._add_ribs_and_shoulders()
        self._add_hemithoraces()
        self._add_mediastinum()
        self._add_abdomen()
        self._add_vessel_trees()

    def _add_body(self) -> None:
        """Body outline: neck, shoulders, chest wall, upper abdomen (soft tissue)."""
        anat, frame, edge = self.anat, self.frame, self.edge
        w, d = anat.width, anat.depth
        full = frame.full()
        A = _interp(full.Z, _BODY_HALF_WIDTH, anat, w)
        B = _interp(full.Z, _BODY_HALF_DEPTH, anat, d)
        body = soft_occupancy((np.sqrt((full.X / A) ** 2 + (full.Y / B) ** 2) - 1.0) * B, edge)
        self.body = body
        self.mu += MU_SOFT * body

    def _add_heart(self) -> None:
        """Heart (carved out of the lungs) and its right atrium region."""
        geo, frame, edge = self.geo, self.frame, self.edge
        hz, hy, hx = geo.heart_center
        R = max(geo.heart_radii) + 5
        blk = frame.block((hz - R, hy - R, hx - R), (hz + R, hy + R, hx + R))
        heart = soft_occupancy(self._heart_distance(blk), edge)
        self.solid[blk.sl] = np.maximum(self.solid[blk.sl], heart)
        self.mediastinal[blk.sl] = np.maximum(self.mediastinal[blk.sl], heart)
        self._project("cardiac silhouette", blk, heart)
        ra = heart * soft_occupancy(self._heart_distance(blk, (0.5, 0.6, 0.55), (-0.62, 0.05, -0.25)), edge)
        self._project("right atrium", blk, ra)

    def _add_great_vessels(self) -> None:
        """Aorta (ascending, arch, descending), pulmonary trunk, superior vena cava."""
        anat, geo = self.anat, self.geo
        w, d, h = anat.width, anat.depth, anat.height
        hz = geo.heart_center[0]
        asc_x, desc_x = -20 * w, 24 * w  # x = 0 is the midline
        arch_z = anat.arch_top_z + 26 * h
        asc = [(hz - 0.6 * geo.heart_radii[2], -28 * d, asc_x), (arch_z, -28 * d, asc_x)]
        t = np.linspace(0, math.pi, 24)
        arch = np.stack([arch_z - (arch_z - anat.arch_top_z) * np.sin(t),
                         -28 * d + (70 * d) * (1 - np.cos(t)) / 2,
                         asc_x + (desc_x - asc_x) * (1 - np.cos(t)) / 2 + 12 * w * np.sin(t)], axis=1)
        desc = [(arch_z, 42 * d, desc_x), (max(geo.dome_z) + 30, 44 * d, desc_x - 4 * w)]
        r_aorta = 12.5 * w
        self._stamp(polyline(asc, 3.0), r_aorta, [(self.solid, 1.0), (self.mediastinal, 1.0)])
        self._stamp(polyline(arch, 2.5), r_aorta, [(self.solid, 1.0), (self.mediastinal, 1.0)], region="aortic arch")
        self._stamp(polyline(desc, 3.0), 11.5 * w, [(self.solid, 1.0), (self.mediastinal, 1.0)])
        trunk = [(geo.heart_top_z + 18 * h, -22 * d, 16 * w), (anat.carina_z + 16 * h, -4 * d, 30 * w)]
        self._stamp(polyline(trunk, 3.0), 13.0 * w, [(self.solid, 1.0), (self.mediastinal, 1.0)])
        svc_x = -31 * w
        svc_top, svc_bottom = anat.arch_top_z - 25 * h, hz - 0.75 * geo.heart_radii[2]
        svc_pts = polyline([(svc_top, -22 * d, svc_x), (svc_bottom, -24 * d, svc_x - 2 * w)], 3.0)
        self._stamp(svc_pts, 9.0 * w, [(self.solid, 1.0), (self.mediastinal, 1.0)], region="svc")
        caj = np.array([[svc_bottom, -24 * d, svc_x - 2 * w]])
        self._stamp(caj, 11.0 * w, [], region="cavoatrial junction")

    def _add_spine(self) -> None:
        """Vertebral column: bodies (carved out of the lungs) with discs, and posterior elements."""
        anat, geo, frame, edge = self.anat, self.geo, self.frame, self.edge
        w, d, h = anat.width, anat.depth, anat.height
        blk = frame.block((-250, 15 * d, -60 * w), (250, 115 * d, 60 * w))
        body_d = (np.sqrt((blk.X / (21 * w)) ** 2 + ((blk.Y - 62 * d) / (16 * d)) ** 2) - 1) * 16 * d
        post_d = (np.sqrt((blk.X / (30 * w)) ** 2 + ((blk.Y - 94 * d) / (10 * d)) ** 2) - 1) * 10 * d
        vert = soft_occupancy(body_d, edge)
        spine = np.maximum(vert, 0.35 * soft_occupancy(post_d, edge))
        phase = ((blk.Z - anat.apex_z) / (25.5 * h)) % 1.0
        disc = np.clip(1 - np.abs(phase - 0.5) / 0.13, 0, 1)  # intervertebral discs every ~25 mm
        self.bone[blk.sl] = np.maximum(self.bone[blk.sl], spine * (MU_VERTEBRA - MU_SOFT) * (1 - 0.8 * disc))
        self.solid[blk.sl] = np.maximum(self.solid[blk.sl], vert)
        thoracic = ((blk.Z > anat.apex_z - 25) & (blk.Z < max(geo.dome_z) + 25)).astype(np.float32)
        self._project("spine", blk, spine * thoracic)

    def _add_airways(self) -> None:
        """Trachea and main bronchi (air), carina."""
        anat, frame, edge = self.anat, self.frame, self.edge
        w, d, h = anat.width, anat.depth, anat.height
        tx, ty = -2 * w, -6 * d
        cz = anat.carina_z
        blk = frame.block((-260, ty - 30, tx - 30), (cz + 10, ty + 30, tx + 30))
        trachea = soft_occupancy(np.maximum(np.sqrt((blk.X - tx) ** 2 + (blk.Y - ty) ** 2) - 8.5 * w, blk.Z - cz), edge)
        self.airway[blk.sl] = np.maximum(self.airway[blk.sl], trachea)
        self._project("trachea", blk, trachea)
        carina = np.array([[cz, ty, tx]])
        for side, length, angle in ((-1, 28.0, 28.0), (1, 48.0, 48.0)):
            a = math.radians(angle)
            end = (cz + length * math.cos(a) * h, ty + 4, tx + side * length * math.sin(a) * w)
            self._stamp(polyline([carina[0], end], 2.0), 6.5 * w if side < 0 else 6.0 * w, [(self.airway, 1.0)])
        self._stamp(carina, 10.0 * w, [], region="carina")

    def _add_ribs_and_shoulders(self) -> None:
        """Ribs, clavicles and humeral heads."""
        anat = self.anat
        w, d, h = anat.width, anat.depth, anat.height
        # posterior arcs descend laterally, anterior arcs descend medially
        rib_pts, rib_r, rib_w = [], [], []
        rib_rng = np.random.default_rng([anat.tree_seed, 0x72696273])
        for i in range(12):
            # upper ribs lie closer together; each rib has its own small offset and slope
            z0 = anat.apex_z - 6 * h + anat.rib_spacing * (i + 0.025 * i * i) + rib_rng.normal(0, 2.0)
            drop = (100.0 + 2.0 * i + rib_rng.normal(0, 5)) * h
            end = (0.82, 0.82, 0.82, 0.82, 0.82, 0.82, 0.82, 0.8, 0.75, 0.68, 0.58, 0.48)[i] * math.pi
            for side in (-1, 1):
                phi = np.linspace(0.07 * math.pi, end, int(90 * end / math.pi))
                zz = z0 + drop * ((phi - phi[0]) / (math.pi - phi[0])) ** 1.2
                a = np.interp(zz, _PROFILE_Z * h, _INNER_HALF_WIDTH * w) + 7
                b = np.interp(zz, _PROFILE_Z * h, _INNER_HALF_DEPTH * d) + 7
                pts = np.stack([zz, _INNER_CENTER_Y * d + b * np.cos(phi), side * a * np.sin(phi)], axis=1)
                rib_pts.append(pts)
                rib_r.append(np.full(len(pts), (4.0, 4.6, 4.6, 4.6, 4.6, 4.6, 4.6, 4.4, 4.2, 4.0, 3.6, 3.2)[i]))
                # the anterior arcs thin out toward the (radiolucent) costal cartilage
                anterior = np.clip(1.0 - 0.75 * (phi - 0.45 * math.pi) / (0.37 * math.pi), 0.25, 1.0)
                rib_w.append(anterior * (1.0 if i < 8 else 0.75))
        self._stamp(np.concatenate(rib_pts), np.concatenate(rib_r), [(self.bone, MU_BONE - MU_SOFT)],
                    point_weights=np.concatenate(rib_w))
        for name, side in (("right clavicle", -1), ("left clavicle", 1)):
            t = np.linspace(0, 1, 70)
            z_med = anat.apex_z + 36 * h
            pts = np.stack([z_med - 20 * h * t - 6 * np.sin(2 * math.pi * t),
                            -78 * d + 70 * d * t**1.6,
                            side * (14 + 142 * t) * w], axis=1)
            self._stamp(pts, 8.0 * w, [(self.bone, MU_BONE - MU_SOFT)], region=name)
        for side in (-1, 1):
            self._stamp(np.array([[anat.apex_z + 18 * h, 10 * d, side * 176 * w]]), 24 * w,
                        [(self.bone, (MU_BONE - MU_SOFT) * 0.7)])

    def _add_hemithoraces(self) -> None:
        """Hemithoraces (the lung regions: pleural cavity, whatever it contains), hemidiaphragm sheets, hila."""
        anat, geo, frame, edge = self.anat, self.geo, self.frame, self.edge
        w, d, h = anat.width, anat.depth, anat.height
        for side in (-1, 1):
            si = 0 if side < 0 else 1
            lo_x, hi_x = (-220.0, 25.0) if side < 0 else (-25.0, 220.0)
            blk = frame.block((anat.apex_z - 30, -110 * d, lo_x), (max(geo.dome_z) + 100, 115 * d, hi_x))
            rib_cage = _rib_cage_distance(anat, side, blk.X, blk.Y, blk.Z)
            below = blk.Z - _dome_surface(anat, geo.dome_z[si], side * blk.X, blk.Y)
            pleural = np.maximum(rib_cage, below)  # the hemithorax without its medial border
            dist = np.maximum(pleural, _medial_distance(anat, geo, side, blk.X, blk.Y, blk.Z))
            cavity = soft_occupancy(dist, edge) * (1.0 - self.solid[blk.sl]) * self.body[blk.sl]
            self._project(f"{_side_name(side)} lung", blk, cavity)
            self.sides[side] = {"block": blk, "cavity": cavity}

            # hemidiaphragm: the muscle sheet under the lung base
            sheet_d = np.maximum(np.maximum(rib_cage, np.abs(below - 6.0) - 6.0), 18.0 * w - side * blk.X)
            self._project(f"{_side_name(side)} hemidiaphragm", blk, soft_occupancy(sheet_d, edge) * self.body[blk.sl])

            # hilum: pulmonary arteries and main bronchi (soft tissue shadow in the lung root)
            k = geo.hilum_scale[si]
            center = (anat.hilum_z[si] + self.view.inspiration_mm * 0.3, 4.0 * d, side * anat.hilum_lateral)
            radii = (17.0 * k * w, 18.0 * k * d, 30.0 * k * h)  # (x, y, z)
            reach = np.array([radii[2], radii[1], radii[0]]) + 8
            sub, local = frame.sub_block(blk, np.array(center) - reach, np.array(center) + reach)
            hil = soft_occupancy(
                ellipsoid_distance(sub.X - center[2], sub.Y - center[1], sub.Z - center[0], radii), edge)
            hil *= soft_occupancy(pleural[local], edge)
            self._project(f"{_side_name(side)} hilar structures", sub, hil)
            hilum = np.zeros_like(cavity)
            hilum[local] = 0.85 * hil
            self.sides[side]["hilum"] = hilum
            self.sides[side]["hilum_center"] = center

    def _add_mediastinum(self) -> None:
        """Mediastinum region (thoracic inlet to diaphragm, heart and aorta included)."""
        anat, geo, frame, edge = self.anat, self.geo, self.frame, self.edge
        w, d = anat.width, anat.depth
        blk = frame.block((anat.apex_z - 40, -130, -110), (max(geo.dome_z) + 60, 130, 110))
        m = np.where(blk.X < 0, _mediastinal_half_width(anat, geo, blk.Z, -1),
                     _mediastinal_half_width(anat, geo, blk.Z, 1))
        a_in = _interp(blk.Z, _INNER_HALF_WIDTH, anat, w)
        b_in = _interp(blk.Z, _INNER_HALF_DEPTH, anat, d)
        inner = (np.sqrt((blk.X / a_in) ** 2 + ((blk.Y - _INNER_CENTER_Y * d) / b_in) ** 2) - 1) * b_in
        lateral = np.abs(blk.X)
        dome = _dome_surface_both(anat, geo, blk.X, blk.Y)
        band = np.maximum(np.maximum(inner, lateral - m), np.maximum(anat.apex_z - 15 - blk.Z, blk.Z - dome))
        within = ((blk.Z > anat.apex_z - 15) & (blk.Z < dome + 20)).astype(np.float32)
        med = np.maximum(soft_occupancy(band, edge), self.mediastinal[blk.sl] * within)
        self._project("mediastinum", blk, med)

    def _add_abdomen(self) -> None:
        """Abdomen region below the domes and the gastric air bubble."""
        anat, geo, frame, edge = self.anat, self.geo, self.frame, self.edge
        w, d, h = anat.width, anat.depth, anat.height
        blk = frame.block((min(geo.dome_z) - 10, -150, -230), (260, 150, 230))
        abdomen = self.body[blk.sl] * soft_occupancy(_dome_surface_both(anat, geo, blk.X, blk.Y) + 4.0 - blk.Z, edge)
        self._project("abdomen", blk, abdomen)
        gz, gx, radii = geo.dome_z[1] + 26 * h, 68 * w, (38 * w, 30 * d, 20 * h)
        blk = frame.block((gz - radii[2] - 8, -5 * d - radii[1] - 8, gx - radii[0] - 8),
                          (gz + radii[2] + 8, -5 * d + radii[1] + 8, gx + radii[0] + 8))
        gas = soft_occupancy(ellipsoid_distance(blk.X - gx, blk.Y + 5 * d, blk.Z - gz, radii), edge)
        gas *= soft_occupancy(blk.Z - (gz + 4 * h), edge)  # air above the gastric fluid level
        self.airway[blk.sl] = np.maximum(self.airway[blk.sl], gas)

    def _add_vessel_trees(self) -> None:
        """Pulmonary vessel trees (lung markings), kept later only inside aerated lung."""
        anat = self.anat
        tree_rng = np.random.default_rng([anat.tree_seed, 0x76657373])
        pts, vols = [], []
        for side in (-1, 1):
            p, r = _vessel_tree(tree_rng, self.sides[side]["hilum_center"], side, anat)
            pts.append(self.frame.to_scanner(p))
            vols.append(math.pi * r**2 * _VESSEL_STEP_MM)
        self.vessels = np.minimum(splat_segments(self.grid, np.concatenate(pts), np.concatenate(vols)), 1.0)

    # ------------------------------------------------------------------ lung contents
    def fill_lungs(self, rows_by_side: dict[int, dict[str, tuple[int, int]]], masks_px: "_MaskInfo") -> list[dict]:
        """Fill each hemithorax (aerated lung with vessels, fluid, pneumothorax air, dense lesions).

        Args:
            rows_by_side: side -> ``lung`` or zone -> (first, last + 1) output-image rows (:func:`zone_rows`).
            masks_px: projected masks and geometry needed to place lesions.

        Returns:
            The rendered 3D lesions (consolidation, atelectasis) with their projected excess
            attenuation, for labelling by footprint.
        """
        anat, geo, fnd, edge = self.anat, self.geo, self.fnd, self.edge
        rendered = []
        dy = self.grid.spacing[1]
        for si, side in enumerate((-1, 1)):
            info = self.sides[side]
            blk, cavity = info["block"], info["cavity"]
            tissue = cavity.copy()
            shell = np.zeros_like(cavity)
            # pneumothorax: the lung retracts toward the hilum, most at the apex and laterally,
            # leaving air without vessel markings between the visceral pleural line and the chest wall
            k = fnd.pneumothorax[si]
            if k > 0:
                hz, hy, hx = info["hilum_center"]
                kz, kx, ky = 1 - k, 1 - 0.55 * k, 1 - 0.3 * k
                Zr = np.where(blk.Z < hz, hz + (blk.Z - hz) / kz, blk.Z)
                Xr = hx + (blk.X - hx) / kx
                Yr = hy + (blk.Y - hy) / ky
                dr = _rib_cage_distance(anat, side, Xr, Yr, Zr)
                retracted = soft_occupancy(dr, edge)
                tissue = cavity * retracted
                shell = cavity * np.clip(1.0 - np.abs(dr) / edge, 0, 1) * 0.8
            # pleural effusion: fluid layering in the base with a meniscus rising along the lateral wall
            fluid_region = np.zeros((1, 1, 1), np.float32)
            size = fnd.pleural_effusion[si]
            if size > 0:
                rows = rows_by_side[side]
                row_z = -self.grid.fov_mm / 2 + (
                    np.array([rows["lung"][1] - 1, rows["lower"][0]]) + 0.5) * masks_px.pixel_mm
                bottom = float(row_z[0])  # scanner z of the lung's lowest row
                meniscus = 15.0 + 25.0 * size
                # the meniscus' top stays inside the lower zone (the only zone that owns effusion)
                highest = float(row_z[1]) + 4.0 + meniscus
                level = bottom - 14.0 - size * max(0.0, bottom - 14.0 - highest)
                a_in = _interp(blk.Z, _INNER_HALF_WIDTH, anat, anat.width)
                to_wall = np.maximum(a_in - side * blk.X, 0)
                zs = self.frame.z[blk.sl[0]][:, None, None]  # gravity acts along the scanner's z
                # fluid climbs the lateral wall (meniscus) and lies higher posteriorly, so its upper
                # edge fades gradually on the PA projection instead of drawing a flat line
                b_in = _interp(blk.Z, _INNER_HALF_DEPTH, anat, anat.depth)
                posterior = np.clip((blk.Y - _INNER_CENTER_Y * anat.depth) / b_in, -1, 1)
                surface = level - meniscus * np.exp(-to_wall / 38.0) - 12.0 * size * posterior
                fluid_region = soft_occupancy(surface - zs, edge)
                info["effusion"] = {"level_z": float(level), "size": float(size)}
            fluid = cavity * fluid_region
            tissue = tissue * (1 - fluid_region)
            shell = shell * (1 - fluid_region)
            # edema: denser lung, most around the hila and in the bases
            density = np.float32(1.0)
            if fnd.edema > 0:
                hz, hy, hx = info["hilum_center"]
                r2 = ((blk.X - hx) / 70.0) ** 2 + ((blk.Z - hz) / 90.0) ** 2 + ((blk.Y - hy) / 80.0) ** 2
                basal = np.clip((blk.Z - anat.apex_z) / (geo.dome_z[si] - anat.apex_z), 0, 1.2)
                density = 1.0 + fnd.edema * (0.45 + 1.1 * np.exp(-r2) + 0.5 * basal)
            # dense components within aerated lung: hilum, consolidation, atelectasis
            dense = info["hilum"].copy()
            for lesion in fnd.focal:
                if lesion.side != side or lesion.kind == "nodule":
                    continue
                placed = _focal_lesion_occupancy(self, lesion, blk, tissue, rows_by_side[side], masks_px)
                if placed is None:
                    continue
                sub, local, occ = placed
                dense[local] = np.maximum(dense[local], occ * lesion.density)  # fraction of the lung tissue
                proj = np.zeros((self.grid.shape[0], self.grid.shape[2]), np.float32)
                excess_mu = occ * lesion.density * tissue[local] * (MU_SOFT - MU_LUNG)
                proj[sub.sl[0], sub.sl[2]] = (excess_mu * dy).sum(axis=1)
                rendered.append({"lesion": lesion, "projection": proj})
            vessels = self.vessels[blk.sl] * (1 - dense)
            lung_mu = MU_LUNG * density * (1 - dense - vessels) + MU_SOFT * (dense + vessels)
            content = tissue * lung_mu + fluid * MU_FLUID + shell * MU_SOFT
            self.mu[blk.sl] += content - MU_SOFT * cavity
        self.mu += self.bone
        self.mu -= MU_SOFT * self.airway * self.body
        np.maximum(self.mu, 0, out=self.mu)
        return rendered


_VESSEL_STEP_MM = 2.0


def _vessel_tree(rng: np.random.Generator, hilum_zyx, side: int, anat: PatientAnatomy) -> tuple[np.ndarray, np.ndarray]:
    """Branching pulmonary vessels radiating from the hilum (patient frame).

    Returns:
        ``(points, radii)``: (N, 3) points ``(z, y, x)`` every ``_VESSEL_STEP_MM`` along the
        branches and (N,) vessel radii (tapering toward the periphery).
    """
    pts, radii = [], []
    branches = []
    for _ in range(18):
        phi = rng.uniform(-1.35, 1.35)  # angle from the lateral direction, negative = upward
        direction = np.array([math.sin(phi), rng.normal(0, 0.35), side * math.cos(phi)])
        start = np.asarray(hilum_zyx, dtype=np.float64) + rng.normal(0, 6, 3)
        branches.append((start, direction, rng.uniform(3.5, 4.5), rng.uniform(110, 190) * anat.width, 0))
    while branches:
        start, direction, r0, length, depth = branches.pop()
        n = max(2, int(length / _VESSEL_STEP_MM))
        # a gently curving path: directions random-walk around the initial one
        dirs = direction / np.linalg.norm(direction) + np.cumsum(rng.normal(0, 0.05, (n, 3)), axis=0)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        path = start + np.cumsum(dirs * _VESSEL_STEP_MM, axis=0)
        r = r0 * (1 - 0.7 * np.arange(n) / n)
        pts.append(path)
        radii.append(r)
        if depth < 3:
            for i in np.nonzero(rng.random(n) < 0.045)[0]:
                if i > 3:
                    child = dirs[i] + rng.normal(0, 0.6, 3)
                    branches.append((path[i], child, r[i] * 0.75, (n - i) * _VESSEL_STEP_MM * 0.8, depth + 1))
    return np.concatenate(pts), np.concatenate(radii)


@dataclass
class _MaskInfo:
    """What lesion placement needs from the projected anatomy (output-image resolution)."""

    masks: dict[str, np.ndarray]
    lung_path_mm: dict[int, np.ndarray]  # side -> (H, W) path length through the hemithorax
    pixel_mm: float


def _choose_pixel(
    rng: np.random.Generator, region: np.ndarray, weight: np.ndarray, margin_px: float
) -> tuple[int, int] | None:
    """A pixel of ``region`` at least ``margin_px`` from its edge, drawn with probability ~ weight."""
    inner = ndimage.binary_erosion(region, iterations=max(1, int(round(margin_px)))) if margin_px >= 0.5 else region
    if not inner.any():
        inner = region
    if not inner.any():
        return None
    rows, cols = np.nonzero(inner)
    p = np.maximum(weight[rows, cols], 0).astype(np.float64) ** 2 + 1e-9
    i = int(rng.choice(len(rows), p=p / p.sum()))
    return int(rows[i]), int(cols[i])


_ZONE_NAMES = {"upper": "upper lung zone", "mid": "mid lung zone", "lower": "lower lung zone"}


def _side_name(side: int) -> str:
    return "right" if side < 0 else "left"


def _focal_lesion_occupancy(ph: _Phantom, lesion: FocalLesion, blk: _Block, tissue: np.ndarray,
                            rows: dict[str, tuple[int, int]], mi: _MaskInfo) -> tuple[_Block, tuple, np.ndarray] | None:
    """Place a consolidation or plate atelectasis in its zone.

    Returns:
        ``(sub_block, local_slices, occupancy)``: the occupancy on a sub-block of the side block
        ``blk`` (``local_slices`` index ``blk``'s arrays), confined to the zone's image rows; None
        when the zone is empty.
    """
    rng = np.random.default_rng([lesion.seed, 0x6C6F63])
    zone_mask = mi.masks.get(f"{_side_name(lesion.side)} {_ZONE_NAMES[lesion.zone]}")
    if zone_mask is None or not zone_mask.any():
        return None
    path = mi.lung_path_mm[lesion.side]
    margin = (lesion.size_mm * 0.5 if lesion.kind == "consolidation" else 6.0) / mi.pixel_mm
    pix = _choose_pixel(rng, zone_mask, path, margin)
    if pix is None:
        return None
    r, c = pix
    g = ph.grid
    fov = g.fov_mm
    z_c = -fov / 2 + (r + 0.5) * mi.pixel_mm  # scanner frame
    x_c = -fov / 2 + (c + 0.5) * mi.pixel_mm
    # depth: a voxel of aerated lung on that ray
    zi = int(np.clip(int((z_c + fov / 2) / g.spacing[0]) - blk.sl[0].start, 0, tissue.shape[0] - 1))
    xi = int(np.clip(int((x_c + fov / 2) / g.spacing[2]) - blk.sl[2].start, 0, tissue.shape[2] - 1))
    ray = tissue[zi, :, xi]
    candidates = np.nonzero(ray > 0.5)[0]
    yi = int(rng.choice(candidates)) if len(candidates) else int(np.argmax(ray))
    y_c = float(ph.frame.y[blk.sl[1]][yi])
    # the lesion is defined in the scanner frame; its sub-block is found through the patient frame
    reach = 1.6 * lesion.size_mm + 12.0
    zp, xp = ph.frame.to_patient_2d(np.array(z_c), np.array(x_c), y_c)
    placed = ph.frame.sub_block(blk, (float(zp) - reach, y_c - reach, float(xp) - reach),
                                (float(zp) + reach, y_c + reach, float(xp) + reach))
    if placed is None:
        return None
    sub, local = placed
    zs = ph.frame.z[sub.sl[0]][:, None, None]
    ys = ph.frame.y[sub.sl[1]][None, :, None]
    xs = ph.frame.x[sub.sl[2]][None, None, :]
    if lesion.kind == "consolidation":
        radii = tuple(lesion.size_mm * rng.uniform(lo, hi) for lo, hi in ((0.8, 1.2), (0.8, 1.3), (0.6, 0.95)))
        # lobulated outline: a few random low-frequency waves perturb the distance
        wobble = np.zeros((1, 1, 1), np.float32)
        for _ in range(3):
            k = rng.normal(0, 1, 3)
            k *= rng.uniform(0.06, 0.12) / np.linalg.norm(k)
            phase = k[0] * (zs - z_c) + k[1] * (ys - y_c) + k[2] * (xs - x_c) + rng.uniform(0, 6.3)
            wobble = wobble + 0.12 * np.cos(phase)
        dist = ellipsoid_distance(xs - x_c, ys - y_c, zs - z_c, radii) + wobble * min(radii)
        occ = soft_occupancy(dist, 6.0)
        occ = occ * (0.75 + 0.25 * np.cos(0.35 * (xs - x_c) + 0.3 * (zs - z_c)))  # patchy
    else:  # plate-like atelectasis: a thin disc, close to horizontal
        t = math.radians(rng.uniform(-15, 15))
        u = (xs - x_c) * math.cos(t) + (zs - z_c) * math.sin(t)
        v = -(xs - x_c) * math.sin(t) + (zs - z_c) * math.cos(t)
        thickness = rng.uniform(3.0, 5.5)
        plate = (lesion.size_mm, lesion.size_mm * 0.9, thickness)
        occ = soft_occupancy(ellipsoid_distance(u, ys - y_c, v, plate), ph.edge)
    # confined to the zone: image rows -> scanner z of the grid rows
    z0 = -fov / 2 + rows[lesion.zone][0] * mi.pixel_mm
    z1 = -fov / 2 + rows[lesion.zone][1] * mi.pixel_mm
    occ = occ * ((zs >= z0 + 1.0) & (zs <= z1 - 1.0))
    return sub, local, np.broadcast_to(occ, sub.X.shape).astype(np.float32)


# ============================================================================ 2D regions (pure)
def zone_rows(lung_mask: np.ndarray) -> dict[str, tuple[int, int]]:
    """Row ranges ``(first, last + 1)`` of the lung (``lung``) and of its thirds (``upper``, ``mid``,
    ``lower``); all ``(0, 0)`` for an empty mask."""
    rows = np.nonzero(np.asarray(lung_mask, bool).any(axis=1))[0]
    if len(rows) == 0:
        return {k: (0, 0) for k in ("lung", "upper", "mid", "lower")}
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    height = bottom - top
    b1, b2 = top + int(round(height / 3)), top + int(round(2 * height / 3))
    return {"lung": (top, bottom), "upper": (top, b1), "mid": (b1, b2), "lower": (b2, bottom)}


def lung_zones(lung_mask: np.ndarray, apical_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """Upper, mid and lower lung zones (thirds of the lung's height) and the apical zone.

    Args:
        lung_mask: (H, W) bool mask of one lung.
        apical_fraction: height of the apical zone (from the top) as a fraction of the lung's height.

    Returns:
        ``{"upper", "mid", "lower", "apical"}`` -> (H, W) bool masks inside ``lung_mask``.
    """
    lung_mask = np.asarray(lung_mask, bool)
    rows = zone_rows(lung_mask)
    top, bottom = rows["lung"]
    apical_height = max(1, int(round((bottom - top) * apical_fraction))) if bottom > top else 0
    rows["apical"] = (top, top + apical_height)
    out = {}
    for key in ("upper", "mid", "lower", "apical"):
        out[key] = np.zeros_like(lung_mask)
        r0, r1 = rows[key]
        out[key][r0:r1] = lung_mask[r0:r1]
    return out


def costophrenic_angle(lung_mask: np.ndarray, side: int, fraction: float = 0.22) -> np.ndarray:
    """The lateral-inferior corner of a lung.

    Args:
        lung_mask: (H, W) bool mask of one lung (PA display: the right lung on the image's left).
        side: -1 for the right lung (lateral = toward column 0), +1 for the left lung.
        fraction: edge of the square window at the corner, as a fraction of the lung's width.

    Returns:
        (H, W) bool: the lung pixels in a square window whose outer-lower corner is the lung pixel
        furthest along the lateral-inferior diagonal.
    """
    lung_mask = np.asarray(lung_mask, bool)
    out = np.zeros_like(lung_mask)
    rows, cols = np.nonzero(lung_mask)
    if len(rows) == 0:
        return out
    lateral = -cols if side < 0 else cols
    i = int(np.argmax(rows + lateral))
    r0, c0 = int(rows[i]), int(cols[i])
    w = max(2, int(round(fraction * (cols.max() - cols.min() + 1))))
    c_lo, c_hi = (c0, c0 + w) if side < 0 else (c0 - w + 1, c0 + 1)
    r_lo = max(0, r0 - w + 1)
    c_lo = max(0, c_lo)
    out[r_lo:r0 + 1, c_lo:c_hi] = lung_mask[r_lo:r0 + 1, c_lo:c_hi]
    return out


def cardiothoracic_ratio(masks: dict[str, np.ndarray]) -> float:
    """Widest horizontal extent of the cardiac silhouette over the widest extent of both lungs."""
    heart = np.asarray(masks["cardiac silhouette"], bool)
    lungs = np.asarray(masks["right lung"], bool) | np.asarray(masks["left lung"], bool)
    hc = np.nonzero(heart.any(axis=0))[0]
    lc = np.nonzero(lungs.any(axis=0))[0]
    if len(hc) == 0 or len(lc) == 0:
        return float("nan")
    return float((hc[-1] - hc[0] + 1) / (lc[-1] - lc[0] + 1))


def nodule_cnr(image_with: np.ndarray, image_without: np.ndarray, noise: np.ndarray,
               center_rc: Sequence[float], radius_px: float) -> float:
    """Contrast-to-noise ratio of a nodule.

    Contrast: mean over the nodule's disc of the noise-free image with the nodule minus the same
    image without it; noise: standard deviation of the noise field (noisy minus noise-free image)
    in an annulus 2..8 pixels outside the disc. All arrays (H, W) in the same display units.
    """
    h, w = image_with.shape
    rr, cc = np.ogrid[:h, :w]
    d = np.sqrt((rr - center_rc[0]) ** 2 + (cc - center_rc[1]) ** 2)
    disc = d <= max(radius_px, 0.75)
    ring = (d > radius_px + 2) & (d <= radius_px + 8)
    contrast = float(np.mean(image_with[disc] - image_without[disc]))
    sigma = float(np.std(noise[ring]))
    return contrast / max(sigma, 1e-6)


# ============================================================================ rendering
def _resize(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resampling of a 2D float array to (rows, cols), pixel areas aligned (as
    ``scipy.ndimage.zoom(..., grid_mode=True)``; Pillow is several times faster)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, dtype=np.float32)).resize((cols, rows), Image.BILINEAR))


def _upsample(a: np.ndarray, size: int) -> np.ndarray:
    return _resize(a, size, size)


def _lowpass(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian low-pass of a large sigma, computed on a downsampled copy (fast, smooth result)."""
    factor = max(1, int(sigma_px // 3))
    rows, cols = a.shape
    small = _resize(a, max(1, rows // factor), max(1, cols // factor))
    small = ndimage.gaussian_filter(small, sigma=sigma_px / factor, mode="nearest")
    return _resize(small, rows, cols)


def _nodule_line_integral(shape: tuple[int, int], center_rc: tuple[float, float], radius_mm: float,
                          pixel_mm: float, delta_mu: float) -> np.ndarray:
    """Excess line integral of a sphere (analytic chord length, 4x4 supersampled), (H, W)."""
    out = np.zeros(shape, np.float32)
    r_px = radius_mm / pixel_mm
    r0, r1 = int(max(0, math.floor(center_rc[0] - r_px - 1))), int(min(shape[0], math.ceil(center_rc[0] + r_px + 2)))
    c0, c1 = int(max(0, math.floor(center_rc[1] - r_px - 1))), int(min(shape[1], math.ceil(center_rc[1] + r_px + 2)))
    sub = (np.arange(4) + 0.5) / 4
    rr = (np.arange(r0, r1)[:, None] + sub[None, :]).reshape(-1)
    cc = (np.arange(c0, c1)[:, None] + sub[None, :]).reshape(-1)
    d2 = ((rr[:, None] - center_rc[0] - 0.5) ** 2 + (cc[None, :] - center_rc[1] - 0.5) ** 2) * pixel_mm**2
    chord = 2.0 * np.sqrt(np.maximum(radius_mm**2 - d2, 0.0))
    chord = chord.reshape(r1 - r0, 4, c1 - c0, 4).mean(axis=(1, 3))
    out[r0:r1, c0:c1] = delta_mu * chord
    return out


class _Detector:
    """Beer-Lambert transmission, scatter, quantum noise, detector blur and the display curve.

    The scatter field and the unsharp-mask background are computed once from a reference line
    integral (the whole study), so that images differing by a small lesion are processed alike.
    """

    def __init__(self, view: CaseView, size: int, reference_line_integral: np.ndarray):
        self.view = view
        self.size = size
        rng = np.random.default_rng([view.noise_seed, 0x6E6F6973])
        self.noise = rng.standard_normal((size, size)).astype(np.float32)
        rows = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        self.exposure = (1.0 + view.heel * rows)[:, None].astype(np.float32)
        primary = np.exp(-reference_line_integral) * self.exposure
        # scatter reaching the detector through the grid: a low-frequency fraction of the primary
        self.scatter = (0.04 * _lowpass(primary, size / 16) + 0.001).astype(np.float32)
        p = -np.log(primary + self.scatter)
        self.background = _lowpass(p, size / 20)

    def display(self, line_integral: np.ndarray, with_noise: bool) -> np.ndarray:
        """(H, W) line integral -> (H, W) display values in [0, 255] (float32)."""
        v = self.view
        counts = v.photons * (np.exp(-line_integral) * self.exposure + self.scatter)
        if with_noise:
            counts = counts + np.sqrt(counts) * self.noise
        counts = ndimage.gaussian_filter(np.maximum(counts, 0.5), sigma=0.6 * self.size / 256, mode="nearest")
        p = -np.log(counts / v.photons)
        # processing as done on digital radiographs: unsharp masking lifts local contrast (trachea,
        # vessels, rib edges) that the film curve alone would compress in dense regions
        p = p + v.enhance * (p - self.background)
        return (255.0 * 0.5 * (1.0 + np.tanh((p - v.display_center) / v.display_width))).astype(np.float32)


def render_case(params: CaseParameters, size: int = 256, grid: PhantomGrid = DEFAULT_GRID,
                catalog: Catalog | None = None) -> SimulatedCase:
    """Render one study: build the phantom, project it, place findings, label every region.

    Args:
        params: the study (see :func:`sample_case_parameters`).
        size: output image edge in pixels (square, covering the grid's field of view).
        grid: the phantom grid (coarse; the projection is upsampled to ``size``).
        catalog: the catalog whose regions and findings are labelled (default: ``synthetic_cxr``).

    Returns:
        A :class:`SimulatedCase`.
    """
    catalog = catalog or _catalog()
    ph = _Phantom(params, grid)
    ph.build_anatomy()
    pixel_mm = grid.fov_mm / size

    # ---- projected anatomy masks
    masks: dict[str, np.ndarray] = {}
    for name, proj in ph.projections.items():
        masks[name] = _upsample(proj, size) >= 0.5
    lung_path = {  # path length (mm) through each hemithorax, per pixel
        side: _upsample(ph.projections[f"{_side_name(side)} lung"], size) * grid.spacing[1] for side in (-1, 1)
    }
    rows_by_side = {}
    for side in (-1, 1):
        s = _side_name(side)
        lung = masks[f"{s} lung"]
        zones = lung_zones(lung)
        for key, zname in _ZONE_NAMES.items():
            masks[f"{s} {zname}"] = zones[key]
        masks[f"{s} apical zone"] = zones["apical"]
        masks[f"{s} costophrenic angle"] = costophrenic_angle(lung, side)
        rows_by_side[side] = zone_rows(lung)
    carina_rows = np.nonzero(masks["carina"].any(axis=1))[0]
    carina_row = int(carina_rows.mean()) if len(carina_rows) else size // 3
    masks["upper mediastinum"] = masks["mediastinum"].copy()
    masks["upper mediastinum"][carina_row:] = False
    info = _MaskInfo(masks=masks, lung_path_mm=lung_path, pixel_mm=pixel_mm)

    # ---- lung contents, line integral
    rendered3d = ph.fill_lungs(rows_by_side, info)
    line_integral = _upsample(ph.mu.sum(axis=1) * grid.spacing[1], size).astype(np.float32)

    # ---- nodules (analytic spheres at the image's resolution)
    nodules = []
    for lesion in params.findings.focal:
        if lesion.kind != "nodule":
            continue
        zone_mask = masks[f"{_side_name(lesion.side)} {_ZONE_NAMES[lesion.zone]}"]
        radius = lesion.size_mm / 2
        rng = np.random.default_rng([lesion.seed, 0x6C6F63])
        # inside the zone with a margin, where the ray crosses enough lung to hold the nodule
        path = lung_path[lesion.side]
        candidates = zone_mask & (path >= lesion.size_mm + 20)
        pix = _choose_pixel(rng, candidates if candidates.any() else zone_mask, path, radius / pixel_mm + 1)
        if pix is None:
            continue
        center = (pix[0] + float(rng.uniform(-0.5, 0.5)), pix[1] + float(rng.uniform(-0.5, 0.5)))
        unit = _nodule_line_integral((size, size), center, radius, pixel_mm, (MU_SOFT - MU_LUNG) * lesion.density)
        nodules.append({"lesion": lesion, "center": center, "radius_px": radius / pixel_mm, "unit": unit, "scale": 1.0})

    def total(exclude: int | None = None) -> np.ndarray:
        out = line_integral.copy()
        for j, n in enumerate(nodules):
            if j != exclude:
                out += n["unit"] * n["scale"]
        return out

    detector = _Detector(params.view, size, total())

    def measure_cnr() -> None:
        clean = detector.display(total(), with_noise=False)
        noise = detector.display(total(), with_noise=True) - clean
        for j, n in enumerate(nodules):
            without = detector.display(total(exclude=j), with_noise=False)
            n["cnr"] = nodule_cnr(clean, without, noise, n["center"], n["radius_px"])

    # low-contrast nodules: lower the contrast until the measured CNR reaches the target (the
    # display curve is nonlinear, so a few rounds)
    for _ in range(4):
        measure_cnr()
        too_high = [n for n in nodules if n["lesion"].target_cnr and n["cnr"] > n["lesion"].target_cnr * 1.02]
        for n in too_high:
            n["scale"] *= n["lesion"].target_cnr / n["cnr"]
        if not too_high:
            break
    else:
        measure_cnr()
    final = total()
    image_clean = detector.display(final, with_noise=False).astype(np.float32)
    image = detector.display(final, with_noise=True).astype(np.float32)

    # ---- labels
    lesions: list[dict[str, Any]] = []
    present = {n for n, m in masks.items() if m.any()}
    positives: dict[str, dict[str, str | None]] = {}

    def positive(anatomy: str, finding: str, detail: str | None = None) -> None:
        if anatomy in present:
            positives.setdefault(anatomy, {})
            if detail or finding not in positives[anatomy]:
                positives[anatomy][finding] = detail

    fnd = params.findings
    if fnd.cardiomegaly > 0:
        positive("cardiac silhouette", "cardiomegaly", "mild" if fnd.cardiomegaly < 0.3 else "moderate")
        lesions.append({"kind": "cardiomegaly", "anatomies": ["cardiac silhouette"], "enlargement": fnd.cardiomegaly})
    if fnd.widened_mediastinum_mm > 0:
        for a in ("mediastinum", "upper mediastinum"):
            positive(a, "widened mediastinum")
        lesions.append({"kind": "widened mediastinum", "anatomies": ["mediastinum", "upper mediastinum"],
                        "added_half_width_mm": fnd.widened_mediastinum_mm})
    if fnd.edema > 0:
        names = [f"{s} {z}" for s in ("right", "left") for z in ("lung", *_ZONE_NAMES.values())]
        for a in names:
            positive(a, "edema", "mild" if fnd.edema < 0.9 else "moderate")
        lesions.append({"kind": "edema", "anatomies": names, "severity": fnd.edema})
    for si, (s, side) in enumerate(SIDES):
        if fnd.elevated_hemidiaphragm_mm[si] > 0:
            positive(f"{s} hemidiaphragm", "elevated hemidiaphragm")
            lesions.append({"kind": "elevated hemidiaphragm", "anatomies": [f"{s} hemidiaphragm"],
                            "elevation_mm": fnd.elevated_hemidiaphragm_mm[si]})
        if fnd.enlarged_hilum[si] > 0:
            positive(f"{s} hilar structures", "enlarged hilum")
            lesions.append({"kind": "enlarged hilum", "anatomies": [f"{s} hilar structures"],
                            "enlargement": fnd.enlarged_hilum[si]})
        if fnd.pleural_effusion[si] > 0:
            amount = fnd.pleural_effusion[si]
            size_word = "small" if amount < 0.4 else "moderate" if amount < 0.75 else "large"
            names = [f"{s} lung", f"{s} lower lung zone", f"{s} costophrenic angle"]
            for a in names:
                positive(a, "pleural effusion", size_word)
            lesions.append({"kind": "pleural effusion", "anatomies": names, "size": amount,
                            **ph.sides[side].get("effusion", {})})
        if fnd.pneumothorax[si] > 0:
            k = fnd.pneumothorax[si]
            hz = ph.sides[side]["hilum_center"][0]
            gap = (hz - ph.anat.apex_z) * k
            size_word = "small" if gap < 25 else "moderate" if gap < 40 else "large"
            names = [f"{s} lung", f"{s} upper lung zone", f"{s} apical zone"]
            for a in names:
                positive(a, "pneumothorax", size_word)
            lesions.append({"kind": "pneumothorax", "anatomies": names, "retraction": k,
                            "apical_gap_mm": round(float(gap), 1)})
    for item in rendered3d:
        lesion, proj = item["lesion"], _upsample(item["projection"], size)
        if proj.max() <= 0:
            continue
        footprint = proj > 0.15 * proj.max()
        s = _side_name(lesion.side)
        names = [f"{s} lung"]
        for key, zname in _ZONE_NAMES.items():
            frac = (footprint & masks[f"{s} {zname}"]).sum() / max(1, footprint.sum())
            if frac >= 0.25 or key == lesion.zone:
                names.append(f"{s} {zname}")
        detail = ("dense" if lesion.density > 0.8 else "patchy") if lesion.kind == "consolidation" else "plate-like"
        for a in names:
            positive(a, lesion.kind, detail)
        rr, cc = np.nonzero(footprint)
        lesions.append({"kind": lesion.kind, "anatomies": names, "zone": lesion.zone,
                        "center_xy": [float(cc.mean()), float(rr.mean())], "size_mm": lesion.size_mm,
                        "box_xyxy": [int(cc.min()), int(rr.min()), int(cc.max()) + 1, int(rr.max()) + 1]})
    for n in nodules:
        lesion = n["lesion"]
        s = _side_name(lesion.side)
        names = [f"{s} lung", f"{s} {_ZONE_NAMES[lesion.zone]}"]
        detail = f"{int(round(lesion.size_mm))} mm"
        for a in names:
            cur = positives.get(a, {}).get("nodule")
            if cur is None or int(cur.split()[0]) < int(round(lesion.size_mm)):
                positive(a, "nodule", detail)
        r, c = n["center"]
        rp = n["radius_px"]
        lesions.append({"kind": "nodule", "anatomies": names, "zone": lesion.zone, "center_xy": [c + 0.5, r + 0.5],
                        "diameter_mm": round(lesion.size_mm, 2), "diameter_px": round(2 * rp, 2),
                        "low_contrast": lesion.target_cnr is not None, "cnr": round(float(n["cnr"]), 3),
                        "box_xyxy": [int(math.floor(c + 0.5 - rp)), int(math.floor(r + 0.5 - rp)),
                                     int(math.ceil(c + 0.5 + rp)), int(math.ceil(r + 0.5 + rp))]})

    findings: dict[str, dict[str, int]] = {}
    details: dict[str, dict[str, str]] = {}
    for anatomy in catalog.anatomies:
        if anatomy.name not in present or not anatomy.findings:
            continue
        pos = positives.get(anatomy.name, {})
        findings[anatomy.name] = {f: int(f in pos) for f in anatomy.findings}
        d = {f: v for f, v in pos.items() if v and f in anatomy.findings}
        if d:
            details[anatomy.name] = d
    ordered_masks = {a.name: masks[a.name] for a in catalog.anatomies if a.name in present}
    return SimulatedCase(
        image=image,
        image_clean=image_clean,
        masks=ordered_masks,
        findings=findings,
        details=details,
        lesions=lesions,
        line_integral=final,
        pixel_mm=pixel_mm,
        ctr=cardiothoracic_ratio(ordered_masks),
        bit_depth=params.view.bit_depth,
    )


def simulate_case(seed: int = 0, case_index: int = 0, patient_index: int | None = None,
                  conspicuity: float = 1.0, size: int = 256) -> tuple[CaseParameters, SimulatedCase]:
    """Sample and render case ``case_index`` of the dataset generated with ``seed`` (no files written)."""
    rng = np.random.default_rng([int(seed), int(case_index)])
    patient_rng = _patient_rng(seed, case_index if patient_index is None else patient_index)
    params = sample_case_parameters(rng, patient_rng, conspicuity)
    return params, render_case(params, size)


# ============================================================================ dataset
@lru_cache(maxsize=None)
def _catalog() -> Catalog:
    return load_catalog(CATALOG_NAME)


def mask_filename(anatomy: str) -> str:
    """File name of an anatomy's mask: spaces become underscores (``right_upper_lung_zone.png``)."""
    return anatomy.replace(" ", "_") + ".png"


@dataclass(frozen=True)
class CasePlan:
    index: int
    case_id: str
    patient_index: int
    patient_id: str
    split: str


def plan_cases(n_cases: int, seed: int, n_test: int | None = None, n_val: int | None = None) -> list[CasePlan]:
    """Ids, patients and splits of every case (``synthetic.splits.plan_patients``).

    Some patients have a second study (same anatomy, new view and findings); both studies stay
    in one split, so patients never span splits.
    """
    return [
        CasePlan(index, f"case_{index:04d}", patient, f"p{patient:04d}", split)
        for index, patient, split in plan_patients(n_cases, seed, PLAN_STREAM, P_FOLLOW_UP, n_test, n_val)
    ]


def _generate_one(args: tuple[str, CasePlan, int, float, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    out_dir, plan, seed, conspicuity, size = args
    out = Path(out_dir)
    catalog = _catalog()
    rng = np.random.default_rng([int(seed), plan.index])
    params = sample_case_parameters(rng, _patient_rng(seed, plan.patient_index), conspicuity)
    case = render_case(params, size, catalog=catalog)
    report, sentences = write_report(catalog, case.findings, rng, details=case.details)

    image_rel = f"images/{plan.case_id}.png"
    Image.fromarray(case.quantised()).save(out / image_rel)
    mask_dir = out / "masks" / plan.case_id
    mask_dir.mkdir(parents=True, exist_ok=True)
    mask_paths = {}
    for name, mask in case.masks.items():
        rel = f"masks/{plan.case_id}/{mask_filename(name)}"
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / rel)
        mask_paths[name] = rel
    record = {
        "id": plan.case_id,
        "patient": plan.patient_id,
        "image": image_rel,
        "anatomy_masks": mask_paths,
        "report": report,
        "anatomy_sentences": sentences,
        "findings": case.findings,
    }
    truth = {
        "patient": plan.patient_id,
        "split": plan.split,
        "bit_depth": case.bit_depth,
        "cardiothoracic_ratio": round(case.ctr, 4),
        "lesions": case.lesions,
        "view": {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(params.view).items()},
    }
    return record, truth


def _prevalence(records: list[dict[str, Any]], catalog: Catalog) -> dict[str, Any]:
    per_case: dict[str, float] = {}
    per_pair: dict[str, float] = {}
    findings = sorted({f for a in catalog.anatomies for f in a.findings})
    n = max(1, len(records))
    for f in findings:
        per_case[f] = round(sum(any(v.get(f) == 1 for v in r["findings"].values()) for r in records) / n, 4)
    for a, f in catalog.finding_pairs():
        known = [r["findings"][a][f] for r in records if a in r["findings"]]
        if known:
            per_pair[f"{a} / {f}"] = round(sum(known) / len(known), 4)
    return {"cases": len(records), "per_case": per_case, "per_anatomy_finding": per_pair}


def generate_cxr_dataset(
    out_dir: Path,
    n_cases: int | None = None,
    seed: int = 0,
    n_test: int | None = None,
    n_val: int | None = None,
    conspicuity: float = 1.0,
    size: int = 256,
    workers: int = 1,
    progress: bool = True,
    **kwargs,
) -> Path:
    """Generate the synthetic CXR dataset in the data contract's format.

    Writes ``out_dir/datalist.json`` (``synthetic-cxr-v1``, modality CXR, ``"catalog":
    "catalog.json"``), ``out_dir/catalog.json`` (the packaged ``synthetic_cxr`` catalog),
    ``out_dir/images/<id>.png`` (8-bit, about 10% 16-bit), one binary mask PNG (0/255, the image's
    pixel size) per present anatomy ``out_dir/masks/<id>/<anatomy_with_underscores>.png``, and
    ``out_dir/ground_truth.json`` (not part of the contract: per-case lesion positions, sizes,
    contrast-to-noise ratios, cardiothoracic ratios, and the prevalence of every finding).

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        n_cases: number of cases (default 320: 180 training, 40 validation, 100 test).
        seed: random seed; case ``i`` uses ``np.random.default_rng([seed, i])``, so the output is
            identical for any ``workers``.
        n_test, n_val: test and validation cases (default: scaled from 100 and 40 per 320).
        conspicuity: multiplier of finding contrast and size (1 = default; low-contrast nodules
            then have a contrast-to-noise ratio of at most 3).
        size: image edge in pixels (square; field of view 400 mm).
        workers: processes generating cases in parallel.
        progress: show a tqdm progress bar.
        **kwargs: options of other generators are ignored with a warning.

    Returns:
        The path of ``datalist.json``.
    """
    if kwargs:
        warnings.warn(f"generate_cxr_dataset: ignoring unknown options {sorted(kwargs)}", stacklevel=2)
    out_dir = Path(out_dir)
    n_cases = DEFAULT_N_CASES if n_cases is None else int(n_cases)
    if not (isinstance(conspicuity, (int, float)) and conspicuity > 0):
        raise ValueError(f"conspicuity must be a positive number, got {conspicuity!r}")
    if int(size) < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size!r}")
    size = int(size)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output path exists and is not a folder")
    plans = plan_cases(n_cases, seed, n_test, n_val)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    catalog = _catalog()
    jobs = [(str(out_dir), p, int(seed), float(conspicuity), size) for p in plans]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="synthetic CXR", unit="case")
    results = []
    workers = max(1, int(workers))
    if workers == 1:
        for job in jobs:
            results.append(_generate_one(job))
            if bar is not None:
                bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for res in pool.map(_generate_one, jobs, chunksize=4):
                results.append(res)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()

    splits: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    truth = {}
    for plan, (record, case_truth) in zip(plans, results):
        splits[plan.split].append(record)
        truth[plan.case_id] = case_truth
    catalog.save(out_dir / "catalog.json")
    all_records = [r for s in splits.values() for r in s]
    ground_truth = {
        "generator": "anatomy_vlp_bundle.synthetic.cxr",
        "seed": int(seed),
        "n_cases": n_cases,
        "size": size,
        "pixel_mm": DEFAULT_GRID.fov_mm / size,
        "conspicuity": float(conspicuity),
        "prevalence": _prevalence(all_records, catalog),
        "cases": truth,
    }
    (out_dir / "ground_truth.json").write_text(json.dumps(ground_truth, indent=1) + "\n", encoding="utf-8")
    return write_datalist(out_dir / "datalist.json", name=DATALIST_NAME, modality="CXR", catalog="catalog.json",
                          splits=splits)
