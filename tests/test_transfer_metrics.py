"""Known-answer tests of the transfer evaluations: Recall@K, BLEU-4, ROUGE-L, label F1, report generation."""

from __future__ import annotations

import math

import pytest
import torch

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.text.targets import SentenceTargets
from anatomy_vlp_bundle.transfer import (
    build_sentence_bank,
    corpus_bleu,
    embed_for_retrieval,
    generate_report,
    global_similarity,
    label_f1,
    recall_at_k,
    region_similarity,
    report_labels,
    retrieval_recalls,
    rouge_l,
    score_reports,
    tokenize,
)

CATALOG = load_catalog("synthetic_ct")
LIVER, SPLEEN = CATALOG.index("liver"), CATALOG.index("spleen")


class TableEncoder:
    """Frozen-encoder stand-in: each text's embedding is looked up in a table (unknown texts: a new one-hot)."""

    def __init__(self, table: dict[str, list[float]] | None = None, dim: int = 4):
        self.table = {k: torch.tensor(v, dtype=torch.float32) for k, v in (table or {}).items()}
        self.dim = dim
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        for t in texts:
            if t not in self.table:
                self.table[t] = torch.nn.functional.one_hot(torch.tensor(len(self.table) % self.dim), self.dim).float()
        return torch.stack([self.table[t] for t in texts])


# ----------------------------------------------------------------------------- recall
def test_recall_identity_is_one_and_shuffled_has_exact_values():
    assert recall_at_k(torch.eye(5), 1) == 1.0
    swapped = torch.eye(4)[[1, 0, 2, 3]]  # queries 0 and 1 score their own item 0, tied with two others
    assert recall_at_k(swapped, 1) == 0.5
    assert recall_at_k(swapped, 3) == 0.5  # ties count against the query: rank 3
    assert recall_at_k(swapped, 4) == 1.0
    rolled = torch.roll(torch.eye(4), 1, dims=1) + 0.5 * torch.eye(4)  # one item always ahead
    recalls = retrieval_recalls(rolled, ks=(1, 2))
    assert recalls == {"image_to_report": {"R@1": 0.0, "R@2": 1.0}, "report_to_image": {"R@1": 0.0, "R@2": 1.0}}


def test_recall_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N_query"):
        recall_at_k(torch.zeros(3, 2), 1)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(torch.eye(2), 0)


def test_region_and_global_similarity_follow_the_loss_paths():
    emb = torch.nn.functional.normalize(torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    valid = torch.ones(6, 3, dtype=torch.bool)
    valid[2, 1:] = False
    sim = region_similarity(emb, emb, valid)
    assert torch.allclose(sim.diagonal(), torch.ones(6))
    assert torch.isclose(sim[0, 2], (emb[0, 0] * emb[2, 0]).sum())  # report 2 describes anatomy 0 only
    assert retrieval_recalls(sim)["image_to_report"]["R@1"] == 1.0
    assert torch.allclose(global_similarity(emb[:, 0], emb[:, 0]).diagonal(), torch.ones(6))
    valid[4] = False
    with pytest.raises(ValueError, match=r"reports \[4\] describe no anatomy"):
        region_similarity(emb, emb, valid)


class StubModel(torch.nn.Module):
    """Returns the region embeddings stored for each image (image value = case index)."""

    def __init__(self, region_emb: torch.Tensor):
        super().__init__()
        self.region = region_emb

    def forward(self, image, anatomy=None, normal=None, regions="auto"):
        idx = image.flatten(1)[:, 0].long()
        m = self.region.shape[1]
        return {"region_emb": self.region[idx], "cls_emb": self.region[idx, 0],
                "zero_shot_logits": torch.zeros(len(idx), m, 2), "presence_logits": torch.zeros(len(idx), m)}

    def adapt_prompts(self, emb):
        return 2.0 * emb


def test_embed_for_retrieval_uses_frozen_sentence_embeddings_and_gives_perfect_recall():
    m = CATALOG.num_anatomies
    texts = [f"Finding number {i} of the liver." for i in range(4)]
    encoder = TableEncoder({t: torch.eye(4)[i].tolist() for i, t in enumerate(texts)})
    region = torch.zeros(4, m, 4)
    region[:, LIVER] = torch.eye(4)
    sentences = [[[texts[i]] if a == LIVER else [] for a in range(m)] for i in range(4)]
    batches = [
        {"image": torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1), "sentences": sentences[:2], "id": ["a", "b"]},
        {"image": torch.tensor([2.0, 3.0]).view(2, 1, 1, 1, 1), "sentences": sentences[2:], "id": ["c", "d"]},
    ]
    out = embed_for_retrieval(StubModel(region), batches, SentenceTargets(encoder, CATALOG, hard_negatives=0))
    assert out["id"] == ["a", "b", "c", "d"]
    assert out["sentence_valid"].sum().item() == 4 and out["sentence_valid"][:, LIVER].all()
    assert torch.equal(out["report_emb"], 2.0 * torch.eye(4))  # through adapt_prompts
    recalls = retrieval_recalls(region_similarity(out["region_emb"], out["sentence_emb"], out["sentence_valid"]))
    assert recalls["image_to_report"]["R@1"] == 1.0 and recalls["report_to_image"]["R@1"] == 1.0


# ----------------------------------------------------------------------------- text metrics
def test_tokenize_drops_case_and_punctuation_keeps_decimals():
    assert tokenize("The Liver: 2.5 cm, lesion.") == ["the", "liver", "2.5", "cm", "lesion"]


def test_bleu_and_rouge_identical_texts_score_one():
    texts = ["The liver contains a 2 cm hypodense lesion.", "The spleen is normal in size and appearance."]
    assert corpus_bleu(texts, texts) == pytest.approx(1.0)
    assert rouge_l(texts[0], texts[0]) == pytest.approx(1.0)


def test_bleu_and_rouge_hand_computed_pair():
    hyp, ref = "the liver is normal", "the liver is not normal"
    # precisions 4/4, 2/3, 1/2, (0 -> 0.1)/1; brevity exp(1 - 5/4)
    expected = math.exp(-0.25) * (1.0 * (2 / 3) * 0.5 * 0.1) ** 0.25
    assert corpus_bleu([hyp], [ref]) == pytest.approx(expected)
    assert corpus_bleu([hyp], [ref], epsilon=0.0) == 0.0
    # LCS 4: P = 1, R = 4/5 -> F1 = 8/9
    assert rouge_l(hyp, ref) == pytest.approx(8 / 9)
    assert rouge_l("", ref) == 0.0


# ----------------------------------------------------------------------------- label F1 and report scores
TRUTH = ["The liver contains a hypodense lesion. The spleen is normal.", "The liver is normal. Splenomegaly."]


def test_label_f1_identical_reports_is_one():
    scores = score_reports(TRUTH, TRUTH, CATALOG)
    assert scores["label_macro_f1"] == 1.0
    assert scores["bleu4"] == pytest.approx(1.0) and scores["rouge_l"] == pytest.approx(1.0)


def test_label_f1_one_flipped_finding_hand_computed():
    generated = [TRUTH[0], "The liver contains a hypodense lesion. Splenomegaly."]
    scores = score_reports(generated, TRUTH, CATALOG)
    pairs = scores["label_pairs"]
    # liver/hypodense lesion: TP (case 0) + FP (case 1) -> 2/3; spleen/splenomegaly: TN + TP -> 1
    assert pairs["liver/hypodense lesion"] == {"f1": pytest.approx(2 / 3), "tp": 1, "fp": 1, "fn": 0, "tn": 0}
    assert pairs["spleen/splenomegaly"]["f1"] == 1.0
    assert math.isnan(pairs["liver/steatosis"]["f1"])  # only negatives: no F1, left out of the mean
    assert scores["label_macro_f1"] == pytest.approx(5 / 6)


def test_label_f1_leaves_uncertain_truth_out_and_counts_missing_prediction_as_negative():
    truth = [{"liver": {"steatosis": 1, "hepatomegaly": -1}}]
    pred = [{"liver": {"hepatomegaly": 1}}]
    result = label_f1(pred, truth)
    assert set(result["pairs"]) == {"liver/steatosis"}
    assert result["pairs"]["liver/steatosis"]["fn"] == 1 and result["macro_f1"] == 0.0
    assert report_labels("Small amount of ascites.", CATALOG) == {"study": {"ascites": 1}}  # study findings scored too


# ----------------------------------------------------------------------------- report generation
RECORDS = [
    {"id": "t1", "anatomy_sentences": {"liver": ["The liver is normal."], "spleen": ["The spleen is normal."]}},
    {"id": "t2", "anatomy_sentences": {"liver": ["The liver contains a hypodense lesion."], "spleen": ["Splenomegaly."]}},
    {"id": "t3", "anatomy_sentences": {"liver": ["The liver is unremarkable.", "Hepatic steatosis.", "Possible hepatic steatosis.", "The liver is normal."]}},
]
E = torch.eye(4)
EMBEDDINGS = {
    "The liver is normal.": E[0], "The liver is unremarkable.": E[1], "The liver contains a hypodense lesion.": E[2],
    "Hepatic steatosis.": E[3], "The spleen is normal.": E[0], "Splenomegaly.": E[1],
}


def _bank():
    encoder = TableEncoder({k: v.tolist() for k, v in EMBEDDINGS.items()})
    return build_sentence_bank(RECORDS, CATALOG, encoder), encoder


def test_sentence_bank_dedups_drops_uncertain_and_encodes_once():
    bank, encoder = _bank()
    assert len(encoder.calls) == 1
    assert bank.entries["liver"].sentences == [
        "The liver is normal.", "The liver contains a hypodense lesion.", "The liver is unremarkable.", "Hepatic steatosis.",
    ]
    assert bank.entries["liver"].positives == [frozenset(), frozenset({"hypodense lesion"}), frozenset(), frozenset({"steatosis"})]
    assert set(bank.entries) == {"liver", "spleen"} and len(bank) == 6


def test_generate_report_picks_expected_sentences_in_catalog_order():
    bank, _ = _bank()
    m, f = CATALOG.num_anatomies, CATALOG.max_findings
    region = torch.zeros(m, 4)
    region[LIVER] = 0.9 * E[3] + 0.1 * E[2]
    region[SPLEEN] = E[1]  # closest to "Splenomegaly.", but splenomegaly is not called
    probs = torch.zeros(m, f)
    probs[LIVER, 0] = 0.9  # hypodense lesion
    probs[LIVER, 2] = 0.7  # steatosis
    probs[SPLEEN, 2] = 0.2  # splenomegaly below threshold
    thresholds = torch.full((m, f), 0.5)
    report = generate_report(region, probs, thresholds, bank, CATALOG)
    assert report == "Hepatic steatosis. The liver contains a hypodense lesion. The spleen is normal."

    probs[LIVER] = 0.0  # nothing called: the most similar normal sentence
    region[LIVER] = E[1] + 0.2 * E[0]
    present = torch.zeros(m, dtype=torch.bool)
    present[LIVER] = True
    assert generate_report(region, probs, thresholds, bank, CATALOG, present=present) == "The liver is unremarkable."

    probs[SPLEEN, 1] = 0.9  # spleen calcification called, but the bank has no such sentence
    assert generate_report(region, probs, thresholds, bank, CATALOG) == "The liver is unremarkable."
