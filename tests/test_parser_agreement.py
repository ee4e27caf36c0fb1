"""Agreement of the report parser with hand-written labels on realistic reports (scripts/parser_agreement.py)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "parser_agreement.py"

# Measured on all fixtures (45 CXR, 32 CT reports) when this guard was written:
#   CT       exact 0.977, kappa 0.894 (959 pairs)
#   CXR      exact 0.973, kappa 0.826 (2079 pairs)
#   overall  exact 0.974, kappa 0.853 (3038 pairs)
# The floors sit a little below, to catch regressions of the parser (or of the fixtures' labels).
FLOORS = {"CT": {"exact": 0.96, "kappa": 0.86}, "CXR": {"exact": 0.96, "kappa": 0.79}, "overall": {"exact": 0.96, "kappa": 0.82}}


@pytest.fixture(scope="module")
def agreement_script():
    spec = importlib.util.spec_from_file_location("parser_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parser_agreement"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("parser_agreement", None)


@pytest.fixture(scope="module")
def fixtures(agreement_script):
    return agreement_script.load_fixtures()


def test_fixtures_are_realistic_sized_and_split(fixtures):
    by_modality = {m: [r for r in fixtures if r.modality == m] for m in ("CXR", "CT")}
    assert len(by_modality["CXR"]) >= 40 and len(by_modality["CT"]) >= 30
    for reports in by_modality.values():
        held = sum(r.split == "heldout" for r in reports)
        assert 0.25 <= held / len(reports) <= 0.4  # about a third held out
        assert len({r.id for r in reports}) == len(reports)
        assert all(r.labels for r in reports)
    # every polarity is represented in the given labels of each modality
    for reports in by_modality.values():
        assert {v for r in reports for v in r.labels.values()} == {1, 0, -1}


def test_agreement_stays_above_floor(agreement_script, fixtures):
    results, errors = agreement_script.evaluate(fixtures)
    for name, floor in FLOORS.items():
        assert results[name].exact >= floor["exact"], (name, results[name])
        assert results[name].kappa >= floor["kappa"], (name, results[name])
    # every disagreement is listed, each with the sentences that speak of it
    agreeing = sum(n for m in ("CT", "CXR") for (g, p), n in results[m].confusion.items() if g == p)
    assert len(errors) == sum(results[m].pairs for m in ("CT", "CXR")) - agreeing
    assert sum(bool(e.sentences) for e in errors) > 0.6 * len(errors)


def test_agreement_is_one_on_itself_and_drops_for_a_disagreement(agreement_script, fixtures):
    given = [r.labels for r in fixtures]
    same = agreement_script.agreement(given, [dict(g) for g in given])
    assert same.exact == 1.0 and same.kappa == 1.0 and same.missed == same.extra == 0
    assert all(v == 1.0 for v in same.precision.values()) and all(v == 1.0 for v in same.recall.values())

    # one flipped value, one dropped and one added pair
    first = dict(given[0])
    (pair, value), (dropped, _) = list(first.items())[:2]
    first[pair] = 1 if value != 1 else 0
    del first[dropped]
    first[("<study>", "not-a-finding")] = 0
    changed = agreement_script.agreement(given, [first] + [dict(g) for g in given[1:]])
    n = same.pairs + 1
    assert changed.pairs == n and changed.exact == pytest.approx((n - 3) / n)
    assert changed.missed == 1 and changed.extra == 1 and changed.kappa < 1.0


def test_agreement_by_hand():
    """A tiny case worked out on paper: kappa over the categories 1, 0, -1 and unknown."""
    spec = importlib.util.spec_from_file_location("parser_agreement_by_hand", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        given = [{("a", "x"): 1, ("a", "y"): 0, ("b", "x"): -1}]
        parsed = [{("a", "x"): 1, ("a", "y"): 1, ("b", "z"): 0}]
        a = module.agreement(given, parsed)
    finally:
        sys.modules.pop(spec.name, None)
    # pairs: (a,x) 1/1, (a,y) 0/1, (b,x) -1/unknown, (b,z) unknown/0
    assert a.pairs == 4 and a.exact == 0.25 and a.missed == 1 and a.extra == 1
    assert a.precision == {1: 0.5, 0: 0.0, -1: None} and a.recall == {1: 1.0, 0: 0.0, -1: 0.0}
    # p_o = 1/4; p_e = (1*2 + 1*1 + 1*0 + 1*1) / 16 = 1/4 -> kappa 0
    assert a.kappa == pytest.approx(0.0)


def test_command_line_and_bad_fixtures(agreement_script, tmp_path, capsys):
    line = {"id": "r1", "split": "dev", "text": "FINDINGS: Small left pleural effusion. No pneumothorax.",
            "labels": {"anatomies": {"left lung": {"pleural effusion": 1}}, "study_findings": {}}}
    (tmp_path / "cxr_reports.jsonl").write_text(json.dumps(line) + "\n")
    results = agreement_script.main(["--fixtures", str(tmp_path), "--split", "dev", "--show-errors"])
    out = capsys.readouterr().out
    assert "CXR 1 reports" in out and "disagreements" in out
    # the six pneumothorax owners parsed absent and the derived "no finding" are extra labels, listed
    # with the sentence that speaks of them
    assert results["CXR"].missed == 0 and results["CXR"].extra == 7
    assert "- r1 right lung / pneumothorax: None -> 0" in out and "| No pneumothorax." in out
    assert "- r1 <study> / no finding: None -> 0" in out
    assert agreement_script.load_fixtures(tmp_path, "heldout") == []

    line["labels"]["anatomies"] = {"left lung": {"hepatomegaly": 1}}
    (tmp_path / "cxr_reports.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=r"cxr_reports.jsonl:1: \('left lung', 'hepatomegaly'\)"):
        agreement_script.load_fixtures(tmp_path)
    (tmp_path / "cxr_reports.jsonl").write_text('{"id": "r1"}\n')
    with pytest.raises(ValueError, match="cxr_reports.jsonl:1: needs"):
        agreement_script.load_fixtures(tmp_path)
    with pytest.raises(FileNotFoundError, match="no fixture files"):
        agreement_script.load_fixtures(tmp_path / "empty")
