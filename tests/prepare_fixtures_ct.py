"""Tiny CT fixtures in the published layouts of CT-RATE and TotalSegmentator (built in tmp_path).

CT-RATE (HuggingFace ``ibrahimhamamci/CT-RATE``): ``dataset/{train,valid}/<split>_<N>/<split>_<N>_<scan>/
<split>_<N>_<scan>_<recon>.nii.gz``, the ``*_fixed`` copies, and the CSVs with the dataset's column
names (reports, 18 predicted labels, metadata, ``no_chest_*.txt``). The original volumes are written the
way the dataset first published them: stored values (HU + 1024) and a header without real geometry
(unit spacing, identity affine); the metadata CSV carries the true spacing, position and rescale.

TotalSegmentator: a multilabel file per case (``--ml``; optionally with its label-table header
extension) or a folder of per-class binary files named after the v2 ``total`` classes.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np

SHAPE = (16, 16, 8)
LABEL_COLUMNS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
REPORT_HEADER = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
METADATA_HEADER = [
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ConvolutionKernel", "Rows", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope",
    "ImagePositionPatient", "ImageOrientationPatient",
]

# Volumes of the CT-RATE fixture: train patients 1-10, valid patients 1-3 (distinct people).
TRAIN_VOLUMES = ["train_1_a_1", "train_1_a_2", "train_2_a_1", "train_2_b_1"] + [f"train_{n}_a_1" for n in range(3, 11)]
VALID_VOLUMES = ["valid_1_a_1", "valid_2_a_1", "valid_2_a_2", "valid_3_a_1"]
NO_FILE = "train_4_a_1"  # in every CSV, no volume file
NO_REPORT = "train_5_a_1"  # volume and labels, no report row
BAD_LABELS = "train_6_a_1"  # label row with an unreadable value
NO_LABELS = "train_7_a_1"  # no label row: kept with the report only
NOT_CHEST = "train_8_a_1"  # listed in no_chest_train.txt
ALREADY_FIXED = "train_9_a_1"  # original already corrected in place (header spacing = metadata)
BAD_METADATA = "train_10_a_1"  # XYSpacing unreadable: only --fix-geometry needs it
FIXED_COPY = "valid_3_a_1"  # only in valid_fixed/
#: Labels of train_3_a_1 (the others are 0 everywhere).
TRAIN_3_LABELS = {"Emphysema": 1, "Cardiomegaly": 1, "Lymphadenopathy": 1, "Hiatal hernia": 1,
                  "Arterial wall calcification": 1, "Medical material": 0, "Atelectasis": 0}
SLOPE, INTERCEPT = 1.0, -1024.0


def spacing_of(volume: str) -> tuple[float, float, float]:
    """Metadata spacing of a fixture volume (differs per patient so that mix-ups show)."""
    n = int(volume.split("_")[1])
    return (0.5 + 0.05 * n, 0.5 + 0.05 * n, 1.0 + 0.5 * (n % 3))


def position_of(volume: str) -> tuple[float, float, float]:
    n = int(volume.split("_")[1])
    return (-150.0 - n, -160.0, -300.0 + 10 * n)


def stored_values(volume: str) -> np.ndarray:
    """The raw stored values of a fixture volume: HU + 1024, a ramp so that no volume is constant."""
    i, j, k = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    n = int(volume.split("_")[1])
    hu = -1000 + 20 * i + 7 * j + 50 * k + n
    return (hu + 1024).astype(np.float32)


def ras_affine(spacing, position=(0.0, 0.0, 0.0)) -> np.ndarray:
    """NIfTI affine of an axial DICOM series (LPS position, identity orientation) turned into RAS."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (-position[0], -position[1], position[2])
    return affine


def _write_csv(path: Path, header: list[str], rows: Iterable[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _volume_path(dataset: Path, volume: str, fixed: bool = False) -> Path:
    split, n, scan, _ = volume.split("_")
    folder = f"{split}_fixed" if fixed else split
    return dataset / folder / f"{split}_{n}" / f"{split}_{n}_{scan}" / f"{volume}.nii.gz"


def _report(volume: str) -> list[str]:
    findings = f"Findings of {volume}. Emphysematous changes are seen in both lungs. The heart is enlarged."
    impression = "Not given." if volume == "train_2_b_1" else f"Impression of {volume}: emphysema, cardiomegaly."
    return [f"{volume}.nii.gz", "Dyspnea.", "Non-contrast chest CT.", findings, impression]


def _labels(volume: str, columns: list[str]) -> list:
    values = {c: 0 for c in columns}
    if volume.startswith("train_3_"):
        values.update({c: v for c, v in TRAIN_3_LABELS.items() if c in values})
    if volume == BAD_LABELS:
        values["Emphysema"] = "maybe"
    return [f"{volume}.nii.gz"] + [values[c] for c in columns]


def _metadata(volume: str) -> list:
    sx, sy, sz = spacing_of(volume)
    xy = "" if volume == BAD_METADATA else f"[{sx}, {sy}]"
    return [f"{volume}.nii.gz", "SIEMENS", "Thorax 1.0", "SOMATOM", "M", "061Y", "Br40d", SHAPE[0], xy, sz,
            INTERCEPT, SLOPE, str(list(position_of(volume))), "[1, 0, 0, 0, 1, 0]"]


def build_ctrate(root: Path, extra_label_columns: tuple[str, ...] = ()) -> Path:
    """The CT-RATE fixture under ``root`` (the repository root; volumes and CSVs in ``root/dataset``)."""
    dataset = root / "dataset"
    for volume in TRAIN_VOLUMES + VALID_VOLUMES:
        if volume == NO_FILE:
            continue
        if volume == FIXED_COPY:  # a corrected copy: int16 HU, true geometry
            hu = (stored_values(volume) * SLOPE + INTERCEPT).astype(np.int16)
            img = nib.Nifti1Image(hu, ras_affine(spacing_of(volume), position_of(volume)))
            path = _volume_path(dataset, volume, fixed=True)
        elif volume == ALREADY_FIXED:
            hu = (stored_values(volume) * SLOPE + INTERCEPT).astype(np.int16)
            img = nib.Nifti1Image(hu, ras_affine(spacing_of(volume), position_of(volume)))
            path = _volume_path(dataset, volume)
        else:  # as first published: stored values, no geometry
            img = nib.Nifti1Image(stored_values(volume), np.eye(4))
            path = _volume_path(dataset, volume)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))

    columns = LABEL_COLUMNS + list(extra_label_columns)
    for prefix, volumes, names in (
        ("train", TRAIN_VOLUMES, ("train_reports.csv", "train_predicted_labels.csv", "train_metadata.csv",
                                  "no_chest_train.txt")),
        ("valid", VALID_VOLUMES, ("validation_reports.csv", "valid_predicted_labels.csv",
                                  "validation_metadata.csv", "no_chest_valid.txt")),
    ):
        reports_csv, labels_csv, metadata_csv, no_chest = names
        _write_csv(dataset / "radiology_text_reports" / reports_csv, REPORT_HEADER,
                   [_report(v) for v in volumes if v != NO_REPORT])
        _write_csv(dataset / "multi_abnormality_labels" / labels_csv, ["VolumeName"] + columns,
                   [_labels(v, columns) for v in volumes if v != NO_LABELS])
        _write_csv(dataset / "metadata" / metadata_csv, METADATA_HEADER, [_metadata(v) for v in volumes])
        listed = [f"{NOT_CHEST}.nii.gz"] if prefix == "train" else []
        (dataset / "metadata" / no_chest).write_text("".join(f"{v}\n" for v in listed), encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------- TotalSegmentator
#: Some TotalSegmentator v2 'total' classes and their ids (map_to_binary.py, class_map["total"]).
TOTAL_V2 = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6, "pancreas": 7,
    "adrenal_gland_right": 8, "adrenal_gland_left": 9, "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11,
    "lung_upper_lobe_right": 12, "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14, "esophagus": 15,
    "trachea": 16, "thyroid_gland": 17, "small_bowel": 18, "duodenum": 19, "colon": 20, "urinary_bladder": 21,
    "prostate": 22, "kidney_cyst_left": 23, "kidney_cyst_right": 24, "sacrum": 25, "vertebrae_L1": 31,
    "vertebrae_T12": 32, "heart": 51, "aorta": 52, "atrial_appendage_left": 61, "sternum": 116,
}


def label_table_extension(table: dict[int, str]) -> nib.nifti1.Nifti1Extension:
    """TotalSegmentator's label-table header extension (code 0, CaretExtension XML)."""
    body = "".join(f'<Label Key="{k}" Red="1" Green="0" Blue="0" Alpha="1"><![CDATA[{v}]]></Label>\n'
                   for k, v in table.items())
    xml = ('<?xml version="1.0" encoding="UTF-8"?> <CaretExtension> <VolumeInformation Index="0"> <LabelTable>'
           f"{body}</LabelTable> <VolumeType><![CDATA[Label]]></VolumeType> </VolumeInformation></CaretExtension>")
    return nib.nifti1.Nifti1Extension(0, xml.encode("utf-8"))


def write_multilabel(path: Path, labels: np.ndarray, affine: np.ndarray, table: dict[int, str] | None = None) -> Path:
    """A ``--ml`` output: one uint8 label map, with the label table when ``table`` is given."""
    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    if table is not None:
        img.header.extensions.append(label_table_extension(table))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_per_class(folder: Path, masks: dict[str, np.ndarray], affine: np.ndarray, shape=SHAPE,
                    classes: Iterable[str] = TOTAL_V2) -> Path:
    """A per-class output folder: one binary uint8 file for every class in ``classes`` (empty unless in ``masks``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in classes:
        data = masks.get(name, np.zeros(shape, dtype=bool)).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, affine), str(folder / f"{name}.nii.gz"))
    return folder


def organ_labels(shape=SHAPE) -> np.ndarray:
    """A small v2 'total' label map: left upper lobe, heart, liver, aorta blocks (0 elsewhere)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:6, 2:6, 1:4] = TOTAL_V2["lung_upper_lobe_left"]
    labels[8:12, 8:12, 2:5] = TOTAL_V2["heart"]
    labels[10:14, 2:6, 5:7] = TOTAL_V2["liver"]
    labels[6:8, 6:8, 0:8] = TOTAL_V2["aorta"]
    return labels


def write_truncated(path: Path, labels: np.ndarray, affine: np.ndarray) -> Path:
    """A multilabel file cut short (an interrupted copy)."""
    write_multilabel(path, labels, affine)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def build_ct_datalist(root: Path, n: int = 9, mask_on: tuple[int, ...] = (7,)) -> Path:
    """A contract CT datalist (``root/datalist.json``, catalog ct_totalseg) of ``n`` tiny volumes.

    Record ``c<i>`` has image ``images/scan_c<i>.nii.gz`` (1 mm, identity orientation), patient
    ``p<i // 2>``; ``c0``-``c4`` are training, the rest test. Records in ``mask_on`` already have an
    ``anatomy_mask`` (``masks/c<i>.nii.gz``).
    """
    import json

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    records = {"training": [], "test": []}
    for i in range(n):
        image = root / "images" / f"scan_c{i}.nii.gz"
        image.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image((stored_values(f"x_{i}") + INTERCEPT).astype(np.int16), affine), str(image))
        record = {"id": f"c{i}", "patient": f"p{i // 2}", "image": f"images/scan_c{i}.nii.gz",
                  "report": "FINDINGS: The liver is normal."}
        if i in mask_on:
            write_multilabel(root / "masks" / f"c{i}.nii.gz", organ_labels(), affine)
            record["anatomy_mask"] = f"masks/c{i}.nii.gz"
        records["training" if i < 5 else "test"].append(record)
    path = root / "datalist.json"
    path.write_text(json.dumps({"name": "tiny-ct", "modality": "CT", "catalog": "ct_totalseg", **records}, indent=1))
    return path
