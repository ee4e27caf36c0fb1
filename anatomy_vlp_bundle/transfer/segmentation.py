"""Segmentation transfer: a UNETR-style decoder on the :class:`AnatomyViT` encoder (2D and 3D).

- :class:`UNETRSegmenter`: MONAI's UNETR wiring (Hatamizadeh et al. 2022) around the encoder's
  patch tokens, generalised to any power-of-two patch size and any depth. For patch size
  ``p = 2**k`` the decoder has ``k`` upsampling stages: level 0 is the full-resolution image,
  level ``l`` (``1 <= l < k``) a skip from an intermediate block's patch tokens brought from the
  token grid to ``S / 2**l`` by ``k - l`` transposed convolutions (``UnetrPrUpBlock``), and the
  encoder's final (normed) patch tokens are the bottleneck at level ``k``. Deeper skips come from
  deeper blocks, spread over the depth as UNETR's blocks 3/6/9 of 12 (:func:`skip_layers`).
  The anatomy queries take no part in the decoder.
- :func:`train_segmenter`: a short, seeded training on in-memory tensors (Dice + focal loss with
  sigmoid, i.e. multi-label channels), with the encoder frozen or fine-tuned at its own rate.
- :func:`segmentation_dice`: per-channel Dice over cases with a stated empty-mask convention.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn as nn
from monai.losses import DiceFocalLoss
from monai.metrics import DiceMetric
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from ..networks.anatomy_vit import AnatomyViT

__all__ = ["UNETRSegmenter", "skip_layers", "train_segmenter", "segmentation_dice"]

#: Normalisation of the decoder blocks (MONAI UNETR's default).
NORM_NAME = "instance"


def skip_layers(num_layers: int, num_stages: int) -> list[int]:
    """Which transformer block feeds each intermediate skip (0-based block indices).

    Skip ``l`` (``1 <= l < num_stages``, coarser for larger ``l``) takes block
    ``round(num_layers * l / num_stages)`` (1-based, at least 1): UNETR's 3, 6, 9 for 12 blocks and
    4 stages; with fewer blocks than skips, blocks are shared.

    Args:
        num_layers: transformer blocks of the encoder (>= 1).
        num_stages: upsampling stages of the decoder, ``log2(patch_size)``.

    Returns:
        ``num_stages - 1`` block indices into ``hidden_states``, shallow to deep.
    """
    return [max(1, (2 * num_layers * level + num_stages) // (2 * num_stages)) - 1 for level in range(1, num_stages)]


class UNETRSegmenter(nn.Module):
    """UNETR-style segmentation network on an :class:`AnatomyViT` encoder (2D or 3D).

    Args:
        encoder: the encoder, pre-trained or random; a copy is used (its weights as given), so one
            loaded encoder can seed several segmenters without one training changing another.
        out_channels: output channels ``K`` (one logit map per label; channels may overlap).
        feature_size: decoder width at full resolution; level ``l`` has ``feature_size * 2**l``.
        freeze_encoder: the encoder's parameters get ``requires_grad=False``, it stays in eval
            mode (no dropout) when the segmenter trains, and it runs without autograd.

    Shapes: ``forward(image (B, C, *S)) -> logits (B, K, *S)``, every ``S[a]`` a multiple of the
    (isotropic, power-of-two, >= 2) patch size of the encoder.
    """

    def __init__(self, encoder: AnatomyViT, out_channels: int, feature_size: int = 16, freeze_encoder: bool = False) -> None:
        super().__init__()
        patch = set(int(p) for p in encoder.patch_size)
        p = patch.pop()
        if patch or p < 2 or p & (p - 1):
            raise ValueError(
                f"UNETRSegmenter: the encoder's patch size must be one power of two >= 2 on every axis, got {encoder.patch_size}"
            )
        num_layers = len(encoder.blocks)
        if num_layers < 1:
            raise ValueError("UNETRSegmenter: the encoder has no transformer block")
        if out_channels < 1 or feature_size < 1:
            raise ValueError(f"UNETRSegmenter: out_channels and feature_size must be >= 1, got {out_channels}, {feature_size}")
        dims, hidden = encoder.spatial_dims, encoder.hidden_size
        stages = p.bit_length() - 1
        self.encoder = copy.deepcopy(encoder)
        self.out_channels = int(out_channels)
        self.freeze_encoder = bool(freeze_encoder)
        self.num_stages = stages
        self.skip_layers: list[int] = skip_layers(num_layers, stages)
        block = dict(spatial_dims=dims, kernel_size=3, norm_name=NORM_NAME, res_block=True)

        def width(level: int) -> int:
            return feature_size * 2**level

        self.image_skip = UnetrBasicBlock(in_channels=encoder.in_channels, out_channels=width(0), stride=1, **block)
        # level l: k - l upsamplings from the token grid (the first inside the block, num_layer more)
        self.token_skips = nn.ModuleList(
            [
                UnetrPrUpBlock(in_channels=hidden, out_channels=width(level), num_layer=stages - level - 1, stride=1,
                               upsample_kernel_size=2, conv_block=True, **block)
                for level in range(1, stages)
            ]
        )
        # decoders[i] goes from level k - i to level k - i - 1
        self.decoders = nn.ModuleList(
            [
                UnetrUpBlock(in_channels=hidden if level == stages - 1 else width(level + 1), out_channels=width(level),
                             upsample_kernel_size=2, **block)
                for level in reversed(range(stages))
            ]
        )
        self.out = UnetOutBlock(spatial_dims=dims, in_channels=width(0), out_channels=out_channels)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "UNETRSegmenter":
        """As ``nn.Module.train``; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the encoder."""
        return (p for name, p in self.named_parameters() if not name.startswith("encoder."))

    def _to_grid(self, tokens: torch.Tensor, grid: list[int]) -> torch.Tensor:
        """``(B, N, D)`` row-major patch tokens -> ``(B, D, *grid)``."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, C, *S)`` -> logits ``(B, out_channels, *S)``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            feats = self.encoder(image, None, True)
        grid = [int(g) for g in feats["grid"].tolist()]
        hidden = feats["hidden_states"]
        skips = [self.image_skip(image)]
        skips += [block(self._to_grid(hidden[i], grid)) for block, i in zip(self.token_skips, self.skip_layers)]
        x = self._to_grid(feats["patch_tokens"], grid)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
        return self.out(x)


def _check_data(model: UNETRSegmenter, images: torch.Tensor, masks: torch.Tensor, what: str) -> None:
    if images.dim() != masks.dim() or images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[2:]:
        raise ValueError(
            f"{what}: images (N, C, *S) and masks (N, K, *S) must agree in N and S, got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{what}: no cases")
    out_channels = getattr(model, "out_channels", masks.shape[1])
    if masks.shape[1] != out_channels:
        raise ValueError(f"{what}: masks have {masks.shape[1]} channels, the model predicts {out_channels}")


def train_segmenter(
    model: UNETRSegmenter,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 4,
    lr: float = 1e-3,
    encoder_lr: Optional[float] = None,
    seed: int = 0,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Train ``model`` on random minibatches of in-memory cases (AdamW, Dice + focal loss).

    The loss is MONAI's ``DiceFocalLoss`` with sigmoid (each channel its own binary problem, so
    labels may overlap) and the Dice term over the whole batch (``batch=True``: a case whose
    channel is empty, e.g. no lesion, does not make its own 0/0 Dice term). Each step draws
    ``batch_size`` distinct cases from a ``torch.Generator`` seeded with ``seed``; the global RNG
    (dropout) is seeded with ``seed`` too and restored afterwards, so a run depends on ``seed`` only.

    Args:
        model: the segmenter; trained in place, left on ``device`` in eval mode.
        images: ``(N, C, *S)`` float in [0, 1] (moved to ``device`` one batch at a time).
        masks: ``(N, K, *S)`` binary (uint8 / bool / float), ``K = model.out_channels``.
        steps: optimisation steps.
        batch_size: cases per step (at most ``N``).
        lr: learning rate of the decoder.
        encoder_lr: learning rate of the encoder when it is fine-tuned (default ``lr / 10``);
            unused with a frozen encoder.
        seed: seed of the batch sampling and of dropout.
        progress: tqdm bar.
        device: where to train.

    Returns:
        ``{"loss": [loss of each step]}``.
    """
    from tqdm.auto import tqdm

    _check_data(model, images, masks, "train_segmenter")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_segmenter: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    device = torch.device(device)
    model.to(device)
    groups: list[dict[str, Any]] = [{"params": list(model.decoder_parameters()), "lr": lr}]
    if not model.freeze_encoder:
        groups.append({"params": list(model.encoder.parameters()), "lr": lr / 10 if encoder_lr is None else encoder_lr})
    optimizer = torch.optim.AdamW(groups)
    loss_fn = DiceFocalLoss(sigmoid=True, batch=True)
    sampler = torch.Generator().manual_seed(seed)
    n, batch = images.shape[0], min(batch_size, images.shape[0])
    history: list[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        bar = tqdm(range(steps), desc="segmentation", unit="step", disable=not progress)
        for _ in bar:
            idx = torch.randperm(n, generator=sampler)[:batch]
            x = images[idx].to(device=device, dtype=torch.float32)
            y = masks[idx].to(device=device, dtype=torch.float32)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return {"loss": history}


@torch.no_grad()
def segmentation_dice(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Per-channel Dice of thresholded predictions, averaged over cases.

    A voxel is predicted positive when ``sigmoid(logit) > 0.5`` (logit > 0). Per case and channel
    (MONAI ``DiceMetric``, ``ignore_empty=False``): ``2 |P & T| / (|P| + |T|)``; a channel empty in
    both truth and prediction counts as Dice **1**, an empty truth with a non-empty prediction as 0.

    Args:
        model: maps ``(B, C, *S)`` images to ``(B, K, *S)`` logits (put in eval mode, moved to ``device``).
        images: ``(N, C, *S)`` float.
        masks: ``(N, K, *S)`` binary truth.
        batch_size: cases per forward pass.
        device: where to run the model.

    Returns:
        ``mean_dice``: mean of the per-channel values; ``per_channel``: channel index -> mean Dice
        over the cases; ``per_case``: ``N`` lists of ``K`` values.
    """
    _check_data(model, images, masks, "segmentation_dice")
    device = torch.device(device)
    model.to(device).eval()
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size].to(device=device, dtype=torch.float32))
        truth = masks[start : start + batch_size].to(device=device)
        metric(y_pred=(logits > 0).float(), y=(truth != 0).float())
    per_case = metric.aggregate().cpu()  # (N, K)
    per_channel = per_case.mean(dim=0)
    return {
        "mean_dice": float(per_channel.mean()),
        "per_channel": {k: float(v) for k, v in enumerate(per_channel)},
        "per_case": per_case.tolist(),
    }
