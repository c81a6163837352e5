"""What this machine offers a training run: a CUDA device, and bf16 matrix units (what `--precision auto`
and `--jobs auto` are resolved from).

bf16 autocast pays where the hardware multiplies bf16 natively: CUDA GPUs that support it, and x86 CPUs
with AMX-BF16 or AVX512-BF16 (experiments/BENCHMARKS.md: model3 trains 2.0-2.9x faster with AMX, 1.4-1.6x
on an AVX512-BF16 CPU without AMX, with the same accuracy; model1 1.0-1.4x). Elsewhere torch emulates bf16
by converting, which is slower than fp32, so `auto` stays fp32 there and an explicit bf16 is refused with
the reason.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Optional

# x86 CPU flags (Linux /proc/cpuinfo names) of native bf16 matrix arithmetic. torch has no public API that
# says so (torch.backends.cpu.get_cpu_capability() stops at "AVX512"), hence the flags.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> Optional[frozenset]:
    """The CPU's feature flags, or None where they cannot be read (not Linux)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return frozenset(value.split())
    return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def bf16_units(device: str) -> tuple:
    """(True, what) where `device` multiplies bf16 natively; (False, why not) where it does not; (None, why)
    where it cannot be told (a CPU whose flags cannot be read)."""
    if device == "cuda":
        return (True, "CUDA bf16") if cuda_bf16() else (False, "this GPU has no native bf16 support")
    flags = cpu_flags()
    if flags is None:
        return None, "this CPU's feature flags cannot be read"
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU with {found[0].upper().replace('_', '-')}"
    return False, "this CPU has neither AMX-BF16 nor AVX512-BF16: torch would emulate bf16, slower than fp32"


def resolve_precision(precision: str, device: str) -> str:
    """`auto` -> bf16 where the device has bf16 units, else fp32. An explicit bf16 on hardware known to
    lack them raises ValueError with the reason."""
    has, why = bf16_units(device)
    if precision == "auto":
        return "bf16" if has else "fp32"
    if precision == "bf16" and has is False:
        raise ValueError(f"precision bf16 on {device}: {why}; use fp32 (or auto)")
    return precision


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in microseconds, or "max ..."


def usable_cpus() -> int:
    """The CPUs this process may use, not the host's: its affinity (`taskset`, a container's cpuset) and the
    cgroup's CPU quota (`docker run --cpus 2` on a 64-core host is 2), whichever is smaller."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+: the affinity, portably
        count = os.process_cpu_count() or 1
    elif hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0)) or 1
    else:
        count = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):  # no cgroup v2 here, or an unexpected format: no quota to honour
        return count
    if quota == "max":
        return count
    return max(1, min(count, math.ceil(int(quota) / int(period))))


def cuda_devices() -> list:
    """The GPUs this process may use, as the ids `CUDA_VISIBLE_DEVICES` takes: the ones it lists when set
    (a scheduler's share of the host), else every device torch sees."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def default_jobs(device: str, points: int, subset: int) -> int:
    """`--jobs auto`: on a CPU, one single-threaded worker per core (at most one per point) for full-data
    runs, which measured faster than one process using every core (experiments/BENCHMARKS.md); one process
    for smoke runs (`--subset`), whose work is smaller than a worker's start-up (imports, data: seconds).
    On CUDA, one worker per visible GPU (each pinned to its own: `worker_gpus`); more workers on one GPU are
    unmeasured (scripts/gpu-check.sh measures them)."""
    if subset:
        return 1
    if device == "cuda":
        return max(1, min(len(cuda_devices()), points))
    return max(1, min(usable_cpus(), points))


def worker_gpus(device: str, jobs: int) -> list:
    """The GPU each of `jobs` workers is pinned to (its CUDA_VISIBLE_DEVICES), round robin over the visible
    ones; empty on a CPU, or with one GPU (nothing to choose)."""
    gpus = cuda_devices() if device == "cuda" else []
    return [gpus[i % len(gpus)] for i in range(jobs)] if len(gpus) > 1 else []


def describe(device: str) -> str:
    """What `auto` resolves to here, for `fmnist data` and `--version`."""
    has, why = bf16_units(device)
    precision = "bf16" if has else "fp32"
    return f"device auto -> {device}; precision auto -> {precision} ({why})"
