"""Transfer evaluations: image-report retrieval and anatomy-wise report generation.

- :mod:`.text_metrics`: BLEU-4, ROUGE-L, Recall@K and the label F1 of parsed reports (plain Python).
- :mod:`.retrieval`: image-to-report and report-to-image Recall@K from model embeddings.
- :mod:`.report_generation`: a per-anatomy sentence bank from training reports, report assembly
  from region embeddings and zero-shot findings, and the scores of generated reports.
"""

from .report_generation import SentenceBank, build_sentence_bank, generate_report, report_labels, score_reports
from .retrieval import embed_for_retrieval, global_similarity, region_similarity, retrieval_recalls
from .text_metrics import corpus_bleu, label_f1, recall_at_k, rouge_l, tokenize

__all__ = [
    "SentenceBank",
    "build_sentence_bank",
    "generate_report",
    "report_labels",
    "score_reports",
    "embed_for_retrieval",
    "global_similarity",
    "region_similarity",
    "retrieval_recalls",
    "corpus_bleu",
    "label_f1",
    "recall_at_k",
    "rouge_l",
    "tokenize",
]
