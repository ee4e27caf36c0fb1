"""Anatomy-wise report generation by sentence retrieval, and its scores.

**Sentence bank** (:func:`build_sentence_bank`): every training record's per-anatomy sentences
(the record's ``anatomy_sentences``, else the report split by ``text.reports.parse_report``; the
same merge the training pipeline uses), deduplicated per anatomy (exact text after trimming),
each labelled by the report parser (``parse_anatomy_sentences`` with the anatomy forced) and
embedded once with the frozen text encoder. Sentences that state a finding as uncertain (-1)
are left out: a generated report does not hedge.

**Generation** (:func:`generate_report`), per present anatomy in catalog order:

- the predicted findings are those whose zero-shot probability is at least their threshold;
- none predicted: the *normal* bank sentence (no finding stated present) most similar to the
  region embedding;
- some predicted: the sentences consistent with them are those stating at least one predicted
  finding present and no other finding present; the most similar one is chosen, then, while a
  predicted finding is not stated yet, the most similar consistent sentence stating an uncovered
  one is added;
- an anatomy with no suitable bank sentence contributes nothing.

Similarity is the cosine of ``region_emb`` with the frozen sentence embedding: the fine-grained
alignment loss compares exactly these two. Study-level findings are not generated.

**Scores** (:func:`score_reports`): both reports parsed with the bundle's parser, label macro F1
(:func:`.text_metrics.label_f1`), corpus BLEU-4 and mean ROUGE-L.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..data.catalog import Catalog, load_catalog
from ..metrics.diagnosis import STUDY
from ..text.reports import merge_sentences, parse_anatomy_sentences, parse_report
from .text_metrics import corpus_bleu, label_f1, mean_rouge_l

__all__ = ["BankEntry", "SentenceBank", "build_sentence_bank", "generate_report", "report_labels", "score_reports"]


@dataclass
class BankEntry:
    """The bank sentences of one anatomy.

    Attributes:
        sentences: the texts.
        positives: per sentence, the findings it states present.
        embeddings: ``(K, E)`` unit vectors of the frozen text encoder (``K = len(sentences)``).
    """

    sentences: list[str]
    positives: list[frozenset[str]]
    embeddings: torch.Tensor


@dataclass
class SentenceBank:
    """Per-anatomy sentence banks (anatomy name -> :class:`BankEntry`; anatomies without sentences missing)."""

    entries: dict[str, BankEntry] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(e.sentences) for e in self.entries.values())


def _record_sentences(record: Mapping[str, Any], catalog: Catalog) -> dict[str, list[str]]:
    report = str(record.get("report") or "").strip()
    parsed = parse_report(report, catalog) if report else None
    return merge_sentences(parsed, record)


def build_sentence_bank(records: Iterable[Mapping[str, Any]], catalog: Catalog | str | dict, encoder: Any) -> SentenceBank:
    """The sentence bank of training records (see the module docstring).

    Args:
        records: datalist records (``report`` and/or ``anatomy_sentences``); use the training split only.
        catalog: the model's catalog; sentences of anatomies it does not list are ignored.
        encoder: the frozen text encoder (``text.encoder.TextEncoder``: ``encode(list[str]) -> (K, E)``).
    """
    catalog = load_catalog(catalog)
    names = set(catalog.names)
    per_anatomy: dict[str, dict[str, frozenset[str]]] = {}
    for record in records:
        for anatomy, sentences in _record_sentences(record, catalog).items():
            if anatomy not in names:
                continue
            seen = per_anatomy.setdefault(anatomy, {})
            for sentence in sentences:
                text = str(sentence).strip()
                if not text or text in seen:
                    continue
                parsed = parse_anatomy_sentences({anatomy: [text]}, catalog).anatomies.get(anatomy, {})
                labels = dict(parsed.get("findings", {}) or {})
                if any(int(v) == -1 for v in labels.values()):
                    continue
                seen[text] = frozenset(f for f, v in labels.items() if int(v) == 1)
    texts = [t for anatomy in catalog.names for t in per_anatomy.get(anatomy, {})]
    if not texts:
        return SentenceBank()
    emb = F.normalize(torch.as_tensor(encoder.encode(texts)).float(), dim=-1)
    bank = SentenceBank()
    start = 0
    for anatomy in catalog.names:
        table = per_anatomy.get(anatomy, {})
        if table:
            stop = start + len(table)
            bank.entries[anatomy] = BankEntry(list(table), list(table.values()), emb[start:stop])
            start = stop
    return bank


def _choose(entry: BankEntry, region: torch.Tensor, predicted: frozenset[str]) -> list[str]:
    """The sentences of one anatomy for its region embedding and predicted findings."""
    similarity = entry.embeddings @ F.normalize(region.float(), dim=-1)
    order = torch.argsort(similarity, descending=True).tolist()
    if not predicted:
        return [entry.sentences[i] for i in order if not entry.positives[i]][:1]
    chosen: list[str] = []
    uncovered = set(predicted)
    while uncovered:
        best = next((i for i in order if entry.positives[i] <= predicted and entry.positives[i] & uncovered), None)
        if best is None:
            break
        chosen.append(entry.sentences[best])
        uncovered -= entry.positives[best]
    return chosen


def generate_report(
    region_emb: torch.Tensor,
    zero_shot_probs: torch.Tensor,
    thresholds: torch.Tensor,
    bank: SentenceBank,
    catalog: Catalog | str | dict,
    present: Optional[torch.Tensor] = None,
) -> str:
    """One report from one image's model outputs (see the module docstring).

    Args:
        region_emb: ``(M, E)`` region embeddings (``outputs["region_emb"][b]``).
        zero_shot_probs: ``(M, F)`` finding probabilities (``sigmoid(outputs["zero_shot_logits"][b])``);
            column ``f`` of anatomy ``m`` is its ``f``-th catalog finding, padding is ignored.
        thresholds: ``(M, F)`` decision thresholds (the model's ``thresholds`` buffer).
        bank: the training sentence bank.
        catalog: the model's catalog (its anatomy order is the report's order).
        present: optional ``(M,)`` bool, anatomies in view (e.g. ``sigmoid(presence_logits) >= 0.5``);
            default every anatomy.

    Returns:
        The sentences joined by single spaces (empty when nothing could be said).
    """
    catalog = load_catalog(catalog)
    m = catalog.num_anatomies
    if region_emb.ndim != 2 or region_emb.shape[0] != m:
        raise ValueError(f"generate_report: region_emb must be (M, E) with M = {m}, got {tuple(region_emb.shape)}")
    if zero_shot_probs.shape != thresholds.shape or zero_shot_probs.ndim != 2 or zero_shot_probs.shape[0] != m:
        raise ValueError(
            f"generate_report: zero_shot_probs and thresholds must both be (M, F) with M = {m}, got "
            f"{tuple(zero_shot_probs.shape)} and {tuple(thresholds.shape)}"
        )
    called = (zero_shot_probs.float() >= thresholds.float().to(zero_shot_probs.device)).cpu()
    sentences: list[str] = []
    for i, anatomy in enumerate(catalog.anatomies):
        if present is not None and not bool(present[i]):
            continue
        entry = bank.entries.get(anatomy.name)
        if entry is None:
            continue
        predicted = frozenset(f for j, f in enumerate(anatomy.findings) if bool(called[i, j]))
        sentences += _choose(entry, region_emb[i].to(entry.embeddings.device), predicted)
    return " ".join(sentences)


def report_labels(text: str, catalog: Catalog | str | dict) -> dict[str, dict[str, int]]:
    """Parsed labels of a report: anatomy -> finding -> value, study findings under :data:`STUDY`."""
    parsed = parse_report(str(text or ""), catalog)
    labels = parsed.findings()
    if parsed.study_findings:
        labels[STUDY] = dict(parsed.study_findings)
    return labels


def score_reports(generated: Sequence[str], truth: Sequence[str], catalog: Catalog | str | dict) -> dict[str, Any]:
    """Clinical and language scores of generated reports against the true reports.

    Returns:
        ``{"label_macro_f1", "label_pairs" (per "anatomy/finding" counts and F1), "bleu4",
        "rouge_l", "cases"}``; see :func:`.text_metrics.label_f1` for how unknown and uncertain
        labels are treated.
    """
    if len(generated) != len(truth):
        raise ValueError(f"score_reports: {len(generated)} generated reports but {len(truth)} true reports")
    catalog = load_catalog(catalog)
    labels = label_f1([report_labels(g, catalog) for g in generated], [report_labels(t, catalog) for t in truth])
    return {
        "label_macro_f1": labels["macro_f1"],
        "label_pairs": labels["pairs"],
        "bleu4": corpus_bleu(generated, truth, max_n=4),
        "rouge_l": mean_rouge_l(generated, truth),
        "cases": len(generated),
    }
