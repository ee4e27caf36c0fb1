"""Segmentation transfer: UNETR-style decoder shapes, known-answer Dice, frozen / fine-tuned training,
learning on a toy task, and the synthetic CT lesion masks it is evaluated on."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

from anatomy_vlp_bundle.data.catalog import load_catalog
from anatomy_vlp_bundle.data.datalist import SPLITS, load_datalist
from anatomy_vlp_bundle.data.validate import validate_datalist
from anatomy_vlp_bundle.networks.anatomy_vit import AnatomyViT
from anatomy_vlp_bundle.synthetic import ct, synth_command
from anatomy_vlp_bundle.transfer.segmentation import UNETRSegmenter, segmentation_dice, skip_layers, train_segmenter

TINY_CT = (24, 20, 20)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads of small 3D convolutions wait on
    each other (tens of times slower when another job runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_encoder(spatial_dims: int = 3, size: int = 16, patch: int = 8, layers: int = 2, **kw) -> AnatomyViT:
    torch.manual_seed(0)
    cfg = dict(img_size=size, patch_size=patch, hidden_size=32, num_layers=layers, num_heads=2, num_anatomies=3,
               stem_channels=(4, 8))
    cfg.update(kw)
    return AnatomyViT(spatial_dims, **cfg)


def blobs(n: int, seed: int, spatial_dims: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images with one bright ball (radius 2.5-4) in noise and its mask ``(n, 1, *S)``."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * spatial_dims, indexing="ij"))
    images = 0.3 + 0.1 * torch.randn(n, 1, *(size,) * spatial_dims, generator=g)
    masks = torch.zeros(n, 1, *(size,) * spatial_dims, dtype=torch.uint8)
    for i in range(n):
        centre = 4 + torch.rand(spatial_dims, generator=g) * (size - 8)
        radius = 2.5 + 1.5 * float(torch.rand(1, generator=g))
        masks[i, 0] = ((coords - centre.view(spatial_dims, *[1] * spatial_dims)) ** 2).sum(0) <= radius**2
    return (images + 0.4 * masks).clamp(0, 1), masks


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize(
    "spatial_dims,size,patch,layers",
    [
        (3, (16, 16, 16), 8, 2),
        (3, (16, 24, 32), 8, 4),  # anisotropic grid (2, 3, 4)
        (3, (16, 16, 16), 4, 1),
        (3, (32, 16, 16), 16, 4),
        (2, (32, 32), 4, 4),
        (2, (32, 48), 8, 1),
        (2, (32, 32), 16, 2),
    ],
)
def test_output_shapes(spatial_dims, size, patch, layers):
    encoder = tiny_encoder(spatial_dims, size[0], patch, layers)
    model = UNETRSegmenter(encoder, out_channels=3, feature_size=4).eval()
    stages = {4: 2, 8: 3, 16: 4}[patch]
    assert model.num_stages == stages and len(model.decoders) == stages and len(model.token_skips) == stages - 1
    with torch.no_grad():
        out = model(torch.rand(2, 1, *size))
    assert out.shape == (2, 3, *size) and torch.isfinite(out).all()


def test_skip_layers_spread_over_the_depth():
    assert skip_layers(12, 4) == [2, 5, 8]  # UNETR: blocks 3, 6, 9 of 12 (1-based)
    assert skip_layers(4, 3) == [0, 2]
    assert skip_layers(1, 4) == [0, 0, 0]
    assert skip_layers(8, 1) == []


def test_tokens_return_to_their_grid_positions():
    """The decoder's token -> map reshape inverts the encoder's row-major flattening."""
    model = UNETRSegmenter(tiny_encoder(3, 16, 8), out_channels=1, feature_size=2)
    maps = torch.randn(2, 32, 2, 3, 4)
    tokens = maps.flatten(2).transpose(1, 2)  # as AnatomyViT flattens its token grid
    torch.testing.assert_close(model._to_grid(tokens, [2, 3, 4]), maps, rtol=0, atol=0)


def test_bad_patch_sizes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        UNETRSegmenter(tiny_encoder(3, 24, 6), out_channels=1)
    with pytest.raises(ValueError, match="power of two"):
        UNETRSegmenter(tiny_encoder(3, 16, (8, 8, 4)), out_channels=1)
    with pytest.raises(ValueError, match="channels"):
        segmentation_dice(UNETRSegmenter(tiny_encoder(), out_channels=2), torch.rand(1, 1, 16, 16, 16),
                          torch.zeros(1, 3, 16, 16, 16))


# ----------------------------------------------------------------------------- Dice (known answers)
class ThresholdModel(nn.Module):
    """Logits ``20 * (image - 0.5)``: the prediction is ``image > 0.5``, so the images spell it out."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return 20.0 * (image - 0.5)


def test_dice_perfect_and_disjoint():
    masks = torch.zeros(3, 2, 8, 8, 8, dtype=torch.uint8)
    masks[:, 0, 1:4, 1:4, 1:4] = 1
    masks[:, 1, 2:6, 3:5, 0:8] = 1
    perfect = segmentation_dice(ThresholdModel(), masks.float(), masks, batch_size=2)
    assert perfect["mean_dice"] == 1.0 and perfect["per_channel"] == {0: 1.0, 1: 1.0}
    shifted = torch.zeros_like(masks)
    shifted[:, 0, 5:8, 5:8, 5:8] = 1
    shifted[:, 1, 6:8, 0:2, 0:8] = 1
    disjoint = segmentation_dice(ThresholdModel(), shifted.float(), masks)
    assert disjoint["mean_dice"] == 0.0 and disjoint["per_channel"] == {0: 0.0, 1: 0.0}


def test_dice_empty_mask_convention_and_threshold():
    """Empty truth and prediction: 1. Empty truth, some prediction: 0. Truth, no prediction: 0.
    A probability of exactly 0.5 (logit 0) is not a positive prediction."""
    masks = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    masks[2, 0, 1, 1] = 1
    preds = torch.zeros(3, 1, 4, 4)
    preds[1, 0, 0, 0] = 1.0
    out = segmentation_dice(ThresholdModel(), preds, masks)
    assert out["per_case"] == [[1.0], [0.0], [0.0]]
    assert out["per_channel"][0] == pytest.approx(1 / 3)

    class Undecided(nn.Module):
        def forward(self, image):
            return torch.zeros_like(image)

    truth = torch.ones(1, 1, 4, 4, dtype=torch.uint8)
    assert segmentation_dice(Undecided(), torch.ones(1, 1, 4, 4), truth)["mean_dice"] == 0.0


def test_dice_partial_overlap_by_hand():
    masks = torch.zeros(2, 2, 6, 6, dtype=torch.uint8)
    preds = torch.zeros(2, 2, 6, 6)
    # case 0, channel 0: truth 4 pixels, prediction 6, overlap 3 -> 2 * 3 / 10 = 0.6
    masks[0, 0, 0, 0:4] = 1
    preds[0, 0, 0, 1:4] = 1
    preds[0, 0, 5, 0:3] = 1
    # case 0, channel 1: truth 5, prediction 3, overlap 1 -> 2 / 8 = 0.25 (overlaps channel 0: multi-label)
    masks[0, 1, 0, 0:5] = 1
    preds[0, 1, 0, 4] = 1
    preds[0, 1, 3, 0:2] = 1
    # case 1, channel 0: truth 2, prediction 2, overlap 2 -> 1; channel 1: both empty -> 1
    masks[1, 0, 2, 2:4] = 1
    preds[1, 0, 2, 2:4] = 1
    out = segmentation_dice(ThresholdModel(), preds, masks, batch_size=1)
    np.testing.assert_allclose(out["per_case"], [[0.6, 0.25], [1.0, 1.0]], rtol=1e-6)
    assert out["per_channel"][0] == pytest.approx(0.8) and out["per_channel"][1] == pytest.approx(0.625)
    assert out["mean_dice"] == pytest.approx(0.7125)


# ----------------------------------------------------------------------------- training
def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _decoder_params(model: UNETRSegmenter) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("encoder.")}


def test_frozen_encoder_stays_unchanged_and_decoder_learns():
    images, masks = blobs(6, 0)
    encoder = tiny_encoder(dropout=0.1)
    original = _params(encoder)
    model = UNETRSegmenter(encoder, out_channels=1, feature_size=4, freeze_encoder=True)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert model.training and not model.encoder.training  # no dropout in a frozen encoder
    decoder_before = _decoder_params(model)
    history = train_segmenter(model, images, masks, steps=3, batch_size=2, seed=0)
    assert len(history["loss"]) == 3 and all(np.isfinite(history["loss"]))
    for name, value in _params(model.encoder).items():
        assert torch.equal(value, original[name]), name
    for name, value in _decoder_params(model).items():
        assert not torch.equal(value, decoder_before[name]), name
    assert not model.training  # left in eval mode


def test_fine_tuning_changes_encoder_and_decoder_and_leaves_the_given_encoder_alone():
    images, masks = blobs(6, 0)
    encoder = tiny_encoder()
    original = _params(encoder)
    model = UNETRSegmenter(encoder, out_channels=1, feature_size=4)
    decoder_before = _decoder_params(model)
    train_segmenter(model, images, masks, steps=3, batch_size=2, seed=0)
    for name, value in _params(model.encoder).items():  # every encoder weight, queries included
        assert not torch.equal(value, original[name]), name
    for name, value in _decoder_params(model).items():
        assert not torch.equal(value, decoder_before[name]), name
    for name, value in _params(encoder).items():  # the segmenter trained a copy
        assert torch.equal(value, original[name]), name
    # encoder_lr sets the encoder's own learning rate: 0 keeps it, the decoder still learns
    still = UNETRSegmenter(encoder, out_channels=1, feature_size=4)
    train_segmenter(still, images, masks, steps=2, batch_size=2, encoder_lr=0.0)
    for name, value in _params(still.encoder).items():
        assert torch.equal(value, original[name]), name


def test_training_is_deterministic_given_the_seed():
    images, masks = blobs(6, 0)
    encoder = tiny_encoder(dropout=0.2)

    def run(seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = UNETRSegmenter(encoder, out_channels=1, feature_size=4)
        model.load_state_dict(first.state_dict())  # same start for every run
        return train_segmenter(model, images, masks, steps=3, batch_size=2, seed=seed)["loss"], _params(model)

    first = UNETRSegmenter(encoder, out_channels=1, feature_size=4)
    loss_a, params_a = run(0)
    loss_b, params_b = run(0)
    loss_c, _ = run(1)
    assert loss_a == loss_b and loss_a != loss_c
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)


@pytest.mark.parametrize("spatial_dims,size", [(3, 16), (2, 32)])
def test_a_short_training_learns_bright_blobs(spatial_dims, size):
    """16 training cases, 40 steps: held-out Dice rises far above the untrained network's."""
    train_images, train_masks = blobs(16, 0, spatial_dims, size)
    test_images, test_masks = blobs(8, 1, spatial_dims, size)
    model = UNETRSegmenter(tiny_encoder(spatial_dims, size, 8), out_channels=1, feature_size=8)
    before = segmentation_dice(model, test_images, test_masks)["mean_dice"]
    history = train_segmenter(model, train_images, train_masks, steps=40, batch_size=4, lr=3e-3, seed=0)
    after = segmentation_dice(model, test_images, test_masks)["mean_dice"]
    assert np.mean(history["loss"][-5:]) < np.mean(history["loss"][:5])
    assert after > 0.7 and after > before + 0.4, (before, after)


# ----------------------------------------------------------------------------- synthetic lesion masks
@pytest.fixture(scope="module")
def lesion_set(tmp_path_factory) -> Path:
    return ct.generate_ct_dataset(tmp_path_factory.mktemp("lesions") / "a", n_cases=6, shape=TINY_CT,
                                  lesion_masks=True, progress=False)


def _all_records(path: Path) -> list[tuple[str, dict]]:
    dl = load_datalist(path)
    return [(split, r) for split in SPLITS for r in dl.records(split, resolve=False)]


def test_lesion_files_datalist_and_catalog(lesion_set):
    root = lesion_set.parent
    lesion_list = root / "lesion_datalist.json"
    assert (root / "lesion_catalog.json").is_file() and lesion_list.is_file()
    catalog = load_catalog("lesion_catalog.json", base_dir=root)
    assert catalog.modality == "CT" and catalog.names == ["focal lesion"]
    assert catalog.anatomy("focal lesion").labels == (1,) and catalog.anatomy("focal lesion").findings == ()
    data = json.loads(lesion_list.read_text())
    assert (data["modality"], data["catalog"]) == ("CT", "lesion_catalog.json")
    main, lesions = _all_records(lesion_set), _all_records(lesion_list)
    assert [(s, r["id"], r["patient"], r["image"]) for s, r in main] == [(s, r["id"], r["patient"], r["image"]) for s, r in lesions]
    for _, rec in lesions:
        assert rec["anatomy_mask"] == f"lesions/{rec['id']}.nii.gz" and (root / rec["anatomy_mask"]).is_file()
    for path in (lesion_set, lesion_list):
        report = validate_datalist(path, deep=True)
        assert report.ok, [p.format() for p in report.errors]
    with_focal = sum(any(ct.FINDING_KINDS.get((a, f)) == "focal" and v for a, fs in r["findings"].items() for f, v in fs.items())
                     for _, r in main)
    assert with_focal >= 3  # the test below checks something
    assert validate_datalist(lesion_list, deep=True).anatomies_present == {"focal lesion": with_focal}


def test_lesion_voxels_exactly_where_focal_findings_are(lesion_set):
    root = lesion_set.parent
    for _, rec in _all_records(lesion_set):
        lesion_img = nib.load(root / "lesions" / f"{rec['id']}.nii.gz")
        mask_img = nib.load(root / rec["anatomy_mask"])
        assert lesion_img.get_data_dtype() == np.uint8
        assert np.array_equal(lesion_img.affine, mask_img.affine) and lesion_img.shape == mask_img.shape
        lesion = np.asarray(lesion_img.dataobj)
        labels = np.asarray(mask_img.dataobj)
        focal = [a for a, fs in rec["findings"].items() for f, v in fs.items() if v and ct.FINDING_KINDS[(a, f)] == "focal"]
        assert set(np.unique(lesion).tolist()) <= {0, 1}
        assert lesion.any() == bool(focal), rec["id"]
        allowed = [v for a in focal for v in ct.ANATOMY_LABELS[a]]
        assert np.isin(labels[lesion == 1], allowed).all(), rec["id"]  # inside the organs that hold them


def test_lesion_mask_is_stored_like_the_label_map(tmp_path):
    """A case whose label map is stored flipped: the lesion file is stored the same way and holds the
    union of the rendered footprints."""
    spec = ct.sample_ct_case(0, 3, 3)
    for anatomy, finding in ct.FOCAL_FINDINGS:
        spec.findings[anatomy][finding] = 1
    spec.image_axcodes, spec.mask_axcodes = ("L", "P", "S"), ("L", "P", "I")
    for sub in ("images", "masks", "lesions"):
        (tmp_path / sub).mkdir()
    rec = ct._write_case(tmp_path, spec, load_catalog("synthetic_ct"), TINY_CT, (4.0, 4.0, 4.0), lesion_masks=True)
    lesion_img, mask_img = nib.load(tmp_path / "lesions" / f"{rec['id']}.nii.gz"), nib.load(tmp_path / rec["anatomy_mask"])
    assert nib.aff2axcodes(lesion_img.affine) == ("L", "P", "I") and np.array_equal(lesion_img.affine, mask_img.affine)
    rendered = ct.render_ct_case(spec, TINY_CT)
    union = np.zeros(TINY_CT, dtype=bool)
    for les in rendered.lesions:
        union |= les.footprint
    assert len(rendered.lesions) >= 5 and union.any()
    assert np.array_equal(np.asarray(nib.as_closest_canonical(lesion_img).dataobj) == 1, union)


def test_default_output_is_unchanged_by_the_option(lesion_set, tmp_path):
    plain = ct.generate_ct_dataset(tmp_path / "plain", n_cases=6, shape=TINY_CT, progress=False)
    assert not (plain.parent / "lesions").exists() and not (plain.parent / "lesion_datalist.json").exists()
    assert not (plain.parent / "lesion_catalog.json").exists()
    assert plain.read_bytes() == lesion_set.read_bytes()
    for _, rec in _all_records(plain):
        for key in ("image", "anatomy_mask"):
            assert (plain.parent / rec[key]).read_bytes() == (lesion_set.parent / rec[key]).read_bytes()


def test_command_line_text_flag(tmp_path):
    path = Path(synth_command(modality="ct", out=str(tmp_path / "cli"), n=2, shape=TINY_CT, progress=False, lesion_masks="true"))
    assert (path.parent / "lesion_datalist.json").is_file() and len(list((path.parent / "lesions").iterdir())) == 2
    off = Path(synth_command(modality="ct", out=str(tmp_path / "off"), n=2, shape=TINY_CT, progress=False, lesion_masks="false"))
    assert not (off.parent / "lesions").exists()
    with pytest.raises(ValueError, match="lesion_masks"):
        ct.generate_ct_dataset(tmp_path / "bad", n_cases=2, shape=TINY_CT, progress=False, lesion_masks="maybe")
    with pytest.raises(TypeError, match="lesion_masks"):  # the list of options names it
        ct.generate_ct_dataset(tmp_path / "bad", n_cases=2, lesion_mask=True)
