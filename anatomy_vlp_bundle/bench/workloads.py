"""What the bench times: the bundle's training step, its baselines, and the batches they run on.

- :class:`BenchConfig`: the settings of the training config (``configs/train.yaml``) the bench
  reproduces: ``network_def``, geometry, batch size, optimizer, loss weights, stage schedule.
- :class:`WarmCacheEncoder`: the frozen text side with every text already cached (a dict lookup
  per text, no text model): prompt banks and sentence targets come from it, so no text model is
  ever loaded in a timed region.
- :func:`pipeline_batch`: a batch of real cases through the bundle's own transform chain
  (deterministic ``eval`` mode) at any input size.
- :class:`TrainingStep`: exactly the training iteration (``engines.iteration.VLPTrainIteration``)
  in the last stage of the schedule: forward of ``AnatomyVLPModel``, every loss term of that
  stage, backward, gradient clipping and the AdamW step.
- :class:`PlainStep`: forward, a simple loss, backward, clipping, AdamW: the MONAI ``ViT``
  baseline and the backbone alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml

from ..data.catalog import Catalog
from ..data.datalist import load_datalist
from ..data.dataset import vlp_collate
from ..data.pipeline import build_transforms
from ..engines.iteration import VLPTrainIteration
from ..engines.stages import StageScheduleHandler
from ..engines.workflow import parameter_groups
from ..losses.criterion import build_criterion
from ..networks.vlp_model import AnatomyVLPModel
from ..text.prompts import PromptBank
from ..text.reports import ParseReportd
from ..text.targets import SentenceTargets

__all__ = [
    "BenchConfig",
    "load_bench_config",
    "WarmCacheEncoder",
    "pipeline_batch",
    "build_model",
    "monai_vit",
    "TrainingStep",
    "PlainStep",
    "vit_loss",
    "backbone_loss",
    "make_step",
    "WORKLOADS",
]

#: what :func:`make_step` builds: the full model's training iteration, the backbone alone, MONAI's ViT
WORKLOADS = ("full", "backbone", "vit")


@dataclass
class BenchConfig:
    """The training configuration the bench reproduces (see :func:`load_bench_config`).

    ``network`` holds the ``AnatomyVLPModel`` arguments of ``network_def`` except the catalog.
    """

    config_file: str
    dataset_dir: str
    catalog: Catalog
    network: dict[str, Any]
    roi_size: list[int]
    spacing: list[float]
    hu_window: list[float]
    batch_size: int
    learning_rate: float
    weight_decay: float
    grad_clip: Optional[float]
    loss_weights: dict[str, float]
    stages: list[dict[str, Any]]
    augment: dict[str, Any]
    cache_rate: float
    num_workers: int
    hard_negatives: int
    seed: int
    uncertain_as: Optional[int] = None
    cpu_allocator: bool = True

    def report_parser(self) -> ParseReportd:
        """The training chain's report parser (``train#report_parser``)."""
        return ParseReportd(self.catalog, uncertain_as=self.uncertain_as)

    def train_transforms(self, roi_size: Optional[Sequence[int]] = None) -> Any:
        """``train#preprocessing``: the training chain (random crop and the config's augmentation)."""
        return build_transforms(
            self.catalog, mode="train", spacing=tuple(self.spacing), roi_size=tuple(roi_size or self.roi_size),
            hu_window=tuple(self.hu_window), augment=self.augment, report_parser=self.report_parser(),
        )


def _resolve(value: Any, config: Mapping[str, Any]) -> Any:
    """A config value with ``@name`` / ``@a#b`` references replaced by the referenced literal."""
    if isinstance(value, str) and value.startswith("@"):
        target: Any = config
        for part in value[1:].split("#"):
            target = target[part]
        if isinstance(target, str) and target.startswith(("$", "%")):
            raise ValueError(f"bench: config reference {value} is an expression ({target!r}); give a literal")
        return _resolve(target, config)
    if isinstance(value, dict):
        return {k: _resolve(v, config) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, config) for v in value]
    return value


def _network_value(key: str, value: Any, raw: Mapping[str, Any]) -> Any:
    """``network_def#key``: references resolved as literals, a ``$`` expression (e.g. the CT windows from
    HU) evaluated by MONAI's config parser with the bundle package importable."""
    if isinstance(value, str) and value.startswith("$"):
        from monai.bundle import ConfigParser

        parser = ConfigParser(dict(raw), globals={"anatomy_vlp_bundle": "anatomy_vlp_bundle"})
        return parser.get_parsed_content(f"network_def#{key}")
    return _resolve(value, raw)


def load_bench_config(config_file: str | Path = "configs/train.yaml", dataset_dir: str | Path = "data/synthetic_ct") -> BenchConfig:
    """Read the training config's settings; the catalog is the dataset's (as the config's ``catalog``).

    Args:
        config_file: the bundle's training config (YAML).
        dataset_dir: folder of the dataset's ``datalist.json``.
    """
    raw = yaml.safe_load(Path(config_file).read_text())
    network = {k: _network_value(k, v, raw) for k, v in raw["network_def"].items() if k not in ("_target_", "catalog")}
    targets = raw.get("sentence_targets") or {}
    return BenchConfig(
        config_file=str(config_file),
        dataset_dir=str(dataset_dir),
        catalog=load_datalist(dataset_dir).catalog(),
        network=network,
        roi_size=[int(v) for v in _resolve(raw["roi_size"], raw)],
        spacing=[float(v) for v in _resolve(raw["spacing"], raw)],
        hu_window=[float(v) for v in _resolve(raw["hu_window"], raw)],
        batch_size=int(_resolve(raw["batch_size"], raw)),
        learning_rate=float(_resolve(raw["learning_rate"], raw)),
        weight_decay=float(_resolve(raw["weight_decay"], raw)),
        grad_clip=_resolve(raw.get("grad_clip"), raw),
        loss_weights=dict(_resolve(raw.get("loss_weights") or {}, raw)),
        stages=list(_resolve(raw["stages"], raw)),
        augment=dict(_resolve(raw["train"].get("augment") or {}, raw)),
        cache_rate=float(_resolve(raw.get("cache_rate", 1.0), raw)),
        num_workers=int(_resolve(raw.get("num_workers", 0), raw)),
        hard_negatives=int(_resolve(targets.get("hard_negatives", 2), raw)),
        seed=int(_resolve(raw.get("seed", 0), raw)),
        uncertain_as=_resolve(raw.get("uncertain_as"), raw),
        cpu_allocator=bool(_resolve(raw.get("cpu_allocator", True), raw)),
    )


class WarmCacheEncoder:
    """Stands in for ``text.encoder.TextEncoder`` with every text already in its embedding cache.

    ``encode(texts)`` returns one fixed random unit vector per text (drawn on first sight, then a
    dict lookup, as a cache hit): the training step's text side costs what it costs with a warm
    cache, and no text model is loaded.

    Args:
        dim: embedding width (the model's ``embed_dim``).
        seed: seed of the vectors.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        self.dim = int(dim)
        self._generator = torch.Generator().manual_seed(seed)
        self._table: dict[str, torch.Tensor] = {}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, dim)`` float32 unit vectors, one per text."""
        for text in texts:
            if text not in self._table:
                self._table[text] = F.normalize(torch.randn(self.dim, generator=self._generator), dim=0)
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._table[t] for t in texts])

    __call__ = encode


def pipeline_batch(cfg: BenchConfig, roi_size: Sequence[int], batch_size: int, split: str = "training") -> dict[str, Any]:
    """The first ``batch_size`` cases of ``split`` through the bundle's chain (``eval`` mode: the
    training chain without its random crop and augmentation) at ``roi_size``, collated."""
    records = load_datalist(cfg.dataset_dir).records(split)[: int(batch_size)]
    if len(records) < batch_size:
        raise ValueError(f"bench: {cfg.dataset_dir} has {len(records)} {split} cases, a batch needs {batch_size}")
    chain = build_transforms(
        cfg.catalog, mode="eval", spacing=tuple(cfg.spacing), roi_size=tuple(int(s) for s in roi_size),
        hu_window=tuple(cfg.hu_window), report_parser=cfg.report_parser(),
    )
    return vlp_collate([chain(r) for r in records])


def build_model(cfg: BenchConfig, encoder: WarmCacheEncoder, **overrides: Any) -> AnatomyVLPModel:
    """``AnatomyVLPModel`` as the config's ``network_def`` (with ``overrides``), seeded, prompts set."""
    torch.manual_seed(cfg.seed)
    model = AnatomyVLPModel(catalog=cfg.catalog, **{**cfg.network, **overrides})
    model.set_prompt_bank(PromptBank.from_catalog(cfg.catalog, encoder))
    return model


def monai_vit(cfg: BenchConfig, img_size: Sequence[int], **overrides: Any) -> torch.nn.Module:
    """The baseline: ``monai.networks.nets.ViT`` with the backbone's width, depth, heads, MLP width and
    patch size (``classification=False``: patch tokens only, as the backbone's token path)."""
    from monai.networks.nets import ViT

    net = {**cfg.network, **overrides}
    hidden = int(net["hidden_size"])
    torch.manual_seed(cfg.seed)
    return ViT(
        in_channels=int(net.get("in_channels", 1)),
        img_size=list(img_size),
        patch_size=net["patch_size"],
        hidden_size=hidden,
        mlp_dim=int(net.get("mlp_dim") or 4 * hidden),
        num_layers=int(net["num_layers"]),
        num_heads=int(net["num_heads"]),
        classification=False,
        spatial_dims=cfg.catalog.spatial_dims,
    )


class TrainingStep:
    """One step of the bundle's training iteration (``VLPTrainIteration``) on ``AnatomyVLPModel``.

    Set up as ``configs/train.yaml`` does for its last stage (the alignment stage, most of a run):
    the criterion with the config's loss weights and the stage's terms, the prior fitted
    (``fit_prior``), sentence targets from ``encoder`` (a warm cache), fp32 (or autocast to
    ``amp_dtype``), gradient clipping, AdamW with the config's parameter groups.

    Args:
        cfg: the training configuration.
        model: the model (``build_model``).
        encoder: the text side (:class:`WarmCacheEncoder`).
        batch: the batch ``__call__`` trains on (:func:`pipeline_batch`); :meth:`run` takes any batch.
    """

    def __init__(self, cfg: BenchConfig, model: AnatomyVLPModel, encoder: WarmCacheEncoder, batch: Optional[Mapping[str, Any]] = None,
                 amp_dtype: Optional[torch.dtype] = None) -> None:
        criterion = build_criterion(cfg.loss_weights, uncertain_as=cfg.uncertain_as)
        schedule = StageScheduleHandler(cfg.stages, criterion, model)
        stage = schedule.apply(len(schedule.stages) - 1)
        self.stage = stage.name
        self.iteration = VLPTrainIteration(
            criterion,
            SentenceTargets(encoder, cfg.catalog, hard_negatives=cfg.hard_negatives, seed=cfg.seed),
            amp=amp_dtype is not None,
            amp_dtype=amp_dtype or torch.bfloat16,
            grad_clip=cfg.grad_clip,
            uncertain_as=cfg.uncertain_as,
        )
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        self.params = list(model.parameters())
        self.engine = SimpleNamespace(
            network=model,
            optimizer=optimizer,
            accumulation_steps=1,
            non_blocking=False,
            state=SimpleNamespace(iteration=1, epoch_length=None, device=torch.device("cpu"), vlp_stage=stage),
        )
        self.batch = batch

    def run(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One iteration on ``batch``; returns the iteration's loss dict."""
        return self.iteration(self.engine, batch)

    def __call__(self) -> dict[str, Any]:
        if self.batch is None:
            raise ValueError("TrainingStep: built without a batch; call run(batch)")
        return self.run(self.batch)


def vit_loss(output: Any) -> torch.Tensor:
    """Mean square of MONAI ``ViT``'s tokens (its output is ``(tokens, hidden_states)``)."""
    return output[0].float().pow(2).mean()


def backbone_loss(output: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean squares of ``AnatomyViT``'s [CLS], query and patch tokens."""
    return sum(output[k].float().pow(2).mean() for k in ("cls", "queries", "patch_tokens"))


class PlainStep:
    """Forward, ``loss_fn``, backward, gradient clipping, AdamW step: a plain module's training step.

    Args:
        module: the network (MONAI ``ViT``, ``AnatomyViT``).
        image: ``(B, C, *S)`` input.
        loss_fn: module output -> scalar loss.
        cfg: learning rate, weight decay and clipping come from the training configuration.
        amp_dtype: autocast dtype (``torch.bfloat16``) or None for fp32.
    """

    def __init__(self, module: torch.nn.Module, image: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor], cfg: BenchConfig,
                 amp_dtype: Optional[torch.dtype] = None) -> None:
        self.module = module.train()
        self.image = image
        self.loss_fn = loss_fn
        self.grad_clip = cfg.grad_clip
        self.amp_dtype = amp_dtype
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            loss = self.loss_fn(self.module(self.image))
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, float(self.grad_clip))
        self.optimizer.step()
        return float(loss.detach())


def make_step(cfg: BenchConfig, workload: str, batch: Mapping[str, Any], encoder: WarmCacheEncoder,
              amp_dtype: Optional[torch.dtype] = None, **overrides: Any) -> Callable[[], object]:
    """A training step of ``workload`` (:data:`WORKLOADS`) at the batch's input size.

    Args:
        cfg: the training configuration.
        workload: ``"full"`` (:class:`TrainingStep`), ``"backbone"`` (the model's ``AnatomyViT``
            alone) or ``"vit"`` (:func:`monai_vit`); the last two are :class:`PlainStep`.
        batch: the batch (:func:`pipeline_batch`); ``vit`` and ``backbone`` use its image only.
        encoder: the text side.
        amp_dtype: autocast dtype (None: fp32); the full step autocasts through the bundle's
            iteration (``amp: true``), as training does.
        overrides: ``network_def`` overrides (``hidden_size``, ``conv_stem``, ``prior``,
            ``gradient_checkpointing``, ``attention``, ...).
    """
    image = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
    img_size = [int(s) for s in image.shape[2:]]
    if workload == "vit":
        return PlainStep(monai_vit(cfg, img_size, **overrides), image, vit_loss, cfg, amp_dtype)
    model = build_model(cfg, encoder, img_size=img_size, **overrides)
    if workload == "backbone":
        return PlainStep(model.backbone, image, backbone_loss, cfg, amp_dtype)
    if workload == "full":
        return TrainingStep(cfg, model, encoder, batch, amp_dtype)
    raise ValueError(f"make_step: workload must be one of {WORKLOADS}, got {workload!r}")
