"""Image-report retrieval: Recall@K in both directions.

Which text space the scores live in (the paths the training losses align):

- **region** (default, :func:`region_similarity`): the fine-grained loss (``losses.contrastive.
  anatomy_infonce``) pulls each anatomy's ``region_emb`` towards the *frozen* text encoder's
  embedding of that anatomy's report sentences (``text.targets.SentenceTargets``; at evaluation
  all of the anatomy's sentences joined), with no projection on the text side. The score of
  image ``i`` and report ``j`` is the mean over the anatomies report ``j`` describes of
  ``cos(region_emb[i, m], sentence_emb[j, m])``.
- **global** (:func:`global_similarity`): the global loss compares ``cls_emb`` with frozen text
  embeddings passed through the model's ``prompt_adapter`` (``model.adapt_prompts``). The report
  text is embedded the same way. No loss aligns ``cls_emb`` with whole reports (only with finding
  prompts), so this score is a secondary, zero-shot-style baseline.

Retrieval metrics follow :func:`..text_metrics.recall_at_k`: case ``i``'s image and report are
the correct pair; image-to-report ranks the reports of row ``i`` of the similarity, report-to-
image ranks the images of column ``i``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .text_metrics import recall_at_k

__all__ = ["DEFAULT_KS", "retrieval_recalls", "global_similarity", "region_similarity", "report_texts", "embed_for_retrieval"]

#: Recall@K cut-offs reported by default.
DEFAULT_KS = (1, 5, 10)


def retrieval_recalls(similarity: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, float]]:
    """Recall@K in both directions of a square image x report similarity (truth on the diagonal).

    Args:
        similarity: ``(N, N)``, row = image, column = report.
        ks: the cut-offs.

    Returns:
        ``{"image_to_report": {"R@1": ..., ...}, "report_to_image": {...}}``.
    """
    s = torch.as_tensor(similarity).float()
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"retrieval_recalls: similarity must be square (N images, N reports), got {tuple(s.shape)}")
    return {
        "image_to_report": {f"R@{k}": recall_at_k(s, k) for k in ks},
        "report_to_image": {f"R@{k}": recall_at_k(s.t(), k) for k in ks},
    }


def global_similarity(image_emb: torch.Tensor, report_emb: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` cosine similarity of image embeddings ``(N, E)`` and report embeddings ``(N, E)``."""
    if image_emb.ndim != 2 or image_emb.shape != report_emb.shape:
        raise ValueError(
            f"global_similarity: image_emb and report_emb must both be (N, E), got {tuple(image_emb.shape)} and {tuple(report_emb.shape)}"
        )
    return F.normalize(image_emb.float(), dim=-1) @ F.normalize(report_emb.float(), dim=-1).t()


def region_similarity(region_emb: torch.Tensor, sentence_emb: torch.Tensor, sentence_valid: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` anatomy-wise image-report similarity.

    ``S[i, j] = mean over m with sentence_valid[j, m] of cos(region_emb[i, m], sentence_emb[j, m])``.

    Args:
        region_emb: ``(N, M, E)`` region embeddings of the images.
        sentence_emb: ``(N, M, E)`` frozen embeddings of each report's per-anatomy text.
        sentence_valid: ``(N, M)`` bool, report ``j`` describes anatomy ``m``.

    Raises:
        ValueError: on shape mismatch, or when a report describes no anatomy (its score is undefined:
            leave such cases out of the test split).
    """
    if region_emb.ndim != 3 or region_emb.shape != sentence_emb.shape or tuple(sentence_valid.shape) != tuple(region_emb.shape[:2]):
        raise ValueError(
            "region_similarity: region_emb and sentence_emb must be (N, M, E) and sentence_valid (N, M), got "
            f"{tuple(region_emb.shape)}, {tuple(sentence_emb.shape)}, {tuple(sentence_valid.shape)}"
        )
    valid = sentence_valid.bool().to(region_emb.device)
    empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"region_similarity: reports {empty} describe no anatomy; leave them out of the retrieval split")
    region = F.normalize(region_emb.float(), dim=-1)
    text = F.normalize(sentence_emb.float().to(region.device), dim=-1) * valid[..., None].float()
    cos_sum = torch.einsum("ime,jme->ij", region, text)
    return cos_sum / valid.sum(dim=1).float()[None, :]


def report_texts(sentences: Sequence[Sequence[Sequence[str]]]) -> list[str]:
    """One report text per sample: its anatomy sentences (the batch's ``sentences``) joined in catalog order."""
    return [" ".join(s for per_anatomy in sample for s in (per_anatomy or []) if s and s.strip()) for sample in sentences]


@torch.no_grad()
def embed_for_retrieval(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sentence_targets: Any,
    regions: str = "predicted",
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Image and report embeddings of preprocessed batches, in both retrieval spaces.

    Args:
        model: an ``AnatomyVLPModel`` (e.g. from ``inference.predictor.model_from_checkpoint``).
        batches: collated batches of the evaluation pipeline with ``image``, ``sentences`` (per
            sample, M lists of sentences), optional ``anatomy`` masks and ``id``.
        sentence_targets: a ``text.targets.SentenceTargets`` over the frozen text encoder (the
            training config's ``sentence_targets``); evaluation mode joins each anatomy's sentences.
        regions: the model's region mode; ``"predicted"`` (image only, default) never passes masks.
        device: where the model runs.

    Returns:
        ``{"id": [...], "region_emb" (N, M, E), "sentence_emb" (N, M, E), "sentence_valid" (N, M),
        "cls_emb" (N, E), "report_emb" (N, E), "zero_shot_probs" (N, M, F), "presence" (N, M),
        "report": [...]}`` on the CPU; ``report_emb`` is the frozen embedding of :func:`report_texts`
        through ``model.adapt_prompts`` (the global loss's text path); ``report`` is each record's
        report text (empty when the batch has none).
    """
    model = model.to(device).eval()
    ids: list[str] = []
    region, sentence, valid, cls, report, probs, presence = [], [], [], [], [], [], []
    reports: list[str] = []
    for batch in batches:
        anatomy = None if regions == "predicted" else batch.get("anatomy")
        out = model(batch["image"].to(device), None if anatomy is None else anatomy.to(device), None, regions=regions)
        targets = sentence_targets(batch["sentences"], training=False)
        texts = report_texts(batch["sentences"])
        report_emb = sentence_targets.encoder.encode(texts).float().to(device)
        region.append(out["region_emb"].float().cpu())
        cls.append(out["cls_emb"].float().cpu())
        sentence.append(targets["sentence_emb"].float().cpu())
        valid.append(targets["sentence_valid"].cpu())
        report.append(model.adapt_prompts(report_emb).float().cpu())
        probs.append(torch.sigmoid(out["zero_shot_logits"].float()).cpu())
        presence.append(torch.sigmoid(out["presence_logits"].float()).cpu())
        n = int(batch["image"].shape[0])
        batch_ids: Optional[Sequence[str]] = batch.get("id")
        ids += [str(x) for x in batch_ids] if batch_ids is not None else [str(len(ids) + i) for i in range(n)]
        reports += [str(r or "") for r in (batch.get("report") or [""] * n)]
    if not region:
        raise ValueError("embed_for_retrieval: no batch to embed")
    return {
        "id": ids,
        "region_emb": torch.cat(region),
        "sentence_emb": torch.cat(sentence),
        "sentence_valid": torch.cat(valid),
        "cls_emb": torch.cat(cls),
        "report_emb": torch.cat(report),
        "zero_shot_probs": torch.cat(probs),
        "presence": torch.cat(presence),
        "report": reports,
    }
