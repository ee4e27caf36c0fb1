"""Command-line option values shared by the commands (python-fire passes ``--x false`` as text)."""

from __future__ import annotations

from typing import Any

__all__ = ["as_flag"]


def as_flag(value: Any, name: str, where: str) -> bool:
    """A boolean option given as a bool or as command-line text (``true`` / ``false``, ``1`` / ``0``,
    ``yes`` / ``no``); anything else is a ``ValueError`` naming ``where`` and the option."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
