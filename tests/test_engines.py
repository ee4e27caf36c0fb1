"""Engines: stage schedule (resume-safe), the VLP iteration (gradient accumulation, bf16 on CPU),
checkpoint extras and threshold calibration."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.engines.calibration import closest_to_corner_threshold
from anatomy_vlp_bundle.engines.checkpoint import CheckpointExtras, check_model_config, model_config_differences
from anatomy_vlp_bundle.engines.iteration import VLPEvalIteration, VLPTrainIteration
from anatomy_vlp_bundle.engines.stages import Stage, StageScheduleHandler, parse_stages, stage_boundaries, stage_index
from anatomy_vlp_bundle.losses.criterion import build_criterion
from anatomy_vlp_bundle.networks.vlp_model import AnatomyVLPModel

torch.set_num_threads(1)

SHAPE = (16, 16, 16)


# ----------------------------------------------------------------------------- stages
def test_stage_boundaries_and_index():
    stages = parse_stages(None)  # DESIGN.md default: detection, disease, normality, alignment
    assert [s.name for s in stages] == ["detection", "disease", "normality", "alignment"]
    assert stage_boundaries(stages, 20) == [1, 4, 7, 9]
    names = [stages[stage_index(stages, e, 20)].name for e in range(1, 21)]
    assert names[:3] == ["detection"] * 3 and names[3:6] == ["disease"] * 3
    assert names[6:8] == ["normality"] * 2 and names[8:] == ["alignment"] * 12
    # a run shorter than the schedule still ends in the last stage
    assert stages[stage_index(stages, 2, 2)].name == "alignment"
    with pytest.raises(ValueError, match="unknown key"):
        parse_stages([{"name": "x", "terms": ["detection"], "epoch": 1}])
    with pytest.raises(ValueError, match="epochs"):
        parse_stages([{"name": "x", "terms": ["detection"], "epochs": 0}])


def test_stage_handler_is_derived_from_epoch():
    criterion = build_criterion()
    handler = StageScheduleHandler(None, criterion)
    # a resumed run: the handler has never run, the engine is restored at epoch 15 of 20
    engine = SimpleNamespace(state=SimpleNamespace(epoch=15, max_epochs=20))
    handler(engine)
    assert engine.state.vlp_stage.name == "alignment" and engine.state.vlp_stage.fit_prior
    assert set(criterion.active_terms()) == {"detection", "normality", "global", "fine_grained", "prompt_pair"}
    engine.state.epoch = 5
    handler(engine)
    assert engine.state.vlp_stage.name == "disease"
    assert set(criterion.active_terms()) == {"detection", "disease"} and criterion.weights["disease"] == 1.0
    engine.state.epoch = 1
    handler(engine)
    assert criterion.active_terms() == ["detection"] and criterion.weights["disease"] == 0.0  # base weight back
    with pytest.raises(ValueError, match="unknown loss term"):
        StageScheduleHandler([{"name": "x", "terms": ["nope"]}], criterion)


# ----------------------------------------------------------------------------- iteration
def _model(prior=None):
    torch.manual_seed(0)
    return AnatomyVLPModel(
        _catalog(), img_size=SHAPE, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
        stem_channels=(8, 16), prior=prior, embed_dim=16,
    )


def _catalog():
    return load_catalog("ct_totalseg")


def _batch(n, seed=0):
    cat = _catalog()
    g = torch.Generator().manual_seed(seed)
    m, f = cat.num_anatomies, cat.max_findings
    anatomy = torch.zeros(n, m, *SHAPE, dtype=torch.uint8)
    boxes = torch.zeros(n, m, 6)
    for b in range(n):
        for i in range(m):
            lo = torch.randint(0, 8, (3,), generator=g)
            anatomy[b, i, lo[0]:lo[0] + 6, lo[1]:lo[1] + 6, lo[2]:lo[2] + 6] = 1
            boxes[b, i] = torch.cat([lo, lo + 6]).float()
    return {
        "image": torch.rand(n, 1, *SHAPE, generator=g),
        "anatomy": anatomy,
        "anatomy_presence": torch.ones(n, m),
        "anatomy_boxes": boxes,
        "findings": torch.randint(0, 2, (n, m, f), generator=g).float(),
        "study_findings": torch.zeros(n, len(cat.study_findings)),
    }


def _engine(net, acc, epoch_length, stage=None):
    return SimpleNamespace(
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        accumulation_steps=acc,
        non_blocking=False,
        state=SimpleNamespace(device=torch.device("cpu"), iteration=0, epoch_length=epoch_length, vlp_stage=stage),
    )


def _per_sample_loss(outputs, targets):
    # a loss that is a mean over samples: accumulating two halves must equal the whole batch
    return {"loss": (outputs["boxes"] - 0.5).pow(2).mean() + outputs["zero_shot_logits"].pow(2).mean()}


def test_gradient_accumulation_equals_big_batch():
    stage = Stage("s", 1, ("detection",), fit_prior=False)
    batch = _batch(4)
    big = _model()
    eng = _engine(big, acc=1, epoch_length=1, stage=stage)
    eng.state.iteration = 1
    VLPTrainIteration(_per_sample_loss)(eng, batch)
    ref = {n: p.grad.clone() for n, p in big.named_parameters() if p.grad is not None}

    small = _model()
    eng = _engine(small, acc=2, epoch_length=2, stage=stage)
    it = VLPTrainIteration(_per_sample_loss)
    for i, half in enumerate(({k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()})):
        eng.state.iteration = i + 1
        it(eng, half)
    got = {n: p.grad for n, p in small.named_parameters() if p.grad is not None}
    assert set(got) == set(ref) and len(ref) > 10
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_on_cpu_and_loss_terms():
    net = _model(prior={"codes_per_anatomy": 4, "code_dim": 8, "hidden_dim": 16, "top_k": 2})
    seen = []
    net.register_forward_hook(lambda mod, args, out: seen.append((torch.is_autocast_enabled("cpu"), out["region_emb"].dtype)))
    criterion = build_criterion()
    eng = _engine(net, acc=1, epoch_length=1)
    eng.state.iteration = 1
    out = VLPTrainIteration(criterion, amp=True, amp_dtype="bfloat16", grad_clip=1.0)(eng, _batch(2))
    assert seen[0][0] is True
    assert np.isfinite(out["loss"]) and {"detection", "detection.giou", "normality", "global", "prompt_pair"} <= set(out)
    assert all(isinstance(v, float) for k, v in out.items() if k != "batch_size")
    # fp32 path: autocast off
    VLPTrainIteration(criterion, amp=False)(eng, _batch(2))
    assert seen[1][0] is False
    # an all-skipped batch makes no step and does not fail
    assert VLPTrainIteration(criterion)(eng, {})["skipped"] == 1


def test_eval_iteration_both_region_modes():
    net = _model()
    eng = _engine(net, acc=1, epoch_length=1)
    out = VLPEvalIteration(("predicted", "mask"))(eng, _batch(2))
    assert set(out) == {"predicted", "mask"}
    m = _catalog().num_anatomies
    for mode in out.values():
        assert mode["zero_shot_probs"].shape == (2, m, _catalog().max_findings)
        assert 0 <= float(mode["zero_shot_probs"].min()) and float(mode["zero_shot_probs"].max()) <= 1
        assert mode["boxes_pred"].shape == mode["boxes_true"].shape == (2, m, 6)
    # image-only mode ignores the masks: different masks, same predictions
    batch = _batch(2)
    batch2 = dict(batch, anatomy=torch.zeros_like(batch["anatomy"]))
    a = VLPEvalIteration(("predicted",))(eng, batch)["predicted"]["zero_shot_probs"]
    b = VLPEvalIteration(("predicted",))(eng, batch2)["predicted"]["zero_shot_probs"]
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- checkpoint and calibration
def test_checkpoint_extras_roundtrip(tmp_path):
    net = _model()
    net.set_thresholds(torch.full_like(net.thresholds, 0.3))
    extras = CheckpointExtras(net, version="9.9")
    torch.save({"model": net.state_dict(), "extras": extras.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["extras"]["version"] == "9.9" and ckpt["extras"]["catalog"]["name"] == _catalog().name
    assert ckpt["extras"]["model_config"]["hidden_size"] == 32
    other = _model()
    CheckpointExtras(other).load_state_dict(ckpt["extras"])
    assert torch.allclose(other.thresholds, torch.tensor(0.3))


def test_evaluation_refuses_a_checkpoint_trained_with_other_model_settings(tmp_path, caplog):
    net = _model()
    path = tmp_path / "c.pt"
    torch.save({"model": net.state_dict(), "extras": CheckpointExtras(net).state_dict()}, path)
    check_model_config(path, _model())  # same settings: nothing to say
    other = AnatomyVLPModel(**{**net.config, "stats_threshold": 2.0})
    with pytest.raises(ValueError, match=r"c\.pt.*stats_threshold: checkpoint 0\.0, config 2\.0.*--network_def#stats_threshold \"0\.0\""):
        check_model_config(path, other)
    check_model_config(path, other, enabled=False)  # on purpose
    # an evaluation-only setting may differ: evaluated with the config's value, logged
    ensemble = AnatomyVLPModel(**{**net.config, "stats_ensemble": [-2.0, 0.0]})
    with caplog.at_level(logging.WARNING):
        check_model_config(path, ensemble)
    assert "stats_ensemble [-2.0, 0.0]" in caplog.text and "c.pt" in caplog.text
    with pytest.raises(ValueError, match="stats_threshold") as err:  # not with a training setting beside it
        check_model_config(path, AnatomyVLPModel(**{**net.config, "stats_threshold": 2.0, "stats_ensemble": [1.0]}))
    assert "stats_ensemble" not in str(err.value)
    # a checkpoint saved before an option existed counts as its default
    legacy = CheckpointExtras(net).state_dict()
    legacy["model_config"] = {k: v for k, v in legacy["model_config"].items() if k not in ("study_stats", "stats_threshold")}
    torch.save({"model": net.state_dict(), "extras": legacy}, path)
    check_model_config(path, _model())
    assert model_config_differences(legacy["model_config"], AnatomyVLPModel(**{**net.config, "study_stats": True}).config) == {
        "study_stats": (False, True)
    }


def test_closest_to_corner_threshold():
    probs = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.5])
    labels = np.array([0, 0, 0, 1, 1, 1, -2])  # unknown ignored
    assert closest_to_corner_threshold(probs, labels) == pytest.approx(0.7)
    assert closest_to_corner_threshold(probs, np.zeros(7)) == 0.5  # one class only: default


def test_training_refuses_a_datalist_with_errors(tmp_path):
    from anatomy_vlp_bundle.engines.workflow import prepare_datalist
    from anatomy_vlp_bundle.synthetic.ct import generate_ct_dataset

    path = generate_ct_dataset(tmp_path / "ct", n_cases=3, seed=0, shape=(16, 16, 16), spacing=(16.0, 16.0, 16.0), progress=False)
    assert prepare_datalist(str(tmp_path / "ct")) == str(path)
    images = sorted((tmp_path / "ct").rglob("*image*.nii.gz")) or sorted((tmp_path / "ct").rglob("*.nii.gz"))
    images[0].unlink()
    with pytest.raises(ValueError, match="error"):
        prepare_datalist(str(tmp_path / "ct"))
    with pytest.raises(FileNotFoundError, match="datalist.json"):
        prepare_datalist(str(tmp_path / "empty"), generate=False)


def test_parameter_groups_scale_the_learning_rate_of_a_prefix():
    from anatomy_vlp_bundle.engines.workflow import parameter_groups

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    plain = parameter_groups(net, 0.05)
    assert len(plain) == 1 and "lr" not in plain[0] and len(plain[0]["params"]) == 4
    groups = parameter_groups(net, 0.05, lr=1e-3, lr_scale={"1": 4.0})
    by_lr = {g["lr"]: g for g in groups}
    assert set(by_lr) == {1e-3, 4e-3}
    assert [p.shape for p in by_lr[4e-3]["params"]] == [net[1].weight.shape, net[1].bias.shape]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # schedulers keep the ratio
    assert sorted(g["lr"] for g in opt.param_groups) == [5e-4, 2e-3]
    with pytest.raises(ValueError, match="matches no parameter"):
        parameter_groups(net, 0.05, lr=1e-3, lr_scale={"seg_head": 2.0})
    with pytest.raises(ValueError, match="needs the base lr"):
        parameter_groups(net, 0.05, lr_scale={"1": 2.0})
    del sched



def test_checksums_detect_corruption_and_resume_takes_the_newest_good_checkpoint(tmp_path, caplog):
    import logging

    from anatomy_vlp_bundle.engines.checkpoint import CheckpointChecksums, verify_checkpoint, write_checksum
    from anatomy_vlp_bundle.engines.workflow import resume_checkpoint

    assert resume_checkpoint(str(tmp_path), True) is None and resume_checkpoint(str(tmp_path), False) is None
    for epoch in (1, 2, 3):
        torch.save({"model": {"w": torch.full((64,), float(epoch))}}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    CheckpointChecksums(tmp_path)()
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == [f"checkpoint_epoch={e}.pt.sha256" for e in (1, 2, 3)]
    assert verify_checkpoint(tmp_path / "checkpoint_epoch=3.pt")["model"]["w"][0] == 3

    # epoch 3: a flipped byte (checksum); epoch 2: truncated by a crash (no checksum written yet)
    p3 = tmp_path / "checkpoint_epoch=3.pt"
    data = bytearray(p3.read_bytes())
    data[-40] ^= 0xFF
    p3.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checkpoint_epoch=3.pt: SHA-256 .* corrupted"):
        verify_checkpoint(p3)
    p2 = tmp_path / "checkpoint_epoch=2.pt"
    (tmp_path / "checkpoint_epoch=2.pt.sha256").unlink()
    p2.write_bytes(p2.read_bytes()[:200])
    with pytest.raises(ValueError, match="checkpoint_epoch=2.pt"):
        verify_checkpoint(p2)
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(str(tmp_path), True).endswith("checkpoint_epoch=1.pt")
    assert "checkpoint_epoch=3.pt" in caplog.text and "checkpoint_epoch=2.pt" in caplog.text

    p1 = tmp_path / "checkpoint_epoch=1.pt"
    p1.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="no usable checkpoint"):
        resume_checkpoint(str(tmp_path), True)

    # the handler rewrites a stale checksum and drops the ones whose checkpoint is gone
    write_checksum(p1)
    p3.unlink()
    CheckpointChecksums(tmp_path)()
    assert not (tmp_path / "checkpoint_epoch=3.pt.sha256").exists()
    assert (tmp_path / "checkpoint_epoch=1.pt.sha256").read_text().split()[1] == "checkpoint_epoch=1.pt"


def test_nonfinite_loss_stops_or_skips_before_any_update(caplog):
    import logging

    def nan_loss(outputs, targets):
        good = (outputs["boxes"] - 0.5).pow(2).mean()
        return {"loss": good + outputs["zero_shot_logits"].sum() * float("nan"), "detection": good,
                "prompt_pair": outputs["zero_shot_logits"].sum() * float("nan")}

    stage = Stage("s", 1, ("detection",), fit_prior=False)
    batch = dict(_batch(2), id=["case_a", "case_b"])
    net = _model()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    eng = _engine(net, acc=1, epoch_length=1, stage=stage)
    eng.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    eng.state.iteration = 1
    with pytest.raises(FloatingPointError, match=r"\['prompt_pair'\].*\['case_a', 'case_b'\]"):
        VLPTrainIteration(nan_loss, nonfinite="stop")(eng, batch)
    with caplog.at_level(logging.ERROR):
        out = VLPTrainIteration(nan_loss, nonfinite="skip")(eng, batch)
    assert out["skipped"] == 1 and out["loss"] == 0.0 and "case_a" in caplog.text
    for n, p in net.named_parameters():  # neither mode let the NaN reach a weight
        assert torch.equal(p.detach(), before[n]), n
    # the skip still took part in backward (zero gradients): DDP ranks stay in step
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in net.parameters())
    with pytest.raises(ValueError, match="nonfinite"):
        VLPTrainIteration(nan_loss, nonfinite="ignore")


def test_the_last_epoch_is_validated_when_the_interval_skips_it():
    from ignite.engine import Engine

    from anatomy_vlp_bundle.engines.workflow import ValidateLastEpoch

    class Validator:
        def __init__(self):
            self.epochs = []

        def run(self, epoch):
            self.epochs.append(epoch)

    for max_epochs, expected in ((5, [5]), (6, []), (1, [1])):
        v = Validator()
        trainer = Engine(lambda e, b: None)
        ValidateLastEpoch(v, 3).attach(trainer)
        trainer.run([0], max_epochs=max_epochs)
        assert v.epochs == expected, max_epochs


def test_resume_loads_what_an_older_checkpoint_holds_and_names_the_rest(tmp_path, caplog):
    import logging

    from anatomy_vlp_bundle.engines.workflow import resumable_objects

    path = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "trainer": {"epoch": 1}}, path)  # written before "ema" existed
    save_dict = {"model": object(), "trainer": object(), "ema": object()}
    with caplog.at_level(logging.WARNING):
        got = resumable_objects(save_dict, str(path))
    assert set(got) == {"model", "trainer"} and got["model"] is save_dict["model"]
    assert "ema" in caplog.text and str(path) in caplog.text
    assert resumable_objects(save_dict, None) == save_dict
