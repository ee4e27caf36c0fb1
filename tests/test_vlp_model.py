"""AnatomyVLPModel assembly, detection loss, criterion and targets (tiny widths, seconds)."""

import pytest
import torch

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT, UNCERTAIN, UNKNOWN
from anatomy_vlp_bundle.losses import (
    anatomy_abnormal,
    anatomy_normal,
    build_criterion,
    detection_loss,
    make_targets,
)
from anatomy_vlp_bundle.networks import AnatomyVLPModel, masks_to_token_mask
from anatomy_vlp_bundle.networks.box_ops import boxes_to_normalized_cxcywh, boxes_to_token_mask
from anatomy_vlp_bundle.networks.normality_prior import fit_score_calibration
from anatomy_vlp_bundle.networks.region_stats import region_statistics, stats_input
from anatomy_vlp_bundle.text.prompts import PromptBank, build_prompt_texts

CT_CATALOG = {
    "name": "tiny_ct",
    "modality": "CT",
    "anatomies": [
        {"name": "liver", "labels": [1], "findings": ["lesion", "steatosis"]},
        {"name": "spleen", "labels": [2], "findings": ["splenomegaly"]},
        {"name": "aorta", "labels": [3], "findings": []},
    ],
    "study_findings": ["ascites"],
}
CXR_CATALOG = {
    "name": "tiny_cxr",
    "modality": "CXR",
    "anatomies": [
        {"name": "right lung", "findings": ["nodule", "effusion", "edema"]},
        {"name": "left lung", "findings": ["nodule"]},
        {"name": "cardiac silhouette", "findings": ["cardiomegaly"]},
        {"name": "trachea", "findings": []},
    ],
    "study_findings": [],
}
TINY_PRIOR = {"codes_per_anatomy": 4, "code_dim": 4, "hidden_dim": 8, "top_k": 2}
OUTPUT_SHAPES = (
    "cls_emb", "region_emb", "region_emb_view2", "boxes", "presence_logits", "zero_shot_logits", "study_logits",
    "anatomy_score", "abnormality", "patch_error", "prior_grid", "loss_commitment", "loss_reconstruction",
    "logit_scale", "disease_logit_scale", "logit_bias", "prompt_pos", "prompt_neg", "prompt_valid",
    "global_prompt_emb", "global_membership", "global_study_index",
)


def tiny_model(spatial_dims=3, seed=0, **kwargs):
    cfg = dict(
        catalog=CT_CATALOG if spatial_dims == 3 else CXR_CATALOG,
        img_size=(32, 32, 24) if spatial_dims == 3 else (64, 64),
        patch_size=8 if spatial_dims == 3 else 16,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        embed_dim=8,
        stem_channels=(4, 8),
        prior=TINY_PRIOR,
        proj_hidden_dim=16,
    )
    cfg.update(kwargs)
    torch.manual_seed(seed)
    return AnatomyVLPModel(**cfg)


def random_bank(model, seed=0):
    """A prompt bank of random unit vectors with the model's catalog layout (no text encoder)."""
    texts = build_prompt_texts(model.catalog)
    g = torch.Generator().manual_seed(seed)
    table = {}

    def encode(batch):
        for t in batch:
            if t not in table:
                table[t] = torch.randn(model.embed_dim, generator=g)
        return torch.stack([table[t] for t in batch])

    return PromptBank.from_texts(texts, encode)


def box_masks(b, m, size, seed=0):
    """Random box-shaped masks (B, M, *size) uint8 and their corner boxes (B, M, 2d)."""
    g = torch.Generator().manual_seed(seed)
    d = len(size)
    masks = torch.zeros((b, m) + tuple(size), dtype=torch.uint8)
    boxes = torch.zeros(b, m, 2 * d)
    for i in range(b):
        for j in range(m):
            lo = [int(torch.randint(0, s // 2, (1,), generator=g)) for s in size]
            hi = [l + int(torch.randint(2, s // 2, (1,), generator=g)) for l, s in zip(lo, size)]
            index = (i, j) + tuple(slice(l, h) for l, h in zip(lo, hi))
            masks[index] = 1
            boxes[i, j] = torch.tensor(lo + hi, dtype=torch.float32)
    return masks, boxes


def batch_for(model, b=2, size=None, seed=0):
    size = tuple(size or model.backbone.img_size)
    m, f = model.num_anatomies, model.num_findings
    g = torch.Generator().manual_seed(seed)
    masks, boxes = box_masks(b, m, size, seed)
    findings = torch.full((b, m, f), float(UNKNOWN))
    valid = model.prompt_valid
    labels = torch.randint(0, 2, (b, m, f), generator=g).float()
    findings = torch.where(valid[None], labels, findings)
    return {
        "image": torch.rand((b, 1) + size, generator=g),
        "anatomy": masks,
        "anatomy_presence": torch.ones(b, m),
        "anatomy_boxes": boxes,
        "findings": findings,
        "study_findings": torch.randint(0, 2, (b, model.num_study_findings), generator=g).float(),
    }


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    "spatial_dims,size",
    [(3, (32, 32, 24)), (3, (48, 40, 32)), (3, (16, 24, 40)), (2, (64, 64)), (2, (96, 80)), (2, (32, 48))],
)
@pytest.mark.parametrize("regions", ["auto", "mask", "predicted"])
def test_output_shapes(spatial_dims, size, regions):
    model = tiny_model(spatial_dims).eval()
    batch = batch_for(model, 2, size)
    m, f, e = model.num_anatomies, model.num_findings, model.embed_dim
    d = spatial_dims
    with torch.no_grad():
        out = model(batch["image"], batch["anatomy"], regions=regions)
    grid = [s // p for s, p in zip(size, model.backbone.patch_size)]
    prior_grid = [s // st for s, st in zip(size, model.backbone.stem_stride)]
    k = len(model.global_findings)
    expected = {
        "cls_emb": (2, e), "region_emb": (2, m, e), "region_emb_view2": (2, m, e), "boxes": (2, m, 2 * d),
        "presence_logits": (2, m), "zero_shot_logits": (2, m, f), "study_logits": (2, model.num_study_findings),
        "anatomy_score": (2, m), "abnormality": (2, m), "patch_error": (2, m, *prior_grid), "prior_grid": (d,),
        "loss_commitment": (), "loss_reconstruction": (), "region_weights": (2, m, int(torch.tensor(grid).prod())),
        "logit_scale": (), "disease_logit_scale": (), "logit_bias": (), "prompt_pos": (m, f, e),
        "prompt_neg": (m, f, e), "prompt_valid": (m, f), "global_prompt_emb": (k, e), "global_membership": (k, m, f),
        "global_study_index": (k,),
    }
    for key, shape in expected.items():
        assert tuple(out[key].shape) == shape, key
    assert out["prior_grid"].tolist() == prior_grid and out["token_grid"].tolist() == grid
    torch.testing.assert_close(out["region_emb"].norm(dim=-1), torch.ones(2, m))
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    assert ((out["abnormality"] >= 0) & (out["abnormality"] <= 1)).all()
    assert torch.equal(out["region_emb_view2"], out["region_emb"])  # eval: no second-view randomness


def test_regions_mask_predicted_auto():
    model = tiny_model(3).eval()
    batch = batch_for(model, 2)
    anatomy = batch["anatomy"].clone()
    anatomy[0, 1] = 0  # no mask for anatomy 1 of sample 0
    with torch.no_grad():
        out_mask = model(batch["image"], anatomy, regions="mask")
        out_pred = model(batch["image"], anatomy, regions="predicted")
        out_auto = model(batch["image"], anatomy, regions="auto")
        out_none = model(batch["image"])
    grid = out_mask["token_grid"].tolist()
    mask_tokens = masks_to_token_mask(anatomy, model.backbone.patch_size).float()
    box_tokens = boxes_to_token_mask(out_pred["boxes"], grid).float()
    torch.testing.assert_close(out_mask["region_weights"], mask_tokens)
    torch.testing.assert_close(out_pred["region_weights"], box_tokens)
    expected_auto = mask_tokens.clone()
    expected_auto[0, 1] = box_tokens[0, 1]
    torch.testing.assert_close(out_auto["region_weights"], expected_auto)
    # image only (no anatomy) is the predicted mode; the boxes do not depend on the regions
    torch.testing.assert_close(out_none["region_emb"], out_pred["region_emb"])
    torch.testing.assert_close(out_mask["boxes"], out_pred["boxes"])
    assert not torch.allclose(out_mask["region_emb"], out_pred["region_emb"])
    # an empty mask in mask mode: the prior sees no patch of that region
    assert out_mask["patch_error"][0, 1].abs().sum() == 0
    assert out_auto["patch_error"][0, 1].abs().sum() > 0


def test_mask_guided_attention_changes_queries_only_with_masks():
    model = tiny_model(2, mask_guided_attention=True).eval()
    batch = batch_for(model, 2)
    with torch.no_grad():
        with_mask = model(batch["image"], batch["anatomy"], regions="mask")
        pred = model(batch["image"], batch["anatomy"], regions="predicted")
        plain = tiny_model(2, mask_guided_attention=False).eval()(batch["image"], batch["anatomy"], regions="mask")
    assert not torch.allclose(with_mask["boxes"], pred["boxes"])  # restricted queries see other tokens
    torch.testing.assert_close(pred["boxes"], plain["boxes"])  # same seed, unrestricted = plain model


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_variants_build_and_run(spatial_dims):
    batch = None
    for kwargs in (
        {"prior": None},
        {"prior_on": "tokens"},
        {"conv_stem": False},
        {"pos_embed": "sincos", "hidden_size": 24},
        {"gradient_checkpointing": True, "soft_boxes": True},
    ):
        model = tiny_model(spatial_dims, **kwargs).train()
        batch = batch_for(model, 2)
        out = model(batch["image"], batch["anatomy"], torch.ones(2, model.num_anatomies, dtype=torch.bool))
        loss = out["region_emb"].sum() + out["boxes"].sum() + out["loss_reconstruction"]
        loss.backward()
        assert out["region_emb"].shape == (2, model.num_anatomies, model.embed_dim), kwargs
        if kwargs.get("prior", TINY_PRIOR) is None:
            assert model.prior is None
            assert not any(name.startswith("prior.") for name in model.state_dict())
            assert model.region_proj.prior_dim == 0
            assert float(out["loss_commitment"]) == 0 and float(out["loss_reconstruction"]) == 0
            probs = torch.sigmoid(out["zero_shot_logits"]).masked_fill(~model.prompt_valid, 0)
            torch.testing.assert_close(out["abnormality"], probs.amax(-1))
        if kwargs.get("prior_on") == "tokens":
            assert out["prior_grid"].tolist() == out["token_grid"].tolist()
            assert model.prior.feature_dim == model.backbone.hidden_size


def test_gradient_checkpointing_of_stem_and_mask_head_changes_no_value_or_gradient():
    results = []
    for enabled in (False, True):
        model = tiny_model(3, segmentation=True, gradient_checkpointing=enabled).train()
        model.set_prompt_bank(random_bank(model))
        batch = batch_for(model, 2)
        torch.manual_seed(7)  # the same dropout and view masks in both runs
        out = model(batch["image"], batch["anatomy"], torch.ones(2, model.num_anatomies, dtype=torch.bool))
        (out["mask_logits"].square().mean() + out["region_emb"].sum() + out["boxes"].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and n.startswith(("seg_head.", "backbone.stem."))}
        results.append((out["mask_logits"].detach(), grads))
    (logits_a, grads_a), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b)
    assert any(n.startswith("seg_head.") for n in grads_a) and any(n.startswith("backbone.stem.") for n in grads_a)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], msg=n)


def test_input_windows_and_deep_decoder_rebuild_from_the_recorded_config():
    # the checkpoint's model_config rebuilds the same model (the predictor's path), and a config saved
    # before these options existed still builds the model it was trained as (no windows, light head)
    model = tiny_model(3, segmentation=True, input_windows=[[0.425, 0.625]], segmentation_decoder="deep").eval()
    assert model.config["input_windows"] == [[0.425, 0.625]] and model.config["segmentation_decoder"] == "deep"
    assert model.backbone.stem_in_channels == 2 and model.seg_head.fine[0].in_channels == 2
    assert "backbone.window_bounds" not in model.state_dict()
    rebuilt = AnatomyVLPModel(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.set_prompt_bank(random_bank(model))
    rebuilt.set_prompt_bank(random_bank(rebuilt))
    batch = batch_for(model, 2)
    with torch.no_grad():
        a, b = model(batch["image"], None, None, "predicted"), rebuilt(batch["image"], None, None, "predicted")
    torch.testing.assert_close(a["mask_logits"], b["mask_logits"])
    torch.testing.assert_close(a["zero_shot_logits"], b["zero_shot_logits"])
    # the window reaches the mask head: other window bounds, other masks from the same weights
    other = tiny_model(3, segmentation=True, input_windows=[[0.0, 0.2]], segmentation_decoder="deep").eval()
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert not torch.allclose(other(batch["image"], None, None, "predicted")["mask_logits"], a["mask_logits"])
    old = {k: v for k, v in tiny_model(3, segmentation=True).config.items() if k not in ("input_windows", "segmentation_decoder")}
    legacy = AnatomyVLPModel(**old)
    assert legacy.backbone.stem_in_channels == 1 and legacy.seg_head.decoder == "light"
    legacy.load_state_dict(tiny_model(3, segmentation=True).state_dict(), strict=True)


def test_stats_threshold_moves_only_the_image_only_statistics():
    # the statistics path takes the predicted masks' voxels above the threshold; the mask logits
    # themselves, and everything computed from given masks, do not change
    model = tiny_model(3, segmentation=True).eval()
    model.set_prompt_bank(random_bank(model))
    batch = batch_for(model, 2)
    with torch.no_grad():
        base = model(batch["image"], None, None, "predicted")
    threshold = float(base["mask_logits"].median())  # half of the predicted voxels leave the regions
    shifted = tiny_model(3, segmentation=True, stats_threshold=threshold).eval()
    shifted.load_state_dict(model.state_dict(), strict=True)
    shifted.set_prompt_bank(random_bank(shifted))
    assert shifted.config["stats_threshold"] == threshold
    assert AnatomyVLPModel(**shifted.config).stats_threshold == threshold
    with torch.no_grad():
        out = shifted(batch["image"], None, None, "predicted")
        torch.testing.assert_close(out["mask_logits"], base["mask_logits"])
        assert not torch.allclose(out["zero_shot_logits"], base["zero_shot_logits"])
        with_masks = shifted(batch["image"], batch["anatomy"], None, "mask")
        torch.testing.assert_close(with_masks["zero_shot_logits"], model(batch["image"], batch["anatomy"], None, "mask")["zero_shot_logits"])
    with pytest.raises(ValueError, match="stats_threshold"):
        tiny_model(3, stats_threshold=float("nan"))


def test_stats_ensemble_averages_the_cuts_image_only():
    # eval, image only: the statistics at each cut of the predicted masks, the fused embeddings averaged;
    # one cut equals the plain path at that threshold; training and given masks are unaffected
    model = tiny_model(3, segmentation=True).eval()
    model.set_prompt_bank(random_bank(model))
    batch = batch_for(model, 2)
    with torch.no_grad():
        logits = model(batch["image"], None, None, "predicted")["mask_logits"]
    lo, hi = float(logits.quantile(0.3)), float(logits.quantile(0.7))

    def variant(**kw):
        v = tiny_model(3, segmentation=True, **kw).eval()
        v.load_state_dict(model.state_dict(), strict=True)
        v.set_prompt_bank(random_bank(model))
        return v

    one = variant(stats_ensemble=[hi])
    plain_hi = variant(stats_threshold=hi)
    both = variant(stats_ensemble=[lo, hi])
    plain_lo = variant(stats_threshold=lo)
    assert both.config["stats_ensemble"] == [lo, hi] and AnatomyVLPModel(**both.config).stats_ensemble == [lo, hi]
    with torch.no_grad():
        e_one = one(batch["image"], None, None, "predicted")["region_emb"]
        torch.testing.assert_close(e_one, plain_hi(batch["image"], None, None, "predicted")["region_emb"])
        e_hi = plain_hi(batch["image"], None, None, "predicted")["region_emb"]
        e_lo = plain_lo(batch["image"], None, None, "predicted")["region_emb"]
        e_both = both(batch["image"], None, None, "predicted")["region_emb"]
        torch.testing.assert_close(e_both, torch.nn.functional.normalize(e_lo + e_hi, dim=-1))
        assert not torch.allclose(e_both, e_hi) and not torch.allclose(e_both, e_lo)
        # given masks: the same as without the ensemble
        torch.testing.assert_close(
            both(batch["image"], batch["anatomy"], None, "mask")["zero_shot_logits"],
            model(batch["image"], batch["anatomy"], None, "mask")["zero_shot_logits"],
        )
    both.train()  # training: the one cut at stats_threshold (0), as the plain model
    model.train()
    torch.manual_seed(1)
    a = both(batch["image"], None, None, "predicted")["region_emb"]
    torch.manual_seed(1)
    b = model(batch["image"], None, None, "predicted")["region_emb"]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="stats_ensemble"):
        tiny_model(3, stats_ensemble=[0.0, float("inf")])


def test_structure_sigmas_add_statistics_views_in_2d_only():
    # the structure views widen the statistics path by 3 maps per scale; with given masks the model's
    # statistics are region_statistics over stats_input's views; 3D and non-positive scales refused
    plain = tiny_model(2)
    model = tiny_model(2, structure_sigmas=[1.0, 2.0]).eval()
    width = plain.region_proj.stats_dim
    assert model.region_proj.stats_dim == width * (1 + 3 * 2)
    assert model.config["structure_sigmas"] == [1.0, 2.0] and AnatomyVLPModel(**model.config).structure_sigmas == [1.0, 2.0]
    model.set_prompt_bank(random_bank(model))
    batch = batch_for(model, 2)
    with torch.no_grad():
        out = model(batch["image"], batch["anatomy"], None, "mask")
        x, per_view = stats_input(batch["image"], batch["image"], False, [1.0, 2.0])
        raw, valid = region_statistics(x, batch["anatomy"], out["boxes"], "mask", model.region_stats_bins, None,
                                       model.focal_scales, per_view, model.focal_depth)
        assert torch.isfinite(model(batch["image"], None, None, "predicted")["zero_shot_logits"]).all()
    assert raw.shape[-1] == model.region_proj.stats_dim and bool(valid.any())
    with pytest.raises(ValueError, match="2D only"):
        tiny_model(3, structure_sigmas=[1.0])
    with pytest.raises(ValueError, match="structure_sigmas"):
        tiny_model(2, structure_sigmas=[0.0])


def test_contralateral_statistics_are_each_regions_minus_its_counterparts():
    from anatomy_vlp_bundle.data.catalog import mirror_index

    names = ["right lung", "left lung", "right upper lung zone", "trachea", "left upper lung zone"]
    assert mirror_index(names) == [1, 0, 4, 3, 2]
    model = tiny_model(2, stats_contralateral=True).eval()
    plain = tiny_model(2)
    fusion = model.region_proj
    assert fusion.contralateral and fusion.stats_path[0].in_features == 2 * plain.region_proj.stats_path[0].in_features
    names = list(model.catalog.names)
    mirror = fusion.mirror.tolist()
    assert names[mirror[names.index("right lung")]] == "left lung" and names[mirror[names.index("trachea")]] == "trachea"
    torch.manual_seed(0)
    raw = torch.randn(2, model.num_anatomies, fusion.stats_dim)
    valid = torch.ones(2, model.num_anatomies, dtype=torch.bool)
    out = fusion.standardize(raw, valid)
    own = fusion.stats(raw, valid)
    torch.testing.assert_close(out[..., : fusion.stats_dim], own)
    torch.testing.assert_close(out[..., fusion.stats_dim :], own - own[:, mirror])
    assert bool((out[:, names.index("trachea"), fusion.stats_dim :] == 0).all())  # no counterpart: zeros
    assert AnatomyVLPModel(**model.config).region_proj.contralateral
    assert not plain.region_proj.contralateral


def test_stats_source_flag_marks_predicted_regions():
    # the flag column is 1 where the statistics come from predicted masks, 0 from given masks
    model = tiny_model(3, segmentation=True, stats_source_flag=True).eval()
    plain = tiny_model(3, segmentation=True).eval()
    width = plain.region_proj.stats_dim
    assert model.region_proj.stats_dim == width + 1 and model.config["stats_source_flag"] is True
    model.set_prompt_bank(random_bank(model))
    seen = []
    model.region_proj.stats.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    batch = batch_for(model, 2)
    anatomy = batch["anatomy"].clone()
    anatomy[1, 0] = 0  # sample 1 lacks the first anatomy's mask: "auto" takes its predicted region
    with torch.no_grad():
        model(batch["image"], None, None, "predicted")
        model(batch["image"], anatomy, None, "mask")
        model(batch["image"], anatomy, None, "auto")
    predicted, given, auto = (x[..., -1] for x in seen)
    assert seen[0].shape[-1] == width + 1
    assert (predicted == 1).all() and (given[anatomy.flatten(2).sum(-1) > 0] == 0).all()
    expected = (anatomy.flatten(2).sum(-1) == 0).float()
    torch.testing.assert_close(auto, expected)
    assert auto[1, 0] == 1 and auto[0, 0] == 0


def test_stats_views_give_each_window_its_own_statistics():
    # the region statistics of the image and of each input window, the same function the tests of
    # region_stats check, fed with the stem's views
    windows = [[0.425, 0.625]]
    model = tiny_model(3, segmentation=True, stats_views=True, input_windows=windows).eval()
    plain = tiny_model(3, segmentation=True, input_windows=windows).eval()
    width = plain.region_proj.stats_dim
    assert model.region_proj.stats_dim == 2 * width and model.config["stats_views"] is True
    assert AnatomyVLPModel(**model.config).stats_views is True
    assert tiny_model(3, stats_views=True, region_stats=0).stats_views is False
    model.set_prompt_bank(random_bank(model))
    seen = []
    model.region_proj.stats.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    batch = batch_for(model, 2)
    with torch.no_grad():
        model(batch["image"], batch["anatomy"], None, "mask")
    views = model.backbone.window_views(model.backbone.window(batch["image"]))
    boxes = torch.zeros(2, model.num_anatomies, 6)
    expected, _ = region_statistics(views, batch["anatomy"], boxes, "mask", model.region_stats_bins, None, model.focal_scales, True)
    torch.testing.assert_close(seen[0], expected)
    # focal_depth reaches the statistics the same way
    deeper = tiny_model(3, segmentation=True, stats_views=True, input_windows=windows, focal_depth=2).eval()
    deeper.load_state_dict(model.state_dict(), strict=True)
    deeper.set_prompt_bank(random_bank(deeper))
    assert deeper.config["focal_depth"] == 2 and AnatomyVLPModel(**deeper.config).focal_depth == 2
    seen.clear()
    deeper.region_proj.stats.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        deeper(batch["image"], batch["anatomy"], None, "mask")
    expected2, _ = region_statistics(views, batch["anatomy"], boxes, "mask", model.region_stats_bins, None, model.focal_scales, True, 2)
    torch.testing.assert_close(seen[0], expected2)
    with pytest.raises(ValueError, match="focal_depth"):
        tiny_model(3, focal_depth=0)


def test_study_stats_path_feeds_the_study_embedding_from_the_background():
    # given masks in training (no predicted-mask samples): both samples have a background
    model = tiny_model(3, segmentation=True, study_stats=True, input_windows=[[0.425, 0.625]], stats_from_prediction=0.0).train()
    assert model.study_stats is not None and model.study_stats.dim == 2 * (model.region_stats_bins + 3)
    views = model.backbone.window_views(model.backbone.window(torch.full((1, 1, 8, 8, 8), 0.5)))
    torch.testing.assert_close(views, torch.cat([torch.full((1, 1, 8, 8, 8), 0.5), torch.full((1, 1, 8, 8, 8), 0.375)], 1))
    assert model.config["study_stats"] is True and tiny_model(3, study_stats=True, region_stats=0).study_stats is None
    assert tiny_model(2, study_stats=True).study_stats is None  # a catalog without study findings
    model.set_prompt_bank(random_bank(model))
    batch = batch_for(model, 2)
    out = model(batch["image"], batch["anatomy"], torch.ones(2, model.num_anatomies, dtype=torch.bool))
    out["study_logits"].sum().backward()
    assert model.study_stats.mlp[0].weight.grad is not None and model.study_stats.mlp[0].weight.grad.abs().sum() > 0
    assert model.study_stats.standardize.count.item() > 0  # running moments updated in training
    model.eval()
    # only the background moves the study path: changing voxels outside every given mask changes the
    # study logits in mask mode, changing voxels inside one does not reach it through this path
    image = batch["image"].clone()
    outside = batch["anatomy"].amax(1, keepdim=True) == 0
    moved = torch.where(outside, (image + 0.3).clamp(0, 1), image)
    with torch.no_grad():
        a = model(image, batch["anatomy"], None, "mask")
        b = model(moved, batch["anatomy"], None, "mask")
        stats_a = model.study_stats(*_background(model, image, batch["anatomy"]))
        stats_b = model.study_stats(*_background(model, moved, batch["anatomy"]))
    assert not torch.allclose(stats_a, stats_b)
    assert not torch.allclose(a["study_logits"], b["study_logits"])
    rebuilt = AnatomyVLPModel(**model.config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def _background(model, image, anatomy):
    from anatomy_vlp_bundle.networks.region_stats import background_statistics, background_weights

    boxes = torch.zeros(image.shape[0], model.num_anatomies, 6)
    w = background_weights(anatomy, boxes, list(image.shape[2:]))
    return background_statistics(model.backbone.window_views(model.backbone.window(image)), w, model.region_stats_bins)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model(3).eval()
    batch = batch_for(model, 1)
    with pytest.raises(ValueError, match="regions must be one of"):
        model(batch["image"], regions="boxes")
    with pytest.raises(ValueError, match="regions='mask' needs"):
        model(batch["image"], regions="mask")
    with pytest.raises(ValueError, match="anatomy must be"):
        model(batch["image"], batch["anatomy"][:, :2])
    with pytest.raises(TypeError, match="normal must be a bool"):
        model(batch["image"], normal=torch.ones(1, 3))
    with pytest.raises(ValueError, match="spatial_dims=2 but catalog"):
        AnatomyVLPModel(CT_CATALOG, spatial_dims=2, img_size=32, patch_size=8, hidden_size=16, num_heads=2)
    with pytest.raises(ValueError, match="prior_on"):
        tiny_model(3, prior_on="queries")


def test_view2_is_a_cheap_random_second_view():
    # dropout off: the two views then differ only by view 2's random token subset
    model = tiny_model(3, feature_dropout=0.0, path_dropout=0.0, head_dropout=0.0).train()
    batch = batch_for(model, 2)
    out = model(batch["image"], batch["anatomy"])
    a, b = out["region_emb"], out["region_emb_view2"]
    assert not torch.allclose(a, b)
    cos = (a * b).sum(-1)
    assert (cos > 0.5).all()  # a perturbation of the same region, not another embedding


# ------------------------------------------------------------------------------------------ buffers
def test_prompt_bank_thresholds_calibration_travel_in_the_state_dict():
    model = tiny_model(3)
    bank = random_bank(model)
    model.set_prompt_bank(bank)
    model.set_thresholds(torch.full((3, 2), 0.3), torch.tensor([0.7]))
    scores = torch.rand(30)
    ids = torch.arange(30) % 3
    model.set_score_calibration(fit_score_calibration(scores, ids, 3, model.prior.score_quantiles.shape[1]))
    keys = set(model.state_dict())
    for key in ("prompt_pos", "prompt_neg", "prompt_valid", "study_pos", "study_neg", "global_emb",
                "global_membership", "global_study_index", "thresholds", "study_thresholds",
                "prior.score_quantiles", "prior.score_calibrated"):
        assert key in keys, key
    torch.testing.assert_close(model.prompt_pos, bank.pos)

    other = tiny_model(3, seed=5)
    other.load_state_dict(model.state_dict(), strict=True)
    model.eval(), other.eval()
    batch = batch_for(model, 2)
    with torch.no_grad():
        ref, got = model(batch["image"]), other(batch["image"])
    for key in ("zero_shot_logits", "study_logits", "abnormality", "boxes", "region_emb"):
        torch.testing.assert_close(got[key], ref[key])
    assert (ref["zero_shot_logits"][:, 2] == 0).all()  # the aorta has no findings: padding
    assert torch.equal(other.thresholds, torch.full((3, 2), 0.3))


def test_prompt_adapter_starts_as_identity_and_learns_from_the_prompt_pair_loss():
    from anatomy_vlp_bundle.losses.alignment import prompt_pair_loss, zero_shot_logits

    model = tiny_model(3).train()
    model.set_prompt_bank(random_bank(model))
    batch = batch_for(model, 2)
    out = model(batch["image"], batch["anatomy"])
    # identity at start: the zero-shot scores are those of the raw prompt ensembles
    raw = zero_shot_logits(out["region_emb"], model.prompt_pos, model.prompt_neg, out["logit_scale"])
    torch.testing.assert_close(out["zero_shot_logits"], raw)
    labels = torch.randint(0, 2, out["zero_shot_logits"].shape)
    loss = prompt_pair_loss(out["region_emb"], out["prompt_pos"], out["prompt_neg"], labels, out["logit_scale"],
                            finding_valid=out["prompt_valid"])
    loss.backward()
    grad = model.prompt_adapter.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    plain = tiny_model(3, prompt_adapter=False)
    assert plain.prompt_adapter is None and not any("prompt_adapter" in k for k in plain.state_dict())


def test_set_prompt_bank_rejects_other_catalog():
    model = tiny_model(3)
    other = tiny_model(2)
    with pytest.raises(ValueError, match="set_prompt_bank"):
        model.set_prompt_bank(random_bank(other))
    with pytest.raises(ValueError, match="embed_dim"):
        model.set_prompt_bank(random_bank(tiny_model(3, embed_dim=12)))


# ------------------------------------------------------------------------------------------ gradients
def _grads(model):
    """Trainable parameter name -> it received a non-zero gradient. The codebook is not trainable
    (EMA updates only, ``requires_grad=False``), so DDP and the optimiser never wait for it."""
    assert model.prior is None or model.prior.quantizer.embedding.weight.grad is None
    return {
        n: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for n, p in model.named_parameters() if p.requires_grad
    }


def _term_grads(model, batch, term, weights_extra=None):
    model.zero_grad(set_to_none=True)
    normal = anatomy_normal(batch["findings"], batch["anatomy_presence"], model.prompt_valid)
    out = model(batch["image"], batch["anatomy"], normal)
    g = torch.Generator().manual_seed(3)
    sentence = torch.nn.functional.normalize(torch.randn(out["region_emb"].shape, generator=g), dim=-1)
    targets = make_targets(batch, out, sentence_emb=sentence)
    weights = {k: 0.0 for k in ("detection", "normality", "global", "fine_grained", "prompt_pair", "disease")}
    weights[term] = 1.0
    weights.update(weights_extra or {})
    logs = build_criterion(weights)(out, targets)
    logs["loss"].backward()
    return _grads(model)


def _mixed_batch(model):
    batch = batch_for(model, 4, seed=1)
    batch["findings"][:2] = torch.where(model.prompt_valid[None], 0.0, float(UNKNOWN))  # samples 0-1 normal
    batch["findings"][2:, :, 0] = torch.where(model.prompt_valid[None, :, 0], 1.0, float(UNKNOWN))  # 2-3 abnormal
    return batch


def test_gradient_routing_per_loss_term():
    model = tiny_model(3).train()
    model.set_prompt_bank(random_bank(model))
    batch = _mixed_batch(model)

    def group(grads, prefix):
        return [v for n, v in grads.items() if n.startswith(prefix)]

    det = _term_grads(model, batch, "detection")
    assert all(group(det, "box_head.")), "the box head learns from the detection loss"
    assert any(group(det, "backbone."))
    assert not any(group(det, "prior.")) and not any(group(det, "region_proj.")) and not any(group(det, "cls_proj."))

    norm = _term_grads(model, batch, "normality")
    prior_mlps = [v for n, v in norm.items() if n.startswith(("prior.encoder.", "prior.decoder."))]
    assert prior_mlps and all(prior_mlps), "the prior's encoder/decoder learn from the normality term"
    assert not any(group(norm, "backbone.")), "the prior's input features are detached"
    assert not any(group(norm, "box_head.")) and not any(group(norm, "region_proj."))

    for term in ("prompt_pair", "fine_grained", "disease", "global"):
        grads = _term_grads(model, batch, term)
        assert not any(group(grads, "prior.")), f"{term} must not reach the prior"
        assert not any(group(grads, "box_head.")), f"{term} must not move the boxes (regions use detached boxes)"
        assert any(group(grads, "backbone.")), term
        if term == "global":
            assert all(group(grads, "cls_proj.")) and grads["logit_bias"] and grads["logit_scale.log_scale"]
            assert not any(group(grads, "region_proj."))
        else:
            assert all(group(grads, "region_proj.")), term
            assert not any(group(grads, "cls_proj.")), term
        scale = "disease_logit_scale.log_scale" if term == "disease" else "logit_scale.log_scale"
        assert grads[scale], term


def test_all_terms_train_every_parameter_and_ddp_anchor():
    model = tiny_model(2).train()
    model.set_prompt_bank(random_bank(model))
    batch = _mixed_batch(model)
    grads = _term_grads(model, batch, "detection", {k: 1.0 for k in ("normality", "global", "fine_grained", "prompt_pair", "disease")})
    missing = [n for n, v in grads.items() if not v]
    assert not missing, f"parameters without gradient with every term on: {missing}"

    # detection only + connect_all_outputs: every parameter gets a gradient tensor (zero or not)
    model.zero_grad(set_to_none=True)
    out = model(batch["image"], batch["anatomy"], anatomy_normal(batch["findings"], batch["anatomy_presence"], model.prompt_valid))
    crit = build_criterion({k: 0.0 for k in ("normality", "global", "fine_grained", "prompt_pair")}, connect_all_outputs=True)
    crit(out, make_targets(batch, out))["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_text_encoder_is_not_part_of_the_model():
    # (``import monai`` itself imports transformers through monai.networks.nets, so sys.modules says
    # nothing here; the deploy test checks that the exported model runs without it)
    model = AnatomyVLPModel("synthetic_cxr", img_size=64, patch_size=16, hidden_size=16, num_layers=1,
                            num_heads=2, embed_dim=8, stem_channels=(4, 8))
    modules = {type(x).__module__ for x in model.modules()}
    assert not any(name.startswith("transformers") for name in modules), modules
    assert not any("text" in name.split(".")[0] for name, _ in model.named_children())
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # a MiniLM alone has 22M parameters


def test_codebook_moves_only_for_normal_anatomies():
    model = tiny_model(3).train()
    batch = batch_for(model, 2)
    q = model.prior.quantizer

    def snapshot():
        return q.embedding.weight.detach().clone().view(3, -1), q.ema_w.detach().clone().view(3, -1)

    before = snapshot()
    model(batch["image"], batch["anatomy"], torch.zeros(2, 3, dtype=torch.bool))  # nobody normal
    after = snapshot()
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "abnormal anatomies moved the codebook"
    normal = torch.zeros(2, 3, dtype=torch.bool)
    normal[:, 1] = True
    for _ in range(2):  # the first call places the partition on data, the second is an EMA step
        model(batch["image"], batch["anatomy"], normal)
    moved = snapshot()
    assert not torch.equal(moved[0][1], before[0][1])
    assert torch.equal(moved[0][0], before[0][0]) and torch.equal(moved[0][2], before[0][2])
    # a stage that keeps the prior fixed: no update, zero normality losses, scores still computed
    model.set_prior_fitting(False)
    frozen = snapshot()
    out = model(batch["image"], batch["anatomy"], normal)
    assert all(torch.equal(x, y) for x, y in zip(frozen, snapshot()))
    assert out["loss_reconstruction"].detach().item() == 0.0 and (out["anatomy_score"] > 0).any()
    model.set_prior_fitting(True)
    # eval mode never moves it
    model.eval()
    model(batch["image"], batch["anatomy"], normal)
    assert all(torch.equal(x, y) for x, y in zip(frozen, snapshot()))


# ------------------------------------------------------------------------------------------ detection loss
def test_detection_loss_perfect_boxes_is_zero():
    target = torch.tensor([[[2.0, 4.0, 12.0, 20.0], [0.0, 0.0, 32.0, 16.0]]])
    pred = boxes_to_normalized_cxcywh(target, (32, 32)).requires_grad_(True)
    out = detection_loss(pred, torch.zeros(1, 2), target, torch.ones(1, 2), (32, 32))
    assert out["l1"].detach().item() == 0.0
    assert abs(out["giou"].detach().item()) < 1e-6


def test_detection_loss_hand_values_2d_and_3d():
    # target (0, 0) - (10, 10) on a 20 x 20 grid -> normalised (0.25, 0.25, 0.5, 0.5)
    pred = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])
    target = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    out = detection_loss(pred, torch.zeros(1, 1), target, torch.ones(1, 1), (20, 20))
    assert out["l1"].item() == pytest.approx(0.5)
    # pred corners (.25, .25, .75, .75): inter .0625, union .4375, hull .5625
    giou = 0.0625 / 0.4375 - (0.5625 - 0.4375) / 0.5625
    assert out["giou"].item() == pytest.approx(1.0 - giou, abs=1e-5)
    assert out["presence"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)

    # 3D: pred is the target shifted by half its size along x: IoU 1/3, hull = union -> GIoU 1/3
    target3 = torch.tensor([[[0.0, 0.0, 0.0, 8.0, 8.0, 8.0]]])
    pred3 = boxes_to_normalized_cxcywh(target3 + torch.tensor([4.0, 0, 0, 4.0, 0, 0]), (16, 16, 16))
    out3 = detection_loss(pred3, torch.full((1, 1), 2.0), target3, torch.ones(1, 1), (16, 16, 16))
    assert out3["l1"].item() == pytest.approx(4 / 16)
    assert out3["giou"].item() == pytest.approx(1 - 1 / 3, abs=1e-5)
    assert out3["presence"].item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(-2.0)).item(), abs=1e-6)


def test_detection_loss_ignores_absent_and_unknown():
    target = torch.tensor([[[2.0, 2.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    presence = torch.tensor([[PRESENT, ABSENT, UNKNOWN]], dtype=torch.float32)
    logits = torch.tensor([[3.0, -1.0, 5.0]])
    base = torch.tensor([[[0.3, 0.3, 0.25, 0.25], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    ref = detection_loss(base, logits, target, presence, (32, 32))
    changed = base.clone()
    changed[0, 1:] = torch.tensor([0.9, 0.1, 0.05, 0.9])
    other_logits = logits.clone()
    other_logits[0, 2] = -7.0  # unknown presence: no BCE
    got = detection_loss(changed, other_logits, target, presence, (32, 32))
    for key in ("l1", "giou", "presence"):
        torch.testing.assert_close(got[key], ref[key])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, :2], torch.tensor([1.0, 0.0]))
    assert ref["presence"].item() == pytest.approx(bce.item(), abs=1e-6)


def test_detection_loss_nothing_qualifies_is_connected_zero():
    pred = torch.rand(2, 3, 6).clamp(0.1, 0.9).requires_grad_(True)
    logits = torch.randn(2, 3, requires_grad=True)
    out = detection_loss(pred, logits, torch.zeros(2, 3, 6), torch.full((2, 3), float(UNKNOWN)), (8, 8, 8))
    total = sum(out.values())
    assert float(total.detach()) == 0.0
    total.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) == 0.0
    assert logits.grad is not None
    with pytest.raises(ValueError, match="target_boxes"):
        detection_loss(pred, logits, torch.zeros(2, 3, 4), torch.ones(2, 3), (8, 8))


# ------------------------------------------------------------------------------------------ criterion / targets
def test_normal_abnormal_from_labels():
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    findings = torch.tensor(
        [
            [[ABSENT, ABSENT], [ABSENT, UNKNOWN], [UNKNOWN, UNKNOWN]],  # normal, normal, no findings
            [[ABSENT, UNKNOWN], [PRESENT, UNKNOWN], [UNKNOWN, UNKNOWN]],  # unknown, abnormal, -
            [[ABSENT, UNCERTAIN], [ABSENT, UNKNOWN], [UNKNOWN, UNKNOWN]],  # uncertain, out of view
        ],
        dtype=torch.float32,
    )
    presence = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, ABSENT, UNKNOWN]])
    normal = anatomy_normal(findings, presence, valid)
    abnormal = anatomy_abnormal(findings, presence, valid)
    assert normal.tolist() == [[True, True, False], [False, False, False], [False, False, False]]
    assert abnormal.tolist() == [[False, False, False], [False, True, False], [False, False, False]]
    assert anatomy_normal(findings, presence, valid, uncertain_as=0)[2, 0]
    assert anatomy_abnormal(findings, presence, valid, uncertain_as=1)[2, 0]


def test_make_targets_and_criterion_keys():
    model = tiny_model(3).train()
    model.set_prompt_bank(random_bank(model))
    batch = _mixed_batch(model)
    batch["anatomy_presence"][3, 1] = ABSENT
    out = model(batch["image"], batch["anatomy"])
    sentence = torch.nn.functional.normalize(torch.randn(out["region_emb"].shape), dim=-1)
    targets = make_targets(batch, out, sentence_emb=sentence, sentence_keys=[["a", "b", "c"]] * 4)
    assert targets["spatial_shape"] == [32, 32, 24]
    assert targets["global_labels"].shape == (4, len(model.global_findings))
    assert not targets["sentence_valid"][3, 1]  # out of view: no sentence target
    assert targets["anatomy_normal"][:2, :2].all() and not targets["anatomy_normal"][:, 2].any()
    logs = build_criterion({"disease": 1.0})(out, targets)
    for key in ("detection", "detection.l1", "detection.giou", "detection.presence", "detection.mask", "normality.commitment",
                "normality.reconstruction", "global", "fine_grained", "fine_grained.floor", "prompt_pair", "disease"):
        assert key in logs, key
        assert torch.isfinite(logs[key]), key
    w = build_criterion({}).weights
    expected = 5 * logs["detection.l1"] + 2 * logs["detection.giou"] + logs["detection.presence"] + logs["detection.mask"]
    torch.testing.assert_close(logs["detection"], expected)
    assert targets["anatomy_masks"].shape == batch["anatomy"].shape
    assert w["detection.l1"] == 5.0

    # no sentence embeddings: the fine-grained term is skipped (a connected zero)
    no_text = make_targets(batch, out)
    assert "sentence_emb" not in no_text
    logs = build_criterion({})(out, no_text)
    assert float(logs["fine_grained"]) == 0.0
    with pytest.raises(ValueError, match="finding_valid"):
        make_targets(batch, None)
    with pytest.raises(KeyError, match="anatomy_boxes"):
        make_targets({k: v for k, v in batch.items() if k != "anatomy_boxes"}, out)


def test_image_patches_are_the_input_blocks_in_2d_and_3d():
    from anatomy_vlp_bundle.networks.vlp_model import image_patches

    x3 = torch.arange(2 * 8 * 8 * 4, dtype=torch.float32).reshape(2, 1, 8, 8, 4)
    p3 = image_patches(x3, [4, 4, 2])
    assert p3.shape == (2, 32, 2, 2, 2)
    assert torch.equal(p3[1, :, 0, 1, 1], x3[1, 0, 0:4, 4:8, 2:4].reshape(-1))
    x2 = torch.arange(8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8)
    assert torch.equal(image_patches(x2, [4, 4])[0, :, 1, 0], x2[0, 0, 4:8, 0:4].reshape(-1))
    assert torch.equal(torch.jit.script(image_patches)(x3, [4, 4, 2]), p3)


def test_prior_on_raw_image_patches_runs_and_scripts():
    from anatomy_vlp_bundle.networks.deploy import DeployWrapper

    catalog = load_catalog("synthetic_ct")
    model = AnatomyVLPModel(catalog, img_size=[32, 32, 32], patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                            prior_on="image").eval()
    assert model.prior.feature_dim == 4 * 4 * 4  # one raw 4x4x4 block per stem cell
    image = torch.rand(1, 1, 32, 32, 32)
    out = model(image)
    assert out["patch_error"].shape == (1, catalog.num_anatomies, 8, 8, 8)
    wrapper = DeployWrapper(model)
    assert torch.allclose(torch.jit.script(wrapper)(image), wrapper(image), atol=1e-5)


def test_interior_prior_cells_leave_out_cells_on_the_region_border():
    catalog = load_catalog("synthetic_ct")
    kw = dict(img_size=[32, 32, 32], patch_size=8, hidden_size=32, num_layers=1, num_heads=2, prior_on="image")
    anatomy = torch.zeros(1, catalog.num_anatomies, 32, 32, 32, dtype=torch.uint8)
    anatomy[:, 0, 2:22, 4:20, 4:20] = 1  # x: cells 1..4 inside, cells 0 and 5 straddle the border
    image = torch.rand(1, 1, 32, 32, 32)
    counts = {}
    for cells in ("any", "interior"):
        model = AnatomyVLPModel(catalog, prior_cells=cells, **kw).eval()
        out = model(image, anatomy=anatomy, regions="mask")
        counts[cells] = int((out["patch_error"][0, 0] > 0).sum())
    assert counts["any"] == 6 * 4 * 4
    assert counts["interior"] == 4 * 4 * 4
