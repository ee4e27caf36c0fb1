"""MONAI Label app of the anatomy-aware vision-language bundle.

    monailabel start_server --app anatomy_vlp_bundle/apps/monailabel --studies <folder> \\
        --conf model models/model.pt

Conf options (``--conf key value``):

- ``model``: the bundle model the infer tasks serve and training starts from: a training
  checkpoint (default ``<bundle_root>/models/model.pt``) or an exported ``.ts`` (findings and boxes
  only: no label map, no ``pretrained`` start). A model trained by this app
  (``<model_dir>/anatomy_vlp/model.pt``) takes over once it exists.
- ``bundle_root``: the bundle folder (``configs/train.yaml``); default: the repository this package
  lives in.
- ``model_dir``: where training writes (default ``<app>/model``, MONAI Label's convention).
- ``preload``: ``true`` loads the model at start-up instead of on the first request.
- ``models``: ``all`` (default) or a comma-separated subset of ``anatomy_vlp_regions,anatomy_vlp_findings``.

Tasks: infer ``anatomy_vlp_regions`` (anatomy label map), ``anatomy_vlp_findings`` (the contract
result), train ``anatomy_vlp`` (the bundle's training on the final labels with the reports).
The studies folder holds the images (NIfTI, NRRD; PNG/JPEG for CXR), ``labels/final/`` the corrected
label maps and, optionally, a contract ``datalist.json`` (with its catalog) giving each image's
report and findings. Uploads are checked (:mod:`.uploads`): names with path components are refused
(HTTP 400), files that are not images of the served model's formats too (HTTP 422). Research use
only: not for diagnostic use.
"""

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import name_to_device, strtobool

import anatomy_vlp_bundle
from anatomy_vlp_bundle.apps.monailabel.infers import (
    AnatomyFindingsInfer,
    AnatomyRegionsInfer,
    ServedModel,
    label_values,
)
from anatomy_vlp_bundle.apps.monailabel.trainers import AnatomyVLPTrainTask
from anatomy_vlp_bundle.apps.monailabel.uploads import CheckedLocalDatastore, check_name, guard_upload_endpoints
from anatomy_vlp_bundle.data.catalog import Catalog
from anatomy_vlp_bundle.data.datalist import load_datalist

logger = logging.getLogger(__name__)

INFER_TASKS = ("anatomy_vlp_regions", "anatomy_vlp_findings")
TRAIN_TASK = "anatomy_vlp"


def default_bundle_root() -> Optional[Path]:
    """The repository holding the installed (editable) package, when it has the bundle's configs."""
    root = Path(anatomy_vlp_bundle.__file__).resolve().parents[1]
    return root if (root / "configs" / "train.yaml").is_file() else None


class AnatomyVLPApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        conf = dict(conf or {})
        root = conf.get("bundle_root") or default_bundle_root()
        if root is None or not (Path(root) / "configs" / "train.yaml").is_file():
            raise FileNotFoundError(
                f"bundle_root {root}: no configs/train.yaml there (start with --conf bundle_root <the anatomy_vlp_bundle folder>)"
            )
        self.bundle_root = Path(root).resolve()
        self.model_dir = Path(conf.get("model_dir") or os.path.join(app_dir, "model")).resolve()
        self.trained_dir = self.model_dir / TRAIN_TASK
        model = conf.get("model") or str(self.bundle_root / "models" / "model.pt")
        if not os.path.isfile(model):
            logger.warning("model %s does not exist: the infer tasks wait for a model trained by this app", model)
        # the configured model first, this app's training output last: the last existing one is served
        self.model = ServedModel([str(Path(model).resolve()), str(self.trained_dir / "model.pt")])
        self.preload = bool(strtobool(str(conf.get("preload", "false"))))
        selected = conf.get("models", "all")
        self.selected = list(INFER_TASKS) if selected == "all" else [m.strip() for m in selected.split(",") if m.strip()]
        unknown = sorted(set(self.selected) - set(INFER_TASKS))
        if unknown:
            raise ValueError(f"--conf models: unknown {unknown}; available: all, {', '.join(INFER_TASKS)}")
        self.catalog = self._find_catalog(studies)
        if self.preload and self.model.path():
            self.model.predictor(name_to_device(None))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="anatomy_vlp",
            description="Anatomy-aware vision-language pre-training (CT / CXR): anatomy regions, zero-shot findings, "
            "reports. Research use only.",
            version=anatomy_vlp_bundle.__version__,
            labels=label_values(self.catalog) if self.catalog else None,
        )

    def _find_catalog(self, studies: str) -> Optional[Catalog]:
        """The served model's catalog, else the studies datalist's (None: nothing to label with yet)."""
        if self.model.path() is not None:
            return self.model.catalog()
        datalist = Path(studies) / "datalist.json"
        if not studies.startswith("http") and datalist.is_file():
            return load_datalist(datalist).catalog()
        return None

    def current_catalog(self) -> Optional[Catalog]:
        """The served model's catalog (it changes when training replaces the model), else the studies datalist's."""
        served = self.model.catalog()
        return served if served is not None else self.catalog

    def init_datastore(self) -> Datastore:
        """A studies folder: MONAI Label's local datastore with checked uploads (a URL: MONAI Label's remote ones)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return CheckedLocalDatastore(
            self.studies,
            catalog=self.current_catalog,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def on_init_complete(self) -> None:
        """Server start-up: upload file names are checked from the first request on."""
        guard_upload_endpoints()
        super().on_init_complete()

    def infer(self, request: Dict[str, Any], datastore: Optional[Datastore] = None) -> Dict[str, Any]:
        """MONAI Label's infer, refusing a ``label_tag`` with path components before inferring (with
        ``save_label``, the result is saved under ``labels/<label_tag>/``)."""
        if request.get("save_label"):
            check_name(request.get("label_tag", DefaultLabelTag.ORIGINAL), "label tag")
        return super().infer(request, datastore)

    def init_infers(self) -> Dict[str, InferTask]:
        tasks: Dict[str, InferTask] = {}
        if "anatomy_vlp_regions" in self.selected:
            tasks["anatomy_vlp_regions"] = AnatomyRegionsInfer(self.model)
        if "anatomy_vlp_findings" in self.selected:
            tasks["anatomy_vlp_findings"] = AnatomyFindingsInfer(self.model)
        return tasks

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {
            TRAIN_TASK: AnatomyVLPTrainTask(
                bundle_root=str(self.bundle_root),
                output_dir=str(self.trained_dir),
                current_model=self.model.path,
                studies=self.studies,
            )
        }

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def info(self) -> Dict[str, Any]:
        out = super().info()
        out["notice"] = "Research use only. Not for diagnostic use."
        return out
