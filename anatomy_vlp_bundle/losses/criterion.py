"""The training criterion of :class:`~anatomy_vlp_bundle.networks.vlp_model.AnatomyVLPModel` and its targets.

- :func:`build_criterion`: a :class:`VLPCriterion` with the built-in alignment terms
  (``fine_grained``, ``disease``, ``global``, ``prompt_pair``) plus ``detection``
  (:func:`detection_loss`: components ``l1``, ``giou``, ``presence``) and ``normality``
  (components ``commitment``, ``reconstruction``, read from the model's outputs).
- :func:`make_targets`: a batch of the data pipeline (plus optional sentence embeddings from the
  training loop) -> the criterion's target dict.
- :func:`anatomy_normal` / :func:`anatomy_abnormal`: per (sample, anatomy) normality from the labels
  (the model's ``normal`` input, which decides who fits the normality prior).

Key names (model outputs -> criterion): see ``AnatomyVLPModel.forward`` and
:func:`~anatomy_vlp_bundle.losses.alignment.builtin_terms`. Targets written by :func:`make_targets`:
``findings`` (B, M, F) long, ``study_findings`` (B, S) long, ``anatomy_presence`` (B, M),
``anatomy_boxes`` (B, M, 2d), ``spatial_shape`` (d ints), ``anatomy_normal`` / ``anatomy_abnormal`` /
``anatomy_valid`` (B, M) bool, ``global_labels`` (B, K) long, and when sentence embeddings are given
``sentence_emb`` (B, M, E), ``sentence_valid`` (B, M), ``sentence_keys``, ``hard_negative_emb``
(B, M, H, E), ``hard_negative_valid`` (B, M, H).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from ..data.labels import ABSENT, PRESENT, UNCERTAIN, UNKNOWN
from .alignment import VLPCriterion, builtin_terms, global_finding_labels
from .detection import detection_loss, mask_loss

__all__ = [
    "DEFAULT_WEIGHTS",
    "build_criterion",
    "make_targets",
    "anatomy_normal",
    "anatomy_abnormal",
    "detection_term",
    "normality_term",
]

#: Default term weights (DETR's box weights: L1 5, GIoU 2). ``disease`` is off by default; stage
#: schedules switch terms with ``enabled``.
DEFAULT_WEIGHTS: dict[str, float] = {
    "detection": 1.0,
    "detection.l1": 5.0,
    "detection.giou": 2.0,
    "detection.presence": 1.0,
    "detection.mask": 1.0,
    "normality": 1.0,
    "global": 1.0,
    "fine_grained": 1.0,
    "prompt_pair": 1.0,
    "disease": 0.0,
}


# --------------------------------------------------------------------------- normality from labels
def _plain(x: Any) -> Any:
    """The plain tensor behind a MONAI ``MetaTensor`` (anything else unchanged)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _codes(findings: torch.Tensor, uncertain_as: Optional[int]) -> torch.Tensor:
    findings = _plain(findings)
    codes = findings.round().long() if findings.is_floating_point() else findings.long()
    if uncertain_as is not None:
        if uncertain_as not in (0, 1):
            raise ValueError(f"uncertain_as must be None, 0 or 1, got {uncertain_as!r}")
        codes = torch.where(codes == UNCERTAIN, torch.full_like(codes, int(uncertain_as)), codes)
    return codes


def _check_labels(findings: torch.Tensor, presence: Optional[torch.Tensor], finding_valid: torch.Tensor) -> None:
    if findings.dim() != 3 or tuple(finding_valid.shape) != tuple(findings.shape[1:]):
        raise ValueError(
            f"findings must be (B, M, F) and finding_valid (M, F) of the same catalog, got {tuple(findings.shape)} "
            f"and {tuple(finding_valid.shape)}"
        )
    if presence is not None and tuple(presence.shape) != tuple(findings.shape[:2]):
        raise ValueError(f"anatomy_presence must be (B, M) = {tuple(findings.shape[:2])}, got {tuple(presence.shape)}")


def anatomy_normal(
    findings: torch.Tensor,
    presence: Optional[torch.Tensor],
    finding_valid: torch.Tensor,
    uncertain_as: Optional[int] = None,
) -> torch.Tensor:
    """``(B, M)`` bool: the anatomy is known normal.

    Normal = not known absent (presence code != 0), it has at least one finding in the catalog, and
    every one of its findings is known ABSENT (an unknown finding leaves normality unknown; an
    uncertain one counts as ``uncertain_as`` when given, else as not absent). An anatomy without
    catalog findings is never "normal": nothing was stated about it.

    Args:
        findings: ``(B, M, F)`` label codes.
        presence: ``(B, M)`` presence codes (1 / 0 / -2), or None (presence unknown everywhere).
        finding_valid: ``(M, F)`` bool, which (anatomy, finding) exist (the model's ``prompt_valid``).
        uncertain_as: None, 0 or 1.
    """
    _check_labels(findings, presence, finding_valid)
    codes = _codes(findings, uncertain_as)
    valid = finding_valid.to(codes.device).bool().unsqueeze(0)
    all_absent = ((codes == ABSENT) | ~valid).all(dim=-1) & valid.any(dim=-1)
    if presence is None:
        return all_absent
    return all_absent & (_plain(presence).to(codes.device).round().long() != ABSENT)


def anatomy_abnormal(
    findings: torch.Tensor,
    presence: Optional[torch.Tensor],
    finding_valid: torch.Tensor,
    uncertain_as: Optional[int] = None,
) -> torch.Tensor:
    """``(B, M)`` bool: the anatomy is not known absent and at least one of its findings is PRESENT
    (uncertain counts as present only with ``uncertain_as=1``). Arguments as :func:`anatomy_normal`."""
    _check_labels(findings, presence, finding_valid)
    codes = _codes(findings, uncertain_as)
    valid = finding_valid.to(codes.device).bool().unsqueeze(0)
    any_present = ((codes == PRESENT) & valid).any(dim=-1)
    if presence is None:
        return any_present
    return any_present & (_plain(presence).to(codes.device).round().long() != ABSENT)


# --------------------------------------------------------------------------- extra terms
def detection_term(outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``detection``: outputs ``boxes``, ``presence_logits``, optional ``mask_logits``; targets
    ``anatomy_boxes``, ``anatomy_presence``, ``spatial_shape``, optional ``anatomy_masks``.
    Components ``l1``, ``giou``, ``presence`` and, with a segmentation head and given masks,
    ``mask`` (:func:`~.detection.mask_loss`)."""
    out = detection_loss(
        outputs["boxes"],
        outputs["presence_logits"],
        targets["anatomy_boxes"],
        targets["anatomy_presence"],
        targets["spatial_shape"],
    )
    logits = outputs.get("mask_logits")
    masks = targets.get("anatomy_masks")
    if isinstance(logits, torch.Tensor) and logits.numel() > 0 and masks is not None:
        out["mask"] = mask_loss(logits, masks, targets["anatomy_presence"])
    return out


def normality_term(outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``normality``: the prior's ``loss_commitment`` and ``loss_reconstruction`` (computed by the model
    on the anatomies it was told are normal). Components ``commitment``, ``reconstruction``."""
    return {"commitment": outputs["loss_commitment"], "reconstruction": outputs["loss_reconstruction"]}


def _connect_all(outputs: Mapping[str, Any], targets: Mapping[str, Any]) -> torch.Tensor:
    """0 times the sum of every output that requires grad: every parameter gets a (zero) gradient."""
    total: Optional[torch.Tensor] = None
    for value in outputs.values():
        if isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point():
            part = value.float().sum() * 0.0
            total = part if total is None else total + part
    if total is None:
        return torch.zeros(())
    return total


def build_criterion(
    weights: Optional[Mapping[str, float]] = None,
    enabled: Optional[Mapping[str, bool]] = None,
    uncertain_as: Optional[int] = None,
    connect_all_outputs: bool = False,
) -> VLPCriterion:
    """The model's criterion: built-in alignment terms + ``detection`` + ``normality``.

    Args:
        weights: term (and ``"<term>.<component>"``) weights; missing keys take :data:`DEFAULT_WEIGHTS`.
            A term with weight 0 is not computed.
        enabled: term -> on/off (stage schedules); missing = on.
        uncertain_as: None (uncertain labels left out), 0 or 1.
        connect_all_outputs: add a term ``connect_all`` = 0 x (sum of every output), so that every
            parameter receives a (zero) gradient whatever terms are enabled: DDP then works with
            ``find_unused_parameters=False``. Note that optimisers with momentum or decoupled weight
            decay still move parameters whose gradient is an exact zero; with staged training prefer
            ``find_unused_parameters=True`` (gradients stay ``None`` and the optimiser skips them).

    ``fine_grained`` needs ``sentence_emb`` in the targets; without it (the training loop gave no
    sentence embeddings) the term is skipped: it returns a zero connected to ``region_emb``.
    """
    merged = dict(DEFAULT_WEIGHTS)
    merged.update({str(k): float(v) for k, v in dict(weights or {}).items()})
    builtin = builtin_terms(uncertain_as)
    fine_grained = builtin["fine_grained"]

    def fine_grained_or_skip(outputs, targets):
        if targets.get("sentence_emb") is None:
            zero = outputs["region_emb"].sum() * 0.0
            return {"loss": zero, "floor": torch.zeros((), device=zero.device)}
        return fine_grained(outputs, targets)

    terms = {"detection": detection_term, "normality": normality_term, "fine_grained": fine_grained_or_skip}
    if connect_all_outputs:
        terms["connect_all"] = _connect_all
        merged["connect_all"] = 1.0
    return VLPCriterion(merged, enabled=enabled, terms=terms, uncertain_as=uncertain_as)


# --------------------------------------------------------------------------- targets
def _tensor(value: Any, device: Optional[torch.device], name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception as e:  # noqa: BLE001 - report which field is bad
            raise TypeError(f"make_targets: batch field {name!r} is not a tensor ({type(value).__name__}): {e}") from None
    value = _plain(value)  # MetaTensor -> plain tensor
    return value.to(device) if device is not None else value


def make_targets(
    batch: Mapping[str, Any],
    model_outputs: Optional[Mapping[str, Any]] = None,
    sentence_emb: Optional[torch.Tensor] = None,
    sentence_valid: Optional[torch.Tensor] = None,
    sentence_keys: Optional[Sequence] = None,
    hard_negative_emb: Optional[torch.Tensor] = None,
    hard_negative_valid: Optional[torch.Tensor] = None,
    finding_valid: Optional[torch.Tensor] = None,
    global_membership: Optional[torch.Tensor] = None,
    global_study_index: Optional[torch.Tensor] = None,
    uncertain_as: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> dict[str, Any]:
    """The criterion's target dict from a batch of the data pipeline.

    Args:
        batch: needs ``image`` (B, C, *S) (for the spatial shape), ``findings`` (B, M, F),
            ``anatomy_presence`` (B, M), ``anatomy_boxes`` (B, M, 2d); optional ``study_findings``
            (B, S) (missing = none) and the sentence fields below (used when the arguments are None).
        model_outputs: the model's outputs for this batch: ``prompt_valid``, ``global_membership``,
            ``global_study_index`` are read from it (and the device) unless given explicitly.
        sentence_emb: ``(B, M, E)`` sentence embeddings (``text.targets.SentenceTargets``); None
            (and none in the batch) = no fine-grained term.
        sentence_valid: ``(B, M)`` bool (default: embeddings of non-zero norm); anatomies known
            absent in the sample are always left out.
        sentence_keys: ``(B, M)`` text keys (identical sentences are positives of each other).
        hard_negative_emb, hard_negative_valid: ``(B, M, H, E)`` and ``(B, M, H)``, optional.
        finding_valid: ``(M, F)`` bool (default ``model_outputs["prompt_valid"]``).
        global_membership, global_study_index: the prompt bank's (default from ``model_outputs``).
        uncertain_as: None, 0 or 1 (for the normality masks; the loss terms take their own).
        device: where the targets go (default the device of ``model_outputs["region_emb"]``).

    Returns:
        the target dict (see the module docstring for the keys).
    """
    outputs = model_outputs or {}
    for key in ("image", "findings", "anatomy_presence", "anatomy_boxes"):
        if key not in batch:
            raise KeyError(f"make_targets: the batch has no {key!r} (keys: {sorted(batch)})")
    if device is None and isinstance(outputs.get("region_emb"), torch.Tensor):
        device = outputs["region_emb"].device

    findings = _tensor(batch["findings"], device, "findings").round().long()
    presence = _tensor(batch["anatomy_presence"], device, "anatomy_presence").float()
    boxes = _tensor(batch["anatomy_boxes"], device, "anatomy_boxes").float()
    b, m = findings.shape[0], findings.shape[1]
    if batch.get("study_findings") is not None:
        study = _tensor(batch["study_findings"], device, "study_findings").round().long()
    else:
        study = torch.full((b, 0), UNKNOWN, dtype=torch.long, device=findings.device)

    finding_valid = finding_valid if finding_valid is not None else outputs.get("prompt_valid")
    if finding_valid is None:
        raise ValueError("make_targets: give finding_valid (M, F) or model_outputs with 'prompt_valid'")
    finding_valid = finding_valid.to(findings.device).bool()
    normal = anatomy_normal(findings, presence, finding_valid, uncertain_as)
    abnormal = anatomy_abnormal(findings, presence, finding_valid, uncertain_as)

    targets: dict[str, Any] = {
        "findings": findings,
        "study_findings": study,
        "anatomy_presence": presence,
        "anatomy_boxes": boxes,
        "spatial_shape": [int(s) for s in batch["image"].shape[2:]],
        "anatomy_normal": normal,
        "anatomy_abnormal": abnormal,
        "anatomy_valid": normal | abnormal,
    }
    if batch.get("anatomy") is not None:
        targets["anatomy_masks"] = _tensor(batch["anatomy"], device, "anatomy")

    membership = global_membership if global_membership is not None else outputs.get("global_membership")
    study_index = global_study_index if global_study_index is not None else outputs.get("global_study_index")
    if membership is not None and study_index is not None:
        targets["global_labels"] = global_finding_labels(findings, study, membership.bool(), study_index.long())

    sentence_emb = sentence_emb if sentence_emb is not None else batch.get("sentence_emb")
    if sentence_emb is not None:
        sentence_emb = _tensor(sentence_emb, findings.device, "sentence_emb").float()
        if tuple(sentence_emb.shape[:2]) != (b, m) or sentence_emb.dim() != 3:
            raise ValueError(f"make_targets: sentence_emb must be (B, M, E) with (B, M) = {(b, m)}, got {tuple(sentence_emb.shape)}")
        sentence_valid = sentence_valid if sentence_valid is not None else batch.get("sentence_valid")
        if sentence_valid is None:
            sentence_valid = sentence_emb.norm(dim=-1) > 0
        sentence_valid = _tensor(sentence_valid, findings.device, "sentence_valid").bool()
        # an anatomy out of view has no region to align with its sentence
        sentence_valid = sentence_valid & (presence.round().long() != ABSENT)
        targets["sentence_emb"] = sentence_emb
        targets["sentence_valid"] = sentence_valid
        keys = sentence_keys if sentence_keys is not None else batch.get("sentence_keys")
        if keys is not None:
            targets["sentence_keys"] = keys
        hard = hard_negative_emb if hard_negative_emb is not None else batch.get("hard_negative_emb")
        if hard is not None:
            targets["hard_negative_emb"] = _tensor(hard, findings.device, "hard_negative_emb").float()
            hard_valid = hard_negative_valid if hard_negative_valid is not None else batch.get("hard_negative_valid")
            if hard_valid is not None:
                targets["hard_negative_valid"] = _tensor(hard_valid, findings.device, "hard_negative_valid").bool()
    return targets
