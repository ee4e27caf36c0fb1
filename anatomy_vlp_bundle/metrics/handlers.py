"""Ignite / MONAI engine integration of the zero-shot metrics.

:class:`ZeroShotMetric` is an :class:`ignite.metrics.Metric`: attach it to a MONAI
``SupervisedEvaluator`` as its key metric (``key_val_metric={"val_mean_auc": ZeroShotMetric(catalog)}``).
Every iteration it stores the batch's arrays from ``engine.state.output``; at the end of the
epoch it gathers them from all ranks (uneven shard sizes are fine), computes every metric with
:func:`compute_zero_shot_metrics`, returns the mean AUC (the value ``CheckpointSaver`` /
``key_metric`` compare) and leaves the full result in ``engine.state.metric_details[name]``
and in :attr:`ZeroShotMetric.details` (for ``report.write_metrics``), and the gathered arrays in
:attr:`ZeroShotMetric.collected`.

Engine output keys (``engine.state.output``, either one dict of batched tensors or MONAI's
decollated list of per-sample dicts; override names with ``keys``):

============================ ================== ==========================================================
key                          shape (per batch)  meaning
============================ ================== ==========================================================
``zero_shot_probs``          (B, M, F) float    P(finding j present in anatomy i), catalog order (required)
``findings``                 (B, M, F)          finding label codes 1 / 0 / -1 / -2 (required)
``study_probs``              (B, S) float       P(study finding present) (optional, with ``study_findings``)
``study_findings``           (B, S)             study finding label codes
``boxes_pred``               (B, M, 2D) float   predicted anatomy boxes, corner form (optional, with ``boxes_true``)
``boxes_true``               (B, M, 2D) float   target boxes in the same coordinates (e.g. ``anatomy_boxes``)
``presence_prob``            (B, M) float       predicted P(anatomy present) (optional)
``anatomy_presence``         (B, M)             presence codes 1 / 0 / -2 (needed by boxes and ``presence_prob``)
``abnormality``              (B, M) float       normality-prior abnormality score in [0, 1] (optional)
============================ ================== ==========================================================

Which optional keys are present must be the same in every iteration (and on every rank that
sees data). Tensors are detached and moved to the CPU as they arrive, so GPU memory does not grow.
Under DDP every rank must run the same number of ``compute`` calls (the gathers are collectives);
use a sampler that does not pad (``DistributedSampler`` repeats samples to even out shards, which
would count them twice; MONAI's ``partition_dataset(..., even_divisible=False)`` does not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric

from anatomy_vlp_bundle.data.catalog import Catalog, load_catalog

from .diagnosis import _to_numpy, choose_thresholds, evaluate_abnormality, evaluate_findings
from .localisation import evaluate_boxes

__all__ = ["OUTPUT_KEYS", "compute_zero_shot_metrics", "ZeroShotMetric"]

#: role -> default engine output key.
OUTPUT_KEYS: dict[str, str] = {
    "probs": "zero_shot_probs",
    "labels": "findings",
    "study_probs": "study_probs",
    "study_labels": "study_findings",
    "pred_boxes": "boxes_pred",
    "target_boxes": "boxes_true",
    "presence_prob": "presence_prob",
    "presence": "anatomy_presence",
    "abnormality": "abnormality",
    "mask_dice": "mask_dice",
}
_REQUIRED = ("probs", "labels")
# roles that only make sense together
_TOGETHER = (("study_probs", "study_labels"), ("pred_boxes", "target_boxes", "presence"), ("presence_prob", "presence"))


def _resolve_keys(keys: Optional[Mapping[str, str]]) -> dict[str, str]:
    out = dict(OUTPUT_KEYS)
    if keys:
        unknown = set(keys) - set(OUTPUT_KEYS)
        if unknown:
            raise ValueError(f"keys: unknown roles {sorted(unknown)}; roles are {sorted(OUTPUT_KEYS)}")
        out.update(keys)
    return out


def _lookup(path: str, result: Mapping[str, Any]) -> Any:
    """``"mean_auc"`` (diagnosis section) or a dotted path such as ``"localisation.mean_iou"``."""
    node: Any = result if "." in path else result.get("diagnosis", {})
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def compute_zero_shot_metrics(
    arrays: Mapping[str, Any],
    catalog: Union[Catalog, str, Mapping],
    thresholds: Any = None,
    abnormality_thresholds: Optional[Any] = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
    keys: Optional[Mapping[str, str]] = None,
    keep_curves: bool = True,
) -> dict[str, Any]:
    """All metrics of a split from its collected arrays (the evaluate workflow can call this directly).

    Args:
        arrays: engine-output key -> ``(N, ...)`` array or tensor over the whole split (keys as in the
            module docstring; only ``zero_shot_probs`` and ``findings`` are required).
        catalog: the catalog (a :class:`Catalog`, built-in name, ``.json`` path or dict).
        thresholds: validation thresholds: ``(M, F)`` array or the ``(anatomy, study)`` pair of
            :func:`~anatomy_vlp_bundle.metrics.diagnosis.choose_thresholds`; None chooses on this data.
        abnormality_thresholds: ``(M,)`` validation thresholds of the abnormality score, or None.
        n_boot, alpha, seed, groups, keep_curves: see
            :func:`~anatomy_vlp_bundle.metrics.diagnosis.evaluate_findings`.
        keys: role -> key overrides of :data:`OUTPUT_KEYS`.

    Returns:
        ``{"diagnosis": ..., "abnormality": ... (if given), "localisation": ... (if boxes or presence
        probabilities are given), "thresholds": {"anatomy": (M, F) list, "study": (S,) list,
        "abnormality": (M,) list} (chosen on this data, to store with the checkpoint after validation),
        "mean_auc": float | None}``.
    """
    cat = load_catalog(catalog)  # type: ignore[arg-type]
    k = _resolve_keys(keys)
    missing = [k[r] for r in _REQUIRED if k[r] not in arrays]
    if missing:
        raise KeyError(f"compute_zero_shot_metrics: missing required arrays {missing}; got keys {sorted(arrays)}")

    def get(role: str) -> Any:
        return arrays.get(k[role])

    for group in _TOGETHER:
        given = [r for r in group if get(r) is not None]
        if given and len(given) != len(group):
            absent = [k[r] for r in group if get(r) is None]
            raise KeyError(f"compute_zero_shot_metrics: {[k[r] for r in given]} need {absent} as well")

    study_p, study_y = get("study_probs"), get("study_labels")
    if not cat.study_findings:
        study_p = study_y = None
    result: dict[str, Any] = {}
    result["diagnosis"] = evaluate_findings(
        get("probs"), get("labels"), cat, study_probs=study_p, study_labels=study_y, thresholds=thresholds,
        n_boot=n_boot, alpha=alpha, seed=seed, groups=groups, keep_curves=keep_curves,
    )
    anat_t, study_t = choose_thresholds(get("probs"), get("labels"), cat, study_probs=study_p, study_labels=study_y)
    result["thresholds"] = {"anatomy": anat_t.tolist(), "study": study_t.tolist()}
    if get("abnormality") is not None:
        result["abnormality"] = evaluate_abnormality(
            get("abnormality"), get("labels"), cat, presence=get("presence"), thresholds=abnormality_thresholds,
            n_boot=n_boot, alpha=alpha, seed=seed, keep_curves=keep_curves,
        )
        # the abnormality threshold chosen on this data, per anatomy (0.5 where not evaluable)
        abn_t = {e["anatomy"]: e["threshold"] for e in result["abnormality"]["pairs"] if e["threshold_source"] == "this data"}
        result["thresholds"]["abnormality"] = [float(abn_t.get(a.name, 0.5)) for a in cat.anatomies]
    if get("pred_boxes") is not None or get("presence_prob") is not None:
        presence = get("presence")
        if get("pred_boxes") is not None:
            result["localisation"] = evaluate_boxes(
                get("pred_boxes"), get("target_boxes"), presence, presence_prob=get("presence_prob"), anatomy_names=cat.names,
                mask_dice=get("mask_dice"),
            )
        else:  # presence probabilities without boxes: presence accuracy only
            result["localisation"] = _presence_only(get("presence_prob"), presence, cat)
    result["mean_auc"] = result["diagnosis"]["mean_auc"]
    return result


def _presence_only(presence_prob: Any, presence: Any, cat: Catalog, threshold: float = 0.5) -> dict[str, Any]:
    prob = _to_numpy(presence_prob, "presence_prob")
    pres = _to_numpy(presence, "presence")
    if prob.shape != pres.shape or prob.ndim != 2 or prob.shape[1] != cat.num_anatomies:
        raise ValueError(f"presence_prob {prob.shape} and presence {pres.shape} must both be (N, M={cat.num_anatomies})")
    known = (pres == 1) | (pres == 0)
    correct = (prob >= threshold) == (pres == 1)
    per = {
        a.name: {
            "n_presence_known": int(known[:, i].sum()),
            "presence_accuracy": float(correct[known[:, i], i].mean()) if known[:, i].any() else None,
        }
        for i, a in enumerate(cat.anatomies)
    }
    return {
        "per_anatomy_presence": per,
        "presence_accuracy": float(correct[known].mean()) if known.any() else None,
        "presence_threshold": threshold,
    }


class ZeroShotMetric(Metric):
    """Epoch-wise accumulator of zero-shot diagnosis, abnormality and localisation metrics.

    Args:
        catalog: the catalog the model's outputs follow (row ``i`` = anatomy ``i``).
        output_transform: maps ``engine.state.output`` to a dict (or a list of per-sample dicts) holding
            the keys of the module docstring. Default: identity.
        keys: role -> key overrides of :data:`OUTPUT_KEYS` (e.g. ``{"target_boxes": "anatomy_boxes"}``).
        thresholds: validation thresholds for the operating-point metrics (see
            :func:`compute_zero_shot_metrics`); None (validation during training) chooses them on the data.
        n_boot: bootstrap resamples for CIs. 0 skips CIs (use during training: cheaper, and model
            selection needs the point estimate only).
        alpha, seed, groups: see :func:`~anatomy_vlp_bundle.metrics.diagnosis.evaluate_findings`.
        key_metric: what :meth:`compute` returns: a key of the diagnosis result (``"mean_auc"``, default)
            or a dotted path into the full result (``"localisation.mean_iou"``). NaN when undefined
            (e.g. no evaluable pair), which never counts as a new best in MONAI's comparison.
        save_details: put the full result into ``engine.state.metric_details[name]``.
        device: ignite's metric device (accumulation happens on the CPU regardless).

    Attributes:
        details: the full result of the last :meth:`compute` (None before).
        collected: the gathered arrays (numpy, engine-output keys) of the last :meth:`compute`.
    """

    def __init__(
        self,
        catalog: Union[Catalog, str, Mapping],
        output_transform: Callable = lambda x: x,
        keys: Optional[Mapping[str, str]] = None,
        thresholds: Any = None,
        n_boot: int = 1000,
        alpha: float = 0.05,
        seed: int = 0,
        groups: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
        key_metric: str = "mean_auc",
        save_details: bool = True,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        self.catalog = load_catalog(catalog)  # type: ignore[arg-type]
        self.keys = _resolve_keys(keys)
        self.thresholds = thresholds
        self.n_boot = n_boot
        self.alpha = alpha
        self.seed = seed
        self.groups = groups
        self.key_metric = key_metric
        self.save_details = save_details
        self.details: Optional[dict[str, Any]] = None
        self.collected: Optional[dict[str, np.ndarray]] = None
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._present: Optional[frozenset] = None
        super().__init__(output_transform=output_transform, device=device)

    # ------------------------------------------------------------------ accumulation
    def reset(self) -> None:
        self._buffers = {}
        self._present = None

    @staticmethod
    def _as_tensor(x: Any, key: str) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            t = x.detach()
        else:
            try:
                t = torch.as_tensor(np.asarray(x))
            except (TypeError, ValueError) as e:
                raise ValueError(f"ZeroShotMetric: output[{key!r}] is not numeric ({e})") from None
        # float64 on the CPU: exact for label codes and scores, and one dtype for the gathers
        return t.to("cpu", torch.float64)

    def _batched(self, output: Any) -> dict[str, torch.Tensor]:
        wanted = [v for v in self.keys.values()]
        if isinstance(output, Mapping):
            return {k: self._as_tensor(output[k], k) for k in wanted if k in output and output[k] is not None}
        if isinstance(output, Sequence) and not isinstance(output, (str, bytes)) and all(isinstance(o, Mapping) for o in output):
            if not output:
                return {}
            present = [k for k in wanted if all(k in o and o[k] is not None for o in output)]
            return {k: torch.stack([self._as_tensor(o[k], k) for o in output]) for k in present}
        raise TypeError(
            "ZeroShotMetric: engine output (after output_transform) must be a dict of batched arrays or a list of "
            f"per-sample dicts, got {type(output).__name__}"
        )

    def update(self, output: Any) -> None:
        """Store one batch (see the module docstring for the keys and shapes)."""
        batch = self._batched(output)
        if not batch:
            return
        missing = [self.keys[r] for r in _REQUIRED if self.keys[r] not in batch]
        if missing:
            raise KeyError(f"ZeroShotMetric: engine output lacks {missing}; it has {sorted(batch)}")
        present = frozenset(batch)
        if self._present is not None and present != self._present:
            raise ValueError(
                f"ZeroShotMetric: the engine output keys changed between iterations: {sorted(self._present)} "
                f"then {sorted(present)}"
            )
        self._present = present
        n = batch[self.keys["probs"]].shape[0]
        for key, value in batch.items():
            if value.ndim == 0 or value.shape[0] != n:
                raise ValueError(
                    f"ZeroShotMetric: output[{key!r}] has shape {tuple(value.shape)}, expected {n} samples first "
                    f"(like {self.keys['probs']!r})"
                )
            self._buffers.setdefault(key, []).append(value)

    # ------------------------------------------------------------------ gathering
    def _gather(self) -> dict[str, np.ndarray]:
        from monai.utils import evenly_divisible_all_gather

        local = {k: torch.cat(v, 0) for k, v in self._buffers.items()}
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        if world > 1:
            # which keys, with which trailing shapes, each rank holds (a rank may have seen no batch)
            meta = {k: tuple(v.shape[1:]) for k, v in local.items()}
            metas: list[Any] = [None] * world
            torch.distributed.all_gather_object(metas, meta)
            shapes: dict[str, tuple] = {}
            for rank, m in enumerate(metas):
                for k, s in m.items():
                    if shapes.setdefault(k, s) != s:
                        raise ValueError(f"ZeroShotMetric: output[{k!r}] has shape (*, {s}) on rank {rank}, (*, {shapes[k]}) elsewhere")
            if local and set(local) != set(shapes):
                raise ValueError(
                    f"ZeroShotMetric: this rank has outputs {sorted(local)}, other ranks {sorted(shapes)}: "
                    "every rank must produce the same keys"
                )
            for k in sorted(shapes):  # same order on every rank: the gathers are collectives
                mine = local.get(k, torch.zeros((0, *shapes[k]), dtype=torch.float64))
                local[k] = evenly_divisible_all_gather(mine, concat=True)
        return {k: v.numpy() for k, v in local.items()}

    def compute(self) -> float:
        """Gather, compute all metrics, return the key metric (NaN when undefined)."""
        arrays = self._gather()
        self.collected = arrays
        if not arrays or arrays[self.keys["probs"]].shape[0] == 0:
            self.details = {"diagnosis": None, "mean_auc": None, "n_cases": 0}
            return float("nan")
        self.details = compute_zero_shot_metrics(
            arrays, self.catalog, thresholds=self.thresholds, n_boot=self.n_boot, alpha=self.alpha, seed=self.seed,
            groups=self.groups, keys=self.keys,
        )
        value = _lookup(self.key_metric, self.details)
        return float("nan") if value is None or not math.isfinite(float(value)) else float(value)

    # ------------------------------------------------------------------ engine hooks
    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        # ignite's default would unpack a dict output into (y_pred, y): our output is a dict of many arrays
        self.update(self._output_transform(engine.state.output))

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        if self.save_details:
            details = getattr(engine.state, "metric_details", None)
            if not isinstance(details, dict):
                details = {}
                engine.state.metric_details = details
            details[name] = self.details
