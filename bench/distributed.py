"""The RL stage on one process with 2 threads against 2 processes with 1 thread each (Ray Train on
this machine, `compute.processes=2`): the same settings, the same starting model, the same update;
and one process with 1 thread as the control.

For each case a fresh Python process runs the stage (`rft_core.compute.run_stage`, as the pipeline
does) and reports: the stage's wall time, and for Ray the engine's part of it: starting a Ray
instance (`connect_s`), starting the processes until each can train (`start_s`: scheduling, the
workers' imports), then training (`train_s`: model loading, iterations, the final save). The
starting model (the tiny model after a short warm-up SFT) is built once, beforehand, by neither.

    python bench/distributed.py --out bench/results/distributed.json [--iterations 8] [--repeats 1]
                                [--set rl.max_new_tokens=64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tiny demo model (configs/demo.yaml), a short pretraining and warm-up SFT, then RL iterations
# of the demo's shape (16 prompts x 4 samples, 48 new tokens, 2 PPO epochs over minibatches of 32).
SETTINGS = [
    "model.tiny.pretrain_steps=30",
    "model.device=cpu",
    "data.synthetic.n_train=400",
    "data.synthetic.n_val=40",
    "sft.max_steps=20",
    "sft.eval_interval=0",
    "sft.checkpoint_interval=0",
    "rl.prompts_per_iteration=16",
    "rl.samples_per_prompt=4",
    "rl.minibatch_size=32",
    "rl.ppo_epochs=2",
    "rl.max_new_tokens=48",
    "rl.critic_warmup=0",
    "rl.eval_interval=0",
    "rl.checkpoint_interval=0",
    "eval.max_items=40",
]

CASES = {
    "1 process x 2 threads": {"processes": 1, "threads": 2},
    "2 processes x 1 thread": {"processes": 2, "threads": 1},
    # The control: one thread, one process. Separates what the second process buys from what a second
    # thread costs on a busy machine (the GUIDE's note: threads fight other work for the cores).
    "1 process x 1 thread": {"processes": 1, "threads": 1},
}


def prepare(work: Path, overrides: list[str]) -> tuple[list[str], str, str, str]:
    """The data stages and the warm-up SFT model, once: (overrides, train items, val items, model)."""
    from rft_core import stages
    from rft_core.config import RFTConfig

    overrides = [f"output_dir={work / 'out'}", *overrides]
    cfg = RFTConfig.load(None, overrides)
    split = stages.split_stage(cfg, stages.validate_stage(cfg))
    sft = stages.sft_stage(cfg, split)
    return overrides, split.train_items, split.val_items, sft.model_dir


def run_case(overrides: list[str], processes: int, threads: int, train: str, val: str, model: str, out: Path) -> dict:
    """One stage in a fresh process (its thread settings fixed before torch loads)."""
    args = json.dumps({"overrides": [*overrides, f"compute.processes={processes}"], "train": train, "val": val,
                       "model": model, "out": str(out)})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--case", args], env=env, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the {processes}-process case failed:\n{done.stderr[-4000:]}")
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    timing["process_s"] = time.perf_counter() - started  # with Python's start and imports
    return timing


def case_main(args: dict) -> None:
    """The child: the RL stage, timed."""
    import torch

    from rft_core.compute import StageJob, run_stage
    from rft_core.config import RFTConfig

    cfg = RFTConfig.load(None, args["overrides"])
    job = StageJob("rl", cfg, args["train"], args["val"], args["model"], args["out"])
    timings: dict[str, float] = {}
    started = time.perf_counter()
    result = run_stage(job, timings)
    timings["stage_s"] = time.perf_counter() - started
    timings.setdefault("train_s", timings["stage_s"])
    timings["torch_threads"] = torch.get_num_threads()
    timings["reward_mean"] = result.metrics.get("val_reward_mean", float("nan"))
    print(json.dumps(timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distributed.json")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case_main(json.loads(args.case))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # the preparation: not measured
    load_at_start = os.getloadavg()[0]  # a shared machine: what else ran is part of the figures
    overrides = [*SETTINGS, f"rl.iterations={args.iterations}", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rft-bench-distributed-") as tmp:
        work = Path(tmp)
        overrides, train, val, model = prepare(work, overrides)
        for repeat in range(args.repeats):
            for name, case in CASES.items():
                out = work / f"rl-{case['processes']}-{repeat}"
                timing = run_case(overrides, case["processes"], case["threads"], train, val, model, out)
                rows.append({"case": name, "repeat": repeat, **case, **timing,
                             "iterations_per_s": args.iterations / timing["train_s"],
                             "load_average_1m_after": os.getloadavg()[0]})
                print(f"{name} (repeat {repeat + 1}): stage {timing['stage_s']:.1f} s", flush=True)
    summary = {}
    for name in CASES:
        mine = [r for r in rows if r["case"] == name]
        summary[name] = {key: statistics.median(r.get(key, 0.0) for r in mine)
                         for key in ("stage_s", "connect_s", "start_s", "train_s", "iterations_per_s")}
    print()
    print("| case | stage (s) | Ray start (s) | processes start (s) | training (s) | iterations/s |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['stage_s']:.1f} | {s['connect_s']:.1f} | {s['start_s']:.1f} | {s['train_s']:.1f} | "
              f"{s['iterations_per_s']:.3f} |")
    record = {
        "what": "RL stage, 1 process x 2 threads vs 2 processes x 1 thread (Ray Train on this machine)",
        "command": " ".join(["python", "bench/distributed.py", *sys.argv[1:]]),
        "settings": overrides[1:],
        "iterations": args.iterations,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m_at_start": load_at_start},
        "rows": rows,
        "median": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
