"""DeployWrapper: pred layout, state-dict compatibility, TorchScript export run with torch alone."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.networks import AnatomyVLPModel, DeployWrapper, describe_layout, export_torchscript, script_deploy
from anatomy_vlp_bundle.networks.normality_prior import fit_score_calibration
from anatomy_vlp_bundle.text.prompts import PromptBank, build_prompt_texts

CT_CATALOG = {
    "name": "tiny_ct",
    "modality": "CT",
    "anatomies": [
        {"name": "liver", "labels": [1], "findings": ["lesion", "steatosis"]},
        {"name": "spleen", "labels": [2], "findings": ["splenomegaly"]},
        {"name": "aorta", "labels": [3], "findings": []},
    ],
    "study_findings": ["ascites", "lymphadenopathy"],
}


def trained_like_model(spatial_dims=3, seed=0, **kwargs):
    """A tiny model with prompts, thresholds and (when it has a prior) a fitted calibration."""
    cfg = dict(
        catalog=CT_CATALOG if spatial_dims == 3 else "synthetic_cxr",
        img_size=(32, 32, 24) if spatial_dims == 3 else (64, 64),
        patch_size=8 if spatial_dims == 3 else 16,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        embed_dim=8,
        stem_channels=(4, 8),
        prior={"codes_per_anatomy": 4, "code_dim": 4, "hidden_dim": 8},
        proj_hidden_dim=16,
    )
    cfg.update(kwargs)
    torch.manual_seed(seed)
    model = AnatomyVLPModel(**cfg)
    g = torch.Generator().manual_seed(seed)
    table = {}

    def encode(texts):
        for t in texts:
            table.setdefault(t, torch.randn(model.embed_dim, generator=g))
        return torch.stack([table[t] for t in texts])

    model.set_prompt_bank(PromptBank.from_texts(build_prompt_texts(model.catalog), encode))
    if model.seg_head is not None and model.seg_head.refine is not None:
        with torch.no_grad():  # a trained refinement is not the zero-initialised identity
            model.seg_head.refine[2].weight.normal_(generator=g)
    m, f, s = model.num_anatomies, model.num_findings, model.num_study_findings
    model.set_thresholds(torch.rand(m, f, generator=g), torch.rand(s, generator=g))
    if model.prior is not None:
        # fit the prior a little on "normal" anatomies, then calibrate on its own scores
        size = tuple(model.backbone.img_size)
        x = torch.rand((4, 1) + size, generator=g)
        model.train()
        for _ in range(2):
            model(x, normal=torch.ones(4, m, dtype=torch.bool))
        model.eval()
        with torch.no_grad():
            scores = model(x)["anatomy_score"]
        ids = torch.arange(m).repeat(4)
        model.set_score_calibration(fit_score_calibration(scores.flatten(), ids, m, model.prior.score_quantiles.shape[1]))
    return model.eval()


def expected_pred(model, image):
    """The layout built by hand from the model's own (eager, image-only) outputs."""
    with torch.no_grad():
        out = model(image, regions="predicted")
    d, m = model.spatial_dims, model.num_anatomies
    c, half = out["boxes"][..., :d], out["boxes"][..., d:] / 2
    corners = torch.cat([c - half, c + half], -1).clamp(0, 1)
    probs = torch.sigmoid(out["zero_shot_logits"]).masked_fill(~model.prompt_valid, -1.0)
    rows = torch.cat([torch.sigmoid(out["presence_logits"])[..., None], corners, out["abnormality"][..., None], probs], -1)
    study = torch.full((image.shape[0], 1, rows.shape[-1]), -1.0)
    study[:, 0, 2 + 2 * d : 2 + 2 * d + model.num_study_findings] = torch.sigmoid(out["study_logits"])
    return torch.cat([rows, study], 1)


def test_describe_layout():
    for name, d in (("synthetic_ct", 3), ("cxr_imagenome29", 2)):
        cat = load_catalog(name)
        layout = describe_layout(cat)
        f, m = cat.max_findings, cat.num_anatomies
        assert layout["K"] == 2 + 2 * d + f == len(layout["columns"])
        assert layout["num_rows"] == m + 1
        assert layout["channel_def"][str(m)] == "study" and layout["channel_def"]["0"] == cat.names[0]
        assert layout["columns"][0] == "presence" and layout["columns"][1 + 2 * d] == "abnormality"
        assert layout["columns"][1 : 1 + 2 * d] == (["x0", "y0", "z0", "x1", "y1", "z1"] if d == 3 else ["x0", "y0", "x1", "y1"])
        assert layout["columns"][-1] == f"finding_{f}"
        assert layout["box_mode"] == ("xyzxyz" if d == 3 else "xyxy") and layout["box_normalized"]
        assert layout["findings"]["study"] == list(cat.study_findings)
        json.dumps(layout)  # plain types only
    with pytest.raises(ValueError):
        describe_layout("synthetic_ct", 4)


@pytest.mark.parametrize(
    "spatial_dims,kwargs",
    [(3, {}), (2, {}), (3, {"prior": None}), (2, {"prior_on": "tokens"}), (3, {"conv_stem": False, "soft_boxes": True}),
     (3, {"input_windows": [[0.425, 0.625]], "segmentation_decoder": "deep"}), (3, {"stats_threshold": 0.5, "stats_source_flag": True}),
     (3, {"study_stats": True, "input_windows": [[0.425, 0.625]]}), (2, {"study_stats": True, "catalog": "cxr_imagenome29"}),
     (3, {"stats_views": True, "study_stats": True, "input_windows": [[0.425, 0.625]], "focal_depth": 2}),
     (3, {"mask_refine": True, "segmentation_decoder": "deep", "input_windows": [[0.425, 0.625]]}),
     (3, {"stats_ensemble": [-0.5, 0.0, 0.5], "stats_views": True, "study_stats": True, "stats_source_flag": True,
          "input_windows": [[0.425, 0.625]]}),
     (2, {"structure_sigmas": [1.0, 2.0], "stats_ensemble": [-0.5, 0.5], "stats_contralateral": True})],
)
def test_pred_layout_matches_model_and_scripts(spatial_dims, kwargs):
    model = trained_like_model(spatial_dims, **kwargs)
    wrapper = DeployWrapper(model)
    size = tuple(model.backbone.img_size)
    image = torch.rand((2, 1) + size)
    pred = wrapper(image)
    m, d = model.num_anatomies, spatial_dims
    assert pred.shape == (2, m + 1, 2 + 2 * d + model.num_findings)
    torch.testing.assert_close(pred, expected_pred(model, image))
    body = pred[:, :m]
    assert ((body[..., : 2 + 2 * d] >= 0) & (body[..., : 2 + 2 * d] <= 1)).all()
    assert ((body[..., 1 + 2 * d] >= 0) & (body[..., 1 + 2 * d] <= 1)).all()  # abnormality
    assert torch.equal(pred[:, :m, 2 + 2 * d :] == -1, (~model.prompt_valid).expand(2, -1, -1))
    assert (pred[:, m, : 2 + 2 * d] == -1).all()

    scripted = script_deploy(wrapper)
    torch.testing.assert_close(scripted(image), pred, atol=1e-5, rtol=1e-5)
    other = tuple(s + p for s, p in zip(size, model.backbone.patch_size))  # another input size
    other_image = torch.rand((1, 1) + other)
    torch.testing.assert_close(scripted(other_image), wrapper(other_image), atol=1e-5, rtol=1e-5)
    layout = json.loads(scripted.layout_json)
    assert layout.pop("img_size") == list(model.backbone.img_size) and layout.pop("preprocessing") == {}
    assert layout == describe_layout(model.catalog)


def test_state_dict_keys_match_model_for_ckpt_export():
    model = trained_like_model(3)
    wrapper = DeployWrapper(model)
    assert list(wrapper.state_dict()) == list(model.state_dict())
    # ckpt_export: a fresh network_def = DeployWrapper(AnatomyVLPModel(...)) loads the model's checkpoint strictly
    fresh = DeployWrapper(AnatomyVLPModel(**{**model.config, "catalog": model.config["catalog"]}))
    fresh.load_state_dict(model.state_dict(), strict=True)
    image = torch.rand(1, 1, 32, 32, 24)
    torch.testing.assert_close(fresh(image), wrapper(image))
    assert torch.equal(fresh.thresholds, model.thresholds)
    wrapper.train()
    assert not wrapper.training and not model.backbone.training  # always eval
    with pytest.raises(TypeError):
        DeployWrapper(torch.nn.Linear(2, 2))


def test_exported_file_runs_with_torch_alone(tmp_path):
    model = trained_like_model(3)
    image = torch.rand(2, 1, 32, 32, 24)
    with torch.no_grad():
        eager = DeployWrapper(model)(image)
    path = export_torchscript(model, tmp_path / "model.ts", extra_files={"metadata.json": json.dumps({"version": "0.1.0"})})
    torch.save({"image": image, "eager": eager}, tmp_path / "io.pt")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert any(n.endswith("extra/layout.json") for n in names) and any(n.endswith("extra/metadata.json") for n in names)

    child = textwrap.dedent(
        """
        import json, sys
        import torch
        torch.set_num_threads(1)
        extra = {"layout.json": ""}
        model = torch.jit.load(sys.argv[1], _extra_files=extra)
        io = torch.load(sys.argv[2])
        pred = model(io["image"])
        layout = json.loads(model.layout_json)
        saved = json.loads(extra["layout.json"])
        bad = [m for m in ("anatomy_vlp_bundle", "transformers", "monai") if m in sys.modules]
        print(json.dumps({"max_diff": float((pred - io["eager"]).abs().max()), "shape": list(pred.shape),
                          "K": layout["K"], "rows": layout["num_rows"], "thresholds": saved["thresholds"],
                          "bad_modules": bad}))
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, "-c", child, str(path), str(tmp_path / "io.pt")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bad_modules"] == []
    assert result["max_diff"] <= 1e-4
    assert result["shape"] == [2, model.num_anatomies + 1, result["K"]] and result["rows"] == model.num_anatomies + 1
    torch.testing.assert_close(torch.tensor(result["thresholds"]), model.thresholds)
