"""Agreement between the report parser and hand-written labels on realistic radiology reports.

    .venv/bin/python scripts/parser_agreement.py                      # all fixtures
    .venv/bin/python scripts/parser_agreement.py --split dev --show-errors

Fixtures are JSONL files ``<modality>_reports.jsonl`` in ``--fixtures`` (default
``tests/fixtures/reports``): one report a line, ``{"id", "split": "dev" | "heldout", "text",
"labels": {"anatomies": {anatomy: {finding: 1 | 0 | -1}}, "study_findings": {finding: 1 | 0 | -1}}}``,
in the names of the modality's built-in catalog (:data:`FIXTURE_CATALOGS`). The labels were
written by reading each report as a radiologist would, under the data contract's rules:

- a finding is labelled only where the report states it; an anatomy is the catalog anatomy the
  report names (by its name or synonyms; a sub-region's finding is not copied to the region that
  contains it, and a region's "clear" does not cancel a finding stated in its sub-region);
- an absent finding without a place ("No pneumothorax.") is absent in every anatomy that owns it;
  a present one without a place goes to its only owner, or to both lungs for a diffuse process
  ("pulmonary edema", "bilateral opacities");
- "X is normal / unremarkable / clear" sets all of X's findings to 0 ("normal in size" only its
  size findings); a whole-study normal statement sets every finding to 0 except those stated;
- uncertain (``possible``, ``may represent``, ``cannot exclude``, ``likely``, ``versus``) is -1;
- CXR ``no finding`` is 0 when a non-device finding is present, -1 when the worst is uncertain,
  1 otherwise; ``support devices`` is 1 when any tube, line or lead is described.

Every (anatomy, finding) pair labelled in either the given or the parsed labels is compared
(study findings as anatomy ``"<study>"``). Printed per modality and overall: exact agreement
(parsed value == given value, over those pairs), precision and recall of each class (present 1,
absent 0, uncertain -1), Cohen's kappa over the four categories {1, 0, -1, unknown}, and the
counts of missed (given, not parsed) and extra (parsed, not given) labels. ``--show-errors``
lists every disagreement with the report sentences that speak about it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.text.reports import get_parser, parse_report, split_sentences

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = ROOT / "tests" / "fixtures" / "reports"
#: fixture file prefix -> (modality, built-in catalog of its labels)
FIXTURE_CATALOGS = {"cxr": ("CXR", "cxr_imagenome29"), "ct": ("CT", "ct_totalseg")}
STUDY = "<study>"
CLASSES = (1, 0, -1)
UNKNOWN = None

Pair = tuple[str, str]  # (anatomy or STUDY, finding)


@dataclass
class FixtureReport:
    id: str
    split: str
    modality: str
    catalog: str
    text: str
    labels: dict[Pair, int]


@dataclass
class Disagreement:
    report: str
    pair: Pair
    given: int | None
    parsed: int | None
    sentences: list[str] = field(default_factory=list)


@dataclass
class Agreement:
    """Agreement over the pairs labelled in either source.

    Attributes:
        pairs: number of compared pairs.
        exact: fraction of pairs with the same value (a pair missing on one side disagrees).
        kappa: Cohen's kappa over the categories 1, 0, -1 and unknown.
        precision / recall: class -> value (None when the class never occurs on that side).
        missed: pairs given but not parsed; extra: pairs parsed but not given.
        confusion: (given, parsed) -> count, None standing for unknown.
    """

    pairs: int
    exact: float
    kappa: float
    precision: dict[int, float | None]
    recall: dict[int, float | None]
    missed: int
    extra: int
    confusion: dict[tuple[int | None, int | None], int]


def flatten(labels: Mapping) -> dict[Pair, int]:
    """``{"anatomies": {a: {f: v}}, "study_findings": {f: v}}`` -> ``{(a, f): v}`` (study as ``"<study>"``)."""
    out: dict[Pair, int] = {}
    for anatomy, findings in (labels.get("anatomies") or {}).items():
        # parse-report JSON nests findings under "findings"; fixture labels map anatomy -> findings
        if "findings" in findings and isinstance(findings["findings"], Mapping):
            findings = findings["findings"]
        for finding, value in findings.items():
            out[(anatomy, finding)] = int(value)
    for finding, value in (labels.get("study_findings") or {}).items():
        out[(STUDY, finding)] = int(value)
    return out


def load_fixtures(directory: str | Path = DEFAULT_FIXTURES, split: str = "all") -> list[FixtureReport]:
    """Reports of every ``<prefix>_reports.jsonl`` in ``directory`` (``split``: dev, heldout or all).

    Raises:
        FileNotFoundError: no fixture file in ``directory``.
        ValueError: a line that is not valid JSON, lacks a field, or names an anatomy or finding its
            catalog does not have (the message names the file and line).
    """
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*_reports.jsonl") if p.name.split("_")[0] in FIXTURE_CATALOGS)
    if not files:
        raise FileNotFoundError(f"{directory}: no fixture files named <{'|'.join(FIXTURE_CATALOGS)}>_reports.jsonl")
    reports = []
    for path in files:
        modality, catalog_name = FIXTURE_CATALOGS[path.name.split("_")[0]]
        catalog = load_catalog(catalog_name)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                item = json.loads(line)
                rid, text, labels, item_split = item["id"], item["text"], item["labels"], item["split"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{where}: needs a JSON object with id, split, text and labels ({e!r})") from None
            if item_split not in ("dev", "heldout"):
                raise ValueError(f"{where}: split must be 'dev' or 'heldout', got {item_split!r}")
            pairs = flatten(labels)
            for anatomy, finding in pairs:
                own = catalog.study_findings if anatomy == STUDY else (
                    catalog.anatomy(anatomy).findings if anatomy in catalog.names else None)
                if own is None or finding not in own:
                    raise ValueError(f"{where}: ({anatomy!r}, {finding!r}) is not in catalog {catalog_name!r}")
            if split in ("all", item_split):
                reports.append(FixtureReport(rid, item_split, modality, catalog_name, text, pairs))
    return reports


def agreement(given: list[dict[Pair, int]], parsed: list[dict[Pair, int]]) -> Agreement:
    """Agreement of two labellings of the same reports (lists of per-report ``{pair: value}``)."""
    confusion: Counter = Counter()
    for g, p in zip(given, parsed, strict=True):
        for pair in set(g) | set(p):
            confusion[(g.get(pair, UNKNOWN), p.get(pair, UNKNOWN))] += 1
    total = sum(confusion.values())
    same = sum(n for (a, b), n in confusion.items() if a == b)
    categories = (*CLASSES, UNKNOWN)
    row = {c: sum(n for (a, _), n in confusion.items() if a == c) for c in categories}
    col = {c: sum(n for (_, b), n in confusion.items() if b == c) for c in categories}
    observed = same / total if total else 1.0
    expected = sum(row[c] * col[c] for c in categories) / total**2 if total else 0.0
    kappa = 1.0 if expected == 1 else (observed - expected) / (1 - expected)
    precision = {c: (confusion[(c, c)] / col[c] if col[c] else None) for c in CLASSES}
    recall = {c: (confusion[(c, c)] / row[c] if row[c] else None) for c in CLASSES}
    return Agreement(
        pairs=total, exact=observed, kappa=kappa, precision=precision, recall=recall,
        missed=sum(n for (a, b), n in confusion.items() if a is not UNKNOWN and b is UNKNOWN),
        extra=sum(n for (a, b), n in confusion.items() if a is UNKNOWN and b is not UNKNOWN),
        confusion=dict(confusion),
    )


def parse_fixture(report: FixtureReport) -> dict[Pair, int]:
    """The parser's labels of a fixture report, flattened."""
    return flatten(parse_report(report.text, report.catalog).to_dict())


def evaluate(reports: list[FixtureReport]) -> tuple[dict[str, Agreement], list[Disagreement]]:
    """Agreement per modality and ``"overall"``, and every disagreement with its sentences."""
    parsed = {r.id: parse_fixture(r) for r in reports}
    results: dict[str, Agreement] = {}
    for modality in sorted({r.modality for r in reports}):
        subset = [r for r in reports if r.modality == modality]
        results[modality] = agreement([r.labels for r in subset], [parsed[r.id] for r in subset])
    results["overall"] = agreement([r.labels for r in reports], [parsed[r.id] for r in reports])
    errors = []
    for r in reports:
        p = parsed[r.id]
        for pair in sorted(set(r.labels) | set(p), key=lambda x: (x[0], x[1])):
            if r.labels.get(pair) != p.get(pair):
                errors.append(Disagreement(r.id, pair, r.labels.get(pair), p.get(pair), evidence(r, pair)))
    return results, errors


def evidence(report: FixtureReport, pair: Pair) -> list[str]:
    """Sentences of the report naming the pair's finding; else those the parser gave its anatomy;
    else those sharing a word stem with the finding or anatomy (``"lymph"`` for lymphadenopathy)."""
    parser = get_parser(report.catalog)
    anatomy, finding = pair
    sentences = split_sentences(report.text)
    naming = [s for s in sentences if any(finding in span.rows for span in parser.finding_mentions(s))]
    if naming:
        return naming
    if anatomy != STUDY:
        assigned = parse_report(report.text, report.catalog).sentences().get(anatomy, [])
        if assigned:
            return assigned
    stems = {w[:5] for w in f"{finding} {anatomy if anatomy != STUDY else ''}".lower().split() if len(w) > 3}
    return [s for s in sentences if any(stem in s.lower() for stem in stems)]


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def format_table(results: Mapping[str, Agreement]) -> str:
    """One line of figures per modality (and overall)."""
    head = (f"{'':8} {'pairs':>6} {'exact':>6} {'kappa':>6}  {'P(1)':>5} {'R(1)':>5}  {'P(0)':>5} {'R(0)':>5}"
            f"  {'P(-1)':>5} {'R(-1)':>5}  {'missed':>6} {'extra':>5}")
    lines = [head]
    for name, a in results.items():
        lines.append(
            f"{name:8} {a.pairs:6d} {a.exact:6.3f} {a.kappa:6.3f}  {_fmt(a.precision[1])} {_fmt(a.recall[1])}  "
            f"{_fmt(a.precision[0])} {_fmt(a.recall[0])}  {_fmt(a.precision[-1])} {_fmt(a.recall[-1])}  "
            f"{a.missed:6d} {a.extra:5d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Agreement]:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--fixtures", default=str(DEFAULT_FIXTURES), help="folder of <modality>_reports.jsonl files")
    args.add_argument("--split", default="all", choices=("dev", "heldout", "all"), help="which reports to measure")
    args.add_argument("--show-errors", action="store_true", help="list every disagreement with its sentences")
    opts = args.parse_args(argv)
    reports = load_fixtures(opts.fixtures, opts.split)
    results, errors = evaluate(reports)
    counts = Counter(r.modality for r in reports)
    print(f"split={opts.split}: " + ", ".join(f"{m} {n} reports" for m, n in sorted(counts.items())))
    print(format_table(results))
    if opts.show_errors:
        print(f"\n{len(errors)} disagreements (given -> parsed; None = unknown):")
        for e in errors:
            print(f"- {e.report} {e.pair[0]} / {e.pair[1]}: {e.given} -> {e.parsed}")
            for s in e.sentences:
                print(f"      | {s}")
    return results


if __name__ == "__main__":
    main()
