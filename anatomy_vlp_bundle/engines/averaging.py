"""Exponential moving average of the network's weights (Polyak averaging) for validation and the
best checkpoint.

``WeightAverage(network, decay)`` keeps a float32 shadow copy of every floating-point parameter and
moves it towards the live weights after each optimizer step:
``shadow <- shadow + (1 - d) * (live - shadow)`` with ``d = min(decay, (1 + n) / (10 + n))`` after
``n`` updates (the warm-up lets the average forget the random initialisation quickly). Buffers
(the running moments of the region statistics, the normality prior's codebook, the prompt bank,
the thresholds) are not averaged: they are running statistics or set by calibration already.

Attached to the trainer and the evaluator (``attach(trainer, evaluator)``, after the evaluator's
checkpoint saver, so the saver sees the averaged weights):

- every ``every``-th trainer iteration (the optimizer's steps with gradient accumulation): update;
- evaluator ``STARTED``: the averaged weights are swapped into the network (the live ones kept
  aside), so validation, the calibration of the thresholds and the best checkpoint (``model.pt``,
  which inference, the MONAI Label app and the deploy export read) all use the average;
- evaluator ``COMPLETED`` (or an exception): the live weights are swapped back and training goes on.

The shadow is part of the training checkpoints (``state_dict`` / ``load_state_dict``: named float
tensors and the update count, ``weights_only``-loadable), so resuming continues the same average.
``decay`` 0 turns it off (no shadow, nothing swapped, an empty state).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .checkpoint import _unwrap

__all__ = ["WeightAverage"]

logger = logging.getLogger(__name__)


class WeightAverage:
    """See the module docstring.

    Args:
        network: the trained module (DDP-wrapped or not).
        decay: the average's decay per update in ``[0, 1)``; 0: off.
        every: update every ``every`` trainer iterations (the gradient-accumulation steps).
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.0, every: int = 1) -> None:
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"WeightAverage: decay must be in [0, 1), got {decay}")
        if int(every) < 1:
            raise ValueError(f"WeightAverage: every must be >= 1, got {every}")
        self.network = network
        self.decay = decay
        self.every = int(every)
        self.updates = 0
        self._live: list[torch.Tensor] | None = None
        # built from the network's weights at the first update (after `initialize` has set the
        # network up), or loaded from a checkpoint
        self.shadow: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        return self.decay > 0.0

    @property
    def swapped(self) -> bool:
        """Whether the averaged weights are in the network now."""
        return self._live is not None

    def _params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in _unwrap(self.network).named_parameters() if p.is_floating_point()]

    def attach(self, trainer: Any, evaluator: Any = None) -> None:
        from ignite.engine import Events

        if not self.enabled:
            return
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.update)
        if evaluator is not None:
            evaluator.add_event_handler(Events.STARTED, self.swap_in)
            evaluator.add_event_handler(Events.COMPLETED, self.swap_out)
            evaluator.add_event_handler(Events.EXCEPTION_RAISED, self._swap_out_and_raise)

    @torch.no_grad()
    def update(self, engine: Any = None) -> None:
        if not self.enabled:
            return
        if self.swapped:
            raise RuntimeError("WeightAverage: update while the averaged weights are swapped in")
        if not self.shadow:
            self._restart()
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        names, params = zip(*self._params())
        shadow = [self.shadow[n] for n in names]
        live = [p.detach().float() for p in params]
        if shadow[0].device != live[0].device:  # the network was moved after the average was built
            for n, p in zip(names, live):
                self.shadow[n] = self.shadow[n].to(p.device)
            shadow = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadow, live, 1.0 - d)
        self.updates += 1

    def _restart(self) -> None:
        self.shadow = {name: p.detach().float().clone() for name, p in self._params()}
        self.updates = 0

    @torch.no_grad()
    def swap_in(self, engine: Any = None) -> None:
        if not self.enabled or self.swapped or not self.shadow:
            return
        params = self._params()
        self._live = [p.detach().clone() for _, p in params]
        for name, p in params:
            p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def swap_out(self, engine: Any = None) -> None:
        if self._live is None:
            return
        for (_, p), live in zip(self._params(), self._live):
            p.copy_(live)
        self._live = None

    def _swap_out_and_raise(self, engine: Any, e: BaseException) -> None:
        self.swap_out(engine)
        raise e

    def state_dict(self) -> dict[str, Any]:
        return {"updates": torch.tensor(self.updates), "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        shadow = state.get("shadow") or {}
        if not shadow:  # a checkpoint written without averaging: start the average from these weights
            logger.warning("WeightAverage: the checkpoint holds no averaged weights; the average restarts from the loaded ones")
            self.shadow = {}
            return
        params = dict(self._params())
        missing = sorted(set(params) - set(shadow))
        unexpected = sorted(set(shadow) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"WeightAverage: the checkpoint's averaged weights do not match the network "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        for name, t in shadow.items():
            if t.shape != params[name].shape:
                raise ValueError(f"WeightAverage: averaged weight {name} has shape {tuple(t.shape)}, the network {tuple(params[name].shape)}")
        self.shadow = {name: t.float().to(params[name].device) for name, t in shadow.items()}
        self.updates = int(state.get("updates", 0))
