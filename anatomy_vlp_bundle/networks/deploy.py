"""TorchScript deploy wrapper: image -> one tensor ``pred`` of shape ``(B, M + 1, K)``.

Layout (also returned by :func:`describe_layout` and stored in the wrapper as ``layout_json``):

- row ``i < M`` (anatomy ``i`` of the catalog):
  ``[presence probability, box (2d numbers), abnormality, P(finding_1) .. P(finding_F)]``,
  ``K = 1 + 2d + 1 + F`` with ``F = catalog.max_findings``; finding columns past the anatomy's own
  findings are -1.
- row ``M`` (the whole study, from [CLS]): ``P(study finding_1 .. _S)`` in the finding columns,
  -1 everywhere else.

Box form: **normalised corner boxes** ``(x0, y0, [z0], x1, y1, [z1])`` in array-axis order
(MONAI's ``StandardMode`` ``"xyxy"`` / ``"xyzxyz"``), relative to the preprocessed input grid and
clipped to ``[0, 1]``: multiplying by the input's spatial shape gives voxel corner boxes (end
exclusive), the same convention as the data pipeline's ``anatomy_boxes``; the caller maps them
back to the original image through the inverse of the preprocessing. Corners rather than centre
size because every consumer (MONAI box transforms, DICOM SR, the result JSON) works in corners.

Regions are image-only (predicted boxes). The normality prior's code lookup is its own
``partitioned_nearest_code`` (MONAI's ``EMAQuantizer`` cannot be scripted). Prompt embeddings,
thresholds, the score calibration and the catalog are in the wrapper (persistent buffers and the
``layout_json`` string attribute), so the exported file needs only ``torch``.

State dict: the wrapper registers the model's submodules, parameters and buffers under the
model's own names, so ``wrapper.state_dict()`` has exactly the model's keys. A bundle can
therefore declare ``network_def`` as ``DeployWrapper(AnatomyVLPModel(...))`` and
``monai.bundle ckpt_export`` loads the training checkpoint's ``model`` entry into it strictly,
then scripts it.

``torch.jit.script`` is used (not tracing): the token grid, the number of patches inside each
predicted box and the prior's per-anatomy lookup depend on the input, which a trace would freeze.
:func:`export_program` offers the same wrapper through ``torch.export`` (TorchScript's
successor; a ``.pt2`` archive): the code has no branch on data, so the exported program keeps
the region sizes symbolic and matches eager on other images too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.catalog import Catalog, load_catalog
from ..losses.alignment import zero_shot_logits
from .box_ops import boxes_to_token_mask
from .region_stats import background_statistics, background_weights, predicted_statistics_ensemble, stats_input
from .vlp_model import AnatomyVLPModel, abnormality_from_score, image_patches, max_finding_probability, prior_summary_features

__all__ = ["DeployWrapper", "describe_layout", "script_deploy", "export_torchscript", "export_program", "LAYOUT_VERSION"]

LAYOUT_VERSION = 1
PAD_VALUE = -1.0


def describe_layout(catalog: Union[Catalog, dict, str], spatial_dims: Optional[int] = None) -> Dict[str, Any]:
    """The ``pred`` layout of :class:`DeployWrapper` for a catalog (for ``metadata.json``).

    Args:
        catalog: anatomy catalog (``Catalog``, dict, built-in name or path).
        spatial_dims: 2 or 3 (default the catalog's).

    Returns:
        plain-type dict: ``K`` (columns), ``num_rows`` (``M + 1``), ``columns`` (K names),
        ``channel_def`` (row index as a string -> anatomy name; the last row ``"study"``),
        ``box_columns`` / ``box_mode`` / ``box_normalized``, ``presence_column``,
        ``abnormality_column``, ``finding_columns`` (first, end), ``findings`` (row name -> finding
        names in column order), ``pad_value``, ``catalog`` (the catalog dict), ``version``.
    """
    cat = load_catalog(catalog)
    d = cat.spatial_dims if spatial_dims is None else int(spatial_dims)
    if d not in (2, 3):
        raise ValueError(f"describe_layout: spatial_dims must be 2 or 3, got {spatial_dims}")
    axes = ("x", "y", "z")[:d]
    box_columns = [f"{a}0" for a in axes] + [f"{a}1" for a in axes]
    f = cat.max_findings
    columns = ["presence"] + box_columns + ["abnormality"] + [f"finding_{j + 1}" for j in range(f)]
    m = cat.num_anatomies
    channel_def = {str(i): name for i, name in enumerate(cat.names)}
    channel_def[str(m)] = "study"
    findings = {a.name: list(a.findings) for a in cat.anatomies}
    findings["study"] = list(cat.study_findings)
    first_finding = 2 + 2 * d
    return {
        "version": LAYOUT_VERSION,
        "K": len(columns),
        "num_rows": m + 1,
        "columns": columns,
        "channel_def": channel_def,
        "presence_column": 0,
        "box_columns": [1, 1 + 2 * d],
        "box_mode": "xyzxyz" if d == 3 else "xyxy",
        "box_normalized": True,
        "box_note": "corners (array-axis order, end exclusive) divided by the preprocessed input's spatial shape, clipped to [0, 1]",
        "abnormality_column": 1 + 2 * d,
        "finding_columns": [first_finding, first_finding + f],
        "findings": findings,
        "pad_value": PAD_VALUE,
        "regions": "predicted",
        "spatial_dims": d,
        "catalog": cat.to_dict(),
    }


class DeployWrapper(nn.Module):
    """Scriptable image-only inference module around an :class:`AnatomyVLPModel` (see the module docstring).

    The wrapper shares the model's submodules and tensors (no copy) and is always in eval mode
    (``train()`` is a no-op that keeps eval; so is the shared model's mode afterwards).

    Args:
        model: the trained model.
        preprocessing: the inference chain's settings (``spacing``, ``roi_size``, ``hu_window``; a
            training checkpoint's ``extras["preprocessing"]``), kept in the layout so that the
            exported file says how to prepare its input.

    ``forward(image (B, C, *S)) -> pred (B, M + 1, K)``; ``layout_json`` (str attribute) holds
    :func:`describe_layout` (plus ``preprocessing`` and ``img_size``); ``thresholds`` (M, F) and
    ``study_thresholds`` (S,) are buffers.
    """

    # declared for TorchScript (an empty list, no structure maps as in the CT default, has no element
    # type to infer), as a type object: this module's postponed annotations would be strings
    __annotations__ = {"structure_sigmas": List[float]}

    def __init__(self, model: AnatomyVLPModel, preprocessing: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if not isinstance(model, AnatomyVLPModel):
            raise TypeError(f"DeployWrapper: expected an AnatomyVLPModel, got {type(model).__name__}")
        # the model's own names, so the state dicts match key for key
        for name, child in model.named_children():
            self.add_module(name, child)
        if model.prior is None:
            self.prior = None
        if model.seg_head is None:
            self.seg_head = None
        if model.prompt_adapter is None:
            self.prompt_adapter = None
        if model.study_stats is None:
            self.study_stats = None
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
        self.spatial_dims: int = model.spatial_dims
        self.in_channels: int = int(model.config.get("in_channels", 1))
        self.num_anatomies: int = model.num_anatomies
        self.num_findings: int = model.num_findings
        self.num_study_findings: int = model.num_study_findings
        self.prior_on: str = model.prior_on
        self.prior_interior: bool = model.prior_cells == "interior"
        self.stem_stride: List[int] = [int(v) for v in model.backbone.stem_stride]
        self.soft_boxes: bool = model.soft_boxes
        self.region_stats_bins: int = model.region_stats_bins
        self.focal_scales: List[float] = list(model.focal_scales)
        self.stats_threshold: float = float(model.stats_threshold)
        self.stats_cuts: List[float] = model.stats_cuts()
        self.stats_source_flag: bool = model.stats_source_flag
        self.stats_views: bool = model.stats_views
        self.structure_sigmas: List[float] = list(model.structure_sigmas)
        self.focal_depth: int = model.focal_depth
        layout = describe_layout(model.catalog, model.spatial_dims)
        layout["img_size"] = [int(v) for v in model.backbone.img_size]
        layout["preprocessing"] = json.loads(json.dumps(preprocessing or {}))
        self.num_columns: int = int(layout["K"])
        self.pad_value: float = PAD_VALUE
        self.layout_json: str = json.dumps(layout)
        super().train(False)

    def _adapt(self, emb: torch.Tensor) -> torch.Tensor:
        adapter = self.prompt_adapter
        if adapter is None:
            return emb
        return adapter(emb)

    def train(self, mode: bool = True) -> "DeployWrapper":  # noqa: D102 - always eval (deterministic export)
        return super().train(False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` ``(B, C, *S)`` preprocessed like training -> ``pred`` ``(B, M + 1, K)``."""
        with torch.no_grad():  # inference only: no autograd graph even if the caller forgot
            return self._predict(image)

    def _predict(self, image: torch.Tensor) -> torch.Tensor:
        spatial: List[int] = []
        for s in image.shape[2:]:
            spatial.append(int(s))
        grid = self.backbone.token_grid(spatial)
        feats = self.backbone(image, None)
        queries = feats["queries"]
        patch_tokens = feats["patch_tokens"]
        det = self.box_head(queries)
        boxes = det["boxes"]
        b = image.shape[0]
        m = self.num_anatomies

        weights = boxes_to_token_mask(boxes, grid, self.soft_boxes).to(torch.float32)
        region_feat = self.pooling(queries, patch_tokens, grid, weights, None)

        anatomy_score = torch.zeros(b, m, device=image.device)
        if self.prior is not None:
            if self.prior_on == "stem":
                prior_input = feats["stem_features"]
            elif self.prior_on == "image":
                prior_input = image_patches(image, self.stem_stride)
            else:
                prior_input = patch_tokens.transpose(1, 2).reshape([b, patch_tokens.shape[2]] + grid)
            prior_grid: List[int] = []
            for s in prior_input.shape[2:]:
                prior_grid.append(int(s))
            if self.prior_interior:
                prior_region = boxes_to_token_mask(boxes, prior_grid, True) > 0.999
            else:
                prior_region = boxes_to_token_mask(boxes, prior_grid, False)
            p = self.prior(prior_input.flatten(2), prior_region, None)
            anatomy_score = p["anatomy_score"]
            prior_feat = prior_summary_features(p["residual_stats"], anatomy_score)
        else:
            prior_feat = region_feat.new_zeros(b, m, 0)
        stats: List[torch.Tensor] = []
        cls_raw = self.cls_proj.net(feats["cls"]).float()
        if self.region_stats_bins > 0:
            mask_logits: Optional[torch.Tensor] = None
            raw_logits: Optional[torch.Tensor] = None
            if self.seg_head is not None:
                raw_logits = self.seg_head(feats["stem_input"], feats["stem_features"], patch_tokens, grid, feats["stem_early"])
                mask_logits = raw_logits - self.stats_threshold
            views = image  # the windows only where a statistics row reads them
            if self.stats_views or self.study_stats is not None:
                views = self.backbone.window_views(feats["stem_input"])
            stats_image, per_view = stats_input(image, views, self.stats_views, self.structure_sigmas)
            for raw, valid in predicted_statistics_ensemble(
                stats_image, boxes, raw_logits, self.stats_cuts, self.region_stats_bins, self.focal_scales,
                per_view, self.focal_depth, self.stats_source_flag,
            ):
                stats.append(self.region_proj.standardize(raw, valid))
            study_stats = self.study_stats
            if study_stats is not None:
                background = background_weights(None, boxes, spatial, mask_logits)
                bg_stats, bg_valid = background_statistics(views, background, self.region_stats_bins)
                cls_raw = cls_raw + study_stats(bg_stats, bg_valid)
        region_emb = self.region_proj.forward_ensemble(region_feat, prior_feat, stats)
        cls_emb = F.normalize(cls_raw, dim=-1)

        scale = self.logit_scale()
        prompt_pos, prompt_neg = self._adapt(self.prompt_pos), self._adapt(self.prompt_neg)
        study_pos, study_neg = self._adapt(self.study_pos), self._adapt(self.study_neg)
        probs = torch.sigmoid(zero_shot_logits(region_emb, prompt_pos, prompt_neg, scale).float())
        study = torch.sigmoid(
            zero_shot_logits(cls_emb.unsqueeze(1), study_pos.unsqueeze(0), study_neg.unsqueeze(0), scale)[:, 0].float()
        )
        if self.prior is not None:
            abnormality = abnormality_from_score(anatomy_score, self.prior.score_quantiles, self.prior.score_calibrated)
        else:
            abnormality = max_finding_probability(probs, self.prompt_valid)

        # centre-size -> corners inline (box_ops' version validates with f-strings TorchScript rejects)
        d = self.spatial_dims
        centre, half = boxes[..., :d].float(), boxes[..., d:].float() * 0.5
        corners = torch.cat([centre - half, centre + half], dim=-1).clamp(0.0, 1.0)
        presence = torch.sigmoid(det["presence_logits"].float())
        findings = torch.where(self.prompt_valid.unsqueeze(0), probs, torch.full_like(probs, self.pad_value))
        anatomy_rows = torch.cat([presence.unsqueeze(-1), corners, abnormality.unsqueeze(-1), findings], dim=-1)

        study_row = torch.full([b, 1, self.num_columns], self.pad_value, dtype=torch.float32, device=image.device)
        first = 2 + 2 * self.spatial_dims
        study_row[:, 0, first : first + self.num_study_findings] = study
        return torch.cat([anatomy_rows, study_row], dim=1)


def script_deploy(model: Union[AnatomyVLPModel, DeployWrapper]) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the deploy wrapper (of ``model``, or ``model`` itself if already wrapped)."""
    wrapper = model if isinstance(model, DeployWrapper) else DeployWrapper(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 warns that torch.jit.script is deprecated
        return torch.jit.script(wrapper)


def _export_files(wrapper: DeployWrapper, extra_files: Optional[Dict[str, str]]) -> Dict[str, str]:
    """``layout.json`` (the layout plus the current thresholds) and ``extra_files``: the extra files of an export."""
    layout = json.loads(wrapper.layout_json)
    layout["thresholds"] = wrapper.thresholds.tolist()
    layout["study_thresholds"] = wrapper.study_thresholds.tolist()
    files = {"layout.json": json.dumps(layout)}
    files.update(extra_files or {})
    return files


def export_torchscript(
    model: Union[AnatomyVLPModel, DeployWrapper],
    path: Union[str, Path],
    extra_files: Optional[Dict[str, str]] = None,
) -> Path:
    """Script the deploy wrapper and save it with ``extra/layout.json`` (the layout plus the current
    ``thresholds`` / ``study_thresholds``) and any ``extra_files`` (name -> text, e.g. ``metadata.json``).

    Returns:
        the written path.
    """
    wrapper = model if isinstance(model, DeployWrapper) else DeployWrapper(model)
    if not bool(wrapper.prompts_set):
        warnings.warn(
            "export_torchscript: the model's prompt embeddings were never set (set_prompt_bank): "
            "every finding probability of the exported model will be 0.5",
            stacklevel=2,
        )
    scripted = script_deploy(wrapper)
    files = _export_files(wrapper, extra_files)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 warns that torch.jit.save is deprecated
        torch.jit.save(scripted, str(path), _extra_files=files)
    return path


def export_program(
    model: Union[AnatomyVLPModel, DeployWrapper],
    path: Union[str, Path],
    example: Optional[torch.Tensor] = None,
    extra_files: Optional[Dict[str, str]] = None,
    check_atol: float = 1e-4,
) -> Path:
    """``torch.export`` the deploy wrapper (TorchScript's successor) and save it as a ``.pt2`` archive.

    The program is exported for the model's input size (``example``: default a random
    ``(1, C, *img_size)``; preprocessing always yields that size), with ``layout.json`` (as in
    :func:`export_torchscript`) and ``extra_files`` inside. Region sizes stay data-dependent in
    the program (no guard on them), so it is valid for any image of that size; before saving, its
    output on a second random image is compared with the eager wrapper's.

    Raises:
        RuntimeError: when the exported program and the eager model differ by more than ``check_atol``.

    Returns:
        the written path (load with ``torch.export.load(path).module()``).
    """
    wrapper = model if isinstance(model, DeployWrapper) else DeployWrapper(model)
    size = [int(v) for v in wrapper.backbone.img_size]
    channels = wrapper.in_channels
    g = torch.Generator().manual_seed(0)
    x = example if example is not None else torch.rand([1, channels] + size, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapper, (x,))
    check = torch.rand(x.shape, generator=g)
    with torch.no_grad():
        diff = (program.module()(check) - wrapper(check)).abs().max().item()
    if not diff <= check_atol:
        raise RuntimeError(f"export_program: exported and eager outputs differ by {diff:g} (> {check_atol:g})")
    files = _export_files(wrapper, extra_files)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path), extra_files=files)
    return path
