"""MONAI Label infer tasks that run the bundle's :class:`~anatomy_vlp_bundle.inference.Predictor`.

MONAI Label's generic ``BundleInferTask`` rebuilds the bundle's ``preprocessing`` / ``inferer`` /
``postprocessing`` chain and expects one segmentation tensor out. This model answers with a
contract result (``../shared/DATA_CONTRACT.md``, "Inference result") and resamples its label map
onto the input grid by physical position, so both tasks call the ``Predictor`` instead:

- :class:`AnatomyRegionsInfer` (``anatomy_vlp_regions``, segmentation): the predicted anatomy
  regions as a label map on the input image's own grid (values: the catalog's first label of each
  anatomy), plus the contract result and ``label_names`` in the params;
- :class:`AnatomyFindingsInfer` (``anatomy_vlp_findings``, classification): no label, the contract
  result in the params (zero-shot findings per anatomy, abnormality, boxes, report). A label map sent
  with the request (``label``) defines the regions instead of the model's own (``regions: "mask"``).

Both check the request's image (and label map) with :func:`~.uploads.check_image_file` before the model
sees it: a file that is not an image of the served model's formats is refused with HTTP 422.

Both serve the app's :class:`ServedModel`: the last existing file of its ``model_paths`` (the app
passes the configured checkpoint first and its own training output last, so a model trained in
MONAI Label takes over once it exists), loaded once for both tasks and again when that file changes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list, name_to_device

from anatomy_vlp_bundle.apps.monailabel.uploads import UploadRejected, check_image_file
from anatomy_vlp_bundle.data.catalog import Catalog, load_catalog
from anatomy_vlp_bundle.data.readers import ImageReadError
from anatomy_vlp_bundle.inference import Predictor

__all__ = [
    "AnatomyFindingsInfer", "AnatomyRegionsInfer", "AnatomyVLPInferTask", "ServedModel", "current_model", "label_values", "model_catalog",
]

logger = logging.getLogger(__name__)


def current_model(model_paths: Sequence[Optional[str]]) -> Optional[str]:
    """The last path of ``model_paths`` that exists (None when none does)."""
    for path in reversed([p for p in model_paths if p]):
        if os.path.isfile(path):
            return str(path)
    return None


def model_catalog(path: str) -> Catalog:
    """The catalog a model file carries, without building the model (a TorchScript file is loaded)."""
    if path.endswith(".ts"):
        return Predictor.load(path).catalog
    from anatomy_vlp_bundle.engines.checkpoint import load_checkpoint

    extras = load_checkpoint(path).get("extras")
    if not isinstance(extras, dict) or not (extras.get("catalog") or extras.get("model_config", {}).get("catalog")):
        raise ValueError(f"model {path}: has no catalog in its 'extras' (is it a bundle training checkpoint?)")
    return load_catalog(extras.get("catalog") or extras["model_config"]["catalog"])


def label_values(catalog: Catalog) -> Dict[str, int]:
    """Anatomy name -> value in the label map (the catalog's first label; 1-based position without one),
    the rule of :meth:`~anatomy_vlp_bundle.inference.Predictor.label_map`."""
    return {a.name: int(a.labels[0]) if a.labels else i + 1 for i, a in enumerate(catalog.anatomies)}


def _first(value: Any) -> Any:
    """MONAI Label clients send a config option that is a list (e.g. devices) back as the list."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


class ServedModel:
    """The model file the app serves, shared by its tasks: the last existing file of ``model_paths``,
    one :class:`Predictor` (reloaded when the file changes or another device is asked for)."""

    def __init__(self, model_paths: Sequence[Optional[str]]) -> None:
        self.model_paths = [str(p) for p in model_paths if p]
        self._lock = threading.Lock()
        self._predictor: Optional[Predictor] = None
        self._predictor_key: Optional[Tuple[str, float, str]] = None
        self._catalog: Optional[Catalog] = None
        self._catalog_key: Optional[Tuple[str, float]] = None

    def path(self) -> Optional[str]:
        return current_model(self.model_paths)

    def require_path(self) -> str:
        path = self.path()
        if path is None:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"no model file: none of {self.model_paths} exists (train first, or start the app with --conf model <checkpoint>)",
            )
        return path

    def predictor(self, device: str = "cpu") -> Predictor:
        path = self.require_path()
        key = (path, os.path.getmtime(path), str(device))
        with self._lock:
            if self._predictor is None or self._predictor_key != key:
                logger.info("loading model %s on %s", path, device)
                self._predictor = Predictor.load(path, device=device)
                self._predictor_key = key
                self._catalog, self._catalog_key = self._predictor.catalog, key[:2]
            return self._predictor

    def catalog(self) -> Optional[Catalog]:
        """The served model's catalog (None without a model file)."""
        path = self.path()
        if path is None:
            return None
        key = (path, os.path.getmtime(path))
        with self._lock:
            if self._catalog is None or self._catalog_key != key:
                self._catalog, self._catalog_key = model_catalog(path), key
            return self._catalog


class AnatomyVLPInferTask(InferTask):
    """What the two tasks share: the served model, the device option, the refreshed labels.

    Args:
        model: the :class:`ServedModel` (one per app, so the model is in memory once).
        type: MONAI Label infer type.
        description: shown by MONAI Label clients.
        config: options MONAI Label clients show and send back with each request.
    """

    def __init__(self, model: ServedModel, type: Union[str, InferType], description: str,
                 config: Optional[Dict[str, Any]] = None) -> None:
        catalog = model.catalog()
        super().__init__(type=type, labels=self.task_labels(catalog) if catalog else None,
                         dimension=catalog.spatial_dims if catalog else 3, description=description,
                         config={"device": device_list(), **(config or {})})
        self.model = model

    def get_path(self, validate: bool = True) -> Optional[str]:
        return self.model.path()

    def is_valid(self) -> bool:
        return self.get_path() is not None

    def task_labels(self, catalog: Catalog) -> Any:
        return label_values(catalog)

    def info(self) -> Dict[str, Any]:
        catalog = self.model.catalog()
        if catalog is not None:  # the served model may have changed (training)
            self.dimension = catalog.spatial_dims
            self.labels = self.task_labels(catalog)
        out = super().info()
        out["model"] = self.get_path()
        if catalog is not None:
            out["catalog"] = catalog.name
            out["modality"] = catalog.modality
        return out

    # ------------------------------------------------------------------ request
    def _predict(self, request: Dict[str, Any], mask: Optional[str] = None, checkpoint_only: bool = False):
        """``(predictor, prediction, seconds)`` for the request's image (and label map ``mask``).

        Before the model is loaded, the image must be a file of the served model's formats with a readable
        header and the label map must decode (it is read inside the preprocessing chain, whose errors
        are not the reader's); an image the reader cannot decode is refused too
        (:class:`~.uploads.UploadRejected`, HTTP 4xx). Any other failure is an inference error.
        """
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise UploadRejected(404, f"{type(self).__name__}: no image (give a datastore image id or upload a file)")
        if not os.path.exists(image):
            raise UploadRejected(404, f"image {image} does not exist")
        catalog = self.model.catalog()
        check_image_file(image, "image", catalog, decode=False)
        if mask is not None:
            check_image_file(mask, "label", catalog, decode=True)
        predictor = self.model.predictor(name_to_device(_first(request.get("device"))))
        if checkpoint_only and predictor.kind != "checkpoint":
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"model {predictor.path} is TorchScript (boxes and findings only): {type(self).__name__} needs the "
                "training checkpoint (--conf model <model.pt>)",
            )
        start = time.time()
        try:
            pred = predictor.predict(image, mask)
        except ImageReadError as e:
            raise UploadRejected(422, f"not a readable image: {e}") from e
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise MONAILabelException(MONAILabelError.INFERENCE_ERROR, f"image {image}: {e}") from e
        return predictor, pred, time.time() - start


class AnatomyRegionsInfer(AnatomyVLPInferTask):
    """``anatomy_vlp_regions``: the anatomy label map in the input's own space (training checkpoint only).

    Request options: ``threshold`` (a voxel belongs to an anatomy when its probability reaches it,
    default 0.5), ``device``. Returns the label file (NIfTI for CT, 16-bit PNG for CXR) and the
    contract result with ``label_names`` (anatomy -> value) and ``latencies`` added.
    """

    def __init__(self, model: ServedModel, threshold: float = 0.5) -> None:
        super().__init__(
            model, InferType.SEGMENTATION,
            "Anatomy regions predicted by the anatomy-aware vision-language model (research use only)",
            config={"threshold": threshold},
        )
        self.threshold = threshold

    def __call__(self, request: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
        start = time.time()
        predictor, pred, t_predict = self._predict(request, checkpoint_only=True)
        suffix = ".nii.gz" if predictor.catalog.spatial_dims == 3 else ".png"
        out = tempfile.NamedTemporaryFile(suffix=suffix, prefix="anatomy_vlp_regions_", delete=False).name
        t_write = time.time()
        predictor.label_map(pred, out, threshold=float(_first(request.get("threshold", self.threshold))))
        params = dict(pred.result)
        params["label_names"] = label_values(predictor.catalog)
        params["latencies"] = {"predict": round(t_predict, 3), "write": round(time.time() - t_write, 3),
                               "total": round(time.time() - start, 3)}
        return out, params


class AnatomyFindingsInfer(AnatomyVLPInferTask):
    """``anatomy_vlp_findings``: the contract result (no label) — zero-shot findings per anatomy,
    abnormality, boxes, study findings and report; ``latencies`` added.

    A ``label`` in the request (a label map file, e.g. uploaded with ``POST /infer/...`` or a
    corrected ``anatomy_vlp_regions`` result) makes its regions the anatomies' regions instead of the
    model's own (``"regions": "mask"``; training checkpoint only).
    """

    def __init__(self, model: ServedModel) -> None:
        super().__init__(
            model, InferType.CLASSIFICATION,
            "Zero-shot findings, abnormality and boxes per anatomy, with a report (research use only)",
        )

    def task_labels(self, catalog: Catalog) -> Any:
        return []  # no label map: the findings travel in the params

    def info(self) -> Dict[str, Any]:
        out = super().info()
        catalog = self.model.catalog()
        if catalog is not None:
            out["findings"] = {a.name: list(a.findings) for a in catalog.anatomies}
            out["study_findings"] = list(catalog.study_findings)
        return out

    def __call__(self, request: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
        start = time.time()
        mask = request.get("label")
        if mask is not None and not (isinstance(mask, str) and Path(mask).is_file()):
            raise UploadRejected(422, f"label {mask!r}: not a label map file")
        _, pred, t_predict = self._predict(request, mask)
        params = dict(pred.result)
        params["latencies"] = {"predict": round(t_predict, 3), "total": round(time.time() - start, 3)}
        return None, params
