"""IU X-ray (Open-i, Indiana University) -> contract datalist (``python -m anatomy_vlp_bundle prepare iu-xray``).

Two published layouts are read:

*Open-i* (NLM's ``NLMCXR_reports.tgz`` and ``NLMCXR_png.tgz`` unpacked)::

    INPUT/ecgen-radiology/1.xml         (or INPUT/NLMCXR_reports/ecgen-radiology/1.xml)
    INPUT/NLMCXR_png/CXR1_1_IM-0001-3001.png

  One XML per report: ``<uId id="CXR1"/>``, ``<AbstractText Label="FINDINGS">`` / ``"IMPRESSION"``,
  ``<MeSH><major>Cardiomegaly/mild</major><automatic>...</automatic></MeSH>`` and one
  ``<parentImage id="CXR1_1_IM-0001-3001">`` per image (its ``caption`` is the exam's title, not the
  image's view: the XML does not say which image is frontal).

*Kaggle* (``raddar/chest-xrays-indiana-university``)::

    INPUT/indiana_reports.csv           uid, MeSH, Problems, image, indication, comparison, findings, impression
    INPUT/indiana_projections.csv       uid, filename, projection (Frontal / Lateral)
    INPUT/images/images_normalized/1_IM-0001-3001.dcm.png

  ``MeSH`` holds the major terms joined by ``;``. Kaggle's ``1_IM-0001-3001.dcm.png`` / ``2_IM-0652-1001.dcm.png``
  are Open-i's ``CXR1_1_IM-0001-3001`` / ``CXR2_IM-0652-1001``, so ``indiana_projections.csv`` (found in the
  input folder or given as ``projections``) tells the views of the Open-i layout's images too.

Records: one per image, id the image file's stem (``CXR1_1_IM-0001-3001`` / ``1_IM-0001-3001``), patient
the report (``CXR1``: IU has no patient ids, one report is one patient's study), report
``FINDINGS: ... IMPRESSION: ...`` (``XXXX`` anonymisation kept).
Frontal images only when the projection is known (``frontal_only``); without ``indiana_projections.csv``
every image is kept. Splits are derived by patient hash.

MeSH terms -> findings (:func:`mesh_labels`): the heading (``Opacity``, ``Pulmonary Atelectasis``,
``Aorta/tortuous``, ...) names a finding of the ``cxr_imagenome29`` vocabulary; side and zone
qualifiers place it (``Opacity/lung/base/left`` -> ``left lower lung zone``: lung opacity = 1;
``Pleural Effusion/right`` -> ``right lung``; ``bilateral`` -> both sides); a term without a usable
location is an image-level label handled as for CheXpert and NIH (:mod:`.cxr_labels`: cardiomegaly on the
cardiac silhouette, others as study findings of ``OUTPUT/catalog.json``). ``borderline`` -> -1 (uncertain).
``normal`` is a whole-study normal: every finding 0 and ``no finding`` 1. Unmapped headings are counted
in the summary.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..data.catalog import Catalog
from ..data.labels import ABSENT, PRESENT, UNCERTAIN
from .common import DEFAULT_FRACTIONS, PrepareSummary, SkipCase, SourceCase, relative_path, run_prepare
from .cxr_labels import (
    LABEL_FINDINGS,
    Labels,
    count_note,
    image_label_catalog,
    normalize_label,
    read_csv,
    write_image_label_catalog,
)

__all__ = ["prepare", "mesh_labels", "MESH_FINDINGS", "MESH_QUALIFIED"]

REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
XML_FOLDERS = ("ecgen-radiology", "NLMCXR_reports/ecgen-radiology")
OPENI_IMAGE_FOLDERS = ("NLMCXR_png", "images")
KAGGLE_IMAGE_FOLDERS = ("images/images_normalized", "images")

#: MeSH heading (lower case) -> catalog finding, for headings the shared table
#: (:data:`.cxr_labels.LABEL_FINDINGS`) does not know.
MESH_FINDINGS: dict[str, str] = {
    "opacity": "lung opacity",
    "airspace disease": "lung opacity",
    "pulmonary atelectasis": "atelectasis",
    "pulmonary edema": "edema",
    "infiltrate": "infiltration",
    "pulmonary emphysema": "emphysema",
    "pulmonary fibrosis": "fibrosis",
    "hernia, hiatal": "hernia",
    "fractures, bone": "fracture",
    "scoliosis": "scoliosis",
    "spondylosis": "degenerative changes",
    "osteophyte": "degenerative changes",
    "calcinosis": "calcification",
    "catheters, indwelling": "support devices",
    "medical device": "support devices",
    "implanted medical device": "support devices",
    "tube, inserted": "support devices",
    "surgical instruments": "support devices",
}
#: (MeSH heading, qualifier) -> catalog finding, for headings naming a structure and qualifiers naming its finding.
MESH_QUALIFIED: dict[tuple[str, str], str] = {
    ("aorta", "tortuous"): "tortuous aorta",
    ("aorta, thoracic", "tortuous"): "tortuous aorta",
    ("spine", "degenerative"): "degenerative changes",
    ("thoracic vertebrae", "degenerative"): "degenerative changes",
    ("diaphragm", "elevated"): "elevated hemidiaphragm",
    ("costophrenic angle", "blunted"): "blunted costophrenic angle",
    ("pleura", "thickening"): "pleural thickening",
    ("cardiac shadow", "enlarged"): "cardiomegaly",
    ("hilum", "enlarged"): "enlarged hilum",
}
#: Location words that need a side: word -> the zone part of a ``cxr_imagenome29`` anatomy name.
SIDED_ZONES = {
    "lung": "lung",
    "base": "lower lung zone",
    "lower lobe": "lower lung zone",
    "upper lobe": "upper lung zone",
    "middle lobe": "mid lung zone",
    "lingula": "mid lung zone",
    "apex": "apical zone",
    "hilum": "hilar structures",
    "costophrenic angle": "costophrenic angle",
    "diaphragm": "hemidiaphragm",
    "clavicle": "clavicle",
}
#: Location words that imply their side.
IMPLIED_SIDE = {"lingula": "left", "middle lobe": "right"}
#: Location words naming an unsided anatomy.
UNSIDED_REGIONS = {
    "aorta": "aortic arch",
    "aorta, thoracic": "aortic arch",
    "spine": "spine",
    "thoracic vertebrae": "spine",
    "mediastinum": "mediastinum",
    "heart": "cardiac silhouette",
    "trachea": "trachea",
}
UNCERTAIN_QUALIFIERS = {"borderline"}
NORMAL_TERM = "normal"
NOT_INDEXED_TERM = "no indexing"
#: Open-i image ids come as ``CXR<n>_<n>_IM-...`` or ``CXR<n>_IM-...``.
_OPENI_ID_RE = re.compile(r"^CXR(\d+)_(?:\1_)?(.+)$")


def _finding_of(parts: list[str]) -> str | None:
    heading, qualifiers = parts[0], parts[1:]
    for q in qualifiers:
        if (heading, q) in MESH_QUALIFIED:
            return MESH_QUALIFIED[(heading, q)]
    return MESH_FINDINGS.get(heading) or LABEL_FINDINGS.get(normalize_label(heading))


def _located_anatomies(labels: Labels, finding: str, parts: list[str]) -> list[str]:
    """The anatomies a term's location words name, each owning ``finding``; ``[]`` when the location is not usable."""
    sides = {p for p in parts if p in ("left", "right")}
    if "bilateral" in parts:
        sides |= {"left", "right"}
    sides |= {IMPLIED_SIDE[p] for p in parts if p in IMPLIED_SIDE}
    zones = [SIDED_ZONES[p] for p in parts if p in SIDED_ZONES]
    if sides:
        zone = next((z for z in zones if z != "lung"), "lung")
        out = []
        for side in sorted(sides):
            owner = next((a for a in (f"{side} {zone}", f"{side} lung") if labels.owns(a, finding)), None)
            if owner is None:
                return []
            out.append(owner)
        return out
    region = next((UNSIDED_REGIONS[p] for p in parts if p in UNSIDED_REGIONS), None)
    return [region] if region is not None and labels.owns(region, finding) else []


def mesh_labels(terms: Sequence[str], catalog: Catalog) -> tuple[dict, list[str], list[str]]:
    """Structured labels of one report from its MeSH terms (see the module docstring).

    Args:
        terms: MeSH terms as written (``Opacity/lung/base/left``, ``normal``).
        catalog: the dataset catalog (:func:`.cxr_labels.image_label_catalog`).

    Returns:
        ``(record part with findings / study_findings, unmapped headings, mapped findings without a place)``.
    """
    labels = Labels(catalog)
    unmapped: list[str] = []
    unplaced: list[str] = []
    normal = False
    for term in terms:
        parts = [p.strip().lower() for p in str(term).split("/") if p.strip()]
        if not parts or parts[0] == NOT_INDEXED_TERM:
            continue
        if parts[0] == NORMAL_TERM:
            normal = True
            continue
        finding = _finding_of(parts)
        if finding is None:
            unmapped.append(parts[0])
            continue
        value = UNCERTAIN if UNCERTAIN_QUALIFIERS & set(parts[1:]) else PRESENT
        located = _located_anatomies(labels, finding, parts)
        for anatomy in located:
            labels.set(anatomy, finding, value)
        if not located and not labels.add_image_label(finding, value):
            unplaced.append(finding)
    if normal:
        labels.whole_study_normal()
    elif labels.has_pathology():
        labels.add_image_label("no finding", ABSENT)
    return labels.to_record(), unmapped, unplaced


def _report_text(findings: str, impression: str) -> str:
    parts = [f"{label}: {' '.join(text.split())}" for label, text in (("FINDINGS", findings), ("IMPRESSION", impression))
             if text and text.strip()]
    return "\n".join(parts)


def _first_dir(base: Path, names: Sequence[str]) -> Path | None:
    return next((base / n for n in names if (base / n).is_dir()), None)


def _projections(path: Path | None) -> dict[str, str]:
    """Kaggle image stem (``1_IM-0001-3001``) -> projection (``Frontal`` / ``Lateral``) from ``indiana_projections.csv``."""
    if path is None:
        return {}
    _, rows = read_csv(path, ["uid", "filename", "projection"])
    return {_kaggle_stem(r["filename"]): r["projection"] for r in rows if r["filename"]}


def _kaggle_stem(filename: str) -> str:
    """``1_IM-0001-3001.dcm.png`` -> ``1_IM-0001-3001``."""
    stem = filename
    for suffix in (".png", ".dcm"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem


def _openi_to_kaggle(image_id: str) -> str:
    """Open-i image id -> Kaggle stem: ``CXR1_1_IM-0001-3001`` and ``CXR2_IM-0652-1001`` -> ``1_IM-0001-3001``, ``2_IM-0652-1001``."""
    match = _OPENI_ID_RE.match(image_id)
    return f"{match.group(1)}_{match.group(2)}" if match else image_id


def _openi_cases(folder: Path, images: Path, automatic_terms: bool) -> list[SourceCase]:
    cases = []
    for xml_path in sorted(folder.glob("*.xml")):
        key = f"{folder.name}/{xml_path.name}"
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            cases.append(SourceCase(id=key, data={"error": f"malformed XML: {xml_path}: {e}"}))
            continue
        uid_node = root.find(".//uId")
        uid = uid_node.get("id") if uid_node is not None and uid_node.get("id") else f"CXR{xml_path.stem}"
        sections = {(n.get("Label") or "").upper(): n.text or "" for n in root.iter("AbstractText")}
        kinds = ("major", "automatic") if automatic_terms else ("major",)
        terms = [n.text.strip() for kind in kinds for n in root.findall(f".//MeSH/{kind}") if n.text and n.text.strip()]
        image_ids = [n.get("id") for n in root.iter("parentImage") if n.get("id")]
        if not image_ids:
            cases.append(SourceCase(id=key, patient=uid, data={"error": f"no image: {xml_path} has no parentImage"}))
            continue
        for image_id in image_ids:
            cases.append(SourceCase(id=image_id, patient=uid, data={
                "image": images / f"{image_id}.png",
                "view_key": _openi_to_kaggle(image_id),
                "report": _report_text(sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")),
                "terms": terms,
                "source": str(xml_path),
            }))
    return cases


def _kaggle_cases(input: Path, images: Path) -> list[SourceCase]:
    reports_csv, projections_csv = input / REPORTS_CSV, input / PROJECTIONS_CSV
    _, rows = read_csv(reports_csv, ["uid", "MeSH", "findings", "impression"])
    reports = {r["uid"]: (line, r) for line, r in enumerate(rows, start=2)}
    _, rows = read_csv(projections_csv, ["uid", "filename", "projection"])
    cases = []
    for line, row in enumerate(rows, start=2):
        uid, filename = row["uid"], row["filename"]
        if not uid or not filename:
            cases.append(SourceCase(id=f"{PROJECTIONS_CSV}:{line}", data={
                "error": f"malformed row: {projections_csv} line {line} has an empty uid or filename"}))
            continue
        report_line, report = reports.get(uid, (None, None))
        data: dict = {"image": images / filename, "view_key": _kaggle_stem(filename),
                      "source": f"{reports_csv} line {report_line}"}
        if report is None:
            data["error"] = f"no report: uid {uid} of {projections_csv} line {line} is not in {reports_csv}"
        else:
            data["report"] = _report_text(report["findings"], report["impression"])
            data["terms"] = [t.strip() for t in report["MeSH"].split(";") if t.strip()]
        cases.append(SourceCase(id=_kaggle_stem(filename), patient=f"CXR{uid}", data=data))
    return cases


def prepare(
    input: str,
    output: str,
    images: str | None = None,
    projections: str | None = None,
    frontal_only: bool = True,
    automatic_terms: bool = False,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    force: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> PrepareSummary:
    """Convert IU X-ray into ``output/datalist.json`` (+ ``catalog.json``); see the module docstring.

    Args:
        input: the folder holding ``ecgen-radiology/`` (Open-i) or ``indiana_reports.csv`` (Kaggle).
        output: where ``datalist.json``, ``catalog.json`` and the summary go; images stay in place.
        images: the PNG folder when it is not ``input/NLMCXR_png`` (Open-i) or ``input/images/images_normalized``
            (Kaggle).
        projections: an ``indiana_projections.csv`` giving the views of the Open-i layout's images (default:
            ``input/indiana_projections.csv`` when present).
        frontal_only: keep only images whose projection is known to be ``Frontal`` (images of unknown
            projection are kept).
        automatic_terms: also map the Open-i ``<MeSH><automatic>`` terms (machine-indexed; by default only the
            curated ``<major>`` terms are used).
        seed: seed of the patient hash that assigns splits.
        fractions: training / validation / test fractions of patients.
        force: convert everything again instead of reusing a previous run's cases.
        validate: validate the written datalist (headers).
        progress: show a progress bar.
    """
    input_path = Path(input)
    if not input_path.is_dir():
        raise FileNotFoundError(f"{input_path}: input folder not found")
    xml_folder = _first_dir(input_path, XML_FOLDERS)
    if xml_folder is None and not (input_path / REPORTS_CSV).is_file():
        raise FileNotFoundError(
            f"{input_path}: neither Open-i reports ({' or '.join(XML_FOLDERS)}/*.xml) nor the Kaggle {REPORTS_CSV}")
    image_folders = OPENI_IMAGE_FOLDERS if xml_folder is not None else KAGGLE_IMAGE_FOLDERS
    images_path = Path(images) if images else _first_dir(input_path, image_folders)
    if images_path is None or not images_path.is_dir():
        raise FileNotFoundError(f"{images_path or input_path}: image folder not found "
                                f"(expected {' or '.join(image_folders)} under the input, or give images=)")
    projections_path = Path(projections) if projections else input_path / PROJECTIONS_CSV
    if projections and not projections_path.is_file():
        raise FileNotFoundError(f"{projections_path}: projections file not found")
    catalog = image_label_catalog()
    catalog_ref = write_image_label_catalog(output)

    if xml_folder is not None:
        layout = f"Open-i XML ({xml_folder})"
        cases = _openi_cases(xml_folder, images_path, automatic_terms)
    else:
        layout = f"Kaggle CSV ({input_path / REPORTS_CSV})"
        cases = _kaggle_cases(input_path, images_path)
    view_of = _projections(projections_path if projections_path.is_file() else None)
    unknown_view = sum(1 for c in cases if "view_key" in c.data and c.data["view_key"] not in view_of)
    left_out = {c.id for c in cases if frontal_only and view_of.get(c.data.get("view_key"), "Frontal") != "Frontal"}
    cases = [c for c in cases if c.id not in left_out]

    unmapped: Counter = Counter()
    unplaced: Counter = Counter()

    def convert(case: SourceCase, out: Path) -> dict:
        data = case.data
        if "error" in data:
            raise SkipCase(data["error"])
        if not data["report"]:
            raise SkipCase(f"no report text: {data['source']} has no FINDINGS or IMPRESSION")
        if not data["image"].is_file():
            raise SkipCase(f"image not found: {data['image']}")
        labels, unmapped_terms, unplaced_findings = mesh_labels(data["terms"], catalog)
        unmapped.update(unmapped_terms)
        unplaced.update(unplaced_findings)
        return {"image": relative_path(data["image"], out), "report": data["report"], **labels}

    notes = [
        f"layout: {layout}; images from {images_path}",
        f"MeSH terms -> {catalog_ref} ({catalog.name}): sided terms on their anatomy, unsided ones as image-level "
        "labels (cardiomegaly on 'cardiac silhouette', others as study findings); 'normal' sets every finding to 0",
        "splits derived by patient (= report) hash",
    ]
    if frontal_only:
        notes.append(f"frontal_only: {len(left_out)} images of known non-frontal projection left out")
    if unknown_view:
        notes.append(f"projection unknown for {unknown_view} images (no {PROJECTIONS_CSV} entry): all kept")
    return run_prepare(
        source="iu-xray", name="iu-xray", modality="CXR", catalog=catalog_ref, output=output, cases=cases,
        convert=convert, fractions=fractions, seed=seed, validate=validate, progress=progress, force=force, notes=notes,
        late_notes=lambda: [
            count_note("MeSH headings with no catalog finding (ignored; cases converted in this run)", unmapped) if unmapped else "",
            count_note("MeSH findings with no usable location and no study finding (ignored)", unplaced) if unplaced else "",
        ],
        options={"automatic_terms": bool(automatic_terms)},
    )
