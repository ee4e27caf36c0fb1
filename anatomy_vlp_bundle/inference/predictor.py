"""One image in, one contract result out: ``Predictor.load(checkpoint).predict(image, mask=None)``.

Two kinds of model file:

- a **training checkpoint** (``model.pt``, loaded with ``weights_only=True``): it carries the
  catalog, the model configuration, the decision thresholds and the preprocessing it was trained
  with, so the model is rebuilt without any config. Gives everything: image-only or
  given-mask regions, the mask head's regions (label maps) and the prior's heatmap.
- an exported **TorchScript** file (``model.ts``) or **torch.export** archive (``model.pt2``),
  :mod:`anatomy_vlp_bundle.networks.deploy`: image-only predictions and boxes from its ``pred``
  tensor; the layout, thresholds, catalog and preprocessing travel inside it. ``--mask``, label
  maps and heatmaps need the checkpoint.

Inputs the model can say nothing about are refused with an
:class:`~anatomy_vlp_bundle.data.readers.ImageReadError` naming the file: besides what the readers
refuse (unreadable, empty, NaN/Inf voxels, over the size limit, 4D/RGB, wrong DICOM modality or broken
series), a constant image, a DICOM of a volume modality (CT, MR, ...) given to a CXR model, and an
image smaller than one patch of the model (CT: at the model's spacing; CXR: in stored pixels), which
would be almost all padding or upsampled beyond recognition.

The result follows ``../shared/DATA_CONTRACT.md`` ("Inference result"): CT boxes in world RAS mm
and in the input's own voxels, CXR boxes in pixels of the input, per-finding probabilities, the
abnormality score, an anatomy-by-anatomy report at the stored thresholds, the model version and
the file's SHA-256, and the research-use notice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..data.catalog import Catalog, load_catalog
from ..data.headers import NON_RADIOGRAPH_MODALITIES, world_bounds
from ..data.readers import ImageReadError, load_study_image, unwrap_transform_error
from ..engines.checkpoint import file_sha256
from . import geometry

__all__ = ["NOTICE", "Prediction", "Predictor", "deploy_from_checkpoint", "file_sha256", "format_report", "model_from_checkpoint"]

logger = logging.getLogger(__name__)

NOTICE = "Research use only. Not for diagnostic use."

#: Patch size by spatial dims (the bundle's configs) for exported models that do not carry theirs.
DEFAULT_PATCH_SIZE = {3: 8, 2: 16}
#: CT spacing (mm) of the inference chain when the model file gives none (``data.pipeline`` default).
_DEFAULT_CT_SPACING = (4.0, 4.0, 4.0)


@dataclass
class Prediction:
    """A result (``result``, the contract JSON) plus what pictures and label maps are drawn from.

    ``image``: ``(*S)`` the preprocessed image in [0, 1]; ``grid_affine`` its affine;
    ``boxes_grid``: ``(M, 2d)`` corner boxes on that grid; ``mask_probs``: ``(M, *S)`` P(voxel in
    anatomy) from the mask head (None without it / for TorchScript); ``heatmap``: ``(M, *S)`` the
    prior's patch deviation upsampled to the grid (None without a prior / for TorchScript);
    ``input_affine`` / ``input_shape``: the input image's own grid.
    """

    result: dict[str, Any]
    image: torch.Tensor
    grid_affine: np.ndarray
    boxes_grid: np.ndarray
    input_affine: np.ndarray
    input_shape: list[int]
    mask_probs: Optional[torch.Tensor] = None
    heatmap: Optional[torch.Tensor] = None
    extras: dict[str, Any] = field(default_factory=dict)


def format_report(result: dict[str, Any], thresholds: np.ndarray, study_thresholds: np.ndarray, catalog: Catalog,
                  presence_threshold: float = 0.5) -> str:
    """Anatomy-by-anatomy text: ``"Liver: hypodense lesion (0.93). Spleen: no abnormality. ..."``.

    A finding is named when its probability reaches the anatomy's stored threshold; an anatomy
    with P(present) below ``presence_threshold`` is "not identified".
    """
    parts: list[str] = []
    for i, a in enumerate(catalog.anatomies):
        entry = result["anatomies"][a.name]
        title = a.name[:1].upper() + a.name[1:]
        if entry["present"] < presence_threshold:
            parts.append(f"{title}: not identified.")
            continue
        hits = [
            f"{f} ({p:.2f})" for j, (f, p) in enumerate(entry["findings"].items()) if p >= float(thresholds[i, j])
        ]
        parts.append(f"{title}: {', '.join(hits)}." if hits else f"{title}: no abnormality.")
    study = result.get("study", {}).get("findings", {})
    hits = [f"{f} ({p:.2f})" for j, (f, p) in enumerate(study.items()) if p >= float(study_thresholds[j])]
    if hits:
        parts.append(f"Study: {', '.join(hits)}.")
    return " ".join(parts)


def _literal(value: Any) -> Any:
    """A config value usable as is (lists, numbers), or None for expressions and references."""
    if isinstance(value, str) and (value.startswith("$") or value.startswith("@") or value.startswith("%")):
        return None
    return value


class Predictor:
    """Rebuilt model + preprocessing of one model file; see the module docstring.

    Args:
        model: an ``AnatomyVLPModel`` (kind ``"checkpoint"``), a scripted deploy wrapper (``"torchscript"``)
            or an exported program's module (``"program"``).
        catalog: the model's catalog.
        preprocessing: ``spacing``, ``roi_size``, ``hu_window`` (CT) and ``intensity_percentiles`` (CXR).
        thresholds, study_thresholds: ``(M, F)`` / ``(S,)`` decision thresholds chosen on validation.
        version, sha256: reported in every result.
        kind: ``"checkpoint"``, ``"torchscript"`` or ``"program"``.
        device: where the model runs.
        path: the model file (for messages).
        patch_size: the model's token size per axis (an int for every axis); default: the model's
            ``backbone.patch_size`` when it has one, else :data:`DEFAULT_PATCH_SIZE`.
    """

    def __init__(self, model: torch.nn.Module, catalog: Catalog, preprocessing: dict[str, Any], thresholds: np.ndarray,
                 study_thresholds: np.ndarray, version: str, sha256: str, kind: str, device: str | torch.device = "cpu",
                 path: str = "", patch_size: Optional[int | Sequence[int]] = None) -> None:
        self.model = model
        self.catalog = catalog
        self.preprocessing = dict(preprocessing)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.study_thresholds = np.asarray(study_thresholds, dtype=np.float64)
        self.version = str(version)
        self.sha256 = sha256
        self.kind = kind
        self.device = torch.device(device)
        self.path = path
        d = catalog.spatial_dims
        if patch_size is None:
            patch_size = getattr(getattr(model, "backbone", None), "patch_size", None) or DEFAULT_PATCH_SIZE[d]
        self.patch_size = [int(patch_size)] * d if isinstance(patch_size, int) else [int(p) for p in patch_size]
        self._chains: dict[bool, Any] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Predictor":
        """A training checkpoint (``.pt``/``.pth``), an exported TorchScript file (``.ts``) or a
        ``torch.export`` archive (``.pt2``, :func:`~anatomy_vlp_bundle.networks.deploy.export_program`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        if path.suffix == ".pt2":
            return cls._load_program(path, device)
        if path.suffix == ".ts" or _is_torchscript(path):
            return cls._load_torchscript(path, device)
        return cls._load_checkpoint(path, device)

    @classmethod
    def _load_checkpoint(cls, path: Path, device: str | torch.device) -> "Predictor":
        model, extras = model_from_checkpoint(path)
        model.to(device).eval()
        return cls(
            model, model.catalog, extras["preprocessing"], model.thresholds.detach().cpu().numpy(),
            model.study_thresholds.detach().cpu().numpy(), extras.get("version", ""), file_sha256(path), "checkpoint",
            device, str(path),
        )

    @classmethod
    def _load_torchscript(cls, path: Path, device: str | torch.device) -> "Predictor":
        files = {"layout.json": "", "inference.json": "", "metadata.json": ""}
        try:
            model = torch.jit.load(str(path), map_location=str(device), _extra_files=files)
        except Exception as e:  # noqa: BLE001 - name the file
            raise ValueError(f"model {path}: not a loadable TorchScript file: {e}") from e
        files["layout.json"] = getattr(model, "layout_json", "") or files["layout.json"]
        thresholds = (model.thresholds.detach().cpu().numpy(), model.study_thresholds.detach().cpu().numpy())
        return cls._from_layout(model, path, files, thresholds, "torchscript", device)

    @classmethod
    def _load_program(cls, path: Path, device: str | torch.device) -> "Predictor":
        files = {"layout.json": "", "inference.json": "", "metadata.json": ""}
        try:
            program = torch.export.load(str(path), extra_files=files)
        except Exception as e:  # noqa: BLE001 - name the file
            raise ValueError(f"model {path}: not a loadable torch.export archive: {e}") from e
        layout = json.loads(files["layout.json"] or "{}")
        thresholds = (np.asarray(layout.get("thresholds", [])), np.asarray(layout.get("study_thresholds", [])))
        return cls._from_layout(program.module().to(device), path, files, thresholds, "program", device)

    @classmethod
    def _from_layout(cls, model: Any, path: Path, files: dict[str, str], thresholds: tuple, kind: str,
                     device: str | torch.device) -> "Predictor":
        """An exported image-only model: catalog, preprocessing and version from its layout and extra files."""
        if not files["layout.json"]:
            raise ValueError(f"model {path}: an exported file without the bundle's layout (not exported by this bundle?)")
        layout = json.loads(files["layout.json"])
        catalog = load_catalog(layout["catalog"])
        pre: dict[str, Any] = dict(layout.get("preprocessing") or {})
        if not pre and files["inference.json"]:
            try:
                cfg = json.loads(files["inference.json"])
            except json.JSONDecodeError:
                cfg = {}
            for key in ("spacing", "roi_size", "hu_window"):
                value = _literal(cfg.get(key))
                if value is not None:
                    pre[key] = value
        version = ""
        if files["metadata.json"]:
            try:
                version = json.loads(files["metadata.json"]).get("version", "")
            except json.JSONDecodeError:
                pass
        if "roi_size" not in pre and layout.get("img_size"):
            pre["roi_size"] = list(layout["img_size"])
        return cls(model, catalog, pre, thresholds[0], thresholds[1], version, file_sha256(path), kind, device, str(path))

    # ------------------------------------------------------------------ preprocessing
    def _chain(self, with_mask: bool):
        from ..data.pipeline import build_transforms

        if with_mask not in self._chains:
            p = self.preprocessing
            kwargs: dict[str, Any] = {"roi_size": p.get("roi_size")}
            if self.catalog.spatial_dims == 3:
                kwargs["spacing"] = p.get("spacing")
                if p.get("hu_window") is not None:
                    kwargs["hu_window"] = tuple(p["hu_window"])
            elif p.get("intensity_percentiles") is not None:
                kwargs["intensity_percentiles"] = tuple(p["intensity_percentiles"])
            self._chains[with_mask] = build_transforms(self.catalog, mode="infer", **kwargs)
        return self._chains[with_mask]

    def check_input(self, image: str | Path, loaded: torch.Tensor) -> None:
        """Refuse a loaded image the model can say nothing about (see the module docstring).

        Raises:
            ImageReadError: naming ``image``: a DICOM of a volume modality given to a CXR model, a
            constant image, or an image smaller than one patch of the model.
        """
        d = self.catalog.spatial_dims
        if d == 2:
            modality = str(getattr(loaded, "meta", {}).get("dicom_modality", "")).upper()
            if modality in NON_RADIOGRAPH_MODALITIES:
                raise ImageReadError(
                    f"{image}: DICOM Modality {modality!r} is not a radiograph; model {self.catalog.name!r} reads chest X-rays"
                )
        lo, hi = float(loaded.min()), float(loaded.max())
        if lo == hi:
            raise ImageReadError(f"{image}: every voxel has the same value ({lo:g}): an empty image, nothing to predict on")
        shape = [int(s) for s in loaded.shape[1:]]
        patch = " x ".join(str(p) for p in self.patch_size)
        if d == 3:
            spacing = [float(v) for v in (self.preprocessing.get("spacing") or _DEFAULT_CT_SPACING)]
            w_lo, w_hi = world_bounds(shape, np.asarray(loaded.affine, dtype=np.float64))
            extent = w_hi - w_lo  # RAS mm: the chain orients to RAS before resampling
            grid = extent / np.asarray(spacing)
            if np.any(grid < np.asarray(self.patch_size)):
                raise ImageReadError(
                    f"{image}: too small for the model: {' x '.join(map(str, shape))} voxels spanning "
                    f"{' x '.join(f'{e:.3g}' for e in extent)} mm are {' x '.join(f'{g:.3g}' for g in grid)} voxels at the "
                    f"model's {' x '.join(f'{v:g}' for v in spacing)} mm spacing, less than one {patch} patch along some "
                    "axis: the model input would be almost all padding"
                )
        elif any(s < p for s, p in zip(shape, self.patch_size)):
            raise ImageReadError(
                f"{image}: too small for the model: {' x '.join(map(str, shape))} pixels, less than one {patch} patch along "
                "some axis: resizing it to the model's input would invent the picture"
            )

    def prepare(self, image: str | Path, mask: Optional[str | Path] = None) -> dict[str, Any]:
        """Load, check (:meth:`check_input`) and preprocess one image (and its label map): the chain's output
        plus ``input_affine`` / ``input_shape``.

        Raises:
            ImageReadError: naming the image or mask file that cannot be used (also when the failure
            happens inside the transform chain: MONAI's wrapper is replaced by the original error).
        """
        loaded = load_study_image(image, self.catalog.modality)
        self.check_input(image, loaded)
        record: dict[str, Any] = {"id": Path(str(image)).name, "image": loaded}
        if mask is not None:
            if not any(a.labels for a in self.catalog.anatomies):
                raise ValueError(f"--mask {mask}: catalog {self.catalog.name!r} has no label values, so a label map cannot be read")
            record["anatomy_mask"] = str(mask)
        try:
            data = self._chain(mask is not None)(record)
        except RuntimeError as e:
            cause = unwrap_transform_error(e)
            if cause is e:
                raise
            raise cause from None
        data["input_affine"] = np.asarray(loaded.affine, dtype=np.float64)
        data["input_shape"] = [int(s) for s in loaded.shape[1:]]
        return data

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, image: str | Path, mask: Optional[str | Path] = None) -> Prediction:
        """The contract result for one image (``mask``: a label map; needs a training checkpoint)."""
        if mask is not None and self.kind != "checkpoint":
            raise ValueError(f"--mask needs a training checkpoint; {self.path} is an exported model (image-only predictions)")
        data = self.prepare(image, mask)
        img = data["image"]
        spatial = [int(s) for s in img.shape[1:]]
        x = torch.as_tensor(img).float()[None].to(self.device)
        m = self.catalog.num_anatomies
        d = self.catalog.spatial_dims
        mask_probs = heatmap = None
        if self.kind == "checkpoint":
            from ..networks.box_ops import normalized_cxcywh_to_boxes
            from ..networks.heads import upsample_mask_logits

            anatomy = None
            if mask is not None:
                anatomy = torch.as_tensor(data["anatomy"]).float()[None].to(self.device)
            out = self.model(x, anatomy, None, regions="mask" if mask is not None else "predicted")
            boxes = normalized_cxcywh_to_boxes(out["boxes"][0].float(), spatial).cpu().numpy()
            presence = torch.sigmoid(out["presence_logits"][0].float()).cpu().numpy()
            probs = torch.sigmoid(out["zero_shot_logits"][0].float()).cpu().numpy()
            study = torch.sigmoid(out["study_logits"][0].float()).cpu().numpy()
            abnormality = out["abnormality"][0].float().cpu().numpy()
            if out["mask_logits"].numel():
                mask_probs = torch.sigmoid(upsample_mask_logits(out["mask_logits"], spatial)[0]).cpu()
            if getattr(self.model, "prior", None) is not None and out["patch_error"].numel():
                heatmap = upsample_mask_logits(out["patch_error"].float(), spatial)[0].cpu()
        else:
            pred = self.model(x)[0].float().cpu().numpy()
            size = np.asarray(spatial * 2, dtype=np.float64)
            boxes = pred[:m, 1 : 1 + 2 * d] * size
            presence = pred[:m, 0]
            abnormality = pred[:m, 1 + 2 * d]
            probs = pred[:m, 2 + 2 * d :]
            study = pred[m, 2 + 2 * d : 2 + 2 * d + len(self.catalog.study_findings)]
        result = self._result(image, mask, data, boxes, presence, probs, study, abnormality, spatial)
        return Prediction(
            result=result,
            image=torch.as_tensor(img)[0].float().cpu(),
            grid_affine=np.asarray(img.affine, dtype=np.float64),
            boxes_grid=boxes,
            input_affine=data["input_affine"],
            input_shape=data["input_shape"],
            mask_probs=mask_probs,
            heatmap=heatmap,
        )

    def _result(self, image: Any, mask: Any, data: dict[str, Any], boxes: np.ndarray, presence: np.ndarray, probs: np.ndarray,
                study: np.ndarray, abnormality: np.ndarray, spatial: Sequence[int]) -> dict[str, Any]:
        cat = self.catalog
        grid_affine = np.asarray(data["image"].affine, dtype=np.float64)
        anatomies: dict[str, Any] = {}
        for i, a in enumerate(cat.anatomies):
            entry: dict[str, Any] = {"present": round(float(presence[i]), 6)}
            if cat.spatial_dims == 3:
                world_pts = geometry.grid_box_to_world(boxes[i], grid_affine)
                voxel = geometry.world_box_to_voxels(world_pts, data["input_affine"], data["input_shape"])
                entry["box_world"] = [round(v, 3) for v in geometry.voxel_box_to_world(voxel, data["input_affine"])]
                entry["box_voxel"] = voxel
            else:
                entry["box_pixel"] = geometry.grid_box_to_pixels(boxes[i], spatial, data["input_shape"])
            entry["abnormality"] = round(float(np.clip(abnormality[i], 0.0, 1.0)), 6)
            entry["findings"] = {f: round(float(probs[i, j]), 6) for j, f in enumerate(a.findings)}
            anatomies[a.name] = entry
        result: dict[str, Any] = {
            "image": str(image),
            "modality": cat.modality,
            "catalog": cat.name,
            "model": {"version": self.version, "checkpoint_sha256": self.sha256},
            "regions": "mask" if mask is not None else "predicted",
            "anatomies": anatomies,
            "study": {"findings": {f: round(float(study[j]), 6) for j, f in enumerate(cat.study_findings)}},
        }
        result["report"] = format_report(result, self.thresholds, self.study_thresholds, cat)
        result["notice"] = NOTICE
        return result

    # ------------------------------------------------------------------ label map
    def label_map(self, pred: Prediction, path: str | Path, threshold: float = 0.5) -> Path:
        """Write the mask head's regions on the input image's own grid.

        Each voxel takes the anatomy with the highest probability among those at or above
        ``threshold`` (regions that overlap, as CXR zones do, keep the most probable one); values
        are the catalog's first label of the anatomy, or its 1-based position when it has none
        (0 = background). CT: NIfTI (or any format ITK writes) with the input's affine; CXR: a
        16-bit PNG (or NIfTI when the path says so) of the input's size.
        """
        if pred.mask_probs is None:
            raise ValueError("a label map needs a training checkpoint whose model has the mask head (segmentation: true)")
        probs = pred.mask_probs
        best = probs.argmax(0)
        values = torch.tensor([a.labels[0] if a.labels else i + 1 for i, a in enumerate(self.catalog.anatomies)], dtype=torch.int16)
        label = torch.where(probs.max(0).values >= threshold, values[best], torch.zeros((), dtype=torch.int16))[None]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.catalog.spatial_dims == 3:
            import nibabel as nib

            out = geometry.resample_to_input(label, pred.grid_affine, pred.input_affine, pred.input_shape)[0].numpy()
            # MONAI affines are RAS, as NIfTI's
            nib.save(nib.Nifti1Image(out.astype(np.int16), pred.input_affine), str(path))
        else:
            from monai.transforms import Resize

            out = Resize(spatial_size=pred.input_shape, mode="nearest")(label.float())[0]
            arr = np.asarray(out).round().astype(np.uint16)
            if path.name.endswith((".nii", ".nii.gz")):
                import nibabel as nib

                nib.save(nib.Nifti1Image(arr.astype(np.int16), np.eye(4)), str(path))
            else:
                from PIL import Image

                Image.fromarray(arr.T).save(str(path))  # (W, H) -> rows first
        return path


def model_from_checkpoint(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild the ``AnatomyVLPModel`` a training checkpoint describes and load its weights (strict).

    Returns:
        ``(model, extras)`` with ``extras["preprocessing"]`` filled (the bundle defaults, with the
        model's input size, for a checkpoint saved before it carried them).
    """
    from ..engines.checkpoint import load_checkpoint
    from ..networks.vlp_model import AnatomyVLPModel

    path = Path(path)
    ckpt = load_checkpoint(path)
    extras = ckpt.get("extras")
    if not isinstance(extras, dict) or "model_config" not in extras:
        raise ValueError(f"checkpoint {path}: has no 'extras' with the model configuration (is it a bundle training checkpoint?)")
    config = dict(extras["model_config"])
    config["catalog"] = load_catalog(extras.get("catalog") or config["catalog"])
    model = AnatomyVLPModel(**config)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: its weights do not fit the model it describes: {e}") from e
    model.eval()
    extras = dict(extras)
    pre = dict(extras.get("preprocessing") or {})
    if not pre:
        logger.warning("checkpoint %s carries no preprocessing settings: using the bundle defaults", path)
    pre.setdefault("roi_size", config["img_size"])
    extras["preprocessing"] = pre
    return model, extras


def deploy_from_checkpoint(path: str | Path) -> Any:
    """The TorchScript-ready :class:`~anatomy_vlp_bundle.networks.deploy.DeployWrapper` of a training
    checkpoint, carrying its preprocessing (``network_def`` of ``configs/inference.yaml`` for
    ``python -m monai.bundle ckpt_export``)."""
    from ..networks.deploy import DeployWrapper

    model, extras = model_from_checkpoint(path)
    return DeployWrapper(model, preprocessing=extras["preprocessing"])


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds ``*/code/`` entries; a checkpoint saved by ``torch.save`` does not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist()[:200])
    except zipfile.BadZipFile:
        return False
