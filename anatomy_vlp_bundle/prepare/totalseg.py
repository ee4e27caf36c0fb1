"""TotalSegmentator label maps onto an existing CT datalist: ``prepare totalseg-masks``.

``python -m anatomy_vlp_bundle prepare totalseg-masks --input MASK_DIR --output DIR --datalist OLD/datalist.json``
writes ``DIR/datalist.json``: the records of ``OLD/datalist.json`` (same splits, paths made relative
to ``DIR``), each gaining an ``anatomy_mask`` when ``MASK_DIR`` holds a TotalSegmentator output for it.

A record's output is looked up by its ``id``, then by its image's file name without suffix
(``ct_0001.nii.gz`` -> ``ct_0001``), in either of TotalSegmentator's two output forms:

- ``MASK_DIR/<key>.nii.gz`` — one multilabel file (``TotalSegmentator ... --ml``) holding the
  TotalSegmentator v2 ``total`` task's class ids. It is referenced in place. When its header carries
  TotalSegmentator's label table (a NIfTI extension naming every id), the names are checked against
  the v2 ids, so that a TotalSegmentator v1 file (other ids) is refused instead of mislabelled.
- ``MASK_DIR/<key>/`` — a folder with one binary file per class (``liver.nii.gz``,
  ``lung_upper_lobe_left.nii.gz``, ...; TotalSegmentator's default output). The classes the catalog's
  ``labels`` use are combined into one ``uint8`` label map with their v2 ``total`` ids, on the class
  files' grid, written to ``DIR/masks/<id>.nii.gz`` (where class files overlap, the larger id wins).

The catalog's ``labels`` are the id mapping (data contract); this module only needs the
TotalSegmentator class names of those ids, in :data:`TOTAL_V2_CLASS_IDS`. A map marks every catalog
anatomy it does not contain as *absent*, so a mask that does not cover an anatomy at all (a
``--roi_subset`` run, a folder missing that organ's class files) is refused with the anatomies named.

Records without an output keep their fields and are counted in the summary; an unreadable or
unusable mask skips its record with the reason. A mask on another grid than the image is fine: the
contract brings it onto the image by physical position.

Running TotalSegmentator (optional; it is not a dependency of this bundle)::

    pip install TotalSegmentator
    TotalSegmentator -i ct.nii.gz -o seg/ct.nii.gz --ml    # one multilabel file per case
    TotalSegmentator -i ct.nii.gz -o seg/ct                # or a folder of per-class files

Name each output after the record's ``id`` or its image file; run it on the very volumes the
datalist references (after any geometry fix), so that the masks share their physical space.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.catalog import Catalog
from ..data.datalist import PATH_DICT_FIELDS, PATH_FIELDS, SPLITS, load_datalist
from .common import DEFAULT_FRACTIONS, PrepareSummary, SkipCase, SourceCase, relative_path, run_prepare

__all__ = [
    "TOTAL_V2_CLASS_IDS",
    "MaskSource",
    "find_mask",
    "attach_mask",
    "catalog_class_names",
    "save_nifti",
    "prepare",
]

#: TotalSegmentator v2 ``total`` task: class name -> label id, for the ids the ``ct_totalseg`` catalog
#: uses. Source: TotalSegmentator ``totalsegmentator/map_to_binary.py``, ``class_map["total"]``
#: (https://github.com/wasserth/TotalSegmentator). Per-class output files are named ``<class name>.nii.gz``.
TOTAL_V2_CLASS_IDS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "adrenal_gland_right": 8,
    "adrenal_gland_left": 9,
    "lung_upper_lobe_left": 10,
    "lung_lower_lobe_left": 11,
    "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13,
    "lung_lower_lobe_right": 14,
    "esophagus": 15,
    "trachea": 16,
    "thyroid_gland": 17,
    "small_bowel": 18,
    "duodenum": 19,
    "colon": 20,
    "urinary_bladder": 21,
    "kidney_cyst_left": 23,
    "kidney_cyst_right": 24,
    "sacrum": 25,
    "vertebrae_S1": 26,
    "vertebrae_L5": 27,
    "vertebrae_L4": 28,
    "vertebrae_L3": 29,
    "vertebrae_L2": 30,
    "vertebrae_L1": 31,
    "vertebrae_T12": 32,
    "vertebrae_T11": 33,
    "vertebrae_T10": 34,
    "vertebrae_T9": 35,
    "vertebrae_T8": 36,
    "vertebrae_T7": 37,
    "vertebrae_T6": 38,
    "vertebrae_T5": 39,
    "vertebrae_T4": 40,
    "vertebrae_T3": 41,
    "vertebrae_T2": 42,
    "vertebrae_T1": 43,
    "vertebrae_C7": 44,
    "vertebrae_C6": 45,
    "vertebrae_C5": 46,
    "vertebrae_C4": 47,
    "vertebrae_C3": 48,
    "vertebrae_C2": 49,
    "vertebrae_C1": 50,
    "heart": 51,
    "aorta": 52,
    "atrial_appendage_left": 61,
}
_NAME_OF_ID = {v: k for k, v in TOTAL_V2_CLASS_IDS.items()}
MASK_SUFFIXES = (".nii.gz", ".nii")
#: Folder (inside the output folder) for label maps combined from per-class files.
COMBINED_DIR = "masks"
# One <Label Key="5" ...><![CDATA[liver]]></Label> entry of TotalSegmentator's label-table extension.
_LABEL_ENTRY = re.compile(r'<Label\s+Key="(\d+)"[^>]*>\s*<!\[CDATA\[(.*?)\]\]>\s*</Label>', re.S)


@dataclass(frozen=True)
class MaskSource:
    """A TotalSegmentator output found for one case.

    Attributes:
        path: the multilabel file, or the folder of per-class files.
        per_class: True for a folder of per-class binary files.
    """

    path: Path
    per_class: bool


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_mask(mask_dir: str | Path, keys: Sequence[str]) -> MaskSource | None:
    """The TotalSegmentator output in ``mask_dir`` for the first of ``keys`` that has one.

    For each key, a multilabel file ``<key>.nii.gz`` / ``<key>.nii`` wins over a per-class folder
    ``<key>/``. Returns None when no key has an output.
    """
    mask_dir = Path(mask_dir)
    for key in dict.fromkeys(k for k in keys if k):
        for suffix in MASK_SUFFIXES:
            candidate = mask_dir / f"{key}{suffix}"
            if candidate.is_file():
                return MaskSource(candidate, per_class=False)
        if (mask_dir / key).is_dir():
            return MaskSource(mask_dir / key, per_class=True)
    return None


def catalog_class_names(catalog: Catalog) -> tuple[dict[int, str], list[int]]:
    """TotalSegmentator class names of the catalog's label ids.

    Returns:
        ``(label id -> class name, ids of the catalog that have no name in TOTAL_V2_CLASS_IDS)``.
    """
    ids = sorted(catalog.label_to_index())
    return {i: _NAME_OF_ID[i] for i in ids if i in _NAME_OF_ID}, [i for i in ids if i not in _NAME_OF_ID]


def _uncovered(catalog: Catalog, covered_ids: set[int]) -> list[str]:
    """Catalog anatomies with labels of which ``covered_ids`` holds none (the map would call them absent)."""
    return [a.name for a in catalog.anatomies if a.labels and not set(a.labels) & covered_ids]


def _load(path: Path):
    """``(nibabel image, voxels)`` of a 3D NIfTI mask, or SkipCase naming the file and the problem."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip, bad header, not NIfTI
        raise SkipCase(f"unreadable mask: {path}: {type(e).__name__}: {e}") from None
    if data.ndim != 3:
        raise SkipCase(f"unusable mask: {path}: {data.ndim}D array (shape {data.shape}); a CT label map is 3D")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data) & (np.mod(data, 1) == 0)):
        raise SkipCase(f"unusable mask: {path}: non-integer values; a label map holds integer class ids")
    return img, data


def _label_table(img) -> dict[int, str] | None:
    """TotalSegmentator's label table (id -> class name) from the NIfTI header extension, if present."""
    for ext in img.header.extensions:
        try:
            content = ext.get_content()
        except Exception:
            continue
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        entries = _LABEL_ENTRY.findall(text)
        if entries:
            return {int(k): name.strip() for k, name in entries}
    return None


def _check_multilabel(path: Path, catalog: Catalog) -> None:
    """Refuse a multilabel file whose ids are not v2 ``total`` ids or that misses catalog anatomies."""
    img, _ = _load(path)  # decoded too, so that a truncated file is caught here
    table = _label_table(img)
    if table is None:  # no label table: the ids are taken as v2 'total' ids
        return
    for label_id, name in sorted(table.items()):
        expected = TOTAL_V2_CLASS_IDS.get(name)
        if expected is not None and expected != label_id:
            raise SkipCase(
                f"not TotalSegmentator v2 'total' ids: {path}: its label table says {label_id} = {name}, "
                f"v2 'total' has {name} = {expected} (a TotalSegmentator v1 or other-task output?)"
            )
    missing = _uncovered(catalog, set(table))
    if missing:
        raise SkipCase(f"mask does not cover anatomies {', '.join(missing)}: {path}: its label table has no class "
                       "of them, so the label map would mark them absent (a --roi_subset run?)")


def _combine_per_class(folder: Path, catalog: Catalog, target: Path) -> None:
    """Combine the catalog's per-class files in ``folder`` into one uint8 label map at ``target``."""
    names, _ = catalog_class_names(catalog)
    files = {}
    for label_id, name in names.items():
        for suffix in MASK_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                files[label_id] = folder / f"{name}{suffix}"
                break
    if not files:
        raise SkipCase(f"no TotalSegmentator class file in {folder} (expected e.g. liver.nii.gz, heart.nii.gz)")
    missing = _uncovered(catalog, set(files))
    if missing:
        raise SkipCase(f"mask does not cover anatomies {', '.join(missing)}: {folder} has none of their class files, "
                       "so the label map would mark them absent")
    combined = None
    first_path, first_img = None, None
    for label_id in sorted(files):  # ascending: where class files overlap, the larger id wins
        path = files[label_id]
        img, data = _load(path)
        if combined is None:
            combined = np.zeros(data.shape, dtype=np.uint8)
            first_path, first_img = path, img
        elif data.shape != combined.shape or not np.allclose(img.affine, first_img.affine, atol=1e-4):
            raise SkipCase(f"class files on different grids: {path.name} (shape {data.shape}) vs {first_path.name} "
                           f"(shape {combined.shape}) in {folder}")
        combined[data != 0] = label_id
    save_nifti(combined, first_img.affine, target)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI (qform and sform = ``affine``, mm units) atomically: a crash leaves no half file."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.partial.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._") or "case"


def attach_mask(source: MaskSource, case_id: str, output: str | Path, catalog: Catalog) -> str:
    """The ``anatomy_mask`` value (relative to ``output``) for ``source``.

    A multilabel file is checked and referenced in place; a per-class folder is combined into
    ``output/masks/<case id>.nii.gz``. Raises :class:`SkipCase` for an unreadable or unusable mask.
    """
    output = Path(output)
    if not source.per_class:
        _check_multilabel(source.path, catalog)
        return relative_path(source.path, output)
    target = output / COMBINED_DIR / f"{_safe_name(case_id)}.nii.gz"
    _combine_per_class(source.path, catalog, target)
    return relative_path(target, output)


# --------------------------------------------------------------------------------------------- prepare
def _image_key(record: dict[str, Any]) -> str | None:
    image = record.get("image")
    return _strip_suffix(Path(image).name) if isinstance(image, str) and image else None


def _relocate(record: dict[str, Any], output: Path) -> dict[str, Any]:
    """``record`` (absolute paths) with its path fields relative to ``output``."""
    out = dict(record)
    for key in PATH_FIELDS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = relative_path(out[key], output)
    for key in PATH_DICT_FIELDS:
        if isinstance(out.get(key), dict):
            out[key] = {k: relative_path(v, output) if isinstance(v, str) else v for k, v in out[key].items()}
    return out


def prepare(
    input: str,
    output: str,
    datalist: str | None = None,
    replace: bool = False,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    force: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> PrepareSummary:
    """Attach TotalSegmentator label maps to the records of an existing CT datalist.

    A re-run reuses the records a previous run finished (pass ``force`` after adding outputs for
    records that were already written without one).

    Args:
        input: the folder of TotalSegmentator outputs (``<key>.nii.gz`` multilabel files and/or
            ``<key>/`` per-class folders; key = record id or image file name without suffix).
        output: the folder for the new ``datalist.json`` (and combined masks); not the input
            datalist's folder.
        datalist: the existing contract datalist (``datalist.json`` or its folder), modality CT, whose
            catalog's ``labels`` are TotalSegmentator v2 ``total`` ids (e.g. ``ct_totalseg``).
        replace: replace a record's existing ``anatomy_mask``; by default it is kept.
        seed, fractions: passed on to the split machinery (records keep their datalist's split).
        force: convert every record again instead of reusing a previous run's.
        validate: validate the written datalist (headers).
        progress: show a progress bar.
    """
    mask_dir = Path(input)
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"{mask_dir}: mask folder not found (--input is the folder of TotalSegmentator outputs)")
    if not datalist:
        raise ValueError("--datalist is required: the existing datalist.json whose records get the masks")
    source = load_datalist(datalist)
    if source.modality != "CT":
        raise ValueError(f"{source.path}: modality is {source.modality!r}; TotalSegmentator masks are for CT datalists")
    catalog = source.catalog()
    output_dir = Path(output)
    if output_dir.resolve() == source.root.resolve():
        raise ValueError(f"{output_dir}: --output must differ from the input datalist's folder (it would be overwritten)")
    catalog_ref = source.catalog_ref
    if catalog_ref.endswith(".json"):
        catalog_ref = relative_path(source.root / catalog_ref, output_dir)

    names, unnamed = catalog_class_names(catalog)
    notes = []
    if not names:
        raise ValueError(f"catalog {catalog.name!r} of {source.path} lists no TotalSegmentator v2 'total' label id")
    if unnamed:
        notes.append(f"catalog {catalog.name!r} label ids {unnamed} have no TotalSegmentator class name here: "
                     "per-class folders cannot provide them (multilabel files are used as they are)")

    cases, counts = [], {"found": 0, "none": 0, "kept": 0}
    for split in SPLITS:
        for index, record in enumerate(source.records(split)):
            case_id = str(record.get("id", f"{split}[{index}]"))
            found = find_mask(mask_dir, [case_id, _image_key(record)])
            if found is None:
                counts["none"] += 1
            elif "anatomy_mask" in record and not replace:
                counts["kept"] += 1
                found = None
            else:
                counts["found"] += 1
            patient = record.get("patient")
            cases.append(SourceCase(id=case_id, patient=None if patient is None else str(patient), split=split,
                                    data=(record, found)))
    notes.append(f"TotalSegmentator outputs found for {counts['found']} records; {counts['none']} records have none "
                 f"in {mask_dir} and are kept without a new anatomy_mask")
    if counts["kept"]:
        notes.append(f"{counts['kept']} records already had an anatomy_mask and kept it (--replace to use TotalSegmentator's)")

    def convert(case: SourceCase, out: Path) -> dict:
        record, found = case.data
        new = _relocate(record, out)
        if found is not None:
            new["anatomy_mask"] = attach_mask(found, case.id, out, catalog)
        return new

    return run_prepare(
        source="totalseg-masks",
        name=f"{source.name}+totalseg",
        modality="CT",
        catalog=catalog_ref,
        output=output_dir,
        cases=cases,
        convert=convert,
        fractions=fractions,
        seed=seed,
        validate=validate,
        progress=progress,
        force=force,
        notes=notes,
        options={"datalist": str(datalist), "replace": bool(replace)},
    )
