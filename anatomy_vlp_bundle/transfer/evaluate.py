"""Retrieval and report generation of a trained checkpoint on one split (issue items 3 and 4).

``python -m monai.bundle run transfer --config_file "['configs/train.yaml','configs/transfer.yaml']"``
calls :func:`run_transfer_eval`: one image-only pass over the split gives both retrieval spaces and
the zero-shot calls; reports are generated from a sentence bank of the *training* split only and
scored against each case's own report. Writes ``metrics.json``, ``metrics.md`` and
``generated_reports.json`` into the output folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..engines.checkpoint import load_checkpoint
from .report_generation import build_sentence_bank, generate_report, score_reports
from .retrieval import embed_for_retrieval, global_similarity, region_similarity, retrieval_recalls

__all__ = ["run_transfer_eval", "retrieval_and_generation", "transfer_markdown"]

logger = logging.getLogger(__name__)


def run_transfer_eval(
    network: torch.nn.Module,
    ckpt_path: str,
    dataloader: Iterable[Mapping[str, Any]],
    sentence_targets: Any,
    train_records: Sequence[Mapping[str, Any]],
    output_dir: str,
    device: torch.device | str = "cpu",
    presence_threshold: float = 0.5,
) -> dict[str, Any]:
    """Load ``ckpt_path`` into ``network`` and measure retrieval and report generation on ``dataloader``.

    Args:
        network: the model built by the training config (its catalog and architecture).
        ckpt_path: a training checkpoint (loaded with ``weights_only=True``; thresholds included).
        dataloader: the evaluation pipeline over the split to measure (``image``, ``sentences``, ``report``, ``id``).
        sentence_targets: the training config's ``SentenceTargets`` (the frozen text encoder).
        train_records: the training split's records: the sentence bank comes from them only.
        output_dir: where ``metrics.json``, ``metrics.md`` and ``generated_reports.json`` go.
        presence_threshold: anatomies whose presence probability is below it get no sentence.

    Returns:
        The metrics dict written to ``metrics.json``.
    """
    network.load_state_dict(load_checkpoint(ckpt_path)["model"])
    metrics, generated = retrieval_and_generation(network, dataloader, sentence_targets, train_records, device, presence_threshold)
    metrics = {"checkpoint": str(ckpt_path), **metrics}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(transfer_markdown(metrics), encoding="utf-8")
    (out / "generated_reports.json").write_text(json.dumps(generated, indent=1) + "\n", encoding="utf-8")
    logger.info("transfer evaluation written to %s:\n%s", out, transfer_markdown(metrics))
    return metrics


def retrieval_and_generation(
    network: torch.nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    sentence_targets: Any,
    train_records: Sequence[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    presence_threshold: float = 0.5,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Retrieval Recall@K and anatomy-wise report generation of a loaded model on one split.

    Returns:
        ``(metrics, generated)``: ``metrics`` has ``cases``, ``retrieval`` and ``report_generation``;
        ``generated`` is ``[{"id", "generated", "truth"}]`` per case.
    """
    emb = embed_for_retrieval(network, dataloader, sentence_targets, regions="predicted", device=device)
    catalog = network.catalog
    n = len(emb["id"])
    # retrieval: cases whose report describes no catalog anatomy cannot be a retrieval target
    keep = emb["sentence_valid"].any(dim=1)
    idx = torch.nonzero(keep).flatten()
    retrieval = {
        "cases": int(idx.numel()),
        "left_out_no_sentences": int(n - idx.numel()),
        "regions": retrieval_recalls(region_similarity(emb["region_emb"][idx], emb["sentence_emb"][idx], emb["sentence_valid"][idx])),
        "global_cls": retrieval_recalls(global_similarity(emb["cls_emb"][idx], emb["report_emb"][idx])),
        "chance_recall_at_1": 1.0 / max(int(idx.numel()), 1),
    }
    # report generation from the training bank
    bank = build_sentence_bank(train_records, catalog, sentence_targets.encoder)
    thresholds = network.thresholds.detach().cpu()
    generated = [
        generate_report(emb["region_emb"][i], emb["zero_shot_probs"][i], thresholds, bank, catalog,
                        present=emb["presence"][i] >= presence_threshold)
        for i in range(n)
    ]
    with_truth = [i for i in range(n) if emb["report"][i].strip()]
    generation = score_reports([generated[i] for i in with_truth], [emb["report"][i] for i in with_truth], catalog)
    generation["left_out_no_report"] = n - len(with_truth)
    generated_reports = [{"id": emb["id"][i], "generated": generated[i], "truth": emb["report"][i]} for i in range(n)]
    return {"cases": n, "retrieval": retrieval, "report_generation": generation}, generated_reports


def transfer_markdown(metrics: Mapping[str, Any]) -> str:
    """The retrieval and report-generation tables of :func:`run_transfer_eval`'s metrics."""
    r = metrics["retrieval"]
    g = metrics["report_generation"]
    lines = [
        f"Retrieval on {r['cases']} cases (chance Recall@1 {r['chance_recall_at_1']:.3f}; "
        f"{r['left_out_no_sentences']} without a sentence left out)",
        "",
        "| space | direction | R@1 | R@5 | R@10 |",
        "|---|---|---|---|---|",
    ]
    for space in ("regions", "global_cls"):
        for direction, rec in r[space].items():
            lines.append(f"| {space} | {direction} | " + " | ".join(f"{rec[k]:.3f}" for k in sorted(rec, key=lambda k: int(k.split('@')[-1]))) + " |")
    lines += [
        "",
        f"Report generation on {g['cases']} cases: parsed-label macro F1 {g['label_macro_f1']:.3f}, "
        f"BLEU-4 {g['bleu4']:.3f}, ROUGE-L {g['rouge_l']:.3f}",
        "",
    ]
    return "\n".join(lines)
