"""Text group: the frozen text encoder with a cold and with a warm embedding cache.

The sentences are the dataset's report sentences (``text.reports.split_sentences``), distinct, up
to :data:`SENTENCES`. Per timed round, on a fresh on-disk cache folder:

- cold: ``TextEncoder.encode`` with an empty cache (encoding, plus writing the cache shard);
- warm: the same texts again (in-memory hits);
- warm from disk: a new ``EmbeddingCache`` on that folder (what a new process or a resumed run
  sees: the shards are read) and the same texts.

Loading the model happens once, before the rounds, and is reported on its own.
"""

from __future__ import annotations

import time

from ..data.datalist import load_datalist
from ..text.encoder import EmbeddingCache, TextEncoder
from ..text.reports import split_sentences
from .context import BenchContext
from .report import Section, Table, fmt_ratio, fmt_seconds, timing_cells
from .timing import Timing, ratio

__all__ = ["run_text", "SENTENCES"]

#: distinct sentences encoded per round (quick / full)
SENTENCES = {True: 32, False: 1000}
PHASES = ("cold cache", "warm cache (in memory)", "warm cache (from disk)")


def report_sentences(dataset_dir: str, limit: int) -> list[str]:
    """Up to ``limit`` distinct report sentences of the dataset (all splits, in datalist order)."""
    datalist = load_datalist(dataset_dir)
    sentences: dict[str, None] = {}
    for split in ("training", "validation", "test"):
        for record in datalist.records(split, resolve=False):
            for sentence in split_sentences(record.get("report") or ""):
                sentences.setdefault(sentence)
                if len(sentences) >= limit:
                    return list(sentences)
    return list(sentences)


def run_text(ctx: BenchContext) -> Section:
    """Encoding time with a cold and a warm embedding cache."""
    texts = report_sentences(ctx.cfg.dataset_dir, SENTENCES[ctx.quick])
    encoder = TextEncoder(cache_dir=ctx.tmp / "text" / "load")
    start = time.perf_counter()
    encoder.load()
    load_seconds = time.perf_counter() - start
    for i in range(ctx.warmup):  # tokenizer and kernels warm, on a throwaway cache
        encoder.cache = EmbeddingCache(ctx.tmp / "text" / f"warmup{i}", encoder.encoder_id)
        encoder.encode(texts)
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for r in range(ctx.repeats):
        folder = ctx.tmp / "text" / f"round{r}"
        encoder.cache = EmbeddingCache(folder, encoder.encoder_id)
        for phase in PHASES:
            start = time.perf_counter()
            if phase == "warm cache (from disk)":
                encoder.cache = EmbeddingCache(folder, encoder.encoder_id)
            encoder.encode(texts)
            samples[phase].append(time.perf_counter() - start)
    t = {phase: Timing(tuple(s)) for phase, s in samples.items()}
    cold = t["cold cache"]
    rows = [[phase, *timing_cells(t[phase]), f"{len(texts) / t[phase].median:,.0f}",
             fmt_ratio(ratio(cold, t[phase])) if phase != "cold cache" else ""] for phase in PHASES]
    return Section(
        key="text",
        title="Text encoding",
        method=(
            f"`TextEncoder` ({encoder.model_name}, {encoder.device.type}, batch {encoder.batch_size}) encoding "
            f"{len(texts)} distinct report sentences of the dataset. Each round starts from an empty on-disk "
            "cache folder: cold (encode and write the shard), warm (the same texts again, in-memory hits), warm "
            "from disk (a new cache object reading the folder, as a new process would). Loading the model (once): "
            f"{fmt_seconds(load_seconds)}."
        ),
        tables=[Table(["cache", "median", "min - max", "sentences/s", "speed-up over cold"], rows)],
        values={"sentences": len(texts), "load_seconds": load_seconds, "timings": t},
    )
