"""Image headers without voxels: shape, spacing and a RAS affine for every contract image format.

The validator (:mod:`anatomy_vlp_bundle.data.validate`) reads every image and mask of a datalist;
for tens of thousands of cases it must not decode voxels. :func:`read_header` reads only what the
format stores before its pixel data:

- NIfTI (``.nii``, ``.nii.gz``): nibabel (``nib.load`` reads the header; voxels stay on disk).
- NRRD / MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``): SimpleITK
  ``ImageFileReader.ReadImageInformation()``.
- DICOM series folder: SimpleITK's GDCM series file names, then pydicom with
  ``stop_before_pixels=True`` for tags and slice positions.
- single DICOM file (CXR): pydicom with ``stop_before_pixels=True``.
- PNG / JPEG: Pillow's lazy ``Image.open`` (size and mode; nothing is decoded).

Consumers refuse, from the header alone, images without voxels or larger than :func:`max_voxels`
(:func:`check_image_size`: a header that declares 100000 x 100000 x 1000 voxels is refused before
anything is allocated; PNG/JPEG meet Pillow's lower decompression-bomb limit, about 179 million
pixels, on opening), and DICOM series whose slices are duplicated or unevenly spaced
(:func:`slice_layout`).

Conventions (the same as nibabel and MONAI's ``LoadImage``):

- ``shape`` and ``spacing`` are in ITK/NIfTI index order ``(i, j[, k])``: ``i`` runs along an
  image row (columns, x), ``j`` down the rows (y), ``k`` over slices. For a 2D image ``shape`` is
  ``(width, height)``. (``numpy.asarray(PIL_image)`` and SimpleITK's ``GetArrayFromImage`` give
  the reverse order.)
- ``affine`` is a 4x4 matrix from voxel index ``(i, j, k, 1)`` to RAS world millimetres. ITK,
  SimpleITK and DICOM describe positions in LPS; they are converted here. 2D grids get a 4x4
  affine too (third axis of one voxel), so 2D and 3D geometry share one code path.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "HeaderError",
    "ImageHeader",
    "DicomInfo",
    "SliceLayout",
    "read_header",
    "slice_layout",
    "check_image_size",
    "max_voxels",
    "MAX_VOXELS",
    "MAX_VOXELS_ENV",
    "NON_RADIOGRAPH_MODALITIES",
    "image_kind",
    "itk_to_ras_affine",
    "world_bounds",
    "overlap_fraction",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "PNG_SUFFIXES",
    "JPEG_SUFFIXES",
    "DICOM_SUFFIXES",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")

# ITK/DICOM patient coordinates are LPS; RAS flips the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Pillow mode -> (numpy dtype name, number of channels). Modes absent here are not medical images.
_PIL_MODES = {
    "1": ("bool", 1),
    "L": ("uint8", 1),
    "P": ("uint8", 1),
    "LA": ("uint8", 2),
    "I": ("int32", 1),
    "I;16": ("uint16", 1),
    "I;16B": ("uint16", 1),
    "I;16L": ("uint16", 1),
    "I;16N": ("uint16", 1),
    "F": ("float32", 1),
    "RGB": ("uint8", 3),
    "RGBA": ("uint8", 4),
    "CMYK": ("uint8", 4),
    "YCbCr": ("uint8", 3),
}


#: Largest image the bundle reads, in voxels times components per voxel (1e9: e.g. 1024 x 1024 x 950,
#: 4 GB as float32). A header declaring more is refused before any voxel is read, by ``validate``,
#: ``infer``, ``infer-batch`` and the training loader alike; the environment variable
#: :data:`MAX_VOXELS_ENV` overrides it.
MAX_VOXELS = 1_000_000_000
MAX_VOXELS_ENV = "ANATOMY_VLP_MAX_VOXELS"

#: DICOM Modality values of volumes and non-image objects, never of a radiograph.
NON_RADIOGRAPH_MODALITIES = ("CT", "MR", "PT", "NM", "US", "SEG", "RTSTRUCT")

#: Two slices closer than this along the slice normal (mm) are at the same position.
_SAME_POSITION_MM = 1e-3


class HeaderError(ValueError):
    """An image whose header cannot be read; the message names the file and what is wrong."""


def max_voxels() -> int:
    """The image size limit: ``$ANATOMY_VLP_MAX_VOXELS`` when set (``2e9`` and ``2000000000`` both work),
    else :data:`MAX_VOXELS`.

    Raises:
        ValueError: the environment variable is set but is not a positive number.
    """
    value = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not value:
        return MAX_VOXELS
    try:
        limit = int(float(value))
    except (ValueError, OverflowError):
        raise ValueError(f"{MAX_VOXELS_ENV}={value!r} is not a number of voxels") from None
    if limit <= 0:
        raise ValueError(f"{MAX_VOXELS_ENV}={value!r}: the limit must be positive")
    return limit


def check_image_size(path: str | Path, shape, n_components: int = 1) -> None:
    """Refuse an image, from its header, that has no voxels or more than :func:`max_voxels`.

    Args:
        path: the file (named in the message).
        shape: the spatial size the header declares (any number of axes).
        n_components: values per voxel (3 for RGB).

    Raises:
        HeaderError: naming the file, the declared size and the limit.
    """
    dims = [int(s) for s in shape]
    size = " x ".join(str(s) for s in dims)
    if not dims or any(s <= 0 for s in dims):
        raise HeaderError(f"{path}: empty image: its header gives size {size or '()'}, which holds no voxels")
    n = math.prod(dims) * max(int(n_components), 1)  # Python ints: no overflow
    limit = max_voxels()
    if n > limit:
        comps = f" x {n_components} components" if n_components > 1 else ""
        raise HeaderError(
            f"{path}: its header declares {size}{comps} = {n:.3g} voxels, more than the limit of {limit:,} "
            f"(set {MAX_VOXELS_ENV} to allow larger images); refused before reading any voxel"
        )


@dataclass(frozen=True)
class SliceLayout:
    """Where the slices of a DICOM series lie along their normal.

    Attributes:
        order: file indices sorted along the slice normal.
        positions: the slice positions along the normal, sorted (mm).
        spacing: median distance between consecutive distinct positions (mm); ``None`` when the
            series has fewer than two distinct positions.
        duplicates: slices at a position another slice already has (two series mixed, repeated slices).
        irregular: the distances between consecutive distinct positions differ from ``spacing``
            by more than 1% (missing slices, inconsistent spacing).
    """

    order: tuple[int, ...]
    positions: tuple[float, ...]
    spacing: float | None
    duplicates: int
    irregular: bool

    def gaps(self) -> np.ndarray:
        """Distances between consecutive distinct positions (mm)."""
        gaps = np.diff(np.asarray(self.positions, dtype=float))
        return gaps[np.abs(gaps) >= _SAME_POSITION_MM]

    def first_duplicate(self) -> tuple[int, int] | None:
        """File indices of the first two slices at the same position, or None."""
        for k in range(len(self.positions) - 1):
            if abs(self.positions[k + 1] - self.positions[k]) < _SAME_POSITION_MM:
                return self.order[k], self.order[k + 1]
        return None

    def describe_gaps(self) -> str:
        """``"gaps 2.00 to 6.00 mm, median 2.00 mm"``."""
        gaps = self.gaps()
        if gaps.size == 0:
            return "no gaps"
        return f"gaps {gaps.min():.2f} to {gaps.max():.2f} mm, median {self.spacing:.2f} mm"


def slice_layout(positions, orientation) -> SliceLayout:
    """Sort DICOM slices along their normal and check their spacing.

    Args:
        positions: ``(N, 3)`` ImagePositionPatient of each file (LPS mm).
        orientation: the six ImageOrientationPatient values (row then column direction cosines).

    Returns:
        :class:`SliceLayout`.
    """
    orient = np.asarray(orientation, dtype=float)
    normal = np.cross(orient[:3], orient[3:])
    proj = np.asarray(positions, dtype=float).reshape(-1, 3) @ normal
    order = np.argsort(proj, kind="stable")
    proj = proj[order]
    gaps = np.diff(proj)
    same = np.abs(gaps) < _SAME_POSITION_MM
    real_gaps = gaps[~same]
    spacing = float(np.median(real_gaps)) if real_gaps.size else None
    irregular = bool(real_gaps.size > 1 and np.max(np.abs(real_gaps - spacing)) > 0.01 * abs(spacing) + 1e-4)
    return SliceLayout(
        order=tuple(int(i) for i in order),
        positions=tuple(float(p) for p in proj),
        spacing=spacing,
        duplicates=int(same.sum()),
        irregular=irregular,
    )


@dataclass(frozen=True)
class DicomInfo:
    """DICOM tags the validator checks (from the first file of a series, or the single file).

    Attributes:
        modality: the Modality tag (``CT``, ``CR``, ``DX``, ...) or ``""`` when absent.
        photometric: PhotometricInterpretation (``MONOCHROME1``, ``MONOCHROME2``, ``RGB``, ...).
        bits_allocated: BitsAllocated (8, 16, 32).
        rows, columns: Rows and Columns.
        n_files: DICOM files of the series (1 for a single file).
        n_positions: distinct slice positions along the slice normal (0 when the files carry none).
        duplicate_positions: files whose slice position another file already has (two series
            mixed in one folder, or repeated slices).
        irregular_spacing: the gaps between consecutive slice positions differ by more than 1%
            (missing slices).
        gap_range: smallest and largest gap between consecutive distinct slice positions (mm), None
            without positions or with fewer than two.
        files: the series files sorted along the slice normal.
    """

    modality: str = ""
    photometric: str = ""
    bits_allocated: int = 0
    rows: int = 0
    columns: int = 0
    n_files: int = 1
    n_positions: int = 0
    duplicate_positions: int = 0
    irregular_spacing: bool = False
    gap_range: tuple[float, float] | None = None
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageHeader:
    """What an image file says about its grid, without its voxels.

    Attributes:
        path: the file (or DICOM series folder).
        kind: ``nifti``, ``nrrd``, ``metaimage``, ``dicom_series``, ``dicom``, ``png`` or ``jpeg``.
        shape: spatial size in index order ``(i, j[, k])`` (trailing singleton axes dropped, so a
            one-slice volume has ``ndim == 2``).
        spacing: voxel size along each axis of ``shape`` in mm (1.0 where the file gives none).
        affine: 4x4 voxel index -> RAS world mm (numpy float64).
        ndim: number of spatial axes (``len(shape)``).
        n_components: channels per voxel (1 gray, 3 RGB, 4 RGBA, ...).
        dtype: numpy dtype name of the stored values.
        has_geometry: the file places the grid in patient space (NIfTI, NRRD, MHA, DICOM with
            position and orientation). PNG/JPEG and projection radiographs have no usable world
            position: masks must then match their pixel size.
        dicom: DICOM tags, for ``dicom`` and ``dicom_series`` only.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray = field(repr=False, compare=False)
    ndim: int
    n_components: int
    dtype: str
    has_geometry: bool
    dicom: DicomInfo | None = None

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        out = {
            "path": self.path,
            "kind": self.kind,
            "shape": list(self.shape),
            "spacing": [float(s) for s in self.spacing],
            "affine": np.asarray(self.affine, dtype=float).tolist(),
            "ndim": self.ndim,
            "n_components": self.n_components,
            "dtype": self.dtype,
            "has_geometry": self.has_geometry,
        }
        if self.dicom is not None:
            d = self.dicom
            out["dicom"] = {
                "modality": d.modality,
                "photometric": d.photometric,
                "bits_allocated": d.bits_allocated,
                "n_files": d.n_files,
                "n_positions": d.n_positions,
                "duplicate_positions": d.duplicate_positions,
                "irregular_spacing": d.irregular_spacing,
                "gap_range": list(d.gap_range) if d.gap_range else None,
            }
        return out


# --------------------------------------------------------------------------- pure geometry
def itk_to_ras_affine(direction, spacing, origin) -> np.ndarray:
    """4x4 RAS affine of an ITK grid (ITK direction/origin are LPS).

    Args:
        direction: ``D*D`` direction cosines, row-major as SimpleITK returns them (D = 2 or 3).
        spacing: ``D`` voxel sizes (mm).
        origin: ``D`` world position (LPS mm) of voxel ``(0, 0[, 0])``'s centre.

    Returns:
        ``(4, 4)`` float64 matrix; a 2D grid gets an identity third axis.
    """
    dim = len(spacing)
    d = np.eye(3)
    d[:dim, :dim] = np.asarray(direction, dtype=float).reshape(dim, dim)
    s = np.ones(3)
    s[:dim] = np.asarray(spacing, dtype=float)
    o = np.zeros(3)
    o[:dim] = np.asarray(origin, dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = d * s[None, :]  # column c of the direction matrix is axis c's world direction
    lps[:3, 3] = o
    return _LPS_TO_RAS @ lps


def world_bounds(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world box spanned by a grid's voxel *edges*.

    Args:
        shape: spatial size ``(i, j[, k])``; missing axes count as one voxel.
        affine: ``(4, 4)`` voxel index -> world matrix.

    Returns:
        ``(lo, hi)``, two ``(3,)`` arrays in world mm (the box of the grid's 8 edge corners).
    """
    n = np.ones(3)
    n[: len(shape)] = np.asarray(shape, dtype=float)[:3]
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=float)
    idx = corners * n[None, :] - 0.5  # voxel centres sit at integer indices, edges at +-0.5
    world = idx @ np.asarray(affine, dtype=float)[:3, :3].T + np.asarray(affine, dtype=float)[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def overlap_fraction(inner: tuple[np.ndarray, np.ndarray], outer: tuple[np.ndarray, np.ndarray]) -> float:
    """Fraction of box ``inner``'s volume that lies inside box ``outer`` (both ``(lo, hi)``)."""
    lo = np.maximum(inner[0], outer[0])
    hi = np.minimum(inner[1], outer[1])
    inter = np.prod(np.clip(hi - lo, 0.0, None))
    vol = np.prod(np.clip(inner[1] - inner[0], 0.0, None))
    return float(inter / vol) if vol > 0 else 0.0


# --------------------------------------------------------------------------- format detection
def _has_suffix(name: str, suffixes) -> bool:
    name = name.lower()
    return any(name.endswith(s) for s in suffixes)


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file has ``DICM`` after its 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def image_kind(path: str | Path) -> str:
    """Format of ``path`` from its name (and DICOM magic bytes for other names).

    Returns one of ``nifti``, ``nrrd``, ``metaimage``, ``dicom_series`` (a folder), ``dicom``,
    ``png``, ``jpeg``, or ``unknown``.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom_series"
    name = p.name
    if _has_suffix(name, NIFTI_SUFFIXES):
        return "nifti"
    if _has_suffix(name, (".nrrd", ".nhdr")):
        return "nrrd"
    if _has_suffix(name, (".mha", ".mhd")):
        return "metaimage"
    if _has_suffix(name, PNG_SUFFIXES):
        return "png"
    if _has_suffix(name, JPEG_SUFFIXES):
        return "jpeg"
    if _has_suffix(name, DICOM_SUFFIXES) or _looks_like_dicom(p):
        return "dicom"
    return "unknown"


def _strip_trailing_ones(shape) -> tuple[int, ...]:
    """Drop trailing singleton axes (a one-slice volume is 2D) but keep at least two axes."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


# --------------------------------------------------------------------------- readers
def read_header(path: str | Path, modality: str | None = None) -> ImageHeader:
    """Read an image's header (never its voxels).

    Args:
        path: image file, or a folder holding one DICOM series.
        modality: ``CT`` or ``CXR`` when known; only used to make error messages clearer.

    Returns:
        :class:`ImageHeader` (see the module docstring for axis and affine conventions).

    Raises:
        HeaderError: the file is missing, of an unsupported format, or its header is unreadable;
            the message names the file.
    """
    p = Path(path)
    what = f"{modality} image" if modality else "image"
    if not p.exists():
        raise HeaderError(f"{p}: file not found")
    kind = image_kind(p)
    try:
        if kind == "nifti":
            return _nifti_header(p)
        if kind in ("nrrd", "metaimage"):
            return _itk_header(p, kind)
        if kind == "dicom_series":
            return _dicom_series_header(p)
        if kind == "dicom":
            return _dicom_file_header(p)
        if kind in ("png", "jpeg"):
            return _pil_header(p, kind)
    except HeaderError:
        raise
    except Exception as e:  # a library error from deep inside: name the file and the format
        raise HeaderError(f"{p}: cannot read the {kind} header of this {what} ({type(e).__name__}: {e})") from e
    raise HeaderError(
        f"{p}: unsupported {what} format (expected NIfTI .nii/.nii.gz, NRRD, MHA/MHD, a DICOM series "
        f"folder, DICOM, PNG or JPEG)"
    )


def _nifti_header(p: Path) -> ImageHeader:
    import nibabel as nib

    img = nib.load(str(p))  # header only: voxels stay in the (lazy) dataobj
    hdr = img.header
    full_shape = tuple(int(s) for s in hdr.get_data_shape())
    dtype = hdr.get_data_dtype()
    n_comp = len(dtype.names) if dtype.names else 1  # RGB24 / RGBA32 NIfTI are structured dtypes
    if len(full_shape) == 5 and full_shape[3] == 1:  # NIfTI vector images: (x, y, z, 1, c)
        n_comp *= full_shape[4]
        full_shape = full_shape[:3]
    shape = _strip_trailing_ones(full_shape)
    if len(shape) < 2:
        shape = shape + (1,) * (2 - len(shape))
    zooms = tuple(float(z) for z in hdr.get_zooms()[: len(shape)])
    # An uncompressed .nii shorter than its header promises is truncated; checking it costs a stat.
    if p.name.lower().endswith(".nii"):
        need = int(hdr.get_data_offset()) + int(np.prod(full_shape)) * dtype.itemsize
        have = p.stat().st_size
        if have < need:
            raise HeaderError(f"{p}: truncated NIfTI file ({have} bytes, its header needs {need})")
    return ImageHeader(
        path=str(p),
        kind="nifti",
        shape=shape,
        spacing=zooms,
        affine=np.asarray(img.affine, dtype=float),
        ndim=len(shape),
        n_components=n_comp,
        dtype=str(dtype if not dtype.names else "uint8"),
        has_geometry=True,
    )


def _detached_data_file(p: Path) -> Path | None:
    """The voxel file named by a detached header (``.mhd`` ElementDataFile, ``.nhdr`` data file)."""
    text = p.read_bytes()[:65536].decode("latin-1", errors="replace")
    if p.name.lower().endswith(".mhd"):
        m = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
        if m and m.group(1) not in ("LOCAL",) and not m.group(1).startswith("LIST") and "%" not in m.group(1):
            return p.parent / m.group(1)
    elif p.name.lower().endswith(".nhdr"):
        m = re.search(r"^\s*data ?file\s*:\s*(.+?)\s*$", text, re.MULTILINE | re.IGNORECASE)
        if m and not m.group(1).startswith("LIST") and "%" not in m.group(1):
            return p.parent / m.group(1)
    return None


def _itk_header(p: Path, kind: str) -> ImageHeader:
    import SimpleITK as sitk

    data_file = _detached_data_file(p) if p.name.lower().endswith((".mhd", ".nhdr")) else None
    if data_file is not None and not data_file.exists():
        raise HeaderError(f"{p}: its voxel file {data_file} is missing")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()
    size = tuple(int(s) for s in reader.GetSize())
    dim = len(size)
    if dim > 3:
        raise HeaderError(f"{p}: {dim}D image (size {size}); contract images are 2D or 3D")
    affine = itk_to_ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
    shape = _strip_trailing_ones(size)
    spacing = tuple(float(s) for s in reader.GetSpacing()[: len(shape)])
    return ImageHeader(
        path=str(p),
        kind=kind,
        shape=shape,
        spacing=spacing,
        affine=affine,
        ndim=len(shape),
        n_components=int(reader.GetNumberOfComponents()),
        dtype=_sitk_dtype_name(reader.GetPixelID()),
        has_geometry=True,
    )


def _sitk_dtype_name(pixel_id: int) -> str:
    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(pixel_id)  # e.g. "16-bit signed integer", "vector of 8-bit unsigned integer"
    table = {
        "8-bit unsigned integer": "uint8",
        "8-bit signed integer": "int8",
        "16-bit unsigned integer": "uint16",
        "16-bit signed integer": "int16",
        "32-bit unsigned integer": "uint32",
        "32-bit signed integer": "int32",
        "64-bit unsigned integer": "uint64",
        "64-bit signed integer": "int64",
        "32-bit float": "float32",
        "64-bit float": "float64",
    }
    base = name.replace("vector of ", "")
    return table.get(base, name)


def _ds_get(ds, keyword: str, default=None):
    value = ds.get(keyword, default)
    return default if value is None or value == "" else value


def _dicom_series_header(folder: Path) -> ImageHeader:
    import pydicom
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise HeaderError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise HeaderError(
            f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series[:3])}"
            f"{', ...' if len(series) > 3 else ''}); an image folder must hold exactly one series"
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    if not files:
        raise HeaderError(f"{folder}: no readable files in DICOM series {series[0]}")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    rows, cols = int(_ds_get(first, "Rows", 0)), int(_ds_get(first, "Columns", 0))
    tags = ["ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"]
    positions, orient = [], None
    for f in files:
        ds = first if f == files[0] else pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
        if (int(_ds_get(ds, "Rows", rows)), int(_ds_get(ds, "Columns", cols))) != (rows, cols):
            raise HeaderError(
                f"{folder}: slices differ in size ({Path(files[0]).name} is {rows}x{cols}, "
                f"{Path(f).name} is {_ds_get(ds, 'Rows')}x{_ds_get(ds, 'Columns')})"
            )
        ipp, iop = _ds_get(ds, "ImagePositionPatient"), _ds_get(ds, "ImageOrientationPatient")
        if ipp is None or iop is None:
            positions = None
            break
        if orient is None:
            orient = np.asarray([float(v) for v in iop], dtype=float)
        positions.append([float(v) for v in ipp])

    ps = _ds_get(first, "PixelSpacing") or _ds_get(first, "ImagerPixelSpacing") or [1.0, 1.0]
    d_row, d_col = float(ps[0]), float(ps[1])  # PixelSpacing = (between rows, between columns)
    n = len(files)
    dup = 0
    irregular = False
    gap_range = None
    n_pos = 0
    has_geometry = positions is not None and orient is not None and orient.size == 6
    sorted_files = tuple(files)
    if has_geometry:
        row_dir, col_dir = orient[:3], orient[3:]
        normal = np.cross(row_dir, col_dir)
        layout = slice_layout(positions, orient)
        pos = np.asarray(positions)[list(layout.order)]
        sorted_files = tuple(files[i] for i in layout.order)
        dup = layout.duplicates
        n_pos = n - dup
        irregular = layout.irregular
        gaps = layout.gaps()
        gap_range = (float(gaps.min()), float(gaps.max())) if gaps.size else None
        dz = layout.spacing if layout.spacing is not None else float(_ds_get(first, "SliceThickness", 1.0) or 1.0)
        lps = np.eye(4)
        lps[:3, 0] = row_dir * d_col  # index i walks along a row: one column step
        lps[:3, 1] = col_dir * d_row  # index j walks down a column: one row step
        lps[:3, 2] = normal * dz
        lps[:3, 3] = pos[0]
        affine = _LPS_TO_RAS @ lps
    else:
        dz = float(_ds_get(first, "SpacingBetweenSlices", 0) or _ds_get(first, "SliceThickness", 1.0) or 1.0)
        affine = _LPS_TO_RAS @ np.diag([d_col, d_row, dz, 1.0])
    shape = _strip_trailing_ones((cols, rows, n))
    spacing = (d_col, d_row, dz)[: len(shape)]
    samples = int(_ds_get(first, "SamplesPerPixel", 1))
    bits = int(_ds_get(first, "BitsAllocated", 0))
    signed = int(_ds_get(first, "PixelRepresentation", 0)) == 1
    return ImageHeader(
        path=str(folder),
        kind="dicom_series",
        shape=shape,
        spacing=spacing,
        affine=affine,
        ndim=len(shape),
        n_components=samples,
        dtype=f"{'int' if signed else 'uint'}{bits}" if bits else "unknown",
        has_geometry=has_geometry,
        dicom=DicomInfo(
            modality=str(_ds_get(first, "Modality", "")),
            photometric=str(_ds_get(first, "PhotometricInterpretation", "")),
            bits_allocated=bits,
            rows=rows,
            columns=cols,
            n_files=n,
            n_positions=n_pos,
            duplicate_positions=dup,
            irregular_spacing=irregular,
            gap_range=gap_range,
            files=sorted_files,
        ),
    )


def _dicom_file_header(p: Path) -> ImageHeader:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
    except InvalidDicomError as e:
        raise HeaderError(f"{p}: not a DICOM file ({e})") from None
    rows, cols = int(_ds_get(ds, "Rows", 0)), int(_ds_get(ds, "Columns", 0))
    if not rows or not cols:
        raise HeaderError(f"{p}: DICOM file without an image (no Rows/Columns)")
    frames = int(_ds_get(ds, "NumberOfFrames", 1) or 1)
    ps = _ds_get(ds, "PixelSpacing") or _ds_get(ds, "ImagerPixelSpacing")
    d_row, d_col = (float(ps[0]), float(ps[1])) if ps else (1.0, 1.0)
    shape = _strip_trailing_ones((cols, rows, frames))
    # Projection radiographs carry no patient-space position: their grid cannot be placed in the
    # world, so masks are compared by pixel size (as for PNG).
    affine = _LPS_TO_RAS @ np.diag([d_col, d_row, 1.0, 1.0])
    bits = int(_ds_get(ds, "BitsAllocated", 0))
    signed = int(_ds_get(ds, "PixelRepresentation", 0)) == 1
    return ImageHeader(
        path=str(p),
        kind="dicom",
        shape=shape,
        spacing=(d_col, d_row, 1.0)[: len(shape)],
        affine=affine,
        ndim=len(shape),
        n_components=int(_ds_get(ds, "SamplesPerPixel", 1)),
        dtype=f"{'int' if signed else 'uint'}{bits}" if bits else "unknown",
        has_geometry=False,
        dicom=DicomInfo(
            modality=str(_ds_get(ds, "Modality", "")),
            photometric=str(_ds_get(ds, "PhotometricInterpretation", "")),
            bits_allocated=bits,
            rows=rows,
            columns=cols,
            n_files=1,
            n_positions=0,
            files=(str(p),),
        ),
    )


def _pil_header(p: Path, kind: str) -> ImageHeader:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:  # lazy: reads the header chunks, decodes nothing
            size, mode, fmt = im.size, im.mode, im.format
    except UnidentifiedImageError:
        raise HeaderError(f"{p}: not a readable {kind.upper()} image") from None
    except Image.DecompressionBombError as e:  # Pillow's own, lower, size limit: checked on opening
        raise HeaderError(f"{p}: {e}; refused before reading any pixel") from None
    dtype, n_comp = _PIL_MODES.get(mode, (f"PIL mode {mode}", len(mode)))
    return ImageHeader(
        path=str(p),
        kind="png" if fmt == "PNG" else "jpeg" if fmt == "JPEG" else (fmt or kind).lower(),
        shape=(int(size[0]), int(size[1])),
        spacing=(1.0, 1.0),
        affine=np.eye(4),
        ndim=2,
        n_components=n_comp,
        dtype=dtype if mode in _PIL_MODES else f"PIL mode {mode}",
        has_geometry=False,
    )
