"""The bundle workflows end to end (model-zoo pattern): ``ConfigWorkflow`` over configs/train.yaml
(+ cxr.yaml, + evaluate.yaml) on tiny generated datasets, tiny model, two epochs.

Checks: a checkpoint appears that loads with ``weights_only=True`` and has the documented keys,
every loss term reaches TensorBoard, resume restarts at the right epoch, evaluation writes the
metrics JSON and ROC PNGs.
"""

import glob
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = str(CONFIGS / "train.yaml")
CT_GRID = {"shape": [40, 32, 32], "spacing": [8.0, 8.0, 8.0]}


def tiny_overrides(root: Path, text_cache: Path, dataset_dir: Path, **extra) -> dict:
    ov = {
        "bundle_root": str(root),
        "cache_dir": str(text_cache),  # shared text-embedding cache: prompts are encoded once per session
        "dataset_dir": str(dataset_dir),
        "max_epochs": 2,
        "val_interval": 1,
        "batch_size": 2,
        "val_batch_size": 4,
        "show_progress": False,
        "num_workers": 0,
        "network_def#hidden_size": 32,
        "network_def#num_heads": 2,
        "network_def#num_layers": 1,
        "network_def#stem_channels": [8, 16],
        "network_def#prior": {"codes_per_anatomy": 8, "code_dim": 16, "hidden_dim": 32, "top_k": 2},
    }
    ov.update(extra)
    return ov


def ct_overrides(root, text_cache, dataset_dir, **extra):
    return tiny_overrides(
        root, text_cache, dataset_dir,
        synthetic_options={"n": 12, **CT_GRID, "progress": False},
        spacing=CT_GRID["spacing"], roi_size=CT_GRID["shape"], **extra,
    )


def run_workflow(config_file, workflow_type="train", **override):
    wf = ConfigWorkflow(config_file=config_file, workflow_type=workflow_type, **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module")
def session_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundle")
    return {"text": base / "text_cache", "ct": base / "ct_data", "base": base}


@pytest.fixture(scope="module")
def trained_ct(session_dirs):
    root = session_dirs["base"] / "ct_run"
    wf = run_workflow(TRAIN, **ct_overrides(root, session_dirs["text"], session_dirs["ct"]))
    return root, wf


def test_train_writes_safe_checkpoint_and_logs_every_term(trained_ct):
    root, wf = trained_ct
    best = root / "models" / "model.pt"
    last = root / "models" / "checkpoint_epoch=2.pt"
    assert best.is_file() and last.is_file()
    for path in (best, last):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "lr_scheduler", "trainer", "extras"} <= set(ckpt)
        assert {"catalog", "model_config", "thresholds", "version"} <= set(ckpt["extras"])
        assert "thresholds" in ckpt["model"] and "prompt_pos" in ckpt["model"]
    last_ckpt = torch.load(last, weights_only=True)
    assert last_ckpt["trainer"]["epoch"] == 2 if "epoch" in last_ckpt["trainer"] else last_ckpt["trainer"]["iteration"] > 0
    # validation calibrated the model: thresholds differ from the 0.5 default somewhere
    assert (torch.tensor(last_ckpt["extras"]["thresholds"]) != 0.5).any()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in glob.glob(str(root / "runs" / "events.out.tfevents.*")):
        ea = EventAccumulator(f)
        ea.Reload()
        tags |= set(ea.Tags()["scalars"])
    # two epochs of a 4-stage schedule: epoch 1 detection (components too), epoch 2 the alignment stage
    assert {"loss", "detection", "detection.giou", "detection.l1", "detection.presence", "global", "fine_grained", "prompt_pair",
            "normality", "val_mean_auc", "val_mean_auc_mask"} <= tags


def test_evaluate_writes_metrics_and_roc(trained_ct, session_dirs):
    root, _ = trained_ct
    ov = ct_overrides(root, session_dirs["text"], session_dirs["ct"], n_boot=50)
    run_workflow([TRAIN, str(CONFIGS / "evaluate.yaml")], workflow_type="eval", **ov)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"predicted", "mask"}
    for mode in metrics.values():
        assert {"mean_auc", "mean_auc_ci", "mean_balanced_accuracy", "mean_f1", "box_iou", "presence_accuracy"} <= set(mode)
        assert "focal_mean_auc" in mode and 0.0 <= mode["presence_accuracy"] <= 1.0
        assert 0.0 <= mode["mask_dice"] <= 1.0  # the mask head's regions against the given masks
    for mode in ("predicted", "mask"):
        assert (root / "eval" / mode / "metrics.json").is_file() and list((root / "eval" / mode).glob("roc_*.png"))



def test_transfer_config_measures_retrieval_and_report_generation(trained_ct, session_dirs):
    from anatomy_vlp_bundle.data.datalist import load_datalist
    from anatomy_vlp_bundle.text.reports import split_sentences

    root, _ = trained_ct
    ov = ct_overrides(root, session_dirs["text"], session_dirs["ct"])
    run_workflow([TRAIN, str(CONFIGS / "transfer.yaml")], workflow_type="eval", **ov)
    out = root / "eval" / "transfer"
    metrics = json.loads((out / "metrics.json").read_text())
    dl = load_datalist(session_dirs["ct"] / "datalist.json")
    n_test = len(dl.records("test"))
    assert metrics["cases"] == n_test and metrics["retrieval"]["cases"] <= n_test
    for space in ("regions", "global_cls"):
        for rec in metrics["retrieval"][space].values():
            assert 0.0 <= rec["R@1"] <= rec["R@5"] <= rec["R@10"] <= 1.0
    gen = metrics["report_generation"]
    assert 0.0 <= gen["bleu4"] <= 1.0 and 0.0 <= gen["rouge_l"] <= 1.0 and gen["cases"] == n_test
    reports = json.loads((out / "generated_reports.json").read_text())
    assert [r["id"] for r in reports] == [r["id"] for r in dl.records("test")]
    # the sentence bank is the training split's: every generated sentence comes from a training report
    train_sentences = {s for r in dl.records("training") for s in split_sentences(r.get("report", ""))}
    generated = [s for r in reports for s in split_sentences(r["generated"])]
    assert generated and set(generated) <= train_sentences
    assert (out / "metrics.md").read_text().startswith("Retrieval on")


def test_transfer_suite_runs_every_evaluation_into_one_folder(trained_ct, session_dirs):
    """`run transfer_suite` (quick budget) on a tiny transfer set generated on first use: every table
    row, plot and the lesion task are there, and the numbers are in range."""
    from monai.bundle import run

    from anatomy_vlp_bundle.data.catalog import load_catalog

    root, _ = trained_ct
    data = session_dirs["base"] / "transfer_data"
    ov = ct_overrides(root, session_dirs["text"], session_dirs["ct"], transfer_quick=True, transfer_dataset_dir=str(data),
                      transfer_budget={"synthetic": {"n": 16, "seed": 1, **CT_GRID, "progress": False}})
    run("transfer_suite", config_file=[TRAIN, str(CONFIGS / "transfer.yaml")], **ov)
    out = root / "eval" / "transfer_suite"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (data / "lesion_datalist.json").is_file()  # generated with lesion masks
    rows = metrics["classification"]["label_efficiency"]
    assert {(r["mode"], r["init"], r["fraction"]) for r in rows} == {
        (m, i, f) for m in ("linear probe", "fine-tune (LP-FT)") for i in ("pretrained", "scratch") for f in (0.5, 1.0)}
    assert all(r["mean_auc"] is None or 0.0 <= r["mean_auc"] <= 1.0 for r in rows)
    assert [r["train_cases"] for r in rows if r["mode"] == "linear probe" and r["init"] == "scratch"] == [
        round(0.5 * metrics["cases"]["training"]), metrics["cases"]["training"]]
    other = metrics["classification"]["other_catalog"]
    assert other["catalog"] == "ct_totalseg" and set(other["mapped_by_name"]) == set(load_catalog("synthetic_ct").names)
    assert "trachea" in other["new"] and len(other["runs"]) == 2
    seg = metrics["segmentation"]
    assert {r["task"] for r in seg} == {"anatomy", "lesion"} and len(seg) == 8
    assert all(0.0 <= r["mean_dice"] <= 1.0 for r in seg)
    assert set(seg[0]["per_channel"]) == set(load_catalog("synthetic_ct").names)
    assert [r["train_cases"] for r in seg if r["labelled"] == "few"] == [2, 2]
    for rec in metrics["retrieval"]["regions"].values():
        assert 0.0 <= rec["R@1"] <= rec["R@5"] <= rec["R@10"] <= 1.0
    md = (out / "transfer.md").read_text()
    assert "### Classification" in md and "### Segmentation" in md and "### Retrieval" in md
    assert all((out / f).stat().st_size > 1000 for f in ("label_efficiency.png", "segmentation_dice.png", "retrieval.png"))


def test_transfer_command_names_a_missing_checkpoint(tmp_path):
    from anatomy_vlp_bundle.cli import main

    with pytest.raises(SystemExit, match="transfer: .*nope.pt"):
        main(["transfer", "--checkpoint", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "out")])


def test_infer_batch_and_ckpt_export_from_the_trained_checkpoint(trained_ct, session_dirs, tmp_path):
    """`run inference` on the test split, then `ckpt_export network_def` with configs/inference.yaml:
    the .ts carries the training preprocessing and gives the checkpoint's image-only results."""
    from monai.bundle import ckpt_export

    from anatomy_vlp_bundle.inference import Predictor

    root, _ = trained_ct
    best = root / "models" / "model.pt"
    datalist = session_dirs["ct"] / "datalist.json"
    run_workflow(str(CONFIGS / "inference.yaml"), workflow_type="infer", ckpt_path=str(best), input=str(datalist),
                 output_dir=str(tmp_path / "out"), overlays=True)
    results = sorted((tmp_path / "out").glob("*.json"))
    n_test = len(json.loads(datalist.read_text())["test"])
    assert len(results) == n_test + 1  # + failures.json
    assert json.loads((tmp_path / "out" / "failures.json").read_text()) == []
    assert len(list((tmp_path / "out").glob("*.png"))) == n_test

    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(best), key_in_ckpt="model",
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.yaml"), ckpt_path=str(best))
    # the model-zoo check of the metadata's network_data_format on the exported network definition
    from monai.bundle import verify_net_in_out

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = CT_GRID["shape"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    verify_net_in_out(net_id="network_def", meta_file=str(tmp_path / "metadata.json"),
                      config_file=str(CONFIGS / "inference.yaml"), ckpt_path=str(best))
    script, eager = Predictor.load(ts), Predictor.load(best)
    assert script.kind == "torchscript" and script.preprocessing["spacing"] == CT_GRID["spacing"]
    assert script.preprocessing["roi_size"] == CT_GRID["shape"] and script.version == eager.version != ""
    image = json.loads(results[0].read_text())["image"]
    a, b = eager.predict(image).result, script.predict(image).result
    for name, ea in a["anatomies"].items():
        assert b["anatomies"][name]["box_voxel"] == ea["box_voxel"]
        for f, v in ea["findings"].items():
            assert abs(b["anatomies"][name]["findings"][f] - v) <= 1e-4

def test_resume_restarts_at_the_right_epoch(session_dirs):
    # with weight averaging on (ema_decay): the average is resumed too, and model.pt holds it
    root = session_dirs["base"] / "resume_run"
    run_workflow(TRAIN, **ct_overrides(root, session_dirs["text"], session_dirs["ct"], max_epochs=1, ema_decay=0.9))
    assert (root / "models" / "checkpoint_epoch=1.pt").is_file()
    wf = run_workflow(TRAIN, **ct_overrides(root, session_dirs["text"], session_dirs["ct"], max_epochs=2, resume=True, ema_decay=0.9))
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2
    ema = wf.parser.get_parsed_content("train#ema")
    assert ema.updates == trainer.state.iteration and not ema.swapped  # the average went on from the checkpoint's
    best = torch.load(root / "models" / "model.pt", weights_only=True)
    last = torch.load(root / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    # the best checkpoint was saved during validation: its weights are the average; the last one's are the live weights
    assert all(torch.equal(best["model"][k].float(), v) for k, v in best["ema"]["shadow"].items())
    assert not all(torch.equal(last["model"][k].float(), v) for k, v in last["ema"]["shadow"].items())
    assert trainer.state.iteration == 2 * trainer.state.epoch_length  # one epoch restored + one trained
    assert len(trainer.state.epoch_times) == 1  # this run trained epoch 2 only
    assert trainer.state.vlp_stage.name == "alignment"  # the stage of epoch 2 of 2, derived after the restore
    assert (root / "models" / "checkpoint_epoch=2.pt").is_file()
    # every checkpoint has its checksum beside it
    for name in ("checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt"):
        assert (root / "models" / (name + ".sha256")).is_file(), name

    # the newest checkpoint corrupted (a bit flipped after it was written): named, skipped, and the
    # run resumes from the one before it
    last = root / "models" / "checkpoint_epoch=2.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    wf = run_workflow(TRAIN, **ct_overrides(root, session_dirs["text"], session_dirs["ct"], max_epochs=3, resume=True))
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert wf.parser.get_parsed_content("train#resume_path").endswith("checkpoint_epoch=1.pt")
    assert trainer.state.epoch == 3 and len(trainer.state.epoch_times) == 2  # epochs 2 and 3 trained again


def test_cxr_training(session_dirs):
    root = session_dirs["base"] / "cxr_run"
    ov = tiny_overrides(
        root, session_dirs["text"], session_dirs["base"] / "cxr_data",
        synthetic_options={"n": 12, "size": 64, "progress": False}, roi_size=[64, 64], patch_size=16, max_epochs=1,
    )
    run_workflow([TRAIN, str(CONFIGS / "cxr.yaml")], **ov)
    ckpt = torch.load(root / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert ckpt["extras"]["model_config"]["spatial_dims"] == 2
    assert ckpt["extras"]["model_config"]["structure_sigmas"] == [1.0, 2.0, 4.0]  # cxr.yaml's structure views
    assert ckpt["extras"]["model_config"]["stats_contralateral"] is True
    assert ckpt["extras"]["catalog"]["modality"].lower() == "cxr"
