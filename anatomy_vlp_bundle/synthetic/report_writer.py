"""Free-text radiology reports for synthetic studies, written from structured findings.

Interface used by the synthetic generators (``synthetic/ct.py``, ``synthetic/cxr.py``):

    report, anatomy_sentences = write_report(catalog, findings, rng, study_findings=..., details=...)

The phrasing varies (finding synonyms from the catalog, anatomy synonyms, several sentence
patterns, negations, sentence order), so that a text encoder sees realistic variety and the
report parser (``text/reports.py``) is exercised on more than one template.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..data.catalog import Catalog

__all__ = ["write_report"]

_POSITIVE = (
    "The {a} shows {f}.",
    "There is {f} in the {a}.",
    "{F} of the {a} is noted.",
    "{F} is seen in the {a}.",
    "The {a} demonstrates {f}.",
)
_POSITIVE_DETAIL = (
    "There is a {d} {f} in the {a}.",
    "The {a} shows a {d} {f}.",
)
_NEGATIVE = (
    "No {f} in the {a}.",
    "There is no {f} of the {a}.",
    "The {a} shows no {f}.",
    "No evidence of {f} in the {a}.",
)
_NORMAL = (
    "The {a} is normal.",
    "The {a} is unremarkable.",
    "Normal {a}.",
    "The {a} appears normal.",
)
_STUDY_NORMAL = ("No acute abnormality.",)


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _finding_phrase(catalog: Catalog, finding: str, rng: np.random.Generator) -> str:
    return _pick(rng, catalog.phrasings(finding))


def write_report(
    catalog: Catalog,
    findings: Mapping[str, Mapping[str, int]],
    rng: np.random.Generator,
    study_findings: Mapping[str, int] | None = None,
    details: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[str, dict[str, list[str]]]:
    """Write a report for one study.

    Args:
        catalog: the dataset's catalog (anatomy names, synonyms, finding phrasings).
        findings: anatomy -> finding -> 1 (present) | 0 (absent).
        rng: random generator (the caller seeds it: reports are deterministic given the seed).
        study_findings: finding -> 1 | 0 for findings no anatomy owns.
        details: optional anatomy -> finding -> short descriptor (e.g. ``"8 mm"``).

    Returns:
        ``(report, anatomy_sentences)``: the free text (``"FINDINGS: ..."``) and the sentences
        written about each anatomy.
    """
    details = details or {}
    per_anatomy: dict[str, list[str]] = {}
    for anatomy in catalog.anatomies:
        labels = findings.get(anatomy.name)
        if not labels:
            continue
        positives = [f for f, v in labels.items() if v == 1]
        sentences = []
        if not positives:
            sentences.append(_pick(rng, _NORMAL).format(a=anatomy.name))
        else:
            for f in positives:
                phrase = _finding_phrase(catalog, f, rng)
                d = details.get(anatomy.name, {}).get(f)
                if d:
                    s = _pick(rng, _POSITIVE_DETAIL).format(a=anatomy.name, f=phrase, d=d)
                else:
                    s = _pick(rng, _POSITIVE).format(a=anatomy.name, f=phrase, F=phrase[:1].upper() + phrase[1:])
                sentences.append(s)
            negatives = [f for f, v in labels.items() if v == 0]
            if negatives and rng.random() < 0.5:
                f = negatives[int(rng.integers(len(negatives)))]
                sentences.append(_pick(rng, _NEGATIVE).format(a=anatomy.name, f=_finding_phrase(catalog, f, rng)))
        per_anatomy[anatomy.name] = sentences
    study = []
    for f, v in (study_findings or {}).items():
        phrase = _finding_phrase(catalog, f, rng)
        study.append(f"{phrase[:1].upper() + phrase[1:]} is present." if v == 1 else f"No {phrase}.")
    order = list(per_anatomy)
    rng.shuffle(order)
    body = [s for a in order for s in per_anatomy[a]] + study
    return "FINDINGS: " + " ".join(body), per_anatomy
