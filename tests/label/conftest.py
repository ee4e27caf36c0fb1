"""Fixtures of the MONAI Label tests (``bash scripts/label_env.sh --test``): a studies folder with a tiny
trained-like checkpoint, and one ``monailabel start_server`` on 127.0.0.1 serving it.

Imports only the standard library and pytest at module level: the main environment collects this folder
too (its test modules skip there).
"""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
APP_DIR = REPO / "anatomy_vlp_bundle" / "apps" / "monailabel"
#: synthetic CT grid and spacing: 40 x 32 x 32 voxels of 8 mm, the tiny model's input size
GRID = [40, 32, 32]
SPACING = [8.0, 8.0, 8.0]


def make_studies(dl: Any, studies: Path, labelled: List[str], records: Dict[str, Dict[str, Any]]) -> None:
    """Images at the top, final labels in labels/final/, a contract datalist whose record ids differ
    from the file names (matched by image name) and whose paths point into the studies folder."""
    from anatomy_vlp_bundle.data.datalist import write_datalist

    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(dl.root / "catalog.json", studies / "catalog.json")
    out = []
    for rec in records.values():
        name = Path(rec["image"]).name
        shutil.copy(rec["image"], studies / name)
        if rec["id"] in labelled:
            shutil.copy(rec["anatomy_mask"], studies / "labels" / "final" / name)
        out.append({**{k: v for k, v in rec.items() if k not in ("image", "anatomy_mask")},
                    "id": f"study-{rec['id']}", "image": name})
    write_datalist(studies / "datalist.json", name="studies", modality="CT", catalog="catalog.json", splits={"training": out})


@pytest.fixture(scope="session")
def label_data(tmp_path_factory) -> Dict[str, Any]:
    """5 synthetic CT cases as a studies folder (4 with a final label) and a tiny served checkpoint.

    Keys: ``root``, ``studies``, ``catalog``, ``records`` (by case id), ``labelled``, ``unlabelled`` (one id),
    ``ckpt``, ``text_cache``, ``grid`` and ``spacing`` (of the images and the model).
    """
    import torch

    from anatomy_vlp_bundle.data.datalist import load_datalist
    from anatomy_vlp_bundle.engines.checkpoint import CheckpointExtras
    from anatomy_vlp_bundle.synthetic import ensure_synthetic_dataset

    sys.path.insert(0, str(TESTS))
    from test_deploy_wrapper import trained_like_model

    root = tmp_path_factory.mktemp("label_app")
    ensure_synthetic_dataset(str(root / "synth"), "ct", n=5, shape=GRID, spacing=SPACING, progress=False)
    dl = load_datalist(root / "synth" / "datalist.json")
    cat = dl.catalog()
    records = {r["id"]: r for s in ("training", "validation", "test") for r in dl.records(s)}
    ids = sorted(records)
    labelled, unlabelled = ids[:-1], ids[-1]
    make_studies(dl, root / "studies", labelled, records)
    # a served checkpoint (the fixture pattern of tests/test_inference.py)
    model = trained_like_model(3, catalog=cat.to_dict(), img_size=GRID)
    ckpt = root / "served" / "model.pt"
    ckpt.parent.mkdir()
    extras = CheckpointExtras(model, "0.1.0", {"spacing": SPACING, "roi_size": GRID}).state_dict()
    torch.save({"model": model.state_dict(), "extras": extras}, ckpt)
    return {"root": root, "studies": root / "studies", "catalog": cat, "records": records, "labelled": labelled,
            "unlabelled": unlabelled, "ckpt": ckpt, "text_cache": root / "text_cache", "grid": GRID, "spacing": SPACING}


@dataclass
class LabelServer:
    """A running ``monailabel start_server``: its URL, folder (``app/``, ``studies/``, ``tmp/``, ``server.log``)
    and process."""

    url: str
    root: Path
    studies: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log (for failure messages)."""
        return (self.root / "server.log").read_text(errors="replace")[-chars:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def label_server(label_data, tmp_path_factory) -> Iterator[LabelServer]:
    """``monailabel start_server`` on 127.0.0.1 serving the tiny checkpoint on a copy of the studies folder
    (one server for the session; up once ``/info/`` answers, stopped at the end). Its temporary files
    (uploads, results) go to ``<root>/tmp``."""
    import requests

    root = tmp_path_factory.mktemp("label_server")
    app_dir = root / "app"  # the server writes model/, logs/, bin/ into its app folder
    app_dir.mkdir()
    shutil.copy(APP_DIR / "main.py", app_dir / "main.py")
    studies = root / "studies"
    shutil.copytree(label_data["studies"], studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    (root / "tmp").mkdir()
    port = _free_port()
    exe = Path(sys.executable).parent / "monailabel"
    cmd = [str(exe), "start_server", "--app", str(app_dir), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "model", str(label_data["ckpt"]), "--conf", "bundle_root", str(REPO)]
    # the `monailabel` script runs the `python` on PATH: the environment's, as after `source .venv-label/bin/activate`
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "MONAI_LABEL_SESSIONS": "false", "TMPDIR": str(root / "tmp")}
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = LabelServer(f"http://127.0.0.1:{port}", root, studies, proc)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, "server exited:\n" + server.log_tail()
            assert time.time() < deadline, "server did not come up:\n" + server.log_tail()
            try:
                if requests.get(f"{server.url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def label_load() -> ModuleType:
    """``scripts/label_load.py`` as a module: the load generator and its multipart encoder."""
    spec = importlib.util.spec_from_file_location("label_load", REPO / "scripts" / "label_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["label_load"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
