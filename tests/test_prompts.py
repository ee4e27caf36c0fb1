"""Prompt templates (data file), rendered ensembles and the encoded prompt bank."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from anatomy_vlp_bundle.data.catalog import Catalog, load_catalog
from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT, UNKNOWN
from anatomy_vlp_bundle.losses import zero_shot_probs
from anatomy_vlp_bundle.text.prompts import (
    PromptBank,
    PromptTemplateError,
    build_prompt_texts,
    load_prompt_templates,
    render_prompt,
)

torch.set_num_threads(1)
DIM = 16


class StandInEncoder:
    """Maps each text to a deterministic random unit vector (the real encoder's interface)."""

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (2**63)
            rows.append(torch.randn(DIM, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(rows), dim=-1)


def small_catalog():
    return Catalog.from_dict(
        {
            "name": "tiny",
            "modality": "CT",
            "anatomies": [
                {"name": "liver", "labels": [1], "findings": ["hypodense lesion", "steatosis", "hepatomegaly"]},
                {"name": "lung", "labels": [2], "findings": ["nodule"]},
                {"name": "kidney", "labels": [3], "findings": ["nodule", "cyst"]},
            ],
            "study_findings": ["lymphadenopathy", "no finding"],
            "finding_synonyms": {"nodule": ["pulmonary nodule"]},
        }
    )


def test_packaged_templates_are_paired_and_complete():
    templates = load_prompt_templates()
    assert len(templates.anatomy_positive) >= 3 and len(templates.anatomy_positive) == len(templates.anatomy_negative)
    assert len(templates.study_positive) >= 2 and len(templates.study_positive) == len(templates.study_negative)
    for template in templates.anatomy_positive + templates.anatomy_negative:
        assert "{anatomy}" in template or "{Anatomy}" in template
    for template in templates.anatomy_negative + templates.study_negative:
        assert any(word in template.lower().split() for word in ("no", "not")), template
    for template in templates.anatomy_positive + templates.study_positive + templates.global_prompts:
        assert not any(word in template.lower().split() for word in ("no", "not")), template


def test_render_prompt_capitalises():
    assert render_prompt("{finding} in the {anatomy}.", "lung opacity", "right lung") == "Lung opacity in the right lung."
    assert render_prompt("{Finding}  of the {anatomy}.", "edema", "left lung") == "Edema of the left lung."
    assert render_prompt("The {anatomy} shows no {finding}.", "cyst", "kidney") == "The kidney shows no cyst."


def test_build_prompt_texts_shapes_and_content():
    catalog = small_catalog()
    texts = build_prompt_texts(catalog)
    assert texts.valid.shape == (3, catalog.max_findings) == (3, 3)
    assert texts.valid.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    for m, anatomy in enumerate(catalog.anatomies):
        for f, finding in enumerate(anatomy.findings):
            pos, neg = texts.positive[m][f], texts.negative[m][f]
            assert len(pos) == len(set(pos)) >= 3 and len(neg) >= 3
            assert not set(pos) & set(neg)
            assert all(finding in t.lower() and anatomy.name in t.lower() for t in pos + neg)
    # the same finding in two anatomies gets anatomy-specific prompts
    assert not set(texts.positive[1][0]) & set(texts.positive[2][0])
    # study findings: generic pairs, and the 'no finding' override keeps the right polarity
    assert texts.study_findings == ["lymphadenopathy", "no finding"]
    assert "Lymphadenopathy." in texts.study_positive[0] and "No lymphadenopathy." in texts.study_negative[0]
    assert "No acute abnormality." in texts.study_positive[1]
    assert not any("no no" in t.lower() for t in texts.study_negative[1] + texts.study_positive[1])
    # global findings: study findings first, then distinct anatomy findings
    assert texts.global_findings == ["lymphadenopathy", "no finding", "hypodense lesion", "steatosis", "hepatomegaly", "nodule", "cyst"]
    k_nodule = texts.global_findings.index("nodule")
    assert texts.global_membership[k_nodule].nonzero().tolist() == [[1, 0], [2, 0]]
    assert texts.global_study_index.tolist() == [0, 1, -1, -1, -1, -1, -1]


def test_synonyms_enrich_ensembles():
    catalog = small_catalog()
    plain = build_prompt_texts(catalog)
    rich = build_prompt_texts(catalog, use_synonyms=True)
    assert len(rich.positive[1][0]) == 2 * len(plain.positive[1][0])
    assert any("pulmonary nodule" in t for t in rich.positive[1][0])
    assert rich.positive[0][1] == plain.positive[0][1]  # no synonyms: unchanged


@pytest.mark.parametrize("name", ["ct_totalseg", "cxr_imagenome29"])
def test_builtin_catalogs_render(name):
    catalog = load_catalog(name)
    texts = build_prompt_texts(catalog)
    assert texts.valid.sum().item() == sum(len(a.findings) for a in catalog.anatomies)
    assert len(texts.study_positive) == len(catalog.study_findings)
    assert all(t[0].isupper() for t in texts.unique_texts())


def _write(tmp_path, data):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _valid_templates():
    return json.loads(json.dumps({
        "anatomy": {"positive": ["{finding} in the {anatomy}."], "negative": ["No {finding} in the {anatomy}."]},
        "study": {"positive": ["{Finding}."], "negative": ["No {finding}."]},
        "global": ["{Finding}."],
    }))


def test_bad_template_files_name_the_file(tmp_path):
    assert load_prompt_templates(_write(tmp_path, _valid_templates())).anatomy_positive == ("{finding} in the {anatomy}.",)

    data = _valid_templates()
    data["anatomy"]["negative"] = ["No {finding} in the {organ}."]
    with pytest.raises(PromptTemplateError, match=r"prompts\.json.*organ"):
        load_prompt_templates(_write(tmp_path, data))

    data = _valid_templates()
    data["anatomy"]["positive"] = ["{finding} is present."]
    with pytest.raises(PromptTemplateError, match=r"prompts\.json.*lacks \{anatomy\}"):
        load_prompt_templates(_write(tmp_path, data))

    data = _valid_templates()
    del data["study"]
    with pytest.raises(PromptTemplateError, match=r"prompts\.json.*'study'"):
        load_prompt_templates(_write(tmp_path, data))

    bad = tmp_path / "broken.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(PromptTemplateError, match=r"broken\.json.*not valid JSON"):
        load_prompt_templates(bad)
    with pytest.raises(PromptTemplateError, match="not found"):
        load_prompt_templates(tmp_path / "missing.json")


def test_prompt_bank_ensembles_and_state(tmp_path):
    catalog = small_catalog()
    encoder = StandInEncoder()
    bank = PromptBank.from_catalog(catalog, encoder)
    assert encoder.calls == 1  # every unique text encoded in one call
    m, f = 3, 3
    assert bank.pos.shape == bank.neg.shape == (m, f, DIM)
    assert bank.valid.shape == (m, f) and bank.valid.dtype == torch.bool
    assert bank.study_pos.shape == bank.study_neg.shape == (2, DIM)
    assert bank.global_emb.shape == (7, DIM)
    norms = bank.pos.norm(dim=-1)
    torch.testing.assert_close(norms[bank.valid], torch.ones(int(bank.valid.sum())))
    assert torch.all(norms[~bank.valid] == 0)
    # one ensemble by hand: mean of the unit text vectors, re-normalised
    texts = bank.texts.positive[0][1]
    expected = F.normalize(encoder.encode(texts).mean(0), dim=-1)
    torch.testing.assert_close(bank.pos[0, 1], expected)
    expected_neg = F.normalize(encoder.encode(bank.texts.study_negative[1]).mean(0), dim=-1)
    torch.testing.assert_close(bank.study_neg[1], expected_neg)

    # state: plain tensors that survive a weights_only round trip
    state = bank.to_state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save({"prompts." + k: v for k, v in state.items()}, tmp_path / "bank.pt")
    loaded = torch.load(tmp_path / "bank.pt", weights_only=True)
    again = PromptBank.from_state(loaded, prefix="prompts.")
    for key in PromptBank.STATE_KEYS:
        torch.testing.assert_close(getattr(again, key), getattr(bank, key))
    with pytest.raises(KeyError, match="neg"):
        PromptBank.from_state({k: v for k, v in state.items() if k != "neg"})

    # zero-shot against the bank: sample f's region m equals the positive ensemble of (m, f)
    region = bank.pos.permute(1, 0, 2).clone()  # (B=F, M, D)
    probs = zero_shot_probs(region, bank.pos, bank.neg, torch.tensor(20.0))  # (F, M, F)
    own = probs.diagonal(dim1=0, dim2=2)  # (M, F): sample f, anatomy m, finding f
    assert torch.all(own[bank.valid] > 0.5)


def test_prompt_bank_global_labels():
    bank = PromptBank.from_catalog(small_catalog(), StandInEncoder())
    findings = torch.full((1, 3, 3), UNKNOWN)
    findings[0, 1, 0] = PRESENT  # lung nodule
    findings[0, 0, :] = ABSENT  # liver: all three absent
    study = torch.tensor([[ABSENT, UNKNOWN]])
    labels = bank.global_labels(findings, study)
    names = bank.texts.global_findings
    got = dict(zip(names, labels[0].tolist()))
    assert got == {
        "lymphadenopathy": ABSENT,
        "no finding": UNKNOWN,
        "hypodense lesion": ABSENT,
        "steatosis": ABSENT,
        "hepatomegaly": ABSENT,
        "nodule": PRESENT,
        "cyst": UNKNOWN,
    }


def test_encoder_output_checked():
    with pytest.raises(ValueError, match="expected \\(N, D\\)"):
        PromptBank.from_catalog(small_catalog(), lambda texts: torch.zeros(len(texts) - 1, 4))


def test_prompt_bank_with_real_text_encoder():
    """Runs once ``text/encoder.py`` exists (written in parallel); skipped until then."""
    encoder_module = pytest.importorskip("anatomy_vlp_bundle.text.encoder")
    bank = PromptBank.from_catalog(small_catalog(), encoder_module.TextEncoder())
    assert bank.pos.shape == (3, 3, 384) and bank.study_pos.shape == (2, 384)
    torch.testing.assert_close(bank.pos.norm(dim=-1)[bank.valid], torch.ones(int(bank.valid.sum())))
    # positive and negative ensembles are different directions
    assert torch.all((bank.pos - bank.neg).norm(dim=-1)[bank.valid] > 1e-3)
