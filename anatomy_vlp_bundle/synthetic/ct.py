"""Synthetic 3D torso CT phantoms with label maps, findings and reports (``synth --modality ct``).

Every case is a lower-thorax / upper-abdomen CT in Hounsfield units: air, body outline with
subcutaneous fat, muscle wall and ribs, lungs (five lobes), heart, aorta, vertebrae, liver,
gallbladder, spleen, pancreas, kidneys, stomach, bowel loops, vessels and a table. Organs are
(super)ellipsoids, tubes and sweeps evaluated on the case's voxel grid (each on a sub-grid around
the organ), with per-patient shape, size, position and orientation variation. Findings (catalog
``synthetic_ct``) change the voxels: small focal lesions (hypo- and hyperdense, some with a
contrast-to-noise ratio below 3), diffuse density changes, enlargement / atrophy, fluid and wall
changes. The CT is blurred slightly (scanner point-spread) and gets correlated noise.

Coordinates. The anatomy is laid out in *canonical* millimetres, RAS+ (``+x`` patient right,
``+y`` anterior, ``+z`` superior), origin at the body centre, for the reference field of view of
320 x 256 x 256 mm (``shape=(80, 64, 64)`` at 4 mm). Another ``shape`` / ``spacing`` scales the
phantom per axis to its field of view (focal lesions too), so reduced grids in tests hold the same
anatomy. Volumes are built as RAS arrays (array axes i, j, k = x, y, z) and then written in the
case's stored orientation (about 20% of images are not RAS, about 10% of masks have axes flipped
relative to their image; the affines say so), so readers must use physical positions. On request
(``lesion_masks``) the focal lesions' footprints are written as a second label map with its own
catalog and datalist, for lesion segmentation.

Label values are TotalSegmentator v2 ``total`` ids (spleen 1, kidneys 2/3, gallbladder 4, liver 5,
stomach 6, pancreas 7, lung lobes 10-14, vertebrae 26-44, heart 51, aorta 52), so the
``ct_totalseg`` catalog reads the masks as well. Fluid of a pleural or pericardial effusion and a
dilated renal collecting system keep the label of their organ (the anatomy's region then holds
its finding).

Determinism: case ``i`` draws from ``np.random.default_rng([seed, i])`` and its patient's anatomy
from ``np.random.default_rng([seed, PATIENT_STREAM, patient])``; every random number is drawn
whether or not it is used, so a case depends on nothing but its own seeds and the arguments, and
``workers > 1`` writes identical files.
"""

from __future__ import annotations

import copy
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from ..data.catalog import Catalog, load_catalog
from ..data.datalist import write_datalist
from ..options import as_flag
from .report_writer import write_report
from .splits import DEFAULT_N_CASES, plan_patients

__all__ = [
    "generate_ct_dataset",
    "split_plan",
    "sample_ct_case",
    "render_ct_case",
    "CTCaseSpec",
    "RenderedCT",
    "Lesion",
    "FINDING_KINDS",
    "STUDY_FINDING_KINDS",
    "FOCAL_FINDINGS",
    "LOW_CONTRAST_FINDINGS",
    "ANATOMY_LABELS",
    "CATALOG_NAME",
    "DATASET_NAME",
    "LESION_CATALOG",
    "LESION_DATASET_NAME",
]

CATALOG_NAME = "synthetic_ct"
DATASET_NAME = "synthetic-ct-v1"
#: Catalog and datalist of the optional focal-lesion masks (``generate_ct_dataset(lesion_masks=True)``).
LESION_CATALOG = Catalog.from_dict(
    {
        "name": "synthetic_ct_lesions",
        "modality": "CT",
        "anatomies": [{"name": "focal lesion", "labels": [1], "synonyms": ["focal lesion", "lesion"], "findings": []}],
    },
    source="builtin:synthetic_ct_lesions",
)
LESION_DATASET_NAME = "synthetic-ct-v1-lesions"
DEFAULT_SHAPE = (80, 64, 64)
DEFAULT_SPACING = (4.0, 4.0, 4.0)
#: Field of view (mm) the canonical anatomy is laid out for; other grids scale it per axis.
REFERENCE_FOV_MM = (320.0, 256.0, 256.0)
DEFAULT_PREVALENCE = 0.27
#: Probability that a patient has a second study (same anatomy, new findings and positioning).
SECOND_STUDY_PROBABILITY = 0.25
GALLBLADDER_ABSENT_PROBABILITY = 0.05  # cholecystectomy: an anatomy that is absent in some cases
IMAGE_REORIENT_PROBABILITY = 0.2
MASK_FLIP_PROBABILITY = 0.1
OTHER_IMAGE_ORIENTATIONS = (("L", "P", "S"), ("L", "A", "S"), ("R", "P", "S"), ("L", "P", "I"))
PATIENT_STREAM = 7919  # second seed word of per-patient generators, apart from case indices
PLAN_STREAM = 104729

# Label ids (TotalSegmentator v2 "total").
SPLEEN, KIDNEY_RIGHT, KIDNEY_LEFT, GALLBLADDER, LIVER, STOMACH, PANCREAS = 1, 2, 3, 4, 5, 6, 7
LUNG_UPPER_LEFT, LUNG_LOWER_LEFT, LUNG_UPPER_RIGHT, LUNG_MIDDLE_RIGHT, LUNG_LOWER_RIGHT = 10, 11, 12, 13, 14
HEART, AORTA = 51, 52
VERTEBRA_L1 = 31  # T12 = 32, ..., T1 = 43, C7 = 44; L2 = 30, ..., L5 = 27, S1 = 26
VERTEBRA_OFFSETS = range(-5, 14)  # S1 .. C7 relative to L1

#: (anatomy, finding) -> kind. The single table of what the renderer can draw; it must match the
#: catalog's findings exactly (checked when generating).
FINDING_KINDS: dict[tuple[str, str], str] = {
    ("lung", "lung nodule"): "focal",
    ("lung", "emphysema"): "diffuse",
    ("lung", "pleural effusion"): "fluid",
    ("heart", "cardiomegaly"): "enlargement",
    ("heart", "pericardial effusion"): "fluid",
    ("heart", "coronary artery wall calcification"): "focal",
    ("aorta", "arterial wall calcification"): "focal",
    ("aorta", "aortic aneurysm"): "enlargement",
    ("liver", "hypodense lesion"): "focal",
    ("liver", "calcification"): "focal",
    ("liver", "steatosis"): "diffuse",
    ("liver", "hepatomegaly"): "enlargement",
    ("gallbladder", "gallstone"): "focal",
    ("gallbladder", "gallbladder wall thickening"): "wall",
    ("spleen", "hypodense lesion"): "focal",
    ("spleen", "calcification"): "focal",
    ("spleen", "splenomegaly"): "enlargement",
    ("pancreas", "hypodense lesion"): "focal",
    ("pancreas", "pancreatic duct dilatation"): "fluid",
    ("pancreas", "atrophy"): "atrophy",
    ("right kidney", "renal cyst"): "focal",
    ("right kidney", "renal stone"): "focal",
    ("right kidney", "hydronephrosis"): "fluid",
    ("left kidney", "renal cyst"): "focal",
    ("left kidney", "renal stone"): "focal",
    ("left kidney", "hydronephrosis"): "fluid",
    ("stomach", "gastric wall thickening"): "wall",
    ("stomach", "gastric distension"): "enlargement",
    ("vertebrae", "sclerotic lesion"): "focal",
    ("vertebrae", "lytic lesion"): "focal",
    ("vertebrae", "vertebral fracture"): "shape",
    ("vertebrae", "osteopenia"): "diffuse",
}
STUDY_FINDING_KINDS: dict[str, str] = {"ascites": "fluid"}
FOCAL_FINDINGS = tuple(k for k, v in FINDING_KINDS.items() if v == "focal")
#: Focal findings whose contrast is set as a contrast-to-noise ratio of at most 3 (x conspicuity).
LOW_CONTRAST_FINDINGS = (("liver", "hypodense lesion"), ("pancreas", "hypodense lesion"))

ANATOMY_LABELS = {
    "lung": (LUNG_UPPER_LEFT, LUNG_LOWER_LEFT, LUNG_UPPER_RIGHT, LUNG_MIDDLE_RIGHT, LUNG_LOWER_RIGHT),
    "heart": (HEART,),
    "aorta": (AORTA,),
    "liver": (LIVER,),
    "gallbladder": (GALLBLADDER,),
    "spleen": (SPLEEN,),
    "pancreas": (PANCREAS,),
    "right kidney": (KIDNEY_RIGHT,),
    "left kidney": (KIDNEY_LEFT,),
    "stomach": (STOMACH,),
    "vertebrae": tuple(range(25, 51)),  # sacrum .. C1; the field of view holds a run of them
}


# ============================================================================ case description
@dataclass
class CTCaseSpec:
    """Everything random about one case, drawn by :func:`sample_ct_case`; rendering is a pure function of it.

    Attributes:
        index, patient: case and patient numbers.
        conspicuity: multiplier of every finding's contrast / size change.
        anatomy: structure name -> parameters (canonical mm, HU), patient base plus study jitter.
        findings: anatomy -> finding -> 1 | 0 as drawn (a focal lesion that finds no room is
            dropped to 0 at rendering; the record holds the rendered truth).
        finding_params: ``"anatomy/finding"`` -> parameters, drawn for every finding, present or not.
        study_findings: finding -> 1 | 0 for findings no anatomy owns.
        noise_sigma: standard deviation (HU) of the added, spatially correlated noise.
        noise_seed: seed of the noise field.
        grid_center_world: world RAS position (mm) of the grid centre (origins vary by case).
        body_shift: world offset (mm) of the body centre from the grid centre.
        image_axcodes, mask_axcodes: stored orientations of image and label map (nibabel codes).
        report_seed: seed of the report wording.
    """

    index: int
    patient: int
    conspicuity: float
    anatomy: dict[str, dict[str, Any]]
    findings: dict[str, dict[str, int]]
    finding_params: dict[str, dict[str, Any]]
    study_findings: dict[str, int]
    noise_sigma: float
    noise_seed: int
    grid_center_world: tuple[float, float, float]
    body_shift: tuple[float, float, float]
    image_axcodes: tuple[str, str, str] = ("R", "A", "S")
    mask_axcodes: tuple[str, str, str] = ("R", "A", "S")
    report_seed: int = 0

    def present(self, anatomy: str, finding: str) -> bool:
        return bool(self.findings.get(anatomy, {}).get(finding, 0))

    def params(self, anatomy: str, finding: str) -> dict[str, Any]:
        return self.finding_params[f"{anatomy}/{finding}"]


@dataclass
class Lesion:
    """A rendered focal finding.

    Attributes:
        anatomy, finding: what it is.
        center_voxel: RAS voxel index (i, j, k) of its centre.
        diameter_mm: nominal diameter (world mm).
        footprint: boolean RAS volume of the voxels it changed (before scanner blur).
        mean_delta_hu: mean HU change over the footprint (before blur and noise).
    """

    anatomy: str
    finding: str
    center_voxel: tuple[int, int, int]
    diameter_mm: float
    footprint: np.ndarray
    mean_delta_hu: float


@dataclass
class RenderedCT:
    """A rendered case in RAS array order (axes i, j, k = x right, y anterior, z superior).

    Attributes:
        hu: (X, Y, Z) int16 CT in HU (float32 when rendered with ``quantize=False``).
        labels: (X, Y, Z) uint8 TotalSegmentator label map.
        affine: 4x4 RAS voxel-to-world affine (mm).
        findings: anatomy -> finding -> 1 | 0 for every anatomy present (as rendered).
        study_findings: finding -> 1 | 0.
        lesions: focal findings that were drawn.
        noise_sigma: HU standard deviation of the added noise.
    """

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    findings: dict[str, dict[str, int]]
    study_findings: dict[str, int]
    lesions: list[Lesion] = field(default_factory=list)
    noise_sigma: float = 0.0

    def details(self) -> dict[str, dict[str, str]]:
        """anatomy -> finding -> size text of focal lesions (for the report)."""
        out: dict[str, dict[str, str]] = {}
        for les in self.lesions:
            out.setdefault(les.anatomy, {})[les.finding] = f"{max(1, round(les.diameter_mm))} mm"
        return out


# ============================================================================ sampling
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _wobble(rng: np.random.Generator, amplitude: float) -> list[float]:
    """Coefficients of the 8 low-order shape modes of :func:`_superellipsoid` (bends, bulges, tilts)."""
    return [float(v) for v in rng.uniform(-amplitude, amplitude, size=8)]


def _angles(rng: np.random.Generator, base: Sequence[float], jitter: Sequence[float]) -> list[float]:
    return [float(b + rng.uniform(-j, j)) for b, j in zip(base, jitter)]


def _sample_patient(prng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """A patient's anatomy: sizes, shapes, positions (canonical mm) and tissue HU; see module docstring."""
    a: dict[str, dict[str, Any]] = {}
    a["body"] = dict(
        ax=145.0 * _u(prng, 0.92, 1.04), ay=100.0 * _u(prng, 0.9, 1.06), yc=-6.0 + _u(prng, -4, 4),
        exponent=_u(prng, 2.2, 3.0), taper=_u(prng, -0.05, 0.05), fat_mm=_u(prng, 6, 28), muscle_mm=_u(prng, 8, 14),
        fat_hu=_u(prng, -112, -88), visceral_fat_hu=_u(prng, -105, -80), muscle_hu=_u(prng, 42, 58),
        rib_pitch=_u(prng, 26, 32), rib_phase=_u(prng, 0, 30), rib_hu=_u(prng, 350, 600), table_hu=_u(prng, 80, 200),
    )
    a["diaphragm"] = dict(z_right=_u(prng, 15, 32), drop_left=_u(prng, 4, 14), curvature=_u(prng, 30, 45))
    a["spine"] = dict(
        yv=_u(prng, -42, -34), rx=22.0 * _u(prng, 0.9, 1.1), ry=17.0 * _u(prng, 0.9, 1.1), pitch=_u(prng, 27, 32),
        z_l1=_u(prng, -60, -40), cortical_hu=_u(prng, 450, 700), cancellous_hu=_u(prng, 200, 290),
        posterior_hu=_u(prng, 350, 500), disc_hu=_u(prng, 70, 100),
    )
    a["lung"] = dict(
        right=dict(center=[68 + _u(prng, -5, 5), -5 + _u(prng, -5, 5), 60.0], semi=[62.0, 88.0, 140.0], exponent=_u(prng, 2.3, 2.9)),
        left=dict(center=[-70 + _u(prng, -5, 5), -5 + _u(prng, -5, 5), 60.0], semi=[58.0, 88.0, 140.0], exponent=_u(prng, 2.3, 2.9)),
        mediastinum_halfwidth=_u(prng, 16, 28), hu=_u(prng, -875, -825),
        fissure_z=_u(prng, 10, 35), fissure_slope=_u(prng, 0.8, 1.2), horizontal_fissure_z=_u(prng, 75, 95),
    )
    a["heart"] = dict(
        center=[-18 + _u(prng, -8, 8), 22 + _u(prng, -6, 6), 40 + _u(prng, -6, 6)],
        semi=[56 * _u(prng, 0.9, 1.1), 44 * _u(prng, 0.9, 1.1), 42 * _u(prng, 0.9, 1.1)],
        angles=_angles(prng, (-40, 20, 0), (10, 8, 8)), exponent=_u(prng, 1.9, 2.1), wobble=_wobble(prng, 0.05),
        myocardium_hu=_u(prng, 90, 120), blood_fraction=_u(prng, 0.85, 1.0), fat_mm=_u(prng, 3, 8),
    )
    a["aorta"] = dict(
        r_thoracic=_u(prng, 11, 14), r_abdominal=_u(prng, 8.5, 11), x_thoracic=_u(prng, -24, -16), x_abdominal=_u(prng, -12, -5),
        asc_center=[_u(prng, 8, 18), _u(prng, 14, 24)], r_ascending=_u(prng, 13, 17), hu=_u(prng, 160, 240),
    )
    a["vessels"] = dict(ivc_x=_u(prng, 18, 26), ivc_r=_u(prng, 9, 13), ivc_hu=_u(prng, 100, 140), svc_hu=_u(prng, 120, 250))
    a["liver"] = dict(
        center=[64 + _u(prng, -6, 6), 5 + _u(prng, -6, 6), -25 + _u(prng, -6, 6)],
        semi=[70 * _u(prng, 0.9, 1.1), 76 * _u(prng, 0.9, 1.1), 72 * _u(prng, 0.9, 1.1)],
        angles=_angles(prng, (0, 0, 0), (10, 8, 8)), exponent=_u(prng, 2.2, 2.8), wobble=_wobble(prng, 0.08),
        left_center=[0 + _u(prng, -8, 8), 45 + _u(prng, -6, 6), 0 + _u(prng, -8, 8)],
        left_semi=[42 * _u(prng, 0.8, 1.15), 28 * _u(prng, 0.85, 1.15), 34 * _u(prng, 0.85, 1.15)],
        hu=_u(prng, 55, 66), vessel_hu=_u(prng, 40, 70),
        vessel_dirs=[[float(v) for v in prng.normal(size=3)] for _ in range(5)], vessel_len=[_u(prng, 35, 70) for _ in range(5)],
    )
    a["gallbladder"] = dict(
        center=[45 + _u(prng, -8, 8), 40 + _u(prng, -6, 6), -52 + _u(prng, -8, 8)],
        semi=[15 * _u(prng, 0.8, 1.2), 18 * _u(prng, 0.8, 1.2), 36 * _u(prng, 0.8, 1.2)],
        angles=_angles(prng, (0, 0, -30), (15, 15, 12)), hu=_u(prng, 0, 15), wall_hu=_u(prng, 45, 70),
    )
    a["spleen"] = dict(
        center=[-78 + _u(prng, -5, 5), -32 + _u(prng, -6, 6), -26 + _u(prng, -8, 8)],
        semi=[25 * _u(prng, 0.85, 1.15), 55 * _u(prng, 0.85, 1.15), 50 * _u(prng, 0.85, 1.15)],
        angles=_angles(prng, (30, 0, 0), (12, 10, 10)), exponent=_u(prng, 1.9, 2.4), wobble=_wobble(prng, 0.08), hu=_u(prng, 45, 55),
    )
    for side, sx, z0 in (("right kidney", 1.0, -78.0), ("left kidney", -1.0, -68.0)):
        a[side] = dict(
            center=[sx * (62 + _u(prng, -5, 5)), -42 + _u(prng, -5, 5), z0 + _u(prng, -8, 8)],
            semi=[26 * _u(prng, 0.9, 1.1), 24 * _u(prng, 0.9, 1.1), 52 * _u(prng, 0.9, 1.1)],
            angles=_angles(prng, (sx * 25, sx * -12, 0), (10, 6, 6)), exponent=_u(prng, 1.9, 2.2), wobble=_wobble(prng, 0.05),
            side=sx, hu=_u(prng, 130, 170), sinus_hu=_u(prng, -90, -60),
        )
    a["stomach"] = dict(
        center=[-45 + _u(prng, -6, 6), 38 + _u(prng, -6, 6), -8 + _u(prng, -8, 8)],
        semi=[40 * _u(prng, 0.85, 1.15), 30 * _u(prng, 0.85, 1.15), 50 * _u(prng, 0.85, 1.15)],
        angles=_angles(prng, (0, -25, 15), (10, 10, 10)), exponent=_u(prng, 1.9, 2.3), wobble=_wobble(prng, 0.08),
        wall_mm=_u(prng, 3.5, 5), wall_hu=_u(prng, 40, 60), content_hu=_u(prng, 5, 25), air_level=_u(prng, 0.0, 0.6),
    )
    a["pancreas"] = dict(
        head=[30 + _u(prng, -6, 6), 2 + _u(prng, -5, 5), -48 + _u(prng, -6, 6)],
        body=[-5 + _u(prng, -6, 6), 20 + _u(prng, -4, 4), -36 + _u(prng, -6, 6)],
        tail=[-70 + _u(prng, -6, 6), -18 + _u(prng, -6, 6), -22 + _u(prng, -6, 6)],
        radii=[15 * _u(prng, 0.85, 1.15), 11 * _u(prng, 0.85, 1.15), 10 * _u(prng, 0.85, 1.15)], hu=_u(prng, 40, 52),
    )
    a["bowel"] = dict(
        loops=[dict(u=[float(v) for v in prng.uniform(0, 1, size=3)], r=_u(prng, 9, 16), content=int(prng.integers(3)),
                    content_hu=_u(prng, 0, 25)) for _ in range(14)],
        wall_hu=_u(prng, 30, 50),
    )
    a["lung_vessels"] = dict(blobs=[dict(u=_u(prng, 0, 1), r=_u(prng, 2.0, 4.0)) for _ in range(40)], hu=_u(prng, 0, 60))
    _fit_to_habitus(a)
    return a


#: Body-cavity half-width and half-depth (mm) the organ positions above are written for.
_NOMINAL_CAVITY = (117.0, 72.0)
_ORGANS_TO_FIT = ("heart", "liver", "gallbladder", "spleen", "right kidney", "left kidney", "stomach")


def _fit_to_habitus(a: dict[str, dict[str, Any]]) -> None:
    """Move organs with the patient's body cavity (a slim patient's spleen must not be cut by the ribs).

    Centres scale with the cavity's half-width (x) and half-depth (y, about the body centre);
    organ sizes scale with the square root of the mean factor.
    """
    b = a["body"]
    fx = (b["ax"] - b["fat_mm"] - b["muscle_mm"]) / _NOMINAL_CAVITY[0]
    fy = (b["ay"] - b["fat_mm"] - b["muscle_mm"]) / _NOMINAL_CAVITY[1]
    size = math.sqrt(0.5 * (fx + fy))
    yc = b["yc"]

    def move(p):
        return [p[0] * fx, yc + (p[1] - yc) * fy, p[2]]

    for name in _ORGANS_TO_FIT:
        a[name]["center"] = move(a[name]["center"])
        a[name]["semi"] = [v * size for v in a[name]["semi"]]
    a["liver"]["left_center"] = move(a["liver"]["left_center"])
    a["liver"]["left_semi"] = [v * size for v in a["liver"]["left_semi"]]
    for key in ("head", "body", "tail"):
        a["pancreas"][key] = move(a["pancreas"][key])
    for side in ("right", "left"):
        a["lung"][side]["center"] = move(a["lung"][side]["center"])
    a["spine"]["yv"] = yc + (a["spine"]["yv"] - yc) * fy
    ao = a["aorta"]
    ao["x_thoracic"] *= fx
    ao["x_abdominal"] *= fx
    ao["asc_center"] = move([*ao["asc_center"], 0.0])[:2]
    a["vessels"]["ivc_x"] *= fx


def _sample_study(srng: np.random.Generator, base: dict[str, dict[str, Any]]) -> tuple[dict, tuple, tuple]:
    """Study-level jitter of a patient's anatomy: positioning, breathing, organ nudges.

    Returns:
        ``(anatomy, body_shift, grid_center_world)``: a jittered copy of ``base``, the body
        centre's offset from the grid centre and the grid centre in world RAS (all mm).
    """
    a = copy.deepcopy(base)
    body_shift = (_u(srng, -10, 10), _u(srng, -6, 6), _u(srng, -20, 20))
    breath = _u(srng, -8, 8)  # diaphragm and upper-abdominal organs move together
    a["diaphragm"]["z_right"] += breath
    for name in ("liver", "gallbladder", "spleen", "right kidney", "left kidney", "stomach"):
        c = a[name]["center"]
        a[name]["center"] = [c[0] + _u(srng, -3, 3), c[1] + _u(srng, -3, 3), c[2] + breath + _u(srng, -3, 3)]
    a["liver"]["left_center"][2] += breath
    for k in ("head", "body", "tail"):
        a["pancreas"][k][2] += breath
    a["heart"]["center"][2] += 0.5 * breath
    grid_center = (_u(srng, -30, 30), _u(srng, -40, 40), _u(srng, -900, -200))
    return a, body_shift, grid_center


def _sample_finding_params(rng: np.random.Generator, anatomy: str, finding: str) -> dict[str, Any]:
    """Parameters of one finding (always the same number of draws, whether or not it is present)."""
    pos = [float(v) for v in rng.uniform(0, 1, size=4)]  # candidate pick + sub-voxel offset of a lesion
    key = (anatomy, finding)
    p: dict[str, Any] = {"pick": pos[0], "offset": pos[1:]}
    if key == ("lung", "lung nodule"):
        p.update(radius=_u(rng, 3.0, 7.5), target=_u(rng, -20, 60))
    elif key in (("heart", "coronary artery wall calcification"), ("aorta", "arterial wall calcification")):
        p.update(radius=_u(rng, 2.0, 3.5), target=_u(rng, 500, 1000))
    elif key in (("liver", "calcification"), ("spleen", "calcification")):
        p.update(radius=_u(rng, 2.0, 3.5), target=_u(rng, 350, 800))
    elif key in LOW_CONTRAST_FINDINGS:
        # contrast set relative to the case's noise: a hypodense lesion with CNR in [1.6, 2.8] (<= 3)
        p.update(radius=_u(rng, 4.5, 7.5), cnr=_u(rng, 1.6, 2.8) if anatomy == "liver" else _u(rng, 2.0, 2.9))
    elif key == ("spleen", "hypodense lesion"):
        p.update(radius=_u(rng, 4.5, 7.5), delta=-_u(rng, 30, 45))
    elif key == ("gallbladder", "gallstone"):
        p.update(radius=_u(rng, 3.5, 6.5), target=_u(rng, 250, 700))
    elif finding == "renal cyst":
        p.update(radius=_u(rng, 4.5, 7.5), target=_u(rng, 0, 15))
    elif finding == "renal stone":
        p.update(radius=_u(rng, 2.0, 3.5), target=_u(rng, 700, 1100))
    elif key == ("vertebrae", "sclerotic lesion"):
        p.update(radius=_u(rng, 4.5, 7.5), target=_u(rng, 800, 1000))
    elif key == ("vertebrae", "lytic lesion"):
        p.update(radius=_u(rng, 4.5, 7.5), target=_u(rng, 10, 60))
    elif key == ("lung", "emphysema"):
        p.update(blobs=[dict(u=_u(rng, 0, 1), r=_u(rng, 7, 15)) for _ in range(10)], target=_u(rng, -990, -955))
    elif key == ("lung", "pleural effusion"):
        p.update(side=int(rng.integers(3)), depth=_u(rng, 18, 40), hu=_u(rng, 5, 15))
    elif key == ("heart", "cardiomegaly"):
        p.update(scale=_u(rng, 0.2, 0.32))
    elif key == ("heart", "pericardial effusion"):
        p.update(thickness=_u(rng, 7, 14), hu=_u(rng, 5, 15))
    elif key == ("aorta", "aortic aneurysm"):
        p.update(z=_u(rng, -115, -70), half_length=_u(rng, 18, 30), dilation=_u(rng, 0.8, 1.3), thrombus_hu=_u(rng, 35, 60))
    elif key == ("liver", "steatosis"):
        p.update(drop=_u(rng, 30, 45))
    elif key in (("liver", "hepatomegaly"), ("spleen", "splenomegaly")):
        p.update(scale=_u(rng, 0.18, 0.28) if anatomy == "liver" else _u(rng, 0.35, 0.55))
    elif key == ("gallbladder", "gallbladder wall thickening"):
        p.update(thickness=_u(rng, 5, 9))
    elif key == ("pancreas", "pancreatic duct dilatation"):
        p.update(radius=_u(rng, 3.0, 4.5), hu=_u(rng, 5, 15))
    elif key == ("pancreas", "atrophy"):
        p.update(shrink=_u(rng, 0.35, 0.45))
    elif finding == "hydronephrosis":
        p.update(dilation=_u(rng, 0.5, 0.8), hu=_u(rng, 0, 12))
    elif key == ("stomach", "gastric wall thickening"):
        p.update(thickness=_u(rng, 8, 13))
    elif key == ("stomach", "gastric distension"):
        p.update(scale=_u(rng, 0.3, 0.45))
    elif key == ("vertebrae", "vertebral fracture"):
        p.update(level=_u(rng, 0, 1), loss=_u(rng, 0.3, 0.45))
    elif key == ("vertebrae", "osteopenia"):
        p.update(loss=_u(rng, 0.45, 0.6))
    else:  # pragma: no cover - guarded by _check_catalog
        raise KeyError(f"no renderer for finding {finding!r} of {anatomy!r}")
    return p


def sample_ct_case(
    seed: int,
    index: int,
    patient: int,
    catalog: Catalog | None = None,
    conspicuity: float = 1.0,
    prevalence: float = DEFAULT_PREVALENCE,
) -> CTCaseSpec:
    """Draw everything random about case ``index`` of patient ``patient``.

    Args:
        seed: dataset seed.
        index: case number (its generator is ``default_rng([seed, index])``).
        patient: patient number (anatomy from ``default_rng([seed, PATIENT_STREAM, patient])``).
        catalog: the ``synthetic_ct`` catalog (loaded when None).
        conspicuity: multiplier of every finding's contrast / size change (0 = invisible).
        prevalence: probability of each finding.
    """
    if catalog is None:
        catalog = _catalog()
    else:
        _check_catalog(catalog)
    prng = np.random.default_rng([seed, PATIENT_STREAM, patient])
    srng = np.random.default_rng([seed, index])
    base = _sample_patient(prng)
    gallbladder_absent = bool(prng.random() < GALLBLADDER_ABSENT_PROBABILITY)
    anatomy, body_shift, grid_center = _sample_study(srng, base)
    anatomy["gallbladder"]["absent"] = gallbladder_absent
    findings: dict[str, dict[str, int]] = {}
    params: dict[str, dict[str, Any]] = {}
    for a in catalog.anatomies:
        findings[a.name] = {}
        for f in a.findings:
            findings[a.name][f] = int(srng.random() < prevalence)
            params[f"{a.name}/{f}"] = _sample_finding_params(srng, a.name, f)
    study = {}
    for f in catalog.study_findings:
        study[f] = int(srng.random() < prevalence)
        params[f"study/{f}"] = {"thickness": _u(srng, 8, 18), "hu": _u(srng, 5, 15)}
    noise_sigma = _u(srng, 9, 14)
    noise_seed = int(srng.integers(2**62))
    reorient = srng.random() < IMAGE_REORIENT_PROBABILITY
    other = OTHER_IMAGE_ORIENTATIONS[int(srng.integers(len(OTHER_IMAGE_ORIENTATIONS)))]
    image_axcodes = other if reorient else ("R", "A", "S")
    flip_mask = srng.random() < MASK_FLIP_PROBABILITY
    flip_axis = int(srng.integers(3))
    mask_axcodes = tuple(image_axcodes)
    if flip_mask:
        opposite = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
        mask_axcodes = tuple(opposite[c] if i == flip_axis else c for i, c in enumerate(image_axcodes))
    report_seed = int(srng.integers(2**62))
    return CTCaseSpec(
        index=index, patient=patient, conspicuity=float(conspicuity), anatomy=anatomy, findings=findings,
        finding_params=params, study_findings=study, noise_sigma=noise_sigma, noise_seed=noise_seed,
        grid_center_world=grid_center, body_shift=body_shift, image_axcodes=tuple(image_axcodes),
        mask_axcodes=tuple(mask_axcodes), report_seed=report_seed,
    )


# ============================================================================ geometry (pure functions)
@dataclass(frozen=True)
class _Grid:
    """Canonical coordinates (mm) of the voxel centres along each RAS array axis (ascending)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    scale: np.ndarray  # world mm per canonical mm, per axis
    spacing: np.ndarray  # world voxel size (mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.x), len(self.y), len(self.z))

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres lie in the canonical box ``[lo, hi]``."""
        out = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            out.append(slice(int(np.searchsorted(axis, a, "left")), int(np.searchsorted(axis, b, "right"))))
        return tuple(out)

    def offsets(self, sl: tuple[slice, slice, slice], center: Sequence[float]):
        """Broadcastable canonical offsets ``(X, 1, 1), (1, Y, 1), (1, 1, Z)`` of the sub-box from ``center``."""
        dx = (self.x[sl[0]] - center[0])[:, None, None]
        dy = (self.y[sl[1]] - center[1])[None, :, None]
        dz = (self.z[sl[2]] - center[2])[None, None, :]
        return dx, dy, dz


def _empty(sl: tuple[slice, ...]) -> bool:
    return any(s.stop <= s.start for s in sl)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation (3, 3) whose columns are the local axes in RAS: intrinsic z, then y, then x rotations (degrees).

    Same matrix as ``scipy.spatial.transform.Rotation.from_euler("ZYX", angles, degrees=True)``,
    built directly because it is called hundreds of times per case.
    """
    az, ay, ax = (math.radians(float(a)) for a in angles_deg)
    cz, sz, cy, sy, cx, sx = math.cos(az), math.sin(az), math.cos(ay), math.sin(ay), math.cos(ax), math.sin(ax)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return (rz @ ry @ rx).astype(np.float32)


def _superellipsoid(
    grid: _Grid,
    center: Sequence[float],
    semi_axes: Sequence[float],
    angles: Sequence[float] = (0.0, 0.0, 0.0),
    exponent: float = 2.0,
    wobble: Sequence[float] | None = None,
) -> tuple[tuple[slice, slice, slice], np.ndarray | None]:
    """Voxels inside a rotated, deformed superellipsoid.

    ``(|q_x/a|^p + |q_y/b|^p + |q_z/c|^p)^(1/p) <= 1 + sum_k w_k m_k(u)`` where ``q`` are local
    coordinates and ``m_k`` are 8 smooth modes of the direction ``u`` (degree 1 and 2
    polynomials: egg shapes, bends, bulges), so each patient's organ has its own shape.

    Returns:
        ``(slices, inside)``: the sub-box of the grid and a boolean array of its shape, or
        ``(slices, None)`` when the shape misses the grid.
    """
    semi = np.asarray(semi_axes, dtype=np.float32)
    rot = rotation_matrix(angles)
    # the (undeformed) shape lies in its local box [-semi, semi]; |R| maps that box's half sizes to
    # RAS. The deformation grows it by at most the largest value the modes can reach.
    bound = 1.0 + (_wobble_bound(wobble) if wobble else 0.0)
    half = np.abs(rot) @ (semi * bound)
    c = np.asarray(center, dtype=np.float32)
    sl = grid.box(c - half, c + half)
    if _empty(sl):
        return sl, None
    return _superellipsoid_on(grid, sl, c, semi, angles, exponent, wobble)


def _wobble_bound(wobble: Sequence[float]) -> float:
    """Upper bound of ``sum_k w_k m_k(u)`` over unit vectors ``u`` (modes of :func:`_superellipsoid`)."""
    w = [abs(v) for v in wobble]
    return math.sqrt(w[0] ** 2 + w[1] ** 2 + w[2] ** 2) + 0.5 * (w[3] + w[4] + w[5]) + w[6] + w[7]


def _sweep(
    grid: _Grid, points: np.ndarray, radii: np.ndarray
) -> tuple[tuple[slice, slice, slice], np.ndarray | None]:
    """Voxels within ``radii[k]`` of some ``points[k]`` (a tube of varying radius along a densely sampled curve)."""
    lo = (points - radii[:, None]).min(axis=0)
    hi = (points + radii[:, None]).max(axis=0)
    sl = grid.box(lo, hi)
    if _empty(sl):
        return sl, None
    X = grid.x[sl[0]][:, None, None, None]
    Y = grid.y[sl[1]][None, :, None, None]
    Z = grid.z[sl[2]][None, None, :, None]
    d2 = (X - points[:, 0]) ** 2 + (Y - points[:, 1]) ** 2 + (Z - points[:, 2]) ** 2
    return sl, (d2 / radii**2).min(axis=-1) <= 1.0


def _bezier(p0, p1, p2, n: int) -> np.ndarray:
    """(n, 3) points of the quadratic Bezier curve through p0 and p2 pulled toward p1."""
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float32) for p in (p0, p1, p2))
    # p1 is a point *on* the curve at t=0.5: the control point is 2 p1 - (p0 + p2) / 2
    ctrl = 2 * p1 - 0.5 * (p0 + p2)
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p2


def _vertical_tube(grid: _Grid, z_knots, x_knots, y_knots, r_knots, z_range):
    """Voxels of a tube whose cross-section at height z is a disc (centre and radius interpolated between knots)."""
    zs = np.asarray(z_knots, dtype=np.float32)
    order = np.argsort(zs)
    zs = zs[order]
    xk, yk, rk = (np.asarray(v, dtype=np.float32)[order] for v in (x_knots, y_knots, r_knots))
    rmax = float(rk.max())
    sl = grid.box((xk.min() - rmax, yk.min() - rmax, z_range[0]), (xk.max() + rmax, yk.max() + rmax, z_range[1]))
    if _empty(sl):
        return sl, None
    z = grid.z[sl[2]]
    cx, cy, r = np.interp(z, zs, xk), np.interp(z, zs, yk), np.interp(z, zs, rk)
    dx = grid.x[sl[0]][:, None, None] - cx[None, None, :]
    dy = grid.y[sl[1]][None, :, None] - cy[None, None, :]
    return sl, dx**2 + dy**2 <= (r**2)[None, None, :]


def _sphere_in(grid: _Grid, center: Sequence[float], radius: float):
    """Voxels within ``radius`` (canonical mm) of ``center``: ``(slices, inside)`` as :func:`_superellipsoid`."""
    c = np.asarray(center, dtype=np.float32)
    sl = grid.box(c - radius, c + radius)
    if _empty(sl):
        return sl, None
    dx, dy, dz = grid.offsets(sl, c)
    return sl, dx * dx + dy * dy + dz * dz <= np.float32(radius * radius)


def _cylinder_z(grid: _Grid, center_xy: Sequence[float], semi_xy: Sequence[float], z_range: Sequence[float]):
    """Voxels of an upright elliptic cylinder: ``(slices, inside)`` with ``inside`` broadcast along z."""
    cx, cy = center_xy
    ax, ay = semi_xy
    sl = grid.box((cx - ax, cy - ay, z_range[0]), (cx + ax, cy + ay, z_range[1]))
    if _empty(sl):
        return sl, None
    dx = (grid.x[sl[0]] - cx)[:, None, None] / ax
    dy = (grid.y[sl[1]] - cy)[None, :, None] / ay
    disc = dx * dx + dy * dy <= 1.0
    return sl, np.broadcast_to(disc, (disc.shape[0], disc.shape[1], sl[2].stop - sl[2].start))


def _pick(mask: np.ndarray, u: float) -> tuple[int, ...] | None:
    """The ``floor(u * count)``-th True voxel of ``mask`` in C order (None when empty)."""
    found = _picks(mask, [u])
    return found[0] if found else None


def _picks(mask: np.ndarray, us: Sequence[float]) -> list[tuple[int, ...]]:
    """:func:`_pick` for several uniforms at once (one scan of the mask); empty list when the mask is empty."""
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return []
    chosen = flat[np.minimum((np.asarray(us) * flat.size).astype(np.int64), flat.size - 1)]
    return [tuple(int(v) for v in ijk) for ijk in zip(*np.unravel_index(chosen, mask.shape))]


def _bbox(mask: np.ndarray, pad: int = 1) -> tuple[slice, slice, slice] | None:
    """Slices of the bounding box of ``mask``'s True voxels grown by ``pad`` (None when empty)."""
    out = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        out.append(slice(max(0, int(hit[0]) - pad), min(mask.shape[axis], int(hit[-1]) + 1 + pad)))
    return tuple(out)


# ============================================================================ rendering
class _Volume:
    """The phantom under construction: HU (float32) and labels (uint8), RAS array order."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.hu = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, sl, inside, hu=None, label=None, where=None) -> None:
        """Set HU and / or label on ``inside`` (restricted to ``where``, a full-volume mask, when given)."""
        if inside is None or _empty(sl):
            return
        if where is not None:
            inside = inside & where[sl]
        if hu is not None:
            view = self.hu[sl]
            view[inside] = hu if np.isscalar(hu) else hu[inside]
        if label is not None:
            self.labels[sl][inside] = label if np.isscalar(label) else label[inside]


def _make_grid(shape: Sequence[int], spacing: Sequence[float], body_shift: Sequence[float]) -> _Grid:
    shape = np.asarray(shape)
    spacing = np.asarray(spacing, dtype=np.float64)
    scale = shape * spacing / np.asarray(REFERENCE_FOV_MM)
    axes = []
    for n, s, sc, shift in zip(shape, spacing, scale, body_shift):
        world_from_center = (np.arange(n) - (n - 1) / 2.0) * s  # relative to the grid centre
        axes.append(((world_from_center - shift) / sc).astype(np.float32))
    return _Grid(x=axes[0], y=axes[1], z=axes[2], scale=scale.astype(np.float32), spacing=spacing.astype(np.float32))


def _ras_affine(shape: Sequence[int], spacing: Sequence[float], grid_center_world: Sequence[float]) -> np.ndarray:
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = np.asarray(grid_center_world) - np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return aff


def _diaphragm_height(grid: _Grid, d: dict) -> np.ndarray:
    """(X, Y, 1) canonical height of the diaphragm surface: two domes, the right one higher."""
    x = grid.x[:, None, None]
    y = grid.y[None, :, None]
    k = d["curvature"]
    back = 30.0 * ((y - 10.0) / 100.0) ** 2  # the posterior recess reaches lower
    right = d["z_right"] - k * ((x - 60.0) / 70.0) ** 2 - back
    left = d["z_right"] - d["drop_left"] - k * ((x + 60.0) / 70.0) ** 2 - back
    # costophrenic recesses end about 7 cm below the dome
    return np.maximum(np.maximum(right, left), d["z_right"] - 70.0)


def _body_masks(grid: _Grid, b: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-volume masks: inside the skin, inside the muscle wall, inside the body cavity."""
    x = grid.x[:, None, None]
    y = grid.y[None, :, None] - b["yc"]
    z = grid.z[None, None, :]
    grow = 1.0 + b["taper"] * z / 128.0
    p = b["exponent"]

    def inside(shrink_mm: float) -> np.ndarray:
        ax = b["ax"] * grow - shrink_mm
        ay = b["ay"] * grow - shrink_mm
        return (np.abs(x / ax) ** p + np.abs(y / ay) ** p) <= 1.0

    return inside(0.0), inside(b["fat_mm"]), inside(b["fat_mm"] + b["muscle_mm"])


class _PhantomPainter:
    """Paints one case's phantom and its non-focal findings, structure by structure.

    The order of :meth:`run` matters: a later structure overwrites an earlier one where they
    overlap (the kidney indents the liver, the heart the lungs). Masks that several structures
    need (body cavity, thorax, abdomen, diaphragm height) are kept as attributes.
    """

    def __init__(self, vol: _Volume, spec: CTCaseSpec):
        self.vol, self.spec = vol, spec
        self.g = vol.grid
        self.A = spec.anatomy
        self.c = spec.conspicuity
        self.present = spec.present
        self.params = spec.params
        # broadcastable canonical coordinates (X, 1, 1), (1, Y, 1), (1, 1, Z)
        self.X = self.g.x[:, None, None]
        self.Y = self.g.y[None, :, None]
        self.Z = self.g.z[None, None, :]

    def run(self) -> dict[str, float]:
        """Paint everything; returns the bone HU the focal findings need."""
        self._paint_body()
        self._paint_back_muscles()
        self._paint_lungs()
        self._paint_heart()
        self._paint_great_vessels()
        self._paint_spine()
        self._paint_liver()
        self._paint_gallbladder()
        self._paint_stomach()
        self._paint_spleen()
        self._paint_kidneys()
        self._paint_pancreas()
        self._paint_bowel()
        self._paint_ascites()
        return {"cancellous": self.cancellous_hu, "cortical": self.cortical_hu}

    def _paint_body(self) -> None:
        """Body outline (subcutaneous fat), muscle wall, ribs, cavity fat, diaphragm band, table."""
        g, A, X, Y, Z, vol = self.g, self.A, self.X, self.Y, self.Z, self.vol
        b = A["body"]
        skin, muscle_wall, cavity = _body_masks(g, b)
        zd = _diaphragm_height(g, A["diaphragm"])  # (X, Y, 1)
        vol.hu[skin] = b["fat_hu"]
        vol.hu[muscle_wall] = b["muscle_hu"]
        thorax = cavity & (Z > zd + 3.0)
        abdomen = cavity & (Z < zd - 3.0)
        vol.hu[cavity] = b["muscle_hu"]  # diaphragm band stays muscle
        vol.hu[thorax] = b["visceral_fat_hu"]  # mediastinal fat until organs fill it
        vol.hu[abdomen] = b["visceral_fat_hu"]
        back = b["yc"] - b["ay"] * (1.0 + b["taper"] * Z / 128.0)
        table = (Y > back - 16.0 - 0.0004 * X**2) & (Y < back - 10.0 - 0.0004 * X**2) & (np.abs(X) < 150.0)
        vol.hu[table & ~skin] = b["table_hu"]
        # ribs: oblique bony bands in the chest wall, descending anteriorly; none at the anterior midline
        ribs = muscle_wall & ~cavity & (Z > zd - 45.0) & ((np.abs(X) > 30.0) | (Y < 0.0))
        ribs &= np.mod(Z + 0.45 * Y - b["rib_phase"], b["rib_pitch"]) < 7.0
        vol.hu[ribs] = b["rib_hu"]
        self.skin, self.muscle_wall, self.cavity = skin, muscle_wall, cavity
        self.thorax, self.abdomen, self.zd = thorax, abdomen, zd
        self.below_diaphragm = abdomen & (Z < zd - 4.0)

    def _paint_back_muscles(self) -> None:
        """Paraspinal and psoas muscles (the vertebrae, painted later, overwrite them)."""
        g, A, vol = self.g, self.A, self.vol
        b, skin, abdomen = A["body"], self.skin, self.abdomen
        s = A["spine"]
        canal_y = s["yv"] - s["ry"] - 11.0
        for sx in (1.0, -1.0):
            sl, m = _cylinder_z(g, (sx * 34.0, canal_y - 10.0), (26.0, 22.0), (-1e4, 1e4))
            vol.paint(sl, m, hu=b["muscle_hu"], where=skin)
            # psoas: grows toward the pelvis, below the diaphragm
            sl, m = _superellipsoid(g, (sx * 42.0, s["yv"] + 2.0, -150.0), (22.0, 20.0, 140.0))
            vol.paint(sl, m, hu=b["muscle_hu"] + 3.0, where=abdomen)
        self.canal_y = canal_y

    def _paint_lungs(self) -> None:
        """Lungs (lobes), vessels, emphysema, pleural effusion."""
        g, A, c, pres, prm, X, Y, Z, vol = self.g, self.A, self.c, self.present, self.params, self.X, self.Y, self.Z, self.vol
        b, thorax, zd = A["body"], self.thorax, self.zd
        L = A["lung"]
        mediastinum = np.abs(X) < L["mediastinum_halfwidth"] * (1.0 + 0.6 * np.clip(Y / 60.0, 0, 1))
        lung_space = thorax & (Z > zd + 5.0) & ~mediastinum
        for side, sign in (("right", 1.0), ("left", -1.0)):
            p = L[side]
            sl, m = _superellipsoid(g, p["center"], p["semi"], exponent=p["exponent"])
            if m is None:
                continue
            m = m & lung_space[sl] & ((X[sl[0]] * sign) > 0)
            dy, dz = g.y[sl[1]][None, :, None], g.z[sl[2]][None, None, :]
            lower = dz < L["fissure_z"] - L["fissure_slope"] * dy  # oblique fissure: posterior-inferior part
            if side == "right":
                lab = np.where(lower, LUNG_LOWER_RIGHT, np.where(dz < L["horizontal_fissure_z"], LUNG_MIDDLE_RIGHT, LUNG_UPPER_RIGHT))
            else:
                lab = np.where(lower, LUNG_LOWER_LEFT, LUNG_UPPER_LEFT)
            vol.paint(sl, m, hu=L["hu"], label=np.broadcast_to(lab, m.shape).astype(np.uint8))
        lung = np.isin(vol.labels, ANATOMY_LABELS["lung"])
        lung_box = _bbox(lung, pad=0)
        if lung_box is not None:
            blobs = A["lung_vessels"]["blobs"]
            for blob, at in zip(blobs, _picks(lung[lung_box], [bl["u"] for bl in blobs])):
                center = _voxel_to_canonical(g, tuple(a + s_.start for a, s_ in zip(at, lung_box)))
                sl, m = _sphere_in(g, center, blob["r"])
                vol.paint(sl, m, hu=A["lung_vessels"]["hu"], where=lung)
        if pres("lung", "emphysema") and lung_box is not None:
            q = prm("lung", "emphysema")
            # bullae / low-attenuation areas, upper zones first
            per_slice = np.cumsum(lung.sum(axis=(0, 1)))
            mid_z = g.z[int(np.searchsorted(per_slice, per_slice[-1] / 2.0))]  # half the lung volume lies above
            upper = lung[lung_box] & (g.z[lung_box[2]][None, None, :] > mid_z)
            for blob, at in zip(q["blobs"], _picks(upper, [bl["u"] for bl in q["blobs"]])):
                center = _voxel_to_canonical(g, tuple(a + s_.start for a, s_ in zip(at, lung_box)))
                sl, m = _sphere_in(g, center, blob["r"])
                if m is None:
                    continue
                m = m & lung[sl]
                view = vol.hu[sl]
                view[m] += c * (q["target"] - view[m])
        if pres("lung", "pleural effusion") and lung_box is not None:
            q = prm("lung", "pleural effusion")
            cav_back = b["yc"] - (b["ay"] - b["fat_mm"] - b["muscle_mm"])
            level = cav_back + c * q["depth"]
            sides = {0: (1.0,), 1: (-1.0,), 2: (1.0, -1.0)}[q["side"]]
            side_mask = np.zeros((g.shape[0], 1, 1), dtype=bool)
            for sgn in sides:
                side_mask |= (X * sgn) > 0
            fluid = lung & side_mask & (Y < level) & (Z < zd + 40.0 + 2.0 * c * q["depth"])
            vol.hu[fluid] = q["hu"]

    def _paint_heart(self) -> None:
        """Heart with pericardial fat, effusion, chambers."""
        g, A, c, pres, prm, Z, vol = self.g, self.A, self.c, self.present, self.params, self.Z, self.vol
        b, cavity, zd = A["body"], self.cavity, self.zd
        H = A["heart"]
        semi = np.asarray(H["semi"])
        if pres("heart", "cardiomegaly"):
            semi = semi * (1.0 + c * prm("heart", "cardiomegaly")["scale"])
        heart_center = list(H["center"])
        heart_center[2] += 0.5 * (semi[2] - H["semi"][2])  # enlargement grows upward off the diaphragm
        eff = c * prm("heart", "pericardial effusion")["thickness"] if pres("heart", "pericardial effusion") else 0.0
        heart_space = cavity & (Z > zd - 2.0)
        shape_args = dict(angles=H["angles"], exponent=H["exponent"], wobble=H["wobble"])
        sl, m = _superellipsoid(g, heart_center, semi + eff + H["fat_mm"], **shape_args)
        vol.paint(sl, m, hu=b["visceral_fat_hu"], label=0, where=heart_space)
        if eff > 0:
            sl, m = _superellipsoid(g, heart_center, semi + eff, **shape_args)
            vol.paint(sl, m, hu=prm("heart", "pericardial effusion")["hu"], label=HEART, where=heart_space)
        sl, m = _superellipsoid(g, heart_center, semi, **shape_args)
        vol.paint(sl, m, hu=H["myocardium_hu"], label=HEART, where=heart_space)
        blood_hu = A["aorta"]["hu"] * H["blood_fraction"]
        sl, m = _superellipsoid(g, heart_center, semi * 0.72, **shape_args)
        vol.paint(sl, m, hu=blood_hu, where=heart_space)
        self.heart_center, self.heart_semi = heart_center, semi

    def _paint_great_vessels(self) -> None:
        """Great vessels: aorta (ascending + descending/abdominal, optional aneurysm), IVC, SVC."""
        g, A, c, pres, prm, vol = self.g, self.A, self.c, self.present, self.params, self.vol
        s, cavity, thorax, abdomen = A["spine"], self.cavity, self.thorax, self.abdomen
        heart_center, semi = self.heart_center, self.heart_semi
        ao = A["aorta"]
        vtop = float(g.z[-1]) + 10.0
        vbottom = float(g.z[0]) - 10.0
        front = s["yv"] + s["ry"]
        z_knots = [vtop, 20.0, -40.0, vbottom]
        x_knots = [ao["x_thoracic"], ao["x_thoracic"] + 2.0, ao["x_abdominal"], ao["x_abdominal"]]
        r_knots = [ao["r_thoracic"], ao["r_thoracic"], ao["r_abdominal"], ao["r_abdominal"] * 0.95]
        y_knots = [front + r + 2.0 for r in r_knots]
        if pres("aorta", "aortic aneurysm"):
            q = prm("aorta", "aortic aneurysm")
            zz = np.linspace(vbottom, vtop, 64)
            ra = np.interp(zz, z_knots[::-1], r_knots[::-1])
            window = np.cos(np.clip((zz - q["z"]) / q["half_length"], -1, 1) * np.pi / 2) ** 2
            outer = ra * (1.0 + c * q["dilation"] * window)
            lumen = ra * (1.0 + 0.3 * c * q["dilation"] * window)
            xa = np.interp(zz, z_knots[::-1], x_knots[::-1])
            ya = front + outer + 2.0
            sl, m = _vertical_tube(g, zz, xa, ya, outer, (vbottom, vtop))
            vol.paint(sl, m, hu=q["thrombus_hu"], label=AORTA, where=cavity)  # mural thrombus
            sl, m = _vertical_tube(g, zz, xa, ya, lumen, (vbottom, vtop))
            vol.paint(sl, m, hu=ao["hu"], label=AORTA, where=cavity)
        else:
            sl, m = _vertical_tube(g, z_knots, x_knots, y_knots, r_knots, (vbottom, vtop))
            vol.paint(sl, m, hu=ao["hu"], label=AORTA, where=cavity)
        asc_bottom = heart_center[2] + 0.3 * semi[2]
        ax_, ay_ = ao["asc_center"]
        sl, m = _vertical_tube(g, [asc_bottom, vtop], [ax_, ax_ - 4], [ay_, ay_ - 4], [ao["r_ascending"]] * 2, (asc_bottom, vtop))
        vol.paint(sl, m, hu=ao["hu"], label=AORTA, where=thorax)
        V = A["vessels"]
        sl, m = _vertical_tube(g, [vbottom, 0.0], [V["ivc_x"]] * 2, [front + V["ivc_r"] + 4.0] * 2, [V["ivc_r"]] * 2, (vbottom, 0.0))
        vol.paint(sl, m, hu=V["ivc_hu"], where=abdomen)
        svc_x = ax_ + ao["r_ascending"] + 12.0
        sl, m = _vertical_tube(g, [asc_bottom, vtop], [svc_x] * 2, [ay_ - 2] * 2, [9.0, 9.0], (asc_bottom + 10.0, vtop))
        vol.paint(sl, m, hu=V["svc_hu"], where=thorax)

    def _paint_spine(self) -> None:
        """Vertebrae (bodies, posterior elements), discs, spinal canal; fracture and osteopenia."""
        g, A, c, pres, prm, vol = self.g, self.A, self.c, self.present, self.params, self.vol
        s, canal_y = A["spine"], self.canal_y
        vtop, vbottom = float(g.z[-1]) + 10.0, float(g.z[0]) - 10.0
        cancellous = s["cancellous_hu"]
        cortical = s["cortical_hu"]
        if pres("vertebrae", "osteopenia"):
            loss = c * prm("vertebrae", "osteopenia")["loss"]
            cancellous *= 1.0 - loss
            cortical *= 1.0 - 0.3 * loss
        height = 0.8 * s["pitch"]
        levels = []
        for k in VERTEBRA_OFFSETS:
            zc = s["z_l1"] + k * s["pitch"]
            if zc + s["pitch"] / 2 >= g.z[0] and zc - s["pitch"] / 2 <= g.z[-1]:
                levels.append((k, zc))
        inner_levels = [lv for lv in levels if g.z[0] + s["pitch"] <= lv[1] <= g.z[-1] - s["pitch"]] or levels
        fractured = None
        if pres("vertebrae", "vertebral fracture") and inner_levels:
            q = prm("vertebrae", "vertebral fracture")
            fractured = inner_levels[min(int(q["level"] * len(inner_levels)), len(inner_levels) - 1)][0]
        posterior_hu = s["posterior_hu"] * (cortical / s["cortical_hu"])
        # disc column first (an elliptic cylinder); vertebral bodies overwrite it
        sl, m = _cylinder_z(g, (0.0, s["yv"]), (s["rx"], s["ry"]), (-1e4, 1e4))
        vol.paint(sl, m, hu=s["disc_hu"], label=0)
        for k, zc in levels:
            grow = 1.0 - 0.025 * k  # lumbar bodies are larger
            rx, ry = s["rx"] * grow, s["ry"] * grow
            vid = VERTEBRA_L1 + k
            lo = np.array([-rx, s["yv"] - ry, zc - height / 2])
            hi = np.array([rx, s["yv"] + ry, zc + height / 2])
            sl = g.box(lo, hi)
            if _empty(sl):
                continue
            dx = g.x[sl[0]][:, None, None]
            dy = g.y[sl[1]][None, :, None] - s["yv"]
            dz = g.z[sl[2]][None, None, :] - zc
            ell = (dx / rx) ** 2 + (dy / ry) ** 2
            top = np.full_like(dy, height / 2)
            hu_scale = 1.0
            if k == fractured:
                loss = c * prm("vertebrae", "vertebral fracture")["loss"]
                # wedge compression: the anterior edge loses the most height
                top = height / 2 - loss * height * (0.35 + 0.65 * np.clip((dy + ry) / (2 * ry), 0, 1))
                hu_scale = 1.0 + 0.4 * loss  # impacted trabeculae are denser
            body = (ell <= 1.0) & (dz <= top) & (dz >= -height / 2)
            # thin cortex and endplates: at 4 mm voxels they show as a partial-volume rim
            core = ((dx / (rx - 2.5)) ** 2 + (dy / (ry - 2.5)) ** 2 <= 1.0) & (dz <= top - 1.2) & (dz >= -height / 2 + 1.2)
            vol.paint(sl, body, hu=cortical, label=vid)
            vol.paint(sl, core, hu=cancellous * hu_scale, label=vid)
            # posterior arch around the canal, spinous and transverse processes
            zlo, zhi = zc - height / 2, zc + height / 2 - 2.0
            slp = g.box((-45.0, canal_y - 36.0, zlo), (45.0, s["yv"] - ry + 2.0, zhi))
            if _empty(slp):
                continue
            px = g.x[slp[0]][:, None, None]
            py = g.y[slp[1]][None, :, None] - canal_y
            pz = g.z[slp[2]][None, None, :]
            r2 = px**2 + py**2
            arch = (r2 <= 15.5**2) & (r2 > 8.0**2)
            spinous = (np.abs(px) <= 4.5) & (py < 0) & (py > -36.0 + 4.0 * (pz - zc) / height)
            transverse = (np.abs(px) <= 32.0) & (np.abs(py) <= 3.5) & (np.abs(pz - zc) <= 4.0)
            posterior = (arch | spinous | transverse) & (pz >= zlo) & (pz <= zhi)
            vol.paint(slp, np.broadcast_to(posterior, posterior.shape), hu=posterior_hu, label=vid)
        sl, m = _vertical_tube(g, [vbottom, vtop], [0.0, 0.0], [canal_y] * 2, [8.0, 8.0], (vbottom, vtop))
        vol.paint(sl, m, hu=25.0, label=0)  # spinal canal (cord and CSF)
        self.cancellous_hu, self.cortical_hu = cancellous, cortical

    def _paint_liver(self) -> None:
        """Liver (+ left lobe), hepatic vessels, steatosis, hepatomegaly."""
        g, A, c, pres, prm, Z, vol = self.g, self.A, self.c, self.present, self.params, self.Z, self.vol
        abdomen, zd = self.abdomen, self.zd
        Lv = A["liver"]
        below_diaphragm = abdomen & (Z < zd - 4.0)
        grow = 1.0 + (c * prm("liver", "hepatomegaly")["scale"] if pres("liver", "hepatomegaly") else 0.0)
        center = list(Lv["center"])
        center[2] -= (grow - 1.0) * Lv["semi"][2] * 0.8  # an enlarged liver reaches lower, not higher
        liver_hu = Lv["hu"] - (c * prm("liver", "steatosis")["drop"] if pres("liver", "steatosis") else 0.0)
        sl, m = _superellipsoid(g, center, np.asarray(Lv["semi"]) * grow, Lv["angles"], Lv["exponent"], Lv["wobble"])
        vol.paint(sl, m, hu=liver_hu, label=LIVER, where=below_diaphragm)
        lc = list(Lv["left_center"])
        lc[2] -= (grow - 1.0) * Lv["left_semi"][2] * 0.5
        # the left lobe grows half as much (it would otherwise reach the spleen)
        sl, m = _superellipsoid(g, lc, np.asarray(Lv["left_semi"]) * (1.0 + 0.5 * (grow - 1.0)), Lv["angles"], 2.0)
        vol.paint(sl, m, hu=liver_hu, label=LIVER, where=below_diaphragm)
        liver = vol.labels == LIVER
        hilum = np.array([center[0] - 30.0, center[1] - 5.0, center[2] - 10.0], dtype=np.float32)
        for d, length in zip(Lv["vessel_dirs"], Lv["vessel_len"]):
            d = np.asarray(d, dtype=np.float32)
            d /= np.linalg.norm(d) + 1e-6
            d[0] = abs(d[0])  # branches run into the right lobe
            pts = hilum + np.linspace(0, length * grow, 10, dtype=np.float32)[:, None] * d
            sl, m = _sweep(g, pts, np.linspace(5.0, 2.5, 10, dtype=np.float32))
            vol.paint(sl, m, hu=liver_hu + Lv["vessel_hu"], where=liver)

    def _paint_gallbladder(self) -> None:
        """Gallbladder (may be absent), wall thickening."""
        g, A, c, pres, prm, vol = self.g, self.A, self.c, self.present, self.params, self.vol
        abdomen = self.abdomen
        G = A["gallbladder"]
        if not G.get("absent", False):
            sl, m = _superellipsoid(g, G["center"], G["semi"], G["angles"])
            vol.paint(sl, m, hu=G["hu"], label=GALLBLADDER, where=abdomen)
            wall = 2.0 + (c * prm("gallbladder", "gallbladder wall thickening")["thickness"]
                          if pres("gallbladder", "gallbladder wall thickening") else 0.0)
            if m is not None:
                _, inner = _superellipsoid_on(g, sl, G["center"], np.maximum(np.asarray(G["semi"]) - wall, 1.0), G["angles"])
                shell = m & ~inner
                vol.paint(sl, shell, hu=G["wall_hu"], where=vol.labels == GALLBLADDER)

    def _paint_stomach(self) -> None:
        """Stomach: wall, fluid and air; distension, wall thickening."""
        g, A, c, pres, prm, vol = self.g, self.A, self.c, self.present, self.params, self.vol
        below_diaphragm = self.below_diaphragm
        St = A["stomach"]
        grow = 1.0 + (c * prm("stomach", "gastric distension")["scale"] if pres("stomach", "gastric distension") else 0.0)
        semi = np.asarray(St["semi"]) * grow
        center = list(St["center"])
        center[1] += 0.3 * (grow - 1) * St["semi"][1]
        center[2] -= 0.4 * (grow - 1) * St["semi"][2]
        wall = St["wall_mm"] + (c * prm("stomach", "gastric wall thickening")["thickness"]
                                if pres("stomach", "gastric wall thickening") else 0.0)
        sl, m = _superellipsoid(g, center, semi, St["angles"], St["exponent"], St["wobble"])
        vol.paint(sl, m, hu=St["wall_hu"], label=STOMACH, where=below_diaphragm)
        if m is not None:
            _, lumen = _superellipsoid_on(g, sl, center, np.maximum(semi - wall, 2.0), St["angles"], St["exponent"], St["wobble"])
            lumen &= m
            air = g.y[sl[1]][None, :, None] > center[1] + semi[1] * (St["air_level"] - 0.3)  # air rises anteriorly (supine)
            content = np.where(air, -1000.0, St["content_hu"]).astype(np.float32)
            vol.paint(sl, lumen, hu=np.broadcast_to(content, lumen.shape), where=vol.labels == STOMACH)

    def _paint_spleen(self) -> None:
        """Spleen, splenomegaly."""
        g, A, c, pres, prm, vol = self.g, self.A, self.c, self.present, self.params, self.vol
        below_diaphragm = self.below_diaphragm
        Sp = A["spleen"]
        grow = 1.0 + (c * prm("spleen", "splenomegaly")["scale"] if pres("spleen", "splenomegaly") else 0.0)
        center = list(Sp["center"])
        semi = np.asarray(Sp["semi"])
        center = [center[0] + 0.3 * (grow - 1) * semi[0], center[1] + 0.4 * (grow - 1) * semi[1], center[2] - 0.7 * (grow - 1) * semi[2]]
        sl, m = _superellipsoid(g, center, semi * grow, Sp["angles"], Sp["exponent"], Sp["wobble"])
        vol.paint(sl, m, hu=Sp["hu"], label=SPLEEN, where=below_diaphragm)

    def _paint_kidneys(self) -> None:
        """Kidneys with renal sinus; hydronephrosis."""
        g, A, c, pres, prm, vol = self.g, self.A, self.c, self.present, self.params, self.vol
        abdomen = self.abdomen
        for name, lid in (("right kidney", KIDNEY_RIGHT), ("left kidney", KIDNEY_LEFT)):
            K = A[name]
            semi = np.asarray(K["semi"])
            sl, m = _superellipsoid(g, K["center"], semi, K["angles"], K["exponent"], K["wobble"])
            if m is None:
                continue
            rot = rotation_matrix(K["angles"])
            medial = -K["side"] * rot[:, 0]  # the hilum faces the midline
            sinus_c = np.asarray(K["center"]) + 0.55 * semi[0] * medial
            vol.paint(sl, m, hu=K["hu"], label=lid, where=abdomen)
            _, sinus = _superellipsoid_on(g, sl, sinus_c, semi * np.array([0.5, 0.4, 0.55]), K["angles"])
            vol.paint(sl, sinus & m, hu=K["sinus_hu"], label=0)
            if pres(name, "hydronephrosis"):
                q = prm(name, "hydronephrosis")
                center_h = np.asarray(K["center"]) + 0.3 * semi[0] * medial
                _, pelvis = _superellipsoid_on(g, sl, center_h, semi * np.array([0.35, 0.35, 0.5]) * (1 + c * q["dilation"]), K["angles"])
                vol.paint(sl, pelvis & m, hu=q["hu"], label=lid)

    def _paint_pancreas(self) -> None:
        """Pancreas: head-body-tail sweep; atrophy, duct dilatation."""
        g, A, c, pres, prm, vol = self.g, self.A, self.c, self.present, self.params, self.vol
        abdomen = self.abdomen
        P = A["pancreas"]
        pts = _bezier(P["head"], P["body"], P["tail"], 28)
        t = np.linspace(0, 1, 28)
        radii = np.interp(t, [0, 0.5, 1], P["radii"]).astype(np.float32)
        if pres("pancreas", "atrophy"):
            radii = radii * (1.0 - c * prm("pancreas", "atrophy")["shrink"])
        sl, m = _sweep(g, pts, radii)
        vol.paint(sl, m, hu=P["hu"], label=PANCREAS, where=abdomen)
        if pres("pancreas", "pancreatic duct dilatation"):
            q = prm("pancreas", "pancreatic duct dilatation")
            r = c * q["radius"]
            if r > 0.5:
                sl, m = _sweep(g, pts[2:-2], np.full(len(pts) - 4, r, dtype=np.float32))
                vol.paint(sl, m, hu=q["hu"], where=vol.labels == PANCREAS)

    def _paint_bowel(self) -> None:
        """Bowel loops in the free abdominal fat (distractors, unlabelled)."""
        g, A, Z, vol = self.g, self.A, self.Z, self.vol
        abdomen, zd = self.abdomen, self.zd
        Bw = A["bowel"]
        free = abdomen & (vol.labels == 0) & (vol.hu < -50.0) & (Z < zd - 30.0)
        free_box = _bbox(free, pad=0)
        if free_box is not None:
            for loop, at in zip(Bw["loops"], _picks(free[free_box], [lp["u"][0] for lp in Bw["loops"]])):
                center = _voxel_to_canonical(g, tuple(a + s_.start for a, s_ in zip(at, free_box)))
                sl, m = _sphere_in(g, center, loop["r"])
                if m is None:
                    continue
                where_free = (vol.labels[sl] == 0) & abdomen[sl] & (vol.hu[sl] < -50.0)
                vol.paint(sl, m & where_free, hu=Bw["wall_hu"])
                _, inner = _superellipsoid_on(g, sl, center, (loop["r"] - 3.5,) * 3, (0, 0, 0))
                content = (-1000.0, loop["content_hu"], loop["content_hu"] + 15.0)[loop["content"]]
                vol.paint(sl, inner & m & where_free, hu=content)

    def _paint_ascites(self) -> None:
        """Ascites: a rim of fluid along the peritoneal wall, in free fat only."""
        g, A, c, Z, vol, spec = self.g, self.A, self.c, self.Z, self.vol, self.spec
        b, abdomen, zd = A["body"], self.abdomen, self.zd
        if spec.study_findings.get("ascites"):
            q = spec.finding_params["study/ascites"]
            _, _, inner_cavity = _body_masks(g, {**b, "muscle_mm": b["muscle_mm"] + c * q["thickness"]})
            rim = abdomen & ~inner_cavity & (Z < zd - 6.0) & (vol.labels == 0) & (vol.hu < -50.0)
            vol.hu[rim] = q["hu"]


def _superellipsoid_on(grid: _Grid, sl, center, semi_axes, angles=(0.0, 0.0, 0.0), exponent: float = 2.0, wobble=None):
    """:func:`_superellipsoid` evaluated on a given sub-box ``sl`` (e.g. a shape nested in another): ``(sl, inside)``."""
    semi = np.asarray(semi_axes, dtype=np.float32)
    rot = rotation_matrix(angles)
    dx, dy, dz = grid.offsets(sl, np.asarray(center, dtype=np.float32))
    q = [(rot[0, k] * dx + rot[1, k] * dy + rot[2, k] * dz) / semi[k] for k in range(3)]
    if exponent == 2.0:
        radius = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    else:
        radius = (np.abs(q[0]) ** exponent + np.abs(q[1]) ** exponent + np.abs(q[2]) ** exponent) ** (1.0 / exponent)
    if wobble:
        norm = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 1e-6
        ux, uy, uz = q[0] / norm, q[1] / norm, q[2] / norm
        modes = (ux, uy, uz, ux * uy, uy * uz, ux * uz, ux * ux - uy * uy, 1.5 * uz * uz - 0.5)
        return sl, radius <= 1.0 + sum(w * m for w, m in zip(wobble, modes))
    return sl, radius <= 1.0


def _voxel_to_canonical(grid: _Grid, ijk: Sequence[int]) -> np.ndarray:
    return np.array([grid.x[ijk[0]], grid.y[ijk[1]], grid.z[ijk[2]]], dtype=np.float32)


@dataclass(frozen=True)
class _FocalSite:
    """Where a focal finding may be centred inside its organ, and how it changes the HU there.

    Attributes:
        mode: ``"target"`` moves HU toward ``params["target"]``; ``"delta"`` adds ``params["delta"]``;
            ``"cnr"`` darkens by ``params["cnr"]`` noise sigmas (a contrast-to-noise ratio).
        min_depth: smallest distance of the centre to the organ's edge, in lesion radii.
        max_depth_mm: largest such distance (wall calcifications sit at the edge).
        hu_range: tissue (clean HU) the centre must lie in.
        cancellous: centre in cancellous bone (below the cortical / cancellous midpoint).
        dependent: centre in the posterior (dependent, supine) half of the candidates.
    """

    mode: str = "target"
    min_depth: float = 1.0
    max_depth_mm: float | None = None
    hu_range: tuple[float, float] = (-math.inf, math.inf)
    cancellous: bool = False
    dependent: bool = False


_FOCAL_SITES: dict[tuple[str, str], _FocalSite] = {
    ("lung", "lung nodule"): _FocalSite(hu_range=(-math.inf, -600.0)),  # aerated lung, not effusion
    ("heart", "coronary artery wall calcification"): _FocalSite(min_depth=0.0, max_depth_mm=8.0, hu_range=(60.0, 140.0)),
    ("aorta", "arterial wall calcification"): _FocalSite(min_depth=0.0, max_depth_mm=4.5),
    ("liver", "hypodense lesion"): _FocalSite(mode="cnr"),
    ("liver", "calcification"): _FocalSite(),
    ("gallbladder", "gallstone"): _FocalSite(min_depth=0.0, hu_range=(-math.inf, 30.0), dependent=True),
    ("spleen", "hypodense lesion"): _FocalSite(mode="delta"),
    ("spleen", "calcification"): _FocalSite(),
    ("pancreas", "hypodense lesion"): _FocalSite(mode="cnr"),
    ("right kidney", "renal cyst"): _FocalSite(min_depth=0.5, hu_range=(80.0, math.inf)),  # in parenchyma
    ("right kidney", "renal stone"): _FocalSite(min_depth=0.0),
    ("left kidney", "renal cyst"): _FocalSite(min_depth=0.5, hu_range=(80.0, math.inf)),
    ("left kidney", "renal stone"): _FocalSite(min_depth=0.0),
    ("vertebrae", "sclerotic lesion"): _FocalSite(cancellous=True),
    ("vertebrae", "lytic lesion"): _FocalSite(cancellous=True),
}


def _lesion_candidates(site: _FocalSite, organ, hu, depth_mm, radius_mm: float, y, bone_hu: dict) -> np.ndarray:
    """Voxels (of an organ's bounding box) where a lesion of ``radius_mm`` may be centred.

    Args:
        organ: boolean organ mask; hu: clean HU; depth_mm: distance to the organ's edge (mm);
        y: canonical y of the box's voxels (broadcastable); bone_hu: cancellous / cortical HU.
    """
    cand = organ & (depth_mm >= site.min_depth * radius_mm) & (hu > site.hu_range[0]) & (hu < site.hu_range[1])
    if site.max_depth_mm is not None:
        cand &= depth_mm <= site.max_depth_mm
    if site.cancellous:
        cand &= hu < 0.5 * (bone_hu["cancellous"] + bone_hu["cortical"])
    if site.dependent and cand.any():
        ys = np.broadcast_to(y, cand.shape)
        cand &= ys <= np.median(ys[cand])
    if not cand.any() and not site.dependent:
        cand = organ & (depth_mm >= depth_mm.max() * 0.999)  # no room for the full size: the deepest voxels
    return cand


def _render_focal(vol: _Volume, spec: CTCaseSpec, bone_hu: dict) -> tuple[list[Lesion], set[tuple[str, str]]]:
    """Draw every present focal finding as one small sphere inside its organ.

    Returns:
        ``(lesions, dropped)``: the drawn lesions and the findings that found no place (their
        label becomes 0, so the record states what the image shows).
    """
    g = vol.grid
    c = spec.conspicuity
    lesions: list[Lesion] = []
    dropped: set[tuple[str, str]] = set()
    world_per_canonical = float(np.exp(np.mean(np.log(g.scale))))
    for (anatomy, finding), site in _FOCAL_SITES.items():
        if not spec.present(anatomy, finding):
            continue
        q = spec.params(anatomy, finding)
        organ_full = np.isin(vol.labels, ANATOMY_LABELS[anatomy])
        box = _bbox(organ_full, pad=1)
        if box is None:
            dropped.add((anatomy, finding))
            continue
        organ = organ_full[box]
        depth_mm = ndimage.distance_transform_edt(organ, sampling=g.spacing)
        r = q["radius"]
        cand = _lesion_candidates(site, organ, vol.hu[box], depth_mm, r * float(g.scale.min()),
                                  g.y[box[1]][None, :, None], bone_hu)
        at = _pick(cand, q["pick"])
        if at is None:
            dropped.add((anatomy, finding))
            continue
        ijk = tuple(a + s.start for a, s in zip(at, box))
        # sub-voxel centre: lesions of the same size cover 2, 3 or 4 voxels across
        offset = (np.asarray(q["offset"], dtype=np.float32) - 0.5) * g.spacing / g.scale
        center = _voxel_to_canonical(g, ijk) + offset
        sl, m = _sphere_in(g, center, r)
        foot = np.zeros(g.shape, dtype=bool)
        if m is not None:
            foot[sl] = m
        foot &= organ_full
        foot[ijk] = True  # the centre voxel always belongs to the lesion
        before = vol.hu[foot]
        if site.mode == "target":
            after = before + c * (q["target"] - before)
        elif site.mode == "delta":
            after = before + c * q["delta"]
        else:  # "cnr": contrast tied to this case's noise level
            after = before - c * q["cnr"] * spec.noise_sigma
        vol.hu[foot] = after
        lesions.append(Lesion(anatomy, finding, ijk, 2.0 * r * world_per_canonical, foot, float(np.mean(after - before))))
    return lesions, dropped


@lru_cache(maxsize=8)
def _noise_gain(sigma_vox: float) -> float:
    """Standard deviation of unit white noise after ``gaussian_filter(sigma_vox)`` in 3D."""
    impulse = np.zeros(33, dtype=np.float64)
    impulse[16] = 1.0
    k = ndimage.gaussian_filter1d(impulse, sigma_vox)
    return float(np.sum(k**2) ** 1.5)


PSF_SIGMA_VOXELS = 0.5  # scanner blur of the phantom (partial volume at organ edges)
NOISE_SIGMA_VOXELS = 0.7  # noise correlation length (CT noise is not white)


def render_ct_case(
    spec: CTCaseSpec,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    noise: bool = True,
    blur: bool = True,
    quantize: bool = True,
) -> RenderedCT:
    """Render a case in RAS array order.

    Args:
        spec: the case (from :func:`sample_ct_case`).
        shape: (X, Y, Z) voxels (RAS axes).
        spacing: voxel size (mm) along X, Y, Z.
        noise: add correlated noise of ``spec.noise_sigma`` HU.
        blur: apply the scanner point-spread blur.
        quantize: round to int16 HU (else float32).

    Returns:
        :class:`RenderedCT` (arrays (X, Y, Z); affine RAS, not yet the stored orientation).
    """
    shape = tuple(int(v) for v in shape)
    grid = _make_grid(shape, spacing, spec.body_shift)
    vol = _Volume(grid)
    bone_hu = _PhantomPainter(vol, spec).run()
    lesions, dropped = _render_focal(vol, spec, bone_hu)
    hu = vol.hu
    if blur:
        hu = ndimage.gaussian_filter(hu, PSF_SIGMA_VOXELS, mode="nearest")
    if noise:
        field_ = np.random.default_rng(spec.noise_seed).standard_normal(shape, dtype=np.float32)
        field_ = ndimage.gaussian_filter(field_, NOISE_SIGMA_VOXELS, mode="wrap")
        hu = hu + field_ * np.float32(spec.noise_sigma / _noise_gain(NOISE_SIGMA_VOXELS))
    if quantize:
        hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    present_labels = set(np.unique(vol.labels).tolist())
    findings = {}
    for anatomy, by_finding in spec.findings.items():
        if not present_labels.intersection(ANATOMY_LABELS.get(anatomy, ())):
            continue
        findings[anatomy] = {f: (0 if (anatomy, f) in dropped else int(v)) for f, v in by_finding.items()}
    return RenderedCT(
        hu=hu, labels=vol.labels, affine=_ras_affine(shape, spacing, spec.grid_center_world), findings=findings,
        study_findings=dict(spec.study_findings), lesions=lesions, noise_sigma=spec.noise_sigma,
    )


# ============================================================================ files
def _reorient(data: np.ndarray, affine: np.ndarray, axcodes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """RAS array + affine -> the same physical image stored with ``axcodes`` (nibabel)."""
    if tuple(axcodes) == ("R", "A", "S"):
        return data, affine
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(axcodes)))
    out = np.ascontiguousarray(apply_orientation(data, transform))
    return out, affine @ inv_ornt_aff(transform, data.shape)


def _nifti(data: np.ndarray, affine: np.ndarray, description: str) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner coordinates, like real CT exports
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode()[:79]
    return img


def _write_case(out_dir: Path, spec: CTCaseSpec, catalog: Catalog, shape, spacing, lesion_masks: bool = False) -> dict[str, Any]:
    """Render and write one case; returns its datalist record.

    With ``lesion_masks`` also writes ``lesions/<id>.nii.gz``: uint8, 1 on the footprint of any
    focal lesion, stored in the orientation (and with the affine) of the case's label map.
    """
    rendered = render_ct_case(spec, shape, spacing)
    case_id = f"case_{spec.index:04d}"
    image, image_aff = _reorient(rendered.hu, rendered.affine, spec.image_axcodes)
    mask, mask_aff = _reorient(rendered.labels, rendered.affine, spec.mask_axcodes)
    _nifti(image, image_aff, "anatomy_vlp_bundle synthetic CT (HU)").to_filename(out_dir / "images" / f"{case_id}.nii.gz")
    _nifti(mask, mask_aff, "TotalSegmentator v2 total label ids").to_filename(out_dir / "masks" / f"{case_id}.nii.gz")
    if lesion_masks:
        footprint = np.zeros(rendered.labels.shape, dtype=np.uint8)
        for les in rendered.lesions:
            footprint[les.footprint] = 1
        lesion, lesion_aff = _reorient(footprint, rendered.affine, spec.mask_axcodes)
        _nifti(lesion, lesion_aff, "focal lesion footprints (1)").to_filename(out_dir / "lesions" / f"{case_id}.nii.gz")
    report, sentences = write_report(
        catalog, rendered.findings, np.random.default_rng(spec.report_seed),
        study_findings=rendered.study_findings or None, details=rendered.details(),
    )
    record: dict[str, Any] = {
        "id": case_id,
        "patient": f"p{spec.patient:04d}",
        "image": f"images/{case_id}.nii.gz",
        "anatomy_mask": f"masks/{case_id}.nii.gz",
        "report": report,
        "anatomy_sentences": sentences,
        "findings": rendered.findings,
    }
    if rendered.study_findings:
        record["study_findings"] = rendered.study_findings
    return record


# ============================================================================ dataset
def split_plan(
    n_cases: int, seed: int = 0, n_test: int | None = None, n_val: int | None = None
) -> list[tuple[int, int, str]]:
    """Which patient and split each case belongs to (``synthetic.splits.plan_patients``).

    Returns:
        ``[(case_index, patient_index, split), ...]`` in case order.
    """
    try:
        return plan_patients(n_cases, seed, PLAN_STREAM, SECOND_STUDY_PROBABILITY, n_test, n_val)
    except ValueError as e:
        raise ValueError(f"synthetic CT: {e}") from None


@lru_cache(maxsize=1)
def _catalog() -> Catalog:
    catalog = load_catalog(CATALOG_NAME)
    _check_catalog(catalog)
    return catalog


def _check_catalog(catalog: Catalog) -> None:
    """The renderer draws exactly the catalog's findings; a mismatch is a packaging error."""
    pairs = set(catalog.finding_pairs())
    missing = sorted(set(FINDING_KINDS) - pairs)
    unknown = sorted(pairs - set(FINDING_KINDS))
    if missing or unknown or set(catalog.study_findings) != set(STUDY_FINDING_KINDS):
        raise ValueError(
            f"catalog {catalog.source or catalog.name}: findings do not match the CT renderer "
            f"(not in catalog: {missing}; no renderer: {unknown}; study findings {list(catalog.study_findings)})"
        )
    for a in catalog.anatomies:
        if tuple(a.labels) and set(a.labels) != set(ANATOMY_LABELS.get(a.name, ())):
            raise ValueError(f"catalog {catalog.source}: labels of {a.name!r} differ from the renderer's {ANATOMY_LABELS.get(a.name)}")


def _generate_one(args: tuple) -> dict[str, Any]:
    out_dir, seed, index, patient, conspicuity, prevalence, shape, spacing, lesion_masks = args
    catalog = _catalog()
    spec = sample_ct_case(seed, index, patient, catalog, conspicuity=conspicuity, prevalence=prevalence)
    return _write_case(Path(out_dir), spec, catalog, shape, spacing, lesion_masks)


def _lesion_record(record: dict[str, Any]) -> dict[str, Any]:
    """The lesion datalist's record of a case: its image with the lesion mask as label map."""
    return {
        "id": record["id"],
        "patient": record["patient"],
        "image": record["image"],
        "anatomy_mask": f"lesions/{record['id']}.nii.gz",
    }


def _check_args(shape, spacing, conspicuity, prevalence, workers) -> tuple[tuple[int, ...], tuple[float, ...]]:
    try:
        shape = tuple(int(v) for v in shape)
        spacing = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"synthetic CT: shape and spacing must be 3 numbers each, got {shape!r} and {spacing!r}") from None
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"synthetic CT: shape must be 3 sizes of at least 8 voxels (X, Y, Z), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0 or not all(math.isfinite(v) for v in spacing):
        raise ValueError(f"synthetic CT: spacing must be 3 positive millimetre values, got {spacing}")
    if not (math.isfinite(conspicuity) and conspicuity >= 0):
        raise ValueError(f"synthetic CT: conspicuity must be a non-negative number, got {conspicuity}")
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"synthetic CT: prevalence must be in [0, 1], got {prevalence}")
    if int(workers) < 1:
        raise ValueError(f"synthetic CT: workers must be at least 1, got {workers}")
    return shape, spacing


def generate_ct_dataset(
    out_dir: Path,
    n_cases: int | None = None,
    seed: int = 0,
    n_test: int | None = None,
    n_val: int | None = None,
    conspicuity: float = 1.0,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    workers: int = 1,
    progress: bool = True,
    prevalence: float = DEFAULT_PREVALENCE,
    lesion_masks: bool = False,
    **kwargs,
) -> Path:
    """Write a synthetic CT dataset in the data-contract format.

    Writes ``out_dir/datalist.json`` (``synthetic-ct-v1``, modality CT, catalog ``catalog.json``),
    ``out_dir/catalog.json`` (the packaged ``synthetic_ct`` catalog), ``out_dir/images/<id>.nii.gz``
    (int16 HU) and ``out_dir/masks/<id>.nii.gz`` (uint8 TotalSegmentator label ids).

    With ``lesion_masks`` also ``out_dir/lesions/<id>.nii.gz`` (uint8, 1 on the footprint of any
    focal lesion, before scanner blur; same orientation and affine as the case's label map; all 0
    in a case without focal lesions), ``out_dir/lesion_catalog.json`` (one anatomy, ``focal
    lesion``, label 1, no findings) and ``out_dir/lesion_datalist.json`` (the same cases, patients,
    splits and images, ``anatomy_mask`` = the lesion mask, no report) for lesion segmentation.

    Args:
        out_dir: output folder (created).
        n_cases: number of cases (default 320: 180 training, 40 validation, 100 test; other
            sizes scale the splits).
        seed: dataset seed; the same seed and arguments give identical files.
        n_test, n_val: split sizes overriding the proportional default.
        conspicuity: multiplier of every finding's contrast / size change (1 = default, 0 = invisible).
        shape: (X, Y, Z) voxels of every volume, RAS axes; the phantom scales to the field of view.
        spacing: voxel size (mm) along X, Y, Z.
        workers: processes (output is identical for any number).
        progress: show a tqdm progress bar.
        prevalence: probability of each finding in each case.
        lesion_masks: also write the focal-lesion masks and their datalist (``true`` / ``false``
            text accepted, as from the command line); the other files are the same either way.

    Returns:
        The path of ``datalist.json``.
    """
    if kwargs:
        raise TypeError(
            f"synthetic CT: unknown option(s) {sorted(kwargs)}; options are n_cases, seed, n_test, n_val, "
            "conspicuity, shape, spacing, workers, progress, prevalence, lesion_masks"
        )
    n_cases = DEFAULT_N_CASES if n_cases is None else n_cases
    if int(n_cases) != n_cases:
        raise ValueError(f"synthetic CT: n_cases must be an integer, got {n_cases!r}")
    shape, spacing = _check_args(shape, spacing, float(conspicuity), float(prevalence), workers)
    lesion_masks = as_flag(lesion_masks, "lesion_masks", "synthetic CT")
    plan = split_plan(int(n_cases), seed, n_test, n_val)
    catalog = _catalog()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    if lesion_masks:
        (out_dir / "lesions").mkdir(exist_ok=True)
    jobs = [
        (str(out_dir), int(seed), index, patient, float(conspicuity), float(prevalence), shape, spacing, lesion_masks)
        for index, patient, _ in plan
    ]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="synthetic CT", unit="case", disable=not progress)
    records: list[dict[str, Any]] = []
    try:
        if int(workers) > 1:
            with ProcessPoolExecutor(max_workers=int(workers)) as pool:
                for rec in pool.map(_generate_one, jobs, chunksize=4):
                    records.append(rec)
                    bar.update(1)
        else:
            for job in jobs:
                records.append(_generate_one(job))
                bar.update(1)
    finally:
        bar.close()
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for (_, _, split), rec in zip(plan, records):
        splits[split].append(rec)
    catalog.save(out_dir / "catalog.json")
    if lesion_masks:
        LESION_CATALOG.save(out_dir / "lesion_catalog.json")
        write_datalist(
            out_dir / "lesion_datalist.json", name=LESION_DATASET_NAME, modality="CT", catalog="lesion_catalog.json",
            splits={split: [_lesion_record(r) for r in recs] for split, recs in splits.items()},
        )
    return write_datalist(out_dir / "datalist.json", name=DATASET_NAME, modality="CT", catalog="catalog.json", splits=splits)
