"""What a checkpoint carries besides weights, as plain types (``torch.load(..., weights_only=True)``),
and how checkpoints are kept safe.

Ignite's ``Checkpoint`` (behind MONAI's ``CheckpointSaver`` / ``CheckpointLoader``) saves every
object of its ``save_dict`` through ``state_dict()`` and restores it through ``load_state_dict()``.
:class:`CheckpointExtras` is such an object: it reads the catalog, the model's constructor
arguments and its decision thresholds from the network when saved, so the checkpoint is
self-describing without pickled classes.

Crash safety: Ignite's ``DiskSaver`` (behind ``CheckpointSaver``) writes each file to a temporary
file in the same folder and renames it, so a run killed mid-write leaves the previous checkpoint
whole. :class:`CheckpointChecksums` then writes a ``<file>.sha256`` beside every checkpoint
(``sha256sum`` format, also written atomically); :func:`verify_checkpoint` checks it and loads the
file with ``weights_only=True``, and resuming (``engines.workflow.resume_checkpoint``) takes the
newest checkpoint that passes, naming every one that does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "CheckpointExtras", "CheckpointChecksums", "load_checkpoint", "latest_checkpoint", "epoch_checkpoints",
    "write_checksum", "verify_checkpoint", "file_sha256", "CHECKPOINT_KEYS",
]

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


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, config value)}`` of the model settings that differ.

    A key the checkpoint does not record (saved before the option existed) counts as the
    constructor's default, which is how :func:`~anatomy_vlp_bundle.inference.predictor.model_from_checkpoint`
    rebuilds it. The catalog is compared by name.
    """
    import inspect

    from ..networks.vlp_model import AnatomyVLPModel

    params = inspect.signature(AnatomyVLPModel.__init__).parameters
    diffs: dict[str, tuple[Any, Any]] = {}
    for key, value in current.items():
        if key == "catalog":
            continue
        if key in saved:
            old = saved[key]
        elif key in params and params[key].default is not inspect.Parameter.empty:
            old = params[key].default
        else:
            continue
        if _json(old) != _json(value):
            diffs[key] = (_json(old), _json(value))
    return diffs


#: Model settings that only change how a trained model is read at evaluation and inference (not what
#: training learned): a checkpoint is evaluated with the config's value, and the difference is logged.
EVALUATION_SETTINGS = ("stats_ensemble",)


def check_model_config(path: str | Path, network: torch.nn.Module, enabled: bool = True) -> None:
    """Refuse to evaluate a checkpoint with other model settings than it was trained with.

    ``monai.bundle run evaluating`` builds ``network_def`` from the configs, not from the checkpoint:
    a training run with ``--network_def#...`` overrides needs the same overrides at evaluation.
    Structural differences would fail in the state-dict loading with a long key list; others (a
    threshold, a flag) would load and silently measure another model. The error names the file,
    each differing setting and the overrides that reproduce the training. ``enabled=False``
    (``check_model_config: false``) evaluates with the config's settings on purpose. The
    :data:`EVALUATION_SETTINGS` may differ (logged).
    """
    if not enabled:
        return
    ckpt = load_checkpoint(path)
    extras = ckpt.get("extras")
    net = _unwrap(network)
    current = getattr(net, "config", None)
    if not isinstance(extras, dict) or not isinstance(extras.get("model_config"), dict) or not isinstance(current, dict):
        return
    diffs = model_config_differences(extras["model_config"], current)
    for key in EVALUATION_SETTINGS:
        if key in diffs:
            saved, used = diffs.pop(key)
            logger.warning(f"checkpoint {path}: evaluated with {key} {used!r} (this config's; trained with {saved!r})")
    if diffs:
        listed = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diffs.items())
        overrides = " ".join(f'--network_def#{k} "{a!r}"' for k, (a, _) in diffs.items())
        raise ValueError(
            f"checkpoint {path}: trained with other model settings than this config's network_def ({listed}). "
            f"Evaluate with the training's overrides ({overrides}), or set check_model_config to false to "
            "evaluate with the config's settings on purpose."
        )


def epoch_checkpoints(ckpt_dir: str | Path, prefix: str = "checkpoint") -> list[str]:
    """Paths of the ``{prefix}_epoch=N.pt`` files in ``ckpt_dir``, newest (highest N) first."""
    found = []
    for p in Path(ckpt_dir).glob(f"{prefix}_epoch=*.pt"):
        try:
            found.append((int(p.stem.split("=")[-1]), str(p)))
        except ValueError:
            continue
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str | Path, prefix: str = "checkpoint") -> Optional[str]:
    """Path of the newest ``{prefix}_epoch=N.pt`` in ``ckpt_dir`` (highest N), or None."""
    found = epoch_checkpoints(ckpt_dir, prefix)
    return found[0] if found else None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_checksum(path: str | Path) -> Path:
    """Write ``<path>.sha256`` (``"<hex>  <name>"``, as ``sha256sum``) atomically; returns its path."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sha256_")
    with os.fdopen(fd, "w") as f:
        f.write(f"{file_sha256(path)}  {path.name}\n")
    os.replace(tmp, side)
    return side


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check ``<path>.sha256`` when it exists, then :func:`load_checkpoint`; a clear error names the file.

    Raises:
        ValueError: the checksum differs (the file changed after it was written) or the file does not load.
    """
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if side.is_file() and path.is_file():
        want = (side.read_text().split() or [""])[0]
        got = file_sha256(path)
        if want != got:
            raise ValueError(f"checkpoint {path}: SHA-256 {got[:12]}... does not match {side.name} ({want[:12]}...): the file is corrupted")
    return load_checkpoint(path)


class CheckpointChecksums:
    """Ignite handler: after each epoch, a ``.sha256`` beside every new or rewritten ``*.pt`` of
    ``ckpt_dir`` and none beside files that are gone. Attach it after the ``CheckpointSaver`` of
    the same engine (handlers run in the order they were attached).

    Args:
        ckpt_dir: the savers' ``save_dir``.
    """

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any = None) -> None:
        if not self.ckpt_dir.is_dir():
            return
        for side in self.ckpt_dir.glob("*.pt.sha256"):
            if not side.with_name(side.name[: -len(".sha256")]).is_file():
                side.unlink(missing_ok=True)
        for ckpt in self.ckpt_dir.glob("*.pt"):
            side = ckpt.with_name(ckpt.name + ".sha256")
            if not side.is_file() or side.stat().st_mtime_ns < ckpt.stat().st_mtime_ns:
                write_checksum(ckpt)
