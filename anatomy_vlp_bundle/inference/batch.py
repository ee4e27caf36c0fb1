"""Inference over many images: a contract datalist (one split) or a folder, one result JSON per image.

Bad cases (unreadable, wrong modality, truncated, ...) are reported and skipped: the others are
still written, and the run ends with the list of failures and their reasons (also in
``failures.json``). So are datalist records without an image, and ids that cannot name a result
file (path components, a second record with the same id, whose result would overwrite the
first's). Progress shows with tqdm.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

__all__ = ["image_stem", "collect_inputs", "run_batch", "infer_command", "infer_batch_command", "export_command"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm")


def image_stem(path: str | Path) -> str:
    """The file (or folder) name without its image extension: ``case_0007.nii.gz`` -> ``case_0007``."""
    name = Path(str(path).rstrip("/")).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and name.endswith(IMAGE_SUFFIXES)


def _datalist_item(index: int, rec: Any, split: str) -> dict[str, Any]:
    """One datalist record as ``{"id", "image"}``, plus ``"error"`` when the record names no image."""
    if not isinstance(rec, dict):
        return {"id": f"{split}[{index}]", "image": "", "error": f"record {split}[{index}] is not a JSON object"}
    image = rec.get("image")
    rid = rec.get("id")
    item = {"id": str(rid) if rid is not None else image_stem(str(image or f"{split}[{index}]")), "image": str(image or "")}
    if not isinstance(image, str) or not image.strip():
        item["error"] = f"record {split}[{index}] has no 'image' path (got {image!r})"
    return item


def _id_problem(item_id: str, taken: dict[str, str]) -> Optional[str]:
    """Why ``item_id`` cannot name a result file in the output folder, or None."""
    if not item_id or item_id in (".", "..") or any(c in item_id for c in "/\\\0"):
        return f"id {item_id!r} cannot name a result file (empty, '.', '..', or holds a path separator or NUL)"
    if item_id in taken:
        return f"duplicate id {item_id!r}: {taken[item_id]} has it too, and its result would be overwritten"
    return None


def collect_inputs(source: str | Path, split: str = "test", modality: Optional[str] = None) -> list[dict[str, Any]]:
    """``[{"id", "image", "error"?}]`` from a datalist (its ``split``; the record's ``anatomy_mask``
    is not used: inference is image-only unless a mask is asked for) or a folder (image files;
    for CT also sub-folders holding ``.dcm`` files, i.e. DICOM series; for CXR each ``.dcm`` is an image).
    Datalist records that name no image come with an ``"error"`` (reported by :func:`run_batch`)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        from ..data.datalist import load_datalist

        dl = load_datalist(source)
        out = [_datalist_item(i, rec, split) for i, rec in enumerate(dl.records(split))]
        if not out:
            raise ValueError(f"datalist {source}: split {split!r} holds no records")
        return out
    if not source.is_dir():
        raise FileNotFoundError(f"inference input {source} is neither a datalist (.json) nor a folder")
    ct = (modality or "").upper() == "CT"
    items: list[dict[str, Any]] = []
    for p in sorted(source.iterdir()):
        if p.is_dir() and ct and any(q.suffix.lower() == ".dcm" or q.suffix == "" for q in p.iterdir() if q.is_file()):
            items.append({"id": p.name, "image": str(p)})
        elif _is_image(p) and not (ct and p.suffix.lower() == ".dcm"):
            items.append({"id": image_stem(p), "image": str(p)})
    if ct and any(p.suffix.lower() == ".dcm" for p in source.iterdir() if p.is_file()):
        items.append({"id": source.name, "image": str(source)})  # the folder itself is a DICOM series
    if not items:
        raise ValueError(f"inference input folder {source} holds no image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series")
    return items


def run_batch(checkpoint: str | Path, source: str | Path, output_dir: str | Path, split: str = "test",
              overlays: bool = False, label_maps: bool = False, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Predict every input; write ``<output_dir>/<id>.json`` (and ``<id>.png`` / ``<id>_regions.nii.gz``).

    Returns:
        ``{"written": [...], "failed": [{"id", "image", "error"}], "output_dir"}``; ``failures.json`` too.
    """
    from tqdm import tqdm

    from .overlay import draw_overlay
    from .predictor import Predictor

    predictor = Predictor.load(checkpoint, device=device)
    items = collect_inputs(source, split, predictor.catalog.modality)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    taken: dict[str, str] = {}  # id -> image of the case that names <id>.json
    suffix = ".nii.gz" if predictor.catalog.spatial_dims == 3 else ".png"
    for item in tqdm(items, desc="infer", unit="image", disable=not progress):
        problem = item.get("error") or _id_problem(item["id"], taken)
        if problem:
            failed.append({"id": item["id"], "image": item["image"], "error": problem})
            logger.warning("inference skipped %s: %s", item["image"] or item["id"], problem)
            continue
        taken[item["id"]] = item["image"]
        try:
            pred = predictor.predict(item["image"])
            path = out_dir / f"{item['id']}.json"
            path.write_text(json.dumps(pred.result, indent=2))
            if overlays:
                draw_overlay(pred, out_dir / f"{item['id']}.png")
            if label_maps and predictor.kind == "checkpoint":
                predictor.label_map(pred, out_dir / f"{item['id']}_regions{suffix}")
            written.append(str(path))
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the others
            failed.append({"id": item["id"], "image": item["image"], "error": f"{type(e).__name__}: {e}"})
            logger.warning("inference skipped %s: %s", item["image"], e)
    (out_dir / "failures.json").write_text(json.dumps(failed, indent=2))
    summary = {"written": written, "failed": failed, "output_dir": str(out_dir)}
    msg = f"inference: {len(written)} of {len(items)} images written to {out_dir}"
    if failed:
        msg += f"; {len(failed)} failed:\n" + "\n".join(f"  {f['image']}: {f['error']}" for f in failed)
    print(msg)
    return summary


def infer_command(checkpoint: str, image: str, mask: Optional[str] = None, out: Optional[str] = None,
                  overlay: Optional[str] = None, label_map: Optional[str] = None, device: str = "cpu") -> None:
    """One image: ``python -m anatomy_vlp_bundle infer --checkpoint FILE --image PATH [--mask PATH]
    [--out result.json] [--overlay picture.png] [--label-map regions.nii.gz]``.

    Args:
        checkpoint: a training checkpoint (``models/model.pt``), an exported ``.ts`` or ``.pt2``.
        image: CT (NIfTI, NRRD, MHA, DICOM folder) or CXR (PNG, JPEG, DICOM).
        mask: optional label map: regions from it instead of the model's (checkpoint only).
        out: the result JSON (default: printed).
        overlay: a PNG with the boxes and the abnormality heatmap.
        label_map: the predicted regions in the input's own space (checkpoint only).
        device: ``cpu`` or ``cuda[:i]``.

    Raises:
        SystemExit: code 1 with a message naming the file when the input or the model cannot be used.
    """
    from .overlay import draw_overlay
    from .predictor import Predictor

    try:
        predictor = Predictor.load(checkpoint, device=device)
        if label_map and predictor.kind != "checkpoint":
            raise ValueError(f"--label-map needs a training checkpoint; {checkpoint} is an exported model")
        pred = predictor.predict(image, mask)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}")
        raise SystemExit(1) from None
    text = json.dumps(pred.result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"result written to {out}")
    else:
        print(text)
    if overlay:
        print(f"overlay written to {draw_overlay(pred, overlay)}")
    if label_map:
        print(f"label map written to {predictor.label_map(pred, label_map)}")


def infer_batch_command(checkpoint: str, input: str, out_dir: str, split: str = "test", overlays: bool = False,  # noqa: A002
                        label_maps: bool = False, device: str = "cpu") -> None:
    """Many images: ``python -m anatomy_vlp_bundle infer-batch --checkpoint FILE --input DATALIST|FOLDER --out-dir DIR``.

    Exits with code 1 when any image failed (the others are written; ``failures.json`` lists the reasons).
    """
    try:
        summary = run_batch(checkpoint, input, out_dir, split=split, overlays=overlays, label_maps=label_maps, device=device)
    except (OSError, ValueError) as e:
        print(f"error: {e}")
        raise SystemExit(1) from None
    if summary["failed"]:
        raise SystemExit(1)


def export_command(checkpoint: str, out: str, meta_file: str = "configs/metadata.json") -> None:
    """Export a training checkpoint's image-only model: ``python -m anatomy_vlp_bundle export
    --checkpoint models/model.pt --out models/model.pt2`` (``torch.export``; ``.ts``: TorchScript).

    The file carries the layout, catalog, thresholds and preprocessing (and ``metadata.json``
    when ``meta_file`` exists); a ``.pt2`` is checked against the eager model before it is written.
    """
    from ..networks.deploy import export_program, export_torchscript
    from .predictor import deploy_from_checkpoint

    try:
        wrapper = deploy_from_checkpoint(checkpoint)
        extra = {"metadata.json": Path(meta_file).read_text()} if meta_file and Path(meta_file).is_file() else {}
        if out.endswith(".pt2"):
            path = export_program(wrapper, out, extra_files=extra)
        elif out.endswith(".ts"):
            path = export_torchscript(wrapper, out, extra_files=extra)
        else:
            raise ValueError(f"--out {out}: use .pt2 (torch.export) or .ts (TorchScript)")
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}")
        raise SystemExit(1) from None
    print(f"exported {checkpoint} to {path}")
