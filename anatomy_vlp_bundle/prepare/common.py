"""What every dataset converter shares: resumable conversion, patient-level splits, the summary.

A converter lists its cases as :class:`SourceCase` (id, patient, the source's own split when it
has one, and whatever the converter needs to build the record) and gives a ``convert`` function
that turns one case into a contract record. :func:`run_prepare` does the rest:

- converts each case under a progress bar, appending the result to ``OUTPUT/.prepare_state.jsonl``
  as soon as it is done, so that a re-run (after a crash, or with more input) reuses finished cases
  instead of converting them again;
- turns :class:`SkipCase` (expected: no report, missing image) and any other exception of one case
  into a *skipped* case with its reason; nothing else is lost;
- assigns splits by patient: the source's split when it gives one, otherwise a stable hash of the
  patient id, so that a patient never straddles two splits and the assignment does not change when
  cases are added or the run is resumed;
- writes ``datalist.json`` (paths relative to the output folder), ``prepare_summary.json`` and
  prints the summary, then validates the datalist (headers).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..data.datalist import SPLITS, write_datalist

__all__ = [
    "SourceCase",
    "SkipCase",
    "PrepareSummary",
    "run_prepare",
    "relative_path",
    "hash_split",
    "assign_splits",
    "DEFAULT_FRACTIONS",
    "STATE_FILE",
    "SUMMARY_FILE",
]

#: Fractions of patients in training / validation / test when the source gives no split.
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
STATE_FILE = ".prepare_state.jsonl"
SUMMARY_FILE = "prepare_summary.json"
OPTIONS_FILE = ".prepare_options.json"
#: Order in which conflicting source splits of one patient are resolved (the most held-out wins).
_HELD_OUT_ORDER = ("test", "validation", "training")


class SkipCase(Exception):
    """Raised by a converter for a case that cannot be used; the message is the reason."""


@dataclass
class SourceCase:
    """One case as the source lists it.

    Attributes:
        id: the record id (unique within the dataset).
        patient: patient id (cases of one patient stay in one split); defaults to ``id``.
        split: the source's split (``training`` / ``validation`` / ``test``) or ``None`` to derive.
        data: anything the converter needs to build the record (paths, CSV rows, ...).
    """

    id: str
    patient: str | None = None
    split: str | None = None
    data: Any = None


@dataclass
class PrepareSummary:
    """What a prepare run did."""

    source: str
    output: str
    datalist: str | None = None
    written: int = 0
    reused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)
    moved_patients: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    validation_ok: bool | None = None
    validation_errors: int = 0

    @property
    def n_records(self) -> int:
        return self.written + self.reused

    def skip_reasons(self) -> dict[str, int]:
        """Reason -> number of cases skipped for it (the reason's text before any ': ' detail)."""
        return dict(Counter(_reason_kind(r) for _, r in self.skipped).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "datalist": self.datalist,
            "records": self.n_records,
            "converted_now": self.written,
            "reused_from_previous_run": self.reused,
            "splits": self.splits,
            "patients": self.patients,
            "skipped": len(self.skipped),
            "skip_reasons": self.skip_reasons(),
            "skipped_cases": [{"id": i, "reason": r} for i, r in self.skipped],
            "patients_moved_to_one_split": self.moved_patients,
            "notes": self.notes,
            "validation_ok": self.validation_ok,
            "validation_errors": self.validation_errors,
        }

    def format(self) -> str:
        splits = ", ".join(f"{s} {n} ({self.patients.get(s, 0)} patients)" for s, n in self.splits.items())
        lines = [
            f"prepare {self.source}: {self.n_records} cases written to {self.datalist} "
            f"({self.written} converted now, {self.reused} reused from a previous run); {splits or 'no records'}",
        ]
        if self.skipped:
            reasons = "; ".join(f"{r}: {n}" for r, n in self.skip_reasons().items())
            lines.append(f"skipped {len(self.skipped)} cases: {reasons}")
            for i, r in self.skipped[:20]:
                lines.append(f"  skipped {i}: {r}")
            if len(self.skipped) > 20:
                lines.append(f"  ... {len(self.skipped) - 20} more in {SUMMARY_FILE}")
        else:
            lines.append("skipped 0 cases")
        if self.moved_patients:
            lines.append(
                f"{len(self.moved_patients)} patients had cases in several source splits; all their cases "
                f"were put in the most held-out one: {', '.join(self.moved_patients[:10])}"
            )
        lines += self.notes
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(": ", 1)[0]


def relative_path(path: str | Path, output: str | Path) -> str:
    """``path`` relative to the output folder (the datalist's folder), as the contract wants.

    Falls back to the absolute path when no relative path exists (another drive on Windows).
    """
    path, output = Path(path).absolute(), Path(output).absolute()
    try:
        return Path(os.path.relpath(path, output)).as_posix()
    except ValueError:
        return path.as_posix()


def hash_split(patient: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> str:
    """A patient's split from a stable hash of its id: the same on every run and machine."""
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers (training, validation, test), got {fractions!r}")
    digest = hashlib.sha256(f"{int(seed)}:{patient}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64 * sum(fr)
    acc = 0.0
    for split, f in zip(SPLITS, fr):
        acc += f
        if u < acc:
            return split
    return SPLITS[-1]


def assign_splits(
    cases: Sequence[SourceCase],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    validation_from_training: float | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Split per case id, with every patient in exactly one split.

    - Patients with a source split keep it; a patient whose cases the source puts in different
      splits gets the most held-out of them for all its cases (listed in the second return value).
    - Patients without one get :func:`hash_split`.
    - ``validation_from_training``: a fraction of the source's *training* patients moved to
      validation by hash (for sources that publish only train and test, e.g. CT-RATE).

    Returns:
        ``(case id -> split, patients moved to one split)``.
    """
    by_patient: dict[str, list[SourceCase]] = {}
    for c in cases:
        by_patient.setdefault(c.patient or c.id, []).append(c)
    out: dict[str, str] = {}
    moved: list[str] = []
    for patient, pcs in by_patient.items():
        given = {c.split for c in pcs if c.split}
        bad = given - set(SPLITS)
        if bad:
            raise ValueError(f"case {pcs[0].id}: unknown split {sorted(bad)[0]!r}; splits are {SPLITS}")
        if not given:
            split = hash_split(patient, fractions, seed)
        else:
            split = next(s for s in _HELD_OUT_ORDER if s in given)
            if len(given) > 1:
                moved.append(patient)
            if split == "training" and validation_from_training:
                f = float(validation_from_training)
                split = hash_split(patient, (1.0 - f, f, 0.0), seed)
        for c in pcs:
            out[c.id] = split
    return out, moved


def _read_state(path: Path) -> dict[str, dict]:
    """Finished cases of a previous run: id -> {"record": ...}. A torn last line is ignored."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that case is converted again
            if isinstance(entry, dict) and "id" in entry and isinstance(entry.get("record"), dict):
                done[str(entry["id"])] = entry
    return done


def run_prepare(
    *,
    source: str,
    name: str,
    modality: str,
    catalog: str,
    output: str | Path,
    cases: Iterable[SourceCase],
    convert: Callable[[SourceCase, Path], dict],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    validation_from_training: float | None = None,
    validate: bool = True,
    progress: bool = True,
    force: bool = False,
    notes: Sequence[str] = (),
    late_notes: Callable[[], Iterable[str]] | None = None,
    options: Mapping[str, Any] | None = None,
) -> PrepareSummary:
    """Convert ``cases`` with ``convert`` into ``output/datalist.json`` (see the module docstring).

    Args:
        source: the source's name, for messages (``ctrate``, ``iu-xray``, ...).
        name, modality, catalog: the datalist's ``name``, ``modality`` and ``catalog`` (a built-in
            catalog name, or a path relative to ``output``).
        convert: ``convert(case, output) -> record``; the record needs no ``id``/``patient`` (they are
            filled in) and its paths must be relative to ``output`` (use :func:`relative_path`).
            Raise :class:`SkipCase` with the reason for a case that cannot be used.
        fractions: training / validation / test fractions of patients when the source has no split.
        validation_from_training: see :func:`assign_splits`.
        validate: validate the written datalist (headers) and record the verdict.
        force: ignore the state of a previous run and convert everything again.
        notes: extra lines for the summary (e.g. label columns that map to nothing).
        late_notes: called after the conversion for lines known only then (counts gathered while
            converting, e.g. label names that map to nothing); empty lines are dropped.
        options: the converter options that change what a record holds (e.g. ``fix_geometry``). They
            are stored beside the state; when a re-run's options differ, finished cases are
            converted again instead of being reused with the old options.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / STATE_FILE
    if force and state_path.exists():
        state_path.unlink()
    options_path = output / OPTIONS_FILE
    fingerprint = json.loads(json.dumps(dict(options or {}), sort_keys=True, default=str))
    summary_notes = list(notes)
    if state_path.exists() and options_path.exists():
        try:
            previous = json.loads(options_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != fingerprint:
            state_path.unlink()
            summary_notes.append(f"options differ from the previous run in {output} ({previous} -> {fingerprint}): every case converted again")
    options_path.write_text(json.dumps(fingerprint, sort_keys=True) + "\n", encoding="utf-8")
    done = _read_state(state_path)
    cases = list(cases)
    ids = Counter(c.id for c in cases)
    dups = sorted(i for i, n in ids.items() if n > 1)
    summary = PrepareSummary(source=source, output=str(output), notes=summary_notes)
    if dups:
        summary.notes.append(f"{len(dups)} ids occur more than once in the source; only the first of each is used: {', '.join(dups[:10])}")
        seen: set[str] = set()
        unique = []
        for c in cases:
            if c.id not in seen:
                seen.add(c.id)
                unique.append(c)
        cases = unique

    from tqdm.auto import tqdm

    records: dict[str, dict] = {}
    with state_path.open("a", encoding="utf-8") as state, tqdm(
        total=len(cases), desc=f"prepare {source}", unit="case", disable=not progress, file=sys.stderr
    ) as bar:
        for case in cases:
            if case.id in done:
                records[case.id] = done[case.id]["record"]
                summary.reused += 1
                bar.update(1)
                continue
            try:
                rec = convert(case, output)
            except SkipCase as e:
                summary.skipped.append((case.id, str(e)))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one bad case never stops the others
                summary.skipped.append((case.id, f"{type(e).__name__}: {e}"))
            else:
                rec = {"id": case.id, "patient": case.patient or case.id, **{k: v for k, v in rec.items() if k not in ("id", "patient")}}
                records[case.id] = rec
                state.write(json.dumps({"id": case.id, "record": rec}) + "\n")
                state.flush()
                summary.written += 1
            bar.update(1)

    if late_notes is not None:
        summary.notes += [n for n in late_notes() if n]
    kept = [c for c in cases if c.id in records]
    split_of, summary.moved_patients = assign_splits(kept, fractions, seed, validation_from_training)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    patients: dict[str, set] = {s: set() for s in SPLITS}
    for c in kept:
        s = split_of[c.id]
        splits[s].append(records[c.id])
        patients[s].add(c.patient or c.id)
    summary.splits = {s: len(v) for s, v in splits.items()}
    summary.patients = {s: len(v) for s, v in patients.items()}
    if not kept:
        summary.notes.append("no case could be converted: no datalist written")
    else:
        summary.datalist = str(write_datalist(output / "datalist.json", name=name, modality=modality, catalog=catalog,
                                              splits={s: v for s, v in splits.items() if v}))
        if validate:
            from ..data.validate import validate_datalist

            report = validate_datalist(summary.datalist)
            summary.validation_ok = report.ok
            summary.validation_errors = len(report.errors)
            for p in report.errors[:20]:
                summary.notes.append(p.format())
            summary.notes.append("validate: " + report.summary().splitlines()[-1])
    (output / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=1) + "\n", encoding="utf-8")
    return summary
