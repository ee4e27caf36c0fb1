"""Datalist validator and ``validate`` command (``anatomy_vlp_bundle.data.validate``, ``data.headers``).

Every dataset here is built in ``tmp_path`` from a few tiny NIfTI volumes / PNG images, so the
tests do not depend on the synthetic generator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from anatomy_vlp_bundle.data import validate as validate_mod
from anatomy_vlp_bundle.data.headers import (
    HeaderError,
    itk_to_ras_affine,
    overlap_fraction,
    read_header,
    world_bounds,
)
from anatomy_vlp_bundle.data.validate import (
    mask_fraction_outside,
    validate_command,
    validate_datalist,
)

REPO = Path(__file__).resolve().parents[1]

CT_CATALOG = {
    "name": "tiny_ct",
    "modality": "CT",
    "anatomies": [
        {"name": "liver", "labels": [5], "findings": ["hypodense lesion", "steatosis"]},
        {"name": "spleen", "labels": [1], "findings": ["splenomegaly"]},
        {"name": "lung", "labels": [10, 11], "findings": ["nodule"]},
    ],
    "study_findings": ["lymphadenopathy"],
}
SHAPE = (12, 10, 8)
SPACING = 2.0
ORIGIN = np.array([-10.0, -8.0, 4.0])


def ct_affine(origin=ORIGIN, spacing=SPACING) -> np.ndarray:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def label_map() -> np.ndarray:
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[2:6, 2:6, 2:6] = 5  # liver
    lab[7:10, 3:7, 3:6] = 1  # spleen
    return lab


def liver_box_world() -> list[float]:
    lo = ORIGIN + (np.array([2, 2, 2]) - 0.5) * SPACING
    hi = ORIGIN + (np.array([5, 5, 5]) + 0.5) * SPACING
    return [float(v) for v in np.concatenate([lo, hi])]


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def make_ct_datalist(root: Path, splits=(("training", 3), ("validation", 1), ("test", 1))) -> Path:
    """A valid CT datalist: NIfTI volumes, label maps, boxes, reports, findings, own catalog.json."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "catalog.json").write_text(json.dumps(CT_CATALOG))
    data: dict = {"name": "tiny-ct", "modality": "CT", "catalog": "catalog.json"}
    k = 0
    for split, n in splits:
        recs = []
        for _ in range(n):
            cid = f"case_{k:03d}"
            save_nifti(root / "images" / f"{cid}.nii.gz", rng.integers(-1000, 1000, SHAPE).astype(np.int16), ct_affine())
            save_nifti(root / "masks" / f"{cid}.nii.gz", label_map(), ct_affine())
            recs.append(
                {
                    "id": cid,
                    "patient": f"p{k:03d}",
                    "image": f"images/{cid}.nii.gz",
                    "anatomy_mask": f"masks/{cid}.nii.gz",
                    "anatomy_boxes": {"liver": liver_box_world()},
                    "report": "FINDINGS: The liver contains a hypodense lesion. The spleen is normal.",
                    "anatomy_sentences": {"liver": ["The liver contains a hypodense lesion."]},
                    "findings": {"liver": {"hypodense lesion": 1, "steatosis": 0}, "spleen": {"splenomegaly": -1}},
                    "study_findings": {"lymphadenopathy": 0},
                }
            )
            k += 1
        data[split] = recs
    path = root / "datalist.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def make_cxr_datalist(root: Path, n: int = 3) -> Path:
    """A valid CXR datalist: 8-bit PNG radiographs, PNG region masks, pixel boxes, built-in catalog."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    recs = []
    for k in range(n):
        cid = f"cxr_{k:03d}"
        Image.fromarray(rng.integers(0, 255, (40, 32), dtype=np.uint8)).save(root / "images" / f"{cid}.png")  # 32 wide, 40 high
        m = np.zeros((40, 32), dtype=np.uint8)
        m[5:30, 2:14] = 255
        Image.fromarray(m).save(root / "masks" / f"{cid}_rl.png")
        recs.append(
            {
                "id": cid,
                "image": f"images/{cid}.png",
                "anatomy_masks": {"right lung": f"masks/{cid}_rl.png"},
                "anatomy_boxes": {"cardiac silhouette": [10, 20, 24, 34]},
                "report": "Small right pleural effusion. Heart size normal.",
                "findings": {"right lung": {"pleural effusion": 1}},
                "study_findings": {"support devices": 0},
            }
        )
    path = root / "datalist.json"
    path.write_text(json.dumps({"name": "tiny-cxr", "modality": "CXR", "catalog": "cxr_imagenome29", "training": recs}))
    return path


def edit(path: Path, fn) -> Path:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    return path


def errors_of(report, **match):
    return [p for p in report.errors if all(getattr(p, k) == v for k, v in match.items())]


# --------------------------------------------------------------------------- valid data
def test_valid_ct_datalist_passes_headers_and_deep(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct")
    rep = validate_datalist(dl)
    assert rep.problems == [], [p.format() for p in rep.problems]
    assert rep.ok and rep.records == {"training": 3, "validation": 1, "test": 1}
    assert rep.anatomies_present == {"liver": 5}  # boxes only: label maps are not opened without deep
    deep = validate_datalist(dl, deep=True)
    assert deep.problems == [], [p.format() for p in deep.problems]
    assert deep.anatomies_present == {"liver": 5, "spleen": 5}
    assert deep.label_maps_decoded == 5 and deep.ignored_label_values == {}


def test_valid_cxr_datalist_passes(tmp_path):
    dl = make_cxr_datalist(tmp_path / "cxr")
    rep = validate_datalist(dl, deep=True)
    assert rep.problems == [], [p.format() for p in rep.problems]
    assert rep.anatomies_present == {"right lung": 3, "cardiac silhouette": 3}


def test_ignored_label_values_are_counted_not_failed(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    lab = label_map()
    lab[0, 0, 0] = 99
    save_nifti(tmp_path / "ct/masks/case_001.nii.gz", lab, ct_affine())
    rep = validate_datalist(dl, deep=True)
    assert rep.ok and rep.ignored_label_values == {99: 1}
    assert "99 (1 records)" in rep.summary()


# --------------------------------------------------------------------------- broken data
def test_missing_files_name_record_field_and_file(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct")
    (tmp_path / "ct/images/case_001.nii.gz").unlink()
    (tmp_path / "ct/masks/case_004.nii.gz").unlink()
    rep = validate_datalist(dl)
    img = errors_of(rep, field="image")
    assert len(img) == 1
    assert (img[0].split, img[0].index, img[0].id) == ("training", 1, "case_001")
    assert img[0].file == str((tmp_path / "ct/images/case_001.nii.gz").resolve()) and "not found" in img[0].message
    mask = errors_of(rep, field="anatomy_mask")
    assert [(p.split, p.index, p.id) for p in mask] == [("test", 0, "case_004")]
    assert mask[0].file.endswith("masks/case_004.nii.gz")
    assert len(rep.errors) == 2  # the other records are still checked and clean


def test_missing_required_image_and_id(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    edit(dl, lambda d: (d["training"][0].pop("image"), d["training"][1].pop("id")))
    rep = validate_datalist(dl)
    assert errors_of(rep, field="image", index=0) and errors_of(rep, field="id", index=1)


def test_ct_datalist_pointing_at_png_is_an_error(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "ct/images/flat.png")
    edit(dl, lambda d: d["training"][1].update(image="images/flat.png"))
    rep = validate_datalist(dl)
    (p,) = rep.errors
    assert (p.split, p.index, p.id, p.field) == ("training", 1, "case_001", "image")
    assert p.file.endswith("flat.png") and "CT datalist" in p.message and "2D" in p.message


def test_cxr_datalist_pointing_at_nifti_volume_is_an_error(tmp_path):
    dl = make_cxr_datalist(tmp_path / "cxr")
    save_nifti(tmp_path / "cxr/images/vol.nii.gz", np.zeros(SHAPE, np.int16), ct_affine())
    edit(dl, lambda d: d["training"][2].update(image="images/vol.nii.gz"))
    rep = validate_datalist(dl)
    img = errors_of(rep, field="image")
    assert [(p.index, p.id) for p in img] == [(2, "cxr_002")]
    assert "CXR datalist" in img[0].message and img[0].file.endswith("vol.nii.gz")


def test_single_slice_and_non_ct_dicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ct_slice = get_testdata_file("CT_small.dcm")  # one real CT slice: a 2D image
    dl = make_cxr_datalist(tmp_path / "cxr", n=1)
    edit(dl, lambda d: d["training"][0].update(image=ct_slice, anatomy_masks={}))
    rep = validate_datalist(dl)
    assert any("Modality is 'CT'" in p.message for p in errors_of(rep, field="image"))
    ds = pydicom.dcmread(ct_slice)
    ds.Modality = "MR"
    folder = tmp_path / "mr_series"
    folder.mkdir()
    ds.save_as(str(folder / "1.dcm"))
    dl2 = make_ct_datalist(tmp_path / "ct", splits=(("training", 1),))
    edit(dl2, lambda d: d["training"][0].update(image=str(folder), anatomy_mask=None))
    msgs = " | ".join(p.message for p in validate_datalist(dl2).errors)
    assert "Modality is 'MR'" in msgs and "2D image" in msgs


def write_series(folder: Path, zs) -> Path:
    """A CT DICOM series made from pydicom's CT_small.dcm, one file per slice position in ``zs``."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i, z in enumerate(zs):
        src.SOPInstanceUID = generate_uid()
        src.InstanceNumber = i + 1
        src.ImagePositionPatient = [-158.0, -179.0, float(z)]
        src.save_as(str(folder / f"{i:02d}.dcm"))
    return folder


def test_dicom_series_checks(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 3),))
    good = write_series(tmp_path / "good", [4, 0, 2])  # files out of order: sorted by position
    dup = write_series(tmp_path / "dup", [0, 2, 2, 4])
    gap = write_series(tmp_path / "gap", [0, 2, 4, 10])

    def use_series(d):
        for rec, folder in zip(d["training"], (good, dup, gap)):
            rec["image"] = str(folder)
            del rec["anatomy_mask"], rec["anatomy_boxes"]  # drawn for the NIfTI volumes

    edit(dl, use_series)
    h = read_header(good, "CT")
    assert h.shape == (128, 128, 3) and h.affine[2, 2] == pytest.approx(2.0) and h.affine[2, 3] == pytest.approx(0.0)
    rep = validate_datalist(dl, deep=True)
    assert [(p.severity, p.index) for p in rep.problems] == [("error", 1), ("warning", 2)], [p.format() for p in rep.problems]
    assert "1 slice(s) at a position another slice already has" in rep.problems[0].message
    assert "irregularly spaced" in rep.problems[1].message


def test_mask_of_another_scan_is_an_error(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    save_nifti(tmp_path / "ct/masks/case_001.nii.gz", label_map(), ct_affine(origin=ORIGIN + [500.0, 0, 0]))
    rep = validate_datalist(dl)
    (p,) = rep.errors
    assert (p.index, p.id, p.field) == (1, "case_001", "anatomy_mask")
    assert p.file.endswith("masks/case_001.nii.gz") and "another scan" in p.message


def test_partial_overlap_is_decided_by_foreground(tmp_path):
    """A mask grid shifted by 3/4 of the image: error when its foreground is outside, fine when inside."""
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    shift = ORIGIN + [0.75 * SHAPE[0] * SPACING, 0, 0]  # grids overlap by 25% of the mask grid
    outside = np.zeros(SHAPE, np.uint8)
    outside[5:11, 2:6, 2:6] = 5  # mask voxels 5.. lie beyond the image (image ends at mask voxel 3)
    inside = np.zeros(SHAPE, np.uint8)
    inside[0:2, 2:6, 2:6] = 5  # mask voxels 0-1 lie over image voxels 9-10
    save_nifti(tmp_path / "ct/masks/case_000.nii.gz", outside, ct_affine(origin=shift))
    save_nifti(tmp_path / "ct/masks/case_001.nii.gz", inside, ct_affine(origin=shift))
    for deep in (False, True):
        rep = validate_datalist(dl, deep=deep)
        assert [(p.index, p.field) for p in rep.errors] == [(0, "anatomy_mask")], [p.format() for p in rep.errors]
        assert "100% of the mask's foreground" in rep.errors[0].message


def test_flipped_and_half_resolution_masks_are_accepted(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    lab = label_map()
    # case_000: the same label map stored with x and z flipped (a real-world orientation quirk).
    flipped = lab[::-1, :, ::-1].copy()
    aff = ct_affine().copy()
    aff[:3, 0] *= -1
    aff[:3, 2] *= -1
    aff[:3, 3] = ct_affine()[:3, :3] @ [SHAPE[0] - 1, 0, SHAPE[2] - 1] + ORIGIN
    save_nifti(tmp_path / "ct/masks/case_000.nii.gz", flipped, aff)
    # case_001: the label map at half resolution (4 mm voxels covering the same extent).
    half = lab[::2, ::2, ::2]
    origin_half = ORIGIN + 0.5 * SPACING  # centre of a 2x2x2 block of image voxels
    save_nifti(tmp_path / "ct/masks/case_001.nii.gz", half, ct_affine(origin=origin_half, spacing=2 * SPACING))
    for deep in (False, True):
        rep = validate_datalist(dl, deep=deep)
        assert rep.errors == [], [p.format() for p in rep.errors]
    assert mask_fraction_outside(flipped, aff, SHAPE, ct_affine()) == 0.0


def test_patient_in_two_splits(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct")
    edit(dl, lambda d: d["validation"][0].update(patient="p000"))
    rep = validate_datalist(dl)
    (p,) = rep.errors
    assert (p.field, p.split, p.index, p.id) == ("patient", "validation", 0, "case_003")
    assert "training" in p.message and "validation" in p.message
    assert "case_000" in p.message and "case_003" in p.message


def test_duplicate_ids(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct")
    edit(dl, lambda d: d["test"][0].update(id="case_001"))
    rep = validate_datalist(dl)
    (p,) = rep.errors
    assert (p.field, p.split, p.index, p.id) == ("id", "test", 0, "case_001")
    assert "training[1]" in p.message


def test_empty_report_is_a_warning_and_exits_zero(tmp_path, capsys):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    edit(dl, lambda d: (d["training"][0].update(report="  "), d["training"][1].pop("report")))
    rep = validate_datalist(dl)
    assert rep.ok and [(p.severity, p.field, p.index) for p in rep.problems] == [
        ("warning", "report", 0),
        ("warning", "report", 1),
    ]
    assert validate_command(str(dl)) is None  # warnings only: no SystemExit
    out = capsys.readouterr().out
    assert "WARNING training[0] id=case_000 field=report" in out and "0 errors, 2 warnings: OK" in out
    edit(dl, lambda d: d["training"][0].update(report=["not", "text"]))
    assert errors_of(validate_datalist(dl), field="report", index=0)


def test_unknown_anatomy_finding_and_values(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 1),))

    def bad(d):
        r = d["training"][0]
        r["findings"] = {"livr": {"steatosis": 1}, "liver": {"splenomegaly": 1, "steatosis": 2}}
        r["study_findings"] = {"lymphadenopathy": 1, "pneumothorax": 0}
        r["anatomy_sentences"] = {"kidney": ["The kidneys are normal."]}

    edit(dl, bad)
    rep = validate_datalist(dl)
    by_field = {p.field: p.message for p in rep.errors}
    assert "unknown anatomy 'livr'" in by_field["findings.livr"] and "did you mean 'liver'" in by_field["findings.livr"]
    assert "unknown finding 'splenomegaly' for anatomy 'liver'" in by_field["findings.liver.splenomegaly"]
    assert "a finding of spleen" in by_field["findings.liver.splenomegaly"]
    assert "got 2" in by_field["findings.liver.steatosis"]
    assert "unknown study finding 'pneumothorax'" in by_field["study_findings.pneumothorax"]
    assert "unknown anatomy 'kidney'" in by_field["anatomy_sentences.kidney"]
    assert len(rep.errors) == 5 and all(p.id == "case_000" for p in rep.errors)


def test_unknown_anatomy_in_masks_cxr(tmp_path):
    dl = make_cxr_datalist(tmp_path / "cxr", n=1)
    edit(dl, lambda d: d["training"][0]["anatomy_masks"].update({"left lungg": "masks/cxr_000_rl.png"}))
    (p,) = validate_datalist(dl).errors
    assert p.field == "anatomy_masks.left lungg" and "did you mean 'left lung'" in p.message


def test_bad_boxes(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 1),))
    good = liver_box_world()
    swapped = good[3:] + good[:3]
    far = [v + 1000 for v in good]
    edit(dl, lambda d: d["training"][0].update(
        anatomy_boxes={"liver": good[:4], "spleen": swapped, "lung": far}))
    rep = validate_datalist(dl)
    by_field = {p.field: p.message for p in rep.errors}
    assert "must be 6 numbers" in by_field["anatomy_boxes.liver"]
    assert "minimum must be below its maximum" in by_field["anatomy_boxes.spleen"]
    assert "outside the image" in by_field["anatomy_boxes.lung"]
    cxr = make_cxr_datalist(tmp_path / "cxr", n=1)
    edit(cxr, lambda d: d["training"][0].update(anatomy_boxes={"cardiac silhouette": [10, 20, "x", 30]}))
    assert errors_of(validate_datalist(cxr), field="anatomy_boxes.cardiac silhouette")


def test_mask_pixel_size_must_match_png(tmp_path):
    dl = make_cxr_datalist(tmp_path / "cxr", n=2)
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(tmp_path / "cxr/masks/cxr_001_rl.png")
    (p,) = validate_datalist(dl).errors
    assert (p.index, p.field) == (1, "anatomy_masks.right lung") and "pixel size" in p.message


def test_deep_non_integer_label_map(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    lab = label_map().astype(np.float32)
    lab[3, 3, 3] = 2.5
    save_nifti(tmp_path / "ct/masks/case_001.nii.gz", lab, ct_affine())
    assert validate_datalist(dl).ok  # headers cannot tell
    (p,) = validate_datalist(dl, deep=True).errors
    assert (p.index, p.field) == (1, "anatomy_mask") and "non-integer" in p.message and "2.5" in p.message


def test_deep_truncated_image(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    path = tmp_path / "ct/images/case_000.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    (p,) = validate_datalist(dl, deep=True).errors
    assert (p.index, p.id, p.field) == (0, "case_000", "image")
    assert p.file == str(path.resolve()) and "cannot decode" in p.message


def test_deep_nan_and_constant_images(tmp_path):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    nan = np.zeros(SHAPE, np.float32)
    nan[1, 1, 1] = np.nan
    save_nifti(tmp_path / "ct/images/case_000.nii.gz", nan, ct_affine())
    save_nifti(tmp_path / "ct/images/case_001.nii.gz", np.full(SHAPE, 7, np.int16), ct_affine())
    rep = validate_datalist(dl, deep=True)
    assert [(p.severity, p.index, p.field) for p in rep.problems] == [("error", 0, "image"), ("warning", 1, "image")]
    assert "NaN" in rep.problems[0].message and "same value" in rep.problems[1].message


def test_truncated_uncompressed_nifti_found_from_header(tmp_path):
    path = tmp_path / "cut.nii"
    save_nifti(path, np.zeros(SHAPE, np.int16), ct_affine())
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(HeaderError, match="cut.nii: truncated"):
        read_header(path, "CT")


def test_validator_never_crashes(tmp_path, monkeypatch):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 4),))

    def weird(d):
        d["training"][0] = "not a record"
        d["training"][1].update(image=5, anatomy_masks=["liver"], anatomy_boxes="x", findings=[1], patient={"a": 1})
        d["training"][2].update(anatomy_mask="datalist.json")  # not an image at all

    edit(dl, weird)
    real = validate_mod.read_header

    def flaky(path, modality=None):
        if str(path).endswith("case_003.nii.gz") and "images" in str(path):
            raise RuntimeError("boom")
        return real(path, modality)

    monkeypatch.setattr(validate_mod, "read_header", flaky)
    rep = validate_datalist(dl)
    fields = {(p.index, p.field) for p in rep.errors}
    assert (0, None) in fields
    assert {(1, "image"), (1, "anatomy_masks"), (1, "anatomy_boxes"), (1, "findings"), (1, "patient")} <= fields
    assert (2, "anatomy_mask") in fields
    boom = errors_of(rep, index=3, field="image")
    assert boom and "RuntimeError: boom" in boom[0].message


@pytest.mark.parametrize(
    "content, expect",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"modality": "CT", "training": []}), "missing required key 'catalog'"),
        (json.dumps({"modality": "CT", "catalog": "nope", "training": [{"id": "a"}]}), "unknown catalog 'nope'"),
        (json.dumps({"modality": "MR", "catalog": "ct_totalseg", "training": [{"id": "a"}]}), "modality must be one of"),
        (json.dumps({"modality": "CXR", "catalog": "ct_totalseg", "training": [{"id": "a"}]}), "is for CT"),
        (json.dumps({"modality": "CT", "catalog": "missing.json", "training": [{"id": "a"}]}), "catalog file not found"),
    ],
)
def test_datalist_level_problems(tmp_path, content, expect):
    path = tmp_path / "datalist.json"
    path.write_text(content)
    rep = validate_datalist(path)
    assert not rep.ok and any(expect in p.message and p.split is None for p in rep.errors), [p.format() for p in rep.problems]


# --------------------------------------------------------------------------- headers
def test_itk_formats_give_the_nibabel_ras_affine(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))  # ITK size (6, 5, 4)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((-1, 0, 0, 0, 0, 1, 0, -1, 0))  # oblique-free but axis-swapped and flipped
    affines = {}
    for ext in (".nii.gz", ".nrrd", ".mha"):
        sitk.WriteImage(img, str(tmp_path / f"x{ext}"))
        h = read_header(tmp_path / f"x{ext}", "CT")
        assert h.shape == (6, 5, 4) and h.ndim == 3 and h.dtype == "int16"
        affines[ext] = h.affine
    np.testing.assert_allclose(affines[".nrrd"], nib.load(str(tmp_path / "x.nii.gz")).affine, atol=1e-5)
    np.testing.assert_allclose(affines[".mha"], affines[".nii.gz"], atol=1e-5)
    np.testing.assert_allclose(
        itk_to_ras_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin())[:3, 3], [-10.0, 20.0, 30.0]
    )


def test_world_bounds_and_overlap():
    lo, hi = world_bounds((10, 10, 10), ct_affine(origin=[0, 0, 0], spacing=1.0))
    np.testing.assert_allclose(lo, [-0.5] * 3)
    np.testing.assert_allclose(hi, [9.5] * 3)
    assert overlap_fraction((lo, hi), (lo + [5, 0, 0], hi + [5, 0, 0])) == pytest.approx(0.5)
    assert overlap_fraction((lo, hi), (lo + 100, hi + 100)) == 0.0


def test_png_header_is_lazy_and_in_index_order(tmp_path):
    Image.fromarray(np.zeros((40, 32), np.uint16)).save(tmp_path / "a.png")
    h = read_header(tmp_path / "a.png", "CXR")
    assert (h.kind, h.shape, h.ndim, h.n_components, h.has_geometry) == ("png", (32, 40), 2, 1, False)
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(HeaderError, match="b.png"):
        read_header(tmp_path / "b.png")


def test_dicom_series_header(real_data):
    folder = real_data / "ct_dicom_dcmqi"
    h = read_header(folder, "CT")
    assert h.kind == "dicom_series" and h.shape == (512, 512, 3) and h.ndim == 3
    assert h.dicom.modality == "CT" and h.dicom.n_files == 3 and h.dicom.n_positions == 3
    assert h.dicom.duplicate_positions == 0 and not h.dicom.irregular_spacing
    assert h.dicom.bits_allocated == 16 and h.dicom.photometric == "MONOCHROME2"
    # The same RAS affine as MONAI/ITK for this series (LPS origin (-235.2, -226.8, -128.69)).
    np.testing.assert_allclose(np.diag(h.affine)[:3], [-0.810547, -0.810547, 1.0], atol=1e-4)
    np.testing.assert_allclose(h.affine[:3, 3], [235.2, 226.8, -128.69], atol=1e-3)
    # The hand-drawn NRRD mask sits on the same grid.
    m = read_header(folder / "liver_seg.nrrd", "CT")
    np.testing.assert_allclose(m.affine, h.affine, atol=1e-3)


def test_real_scans_validate(real_data, tmp_path):
    ct = {
        "modality": "CT",
        "catalog": "ct_totalseg",
        "training": [
            {"id": "dcm", "image": str(real_data / "ct_dicom_dcmqi"), "report": "x",
             "anatomy_mask": str(real_data / "ct_dicom_dcmqi/liver_seg.nrrd")},
            {"id": "ts", "image": str(real_data / "ct_totalsegmentator/example_ct.nii.gz"), "report": "x",
             "anatomy_mask": str(real_data / "ct_totalsegmentator/example_seg_fast_force_split.nii.gz")},
        ],
    }
    (tmp_path / "ct.json").write_text(json.dumps(ct))
    rep = validate_datalist(tmp_path / "ct.json", deep=True)
    assert rep.errors == [], [p.format() for p in rep.errors]
    assert rep.anatomies_present.get("liver") == 1  # TotalSegmentator's map: liver is label 5
    cxr = {"modality": "CXR", "catalog": "cxr_imagenome29",
           "training": [{"id": "nih", "image": str(real_data / "cxr_nih/00000001_000.png"), "report": "x"}]}
    (tmp_path / "cxr.json").write_text(json.dumps(cxr))
    assert validate_datalist(tmp_path / "cxr.json", deep=True).problems == []


# --------------------------------------------------------------------------- command line
def test_validate_command_exit_codes_and_json(tmp_path, capsys):
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 2),))
    assert validate_command(str(dl.parent)) is None  # a folder works too
    (tmp_path / "ct/images/case_001.nii.gz").unlink()
    out_json = tmp_path / "out/report.json"
    with pytest.raises(SystemExit) as exc:
        validate_command(str(dl), json_out=str(out_json), quiet=True)
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "ERROR   training[1] id=case_001 field=image file=" in out and "FAILED" in out
    data = json.loads(out_json.read_text())
    assert data["ok"] is False and data["n_errors"] == 1
    assert data["problems"][0]["id"] == "case_001" and data["problems"][0]["field"] == "image"


def test_cli_subprocess(tmp_path):
    pytest.importorskip("anatomy_vlp_bundle.text.reports", reason="cli.py imports every command; parse-report not written yet")
    dl = make_ct_datalist(tmp_path / "ct", splits=(("training", 1),))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "anatomy_vlp_bundle", "validate", str(dl)],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "0 errors" in ok.stdout
    (tmp_path / "ct/images/case_000.nii.gz").unlink()
    bad = subprocess.run([sys.executable, "-m", "anatomy_vlp_bundle", "validate", str(dl), "--quiet"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and "field=image" in bad.stdout
