"""Gathered contrastive losses on 2 gloo processes equal the single-process losses on the whole batch.

Gradient convention (see ``losses/distributed.py``): each rank's gradient w.r.t. its local
embeddings is ``world_size x`` the matching slice of the single-process gradient, parameters used
directly by every rank (the logit scale) get the single-process gradient, so DDP's averaging
gives exactly the single-process parameter gradients.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from anatomy_vlp_bundle.losses import anatomy_infonce, disease_contrastive, gather_objects, gather_tensor

WORLD = 2
B, M, K, D, D_IN = 6, 3, 2, 8, 5
SPLITS = {"equal": [0, 3, 6], "unequal": [0, 4, 6]}


def make_batch():
    """The global batch (same on every process: fixed seed)."""
    gen = torch.Generator().manual_seed(1234)
    batch = {
        "region": torch.randn(B, M, D, generator=gen),
        "sentence": torch.randn(B, M, D, generator=gen),
        "view2": torch.randn(B, M, D, generator=gen),
        "hard": torch.randn(B, M, K, D, generator=gen),
        "hard_valid": torch.rand(B, M, K, generator=gen) > 0.3,
        "valid": torch.rand(B, M, generator=gen) > 0.2,
        "normal": torch.rand(B, M, generator=gen) > 0.5,
        "inputs": torch.randn(B, M, D_IN, generator=gen),
    }
    texts = ["normal.", "lesion a.", "lesion b.", "cyst."]
    batch["keys"] = [[texts[int(torch.randint(0, 4, (1,), generator=gen))] for _ in range(M)] for _ in range(B)]
    return batch


def make_model():
    torch.manual_seed(99)
    return nn.Linear(D_IN, D)


def compute(batch, rows, ddp_world=None):
    """Losses and gradients for the batch rows ``rows`` (the whole batch on one process)."""
    lo, hi = rows
    leaves = {k: batch[k][lo:hi].clone().requires_grad_() for k in ("region", "sentence", "view2", "hard")}
    log_scale = torch.tensor(2.3, requires_grad=True)
    scale = log_scale.exp()
    keys = batch["keys"][lo:hi]
    fine = anatomy_infonce(
        leaves["region"],
        leaves["sentence"],
        batch["valid"][lo:hi],
        batch["normal"][lo:hi],
        keys,
        scale,
        hard_negatives=leaves["hard"],
        hard_negative_valid=batch["hard_valid"][lo:hi],
    )
    disease = disease_contrastive(leaves["region"], leaves["view2"], batch["valid"][lo:hi], batch["normal"][lo:hi], scale)
    (fine.loss + disease.loss).backward()
    out = {
        "fine_loss": fine.loss.detach(),
        "fine_floor": fine.floor,
        "disease_loss": disease.loss.detach(),
        "disease_floor": disease.floor,
        "log_scale_grad": log_scale.grad,
    }
    out.update({f"grad_{k}": v.grad for k, v in leaves.items()})

    # a model trained through the gathered loss: DDP's averaged gradients vs single process
    model = make_model()
    if ddp_world is not None:
        model = nn.parallel.DistributedDataParallel(model)
    emb = model(batch["inputs"][lo:hi])
    loss = anatomy_infonce(
        emb, batch["sentence"][lo:hi], batch["valid"][lo:hi], batch["normal"][lo:hi], keys, 10.0
    ).loss + disease_contrastive(emb, batch["view2"][lo:hi], batch["valid"][lo:hi], batch["normal"][lo:hi], 10.0).loss
    loss.backward()
    module = model.module if ddp_world is not None else model
    out["model_grads"] = [p.grad.clone() for p in module.parameters()]
    return out


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        batch = make_batch()
        results = {}
        for name, bounds in SPLITS.items():
            results[name] = compute(batch, (bounds[rank], bounds[rank + 1]), ddp_world=WORLD)
        # non-differentiable helpers with unequal sizes and bool / string payloads
        mine = torch.arange(3 + rank)
        results["gathered_ids"] = gather_tensor(mine)
        results["gathered_bool"] = gather_tensor(torch.tensor([True, False] * (rank + 1)))
        results["gathered_objects"] = gather_objects([f"r{rank}-{i}" for i in range(rank + 1)])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    torch.set_num_threads(1)
    return compute(make_batch(), (0, B))


@pytest.mark.parametrize("split", list(SPLITS))
def test_gathered_loss_equals_single_process(distributed_results, single_process, split):
    for rank in range(WORLD):
        got = distributed_results[rank][split]
        for key in ("fine_loss", "fine_floor", "disease_loss", "disease_floor"):
            torch.testing.assert_close(got[key], single_process[key], atol=1e-5, rtol=1e-5, msg=f"{split} rank {rank} {key}")


@pytest.mark.parametrize("split", list(SPLITS))
def test_local_gradients_are_world_size_times_single_process_slice(distributed_results, single_process, split):
    bounds = SPLITS[split]
    for rank in range(WORLD):
        got = distributed_results[rank][split]
        lo, hi = bounds[rank], bounds[rank + 1]
        for key in ("grad_region", "grad_sentence", "grad_view2", "grad_hard"):
            torch.testing.assert_close(
                got[key], WORLD * single_process[key][lo:hi], atol=1e-5, rtol=1e-4, msg=f"{split} rank {rank} {key}"
            )
        # every rank computes the whole loss with the scale: its gradient is already the full one
        torch.testing.assert_close(got["log_scale_grad"], single_process["log_scale_grad"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", list(SPLITS))
def test_ddp_averaged_parameter_gradients_equal_single_process(distributed_results, single_process, split):
    for rank in range(WORLD):
        for got, expected in zip(distributed_results[rank][split]["model_grads"], single_process["model_grads"]):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_gather_helpers_unequal_sizes(distributed_results):
    for rank in range(WORLD):
        got = distributed_results[rank]
        torch.testing.assert_close(got["gathered_ids"], torch.tensor([0, 1, 2, 0, 1, 2, 3]))
        assert got["gathered_bool"].dtype == torch.bool
        assert got["gathered_bool"].tolist() == [True, False, True, False, True, False]
        assert got["gathered_objects"] == ["r0-0", "r1-0", "r1-1"]
