"""AnatomyViT: a 2D/3D vision transformer with a [CLS] token and one learnable query per anatomy.

Token sequence: ``[CLS, q_1 .. q_M, patch_1 .. patch_N]``. Query ``i`` is bound to anatomy ``i`` of
the catalog (fixed assignment). When per-anatomy masks are available, ``region_token_mask``
restricts what each query may attend to (mask-guided attention, as fVLM restricts organ queries
to organ tokens).

Design choices (why not MONAI's ``ViT``):

- The patch embedding is a small convolutional stem by default: a linear patch embedding
  averages a lesion of a few voxels away inside an 8^3 patch; strided 3x3 convolutions keep it.
  The stem's early per-patch features are returned for the normality prior.
- MONAI's ``PatchEmbeddingBlock`` has a fixed-size position embedding; here it is stored on the
  token grid, ``(1, D, *grid)``, and interpolated (bi/trilinear) for other input sizes, both in
  ``forward`` and when loading a state dict from a model built for another size.
- The transformer block is written here rather than reusing MONAI's ``TransformerBlock``:
  MONAI's ``SABlock`` passes ``dropout_p`` to ``scaled_dot_product_attention`` even in eval mode
  (eval is not deterministic with dropout > 0) and needs ``einops``, which this package does not
  otherwise depend on. Parameter names follow MONAI's block (``norm1``, ``attn.qkv``,
  ``attn.out_proj``, ``norm2``, ``mlp.linear1``, ``mlp.linear2``, with the same qkv layout) and
  the MLP is MONAI's ``MLPBlock``, so MONAI ViT block weights map key for key.
- Attention (state dicts are the same for every choice): ``"sdpa"`` is
  ``F.scaled_dot_product_attention`` (fused kernels where the device has them); ``"math"`` the
  same explicit matmul-softmax-matmul; ``"auto"`` (default) takes the math path under CPU bf16
  autocast and SDPA otherwise. Measured on a 2-core AVX512-BF16 CPU (default CT backbone step,
  batch 4, 652 tokens, interleaved): under bf16 autocast math 211 ms, SDPA 346 ms (the CPU
  flash-attention backward was 137 ms of it); in fp32 SDPA is 1.26x faster than math.
- The forward path is TorchScript-compatible (``torch.jit.script``): typed ``Optional``
  arguments, ``Dict[str, Tensor]`` output (the token grid is therefore returned as a tensor).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.mlp import MLPBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import Conv
from torch.utils.checkpoint import checkpoint

__all__ = [
    "AnatomyViT",
    "AnatomyTransformerBlock",
    "ATTENTION_TYPES",
    "masks_to_token_mask",
    "query_attention_mask",
    "interpolate_pos_embed",
    "remap_anatomy_queries",
]

logger = logging.getLogger(__name__)

POS_EMBED_TYPES = ("learnable", "sincos")
#: ``"auto"``: math under CPU bf16 autocast, else SDPA; ``"sdpa"``: ``F.scaled_dot_product_attention``;
#: ``"math"``: explicit matmul-softmax-matmul.
ATTENTION_TYPES = ("auto", "sdpa", "math")


def _as_tuple(value: Union[int, Sequence[int]], n: int, what: str) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{what} must be an int or {n} ints (one per spatial axis), got {value}")
    return value


# --------------------------------------------------------------------------------------------- helpers


def masks_to_token_mask(anatomy: torch.Tensor, patch_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Which tokens of the patch grid belong to each anatomy: max-pooling of the mask onto the grid.

    A token belongs to anatomy ``i`` when any voxel of its patch is inside the anatomy (fVLM's
    organ tokens). Works on uint8/bool/float masks without converting the whole mask to float.

    Args:
        anatomy: ``(B, M, *S)`` per-anatomy masks (non-zero = inside).
        patch_size: patch (or stem) size per axis; every spatial size must be a multiple of it.

    Returns:
        ``(B, M, prod(S // patch_size))`` bool, tokens in row-major grid order.
    """
    d = anatomy.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"masks_to_token_mask: anatomy must be (B, M, *spatial) with 2 or 3 spatial dims, got shape {tuple(anatomy.shape)}")
    patch = _as_tuple(patch_size, d, "patch_size")
    spatial = anatomy.shape[2:]
    if any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(
            f"masks_to_token_mask: spatial size {tuple(spatial)} is not a multiple of the patch size {patch}"
        )
    shape = list(anatomy.shape[:2])
    for s, p in zip(spatial, patch):
        shape += [s // p, p]
    x = (anatomy != 0).reshape(shape)
    # reduce the within-patch axes (2 + 2a + 1), last first so earlier indices stay valid
    for a in reversed(range(d)):
        x = x.any(dim=3 + 2 * a)
    return x.reshape(anatomy.shape[0], anatomy.shape[1], -1)


def query_attention_mask(region_token_mask: torch.Tensor) -> torch.Tensor:
    """Additive attention mask for the sequence ``[CLS, q_1..q_M, patch_1..patch_N]``.

    Query ``i`` may attend to [CLS], to itself and to the patch tokens of its region; a query whose
    region is empty attends to everything (so no row is fully masked). [CLS] and the patch
    tokens attend to every token.

    Args:
        region_token_mask: ``(B, M, N)`` bool (or non-zero = inside) tokens of each anatomy.

    Returns:
        ``(B, 1, L, L)`` float32 mask, ``L = 1 + M + N``: 0 where attention is allowed, ``-inf``
        elsewhere (broadcast over heads by ``scaled_dot_product_attention``).
    """
    b, m, n = region_token_mask.shape[0], region_token_mask.shape[1], region_token_mask.shape[2]
    device = region_token_mask.device
    region = region_token_mask != 0
    length = 1 + m + n
    to_cls = torch.ones(b, m, 1, dtype=torch.bool, device=device)
    to_self = torch.eye(m, dtype=torch.bool, device=device).unsqueeze(0).expand(b, m, m)
    query_rows = torch.cat([to_cls, to_self, region], dim=-1)  # (B, M, L)
    empty = ~region.any(dim=-1, keepdim=True)
    query_rows = query_rows | empty
    allowed = torch.cat(
        [
            torch.ones(b, 1, length, dtype=torch.bool, device=device),
            query_rows,
            torch.ones(b, n, length, dtype=torch.bool, device=device),
        ],
        dim=1,
    )
    mask = torch.zeros(b, length, length, dtype=torch.float32, device=device)
    return mask.masked_fill(~allowed, float("-inf")).unsqueeze(1)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: List[int]) -> torch.Tensor:
    """Resize a grid position embedding ``(1, D, *old_grid)`` to ``(1, D, *grid)`` (bi/trilinear).

    ``align_corners=False`` treats every token as a cell of the same extent, so the embedding
    keeps its physical meaning (first/last token at the borders of the input) at any size.
    """
    if len(grid) == 2:
        return F.interpolate(pos_embed, size=grid, mode="bilinear", align_corners=False)
    return F.interpolate(pos_embed, size=grid, mode="trilinear", align_corners=False)


def remap_anatomy_queries(
    state_dict: Dict[str, torch.Tensor],
    old_names: Union[Sequence[str], object],
    new_names: Union[Sequence[str], object],
    keys: Optional[Sequence[str]] = None,
    std: float = 0.02,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """Map per-anatomy query rows of a state dict from one catalog to another, by anatomy name.

    Rows of anatomies present in both catalogs are copied; anatomies only in the new catalog get
    fresh rows (truncated normal, like a new model's queries); anatomies only in the old catalog
    are dropped.

    Args:
        state_dict: a model state dict (not modified).
        old_names: anatomy names of the checkpoint, in query order (or a ``Catalog``).
        new_names: anatomy names of the model to load into (or a ``Catalog``).
        keys: state-dict keys holding ``(1, M, D)`` query tensors; default: every key named
            ``anatomy_queries`` or ending in ``.anatomy_queries``.
        std: standard deviation of the fresh rows.
        generator: optional random generator for the fresh rows.

    Returns:
        a new state dict (shallow copy) with the query tensors remapped to ``len(new_names)`` rows.
    """
    old = list(getattr(old_names, "names", old_names))
    new = list(getattr(new_names, "names", new_names))
    if keys is None:
        keys = [k for k in state_dict if k == "anatomy_queries" or k.endswith(".anatomy_queries")]
        if not keys:
            raise KeyError("remap_anatomy_queries: the state dict has no 'anatomy_queries' key")
    rows = {name: i for i, name in enumerate(old)}
    out = dict(state_dict)
    for key in keys:
        if key not in state_dict:
            raise KeyError(f"remap_anatomy_queries: key {key!r} is not in the state dict")
        queries = state_dict[key]
        if queries.dim() < 2 or queries.shape[1] != len(old):
            raise ValueError(
                f"remap_anatomy_queries: {key!r} has shape {tuple(queries.shape)}, expected (1, {len(old)}, D) "
                f"for the {len(old)} old anatomy names"
            )
        fresh = torch.empty((queries.shape[0], len(new)) + tuple(queries.shape[2:]), dtype=torch.float32)
        nn.init.trunc_normal_(fresh, mean=0.0, std=std, a=-2 * std, b=2 * std, generator=generator)
        fresh = fresh.to(dtype=queries.dtype, device=queries.device)
        for j, name in enumerate(new):
            if name in rows:
                fresh[:, j] = queries[:, rows[name]]
        out[key] = fresh
    added = [n for n in new if n not in rows]
    new_set = set(new)
    dropped = [n for n in old if n not in new_set]
    if added or dropped:
        logger.info("anatomy queries remapped by name: new (fresh) %s; dropped %s", added, dropped)
    return out


# --------------------------------------------------------------------------------------------- modules


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels at each location of a ``(B, C, *S)`` map.

    Chosen over BatchNorm (batch statistics: tiny 3D batches, DDP) and Group/InstanceNorm
    (statistics over the whole image depend on the crop and flatten absolute intensities, which
    carry meaning in CT): each location is normalised on its own.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused layer_norm over the channels moved last (a view, no copy, for a channels-last
        # map), in float32 also under bf16 autocast; the result keeps the input's memory format.
        # Measured against the former mean/var/rsqrt in six element-wise passes over the
        # 4 x 32 x 40 x 32 x 32 stem map: the same values within 1.5e-6.
        dtype = x.dtype
        y = F.layer_norm(x.float().movedim(1, -1), (x.shape[1],), self.weight.float(), self.bias.float(), self.eps)
        return y.movedim(-1, 1).to(dtype)


class _ConvStage(nn.Sequential):
    """3x3(x3) convolution with the given stride, channel LayerNorm, GELU."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: Sequence[int]) -> None:
        super().__init__(
            Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=3, stride=tuple(stride), padding=1),
            _ChannelLayerNorm(out_channels),
            nn.GELU(),
        )


@torch.jit.ignore
def _cpu_bf16_autocast_eager(q: torch.Tensor) -> bool:
    """Whether ``q`` is on the CPU under bf16 autocast (eager only)."""
    return q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class _SelfAttention(nn.Module):
    """Multi-head self-attention; dropout only in training.

    ``attention="sdpa"`` calls ``F.scaled_dot_product_attention``; ``"math"`` computes
    ``softmax(q k^T / sqrt(head_dim) + mask) v`` with plain matmuls (same result, every
    intermediate materialised); ``"auto"`` takes the math path under CPU bf16 autocast (faster
    there, see the module docstring) and SDPA otherwise (also when scripted).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = True, attention: str = "auto"
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {attention!r}")
        self.attention = attention
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = float(dropout)
        self.drop_output = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape[0], x.shape[1], x.shape[2]
        # (B, N, 3 * D) -> (3, B, heads, N, head_dim): MONAI SABlock's "b h (qkv l d)" layout
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants the query's dtype (bf16 under autocast)
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.attention == "math" or (self.attention == "auto" and self._cpu_bf16_autocast(q)):
            x = self._math_attention(q, k, v, attn_mask, dropout_p)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.drop_output(self.out_proj(x))

    def _cpu_bf16_autocast(self, q: torch.Tensor) -> bool:
        if torch.jit.is_scripting():
            return False
        return _cpu_bf16_autocast_eager(q)

    def _math_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], dropout_p: float
    ) -> torch.Tensor:
        """``(B, heads, L, head_dim)`` each -> ``(B, heads, L, head_dim)``; ``attn_mask`` additive ``(B, 1, L, L)``."""
        scores = torch.matmul(q * self.scale, k.transpose(-2, -1))  # (B, heads, L, L)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p, training=dropout_p > 0.0)
        return torch.matmul(weights, v)


class AnatomyTransformerBlock(nn.Module):
    """Pre-norm transformer block (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``).

    Args:
        hidden_size: token width ``D``.
        mlp_dim: MLP hidden width.
        num_heads: attention heads (must divide ``hidden_size``).
        dropout: dropout of the attention weights, attention output and MLP (training only).
        qkv_bias: bias in the qkv projection.
        attention: ``"auto"``, ``"sdpa"`` or ``"math"`` (see :data:`ATTENTION_TYPES`).
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = _SelfAttention(hidden_size, num_heads, dropout, qkv_bias, attention)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` ``(B, L, D)``; ``attn_mask`` ``(B, 1, L, L)`` additive or ``None``."""
        if self.gradient_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._checkpointed(x, attn_mask)
        return self._block(x, attn_mask)

    def _block(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))

    @torch.jit.unused
    def _checkpointed(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # non-reentrant: works with inputs that need no grad and keeps the RNG state for dropout
        return checkpoint(self._block, x, attn_mask, use_reentrant=False)


class AnatomyViT(nn.Module):
    """Vision transformer with [CLS] and one learnable query token per anatomy (2D or 3D).

    Args:
        spatial_dims: 2 (CXR) or 3 (CT).
        in_channels: image channels.
        img_size: the input size the position embedding is built for; other sizes (multiples of
            the patch size) are accepted and the position embedding is interpolated.
        patch_size: token size per axis (int or one int per axis).
        hidden_size: token width ``D``.
        num_layers: transformer blocks.
        num_heads: attention heads.
        mlp_dim: MLP hidden width (default ``4 * hidden_size``).
        num_anatomies: number of anatomy queries ``M`` (the catalog's anatomies, in order).
        dropout: dropout after the position embedding and inside the blocks (training only).
        pos_embed: ``"learnable"`` or ``"sincos"`` (fixed; not stored in the state dict).
        conv_stem: patch embedding by two strided 3x3 convolutions plus a patchifying convolution
            (default) instead of a single ``patch_size`` convolution.
        gradient_checkpointing: recompute the stem's and the blocks' activations in backward (saves memory).
        qkv_bias: bias in the qkv projections.
        stem_channels: channels of the two stem stages (``conv_stem=True`` only).
        attention: ``"auto"`` (default: the math path under CPU bf16 autocast, SDPA otherwise),
            ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"math"`` (explicit matmul-softmax;
            same result).
        input_windows: extra intensity windows ``(low, high)``, in the input's own units, each
            appended to the stem's input as ``clamp((x - low) / (high - low), 0, 1)`` of every
            channel (e.g. a soft-tissue window of a CT scaled from -1000..1000 HU: soft-tissue
            contrasts of 10-20 HU are 0.005-0.01 of that range, 0.025-0.05 of a 400 HU window).
            The input keeps ``in_channels`` channels; ``stem_input`` holds the windowed image.

    Shapes: ``forward(image (B, in_channels, *S), region_token_mask (B, M, N) | None)`` with every
    ``S[a]`` a multiple of ``patch_size[a]``, ``grid = S // patch_size``, ``N = prod(grid)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        *,
        in_channels: int = 1,
        img_size: Union[int, Sequence[int]],
        patch_size: Union[int, Sequence[int]],
        hidden_size: int = 192,
        num_layers: int = 4,
        num_heads: int = 6,
        mlp_dim: Optional[int] = None,
        num_anatomies: int,
        dropout: float = 0.0,
        pos_embed: str = "learnable",
        conv_stem: bool = True,
        gradient_checkpointing: bool = False,
        qkv_bias: bool = True,
        stem_channels: Sequence[int] = (32, 64),
        attention: str = "auto",
        input_windows: Optional[Sequence[Sequence[float]]] = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"AnatomyViT: spatial_dims must be 2 or 3, got {spatial_dims}")
        img = _as_tuple(img_size, spatial_dims, "img_size")
        patch = _as_tuple(patch_size, spatial_dims, "patch_size")
        if any(p < 1 for p in patch) or any(s % p for s, p in zip(img, patch)):
            raise ValueError(f"AnatomyViT: img_size {img} must be a positive multiple of patch_size {patch} on every axis")
        if hidden_size % num_heads:
            raise ValueError(f"AnatomyViT: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AnatomyViT: dropout must be in [0, 1), got {dropout}")
        if num_anatomies < 1:
            raise ValueError(f"AnatomyViT: num_anatomies must be >= 1, got {num_anatomies}")
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"AnatomyViT: attention must be one of {ATTENTION_TYPES}, got {attention!r}")
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"AnatomyViT: pos_embed must be one of {POS_EMBED_TYPES}, got {pos_embed!r}")
        if pos_embed == "sincos" and hidden_size % (2 * spatial_dims):
            raise ValueError(
                f"AnatomyViT: sincos position embedding needs hidden_size divisible by {2 * spatial_dims} "
                f"in {spatial_dims}D, got {hidden_size}"
            )
        windows: List[List[float]] = []
        for w in input_windows or []:
            lo_hi = [float(v) for v in w]
            if len(lo_hi) != 2 or not lo_hi[1] > lo_hi[0]:
                raise ValueError(f"AnatomyViT: each input window must be (low, high) with high > low, got {tuple(w)}")
            windows.append(lo_hi)
        conv = Conv[Conv.CONV, spatial_dims]

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        # (n, 2) low / high of the input windows, a non-persistent buffer: follows .to(device), stays out
        # of the state dict (the model's config records the windows)
        self.register_buffer("window_bounds", torch.tensor(windows, dtype=torch.float32).reshape(-1, 2), persistent=False)
        #: channels of the stem's input (``stem_input``): the image and each of its windows
        self.stem_in_channels = in_channels * (1 + len(windows))
        self.hidden_size = hidden_size
        self.num_anatomies = num_anatomies
        self.patch_size: List[int] = list(patch)
        self.img_size: List[int] = list(img)
        self.pos_grid: List[int] = [s // p for s, p in zip(img, patch)]
        self.pos_embed_type = pos_embed
        self.conv_stem = conv_stem

        # stem -> "stem_features" (early per-patch features); proj -> tokens on the patch grid
        self.stem: nn.Module
        self.proj: nn.Module
        if conv_stem:
            if len(stem_channels) != 2:
                raise ValueError(f"AnatomyViT: stem_channels must hold 2 channel counts, got {tuple(stem_channels)}")
            # two stride-2 stages where the patch size allows it, the rest in the patchifying conv
            s1 = [2 if p % 2 == 0 else 1 for p in patch]
            s2 = [2 if (p // a) % 2 == 0 else 1 for p, a in zip(patch, s1)]
            s3 = [p // (a * b) for p, a, b in zip(patch, s1, s2)]
            self.stem = nn.Sequential(
                _ConvStage(spatial_dims, self.stem_in_channels, stem_channels[0], s1),
                _ConvStage(spatial_dims, stem_channels[0], stem_channels[1], s2),
            )
            self.proj = conv(stem_channels[1], hidden_size, kernel_size=tuple(s3), stride=tuple(s3))
            self.stem_stride: List[int] = [a * b for a, b in zip(s1, s2)]
            self.stem_channels = int(stem_channels[1])
            # the first stage's output ("stem_early", stride s1) feeds the mask head's fine path
            self.early_stride: List[int] = list(s1)
            self.early_channels = int(stem_channels[0])
        else:
            # plain linear patch embedding (as MONAI's PatchEmbeddingBlock "conv"); its output
            # doubles as the stem features
            self.stem = nn.Sequential(conv(self.stem_in_channels, hidden_size, kernel_size=patch, stride=patch))
            self.proj = nn.Identity()
            self.stem_stride = list(patch)
            self.stem_channels = hidden_size
            self.early_stride = list(patch)
            self.early_channels = hidden_size

        if pos_embed == "learnable":
            self.position_embeddings = nn.Parameter(torch.zeros(1, hidden_size, *self.pos_grid))
            nn.init.trunc_normal_(self.position_embeddings, std=0.02, a=-0.04, b=0.04)
        else:
            # MONAI's sincos table (1, N, D) in row-major grid order -> (1, D, *grid); fixed, so
            # kept out of the state dict (checkpoints load into any input size)
            with warnings.catch_warnings():  # MONAI calls torch.meshgrid without `indexing` ("ij" is meant)
                warnings.simplefilter("ignore", UserWarning)
                table = build_sincos_position_embedding(self.pos_grid, hidden_size, spatial_dims).data
            self.register_buffer(
                "position_embeddings", table.transpose(1, 2).reshape(1, hidden_size, *self.pos_grid), persistent=False
            )
        self.pos_drop = nn.Dropout(dropout)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.anatomy_queries = nn.Parameter(torch.zeros(1, num_anatomies, hidden_size))
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.anatomy_queries, std=0.02, a=-0.04, b=0.04)

        mlp_dim = 4 * hidden_size if mlp_dim is None else mlp_dim
        self.blocks = nn.ModuleList(
            [
                AnatomyTransformerBlock(hidden_size, mlp_dim, num_heads, dropout, qkv_bias, attention)
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.blocks.apply(self._init_weights)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def window_views(self, stem_input: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + windows, *S)``: the stem's input (:meth:`window`) as one channel-averaged view
        per intensity range, the image first, then each window."""
        shape: List[int] = [int(stem_input.shape[0]), -1, int(self.in_channels)]
        for s in stem_input.shape[2:]:
            shape.append(int(s))
        return stem_input.reshape(shape).mean(dim=2)

    def window(self, image: torch.Tensor) -> torch.Tensor:
        """The stem's input: ``image`` with its ``input_windows`` appended as channels."""
        n = int(self.window_bounds.shape[0])
        if n == 0:
            return image
        parts = [image]
        bounds = self.window_bounds.to(image.dtype)
        for i in range(n):
            low, high = bounds[i, 0], bounds[i, 1]
            parts.append(((image - low) / (high - low)).clamp(0.0, 1.0))
        return torch.cat(parts, dim=1)

    def _run_stem(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stem's output and its first stage's output (``early``)."""
        stem = image
        early = image
        for i, stage in enumerate(self.stem):
            stem = stage(stem)
            if i == 0:
                early = stem
        return stem, early

    @torch.jit.unused
    def _checkpointed_stem(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # the stages' normalisation and GELU inputs at the stem's full-resolution grids are
        # recomputed in backward; only the two outputs are kept
        return checkpoint(self._run_stem, image, use_reentrant=False)

    # ------------------------------------------------------------------------------------- public
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Switch activation checkpointing (``use_reentrant=False``) of the conv stem and the
        transformer blocks."""
        self.gradient_checkpointing = bool(enabled)
        for blk in self.blocks:
            blk.gradient_checkpointing = bool(enabled)

    @torch.jit.export
    def token_grid(self, spatial_shape: List[int]) -> List[int]:
        """Token grid (tokens per axis) for an input of ``spatial_shape``."""
        return [int(s) // p for s, p in zip(spatial_shape, self.patch_size)]

    def forward(
        self, image: torch.Tensor, region_token_mask: Optional[torch.Tensor] = None, return_hidden: bool = False
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            image: ``(B, in_channels, *S)``, every ``S[a]`` a multiple of ``patch_size[a]``.
            region_token_mask: optional ``(B, M, N)`` bool, tokens of each anatomy's region (e.g. from
                :func:`masks_to_token_mask`); restricts each query's attention to [CLS], itself and
                its region (an empty region leaves the query unrestricted).
            return_hidden: also return every block's patch tokens (for decoders such as UNETR's).

        Returns:
            dict of tensors:
            ``cls`` ``(B, D)``; ``queries`` ``(B, M, D)``; ``patch_tokens`` ``(B, N, D)`` (row-major
            grid order); ``grid`` int64 CPU tensor ``(spatial_dims,)`` with the token grid
            (``out["grid"].tolist()``); ``stem_features`` ``(B, C_s, *S // stem_stride)``: the stem's
            early per-patch features (the patch embedding itself when ``conv_stem=False``);
            ``stem_early`` ``(B, early_channels, *S // early_stride)``: the first stem stage's output
            (the stem features when ``conv_stem=False``); ``stem_input`` ``(B, stem_in_channels, *S)``:
            the image with its windows (the image itself without ``input_windows``); only with ``return_hidden``:
            ``hidden_states`` ``(num_layers, B, N, D)``, the patch tokens after each block (before
            the final norm).
        """
        if image.dim() != self.spatial_dims + 2:
            raise ValueError(
                "AnatomyViT: image must be (B, C, *spatial) with "
                + str(self.spatial_dims)
                + " spatial dims, got shape "
                + str(list(image.shape))
            )
        if image.shape[1] != self.in_channels:
            raise ValueError(
                "AnatomyViT: image has " + str(image.shape[1]) + " channels, expected " + str(self.in_channels)
            )
        for a in range(self.spatial_dims):
            if image.shape[2 + a] % self.patch_size[a] != 0 or image.shape[2 + a] < self.patch_size[a]:
                raise ValueError(
                    "AnatomyViT: image spatial shape "
                    + str(list(image.shape[2:]))
                    + " is not a multiple of the patch size "
                    + str(self.patch_size)
                )

        stem_input = self.window(image)
        if self.gradient_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            stem, early = self._checkpointed_stem(stem_input)
        else:
            stem, early = self._run_stem(stem_input)
        tokens = self.proj(stem)  # (B, D, *grid)
        grid = [int(s) for s in tokens.shape[2:]]
        b = tokens.shape[0]
        n = _prod(grid)
        pos = self.position_embeddings
        if grid != self.pos_grid:
            pos = interpolate_pos_embed(pos, grid)
        x = tokens.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
        x = self.pos_drop(x)

        m = self.num_anatomies
        x = torch.cat(
            [self.cls_token.expand(b, -1, -1), self.anatomy_queries.expand(b, -1, -1), x.to(self.cls_token.dtype)],
            dim=1,
        )

        attn_mask: Optional[torch.Tensor] = None
        if region_token_mask is not None:
            if (
                region_token_mask.dim() != 3
                or region_token_mask.shape[0] != b
                or region_token_mask.shape[1] != m
                or region_token_mask.shape[2] != n
            ):
                raise ValueError(
                    "AnatomyViT: region_token_mask must be (B, M, N) = "
                    + str([b, m, n])
                    + ", got "
                    + str(list(region_token_mask.shape))
                )
            attn_mask = query_attention_mask(region_token_mask)

        hidden: List[torch.Tensor] = []
        for blk in self.blocks:
            x = blk(x, attn_mask)
            if return_hidden:
                hidden.append(x[:, 1 + m :])
        x = self.norm(x)

        out = {
            "cls": x[:, 0],
            "queries": x[:, 1 : 1 + m],
            "patch_tokens": x[:, 1 + m :],
            "grid": torch.tensor(grid, dtype=torch.long),
            "stem_features": stem,
            "stem_early": early,
            "stem_input": stem_input,
        }
        if return_hidden:
            out["hidden_states"] = torch.stack(hidden)
        return out

    # ------------------------------------------------------------------------------------- loading
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: D401
        # the plain patch embedding was saved as ``stem.weight`` before it became a one-stage Sequential
        if not self.conv_stem:
            for name in ("weight", "bias"):
                if prefix + "stem." + name in state_dict:
                    state_dict[prefix + "stem.0." + name] = state_dict.pop(prefix + "stem." + name)
        # a learnable position embedding saved for another input size is interpolated to ours
        key = prefix + "position_embeddings"
        if self.pos_embed_type == "learnable" and key in state_dict:
            saved = state_dict[key]
            own = self.position_embeddings
            if (
                isinstance(saved, torch.Tensor)
                and saved.dim() == own.dim()
                and saved.shape[:2] == own.shape[:2]
                and saved.shape[2:] != own.shape[2:]
            ):
                logger.info(
                    "interpolating position embedding from grid %s to %s", list(saved.shape[2:]), self.pos_grid
                )
                state_dict[key] = interpolate_pos_embed(saved.detach().float(), self.pos_grid).to(saved.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _prod(values: List[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out
