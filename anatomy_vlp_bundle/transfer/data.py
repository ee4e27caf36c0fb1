"""What the transfer evaluations share: the pre-trained encoder and the cases as in-memory tensors.

- :func:`load_image_model`: the checkpoint's whole image side (``AnatomyVLPModel``: backbone,
  region boxes, pooling, statistics, fusion and projection; its per-anatomy region embeddings are
  the features the pre-training aligned with text), pre-trained or randomly initialised.
- :func:`load_encoder`: the :class:`~anatomy_vlp_bundle.networks.anatomy_vit.AnatomyViT` of a
  training checkpoint (its ``backbone.*`` weights), or the same architecture randomly initialised
  (the "from scratch" baseline). Built for any catalog: anatomy queries are mapped by name and
  anatomies the checkpoint does not know start fresh.
- :func:`load_cases`: records of a contract datalist through the bundle's own evaluation chain
  (``data.pipeline.build_transforms(mode="eval")`` with the report parser), stacked into tensors
  once, so that the many short trainings of a label-efficiency curve do not re-read the files. A
  case that cannot be read is skipped and listed, not fatal.
- :func:`remap_labels`: ``(N, M, F)`` finding codes of one catalog onto another by
  (anatomy, finding) name.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch

from ..data.catalog import Catalog, load_catalog
from ..data.labels import UNKNOWN
from ..networks.anatomy_vit import AnatomyViT, remap_anatomy_queries

__all__ = ["load_image_model", "load_encoder", "encoder_kwargs", "eval_chain", "load_cases", "remap_labels", "remap_study_labels", "subset_indices"]

logger = logging.getLogger(__name__)

#: ``AnatomyVLPModel`` configuration keys that describe its ``AnatomyViT`` backbone.
_ENCODER_KEYS = ("img_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                 "pos_embed", "conv_stem", "stem_channels", "in_channels", "attention", "input_windows")


def encoder_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """``AnatomyViT`` keyword arguments (spatial dims included) from a checkpoint's ``model_config``."""
    img = model_config["img_size"]
    dims = model_config.get("spatial_dims") or (len(img) if isinstance(img, (list, tuple)) else 3)
    kw = {k: model_config[k] for k in _ENCODER_KEYS if k in model_config}
    kw["spatial_dims"] = int(dims)
    return kw


def load_encoder(
    checkpoint: Optional[Mapping[str, Any]],
    catalog: Catalog | str,
    pretrained: bool = True,
    seed: int = 0,
) -> AnatomyViT:
    """The checkpoint's encoder for ``catalog``, pre-trained or freshly initialised.

    Args:
        checkpoint: a training checkpoint dict (``engines.checkpoint.load_checkpoint``): its
            ``extras["model_config"]`` gives the architecture, ``model`` the weights.
        catalog: the catalog of the downstream task; its anatomies get one query each (rows of
            anatomies the checkpoint's catalog also has are copied, by name).
        pretrained: False gives the same architecture with random weights (``seed``).
        seed: initialisation seed of every fresh parameter.
    """
    if checkpoint is None or "extras" not in checkpoint or "model_config" not in checkpoint["extras"]:
        raise ValueError("load_encoder: the checkpoint has no extras['model_config'] (is it a bundle training checkpoint?)")
    extras = checkpoint["extras"]
    catalog = load_catalog(catalog)
    kw = encoder_kwargs(extras["model_config"])
    dims = kw.pop("spatial_dims")
    torch.manual_seed(seed)
    encoder = AnatomyViT(dims, num_anatomies=catalog.num_anatomies, **kw)
    if pretrained:
        state = {k[len("backbone."):]: v for k, v in checkpoint["model"].items() if k.startswith("backbone.")}
        if not state:
            raise ValueError("load_encoder: the checkpoint's weights have no 'backbone.*' entries")
        old = load_catalog(extras.get("catalog") or extras["model_config"]["catalog"])
        state = remap_anatomy_queries(state, old, catalog, generator=torch.Generator().manual_seed(seed))
        encoder.load_state_dict(state, strict=True)
    return encoder


def load_image_model(checkpoint: Mapping[str, Any], pretrained: bool = True, seed: int = 0) -> torch.nn.Module:
    """The checkpoint's ``AnatomyVLPModel`` (its own catalog), with its weights or freshly initialised.

    Args:
        checkpoint: a training checkpoint dict (``extras["model_config"]``, ``extras["catalog"]``, ``model``).
        pretrained: False gives the same architecture with random weights (``seed``): the
            "from scratch" baseline.
        seed: initialisation seed.
    """
    from ..networks.vlp_model import AnatomyVLPModel

    extras = checkpoint.get("extras") or {}
    if "model_config" not in extras:
        raise ValueError("load_image_model: the checkpoint has no extras['model_config'] (is it a bundle training checkpoint?)")
    config = dict(extras["model_config"])
    config["catalog"] = load_catalog(extras.get("catalog") or config["catalog"])
    torch.manual_seed(seed)
    model = AnatomyVLPModel(**config)
    if pretrained:
        model.load_state_dict(checkpoint["model"], strict=True)
    return model


def remap_labels(labels: torch.Tensor, source: Catalog, target: Catalog) -> torch.Tensor:
    """``(N, M_s, F_s)`` finding codes in ``source`` order -> ``(N, M_t, F_t)`` in ``target`` order.

    Pairs are matched by anatomy and finding name; target pairs the source does not have are
    UNKNOWN (left out of losses and metrics).
    """
    out = torch.full((labels.shape[0], target.num_anatomies, max(target.max_findings, 1)), float(UNKNOWN), dtype=labels.dtype)
    for i, a in enumerate(target.anatomies):
        if a.name not in source.names:
            continue
        src = source.anatomy(a.name)
        si = source.index(a.name)
        for j, f in enumerate(a.findings):
            if f in src.findings:
                out[:, i, j] = labels[:, si, src.findings.index(f)]
    return out


def remap_study_labels(labels: torch.Tensor, source: Catalog, target: Catalog) -> torch.Tensor:
    """``(N, S_s)`` study-finding codes -> ``(N, S_t)`` by finding name (UNKNOWN where absent)."""
    out = torch.full((labels.shape[0], len(target.study_findings)), float(UNKNOWN), dtype=labels.dtype)
    for j, f in enumerate(target.study_findings):
        if f in source.study_findings:
            out[:, j] = labels[:, list(source.study_findings).index(f)]
    return out


def subset_indices(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """A seeded random subset of ``round(fraction * n)`` (at least 1) of ``range(n)``, sorted.

    Nested across fractions for one seed: the 5% subset lies inside the 20% one.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(round(fraction * n)))
    return order[:k].sort().values


def eval_chain(catalog: Catalog | str, preprocessing: Optional[Mapping[str, Any]] = None) -> Any:
    """The bundle's evaluation transform chain with the report parser, at a checkpoint's
    ``preprocessing`` (``spacing``, ``roi_size``, ``hu_window``; missing keys take the defaults)."""
    from ..data.pipeline import build_transforms
    from ..text.reports import ParseReportd

    catalog = load_catalog(catalog)
    pre = dict(preprocessing or {})
    kwargs = {k: tuple(pre[k]) for k in ("spacing", "roi_size", "hu_window") if pre.get(k) is not None}
    return build_transforms(catalog, mode="eval", report_parser=ParseReportd(catalog), **kwargs)


def load_cases(
    records: Sequence[Mapping[str, Any]],
    catalog: Catalog | str,
    preprocessing: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    desc: str = "cases",
) -> dict[str, Any]:
    """Records -> stacked tensors through the bundle's evaluation transform chain.

    Args:
        records: contract records with resolved paths (``Datalist.records(split)``).
        catalog: the catalog the masks and labels are read in.
        preprocessing: ``spacing``, ``roi_size``, ``hu_window`` (a checkpoint's
            ``extras["preprocessing"]``); missing keys take the pipeline's defaults.
        progress: tqdm bar.
        desc: the bar's label.

    Returns:
        ``image`` ``(N, 1, *S)`` float32; ``anatomy`` ``(N, M, *S)`` uint8; ``findings`` ``(N, M, F)``
        and ``study_findings`` ``(N, S)`` float32 codes (1, 0, -1 uncertain, -2 unknown); ``id``
        list; ``skipped``: ``[{"id", "error"}]`` of cases that could not be read.
    """
    from tqdm.auto import tqdm

    catalog = load_catalog(catalog)
    chain = eval_chain(catalog, preprocessing)
    out: dict[str, list] = {"image": [], "anatomy": [], "findings": [], "study_findings": [], "id": []}
    skipped: list[dict[str, str]] = []
    for rec in tqdm(records, desc=desc, unit="case", disable=not progress):
        rid = str(rec.get("id", "?"))
        try:
            d = chain(dict(rec))
        except Exception as e:  # one unreadable case is listed, never fatal to the others
            cause = e.__cause__ or e
            skipped.append({"id": rid, "error": f"{type(cause).__name__}: {cause}"})
            logger.warning("case %s skipped: %s", rid, skipped[-1]["error"])
            continue
        out["image"].append(torch.as_tensor(d["image"]).float())
        out["anatomy"].append(torch.as_tensor(d["anatomy"]).to(torch.uint8))
        out["findings"].append(torch.as_tensor(d["findings"]).float())
        out["study_findings"].append(torch.as_tensor(d["study_findings"]).float())
        out["id"].append(rid)
    if not out["id"]:
        raise ValueError(f"load_cases: none of the {len(records)} records could be read (first error: "
                         f"{skipped[0]['error'] if skipped else 'no records'})")
    result: dict[str, Any] = {k: torch.stack([t.as_tensor() if hasattr(t, "as_tensor") else t for t in v])
                              for k, v in out.items() if k != "id"}
    result["id"] = out["id"]
    result["skipped"] = skipped
    result["catalog"] = catalog
    return result

