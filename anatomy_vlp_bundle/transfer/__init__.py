"""Transfer evaluations of a pre-trained checkpoint (``suite.run_transfer_suite`` runs them all).

- :mod:`.data`: the pre-trained encoder / image model from a checkpoint (or its from-scratch twin)
  and contract datalists as in-memory tensors.
- :mod:`.classification`: linear probe and (LP-)fine-tuning for multi-label findings.
- :mod:`.segmentation`: a UNETR decoder on the encoder (2D/3D), its training and Dice.

- :mod:`.text_metrics`: BLEU-4, ROUGE-L, Recall@K and the label F1 of parsed reports (plain Python).
- :mod:`.retrieval`: image-to-report and report-to-image Recall@K from model embeddings.
- :mod:`.report_generation`: a per-anatomy sentence bank from training reports, report assembly
  from region embeddings and zero-shot findings, and the scores of generated reports.
"""

from .classification import AnatomyClassifier, evaluate_classifier, extract_features, fine_tune, linear_probe, predict
from .data import load_cases, load_encoder, load_image_model, remap_labels, subset_indices
from .report_generation import SentenceBank, build_sentence_bank, generate_report, report_labels, score_reports
from .retrieval import embed_for_retrieval, global_similarity, region_similarity, retrieval_recalls
from .segmentation import UNETRSegmenter, segmentation_dice, skip_layers, train_segmenter
from .text_metrics import corpus_bleu, label_f1, recall_at_k, rouge_l, tokenize

__all__ = [
    "AnatomyClassifier",
    "evaluate_classifier",
    "extract_features",
    "fine_tune",
    "linear_probe",
    "predict",
    "load_cases",
    "load_encoder",
    "load_image_model",
    "remap_labels",
    "subset_indices",
    "UNETRSegmenter",
    "segmentation_dice",
    "skip_layers",
    "train_segmenter",
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
