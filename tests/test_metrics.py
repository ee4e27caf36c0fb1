"""Tests of anatomy_vlp_bundle.metrics: AUC / ROC / operating points against hand cases, label-code
handling, bootstrap CIs, box IoU, result files and the Ignite metric (single process and 2-rank gloo)."""

from __future__ import annotations

import json
import math
import os
import socket
import time

import numpy as np
import pytest
import torch

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.metrics import (
    anatomy_level_labels,
    binary_metrics,
    bootstrap_auc_ci,
    bootstrap_mean_auc_ci,
    choose_thresholds,
    evaluate_abnormality,
    evaluate_boxes,
    evaluate_findings,
    format_markdown_table,
    roc_auc,
    roc_curve,
    write_metrics,
    youden_closest_threshold,
)
from anatomy_vlp_bundle.metrics.handlers import ZeroShotMetric, compute_zero_shot_metrics

CATALOG = {
    "name": "metrics_test",
    "modality": "CT",
    "anatomies": [
        {"name": "liver", "labels": [5], "findings": ["hypodense lesion", "steatosis"]},
        {"name": "left lung", "labels": [10], "findings": ["nodule", "effusion", "emphysema"]},
        {"name": "spleen", "labels": [1], "findings": ["splenomegaly"]},
    ],
    "study_findings": ["lymphadenopathy"],
}


def _brute_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _split(n, seed=0, signal=1.0, p_unknown=0.1):
    """Random (N, M, F) probs/labels following CATALOG, with a learnable signal and some -1/-2 labels."""
    cat = load_catalog(CATALOG)
    rng = np.random.default_rng(seed)
    m, f = cat.num_anatomies, cat.max_findings
    labels = np.full((n, m, f), -2.0)
    for i, a in enumerate(cat.anatomies):
        labels[:, i, : len(a.findings)] = (rng.random((n, len(a.findings))) < 0.3).astype(float)
    hide = rng.random(labels.shape) < p_unknown
    labels[hide & (labels >= 0)] = rng.choice([-1.0, -2.0], size=int((hide & (labels >= 0)).sum()))
    probs = 1 / (1 + np.exp(-(signal * (labels == 1) * 2 - 1 + rng.normal(size=labels.shape))))
    study_labels = (rng.random((n, 1)) < 0.4).astype(float)
    study_probs = np.clip(0.3 * study_labels + rng.random((n, 1)) * 0.7, 0, 1)
    return cat, probs, labels, study_probs, study_labels


# --------------------------------------------------------------------------- ROC-AUC
def test_auc_hand_cases_and_ties():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # pos {0.5, 0.9}, neg {0.5, 0.2}: 0.5 vs 0.5 is a tie (1/2), the other three pairs are won -> 3.5 / 4
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert roc_auc([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert roc_auc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.1], [0, 0, 1]) == 0.0
    # undefined: no positive, no negative, nothing known
    assert roc_auc([0.1, 0.2], [0, 0]) is None
    assert roc_auc([0.1, 0.2], [1, 1]) is None
    assert roc_auc([0.1, 0.2], [-1, -2]) is None
    assert roc_auc([], []) is None
    # torch input
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)


def test_roc_curve_hand_case_and_trapezoid_equals_mann_whitney():
    fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    # tied scores: one point per unique score, the curve moves diagonally through a tie
    fpr, tpr, thr = roc_curve([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.2])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    rng = np.random.default_rng(1)
    for _ in range(5):
        s = np.round(rng.random(60), 1)  # many ties
        y = (rng.random(60) < 0.4).astype(int)
        fpr, tpr, _ = roc_curve(s, y)
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        assert roc_auc(s, y) == pytest.approx(area)
        assert roc_auc(s, y) == pytest.approx(_brute_auc(s, y))


def test_nan_score_on_a_labelled_case_is_an_error_but_not_on_unknown():
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.1, float("nan"), 0.3], [0, 1, 1])
    assert roc_auc([0.1, float("nan"), 0.3], [0, -2, 1]) == 1.0


# --------------------------------------------------------------------------- operating point
def test_threshold_closest_to_top_left_on_hand_roc():
    fpr = [0.0, 0.0, 0.2, 0.6, 1.0]
    tpr = [0.0, 0.6, 0.9, 1.0, 1.0]
    thr = [np.inf, 0.9, 0.7, 0.4, 0.1]
    # distances to (0, 1): 1, 0.4, 0.224, 0.6, 1
    assert youden_closest_threshold(fpr, tpr, thr) == pytest.approx(0.7)
    # inverted scores: every point is at distance >= 1; the +inf point is not chosen
    f, t, th = roc_curve([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])
    assert np.isfinite(youden_closest_threshold(f, t, th))
    f, t, th = roc_curve([0.1, 0.2], [0, 0])
    assert youden_closest_threshold(f, t, th) is None


def test_binary_metrics_hand_case():
    m = binary_metrics([0.9, 0.8, 0.3, 0.2, 0.6], [1, 1, 1, 0, 0], threshold=0.5)
    # predicted [1, 1, 0, 0, 1]: tp 2, fn 1, tn 1, fp 1
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # score == threshold counts as positive
    assert binary_metrics([0.5, 0.4], [1, 0], 0.5)["sensitivity"] == 1.0
    m = binary_metrics([0.1, 0.2], [0, 0], 0.5)
    assert m["sensitivity"] is None and m["balanced_accuracy"] is None and m["specificity"] == 1.0


def test_perfect_and_inverted_predictions():
    cat, _, labels, sp, sy = _split(80, seed=3)
    perfect = np.where(labels == 1, 0.9, 0.1)
    res = evaluate_findings(perfect, labels, cat, study_probs=sy * 0.8 + 0.1, study_labels=sy, n_boot=50)
    ok = [e for e in res["pairs"] if e["status"] == "ok"]
    assert len(ok) == 7  # 6 anatomy pairs + 1 study finding
    for e in ok:
        assert e["auc"] == 1.0 and e["f1"] == 1.0 and e["balanced_accuracy"] == 1.0
        assert e["auc_ci"] == [1.0, 1.0]
    assert res["mean_auc"] == 1.0 and res["mean_f1"] == 1.0 and res["weighted_f1"] == 1.0
    assert res["mean_balanced_accuracy"] == 1.0
    inverted = evaluate_findings(1 - perfect, labels, cat, n_boot=0)
    assert all(e["auc"] == 0.0 for e in inverted["pairs"] if e["status"] == "ok")
    assert inverted["mean_auc"] == 0.0 and inverted["mean_auc_ci"] == [None, None]


def test_uncertain_and_unknown_labels_do_not_matter():
    cat, probs, labels, sp, sy = _split(120, seed=4)
    sy[::7] = -1
    sy[1::7] = -2
    assert (labels == -1).any() and (labels[:, :, :3] == -2).any()
    base = evaluate_findings(probs, labels, cat, study_probs=sp, study_labels=sy, n_boot=200)
    changed = probs.copy()
    changed[labels < 0] = np.random.default_rng(9).random(int((labels < 0).sum()))
    changed[labels == -2] = np.nan  # padding / unknown may even be NaN (deploy pads with -1)
    sp2 = sp.copy()
    sp2[sy < 0] = 1.0
    other = evaluate_findings(changed, labels, cat, study_probs=sp2, study_labels=sy, n_boot=200)
    for a, b in zip(base["pairs"], other["pairs"]):
        for key in ("auc", "auc_ci", "threshold", "f1", "balanced_accuracy", "n_pos", "n_neg", "n_uncertain"):
            assert a[key] == b[key], (a["anatomy"], a["finding"], key)
    assert base["mean_auc"] == other["mean_auc"] and base["mean_auc_ci"] == other["mean_auc_ci"]
    e = base["pairs"][0]
    assert e["n_pos"] + e["n_neg"] + e["n_uncertain"] + e["n_unknown"] == 120 and e["n_uncertain"] > 0


def test_pair_without_positives_is_reported_and_not_averaged():
    cat, probs, labels, sp, sy = _split(60, seed=5)
    labels[:, 2, 0] = np.where(labels[:, 2, 0] == 1, 0, labels[:, 2, 0])  # spleen/splenomegaly: no positives
    labels[:, 0, 1] = np.where(labels[:, 0, 1] >= 0, 1, labels[:, 0, 1])  # liver/steatosis: no negatives
    res = evaluate_findings(probs, labels, cat, n_boot=100)
    by = {(e["anatomy"], e["finding"]): e for e in res["pairs"]}
    assert by[("spleen", "splenomegaly")]["status"] == "no positives"
    assert by[("spleen", "splenomegaly")]["auc"] is None
    assert by[("liver", "steatosis")]["status"] == "no negatives"
    assert res["n_evaluable"] == 4 and res["n_skipped"] == 2 and res["n_pairs"] == 6
    assert "spleen/splenomegaly: no positives" in res["skipped"]
    ok = [e["auc"] for e in res["pairs"] if e["status"] == "ok"]
    assert res["mean_auc"] == pytest.approx(np.mean(ok))
    # the mean CI is over the same evaluable pairs
    scores = np.stack([probs[:, 0, 0], probs[:, 1, 0], probs[:, 1, 1], probs[:, 1, 2]], 1)
    labs = np.stack([labels[:, 0, 0], labels[:, 1, 0], labels[:, 1, 1], labels[:, 1, 2]], 1)
    assert res["mean_auc_ci"] == pytest.approx(list(bootstrap_mean_auc_ci(scores, labs, n_boot=100)))


def test_given_thresholds_and_groups():
    cat, probs, labels, sp, sy = _split(100, seed=6)
    anat_t, study_t = choose_thresholds(probs, labels, cat, study_probs=sp, study_labels=sy)
    assert anat_t.shape == (3, 3) and study_t.shape == (1,)
    assert np.isnan(anat_t[0, 2]) and np.isnan(anat_t[2, 1])  # padding
    chosen = evaluate_findings(probs, labels, cat, study_probs=sp, study_labels=sy, n_boot=0)
    given = evaluate_findings(probs, labels, cat, study_probs=sp, study_labels=sy, thresholds=(anat_t, study_t), n_boot=0)
    for a, b in zip(chosen["pairs"], given["pairs"]):
        assert a["threshold"] == pytest.approx(b["threshold"]) and a["f1"] == pytest.approx(b["f1"])
        assert a["threshold_source"] == "this data" and b["threshold_source"] == "given"
    # the JSON form stored after validation (NaN written as null)
    stored = json.loads(json.dumps({"anatomy": np.where(np.isnan(anat_t), None, anat_t).tolist(), "study": study_t.tolist()}))
    again = evaluate_findings(probs, labels, cat, study_probs=sp, study_labels=sy, thresholds=stored, n_boot=0)
    assert [e["threshold"] for e in again["pairs"]] == [e["threshold"] for e in given["pairs"]]
    fixed = np.full((3, 3), np.nan)
    res = evaluate_findings(probs, labels, cat, thresholds=fixed, n_boot=0)
    assert all(e["threshold"] == 0.5 and e["threshold_source"] == "default" for e in res["pairs"])
    groups = {"lung": [("left lung", "nodule"), ("left lung", "effusion")], "study": [("study", "lymphadenopathy")]}
    res = evaluate_findings(probs, labels, cat, study_probs=sp, study_labels=sy, groups=groups, n_boot=100)
    by = {(e["anatomy"], e["finding"]): e["auc"] for e in res["pairs"]}
    assert res["groups"]["lung"]["mean_auc"] == pytest.approx((by[("left lung", "nodule")] + by[("left lung", "effusion")]) / 2)
    assert res["groups"]["study"]["n_evaluable"] == 1
    assert set(res["by_kind"]) == {"anatomy", "study"}
    with pytest.raises(ValueError, match="not .anatomy, finding. pairs"):
        evaluate_findings(probs, labels, cat, groups={"x": [("liver", "nodule")]}, n_boot=0)


def test_shape_errors_name_the_argument():
    cat, probs, labels, sp, sy = _split(10)
    with pytest.raises(ValueError, match=r"probs must be \(N, M=3"):
        evaluate_findings(probs[:, :2], labels, cat)
    with pytest.raises(ValueError, match="labels has 9 cases"):
        evaluate_findings(probs, labels[:9], cat)
    with pytest.raises(ValueError, match="together"):
        evaluate_findings(probs, labels, cat, study_probs=sp)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_estimate_narrows_and_is_fast():
    rng = np.random.default_rng(0)

    def sample(n):
        y = (rng.random(n) < 0.3).astype(int)
        return rng.normal(size=n) + 1.0 * y, y

    s, y = sample(100)
    t0 = time.perf_counter()
    lo, hi = bootstrap_auc_ci(s, y, n_boot=1000)
    elapsed = time.perf_counter() - t0
    auc = roc_auc(s, y)
    assert lo < auc < hi
    assert elapsed < 0.5, f"1000 resamples of 100 cases took {elapsed:.3f} s"
    assert bootstrap_auc_ci(s, y, n_boot=1000) == (lo, hi)  # seeded
    slo, shi = bootstrap_auc_ci(s, y, n_boot=1000, stratified=True)
    assert slo < auc < shi
    s2, y2 = sample(2000)
    lo2, hi2 = bootstrap_auc_ci(s2, y2, n_boot=1000)
    assert lo2 < roc_auc(s2, y2) < hi2
    assert hi2 - lo2 < 0.5 * (hi - lo)
    assert bootstrap_auc_ci([0.1, 0.2], [0, 0]) == (None, None)
    assert bootstrap_auc_ci(s, y, n_boot=0) == (None, None)


def test_mean_auc_ci_contains_mean():
    cat, probs, labels, sp, sy = _split(150, seed=8)
    res = evaluate_findings(probs, labels, cat, n_boot=300)
    lo, hi = res["mean_auc_ci"]
    assert lo < res["mean_auc"] < hi
    for e in res["pairs"]:
        assert e["auc_ci"][0] <= e["auc"] <= e["auc_ci"][1]


# --------------------------------------------------------------------------- abnormality
def test_anatomy_level_labels_and_abnormality():
    cat = load_catalog(CATALOG)
    labels = np.full((4, 3, 3), -2.0)
    labels[0, 0, :2] = [1, -2]  # any present -> 1
    labels[1, 0, :2] = [0, 0]  # all absent -> 0
    labels[2, 0, :2] = [0, -1]  # uncertain
    labels[3, 0, :2] = [0, -2]  # not all known -> unknown
    labels[:, 1, :3] = 0
    labels[0, 1, 2] = 1
    target = anatomy_level_labels(labels, cat)
    np.testing.assert_array_equal(target[:, 0], [1, 0, -1, -2])
    np.testing.assert_array_equal(target[:, 1], [1, 0, 0, 0])
    abn = np.array([[0.9, 0.8, 0.1], [0.2, 0.1, 0.1], [0.5, 0.3, 0.1], [0.5, 0.2, 0.1]])
    res = evaluate_abnormality(abn, labels, cat, n_boot=0)
    by = {e["anatomy"]: e for e in res["pairs"]}
    assert by["liver"]["auc"] == 1.0 and by["liver"]["n_pos"] == 1 and by["liver"]["n_neg"] == 1
    assert by["left lung"]["auc"] == 1.0 and by["spleen"]["status"] == "no labels"
    # an anatomy known to be absent is left out
    presence = np.ones((4, 3))
    presence[1, 1] = 0
    res = evaluate_abnormality(abn, labels, cat, presence=presence, n_boot=0)
    assert {e["anatomy"]: e for e in res["pairs"]}["left lung"]["n_neg"] == 2


# --------------------------------------------------------------------------- localisation
def test_box_iou_2d_hand_case():
    pred = np.array([[[0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 1, 1]]], dtype=float)
    target = np.array([[[1, 1, 3, 3], [0, 0, 4, 4], [np.nan] * 4]])
    presence = np.array([[1, 1, 0]])
    res = evaluate_boxes(pred, target, presence, presence_prob=np.array([[0.9, 0.4, 0.2]]), anatomy_names=["a", "b", "c"])
    assert res["per_anatomy"]["a"]["mean_iou"] == pytest.approx(1 / 7, rel=1e-5)  # overlap 1, union 4 + 4 - 1
    assert res["per_anatomy"]["b"]["mean_iou"] == pytest.approx(1.0, rel=1e-5)
    assert res["per_anatomy"]["c"]["mean_iou"] is None and res["per_anatomy"]["c"]["n_present"] == 0
    assert res["mean_iou"] == pytest.approx((1 / 7 + 1) / 2, rel=1e-5)
    assert res["mean_iou_instances"] == pytest.approx((1 / 7 + 1) / 2, rel=1e-5)
    assert res["fraction_iou_ge_threshold"] == 0.5
    # presence called at >= 0.5: a right, b wrong (0.4 but present), c right (absent, 0.2)
    assert res["presence_accuracy"] == pytest.approx(2 / 3)
    assert res["per_anatomy"]["b"]["presence_accuracy"] == 0.0


def test_box_iou_3d_hand_case_and_instance_mean():
    pred = np.zeros((2, 2, 6))
    target = np.zeros((2, 2, 6))
    pred[0, 0], target[0, 0] = [0, 0, 0, 2, 2, 2], [0, 0, 0, 2, 2, 4]  # 8 / 16
    pred[1, 0], target[1, 0] = [0, 0, 0, 2, 2, 2], [0, 0, 0, 2, 2, 2]  # 1
    pred[0, 1], target[0, 1] = [0, 0, 0, 1, 1, 1], [5, 5, 5, 6, 6, 6]  # 0
    presence = np.array([[1, 1], [1, -2]])  # anatomy 1 unknown in sample 1
    res = evaluate_boxes(torch.tensor(pred), torch.tensor(target), torch.tensor(presence))
    assert res["per_anatomy"]["anatomy_0"]["mean_iou"] == pytest.approx(0.75, rel=1e-5)
    assert res["per_anatomy"]["anatomy_1"]["mean_iou"] == pytest.approx(0.0, abs=1e-6)
    assert res["mean_iou"] == pytest.approx(0.375, rel=1e-5)
    assert res["mean_iou_instances"] == pytest.approx(0.5, rel=1e-5)
    assert res["fraction_iou_ge_threshold"] == pytest.approx(2 / 3)
    assert res["presence_accuracy"] is None and res["n_instances"] == 3
    with pytest.raises(ValueError, match="marked present but holds NaN"):
        bad = target.copy()
        bad[1, 0, 0] = np.nan
        evaluate_boxes(pred, bad, presence)



def test_mask_dice_hand_case_empty_masks_are_nan_and_left_out():
    from anatomy_vlp_bundle.engines.iteration import mask_dice
    from anatomy_vlp_bundle.metrics.report import format_markdown_table

    target = torch.zeros(1, 3, 4, 4)
    target[0, 0, :2, :2] = 1  # 4 voxels
    target[0, 1, :, :] = 1  # anatomy 2 has no mask
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :2, :1] = 5  # 2 of the 4 voxels, no false positive: Dice 2*2 / (2 + 4)
    dice = mask_dice(logits, target, [4, 4])
    assert dice.shape == (1, 3)
    assert dice[0, 0].item() == pytest.approx(2 / 3, rel=1e-5)
    assert dice[0, 1].item() == pytest.approx(0.0, abs=1e-6)  # nothing predicted where the mask is full
    assert math.isnan(dice[0, 2].item())
    # a coarser logit grid is upsampled to the input grid before comparing
    assert mask_dice(torch.full((1, 3, 2, 2), 5.0), target, [4, 4])[0, 1].item() == pytest.approx(1.0)
    assert mask_dice(torch.zeros(0), target, [4, 4]) is None and mask_dice(logits, None, [4, 4]) is None

    pred = np.array([[[0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 1, 1]]], dtype=float)
    res = evaluate_boxes(pred, pred, np.array([[1, 1, 0]]), mask_dice=dice.numpy(), anatomy_names=["a", "b", "c"])
    assert res["per_anatomy"]["a"]["mean_dice"] == pytest.approx(2 / 3, rel=1e-5)
    assert res["per_anatomy"]["c"]["mean_dice"] is None and res["per_anatomy"]["c"]["n_masks"] == 0
    assert res["mean_dice"] == pytest.approx(1 / 3, rel=1e-5)  # (2/3 + 0) / 2: the undefined one left out
    assert "mask Dice" in format_markdown_table({"localisation": res})
    with pytest.raises(ValueError, match="mask_dice must be"):
        evaluate_boxes(pred, pred, np.array([[1, 1, 0]]), mask_dice=np.zeros((2, 3)))

# --------------------------------------------------------------------------- files
def test_write_metrics_json_pngs_and_markdown(tmp_path):
    cat, probs, labels, sp, sy = _split(60, seed=10)
    labels[:, 2, 0] = np.where(labels[:, 2, 0] == 1, 0, labels[:, 2, 0])
    n, m = probs.shape[:2]
    boxes = np.tile(np.array([0, 0, 0, 4, 4, 4], float), (n, m, 1))
    arrays = {
        "zero_shot_probs": probs, "findings": labels, "study_probs": sp, "study_findings": sy,
        "boxes_pred": boxes + 1, "boxes_true": boxes, "presence_prob": np.full((n, m), 0.8),
        "anatomy_presence": np.ones((n, m)), "abnormality": probs.max(-1),
    }
    metrics = compute_zero_shot_metrics(arrays, cat, n_boot=100)
    written = write_metrics(metrics, tmp_path / "out", prefix="test_")
    names = sorted(p.name for p in written["figures"])
    assert names == sorted([
        "test_roc_liver.png", "test_roc_left_lung.png", "test_roc_spleen.png", "test_roc_study.png",
        "test_roc_summary.png", "test_roc_abnormality.png", "test_roc_abnormality_summary.png",
    ])
    for p in written["figures"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    data = json.loads((tmp_path / "out" / "test_metrics.json").read_text())
    assert data["diagnosis"]["mean_auc"] == pytest.approx(metrics["mean_auc"])
    spleen = [e for e in data["diagnosis"]["pairs"] if e["anatomy"] == "spleen"][0]
    assert spleen["auc"] is None and spleen["status"] == "no positives"
    assert "roc" not in data["diagnosis"]["pairs"][0]
    assert data["localisation"]["per_anatomy"]["left lung"]["mean_iou"] == pytest.approx(27 / 101, rel=1e-5)
    assert np.asarray(data["thresholds"]["anatomy"], dtype=float).shape == (3, 3)
    md = format_markdown_table(metrics)
    assert "| liver | hypodense lesion |" in md and "mean AUC" in md and "Anatomy localisation" in md
    assert "no positives" in md
    assert written["markdown"].read_text() == md + "\n"
    # NaN-safe: a bare evaluate_findings result with NaN / numpy values still writes strict JSON
    res = evaluate_findings(probs, labels, cat, n_boot=0)
    res["extra"] = {"nan": float("nan"), "np": np.float32(0.5), "arr": np.array([1.0, np.inf])}
    out = write_metrics(res, tmp_path / "bare", plots=False, include_curves=True)
    bare = json.loads(out["json"].read_text())
    assert bare["extra"] == {"nan": None, "np": 0.5, "arr": [1.0, None]}
    assert "fpr" in bare["pairs"][0]["roc"] and out["figures"] == []


# --------------------------------------------------------------------------- Ignite metric
def _batches(arrays, sizes):
    start = 0
    for size in sizes:
        yield {k: torch.as_tensor(v[start : start + size]) for k, v in arrays.items()}
        start += size


def _arrays(n, seed):
    cat, probs, labels, sp, sy = _split(n, seed=seed)
    rng = np.random.default_rng(seed)
    m = probs.shape[1]
    target = np.concatenate([rng.random((n, m, 3)) * 10, 10 + rng.random((n, m, 3)) * 10], -1)
    return cat, {
        "zero_shot_probs": probs.astype(np.float32), "findings": labels, "study_probs": sp, "study_findings": sy,
        "boxes_pred": target + rng.normal(size=target.shape), "boxes_true": target,
        "presence_prob": rng.random((n, m)), "anatomy_presence": (rng.random((n, m)) < 0.8).astype(float),
        "abnormality": rng.random((n, m)),
    }


def test_ignite_metric_accumulates_like_one_shot():
    from ignite.engine import Engine

    cat, arrays = _arrays(37, seed=11)
    metric = ZeroShotMetric(cat, n_boot=100)
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, "val_mean_auc")
    state = engine.run(list(_batches(arrays, [10, 10, 10, 7])), max_epochs=1)
    one_shot = compute_zero_shot_metrics(
        {k: (v.astype(np.float32).astype(np.float64) if k == "zero_shot_probs" else v) for k, v in arrays.items()},
        cat, n_boot=100,
    )
    assert state.metrics["val_mean_auc"] == pytest.approx(one_shot["mean_auc"])
    details = state.metric_details["val_mean_auc"]
    assert details["diagnosis"]["mean_auc_ci"] == pytest.approx(one_shot["diagnosis"]["mean_auc_ci"])
    assert details["localisation"]["mean_iou"] == pytest.approx(one_shot["localisation"]["mean_iou"])
    assert details["abnormality"]["mean_auc"] == pytest.approx(one_shot["abnormality"]["mean_auc"])
    assert metric.collected["findings"].shape == (37, 3, 3)
    # a second epoch starts from scratch (reset)
    state = engine.run(list(_batches(arrays, [20, 17])), max_epochs=1)
    assert metric.collected["findings"].shape == (37, 3, 3)


def test_ignite_metric_in_monai_evaluator_with_decollated_output():
    from monai.engines import SupervisedEvaluator

    cat, arrays = _arrays(24, seed=12)
    del arrays["abnormality"]
    loader = list(_batches(arrays, [8, 8, 8]))
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        iteration_update=lambda engine, batch: batch,  # the training developer's step returns these keys
        key_val_metric={"val_mean_auc": ZeroShotMetric(cat, n_boot=0)},
        decollate=True,  # engine.state.output becomes a list of per-sample dicts
    )
    evaluator.run()
    expected = compute_zero_shot_metrics(arrays, cat, n_boot=0)["mean_auc"]
    assert evaluator.state.metrics["val_mean_auc"] == pytest.approx(expected)
    assert evaluator.state.best_metric == pytest.approx(expected)
    assert "abnormality" not in evaluator.state.metric_details["val_mean_auc"]


def test_ignite_metric_rejects_missing_keys():
    metric = ZeroShotMetric(CATALOG)
    with pytest.raises(KeyError, match="lacks .'findings'."):
        metric.update({"zero_shot_probs": torch.zeros(2, 3, 3)})
    _, arrays = _arrays(4, seed=1)
    metric.update(next(_batches(arrays, [2])))
    with pytest.raises(ValueError, match="keys changed"):
        metric.update({k: v for k, v in next(_batches(arrays, [2])).items() if k != "abnormality"})
    empty = ZeroShotMetric(CATALOG)
    assert math.isnan(empty.compute())


def _ddp_worker(rank, world, port, shards, result_file):
    import torch.distributed as dist

    # LOCAL_RANK as torchrun sets it (ignite.distributed warns without it)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cat, arrays = _arrays(30, seed=13)
        metric = ZeroShotMetric(cat, n_boot=50)
        metric.reset()
        start, stop = shards[rank]
        sizes = [4] * ((stop - start) // 4) + ([(stop - start) % 4] if (stop - start) % 4 else [])
        for batch in _batches({k: v[start:stop] for k, v in arrays.items()}, sizes):
            metric.update(batch)
        value = metric.compute()
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump({"value": value, "n": int(metric.collected["findings"].shape[0]),
                           "ci": metric.details["diagnosis"]["mean_auc_ci"]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork (spawn re-imports torch and monai: ~25 s)")
@pytest.mark.parametrize(
    "shards",
    [
        [(18, 30), (0, 18)],  # uneven shards; rank 0 holds cases 18-29, so the gathered order is 18-29, 0-17
        [(0, 30), (30, 30)],  # rank 1 sees no batch at all
    ],
)
def test_ignite_metric_under_two_process_gloo(tmp_path, shards):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = tmp_path / "result.json"
    t0 = time.perf_counter()
    mp.start_processes(_ddp_worker, args=(2, port, shards, str(result_file)), nprocs=2, join=True, start_method="fork")
    assert time.perf_counter() - t0 < 60
    got = json.loads(result_file.read_text())
    cat, arrays = _arrays(30, seed=13)
    order = np.r_[shards[0][0] : shards[0][1], shards[1][0] : shards[1][1]]
    one_shot = compute_zero_shot_metrics(
        {k: (v.astype(np.float64) if k != "zero_shot_probs" else v.astype(np.float32).astype(np.float64))[order]
         for k, v in arrays.items()}, cat, n_boot=50,
    )
    assert got["n"] == 30
    assert got["value"] == pytest.approx(one_shot["mean_auc"])
    assert got["ci"] == pytest.approx(one_shot["diagnosis"]["mean_auc_ci"])
