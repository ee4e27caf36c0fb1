"""Staged training: which loss terms are on, with which weights, and what the model fits, per epoch.

A schedule is a list of stages (written in the bundle config as a list of dicts)::

    - {name: detection, epochs: 0.15, terms: [detection]}
    - {name: disease,   epochs: 0.15, terms: [detection, disease], weights: {disease: 1.0}}
    - {name: normality, epochs: 0.1,  terms: [detection, disease, normality], fit_prior: true}
    - {name: alignment, epochs: 0.6,  terms: [detection, normality, global, fine_grained, prompt_pair],
       fit_prior: true}

``epochs`` is a whole number of epochs (int) or a fraction of the run's ``max_epochs`` (float < 1);
the last stage takes whatever epochs remain. The stage of an epoch is a pure function of
``(epoch, max_epochs)`` (:func:`stage_index`), so a resumed run picks the right stage from the
restored epoch alone: nothing about stages is kept as state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["Stage", "parse_stages", "stage_boundaries", "stage_index", "StageScheduleHandler", "DEFAULT_STAGES"]

logger = logging.getLogger(__name__)

#: DESIGN.md's default schedule: detection; + disease-level contrastive (ViSD-Boost stage 1); the
#: normality prior fitted on normal anatomies (stage 2); global, fine-grained and prompt-pair
#: alignment on fused features, detection kept on (stage 3).
DEFAULT_STAGES: list[dict[str, Any]] = [
    {"name": "detection", "epochs": 0.15, "terms": ["detection"]},
    {"name": "disease", "epochs": 0.15, "terms": ["detection", "disease"], "weights": {"disease": 1.0}},
    {"name": "normality", "epochs": 0.1, "terms": ["detection", "disease", "normality"], "fit_prior": True,
     "weights": {"disease": 1.0}},
    {"name": "alignment", "epochs": 0.6, "terms": ["detection", "normality", "global", "fine_grained", "prompt_pair"],
     "fit_prior": True},
]


#: criterion terms that stay on in every stage (zero-valued plumbing, not losses)
ALWAYS_ON = ("connect_all",)


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        name: shown in the logs.
        epochs: whole epochs (int >= 1) or a fraction of ``max_epochs`` (0 < float < 1).
        terms: loss terms switched on (every other criterion term is switched off).
        weights: weight overrides for this stage (``"term"`` or ``"term.component"``); other weights
            keep the criterion's base values.
        fit_prior: the normality prior is fitted (the iteration passes the ``normal`` anatomies to the
            model; otherwise its codebook is left alone).
        freeze: parameter-name prefixes that get ``requires_grad=False`` during the stage (e.g.
            ``["backbone"]`` to fit heads only); everything else is trainable.
    """

    name: str
    epochs: float
    terms: tuple[str, ...]
    weights: Mapping[str, float] = field(default_factory=dict)
    fit_prior: bool = False
    freeze: tuple[str, ...] = ()


def parse_stages(stages: Sequence[Mapping[str, Any] | Stage] | None) -> list[Stage]:
    """Config list -> :class:`Stage` list (``None`` or empty: :data:`DEFAULT_STAGES`).

    Raises:
        ValueError: a stage without name/terms, a non-positive or malformed ``epochs``, unknown keys.
    """
    stages = list(stages) if stages else list(DEFAULT_STAGES)
    allowed = {"name", "epochs", "terms", "weights", "fit_prior", "freeze"}
    out: list[Stage] = []
    for i, s in enumerate(stages):
        if isinstance(s, Stage):
            out.append(s)
            continue
        if not isinstance(s, Mapping):
            raise ValueError(f"stage {i}: must be a mapping with name/epochs/terms, got {type(s).__name__}")
        unknown = set(s) - allowed
        if unknown:
            raise ValueError(f"stage {i} ({s.get('name')!r}): unknown key(s) {sorted(unknown)}; allowed {sorted(allowed)}")
        if "name" not in s or "terms" not in s:
            raise ValueError(f"stage {i}: needs 'name' and 'terms', got {dict(s)}")
        epochs = s.get("epochs", 1)
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0:
            raise ValueError(f"stage {i} ({s['name']!r}): epochs must be a positive int or a fraction, got {epochs!r}")
        if isinstance(epochs, float) and epochs >= 1 and not epochs.is_integer():
            raise ValueError(f"stage {i} ({s['name']!r}): epochs must be an int or a fraction < 1, got {epochs!r}")
        terms = s["terms"]
        if isinstance(terms, str):
            terms = [terms]
        out.append(
            Stage(
                name=str(s["name"]),
                epochs=float(epochs),
                terms=tuple(str(t) for t in terms),
                weights={str(k): float(v) for k, v in dict(s.get("weights") or {}).items()},
                fit_prior=bool(s.get("fit_prior", False)),
                freeze=tuple(str(p) for p in (s.get("freeze") or ())),
            )
        )
    return out


def stage_boundaries(stages: Sequence[Stage], max_epochs: int) -> list[int]:
    """First epoch (1-based, Ignite's numbering) of every stage, for a run of ``max_epochs``.

    Fractions are rounded (at least one epoch each while epochs remain); the last stage runs to the
    end. A run too short for every stage drops the earliest ones from view: stage ``k`` starting
    after ``max_epochs`` never runs, except that the last stage always gets the final epoch(s).
    """
    max_epochs = max(int(max_epochs), 1)
    starts, start = [], 1
    for i, s in enumerate(stages):
        starts.append(start)
        length = int(s.epochs) if s.epochs >= 1 else max(1, round(s.epochs * max_epochs))
        start += length
    # the last stage (the one that trains what is evaluated) always gets at least the last epoch
    if starts[-1] > max_epochs:
        starts[-1] = max_epochs
        for i in range(len(starts) - 2, -1, -1):
            starts[i] = min(starts[i], starts[i + 1])
    return starts


def stage_index(stages: Sequence[Stage], epoch: int, max_epochs: int) -> int:
    """Index of the stage that runs in ``epoch`` (1-based) of a run of ``max_epochs`` epochs."""
    starts = stage_boundaries(stages, max_epochs)
    idx = 0
    for i, start in enumerate(starts):
        if epoch >= start and (i == len(starts) - 1 or starts[i + 1] > start):
            idx = i
    return idx


class StageScheduleHandler:
    """Applies the stage of each epoch at ``EPOCH_STARTED`` (so resume picks it from the epoch).

    Sets the criterion's ``enabled`` (only the stage's ``terms``) and ``weights`` (base weights
    updated with the stage's), freezes the stage's ``freeze`` prefixes, and stores the stage as
    ``engine.state.vlp_stage`` for the iteration (``fit_prior``).

    Args:
        stages: the schedule (config list or :class:`Stage` list; None = :data:`DEFAULT_STAGES`).
        criterion: a ``losses.alignment.VLPCriterion``.
        network: the model (for ``freeze``); DDP wrappers are unwrapped.
    """

    def __init__(self, stages: Sequence[Mapping[str, Any] | Stage] | None, criterion: Any, network: Optional[torch.nn.Module] = None):
        self.stages = parse_stages(stages)
        self.criterion = criterion
        self.network = network
        self.base_weights = dict(criterion.weights)
        known = {k for k in self.base_weights if "." not in k} | set(getattr(criterion, "terms", {}))
        for s in self.stages:
            missing = [t for t in s.terms if t not in known]
            if missing:
                raise ValueError(f"stage {s.name!r}: unknown loss term(s) {missing}; the criterion has {sorted(known)}")
        self.current: Optional[int] = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def apply(self, index: int) -> Stage:
        """Configure criterion and network for stage ``index``; returns the stage."""
        stage = self.stages[index]
        weights = dict(self.base_weights)
        weights.update(stage.weights)
        self.criterion.weights = weights
        terms = {k for k in weights if "." not in k} | set(getattr(self.criterion, "terms", {}))
        # `connect_all` (losses.criterion, for DDP) is plumbing, not a loss: no stage switches it off
        self.criterion.enabled = {t: (t in stage.terms or t in ALWAYS_ON) for t in terms}
        net = getattr(self.network, "module", self.network)
        if net is not None:
            for name, p in net.named_parameters():
                p.requires_grad_(not any(name.startswith(prefix) for prefix in stage.freeze))
        self.current = index
        return stage

    def __call__(self, engine: Any) -> None:
        index = stage_index(self.stages, engine.state.epoch, engine.state.max_epochs)
        changed = index != self.current
        stage = self.apply(index)
        engine.state.vlp_stage = stage
        if changed:
            logger.info("epoch %d: stage %d/%d %r, terms %s", engine.state.epoch, index + 1, len(self.stages), stage.name,
                        list(stage.terms))
