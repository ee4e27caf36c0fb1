"""Evaluation metrics: zero-shot diagnosis (ROC-AUC with bootstrap CIs, operating points), the
abnormality score, anatomy localisation, result files (JSON, ROC figures, Markdown) and the
Ignite metric used by the bundle's evaluator.

``handlers`` (Ignite / torch) is imported lazily: ``from anatomy_vlp_bundle.metrics import ZeroShotMetric``
works, while the numpy-only functions import without Ignite.
"""

from .diagnosis import (
    ANY_FINDING,
    STUDY,
    anatomy_level_labels,
    binary_metrics,
    bootstrap_auc_ci,
    bootstrap_mean_auc_ci,
    choose_thresholds,
    evaluate_abnormality,
    evaluate_findings,
    joint_bootstrap_aucs,
    roc_auc,
    roc_curve,
    youden_closest_threshold,
)
from .localisation import evaluate_boxes
from .report import format_markdown_table, safe_name, to_plain, write_metrics

__all__ = [
    "ANY_FINDING",
    "STUDY",
    "OUTPUT_KEYS",
    "ZeroShotMetric",
    "anatomy_level_labels",
    "binary_metrics",
    "bootstrap_auc_ci",
    "bootstrap_mean_auc_ci",
    "choose_thresholds",
    "compute_zero_shot_metrics",
    "evaluate_abnormality",
    "evaluate_boxes",
    "evaluate_findings",
    "format_markdown_table",
    "joint_bootstrap_aucs",
    "roc_auc",
    "roc_curve",
    "safe_name",
    "to_plain",
    "write_metrics",
    "youden_closest_threshold",
]

_LAZY = {"ZeroShotMetric", "compute_zero_shot_metrics", "OUTPUT_KEYS"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import handlers

        return getattr(handlers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
