"""Report parsing (sentences, anatomies, negation, uncertainty, normal statements), label merging,
the ParseReportd transform, the CLI, hard-negative generation and the synthetic report writer."""

import json

import numpy as np
import pytest
import torch

from anatomy_vlp_bundle.data.catalog import builtin_catalogs, load_catalog
from anatomy_vlp_bundle.data.labels import ABSENT, PRESENT, UNCERTAIN, UNKNOWN
from anatomy_vlp_bundle.synthetic.report_writer import WRITER_STATS, write_report
from anatomy_vlp_bundle.text.reports import (
    ParseReportd,
    get_parser,
    merge_labels,
    merge_sentences,
    negate_sentence,
    parse_anatomy_sentences,
    parse_report,
    parse_report_command,
    perturb_sentence,
    split_sentences,
)

CT = "ct_totalseg"
CXR = "cxr_imagenome29"


def findings_of(text, catalog=CT):
    return parse_report(text, catalog).findings()


def study_of(text, catalog=CT):
    return parse_report(text, catalog).study_findings


# ----------------------------------------------------------------------------- sentences
def test_split_sentences_headers_numbers_abbreviations_lists():
    text = (
        "EXAMINATION: CT chest with contrast.\n"
        "INDICATION: Evaluate for pneumonia.\n"
        "COMPARISON: None.\n\n"
        "FINDINGS: The liver contains a 2.5 x 1.8 cm hypodense lesion. Findings were discussed with Dr. Smith,\n"
        "e.g. by phone, at 10.30 am. The spleen is normal.\n"
        "Liver: steatosis\n"
        "Spleen: unremarkable\n\n"
        "IMPRESSION:\n1. Hepatic lesion.\n2) No ascites.\n- Mild emphysema."
    )
    assert split_sentences(text) == [
        "The liver contains a 2.5 x 1.8 cm hypodense lesion.",
        "Findings were discussed with Dr. Smith, e.g. by phone, at 10.30 am.",
        "The spleen is normal.",
        "Liver: steatosis",
        "Spleen: unremarkable",
        "Hepatic lesion.",
        "No ascites.",
        "Mild emphysema.",
    ]


def test_split_sentences_wrapped_lines_and_inline_lists():
    text = "FINDINGS: There is no focal consolidation, pleural effusion or\npneumothorax. A nodule measuring\n12 mm is seen in the right\nlower lobe.\nIMPRESSION: 1. No acute cardiopulmonary process. 2. Right lower lobe nodule."
    assert split_sentences(text) == [
        "There is no focal consolidation, pleural effusion or pneumothorax.",
        "A nodule measuring 12 mm is seen in the right lower lobe.",
        "No acute cardiopulmonary process.",
        "Right lower lobe nodule.",
    ]
    assert split_sentences("") == [] and split_sentences("   \n") == []


def test_dropped_sections_do_not_give_labels():
    # the indication names pneumonia and the history an effusion: neither was seen
    f = findings_of("INDICATION: Rule out pneumonia.\nHISTORY: Known pleural effusion.\nFINDINGS: The heart is enlarged.", CXR)
    assert f == {"cardiac silhouette": {"cardiomegaly": PRESENT}}


# ----------------------------------------------------------------------------- anatomies
def test_longest_anatomy_match_wins_and_plurals():
    f = findings_of("Opacity in the right lower lobe.", CXR)
    assert f == {"right lower lung zone": {"lung opacity": PRESENT}}
    f = findings_of("There is a nodule in the right upper lung zone.", CXR)
    assert f == {"right upper lung zone": {"nodule": PRESENT}}
    f = findings_of("Both kidneys contain simple cysts.")
    assert f == {"right kidney": {"renal cyst": PRESENT}, "left kidney": {"renal cyst": PRESENT}}


def test_bilateral_cues_apply_to_both_sides():
    f = findings_of("Small bilateral pleural effusions.", CXR)
    assert f == {"right lung": {"pleural effusion": PRESENT}, "left lung": {"pleural effusion": PRESENT}}
    f = findings_of("Bibasilar atelectasis.", CXR)
    assert f == {"right lower lung zone": {"atelectasis": PRESENT}, "left lower lung zone": {"atelectasis": PRESENT}}
    f = findings_of("Bilateral renal stones.")
    assert set(f) == {"right kidney", "left kidney"}
    # a side-less singular form without a bilateral cue names no anatomy
    assert findings_of("The costophrenic angle is blunted.", CXR) == {}


def test_sentence_about_several_anatomies_is_split_by_anatomy():
    parsed = parse_report("Nodule in the right lung and effusion in the left lung.", CXR)
    assert parsed.findings() == {"right lung": {"nodule": PRESENT}, "left lung": {"pleural effusion": PRESENT}}
    assert parsed.sentences() == {
        "right lung": ["Nodule in the right lung and effusion in the left lung."],
        "left lung": ["Nodule in the right lung and effusion in the left lung."],
    }
    f = findings_of("Right lower lobe opacity with a small left pleural effusion.", CXR)
    assert f == {"right lower lung zone": {"lung opacity": PRESENT}, "left lung": {"pleural effusion": PRESENT}}
    f = findings_of("The liver is normal and the spleen shows a hypodense lesion.")
    assert f["spleen"]["hypodense lesion"] == PRESENT and f["liver"]["hypodense lesion"] == ABSENT


def test_finding_only_for_anatomies_that_own_it():
    # the thyroid owns "thyroid nodule", not the lung's "nodule": the nodule is the thyroid's
    assert findings_of("There is a nodule in the thyroid gland.") == {"thyroid gland": {"thyroid nodule": PRESENT}}
    # the kidney owns no nodule: nothing is claimed, least of all for the lung
    assert findings_of("Small nodule in the right kidney.") == {}
    assert findings_of("Aortic calcification.") == {"aorta": {"arterial wall calcification": PRESENT}}
    # findings no anatomy owns are study findings
    assert study_of("Mediastinal lymphadenopathy. Small amount of ascites.") == {"lymphadenopathy": PRESENT, "ascites": PRESENT}


def test_finding_without_anatomy_goes_to_its_owners():
    assert findings_of("Cardiomegaly.", CXR) == {"cardiac silhouette": {"cardiomegaly": PRESENT}}
    f = findings_of("No pneumothorax.", CXR)
    owners = {a.name for a in load_catalog(CXR).anatomies if "pneumothorax" in a.findings}
    assert set(f) == owners and all(v == {"pneumothorax": ABSENT} for v in f.values())
    # present with several possible owners: unknown, not guessed
    assert findings_of("Mild pulmonary edema.", CXR) == {}
    # "No pericardial effusion or emphysema": the heart is only the first finding's anatomy
    f = findings_of("No pericardial effusion or emphysema.")
    assert f == {"lung": {"emphysema": ABSENT}, "heart": {"pericardial effusion": ABSENT}}


# ----------------------------------------------------------------------------- polarity
@pytest.mark.parametrize(
    "sentence, value",
    [
        ("There is a hypodense lesion in the liver.", PRESENT),
        ("No hypodense lesion in the liver.", ABSENT),
        ("The liver shows no hypodense lesion.", ABSENT),
        ("The liver is without hypodense lesion.", ABSENT),
        ("The liver is free of hypodense lesion.", ABSENT),
        ("The liver is negative for hypodense lesion.", ABSENT),
        ("No evidence of hypodense lesion in the liver.", ABSENT),
        ("Absence of hypodense lesion in the liver.", ABSENT),
        ("Hypodense lesion in the liver is not seen.", ABSENT),
        ("The previously seen hypodense lesion in the liver has resolved.", ABSENT),
        ("Resolved hypodense lesion of the liver.", ABSENT),
        ("No definite hypodense lesion in the liver.", ABSENT),
        ("Hypodense lesion in the liver cannot be excluded.", UNCERTAIN),
        ("Cannot exclude a hypodense lesion in the liver.", UNCERTAIN),
        ("The liver shows a focus which may represent a hypodense lesion.", UNCERTAIN),
        ("Possible hypodense lesion in the liver.", UNCERTAIN),
        ("Questionable hypodense lesion in the liver.", UNCERTAIN),
        ("Findings suggestive of hypodense lesion in the liver.", UNCERTAIN),
        ("Likely hypodense lesion in the liver.", UNCERTAIN),  # decision: "likely" is uncertain
        ("No change in the hypodense lesion of the liver.", PRESENT),  # pseudo-negation
        ("Findings consistent with hypodense lesion in the liver.", PRESENT),
    ],
)
def test_negation_and_uncertainty(sentence, value):
    assert findings_of(sentence)["liver"]["hypodense lesion"] == value


def test_negation_scope():
    f = findings_of("No pleural effusion or pneumothorax.", CXR)
    assert f["right lung"] == {"pleural effusion": ABSENT, "pneumothorax": ABSENT}
    f = findings_of("Gallstones without gallbladder wall thickening.")
    assert f == {"gallbladder": {"gallstone": PRESENT, "gallbladder wall thickening": ABSENT}}
    f = findings_of("There is consolidation in the left lower lobe but no pleural effusion.", CXR)
    assert f == {"left lower lung zone": {"consolidation": PRESENT, "pleural effusion": ABSENT}}
    f = findings_of("No pneumothorax. There is a small right pleural effusion.", CXR)
    assert f["right lung"] == {"pleural effusion": PRESENT, "pneumothorax": ABSENT}
    f = findings_of("No consolidation; possible small left effusion with left basilar atelectasis.", CXR)
    assert f["left lower lung zone"]["atelectasis"] == UNCERTAIN
    assert f["left lung"]["consolidation"] == ABSENT
    # "X is not Y" finding phrasings
    assert findings_of("The heart is not enlarged.") == {"heart": {"cardiomegaly": ABSENT}}


# ----------------------------------------------------------------------------- normal statements
def test_anatomy_normal_sets_its_findings_unless_stated():
    f = findings_of("The liver is normal. The spleen is unremarkable except for a hypodense lesion.")
    assert f["liver"] == {f: ABSENT for f in load_catalog(CT).anatomy("liver").findings}
    assert f["spleen"] == {"splenomegaly": ABSENT, "hypodense lesion": PRESENT, "calcification": ABSENT}
    # another sentence states one of them: the statement wins over "normal"
    f = findings_of("The liver is unremarkable. Hepatic steatosis.")
    assert f["liver"]["steatosis"] == PRESENT and f["liver"]["hepatomegaly"] == ABSENT
    # "normal in size" speaks about size only
    f = findings_of("The heart is normal in size.", CXR)
    assert f == {"cardiac silhouette": {"cardiomegaly": ABSENT}}
    f = findings_of("The lungs are clear.", CXR)
    assert set(f) == {"right lung", "left lung"} and set(f["right lung"].values()) == {ABSENT}
    # not normal statements: position of a device, "upper limits of normal", "not normal"
    assert findings_of("Endotracheal tube terminates above the carina, in normal position.", CXR) == {
        "carina": {"endotracheal tube": PRESENT}}
    assert findings_of("Heart size is at the upper limits of normal.", CXR) == {}
    assert findings_of("The heart is not normal.", CXR) == {}


@pytest.mark.parametrize("statement", ["No acute abnormality.", "No acute cardiopulmonary process.", "Normal study.",
                                       "No acute intrathoracic process."])
def test_study_normal_sets_everything_except_stated(statement):
    cat = load_catalog(CXR)
    parsed = parse_report(f"Small left pleural effusion. {statement}", cat)
    f = parsed.findings()
    assert f["left lung"]["pleural effusion"] == PRESENT
    assert f["right lung"]["pleural effusion"] == ABSENT
    n = sum(len(a.findings) for a in cat.anatomies)
    assert sum(len(v) for v in f.values()) == n
    assert parsed.study_findings == {"support devices": ABSENT, "no finding": ABSENT}  # derived: a finding is present
    assert parse_report(statement, cat).study_findings["no finding"] == PRESENT


def test_unknown_stays_unknown_and_contract_json():
    parsed = parse_report("FINDINGS: The liver contains a hypodense lesion. No lymphadenopathy.", CT)
    assert parsed.to_dict() == {
        "anatomies": {"liver": {"sentences": ["The liver contains a hypodense lesion."], "findings": {"hypodense lesion": PRESENT}}},
        "study_findings": {"lymphadenopathy": ABSENT},
    }
    assert parse_report("", CT).to_dict() == {"anatomies": {}, "study_findings": {}}


def test_realistic_cxr_report():
    text = (
        "EXAMINATION:  CHEST (PA AND LAT)\n\nINDICATION:  ___ with cough, eval for pneumonia\n\n"
        "FINDINGS: \n\nPA and lateral views of the chest provided. There is a new opacity at the left lung\n"
        "base concerning for pneumonia. No pneumothorax. Heart size is normal. The mediastinal contours\n"
        "are unremarkable. Mild degenerative changes of the thoracic spine.\n\n"
        "IMPRESSION: \n\nLeft basilar opacity, possibly pneumonia."
    )
    f = findings_of(text, CXR)
    assert f["left lung"]["lung opacity"] == PRESENT and f["left lung"]["pneumonia"] == UNCERTAIN
    assert f["left lower lung zone"]["lung opacity"] == PRESENT
    assert f["left lung"]["pneumothorax"] == ABSENT and f["right apical zone"]["pneumothorax"] == ABSENT
    assert f["cardiac silhouette"] == {"cardiomegaly": ABSENT}
    assert f["mediastinum"] == {"widened mediastinum": ABSENT, "pneumomediastinum": ABSENT}
    assert f["spine"] == {"degenerative changes": PRESENT}
    assert "right lung" not in f or "lung opacity" not in f["right lung"]


# ----------------------------------------------------------------------------- merging and the transform
def test_merge_labels_and_sentences():
    parsed = parse_report("The liver contains a hypodense lesion. The spleen is normal. No ascites.", CT)
    record = {"findings": {"liver": {"hypodense lesion": UNCERTAIN}, "pancreas": {"atrophy": PRESENT}},
              "study_findings": {"ascites": PRESENT},
              "anatomy_sentences": {"liver": ["Given liver sentence."]}}
    findings, study = merge_labels(parsed, record)
    assert findings["liver"] == {"hypodense lesion": UNCERTAIN}
    assert findings["pancreas"] == {"atrophy": PRESENT}
    assert findings["spleen"]["splenomegaly"] == ABSENT
    assert study == {"ascites": PRESENT}
    sentences = merge_sentences(parsed, record)
    assert sentences["liver"] == ["Given liver sentence."] and sentences["spleen"] == ["The spleen is normal."]
    assert merge_labels(None, {}) == ({}, {})


def test_parse_reportd_tensors():
    cat = load_catalog(CT)
    record = {
        "id": "case_0001",
        "report": "FINDINGS: Possible hypodense lesion in the liver. The spleen is normal. No lymphadenopathy.",
        "findings": {"pancreas": {"atrophy": 1}},
        "anatomy_sentences": {"heart": ["The heart is enlarged."]},
    }
    out = ParseReportd(cat)(record)
    M, F, S = cat.num_anatomies, cat.max_findings, len(cat.study_findings)
    assert out["findings"].shape == (M, F) and out["findings"].dtype == torch.float32
    assert out["study_findings"].shape == (S,) and out["study_findings"].dtype == torch.float32
    liver, spleen, pancreas, heart = (cat.index(n) for n in ("liver", "spleen", "pancreas", "heart"))
    assert out["findings"][liver, 0] == UNCERTAIN and out["findings"][liver, 1] == UNKNOWN
    assert out["findings"][spleen, :3].tolist() == [ABSENT] * 3
    assert out["findings"][spleen, 3:].eq(UNKNOWN).all()  # padding past the spleen's 3 findings
    assert out["findings"][pancreas, 2] == PRESENT
    assert out["findings"][heart, 0] == PRESENT  # parsed from the given anatomy sentence
    assert out["study_findings"].tolist() == [ABSENT, UNKNOWN, UNKNOWN]
    assert len(out["sentences"]) == M and out["sentences"][heart] == ["The heart is enlarged."]
    assert out["sentences"][spleen] == ["The spleen is normal."] and out["sentences"][0] == []
    assert out["findings_raw"] == {"pancreas": {"atrophy": 1}} and out["report"] == record["report"]
    assert record["findings"] == {"pancreas": {"atrophy": 1}}  # input untouched
    again = ParseReportd(cat)(out)  # a second pass reads the raw labels, not the tensor
    assert torch.equal(again["findings"], out["findings"])
    as_one = ParseReportd(cat, uncertain_as=1)(record)
    assert as_one["findings"][liver, 0] == 1
    empty = ParseReportd(cat)({"id": "x"})
    assert empty["findings"].eq(UNKNOWN).all() and empty["sentences"] == [[] for _ in range(M)]


def test_parse_reportd_rejects_bad_labels_naming_the_record():
    t = ParseReportd(CT)
    with pytest.raises(ValueError, match="case_9.*'livr'"):
        t({"id": "case_9", "findings": {"livr": {"steatosis": 1}}})
    with pytest.raises(ValueError, match="case_9.*'nodule'.*liver"):
        t({"id": "case_9", "findings": {"liver": {"nodule": 1}}})
    with pytest.raises(ValueError, match="case_9.*must be 1, 0 or -1"):
        t({"id": "case_9", "study_findings": {"ascites": 2}})
    with pytest.raises(ValueError, match="uncertain_as"):
        ParseReportd(CT, uncertain_as=3)


# ----------------------------------------------------------------------------- command line
def test_parse_report_command(capsys, tmp_path):
    parse_report_command("ct_totalseg", "The liver contains a hypodense lesion. No lymphadenopathy.")
    out = json.loads(capsys.readouterr().out)
    assert out == {"anatomies": {"liver": {"sentences": ["The liver contains a hypodense lesion."],
                                           "findings": {"hypodense lesion": 1}}},
                   "study_findings": {"lymphadenopathy": 0}}
    path = tmp_path / "cat.json"
    load_catalog(CXR).save(path)
    parse_report_command(str(path), "Cardiomegaly.")
    assert json.loads(capsys.readouterr().out)["anatomies"]["cardiac silhouette"]["findings"] == {"cardiomegaly": 1}
    with pytest.raises(SystemExit, match="unknown catalog"):
        parse_report_command("no_such_catalog", "x")


# ----------------------------------------------------------------------------- hard negatives
@pytest.mark.parametrize(
    "catalog, sentence, negated",
    [
        (CXR, "There is a nodule in the right lung.", "There is no nodule in the right lung."),
        (CXR, "There is no nodule in the right lung.", "There is a nodule in the right lung."),
        (CXR, "The right hemidiaphragm is elevated.", "The right hemidiaphragm is not elevated."),
        (CXR, "Pneumothorax is not seen in the left apical zone.", "Pneumothorax is seen in the left apical zone."),
        (CT, "The spleen shows no splenomegaly.", "The spleen shows splenomegaly."),
        (CT, "The liver is without steatosis.", "The liver shows steatosis."),
        (CT, "Negative for lymphadenopathy.", "Positive for lymphadenopathy."),
        (CT, "Hypodense lesion is seen in the spleen.", "Hypodense lesion is not seen in the spleen."),
    ],
)
def test_negate_sentence(catalog, sentence, negated):
    assert negate_sentence(sentence, catalog) == negated


def test_negate_sentence_gives_none_when_unsure():
    assert negate_sentence("The liver is normal.", CT) is None  # no finding
    assert negate_sentence("Possible pneumonia in the left lung.", CXR) is None  # uncertain
    assert negate_sentence("Gallstones without gallbladder wall thickening.", CT) is None  # mixed


def test_perturb_sentence_changes_meaning():
    parser = get_parser(CXR)
    rng = np.random.default_rng(0)
    sentences = ["There is a nodule in the right lung.", "Small left pleural effusion.", "The right hemidiaphragm is elevated.",
                 "The cardiac silhouette is normal.", "No pneumothorax in the left apical zone."]
    for s in sentences:
        for _ in range(5):
            p = perturb_sentence(s, CXR, rng)
            assert p is not None and p != s
            a, b = parser.analyze(s), parser.analyze(p)
            assert b.labels() or b.normal
            assert (a.labels(), set(a.normal)) != (b.labels(), set(b.normal))
    assert perturb_sentence("Dr. Smith was called.", CXR, rng) is None


# ----------------------------------------------------------------------------- the report writer
def _random_case(catalog, rng):
    findings = {}
    for a in catalog.anatomies:
        if not a.findings or rng.random() < 0.1:
            continue
        p = rng.uniform(0, 0.3)
        findings[a.name] = {f: int(rng.choice([1, 0, -1], p=[p, 1 - p - 0.03, 0.03])) for f in a.findings}
    if rng.random() < 0.3:  # a normal study
        findings = {a: {f: 0 for f in d} for a, d in findings.items()}
    study = {f: int(rng.random() < 0.15) for f in catalog.study_findings if f != "no finding"}
    details = {a: {f: f"{int(rng.integers(3, 40))} mm" for f, v in d.items() if v == 1 and rng.random() < 0.5}
               for a, d in findings.items()}
    return findings, study, details


def _catalogs_for_round_trip():
    return [n for n in (CT, CXR, "synthetic_ct", "synthetic_cxr") if n in builtin_catalogs()]


@pytest.mark.parametrize("name", _catalogs_for_round_trip())
def test_writer_parser_round_trip(name):
    """200 random reports: parsing recovers every stated label, claims nothing positive beyond the input."""
    cat = load_catalog(name)
    parser = get_parser(cat)
    rng = np.random.default_rng(1)
    WRITER_STATS.clear()
    stated = agree = 0
    for _ in range(200):
        findings, study, details = _random_case(cat, rng)
        report, sentences = write_report(cat, findings, rng, study_findings=study, details=details)
        parsed = parser.parse(report)
        pf = parsed.findings()
        for a, d in findings.items():
            for f, v in d.items():
                got = pf.get(a, {}).get(f)
                if v != ABSENT:
                    assert got == v, (report, a, f, v, got)  # positives and uncertain are always written
                if got is not None:
                    stated += 1
                    agree += got == v
        for a, d in pf.items():  # nothing present or uncertain that the input does not say
            for f, v in d.items():
                assert v == ABSENT or findings.get(a, {}).get(f) == v, (report, a, f, v)
        for f, v in study.items():
            got = parsed.study_findings.get(f)
            assert got is None or got == v, (report, f, v, got)
            assert v == ABSENT or got == v
        # the per-anatomy sentences are report sentences, and read alone they give the same labels
        report_sentences = set(split_sentences(report))
        assert all(s in report_sentences for ss in sentences.values() for s in ss)
        alone = parse_anatomy_sentences(sentences, cat).findings()
        for a, d in alone.items():
            for f, v in d.items():
                assert findings.get(a, {}).get(f, ABSENT if v == ABSENT else None) == v, (a, f, v, sentences[a])
    assert stated > 1000 and agree == stated
    # the templates themselves are sound: the writer's read-back check rarely rejects one
    assert WRITER_STATS["fallbacks"] + WRITER_STATS["dropped"] == 0, dict(WRITER_STATS)
    assert WRITER_STATS["retries"] < 0.03 * WRITER_STATS["sentences"], dict(WRITER_STATS)


def test_writer_variety_and_determinism():
    cat = load_catalog(CT)
    rng = np.random.default_rng(3)
    reports = []
    for _ in range(60):
        findings, study, details = _random_case(cat, rng)
        reports.append(write_report(cat, findings, rng, study_findings=study, details=details)[0])
    text = "\n".join(reports)
    for phrase in ("FINDINGS", "IMPRESSION", "No ", "Free of", "Negative for", "Without", " or ", "unremarkable",
                   "otherwise", "cannot be excluded", "Possible", " mm", "hepatic", "INDICATION"):
        assert phrase.lower() in text.lower(), phrase
    assert len(set(s for r in reports for s in split_sentences(r))) > 600
    # a normal study says so, in the impression too
    normal = {a.name: {f: 0 for f in a.findings} for a in cat.anatomies}
    report, _ = write_report(cat, normal, np.random.default_rng(0), study_findings={f: 0 for f in cat.study_findings})
    assert get_parser(cat).parse(report).study_findings == {f: ABSENT for f in cat.study_findings}
    assert "IMPRESSION" in report.upper()
    # deterministic given the seed
    args = ({"liver": {"steatosis": 1, "hepatomegaly": 0}}, )
    assert write_report(cat, *args, np.random.default_rng(7)) == write_report(cat, *args, np.random.default_rng(7))
    with pytest.raises(ValueError, match="'livr' is not in catalog"):
        write_report(cat, {"livr": {"steatosis": 1}}, rng)
    with pytest.raises(ValueError, match="'nodule' is not a finding of 'liver'"):
        write_report(cat, {"liver": {"nodule": 1}}, rng)


# ----------------------------------------------------------------------------- real radiology language
# Sentences as they are written in MIMIC-CXR / IU X-ray and CT-RATE reports (see also
# tests/fixtures/reports and tests/test_parser_agreement.py for whole reports).
@pytest.mark.parametrize(
    "catalog, sentence, anatomy, finding, value",
    [
        # negation: no, without, free of, negative for, not seen / observed / well visualized
        (CXR, "There is no focal consolidation, pleural effusion or pneumothorax.", "left lung", "pneumothorax", ABSENT),
        (CXR, "There is no focal consolidation, pleural effusion or pneumothorax.", "right lower lung zone", "consolidation", ABSENT),
        (CXR, "The lungs are clear without focal consolidation, effusion, or pneumothorax.", "right lung", "pleural effusion", ABSENT),
        (CXR, "The lungs are free of focal airspace disease.", "left lung", "lung opacity", ABSENT),
        (CT, "The gallbladder is free of gallstones.", "gallbladder", "gallstone", ABSENT),
        (CT, "Pericardial effusion-thickening was not observed.", "heart", "pericardial effusion", ABSENT),
        (CT, "Pleural effusion-thickening was not detected.", "lung", "pleural effusion", ABSENT),
        (CXR, "Pulmonary nodule in the left upper lobe seen on prior CT is not well visualized.", "left upper lung zone", "nodule", ABSENT),
        (CXR, "The previously seen right pleural effusion has resolved.", "right lung", "pleural effusion", ABSENT),
        (CXR, "Small left apical pneumothorax is no longer seen.", "left apical zone", "pneumothorax", ABSENT),
        (CXR, "Neither pleural effusion nor pulmonary edema is present.", "right lung", "edema", ABSENT),
        # uncertainty: cannot exclude, may represent, is not excluded, possible, likely, versus, X/Y, and/or
        (CXR, "Cannot exclude early pneumonia in the right lower lobe.", "right lower lung zone", "pneumonia", UNCERTAIN),
        (CXR, "Left lower lobe opacity may represent atelectasis.", "left lower lung zone", "atelectasis", UNCERTAIN),
        (CXR, "Left lower lobe opacity may represent atelectasis.", "left lower lung zone", "lung opacity", PRESENT),
        (CXR, "Left lower lobe opacity, infection is not excluded.", "left lower lung zone", "pneumonia", UNCERTAIN),
        (CXR, "Possible small left pleural effusion.", "left lung", "pleural effusion", UNCERTAIN),
        (CXR, "Bibasilar opacities likely reflect atelectasis.", "right lower lung zone", "atelectasis", UNCERTAIN),
        (CXR, "Left retrocardiac opacity in the left lower lobe, atelectasis versus pneumonia.", "left lower lung zone", "pneumonia", UNCERTAIN),
        (CT, "Bilateral pleural effusions with adjacent lower lobe consolidation/atelectasis.", "lung", "atelectasis", UNCERTAIN),
        (CT, "Bilateral pleural effusions with adjacent lower lobe consolidation/atelectasis.", "lung", "pleural effusion", PRESENT),
        (CXR, "Dense opacity in the left lower lobe, atelectasis and/or effusion.", "left lower lung zone", "pleural effusion", UNCERTAIN),
        (CT, "No consolidation/atelectasis in the lung parenchyma.", "lung", "atelectasis", ABSENT),
        # adjectives of findings
        (CXR, "The aorta is tortuous and calcified.", "aortic arch", "calcification", PRESENT),
        (CT, "Calcified atherosclerotic plaques are observed in the aortic arch.", "aorta", "arterial wall calcification", PRESENT),
        (CT, "Minimal atelectatic changes are observed in both lower lobes.", "lung", "atelectasis", PRESENT),
        (CT, "Paraseptal emphysematous changes are observed in both lungs.", "lung", "emphysema", PRESENT),
        (CT, "Parenchymal fibrotic sequelae are seen in the right lung.", "lung", "pulmonary fibrotic sequela", PRESENT),
        # fragments of an anatomy's findings, generic lesions
        (CT, "There is circumferential wall thickening of the sigmoid colon.", "colon", "colonic wall thickening", PRESENT),
        (CT, "Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected.",
         "esophagus", "esophageal wall thickening", ABSENT),
        (CXR, "There is mild elevation of the left hemidiaphragm.", "left hemidiaphragm", "elevated hemidiaphragm", PRESENT),
        (CT, "No space-occupying lesion was detected in the liver that entered the cross-sectional area.", "liver", "hypodense lesion", ABSENT),
        (CT, "No focal liver lesion.", "liver", "hypodense lesion", ABSENT),
        # a side word before a finding without an anatomy
        (CXR, "There is a moderate right pneumothorax with slight leftward shift of the mediastinum.", "right lung", "pneumothorax", PRESENT),
        (CT, "Moderate right hydronephrosis.", "right kidney", "hydronephrosis", PRESENT),
        # the part belongs to the anatomy after "of"
        (CT, "A hypodense nodule of 15 mm is observed in the right lobe of the thyroid gland.", "thyroid gland", "thyroid nodule", PRESENT),
        # bilateral findings without an anatomy go to both sides of the widest owner
        (CXR, "There are diffuse bilateral airspace opacities.", "left lung", "lung opacity", PRESENT),
    ],
)
def test_real_report_language(catalog, sentence, anatomy, finding, value):
    assert findings_of(sentence, catalog).get(anatomy, {}).get(finding) == value


def test_negation_does_not_leak_into_other_findings_or_sides():
    f = findings_of("No left pneumothorax. Right basilar atelectasis.", CXR)
    assert f["left lung"] == {"pneumothorax": ABSENT} and "right lung" not in f  # the side's widest owner only
    assert findings_of("No lytic-destructive lesion was detected in bone structures.", CT) == {}  # not any lesion
    f = findings_of("A hypodense nodule is observed in the right lobe of the thyroid gland.", CT)
    assert "lung" not in f  # "lobe" is the thyroid's here
    f = findings_of("Right pneumothorax. No left hydronephrosis.", CT)
    assert f == {"left kidney": {"hydronephrosis": ABSENT}}


@pytest.mark.parametrize("statement", ["No acute cardiopulmonary process.", "no acute cardiopulmonary process.",
                                       "Negative chest radiograph.", "No evidence of acute cardiopulmonary disease.",
                                       "No acute findings in the chest."])
def test_normal_study_phrases(statement):
    parsed = parse_report(f"FINDINGS: The lungs are clear. IMPRESSION: {statement}", CXR)
    assert parsed.study_findings == {"support devices": ABSENT, "no finding": PRESENT}
    assert parsed.findings()["svc"] == {"central venous line": ABSENT, "enlarged svc": ABSENT}
    parsed = parse_report("Findings: Trachea and both main bronchi are open.\nImpression: Findings within normal limits.", CT)
    assert parsed.study_findings == {"lymphadenopathy": ABSENT, "medical material": ABSENT, "ascites": ABSENT}


def test_ct_rate_normal_phrases_and_groups():
    cat = load_catalog(CT)
    f = findings_of("Trachea and both main bronchi are open.")
    assert f == {"trachea": {"tracheal stenosis": ABSENT, "secretions": ABSENT}}  # the bronchi are a part of the lung
    f = findings_of("Bone structures in the study area are natural.")
    assert f == {"vertebrae": {x: ABSENT for x in cat.anatomy("vertebrae").findings}}
    f = findings_of("Upper abdominal organs included in the sections are normal.")
    assert set(f) == {"liver", "gallbladder", "spleen", "pancreas", "right kidney", "left kidney", "adrenal glands", "stomach"}
    assert all(set(v.values()) == {ABSENT} and len(v) == len(cat.anatomy(a).findings) for a, v in f.items())
    # the size word speaks of the heart; the vessels (the aorta) are normal in full
    f = findings_of("Mediastinal main vascular structures, heart contour, size are normal.")
    assert f == {"heart": {"cardiomegaly": ABSENT}, "aorta": {"arterial wall calcification": ABSENT, "aortic aneurysm": ABSENT}}
    assert findings_of("Liver and spleen sizes are normal.") == {"liver": {"hepatomegaly": ABSENT}, "spleen": {"splenomegaly": ABSENT}}
    assert findings_of("Thoracic esophagus calibration was normal.") == {}  # no size finding of the esophagus
    # one side of a single "lung" anatomy being clear says nothing of the lung as a whole
    f = findings_of("Right pleural effusion is present. The left lung is clear.")
    assert f == {"lung": {"pleural effusion": PRESENT}}
    f = findings_of("The costophrenic angles are sharp.", CXR)
    assert f["right costophrenic angle"] == {"pleural effusion": ABSENT, "blunted costophrenic angle": ABSENT}


def test_no_finding_is_zero_for_a_finding_no_anatomy_can_take():
    parsed = parse_report("Multiple old healed left rib fractures. No acute cardiopulmonary process.", CXR)
    assert parsed.study_findings["no finding"] == ABSENT
    assert parse_report("No acute cardiopulmonary process.", CXR).study_findings["no finding"] == PRESENT
