"""Synthetic chest radiographs (``synthetic/cxr.py``): contract, anatomy, findings, determinism."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.data.datalist import SPLITS, load_datalist
from anatomy_vlp_bundle.synthetic import cxr

N_CASES = 6
SEED = 0
LUNG_PARTS = ("upper lung zone", "mid lung zone", "lower lung zone", "apical zone", "costophrenic angle")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syncxr") / "data"
    path = cxr.generate_cxr_dataset(out, n_cases=N_CASES, seed=SEED, progress=False)
    assert path == out / "datalist.json"
    return out


def _records(root: Path) -> list[dict]:
    dl = load_datalist(root / "datalist.json")
    return [r for split in SPLITS for r in dl.records(split)]


def _image01(path: str) -> np.ndarray:
    arr = np.asarray(Image.open(path))
    return arr.astype(np.float64) / (65535.0 if arr.dtype == np.uint16 else 255.0)


def _mask(path: str) -> np.ndarray:
    return np.asarray(Image.open(path)) > 0


def _find_case(predicate, start: int = 0, limit: int = 200) -> tuple[int, cxr.CaseParameters]:
    """First case index (seed SEED) whose sampled parameters satisfy ``predicate`` (sampling is cheap)."""
    for i in range(start, start + limit):
        params = cxr.sample_case_parameters(np.random.default_rng([SEED, i]), cxr._patient_rng(SEED, i))
        if predicate(params):
            return i, params
    raise AssertionError("no such case in the first cases")


def _with_findings(params: cxr.CaseParameters, **changes) -> cxr.CaseParameters:
    return dataclasses.replace(params, findings=dataclasses.replace(params.findings, **changes))


# ----------------------------------------------------------------------------- contract
def test_contract_shape(dataset):
    dl = load_datalist(dataset / "datalist.json")
    raw = json.loads((dataset / "datalist.json").read_text())
    assert raw["name"] == "synthetic-cxr-v1" and raw["modality"] == "CXR" and raw["catalog"] == "catalog.json"
    catalog = dl.catalog()
    assert catalog.name == "synthetic_cxr" and catalog.modality == "CXR"
    assert catalog.to_dict() == load_catalog("synthetic_cxr").to_dict()
    assert {s: len(dl.records(s)) for s in SPLITS} == {"training": 3, "validation": 1, "test": 2}
    ids = set()
    for rec, raw_rec in zip(_records(dataset), [r for s in SPLITS for r in raw[s]]):
        assert rec["id"] not in ids
        ids.add(rec["id"])
        assert rec["patient"].startswith("p")
        # paths are relative in the file and exist
        assert not Path(raw_rec["image"]).is_absolute() and Path(rec["image"]).is_file()
        assert raw_rec["image"] == f"images/{rec['id']}.png"
        assert list(rec["anatomy_masks"]) == [a for a in catalog.names if a in rec["anatomy_masks"]]
        assert len(rec["anatomy_masks"]) == catalog.num_anatomies  # the phantom defines all 29 regions
        for name, path in rec["anatomy_masks"].items():
            assert raw_rec["anatomy_masks"][name] == f"masks/{rec['id']}/{name.replace(' ', '_')}.png"
            assert Path(path).is_file()
        # structured labels: every finding of every present region, 0 or 1
        for anatomy in catalog.anatomies:
            if anatomy.findings:
                assert set(rec["findings"][anatomy.name]) == set(anatomy.findings)
        assert all(v in (0, 1) for fs in rec["findings"].values() for v in fs.values())
        assert rec["report"].strip() and isinstance(rec["anatomy_sentences"], dict)
        assert set(rec["anatomy_sentences"]) <= set(catalog.names)


def test_catalog_is_a_subset_of_imagenome29_in_its_order():
    ours, ref = load_catalog("synthetic_cxr"), load_catalog("cxr_imagenome29")
    assert ours.names == [n for n in ref.names if n in ours.names]
    for a in ours.anatomies:
        ref_findings = ref.anatomy(a.name).findings
        assert list(a.findings) == [f for f in ref_findings if f in a.findings]
        assert a.labels == ()
    synonyms = [s for a in ours.anatomies for s in a.synonyms]
    assert len(synonyms) == len(set(synonyms)), "a synonym names two regions"


def test_split_sizes_and_patients():
    assert cxr.split_sizes(320) == {"training": 180, "validation": 40, "test": 100}
    assert cxr.split_sizes(6) == {"training": 3, "validation": 1, "test": 2}
    assert cxr.split_sizes(3) == {"training": 1, "validation": 1, "test": 1}
    assert cxr.split_sizes(1) == {"training": 1, "validation": 0, "test": 0}
    assert cxr.split_sizes(2) == {"training": 2, "validation": 0, "test": 0}
    assert cxr.split_sizes(1000)["test"] >= 100
    for bad in ((0, None, None), (5, 3, 2), (5, -1, None)):
        with pytest.raises(ValueError):
            cxr.split_sizes(*bad)
    plans = cxr.plan_cases(320, seed=SEED)
    split_of: dict[str, str] = {}
    for p in plans:
        assert split_of.setdefault(p.patient_id, p.split) == p.split
    assert len(split_of) < len(plans), "some patients should have a follow-up study"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        cxr.generate_cxr_dataset(tmp_path / "a", n_cases=0, progress=False)
    with pytest.raises(ValueError, match="conspicuity"):
        cxr.generate_cxr_dataset(tmp_path / "b", n_cases=2, conspicuity=0, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        cxr.generate_cxr_dataset(tmp_path / "file", n_cases=2, progress=False)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_and_independent_of_workers(dataset, tmp_path):
    again = tmp_path / "again"
    cxr.generate_cxr_dataset(again, n_cases=N_CASES, seed=SEED, workers=2, progress=False)
    assert _tree_digest(again) == _tree_digest(dataset)
    other = tmp_path / "other"
    cxr.generate_cxr_dataset(other, n_cases=2, seed=SEED + 1, progress=False)
    a = np.asarray(Image.open(other / "images" / "case_0000.png"))
    b = np.asarray(Image.open(dataset / "images" / "case_0000.png"))
    assert a.shape != b.shape or not np.array_equal(a, b)


# ----------------------------------------------------------------------------- images and masks
def test_images_and_masks_share_pixel_size(dataset):
    bit_depths = set()
    for rec in _records(dataset):
        image = Image.open(rec["image"])
        assert image.mode in ("L", "I;16")
        bit_depths.add(image.mode)
        for path in rec["anatomy_masks"].values():
            mask = Image.open(path)
            assert mask.size == image.size
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert bit_depths == {"L", "I;16"}, "seed 0 holds both 8-bit and 16-bit images"


def test_heart_overlaps_the_lungs(dataset):
    for rec in _records(dataset):
        m = {k: _mask(v) for k, v in rec["anatomy_masks"].items()}
        heart = m["cardiac silhouette"]
        lungs = m["right lung"] | m["left lung"]
        # the rays through the heart also cross lung (in front of and behind it)
        assert (heart & lungs).sum() > 0.1 * heart.sum()
        assert (heart & ~lungs).any()


def test_right_lung_on_image_left(dataset):
    for rec in _records(dataset):
        right, left = _mask(rec["anatomy_masks"]["right lung"]), _mask(rec["anatomy_masks"]["left lung"])
        width = right.shape[1]
        cols_r, cols_l = np.nonzero(right)[1], np.nonzero(left)[1]
        assert cols_r.mean() < width / 2 < cols_l.mean()
        # contract boxes [x_min, y_min, x_max, y_max] with x = column
        assert cols_r.max() + 1 <= width / 2 + 10 and cols_l.min() >= width / 2 - 10
        rc = _mask(rec["anatomy_masks"]["right clavicle"])
        assert np.nonzero(rc)[1].mean() < width / 2


def test_lungs_darker_than_spine_and_heart(dataset):
    for rec in _records(dataset):
        image = _image01(rec["image"])
        m = {k: _mask(v) for k, v in rec["anatomy_masks"].items()}
        lungs = (m["right lung"] | m["left lung"]) & ~m["cardiac silhouette"] & ~m["mediastinum"]
        assert image[lungs].mean() < image[m["spine"]].mean()
        assert image[lungs].mean() < image[m["cardiac silhouette"]].mean()
        assert image[m["trachea"]].mean() < image[m["spine"] & ~m["trachea"]].mean() + 0.05


def test_zones_nested_in_their_lung(dataset):
    for rec in _records(dataset):
        m = {k: _mask(v) for k, v in rec["anatomy_masks"].items()}
        for side in ("right", "left"):
            lung = m[f"{side} lung"]
            for part in LUNG_PARTS:
                zone = m[f"{side} {part}"]
                assert zone.any() and not (zone & ~lung).any(), f"{side} {part}"
            thirds = [m[f"{side} {z}"] for z in ("upper lung zone", "mid lung zone", "lower lung zone")]
            assert np.array_equal(thirds[0] | thirds[1] | thirds[2], lung)
            assert not (thirds[0] & thirds[1]).any() and not (thirds[1] & thirds[2]).any()
            assert not (m[f"{side} apical zone"] & ~thirds[0]).any()
            assert not (m[f"{side} costophrenic angle"] & ~thirds[2]).any()
        assert not (m["upper mediastinum"] & ~m["mediastinum"]).any()


def test_findings_consistent_across_nested_regions(dataset):
    catalog = load_catalog("synthetic_cxr")
    for rec in _records(dataset):
        f = rec["findings"]
        for side in ("right", "left"):
            lung = f[f"{side} lung"]
            for part in LUNG_PARTS:
                for finding, value in f[f"{side} {part}"].items():
                    if value == 1 and finding in catalog.anatomy(f"{side} lung").findings:
                        assert lung[finding] == 1, (rec["id"], side, part, finding)
        if f["upper mediastinum"]["widened mediastinum"]:
            assert f["mediastinum"]["widened mediastinum"] == 1


# ----------------------------------------------------------------------------- findings
def test_cardiomegaly_raises_cardiothoracic_ratio():
    ratios = {0: [], 1: []}
    for i in range(16):
        params, case = cxr.simulate_case(SEED, i, size=128)
        ratios[int(params.findings.cardiomegaly > 0)].append(case.ctr)
    assert ratios[0] and ratios[1], "both groups should occur among the first 16 cases"
    assert np.mean(ratios[1]) > np.mean(ratios[0]) + 0.05
    # paired: the same patient with and without an enlarged heart
    _, params = _find_case(lambda p: p.findings.cardiomegaly == 0)
    normal = cxr.render_case(params, size=128)
    enlarged = cxr.render_case(_with_findings(params, cardiomegaly=0.3), size=128)
    assert enlarged.ctr > normal.ctr + 0.05
    assert enlarged.findings["cardiac silhouette"]["cardiomegaly"] == 1
    assert normal.findings["cardiac silhouette"]["cardiomegaly"] == 0


def test_nodule_changes_pixels_inside_its_zone():
    _, params = _find_case(lambda p: any(l.kind == "nodule" for l in p.findings.focal))
    case = cxr.render_case(params)
    nodule = next(l for l in params.findings.focal if l.kind == "nodule")
    without = cxr.render_case(_with_findings(params, focal=tuple(l for l in params.findings.focal if l is not nodule)))
    side = "right" if nodule.side < 0 else "left"
    zone = case.masks[f"{side} {nodule.zone} lung zone"]
    diff = np.abs(case.image_clean - without.image_clean)
    assert diff[zone].max() > 3.0
    assert diff[zone].max() > 10 * diff[~zone].max()
    assert np.unravel_index(np.argmax(diff), diff.shape) in set(zip(*np.nonzero(zone)))
    assert case.findings[f"{side} {nodule.zone} lung zone"]["nodule"] == 1
    assert case.findings[f"{side} lung"]["nodule"] == 1


def test_low_contrast_nodules_have_cnr_at_most_3():
    _, params = _find_case(lambda p: any(l.kind == "nodule" and l.target_cnr for l in p.findings.focal))
    case = cxr.render_case(params)
    index = next(i for i, l in enumerate(params.findings.focal) if l.kind == "nodule" and l.target_cnr)
    lesion = params.findings.focal[index]
    truth = [d for d in case.lesions if d["kind"] == "nodule" and d["low_contrast"]][0]
    assert 0 < truth["cnr"] <= 3.0
    # measured again from the pixels: the image without this nodule gives the contrast
    without = cxr.render_case(_with_findings(params, focal=tuple(l for l in params.findings.focal if l is not lesion)))
    col, row = truth["center_xy"]
    cnr = cxr.nodule_cnr(case.image_clean, without.image_clean, case.image - case.image_clean,
                         (row - 0.5, col - 0.5), truth["diameter_px"] / 2)
    assert 0.3 < cnr <= 3.0


def test_low_contrast_nodules_in_dataset_ground_truth(dataset):
    truth = json.loads((dataset / "ground_truth.json").read_text())
    for case in truth["cases"].values():
        for lesion in case["lesions"]:
            if lesion["kind"] == "nodule" and lesion["low_contrast"]:
                assert lesion["cnr"] <= 3.0


def test_effusion_brightens_the_costophrenic_angle():
    _, params = _find_case(lambda p: max(p.findings.pleural_effusion) == 0)
    dry = cxr.render_case(params)
    wet = cxr.render_case(_with_findings(params, pleural_effusion=(0.3, 0.3)))
    for side in ("right", "left"):
        angle = wet.masks[f"{side} costophrenic angle"]
        assert np.array_equal(angle, dry.masks[f"{side} costophrenic angle"])  # regions do not move
        assert wet.image_clean[angle].mean() > dry.image_clean[angle].mean() + 5
        for region in ("costophrenic angle", "lower lung zone", "lung"):
            assert wet.findings[f"{side} {region}"]["pleural effusion"] == 1
            assert dry.findings[f"{side} {region}"]["pleural effusion"] == 0


def test_pneumothorax_removes_lung_markings_at_the_apex():
    _, params = _find_case(lambda p: max(p.findings.pneumothorax) == 0 and p.findings.edema == 0)
    normal = cxr.render_case(params)
    ptx = cxr.render_case(_with_findings(params, pneumothorax=(0.3, 0.0)))
    apex = normal.masks["right apical zone"]
    # air replaces lung: the apex gets darker; the left lung is untouched
    assert ptx.image_clean[apex].mean() < normal.image_clean[apex].mean() - 2
    left = normal.masks["left upper lung zone"]
    assert np.abs(ptx.image_clean[left] - normal.image_clean[left]).mean() < 1.0
    for region in ("lung", "upper lung zone", "apical zone"):
        assert ptx.findings[f"right {region}"]["pneumothorax"] == 1


def test_prevalence_and_conspicuity():
    counts: dict[str, int] = {}
    n = 400
    for i in range(n):
        f = cxr.sample_case_parameters(np.random.default_rng([SEED, i])).findings
        present = {
            "cardiomegaly": f.cardiomegaly > 0,
            "widened mediastinum": f.widened_mediastinum_mm > 0,
            "elevated hemidiaphragm": max(f.elevated_hemidiaphragm_mm) > 0,
            "pleural effusion": max(f.pleural_effusion) > 0,
            "pneumothorax": max(f.pneumothorax) > 0,
            "enlarged hilum": max(f.enlarged_hilum) > 0,
            "edema": f.edema > 0,
            **{k: any(l.kind == k for l in f.focal) for k in ("nodule", "consolidation", "atelectasis")},
        }
        for k, v in present.items():
            counts[k] = counts.get(k, 0) + int(v)
    for k, c in counts.items():
        assert 0.2 <= c / n <= 0.35, (k, c / n)
    # conspicuity scales contrast and size with the same random draws
    strong = cxr.sample_case_parameters(np.random.default_rng([SEED, 7]), conspicuity=1.0).findings
    faint = cxr.sample_case_parameters(np.random.default_rng([SEED, 7]), conspicuity=0.5).findings
    assert strong.focal and len(strong.focal) == len(faint.focal)
    for a, b in zip(strong.focal, faint.focal):
        assert b.size_mm <= a.size_mm and b.density < a.density


def test_pure_region_helpers():
    lung = np.zeros((60, 40), bool)
    lung[10:50, 5:25] = True
    zones = cxr.lung_zones(lung)
    assert [zones[k].any(axis=1).nonzero()[0][[0, -1]].tolist() for k in ("upper", "mid", "lower")] == [
        [10, 22], [23, 36], [37, 49]]
    right_angle = cxr.costophrenic_angle(lung, side=-1)
    rows, cols = np.nonzero(right_angle)
    assert rows.max() == 49 and cols.min() == 5  # the lateral (image-left) lower corner of a right lung
    left_angle = cxr.costophrenic_angle(lung, side=+1)
    assert np.nonzero(left_angle)[1].max() == 24
    masks = {"cardiac silhouette": np.zeros((10, 20), bool), "right lung": np.zeros((10, 20), bool),
             "left lung": np.zeros((10, 20), bool)}
    masks["right lung"][:, 0:8] = True
    masks["left lung"][:, 12:20] = True
    masks["cardiac silhouette"][5:, 5:15] = True
    assert cxr.cardiothoracic_ratio(masks) == pytest.approx(0.5)
