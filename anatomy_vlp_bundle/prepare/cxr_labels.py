"""What the chest X-ray converters share: image-level labels -> catalog findings, the dataset catalog.

CheXpert, NIH ChestX-ray14 and the Open-i (IU X-ray) MeSH terms label a whole image: "Cardiomegaly",
"Pleural Effusion", "Pneumothorax" -- no anatomy, no side. One mapping serves all three sources:

- The source's label name becomes a finding name of the ``cxr_imagenome29`` vocabulary
  (:data:`LABEL_FINDINGS`: ``Effusion`` -> ``pleural effusion``, ``Pleural_Thickening`` ->
  ``pleural thickening``, ...).
- A finding that can only be about one region of ``cxr_imagenome29`` goes onto that anatomy
  (:data:`SINGLE_REGION`: cardiomegaly -> ``cardiac silhouette``, scoliosis -> ``spine``, ...).
- Every other finding is a *study finding*: "pleural effusion" without a side cannot honestly be put
  on ``left lung`` or ``right lung``, and the contract puts findings no anatomy owns in
  ``study_findings``. The built-in ``cxr_imagenome29`` catalog lists only ``support devices`` and
  ``no finding`` there, so these converters write a dataset catalog (:func:`write_image_label_catalog`,
  ``OUTPUT/catalog.json``): ``cxr_imagenome29`` with identical anatomies (a checkpoint maps its anatomy
  queries by name) plus :data:`STUDY_FINDINGS`. Sided statements (IU MeSH ``Opacity/lung/base/left``)
  still go onto their anatomy; the report parser, given this catalog, likewise sends unsided mentions
  ("No pleural effusion.") to the study finding and sided ones to the anatomy.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..data.catalog import Catalog, load_catalog
from ..data.labels import ABSENT, PRESENT, UNCERTAIN

__all__ = [
    "BASE_CATALOG",
    "CATALOG_NAME",
    "CATALOG_FILE",
    "LABEL_FINDINGS",
    "SINGLE_REGION",
    "STUDY_FINDINGS",
    "Labels",
    "normalize_label",
    "image_label_catalog",
    "write_image_label_catalog",
    "read_csv",
    "count_note",
]

BASE_CATALOG = "cxr_imagenome29"
CATALOG_NAME = "cxr_imagenome29_image_labels"
CATALOG_FILE = "catalog.json"

#: Image-level label (see :func:`normalize_label`) -> catalog finding. CheXpert's 14 columns, NIH's
#: 14 labels and "No Finding"; the IU MeSH headings have their own table in :mod:`.iu_xray` and land
#: on the same finding names.
LABEL_FINDINGS: dict[str, str] = {
    # CheXpert (also the MIMIC-CXR CheXpert labels)
    "no finding": "no finding",
    "enlarged cardiomediastinum": "enlarged cardiomediastinum",
    "cardiomegaly": "cardiomegaly",
    "lung opacity": "lung opacity",
    "lung lesion": "lung lesion",
    "edema": "edema",
    "consolidation": "consolidation",
    "pneumonia": "pneumonia",
    "atelectasis": "atelectasis",
    "pneumothorax": "pneumothorax",
    "pleural effusion": "pleural effusion",
    "pleural other": "pleural other",
    "fracture": "fracture",
    "support devices": "support devices",
    # NIH ChestX-ray14 (those not already above)
    "effusion": "pleural effusion",
    "infiltration": "infiltration",
    "mass": "mass",
    "nodule": "nodule",
    "emphysema": "emphysema",
    "fibrosis": "fibrosis",
    "pleural thickening": "pleural thickening",
    "hernia": "hernia",
}

#: Findings that, stated without a location, can only be about one region of ``cxr_imagenome29``.
#: (``mass`` is not here although only ``upper mediastinum`` lists it: an image-level "Mass" is
#: mostly a lung mass.)
SINGLE_REGION: dict[str, str] = {
    "cardiomegaly": "cardiac silhouette",
    "pericardial effusion": "cardiac silhouette",
    "scoliosis": "spine",
    "degenerative changes": "spine",
    "tortuous aorta": "aortic arch",
    "pneumomediastinum": "mediastinum",
}

#: Study findings of the dataset catalog: the built-in ones first, then the unlocated image labels.
STUDY_FINDINGS: tuple[str, ...] = (
    "support devices",
    "no finding",
    "enlarged cardiomediastinum",
    "lung opacity",
    "lung lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural effusion",
    "pleural other",
    "fracture",
    "infiltration",
    "mass",
    "nodule",
    "emphysema",
    "fibrosis",
    "pleural thickening",
    "hernia",
)

#: Phrasings of the new study findings for the report parser (the others have theirs in the base catalog).
_STUDY_FINDING_SYNONYMS: dict[str, list[str]] = {
    "enlarged cardiomediastinum": ["enlarged cardiomediastinal silhouette", "widened cardiomediastinal silhouette"],
    "lung lesion": ["pulmonary lesion"],
    "infiltration": ["infiltrate", "infiltrates"],
    "emphysema": ["emphysematous"],
    "fibrosis": ["fibrotic", "pulmonary fibrosis"],
    "pleural thickening": ["thickened pleura"],
    "hernia": ["hiatal hernia", "hiatus hernia"],
}

_STRENGTH = {PRESENT: 2, UNCERTAIN: 1, ABSENT: 0}
_NOT_PATHOLOGY = ("no finding", "support devices")
_CATALOG_DESCRIPTION = (
    "The 29 Chest ImaGenome regions of cxr_imagenome29, unchanged, plus image-level labels without anatomy "
    "or side (CheXpert, NIH ChestX-ray14, IU X-ray MeSH) as study findings; written by anatomy_vlp_bundle prepare."
)


def normalize_label(name: str) -> str:
    """A source label as a lookup key: lower case, ``_`` as space, single spaces."""
    return " ".join(str(name).replace("_", " ").lower().split())


def image_label_catalog() -> Catalog:
    """``cxr_imagenome29`` with :data:`STUDY_FINDINGS` as study findings (anatomies unchanged)."""
    data = load_catalog(BASE_CATALOG).to_dict()
    data["name"] = CATALOG_NAME
    data["study_findings"] = list(STUDY_FINDINGS)
    synonyms = data.setdefault("finding_synonyms", {})
    for finding, phrasings in _STUDY_FINDING_SYNONYMS.items():
        synonyms.setdefault(finding, phrasings)
    return Catalog.from_dict(data, source=CATALOG_NAME)


def write_image_label_catalog(output: str | Path) -> str:
    """Write :func:`image_label_catalog` to ``output/catalog.json``; returns the datalist's ``catalog`` value."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data = {"description": _CATALOG_DESCRIPTION, **image_label_catalog().to_dict()}
    (output / CATALOG_FILE).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return CATALOG_FILE


class Labels:
    """Structured labels of one record, combined as the report parser does: present > uncertain > absent.

    Attributes:
        catalog: the catalog whose anatomies and findings the labels must use.
        findings: anatomy -> finding -> 1 | 0 | -1.
        study_findings: finding -> 1 | 0 | -1.
    """

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.findings: dict[str, dict[str, int]] = {}
        self.study_findings: dict[str, int] = {}

    def set(self, anatomy: str | None, finding: str, value: int) -> None:
        """State ``finding`` (of ``anatomy``, or of the study when ``None``); a stronger statement wins."""
        slot = self.study_findings if anatomy is None else self.findings.setdefault(anatomy, {})
        old = slot.get(finding)
        if old is None or _STRENGTH[value] > _STRENGTH[old]:
            slot[finding] = value

    def owns(self, anatomy: str, finding: str) -> bool:
        """Whether ``anatomy`` is in the catalog and lists ``finding``."""
        return anatomy in self.catalog.names and finding in self.catalog.anatomy(anatomy).findings

    def add_image_label(self, finding: str, value: int) -> bool:
        """An image-level ``finding`` (catalog name): onto its single region, else a study finding.

        Returns:
            False when the catalog has no place for it (neither a single region nor a study finding).
        """
        anatomy = SINGLE_REGION.get(finding)
        if anatomy is not None and self.owns(anatomy, finding):
            self.set(anatomy, finding, value)
            return True
        if finding in self.catalog.study_findings:
            self.set(None, finding, value)
            return True
        return False

    def whole_study_normal(self) -> None:
        """A normal study: every finding not stated otherwise is 0, and ``no finding`` is 1."""
        for a in self.catalog.anatomies:
            slot = self.findings.setdefault(a.name, {})
            for f in a.findings:
                slot.setdefault(f, ABSENT)
        for f in self.catalog.study_findings:
            self.study_findings.setdefault(f, ABSENT)
        if "no finding" in self.catalog.study_findings and self.study_findings["no finding"] == ABSENT:
            if not self.has_pathology():
                self.study_findings["no finding"] = PRESENT

    def has_pathology(self) -> bool:
        """Whether any finding other than devices (``support devices``) and ``no finding`` is present."""
        return any(v == PRESENT for fd in self.findings.values() for v in fd.values()) or any(
            v == PRESENT for f, v in self.study_findings.items() if f not in _NOT_PATHOLOGY
        )

    def to_record(self) -> dict:
        """``{"findings": ..., "study_findings": ...}`` in catalog order, empty parts left out."""
        out: dict = {}
        findings = {}
        for a in self.catalog.anatomies:
            fd = self.findings.get(a.name)
            if fd:
                findings[a.name] = {f: fd[f] for f in a.findings if f in fd}
        if findings:
            out["findings"] = findings
        if self.study_findings:
            out["study_findings"] = {f: self.study_findings[f] for f in self.catalog.study_findings if f in self.study_findings}
        return out


def read_csv(path: str | Path, required: Sequence[str] = ()) -> tuple[list[str], Iterator[dict[str, str]]]:
    """Open a CSV (``.csv`` or ``.csv.gz``) and check its header.

    Args:
        path: the file.
        required: columns that must be in the header.

    Returns:
        ``(header, rows)``: rows are dicts column -> text (missing trailing cells as ``""``), read lazily.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or lacks a required column (the message names the file and columns).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    opener = gzip.open if path.name.endswith(".gz") else open
    fh = opener(path, "rt", encoding="utf-8-sig", newline="")
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        fh.close()
        raise ValueError(f"{path}: empty file (expected a CSV header)")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        fh.close()
        raise ValueError(f"{path}: missing required column(s) {missing}; the header is {header}")

    def rows() -> Iterator[dict[str, str]]:
        with fh:
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                cells = cells + [""] * (len(header) - len(cells))
                yield {h: c.strip() for h, c in zip(header, cells)}

    return header, rows()


def count_note(title: str, counts: dict[str, int] | Iterable[tuple[str, int]], limit: int = 15) -> str:
    """One summary line: ``title: a (12), b (3), ... and N more``."""
    items = sorted(dict(counts).items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{k} ({n})" for k, n in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title}: {shown}{more}"

