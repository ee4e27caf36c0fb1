"""DDP under torchrun (2 processes, gloo on CPU).

1. ``tests/ddp_check.py``: the bundle's criterion on each rank's half of a global batch gathers the
   other rank's samples, so the contrastive terms (fine_grained, disease) equal the single-process
   loss on the whole batch (and differ from the loss on the local half alone), with the gradient
   convention of ``losses/distributed.py``.
2. The bundle itself: ``monai.bundle run training`` with ``configs/multi_gpu_train.yaml`` on a tiny
   generated CT dataset: exit code 0, a ``weights_only`` checkpoint without the ``module.`` prefix
   that loads into a fresh model, TensorBoard event files of rank 0 only, the dataset generated once.

Each test starts two fresh Python processes (imports dominate: ~15-20 s per test on 2 cores).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOL = 1e-5


def _torchrun() -> str | None:
    local = Path(sys.executable).parent / "torchrun"
    return str(local) if local.is_file() else shutil.which("torchrun")


TORCHRUN = _torchrun()
pytestmark = [
    pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo backend unavailable"),
]


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on a small shared CPU
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _torchrun_cmd(*args: str) -> list[str]:
    return [TORCHRUN, "--standalone", "--nnodes=1", "--nproc_per_node=2", *args]


def _run(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start


def _tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-n:]}\n--- stderr ---\n{proc.stderr[-n:]}"


# --------------------------------------------------------------------------- 1. the loss
@pytest.fixture(scope="module")
def ddp_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_check") / "ddp_check.json"
    proc, seconds = _run(_torchrun_cmd(str(REPO / "tests" / "ddp_check.py"), str(out)), timeout=120)
    assert proc.returncode == 0 and out.is_file(), _tail(proc)
    print(f"ddp_check.py under torchrun: {seconds:.1f} s")
    return json.loads(out.read_text())


def test_gathered_contrastive_loss_equals_single_process(ddp_check):
    assert ddp_check["world_size"] == 2 and ddp_check["backend"] == "gloo"
    assert set(ddp_check["gathered_terms"]) == {"fine_grained", "disease"}
    # sharding the batch does not change the model's per-sample outputs (the loss is what is tested)
    assert ddp_check["forward_shard_max_abs_diff"] <= TOL
    for split, summary in ddp_check["splits"].items():  # equal (4 + 4) and unequal (5 + 3) shards
        rows = [r["rows"] for r in summary["ranks"]]
        assert rows[0][0] == 0 and rows[0][1] == rows[1][0] and rows[1][1] == ddp_check["global_batch"], rows
        for term, row in summary["gathered"].items():
            ref = row["single_process"]
            assert ref > 0.1, (split, term, row)  # a real loss, not a skipped term's zero
            # convention (losses/distributed.py): every rank computes the global loss, so each rank's
            # value and their mean equal the single-process loss on the global batch
            assert row["max_abs_diff_vs_single_process"] <= TOL, (split, term, row)
            assert abs(row["rank_mean"] - ref) <= TOL, (split, term, row)
            # without gathering (the local half alone) the loss differs: the other rank's negatives count
            assert row["min_abs_diff_local_only_vs_single_process"] > 1e-2, (split, term, row)
        # gradients: local embeddings get world_size x the single-process rows, the logit scales the
        # single-process gradient (DDP's average then equals the single-process parameter gradient)
        grads = summary["grad_max_abs_err"]
        for key in ("region_emb", "region_emb_view2", "logit_scale", "disease_logit_scale"):
            assert grads[key + "_ref_max"] > 0, (split, key, grads)
            assert grads[key] <= TOL * max(1.0, grads[key + "_ref_max"]), (split, key, grads)
        # the non-gathered terms are per-rank means of the rank's own samples (DDP averages them)
        for term, row in summary["per_rank_terms"].items():
            assert row["equals_local_only"], (split, term, row)


# --------------------------------------------------------------------------- 2. the bundle
def _bundle_overrides(root: Path, text_cache: Path, dataset_dir: Path) -> list[str]:
    """The tiny CT overrides of tests/test_bundle_workflow.py as command-line arguments."""
    from test_bundle_workflow import ct_overrides

    ov = ct_overrides(root, text_cache, dataset_dir)
    # per key, so that multi_gpu_train.yaml's network_def#prior#ddp_sync stays (a whole dict would replace it)
    for key, value in ov.pop("network_def#prior").items():
        ov[f"network_def#prior#{key}"] = value
    args = []
    for key, value in ov.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


@pytest.fixture(scope="module")
def ddp_bundle_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp_bundle")
    root = base / "run"
    config = repr([str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml")])
    cmd = _torchrun_cmd(
        "-m", "monai.bundle", "run", "training",
        "--config_file", config,
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        *_bundle_overrides(root, base / "text_cache", base / "ct_data"),
    )
    proc, seconds = _run(cmd, timeout=240)
    print(f"bundle training under torchrun (2 ranks, 2 epochs, tiny CT): {seconds:.1f} s")
    return root, proc, seconds


def test_bundle_trains_under_torchrun(ddp_bundle_run):
    root, proc, seconds = ddp_bundle_run
    assert proc.returncode == 0, _tail(proc)
    log = proc.stdout + proc.stderr
    # rank 0 generated the dataset, the other rank waited for it (multi_gpu_train.yaml's `datalist`)
    assert log.count("generating the default synthetic ct dataset") == 1, _tail(proc)

    # checkpoints (rank 0): weights_only, no DDP 'module.' prefix, strict load into a fresh model
    models = root / "models"
    # the last two epoch checkpoints and the best one, each with its checksum (written once, by rank 0)
    names = ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt"]
    assert sorted(p.name for p in models.iterdir()) == sorted(names + [n + ".sha256" for n in names])
    from anatomy_vlp_bundle.engines.checkpoint import verify_checkpoint

    for name in names:
        verify_checkpoint(models / name)
    from anatomy_vlp_bundle.networks.vlp_model import AnatomyVLPModel

    for path in (models / "checkpoint_epoch=2.pt", models / "model.pt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "lr_scheduler", "trainer", "extras"} <= set(ckpt)
        state = ckpt["model"]
        assert state and not [k for k in state if k.startswith("module.")], list(state)[:5]
        config = ckpt["extras"]["model_config"]
        assert config["prior"]["ddp_sync"] is True  # the prior's statistics were all-reduced over ranks
        AnatomyVLPModel(**config).load_state_dict(state, strict=True)
    assert torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["epoch_length"] >= 1

    # TensorBoard: one set of event files (train + validation handlers) written by one process
    events = glob.glob(str(root / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(events) == 2, events
    assert len({Path(e).name.split(".")[-2] for e in events}) == 1, events  # one writer pid: rank 0's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in events:
        ea = EventAccumulator(f)
        ea.Reload()
        tags |= set(ea.Tags()["scalars"])
    assert {"loss", "detection", "fine_grained", "val_mean_auc", "val_mean_auc_mask"} <= tags, tags
