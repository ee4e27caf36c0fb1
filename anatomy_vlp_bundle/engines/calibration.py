"""Calibration on the validation split, stored in the model so every checkpoint carries it.

- Decision thresholds per (anatomy, finding) and per study finding: the ROC point closest to
  (FPR 0, TPR 1) (:func:`closest_to_corner_threshold`), written to the model's ``thresholds`` /
  ``study_thresholds`` buffers.
- The normality prior's abnormality calibration: per-anatomy quantiles of the worst-patch score
  of *normal* validation anatomies (``networks.normality_prior.fit_score_calibration``) written with
  ``set_score_calibration``.

:class:`CalibrationHandler` collects the image-only (``"predicted"``) outputs of the validation
evaluator and calibrates at its ``EPOCH_COMPLETED``; attach it to the evaluator BEFORE the
checkpoint saver so the saved best model holds the calibration of its own validation round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from ..data.labels import ABSENT, PRESENT
from ..metrics.diagnosis import roc_curve, youden_closest_threshold

__all__ = ["closest_to_corner_threshold", "choose_thresholds", "calibrate_model", "CalibrationHandler"]

logger = logging.getLogger(__name__)


def closest_to_corner_threshold(probs: np.ndarray, labels: np.ndarray, default: float = 0.5) -> float:
    """Threshold whose ROC point is closest to (FPR 0, TPR 1).

    Args:
        probs: ``(N,)`` scores; labels: ``(N,)`` 1 (positive) / 0 (negative); other codes ignored.
        default: returned when either class is missing.

    Returns:
        the chosen score threshold (predict positive when ``prob >= threshold``).
    """
    # One ROC implementation for the whole bundle: the metrics package's.
    threshold = youden_closest_threshold(*roc_curve(np.asarray(probs).ravel(), np.asarray(labels).ravel()))
    return float(default) if threshold is None else float(threshold)


def choose_thresholds(probs: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor] = None, default: float = 0.5) -> torch.Tensor:
    """Per-column thresholds: ``probs``/``labels`` ``(N, *C)`` -> ``(*C)`` (``valid`` ``(*C)`` bool: others keep ``default``)."""
    shape = probs.shape[1:]
    p = probs.reshape(probs.shape[0], -1).float().numpy()
    y = labels.reshape(labels.shape[0], -1).long().numpy()
    v = np.ones(p.shape[1], bool) if valid is None else valid.reshape(-1).bool().numpy()
    out = np.full(p.shape[1], default, dtype=np.float32)
    for j in np.nonzero(v)[0]:
        out[j] = closest_to_corner_threshold(p[:, j], y[:, j], default)
    return torch.from_numpy(out).reshape(shape)


def calibrate_model(model: torch.nn.Module, outputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Set thresholds and (with a prior) the abnormality calibration from concatenated outputs.

    Args:
        model: ``AnatomyVLPModel`` (DDP unwrapped here).
        outputs: ``zero_shot_probs`` (N, M, F), ``findings`` (N, M, F), ``study_probs`` (N, S),
            ``study_findings`` (N, S), ``anatomy_score`` (N, M), ``anatomy_normal`` (N, M) bool
            (the ``"predicted"`` outputs of :class:`~anatomy_vlp_bundle.engines.iteration.VLPEvalIteration`).

    Returns:
        a summary: ``thresholds_set`` (how many (anatomy, finding) had both classes), ``normal_scores``.
    """
    from ..networks.normality_prior import fit_score_calibration

    net = getattr(model, "module", model)
    valid = net.prompt_valid.cpu()
    thresholds = choose_thresholds(outputs["zero_shot_probs"], outputs["findings"], valid)
    study = (
        choose_thresholds(outputs["study_probs"], outputs["study_findings"])
        if outputs["study_probs"].shape[-1]
        else torch.zeros(0)
    )
    net.set_thresholds(thresholds, study)
    labels = outputs["findings"]
    both = ((labels == PRESENT).any(0) & (labels == ABSENT).any(0) & valid).sum()
    summary: dict[str, Any] = {"thresholds_set": int(both), "normal_scores": 0}
    if getattr(net, "prior", None) is not None:
        normal = outputs["anatomy_normal"].bool()
        scores = outputs["anatomy_score"][normal]
        ids = torch.nonzero(normal)[:, 1]
        if scores.numel():
            net.set_score_calibration(
                fit_score_calibration(scores, ids, net.num_anatomies, net.prior.score_quantiles.shape[1]).to(
                    net.prior.score_quantiles.device
                )
            )
            summary["normal_scores"] = int(scores.numel())
        else:
            logger.warning("calibration: no normal anatomy in the validation outputs; abnormality left uncalibrated")
    return summary


class CalibrationHandler:
    """Collects the evaluator's outputs of one region mode and calibrates the model per epoch.

    Args:
        network: the model to calibrate.
        mode: the region mode whose outputs are used (``"predicted"``: what the deployed model sees).
        enabled: turn off without removing it from the config.
    """

    KEYS = ("zero_shot_probs", "findings", "study_probs", "study_findings", "anatomy_score", "anatomy_normal")

    def __init__(self, network: torch.nn.Module, mode: str = "predicted", enabled: bool = True) -> None:
        self.network = network
        self.mode = mode
        self.enabled = bool(enabled)
        self._parts: dict[str, list[torch.Tensor]] = {}
        self.last_summary: Optional[dict[str, Any]] = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.calibrate)

    def reset(self, engine: Any = None) -> None:
        self._parts = {k: [] for k in self.KEYS}

    def collect(self, engine: Any) -> None:
        out = (engine.state.output or {}).get(self.mode)
        if not out:
            return
        for k in self.KEYS:
            self._parts.setdefault(k, []).append(out[k])

    def calibrate(self, engine: Any = None) -> Optional[dict[str, Any]]:
        if not self.enabled or not self._parts.get("zero_shot_probs"):
            return None
        outputs = {k: torch.cat(v, 0) for k, v in self._parts.items()}
        self.last_summary = calibrate_model(self.network, outputs)
        logger.info("calibration on %d validation cases: %s", outputs["zero_shot_probs"].shape[0], self.last_summary)
        return self.last_summary
