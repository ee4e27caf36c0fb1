"""Anatomy-aware vision-language pre-training for 3D CT and 2D chest X-ray (a MONAI bundle)."""

__version__ = "0.9.0"
