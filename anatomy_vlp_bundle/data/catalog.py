"""Anatomy catalogs: the single source of truth for anatomy names, label ids and finding names.

A catalog (see ``DATA_CONTRACT.md``) lists the anatomies in the order of the model's anatomy
queries, the label-map values that make up each anatomy, the synonyms used to assign report
sentences to anatomies, and the findings of each anatomy. Built-in catalogs are JSON files in
``anatomy_vlp_bundle/catalogs``; a datalist may also point at its own ``catalog.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Anatomy", "Catalog", "CatalogError", "load_catalog", "builtin_catalogs", "mirror_index", "MODALITIES"]

MODALITIES = ("CT", "CXR")


class CatalogError(ValueError):
    """A catalog file or name that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Anatomy:
    name: str
    labels: tuple[int, ...] = ()
    synonyms: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    """An anatomy catalog.

    Attributes:
        name: catalog name (e.g. ``ct_totalseg``).
        modality: ``"CT"`` or ``"CXR"``.
        anatomies: anatomies in query order (row ``i`` of every per-anatomy tensor is ``anatomies[i]``).
        study_findings: findings no anatomy owns.
        finding_synonyms: optional finding name -> other phrasings (report parsing and writing).
        source: where the catalog was read from (a path or ``builtin:NAME``).
    """

    name: str
    modality: str
    anatomies: tuple[Anatomy, ...]
    study_findings: tuple[str, ...] = ()
    finding_synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> "Catalog":
        where = source or "<catalog>"
        if not isinstance(data, dict):
            raise CatalogError(f"{where}: a catalog must be a JSON object, got {type(data).__name__}")
        for key in ("name", "modality", "anatomies"):
            if key not in data:
                raise CatalogError(f"{where}: missing required key '{key}'")
        modality = data["modality"]
        if modality not in MODALITIES:
            raise CatalogError(f"{where}: modality must be one of {MODALITIES}, got {modality!r}")
        if not isinstance(data["anatomies"], list) or not data["anatomies"]:
            raise CatalogError(f"{where}: 'anatomies' must be a non-empty list")
        anatomies = []
        seen_names: set[str] = set()
        label_owner: dict[int, str] = {}
        for i, item in enumerate(data["anatomies"]):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
                raise CatalogError(f"{where}: anatomies[{i}] needs a non-empty string 'name'")
            name = item["name"]
            if name in seen_names:
                raise CatalogError(f"{where}: anatomy name {name!r} appears twice")
            seen_names.add(name)
            labels = item.get("labels", []) or []
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in labels):
                raise CatalogError(f"{where}: anatomy {name!r}: 'labels' must be positive integers, got {labels!r}")
            for v in labels:
                if v in label_owner:
                    raise CatalogError(f"{where}: label {v} belongs to both {label_owner[v]!r} and {name!r}")
                label_owner[v] = name
            findings = item.get("findings", []) or []
            if len(set(findings)) != len(findings):
                raise CatalogError(f"{where}: anatomy {name!r} lists a finding twice")
            synonyms = item.get("synonyms") or [name]
            anatomies.append(
                Anatomy(name=name, labels=tuple(labels), synonyms=tuple(synonyms), findings=tuple(findings))
            )
        synonyms = {k: tuple(v) for k, v in (data.get("finding_synonyms") or {}).items()}
        return cls(
            name=str(data["name"]),
            modality=modality,
            anatomies=tuple(anatomies),
            study_findings=tuple(data.get("study_findings", []) or []),
            finding_synonyms=synonyms,
            source=source,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "Catalog":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CatalogError(f"{path}: catalog file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CatalogError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form (JSON and ``torch.load(weights_only=True)`` safe)."""
        out: dict[str, Any] = {
            "name": self.name,
            "modality": self.modality,
            "anatomies": [
                {"name": a.name, "labels": list(a.labels), "synonyms": list(a.synonyms), "findings": list(a.findings)}
                for a in self.anatomies
            ],
            "study_findings": list(self.study_findings),
        }
        if self.finding_synonyms:
            out["finding_synonyms"] = {k: list(v) for k, v in self.finding_synonyms.items()}
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    # ----------------------------------------------------------------- queries
    @property
    def names(self) -> list[str]:
        return [a.name for a in self.anatomies]

    @property
    def num_anatomies(self) -> int:
        return len(self.anatomies)

    @property
    def spatial_dims(self) -> int:
        return 3 if self.modality == "CT" else 2

    @property
    def max_findings(self) -> int:
        """Largest number of findings of any anatomy or of the study (width of per-anatomy finding tensors)."""
        return max([len(a.findings) for a in self.anatomies] + [len(self.study_findings)])

    def index(self, name: str) -> int:
        for i, a in enumerate(self.anatomies):
            if a.name == name:
                return i
        raise KeyError(f"anatomy {name!r} is not in catalog {self.name!r} (has: {', '.join(self.names)})")

    def anatomy(self, name: str) -> Anatomy:
        return self.anatomies[self.index(name)]

    def label_to_index(self) -> dict[int, int]:
        """Label-map value -> anatomy row, for anatomies defined by ``labels``."""
        return {v: i for i, a in enumerate(self.anatomies) for v in a.labels}

    def finding_pairs(self) -> list[tuple[str, str]]:
        """All ``(anatomy, finding)`` pairs in catalog order."""
        return [(a.name, f) for a in self.anatomies for f in a.findings]

    def phrasings(self, finding: str) -> tuple[str, ...]:
        """The finding's own name followed by its synonyms (duplicates removed)."""
        out = [finding] + [s for s in self.finding_synonyms.get(finding, ()) if s != finding]
        return tuple(dict.fromkeys(out))

    def remap_from(self, other: "Catalog") -> list[int]:
        """For each anatomy of ``self``, the row of the same-named anatomy in ``other`` or -1."""
        rows = {n: i for i, n in enumerate(other.names)}
        return [rows.get(n, -1) for n in self.names]


def mirror_index(names: "list[str] | tuple[str, ...]") -> list[int]:
    """Index of each anatomy's left-right counterpart by name (``left`` <-> ``right``; itself when
    the catalog has none), e.g. ``right upper lung zone`` <-> ``left upper lung zone``."""
    names = list(names)
    swapped = [n.replace("right", "\0").replace("left", "right").replace("\0", "left") for n in names]
    return [names.index(s) if s in names else i for i, s in enumerate(swapped)]


def builtin_catalogs() -> list[str]:
    """Names of the catalogs shipped with the package."""
    folder = resources.files("anatomy_vlp_bundle") / "catalogs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_catalog(ref: "str | Path | Catalog | dict", base_dir: str | Path | None = None) -> Catalog:
    """Load a catalog.

    Args:
        ref: a :class:`Catalog` (returned as is), a dict in catalog form, a path ending in ``.json``
            (relative to ``base_dir`` when given), or the name of a built-in catalog.
        base_dir: folder that relative catalog paths are resolved against (the datalist's folder).
    """
    if isinstance(ref, Catalog):
        return ref
    if isinstance(ref, dict):
        return Catalog.from_dict(ref, source="<dict>")
    ref_s = str(ref)
    if ref_s.endswith(".json"):
        path = Path(ref_s)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        return Catalog.from_file(path)
    names = builtin_catalogs()
    if ref_s not in names:
        raise CatalogError(f"unknown catalog {ref_s!r}: built-in catalogs are {names}; a path must end in .json")
    res = resources.files("anatomy_vlp_bundle") / "catalogs" / f"{ref_s}.json"
    data = json.loads(res.read_text(encoding="utf-8"))
    return Catalog.from_dict(data, source=f"builtin:{ref_s}")
