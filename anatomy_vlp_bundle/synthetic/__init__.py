"""Synthetic datasets in the data-contract format (``python -m anatomy_vlp_bundle synth``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["synth_command", "ensure_synthetic_dataset"]


def synth_command(modality: str = "ct", out: str = "data/synthetic_ct", n: int | None = None, seed: int = 0, **kwargs) -> str:
    """Generate a synthetic dataset and write its ``datalist.json`` and ``catalog.json``.

    Args:
        modality: ``ct`` (3D NIfTI volumes) or ``cxr`` (2D radiographs projected from a 3D phantom).
        out: output folder.
        n: number of cases (default: the generator's default, with a test split of at least 100).
        seed: random seed; the output is deterministic given the seed and the arguments.
        **kwargs: generator-specific options (see ``synthetic.ct.generate_ct_dataset`` and
            ``synthetic.cxr.generate_cxr_dataset``), e.g. ``--conspicuity 0.5``.

    Returns:
        The path of the written ``datalist.json``.
    """
    modality = str(modality).lower()
    if modality == "ct":
        from .ct import generate_ct_dataset as generate
    elif modality == "cxr":
        from .cxr import generate_cxr_dataset as generate
    else:
        raise SystemExit(f"synth: --modality must be 'ct' or 'cxr', got {modality!r}")
    return str(generate(Path(out), n_cases=n, seed=seed, **kwargs))


def ensure_synthetic_dataset(dataset_dir: str, modality: str = "ct", seed: int = 0, **kwargs) -> str:
    """Return ``dataset_dir/datalist.json``, generating the default synthetic dataset there first if absent."""
    path = Path(dataset_dir) / "datalist.json"
    if not path.exists():
        synth_command(modality=modality, out=str(dataset_dir), seed=seed, **kwargs)
    return str(path)
