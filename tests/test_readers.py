"""Readers: CT volumes in every supported format, CXR images (PNG/JPEG/DICOM) and their errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from pydicom.uid import generate_uid

from anatomy_vlp_bundle.data.readers import (
    CXRReader,
    ImageReadError,
    check_ct_dicom_series,
    load_mask_image,
    load_study_image,
)
from bad_inputs import CR_SOP_CLASS, CT_SOP_CLASS, write_dicom as _dicom

PYDICOM_FILES = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files"
LUMA = np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------------------------------- helpers
def _ct_volume(shape=(6, 5, 4)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 1500, size=shape).astype(np.int16)


#: RAS affine whose LPS form is diagonal (so a DICOM series with identity orientation matches it).
CT_AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -0.7, 0, 25.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])


def _write_dicom_series(
    folder: Path, vol: np.ndarray, affine: np.ndarray, modality: str = "CT", prefix: str = "slice"
) -> Path:
    """One file per slice k; DICOM geometry in LPS; pixel (row j, column i) = vol[i, j, k]."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1, -1, 1, 1]) @ affine
    series, study = generate_uid(), generate_uid()
    for k in range(vol.shape[2]):
        pos = lps @ np.array([0, 0, k, 1.0])
        _dicom(
            folder / f"{prefix}_{k:03d}.dcm",
            vol[:, :, k].T.astype(np.int16),
            sop_class=CT_SOP_CLASS,
            Modality=modality,
            SeriesInstanceUID=series,
            StudyInstanceUID=study,
            InstanceNumber=k + 1,
            ImagePositionPatient=[f"{v:.4f}" for v in pos[:3]],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[f"{lps[1, 1]:.4f}", f"{lps[0, 0]:.4f}"],
            SliceThickness=f"{lps[2, 2]:.4f}",
            RescaleIntercept=0,
            RescaleSlope=1,
        )
    return folder


# --------------------------------------------------------------------------------------------- CT formats
@pytest.fixture(scope="module")
def ct_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    vol = _ct_volume()
    nii = root / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, CT_AFFINE), nii)
    itk_img = sitk.ReadImage(str(nii))
    for suffix in ("nrrd", "mha"):
        sitk.WriteImage(itk_img, str(root / f"ct.{suffix}"))
    _write_dicom_series(root / "dicom", vol, CT_AFFINE)
    return root, vol


def test_ct_nifti_is_channel_first_ras(ct_files):
    root, vol = ct_files
    img = load_study_image(root / "ct.nii.gz", "CT")
    assert img.shape == (1, *vol.shape) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[0].numpy(), vol)
    np.testing.assert_allclose(img.affine.numpy(), CT_AFFINE, atol=1e-5)


@pytest.mark.parametrize("name", ["ct.nrrd", "ct.mha", "dicom"])
def test_ct_other_formats_match_nifti(ct_files, name):
    root, vol = ct_files
    ref = load_study_image(root / "ct.nii.gz", "CT")
    img = load_study_image(root / name, "CT")
    assert img.shape == ref.shape and img.dtype == torch.float32
    np.testing.assert_array_equal(img.numpy(), ref.numpy())
    np.testing.assert_allclose(img.affine.numpy(), ref.affine.numpy(), atol=1e-3)


def test_ct_mask_keeps_integer_dtype(ct_files):
    root, _ = ct_files
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[1:3, 2:4, 1] = 7
    nib.save(nib.Nifti1Image(lab, CT_AFFINE), root / "lab.nii.gz")
    m = load_mask_image(root / "lab.nii.gz", 3)
    assert m.shape == (1, 6, 5, 4) and not m.dtype.is_floating_point
    assert set(m.unique().tolist()) == {0, 7}


def test_ct_2d_and_4d_are_errors(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(ImageReadError, match=r"flat\.nii\.gz.*3D"):
        load_study_image(tmp_path / "flat.nii.gz", "CT")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), tmp_path / "vec.nii.gz")
    with pytest.raises(ImageReadError, match=r"vec\.nii\.gz.*3D"):
        load_study_image(tmp_path / "vec.nii.gz", "CT")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ImageReadError, match=r"x\.png"):
        load_study_image(tmp_path / "x.png", "CT")
    # a trailing singleton 4th dimension is still a 3D volume
    nib.save(nib.Nifti1Image(np.ones((4, 3, 2, 1), np.int16), np.eye(4)), tmp_path / "single.nii.gz")
    assert load_study_image(tmp_path / "single.nii.gz", "CT").shape == (1, 4, 3, 2)


def test_ct_dicom_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match=r"empty.*empty folder"):
        load_study_image(tmp_path / "empty", "CT")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not dicom")
    with pytest.raises(ImageReadError, match=r"text.*no DICOM image"):
        load_study_image(tmp_path / "text", "CT")
    mr = _write_dicom_series(tmp_path / "mr_series", _ct_volume((4, 4, 3)), CT_AFFINE, modality="MR")
    with pytest.raises(ImageReadError, match=r"mr_series.*Modality 'MR'"):
        load_study_image(mr, "CT")
    with pytest.raises(ImageReadError, match=r"slice_000\.dcm.*DICOM series folder"):
        load_study_image(mr / "slice_000.dcm", "CT")
    mixed = _write_dicom_series(tmp_path / "mixed", _ct_volume((4, 4, 2)), CT_AFFINE)
    _write_dicom_series(tmp_path / "mixed", _ct_volume((4, 4, 3)), CT_AFFINE, prefix="other")  # 2nd series
    with pytest.raises(ImageReadError, match=r"mixed.*2 DICOM series"):
        check_ct_dicom_series(mixed)
    with pytest.raises(ImageReadError, match=r"missing\.nii\.gz.*not found"):
        load_study_image(tmp_path / "missing.nii.gz", "CT")
    with pytest.raises(ValueError, match="modality"):
        load_study_image(tmp_path / "missing.nii.gz", "MR")


def test_one_slice_ct_series_passes_header_check(tmp_path):
    # pydicom's real CT slice, alone in a folder: a CT series of one file
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "CT_small.dcm")
    info = check_ct_dicom_series(tmp_path)
    assert info["modality"] == "CT" and info["num_files"] == 1


# --------------------------------------------------------------------------------------------- CXR
def _as_wh(pixels_hw: np.ndarray) -> np.ndarray:
    return np.asarray(pixels_hw, dtype=np.float64).T


def test_cxr_png_8bit_layout_is_x_first(tmp_path):
    pix = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)  # H=5 rows, W=7 columns
    Image.fromarray(pix).save(tmp_path / "g.png")
    img = load_study_image(tmp_path / "g.png", "CXR")
    assert img.shape == (1, 7, 5) and img.dtype == torch.float32
    assert img[0, 6, 0] == pix[0, 6]  # x = column 6, y = row 0
    np.testing.assert_array_equal(img[0].numpy(), _as_wh(pix))
    np.testing.assert_allclose(img.affine.numpy(), np.eye(4))
    assert img.meta["spacing_known"] is False


def test_cxr_png_16bit_and_colour(tmp_path):
    pix16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(pix16).save(tmp_path / "g16.png")
    img = load_study_image(tmp_path / "g16.png", "CXR")
    np.testing.assert_array_equal(img[0].numpy(), _as_wh(pix16))
    assert float(img.max()) == 55000.0

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    rgba = np.concatenate([rgb, np.full((6, 8, 1), 17, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ca.png")
    for name in ("c.png", "ca.png"):
        out = load_study_image(tmp_path / name, "CXR")
        assert out.shape == (1, 8, 6)
        np.testing.assert_allclose(out[0].numpy(), _as_wh(rgb @ LUMA), atol=1e-3)


def test_cxr_jpeg(tmp_path):
    pix = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))
    Image.fromarray(pix).save(tmp_path / "g.jpg", quality=95)
    out = load_study_image(tmp_path / "g.jpg", "CXR")
    assert out.shape == (1, 32, 24)
    np.testing.assert_allclose(out[0].numpy(), _as_wh(pix), atol=8)


def test_cxr_dicom_ct_small_with_spacing():
    path = PYDICOM_FILES / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    out = load_study_image(path, "CXR")
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(out[0].numpy(), expected.T)
    assert out.meta["spacing_known"] is True
    np.testing.assert_allclose(np.diag(out.affine.numpy())[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])


def test_cxr_dicom_monochrome1_16bit_without_spacing(tmp_path):
    pix = np.array([[0, 1000, 4095], [200, 300, 400]], dtype=np.uint16)
    path = _dicom(tmp_path / "m1.dcm", pix, PhotometricInterpretation="MONOCHROME1")
    out = load_study_image(path, "CXR")
    np.testing.assert_array_equal(out[0].numpy(), _as_wh(4095 + 0 - pix.astype(np.float64)))
    assert out.meta["spacing_known"] is False
    np.testing.assert_allclose(out.affine.numpy(), np.eye(4))
    # masks are never inverted
    np.testing.assert_array_equal(load_mask_image(path, 2)[0].numpy(), _as_wh(pix))


def test_cxr_dicom_spacing_rules(tmp_path):
    pix = np.zeros((4, 6), np.uint8)
    zero = load_study_image(_dicom(tmp_path / "z.dcm", pix, PixelSpacing=[0, 0]), "CXR")
    assert zero.meta["spacing_known"] is False and np.allclose(np.diag(zero.affine.numpy()), 1)
    aniso = load_study_image(_dicom(tmp_path / "a.dcm", pix, PixelSpacing=[0.2, 0.1]), "CXR")  # [row, column]
    np.testing.assert_allclose(np.diag(aniso.affine.numpy()), [0.1, 0.2, 1, 1])
    imager = load_study_image(_dicom(tmp_path / "i.dcm", pix, ImagerPixelSpacing=[0.139, 0.139]), "CXR")
    assert imager.meta["spacing_known"] is True and np.isclose(float(imager.affine[0, 0]), 0.139)


def _pydicom_test_file(name: str) -> Path:
    path = PYDICOM_FILES / name
    if not path.is_file():  # the set of bundled files differs between pydicom versions
        pytest.skip(f"{name} is not shipped with pydicom {pydicom.__version__}")
    return path


def test_cxr_dicom_rgb():
    rgb_path = _pydicom_test_file("examples_rgb_color.dcm")
    out = load_study_image(rgb_path, "CXR")
    rgb = pydicom.dcmread(rgb_path).pixel_array
    assert out.shape == (1, rgb.shape[1], rgb.shape[0])
    np.testing.assert_allclose(out[0].numpy(), _as_wh(rgb @ LUMA), atol=1e-3)


def test_cxr_dicom_ybr_is_converted_to_rgb_first():
    # The test file's top band is pure red: RGB (254, 0, 0) -> gray 0.299 * 254 = 76. Applying the luma
    # weights to unconverted (Y, Cb, Cr) = (76, 85, 255) would give about 102.
    ybr = load_study_image(_pydicom_test_file("SC_ybr_full_422_uncompressed.dcm"), "CXR")
    assert abs(float(ybr[0, 0, 0]) - 0.299 * 254) < 3


def test_cxr_own_rgb_dicom(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    out = load_study_image(_dicom(tmp_path / "rgb.dcm", rgb), "CXR")
    np.testing.assert_allclose(out[0].numpy(), _as_wh(rgb @ LUMA), atol=1e-3)


def test_cxr_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        load_study_image(tmp_path / "bad.png", "CXR")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(ImageReadError, match=r"bad\.dcm"):
        load_study_image(tmp_path / "bad.dcm", "CXR")
    frames = np.zeros((2, 3, 4), np.uint8)
    path = _dicom(tmp_path / "mf.dcm", frames[0])
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    ds.save_as(str(path))
    with pytest.raises(ImageReadError, match=r"mf\.dcm.*multi-frame"):
        load_study_image(path, "CXR")
    with pytest.raises(ImageReadError, match=r"nope\.png.*not found"):
        load_study_image(tmp_path / "nope.png", "CXR")
    with pytest.raises(ImageReadError, match="folder"):
        load_study_image(tmp_path, "CXR")


def test_cxr_reader_plugs_into_load_imaged(tmp_path):
    from monai.transforms import LoadImaged

    pix = np.arange(20, dtype=np.uint8).reshape(4, 5)
    Image.fromarray(pix).save(tmp_path / "g.png")
    for reader in ("CXRReader", CXRReader(), CXRReader):
        d = LoadImaged("image", reader=reader, ensure_channel_first=True)({"image": str(tmp_path / "g.png")})
        assert d["image"].shape == (1, 5, 4)
        np.testing.assert_array_equal(d["image"][0].numpy(), _as_wh(pix))
    assert CXRReader().verify_suffix("a.dcm") and not CXRReader().verify_suffix("a.nii.gz")
