"""The bundle's training and evaluation iterations, passed to MONAI engines as ``iteration_update``.

MONAI's ``SupervisedTrainer._iteration`` computes ``loss_function(network(image), label)`` and
autocasts on CUDA only. The VLP step needs more: the frozen text side (sentence targets from the
embedding cache), the targets built from the labels, the stage's normality-prior switch, a loss
dict with every term, and bf16 autocast on CPU as well. :class:`VLPTrainIteration` does that and
keeps the trainer's own gradient accumulation semantics (``engine.accumulation_steps``);
:class:`VLPEvalIteration` runs the model once per region mode and returns what the metrics need.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from ..losses.criterion import make_targets
from ..networks.box_ops import normalized_cxcywh_to_boxes
from ..networks.heads import upsample_mask_logits
from .checkpoint import _unwrap

__all__ = ["VLPTrainIteration", "VLPEvalIteration", "mask_dice", "to_device", "autocast_dtype", "resolve_amp"]

logger = logging.getLogger(__name__)

#: batch fields the model or the targets read (everything else stays where it is)
TENSOR_KEYS = ("image", "anatomy", "anatomy_presence", "anatomy_boxes", "findings", "study_findings")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def autocast_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"float16"`` (or a dtype) -> the torch dtype; anything else raises."""
    if isinstance(name, torch.dtype):
        return name
    if str(name).lower() not in DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[str(name).lower()]


def resolve_amp(amp: Any, device: torch.device | str, dtype: str | torch.dtype = torch.bfloat16) -> bool:
    """The ``amp`` switch: True / False, or ``"auto"``: on for CUDA; on the CPU only for bf16 on a
    CPU that computes it natively (``runtime.cpu_bf16_native``: AVX512-BF16 or AMX), where it is
    faster (measured in ``configs/train.yaml``); emulated bf16 and CPU float16 are slower than fp32.
    """
    if isinstance(amp, str):
        if amp.lower() != "auto":
            raise ValueError(f"amp must be true, false or 'auto', got {amp!r}")
        kind = torch.device(device).type
        if kind == "cuda":
            return True
        if kind == "cpu" and autocast_dtype(dtype) == torch.bfloat16:
            from ..runtime import cpu_bf16_native

            return cpu_bf16_native()
        return False
    return bool(amp)


def to_device(batch: Mapping[str, Any], device: torch.device, non_blocking: bool = False) -> dict[str, Any]:
    """Move the tensors of a batch to ``device`` (MetaTensors as plain tensors); lists stay."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.as_tensor() if hasattr(value, "as_tensor") else value
            out[key] = value.to(device, non_blocking=non_blocking)
        else:
            out[key] = value
    return out


def _targets(batch: Mapping[str, Any], net: torch.nn.Module, text: Optional[Mapping[str, Any]], uncertain_as, device) -> dict:
    text = dict(text or {})
    return make_targets(
        batch,
        sentence_emb=text.get("sentence_emb"),
        sentence_valid=text.get("sentence_valid"),
        sentence_keys=text.get("sentence_keys"),
        hard_negative_emb=text.get("hard_negative_emb"),
        hard_negative_valid=text.get("hard_negative_valid"),
        finding_valid=net.prompt_valid,
        global_membership=net.global_membership,
        global_study_index=net.global_study_index,
        uncertain_as=uncertain_as,
        device=device,
    )


class VLPTrainIteration:
    """One training step: ``iteration_update(engine, batch)`` for ``SupervisedTrainer``.

    Reads from the engine: ``network``, ``optimizer``, ``state.device``, ``accumulation_steps``
    (MONAI's trainer argument; default 1) and ``state.vlp_stage`` (set by
    ``engines.stages.StageScheduleHandler``; without it the prior is fitted).

    Args:
        criterion: ``losses.criterion.build_criterion(...)`` (its ``enabled``/``weights`` are set per stage).
        sentence_targets: ``text.targets.SentenceTargets`` (cached frozen text encoder), or None (no
            fine-grained term).
        amp: autocast the forward (and loss) — True/False or ``"auto"`` (see :func:`resolve_amp`).
        amp_dtype: ``"bfloat16"`` (CPU and GPU) or ``"float16"`` (CUDA, with a ``GradScaler``).
        grad_clip: max gradient norm (None: no clipping); applied at every optimizer step.
        regions: the model's ``regions`` argument in training (``"auto"``: masks where given).
        uncertain_as: None, 0 or 1 (normality masks; the criterion has its own setting).
        nonfinite: what a non-finite loss does, checked before ``backward`` so that no NaN reaches
            the weights: ``"stop"`` raises ``FloatingPointError`` naming the batch's case ids and the
            non-finite terms (training stops; the last checkpoint is whole, ``--resume true``
            continues from it); ``"skip"`` logs the same and backpropagates a zero loss instead, so
            the batch contributes nothing while DDP ranks and gradient accumulation stay in step
            (the output then has ``"skipped": 1``).

    Returns (per step) a dict: ``loss`` (float, the weighted total), one float per loss term and
    component (``detection``, ``detection.giou``, ...), ``lr``, ``batch_size``. A batch whose cases
    were all skipped (empty dict from ``vlp_collate``) returns ``{"loss": 0.0, "skipped": 1}``
    without a step.
    """

    def __init__(
        self,
        criterion: Any,
        sentence_targets: Any = None,
        amp: Any = False,
        amp_dtype: str | torch.dtype = "bfloat16",
        grad_clip: Optional[float] = None,
        regions: str = "auto",
        uncertain_as: Optional[int] = None,
        nonfinite: str = "stop",
    ) -> None:
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"VLPTrainIteration: nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.criterion = criterion
        self.sentence_targets = sentence_targets
        self.amp = amp
        self.amp_dtype = autocast_dtype(amp_dtype)
        self.grad_clip = None if grad_clip in (None, 0) else float(grad_clip)
        self.regions = regions
        self.uncertain_as = uncertain_as
        self.scaler: Optional[torch.amp.GradScaler] = None

    def _accumulation(self, engine: Any) -> tuple[int, bool, bool]:
        acc = int(getattr(engine, "accumulation_steps", 1) or 1)
        epoch_length = getattr(engine.state, "epoch_length", None)
        local = (engine.state.iteration - 1) % epoch_length if epoch_length else engine.state.iteration - 1
        zero = local % acc == 0
        step = (local + 1) % acc == 0 or (epoch_length is not None and local + 1 == epoch_length)
        return acc, zero, step

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        acc, should_zero, should_step = self._accumulation(engine)
        if not batch:
            logger.warning("iteration %d: every case of the batch was skipped", engine.state.iteration)
            if should_step:  # keep the accumulation cycle: step on what was accumulated
                self._step(engine)
            return {"loss": 0.0, "skipped": 1}
        device = torch.device(engine.state.device)
        network = engine.network
        net = _unwrap(network)
        use_amp = resolve_amp(self.amp, device, self.amp_dtype)
        batch = to_device(batch, device, getattr(engine, "non_blocking", False))

        text = None
        if self.sentence_targets is not None and "sentences" in batch:
            text = self.sentence_targets(batch["sentences"], training=True)
            text = to_device(text, device)
        targets = _targets(batch, net, text, self.uncertain_as, device)

        stage = getattr(engine.state, "vlp_stage", None)
        fit_prior = True if stage is None else bool(stage.fit_prior)
        normal = targets["anatomy_normal"] if fit_prior else None

        network.train()
        if should_zero:
            engine.optimizer.zero_grad(set_to_none=True)
        if use_amp and self.amp_dtype == torch.float16 and device.type == "cuda" and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=use_amp):
            outputs = network(batch["image"], batch.get("anatomy"), normal, regions=self.regions)
            losses = self.criterion(outputs, targets)
        loss = losses["loss"]
        skipped = False
        if not bool(torch.isfinite(loss.detach()).all()):
            bad = sorted(k for k, v in losses.items() if k != "loss" and isinstance(v, torch.Tensor) and not bool(torch.isfinite(v.detach()).all()))
            msg = (f"iteration {engine.state.iteration}: non-finite loss (terms {bad}) on the batch of cases "
                   f"{list(batch.get('id') or [])}")
            if self.nonfinite == "stop":
                raise FloatingPointError(msg + ": training stopped before the update (resume from the last checkpoint)")
            logger.error("%s: batch skipped", msg)
            skipped = True
            loss = sum(p.sum() * 0.0 for p in network.parameters() if p.requires_grad)
        elif not loss.requires_grad:  # every enabled term was skipped (e.g. no labels in the batch)
            loss = loss + sum(p.sum() * 0.0 for p in network.parameters() if p.requires_grad)
        scaled = loss / acc
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        if should_step:
            self._step(engine)

        out = {k: float(v.detach().float()) if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in losses.items()}
        out["loss"] = float(loss.detach().float())
        out["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        out["batch_size"] = int(batch["image"].shape[0])
        if skipped:
            out = {"loss": 0.0, "skipped": 1, "lr": out["lr"], "batch_size": out["batch_size"]}
        return out

    def _step(self, engine: Any) -> None:
        params = [p for g in engine.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(engine.optimizer)
        if self.grad_clip is not None and params:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            if not math.isfinite(float(norm)):
                logger.warning("iteration %d: non-finite gradient norm", engine.state.iteration)
        if self.scaler is not None:
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        elif params:
            engine.optimizer.step()


class VLPEvalIteration:
    """One evaluation step: ``iteration_update(engine, batch)`` for ``SupervisedEvaluator``.

    Runs the model once per region mode (default ``("predicted", "mask")``: image only, then the
    given masks) and returns ``{mode: outputs}`` with, per mode (B samples, M anatomies,
    F findings, S study findings, d spatial dims):

    - ``zero_shot_probs`` (B, M, F) = sigmoid(``zero_shot_logits``), ``findings`` (B, M, F) label codes,
      ``finding_valid`` (M, F) bool;
    - ``study_probs`` (B, S), ``study_findings`` (B, S);
    - ``boxes_pred`` / ``boxes_true`` (B, M, 2d) corner boxes in voxels of the evaluated grid,
      ``presence_prob`` (B, M), ``anatomy_presence`` (B, M) codes;
    - ``abnormality`` (B, M), ``anatomy_score`` (B, M), ``anatomy_normal`` / ``anatomy_abnormal`` (B, M) bool;
    - ``mask_dice`` (B, M): Dice of the mask head's masks (logit > 0 on the input grid) against the
      given masks, NaN where a mask is empty (only with a mask head and given masks);
    - ``id``: the case ids.

    All on the CPU, detached, float32. Empty batches return ``{}``.

    Args:
        region_modes: the model's ``regions`` values to evaluate.
        amp, amp_dtype: as :class:`VLPTrainIteration`.
        uncertain_as: for the normal/abnormal masks.
    """

    def __init__(
        self,
        region_modes: Sequence[str] = ("predicted", "mask"),
        amp: Any = False,
        amp_dtype: str | torch.dtype = "bfloat16",
        uncertain_as: Optional[int] = None,
    ) -> None:
        self.region_modes = tuple(region_modes)
        if not self.region_modes:
            raise ValueError("VLPEvalIteration: region_modes must not be empty")
        self.amp = amp
        self.amp_dtype = autocast_dtype(amp_dtype)
        self.uncertain_as = uncertain_as

    @torch.no_grad()
    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        if not batch:
            return {}
        device = torch.device(engine.state.device)
        network = engine.network
        net = _unwrap(network)
        batch = to_device(batch, device, getattr(engine, "non_blocking", False))
        targets = _targets(batch, net, None, self.uncertain_as, device)
        spatial = [int(s) for s in batch["image"].shape[2:]]
        use_amp = resolve_amp(self.amp, device, self.amp_dtype)
        network.eval()
        result: dict[str, Any] = {}
        for mode in self.region_modes:
            anatomy = batch.get("anatomy")
            if mode == "predicted":
                anatomy = None  # image only: nothing of the masks may leak in
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=use_amp):
                out = network(batch["image"], anatomy, None, regions=mode)
            result[mode] = {
                "zero_shot_probs": torch.sigmoid(out["zero_shot_logits"].float()).cpu(),
                "findings": targets["findings"].cpu(),
                "finding_valid": net.prompt_valid.cpu(),
                "study_probs": torch.sigmoid(out["study_logits"].float()).cpu(),
                "study_findings": targets["study_findings"].cpu(),
                "boxes_pred": normalized_cxcywh_to_boxes(out["boxes"].float(), spatial).cpu(),
                "boxes_true": targets["anatomy_boxes"].cpu(),
                "presence_prob": torch.sigmoid(out["presence_logits"].float()).cpu(),
                "anatomy_presence": targets["anatomy_presence"].cpu(),
                "abnormality": out["abnormality"].float().cpu(),
                "anatomy_score": out["anatomy_score"].float().cpu(),
                "anatomy_normal": targets["anatomy_normal"].cpu(),
                "anatomy_abnormal": targets["anatomy_abnormal"].cpu(),
                "id": list(batch.get("id") or []),
            }
            dice = mask_dice(out["mask_logits"], batch.get("anatomy"), spatial)
            if dice is not None:
                result[mode]["mask_dice"] = dice
        return result


def mask_dice(mask_logits: torch.Tensor, anatomy: Optional[torch.Tensor], spatial: Sequence[int]) -> Optional[torch.Tensor]:
    """``(B, M)`` Dice of ``mask_logits > 0`` (upsampled to ``spatial``) against the binary masks
    ``anatomy`` (B, M, *spatial) with MONAI's ``compute_dice``; NaN where the given mask is empty.
    None without a mask head (empty logits) or without masks."""
    from monai.metrics import compute_dice

    if anatomy is None or mask_logits.numel() == 0:
        return None
    pred = (upsample_mask_logits(mask_logits, [int(s) for s in spatial]) > 0).float()
    target = anatomy.as_tensor() if hasattr(anatomy, "as_tensor") else anatomy
    return compute_dice(pred, (target > 0).float().to(pred.device), include_background=True, ignore_empty=True).float().cpu()
