"""Synthetic CT generator (``synthetic/ct.py``): contract files, determinism, geometry, findings."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.data.datalist import SPLITS, load_datalist
from anatomy_vlp_bundle.synthetic import ct

SMALL_SHAPE = (48, 40, 40)  # 4 mm voxels: the phantom scales to this smaller field of view
N_SMALL = 6
LUNG = [10, 11, 12, 13, 14]
VERTEBRAE = list(range(25, 51))


def _generate(out: Path, seed: int = 0, **kw) -> Path:
    return ct.generate_ct_dataset(out, n_cases=N_SMALL, seed=seed, shape=SMALL_SHAPE, progress=False, **kw)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("synct") / "a")


def _records(datalist_path: Path) -> list[dict]:
    dl = load_datalist(datalist_path)
    return [r for split in SPLITS for r in dl.records(split, resolve=False)]


def _spec(index: int = 0, **findings_on) -> ct.CTCaseSpec:
    """Case ``index`` of seed 0 with every finding off except ``{"anatomy/finding": 1}`` overrides."""
    spec = ct.sample_ct_case(0, index, index)
    for anatomy in spec.findings:
        for f in spec.findings[anatomy]:
            spec.findings[anatomy][f] = int(findings_on.get(f"{anatomy}/{f}", 0))
    spec.study_findings = {k: 0 for k in spec.study_findings}
    spec.anatomy["gallbladder"]["absent"] = False
    return spec


def _with(spec: ct.CTCaseSpec, key: str, value: int = 1, conspicuity: float | None = None) -> ct.CTCaseSpec:
    out = copy.deepcopy(spec)
    anatomy, finding = key.split("/")
    out.findings[anatomy][finding] = value
    if conspicuity is not None:
        out.conspicuity = conspicuity
    return out


# ----------------------------------------------------------------------------- contract
def test_datalist_and_catalog_follow_the_contract(small_set):
    data = json.loads(small_set.read_text())
    assert small_set.name == "datalist.json"
    assert (data["name"], data["modality"], data["catalog"]) == ("synthetic-ct-v1", "CT", "catalog.json")
    dl = load_datalist(small_set)
    catalog = dl.catalog()
    packaged = load_catalog("synthetic_ct")
    assert catalog.to_dict() == packaged.to_dict() and packaged.name == "synthetic_ct" and packaged.modality == "CT"
    assert {s: len(dl.records(s)) for s in SPLITS} == {"training": 3, "validation": 1, "test": 2}
    for rec in _records(small_set):
        assert rec["id"].startswith("case_") and rec["patient"].startswith("p")
        assert rec["image"] == f"images/{rec['id']}.nii.gz" and rec["anatomy_mask"] == f"masks/{rec['id']}.nii.gz"
        assert (small_set.parent / rec["image"]).is_file() and (small_set.parent / rec["anatomy_mask"]).is_file()
        assert rec["report"].strip() and set(rec["anatomy_sentences"]) <= set(catalog.names)
        # every finding of every anatomy present is labelled 0 or 1
        assert set(rec["findings"]) >= set(catalog.names) - {"gallbladder"}
        for anatomy, labels in rec["findings"].items():
            assert list(labels) == list(catalog.anatomy(anatomy).findings)
            assert set(labels.values()) <= {0, 1}
        assert set(rec["study_findings"]) == set(catalog.study_findings)


def test_catalog_shares_names_and_label_ids_with_ct_totalseg():
    ours, totalseg = load_catalog("synthetic_ct"), load_catalog("ct_totalseg")
    assert set(ours.names) <= set(totalseg.names)
    for anatomy in ours.anatomies:
        assert set(anatomy.labels) <= set(totalseg.anatomy(anatomy.name).labels), anatomy.name
    # the renderer draws exactly the catalog's findings
    assert set(ct.FINDING_KINDS) == set(ours.finding_pairs())


def test_masks_read_through_both_catalogs(small_set):
    ours, totalseg = load_catalog("synthetic_ct"), load_catalog("ct_totalseg")
    ours_map, ts_map = ours.label_to_index(), totalseg.label_to_index()
    for rec in _records(small_set)[:2]:
        values = set(np.unique(np.asarray(nib.load(small_set.parent / rec["anatomy_mask"]).dataobj)).tolist()) - {0}
        assert values <= set(ours_map)
        for v in values:
            assert ours.names[ours_map[v]] == totalseg.names[ts_map[v]]


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files(small_set, tmp_path):
    again = _generate(tmp_path / "b", workers=2)
    assert again.read_bytes() == small_set.read_bytes()
    for rec in _records(small_set):
        for key in ("image", "anatomy_mask"):
            a, b = small_set.parent / rec[key], again.parent / rec[key]
            assert a.read_bytes() == b.read_bytes()


def test_different_seeds_differ(small_set, tmp_path):
    other = _generate(tmp_path / "c", seed=1)
    assert other.read_bytes() != small_set.read_bytes()
    rec = _records(small_set)[0]
    a = np.asarray(nib.load(small_set.parent / rec["image"]).dataobj)
    b = np.asarray(nib.load(other.parent / rec["image"]).dataobj)
    assert a.shape != b.shape or not np.array_equal(a, b)


# ----------------------------------------------------------------------------- geometry
def _world_corners(img) -> np.ndarray:
    ijk = np.array([[i, j, k] for i in (0, img.shape[0] - 1) for j in (0, img.shape[1] - 1) for k in (0, img.shape[2] - 1)])
    return np.sort(nib.affines.apply_affine(img.affine, ijk).round(3), axis=0)


def _centroid(labels: np.ndarray, values) -> np.ndarray:
    return np.argwhere(np.isin(labels, values)).mean(axis=0)


def test_images_are_hu_with_aligned_masks_in_anatomical_places(small_set):
    for rec in _records(small_set):
        image = nib.load(small_set.parent / rec["image"])
        mask = nib.load(small_set.parent / rec["anatomy_mask"])
        assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert np.allclose(image.header.get_zooms(), (4.0, 4.0, 4.0))
        assert np.allclose(_world_corners(image), _world_corners(mask))  # same physical extent
        hu = np.asarray(nib.as_closest_canonical(image).dataobj)
        labels = np.asarray(nib.as_closest_canonical(mask).dataobj)
        assert hu.shape == labels.shape == SMALL_SHAPE
        # RAS array: larger i = patient right, larger j = anterior, larger k = superior
        liver, spleen = _centroid(labels, [5]), _centroid(labels, [1])
        assert liver[0] > labels.shape[0] / 2 > spleen[0]
        assert _centroid(labels, [51])[1] > _centroid(labels, VERTEBRAE)[1]  # heart anterior to the spine
        assert _centroid(labels, LUNG)[2] > liver[2]
        assert _centroid(labels, [2])[0] > _centroid(labels, [3])[0]  # right kidney on the right
        # tissue HU match their labels
        assert hu[np.isin(labels, LUNG)].mean() < -500
        assert hu[labels == 52].mean() > 120  # contrast-enhanced aorta
        assert hu[np.isin(labels, VERTEBRAE)].mean() > 150
        assert 0 < np.median(hu[labels == 5]) < 90
        assert hu[0, 0, :].mean() < -900  # air in the corner
        assert -1024 <= hu.min() and hu.max() <= 3071


def test_unenhanced_tissue_hu_resembles_a_real_ct(real_data):
    """Liver, spleen, lung and vertebrae medians near those of TotalSegmentator's example CT.

    That CT is unenhanced, so the contrast-enhanced aorta and kidneys are not compared.
    """
    folder = real_data / "ct_totalsegmentator"
    real_hu = np.asarray(nib.as_closest_canonical(nib.load(folder / "example_ct.nii.gz")).dataobj)
    real_labels = np.asarray(nib.as_closest_canonical(nib.load(folder / "example_seg_fast_force_split.nii.gz")).dataobj)
    synth = ct.render_ct_case(ct.sample_ct_case(0, 0, 0))
    for labels, tolerance in (([5], 40), ([1], 40), (LUNG, 60), (VERTEBRAE, 200)):
        real = np.median(real_hu[np.isin(real_labels, labels)])
        ours = np.median(synth.hu[np.isin(synth.labels, labels)])
        assert abs(ours - real) < tolerance, (labels, ours, real)


def test_stored_orientations_keep_the_physical_content(tmp_path):
    spec = ct.sample_ct_case(0, 3, 3)
    spec.image_axcodes, spec.mask_axcodes = ("L", "P", "S"), ("L", "P", "I")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rec = ct._write_case(tmp_path, spec, load_catalog("synthetic_ct"), SMALL_SHAPE, (4.0, 4.0, 4.0))
    image, mask = nib.load(tmp_path / rec["image"]), nib.load(tmp_path / rec["anatomy_mask"])
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S") and nib.aff2axcodes(mask.affine) == ("L", "P", "I")
    rendered = ct.render_ct_case(spec, SMALL_SHAPE)
    assert np.array_equal(np.asarray(nib.as_closest_canonical(image).dataobj), rendered.hu)
    assert np.array_equal(np.asarray(nib.as_closest_canonical(mask).dataobj), rendered.labels)
    assert np.allclose(nib.as_closest_canonical(image).affine, rendered.affine)


def test_orientation_and_origin_vary_over_the_default_set():
    specs = [ct.sample_ct_case(0, i, p) for i, p, _ in ct.split_plan(320)]
    reoriented = np.mean([s.image_axcodes != ("R", "A", "S") for s in specs])
    flipped = np.mean([s.mask_axcodes != s.image_axcodes for s in specs])
    assert 0.12 < reoriented < 0.28 and 0.04 < flipped < 0.17
    assert len({tuple(np.round(s.grid_center_world, 1)) for s in specs}) == len(specs)


# ----------------------------------------------------------------------------- findings
def test_focal_lesion_changes_only_a_few_voxels_inside_its_organ():
    """Default shape, one case: the low-contrast liver lesion is small, inside the liver, CNR <= 3."""
    base = _spec(0)
    with_lesion = _with(base, "liver/hypodense lesion")
    plain = ct.render_ct_case(base, quantize=False)
    lesion = ct.render_ct_case(with_lesion, quantize=False)
    assert plain.hu.shape == ct.DEFAULT_SHAPE
    assert lesion.findings["liver"]["hypodense lesion"] == 1
    [les] = lesion.lesions
    diff = ct.render_ct_case(with_lesion, noise=False, blur=False).hu.astype(float) - ct.render_ct_case(
        base, noise=False, blur=False).hu.astype(float)
    changed = np.abs(diff) > 0.5
    assert changed.any() and np.array_equal(changed, les.footprint)
    assert np.all(lesion.labels[changed] == 5)
    span = [int(i.max() - i.min() + 1) for i in np.nonzero(changed)]
    assert max(span) <= 4
    # contrast-to-noise ratio in the final (blurred, noisy) image: the noise field is shared
    delta = (plain.hu - lesion.hu)[les.footprint].mean()
    assert 0.5 < delta / lesion.noise_sigma <= 3.0
    noise = lesion.hu - ct.render_ct_case(with_lesion, noise=False, quantize=False).hu
    assert abs(noise.std() / lesion.noise_sigma - 1) < 0.1
    # correlated, not white, noise
    assert np.corrcoef(noise[:-1].ravel(), noise[1:].ravel())[0, 1] > 0.2


@pytest.mark.parametrize("index", [1, 2])
def test_every_focal_finding_is_small_and_inside_its_organ(index):
    spec = _spec(index, **{f"{a}/{f}": 1 for a, f in ct.FOCAL_FINDINGS})
    rendered = ct.render_ct_case(spec, SMALL_SHAPE, noise=False)
    drawn = {(les.anatomy, les.finding) for les in rendered.lesions}
    assert drawn == set(ct.FOCAL_FINDINGS)
    for les in rendered.lesions:
        labels = ct.ANATOMY_LABELS[les.anatomy]
        assert np.isin(rendered.labels[les.footprint], labels).all()
        assert max(int(i.max() - i.min() + 1) for i in np.nonzero(les.footprint)) <= 4
        assert abs(les.mean_delta_hu) > 10.0, (les.anatomy, les.finding)


def test_at_least_a_third_of_finding_types_are_small_focal_ones():
    kinds = ct.FINDING_KINDS
    assert sum(k == "focal" for k in kinds.values()) >= len(kinds) / 3
    by_name = {f: k for (_, f), k in kinds.items()}
    assert sum(k == "focal" for k in by_name.values()) >= len(by_name | ct.STUDY_FINDING_KINDS) / 3
    assert {"focal", "diffuse", "enlargement", "fluid"} <= set(kinds.values())
    for anatomy in load_catalog("synthetic_ct").anatomies:
        assert len({kinds[(anatomy.name, f)] for f in anatomy.findings}) >= 2, anatomy.name
    # the low-contrast ones are drawn with a CNR of at most 3 at full conspicuity
    for anatomy, finding in ct.LOW_CONTRAST_FINDINGS:
        assert ct.sample_ct_case(0, 0, 0).params(anatomy, finding)["cnr"] <= 3.0


@pytest.mark.parametrize(
    "key, measure",
    [
        ("liver/hypodense lesion", "lesion"),
        ("vertebrae/sclerotic lesion", "lesion"),
        ("liver/steatosis", "liver_hu"),
        ("liver/hepatomegaly", "liver_volume"),
        ("lung/pleural effusion", "lung_hu"),
    ],
)
def test_conspicuity_scales_the_change(key, measure):
    base = _spec(4)

    def effect(conspicuity: float) -> float:
        plain = ct.render_ct_case(base, SMALL_SHAPE, noise=False, quantize=False)
        seen = ct.render_ct_case(_with(base, key, conspicuity=conspicuity), SMALL_SHAPE, noise=False, quantize=False)
        if measure == "lesion":
            [les] = seen.lesions
            return abs(float((seen.hu - plain.hu)[les.footprint].mean()))
        if measure == "liver_hu":
            return abs(float(np.median(seen.hu[seen.labels == 5]) - np.median(plain.hu[plain.labels == 5])))
        if measure == "liver_volume":
            return float((seen.labels == 5).sum() - (plain.labels == 5).sum())
        lung = np.isin(plain.labels, LUNG)
        return float(seen.hu[lung].mean() - plain.hu[lung].mean())

    full, low, none = effect(1.0), effect(0.3), effect(0.0)
    assert full > low > 0 and abs(none) < 1e-3


# ----------------------------------------------------------------------------- splits and labels
def test_patients_never_straddle_splits(small_set):
    for plan in (ct.split_plan(320), ct.split_plan(N_SMALL), ct.split_plan(3)):
        split_of: dict[int, str] = {}
        for _, patient, split in plan:
            assert split_of.setdefault(patient, split) == split
    assert Counter(s for *_, s in ct.split_plan(320)) == {"training": 180, "validation": 40, "test": 100}
    assert Counter(Counter(p for _, p, _ in ct.split_plan(320)).values()).keys() == {1, 2}
    assert Counter(s for *_, s in ct.split_plan(2)) == {"training": 2}
    seen: dict[str, str] = {}
    dl = load_datalist(small_set)
    for split in SPLITS:
        for rec in dl.records(split):
            assert seen.setdefault(rec["patient"], split) == split


def test_prevalence_gives_positives_and_negatives_in_the_test_split():
    catalog = load_catalog("synthetic_ct")
    test_cases = [(i, p) for i, p, s in ct.split_plan(320) if s == "test"]
    assert len(test_cases) == 100
    counts = Counter()
    for i, p in test_cases:
        spec = ct.sample_ct_case(0, i, p, catalog)
        counts.update((a, f) for a, fs in spec.findings.items() for f, v in fs.items() if v)
        counts.update(("study", f) for f, v in spec.study_findings.items() if v)
    for pair in catalog.finding_pairs() + [("study", f) for f in catalog.study_findings]:
        assert 12 <= counts[pair] <= 45, (pair, counts[pair])


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="colour"):
        ct.generate_ct_dataset(Path("unused"), n_cases=2, colour="red")
    with pytest.raises(ValueError, match="no training case"):
        ct.split_plan(4, n_test=2, n_val=2)
    with pytest.raises(ValueError, match="spacing"):
        ct.generate_ct_dataset(Path("unused"), n_cases=2, spacing=(4, 0, 4))
