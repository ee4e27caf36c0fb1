"""Datalist validation (``python -m anatomy_vlp_bundle validate PATH [--deep]``).

:func:`validate_datalist` checks a ``datalist.json`` against the data contract
(``DATA_CONTRACT.md``): the datalist's own keys and catalog, then every record — ids, patients
across splits, image format and dimensionality for the modality, masks (readable, on the image's
physical extent), anatomy / finding names against the catalog, boxes, report text. By default it
reads headers only (:mod:`anatomy_vlp_bundle.data.headers`; empty images and images larger than
:func:`~anatomy_vlp_bundle.data.headers.max_voxels` are refused from the header, before anything is
decoded); ``deep=True`` also decodes every image and mask (truncated files, NaN or infinite voxels,
constant images, non-integer label maps, label values no anatomy lists).

It never raises on bad input: every problem, including an exception inside a record's check,
becomes a :class:`Problem` naming split, record index, id, field and file, and the next record is
checked. Errors make training refuse the datalist; warnings do not.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .catalog import MODALITIES, Catalog, CatalogError
from .datalist import SPLITS, DatalistError, load_datalist, read_datalist_json, resolve_record
from .headers import (
    NON_RADIOGRAPH_MODALITIES,
    HeaderError,
    ImageHeader,
    check_image_size,
    overlap_fraction,
    read_header,
    world_bounds,
)
from .labels import ABSENT, PRESENT, UNCERTAIN

__all__ = [
    "Problem",
    "ValidationReport",
    "validate_datalist",
    "validate_command",
    "decode_voxels",
    "mask_fraction_outside",
    "RECORD_KEYS",
]

#: Fields a record may have (``DATA_CONTRACT.md``); other keys are reported once as a warning.
RECORD_KEYS = (
    "id",
    "patient",
    "image",
    "anatomy_mask",
    "anatomy_masks",
    "anatomy_boxes",
    "report",
    "anatomy_sentences",
    "findings",
    "study_findings",
)
DATALIST_KEYS = ("name", "modality", "catalog", "description") + SPLITS

IMAGE_KINDS = {"CT": ("nifti", "nrrd", "metaimage", "dicom_series"), "CXR": ("png", "jpeg", "dicom")}
IMAGE_FORMATS_TEXT = {
    "CT": "NIfTI (.nii/.nii.gz), NRRD, MHA/MHD or a DICOM series folder",
    "CXR": "PNG, JPEG or DICOM",
}
# Masks are label maps / binary images; DICOM SEG is not a contract mask format.
MASK_KINDS = ("nifti", "nrrd", "metaimage", "png", "jpeg")
CXR_PIL_DTYPES = ("uint8", "uint16", "int32")  # Pillow L / I;16 / I (16-bit PNGs may open as I)
CXR_PHOTOMETRIC = (
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_RCT",
    "YBR_ICT",
    "YBR_PARTIAL_420",
)
FINDING_VALUES = (PRESENT, ABSENT, UNCERTAIN)
#: The exact foreground test decodes at most this many foreground voxels (evenly strided).
MAX_MASK_POINTS = 200_000


# --------------------------------------------------------------------------- report
@dataclass
class Problem:
    """One problem found by the validator.

    Attributes:
        severity: ``"error"`` (training refuses the datalist) or ``"warning"``.
        split: ``training`` / ``validation`` / ``test``, or ``None`` for the datalist itself.
        index: record index within its split (``None`` for datalist-level problems).
        id: the record's ``id`` when it has one.
        field: the record (or datalist) key concerned, e.g. ``image``, ``anatomy_masks.liver``.
        file: the file concerned (absolute path), if any.
        message: what is wrong.
    """

    severity: str
    split: str | None
    index: int | None
    id: str | None
    field: str | None
    file: str | None
    message: str

    def where(self) -> str:
        if self.split is None:
            return "datalist"
        return f"{self.split}[{self.index}]"

    def format(self) -> str:
        """One line: severity, split[index], id, field, file and message."""
        parts = [f"{self.severity.upper():7s}", self.where()]
        if self.id is not None:
            parts.append(f"id={self.id}")
        if self.field:
            parts.append(f"field={self.field}")
        if self.file:
            parts.append(f"file={self.file}")
        return " ".join(parts) + f": {self.message}"


@dataclass
class ValidationReport:
    """Result of :func:`validate_datalist`.

    Attributes:
        datalist: the validated file.
        modality, catalog: from the datalist (``catalog`` is the catalog's name once loaded).
        deep: whether voxels were decoded.
        problems: every problem, in the order found.
        records: split -> number of records.
        anatomies_present: anatomy -> number of records where it is present (a mask or box given;
            with ``deep`` an empty mask does not count, and label-map anatomies are counted from
            the decoded values — without ``deep`` label maps are not opened, so anatomies given
            only through ``anatomy_mask`` are not counted).
        ignored_label_values: label value -> number of records whose label map holds it although
            no catalog anatomy lists it (information, not a problem; ``deep`` only).
        label_maps_decoded: label maps whose values were read (``deep``).
        seconds: wall time of the validation.
    """

    datalist: str
    modality: str | None = None
    catalog: str | None = None
    deep: bool = False
    problems: list[Problem] = field(default_factory=list)
    records: dict[str, int] = field(default_factory=dict)
    anatomies_present: dict[str, int] = field(default_factory=dict)
    ignored_label_values: dict[int, int] = field(default_factory=dict)
    label_maps_decoded: int = 0
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    @property
    def n_records(self) -> int:
        return sum(self.records.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "datalist": self.datalist,
            "modality": self.modality,
            "catalog": self.catalog,
            "deep": self.deep,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "records": dict(self.records),
            "anatomies_present": dict(self.anatomies_present),
            "ignored_label_values": {str(k): v for k, v in sorted(self.ignored_label_values.items())},
            "label_maps_decoded": self.label_maps_decoded,
            "seconds": round(self.seconds, 3),
            "problems": [asdict(p) for p in self.problems],
        }

    def summary(self) -> str:
        """A few lines: what was checked, counts, verdict."""
        splits = ", ".join(f"{s} {n}" for s, n in self.records.items())
        mode = "headers and voxels (deep)" if self.deep else "headers only"
        lines = [
            f"datalist {self.datalist} (modality {self.modality}, catalog {self.catalog}): "
            f"{self.n_records} records ({splits or 'none'}); checked {mode} in {self.seconds:.1f} s"
        ]
        if self.anatomies_present:
            lines.append(
                "anatomies present: " + ", ".join(f"{a} {n}" for a, n in self.anatomies_present.items())
            )
        if self.ignored_label_values:
            vals = ", ".join(f"{v} ({n} records)" for v, n in sorted(self.ignored_label_values.items()))
            lines.append(f"info: label values no catalog anatomy lists (ignored): {vals}")
        n_e, n_w = len(self.errors), len(self.warnings)
        verdict = "FAILED" if n_e else "OK"
        lines.append(f"{n_e} error{'s' * (n_e != 1)}, {n_w} warning{'s' * (n_w != 1)}: {verdict}")
        return "\n".join(lines)

    def format(self, problems: bool = True) -> str:
        """The readable report: one line per problem (when ``problems``), then the summary."""
        body = [p.format() for p in self.problems] if problems else []
        return "\n".join(body + [self.summary()])


# --------------------------------------------------------------------------- voxels (deep)
def decode_voxels(path: str | Path, header: ImageHeader) -> np.ndarray:
    """Decode an image's voxels in the header's index order.

    This is the validator's only decoding entry point: it is to switch over to
    ``anatomy_vlp_bundle.data.readers.load_study_image`` once that reader is settled, so that
    the validator decodes exactly as training does.

    Args:
        path: the image file or DICOM series folder.
        header: its :class:`ImageHeader` (gives the format and the expected shape).

    Returns:
        Array of shape ``header.shape`` (index order ``i, j[, k]``), plus a trailing channel axis
        when ``header.n_components > 1``.
    """
    kind = header.kind
    if kind == "nifti":
        import nibabel as nib

        arr = np.asanyarray(nib.load(str(path)).dataobj)
        if arr.dtype.names:  # RGB24-style structured voxels -> channels last
            arr = np.stack([arr[n] for n in arr.dtype.names], axis=-1)
        # Drops the singleton axes the header dropped ((x, y, z, 1, c) vector images, one-slice volumes).
        channels = (header.n_components,) if header.n_components > 1 else ()
        return arr.reshape(tuple(header.shape) + channels)
    if kind in ("nrrd", "metaimage", "dicom_series", "dicom"):
        import SimpleITK as sitk

        if kind == "dicom_series":
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(header.dicom.files))
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)  # (k, j, i[, c]): reverse the spatial axes
        n_sp = img.GetDimension()
        order = tuple(reversed(range(n_sp))) + tuple(range(n_sp, arr.ndim))
        arr = np.transpose(arr, order)
        return arr.reshape(tuple(header.shape) + arr.shape[n_sp:])
    if kind in ("png", "jpeg"):
        from PIL import Image

        with Image.open(path) as im:
            im.load()  # decodes; raises on truncated files
            arr = np.asarray(im)
        return np.swapaxes(arr, 0, 1)  # (rows, cols[, c]) -> (i = column, j = row[, c])
    raise HeaderError(f"{path}: cannot decode a {kind} image")


def mask_fraction_outside(
    mask: np.ndarray,
    mask_affine: np.ndarray,
    image_shape,
    image_affine: np.ndarray,
    max_points: int = MAX_MASK_POINTS,
) -> float:
    """Fraction of a mask's foreground voxels whose centres lie outside an image's grid.

    Positions are compared in world coordinates, so masks on another grid or orientation than the
    image are measured correctly.

    Args:
        mask: ``(i, j[, k])`` array, foreground = nonzero.
        mask_affine: ``(4, 4)`` mask index -> world.
        image_shape: image spatial size ``(i, j[, k])``.
        image_affine: ``(4, 4)`` image index -> world.
        max_points: foreground voxels tested at most (evenly strided subset beyond that).

    Returns:
        A fraction in ``[0, 1]``; 0.0 for an empty mask.
    """
    idx = np.argwhere(mask != 0)
    if idx.shape[0] == 0:
        return 0.0
    if idx.shape[0] > max_points:
        idx = idx[:: int(math.ceil(idx.shape[0] / max_points))]
    pts = np.zeros((idx.shape[0], 4))
    pts[:, : min(3, idx.shape[1])] = idx[:, :3]
    pts[:, 3] = 1.0
    to_image = np.linalg.inv(np.asarray(image_affine, dtype=float)) @ np.asarray(mask_affine, dtype=float)
    ijk = pts @ to_image.T
    n = np.ones(3)
    n[: len(image_shape)] = np.asarray(image_shape, dtype=float)[:3]
    inside = np.all((ijk[:, :3] >= -0.5) & (ijk[:, :3] < n[None, :] - 0.5), axis=1)
    return float(1.0 - inside.mean())


# --------------------------------------------------------------------------- checker
@dataclass
class _Record:
    split: str
    index: int
    id: str | None


class _Validator:
    def __init__(self, path: str | Path, deep: bool, progress: bool):
        self.path = Path(path)
        self.deep = deep
        self.progress = progress
        self.report = ValidationReport(datalist=str(self.path), deep=deep)
        self.catalog: Catalog | None = None
        self.modality: str | None = None
        self.root: Path = self.path.parent
        self.present = Counter()
        self.ignored = Counter()
        self.ids: dict[str, tuple[str, int]] = {}
        self.images: dict[str, tuple[str, int, str | None]] = {}
        self.patients: dict[str, dict[str, list[tuple[int, str | None]]]] = defaultdict(lambda: defaultdict(list))
        self.unknown_keys: dict[str, tuple[int, _Record]] = {}  # key -> (records, first record)

    # ------------------------------------------------------------------ helpers
    def add(self, severity: str, rec: _Record | None, fld: str | None, file, message: str) -> None:
        self.report.problems.append(
            Problem(
                severity=severity,
                split=rec.split if rec else None,
                index=rec.index if rec else None,
                id=rec.id if rec else None,
                field=fld,
                file=str(file) if file is not None else None,
                message=message,
            )
        )

    @contextlib.contextmanager
    def guard(self, rec: _Record | None, fld: str | None, file=None) -> Iterator[None]:
        """Turn any exception raised inside into an error on ``rec`` / ``fld`` / ``file``."""
        try:
            yield
        except HeaderError as e:
            self.add("error", rec, fld, file, str(e))
        except Exception as e:  # the validator must never crash on bad input
            where = f" while checking {file}" if file else ""
            self.add("error", rec, fld, file, f"validator could not check this{where}: {type(e).__name__}: {e}")

    def _hint(self, name: str, choices) -> str:
        close = difflib.get_close_matches(str(name), list(choices), n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""

    # ------------------------------------------------------------------ datalist level
    def run(self) -> ValidationReport:
        t0 = time.perf_counter()
        try:
            self._run()
        finally:
            self.report.seconds = time.perf_counter() - t0
        return self.report

    def _run(self) -> None:
        try:
            dl = load_datalist(self.path)
        except DatalistError as e:
            self.add("error", None, None, self.path, str(e))
            return
        self.report.datalist = str(dl.path)
        self.root = dl.root
        raw = read_datalist_json(dl.path)
        for key, value in raw.items():
            if key not in DATALIST_KEYS and isinstance(value, list):
                self.add(
                    "warning", None, key, dl.path,
                    f"unknown datalist key {key!r} holds a list (ignored; splits are {', '.join(SPLITS)})"
                    + self._hint(key, SPLITS),
                )
        self.modality = dl.modality
        self.report.modality = dl.modality
        self.report.catalog = dl.catalog_ref
        if dl.modality not in MODALITIES:
            self.add("error", None, "modality", dl.path, f"modality must be one of {MODALITIES}, got {dl.modality!r}")
        try:
            self.catalog = dl.catalog()
            self.report.catalog = self.catalog.name
        except CatalogError as e:
            self.add("error", None, "catalog", dl.path, f"catalog {dl.catalog_ref!r} unusable: {e}")
        except Exception as e:
            self.add("error", None, "catalog", dl.path, f"catalog {dl.catalog_ref!r} unusable: {type(e).__name__}: {e}")
        if self.catalog is not None and dl.modality in MODALITIES and self.catalog.modality != dl.modality:
            self.add(
                "error", None, "catalog", self.catalog.source,
                f"catalog {self.catalog.name!r} is for {self.catalog.modality} but the datalist's modality is {dl.modality}",
            )
        for split in SPLITS:
            self.report.records[split] = len(dl.splits.get(split) or [])
        if dl.modality not in MODALITIES:
            return  # every image check depends on the modality
        total = sum(self.report.records.values())
        bar = _progress_bar(total, self.progress)
        try:
            for split in SPLITS:
                for index, rec in enumerate(dl.splits.get(split) or []):
                    self._check_record_safely(split, index, rec)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        self._check_patients()
        for key, (count, first) in self.unknown_keys.items():
            self.add(
                "warning", first, key, None,
                f"key {key!r} is not a contract record field (ignored) — in {count} record{'s' * (count != 1)}"
                + self._hint(key, RECORD_KEYS),
            )
        # Report in datalist order (patient and unknown-key problems are found after the loop).
        rank = {s: i for i, s in enumerate(SPLITS)}
        self.report.problems.sort(key=lambda p: (p.split is not None, rank.get(p.split, -1), p.index or 0))
        order = self.catalog.names if self.catalog else sorted(self.present)
        self.report.anatomies_present = {a: self.present[a] for a in order if self.present.get(a)}
        self.report.ignored_label_values = dict(sorted(self.ignored.items()))

    def _check_patients(self) -> None:
        for patient, by_split in self.patients.items():
            if len(by_split) < 2:
                continue
            splits = [s for s in SPLITS if s in by_split]
            desc = "; ".join(
                f"{s}: " + ", ".join(str(i) for _, i in by_split[s][:5]) + (" ..." if len(by_split[s]) > 5 else "")
                for s in splits
            )
            idx, rid = by_split[splits[1]][0]
            self.add(
                "error", _Record(splits[1], idx, rid), "patient", None,
                f"patient {patient!r} has images in {len(splits)} splits ({' and '.join(splits)}); "
                f"one patient's images must all be in one split (ids {desc})",
            )

    # ------------------------------------------------------------------ record level
    def _check_record_safely(self, split: str, index: int, rec: Any) -> None:
        rid = rec.get("id") if isinstance(rec, dict) else None
        r = _Record(split, index, str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None)
        with self.guard(r, None):
            self._check_record(r, rec)

    def _check_record(self, r: _Record, rec: Any) -> None:
        if not isinstance(rec, dict):
            self.add("error", r, None, None, f"a record must be a JSON object, got {type(rec).__name__}")
            return
        for key in rec:
            if key not in RECORD_KEYS:
                count, first = self.unknown_keys.get(key, (0, r))
                self.unknown_keys[key] = (count + 1, first)
        self._check_id(r, rec)
        absolute = resolve_record(rec, self.root)
        present: set[str] = set()

        image_header = None
        with self.guard(r, "image", absolute.get("image") if isinstance(absolute.get("image"), str) else None):
            image_header = self._check_image(r, rec, absolute)

        if "anatomy_mask" in rec:
            with self.guard(r, "anatomy_mask", absolute.get("anatomy_mask")):
                self._check_label_map(r, rec["anatomy_mask"], absolute["anatomy_mask"], image_header, present)
        if "anatomy_masks" in rec:
            self._check_anatomy_masks(r, rec["anatomy_masks"], absolute["anatomy_masks"], image_header, present)
        if "anatomy_boxes" in rec:
            with self.guard(r, "anatomy_boxes"):
                self._check_boxes(r, rec["anatomy_boxes"], image_header, present)
        with self.guard(r, "report"):
            self._check_report(r, rec)
        if "anatomy_sentences" in rec:
            with self.guard(r, "anatomy_sentences"):
                self._check_sentences(r, rec["anatomy_sentences"])
        if "findings" in rec:
            with self.guard(r, "findings"):
                self._check_findings(r, rec["findings"])
        if "study_findings" in rec:
            with self.guard(r, "study_findings"):
                self._check_study_findings(r, rec["study_findings"])
        for name in present:
            self.present[name] += 1

    def _check_id(self, r: _Record, rec: dict) -> None:
        rid = rec.get("id")
        if rid is None:
            self.add("error", r, "id", None, "missing required 'id'")
        elif not isinstance(rid, str) or not rid.strip():
            self.add("error", r, "id", None, f"'id' must be a non-empty string, got {rid!r}")
        elif rid in self.ids:
            s, i = self.ids[rid]
            self.add("error", r, "id", None, f"duplicate id {rid!r}: also the id of {s}[{i}] (ids must be unique)")
        else:
            self.ids[rid] = (r.split, r.index)
        if "patient" in rec:
            patient = rec["patient"]
            if isinstance(patient, bool) or not isinstance(patient, (str, int)) or str(patient).strip() == "":
                self.add("error", r, "patient", None, f"'patient' must be a non-empty string, got {patient!r}")
            else:
                self.patients[str(patient)][r.split].append((r.index, r.id))

    # ------------------------------------------------------------------ image
    def _check_image(self, r: _Record, rec: dict, absolute: dict) -> ImageHeader | None:
        value = rec.get("image")
        if value is None:
            self.add("error", r, "image", None, "missing required 'image'")
            return None
        if not isinstance(value, str) or not value.strip():
            self.add("error", r, "image", None, f"'image' must be a non-empty path string, got {value!r}")
            return None
        path = Path(absolute["image"])
        if not path.exists():
            self.add("error", r, "image", path, "image file not found")
            return None
        key = str(path)
        if key in self.images:
            s, i, other = self.images[key]
            self.add(
                "warning", r, "image", path,
                f"the same image is used by {s}[{i}] (id {other})"
                + (": one image in two splits leaks test data" if s != r.split else ""),
            )
        else:
            self.images[key] = (r.split, r.index, r.id)
        try:
            h = read_header(path, self.modality)
        except HeaderError as e:
            self.add("error", r, "image", path, str(e))
            return None
        ok = self._image_fits_modality(r, path, h)
        if not ok:
            return None
        if self.deep:
            self._deep_image(r, path, h)
        return h

    def _image_fits_modality(self, r: _Record, path: Path, h: ImageHeader) -> bool:
        mod = self.modality
        errors: list[str] = []
        warnings: list[str] = []
        try:
            check_image_size(path, h.shape, h.n_components)
        except HeaderError as e:
            errors.append(str(e))
        if h.kind not in IMAGE_KINDS[mod]:
            what = f"{h.ndim}D {h.kind.upper()} image (shape {h.shape})"
            errors.append(f"a {what} in a {mod} datalist: {mod} images must be {IMAGE_FORMATS_TEXT[mod]}")
        elif mod == "CT":
            if h.ndim != 3:
                errors.append(f"{h.ndim}D image (shape {h.shape}) in a CT datalist: CT images must be 3D volumes")
            if h.n_components != 1:
                errors.append(f"CT image with {h.n_components} components per voxel; CT must be single-channel")
            if h.dicom is not None:
                d = h.dicom
                if d.modality != "CT":
                    errors.append(f"DICOM Modality is {d.modality or 'missing'!r}, not 'CT', in a CT datalist")
                if d.photometric and not d.photometric.startswith("MONOCHROME"):
                    errors.append(f"DICOM PhotometricInterpretation {d.photometric!r}: CT must be MONOCHROME1/2")
                if d.duplicate_positions:
                    errors.append(
                        f"DICOM series has {d.duplicate_positions} slice(s) at a position another slice already has "
                        f"({d.n_files} files, {d.n_positions} positions): two series mixed or repeated slices"
                    )
                if d.irregular_spacing:  # implies gap_range
                    warnings.append(
                        f"DICOM series slice positions are irregularly spaced (gaps {d.gap_range[0]:.2f} to "
                        f"{d.gap_range[1]:.2f} mm, median {h.spacing[-1]:.2f} mm: missing slices?); the series cannot be "
                        "read onto a regular grid, so training skips it and inference refuses it"
                    )
                if not h.has_geometry:
                    warnings.append("DICOM series without ImagePositionPatient/ImageOrientationPatient: slice order and position unknown")
        else:  # CXR
            if h.ndim != 2:
                errors.append(f"{h.ndim}D image (shape {h.shape}) in a CXR datalist: radiographs must be 2D")
            if h.n_components not in (1, 3, 4):
                errors.append(
                    f"{h.n_components}-channel image ({h.dtype}); CXR images must be grayscale, RGB or RGBA"
                )
            if h.kind in ("png", "jpeg") and h.dtype not in CXR_PIL_DTYPES:
                errors.append(f"image stored as {h.dtype}; CXR PNG/JPEG must be 8 or 16 bit grayscale, RGB or RGBA")
            if h.dicom is not None:
                d = h.dicom
                if d.modality in NON_RADIOGRAPH_MODALITIES:
                    errors.append(f"DICOM Modality is {d.modality!r}: not a radiograph, in a CXR datalist")
                if d.bits_allocated not in (8, 16):
                    errors.append(f"DICOM BitsAllocated is {d.bits_allocated}; CXR DICOM must be 8 or 16 bit")
                if d.photometric and d.photometric not in CXR_PHOTOMETRIC:
                    errors.append(f"DICOM PhotometricInterpretation {d.photometric!r} is not grayscale or RGB")
        if h.has_geometry:
            sp = np.asarray(h.spacing, dtype=float)
            if not np.all(np.isfinite(h.affine)) or abs(np.linalg.det(h.affine[:3, :3])) < 1e-12 or np.any(sp <= 0):
                errors.append(f"unusable geometry: spacing {h.spacing}, affine not invertible or not finite")
        for msg in errors:
            self.add("error", r, "image", path, msg)
        for msg in warnings:
            self.add("warning", r, "image", path, msg)
        return not errors

    def _deep_image(self, r: _Record, path: Path, h: ImageHeader) -> None:
        try:
            arr = decode_voxels(path, h)
        except Exception as e:
            self.add("error", r, "image", path, f"cannot decode the voxels (truncated or corrupt file?): {type(e).__name__}: {e}")
            return
        if tuple(arr.shape[: h.ndim]) != tuple(h.shape):
            self.add("error", r, "image", path, f"decoded shape {arr.shape} differs from the header's {h.shape}")
            return
        if np.issubdtype(arr.dtype, np.floating):
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            if n_nan or n_inf:
                counts = " and ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "infinite")) if n)
                self.add("error", r, "image", path, f"{counts} voxel(s): images must hold finite values")
                return
        if arr.size and arr.min() == arr.max():
            self.add("warning", r, "image", path, f"every voxel has the same value ({arr.flat[0]}): empty image?")

    # ------------------------------------------------------------------ masks
    def _mask_header(self, r: _Record, fld: str, value: Any, abs_value: Any) -> tuple[Path, ImageHeader] | None:
        """Common checks of one mask file; returns its path and header when usable."""
        if not isinstance(value, str) or not value.strip():
            self.add("error", r, fld, None, f"a mask must be given as a path string, got {value!r}")
            return None
        path = Path(abs_value)
        if not path.exists():
            self.add("error", r, fld, path, "mask file not found")
            return None
        h = read_header(path, self.modality)  # HeaderError -> error through the caller's guard
        check_image_size(path, h.shape, h.n_components)  # the same
        dims = 3 if self.modality == "CT" else 2
        if h.kind not in MASK_KINDS:
            self.add(
                "error", r, fld, path,
                f"{h.kind} is not a mask format: masks are NIfTI, NRRD, MHA/MHD{' or PNG' if dims == 2 else ''} "
                "(convert DICOM SEG to NIfTI)",
            )
            return None
        if h.ndim != dims:
            self.add("error", r, fld, path, f"{h.ndim}D mask (shape {h.shape}) in a {self.modality} datalist: masks must be {dims}D")
            return None
        if h.n_components != 1:
            self.add("error", r, fld, path, f"mask with {h.n_components} channels ({h.dtype}); masks must be single-channel")
            return None
        if h.kind == "jpeg":
            self.add("warning", r, fld, path, "JPEG mask: lossy compression blurs mask edges (every nonzero pixel counts); prefer PNG")
        return path, h

    def _mask_geometry(self, r: _Record, fld: str, path: Path, h: ImageHeader, image: ImageHeader | None,
                       voxels: np.ndarray | None) -> bool:
        """Is the mask on the image's physical extent? Reports and returns False when it is not."""
        if image is None:
            return True  # image unusable: already reported
        if not (h.has_geometry and image.has_geometry):
            if tuple(h.shape) != tuple(image.shape):
                self.add(
                    "error", r, fld, path,
                    f"mask is {h.shape} pixels but the image is {image.shape}: for images without usable spacing "
                    "masks must have the image's pixel size",
                )
                return False
            return True
        frac = overlap_fraction(world_bounds(h.shape, h.affine), world_bounds(image.shape, image.affine))
        if frac <= 0.0:
            lo, hi = world_bounds(h.shape, h.affine)
            ilo, ihi = world_bounds(image.shape, image.affine)
            self.add(
                "error", r, fld, path,
                f"mask grid does not overlap the image at all (mask spans {_fmt_box(lo, hi)} mm, image "
                f"{_fmt_box(ilo, ihi)} mm RAS): a mask of another scan?",
            )
            return False
        if frac >= 0.5 and voxels is None:
            return True
        # Partial overlap (or voxels at hand): decide exactly by where the foreground lies.
        if voxels is None:
            try:
                voxels = decode_voxels(path, h)
            except Exception as e:
                self.add("error", r, fld, path, f"cannot decode the mask (truncated or corrupt file?): {type(e).__name__}: {e}")
                return False
        outside = mask_fraction_outside(voxels, h.affine, image.shape, image.affine)
        if outside > 0.5:
            self.add(
                "error", r, fld, path,
                f"{outside:.0%} of the mask's foreground lies outside the image's extent (in world coordinates): "
                "a mask of another scan?",
            )
            return False
        return True

    def _decode_mask(self, r: _Record, fld: str, path: Path, h: ImageHeader) -> np.ndarray | None:
        """Deep: decode a mask, report NaN and non-integer values; ``None`` when unusable."""
        try:
            arr = decode_voxels(path, h)
        except Exception as e:
            self.add("error", r, fld, path, f"cannot decode the mask (truncated or corrupt file?): {type(e).__name__}: {e}")
            return None
        if np.issubdtype(arr.dtype, np.floating):
            if np.isnan(arr).any():
                self.add("error", r, fld, path, f"mask holds {int(np.isnan(arr).sum())} NaN value(s)")
                return None
            frac = arr[np.isfinite(arr)]
            bad = frac != np.round(frac)
            if bad.any() or not np.isfinite(arr).all():
                example = frac[bad][:3].tolist() if bad.any() else "inf"
                self.add(
                    "error", r, fld, path,
                    f"mask holds non-integer values (e.g. {example}): a label map must hold integer labels "
                    "(resampled with linear interpolation?)",
                )
                return None
        return arr

    def _check_label_map(self, r: _Record, value: Any, abs_value: Any, image: ImageHeader | None,
                         present: set[str]) -> None:
        fld = "anatomy_mask"
        got = self._mask_header(r, fld, value, abs_value)
        if got is None:
            return
        path, h = got
        if self.catalog is not None and not self.catalog.label_to_index():
            self.add("warning", r, fld, path, f"catalog {self.catalog.name!r} lists no labels: the label map is not used")
        voxels = None
        if self.deep:
            voxels = self._decode_mask(r, fld, path, h)
            if voxels is None:
                return
        if not self._mask_geometry(r, fld, path, h, image, voxels):
            return
        if voxels is not None and self.catalog is not None:
            self.report.label_maps_decoded += 1
            values = np.unique(voxels).astype(np.int64)
            known = self.catalog.label_to_index()
            ignored = [int(v) for v in values if v != 0 and int(v) not in known]
            self.ignored.update(ignored)
            found = {self.catalog.anatomies[known[int(v)]].name for v in values if int(v) in known}
            present.update(found)
            if known and not found and values.size and (values != 0).any():
                self.add(
                    "warning", r, fld, path,
                    f"label map holds none of catalog {self.catalog.name!r}'s labels (values {values[:10].tolist()}): wrong catalog?",
                )

    def _check_anatomy_masks(self, r: _Record, value: Any, abs_value: Any, image: ImageHeader | None,
                             present: set[str]) -> None:
        if not isinstance(value, dict):
            self.add("error", r, "anatomy_masks", None, f"'anatomy_masks' must map anatomy name -> mask path, got {type(value).__name__}")
            return
        for name, mask in value.items():
            fld = f"anatomy_masks.{name}"
            file = abs_value.get(name) if isinstance(abs_value.get(name), str) else None
            with self.guard(r, fld, file):
                if not self._known_anatomy(r, fld, name):
                    continue
                got = self._mask_header(r, fld, mask, abs_value.get(name))
                if got is None:
                    continue
                path, h = got
                voxels = self._decode_mask(r, fld, path, h) if self.deep else None
                if self.deep and voxels is None:
                    continue
                if not self._mask_geometry(r, fld, path, h, image, voxels):
                    continue
                if voxels is None or (voxels != 0).any():
                    present.add(name)

    # ------------------------------------------------------------------ names, boxes, text
    def _known_anatomy(self, r: _Record, fld: str, name: Any) -> bool:
        if self.catalog is None:
            return True  # the catalog problem is reported once at datalist level
        if name in self.catalog.names:
            return True
        self.add(
            "error", r, fld, None,
            f"unknown anatomy {name!r}: not in catalog {self.catalog.name!r}" + self._hint(name, self.catalog.names),
        )
        return False

    def _check_boxes(self, r: _Record, boxes: Any, image: ImageHeader | None, present: set[str]) -> None:
        if not isinstance(boxes, dict):
            self.add("error", r, "anatomy_boxes", None, f"'anatomy_boxes' must map anatomy name -> box, got {type(boxes).__name__}")
            return
        n = 6 if self.modality == "CT" else 4
        d = n // 2
        layout = "[xmin, ymin, zmin, xmax, ymax, zmax] in world RAS mm" if n == 6 else "[x_min, y_min, x_max, y_max] in pixels"
        for name, box in boxes.items():
            fld = f"anatomy_boxes.{name}"
            if not self._known_anatomy(r, fld, name):
                continue
            if not isinstance(box, (list, tuple)) or len(box) != n:
                self.add("error", r, fld, None, f"box must be {n} numbers {layout}, got {box!r}")
                continue
            if not all(_finite_number(v) for v in box):
                self.add("error", r, fld, None, f"box values must be finite numbers, got {box!r}")
                continue
            lo, hi = np.asarray(box[:d], dtype=float), np.asarray(box[d:], dtype=float)
            if np.any(lo >= hi):
                self.add("error", r, fld, None, f"box minimum must be below its maximum on every axis ({layout}), got {box!r}")
                continue
            if image is not None:
                if self.modality == "CT" and image.has_geometry:
                    ilo, ihi = world_bounds(image.shape, image.affine)
                    if overlap_fraction((lo, hi), (ilo, ihi)) <= 0:
                        self.add(
                            "error", r, fld, None,
                            f"box {box} lies entirely outside the image ({_fmt_box(ilo, ihi)} mm RAS): LPS or voxel "
                            "coordinates instead of RAS mm?",
                        )
                        continue
                elif self.modality == "CXR":
                    size = np.asarray(image.shape[:2], dtype=float)
                    if np.any(hi <= 0) or np.any(lo >= size):
                        self.add("error", r, fld, None, f"box {box} lies entirely outside the {image.shape[0]}x{image.shape[1]} image")
                        continue
                    if np.any(lo < -1) or np.any(hi > size + 1):
                        self.add("warning", r, fld, None, f"box {box} extends beyond the {image.shape[0]}x{image.shape[1]} image")
            present.add(name)

    def _check_report(self, r: _Record, rec: dict) -> None:
        if "report" not in rec or rec["report"] is None:
            self.add("warning", r, "report", None, "no report: the record has no text for alignment")
        elif not isinstance(rec["report"], str):
            self.add("error", r, "report", None, f"'report' must be a string, got {type(rec['report']).__name__}")
        elif not rec["report"].strip():
            self.add("warning", r, "report", None, "empty report: the record has no text for alignment")
        elif "\ufffd" in rec["report"]:
            n = rec["report"].count("\ufffd")
            self.add(
                "warning", r, "report", None,
                f"report holds {n} U+FFFD replacement character(s): its text was decoded with the wrong encoding "
                "(e.g. Latin-1 or UTF-16 read as UTF-8) before it was written to the datalist",
            )

    def _check_sentences(self, r: _Record, value: Any) -> None:
        if not isinstance(value, dict):
            self.add("error", r, "anatomy_sentences", None, f"'anatomy_sentences' must map anatomy name -> list of sentences, got {type(value).__name__}")
            return
        for name, sentences in value.items():
            fld = f"anatomy_sentences.{name}"
            if not self._known_anatomy(r, fld, name):
                continue
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                self.add("error", r, fld, None, f"sentences must be a list of strings, got {sentences!r:.80}")

    def _finding_value_ok(self, r: _Record, fld: str, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int) or value not in FINDING_VALUES:
            self.add("error", r, fld, None, f"finding value must be 1 (present), 0 (absent) or -1 (uncertain), got {value!r}")
            return False
        return True

    def _check_findings(self, r: _Record, value: Any) -> None:
        if not isinstance(value, dict):
            self.add("error", r, "findings", None, f"'findings' must map anatomy -> finding -> 1|0|-1, got {type(value).__name__}")
            return
        for name, per in value.items():
            fld = f"findings.{name}"
            if not self._known_anatomy(r, fld, name):
                continue
            if not isinstance(per, dict):
                self.add("error", r, fld, None, f"findings of an anatomy must map finding -> 1|0|-1, got {per!r:.80}")
                continue
            own = self.catalog.anatomy(name).findings if self.catalog is not None else None
            for finding, v in per.items():
                ffld = f"findings.{name}.{finding}"
                if own is not None and finding not in own:
                    extra = ""
                    if finding in self.catalog.study_findings:
                        extra = " (it is a study finding: put it in 'study_findings')"
                    else:
                        owners = [a.name for a in self.catalog.anatomies if finding in a.findings]
                        extra = f" (a finding of {', '.join(owners[:3])})" if owners else self._hint(finding, own)
                    self.add("error", r, ffld, None, f"unknown finding {finding!r} for anatomy {name!r}{extra}")
                    continue
                self._finding_value_ok(r, ffld, v)

    def _check_study_findings(self, r: _Record, value: Any) -> None:
        if not isinstance(value, dict):
            self.add("error", r, "study_findings", None, f"'study_findings' must map finding -> 1|0|-1, got {type(value).__name__}")
            return
        for finding, v in value.items():
            fld = f"study_findings.{finding}"
            if self.catalog is not None and finding not in self.catalog.study_findings:
                owners = [a.name for a in self.catalog.anatomies if finding in a.findings]
                extra = (
                    f" (a finding of anatomy {', '.join(owners[:3])}: put it in 'findings')" if owners
                    else self._hint(finding, self.catalog.study_findings)
                )
                self.add("error", r, fld, None, f"unknown study finding {finding!r} in catalog {self.catalog.name!r}{extra}")
                continue
            self._finding_value_ok(r, fld, v)


def _finite_number(value: Any) -> bool:
    """A JSON number usable as a coordinate: int or float, not bool, finite as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # integers beyond float range
        return False


def _fmt_box(lo, hi) -> str:
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi)) + "]"


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but progress is never worth failing for
        return None
    return tqdm(total=total, desc="validate", unit="record", file=sys.stderr)


# --------------------------------------------------------------------------- public API
def validate_datalist(path: str | Path, deep: bool = False, progress: bool = False) -> ValidationReport:
    """Check a datalist against the data contract.

    Args:
        path: a ``datalist.json`` or the folder holding it.
        deep: also decode every image and mask (truncated files, NaN voxels, constant images,
            non-integer label maps, label values no anatomy lists). Without it only headers are read.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`ValidationReport`; ``report.ok`` is False when any problem is an error. Never
        raises for bad input: unreadable files and unexpected exceptions become problems.
    """
    return _Validator(path, deep=deep, progress=progress).run()


def validate_command(path: str, deep: bool = False, json_out: str | None = None, quiet: bool = False) -> None:
    """Validate a datalist and print a readable report (``python -m anatomy_vlp_bundle validate PATH``).

    Args:
        path: ``datalist.json`` or its folder.
        deep: also decode every image and mask (slower; finds truncated files and bad voxel values).
        json_out: write the full report as JSON to this file.
        quiet: print only errors and the summary (no warnings, no progress bar).

    Raises:
        SystemExit: with code 1 when any problem is an error (warnings alone exit 0).
    """
    report = validate_datalist(path, deep=bool(deep), progress=(not quiet) and sys.stderr.isatty())
    if quiet:
        for p in report.errors:
            print(p.format())
        print(report.summary())
    else:
        print(report.format())
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
        print(f"report written to {out}")
    if not report.ok:
        raise SystemExit(1)
