"""Small helpers the bundle configs call (``configs/train.yaml``, ``evaluate.yaml``, ``cxr.yaml``).

The config is the composition root: these functions know nothing about it. Each does one thing
the YAML cannot say in an expression: prepare and check the datalist, warm the text cache, build
optimizer parameter groups, pick the checkpoint to resume, pick the loss terms to log, write the
evaluation report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "prepare_datalist",
    "warm_sentence_cache",
    "parameter_groups",
    "resume_checkpoint",
    "resumable_objects",
    "loss_terms",
    "region_output",
    "focal_findings",
    "EvaluationReport",
    "EpochTimer",
    "TerminateOnNan",
    "ValidateLastEpoch",
    "evaluate_outputs",
]

logger = logging.getLogger(__name__)


def prepare_datalist(dataset_dir: str, datalist: Optional[str] = None, modality: str = "ct", generate: bool = True,
                     validate: bool = True, **synth_kwargs) -> str:
    """The datalist to train on, generated and checked first.

    Args:
        dataset_dir: folder of the dataset; when ``datalist`` is None its ``datalist.json`` is used,
            and (``generate``) the default synthetic dataset of ``modality`` is written there when it
            has none.
        datalist: an explicit datalist path (overrides ``dataset_dir``; never generated).
        modality: ``"ct"`` or ``"cxr"`` (synthetic generation only).
        validate: run ``data.validate.validate_datalist`` (header-only) and refuse a datalist with errors.
        synth_kwargs: options of the synthetic generator (e.g. ``n``, ``shape``).

    Returns:
        the datalist path (str).

    Raises:
        FileNotFoundError: no datalist and generation is off; ValueError: the datalist has errors
        (the message lists the first ones with their split and record).
    """
    if datalist is None:
        path = Path(dataset_dir) / "datalist.json"
        if not path.exists():
            if not generate:
                raise FileNotFoundError(f"{path} does not exist (set dataset_dir or datalist, or generate the synthetic set)")
            from ..synthetic import ensure_synthetic_dataset

            logger.info("no datalist in %s: generating the default synthetic %s dataset", dataset_dir, modality)
            ensure_synthetic_dataset(str(dataset_dir), modality=modality, **synth_kwargs)
    else:
        path = Path(datalist)
        if not path.exists():
            raise FileNotFoundError(f"datalist {path} does not exist")
    if validate:
        from ..data.validate import validate_datalist

        report = validate_datalist(path)
        if report.errors:
            listing = "; ".join(p.format() for p in report.errors[:5])
            raise ValueError(f"{path}: the datalist has {len(report.errors)} error(s), training refuses it: {listing}")
    return str(path)


def warm_sentence_cache(sentence_targets: Any, datalist: str, splits: Sequence[str] = ("training",)) -> int:
    """Parse every report of ``splits`` (no images) and encode all its sentences once.

    After this the training loop never runs the text encoder (every text hits the embedding
    cache). Returns the number of texts warmed.
    """
    from ..data.datalist import load_datalist
    from ..text.reports import ParseReportd

    dl = load_datalist(datalist)
    parser = ParseReportd(sentence_targets.catalog)
    sentences = []
    for split in splits:
        for record in dl.records(split):
            parsed = parser({k: v for k, v in record.items() if k in ("report", "anatomy_sentences", "findings", "study_findings")})
            sentences.append(parsed.get("sentences") or [])
    start = time.time()
    n = sentence_targets.warm(sentences)
    logger.info("text cache warmed: %d texts in %.1f s", n, time.time() - start)
    return n


def parameter_groups(
    network: torch.nn.Module,
    weight_decay: float,
    lr: Optional[float] = None,
    lr_scale: Optional[Mapping[str, float]] = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay on the model's ``no_weight_decay()`` names, and
    ``lr * scale`` for the parameters under each ``lr_scale`` prefix (e.g. ``{"seg_head": 4.0}``;
    schedulers such as MONAI's ``WarmupCosineSchedule`` scale every group's own rate).

    Args:
        network: the model (or a DDP wrapper).
        weight_decay: AdamW weight decay of the decayed groups.
        lr: the base learning rate (needed with ``lr_scale``).
        lr_scale: module-name prefix -> learning-rate factor; a prefix matching no parameter is an error.
    """
    net = getattr(network, "module", network)
    skip = set(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else set()
    scales = {str(k): float(v) for k, v in (lr_scale or {}).items()}
    if scales and lr is None:
        raise ValueError("parameter_groups: lr_scale needs the base lr")
    named = list(net.named_parameters())
    for prefix in scales:
        if not any(n == prefix or n.startswith(prefix + ".") for n, _ in named):
            raise ValueError(f"parameter_groups: lr_scale prefix {prefix!r} matches no parameter of the model")

    def scale_of(name: str) -> float:
        for prefix, factor in scales.items():
            if name == prefix or name.startswith(prefix + "."):
                return factor
        return 1.0

    groups: dict[tuple[bool, float], list] = {}
    for n, p in named:
        groups.setdefault((n in skip, scale_of(n)), []).append(p)
    out = []
    for (no_decay, factor), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0 if no_decay else float(weight_decay)}
        if scales:
            group["lr"] = float(lr) * factor
        out.append(group)
    return out


def resume_checkpoint(ckpt_dir: str, resume: bool) -> Optional[str]:
    """The checkpoint to resume from (``resume`` and one exists), else None.

    The newest ``checkpoint_epoch=N.pt`` whose checksum (when written) matches and which loads
    with ``weights_only=True``; every newer one that fails is named in a warning and skipped.

    Raises:
        ValueError: when checkpoints exist but none is usable (nothing is silently restarted).
    """
    if not resume:
        return None
    from .checkpoint import epoch_checkpoints, verify_checkpoint

    found = epoch_checkpoints(ckpt_dir)
    if not found:
        logger.info("resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        return None
    problems = []
    for path in found:
        try:
            verify_checkpoint(path)
        except (OSError, ValueError) as e:
            logger.warning("resume: skipping %s: %s", path, e)
            problems.append(f"{path}: {e}")
            continue
        logger.info("resume: from %s", path)
        return path
    raise ValueError(f"resume: no usable checkpoint in {ckpt_dir}:\n  " + "\n  ".join(problems))


def resumable_objects(save_dict: Mapping[str, Any], path: Optional[str]) -> dict[str, Any]:
    """The objects of ``save_dict`` that the checkpoint at ``path`` holds (all of them without one):
    the ``CheckpointLoader``'s ``load_dict``. A checkpoint written before an object was added to the
    save_dict (the weight average of 0.7.1) resumes the rest, and the missing ones start fresh,
    named in a warning, instead of the loader failing on the missing key."""
    if path is None:
        return dict(save_dict)
    keys = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))  # the keys only: no tensor data read
    missing = [k for k in save_dict if k not in keys]
    if missing:
        logger.warning("resume: %s holds no %s; they start fresh", path, missing)
    return {k: v for k, v in save_dict.items() if k in keys}


#: iteration outputs that are bookkeeping, not losses
_NOT_LOSSES = ("lr", "batch_size", "skipped")


def loss_terms(output: Mapping[str, Any]) -> dict[str, float]:
    """Every loss term of a training step's output (``loss``, ``detection``, ``detection.giou``, ...)."""
    return {k: float(v) for k, v in (output or {}).items() if k not in _NOT_LOSSES and isinstance(v, (int, float))}


def region_output(mode: str):
    """Output transform selecting one region mode's outputs of ``VLPEvalIteration``."""

    def select(output: Mapping[str, Any]) -> Mapping[str, Any]:
        return (output or {}).get(mode) or {}

    return select


def focal_findings(catalog: Any) -> Optional[list[list[str]]]:
    """The small focal findings group of the synthetic CT catalog as ``[anatomy, finding]`` pairs
    (``synthetic.ct.FOCAL_FINDINGS``); None for other catalogs (the group is then absent)."""
    from ..synthetic import ct as synth_ct

    name = getattr(catalog, "name", None) or (catalog.get("name") if isinstance(catalog, Mapping) else catalog)
    if name != getattr(synth_ct, "CATALOG_NAME", None):
        return None
    return [list(pair) for pair in synth_ct.FOCAL_FINDINGS]


class TerminateOnNan:
    """Ignite's ``TerminateOnNan`` on the step's total ``loss``, attachable from a config handler list."""

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events
        from ignite.handlers import TerminateOnNan as _TerminateOnNan

        engine.add_event_handler(Events.ITERATION_COMPLETED, _TerminateOnNan(output_transform=lambda out: out["loss"]))


class ValidateLastEpoch:
    """Runs the validator after the last epoch when MONAI's ``ValidationHandler`` (every ``interval``
    epochs) skips it: with validation every 3 of 20 epochs the last validated weights were epoch
    18's, and the final epochs, at the smallest learning rates, could never become the best
    checkpoint (the validation AUC of the default CT runs still rose at epoch 18, and at epoch 21
    of a 22-epoch run)."""

    def __init__(self, validator: Any, interval: int) -> None:
        self.validator = validator
        self.interval = int(interval)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        epoch = int(engine.state.epoch)
        if epoch == int(engine.state.max_epochs) and (self.interval <= 0 or epoch % self.interval != 0):
            self.validator.run(epoch)


class EpochTimer:
    """Logs the wall time of every epoch and of the whole run (``engine.state.epoch_times``)."""

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Any) -> None:
        self.t0 = time.time()
        engine.state.epoch_times = []

    def epoch_started(self, engine: Any) -> None:
        self.te = time.time()

    def epoch_completed(self, engine: Any) -> None:
        dt = time.time() - self.te
        engine.state.epoch_times.append(dt)
        logger.info("epoch %d: %.1f s", engine.state.epoch, dt)

    def completed(self, engine: Any) -> None:
        logger.info("run: %.1f s (%d epochs)", time.time() - self.t0, len(engine.state.epoch_times))


class EvaluationReport:
    """Collects ``VLPEvalIteration`` outputs of every region mode and writes the metrics at the end.

    Per mode the metrics package computes per (anatomy, finding) AUC with bootstrap CIs, mean AUC,
    balanced accuracy and F1 at the model's stored thresholds, box IoU and presence accuracy, plus
    the mean AUC over ``focal_findings`` when given; the full result, its markdown table and the ROC
    PNGs go to ``output_dir/<mode>/``, the summary of every mode to ``output_dir/metrics.json``.

    Args:
        network: the evaluated model (its ``thresholds`` and catalog).
        output_dir: where ``metrics.json`` and the ROC PNGs go.
        modes: region modes to report.
        focal_findings: ``[anatomy, finding]`` pairs of the focal findings group (None: no group).
        n_boot: bootstrap resamples.
    """

    def __init__(self, network: torch.nn.Module, output_dir: str, modes: Sequence[str] = ("predicted", "mask"),
                 focal_findings: Optional[Sequence[str]] = None, n_boot: int = 1000) -> None:
        self.network = network
        self.output_dir = Path(output_dir)
        self.modes = tuple(modes)
        self.focal_findings = list(focal_findings) if focal_findings else None
        self.n_boot = int(n_boot)
        self._parts: dict[str, dict[str, list]] = {}
        self.result: Optional[dict[str, Any]] = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Any = None) -> None:
        self._parts = {m: {} for m in self.modes}

    def collect(self, engine: Any) -> None:
        for mode in self.modes:
            out = (engine.state.output or {}).get(mode)
            if not out:
                continue
            for k, v in out.items():
                self._parts[mode].setdefault(k, []).append(v)

    def gathered(self, mode: str) -> dict[str, Any]:
        parts = self._parts.get(mode) or {}
        out: dict[str, Any] = {}
        for k, v in parts.items():
            if k == "id":
                out[k] = [i for ids in v for i in ids]
            elif k == "finding_valid":
                out[k] = v[0]
            else:
                out[k] = torch.cat(v, 0)
        return out

    def write(self, engine: Any = None) -> dict[str, Any]:
        net = getattr(self.network, "module", self.network)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {}
        for mode in self.modes:
            data = self.gathered(mode)
            if not data:
                continue
            result[mode] = evaluate_outputs(
                data, net, self.output_dir / mode, focal_findings=self.focal_findings, n_boot=self.n_boot
            )
        path = self.output_dir / "metrics.json"
        path.write_text(json.dumps(result, indent=2, default=float))
        self.result = result
        summary = {m: {k: result[m].get(k) for k in ("mean_auc", "focal_mean_auc", "box_iou", "presence_accuracy", "mask_dice")} for m in result}
        logger.info("evaluation written to %s: %s", path, summary)
        return result


def evaluate_outputs(data: Mapping[str, Any], network: torch.nn.Module, output_dir: Path,
                     focal_findings: Optional[Sequence[Sequence[str]]] = None, n_boot: int = 1000) -> dict[str, Any]:
    """Metrics of one region mode's gathered outputs at the model's stored thresholds.

    Uses ``metrics.handlers.compute_zero_shot_metrics`` (per-pair AUC with bootstrap CIs, mean AUC,
    balanced accuracy, F1, box IoU, presence accuracy, abnormality AUC, the ``focal`` group) and
    ``metrics.report.write_metrics`` (``metrics.json``, ``metrics.md`` and ROC PNGs in ``output_dir``).

    Returns:
        the summary: ``mean_auc``, ``mean_auc_ci``, ``mean_balanced_accuracy``, ``mean_f1``,
        ``focal_mean_auc`` (None without the group), ``box_iou``, ``presence_accuracy``, ``mask_dice``
        (None without a mask head or given masks), ``abnormality_mean_auc``, ``n_cases``.
    """
    from ..metrics.handlers import compute_zero_shot_metrics
    from ..metrics.report import write_metrics

    cat = network.catalog
    groups = None
    if focal_findings:
        known = {(a.name, f) for a in cat.anatomies for f in a.findings}
        pairs = [list(p) for p in focal_findings if tuple(p) in known]
        groups = {"focal": pairs} if pairs else None
    arrays = {k: v for k, v in data.items() if isinstance(v, torch.Tensor) and k != "finding_valid"}
    if arrays["study_probs"].shape[-1] == 0:
        arrays.pop("study_probs"), arrays.pop("study_findings")
    thresholds = (network.thresholds.detach().cpu().numpy(), network.study_thresholds.detach().cpu().numpy())
    result = compute_zero_shot_metrics(arrays, cat, thresholds=thresholds, n_boot=n_boot, groups=groups)
    write_metrics(result, output_dir)
    diag = result.get("diagnosis", {})
    loc = result.get("localisation", {}) or {}
    focal = ((diag.get("groups") or {}).get("focal") or {}) if groups else {}
    return {
        "mean_auc": diag.get("mean_auc"),
        "mean_auc_ci": diag.get("mean_auc_ci"),
        "mean_balanced_accuracy": diag.get("mean_balanced_accuracy"),
        "mean_f1": diag.get("mean_f1"),
        "focal_mean_auc": focal.get("mean_auc") if isinstance(focal, Mapping) else None,
        "box_iou": loc.get("mean_iou"),
        "presence_accuracy": loc.get("presence_accuracy"),
        "mask_dice": loc.get("mean_dice"),
        "abnormality_mean_auc": (result.get("abnormality") or {}).get("mean_auc"),
        "n_cases": diag.get("n_cases"),
    }
