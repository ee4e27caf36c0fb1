"""MONAI Deploy app (anatomy_vlp_bundle/apps/deploy): a synthetic CT written as DICOM series, a tiny
TorchScript model, the app run end to end from its command line; result.json, the DICOM SEG of the
anatomy boxes and the report SR checked against the bundle's Predictor on the same series.

Runs in the deploy environment only (``bash scripts/deploy_env.sh --test``); skipped elsewhere.
"""

import pytest

pytest.importorskip("monai.deploy")
pytest.importorskip("highdicom")

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import highdicom as hd  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from anatomy_vlp_bundle.apps.deploy import (  # noqa: E402
    DeployInputError,
    anatomy_code,
    box_segmentation,
    order_along_slice_axis,
    resolve_model_file,
)
from anatomy_vlp_bundle.data.datalist import load_datalist  # noqa: E402
from anatomy_vlp_bundle.data.readers import load_study_image  # noqa: E402
from anatomy_vlp_bundle.inference import Predictor  # noqa: E402
from anatomy_vlp_bundle.networks import export_torchscript  # noqa: E402
from anatomy_vlp_bundle.synthetic import ensure_synthetic_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_deploy_wrapper import trained_like_model  # noqa: E402

GRID = [40, 32, 32]
SLOPE, INTERCEPT = 0.5, -1024.0  # stored = (HU - intercept) / slope: HU survive only if the reader rescales
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- DICOM writing
def write_series(volume, affine, folder, *, modality="CT", study_uid, frame_uid, series_number, slices=None,
                 description="", rng=None):
    """Write a ``(X, Y, Z)`` HU volume with a RAS ``affine`` as one single-frame DICOM series.

    Column i runs along ImageOrientationPatient's row direction, row j along its column direction, slice k
    at ImagePositionPatient = origin + k * third axis (LPS). Files get random names and InstanceNumber
    k + 1 in the volume's order, which for a left-handed affine is the reverse of the slice normal.
    Returns ``{SOPInstanceUID: k}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    series_uid = generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    uids = {}
    ks = list(range(volume.shape[2])) if slices is None else list(slices)
    order = rng.permutation(len(ks)) if rng is not None else range(len(ks))
    for n in order:
        k = ks[n]
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Case", "SYN0001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20250101", "120000", "", "", "1"
        ds.StudyDescription, ds.SeriesDescription = "synthetic torso", description
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.Manufacturer, ds.PatientPosition = "synthetic", "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(float(v), 4) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # [between rows, between columns]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = SLOPE, INTERCEPT, "HU"
        stored = np.clip(np.round((volume[:, :, k].T - INTERCEPT) / SLOPE), 0, 65535).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(folder / f"{uid}.dcm"), enforce_file_format=True)
        uids[uid] = k
    return uids


def instances_along_normal(folder):
    """SOPInstanceUIDs of a series folder sorted along the slice normal (row x column direction)."""
    items = []
    for f in Path(folder).iterdir():
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        items.append((float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))), ds.SOPInstanceUID))
    return [uid for _, uid in sorted(items)]


def run_app(args, env_extra=None, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "anatomy_vlp_bundle.apps.deploy", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy_app")
    ensure_synthetic_dataset(str(root / "data"), "ct", n=3, shape=GRID, spacing=[8.0, 8.0, 8.0], progress=False)
    dl = load_datalist(root / "data" / "datalist.json")
    records = [r for s in ("training", "validation", "test") for r in dl.records(s)]
    # prefer a left-handed volume: its slice order is the reverse of the slice normal
    record = min(records, key=lambda r: np.linalg.det(nib.load(r["image"]).affine[:3, :3]))
    img = nib.load(record["image"])
    volume, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine

    model = trained_like_model(3, catalog=dl.catalog().to_dict(), img_size=GRID)
    model_dir = root / "models" / "anatomy_vlp"
    ts = export_torchscript(model, model_dir / "model.ts", extra_files={
        "metadata.json": json.dumps({"version": "0.1.0"}),
        "inference.json": json.dumps({"spacing": [8.0, 8.0, 8.0], "roi_size": GRID}),
    })

    rng = np.random.default_rng(0)
    study, frame = generate_uid(), generate_uid()
    ct_dir = root / "input" / "ct_full"
    uids = write_series(volume, affine, ct_dir, study_uid=study, frame_uid=frame, series_number=2, rng=rng, description="full")
    # a short CT series of the same study (a scout, say): the selector must prefer the full series
    write_series(volume, affine, root / "input" / "ct_short", study_uid=study, frame_uid=frame, series_number=1,
                 slices=range(10, 15), rng=rng, description="short")
    mr_dir = root / "mr_input" / "mr"
    write_series(volume, affine, mr_dir, modality="MR", study_uid=generate_uid(), frame_uid=generate_uid(), series_number=3, rng=rng)

    out = root / "out"
    proc = run_app(["-i", str(root / "input"), "-o", str(out), "-m", str(ts)], cwd=root)
    return {"root": root, "ts": ts, "model_dir": root / "models", "ct_dir": ct_dir, "uids": uids, "volume": volume,
            "affine": affine, "out": out, "proc": proc, "mr_input": root / "mr_input", "study": study}


@pytest.fixture(scope="module")
def expected(case):
    return Predictor.load(case["ts"]).predict(case["ct_dir"]).result


def dicom_outputs(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.dcm")):
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        out.setdefault(str(ds.Modality), []).append(f)
    return out


# --------------------------------------------------------------------------- tests
def test_dicom_series_holds_the_volume_in_hounsfield_units(case):
    """The written series reads back (through the bundle's reader) as the NIfTI's HU and geometry."""
    loaded = load_study_image(case["ct_dir"], "CT")
    vol, affine = case["volume"], case["affine"]
    if np.linalg.det(affine[:3, :3]) < 0:  # ITK orders slices along the normal: k runs backwards
        vol = vol[:, :, ::-1]
        affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, vol.shape[2] - 1], [0, 0, 0, 1]], dtype=float)
    assert tuple(loaded.shape[1:]) == vol.shape
    np.testing.assert_allclose(np.asarray(loaded[0]), vol, atol=1e-3)
    np.testing.assert_allclose(np.asarray(loaded.affine), affine, atol=1e-3)


def test_app_runs_and_result_json_is_the_predictors_result(case, expected):
    proc = case["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((case["out"] / "result.json").read_text())
    assert set(result) == set(expected)
    assert Path(result["image"]) == case["ct_dir"].resolve()  # the full CT series, not the short one
    assert Path(expected["image"]) == case["ct_dir"]
    for key in ("modality", "catalog", "model", "regions", "report", "notice"):
        assert result[key] == expected[key], key
    assert list(result["anatomies"]) == list(expected["anatomies"])
    for name, e in expected["anatomies"].items():
        r = result["anatomies"][name]
        assert r["box_voxel"] == e["box_voxel"] and r["box_world"] == e["box_world"], name
        assert r["present"] == pytest.approx(e["present"], abs=1e-4)
        assert r["abnormality"] == pytest.approx(e["abnormality"], abs=1e-4)
        assert r["findings"] == pytest.approx(e["findings"], abs=1e-4)
    assert result["study"]["findings"] == pytest.approx(expected["study"]["findings"], abs=1e-4)


def test_seg_holds_the_present_anatomies_boxes_on_the_source_frames(case, expected):
    assert case["proc"].returncode == 0, case["proc"].stderr[-4000:]
    files = dicom_outputs(case["out"])
    assert len(files.get("SEG", [])) == 1, files
    seg = hd.seg.segread(str(files["SEG"][0]))
    present = [n for n, e in expected["anatomies"].items() if e["present"] >= 0.5]
    assert 0 < len(present) < len(expected["anatomies"])  # the tiny model calls some present, some not
    assert [seg.get_segment_description(i + 1).segment_label for i in range(len(present))] == present
    assert seg.number_of_segments == len(present)

    # references: the full CT series' instances only
    ct_uids = set(case["uids"])
    refs = seg.get_source_image_uids()
    assert {sop for _, _, sop in refs} <= ct_uids and len(refs) > 0
    series_uid = pydicom.dcmread(str(next(case["ct_dir"].iterdir())), stop_before_pixels=True).SeriesInstanceUID
    assert {series for _, series, _ in refs} == {series_uid}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.StudyInstanceUID == case["study"]

    # pixels: box_voxel [i0, j0, k0, i1, j1, k1] on the instances sorted along the slice normal
    order = instances_along_normal(case["ct_dir"])
    cols, rows, slices = case["volume"].shape
    asymmetric = 0
    for number, name in enumerate(present, start=1):
        i0, j0, k0, i1, j1, k1 = expected["anatomies"][name]["box_voxel"]
        want = np.zeros((slices, rows, cols), dtype=np.uint8)
        want[k0:k1, j0:j1, i0:i1] = 1
        got = seg.get_pixels_by_source_instance(order, segment_numbers=[number], assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(got[..., 0], want, err_msg=name)
        asymmetric += not np.array_equal(want, want[::-1])
    assert asymmetric > 0  # at least one box tells the two slice orders apart

    liver_like = [n for n in present if anatomy_code(n)[0].value != "91723000"]
    codes = {seg.get_segment_description(i + 1).segment_label: seg.get_segment_description(i + 1) for i in range(len(present))}
    for name in liver_like:
        assert codes[name].segmented_property_type.value == anatomy_code(name)[0].value
        assert codes[name].segmented_property_category.value == "91723000"


def test_report_sr_carries_the_report_text(case, expected):
    assert case["proc"].returncode == 0, case["proc"].stderr[-4000:]
    files = dicom_outputs(case["out"])
    assert len(files.get("SR", [])) == 1, files
    sr = pydicom.dcmread(str(files["SR"][0]))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    assert sr.StudyInstanceUID == case["study"]
    text = sr.ContentSequence[0].TextValue
    assert expected["report"] in text and expected["notice"] in text


def test_input_without_a_ct_series_fails_naming_the_input(case, tmp_path):
    """Paths from the SDK's environment variables; the model path a folder holding model.ts."""
    proc = run_app([], env_extra={
        "HOLOSCAN_INPUT_PATH": str(case["mr_input"]),
        "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "out"),
        "HOLOSCAN_MODEL_PATH": str(case["model_dir"]),
    }, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no CT series" in proc.stderr and str(case["mr_input"]) in proc.stderr
    assert "MR series" in proc.stderr  # what the input does hold
    assert not (tmp_path / "out" / "result.json").exists()


# --------------------------------------------------------------------------- helpers, no app run
def test_anatomy_codes():
    code, side = anatomy_code("liver")
    assert (code.value, code.scheme_designator, side) == ("10200004", "SCT", None)
    code, side = anatomy_code("right kidney")
    assert code.value == "64033007" and side.value == "24028007"
    code, _ = anatomy_code("adrenal glands")
    assert code.value == "23451007"
    code, side = anatomy_code("cardiac silhouette")
    assert (code.value, code.meaning, side) == ("91723000", "cardiac silhouette", None)


def test_box_segmentation_skips_absent_and_empty_boxes():
    result = {"anatomies": {
        "a": {"present": 0.9, "box_voxel": [1, 2, 3, 4, 5, 6]},
        "b": {"present": 0.2, "box_voxel": [0, 0, 0, 8, 8, 8]},
        "c": {"present": 0.7, "box_voxel": [2, 2, 2, 2, 5, 5]},
    }}
    mask, names = box_segmentation(result, [8, 7, 6])
    assert names == ["a"] and mask.shape == (6, 7, 8, 1)
    assert mask.sum() == 3 * 3 * 3 and mask[3:6, 2:5, 1:4, 0].all()


def test_slice_order_and_model_resolution_errors(tmp_path):
    ds = Dataset()
    ds.SOPInstanceUID, ds.Rows, ds.Columns, ds.ImagePositionPatient = "1.2.3", 4, 5, [0, 0, 0]
    with pytest.raises(DeployInputError, match="1 image instances"):
        order_along_slice_axis([ds], np.eye(4), [5, 4, 3])
    with pytest.raises(DeployInputError, match="4 x 6"):
        order_along_slice_axis([ds], np.eye(4), [6, 4, 1])
    with pytest.raises(FileNotFoundError, match="no TorchScript model"):
        resolve_model_file(tmp_path)
    (tmp_path / "a.ts").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.ts").write_bytes(b"")
    with pytest.raises(DeployInputError, match="holds 2 models"):
        resolve_model_file(tmp_path)
    assert resolve_model_file(tmp_path / "sub") == tmp_path / "sub" / "b.ts"
