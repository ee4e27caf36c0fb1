"""The anatomy vision-language model: AnatomyViT + box head + region pooling + normality prior + projections.

::

    image (B, 1, *S) ──AnatomyViT──> [CLS] (B, D), queries (B, M, D), patch tokens (B, N, D),
                                     stem features (B, C, *S // stem_stride)
      queries ──BoxHead──> boxes (B, M, 2d) normalised (cx, cy, [cz], w, h, [d]), presence logits
      region of anatomy i: its given mask, or its predicted box (see ``regions`` below)
      RegionPooling ──> region feature = [query ; mean ; max of the region's tokens]   (B, M, 3D)
      NormalityPrior(per-patch features inside the region, detached) ──> residual statistics
                                     (mean residual of the worst patches ; worst residual) + score
      region statistics (region_stats.py): log volume, mean, spread, log density histogram of the
                    region's voxels, standardised per anatomy (running moments)
      RegionFusion: concat(region feature, slog(residual stats), log1p(score), statistics) -> MLP
                    -> unit vector ("fused = f(original, original - reconstruction)")   region_emb (B, M, E)
      [CLS] ──Projection──> cls_emb (B, E)
      zero-shot: region_emb vs the (anatomy, finding) prompt ensembles, cls_emb vs study prompts

Regions (``forward(..., regions=...)``):

- ``"predicted"``: every anatomy's region is its predicted box rasterised onto the token grid
  (and onto the prior's grid). Image only; what the deploy wrapper does.
- ``"mask"``: the given ``anatomy`` masks (max-pooled onto each grid); an empty mask gives an
  empty region (the region feature is then the query alone and the prior sees no patch).
- ``"auto"`` (default): the given mask where it is non-empty, the predicted box elsewhere (e.g.
  anatomies without a mask in this sample); without ``anatomy`` this is ``"predicted"``.

Boxes are detached before they define regions: the box losses train the boxes, alignment losses
must not move them to convenient tokens.

Second view for the disease-level contrastive term (``region_emb_view2``): the region pooled
over a random subset of its tokens (each kept with probability ``view2_keep``; a region that
would lose every token keeps them all), projected with an independent dropout mask, from the
SAME backbone pass. A second backbone pass on a second augmentation would be closer to
ViSD-Boost but doubles the cost of every step; token dropout perturbs exactly the part of the
feature that carries the region content (mean and max of its tokens) for the cost of one more
pooling. In eval mode the second view is ``region_emb`` itself (no randomness).

DDP: every parameter takes part in every forward (no branch depends on the data; the regions
mode, ``self.training`` and the model's configuration are the same on every rank). Which
parameters receive a gradient depends on the enabled loss terms: a stage that disables terms
(e.g. detection only) leaves the projections, logit scales and the prior's MLPs without gradient,
so either wrap with ``DistributedDataParallel(..., find_unused_parameters=True)`` or build the
criterion with ``connect_all_outputs=True`` (``losses.criterion.build_criterion``), which adds
``0 * sum`` of every output so each parameter gets a (zero) gradient. The prior's collectives
(``ddp_sync``) are called once per training forward on every rank.
"""

from __future__ import annotations

import math

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from torch.utils.checkpoint import checkpoint

from ..data.catalog import Catalog, load_catalog, mirror_index
from ..losses.alignment import zero_shot_logits
from ..losses.contrastive import LogitScale
from .anatomy_vit import AnatomyViT, masks_to_token_mask
from .box_ops import boxes_to_token_mask
from .heads import BoxHead, Projection, RegionPooling, SegmentationHead
from .normality_prior import NormalityPrior, calibrated_abnormality
from .region_stats import (
    STRUCTURE_MAPS,
    RunningStandardize,
    background_dim,
    background_statistics,
    background_weights,
    predicted_statistics_ensemble,
    region_statistics,
    stats_dim,
    stats_input,
)

__all__ = [
    "AnatomyVLPModel",
    "RegionFusion",
    "DEFAULT_PRIOR",
    "REGION_MODES",
    "prior_summary_features",
    "abnormality_from_score",
    "max_finding_probability",
]

#: NormalityPrior options used when ``prior`` is not given (see :class:`NormalityPrior`).
DEFAULT_PRIOR: Dict[str, Any] = {"codes_per_anatomy": 64, "code_dim": 64, "hidden_dim": 128, "top_k": 4}
REGION_MODES = ("auto", "mask", "predicted")
PRIOR_INPUTS = ("stem", "tokens", "image")
#: Which prior cells belong to a region: any cell touching it, or only cells entirely inside it.
PRIOR_CELLS = ("any", "interior")


# --------------------------------------------------------------------------------------------- helpers
def prior_summary_features(residual_stats: torch.Tensor, anatomy_score: torch.Tensor) -> torch.Tensor:
    """Per-anatomy prior features fused with the region feature.

    ``concat(sign(r) * log1p(|r|), log1p(score))``: residuals of an abnormal patch can be tens of
    (normal) standard deviations; the signed log keeps their sign and order but stops them from
    swamping the region feature.

    Args:
        residual_stats: ``(B, M, 2C)`` from :class:`NormalityPrior`.
        anatomy_score: ``(B, M)`` worst patch error (>= 0).

    Returns:
        ``(B, M, 2C + 1)`` float32.
    """
    r = residual_stats.float()
    slog = torch.sign(r) * torch.log1p(r.abs())
    return torch.cat([slog, torch.log1p(anatomy_score.float().clamp(min=0.0)).unsqueeze(-1)], dim=-1)


def abnormality_from_score(score: torch.Tensor, quantiles: torch.Tensor, calibrated: torch.Tensor) -> torch.Tensor:
    """Abnormality in ``[0, 1]`` from the prior's worst-patch score.

    Calibrated (``calibrated`` true): the score's percentile among normal validation anatomies of
    the same kind (:func:`calibrated_abnormality`). Not calibrated yet: ``score / (1 + score)``,
    monotone in the score but not comparable across anatomies.

    Args:
        score: ``(B, M)`` anatomy scores.
        quantiles: ``(M, Q)`` per-anatomy quantiles.
        calibrated: 0-d bool tensor.
    """
    score = score.float()
    fallback = score / (1.0 + score.clamp(min=0.0))
    return torch.where(calibrated, calibrated_abnormality(score, quantiles), fallback)


def max_finding_probability(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, M)`` largest finding probability of each anatomy (0 for an anatomy without findings).

    The abnormality of the "no prior" ablation.

    Args:
        probs: ``(B, M, F)`` finding probabilities.
        valid: ``(M, F)`` bool, which (anatomy, finding) exist.
    """
    masked = torch.where(valid.unsqueeze(0), probs, torch.zeros_like(probs))
    if probs.shape[-1] == 0:
        return torch.zeros(probs.shape[0], probs.shape[1], device=probs.device, dtype=probs.dtype)
    return masked.amax(dim=-1)


class StudyStatistics(nn.Module):
    """The study-level statistics path: what no anatomy region and no [CLS] token carries.

    The background's statistics (:func:`~.region_stats.background_statistics`: the voxels outside
    every anatomy region, over the full range and the backbone's intensity windows), standardised
    with running moments, through an MLP whose output is added to the [CLS] projection before it
    is normalised. Study findings are scored from that embedding; a diffuse one such as ascites
    (fluid along the peritoneum, in the fat between the organs) scored 0.43 from [CLS] alone in
    the default run, while a logistic probe on the background row reaches 0.96 (given masks).

    ``forward(stats (B, dim), valid (B,) bool)`` -> ``(B, embed_dim)`` (not normalised).
    """

    def __init__(self, dim: int, hidden_dim: int, embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = int(dim)
        self.standardize = RunningStandardize(1, self.dim)
        self.mlp = nn.Sequential(nn.Linear(self.dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim))

    def forward(self, stats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        z = self.standardize(stats.unsqueeze(1), valid.unsqueeze(1))[:, 0]
        return self.mlp(z).float()


class RegionFusion(nn.Module):
    """Fuse the region feature with the prior's per-anatomy features and the region statistics,
    and project into text space.

    Two paths, summed, then L2-normalised:

    - token path: ``MLP(dropout_in(concat(region_feature, prior_features)))`` (ViSD-Boost fuses
      original and prior features with a per-organ MLP);
    - statistics path: ``MLP(standardised region statistics)``.

    Why two paths (measured on cached synthetic-CT statistics, a head trained with the
    prompt-pair loss alone for the 720 steps of a default run): one MLP over the concatenation of
    the 35 statistics with ~700 token and prior features reached mean test AUC 0.67 — with 180
    training cases the high-dimensional token features let the MLP memorise cases instead of
    reading the statistics (0.87 on the statistics alone); separate paths gave 0.84, and with
    ``feature_dropout`` 0.5 on the token-path input and ``path_dropout`` 0.5 (the whole token
    path dropped for a sample) 0.88.

    Args:
        region_dim: width of the pooled region feature (``3 * hidden_size``).
        prior_dim: width of :func:`prior_summary_features` (``2C + 1``), 0 without a prior.
        embed_dim: text embedding width.
        hidden_dim: MLP hidden width.
        dropout: dropout before each path's last layer (training only).
        stats_dim: width of :func:`~.region_stats.region_statistics` (0: no statistics path).
        num_anatomies: ``M`` (the statistics are standardised per anatomy).
        feature_dropout: dropout on the token-path input (training only).
        path_dropout: probability that a sample's token path is dropped in training (only with
            a statistics path).
        mirror: optional index of each anatomy's left-right counterpart
            (:func:`~anatomy_vlp_bundle.data.catalog.mirror_index`): the statistics path then also
            reads each region's standardised statistics minus its counterpart's (a reader's
            symmetry cue; ``2 * stats_dim`` inputs).

    ``standardize(stats (B, M, stats_dim), valid (B, M))`` standardises the statistics (and, in
    training, updates the running moments: call it once per forward);
    ``forward(region_feat (B, M, region_dim), prior_feat (B, M, prior_dim), stats=None)`` ->
    ``(B, M, embed_dim)`` unit vectors, with ``stats`` the standardised statistics.
    """

    def __init__(
        self,
        region_dim: int,
        prior_dim: int,
        embed_dim: int,
        hidden_dim: int,
        dropout: float = 0.0,
        stats_dim: int = 0,
        num_anatomies: int = 1,
        feature_dropout: float = 0.0,
        path_dropout: float = 0.0,
        mirror: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        for name, value in (("feature_dropout", feature_dropout), ("path_dropout", path_dropout)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"RegionFusion: {name} must be in [0, 1), got {value}")
        self.region_dim = int(region_dim)
        self.prior_dim = int(prior_dim)
        self.stats_dim = int(stats_dim)
        self.path_dropout = float(path_dropout) if self.stats_dim > 0 else 0.0
        self.stats: Optional[RunningStandardize] = RunningStandardize(num_anatomies, stats_dim) if stats_dim > 0 else None
        # left-right differences: each region's standardised statistics minus its counterpart's
        self.contralateral = mirror is not None and self.stats_dim > 0
        if mirror is not None and len(mirror) != int(num_anatomies):
            raise ValueError(f"RegionFusion: mirror needs one index per anatomy ({num_anatomies}), got {len(mirror)}")
        order = list(mirror) if mirror is not None else list(range(int(num_anatomies)))
        self.register_buffer("mirror", torch.tensor(order, dtype=torch.long), persistent=False)
        stats_in = self.stats_dim * (2 if self.contralateral else 1)
        self.token_path = nn.Sequential(
            nn.Dropout(float(feature_dropout)),
            nn.Linear(region_dim + prior_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, embed_dim),
        )
        self.stats_path: Optional[nn.Sequential] = None
        if self.stats_dim > 0:
            self.stats_path = nn.Sequential(
                nn.Linear(stats_in, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim)
            )

    def standardize(self, stats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.stats is None:
            return stats
        x = self.stats(stats, valid)
        if self.contralateral:
            x = torch.cat([x, x - x.index_select(1, self.mirror)], dim=-1)
        return x

    def forward(self, region_feat: torch.Tensor, prior_feat: torch.Tensor, stats: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = torch.cat([region_feat.float(), prior_feat.to(torch.float32)], dim=-1).to(region_feat.dtype)
        out = self.token_path(x).float()
        if self.training and self.path_dropout > 0.0:
            keep = torch.rand([out.shape[0], 1, 1], device=out.device) >= self.path_dropout
            out = out * keep.to(out.dtype)
        stats_path = self.stats_path
        if stats is not None and stats_path is not None:
            out = out + stats_path(stats.to(torch.float32)).float()
        # normalise in float32: bf16 unit vectors lose ~3 digits of cosine similarity
        return F.normalize(out, dim=-1)

    def forward_ensemble(self, region_feat: torch.Tensor, prior_feat: torch.Tensor, stats: List[torch.Tensor]) -> torch.Tensor:
        """The direction of the mean of :meth:`forward`'s unit vectors over several standardised
        statistics ``stats`` of the same regions (eval mode: no dropout; the token path once).
        With one entry, equal to :meth:`forward`."""
        x = torch.cat([region_feat.float(), prior_feat.to(torch.float32)], dim=-1).to(region_feat.dtype)
        tokens = self.token_path(x).float()
        stats_path = self.stats_path
        if stats_path is None or len(stats) == 0:
            return F.normalize(tokens, dim=-1)
        acc = torch.zeros_like(tokens)
        for st in stats:
            acc = acc + F.normalize(tokens + stats_path(st.to(torch.float32)).float(), dim=-1)
        return F.normalize(acc, dim=-1)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind a MONAI ``MetaTensor`` (other tensors unchanged)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _region_tokens(
    boxes: torch.Tensor,
    grid: List[int],
    mask_tokens: Optional[torch.Tensor],
    regions: str,
    soft: bool,
) -> torch.Tensor:
    """``(B, M, N)`` float token weights of each region on ``grid`` (see the module docstring)."""
    box_tokens = boxes_to_token_mask(boxes.detach(), grid, soft).to(torch.float32)
    if mask_tokens is None:
        return box_tokens
    mask_f = mask_tokens.to(torch.float32)
    if regions == "mask":
        return mask_f
    return torch.where(mask_tokens.any(dim=-1, keepdim=True), mask_f, box_tokens)


# --------------------------------------------------------------------------------------------- model
def image_patches(image: torch.Tensor, patch: List[int]) -> torch.Tensor:
    """Non-overlapping patches of the input as channels: ``(B, C, *S)`` -> ``(B, C * prod(patch), *S // patch)``.

    TorchScript-compatible (used by the deploy wrapper too).
    """
    b, c = image.shape[0], image.shape[1]
    shape: List[int] = [b, c]
    grid: List[int] = []
    volume = 1
    for i in range(len(patch)):
        g = int(image.shape[2 + i]) // patch[i]
        grid.append(g)
        shape += [g, patch[i]]
        volume *= patch[i]
    x = image.reshape(shape)
    d = len(patch)
    # (B, C, g1, p1, g2, p2[, g3, p3]) -> (B, C, p1, p2[, p3], g1, g2[, g3])
    order: List[int] = [0, 1]
    for i in range(d):
        order.append(3 + 2 * i)
    for i in range(d):
        order.append(2 + 2 * i)
    return x.permute(order).reshape([b, c * volume] + grid)


class AnatomyVLPModel(nn.Module):
    """Anatomy-aware vision-language model (2D CXR or 3D CT); see the module docstring.

    Args:
        catalog: the anatomy catalog (``Catalog``, dict, built-in name or ``.json`` path); its
            anatomy order is the query order and its findings define the prompt buffers.
        spatial_dims: 2 or 3; default the catalog's (a mismatch raises).
        img_size: input size the position embedding is built for (other multiples of the patch
            size work, the embedding is interpolated).
        patch_size: token size (int or one per axis).
        hidden_size, num_layers, num_heads, mlp_dim: transformer width, depth, heads, MLP width.
        embed_dim: text embedding width (384 for the packaged MiniLM).
        conv_stem: convolutional stem (keeps small lesions; its features feed the prior).
        stem_channels: channels of the two stem stages.
        pos_embed: ``"learnable"`` or ``"sincos"``.
        prior: :class:`NormalityPrior` options (``codes_per_anatomy``, ``code_dim``, ``hidden_dim``,
            ``top_k``, ``decay``, ``commitment_cost``, ``ddp_sync``, ...); default
            :data:`DEFAULT_PRIOR`; ``None`` = the "no prior" ablation (region feature alone).
        prior_cells: ``"any"`` (every prior cell touching the region) or ``"interior"`` (only cells
            entirely inside the mask or predicted box).
        prior_on: ``"stem"`` (default: the stem's early per-patch features, finer than the token
            grid when ``conv_stem``), ``"image"`` (the raw voxels of each stem-stride patch, e.g.
            4 x 4 x 4 = 64 values: features that do not drift while the backbone trains, as in the
            design's measured patch prior) or ``"tokens"`` (the final patch tokens on the token grid).
        region_stats: histogram bins of the region statistics fused with the region feature
            (volume, mean, spread and density histogram of the region's voxels, see
            :mod:`.region_stats`); 0 = off (the "no region statistics" ablation).
        focal_scales: Gaussian sigmas (voxels, 0 = unsmoothed) of the focal statistics appended to
            the region statistics (:func:`~.region_stats.focal_statistics`); empty = none.
        focal_depth: interior depth (face steps from the region's border) of the voxels the focal
            statistics read (1: the face neighbours share the label; 2: the border's second layer,
            where a predicted mask's error puts neighbouring tissue, is left out as well).
        feature_dropout: :class:`RegionFusion` dropout on the token-path input (training only).
        path_dropout: :class:`RegionFusion` probability that a sample's token path is dropped in
            training (the statistics path is kept).
        prompt_adapter: a learned linear map (identity at start) applied to every prompt
            embedding before scoring (:meth:`adapt_prompts`; the deploy wrapper applies it too).
        segmentation: a per-anatomy mask head at half the stem stride (:class:`SegmentationHead`,
            output ``mask_logits``): image-only region statistics are taken over the predicted
            masks instead of the boxes. Without ``conv_stem`` the stem grid is the token grid.
        stats_from_prediction: in training with given masks, the fraction of samples whose region
            statistics come from the predicted masks instead (so the fusion learns the statistics it
            will see image-only; detached, the masks are trained by the ``detection.mask`` loss).
        stats_threshold: mask logit above which a voxel belongs to a predicted region of the
            statistics path (0 = probability 0.5; higher keeps the masks' confident core, away from
            the uncertain border where neighbouring tissue leaks into the statistics). The mask
            loss, the Dice and the exported label maps keep 0.
        stats_ensemble: image only, in eval mode: mask logits at which the predicted masks are cut
            for the statistics path, one cut each, and the fused region embeddings averaged
            (:func:`~.region_stats.predicted_statistics_ensemble`: a test-time ensemble over the
            regions' extent); empty: the one cut at ``stats_threshold``. Training, given masks and
            the study path are unaffected.
        study_stats: a study-level statistics path (:class:`StudyStatistics`): the statistics of
            the voxels outside every anatomy region, added to the [CLS] projection (study findings
            such as ascites). Needs ``region_stats``; off for a catalog without study findings.
        stats_views: the region statistics (histogram rows and focal features) of every intensity
            view the stem sees (:meth:`~.anatomy_vit.AnatomyViT.window_views`: the image and each of
            its ``input_windows``) instead of the image alone; with a CT soft-tissue window, bins of
            12 HU where the full range has 62 HU (see :func:`~.region_stats.region_statistics`).
        structure_sigmas: 2D only: Gaussian scales (pixels) of Hessian line and blob maps appended
            as further statistics views (:func:`~.region_stats.structure_views`): the ridges of plate
            atelectasis, the blobs of consolidation, which a radiograph's own intensities hide
            among ribs and vessels. ``()`` (default): none; the CXR config: ``[1, 2, 4]``.
        stats_contralateral: the statistics path also reads each region's standardised statistics
            minus those of its left-right counterpart (:class:`RegionFusion` ``mirror``).
        stats_source_flag: append to each region's statistics whether they were taken over a
            predicted (1) or a given (0) mask, so the fusion can read the two differently
            (predicted masks of thin organs hold neighbouring tissue that given masks exclude).
        mask_guided_attention: when masks define the regions, each query attends only to [CLS],
            itself and its region's tokens (fVLM). Image-only inference then differs from training
            (no masks): meant for mask-mode training and evaluation.
        dropout: dropout inside the transformer (training only).
        head_dropout: dropout inside the projections (training only).
        proj_hidden_dim: hidden width of the projection MLPs (default ``2 * hidden_size``).
        box_layers: layers of the box MLP.
        soft_boxes: image-only regions weight tokens by the fraction covered by the box.
        view2_keep: probability that a region token is kept in the second view.
        init_temperature: initial temperature of both logit scales (fVLM: 0.07).
        min_temperature, max_temperature: clamp range of the temperatures.
        global_bias_init: initial value of the learnable bias of the global [CLS] loss.
        gradient_checkpointing: recompute activations in backward: the conv stem's, the transformer
            blocks' and the mask head's (``backbone.set_gradient_checkpointing`` switches all three).
        in_channels: image channels.
        attention: the backbone's attention: ``"auto"`` (default: the math path under CPU bf16
            autocast, SDPA otherwise), ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"math"``
            (explicit matmul-softmax; same result). Checkpoints saved before this argument existed
            load with the default.
        input_windows: extra intensity windows ``(low, high)`` in the input's units, appended as
            channels to the stem's and the mask head's input (:class:`AnatomyViT`); the region
            statistics stay on the image itself unless ``stats_views``. ``None`` (default): none.
        segmentation_decoder: the mask head's decoder, ``"light"`` (default; one convolution per
            grid) or ``"deep"`` (two per grid, wider at the fine grid) (:class:`SegmentationHead`).
        mask_refine: the mask head's full-resolution stage (``SegmentationHead(refine=True)``):
            ``mask_logits`` then come on the input grid.
    """

    def __init__(
        self,
        catalog: Union[Catalog, Mapping, str],
        spatial_dims: Optional[int] = None,
        img_size: Union[int, Sequence[int]] = (80, 64, 64),
        patch_size: Union[int, Sequence[int]] = 8,
        hidden_size: int = 192,
        num_layers: int = 4,
        num_heads: int = 6,
        mlp_dim: Optional[int] = None,
        embed_dim: int = 384,
        conv_stem: bool = True,
        stem_channels: Sequence[int] = (32, 64),
        pos_embed: str = "learnable",
        prior: Optional[Mapping[str, Any]] = DEFAULT_PRIOR,
        prior_on: str = "stem",
        prior_cells: str = "any",
        region_stats: int = 32,
        focal_scales: Sequence[float] = (0.0, 2.0),
        focal_depth: int = 1,
        feature_dropout: float = 0.5,
        path_dropout: float = 0.5,
        prompt_adapter: bool = True,
        segmentation: bool = True,
        stats_from_prediction: float = 0.25,
        stats_threshold: float = 0.0,
        stats_ensemble: Sequence[float] = (),
        stats_source_flag: bool = False,
        stats_views: bool = False,
        structure_sigmas: Sequence[float] = (),
        stats_contralateral: bool = False,
        study_stats: bool = False,
        mask_guided_attention: bool = False,
        dropout: float = 0.0,
        head_dropout: float = 0.0,
        proj_hidden_dim: Optional[int] = None,
        box_layers: int = 3,
        soft_boxes: bool = False,
        view2_keep: float = 0.5,
        init_temperature: float = 0.07,
        min_temperature: float = 0.001,
        max_temperature: float = 0.5,
        global_bias_init: float = 0.0,
        gradient_checkpointing: bool = False,
        in_channels: int = 1,
        attention: str = "auto",
        input_windows: Optional[Sequence[Sequence[float]]] = None,
        segmentation_decoder: str = "light",
        mask_refine: bool = False,
    ) -> None:
        super().__init__()
        cat = load_catalog(dict(catalog) if isinstance(catalog, Mapping) else catalog)
        dims = cat.spatial_dims if spatial_dims is None else int(spatial_dims)
        if dims != cat.spatial_dims:
            raise ValueError(
                f"AnatomyVLPModel: spatial_dims={dims} but catalog {cat.name!r} is {cat.modality} "
                f"({cat.spatial_dims}D)"
            )
        if prior_on not in PRIOR_INPUTS:
            raise ValueError(f"AnatomyVLPModel: prior_on must be one of {PRIOR_INPUTS}, got {prior_on!r}")
        if not 0.0 < view2_keep <= 1.0:
            raise ValueError(f"AnatomyVLPModel: view2_keep must be in (0, 1], got {view2_keep}")
        if prior is not None and not isinstance(prior, Mapping):
            raise TypeError(f"AnatomyVLPModel: prior must be a dict of NormalityPrior options or None, got {type(prior).__name__}")

        self.catalog = cat
        self.spatial_dims = dims
        self.num_anatomies = cat.num_anatomies
        self.num_findings = cat.max_findings
        self.num_study_findings = len(cat.study_findings)
        self.embed_dim = int(embed_dim)
        self.prior_on = prior_on
        if prior_cells not in PRIOR_CELLS:
            raise ValueError(f"AnatomyVLPModel: prior_cells must be one of {PRIOR_CELLS}, got {prior_cells!r}")
        self.prior_cells = prior_cells
        self.mask_guided_attention = bool(mask_guided_attention)
        self.soft_boxes = bool(soft_boxes)
        self.view2_keep = float(view2_keep)
        # False: the prior is not fitted in this stage (it gets no normal anatomy: no losses, no
        # codebook or statistics updates) but still scores every region (see set_prior_fitting)
        self.fit_prior = True
        # plain-type record of the constructor arguments (checkpoint "model_config")
        self.config: Dict[str, Any] = {
            "catalog": cat.to_dict(),
            "spatial_dims": dims,
            "img_size": list(img_size) if not isinstance(img_size, int) else img_size,
            "patch_size": list(patch_size) if not isinstance(patch_size, int) else patch_size,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "mlp_dim": mlp_dim,
            "embed_dim": embed_dim,
            "conv_stem": conv_stem,
            "stem_channels": list(stem_channels),
            "pos_embed": pos_embed,
            "prior": None if prior is None else copy.deepcopy(dict(prior)),
            "prior_on": prior_on,
            "prior_cells": prior_cells,
            "region_stats": region_stats,
            "focal_scales": [float(v) for v in focal_scales],
            "focal_depth": int(focal_depth),
            "feature_dropout": feature_dropout,
            "path_dropout": path_dropout,
            "prompt_adapter": prompt_adapter,
            "segmentation": segmentation,
            "stats_from_prediction": stats_from_prediction,
            "stats_threshold": float(stats_threshold),
            "stats_ensemble": [float(v) for v in stats_ensemble],
            "stats_source_flag": bool(stats_source_flag),
            "stats_views": bool(stats_views),
            "structure_sigmas": [float(v) for v in structure_sigmas],
            "stats_contralateral": bool(stats_contralateral),
            "study_stats": bool(study_stats),
            "mask_guided_attention": mask_guided_attention,
            "dropout": dropout,
            "head_dropout": head_dropout,
            "proj_hidden_dim": proj_hidden_dim,
            "box_layers": box_layers,
            "soft_boxes": soft_boxes,
            "view2_keep": view2_keep,
            "init_temperature": init_temperature,
            "min_temperature": min_temperature,
            "max_temperature": max_temperature,
            "global_bias_init": global_bias_init,
            "gradient_checkpointing": gradient_checkpointing,
            "in_channels": in_channels,
            "attention": attention,
            "input_windows": None if input_windows is None else [[float(v) for v in w] for w in input_windows],
            "segmentation_decoder": segmentation_decoder,
            "mask_refine": bool(mask_refine),
        }

        m = self.num_anatomies
        self.backbone = AnatomyViT(
            dims,
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            num_anatomies=m,
            dropout=dropout,
            pos_embed=pos_embed,
            conv_stem=conv_stem,
            gradient_checkpointing=gradient_checkpointing,
            stem_channels=stem_channels,
            attention=attention,
            input_windows=input_windows,
        )
        self.box_head = BoxHead(hidden_size, dims, num_layers=box_layers)
        self.pooling = RegionPooling(hidden_size, soft_boxes=soft_boxes, detach_boxes=True)

        self.prior: Optional[NormalityPrior]
        prior_dim = 0
        if prior is not None:
            if prior_on == "stem":
                feature_dim = self.backbone.stem_channels
            elif prior_on == "image":
                feature_dim = in_channels * math.prod(self.backbone.stem_stride)
            else:
                feature_dim = hidden_size
            self.prior = NormalityPrior(feature_dim, m, **dict(prior))
            prior_dim = 2 * feature_dim + 1
        else:
            self.prior = None
        proj_hidden = 2 * hidden_size if proj_hidden_dim is None else int(proj_hidden_dim)
        if int(region_stats) < 0:
            raise ValueError(f"AnatomyVLPModel: region_stats (histogram bins) must be >= 0, got {region_stats}")
        self.region_stats_bins = int(region_stats)
        self.focal_scales: List[float] = [float(v) for v in focal_scales] if self.region_stats_bins > 0 else []
        if any(v < 0 for v in self.focal_scales):
            raise ValueError(f"AnatomyVLPModel: focal_scales are Gaussian sigmas in voxels (>= 0), got {list(focal_scales)}")
        if int(focal_depth) < 1:
            raise ValueError(f"AnatomyVLPModel: focal_depth must be >= 1 (face steps), got {focal_depth}")
        self.focal_depth = int(focal_depth)
        if not 0.0 <= float(stats_from_prediction) <= 1.0:
            raise ValueError(f"AnatomyVLPModel: stats_from_prediction must be in [0, 1], got {stats_from_prediction}")
        self.stats_from_prediction = float(stats_from_prediction)
        if not math.isfinite(float(stats_threshold)):
            raise ValueError(f"AnatomyVLPModel: stats_threshold must be a finite mask logit, got {stats_threshold}")
        self.stats_threshold = float(stats_threshold)
        if not all(math.isfinite(float(v)) for v in stats_ensemble):
            raise ValueError(f"AnatomyVLPModel: stats_ensemble must be finite mask logits, got {list(stats_ensemble)}")
        self.stats_ensemble: List[float] = [float(v) for v in stats_ensemble]
        self.stats_source_flag = bool(stats_source_flag) and self.region_stats_bins > 0
        self.stats_views = bool(stats_views) and self.region_stats_bins > 0
        n_views = 1 + int(self.backbone.window_bounds.shape[0])
        self.structure_sigmas: List[float] = [float(v) for v in structure_sigmas] if self.region_stats_bins > 0 else []
        if len(self.structure_sigmas) > 0 and dims != 2:
            raise ValueError(f"AnatomyVLPModel: structure_sigmas (Hessian maps of a radiograph) are 2D only, got spatial_dims={dims}")
        if not all(math.isfinite(v) and v > 0 for v in self.structure_sigmas):
            raise ValueError(f"AnatomyVLPModel: structure_sigmas are Gaussian scales in pixels (> 0), got {list(structure_sigmas)}")
        stats_views_n = n_views if self.stats_views else 1
        if len(self.structure_sigmas) > 0:
            stats_views_n += STRUCTURE_MAPS * len(self.structure_sigmas)
        self.seg_head: Optional[SegmentationHead] = None
        if segmentation:
            self.seg_head = SegmentationHead(
                dims, self.backbone.stem_channels, hidden_size, m, self.backbone.stem_stride,
                self.backbone.stem_in_channels, early_channels=self.backbone.early_channels, decoder=segmentation_decoder,
                refine=bool(mask_refine),
            )
        self.region_proj = RegionFusion(
            self.pooling.out_dim,
            prior_dim,
            embed_dim,
            proj_hidden,
            head_dropout,
            stats_dim(self.region_stats_bins, len(self.focal_scales), stats_views_n) + int(self.stats_source_flag),
            m,
            feature_dropout=feature_dropout,
            path_dropout=path_dropout,
            mirror=mirror_index(cat.names) if stats_contralateral else None,
        )
        # a learned linear map of every prompt embedding (identity at start), CLIP's text projection
        # for a frozen text encoder: the positive-minus-negative directions of one anatomy's findings
        # are nearly parallel in MiniLM (cosine ~0.9), which a shared map can pull apart
        self.prompt_adapter: Optional[nn.Linear] = None
        if prompt_adapter:
            self.prompt_adapter = nn.Linear(embed_dim, embed_dim, bias=False)
            with torch.no_grad():
                self.prompt_adapter.weight.copy_(torch.eye(embed_dim))
        self.cls_proj = Projection(hidden_size, embed_dim, hidden_dim=proj_hidden, dropout=head_dropout)
        self.study_stats: Optional[StudyStatistics] = None
        if study_stats and self.region_stats_bins > 0 and self.num_study_findings > 0:
            self.study_stats = StudyStatistics(background_dim(self.region_stats_bins, n_views), proj_hidden, embed_dim, head_dropout)

        self.logit_scale = LogitScale(init_temperature, min_temperature, max_temperature)
        self.disease_logit_scale = LogitScale(init_temperature, min_temperature, max_temperature)
        self.logit_bias = nn.Parameter(torch.tensor(float(global_bias_init)))

        # prompt buffers: shapes follow from the catalog alone, so a state dict loads strictly
        # before any prompt bank is set (PromptBank layout: text/prompts.py)
        from ..text.prompts import build_prompt_texts  # local: text.prompts imports losses

        texts = build_prompt_texts(cat)
        f, s, k = self.num_findings, self.num_study_findings, len(texts.global_findings)
        self.global_findings: List[str] = list(texts.global_findings)
        self.register_buffer("prompt_pos", torch.zeros(m, f, embed_dim))
        self.register_buffer("prompt_neg", torch.zeros(m, f, embed_dim))
        self.register_buffer("prompt_valid", texts.valid.clone())
        self.register_buffer("study_pos", torch.zeros(s, embed_dim))
        self.register_buffer("study_neg", torch.zeros(s, embed_dim))
        self.register_buffer("global_emb", torch.zeros(k, embed_dim))
        self.register_buffer("global_membership", texts.global_membership.clone())
        self.register_buffer("global_study_index", texts.global_study_index.clone())
        self.register_buffer("prompts_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("thresholds", torch.full((m, f), 0.5))
        self.register_buffer("study_thresholds", torch.full((s,), 0.5))

    # ------------------------------------------------------------------------------------ setup
    def set_prompt_bank(self, bank: Any) -> None:
        """Copy a :class:`~anatomy_vlp_bundle.text.prompts.PromptBank` (or its ``to_state()`` dict)
        into the persistent prompt buffers.

        Raises:
            ValueError: when the bank was built for another catalog or embedding width.
        """
        state = bank.to_state() if hasattr(bank, "to_state") else dict(bank)
        expected = {
            "pos": self.prompt_pos.shape,
            "neg": self.prompt_neg.shape,
            "valid": self.prompt_valid.shape,
            "study_pos": self.study_pos.shape,
            "study_neg": self.study_neg.shape,
            "global_emb": self.global_emb.shape,
            "global_membership": self.global_membership.shape,
            "global_study_index": self.global_study_index.shape,
        }
        for key, shape in expected.items():
            if key not in state:
                raise ValueError(f"set_prompt_bank: the prompt bank has no {key!r}")
            if tuple(state[key].shape) != tuple(shape):
                raise ValueError(
                    f"set_prompt_bank: {key!r} has shape {tuple(state[key].shape)}, the model (catalog "
                    f"{self.catalog.name!r}, embed_dim {self.embed_dim}) needs {tuple(shape)}"
                )
        if not torch.equal(state["valid"].bool().cpu(), self.prompt_valid.cpu()):
            raise ValueError(f"set_prompt_bank: the bank's (anatomy, finding) layout differs from catalog {self.catalog.name!r}")
        with torch.no_grad():
            self.prompt_pos.copy_(state["pos"])
            self.prompt_neg.copy_(state["neg"])
            self.study_pos.copy_(state["study_pos"])
            self.study_neg.copy_(state["study_neg"])
            self.global_emb.copy_(state["global_emb"])
            self.global_membership.copy_(state["global_membership"].bool())
            self.global_study_index.copy_(state["global_study_index"].long())
            self.prompts_set.fill_(True)

    def stats_cuts(self) -> List[float]:
        """The mask logits at which image-only evaluation cuts the predicted masks for the statistics
        path: ``stats_ensemble``, else the one cut at ``stats_threshold``."""
        return list(self.stats_ensemble) if len(self.stats_ensemble) > 0 else [self.stats_threshold]

    def adapt_prompts(self, emb: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings through the learned ``prompt_adapter`` (unchanged without one)."""
        adapter = self.prompt_adapter
        if adapter is None:
            return emb
        return adapter(emb.to(adapter.weight.dtype))

    def prompt_bank(self):
        """The prompt buffers as a :class:`~anatomy_vlp_bundle.text.prompts.PromptBank` (no texts)."""
        from ..text.prompts import PromptBank

        return PromptBank(
            pos=self.prompt_pos.clone(),
            neg=self.prompt_neg.clone(),
            valid=self.prompt_valid.clone(),
            study_pos=self.study_pos.clone(),
            study_neg=self.study_neg.clone(),
            global_emb=self.global_emb.clone(),
            global_membership=self.global_membership.clone(),
            global_study_index=self.global_study_index.clone(),
        )

    def set_thresholds(
        self, thresholds: Optional[torch.Tensor] = None, study_thresholds: Optional[torch.Tensor] = None
    ) -> None:
        """Store decision thresholds: ``thresholds`` ``(M, F)`` per (anatomy, finding), ``study_thresholds`` ``(S,)``."""
        with torch.no_grad():
            for name, value in (("thresholds", thresholds), ("study_thresholds", study_thresholds)):
                if value is None:
                    continue
                own = getattr(self, name)
                value = torch.as_tensor(value, dtype=own.dtype)
                if tuple(value.shape) != tuple(own.shape):
                    raise ValueError(f"set_thresholds: {name} must have shape {tuple(own.shape)}, got {tuple(value.shape)}")
                own.copy_(value)

    def set_score_calibration(self, quantiles: torch.Tensor) -> None:
        """Store the prior's per-anatomy score quantiles (``fit_score_calibration``) for ``abnormality``."""
        if self.prior is None:
            raise RuntimeError("set_score_calibration: the model has no normality prior (prior=None)")
        self.prior.set_score_calibration(quantiles)

    def set_prior_fitting(self, enabled: bool = True) -> None:
        """Fit the normality prior during training forwards (default) or keep it fixed.

        With fitting off the prior is still applied (scores, residuals, fusion) but is told that no
        anatomy is normal, so its losses are zero and its codebook and feature statistics do not move
        (stage schedules: fit it in its own stage, then keep it fixed while the backbone trains on).
        Every rank must use the same setting (the prior's DDP collectives depend on it only through
        all-reduced counts, so mixed settings would still not hang, but would fit on some ranks only).
        """
        self.fit_prior = bool(enabled)

    def no_weight_decay(self) -> List[str]:
        """Names of parameters that should not be weight-decayed (embeddings, tokens, norms, biases, scales)."""
        names = []
        for name, p in self.named_parameters():
            if p.ndim <= 1 or name.endswith(("position_embeddings", "cls_token", "anatomy_queries")) or "condition" in name:
                names.append(name)
        return names

    def layout_json(self) -> str:
        """The deploy layout (``networks.deploy.describe_layout``) as JSON."""
        from .deploy import describe_layout

        return json.dumps(describe_layout(self.catalog, self.spatial_dims))

    # ------------------------------------------------------------------------------------ forward
    def _check_inputs(self, image: torch.Tensor, anatomy: Optional[torch.Tensor], normal: Optional[torch.Tensor], regions: str) -> None:
        if regions not in REGION_MODES:
            raise ValueError(f"AnatomyVLPModel: regions must be one of {REGION_MODES}, got {regions!r}")
        if image.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"AnatomyVLPModel: image must be (B, C, *spatial) with {self.spatial_dims} spatial dims, "
                f"got shape {tuple(image.shape)}"
            )
        b, m = image.shape[0], self.num_anatomies
        if anatomy is None:
            if regions == "mask":
                raise ValueError("AnatomyVLPModel: regions='mask' needs the anatomy masks")
        elif anatomy.dim() != image.dim() or anatomy.shape[0] != b or anatomy.shape[1] != m or anatomy.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"AnatomyVLPModel: anatomy must be (B, M, *spatial) = {(b, m) + tuple(image.shape[2:])}, "
                f"got {tuple(anatomy.shape)}"
            )
        if normal is not None:
            if normal.dtype != torch.bool:
                raise TypeError(f"AnatomyVLPModel: normal must be a bool (B, M) tensor, got {normal.dtype}")
            if tuple(normal.shape) != (b, m):
                raise ValueError(f"AnatomyVLPModel: normal must be (B, M) = {(b, m)}, got {tuple(normal.shape)}")

    def _study_embedding(self, cls: torch.Tensor, study_stats: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The study embedding: the [CLS] projection, plus the study statistics path when present."""
        if self.study_stats is None or study_stats is None:
            return self.cls_proj(cls)
        return F.normalize(self.cls_proj.net(cls).float() + self.study_stats(study_stats[0], study_stats[1]), dim=-1)

    def forward(
        self,
        image: torch.Tensor,
        anatomy: Optional[torch.Tensor] = None,
        normal: Optional[torch.Tensor] = None,
        regions: str = "auto",
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            image: ``(B, in_channels, *S)`` in [0, 1], every ``S[a]`` a multiple of the patch size.
            anatomy: optional ``(B, M, *S)`` binary region masks (zero where not given).
            normal: optional ``(B, M)`` bool, anatomies whose findings are all known absent: only
                they fit the normality prior (its losses and codebook).
            regions: ``"auto"`` | ``"mask"`` | ``"predicted"`` (see the module docstring).

        Returns:
            dict of tensors (``E`` = embed_dim, ``F`` = catalog.max_findings, ``S`` = study findings,
            ``K`` = global findings, ``N`` = tokens, ``G`` = the prior's grid):

            - ``cls_emb`` (B, E), ``region_emb`` (B, M, E), ``region_emb_view2`` (B, M, E): unit vectors;
            - ``boxes`` (B, M, 2d) normalised (cx, cy, [cz], w, h, [d]); ``presence_logits`` (B, M);
              ``mask_logits`` (B, M, *S // (stem_stride / 2)), or (B, M, *S) with ``mask_refine``: anatomy mask logits (empty without the head);
            - ``zero_shot_logits`` (B, M, F) (0 on padding), ``study_logits`` (B, S);
            - ``anatomy_score`` (B, M) worst patch error, ``abnormality`` (B, M) in [0, 1] (prior:
              calibrated percentile, or ``score / (1 + score)`` before calibration; no prior: the
              largest finding probability); ``patch_error`` (B, M, *G) deviation map; ``prior_grid``
              (d,) long; ``perplexity``; ``loss_commitment``, ``loss_reconstruction`` (zeros
              without prior);
            - ``region_weights`` (B, M, N) token weights of each region, ``token_grid`` (d,) long;
            - for ``VLPCriterion``: ``logit_scale``, ``disease_logit_scale``, ``logit_bias`` (0-d),
              ``prompt_pos`` / ``prompt_neg`` (M, F, E), ``prompt_valid`` (M, F),
              ``global_prompt_emb`` (K, E), ``global_membership`` (K, M, F),
              ``global_study_index`` (K,), ``study_pos`` / ``study_neg`` (S, E).
        """
        # MONAI's MetaTensor (collated batches) carries per-sample metadata that breaks boolean
        # indexing inside the prior: compute on plain tensors
        image = _plain(image)
        anatomy = None if anatomy is None else _plain(anatomy)
        normal = None if normal is None else _plain(normal)
        self._check_inputs(image, anatomy, normal, regions)
        spatial = [int(s) for s in image.shape[2:]]
        grid = self.backbone.token_grid(spatial)
        b, m = image.shape[0], self.num_anatomies

        use_masks = anatomy is not None and regions != "predicted"
        mask_tokens: Optional[torch.Tensor] = None
        stem_mask_tokens: Optional[torch.Tensor] = None
        if use_masks:
            stem_stride = self.backbone.stem_stride
            if self.prior is not None and self.prior_on != "tokens" and stem_stride != self.backbone.patch_size:
                # one pass over the full-resolution masks: the stem grid first, the token grid from it
                # (a token holds an anatomy iff one of its stem cells does)
                stem_mask_tokens = masks_to_token_mask(anatomy, stem_stride)
                stem_grid = [s // st for s, st in zip(spatial, stem_stride)]
                ratio = [p // st for p, st in zip(self.backbone.patch_size, stem_stride)]
                mask_tokens = masks_to_token_mask(stem_mask_tokens.reshape([b, m] + stem_grid), ratio)
            else:
                mask_tokens = masks_to_token_mask(anatomy, self.backbone.patch_size)
        attn_region = mask_tokens if (self.mask_guided_attention and mask_tokens is not None) else None

        feats = self.backbone(image, attn_region)
        queries, patch_tokens = feats["queries"], feats["patch_tokens"]
        det = self.box_head(queries)
        boxes = det["boxes"]
        mask_logits: Optional[torch.Tensor] = None
        if self.seg_head is not None:
            if self.backbone.gradient_checkpointing and torch.is_grad_enabled():
                # the head's fine-grid maps (the largest activations of a step) recomputed in backward
                mask_logits = checkpoint(
                    self.seg_head, feats["stem_input"], feats["stem_features"], patch_tokens, grid, feats["stem_early"],
                    use_reentrant=False,
                )
            else:
                mask_logits = self.seg_head(feats["stem_input"], feats["stem_features"], patch_tokens, grid, feats["stem_early"])

        weights = _region_tokens(boxes, grid, mask_tokens, regions, self.soft_boxes)
        region_feat = self.pooling(queries, patch_tokens, grid, weights, None)

        device = image.device
        if self.prior is not None:
            if self.prior_on == "stem":
                prior_input = feats["stem_features"]
            elif self.prior_on == "image":
                prior_input = image_patches(image, self.backbone.stem_stride)
            else:
                prior_input = patch_tokens.transpose(1, 2).reshape(b, patch_tokens.shape[-1], *grid)
            prior_grid = [int(s) for s in prior_input.shape[2:]]
            # stem_mask_tokens is None only when the stem grid is the token grid
            if self.prior_cells == "interior":
                # Only cells entirely inside the region: a cell straddling the organ border mixes
                # tissues, reconstructs badly whatever the organ's state and would be every organ's
                # "worst patch" (measured: any-finding AUC of a raw-patch prior 0.50 with border
                # cells, 0.65 without).
                inside = None
                if use_masks and anatomy is not None:
                    stride = self.backbone.patch_size if self.prior_on == "tokens" else self.backbone.stem_stride
                    inside = ~masks_to_token_mask(anatomy == 0, stride)
                prior_region = _region_tokens(boxes, prior_grid, inside, regions, True) > 0.999
            else:
                prior_mask = stem_mask_tokens if stem_mask_tokens is not None else mask_tokens
                prior_region = _region_tokens(boxes, prior_grid, prior_mask, regions, False) > 0.5
            p = self.prior(prior_input.flatten(2), prior_region, normal if self.fit_prior else None)
            prior_feat = prior_summary_features(p["residual_stats"], p["anatomy_score"])
            anatomy_score = p["anatomy_score"]
            patch_error = p["patch_error"].reshape(b, m, *prior_grid)
            loss_commitment, loss_reconstruction, perplexity = p["loss_commitment"], p["loss_reconstruction"], p["perplexity"]
        else:
            prior_grid = grid
            prior_feat = region_feat.new_zeros(b, m, 0)
            anatomy_score = torch.zeros(b, m, device=device)
            patch_error = torch.zeros([b, m] + grid, device=device)
            loss_commitment = torch.zeros((), device=device)
            loss_reconstruction = torch.zeros((), device=device)
            perplexity = torch.zeros((), device=device)

        stats: Optional[torch.Tensor] = None
        ensemble: List[torch.Tensor] = []
        study_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if self.region_stats_bins > 0:
            stats_masks = anatomy if use_masks else None
            stats_regions = regions if use_masks else "predicted"
            if stats_masks is not None and self.training and self.seg_head is not None and self.stats_from_prediction > 0:
                # some samples take the predicted masks ("auto" falls back to them where a mask is empty)
                keep = (torch.rand(b, device=device) >= self.stats_from_prediction).to(stats_masks.dtype)
                stats_masks = stats_masks * keep.view([b] + [1] * (stats_masks.dim() - 1))
                stats_regions = "auto"
            stats_logits = mask_logits
            if mask_logits is not None and self.stats_threshold != 0.0:
                stats_logits = mask_logits - self.stats_threshold
            views = self.backbone.window_views(feats["stem_input"]) if (self.stats_views or self.study_stats is not None) else image
            stats_image, per_view = stats_input(image, views, self.stats_views, self.structure_sigmas)
            if not self.training and stats_masks is None:  # image-only evaluation: one entry per cut (stats_cuts)
                ensemble = [
                    self.region_proj.standardize(raw, valid)
                    for raw, valid in predicted_statistics_ensemble(
                        stats_image, boxes, mask_logits, self.stats_cuts(), self.region_stats_bins,
                        self.focal_scales, per_view, self.focal_depth, self.stats_source_flag,
                    )
                ]
            else:
                raw_stats, stats_valid = region_statistics(
                    stats_image, stats_masks, boxes, stats_regions, self.region_stats_bins, stats_logits,
                    self.focal_scales, per_view, self.focal_depth,
                )
                if self.stats_source_flag:
                    if stats_masks is None or stats_regions == "predicted":
                        predicted = torch.ones(b, m, device=device)
                    elif stats_regions == "mask":
                        predicted = torch.zeros(b, m, device=device)
                    else:  # "auto": the predicted region where the given mask is empty
                        predicted = (stats_masks.flatten(2).sum(-1) == 0).to(torch.float32)
                    raw_stats = torch.cat([raw_stats, predicted.unsqueeze(-1) * stats_valid.unsqueeze(-1).to(torch.float32)], dim=-1)
                stats = self.region_proj.standardize(raw_stats, stats_valid)
            if self.study_stats is not None:
                spatial = [int(v) for v in image.shape[2:]]
                background = background_weights(stats_masks, boxes, spatial, stats_logits)
                study_stats = background_statistics(views, background, self.region_stats_bins)
        if len(ensemble) > 0:
            region_emb = self.region_proj.forward_ensemble(region_feat, prior_feat, ensemble)
        else:
            region_emb = self.region_proj(region_feat, prior_feat, stats)
        if self.training:
            keep = (torch.rand(weights.shape, device=weights.device) < self.view2_keep).to(weights.dtype)
            subset = weights * keep
            subset = torch.where(subset.sum(-1, keepdim=True) > 0, subset, weights)
            region_emb_view2 = self.region_proj(self.pooling(queries, patch_tokens, grid, subset, None), prior_feat, stats)
        else:
            region_emb_view2 = region_emb
        cls_emb = self._study_embedding(feats["cls"], study_stats)

        scale = self.logit_scale()
        prompt_pos, prompt_neg = self.adapt_prompts(self.prompt_pos), self.adapt_prompts(self.prompt_neg)
        study_pos, study_neg = self.adapt_prompts(self.study_pos), self.adapt_prompts(self.study_neg)
        zs_logits = zero_shot_logits(region_emb, prompt_pos, prompt_neg, scale)
        study_logits = zero_shot_logits(cls_emb.unsqueeze(1), study_pos.unsqueeze(0), study_neg.unsqueeze(0), scale)[:, 0]

        with torch.no_grad():
            if self.prior is not None:
                abnormality = abnormality_from_score(anatomy_score, self.prior.score_quantiles, self.prior.score_calibrated)
            else:
                abnormality = max_finding_probability(torch.sigmoid(zs_logits.float()), self.prompt_valid)

        return {
            "cls_emb": cls_emb,
            "region_emb": region_emb,
            "region_emb_view2": region_emb_view2,
            "boxes": boxes,
            "mask_logits": mask_logits if mask_logits is not None else boxes.new_zeros(0),
            "presence_logits": det["presence_logits"],
            "zero_shot_logits": zs_logits,
            "study_logits": study_logits,
            "anatomy_score": anatomy_score,
            "abnormality": abnormality,
            "patch_error": patch_error,
            "prior_grid": torch.tensor(prior_grid, dtype=torch.long),
            "perplexity": perplexity,
            "loss_commitment": loss_commitment,
            "loss_reconstruction": loss_reconstruction,
            "region_weights": weights,
            "token_grid": torch.tensor(grid, dtype=torch.long),
            "logit_scale": scale,
            "disease_logit_scale": self.disease_logit_scale(),
            "logit_bias": self.logit_bias,
            "prompt_pos": prompt_pos,
            "prompt_neg": prompt_neg,
            "prompt_valid": self.prompt_valid,
            "global_prompt_emb": self.adapt_prompts(self.global_emb),
            "global_membership": self.global_membership,
            "global_study_index": self.global_study_index,
            "study_pos": study_pos,
            "study_neg": study_neg,
        }
