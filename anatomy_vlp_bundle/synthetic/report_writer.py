"""Free-text radiology reports for synthetic studies, written from structured findings.

Interface used by the synthetic generators (``synthetic/ct.py``, ``synthetic/cxr.py``):

    report, anatomy_sentences = write_report(catalog, findings, rng, study_findings=..., details=...)

The phrasing varies so that a text encoder sees realistic variety and the report parser
(``text/reports.py``) is exercised on more than one template: FINDINGS / IMPRESSION sections
(sometimes after dropped INDICATION / COMPARISON sections, sometimes as numbered lists or wrapped
lines), several sentence patterns, anatomy synonyms (nouns and adjectives: "hepatic", "right
renal"), the catalog's finding synonyms, negations in several forms ("No X.", "without X", "free
of X", "negative for X", "X is not seen"), grouped negatives ("No X or Y."), normal statements
("The spleen is unremarkable.", "The liver, spleen and pancreas are normal."), "otherwise
unremarkable", uncertain findings ("Possible X", "X cannot be excluded"), sizes from ``details``, a
whole-study normal statement when nothing is positive, and shuffled sentence order.

Every sentence is read back with the report parser before it is used: it must give exactly the
labels it was written for (its anatomy's findings, nothing about another anatomy). A pattern that
reads wrongly is replaced by another; :data:`WRITER_STATS` counts those retries and the rare
fallbacks to a plain sentence, so tests can check that the templates themselves are sound.

Semantics of what is written (so that parsing the report gives back the labels):
- a finding given as 1 / -1 is always stated (as present / uncertain);
- a finding given as 0 is stated as absent, or covered by a normal statement (only when every
  other finding of that anatomy is given as 0), or left out (unknown);
- a whole-study normal statement ("No acute abnormality.") is written only when no finding other
  than a device is present or uncertain; it implies 0 for every finding the report does not state.
"""

from __future__ import annotations

import functools
import json
import re
import textwrap
from collections import Counter
from typing import Mapping

import numpy as np

from ..data.catalog import Catalog
from ..data.labels import ABSENT, PRESENT, UNCERTAIN

__all__ = ["write_report", "WRITER_STATS"]

#: Counters over all reports written in this process: sentences, retries, fallbacks, dropped.
WRITER_STATS: Counter = Counter()

_DEVICE_RE = re.compile(r"\b(device|devices|tube|tubes|line|lines|catheter|material|lead|leads|clip|clips|stent|pacemaker)\b")
_COUNTABLE = {"nodule", "lesion", "cyst", "stone", "mass", "focus", "fracture", "hernia", "aneurysm", "granuloma",
              "opacity", "effusion", "pneumothorax", "line", "tube", "catheter", "stent", "lead", "device", "calculus",
              "ett", "picc", "gallstone", "polyp", "hematoma", "abscess"}
_ADJECTIVE_END = ("ic", "al", "ar", "ary", "ous", "eal", "ed", "iac")
# synonyms that help parsing but make odd sentence subjects ("bronchiectasis in the pleura")
_AWKWARD_NOUNS = re.compile(r"\bsize\b|^(lobe|lobes|osseous|pleura|bronchi|airways|lung parenchyma)$")
_PLURAL_WORDS = {"vertebrae", "bronchi", "hila", "calculi", "apices", "lines and tubes"}

# ----------------------------------------------------------------------------- templates
# fields: {a}/{A} anatomy noun, {f}/{F} finding phrase, {art} article + space (countable, singular),
# {is} verb agreeing with the finding, {a_is}/{shows}/{appears} agreeing with the anatomy,
# {adj}/{Adj} anatomy adjective, {d} detail, {art_d} article for the detail, {fs} grouped findings
_POS = (
    "There {is} {art}{f} in the {a}.",
    "The {a} {shows} {art}{f}.",
    "The {a} {demonstrates} {art}{f}.",
    "{F} {is} seen in the {a}.",
    "{F} {is} noted in the {a}.",
    "{F} {is} present in the {a}.",
    "{F} involving the {a}.",
    "In the {a}, there {is} {art}{f}.",
    "{A}: {f}.",
    "{F} in the {a}.",
    "{F} of the {a} {is} noted.",
)
_POS_ADJ = ("{Adj} {f}.", "There {is} {art_adj}{adj} {f}.", "{Adj} {f} {is} noted.")
_POS_DETAIL = (
    "There {is} {art_d}{d} {f} in the {a}.",
    "The {a} {contains} {art_d}{d} {f}.",
    "{A}: {d} {f}.",
    "{art_D}{d} {f} {is} seen in the {a}.",
)
_POS_SIZE = ("{F} in the {a}, measuring {d}.", "{F} measuring {d} in the {a}.", "There {is} {art}{f} in the {a} measuring {d}.")
_POS_STATE = ("The {a} {a_is} {f}.", "The {a} {a_is} mildly {f}.", "{A}: {f}.")  # "elevated", "tortuous"
_POS_CLAUSE = ("The {f}.", "The {f_mild}.")  # "heart is enlarged"
_POS_OWN = ("{F}.", "There {is} {art}{f}.", "{F} {is} noted.", "{F} {is} present.", "Mild {f}.")  # "fatty liver"
_POS_TWO = ("The {a} {shows} {f} and {g}.", "{F} and {g} in the {a}.", "There {is} {f} and {g} in the {a}.")
_POS_NEG = (
    "{F} in the {a} without {g}.",
    "There {is} {art}{f} in the {a} but no {g}.",
    "The {a} {shows} {art}{f}, without {g}.",
)
_UNC = (
    "Possible {f} in the {a}.",
    "Questionable {f} in the {a}.",
    "{F} in the {a} cannot be excluded.",
    "Findings in the {a} may represent {f}.",
    "There {is} likely {f} in the {a}.",
    "Suspected {f} in the {a}.",
    "The {a} {shows} findings suggestive of {f}.",
    "Probable {f} in the {a}.",
    "Cannot exclude {f} in the {a}.",
)
_UNC_OWN = ("Possible {f}.", "{F} cannot be excluded.", "Questionable {f}.", "Probable {f}.")
_NEG = (
    "No {f} in the {a}.",
    "No {f} is seen in the {a}.",
    "There is no {f} in the {a}.",
    "The {a} {shows} no {f}.",
    "The {a} {a_is} without {f}.",
    "The {a} {a_is} free of {f}.",
    "The {a} {a_is} negative for {f}.",
    "No evidence of {f} in the {a}.",
    "{A}: no {f}.",
    "{F} {is} not seen in the {a}.",
    "Without evidence of {f} in the {a}.",
    "Negative for {f} in the {a}.",
)
_NEG_ADJ = ("No {adj} {f}.", "There is no {adj} {f}.")
_NEG_STATE = ("The {a} {a_is} not {f}.",)
_NEG_CLAUSE = ("The {f_not}.",)
_NEG_GROUP = (
    "No {fs} in the {a}.",
    "The {a} {shows} no {fs}.",
    "There is no {fs} in the {a}.",
    "{A}: no {fs}.",
    "The {a} {a_is} without {fs}.",
    "No evidence of {fs} in the {a}.",
    "The {a} {a_is} negative for {fs}.",
)
_NEG_GLOBAL = ("No {fs}.", "There is no {fs}.", "No evidence of {fs}.", "Negative for {fs}.", "Without {fs}.", "Free of {fs}.")
_NORMAL = (
    "The {a} {a_is} normal.",
    "The {a} {a_is} unremarkable.",
    "Normal {a}.",
    "The {a} {appears} normal.",
    "Unremarkable {a}.",
    "{A}: unremarkable.",
    "{A}: normal.",
    "The {a} {a_is} within normal limits.",
    "The {a} {a_is} normal in appearance.",
)
_NORMAL_LUNG = ("The {a} {a_is} clear.",)
_NORMAL_GROUP = ("The {as} are unremarkable.", "The {as} are normal.", "{As}: unremarkable.", "Normal {as}.")
_OTHERWISE = ("The {a} {a_is} otherwise unremarkable.", "The {a} {a_is} otherwise normal.", "Otherwise normal {a}.")
_STUDY_POS = ("There {is} {art}{f}.", "{F} {is} present.", "{F} {is} noted.", "{F} {is} seen.")
_STUDY_UNC = ("Possible {f}.", "{F} cannot be excluded.", "Questionable {f}.")
_STUDY_NORMAL = {
    "CT": ("No acute abnormality.", "No acute abnormality identified.", "No acute findings.", "No significant abnormality."),
    "CXR": ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "No acute intrathoracic process.",
            "No acute abnormality.", "Normal chest radiograph."),
}
_IMPRESSION_POS = ("{F} in the {a}.", "{A}: {f}.")
_IMPRESSION_UNC = ("Possible {f} in the {a}.", "Questionable {f} in the {a}.")
_PREFACE = {
    "CT": ("EXAMINATION: CT chest, abdomen and pelvis with contrast.", "TECHNIQUE: Axial images were acquired after intravenous contrast.",
           "COMPARISON: None.", "INDICATION: Evaluate for {f}.", "CLINICAL HISTORY: Follow-up of known {f}."),
    "CXR": ("EXAMINATION: Chest radiograph, PA and lateral views.", "COMPARISON: None.", "INDICATION: Evaluate for {f}.",
            "HISTORY: Shortness of breath, rule out {f}.", "TECHNIQUE: Frontal view of the chest."),
}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def _is_plural(phrase: str) -> bool:
    p = phrase.lower()
    if p in _PLURAL_WORDS or p.split(" ")[-1] in _PLURAL_WORDS:
        return True
    last = p.split(" ")[-1]
    return last.endswith("s") and not last.endswith(("ss", "us", "is", "sis", "ites", "as", "ax"))


def _article(word: str) -> str:
    w = word.lower()
    if re.match(r"(8|11|18|8\d)(\D|$)", w) or (w[:1] in "aeiou" and not w.startswith(("uni", "use", "eu", "one"))):
        return "an "
    return "a "


def _join_or(items: list[str], rng) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} or {items[1]}"
    comma = "," if rng.random() < 0.5 else ""
    return ", ".join(items[:-1]) + f"{comma} or {items[-1]}"


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class _Writer:
    """Per-catalog phrase tables plus the parser used to check every sentence."""

    def __init__(self, catalog: Catalog):
        from ..text.reports import DERIVED_STUDY_FINDINGS, get_parser  # text side imports torch/monai: only when writing

        self.catalog = catalog
        self.parser = get_parser(catalog)
        self.derived = {f for f in catalog.study_findings if f in DERIVED_STUDY_FINDINGS}
        self.nouns: list[list[str]] = []
        self.adjectives: list[list[str]] = []
        for i, a in enumerate(catalog.anatomies):
            nouns, adjs = [], []
            for form in dict.fromkeys((a.name, *a.synonyms)):
                spans = self.parser.anatomy_mentions("the " + form)
                if len(spans) != 1 or spans[0].rows != frozenset({i}) or spans[0].end - spans[0].start != len(form):
                    continue  # a form shared with another anatomy would claim findings for it too
                adjective = form.split(" ")[-1].endswith(_ADJECTIVE_END) or form.endswith("-sided")
                if adjective:
                    adjs.append(form)
                elif not _AWKWARD_NOUNS.search(form):
                    nouns.append(form)
            self.nouns.append(nouns or [a.name])
            self.adjectives.append(adjs)

    # ------------------------------------------------------------------ phrase helpers
    def noun(self, row: int, rng) -> str:
        nouns = self.nouns[row]
        return nouns[0] if rng.random() < 0.65 or len(nouns) == 1 else _pick(rng, nouns[1:])

    def phrase_kind(self, row: int | None, phrase: str) -> str:
        """'clause' ("heart is enlarged"), 'state' ("elevated"), 'own' (names its anatomy), 'other', 'plain'."""
        if re.search(r"\b(is|are)\b", phrase):
            return "clause"
        spans = self.parser.anatomy_mentions(phrase)
        if spans:
            rows = frozenset().union(*[s.rows for s in spans])
            return "own" if row is not None and rows == frozenset({row}) else "other"
        if " " not in phrase and re.search(r"(ed|ous|tic)$", phrase):
            return "state"
        return "plain"

    def unique_phrasings(self, finding: str) -> list[str]:
        """Phrasings that name only this finding ("vascular congestion" may also mean edema)."""
        forms = self.parser.finding_forms
        return [p for p in self.catalog.phrasings(finding) if forms.get(" ".join(p.lower().replace("-", " ").split())) == frozenset({finding})]

    def phrase(self, row: int | None, finding: str, rng, kinds=("plain", "own", "state", "clause"),
               unique: bool = False) -> tuple[str, str]:
        phrasings = self.unique_phrasings(finding) if unique else self.catalog.phrasings(finding)
        options = [(p, self.phrase_kind(row, p)) for p in phrasings]
        options = [(p, k) for p, k in options if k in kinds]
        if not options:
            return finding, "plain"
        # the canonical name half of the time: synonyms add variety, the name keeps reports readable
        if options[0][0] == finding and rng.random() < 0.5:
            return options[0]
        return _pick(rng, options)

    def fields(self, row: int | None, phrase: str, rng, detail: str | None = None) -> dict[str, str]:
        f = phrase
        plural = _is_plural(f)
        last = f.split(" ")[-1].lower()
        out = {"f": f, "F": _cap(f), "is": "are" if plural else "is",
               "art": _article(f) if (not plural and last in _COUNTABLE) else ""}
        if row is not None:
            a = self.noun(row, rng)
            a_plural = _is_plural(a)
            out.update(a=a, A=_cap(a), a_is="are" if a_plural else "is", shows="show" if a_plural else "shows",
                       demonstrates="demonstrate" if a_plural else "demonstrates",
                       contains="contain" if a_plural else "contains", appears="appear" if a_plural else "appears")
            if self.adjectives[row]:
                adj = _pick(rng, self.adjectives[row])
                out.update(adj=adj, Adj=_cap(adj), art_adj=_article(adj) if (not plural and last in _COUNTABLE) else "")
        if detail:
            out.update(d=detail, art_d="" if plural else _article(detail), art_D=_cap("" if plural else _article(detail)))
        m = re.search(r"\b(is|are)\b", f)
        if m:
            out["f_not"] = f[: m.end()] + " not" + f[m.end():]
            out["f_mild"] = f[: m.end()] + " mildly" + f[m.end():]
        return out

    # ------------------------------------------------------------------ checking
    def check(self, sentence: str, labels: dict, normal: set, study_normal: bool) -> bool:
        res = self.parser.analyze(sentence)
        return res.labels() == labels and set(res.normal) == normal and all(
            v is None for v in res.normal.values()) and res.study_normal == study_normal

    def emit(self, make, rng, labels: dict, normal: set = frozenset(), study_normal: bool = False,
             fallback: str | None = None, tries: int = 8) -> str | None:
        """First sentence from ``make(rng)`` that parses to exactly ``labels`` / ``normal``."""
        WRITER_STATS["sentences"] += 1
        for k in range(tries):
            try:
                s = make(rng)
            except (KeyError, IndexError):
                s = None  # template needs a field this anatomy / finding lacks
            if s:
                s = re.sub(r"\s+", " ", s).strip()
                s = _cap(s)
                if self.check(s, labels, set(normal), study_normal):
                    if k:
                        WRITER_STATS["retries"] += k
                    return s
        if fallback and self.check(fallback, labels, set(normal), study_normal):
            WRITER_STATS["fallbacks"] += 1
            return fallback
        WRITER_STATS["dropped"] += 1
        return None

    # ------------------------------------------------------------------ sentence makers
    def positive(self, row: int, finding: str, value: int, detail: str | None):
        def make(rng):
            if value == UNCERTAIN:
                p, kind = self.phrase(row, finding, rng, ("plain", "own"))
                fl = self.fields(row, p, rng)
                return _pick(rng, _UNC_OWN if kind == "own" else _UNC).format(**fl)
            p, kind = self.phrase(row, finding, rng)
            fl = self.fields(row, p, rng, detail)
            if kind == "clause":
                return _pick(rng, _POS_CLAUSE).format(**fl)
            if kind == "state":
                return _pick(rng, _POS_STATE).format(**fl)
            if kind == "own":
                if detail and rng.random() < 0.6:
                    return f"{_cap(fl['art_d'])}{detail} {p}."
                return _pick(rng, _POS_OWN).format(**fl)
            if detail and rng.random() < 0.8:
                pool = _POS_DETAIL + (_POS_SIZE if re.search(r"\d", detail) else ())
                return _pick(rng, pool).format(**fl)
            if "adj" in fl and rng.random() < 0.15 and fl["adj"].split(" ")[-1] not in p:
                return _pick(rng, _POS_ADJ).format(**fl)
            return _pick(rng, _POS).format(**fl)
        return make

    def negative(self, row: int, findings: list[str]):
        def make(rng):
            if len(findings) == 1:
                p, kind = self.phrase(row, findings[0], rng)
                fl = self.fields(row, p, rng)
                if kind == "clause":
                    return _pick(rng, _NEG_CLAUSE).format(**fl)
                if kind == "state":
                    return _pick(rng, _NEG_STATE).format(**fl)
                if kind == "own":
                    return _pick(rng, _NEG_GLOBAL).format(fs=p)
                if "adj" in fl and rng.random() < 0.15 and fl["adj"].split(" ")[-1] not in p:
                    return _pick(rng, _NEG_ADJ).format(**fl)
                return _pick(rng, _NEG).format(**fl)
            phrases = [self.phrase(row, f, rng, ("plain",))[0] for f in findings]
            fl = self.fields(row, phrases[0], rng)
            return _pick(rng, _NEG_GROUP).format(fs=_join_or(phrases, rng), **{k: v for k, v in fl.items() if k not in ("f", "F")})
        return make

    def positive_negative(self, row: int, finding: str, negative: str, detail: str | None):
        def make(rng):
            p, kind = self.phrase(row, finding, rng, ("plain",))
            g, _ = self.phrase(row, negative, rng, ("plain",))
            fl = self.fields(row, p, rng, detail)
            return _pick(rng, _POS_NEG).format(g=g, **fl)
        return make

    def two_positives(self, row: int, f1: str, f2: str):
        def make(rng):
            p, _ = self.phrase(row, f1, rng, ("plain",))
            g, _ = self.phrase(row, f2, rng, ("plain",))
            fl = self.fields(row, p, rng)
            fl["is"] = "are"
            return _pick(rng, _POS_TWO).format(g=g, **fl)
        return make

    def normal(self, rows: list[int], otherwise: bool = False):
        def make(rng):
            if len(rows) == 1:
                fl = self.fields(rows[0], "x", rng)
                pool = _OTHERWISE if otherwise else _NORMAL + (_NORMAL_LUNG if "lung" in self.catalog.anatomies[rows[0]].name else ())
                return _pick(rng, pool).format(**fl)
            names = [self.noun(r, rng) for r in rows]
            return _pick(rng, _NORMAL_GROUP).format(**{"as": _join_and(names), "As": _cap(_join_and(names))})
        return make

    def global_negative(self, findings: list[str]):
        def make(rng):
            phrases = [self.phrase(None, f, rng, ("plain", "own"), unique=True)[0] for f in findings]
            return _pick(rng, _NEG_GLOBAL).format(fs=_join_or(phrases, rng))
        return make

    def study_statement(self, finding: str, value: int):
        def make(rng):
            p, _ = self.phrase(None, finding, rng, ("plain", "other"))
            fl = self.fields(None, p, rng)
            if value == PRESENT:
                return _pick(rng, _STUDY_POS).format(**fl)
            if value == UNCERTAIN:
                return _pick(rng, _STUDY_UNC).format(**fl)
            return _pick(rng, _NEG_GLOBAL).format(fs=p)
        return make

    def impression(self, row: int, finding: str, value: int):
        def make(rng):
            p, kind = self.phrase(row, finding, rng, ("plain", "own"))
            fl = self.fields(row, p, rng)
            if kind == "own":
                return _pick(rng, _UNC_OWN if value == UNCERTAIN else ("{F}.",)).format(**fl)
            return _pick(rng, _IMPRESSION_UNC if value == UNCERTAIN else _IMPRESSION_POS).format(**fl)
        return make

    # ------------------------------------------------------------------ a report
    def write(self, findings, rng, study_findings, details) -> tuple[str, dict[str, list[str]]]:
        cat = self.catalog
        labels: dict[int, dict[str, int]] = {}
        for name, fd in (findings or {}).items():
            if name not in cat.names:
                raise ValueError(f"write_report: anatomy {name!r} is not in catalog {cat.name!r}")
            row = cat.index(name)
            for f, v in (fd or {}).items():
                if f not in cat.anatomies[row].findings:
                    raise ValueError(f"write_report: {f!r} is not a finding of {name!r} in catalog {cat.name!r}")
                if isinstance(v, bool) or v not in (PRESENT, ABSENT, UNCERTAIN):
                    raise ValueError(f"write_report: findings[{name!r}][{f!r}] must be 1, 0 or -1, got {v!r}")
            if fd:
                labels[row] = {f: int(v) for f, v in fd.items()}
        study: dict[str, int] = {}
        for f, v in (study_findings or {}).items():
            if f not in cat.study_findings:
                raise ValueError(f"write_report: {f!r} is not a study finding of catalog {cat.name!r}")
            if isinstance(v, bool) or v not in (PRESENT, ABSENT, UNCERTAIN):
                raise ValueError(f"write_report: study_findings[{f!r}] must be 1, 0 or -1, got {v!r}")
            if f not in self.derived:  # "no finding" follows from the rest; it is never written
                study[f] = int(v)
        details = details or {}

        all_values = [(f, v) for fd in labels.values() for f, v in fd.items()] + list(study.items())
        pathology = any(v == PRESENT and not _DEVICE_RE.search(f) for f, v in all_values)
        any_uncertain = any(v == UNCERTAIN for _, v in all_values)
        study_normal = not pathology and not any_uncertain

        blocks: list[list[tuple[str, set[int]]]] = []  # sentences about one topic stay together
        impression: list[tuple[str, set[int]]] = []
        stated: set[tuple[int, str]] = set()

        # findings absent everywhere they can be: one sentence without an anatomy ("No pneumothorax.")
        globals_ = []
        for f, owners in self.parser.owners.items():
            if f in cat.study_findings:
                continue
            if not self.unique_phrasings(f):
                continue
            if all(labels.get(r, {}).get(f) == ABSENT for r in owners) and rng.random() < (0.6 if len(owners) > 1 else 0.25):
                globals_.append(f)
        rng.shuffle(globals_)
        while globals_:
            group = globals_[: int(rng.integers(1, 4))]
            globals_ = globals_[len(group):]
            expected = {(r, f): ABSENT for f in group for r in self.parser.owners[f]}
            s = self.emit(self.global_negative(group), rng, expected)
            if s:
                blocks.append([(s, {r for r, _ in expected})])
                stated |= set(expected)

        normal_rows: list[int] = []
        for row in sorted(labels):
            fd = labels[row]
            a = cat.anatomies[row]
            pos = [f for f in a.findings if fd.get(f) in (PRESENT, UNCERTAIN)]
            neg = [f for f in a.findings if fd.get(f) == ABSENT and (row, f) not in stated]
            complete = all(fd.get(f) == ABSENT for f in a.findings if f not in pos)
            block: list[tuple[str, set[int]]] = []
            if not pos:
                if complete and study_normal and rng.random() < 0.3:
                    continue  # implied by the study-level normal statement
                if complete and rng.random() < 0.55:
                    normal_rows.append(row)
                    continue
                self._negatives(row, neg, rng, block, p_each=0.75)
            else:
                details_row = details.get(a.name, {}) or {}
                queue = list(pos)
                rng.shuffle(queue)
                while queue:
                    f = queue.pop()
                    v = fd[f]
                    detail = details_row.get(f) if v == PRESENT else None
                    if v == PRESENT and queue and fd[queue[-1]] == PRESENT and not detail and rng.random() < 0.2:
                        g = queue.pop()
                        s = self.emit(self.two_positives(row, f, g), rng, {(row, f): PRESENT, (row, g): PRESENT})
                        if s:
                            block.append((s, {row}))
                            continue
                        queue.append(g)
                    if v == PRESENT and neg and rng.random() < 0.2:
                        g = neg.pop(int(rng.integers(len(neg))))
                        s = self.emit(self.positive_negative(row, f, g, detail), rng, {(row, f): PRESENT, (row, g): ABSENT})
                        if s:
                            block.append((s, {row}))
                            continue
                        neg.append(g)
                    s = self.emit(self.positive(row, f, v, detail), rng, {(row, f): v},
                                  fallback=f"{'Possible ' if v == UNCERTAIN else 'There is '}{f} in the {a.name}.")
                    if s:
                        block.append((s, {row}))
                    if rng.random() < 0.6:
                        s = self.emit(self.impression(row, f, v), rng, {(row, f): v})
                        if s:
                            impression.append((s, {row}))
                if complete and neg and rng.random() < 0.4:
                    s = self.emit(self.normal([row], otherwise=True), rng, {}, normal={row})
                    if s:
                        block.append((s, {row}))
                        neg = []
                self._negatives(row, neg, rng, block, p_each=0.5)
            if block:
                blocks.append(block)

        # normal anatomies, sometimes grouped ("The liver, spleen and pancreas are unremarkable.")
        rng.shuffle(normal_rows)
        while normal_rows:
            n = int(rng.integers(1, 4)) if rng.random() < 0.4 else 1
            group, normal_rows = normal_rows[:n], normal_rows[n:]
            s = self.emit(self.normal(group), rng, {}, normal=set(group))
            if s is None and len(group) > 1:
                normal_rows = group[1:] + normal_rows
                group = group[:1]
                s = self.emit(self.normal(group), rng, {}, normal=set(group))
            if s:
                blocks.append([(s, set(group))])

        # study findings
        study_block: list[tuple[str, set[int]]] = []
        negatives = [f for f, v in study.items() if v == ABSENT]
        for f, v in study.items():
            if v != ABSENT:
                s = self.emit(self.study_statement(f, v), rng, {(None, f): v})
                if s:
                    study_block.append((s, set()))
        rng.shuffle(negatives)
        negatives = [f for f in negatives if rng.random() < 0.8]
        while negatives:
            group = negatives[: int(rng.integers(1, 3))]
            negatives = negatives[len(group):]
            s = self.emit(self.global_negative(group), rng, {(None, f): ABSENT for f in group})
            if s:
                study_block.append((s, set()))
        if study_block:
            blocks.append(study_block)

        normal_sentence = None
        if study_normal:
            normal_sentence = self.emit(lambda r: _pick(r, _STUDY_NORMAL[cat.modality]), rng, {}, study_normal=True)
            if normal_sentence and rng.random() < 0.3:
                blocks.append([(normal_sentence, set())])
            if normal_sentence:
                impression = [(normal_sentence, set())] + [x for x in impression if x[1]]

        rng.shuffle(blocks)
        body = [s for block in blocks for s in block]
        if rng.random() < 0.25:
            rng.shuffle(body)

        # anatomy -> its sentences, catalog order
        per_row: dict[int, list[str]] = {}
        for s, rows in body + impression:
            for r in sorted(rows):
                if s not in per_row.setdefault(r, []):
                    per_row[r].append(s)
        anatomy_sentences = {cat.anatomies[r].name: per_row[r] for r in sorted(per_row)}
        return self._layout([s for s, _ in body], [s for s, _ in impression], rng), anatomy_sentences

    def _negatives(self, row: int, neg: list[str], rng, block: list, p_each: float) -> None:
        chosen = [f for f in neg if rng.random() < p_each]
        rng.shuffle(chosen)
        while chosen:
            n = int(rng.integers(1, 4)) if len(chosen) > 1 and rng.random() < 0.5 else 1
            group, chosen = chosen[:n], chosen[n:]
            s = self.emit(self.negative(row, group), rng, {(row, f): ABSENT for f in group},
                          fallback=f"No {group[0]} in the {self.catalog.anatomies[row].name}." if n == 1 else None)
            if s is None and n > 1:
                # the group did not read back: one finding per sentence
                for f in group:
                    s1 = self.emit(self.negative(row, [f]), rng, {(row, f): ABSENT},
                                   fallback=f"No {f} in the {self.catalog.anatomies[row].name}.")
                    if s1:
                        block.append((s1, {row}))
                continue
            if s:
                block.append((s, {row}))

    def _layout(self, body: list[str], impression: list[str], rng) -> str:
        cat = self.catalog
        preface = []
        if rng.random() < 0.4:
            all_findings = [f for a in cat.anatomies for f in a.findings]
            for p in _PREFACE[cat.modality]:
                if rng.random() < 0.5:
                    preface.append(p.format(f=_pick(rng, all_findings) if all_findings else "pain"))
        style = int(rng.integers(4))
        if style == 0:
            text = "FINDINGS: " + " ".join(body)
            if impression:
                text += " IMPRESSION: " + " ".join(impression)
        elif style == 1:
            text = "FINDINGS:\n" + "\n".join(body)
            if impression:
                text += "\n\nIMPRESSION:\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(impression))
        elif style == 2:
            width = int(rng.integers(55, 85))
            text = "Findings:\n" + textwrap.fill(" ".join(body), width=width, break_on_hyphens=False)
            if impression:
                text += "\n\nImpression:\n" + textwrap.fill(" ".join(impression), width=width, break_on_hyphens=False)
        else:
            text = "FINDINGS: " + " ".join(body)
            if impression:
                text += "\nIMPRESSION: " + " ".join(f"{i + 1}. {s}" for i, s in enumerate(impression))
        return "\n".join(preface + [text]) if preface else text


@functools.lru_cache(maxsize=8)
def _writer_for_key(key: str) -> _Writer:
    return _Writer(Catalog.from_dict(json.loads(key), source="<cached>"))


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
        findings: anatomy -> finding -> 1 (present) | 0 (absent) | -1 (uncertain).
        rng: random generator (the caller seeds it: reports are deterministic given the seed).
        study_findings: finding -> 1 | 0 | -1 for findings no anatomy owns (derived ones such as
            ``"no finding"`` are not written; the parser derives them).
        details: optional anatomy -> finding -> short descriptor (e.g. ``"8 mm"``) for present findings.

    Returns:
        ``(report, anatomy_sentences)``: the free text (FINDINGS and usually IMPRESSION sections)
        and the sentences written about each anatomy (catalog order), each of which the report
        parser reads back as the labels it was written for.
    """
    return _writer_for_key(json.dumps(catalog.to_dict(), sort_keys=True)).write(findings, rng, study_findings, details)
