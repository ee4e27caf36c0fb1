"""scripts/stats_probe.py: mirrored regions, labels, the logistic probe and the band-pass features."""

import numpy as np
import pytest
import torch

from anatomy_vlp_bundle.data.catalog import load_catalog


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("stats_probe")


def test_mirror_index_pairs_left_and_right(probe):
    names = ["right lung", "left lung", "heart", "right atrium"]
    assert probe.mirror_index(names) == [1, 0, 2, 3]  # no left atrium: itself


def test_labels_of_marks_unknown_and_padding(probe):
    cat = load_catalog("synthetic_ct")
    first = cat.anatomies[0]
    y = probe.labels_of({first.name: {first.findings[0]: 1, first.findings[1]: -1}}, cat)
    assert y.shape == (cat.num_anatomies, cat.max_findings)
    assert y[0, 0] == 1 and y[0, 1] == -1 and (y[1:] == -1).all()


def test_logistic_probe_separates_an_informative_feature_only(probe):
    rng = np.random.default_rng(0)
    y_tr, y_te = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    informative = lambda y: np.stack([y + 0.3 * rng.normal(size=y.shape), rng.normal(size=y.shape)], 1)  # noqa: E731
    assert probe.logistic_auc(informative(y_tr), y_tr, informative(y_te), y_te, 0.1) > 0.95
    noise = lambda y: rng.normal(size=(len(y), 2))  # noqa: E731
    assert abs(probe.logistic_auc(noise(y_tr), y_tr, noise(y_te), y_te, 0.1) - 0.5) < 0.12


def test_bandpass_features_see_a_blob_inside_the_region(probe):
    x = torch.zeros(32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :, :16] = True
    masks[1, :, 16:] = True
    blob = x.clone()
    blob[8:12, 4:8] = 1.0  # in region 0
    plain, hit = probe.bandpass_features(x + 1e-3 * torch.randn(32, 32), masks), probe.bandpass_features(blob, masks)
    assert plain.shape == hit.shape == (2, 5 * len(probe.BANDPASS_SIGMAS))
    assert hit[0, 1] > 3 * hit[1, 1].abs()  # region 0's largest band-pass response stands out


def test_window_images_map_each_window_to_the_unit_range(probe):
    # the backbone's own windows, as the model's statistics read them
    from anatomy_vlp_bundle.networks.vlp_model import AnatomyVLPModel

    def backbone(windows):
        return AnatomyVLPModel(
            "synthetic_ct", img_size=(16, 16, 16), patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
            embed_dim=8, stem_channels=(4, 8), input_windows=windows,
        ).backbone

    image = torch.tensor([0.0, 0.425, 0.525, 0.625, 1.0]).view(1, 1, 5, 1, 1)
    (win,) = probe.window_images(image, backbone([[0.425, 0.625]]))
    torch.testing.assert_close(win, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]).view(1, 1, 5, 1, 1))
    assert probe.window_images(image, backbone([])) == [] and probe.window_images(image, None) == []


def test_cache_is_written_once_and_read_instead_of_extracting(probe, tmp_path, monkeypatch, capsys):
    # features extracted once, stored as plain arrays, and read back by the next run
    rng = np.random.default_rng(0)
    cat = load_catalog("synthetic_ct")
    m, f = cat.num_anatomies, cat.max_findings

    def fake_extract(datalist, split, catalog, model, thresholds, bins, focal, structure):
        calls.append(split)
        assert structure == []  # the structure views are 2D only: none for a CT catalog
        n = 40
        y = np.full((n, m, f), -1)
        y[:, 0, 0] = np.arange(n) % 2
        stats = rng.normal(size=(n, m, 3)).astype(np.float32)
        stats[:, 0, 0] += 3 * y[:, 0, 0]
        return {"mask/stats": stats, "mask/bandpass": rng.normal(size=(n, m, 2)), "mask/window": np.zeros((n, m, 0)),
                "mask/structure": np.zeros((n, m, 0)), "y": y}

    calls = []
    monkeypatch.setattr(probe, "extract", fake_extract)
    monkeypatch.setattr(probe, "load_datalist", lambda path: type("D", (), {"catalog": lambda self: cat})())
    cache = tmp_path / "probe" / "ct.npz"
    probe.main("unused.json", cache=str(cache))
    first = capsys.readouterr().out
    assert calls == ["training", "test"] and cache.is_file()
    with np.load(cache) as z:  # arrays only: loads without pickle
        assert {"training:y", "test:mask/stats"} <= set(z.files)
    probe.main("unused.json", cache=str(cache))
    second = capsys.readouterr().out
    assert calls == ["training", "test"]  # not extracted again
    assert f"features from {cache}" in second
    table = [line for line in first.splitlines() if line.startswith("| stats |")]
    assert table and table == [line for line in second.splitlines() if line.startswith("| stats |")]
    assert float(table[0].split("|")[2].split()[0]) > 0.9  # the informative pair, from cached features
    # a cache extracted for another datalist is refused, naming the file, and nothing is extracted
    with pytest.raises(ValueError, match=r"feature cache .*ct\.npz.*other\.json"):
        probe.main("other.json", cache=str(cache))
    assert calls == ["training", "test"]
