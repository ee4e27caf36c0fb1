"""Box geometry: conversions, normalisation, IoU/GIoU against MONAI, rasterisation onto token grids."""

import pytest
import torch
import torch.nn.functional as F
from monai.data.box_utils import box_giou, box_iou, box_pair_giou, convert_box_mode

from anatomy_vlp_bundle.networks.anatomy_vit import masks_to_token_mask
from anatomy_vlp_bundle.networks.box_ops import (
    boxes_to_normalized_cxcywh,
    boxes_to_token_mask,
    corners_to_cxcywh,
    cxcywh_to_corners,
    elementwise_giou,
    elementwise_iou,
    normalized_cxcywh_to_boxes,
    pairwise_giou,
    pairwise_iou,
)

MONAI_CENTRE_MODE = {2: "ccwh", 3: "cccwhd"}
MONAI_CORNER_MODE = {2: "xyxy", 3: "xyzxyz"}


def random_boxes(n, spatial_dims, generator, low=0.0, high=50.0, min_size=0.5, max_size=30.0):
    lo = torch.rand(n, spatial_dims, generator=generator, dtype=torch.float64) * (high - low) + low
    size = torch.rand(n, spatial_dims, generator=generator, dtype=torch.float64) * (max_size - min_size) + min_size
    return torch.cat([lo, lo + size], dim=-1).float()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_corner_centre_round_trip_matches_monai(spatial_dims):
    g = torch.Generator().manual_seed(spatial_dims)
    boxes = random_boxes(64, spatial_dims, g)
    centre = corners_to_cxcywh(boxes)
    ref = convert_box_mode(boxes, src_mode=MONAI_CORNER_MODE[spatial_dims], dst_mode=MONAI_CENTRE_MODE[spatial_dims])
    torch.testing.assert_close(centre, ref)
    torch.testing.assert_close(cxcywh_to_corners(centre), boxes)
    # any leading dims
    batched = boxes.reshape(4, 16, 2 * spatial_dims)
    torch.testing.assert_close(corners_to_cxcywh(batched).reshape(64, -1), centre)


def test_centre_size_known_values():
    boxes = torch.tensor([[10.0, 4.0, 2.0, 20.0, 8.0, 3.0]])  # voxels 10..19, 4..7, 2
    torch.testing.assert_close(corners_to_cxcywh(boxes), torch.tensor([[15.0, 6.0, 2.5, 10.0, 4.0, 1.0]]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_normalised_round_trip(spatial_dims):
    g = torch.Generator().manual_seed(10 + spatial_dims)
    shape = [80, 64, 48][:spatial_dims]
    boxes = random_boxes(30, spatial_dims, g, high=40.0).reshape(3, 10, -1)
    norm = boxes_to_normalized_cxcywh(boxes, shape)
    torch.testing.assert_close(normalized_cxcywh_to_boxes(norm, shape), boxes)
    # the whole grid is centre 0.5, size 1
    whole = torch.tensor([0.0] * spatial_dims + shape, dtype=torch.float32)
    torch.testing.assert_close(boxes_to_normalized_cxcywh(whole, shape), torch.tensor([0.5] * spatial_dims + [1.0] * spatial_dims))
    # integer boxes are accepted and give float output
    assert boxes_to_normalized_cxcywh(whole.long(), shape).dtype == torch.float32


def test_normalised_per_sample_shapes_broadcast():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 20.0]], [[0.0, 0.0, 10.0, 20.0]]])  # (B=2, M=1, 4)
    shapes = torch.tensor([[[10, 20]], [[20, 40]]])  # (B, 1, 2)
    norm = boxes_to_normalized_cxcywh(boxes, shapes)
    torch.testing.assert_close(norm[0, 0], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(norm[1, 0], torch.tensor([0.25, 0.25, 0.5, 0.5]))


def test_bad_box_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        corners_to_cxcywh(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="spatial_shape"):
        boxes_to_normalized_cxcywh(torch.zeros(3, 6), [10, 10])
    with pytest.raises(ValueError, match="positive"):
        boxes_to_normalized_cxcywh(torch.zeros(3, 4), [10, 0])
    with pytest.raises(ValueError, match="same shape"):
        elementwise_giou(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pairwise"):
        pairwise_iou(torch.zeros(3, 4), torch.zeros(2, 6))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_iou_giou_against_monai(spatial_dims):
    g = torch.Generator().manual_seed(20 + spatial_dims)
    a = random_boxes(40, spatial_dims, g)
    b = random_boxes(40, spatial_dims, g)
    # make some pairs disjoint and some identical, so both GIoU regimes are covered
    b[:5] = a[:5]
    b[5:10] = a[5:10] + 200.0
    ref_iou = box_iou(a, b)
    ref_giou = box_giou(a, b)
    torch.testing.assert_close(pairwise_iou(a, b), ref_iou)
    torch.testing.assert_close(pairwise_giou(a, b), ref_giou)
    # the elementwise forms against the diagonals of MONAI's pairwise matrices
    torch.testing.assert_close(elementwise_iou(a, b), torch.diagonal(ref_iou), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(elementwise_giou(a, b), torch.diagonal(ref_giou), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(elementwise_giou(a, b), box_pair_giou(a, b))
    assert torch.allclose(elementwise_iou(a[:5], b[:5]), torch.ones(5))
    assert (elementwise_giou(a[5:10], b[5:10]) < 0).all()
    assert (elementwise_iou(a[5:10], b[5:10]) == 0).all()
    # leading dims are kept
    assert elementwise_giou(a.reshape(4, 10, -1), b.reshape(4, 10, -1)).shape == (4, 10)
    assert elementwise_iou(a.reshape(4, 10, -1), b.reshape(4, 10, -1)).shape == (4, 10)


def test_giou_hand_computed_value():
    # 2x2 boxes overlapping in a 1x1 square: IoU 1/7, enclosure 3x3 = 9, GIoU = 1/7 - (9 - 7)/9
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    torch.testing.assert_close(elementwise_iou(a, b), torch.tensor([1 / 7]))
    torch.testing.assert_close(elementwise_giou(a, b), torch.tensor([1 / 7 - 2 / 9]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_giou_iou_are_differentiable(spatial_dims):
    g = torch.Generator().manual_seed(30 + spatial_dims)
    target = random_boxes(8, spatial_dims, g)
    pred_norm = torch.rand(8, 2 * spatial_dims, generator=g).clamp(0.1, 0.9).requires_grad_()
    shape = [64] * spatial_dims
    for fn in (elementwise_giou, elementwise_iou):
        pred_norm.grad = None
        pred = normalized_cxcywh_to_boxes(pred_norm, shape)
        loss = (1 - fn(pred, target)).sum()
        loss.backward()
        assert pred_norm.grad is not None and torch.isfinite(pred_norm.grad).all()
        assert pred_norm.grad.abs().sum() > 0
    # a small step against the GIoU-loss gradient improves GIoU
    pred_norm.grad = None
    loss = (1 - elementwise_giou(normalized_cxcywh_to_boxes(pred_norm, shape), target)).sum()
    loss.backward()
    with torch.no_grad():
        stepped = pred_norm - 1e-3 * pred_norm.grad
        after = (1 - elementwise_giou(normalized_cxcywh_to_boxes(stepped, shape), target)).sum()
    assert after < loss


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_boxes_to_token_mask_matches_max_pooled_box_masks(spatial_dims):
    """Rasterising a box onto the token grid == max-pooling the box's voxel mask onto it."""
    g = torch.Generator().manual_seed(40 + spatial_dims)
    shape = [32, 24, 16][:spatial_dims]
    patch = [8, 4, 4][:spatial_dims]
    grid = [s // p for s, p in zip(shape, patch)]
    b, m = 2, 7
    lo = torch.stack([torch.randint(0, s - 1, (b, m), generator=g) for s in shape], dim=-1)
    size = torch.stack([torch.randint(1, s, (b, m), generator=g) for s in shape], dim=-1)
    hi = torch.minimum(lo + size, torch.tensor(shape))
    corners = torch.cat([lo, hi], dim=-1).float()
    masks = torch.zeros(b, m, *shape, dtype=torch.uint8)
    for i in range(b):
        for j in range(m):
            sl = tuple(slice(int(lo[i, j, a]), int(hi[i, j, a])) for a in range(spatial_dims))
            masks[(i, j) + sl] = 1
    expected = masks_to_token_mask(masks, patch)
    got = boxes_to_token_mask(boxes_to_normalized_cxcywh(corners, shape), grid)
    assert got.dtype == torch.bool and got.shape == (b, m, int(torch.tensor(grid).prod()))
    assert torch.equal(got, expected)


def test_boxes_to_token_mask_tiny_and_outside_boxes_keep_one_token():
    grid = [4, 4]
    boxes = torch.tensor([[[0.3, 0.6, 0.0, 0.0], [1.2, -0.5, 0.0, 0.0]]])  # zero-size, and centre off the grid
    mask = boxes_to_token_mask(boxes, grid).reshape(1, 2, 4, 4)
    assert mask[0, 0].sum() == 1 and mask[0, 0, 1, 2]
    assert mask[0, 1].sum() == 1 and mask[0, 1, 3, 0]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_soft_token_mask_is_coverage(spatial_dims):
    g = torch.Generator().manual_seed(50 + spatial_dims)
    grid = [5, 4, 3][:spatial_dims]
    centre = torch.rand(2, 6, spatial_dims, generator=g) * 0.4 + 0.3
    size = torch.rand(2, 6, spatial_dims, generator=g) * 0.4 + 0.05
    boxes = torch.cat([centre, size], dim=-1).requires_grad_()
    soft = boxes_to_token_mask(boxes, grid, soft=True)
    assert soft.dtype == torch.float32 and float(soft.min()) >= 0 and float(soft.max()) <= 1 + 1e-6
    # coverage x token volume sums to the box volume (boxes lie inside the grid)
    token_volume = 1.0 / float(torch.tensor(grid).prod())
    torch.testing.assert_close(soft.sum(-1) * token_volume, size.prod(-1), atol=1e-5, rtol=1e-4)
    # the soft support is inside the hard mask (the hard mask adds tokens only touched at an edge)
    hard = boxes_to_token_mask(boxes.detach(), grid)
    assert not (soft.detach() > 1e-3)[~hard].any()
    soft.sum().backward()
    assert boxes.grad is not None and boxes.grad[..., spatial_dims:].abs().sum() > 0


def test_boxes_to_token_mask_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="spatial_dims"):
        boxes_to_token_mask(torch.zeros(1, 2, 4), [2, 2, 2])


def test_masks_to_token_mask_matches_max_pool():
    g = torch.Generator().manual_seed(60)
    masks = (torch.rand(2, 3, 16, 8, 12, generator=g) > 0.97).to(torch.uint8)
    ref = F.max_pool3d(masks.float().reshape(6, 1, 16, 8, 12), kernel_size=(4, 4, 2)).reshape(2, 3, -1) > 0
    assert torch.equal(masks_to_token_mask(masks, (4, 4, 2)), ref)
    assert torch.equal(masks_to_token_mask(masks.bool(), (4, 4, 2)), ref)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        masks_to_token_mask(masks, 5)
