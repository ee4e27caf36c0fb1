"""CT-RATE (chest CT volumes, reports, 18 abnormality labels) to the data contract: ``prepare ctrate``.

``python -m anatomy_vlp_bundle prepare ctrate --input CT-RATE --output DIR [options]`` reads the
HuggingFace dataset ``ibrahimhamamci/CT-RATE`` in its published layout (``--input`` is the repository
root or its ``dataset/`` folder)::

    dataset/train/train_<N>/train_<N>_<scan>/train_<N>_<scan>_<recon>.nii.gz     (valid/valid_<N>/... alike)
    dataset/train_fixed/..., dataset/valid_fixed/...          optional: copies with corrected headers, HU
    dataset/radiology_text_reports/train_reports.csv, validation_reports.csv
        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
    dataset/multi_abnormality_labels/train_predicted_labels.csv, valid_predicted_labels.csv
        VolumeName + 18 columns (Medical material, Arterial wall calcification, ..., Bronchiectasis,
        Interlobular septal thickening), 0 / 1
    dataset/metadata/train_metadata.csv, validation_metadata.csv
        VolumeName, XYSpacing ("[0.75, 0.75]"), ZSpacing, RescaleSlope, RescaleIntercept,
        ImagePositionPatient, ImageOrientationPatient, ...
    dataset/metadata/no_chest_train.txt, no_chest_valid.txt      volumes that are not chest CTs

One record per volume: ``id`` = the volume name without ``.nii.gz`` (``train_12_a_1``), ``patient`` =
``train_12`` (train and valid numbers are separate patients), ``report`` = ``"FINDINGS: <Findings_EN>
IMPRESSION: <Impressions_EN>"`` (a ``"Not given."`` part is left out), ``findings`` / ``study_findings``
from the label CSV: each column goes to the ``ct_totalseg`` anatomy whose findings list it
(case-insensitive), else to the catalog's study findings; a column that maps to neither is named in
the summary. Splits: CT-RATE's train -> training, with ``validation_fraction`` of its patients
moved to validation (by a hash of the patient id); valid -> test.

Geometry. The original volumes were exported without their DICOM geometry: the header has no real
spacing, origin or orientation and the voxels hold the stored values, not HU; the metadata CSV
carries what is missing. CT-RATE's own correction (``download_scripts/fix_metadata.py`` of the
dataset, also reproduced by TorchIO's ``CtRate``) sets spacing ``(XYSpacing[0], XYSpacing[1],
ZSpacing)``, origin ``ImagePositionPatient`` and direction from ``ImageOrientationPatient`` (row,
column, their cross product), then writes ``value * RescaleSlope + RescaleIntercept`` as int16; the
dataset later published such corrected copies in ``train_fixed/`` / ``valid_fixed/``. Here:

- a ``*_fixed`` copy is used when present (``prefer_fixed``), in place;
- otherwise the original is referenced in place, unless ``fix_geometry`` is set: then the corrected
  volume is written to ``OUTPUT/volumes/<split>/<patient>/<scan>/<id>.nii.gz`` as above (int16 HU;
  voxel axes along the DICOM row / column cosines and their cross product, LPS turned into NIfTI's
  RAS; the dataset's script passes the cosines as rows of ITK's direction matrix, which agrees
  whenever the orientation is axis-aligned, e.g. ``[1, 0, 0, 0, 1, 0]``). An original whose header
  already has the metadata's spacing is taken as corrected already (e.g. by the dataset's own
  script) and referenced as it is, so HU are never rescaled twice.

CT-CLIP's training preprocessing then also clips to [-1000, 1000] HU and resamples to 0.75 x 0.75 x
1.5 mm; neither is done here (the bundle's pipeline owns intensity windows and spacing).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.catalog import Catalog, load_catalog
from .common import DEFAULT_FRACTIONS, PrepareSummary, SkipCase, SourceCase, relative_path, run_prepare
from .totalseg import MaskSource, attach_mask, find_mask, save_nifti

__all__ = ["prepare", "map_label_columns", "LABEL_COLUMNS", "RECONSTRUCTIONS"]

CATALOG = "ct_totalseg"
#: CT-RATE's 18 abnormality columns (``multi_abnormality_labels/*_predicted_labels.csv``), in file order.
LABEL_COLUMNS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
#: Values of the ``reconstructions`` option.
RECONSTRUCTIONS = ("first", "all")
NAME_COLUMN = "VolumeName"
REPORT_COLUMNS = ("Findings_EN", "Impressions_EN")
GEOMETRY_COLUMNS = ("XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")
#: Report text CT-RATE uses for an empty section.
NOT_GIVEN = "not given."
FIXED_DIR = "volumes"
_VOLUME = re.compile(r"^(train|valid)_(\d+)_([A-Za-z]+)_(\d+)$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class _SplitFiles:
    """Where one CT-RATE split lives, relative to ``dataset/``."""

    prefix: str  # volume-name prefix and folder: train / valid
    target: str  # contract split
    reports: str
    labels: str
    metadata: str
    no_chest: str


SPLIT_FILES = (
    _SplitFiles("train", "training", "radiology_text_reports/train_reports.csv",
                "multi_abnormality_labels/train_predicted_labels.csv", "metadata/train_metadata.csv",
                "metadata/no_chest_train.txt"),
    _SplitFiles("valid", "test", "radiology_text_reports/validation_reports.csv",
                "multi_abnormality_labels/valid_predicted_labels.csv", "metadata/validation_metadata.csv",
                "metadata/no_chest_valid.txt"),
)


@dataclass
class _Table:
    """One CSV: its path, columns and rows by volume id (the first row of a repeated id wins)."""

    path: Path
    columns: list[str]
    rows: dict[str, dict[str, str]]
    repeated: list[str] = field(default_factory=list)


@dataclass
class _Volume:
    """What one CT-RATE volume brings to its record."""

    split: _SplitFiles
    expected: Path  # where the original volume should be
    path: Path | None = None  # the volume found (original or *_fixed copy)
    fixed_copy: bool = False
    report: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    not_chest: bool = False
    bad_name: bool = False


@dataclass
class _Geometry:
    """A volume's geometry and rescale from its metadata row; ``affine`` maps voxel indices to RAS mm."""

    spacing: tuple[float, float, float]
    slope: float
    intercept: float
    affine: np.ndarray


# --------------------------------------------------------------------------------------------- inputs
def _volume_id(name: str) -> str:
    """``train_12_a_1`` from ``train_12_a_1.nii.gz`` (or a path to it)."""
    base = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii", ".npz"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _dataset_root(input: str | Path) -> Path:
    """The ``dataset/`` folder: ``input/dataset`` or ``input`` itself."""
    path = Path(input)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: CT-RATE folder not found")
    if (path / "dataset").is_dir():
        return path / "dataset"
    if any((path / d).is_dir() for d in ("radiology_text_reports", "train", "valid", "train_fixed", "valid_fixed")):
        return path
    raise FileNotFoundError(
        f"{path}: not a CT-RATE folder: expected dataset/radiology_text_reports/train_reports.csv and "
        "dataset/train/train_<N>/... (give the repository root or its dataset/ folder)"
    )


def _read_table(path: Path, required: Sequence[str]) -> _Table:
    """Read a CT-RATE CSV; a missing required column is a ValueError naming the file."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in (NAME_COLUMN, *required) if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {', '.join(missing)} (columns: {', '.join(columns)})")
        table = _Table(path, columns, {})
        for raw in reader:
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if isinstance(k, str)}
            key = _volume_id(row[NAME_COLUMN])
            if not key:
                continue
            if key in table.rows:
                table.repeated.append(key)
            else:
                table.rows[key] = row
    return table


def _read_optional(path: Path, required: Sequence[str], notes: list[str], why: str) -> _Table | None:
    if path.is_file():
        return _read_table(path, required)
    notes.append(f"{path} not found: {why}")
    return None


def _no_chest_ids(path: Path) -> set[str]:
    """Volume (or scan) ids listed in a ``no_chest_*.txt`` file, one per line."""
    if not path.is_file():
        return set()
    return {_volume_id(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def _volumes_on_disk(root: Path, folder: str) -> dict[str, Path]:
    base = root / folder
    return {_volume_id(p.name): p for p in sorted(base.glob("*/*/*.nii.gz"))} if base.is_dir() else {}


def map_label_columns(columns: Sequence[str], catalog: Catalog) -> tuple[dict[str, tuple[str | None, str]], list[str]]:
    """Where each label column goes in a record.

    A column goes to the one anatomy whose ``findings`` list it (case-insensitive), else to the
    catalog's ``study_findings`` when they list it.

    Returns:
        ``(column -> (anatomy name or None for a study finding, finding name as the catalog spells it),
        reasons for the columns that map to nothing)``.
    """
    study = {f.lower(): f for f in catalog.study_findings}
    mapping: dict[str, tuple[str | None, str]] = {}
    unmapped: list[str] = []
    for column in columns:
        key = column.strip().lower()
        owners = [(a.name, f) for a in catalog.anatomies for f in a.findings if f.lower() == key]
        if len(owners) == 1:
            mapping[column] = owners[0]
        elif key in study:
            mapping[column] = (None, study[key])
        elif owners:
            unmapped.append(f"label column {column!r} is a finding of several anatomies "
                            f"({', '.join(a for a, _ in owners)}): not used")
        else:
            unmapped.append(f"label column {column!r} is no finding of catalog {catalog.name!r}: not used")
    return mapping, unmapped


# --------------------------------------------------------------------------------------------- records
def _report_text(row: dict[str, str]) -> str:
    parts = []
    for title, column in (("FINDINGS", "Findings_EN"), ("IMPRESSION", "Impressions_EN")):
        text = " ".join(row.get(column, "").split())
        if text and text.lower() != NOT_GIVEN:
            parts.append(f"{title}: {text}")
    return " ".join(parts)


def _label_value(value: str) -> int | None:
    """0 / 1 (CT-RATE's values; -1, the contract's "uncertain", is accepted too), None when unreadable."""
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0, -1.0) else None


def _structured_labels(row: dict[str, str], mapping: dict[str, tuple[str | None, str]], source: Path
                       ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    findings: dict[str, dict[str, int]] = {}
    study: dict[str, int] = {}
    for column, (anatomy, finding) in mapping.items():
        value = _label_value(row.get(column, ""))
        if value is None:
            raise SkipCase(f"unreadable label row: {source.name} column {column!r} holds {row.get(column, '')!r}, "
                           "expected 0 or 1")
        if anatomy is None:
            study[finding] = value
        else:
            findings.setdefault(anatomy, {})[finding] = value
    return findings, study


def _numbers(value: str | None) -> list[float]:
    return [float(x) for x in _NUMBER.findall(value or "")]


def _geometry(row: dict[str, str], source: Path) -> _Geometry:
    """Spacing, rescale and RAS affine of a volume from its metadata row (SkipCase when unusable)."""
    def bad(column: str) -> SkipCase:
        return SkipCase(f"unreadable metadata: {source.name} column {column} holds {row.get(column, '')!r}")

    xy = _numbers(row.get("XYSpacing"))
    if len(xy) == 1:
        xy = xy * 2
    if len(xy) != 2 or min(xy) <= 0 or not all(map(math.isfinite, xy)):
        raise bad("XYSpacing")
    z = _numbers(row.get("ZSpacing"))
    if len(z) != 1 or not (math.isfinite(z[0]) and z[0] > 0):
        raise bad("ZSpacing")
    rescale = []
    for column in ("RescaleSlope", "RescaleIntercept"):
        value = _numbers(row.get(column))
        if len(value) != 1 or not math.isfinite(value[0]):
            raise bad(column)
        rescale.append(value[0])
    if rescale[0] == 0:
        raise bad("RescaleSlope")
    orientation = _numbers(row.get("ImageOrientationPatient")) or [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    position = _numbers(row.get("ImagePositionPatient")) or [0.0, 0.0, 0.0]
    if len(orientation) != 6:
        raise bad("ImageOrientationPatient")
    if len(position) != 3:
        raise bad("ImagePositionPatient")
    row_cosine, column_cosine = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_cosine, column_cosine)
    if np.linalg.norm(normal) < 1e-6:
        raise bad("ImageOrientationPatient")
    spacing = (xy[0], xy[1], z[0])
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * spacing[0]
    lps[:3, 1] = column_cosine * spacing[1]
    lps[:3, 2] = normal / np.linalg.norm(normal) * spacing[2]
    lps[:3, 3] = position
    return _Geometry(spacing, rescale[0], rescale[1], np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)


def _has_spacing(header, spacing: Sequence[float]) -> bool:
    zooms = header.get_zooms()[:3]
    return len(zooms) == 3 and bool(np.allclose(zooms, spacing, rtol=0, atol=1e-3))


def _fixed_volume(case_id: str, volume: _Volume, metadata_path: Path, output: Path) -> Path:
    """The volume with the metadata's geometry and HU values (written, or in place when already so)."""
    import nibabel as nib

    if volume.metadata is None:
        raise SkipCase(f"no metadata row: {case_id} is not in {metadata_path.name} (needed by --fix-geometry)")
    geometry = _geometry(volume.metadata, metadata_path)
    try:
        img = nib.load(str(volume.path))
        if _has_spacing(img.header, geometry.spacing):  # corrected already: never rescale twice
            return volume.path
        stored = np.asanyarray(img.dataobj)
    except Exception as e:
        raise SkipCase(f"unreadable volume: {volume.path}: {type(e).__name__}: {e}") from None
    if stored.ndim != 3:
        raise SkipCase(f"unusable volume: {volume.path}: {stored.ndim}D array (shape {stored.shape}); CT is 3D")
    hu = stored.astype(np.float32)
    hu *= geometry.slope
    hu += geometry.intercept
    np.rint(hu, out=hu)
    np.clip(hu, _INT16.min, _INT16.max, out=hu)
    patient, scan = case_id.rsplit("_", 2)[0], case_id.rsplit("_", 1)[0]
    target = output / FIXED_DIR / volume.split.prefix / patient / scan / f"{case_id}.nii.gz"
    save_nifti(hu.astype(np.int16), geometry.affine, target)
    return target


# --------------------------------------------------------------------------------------------- listing
def _list_split(root: Path, files: _SplitFiles, prefer_fixed: bool, need_geometry: bool, notes: list[str]
                ) -> tuple[dict[str, _Volume], dict[str, _Table | None]]:
    """Every volume of one split named by its CSVs or found on disk, with what each source has for it."""
    reports_path = root / files.reports
    originals = _volumes_on_disk(root, files.prefix)
    copies = _volumes_on_disk(root, f"{files.prefix}_fixed") if prefer_fixed else {}
    if not reports_path.is_file():
        if originals or copies:
            raise FileNotFoundError(f"{reports_path}: report CSV not found for the {files.prefix} volumes")
        notes.append(f"{reports_path} not found: no {files.prefix} records")
        return {}, {}
    tables = {
        "reports": _read_table(reports_path, REPORT_COLUMNS),
        "labels": _read_optional(root / files.labels, (), notes,
                                 f"{files.prefix} records get no structured findings (the report is still parsed)"),
        "metadata": _read_optional(root / files.metadata, GEOMETRY_COLUMNS if need_geometry else (), notes,
                                   "spacing and HU of the original volumes cannot be checked"),
    }
    if need_geometry and tables["metadata"] is None:
        raise FileNotFoundError(f"{root / files.metadata}: metadata CSV not found (needed by --fix-geometry)")
    for table in filter(None, tables.values()):
        if table.repeated:
            notes.append(f"{table.path.name}: {len(table.repeated)} volume names repeat; the first row of each is used "
                         f"({', '.join(table.repeated[:5])})")
    not_chest = _no_chest_ids(root / files.no_chest)
    ids = set(originals) | set(copies)
    for table in filter(None, tables.values()):
        ids |= set(table.rows)
    volumes: dict[str, _Volume] = {}
    for case_id in ids:
        match = _VOLUME.match(case_id)
        patient, scan = (f"{files.prefix}_{match.group(2)}", f"{files.prefix}_{match.group(2)}_{match.group(3)}") \
            if match else ("", "")
        volume = _Volume(split=files, expected=root / files.prefix / patient / scan / f"{case_id}.nii.gz")
        volume.bad_name = match is None or match.group(1) != files.prefix
        volume.path = copies.get(case_id) or originals.get(case_id)
        volume.fixed_copy = case_id in copies
        volume.report = tables["reports"].rows.get(case_id)
        volume.labels = tables["labels"].rows.get(case_id) if tables["labels"] else None
        volume.metadata = tables["metadata"].rows.get(case_id) if tables["metadata"] else None
        volume.not_chest = case_id in not_chest or (scan in not_chest if scan else False)
        volumes[case_id] = volume
    return volumes, tables


def _sort_key(case_id: str) -> tuple:
    match = _VOLUME.match(case_id)
    if match is None:
        return (1, case_id)
    return (0, match.group(1), int(match.group(2)), match.group(3), int(match.group(4)))


def _choose_reconstructions(volumes: dict[str, _Volume], mode: str) -> tuple[list[str], int]:
    """Volume ids to convert: all, or per scan the first reconstruction whose file exists (else the first)."""
    ordered = sorted(volumes, key=_sort_key)
    if mode == "all":
        return ordered, 0
    by_scan: dict[str, list[str]] = {}
    for case_id in ordered:
        key = case_id.rsplit("_", 1)[0] if _VOLUME.match(case_id) else case_id
        by_scan.setdefault(key, []).append(case_id)
    chosen = [next((c for c in group if volumes[c].path is not None), group[0]) for group in by_scan.values()]
    return sorted(chosen, key=_sort_key), len(ordered) - len(chosen)


def _original_geometry_note(volumes: list[tuple[str, _Volume]]) -> str | None:
    """A note when the original volumes referenced in place lack the metadata's spacing (sampled)."""
    import nibabel as nib

    originals = [(i, v) for i, v in volumes if v.path is not None and not v.fixed_copy]
    sampled = [(i, v) for i, v in originals if v.metadata is not None][:3]
    for case_id, volume in sampled:
        try:
            geometry = _geometry(volume.metadata, Path("metadata"))
            header = nib.load(str(volume.path)).header
        except Exception:
            continue
        if not _has_spacing(header, geometry.spacing):
            found = tuple(round(float(z), 3) for z in header.get_zooms()[:3])
            return (f"{len(originals)} original volumes are referenced in place, and sampled headers lack the "
                    f"metadata's geometry (e.g. {case_id}: header spacing {found}, "
                    f"metadata {tuple(round(s, 3) for s in geometry.spacing)}) and hold stored values, not HU: "
                    "re-run with --fix-geometry, or download the dataset's train_fixed/valid_fixed volumes")
    return None


# --------------------------------------------------------------------------------------------- prepare
def prepare(
    input: str,
    output: str,
    reconstructions: str = "first",
    validation_fraction: float = 0.1,
    fix_geometry: bool = False,
    prefer_fixed: bool = True,
    exclude_no_chest: bool = True,
    masks: str | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    force: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> PrepareSummary:
    """Convert CT-RATE into ``output/datalist.json`` (catalog ``ct_totalseg``).

    A re-run reuses the volumes a previous run finished: after changing ``fix_geometry``,
    ``prefer_fixed`` or ``masks``, pass ``force`` (or use a new output folder).

    Args:
        input: the CT-RATE repository root or its ``dataset/`` folder.
        output: the output folder (datalist, summary, corrected volumes and combined masks).
        reconstructions: ``"first"`` (default) keeps one reconstruction per scan, the lowest-numbered
            one present on disk: the reconstructions of a scan share one report, and as separate
            records they would be near-duplicate image-text pairs (false negatives for contrastive
            learning, one study counted several times in test metrics). ``"all"`` keeps every one.
        validation_fraction: fraction of CT-RATE's train patients moved to validation (by patient).
        fix_geometry: write corrected volumes (metadata spacing / position / orientation, int16 HU)
            for the originals instead of referencing them in place; needs the metadata CSVs.
        prefer_fixed: use the dataset's ``train_fixed`` / ``valid_fixed`` copy of a volume when present.
        exclude_no_chest: skip the volumes listed in ``metadata/no_chest_*.txt`` (not chest CTs).
        masks: optional folder of TotalSegmentator outputs named after the volume id
            (``train_12_a_1.nii.gz`` multilabel or ``train_12_a_1/`` per-class folder); see
            :mod:`anatomy_vlp_bundle.prepare.totalseg`.
        seed: seed of the patient hash that carves validation out of train.
        fractions: unused split fractions (CT-RATE gives every volume a split); accepted for the CLI.
        force: convert every volume again instead of reusing a previous run's.
        validate: validate the written datalist (headers).
        progress: show a progress bar.
    """
    if reconstructions not in RECONSTRUCTIONS:
        raise ValueError(f"--reconstructions must be one of {', '.join(RECONSTRUCTIONS)}, got {reconstructions!r}")
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ValueError(f"--validation_fraction must be in [0, 1), got {validation_fraction!r}")
    root = _dataset_root(input)
    mask_dir = Path(masks) if masks else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise FileNotFoundError(f"{mask_dir}: mask folder not found (--masks)")
    catalog = load_catalog(CATALOG)
    notes: list[str] = []
    cases: list[SourceCase] = []
    mapped_columns: set[str] = set()
    for files in SPLIT_FILES:
        volumes, tables = _list_split(root, files, prefer_fixed, fix_geometry, notes)
        if not volumes:
            continue
        mapping: dict[str, tuple[str | None, str]] = {}
        if tables["labels"] is not None:
            columns = [c for c in tables["labels"].columns if c != NAME_COLUMN]
            mapping, unmapped = map_label_columns(columns, catalog)
            notes += [f"{tables['labels'].path.name}: {reason}" for reason in unmapped]
            mapped_columns |= set(mapping)
        chosen, dropped = _choose_reconstructions(volumes, reconstructions)
        if dropped:
            notes.append(f"{files.prefix}: --reconstructions first kept one reconstruction per scan and left out "
                         f"{dropped} more (--reconstructions all keeps them)")
        picked = [(i, volumes[i]) for i in chosen]
        if tables["labels"] is not None:
            unlabelled = sum(1 for _, v in picked if v.labels is None and v.report is not None)
            if unlabelled:
                notes.append(f"{files.prefix}: {unlabelled} volumes have no row in {tables['labels'].path.name}: "
                             "kept with report text only")
        if not fix_geometry:
            note = _original_geometry_note(picked)
            if note:
                notes.append(f"{files.prefix}: {note}")
        if mask_dir is not None:
            with_mask = sum(1 for i, _ in picked if find_mask(mask_dir, [i]) is not None)
            notes.append(f"{files.prefix}: TotalSegmentator outputs found for {with_mask} of {len(picked)} volumes in {mask_dir}")
        for case_id, volume in picked:
            match = _VOLUME.match(case_id)
            patient = f"{files.prefix}_{match.group(2)}" if match else case_id
            cases.append(SourceCase(id=case_id, patient=patient, split=files.target, data=(volume, mapping, tables)))
    if not cases:
        raise FileNotFoundError(f"{root}: no CT-RATE split found (expected radiology_text_reports/train_reports.csv "
                                "or validation_reports.csv)")
    missing_columns = [c for c in LABEL_COLUMNS if c not in mapped_columns]
    if mapped_columns and missing_columns:
        notes.append(f"CT-RATE label columns absent from the label CSVs: {', '.join(missing_columns)}")

    def convert(case: SourceCase, out: Path) -> dict[str, Any]:
        volume, mapping, tables = case.data
        files = volume.split
        if volume.bad_name:
            raise SkipCase(f"unrecognised volume name: {case.id!r} is not {files.prefix}_<N>_<scan>_<reconstruction>")
        if exclude_no_chest and volume.not_chest:
            raise SkipCase(f"not a chest CT: listed in {Path(files.no_chest).name}")
        if volume.path is None:
            raise SkipCase(f"volume file not found: {volume.expected}")
        if volume.report is None:
            raise SkipCase(f"no report row: {case.id} is not in {Path(files.reports).name}")
        report = _report_text(volume.report)
        if not report:
            raise SkipCase(f"empty report: Findings_EN and Impressions_EN of {case.id} are empty")
        findings, study = ({}, {}) if volume.labels is None else \
            _structured_labels(volume.labels, mapping, tables["labels"].path)
        image = volume.path
        if fix_geometry and not volume.fixed_copy:
            image = _fixed_volume(case.id, volume, tables["metadata"].path, out)
        record: dict[str, Any] = {"image": relative_path(image, out)}
        if mask_dir is not None:
            found: MaskSource | None = find_mask(mask_dir, [case.id])
            if found is not None:
                record["anatomy_mask"] = attach_mask(found, case.id, out, catalog)
        record["report"] = report
        if findings:
            record["findings"] = findings
        if study:
            record["study_findings"] = study
        return record

    return run_prepare(
        source="ctrate",
        name="ct-rate",
        modality="CT",
        catalog=CATALOG,
        output=output,
        cases=cases,
        convert=convert,
        fractions=fractions,
        seed=seed,
        validation_from_training=float(validation_fraction),
        validate=validate,
        progress=progress,
        force=force,
        notes=notes,
        options={"fix_geometry": bool(fix_geometry), "prefer_fixed": bool(prefer_fixed), "masks": masks},
    )
