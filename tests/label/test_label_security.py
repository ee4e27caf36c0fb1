"""Untrusted uploads to the MONAI Label app (Reliability item 5): names with path components and files
that are not images are refused.

Against the running server (``label_server`` of conftest.py), for the datastore's image and label uploads
and the infer upload: each case answers HTTP 400 (a name), 404 (an unknown image) or 422 (content) with
a ``detail`` naming the problem, writes nothing (every file under the session's temporary folder, which
holds the studies folder, the folder around it and the server's temporary folder, is unchanged;
nothing unpickled) and leaves the server answering. Valid uploads are still accepted. The name rules
and the datastore are also checked on the app objects, without HTTP.
"""

import pytest

pytest.importorskip("monailabel")

import gzip  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tarfile  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, Optional, Tuple  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.background import BackgroundTasks  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402

from anatomy_vlp_bundle.apps.monailabel.uploads import (  # noqa: E402
    CheckedLocalDatastore,
    UploadRejected,
    check_image_file,
    check_name,
    guard_upload_endpoints,
)

FINDINGS = "anatomy_vlp_findings"


class Trap:
    """Unpickling this creates the folder ``marker``: proof that something unpickled an upload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def payloads(label_data, tmp_path_factory) -> Dict[str, Any]:
    """Upload contents, by kind, and the pickle's ``marker``."""
    root = tmp_path_factory.mktemp("payloads")
    image = (label_data["studies"] / f"{label_data['unlabelled']}.nii.gz").read_bytes()
    label = (label_data["studies"] / "labels" / "final" / f"{label_data['labelled'][0]}.nii.gz").read_bytes()
    raw = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4))
    nib.save(raw, str(root / "raw.nii"))
    raw_bytes = (root / "raw.nii").read_bytes()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("image.nii.gz", image)
    png = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png, format="PNG")
    marker = root / "unpickled"
    return {
        "image": image,
        "label": label,
        "text": b"PatientName: Jane Doe\nnot an image\n",
        "text_gz": gzip.compress(b"not an image, but gzip-compressed\n" * 20),
        "truncated_gz": image[: len(image) // 2],
        "truncated_nii": raw_bytes[: len(raw_bytes) - 300],
        "pickle": pickle.dumps(Trap(marker)),
        "zip": archive.getvalue(),
        "detached_nrrd": b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/hostname\n\n",
        "png": png.getvalue(),
        "marker": marker,
    }


def snapshot(server) -> Dict[str, Tuple[int, int]]:
    """Every file under the session's temporary folder (studies, the server's tmp/, the folders around
    them) with size and modification time; not the server's logs and the datastore's index and lock.
    (Files may disappear in between: the server removes earlier requests' temporary files after answering.)"""
    out = {}
    for path in server.root.parent.rglob("*"):
        if path.is_dir() or server.root / "app" in path.parents or path.name in ("server.log", "datastore_v2.json", ".lock"):
            continue
        st = path.stat()
        out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


def send(server, method: str, route: str, query: Optional[Dict[str, str]] = None,
         files: Optional[Dict[str, Tuple[str, bytes]]] = None, fields: Optional[Dict[str, str]] = None,
         encode=None) -> requests.Response:
    """One request; uploads go through ``encode`` (label_load's encoder: file names sent byte for byte)."""
    body, headers = b"", {}
    if files or fields:
        body, ctype = encode(files or {}, fields)
        headers = {"Content-Type": ctype}
    return requests.request(method, f"{server.url}{route}", params=query, data=body, headers=headers, timeout=120)


def assert_refused(server, before, response: requests.Response, status: int, *patterns: str) -> None:
    """``status`` with every pattern in the detail, nothing written, the server still answering."""
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    for pattern in patterns:
        assert re.search(pattern, detail), (pattern, detail)
    after = snapshot(server)
    written = sorted(path for path, stat in after.items() if before.get(path) != stat)
    assert not written, f"a refused request wrote {written}"
    assert server.process.poll() is None, server.log_tail()
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    assert not Path("/etc/x.nii.gz").exists()


def upload(kind: str, label_data, name: str, content: bytes) -> Tuple[str, str, Dict[str, str], Dict[str, Tuple[str, bytes]]]:
    """``(method, route, query, files)`` sending ``content`` named ``name`` as a ``kind`` upload."""
    if kind == "datastore image":
        return "PUT", "/datastore/image", {"image": "uploaded"}, {"file": (name, content)}
    if kind == "datastore label":
        return "PUT", "/datastore/label", {"image": label_data["labelled"][0], "tag": "final"}, {"label": (name, content)}
    if kind == "infer file":
        return "POST", f"/infer/{FINDINGS}", {}, {"file": (name, content)}
    return "POST", f"/infer/{FINDINGS}", {"image": label_data["labelled"][0]}, {"label": (name, content)}  # infer label


UPLOADS = ("datastore image", "datastore label", "infer file", "infer label")


# --------------------------------------------------------------------------- names, over HTTP
@pytest.mark.parametrize("kind", UPLOADS)
@pytest.mark.parametrize("name,problem", [
    ("../../etc/x.nii.gz", "has path components"),
    ("/etc/x.nii.gz", "is an absolute path"),
    ("..\\..\\x.nii.gz", "has path components"),
    ("x\x00.nii.gz", "NUL byte"),
    ("scan\x1b.nii.gz", "control characters"),
    ("..", "a folder"),
])
def test_upload_file_names_with_path_components_are_refused(label_server, label_data, payloads, label_load, kind, name, problem):
    content = payloads["label" if "label" in kind else "image"]
    method, route, query, files = upload(kind, label_data, name, content)
    before = snapshot(label_server)
    r = send(label_server, method, route, query, files, encode=label_load.multipart_body)
    assert_refused(label_server, before, r, 400, "^upload file name", re.escape(repr(name)), problem)


@pytest.mark.parametrize("image_id,problem", [
    ("../escaped_id", "has path components"),
    ("../../etc/x", "has path components"),
    ("ABSOLUTE/abs_id", "is an absolute path"),
    ("a\\b", "has path components"),
    ("x\x00y", "NUL byte"),
    ("..", "a folder"),
])
def test_datastore_image_ids_with_path_components_are_refused(label_server, payloads, label_load, image_id, problem):
    image_id = image_id.replace("ABSOLUTE", str(label_server.root))
    before = snapshot(label_server)
    r = send(label_server, "PUT", "/datastore/image", {"image": image_id}, {"file": ("x.nii.gz", payloads["image"])},
             encode=label_load.multipart_body)
    assert_refused(label_server, before, r, 400, "^image id", problem)


@pytest.mark.parametrize("tag,problem", [
    ("../../escaped_tag", "has path components"),
    ("ABSOLUTE/abs_tag", "is an absolute path"),
    ("a\\b", "has path components"),
    ("final\x00", "NUL byte"),
])
def test_label_tags_with_path_components_are_refused(label_server, label_data, payloads, label_load, tag, problem):
    tag = tag.replace("ABSOLUTE", str(label_server.root))
    before = snapshot(label_server)
    image_id = label_data["labelled"][0]
    r = send(label_server, "PUT", "/datastore/label", {"image": image_id, "tag": tag}, {"label": ("x.nii.gz", payloads["label"])},
             encode=label_load.multipart_body)
    assert_refused(label_server, before, r, 400, "^label tag", problem)
    # an infer request asking to save its result under that tag: refused before inferring
    r = send(label_server, "POST", "/infer/anatomy_vlp_regions", {"image": image_id},
             fields={"params": json.dumps({"save_label": True, "label_tag": tag})}, encode=label_load.multipart_body)
    assert_refused(label_server, before, r, 400, "^label tag", problem)


# --------------------------------------------------------------------------- content, over HTTP
@pytest.mark.parametrize("kind", UPLOADS)
@pytest.mark.parametrize("name,payload,problem", [
    ("notes.txt", "text", r"unsupported format \.txt"),
    ("text.nii.gz", "text", "not a readable image"),
    ("compressed_text.nii.gz", "text_gz", "not a readable image"),
    ("truncated.nii.gz", "truncated_gz", "not a readable image"),
    ("truncated.nii", "truncated_nii", r"not a readable image.*(truncated NIfTI|Expected 1024 bytes, got 724)"),
    ("pickle.nii.gz", "pickle", "not a readable image"),
    ("archive.nii.gz", "zip", "not a readable image"),
    ("archive.zip", "zip", r"unsupported format \.zip"),
    ("detached.nrrd", "detached_nrrd", r"reads the voxels from another file \(/etc/hostname\)"),
    ("xray.png", "png", r"unsupported format \.png"),  # a 2D image for the CT model
])
def test_uploads_that_are_not_images_are_refused(label_server, label_data, payloads, label_load, kind, name, payload, problem):
    method, route, query, files = upload(kind, label_data, name, payloads[payload])
    before = snapshot(label_server)
    r = send(label_server, method, route, query, files, encode=label_load.multipart_body)
    role = "label" if "label" in kind else "image"
    assert_refused(label_server, before, r, 422, f"^{role}|^not a readable image", problem)
    assert not payloads["marker"].exists(), "an upload was unpickled"


def tar_of(*members: tarfile.TarInfo) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info in members:
            data = b"x" if info.isfile() else None
            info.size = len(data) if data else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def zip_of(name: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(name, b"x")
    return out.getvalue()


@pytest.mark.parametrize("archive,status,problem", [
    (lambda: tar_of(tarfile.TarInfo("../../escaped_session.txt")), 400, r"member '\.\./\.\./escaped_session\.txt' would unpack outside"),
    (lambda: tar_of(tarfile.TarInfo("/abs_session.txt")), 400, "would unpack outside"),
    (lambda: tar_of(link("series/IM1", "/etc/hostname")), 400, r"member 'series/IM1' is a link"),
    (lambda: zip_of("../escaped_session.txt"), 400, "would unpack outside"),
    (lambda: b"not an archive", 422, "not a zip or tar archive"),
])
def test_session_archives_that_unpack_outside_are_refused(label_server, label_load, archive, status, problem):
    """``PUT /session/?uncompress=true`` unpacks the upload (sessions are off on this server: the check comes first)."""
    before = snapshot(label_server)
    r = send(label_server, "PUT", "/session/", {"uncompress": "true"}, {"files": ("series.tar", archive())},
             encode=label_load.multipart_body)
    assert_refused(label_server, before, r, status, r"^archive 'series\.tar'", problem)
    r = send(label_server, "PUT", "/session/", {"uncompress": "true"}, {"files": ("series.tar", tar_of(tarfile.TarInfo("series/IM1")))},
             encode=label_load.multipart_body)
    assert r.status_code == 406, r.text  # a plain archive passes the check, then meets the disabled feature


def test_unknown_images_and_server_files_are_refused(label_server, payloads, label_load):
    before = snapshot(label_server)
    r = send(label_server, "PUT", "/datastore/label", {"image": "no_such_image", "tag": "final"},
             {"label": ("x.nii.gz", payloads["label"])}, encode=label_load.multipart_body)
    assert_refused(label_server, before, r, 404, "no such image in the datastore")
    r = send(label_server, "POST", f"/infer/{FINDINGS}", {"image": "no_such_image"})
    assert_refused(label_server, before, r, 404, "no image")
    # MONAI Label takes an `image` that names an existing server path as that file: not an image, refused
    r = send(label_server, "POST", f"/infer/{FINDINGS}", {"image": "/etc/hostname"})
    assert_refused(label_server, before, r, 422, "^image /etc/hostname: unsupported format")


def test_valid_uploads_are_still_accepted(label_server, label_data, payloads, label_load):
    """The control: the same routes take an image, its label and an infer upload with plain names."""
    encode = label_load.multipart_body
    r = send(label_server, "PUT", "/datastore/image", {"image": "uploaded_ok"}, {"file": ("scan.nii.gz", payloads["image"])},
             encode=encode)
    assert r.status_code == 200 and r.json() == {"image": "uploaded_ok"}, r.text
    assert (label_server.studies / "uploaded_ok.nii.gz").read_bytes() == payloads["image"]
    r = send(label_server, "PUT", "/datastore/label", {"image": "uploaded_ok", "tag": "final"},
             {"label": ("scan.nii.gz", payloads["label"])}, encode=encode)
    assert r.status_code == 200, r.text
    assert (label_server.studies / "labels" / "final" / "uploaded_ok.nii.gz").read_bytes() == payloads["label"]
    r = send(label_server, "POST", f"/infer/{FINDINGS}", files={"file": ("scan.nii.gz", payloads["image"])}, encode=encode)
    assert r.status_code == 200, r.text
    assert list(r.json()["anatomies"]) == label_data["catalog"].names


# --------------------------------------------------------------------------- the app objects
@pytest.mark.parametrize("name,problem", [
    ("C:\\data\\x.nii.gz", "is an absolute path"),
    ("\\\\server\\share", "is an absolute path"),
    ("x\x7f.nii.gz", "control characters"),
    ("x" * 201, "longer than 200 bytes"),
    (".", "a folder"),
    ("", "empty"),
    ("   ", "empty"),
    (["x"], "not a text name"),
])
def test_check_name_refuses(name, problem):
    with pytest.raises(UploadRejected, match=problem) as e:
        check_name(name, "image id")
    assert e.value.status_code == 400 and e.value.msg.startswith("image id")


@pytest.mark.parametrize("name", ["case_0007", "1.2.840.113619.2.55.3", "scan 01.nii.gz", "é-ü_2", "..x", "a..b"])
def test_check_name_keeps_plain_names(name):
    assert check_name(name, "image id") == name


def test_datastore_refuses_before_writing(label_data, payloads, tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(label_data["studies"], studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    ds = CheckedLocalDatastore(str(studies), catalog=lambda: label_data["catalog"], extensions=["*.nii.gz", "*.nii"])
    good, text = tmp_path / "in" / "good.nii.gz", tmp_path / "in" / "text.nii.gz"
    good.parent.mkdir()
    good.write_bytes(payloads["image"])
    text.write_bytes(payloads["text"])
    before = sorted(p for p in tmp_path.rglob("*") if p.name not in ("datastore_v2.json", ".lock"))
    for image_id in ("../escaped", str(tmp_path / "abs"), "a\\b", "x\x00y"):
        with pytest.raises(UploadRejected, match="^image id"):
            ds.add_image(image_id, str(good), {})
    with pytest.raises(UploadRejected, match="^image 'text': not a readable image"):
        ds.add_image("text", str(text), {})
    with pytest.raises(UploadRejected, match="^label tag"):
        ds.save_label(label_data["labelled"][0], str(good), "../../escaped", {})
    with pytest.raises(UploadRejected, match="no such image"):
        ds.save_label("no_such_image", str(good), "final", {})
    assert sorted(p for p in tmp_path.rglob("*") if p.name not in ("datastore_v2.json", ".lock")) == before
    assert ds.add_image("fine", str(good), {}) == "fine" and (studies / "fine.nii.gz").is_file()


def test_check_image_file_names_the_file_and_the_problem(label_data, payloads, tmp_path):
    cat = label_data["catalog"]
    bad = tmp_path / "bad.mha"
    bad.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = ../../secret.raw\n")
    with pytest.raises(UploadRejected, match=r"^image upload\.mha: its header reads the voxels from another file \(\.\./\.\./secret\.raw\)"):
        check_image_file(bad, "image", cat, decode=False, name="upload.mha")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(UploadRejected, match="is a folder"):
        check_image_file(folder, "label", cat, decode=False)
    good = tmp_path / "good.nii.gz"
    good.write_bytes(payloads["image"])
    assert check_image_file(good, "image", cat, decode=True).shape == tuple(label_data["grid"])
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(payloads["truncated_gz"])
    check_image_file(truncated, "image", cat, decode=False)  # the header alone is fine ...
    with pytest.raises(UploadRejected, match=r"^image truncated\.nii\.gz: not a readable image"):
        check_image_file(truncated, "image", cat, decode=True, name="truncated.nii.gz")  # ... its voxels are not


def test_guard_checks_every_upload_handler_and_removes_temporary_files(tmp_path):
    from monailabel.endpoints import datastore, infer, session

    guard_upload_endpoints()
    guard_upload_endpoints()  # idempotent: one wrapper
    for handler in (datastore.add_image, datastore.save_label, infer.run_inference, session.create_session):
        assert handler.anatomy_vlp_guarded and not getattr(handler.__wrapped__, "anatomy_vlp_guarded", False)
    files = [UploadFile(file=io.BytesIO(b""), filename="ok.nii.gz"), UploadFile(file=io.BytesIO(b""), filename="../x.nii.gz")]
    with pytest.raises(UploadRejected, match=r"^upload file name '\.\./x\.nii\.gz': has path components"):
        session.create_session(BackgroundTasks(), files=files)
    # a handler failing after its upload was written: the temporary file it scheduled for removal goes now
    leftover = tmp_path / "upload.nii.gz"
    leftover.write_bytes(b"not an image")
    tasks = BackgroundTasks()
    tasks.add_task(datastore.remove_file, str(leftover))
    with pytest.raises(MONAILabelException):  # no app in this process, or the app's datastore refusing the id
        datastore.add_image(tasks, image="../x", file=UploadFile(file=io.BytesIO(b""), filename="x.nii.gz"))
    assert not leftover.exists()
