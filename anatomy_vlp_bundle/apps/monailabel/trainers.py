"""MONAI Label train task: the bundle's training (``configs/train.yaml``, run id ``run``) on whole records.

MONAI Label's stock ``BundleTrainTask`` rewrites every record to ``{image, label}`` and would drop
what vision-language pre-training learns from: reports, per-anatomy sentences and findings. This
task writes a contract datalist (``../shared/DATA_CONTRACT.md``) instead:

- one record per datastore image with a **final** label: the image, the label as ``anatomy_mask``,
  and the text of the image's record in a contract ``datalist.json`` of the studies folder (matched by
  record ``id`` or by image file name), overridden by the same fields in the datastore's per-image
  info (``report``, ``anatomy_sentences``, ``findings``, ``study_findings``, ``patient``), which
  clients can edit (``PUT /datastore/image/info``);
- ``anatomy_masks`` of anatomies the label map covers are dropped (the final label replaces them),
  the others (regions without label values, e.g. overlapping CXR zones) are kept;
- split into ``training`` / ``validation`` by patient (by image without ``patient``);
- the catalog of the studies datalist (else the served model's) written beside it.

The bundle then runs with ``dataset_dir`` = that datalist's folder, ``ckpt_dir`` under the app's
model folder (``model.pt`` = best validation round, the file the infer tasks switch to), and the
request's options; ``pretrained`` starts from the served training checkpoint (its architecture and
preprocessing, weights loaded strictly).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import device_list, name_to_device

from anatomy_vlp_bundle.data.catalog import Catalog
from anatomy_vlp_bundle.data.datalist import SPLITS, load_datalist, write_datalist
from anatomy_vlp_bundle.inference.batch import image_stem

__all__ = ["AnatomyVLPTrainTask", "TEXT_FIELDS", "contract_records", "split_by_patient", "studies_records"]

logger = logging.getLogger(__name__)

#: record fields taken from the studies datalist / the datastore's per-image info
TEXT_FIELDS = ("report", "anatomy_sentences", "findings", "study_findings", "patient")


def studies_records(datalist_path: str | Path) -> Tuple[Dict[str, Dict[str, Any]], Catalog]:
    """Records of every split of a contract datalist (absolute paths), keyed by ``id`` and by image
    file name without extension, and its catalog."""
    dl = load_datalist(datalist_path)
    index: Dict[str, Dict[str, Any]] = {}
    for split in SPLITS:
        for rec in dl.records(split):
            index.setdefault(str(rec["id"]), rec)
            if rec.get("image"):
                index.setdefault(image_stem(rec["image"]), rec)
    return index, dl.catalog()


def contract_records(datastore: Datastore, catalog: Catalog,
                     known: Optional[Dict[str, Dict[str, Any]]] = None) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """Contract records of the datastore's images with a final label.

    Args:
        datastore: MONAI Label datastore.
        catalog: the catalog the label maps use (decides which ``anatomy_masks`` they replace).
        known: records of a contract datalist, keyed by id / image stem (:func:`studies_records`).

    Returns:
        ``(records, counts)``; counts of records ``matched`` to the datalist, with ``info`` text
        from the datastore, and ``without_text`` (neither report nor findings nor sentences).
    """
    known = known or {}
    labelled_by_map = {a.name for a in catalog.anatomies if a.labels}
    records, counts = [], {"matched": 0, "info": 0, "without_text": 0}
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
        image = datastore.get_image_uri(image_id)
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
        label = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL) if label_id else ""
        if not image or not label:
            logger.warning("training: image %s has no readable image/final label file, skipped", image_id)
            continue
        source = known.get(str(image_id)) or known.get(image_stem(image))
        record: Dict[str, Any] = {}
        if source is not None:
            counts["matched"] += 1
            record.update({k: copy.deepcopy(v) for k, v in source.items() if k in TEXT_FIELDS + ("anatomy_masks", "anatomy_boxes")})
            masks = {k: v for k, v in (record.pop("anatomy_masks", None) or {}).items() if k not in labelled_by_map}
            if masks:
                record["anatomy_masks"] = masks
        info = datastore.get_image_info(image_id) or {}
        from_info = {k: copy.deepcopy(info[k]) for k in TEXT_FIELDS if info.get(k) not in (None, "", {}, [])}
        if from_info:
            counts["info"] += 1
            record.update(from_info)
        record.update({"id": str(image_id), "image": str(image), "anatomy_mask": str(label)})
        if not (record.get("report") or record.get("findings") or record.get("anatomy_sentences")):
            counts["without_text"] += 1
        records.append(record)
    return records, counts


def split_by_patient(records: Sequence[Dict[str, Any]], val_split: float, seed: int = 0) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """``(training, validation)``: about ``val_split`` of the patients (images without ``patient``
    count as their own patient) in validation, at least one, never all."""
    if not 0.0 < float(val_split) < 1.0:
        raise ValueError(f"val_split must be in (0, 1) (validation picks the checkpoint and its thresholds), got {val_split}")
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(str(rec.get("patient") or f"image:{rec['id']}"), []).append(rec)
    if len(groups) < 2:
        raise ValueError(f"training needs images of at least 2 patients with a final label (one for validation); found {len(groups)}")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val = min(len(keys) - 1, max(1, round(float(val_split) * len(keys))))
    val = [r for k in keys[:n_val] for r in groups[k]]
    train = [r for k in keys[n_val:] for r in groups[k]]
    return train, val


def _finite(value: Any) -> Optional[float]:
    """A metric for JSON (MONAI Label serves the stats; NaN, e.g. AUC on one validation case, is not JSON)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _option(request: Dict[str, Any], key: str, default: Any) -> Any:
    value = request.get(key, default)
    if isinstance(value, (list, tuple)):  # a client sends a list option (devices) back as the list
        value = value[0] if value else default
    return default if value is None or value == "" else value


class AnatomyVLPTrainTask(TrainTask):
    """Train the bundle on the datastore's final labels with the records' reports and findings.

    Args:
        bundle_root: the bundle folder (``configs/train.yaml``).
        output_dir: where this task writes: ``datalist/`` (the hand-over), ``runs/`` (logs),
            checkpoints (``model.pt``, ``checkpoint_epoch=N.pt``) and ``train_stats.json``.
        current_model: returns the served model file (the ``pretrained`` start), or None.
        studies: the studies folder (its ``datalist.json``, when present, gives the records' text).
        description: shown by MONAI Label clients.

    Request options (besides ``model``): ``max_epochs``, ``val_split``, ``val_interval``,
    ``batch_size``, ``learning_rate``, ``device``, ``pretrained``, ``seed``, and ``overrides`` (a dict
    or its JSON text) of further bundle config overrides, e.g. ``{"network_def#hidden_size": 32}``.
    """

    def __init__(self, bundle_root: str, output_dir: str, current_model: Callable[[], Optional[str]],
                 studies: Optional[str] = None, description: str = "") -> None:
        super().__init__(description or "Anatomy-aware vision-language pre-training on the final labels and the reports")
        self.bundle_root = Path(bundle_root)
        self.output_dir = Path(output_dir)
        self.current_model = current_model
        self.studies = studies
        self.train_config = self.bundle_root / "configs" / "train.yaml"
        if not self.train_config.is_file():
            raise FileNotFoundError(f"bundle_root {self.bundle_root}: {self.train_config} does not exist (--conf bundle_root <bundle folder>)")

    # ------------------------------------------------------------------ MONAI Label surface
    def config(self) -> Dict[str, Any]:
        return {
            "device": device_list(),
            "pretrained": True,        # start from the served training checkpoint
            "max_epochs": 15,
            "val_split": 0.2,
            "val_interval": 3,         # capped at max_epochs: the last validated round is model.pt
            "batch_size": 4,
            "learning_rate": 0.0005,
            "seed": 0,
            "overrides": {},           # further bundle overrides, e.g. {"network_def#hidden_size": 32}
        }

    def stats(self) -> Dict[str, Any]:
        path = self.output_dir / "train_stats.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        try:
            return self.train(request, datastore)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise MONAILabelException(MONAILabelError.APP_TRAIN_FAILED, f"{type(self).__name__}: {e}") from e

    # ------------------------------------------------------------------ steps
    def build_datalist(self, datastore: Datastore, val_split: float, seed: int) -> Tuple[Path, Catalog, Dict[str, Any]]:
        """The hand-over: ``<output_dir>/datalist/datalist.json`` + ``catalog.json``."""
        known: Dict[str, Dict[str, Any]] = {}
        catalog: Optional[Catalog] = None
        studies_datalist = Path(self.studies) / "datalist.json" if self.studies and not str(self.studies).startswith("http") else None
        if studies_datalist is not None and studies_datalist.is_file():
            known, catalog = studies_records(studies_datalist)
            logger.info("training: text of the records from %s", studies_datalist)
        if catalog is None:
            model = self.current_model()
            if model is None:
                raise ValueError(
                    "no catalog: put a contract datalist.json in the studies folder or configure a model (--conf model)"
                )
            from .infers import model_catalog

            catalog = model_catalog(model)
        records, counts = contract_records(datastore, catalog, known)
        if not records:
            raise ValueError("no image of the datastore has a final label (labels/final): nothing to train on")
        if counts["without_text"]:
            logger.warning("training: %d of %d records have no report, sentences or findings (masks only)",
                           counts["without_text"], len(records))
        train, val = split_by_patient(records, val_split, seed)
        folder = self.output_dir / "datalist"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "catalog.json").write_text(json.dumps(catalog.to_dict(), indent=1) + "\n")
        path = write_datalist(folder / "datalist.json", name="monailabel", modality=catalog.modality, catalog="catalog.json",
                              splits={"training": train, "validation": val})
        summary = {"records": len(records), "training": len(train), "validation": len(val), **counts}
        logger.info("training datalist %s: %s", path, summary)
        return path, catalog, summary

    def warm_start(self, catalog: Catalog) -> Tuple[Optional[str], Dict[str, Any]]:
        """The served training checkpoint and the overrides that rebuild its network and preprocessing."""
        path = self.current_model()
        if path is None or path.endswith(".ts"):
            logger.info("pretrained: no training checkpoint to start from (%s): training from scratch", path)
            return None, {}
        from anatomy_vlp_bundle.engines.checkpoint import load_checkpoint

        extras = load_checkpoint(path).get("extras") or {}
        config = dict(extras.get("model_config") or {})
        if not config:
            raise ValueError(f"pretrained: checkpoint {path} carries no model configuration")
        own = [(a.name, list(a.findings)) for a in catalog.anatomies]
        theirs = [(a["name"], list(a.get("findings", []))) for a in (extras.get("catalog") or config["catalog"])["anatomies"]]
        if own != theirs:
            raise ValueError(
                f"pretrained: checkpoint {path} was trained on other anatomies/findings than the training catalog "
                f"{catalog.name!r}; set pretrained false to train from scratch"
            )
        config.pop("catalog", None)
        overrides: Dict[str, Any] = {
            "network_def": {"_target_": "anatomy_vlp_bundle.networks.vlp_model.AnatomyVLPModel", "catalog": "@catalog", **config},
            "roi_size": list(config["img_size"]) if isinstance(config.get("img_size"), (list, tuple)) else config.get("img_size"),
        }
        pre = extras.get("preprocessing") or {}
        for key in ("spacing", "hu_window"):
            if key in pre:
                overrides[key] = pre[key]
        return path, overrides

    def overrides(self, request: Dict[str, Any], datalist: Path, catalog: Catalog, n_train: int) -> Tuple[Dict[str, Any], Optional[str]]:
        """Bundle overrides for the request, and the checkpoint to start from (``pretrained``)."""
        max_epochs = int(_option(request, "max_epochs", 15))
        batch_size = int(_option(request, "batch_size", 4))
        if batch_size > n_train:  # the training loader drops the last incomplete batch: no step at all otherwise
            logger.warning("batch_size %d > %d training records: using %d", batch_size, n_train, n_train)
            batch_size = n_train
        ov: Dict[str, Any] = {
            "bundle_root": str(self.bundle_root),
            "dataset_dir": str(datalist.parent),
            "ckpt_dir": str(self.output_dir),
            "output_dir": str(self.output_dir / "runs"),
            "modality": catalog.modality.lower(),
            "device": name_to_device(_option(request, "device", None)),
            "max_epochs": max_epochs,
            "val_interval": max(1, min(int(_option(request, "val_interval", 3)), max_epochs)),
            "batch_size": batch_size,
            "learning_rate": float(_option(request, "learning_rate", 0.0005)),
            "seed": int(_option(request, "seed", 0)),
            "show_progress": False,
            "resume": False,
        }
        ov["device"] = f"$torch.device('{ov['device']}')"
        start = None
        if str(_option(request, "pretrained", True)).lower() not in ("false", "0", "no"):
            start, warm = self.warm_start(catalog)
            ov.update(warm)
        extra = request.get("overrides") or {}
        if isinstance(extra, str):
            try:
                extra = json.loads(extra)
            except json.JSONDecodeError as e:
                raise ValueError(f"overrides: not a JSON object ({e})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"overrides: must be a dict of bundle config overrides, got {type(extra).__name__}")
        ov.update(extra)
        return ov, start

    def train(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        from monai.bundle import ConfigWorkflow

        logger.info("train request: %s", request)
        started = time.time()
        seed = int(_option(request, "seed", 0))
        datalist, catalog, summary = self.build_datalist(datastore, float(_option(request, "val_split", 0.2)), seed)
        overrides, start = self.overrides(request, datalist, catalog, summary["training"])
        configs = [str(self.train_config)]
        if catalog.spatial_dims == 2:
            configs.append(str(self.bundle_root / "configs" / "cxr.yaml"))
        # the host (MONAI Label) owns logging: the bundle's logging.conf would disable its loggers
        workflow = ConfigWorkflow(config_file=configs, logging_file=False, workflow_type="train", run_id="run", **overrides)
        workflow.initialize()
        try:
            if start is not None:
                self._load_weights(workflow, start)
            workflow.run()
            trainer = workflow.parser.get_parsed_content("train#trainer")
            evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        finally:
            workflow.finalize()
        best = self.output_dir / "model.pt"
        stats = {
            "model": request.get("model"),
            "checkpoint": str(best) if best.is_file() else None,
            "pretrained": start,
            "epochs": int(trainer.state.epoch),
            "iterations": int(trainer.state.iteration),
            "best_metric": _finite(evaluator.state.best_metric) if evaluator.state.best_metric_epoch > 0 else None,
            "best_metric_epoch": int(evaluator.state.best_metric_epoch),
            "key_metric": "val_mean_auc",
            "datalist": str(datalist),
            **summary,
            "total_time": round(time.time() - started, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "train_stats.json").write_text(json.dumps(stats, indent=2))
        logger.info("training finished: %s", stats)
        return stats

    @staticmethod
    def _load_weights(workflow: Any, path: str) -> None:
        """Strict load of the checkpoint's weights into the configured network (after ``initialize``,
        so the checkpoint's prompt embeddings and thresholds are the ones trained with it)."""
        from anatomy_vlp_bundle.engines.checkpoint import load_checkpoint

        network = workflow.parser.get_parsed_content("network_def")
        try:
            network.load_state_dict(load_checkpoint(path)["model"], strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"pretrained: the weights of {path} do not fit the configured network (network overrides given? set "
                f"pretrained false to train from scratch): {e}"
            ) from e
        logger.info("pretrained: weights loaded from %s", path)
