"""Command line: ``python -m anatomy_vlp_bundle <command>`` (python-fire).

Each command lives in the module that owns it; this file only wires names to functions so that
``--help`` lists every command a user runs.
"""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> None:
    fire.Fire(_commands(), command=argv, name="anatomy_vlp_bundle")


if __name__ == "__main__":
    main()
