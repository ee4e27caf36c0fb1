"""Prompt-template ensembles (data in ``prompts.json``) and the encoded prompt bank.

Zero-shot diagnosis compares a region embedding with an *ensemble* of positive prompts
("There is {finding} in the {anatomy}.") against an ensemble of negative ones ("No {finding} in
the {anatomy}."): single prompt pairs are known to flip polarity (CheXzero's "No Finding").

- :func:`load_prompt_templates` reads the templates (the single source of truth: ``prompts.json``
  next to this file, or a user file of the same form).
- :func:`build_prompt_texts` renders them for a catalog: per (anatomy, finding) positive and
  negative texts, study-level pairs, global [CLS] prompts, the ``(M, F)`` valid mask.
- :class:`PromptBank` encodes them with a text encoder (``encoder.encode(list[str]) -> (N, D)``)
  and averages each ensemble, then L2-normalises it. ``to_state()`` gives plain tensors that the
  model registers as persistent buffers, so a checkpoint carries its prompts.

Finding synonyms (``catalog.phrasings(finding)``) can enrich each ensemble
(``use_synonyms=True``: every template rendered with every phrasing). It is off by default
because catalog synonyms serve report parsing and include fragments that make poor prompts
("elevated", "blunting", "heart is enlarged").
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from ..data.catalog import Catalog
from ..data.labels import UNKNOWN
from ..losses.alignment import global_finding_labels

__all__ = [
    "PromptTemplateError",
    "PromptTemplates",
    "PromptTexts",
    "PromptBank",
    "load_prompt_templates",
    "render_prompt",
    "build_prompt_texts",
]

PLACEHOLDERS = frozenset({"finding", "Finding", "anatomy", "Anatomy"})
SECTIONS = ("anatomy", "study", "global")


class PromptTemplateError(ValueError):
    """A prompt-template file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class PromptTemplates:
    """Template ensembles; see ``prompts.json``.

    Attributes:
        anatomy_positive / anatomy_negative: templates with ``{finding}`` and ``{anatomy}``.
        study_positive / study_negative: templates with ``{finding}`` (findings no anatomy owns).
        global_prompts: [CLS] prompts with ``{finding}`` (positive only).
        overrides: finding name -> ``{"anatomy"|"study": {"positive": [...], "negative": [...]},
            "global": [...]}`` replacing the templates for that finding (literal texts allowed).
        source: where the templates were read from.
    """

    anatomy_positive: tuple[str, ...]
    anatomy_negative: tuple[str, ...]
    study_positive: tuple[str, ...]
    study_negative: tuple[str, ...]
    global_prompts: tuple[str, ...]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> "PromptTemplates":
        where = source or "<prompt templates>"
        if not isinstance(data, Mapping):
            raise PromptTemplateError(f"{where}: must be a JSON object, got {type(data).__name__}")

        def template_list(value: Any, what: str, required: Sequence[str]) -> tuple[str, ...]:
            if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
                raise PromptTemplateError(f"{where}: '{what}' must be a non-empty list of non-empty strings")
            for template in value:
                try:
                    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
                except ValueError as e:
                    raise PromptTemplateError(f"{where}: '{what}': template {template!r} is malformed ({e})") from None
                unknown = fields - PLACEHOLDERS
                if unknown:
                    raise PromptTemplateError(
                        f"{where}: '{what}': template {template!r} uses unknown placeholder(s) {sorted(unknown)}; "
                        f"allowed: {sorted(PLACEHOLDERS)}"
                    )
                for need in required:
                    if not fields & {need, need.capitalize()}:
                        raise PromptTemplateError(f"{where}: '{what}': template {template!r} lacks {{{need}}}")
            return tuple(value)

        def pair(section: str, required: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
            block = data.get(section)
            if not isinstance(block, Mapping):
                raise PromptTemplateError(f"{where}: missing object '{section}' with 'positive' and 'negative' lists")
            return (
                template_list(block.get("positive"), f"{section}.positive", required),
                template_list(block.get("negative"), f"{section}.negative", required),
            )

        anatomy_pos, anatomy_neg = pair("anatomy", ("finding", "anatomy"))
        study_pos, study_neg = pair("study", ("finding",))
        global_prompts = template_list(data.get("global"), "global", ("finding",))

        overrides: dict[str, dict[str, Any]] = {}
        raw_overrides = data.get("overrides") or {}
        if not isinstance(raw_overrides, Mapping):
            raise PromptTemplateError(f"{where}: 'overrides' must be an object (finding -> sections)")
        for finding, block in raw_overrides.items():
            if not isinstance(block, Mapping) or not set(block) <= set(SECTIONS) or not block:
                raise PromptTemplateError(f"{where}: overrides[{finding!r}] must be an object with keys among {SECTIONS}")
            parsed: dict[str, Any] = {}
            for section, value in block.items():
                what = f"overrides[{finding!r}].{section}"
                if section == "global":
                    parsed[section] = template_list(value, what, ())
                else:
                    if not isinstance(value, Mapping):
                        raise PromptTemplateError(f"{where}: {what} must have 'positive' and 'negative' lists")
                    parsed[section] = (
                        template_list(value.get("positive"), f"{what}.positive", ()),
                        template_list(value.get("negative"), f"{what}.negative", ()),
                    )
            overrides[str(finding)] = parsed
        return cls(anatomy_pos, anatomy_neg, study_pos, study_neg, global_prompts, overrides, source)

    def anatomy_pair(self, finding: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(positive, negative) anatomy templates for ``finding`` (its override if any)."""
        return self.overrides.get(finding, {}).get("anatomy", (self.anatomy_positive, self.anatomy_negative))

    def study_pair(self, finding: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.overrides.get(finding, {}).get("study", (self.study_positive, self.study_negative))

    def global_for(self, finding: str) -> tuple[str, ...]:
        return self.overrides.get(finding, {}).get("global", self.global_prompts)


def load_prompt_templates(path: Union[str, Path, None] = None) -> PromptTemplates:
    """Read prompt templates: the packaged ``prompts.json`` when ``path`` is ``None``."""
    if path is None:
        res = resources.files("anatomy_vlp_bundle") / "text" / "prompts.json"
        source = "builtin:text/prompts.json"
        text = res.read_text(encoding="utf-8")
    else:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PromptTemplateError(f"{path}: prompt template file not found") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptTemplateError(f"{source}: not valid JSON ({e})") from None
    return PromptTemplates.from_dict(data, source=source)


def render_prompt(template: str, finding: str, anatomy: str = "") -> str:
    """Fill one template; the result starts with a capital letter and has single spaces."""
    text = template.format(
        finding=finding,
        Finding=finding[:1].upper() + finding[1:],
        anatomy=anatomy,
        Anatomy=anatomy[:1].upper() + anatomy[1:],
    )
    text = " ".join(text.split())
    return text[:1].upper() + text[1:]


def _render_all(templates: Sequence[str], phrasings: Sequence[str], anatomy: str = "") -> list[str]:
    # dict.fromkeys: drop duplicates (literal override texts, synonyms equal after rendering), keep order
    return list(dict.fromkeys(render_prompt(t, p, anatomy) for t in templates for p in phrasings))


@dataclass
class PromptTexts:
    """Rendered prompt texts for one catalog.

    Attributes:
        anatomy_names: ``M`` anatomy names (query order).
        findings: per anatomy, its finding names (``F_m <= F``).
        positive / negative: ``[m][f]`` -> list of prompt texts of that ensemble.
        valid: ``(M, F)`` bool, ``F = catalog.max_findings``; False where ``f >= F_m`` (padding).
        study_findings: ``S`` study finding names.
        study_positive / study_negative: ``[s]`` -> list of prompt texts.
        global_findings: ``K`` [CLS] finding names: the study findings, then every anatomy finding
            name not already listed (catalog order).
        global_texts: ``[k]`` -> list of prompt texts.
        global_membership: ``(K, M, F)`` bool, which (anatomy, finding) entries global finding ``k`` covers.
        global_study_index: ``(K,)`` long, the study finding of global finding ``k`` or -1.
    """

    anatomy_names: list[str]
    findings: list[list[str]]
    positive: list[list[list[str]]]
    negative: list[list[list[str]]]
    valid: torch.Tensor
    study_findings: list[str]
    study_positive: list[list[str]]
    study_negative: list[list[str]]
    global_findings: list[str]
    global_texts: list[list[str]]
    global_membership: torch.Tensor
    global_study_index: torch.Tensor

    def unique_texts(self) -> list[str]:
        """Every text once (the order is stable), for one encoder call."""
        texts: list[str] = []
        for per_anatomy in (self.positive, self.negative):
            for ensembles in per_anatomy:
                for ensemble in ensembles:
                    texts.extend(ensemble)
        for ensembles in (self.study_positive, self.study_negative, self.global_texts):
            for ensemble in ensembles:
                texts.extend(ensemble)
        return list(dict.fromkeys(texts))


def build_prompt_texts(
    catalog: Catalog, templates: PromptTemplates | None = None, use_synonyms: bool = False
) -> PromptTexts:
    """Render the prompt ensembles of every (anatomy, finding), study finding and global finding.

    Args:
        catalog: the anatomy catalog (anatomy order = query order).
        templates: templates to use (default: the packaged ``prompts.json``).
        use_synonyms: render every template with each of ``catalog.phrasings(finding)`` as well
            (see the module docstring for why it is off by default).
    """
    templates = templates or load_prompt_templates()
    num_anatomies, width = catalog.num_anatomies, catalog.max_findings

    def phrasings(finding: str) -> tuple[str, ...]:
        return catalog.phrasings(finding) if use_synonyms else (finding,)

    valid = torch.zeros((num_anatomies, width), dtype=torch.bool)
    findings, positive, negative = [], [], []
    for m, anatomy in enumerate(catalog.anatomies):
        findings.append(list(anatomy.findings))
        pos_m, neg_m = [], []
        for f, finding in enumerate(anatomy.findings):
            pos_t, neg_t = templates.anatomy_pair(finding)
            pos_m.append(_render_all(pos_t, phrasings(finding), anatomy.name))
            neg_m.append(_render_all(neg_t, phrasings(finding), anatomy.name))
            valid[m, f] = True
        positive.append(pos_m)
        negative.append(neg_m)

    study_findings = list(catalog.study_findings)
    study_positive = [_render_all(templates.study_pair(s)[0], phrasings(s)) for s in study_findings]
    study_negative = [_render_all(templates.study_pair(s)[1], phrasings(s)) for s in study_findings]

    global_findings = list(study_findings)
    for anatomy in catalog.anatomies:
        for finding in anatomy.findings:
            if finding not in global_findings:
                global_findings.append(finding)
    membership = torch.zeros((len(global_findings), num_anatomies, width), dtype=torch.bool)
    study_index = torch.full((len(global_findings),), -1, dtype=torch.long)
    row_of = {name: k for k, name in enumerate(global_findings)}
    for s, name in enumerate(study_findings):
        study_index[row_of[name]] = s
    for m, anatomy in enumerate(catalog.anatomies):
        for f, finding in enumerate(anatomy.findings):
            membership[row_of[finding], m, f] = True
    global_texts = [_render_all(templates.global_for(g), phrasings(g)) for g in global_findings]

    return PromptTexts(
        anatomy_names=catalog.names,
        findings=findings,
        positive=positive,
        negative=negative,
        valid=valid,
        study_findings=study_findings,
        study_positive=study_positive,
        study_negative=study_negative,
        global_findings=global_findings,
        global_texts=global_texts,
        global_membership=membership,
        global_study_index=study_index,
    )


# --------------------------------------------------------------------------- encoded bank
TextEncoderLike = Union[Callable[[list], torch.Tensor], Any]


def _encode(encoder: TextEncoderLike, texts: list[str]) -> torch.Tensor:
    encode = getattr(encoder, "encode", None) or encoder
    if not callable(encode):
        raise TypeError(f"encoder must have .encode(list[str]) or be callable, got {type(encoder).__name__}")
    emb = torch.as_tensor(encode(list(texts))).detach().float().cpu()
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"encoder returned shape {tuple(emb.shape)} for {len(texts)} texts; expected (N, D)")
    return F.normalize(emb, dim=-1)


def _ensemble(table: dict[str, int], emb: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    # average of unit vectors, re-normalised: each phrasing counts equally, the result is a direction
    return F.normalize(emb[[table[t] for t in texts]].mean(dim=0), dim=-1)


@dataclass
class PromptBank:
    """Encoded prompt ensembles (each averaged over its texts, then L2-normalised).

    Attributes:
        pos: ``(M, F, D)`` positive ensembles; zero where ``valid`` is False.
        neg: ``(M, F, D)`` negative ensembles.
        valid: ``(M, F)`` bool.
        study_pos / study_neg: ``(S, D)``.
        global_emb: ``(K, D)`` [CLS] prompt ensembles (``global_findings`` order of :class:`PromptTexts`).
        global_membership: ``(K, M, F)`` bool; global_study_index: ``(K,)`` long (see
            :meth:`global_labels`).
        texts: the rendered texts (``None`` after :meth:`from_state`).

    Zero-shot use: ``zero_shot_probs(region_emb, bank.pos, bank.neg, scale)`` for anatomies and
    ``zero_shot_probs(cls_emb[:, None], bank.study_pos[None], bank.study_neg[None], scale)`` for the
    study findings.
    """

    pos: torch.Tensor
    neg: torch.Tensor
    valid: torch.Tensor
    study_pos: torch.Tensor
    study_neg: torch.Tensor
    global_emb: torch.Tensor
    global_membership: torch.Tensor
    global_study_index: torch.Tensor
    texts: PromptTexts | None = None

    STATE_KEYS = (
        "pos",
        "neg",
        "valid",
        "study_pos",
        "study_neg",
        "global_emb",
        "global_membership",
        "global_study_index",
    )

    @classmethod
    def from_texts(cls, texts: PromptTexts, encoder: TextEncoderLike) -> "PromptBank":
        """Encode every unique text once and build the ensembles."""
        unique = texts.unique_texts()
        emb = _encode(encoder, unique)
        table = {t: i for i, t in enumerate(unique)}
        num_anatomies, width = texts.valid.shape
        dim = emb.shape[1]
        pos = torch.zeros((num_anatomies, width, dim))
        neg = torch.zeros((num_anatomies, width, dim))
        for m in range(num_anatomies):
            for f in range(len(texts.findings[m])):
                pos[m, f] = _ensemble(table, emb, texts.positive[m][f])
                neg[m, f] = _ensemble(table, emb, texts.negative[m][f])

        def stack(ensembles: list[list[str]]) -> torch.Tensor:
            if not ensembles:
                return torch.zeros((0, dim))
            return torch.stack([_ensemble(table, emb, e) for e in ensembles])

        return cls(
            pos=pos,
            neg=neg,
            valid=texts.valid.clone(),
            study_pos=stack(texts.study_positive),
            study_neg=stack(texts.study_negative),
            global_emb=stack(texts.global_texts),
            global_membership=texts.global_membership.clone(),
            global_study_index=texts.global_study_index.clone(),
            texts=texts,
        )

    @classmethod
    def from_catalog(
        cls,
        catalog: Catalog,
        encoder: TextEncoderLike,
        templates: PromptTemplates | None = None,
        use_synonyms: bool = False,
    ) -> "PromptBank":
        """Render (:func:`build_prompt_texts`) and encode the prompts of ``catalog``.

        Args:
            catalog: anatomy catalog.
            encoder: ``TextEncoder`` (``.encode(list[str]) -> (N, D)``) or a callable of that form.
            templates: default the packaged ``prompts.json``.
            use_synonyms: enrich ensembles with ``catalog.phrasings(finding)``.
        """
        return cls.from_texts(build_prompt_texts(catalog, templates, use_synonyms), encoder)

    @property
    def embedding_dim(self) -> int:
        return int(self.pos.shape[-1])

    def to_state(self) -> dict[str, torch.Tensor]:
        """Plain tensors (for persistent buffers / ``torch.load(weights_only=True)``)."""
        return {key: getattr(self, key).clone() for key in self.STATE_KEYS}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> "PromptBank":
        """Inverse of :meth:`to_state`; ``prefix`` selects keys of a larger state dict (``"prompts."``)."""
        missing = [prefix + k for k in cls.STATE_KEYS if prefix + k not in state]
        if missing:
            raise KeyError(f"PromptBank.from_state: missing {missing}")
        values = {k: state[prefix + k] for k in cls.STATE_KEYS}
        values["valid"] = values["valid"].bool()
        values["global_membership"] = values["global_membership"].bool()
        values["global_study_index"] = values["global_study_index"].long()
        return cls(**values)

    def to(self, device: Union[str, torch.device]) -> "PromptBank":
        return PromptBank(**{k: getattr(self, k).to(device) for k in self.STATE_KEYS}, texts=self.texts)

    def global_labels(self, findings: torch.Tensor, study_findings: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` labels of the global findings from ``findings`` (B, M, F) and ``study_findings`` (B, S)."""
        if study_findings.ndim != 2:
            raise ValueError(f"study_findings must be (B, S), got {tuple(study_findings.shape)}")
        if study_findings.shape[1] == 0:
            study_findings = torch.full((findings.shape[0], 0), UNKNOWN, dtype=torch.long, device=findings.device)
        return global_finding_labels(findings, study_findings, self.global_membership, self.global_study_index)
