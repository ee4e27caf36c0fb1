"""The bundle's benchmarks, as a script: the same as ``python -m anatomy_vlp_bundle bench``.

    .venv/bin/python scripts/bench.py                  # every group, writes docs/BENCHMARKS.md and docs/bench/
    .venv/bin/python scripts/bench.py --quick --out /tmp/BENCHMARKS.md --plots_dir /tmp/bench
    .venv/bin/python scripts/bench.py --only model,mfu --repeats 5

Run from the bundle root. See ``anatomy_vlp_bundle.bench`` for the groups and how they measure.
"""

from __future__ import annotations

import fire

from anatomy_vlp_bundle.bench import bench_command

if __name__ == "__main__":
    fire.Fire(bench_command)
