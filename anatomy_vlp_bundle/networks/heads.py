"""Heads on top of :class:`~anatomy_vlp_bundle.networks.anatomy_vit.AnatomyViT`.

- :class:`BoxHead`: per anatomy query, a normalised centre-size box and a presence logit.
- :class:`RegionPooling`: a region feature per anatomy = [query token, mean, max] of the patch
  tokens inside the anatomy's region. The region comes from the anatomy mask (mask mode: a
  token mask from :func:`~anatomy_vlp_bundle.networks.anatomy_vit.masks_to_token_mask`) or,
  image-only, from the predicted box rasterised onto the token grid (:func:`boxes_to_token_mask`).
  Max pooling is there because a mean over an organ washes out focal findings.
- :class:`Projection`: into the text embedding space, L2-normalised.

All forwards are TorchScript-compatible.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from anatomy_vlp_bundle.networks.box_ops import boxes_to_token_mask

__all__ = ["BoxHead", "RegionPooling", "Projection", "boxes_to_token_mask"]


class BoxHead(nn.Module):
    """Box and presence prediction from each anatomy query (weights shared by all queries).

    Args:
        hidden_size: query width ``D``.
        spatial_dims: 2 or 3 (4 or 6 box numbers).
        num_layers: layers of the box MLP (DETR uses 3).
        mlp_dim: hidden width of the box MLP (default ``hidden_size``).

    ``forward(queries (B, M, D))`` returns ``boxes`` ``(B, M, 2 * spatial_dims)`` float32 normalised
    ``(cx, cy, [cz], w, h, [d])`` in ``(0, 1)`` (sigmoid; array-axis order, relative to the input
    grid) and ``presence_logits`` ``(B, M)``.
    """

    def __init__(self, hidden_size: int, spatial_dims: int, num_layers: int = 3, mlp_dim: Optional[int] = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"BoxHead: spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_layers < 1:
            raise ValueError(f"BoxHead: num_layers must be >= 1, got {num_layers}")
        mlp_dim = hidden_size if mlp_dim is None else mlp_dim
        self.spatial_dims = spatial_dims
        layers: List[nn.Module] = []
        width = hidden_size
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, mlp_dim), nn.GELU()]
            width = mlp_dim
        layers.append(nn.Linear(width, 2 * spatial_dims))
        self.box_mlp = nn.Sequential(*layers)
        self.presence = nn.Linear(hidden_size, 1)

    def forward(self, queries: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``queries`` ``(B, M, D)`` -> ``{"boxes": (B, M, 2 * spatial_dims), "presence_logits": (B, M)}``."""
        boxes = torch.sigmoid(self.box_mlp(queries).float())
        presence_logits = self.presence(queries).float().squeeze(-1)
        return {"boxes": boxes, "presence_logits": presence_logits}


class RegionPooling(nn.Module):
    """Region feature per anatomy: ``concat(query, mean, max)`` of the patch tokens in its region.

    Args:
        hidden_size: token width ``D`` (``out_dim = 3 * D``).
        soft_boxes: image-only mode weights tokens by the fraction covered by the predicted box
            (mean pooling weighted, max over covered tokens) instead of a hard any-overlap mask.
        detach_boxes: do not back-propagate pooling losses into the box head (the box losses
            train the boxes; alignment losses should not move boxes to convenient tokens).
        max_chunk_elements: memory bound of the masked max (``B * chunk * N * D`` elements at once).

    ``forward(queries (B, M, D), patch_tokens (B, N, D), grid, region_token_mask=None, boxes=None)``:
    ``region_token_mask`` ``(B, M, N)`` (bool, or float weights >= 0) wins over ``boxes``
    ``(B, M, 2 * spatial_dims)`` (normalised centre-size); one of them is required. Returns
    ``(B, M, 3 * D)``. An empty region (e.g. an absent anatomy in mask mode) pools to zeros.
    """

    def __init__(
        self,
        hidden_size: int,
        soft_boxes: bool = False,
        detach_boxes: bool = True,
        max_chunk_elements: int = 1 << 24,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.out_dim = 3 * hidden_size
        self.soft_boxes = soft_boxes
        self.detach_boxes = detach_boxes
        self.max_chunk_elements = int(max_chunk_elements)

    def region_weights(
        self,
        grid: List[int],
        region_token_mask: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The ``(B, M, N)`` float token weights of each region (mask first, else boxes)."""
        if region_token_mask is not None:
            return region_token_mask.to(torch.float32)
        if boxes is not None:
            if self.detach_boxes:
                boxes = boxes.detach()
            return boxes_to_token_mask(boxes, grid, self.soft_boxes).to(torch.float32)
        raise ValueError("RegionPooling: give region_token_mask (mask mode) or boxes (image-only mode)")

    def forward(
        self,
        queries: torch.Tensor,
        patch_tokens: torch.Tensor,
        grid: List[int],
        region_token_mask: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        b, n, d = patch_tokens.shape[0], patch_tokens.shape[1], patch_tokens.shape[2]
        m = queries.shape[1]
        expected = 1
        for g in grid:
            expected *= g
        if expected != n:
            raise ValueError(
                "RegionPooling: grid " + str(grid) + " has " + str(expected) + " tokens, patch_tokens has " + str(n)
            )
        weights = self.region_weights(grid, region_token_mask, boxes)
        if weights.shape[0] != b or weights.shape[1] != m or weights.shape[2] != n:
            raise ValueError(
                "RegionPooling: region weights must be (B, M, N) = "
                + str([b, m, n])
                + ", got "
                + str(list(weights.shape))
            )
        total = weights.sum(dim=-1, keepdim=True)  # (B, M, 1)
        mean = torch.bmm(weights.to(patch_tokens.dtype), patch_tokens) / total.clamp(min=1e-6).to(patch_tokens.dtype)

        support = weights > 0
        # The masked max: which token holds each (region, channel) maximum is found without autograd
        # (the (B, c, N, D) masked copies are neither kept for backward nor multiplied by a mask
        # there), then gathered, so the gradient goes to that one token as amax's does (amax splits it
        # between exact ties, which continuous features do not have).
        chunk = max(1, self.max_chunk_elements // max(1, b * n * d))
        argmax: List[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, m, chunk):
                sel = support[:, start : start + chunk]  # (B, c, N)
                masked = patch_tokens.detach().unsqueeze(1).masked_fill(~sel.unsqueeze(-1), float("-inf"))
                argmax.append(masked.argmax(dim=2))  # (B, c, D)
        peak = torch.gather(patch_tokens, 1, torch.cat(argmax, dim=1))  # (B, M, D)
        # an empty region has no token: pool it to zeros (no gradient flows there)
        peak = torch.where(support.any(dim=-1, keepdim=True), peak, torch.zeros_like(peak))
        return torch.cat([queries, mean.to(queries.dtype), peak.to(queries.dtype)], dim=-1)


class Projection(nn.Module):
    """Projection into the text embedding space, L2-normalised.

    Args:
        in_dim: input width.
        embed_dim: text embedding width (384 for MiniLM).
        hidden_dim: when given, a 2-layer MLP ``Linear -> GELU -> Linear`` instead of one Linear.
        dropout: dropout before the last Linear (training only).

    ``forward(x (..., in_dim))`` -> ``(..., embed_dim)`` float32 unit vectors.
    """

    def __init__(self, in_dim: int, embed_dim: int, hidden_dim: Optional[int] = None, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_dim is None:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, embed_dim))
        else:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim)
            )
        self.in_dim = in_dim
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32: bf16 unit vectors lose ~3 digits of cosine similarity
        return F.normalize(self.net(x).float(), dim=-1)


#: :class:`SegmentationHead` decoders.
SEGMENTATION_DECODERS = ("light", "deep")


class SegmentationHead(nn.Module):
    """Per-anatomy masks at half the stem stride (localisation beyond boxes).

    Coarse path on the stem grid: ``GELU(conv3x3(concat(stem_features, up(reduce(patch_tokens)))))``
    (the stem features carry edges, the upsampled tokens which organ a cell belongs to). Fine path
    at ``stem_stride // 2`` (8 mm cells at the 4 mm CT default: organs such as the pancreas or the
    gallbladder are one or two 16 mm stem cells wide): a strided 3x3 convolution of the image
    itself and, when given, the first stem stage's features at that stride (a U-Net-like skip
    connection that costs nothing extra to compute). The coarse map, upsampled, and the fine maps
    are fused by ``conv3x3 -> GELU -> conv1x1`` into one sigmoid channel per anatomy (regions may
    overlap, as the CXR regions do). The
    image-only region statistics are taken over these masks (boxes hold other tissue: measured on
    the synthetic CT test split, a linear probe on the statistics gave mean AUC 0.89 inside the
    masks and 0.76 inside the exact boxes).

    Args:
        spatial_dims: 2 or 3.
        stem_channels: channels of the stem features.
        hidden_size: token width.
        num_anatomies: ``M``.
        stem_stride: the stem's stride per axis (the fine path runs at half of it, at least 1).
        in_channels: image channels.
        hidden: channels of the coarse map.
        fine: channels of the fine maps.
        early_channels: channels of the first stem stage's features passed as ``early`` (0: none).
        decoder: ``"light"`` (one 3x3 convolution on each grid, as above) or ``"deep"`` (two on each
            grid, and ``2 * fine`` channels on the fine grid). Measured on frozen features of the
            default CT checkpoint (600 steps of batch 4, validation split): see docs/README.md.
        refine: a full-resolution stage (:meth:`refine_logits`): the fine-grid logits upsampled to
            the input grid plus a per-voxel correction from those logits and the image's intensities
            (each view, and its local means over 3 and 5 voxels) through a two-layer pointwise MLP
            whose output layer starts at zero (the stage starts as plain upsampling). 8 mm cells
            cannot leave out what lies in an organ's concavities, the spinal canal's fluid inside a
            vertebra or the fat of the renal sinus, and that tissue mimics the lesions the
            statistics look for (lytic foci, cysts). Measured with a logistic probe on the region
            statistics (synthetic CT test split): given masks 0.925, the same masks pooled to 8 mm
            cells and upsampled 0.864.
        refine_hidden: hidden width of the refinement MLP.

    ``forward(image (B, C, *S), stem_features (B, C_s, *G), patch_tokens (B, N, D), grid, early)`` ->
    ``(B, M, *S // fine_stride)`` logits, or ``(B, M, *S)`` with ``refine`` (``early`` is resampled
    to the fine grid if its size differs).
    """

    def __init__(
        self,
        spatial_dims: int,
        stem_channels: int,
        hidden_size: int,
        num_anatomies: int,
        stem_stride: Optional[List[int]] = None,
        in_channels: int = 1,
        hidden: int = 48,
        fine: int = 16,
        early_channels: int = 0,
        decoder: str = "light",
        refine: bool = False,
        refine_hidden: int = 16,
    ) -> None:
        super().__init__()
        if decoder not in SEGMENTATION_DECODERS:
            raise ValueError(f"SegmentationHead: decoder must be one of {SEGMENTATION_DECODERS}, got {decoder!r}")
        deep = decoder == "deep"
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.interp_mode = "trilinear" if spatial_dims == 3 else "bilinear"
        stride = [4] * spatial_dims if stem_stride is None else [int(s) for s in stem_stride]
        self.fine_stride: List[int] = [max(1, s // 2) for s in stride]
        self.reduce = conv(hidden_size, hidden, kernel_size=1)
        coarse: List[nn.Module] = [conv(stem_channels + hidden, hidden, kernel_size=3, padding=1), nn.GELU()]
        if deep:
            coarse += [conv(hidden, hidden, kernel_size=3, padding=1), nn.GELU()]
        self.coarse = nn.Sequential(*coarse)
        self.fine = nn.Sequential(
            conv(in_channels, fine, kernel_size=3, stride=tuple(self.fine_stride), padding=1), nn.GELU()
        )
        self.early_channels = int(early_channels)
        width = 2 * fine if deep else fine
        fuse: List[nn.Module] = [conv(hidden + fine + self.early_channels, width, kernel_size=3, padding=1), nn.GELU()]
        if deep:
            fuse += [conv(width, width, kernel_size=3, padding=1), nn.GELU()]
        fuse.append(conv(width, num_anatomies, kernel_size=1))
        self.fuse = nn.Sequential(*fuse)
        self.decoder = decoder
        self.spatial_dims = int(spatial_dims)
        self.refine: Optional[nn.Sequential] = None
        if refine:
            # per voxel: the M upsampled logits, and each intensity view with its 3- and 5-voxel means
            self.refine = nn.Sequential(
                nn.Linear(num_anatomies + 3 * in_channels, refine_hidden), nn.GELU(), nn.Linear(refine_hidden, num_anatomies)
            )
            nn.init.zeros_(self.refine[2].weight)
            nn.init.zeros_(self.refine[2].bias)

    def forward(
        self,
        image: torch.Tensor,
        stem_features: torch.Tensor,
        patch_tokens: torch.Tensor,
        grid: List[int],
        early: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        b, d = patch_tokens.shape[0], patch_tokens.shape[2]
        tokens = patch_tokens.transpose(1, 2).reshape([b, d] + grid)
        size: List[int] = []
        for s in stem_features.shape[2:]:
            size.append(int(s))
        up = F.interpolate(self.reduce(tokens.to(stem_features.dtype)), size=size, mode=self.interp_mode, align_corners=False)
        coarse = self.coarse(torch.cat([stem_features, up], dim=1))
        fine = self.fine(image.to(coarse.dtype))
        fine_size: List[int] = []
        for s in fine.shape[2:]:
            fine_size.append(int(s))
        coarse_up = F.interpolate(coarse, size=fine_size, mode=self.interp_mode, align_corners=False)
        parts = [coarse_up, fine]
        if self.early_channels > 0:
            if early is None:
                raise ValueError("SegmentationHead: built with early_channels > 0 but called without `early`")
            skip = early.to(coarse.dtype)
            if [int(s) for s in skip.shape[2:]] != fine_size:
                skip = F.interpolate(skip, size=fine_size, mode=self.interp_mode, align_corners=False)
            parts.append(skip)
        # The fuse convolution of concat(parts), computed as the sum of each part's convolution with its
        # slice of the same weight (equal up to float rounding; the same parameters): no concatenated
        # map at the fine grid (63 MB on the default CT batch), and each part in channels-last layout,
        # where oneDNN's 3D convolution is faster. Measured (forward + backward with the upsampling, 2
        # cores): 156 ms concatenated, 130 ms split.
        first = self.fuse[0]
        start = 0
        y = torch.zeros(0)
        for i, part in enumerate(parts):
            c = int(part.shape[1])
            w = first.weight[:, start : start + c]
            bias = first.bias if i == 0 else None  # stride 1, padding 1: as fuse[0] is built
            start += c
            if part.dim() == 5:
                z = F.conv3d(part.contiguous(memory_format=torch.channels_last_3d), w, bias, 1, 1)
            else:
                z = F.conv2d(part, w, bias, 1, 1)
            y = z if i == 0 else y + z
        for j, layer in enumerate(self.fuse):
            if j > 0:  # the first convolution is the split sum above
                y = layer(y)
        if self.refine is not None:
            y = self.refine_logits(y, image)
        return y

    def refine_logits(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``(B, M, *S)``: the fine-grid ``logits`` upsampled to ``image``'s grid plus the pointwise
        MLP's correction from ``[upsampled logits, image, its 3- and 5-voxel local means]``."""
        size: List[int] = []
        for s in image.shape[2:]:
            size.append(int(s))
        up = F.interpolate(logits, size=size, mode=self.interp_mode, align_corners=False)
        x = image.to(up.dtype)
        if self.spatial_dims == 3:
            mean3 = F.avg_pool3d(x, 3, 1, 1, count_include_pad=False)
            mean5 = F.avg_pool3d(x, 5, 1, 2, count_include_pad=False)
        else:
            mean3 = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
            mean5 = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
        feats = torch.cat([up, x, mean3, mean5], dim=1).movedim(1, -1)  # channels last: one matmul per layer
        return up + self.refine(feats).movedim(-1, 1)


def upsample_mask_logits(logits: torch.Tensor, size: List[int]) -> torch.Tensor:
    """``(B, M, *G)`` logits -> ``(B, M, *size)`` (bi/trilinear), e.g. to the input grid."""
    mode = "trilinear" if logits.dim() == 5 else "bilinear"
    return F.interpolate(logits.float(), size=size, mode=mode, align_corners=False)
