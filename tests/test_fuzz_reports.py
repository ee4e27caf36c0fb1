"""Fuzzing the report parser (hypothesis): arbitrary text never crashes or hangs it.

``parse_report`` returns a result within the catalog (known anatomies and findings, values 1 / 0 /
-1) that serialises to the contract's parse-report JSON, for any text: random Unicode, and text
assembled from the parser's own vocabulary (anatomy synonyms, finding names, negation and
uncertainty cues, section headers, punctuation), which reaches its deeper paths. Long inputs must
stay fast (no catastrophic regular-expression backtracking). The hard-negative helpers used in
training (``negate_sentence``, ``perturb_sentence``) get the same inputs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_inputs import time_limit
from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.text.reports import negate_sentence, parse_report, perturb_sentence

CATALOGS = ["ct_totalseg", "cxr_imagenome29", "synthetic_ct"]
TIME_LIMIT = 10
FUZZ = settings(max_examples=60, deadline=3000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _vocabulary() -> list[str]:
    words = {"no", "not", "without", "free of", "negative for", "cannot exclude", "may represent", "possible",
             "likely", "versus", "and/or", "/", "resolved", "no evidence of", "is not seen", "unremarkable",
             "normal", "within normal limits", "no acute cardiopulmonary process", "no acute abnormality",
             "FINDINGS:", "IMPRESSION:", "COMPARISON:", "1.", "2)", "-", ",", ";", ".", "\n", "\n\n", ":", "(", ")",
             "mild", "small", "left", "right", "bilateral", "there is", "there are", "the", "of", "and", "with",
             "mm", "3.5", "cm", "e.g.", "Dr.", "vs.", "?", "!", "  ", "\t"}
    for name in CATALOGS:
        cat = load_catalog(name)
        for a in cat.anatomies:
            words.update([a.name, *a.synonyms, *a.findings])
        words.update(cat.study_findings)
    return sorted(words)


VOCAB = _vocabulary()
vocab_text = st.lists(st.sampled_from(VOCAB), max_size=60).map(" ".join)
any_text = st.text(max_size=400) | vocab_text | st.lists(vocab_text | st.text(max_size=30), max_size=6).map("".join)


def _check_result(parsed, catalog_name: str) -> None:
    cat = load_catalog(catalog_name)
    findings_of = {a.name: set(a.findings) for a in cat.anatomies}
    d = parsed.to_dict()
    json.dumps(d)  # the contract's JSON
    assert set(d) == {"anatomies", "study_findings"}
    for anatomy, v in d["anatomies"].items():
        assert anatomy in findings_of, anatomy
        assert all(isinstance(s, str) for s in v["sentences"])
        assert set(v["findings"]) <= findings_of[anatomy]
        assert set(v["findings"].values()) <= {1, 0, -1}
    assert set(d["study_findings"]) <= set(cat.study_findings)
    assert set(d["study_findings"].values()) <= {1, 0, -1}


@pytest.mark.parametrize("catalog", CATALOGS)
@FUZZ
@given(text=any_text)
def test_parse_report_never_crashes_and_stays_in_the_catalog(catalog, text):
    with time_limit(TIME_LIMIT):
        parsed = parse_report(text, catalog)
    _check_result(parsed, catalog)


@FUZZ
@given(text=any_text, seed=st.integers(0, 2**32 - 1))
def test_hard_negative_helpers_never_crash(text, seed):
    rng = np.random.default_rng(seed)
    with time_limit(TIME_LIMIT):
        for catalog in CATALOGS:
            for out in (negate_sentence(text, catalog), perturb_sentence(text, catalog, rng)):
                assert out is None or isinstance(out, str)


@pytest.mark.parametrize("unit", [
    "No focal consolidation, pleural effusion or pneumothorax. ",
    "no no no no no no no no no no ",
    "the the the of of of liver liver lung lung ",
    "(((((((((( ",
    "cannot exclude " * 3,
    "a" * 50,
    "1. 2. 3. 4. ",
    ",,,,,,,,,, ;;;;;;; ",
])
def test_long_reports_never_hang(unit):
    """A 15-25 kB report of one repeated pattern answers within the hang limit. (Long run-ons are cut
    into bounded sentences, see the next test: one sentence's cue scopes cost time quadratic in its
    length, and 5000 "no" tokens in one sentence took 0.57 s, 200x the time of 250, before the cut.)"""
    with time_limit(TIME_LIMIT):
        parsed = parse_report(unit * 500, "cxr_imagenome29")
    _check_result(parsed, "cxr_imagenome29")


@FUZZ
@given(text=any_text, run_on=st.text(alphabet="ab ,;", min_size=900, max_size=5000))
def test_sentences_are_bounded_and_a_run_on_loses_no_letter(text, run_on):
    from anatomy_vlp_bundle.text.reports import MAX_SENTENCE_CHARS, split_sentences

    assert all(len(s) <= MAX_SENTENCE_CHARS for s in split_sentences(text))
    pieces = split_sentences(run_on)
    assert all(len(s) <= MAX_SENTENCE_CHARS for s in pieces)
    letters = [c for c in run_on if c in "ab"]
    assert [c for s in pieces for c in s if c in "ab"] == letters
