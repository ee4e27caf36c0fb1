"""Radiology report parsing: free text -> per-anatomy sentences and finding labels.

A report is cut into sections (``FINDINGS:``, ``IMPRESSION:``; history, indication, technique and
comparison sections are dropped because they name findings that are asked about, not seen), the
sections into sentences, and every sentence is matched against the catalog:

* **Anatomies** by the catalog's names and synonyms. The longest match wins (``"right lower lobe"``
  over ``"lobe"``); a form listed by several anatomies belongs to all of them. For anatomies named
  ``right X`` / ``left X`` the unsided rest (``"lungs"``, ``"kidneys"``, ``"costophrenic angles"``)
  means both sides when plural or after a bilateral cue (``"bilateral"``, ``"both"``,
  ``"bibasilar"``). Group words name several anatomies (``"upper abdominal organs"``, ``"bone
  structures"``, ``"mediastinal main vascular structures"``); in ``"the right lobe of the thyroid
  gland"`` the part (``"lobe"``) belongs to the anatomy after ``of``.
* **Findings** by the catalog's finding names and ``finding_synonyms`` (plurals and adjectives
  included: ``"calcified"``, ``"emphysematous"``, ``"atelectatic"``). Fragments of an anatomy's
  findings count when that anatomy is named (``"wall thickening of the sigmoid colon"``,
  ``"elevation of the left hemidiaphragm"``), and an absent generic lesion (``"no focal liver
  lesion"``, ``"no space-occupying lesion ... in the liver"``) makes that anatomy's lesions absent. A finding
  goes to the anatomies named in the same clause that own it; a finding no named anatomy owns goes
  to the study findings when it is one. A clause that names no anatomy: the finding goes to the
  anatomies named elsewhere in the sentence that own it (``"opacity in the right lung but no
  effusion"``); else an *absent* finding is absent in every anatomy that owns it (``"No
  pneumothorax."``) and a present or uncertain one goes to its only owner (``"Cardiomegaly."``),
  or with a bilateral cue to both sides of its widest owner (``"bilateral airspace opacities"``:
  right and left lung), else stays unknown. A side word right before a finding that no named
  anatomy owns puts it on that side's widest owner (``"moderate right pneumothorax"``: right lung;
  ``"no left hydronephrosis"``: left kidney only).
* **Polarity** (NegEx-style): the nearest negation or uncertainty cue in scope decides -- pre-cues
  (``no``, ``without``, ``free of``, ``negative for``, ``possible``, ``cannot exclude``...) act
  forwards, post-cues (``is not seen``, ``has resolved``, ``cannot be excluded``...) backwards,
  within the clause and up to a terminator (``but``, ``however``, ``there is``...). ``"No X or Y"``
  negates both, ``"X without Y"`` negates Y only; ``"X/Y"`` and ``"X and/or Y"`` make both uncertain.
* **Normal statements**: ``"The liver is normal / unremarkable / clear"`` (also ``patent``, ``is
  open``, ``is natural``, ``are sharp``) sets all of that anatomy's findings to 0 (``"normal in
  size"``, ``"heart contour, size are normal"`` only its size findings); a statement about a part
  or one side of an anatomy (``"both main bronchi are open"`` for the lung, ``"the left lung is
  clear"`` where the catalog has one lung) sets nothing. A whole-study statement (``"no acute
  abnormality"``, ``"no acute cardiopulmonary process"``, ``"normal study"``, ``"negative chest
  radiograph"``, ``"findings within normal limits"``) sets every finding of
  every anatomy and every study finding to 0. Findings the report states explicitly keep their
  stated value. When a finding is stated several times the strongest statement wins: present over
  uncertain over absent.

Decisions: ``likely`` / ``probable`` / ``suspected`` / ``borderline`` -> uncertain (-1), as the
CheXpert labeller does (``uncertain_as=1`` in :class:`ParseReportd` turns them positive);
``consistent with`` / ``compatible with`` -> present; ``no definite`` / ``no new`` -> absent;
``no change in X`` / ``unchanged X`` -> present. A finding never mentioned is absent from the output
(unknown), never 0. Study findings named like ``"no finding"`` are derived, not read: 0 when any
non-device finding is present (also one no catalog anatomy can take: ``"old left rib fractures"``),
1 when the study is called normal and nothing is present.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..data.catalog import Catalog, CatalogError, load_catalog
from ..data.labels import ABSENT, PRESENT, UNCERTAIN, UNKNOWN

__all__ = [
    "ParsedReport",
    "ReportParser",
    "get_parser",
    "parse_report",
    "parse_anatomy_sentences",
    "split_sentences",
    "merge_labels",
    "merge_sentences",
    "ParseReportd",
    "parse_report_command",
    "negate_sentence",
    "perturb_sentence",
    "DERIVED_STUDY_FINDINGS",
]

#: Study findings whose value is derived from the others instead of read from the text.
DERIVED_STUDY_FINDINGS = frozenset({"no finding", "no findings", "normal"})
# Findings that are devices, not pathology: they do not make a study abnormal ("no finding" stays 1).
_DEVICE_RE = re.compile(r"\b(device|devices|tube|tubes|line|lines|catheter|material|lead|leads|clip|clips|stent|pacemaker)\b")

# ------------------------------------------------------------------------------------------
# sentence splitting
# ------------------------------------------------------------------------------------------
_KEEP_SECTIONS = (
    "findings", "finding", "impression", "impressions", "conclusion", "conclusions", "opinion", "summary",
    "final report", "report", "interpretation", "diagnosis", "results", "result", "addendum",
)
_DROP_SECTIONS = (
    "indication", "indications", "clinical indication", "history", "clinical history", "medical history",
    "clinical information", "clinical info", "clinical data", "clinical details", "clinical notes",
    "clinical question", "question", "reason for exam", "reason for examination", "reason for study",
    "reason", "technique", "techniques", "comparison", "comparisons", "comparison study", "procedure",
    "examination", "exam", "type of examination", "prior", "priors", "prior study", "recommendation",
    "recommendations", "notification", "dose", "contrast", "protocol", "wet read", "reference exam",
    "accession", "signed by", "dictated by", "attending", "radiologist",
)
_SECTION_RE = re.compile(
    r"(?:^|(?<=[.!?;]))[ \t]*(?P<h>"
    + "|".join(r"\s+".join(map(re.escape, h.split())) for h in sorted(_KEEP_SECTIONS + _DROP_SECTIONS, key=len, reverse=True))
    + r")[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_ABBREVIATIONS = frozenset(
    {"dr", "mr", "mrs", "ms", "prof", "e.g", "i.e", "eg", "ie", "vs", "approx", "cf", "fig", "figs", "st",
     "jr", "sr", "incl", "resp", "al", "ca", "min", "max", "lt", "rt", "hx", "pt", "pts", "ref", "nos", "esp"}
)
_SENT_END_RE = re.compile(r"[.!?]+(?=[\s\"')\]]|$)")
_LIST_MARKER_RE = re.compile(r"^\s*(?:\(?\d{1,2}[.)](?!\d)|\(?[a-z][)]|[-*\u2022\u00b7\u2013])\s*")
_LINE_START_BOUNDARY_RE = re.compile(r"^\s*(?:\(?\d{1,2}[.)](?!\d)|[-*\u2022\u00b7\u2013]\s|[A-Z][\w /&-]{0,30}:)")
_CONTINUATION_END_RE = re.compile(
    r"(?:,|\b(?:and|or|of|the|a|an|with|without|in|to|for|at|by|from|on|no|not|is|are|was|were|as|than|"
    r"which|that|but|nor|into|over|under|within|along|mild|small|large|left|right))\s*$",
    re.IGNORECASE,
)


def _split_chunk(chunk: str) -> list[str]:
    """Split one paragraph at sentence punctuation, not at abbreviations or decimals."""
    out, start = [], 0
    for m in _SENT_END_RE.finditer(chunk):
        if m.group() == ".":
            before = re.search(r"(\S+)$", chunk[start : m.start()])
            word = before.group(1).lower().lstrip("([\"'") if before else ""
            if word in _ABBREVIATIONS:
                continue
        out.append(chunk[start : m.end()])
        start = m.end()
    out.append(chunk[start:])
    return out


#: Longer "sentences" (run-ons without punctuation, pasted tables, adversarial input) are cut into
#: pieces of at most this many characters, at a comma, semicolon or space: the cue scopes of one
#: sentence cost time quadratic in its length, and a real report sentence is far shorter.
MAX_SENTENCE_CHARS = 1000


def _bound_length(s: str) -> list[str]:
    """``s`` in pieces of at most :data:`MAX_SENTENCE_CHARS`, cut at the last ``,``/``;``/space before the limit."""
    pieces = []
    while len(s) > MAX_SENTENCE_CHARS:
        window = s[:MAX_SENTENCE_CHARS]
        cut = max(window.rfind(","), window.rfind(";"))
        if cut < MAX_SENTENCE_CHARS // 2:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = MAX_SENTENCE_CHARS - 1
        pieces.append(s[: cut + 1])
        s = s[cut + 1 :]
    pieces.append(s)
    return pieces


def _clean_sentence(s: str) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    # a sentence may start with list markers ("1.", "2)", "-"), sometimes several after a split
    prev = None
    while prev != s:
        prev = s
        s = _LIST_MARKER_RE.sub("", s, count=1).strip()
    return s


def _paragraphs(text: str) -> list[str]:
    """Join wrapped lines; break at blank lines, list items, ``Label:`` lines and finished lines."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        if current:
            prev = current[-1].rstrip()
            ends_sentence = prev.endswith((".", "!", "?", ";"))
            starts_item = bool(_LINE_START_BOUNDARY_RE.match(line))
            # a wrapped sentence goes on in lower case or with a number ("12 mm"); a new one starts upper case
            starts_upper = line.lstrip()[:1].isupper()
            continues = bool(_CONTINUATION_END_RE.search(prev)) or not starts_upper
            if ends_sentence or starts_item or not continues:
                paragraphs.append(" ".join(current))
                current = []
        if current and re.search(r"\w-$", current[-1]) and line.lstrip()[:1].islower():
            current[-1] += line.strip()  # "low-\nattenuation": a compound broken at its hyphen
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def split_sentences(text: str) -> list[str]:
    """Sentences of a report, in order, from the sections that describe the images.

    Robust to section headers (``FINDINGS:``, ``IMPRESSION:``; history/indication/technique/
    comparison sections are dropped), wrapped lines, numbered or bulleted lists, decimals
    (``2.5 cm``) and abbreviations (``Dr.``, ``e.g.``, ``vs.``). Run-ons longer than
    :data:`MAX_SENTENCE_CHARS` are cut into pieces.
    """
    if not text or not text.strip():
        return []
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    sections: list[tuple[str | None, str]] = []
    pos, name = 0, None
    for m in _SECTION_RE.finditer(text):
        sections.append((name, text[pos : m.start()]))
        name = re.sub(r"\s+", " ", m.group("h").lower())
        pos = m.end()
    sections.append((name, text[pos:]))
    out: list[str] = []
    for name, body in sections:
        if name in _DROP_SECTIONS or not body.strip():
            continue
        for para in _paragraphs(body):
            for piece in _split_chunk(para):
                for part in _bound_length(_clean_sentence(piece)):
                    s = _clean_sentence(part)
                    if re.search(r"[A-Za-z]", s):
                        out.append(s)
    return out


# ------------------------------------------------------------------------------------------
# lexicon: catalog forms -> regular expressions
# ------------------------------------------------------------------------------------------
_IRREGULAR_PLURALS = {
    "apex": "apices", "hilum": "hila", "vertebra": "vertebrae", "calculus": "calculi", "atrium": "atria",
    "bronchus": "bronchi", "diverticulum": "diverticula", "pleura": "pleurae", "lymph node": "lymph nodes",
    "sequela": "sequelae",
}
# adjectives derived from finding nouns: "calcified" aorta, "emphysematous" and "atelectatic" changes
_DERIVED_ENDINGS = (("ification", "ified"), ("asis", "atic"), ("osis", "otic"), ("ema", "ematous"))
# words naming several catalog anatomies at once ("Upper abdominal organs included in the sections
# are normal."); each group means the listed anatomies the catalog has
_ANATOMY_GROUPS = {
    ("upper abdominal organs", "upper abdominal organ", "upper abdominal sections", "upper abdominal structures",
     "upper abdomen"):
        ("liver", "gallbladder", "spleen", "pancreas", "right kidney", "left kidney", "adrenal glands", "stomach"),
    ("bone structures", "bony structures", "osseous structures", "skeletal structures"):
        ("vertebrae", "spine", "right clavicle", "left clavicle"),
    ("mediastinal main vascular structures", "mediastinal major vascular structures", "main vascular structures",
     "major vascular structures", "great vessels"):
        ("aorta", "aortic arch"),
}
# words that name a part of an organ: "the main bronchi are open" says nothing of the whole lung
_PART_WORDS = frozenset({"lobe", "lobes", "segment", "segments", "bronchi", "bronchus", "bronchial", "airway", "airways",
                         "pleura", "pleurae", "pleural"})
_BILATERAL_CUE_RE = re.compile(r"(?<![a-z0-9])(?:bilateral|bilaterally|both|right and left|left and right)(?![a-z0-9])")
_IS_ADVERBS = r"(?:mildly|moderately|markedly|slightly|severely|massively|minimally|again|still|diffusely)"


def _lower(s: str) -> str:
    """Lower-case keeping the length (so match offsets index the original sentence)."""
    low = s.lower()
    if len(low) == len(s):  # lower-casing only ever lengthens: same length, same offsets
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in s)


def _norm(s: str) -> str:
    return re.sub(r"[\s\-]+", " ", s.lower()).strip()


def _plural_variants(form: str) -> set[str]:
    words = form.split(" ")
    last = words[-1]
    out = set()
    if form in _IRREGULAR_PLURALS:
        out.add(_IRREGULAR_PLURALS[form])
    if last in _IRREGULAR_PLURALS:
        out.add(" ".join(words[:-1] + [_IRREGULAR_PLURALS[last]]))
    if re.search(r"[^aeiou]y$", last):
        out.add(" ".join(words[:-1] + [last[:-1] + "ies"]))
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        out.add(" ".join(words[:-1] + [last + "es"]))
    elif re.search(r"[a-z]$", last):
        out.add(" ".join(words[:-1] + [last + "s"]))
    out.discard(form)
    return out


def _derived_adjectives(form: str) -> set[str]:
    """``"calcification"`` -> ``{"calcified"}``, ``"atelectasis"`` -> ``{"atelectatic"}`` (single words only)."""
    if " " in form:
        return set()
    return {form[: -len(noun)] + adj for noun, adj in _DERIVED_ENDINGS if form.endswith(noun) and len(form) > len(noun) + 2}


def _form_regex(forms: Iterable[str]) -> re.Pattern:
    """One pattern that reports, at every word start, the longest form beginning there."""
    alts = []
    for f in sorted(set(forms), key=lambda x: (-len(x), x)):
        words = [re.escape(w) for w in f.split(" ")]
        # "X is Y" forms also match "X is not Y" / "X is mildly Y" (the negation is read from the text)
        parts = []
        for w in words:
            if w in ("is", "are"):
                parts.append(rf"(?:is|are)(?:[\s\-]+(?:not|no[\s\-]+longer))?(?:[\s\-]+{_IS_ADVERBS})?")
            else:
                parts.append(w)
        alts.append(r"[\s\-]+".join(parts))
    if not alts:
        return re.compile(r"(?!x)x")
    return re.compile(r"(?<![a-z0-9])(?=(" + "|".join(alts) + r")(?![a-z0-9]))")


def _match_key(text: str) -> tuple[str, bool]:
    """Normalised form of a matched span and whether it carried an inline ``not``."""
    t = _norm(text)
    negated = bool(re.search(r"\b(?:is|are) (?:not|no longer)\b", t))
    t = re.sub(r"\b(is|are)(?: not| no longer)?(?: " + _IS_ADVERBS + r")? ", "is ", t)
    return t, negated


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    key: str
    kind: str  # "anatomy" | "finding" | trigger kind
    rows: frozenset = frozenset()  # anatomy rows (anatomy) or finding names (finding)
    negated: bool = False  # finding written as "X is not Y"
    priority: int = 0
    partial: bool = False  # anatomy named by a part or one side of it ("bronchi", "left lung" for "lung")


def _select_longest(cands: list[_Span]) -> list[_Span]:
    """Greedy longest-match selection of non-overlapping spans (ties: higher priority, then earlier)."""
    chosen: list[_Span] = []
    for c in sorted(cands, key=lambda s: (-(s.end - s.start), -s.priority, s.start)):
        if all(c.end <= o.start or c.start >= o.end for o in chosen):
            chosen.append(c)
    return sorted(chosen, key=lambda s: s.start)


# trigger phrases: kind -> phrases (matched case-insensitively on word boundaries, longest first)
_NEG_PRE = (
    "no", "not", "without", "free of", "negative for", "no evidence of", "no evidence for", "no sign of",
    "no signs of", "no findings of", "no finding of", "absence of", "absent", "never", "neither", "nor",
    "resolution of", "resolved", "clear of", "rules out", "ruled out", "no definite", "no convincing",
    "no new", "no longer", "without evidence of", "no radiographic evidence of", "no ct evidence of",
    "interval resolution of", "removal of", "removed", "negative", "there is no", "there are no",
)
_NEG_POST = (
    "is not seen", "are not seen", "not seen", "not identified", "not present", "not visualized",
    "not visualised", "not appreciated", "not detected", "not evident", "not demonstrated", "is absent",
    "are absent", "absent", "has resolved", "have resolved", "resolved", "no longer seen", "no longer present",
    "no longer visible", "no longer visualized", "has cleared", "have cleared", "ruled out", "is excluded",
    "are excluded", "has been removed", "have been removed", "removed", "not observed", "not noted", "not found",
    "not visible", "not shown", "not depicted",
) + tuple(  # "is not well visualized", "was not clearly seen"
    f"not {adverb} {verb}" for adverb in ("well", "clearly", "definitely", "convincingly", "reliably")
    for verb in ("seen", "visualized", "visualised", "identified", "demonstrated", "appreciated", "visible", "observed")
)
_UNC_PRE = (
    "possible", "possibly", "probable", "probably", "likely", "most likely", "questionable", "question of",
    "suspicious for", "suspicious of", "suspected", "suspect", "suggestive of", "suggesting", "suggests",
    "may represent", "may reflect", "may be", "may", "might represent", "might be", "might", "could represent",
    "could reflect", "could be", "can not exclude", "cannot exclude", "can't exclude", "cannot rule out",
    "can not rule out", "not exclude", "differential diagnosis includes", "differential includes",
    "differential diagnosis of", "concern for", "concerning for", "worrisome for", "equivocal", "borderline",
    "indeterminate", "presumed", "presumably", "perhaps", "potential", "raises the possibility of",
    "cannot be excluded", "can not be excluded", "not excluded", "not be excluded", "versus", "vs",
    "may represent early", "question", "uncertain", "unclear", "not certain", "versus early",
)
_UNC_POST = (
    "cannot be excluded", "can not be excluded", "cannot be ruled out", "can not be ruled out", "not excluded",
    "not ruled out", "is not excluded", "is not ruled out", "is possible", "are possible", "is suspected",
    "are suspected", "is questioned", "is likely", "is probable", "is not entirely excluded",
    "not entirely excluded", "is a consideration", "is considered", "is favored", "is favoured",
    "not be excluded", "not be ruled out", "is questionable", "are questionable", "is equivocal",
)
# phrases that look like a cue but are not one ("no change in the effusion" keeps the effusion)
_PSEUDO = (
    "no change", "no interval change", "no significant change", "no significant interval change",
    "not changed", "without change", "without interval change", "no increase", "no decrease",
    "not only", "gram negative", "not significantly changed", "no substantial change", "no appreciable change",
    "not increased", "not decreased", "no longer a concern",
)
_TERMINATORS = (
    "however", "although", "though", "whereas", "while", "yet", "except", "aside from", "apart from",
    "there is", "there are", "there has been", "there have been", "there was", "there were", ", and",
    "which is", "consistent with", "compatible with", "otherwise",
)
_GENERIC_LESION_RE = re.compile(
    r"(?<![a-z0-9])(?:space[\s\-]+occupying|focal)(?:[\s\-]+(?P<middle>[a-z]+))?[\s\-]+lesions?(?![a-z0-9])")
_ALTERNATIVE_RE = re.compile(r"\s*(?:/|and\s*/\s*or)\s*")
# clause boundaries (end every scope, anatomy assignment is per clause)
_STRONG_SPLIT_RE = re.compile(
    r";|(?<![a-z0-9])(?:but|however|whereas|while|although|though|except(?: for)?|with the exception of|"
    r"aside from|apart from)(?![a-z0-9])"
)
# candidate split points between clauses that each name an anatomy and say something about it
_SOFT_SPLIT_RE = re.compile(r",\s*and\s|,\s*|\s+and\s+|\s+with\s+|\s+as well as\s+|\s+along with\s+|\s+plus\s+")

_NORMAL_RE = re.compile(
    r"(?<![a-z0-9])(?:normal(?![\s\-]+(?:position|location|placement|course|positioning))|unremarkable|within normal limits|clear(?![\s\-]+of)|"
    r"no (?:significant |focal |acute |gross )?(?:abnormality|abnormalities|abnormal findings)|patent|"
    # "Trachea and both main bronchi are open.", "Bone structures are natural." (CT-RATE), "angles are sharp"
    r"(?:is|are|was|were)[\s\-]+(?:open|natural|sharp))(?![a-z0-9])"
)
# "not normal", "abnormal", "upper limits of normal" are no normal statements
_NOT_NORMAL_RE = re.compile(r"(?:\bnot|ab|limits? of|limit of)\s*$")
_SIZE_QUALIFIER_RE = re.compile(r"(?<![a-z0-9])(?:size|sizes|sized|caliber|calibre|calibration|diameter|dimensions)(?![a-z0-9])")
_SIZE_FINDING_RE = re.compile(r"megaly|enlarg|dilat|distension|distention|widen|aneurysm|atroph|ectasia")
_STUDY_NORMAL_RE = re.compile(
    r"(?<![a-z0-9])(?:"
    r"(?:no|without)\s+(?:(?:radiographic|ct|imaging)\s+)?(?:evidence\s+(?:of|for)\s+)?(?:any\s+)?"
    r"(?:acute|significant|active)\s+(?:[a-z\-]+\s+){0,2}?"
    r"(?:process|processes|abnormality|abnormalities|disease|findings?|pathology|pathologies)"
    r"|(?:no|without)\s+(?:(?:significant|gross)\s+)?(?:abnormality|abnormalities|abnormal\s+findings)"
    r"|normal\s+(?:study|exam|examination|chest|radiograph|chest\s+radiograph|chest\s+x[\s\-]?ray|"
    r"chest\s+film|ct|ct\s+scan|scan|findings|ct\s+(?:of\s+the\s+)?(?:chest|abdomen)[a-z ]*)"
    r"|unremarkable\s+(?:study|exam|examination|chest\s+radiograph|radiograph|ct|ct\s+scan|scan)"
    r"|(?:study|exam|examination|radiograph|scan|findings)\s+(?:is\s+|are\s+)?(?:normal|unremarkable|negative|within\s+normal\s+limits)"
    r"|negative\s+(?:chest\s+)?(?:study|exam|examination|radiograph|x[\s\-]?ray|film|ct|ct\s+scan|scan)"
    r")(?![a-z0-9])"
)


def _trigger_regex() -> tuple[re.Pattern, dict[str, frozenset[str]]]:
    kinds: dict[str, set[str]] = {}
    # a phrase listed as both pre- and post-cue ("resolved", "cannot be excluded") acts both ways
    for kind, phrases in (("neg_pre", _NEG_PRE), ("neg_post", _NEG_POST), ("unc_post", _UNC_POST),
                          ("unc_pre", _UNC_PRE), ("term", _TERMINATORS), ("pseudo", _PSEUDO)):
        for p in phrases:
            kinds.setdefault(p, set()).add(kind)
    alts = sorted(kinds, key=lambda x: (-len(x), x))
    pat = "|".join(r"[\s\-]+".join(re.escape(w) for w in a.split(" ")) if not a.startswith(",") else r",\s*and" for a in alts)
    return re.compile(r"(?<![a-z0-9])(?=(" + pat + r")(?![a-z0-9]))"), {k: frozenset(v) for k, v in kinds.items()}


_TRIGGER_RE, _TRIGGER_KINDS = _trigger_regex()
_PRE_KINDS = frozenset({"neg_pre", "unc_pre", "pseudo"})
_POST_KINDS = frozenset({"neg_post", "unc_post"})


@dataclass
class _Claim:
    anatomy: int | None  # row, None for a study finding
    finding: str
    value: int


@dataclass
class _SentenceAnalysis:
    text: str
    mentioned: set[int] = field(default_factory=set)
    claims: list[_Claim] = field(default_factory=list)
    normal: dict[int, frozenset[str] | None] = field(default_factory=dict)  # row -> None (all) | size findings
    study_normal: bool = False
    anatomy_spans: list[_Span] = field(default_factory=list)
    finding_spans: list[_Span] = field(default_factory=list)
    triggers: list[_Span] = field(default_factory=list)
    polarity: dict[tuple[int, int], int] = field(default_factory=dict)  # finding span (start, end) -> value
    unplaced: set[str] = field(default_factory=set)  # present findings no catalog anatomy could take ("rib fractures")

    def labels(self) -> dict[tuple[int | None, str], int]:
        out: dict[tuple[int | None, str], int] = {}
        for c in self.claims:
            key = (c.anatomy, c.finding)
            out[key] = _stronger(out.get(key), c.value)
        return out


def _stronger(a: int | None, b: int) -> int:
    """Combine two statements of one finding: present > uncertain > absent."""
    if a is None:
        return b
    order = {PRESENT: 2, UNCERTAIN: 1, ABSENT: 0}
    return a if order[a] >= order[b] else b


# ------------------------------------------------------------------------------------------
# parsed result
# ------------------------------------------------------------------------------------------
@dataclass
class ParsedReport:
    """Result of :func:`parse_report`.

    Attributes:
        anatomies: anatomy name -> ``{"sentences": [str], "findings": {finding: 1 | 0 | -1}}`` for the
            anatomies the report talks about (catalog order; findings in catalog order).
        study_findings: finding -> 1 | 0 | -1 for findings no anatomy owns.
    """

    anatomies: dict[str, dict[str, Any]] = field(default_factory=dict)
    study_findings: dict[str, int] = field(default_factory=dict)

    def findings(self) -> dict[str, dict[str, int]]:
        """anatomy -> finding -> value (anatomies without findings left out)."""
        return {a: dict(v["findings"]) for a, v in self.anatomies.items() if v["findings"]}

    def sentences(self) -> dict[str, list[str]]:
        """anatomy -> its sentences (anatomies without sentences left out)."""
        return {a: list(v["sentences"]) for a, v in self.anatomies.items() if v["sentences"]}

    def to_dict(self) -> dict[str, Any]:
        """The contract's parse-report JSON: ``{"anatomies": {...}, "study_findings": {...}}``."""
        return {
            "anatomies": {
                a: {"sentences": list(v["sentences"]), "findings": dict(v["findings"])} for a, v in self.anatomies.items()
            },
            "study_findings": dict(self.study_findings),
        }


# ------------------------------------------------------------------------------------------
# the parser
# ------------------------------------------------------------------------------------------
class ReportParser:
    """Report parser bound to one catalog (regular expressions compiled once).

    Use :func:`parse_report` / :func:`get_parser` unless you hold the parser yourself (transforms).
    """

    def __init__(self, catalog: Catalog | str):
        self.catalog = catalog = load_catalog(catalog)
        self.names = catalog.names
        self.owned = [frozenset(a.findings) for a in catalog.anatomies]
        self.study = frozenset(catalog.study_findings)
        self.derived = frozenset(f for f in catalog.study_findings if f in DERIVED_STUDY_FINDINGS)
        self.owners: dict[str, tuple[int, ...]] = {}
        for i, a in enumerate(catalog.anatomies):
            for f in a.findings:
                self.owners.setdefault(f, ())
                self.owners[f] += (i,)
        self.size_findings = [
            frozenset(f for f in a.findings if any(_SIZE_FINDING_RE.search(p.lower()) for p in catalog.phrasings(f)))
            for a in catalog.anatomies
        ]

        # anatomy forms: exact (names, synonyms and their plurals) and derived unsided forms
        exact: dict[str, set[int]] = {}
        for i, a in enumerate(catalog.anatomies):
            for form in (a.name, *a.synonyms):
                exact.setdefault(_norm(form), set()).add(i)
        for form, rows in list(exact.items()):
            for p in _plural_variants(form):
                if p not in exact:
                    exact.setdefault(p, set()).update(rows)
        unsided: dict[str, set[int]] = {}
        for i, a in enumerate(catalog.anatomies):
            if not re.match(r"(right|left) ", _norm(a.name)):
                continue
            for form in (a.name, *a.synonyms):
                m = re.match(r"(?:right|left) (.+)$", _norm(form))
                if m and m.group(1) not in ("sided", "side"):
                    unsided.setdefault(m.group(1), set()).add(i)
        always: dict[str, set[int]] = {}
        cue_only: dict[str, set[int]] = {}
        for form, rows in unsided.items():
            for p in _plural_variants(form):
                if p not in exact:
                    always.setdefault(p, set()).update(rows)
            if " " not in form and re.search(r"(ar|al|ic)$", form):
                always.setdefault("bi" + form, set()).update(rows)  # bibasilar, biapical, bihilar
            if form not in exact:
                cue_only.setdefault(form, set()).update(rows)
        self.anat_exact = {k: frozenset(v) for k, v in exact.items()}
        self.anat_always = {k: frozenset(v) for k, v in always.items()}
        self.anat_cue = {k: frozenset(v) for k, v in cue_only.items() if k not in always}
        self.anat_group = {}
        for group_forms, members in _ANATOMY_GROUPS.items():
            rows = frozenset(self.names.index(n) for n in members if n in self.names)
            if rows:
                self.anat_group.update({_norm(f): rows for f in group_forms if _norm(f) not in exact})
        self._anat_exact_re = _form_regex(self.anat_exact)
        self._anat_always_re = _form_regex(self.anat_always)
        self._anat_cue_re = _form_regex(self.anat_cue)
        self._anat_group_re = _form_regex(self.anat_group)

        # finding forms
        forms: dict[str, set[str]] = {}
        all_findings = list(dict.fromkeys([f for a in catalog.anatomies for f in a.findings] + list(catalog.study_findings)))
        for f in all_findings:
            if f in self.derived:
                continue
            for p in catalog.phrasings(f):
                forms.setdefault(_norm(p), set()).add(f)
        for form, fs in list(forms.items()):
            for p in _plural_variants(form) | _derived_adjectives(form):
                if p not in forms:
                    forms.setdefault(p, set()).update(fs)
        self.finding_forms = {k: frozenset(v) for k, v in forms.items()}
        self._finding_re = _form_regex(self.finding_forms)
        # anatomy -> fragment -> its findings with that fragment: the last word(s) ("aortic calcification"
        # -> arterial wall calcification, "wall thickening of the sigmoid colon" -> colonic wall thickening)
        # and the head of "X of the Y" phrasings ("elevation of the left hemidiaphragm")
        self._fragments: list[dict[str, list[str]]] = []
        for a in catalog.anatomies:
            d: dict[str, list[str]] = {}
            for f in a.findings:
                for p in catalog.phrasings(f):
                    words = _norm(p).split(" ")
                    fragments = [" ".join(words[k:]) for k in range(1, len(words))]
                    if "of" in words[1:]:
                        fragments.append(" ".join(words[: words.index("of", 1)]))
                    for frag in fragments:
                        if f not in d.setdefault(frag, []):
                            d[frag].append(f)
            self._fragments.append(d)
        # fragments that are no finding by themselves count only with an anatomy that owns them; single
        # words only as "X of the" heads ("thickening" alone is too vague, "wall thickening" is not)
        weak = {frag for d in self._fragments for frag in d if frag not in self.finding_forms and
                (" " in frag or any(_norm(p).startswith(frag + " of ") for fs in d[frag] for p in catalog.phrasings(fs)))}
        weak |= {p for frag in weak if not re.search(r"\b(?:is|are)\b", frag) for p in _plural_variants(frag)} - set(self.finding_forms)
        anatomy_forms = set(self.anat_exact) | set(self.anat_always) | set(self.anat_cue) | set(self.anat_group)
        weak = {w for w in weak if not any(re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", a) or
                                           re.search(rf"(?<![a-z]){re.escape(a)}(?![a-z])", w) for a in anatomy_forms)}
        self._weak_forms = {k: frozenset() for k in weak}
        self._weak_re = _form_regex(self._weak_forms)

    # ---------------------------------------------------------------- matching
    def _spans(self, pattern: re.Pattern, low: str, table: Mapping[str, frozenset], kind: str, priority: int) -> list[_Span]:
        out = []
        for m in pattern.finditer(low):
            text = m.group(1)
            key, negated = _match_key(text)
            rows = table.get(key)
            if rows is None:
                continue
            out.append(_Span(m.start(), m.start() + len(text), key, kind, rows, negated, priority))
        return out

    def anatomy_mentions(self, sentence: str) -> list[_Span]:
        """Anatomy mentions of a sentence (longest match wins; bilateral cues expand to both sides)."""
        low = _lower(sentence)
        cands = self._spans(self._anat_exact_re, low, self.anat_exact, "anatomy", 2)
        cands += self._spans(self._anat_always_re, low, self.anat_always, "anatomy", 1)
        cues = [m.span() for m in _BILATERAL_CUE_RE.finditer(low)]
        if cues:
            for s in self._spans(self._anat_cue_re, low, self.anat_cue, "anatomy", 0):
                for c0, c1 in cues:
                    gap = low[c1 : s.start] if c1 <= s.start else low[s.end : c0]
                    if ";" not in gap and len(gap.split()) <= 4:
                        cands.append(s)
                        break
        cands += self._spans(self._anat_group_re, low, self.anat_group, "anatomy", 1)
        spans = _select_longest(cands)
        # "the right lobe of the thyroid gland": the part ("lobe", a lung form) belongs to what follows
        spans = [a for a, b in zip(spans, spans[1:] + [None])
                 if b is None or a.rows == b.rows or not re.fullmatch(r"\s+of\s+(?:the\s+)?", low[a.end : b.start])]
        return [replace(a, partial=self._is_partial(a, low)) for a in spans]

    def _is_partial(self, span: _Span, low: str) -> bool:
        """An anatomy named by one of its parts ("main bronchi" for the lung) or by one side of it
        ("left lung" for a catalog's single "lung"): its normal statements are not the anatomy's."""
        names = [_norm(self.names[r]) for r in span.rows]
        last = span.key.split(" ")[-1]
        if last in _PART_WORDS and not any(last in n.split(" ") for n in names):
            return True
        sided = re.search(r"(?:right|left)[\s\-]+$", low[max(0, span.start - 7) : span.start])
        return bool(sided) and not re.match(r"(?:right|left) ", span.key) and not any(re.match(r"(?:right|left) ", n) for n in names)

    def finding_mentions(self, sentence: str, anatomy_spans: list[_Span] | None = None) -> list[_Span]:
        """Finding mentions (longest match wins). Mentions that name no finding by themselves have no
        ``rows``: a fragment of a finding of the anatomy they are said of ("wall thickening"), or a
        generic lesion ("no focal liver lesion", "no space-occupying lesion") that, said absent, makes
        every "... lesion" finding of that anatomy absent (``anatomy_spans``: the sentence's anatomy
        mentions, when already known)."""
        low = _lower(sentence)
        cands = self._spans(self._finding_re, low, self.finding_forms, "finding", 1)
        cands += self._spans(self._weak_re, low, self._weak_forms, "finding", 0)
        anat = self.anatomy_mentions(sentence) if anatomy_spans is None else anatomy_spans
        for m in _GENERIC_LESION_RE.finditer(low):
            middle = m.group("middle")
            if middle and not any(a.start <= m.start("middle") and m.end("middle") <= a.end for a in anat):
                continue  # "focal lytic lesion" is a kind of lesion, not any lesion
            cands.append(_Span(m.start(), m.end(), "lesion", "generic"))
        return _select_longest(cands)

    def _triggers(self, low: str, blocked: list[_Span]) -> list[_Span]:
        cands = []
        for m in _TRIGGER_RE.finditer(low):
            text = m.group(1)
            key = _norm(text) if not text.startswith(",") else ", and"
            kinds = _TRIGGER_KINDS.get(key)
            if kinds is None:
                continue
            kind = "pseudo" if "pseudo" in kinds else "term" if "term" in kinds else "cue"
            s = _Span(m.start(), m.start() + len(text), key, kind, kinds)
            # a cue word inside a finding or anatomy name is part of that name
            if any(s.start < b.end and b.start < s.end for b in blocked):
                continue
            cands.append(s)
        return _select_longest(cands)

    # ---------------------------------------------------------------- clauses
    def _clauses(self, low: str, anat: list[_Span], find: list[_Span], normal_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        bounds = [0]
        for m in _STRONG_SPLIT_RE.finditer(low):
            if not any(m.start() < s.end and s.start < m.end() for s in anat + find):
                bounds += [m.start(), m.end()]
        bounds.append(len(low))
        clauses = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]
        out: list[tuple[int, int]] = []
        for c0, c1 in clauses:
            out.extend(self._soft_split(low, c0, c1, anat, find, normal_spans))
        return [c for c in out if c[1] > c[0]]

    def _soft_split(self, low, c0, c1, anat, find, normal_spans) -> list[tuple[int, int]]:
        """Split "nodule in the right lung and effusion in the left lung" into two clauses."""

        # only anatomies named in their own right count: "No tracheal stenosis, coronary
        # calcification" is one negated list, not two statements about the trachea and the heart
        named = [s for s in anat if not any(f.start <= s.start and s.end <= f.end for f in find)]

        def says_something(a: int, b: int) -> bool:
            has_anat = any(a <= s.start and s.end <= b for s in named)
            has_stmt = any(a <= s.start and s.end <= b for s in find) or any(a <= n0 and n1 <= b for n0, n1 in normal_spans)
            return has_anat and has_stmt

        if not says_something(c0, c1):
            return [(c0, c1)]
        for m in _SOFT_SPLIT_RE.finditer(low, c0, c1):
            if any(m.start() < s.end and s.start < m.end() for s in anat + find):
                continue
            if says_something(c0, m.start()) and says_something(m.end(), c1):
                return [(c0, m.start())] + self._soft_split(low, m.end(), c1, anat, find, normal_spans)
        return [(c0, c1)]

    def _polarity(self, span: _Span, c0: int, c1: int, triggers: list[_Span]) -> int:
        """Value of a finding mention from the nearest cue before it and the nearest cue after it."""
        terms = [t for t in triggers if t.kind == "term"]
        pre = [t for t in triggers if c0 <= t.start and t.end <= span.start and t.rows & _PRE_KINDS]
        pre = [t for t in pre if not any(t.end <= x.start and x.end <= span.start for x in terms)]
        post = [t for t in triggers if span.end <= t.start and t.end <= c1 and t.rows & _POST_KINDS]
        post = [t for t in post if not any(span.end <= x.start and x.end <= t.start for x in terms)]
        kinds = set()
        if pre:
            t = max(pre, key=lambda t: t.end)
            kinds.add("pseudo" if t.kind == "pseudo" else "unc" if "unc_pre" in t.rows else "neg")
        if post:
            t = min(post, key=lambda t: t.start)
            kinds.add("unc" if "unc_post" in t.rows else "neg")
        if span.negated:
            kinds.add("neg")
        if "unc" in kinds:
            return UNCERTAIN
        if "neg" in kinds:
            return ABSENT
        return PRESENT

    # ---------------------------------------------------------------- one sentence
    def analyze(self, sentence: str, forced_anatomy: int | None = None) -> _SentenceAnalysis:
        """Claims of one sentence (``forced_anatomy``: the row the sentence is known to be about)."""
        low = _lower(sentence)
        res = _SentenceAnalysis(text=sentence)
        anat = self.anatomy_mentions(sentence)
        find = self.finding_mentions(sentence, anat)
        triggers = self._triggers(low, anat + find)
        normal_spans = []
        for m in _NORMAL_RE.finditer(low):
            if _NOT_NORMAL_RE.search(low[max(0, m.start() - 12) : m.start()]):
                continue
            if any(m.start() < s.end and s.start < m.end() for s in find):
                continue
            normal_spans.append(m.span())
        res.anatomy_spans, res.finding_spans, res.triggers = anat, find, triggers
        clauses = self._clauses(low, anat, find, normal_spans)
        mentioned: set[int] = set()
        sentence_rows: set[int] = set()  # anatomies named in their own right, not inside a finding's name
        for s in anat:
            mentioned |= s.rows
            if not any(f.start <= s.start and s.end <= f.end for f in find):
                sentence_rows |= s.rows
        if forced_anatomy is not None:
            mentioned = sentence_rows = {forced_anatomy}
        res.mentioned = mentioned

        # a semicolon starts an independent statement: "No consolidation; possible left basilar
        # atelectasis" -- the consolidation is not the left base's only
        cuts = [0] + [m.end() for m in re.finditer(";", low)] + [len(low) + 1]
        part_rows: list[set[int]] = []
        for p0, p1 in zip(cuts[:-1], cuts[1:]):
            rows_p: set[int] = set()
            for s in anat:
                if p0 <= s.start < p1 and not any(f.start <= s.start and s.end <= f.end for f in find):
                    rows_p |= s.rows
            part_rows.append(rows_p if forced_anatomy is None else {forced_anatomy})

        for c0, c1 in clauses:
            local_rows = next(r for (p0, p1), r in zip(zip(cuts[:-1], cuts[1:]), part_rows) if p0 <= c0 < p1)
            c_anat = [s for s in anat if c0 <= s.start and s.end <= c1]
            # an anatomy named only inside a finding ("pericardial effusion") counts when nothing else is named
            explicit = [s for s in c_anat if not any(f.start <= s.start and s.end <= f.end for f in find)]
            rows: set[int] = set()
            normal_spans_of: list[_Span] = []  # anatomies a normal statement of the clause is about
            for s in explicit or c_anat:
                rows |= s.rows
                if not s.partial:
                    normal_spans_of.append(s)
            normal_rows = {r for s in normal_spans_of for r in s.rows}
            if forced_anatomy is not None:
                rows = normal_rows = {forced_anatomy}
            c_find = [s for s in find if c0 <= s.start and s.end <= c1]
            c_text = low[c0:c1]
            # normal statements
            c_normal = [n for n in normal_spans if c0 <= n[0] and n[1] <= c1]
            if c_normal and not any(t.key == "not" and c0 <= t.start < c_normal[0][0]
                                    and c_normal[0][0] - t.end < 3 for t in triggers):
                size_rows = self._size_only_rows(low, c0, c1, c_normal[0][0], normal_spans_of, normal_rows)
                for r in normal_rows:
                    res.normal[r] = self.size_findings[r] if r in size_rows else None
            if not rows and forced_anatomy is None and _STUDY_NORMAL_RE.search(c_text):
                res.study_normal = True
            elif rows and _STUDY_NORMAL_RE.search(c_text) and not c_find:
                for r in normal_rows:
                    res.normal.setdefault(r, None)
            # findings: the anatomies named in the clause; else the one a finding names itself
            # ("No pericardial effusion or emphysema": the heart is the first finding's anatomy only)
            explicit_rows: set[int] = set()
            for s in explicit:
                explicit_rows |= s.rows
            bilateral = bool(_BILATERAL_CUE_RE.search(c_text))
            for s in c_find:
                value = self._polarity(s, c0, c1, triggers)
                # "consolidation/atelectasis", "atelectasis and/or effusion": either one, neither certain
                if value == PRESENT and any(_ALTERNATIVE_RE.fullmatch(low[o.end : s.start] if o.end <= s.start else low[s.end : o.start])
                                            for o in c_find if o is not s):
                    value = UNCERTAIN
                res.polarity[(s.start, s.end)] = value
                if forced_anatomy is not None:
                    f_rows = {forced_anatomy}
                elif explicit_rows:
                    f_rows = explicit_rows
                else:
                    f_rows = set()
                    for a in c_anat:
                        if s.start <= a.start and a.end <= s.end:
                            f_rows |= a.rows
                # "moderate right pneumothorax", "no left hydronephrosis": the side's widest owner
                side = re.search(r"(?<![a-z])(right|left)[\s\-]+$", low[max(0, s.start - 7) : s.start])
                if side and forced_anatomy is None and not any(self.owned[r] & s.rows for r in f_rows):
                    f_rows = {r for f in s.rows for r in self._widest_owner(f, side.group(1))}
                claims = self._assign(s, value, f_rows, local_rows, forced_anatomy is not None, bilateral)
                if not claims and value == PRESENT:
                    res.unplaced |= set(s.rows)
                res.claims.extend(claims)
        return res

    @staticmethod
    def _size_only_rows(low: str, c0: int, c1: int, normal_at: int, spans: list[_Span], rows: set[int]) -> set[int]:
        """Rows a clause's normal statement speaks of in size only. After the normal word ("normal in
        size") a size word qualifies every subject; before it, the anatomy it follows ("Mediastinal
        main vascular structures, heart contour, size are normal": the heart's size, the vessels) and
        the anatomies listed with that one ("Liver and spleen sizes are normal")."""
        out: set[int] = set()
        for m in _SIZE_QUALIFIER_RE.finditer(low, c0, c1):
            if m.start() >= normal_at:
                return set(rows)
            before = sorted((s for s in spans if s.start <= m.start() and len(low[s.end : m.start()].split()) <= 2),
                            key=lambda s: s.start)
            if not before:
                out |= rows
                continue
            out |= before[-1].rows & rows
            if not low[before[-1].end : m.start()].strip():  # "liver and spleen sizes": the whole list
                chain = [s for s in spans if s.end <= before[-1].start]
                last = before[-1]
                for prev in sorted(chain, key=lambda s: -s.start):
                    if not re.fullmatch(r"\s*(?:,|and|,\s*and)\s*", low[prev.end : last.start]):
                        break
                    out |= prev.rows & rows
                    last = prev
        return out

    def _assign(self, span: _Span, value: int, rows: set[int], sentence_rows: set[int], forced: bool,
                bilateral: bool = False) -> list[_Claim]:
        fset = span.rows
        if span.kind == "generic":
            if value != ABSENT:
                return []
            return [_Claim(r, f, value) for r in sorted(rows) for f in self.owned[r] if f.endswith(span.key)]
        if rows:
            claims = [_Claim(r, f, value) for r in sorted(rows) for f in sorted(fset) if f in self.owned[r]]
            if not claims:
                for r in sorted(rows):
                    # by the words written, else by the finding they name ("calcified" -> calcification)
                    cands = self._fragments[r].get(span.key) or sorted({c for f in fset for c in self._fragments[r].get(f, [])})
                    if len(cands) == 1:
                        claims.append(_Claim(r, cands[0], value))
            if claims:
                return claims
            return [_Claim(None, f, value) for f in sorted(fset & self.study)]
        study = sorted(fset & self.study)
        if study:
            return [_Claim(None, f, value) for f in study]
        if forced:
            return []
        # a clause without an anatomy: the anatomies named elsewhere in the sentence that own the finding
        # ("opacity in the right lung but no effusion"); else an absent finding is absent wherever it
        # can be ("No pneumothorax.") and a present one goes to its only owner ("Cardiomegaly.")
        claims = [_Claim(r, f, value) for r in sorted(sentence_rows) for f in sorted(fset) if f in self.owned[r]]
        if claims:
            return claims
        if value == ABSENT:
            return [_Claim(r, f, value) for f in sorted(fset) for r in self.owners.get(f, ())]
        owners = {(r, f) for f in fset for r in self.owners.get(f, ())}
        if len(owners) == 1:
            r, f = owners.pop()
            return [_Claim(r, f, value)]
        if bilateral:  # "diffuse bilateral airspace opacities": both sides of the widest owner
            return [_Claim(r, f, value) for f in sorted(fset) for r in self._widest_pair(f)]
        return []

    def _widest_owner(self, finding: str, side: str) -> tuple[int, ...]:
        """The owner ``<side> X`` of a finding with the shortest X, or () when none is sided so."""
        owners = [r for r in self.owners.get(finding, ()) if _norm(self.names[r]).startswith(side + " ")]
        return (min(owners, key=lambda r: len(self.names[r])),) if owners else ()

    def _widest_pair(self, finding: str) -> tuple[int, ...]:
        """The owners ``right X`` and ``left X`` of a finding with the shortest X (``right lung`` before
        ``right lower lung zone``), or () when no such pair owns it."""
        sides: dict[str, dict[str, int]] = {}
        for r in self.owners.get(finding, ()):
            m = re.match(r"(right|left) (.+)$", _norm(self.names[r]))
            if m:
                sides.setdefault(m.group(2), {})[m.group(1)] = r
        pairs = sorted((len(rest), rest) for rest, d in sides.items() if len(d) == 2)
        return tuple(sorted(sides[pairs[0][1]].values())) if pairs else ()

    # ---------------------------------------------------------------- whole report
    def parse(self, text: str) -> ParsedReport:
        """Parse a free-text report (see the module docstring for the rules)."""
        return self._aggregate([(s, self.analyze(s)) for s in split_sentences(text or "")])

    def parse_anatomy_sentences(self, anatomy_sentences: Mapping[str, Sequence[str]]) -> ParsedReport:
        """Labels from sentences already assigned to anatomies (each sentence is about its anatomy)."""
        items = []
        for name, sents in anatomy_sentences.items():
            row = self.catalog.index(name)
            for s in sents or []:
                items.append((s, self.analyze(s, forced_anatomy=row)))
        return self._aggregate(items)

    def _aggregate(self, items: list[tuple[str, _SentenceAnalysis]]) -> ParsedReport:
        M = len(self.names)
        explicit: dict[tuple[int | None, str], int] = {}
        normal: dict[int, frozenset[str] | None] = {}
        study_normal = unplaced_present = False
        sentences: list[list[str]] = [[] for _ in range(M)]
        for text, res in items:
            for key, v in res.labels().items():
                explicit[key] = _stronger(explicit.get(key), v)
            for r, subset in res.normal.items():
                if r in normal and (normal[r] is None or subset is None):
                    normal[r] = None
                else:
                    normal[r] = (normal.get(r) or frozenset()) | (subset or frozenset()) if subset is not None else None
            study_normal |= res.study_normal
            unplaced_present |= any(not _DEVICE_RE.search(f) for f in res.unplaced)
            about = set(res.mentioned) | {c.anatomy for c in res.claims if c.anatomy is not None} | set(res.normal)
            for r in sorted(about):
                if text not in sentences[r]:
                    sentences[r].append(text)
        out = ParsedReport()
        any_present = unplaced_present or any(v == PRESENT and not _DEVICE_RE.search(f) for (_, f), v in explicit.items())
        for r, a in enumerate(self.catalog.anatomies):
            fd: dict[str, int] = {}
            for f in a.findings:
                if (r, f) in explicit:
                    fd[f] = explicit[(r, f)]
                elif study_normal or (r in normal and (normal[r] is None or f in normal[r])):
                    fd[f] = ABSENT
            if fd or sentences[r]:
                out.anatomies[a.name] = {"sentences": sentences[r], "findings": fd}
        for f in self.catalog.study_findings:
            if f in self.derived:
                if any_present:
                    out.study_findings[f] = ABSENT
                elif study_normal:
                    out.study_findings[f] = PRESENT
            elif (None, f) in explicit:
                out.study_findings[f] = explicit[(None, f)]
            elif study_normal:
                out.study_findings[f] = ABSENT
        return out


def _catalog_key(catalog: Catalog) -> str:
    return json.dumps(catalog.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=16)
def _parser_for_key(key: str) -> ReportParser:
    return ReportParser(Catalog.from_dict(json.loads(key), source="<cached>"))


def get_parser(catalog: Catalog | str) -> ReportParser:
    """The (cached) parser of a catalog (a :class:`Catalog`, a built-in name or a ``.json`` path)."""
    catalog = load_catalog(catalog)
    parser = _parser_for_key(_catalog_key(catalog))
    return parser


def parse_report(text: str, catalog: Catalog | str) -> ParsedReport:
    """Parse a free-text report into per-anatomy sentences and finding labels.

    Args:
        text: the report (may hold ``FINDINGS:`` / ``IMPRESSION:`` sections, lists, wrapped lines).
        catalog: the catalog whose anatomy names, synonyms and findings are matched.

    Returns:
        :class:`ParsedReport`; ``to_dict()`` is the contract's parse-report JSON. Findings that
        the report never mentions are left out (unknown), never set to 0.
    """
    return get_parser(catalog).parse(text)


def parse_anatomy_sentences(anatomy_sentences: Mapping[str, Sequence[str]], catalog: Catalog | str) -> ParsedReport:
    """Finding labels from per-anatomy sentences (``anatomy_sentences`` of a record)."""
    return get_parser(catalog).parse_anatomy_sentences(anatomy_sentences)


# ------------------------------------------------------------------------------------------
# merging with structured labels, and the MONAI transform
# ------------------------------------------------------------------------------------------
def _parsed_parts(parsed: ParsedReport | Mapping | None) -> tuple[dict, dict, dict]:
    if parsed is None:
        return {}, {}, {}
    if isinstance(parsed, ParsedReport):
        parsed = parsed.to_dict()
    anat = parsed.get("anatomies", {}) or {}
    findings = {a: dict(v.get("findings", {}) or {}) for a, v in anat.items()}
    sentences = {a: list(v.get("sentences", []) or []) for a, v in anat.items()}
    return findings, dict(parsed.get("study_findings", {}) or {}), sentences


def merge_labels(parsed: ParsedReport | Mapping | None, record: Mapping[str, Any]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Parsed labels overridden by the record's structured labels, per (anatomy, finding).

    Args:
        parsed: a :class:`ParsedReport` (or its ``to_dict()``), or None when there is no text.
        record: a datalist record with optional ``findings`` (anatomy -> finding -> 1 | 0 | -1) and
            ``study_findings`` (finding -> 1 | 0 | -1).

    Returns:
        ``(findings, study_findings)``: anatomy -> finding -> value, finding -> value.
    """
    findings, study, _ = _parsed_parts(parsed)
    findings = {a: v for a, v in findings.items() if v}
    for a, fd in (record.get("findings") or {}).items():
        for f, v in (fd or {}).items():
            findings.setdefault(a, {})[f] = int(v)
    for f, v in (record.get("study_findings") or {}).items():
        study[f] = int(v)
    return findings, study


def merge_sentences(parsed: ParsedReport | Mapping | None, record: Mapping[str, Any]) -> dict[str, list[str]]:
    """Per-anatomy sentences: the record's ``anatomy_sentences`` win over the parsed ones, per anatomy."""
    _, _, sentences = _parsed_parts(parsed)
    out = {a: s for a, s in sentences.items() if s}
    for a, s in (record.get("anatomy_sentences") or {}).items():
        if isinstance(s, str):
            s = [s]
        out[a] = [str(x) for x in (s or [])]
    return out


def _combine(a: ParsedReport, b: ParsedReport) -> ParsedReport:
    """Union of two parses (sentences concatenated, labels by present > uncertain > absent)."""
    out = ParsedReport(anatomies={k: {"sentences": list(v["sentences"]), "findings": dict(v["findings"])} for k, v in a.anatomies.items()},
                       study_findings=dict(a.study_findings))
    for name, v in b.anatomies.items():
        slot = out.anatomies.setdefault(name, {"sentences": [], "findings": {}})
        slot["sentences"] += [s for s in v["sentences"] if s not in slot["sentences"]]
        for f, val in v["findings"].items():
            slot["findings"][f] = _stronger(slot["findings"].get(f), val)
    for f, val in b.study_findings.items():
        out.study_findings[f] = _stronger(out.study_findings.get(f), val)
    return out


_VALID_CODES = (PRESENT, ABSENT, UNCERTAIN)


class ParseReportd(MapTransform):
    """Report and structured labels of a record -> label tensors and per-anatomy sentences.

    Reads the record's ``report`` (free text), ``anatomy_sentences``, ``findings`` and
    ``study_findings`` (all optional). Labels parsed from the text are overridden by the record's
    structured labels per (anatomy, finding); the record's ``anatomy_sentences`` override the
    sentences assigned from the report per anatomy (and are parsed for labels too, each sentence
    taken to be about its anatomy).

    Adds to the record:
        ``findings``: float32 tensor (M, F), M = number of anatomies, F = ``catalog.max_findings``;
            row i is anatomy i, column j its j-th finding in catalog order; values PRESENT 1,
            ABSENT 0, UNCERTAIN -1 (or ``uncertain_as``), UNKNOWN -2 (also padding past an
            anatomy's own findings).
        ``study_findings``: float32 tensor (S,), S = number of study findings, same codes.
        ``sentences``: list of M lists of strings (empty list for an anatomy without sentences).
        ``findings_raw`` / ``study_findings_raw``: the record's structured labels as given (when given).

    Args:
        catalog: a :class:`Catalog`, a built-in name or a catalog ``.json`` path.
        uncertain_as: None keeps UNCERTAIN (-1); 0 or 1 maps uncertain findings to that value.
        keys: key of the report text (default ``"report"``).
        allow_missing_keys: a record without a report is fine (labels and sentences may still come
            from the structured fields).
    """

    def __init__(self, catalog: Catalog | str, uncertain_as: int | None = None, keys: KeysCollection = "report",
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        if uncertain_as not in (None, 0, 1):
            raise ValueError(f"ParseReportd: uncertain_as must be None, 0 or 1, got {uncertain_as!r}")
        self.catalog = load_catalog(catalog)
        self.parser = get_parser(self.catalog)
        self.uncertain_as = uncertain_as

    def _check(self, rid: str, findings: Any, study: Any, sentences: Any) -> None:
        cat = self.catalog
        if findings is not None:
            if not isinstance(findings, Mapping):
                raise ValueError(f"record {rid!r}: 'findings' must be an object anatomy -> finding -> value, got {type(findings).__name__}")
            for a, fd in findings.items():
                if a not in cat.names:
                    raise ValueError(f"record {rid!r}: 'findings' names anatomy {a!r}, which catalog {cat.name!r} does not have")
                if not isinstance(fd, Mapping):
                    raise ValueError(f"record {rid!r}: 'findings'[{a!r}] must be an object finding -> value")
                own = cat.anatomy(a).findings
                for f, v in fd.items():
                    if f not in own:
                        raise ValueError(f"record {rid!r}: 'findings'[{a!r}] has finding {f!r}, which is not one of {a!r}'s findings {list(own)}")
                    if isinstance(v, bool) or v not in _VALID_CODES:
                        raise ValueError(f"record {rid!r}: 'findings'[{a!r}][{f!r}] must be 1, 0 or -1, got {v!r}")
        if study is not None:
            if not isinstance(study, Mapping):
                raise ValueError(f"record {rid!r}: 'study_findings' must be an object finding -> value")
            for f, v in study.items():
                if f not in cat.study_findings:
                    raise ValueError(f"record {rid!r}: 'study_findings' has {f!r}, which is not a study finding of catalog {cat.name!r} {list(cat.study_findings)}")
                if isinstance(v, bool) or v not in _VALID_CODES:
                    raise ValueError(f"record {rid!r}: 'study_findings'[{f!r}] must be 1, 0 or -1, got {v!r}")
        if sentences is not None:
            if not isinstance(sentences, Mapping):
                raise ValueError(f"record {rid!r}: 'anatomy_sentences' must be an object anatomy -> list of sentences")
            for a in sentences:
                if a not in cat.names:
                    raise ValueError(f"record {rid!r}: 'anatomy_sentences' names anatomy {a!r}, which catalog {cat.name!r} does not have")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        rid = str(d.get("id", "<record without id>"))
        # structured labels as given (a second pass keeps reading the raw ones)
        raw_f = d.get("findings_raw", d.get("findings"))
        raw_s = d.get("study_findings_raw", d.get("study_findings"))
        if isinstance(raw_f, torch.Tensor):
            raw_f = None
        if isinstance(raw_s, torch.Tensor):
            raw_s = None
        sent = d.get("anatomy_sentences")
        self._check(rid, raw_f, raw_s, sent)
        reports = [d[k] for k in self.key_iterator(d)]
        parsed = ParsedReport()
        for text in reports:
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"record {rid!r}: the report must be a string, got {type(text).__name__}")
            parsed = _combine(parsed, self.parser.parse(text))
        if sent:
            parsed = _combine(parsed, self.parser.parse_anatomy_sentences(
                {a: ([s] if isinstance(s, str) else list(s or [])) for a, s in sent.items()}))
        record = {"findings": raw_f or {}, "study_findings": raw_s or {}, "anatomy_sentences": sent or {}}
        findings, study = merge_labels(parsed, record)
        sentences = merge_sentences(parsed, record)

        cat = self.catalog
        M, F, S = cat.num_anatomies, cat.max_findings, len(cat.study_findings)
        ft = np.full((M, F), UNKNOWN, dtype=np.float32)
        for i, a in enumerate(cat.anatomies):
            fd = findings.get(a.name, {})
            for j, f in enumerate(a.findings):
                if f in fd:
                    ft[i, j] = self._code(fd[f])
        st = np.full((S,), UNKNOWN, dtype=np.float32)
        for j, f in enumerate(cat.study_findings):
            if f in study:
                st[j] = self._code(study[f])
        if raw_f is not None:
            d["findings_raw"] = raw_f
        if raw_s is not None:
            d["study_findings_raw"] = raw_s
        d["findings"] = torch.from_numpy(ft)
        d["study_findings"] = torch.from_numpy(st)
        d["sentences"] = [list(sentences.get(a, [])) for a in cat.names]
        return d

    def _code(self, v: int) -> float:
        if v == UNCERTAIN and self.uncertain_as is not None:
            return float(self.uncertain_as)
        return float(v)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def parse_report_command(catalog: str, text: str) -> None:
    """Parse a report and print the contract's parse-report JSON.

    Args:
        catalog: a built-in catalog name (``ct_totalseg``, ``cxr_imagenome29``, ...) or a path to a
            catalog ``.json``.
        text: the report text.
    """
    try:
        cat = load_catalog(str(catalog))
    except CatalogError as e:
        raise SystemExit(f"parse-report: {e}") from None
    print(json.dumps(parse_report(str(text), cat).to_dict(), indent=1))


# ------------------------------------------------------------------------------------------
# hard negatives: negation and perturbation of sentences
# ------------------------------------------------------------------------------------------
_UNNEGATE_PRE = {
    "no": "", "there is no": "there is", "there are no": "there are", "no evidence of": "evidence of",
    "no evidence for": "evidence of", "without": "with", "free of": "with", "negative for": "positive for",
    "absence of": "presence of", "no sign of": "signs of", "no signs of": "signs of", "no findings of": "findings of",
    "no definite": "definite", "no convincing": "convincing", "no new": "new", "without evidence of": "with",
    "no radiographic evidence of": "radiographic evidence of", "resolution of": "persistent",
    "interval resolution of": "persistent", "resolved": "persistent", "not": "", "absent": "present",
    "clear of": "with",
}
_UNNEGATE_POST = {
    "is not seen": "is seen", "are not seen": "are seen", "not seen": "seen", "not identified": "identified",
    "not present": "present", "not visualized": "visualized", "not appreciated": "appreciated",
    "not detected": "detected", "not evident": "evident", "not demonstrated": "demonstrated",
    "is absent": "is present", "are absent": "are present", "absent": "present", "has resolved": "persists",
    "have resolved": "persist", "resolved": "persistent", "no longer seen": "still seen",
    "no longer present": "still present", "no longer visible": "still visible", "has cleared": "persists",
    "ruled out": "confirmed", "is excluded": "is confirmed",
}
_COUNTABLE = {"nodule", "lesion", "cyst", "stone", "mass", "focus", "fracture", "hernia", "aneurysm", "granuloma",
              "opacity", "effusion", "pneumothorax", "line", "tube", "catheter", "stent", "lead", "device", "calculus"}


def _case_like(new: str, old: str) -> str:
    if old[:1].isupper() and new:
        return new[:1].upper() + new[1:]
    return new


def _article(word: str) -> str:
    w = word.lower()
    if re.match(r"(8|11|18|8\d)(\b|\d{2}\b)", w) or (w[:1] in "aeiou" and not w.startswith(("uni", "use", "eu"))):
        return "an"
    return "a"


def _finish(s: str) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s+([.,;:])", r"\1", s)
    return s[:1].upper() + s[1:] if s else s


def negate_sentence(sentence: str, catalog: Catalog | str) -> str | None:
    """The sentence with its findings' polarity flipped, or None when that cannot be done reliably.

    ``"There is a nodule in the right lung."`` -> ``"There is no nodule in the right lung."`` and back.
    Sentences without a finding, with an uncertain finding or with findings of mixed polarity give
    None. The result is checked with the parser: every (anatomy, finding) of the sentence must come
    back with the opposite value, else None.
    """
    parser = get_parser(catalog)
    res = parser.analyze(sentence)
    labels = res.labels()
    if not labels or any(v == UNCERTAIN for v in labels.values()):
        return None
    values = set(labels.values())
    if len(values) != 1:
        return None
    want = {k: (ABSENT if v == PRESENT else PRESENT) for k, v in labels.items()}
    candidates = []
    if values == {ABSENT}:
        candidates = _unnegate_candidates(sentence, res)
    else:
        candidates = _negate_candidates(sentence, res)
    for cand in candidates:
        if parser.analyze(cand).labels() == want:
            return cand
    return None


def _negate_candidates(sentence: str, res: _SentenceAnalysis) -> list[str]:
    first = min(res.finding_spans, key=lambda s: s.start)
    out = []
    s = sentence
    m = re.search(r"\b(there (?:is|are))\s+(?:(?:a|an|some)\s+)?", s, re.I)
    if m and m.end() <= first.start + 1:
        out.append(_finish(s[: m.start()] + _case_like(m.group(1) + " no ", m.group(1)) + s[m.end():]))
    m = re.search(r"\b(shows?|demonstrates?|contains?|has|have|reveals?)\s+(?:(?:a|an|some)\s+)?", s, re.I)
    if m and m.end() <= first.start + 1:
        out.append(_finish(s[: m.start()] + m.group(1) + " no " + s[m.end():]))
    m = re.search(r"\b(is|are)\s+(seen|noted|present|identified|visible|demonstrated|evident|observed)\b", s, re.I)
    if m and m.start() >= first.end:
        out.append(_finish(s[: m.start()] + m.group(1) + " not " + s[m.end(1) + 1 :]))
    m = re.search(r"\bwith\s+(?:(?:a|an)\s+)?", s, re.I)
    if m and m.end() <= first.start + 1:
        out.append(_finish(s[: m.start()] + "without " + s[m.end():]))
    # finding written as "X is Y": insert "not"
    if " is " in first.key or " are " in first.key:
        seg = s[first.start : first.end]
        mm = re.search(r"\b(is|are)\b", seg)
        if mm:
            out.append(_finish(s[: first.start + mm.end()] + " not" + s[first.start + mm.end():]))
    # "The right hemidiaphragm is elevated." -> "... is not elevated."
    before = list(re.finditer(r"\b(is|are)\s+", s[: first.start], re.I))
    if before and not re.search(r"\b(there)\s*$", s[: before[-1].start()], re.I):
        m = before[-1]
        out.append(_finish(s[: m.end()] + "not " + s[m.end():]))
    if not re.match(r"\s*(the|there)\b", s, re.I):
        out.append(_finish("No " + s[:1].lower() + s[1:]))
    return out


def _unnegate_candidates(sentence: str, res: _SentenceAnalysis) -> list[str]:
    out = []
    negs = [t for t in res.triggers if t.rows & {"neg_pre", "neg_post"}]
    first = min(res.finding_spans, key=lambda s: s.start)
    for t in negs:
        text = sentence[t.start : t.end]
        if t.end <= first.start and t.key in _UNNEGATE_PRE:
            repl = _UNNEGATE_PRE[t.key]
            before = sentence[: t.start]
            after = sentence[t.end :].lstrip()
            m = re.search(r"\b(is|are)\s*$", before, re.I)
            if m and t.key in ("without", "free of", "without evidence of", "clear of"):
                # "The lung is without consolidation" -> "The lung shows consolidation"
                verb = "shows" if m.group(1).lower() == "is" else "show"
                out.append(_finish(before[: m.start()] + verb + " " + after))
                continue
            if repl == "" and re.search(r"\b(is|shows?|demonstrates?|contains?|has|reveals?|with)\s*$", before, re.I) \
                    and first.key.split(" ")[-1] in _COUNTABLE:
                repl = _article(after.split(" ")[0] if after else "x")
            if repl in ("there is",) and first.key.split(" ")[-1] in _COUNTABLE:
                repl = "there is " + _article(after.split(" ")[0] if after else "x")
            out.append(_finish(before + _case_like(repl, text) + (" " if repl else "") + after))
        elif t.start >= first.end and t.key in _UNNEGATE_POST:
            out.append(_finish(sentence[: t.start] + _UNNEGATE_POST[t.key] + sentence[t.end :]))
    if first.negated:
        seg = sentence[first.start : first.end]
        fixed = re.sub(r"\b(is|are)\s+(?:not|no\s+longer)\b", r"\1", seg, flags=re.I)
        out.append(_finish(sentence[: first.start] + fixed + sentence[first.end :]))
    return out


def perturb_sentence(sentence: str, catalog: Catalog | str, rng: np.random.Generator) -> str | None:
    """A sentence that means something else: another finding, the other side or another anatomy.

    Tries, in random order: replacing a finding by another finding of the same anatomy, swapping
    right and left, replacing an anatomy by another catalog anatomy (one that owns the finding).
    For a sentence that names an anatomy but no finding (``"The liver is normal."``) a finding
    sentence about that anatomy is made instead. The result is checked with the parser: it must
    carry labels and differ from the original's; None when nothing works.
    """
    parser = get_parser(catalog)
    cat = parser.catalog
    res = parser.analyze(sentence)
    old = res.labels()
    old_normal = dict(res.normal)
    ops = ["finding", "side", "anatomy"]
    rng.shuffle(ops)
    for op in ops:
        for cand in _perturb_candidates(op, sentence, res, parser, rng):
            new = parser.analyze(cand)
            if (new.labels() or new.normal) and (new.labels() != old or new.normal != old_normal):
                return cand
    if not res.finding_spans and res.mentioned:
        rows = sorted(res.mentioned)
        r = rows[int(rng.integers(len(rows)))]
        a = cat.anatomies[r]
        if a.findings:
            f = a.findings[int(rng.integers(len(a.findings)))]
            cand = f"There is {f} in the {a.name}."
            if parser.analyze(cand).labels().get((r, f)) == PRESENT:
                return cand
    return None


def _perturb_candidates(op: str, sentence: str, res: _SentenceAnalysis, parser: ReportParser, rng) -> list[str]:
    cat = parser.catalog
    out: list[str] = []
    if op == "side":
        if re.search(r"\b(right|left)\b", sentence, re.I):
            swap = {"right": "left", "left": "right", "Right": "Left", "Left": "Right", "RIGHT": "LEFT", "LEFT": "RIGHT"}
            out.append(re.sub(r"\b(right|left|Right|Left|RIGHT|LEFT)\b", lambda m: swap[m.group(1)], sentence))
        return out
    # findings written as a clause ("heart is enlarged") carry their anatomy: not swapped
    # and nor are state words ("is elevated" would become "is effusion")
    spans = [s for s in res.finding_spans
             if not re.search(r"\b(is|are)\b", s.key) and not re.fullmatch(r"[a-z]+(ed|ous|tic)", s.key)]
    if op == "finding" and spans:
        span = spans[int(rng.integers(len(spans)))]
        rows = {c.anatomy for c in res.claims if c.anatomy is not None}
        named = {c.finding for c in res.claims} | set(span.rows)
        pool = sorted({f for r in rows for f in cat.anatomies[r].findings} - named) if rows else \
            sorted(set(cat.study_findings) - named - parser.derived)
        rng.shuffle(pool)
        for f in pool[:6]:
            phr = cat.phrasings(f)
            p = phr[int(rng.integers(len(phr)))]
            out.append(sentence[: span.start] + _case_like(p, sentence[span.start : span.end]) + sentence[span.end :])
        return out
    if op == "anatomy" and res.anatomy_spans:
        span = res.anatomy_spans[int(rng.integers(len(res.anatomy_spans)))]
        findings = {c.finding for c in res.claims}
        others = [i for i in range(cat.num_anatomies) if i not in span.rows
                  and (not findings or findings & set(cat.anatomies[i].findings))]
        rng.shuffle(others)
        for i in others[:6]:
            out.append(sentence[: span.start] + _case_like(cat.anatomies[i].name, sentence[span.start : span.end]) + sentence[span.end :])
    return out
