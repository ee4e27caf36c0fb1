"""Label-supervised image-text alignment: global [CLS] loss, zero-shot scorer, prompt-pair loss, criterion.

- :func:`global_sigmoid_loss`: Anatomy-VLM's global loss, sigmoid BCE between the [CLS]
  embedding and every finding prompt embedding.
- :func:`zero_shot_logits` / :func:`zero_shot_probs`: P(finding present in anatomy) from the
  positive vs negative prompt ensembles. The prompt-pair loss, evaluation and the exported model
  all call this one function (plain tensor ops; ``torch.jit.script``-able).
- :func:`prompt_pair_loss`: BCE on those logits for every labelled (anatomy, finding).
- :func:`global_finding_labels`: per-study labels of the global findings from the batch labels.
- :class:`VLPCriterion`: named loss terms combined by a weight dict (DETR style).

Label codes (``data/labels.py``): 1 present, 0 absent, -1 uncertain, -2 unknown / padding.
Unknown labels never enter a loss; uncertain ones are left out unless ``uncertain_as`` maps
them to 0 or 1.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data.labels import ABSENT, PRESENT, UNCERTAIN, UNKNOWN
from .contrastive import ContrastiveLoss, anatomy_infonce, disease_contrastive

__all__ = [
    "label_targets",
    "global_sigmoid_loss",
    "zero_shot_logits",
    "zero_shot_probs",
    "prompt_pair_loss",
    "global_finding_labels",
    "LossTerm",
    "VLPCriterion",
    "builtin_terms",
]


def label_targets(labels: torch.Tensor, uncertain_as: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE targets and the mask of labels that enter a loss.

    Args:
        labels: integer label codes, any shape.
        uncertain_as: ``None`` leaves uncertain labels out; 0 or 1 uses them as absent / present.

    Returns:
        ``(targets, mask)``: float targets (0 where masked) and bool mask, both ``labels.shape``.
    """
    if uncertain_as not in (None, 0, 1):
        raise ValueError(f"uncertain_as must be None, 0 or 1, got {uncertain_as!r}")
    labels = labels.long()
    known = (labels == PRESENT) | (labels == ABSENT)
    targets = (labels == PRESENT).float()
    if uncertain_as is not None:
        uncertain = labels == UNCERTAIN
        known = known | uncertain
        targets = torch.where(uncertain, torch.full_like(targets, float(uncertain_as)), targets)
    return targets, known


def _masked_bce(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, uncertain_as: Optional[int], pos_weight
) -> torch.Tensor:
    targets, known = label_targets(labels, uncertain_as)
    if mask is not None:
        known = known & mask.bool()
    if pos_weight is not None and not isinstance(pos_weight, torch.Tensor):
        pos_weight = torch.tensor(float(pos_weight), device=logits.device)
    per_entry = F.binary_cross_entropy_with_logits(
        logits.float(), targets, reduction="none", pos_weight=None if pos_weight is None else pos_weight.float()
    )
    count = known.sum()
    # Masked entries are multiplied by 0, never selected away, so the graph shape (and DDP's view of
    # used parameters) does not depend on which labels are known; no labels -> a connected 0.
    return (per_entry * known.float()).sum() / count.clamp_min(1).float()


def _scale_tensor(logit_scale: Union[torch.Tensor, float], like: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(logit_scale), device=like.device)


def global_sigmoid_loss(
    cls_emb: torch.Tensor,
    prompt_emb: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: Union[torch.Tensor, float],
    bias: Union[torch.Tensor, float] = 0.0,
    uncertain_as: Optional[int] = None,
    pos_weight: Union[torch.Tensor, float, None] = None,
) -> torch.Tensor:
    """Sigmoid BCE between the [CLS] embedding and each finding prompt embedding.

    ``logit[b, k] = logit_scale * cos(cls_emb[b], prompt_emb[k]) + bias``.

    Args:
        cls_emb: ``(B, D)`` global image embeddings.
        prompt_emb: ``(K, D)`` one (ensemble-averaged) prompt embedding per global finding
            (``PromptBank.global_emb``).
        labels: ``(B, K)`` label codes (``global_finding_labels`` builds them).
        logit_scale: scalar tensor or float.
        bias: learnable scalar or ``(K,)`` tensor (the model owns it, e.g. ``nn.Parameter(torch.zeros(()))``).
        uncertain_as: see :func:`label_targets`.
        pos_weight: scalar or ``(K,)`` weight of positive examples.

    Returns:
        Mean BCE over the known labels (0, connected to the graph, when none is known).
    """
    if cls_emb.ndim != 2 or prompt_emb.ndim != 2 or cls_emb.shape[1] != prompt_emb.shape[1]:
        raise ValueError(
            f"global_sigmoid_loss: cls_emb must be (B, D) and prompt_emb (K, D), got {tuple(cls_emb.shape)} and {tuple(prompt_emb.shape)}"
        )
    expected = (cls_emb.shape[0], prompt_emb.shape[0])
    if tuple(labels.shape) != expected:
        raise ValueError(f"global_sigmoid_loss: labels must be (B, K)={expected}, got {tuple(labels.shape)}")
    scale = _scale_tensor(logit_scale, cls_emb)
    cos = F.normalize(cls_emb.float(), dim=-1) @ F.normalize(prompt_emb.float(), dim=-1).t()
    bias_t = bias.float() if isinstance(bias, torch.Tensor) else torch.tensor(float(bias), device=cls_emb.device)
    logits = scale * cos + bias_t
    return _masked_bce(logits, labels.to(cls_emb.device), None, uncertain_as, pos_weight)


def zero_shot_logits(
    region_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Logit of P(finding present) from positive vs negative prompt ensembles.

    ``logit[b, m, f] = s * cos(region[b, m], pos[m, f]) - s * cos(region[b, m], neg[m, f])``, i.e. the
    two-way softmax over (positive, negative) written as a sigmoid logit.

    Args:
        region_emb: ``(B, M, D)`` region embeddings (for study findings: ``(B, 1, D)`` [CLS]).
        pos_emb: ``(M, F, D)`` averaged, re-normalised positive prompt ensembles (``PromptBank.pos``;
            for study findings ``study_pos[None]``).
        neg_emb: ``(M, F, D)`` the matching negative ensembles.
        logit_scale: 0-d tensor, the learned inverse temperature.

    Returns:
        ``(B, M, F)`` logits; padded (all-zero) prompts give 0.
    """
    region = F.normalize(region_emb, dim=-1)
    pos = F.normalize(pos_emb, dim=-1)
    neg = F.normalize(neg_emb, dim=-1)
    # cos(r, pos) - cos(r, neg) = <r, pos - neg>: one contraction instead of two
    return logit_scale * torch.einsum("bmd,mfd->bmf", region, pos - neg)


def zero_shot_probs(
    region_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """``sigmoid(zero_shot_logits(...))``: ``(B, M, F)`` P(finding present)."""
    return torch.sigmoid(zero_shot_logits(region_emb, pos_emb, neg_emb, logit_scale))


def prompt_pair_loss(
    region_emb: torch.Tensor,
    pos_emb: torch.Tensor,
    neg_emb: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: Union[torch.Tensor, float],
    pos_weight: Union[torch.Tensor, float, None] = None,
    finding_valid: Optional[torch.Tensor] = None,
    uncertain_as: Optional[int] = None,
) -> torch.Tensor:
    """BCE on :func:`zero_shot_logits` for every labelled (anatomy, finding).

    Args:
        region_emb: ``(B, M, D)``.
        pos_emb, neg_emb: ``(M, F, D)`` prompt ensembles.
        labels: ``(B, M, F)`` finding label codes.
        logit_scale: scalar tensor or float.
        pos_weight: scalar, ``(F,)`` or ``(M, F)`` weight of positives (class imbalance).
        finding_valid: ``(M, F)`` bool, the (anatomy, finding) exists (``PromptBank.valid``); padding
            is left out even if its label were not UNKNOWN.
        uncertain_as: see :func:`label_targets`.

    Returns:
        Mean BCE over the labelled entries (0, connected to the graph, when none is labelled).
    """
    if region_emb.ndim != 3 or pos_emb.ndim != 3 or pos_emb.shape != neg_emb.shape:
        raise ValueError(
            "prompt_pair_loss: region_emb must be (B, M, D) and pos_emb/neg_emb (M, F, D), got "
            f"{tuple(region_emb.shape)}, {tuple(pos_emb.shape)}, {tuple(neg_emb.shape)}"
        )
    b, m, d = region_emb.shape
    if pos_emb.shape[0] != m or pos_emb.shape[2] != d:
        raise ValueError(f"prompt_pair_loss: prompts {tuple(pos_emb.shape)} do not match regions {tuple(region_emb.shape)}")
    expected = (b, m, pos_emb.shape[1])
    if tuple(labels.shape) != expected:
        raise ValueError(f"prompt_pair_loss: labels must be (B, M, F)={expected}, got {tuple(labels.shape)}")
    if finding_valid is not None and tuple(finding_valid.shape) != expected[1:]:
        raise ValueError(f"prompt_pair_loss: finding_valid must be (M, F)={expected[1:]}, got {tuple(finding_valid.shape)}")
    scale = _scale_tensor(logit_scale, region_emb)
    logits = zero_shot_logits(region_emb.float(), pos_emb.float().to(region_emb.device), neg_emb.float().to(region_emb.device), scale)
    mask = None if finding_valid is None else finding_valid.to(region_emb.device)[None].expand(expected)
    return _masked_bce(logits, labels.to(region_emb.device), mask, uncertain_as, pos_weight)


def global_finding_labels(
    findings: torch.Tensor,
    study_findings: torch.Tensor,
    membership: torch.Tensor,
    study_index: torch.Tensor,
) -> torch.Tensor:
    """Labels of the global ([CLS]) findings, derived from the per-anatomy and study labels.

    For global finding ``k``: a known study label (``study_index[k] >= 0``) is used as is;
    otherwise, over the (anatomy, finding) entries it covers (``membership[k]``): PRESENT if any is
    present, else UNCERTAIN if any is uncertain, else ABSENT if *all* are absent, else UNKNOWN
    (an anatomy out of view leaves the study-level answer unknown, never absent).

    Args:
        findings: ``(B, M, F)`` label codes.
        study_findings: ``(B, S)`` label codes.
        membership: ``(K, M, F)`` bool (``PromptBank.global_membership``).
        study_index: ``(K,)`` long, the study finding of row ``k`` or -1.

    Returns:
        ``(B, K)`` long label codes.
    """
    b = findings.shape[0]
    k = membership.shape[0]
    member = membership.reshape(1, k, -1).to(findings.device)
    labels = findings.long().reshape(b, 1, -1)
    has_member = member.any(dim=-1)
    any_present = ((labels == PRESENT) & member).any(dim=-1)
    any_uncertain = ((labels == UNCERTAIN) & member).any(dim=-1)
    all_absent = ((labels == ABSENT) | ~member).all(dim=-1) & has_member
    out = torch.full((b, k), UNKNOWN, dtype=torch.long, device=findings.device)
    out = torch.where(all_absent, torch.full_like(out, ABSENT), out)
    out = torch.where(any_uncertain, torch.full_like(out, UNCERTAIN), out)
    out = torch.where(any_present, torch.full_like(out, PRESENT), out)
    study_index = study_index.to(findings.device).long()
    if study_findings.shape[1] > 0:
        from_study = study_findings.long()[:, study_index.clamp_min(0)]  # (B, K)
        use_study = (study_index >= 0)[None] & (from_study != UNKNOWN)
        out = torch.where(use_study, from_study, out)
    return out


# --------------------------------------------------------------------------- criterion
LossTerm = Callable[[Mapping[str, object], Mapping[str, object]], Union[torch.Tensor, Mapping[str, torch.Tensor]]]


def builtin_terms(uncertain_as: Optional[int] = None) -> dict[str, LossTerm]:
    """The alignment terms with their default key conventions.

    Each term is ``fn(outputs, targets) -> Tensor | dict``. Keys read (``outputs`` from the model,
    ``targets`` from the batch):

    - ``fine_grained``: outputs ``region_emb`` (B, M, D), ``logit_scale``; targets ``sentence_emb``
      (B, M, D), ``sentence_valid`` (B, M), ``anatomy_normal`` (B, M), optional ``sentence_keys``
      (B, M), ``hard_negative_emb`` (B, M, K, D), ``hard_negative_valid`` (B, M, K).
    - ``disease``: outputs ``region_emb`` and ``region_emb_view2`` (B, M, D), ``disease_logit_scale``
      (else ``logit_scale``); targets ``anatomy_valid`` (B, M), ``anatomy_normal`` (B, M).
    - ``global``: outputs ``cls_emb`` (B, D), ``global_prompt_emb`` (K, D), ``logit_scale``,
      ``logit_bias``; targets ``global_labels`` (B, K).
    - ``prompt_pair``: outputs ``region_emb``, ``prompt_pos`` / ``prompt_neg`` (M, F, D),
      optional ``prompt_valid`` (M, F), ``logit_scale``; targets ``findings`` (B, M, F).

    Contrastive terms return ``{"loss": ..., "floor": ...}`` so the floor is logged.
    """

    def fine_grained(outputs, targets):
        result: ContrastiveLoss = anatomy_infonce(
            outputs["region_emb"],
            targets["sentence_emb"],
            targets["sentence_valid"],
            targets["anatomy_normal"],
            targets.get("sentence_keys"),
            outputs["logit_scale"],
            hard_negatives=targets.get("hard_negative_emb"),
            hard_negative_valid=targets.get("hard_negative_valid"),
        )
        return {"loss": result.loss, "floor": result.floor}

    def disease(outputs, targets):
        scale = outputs["disease_logit_scale"] if "disease_logit_scale" in outputs else outputs["logit_scale"]
        result = disease_contrastive(
            outputs["region_emb"], outputs["region_emb_view2"], targets["anatomy_valid"], targets["anatomy_normal"], scale
        )
        return {"loss": result.loss, "floor": result.floor}

    def global_(outputs, targets):
        return global_sigmoid_loss(
            outputs["cls_emb"],
            outputs["global_prompt_emb"],
            targets["global_labels"],
            outputs["logit_scale"],
            outputs.get("logit_bias", 0.0),
            uncertain_as=uncertain_as,
        )

    def prompt_pair(outputs, targets):
        return prompt_pair_loss(
            outputs["region_emb"],
            outputs["prompt_pos"],
            outputs["prompt_neg"],
            targets["findings"],
            outputs["logit_scale"],
            finding_valid=outputs.get("prompt_valid"),
            uncertain_as=uncertain_as,
        )

    return {"fine_grained": fine_grained, "disease": disease, "global": global_, "prompt_pair": prompt_pair}


class VLPCriterion(nn.Module):
    """Named loss terms combined by a weight dict (DETR's ``SetCriterion`` pattern).

    A term is a callable ``fn(outputs, targets)`` registered by name; it returns either a scalar
    tensor, or a dict. In a dict, the entry ``"loss"`` is the term's loss and the other entries are
    logged only (e.g. ``"floor"``); a dict without ``"loss"`` is a set of components (e.g.
    ``detection_loss -> {"l1", "giou", "presence"}``) whose loss is their sum, each component
    weighted by ``weights["<term>.<component>"]`` (default 1).

    Args:
        weights: term name -> weight (e.g. ``{"detection": 1, "global": 1, "fine_grained": 1,
            "prompt_pair": 1, "disease": 0}``) and optional component weights
            (``"detection.giou": 2``). A term with weight 0 is not computed.
        enabled: term name -> on/off (missing = on); a disabled term is not computed (stage schedules
            flip these without touching the weights).
        terms: extra or replacement terms; the :func:`builtin_terms` are registered first.
        uncertain_as: passed to the built-in label terms.

    ``forward(outputs, targets)`` returns ``{"loss": weighted sum (with grad), "<term>": term loss,
    "<term>.<entry>": each entry}``; everything but ``"loss"`` is detached.
    A positive weight for a term never registered raises ``KeyError`` at the first call.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        enabled: Optional[Mapping[str, bool]] = None,
        terms: Optional[Mapping[str, LossTerm]] = None,
        uncertain_as: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.weights = {str(k): float(v) for k, v in dict(weights).items()}
        self.enabled = {str(k): bool(v) for k, v in dict(enabled or {}).items()}
        self.terms: dict[str, LossTerm] = dict(builtin_terms(uncertain_as))
        for name, fn in dict(terms or {}).items():
            self.register(name, fn)

    def register(self, name: str, fn: LossTerm) -> None:
        """Add or replace the term ``name``."""
        if "." in name or not name:
            raise ValueError(f"loss term name must be non-empty and contain no '.', got {name!r}")
        if not callable(fn):
            raise TypeError(f"loss term {name!r} must be callable, got {type(fn).__name__}")
        self.terms[name] = fn

    def active_terms(self) -> list[str]:
        """Names of the terms that will be computed (positive weight, enabled)."""
        return [
            name
            for name, weight in self.weights.items()
            if "." not in name and weight != 0.0 and self.enabled.get(name, True)
        ]

    def forward(self, outputs: Mapping[str, object], targets: Mapping[str, object]) -> dict[str, torch.Tensor]:
        logs: dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        for name in self.active_terms():
            if name not in self.terms:
                raise KeyError(
                    f"VLPCriterion: loss term {name!r} has weight {self.weights[name]} but is not registered "
                    f"(registered: {sorted(self.terms)})"
                )
            value = self.terms[name](outputs, targets)
            if isinstance(value, Mapping):
                if "loss" in value:
                    term_loss = value["loss"]
                else:
                    term_loss = sum(self.weights.get(f"{name}.{k}", 1.0) * v for k, v in value.items())
                for key, entry in value.items():
                    if key != "loss":
                        logs[f"{name}.{key}"] = entry.detach() if isinstance(entry, torch.Tensor) else torch.as_tensor(entry)
            elif isinstance(value, torch.Tensor):
                term_loss = value
            else:
                raise TypeError(f"VLPCriterion: loss term {name!r} returned {type(value).__name__}, expected a tensor or dict")
            logs[name] = term_loss.detach()
            weighted = self.weights[name] * term_loss
            total = weighted if total is None else total + weighted
        logs["loss"] = total if total is not None else torch.zeros(())
        return logs

    def extra_repr(self) -> str:
        return f"weights={self.weights}, enabled={self.enabled}, terms={sorted(self.terms)}"
