"""DDP check of the bundle's criterion, launched by torchrun (2 ranks, gloo on CPU):

    OMP_NUM_THREADS=1 torchrun --standalone --nnodes=1 --nproc_per_node=2 tests/ddp_check.py OUT.json

(``tests/test_ddp_torchrun.py`` runs it and asserts on OUT.json; the output path may also be given
as ``DDP_CHECK_OUT``.)

Every rank builds the same tiny seeded ``AnatomyVLPModel`` (catalog ``synthetic_cxr``, 2D 32 x 32)
and the same seeded global batch (images, masks, boxes, labels, sentence embeddings and keys, hard
negatives). The model runs ONCE on the global batch, in training mode (the second view of the
disease term is then a real random token subset; dropout is 0 and the RNG seeded, so every rank
gets identical embeddings); its per-sample outputs become detached leaves, and each rank takes the
rows of its shard. What is tested is therefore the loss, not the forward: the bundle's criterion
(``losses.criterion.build_criterion``, the same function train.yaml uses, here with ``disease``
switched on as well) on the rank's shard.

``losses/distributed.py`` decides whether to gather with ``dist.is_initialized()`` (world size 1 or
no process group: no gather), and the criterion's built-in terms always call the losses with their
default ``gather=True``. So the single-process reference (criterion on the whole global batch) and
the "local only" loss (criterion on the rank's shard, nothing gathered) are computed BEFORE the
process group is initialised; then the group is initialised and the same criterion runs on the
shard, gathering the other rank's samples as negatives.

Convention (``losses/distributed.py``): the gathered contrastive terms are the *global* loss on every
rank (each rank's value equals the single-process value; so does their mean), and the gradient
reaching a rank's local embeddings is ``world_size x`` the matching rows of the single-process
gradient (DDP's averaging then gives the single-process parameter gradient), while the logit scale,
used directly by every rank, gets the single-process gradient itself. Both are measured here.
The non-gathered terms (detection, global, prompt_pair) are per-rank means, which DDP averages;
they are recorded for information only (a masked mean over a shard is not a slice of the global
masked mean when the shards hold different numbers of known labels).

Extra: the model's forward on a shard alone (eval mode) vs the rows of the global forward, i.e. the
model has no cross-sample coupling that sharding would change.

Rank 0 writes a JSON with all the numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT, UNCERTAIN, UNKNOWN
from anatomy_vlp_bundle.losses import build_criterion, make_targets
from anatomy_vlp_bundle.losses import distributed as ldist
from anatomy_vlp_bundle.networks import AnatomyVLPModel

B = 8  # global batch
SPLITS = {"equal": [0, 4, 8], "unequal": [0, 5, 8]}  # rows of rank 0 / rank 1 (unequal: gathers pad + trim)
SIZE = 32
PATCH = 8
EMBED = 16
HARD = 2
GATHERED = ("fine_grained", "disease")
# per-sample model outputs (first dim = batch) that the criterion reads; the rest are shared
PER_SAMPLE = ("cls_emb", "region_emb", "region_emb_view2", "boxes", "presence_logits", "mask_logits")
SHARED_LEAVES = ("logit_scale", "disease_logit_scale", "logit_bias")
GRAD_KEYS = ("region_emb", "region_emb_view2", "logit_scale", "disease_logit_scale")


def build_model() -> AnatomyVLPModel:
    torch.manual_seed(0)
    model = AnatomyVLPModel(
        catalog="synthetic_cxr",
        img_size=(SIZE, SIZE),
        patch_size=PATCH,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        embed_dim=EMBED,
        stem_channels=(4, 8),
        prior={"codes_per_anatomy": 4, "code_dim": 4, "hidden_dim": 8, "top_k": 2},
        proj_hidden_dim=16,
        region_stats=8,
        dropout=0.0,
        head_dropout=0.0,
    )
    # random prompt embeddings (no text encoder needed): the global / prompt-pair terms are non-trivial
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("prompt_pos", "prompt_neg", "study_pos", "study_neg", "global_emb"):
            buf = getattr(model, name)
            buf.copy_(torch.nn.functional.normalize(torch.randn(buf.shape, generator=gen), dim=-1))
        model.prompts_set.fill_(True)
    return model


def make_batch(model: AnatomyVLPModel) -> dict:
    """The global batch, identical on every rank (own generator, fixed seed)."""
    gen = torch.Generator().manual_seed(1234)
    m, f = model.num_anatomies, model.num_findings
    image = torch.rand(B, 1, SIZE, SIZE, generator=gen)
    presence = torch.where(torch.rand(B, m, generator=gen) < 0.9, float(PRESENT), float(ABSENT))
    masks = torch.zeros(B, m, SIZE, SIZE)
    boxes = torch.zeros(B, m, 4)
    for b in range(B):
        for a in range(m):
            if presence[b, a] != PRESENT:
                continue
            lo = torch.randint(0, SIZE // 2, (2,), generator=gen)
            size = torch.randint(4, SIZE // 2, (2,), generator=gen)
            hi = torch.minimum(lo + size, torch.tensor(SIZE))
            masks[b, a, lo[0] : hi[0], lo[1] : hi[1]] = 1.0
            boxes[b, a] = torch.cat([lo, hi]).float()
    codes = torch.tensor([PRESENT, ABSENT, ABSENT, ABSENT, UNCERTAIN, UNKNOWN])
    findings = codes[torch.randint(0, len(codes), (B, m, f), generator=gen)]
    findings = torch.where(model.prompt_valid[None], findings, torch.full_like(findings, UNKNOWN))
    # sentences: a few texts per anatomy, identical texts share their embedding (and key)
    texts = ["normal.", "small lesion.", "large lesion.", "opacity."]
    table = torch.randn(m, len(texts), EMBED, generator=gen)
    pick = torch.randint(0, len(texts), (B, m), generator=gen)
    sentence_emb = table[torch.arange(m)[None], pick]
    sentence_keys = [[f"anatomy {a}: {texts[int(pick[b, a])]}" for a in range(m)] for b in range(B)]
    return {
        "image": image,
        "anatomy": masks,
        "anatomy_presence": presence,
        "anatomy_boxes": boxes,
        "findings": findings,
        "study_findings": torch.zeros(B, 0, dtype=torch.long),
        "sentence_emb": sentence_emb,
        "sentence_keys": sentence_keys,
        "hard_negative_emb": torch.randn(B, m, HARD, EMBED, generator=gen),
        "hard_negative_valid": torch.rand(B, m, HARD, generator=gen) > 0.25,
    }


def shard(batch: dict, lo: int, hi: int) -> dict:
    out = {}
    for key, value in batch.items():
        out[key] = value[lo:hi] if isinstance(value, (torch.Tensor, list)) and key != "spatial_shape" else value
    return out


def leaves(outputs: dict, lo: int, hi: int) -> dict:
    """The criterion's view of the model outputs for rows ``lo:hi``: fresh leaves (grads are read off them)."""
    out = dict(outputs)
    for key in PER_SAMPLE:
        out[key] = outputs[key].detach()[lo:hi].clone().requires_grad_(outputs[key].is_floating_point())
    for key in SHARED_LEAVES:
        out[key] = outputs[key].detach().clone().requires_grad_()
    return out


def targets_for(model: AnatomyVLPModel, batch: dict) -> dict:
    return make_targets(
        batch,
        finding_valid=model.prompt_valid,
        global_membership=model.global_membership,
        global_study_index=model.global_study_index,
    )


def run_criterion(criteria: dict, outputs: dict, targets: dict) -> dict:
    """Every term's value (full criterion) and the gradients of the gathered (contrastive) terms."""
    logs = criteria["full"](outputs, targets)
    values = {k: float(v.detach()) for k, v in logs.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    contrastive = criteria["contrastive"](outputs, targets)["loss"]
    grads = torch.autograd.grad(contrastive, [outputs[k] for k in GRAD_KEYS])
    return {"values": values, "contrastive": float(contrastive.detach()), "grads": dict(zip(GRAD_KEYS, grads))}


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DDP_CHECK_OUT")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("launch with torchrun: torchrun --standalone --nnodes=1 --nproc_per_node=2 tests/ddp_check.py OUT.json")
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != 2:
        raise SystemExit(f"ddp_check expects 2 ranks, got {world}")
    start = time.time()

    model = build_model()
    batch = make_batch(model)
    full_targets = targets_for(model, batch)
    weights = {"disease": 1.0}  # train.yaml's stages switch it on; DEFAULT_WEIGHTS has it off
    terms_off = {"detection": False, "normality": False, "global": False, "prompt_pair": False}
    criteria = {
        "full": build_criterion(weights=weights),
        "contrastive": build_criterion(weights=weights, enabled=terms_off),
    }
    assert set(criteria["contrastive"].active_terms()) == set(GATHERED)

    # one forward of the global batch (training mode: random second view, seeded -> same on every rank)
    model.train()
    torch.manual_seed(7)
    outputs = model(batch["image"], batch["anatomy"], None, regions="auto")
    # the model's forward on a shard alone equals its rows of the global forward (eval: no randomness)
    model.eval()
    with torch.no_grad():
        lo, hi = SPLITS["equal"][rank], SPLITS["equal"][rank + 1]
        whole = model(batch["image"], batch["anatomy"], None, regions="auto")
        part = model(batch["image"][lo:hi], batch["anatomy"][lo:hi], None, regions="auto")
        forward_diff = max(float((whole[k][lo:hi] - part[k]).abs().max()) for k in ("region_emb", "cls_emb", "boxes"))

    # ---- no process group yet: ldist gathers nothing (the single-process / local-only semantics)
    assert not ldist.is_distributed() and ldist.get_world_size() == 1
    reference = run_criterion(criteria, leaves(outputs, 0, B), full_targets)
    local_only = {}
    for name, bounds in SPLITS.items():
        lo, hi = bounds[rank], bounds[rank + 1]
        local_only[name] = run_criterion(criteria, leaves(outputs, lo, hi), targets_for(model, shard(batch, lo, hi)))

    # ---- the process group: the same criterion on the shard gathers the other rank's samples
    dist.init_process_group("gloo")
    try:
        assert ldist.is_distributed() and ldist.get_world_size() == 2 and ldist.get_rank() == rank
        mine = {"rank": rank, "forward_shard_max_abs_diff": forward_diff, "splits": {}}
        for name, bounds in SPLITS.items():
            lo, hi = bounds[rank], bounds[rank + 1]
            got = run_criterion(criteria, leaves(outputs, lo, hi), targets_for(model, shard(batch, lo, hi)))
            grad_err = {}
            for key in GRAD_KEYS:
                if key in ("region_emb", "region_emb_view2"):  # local rows: world_size x single-process rows
                    expected = world * reference["grads"][key][lo:hi]
                else:  # used directly by every rank: the single-process gradient itself
                    expected = reference["grads"][key]
                grad_err[key] = float((got["grads"][key] - expected).abs().max())
                grad_err[key + "_ref_max"] = float(expected.abs().max())
            mine["splits"][name] = {
                "rows": [lo, hi],
                "distributed": got["values"],
                "distributed_contrastive": got["contrastive"],
                "local_only": local_only[name]["values"],
                "local_only_contrastive": local_only[name]["contrastive"],
                "grad_max_abs_err": grad_err,
            }
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)  # all-gather every rank's loss terms
    finally:
        dist.destroy_process_group()

    if rank != 0:
        return
    result = {
        "world_size": world,
        "backend": "gloo",
        "global_batch": B,
        "catalog": model.catalog.name,
        "gathered_terms": list(GATHERED),
        "reference": reference["values"],
        "reference_contrastive": reference["contrastive"],
        "forward_shard_max_abs_diff": max(r["forward_shard_max_abs_diff"] for r in everyone),
        "splits": {},
        "seconds_rank0": round(time.time() - start, 2),
    }
    for name in SPLITS:
        per_rank = [r["splits"][name] for r in everyone]
        summary = {"ranks": per_rank, "gathered": {}, "per_rank_terms": {}}
        for term in list(GATHERED) + ["contrastive"]:
            if term == "contrastive":
                ref = reference["contrastive"]
                dist_vals = [r["distributed_contrastive"] for r in per_rank]
                local_vals = [r["local_only_contrastive"] for r in per_rank]
            else:
                ref = reference["values"][term]
                dist_vals = [r["distributed"][term] for r in per_rank]
                local_vals = [r["local_only"][term] for r in per_rank]
            summary["gathered"][term] = {
                "single_process": ref,
                "per_rank": dist_vals,
                "rank_mean": sum(dist_vals) / world,
                "max_abs_diff_vs_single_process": max(abs(v - ref) for v in dist_vals),
                "local_only": local_vals,
                "min_abs_diff_local_only_vs_single_process": min(abs(v - ref) for v in local_vals),
            }
        for term in ("detection", "global", "prompt_pair"):  # not gathered: per-rank means, DDP averages them
            vals = [r["distributed"][term] for r in per_rank]
            summary["per_rank_terms"][term] = {
                "single_process": reference["values"][term],
                "per_rank": vals,
                "rank_mean": sum(vals) / world,
                "equals_local_only": all(
                    abs(r["distributed"][term] - r["local_only"][term]) < 1e-6 for r in per_rank
                ),
            }
        summary["grad_max_abs_err"] = {
            key: max(r["grad_max_abs_err"][key] for r in per_rank) for key in per_rank[0]["grad_max_abs_err"]
        }
        result["splits"][name] = summary
    text = json.dumps(result, indent=2)
    if out_path:
        with open(out_path, "w") as fh:
            fh.write(text)
    for name, summary in result["splits"].items():
        for term, row in summary["gathered"].items():
            print(
                f"[{name}] {term}: single {row['single_process']:.6f} ranks {[round(v, 6) for v in row['per_rank']]} "
                f"(max diff {row['max_abs_diff_vs_single_process']:.2e}); local only {[round(v, 6) for v in row['local_only']]}"
            )
        print(f"[{name}] grad max abs err {summary['grad_max_abs_err']}")
    print(f"forward shard vs global rows max abs diff {result['forward_shard_max_abs_diff']:.2e}; {result['seconds_rank0']} s")


if __name__ == "__main__":
    main()
