"""How many CPU threads PyTorch may use: all free cores, not cores another process is busy on.

PyTorch's CPU kernels run on an OpenMP pool sized to the machine's cores. When another
process keeps one of those cores busy, every parallel region waits for the thread that shares
a core with it, and a run slows down 3-10x (docs/benchmarks.md; up to 60x in a probe). The
``auto`` choice therefore counts the cores this process may use and leaves out those that
other processes kept busy over a short sample.
"""

from __future__ import annotations

import math
import os
import time

import torch

from .errors import OptionError

#: Environment variable read by ``p2p-run --threads`` when the option is not given.
THREADS_ENV = "P2P_THREADS"

#: Seconds of /proc/stat sampling behind ``auto``.
SAMPLE_SECONDS = 0.1


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of ``cpus`` since boot, from /proc/stat; None elsewhere."""
    busy = total = 0
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if int(name[3:]) not in cpus:
                    continue
                ticks = [int(field) for field in fields[:8]]
                idle = ticks[3] + ticks[4]  # idle + iowait
                total += sum(ticks)
                busy += sum(ticks) - idle
    except (OSError, ValueError):
        return None
    return (busy, total) if total else None


def busy_cores(sample_seconds: float = SAMPLE_SECONDS) -> float:
    """Cores (of this process's affinity set) other processes kept busy over a short sample.

    Returns 0.0 where /proc/stat is not available. This process sleeps while it samples, so
    what it counts is other work.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return 0.0
    before = _cpu_times(cpus)
    time.sleep(sample_seconds)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    busy_fraction = (after[0] - before[0]) / (after[1] - before[1])
    return busy_fraction * len(cpus)


def pick_threads(value: int | str | None = "auto") -> int:
    """The number of CPU threads for ``value``: a positive int, or ``auto`` (or None).

    ``auto`` is the usable cores less those other processes keep busy (rounded to the nearest
    core), at least 1: all cores on an idle machine, 1 on a two-core machine where another
    job runs.

    Raises:
        OptionError: ``value`` is neither ``auto`` nor a positive whole number.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        cores = usable_cores()
        return 1 if cores == 1 else max(1, cores - round(busy_cores()))
    try:
        threads = int(value)
        if isinstance(value, float | bool) or str(threads) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise OptionError(
            "pipeline", "threads", f"give a positive whole number or auto, got {value!r}"
        ) from None
    if threads < 1:
        raise OptionError(
            "pipeline", "threads", f"give a positive whole number or auto, got {threads}"
        )
    return threads


def use_threads(value: int | str | None = "auto") -> int:
    """Set PyTorch's intra-op CPU threads from ``value`` (see :func:`pick_threads`).

    Returns:
        The number of threads set.
    """
    threads = pick_threads(value)
    torch.set_num_threads(threads)
    return threads
