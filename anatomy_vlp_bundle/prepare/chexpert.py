"""CheXpert -> contract datalist (``python -m anatomy_vlp_bundle prepare chexpert``).

Expected layout (the Stanford release, small or full size)::

    INPUT/                              (or INPUT/CheXpert-v1.0-small/, INPUT/CheXpert-v1.0/)
        CheXpert-v1.0-small/train.csv
        CheXpert-v1.0-small/valid.csv
        CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
        ...

``train.csv`` / ``valid.csv`` columns: ``Path, Sex, Age, Frontal/Lateral, AP/PA`` and the 14 labels
``No Finding, Enlarged Cardiomediastinum, Cardiomegaly, Lung Opacity, Lung Lesion, Edema, Consolidation,
Pneumonia, Atelectasis, Pneumothorax, Pleural Effusion, Pleural Other, Fracture, Support Devices``.
``Path`` starts with the release folder (``CheXpert-v1.0-small/train/...``).

Records: one per image (frontal only by default), id ``patient00001_study1_view1_frontal``, patient
``patient00001``. Labels are per study (every image of a study carries them): ``1.0`` -> 1, ``0.0`` -> 0,
``-1.0`` (uncertain) -> -1 (kept), blank -> left out (unknown). Cardiomegaly goes onto ``cardiac
silhouette``; the other labels have no anatomy or side and are study findings of the dataset catalog
written to ``OUTPUT/catalog.json`` (see :mod:`.cxr_labels`). CheXpert has no report text.

Splits: the official ``valid.csv`` (200 studies, radiologist labels) is the ``test`` split; validation is
carved out of ``train.csv`` by patient (``validation_fraction``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..data.labels import ABSENT, PRESENT, UNCERTAIN
from .common import DEFAULT_FRACTIONS, PrepareSummary, SkipCase, SourceCase, relative_path, run_prepare
from .cxr_labels import LABEL_FINDINGS, Labels, image_label_catalog, normalize_label, read_csv, write_image_label_catalog

__all__ = ["prepare", "LABEL_COLUMNS", "RELEASE_FOLDERS"]

#: The 14 label columns of ``train.csv`` / ``valid.csv``.
LABEL_COLUMNS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
#: Release folders searched under the input folder.
RELEASE_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
#: CSV file -> split.
SPLIT_FILES = {"train.csv": "training", "valid.csv": "test"}
_VALUES = {"1.0": PRESENT, "1": PRESENT, "0.0": ABSENT, "0": ABSENT, "-1.0": UNCERTAIN, "-1": UNCERTAIN}
_PATIENT_RE = re.compile(r"(?:^|/)(patient\d+)/")


def _release_root(input: Path) -> Path:
    for folder in (input, *(input / r for r in RELEASE_FOLDERS)):
        if any((folder / name).is_file() for name in SPLIT_FILES):
            return folder
    looked = ", ".join(str(p) for p in (input, *(input / r for r in RELEASE_FOLDERS)))
    raise FileNotFoundError(f"{input}: no CheXpert train.csv or valid.csv (looked in {looked})")


def _image_path(root: Path, path: str) -> Path:
    """The file a ``Path`` cell names: relative to the release folder's parent (as published) or to the release folder."""
    rel = Path(path)
    if rel.parts and rel.parts[0] == root.name:
        return root.joinpath(*rel.parts[1:])
    return root / rel


def _case_id(path: str) -> str:
    """``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` -> ``patient00001_study1_view1_frontal``."""
    parts = Path(path).with_suffix("").parts
    start = next((i for i, p in enumerate(parts) if p.startswith("patient")), max(len(parts) - 3, 0))
    return "_".join(parts[start:])


def prepare(
    input: str,
    output: str,
    frontal_only: bool = True,
    validation_fraction: float = 0.1,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    force: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> PrepareSummary:
    """Convert CheXpert into ``output/datalist.json`` (+ ``catalog.json``); see the module docstring.

    Args:
        input: the folder holding ``CheXpert-v1.0-small/`` (or that folder itself; ``CheXpert-v1.0/`` too).
        output: where ``datalist.json``, ``catalog.json`` and the summary go; images stay in place.
        frontal_only: keep only images whose ``Frontal/Lateral`` is ``Frontal``.
        validation_fraction: fraction of ``train.csv`` patients moved to the validation split (by patient hash).
        seed: seed of the patient hash.
        fractions: unused by CheXpert's official splits; accepted for a uniform command line.
        force: convert everything again instead of reusing a previous run's cases.
        validate: validate the written datalist (headers).
        progress: show a progress bar.
    """
    input_path = Path(input)
    if not input_path.is_dir():
        raise FileNotFoundError(f"{input_path}: input folder not found")
    root = _release_root(input_path)
    catalog = image_label_catalog()
    catalog_ref = write_image_label_catalog(output)
    required = ["Path", *LABEL_COLUMNS] + (["Frontal/Lateral"] if frontal_only else [])

    cases: list[SourceCase] = []
    views: Counter = Counter()
    for name, split in SPLIT_FILES.items():
        csv_path = root / name
        if not csv_path.is_file():
            continue
        _, rows = read_csv(csv_path, required)
        for line, row in enumerate(rows, start=2):
            view = row.get("Frontal/Lateral", "")
            views[view or "(blank)"] += 1
            if frontal_only and view != "Frontal":
                continue
            path = row["Path"]
            match = _PATIENT_RE.search(path)
            cases.append(SourceCase(
                id=_case_id(path) if path else f"{name}:{line}",
                patient=match.group(1) if match else None,
                split=split,
                data={"root": root, "csv": csv_path, "line": line, "row": row},
            ))

    def convert(case: SourceCase, out: Path) -> dict:
        row, where = case.data["row"], f"{case.data['csv']} line {case.data['line']}"
        if not row["Path"]:
            raise SkipCase(f"malformed row: {where} has an empty Path")
        if case.patient is None:
            raise SkipCase(f"malformed row: {where}: no patientNNNNN folder in Path {row['Path']!r}")
        labels = Labels(catalog)
        for column in LABEL_COLUMNS:
            text = row[column]
            if not text:
                continue  # blank: not mentioned, unknown
            if text not in _VALUES:
                raise SkipCase(f"malformed row: {where}: column {column!r} holds {text!r} (expected 1.0, 0.0, -1.0 or blank)")
            labels.add_image_label(LABEL_FINDINGS[normalize_label(column)], _VALUES[text])
        image = _image_path(case.data["root"], row["Path"])
        if not image.is_file():
            raise SkipCase(f"image not found: {image}")
        return {"image": relative_path(image, out), **labels.to_record()}

    notes = [
        f"labels: Cardiomegaly on 'cardiac silhouette'; the other {len(LABEL_COLUMNS) - 1} labels have no anatomy or side "
        f"and are study findings of {catalog_ref} ({catalog.name}: cxr_imagenome29 plus those study findings)",
        f"splits: train.csv -> training, {validation_fraction:.0%} of its patients -> validation; valid.csv -> test",
        "CheXpert has no report text: records carry structured labels only (the validator warns 'no report').",
    ]
    if frontal_only:
        left_out = sum(n for v, n in views.items() if v != "Frontal")
        notes.append(f"frontal_only: {left_out} non-frontal images left out (Frontal/Lateral: "
                     + ", ".join(f"{v} {n}" for v, n in sorted(views.items())) + ")")
    return run_prepare(
        source="chexpert", name="chexpert", modality="CXR", catalog=catalog_ref, output=output, cases=cases,
        convert=convert, fractions=fractions, seed=seed, validation_from_training=validation_fraction,
        validate=validate, progress=progress, force=force, notes=notes,
    )
