"""Python-grader throughput: kernel-isolated workers (`sandbox="namespaces"`) vs the old guard.

The old sandbox (a separate process with a memory limit and an audit hook, no isolation) is still
the explicit opt-out `sandbox="none"`, so both run from the same code in one process, interleaved
round by round so that a busy shared machine slows both alike. Two graders: a trivial one
(`return 1.0`: pure per-call overhead) and a regex one (a GSM8K-style `#### answer` check).
Each is measured with 1 and with `--workers` worker processes through `grade_batch`; workers are
started (and isolated) before the clock starts, as in training, where they are reused across
calls. Start-up (building the grader: one worker started, isolated, source loaded) is timed apart.

    python bench/graders.py --workers 2 --calls 2000 --rounds 3 --out bench/results/graders.json

Prints a table (median calls/s over rounds) and writes the JSON with every round's figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the bench itself stays light on a shared machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rft_core.graders import grade_batch  # noqa: E402
from rft_core.graders.python_grader import PythonGrader  # noqa: E402

# Every `sandbox="none"` build warns; here that mode is the deliberate baseline.
logging.getLogger("rft_core.graders.python_grader").setLevel(logging.ERROR)

GRADERS = {
    "trivial": "def grade(sample, item):\n    return 1.0\n",
    "regex": (
        "import re\n"
        "ANSWER = re.compile(r'####\\s*(-?[\\d,]*\\.?\\d+)')\n"
        "def grade(sample, item):\n"
        "    match = ANSWER.search(sample['output_text'])\n"
        "    return float(match is not None and match.group(1).replace(',', '') == str(item['answer']))\n"
    ),
}
MODES = ("none", "namespaces")


def batch(calls: int) -> tuple[list[str], list[dict]]:
    samples = [f"Step one gives {i}, step two doubles it.\n#### {2 * i}" for i in range(calls)]
    items = [{"answer": 2 * i if i % 3 else i} for i in range(calls)]
    return samples, items


def measure(source: str, mode: str, workers: int, calls: int) -> dict[str, float]:
    start = time.perf_counter()
    grader = PythonGrader({"type": "python", "name": "bench", "source": source}, sandbox=mode)
    startup_s = time.perf_counter() - start
    try:
        samples, items = batch(calls)
        warm = max(2 * workers, 8)  # start every worker of the pool before the clock starts
        grade_batch(grader, samples[:warm], items[:warm], workers=workers)
        start = time.perf_counter()
        results = grade_batch(grader, samples, items, workers=workers)
        elapsed = time.perf_counter() - start
        errors = sum(not r.ok for r in results)
        if errors:
            raise RuntimeError(f"{errors} error results, first: {next(r.errors for r in results if not r.ok)}")
    finally:
        grader.close()
    return {"calls_per_s": calls / elapsed, "startup_s": startup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="N of the N-worker runs (1 is always run)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; the table shows the median")
    parser.add_argument("--out", type=Path, default=Path("bench/results/graders.json"))
    args = parser.parse_args()

    worker_counts = sorted({1, args.workers})
    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for name, source in GRADERS.items():
            for workers in worker_counts:
                for mode in MODES:
                    runs.setdefault((name, mode, workers), []).append(measure(source, mode, workers, args.calls))

    rows = []
    for (name, mode, workers), figures in runs.items():
        rows.append({
            "grader": name, "sandbox": mode, "workers": workers,
            "calls_per_s": statistics.median(f["calls_per_s"] for f in figures),
            "startup_ms": 1000 * statistics.median(f["startup_s"] for f in figures),
            "rounds": figures,
        })
    by_key = {(r["grader"], r["sandbox"], r["workers"]): r for r in rows}
    for row in rows:
        row["vs_none"] = row["calls_per_s"] / by_key[(row["grader"], "none", row["workers"])]["calls_per_s"]

    print(f"{'grader':8} {'workers':>7} {'sandbox':>10} {'calls/s':>9} {'vs none':>8} {'start-up ms':>12}")
    for row in rows:
        print(f"{row['grader']:8} {row['workers']:>7} {row['sandbox']:>10} {row['calls_per_s']:>9.0f} "
              f"{row['vs_none']:>8.2f} {row['startup_ms']:>12.0f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"workers": args.workers, "calls": args.calls, "rounds": args.rounds,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "load_avg_1m": os.getloadavg()[0]},
        "rows": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
