"""Fuzzing the datalist reader and validator (hypothesis): arbitrary input never crashes or hangs them.

``load_datalist`` either returns a :class:`Datalist` or raises its documented :class:`DatalistError`
naming the file; ``validate_datalist`` always returns a report, whose problems are the datalist's own
(never "validator could not check this", the catch-all of an unexpected exception) and which prints
and serialises. Inputs: JSON-ish datalists (random keys, values, types and nesting; records with
wrong types, missing or odd paths, huge and negative numbers in boxes, non-string ids) and raw bytes.
Each example runs under a hard time limit; every property is bounded (tens of examples, a deadline).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bad_inputs as bad
from bad_inputs import time_limit
from anatomy_vlp_bundle.data.datalist import SPLITS, DatalistError, load_datalist
from anatomy_vlp_bundle.data.validate import ValidationReport, validate_datalist

#: Seconds one example may take before it counts as a hang.
TIME_LIMIT = 10
FUZZ = settings(
    max_examples=60,
    deadline=3000,
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
CATALOGS = ["ct_totalseg", "synthetic_ct", "cxr_imagenome29", "synthetic_cxr", "catalog.json", "missing.json"]
ANATOMIES = ["liver", "spleen", "lung", "right lung", "cardiac silhouette", "kidney", ""]
FINDINGS = ["hypodense lesion", "steatosis", "pleural effusion", "lymphadenopathy", "nodule"]


# --------------------------------------------------------------------------- strategies
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([10**400, -(10**400), 2**63, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10
)
#: Relative path segments (no "..": the validator must not wander out of the fuzz folder).
segment = st.text(alphabet=string.ascii_letters + string.digits + "._- \u00e9\u4e2d\0", min_size=1, max_size=10).filter(
    lambda s: s != ".."
)
FILES = ["ct.nii.gz", "mask.nii.gz", "cxr.png", "notes.txt", "giant.nii.gz", "emptydir", "missing.nii.gz", "missing.png"]
paths = st.sampled_from(FILES) | st.lists(segment, min_size=1, max_size=3).map("/".join)
names = st.sampled_from(ANATOMIES) | st.text(max_size=10)
numbers = (
    st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([10**400, -(10**400), 1e308, -1e308, True])
    | json_values
)
boxes = st.dictionaries(names, st.lists(numbers, max_size=8) | json_values, max_size=3) | json_values
finding_values = st.sampled_from([1, 0, -1, 2, True, None, "1", 0.5]) | json_values
findings = st.dictionaries(
    names, st.dictionaries(st.sampled_from(FINDINGS) | st.text(max_size=8), finding_values, max_size=3) | json_values, max_size=3
) | json_values
records = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=8) | json_values,
        "patient": st.sampled_from(["p1", "p2"]) | json_values,
        "image": paths | json_values,
        "anatomy_mask": paths | json_values,
        "anatomy_masks": st.dictionaries(names, paths | json_values, max_size=3) | json_values,
        "anatomy_boxes": boxes,
        "report": st.text(max_size=60) | json_values,
        "anatomy_sentences": st.dictionaries(names, st.lists(st.text(max_size=20), max_size=2) | json_values, max_size=2)
        | json_values,
        "findings": findings,
        "study_findings": st.dictionaries(st.sampled_from(FINDINGS) | st.text(max_size=8), finding_values, max_size=3)
        | json_values,
        "extra key": json_values,
    },
)
splits = st.lists(records | json_values, max_size=4) | json_values
#: Datalists whose own keys are usable, so that the records get checked ...
well_formed = st.fixed_dictionaries(
    {
        "modality": st.sampled_from(["CT", "CXR"]),
        "catalog": st.sampled_from(CATALOGS[:5]),
        "training": st.lists(records, min_size=1, max_size=4),
    },
    optional={"name": json_values, "validation": splits, "test": splits, "trainning": splits},
)
#: ... and datalists where anything may be missing or of any type.
malformed = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values,
        "modality": st.sampled_from(["CT", "CXR", "MR", "ct", ""]) | json_values,
        "catalog": st.sampled_from(CATALOGS) | json_values,
        "training": splits,
        "validation": splits,
        "test": splits,
    },
)
datalists = well_formed | malformed | json_values


# --------------------------------------------------------------------------- fixtures and checks
@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    """A folder with the files the fuzzed paths may name (good, bad and absent ones) and a catalog."""
    root = tmp_path_factory.mktemp("fuzz")
    bad.good_ct(root, "ct")
    bad.good_label_map(root, "mask")
    bad.good_cxr(root, "cxr")
    bad.giant_nifti(root)
    (root / "notes.txt").write_text("not an image")
    (root / "emptydir").mkdir()
    (root / "catalog.json").write_text(json.dumps({"name": "fuzz", "modality": "CT", "anatomies": [{"name": "liver", "labels": [1]}]}))
    return root


def check_report(report: ValidationReport) -> None:
    """The report is whole: problems well formed, none from the validator's catch-all, printable, serialisable."""
    assert isinstance(report, ValidationReport)
    for p in report.problems:
        assert p.severity in ("error", "warning") and isinstance(p.message, str) and p.message
        assert not p.message.startswith("validator could not check this"), p.format()
    assert report.ok == (not report.errors)
    report.format()
    json.dumps(report.to_dict())


def run_both(path: Path, deep: bool) -> None:
    """``load_datalist`` returns or raises DatalistError naming the file; ``validate_datalist`` reports."""
    with time_limit(TIME_LIMIT):
        try:
            dl = load_datalist(path)
        except DatalistError as e:
            assert str(e).startswith(f"{path}: ")
            failed = True
        else:
            failed = False
            for split in SPLITS:
                dl.records(split)
        report = validate_datalist(path, deep=deep)
    check_report(report)
    if failed:  # the same reason, as a datalist-level error
        (p,) = report.problems
        assert (p.severity, p.split, p.file) == ("error", None, str(path))


# --------------------------------------------------------------------------- properties
@FUZZ
@given(data=datalists, deep=st.booleans())
def test_arbitrary_datalists_never_crash_the_reader_or_validator(fuzz_dir, data, deep):
    path = fuzz_dir / "datalist.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    run_both(path, deep)


@FUZZ
@given(raw=st.binary(max_size=300) | st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b""]).flatmap(
    lambda bom: st.binary(max_size=100).map(lambda tail: bom + tail)))
@example(raw=b"[" * 5_000)  # nested too deeply for the JSON parser
@example(raw=b'{"modality": "CT", "catalog": "ct_totalseg", "training": [' + b"9" * 5000 + b"]}")  # beyond int digit limit
@example(raw=json.dumps({"modality": "CT", "catalog": "ct_totalseg", "training": [{"id": "a"}]}).encode("utf-16"))
def test_arbitrary_bytes_never_crash_the_reader_or_validator(fuzz_dir, raw):
    path = fuzz_dir / "bytes.json"
    path.write_bytes(raw)
    run_both(path, deep=False)


@FUZZ
@given(data=st.data())
def test_corrupted_valid_datalists_never_crash(fuzz_dir, data):
    """A valid datalist with a few bytes flipped, cut or inserted (decoding and parsing edge cases)."""
    good = json.dumps(
        {"modality": "CT", "catalog": "catalog.json",
         "training": [{"id": "a", "image": "ct.nii.gz", "anatomy_mask": "mask.nii.gz", "report": "Liver: lésion."}]},
        ensure_ascii=False,
    ).encode("utf-8")
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[at:]
            if not raw:
                break
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    path = fuzz_dir / "corrupted.json"
    path.write_bytes(bytes(raw))
    run_both(path, deep=True)
