"""Builders of bad inputs, written into a folder (``tmp_path``): the catalogue of ``test_bad_input.py``.

Every builder takes the folder to write into and returns the path of what it wrote (a file, a DICOM
series folder or a ``datalist.json``). Nothing is committed: each input is a few kilobytes made on
the spot. Good inputs (:func:`good_ct`, :func:`good_cxr`, :func:`ct_series`) come along so that a
bad case can be put next to good ones (a batch, a datalist).

Geometry: CT volumes are ``CT_SHAPE`` voxels of ``CT_SPACING`` mm (``CT_AFFINE``, RAS), large
enough for a model with 8 mm spacing and 8-voxel patches; the DICOM series are 32 x 32 pixels of
4 mm, slices 8 mm apart, Modality CT unless told.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import signal
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_SHAPE = (32, 24, 24)
CT_SPACING = 4.0
CT_AFFINE = np.diag([CT_SPACING, CT_SPACING, CT_SPACING, 1.0])
CXR_SIZE = (64, 48)  # width, height
#: Size every "gigantic" header declares: 1e13 voxels (20 TB as int16).
GIANT_SHAPE = (100_000, 100_000, 1_000)

SLICE_GAP_MM = 8.0
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"


# --------------------------------------------------------------------------- writers
def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = CT_AFFINE, intent: str | None = None) -> Path:
    """Save ``data`` as NIfTI-1 at ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    if intent:
        img.header.set_intent(intent)
    nib.save(img, str(path))
    return path


def _body(shape: Sequence[int], seed: int) -> np.ndarray:
    """int16 HU: air around a noisy soft-tissue block (the body crop finds it)."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, dtype=np.int16)
    inner = tuple(slice(max(1, s // 6), s - max(1, s // 6)) for s in shape)
    vol[inner] = rng.integers(-100, 200, size=vol[inner].shape).astype(np.int16)
    return vol


def write_dicom(path: Path, pixels: np.ndarray, sop_class: str = CR_SOP_CLASS, **tags) -> Path:
    """Write an uncompressed single-frame DICOM (pydicom 2.4 and 3 compatible)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    if int(pydicom.__version__.split(".")[0]) < 3:
        ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = tags.pop("SeriesInstanceUID", generate_uid())
    ds.Modality = tags.pop("Modality", "CR")
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = tags.pop("PhotometricInterpretation", "RGB" if pixels.ndim == 3 else "MONOCHROME2")
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path))
    return path



def write_dicom_slice(path: Path, pixels: np.ndarray, modality: str = "CT", position: Sequence[float] | None = None,
                      series_uid: str | None = None, study_uid: str | None = None, instance: int = 1) -> Path:
    """One uncompressed 16-bit DICOM image (CT SOP class for CT/MR, CR otherwise); ``position`` adds
    ImagePositionPatient / ImageOrientationPatient (axial), PixelSpacing 4 mm."""
    tags: dict[str, Any] = {"Modality": modality, "InstanceNumber": instance, "PixelSpacing": [CT_SPACING, CT_SPACING],
                            "RescaleIntercept": 0, "RescaleSlope": 1}
    if series_uid:
        tags["SeriesInstanceUID"] = series_uid
    if study_uid:
        tags["StudyInstanceUID"] = study_uid
    if position is not None:
        tags.update(ImagePositionPatient=[float(v) for v in position], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    SliceThickness=SLICE_GAP_MM)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop = CT_SOP_CLASS if modality in ("CT", "MR") else CR_SOP_CLASS
    return write_dicom(path, pixels.astype(np.int16), sop, **tags)


def ct_series(folder: Path, z_positions: Sequence[float] | None = None, modality: str = "CT", size: int = 32) -> Path:
    """A DICOM series folder, one file per slice position (mm along z); default 8 evenly spaced slices."""
    zs = [k * SLICE_GAP_MM for k in range(8)] if z_positions is None else list(z_positions)
    series, study = generate_uid(), generate_uid()
    vol = _body((size, size, len(zs)), seed=3)
    for k, z in enumerate(zs):
        write_dicom_slice(folder / f"slice_{k:03d}.dcm", vol[:, :, k], modality, (0.0, 0.0, z), series, study, k + 1)
    return folder


def write_datalist(root: Path, splits: dict[str, list[dict[str, Any]]], catalog: dict | str, modality: str | None = None,
                   encoding: str = "utf-8") -> Path:
    """``root/datalist.json`` (and ``root/catalog.json`` when ``catalog`` is a dict) in ``encoding``."""
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(catalog, dict):
        (root / "catalog.json").write_text(json.dumps(catalog), encoding="utf-8")
        ref, modality = "catalog.json", modality or catalog["modality"]
    else:
        ref = catalog
    data = {"name": root.name, "modality": modality, "catalog": ref, **splits}
    path = root / "datalist.json"
    path.write_bytes(json.dumps(data, indent=1, ensure_ascii=False).encode(encoding))
    return path


# --------------------------------------------------------------------------- good inputs
def good_ct(folder: Path, name: str = "good", seed: int = 0) -> Path:
    """A valid CT volume."""
    return write_nifti(folder / f"{name}.nii.gz", _body(CT_SHAPE, seed))


def good_label_map(folder: Path, name: str = "good_mask", affine: np.ndarray = CT_AFFINE) -> Path:
    """A valid label map on the grid of :func:`good_ct` (label 1 in a block)."""
    lab = np.zeros(CT_SHAPE, dtype=np.uint8)
    lab[8:20, 6:16, 6:16] = 1
    return write_nifti(folder / f"{name}.nii.gz", lab, affine)


def good_cxr(folder: Path, name: str = "good", seed: int = 0) -> Path:
    """A valid 8-bit PNG radiograph."""
    w, h = CXR_SIZE
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------- empty, constant, non-finite
def empty_volume(folder: Path) -> Path:
    """A NIfTI whose first axis has size 0: no voxels at all."""
    return write_nifti(folder / "empty.nii.gz", np.zeros((0,) + CT_SHAPE[1:], dtype=np.int16))


def constant_volume(folder: Path) -> Path:
    """A CT volume whose every voxel is 0 HU."""
    return write_nifti(folder / "constant.nii.gz", np.zeros(CT_SHAPE, dtype=np.int16))


def constant_cxr(folder: Path) -> Path:
    """A PNG whose every pixel is 7."""
    w, h = CXR_SIZE
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), 7, dtype=np.uint8)).save(folder / "constant.png")
    return folder / "constant.png"


def nan_volume(folder: Path) -> Path:
    """A float32 CT volume with 2 NaN voxels."""
    vol = _body(CT_SHAPE, 1).astype(np.float32)
    vol[5, 5, 5] = vol[6, 6, 6] = np.nan
    return write_nifti(folder / "nan.nii.gz", vol)


def inf_volume(folder: Path) -> Path:
    """A float32 CT volume with one +Inf voxel."""
    vol = _body(CT_SHAPE, 2).astype(np.float32)
    vol[5, 5, 5] = np.inf
    return write_nifti(folder / "inf.nii.gz", vol)


# --------------------------------------------------------------------------- 4D / vector
def timeseries_4d(folder: Path) -> Path:
    """A 4D NIfTI: three time points of a CT volume."""
    vol = np.stack([_body(CT_SHAPE, s) for s in range(3)], axis=-1)
    return write_nifti(folder / "timeseries.nii.gz", vol)


def vector_nifti(folder: Path) -> Path:
    """A NIfTI vector image (x, y, z, 1, 3): three components per voxel."""
    vol = np.repeat(_body(CT_SHAPE, 0).astype(np.float32)[..., None, None], 3, axis=-1)
    return write_nifti(folder / "vector.nii.gz", vol, intent="vector")


def rgb_nifti(folder: Path) -> Path:
    """An RGB24 NIfTI (structured uint8 R, G, B voxels)."""
    rgb = np.zeros(CT_SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 200
    return write_nifti(folder / "rgb.nii.gz", rgb)


# --------------------------------------------------------------------------- wrong modality
def mr_series(folder: Path) -> Path:
    """A DICOM series of Modality MR (a valid volume, but not CT)."""
    return ct_series(folder / "mr_series", modality="MR")


def ct_dicom_file(folder: Path) -> Path:
    """One CT slice as a single DICOM file (what a CXR model must not take)."""
    return write_dicom_slice(folder / "ct_slice.dcm", _body((64, 64), 4), "CT", (0.0, 0.0, 0.0))


def ct_given_as_cxr(folder: Path) -> Path:
    """A CT NIfTI volume (what a CXR model must not take)."""
    return good_ct(folder, "volume")


# --------------------------------------------------------------------------- broken DICOM series
def missing_slice_series(folder: Path) -> Path:
    """8 slices 8 mm apart with the one at 32 mm missing (a 16 mm gap)."""
    return ct_series(folder / "missing_slice", [0, 8, 16, 24, 40, 48, 56, 64])


def duplicate_slice_series(folder: Path) -> Path:
    """8 slices, two of them at 16 mm."""
    return ct_series(folder / "duplicate_slice", [0, 8, 16, 16, 24, 32, 40, 48])


def irregular_series(folder: Path) -> Path:
    """8 slices whose spacing wanders between 7 and 9 mm."""
    return ct_series(folder / "irregular", [0, 8, 16, 25, 32, 40, 47, 56])


# --------------------------------------------------------------------------- smaller than a patch
def tiny_volume(folder: Path) -> Path:
    """A 3 x 3 x 3 CT volume of 1 mm voxels (the model's patch is 8 voxels of 8 mm)."""
    vol = np.random.default_rng(0).integers(-100, 200, (3, 3, 3)).astype(np.int16)
    return write_nifti(folder / "tiny.nii.gz", vol, np.eye(4))


def tiny_cxr(folder: Path) -> Path:
    """A 3 x 3 pixel PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3, 3), dtype=np.uint8)).save(folder / "tiny.png")
    return folder / "tiny.png"


# --------------------------------------------------------------------------- gigantic headers
def giant_nifti(folder: Path) -> Path:
    """A 1 kB ``.nii.gz`` whose NIfTI-2 header declares ``GIANT_SHAPE`` int16 voxels."""
    hdr = nib.Nifti2Header()
    hdr.set_data_shape(GIANT_SHAPE)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(CT_AFFINE, code=1)
    hdr.set_qform(CT_AFFINE, code=1)
    buf = io.BytesIO()
    hdr.write_to(buf)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "giant.nii.gz"
    path.write_bytes(gzip.compress(buf.getvalue() + b"\0" * 1024))
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def giant_png(folder: Path) -> Path:
    """A PNG of a few bytes whose IHDR declares 100000 x 100000 8-bit gray pixels."""
    w = h = GIANT_SHAPE[0]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "giant.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    )
    return path


# --------------------------------------------------------------------------- masks
def float_label_map(folder: Path) -> Path:
    """A float32 label map on the :func:`good_ct` grid holding 1.5 in one voxel (linear resampling)."""
    lab = np.zeros(CT_SHAPE, dtype=np.float32)
    lab[8:20, 6:16, 6:16] = 1.0
    lab[8, 6, 6] = 1.5
    return write_nifti(folder / "float_labels.nii.gz", lab)


def other_scan_mask(folder: Path) -> Path:
    """A label map of another scan: the :func:`good_label_map` block, 1000 mm away along x."""
    affine = CT_AFFINE.copy()
    affine[0, 3] = 1000.0
    return good_label_map(folder, "other_scan_mask", affine)


# --------------------------------------------------------------------------- text and datalists
#: A report with a character outside ASCII (é), so that its encoding matters.
ACCENTED_REPORT = "FINDINGS: The liver shows a hypodense lésion. The spleen is normal."


def datalist_in_encoding(root: Path, image: Path, catalog: dict | str, encoding: str) -> Path:
    """A one-record datalist whose report holds 'é', saved in ``encoding`` (``latin-1``, ``utf-16``,
    ``utf-8-sig``, ...)."""
    rec = {"id": "case_0", "image": str(image), "report": ACCENTED_REPORT}
    return write_datalist(root, {"training": [rec]}, catalog, encoding=encoding)


def mojibake_report() -> str:
    """A report decoded with the wrong encoding before it was written: Latin-1 bytes read as UTF-8
    with replacement characters."""
    return ACCENTED_REPORT.encode("latin-1").decode("utf-8", errors="replace")


class Hang(BaseException):
    """A fuzzing example ran past its time limit (a BaseException: a library catch-all must not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds``."""

    def _raise(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
