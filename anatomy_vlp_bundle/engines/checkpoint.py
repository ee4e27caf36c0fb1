"""What a checkpoint carries besides weights, as plain types (``torch.load(..., weights_only=True)``).

Ignite's ``Checkpoint`` (behind MONAI's ``CheckpointSaver`` / ``CheckpointLoader``) saves every
object of its ``save_dict`` through ``state_dict()`` and restores it through ``load_state_dict()``.
:class:`CheckpointExtras` is such an object: it reads the catalog, the model's constructor
arguments and its decision thresholds from the network when saved, so the checkpoint is
self-describing without pickled classes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["CheckpointExtras", "load_checkpoint", "latest_checkpoint", "CHECKPOINT_KEYS"]

logger = logging.getLogger(__name__)

#: keys of a training checkpoint (``model.pt`` and ``checkpoint_epoch=N.pt``)
CHECKPOINT_KEYS = ("model", "optimizer", "lr_scheduler", "trainer", "extras")


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return getattr(network, "module", network)


def _plain(x: Any) -> Any:
    """Plain JSON-like types (config values may be tuples or numpy scalars)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


class CheckpointExtras:
    """``catalog``, ``model_config``, ``thresholds``, ``study_thresholds``, ``version``,
    ``preprocessing``: plain types.

    Args:
        network: the ``AnatomyVLPModel`` (or a DDP wrapper); read at save time.
        version: the bundle version (``metadata.json``'s ``version``).
        preprocessing: the inference chain's settings (``spacing``, ``roi_size``, ``hu_window``, ...),
            so that ``python -m anatomy_vlp_bundle infer`` rebuilds it from the checkpoint alone.

    ``load_state_dict`` restores the thresholds into the network (they are also buffers of the
    model state dict, so this only matters for a model loaded without them) and keeps the loaded
    dict as ``loaded``; a different catalog is reported, not silently accepted.
    """

    def __init__(self, network: torch.nn.Module, version: str = "", preprocessing: Optional[dict[str, Any]] = None):
        self.network = network
        self.version = str(version)
        self.preprocessing = _plain(preprocessing or {})
        self.loaded: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        net = _unwrap(self.network)
        return {
            "catalog": net.catalog.to_dict(),
            "model_config": dict(net.config),
            "thresholds": net.thresholds.detach().cpu().tolist(),
            "study_thresholds": net.study_thresholds.detach().cpu().tolist(),
            "version": self.version,
            "preprocessing": self.preprocessing,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        net = _unwrap(self.network)
        own = net.catalog.to_dict()
        if state.get("catalog") and state["catalog"].get("anatomies") != own.get("anatomies"):
            raise ValueError(
                f"checkpoint extras: the checkpoint was trained on catalog {state['catalog'].get('name')!r} with other "
                f"anatomies than the configured catalog {own.get('name')!r}"
            )
        net.set_thresholds(torch.tensor(state["thresholds"]), torch.tensor(state["study_thresholds"]))
        self.loaded = dict(state)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a bundle checkpoint with ``weights_only=True``; a clear error names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train first, or set ckpt_path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - say which file and why
        raise ValueError(f"checkpoint {path}: cannot be loaded with weights_only=True: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"checkpoint {path}: expected a dict with a 'model' state dict, got keys {list(ckpt)[:10]}")
    return ckpt


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = "checkpoint") -> Optional[str]:
    """Path of the newest ``{prefix}_epoch=N.pt`` in ``ckpt_dir`` (highest N), or None."""
    best, best_epoch = None, -1
    for p in Path(ckpt_dir).glob(f"{prefix}_epoch=*.pt"):
        try:
            epoch = int(p.stem.split("=")[-1])
        except ValueError:
            continue
        if epoch > best_epoch:
            best, best_epoch = str(p), epoch
    return best
