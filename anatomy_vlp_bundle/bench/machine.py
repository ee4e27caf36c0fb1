"""What the numbers were measured on: machine facts and the measured matmul peak."""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

import torch

__all__ = ["machine_facts", "matmul_peak", "bf16_supported", "load_average", "usable_cores", "busy_warning"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def bf16_supported() -> bool:
    """Whether this CPU runs bf16 matmuls natively (``runtime.cpu_bf16_native``)."""
    from ..runtime import cpu_bf16_native

    return cpu_bf16_native()


def load_average() -> str:
    """The 1/5/15-minute load averages (other jobs on the machine distort every timing)."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def busy_warning() -> str:
    """A warning when other processes keep the cores busy (1-minute load average at least half the
    usable cores), else ``""``: torch's OpenMP threads then wait for each other at every parallel
    region, which can slow small steps many times over."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = usable_cores()
    if load < 0.5 * cores:
        return ""
    return (f"the 1-minute load average was {load:.2f} on {cores} usable cores when the bench started: other "
            "processes were competing for the cores, and torch's threads stall each other when one of them is "
            "descheduled. Absolute times and ratios of this run are unreliable; rerun on an idle machine.")


def machine_facts() -> dict[str, str]:
    """CPU model, cores, memory, threads, library versions, date: the report's "Machine" table."""
    import monai

    memory = _memory_total_gb()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": _cpu_model(),
        "logical cores (usable)": f"{os.cpu_count()} ({usable_cores()})",
        "memory": f"{memory:.1f} GB" if memory is not None else "unknown",
        "torch threads (intra-op / inter-op)": f"{torch.get_num_threads()} / {torch.get_num_interop_threads()}",
        "CPU capability (torch)": str(torch.backends.cpu.get_cpu_capability()),
        "native bf16 matmul": "yes" if bf16_supported() else "no",
        "GPU": f"{gpu} (every figure is measured on the CPU)",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "MONAI": monai.__version__,
        "load average at start (1 / 5 / 15 min)": load_average(),
    }


def matmul_peak(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """The machine's practical matmul peak: the best FLOP/s of ``repeats`` ``(size x size) @ (size x size)``
    products (``2 * size**3`` FLOPs each) after one warm-up, with the default threads."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
