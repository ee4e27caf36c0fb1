"""Bad input catalogue: each kind of bad input through every entry point it reaches.

Entry points:

- **validate** — ``validate_command`` (``python -m anatomy_vlp_bundle validate PATH [--deep]``): one line
  per problem with split, index, id, field and file; exit 1 on any error, 0 on warnings only.
- **training** — ``engines.workflow.prepare_datalist`` refuses a datalist with (header-level) errors;
  a case that still fails to load is skipped by ``SkippingDataset`` over the training transform chain
  and listed in ``bad_cases`` (more than 1% stops the run).
- **infer** — ``infer_command``: exit 1 and ``error: <file>: <problem>``.
- **infer-batch** — ``infer_batch_command``: the bad case is listed in ``failures.json`` with its
  reason, the others are written, exit 1.

What each input gets (``V`` validate, ``T`` training, ``I`` infer / infer-batch):

==============================  ==========================================================================
empty volume (0-size axis)      V error "empty image" (header); T refused / skipped; I exit 1
constant volume / image         V warning "same value" (deep); T trains on it; I exit 1 "same value"
NaN voxels                      V error (deep); T skipped "NaN"; I exit 1
Inf voxels                      V error "infinite" (deep); T skipped; I exit 1
4D / vector / RGB NIfTI         V error "4D image" / "3 components per voxel"; T refused / skipped; I exit 1
MR series given as CT           V error "Modality is 'MR'"; T skipped; I exit 1
CT given to the CXR model       V error (DICOM "Modality is 'CT'", NIfTI "CXR datalist"); T refused
                                (the CXR loader reads a CT DICOM: validation stops it); I exit 1
DICOM missing / duplicated /    V duplicate: error; missing, irregular: warning "irregularly spaced";
inconsistent slices             T skipped "unevenly spaced" / "same position"; I exit 1
smaller than one patch (3^3)    V no problem (the validator knows no model); T padded (CT) / resized
                                (CXR) to roi_size; I exit 1 "too small for the model"
gigantic header (1e13 voxels)   V error naming the size and the limit (header, no decoding); T refused /
                                skipped; I exit 1 — all before allocating (ANATOMY_VLP_MAX_VOXELS)
non-integer label map           V error (deep); T skipped "non-integer"; I --mask exit 1
mask of another scan            V error "another scan"; T skipped; I --mask exit 1
datalist not UTF-8              V error "not UTF-8" / "UTF-16" (datalist level); T refused; I-batch exit 1
UTF-8 BOM datalist              accepted everywhere
report decoded wrongly (U+FFFD) V warning
empty report                    V warning (tests/test_validate.py::test_empty_report_is_a_warning_and_exits_zero)
duplicate ids                   V error; T refused; I-batch: the second case skipped and listed, exit 1
patient leakage across splits   V error; T refused
unusable ids / records          I-batch: skipped and listed (path components, no image, not an object)
==============================  ==========================================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

import bad_inputs as bad
from anatomy_vlp_bundle.data.dataset import TooManyBadCases, build_dataset
from anatomy_vlp_bundle.data.datalist import load_datalist
from anatomy_vlp_bundle.data.headers import MAX_VOXELS_ENV
from anatomy_vlp_bundle.data.pipeline import build_transforms
from anatomy_vlp_bundle.data.readers import ImageReadError, unwrap_transform_error
from anatomy_vlp_bundle.data.validate import validate_command
from anatomy_vlp_bundle.engines.checkpoint import CheckpointExtras
from anatomy_vlp_bundle.engines.workflow import prepare_datalist
from anatomy_vlp_bundle.inference.batch import infer_batch_command, infer_command
from test_deploy_wrapper import CT_CATALOG, trained_like_model

CT_ROI = (32, 32, 24)
CXR_ROI = (64, 64)
CXR_CATALOG = "synthetic_cxr"
GOOD_REPORT = "FINDINGS: The liver is normal."


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny CT (8 mm, patch 8) and CXR (patch 16) training checkpoints."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, dims, pre in (("CT", 3, {"spacing": [8.0] * 3, "roi_size": list(CT_ROI)}), ("CXR", 2, {"roi_size": list(CXR_ROI)})):
        model = trained_like_model(dims)
        path = root / f"{name}.pt"
        torch.save({"model": model.state_dict(), "extras": CheckpointExtras(model, "0.1.0", pre).state_dict()}, path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def chains() -> dict[str, Callable]:
    """The training transform chains (``mode="train"``) of both modalities."""
    return {
        "CT": build_transforms(CT_CATALOG, mode="train", spacing=(8.0, 8.0, 8.0), roi_size=CT_ROI),
        "CXR": build_transforms(CXR_CATALOG, mode="train", roi_size=CXR_ROI),
    }


# --------------------------------------------------------------------------- helpers
def datalist_with(root: Path, modality: str, **bad_fields) -> Path:
    """``training``: a good record (index 0) and the record ``bad`` (index 1) made of ``bad_fields``."""
    if modality == "CT":
        good = {"id": "good", "image": str(bad.good_ct(root / "ok")), "anatomy_mask": str(bad.good_label_map(root / "ok"))}
        catalog = CT_CATALOG
    else:
        good = {"id": "good", "image": str(bad.good_cxr(root / "ok"))}
        catalog = CXR_CATALOG
    rec = {"id": "bad", "report": GOOD_REPORT, **{k: str(v) for k, v in bad_fields.items()}}
    return bad.write_datalist(root, {"training": [{**good, "report": GOOD_REPORT}, rec]}, catalog, modality)


def validate(dl: Path, tmp_path: Path, capsys, deep: bool = False) -> tuple[int, str, list[dict]]:
    """Run ``validate_command``: (exit code, printed text, problems from its JSON report)."""
    out_json = tmp_path / "validate_report.json"
    try:
        validate_command(str(dl), deep=deep, json_out=str(out_json))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out, json.loads(out_json.read_text())["problems"]


def assert_validate(dl: Path, tmp_path: Path, capsys, field: str, file: Path, text: str, severity: str = "error",
                    deep: bool = False) -> None:
    """The bad record (training[1], id ``bad``) has exactly one problem: ``severity`` on ``field`` naming
    ``file`` and ``text``; the good record has none; exit 1 for an error, 0 for a warning."""
    code, out, problems = validate(dl, tmp_path, capsys, deep)
    assert [p for p in problems if p["index"] == 0] == []
    (p,) = [p for p in problems if p["index"] == 1]
    assert (p["severity"], p["split"], p["id"], p["field"], p["file"]) == (severity, "training", "bad", field, str(file.resolve()))
    assert text in p["message"], p["message"]
    assert f"{severity.upper():7s} training[1] id=bad field={field} file={file.resolve()}: " in out
    assert code == (1 if severity == "error" else 0)


def assert_training_refuses(dl: Path, file: Path, text: str) -> None:
    """Training refuses the datalist before it starts, naming the file and the problem."""
    with pytest.raises(ValueError, match="training refuses it") as e:
        prepare_datalist(str(dl.parent), datalist=str(dl), generate=False)
    assert str(file.resolve()) in str(e.value) and text in str(e.value)


def assert_skipped_and_listed(dl: Path, chain: Callable, file: Path, text: str) -> None:
    """The training loader skips the bad case (None), lists it by index and id, loads the good one, and
    the error behind the skip names the file and the problem."""
    ds = build_dataset(dl, "training", chain, max_bad_fraction=0.5)
    assert ds[1] is None
    assert [(i, cid) for i, cid, _ in ds.bad_cases] == [(1, "bad")]
    assert ds[0] is not None and ds[0]["id"] == "good"
    with pytest.raises(RuntimeError) as e:  # what SkippingDataset caught: MONAI's wrapper around the reader's error
        ds.dataset[1]
    cause = unwrap_transform_error(e.value)
    assert isinstance(cause, ImageReadError) and str(cause).startswith(f"{file}: ") and text in str(cause), str(cause)


def assert_infer_refuses(checkpoint: Path, image: Path, file: Path, text: str, capsys, mask: Path | None = None) -> None:
    """``infer`` exits 1 printing ``error: <file>: ...<text>...``."""
    with pytest.raises(SystemExit) as e:
        infer_command(str(checkpoint), str(image), mask=str(mask) if mask else None)
    out = capsys.readouterr().out
    assert e.value.code == 1
    assert f"error: {file}: " in out and text in out, out


# --------------------------------------------------------------------------- empty, constant, non-finite
def test_empty_volume(tmp_path, capsys, chains, models):
    img = bad.empty_volume(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CT", image=img)
    assert_validate(dl, tmp_path, capsys, "image", img, "empty image: its header gives size 0 x 24 x 24")
    assert_training_refuses(dl, img, "empty image")
    assert_skipped_and_listed(dl, chains["CT"], img, "empty image")
    assert_infer_refuses(models["CT"], img, img, "holds no voxels", capsys)


@pytest.mark.parametrize("modality", ["CT", "CXR"])
def test_constant_image(tmp_path, capsys, chains, models, modality):
    # validate --deep: a warning "every voxel has the same value" (tests/test_validate.py::test_deep_nan_and_constant_images)
    img = bad.constant_volume(tmp_path) if modality == "CT" else bad.constant_cxr(tmp_path)
    dl = datalist_with(tmp_path / "dl", modality, image=img)
    ds = build_dataset(dl, "training", chains[modality])
    assert ds[1] is not None and ds.bad_cases == []  # training takes it: an empty image teaches "nothing there"
    assert_infer_refuses(models[modality], img, img, "every voxel has the same value", capsys)


def test_nan_voxels(tmp_path, capsys, chains, models):
    # validate --deep: an error "2 NaN voxel(s)" (tests/test_validate.py::test_deep_nan_and_constant_images)
    img = bad.nan_volume(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CT", image=img)
    assert_skipped_and_listed(dl, chains["CT"], img, "it has 2 NaN and 0 infinite voxel(s)")
    assert_infer_refuses(models["CT"], img, img, "must hold finite values", capsys)


def test_inf_voxels(tmp_path, capsys, chains, models):
    img = bad.inf_volume(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CT", image=img)
    assert_validate(dl, tmp_path, capsys, "image", img, "1 infinite voxel(s): images must hold finite values", deep=True)
    assert_skipped_and_listed(dl, chains["CT"], img, "it has 0 NaN and 1 infinite voxel(s)")
    assert_infer_refuses(models["CT"], img, img, "must hold finite values", capsys)


# --------------------------------------------------------------------------- 4D / vector
@pytest.mark.parametrize(
    "builder, validate_text, load_text",
    [
        (bad.timeseries_4d, "4D image (shape (32, 24, 24, 3)) in a CT datalist", "its header describes a 4D image"),
        (bad.vector_nifti, "CT image with 3 components per voxel", "its header gives 3 components per voxel"),
        (bad.rgb_nifti, "CT image with 3 components per voxel", "its header gives 3 components per voxel"),
    ],
    ids=["timeseries", "vector", "rgb"],
)
def test_4d_and_vector_images(tmp_path, capsys, chains, models, builder, validate_text, load_text):
    img = builder(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CT", image=img)
    assert_validate(dl, tmp_path, capsys, "image", img, validate_text)
    assert_training_refuses(dl, img, validate_text)
    assert_skipped_and_listed(dl, chains["CT"], img, load_text)
    assert_infer_refuses(models["CT"], img, img, load_text, capsys)


# --------------------------------------------------------------------------- wrong modality
def test_mr_series_given_as_ct(tmp_path, chains):
    # validate: "DICOM Modality is 'MR'" (tests/test_validate.py::test_single_slice_and_non_ct_dicom);
    # infer and infer-batch: tests/test_inference.py::test_bad_inputs_are_named_and_the_batch_goes_on.
    series = bad.mr_series(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CT", image=series)
    assert_skipped_and_listed(dl, chains["CT"], series, "DICOM series has Modality 'MR', expected 'CT'")


def test_ct_dicom_given_to_the_cxr_model(tmp_path, capsys, models):
    # validate: "DICOM Modality is 'CT'" (tests/test_validate.py::test_single_slice_and_non_ct_dicom). The CXR
    # loader decodes any single-frame DICOM, so training relies on validation refusing the datalist.
    img = bad.ct_dicom_file(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CXR", image=img)
    assert_training_refuses(dl, img, "DICOM Modality is 'CT': not a radiograph")
    assert_infer_refuses(models["CXR"], img, img, "DICOM Modality 'CT' is not a radiograph", capsys)


def test_ct_volume_given_to_the_cxr_model(tmp_path, capsys, chains, models):
    # validate: tests/test_validate.py::test_cxr_datalist_pointing_at_nifti_volume_is_an_error
    img = bad.ct_given_as_cxr(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CXR", image=img)
    assert_skipped_and_listed(dl, chains["CXR"], img, "not a PNG, JPEG or DICOM file")
    assert_infer_refuses(models["CXR"], img, img, "not a PNG, JPEG or DICOM file", capsys)


# --------------------------------------------------------------------------- broken DICOM series
@pytest.mark.parametrize(
    "builder, text",
    [
        (bad.missing_slice_series, "unevenly spaced (gaps 8.00 to 16.00 mm, median 8.00 mm)"),
        (bad.duplicate_slice_series, "slice_002.dcm and slice_003.dcm are both at 16.00 mm"),
        (bad.irregular_series, "unevenly spaced (gaps 7.00 to 9.00 mm, median 8.00 mm)"),
    ],
    ids=["missing_slice", "duplicate_slice", "irregular_spacing"],
)
def test_broken_dicom_series_is_refused_on_load(tmp_path, capsys, chains, models, builder, text):
    # validate: a duplicate is an error, a missing slice a warning (tests/test_validate.py::test_dicom_series_checks);
    # irregular spacing: test_inconsistent_slice_spacing_is_a_validation_warning below.
    series = builder(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CT", image=series)
    assert_skipped_and_listed(dl, chains["CT"], series, text)
    assert_infer_refuses(models["CT"], series, series, text, capsys)


def test_inconsistent_slice_spacing_is_a_validation_warning(tmp_path, capsys):
    series = bad.irregular_series(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CT", image=series)
    assert_validate(dl, tmp_path, capsys, "image", series, "irregularly spaced (gaps 7.00 to 9.00 mm, median 8.00 mm",
                    severity="warning")


# --------------------------------------------------------------------------- smaller than one patch
@pytest.mark.parametrize("modality", ["CT", "CXR"])
def test_image_smaller_than_one_patch(tmp_path, capsys, chains, models, modality):
    """The validator knows no model: it accepts the image; training pads (CT) or resizes (CXR) it to
    roi_size; inference refuses it, naming its size against the model's patch."""
    img = bad.tiny_volume(tmp_path) if modality == "CT" else bad.tiny_cxr(tmp_path)
    dl = datalist_with(tmp_path / "dl", modality, image=img)
    code, _, problems = validate(dl, tmp_path, capsys, deep=True)
    assert (code, problems) == (0, [])
    sample = build_dataset(dl, "training", chains[modality])[1]
    assert tuple(sample["image"].shape) == (1, *(CT_ROI if modality == "CT" else CXR_ROI))
    text = (
        "3 x 3 x 3 voxels spanning 3 x 3 x 3 mm are 0.375 x 0.375 x 0.375 voxels at the model's 8 x 8 x 8 mm spacing, "
        "less than one 8 x 8 x 8 patch" if modality == "CT" else "3 x 3 pixels, less than one 16 x 16 patch"
    )
    assert_infer_refuses(models[modality], img, img, f"too small for the model: {text}", capsys)


# --------------------------------------------------------------------------- gigantic headers
@pytest.mark.parametrize(
    "modality, builder, text",
    [
        ("CT", bad.giant_nifti, "its header declares 100000 x 100000 x 1000 = 1e+13 voxels, more than the limit of "
                                f"1,000,000,000 (set {MAX_VOXELS_ENV} to allow larger images)"),
        ("CXR", bad.giant_png, "Image size (10000000000 pixels) exceeds limit"),
    ],
    ids=["nifti", "png"],
)
def test_gigantic_header_is_refused_before_allocating(tmp_path, capsys, chains, models, modality, builder, text):
    """A few-kB file declaring 1e13 voxels (1e10 pixels): refused from its header with the file and the
    size, never decoded (decoding would raise MemoryError or exhaust the machine instead). PNG/JPEG
    meet Pillow's own decompression-bomb limit (about 179 M pixels) first."""
    img = builder(tmp_path)
    assert img.stat().st_size < 4096
    dl = datalist_with(tmp_path / "dl", modality, image=img)
    assert_validate(dl, tmp_path, capsys, "image", img, text, deep=True)
    assert_training_refuses(dl, img, text)
    assert_skipped_and_listed(dl, chains[modality], img, text)
    assert_infer_refuses(models[modality], img, img, text, capsys)


def test_voxel_limit_is_overridable(tmp_path, capsys, chains, models, monkeypatch):
    """``ANATOMY_VLP_MAX_VOXELS`` lowers (or raises) the limit for every entry point."""
    img = bad.good_ct(tmp_path, "ordinary")  # 32 x 24 x 24 = 18432 voxels
    dl = datalist_with(tmp_path / "dl", "CT", image=img)
    monkeypatch.setenv(MAX_VOXELS_ENV, "1e4")
    text = f"its header declares 32 x 24 x 24 = 1.84e+04 voxels, more than the limit of 10,000 (set {MAX_VOXELS_ENV}"
    code, _, problems = validate(dl, tmp_path, capsys)
    assert code == 1 and {(p["index"], p["field"]) for p in problems} == {(0, "image"), (0, "anatomy_mask"), (1, "image")}
    assert all(text in p["message"] for p in problems)
    assert_infer_refuses(models["CT"], img, img, text, capsys)
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(SystemExit) as e:
        infer_command(str(models["CT"]), str(img))
    assert e.value.code == 1 and f"error: {MAX_VOXELS_ENV}='lots' is not a number of voxels" in capsys.readouterr().out


# --------------------------------------------------------------------------- masks
def test_non_integer_label_map(tmp_path, capsys, chains, models):
    # validate --deep: tests/test_validate.py::test_deep_non_integer_label_map
    mask = bad.float_label_map(tmp_path)
    image = bad.good_ct(tmp_path, "scan")
    dl = datalist_with(tmp_path / "dl", "CT", image=image, anatomy_mask=mask)
    assert_skipped_and_listed(dl, chains["CT"], mask, "label map holds non-integer values (e.g. 1.5)")
    assert_infer_refuses(models["CT"], image, mask, "label map holds non-integer values (e.g. 1.5)", capsys, mask=mask)


def test_mask_of_another_scan(tmp_path, capsys, chains, models):
    # validate: tests/test_validate.py::test_mask_of_another_scan_is_an_error
    mask = bad.other_scan_mask(tmp_path)
    image = bad.good_ct(tmp_path, "scan")
    dl = datalist_with(tmp_path / "dl", "CT", image=image, anatomy_mask=mask)
    text = f"100% of the mask's foreground lies outside the image ({image}): it belongs to another scan"
    assert_skipped_and_listed(dl, chains["CT"], mask, text)
    assert_infer_refuses(models["CT"], image, mask, text, capsys, mask=mask)


# --------------------------------------------------------------------------- encodings and reports
@pytest.mark.parametrize(
    "encoding, text",
    [
        ("latin-1", "not UTF-8 text (byte 0xe9 at offset"),
        ("cp1252", "not UTF-8 text (byte 0xe9 at offset"),
        ("utf-16", "the datalist is UTF-16 text; save it as UTF-8"),
    ],
)
def test_datalist_not_in_utf8(tmp_path, capsys, models, encoding, text):
    dl = bad.datalist_in_encoding(tmp_path / "dl", bad.good_ct(tmp_path), CT_CATALOG, encoding)
    code, out, problems = validate(dl, tmp_path, capsys)
    (p,) = problems
    assert code == 1 and (p["severity"], p["split"], p["file"]) == ("error", None, str(dl))
    assert p["message"].startswith(f"{dl}: ") and text in p["message"]
    assert f"ERROR   datalist file={dl}: " in out
    assert_training_refuses(dl, dl, text)
    with pytest.raises(SystemExit) as e:
        infer_batch_command(str(models["CT"]), str(dl), str(tmp_path / "out"), split="training")
    assert e.value.code == 1 and f"error: {dl}: " in capsys.readouterr().out


def test_utf8_datalist_with_a_byte_order_mark_is_read(tmp_path, capsys):
    dl = bad.datalist_in_encoding(tmp_path / "dl", bad.good_ct(tmp_path), CT_CATALOG, "utf-8-sig")
    assert dl.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_datalist(dl).records("training")[0]["report"] == bad.ACCENTED_REPORT
    assert validate(dl, tmp_path, capsys)[::2] == (0, [])


def test_report_decoded_with_the_wrong_encoding_is_a_warning(tmp_path, capsys):
    # an empty report: tests/test_validate.py::test_empty_report_is_a_warning_and_exits_zero
    dl = datalist_with(tmp_path / "dl", "CT", image=bad.good_ct(tmp_path, "scan"))
    data = json.loads(dl.read_text(encoding="utf-8"))
    data["training"][1]["report"] = bad.mojibake_report()
    dl.write_text(json.dumps(data), encoding="utf-8")
    code, out, problems = validate(dl, tmp_path, capsys)
    (p,) = problems
    assert code == 0 and (p["severity"], p["index"], p["id"], p["field"]) == ("warning", 1, "bad", "report")
    assert "1 U+FFFD replacement character(s)" in p["message"] and "wrong encoding" in p["message"]


# --------------------------------------------------------------------------- datalists
def test_duplicate_ids(tmp_path, capsys, models):
    # validate: tests/test_validate.py::test_duplicate_ids
    a, b = bad.good_ct(tmp_path, "a", seed=1), bad.good_ct(tmp_path, "b", seed=2)
    dl = bad.write_datalist(tmp_path / "dl", {"test": [{"id": "case", "image": str(a)}, {"id": "case", "image": str(b)}]},
                            CT_CATALOG)
    assert_training_refuses(dl, dl, "duplicate id 'case': also the id of test[0]")
    with pytest.raises(SystemExit) as e:
        infer_batch_command(str(models["CT"]), str(dl), str(tmp_path / "out"))
    assert e.value.code == 1
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert failures == [{"id": "case", "image": str(b),
                         "error": f"duplicate id 'case': {a} has it too, and its result would be overwritten"}]
    assert json.loads((tmp_path / "out" / "case.json").read_text())["image"] == str(a)  # the first result is kept


def test_patient_in_two_splits(tmp_path):
    # validate: tests/test_validate.py::test_patient_in_two_splits
    img = bad.good_ct(tmp_path)
    splits = {"training": [{"id": "a", "patient": "p1", "image": str(img)}],
              "test": [{"id": "b", "patient": "p1", "image": str(img)}]}
    dl = bad.write_datalist(tmp_path / "dl", splits, CT_CATALOG)
    assert_training_refuses(dl, dl, "patient 'p1' has images in 2 splits (training and test)")


def test_infer_batch_lists_records_it_cannot_name_or_read(tmp_path, capsys, models):
    good = bad.good_ct(tmp_path)
    outside = tmp_path / "escape"
    records = [
        {"id": "good", "image": str(good)},
        {"id": f"../{outside.name}", "image": str(good)},
        {"id": "no_image"},
        "not a record",
    ]
    dl = bad.write_datalist(tmp_path / "dl", {"test": records}, CT_CATALOG)
    with pytest.raises(SystemExit) as e:
        infer_batch_command(str(models["CT"]), str(dl), str(tmp_path / "out"))
    assert e.value.code == 1
    failures = {f["id"]: f["error"] for f in json.loads((tmp_path / "out" / "failures.json").read_text())}
    assert failures == {
        "../escape": "id '../escape' cannot name a result file (empty, '.', '..', or holds a path separator or NUL)",
        "no_image": "record test[2] has no 'image' path (got None)",
        "test[3]": "record test[3] is not a JSON object",
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["failures.json", "good.json"]
    assert not outside.with_suffix(".json").exists()
    assert "3 failed" in capsys.readouterr().out


# --------------------------------------------------------------------------- a batch of bad cases
CT_BATCH: dict[str, Callable[[Path], Path]] = {
    "empty": bad.empty_volume,
    "constant": bad.constant_volume,
    "nan": bad.nan_volume,
    "inf": bad.inf_volume,
    "timeseries": bad.timeseries_4d,
    "vector": bad.vector_nifti,
    "rgb": bad.rgb_nifti,
    "missing_slice": bad.missing_slice_series,
    "duplicate_slice": bad.duplicate_slice_series,
    "irregular": bad.irregular_series,
    "tiny": bad.tiny_volume,
    "giant": bad.giant_nifti,
}
CXR_BATCH: dict[str, Callable[[Path], Path]] = {
    "ct_slice": bad.ct_dicom_file,
    "constant": bad.constant_cxr,
    "tiny": bad.tiny_cxr,
    "giant": bad.giant_png,
}


@pytest.mark.parametrize("modality", ["CT", "CXR"])
def test_infer_batch_reports_each_bad_case_and_writes_the_rest(tmp_path, capsys, models, modality):
    folder = tmp_path / "in"
    bad.good_ct(folder) if modality == "CT" else bad.good_cxr(folder)
    paths = {name: build(folder) for name, build in (CT_BATCH if modality == "CT" else CXR_BATCH).items()}
    with pytest.raises(SystemExit) as e:
        infer_batch_command(str(models[modality]), str(folder), str(tmp_path / "out"))
    assert e.value.code == 1
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert sorted(f["id"] for f in failures) == sorted(paths)
    for f in failures:
        assert f["image"] == str(paths[f["id"]]) and f"{paths[f['id']]}: " in f["error"], f
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["failures.json", "good.json"]
    out = capsys.readouterr().out
    assert f"1 of {len(paths) + 1} images written" in out and all(str(p) in out for p in paths.values())


# --------------------------------------------------------------------------- training: too many bad cases
def test_more_than_one_percent_of_bad_cases_stops_training(tmp_path, chains):
    good, broken = bad.good_ct(tmp_path), bad.nan_volume(tmp_path)
    records = [{"id": f"case_{i:03d}", "image": str(broken if i in (10, 20) else good)} for i in range(100)]
    dl = bad.write_datalist(tmp_path / "dl", {"training": records}, CT_CATALOG)
    ds = build_dataset(dl, "training", chains["CT"])  # the default: 1%
    assert ds[10] is None  # 1 of 100: skipped and listed
    with pytest.raises(TooManyBadCases, match=r"2 of 100 cases failed to load \(more than 1%\): case_010: .*; case_020: "):
        ds[20]


# --------------------------------------------------------------------------- known gaps (outside this change)
def test_training_lists_the_reason_with_the_file(tmp_path, chains):
    img = bad.nan_volume(tmp_path)
    ds = build_dataset(datalist_with(tmp_path / "dl", "CT", image=img), "training", chains["CT"], max_bad_fraction=0.5)
    assert ds[1] is None
    (_, _, reason), = ds.bad_cases
    assert str(img) in reason and "NaN" in reason


def test_cached_training_dataset_skips_and_lists(tmp_path, chains):
    img = bad.nan_volume(tmp_path)
    dl = datalist_with(tmp_path / "dl", "CT", image=img)
    ds = build_dataset(dl, "training", chains["CT"], cache="memory", max_bad_fraction=0.5)
    assert ds[1] is None and [(i, cid) for i, cid, _ in ds.bad_cases] == [(1, "bad")]
