"""MONAI Label app (``anatomy_vlp_bundle/apps/monailabel``): runs in the environment of
``bash scripts/label_env.sh --test``; skipped where ``monailabel`` is not installed.

A studies folder as MONAI Label keeps it (images, ``labels/final/``) plus a contract datalist with the
reports, a tiny checkpoint (``label_data`` of conftest.py), then:
(a) without a server (``app_instance``): the region label map on the input grid, the contract result,
    training through the bundle on whole records (reports kept), a ``pretrained`` restart;
(b) with ``monailabel start_server`` (``label_server``): ``/info/`` lists the tasks, ``/infer/...`` answers.
"""

import pytest

pytest.importorskip("monailabel")

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402
from monailabel.interfaces.utils.app import app_instance, clear_cache  # noqa: E402

from anatomy_vlp_bundle.apps.monailabel.infers import label_values  # noqa: E402
from anatomy_vlp_bundle.data.datalist import load_datalist  # noqa: E402
from anatomy_vlp_bundle.inference import Predictor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "anatomy_vlp_bundle" / "apps" / "monailabel"
RESULT_KEYS = {"image", "modality", "catalog", "model", "regions", "anatomies", "study", "report", "notice"}
INFO_REPORT = "FINDINGS: The liver contains a hypodense lesion. IMPRESSION: Liver lesion."


@pytest.fixture(scope="module")
def setup(label_data):
    yield label_data
    clear_cache()


@pytest.fixture(scope="module")
def app(setup):
    conf = {"model": str(setup["ckpt"]), "model_dir": str(setup["root"] / "app_model"), "bundle_root": str(REPO)}
    return app_instance(app_dir=str(APP_DIR), studies=str(setup["studies"]), conf=conf)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- (a) without a server
def test_split_keeps_patients_together():
    from anatomy_vlp_bundle.apps.monailabel.trainers import split_by_patient

    recs = [{"id": f"i{k}", "patient": p} for k, p in enumerate(["p1", "p1", "p1", "p2", "p3", "p4"])] + [{"id": "solo"}]
    for seed in range(5):
        train, val = split_by_patient(recs, 0.4, seed)
        assert len(train) + len(val) == len(recs) and train and val
        assert not {r.get("patient", r["id"]) for r in train} & {r.get("patient", r["id"]) for r in val}
    with pytest.raises(ValueError, match="val_split"):
        split_by_patient(recs, 0.0)
    with pytest.raises(ValueError, match="at least 2 patients"):
        split_by_patient(recs[:3], 0.2)


def test_info_lists_the_tasks_with_the_catalog_labels(app, setup):
    info = app.info()
    assert set(info["models"]) == {"anatomy_vlp_regions", "anatomy_vlp_findings"}
    assert set(info["trainers"]) == {"anatomy_vlp"}
    values = label_values(setup["catalog"])
    assert info["labels"] == values and info["models"]["anatomy_vlp_regions"]["labels"] == values
    assert info["models"]["anatomy_vlp_regions"]["type"] == "segmentation"
    assert info["models"]["anatomy_vlp_findings"]["findings"] == {a.name: list(a.findings) for a in setup["catalog"].anatomies}
    assert info["datastore"]["total"] == 5 and info["datastore"]["completed"] == 4  # 4 final labels
    # values follow the catalog's first label of each anatomy
    assert all(values[a.name] == a.labels[0] for a in setup["catalog"].anatomies if a.labels)


def test_regions_label_map_on_the_input_grid(app, setup):
    image_id = setup["unlabelled"]
    res = app.infer({"model": "anatomy_vlp_regions", "image": image_id, "threshold": 0.0})  # untrained head: keep regions
    src = nib.load(str(setup["studies"] / f"{image_id}.nii.gz"))
    lm = nib.load(res["file"])
    assert lm.shape == src.shape
    np.testing.assert_allclose(lm.affine, src.affine, atol=1e-4)
    found = set(np.unique(np.asarray(lm.dataobj)).tolist())
    values = label_values(setup["catalog"])
    assert found <= {0} | set(values.values()) and len(found - {0}) >= 2
    params = res["params"]
    assert params["label_names"] == values
    assert set(params) - {"label_names", "latencies"} == RESULT_KEYS
    assert params["image"] == str((setup["studies"] / f"{image_id}.nii.gz").resolve())
    os.remove(res["file"])


def test_findings_give_the_predictors_contract_result(app, setup):
    image_id = setup["labelled"][0]
    res = app.infer({"model": "anatomy_vlp_findings", "image": image_id})
    assert res["file"] is None and res["label"] is None
    params = res["params"]
    assert set(params) - {"latencies"} == RESULT_KEYS
    expected = Predictor.load(setup["ckpt"]).predict(setup["studies"] / f"{image_id}.nii.gz").result
    assert params["anatomies"] == expected["anatomies"] and params["report"] == expected["report"]
    assert params["model"]["checkpoint_sha256"] == sha256(setup["ckpt"]) and params["regions"] == "predicted"
    for a in setup["catalog"].anatomies:
        assert set(params["anatomies"][a.name]) == {"present", "box_world", "box_voxel", "abnormality", "findings"}
        assert list(params["anatomies"][a.name]["findings"]) == list(a.findings)
    # a label map sent with the request gives the regions
    label = setup["studies"] / "labels" / "final" / f"{image_id}.nii.gz"
    with_mask = app.infer({"model": "anatomy_vlp_findings", "image": image_id, "label": str(label)})["params"]
    assert with_mask["regions"] == "mask" and with_mask["anatomies"] != params["anatomies"]
    with pytest.raises(MONAILabelException):
        app.infer({"model": "anatomy_vlp_findings", "image": "no_such_image"})


def test_train_hands_over_whole_records_and_writes_a_checkpoint(app, setup):
    ds = app.datastore()
    ds.update_image_info(setup["labelled"][1], {"report": INFO_REPORT})  # per-image info wins over the datalist
    tiny = {
        "cache_dir": str(setup["text_cache"]),
        "spacing": setup["spacing"],
        "roi_size": setup["grid"],
        "val_batch_size": 4,
        "network_def#hidden_size": 32,
        "network_def#num_heads": 2,
        "network_def#num_layers": 1,
        "network_def#stem_channels": [8, 16],
        "network_def#prior": {"codes_per_anatomy": 8, "code_dim": 16, "hidden_dim": 32, "top_k": 2},
    }
    stats = app.train({"model": "anatomy_vlp", "max_epochs": 1, "batch_size": 2, "val_split": 0.25, "pretrained": False,
                       "overrides": tiny})
    out = setup["root"] / "app_model" / "anatomy_vlp"
    assert stats["epochs"] == 1 and stats["iterations"] == 1 and stats["training"] == 3 and stats["validation"] == 1 and stats["matched"] == 4
    assert stats["pretrained"] is None and stats["best_metric_epoch"] == 1
    json.dumps(stats, allow_nan=False)  # served as JSON by /info/ (AUC of one validation case is NaN)
    assert app.info()["train_stats"]["anatomy_vlp"]["datalist"] == stats["datalist"]

    # the hand-over: contract records with their reports, the datastore label as anatomy_mask
    dl = load_datalist(stats["datalist"])
    recs = {r["id"]: r for s in ("training", "validation") for r in dl.records(s)}
    assert set(recs) == set(setup["labelled"])  # only images with a final label
    for image_id, rec in recs.items():
        source = setup["records"][image_id]
        assert rec["anatomy_mask"] == str((setup["studies"] / "labels" / "final" / f"{image_id}.nii.gz").resolve())
        assert rec["image"] == str((setup["studies"] / f"{image_id}.nii.gz").resolve())
        assert rec["findings"] == source["findings"] and rec["anatomy_sentences"] == source["anatomy_sentences"]
        assert rec["report"] == (INFO_REPORT if image_id == setup["labelled"][1] else source["report"])
    assert dl.catalog().to_dict() == setup["catalog"].to_dict()

    # the checkpoint: trained on these records, safe to load, and now the served model
    best = out / "model.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["extras"]["model_config"]["hidden_size"] == 32 and ckpt["extras"]["catalog"]["name"] == setup["catalog"].name
    assert (out / "checkpoint_epoch=1.pt").is_file() and list((out / "runs").glob("events.out.tfevents.*"))
    res = app.infer({"model": "anatomy_vlp_findings", "image": setup["unlabelled"]})
    assert res["params"]["model"]["checkpoint_sha256"] == sha256(best)


def test_pretrained_training_restarts_from_the_served_checkpoint(app, setup):
    served = setup["root"] / "app_model" / "anatomy_vlp" / "model.pt"
    assert served.is_file(), "runs after the first training"
    before = torch.load(served, map_location="cpu", weights_only=True)["model"]
    # no network overrides: architecture and preprocessing come from the checkpoint (hidden 32, 40x32x32 at 8 mm);
    # another seed, so that a network initialised from scratch would differ from the checkpoint; the default
    # batch_size 4 is capped at the 3 training records (one step rather than none)
    stats = app.train({"model": "anatomy_vlp", "max_epochs": 1, "val_split": 0.25, "seed": 1,
                       "overrides": {"cache_dir": str(setup["text_cache"])}})
    assert stats["pretrained"] == str(served) and stats["training"] == 3 and stats["iterations"] == 1
    after = torch.load(served, map_location="cpu", weights_only=True)
    assert after["extras"]["model_config"]["hidden_size"] == 32 and after["extras"]["preprocessing"]["roi_size"] == setup["grid"]
    # one optimiser step (AdamW, lr <= 5e-4) from the loaded weights stays within ~1e-3 of them (the prior's
    # codebook is not an optimiser parameter: its EMA update moves it in any training step)
    moved = {k: (after["model"][k].float() - v.float()).abs().max().item() for k, v in before.items()
             if k.endswith(".weight") and "quantizer" not in k}
    assert max(moved.values()) < 5e-3, sorted(moved.items(), key=lambda kv: -kv[1])[:3]
    with pytest.raises(MONAILabelException):  # weights that do not fit the configured network: a clear error
        app.train({"model": "anatomy_vlp", "max_epochs": 1, "overrides": {"network_def#hidden_size": 48, "cache_dir": str(setup["text_cache"])}})


# --------------------------------------------------------------------------- (b) with the server
def test_server_lists_tasks_and_answers_infer(setup, label_server, tmp_path):
    base = label_server.url
    info = requests.get(f"{base}/info/", timeout=30).json()
    assert {"anatomy_vlp_regions", "anatomy_vlp_findings"} <= set(info["models"]) and "anatomy_vlp" in info["trainers"]

    image_id = setup["unlabelled"]
    r = requests.post(f"{base}/infer/anatomy_vlp_findings", params={"image": image_id}, timeout=120)
    assert r.status_code == 200, r.text
    result = r.json()
    assert set(result) - {"latencies"} == RESULT_KEYS
    assert list(result["anatomies"]) == setup["catalog"].names and result["notice"].startswith("Research use only")

    r = requests.post(f"{base}/infer/anatomy_vlp_regions", params={"image": image_id, "output": "image"}, timeout=120)
    assert r.status_code == 200, r.text
    (tmp_path / "regions.nii.gz").write_bytes(r.content)
    assert nib.load(str(tmp_path / "regions.nii.gz")).shape == nib.load(str(label_server.studies / f"{image_id}.nii.gz")).shape
