"""Anatomy transforms and the transform pipeline: geometry, mask alignment, presence, augmentation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.apps.detection.transforms.box_ops import convert_mask_to_box
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image

from anatomy_vlp_bundle.data.catalog import Catalog
from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT, UNKNOWN
from anatomy_vlp_bundle.data.pipeline import build_transforms
from anatomy_vlp_bundle.data.readers import ImageReadError
from anatomy_vlp_bundle.data.transforms import (
    BodyForeground,
    DeriveAnatomyBoxesd,
    LoadStudyd,
    align_mask_to_image,
    mask_extents,
    rasterise_pixel_box,
    rasterise_world_box,
)

CT_CATALOG = Catalog.from_dict(
    {
        "name": "toy_ct",
        "modality": "CT",
        "anatomies": [
            {"name": "bright", "labels": [1], "findings": ["x", "y"]},
            {"name": "dark", "labels": [2], "findings": ["x"]},
            {"name": "corner", "labels": [3]},
            {"name": "missing", "labels": [4]},
            {"name": "boxed"},
        ],
    }
)
CXR_CATALOG = Catalog.from_dict(
    {
        "name": "toy_cxr",
        "modality": "CXR",
        "anatomies": [{"name": "left"}, {"name": "right"}, {"name": "corner"}, {"name": "boxed"}],
    }
)
#: Voxel-index -> RAS mm of the toy CT: 4 mm voxels, so the default target spacing keeps the grid.
CT_AFFINE = np.array([[4.0, 0, 0, -90.0], [0, 4.0, 0, -80.0], [0, 0, 4.0, -70.0], [0, 0, 0, 1]])
CT_SHAPE = (48, 40, 36)
HU = {"air": -1000, "body": 0, 1: 400, 2: -400, 3: 800}


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def _extents_np(mask: np.ndarray) -> np.ndarray:
    """Independent reference: per channel min and max+1 of the foreground indices, zeros if empty."""
    out = np.zeros((mask.shape[0], 2 * (mask.ndim - 1)), np.float32)
    for c in range(mask.shape[0]):
        idx = np.argwhere(mask[c] > 0)
        if len(idx):
            out[c] = np.concatenate([idx.min(0), idx.max(0) + 1])
    return out


def _world_box_of_voxels(affine, lo_idx, hi_idx_exclusive):
    """World RAS box spanning the edges of voxels lo..hi-1 (affine may flip axes)."""
    a = affine @ np.r_[np.asarray(lo_idx, float) - 0.5, 1]
    b = affine @ np.r_[np.asarray(hi_idx_exclusive, float) - 0.5, 1]
    return list(np.minimum(a, b)[:3]) + list(np.maximum(a, b)[:3])


@pytest.fixture(scope="module")
def toy_ct(tmp_path_factory) -> dict:
    return make_toy_ct(tmp_path_factory.mktemp("toy_ct"))


def make_toy_ct(root: Path) -> dict:
    """A 48x40x36 CT (4 mm) with a body, three labelled ellipsoids and a box anatomy."""
    vol = np.full(CT_SHAPE, HU["air"], np.int16)
    vol[_ellipsoid(CT_SHAPE, (24, 20, 18), (22, 18, 17))] = HU["body"]
    lab = np.zeros(CT_SHAPE, np.uint8)
    lab[_ellipsoid(CT_SHAPE, (16, 20, 18), (7, 6, 6))] = 1
    lab[_ellipsoid(CT_SHAPE, (32, 22, 16), (6, 5, 7))] = 2
    lab[_ellipsoid(CT_SHAPE, (8, 10, 8), (2.5, 2.5, 2.5))] = 3
    lab[40:42, 30:32, 28:30] = 9  # a label no anatomy lists
    for value in (1, 2, 3):
        vol[lab == value] = HU[value]
    nib.save(nib.Nifti1Image(vol, CT_AFFINE), root / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, CT_AFFINE), root / "lab.nii.gz")
    box = _world_box_of_voxels(CT_AFFINE, (20, 24, 24), (26, 30, 30))
    record = {
        "id": "toy",
        "image": str(root / "ct.nii.gz"),
        "anatomy_mask": str(root / "lab.nii.gz"),
        "anatomy_boxes": {"boxed": box},
        "report": "The bright organ is normal.",
    }
    return {"root": root, "vol": vol, "lab": lab, "record": record}


class AddFindings(MapTransform):
    """Stands in for the report parser: a (M, 2) findings tensor of PRESENT."""

    def __init__(self, num):
        super().__init__("image")
        self.num = num

    def __call__(self, data):
        d = dict(data)
        d["findings"] = torch.full((self.num, 2), float(PRESENT))
        return d


# --------------------------------------------------------------------------------------------- geometry
def test_mask_extents_edges_and_monai_agreement():
    m = torch.zeros(3, 30, 20, 10, dtype=torch.uint8)
    m[0, 10:20, 3:4, 0:10] = 1
    m[2, 29, 19, 9] = 1
    boxes, nonempty = mask_extents(m)
    assert boxes[0].tolist() == [10, 3, 0, 20, 4, 10]
    assert boxes[1].tolist() == [0] * 6 and nonempty.tolist() == [True, False, True]
    assert boxes[2].tolist() == [29, 19, 9, 30, 20, 10]
    rng = np.random.default_rng(0)
    for dims in ((25, 17), (12, 9, 14)):
        rand = torch.from_numpy((rng.random((6, *dims)) > 0.995).astype(np.int16))
        ours, nonempty = mask_extents(rand)
        monai_boxes, _ = convert_mask_to_box(rand, bg_label=0)  # skips empty channels
        np.testing.assert_array_equal(ours[nonempty].numpy(), monai_boxes.numpy())


def test_rasterise_pixel_box_is_max_exclusive_and_clipped():
    out = rasterise_pixel_box([10, 5, 20, 8], (30, 12))
    idx = torch.nonzero(out)
    assert idx[:, 0].min() == 10 and idx[:, 0].max() == 19 and idx[:, 1].min() == 5 and idx[:, 1].max() == 7
    assert int(out.sum()) == 30
    clipped = rasterise_pixel_box([-5, -5, 3, 100], (30, 12))
    assert int(clipped.sum()) == 3 * 12


def test_rasterise_world_box_on_flipped_and_oblique_grids():
    aff = np.array([[-2.0, 0, 0, 50], [0, 3.0, 0, -20], [0, 0, 1.5, 7], [0, 0, 0, 1]])
    img = MetaTensor(torch.zeros(1, 12, 10, 14), affine=torch.as_tensor(aff))
    out = rasterise_world_box(_world_box_of_voxels(aff, (2, 1, 5), (5, 4, 8)), img)
    expected = torch.zeros(12, 10, 14, dtype=torch.bool)
    expected[2:5, 1:4, 5:8] = True
    assert torch.equal(out, expected)
    # oblique grid (30 degrees about z): the box becomes a rotated box in voxel space
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.eye(4)
    rot[:2, :2] = [[c, -s], [s, c]]
    aff_o = rot @ np.diag([1.0, 1.0, 1.0, 1])
    aff_o[:3, 3] = [-10, -30, 0]
    img_o = MetaTensor(torch.zeros(1, 60, 60, 10), affine=torch.as_tensor(aff_o))
    box = [0.0, 0.0, 2.0, 20.0, 10.0, 6.0]
    out_o = rasterise_world_box(box, img_o)
    idx = torch.nonzero(out_o).numpy().astype(float)
    world = idx @ aff_o[:3, :3].T + aff_o[:3, 3]
    assert np.all(world >= np.array(box[:3]) - 1e-6) and np.all(world < np.array(box[3:]))
    assert abs(len(idx) - 20 * 10 * 4) / (20 * 10 * 4) < 0.1  # unit voxels: count ~ box volume
    rows = set(idx[:, 1].astype(int).tolist())
    assert len(rows) > 12  # rotated: spans more voxel rows than the 10 mm side would when aligned


# --------------------------------------------------------------------------------------------- loading
def test_load_study_builds_channels_and_presence(toy_ct):
    d = LoadStudyd(CT_CATALOG)(dict(toy_ct["record"]))
    lab = toy_ct["lab"]
    an = d["anatomy"]
    assert an.shape == (5, *CT_SHAPE) and an.dtype == torch.uint8
    assert torch.equal(an[0], torch.from_numpy(lab == 1).to(torch.uint8))
    assert torch.equal(an[2], torch.from_numpy(lab == 3).to(torch.uint8))
    assert int(an[3].sum()) == 0  # label 4 not in the map
    boxed = torch.zeros(CT_SHAPE, dtype=torch.uint8)
    boxed[20:26, 24:30, 24:30] = 1
    assert torch.equal(an[4], boxed)
    assert d["anatomy_presence"].tolist() == [PRESENT, PRESENT, PRESENT, ABSENT, PRESENT]
    assert "anatomy_mask" not in d and "anatomy_masks" not in d and d["report"] == toy_ct["record"]["report"]
    np.testing.assert_allclose(an.affine.numpy(), CT_AFFINE)
    assert torch.equal(an.affine, d["image"].affine)


def test_presence_unknown_without_source_and_precedence(toy_ct, tmp_path):
    root = toy_ct["root"]
    # binary mask beats the label map; label map beats a box
    own = np.zeros(CT_SHAPE, np.uint8)
    own[2:4, 2:4, 2:4] = 255
    nib.save(nib.Nifti1Image(own, CT_AFFINE), tmp_path / "own.nii.gz")
    rec = dict(toy_ct["record"])
    rec["anatomy_masks"] = {"bright": str(tmp_path / "own.nii.gz"), "not in catalog": "ignored.nii.gz"}
    rec["anatomy_boxes"] = {"dark": [-1000, -1000, -1000, 1000, 1000, 1000], **rec["anatomy_boxes"]}
    d = LoadStudyd(CT_CATALOG)(rec)
    assert int(d["anatomy"][0].sum()) == 8
    assert torch.equal(d["anatomy"][1], torch.from_numpy(toy_ct["lab"] == 2).to(torch.uint8))
    # no label map: label anatomies are unknown, not absent
    bare = {"id": "bare", "image": str(root / "ct.nii.gz")}
    d = LoadStudyd(CT_CATALOG)(bare)
    assert d["anatomy_presence"].tolist() == [UNKNOWN] * 5 and int(d["anatomy"].sum()) == 0


def _write_mask(path: Path, arr: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), path)
    return str(path)


def _load_bright(toy_ct, mask_path: str) -> torch.Tensor:
    rec = {"id": "m", "image": toy_ct["record"]["image"], "anatomy_masks": {"bright": mask_path}}
    return LoadStudyd(CT_CATALOG)(rec)["anatomy"][0]


def test_mask_on_other_grid_lands_on_the_same_voxels(toy_ct, tmp_path):
    # coarse mask at 8 mm whose 2x2x2 blocks make up the fine reference mask
    coarse = np.zeros((24, 20, 18), np.uint8)
    coarse[5:11, 6:12, 4:9] = 1
    coarse[7, 13, 10] = 1
    fine = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    reference = _load_bright(toy_ct, _write_mask(tmp_path / "fine.nii.gz", fine, CT_AFFINE))
    assert torch.equal(reference, torch.from_numpy(fine))

    # same content, axes flipped (x and z) and swapped (x <-> y): the affine follows the array
    flipped = np.flip(fine, axis=(0, 2)).transpose(1, 0, 2)
    to_orig = np.zeros((4, 4))  # flipped index (a, b, c) -> original index (i, j, k)
    to_orig[0, 1], to_orig[0, 3] = -1, CT_SHAPE[0] - 1  # i = n0 - 1 - b
    to_orig[1, 0] = 1  # j = a
    to_orig[2, 2], to_orig[2, 3] = -1, CT_SHAPE[2] - 1  # k = n2 - 1 - c
    to_orig[3, 3] = 1
    got = _load_bright(toy_ct, _write_mask(tmp_path / "flipped.nii.gz", flipped, CT_AFFINE @ to_orig))
    assert torch.equal(got, reference)

    # half resolution: 8 mm voxels whose centres sit between the fine voxel centres
    coarse_aff = CT_AFFINE @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1]])
    got = _load_bright(toy_ct, _write_mask(tmp_path / "coarse.nii.gz", coarse, coarse_aff))
    assert torch.equal(got, reference)

    # cropped region of interest stored with a shifted origin
    roi = fine[8:30, 10:32, 6:24]
    roi_aff = CT_AFFINE.copy()
    roi_aff[:3, 3] = (CT_AFFINE @ np.array([8, 10, 6, 1.0]))[:3]
    got = _load_bright(toy_ct, _write_mask(tmp_path / "roi.nii.gz", roi, roi_aff))
    assert torch.equal(got, reference)


def test_mask_of_another_scan_is_an_error(toy_ct, tmp_path):
    mask = np.zeros(CT_SHAPE, np.uint8)
    mask[10:20, 10:20, 10:20] = 1
    far = CT_AFFINE.copy()
    far[:3, 3] += 1000.0
    with pytest.raises(ImageReadError, match=r"far\.nii\.gz.*another scan"):
        _load_bright(toy_ct, _write_mask(tmp_path / "far.nii.gz", mask, far))
    # a region partly (30%) outside the image is accepted (ROI masks may exceed the field of view)
    part = CT_AFFINE.copy()
    part[0, 3] += (CT_SHAPE[0] - 17) * 4.0  # foreground x 10..19 -> image x 41..50: 3 of 10 outside
    got = _load_bright(toy_ct, _write_mask(tmp_path / "part.nii.gz", mask, part))
    assert int(got.sum()) == 7 * 10 * 10


def test_non_integer_label_map_is_an_error(toy_ct, tmp_path):
    lab = toy_ct["lab"].astype(np.float32)
    lab[0, 0, 0] = 2.5
    nib.save(nib.Nifti1Image(lab, CT_AFFINE), tmp_path / "soft.nii.gz")
    rec = dict(toy_ct["record"], anatomy_mask=str(tmp_path / "soft.nii.gz"))
    with pytest.raises(ImageReadError, match=r"soft\.nii\.gz.*non-integer"):
        LoadStudyd(CT_CATALOG)(rec)


def test_bad_box_is_an_error(toy_ct):
    rec = dict(toy_ct["record"], anatomy_boxes={"boxed": [0, 0, 0, 1, 1]})
    with pytest.raises(ValueError, match=r"toy.*boxed.*6"):
        LoadStudyd(CT_CATALOG)(rec)


def test_2d_masks_without_spacing_need_the_image_size(tmp_path):
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.full((10, 15), 255, np.uint8)).save(tmp_path / "small.png")
    rec = {"id": "c", "image": str(tmp_path / "img.png"), "anatomy_masks": {"left": str(tmp_path / "small.png")}}
    with pytest.raises(ImageReadError, match=r"small\.png.*pixel size"):
        LoadStudyd(CXR_CATALOG)(rec)
    ok = np.zeros((20, 30), np.uint8)
    ok[2:5, 7:9] = 255  # rows 2..4, columns 7..8
    Image.fromarray(ok).save(tmp_path / "ok.png")
    rec["anatomy_masks"] = {"left": str(tmp_path / "ok.png")}
    d = LoadStudyd(CXR_CATALOG)(rec)
    assert d["anatomy"].shape == (4, 30, 20)
    assert torch.equal(torch.nonzero(d["anatomy"][0]).amin(0), torch.tensor([7, 2]))
    assert d["anatomy_presence"].tolist() == [PRESENT, UNKNOWN, UNKNOWN, UNKNOWN]


def test_2d_mask_with_spacing_is_resampled_by_position():
    image = MetaTensor(torch.zeros(1, 20, 16), affine=torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)))
    image.meta["spacing_known"] = True
    mask = MetaTensor(torch.zeros(1, 10, 8, dtype=torch.uint8), affine=torch.tensor(
        [[1.0, 0, 0, 0.25], [0, 1.0, 0, 0.25], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64))
    mask.meta["spacing_known"] = True
    mask[0, 3, 5] = 1  # covers image pixels x 6..7, y 10..11
    out = align_mask_to_image(mask, image, "m.dcm", spatial_dims=2)
    assert torch.nonzero(out[0]).tolist() == [[6, 10], [6, 11], [7, 10], [7, 11]]


# --------------------------------------------------------------------------------------------- boxes
def test_derive_boxes_presence_and_findings():
    an = MetaTensor(torch.zeros(4, 10, 12, 8, dtype=torch.uint8))
    an[0, 2:5, 3:9, 1:2] = 1
    data = {
        "anatomy": an,
        "anatomy_presence": torch.tensor([PRESENT, PRESENT, ABSENT, UNKNOWN], dtype=torch.float32),
        "findings": torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.0, 0.0], [-2.0, -2.0]]),
    }
    out = DeriveAnatomyBoxesd()(data)
    assert out["anatomy_boxes"].tolist()[0] == [2, 3, 1, 5, 9, 2]
    assert out["anatomy_boxes"][1:].abs().sum() == 0
    assert out["anatomy_presence"].tolist() == [PRESENT, ABSENT, ABSENT, UNKNOWN]
    assert out["findings"].tolist() == [[1.0, 0.0], [UNKNOWN, UNKNOWN], [0.0, 0.0], [-2.0, -2.0]]
    assert data["findings"][1].tolist() == [1.0, -1.0]  # the input is not modified


def test_body_foreground_never_selects_nothing():
    assert BodyForeground(-500)(torch.full((1, 3, 3), -1000.0)).all()
    assert int(BodyForeground(-500)(torch.tensor([[[-1000.0, 0.0]]])).sum()) == 1


# --------------------------------------------------------------------------------------------- pipeline
def _check_sample(out, catalog, roi):
    m = catalog.num_anatomies
    assert out["image"].shape == (1, *roi) and out["image"].dtype == torch.float32
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    assert out["anatomy"].shape == (m, *roi) and out["anatomy"].dtype == torch.uint8
    assert out["anatomy_presence"].shape == (m,) and out["anatomy_boxes"].shape == (m, 2 * len(roi))
    np.testing.assert_array_equal(out["anatomy_boxes"].numpy(), _extents_np(out["anatomy"].numpy()))
    nonempty = out["anatomy"].flatten(1).any(1)
    assert torch.all((out["anatomy_presence"] == PRESENT) == nonempty)


def test_ct_augmentation_property(toy_ct):
    """Random flips/rotations/zooms/crops: boxes equal the transformed masks' extents; cropped-out -> absent."""
    roi = (24, 24, 24)
    aug = {"flip_prob": (0.0, 0.5, 0.5), "rotate_prob": 1.0, "rotate_range": 0.3, "zoom_prob": 1.0,
           "zoom_range": (0.8, 1.25), "noise_prob": 0.0, "scale_prob": 0.0, "shift_prob": 0.0}
    chain = build_transforms(CT_CATALOG, "train", roi_size=roi, augment=aug, report_parser=AddFindings(5))
    chain.set_random_state(seed=7)
    out_of_view = 0
    for _ in range(10):
        out = chain(dict(toy_ct["record"]))
        _check_sample(out, CT_CATALOG, roi)
        presence = out["anatomy_presence"]
        assert presence[3] == ABSENT  # absent from the label map stays absent
        lost = presence[[0, 1, 2, 4]] == ABSENT
        out_of_view += int(lost.sum())
        for row in torch.nonzero(presence == ABSENT).flatten().tolist():
            if row != 3:
                assert out["findings"][row].tolist() == [UNKNOWN, UNKNOWN]
        # The anatomy never drifts from the image. The bright organ (400 HU -> 0.7 after windowing) sits
        # in 0 HU (0.5) body: its channel must coincide with the image region above the midpoint 0.6.
        channel = out["anatomy"][0].numpy() > 0
        if channel.sum() > 300:
            image = out["image"][0].numpy()
            seen = (image > 0.6) & (image < 0.8)
            assert abs(float(np.median(image[channel])) - 0.7) < 0.05
            np.testing.assert_allclose(np.argwhere(channel).mean(0), np.argwhere(seen).mean(0), atol=0.6)
    assert out_of_view > 0, "the seeded crops should move at least one anatomy out of view"


def _toy_cxr(root: Path) -> dict:
    w, h = 96, 80
    img = np.zeros((h, w), np.uint8)  # stored row-major (rows = y)
    masks = {"left": np.zeros((h, w), np.uint8), "right": np.zeros((h, w), np.uint8), "corner": np.zeros((h, w), np.uint8)}
    masks["left"][15:65, 10:40] = 255
    masks["right"][20:70, 55:88] = 255
    masks["corner"][2:6, 2:6] = 255
    img[masks["left"] > 0] = 100
    img[masks["right"] > 0] = 200
    img[masks["corner"] > 0] = 255
    Image.fromarray(img).save(root / "cxr.png")
    paths = {}
    for name, m in masks.items():
        Image.fromarray(m).save(root / f"{name}.png")
        paths[name] = str(root / f"{name}.png")
    return {"id": "cxr", "image": str(root / "cxr.png"), "anatomy_masks": paths, "anatomy_boxes": {"boxed": [40, 5, 60, 12]}}


def test_cxr_augmentation_property(tmp_path):
    record = _toy_cxr(tmp_path)
    roi = (48, 40)
    aug = {"flip_prob": (0.5, 0.5), "rotate_prob": 1.0, "rotate_range": 0.4, "zoom_prob": 1.0, "zoom_range": (0.8, 1.3),
           "crop_scale": 0.5, "noise_prob": 0.0, "scale_prob": 0.0, "shift_prob": 0.0}
    chain = build_transforms(CXR_CATALOG, "train", roi_size=roi, augment=aug, intensity_percentiles=(0, 100))
    chain.set_random_state(seed=3)
    out_of_view = 0
    for _ in range(10):
        out = chain(dict(record))
        _check_sample(out, CXR_CATALOG, roi)
        out_of_view += int((out["anatomy_presence"] == ABSENT).sum())
        for row, value in ((0, 100), (1, 200)):  # the channels stay on their image regions
            channel = out["anatomy"][row].numpy() > 0
            if channel.sum() > 100:
                image = out["image"][0].numpy()
                assert abs(float(np.median(image[channel])) - value / 255) < 0.03
    assert out_of_view > 0


def test_cxr_eval_keeps_boxes_in_resized_pixels(tmp_path):
    record = _toy_cxr(tmp_path)
    out = build_transforms(CXR_CATALOG, "eval", roi_size=(48, 40))(dict(record))
    _check_sample(out, CXR_CATALOG, (48, 40))
    # Halving with centre-aligned nearest sampling: output pixel o reads input pixel 2o + 1.
    # left: columns 10..39 (x), rows 15..64 (y) -> x 5..19, y 7..31
    assert out["anatomy_boxes"][0].tolist() == [5, 7, 20, 32]
    # box [40, 5, 60, 12] (x 40..59, y 5..11) -> x 20..29, y 2..5
    assert out["anatomy_boxes"][3].tolist() == [20, 2, 30, 6]
    assert out["anatomy_presence"].tolist() == [PRESENT] * 4


def test_ct_eval_is_deterministic_and_centred_on_the_body(toy_ct, tmp_path):
    chain = build_transforms(CT_CATALOG, "eval", roi_size=(40, 40, 40))
    a, b = chain(dict(toy_ct["record"])), chain(dict(toy_ct["record"]))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["anatomy"], b["anatomy"])
    _check_sample(a, CT_CATALOG, (40, 40, 40))
    assert a["anatomy_presence"].tolist() == [PRESENT, PRESENT, PRESENT, ABSENT, PRESENT]
    # HU window (-1000, 1000) -> [0, 1]: the body (0 HU) is 0.5
    body = a["image"][0][20, 20, 20]
    assert abs(float(body) - 0.5) < 1e-5
    # a small body far off-centre in a big volume ends up in the middle of the crop
    vol = np.full((100, 90, 80), -1000, np.int16)
    vol[70:90, 60:80, 5:25] = 50
    nib.save(nib.Nifti1Image(vol, CT_AFFINE), tmp_path / "off.nii.gz")
    out = chain({"id": "off", "image": str(tmp_path / "off.nii.gz")})
    fg = np.argwhere(out["image"][0].numpy() > 0.5)
    centre = (fg.min(0) + fg.max(0) + 1) / 2
    np.testing.assert_allclose(centre, [20, 20, 20], atol=1)
    # infer without masks: all channels empty, presence unknown
    infer = build_transforms(CT_CATALOG, "infer", roi_size=(40, 40, 40))({"id": "off", "image": str(tmp_path / "off.nii.gz")})
    assert int(infer["anatomy"].sum()) == 0 and infer["anatomy_presence"].tolist() == [UNKNOWN] * 5


def test_records_without_masks_get_their_empty_channels_on_the_final_grid(toy_ct):
    from monai.transforms import Compose

    from anatomy_vlp_bundle.data.transforms import LoadStudyd
    from anatomy_vlp_bundle.data.dataset import vlp_collate

    bare = {"id": "bare", "image": toy_ct["record"]["image"]}
    for mode in ("infer", "train"):
        chain = build_transforms(CT_CATALOG, mode, roi_size=(40, 40, 40), augment={"enabled": False})
        assert isinstance(chain.transforms[0], LoadStudyd) and chain.transforms[0].defer_empty
        deferred = chain(dict(bare))
        eager = Compose([LoadStudyd(CT_CATALOG, keys="image")] + list(chain.transforms[1:]))(dict(bare))
        # the same sample as when the empty channels are built on the input grid and resampled
        assert torch.equal(deferred["image"], eager["image"])
        assert deferred["anatomy"].dtype == eager["anatomy"].dtype == torch.uint8
        assert deferred["anatomy"].shape == eager["anatomy"].shape == (CT_CATALOG.num_anatomies, 40, 40, 40)
        assert int(deferred["anatomy"].sum()) == 0
        np.testing.assert_allclose(deferred["anatomy"].affine, eager["anatomy"].affine)
        assert torch.equal(deferred["anatomy_boxes"], eager["anatomy_boxes"])
        assert deferred["anatomy_presence"].tolist() == eager["anatomy_presence"].tolist() == [UNKNOWN] * 5
    # a batch mixing a record with masks and one without collates (same metadata keys and trace length)
    chain = build_transforms(CT_CATALOG, "train", roi_size=(40, 40, 40), augment={"enabled": False})
    batch = vlp_collate([chain(dict(toy_ct["record"])), chain(dict(bare))])
    assert batch["anatomy"].shape == (2, CT_CATALOG.num_anatomies, 40, 40, 40)
    assert int(batch["anatomy"][0].sum()) > 0 and int(batch["anatomy"][1].sum()) == 0


def test_hu_window_and_augment_options(toy_ct):
    soft = build_transforms(CT_CATALOG, "eval", roi_size=(40, 40, 40), hu_window=(-200, 200))(dict(toy_ct["record"]))
    assert abs(float(soft["image"][0][20, 20, 20]) - 0.5) < 1e-5  # 0 HU in the middle of (-200, 200)
    bright = soft["anatomy"][0] > 0
    assert float(soft["image"][0][bright].min()) == 1.0  # 400 HU clipped to the top
    off = build_transforms(CT_CATALOG, "train", roi_size=(40, 40, 40), augment={"enabled": False})(dict(toy_ct["record"]))
    ref = build_transforms(CT_CATALOG, "eval", roi_size=(40, 40, 40))(dict(toy_ct["record"]))
    assert torch.equal(off["image"], ref["image"]) and torch.equal(off["anatomy_boxes"], ref["anatomy_boxes"])
    with pytest.raises(ValueError, match="unknown augment"):
        build_transforms(CT_CATALOG, "train", augment={"flip": 0.5})
    with pytest.raises(ValueError, match="flip_prob"):
        build_transforms(CT_CATALOG, "train", augment={"flip_prob": (0.5, 0.5)})
    with pytest.raises(ValueError, match="mode"):
        build_transforms(CT_CATALOG, "test")


def test_default_ct_pipeline_output_contract(toy_ct):
    out = build_transforms(CT_CATALOG, "train")(dict(toy_ct["record"]))
    _check_sample(out, CT_CATALOG, (80, 64, 64))
    assert out["id"] == "toy" and out["report"].startswith("The bright")
