"""Process settings: the glibc allocator thresholds and the automatic precision policy."""

from __future__ import annotations

import platform

import pytest
import torch

from anatomy_vlp_bundle import runtime
from anatomy_vlp_bundle.engines.iteration import resolve_amp

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(runtime, "_state", {"applied": False, "mmap_threshold": None, "trim_threshold": None, "reason": "not called"})
    monkeypatch.delenv(runtime.ENV_SWITCH, raising=False)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_allocator_thresholds_are_set_once_and_reported(fresh_state):
    assert runtime.tune_cpu_allocator(True) is True
    state = runtime.allocator_state()
    assert state["applied"] and state["mmap_threshold"] == runtime.DEFAULT_MMAP_THRESHOLD
    assert state["trim_threshold"] == runtime.DEFAULT_TRIM_THRESHOLD and state["reason"] == "set"
    assert runtime.tune_cpu_allocator(True) is True  # idempotent


@pytest.mark.parametrize("switch", [False, "false", "off", "default", "0"])
def test_allocator_left_alone_when_switched_off(fresh_state, switch):
    assert runtime.tune_cpu_allocator(switch) is False
    assert runtime.allocator_state()["applied"] is False
    assert runtime.allocator_state()["reason"] == "disabled by the caller"


def test_environment_switch_wins_over_the_config(fresh_state, monkeypatch):
    monkeypatch.setenv(runtime.ENV_SWITCH, "default")
    assert runtime.tune_cpu_allocator(True) is False
    assert runtime.allocator_state()["reason"] == f"{runtime.ENV_SWITCH}=default"


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": 0}, {"trim_threshold": 1 << 31}, {"mmap_threshold": -5}])
def test_allocator_thresholds_outside_a_c_int_are_refused(fresh_state, kwargs):
    with pytest.raises(ValueError, match="C int"):
        runtime.tune_cpu_allocator(True, **kwargs)


def test_not_glibc_is_a_no_op(fresh_state, monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert runtime.tune_cpu_allocator(True) is False
    assert "not glibc" in runtime.allocator_state()["reason"]


def test_amp_auto_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    assert resolve_amp("auto", "cuda") is True
    assert resolve_amp("auto", "cpu", "float16") is False  # CPU float16 autocast: slower than fp32
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: True)
    assert resolve_amp("auto", "cpu") is True
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: False)
    assert resolve_amp("auto", "cpu", torch.bfloat16) is False
    assert resolve_amp(True, "cpu") is True and resolve_amp(False, "cuda") is False
    with pytest.raises(ValueError, match="auto"):
        resolve_amp("sometimes", "cpu")
