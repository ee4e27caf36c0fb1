"""Reading and writing contract datalists (``datalist.json``, see ``DATA_CONTRACT.md``).

This module parses the file and resolves paths; it does not check the records' content
(that is :mod:`anatomy_vlp_bundle.data.validate`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Catalog, load_catalog

__all__ = [
    "Datalist",
    "DatalistError",
    "load_datalist",
    "read_datalist_json",
    "write_datalist",
    "SPLITS",
    "PATH_FIELDS",
    "resolve_record",
]

SPLITS = ("training", "validation", "test")
#: Record fields that hold a path (relative to the datalist's folder) or a dict of paths.
PATH_FIELDS = ("image", "anatomy_mask")
PATH_DICT_FIELDS = ("anatomy_masks",)
#: Byte-order marks of encodings a datalist is sometimes saved in by mistake (UTF-8's own BOM is accepted).
_OTHER_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


class DatalistError(ValueError):
    """A datalist that cannot be read at all (the validator reports record-level problems)."""


@dataclass
class Datalist:
    """A parsed datalist.

    Attributes:
        path: the ``datalist.json`` file.
        name, modality: from the file.
        catalog_ref: the ``catalog`` value as written.
        splits: split name -> list of records as written (paths still relative).
    """

    path: Path
    name: str
    modality: str
    catalog_ref: str
    splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent

    def catalog(self) -> Catalog:
        return load_catalog(self.catalog_ref, base_dir=self.root)

    def records(self, split: str, resolve: bool = True) -> list[dict[str, Any]]:
        """Records of ``split`` (empty list when absent), with absolute paths when ``resolve``."""
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; splits are {SPLITS}")
        recs = self.splits.get(split) or []
        return [resolve_record(r, self.root) for r in recs] if resolve else [copy.deepcopy(r) for r in recs]


def resolve_record(record: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """A copy of ``record`` with its path fields made absolute against ``root`` (anything that is not
    a record, i.e. not a JSON object, is copied unchanged: the validator reports it)."""
    root = Path(root)
    out = copy.deepcopy(record)
    if not isinstance(out, dict):
        return out
    for key in PATH_FIELDS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = _absolute(out[key], root)
    for key in PATH_DICT_FIELDS:
        if isinstance(out.get(key), dict):
            out[key] = {k: (_absolute(v, root) if isinstance(v, str) else v) for k, v in out[key].items()}
    return out


def _absolute(value: str, root: Path) -> str:
    """``value`` made absolute against ``root`` (symlinks resolved); a path the OS cannot resolve (a NUL
    byte, a symlink loop) is only joined, and the reader that opens it reports the problem."""
    if Path(value).is_absolute():
        return value
    try:
        return str((root / value).resolve())
    except (OSError, ValueError, RuntimeError):
        return str(root / value)


def read_datalist_json(path: str | Path) -> Any:
    """The parsed JSON of a datalist file: UTF-8 text (a leading UTF-8 byte-order mark is allowed).

    Raises:
        DatalistError: naming the file when it is missing or unreadable, not UTF-8 (the message says
        which byte, and names UTF-16/UTF-32 when the file starts with their byte-order mark), not
        valid JSON, or nested too deeply to parse.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatalistError(f"{path}: datalist not found") from None
    except OSError as e:
        raise DatalistError(f"{path}: cannot read the datalist ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bom = next((name for mark, name in _OTHER_BOMS.items() if raw.startswith(mark)), None)
        if bom:
            raise DatalistError(f"{path}: the datalist is {bom} text; save it as UTF-8") from None
        raise DatalistError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start} is not valid UTF-8: "
            "Latin-1 or Windows-1252?); save the datalist as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise DatalistError(f"{path}: not valid JSON (nested too deeply to parse)") from None
    except ValueError as e:  # JSONDecodeError, and integers beyond Python's digit limit
        raise DatalistError(f"{path}: not valid JSON ({e})") from None


def load_datalist(path: str | Path) -> Datalist:
    """Parse a ``datalist.json``; raises :class:`DatalistError` naming the file when it is unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / "datalist.json"
    data = read_datalist_json(path)
    if not isinstance(data, dict):
        raise DatalistError(f"{path}: a datalist must be a JSON object")
    for key in ("modality", "catalog"):
        if key not in data:
            raise DatalistError(f"{path}: missing required key '{key}'")
    splits = {}
    for split in SPLITS:
        recs = data.get(split)
        if recs is None:
            continue
        if not isinstance(recs, list):
            raise DatalistError(f"{path}: '{split}' must be a list of records")
        splits[split] = recs
    if not splits.get("training") and not splits.get("validation") and not splits.get("test"):
        raise DatalistError(f"{path}: no records in any of {SPLITS}")
    return Datalist(
        path=path.resolve(),
        name=str(data.get("name", path.parent.name)),
        modality=str(data["modality"]),
        catalog_ref=str(data["catalog"]),
        splits=splits,
    )


def write_datalist(
    path: str | Path,
    *,
    name: str,
    modality: str,
    catalog: str,
    splits: dict[str, list[dict[str, Any]]],
) -> Path:
    """Write a contract datalist (paths in records must already be relative to ``path``'s folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"name": name, "modality": modality, "catalog": catalog}
    for split in SPLITS:
        if split in splits:
            data[split] = splits[split]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
