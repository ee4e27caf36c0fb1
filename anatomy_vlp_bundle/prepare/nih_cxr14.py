"""NIH ChestX-ray14 -> contract datalist (``python -m anatomy_vlp_bundle prepare nih-cxr14``).

Expected layout (the NIH Clinical Center release, as on Box / Kaggle)::

    INPUT/
        Data_Entry_2017_v2020.csv        (or Data_Entry_2017.csv)
        train_val_list.txt               (official split: one image file name a line)
        test_list.txt
        images/00000001_000.png          or  images_001/images/00000001_000.png, images_002/images/...
        BBox_List_2017.csv               (optional)

``Data_Entry_2017*.csv`` columns: ``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
Patient Gender, View Position, OriginalImage[Width, Height], OriginalImagePixelSpacing[x, y]``;
``Finding Labels`` is ``|``-separated (``Cardiomegaly|Effusion``) or ``No Finding``.

Records: one per image (frontal ``View Position`` PA/AP only by default; ChestX-ray14 is all frontal),
id the file name without ``.png``, patient ``Patient ID``. All 14 labels are known for every image:
listed -> 1, not listed -> 0; ``no finding`` is 1 exactly when the image has no label. Cardiomegaly goes
onto ``cardiac silhouette``; the other labels have no anatomy or side and are study findings of the
dataset catalog ``OUTPUT/catalog.json`` (see :mod:`.cxr_labels`). There is no report text.

Splits: ``test_list.txt`` -> test; ``train_val_list.txt`` -> training, with ``validation_fraction`` of its
patients moved to validation. Without the lists, splits are derived by patient hash.

``BBox_List_2017.csv`` holds pathology boxes (~1,000 images, "Atelectasis at x, y, w, h") -- findings,
not anatomy: the contract's ``anatomy_boxes`` are anatomy regions, so they are not used (counted in the
summary).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..data.labels import ABSENT, PRESENT
from .common import DEFAULT_FRACTIONS, PrepareSummary, SkipCase, SourceCase, relative_path, run_prepare
from .cxr_labels import LABEL_FINDINGS, Labels, image_label_catalog, normalize_label, read_csv, write_image_label_catalog

__all__ = ["prepare", "NIH_LABELS", "DATA_ENTRY_FILES"]

#: The 14 finding labels of ChestX-ray14 (as written in ``Finding Labels``).
NIH_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
#: Label tables, newest first.
DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_LISTS = {"train_val_list.txt": "training", "test_list.txt": "test"}
FRONTAL_VIEWS = ("PA", "AP")
BBOX_FILE = "BBox_List_2017.csv"


def _image_index(input: Path, images: Path | None) -> dict[str, Path]:
    """File name -> path of every PNG under ``images/``, ``images_NNN/images/`` and ``images_NNN/`` (or ``images``)."""
    if images is not None:
        folders = [images] + sorted(p for p in images.glob("*") if p.is_dir())
    else:
        folders = [input / "images"]
        for sub in sorted(input.glob("images_*")):
            folders += [sub / "images", sub]
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.lower().endswith(".png") and entry.name not in index:
                    index[entry.name] = Path(entry.path)
    return index


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare(
    input: str,
    output: str,
    images: str | None = None,
    frontal_only: bool = True,
    validation_fraction: float = 0.1,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    force: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> PrepareSummary:
    """Convert NIH ChestX-ray14 into ``output/datalist.json`` (+ ``catalog.json``); see the module docstring.

    Args:
        input: the release folder (holding ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv``).
        output: where ``datalist.json``, ``catalog.json`` and the summary go; images stay in place.
        images: folder of the PNGs (searched with its immediate subfolders) when they are not under
            ``input/images`` or ``input/images_NNN/images``.
        frontal_only: keep only ``View Position`` PA or AP.
        validation_fraction: fraction of the ``train_val_list.txt`` patients moved to validation (by patient hash).
        seed: seed of the patient hash.
        fractions: training / validation / test fractions of patients when there are no official split lists.
        force: convert everything again instead of reusing a previous run's cases.
        validate: validate the written datalist (headers).
        progress: show a progress bar.
    """
    input_path = Path(input)
    if not input_path.is_dir():
        raise FileNotFoundError(f"{input_path}: input folder not found")
    table = next((input_path / n for n in DATA_ENTRY_FILES if (input_path / n).is_file()), None)
    if table is None:
        raise FileNotFoundError(f"{input_path}: no {' or '.join(DATA_ENTRY_FILES)}")
    images_path = Path(images) if images else None
    if images_path is not None and not images_path.is_dir():
        raise FileNotFoundError(f"{images_path}: images folder not found")
    catalog = image_label_catalog()
    catalog_ref = write_image_label_catalog(output)

    official: dict[str, str] = {}
    for name, split in SPLIT_LISTS.items():
        if (input_path / name).is_file():
            official.update((f, split) for f in _read_list(input_path / name))
    index = _image_index(input_path, images_path)

    required = ["Image Index", "Finding Labels", "Patient ID"] + (["View Position"] if frontal_only else [])
    _, rows = read_csv(table, required)
    cases: list[SourceCase] = []
    views: Counter = Counter()
    unlisted = 0
    for line, row in enumerate(rows, start=2):
        view = row.get("View Position", "")
        views[view or "(blank)"] += 1
        if frontal_only and view not in FRONTAL_VIEWS:
            continue
        name = row["Image Index"]
        split = official.get(name)
        if official and split is None:
            unlisted += 1
        cases.append(SourceCase(
            id=name[: -len(".png")] if name.lower().endswith(".png") else (name or f"{table.name}:{line}"),
            patient=row["Patient ID"] or None,
            split=split,
            data={"line": line, "row": row},
        ))

    known = {normalize_label(n) for n in NIH_LABELS}

    def convert(case: SourceCase, out: Path) -> dict:
        row, where = case.data["row"], f"{table} line {case.data['line']}"
        if not row["Image Index"]:
            raise SkipCase(f"malformed row: {where} has an empty Image Index")
        if case.patient is None:
            raise SkipCase(f"malformed row: {where} has an empty Patient ID")
        listed = [normalize_label(x) for x in row["Finding Labels"].split("|") if x.strip()]
        if not listed:
            raise SkipCase(f"malformed row: {where} has empty Finding Labels")
        unknown = [x for x in listed if x not in known and x != normalize_label(NO_FINDING)]
        if unknown:
            raise SkipCase(f"malformed row: {where}: unknown finding label(s) {unknown} in {row['Finding Labels']!r}")
        image = index.get(row["Image Index"])
        if image is None:
            raise SkipCase(f"image not found: {row['Image Index']} (searched images/, images_NNN/images/)")
        labels = Labels(catalog)
        for label in NIH_LABELS:
            key = normalize_label(label)
            labels.add_image_label(LABEL_FINDINGS[key], PRESENT if key in listed else ABSENT)
        labels.add_image_label("no finding", ABSENT if set(listed) & known else PRESENT)
        return {"image": relative_path(image, out), **labels.to_record()}

    notes = [
        f"labels: Cardiomegaly on 'cardiac silhouette'; the other {len(NIH_LABELS) - 1} labels and 'no finding' have no "
        f"anatomy or side and are study findings of {catalog_ref} ({catalog.name}); all 14 labels known per image "
        "(listed = 1, others = 0)",
        "NIH ChestX-ray14 has no report text: records carry structured labels only (the validator warns 'no report').",
    ]
    if official:
        notes.append(f"splits: official lists ({', '.join(n for n in SPLIT_LISTS if (input_path / n).is_file())}); "
                     f"{validation_fraction:.0%} of train_val_list patients -> validation")
        if unlisted:
            notes.append(f"{unlisted} images are in no official split list: split by patient hash")
    else:
        notes.append(f"no {' / '.join(SPLIT_LISTS)} in {input_path}: splits derived by patient hash")
    if frontal_only:
        left_out = sum(n for v, n in views.items() if v not in FRONTAL_VIEWS)
        if left_out:
            notes.append(f"frontal_only: {left_out} images with another View Position left out")
    if (input_path / BBOX_FILE).is_file():
        _, boxes = read_csv(input_path / BBOX_FILE, ["Image Index"])
        box_images = Counter(b["Image Index"] for b in boxes)
        notes.append(f"{BBOX_FILE}: {sum(box_images.values())} pathology boxes on {len(box_images)} images not used "
                     "(they mark findings; the contract's boxes are anatomy regions)")
    return run_prepare(
        source="nih-cxr14", name="nih-cxr14", modality="CXR", catalog=catalog_ref, output=output, cases=cases,
        convert=convert, fractions=fractions, seed=seed, validation_from_training=validation_fraction,
        validate=validate, progress=progress, force=force, notes=notes,
    )
