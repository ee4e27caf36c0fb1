"""Vision-language losses: hand-computed tiny cases, masking, gradients, the zero-shot scorer."""

import math

import pytest
import torch
import torch.nn.functional as F

from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT, UNCERTAIN, UNKNOWN
from anatomy_vlp_bundle.losses import (
    LogitScale,
    VLPCriterion,
    anatomy_infonce,
    calibrated_infonce,
    calibrated_targets,
    disease_contrastive,
    global_finding_labels,
    global_sigmoid_loss,
    prompt_pair_loss,
    text_key_ids,
    zero_shot_logits,
    zero_shot_probs,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- hand references
def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _soft_ce_row(logits, targets):
    lse = math.log(sum(math.exp(x) for x in logits))
    return -sum(t * (x - lse) for t, x in zip(targets, logits) if t > 0)


def hand_infonce(images, texts, scale, weights, hard=None):
    """Symmetric soft-target InfoNCE written with explicit loops over Python floats."""
    n = len(images)
    images = [_unit(v) for v in images]
    texts = [_unit(v) for v in texts]
    sim = [[scale * _dot(images[i], texts[j]) for j in range(n)] for i in range(n)]
    i2t = 0.0
    for i in range(n):
        row_w = weights[i]
        targets = [w / sum(row_w) for w in row_w]
        row = list(sim[i])
        if hard is not None:
            row += [scale * _dot(images[i], _unit(h)) for h in hard[i]]
            targets += [0.0] * len(hard[i])
        i2t += _soft_ce_row(row, targets)
    t2i = 0.0
    for j in range(n):
        col_w = [weights[i][j] for i in range(n)]
        targets = [w / sum(col_w) for w in col_w]
        t2i += _soft_ce_row([sim[i][j] for i in range(n)], targets)
    return 0.5 * (i2t / n + t2i / n)


def hand_entropy(weights):
    total = 0.0
    for row_w in weights:
        p = [w / sum(row_w) for w in row_w]
        total -= sum(x * math.log(x) for x in p if x > 0)
    return total / len(weights)


IMAGES = [[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.4, 1.0]]
TEXTS = [[0.9, 0.0, 0.1], [0.3, 0.8, 0.0], [0.2, 0.1, 1.2]]
# Chosen so that the row sums differ (the row-normalised targets are not symmetric): samples 0 and 1
# are normal, samples 1 and 2 have the same text after case/space folding.
NORMAL = [True, True, False]
KEYS = ["normal liver.", "Simple  Cyst.", "simple cyst."]
# W = I + both-normal + same-text, by hand
WEIGHTS = [
    [1 + 1 + 1, 0 + 1 + 0, 0 + 0 + 0],
    [0 + 1 + 0, 1 + 1 + 1, 0 + 0 + 1],
    [0 + 0 + 0, 0 + 0 + 1, 1 + 0 + 1],
]


def test_calibrated_targets_match_hand_matrix():
    targets = calibrated_targets(torch.tensor(NORMAL), text_key_ids(KEYS))
    expected = torch.tensor([[w / sum(row) for w in row] for row in WEIGHTS])
    torch.testing.assert_close(targets, expected)
    # distinct texts, nobody normal: plain InfoNCE's identity targets
    torch.testing.assert_close(calibrated_targets(None, torch.arange(4)), torch.eye(4))


def test_text_key_ids_stable_and_nested():
    ids = text_key_ids([["a b", None], ["A  B", "c"]])
    assert ids.shape == (2, 2)
    assert ids[0, 0] == ids[1, 0] and ids[0, 1] == -1 and ids[1, 1] != ids[0, 0]
    # blake2b, not Python's salted hash: a fixed value across processes
    assert text_key_ids(["x"]).item() == text_key_ids(["x"]).item()
    with pytest.raises(TypeError):
        text_key_ids(torch.zeros(3))


def test_calibrated_infonce_hand_case():
    scale = 5.0
    result = calibrated_infonce(
        torch.tensor(IMAGES), torch.tensor(TEXTS), scale, normal=torch.tensor(NORMAL), text_keys=KEYS
    )
    assert result.loss.item() == pytest.approx(hand_infonce(IMAGES, TEXTS, scale, WEIGHTS), rel=1e-5)
    assert result.floor.item() == pytest.approx(hand_entropy(WEIGHTS), rel=1e-6)
    # plain InfoNCE (no calibration) is a different number: the calibration matters
    plain = calibrated_infonce(torch.tensor(IMAGES), torch.tensor(TEXTS), scale)
    eye = [[float(i == j) for j in range(3)] for i in range(3)]
    assert plain.loss.item() == pytest.approx(hand_infonce(IMAGES, TEXTS, scale, eye), rel=1e-5)
    assert plain.floor.item() == 0.0
    assert abs(plain.loss.item() - result.loss.item()) > 1e-2


def test_hard_negatives_only_in_image_to_text_and_masked():
    scale = 4.0
    hard = [[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.0, 0.1], [0.2, 0.9, 0.3]], [[0.0, 0.3, 1.0], [1.0, 1.0, 1.0]]]
    result = calibrated_infonce(
        torch.tensor(IMAGES),
        torch.tensor(TEXTS),
        scale,
        normal=torch.tensor(NORMAL),
        text_keys=KEYS,
        hard_negative_emb=torch.tensor(hard),
    )
    assert result.loss.item() == pytest.approx(hand_infonce(IMAGES, TEXTS, scale, WEIGHTS, hard=hard), rel=1e-5)
    # a hard negative identical to the true text is a negative: the loss rises
    same = torch.tensor(TEXTS)[:, None, :]
    harder = calibrated_infonce(torch.tensor(IMAGES), torch.tensor(TEXTS), scale, hard_negative_emb=same)
    assert harder.loss > calibrated_infonce(torch.tensor(IMAGES), torch.tensor(TEXTS), scale).loss
    # invalid hard negatives are ignored entirely
    valid = torch.tensor([[True, False], [False, False], [True, False]])
    masked = calibrated_infonce(
        torch.tensor(IMAGES),
        torch.tensor(TEXTS),
        scale,
        normal=torch.tensor(NORMAL),
        text_keys=KEYS,
        hard_negative_emb=torch.tensor(hard),
        hard_negative_valid=valid,
    )
    kept = [[hard[0][0]], [], [hard[2][0]]]
    assert masked.loss.item() == pytest.approx(hand_infonce(IMAGES, TEXTS, scale, WEIGHTS, hard=kept), rel=1e-5)
    assert torch.isfinite(masked.loss)


def test_loss_reaches_floor_when_aligned_and_separated():
    # one-hot, identical image/text embeddings, distinct texts: floor 0, loss -> 0 at high scale
    emb = torch.eye(4, 8)
    result = calibrated_infonce(emb, emb.clone(), 100.0)
    assert result.floor.item() == 0.0
    assert result.loss.item() < 1e-6


def test_loss_never_below_floor_and_optimisation_reaches_it():
    torch.manual_seed(0)
    normal = torch.tensor([True, True, True, False, False])
    keys = ["normal", "normal", "clear", "lesion a", "lesion b"]
    for _ in range(5):
        result = calibrated_infonce(torch.randn(5, 6), torch.randn(5, 6), 20.0, normal=normal, text_keys=keys)
        assert result.loss >= result.floor - 1e-6
    images = torch.randn(5, 6, requires_grad=True)
    texts = torch.randn(5, 6, requires_grad=True)
    scale = LogitScale(init_temperature=0.05)
    optimiser = torch.optim.Adam([images, texts, *scale.parameters()], lr=0.05)
    for _ in range(400):
        optimiser.zero_grad()
        result = calibrated_infonce(images, texts, scale(), normal=normal, text_keys=keys)
        result.loss.backward()
        optimiser.step()
    assert result.loss.item() - result.floor.item() < 2e-2
    assert result.floor.item() == pytest.approx(
        hand_entropy(
            [
                [1 + 1 + 1, 1 + 1, 1, 0, 0],
                [1 + 1, 1 + 1 + 1, 1, 0, 0],
                [1, 1, 1 + 1 + 1, 0, 0],
                [0, 0, 0, 2, 0],
                [0, 0, 0, 0, 2],
            ]
        ),
        rel=1e-6,
    )


def test_gradients_reach_embeddings_and_logit_scale():
    scale = LogitScale()
    images = torch.randn(4, 6, requires_grad=True)
    texts = torch.randn(4, 6, requires_grad=True)
    calibrated_infonce(images, texts, scale(), normal=torch.tensor([1, 1, 0, 0]).bool()).loss.backward()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0
    assert scale.log_scale.grad is not None and scale.log_scale.grad.abs() > 0


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_logit_scale_clamped():
    scale = LogitScale(init_temperature=0.07, min_temperature=0.001, max_temperature=0.5)
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(math.log(1e6))
    assert scale().item() == pytest.approx(1000.0, rel=1e-5)
    assert scale.log_scale.item() == pytest.approx(math.log(1000.0))  # parameter itself pulled back
    with torch.no_grad():
        scale.log_scale.fill_(-5.0)
    scale.eval()  # eval clamps the value without touching the parameter
    assert scale().item() == pytest.approx(2.0, rel=1e-5)
    assert scale.temperature == pytest.approx(0.5, rel=1e-5)
    assert scale.log_scale.item() == -5.0
    # several calls before one backward (criterion terms each read the scale) stay legal
    scale.train()
    (scale() + scale()).backward()
    assert scale.log_scale.grad is not None
    # the module scripts (an exported network may hold it)
    scripted = torch.jit.script(LogitScale(0.07).eval())
    assert scripted().item() == pytest.approx(1 / 0.07, rel=1e-5)
    fixed = LogitScale(0.1, learnable=False)
    assert not list(fixed.parameters()) and fixed().item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="min_temperature"):
        LogitScale(init_temperature=0.9)


# --------------------------------------------------------------------------- per-anatomy InfoNCE
def test_anatomy_infonce_averages_anatomies_with_two_samples():
    torch.manual_seed(1)
    b, m, d = 4, 3, 5
    region = torch.randn(b, m, d)
    sentence = torch.randn(b, m, d)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 1]]).bool()  # anatomy 2 has one sample
    normal = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]]).bool()
    keys = [["n", "a", None], ["n", None, None], ["x", "b", None], [None, "b", "c"]]
    result = anatomy_infonce(region, sentence, valid, normal, keys, 10.0)
    expected_losses, expected_floors = [], []
    for anatomy in range(2):
        rows = valid[:, anatomy].nonzero(as_tuple=True)[0]
        r = calibrated_infonce(
            region[rows, anatomy],
            sentence[rows, anatomy],
            10.0,
            normal=normal[rows, anatomy],
            text_keys=[keys[i][anatomy] for i in rows.tolist()],
        )
        expected_losses.append(r.loss)
        expected_floors.append(r.floor)
    torch.testing.assert_close(result.loss, torch.stack(expected_losses).mean())
    torch.testing.assert_close(result.floor, torch.stack(expected_floors).mean())

    empty = anatomy_infonce(region.requires_grad_(), sentence, torch.zeros(b, m, dtype=torch.bool), normal, None, 10.0)
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad
    empty.loss.backward()


def test_anatomy_infonce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="valid and normal"):
        anatomy_infonce(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 2).bool(), torch.ones(2, 3).bool(), None, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        anatomy_infonce(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(2, 3).bool(), torch.ones(2, 3).bool(), None, 1.0)


# --------------------------------------------------------------------------- disease-level contrastive
def hand_disease(view_a, view_b, normal, scale):
    feats = [_unit(v) for v in view_a + view_b]
    n = len(view_a)
    total = 0.0
    for i in range(2 * n):
        positives = [
            j for j in range(2 * n) if j != i and (j % n == i % n or (normal[i % n] and normal[j % n]))
        ]
        others = [j for j in range(2 * n) if j != i]
        lse = math.log(sum(math.exp(scale * _dot(feats[i], feats[j])) for j in others))
        total += -sum(scale * _dot(feats[i], feats[j]) - lse for j in positives) / len(positives)
    return total / (2 * n)


def test_disease_contrastive_hand_case():
    view_a = [[1.0, 0.1, 0.0], [0.8, 0.3, 0.1], [0.0, 1.0, 0.2]]
    view_b = [[0.9, 0.0, 0.2], [1.0, 0.2, 0.0], [0.1, 0.9, 0.0]]
    normal = [True, True, False]
    result = disease_contrastive(
        torch.tensor(view_a)[:, None], torch.tensor(view_b)[:, None], torch.ones(3, 1).bool(), torch.tensor(normal)[:, None], 3.0
    )
    assert result.loss.item() == pytest.approx(hand_disease(view_a, view_b, normal, 3.0), rel=1e-5)
    # positives per instance: normal -> 3 (other normal x2 views + own view), abnormal -> 1
    assert result.floor.item() == pytest.approx((4 * math.log(3) + 2 * math.log(1)) / 6)


def test_disease_contrastive_pulls_normals_and_isolates_abnormal():
    normal = torch.tensor([True, True, False])[:, None]
    valid = torch.ones(3, 1).bool()
    base_a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])[:, None]
    base_b = base_a.clone()

    def loss_of(a, b):
        return disease_contrastive(a, b, valid, normal, 5.0).loss.item()

    base = loss_of(base_a, base_b)
    # two normal samples moved towards each other: loss falls
    closer = base_a.clone()
    closer[1, 0] = torch.tensor([0.7, 0.7, 0.0])
    closer_b = base_b.clone()
    closer_b[1, 0] = torch.tensor([0.7, 0.7, 0.0])
    assert loss_of(closer, closer_b) < base
    # the abnormal sample moved towards a normal one: loss rises (it is nobody's positive but its own view's)
    abnormal_close = base_a.clone()
    abnormal_close[2, 0] = torch.tensor([0.7, 0.0, 0.7])
    abnormal_close_b = base_b.clone()
    abnormal_close_b[2, 0] = torch.tensor([0.7, 0.0, 0.7])
    assert loss_of(abnormal_close, abnormal_close_b) > base
    # gradient on the abnormal instance pushes it away from the normal ones
    a = base_a.clone().requires_grad_()
    disease_contrastive(a, base_b, valid, normal, 5.0).loss.backward()
    step = -a.grad[2, 0]
    assert torch.dot(step, base_a[0, 0]) <= 1e-7 and torch.dot(step, base_a[1, 0]) <= 1e-7


# --------------------------------------------------------------------------- label losses
def test_label_losses_ignore_unknown_and_uncertain():
    torch.manual_seed(2)
    cls = torch.randn(2, 6, requires_grad=True)
    prompts = torch.randn(3, 6)
    labels = torch.tensor([[PRESENT, UNKNOWN, UNCERTAIN], [ABSENT, PRESENT, UNKNOWN]])
    loss = global_sigmoid_loss(cls, prompts, labels, 10.0, 0.5)
    # hand BCE over the three known labels
    logits = 10.0 * F.normalize(cls, dim=-1) @ F.normalize(prompts, dim=-1).t() + 0.5
    known = [(0, 0, 1.0), (1, 0, 0.0), (1, 1, 1.0)]
    expected = sum(F.binary_cross_entropy_with_logits(logits[i, k], torch.tensor(t)) for i, k, t in known) / 3
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad = cls.grad.clone()
    # move the prompt of an unknown/uncertain-only finding: loss and gradient unchanged
    moved = prompts.clone()
    moved[2] = torch.randn(6) * 10
    cls.grad = None
    loss2 = global_sigmoid_loss(cls, moved, labels, 10.0, 0.5)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(cls.grad, grad)
    # uncertain_as=1 brings the uncertain label in
    assert not torch.isclose(global_sigmoid_loss(cls, prompts, labels, 10.0, 0.5, uncertain_as=1), loss)


def test_prompt_pair_loss_masks_labels_and_padding():
    torch.manual_seed(3)
    b, m, f, d = 2, 2, 3, 5
    region = torch.randn(b, m, d, requires_grad=True)
    pos, neg = torch.randn(m, f, d), torch.randn(m, f, d)
    labels = torch.full((b, m, f), UNKNOWN)
    labels[0, 0, 0] = PRESENT
    labels[1, 1, 1] = ABSENT
    labels[0, 1, 2] = UNCERTAIN
    labels[1, 0, 2] = PRESENT  # in a padded column: left out by finding_valid
    finding_valid = torch.tensor([[True, True, False], [True, True, True]])
    loss = prompt_pair_loss(region, pos, neg, labels, 7.0, finding_valid=finding_valid)
    logits = zero_shot_logits(region, pos, neg, torch.tensor(7.0))
    expected = 0.5 * (
        F.binary_cross_entropy_with_logits(logits[0, 0, 0], torch.tensor(1.0))
        + F.binary_cross_entropy_with_logits(logits[1, 1, 1], torch.tensor(0.0))
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad = region.grad.clone()
    assert grad[0, 1].abs().sum() == 0  # anatomy 1 of sample 0: only an uncertain label
    # a region whose labels are all unknown/uncertain/padded changes: loss and gradient unchanged
    region2 = region.detach().clone()
    region2[0, 1] = torch.randn(d) * 5
    region2[1, 0] = torch.randn(d) * 5
    region2.requires_grad_()
    loss2 = prompt_pair_loss(region2, pos, neg, labels, 7.0, finding_valid=finding_valid)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(region2.grad, grad)
    # pos_weight scales positives only
    weighted = prompt_pair_loss(region, pos, neg, labels, 7.0, pos_weight=3.0, finding_valid=finding_valid)
    expected_w = 0.5 * (
        3 * F.binary_cross_entropy_with_logits(logits[0, 0, 0], torch.tensor(1.0))
        + F.binary_cross_entropy_with_logits(logits[1, 1, 1], torch.tensor(0.0))
    )
    torch.testing.assert_close(weighted, expected_w)
    # nothing labelled: 0, still differentiable
    none = prompt_pair_loss(region, pos, neg, torch.full((b, m, f), UNKNOWN), 7.0)
    assert none.item() == 0.0 and none.requires_grad


def test_label_losses_give_gradient_to_logit_scale():
    scale = LogitScale()
    region = torch.randn(2, 2, 4)
    labels = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 1]]])
    prompt_pair_loss(region, torch.randn(2, 2, 4), torch.randn(2, 2, 4), labels, scale()).backward()
    assert scale.log_scale.grad.abs() > 0
    bias = torch.zeros((), requires_grad=True)
    scale2 = LogitScale()
    global_sigmoid_loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([[1, 0], [0, 1]]), scale2(), bias).backward()
    assert scale2.log_scale.grad.abs() > 0 and bias.grad.abs() > 0


# --------------------------------------------------------------------------- zero-shot scorer
def test_zero_shot_logits_formula_and_softmax_equivalence():
    torch.manual_seed(4)
    region, pos, neg = torch.randn(2, 3, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    scale = torch.tensor(12.0)
    logits = zero_shot_logits(region, pos, neg, scale)
    assert logits.shape == (2, 3, 4)
    for b, m, f in [(0, 0, 0), (1, 2, 3), (1, 1, 2)]:
        cos_pos = F.cosine_similarity(region[b, m], pos[m, f], dim=0)
        cos_neg = F.cosine_similarity(region[b, m], neg[m, f], dim=0)
        assert logits[b, m, f].item() == pytest.approx((12 * cos_pos - 12 * cos_neg).item(), abs=1e-5)
        two_way = torch.softmax(torch.stack([12 * cos_pos, 12 * cos_neg]), dim=0)[0]
        assert zero_shot_probs(region, pos, neg, scale)[b, m, f].item() == pytest.approx(two_way.item(), abs=1e-6)
    # padded (all-zero) prompts -> logit 0
    assert torch.all(zero_shot_logits(region, torch.zeros(3, 4, 8), torch.zeros(3, 4, 8), scale) == 0)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_zero_shot_logits_scriptable():
    scripted_logits = torch.jit.script(zero_shot_logits)
    scripted_probs = torch.jit.script(zero_shot_probs)
    region, pos, neg = torch.randn(2, 3, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    scale = torch.tensor(9.0)
    torch.testing.assert_close(scripted_logits(region, pos, neg, scale), zero_shot_logits(region, pos, neg, scale))
    torch.testing.assert_close(scripted_probs(region, pos, neg, scale), zero_shot_probs(region, pos, neg, scale))


# --------------------------------------------------------------------------- global labels
def test_global_finding_labels_rules():
    # K=3 global findings: 0 = study finding 0; 1 = (anatomy 0, f 0) + (anatomy 1, f 0); 2 = (anatomy 1, f 1)
    membership = torch.zeros(3, 2, 2, dtype=torch.bool)
    membership[1, 0, 0] = membership[1, 1, 0] = True
    membership[2, 1, 1] = True
    study_index = torch.tensor([0, -1, -1])
    findings = torch.tensor(
        [
            [[PRESENT, UNKNOWN], [ABSENT, ABSENT]],  # any present -> present
            [[ABSENT, UNKNOWN], [ABSENT, UNCERTAIN]],  # all absent -> absent; uncertain -> uncertain
            [[ABSENT, UNKNOWN], [UNKNOWN, UNKNOWN]],  # one member unknown -> unknown, never absent
        ]
    )
    study = torch.tensor([[ABSENT], [UNKNOWN], [PRESENT]])
    out = global_finding_labels(findings, study, membership, study_index)
    expected = torch.tensor([[ABSENT, PRESENT, ABSENT], [UNKNOWN, ABSENT, UNCERTAIN], [PRESENT, UNKNOWN, UNKNOWN]])
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- criterion
def test_criterion_weights_enable_and_dict_terms():
    calls = []

    def detection_loss(outputs, targets):
        calls.append("detection")
        return {"l1": outputs["x"] * 2, "giou": outputs["x"] * 3}

    def never(outputs, targets):
        raise AssertionError("a zero-weight or disabled term must not be computed")

    def contrastive(outputs, targets):
        return {"loss": outputs["x"] * 5, "floor": torch.tensor(0.25)}

    x = torch.tensor(1.0, requires_grad=True)
    criterion = VLPCriterion(
        {"detection": 2.0, "detection.giou": 0.5, "contrastive": 1.0, "zero": 0.0, "off": 1.0},
        enabled={"off": False},
        terms={"detection": detection_loss, "zero": never, "off": never, "contrastive": contrastive},
    )
    out = criterion({"x": x}, {})
    # detection = 1 * 2 + 0.5 * 3 = 3.5, weighted x2; contrastive 5
    assert out["detection"].item() == pytest.approx(3.5)
    assert out["detection.l1"].item() == pytest.approx(2.0) and out["detection.giou"].item() == pytest.approx(3.0)
    assert out["contrastive"].item() == 5.0 and out["contrastive.floor"].item() == 0.25
    assert out["loss"].item() == pytest.approx(2 * 3.5 + 5.0)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert x.grad.item() == pytest.approx(2 * (2 + 1.5) + 5)
    assert "zero" not in out and "off" not in out and calls == ["detection"]

    with pytest.raises(KeyError, match="normality"):
        VLPCriterion({"normality": 1.0})({}, {})


def test_criterion_builtin_terms():
    torch.manual_seed(5)
    b, m, f, d = 3, 2, 2, 6
    scale = LogitScale()
    region = torch.randn(b, m, d, requires_grad=True)
    outputs = {
        "region_emb": region,
        "logit_scale": scale(),
        "prompt_pos": torch.randn(m, f, d),
        "prompt_neg": torch.randn(m, f, d),
        "prompt_valid": torch.ones(m, f, dtype=torch.bool),
        "cls_emb": torch.randn(b, d, requires_grad=True),
        "global_prompt_emb": torch.randn(4, d),
        "logit_bias": torch.zeros((), requires_grad=True),
    }
    targets = {
        "findings": torch.randint(-2, 2, (b, m, f)),
        "global_labels": torch.randint(-2, 2, (b, 4)),
        "sentence_emb": torch.randn(b, m, d),
        "sentence_valid": torch.ones(b, m, dtype=torch.bool),
        "anatomy_normal": torch.tensor([[1, 0], [1, 1], [0, 0]]).bool(),
    }
    out = VLPCriterion({"prompt_pair": 1.0, "global": 0.5, "fine_grained": 2.0})(outputs, targets)
    assert set(out) >= {"loss", "prompt_pair", "global", "fine_grained", "fine_grained.floor"}
    expected = out["prompt_pair"] + 0.5 * out["global"] + 2.0 * out["fine_grained"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert region.grad.abs().sum() > 0 and scale.log_scale.grad.abs() > 0
