"""CT converters end to end: ``prepare ctrate`` and ``prepare totalseg-masks`` on tiny fixtures in the real layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import prepare_fixtures_ct as fx
from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.data.datalist import load_datalist
from anatomy_vlp_bundle.data.validate import validate_datalist
from anatomy_vlp_bundle.prepare import prepare
from anatomy_vlp_bundle.prepare.totalseg import TOTAL_V2_CLASS_IDS, catalog_class_names


def _records(out: Path) -> dict[str, tuple[str, dict]]:
    """id -> (split, record with absolute paths)."""
    dl = load_datalist(out / "datalist.json")
    return {r["id"]: (split, r) for split in dl.splits for r in dl.records(split)}


def _raw_records(out: Path) -> dict[str, dict]:
    data = json.loads((out / "datalist.json").read_text())
    return {r["id"]: r for split in ("training", "validation", "test") for r in data.get(split, [])}


def _one_split_per_patient(records: dict[str, tuple[str, dict]]) -> None:
    splits: dict[str, set] = {}
    for split, rec in records.values():
        splits.setdefault(rec["patient"], set()).add(split)
    assert all(len(s) == 1 for s in splits.values()), splits


# --------------------------------------------------------------------------------------------- ctrate
def test_ctrate_records_labels_skips_and_resume(tmp_path):
    src = fx.build_ctrate(tmp_path / "CT-RATE")
    out = tmp_path / "out"
    s = prepare("ctrate", str(src), str(out), progress=False)
    assert s.validation_ok is True and s.written == 10 and s.reused == 0
    assert dict(s.skipped) == {
        fx.NO_FILE: f"volume file not found: {src / 'dataset/train/train_4/train_4_a/train_4_a_1.nii.gz'}",
        fx.NO_REPORT: "no report row: train_5_a_1 is not in train_reports.csv",
        fx.BAD_LABELS: "unreadable label row: train_predicted_labels.csv column 'Emphysema' holds 'maybe', expected 0 or 1",
        fx.NOT_CHEST: "not a chest CT: listed in no_chest_train.txt",
    }
    recs = _records(out)
    # one reconstruction per scan by default (the first present), every other volume once
    assert set(recs) == {"train_1_a_1", "train_2_a_1", "train_2_b_1", "train_3_a_1", "train_7_a_1", "train_9_a_1",
                         "train_10_a_1", "valid_1_a_1", "valid_2_a_1", "valid_3_a_1"}
    assert any("left out 1 more" in n for n in s.notes)
    # images are the source files in place, referenced relative to the output folder
    raw = _raw_records(out)
    assert raw["train_3_a_1"]["image"] == "../CT-RATE/dataset/train/train_3/train_3_a/train_3_a_1.nii.gz"
    assert Path(recs["train_3_a_1"][1]["image"]) == (src / "dataset/train/train_3/train_3_a/train_3_a_1.nii.gz").resolve()
    assert Path(recs["valid_3_a_1"][1]["image"]).parts[-4] == "valid_fixed"  # the corrected copy is preferred
    # patients and splits: train -> training/validation, valid -> test
    rec3 = recs["train_3_a_1"][1]
    assert rec3["patient"] == "train_3" and recs["valid_1_a_1"][1]["patient"] == "valid_1"
    assert {recs[i][0] for i in recs if i.startswith("valid_")} == {"test"}
    assert {recs[i][0] for i in recs if i.startswith("train_")} <= {"training", "validation"}
    _one_split_per_patient(recs)
    # report text and structured labels on the right anatomies
    assert rec3["report"] == ("FINDINGS: Findings of train_3_a_1. Emphysematous changes are seen in both lungs. The heart "
                              "is enlarged. IMPRESSION: Impression of train_3_a_1: emphysema, cardiomegaly.")
    assert recs["train_2_b_1"][1]["report"].endswith("The heart is enlarged.")  # "Not given." impression left out
    f = rec3["findings"]
    assert f["lung"]["emphysema"] == 1 and f["lung"]["atelectasis"] == 0 and len(f["lung"]) == 11
    assert f["heart"] == {"cardiomegaly": 1, "pericardial effusion": 0, "coronary artery wall calcification": 0}
    assert f["aorta"] == {"arterial wall calcification": 1} and f["esophagus"] == {"hiatal hernia": 1}
    assert set(f) == {"lung", "heart", "aorta", "esophagus"}
    assert rec3["study_findings"] == {"medical material": 0, "lymphadenopathy": 1}
    assert recs["train_1_a_1"][1]["findings"]["lung"]["emphysema"] == 0
    # no label row: kept with the report only, and said so
    assert "findings" not in recs[fx.NO_LABELS][1] and recs[fx.NO_LABELS][1]["report"]
    assert any("1 volumes have no row in train_predicted_labels.csv" in n for n in s.notes)
    # the originals' missing geometry is pointed out
    assert any("--fix-geometry" in n and "train_1_a_1" in n for n in s.notes)
    assert validate_datalist(out / "datalist.json", deep=True).ok

    # a second run converts nothing new; skipped cases are tried again and skipped again
    s2 = prepare("ctrate", str(src), str(out), progress=False)
    assert s2.written == 0 and s2.reused == 10 and len(s2.skipped) == 4
    assert _raw_records(out) == raw


def test_ctrate_all_reconstructions_and_patient_splits(tmp_path):
    src = fx.build_ctrate(tmp_path / "CT-RATE")
    out = tmp_path / "out"
    # the dataset/ folder works as input as well as the repository root
    s = prepare("ctrate", str(src / "dataset"), str(out), reconstructions="all", validation_fraction=0.5,
                progress=False)
    recs = _records(out)
    assert {"train_1_a_1", "train_1_a_2", "valid_2_a_1", "valid_2_a_2"} <= set(recs) and len(recs) == 12
    assert recs["train_1_a_1"][0] == recs["train_1_a_2"][0]
    assert recs["valid_2_a_2"][0] == "test"
    assert s.splits["validation"] > 0 and s.splits["training"] > 0 and s.splits["test"] == 4
    assert s.patients["test"] == 3
    _one_split_per_patient(recs)
    assert not any("left out" in n for n in s.notes)


def test_ctrate_fix_geometry_writes_spacing_and_hu(tmp_path):
    src = fx.build_ctrate(tmp_path / "CT-RATE")
    out = tmp_path / "out"
    s = prepare("ctrate", str(src), str(out), fix_geometry=True, progress=False)
    assert s.validation_ok is True
    reasons = dict(s.skipped)
    assert reasons[fx.BAD_METADATA] == "unreadable metadata: train_metadata.csv column XYSpacing holds ''"
    recs = _records(out)
    fixed = Path(recs["train_3_a_1"][1]["image"])
    assert fixed == (out / "volumes/train/train_3/train_3_a/train_3_a_1.nii.gz").resolve()
    img = nib.load(str(fixed))
    assert img.get_data_dtype() == np.int16
    assert np.allclose(img.header.get_zooms(), fx.spacing_of("train_3_a_1"))
    np.testing.assert_allclose(img.affine, fx.ras_affine(fx.spacing_of("train_3_a_1"), fx.position_of("train_3_a_1")))
    assert np.allclose(img.affine[:3, 3], [153.0, 160.0, -270.0])  # first voxel at ImagePositionPatient (LPS -> RAS)
    hu = np.asanyarray(img.dataobj)
    stored = fx.stored_values("train_3_a_1")
    for voxel in [(0, 0, 0), (15, 15, 7), (3, 9, 2)]:
        assert hu[voxel] == stored[voxel] - 1024  # value * RescaleSlope + RescaleIntercept
    assert hu[0, 0, 0] == -1000 + 3
    # an original already corrected in place, and the published *_fixed copy, are used as they are
    assert Path(recs[fx.ALREADY_FIXED][1]["image"]) == (src / "dataset/train/train_9/train_9_a/train_9_a_1.nii.gz").resolve()
    assert np.asanyarray(nib.load(recs[fx.ALREADY_FIXED][1]["image"]).dataobj)[0, 0, 0] == -1000 + 9
    assert "valid_fixed" in recs[fx.FIXED_COPY][1]["image"]
    assert not any("--fix-geometry" in n for n in s.notes)
    assert validate_datalist(out / "datalist.json", deep=True).ok
    # resume: nothing is rewritten
    mtime = fixed.stat().st_mtime_ns
    s2 = prepare("ctrate", str(src), str(out), fix_geometry=True, progress=False)
    assert s2.written == 0 and s2.reused == s.written and fixed.stat().st_mtime_ns == mtime


def test_ctrate_unmapped_label_column_and_bad_input(tmp_path):
    src = fx.build_ctrate(tmp_path / "CT-RATE", extra_label_columns=("Rib fracture",))
    s = prepare("ctrate", str(src), str(tmp_path / "out"), progress=False)
    notes = [n for n in s.notes if "Rib fracture" in n]
    assert notes == ["train_predicted_labels.csv: label column 'Rib fracture' is no finding of catalog 'ct_totalseg': not used",
                     "valid_predicted_labels.csv: label column 'Rib fracture' is no finding of catalog 'ct_totalseg': not used"]
    rec = _records(tmp_path / "out")["train_3_a_1"][1]
    assert "rib fracture" not in json.dumps(rec).lower()
    assert notes[0] in json.loads((tmp_path / "out/prepare_summary.json").read_text())["notes"]

    with pytest.raises(FileNotFoundError, match="CT-RATE folder not found"):
        prepare("ctrate", str(tmp_path / "nowhere"), str(tmp_path / "o2"), progress=False)
    with pytest.raises(ValueError, match="--reconstructions must be one of first, all"):
        prepare("ctrate", str(src), str(tmp_path / "o2"), reconstructions="last", progress=False)
    metadata = src / "dataset/metadata/validation_metadata.csv"
    metadata.rename(metadata.with_suffix(".bak"))
    with pytest.raises(FileNotFoundError, match="validation_metadata.csv: metadata CSV not found"):
        prepare("ctrate", str(src), str(tmp_path / "o2"), fix_geometry=True, progress=False)
    reports = src / "dataset/radiology_text_reports/train_reports.csv"
    with reports.open(newline="") as fh:
        rows = list(csv.reader(fh))
    keep = [i for i, c in enumerate(rows[0]) if c != "Findings_EN"]
    with reports.open("w", newline="") as fh:
        csv.writer(fh).writerows([[r[i] for i in keep] for r in rows])
    with pytest.raises(ValueError, match=r"train_reports.csv: missing required column\(s\) Findings_EN"):
        prepare("ctrate", str(src), str(tmp_path / "o2"), progress=False)


def test_ctrate_attaches_totalsegmentator_masks(tmp_path):
    src = fx.build_ctrate(tmp_path / "CT-RATE")
    masks = tmp_path / "seg"
    fx.write_multilabel(masks / "train_3_a_1.nii.gz", fx.organ_labels(), np.eye(4))
    fx.write_per_class(masks / "valid_1_a_1", {"liver": fx.organ_labels() == 5, "heart": fx.organ_labels() == 51},
                       np.eye(4))
    out = tmp_path / "out"
    s = prepare("ctrate", str(src), str(out), masks=str(masks), progress=False)
    recs = _records(out)
    assert Path(recs["train_3_a_1"][1]["anatomy_mask"]) == (masks / "train_3_a_1.nii.gz").resolve()
    combined = nib.load(recs["valid_1_a_1"][1]["anatomy_mask"])
    assert Path(combined.get_filename()) == (out / "masks/valid_1_a_1.nii.gz").resolve()
    assert np.array_equal(np.asanyarray(combined.dataobj), np.where(np.isin(fx.organ_labels(), (5, 51)), fx.organ_labels(), 0))
    assert "anatomy_mask" not in recs["train_1_a_1"][1]
    assert "train: TotalSegmentator outputs found for 1 of 11 volumes" in "\n".join(s.notes)
    report = validate_datalist(out / "datalist.json", deep=True)
    assert report.ok and report.label_maps_decoded == 2


# --------------------------------------------------------------------------------------------- totalseg-masks
def test_totalseg_table_matches_catalog_and_source():
    names, unnamed = catalog_class_names(load_catalog("ct_totalseg"))
    assert unnamed == [] and len(names) == len(TOTAL_V2_CLASS_IDS) == 52  # only the needed classes
    for name, label in fx.TOTAL_V2.items():  # ids as map_to_binary.py class_map["total"] gives them
        assert TOTAL_V2_CLASS_IDS.get(name, label) == label


def _masks_for_datalist(root: Path) -> Path:
    masks = root / "seg"
    ident = np.eye(4)
    labels = fx.organ_labels()
    # c0: multilabel file named after the id, on a flipped grid (same physical voxels)
    flipped = ident.copy()
    flipped[0, 0], flipped[0, 3] = -1.0, fx.SHAPE[0] - 1
    fx.write_multilabel(masks / "c0.nii.gz", labels[::-1], flipped)
    # c1: per-class folder; the left atrial appendage overlaps the heart; prostate is not a catalog class
    per_class = {name: labels == label for name, label in fx.TOTAL_V2.items()}
    appendage = np.zeros(fx.SHAPE, dtype=bool)
    appendage[8:10, 8:10, 2:3] = True
    per_class["atrial_appendage_left"] = appendage
    cyst = np.zeros(fx.SHAPE, dtype=bool)
    cyst[0, 15, 7] = True
    per_class["kidney_cyst_right"] = cyst
    prostate = np.zeros(fx.SHAPE, dtype=bool)
    prostate[0, 0, 0] = True
    per_class["prostate"] = prostate
    fx.write_per_class(masks / "c1", per_class, ident)
    # c2: named after the image file; c3: none; c4: truncated; c5: v1 ids; c6: no heart files; c8: v2 label table
    fx.write_multilabel(masks / "scan_c2.nii.gz", labels, ident)
    fx.write_truncated(masks / "c4.nii.gz", labels, ident)
    fx.write_multilabel(masks / "c5.nii.gz", labels, ident, table={5: "liver", 7: "aorta", 10: "pancreas"})
    fx.write_per_class(masks / "c6", {}, ident,
                       classes=[n for n in fx.TOTAL_V2 if n not in ("heart", "atrial_appendage_left")])
    fx.write_multilabel(masks / "c7.nii.gz", labels, ident)
    fx.write_multilabel(masks / "c8.nii.gz", labels, ident, table={v: k for k, v in fx.TOTAL_V2.items()})
    return masks


def test_totalseg_masks_multilabel_per_class_and_skips(tmp_path):
    source = fx.build_ct_datalist(tmp_path / "ds")
    masks = _masks_for_datalist(tmp_path)
    out = tmp_path / "out"
    s = prepare("totalseg-masks", str(masks), str(out), datalist=str(source), progress=False)
    assert s.validation_ok is True
    reasons = dict(s.skipped)
    assert set(reasons) == {"c4", "c5", "c6"}
    assert reasons["c4"].startswith(f"unreadable mask: {masks / 'c4.nii.gz'}: ")
    assert reasons["c5"] == (f"not TotalSegmentator v2 'total' ids: {masks / 'c5.nii.gz'}: its label table says 7 = aorta, "
                             "v2 'total' has aorta = 52 (a TotalSegmentator v1 or other-task output?)")
    assert reasons["c6"].startswith("mask does not cover anatomies heart: ")
    recs = _records(out)
    # splits and patients as in the source datalist
    assert {i: split for i, (split, _) in recs.items()} == {"c0": "training", "c1": "training", "c2": "training",
                                                           "c3": "training", "c7": "test", "c8": "test"}
    # multilabel files in place, found by id or by image file name
    assert Path(recs["c0"][1]["anatomy_mask"]) == (masks / "c0.nii.gz").resolve()
    assert Path(recs["c2"][1]["anatomy_mask"]) == (masks / "scan_c2.nii.gz").resolve()
    assert Path(recs["c8"][1]["anatomy_mask"]) == (masks / "c8.nii.gz").resolve()
    # per-class files combined into one uint8 map with v2 ids, on the class files' grid
    combined = nib.load(recs["c1"][1]["anatomy_mask"])
    assert Path(combined.get_filename()) == (out / "masks/c1.nii.gz").resolve()
    data = np.asanyarray(combined.dataobj)
    assert data.dtype == np.uint8 and data.shape == fx.SHAPE and np.allclose(combined.affine, np.eye(4))
    assert data[3, 3, 2] == 10 and data[11, 11, 4] == 51 and data[12, 3, 6] == 5 and data[7, 7, 0] == 52
    assert data[8, 8, 2] == 61 and data[0, 15, 7] == 24  # overlap: the larger id wins; a kidney cyst counts
    assert data[0, 0, 0] == 0 and data[15, 15, 0] == 0  # prostate is no catalog class; background stays 0
    assert set(np.unique(data)) == {0, 5, 10, 24, 51, 52, 61}
    # records without an output keep their fields; an existing anatomy_mask is kept
    raw = _raw_records(out)
    assert "anatomy_mask" not in raw["c3"] and raw["c3"]["image"] == "../ds/images/scan_c3.nii.gz"
    assert raw["c3"]["report"] == "FINDINGS: The liver is normal."
    assert raw["c7"]["anatomy_mask"] == "../ds/masks/c7.nii.gz"
    notes = "\n".join(s.notes)
    assert "TotalSegmentator outputs found for 7 records; 1 records have none" in notes
    assert "1 records already had an anatomy_mask and kept it" in notes
    report = validate_datalist(out / "datalist.json", deep=True)
    assert report.ok and report.label_maps_decoded == 5

    s2 = prepare("totalseg-masks", str(masks), str(out), datalist=str(source), progress=False)
    assert s2.written == 0 and s2.reused == 6 and {i for i, _ in s2.skipped} == {"c4", "c5", "c6"}
    # --replace uses TotalSegmentator's map instead of the existing one
    prepare("totalseg-masks", str(masks), str(tmp_path / "out2"), datalist=str(source), replace=True, progress=False)
    assert Path(_records(tmp_path / "out2")["c7"][1]["anatomy_mask"]) == (masks / "c7.nii.gz").resolve()


def test_totalseg_masks_bad_input(tmp_path):
    source = fx.build_ct_datalist(tmp_path / "ds", n=2)
    masks = tmp_path / "seg"
    masks.mkdir()
    with pytest.raises(ValueError, match="--output must differ"):
        prepare("totalseg-masks", str(masks), str(tmp_path / "ds"), datalist=str(source), progress=False)
    with pytest.raises(FileNotFoundError, match="mask folder not found"):
        prepare("totalseg-masks", str(tmp_path / "none"), str(tmp_path / "o"), datalist=str(source), progress=False)
    with pytest.raises(ValueError, match="--datalist is required"):
        prepare("totalseg-masks", str(masks), str(tmp_path / "o"), progress=False)
    cxr = json.loads(source.read_text())
    cxr["modality"], cxr["catalog"] = "CXR", "cxr_imagenome29"
    (tmp_path / "cxr.json").write_text(json.dumps(cxr))
    with pytest.raises(ValueError, match="modality is 'CXR'"):
        prepare("totalseg-masks", str(masks), str(tmp_path / "o"), datalist=str(tmp_path / "cxr.json"), progress=False)


def test_cli_prepare_ctrate_then_totalseg(tmp_path, capsys):
    from anatomy_vlp_bundle.cli import main

    src = fx.build_ctrate(tmp_path / "CT-RATE")
    main(["prepare", "ctrate", "--input", str(src), "--output", str(tmp_path / "ct"), "--fix-geometry",
          "--reconstructions", "all", "--noprogress"])
    printed = capsys.readouterr().out
    assert "prepare ctrate: 11 cases written" in printed and "unreadable metadata: 1" in printed
    masks = tmp_path / "seg"  # TotalSegmentator run on the corrected volume: the mask shares its geometry
    fx.write_multilabel(masks / "train_3_a_1.nii.gz", fx.organ_labels(),
                        fx.ras_affine(fx.spacing_of("train_3_a_1"), fx.position_of("train_3_a_1")))
    main(["prepare", "totalseg-masks", "--input", str(masks), "--output", str(tmp_path / "ct+seg"),
          "--datalist", str(tmp_path / "ct" / "datalist.json"), "--noprogress"])
    assert "prepare totalseg-masks: 11 cases written" in capsys.readouterr().out
    recs = _records(tmp_path / "ct+seg")
    assert Path(recs["train_3_a_1"][1]["anatomy_mask"]) == (masks / "train_3_a_1.nii.gz").resolve()
    assert Path(recs["train_3_a_1"][1]["image"]) == (tmp_path / "ct/volumes/train/train_3/train_3_a/train_3_a_1.nii.gz").resolve()
