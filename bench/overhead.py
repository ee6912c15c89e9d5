"""Orchestration overhead: the pipeline as a Prefect flow with MLflow vs the same stages called directly.

1. core: validate, split, sft, rl, evaluate from `rft_core.stages`, one process, no tracking;
2. flow: `rft_pipeline` (Prefect task runs, result persistence, MLflow runs/metrics/artifacts, model
   logging, registry and gate) against an already started Prefect API;
3. rerun after a failure in the last stage (promote): the failed run, then a rerun of the same config;
   the rerun's time is compared with a full run's.

Both sides start with the tiny base model already built (its pretraining is part of neither). The
Prefect server's start-up time is reported on its own (a deployment talks to a running server).

    python bench/overhead.py --out bench/results/overhead.json [--config configs/demo.yaml] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def core_run(cfg) -> dict[str, float]:
    from rft_core import stages

    times: dict[str, float] = {}
    t = time.perf_counter()
    data = stages.validate_stage(cfg)
    times["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    split = stages.split_stage(cfg, data)
    times["split"] = time.perf_counter() - t
    t = time.perf_counter()
    sft = stages.sft_stage(cfg, split)
    times["sft"] = time.perf_counter() - t
    t = time.perf_counter()
    rl = stages.rl_stage(cfg, split, sft)
    times["rl"] = time.perf_counter() - t
    t = time.perf_counter()
    stages.evaluate_stage(cfg, split, {"sft": sft, "rl": rl})
    times["evaluate"] = time.perf_counter() - t
    return times


def with_output(cfg, out: Path, warm_cache: Path):
    shutil.copytree(warm_cache, out / "cache", dirs_exist_ok=True)
    return cfg.model_copy(update={"output_dir": str(out)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs" / "demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args()

    from rft_core import stages
    from rft_core.config import RFTConfig

    base = RFTConfig.from_yaml(args.config, args.overrides)
    root = Path(tempfile.mkdtemp(prefix="rft-overhead-"))
    warm = base.model_copy(update={"output_dir": str(root / "warm")})
    t = time.perf_counter()
    split = stages.split_stage(warm, stages.validate_stage(warm))
    stages.base_model_path(warm, split)
    base_model_s = time.perf_counter() - t
    warm_cache = root / "warm" / "cache"

    core_cfg = with_output(base, root / "core", warm_cache)
    t = time.perf_counter()
    core_stages = core_run(core_cfg)
    core_s = time.perf_counter() - t

    from prefect.testing.utilities import prefect_test_harness

    t = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        server_s = time.perf_counter() - t
        from flows.pipeline import rft_pipeline

        flow_cfg = with_output(base, root / "flow", warm_cache)
        t = time.perf_counter()
        summary = rft_pipeline(config=flow_cfg)
        flow_s = time.perf_counter() - t

        rerun_cfg = with_output(base, root / "rerun", warm_cache)
        os.environ["RFT_FAIL_STAGE"] = "promote"
        t = time.perf_counter()
        failed = rft_pipeline(config=rerun_cfg, return_state=True)
        failed_s = time.perf_counter() - t
        del os.environ["RFT_FAIL_STAGE"]
        t = time.perf_counter()
        rerun = rft_pipeline(config=rerun_cfg, return_state=True)
        rerun_s = time.perf_counter() - t

    result = {
        "config": str(args.config),
        "overrides": args.overrides,
        "base_model_seconds": base_model_s,
        "core_seconds": core_s,
        "core_stage_seconds": core_stages,
        "flow_seconds": flow_s,
        "flow_stage_seconds": summary["seconds"],
        "overhead_ratio": (flow_s - core_s) / core_s,
        "prefect_server_start_seconds": server_s,
        "failed_run_seconds": failed_s,
        "failed_run_state": failed.name,
        "rerun_seconds": rerun_s,
        "rerun_state": rerun.name,
        "rerun_ratio": rerun_s / flow_s,
        "targets": {"overhead_ratio": 0.10, "rerun_ratio": 0.10},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    rows = [
        ("core stages, direct (s)", f"{core_s:.1f}"),
        ("flow with Prefect + MLflow (s)", f"{flow_s:.1f}"),
        ("overhead (flow - core) / core", f"{result['overhead_ratio']:+.1%}  (target <= 10%)"),
        ("Prefect server start (s, not counted)", f"{server_s:.1f}"),
        ("run failing at promote (s)", f"{failed_s:.1f}  ({failed.name})"),
        ("rerun after that failure (s)", f"{rerun_s:.1f}  ({rerun.name})"),
        ("rerun / full flow", f"{result['rerun_ratio']:.1%}  (target <= 10%)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"JSON: {args.out}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
