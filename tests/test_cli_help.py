"""``python -m anatomy_vlp_bundle <command> --help`` prints the command's help for every command,
including those taking ``**kwargs`` (which fire would hand ``help=True`` as an option)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from anatomy_vlp_bundle.cli import _help_to_fire


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["synth", "--help"], ["synth", "--", "--help"]),
        (["synth", "-h", "--modality", "cxr"], ["synth", "--modality", "cxr", "--", "--help"]),
        (["synth", "--help", "--", "--verbose"], ["synth", "--", "--verbose", "--help"]),
        (["synth", "--out", "x"], ["synth", "--out", "x"]),
        (["synth", "--", "--help"], ["synth", "--", "--help"]),
    ],
)
def test_help_moves_behind_separator(argv, expected):
    assert _help_to_fire(argv) == expected


@pytest.mark.parametrize("command", ["synth", "transfer"])
def test_kwargs_commands_print_help(command):
    # both take **kwargs: before the fix they raised TypeError / exited on an unknown option 'help'
    r = subprocess.run([sys.executable, "-m", "anatomy_vlp_bundle", command, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout + r.stderr  # fire writes the help to stderr when not on a terminal
    assert f"anatomy_vlp_bundle {command}" in text and "FLAGS" in text
    assert "Traceback" not in text
