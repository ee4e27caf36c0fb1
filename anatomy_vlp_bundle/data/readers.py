"""Image readers: CT volumes and chest radiographs as channel-first MONAI ``MetaTensor`` objects.

CT (3D): NIfTI (``.nii``, ``.nii.gz``, read by MONAI's ``NibabelReader``), NRRD, MHA/MHD and DICOM
series folders (MONAI's ``ITKReader``). Every CT arrives as a ``(1, X, Y, Z)`` float32
``MetaTensor`` in HU whose ``affine`` maps voxel indices to RAS millimetres (nibabel's index order
for NIfTI; for a DICOM series, slices ordered along the slice normal).

CXR (2D): PNG, JPEG and DICOM through :class:`CXRReader`, a MONAI ``ImageReader`` usable as
``LoadImaged(keys, reader=CXRReader())`` (or ``reader="CXRReader"`` once this module is imported).
Every CXR arrives as a ``(1, W, H)`` float32 ``MetaTensor``: MONAI's 2D convention (spatial axis 0 is
x = column, axis 1 is y = row, as ``PILReader(reverse_indexing=True)`` gives), gray, raw stored values
(MONOCHROME1 inverted), with an ``affine`` ``diag(sx, sy, 1, 1)`` carrying the pixel spacing in mm
(1 when the file has none; ``meta["spacing_known"]`` says which).

Bad input raises :class:`ImageReadError`, whose message names the file and what is wrong. Before any
voxel is decoded the header is checked: no voxels, more than
:func:`~anatomy_vlp_bundle.data.headers.max_voxels`, or (CT) not a single-channel 3D volume; a DICOM
series must hold one series whose slices are neither duplicated nor unevenly spaced (ITK would read
them onto a stretched grid). Decoded study images must hold finite values (no NaN or Inf voxels).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import ImageReader, MetaTensor
from monai.utils import MetaKeys

from .headers import HeaderError, check_image_size, read_header, slice_layout

__all__ = [
    "ImageReadError",
    "CXRReader",
    "load_study_image",
    "load_mask_image",
    "check_ct_dicom_series",
    "image_format",
    "unwrap_transform_error",
    "NIFTI_SUFFIXES",
    "CT_FILE_SUFFIXES",
    "CXR_SUFFIXES",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: CT formats read from a single file (a DICOM series is a folder).
CT_FILE_SUFFIXES = NIFTI_SUFFIXES + (".nrrd", ".nhdr", ".mha", ".mhd")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
CXR_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES

#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses), for RGB -> gray.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem."""


def unwrap_transform_error(error: BaseException) -> BaseException:
    """The exception behind MONAI's ``RuntimeError("applying transform <...>")`` wrappers.

    MONAI's ``apply_transform`` re-raises any failure inside a transform chain as a ``RuntimeError``
    naming only the transform object (once per nesting level), with the original as ``__cause__``.
    The original names the file and the problem (an :class:`ImageReadError`, ...): report that one.
    """
    while (
        isinstance(error, RuntimeError)
        and str(error).startswith("applying transform")
        and isinstance(error.__cause__, Exception)
    ):
        error = error.__cause__
    return error


# --------------------------------------------------------------------------------------------- helpers
def _suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def image_format(path: str | Path) -> str:
    """The storage format of ``path``: ``"dicom_series"`` (a folder), ``"nifti"``, ``"itk"`` (NRRD/MHA/MHD),
    ``"pil"`` (PNG/JPEG), ``"dicom"`` (a DICOM file, by suffix or by its ``DICM`` preamble) or ``"unknown"``."""
    p = Path(path)
    if p.is_dir():
        return "dicom_series"
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return "itk"
    if suffix in PIL_SUFFIXES:
        return "pil"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if p.is_file():
        from pydicom.misc import is_dicom

        try:
            if is_dicom(str(p)):
                return "dicom"
        except OSError:
            pass
    return "unknown"


def _pydicom_major() -> int:
    import pydicom

    return int(str(pydicom.__version__).split(".")[0])


def _pixel_helpers():
    """``apply_modality_lut``, ``apply_color_lut``, ``convert_color_space`` for pydicom 3 and 2.4."""
    try:  # pydicom >= 3
        from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, convert_color_space
    return apply_modality_lut, apply_color_lut, convert_color_space


def _to_gray(arr: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) with C in 1..4 -> (H, W) float32; colour by BT.601 luma, alpha dropped."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return arr.astype(np.float32, copy=False)
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):  # L or LA: the first channel is the gray value
        return arr[..., 0].astype(np.float32)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB or RGBA
        return arr[..., :3].astype(np.float32) @ _LUMA
    raise ValueError(f"unsupported pixel array shape {arr.shape} (expected a gray, RGB or RGBA image)")


def _positive_spacing(value: Any) -> tuple[float, float] | None:
    """DICOM ``PixelSpacing`` ``[row spacing, column spacing]`` -> ``(sx, sy)`` in mm, None if unusable."""
    try:
        row_mm, col_mm = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(row_mm) and np.isfinite(col_mm)) or row_mm <= 0 or col_mm <= 0:
        return None
    return col_mm, row_mm  # x = column direction, y = row direction


class _CXRImage:
    """A decoded radiograph: gray pixels as stored, ``(H, W)`` (row-major), plus its spacing and header facts."""

    def __init__(self, pixels: np.ndarray, spacing: tuple[float, float] | None, info: dict[str, Any]):
        self.pixels = pixels
        self.spacing = spacing
        self.info = info


# --------------------------------------------------------------------------------------------- CXR
class CXRReader(ImageReader):
    """MONAI ``ImageReader`` for chest radiographs: PNG, JPEG and single-frame DICOM.

    8- or 16-bit, grayscale, RGB or RGBA (converted to gray with BT.601 luma weights, alpha dropped);
    DICOM palette colour is expanded, YBR converted to RGB, the modality LUT (rescale slope/intercept)
    applied and MONOCHROME1 inverted (``max + min - value``) so that bright always means dense.
    Pixel spacing comes from DICOM ``PixelSpacing``, else ``ImagerPixelSpacing``; missing, zero or
    malformed values give spacing 1 and ``meta["spacing_known"] = False`` (PNG/JPEG always have no
    usable spacing).

    ``get_data`` returns an array ``(W, H)`` (axis 0 = x = column, axis 1 = y = row; with
    ``reverse_indexing=False`` the stored ``(H, W)`` order) and a meta dict with ``affine`` =
    ``original_affine`` = ``diag(sx, sy, 1, 1)``, ``spatial_shape``, ``spacing`` and ``spacing_known``.
    Intensities are not rescaled here (that is the pipeline's job).

    Args:
        reverse_indexing: put x (columns) on axis 0 as MONAI's ``PILReader`` does (default True).
        invert_monochrome1: invert MONOCHROME1 DICOMs (True for images; masks pass False).
    """

    def __init__(self, reverse_indexing: bool = True, invert_monochrome1: bool = True):
        super().__init__()
        self.reverse_indexing = reverse_indexing
        self.invert_monochrome1 = invert_monochrome1

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return bool(names) and all(image_format(n) in ("pil", "dicom") for n in names)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> _CXRImage | list[_CXRImage]:
        names = [data] if isinstance(data, (str, Path)) else list(data)
        images = [self._read_one(Path(n)) for n in names]
        return images[0] if len(images) == 1 else images

    def get_data(self, img: _CXRImage | Sequence[_CXRImage]) -> tuple[np.ndarray, dict]:
        images = [img] if isinstance(img, _CXRImage) else list(img)
        arrays, meta = [], {}
        for i, im in enumerate(images):
            arr = np.ascontiguousarray(im.pixels.T) if self.reverse_indexing else im.pixels
            arrays.append(arr)
            if i == 0:
                known = im.spacing is not None
                sx, sy = im.spacing if known else (1.0, 1.0)
                if not self.reverse_indexing:
                    sx, sy = sy, sx
                affine = np.diag([sx, sy, 1.0, 1.0])
                meta = dict(im.info)
                meta.update(
                    {
                        "spacing": np.array([sx, sy]),
                        "spacing_known": known,
                        MetaKeys.ORIGINAL_AFFINE: affine,
                        MetaKeys.AFFINE: affine.copy(),
                        MetaKeys.SPATIAL_SHAPE: np.array(arr.shape),
                        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
                    }
                )
            elif arr.shape != arrays[0].shape:
                raise ImageReadError(f"images stacked as channels differ in size: {arrays[0].shape} vs {arr.shape}")
        if len(arrays) == 1:
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta

    # ------------------------------------------------------------------ decoding
    def _read_one(self, path: Path) -> _CXRImage:
        if path.is_dir():
            raise ImageReadError(f"{path}: is a folder; a CXR image must be one PNG, JPEG or DICOM file")
        if not path.is_file():
            raise ImageReadError(f"{path}: file not found")
        fmt = image_format(path)
        if fmt == "pil":
            return self._read_pil(path)
        if fmt == "dicom":
            return self._read_dicom(path)
        raise ImageReadError(f"{path}: not a PNG, JPEG or DICOM file (suffix {_suffix(path) or 'none'})")

    def _read_pil(self, path: Path) -> _CXRImage:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                mode = im.mode
                if mode == "P":  # palette: expand to its colours (keeping transparency as alpha)
                    im = im.convert("RGBA")
                elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                    im = im.convert("L" if mode == "1" else "RGB")
                arr = np.asarray(im)
        except UnidentifiedImageError:
            raise ImageReadError(f"{path}: not a readable PNG/JPEG image") from None
        except OSError as e:
            raise ImageReadError(f"{path}: cannot decode image ({e})") from None
        try:
            pixels = _to_gray(arr)
        except ValueError as e:
            raise ImageReadError(f"{path}: {e}") from None
        info = {"format": "PNG" if _suffix(path) == ".png" else "JPEG", "mode": mode, "bits": 16 if arr.dtype.itemsize == 2 else 8 * arr.dtype.itemsize}
        return _CXRImage(pixels, None, info)

    def _read_dicom(self, path: Path) -> _CXRImage:
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(str(path))
        except InvalidDicomError:
            raise ImageReadError(f"{path}: not a DICOM file (no DICM preamble)") from None
        except Exception as e:  # truncated or malformed files
            raise ImageReadError(f"{path}: cannot parse DICOM ({type(e).__name__}: {e})") from None
        if "PixelData" not in ds:
            raise ImageReadError(f"{path}: DICOM without pixel data (Modality {ds.get('Modality', '?')})")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ImageReadError(f"{path}: multi-frame DICOM ({frames} frames); a CXR must be a single 2D image")
        try:
            arr = ds.pixel_array
        except Exception as e:  # no decoder for the transfer syntax, corrupt data
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            raise ImageReadError(f"{path}: cannot decode DICOM pixel data (transfer syntax {ts}: {e})") from None
        apply_modality_lut, apply_color_lut, convert_color_space = _pixel_helpers()
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        try:
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
            elif samples == 3 and photometric.startswith("YBR") and _pydicom_major() < 3:
                arr = convert_color_space(arr, photometric, "RGB")  # pydicom 3 already returns RGB
            elif samples == 1:
                arr = apply_modality_lut(arr, ds)
            pixels = _to_gray(arr)
        except ValueError as e:
            raise ImageReadError(f"{path}: {e}") from None
        if photometric == "MONOCHROME1" and self.invert_monochrome1 and pixels.size:
            # MONOCHROME1 stores dense (bright on film) as low values: flip within the image's own range.
            pixels = pixels.max() + pixels.min() - pixels
        spacing = _positive_spacing(ds.get("PixelSpacing")) or _positive_spacing(ds.get("ImagerPixelSpacing"))
        info = {
            "format": "DICOM",
            "photometric_interpretation": photometric,
            "bits": int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8),
            "dicom_modality": str(ds.get("Modality", "")),
        }
        return _CXRImage(pixels.astype(np.float32, copy=False), spacing, info)


def _register_cxr_reader() -> None:
    # LoadImage(reader="CXRReader") looks string names up in SUPPORTED_READERS (lower-cased); adding our
    # reader there (not to the auto-selection order of other users) makes the name usable in configs.
    from monai.transforms.io import array as io_array

    io_array.SUPPORTED_READERS.setdefault("cxrreader", CXRReader)


_register_cxr_reader()


# --------------------------------------------------------------------------------------------- CT
def check_ct_dicom_series(folder: str | Path, required_modality: str | None = "CT") -> dict[str, Any]:
    """Check a DICOM series folder from its headers (pixels are not read).

    Args:
        folder: folder holding the slices of one series (other files are ignored).
        required_modality: the DICOM ``Modality`` the series must have (None: any).

    Returns:
        ``{"series_uid", "modality", "num_files", "rows", "columns"}``.

    Raises:
        ImageReadError: naming the folder when it is empty, holds no DICOM image, holds more than one
        image series, its Modality is not ``required_modality``, its size exceeds
        :func:`~anatomy_vlp_bundle.data.headers.max_voxels`, two slices share a position, or the slice
        positions are unevenly spaced (a missing slice, inconsistent spacing).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: DICOM series folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise ImageReadError(f"{folder}: empty folder (expected the DICOM files of one CT series)")
    series: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (licence texts, masks, ...): ITK's series reader skips them too
        if "Rows" not in ds:  # structured reports and other non-image objects
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        entry = series.setdefault(
            uid,
            {"modality": str(ds.get("Modality", "")), "num_files": 0, "rows": 0, "columns": 0, "files": [], "geometry": []},
        )
        entry["num_files"] += 1
        entry["rows"] = max(entry["rows"], int(ds.get("Rows") or 0))
        entry["columns"] = max(entry["columns"], int(ds.get("Columns") or 0))
        entry["files"].append(f)
        entry["geometry"].append(_slice_geometry(ds))
    if not series:
        raise ImageReadError(f"{folder}: no DICOM image files in the folder")
    if len(series) > 1:
        desc = ", ".join(f"{v['modality'] or '?'} ({v['num_files']} files)" for v in series.values())
        raise ImageReadError(f"{folder}: holds {len(series)} DICOM series ({desc}); put one series per folder")
    uid, entry = next(iter(series.items()))
    if required_modality and entry["modality"].upper() != required_modality.upper():
        raise ImageReadError(
            f"{folder}: DICOM series has Modality {entry['modality'] or '(missing)'!r}, expected {required_modality!r}"
        )
    try:
        check_image_size(folder, (entry["columns"], entry["rows"], entry["num_files"]))
    except HeaderError as e:
        raise ImageReadError(str(e)) from None
    _check_slice_positions(folder, entry["files"], entry["geometry"])
    return {"series_uid": uid, **{k: entry[k] for k in ("modality", "num_files", "rows", "columns")}}


def _slice_geometry(ds: Any) -> tuple[list[float], list[float]] | None:
    """``(ImagePositionPatient, ImageOrientationPatient)`` of a slice, None when absent or malformed."""
    try:
        ipp = [float(v) for v in ds.get("ImagePositionPatient") or []]
        iop = [float(v) for v in ds.get("ImageOrientationPatient") or []]
    except (TypeError, ValueError):
        return None
    if len(ipp) != 3 or len(iop) != 6 or not np.all(np.isfinite(ipp + iop)):
        return None
    return ipp, iop


def _check_slice_positions(folder: Path, files: list[Path], geometry: list) -> None:
    """Refuse a series whose slices share a position or are unevenly spaced (when every slice has a position)."""
    if len(files) < 2 or any(g is None for g in geometry):
        return  # no positions to check: ITK orders such slices by file name / instance number
    layout = slice_layout([g[0] for g in geometry], geometry[0][1])
    if layout.duplicates:
        a, b = layout.first_duplicate()
        raise ImageReadError(
            f"{folder}: DICOM series has {layout.duplicates} slice(s) at a position another slice already has "
            f"({files[a].name} and {files[b].name} are both at {layout.positions[layout.order.index(a)]:.2f} mm along "
            "the slice normal): two series mixed or repeated slices; it cannot be read as one volume"
        )
    if layout.irregular:
        raise ImageReadError(
            f"{folder}: DICOM series slice positions are unevenly spaced ({layout.describe_gaps()}): missing "
            "slices or inconsistent spacing; it cannot be read onto a regular grid"
        )


def _check_header(path: Path, what: str, volume: bool) -> None:
    """Refuse, from the header alone, a file without voxels, larger than the size limit or (``volume``) not
    a single-channel 3D volume, before any voxel is decoded."""
    try:
        h = read_header(path)
        check_image_size(path, h.shape, h.n_components)
    except HeaderError as e:
        raise ImageReadError(str(e)) from None
    if volume and h.ndim != 3:
        raise ImageReadError(f"{path}: a {what} must be a 3D volume, its header describes a {h.ndim}D image of shape {h.shape}")
    if volume and h.n_components != 1:
        raise ImageReadError(
            f"{path}: a {what} must be single-channel, its header gives {h.n_components} components per voxel "
            f"({h.dtype}; an RGB or vector image)"
        )


def _check_finite(img: torch.Tensor, path: Path, what: str) -> None:
    """Refuse NaN and infinite voxels (they poison every loss and score downstream)."""
    if not img.is_floating_point():
        return
    finite = torch.isfinite(img)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(img).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise ImageReadError(f"{path}: a {what} must hold finite values; it has {n_nan} NaN and {n_inf} infinite voxel(s)")


_LOADERS: dict[str, Any] = {}


def _monai_loader(kind: str):
    """A cached MONAI ``LoadImage`` (not channel-first: shapes are checked before adding the channel)."""
    if kind not in _LOADERS:
        from monai.data import ITKReader, NibabelReader
        from monai.transforms import LoadImage

        reader = {
            "nifti": NibabelReader,
            "itk": ITKReader,
            "dicom_series": ITKReader,
            "cxr": CXRReader,
            "cxr_mask": lambda: CXRReader(invert_monochrome1=False),
        }[kind]()
        # dtype=None keeps the stored type (masks are checked for integer values before any cast).
        _LOADERS[kind] = (LoadImage(reader=reader, image_only=True, dtype=None, ensure_channel_first=False), reader)
    return _LOADERS[kind]


def _load(kind: str, path: Path) -> MetaTensor:
    # Passing the reader at call time makes LoadImage call it directly: our ImageReadError reaches the
    # caller instead of being folded into LoadImage's generic "cannot find a suitable reader" error.
    loader, reader = _monai_loader(kind)
    return loader(str(path), reader=reader)


def _read_volume(path: Path, what: str) -> MetaTensor:
    """Read a 3D file or DICOM series folder with MONAI; returns a channel-first ``(1, X, Y, Z)`` MetaTensor."""
    fmt = image_format(path)
    if fmt == "dicom_series":
        pass
    elif not path.exists():
        raise ImageReadError(f"{path}: file not found")
    elif fmt in ("pil", "dicom"):
        raise ImageReadError(
            f"{path}: a {what} must be NIfTI, NRRD, MHA/MHD or a DICOM series folder, not a single "
            f"{'DICOM file' if fmt == 'dicom' else 'PNG/JPEG image'}"
        )
    elif fmt == "unknown":
        raise ImageReadError(f"{path}: unknown {what} format (expected .nii, .nii.gz, .nrrd, .mha, .mhd or a DICOM folder)")
    else:
        _check_header(path, what, volume=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _load(fmt, path)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    if not isinstance(img, MetaTensor):
        img = MetaTensor(img)
    shape = tuple(img.shape)
    channel_dim = img.meta.get(MetaKeys.ORIGINAL_CHANNEL_DIM, float("nan"))
    if len(shape) == 4 and shape[-1] == 1:  # (X, Y, Z, 1): a 3D volume stored with a singleton 4th dim
        img = img[..., 0]
        shape = shape[:3]
    elif len(shape) != 3 or not (isinstance(channel_dim, float) and np.isnan(channel_dim)):
        kind = f"{len(shape)}D" if len(shape) != 4 else "4D/vector"
        raise ImageReadError(f"{path}: a {what} must be a 3D volume, got a {kind} image of shape {shape}")
    if img.affine.shape != (4, 4):
        raise ImageReadError(f"{path}: a {what} must be 3D, its header describes {img.affine.shape[0] - 1} dimensions")
    out = img.unsqueeze(0)
    out.meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
    return out


def _read_cxr(path: Path, what: str, mask: bool) -> MetaTensor:
    if path.is_file() and image_format(path) in ("pil", "dicom"):  # other paths: CXRReader names the problem
        _check_header(path, what, volume=False)
    try:
        img = _load("cxr_mask" if mask else "cxr", path)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    out = img.unsqueeze(0)
    out.meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
    return out


def _normalise_modality(modality: str) -> str:
    m = str(modality).upper()
    if m not in ("CT", "CXR"):
        raise ValueError(f"modality must be 'CT' or 'CXR', got {modality!r}")
    return m


def load_study_image(path: str | Path, modality: str) -> MetaTensor:
    """Load a study image as a channel-first float32 MetaTensor.

    Args:
        path: CT: a NIfTI/NRRD/MHA/MHD file or a DICOM series folder; CXR: a PNG/JPEG/DICOM file.
        modality: ``"CT"`` or ``"CXR"`` (the catalog's modality).

    Returns:
        CT: ``(1, X, Y, Z)`` HU values, RAS ``affine`` (mm). CXR: ``(1, W, H)`` gray values as stored
        (MONOCHROME1 inverted), ``affine`` ``diag(sx, sy, 1, 1)``, ``meta["spacing_known"]``.

    Raises:
        ImageReadError: naming the file (missing, unreadable, empty, larger than the size limit, 2D
        given as CT or 4D/vector/RGB, DICOM series of another modality or with duplicated or unevenly
        spaced slices, empty folder, NaN or infinite voxels, ...).
    """
    path = Path(path)
    modality = _normalise_modality(modality)
    if modality == "CT":
        if path.is_dir():
            check_ct_dicom_series(path, "CT")
        img = _read_volume(path, "CT image")
        img.meta["spacing_known"] = True
    else:
        img = _read_cxr(path, "CXR image", mask=False)
    what = f"{modality} image"
    if img.numel() == 0:
        raise ImageReadError(f"{path}: empty {what}: shape {tuple(img.shape[1:])} holds no voxels")
    _check_finite(img, path, what)
    return img.to(torch.float32)


def load_mask_image(path: str | Path, spatial_dims: int) -> MetaTensor:
    """Load a mask or label map with its stored dtype as a channel-first MetaTensor.

    Args:
        path: 3D: NIfTI/NRRD/MHA/MHD (or a DICOM series folder); 2D: PNG/JPEG/DICOM.
        spatial_dims: 3 for CT, 2 for CXR.

    Returns:
        ``(1, *S)`` with the file's own ``affine`` (2D masks: ``diag(sx, sy, 1, 1)`` and
        ``meta["spacing_known"]``; MONOCHROME1 masks are not inverted).
    """
    path = Path(path)
    if spatial_dims == 3:
        if path.is_dir():
            check_ct_dicom_series(path, required_modality=None)
        img = _read_volume(path, "mask")
        img.meta["spacing_known"] = True
        return img
    if not path.is_file():
        raise ImageReadError(f"{path}: mask file not found")
    return _read_cxr(path, "mask", mask=True)
