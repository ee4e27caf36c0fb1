"""Readers and the pipeline on the real scans in ``shared/data/real`` (skipped when absent)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT, UNKNOWN
from anatomy_vlp_bundle.data.pipeline import build_transforms
from anatomy_vlp_bundle.data.readers import load_mask_image, load_study_image
from anatomy_vlp_bundle.data.transforms import LoadStudyd

LIVER_LABEL = 5


def _world_box_from_voxel_box(affine: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RAS box spanning the edges of voxels ``box[:3] .. box[3:] - 1`` (end exclusive) of a grid."""
    a = affine @ np.r_[box[:3] - 0.5, 1.0]
    b = affine @ np.r_[box[3:] - 0.5, 1.0]
    return np.minimum(a, b)[:3], np.maximum(a, b)[:3]


@pytest.fixture(scope="module")
def totalseg(real_data):
    folder = real_data / "ct_totalsegmentator"
    seg = nib.load(folder / "example_seg_fast_force_split.nii.gz")
    labels = np.asarray(seg.dataobj)
    idx = np.argwhere(labels == LIVER_LABEL)
    expected = _world_box_from_voxel_box(seg.affine, np.r_[idx.min(0), idx.max(0) + 1].astype(float))
    record = {
        "id": "totalseg_example",
        "image": str(folder / "example_ct.nii.gz"),
        "anatomy_mask": str(folder / "example_seg_fast_force_split.nii.gz"),
    }
    return record, expected


@pytest.mark.parametrize("spacing, tolerance_mm", [((3.0, 3.0, 3.0), 3.0), (None, 4.0 + 3.0)])
def test_totalseg_liver_box_matches_label_map(totalseg, spacing, tolerance_mm):
    """The derived liver box, mapped back to world mm, matches label 5's own extent.

    At the native 3 mm the match is within one voxel; at the default 4 mm nearest-neighbour resampling
    may also drop a one-voxel sliver at the organ's edge, so one output plus one input voxel is allowed.
    """
    record, (lo_expected, hi_expected) = totalseg
    catalog = load_catalog("ct_totalseg")
    out = build_transforms(catalog, "eval", spacing=spacing, roi_size=(128, 128, 128))(dict(record))
    row = catalog.index("liver")
    assert out["anatomy_presence"][row] == PRESENT
    box = out["anatomy_boxes"][row].numpy().astype(float)
    lo, hi = _world_box_from_voxel_box(out["anatomy"].affine.numpy(), box)
    np.testing.assert_allclose(lo, lo_expected, atol=tolerance_mm)
    np.testing.assert_allclose(hi, hi_expected, atol=tolerance_mm)
    # anatomies whose labels the map does not hold are absent (the example covers the abdomen only)
    assert out["anatomy_presence"][catalog.index("thyroid gland")] == ABSENT
    assert out["image"].shape == (1, 128, 128, 128) and 0.0 <= float(out["image"].min()) <= float(out["image"].max()) <= 1.0


@pytest.mark.parametrize("name", ["00000001_000.png", "00027426_000.png"])
def test_nih_pngs_load_and_scale(real_data, name):
    path = real_data / "cxr_nih" / name
    img = load_study_image(path, "CXR")
    assert img.shape == (1, 512, 512) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and 200.0 <= float(img.max()) <= 255.0
    assert img.meta["spacing_known"] is False
    out = build_transforms(load_catalog("cxr_imagenome29"), "eval")({"id": name, "image": str(path)})
    assert out["image"].shape == (1, 224, 224)
    assert float(out["image"].min()) == 0.0 and float(out["image"].max()) == 1.0
    assert out["anatomy"].shape == (29, 224, 224) and out["anatomy_presence"].tolist() == [UNKNOWN] * 29


def test_real_dicom_series_and_nrrd_masks(real_data):
    folder = real_data / "ct_dicom_dcmqi"
    img = load_study_image(folder, "CT")
    assert img.shape == (1, 512, 512, 3)
    spacing = np.linalg.norm(img.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [0.8105, 0.8105, 1.0], atol=1e-3)
    catalog = load_catalog("ct_totalseg")
    record = {
        "id": "dcmqi",
        "image": str(folder),
        "anatomy_masks": {"liver": str(folder / "liver_seg.nrrd"), "vertebrae": str(folder / "spine_seg.nrrd")},
    }
    d = LoadStudyd(catalog)(record)
    liver, spine = d["anatomy"][catalog.index("liver")] > 0, d["anatomy"][catalog.index("vertebrae")] > 0
    assert int(liver.sum()) == int((load_mask_image(folder / "liver_seg.nrrd", 3) > 0).sum())
    hu = d["image"][0]
    # landed on the right voxels: liver parenchyma is soft tissue, the spine mask is bone
    assert 20.0 < float(hu[liver].median()) < 80.0 and float(hu[liver].quantile(0.1)) > -60.0
    assert float(hu[spine].median()) > 150.0
    assert d["anatomy_presence"][catalog.index("liver")] == PRESENT
