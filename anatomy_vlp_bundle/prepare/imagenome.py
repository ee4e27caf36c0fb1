"""Chest ImaGenome (silver) on MIMIC-CXR-JPG -> contract datalist (``python -m anatomy_vlp_bundle prepare imagenome``).

Expected layout (two PhysioNet projects, usually in different places)::

    INPUT/ (chest-imagenome-dataset-1.0.0)
        silver_dataset/scene_graph/<dicom_id>_SceneGraph.json      (unzipped scene_graph.zip)
        silver_dataset/splits/train.csv, valid.csv, test.csv     (, subject_id, study_id, dicom_id, path, ViewPosition)
        silver_dataset/splits/images_to_avoid.csv                (the gold-standard images)
    MIMIC_ROOT/ (mimic-cxr-jpg-2.0.0)
        files/p10/p10000032/s50414267/<dicom_id>.jpg
        mimic-cxr-2.0.0-metadata.csv(.gz)                        (dicom_id, ..., Rows, Columns, ...)
    REPORTS/ (mimic-cxr-reports, optional)
        files/p10/p10000032/s50414267.txt

A scene graph holds ``objects`` (one per region: ``bbox_name``; ``x1..y2`` on the 224x224 resized,
padded image; ``original_x1, original_y1, original_x2, original_y2`` in pixels of the original image)
and ``attributes`` (one per described region: ``bbox_name``, ``phrases`` -- the report sentences about
the region -- and ``attributes``, per phrase a list of ``"category|yes|name"`` / ``"category|no|name"``).

Records (one per image; ids are ``dicom_id``, patients ``subject_id``):

- ``anatomy_boxes``: the 29 ``cxr_imagenome29`` regions (the other ImaGenome regions, e.g. ``left
  cardiac silhouette``, are not in the catalog), ``[x_min, y_min, x_max, y_max]`` in pixels of the stored
  JPG, max exclusive, clipped to the image; boxes empty after clipping are dropped. The ``original_*``
  coordinates are pixels of the original DICOM image (Chest ImaGenome derives the 224 coordinates from
  them by a resize + pad). MIMIC-CXR-JPG keeps the DICOM's size, so they are used as they are -- unless
  the JPG is smaller or larger than the DICOM's ``Columns`` x ``Rows`` in ``mimic-cxr-2.0.0-metadata.csv``
  (a downscaled copy), in which case they are rescaled by JPG size / DICOM size per axis. Without the
  metadata, an image whose boxes reach more than 25% beyond it is skipped (downscaled JPG?).
- ``anatomy_sentences``: the region's phrases.
- ``findings``: the region's ``yes`` / ``no`` attributes mapped to its catalog findings
  (:data:`ATTRIBUTE_FINDINGS`, else the catalog's finding names and synonyms). Where the attribute is
  narrower than the finding (``linear/patchy atelectasis`` -> atelectasis) only ``yes`` carries over;
  where it is broader (``lung lesion`` -> nodule) only ``no``. A ``yes`` of any ``tubesandlines`` or
  ``device`` attribute sets the study finding ``support devices``. Modifier categories (``nlp``,
  ``temporal``, ``severity``, ``laterality``, ``texture``) are not findings; unmapped names are counted
  in the summary.
- ``report``: the MIMIC-CXR report text when ``reports`` is given, else the scene graph's phrases joined.

Splits: the ImaGenome split files (patient-disjoint); the gold-standard images (``images_to_avoid.csv``)
are left out by default. Catalog: the built-in ``cxr_imagenome29``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ..data.catalog import Catalog, load_catalog
from ..data.labels import ABSENT, PRESENT
from .common import DEFAULT_FRACTIONS, PrepareSummary, SkipCase, SourceCase, relative_path, run_prepare
from .cxr_labels import BASE_CATALOG, Labels, count_note, read_csv

__all__ = ["prepare", "scene_graph_record", "ATTRIBUTE_FINDINGS", "SPLIT_FILES"]

SPLITS_FOLDER = "silver_dataset/splits"
SPLIT_FILES = {"train.csv": "training", "valid.csv": "validation", "test.csv": "test"}
GOLD_FILE = "images_to_avoid.csv"
SCENE_GRAPH_FOLDERS = ("silver_dataset/scene_graph", "silver_dataset/scene_graph/scene_graph")
METADATA_FILES = ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")
#: Without metadata, boxes reaching further than this fraction beyond the JPG mean a downscaled copy.
MAX_BOX_OVERSHOOT = 0.25

SAME, NARROWER, BROADER = "same", "narrower", "broader"
#: ImaGenome attribute name -> (catalog findings, the first one the region owns is used; how yes/no carry over).
ATTRIBUTE_FINDINGS: dict[str, tuple[tuple[str, ...], str]] = {
    "lung opacity": (("lung opacity",), SAME),
    "airspace opacity": (("lung opacity",), NARROWER),
    "infiltration": (("lung opacity",), NARROWER),
    "consolidation": (("consolidation",), SAME),
    "atelectasis": (("atelectasis",), SAME),
    "linear/patchy atelectasis": (("atelectasis",), NARROWER),
    "lobar/segmental collapse": (("atelectasis",), NARROWER),
    "pulmonary edema/hazy opacity": (("edema",), SAME),
    "vascular congestion": (("vascular congestion",), SAME),
    "pleural effusion": (("pleural effusion",), SAME),
    "costophrenic angle blunting": (("blunted costophrenic angle",), SAME),
    "enlarged cardiac silhouette": (("cardiomegaly",), SAME),
    "mediastinal widening": (("widened mediastinum",), SAME),
    "superior mediastinal mass/enlargement": (("mass",), BROADER),
    "enlarged hilum": (("enlarged hilum",), SAME),
    "tortuous aorta": (("tortuous aorta",), SAME),
    "vascular calcification": (("calcification",), SAME),
    "pneumomediastinum": (("pneumomediastinum",), SAME),
    "pneumothorax": (("pneumothorax",), SAME),
    "hydropneumothorax": (("pneumothorax",), NARROWER),
    "lung lesion": (("nodule",), BROADER),
    "mass/nodule (not otherwise specified)": (("nodule", "mass"), SAME),
    "multiple masses/nodules": (("nodule", "mass"), NARROWER),
    "calcified nodule": (("nodule",), NARROWER),
    "clavicle fracture": (("fracture",), SAME),
    "spinal fracture": (("fracture",), SAME),
    "elevated hemidiaphragm": (("elevated hemidiaphragm",), SAME),
    "sub-diaphragmatic air": (("pneumoperitoneum",), SAME),
    "scoliosis": (("scoliosis",), SAME),
    "spinal degenerative changes": (("degenerative changes",), SAME),
    "pneumonia": (("pneumonia",), SAME),
    "pericardial effusion": (("pericardial effusion",), SAME),
    "endotracheal tube": (("endotracheal tube",), SAME),
    "enteric tube": (("enteric tube",), SAME),
    "picc": (("central venous line",), NARROWER),
    "ij line": (("central venous line",), NARROWER),
    "subclavian line": (("central venous line",), NARROWER),
    "swan-ganz catheter": (("central venous line",), NARROWER),
    "cardiac pacer and wires": (("pacemaker lead",), NARROWER),
}
DEVICE_CATEGORIES = ("tubesandlines", "device")
#: Categories that qualify a finding instead of being one.
MODIFIER_CATEGORIES = ("nlp", "temporal", "severity", "laterality", "texture", "comparison")
_POLARITY = {"yes": PRESENT, "no": ABSENT}


def _finding_index(catalog: Catalog) -> dict[str, tuple[tuple[str, ...], str]]:
    """Attribute name -> (findings, mode): :data:`ATTRIBUTE_FINDINGS`, then the catalog's finding names and synonyms."""
    index: dict[str, tuple[tuple[str, ...], str]] = {}
    for finding in dict.fromkeys(f for a in catalog.anatomies for f in a.findings):
        for phrase in catalog.phrasings(finding):
            index.setdefault(phrase.lower(), ((finding,), SAME))
    index.update(ATTRIBUTE_FINDINGS)
    return index


def _sentences(phrases: Any) -> list[str]:
    out: list[str] = []
    for p in phrases if isinstance(phrases, list) else []:
        text = " ".join(str(p).split())
        if text and text not in out:
            out.append(text)
    return out


def scene_graph_record(graph: dict, catalog: Catalog, width: int, height: int, scale: tuple[float, float],
                       stats: Counter | None = None) -> dict:
    """The record fields a scene graph gives (boxes, sentences, labels, phrase report).

    Args:
        graph: the parsed ``<dicom_id>_SceneGraph.json``.
        catalog: ``cxr_imagenome29``.
        width, height: size of the stored JPG in pixels.
        scale: (x, y) factors from the ``original_*`` pixel grid to the JPG's.
        stats: counts for the summary are added here (``unmapped:NAME``, ``not owned:NAME on REGION``,
            ``ignored region:NAME``, ``empty box``, ``malformed attribute``).

    Raises:
        SkipCase: the scene graph is malformed (no ``objects`` list, non-numeric coordinates).
    """
    stats = stats if stats is not None else Counter()
    objects = graph.get("objects")
    if not isinstance(objects, list):
        raise SkipCase("malformed scene graph: no 'objects' list")
    names = set(catalog.names)
    boxes: dict[str, list[float]] = {}
    for obj in objects:
        name = obj.get("bbox_name") if isinstance(obj, dict) else None
        if name not in names:
            continue
        coords = [obj.get(k) for k in ("original_x1", "original_y1", "original_x2", "original_y2")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in coords):
            raise SkipCase(f"malformed scene graph: object {name!r} has non-numeric original_x1..original_y2 {coords}")
        x0, y0, x1, y1 = coords[0] * scale[0], coords[1] * scale[1], coords[2] * scale[0], coords[3] * scale[1]
        box = [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]
        if box[2] <= box[0] or box[3] <= box[1]:
            stats["empty box"] += 1
            continue
        boxes[name] = [round(v, 2) for v in box]

    index = _finding_index(catalog)
    labels = Labels(catalog)
    sentences: dict[str, list[str]] = {}
    report: list[str] = []
    for entry in graph.get("attributes") or []:
        if not isinstance(entry, dict):
            stats["malformed attribute"] += 1
            continue
        region = entry.get("bbox_name")
        phrases = _sentences(entry.get("phrases"))
        report += [p for p in phrases if p not in report]
        if region not in names:
            stats[f"ignored region:{region}"] += 1
            continue
        if phrases:
            sentences.setdefault(region, [])
            sentences[region] += [p for p in phrases if p not in sentences[region]]
        owned = catalog.anatomy(region).findings
        for per_phrase in entry.get("attributes") or []:
            for attribute in per_phrase if isinstance(per_phrase, list) else [per_phrase]:
                parts = [p.strip().lower() for p in str(attribute).split("|")]
                if len(parts) != 3 or parts[1] not in _POLARITY:
                    stats["malformed attribute"] += 1
                    continue
                category, value, name = parts[0], _POLARITY[parts[1]], parts[2]
                if category in MODIFIER_CATEGORIES:
                    continue
                if category in DEVICE_CATEGORIES and value == PRESENT:
                    labels.set(None, "support devices", PRESENT)
                if name not in index:
                    if category not in DEVICE_CATEGORIES:
                        stats[f"unmapped:{name}"] += 1
                    continue
                findings, mode = index[name]
                if (mode == NARROWER and value == ABSENT) or (mode == BROADER and value == PRESENT):
                    continue
                finding = next((f for f in findings if f in owned), None)
                if finding is None:
                    stats[f"not owned:{name} on {region}"] += 1
                    continue
                labels.set(region, finding, value)
    out: dict[str, Any] = {}
    if boxes:
        out["anatomy_boxes"] = {n: boxes[n] for n in catalog.names if n in boxes}
    if sentences:
        out["anatomy_sentences"] = {n: sentences[n] for n in catalog.names if n in sentences}
    out.update(labels.to_record())
    out["report"] = " ".join(report)
    return out


def _read_metadata(path: Path) -> dict[str, tuple[int, int]]:
    """dicom_id -> (Columns, Rows) of the DICOM image, from ``mimic-cxr-2.0.0-metadata.csv(.gz)``."""
    _, rows = read_csv(path, ["dicom_id", "Rows", "Columns"])
    out = {}
    for row in rows:
        try:
            out[row["dicom_id"]] = (int(float(row["Columns"])), int(float(row["Rows"])))
        except ValueError:
            continue  # a row without a size: that image is treated as without metadata
    return out


def _mimic_report(reports: Path, subject: str, study: str) -> Path:
    rel = Path(f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")
    return reports / "files" / rel if (reports / "files").is_dir() else reports / rel


def prepare(
    input: str,
    output: str,
    mimic_root: str | None = None,
    mimic_metadata: str | None = None,
    reports: str | None = None,
    exclude_gold: bool = True,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    force: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> PrepareSummary:
    """Convert Chest ImaGenome (silver scene graphs) on MIMIC-CXR-JPG into ``output/datalist.json``.

    Args:
        input: the Chest ImaGenome folder (holding ``silver_dataset/``).
        output: where ``datalist.json`` and the summary go; images stay in place.
        mimic_root: the MIMIC-CXR-JPG folder holding ``files/p10/...`` (default: ``input`` when it has ``files/``).
        mimic_metadata: ``mimic-cxr-2.0.0-metadata.csv(.gz)`` (default: found in ``mimic_root``); its DICOM
            sizes rescale the boxes when the JPGs are not at the DICOM's size.
        reports: the MIMIC-CXR reports folder (``files/p10/p10000032/s50414267.txt``); without it the report is
            the scene graph's phrases joined.
        exclude_gold: leave out the gold-standard images listed in ``images_to_avoid.csv``.
        seed, fractions: accepted for a uniform command line; unused, every image has its split from the split files.
        force: convert everything again instead of reusing a previous run's cases.
        validate: validate the written datalist (headers).
        progress: show a progress bar.
    """
    input_path = Path(input)
    if not input_path.is_dir():
        raise FileNotFoundError(f"{input_path}: input folder not found")
    splits_dir = input_path / SPLITS_FOLDER
    split_csvs = {splits_dir / n: s for n, s in SPLIT_FILES.items() if (splits_dir / n).is_file()}
    if not split_csvs:
        raise FileNotFoundError(f"{splits_dir}: none of the split files {', '.join(SPLIT_FILES)}")
    graphs_dir = next((input_path / d for d in SCENE_GRAPH_FOLDERS if (input_path / d).is_dir()), None)
    if graphs_dir is None:
        raise FileNotFoundError(f"{input_path / SCENE_GRAPH_FOLDERS[0]}: scene graph folder not found (unzip scene_graph.zip there)")
    mimic = Path(mimic_root) if mimic_root else input_path
    if not (mimic / "files").is_dir():
        raise FileNotFoundError(f"{mimic / 'files'}: MIMIC-CXR-JPG image folder not found (give mimic_root=)")
    metadata_path = Path(mimic_metadata) if mimic_metadata else next(
        (mimic / n for n in METADATA_FILES if (mimic / n).is_file()), None)
    metadata = _read_metadata(metadata_path) if metadata_path is not None else {}
    reports_path = Path(reports) if reports else None
    if reports_path is not None and not reports_path.is_dir():
        raise FileNotFoundError(f"{reports_path}: reports folder not found")
    gold: set[str] = set()
    if exclude_gold and (splits_dir / GOLD_FILE).is_file():
        _, rows = read_csv(splits_dir / GOLD_FILE, ["dicom_id"])
        gold = {r["dicom_id"] for r in rows}
    catalog = load_catalog(BASE_CATALOG)

    cases: list[SourceCase] = []
    left_out = 0
    for csv_path, split in split_csvs.items():
        _, rows = read_csv(csv_path, ["subject_id", "study_id", "dicom_id"])
        for line, row in enumerate(rows, start=2):
            if row["dicom_id"] in gold:
                left_out += 1
                continue
            cases.append(SourceCase(id=row["dicom_id"] or f"{csv_path.name}:{line}", patient=row["subject_id"] or None,
                                    split=split, data={"row": row, "where": f"{csv_path} line {line}"}))

    stats: Counter = Counter()

    def convert(case: SourceCase, out: Path) -> dict:
        row, dicom = case.data["row"], case.data["row"]["dicom_id"]
        if not dicom or not row["subject_id"] or not row["study_id"]:
            raise SkipCase(f"malformed row: {case.data['where']} lacks dicom_id, subject_id or study_id")
        graph_path = graphs_dir / f"{dicom}_SceneGraph.json"
        if not graph_path.is_file():
            raise SkipCase(f"no scene graph: {graph_path}")
        try:
            graph = json.loads(graph_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkipCase(f"malformed scene graph: {graph_path}: {e}") from None
        if not isinstance(graph, dict):
            raise SkipCase(f"malformed scene graph: {graph_path} is not a JSON object")
        subject, study = row["subject_id"], row["study_id"]
        rel = row.get("path") or f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.dcm"
        image = mimic / Path(rel).with_suffix(".jpg")
        if not image.is_file():
            raise SkipCase(f"image not found: {image}")
        with Image.open(image) as im:
            width, height = im.size
        size = metadata.get(dicom)
        scale = (width / size[0], height / size[1]) if size else (1.0, 1.0)
        case_stats: Counter = Counter()
        try:
            record = scene_graph_record(graph, catalog, width, height, scale, case_stats)
        except SkipCase as e:
            raise SkipCase(f"{e} ({graph_path})") from None
        if size is None:
            reach = [(b[2] / width, b[3] / height) for b in _unclipped_boxes(graph, catalog)]
            if reach and max(max(r) for r in reach) > 1.0 + MAX_BOX_OVERSHOOT:
                raise SkipCase(f"boxes beyond the image: {graph_path} boxes reach {max(r[0] for r in reach):.0%} of the "
                               f"width and {max(r[1] for r in reach):.0%} of the height of the {width}x{height} JPG "
                               "(a downscaled copy? give mimic_metadata= with the DICOM sizes)")
        if reports_path is not None:
            report_file = _mimic_report(reports_path, subject, study)
            if report_file.is_file():
                record["report"] = report_file.read_text(encoding="utf-8", errors="replace").strip()
            else:
                case_stats["missing report"] += 1
        stats.update(case_stats)
        return {"image": relative_path(image, out), **record}

    notes = [
        f"images from {mimic / 'files'}; boxes "
        + (f"rescaled by JPG size / DICOM size from {metadata_path}" if metadata_path else
           "in original pixels as given (no mimic-cxr-2.0.0-metadata.csv: JPGs assumed at DICOM size)"),
        "splits from " + ", ".join(p.name for p in split_csvs),
    ]
    if gold:
        notes.append(f"{left_out} gold-standard images ({GOLD_FILE}) left out")
    return run_prepare(
        source="imagenome", name="chest-imagenome-silver", modality="CXR", catalog=BASE_CATALOG, output=output,
        cases=cases, convert=convert, fractions=fractions, seed=seed, validate=validate, progress=progress,
        force=force, notes=notes, late_notes=lambda: _stat_notes(stats),
        options={"mimic_root": mimic_root, "mimic_metadata": mimic_metadata, "reports": reports},
    )


def _unclipped_boxes(graph: dict, catalog: Catalog) -> list[list[float]]:
    names = set(catalog.names)
    return [[float(o[k]) for k in ("original_x1", "original_y1", "original_x2", "original_y2")]
            for o in graph["objects"] if isinstance(o, dict) and o.get("bbox_name") in names]


def _stat_notes(stats: Counter) -> list[str]:
    """Summary lines from the counts gathered while converting (cases converted in this run only)."""
    def group(prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: n for k, n in stats.items() if k.startswith(prefix)}

    notes = []
    if group("unmapped:"):
        notes.append(count_note("ImaGenome attributes with no catalog finding (ignored)", group("unmapped:")))
    if group("not owned:"):
        notes.append(count_note("ImaGenome attributes on a region that lacks that finding (ignored)", group("not owned:")))
    if group("ignored region:"):
        notes.append(count_note("described regions not in cxr_imagenome29 (ignored)", group("ignored region:")))
    if stats["empty box"]:
        notes.append(f"{stats['empty box']} boxes empty after clipping to the image (dropped)")
    if stats["malformed attribute"]:
        notes.append(f"{stats['malformed attribute']} malformed attribute entries (not 'category|yes/no|name'; ignored)")
    if stats["missing report"]:
        notes.append(f"{stats['missing report']} MIMIC-CXR reports not found: their report is the scene graph's phrases")
    return notes
