"""The chest X-ray converters end to end: imagenome, iu-xray, chexpert, nih-cxr14 -> datalist -> validate."""

from __future__ import annotations

import json
import shutil

import pytest

from anatomy_vlp_bundle.cli import main as cli_main
from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.data.datalist import SPLITS, load_datalist
from anatomy_vlp_bundle.data.validate import validate_datalist
from anatomy_vlp_bundle.prepare import prepare, prepare_command
from anatomy_vlp_bundle.prepare.common import SUMMARY_FILE
from anatomy_vlp_bundle.prepare.cxr_labels import LABEL_FINDINGS, SINGLE_REGION, STUDY_FINDINGS, image_label_catalog
from anatomy_vlp_bundle.prepare.imagenome import ATTRIBUTE_FINDINGS
from anatomy_vlp_bundle.prepare.iu_xray import MESH_FINDINGS, MESH_QUALIFIED, mesh_labels

from prepare_fixtures_cxr import build_chexpert, build_imagenome, build_iu_kaggle, build_iu_openi, build_nih


def _records(out) -> dict[str, tuple[str, dict]]:
    """id -> (split, record) of ``out/datalist.json``, after checking that its paths resolve."""
    dl = load_datalist(out / "datalist.json")
    recs = {}
    for split in SPLITS:
        for raw, resolved in zip(dl.records(split, resolve=False), dl.records(split)):
            assert not raw["image"].startswith("/"), raw["image"]
            assert (out / raw["image"]).is_file() and resolved["image"].startswith("/")
            recs[raw["id"]] = (split, raw)
    return recs


def _check_patients(recs) -> dict[str, str]:
    """patient -> its one split (fails when a patient straddles two)."""
    of: dict[str, set] = {}
    for split, r in recs.values():
        of.setdefault(r["patient"], set()).add(split)
    assert all(len(s) == 1 for s in of.values()), of
    return {p: s.pop() for p, s in of.items()}


def _deep_ok(out) -> None:
    report = validate_datalist(out / "datalist.json", deep=True)
    assert report.ok, report.format()


# ------------------------------------------------------------------------------------------ mapping tables
def test_dataset_catalog_and_label_tables_are_consistent():
    base, cat = load_catalog("cxr_imagenome29"), image_label_catalog()
    assert cat.to_dict()["anatomies"] == base.to_dict()["anatomies"]  # checkpoints map by anatomy name
    assert cat.study_findings == STUDY_FINDINGS and cat.study_findings[:2] == base.study_findings
    owned = {f for a in cat.anatomies for f in a.findings}
    for finding in {*LABEL_FINDINGS.values(), *MESH_FINDINGS.values(), *MESH_QUALIFIED.values()}:
        single = SINGLE_REGION.get(finding)
        assert finding in cat.study_findings or (single and finding in cat.anatomy(single).findings) or finding in owned, finding
    for findings, _ in ATTRIBUTE_FINDINGS.values():
        assert all(f in owned for f in findings), findings


def test_mesh_terms_are_placed_by_side_and_zone():
    cat = image_label_catalog()
    rec, unmapped, unplaced = mesh_labels([
        "Opacity/lung/base/left", "Pneumothorax/apex/right", "Pulmonary Atelectasis/lingula", "Pneumothorax/base/left",
        "Diaphragm/right/elevated", "Aorta, Thoracic/tortuous/mild", "Fractures, Bone/clavicle/left",
        "Cardiomegaly/borderline", "Diaphragm/elevated", "Calcified Granuloma/lung/upper lobe/right", "Emphysema",
        "No Indexing"], cat)
    assert rec["findings"] == {
        "right apical zone": {"pneumothorax": 1},
        "right hemidiaphragm": {"elevated hemidiaphragm": 1},
        "left lung": {"pneumothorax": 1},  # the left lower lung zone has no pneumothorax: its lung has
        "left mid lung zone": {"atelectasis": 1},
        "left lower lung zone": {"lung opacity": 1},
        "left clavicle": {"fracture": 1},
        "aortic arch": {"tortuous aorta": 1},
        "cardiac silhouette": {"cardiomegaly": -1},
    }
    assert rec["study_findings"] == {"no finding": 0, "emphysema": 1}
    assert unmapped == ["calcified granuloma"] and unplaced == ["elevated hemidiaphragm"]
    # devices alone do not make a study abnormal; "normal" sets everything else to 0
    rec, _, _ = mesh_labels(["Catheters, Indwelling"], cat)
    assert rec == {"study_findings": {"support devices": 1}}
    rec, _, _ = mesh_labels(["normal"], cat)
    assert rec["study_findings"]["no finding"] == 1 and rec["study_findings"]["pneumothorax"] == 0
    assert rec["findings"]["left costophrenic angle"] == {"pleural effusion": 0, "blunted costophrenic angle": 0}
    assert sum(len(v) for v in rec["findings"].values()) == len(cat.finding_pairs())


# ------------------------------------------------------------------------------------------ imagenome
def test_imagenome_boxes_sentences_findings_splits_and_resume(tmp_path):
    fx = build_imagenome(tmp_path / "src")
    out = tmp_path / "out"
    s = prepare("imagenome", input=str(fx["imagenome"]), output=str(out), mimic_root=str(fx["mimic"]), progress=False)
    ids = fx["ids"]
    assert s.written == 4 and s.validation_ok is True
    assert {i: r.split(": ")[0] for i, r in s.skipped} == {
        ids["no_image"]: "image not found", ids["bad_json"]: "malformed scene graph", ids["no_graph"]: "no scene graph",
        ids["no_meta"]: "boxes beyond the image"}
    recs = _records(out)
    assert ids["gold"] not in recs and any("1 gold-standard images" in n for n in s.notes)
    kept = ("full", "small", "valid", "test")
    assert {k: recs[ids[k]][0] for k in kept} == {k: fx["splits"][k] for k in kept}
    assert _check_patients(recs)["10000032"] == "training"

    full = recs[ids["full"]][1]
    assert full["patient"] == "10000032" and full["image"].endswith(f"s50414267/{ids['full']}.jpg")
    # original pixels as given (JPG at DICOM size), max exclusive, clipped (spine: 95 -> 80), empty / non-catalog boxes dropped
    assert full["anatomy_boxes"] == {"right lung": [5, 10, 30, 70], "left lung": [34, 10, 60, 70], "spine": [28, 0, 36, 80],
                                     "cardiac silhouette": [20, 40, 50, 75]}
    assert full["anatomy_sentences"] == {
        "right lung": ["Right lower lobe opacity, likely atelectasis."],
        "left lung": ["No left pneumothorax or effusion.", "Low lung volumes."],
        "trachea": ["Endotracheal tube terminates 4 cm above the carina."],
        "cardiac silhouette": ["The heart is mildly enlarged."]}
    # narrower attributes carry 'yes' only ('no hydropneumothorax' says nothing of pneumothorax in general)
    assert full["findings"] == {"right lung": {"lung opacity": 1, "atelectasis": 1},
                                "left lung": {"pleural effusion": 0, "pneumothorax": 0},
                                "trachea": {"endotracheal tube": 1}, "cardiac silhouette": {"cardiomegaly": 1}}
    assert full["study_findings"] == {"support devices": 1}
    assert full["report"].startswith("Right lower lobe opacity, likely atelectasis. No left pneumothorax")
    # a downscaled JPG (32x40 of a 64x80 DICOM): boxes rescaled by the metadata's Rows / Columns
    assert recs[ids["small"]][1]["anatomy_boxes"] == {"right lung": [2.5, 5, 15, 35], "left lung": [17, 5, 30, 35],
                                                      "cardiac silhouette": [10, 20, 25, 37.5]}
    assert recs[ids["valid"]][1]["findings"] == {"cardiac silhouette": {"cardiomegaly": 0}}
    notes = "\n".join(s.notes)
    assert "low lung volumes (1)" in notes and "pleural effusion on cardiac silhouette (1)" in notes
    assert "left breast (1)" in notes and "1 boxes empty after clipping" in notes
    assert json.loads((out / SUMMARY_FILE).read_text())["notes"] == s.notes
    _deep_ok(out)

    again = prepare("imagenome", input=str(fx["imagenome"]), output=str(out), mimic_root=str(fx["mimic"]), progress=False)
    assert again.written == 0 and again.reused == 4 and len(again.skipped) == 4
    assert _records(out) == recs


def test_imagenome_reports_and_no_metadata(tmp_path):
    fx = build_imagenome(tmp_path / "src")
    (fx["mimic"] / "mimic-cxr-2.0.0-metadata.csv").unlink()
    out = tmp_path / "out"
    s = prepare("imagenome", input=str(fx["imagenome"]), output=str(out), mimic_root=str(fx["mimic"]),
                reports=str(fx["reports"]), exclude_gold=False, progress=False)
    recs = _records(out)
    ids = fx["ids"]
    # without DICOM sizes the 32x40 copy's boxes (made for 64x80) reach far beyond it: skipped, not misplaced
    assert dict(s.skipped)[ids["small"]].startswith("boxes beyond the image")
    assert recs[ids["full"]][1]["report"] == fx["report_file"].read_text().strip()
    assert recs[ids["valid"]][1]["report"] == "Heart size is normal."  # no report file: the phrases
    assert recs[ids["gold"]][0] == "test" and any("MIMIC-CXR reports not found" in n for n in s.notes)
    _deep_ok(out)


def test_imagenome_bad_inputs_name_the_file(tmp_path):
    fx = build_imagenome(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="MIMIC-CXR-JPG image folder"):
        prepare("imagenome", input=str(fx["imagenome"]), output=str(tmp_path / "o1"))
    train = fx["imagenome"] / "silver_dataset" / "splits" / "train.csv"
    train.write_text(train.read_text().replace("dicom_id", "dicom"))
    with pytest.raises(ValueError, match=r"train\.csv: missing required column\(s\) \['dicom_id'\]"):
        prepare("imagenome", input=str(fx["imagenome"]), output=str(tmp_path / "o2"), mimic_root=str(fx["mimic"]))
    shutil.rmtree(fx["imagenome"] / "silver_dataset" / "splits")
    with pytest.raises(FileNotFoundError, match="none of the split files"):
        prepare("imagenome", input=str(fx["imagenome"]), output=str(tmp_path / "o3"), mimic_root=str(fx["mimic"]))


# ------------------------------------------------------------------------------------------ iu-xray
def test_iu_openi_records_frontal_filter_skips_and_resume(tmp_path):
    fx = build_iu_openi(tmp_path / "src")
    out = tmp_path / "out"
    s = prepare("iu-xray", input=str(fx["root"]), output=str(out), progress=False)
    assert s.written == 10 and s.validation_ok is True
    assert dict(s.skipped) == {
        "ecgen-radiology/3.xml": dict(s.skipped)["ecgen-radiology/3.xml"],
        "ecgen-radiology/4.xml": f"no image: {fx['reports'] / '4.xml'} has no parentImage",
        "CXR5_IM-2117-1001": f"image not found: {fx['images'] / 'CXR5_IM-2117-1001.png'}",
        "CXR6_IM-2192-1001": f"no report text: {fx['reports'] / '6.xml'} has no FINDINGS or IMPRESSION",
    }
    assert dict(s.skipped)["ecgen-radiology/3.xml"].startswith(f"malformed XML: {fx['reports'] / '3.xml'}")
    recs = _records(out)
    # lateral images (known from indiana_projections.csv) left out
    assert "CXR1_1_IM-0001-4001" not in recs and "CXR2_IM-0652-2001" not in recs and "CXR1_1_IM-0001-3001" in recs
    _check_patients(recs)
    assert len({split for split, _ in recs.values()}) > 1
    normal = recs["CXR1_1_IM-0001-3001"][1]
    assert normal["patient"] == "CXR1" and normal["image"].endswith("NLMCXR_png/CXR1_1_IM-0001-3001.png")
    assert normal["report"] == ("FINDINGS: The cardiac silhouette and mediastinum size are within normal limits. "
                                "There is no pulmonary edema.\nIMPRESSION: Normal chest x-XXXX.")
    assert normal["study_findings"]["no finding"] == 1 and set(normal["study_findings"]) == set(STUDY_FINDINGS)
    assert all(v == 0 for fd in normal["findings"].values() for v in fd.values()) and len(normal["findings"]) == 29
    sick = recs["CXR2_IM-0652-1001"][1]
    assert sick["findings"] == {"right lung": {"pleural effusion": 1}, "left lung": {"pleural effusion": 1},
                                "left lower lung zone": {"lung opacity": 1}, "cardiac silhouette": {"cardiomegaly": -1}}
    assert sick["study_findings"] == {"no finding": 0, "atelectasis": 1}  # <automatic> 'pneumonia' not used by default
    assert json.loads((out / "catalog.json").read_text())["study_findings"] == list(STUDY_FINDINGS)
    assert any("calcified granuloma (1)" in n for n in s.notes)
    _deep_ok(out)

    again = prepare("iu-xray", input=str(fx["root"]), output=str(out), progress=False)
    assert again.written == 0 and again.reused == 10 and _records(out) == recs

    every = tmp_path / "every"
    s2 = prepare("iu-xray", input=str(fx["root"]), output=str(every), frontal_only=False, automatic_terms=True, progress=False)
    recs2 = _records(every)
    assert s2.written == 12 and "CXR2_IM-0652-2001" in recs2
    assert recs2["CXR2_IM-0652-1001"][1]["study_findings"]["pneumonia"] == 1
    assert recs2["CXR1_1_IM-0001-3001"][0] == recs2["CXR1_1_IM-0001-4001"][0]  # one patient, one split


def test_iu_openi_without_projections_keeps_every_image(tmp_path):
    fx = build_iu_openi(tmp_path / "src", projections=False)
    s = prepare("iu-xray", input=str(fx["root"]), output=str(tmp_path / "out"), progress=False, validate=False)
    assert s.written == 12 and any("projection unknown for 14 images" in n for n in s.notes)


def test_iu_kaggle_layout(tmp_path):
    fx = build_iu_kaggle(tmp_path / "src")
    out = tmp_path / "out"
    s = prepare("iu-xray", input=str(fx["root"]), output=str(out), progress=False)
    assert {i: r.split(":")[0] for i, r in s.skipped} == {"5_IM-2117-1001": "image not found", "99_IM-9999-1001": "no report"}
    recs = _records(out)
    assert "1_IM-0001-4001" not in recs and recs["1_IM-0001-3001"][1]["patient"] == "CXR1"
    assert recs["2_IM-0652-1001"][1]["image"].endswith("images/images_normalized/2_IM-0652-1001.dcm.png")
    openi = build_iu_openi(tmp_path / "openi")
    prepare("iu-xray", input=str(openi["root"]), output=str(tmp_path / "openi_out"), progress=False, validate=False)
    same = _records(tmp_path / "openi_out")["CXR2_IM-0652-1001"][1]
    assert {k: recs["2_IM-0652-1001"][1][k] for k in ("report", "findings", "study_findings")} == {
        k: same[k] for k in ("report", "findings", "study_findings")}
    _deep_ok(out)


# ------------------------------------------------------------------------------------------ chexpert
def test_chexpert_labels_splits_frontal_and_resume(tmp_path):
    fx = build_chexpert(tmp_path / "src")
    out = tmp_path / "out"
    s = prepare("chexpert", input=str(fx["root"]), output=str(out), validation_fraction=0.5, progress=False)
    assert s.written == 7 and s.validation_ok is True
    skipped = dict(s.skipped)
    assert skipped["patient00003_study1_view1_frontal"] == (
        f"image not found: {fx['base'] / 'train/patient00003/study1/view1_frontal.jpg'}")
    assert skipped["patient00004_study1_view1_frontal"] == (
        f"malformed row: {fx['base'] / 'train.csv'} line 6: column 'Edema' holds 'maybe' (expected 1.0, 0.0, -1.0 or blank)")
    recs = _records(out)
    assert "patient00001_study1_view2_lateral" not in recs
    first = recs["patient00001_study1_view1_frontal"][1]
    assert first["patient"] == "patient00001"
    assert first["findings"] == {"cardiac silhouette": {"cardiomegaly": 1}}
    # -1 kept (uncertain), blank 'Lung Opacity' left out (unknown)
    assert first["study_findings"] == {"support devices": 1, "edema": -1, "pleural effusion": 0}
    assert "report" not in first
    assert recs["patient00002_study1_view1_frontal"][1]["study_findings"] == {"no finding": 1}
    # official valid.csv -> test; validation carved out of train.csv by patient
    split_of = _check_patients(recs)
    assert split_of["patient64541"] == split_of["patient64542"] == "test"
    train_patients = {"patient00001", "patient00002", "patient00005", "patient00006"}
    assert {split_of[p] for p in train_patients} == {"training", "validation"}
    _deep_ok(out)

    again = prepare("chexpert", input=str(fx["root"]), output=str(out), validation_fraction=0.5, progress=False)
    assert again.written == 0 and again.reused == 7 and _records(out) == recs
    lateral = prepare("chexpert", input=str(fx["base"]), output=str(tmp_path / "all"), frontal_only=False,
                      progress=False, validate=False)
    assert lateral.written == 8


def test_chexpert_command_line_and_errors(tmp_path, capsys):
    fx = build_chexpert(tmp_path / "src")
    out = tmp_path / "out"
    cli_main(["prepare", "chexpert", "--input", str(fx["root"]), "--output", str(out), "--progress=False"])
    printed = capsys.readouterr().out
    assert "prepare chexpert: 7 cases written" in printed and "malformed row: 1" in printed
    assert validate_datalist(out / "datalist.json").ok
    with pytest.raises(SystemExit, match="prepare chexpert: .*nowhere: input folder not found"):
        prepare_command("chexpert", input=str(tmp_path / "nowhere"), output=str(tmp_path / "o"))
    train = fx["base"] / "train.csv"
    train.write_text(train.read_text().replace("Pleural Effusion", "Effusion", 1))
    with pytest.raises(ValueError, match=r"train\.csv: missing required column\(s\) \['Pleural Effusion'\]"):
        prepare("chexpert", input=str(fx["root"]), output=str(tmp_path / "o"))


# ------------------------------------------------------------------------------------------ nih-cxr14
def test_nih_labels_official_splits_and_resume(tmp_path):
    fx = build_nih(tmp_path / "src")
    out = tmp_path / "out"
    s = prepare("nih-cxr14", input=str(fx["root"]), output=str(out), validation_fraction=0.5, progress=False)
    assert s.written == 7 and s.validation_ok is True
    assert {i: r.split(":")[0] for i, r in s.skipped} == {"00000004_000": "malformed row", "00000005_000": "image not found"}
    assert "unknown finding label(s) ['pneumonitis']" in dict(s.skipped)["00000004_000"]
    recs = _records(out)
    both = recs["00000001_001"][1]
    assert both["patient"] == "1" and both["image"].endswith("images_001/images/00000001_001.png")
    assert both["findings"] == {"cardiac silhouette": {"cardiomegaly": 1}}
    expected = {f: 0 for f in STUDY_FINDINGS if f not in ("support devices", "enlarged cardiomediastinum", "lung opacity",
                                                          "lung lesion", "pleural other", "fracture")}
    assert both["study_findings"] == dict(expected, **{"pleural effusion": 1})
    assert recs["00000002_000"] == ("test", recs["00000002_000"][1])
    assert recs["00000002_000"][1]["study_findings"] == dict(expected, **{"no finding": 1})
    assert recs["00000006_002"][1]["image"].endswith("images_002/images/00000006_002.png")
    assert recs["00000006_002"][1]["study_findings"]["infiltration"] == 1
    split_of = _check_patients(recs)
    assert split_of["2"] == "test" and {split_of[p] for p in ("1", "3", "6")} <= {"training", "validation"}
    assert any("BBox_List_2017.csv: 2 pathology boxes on 2 images not used" in n for n in s.notes)
    _deep_ok(out)

    again = prepare("nih-cxr14", input=str(fx["root"]), output=str(out), validation_fraction=0.5, progress=False)
    assert again.written == 0 and again.reused == 7 and _records(out) == recs


def test_nih_without_split_lists_and_bad_table(tmp_path):
    fx = build_nih(tmp_path / "src")
    for name in ("train_val_list.txt", "test_list.txt"):
        (fx["root"] / name).unlink()
    s = prepare("nih-cxr14", input=str(fx["root"]), output=str(tmp_path / "out"), progress=False)
    assert any("splits derived by patient hash" in n for n in s.notes) and s.validation_ok
    _check_patients(_records(tmp_path / "out"))
    table = fx["root"] / "Data_Entry_2017_v2020.csv"
    table.write_text(table.read_text().replace("Patient ID", "Patient"))
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020\.csv: missing required column\(s\) \['Patient ID'\]"):
        prepare("nih-cxr14", input=str(fx["root"]), output=str(tmp_path / "o"))
