"""Region statistics (networks/region_stats.py): values, empty regions, box fallback, running standardisation."""

import math

import pytest
import torch

from anatomy_vlp_bundle.networks.region_stats import (
    RunningStandardize,
    background_dim,
    background_statistics,
    background_weights,
    focal_statistics,
    gaussian_smooth,
    region_statistics,
    stats_dim,
    stats_input,
    structure_views,
)


def _scene():
    # one 3D sample, two anatomies: a 4x4x4 block of value 0.5 with two voxels at 0.95, and an empty mask
    image = torch.zeros(1, 1, 8, 8, 8)
    image[0, 0, :4, :4, :4] = 0.5
    image[0, 0, 0, 0, :2] = 0.95
    anatomy = torch.zeros(1, 2, 8, 8, 8)
    anatomy[0, 0, :4, :4, :4] = 1
    # box of anatomy 1 covers the other corner (normalised centre-size, array-axis order)
    boxes = torch.tensor([[[0.25, 0.25, 0.25, 0.5, 0.5, 0.5], [0.75, 0.75, 0.75, 0.5, 0.5, 0.5]]])
    return image, anatomy, boxes


def test_statistics_of_a_known_region():
    image, anatomy, boxes = _scene()
    stats, valid = region_statistics(image, anatomy, boxes, "mask", bins=10)
    assert stats.shape == (1, 2, stats_dim(10)) and valid.tolist() == [[True, False]]
    s = stats[0, 0]
    assert s[0].item() == pytest.approx(math.log(64 / 512), abs=1e-5)  # log volume fraction
    expected_mean = (62 * 0.5 + 2 * 0.95) / 64
    assert s[1].item() == pytest.approx(expected_mean, abs=1e-5)
    expected_sd = math.sqrt((62 * 0.5**2 + 2 * 0.95**2) / 64 - expected_mean**2)
    assert s[2].item() == pytest.approx(expected_sd, abs=1e-4)
    hist = torch.exp(s[3:]) - 1e-4
    assert hist.sum().item() == pytest.approx(1.0, abs=1e-3)
    assert hist[5].item() == pytest.approx(62 / 64, abs=1e-4) and hist[9].item() == pytest.approx(2 / 64, abs=1e-4)
    # the empty mask: zeros, not NaN
    assert torch.equal(stats[0, 1], torch.zeros(stats_dim(10)))


def test_auto_falls_back_to_the_box_and_predicted_ignores_masks():
    image, anatomy, boxes = _scene()
    auto, valid = region_statistics(image, anatomy, boxes, "auto", bins=10)
    assert valid.tolist() == [[True, True]]
    # anatomy 1 has no mask: its box (the empty corner, value 0) is used
    assert auto[0, 1, 1].item() == pytest.approx(0.0) and auto[0, 1, 0].item() == pytest.approx(math.log(64 / 512), abs=1e-5)
    predicted, _ = region_statistics(image, anatomy, boxes, "predicted", bins=10)
    # anatomy 0's box is exactly its mask here
    assert torch.allclose(predicted[0, 0], auto[0, 0], atol=1e-5)


def test_statistics_see_a_diffuse_density_change_and_a_few_bright_voxels():
    image, anatomy, boxes = _scene()
    darker = image.clone()
    darker[0, 0, :4, :4, :4] -= 0.05
    a, _ = region_statistics(image, anatomy, boxes, "mask", bins=32)
    b, _ = region_statistics(darker, anatomy, boxes, "mask", bins=32)
    assert b[0, 0, 1] < a[0, 0, 1] - 0.04  # the mean moved
    plain = image.clone()
    plain[0, 0, 0, 0, :2] = 0.5
    c, _ = region_statistics(plain, anatomy, boxes, "mask", bins=32)
    # two bright voxels among 64 lift the top bin's log frequency by several units
    assert a[0, 0, 3 + 30] - c[0, 0, 3 + 30] > 4.0


def test_running_standardize_learns_moments_in_training_only():
    torch.manual_seed(0)
    rs = RunningStandardize(num_anatomies=2, dim=3, momentum=0.05)
    valid = torch.ones(16, 2, dtype=torch.bool)
    valid[:, 1] = False  # anatomy 1 never seen: its moments stay at the initial values
    for _ in range(200):
        x = torch.randn(16, 2, 3) * 0.01 + 5.0
        out = rs(x, valid)
    assert torch.allclose(rs.running_mean[0], torch.full((3,), 5.0), atol=2e-3)
    assert rs.count.tolist() == [200.0, 0.0]
    assert torch.equal(out[:, 1], torch.zeros(16, 3))
    rs.eval()
    before = rs.running_mean.clone()
    z = rs(torch.randn(256, 2, 3) * 0.01 + 5.0, torch.ones(256, 2, dtype=torch.bool))
    assert torch.equal(rs.running_mean, before)  # eval does not update
    # tiny inter-case differences come out at unit scale
    assert 0.7 < z[:, 0].std().item() < 1.3 and abs(z[:, 0].mean().item()) < 0.2


def test_running_standardize_rejects_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        RunningStandardize(2, 3, momentum=0.0)


def test_model_without_region_stats_has_no_extra_inputs():
    from anatomy_vlp_bundle.networks.vlp_model import AnatomyVLPModel

    tiny = dict(img_size=(32, 32), patch_size=8, hidden_size=32, num_layers=1, num_heads=2, embed_dim=16,
                stem_channels=(8, 16), prior={"codes_per_anatomy": 4, "code_dim": 8, "hidden_dim": 16, "top_k": 2})
    on = AnatomyVLPModel("synthetic_cxr", **tiny)
    off = AnatomyVLPModel("synthetic_cxr", region_stats=0, **tiny)
    assert on.region_proj.stats is not None and off.region_proj.stats is None
    assert on.region_proj.stats_path[0].in_features == stats_dim(32, 2) and off.region_proj.stats_path is None
    assert off.region_proj.path_dropout == 0.0  # the token path is never dropped when it is the only one
    assert on.region_proj.token_path[1].in_features == off.region_proj.token_path[1].in_features
    with pytest.raises(ValueError, match="focal_scales"):
        AnatomyVLPModel("synthetic_cxr", focal_scales=(-1.0,), **tiny)
    with pytest.raises(ValueError, match="region_stats"):
        AnatomyVLPModel("synthetic_cxr", region_stats=-1, **tiny)
    with pytest.raises(ValueError, match="stats_from_prediction"):
        AnatomyVLPModel("synthetic_cxr", stats_from_prediction=1.5, **tiny)


def test_mask_loss_prefers_the_right_mask_and_skips_present_anatomies_without_mask():
    from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT
    from anatomy_vlp_bundle.losses.detection import mask_loss

    masks = torch.zeros(1, 3, 8, 8, 8)
    masks[0, 0, :4] = 1  # anatomy 0: the lower half; anatomy 1 absent; anatomy 2 present but no mask given
    presence = torch.tensor([[PRESENT, ABSENT, PRESENT]])
    good = torch.full((1, 3, 4, 4, 4), -8.0)
    good[0, 0, :2] = 8.0
    bad = -good
    assert mask_loss(good, masks, presence) < 0.05 < mask_loss(bad, masks, presence)
    # anatomy 2's logits do not matter (no mask given), anatomy 1's do (known absent: empty target)
    other = good.clone()
    other[0, 2] = 8.0
    assert torch.allclose(mask_loss(other, masks, presence), mask_loss(good, masks, presence))
    other[0, 1] = 8.0
    assert mask_loss(other, masks, presence) > mask_loss(good, masks, presence) + 0.5


def test_predicted_masks_define_image_only_statistics():
    image, anatomy, boxes = _scene()
    # predicted mask logits on a 4x4x4 grid: anatomy 0 = the first 2x2x2 cells (= its true mask)
    logits = torch.full((1, 2, 4, 4, 4), -5.0)
    logits[0, 0, :2, :2, :2] = 5.0
    from_masks, _ = region_statistics(image, anatomy, boxes, "mask", bins=10)
    predicted, valid = region_statistics(image, None, boxes * torch.tensor([1, 1, 1, 2, 2, 2.0]), "predicted", bins=10, mask_logits=logits)
    # the (wrong, doubled) box is not used: the upsampled mask is the true one up to trilinear corner voxels
    assert abs(predicted[0, 0, 0] - from_masks[0, 0, 0]) < 0.05 and abs(predicted[0, 0, 1] - from_masks[0, 0, 1]) < 0.01
    doubled, _ = region_statistics(image, None, boxes * torch.tensor([1, 1, 1, 2, 2, 2.0]), "predicted", bins=10)
    assert doubled[0, 0, 0] - from_masks[0, 0, 0] > 1.0  # what the box alone would give
    assert valid.tolist() == [[True, True]]  # anatomy 1: empty predicted mask -> its box


def test_gaussian_smooth_matches_a_replicate_padded_convolution_and_keeps_constants():
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.rand(2, 9, 7, 6)
    sigma = 1.5
    radius = math.ceil(2 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    ref = x[:, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        ref = F.conv3d(F.pad(ref, pad, mode="replicate"), k.view(shape))
    torch.testing.assert_close(gaussian_smooth(x, sigma), ref[:, 0], atol=1e-6, rtol=1e-5)
    assert torch.allclose(gaussian_smooth(torch.full((1, 5, 5), 0.3), 2.0), torch.full((1, 5, 5), 0.3))
    assert torch.equal(gaussian_smooth(x, 0.0), x)


def test_focal_statistics_find_a_small_lesion_that_the_histogram_barely_sees():
    torch.manual_seed(0)
    image = 0.5 + 0.01 * torch.randn(1, 1, 24, 24, 24)
    anatomy = torch.zeros(1, 2, 24, 24, 24)
    anatomy[0, 0, 2:22, 2:22, 2:22] = 1  # a large organ
    anatomy[0, 1, :2] = 1  # a thin slab: no interior voxel
    boxes = torch.zeros(1, 2, 6)
    lesion = image.clone()
    lesion[0, 0, 10:13, 10:13, 10:13] -= 0.03  # 27 voxels at -3 sd in 8000
    plain, valid = region_statistics(image, anatomy, boxes, "mask", bins=16, focal_scales=[0.0, 1.0])
    hit, _ = region_statistics(lesion, anatomy, boxes, "mask", bins=16, focal_scales=[0.0, 1.0])
    assert plain.shape == (1, 2, stats_dim(16, 2)) and valid.tolist() == [[True, True]]
    # the mean moves by 1e-4 of the intensity; the smoothed minimum by several sd
    assert abs(hit[0, 0, 1] - plain[0, 0, 1]) < 2e-4
    zmin_plain, zmin_hit = plain[0, 0, stats_dim(16) + 3], hit[0, 0, stats_dim(16) + 3]  # scale 1: (zmax, zmin)
    assert zmin_hit < zmin_plain - 2.0
    # a region without interior voxels gets zeros, not NaN or +-1e4
    assert torch.equal(hit[0, 1, stats_dim(16):], torch.zeros(4))
    # the same through the batched function and under TorchScript
    label = torch.full((1, 24, 24, 24), 2, dtype=torch.long)
    label[anatomy[:, 0] > 0] = 0
    label[anatomy[:, 1] > 0] = 1
    direct = focal_statistics(lesion[:, 0], label, 2, [0.0, 1.0])
    torch.testing.assert_close(direct, hit[..., stats_dim(16):])
    scripted = torch.jit.script(region_statistics)
    s, _ = scripted(lesion, anatomy, boxes, "mask", 16, None, [0.0, 1.0])
    torch.testing.assert_close(s, hit)


def test_region_fusion_drops_only_the_token_path_and_eval_is_deterministic():
    from anatomy_vlp_bundle.networks.vlp_model import RegionFusion

    torch.manual_seed(0)
    fusion = RegionFusion(8, 3, 16, 32, dropout=0.0, stats_dim=5, num_anatomies=2, feature_dropout=0.0, path_dropout=0.5)
    region, prior, stats = torch.randn(64, 2, 8), torch.randn(64, 2, 3), torch.randn(64, 2, 5)
    fusion.train()
    out = fusion(region, prior, stats)
    stats_only = torch.nn.functional.normalize(fusion.stats_path(stats), dim=-1)
    dropped = torch.isclose(out, stats_only, atol=1e-6).all(-1).all(-1)  # (B,): the whole sample's token path
    assert 10 < int(dropped.sum()) < 54
    fusion.eval()
    a, b = fusion(region, prior, stats), fusion(region, prior, stats)
    assert torch.equal(a, b) and not torch.isclose(a, stats_only, atol=1e-4).all()
    with pytest.raises(ValueError, match="path_dropout"):
        RegionFusion(8, 3, 16, 32, stats_dim=5, path_dropout=1.0)


def test_focal_statistics_stay_float32_under_bf16_autocast():
    # bf16 resolves about 0.002 at 0.5 — the size of the CT noise the z-scores are measured against
    torch.manual_seed(0)
    image = 0.5 + 0.005 * torch.randn(2, 1, 16, 16, 16)
    anatomy = torch.zeros(2, 1, 16, 16, 16)
    anatomy[:, 0, 2:14, 2:14, 2:14] = 1
    boxes = torch.zeros(2, 1, 6)
    ref, _ = region_statistics(image, anatomy, boxes, "mask", bins=8, focal_scales=[0.0, 2.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = region_statistics(image, anatomy, boxes, "mask", bins=8, focal_scales=[0.0, 2.0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_background_is_what_no_region_holds_and_its_window_sees_fluid_in_fat():
    image, anatomy, boxes = _scene()
    fat, fluid = 0.45, 0.505  # -100 HU and +10 HU on the -1000..1000 input range
    image[0, 0, 4:, :, :] = fat
    with_fluid = image.clone()
    with_fluid[0, 0, 6:, :2, :] = fluid  # a rim of fluid replacing fat outside every anatomy
    # given masks: the complement of their union (anatomy 1's empty mask adds nothing)
    weights = background_weights(anatomy, boxes, [8, 8, 8])
    assert weights.shape == (1, 512) and weights.sum().item() == 512 - 64
    assert torch.equal(weights.view(8, 8, 8)[:4, :4, :4], torch.zeros(4, 4, 4))
    # no masks: the predicted masks' union (logits > 0, upsampled), or the boxes without a mask head
    logits = torch.full((1, 2, 4, 4, 4), -5.0)
    logits[0, 1, 2:, 2:, 2:] = 5.0  # anatomy 1 predicted in the far corner
    predicted = background_weights(None, boxes, [8, 8, 8], logits).view(8, 8, 8)
    assert predicted[7, 7, 7] == 0 and predicted[0, 0, 0] == 1
    from_boxes = background_weights(None, boxes, [8, 8, 8]).view(8, 8, 8)
    assert from_boxes[0, 0, 0] == 0 and from_boxes[7, 7, 7] == 0 and from_boxes[0, 7, 0] == 1
    def views(x):  # the image and its -150..250 HU window, as the backbone's stem sees them
        return torch.cat([x, ((x - 0.425) / 0.2).clamp(0, 1)], dim=1)

    base, valid = background_statistics(views(image), weights, 32)
    moved, _ = background_statistics(views(with_fluid), weights, 32)
    assert base.shape == moved.shape == (1, background_dim(32, 2)) and valid.tolist() == [True]
    # the full-range row is a region row over the background; the window row the same over the windowed image
    region = weights.view(1, 1, 8, 8, 8)
    one_box = torch.zeros(1, 1, 6)
    torch.testing.assert_close(base[0, :35], region_statistics(image, region, one_box, "mask", 32)[0][0, 0])
    windowed = ((image - 0.425) / 0.2).clamp(0, 1)
    torch.testing.assert_close(base[0, 35:], region_statistics(windowed, region, one_box, "mask", 32)[0][0, 0])
    empty, empty_valid = background_statistics(views(image), torch.zeros_like(weights), 32)
    assert empty_valid.tolist() == [False] and torch.equal(empty, torch.zeros_like(empty))
    win = slice(35 + 3, 35 + 35)
    fluid_bin = int((fluid - 0.425) / 0.2 * 32)
    assert moved[0, win][fluid_bin] > base[0, win][fluid_bin] + 1.0  # log histogram
    assert moved[0, 35 + 1] > base[0, 35 + 1]  # the windowed mean rises
    # the regions' own statistics do not see it
    assert torch.allclose(region_statistics(image, anatomy, boxes, "mask", 32)[0], region_statistics(with_fluid, anatomy, boxes, "mask", 32)[0])


def test_per_view_statistics_are_each_views_own_rows_and_the_window_sees_a_cyst():
    # per_view: one histogram row and one set of focal features per intensity view, in that order;
    # a water-density cyst (+10 HU) in enhancing parenchyma (+150 HU) next to fat (-100 HU)
    image, anatomy, boxes = _scene()
    parenchyma, cyst = 0.575, 0.505  # +150 HU and +10 HU on the -1000..1000 input range
    image[0, 0, :4, :4, :4] = parenchyma
    image[0, 0, 3, :, :] = 0.45  # a fat rim inside the region
    with_cyst = image.clone()
    with_cyst[0, 0, 1:3, 1:3, 1:3] = cyst

    def views(x):
        return torch.cat([x, ((x - 0.425) / 0.2).clamp(0, 1)], dim=1)

    scales = [0.0]
    one = region_statistics(image, anatomy, boxes, "mask", 32, None, scales)[0]
    both, valid = region_statistics(views(image), anatomy, boxes, "mask", 32, None, scales, per_view=True)
    assert both.shape == (1, 2, stats_dim(32, 1, 2)) and valid.tolist() == [[True, False]]
    row = 32 + 3
    windowed = views(image)[:, 1:]
    win_only = region_statistics(windowed, anatomy, boxes, "mask", 32, None, scales)[0]
    torch.testing.assert_close(both[..., :row], one[..., :row])  # the image's row first
    torch.testing.assert_close(both[..., row : 2 * row], win_only[..., :row])  # then the window's
    torch.testing.assert_close(both[..., 2 * row : 2 * row + 2], one[..., row:])  # focal: image, then window
    torch.testing.assert_close(both[..., 2 * row + 2 :], win_only[..., row:])
    # without per_view the channels are averaged, as before
    torch.testing.assert_close(region_statistics(views(image), anatomy, boxes, "mask", 32)[0], region_statistics(views(image).mean(1, keepdim=True), anatomy, boxes, "mask", 32)[0])
    # the cyst (+10 HU) shares the full range's 62 HU bin with the soft tissue at the region's edge
    # (+50 HU): a small rise there; in the window it fills an empty 12 HU bin of its own
    edged = image.clone()
    edged[0, 0, :4, :4, 0] = 0.525
    with_cyst = edged.clone()
    with_cyst[0, 0, 1:3, 1:3, 1:3] = cyst
    before = region_statistics(views(edged), anatomy, boxes, "mask", 32, None, scales, per_view=True)[0]
    moved = region_statistics(views(with_cyst), anatomy, boxes, "mask", 32, None, scales, per_view=True)[0]
    full_bin, win_bin = int(cyst * 32), int((cyst - 0.425) / 0.2 * 32)
    assert full_bin == int(0.525 * 32) and win_bin != int((0.525 - 0.425) / 0.2 * 32)
    assert moved[0, 0, 3 + full_bin] - before[0, 0, 3 + full_bin] < 1.0
    assert moved[0, 0, row + 3 + win_bin] > before[0, 0, row + 3 + win_bin] + 3.0


def test_deeper_focal_interior_leaves_out_the_border_layer_where_a_mask_error_lands():
    # a predicted mask one voxel too wide puts dark neighbouring tissue in the region's second
    # layer: depth 1 reads it as the region's darkest focus, depth 2 does not
    torch.manual_seed(1)
    image = 0.6 + 0.002 * torch.randn(1, 1, 20, 20, 20)
    organ = torch.zeros(1, 1, 20, 20, 20)
    organ[0, 0, 4:16, 4:16, 4:16] = 1
    too_wide = torch.zeros_like(organ)
    too_wide[0, 0, 2:18, 2:18, 2:18] = 1
    image[0, 0, 3, 8:12, 8:12] = 0.4  # dark tissue just outside the organ, inside the wide mask
    boxes = torch.zeros(1, 1, 6)
    label = torch.where(too_wide[:, 0] > 0, 0, 1).long()
    from anatomy_vlp_bundle.networks.region_stats import _interior

    one, two = _interior(label, 1), _interior(label, 2)
    assert one[0, 3, 10, 10] and not two[0, 3, 10, 10] and two[0, 4, 10, 10]
    assert two.sum() < one.sum() and (two & ~one).sum() == 0
    d1, _ = region_statistics(image, too_wide, boxes, "mask", 8, None, [0.0], focal_depth=1)
    d2, _ = region_statistics(image, too_wide, boxes, "mask", 8, None, [0.0], focal_depth=2)
    zmin1, zmin2 = d1[0, 0, -1], d2[0, 0, -1]
    assert zmin1 < -10.0 and zmin2 > -6.0  # the dark layer dominates depth 1 only
    torch.testing.assert_close(d1[..., :-2], d2[..., :-2])  # the histogram row does not change
    scripted = torch.jit.script(region_statistics)
    torch.testing.assert_close(scripted(image, too_wide, boxes, "mask", 8, None, [0.0], False, 2)[0], d2)


def test_statistics_do_not_depend_on_how_many_anatomies_are_held_at_once():
    # "auto" with a given mask for some (sample, anatomy) pairs, predicted masks for the others and a
    # predicted mask that is empty everywhere (its box is used): chunks of 1, 2 and all anatomies agree
    torch.manual_seed(0)
    b, m, size = 3, 5, [12, 10, 8]
    image = torch.rand(b, 2, *size)
    anatomy = torch.zeros(b, m, *size)
    anatomy[0, 1, 2:6, 2:6, 2:6] = 1
    anatomy[2, 3, 5:11, 1:4, :] = 1
    logits = torch.randn(b, m, 6, 5, 4)
    logits[:, 4] = -5.0  # no predicted voxel: the box
    boxes = torch.rand(b, m, 6) * 0.4 + 0.3
    ref, valid = region_statistics(image, anatomy, boxes, "auto", 8, logits, [0.0, 1.0], True, 1, chunk=m)
    assert valid.all()
    for chunk in (1, 2):
        out, v = region_statistics(image, anatomy, boxes, "auto", 8, logits, [0.0, 1.0], True, 1, chunk=chunk)
        torch.testing.assert_close(out, ref)
        assert torch.equal(v, valid)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        region_statistics(image, anatomy, boxes, "auto", 8, logits, chunk=0)
    # one anatomy's row is the statistics of exactly its region_voxel_weights
    from anatomy_vlp_bundle.networks.region_stats import region_voxel_weights

    w = region_voxel_weights(anatomy, boxes, 4, size, "auto", logits)
    x = image[:, 0].flatten(1)
    mean = (w * x).sum(1) / w.sum(1)
    torch.testing.assert_close(ref[:, 4, 1], mean)


def _line_and_blob_image():
    # a radiograph-like 2D scene: flat 0.3, a bright horizontal line 2 px thick in the top half,
    # the same line vertical in the bottom left, a bright disc (radius 5) in the bottom right
    image = torch.full((1, 1, 64, 64), 0.3)
    image[0, 0, 15:17, 8:56] = 0.6
    image[0, 0, 36:60, 14:16] = 0.6
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    image[0, 0][((yy - 48) ** 2 + (xx - 46) ** 2) <= 25] = 0.6
    return image


def test_structure_views_answer_lines_by_direction_and_blobs_by_scale():
    image = _line_and_blob_image()
    maps = structure_views(image, [1.0, 4.0])
    assert maps.shape == (1, 6, 64, 64) and maps.dtype == torch.float32
    assert bool(((maps >= 0) & (maps <= 1)).all())
    ridge, hridge, blob = maps[0, 0], maps[0, 1], maps[0, 5]  # sigma 1: ridge, horizontal ridge; sigma 4: blob
    h_line, v_line, disc, flat = (15, 30), (48, 14), (48, 46), (30, 30)
    # a line of its width lights the ridge map whatever its direction; the flat background does not
    assert ridge[h_line] > 0.9 and ridge[v_line] > 0.9 and ridge[flat] < 0.6
    # the horizontal-ridge map tells the two lines apart
    assert hridge[h_line] > 0.9 and hridge[v_line] < 0.5
    # at sigma 4 the disc is the strongest blob, the thin lines are not
    assert blob[disc] > 0.95 and blob[disc] > blob[h_line] and blob[disc] > blob[v_line]
    # a uniform exposure change leaves the maps unchanged (each map is divided by its mean |value|)
    torch.testing.assert_close(structure_views(image * 0.5 + 0.2, [1.0, 4.0]), maps, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="2D"):
        structure_views(torch.rand(1, 1, 8, 8, 8), [1.0])


def test_structure_views_are_extra_statistics_views_that_see_a_plate_in_a_zone():
    # two zones of the same mean, histogram and extremes: one holds a thin horizontal plate, the other
    # the same bright voxels scattered; only the structure views' rows tell them apart
    torch.manual_seed(0)
    image = torch.full((2, 1, 64, 64), 0.3)
    image[0, 0, 30, 10:40] = 0.7
    idx = torch.randperm(64 * 64)[:30]
    image[1, 0].view(-1)[idx] = 0.7
    masks = torch.ones(2, 1, 64, 64)
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0]]]).expand(2, 1, 4)
    x, per_view = stats_input(image, image, False, [1.0])
    assert per_view and x.shape == (2, 1 + 3, 64, 64)
    plain, _ = region_statistics(image, masks, boxes, "mask", 8)
    rows, valid = region_statistics(x, masks, boxes, "mask", 8, per_view=True)
    assert rows.shape == (2, 1, stats_dim(8, 0, 4)) and bool(valid.all())
    torch.testing.assert_close(rows[..., : plain.shape[-1]], plain)  # the image's own row comes first, unchanged
    torch.testing.assert_close(plain[0], plain[1])  # first-order statistics cannot tell them apart
    width = plain.shape[-1]
    hridge_row = slice(2 * width, 3 * width)
    assert (rows[0, 0, hridge_row] - rows[1, 0, hridge_row]).abs().max() > 1.0
    # without structure sigmas: the image itself, as before
    same, flag = stats_input(image, image, False, [])
    assert same is image and not flag
