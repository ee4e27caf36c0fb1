"""AnatomyViT backbone and heads: shapes, mask-guided attention, checkpointing, scripting, loading."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from anatomy_vlp_bundle.networks.anatomy_vit import (
    AnatomyViT,
    masks_to_token_mask,
    query_attention_mask,
    remap_anatomy_queries,
)
from anatomy_vlp_bundle.networks.box_ops import boxes_to_token_mask
from anatomy_vlp_bundle.networks.heads import BoxHead, Projection, RegionPooling, SegmentationHead, upsample_mask_logits

KEYS = ("cls", "queries", "patch_tokens", "grid", "stem_features", "stem_early", "stem_input")


def tiny_vit(spatial_dims=3, **kwargs):
    cfg = dict(
        img_size=(80, 64, 64) if spatial_dims == 3 else 224,
        patch_size=8 if spatial_dims == 3 else 16,
        hidden_size=24,
        num_layers=1,
        num_heads=2,
        mlp_dim=32,
        num_anatomies=5,
        stem_channels=(4, 8),
    )
    cfg.update(kwargs)
    torch.manual_seed(0)
    return AnatomyViT(spatial_dims, **cfg)


def weighted_sum(out, seed=1):
    """A loss that touches every output element with a random weight (a plain sum after
    LayerNorm would have zero gradient)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for key in ("cls", "queries", "patch_tokens", "stem_features"):
        total = total + (out[key] * torch.randn(out[key].shape, generator=g)).sum()
    return total


@pytest.mark.parametrize(
    "spatial_dims,size,conv_stem,pos_embed",
    [
        (3, (80, 64, 64), True, "learnable"),
        (3, (64, 64, 48), True, "learnable"),
        (3, (64, 64, 48), False, "sincos"),
        (3, (80, 64, 64), False, "learnable"),
        (2, (224, 224), True, "sincos"),
        (2, (256, 256), True, "learnable"),
        (2, (256, 224), False, "learnable"),
    ],
)
def test_output_shapes(spatial_dims, size, conv_stem, pos_embed):
    model = tiny_vit(spatial_dims, conv_stem=conv_stem, pos_embed=pos_embed).eval()
    patch = 8 if spatial_dims == 3 else 16
    grid = [s // patch for s in size]
    n = int(torch.tensor(grid).prod())
    with torch.no_grad():
        out = model(torch.rand(2, 1, *size))
    assert set(out) == set(KEYS)
    assert out["cls"].shape == (2, 24)
    assert out["queries"].shape == (2, 5, 24)
    assert out["patch_tokens"].shape == (2, n, 24)
    assert out["grid"].tolist() == grid and model.token_grid(list(size)) == grid
    stride = model.stem_stride
    channels = 8 if conv_stem else 24
    assert out["stem_features"].shape == (2, channels, *[s // st for s, st in zip(size, stride)])
    if conv_stem:
        assert stride == [4] * spatial_dims  # two stride-2 stages for patch 8 / 16
        early = [s // st for s, st in zip(size, model.early_stride)]
        assert model.early_stride == [2] * spatial_dims and out["stem_early"].shape == (2, model.early_channels, *early)
    else:
        assert torch.equal(out["stem_early"], out["stem_features"])
    assert all(torch.isfinite(out[k]).all() for k in ("cls", "queries", "patch_tokens"))


def test_position_embedding_interpolation_and_loading_from_another_size():
    small = tiny_vit(img_size=(64, 64, 48)).eval()
    big = tiny_vit(img_size=(80, 64, 64)).eval()
    assert small.position_embeddings.shape[2:] != big.position_embeddings.shape[2:]
    big.load_state_dict(small.state_dict())  # strict; the position embedding is interpolated on load
    x = torch.rand(1, 1, 80, 64, 64)
    with torch.no_grad():
        a, b = small(x), big(x)  # small interpolates on the fly to the same grid
    for key in ("cls", "queries", "patch_tokens"):
        torch.testing.assert_close(a[key], b[key])
    # the caller's state dict is left as it was
    sd = small.state_dict()
    shape = sd["position_embeddings"].shape
    big.load_state_dict(sd)
    assert sd["position_embeddings"].shape == shape


def test_sincos_position_embedding_is_not_in_state_dict():
    model = tiny_vit(pos_embed="sincos")
    assert "position_embeddings" not in model.state_dict()
    other = tiny_vit(pos_embed="sincos", img_size=(64, 64, 48))
    other.load_state_dict(model.state_dict())  # strict, any size


def test_remap_anatomy_queries_by_name():
    old_names = ["liver", "spleen", "kidney", "lung", "aorta"]
    new_names = ["aorta", "pancreas", "liver"]
    model = tiny_vit()
    sd = {"backbone." + k: v for k, v in model.state_dict().items()}
    remapped = remap_anatomy_queries(sd, old_names, new_names, generator=torch.Generator().manual_seed(0))
    q_old, q_new = sd["backbone.anatomy_queries"], remapped["backbone.anatomy_queries"]
    assert q_new.shape == (1, 3, 24)
    torch.testing.assert_close(q_new[:, 0], q_old[:, 4])
    torch.testing.assert_close(q_new[:, 2], q_old[:, 0])
    assert not any(torch.allclose(q_new[:, 1], q_old[:, i]) for i in range(5))
    assert 0 < float(q_new[:, 1].std()) < 0.05
    assert sd["backbone.anatomy_queries"] is q_old  # input untouched
    target = tiny_vit(num_anatomies=3)
    target.load_state_dict({k[len("backbone.") :]: v for k, v in remapped.items()})
    # a Catalog-like object with .names works too
    class Names:
        names = new_names

    assert remap_anatomy_queries(model.state_dict(), old_names, Names())["anatomy_queries"].shape[1] == 3
    with pytest.raises(ValueError, match="expected"):
        remap_anatomy_queries(model.state_dict(), old_names[:2], new_names)


def test_query_attention_mask_rows():
    region = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]], dtype=torch.bool)
    mask = query_attention_mask(region)[0, 0]  # (L, L), L = 1 + 3 + 4
    allowed = mask == 0
    assert mask.shape == (8, 8) and allowed[0].all() and allowed[4:].all()  # [CLS] and patches: everything
    # query 0: [CLS], itself, patches 0 and 1
    assert allowed[1].tolist() == [True, True, False, False, True, True, False, False]
    assert allowed[2].all()  # empty region -> unrestricted
    assert allowed[3].tolist() == [True, False, False, True, False, False, False, True]
    assert torch.isinf(mask[~allowed]).all()


@pytest.mark.parametrize("conv_stem", [False, True])
def test_mask_guided_attention_restricts_a_query(conv_stem):
    """One block, eval. Query 0 may see [CLS], itself and its region's tokens. In a single layer the
    [CLS] key/value is the learned [CLS] parameter (image independent), so nothing outside the
    region can reach query 0. With the conv stem, patch tokens see up to 3 voxels of the
    neighbouring patch, so the outside change is made far from the region."""
    model = tiny_vit(img_size=(32, 32, 32), conv_stem=conv_stem, num_anatomies=3).eval()
    grid = [4, 4, 4]
    region = torch.zeros(1, 3, 4, 4, 4, dtype=torch.bool)
    region[0, 0, :2, :2, :2] = True  # query 0: the first 8-voxel octant corner
    region[0, 2, 2:, 2:, :] = True
    region = region.reshape(1, 3, -1)  # query 1: empty region -> unrestricted
    torch.manual_seed(3)
    image = torch.rand(1, 1, 32, 32, 32)
    outside = image.clone()
    outside[..., 24:, 24:, 24:] += 1.0  # the far corner token (3, 3, 3), outside region 0
    inside = image.clone()
    inside[..., 2:6, 2:6, 2:6] += 1.0  # inside token (0, 0, 0) of region 0
    with torch.no_grad():
        base = model(image, region)
        out_changed = model(outside, region)
        in_changed = model(inside, region)
        unrestricted = model(outside)
        unrestricted_base = model(image)
    torch.testing.assert_close(out_changed["queries"][:, 0], base["queries"][:, 0], rtol=0, atol=1e-6)
    assert not torch.allclose(in_changed["queries"][:, 0], base["queries"][:, 0], atol=1e-4)
    # the unrestricted query and [CLS] do see the outside change ...
    assert not torch.allclose(out_changed["queries"][:, 1], base["queries"][:, 1], atol=1e-4)
    assert not torch.allclose(out_changed["cls"], base["cls"], atol=1e-4)
    # ... and so does query 0 without the mask
    assert not torch.allclose(unrestricted["queries"][:, 0], unrestricted_base["queries"][:, 0], atol=1e-4)
    assert grid == base["grid"].tolist()


def test_masks_to_token_mask_feeds_the_backbone():
    model = tiny_vit(img_size=(32, 32, 32), num_anatomies=2).eval()
    anatomy = torch.zeros(2, 2, 32, 32, 32, dtype=torch.uint8)
    anatomy[:, 0, 3:5, 3:5, 3:5] = 1  # one voxel block -> one token
    token_mask = masks_to_token_mask(anatomy, model.patch_size)
    assert token_mask.shape == (2, 2, 64) and token_mask[:, 0].sum(-1).tolist() == [1, 1]
    assert not token_mask[:, 1].any()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32, 32), token_mask)
    assert out["queries"].shape == (2, 2, 24)


def test_gradient_checkpointing_matches():
    model = tiny_vit(img_size=(32, 32, 32), num_layers=2, num_anatomies=3).train()
    x = torch.rand(2, 1, 32, 32, 32)
    region = torch.rand(2, 3, 64) > 0.6
    results = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        out = model(x, region)
        weighted_sum(out).backward()
        results.append(({k: out[k].detach() for k in ("cls", "queries", "patch_tokens")},
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_a, grad_a), (out_b, grad_b) = results
    for k in out_a:
        torch.testing.assert_close(out_a[k], out_b[k])
    for n in grad_a:
        torch.testing.assert_close(grad_a[n], grad_b[n], msg=n)


@pytest.mark.parametrize("conv_stem,pos_embed", [(True, "learnable"), (False, "sincos")])
def test_gradient_reaches_every_parameter(conv_stem, pos_embed):
    model = tiny_vit(img_size=(32, 32, 32), conv_stem=conv_stem, pos_embed=pos_embed, num_layers=2).train()
    out = model(torch.rand(2, 1, 32, 32, 32))
    weighted_sum(out).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_is_deterministic_with_dropout():
    model = tiny_vit(img_size=(32, 32, 32), dropout=0.3, num_layers=2)
    x = torch.rand(1, 1, 32, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a["queries"], b["queries"], rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.allclose(c["queries"], d["queries"])  # dropout is on in training


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_torchscript_script_and_trace(spatial_dims):
    model = tiny_vit(spatial_dims, img_size=(32,) * spatial_dims, patch_size=8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit
        scripted = torch.jit.script(model)
    sizes = [(32,) * spatial_dims, (48,) * spatial_dims]
    for size in sizes:
        x = torch.rand(1, 1, *size)
        n = int(torch.tensor([s // 8 for s in size]).prod())
        region = torch.rand(1, 5, n) > 0.5
        with torch.no_grad():
            ref, got = model(x, region), scripted(x, region)
        for k in KEYS:
            torch.testing.assert_close(got[k], ref[k])
    x = torch.rand(1, 1, *sizes[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), strict=False)
        torch.testing.assert_close(traced(x)["queries"], model(x)["queries"])
    with pytest.raises(Exception, match="multiple of the patch size"):
        scripted(torch.rand(1, 1, *(30,) * spatial_dims))


def test_bad_inputs_raise_clear_errors():
    model = tiny_vit(img_size=(32, 32, 32))
    with pytest.raises(ValueError, match="spatial dims"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.rand(1, 1, 32, 32, 30))
    with pytest.raises(ValueError, match="region_token_mask"):
        model(torch.rand(1, 1, 32, 32, 32), torch.ones(1, 5, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        AnatomyViT(3, img_size=32, patch_size=8, hidden_size=20, num_heads=3, num_anatomies=2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        AnatomyViT(3, img_size=30, patch_size=8, num_anatomies=2)
    with pytest.raises(ValueError, match="sincos"):
        AnatomyViT(3, img_size=32, patch_size=8, hidden_size=20, num_heads=2, num_anatomies=2, pos_embed="sincos")


# ---------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_box_head(spatial_dims):
    head = BoxHead(24, spatial_dims)
    out = head(torch.randn(2, 5, 24))
    assert out["boxes"].shape == (2, 5, 2 * spatial_dims) and out["presence_logits"].shape == (2, 5)
    assert (out["boxes"] > 0).all() and (out["boxes"] < 1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(head)
    q = torch.randn(1, 3, 24)
    torch.testing.assert_close(scripted(q)["boxes"], head(q)["boxes"])


def test_region_pooling_mask_mode_mean_and_max():
    pool = RegionPooling(4)
    queries = torch.randn(1, 2, 4)
    tokens = torch.zeros(1, 8, 4)
    tokens[0, 3] = torch.tensor([8.0, 0.0, -1.0, 0.0])  # one "focal" token
    region = torch.zeros(1, 2, 8, dtype=torch.bool)
    region[0, 0, :4] = True  # anatomy 0: tokens 0..3 (holds the focal token); anatomy 1: empty
    feats = pool(queries, tokens, [2, 4], region_token_mask=region)
    assert feats.shape == (1, 2, 12) and pool.out_dim == 12
    torch.testing.assert_close(feats[0, 0, :4], queries[0, 0])
    torch.testing.assert_close(feats[0, 0, 4:8], torch.tensor([2.0, 0.0, -0.25, 0.0]))  # mean dilutes
    torch.testing.assert_close(feats[0, 0, 8:], torch.tensor([8.0, 0.0, 0.0, 0.0]))  # max keeps the peak
    assert (feats[0, 1, 4:] == 0).all()  # empty region pools to zeros
    with pytest.raises(ValueError, match="region_token_mask"):
        pool(queries, tokens, [2, 4])
    with pytest.raises(ValueError, match="grid"):
        pool(queries, tokens, [3, 3], region_token_mask=region)


def test_region_pooling_box_mode_and_chunking():
    torch.manual_seed(0)
    queries, tokens = torch.randn(2, 5, 6), torch.randn(2, 4 * 4 * 2, 6)
    boxes = torch.rand(2, 5, 6) * 0.5 + 0.25
    grid = [4, 4, 2]
    full = RegionPooling(6)(queries, tokens, grid, boxes=boxes)
    via_mask = RegionPooling(6)(queries, tokens, grid, region_token_mask=boxes_to_token_mask(boxes, grid))
    torch.testing.assert_close(full, via_mask)
    chunked = RegionPooling(6, max_chunk_elements=1)(queries, tokens, grid, boxes=boxes)  # one anatomy at a time
    torch.testing.assert_close(full, chunked)
    soft = RegionPooling(6, soft_boxes=True, detach_boxes=False)
    boxes_g = boxes.clone().requires_grad_()
    soft(queries, tokens, grid, boxes=boxes_g).sum().backward()
    assert boxes_g.grad is not None and boxes_g.grad.abs().sum() > 0
    hard = RegionPooling(6)
    boxes_h = boxes.clone().requires_grad_()
    out = hard(queries, tokens.requires_grad_(), grid, boxes=boxes_h)
    out.sum().backward()
    assert boxes_h.grad is None  # boxes detached by default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(RegionPooling(6))
    torch.testing.assert_close(scripted(queries, tokens.detach(), grid, None, boxes), full)


def test_region_pooling_max_matches_a_masked_amax_in_values_and_gradients():
    # the max is found without autograd and gathered: same values and the same gradient as amax
    torch.manual_seed(3)
    b, m, n, d = 2, 4, 12, 5
    queries, tokens = torch.randn(b, m, d), torch.randn(b, n, d, requires_grad=True)
    region = torch.rand(b, m, n) > 0.5
    region[1, 2] = False  # an empty region
    out = RegionPooling(d, max_chunk_elements=2 * n * d)(queries, tokens, [3, 4], region_token_mask=region)
    masked = tokens.unsqueeze(1).masked_fill(~region.unsqueeze(-1), float("-inf")).amax(dim=2)
    expected = torch.where(region.any(-1, keepdim=True), masked, torch.zeros_like(masked))
    torch.testing.assert_close(out[..., 2 * d :], expected)
    weights = torch.randn(b, m, d)
    (grad,) = torch.autograd.grad((out[..., 2 * d :] * weights).sum(), tokens)
    (grad_ref,) = torch.autograd.grad((expected * weights).sum(), tokens)
    torch.testing.assert_close(grad, grad_ref)
    assert grad.abs().sum() > 0


def test_channel_layer_norm_matches_the_explicit_formula_and_keeps_channels_last():
    from anatomy_vlp_bundle.networks.anatomy_vit import _ChannelLayerNorm

    torch.manual_seed(4)
    norm = _ChannelLayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 6, 5, 4, 3) * 3 + 1).requires_grad_()
    mean = x.mean(dim=1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=1, keepdim=True)
    ref = (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    out = norm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, norm.weight], g)
    want = torch.autograd.grad(ref, [x, norm.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    cl = norm(x.detach().contiguous(memory_format=torch.channels_last_3d))
    assert cl.is_contiguous(memory_format=torch.channels_last_3d)  # no copy back to channels-first
    torch.testing.assert_close(cl, ref.detach(), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # statistics in float32, output in the input's dtype
        assert norm(x.detach().bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mask_head_fuse_split_by_part_equals_the_convolution_of_the_concatenation(spatial_dims):
    # the fuse convolution runs per part with slices of its weight: same outputs and gradients as one
    # convolution over the concatenated maps (the module's parameters are unchanged), also scripted
    torch.manual_seed(5)
    spatial = (16, 16, 8) if spatial_dims == 3 else (32, 32)
    grid = [s // 8 for s in spatial]
    head = SegmentationHead(spatial_dims, 8, 16, 5, [4] * spatial_dims, early_channels=6)
    image = torch.rand(2, 1, *spatial)
    stem = torch.randn(2, 8, *[s // 4 for s in spatial], requires_grad=True)
    tokens = torch.randn(2, math.prod(grid), 16, requires_grad=True)
    early = torch.randn(2, 6, *[s // 2 for s in spatial], requires_grad=True)
    out = head(image, stem, tokens, grid, early)
    mode = "trilinear" if spatial_dims == 3 else "bilinear"
    up = F.interpolate(head.reduce(tokens.transpose(1, 2).reshape([2, 16] + grid)), size=list(stem.shape[2:]), mode=mode, align_corners=False)
    coarse = head.coarse(torch.cat([stem, up], 1))
    fine = head.fine(image)
    coarse_up = F.interpolate(coarse, size=list(fine.shape[2:]), mode=mode, align_corners=False)
    ref = head.fuse(torch.cat([coarse_up, fine, early], 1))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    inputs = [stem, tokens, early, head.fuse[0].weight, head.fuse[0].bias]
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sorted(k for k in head.state_dict() if k.startswith("fuse.")) == ["fuse.0.bias", "fuse.0.weight", "fuse.2.bias", "fuse.2.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(head)
    torch.testing.assert_close(scripted(image, stem, tokens, grid, early), out)
    with pytest.raises(ValueError, match="early"):
        head(image, stem, tokens, grid, None)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deep_mask_head_adds_a_convolution_per_grid_and_scripts(spatial_dims):
    torch.manual_seed(6)
    spatial = (16, 16, 8) if spatial_dims == 3 else (32, 32)
    grid = [s // 8 for s in spatial]
    light = SegmentationHead(spatial_dims, 8, 16, 5, [4] * spatial_dims, in_channels=2, early_channels=6)
    deep = SegmentationHead(spatial_dims, 8, 16, 5, [4] * spatial_dims, in_channels=2, early_channels=6, decoder="deep")
    image = torch.rand(2, 2, *spatial)
    stem = torch.randn(2, 8, *[s // 4 for s in spatial])
    tokens = torch.randn(2, math.prod(grid), 16)
    early = torch.randn(2, 6, *[s // 2 for s in spatial])
    out = deep(image, stem, tokens, grid, early)
    assert out.shape == light(image, stem, tokens, grid, early).shape == (2, 5, *[s // 2 for s in spatial])
    assert len(deep.coarse) == 2 * len(light.coarse) and len(deep.fuse) == len(light.fuse) + 2
    assert deep.fuse[0].out_channels == 2 * light.fuse[0].out_channels
    # the forward runs every layer of the fuse stack after the split first convolution
    mode = "trilinear" if spatial_dims == 3 else "bilinear"
    up = F.interpolate(deep.reduce(tokens.transpose(1, 2).reshape([2, 16] + grid)), size=list(stem.shape[2:]), mode=mode, align_corners=False)
    coarse = deep.coarse(torch.cat([stem, up], 1))
    fine = deep.fine(image)
    coarse_up = F.interpolate(coarse, size=list(fine.shape[2:]), mode=mode, align_corners=False)
    torch.testing.assert_close(out, deep.fuse(torch.cat([coarse_up, fine, early], 1)), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(deep)
    torch.testing.assert_close(scripted(image, stem, tokens, grid, early), out)
    with pytest.raises(ValueError, match="decoder"):
        SegmentationHead(spatial_dims, 8, 16, 5, decoder="unet")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_refined_mask_head_outputs_the_input_grid_and_starts_as_upsampling(spatial_dims):
    torch.manual_seed(7)
    spatial = (16, 16, 8) if spatial_dims == 3 else (32, 32)
    grid = [s // 8 for s in spatial]
    deep = SegmentationHead(spatial_dims, 8, 16, 5, [4] * spatial_dims, in_channels=2, early_channels=6, decoder="deep")
    refined = SegmentationHead(spatial_dims, 8, 16, 5, [4] * spatial_dims, in_channels=2, early_channels=6, decoder="deep", refine=True)
    refined.load_state_dict(deep.state_dict(), strict=False)  # the same decoder weights
    assert deep.refine is None and refined.refine is not None
    image = torch.rand(2, 2, *spatial)
    stem = torch.randn(2, 8, *[s // 4 for s in spatial])
    tokens = torch.randn(2, math.prod(grid), 16)
    early = torch.randn(2, 6, *[s // 2 for s in spatial])
    coarse = deep(image, stem, tokens, grid, early)
    out = refined(image, stem, tokens, grid, early)
    assert out.shape == (2, 5, *spatial)
    # zero-initialised output layer: exactly the upsampled logits until it learns
    torch.testing.assert_close(out, upsample_mask_logits(coarse, list(spatial)))
    # it learns from the image: a gradient reaches the MLP's output layer, and with it set, the
    # correction depends on the voxel's intensity and its 5-voxel neighbourhood only
    out.sum().backward()
    assert refined.refine[2].weight.grad.abs().sum() > 0
    with torch.no_grad():
        refined.refine[2].weight.normal_()
        a = refined(image, stem, tokens, grid, early)
        centre = tuple(s // 2 for s in spatial)
        brighter = image.clone()
        brighter[(0, 0) + centre] += 0.5  # one voxel
        fa = refined.refine_logits(coarse, image)
        fb = refined.refine_logits(coarse, brighter)
    changed = (fa - fb).abs().amax(dim=1)[0] > 1e-6
    near = torch.zeros(spatial, dtype=torch.bool)
    near[tuple(slice(c - 2, c + 3) for c in centre)] = True
    assert changed[centre] and not changed[~near].any() and changed.sum() > 3**spatial_dims
    assert torch.equal(fa[1], fb[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(refined)
    torch.testing.assert_close(scripted(image, stem, tokens, grid, early), a)


def test_input_windows_are_appended_channels_of_the_stem_input():
    vit = tiny_vit(3, input_windows=[[0.425, 0.625], [0.0, 0.1]])
    assert vit.in_channels == 1 and vit.stem_in_channels == 3
    assert vit.stem[0][0].in_channels == 3
    image = torch.rand(2, 1, 80, 64, 64)
    out = vit(image)
    stem_input = out["stem_input"]
    assert stem_input.shape == (2, 3, 80, 64, 64)
    torch.testing.assert_close(stem_input[:, :1], image)
    torch.testing.assert_close(stem_input[:, 1:2], ((image - 0.425) / 0.2).clamp(0, 1))
    torch.testing.assert_close(stem_input[:, 2:3], (image / 0.1).clamp(0, 1))
    # a soft-tissue contrast of 20 HU (0.01 of a -1000..1000 window) is 0.05 in the soft-tissue channel
    x = torch.full((1, 1, 8, 8, 8), 0.53)
    assert float(vit.window(x + 0.01)[0, 1].mean() - vit.window(x)[0, 1].mean()) == pytest.approx(0.05, abs=1e-5)
    with pytest.raises(ValueError, match="channels"):
        vit(torch.rand(2, 3, 80, 64, 64))  # the windows are computed inside: the input keeps in_channels
    with pytest.raises(ValueError, match="window"):
        tiny_vit(3, input_windows=[[0.6, 0.4]])
    plain = tiny_vit(3)
    assert plain.window(image) is image and plain.stem_in_channels == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(vit)
    torch.testing.assert_close(scripted(image)["cls"], out["cls"], rtol=1e-4, atol=1e-5)


def test_hu_windows_to_input():
    from anatomy_vlp_bundle.data.pipeline import hu_windows_to_input

    assert hu_windows_to_input([[-150, 250]], (-1000, 1000)) == [[0.425, 0.625]]
    assert hu_windows_to_input([[-1000, 0], [0, 1000]], (-1000, 1000)) == [[0.0, 0.5], [0.5, 1.0]]
    assert hu_windows_to_input(None, (-1000, 1000)) is None and hu_windows_to_input([], (-1000, 1000)) is None
    with pytest.raises(ValueError, match="CT window"):
        hu_windows_to_input([[250, -150]], (-1000, 1000))
    with pytest.raises(ValueError, match="hu_window"):
        hu_windows_to_input([[-150, 250]], (1000, -1000))


def test_projection_is_unit_norm():
    for hidden in (None, 16):
        proj = Projection(12, 384, hidden_dim=hidden)
        x = torch.randn(2, 5, 12, requires_grad=True)
        y = proj(x)
        assert y.shape == (2, 5, 384) and y.dtype == torch.float32
        torch.testing.assert_close(y.norm(dim=-1), torch.ones(2, 5))
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad.abs().sum() > 0


def test_backbone_and_heads_under_bf16_autocast():
    model = tiny_vit(img_size=(32, 32, 32), num_anatomies=3)
    head, pool = BoxHead(24, 3), RegionPooling(24)
    proj = Projection(pool.out_dim, 16)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.rand(1, 3, 64) > 0.5)
        det = head(out["queries"])
        emb = proj(pool(out["queries"], out["patch_tokens"], out["grid"].tolist(), boxes=det["boxes"]))
    loss = weighted_sum(out) + det["boxes"].sum() + emb.sum()
    loss.backward()
    assert torch.isfinite(loss) and emb.dtype == torch.float32
    assert all(p.grad is not None for p in model.parameters())


def test_plain_patch_embedding_loads_its_earlier_state_dict_key():
    model = tiny_vit(conv_stem=False).eval()
    sd = model.state_dict()
    legacy = {("stem." + k[len("stem.0."):] if k.startswith("stem.0.") else k): v for k, v in sd.items()}
    assert "stem.weight" in legacy and "stem.0.weight" not in legacy
    other = tiny_vit(conv_stem=False).eval()
    other.load_state_dict(legacy)  # strict
    assert torch.equal(other.stem[0].weight, model.stem[0].weight)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hidden_states_on_request(spatial_dims):
    """``return_hidden`` adds every block's patch tokens (before the final norm) and changes nothing else;
    the scripted model returns the same."""
    model = tiny_vit(spatial_dims, img_size=(32,) * spatial_dims, patch_size=8, num_layers=3).eval()
    x = torch.rand(2, 1, *(32,) * spatial_dims)
    n = 4**spatial_dims
    with torch.no_grad():
        plain, hidden = model(x), model(x, None, True)
    assert set(plain) == set(KEYS) and set(hidden) == set(KEYS) | {"hidden_states"}
    for k in KEYS:
        torch.testing.assert_close(hidden[k], plain[k], rtol=0, atol=0)
    states = hidden["hidden_states"]
    assert states.shape == (3, 2, n, 24)
    torch.testing.assert_close(model.norm(states[-1]), plain["patch_tokens"])
    assert not torch.allclose(states[0], states[1])  # one entry per block, not copies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    with torch.no_grad():
        got = scripted(x, None, True)
    torch.testing.assert_close(got["hidden_states"], states)
    assert "hidden_states" not in scripted(x)
