"""The bench: its measuring helpers give known answers, both attention paths agree, and the quick
bench runs end to end into a Markdown report with every section and its plots."""

from __future__ import annotations

import json
import sys
import time
import warnings

import pytest
import torch

from anatomy_vlp_bundle.bench import GROUPS, bench_command
from anatomy_vlp_bundle.bench.probe import peak_rss_bytes, run_child
from anatomy_vlp_bundle.bench.timing import Timing, count_flops, fit_power_law, interleaved, ratio, utilisation
from anatomy_vlp_bundle.data.datalist import load_datalist
from anatomy_vlp_bundle.engines.checkpoint import CheckpointExtras
from anatomy_vlp_bundle.networks.anatomy_vit import AnatomyViT, masks_to_token_mask
from anatomy_vlp_bundle.synthetic import ensure_synthetic_dataset

from test_deploy_wrapper import trained_like_model

SECTION_TITLES = (
    "Training step: full model against MONAI ViT",
    "Attention: SDPA against matmul-softmax",
    "Model FLOPs utilisation",
    "Memory of a training step",
    "Scaling with input size",
    "Data pipeline",
    "Text encoding",
    "Inference",
)


# ------------------------------------------------------------------------------------------ helpers
def test_flop_counter_counts_a_linear_layer_and_a_matmul():
    n, k, m = 8, 32, 16
    layer = torch.nn.Linear(k, m, bias=False)
    x = torch.randn(n, k)

    def linear_step():
        layer(x).sum().backward()

    # forward 2nkm; backward: the weight's gradient only (x needs none), another 2nkm
    assert count_flops(linear_step) == 2 * (2 * n * k * m)
    x.requires_grad_(True)
    assert count_flops(linear_step) == 3 * (2 * n * k * m)  # + the input's gradient
    a, b = torch.randn(n, k), torch.randn(k, m)
    assert count_flops(lambda: a @ b) == 2 * n * k * m


def test_power_law_fit_ratio_and_utilisation_give_known_answers():
    n = [64, 216, 512, 1000]
    exponent, coefficient = fit_power_law(n, [3.0 * v**2 for v in n])
    assert exponent == pytest.approx(2.0) and coefficient == pytest.approx(3.0)
    exponent, _ = fit_power_law(n, [0.5 * v**1.25 for v in n])
    assert exponent == pytest.approx(1.25)
    with pytest.raises(ValueError):
        fit_power_law([1.0], [1.0])
    assert ratio(Timing((2.0, 3.0, 100.0)), Timing((1.0, 1.0, 2.0))) == pytest.approx(3.0)  # medians 3 and 1
    assert ratio(1.5, 1.0) == pytest.approx(1.5)
    assert utilisation(flops=50e9, seconds=0.5, peak_flops_per_s=200e9) == pytest.approx(0.5)
    t = Timing((1.0, 2.0, 4.0))
    assert (t.median, t.low, t.high, t.spread) == (2.0, 1.0, 4.0, 1.5)


def test_saved_activation_bytes_counts_what_backward_keeps_once_and_checkpoint_inputs():
    from anatomy_vlp_bundle.bench.memory import saved_activation_bytes
    from anatomy_vlp_bundle.networks import vlp_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    # first Linear keeps its input x (5 x 8 floats); ReLU keeps its output, which the second Linear
    # keeps too (one storage, 5 x 16 floats); the weights are not activations
    plain = saved_activation_bytes(lambda: net(x).sum().backward(), net.parameters())
    assert plain == (5 * 8 + 5 * 16) * 4
    # a checkpointed region keeps only its input for the recomputation
    ckpt = saved_activation_bytes(lambda: vlp_model.checkpoint(net, x, use_reentrant=False).sum().backward(), net.parameters())
    assert ckpt == 5 * 8 * 4
    assert vlp_model.checkpoint is torch.utils.checkpoint.checkpoint  # restored afterwards


def test_interleaved_warms_up_then_alternates_the_order():
    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B | B A | A B
    assert {name: len(t.samples) for name, t in timings.items()} == {"a": 3, "b": 3}


def test_child_peak_memory_is_its_own_not_the_parents():
    """Linux carries a parent's peak RSS into a child's ru_maxrss over fork and exec: run_child must not."""
    ballast = torch.ones(100_000_000)  # 400 MB in this process
    ballast += 1
    assert peak_rss_bytes() > 400e6
    run = run_child([sys.executable, "-c", "print('hello')"])
    assert run.returncode == 0 and run.stdout.strip() == "hello"
    assert run.max_rss_bytes < 100e6 and run.seconds > 0


# ------------------------------------------------------------------------------------------ attention
def _vit_pair(**kwargs):
    cfg = dict(img_size=(32, 32, 24), patch_size=8, hidden_size=24, num_layers=2, num_heads=3, mlp_dim=32,
               num_anatomies=4, stem_channels=(4, 8))
    cfg.update(kwargs)
    torch.manual_seed(0)
    sdpa = AnatomyViT(3, attention="sdpa", **cfg)
    plain = AnatomyViT(3, attention="math", **cfg)
    plain.load_state_dict(sdpa.state_dict())
    return sdpa, plain


@pytest.mark.parametrize("masked", [False, True])
def test_math_and_sdpa_attention_give_the_same_outputs_and_gradients(masked):
    sdpa, plain = _vit_pair()
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, 32, 32, 24, generator=g)
    region = None
    if masked:  # mask-guided attention: each query sees [CLS], itself and its region's tokens
        region = masks_to_token_mask(torch.rand(2, 4, 32, 32, 24, generator=g) > 0.97, 8)
    sdpa.eval(), plain.eval()
    with torch.no_grad():
        a, b = sdpa(image, region), plain(image, region)
    for key in ("cls", "queries", "patch_tokens"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)

    weights = torch.randn(a["patch_tokens"].shape, generator=g)
    for model in (sdpa, plain):
        model.train()
        out = model(image, region)
        ((out["patch_tokens"] * weights).sum() + out["queries"].pow(2).sum()).backward()
    grads = dict(plain.named_parameters())
    for name, p in sdpa.named_parameters():
        # equal up to float32 summation order, relative to the gradient's own scale
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


def test_math_attention_scripts_and_unknown_attention_is_refused():
    _, plain = _vit_pair()
    plain.eval()
    image = torch.rand(1, 1, 32, 32, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that TorchScript is deprecated
        scripted = torch.jit.script(plain)
    torch.testing.assert_close(scripted(image)["cls"], plain(image)["cls"])
    with pytest.raises(ValueError, match="attention"):
        AnatomyViT(3, img_size=32, patch_size=8, num_anatomies=2, attention="flash")


def test_auto_attention_takes_math_under_cpu_bf16_autocast_and_sdpa_otherwise(monkeypatch):
    from anatomy_vlp_bundle.networks import anatomy_vit

    sdpa, _ = _vit_pair()
    auto, _ = _vit_pair()
    auto.load_state_dict(sdpa.state_dict())
    assert AnatomyViT(3, img_size=32, patch_size=8, num_anatomies=2).blocks[0].attn.attention == "auto"  # the default
    for m in (sdpa, auto):
        m.blocks[0].attn.attention = m.blocks[1].attn.attention = "sdpa" if m is sdpa else "auto"
        m.eval()
    calls = []
    monkeypatch.setattr(anatomy_vit._SelfAttention, "_math_attention",
                        lambda self, q, k, v, mask, p: calls.append(q.dtype) or torch.zeros_like(v))
    image = torch.rand(1, 1, 32, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(auto(image)["cls"], sdpa(image)["cls"])  # fp32: SDPA
        assert calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto(image)  # CPU bf16 autocast: the math path, in bf16
            assert calls == [torch.bfloat16] * 2
            sdpa(image)
            assert len(calls) == 2  # an explicit "sdpa" stays SDPA
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(auto)  # scripted: SDPA (the autocast query is eager only)
    torch.testing.assert_close(scripted(image)["cls"], sdpa(image)["cls"])


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A small synthetic CT dataset and a tiny trained-like checkpoint (the repo's are not in a fresh clone)."""
    root = tmp_path_factory.mktemp("bench")
    grid = [40, 32, 32]
    ensure_synthetic_dataset(str(root / "data"), "ct", n=16, shape=grid, spacing=[8.0, 8.0, 8.0], progress=False)
    catalog = load_datalist(root / "data").catalog()
    model = trained_like_model(3, catalog=catalog.to_dict(), img_size=grid)
    extras = CheckpointExtras(model, "0.1.0", {"spacing": [8.0, 8.0, 8.0], "roi_size": grid}).state_dict()
    torch.save({"model": model.state_dict(), "extras": extras}, root / "model.pt")
    return root


def test_bench_config_evaluates_network_expressions_as_the_bundle_does(tiny_bundle):
    # network_def entries that are expressions (the CT windows given in HU) come out as the values the
    # training config builds, not as the expression strings
    from anatomy_vlp_bundle.bench.workloads import load_bench_config
    from monai.bundle import ConfigParser

    cfg = load_bench_config("configs/train.yaml", tiny_bundle / "data")
    parser = ConfigParser()
    parser.read_config("configs/train.yaml")
    assert cfg.network["input_windows"] == parser.get_parsed_content("network_def#input_windows") == [[0.425, 0.625]]
    assert cfg.network["segmentation_decoder"] == "deep" and cfg.network["img_size"] == [80, 64, 64]


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in the bench's child processes: on shared cores, two OpenMP threads stall
    each other whenever one is descheduled (steps then take many times longer); this test checks the
    instrument, not the numbers."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_quick_bench_writes_every_section_with_its_plots(tiny_bundle, tmp_path, capsys, one_thread):
    out, plots = tmp_path / "BENCHMARKS.md", tmp_path / "bench"
    start = time.perf_counter()
    bench_command(quick=True, out=str(out), plots_dir=str(plots), repeats=1, warmup=0, dataset_dir=str(tiny_bundle / "data"),
                  checkpoint=str(tiny_bundle / "model.pt"))
    took = time.perf_counter() - start
    text = out.read_text()
    for title in SECTION_TITLES:
        assert f"## {title}" in text, title
    assert "failed" not in text and "Quick run" in text
    for fact in ("CPU", "torch", "MONAI", "torch threads", "date"):
        assert f"| {fact}" in text
    for plot in ("step_times.png", "scaling.png"):
        assert (plots / plot).stat().st_size > 0 and f"(bench/{plot})" in text
    results = json.loads((plots / "results.json").read_text())
    assert set(results["sections"]) == set(GROUPS) and not any(s["error"] for s in results["sections"].values())
    targets = [t for s in results["sections"].values() for t in s["targets"]]
    # a quick run on tiny inputs judges no target, but still shows what it measured
    assert len(targets) >= 9 and {t["status"] for t in targets} == {"not evaluated"} and all(t["measured"] for t in targets)
    assert "**not evaluated**" in text and "**reached**" not in text
    # the allocator comparison (two fresh processes) and the process's own setting
    assert "| glibc as it comes |" in text and "| `cpu_allocator: true` (runtime.py) |" in text
    assert "| glibc allocator (anatomy_vlp_bundle/runtime.py) |" in text and "| full model (bf16 autocast) |" in text
    model = results["sections"]["model"]["values"]
    assert model["full_to_vit"] > 0 and results["sections"]["mfu"]["values"]["peak_fp32"] > 0
    assert "| target | goal | measured | status |" in capsys.readouterr().out
    print(f"quick bench: {took:.0f} s")
