"""Anatomy normality prior: a per-patch VQ-VAE fitted on normal anatomies only (ViSD-Boost).

The prior sees the early, per-patch features of the backbone (``stem_features`` flattened to
``(B, C, N)``) of the patches inside each anatomy's region (``region_token_mask`` ``(B, M, N)``).
Every (sample, anatomy, patch) triple selected by the mask is

1. normalised per channel with running statistics gathered from normal anatomies only (so the
   scale of the backbone's features does not matter and abnormal patches never shift them),
2. encoded by an anatomy-conditioned MLP (the anatomy id enters as a learned embedding added
   to the first layer, which is a linear layer over ``[feature ; one-hot(anatomy)]``; an MLP
   rather than ViSD-Boost's 2-layer transformer over the organ's tokens because each patch is
   scored on its own and the MLP costs a few hundred FLOPs per patch),
3. quantised to the nearest code of *its own anatomy's* partition of one MONAI ``EMAQuantizer``
   codebook of ``num_anatomies * codes_per_anatomy`` codes (anatomy ``i`` owns codes
   ``[i*K, (i+1)*K)``),
4. decoded back to the feature space (anatomy-conditioned MLP).

Only normal anatomies teach the prior: the commitment and reconstruction losses are averaged over
the patches of normal anatomies, and only their patches move the codebook. An abnormal patch is
therefore reconstructed as the nearest *normal* pattern of its anatomy; its residual (feature
minus reconstruction) and error are large. The worst patch error of an anatomy is its abnormality
score; the per-patch errors form a deviation map on the token grid.

Design notes (why it is written this way):

- The lookup is a partition-restricted nearest-code search written with plain tensor ops
  (:func:`partitioned_nearest_code`). It loops over anatomies and compares each anatomy's patches
  with its own ``K`` codes, so memory is ``P x K`` instead of the ``P x M*K`` of an ``+inf``-masked
  full distance matrix. The same function serves training, evaluation and the TorchScript export.
- The codebook, its EMA buffers and the EMA update are MONAI's (:class:`PartitionedEMAQuantizer`
  subclasses ``EMAQuantizer``). MONAI's update only needs, per code, the number of assigned
  vectors and their sum (``encodings.sum(0)`` and ``encodings.t() @ flat_input``), so the update
  call is fed one pseudo-vector per code used by normal patches (their mean) with a one-hot row
  scaled by the count. This gives exactly MONAI's update for the normal patches, never sees
  abnormal ones, and costs ``U x M*K`` (``U`` = codes used) instead of a ``P x M*K`` one-hot.
- Partitions whose anatomy had no normal patch in the step (over all ranks) are restored after
  MONAI's update, which would otherwise decay their statistics (and, for a fresh codebook with
  zero vectors, divide by zero and write ``inf``). A rare anatomy's codes therefore stay where
  its last normal patches put them.
- A partition is initialised from data the first time its anatomy has normal patches: its codes
  are drawn from a Gaussian fitted to those patches' encodings (MONAI's ``N(0, 1)`` codes are
  usually far from the encoder's output and most of them would never be used). Its EMA cluster
  sizes start at 1, so the EMA never divides by a zero count.
- DDP (``ddp_sync=True`` with an initialised process group): every training-mode ``forward``
  makes the same collectives on every rank whatever its data — one all-reduce of the feature
  statistics, one of the per-anatomy encoding statistics, and MONAI's two all-reduces inside the
  EMA update, which is called exactly once per call (with a zero-weight dummy row when the rank
  has no normal patch). Every branch that depends on data is taken on all-reduced numbers, so all
  ranks take the same branch: nothing can hang as long as every rank calls ``forward`` equally
  often (which DDP requires anyway). Without a process group the update is skipped when there is
  no normal patch at all.
- Outputs other than the losses are detached: downstream losses (alignment, prompts) read the
  residuals but cannot reshape the prior, which is fitted on normal anatomies only.
- In eval mode ``forward`` is TorchScript-compatible (``torch.jit.script(prior.eval())``): the
  training-only steps (statistics and codebook updates, which call MONAI's unscriptable update)
  are ``torch.jit.unused``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from monai.networks.layers.vector_quantizer import EMAQuantizer
from torch import nn

__all__ = [
    "NormalityPrior",
    "PartitionedEMAQuantizer",
    "ConditionedMLP",
    "partitioned_nearest_code",
    "dense_nearest_code",
    "fit_score_calibration",
    "calibrated_abnormality",
]


def _sync_enabled(ddp_sync: bool) -> bool:
    """True when statistics must be all-reduced over ranks."""
    return ddp_sync and dist.is_available() and dist.is_initialized()


def partitioned_nearest_code(
    z: torch.Tensor, anatomy_ids: torch.Tensor, codebook: torch.Tensor, codes_per_anatomy: int
) -> torch.Tensor:
    """Index of the nearest code of each vector's own anatomy partition.

    Args:
        z: encodings, shape ``(P, D)``.
        anatomy_ids: anatomy index of each row of ``z``, shape ``(P,)``, integers in ``[0, M)``.
        codebook: code vectors, shape ``(M * K, D)``; anatomy ``i`` owns rows ``[i*K, (i+1)*K)``.
        codes_per_anatomy: ``K``.

    Returns:
        global code indices, shape ``(P,)`` (``int64``); row ``p`` lies in its anatomy's partition.
    """
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling():  # torch.export / torch.compile: no data-dependent indexing
            return dense_nearest_code(z, anatomy_ids, codebook, codes_per_anatomy)
    codes = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    num_anatomies = codebook.shape[0] // codes_per_anatomy
    z = z.float()
    for m in range(num_anatomies):
        rows = torch.nonzero(anatomy_ids == m).squeeze(1)
        if rows.numel() == 0:
            continue
        part = codebook[m * codes_per_anatomy : (m + 1) * codes_per_anatomy].float()
        # ||z||^2 is the same for every code of a row: it does not change the argmin.
        dist2 = (part * part).sum(1).unsqueeze(0) - 2.0 * torch.mm(z[rows], part.t())
        codes[rows] = torch.argmin(dist2, dim=1) + m * codes_per_anatomy
    return codes


def dense_nearest_code(
    z: torch.Tensor, anatomy_ids: torch.Tensor, codebook: torch.Tensor, codes_per_anatomy: int
) -> torch.Tensor:
    """:func:`partitioned_nearest_code` as one dense ``(P, M * K)`` distance matrix with the other
    partitions masked out: no data-dependent indexing (``torch.export``), same result (ties go to
    the lowest index), but measured about 30x slower on the CPU for a training batch (12k rows,
    10 x 64 codes: 117 ms against 4 ms), so training uses the partitioned loop."""
    book = codebook.float()
    dist2 = (book * book).sum(1).unsqueeze(0) - 2.0 * torch.mm(z.float(), book.t())
    owner = torch.div(torch.arange(book.shape[0], device=z.device), codes_per_anatomy, rounding_mode="floor")
    dist2 = dist2.masked_fill(owner.unsqueeze(0) != anatomy_ids.to(owner.dtype).unsqueeze(1), float("inf"))
    return torch.argmin(dist2, dim=1)


class PartitionedEMAQuantizer(EMAQuantizer):
    """MONAI ``EMAQuantizer`` whose codebook is split in equal partitions, one per anatomy.

    The codebook (``embedding.weight``), the EMA buffers (``ema_w``, ``ema_cluster_size``) and the
    EMA update (decay, Laplace smoothing, optional DDP all-reduce) are MONAI's. Lookups go through
    :meth:`lookup` (partition-restricted, plain tensor ops, scriptable); the EMA update through
    :meth:`update_from_statistics`, which feeds MONAI's ``forward`` per-code sufficient statistics
    (see the module docstring). The module scripts (its MONAI ``forward`` is marked unused) so that a
    scripted parent can read the codebook.

    Args:
        num_anatomies: number of partitions ``M``.
        codes_per_anatomy: codes per partition ``K``.
        embedding_dim: code dimension ``D``.
        commitment_cost: weight of the commitment loss (kept for MONAI; the prior computes its own).
        decay: EMA decay.
        epsilon: Laplace smoothing of the cluster sizes.
        ddp_sync: all-reduce the EMA statistics over ranks (when a process group is initialised).
    """

    def __init__(
        self,
        num_anatomies: int,
        codes_per_anatomy: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        ddp_sync: bool = False,
    ):
        super().__init__(
            spatial_dims=2,
            num_embeddings=num_anatomies * codes_per_anatomy,
            embedding_dim=embedding_dim,
            commitment_cost=commitment_cost,
            decay=decay,
            epsilon=epsilon,
            embedding_init="normal",
            ddp_sync=ddp_sync,
        )
        self.num_anatomies: int = num_anatomies
        self.codes_per_anatomy: int = codes_per_anatomy
        with torch.no_grad():
            # A pseudo-count of 1 per code (ema_w = code * 1): the EMA starts as if each code had
            # been seen once where it is, so no division by a zero cluster size ever happens.
            self.ema_cluster_size.fill_(1.0)
            self.ema_w.copy_(self.embedding.weight)
        # True once the partition was placed on data (see NormalityPrior._initialise_partitions).
        self.register_buffer("partition_initialised", torch.zeros(num_anatomies, dtype=torch.bool))
        self._pending_counts: Optional[torch.Tensor] = None
        self._step_counts: Optional[torch.Tensor] = None

    def lookup(self, z: torch.Tensor, anatomy_ids: torch.Tensor) -> torch.Tensor:
        """Global index of the nearest code in each row's anatomy partition (no EMA update).

        Args:
            z: ``(P, D)`` encodings.
            anatomy_ids: ``(P,)`` anatomy index of each row.

        Returns:
            ``(P,)`` code indices.
        """
        return partitioned_nearest_code(z, anatomy_ids, self.embedding.weight, self.codes_per_anatomy)

    @torch.jit.unused
    def quantize(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Called by MONAI's ``forward`` during :meth:`update_from_statistics` only.

        ``inputs`` ``(1, D, U, 1)`` holds the mean of the vectors assigned to each of ``U`` codes;
        the returned "encodings" are one-hot rows scaled by the counts, so MONAI's
        ``encodings.sum(0)`` is the count per code and ``encodings.t() @ flat_input`` the sum.
        """
        if self._pending_counts is None:
            raise RuntimeError(
                "PartitionedEMAQuantizer: call lookup() to quantise and update_from_statistics() to "
                "update the codebook; the MONAI forward is used internally only"
            )
        codes, counts = self._pending_counts[0].long(), self._pending_counts[1]
        flat_input = inputs.float().permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)
        encodings = torch.zeros(codes.shape[0], self.num_embeddings, device=inputs.device)
        encodings[torch.arange(codes.shape[0], device=inputs.device), codes] = counts
        self._step_counts = encodings.sum(0)
        return flat_input, encodings, codes.view(1, -1, 1)

    @torch.jit.unused
    def distributed_synchronization(self, encodings_sum: torch.Tensor, dw: torch.Tensor) -> None:
        super().distributed_synchronization(encodings_sum, dw)
        # After the all-reduce: the counts of all ranks decide which partitions moved.
        self._step_counts = encodings_sum.detach().clone()

    @torch.jit.unused
    def forward(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return super().forward(inputs)

    @torch.jit.unused
    def update_from_statistics(self, codes: torch.Tensor, z: torch.Tensor, force_call: bool = False) -> None:
        """EMA update of the codebook from the vectors ``z`` assigned to ``codes`` (normal patches).

        Args:
            codes: ``(P,)`` global code index of each vector.
            z: ``(P, D)`` vectors (detached).
            force_call: call MONAI's update even with no vector (a zero-weight dummy row), as every
                rank must when the EMA statistics are all-reduced. Partitions without any vector
                (over all ranks) are restored afterwards, so such a call moves nothing.
        """
        if codes.numel() == 0 and not force_call:
            return
        with torch.no_grad():
            z = z.detach().float()
            used, inverse, counts = torch.unique(codes, return_inverse=True, return_counts=True)
            sums = torch.zeros(used.shape[0], self.embedding_dim, device=z.device).index_add_(0, inverse, z)
            means = sums / counts.unsqueeze(1).float()
            counts = counts.float()
            if used.numel() == 0:  # zero-weight dummy row: adds nothing to counts and sums
                used = torch.zeros(1, dtype=torch.long, device=z.device)
                counts = torch.zeros(1, device=z.device)
                means = torch.zeros(1, self.embedding_dim, device=z.device)
            saved = (self.ema_cluster_size.clone(), self.ema_w.clone(), self.embedding.weight.detach().clone())
            self._pending_counts = torch.stack([used.float(), counts])
            self._step_counts = None
            was_training = self.training
            try:
                self.train()  # MONAI updates the EMA in training mode only
                self.forward(means.t().reshape(1, self.embedding_dim, -1, 1))
            finally:
                self.train(was_training)
                self._pending_counts = None
            step_counts = self._step_counts
            self._step_counts = None
            assert step_counts is not None
            moved = step_counts.view(self.num_anatomies, self.codes_per_anatomy).sum(1) > 0
            frozen = (~moved).repeat_interleave(self.codes_per_anatomy)
            self.ema_cluster_size[frozen] = saved[0][frozen]
            self.ema_w[frozen] = saved[1][frozen]
            self.embedding.weight[frozen] = saved[2][frozen]

    @torch.jit.unused
    def initialise_partitions(self, mean: torch.Tensor, std: torch.Tensor, which: torch.Tensor) -> None:
        """Place the codes of the anatomies in ``which`` on ``mean + std * current code``.

        The current codes are MONAI's ``N(0, 1)`` initialisation (identical on every rank after DDP's
        initial broadcast), so the new codes follow a diagonal Gaussian fitted to the data.

        Args:
            mean: ``(M, D)`` per-anatomy mean of the encodings.
            std: ``(M, D)`` per-anatomy standard deviation.
            which: ``(M,)`` bool, partitions to initialise.
        """
        with torch.no_grad():
            weight = self.embedding.weight.view(self.num_anatomies, self.codes_per_anatomy, -1)
            new = mean.unsqueeze(1) + std.unsqueeze(1) * weight
            weight[which] = new[which]
            per_code = which.repeat_interleave(self.codes_per_anatomy)
            self.ema_cluster_size[per_code] = 1.0
            self.ema_w[per_code] = self.embedding.weight[per_code]
            self.partition_initialised |= which


class ConditionedMLP(nn.Module):
    """Per-row MLP conditioned on an anatomy id.

    ``fc1(x) + embedding[id]`` equals a linear layer over ``[x ; one-hot(id)]``: the condition enters
    as a learned per-anatomy offset of the first hidden layer.

    Args:
        in_dim: input width.
        hidden_dim: hidden width.
        out_dim: output width.
        num_conditions: number of anatomy ids.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_conditions: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.condition = nn.Embedding(num_conditions, hidden_dim)
        nn.init.normal_(self.condition.weight, std=0.02)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
        """``x`` ``(P, in_dim)``, ``condition_ids`` ``(P,)`` -> ``(P, out_dim)``."""
        h = self.act(self.fc1(x) + self.condition(condition_ids))
        h = self.act(self.fc2(h))
        return self.fc3(h)


class NormalityPrior(nn.Module):
    """Per-patch anatomy normality prior (see the module docstring).

    Args:
        feature_dim: channels ``C`` of the per-patch features.
        num_anatomies: number of anatomies ``M``.
        codes_per_anatomy: codes in each anatomy's partition (ViSD-Boost: 100).
        code_dim: code (latent) dimension.
        hidden_dim: hidden width of the encoder and decoder MLPs.
        decay: EMA decay of the codebook.
        commitment_cost: weight of the commitment loss.
        epsilon: Laplace smoothing of the EMA cluster sizes.
        top_k: number of worst patches whose residuals are averaged in ``residual_stats``.
        ddp_sync: all-reduce the feature statistics and the codebook EMA over ranks.
        norm_momentum: momentum of the running feature statistics once warmed up (before that
            they are the exact average of all normal patches seen).
        num_score_quantiles: quantiles stored per anatomy for the calibrated abnormality.
    """

    def __init__(
        self,
        feature_dim: int,
        num_anatomies: int,
        codes_per_anatomy: int = 64,
        code_dim: int = 64,
        hidden_dim: int = 128,
        decay: float = 0.99,
        commitment_cost: float = 0.25,
        epsilon: float = 1e-5,
        top_k: int = 4,
        ddp_sync: bool = False,
        norm_momentum: float = 0.01,
        num_score_quantiles: int = 101,
    ):
        super().__init__()
        for name, value in (
            ("feature_dim", feature_dim),
            ("num_anatomies", num_anatomies),
            ("codes_per_anatomy", codes_per_anatomy),
            ("code_dim", code_dim),
            ("hidden_dim", hidden_dim),
            ("top_k", top_k),
        ):
            if int(value) < 1:
                raise ValueError(f"NormalityPrior: {name} must be a positive integer, got {value!r}")
        if num_score_quantiles < 2:
            raise ValueError(f"NormalityPrior: num_score_quantiles must be >= 2, got {num_score_quantiles}")
        self.feature_dim: int = int(feature_dim)
        self.num_anatomies: int = int(num_anatomies)
        self.codes_per_anatomy: int = int(codes_per_anatomy)
        self.code_dim: int = int(code_dim)
        self.top_k: int = int(top_k)
        self.commitment_cost: float = float(commitment_cost)
        self.ddp_sync: bool = bool(ddp_sync)
        self.norm_momentum: float = float(norm_momentum)

        self.encoder = ConditionedMLP(feature_dim, hidden_dim, code_dim, num_anatomies)
        self.decoder = ConditionedMLP(code_dim, hidden_dim, feature_dim, num_anatomies)
        self.quantizer = PartitionedEMAQuantizer(
            num_anatomies, codes_per_anatomy, code_dim, commitment_cost, decay, epsilon, ddp_sync
        )
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_var", torch.ones(feature_dim))
        self.register_buffer("feature_count", torch.zeros(()))
        self.register_buffer("score_quantiles", torch.zeros(num_anatomies, num_score_quantiles))
        self.register_buffer("score_calibrated", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ lookups and calibration
    @torch.jit.export
    def nearest_code_lookup(self, z: torch.Tensor, anatomy_ids: torch.Tensor) -> torch.Tensor:
        """Nearest code of each row's own anatomy, with plain tensor ops (no EMA update).

        Args:
            z: ``(P, code_dim)`` encodings.
            anatomy_ids: ``(P,)`` anatomy index of each row.

        Returns:
            ``(P,)`` global code indices (``anatomy * codes_per_anatomy + j``); the code vectors
            are ``self.codebook[indices]``.
        """
        return self.quantizer.lookup(z, anatomy_ids)

    @property
    def codebook(self) -> torch.Tensor:
        """``(M * K, code_dim)`` code vectors (anatomy ``i`` owns rows ``[i*K, (i+1)*K)``)."""
        return self.quantizer.embedding.weight

    @torch.jit.unused
    def set_score_calibration(self, quantiles: torch.Tensor) -> None:
        """Store per-anatomy quantiles (from :func:`fit_score_calibration`) used for ``abnormality``.

        Args:
            quantiles: ``(M, num_score_quantiles)`` increasing along the last dim.
        """
        if tuple(quantiles.shape) != tuple(self.score_quantiles.shape):
            raise ValueError(
                f"NormalityPrior.set_score_calibration: quantiles must have shape "
                f"{tuple(self.score_quantiles.shape)}, got {tuple(quantiles.shape)}"
            )
        with torch.no_grad():
            self.score_quantiles.copy_(quantiles)
            self.score_calibrated.fill_(True)

    # ------------------------------------------------------------------ training-only updates
    @torch.jit.unused
    def _update_feature_statistics(self, x_normal: torch.Tensor) -> None:
        """Fold the normal patches ``(P_n, C)`` into the running per-channel mean and variance."""
        with torch.no_grad():
            count = torch.tensor([float(x_normal.shape[0])], device=x_normal.device)
            packed = torch.cat([count, x_normal.sum(0), (x_normal * x_normal).sum(0)])
            if _sync_enabled(self.ddp_sync):
                dist.all_reduce(packed)  # every rank, every training call: same collective sequence
            n = float(packed[0].item())
            if n == 0.0:
                return
            c = self.feature_dim
            mean_b = packed[1 : 1 + c] / n
            var_b = (packed[1 + c :] / n - mean_b * mean_b).clamp(min=0.0)
            # exact running average until warmed up, exponential afterwards
            a = max(self.norm_momentum, n / (float(self.feature_count.item()) + n))
            delta = mean_b - self.feature_mean
            self.feature_var.mul_(1.0 - a).add_(a * var_b + a * (1.0 - a) * delta * delta)
            self.feature_mean.add_(a * delta)
            self.feature_count.add_(n)

    @torch.jit.unused
    def _initialise_partitions(self, z: torch.Tensor, anatomy_ids: torch.Tensor, normal: torch.Tensor) -> None:
        """Fit each new anatomy's codes to its normal patches' encodings (first sight only)."""
        initialised = self.quantizer.partition_initialised
        sync = _sync_enabled(self.ddp_sync)
        if bool(initialised.all()) and not sync:
            return
        with torch.no_grad():
            m, d = self.num_anatomies, self.code_dim
            z = z[normal].float()
            ids = anatomy_ids[normal]
            stats = torch.zeros(m, 1 + 2 * d, device=z.device)
            stats.index_add_(0, ids, torch.cat([torch.ones_like(z[:, :1]), z, z * z], 1))
            if sync:
                dist.all_reduce(stats)  # unconditional with a process group: no rank can skip it
            count = stats[:, 0]
            which = (count >= 2) & ~initialised
            if not bool(which.any()):
                return
            mean = stats[:, 1 : 1 + d] / count.clamp(min=1).unsqueeze(1)
            var = stats[:, 1 + d :] / count.clamp(min=1).unsqueeze(1) - mean * mean
            std = var.clamp(min=1e-8).sqrt()
            self.quantizer.initialise_partitions(mean, std, which)

    # ------------------------------------------------------------------ forward
    def _check_inputs(
        self, patch_features: torch.Tensor, region_token_mask: torch.Tensor, normal: Optional[torch.Tensor]
    ) -> None:
        if patch_features.dim() != 3 or patch_features.shape[1] != self.feature_dim:
            raise ValueError(
                "NormalityPrior: patch_features must have shape (B, C=" + str(self.feature_dim) + ", N), got "
                + str(list(patch_features.shape))
            )
        b, n = patch_features.shape[0], patch_features.shape[2]
        if region_token_mask.dim() != 3 or region_token_mask.shape[0] != b or region_token_mask.shape[2] != n:
            raise ValueError(
                "NormalityPrior: region_token_mask must have shape (B=" + str(b) + ", M, N=" + str(n) + "), got "
                + str(list(region_token_mask.shape))
            )
        if region_token_mask.shape[1] != self.num_anatomies:
            raise ValueError(
                "NormalityPrior: region_token_mask has " + str(region_token_mask.shape[1])
                + " anatomies, the prior was built for " + str(self.num_anatomies)
            )
        if region_token_mask.dtype != torch.bool:
            raise TypeError(
                "NormalityPrior: region_token_mask must be a bool tensor, got " + str(region_token_mask.dtype)
            )
        if normal is not None:
            if normal.dtype != torch.bool:
                # label codes (1/0/-1/-2) must not be read as truth values
                raise TypeError(
                    "NormalityPrior: normal must be a bool tensor (True = normal), got " + str(normal.dtype)
                )
            if list(normal.shape) != [b, self.num_anatomies]:
                raise ValueError(
                    "NormalityPrior: normal must have shape (B, M) = " + str([b, self.num_anatomies]) + ", got "
                    + str(list(normal.shape))
                )

    def forward(
        self, patch_features: torch.Tensor, region_token_mask: torch.Tensor, normal: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Score every patch of every anatomy's region against the normal prior.

        Args:
            patch_features: ``(B, C, N)`` per-patch features (the backbone's ``stem_features``
                flattened over the token grid); detached here.
            region_token_mask: ``(B, M, N)`` bool, patches inside each anatomy's region.
            normal: ``(B, M)`` bool, True for anatomies known to be normal (they alone enter the
                losses and move the codebook); None = no anatomy is known normal.

        Returns:
            dict with (``P`` = number of selected (sample, anatomy, patch) triples, in the order
            of ``region_token_mask.nonzero()``):

            - ``patch_error`` ``(B, M, N)``: mean squared residual of each patch in the region,
              0 outside (reshape ``N`` to the token grid for a heatmap).
            - ``anatomy_score`` ``(B, M)``: worst patch error of the region (0 if empty).
            - ``abnormality`` ``(B, M)``: ``anatomy_score`` as a percentile among normal validation
              anatomies of the same kind (NaN until :meth:`set_score_calibration`).
            - ``residual_stats`` ``(B, M, 2C)``: ``[mean residual of the top_k worst patches ;
              residual of the worst patch]`` (zeros for an empty region; fewer than top_k
              patches: mean over those present).
            - ``loss_commitment``, ``loss_reconstruction``: scalars over the patches of normal
              anatomies (zero but connected to the graph when there are none).
            - ``perplexity``: scalar, per-anatomy codebook perplexity (exp entropy of the code
              usage within the anatomy's partition) averaged over anatomies with patches.
            - ``patch_index`` ``(P, 3)`` (b, m, n), ``code_index`` ``(P,)``, ``recon`` ``(P, C)``,
              ``residual`` ``(P, C)``, ``error`` ``(P,)``: the flat per-patch values.

            Residuals and errors are in normalised feature units; all outputs except the losses
            are detached.
        """
        self._check_inputs(patch_features, region_token_mask, normal)
        bsz, c, n_tok = patch_features.shape
        m_anat, k_codes = self.num_anatomies, self.codes_per_anatomy
        device = patch_features.device

        index = torch.nonzero(region_token_mask)  # (P, 3): memory follows the region sizes
        b_idx, m_idx, n_idx = index[:, 0], index[:, 1], index[:, 2]
        x = patch_features.detach().float().permute(0, 2, 1)[b_idx, n_idx]  # (P, C)
        if normal is None:
            normal_tok = torch.zeros(b_idx.shape[0], dtype=torch.bool, device=device)
        else:
            normal_tok = normal[b_idx, m_idx]

        if self.training and not torch.jit.is_scripting():
            self._update_feature_statistics(x[normal_tok])
        x = (x - self.feature_mean) / torch.sqrt(self.feature_var + 1e-5)

        z = self.encoder(x, m_idx)
        if self.training and not torch.jit.is_scripting():
            self._initialise_partitions(z.detach(), m_idx, normal_tok)
        codes = self.nearest_code_lookup(z.detach(), m_idx)
        q = self.quantizer.embedding.weight[codes].to(z.dtype)
        z_st = z + (q - z).detach()  # straight-through estimator
        recon = self.decoder(z_st, m_idx).float()
        residual = x - recon
        error = (residual * residual).mean(1)

        # losses on normal anatomies only; torch.where gives exactly zero gradient elsewhere
        n_normal = normal_tok.sum().clamp(min=1).float()
        commit = ((z.float() - q.float().detach()) ** 2).mean(1)
        commit = torch.where(normal_tok, commit, torch.zeros_like(commit))
        loss_commitment = self.commitment_cost * commit.sum() / n_normal
        loss_reconstruction = torch.where(normal_tok, error, torch.zeros_like(error)).sum() / n_normal

        if self.training and not torch.jit.is_scripting():
            self.quantizer.update_from_statistics(
                codes[normal_tok], z.detach()[normal_tok], force_call=_sync_enabled(self.ddp_sync)
            )

        residual = residual.detach()
        error = error.detach()
        patch_error = torch.zeros(bsz, m_anat, n_tok, device=device)
        patch_error[b_idx, m_idx, n_idx] = error
        if n_tok > 0:
            anatomy_score = patch_error.amax(-1)  # errors are >= 0 and 0 outside: empty -> 0
        else:
            anatomy_score = torch.zeros(bsz, m_anat, device=device)
        residual_stats = self._residual_stats(patch_error, region_token_mask, index, residual)

        counts = torch.zeros(m_anat * k_codes, device=device).index_add_(
            0, codes, torch.ones(codes.shape[0], device=device)
        ).view(m_anat, k_codes)
        per_anatomy = counts.sum(1)
        p = counts / per_anatomy.clamp(min=1).unsqueeze(1)
        perp = torch.exp(-(p * torch.log(p + 1e-10)).sum(1))
        present = per_anatomy > 0
        perplexity = torch.where(present, perp, torch.zeros_like(perp)).sum() / present.sum().clamp(min=1).float()

        # a select rather than a branch on the buffer: no data-dependent control flow (torch.export)
        abnormality = torch.where(
            self.score_calibrated.to(torch.bool),
            calibrated_abnormality(anatomy_score, self.score_quantiles),
            torch.full_like(anatomy_score, float("nan")),
        )

        return {
            "patch_error": patch_error,
            "anatomy_score": anatomy_score,
            "abnormality": abnormality,
            "residual_stats": residual_stats,
            "loss_commitment": loss_commitment,
            "loss_reconstruction": loss_reconstruction,
            "perplexity": perplexity,
            "patch_index": index,
            "code_index": codes,
            "recon": recon.detach(),
            "residual": residual,
            "error": error,
        }

    def _residual_stats(
        self, patch_error: torch.Tensor, region_token_mask: torch.Tensor, index: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """``(B, M, 2C)``: mean residual of the top_k worst patches and residual of the worst one."""
        bsz, m_anat, n_tok = patch_error.shape
        c = residual.shape[1]
        k = min(self.top_k, n_tok)
        if k == 0:
            return torch.zeros(bsz, m_anat, 2 * c, device=patch_error.device)
        # position of each selected patch in the flat list, +1 so that 0 means "not in the region"
        flat_pos = torch.zeros(bsz, m_anat, n_tok, dtype=torch.long, device=patch_error.device)
        flat_pos[index[:, 0], index[:, 1], index[:, 2]] = torch.arange(
            1, index.shape[0] + 1, device=patch_error.device
        )
        ranked = patch_error.masked_fill(~region_token_mask, -1.0)
        worst = torch.topk(ranked, k, dim=-1).indices  # (B, M, k), worst first
        pos = flat_pos.gather(-1, worst)
        padded = torch.cat([torch.zeros(1, c, device=residual.device, dtype=residual.dtype), residual], 0)
        picked = padded[pos]  # (B, M, k, C); rows outside the region are the zero row
        valid = (pos > 0).sum(-1, keepdim=True).clamp(min=1).to(picked.dtype)
        return torch.cat([picked.sum(2) / valid, picked[:, :, 0]], -1)


def fit_score_calibration(
    scores: torch.Tensor, anatomy_ids: torch.Tensor, num_anatomies: int, num_quantiles: int = 101
) -> torch.Tensor:
    """Per-anatomy quantiles of the worst-patch error among normal validation anatomies.

    Args:
        scores: ``(N,)`` ``anatomy_score`` of normal anatomy instances.
        anatomy_ids: ``(N,)`` anatomy index of each score, in ``[0, num_anatomies)``.
        num_anatomies: ``M``.
        num_quantiles: ``Q``; quantile levels ``linspace(0, 1, Q)``.

    Returns:
        ``(M, Q)`` quantiles, increasing along ``Q``. An anatomy without any score gets the
        quantiles of all scores pooled.
    """
    if scores.dim() != 1 or anatomy_ids.dim() != 1 or scores.shape[0] != anatomy_ids.shape[0]:
        raise ValueError(
            "fit_score_calibration: scores and anatomy_ids must be 1-D of equal length, got "
            + str(list(scores.shape)) + " and " + str(list(anatomy_ids.shape))
        )
    if scores.shape[0] == 0:
        raise ValueError("fit_score_calibration: no scores (need normal validation anatomies)")
    if num_quantiles < 2:
        raise ValueError("fit_score_calibration: num_quantiles must be >= 2, got " + str(num_quantiles))
    if bool((anatomy_ids < 0).any()) or bool((anatomy_ids >= num_anatomies).any()):
        raise ValueError("fit_score_calibration: anatomy_ids must lie in [0, " + str(num_anatomies) + ")")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("fit_score_calibration: scores contain NaN or inf")
    scores = scores.float()
    levels = torch.linspace(0.0, 1.0, num_quantiles, device=scores.device)
    pooled = torch.quantile(scores, levels)
    rows: List[torch.Tensor] = []
    for m in range(num_anatomies):
        own = scores[anatomy_ids == m]
        rows.append(torch.quantile(own, levels) if own.numel() > 0 else pooled)
    return torch.stack(rows, 0)


def calibrated_abnormality(score: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Percentile of each score among the normal scores of its anatomy, in ``[0, 1]``.

    Piecewise-linear between the stored quantiles; 0 below the smallest normal score, 1 above the
    largest; a score equal to a run of equal quantiles gets the middle level of the run.

    Args:
        score: ``(B, M)`` anatomy scores.
        quantiles: ``(M, Q)`` from :func:`fit_score_calibration`.

    Returns:
        ``(B, M)`` abnormality in ``[0, 1]``, non-decreasing in the score.
    """
    if score.dim() != 2 or quantiles.dim() != 2 or score.shape[1] != quantiles.shape[0]:
        raise ValueError(
            "calibrated_abnormality: expected score (B, M) and quantiles (M, Q), got "
            + str(list(score.shape)) + " and " + str(list(quantiles.shape))
        )
    q = quantiles.float().contiguous()
    num_q = q.shape[1]
    s = score.float().t().contiguous()  # (M, B): searchsorted works row by row
    lo = torch.searchsorted(q, s, right=False)  # first quantile >= s
    hi = torch.searchsorted(q, s, right=True)  # first quantile > s
    below = q.gather(1, (lo - 1).clamp(min=0, max=num_q - 1))
    above = q.gather(1, lo.clamp(max=num_q - 1))
    frac = (s - below) / (above - below).clamp(min=1e-12)
    interpolated = (lo.float() - 1.0 + frac.clamp(0.0, 1.0)) / float(num_q - 1)
    tied = (lo.float() + hi.float() - 1.0) / (2.0 * float(num_q - 1))
    level = torch.where(hi > lo, tied, interpolated)
    level = torch.where(lo == 0, torch.where(hi > lo, level, torch.zeros_like(level)), level)
    level = torch.where(lo >= num_q, torch.ones_like(level), level)
    return level.clamp(0.0, 1.0).t()
