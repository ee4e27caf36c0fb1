"""Text and retrieval metrics in plain Python (no new dependency).

Tokenisation (:func:`tokenize`, used by BLEU and ROUGE-L): lower-cased; a token is a run of
letters and digits, with a decimal point kept inside a number (``"2.5"``); punctuation and
whitespace separate tokens and are dropped. So ``"The liver is normal."`` and ``"the liver is
normal"`` score as identical.

- :func:`corpus_bleu`: corpus-level BLEU (Papineni et al. 2002) with one reference per hypothesis:
  clipped n-gram counts summed over the corpus, geometric mean of the n-gram precisions, brevity
  penalty ``exp(1 - r / c)`` when the corpus hypothesis length ``c`` is below the reference
  length ``r``. Smoothing (Chen & Cherry 2014, method 1): a precision whose match count is 0 uses
  ``epsilon`` matches instead (default 0.1), so one missing 4-gram order does not zero the score.
- :func:`rouge_l`: ROUGE-L F-measure (Lin 2004) from the longest common subsequence of tokens,
  ``F = (1 + b^2) P R / (R + b^2 P)`` with ``P = LCS / len(hyp)``, ``R = LCS / len(ref)``;
  ``beta = 1`` (plain F1) by default. :func:`mean_rouge_l` averages it over pairs.
- :func:`recall_at_k`: retrieval Recall@K of a similarity matrix whose ground truth is its diagonal.
- :func:`label_f1`: macro F1 over (anatomy, finding) pairs of parse-report style label dicts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["tokenize", "ngram_counts", "corpus_bleu", "lcs_length", "rouge_l", "mean_rouge_l", "recall_at_k", "label_f1"]

_TOKEN = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased word and number tokens of ``text`` (punctuation dropped; see the module docstring)."""
    return _TOKEN.findall(str(text or "").lower())


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the ``n``-grams (tuples) of ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4, epsilon: float = 0.1) -> float:
    """Corpus-level BLEU-``max_n`` of hypotheses against one reference each.

    Args:
        hypotheses: generated texts.
        references: the reference text of each hypothesis (same length).
        max_n: the largest n-gram order (4 for BLEU-4), uniform weights ``1 / max_n``.
        epsilon: match count used for an order with no match (smoothing; 0 disables it, and then
            any order without a match gives BLEU 0).

    Returns:
        BLEU in ``[0, 1]``; 0 when the hypotheses have no token at all.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = tokenize(hyp), tokenize(ref)
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            hc, rc = ngram_counts(h, n), ngram_counts(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0:
        return 0.0
    log_precision = 0.0
    for m, t in zip(matches, totals):
        numerator = m if m > 0 else epsilon
        if numerator <= 0:
            return 0.0
        log_precision += math.log(numerator / max(t, 1)) / max_n
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) len(b)) time)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure of one hypothesis against one reference (0 when either has no token).

    Args:
        beta: weight of recall over precision (1: F1; the COCO caption toolkit uses 1.2).
    """
    h, r = tokenize(hypothesis), tokenize(reference)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(h), lcs / len(r)
    b2 = beta * beta
    return (1.0 + b2) * precision * recall / (recall + b2 * precision)


def mean_rouge_l(hypotheses: Sequence[str], references: Sequence[str], beta: float = 1.0) -> float:
    """Mean :func:`rouge_l` over hypothesis/reference pairs (NaN for no pair)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"mean_rouge_l: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return float("nan")
    return sum(rouge_l(h, r, beta) for h, r in zip(hypotheses, references)) / len(hypotheses)


def recall_at_k(similarity: Any, k: int) -> float:
    """Recall@K of a retrieval whose correct item for query ``i`` is item ``i``.

    The rank of the correct item is the number of *other* items scoring at least as high
    (ties count against the query, so a constant similarity retrieves nothing below ``k = N``).

    Args:
        similarity: ``(N_query, N_items)`` scores (numpy array, torch tensor or nested lists),
            ``N_items >= N_query``; larger is more similar.
        k: how many top items count as retrieved (>= 1).

    Returns:
        Fraction of queries whose correct item is among the top ``k``.
    """
    s = similarity.detach().cpu().numpy() if hasattr(similarity, "detach") else np.asarray(similarity)
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < s.shape[0] or s.shape[0] == 0:
        raise ValueError(f"recall_at_k: similarity must be (N_query, N_items) with 0 < N_query <= N_items, got {s.shape}")
    if int(k) < 1:
        raise ValueError(f"recall_at_k: k must be >= 1, got {k}")
    n = s.shape[0]
    correct = s[np.arange(n), np.arange(n)]
    rank = (s >= correct[:, None]).sum(axis=1) - 1
    return float((rank < int(k)).mean())


def label_f1(
    pred_labels: Sequence[Mapping[str, Mapping[str, int]]], true_labels: Sequence[Mapping[str, Mapping[str, int]]]
) -> dict[str, Any]:
    """Macro F1 over (anatomy, finding) pairs of per-case label dicts.

    Each case is ``anatomy -> finding -> 1 | 0 | -1`` (``ParsedReport.findings()``; study findings
    under an anatomy name of the caller's choice). Treatment of labels:

    - truth: only known labels count: 1 is a positive, 0 a negative; uncertain (-1) and unknown
      (the pair missing) leave the case out for that pair;
    - prediction: 1 is a positive call; 0, -1 and a missing pair are *not* a positive call (a
      generated report that does not state a finding did not find it).

    A pair's F1 is ``2 TP / (2 TP + FP + FN)`` over the cases where its truth is known; a pair
    with ``TP + FP + FN = 0`` (no positive in truth or prediction) has no F1 and is left out of
    the macro average.

    Returns:
        ``{"macro_f1": float (NaN when no pair has an F1), "pairs": {"anatomy/finding": {"f1",
        "tp", "fp", "fn", "tn"}}}``.
    """
    if len(pred_labels) != len(true_labels):
        raise ValueError(f"label_f1: {len(pred_labels)} predicted cases but {len(true_labels)} true cases")
    counts: dict[tuple[str, str], list[int]] = {}
    for pred, truth in zip(pred_labels, true_labels):
        for anatomy, findings in (truth or {}).items():
            for finding, value in (findings or {}).items():
                if int(value) not in (0, 1):
                    continue
                called = int(((pred or {}).get(anatomy) or {}).get(finding, 0)) == 1
                c = counts.setdefault((anatomy, finding), [0, 0, 0, 0])  # tp, fp, fn, tn
                c[(0 if called else 2) if int(value) == 1 else (1 if called else 3)] += 1
    pairs: dict[str, dict[str, Any]] = {}
    scores = []
    for (anatomy, finding), (tp, fp, fn, tn) in counts.items():
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        if tp + fp + fn:
            scores.append(f1)
        pairs[f"{anatomy}/{finding}"] = {"f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}
    return {"macro_f1": float(np.mean(scores)) if scores else float("nan"), "pairs": pairs}
