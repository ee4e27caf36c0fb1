"""Per-batch text targets for the fine-grained alignment loss.

For every (sample, anatomy) with report sentences, one positive text is chosen (training: one
random sentence of the anatomy, as Anatomy-VLM samples a sub-sentence of the region's findings;
evaluation: all of the anatomy's sentences joined) and encoded with the frozen text encoder
through its embedding cache, so a text is encoded once per run. Hard negatives are the positive
sentence negated and perturbed (``text.reports.negate_sentence`` / ``perturb_sentence``); they
are never positives.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..data.catalog import Catalog, load_catalog
from ..losses.contrastive import stable_text_id
from .reports import negate_sentence, perturb_sentence

__all__ = ["SentenceTargets"]


class SentenceTargets:
    """Turns a batch's ``sentences`` into embedding targets.

    Args:
        encoder: a ``text.encoder.TextEncoder`` (frozen; its cache makes repeated texts free).
        catalog: the dataset's catalog (for negation/perturbation).
        hard_negatives: number of hard-negative slots per (sample, anatomy): 0, 1 (negation) or 2
            (negation and perturbation).
        seed: seed of the sentence choice (training).
    """

    def __init__(self, encoder: Any, catalog: Catalog | str | dict, hard_negatives: int = 2, seed: int = 0):
        self.encoder = encoder
        self.catalog = load_catalog(catalog)
        self.hard_negatives = int(hard_negatives)
        if self.hard_negatives not in (0, 1, 2):
            raise ValueError(f"hard_negatives must be 0, 1 or 2, got {hard_negatives}")
        self.rng = np.random.default_rng(seed)
        self._negations: dict[str, tuple[str | None, ...]] = {}

    def _negatives(self, text: str) -> tuple[str | None, ...]:
        # Negation is deterministic and cached; perturbation is drawn once per text, so a text
        # always meets the same hard negatives (stable targets, and the cache stays small).
        if text not in self._negations:
            # seeded by a stable id of the text: Python's hash() is salted per process, which made two
            # runs of the same seed train on different hard negatives
            rng = np.random.default_rng(stable_text_id(text) % (2**32))
            self._negations[text] = (negate_sentence(text, self.catalog), perturb_sentence(text, self.catalog, rng))
        return self._negations[text][: self.hard_negatives]

    def choose(self, sentences: Sequence[Sequence[Sequence[str]]], training: bool) -> list[list[str | None]]:
        """The positive text per (sample, anatomy), ``None`` where the anatomy has no sentence."""
        out = []
        for per_anatomy in sentences:
            row = []
            for sents in per_anatomy:
                sents = [s for s in (sents or []) if s and s.strip()]
                if not sents:
                    row.append(None)
                elif training:
                    row.append(sents[int(self.rng.integers(len(sents)))])
                else:
                    row.append(" ".join(sents))
            out.append(row)
        return out

    def __call__(self, sentences: Sequence[Sequence[Sequence[str]]], training: bool = True) -> dict[str, Any]:
        """Targets for one batch.

        Args:
            sentences: per sample, M lists of sentences (the batch's ``sentences`` field).
            training: random sentence choice (True) or all sentences joined (False).

        Returns:
            ``sentence_emb`` (B, M, E) float, ``sentence_valid`` (B, M) bool, ``sentence_keys`` (B lists
            of M texts, ``""`` where none), and when ``hard_negatives`` > 0 ``hard_negative_emb``
            (B, M, K, E) and ``hard_negative_valid`` (B, M, K) bool.
        """
        chosen = self.choose(sentences, training)
        batch, num_anatomies = len(chosen), self.catalog.num_anatomies
        texts: list[str] = []
        for row in chosen:
            if len(row) != num_anatomies:
                raise ValueError(f"sentences has {len(row)} anatomies per sample, the catalog {num_anatomies}")
            texts += [t for t in row if t is not None]
            for t in row:
                if t is not None and self.hard_negatives:
                    texts += [n for n in self._negatives(t) if n is not None]
        unique = list(dict.fromkeys(texts))
        dim = self.encoder.dim
        table = dict(zip(unique, self.encoder.encode(unique))) if unique else {}
        emb = torch.zeros(batch, num_anatomies, dim)
        valid = torch.zeros(batch, num_anatomies, dtype=torch.bool)
        keys = [["" for _ in range(num_anatomies)] for _ in range(batch)]
        k = self.hard_negatives
        neg_emb = torch.zeros(batch, num_anatomies, max(k, 1), dim)
        neg_valid = torch.zeros(batch, num_anatomies, max(k, 1), dtype=torch.bool)
        for b, row in enumerate(chosen):
            for m, text in enumerate(row):
                if text is None:
                    continue
                emb[b, m], valid[b, m], keys[b][m] = table[text], True, text
                for j, neg in enumerate(self._negatives(text) if k else ()):
                    if neg is not None:
                        neg_emb[b, m, j], neg_valid[b, m, j] = table[neg], True
        out: dict[str, Any] = {"sentence_emb": emb, "sentence_valid": valid, "sentence_keys": keys}
        if k:
            out["hard_negative_emb"], out["hard_negative_valid"] = neg_emb, neg_valid
        return out

    def warm(self, all_sentences: Sequence[Sequence[Sequence[Sequence[str]]]] | Sequence[str]) -> int:
        """Encode every sentence (and its hard negatives) once, ahead of training; returns the count."""
        flat: list[str] = []

        def walk(x):
            if isinstance(x, str):
                flat.append(x)
            else:
                for y in x or ():
                    walk(y)

        walk(all_sentences)
        texts = list(dict.fromkeys(s for s in flat if s.strip()))
        if self.hard_negatives:
            texts += [n for t in texts for n in self._negatives(t) if n is not None]
        texts = list(dict.fromkeys(texts))
        if texts:
            self.encoder.encode(texts)
        return len(texts)
