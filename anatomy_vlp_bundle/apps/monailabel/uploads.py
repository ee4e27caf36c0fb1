"""What the MONAI Label server accepts from clients: names without path components, files that are images.

MONAI Label 0.8.5 stores and reads what clients send without looking at it:

- ``PUT /datastore/image`` copies the upload to ``<studies>/<id><suffix>``, the id being the ``image``
  query parameter or the upload's file name, so ``image=../x`` writes outside the studies folder (and a
  file named ``..`` becomes the id ``..``);
- ``PUT /datastore/label`` copies it to ``<studies>/labels/<tag>/<id><suffix>``, ``tag`` from the query;
- ``POST /infer/{model}`` writes an uploaded ``file`` / ``label`` to a temporary file named with the
  upload's suffixes and hands its path to the task; the request's ``params`` can ask for the result to
  be saved as a label under any ``label_tag``;
- ``PUT /session/?uncompress=true`` unpacks an uploaded archive with ``shutil.unpack_archive``, which
  on Python 3.11 extracts tar members named ``../x`` or ``/x`` (and links) where they say.

This module refuses, before anything is written or decoded further:

- a name with path components (``/``, ``\\``, an absolute or drive-letter path, ``.`` or ``..``), a NUL
  byte or other control characters, as HTTP 400 (:func:`check_name`): upload file names, image ids and
  label tags; archive members that leave the archive's folder or are links (:func:`check_archive`);
- a file that is not an image the bundle reads (:func:`check_image_file`), as HTTP 422: a format other
  than the self-contained ones the served model takes (NIfTI, NRRD, MHA for CT; PNG, JPEG, DICOM for
  CXR), a header that names another file for its voxels, a header our readers
  (:mod:`anatomy_vlp_bundle.data.headers`) cannot read (text, pickles, archives renamed ``.nii.gz``),
  the wrong number of dimensions and, for datastore uploads, voxels our readers
  (:mod:`anatomy_vlp_bundle.data.readers`) cannot decode (truncated files).

:class:`CheckedLocalDatastore` applies both to datastore uploads, the infer tasks apply the content check to
their image and label, and :func:`guard_upload_endpoints` checks uploads at the HTTP layer: their file
names (the only place they are seen: MONAI Label keeps just their suffixes, or their last component)
and the archives a session unpacks.
:class:`UploadRejected` is both a ``MONAILabelException`` (for the app's Python callers) and FastAPI's
``HTTPException`` (the server answers with its status and ``{"detail": message}``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.utils.others.generic import remove_file
from starlette.background import BackgroundTasks
from starlette.datastructures import UploadFile

from anatomy_vlp_bundle.data.catalog import Catalog
from anatomy_vlp_bundle.data.headers import HeaderError, ImageHeader, read_header
from anatomy_vlp_bundle.data.readers import CT_FILE_SUFFIXES, CXR_SUFFIXES, ImageReadError, load_mask_image, load_study_image

__all__ = [
    "CheckedLocalDatastore", "UploadRejected", "VOLUME_SUFFIXES", "PLANAR_SUFFIXES", "check_archive", "check_image_file",
    "check_name", "guard_upload_endpoints",
]

logger = logging.getLogger(__name__)

#: self-contained 3D formats (a detached ``.mhd`` / ``.nhdr`` header names another file for its voxels)
VOLUME_SUFFIXES = tuple(s for s in CT_FILE_SUFFIXES if s not in (".mhd", ".nhdr"))
#: 2D formats
PLANAR_SUFFIXES = CXR_SUFFIXES
#: the longest name accepted, in UTF-8 bytes (file systems allow 255 with the suffix)
MAX_NAME_BYTES = 200

# MONAI Label's upload handlers, by module: their UploadFile arguments carry the client's file names
_UPLOAD_HANDLERS = {
    "monailabel.endpoints.datastore": ("add_image", "save_label"),
    "monailabel.endpoints.infer": ("run_inference",),
    "monailabel.endpoints.session": ("create_session",),
}


class UploadRejected(MONAILabelException, HTTPException):
    """A client's name or file the app refuses; the message says which and why.

    Args:
        status_code: the HTTP status the server answers with (400 name, 404 unknown image, 422 content).
        msg: the message (the response's ``detail``).
    """

    def __init__(self, status_code: int, msg: str) -> None:
        MONAILabelException.__init__(self, MONAILabelError.INVALID_INPUT, msg)
        HTTPException.__init__(self, status_code=status_code, detail=msg)

    def __str__(self) -> str:
        return self.msg


# --------------------------------------------------------------------------- names
def _name_problem(name: str) -> Optional[str]:
    """What makes ``name`` unusable as one file name inside a folder (None: nothing)."""
    if "\x00" in name:
        return "contains a NUL byte"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "is an absolute path"
    if "/" in name or "\\" in name:
        return "has path components ('/' or '\\')"
    if name in (".", ".."):
        return f"is {name!r}, a folder"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_name(name: Any, what: str) -> str:
    """``name`` when it is a plain name (an image id, a label tag, an upload's file name).

    Args:
        name: the name the client sent.
        what: what it names, for the message (``"image id"``, ``"label tag"``, ...).

    Raises:
        UploadRejected: 400, naming ``what``, the name and the problem.
    """
    if not isinstance(name, str):
        raise UploadRejected(400, f"{what} {name!r}: not a text name")
    if not name.strip():
        raise UploadRejected(400, f"{what} {name!r}: empty; send a plain name")
    problem = _name_problem(name)
    if problem:
        raise UploadRejected(400, f"{what} {name!r}: {problem}; send a plain name without folders")
    return name


def check_archive(fileobj: BinaryIO, name: str) -> None:
    """An archive (zip or tar) whose members all unpack inside its folder: relative paths without ``..``,
    regular files and folders only (no links, devices). Leaves ``fileobj`` at its start.

    Raises:
        UploadRejected: 422 when it is neither zip nor tar, 400 naming the first offending member.
    """
    try:
        if zipfile.is_zipfile(fileobj):
            members = [(info.filename, True) for info in zipfile.ZipFile(fileobj).infolist()]
        else:
            fileobj.seek(0)
            with tarfile.open(fileobj=fileobj) as tar:
                members = [(m.name, m.isfile() or m.isdir()) for m in tar.getmembers()]
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise UploadRejected(422, f"archive {name!r}: not a zip or tar archive ({e})") from None
    finally:
        fileobj.seek(0)
    for member, regular in members:
        parts = member.replace("\\", "/").split("/")
        if "\x00" in member or member.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", member) or ".." in parts:
            raise UploadRejected(400, f"archive {name!r}: member {member!r} would unpack outside the archive's folder")
        if not regular:
            raise UploadRejected(400, f"archive {name!r}: member {member!r} is a link or device file")


def _guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler`` that first checks its uploads (:func:`check_name` on their file names, :func:`check_archive`
    on archives it is asked to ``uncompress``), and removes the uploads' temporary files when it fails.

    MONAI Label's handlers copy an upload to a temporary file and schedule its removal as a background
    task, which Starlette runs only after a successful response: a refused upload would stay on disk.
    """
    signature = inspect.signature(handler)

    @functools.wraps(handler)
    def checked(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs).arguments
        for value in arguments.values():
            for upload in value if isinstance(value, list) else [value]:
                if isinstance(upload, UploadFile):
                    if upload.filename:
                        check_name(upload.filename, "upload file name")
                    if arguments.get("uncompress"):
                        check_archive(upload.file, upload.filename or "")
        try:
            return handler(*args, **kwargs)
        except Exception:
            for tasks in (v for v in arguments.values() if isinstance(v, BackgroundTasks)):
                for task in tasks.tasks:
                    if task.func is remove_file:
                        remove_file(*task.args, **task.kwargs)
            raise

    checked.anatomy_vlp_guarded = True  # type: ignore[attr-defined]
    return checked


def guard_upload_endpoints() -> None:
    """Check uploads before MONAI Label's handlers write them (idempotent).

    MONAI Label's route functions call module-level handlers (``add_image``, ``save_label``,
    ``run_inference``, ``create_session``) by name; each is replaced by itself behind :func:`_guarded`.
    A handler that is missing (another MONAI Label version) is logged: the datastore's and the infer
    tasks' own checks still apply.
    """
    for module_name, handlers in _UPLOAD_HANDLERS.items():
        module = importlib.import_module(module_name)
        for name in handlers:
            handler = getattr(module, name, None)
            if handler is None:
                logger.warning("%s.%s not found: upload file names are not checked there", module_name, name)
            elif not getattr(handler, "anatomy_vlp_guarded", False):
                setattr(module, name, _guarded(handler))


# --------------------------------------------------------------------------- content
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _external_data_file(path: Path) -> Optional[str]:
    """The voxel file a NRRD (``data file:``) or MetaImage (``ElementDataFile``) header names, if not itself."""
    with open(path, "rb") as f:
        head = f.read(65536).decode("latin-1")
    if _suffix(path) == ".nrrd":
        fields = head.split("\n\n", 1)[0]  # the header ends at the first blank line
        m = re.search(r"^\s*data ?file\s*:\s*(.+?)\s*$", fields, re.MULTILINE | re.IGNORECASE)
    else:
        m = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", head, re.MULTILINE)
        if m and m.group(1) == "LOCAL":
            return None
    return m.group(1) if m else None


def check_image_file(path: str | Path, role: str, catalog: Optional[Catalog], decode: bool,
                     name: Optional[str] = None) -> ImageHeader:
    """The header of ``path`` when it is an image (``role`` ``"image"``) or label map (``"label"``) the
    served model can take.

    Args:
        path: the file (a DICOM series folder for a CT image).
        role: ``"image"`` or ``"label"``.
        catalog: the served model's catalog (its modality decides 2D or 3D); None: either.
        decode: also decode the voxels with the bundle's readers (truncated files fail only there).
        name: how the message names the file (default: ``path``).

    Raises:
        UploadRejected: 422, naming ``role``, the file and the problem.
    """
    p = Path(path)
    shown = name or str(p)

    def reject(problem: str) -> UploadRejected:
        return UploadRejected(422, f"{role} {shown}: {problem}")

    def reason(error: Exception) -> str:  # the readers' message names the file first: said already
        return str(error).replace(f"{p}: ", "").replace(str(p), shown)

    dims = catalog.spatial_dims if catalog is not None else None
    if p.is_dir():
        if role != "image" or dims == 2:
            raise reject("is a folder; send one image file")
    else:
        suffix = _suffix(p)
        allowed = VOLUME_SUFFIXES if dims == 3 else PLANAR_SUFFIXES if dims == 2 else VOLUME_SUFFIXES + PLANAR_SUFFIXES
        if suffix not in allowed:
            raise reject(f"unsupported format {suffix or '(no suffix)'}; expected one of {', '.join(allowed)}")
        if suffix in (".nrrd", ".mha"):
            other = _external_data_file(p)
            if other is not None:
                raise reject(f"its header reads the voxels from another file ({other}); send a self-contained file")
    try:
        header = read_header(p)
    except HeaderError as e:
        raise reject(f"not a readable image ({reason(e)})") from None
    if dims is not None and header.ndim != dims:
        raise reject(f"a {header.ndim}D image of shape {list(header.shape)}; the served model reads {dims}D "
                     f"{catalog.modality} images")
    if decode:
        try:
            if role == "image":
                load_study_image(p, "CT" if header.ndim == 3 else "CXR")
            else:
                load_mask_image(p, header.ndim)
        except ImageReadError as e:
            raise reject(f"not a readable image ({reason(e)})") from None
    return header


# --------------------------------------------------------------------------- datastore
class CheckedLocalDatastore(LocalDatastore):
    """MONAI Label's local datastore that accepts only plain names and image files from clients.

    ``add_image`` and ``save_label`` (``PUT /datastore/image``, ``PUT /datastore/label``, and labels saved by
    infer requests) check the image id and label tag with :func:`check_name` and decode the file with the
    bundle's readers (:func:`check_image_file`) before MONAI Label copies it into the studies folder.

    Args:
        datastore_path: the studies folder.
        catalog: returns the served model's catalog (its modality), or None.
        **kwargs: :class:`~monailabel.datastore.local.LocalDatastore` options.
    """

    def __init__(self, datastore_path: str, catalog: Callable[[], Optional[Catalog]], **kwargs: Any) -> None:
        self._catalog = catalog
        super().__init__(datastore_path, **kwargs)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        own_id, _ = self._to_id(Path(image_filename).name)
        image_id = check_name(image_id or own_id, "image id")
        check_image_file(image_filename, "image", self._catalog(), decode=True, name=f"{image_id!r}")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_name(label_tag, "label tag")
        if image_id not in self._datastore.objects:
            raise UploadRejected(404, f"label for image {image_id!r}: no such image in the datastore")
        check_image_file(label_filename, "label", self._catalog(), decode=True, name=f"for image {image_id!r}")
        return super().save_label(image_id, label_filename, label_tag, label_info)
