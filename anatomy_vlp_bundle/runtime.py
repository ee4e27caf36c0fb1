"""Process-level CPU settings for training, evaluation and inference.

``tune_cpu_allocator()``: keep freed large blocks in the process instead of handing them back.

Why (measured with ``python -m anatomy_vlp_bundle bench``, 2 cores, the default CT training step,
batch 4 of 80 x 64 x 64): glibc serves every allocation above its mmap threshold (at most 32 MB
with its dynamic threshold) with a fresh ``mmap`` and returns it with ``munmap`` when freed. The
step's full-resolution activations (a ``4 x 96 x 40 x 32 x 32`` fp32 map is 63 MB) are allocated
and freed every step, so each step faulted in about 130,000 fresh zeroed pages: 0.66 s of kernel
time per step next to 1.6 s of user time, a median step of 1.32 s that varied from 0.90 to 2.8 s.
With the mmap threshold at 1 GiB and trimming off, the same step took 0.82 s (0.75 - 0.87 s) with
7 ms of kernel time. PyTorch's CPU tuning guide reaches the same by preloading jemalloc or
tcmalloc; this does it from inside the process, so ``python -m monai.bundle run`` gets it too.

The price: memory freed by the process stays mapped to it until the process ends (the peak
resident set is unchanged, the high-water mark is simply not given back between steps). Turned
off by ``cpu_allocator: false`` in the configs, or ``ANATOMY_VLP_ALLOCATOR=default`` in the
environment. On anything but glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
from typing import Any

__all__ = ["tune_cpu_allocator", "allocator_state", "cpu_bf16_native", "ENV_SWITCH"]

logger = logging.getLogger(__name__)

#: environment switch: ``default`` leaves glibc's allocator as it is, whatever the config says
ENV_SWITCH = "ANATOMY_VLP_ALLOCATOR"
#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks below this are served from the heap and reused (1 GiB: every activation of the default models)
DEFAULT_MMAP_THRESHOLD = 1 << 30
#: freed memory at the top of the heap is given back only beyond this (2 GiB: in practice never;
#: mallopt takes a C int)
DEFAULT_TRIM_THRESHOLD = (1 << 31) - 1

_state: dict[str, Any] = {"applied": False, "mmap_threshold": None, "trim_threshold": None, "reason": "not called"}


@functools.lru_cache(maxsize=None)
def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 matmuls and convolutions natively (oneDNN's check: AVX512-BF16 or
    AMX); without it bf16 autocast is emulated and slower than fp32."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def allocator_state() -> dict[str, Any]:
    """What :func:`tune_cpu_allocator` did in this process (``applied``, thresholds, ``reason``)."""
    return dict(_state)


def _libc() -> Any:
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name)


def tune_cpu_allocator(
    enabled: bool | str = True,
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).

    Args:
        enabled: False (or ``"false"`` / ``"off"`` / ``"default"``) does nothing; the environment
            variable ``ANATOMY_VLP_ALLOCATOR=default`` wins over True.
        mmap_threshold: allocations at least this large get their own mapping (bytes).
        trim_threshold: free memory at the heap's top beyond this is returned to the system (bytes).

    Returns:
        True when the thresholds are set (now or by an earlier call), False otherwise (the reason is
        logged at debug level and kept in :func:`allocator_state`).
    """
    if isinstance(enabled, str):
        enabled = enabled.strip().lower() not in ("0", "false", "off", "no", "default")
    if os.environ.get(ENV_SWITCH, "").strip().lower() == "default":
        enabled = False
        _state["reason"] = f"{ENV_SWITCH}=default"
    elif not enabled:
        _state["reason"] = "disabled by the caller"
    if not enabled:
        return bool(_state["applied"])
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 < int(value) < (1 << 31):
            raise ValueError(f"tune_cpu_allocator: {name} must be in [1, 2**31 - 1] bytes (a C int), got {value}")
    if _state["applied"] and _state["mmap_threshold"] == int(mmap_threshold) and _state["trim_threshold"] == int(trim_threshold):
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state["reason"] = f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
        logger.debug("tune_cpu_allocator: %s", _state["reason"])
        return False
    try:
        libc = _libc()
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(int(mmap_threshold))) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(int(trim_threshold))) == 1 and ok
    except (OSError, AttributeError) as err:  # no C library or no mallopt
        _state["reason"] = f"mallopt unavailable: {err}"
        logger.debug("tune_cpu_allocator: %s", _state["reason"])
        return False
    if not ok:
        _state["reason"] = "mallopt refused the thresholds"
        return False
    _state.update(applied=True, mmap_threshold=int(mmap_threshold), trim_threshold=int(trim_threshold), reason="set")
    logger.debug("tune_cpu_allocator: mmap threshold %d, trim threshold %d", mmap_threshold, trim_threshold)
    return True
