"""Inference: contract results from a checkpoint or a TorchScript file, geometry back to the input,
label maps and overlays, and bad inputs reported by name without losing the rest of a batch."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomy_vlp_bundle.data.datalist import load_datalist
from anatomy_vlp_bundle.engines.checkpoint import CheckpointExtras
from anatomy_vlp_bundle.inference import Predictor, draw_overlay, run_batch
from anatomy_vlp_bundle.inference import geometry
from anatomy_vlp_bundle.inference.batch import infer_command
from anatomy_vlp_bundle.networks import DeployWrapper, export_program, export_torchscript
from anatomy_vlp_bundle.synthetic import ensure_synthetic_dataset

from test_deploy_wrapper import trained_like_model

RESULT_KEYS = {"image", "modality", "catalog", "model", "regions", "anatomies", "study", "report", "notice"}
GRID = [40, 32, 32]


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_ct")
    ensure_synthetic_dataset(str(root / "data"), "ct", n=3, shape=GRID, spacing=[8.0, 8.0, 8.0], progress=False)
    dl = load_datalist(root / "data" / "datalist.json")
    cat = dl.catalog()
    model = trained_like_model(3, catalog=cat.to_dict(), img_size=GRID)
    ckpt = root / "model.pt"
    extras = CheckpointExtras(model, "0.1.0", {"spacing": [8.0, 8.0, 8.0], "roi_size": GRID}).state_dict()
    torch.save({"model": model.state_dict(), "extras": extras}, ckpt)
    return {"root": root, "dl": dl, "ckpt": ckpt, "model": model, "records": [r for s in ("training", "validation", "test") for r in dl.records(s)]}


# --------------------------------------------------------------------------- geometry
def test_voxel_box_to_world_on_a_flipped_affine():
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [100.0, -10.0, 5.0]
    # voxel 0 has its centre at x = 100 and spans [99, 101] along the flipped axis
    assert geometry.voxel_box_to_world([0, 0, 0, 1, 1, 1], affine) == pytest.approx([99, -11, 3.5, 101, -9, 6.5])
    pts = np.array([[98.9, -11.0, 3.5], [101.1, -9.0, 6.5]])
    assert geometry.world_box_to_voxels(pts, affine, [10, 10, 10]) == [0, 0, 0, 1, 1, 1]
    # clipped to the grid
    assert geometry.world_box_to_voxels(np.array([[-500.0, -500, -500], [500, 500, 500]]), affine, [10, 8, 6]) == [0, 0, 0, 10, 8, 6]


def test_boxes_map_back_to_the_input_voxels_through_resampling_and_cropping(tmp_path, ct_data):
    """A cuboid label drawn on an oblique-free but flipped, anisotropic input: the box derived on the
    preprocessed grid, mapped back, is the cuboid's own voxel box (within one output voxel)."""
    shape = (60, 50, 40)
    spacing = np.array([2.0, 2.5, 3.0])
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [60.0, -40.0, -100.0]
    img = np.full(shape, -1000.0, dtype=np.float32)
    img[5:55, 5:45, 3:37] = 40.0  # a body
    label = np.zeros(shape, dtype=np.uint8)
    label[10:30, 12:30, 8:20] = 1  # anatomy with label 1 of the synthetic catalog
    nib.save(nib.Nifti1Image(img, affine), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "lm.nii.gz"))
    pred = Predictor.load(ct_data["ckpt"])
    data = pred.prepare(tmp_path / "ct.nii.gz", tmp_path / "lm.nii.gz")
    i = next(k for k, a in enumerate(pred.catalog.anatomies) if 1 in a.labels)
    box = data["anatomy_boxes"][i].numpy()
    pts = geometry.grid_box_to_world(box, np.asarray(data["image"].affine))
    voxel = geometry.world_box_to_voxels(pts, data["input_affine"], data["input_shape"])
    tol = np.ceil(8.0 / spacing).astype(int)  # one 8 mm output voxel in input voxels
    np.testing.assert_allclose(voxel[:3], [10, 12, 8], atol=tol.max())
    np.testing.assert_allclose(voxel[3:], [30, 30, 20], atol=tol.max())
    assert data["input_shape"] == list(shape)


# --------------------------------------------------------------------------- results
def test_checkpoint_result_follows_the_contract(tmp_path, ct_data):
    pred = Predictor.load(ct_data["ckpt"])
    rec = ct_data["records"][0]
    p = pred.predict(rec["image"])
    r = p.result
    assert set(r) == RESULT_KEYS
    assert r["modality"] == "CT" and r["regions"] == "predicted" and r["notice"].startswith("Research use only")
    assert r["model"]["checkpoint_sha256"] == hashlib.sha256(Path(ct_data["ckpt"]).read_bytes()).hexdigest()
    assert r["model"]["version"] == "0.1.0"
    cat = pred.catalog
    assert list(r["anatomies"]) == cat.names
    shape = nib.load(rec["image"]).shape
    for a in cat.anatomies:
        e = r["anatomies"][a.name]
        assert set(e) == {"present", "box_world", "box_voxel", "abnormality", "findings"}
        assert list(e["findings"]) == list(a.findings)
        assert all(0.0 <= v <= 1.0 for v in [e["present"], e["abnormality"], *e["findings"].values()])
        v = e["box_voxel"]
        assert all(0 <= v[k] <= v[k + 3] <= shape[k] for k in range(3)) and all(isinstance(x, int) for x in v)
        np.testing.assert_allclose(e["box_world"], geometry.voxel_box_to_world(v, nib.load(rec["image"]).affine), atol=1e-3)
    assert list(r["study"]["findings"]) == list(cat.study_findings)
    for a in cat.anatomies:
        assert a.name[:1].upper() + a.name[1:] + ":" in r["report"]
    json.dumps(r)  # plain JSON types only

    with_mask = pred.predict(rec["image"], rec["anatomy_mask"]).result
    assert with_mask["regions"] == "mask"
    assert with_mask["anatomies"] != r["anatomies"]  # the given regions change the region features


def test_label_map_and_overlay_in_the_input_space(tmp_path, ct_data):
    pred = Predictor.load(ct_data["ckpt"])
    rec = ct_data["records"][1]
    p = pred.predict(rec["image"])
    out = pred.label_map(p, tmp_path / "regions.nii.gz", threshold=0.0)  # untrained head: keep every region
    src, lm = nib.load(rec["image"]), nib.load(str(out))
    assert lm.shape == src.shape
    np.testing.assert_allclose(lm.affine, src.affine, atol=1e-4)
    values = set(np.unique(np.asarray(lm.dataobj)).tolist())
    allowed = {0} | {a.labels[0] for a in pred.catalog.anatomies}
    assert values <= allowed and len(values - {0}) >= 1
    png = draw_overlay(p, tmp_path / "overlay.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_torchscript_file_gives_the_checkpoints_image_only_result(tmp_path, ct_data):
    ts = export_torchscript(ct_data["model"], tmp_path / "model.ts",
                            extra_files={"inference.json": json.dumps({"spacing": [8.0, 8.0, 8.0], "roi_size": GRID}),
                                         "metadata.json": json.dumps({"version": "0.1.0"})})
    a = Predictor.load(ct_data["ckpt"]).predict(ct_data["records"][0]["image"]).result
    script = Predictor.load(ts)
    assert script.kind == "torchscript" and script.preprocessing["roi_size"] == GRID
    b = script.predict(ct_data["records"][0]["image"]).result
    assert b["model"]["version"] == "0.1.0" and b["model"]["checkpoint_sha256"] != a["model"]["checkpoint_sha256"]
    for name, ea in a["anatomies"].items():
        eb = b["anatomies"][name]
        assert eb["box_voxel"] == ea["box_voxel"]
        assert eb["present"] == pytest.approx(ea["present"], abs=1e-4)
        assert eb["abnormality"] == pytest.approx(ea["abnormality"], abs=1e-4)
        for f, v in ea["findings"].items():
            assert eb["findings"][f] == pytest.approx(v, abs=1e-4)
    assert b["report"] == a["report"]
    with pytest.raises(ValueError, match="needs a training checkpoint"):
        script.predict(ct_data["records"][0]["image"], ct_data["records"][0]["anatomy_mask"])



def test_torch_export_program_matches_eager_and_serves_inference(tmp_path, ct_data):
    """torch.export (.pt2): no data-dependent branch in the deploy path, so the program keeps region
    sizes symbolic and matches the eager wrapper on other images, and `infer` takes the file."""
    model = ct_data["model"]
    path = export_program(DeployWrapper(model, preprocessing={"spacing": [8.0, 8.0, 8.0], "roi_size": GRID}), tmp_path / "m.pt2",
                          extra_files={"metadata.json": json.dumps({"version": "0.1.0"})})
    program = torch.export.load(str(path)).module()
    g = torch.Generator().manual_seed(3)
    for x in (torch.rand(1, 1, *GRID, generator=g), torch.zeros(1, 1, *GRID), torch.rand(1, 1, *GRID, generator=g) ** 4):
        with torch.no_grad():
            torch.testing.assert_close(program(x), DeployWrapper(model)(x), atol=1e-4, rtol=0)
    a = Predictor.load(ct_data["ckpt"]).predict(ct_data["records"][0]["image"]).result
    p = Predictor.load(path)
    assert p.kind == "program" and p.preprocessing["spacing"] == [8.0, 8.0, 8.0]
    b = p.predict(ct_data["records"][0]["image"]).result
    assert b["report"] == a["report"]
    for name, ea in a["anatomies"].items():
        assert b["anatomies"][name]["box_voxel"] == ea["box_voxel"]
        assert b["anatomies"][name]["findings"] == pytest.approx(ea["findings"], abs=1e-4)

def test_cxr_boxes_and_label_map_in_input_pixels(tmp_path):
    from PIL import Image

    model = trained_like_model(2)
    ckpt = tmp_path / "cxr.pt"
    torch.save({"model": model.state_dict(), "extras": CheckpointExtras(model, "0.1.0", {"roi_size": [64, 64]}).state_dict()}, ckpt)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 300), dtype=np.uint8)).save(tmp_path / "cxr.png")  # 300 wide, 150 high
    pred = Predictor.load(ckpt)
    p = pred.predict(tmp_path / "cxr.png")
    assert p.result["modality"] == "CXR"
    for e in p.result["anatomies"].values():
        x0, y0, x1, y1 = e["box_pixel"]
        assert 0 <= x0 <= x1 <= 300 and 0 <= y0 <= y1 <= 150
        assert "box_world" not in e
    out = pred.label_map(p, tmp_path / "regions.png", threshold=0.0)
    assert Image.open(out).size == (300, 150)
    assert draw_overlay(p, tmp_path / "o.png").stat().st_size > 5_000


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_are_named_and_the_batch_goes_on(tmp_path, ct_data, capsys):
    from PIL import Image
    import pydicom.data

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ct_data["records"][0]["image"], folder / "good.nii.gz")
    raw = Path(ct_data["records"][1]["image"]).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(folder / "flat.png")  # 2D given to the 3D model
    mr = folder / "mr_series"
    mr.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), mr / "1.dcm")
    (tmp_path / "empty").mkdir()

    summary = run_batch(ct_data["ckpt"], folder, tmp_path / "out", progress=False)
    assert [Path(w).name for w in summary["written"]] == ["good.json"]
    failed = {f["id"]: f["error"] for f in summary["failed"]}
    assert set(failed) == {"truncated", "flat", "mr_series"}
    assert "truncated.nii.gz" in failed["truncated"] and "flat.png" in failed["flat"] and "mr_series" in failed["mr_series"]
    assert json.loads((tmp_path / "out" / "failures.json").read_text()) == summary["failed"]
    assert "failed" in capsys.readouterr().out

    for bad in (folder / "truncated.nii.gz", folder / "flat.png", mr, tmp_path / "empty"):
        with pytest.raises(SystemExit) as e:
            infer_command(str(ct_data["ckpt"]), str(bad))
        assert e.value.code == 1
        assert bad.name in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds no image files"):
        run_batch(ct_data["ckpt"], tmp_path / "empty", tmp_path / "out2", progress=False)


def test_infer_command_writes_result_overlay_and_label_map(tmp_path, ct_data):
    rec = ct_data["records"][2]
    infer_command(str(ct_data["ckpt"]), rec["image"], out=str(tmp_path / "r.json"), overlay=str(tmp_path / "o.png"),
                  label_map=str(tmp_path / "lm.nii.gz"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r) == RESULT_KEYS
    assert (tmp_path / "o.png").is_file() and nib.load(str(tmp_path / "lm.nii.gz")).shape == nib.load(rec["image"]).shape
