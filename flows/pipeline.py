"""The RFT pipeline flow: validate -> split -> warm-up SFT -> RL -> evaluate -> register -> promote.

One MLflow parent run per flow run (a retried flow run continues its parent run); one child run
per stage. Stage results are cached on their keys under `<output_dir>/prefect-results`, so a rerun
of the same config, or `prefect flow-run retry`, recomputes only what failed and what follows.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.filesystems import LocalFileSystem
from prefect.runtime import flow_run

from rft_core import stages, tracking
from rft_core.config import RFTConfig
from tasks.stages import (
    evaluate_models,
    promote,
    register_model,
    reinforce,
    split_data,
    validate_data,
    warmup_sft,
)


def _results_storage(config: RFTConfig) -> str:
    """A saved LocalFileSystem block under output_dir: any process or worker that runs this config
    finds the cached stage results there."""
    path = Path(config.output_dir).resolve() / "prefect-results"
    path.mkdir(parents=True, exist_ok=True)
    name = "rft-results-" + stages.hash_of(str(path))
    LocalFileSystem(basepath=str(path)).save(name, overwrite=True)
    return f"local-file-system/{name}"


def _with_storage(task_fn, storage: str, fresh: bool):
    options: dict[str, Any] = {"result_storage": storage}
    if fresh:
        options["refresh_cache"] = True
    return task_fn.with_options(**options)


def open_pipeline_run(config: RFTConfig, tracking_uri: str) -> str:
    """The MLflow parent run of this flow run: reopened when Prefect retries the flow run."""
    run_key = str(flow_run.get_id() or "") or None
    if run_key:
        existing = tracking.find_pipeline_run(config.experiment, run_key, tracking_uri=tracking_uri)
        if existing:
            tracking.reopen_run(existing, tracking_uri=tracking_uri)
            return existing
    tags = {"prefect.flow_run_id": run_key} if run_key else {}
    return tracking.start_pipeline_run(config, tracking_uri=tracking_uri, tags=tags)


@flow(name="rft-pipeline", log_prints=True)
def rft_pipeline(config: RFTConfig | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run every stage of reinforcement fine-tuning on `config`; returns a summary."""
    config = config or RFTConfig()
    log = get_run_logger()
    logging.getLogger("rft").setLevel(logging.INFO)
    uri = tracking.resolve_tracking_uri(config)
    tracking.check_tracking_available(uri)
    parent = open_pipeline_run(config, uri)
    log.info("MLflow run %s at %s (look: %s)", parent, uri, tracking.ui_command(uri))
    storage = _results_storage(config)
    t = {name: _with_storage(fn, storage, fresh) for name, fn in {
        "validate": validate_data, "split": split_data, "sft": warmup_sft, "rl": reinforce,
        "evaluate": evaluate_models, "register": register_model, "promote": promote}.items()}
    timings: dict[str, float] = {}

    def timed(name: str, *args: Any) -> Any:
        started = time.perf_counter()
        result = t[name](*args, parent_run_id=parent, tracking_uri=uri)
        timings[name] = time.perf_counter() - started
        reused = getattr(result, "run_id", None)
        if reused and _parent_of(reused, uri) not in (parent, None):
            # A cache hit: the stage's run belongs to an earlier pipeline run; point at it.
            tracking.set_tags(parent, {f"rft.reused.{name}": reused}, tracking_uri=uri)
        return result

    try:
        data = timed("validate", config)
        split = timed("split", config, data)
        sft = timed("sft", config, split)
        models = {"sft": sft}
        if config.rl.enabled:
            models["rl"] = timed("rl", config, split, sft)
        final = models[list(models)[-1]]
        evaluation = timed("evaluate", config, split, models)
        summary: dict[str, Any] = {
            "mlflow_run_id": parent,
            "tracking_uri": uri,
            "metrics": evaluation.metrics,
            "seconds": timings,
            "split": {"train": split.n_train, "validation": split.n_val, "leakage_pairs": split.leakage},
            "rejected": {role: rep["rejected"] for role, rep in data.reports.items()},
            "model_dir": final.model_dir,
        }
        if config.registry.enabled and final.model_uri:
            registered = timed("register", config, split, final, evaluation)
            summary["registered"] = {"name": registered.name, "version": registered.version}
            summary["gate_metric"] = config.registry.metric
            if config.registry.promote:
                summary["gate"] = timed("promote", config, split, registered)
        tracking.log_metrics_once(parent, {f"time/{k}": v for k, v in timings.items()}, tracking_uri=uri)
        create_markdown_artifact(
            markdown=_report(summary, uri), key="rft-evaluation", description="SFT vs RL on the validation set"
        )
    except BaseException:
        # Not when the tracking server is what failed: ending the run would wait minutes on
        # MLflow's retries and then replace the original error with its own.
        with contextlib.suppress(Exception):
            tracking.check_tracking_available(uri)
            tracking.end_run(parent, "FAILED", tracking_uri=uri)
        raise
    tracking.end_run(parent, "FINISHED", tracking_uri=uri)
    return summary


def _parent_of(run_id: str, uri: str) -> str | None:
    """The pipeline run a stage run belongs to; None when this store does not know the run (a
    cached stage logged to another MLflow store)."""
    try:
        return tracking.run_tags(run_id, tracking_uri=uri).get("mlflow.parentRunId")
    except Exception:
        return None


def _report(summary: dict[str, Any], uri: str) -> str:
    table = dict(summary["metrics"])
    gate = summary.get("gate") or {}
    if gate.get("champion_version") is not None and gate.get("champion_value") is not None:
        # The champion before this run, on the same validation data (the gate's metric only).
        metric = summary.get("gate_metric", "eval/accuracy").rsplit("/", 1)[-1]
        table[f"champion v{gate['champion_version']}"] = {metric: gate["champion_value"]}
    lines = ["# RFT evaluation (validation set)", "", stages.evaluation_table(table), ""]
    if "registered" in summary:
        reg = summary["registered"]
        lines.append(f"Registered **{reg['name']}** version **{reg['version']}**.")
    if "gate" in summary:
        gate = summary["gate"]
        lines.append(f"Gate: **{'promoted' if gate['promoted'] else 'refused'}**: {gate['reason']}")
    lines += ["", f"MLflow run `{summary['mlflow_run_id']}` at `{uri}`: {tracking.run_link(summary['mlflow_run_id'], uri)}"]
    return "\n".join(lines)
