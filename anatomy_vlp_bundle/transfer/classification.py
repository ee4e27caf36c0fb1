"""Multi-label classification on the pre-trained encoder: linear probe, fine-tuning, label efficiency.

The classifier reads one feature vector per anatomy and predicts that anatomy's findings with its
own linear map; study findings (no owning anatomy) come from the image-level feature. Two encoders:

- the pre-trained image side (``AnatomyVLPModel`` in image-only mode,
  :func:`~anatomy_vlp_bundle.transfer.data.load_image_model`): per-anatomy region embeddings (the
  features the pre-training aligned with each anatomy's sentences) and the [CLS] embedding. Its
  heads are bound to the pre-training catalog.
- the backbone alone (:class:`~anatomy_vlp_bundle.networks.anatomy_vit.AnatomyViT`,
  :func:`~anatomy_vlp_bundle.transfer.data.load_encoder`): anatomy query outputs and [CLS]. Built for
  any catalog (queries mapped by name, new anatomies fresh), so fine-tuning onto a catalog with
  other anatomies uses it.

- :func:`linear_probe`: encoder frozen, features extracted once, the heads trained on them.
- :func:`fine_tune`: encoder and heads trained together (the encoder at a lower rate).
- :func:`evaluate_classifier`: the zero-shot evaluation's metrics (per-pair ROC-AUC with bootstrap
  CIs, mean AUC, balanced accuracy and F1 at thresholds chosen on validation).

Losses are binary cross-entropy over known labels only (uncertain and unknown codes are left out),
like the pre-training's diagnosis terms.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.catalog import Catalog, load_catalog
from ..metrics.diagnosis import choose_thresholds, evaluate_findings
from ..networks.anatomy_vit import AnatomyViT

__all__ = ["AnatomyClassifier", "extract_features", "linear_probe", "fine_tune", "predict", "evaluate_classifier"]

logger = logging.getLogger(__name__)


def _is_backbone(encoder: nn.Module) -> bool:
    return isinstance(encoder, AnatomyViT)


class AnatomyClassifier(nn.Module):
    """Per-(anatomy, finding) logits from per-anatomy features, study findings from the image feature.

    Args:
        encoder: an ``AnatomyVLPModel`` (features: image-only ``region_emb`` and ``cls_emb``) or an
            :class:`AnatomyViT` (``queries`` and ``cls``), with one anatomy per anatomy of ``catalog``.
        catalog: the task's catalog (anatomy order = query order).
        dropout: dropout on the features before the heads (training only).

    ``forward(image (B, C, *S))`` returns ``(logits (B, M, F), study_logits (B, S))``;
    :meth:`head` does the same from features, for a frozen encoder.
    """

    def __init__(self, encoder: AnatomyViT, catalog: Catalog | str, dropout: float = 0.0) -> None:
        super().__init__()
        catalog = load_catalog(catalog)
        if encoder.num_anatomies != catalog.num_anatomies:
            raise ValueError(f"AnatomyClassifier: the encoder has {encoder.num_anatomies} anatomy queries, "
                             f"catalog {catalog.name!r} {catalog.num_anatomies} anatomies")
        if not _is_backbone(encoder) and list(encoder.catalog.names) != list(catalog.names):
            raise ValueError(f"AnatomyClassifier: the pre-trained model's anatomies {list(encoder.catalog.names)} differ from "
                             f"catalog {catalog.name!r}'s {list(catalog.names)}: use the backbone encoder (load_encoder), "
                             "which maps anatomies by name")
        self.encoder = encoder
        self.catalog = catalog
        m, f = catalog.num_anatomies, max(catalog.max_findings, 1)
        d = encoder.hidden_size if _is_backbone(encoder) else int(encoder.config["embed_dim"])
        self.weight = nn.Parameter(torch.zeros(m, f, d))
        self.bias = nn.Parameter(torch.zeros(m, f))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.study = nn.Linear(d, max(len(catalog.study_findings), 1))
        self.dropout = nn.Dropout(dropout)
        # per-dimension feature standardisation (per anatomy; set by the linear probe from its
        # training features, identity for fine-tuning)
        self.register_buffer("query_mean", torch.zeros(m, d))
        self.register_buffer("query_std", torch.ones(m, d))
        self.register_buffer("cls_mean", torch.zeros(d))
        self.register_buffer("cls_std", torch.ones(d))

    def features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per-anatomy features (B, M, D), image feature (B, D))`` of the encoder."""
        if _is_backbone(self.encoder):
            out = self.encoder(image)
            return out["queries"], out["cls"]
        out = self.encoder(image, None, None, regions="predicted")
        return out["region_emb"], out["cls_emb"]

    def head(self, queries: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.dropout((queries - self.query_mean) / self.query_std)
        c = self.dropout((cls - self.cls_mean) / self.cls_std)
        logits = torch.einsum("bmd,mfd->bmf", q, self.weight) + self.bias
        return logits, self.study(c)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(*self.features(image))

    def copy_head(self, other: "AnatomyClassifier") -> "AnatomyClassifier":
        """Take ``other``'s heads and feature standardisation (e.g. a linear probe's, before
        fine-tuning: LP-FT, Kumar et al. 2022); the encoder is left as it is."""
        head = {k: v for k, v in other.state_dict().items() if not k.startswith("encoder.")}
        missing, unexpected = self.load_state_dict(head, strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise ValueError(f"copy_head: the heads do not match (missing {missing}, unexpected {unexpected})")
        return self


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE over PRESENT/ABSENT entries only (0 when a batch has none)."""
    known = (labels == 0) | (labels == 1)
    if not known.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], labels[known].float())


def _loss(model: AnatomyClassifier, logits, study_logits, labels, study_labels) -> torch.Tensor:
    loss = _masked_bce(logits, labels)
    if study_labels is not None and len(model.catalog.study_findings):
        loss = loss + _masked_bce(study_logits[:, : study_labels.shape[1]], study_labels)
    return loss


@torch.no_grad()
def extract_features(model: AnatomyClassifier, images: torch.Tensor, batch_size: int = 8,
                     device: torch.device | str = "cpu", progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-anatomy (N, M, D), image (N, D))`` features of the frozen encoder in eval mode, on the CPU."""
    from tqdm.auto import tqdm

    encoder = model.encoder
    was_training = encoder.training
    encoder.eval().to(device)
    qs, cs = [], []
    for s in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress):
        q, c = model.features(images[s : s + batch_size].to(device))
        qs.append(q.float().cpu())
        cs.append(c.float().cpu())
    encoder.train(was_training)
    return torch.cat(qs), torch.cat(cs)


#: L2 penalties tried by :func:`linear_probe` when a validation split is given (chosen by its mean AUC).
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)


def _fit_probe(model: AnatomyClassifier, queries, cls, labels, study_labels, epochs: int, l2: float) -> list[float]:
    opt = torch.optim.LBFGS([model.weight, model.bias, *model.study.parameters()], lr=1.0,
                            max_iter=int(epochs), history_size=20, line_search_fn="strong_wolfe")
    history: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits, study_logits = model.head(queries, cls)
        loss = _loss(model, logits, study_logits, labels, study_labels)
        loss = loss + l2 * (model.weight.square().sum() + model.study.weight.square().sum())
        loss.backward()
        history.append(float(loss.detach()))
        return loss

    opt.step(closure)
    return history


def linear_probe(
    model: AnatomyClassifier,
    features: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    study_labels: Optional[torch.Tensor] = None,
    epochs: int = 300,
    l2: float | Sequence[float] = L2_GRID,
    val_features: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    val_labels: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    seed: int = 0,
) -> list[float]:
    """Train the heads of ``model`` on fixed encoder features: L2-regularised logistic regression
    solved with full-batch L-BFGS (as CLIP's linear probes; per-coordinate optimisers such as Adam
    move noise dimensions as fast as informative ones and generalise worse on small sets).

    Args:
        model: the classifier (its encoder is not touched).
        features: ``(per-anatomy (N, M, D), image (N, D))`` from :func:`extract_features`.
        labels: ``(N, M, F)`` finding codes; ``study_labels``: ``(N, S)`` (optional).
        epochs: L-BFGS iterations.
        l2: weight of the squared-norm penalty of the head weights (on standardised features), or
            several: each is fitted and the one with the best validation mean AUC kept (needs
            ``val_features`` and ``val_labels``; without them the first is used).
        val_features, val_labels: the validation split's features and ``(findings, study)`` codes.
        seed: seed of the heads' dropout.

    Returns:
        the loss (penalty included) after every iteration of the kept fit; ``model.l2`` is its penalty.
    """
    torch.manual_seed(seed)
    queries, cls = features
    # features standardised per anatomy and dimension on the training features
    with torch.no_grad():
        model.query_mean.copy_(queries.mean(0))
        model.query_std.copy_(queries.std(0).clamp_min(1e-6).nan_to_num(1.0))
        model.cls_mean.copy_(cls.mean(0))
        model.cls_std.copy_(cls.std(0).clamp_min(1e-6).nan_to_num(1.0))
    grid = [float(l2)] if isinstance(l2, (int, float)) else [float(v) for v in l2]
    if val_features is None or val_labels is None:
        grid = grid[:1]
    init = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    best: Optional[tuple[float, float, dict, list[float]]] = None
    model.train()
    for penalty in grid:
        model.load_state_dict(init, strict=False)
        history = _fit_probe(model, queries, cls, labels, study_labels, epochs, penalty)
        score = 0.0
        if len(grid) > 1:
            model.eval()
            auc = evaluate_classifier(predict(model, features=val_features), val_labels, model.catalog, n_boot=0)["mean_auc"]
            score = -1.0 if auc is None else float(auc)
            model.train()
        if best is None or score > best[0]:
            head = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
            best = (score, penalty, head, history)
    assert best is not None
    model.load_state_dict(best[2], strict=False)
    model.l2 = best[1]
    model.eval()
    return best[3]


def fine_tune(
    model: AnatomyClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    study_labels: Optional[torch.Tensor] = None,
    steps: int = 150,
    batch_size: int = 4,
    lr: float = 3e-4,
    encoder_lr: Optional[float] = None,
    weight_decay: float = 0.05,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    encoder_train_mode: bool = False,
) -> list[float]:
    """Train encoder and heads together on random minibatches of in-memory cases.

    Args:
        model: the classifier.
        images: ``(N, C, *S)``; labels ``(N, M, F)``; study_labels ``(N, S)`` (optional).
        steps: optimisation steps (the same budget for every subset size and initialisation).
        batch_size: cases per step (drawn with replacement across epochs, seeded).
        lr: rate of the heads; ``encoder_lr`` of the encoder (default ``lr / 10``), cosine decay.
        weight_decay: AdamW weight decay.
        seed: batch order and dropout seed.
        device: where to train.
        progress: tqdm bar.
        encoder_train_mode: run the encoder in training mode (its dropouts, feature dropouts and
            running statistics active). Default False: the encoder's weights train but it computes
            its features as in evaluation, so the features a linear probe's heads were fitted on do
            not shift. Measured on the default CT checkpoint (180 training cases, 60 steps, test
            AUC of the probe 0.756): LP-FT in training mode 0.577 (lr 1e-3) / 0.727 (3e-4), in
            evaluation mode 0.622 / 0.754.
        (Uncertain and unknown labels are left out of the loss.)

    Returns:
        the loss of every step.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    model.encoder.train(encoder_train_mode)
    head_params = [model.weight, model.bias, *model.study.parameters()]
    opt = torch.optim.AdamW(
        [{"params": head_params, "lr": lr},
         {"params": model.encoder.parameters(), "lr": lr / 10 if encoder_lr is None else encoder_lr}],
        weight_decay=weight_decay,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(steps), 1))
    n = len(images)
    order = torch.randperm(n, generator=gen)
    pos = 0
    history = []
    for _ in tqdm(range(int(steps)), desc="fine-tune", disable=not progress):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        logits, study_logits = model(images[idx].to(device))
        loss = _loss(model, logits, study_logits, labels[idx].to(device),
                     None if study_labels is None else study_labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(float(loss))
    model.eval()
    return history


@torch.no_grad()
def predict(model: AnatomyClassifier, images: Optional[torch.Tensor] = None,
            features: Optional[tuple[torch.Tensor, torch.Tensor]] = None, batch_size: int = 8,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(P(finding) (N, M, F), P(study finding) (N, S))`` from images or precomputed features."""
    model.eval()
    if features is None:
        if images is None:
            raise ValueError("predict: give images or features")
        features = extract_features(model, images, batch_size, device)
    logits, study = model.head(*(f.to(next(model.parameters()).device) for f in features))
    return torch.sigmoid(logits).cpu(), torch.sigmoid(study).cpu()[:, : len(model.catalog.study_findings)]


def evaluate_classifier(
    probs: tuple[torch.Tensor, torch.Tensor],
    labels: tuple[torch.Tensor, torch.Tensor],
    catalog: Catalog | str,
    val_probs: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    val_labels: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """The zero-shot evaluation's metrics for a classifier's probabilities.

    Thresholds come from the validation split when it is given (else from this data, optimistic).
    Returns :func:`~anatomy_vlp_bundle.metrics.diagnosis.evaluate_findings`'s dict without the ROC
    points.
    """
    catalog = load_catalog(catalog)
    has_study = len(catalog.study_findings) > 0
    thresholds: Any = None
    if val_probs is not None and val_labels is not None:
        thresholds = choose_thresholds(val_probs[0].numpy(), val_labels[0].numpy(), catalog,
                                       val_probs[1].numpy() if has_study else None,
                                       val_labels[1].numpy() if has_study else None)
    return evaluate_findings(
        probs[0].numpy(), labels[0].numpy(), catalog,
        study_probs=probs[1].numpy() if has_study else None,
        study_labels=labels[1].numpy() if has_study else None,
        thresholds=thresholds, n_boot=n_boot, seed=seed, keep_curves=False,
    )


def summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures of :func:`evaluate_classifier`'s dict."""
    return {k: metrics.get(k) for k in ("mean_auc", "mean_auc_ci", "mean_balanced_accuracy", "mean_f1", "n_evaluable", "n_cases")}
