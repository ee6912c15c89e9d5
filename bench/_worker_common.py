"""What every side of `bench/vs_trl.py` shares: thread pinning, memory readings, throughput maths.

Standard library only (plus torch, imported late), because the TRL sides import it from their own
virtual environments, where the project is not installed.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any


def pin_threads(threads: int) -> None:
    """The same intra-op thread count for every side (the parent also sets OMP/MKL_NUM_THREADS)."""
    import torch

    torch.set_num_threads(threads)


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now() -> tuple[float, float]:
    """(wall clock, CPU time of this process): a mark for `throughput`."""
    return time.perf_counter(), time.process_time()


def throughput(
    iteration_ends: list[tuple[float, float]], start: tuple[float, float], samples_per_iteration: int, warmup: int
) -> dict[str, Any]:
    """Completed samples per second over the iterations after the first `warmup` ones.

    `iteration_ends[i]` is the `now()` mark when iteration i finished; `start` when iteration 0
    began. Besides wall-clock samples/s, samples per CPU-second of the process: with one thread,
    that figure is nearly immune to other processes competing for the cores.
    """
    if len(iteration_ends) <= warmup:
        raise ValueError(f"need more than {warmup} iterations to measure, got {len(iteration_ends)}")
    marks = [start, *iteration_ends]
    durations = [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)]
    measured, measured_cpu = durations[warmup:], cpu[warmup:]
    return {
        "iteration_s": durations,
        "iteration_cpu_s": cpu,
        "measured_iterations": len(measured),
        "measured_s": sum(measured),
        "measured_cpu_s": sum(measured_cpu),
        "samples_per_s": samples_per_iteration * len(measured) / sum(measured),
        "samples_per_cpu_s": samples_per_iteration * len(measured) / sum(measured_cpu),
    }


class Clock:
    """Accumulates wall and CPU time of named sections; `wrap` times every call of a function.

    `take()` gives {name: wall seconds, name + "_cpu": CPU seconds of the process}.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def add(self, name: str, seconds: float, cpu_seconds: float | None = None) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        if cpu_seconds is not None:
            self.totals[name + "_cpu"] = self.totals.get(name + "_cpu", 0.0) + cpu_seconds

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0, time.process_time() - c0)

        return timed

    def take(self) -> dict[str, float]:
        """The totals so far, reset to zero."""
        out, self.totals = self.totals, {}
        return out


def write_result(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {**payload, "peak_rss_mb": peak_rss_mb()}
    Path(path).write_text(json.dumps(payload, indent=1))
