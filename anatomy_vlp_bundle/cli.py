"""Command line: ``python -m anatomy_vlp_bundle <command>`` (python-fire).

Each command lives in the module that owns it; this file only wires names to functions so that
``--help`` lists every command a user runs.
"""

from __future__ import annotations

import sys

import fire


def _commands() -> dict:
    # Imported lazily so that `--help` and light commands do not pay for torch/transformers imports.
    from .bench import bench_command
    from .data.validate import validate_command
    from .inference.batch import export_command, infer_batch_command, infer_command
    from .prepare import prepare_command
    from .synthetic import synth_command
    from .text.reports import parse_report_command
    from .transfer.suite import transfer_command

    return {
        "validate": validate_command,
        "infer": infer_command,
        "infer-batch": infer_batch_command,
        "infer_batch": infer_batch_command,
        "export": export_command,
        "synth": synth_command,
        "parse-report": parse_report_command,
        "prepare": prepare_command,
        "transfer": transfer_command,
        "parse_report": parse_report_command,
        "bench": bench_command,
    }


def _help_to_fire(argv: list[str]) -> list[str]:
    """``--help`` / ``-h`` moved behind fire's ``--`` separator.

    A command taking ``**kwargs`` (``synth``, ``transfer``) would otherwise receive ``help=True``
    as one of its options and fail on it instead of printing its help."""
    if "--" in argv:
        head, tail = argv[: argv.index("--")], argv[argv.index("--") :]
    else:
        head, tail = argv, []
    if not any(a in ("--help", "-h") for a in head):
        return argv
    head = [a for a in head if a not in ("--help", "-h")]
    return head + (tail if tail else ["--"]) + ["--help"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    fire.Fire(_commands(), command=_help_to_fire(argv), name="anatomy_vlp_bundle")


if __name__ == "__main__":
    main()
