"""All-gather helpers for losses computed over the global (all-ranks) batch.

A contrastive loss needs every rank's samples as negatives. Each rank gathers the features of
all ranks and computes the *same* global loss; gradient reaches only the rank's own shard (the
other ranks' features arrive as constants), so no gradient communication happens in backward.

Gradient scale (why ``gather_with_grad`` multiplies the local gradient by the world size):
with ``W`` ranks each computing the same global loss ``L``, the gradient of ``L`` reaching rank
``r``'s local features is exactly the single-process gradient of those features. DDP then
*averages* parameter gradients over ranks, which would give ``1/W`` of the single-process
parameter gradient. Scaling the local shard's gradient by ``W`` (the default) makes DDP's average
equal the single-process gradient, while a parameter every rank uses directly in the loss (e.g.
the logit scale) keeps its unscaled gradient, which is already identical on every rank. This is
also what ``torch.distributed.nn.all_gather`` yields (its backward sums the ``W`` identical
gradients), minus the reduce-scatter.

Batches may differ in size between ranks (the last batch without ``drop_last``): sizes are
gathered first and shards padded to the largest, then trimmed. Every rank must call each gather
the same number of times and in the same order (collectives), so callers gather whole batch
tensors unconditionally, never per anatomy behind a data-dependent condition.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_world_size",
    "get_rank",
    "gather_with_grad",
    "gather_tensor",
    "gather_objects",
]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (with more than one rank or not)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the incoming gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def _gather_shards(x: torch.Tensor) -> list[torch.Tensor]:
    """All-gather ``x`` (first dimension may differ between ranks); returns one tensor per rank, no grad."""
    world = get_world_size()
    x = x.detach().contiguous()
    # gloo has no bool all-gather: travel as uint8
    is_bool = x.dtype == torch.bool
    if is_bool:
        x = x.to(torch.uint8)
    local_size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(local_size) for _ in range(world)]
    dist.all_gather(sizes, local_size)
    sizes_int = [int(s.item()) for s in sizes]
    max_size = max(sizes_int)
    if x.shape[0] < max_size:
        pad = x.new_zeros((max_size - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    buffers = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(buffers, x)
    shards = [b[:n] for b, n in zip(buffers, sizes_int)]
    if is_bool:
        shards = [s.bool() for s in shards]
    return shards


def gather_with_grad(x: torch.Tensor, scale_grad_by_world_size: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, with gradient flowing to the local shard.

    Args:
        x: ``(N_r, ...)`` local features of rank ``r`` (``N_r`` may differ between ranks).
        scale_grad_by_world_size: multiply the local shard's gradient by the world size so that DDP's
            gradient averaging reproduces the single-process gradient (see the module docstring).

    Returns:
        ``(sum_r N_r, ...)`` in rank order. The local slice carries ``x``'s values unchanged and is
        the only part with gradient; other ranks' slices are constants. Without an initialised
        process group, ``x`` itself is returned.
    """
    if not is_distributed():
        return x
    world = get_world_size()
    if world == 1:
        return x
    shards = _gather_shards(x)
    local = _ScaleGrad.apply(x, float(world)) if scale_grad_by_world_size else x
    shards[get_rank()] = local
    return torch.cat(shards, dim=0)


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a non-differentiable tensor (ids, labels, masks; any dtype incl. bool) from all ranks along dim 0.

    Args:
        x: ``(N_r, ...)``; the first dimension may differ between ranks.

    Returns:
        ``(sum_r N_r, ...)`` in rank order, detached; ``x`` itself when not distributed.
    """
    if not is_distributed() or get_world_size() == 1:
        return x
    return torch.cat(_gather_shards(x), dim=0)


def gather_objects(items: list) -> list:
    """Concatenate picklable per-sample lists (e.g. strings) from all ranks, in rank order.

    Slower than :func:`gather_tensor` (pickling); prefer integer ids for per-step use.
    """
    if not is_distributed() or get_world_size() == 1:
        return list(items)
    out: list[list] = [None] * get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, list(items))
    return [item for part in out for item in part]
