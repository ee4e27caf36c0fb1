"""Transfer classification (issue 7, item 1): known answers of the pieces the suite is built from.

Tiny encoders on tiny tensors: a perfect classifier scores AUC 1, a separable task is learned by
the probe and by fine-tuning, queries and labels move to another catalog by name, subsets nest.
"""

import pytest
import torch

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.data.labels import UNKNOWN
from anatomy_vlp_bundle.networks.anatomy_vit import AnatomyViT
from anatomy_vlp_bundle.networks.vlp_model import AnatomyVLPModel
from anatomy_vlp_bundle.transfer.classification import (
    L2_GRID,
    AnatomyClassifier,
    evaluate_classifier,
    extract_features,
    fine_tune,
    linear_probe,
    predict,
)
from anatomy_vlp_bundle.transfer.data import load_encoder, load_image_model, remap_labels, remap_study_labels, subset_indices

CT = load_catalog("synthetic_ct")
TINY = {"img_size": [16, 16, 16], "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
        "stem_channels": [8, 16], "embed_dim": 32, "prior": {"codes_per_anatomy": 4, "code_dim": 8, "hidden_dim": 16, "top_k": 2},
        "region_stats": 8}


def tiny_encoder(num_anatomies: int = CT.num_anatomies) -> AnatomyViT:
    torch.manual_seed(0)
    return AnatomyViT(3, img_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                      num_anatomies=num_anatomies, stem_channels=(8, 16))


@pytest.fixture(scope="module")
def tiny_checkpoint():
    torch.manual_seed(0)
    model = AnatomyVLPModel(CT, **TINY)
    return {"model": model.state_dict(), "extras": {"catalog": CT.to_dict(), "model_config": dict(model.config)}}


def labels_from(positive: torch.Tensor, catalog=CT) -> torch.Tensor:
    """Finding codes with pair (0, 0) = ``positive`` and every other pair unknown."""
    lab = torch.full((len(positive), catalog.num_anatomies, catalog.max_findings), float(UNKNOWN))
    lab[:, 0, 0] = positive.float()
    return lab


def test_subsets_are_seeded_nested_and_sized():
    small, large = subset_indices(100, 0.05, seed=3), subset_indices(100, 0.2, seed=3)
    assert len(small) == 5 and len(large) == 20 and len(subset_indices(100, 1.0)) == 100
    assert set(small.tolist()) <= set(large.tolist())
    assert torch.equal(small, subset_indices(100, 0.05, seed=3)) and not torch.equal(large, subset_indices(100, 0.2, seed=4))
    assert len(subset_indices(10, 0.01)) == 1
    with pytest.raises(ValueError, match="fraction"):
        subset_indices(10, 0.0)


def test_labels_move_to_another_catalog_by_name():
    other = load_catalog("ct_totalseg")
    lab = torch.randint(0, 2, (3, CT.num_anatomies, CT.max_findings)).float()
    out = remap_labels(lab, CT, other)
    assert out.shape == (3, other.num_anatomies, other.max_findings)
    for i, a in enumerate(other.anatomies):
        for j, f in enumerate(a.findings):
            if a.name in CT.names and f in CT.anatomy(a.name).findings:
                src = CT.anatomy(a.name).findings.index(f)
                assert torch.equal(out[:, i, j], lab[:, CT.index(a.name), src]), (a.name, f)
            else:
                assert (out[:, i, j] == UNKNOWN).all(), (a.name, f)
    assert (out[:, other.index("trachea")] == UNKNOWN).all()  # an anatomy the source does not have
    study = torch.tensor([[1.0], [0.0], [-1.0]])
    moved = remap_study_labels(study, CT, other)
    for j, f in enumerate(other.study_findings):
        expected = study[:, 0] if f == CT.study_findings[0] else torch.full((3,), float(UNKNOWN))
        assert torch.equal(moved[:, j], expected), f


def test_perfect_and_inverted_classifiers_score_auc_1_and_0():
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 2, (40, CT.num_anatomies, CT.max_findings), generator=gen).float()
    study = torch.randint(0, 2, (40, 1), generator=gen).float()
    perfect = evaluate_classifier((truth, study), (truth, study), CT, n_boot=0)
    assert perfect["mean_auc"] == pytest.approx(1.0) and perfect["mean_f1"] == pytest.approx(1.0)
    inverted = evaluate_classifier((1 - truth, 1 - study), (truth, study), CT, n_boot=0)
    assert inverted["mean_auc"] == pytest.approx(0.0)


def test_linear_probe_learns_a_separable_task_and_generalises():
    gen = torch.Generator().manual_seed(1)
    model = AnatomyClassifier(tiny_encoder(), CT)
    d = model.weight.shape[-1]
    feats = torch.randn(280, CT.num_anatomies, d, generator=gen) * 3 + 5  # badly scaled on purpose
    cls = torch.randn(280, d, generator=gen)
    positive = feats[:, 0, 7] > 5  # anatomy 0's feature 7 decides finding 0
    lab = labels_from(positive)
    no_study = torch.full((40, 1), float(UNKNOWN))
    tr, va, te = slice(0, 200), slice(200, 240), slice(240, 280)
    history = linear_probe(model, (feats[tr], cls[tr]), lab[tr], epochs=100,
                           val_features=(feats[va], cls[va]), val_labels=(lab[va], no_study))
    assert history[-1] < 0.5 * history[0]
    assert model.l2 in L2_GRID
    probs, _ = predict(model, features=(feats[te], cls[te]))
    held_out = evaluate_classifier((probs, torch.zeros(40, 1)), (lab[te], no_study), CT, n_boot=0)
    assert held_out["mean_auc"] > 0.9 and held_out["n_evaluable"] == 1
    # without a validation split the first penalty is used
    linear_probe(model, (feats[tr], cls[tr]), lab[tr], epochs=5, l2=(0.5, 1e-3))
    assert model.l2 == 0.5


def test_fine_tune_trains_encoder_and_heads_on_images():
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(24, 1, 16, 16, 16, generator=gen) * 0.2
    positive = torch.arange(24) % 2 == 0
    images[positive, :, 4:12, 4:12, 4:12] += 0.7  # a bright cube means "present"
    lab = labels_from(positive)
    model = AnatomyClassifier(tiny_encoder(), CT)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    history = fine_tune(model, images, lab, steps=40, batch_size=8, lr=3e-3, seed=0)
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5
    assert any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    probs, _ = predict(model, images)
    auc = evaluate_classifier((probs, torch.zeros(24, 1)), (lab, torch.full((24, 1), float(UNKNOWN))), CT, n_boot=0)["mean_auc"]
    assert auc > 0.9


def test_encoder_queries_map_by_name_onto_another_catalog(tiny_checkpoint):
    other = load_catalog("ct_totalseg")
    pre = load_encoder(tiny_checkpoint, other)
    saved = tiny_checkpoint["model"]["backbone.anatomy_queries"][0]
    for i, name in enumerate(other.names):
        if name in CT.names:
            assert torch.equal(pre.anatomy_queries[0, i], saved[CT.index(name)]), name
        else:
            assert not any(torch.equal(pre.anatomy_queries[0, i], row) for row in saved), name
    assert torch.equal(pre.blocks[0].attn.qkv.weight, tiny_checkpoint["model"]["backbone.blocks.0.attn.qkv.weight"])
    scratch = load_encoder(tiny_checkpoint, other, pretrained=False)
    assert not torch.equal(scratch.blocks[0].attn.qkv.weight, pre.blocks[0].attn.qkv.weight)
    # the classifier on it predicts the other catalog's findings
    logits, study = AnatomyClassifier(pre, other)(torch.rand(2, 1, 16, 16, 16))
    assert logits.shape == (2, other.num_anatomies, other.max_findings) and study.shape[0] == 2


def test_image_model_features_and_catalog_check(tiny_checkpoint):
    model = load_image_model(tiny_checkpoint)
    assert all(torch.equal(v, tiny_checkpoint["model"][k]) for k, v in model.state_dict().items())
    clf = AnatomyClassifier(model, CT)
    feats, image_feat = extract_features(clf, torch.rand(3, 1, 16, 16, 16), batch_size=2)
    assert feats.shape == (3, CT.num_anatomies, TINY["embed_dim"]) and image_feat.shape == (3, TINY["embed_dim"])
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, CT.num_anatomies), atol=1e-4)  # region embeddings are unit vectors
    with pytest.raises(ValueError, match="anatomy queries|anatomies"):
        AnatomyClassifier(model, load_catalog("ct_totalseg"))
