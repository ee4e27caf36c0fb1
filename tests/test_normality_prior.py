"""Tests of the anatomy normality prior (per-patch VQ prior fitted on normal anatomies)."""

import copy
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anatomy_vlp_bundle.networks.normality_prior import (
    NormalityPrior,
    calibrated_abnormality,
    fit_score_calibration,
    partitioned_nearest_code,
)

OUTPUT_KEYS = (
    "patch_error",
    "anatomy_score",
    "abnormality",
    "residual_stats",
    "loss_commitment",
    "loss_reconstruction",
    "perplexity",
    "patch_index",
    "code_index",
    "recon",
    "residual",
    "error",
)


def _small_prior(c=8, m=3, k=8, **kw):
    return NormalityPrior(c, m, codes_per_anatomy=k, code_dim=8, hidden_dim=16, **kw)


def _codebook_state(prior):
    q = prior.quantizer
    tensors = (q.ema_w, q.ema_cluster_size, q.embedding.weight, prior.feature_mean, prior.feature_var)
    return [t.detach().clone() for t in tensors]


def _random_batch(b, m, n, c, seed=0, p_in=0.4):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, c, n, generator=g) * 3.0 + 1.0
    mask = torch.rand(b, m, n, generator=g) < p_in
    return feats, mask


def _auc(neg, pos):
    """Mann-Whitney AUC of positives ranking above negatives (ties count half)."""
    neg, pos = torch.as_tensor(neg).float(), torch.as_tensor(pos).float()
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


@pytest.mark.parametrize("b,m,n,c", [(1, 1, 1, 4), (2, 3, 20, 8), (3, 5, 3, 6), (2, 4, 50, 16)])
@pytest.mark.parametrize("training", [True, False])
def test_shapes_and_empty_regions(b, m, n, c, training):
    torch.manual_seed(0)
    prior = NormalityPrior(c, m, codes_per_anatomy=4, code_dim=8, hidden_dim=16, top_k=4).train(training)
    feats, mask = _random_batch(b, m, n, c, p_in=0.5)
    mask[0, 0] = False  # an empty region
    if b > 1:
        mask[1] = False  # a sample with no region at all
    normal = torch.rand(b, m) < 0.5
    out = prior(feats, mask, normal)
    assert set(out) == set(OUTPUT_KEYS)
    p = int(mask.sum())
    assert out["patch_error"].shape == (b, m, n)
    assert out["anatomy_score"].shape == (b, m)
    assert out["abnormality"].shape == (b, m)
    assert out["residual_stats"].shape == (b, m, 2 * c)
    assert out["patch_index"].shape == (p, 3)
    assert out["recon"].shape == out["residual"].shape == (p, c)
    assert out["code_index"].shape == out["error"].shape == (p,)
    for key in OUTPUT_KEYS:
        if key != "abnormality":  # NaN by design until calibrated
            assert torch.isfinite(out[key].float()).all(), key
    assert torch.isnan(out["abnormality"]).all()
    empty = ~mask.any(-1)
    assert (out["anatomy_score"][empty] == 0).all()
    assert (out["residual_stats"][empty] == 0).all()
    assert (out["patch_error"][~mask] == 0).all()
    assert (out["patch_error"][mask] > 0).all()
    worst = out["patch_error"].masked_fill(~mask, -1).amax(-1).clamp(min=0)
    torch.testing.assert_close(out["anatomy_score"], worst)
    # the worst-patch half of residual_stats is the residual of the arg-max patch
    for bi, mi in (~empty).nonzero().tolist():
        ni = int(out["patch_error"][bi, mi].masked_fill(~mask[bi, mi], -1).argmax())
        row = ((out["patch_index"] == torch.tensor([bi, mi, ni])).all(1)).nonzero().item()
        torch.testing.assert_close(out["residual_stats"][bi, mi, c:], out["residual"][row])
    for key in ("anatomy_score", "residual_stats", "patch_error", "recon"):
        assert not out[key].requires_grad


def test_codebook_moves_only_from_normal_anatomies():
    torch.manual_seed(0)
    prior = _small_prior().train()
    feats, mask = _random_batch(2, 3, 30, 8)
    mask[:, :, :3] = True
    before = _codebook_state(prior)
    for normal in (torch.zeros(2, 3, dtype=torch.bool), None):
        prior(feats, mask, normal)
        for a, b in zip(before, _codebook_state(prior)):
            assert torch.equal(a, b)
    assert not prior.quantizer.partition_initialised.any()

    # only anatomy 0 is normal: its partition moves, the others do not
    normal = torch.zeros(2, 3, dtype=torch.bool)
    normal[:, 0] = True
    prior(feats, mask, normal)
    prior(feats * 1.1, mask, normal)
    after = _codebook_state(prior)
    k = prior.codes_per_anatomy
    for a, b in zip(before[:3], after[:3]):
        assert not torch.equal(a[:k], b[:k])
        assert torch.equal(a[k:], b[k:])
    assert not torch.equal(before[3], after[3])  # feature statistics come from normal patches
    assert prior.quantizer.partition_initialised.tolist() == [True, False, False]

    # abnormal-only batch after training: nothing moves
    before = _codebook_state(prior)
    prior(feats * 3.0, mask, torch.zeros(2, 3, dtype=torch.bool))
    for a, b in zip(before, _codebook_state(prior)):
        assert torch.equal(a, b)


def test_fresh_codebook_survives_zero_normal_tokens():
    torch.manual_seed(0)
    prior = _small_prior().train()
    feats, mask = _random_batch(2, 3, 10, 8)
    prior(feats, torch.zeros_like(mask), torch.ones(2, 3, dtype=torch.bool))  # no patch at all
    prior(feats, mask, torch.zeros(2, 3, dtype=torch.bool))  # patches but none normal
    # a forced zero-weight EMA call (what every DDP rank does) moves nothing and stays finite
    q = prior.quantizer
    before = _codebook_state(prior)
    q.update_from_statistics(torch.zeros(0, dtype=torch.long), torch.zeros(0, 8), force_call=True)
    for a, b in zip(before, _codebook_state(prior)):
        assert torch.equal(a, b)
    for t in _codebook_state(prior):
        assert torch.isfinite(t).all()
    out = prior(feats, mask, torch.ones(2, 3, dtype=torch.bool))
    assert all(torch.isfinite(t).all() for t in _codebook_state(prior))
    assert torch.isfinite(out["loss_reconstruction"])


def test_partition_restricts_codes():
    torch.manual_seed(0)
    prior = _small_prior(m=4, k=5).train()
    opt = torch.optim.Adam([p for p in prior.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        feats, mask = _random_batch(3, 4, 25, 8, seed=step)
        out = prior(feats, mask, torch.rand(3, 4) < 0.7)
        (out["loss_commitment"] + out["loss_reconstruction"]).backward()
        opt.step()
        opt.zero_grad()
        assert torch.equal(out["code_index"] // 5, out["patch_index"][:, 1])
    prior.eval()
    feats, mask = _random_batch(3, 4, 25, 8, seed=99)
    out = prior(feats, mask)
    assert torch.equal(out["code_index"] // 5, out["patch_index"][:, 1])

    # the lookup equals a brute-force search of the anatomy's own codes ...
    z = torch.randn(200, 8)
    ids = torch.randint(0, 4, (200,))
    codes = prior.nearest_code_lookup(z, ids)
    book = prior.codebook.view(4, 5, 8)
    expected = torch.cdist(z.unsqueeze(1), book[ids]).squeeze(1).argmin(1) + ids * 5
    assert torch.equal(codes, expected)
    assert torch.equal(partitioned_nearest_code(z, ids, prior.codebook, 5), expected)
    # ... and differs from an unrestricted search, which would pick other anatomies' codes
    unrestricted = torch.cdist(z, prior.codebook).argmin(1)
    assert (unrestricted // 5 != ids).any()


def test_gradient_only_from_normal_anatomies():
    torch.manual_seed(0)
    base = _small_prior(m=2).train()
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 8, 40, generator=g)
    mask = torch.zeros(2, 2, 40, dtype=torch.bool)
    mask[:, 0, :20] = True  # non-overlapping regions: anatomy 1's patches feed only anatomy 1
    mask[:, 1, 20:] = True
    normal = torch.tensor([[True, False], [True, False]])

    def grads(features):
        prior = copy.deepcopy(base)
        features = features.clone().requires_grad_(True)
        out = prior(features, mask, normal)
        (out["loss_commitment"] + out["loss_reconstruction"]).backward()
        assert features.grad is None  # the prior never trains the backbone
        return {n: p.grad.clone() for n, p in prior.named_parameters() if p.requires_grad}

    reference = grads(feats)
    changed = feats.clone()
    changed[:, :, 20:] = torch.randn(2, 8, 20, generator=g) * 10.0 + 5.0  # anatomy 1's patches only
    for name, grad in grads(changed).items():
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-6, msg=name)
    # the gradient does come from anatomy 0, and anatomy 1's condition embedding gets none
    assert reference["encoder.fc1.weight"].abs().sum() > 0
    assert reference["decoder.fc3.weight"].abs().sum() > 0
    for part in ("encoder", "decoder"):
        assert reference[f"{part}.condition.weight"][0].abs().sum() > 0
        assert (reference[f"{part}.condition.weight"][1] == 0).all()

    # no normal anatomy: zero losses that still backpropagate (zero gradients, no error)
    prior = copy.deepcopy(base)
    out = prior(feats, mask, torch.zeros(2, 2, dtype=torch.bool))
    loss = out["loss_commitment"] + out["loss_reconstruction"]
    assert loss.requires_grad and float(loss.detach()) == 0.0
    loss.backward()
    assert all((p.grad == 0).all() for p in prior.parameters() if p.requires_grad)


def _cluster_batch(centers, b, n_region, gen, noise=0.3):
    """Each anatomy's region holds ``n_region`` patches drawn from that anatomy's clusters."""
    m, n_clusters, c = centers.shape
    n = m * n_region
    feats = torch.zeros(b, c, n)
    mask = torch.zeros(b, m, n, dtype=torch.bool)
    for a in range(m):
        sl = slice(a * n_region, (a + 1) * n_region)
        mask[:, a, sl] = True
        which = torch.randint(0, n_clusters, (b, n_region), generator=gen)
        patches = centers[a][which] + noise * torch.randn(b, n_region, c, generator=gen)
        feats[:, :, sl] = patches.permute(0, 2, 1)
    return feats, mask


def test_detects_out_of_distribution_patches():
    """Fit on normal synthetic patches, then one odd patch per abnormal anatomy must stand out."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    m, c, n_region = 3, 16, 16
    centers = torch.randn(m, 3, c, generator=gen) * 2.0
    prior = NormalityPrior(c, m, codes_per_anatomy=16, code_dim=16, hidden_dim=64).train()
    opt = torch.optim.Adam([p for p in prior.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(250):
        feats, mask = _cluster_batch(centers, 8, n_region, gen)
        out = prior(feats, mask, torch.ones(8, m, dtype=torch.bool))
        opt.zero_grad()
        (out["loss_commitment"] + out["loss_reconstruction"]).backward()
        opt.step()
    assert float(out["perplexity"]) > 2.0  # the 3 clusters of each anatomy use different codes

    prior.eval()
    feats, mask = _cluster_batch(centers, 100, n_region, gen)
    target = torch.arange(100) % m  # instance i = anatomy (i % m) of sample i
    for i in range(50, 100):
        a = int(target[i])
        pos = a * n_region + i % n_region
        if i < 75:  # a patch of another anatomy's normal tissue: only the conditioned prior sees it
            feats[i, :, pos] = centers[(a + 1) % m, 0] + 0.3 * torch.randn(c, generator=gen)
        else:  # a patch off every normal cluster
            feats[i, :, pos] += 1.0 * torch.randn(c, generator=gen)
    with torch.no_grad():
        score = prior(feats, mask)["anatomy_score"][torch.arange(100), target]
    assert _auc(score[:50], score[50:75]) >= 0.95
    assert _auc(score[:50], score[75:]) >= 0.95
    assert _auc(score[:50], score[50:]) >= 0.95


def test_calibrated_abnormality():
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.rand(201, generator=g), 10.0 * torch.rand(201, generator=g), torch.zeros(50)])
    ids = torch.cat([torch.zeros(201), torch.ones(201), torch.full((50,), 2)]).long()
    quantiles = fit_score_calibration(scores, ids, num_anatomies=4, num_quantiles=101)
    assert quantiles.shape == (4, 101)
    assert (quantiles[:, 1:] >= quantiles[:, :-1]).all()
    torch.testing.assert_close(quantiles[3], torch.quantile(scores, torch.linspace(0, 1, 101)))  # pooled

    grid = torch.linspace(-1.0, 12.0, 500).unsqueeze(1).expand(500, 4)
    level = calibrated_abnormality(grid, quantiles)
    assert level.shape == (500, 4)
    assert ((level >= 0) & (level <= 1)).all()
    assert (level[1:] >= level[:-1]).all()  # monotone in the score
    assert (level[0] == 0).all() and (level[-1] == 1).all()

    medians = torch.stack([scores[ids == a].median() for a in range(3)] + [scores.median()])
    at_median = calibrated_abnormality(medians.unsqueeze(0), quantiles)[0]
    torch.testing.assert_close(at_median, torch.full((4,), 0.5), atol=0.02, rtol=0)
    # same score, different anatomy: a percentile among that anatomy's own normals
    both = calibrated_abnormality(torch.tensor([[0.9, 0.9, 0.0, 0.9]]), quantiles)[0]
    assert both[0] > 0.85 and both[1] < 0.15
    assert 0.0 < both[2] < 1.0  # an all-tied anatomy: mid-level, not 0 or 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 warns that torch.jit.script is deprecated
        scripted_calibration = torch.jit.script(calibrated_abnormality)
        scripted_fit = torch.jit.script(fit_score_calibration)
    torch.testing.assert_close(scripted_calibration(grid, quantiles), level)
    torch.testing.assert_close(scripted_fit(scores, ids, 4, 101), quantiles)

    prior = NormalityPrior(4, 4, codes_per_anatomy=4, code_dim=4, hidden_dim=8).eval()
    prior.set_score_calibration(quantiles)
    out = prior(torch.randn(2, 4, 10), torch.rand(2, 4, 10) < 0.5)
    torch.testing.assert_close(out["abnormality"], calibrated_abnormality(out["anatomy_score"], quantiles))

    with pytest.raises(ValueError, match="no scores"):
        fit_score_calibration(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="anatomy_ids must lie"):
        fit_score_calibration(torch.ones(3), torch.tensor([0, 1, 5]), 2)


def test_scripted_inference_equals_eager(tmp_path):
    torch.manual_seed(0)
    prior = _small_prior(m=3, k=6).train()
    opt = torch.optim.Adam([p for p in prior.parameters() if p.requires_grad], lr=1e-2)
    for step in range(10):
        feats, mask = _random_batch(2, 3, 30, 8, seed=step)
        out = prior(feats, mask, torch.ones(2, 3, dtype=torch.bool))
        (out["loss_commitment"] + out["loss_reconstruction"]).backward()
        opt.step()
        opt.zero_grad()
    prior.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 warns that torch.jit.script is deprecated
        scripted = torch.jit.script(prior)
        torch.jit.save(scripted, str(tmp_path / "prior.ts"))
        loaded = torch.jit.load(str(tmp_path / "prior.ts"))

    feats, mask = _random_batch(3, 3, 30, 8, seed=42)
    mask[1, 2] = False
    normal = torch.rand(3, 3) < 0.5
    eager = prior(feats, mask, normal)
    for module in (scripted, loaded):
        result = module(feats, mask, normal)
        assert set(result) == set(eager)
        for key, value in eager.items():
            torch.testing.assert_close(result[key], value, atol=1e-5, rtol=0, equal_nan=True, msg=key)
    z, ids = torch.randn(50, 8), torch.randint(0, 3, (50,))
    assert torch.equal(loaded.nearest_code_lookup(z, ids), prior.nearest_code_lookup(z, ids))


def test_state_dict_roundtrip_weights_only(tmp_path):
    torch.manual_seed(0)
    prior = _small_prior().train()
    feats, mask = _random_batch(2, 3, 30, 8)
    prior(feats, mask, torch.ones(2, 3, dtype=torch.bool))
    torch.save({"model": prior.state_dict()}, tmp_path / "ckpt.pt")
    fresh = _small_prior()
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"], strict=True)
    a, b = prior.eval()(feats, mask), fresh.eval()(feats, mask)
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True)


def test_bad_inputs_raise_clear_errors():
    prior = _small_prior(c=8, m=3)
    feats, mask = _random_batch(2, 3, 10, 8)
    with pytest.raises(ValueError, match="patch_features must have shape"):
        prior(feats[:, :4], mask)
    with pytest.raises(ValueError, match="region_token_mask must have shape"):
        prior(feats, mask[:, :, :5])
    with pytest.raises(ValueError, match="built for 3"):
        prior(feats, mask[:, :2])
    with pytest.raises(TypeError, match="region_token_mask must be a bool"):
        prior(feats, mask.float())
    with pytest.raises(TypeError, match="normal must be a bool"):
        prior(feats, mask, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="normal must have shape"):
        prior(feats, mask, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="codes_per_anatomy must be a positive"):
        NormalityPrior(8, 3, codes_per_anatomy=0)


def _ddp_worker(rank, world_size, init_file, out_dir):
    """Rank 0 has normal patches; rank 1 has no patch at all. Both must finish the same steps."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        prior = _small_prior(ddp_sync=True).train()
        calls = []
        original = prior.quantizer.forward
        prior.quantizer.forward = lambda inputs: (calls.append(1), original(inputs))[1]
        feats, mask = _random_batch(2, 3, 20, 8, seed=rank)
        normal = torch.ones(2, 3, dtype=torch.bool)
        if rank == 1:
            mask = torch.zeros_like(mask)
        steps = [normal, torch.zeros_like(normal), normal]  # a step with no normal patch anywhere
        for step_normal in steps:
            out = prior(feats, mask, step_normal)
            (out["loss_commitment"] + out["loss_reconstruction"]).backward()
        assert len(calls) == len(steps), calls  # exactly one EMA update per step on every rank
        torch.save({k: v for k, v in prior.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_sync_ranks_without_normal_patches_do_not_hang(tmp_path):
    # fork: the ranks inherit the imported modules instead of importing MONAI twice more
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    synced = ("ema_w", "ema_cluster_size", "embedding.weight")
    synced = tuple(f"quantizer.{name}" for name in synced) + ("feature_mean", "feature_var")
    for key in synced:
        torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=key)  # synchronised codebooks
        assert torch.isfinite(s0[key]).all()
    assert s0["quantizer.partition_initialised"].all()
    fresh = _small_prior()
    assert not torch.equal(s0["quantizer.ema_w"], fresh.quantizer.ema_w)  # rank 0's patches moved it
