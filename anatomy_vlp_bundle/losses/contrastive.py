"""Contrastive losses between anatomy region embeddings and text (and between two image views).

- :class:`LogitScale`: the learnable inverse temperature shared by the alignment losses.
- :func:`calibrated_infonce`: symmetric InfoNCE for one anatomy with fVLM's false-negative
  calibration (normal captions of the same anatomy, and identical captions, are positives of
  each other) and optional hard negatives (Anatomy-VLM's negated / perturbed sentences).
- :func:`anatomy_infonce`: that loss per anatomy over the global (all-ranks) batch, averaged.
- :func:`disease_contrastive`: ViSD-Boost's disease-level contrastive loss between two views.

Each loss returns ``ContrastiveLoss(loss, floor)``: ``floor`` is the smallest value the loss
can take with these targets (the mean entropy of the soft target rows; 0 for one-hot targets),
so an overfit check compares ``loss`` against ``floor`` rather than against 0.

All embeddings are L2-normalised inside, so similarities are cosines.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_tensor, gather_with_grad

__all__ = [
    "LogitScale",
    "ContrastiveLoss",
    "text_key_ids",
    "stable_text_id",
    "calibrated_targets",
    "soft_cross_entropy",
    "calibrated_infonce",
    "anatomy_infonce",
    "disease_contrastive",
]

TextKeys = Union[torch.Tensor, Sequence]


class ContrastiveLoss(NamedTuple):
    """``loss``: scalar to minimise; ``floor``: its minimum for the batch's targets (detached)."""

    loss: torch.Tensor
    floor: torch.Tensor


class LogitScale(nn.Module):
    """Learnable inverse temperature ``1 / tau`` stored as its log, kept in ``[1/max_t, 1/min_t]``.

    fVLM initialises ``tau`` at 0.07 and clamps it to ``[0.001, 0.5]``. In training mode the stored
    parameter itself is clamped in place before use, so an optimiser step past a bound cannot leave
    it stuck where the clamp's gradient is zero (no separate clamp call after ``optimizer.step()``
    is needed); the returned value is always clamped (eval mode, hand-edited checkpoints). The
    module is ``torch.jit.script``-able.

    Args:
        init_temperature: initial ``tau``.
        min_temperature: smallest ``tau`` (largest scale, ``1 / min_temperature``).
        max_temperature: largest ``tau`` (smallest scale).
        learnable: ``False`` keeps the scale fixed at ``1 / init_temperature``.

    ``forward()`` returns the scale ``1 / tau`` as a 0-d tensor (differentiable when learnable).
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                "LogitScale needs 0 < min_temperature <= init_temperature <= max_temperature, got "
                f"min={min_temperature}, init={init_temperature}, max={max_temperature}"
            )
        self.min_log_scale = math.log(1.0 / max_temperature)
        self.max_log_scale = math.log(1.0 / min_temperature)
        value = torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def forward(self) -> torch.Tensor:
        if self.training and not torch.jit.is_scripting():
            # Through ``.data``: no autograd version bump, so calling the module several times
            # before one backward stays legal (the value only changes right after an optimiser step).
            self.log_scale.data.clamp_(self.min_log_scale, self.max_log_scale)
        return self.log_scale.clamp(self.min_log_scale, self.max_log_scale).exp()

    @property
    def temperature(self) -> float:
        """Current ``tau`` (a Python float, for logging)."""
        return float(1.0 / self.log_scale.detach().clamp(self.min_log_scale, self.max_log_scale).exp())

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature:.4g}, range=[{math.exp(-self.max_log_scale):.4g}, "
            f"{math.exp(-self.min_log_scale):.4g}]"
        )


# --------------------------------------------------------------------------- helpers
def stable_text_id(text: str) -> int:
    """A 64-bit id of ``text``, the same in every process (Python's ``hash()`` is salted per process:
    DDP ranks, and two runs of the same seed, would disagree). Case and spacing are normalised because
    the text encoders used here are uncased."""
    canonical = " ".join(str(text).split()).lower()
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def text_key_ids(keys: TextKeys, device: torch.device | None = None) -> torch.Tensor:
    """Integer ids such that equal texts get equal ids (same on every process).

    Args:
        keys: a long tensor of ids (returned as is), a list of strings ``(N,)``, or a nested list
            ``(B, M)`` of strings / ``None`` (``None`` -> id ``-1``, i.e. "no text").
        device: device of the returned tensor.

    Returns:
        ``(N,)`` or ``(B, M)`` long tensor.
    """
    if isinstance(keys, torch.Tensor):
        if keys.dtype.is_floating_point or keys.dtype == torch.bool:
            raise TypeError(f"text keys must be an integer tensor or strings, got a {keys.dtype} tensor")
        return keys.long().to(device) if device is not None else keys.long()

    def convert(item):
        if item is None:
            return -1
        if isinstance(item, str):
            return stable_text_id(item)
        if isinstance(item, (list, tuple)):
            return [convert(x) for x in item]
        raise TypeError(f"text keys must be strings, None, or nested lists of them; got {type(item).__name__}")

    return torch.tensor([convert(k) for k in keys], dtype=torch.long, device=device)


def calibrated_targets(normal: torch.Tensor | None, text_ids: torch.Tensor) -> torch.Tensor:
    """fVLM's false-negative-calibrated soft targets.

    ``T[i, j] = [i == j] + [normal_i and normal_j] + [text_i == text_j]``, then each row divided by
    its sum. The diagonal therefore weighs 2 (abnormal: identity + own text) or 3 (normal).

    Args:
        normal: ``(N,)`` bool, the caption / anatomy is normal; ``None`` = none is normal.
        text_ids: ``(N,)`` long, equal ids for identical texts.

    Returns:
        ``(N, N)`` float32, rows sum to 1, symmetric before normalisation.
    """
    n = text_ids.shape[0]
    eye = torch.eye(n, dtype=torch.float32, device=text_ids.device)
    same_text = (text_ids[:, None] == text_ids[None, :]).float()
    weights = eye + same_text
    if normal is not None:
        normal = normal.bool()
        weights = weights + (normal[:, None] & normal[None, :]).float()
    return weights / weights.sum(dim=1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j targets[i, j] * log_softmax(logits[i])_j``.

    Entries with zero target contribute nothing even where ``logits`` is ``-inf`` (masked columns).
    """
    log_prob = F.log_softmax(logits.float(), dim=-1)
    terms = torch.where(targets > 0, targets * log_prob, torch.zeros_like(log_prob))
    return -terms.sum(dim=-1).mean()


def _row_entropy(targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy of each target row (the minimum of :func:`soft_cross_entropy`)."""
    terms = torch.where(targets > 0, targets * targets.clamp_min(1e-30).log(), torch.zeros_like(targets))
    return -terms.sum(dim=-1).mean()


def _as_scale(logit_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(logit_scale), device=like.device)


def _zero_loss(*tensors: torch.Tensor) -> ContrastiveLoss:
    # Keeps the graph connected (DDP expects every parameter to receive a gradient) while adding 0.
    zero = sum(t.sum() * 0.0 for t in tensors if t is not None and t.requires_grad)
    if not isinstance(zero, torch.Tensor):
        zero = torch.zeros((), device=tensors[0].device)
    return ContrastiveLoss(zero, torch.zeros((), device=tensors[0].device))


def _check_same_shape(what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


# --------------------------------------------------------------------------- losses
def calibrated_infonce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    normal: torch.Tensor | None = None,
    text_keys: TextKeys | None = None,
    hard_negative_emb: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
) -> ContrastiveLoss:
    """Symmetric InfoNCE for ONE anatomy with calibrated soft targets.

    Args:
        image_emb: ``(N, D)`` region embeddings (row ``i`` pairs with ``text_emb[i]``).
        text_emb: ``(N, D)`` sentence embeddings.
        logit_scale: scalar tensor (e.g. ``LogitScale()()``) or float, inverse temperature.
        normal: ``(N,)`` bool, sample ``i``'s caption is normal (normal captions are positives of
            each other); ``None`` = none normal.
        text_keys: ``(N,)`` long ids or ``N`` strings; identical texts are positives of each other.
            ``None`` = every text distinct.
        hard_negative_emb: ``(N, K, D)`` text embeddings that must NOT match image ``i`` (negated or
            perturbed versions of its sentence); scored in the image->text direction only.
        hard_negative_valid: ``(N, K)`` bool, which hard negatives exist (default all).

    Returns:
        ``ContrastiveLoss(loss, floor)``: ``loss = (CE_image->text + CE_text->image) / 2`` with the
        row-normalised targets of :func:`calibrated_targets`; ``floor`` = mean entropy of the target
        rows (hard-negative columns have target 0 and do not change it).
    """
    _check_same_shape("calibrated_infonce image_emb/text_emb", image_emb, text_emb)
    if image_emb.ndim != 2:
        raise ValueError(f"calibrated_infonce expects (N, D) embeddings, got shape {tuple(image_emb.shape)}")
    n = image_emb.shape[0]
    device = image_emb.device
    scale = _as_scale(logit_scale, image_emb)
    image = F.normalize(image_emb.float(), dim=-1)
    text = F.normalize(text_emb.float(), dim=-1)

    ids = torch.arange(n, device=device) if text_keys is None else text_key_ids(text_keys, device)
    if ids.shape != (n,):
        raise ValueError(f"calibrated_infonce: text_keys must have shape ({n},), got {tuple(ids.shape)}")
    if normal is not None and normal.shape != (n,):
        raise ValueError(f"calibrated_infonce: normal must have shape ({n},), got {tuple(normal.shape)}")
    targets = calibrated_targets(normal.to(device) if normal is not None else None, ids)

    logits = scale * image @ text.t()  # (N images, N texts)
    # The unnormalised weights are symmetric, so the text->image rows (weights transposed, then
    # row-normalised) are the same matrix as the image->text rows.
    loss_t2i = soft_cross_entropy(logits.t(), targets)

    logits_i2t, targets_i2t = logits, targets
    if hard_negative_emb is not None:
        if hard_negative_emb.ndim != 3 or hard_negative_emb.shape[0] != n or hard_negative_emb.shape[2] != image.shape[1]:
            raise ValueError(
                f"calibrated_infonce: hard_negative_emb must be (N={n}, K, D={image.shape[1]}), "
                f"got {tuple(hard_negative_emb.shape)}"
            )
        negatives = F.normalize(hard_negative_emb.float(), dim=-1)
        hard_logits = scale * torch.einsum("nd,nkd->nk", image, negatives)
        if hard_negative_valid is not None:
            hard_logits = hard_logits.masked_fill(~hard_negative_valid.bool().to(device), float("-inf"))
        logits_i2t = torch.cat([logits, hard_logits], dim=1)
        targets_i2t = torch.cat([targets, targets.new_zeros(hard_logits.shape)], dim=1)
    loss_i2t = soft_cross_entropy(logits_i2t, targets_i2t)

    floor = _row_entropy(targets).detach()
    return ContrastiveLoss(0.5 * (loss_i2t + loss_t2i), floor)


def anatomy_infonce(
    region_emb: torch.Tensor,
    sentence_emb: torch.Tensor,
    valid: torch.Tensor,
    normal: torch.Tensor,
    text_keys: TextKeys | None,
    logit_scale: torch.Tensor | float,
    hard_negatives: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
    gather: bool = True,
    min_samples: int = 2,
) -> ContrastiveLoss:
    """Fine-grained loss: :func:`calibrated_infonce` per anatomy over the global batch, averaged.

    Args:
        region_emb: ``(B, M, D)`` region embeddings (anatomy ``m`` of sample ``b``).
        sentence_emb: ``(B, M, D)`` that anatomy's sentence embedding (one sentence or a sampled
            sub-sentence per region).
        valid: ``(B, M)`` bool, the pair takes part (anatomy in view and a sentence exists).
        normal: ``(B, M)`` bool, the anatomy's sentence describes a normal anatomy.
        text_keys: ``(B, M)`` long ids or nested ``B x M`` lists of strings (``None`` items allowed)
            marking identical sentences; ``None`` = all distinct.
        logit_scale: scalar tensor or float.
        hard_negatives: ``(B, M, K, D)`` negated / perturbed sentence embeddings, never positives.
        hard_negative_valid: ``(B, M, K)`` bool (default all valid).
        gather: gather all tensors across ranks first (a no-op without a process group).
        min_samples: anatomies with fewer valid samples in the global batch are skipped (a
            contrastive loss needs at least one negative).

    Returns:
        ``ContrastiveLoss(loss, floor)`` averaged over the anatomies that took part; both are 0
        (still connected to the graph) when no anatomy has ``min_samples`` samples.
        Distributed: every rank returns the same global loss; see ``distributed.py`` for the
        gradient scaling that makes DDP's average equal the single-process gradient.
    """
    _check_same_shape("anatomy_infonce region_emb/sentence_emb", region_emb, sentence_emb)
    if region_emb.ndim != 3:
        raise ValueError(f"anatomy_infonce expects (B, M, D) embeddings, got shape {tuple(region_emb.shape)}")
    b, m, _ = region_emb.shape
    device = region_emb.device
    if valid.shape != (b, m) or normal.shape != (b, m):
        raise ValueError(
            f"anatomy_infonce: valid and normal must be (B, M)=({b}, {m}), got {tuple(valid.shape)} and {tuple(normal.shape)}"
        )
    ids = (
        torch.arange(b * m, device=device).view(b, m) if text_keys is None else text_key_ids(text_keys, device)
    )
    if ids.shape != (b, m):
        raise ValueError(f"anatomy_infonce: text_keys must be (B, M)=({b}, {m}), got {tuple(ids.shape)}")
    valid = valid.bool().to(device)
    normal = normal.bool().to(device)
    if hard_negatives is not None and hard_negative_valid is None:
        hard_negative_valid = torch.ones(hard_negatives.shape[:3], dtype=torch.bool, device=device)

    if gather:
        region_emb = gather_with_grad(region_emb)
        sentence_emb = gather_with_grad(sentence_emb)
        valid = gather_tensor(valid)
        normal = gather_tensor(normal)
        if text_keys is None:
            # distinct texts everywhere: renumber over the gathered batch
            ids = torch.arange(valid.numel(), device=device).view(valid.shape)
        else:
            ids = gather_tensor(ids)
        if hard_negatives is not None:
            hard_negatives = gather_with_grad(hard_negatives)
            hard_negative_valid = gather_tensor(hard_negative_valid)

    losses, floors = [], []
    for anatomy in range(m):
        rows = valid[:, anatomy].nonzero(as_tuple=True)[0]
        if rows.numel() < min_samples:
            continue
        result = calibrated_infonce(
            region_emb[rows, anatomy],
            sentence_emb[rows, anatomy],
            logit_scale,
            normal=normal[rows, anatomy],
            text_keys=ids[rows, anatomy],
            hard_negative_emb=None if hard_negatives is None else hard_negatives[rows, anatomy],
            hard_negative_valid=None if hard_negative_valid is None else hard_negative_valid[rows, anatomy],
        )
        losses.append(result.loss)
        floors.append(result.floor)
    if not losses:
        scale = logit_scale if isinstance(logit_scale, torch.Tensor) else None
        return _zero_loss(region_emb, sentence_emb, hard_negatives, scale)
    return ContrastiveLoss(torch.stack(losses).mean(), torch.stack(floors).mean())


def disease_contrastive(
    emb_a: torch.Tensor,
    emb_b: torch.Tensor,
    valid: torch.Tensor,
    normal: torch.Tensor,
    logit_scale: torch.Tensor | float,
    gather: bool = True,
    min_samples: int = 2,
) -> ContrastiveLoss:
    """ViSD-Boost's disease-level contrastive loss between two augmented views, per anatomy.

    For anatomy ``m`` the ``2N`` instances (``N`` valid samples x 2 views) are scored against each
    other (an instance never against itself). Positives of an instance: every other *normal*
    instance when it is normal (other samples and its own other view); only its own other view
    when it is abnormal. Everything else is a negative. Per instance the loss is the cross-entropy
    to the uniform distribution over its positives (SupCon's "outside" form), averaged over
    instances, then over anatomies with at least ``min_samples`` valid samples.

    Args:
        emb_a: ``(B, M, D)`` region embeddings of view 1.
        emb_b: ``(B, M, D)`` region embeddings of view 2 (same samples, other augmentation).
        valid: ``(B, M)`` bool, the anatomy is present in both views and its normality is known.
        normal: ``(B, M)`` bool, the anatomy is normal (all known findings absent).
        logit_scale: scalar tensor or float (its own temperature or the shared one).
        gather: gather across ranks first (no-op without a process group).
        min_samples: anatomies with fewer valid samples are skipped.

    Returns:
        ``ContrastiveLoss(loss, floor)``; ``floor`` = mean ``log(#positives)``.
    """
    _check_same_shape("disease_contrastive emb_a/emb_b", emb_a, emb_b)
    if emb_a.ndim != 3:
        raise ValueError(f"disease_contrastive expects (B, M, D) embeddings, got shape {tuple(emb_a.shape)}")
    b, m, _ = emb_a.shape
    if valid.shape != (b, m) or normal.shape != (b, m):
        raise ValueError(
            f"disease_contrastive: valid and normal must be (B, M)=({b}, {m}), got {tuple(valid.shape)} and {tuple(normal.shape)}"
        )
    device = emb_a.device
    valid = valid.bool().to(device)
    normal = normal.bool().to(device)
    if gather:
        emb_a = gather_with_grad(emb_a)
        emb_b = gather_with_grad(emb_b)
        valid = gather_tensor(valid)
        normal = gather_tensor(normal)
    scale = _as_scale(logit_scale, emb_a)

    losses, floors = [], []
    for anatomy in range(m):
        rows = valid[:, anatomy].nonzero(as_tuple=True)[0]
        n = rows.numel()
        if n < min_samples:
            continue
        feats = F.normalize(torch.cat([emb_a[rows, anatomy], emb_b[rows, anatomy]], dim=0).float(), dim=-1)
        sample = torch.arange(n, device=device).repeat(2)
        is_normal = normal[rows, anatomy].repeat(2)
        not_self = ~torch.eye(2 * n, dtype=torch.bool, device=device)
        positive = not_self & ((sample[:, None] == sample[None, :]) | (is_normal[:, None] & is_normal[None, :]))
        targets = positive.float() / positive.sum(dim=1, keepdim=True).float()
        logits = (scale * feats @ feats.t()).masked_fill(~not_self, float("-inf"))
        losses.append(soft_cross_entropy(logits, targets))
        floors.append(positive.sum(dim=1).float().log().mean())
    if not losses:
        scale_t = logit_scale if isinstance(logit_scale, torch.Tensor) else None
        return _zero_loss(emb_a, emb_b, scale_t)
    return ContrastiveLoss(torch.stack(losses).mean(), torch.stack(floors).mean().detach())
