"""The converters' shared machinery: resume, skips, patient-level splits, summary, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anatomy_vlp_bundle.data.datalist import load_datalist
from anatomy_vlp_bundle.prepare import SkipCase, SourceCase, assign_splits, hash_split, prepare_command, run_prepare
from anatomy_vlp_bundle.prepare.common import STATE_FILE, SUMMARY_FILE, relative_path


def _source(tmp_path, n=12):
    src = tmp_path / "src"
    src.mkdir()
    cases = []
    for i in range(n):
        if i != 3:  # case 3 has no image file
            Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(src / f"img{i}.png")
        cases.append(SourceCase(id=f"c{i}", patient=f"p{i // 2}", data=src / f"img{i}.png"))
    return cases


def _convert(calls):
    def convert(case, out):
        calls.append(case.id)
        if not case.data.exists():
            raise SkipCase(f"image not found: {case.data}")
        if case.id == "c5":
            raise RuntimeError("decoder exploded")
        return {"image": relative_path(case.data, out), "report": "The heart size is normal."}

    return convert


def test_run_prepare_writes_valid_datalist_and_resumes(tmp_path):
    cases = _source(tmp_path)
    out = tmp_path / "out"
    calls: list[str] = []
    s = run_prepare(source="toy", name="toy", modality="CXR", catalog="cxr_imagenome29", output=out,
                    cases=cases, convert=_convert(calls), progress=False)
    assert s.written == 10 and s.reused == 0
    assert sorted(i for i, _ in s.skipped) == ["c3", "c5"]
    assert s.skip_reasons() == {"image not found": 1, "RuntimeError": 1}
    assert s.validation_ok is True
    dl = load_datalist(out / "datalist.json")
    recs = {r["id"]: (split, r) for split in dl.splits for r in dl.splits[split]}
    assert len(recs) == 10 and recs["c0"][1]["patient"] == "p0"
    # paths are relative to the datalist and resolve to the source files
    assert not recs["c0"][1]["image"].startswith("/")
    assert dl.records(recs["c0"][0])[0]["image"].endswith(".png")
    # no patient straddles two splits
    by_patient: dict[str, set] = {}
    for split, r in recs.values():
        by_patient.setdefault(r["patient"], set()).add(split)
    assert all(len(v) == 1 for v in by_patient.values())
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["records"] == 10 and summary["skipped"] == 2

    # a re-run converts only what was skipped; finished cases are reused, splits unchanged
    calls.clear()
    s2 = run_prepare(source="toy", name="toy", modality="CXR", catalog="cxr_imagenome29", output=out,
                     cases=cases, convert=_convert(calls), progress=False)
    assert sorted(calls) == ["c3", "c5"] and s2.reused == 10 and s2.written == 0
    dl2 = load_datalist(out / "datalist.json")
    assert {r["id"]: s for s in dl2.splits for r in dl2.splits[s]} == {i: v[0] for i, v in recs.items()}
    # force converts everything again
    calls.clear()
    run_prepare(source="toy", name="toy", modality="CXR", catalog="cxr_imagenome29", output=out,
                cases=cases, convert=_convert(calls), progress=False, force=True)
    assert len(calls) == 12


def test_torn_state_line_is_converted_again(tmp_path):
    cases = _source(tmp_path, n=4)
    out = tmp_path / "out"
    calls: list[str] = []
    run_prepare(source="toy", name="toy", modality="CXR", catalog="cxr_imagenome29", output=out,
                cases=cases, convert=_convert(calls), progress=False, validate=False)
    state = out / STATE_FILE
    lines = state.read_text().splitlines()
    state.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # crash mid-write
    calls.clear()
    run_prepare(source="toy", name="toy", modality="CXR", catalog="cxr_imagenome29", output=out,
                cases=cases, convert=_convert(calls), progress=False, validate=False)
    assert sorted(calls) == sorted(["c3", json.loads(lines[-1])["id"]])


def test_hash_split_is_stable_and_follows_fractions():
    splits = [hash_split(f"patient{i}") for i in range(4000)]
    assert splits == [hash_split(f"patient{i}") for i in range(4000)]
    frac = {s: splits.count(s) / len(splits) for s in ("training", "validation", "test")}
    assert abs(frac["training"] - 0.8) < 0.03 and abs(frac["test"] - 0.1) < 0.02
    assert {hash_split(f"p{i}", (0, 0, 1)) for i in range(50)} == {"test"}
    with pytest.raises(ValueError, match="fractions"):
        hash_split("p", (0.5, 0.5))


def test_assign_splits_keeps_patients_together():
    cases = [SourceCase("a1", "A", "training"), SourceCase("a2", "A", "test"), SourceCase("b1", "B", "training"),
             SourceCase("c1", "C")]
    split, moved = assign_splits(cases)
    assert split["a1"] == split["a2"] == "test" and moved == ["A"]
    assert split["b1"] == "training"
    # validation carved out of the source's training patients, by patient
    many = [SourceCase(f"x{i}", f"P{i // 3}", "training") for i in range(600)]
    split, _ = assign_splits(many, validation_from_training=0.2)
    val = [c for c in many if split[c.id] == "validation"]
    assert 0.1 < len(val) / len(many) < 0.3
    assert all(split[c.id] == split[f"x{3 * (int(c.id[1:]) // 3)}"] for c in many)
    with pytest.raises(ValueError, match="unknown split"):
        assign_splits([SourceCase("z", split="train")])


def test_prepare_command_unknown_source(capsys):
    with pytest.raises(SystemExit, match="unknown source 'mimic'"):
        prepare_command("mimic", input="x", output="y")


def test_changed_options_convert_again_and_late_notes(tmp_path):
    cases = _source(tmp_path, n=4)
    out = tmp_path / "out"
    calls: list[str] = []
    kw = dict(source="toy", name="toy", modality="CXR", catalog="cxr_imagenome29", output=out, cases=cases,
              progress=False, validate=False)
    run_prepare(convert=_convert(calls), options={"fix": False}, **kw)
    calls.clear()
    s = run_prepare(convert=_convert(calls), options={"fix": False}, late_notes=lambda: [f"converted {len(calls)}", ""], **kw)
    assert sorted(calls) == ["c3"] and s.notes == ["converted 1"]  # same options: reused; empty note dropped
    calls.clear()
    s = run_prepare(convert=_convert(calls), options={"fix": True}, **kw)
    assert len(calls) == 4 and s.reused == 0
    assert any("options differ" in n for n in s.notes)
