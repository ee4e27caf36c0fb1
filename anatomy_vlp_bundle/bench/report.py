"""``docs/BENCHMARKS.md`` and its plots from the measured sections.

Each measurement group returns a :class:`Section`: how it measured (``method``), tables of the
measured values and their ratios, the issue's :class:`Target` rows it can judge, plots, and the raw
values (written to ``results.json`` beside the plots). :func:`write_report` puts the machine facts,
every target with its status and the sections into one Markdown file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .timing import Timing

__all__ = [
    "Table",
    "Target",
    "Section",
    "fmt_seconds",
    "fmt_bytes",
    "fmt_ratio",
    "fmt_percent",
    "timing_cells",
    "bar_chart",
    "scaling_chart",
    "write_report",
    "write_results",
]


@dataclass
class Table:
    """A Markdown table: ``headers`` and rows of already formatted cells."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""

    def markdown(self) -> str:
        lines = []
        if self.caption:
            lines += [self.caption, ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Target:
    """One target of the issue: ``reached`` is True / False when measured here, None when this run
    cannot judge it (a quick run, an input smaller than the target's, nothing to measure on the CPU)."""

    name: str
    goal: str
    measured: str
    reached: Optional[bool]

    @property
    def status(self) -> str:
        if self.reached is None:
            return "not evaluated"
        return "reached" if self.reached else "not reached"


@dataclass
class Section:
    """The result of one measurement group."""

    key: str
    title: str
    method: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


# --------------------------------------------------------------------------------------------- formatting
def fmt_seconds(seconds: float) -> str:
    """``0.0123`` -> ``"12.3 ms"``, ``2.5`` -> ``"2.50 s"``, ``-0.2`` -> ``"-200.0 ms"``."""
    if seconds < 0:
        return "-" + fmt_seconds(-seconds)
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    """Decimal units: ``1.5e9`` -> ``"1.50 GB"``, ``2.3e8`` -> ``"230 MB"``."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x" if math.isfinite(r) else "n/a"


def fmt_percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def timing_cells(t: Timing) -> list[str]:
    """``[median, "min - max"]`` of a timing."""
    return [fmt_seconds(t.median), f"{fmt_seconds(t.low)} - {fmt_seconds(t.high)}"]


# --------------------------------------------------------------------------------------------- plots
def bar_chart(path: Path, labels: Sequence[str], timings: Sequence[Timing], title: str) -> Path:
    """Horizontal bars of median times (seconds) with min-max whiskers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 0.5 * len(labels) + 1.5))
    ax = fig.subplots()
    medians = [t.median for t in timings]
    low = [t.median - t.low for t in timings]
    high = [t.high - t.median for t in timings]
    ax.barh(range(len(labels)), medians, xerr=[low, high], color="tab:blue", ecolor="black", capsize=3)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step (median, whiskers min-max)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def scaling_chart(path: Path, tokens: Sequence[int], timings: Sequence[Timing], memory: Sequence[float],
                  time_fit: tuple[float, float], memory_fit: Optional[tuple[float, float]]) -> Path:
    """Step time and step memory (bytes; empty: not measured) against the token count, log-log, with
    the fitted power laws."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_time, ax_mem = fig.subplots(1, 2)
    n = [float(v) for v in tokens]
    line = [min(n) * (max(n) / min(n)) ** (i / 50) for i in range(51)]
    ax_time.errorbar(n, [t.median for t in timings], yerr=[[t.median - t.low for t in timings], [t.high - t.median for t in timings]],
                     fmt="o", capsize=3, label="measured (median, min-max)")
    a, c = time_fit
    ax_time.plot(line, [c * v**a for v in line], "--", label=f"fit: time ~ N^{a:.2f}")
    ax_time.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="seconds per step", title="step time")
    ax_time.legend()
    if memory:
        ax_mem.plot(n, [m / 1e9 for m in memory], "o", label="measured (peak RSS growth of the step)")
        if memory_fit is not None:
            b, d = memory_fit
            ax_mem.plot(line, [d * v**b / 1e9 for v in line], "--", label=f"fit: memory ~ N^{b:.2f}")
            ax_mem.set(yscale="log")
        ax_mem.legend()
    else:
        ax_mem.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax_mem.transAxes)
    ax_mem.set(xscale="log", xlabel="tokens N", ylabel="GB", title="step memory")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------------------------- report
def write_report(path: str | Path, facts: Mapping[str, str], sections: Sequence[Section], settings: Mapping[str, Any]) -> Path:
    """Write the Markdown report.

    Args:
        path: the Markdown file (``docs/BENCHMARKS.md``).
        facts: machine facts (``machine.machine_facts``).
        sections: the groups' results, in order.
        settings: ``quick``, ``repeats``, ``warmup``, ``command`` of the run, and ``busy``: a warning
            about other load on the machine (``machine.busy_warning``), empty when idle.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = ["# Benchmarks", ""]
    out.append(f"Written by `{settings['command']}`. Every figure below was measured in that run.")
    out.append("")
    if settings["quick"]:
        out += [
            "> **Quick run**: tiny inputs and 1-2 repeats, to check the instrument end to end. The figures are "
            "not comparable with the targets; run the bench without `--quick` for those.",
            "",
        ]
    if settings.get("busy"):
        out += [f"> **Machine busy**: {settings['busy']}", ""]
    out += [
        f"Timings: {settings['warmup']} untimed warm-up round(s), then the median of {settings['repeats']} timed "
        "rounds (spread: min - max). Every comparison is measured in one process with its baseline interleaved "
        "(A, B, B, A, ...), so that a change of machine load hits both; other jobs on the machine still make "
        "the absolute times noisier than the ratios. Memory: peak resident set size (`ru_maxrss`), each "
        "configuration in a fresh process. Sizes in decimal units (1 GB = 10^9 bytes).",
        "",
        "## Machine",
        "",
        Table(["fact", "value"], [[k, v] for k, v in facts.items()]).markdown(),
        "",
        "## Targets",
        "",
    ]
    targets = [(s, t) for s in sections for t in s.targets]
    if targets:
        out.append(Table(["target", "goal", "measured", "status", "section"],
                         [[t.name, t.goal, t.measured, f"**{t.status}**", f"[{s.title}](#{_anchor(s.title)})"]
                          for s, t in targets]).markdown())
    else:
        out.append("No group that judges a target was run.")
    out.append("")
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.error:
            out += [f"**This group failed**: `{s.error}`", ""]
            continue
        out += [s.method, ""]
        for table in s.tables:
            out += [table.markdown(), ""]
        for note in s.notes:
            out += [note, ""]
        for plot in s.plots:
            rel = Path(os.path.relpath(plot, path.parent)).as_posix()
            out += [f"![{plot.stem}]({rel})", ""]
        out += [f"*Group `{s.key}` took {fmt_seconds(s.seconds)}.*", ""]
    path.write_text("\n".join(out))
    return path


def write_results(path: str | Path, facts: Mapping[str, str], sections: Sequence[Section], settings: Mapping[str, Any]) -> Path:
    """The raw measured values of every section as JSON (for comparing runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "settings": dict(settings),
        "machine": dict(facts),
        "sections": {
            s.key: {
                "values": s.values,
                "targets": [{"name": t.name, "goal": t.goal, "measured": t.measured, "status": t.status} for t in s.targets],
                "error": s.error,
            }
            for s in sections
        },
    }
    path.write_text(json.dumps(data, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")
