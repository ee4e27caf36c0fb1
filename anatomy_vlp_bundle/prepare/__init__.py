"""Public datasets to the data contract: ``python -m anatomy_vlp_bundle prepare SOURCE --input DIR --output DIR``.

Each source has a module with ``prepare(input, output, **options) -> PrepareSummary``; the shared
machinery (resume, patient splits, summary, validation) is :mod:`.common`.
"""

from __future__ import annotations

import importlib
import sys

from .common import PrepareSummary, SkipCase, SourceCase, assign_splits, hash_split, relative_path, run_prepare

__all__ = [
    "SOURCES",
    "prepare",
    "prepare_command",
    "PrepareSummary",
    "SkipCase",
    "SourceCase",
    "assign_splits",
    "hash_split",
    "relative_path",
    "run_prepare",
]

#: Source name -> module (relative to this package) holding its ``prepare`` function.
SOURCES = {
    "ctrate": ".ctrate",
    "totalseg-masks": ".totalseg",
    "imagenome": ".imagenome",
    "iu-xray": ".iu_xray",
    "chexpert": ".chexpert",
    "nih-cxr14": ".nih_cxr14",
}


def prepare(source: str, input: str, output: str, **options) -> PrepareSummary:
    """Run the converter of ``source`` (one of :data:`SOURCES`) and return its summary."""
    key = str(source).lower().replace("_", "-")
    if key not in SOURCES:
        raise ValueError(f"unknown source {source!r}; sources are {', '.join(SOURCES)}")
    module = importlib.import_module(SOURCES[key], __name__)
    return module.prepare(input=input, output=output, **options)


def prepare_command(source: str, input: str, output: str, **options) -> None:
    """Convert a public dataset into a contract datalist.

    ``python -m anatomy_vlp_bundle prepare SOURCE --input DIR --output DIR [options]`` with SOURCE one
    of ``ctrate``, ``totalseg-masks``, ``imagenome``, ``iu-xray``, ``chexpert``, ``nih-cxr14``.
    Common options: ``--seed`` (patient split hash), ``--fractions 0.8,0.1,0.1``, ``--force``
    (convert everything again instead of reusing finished cases), ``--novalidate``,
    ``--noprogress`` (python-fire's spelling of a false flag). Re-running
    reuses finished cases; skipped cases are tried again. Prints a summary and writes
    ``OUTPUT/prepare_summary.json``.

    Raises:
        SystemExit: 1 when no case could be converted or the written datalist fails validation.
    """
    if isinstance(options.get("fractions"), str):
        options["fractions"] = tuple(float(x) for x in options["fractions"].split(","))
    try:
        summary = prepare(source, input, output, **options)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise SystemExit(f"prepare {source}: {e}") from None
    print(summary.format())
    if summary.datalist is None or summary.validation_ok is False:
        sys.stdout.flush()
        raise SystemExit(1)
