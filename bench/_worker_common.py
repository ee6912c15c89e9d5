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


def trl_grpo_settings(
    spec: dict[str, Any], *, minibatch: int, prompts: int, group: int, epochs: int, steps_per_iteration: int,
    gradient_checkpointing: bool,
) -> dict[str, Any]:
    """`GRPOConfig` keyword arguments that make TRL's GRPO do what `RLTrainer`'s does (both benches):
    one optimizer step per minibatch, no accumulation, token-level loss (`dapo`, our normalisation),
    group-std scaling, constant lr, AdamW eps 1e-5, clip 1, prompts in the order given, no eval,
    no checkpoints. The caller adds where it runs (device, precision, output dir)."""
    return {
        "gradient_checkpointing": gradient_checkpointing,
        "per_device_train_batch_size": minibatch,
        "gradient_accumulation_steps": 1,
        "generation_batch_size": prompts * group,
        "num_generations": group,
        "num_iterations": epochs,
        "max_completion_length": spec["max_new_tokens"],
        "temperature": spec["temperature"],
        "top_p": 1.0,
        "top_k": 0,
        "beta": spec["kl_coef"],
        "epsilon": 0.2,
        "loss_type": "dapo",  # token-level sum over the optimizer step's tokens: our normalisation
        "scale_rewards": "group",
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_epsilon": 1e-5,
        "max_grad_norm": 1.0,
        "max_steps": spec["iterations"] * steps_per_iteration,
        "shuffle_dataset": False,
        "seed": spec["seed"],
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
