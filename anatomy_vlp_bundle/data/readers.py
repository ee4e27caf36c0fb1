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

Bad input raises :class:`ImageReadError`, whose message names the file and what is wrong.
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

__all__ = [
    "ImageReadError",
    "CXRReader",
    "load_study_image",
    "load_mask_image",
    "check_ct_dicom_series",
    "image_format",
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
        ``{"series_uid", "modality", "num_files"}``.

    Raises:
        ImageReadError: naming the folder when it is empty, holds no DICOM image, holds more than one
        image series, or its Modality is not ``required_modality``.
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
        entry = series.setdefault(uid, {"modality": str(ds.get("Modality", "")), "num_files": 0})
        entry["num_files"] += 1
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
    return {"series_uid": uid, **entry}


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
        ImageReadError: naming the file (missing, unreadable, 2D given as CT or 4D/vector,
        DICOM series of another modality, empty folder, ...).
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
        img = _read_volume(path, "mask")
        img.meta["spacing_known"] = True
        return img
    if not path.is_file():
        raise ImageReadError(f"{path}: mask file not found")
    return _read_cxr(path, "mask", mask=True)
