"""How much of each finding hand-made region features carry: a logistic probe per (anatomy, finding).

    .venv/bin/python scripts/stats_probe.py --datalist data/synthetic_cxr/datalist.json
    .venv/bin/python scripts/stats_probe.py --datalist data/synthetic_ct/datalist.json --checkpoint models/model.pt

An upper bound for the model's statistics path, and a way to test a feature before training with it.
For every case of the training and test splits (evaluation preprocessing, no augmentation), per
anatomy region:

- ``stats``: the model's region statistics (``networks.region_stats.region_statistics``: volume,
  mean, spread, histogram, focal z-scores; the checkpoint's bins and focal scales, else 32 and 0, 2);
- ``bandpass``: a difference of Gaussians (sigma s and 2.5 s voxels, s = 1.5, 3, 6) over the region,
  its mean, extremes and 2nd / 98th percentiles divided by the image's band-pass spread (blob
  detectors at nodule-to-consolidation scale, insensitive to the slow gradients that dominate the
  region's own spread);
- ``window``: the ``stats`` over the image mapped through the checkpoint's input windows
  (``input_windows``, e.g. CT soft tissue -150..250 HU), one row per window: finer histogram bins
  where organs and lesions differ by tens of HU;
- ``structure`` (2D): the ``stats`` of the Hessian line and blob maps
  (``networks.region_stats.structure_views``; the checkpoint's ``structure_sigmas``, else 1, 2, 4 pixels);
- ``+contra``: a feature set minus the same features of the mirrored region (``left`` <-> ``right``
  in the anatomy's name), the symmetry a reader uses.

Regions are the given masks; with ``--checkpoint`` also the model's predicted masks, thresholded at
each of ``--thresholds`` (mask logits). Each (anatomy, finding) with both classes in both splits gets
an L2-regularised logistic regression on the standardised training features (``--C``, LBFGS), scored
by ROC-AUC on the test split; the table prints the mean over pairs per feature set and per region
source (``mask -> predicted``: fitted on given-mask features, tested on predicted ones, as a model
trained mostly with given masks is), then the mean per finding for the richest set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anatomy_vlp_bundle.data.catalog import load_catalog, mirror_index  # noqa: E402
from anatomy_vlp_bundle.data.dataset import build_dataset  # noqa: E402
from anatomy_vlp_bundle.data.datalist import load_datalist  # noqa: E402
from anatomy_vlp_bundle.data.pipeline import build_transforms  # noqa: E402
from anatomy_vlp_bundle.metrics.diagnosis import roc_auc  # noqa: E402
from anatomy_vlp_bundle.networks.heads import upsample_mask_logits  # noqa: E402
from anatomy_vlp_bundle.networks.region_stats import gaussian_smooth, region_statistics, structure_views  # noqa: E402

BANDPASS_SIGMAS = (1.5, 3.0, 6.0)


def bandpass_features(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(M, 5 * len(BANDPASS_SIGMAS))`` band-pass features of ``x (*S)`` over ``masks (M, *S)`` bool."""
    feats = []
    for s in BANDPASS_SIGMAS:
        dog = (gaussian_smooth(x[None], s) - gaussian_smooth(x[None], 2.5 * s))[0]
        spread = dog.std().clamp(min=1e-8)
        rows = []
        for m in masks:
            v = dog[m]
            if v.numel() == 0:
                rows.append(torch.zeros(5))
                continue
            q = torch.quantile(v[:: max(1, v.numel() // 50000)], torch.tensor([0.02, 0.98]))
            rows.append(torch.stack([v.mean(), v.max(), v.min(), q[0], q[1]]) / spread)
        feats.append(torch.stack(rows))
    return torch.cat(feats, 1)


def labels_of(findings: dict, catalog) -> np.ndarray:
    """``(M, F)`` 1 / 0 / -1 (unknown or padding) from a record's findings dict."""
    out = np.full((catalog.num_anatomies, catalog.max_findings), -1, dtype=np.int64)
    for a, anatomy in enumerate(catalog.anatomies):
        for f, name in enumerate(anatomy.findings):
            v = (findings or {}).get(anatomy.name, {}).get(name, -1)
            out[a, f] = v if v in (0, 1) else -1
    return out


def window_images(image: torch.Tensor, backbone) -> list[torch.Tensor]:
    """``image (1, C, *S)`` in [0, 1] through each of the backbone's ``input_windows``, as the model's
    statistics see it (:meth:`~anatomy_vlp_bundle.networks.anatomy_vit.AnatomyViT.window_views`):
    one ``(1, 1, *S)`` view per window; none without a backbone or windows."""
    if backbone is None:
        return []
    views = backbone.window_views(backbone.window(image))  # (1, 1 + windows, *S): the image first
    return [views[:, k : k + 1] for k in range(1, int(views.shape[1]))]


def extract(
    datalist: str, split: str, catalog, model, thresholds: list[float], bins: int, focal: list[float], structure: list[float]
) -> dict:
    transform = build_transforms(catalog, mode="eval")
    ds = build_dataset(datalist, split, transform)
    sources = ["mask"] + [f"pred>{t:g}" for t in thresholds] if model is not None else ["mask"]
    backbone = model.backbone if model is not None else None
    out: dict = {f"{src}/{k}": [] for src in sources for k in ("stats", "bandpass", "window", "structure")}
    out["y"] = []
    for i in range(len(ds)):
        d = ds[i]
        image = torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32)[None]
        given = torch.as_tensor(np.asarray(d["anatomy"]), dtype=torch.float32)[None]
        regions = {"mask": given}
        if model is not None:
            with torch.no_grad():
                o = model(image, None, None, regions="predicted")
            logits = upsample_mask_logits(o["mask_logits"], [int(s) for s in image.shape[2:]])
            for t in thresholds:
                regions[f"pred>{t:g}"] = (logits > t).to(torch.float32)
        boxes = torch.zeros(1, catalog.num_anatomies, 2 * catalog.spatial_dims)
        # the image's own views, the same whatever region source reads them
        windows = window_images(image, backbone)
        structure_maps = structure_views(image, structure) if structure else None
        for src, masks in regions.items():
            stats, _ = region_statistics(image, masks, boxes, "mask", bins, None, focal)
            out[f"{src}/stats"].append(stats[0].numpy())
            out[f"{src}/bandpass"].append(bandpass_features(image[0].mean(0), masks[0] > 0.5).numpy())
            rows = [region_statistics(w, masks, boxes, "mask", bins, None, focal)[0][0] for w in windows]
            out[f"{src}/window"].append(torch.cat(rows, -1).numpy() if rows else np.zeros((catalog.num_anatomies, 0), np.float32))
            if structure_maps is not None:
                rows = region_statistics(structure_maps, masks, boxes, "mask", bins, None, focal, per_view=True)[0][0]
                out[f"{src}/structure"].append(rows.numpy())
            else:
                out[f"{src}/structure"].append(np.zeros((catalog.num_anatomies, 0), np.float32))
        out["y"].append(labels_of(d.get("findings"), catalog))
        if (i + 1) % 50 == 0:
            print(f"  {split}: {i + 1}/{len(ds)}", flush=True)
    return {k: np.stack(v) for k, v in out.items()}


def logistic_auc(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, c: float) -> float | None:
    """Test AUC of an L2-regularised logistic regression (sklearn's objective, C = ``c``)."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt = torch.as_tensor((x_tr - mu) / sd, dtype=torch.float64)
    yt = torch.as_tensor(y_tr, dtype=torch.float64)
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, reduction="sum") + 0.5 / c * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    scores = torch.as_tensor((x_te - mu) / sd, dtype=torch.float64) @ w.detach()
    return roc_auc(scores.numpy(), y_te)


def probe(train: dict, test: dict, train_key: list[str], test_key: list[str], c: float, mirror: list[int]) -> dict:
    """Per (anatomy, finding) test AUCs of one feature set (keys ``source/features``, ``+contra``)."""

    def features(split: dict, keys: list[str]) -> np.ndarray:
        parts = []
        for key in keys:
            base, contra = key.removesuffix("+contra"), key.endswith("+contra")
            v = split[base]
            parts.append(v)
            if contra:
                parts.append(v - v[:, mirror])
        return np.concatenate(parts, -1)

    x_tr, x_te = features(train, train_key), features(test, test_key)
    y_tr, y_te = train["y"], test["y"]
    aucs = {}
    for a in range(y_tr.shape[1]):
        for f in range(y_tr.shape[2]):
            ktr, kte = y_tr[:, a, f] >= 0, y_te[:, a, f] >= 0
            if len(set(y_tr[ktr, a, f])) < 2 or len(set(y_te[kte, a, f])) < 2:
                continue
            auc = logistic_auc(x_tr[ktr, a], y_tr[ktr, a, f], x_te[kte, a], y_te[kte, a, f], c)
            if auc is not None:
                aucs[(a, f)] = auc
    return aucs


def main(
    datalist: str, checkpoint: str | None = None, thresholds: str = "0,2", C: float = 0.1, threads: int = 2, cache: str | None = None
) -> None:
    """``cache``: an ``.npz`` of the extracted features, written on the first run and read (instead of
    extracting again) on the next ones: to compare probe settings quickly. It records the datalist,
    checkpoint and thresholds it was extracted with; a run with others stops with an error naming
    the file instead of probing stale features."""
    torch.set_num_threads(int(threads))
    model = None
    bins, focal, n_windows = 32, [0.0, 2.0], 0
    structure = [1.0, 2.0, 4.0]
    if checkpoint:
        from anatomy_vlp_bundle.inference.predictor import model_from_checkpoint

        model, extras = model_from_checkpoint(checkpoint)
        catalog = load_catalog(extras.get("catalog") or model.config["catalog"])
        bins, focal = model.region_stats_bins or bins, list(model.focal_scales) or focal
        n_windows = int(model.backbone.window_bounds.shape[0])
        structure = list(model.structure_sigmas) or structure
    else:
        catalog = load_datalist(datalist).catalog()
    if catalog.spatial_dims != 2:
        structure = []
    ths = [float(t) for t in str(thresholds).split(",") if str(t).strip()] if model is not None else []
    source = {"datalist": str(datalist), "checkpoint": str(checkpoint or ""), "thresholds": ",".join(f"{t:g}" for t in ths),
              "structure": ",".join(f"{t:g}" for t in structure)}
    if cache and Path(cache).is_file():
        with np.load(cache) as z:  # arrays only (no pickle)
            stored = {k.removeprefix("source:"): str(z[k]) for k in z.files if k.startswith("source:")}
            if stored != source:
                raise ValueError(
                    f"stats_probe: the feature cache {cache} was extracted with {stored or 'unrecorded settings'}, "
                    f"this run asks for {source}: pass another --cache path or delete the file"
                )
            train = {k.removeprefix("training:"): z[k] for k in z.files if k.startswith("training:")}
            test = {k.removeprefix("test:"): z[k] for k in z.files if k.startswith("test:")}
        print(f"features from {cache}")
    else:
        train = extract(datalist, "training", catalog, model, ths, bins, focal, structure)
        test = extract(datalist, "test", catalog, model, ths, bins, focal, structure)
        if cache:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                cache,
                **{f"training:{k}": v for k, v in train.items()},
                **{f"test:{k}": v for k, v in test.items()},
                **{f"source:{k}": np.array(v) for k, v in source.items()},  # unicode arrays: no pickle
            )
    mirror = mirror_index(list(catalog.names))
    sets = {"stats": ["stats"], "stats+bandpass": ["stats", "bandpass"], "stats+bandpass+contra": ["stats+contra", "bandpass+contra"]}
    if n_windows:
        sets.update({"stats+window": ["stats", "window"], "stats+window+bandpass": ["stats", "window", "bandpass"]})
    if structure:
        sets.update({"stats+structure": ["stats", "structure"], "stats+structure+contra": ["stats+contra", "structure+contra"]})
    sources = [("mask", "mask")] + [(s, s) for s in (f"pred>{t:g}" for t in ths)] + [("mask", f"pred>{t:g}") for t in ths]
    print(f"\n{catalog.name}: per-(anatomy, finding) logistic probe, C={C}, {len(train['y'])} training / {len(test['y'])} test cases")
    print("| features | " + " | ".join(f"{a} -> {b}" if a != b else a for a, b in sources) + " |")
    print("|---|" + "---|" * len(sources))
    for name, keys in sets.items():
        cells = []
        for tr, te in sources:
            aucs = probe(train, test, [f"{tr}/{k}" for k in keys], [f"{te}/{k}" for k in keys], C, mirror)
            cells.append(f"{np.mean(list(aucs.values())):.3f} (n={len(aucs)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    richest_name = list(sets)[-1]
    for tr, te in sources:
        aucs = probe(train, test, [f"{tr}/{k}" for k in sets[richest_name]], [f"{te}/{k}" for k in sets[richest_name]], C, mirror)
        per: dict[str, list[float]] = {}
        for (a, f), auc in aucs.items():
            per.setdefault(catalog.anatomies[a].findings[f], []).append(auc)
        source = f"{tr} -> {te}" if tr != te else tr
        print(f"\nper finding ({source}, {richest_name}): " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in per.items()))


if __name__ == "__main__":
    fire.Fire(main)
