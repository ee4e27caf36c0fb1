"""Zero-shot diagnosis metrics: ROC-AUC, operating-point metrics and bootstrap confidence intervals.

Pure numpy functions (torch tensors are accepted and moved to the CPU). No scikit-learn:

- :func:`roc_auc` is the Mann-Whitney statistic, ``P(score_pos > score_neg) + 0.5 P(equal)``, which
  equals the trapezoid area under :func:`roc_curve` built on the *unique* thresholds (tied scores
  move the curve diagonally, which is what gives ties half credit).
- the operating point is the threshold whose ROC point is closest (Euclidean) to the corner
  ``(FPR 0, TPR 1)``, as ViSD-Boost / fVLM report; a case is called positive when
  ``score >= threshold``.
- confidence intervals are percentile bootstrap intervals (CT-CLIP reports bootstrap CIs).
  :func:`joint_bootstrap_aucs` resamples *cases* once for all (anatomy, finding) pairs, so the CI
  of the mean AUC reflects that findings of the same case are correlated. All resamples are
  computed at once from resampling counts (no Python loop over resamples), grouped by unique
  score, so 1000 resamples of 100 cases take a few milliseconds per pair.

Label codes (``data/labels.py``): PRESENT 1 and ABSENT 0 are used; UNCERTAIN -1 and UNKNOWN -2
(never stated, or padding past an anatomy's own findings) are left out of every metric, so the
scores of those entries never matter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from anatomy_vlp_bundle.data.catalog import Catalog, load_catalog
from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT, UNCERTAIN, UNKNOWN

__all__ = [
    "STUDY",
    "ANY_FINDING",
    "roc_curve",
    "roc_auc",
    "youden_closest_threshold",
    "binary_metrics",
    "bootstrap_auc_ci",
    "joint_bootstrap_aucs",
    "bootstrap_mean_auc_ci",
    "anatomy_level_labels",
    "choose_thresholds",
    "evaluate_findings",
    "evaluate_abnormality",
]

#: ``anatomy`` name used for study-level findings (no anatomy owns them) in result entries.
STUDY = "study"
#: ``finding`` name of the "any finding in this anatomy" detector (abnormality score).
ANY_FINDING = "any finding"

ArrayLike = Any  # numpy array, torch tensor or nested sequence

# resampling counts are built in chunks of at most this many (resample, case) cells (memory bound)
_MAX_CELLS = 4_000_000


# --------------------------------------------------------------------------- helpers
def _to_numpy(x: ArrayLike, name: str, dtype: Any = np.float64) -> np.ndarray:
    """numpy copy of ``x`` (torch tensors detached and moved to the CPU; bf16 handled)."""
    if x is None:
        raise ValueError(f"{name} is None")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor (torch is not imported here)
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as a numeric array ({e})") from None


def _binary_inputs(scores: ArrayLike, labels: ArrayLike, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """1-D scores and 0/1 labels of the known entries (label PRESENT or ABSENT); others dropped."""
    where = f"{name}: " if name else ""
    s = _to_numpy(scores, f"{where}scores").reshape(-1)
    y = _to_numpy(labels, f"{where}labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{where}scores and labels must have the same number of entries, got {s.size} and {y.size}")
    known = (y == PRESENT) | (y == ABSENT)
    s, y = s[known], y[known]
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{where}{int((~np.isfinite(s)).sum())} labelled entries have a NaN or infinite score")
    return s, (y == PRESENT).astype(np.int8)


def _resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """``(B, k)`` drawn case indices -> ``(B, n)`` how often each case was drawn in each resample."""
    b = indices.shape[0]
    flat = (indices + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n)


def _grouped_auc(scores: np.ndarray, positive: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Mann-Whitney AUC of weighted cases, for many weightings at once.

    Args:
        scores: ``(n,)`` scores of known cases.
        positive: ``(n,)`` 0/1.
        weights: ``(B, n)`` case multiplicities (bootstrap counts) or None (each case once).

    Returns:
        ``(B,)`` AUC (``(1,)`` without weights); NaN where a weighting has no positive or no negative.
    """
    w = np.ones((1, scores.size)) if weights is None else weights
    if scores.size == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(scores, kind="mergesort")
    s_sorted = scores[order]
    pos = positive[order].astype(bool)
    w = w[:, order]
    # start of each run of equal scores: ties are one group, so they get half credit
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    pos_w = np.add.reduceat(np.where(pos, w, 0), starts, axis=1).astype(np.float64)
    neg_w = np.add.reduceat(np.where(pos, 0, w), starts, axis=1).astype(np.float64)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    n_pos, n_neg = pos_w.sum(1), neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_w * (neg_below + 0.5 * neg_w)).sum(1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[Optional[float], Optional[float]]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _check_boot(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _none_if_nan(x: Any) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


# --------------------------------------------------------------------------- ROC
def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve on the unique thresholds.

    Args:
        scores: ``(n,)`` scores (higher = more likely present).
        labels: ``(n,)`` label codes; only PRESENT (1) and ABSENT (0) entries are used.

    Returns:
        ``fpr``, ``tpr``, ``thresholds``, each ``(U + 1,)`` for ``U`` unique scores: thresholds in
        decreasing order starting with ``+inf`` (the point (0, 0)); point ``k`` is the rate of cases
        with ``score >= thresholds[k]``. ``fpr`` (``tpr``) is NaN throughout when there is no negative
        (positive).
    """
    s, y = _binary_inputs(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # last index of each run of equal scores (descending): the curve moves once per unique score
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.zeros(0, dtype=int)
    tp = np.cumsum(y)[ends].astype(np.float64)
    fp = (ends + 1 - tp).astype(np.float64)
    n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tp] / n_pos if n_pos else np.full(ends.size + 1, np.nan)
        fpr = np.r_[0.0, fp] / n_neg if n_neg else np.full(ends.size + 1, np.nan)
    thresholds = np.r_[np.inf, s[ends]]
    return fpr, tpr, thresholds


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney; ties count one half).

    Args:
        scores: ``(n,)`` scores.
        labels: ``(n,)`` label codes; only PRESENT (1) and ABSENT (0) entries are used.

    Returns:
        AUC in ``[0, 1]``, or None when there is no positive or no negative.
    """
    s, y = _binary_inputs(scores, labels)
    return _none_if_nan(_grouped_auc(s, y)[0])


def youden_closest_threshold(fpr: ArrayLike, tpr: ArrayLike, thresholds: ArrayLike) -> Optional[float]:
    """The threshold whose ROC point is closest (Euclidean) to ``(FPR 0, TPR 1)``.

    The ``+inf`` point (call nothing positive) is a candidate only when it is the only point, so the
    result is always a score that occurs in the data. Ties go to the higher threshold.

    Args:
        fpr, tpr, thresholds: the output of :func:`roc_curve`.

    Returns:
        The threshold (call positive when ``score >= threshold``), or None when the curve is undefined
        (no positive or no negative).
    """
    fpr, tpr, thr = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (fpr, tpr, thresholds))
    if not (fpr.shape == tpr.shape == thr.shape):
        raise ValueError(f"fpr, tpr and thresholds must have the same length, got {fpr.size}, {tpr.size}, {thr.size}")
    finite = np.isfinite(thr)
    if finite.any() and not finite.all():
        fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    dist = np.hypot(fpr, 1.0 - tpr)
    if dist.size == 0 or not np.isfinite(dist).any():
        return None
    return float(thr[int(np.nanargmin(dist))])


def binary_metrics(scores: ArrayLike, labels: ArrayLike, threshold: float) -> dict[str, Optional[float]]:
    """Operating-point metrics when ``score >= threshold`` is called positive.

    Args:
        scores: ``(n,)`` scores.
        labels: ``(n,)`` label codes; only PRESENT (1) and ABSENT (0) entries are used.
        threshold: decision threshold.

    Returns:
        ``accuracy``, ``balanced_accuracy`` (mean of sensitivity and specificity), ``sensitivity``
        (recall, TPR), ``specificity`` (TNR), ``precision`` (0 when nothing is called positive but
        positives exist), ``f1`` and the counts ``tp``, ``fp``, ``tn``, ``fn``. A rate whose
        denominator is empty is None (e.g. sensitivity without positives; balanced accuracy then too).
    """
    s, y = _binary_inputs(scores, labels)
    if threshold is None or not np.isfinite(threshold):
        raise ValueError(f"binary_metrics: threshold must be a finite number, got {threshold!r}")
    pred = s >= threshold
    pos = y.astype(bool)
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    tn = int(np.sum(~pred & ~pos))
    fn = int(np.sum(~pred & pos))

    def ratio(a: int, b: int) -> Optional[float]:
        return a / b if b else None

    sens, spec = ratio(tp, tp + fn), ratio(tn, tn + fp)
    precision = ratio(tp, tp + fp)
    if precision is None and tp + fn:
        precision = 0.0  # positives exist, none found: precision counts as 0 (as F1 does)
    return {
        "accuracy": ratio(tp + tn, s.size),
        "balanced_accuracy": None if sens is None or spec is None else 0.5 * (sens + spec),
        "sensitivity": sens,
        "specificity": spec,
        "precision": precision,
        "f1": ratio(2 * tp, 2 * tp + fp + fn) if tp + fn else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# --------------------------------------------------------------------------- bootstrap
def bootstrap_auc_ci(
    scores: ArrayLike,
    labels: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = False,
) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap confidence interval of one ROC-AUC.

    Args:
        scores: ``(n,)`` scores.
        labels: ``(n,)`` label codes; only PRESENT (1) and ABSENT (0) entries are used.
        n_boot: number of resamples.
        alpha: 1 - confidence level (0.05 -> 95% CI).
        seed: seed of the resampling generator (same seed, same interval).
        stratified: resample positives and negatives separately (class counts fixed); otherwise
            resample cases plainly and skip resamples that lack a class.

    Returns:
        ``(low, high)``; ``(None, None)`` when the AUC is undefined or ``n_boot`` is 0.
    """
    _check_boot(n_boot, alpha)
    s, y = _binary_inputs(scores, labels)
    n, n_pos = s.size, int(y.sum())
    if n_boot == 0 or n_pos == 0 or n_pos == n:
        return None, None
    rng = np.random.default_rng(seed)
    pos_idx, neg_idx = np.flatnonzero(y), np.flatnonzero(y == 0)
    aucs = []
    chunk = max(1, _MAX_CELLS // n)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        if stratified:
            idx = np.concatenate(
                [pos_idx[rng.integers(0, pos_idx.size, (b, pos_idx.size))], neg_idx[rng.integers(0, neg_idx.size, (b, neg_idx.size))]],
                axis=1,
            )
        else:
            idx = rng.integers(0, n, (b, n))
        aucs.append(_grouped_auc(s, y, _resample_counts(idx, n)))
    return _percentile_ci(np.concatenate(aucs), alpha)


def joint_bootstrap_aucs(scores: ArrayLike, labels: ArrayLike, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """AUC of every pair (column) in each of ``n_boot`` resamples of the *cases* (rows), shared by all pairs.

    Args:
        scores: ``(N, P)`` scores of ``N`` cases for ``P`` (anatomy, finding) pairs.
        labels: ``(N, P)`` label codes; per column only PRESENT / ABSENT cases count.
        n_boot: number of resamples of the ``N`` cases (with replacement).
        seed: resampling seed.

    Returns:
        ``(n_boot, P)`` AUCs, NaN where a resample has no positive or no negative for a pair.
    """
    s_all = _to_numpy(scores, "scores")
    y_all = _to_numpy(labels, "labels")
    if s_all.ndim != 2 or s_all.shape != y_all.shape:
        raise ValueError(f"joint_bootstrap_aucs: scores and labels must both be (N, P), got {s_all.shape} and {y_all.shape}")
    n, p = s_all.shape
    out = np.full((n_boot, p), np.nan)
    if n == 0 or n_boot == 0:
        return out
    known = (y_all == PRESENT) | (y_all == ABSENT)
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CELLS // n)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = _resample_counts(rng.integers(0, n, (b, n)), n)
        for j in range(p):
            rows = known[:, j]
            y = (y_all[rows, j] == PRESENT).astype(np.int8)
            if y.size == 0 or y.all() or not y.any():
                continue
            s = s_all[rows, j]
            if not np.all(np.isfinite(s)):
                raise ValueError(f"joint_bootstrap_aucs: column {j} has NaN or infinite scores for labelled cases")
            out[start : start + b, j] = _grouped_auc(s, y, counts[:, rows])
    return out


def _mean_over_pairs(aucs: np.ndarray) -> np.ndarray:
    """Row-wise mean over the pairs defined in that resample (NaN when none is)."""
    defined = np.isfinite(aucs)
    n = defined.sum(1)
    total = np.where(defined, aucs, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def bootstrap_mean_auc_ci(
    scores: ArrayLike, labels: ArrayLike, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[Optional[float], Optional[float]]:
    """Percentile CI of the mean AUC over pairs, resampling cases jointly for all pairs.

    Only pairs with both classes in the full data enter the mean (as in :func:`evaluate_findings`);
    in a resample where such a pair lost a class, the mean is over the pairs still defined.

    Args:
        scores: ``(N, P)`` scores.
        labels: ``(N, P)`` label codes.
        n_boot, alpha, seed: see :func:`bootstrap_auc_ci`.

    Returns:
        ``(low, high)``, ``(None, None)`` when no pair is evaluable or ``n_boot`` is 0.
    """
    _check_boot(n_boot, alpha)
    y = _to_numpy(labels, "labels")
    if y.ndim != 2:
        raise ValueError(f"bootstrap_mean_auc_ci: labels must be (N, P), got shape {y.shape}")
    evaluable = ((y == PRESENT).any(0)) & ((y == ABSENT).any(0))
    if n_boot == 0 or not evaluable.any():
        return None, None
    s = _to_numpy(scores, "scores")
    if s.shape != y.shape:
        raise ValueError(f"bootstrap_mean_auc_ci: scores {s.shape} and labels {y.shape} differ in shape")
    aucs = joint_bootstrap_aucs(s[:, evaluable], y[:, evaluable], n_boot=n_boot, seed=seed)
    return _percentile_ci(_mean_over_pairs(aucs), alpha)


# --------------------------------------------------------------------------- catalog-level evaluation
def _catalog(catalog: Union[Catalog, str, Mapping]) -> Catalog:
    return load_catalog(catalog)  # type: ignore[arg-type]


def _check_anatomy_array(x: np.ndarray, name: str, cat: Catalog, n: Optional[int] = None) -> None:
    m, f_needed = cat.num_anatomies, max([len(a.findings) for a in cat.anatomies] + [0])
    if x.ndim != 3 or x.shape[1] != m or x.shape[2] < f_needed:
        raise ValueError(
            f"{name} must be (N, M={m}, F>={f_needed}) for catalog {cat.name!r} "
            f"({m} anatomies, at most {f_needed} findings each), got shape {x.shape}"
        )
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} cases, expected {n}")


def _check_study_array(x: np.ndarray, name: str, cat: Catalog, n: int) -> None:
    s = len(cat.study_findings)
    if x.ndim != 2 or x.shape[0] != n or x.shape[1] < s:
        raise ValueError(
            f"{name} must be (N={n}, S>={s}) for catalog {cat.name!r} ({s} study findings), got shape {x.shape}"
        )


def _finding_columns(
    probs: ArrayLike,
    labels: ArrayLike,
    cat: Catalog,
    study_probs: Optional[ArrayLike],
    study_labels: Optional[ArrayLike],
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str, str]], list[tuple[int, int]]]:
    """Flatten per-(anatomy, finding) and study inputs into ``(N, P)`` columns.

    Returns:
        scores ``(N, P)``, labels ``(N, P)``, entries ``(kind, anatomy, finding)`` and, per column,
        ``(anatomy row, finding column)`` with anatomy row -1 for study findings.
    """
    p = _to_numpy(probs, "probs")
    y = _to_numpy(labels, "labels")
    _check_anatomy_array(p, "probs", cat)
    _check_anatomy_array(y, "labels", cat, n=p.shape[0])
    n = p.shape[0]
    cols_s, cols_y, entries, where = [], [], [], []
    for i, a in enumerate(cat.anatomies):
        for j, f in enumerate(a.findings):
            cols_s.append(p[:, i, j])
            cols_y.append(y[:, i, j])
            entries.append(("anatomy", a.name, f))
            where.append((i, j))
    if (study_probs is None) != (study_labels is None):
        raise ValueError("study_probs and study_labels must be given together")
    if study_probs is not None and cat.study_findings:
        sp = _to_numpy(study_probs, "study_probs")
        sy = _to_numpy(study_labels, "study_labels")
        _check_study_array(sp, "study_probs", cat, n)
        _check_study_array(sy, "study_labels", cat, n)
        for k, f in enumerate(cat.study_findings):
            cols_s.append(sp[:, k])
            cols_y.append(sy[:, k])
            entries.append(("study", STUDY, f))
            where.append((-1, k))
    if not cols_s:
        return np.zeros((n, 0)), np.zeros((n, 0)), entries, where
    return np.stack(cols_s, 1), np.stack(cols_y, 1), entries, where


def _evaluate_columns(
    scores: np.ndarray,
    labels: np.ndarray,
    entries: Sequence[tuple[str, str, str]],
    thresholds: Optional[np.ndarray],
    n_boot: int,
    alpha: float,
    seed: int,
    default_threshold: float,
    groups: Optional[Mapping[str, Sequence[Sequence[str]]]],
    keep_curves: bool,
) -> dict[str, Any]:
    """Per-column metrics and their summary (shared by findings and the abnormality detector)."""
    _check_boot(n_boot, alpha)
    n_cases, n_cols = scores.shape
    boot = joint_bootstrap_aucs(scores, labels, n_boot=n_boot, seed=seed) if n_boot else None
    pairs: list[dict[str, Any]] = []
    for c, (kind, anatomy, finding) in enumerate(entries):
        col_y = labels[:, c]
        n_pos = int(np.sum(col_y == PRESENT))
        n_neg = int(np.sum(col_y == ABSENT))
        n_uncertain = int(np.sum(col_y == UNCERTAIN))
        entry: dict[str, Any] = {
            "kind": kind,
            "anatomy": anatomy,
            "finding": finding,
            "n_pos": n_pos,
            "n_neg": n_neg,
            "n_uncertain": n_uncertain,
            "n_unknown": int(n_cases - n_pos - n_neg - n_uncertain),
        }
        if n_pos and n_neg:
            entry["status"] = "ok"
        elif n_neg:
            entry["status"] = "no positives"
        elif n_pos:
            entry["status"] = "no negatives"
        else:
            entry["status"] = "no labels"
        evaluable = entry["status"] == "ok"
        entry["auc"] = roc_auc(scores[:, c], col_y) if evaluable else None
        entry["auc_ci"] = list(_percentile_ci(boot[:, c], alpha)) if (evaluable and boot is not None) else [None, None]
        fpr = tpr = None
        if evaluable:
            fpr, tpr, thr = roc_curve(scores[:, c], col_y)
        given = None if thresholds is None else thresholds[c]
        if given is not None and np.isfinite(given):
            threshold, source = float(given), "given"
        elif given is not None and n_pos + n_neg:
            # not chosen on validation (it was not evaluable there): the fixed default
            threshold, source = float(default_threshold), "default"
        elif evaluable:
            threshold, source = youden_closest_threshold(fpr, tpr, thr), "this data"
        else:
            threshold, source = None, None
        entry["threshold"] = threshold
        entry["threshold_source"] = source
        op = binary_metrics(scores[:, c], col_y, threshold) if threshold is not None and n_pos + n_neg else {}
        for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1"):
            entry[key] = op.get(key)
        if keep_curves and evaluable:
            entry["roc"] = {"fpr": fpr, "tpr": tpr}
        pairs.append(entry)

    ok = [e for e in pairs if e["status"] == "ok"]

    def mean_of(key: str) -> Optional[float]:
        vals = [e[key] for e in ok if e[key] is not None]
        return float(np.mean(vals)) if vals else None

    weight = sum(e["n_pos"] for e in ok if e["f1"] is not None)
    weighted_f1 = sum(e["f1"] * e["n_pos"] for e in ok if e["f1"] is not None) / weight if weight else None
    mean_ci: tuple[Optional[float], Optional[float]] = (None, None)
    if boot is not None and ok:
        ok_cols = [c for c, e in enumerate(pairs) if e["status"] == "ok"]
        mean_ci = _percentile_ci(_mean_over_pairs(boot[:, ok_cols]), alpha)
    result: dict[str, Any] = {
        "n_cases": int(n_cases),
        "n_pairs": int(n_cols),
        "n_evaluable": len(ok),
        "n_skipped": int(n_cols - len(ok)),
        "skipped": [f"{e['anatomy']}/{e['finding']}: {e['status']}" for e in pairs if e["status"] != "ok"],
        "mean_auc": mean_of("auc"),
        "mean_auc_ci": list(mean_ci),
        "mean_balanced_accuracy": mean_of("balanced_accuracy"),
        "mean_f1": mean_of("f1"),
        "weighted_f1": weighted_f1,
        "mean_accuracy": mean_of("accuracy"),
        "mean_sensitivity": mean_of("sensitivity"),
        "mean_specificity": mean_of("specificity"),
        "n_boot": int(n_boot),
        "alpha": float(alpha),
        "seed": int(seed),
        "pairs": pairs,
    }
    kinds = sorted({e["kind"] for e in pairs})
    if len(kinds) > 1:
        result["by_kind"] = {}
        for kind in kinds:
            aucs = [e["auc"] for e in ok if e["kind"] == kind]
            result["by_kind"][kind] = {"mean_auc": float(np.mean(aucs)) if aucs else None, "n_evaluable": len(aucs)}
    if groups:
        lookup = {(e["anatomy"], e["finding"]): (c, e) for c, e in enumerate(pairs)}
        result["groups"] = {}
        for gname, members in groups.items():
            members = [tuple(m) for m in members]
            unknown = [m for m in members if m not in lookup]
            if unknown:
                raise ValueError(
                    f"group {gname!r}: {unknown} are not (anatomy, finding) pairs of the catalog "
                    f"(study findings are ({STUDY!r}, finding))"
                )
            cols = [lookup[m][0] for m in members if lookup[m][1]["status"] == "ok"]
            aucs = [pairs[c]["auc"] for c in cols]
            g_ci: tuple[Optional[float], Optional[float]] = (None, None)
            if boot is not None and cols:
                g_ci = _percentile_ci(_mean_over_pairs(boot[:, cols]), alpha)
            result["groups"][gname] = {
                "mean_auc": float(np.mean(aucs)) if aucs else None,
                "mean_auc_ci": list(g_ci),
                "n_evaluable": len(cols),
                "n_pairs": len(members),
            }
    return result


def _threshold_columns(
    thresholds: Any, study_thresholds: Any, where: Sequence[tuple[int, int]], cat: Catalog
) -> Optional[np.ndarray]:
    """Per-column thresholds from ``(M, F)`` / ``(S,)`` arrays (or the pair :func:`choose_thresholds` returns)."""
    if thresholds is None and study_thresholds is None:
        return None
    if isinstance(thresholds, Mapping):  # the "thresholds" entry of compute_zero_shot_metrics (JSON: NaN -> None)
        thresholds, study_thresholds = thresholds.get("anatomy"), thresholds.get("study", study_thresholds)
    elif isinstance(thresholds, tuple) and len(thresholds) == 2 and study_thresholds is None:
        thresholds, study_thresholds = thresholds
    out = np.full(len(where), np.nan)
    if thresholds is not None:
        t = _to_numpy(thresholds, "thresholds")
        f_needed = max([len(a.findings) for a in cat.anatomies] + [0])
        if t.ndim != 2 or t.shape[0] != cat.num_anatomies or t.shape[1] < f_needed:
            raise ValueError(f"thresholds must be (M={cat.num_anatomies}, F>={f_needed}), got shape {t.shape}")
        for c, (i, j) in enumerate(where):
            if i >= 0:
                out[c] = t[i, j]
    if study_thresholds is not None:
        t = _to_numpy(study_thresholds, "study_thresholds").reshape(-1)
        if t.size < len(cat.study_findings):
            raise ValueError(f"study_thresholds must hold {len(cat.study_findings)} values, got {t.size}")
        for c, (i, j) in enumerate(where):
            if i < 0:
                out[c] = t[j]
    return out


def evaluate_findings(
    probs: ArrayLike,
    labels: ArrayLike,
    catalog: Union[Catalog, str, Mapping],
    study_probs: Optional[ArrayLike] = None,
    study_labels: Optional[ArrayLike] = None,
    thresholds: Any = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    study_thresholds: Optional[ArrayLike] = None,
    groups: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
    default_threshold: float = 0.5,
    keep_curves: bool = True,
) -> dict[str, Any]:
    """Zero-shot diagnosis metrics of every (anatomy, finding) pair and study finding of a catalog.

    Args:
        probs: ``(N, M, F)`` P(finding present), ``M`` anatomies in catalog order, finding ``j`` of
            anatomy ``i`` at ``[:, i, j]`` (``F`` >= the largest number of findings; padding ignored).
        labels: ``(N, M, F)`` label codes (1 present, 0 absent; -1 uncertain and -2 unknown/padding
            are left out).
        catalog: a :class:`Catalog`, a built-in catalog name, a ``.json`` path or a catalog dict.
        study_probs: ``(N, S)`` P(study finding present), optional.
        study_labels: ``(N, S)`` label codes of the study findings (with ``study_probs``).
        thresholds: decision thresholds chosen on validation: an ``(M, F)`` array, the
            ``(anatomy, study)`` pair returned by :func:`choose_thresholds`, or a dict with keys
            ``anatomy`` / ``study`` (``compute_zero_shot_metrics``'s ``thresholds``; None = NaN). NaN entries (not
            evaluable on validation) use ``default_threshold``. None: each pair's threshold is chosen
            on *this* data (closest to (0, 1); optimistic, fine for validation, not for a test report).
        n_boot: bootstrap resamples of the cases (0: no CIs; much faster).
        alpha: 1 - confidence level.
        seed: bootstrap seed.
        study_thresholds: ``(S,)`` thresholds of the study findings (when ``thresholds`` is an array).
        groups: optional name -> list of ``(anatomy, finding)`` pairs (study findings as
            ``("study", finding)``): mean AUC (with CI) per group, e.g. ``"small focal findings"``.
        default_threshold: threshold for pairs whose given threshold is NaN.
        keep_curves: keep each evaluable pair's ROC points (``roc``: ``fpr``, ``tpr`` arrays) for plots.

    Returns:
        A dict: ``pairs`` (one entry per pair: ``kind`` ("anatomy"/"study"), ``anatomy``, ``finding``,
        ``status`` ("ok", "no positives", "no negatives", "no labels"), ``n_pos``, ``n_neg``,
        ``n_uncertain``, ``n_unknown``, ``auc``, ``auc_ci``, ``threshold``, ``threshold_source``,
        ``accuracy``, ``balanced_accuracy``, ``sensitivity``, ``specificity``, ``precision``, ``f1``,
        ``roc``), and the summary over evaluable ("ok") pairs only: ``mean_auc``, ``mean_auc_ci``
        (cases resampled jointly), ``mean_balanced_accuracy``, ``mean_f1``, ``weighted_f1`` (weights
        ``n_pos``), ``mean_accuracy``, ``mean_sensitivity``, ``mean_specificity``, ``n_pairs``,
        ``n_evaluable``, ``n_skipped``, ``skipped``, ``by_kind`` (when study findings are given),
        ``groups``, ``n_cases``, ``n_boot``, ``alpha``, ``seed``, ``catalog``. Undefined values are None.
    """
    cat = _catalog(catalog)
    scores, labs, entries, where = _finding_columns(probs, labels, cat, study_probs, study_labels)
    th = _threshold_columns(thresholds, study_thresholds, where, cat)
    result = _evaluate_columns(scores, labs, entries, th, n_boot, alpha, seed, default_threshold, groups, keep_curves)
    result["catalog"] = cat.name
    return result


def choose_thresholds(
    probs: ArrayLike,
    labels: ArrayLike,
    catalog: Union[Catalog, str, Mapping],
    study_probs: Optional[ArrayLike] = None,
    study_labels: Optional[ArrayLike] = None,
    default: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair decision thresholds closest to (FPR 0, TPR 1), chosen on a validation split.

    Args:
        probs, labels, catalog, study_probs, study_labels: as for :func:`evaluate_findings`.
        default: threshold of pairs that are not evaluable here (no positive or no negative).

    Returns:
        ``(M, F)`` float64 thresholds (NaN in padding columns past an anatomy's findings) and ``(S,)``
        study thresholds (``default`` when no study inputs are given).
    """
    cat = _catalog(catalog)
    scores, labs, _, where = _finding_columns(probs, labels, cat, study_probs, study_labels)
    anat = np.full((cat.num_anatomies, max(cat.max_findings, 1)), np.nan)
    for i, a in enumerate(cat.anatomies):
        anat[i, : len(a.findings)] = default
    study = np.full(len(cat.study_findings), float(default))
    for c, (i, j) in enumerate(where):
        fpr, tpr, thr = roc_curve(scores[:, c], labs[:, c])
        t = youden_closest_threshold(fpr, tpr, thr)
        if t is None:
            continue
        if i >= 0:
            anat[i, j] = t
        else:
            study[j] = t
    return anat, study


def anatomy_level_labels(labels: ArrayLike, catalog: Union[Catalog, str, Mapping]) -> np.ndarray:
    """"Any finding in this anatomy" label codes from per-finding codes.

    Args:
        labels: ``(N, M, F)`` finding label codes.
        catalog: the catalog (says which columns are an anatomy's own findings).

    Returns:
        ``(N, M)`` int64: PRESENT if any finding is present; else ABSENT if *all* the anatomy's
        findings are known absent; else UNCERTAIN if one is uncertain; else UNKNOWN (also for anatomies
        without findings).
    """
    cat = _catalog(catalog)
    y = _to_numpy(labels, "labels")
    _check_anatomy_array(y, "labels", cat)
    out = np.full(y.shape[:2], UNKNOWN, dtype=np.int64)
    for i, a in enumerate(cat.anatomies):
        k = len(a.findings)
        if k == 0:
            continue
        own = y[:, i, :k]
        any_pos = (own == PRESENT).any(1)
        all_neg = (own == ABSENT).all(1)
        any_unc = (own == UNCERTAIN).any(1)
        out[:, i] = np.where(any_pos, PRESENT, np.where(all_neg, ABSENT, np.where(any_unc, UNCERTAIN, UNKNOWN)))
    return out


def evaluate_abnormality(
    abnormality: ArrayLike,
    labels: ArrayLike,
    catalog: Union[Catalog, str, Mapping],
    presence: Optional[ArrayLike] = None,
    thresholds: Optional[ArrayLike] = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    default_threshold: float = 0.5,
    keep_curves: bool = True,
) -> dict[str, Any]:
    """The anatomy abnormality score (normality prior) as an "any finding in this anatomy" detector.

    Args:
        abnormality: ``(N, M)`` scores in [0, 1] (higher = more abnormal).
        labels: ``(N, M, F)`` finding label codes; the target is :func:`anatomy_level_labels`.
        catalog: the catalog.
        presence: optional ``(N, M)`` anatomy presence codes; anatomies known ABSENT are left out.
        thresholds: optional ``(M,)`` thresholds chosen on validation (NaN: ``default_threshold``);
            None chooses them on this data.
        n_boot, alpha, seed, default_threshold, keep_curves: as for :func:`evaluate_findings`.

    Returns:
        The same structure as :func:`evaluate_findings`, one pair per anatomy with findings
        (``kind`` "abnormality", ``finding`` ``"any finding"``).
    """
    cat = _catalog(catalog)
    target = anatomy_level_labels(labels, cat)
    score = _to_numpy(abnormality, "abnormality")
    if score.shape != target.shape:
        raise ValueError(f"abnormality must be (N, M)={target.shape}, got shape {score.shape}")
    if presence is not None:
        pres = _to_numpy(presence, "presence")
        if pres.shape != target.shape:
            raise ValueError(f"presence must be (N, M)={target.shape}, got shape {pres.shape}")
        target = np.where(pres == ABSENT, UNKNOWN, target)
    rows = [i for i, a in enumerate(cat.anatomies) if a.findings]
    entries = [("abnormality", cat.anatomies[i].name, ANY_FINDING) for i in rows]
    th = None
    if thresholds is not None:
        t = _to_numpy(thresholds, "thresholds").reshape(-1)
        if t.size != cat.num_anatomies:
            raise ValueError(f"abnormality thresholds must hold M={cat.num_anatomies} values, got {t.size}")
        th = t[rows]
    result = _evaluate_columns(
        score[:, rows], target[:, rows].astype(np.float64), entries, th, n_boot, alpha, seed, default_threshold, None, keep_curves
    )
    result["catalog"] = cat.name
    return result
